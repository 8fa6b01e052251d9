//! `wgxdp check` in the site topology's gateway namespace: a good
//! configuration passes and reports what the kernel says veth supports; a
//! missing interface, a key file readable by others and a WAN MTU too small
//! for `tunnel_mtu` each fail with a line naming the problem; more NIC queues
//! than workers is a warning with the `ethtool -L` that fixes it. Nothing is
//! ever attached; programs already there are reported (a stale wgxdp one as a
//! warning, another tool's as an error) and left alone.

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Output;
use wgxdp_dataplane::loader::{attach_without_link, attached_programs, XdpMode};
use wgxdp_integration::site::{write_private_key, SiteTopology, TempDir};
use wgxdp_integration::{require_tools, xdp_object};

fn wgxdp() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_wgxdp"))
}

struct Run {
    ok: bool,
    stdout: String,
    stderr: String,
}

impl Run {
    /// The line of check `check` (`wan IFACE mtu`, …), failing with the whole output if there is none.
    fn line(&self, check: &str) -> &str {
        self.stdout
            .lines()
            .find(|l| l.split_once(' ').is_some_and(|(_, rest)| rest.trim_start().starts_with(&format!("{check}: "))))
            .unwrap_or_else(|| panic!("no `{check}` line in:\n{}{}", self.stdout, self.stderr))
    }
}

