//! A fleet on one PostgreSQL: nodes `a1` and `a2` serve region `eu` with one
//! gateway identity (the same private key) behind one floating address on
//! each side, which the test moves between them as keepalived (VRRP) would;
//! `b1` serves region `us` on its own networks.
//!
//! ```text
//!  remote ns                  switch ns (two bridges)             a1 ns / a2 ns
//!  wireguard-go 10.100.0.2 ── br-wan ──┬─ a1 wan 10.100.0.11 (+ floating 10.100.0.1)
//!                                      └─ a2 wan 10.100.0.12
//!  site ns      10.50.0.2  ── br-lan ──┬─ a1 lan 10.50.0.11  (+ floating 10.50.0.1)
//!                                      └─ a2 lan 10.50.0.12
//!  b1 ns: wan 10.101.0.1 ── stub ns, lan 10.51.0.1 ── stub ns
//! ```
//!
//! The site routes the tunnel networks (10.200.0.0/16) via the floating LAN
//! address. Used by the fleet's end-to-end test and bench-e2e's propagation
//! figures.

use crate::site::{write_private_key, ServeProcess, TempDir, API_LISTEN, LISTEN_PORT};
use crate::{run, unique_name, Netns};
use std::path::{Path, PathBuf};
use std::time::Duration;
use wgxdp_dataplane::noise::PublicKey;

pub const REMOTE_WAN: &str = "10.100.0.2";
pub const FLOATING_WAN: &str = "10.100.0.1";
pub const FLOATING_LAN: &str = "10.50.0.1";
pub const SITE_HOST: &str = "10.50.0.2";
pub const REMOTE_TUNNEL: &str = "10.200.0.2";

/// One `serve` of the fleet: its namespace, interfaces and configuration.
#[derive(Debug)]
pub struct FleetNode {
    pub id: &'static str,
    pub ns: Netns,
    pub wan: String,
    pub lan: String,
    pub config: PathBuf,
}

#[derive(Debug)]
pub struct Fleet {
    pub switch: Netns,
    pub remote: Netns,
    pub site: Netns,
    /// a1, a2 (region `eu`), b1 (region `us`).
    pub nodes: Vec<FleetNode>,
    /// Namespaces b1's interfaces lead to.
    pub stubs: Vec<Netns>,
    pub dir: TempDir,
    /// Region `eu`'s gateway key (a1's and a2's), and `us`'s.
    pub eu_key: PublicKey,
    pub us_key: PublicKey,
}

/// A veth pair from `a` (address `a_addr`, if any) to `b` (no address); the names.
fn link(a: &Netns, a_addr: Option<&str>, b: &Netns) -> (String, String) {
    let (ea, eb) = (unique_name("fa"), unique_name("fb"));
    run("ip", &["link", "add", &ea, "netns", &a.name, "type", "veth", "peer", "name", &eb, "netns", &b.name]);
    if let Some(addr) = a_addr {
        a.ip(&["addr", "add", addr, "dev", &ea]);
    }
    a.ip(&["link", "set", &ea, "up"]);
    b.ip(&["link", "set", &eb, "up"]);
    (ea, eb)
}

