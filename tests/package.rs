//! The Debian package `cargo xtask package` builds: its metadata, its files
//! and their owners and modes, a systemd unit that `systemd-analyze verify`
//! accepts and that grants exactly the documented capabilities, a binary that
//! runs, the manual pages and the shell completions.
//!
//! `cargo xtask test` packages the e2e build first and passes its path in
//! `WGXDP_PACKAGE` with `WGXDP_REQUIRE_PACKAGE=1`: then a missing package
//! fails the test. Otherwise the test looks for `cargo xtask package`'s
//! output (`<target>/debian/wgxdp_<version>_<arch>.deb`) and, when there is
//! none, says so loudly and checks nothing (building a release binary inside
//! `cargo test` would hold cargo's lock for minutes).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The capabilities the README's "Least privilege" lists and the unit grants.
const DOCUMENTED_CAPABILITIES: &[&str] = &["CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_BPF", "CAP_PERFMON"];
/// The visible subcommands of `wgxdp`.
const SUBCOMMANDS: &[&str] = &["serve", "check", "detach", "vpn", "apikey", "genkey", "pubkey"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn output(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The package to check, or `None` (after saying why) when there is none
/// and none is required.
fn package() -> Option<PathBuf> {
    let required = std::env::var("WGXDP_REQUIRE_PACKAGE").is_ok_and(|v| v == "1");
    let deb = match std::env::var_os("WGXDP_PACKAGE") {
        Some(p) => PathBuf::from(p),
        None => {
            // This test runs from <target>/<profile>/deps/.
            let exe = std::env::current_exe().unwrap();
            let target = exe.ancestors().nth(3).expect("the test binary is inside <target>/<profile>/deps");
            let arch = output(Command::new("dpkg").arg("--print-architecture"));
            target.join("debian").join(format!("wgxdp_{}_{}.deb", env!("CARGO_PKG_VERSION"), arch.trim()))
        }
    };
    if deb.is_file() {
        return Some(deb);
    }
    assert!(!required, "{} is missing: `cargo xtask package` (or `cargo xtask test`) builds it", deb.display());
    eprintln!(
        "\n!!! SKIPPED: no package at {} -- run `cargo xtask package` first (`cargo xtask test` does, \
         and then requires it)\n",
        deb.display()
    );
    None
}

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn field(deb: &Path, name: &str) -> String {
    output(Command::new("dpkg-deb").arg("-f").arg(deb).arg(name)).trim().to_owned()
}

/// The value of `key=` in the unit (the first such line).
fn unit_value<'a>(unit: &'a str, key: &str) -> &'a str {
    unit.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {key}= in the unit"))
}

