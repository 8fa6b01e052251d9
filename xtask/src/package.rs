//! `cargo xtask package [--profile release|e2e]`: the Debian package
//! `target/debian/wgxdp_<version>_<arch>.deb` (`--profile e2e`:
//! `target/debian/e2e/…`, what `cargo xtask test` checks without a fat-LTO
//! build). Its files come from `packaging/` and from the binary itself (man
//! pages, completions); the staging tree is rebuilt from scratch each time.

use crate::{build_ebpf, root, run, setup, target_dir};
use anyhow::{bail, Context, Result};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// The cargo profiles a package can be built from.
const PROFILES: &[&str] = &["release", "e2e"];

/// Files of `packaging/` and where they go: (source, destination, mode).
const STATIC_FILES: &[(&str, &str, u32)] = &[
    ("wgxdp.service", "lib/systemd/system/wgxdp.service", 0o644),
    ("wgxdp.tmpfiles", "usr/lib/tmpfiles.d/wgxdp.conf", 0o644),
    ("wgxdp.toml.example", "etc/wgxdp/wgxdp.toml.example", 0o644),
    ("copyright", "usr/share/doc/wgxdp/copyright", 0o644),
];

/// Maintainer scripts copied into DEBIAN/.
const SCRIPTS: &[&str] = &["postinst", "prerm", "postrm"];

/// Files under /etc that dpkg keeps when the administrator changed them.
const CONFFILES: &[&str] = &["/etc/wgxdp/wgxdp.toml.example"];

/// Completion scripts: (shell, destination).
const COMPLETIONS: &[(&str, &str)] = &[
    ("bash", "usr/share/bash-completion/completions/wgxdp"),
    ("zsh", "usr/share/zsh/vendor-completions/_wgxdp"),
    ("fish", "usr/share/fish/vendor_completions.d/wgxdp.fish"),
];

const MAINTAINER: &str = "wgxdp maintainers <wgxdp@localhost>";
const DESCRIPTION: &str = "WireGuard-compatible VPN gateway on AF_XDP
 An XDP program steers tunnel traffic into AF_XDP sockets; pinned worker
 threads run the WireGuard protocol and forward packets; a control plane
 serves an HTTP API over an SQLite store. Runs as a systemd service with
 CAP_NET_ADMIN, CAP_NET_RAW, CAP_BPF and CAP_PERFMON only.";

pub fn package(args: &[String]) -> Result<()> {
    let mut profile = "release".to_owned();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--profile" => profile = it.next().context("--profile release|e2e")?.clone(),
            other => bail!("unknown argument `{other}` (usage: cargo xtask package [--profile release|e2e])"),
        }
    }
    if !PROFILES.contains(&profile.as_str()) {
        bail!("unknown profile `{profile}` (one of: {})", PROFILES.join(", "));
    }
    let started = Instant::now();
    setup::install_all()?;
    build_ebpf()?;
    let deb = build(&profile)?;
    println!("== package: {} ({:.0} s)", deb.display(), started.elapsed().as_secs_f64());
    Ok(())
}

/// Builds `wgxdp` with `profile` (the XDP program must be built already:
/// `build_ebpf`) and packages it; returns the .deb's path.
pub fn build(profile: &str) -> Result<PathBuf> {
    println!("== package: building wgxdp ({profile} profile)");
    let started = Instant::now();
    run(Command::new("cargo").current_dir(root()).args([
        "build",
        "-p",
        "wgxdp-control",
        "--bin",
        "wgxdp",
        "--profile",
        profile,
    ]))?;
    println!("   built in {:.0} s", started.elapsed().as_secs_f64());
    let binary = target_dir().join(profile).join("wgxdp");
    let out_dir = match profile {
        "release" => target_dir().join("debian"),
        other => target_dir().join("debian").join(other),
    };
    assemble(&binary, &out_dir)
}

/// The package version: the workspace's (xtask shares it).
fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    String::from_utf8(out.stdout).with_context(|| format!("{cmd:?} printed non-UTF-8"))
}