impl Fleet {
    /// The topology, with a1 holding both floating addresses, and each
    /// node's configuration on the PostgreSQL at `store_url`.
    pub fn new(prefix: &str, store_url: &str) -> Self {
        crate::require_tools(&["ip", "wireguard-go", "wg", "ping", "ethtool"]);
        let switch = Netns::new(&format!("{prefix}s"));
        for bridge in ["brwan", "brlan"] {
            switch.ip(&["link", "add", bridge, "type", "bridge"]);
            switch.ip(&["link", "set", bridge, "up"]);
        }
        let port = |end: &str, bridge: &str| switch.ip(&["link", "set", end, "master", bridge]);
        let remote = Netns::new(&format!("{prefix}r"));
        let (remote_if, end) = link(&remote, Some(&format!("{REMOTE_WAN}/24")), &switch);
        port(&end, "brwan");
        let site = Netns::new(&format!("{prefix}l"));
        let (site_if, end) = link(&site, Some(&format!("{SITE_HOST}/24")), &switch);
        port(&end, "brlan");
        site.ip(&["route", "add", "10.200.0.0/16", "via", FLOATING_LAN]);
        // As a physical link would carry them (see `SiteTopology`).
        remote.exec("ethtool", &["-K", &remote_if, "tx", "off"]);
        site.exec("ethtool", &["-K", &site_if, "tx", "off"]);

        let dir = TempDir::new(&format!("wgxdp-{prefix}"));
        let eu_key = write_private_key(&dir.join("eu.key")).public_key();
        let us_key = write_private_key(&dir.join("us.key")).public_key();
        let mut nodes = Vec::new();
        let mut stubs = Vec::new();
        for (i, id) in ["a1", "a2"].into_iter().enumerate() {
            let ns = Netns::new(&format!("{prefix}{id}"));
            let (wan, end) = link(&ns, Some(&format!("10.100.0.{}/24", 11 + i)), &switch);
            port(&end, "brwan");
            let (lan, end) = link(&ns, Some(&format!("10.50.0.{}/24", 11 + i)), &switch);
            port(&end, "brlan");
            ns.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
            let node = format!("[node]\nid = \"{id}\"\nregion = \"eu\"\nfloating_address = \"{FLOATING_WAN}\"\n");
            let config = write_config(&dir, id, &wan, &lan, "eu.key", "10.50.0.0/24", &node, store_url);
            nodes.push(FleetNode { id, ns, wan, lan, config });
        }
        let ns = Netns::new(&format!("{prefix}b1"));
        let (wan_stub, lan_stub) = (Netns::new(&format!("{prefix}bw")), Netns::new(&format!("{prefix}bl")));
        let (wan, _) = link(&ns, Some("10.101.0.1/24"), &wan_stub);
        let (lan, _) = link(&ns, Some("10.51.0.1/24"), &lan_stub);
        let node = "[node]\nid = \"b1\"\nregion = \"us\"\n";
        let config = write_config(&dir, "b1", &wan, &lan, "us.key", "10.51.0.0/24", node, store_url);
        nodes.push(FleetNode { id: "b1", ns, wan, lan, config });
        stubs.extend([wan_stub, lan_stub]);
        let fleet = Self { switch, remote, site, nodes, stubs, dir, eu_key, us_key };
        fleet.give_floating_addresses("a1");
        fleet
    }

    pub fn node(&self, id: &str) -> &FleetNode {
        self.nodes.iter().find(|n| n.id == id).unwrap_or_else(|| panic!("no node {id}"))
    }

    /// Moves both floating addresses to node `to` (from wherever they are),
    /// makes the WAN one the source of what `to` sends there itself (its
    /// handshake initiations go through the kernel: the remote site must see
    /// them come from the address it knows, or it roams to the node's own),
    /// then makes the remote site and the site host forget the old owner's
    /// link address, as keepalived's gratuitous ARP would (keepalived:
    /// `virtual_ipaddress`, and `virtual_routes` with `src`).
    pub fn give_floating_addresses(&self, to: &str) {
        for n in self.nodes.iter().filter(|n| n.id != "b1") {
            for (addr, dev) in [(FLOATING_WAN, &n.wan), (FLOATING_LAN, &n.lan)] {
                let cidr = format!("{addr}/24");
                let _ = n.ns.command("ip").args(["addr", "del", &cidr, "dev", dev]).output();
                if n.id == to {
                    n.ns.ip(&["addr", "add", &cidr, "dev", dev]);
                }
            }
            if n.id == to {
                n.ns.ip(&[
                    "route",
                    "replace",
                    "10.100.0.0/24",
                    "dev",
                    &n.wan,
                    "proto",
                    "kernel",
                    "scope",
                    "link",
                    "src",
                    FLOATING_WAN,
                ]);
            }
        }
        for ns in [&self.remote, &self.site] {
            ns.ip(&["neigh", "flush", "all"]);
        }
    }

    /// Starts node `id`'s `serve` and waits for its API.
    pub fn serve(&self, wgxdp: &Path, id: &str) -> ServeProcess {
        let n = self.node(id);
        let p = ServeProcess::start(&n.ns, wgxdp, &n.config, &self.dir.0);
        p.wait_for_output("wgxdp: api listening", Duration::from_secs(30));
        p
    }
}

#[allow(clippy::too_many_arguments)]
fn write_config(
    dir: &TempDir,
    id: &str,
    wan: &str,
    lan: &str,
    key: &str,
    site_cidr: &str,
    node: &str,
    store_url: &str,
) -> PathBuf {
    let text = format!(
        "[interface]\nwan = \"{wan}\"\nlan = \"{lan}\"\nlisten_port = {LISTEN_PORT}\nprivate_key_file = \"{}\"\n\
         name = \"{}\"\n\n[api]\nlisten = \"{API_LISTEN}\"\nsite_cidr = \"{site_cidr}\"\n\
         mutations_per_minute = 100000\n\n{node}\n[store]\nurl = \"{store_url}\"\n",
        dir.join(key).display(),
        unique_name(&format!("wf{id}")),
    );
    let path = dir.join(&format!("{id}.toml"));
    std::fs::write(&path, text).expect("write a node's configuration");
    path
}
