//! After a crash: `kill -9` of `serve` leaves nothing that stops a new
//! `serve` on the same configuration (the tunnel works again), a stale XDP
//! program attached without a link (by `ip link`, libxdp, older versions) is
//! replaced by `serve` and removed by `wgxdp detach`, another tool's program is
//! left alone by both (`detach --force` removes it) and stops `serve` before
//! either interface changes, and `detach` refuses to touch the programs of a
//! running `serve` or an interface that is missing.

use serde_json::json;
use std::os::fd::AsFd;
use std::path::Path;
use std::process::Output;
use wgxdp_dataplane::loader::{attach_without_link, attached_programs, XdpMode};
use wgxdp_dataplane::noise::{PresharedKey, PrivateKey};
use wgxdp_integration::site::{
    create_api_key, ping_from, ApiClient, ApiSite, ServeProcess, API_LISTEN, CLIENT_TUNNEL, CLIENT_WAN, LAN_HOST,
};
use wgxdp_integration::{xdp_object, WireguardGo};

const API: &str = API_LISTEN;

fn wgxdp() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_wgxdp"))
}

/// The shared API site, with this file's helpers.
struct Site(ApiSite);

impl std::ops::Deref for Site {
    type Target = ApiSite;
    fn deref(&self) -> &ApiSite {
        &self.0
    }
}

impl Site {
    fn new(prefix: &str) -> Self {
        Self(ApiSite::new(prefix, ""))
    }

    fn serve(&self) -> ServeProcess {
        self.0.serve(wgxdp())
    }

    fn detach(&self, config: &Path) -> Output {
        self.topo.gateway.command(wgxdp().to_str().unwrap()).args(["detach", "--config"]).arg(config).output().unwrap()
    }

    fn programs(&self, iface: &str) -> Vec<(u32, XdpMode)> {
        let iface = iface.to_owned();
        self.topo
            .gateway
            .enter(move || attached_programs(&iface).unwrap())
            .into_iter()
            .map(|p| (p.prog_id, p.mode))
            .collect()
    }

    /// Attaches an XDP program to `iface` the old way (netlink, no link), as a
    /// dead process would have left it; returns its id.
    fn leave_stale_program(&self, iface: &str) -> u32 {
        self.leave_program(iface, xdp_object(), "wgxdp_wan")
    }

    /// Attaches another tool's XDP program (ours renamed `other_wan`) to
    /// `iface` without a link; returns its id.
    fn leave_foreign_program(&self, iface: &str) -> u32 {
        let mut object = xdp_object();
        for (from, to) in [(b"wgxdp_wan", b"other_wan"), (b"wgxdp_lan", b"other_lan")] {
            let mut i = 0;
            while let Some(at) = object[i..].windows(from.len()).position(|w| w == from) {
                object[i + at..i + at + from.len()].copy_from_slice(to);
                i += at + from.len();
            }
        }
        self.leave_program(iface, object, "other_wan")
    }

