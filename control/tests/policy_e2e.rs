//! What a remote site may reach, end to end on the AF_XDP data plane with a
//! wireguard-go site, its gateway driven through the API:
//!
//! ```text
//!  client ns (wireguard-go)     gateway ns (wgxdp)            lan ns
//!  10.200.0.2 ── tunnel ──  10.100.0.1 | 10.50.0.1  ─────────  10.50.0.2
//!                                      | 10.60.0.1  ── other ns 10.60.0.2
//! ```
//!
//! The site routes 10.60.0.0/24 into its tunnel too, but that network is not
//! a local network of its gateway: dropped and counted, and neither the other
//! host nor the gateway host (10.60.0.1) answers. The site reaches the LAN
//! host with one hop less; TTL 1 is answered with "time exceeded"; the
//! gateway's own LAN address answers a ping only once a rule allows it; a
//! deny rule for TCP 22 blocks SSH while ICMP passes; with a deny-all default
//! the site opens nothing but a TCP connection the LAN host opens works; the
//! rule counters in `/status` and `/metrics` move. Every change is a PATCH on
//! the running gateway.

use serde_json::{json, Value};
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;
use wgxdp_dataplane::noise::{PresharedKey, PrivateKey};
use wgxdp_integration::site::{
    create_api_key, write_private_key, ApiClient, ServeProcess, SiteTopology, TempDir, CLIENT_TUNNEL, CLIENT_WAN,
    GATEWAY_LAN, LAN_HOST,
};
use wgxdp_integration::{require_tools, veth_pair, Netns};

const API: &str = "127.0.0.1:8080";
const OTHER_GATEWAY: &str = "10.60.0.1";
const OTHER_HOST: &str = "10.60.0.2";

fn wgxdp() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_wgxdp"))
}

/// `ping` from the client's tunnel address; the replies and the whole output.
fn ping(ns: &Netns, dst: &str, count: u32, ttl: u8) -> (u32, String) {
    let (count, ttl) = (count.to_string(), ttl.to_string());
    ns.ping_with(&["-c", &count, "-i", "0.2", "-W", "1", "-t", &ttl, "-I", CLIENT_TUNNEL, dst])
}

/// Whether a TCP connection from `ns` to `addr` is established within a second
/// and carries a byte each way.
fn tcp_works(from: &Netns, addr: &str, listener: &std::net::TcpListener) -> bool {
    let Ok(mut stream) = from.tcp_connect(addr, Duration::from_secs(1)) else { return false };
    listener.set_nonblocking(false).unwrap();
    let (mut accepted, _) = listener.accept().unwrap();
    stream.write_all(b"q").unwrap();
    let mut b = [0u8; 1];
    accepted.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    accepted.read_exact(&mut b).unwrap();
    accepted.write_all(b"a").unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    stream.read_exact(&mut b).is_ok() && &b == b"a"
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines().filter(|l| l.starts_with(name)).filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok()).sum()
}