fn check(topo: &SiteTopology, config: &Path) -> Run {
    let out: Output =
        topo.gateway.command(wgxdp().to_str().unwrap()).args(["check", "--config"]).arg(config).output().unwrap();
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn write(path: PathBuf, text: &str) -> PathBuf {
    std::fs::write(&path, text).unwrap();
    path
}

/// Attaches program `program` of `object` to `iface` without a link (as a
/// crashed process or `ip link` leaves it); returns its id.
fn leave_program(topo: &SiteTopology, iface: &str, object: Vec<u8>, program: &'static str) -> u32 {
    let iface = iface.to_owned();
    topo.gateway.enter(move || {
        let mut ebpf = aya::Ebpf::load(&object).unwrap();
        let prog: &mut aya::programs::Xdp = ebpf.program_mut(program).unwrap().try_into().unwrap();
        prog.load().unwrap();
        attach_without_link(&iface, prog.fd().unwrap().as_fd(), XdpMode::Driver).unwrap();
        attached_programs(&iface).unwrap()[0].prog_id
    })
}

fn assert_no_xdp(topo: &SiteTopology) {
    let links = topo.gateway.ip(&["link", "show"]);
    assert!(!links.contains("xdp"), "`wgxdp check` attached something:\n{links}");
}

#[test]
fn check_reports_the_configuration_and_the_nics_without_attaching() {
    require_tools(&["ip", "ethtool"]);
    let topo = SiteTopology::new("ck");
    let dir = TempDir::new("wgxdp-check");
    let key = dir.join("gw.key");
    write_private_key(&key);
    let (wan, lan) = (topo.gateway_wan.clone(), topo.gateway_lan.clone());

    // A good configuration: every line ok or warning, exit 0.
    let good = write(dir.join("good.toml"), &topo.api_config(&key, "127.0.0.1:8080", &dir.join("state/wgxdp.db"), ""));
    let run = check(&topo, &good);
    assert!(run.ok, "a good configuration fails:\n{}{}", run.stdout, run.stderr);
    assert!(!run.stdout.lines().any(|l| l.starts_with("error")), "{}", run.stdout);
    assert!(run.line("config").starts_with("ok      config: "), "{}", run.stdout);
    assert!(run.line("private key").contains("(mode 0600)"), "{}", run.stdout);
    for iface in [&wan, &lan] {
        let side = if *iface == wan { "wan" } else { "lan" };
        assert!(run.line(&format!("{side} {iface}")).starts_with("ok "), "{}", run.stdout);
        assert_eq!(
            run.line(&format!("{side} {iface} driver")),
            format!("ok      {side} {iface} driver: veth (version 1.0)")
        );
        // What Linux 6.18 reports for veth through the netdev family (no
        // program on either end): native XDP with redirect, multi-buffer
        // receive, and no AF_XDP zero-copy.
        assert_eq!(
            run.line(&format!("{side} {iface} xdp features")),
            format!("ok      {side} {iface} xdp features: basic, redirect, rx-sg"),
            "{}",
            run.stdout
        );
        assert!(run.line(&format!("{side} {iface} xdp mode")).starts_with("ok      "), "{}", run.stdout);
        assert!(
            run.line(&format!("{side} {iface} zero-copy")).starts_with("warning ")
                && run.line(&format!("{side} {iface} zero-copy")).contains("copy mode"),
            "{}",
            run.stdout
        );
        assert!(run.line(&format!("{side} {iface} queues")).contains("1 worker(s), one per queue"), "{}", run.stdout);
        assert_eq!(
            run.line(&format!("{side} {iface} xdp program")),
            format!("ok      {side} {iface} xdp program: none attached")
        );
    }
    assert!(
        run.line(&format!("wan {wan} mtu")).contains("MTU 1500 carries tunnel_mtu 1420 over IPv4"),
        "{}",
        run.stdout
    );
    assert!(run.line(&format!("lan {lan} mtu")).starts_with("ok "), "{}", run.stdout);
    assert!(run.line("listen port").starts_with("ok "), "{}", run.stdout);
    assert!(run.line("api listen").starts_with("ok "), "{}", run.stdout);
    assert!(run.line("api database").contains("will be created"), "{}", run.stdout);
    assert!(!dir.join("state").exists(), "check creates nothing");
    assert_no_xdp(&topo);

    // A missing interface: an error naming it, exit non-zero.
    let text = topo.interface_section(&key).replace(&format!("lan = \"{lan}\""), "lan = \"nosuch0\"");
    let run = check(&topo, &write(dir.join("missing.toml"), &text));
    assert!(!run.ok, "{}", run.stdout);
    assert!(
        run.line("lan nosuch0").starts_with("error   lan nosuch0: interface `nosuch0` does not exist"),
        "{}",
        run.stdout
    );
    assert!(run.stderr.contains("wgxdp: error:"), "{}", run.stderr);

    // A key file readable by others: its own error line with the fix; the
    // NICs are still reported.
    let loose = dir.join("loose.key");
    write_private_key(&loose);
    std::fs::set_permissions(&loose, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let run = check(&topo, &write(dir.join("loose.toml"), &topo.interface_section(&loose)));
    assert!(!run.ok, "{}", run.stdout);
    let line = run.line("private key");
    assert!(
        line.starts_with("error   private key: ") && line.contains("(mode 644)") && line.contains("chmod 600"),
        "{}",
        run.stdout
    );
    assert!(run.line(&format!("wan {wan} xdp features")).starts_with("ok "), "{}", run.stdout);

    // A WAN MTU too small for tunnel_mtu 1420 over IPv4 (1484 needed).
    topo.gateway.ip(&["link", "set", "dev", &wan, "mtu", "1400"]);
    let run = check(&topo, &write(dir.join("mtu.toml"), &topo.interface_section(&key)));
    topo.gateway.ip(&["link", "set", "dev", &wan, "mtu", "1500"]);
    assert!(!run.ok, "{}", run.stdout);
    let line = run.line(&format!("wan {wan} mtu"));
    assert!(
        line.starts_with(&format!("error   wan {wan} mtu: MTU 1400 is too small for tunnel_mtu 1420 over IPv4"))
            && line.contains("1484")
            && line.contains(&format!("ip link set dev {wan} mtu 1484")),
        "{}",
        run.stdout
    );

    // A WAN NIC with more receive queues than the workers: a warning with the fix.
    topo.gateway.ip(&[
        "link",
        "add",
        "ckq0",
        "numrxqueues",
        "4",
        "numtxqueues",
        "4",
        "type",
        "veth",
        "peer",
        "name",
        "ckq1",
        "numrxqueues",
        "4",
        "numtxqueues",
        "4",
    ]);
    topo.gateway.ip(&["link", "set", "ckq0", "up"]);
    topo.gateway.ip(&["link", "set", "ckq1", "up"]);
    let text = topo.interface_section(&key).replace(&format!("wan = \"{wan}\""), "wan = \"ckq0\"");
    let run = check(&topo, &write(dir.join("queues.toml"), &text));
    assert!(run.ok, "warnings only:\n{}{}", run.stdout, run.stderr);
    let line = run.line("wan ckq0 queues");
    assert!(
        line.starts_with("warning wan ckq0 queues: 4 rx queue(s)")
            && line.contains("1 worker(s) serve queues 0-0")
            && line.contains("wan_no_socket")
            && line.contains("`ethtool -L ckq0 rx 1`"),
        "{}",
        run.stdout
    );
    assert_no_xdp(&topo);

    // Programs already attached: ours (stale) is a warning, another tool's an
    // error; both stay where they are.
    let stale = leave_program(&topo, &wan, xdp_object(), "wgxdp_wan");
    let mut other = xdp_object();
    let (from, to) = (b"wgxdp_lan", b"other_lan");
    while let Some(at) = other.windows(from.len()).position(|w| w == from) {
        other[at..at + from.len()].copy_from_slice(to);
    }
    let foreign = leave_program(&topo, &lan, other, "other_lan");
    let run = check(&topo, &good);
    assert!(!run.ok, "{}", run.stdout);
    assert_eq!(
        run.line(&format!("wan {wan} xdp program")),
        format!(
            "warning wan {wan} xdp program: program {stale} `wgxdp_wan` (driver mode) is a stale wgxdp program: \
             `serve` replaces it (`wgxdp detach` removes it)"
        )
    );
    let line = run.line(&format!("lan {lan} xdp program"));
    assert!(
        line.starts_with(&format!(
            "error   lan {lan} xdp program: program {foreign} `other_lan` (driver mode) is another tool's"
        )) && line.contains(&format!("ip link set dev {lan} xdpdrv off")),
        "{}",
        run.stdout
    );
    let still: Vec<u32> = [wan.clone(), lan.clone()]
        .into_iter()
        .flat_map(|i| topo.gateway.enter(move || attached_programs(&i).unwrap()))
        .map(|p| p.prog_id)
        .collect();
    assert_eq!(still, [stale, foreign], "check leaves attached programs alone");
}
