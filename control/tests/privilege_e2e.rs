//! Least privilege, end to end: `wgxdp serve` with exactly the capabilities
//! of `privilege::NEEDED` (what wgxdp.service grants; a unit test keeps the
//! two equal) carries a tunnel's traffic, and without any one of them it
//! stops before attaching anything, naming the missing capability.
//!
//! The restricted process is uid 0 with a bounding set of only those
//! capabilities (`setpriv`), no new privileges, and a small RLIMIT_MEMLOCK
//! (`prlimit`; no CAP_IPC_LOCK), as systemd runs the unit.

use std::path::{Path, PathBuf};
use std::time::Duration;
use wgxdp_control::privilege::{Capability, NEEDED};
use wgxdp_dataplane::noise::PrivateKey;
use wgxdp_integration::site::{
    ping_from, tcp_transfer, write_private_key, ServeProcess, SiteTopology, TempDir, CLIENT_TUNNEL, LAN_HOST,
};
use wgxdp_integration::{require_tools, Netns};

/// RLIMIT_MEMLOCK of the restricted process: room for the configuration's
/// AF_XDP memory (1 queue on veth, 512 frames per socket of 2 KiB, zero-copy
/// off: 2 MiB), not for the default's.
const MEMLOCK: u64 = 4 << 20;
const SMALL_MEMORY: &str = "frames_per_socket = 512\nzero_copy = false\n";

fn wgxdp() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_wgxdp"))
}

/// `CAP_NET_ADMIN` -> `net_admin`, as setpriv names it.
fn setpriv_name(cap: Capability) -> String {
    cap.name.trim_start_matches("CAP_").to_ascii_lowercase()
}

/// A script that runs `wgxdp` with only `caps` (and the small memlock
/// limit); it execs all the way, so its pid is wgxdp's.
fn restricted_wgxdp(dir: &TempDir, name: &str, caps: &[Capability]) -> PathBuf {
    let bounding: String = caps.iter().map(|c| format!(",+{}", setpriv_name(*c))).collect();
    let script = dir.join(name);
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nexec prlimit --memlock={MEMLOCK}:{MEMLOCK} setpriv --bounding-set=-all{bounding} \
             --inh-caps=-all --no-new-privs -- {} \"$@\"\n",
            wgxdp().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    script
}

/// A gateway configuration in `dir` (`extra` lines in `[interface]`, the
/// API, a static peer for `client`); `name` is its file name.
fn write_config(topo: &SiteTopology, dir: &TempDir, name: &str, client: &PrivateKey, extra: &str) -> PathBuf {
    let key = dir.join("gw.key");
    let config = dir.join(name);
    let text = format!(
        "{}{extra}\n[api]\nlisten = \"127.0.0.1:8080\"\ndatabase = \"{}\"\n\n\
         [[peer]]\npublic_key = \"{}\"\nallowed_ips = [\"{CLIENT_TUNNEL}/32\"]\n",
        topo.interface_section(&key),
        dir.join("state/wgxdp.db").display(),
        client.public_key()
    );
    std::fs::write(&config, text).unwrap();
    config
}

/// The effective capabilities of a process, from /proc.
fn effective(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:")).unwrap().trim().to_owned();
    u64::from_str_radix(&hex, 16).unwrap()
}

fn has_xdp(ns: &Netns, iface: &str) -> bool {
    ns.ip(&["link", "show", "dev", iface]).contains("prog/xdp")
}