#[test]
fn a_site_reaches_only_its_local_networks_under_its_firewall_rules() {
    require_tools(&["ip", "wireguard-go", "wg", "ping", "ethtool"]);
    let topo = SiteTopology::new("p");
    let other = Netns::new("po");
    veth_pair(&topo.gateway, &format!("{OTHER_GATEWAY}/24"), &other, &format!("{OTHER_HOST}/24"));
    other.ip(&["route", "add", "10.200.0.0/16", "via", OTHER_GATEWAY]);
    let dir = TempDir::new("wgxdp-policy");
    let key_file = dir.join("gw.key");
    let gateway_key = write_private_key(&key_file).public_key();
    let config = dir.join("gw.toml");
    std::fs::write(&config, topo.api_config(&key_file, API, &dir.join("wgxdp.db"), "mutations_per_minute = 100000\n"))
        .unwrap();
    let gateway = ServeProcess::start(&topo.gateway, wgxdp(), &config, &dir.0);
    gateway.wait_for_output("wgxdp: api listening", Duration::from_secs(10));
    let api = ApiClient::new(&topo.gateway, API, &create_api_key(wgxdp(), &config));

    // The site: wireguard-go, which also routes the other network into the tunnel.
    let client_key = PrivateKey::generate();
    let psk = PresharedKey::generate().to_base64_secret().to_string();
    let wg = topo.start_client(&client_key, &gateway_key, CLIENT_TUNNEL);
    let psk_file = dir.join("client.psk");
    std::fs::write(&psk_file, &psk).unwrap();
    let site_routes = "10.50.0.0/24,fd50::/64,10.60.0.0/24";
    wg.set(&[
        "peer",
        &gateway_key.to_base64(),
        "preshared-key",
        psk_file.to_str().unwrap(),
        "allowed-ips",
        site_routes,
    ]);
    topo.client.ip(&["route", "add", "10.60.0.0/24", "dev", &wg.interface]);

    let body = json!({
        "name": "branch", "region": "local", "tunnel_type": "wireguard",
        "remote_network_cidr": "10.200.0.0/24", "remote_peer_ip": CLIENT_WAN, "remote_peer_port": 40001,
        "remote_public_key": client_key.public_key().to_base64(), "pre_shared_key": psk,
    });
    let (code, created) = api.call("POST", "/api/v1/vpn-gateways", Some(body)).unwrap();
    assert_eq!(code, 201, "{created}");
    let id = created["data"]["id"].as_str().unwrap().to_owned();
    assert_eq!(created["data"]["firewall"], json!([]), "{created}");
    assert_eq!(created["data"]["firewall_default"], "allow");
    let patch = |body: Value| {
        let (code, got) = api.call("PATCH", &format!("/api/v1/vpn-gateways/{id}"), Some(body)).unwrap();
        assert_eq!(code, 200, "{got}");
        got
    };

    // The site reaches the LAN host, one hop less (the LAN host answers with
    // TTL 64, the gateway forwards it with 63).
    let (replies, out) = ping(&topo.client, LAN_HOST, 5, 64);
    assert!(replies >= 3, "the site does not reach the LAN host:\n{out}\n{}", gateway.errors());
    assert!(out.contains("ttl=63"), "TTL not decremented on the way back:\n{out}");
    // A last hop at the gateway: "time exceeded" from its LAN address.
    let (_, out) = ping(&topo.client, LAN_HOST, 1, 1);
    assert!(out.contains(&format!("From {GATEWAY_LAN}")) && out.contains("Time to live exceeded"), "{out}");

    // Not a local network of this gateway: neither the other host nor the
    // gateway host's own address there answers; the drops are counted.
    let before = gateway.counter("drop_not_local_destination");
    assert_eq!(ping(&topo.client, OTHER_HOST, 3, 64).0, 0, "the site reached a network that is not local");
    assert_eq!(ping(&topo.client, OTHER_GATEWAY, 3, 64).0, 0, "the gateway host answered on another network");
    gateway.refresh();
    assert!(gateway.counter("drop_not_local_destination") >= before + 6, "{}", gateway.output());

    // Nor does anything enter the tunnel from the host's other networks: the
    // other host routes the site through the gateway, whose kernel forwards
    // it towards the tunnel route; only the host's own packets may go in.
    assert!(!other.ping(CLIENT_TUNNEL, 2, 1), "another network of the gateway host reached the site");
    gateway.refresh();
    assert!(gateway.counter("drop_foreign_source") >= 2, "{}", gateway.output());

    // The gateway's own LAN address: dropped (counted) until a rule allows it.
    assert_eq!(ping(&topo.client, GATEWAY_LAN, 2, 64).0, 0, "the gateway host answered without a rule");
    gateway.refresh();
    assert!(gateway.counter("drop_to_gateway_host") >= 2);
    let ping_gateway = json!({"name": "ping gateway", "protocol": "icmp", "destination": format!("{GATEWAY_LAN}/32"), "action": "allow"});
    let no_ssh = json!({"name": "no ssh", "protocol": "tcp", "port": "22", "action": "deny"});
    patch(json!({ "firewall": [ping_gateway, no_ssh] }));
    let (replies, out) = ping(&topo.client, GATEWAY_LAN, 3, 64);
    assert!(replies >= 2, "one rule away, the gateway answers a ping:\n{out}\n{}", gateway.errors());

    // Deny TCP 22: SSH is blocked, another port and ICMP still pass.
    let ssh = topo.lan.tcp_listener(&format!("{LAN_HOST}:22"));
    let web = topo.lan.tcp_listener(&format!("{LAN_HOST}:80"));
    assert!(!tcp_works(&topo.client, &format!("{LAN_HOST}:22"), &ssh), "TCP 22 passed a deny rule");
    assert!(tcp_works(&topo.client, &format!("{LAN_HOST}:80"), &web), "TCP 80 was blocked");
    assert!(ping(&topo.client, LAN_HOST, 3, 64).0 >= 2, "ICMP blocked by a TCP rule");
    let (_, status) = api.call("GET", &format!("/api/v1/vpn-gateways/{id}/status"), None).unwrap();
    let hits = &status["data"]["firewall_hits"];
    assert_eq!(hits[0]["name"], "ping gateway", "{status}");
    assert!(hits[0]["hits"].as_u64().unwrap() >= 2, "{status}");
    assert!(hits[1]["hits"].as_u64().unwrap() >= 1, "the SSH SYNs hit the deny rule: {status}");
    // /metrics (text) says the same, per rule, with the gateway's id.
    let url = format!("http://{API}/metrics");
    let text = topo.gateway.enter(move || ureq::get(&url).call().unwrap().into_string().unwrap());
    let ssh_hits = format!("wgxdp_firewall_rule_hits_total{{gateway=\"{id}\",rule=\"1\",name=\"no ssh\"}}");
    assert!(metric(&text, &ssh_hits) >= 1, "no moving `no ssh` counter in /metrics:\n{text}");

    // Deny everything inbound: the site opens nothing, but the LAN host's own
    // connection to the site works both ways.
    let got = patch(json!({ "firewall": [], "firewall_default": "deny" }));
    assert_eq!(got["data"]["firewall_default"], "deny");
    assert!(!tcp_works(&topo.client, &format!("{LAN_HOST}:80"), &web), "the site opened a connection under deny-all");
    assert_eq!(ping(&topo.client, LAN_HOST, 2, 64).0, 0, "the site's ping passed deny-all");
    let at_site = topo.client.tcp_listener(&format!("{CLIENT_TUNNEL}:8080"));
    assert!(tcp_works(&topo.lan, &format!("{CLIENT_TUNNEL}:8080"), &at_site), "a LAN-opened connection failed");
    gateway.refresh();
    assert!(gateway.counter("drop_firewall_denied") >= 1);
    assert!(gateway.counter("conntrack_replies") >= 1, "{}", gateway.output());

    // /metrics (text): the connection table.
    let url = format!("http://{API}/metrics");
    let text = topo.gateway.enter(move || ureq::get(&url).call().unwrap().into_string().unwrap());
    assert!(metric(&text, "wgxdp_conntrack_inserts") >= 1, "{text}");
    drop(wg);
}