/// Copies `from` to `to` (creating its directory) with `mode`.
fn install(from: &Path, to: &Path, mode: u32) -> Result<()> {
    std::fs::create_dir_all(to.parent().expect("destinations are inside the tree"))?;
    std::fs::copy(from, to).with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Writes `bytes` to `to` (creating its directory) with `mode`.
fn write(to: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    std::fs::create_dir_all(to.parent().expect("destinations are inside the tree"))?;
    std::fs::write(to, bytes).with_context(|| format!("writing {}", to.display()))?;
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Lays out the package tree for `binary` under `out_dir` and builds the .deb.
fn assemble(binary: &Path, out_dir: &Path) -> Result<PathBuf> {
    let arch = output(Command::new("dpkg").arg("--print-architecture"))?.trim().to_owned();
    let name = format!("wgxdp_{}_{arch}", version());
    let tree = out_dir.join(&name);
    let deb = out_dir.join(format!("{name}.deb"));
    println!("== package: assembling {}", tree.display());
    if tree.exists() {
        std::fs::remove_dir_all(&tree).with_context(|| format!("removing the old {}", tree.display()))?;
    }
    // Directories are 0755 whatever the umask says.
    let sources = root().join("packaging");

    let sbin = tree.join("usr/sbin/wgxdp");
    install(binary, &sbin, 0o755)?;
    // Debug information stays in target/; the package ships the code.
    run(Command::new("strip").arg("--strip-debug").arg(&sbin))?;

    for (from, to, mode) in STATIC_FILES {
        install(&sources.join(from), &tree.join(to), *mode)?;
    }

    println!("   manual pages (wgxdp generate man)");
    let man_dir = tree.join("usr/share/man/man8");
    let pages = output(Command::new(&sbin).args(["generate", "man", "--dir"]).arg(&man_dir))?;
    let mut count = 0;
    for page in pages.lines() {
        run(Command::new("gzip").args(["-9", "-n", "-f"]).arg(page))?;
        // Readable by all, whatever the builder's umask.
        std::fs::set_permissions(format!("{page}.gz"), std::fs::Permissions::from_mode(0o644))?;
        count += 1;
    }
    if !man_dir.join("wgxdp.8.gz").exists() {
        bail!("`wgxdp generate man` did not write wgxdp.8");
    }
    println!("   {count} pages");

    println!("   completions (wgxdp generate completions)");
    for (shell, to) in COMPLETIONS {
        let script = output(Command::new(&sbin).args(["generate", "completions", shell]))?;
        write(&tree.join(to), script.as_bytes(), 0o644)?;
    }

    let debian = tree.join("DEBIAN");
    for script in SCRIPTS {
        install(&sources.join(script), &debian.join(script), 0o755)?;
    }
    let conffiles: String = CONFFILES.iter().map(|c| format!("{c}\n")).collect();
    write(&debian.join("conffiles"), conffiles.as_bytes(), 0o644)?;
    let depends = depends(&sbin, &out_dir.join(format!("{name}.shlibdeps")))?;
    println!("   Depends: {depends}");
    let control = format!(
        "Package: wgxdp\nVersion: {}\nArchitecture: {arch}\nMaintainer: {MAINTAINER}\nInstalled-Size: {}\n\
         Depends: {depends}\nRecommends: wireguard-tools\nSection: net\nPriority: optional\nDescription: {DESCRIPTION}\n",
        version(),
        installed_size_kib(&tree)?,
    );
    write(&debian.join("control"), control.as_bytes(), 0o644)?;
    fix_directory_modes(&tree)?;

    println!("== package: dpkg-deb --build --root-owner-group");
    run(Command::new("dpkg-deb").args(["--build", "--root-owner-group"]).arg(&tree).arg(&deb))?;
    Ok(deb)
}

/// The shared libraries' packages with their minimum versions, as
/// dpkg-shlibdeps finds them from the binary's NEEDED entries and the
/// installed packages' symbols files.
fn depends(binary: &Path, scratch: &Path) -> Result<String> {
    // dpkg-shlibdeps wants to run in a source package: give it an empty one.
    std::fs::create_dir_all(scratch.join("debian"))?;
    std::fs::write(scratch.join("debian/control"), "")?;
    let out =
        output(Command::new("dpkg-shlibdeps").current_dir(scratch).args(["-O", "-e"]).arg(binary.canonicalize()?));
    std::fs::remove_dir_all(scratch)?;
    let line = out?;
    let deps = line
        .lines()
        .find_map(|l| l.strip_prefix("shlibs:Depends="))
        .with_context(|| format!("dpkg-shlibdeps printed no shlibs:Depends: {line}"))?
        .trim()
        .to_owned();
    if !deps.contains("libc6") {
        bail!("dpkg-shlibdeps found no libc6 dependency ({deps}): is the binary dynamically linked?");
    }
    Ok(deps)
}

/// Installed-Size: KiB of the files (DEBIAN/ excluded), each rounded up.
fn installed_size_kib(tree: &Path) -> Result<u64> {
    fn walk(dir: &Path, total: &mut u64) -> Result<()> {
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            if e.file_name() == "DEBIAN" {
                continue;
            }
            let meta = e.metadata()?;
            if meta.is_dir() {
                walk(&e.path(), total)?;
            } else {
                *total += meta.len().div_ceil(1024);
            }
        }
        Ok(())
    }
    let mut total = 0;
    walk(tree, &mut total)?;
    Ok(total)
}

/// dpkg-deb refuses a DEBIAN/ with unusual modes, and the package's
/// directories must not carry the builder's umask: every directory 0755.
fn fix_directory_modes(dir: &Path) -> Result<()> {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            fix_directory_modes(&e.path())?;
        }
    }
    Ok(())
}