#[test]
fn serve_with_only_the_needed_capabilities_carries_traffic() {
    require_tools(&["ip", "wireguard-go", "wg", "ping", "ethtool", "setpriv", "prlimit"]);
    let topo = SiteTopology::new("p");
    let dir = TempDir::new("wgxdp-priv");
    let gateway_key = write_private_key(&dir.join("gw.key")).public_key();
    let client_key = PrivateKey::generate();
    let config = write_config(&topo, &dir, "small.toml", &client_key, SMALL_MEMORY);
    let caps: Vec<Capability> = NEEDED.iter().map(|n| n.capability).collect();
    let restricted = restricted_wgxdp(&dir, "wgxdp-restricted", &caps);

    let mut gateway = ServeProcess::start(&topo.gateway, &restricted, &config, &dir.0);
    gateway.wait_for_output("wgxdp: api listening", Duration::from_secs(10));
    let expected = caps.iter().fold(0u64, |m, c| m | 1 << c.bit);
    assert_eq!(
        effective(gateway.child.id()),
        expected,
        "serve must run with exactly {:?}",
        caps.iter().map(|c| c.name).collect::<Vec<_>>()
    );
    assert!(has_xdp(&topo.gateway, &topo.gateway_wan) && has_xdp(&topo.gateway, &topo.gateway_lan));

    let _client = topo.start_client(&client_key, &gateway_key, CLIENT_TUNNEL);
    assert!(
        ping_from(&topo.client, CLIENT_TUNNEL, LAN_HOST, 6, 3),
        "no ping through the tunnel; gateway:\n{}\n{}",
        gateway.output(),
        gateway.errors()
    );
    tcp_transfer(&topo.lan, &format!("{LAN_HOST}:7101"), &topo.client, true, 5, 2 << 20);
    tcp_transfer(&topo.lan, &format!("{LAN_HOST}:7102"), &topo.client, false, 6, 2 << 20);

    let status = gateway.terminate();
    assert!(status.success(), "serve did not stop cleanly: {status}\n{}", gateway.errors());
    assert!(!has_xdp(&topo.gateway, &topo.gateway_wan) && !has_xdp(&topo.gateway, &topo.gateway_lan));
}

#[test]
fn serve_without_a_needed_capability_names_it_and_attaches_nothing() {
    require_tools(&["ip", "ethtool", "setpriv", "prlimit"]);
    let topo = SiteTopology::new("q");
    let dir = TempDir::new("wgxdp-priv");
    write_private_key(&dir.join("gw.key"));
    let client_key = PrivateKey::generate();
    let config = write_config(&topo, &dir, "small.toml", &client_key, SMALL_MEMORY);
    let all: Vec<Capability> = NEEDED.iter().map(|n| n.capability).collect();

    let refused = |script: &Path, config: &Path| -> String {
        let out =
            topo.gateway.command(script.to_str().unwrap()).args(["serve", "--config"]).arg(config).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(1), "serve must fail cleanly: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(!has_xdp(&topo.gateway, &topo.gateway_wan) && !has_xdp(&topo.gateway, &topo.gateway_lan));
        assert!(!topo.gateway.ip(&["link", "show"]).contains("wgxdp0"), "the host interface was created");
        stderr
    };

    for need in NEEDED {
        let caps: Vec<Capability> = all.iter().copied().filter(|c| *c != need.capability).collect();
        let script = restricted_wgxdp(&dir, &format!("without-{}", setpriv_name(need.capability)), &caps);
        let stderr = refused(&script, &config);
        let expected = format!("wgxdp: error: missing {}: needed {}", need.capability.name, need.purpose);
        assert!(stderr.contains(&expected), "expected `{expected}`, got:\n{stderr}");
        assert!(stderr.contains("grant it (the systemd unit wgxdp.service does)"), "{stderr}");
    }

    // Every capability, but the default AF_XDP memory (4096 frames per
    // socket, zero-copy tried first) does not fit the memlock limit.
    let big = write_config(&topo, &dir, "default.toml", &client_key, "");
    let stderr = refused(&restricted_wgxdp(&dir, "all", &all), &big);
    assert!(
        stderr.contains("wgxdp: error: RLIMIT_MEMLOCK is 4 MiB but the AF_XDP memory of 1 queue(s) needs 32 MiB"),
        "{stderr}"
    );
}