    fn leave_program(&self, iface: &str, object: Vec<u8>, program: &'static str) -> u32 {
        let name = iface.to_owned();
        self.topo.gateway.enter(move || {
            let iface = name;
            let mut ebpf = aya::Ebpf::load(&object).unwrap();
            let prog: &mut aya::programs::Xdp = ebpf.program_mut(program).unwrap().try_into().unwrap();
            prog.load().unwrap();
            attach_without_link(&iface, prog.fd().unwrap().as_fd(), XdpMode::Driver).unwrap();
            // `ebpf` is dropped here: the program stays, as after a crash.
        });
        let found = self.programs(iface);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].1, XdpMode::Driver);
        found[0].0
    }

    fn client(&self, key: &PrivateKey, psk: &str) -> WireguardGo {
        let wg = self.topo.start_client(key, &self.gateway_key, CLIENT_TUNNEL);
        let psk_file = self.dir.join(&format!("{}.psk", wg.interface));
        std::fs::write(&psk_file, psk).unwrap();
        wg.set(&["peer", &self.gateway_key.to_base64(), "preshared-key", psk_file.to_str().unwrap()]);
        wg
    }
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn a_new_serve_takes_over_after_kill_9_and_detach_cleans_up() {
    let site = Site::new("x");
    let (wan, lan) = (site.topo.gateway_wan.clone(), site.topo.gateway_lan.clone());
    let mut gateway = site.serve();
    let key = create_api_key(wgxdp(), &site.config);
    let client_key = PrivateKey::generate();
    let psk = PresharedKey::generate().to_base64_secret().to_string();
    let body = json!({
        "name": "real-site", "region": "local", "tunnel_type": "wireguard",
        "remote_network_cidr": "10.200.0.0/24", "remote_peer_ip": CLIENT_WAN, "remote_peer_port": 40001,
        "remote_public_key": client_key.public_key().to_base64(), "pre_shared_key": psk,
    });
    let (code, created) =
        ApiClient::new(&site.topo.gateway, API, &key).call("POST", "/api/v1/vpn-gateways", Some(body)).unwrap();
    assert_eq!(code, 201, "{created}");
    let wg = site.client(&client_key, &psk);
    assert!(ping_from(&site.topo.client, CLIENT_TUNNEL, LAN_HOST, 5, 3), "no tunnel before the crash");
    assert_eq!(site.programs(&wan).len(), 1, "serve attached its WAN program");

    // A running serve's programs are not detached behind its back.
    let out = site.detach(&site.config);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("running process"), "{}", text(&out));
    assert!(ping_from(&site.topo.client, CLIENT_TUNNEL, LAN_HOST, 3, 2), "detach broke a running gateway");

    // kill -9, then a new serve on the same configuration: the tunnel works again.
    gateway.kill9();
    let left = (site.programs(&wan), site.programs(&lan));
    println!("programs left attached after kill -9 (WAN, LAN): {left:?}");
    let gateway = site.serve();
    assert!(ping_from(&site.topo.client, CLIENT_TUNNEL, LAN_HOST, 10, 3), "the tunnel did not come back after kill -9");
    drop(gateway); // kill -9 again

    // A stale program attached without a link (it survives its process):
    // serve replaces it and says so; the tunnel works.
    let stale = site.leave_stale_program(&wan);
    let mut gateway = site.serve();
    assert!(
        gateway.output().contains(&format!("replaced stale XDP program {stale} (driver mode) on {wan}")),
        "{}",
        gateway.output()
    );
    assert!(ping_from(&site.topo.client, CLIENT_TUNNEL, LAN_HOST, 10, 3), "no tunnel after taking over");
    assert!(gateway.terminate().success());
    assert!(site.programs(&wan).is_empty() && site.programs(&lan).is_empty(), "a clean stop detaches everything");

    // `wgxdp detach` removes stale programs and says which.
    let stale_wan = site.leave_stale_program(&wan);
    let stale_lan = site.leave_stale_program(&lan);
    let out = site.detach(&site.config);
    assert!(out.status.success(), "{}", text(&out));
    let said = text(&out);
    assert!(said.contains(&format!("WAN {wan}: removed XDP program {stale_wan} (driver mode)")), "{said}");
    assert!(said.contains(&format!("LAN {lan}: removed XDP program {stale_lan} (driver mode)")), "{said}");
    assert!(site.programs(&wan).is_empty() && site.programs(&lan).is_empty());
    let out = site.detach(&site.config);
    assert!(out.status.success() && text(&out).contains("no XDP program attached"), "{}", text(&out));

    // Another tool's program on the LAN side and a stale one of ours on the
    // WAN side: serve refuses, names the program and the fixes, and changes
    // neither interface (both are checked first).
    let stale_wan = site.leave_stale_program(&wan);
    let foreign = site.leave_foreign_program(&lan);
    let out = site
        .topo
        .gateway
        .command("timeout")
        .args(["60", wgxdp().to_str().unwrap(), "serve", "--config"])
        .arg(&site.config)
        .output()
        .unwrap();
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains(&format!("XDP program {foreign} (`other_wan`, driver mode) on `{lan}` is not wgxdp's")),
        "{said}"
    );
    assert!(
        said.contains(&format!("ip link set dev {lan} xdpdrv off")) && said.contains("wgxdp detach --force"),
        "{said}"
    );
    assert_eq!(site.programs(&wan), vec![(stale_wan, XdpMode::Driver)], "the WAN side was not stripped");
    assert_eq!(site.programs(&lan), vec![(foreign, XdpMode::Driver)]);
    // `detach` removes ours only; `--force` the other tool's too.
    let out = site.detach(&site.config);
    let said = text(&out);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains(&format!("WAN {wan}: removed XDP program {stale_wan} (driver mode)")), "{said}");
    assert!(
        said.contains(&format!("XDP program {foreign} (`other_wan`, driver mode) on `{lan}` is not wgxdp's")),
        "{said}"
    );
    assert!(site.programs(&wan).is_empty());
    assert_eq!(site.programs(&lan), vec![(foreign, XdpMode::Driver)], "another tool's program stays");
    let out = site
        .topo
        .gateway
        .command(wgxdp().to_str().unwrap())
        .args(["detach", "--force", "--config"])
        .arg(&site.config)
        .output()
        .unwrap();
    let said = text(&out);
    assert!(out.status.success(), "{said}");
    assert!(said.contains(&format!("LAN {lan}: removed XDP program {foreign} (driver mode): other_wan")), "{said}");
    assert!(site.programs(&lan).is_empty());

    // A missing interface is a clear error.
    let missing = site.dir.join("missing.toml");
    let cfg = std::fs::read_to_string(&site.config).unwrap().replace(&lan, "nosuchif0");
    std::fs::write(&missing, cfg).unwrap();
    let out = site.detach(&missing);
    assert!(!out.status.success());
    assert!(text(&out).contains("interface `nosuchif0` does not exist"), "{}", text(&out));
    drop(wg);
}