#[test]
fn the_debian_package_is_complete_and_consistent() {
    wgxdp_integration::require_tools(&["dpkg-deb", "systemd-analyze", "systemd-tmpfiles", "bash", "gzip"]);
    let Some(deb) = package() else { return };
    let scratch = Scratch(std::env::temp_dir().join(format!("wgxdp-deb-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&scratch.0);
    std::fs::create_dir_all(&scratch.0).unwrap();
    let tree = scratch.0.join("root");
    let control = scratch.0.join("DEBIAN");

    // Metadata.
    assert_eq!(field(&deb, "Package"), "wgxdp");
    assert_eq!(field(&deb, "Version"), env!("CARGO_PKG_VERSION"));
    assert_eq!(field(&deb, "Architecture"), output(Command::new("dpkg").arg("--print-architecture")).trim());
    let depends = field(&deb, "Depends");
    assert!(depends.starts_with("libc6 (>= ") || depends.contains(", libc6 (>= "), "Depends: {depends}");
    assert!(field(&deb, "Installed-Size").parse::<u64>().unwrap() > 1000);

    // Every file, owned by root, with its mode.
    let listing = output(Command::new("dpkg-deb").arg("-c").arg(&deb));
    let expected = [
        ("-rwxr-xr-x", "./usr/sbin/wgxdp"),
        ("-rw-r--r--", "./lib/systemd/system/wgxdp.service"),
        ("-rw-r--r--", "./usr/lib/tmpfiles.d/wgxdp.conf"),
        ("-rw-r--r--", "./etc/wgxdp/wgxdp.toml.example"),
        ("-rw-r--r--", "./usr/share/man/man8/wgxdp.8.gz"),
        ("-rw-r--r--", "./usr/share/man/man8/wgxdp-serve.8.gz"),
        ("-rw-r--r--", "./usr/share/bash-completion/completions/wgxdp"),
        ("-rw-r--r--", "./usr/share/zsh/vendor-completions/_wgxdp"),
        ("-rw-r--r--", "./usr/share/fish/vendor_completions.d/wgxdp.fish"),
        ("-rw-r--r--", "./usr/share/doc/wgxdp/copyright"),
    ];
    for (mode, path) in expected {
        let line = listing
            .lines()
            .find(|l| l.ends_with(&format!(" {path}")))
            .unwrap_or_else(|| panic!("{path} is not in the package:\n{listing}"));
        assert!(line.starts_with(&format!("{mode} root/root ")), "{line}");
    }
    for line in listing.lines() {
        assert!(line.split_whitespace().nth(1) == Some("root/root"), "not owned by root: {line}");
        if line.starts_with('d') {
            assert!(line.starts_with("drwxr-xr-x "), "directory mode: {line}");
        }
    }

    output(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree));
    output(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(&control));
    assert_eq!(std::fs::read_to_string(control.join("conffiles")).unwrap(), "/etc/wgxdp/wgxdp.toml.example\n");
    for script in ["postinst", "prerm", "postrm"] {
        output(Command::new("sh").arg("-n").arg(control.join(script)));
    }

    // The packaged files are the repository's.
    for (packaged, source) in [
        ("lib/systemd/system/wgxdp.service", "packaging/wgxdp.service"),
        ("etc/wgxdp/wgxdp.toml.example", "packaging/wgxdp.toml.example"),
        ("usr/lib/tmpfiles.d/wgxdp.conf", "packaging/wgxdp.tmpfiles"),
    ] {
        assert_eq!(
            std::fs::read_to_string(tree.join(packaged)).unwrap(),
            std::fs::read_to_string(root().join(source)).unwrap(),
            "{packaged} differs from {source}: rebuild the package"
        );
    }

    // The binary runs.
    let binary = tree.join("usr/sbin/wgxdp");
    let version = output(Command::new(&binary).arg("--version"));
    assert_eq!(version.trim(), format!("wgxdp {}", env!("CARGO_PKG_VERSION")));

    check_unit(&tree, &scratch.0);

    // The tmpfiles.d entry makes /run/wireguard (here under a scratch root).
    let tmpfiles_root = scratch.0.join("tmpfiles");
    output(
        Command::new("systemd-tmpfiles")
            .arg("--create")
            .arg(format!("--root={}", tmpfiles_root.display()))
            .arg(tree.join("usr/lib/tmpfiles.d/wgxdp.conf")),
    );
    let made = std::fs::metadata(tmpfiles_root.join("run/wireguard")).expect("/run/wireguard not created");
    assert!(made.is_dir() && std::os::unix::fs::PermissionsExt::mode(&made.permissions()) & 0o777 == 0o755);

    // Manual pages: one per subcommand, and wgxdp(8) names them all.
    let page = output(Command::new("sh").arg("-c").arg(format!(
        "gzip -dc {} | MANWIDTH=120 man -l - 2>/dev/null || gzip -dc {}",
        tree.join("usr/share/man/man8/wgxdp.8.gz").display(),
        tree.join("usr/share/man/man8/wgxdp.8.gz").display()
    )));
    for sub in SUBCOMMANDS {
        assert!(
            page.contains(&format!("wgxdp-{sub}(8)")) || page.contains(&format!("wgxdp\\-{sub}(8)")),
            "{sub}:\n{page}"
        );
        assert!(tree.join(format!("usr/share/man/man8/wgxdp-{sub}.8.gz")).is_file(), "no page for {sub}");
    }
    for section in ["SYNOPSIS", "SUBCOMMANDS", "ENVIRONMENT", "CAPABILITIES"] {
        assert!(page.contains(section), "no {section} section:\n{page}");
    }

    // Completions.
    let bash = tree.join("usr/share/bash-completion/completions/wgxdp");
    output(Command::new("bash").arg("-n").arg(&bash));
    let completed = output(Command::new("bash").arg("-c").arg(format!(
        "source {}; COMP_WORDS=(wgxdp de); COMP_CWORD=1; _wgxdp wgxdp de wgxdp; echo \"${{COMPREPLY[@]}}\"",
        bash.display()
    )));
    assert_eq!(completed.trim(), "detach", "bash completes `wgxdp de`");
    for file in [
        "usr/share/bash-completion/completions/wgxdp",
        "usr/share/zsh/vendor-completions/_wgxdp",
        "usr/share/fish/vendor_completions.d/wgxdp.fish",
    ] {
        let text = std::fs::read_to_string(tree.join(file)).unwrap();
        assert!(SUBCOMMANDS.iter().all(|s| text.contains(s)), "{file} misses a subcommand");
    }
}

/// The unit: what it runs exists in the package, it restarts on failure,
/// it grants exactly the documented capabilities, and systemd accepts it.
fn check_unit(tree: &Path, scratch: &Path) {
    let unit = std::fs::read_to_string(tree.join("lib/systemd/system/wgxdp.service")).unwrap();
    let exec_start = unit_value(&unit, "ExecStart");
    assert_eq!(exec_start, "/usr/sbin/wgxdp serve --config /etc/wgxdp/wgxdp.toml");
    for line in unit.lines().filter(|l| l.starts_with("Exec")) {
        let program = line.split_once('=').unwrap().1.trim_start_matches(['+', '-', '!', '@', ':']);
        let program = program.split_whitespace().next().unwrap();
        if program.starts_with("/usr/sbin/wgxdp") {
            assert!(tree.join(program.trim_start_matches('/')).is_file(), "{line}: not in the package");
        } else {
            assert!(Path::new(program).is_file(), "{line}: {program} is not on this system");
        }
    }
    assert_eq!(unit_value(&unit, "Restart"), "on-failure");
    assert_eq!(unit_value(&unit, "NoNewPrivileges"), "yes");
    assert_eq!(unit_value(&unit, "LimitMEMLOCK"), "infinity");
    assert_eq!(unit_value(&unit, "StateDirectory"), "wgxdp");
    assert!(
        !unit.lines().any(|l| l.starts_with("RuntimeDirectory")),
        "/run/wireguard is shared with wireguard-go: never a RuntimeDirectory"
    );
    assert!(unit.lines().any(|l| l == "ReadWritePaths=/run/wireguard"), "wg's sockets need /run/wireguard");
    let mut documented = DOCUMENTED_CAPABILITIES.to_vec();
    documented.sort_unstable();
    for key in ["CapabilityBoundingSet", "AmbientCapabilities"] {
        let mut caps: Vec<&str> = unit_value(&unit, key).split_whitespace().collect();
        caps.sort_unstable();
        assert_eq!(caps, documented, "{key}");
    }
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let least = readme.split("### Least privilege").nth(1).expect("README has a `### Least privilege` section");
    for cap in DOCUMENTED_CAPABILITIES {
        assert!(least.contains(cap), "README's Least privilege does not list {cap}");
    }

    // systemd-analyze verify, with the unit pointing at the unpacked binary
    // (the package is not installed here): no complaint at all.
    let verify_dir = scratch.join("verify");
    std::fs::create_dir_all(&verify_dir).unwrap();
    let local = unit.replace("/usr/sbin/wgxdp", tree.join("usr/sbin/wgxdp").to_str().unwrap());
    std::fs::write(verify_dir.join("wgxdp.service"), local).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(verify_dir.join("wgxdp.service"))
        .output()
        .unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.trim().is_empty(), "systemd-analyze verify:\n{said}");
}
