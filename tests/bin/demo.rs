//! `cargo xtask demo`: a working site-to-site tunnel through wgxdp in a couple
//! of minutes. Builds three network namespaces (a remote site running
//! wireguard-go, the gateway, a host on the gateway's LAN), starts
//! `wgxdp serve` with its API and embedded store, creates the remote site's
//! VPN gateway through the API, sends traffic through the tunnel and prints
//! the live status. Everything it creates is removed when it ends.
//!
//! Usage: wgxdp-demo <path to the wgxdp binary>

use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use wgxdp_dataplane::noise::{PresharedKey, PrivateKey};
use wgxdp_integration::require_tools;
use wgxdp_integration::site::{
    create_api_key, ping_from, write_private_key, ApiClient, ServeProcess, SiteTopology, TempDir, CLIENT_TUNNEL,
    CLIENT_WAN, LAN_HOST, SITE_CIDR,
};

const API: &str = "127.0.0.1:8080";
const TRANSFER: usize = 64 * 1024 * 1024;

fn step(text: &str) {
    println!("\n==> {text}");
}

fn main() {
    let wgxdp = PathBuf::from(std::env::args().nth(1).expect("usage: wgxdp-demo <path to wgxdp>"));
    require_tools(&["ip", "wireguard-go", "wg", "ping", "ethtool"]);

    step("Building the topology: remote site (wireguard-go) -- gateway (wgxdp, XDP on both veths) -- LAN host");
    let topo = SiteTopology::new("demo");
    println!("    namespaces {}, {}, {}", topo.client.name, topo.gateway.name, topo.lan.name);
    println!("    remote site {CLIENT_WAN} (tunnel address {CLIENT_TUNNEL}); site LAN {SITE_CIDR}, host {LAN_HOST}");

    step(&format!("Starting `wgxdp serve` with the API on {API} and an embedded SQLite store"));
    let dir = TempDir::new("wgxdp-demo");
    let key_file = dir.join("gateway.key");
    let gateway_key = write_private_key(&key_file).public_key();
    let config = dir.join("wgxdp.toml");
    let config_text = topo.api_config(&key_file, API, &dir.join("wgxdp.db"), "");
    std::fs::write(&config, &config_text).expect("write config");
    println!("    config:\n{}", config_text.lines().map(|l| format!("      {l}")).collect::<Vec<_>>().join("\n"));
    let mut gateway = ServeProcess::start(&topo.gateway, &wgxdp, &config, &dir.0);
    gateway.wait_for_output("wgxdp: api listening", Duration::from_secs(10));
    println!("    gateway public key {gateway_key}");
    let xdp = topo.gateway.ip(&["link", "show", "dev", &topo.gateway_wan]);
    println!("    XDP attached to {}: {}", topo.gateway_wan, xdp.contains("xdp"));

    step("Creating an API key (`wgxdp apikey create`)");
    let key = create_api_key(&wgxdp, &config);
    println!("    {}…  (shown once; only its hash is stored)", &key[..12.min(key.len())]);
    let api = ApiClient::new(&topo.gateway, API, &key);

    step("POST /api/v1/vpn-gateways for the remote site");
    let client_key = PrivateKey::generate();
    let body = serde_json::json!({
        "name": "branch-office",
        "region": "local",
        "tunnel_type": "wireguard",
        "remote_network_cidr": "10.200.0.0/24",
        "remote_peer_ip": CLIENT_WAN,
        "remote_peer_port": 40001,
        "remote_public_key": client_key.public_key().to_base64(),
        "persistent_keepalive": 25,
    });
    let (code, created) = api.call("POST", "/api/v1/vpn-gateways", Some(body)).expect("API reachable");
    assert_eq!(code, 201, "create failed: {created}");
    let id = created["data"]["id"].as_str().expect("id").to_owned();
    let psk = created["data"]["pre_shared_key"].as_str().expect("psk").to_owned();
    assert!(psk.parse::<PresharedKey>().is_ok());
    println!("    HTTP {code}: {id} is {}", created["data"]["status"]);

    step(&format!("Configuring the remote site (wireguard-go) from GET /api/v1/vpn-gateways/{id}/config"));
    let remote_config = api_text(&topo, &key, &format!("/api/v1/vpn-gateways/{id}/config"));
    println!("{}", remote_config.lines().map(|l| format!("      {l}")).collect::<Vec<_>>().join("\n"));
    let wg = topo.start_client(&client_key, &gateway_key, CLIENT_TUNNEL);
    let psk_file = dir.join("remote.psk");
    std::fs::write(&psk_file, &psk).expect("write psk");
    wg.set(&["peer", &gateway_key.to_base64(), "preshared-key", psk_file.to_str().expect("utf-8")]);

    step(&format!("Pinging the LAN host {LAN_HOST} from the remote site through the tunnel"));
    let ok = ping_from(&topo.client, CLIENT_TUNNEL, LAN_HOST, 5, 3);
    println!("    {}", if ok { "replies received" } else { "NO REPLIES" });
    assert!(ok, "the tunnel does not pass traffic; gateway log:\n{}", gateway.errors());

    step(&format!("Sending {} MiB over TCP from the remote site to the LAN host", TRANSFER >> 20));
    let listener = topo.lan.tcp_listener(&format!("{LAN_HOST}:9000"));
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0usize;
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => return total,
                Ok(n) => total += n,
            }
        }
    });
    let started = Instant::now();
    let mut conn = topo.client.tcp_connect(&format!("{LAN_HOST}:9000"), Duration::from_secs(5)).expect("connect");
    let chunk = vec![0x5au8; 1 << 16];
    let mut sent = 0;
    while sent < TRANSFER {
        conn.write_all(&chunk).expect("send");
        sent += chunk.len();
    }
    drop(conn);
    let received = server.join().expect("receiver");
    let secs = started.elapsed().as_secs_f64();
    println!("    {} MiB arrived in {secs:.2} s ({:.0} Mbit/s)", received >> 20, received as f64 * 8.0 / secs / 1e6);

    step(&format!("GET /api/v1/vpn-gateways/{id}/status (`wgxdp vpn status {id}`)"));
    let status = topo
        .gateway
        .command(wgxdp.to_str().expect("utf-8"))
        .args(["vpn", "status", &id, "--api-url", &format!("http://{API}")])
        .env("WGXDP_API_KEY", &key)
        .output()
        .expect("wgxdp vpn status");
    print!("{}", indent(&String::from_utf8_lossy(&status.stdout)));
    let list = topo
        .gateway
        .command(wgxdp.to_str().expect("utf-8"))
        .args(["vpn", "list", "--api-url", &format!("http://{API}")])
        .env("WGXDP_API_KEY", &key)
        .output()
        .expect("wgxdp vpn list");
    step("`wgxdp vpn list`");
    print!("{}", indent(&String::from_utf8_lossy(&list.stdout)));

    step("Data-plane counters (packets handled in AF_XDP, not by the kernel)");
    gateway.refresh();
    for name in ["wan_redirected", "decrypted", "lan_redirected", "encrypted"] {
        println!("    {name:<15} {}", gateway.counter(name));
    }

    step("Stopping the gateway (SIGTERM): XDP detaches, namespaces are removed");
    drop(wg);
    let status = gateway.terminate();
    let left = topo.gateway.ip(&["link", "show"]).contains("xdp");
    println!("    exit {status}; XDP left attached: {left}");
    println!("\nDemo finished: a WireGuard site reached the LAN through wgxdp, configured through its API.");
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("    {l}\n")).collect()
}

/// A text (non-JSON) GET from inside the gateway's namespace.
fn api_text(topo: &SiteTopology, key: &str, path: &str) -> String {
    let (url, auth) = (format!("http://{API}{path}"), format!("Bearer {key}"));
    topo.gateway.enter(move || {
        ureq::get(&url).set("Authorization", &auth).call().expect("GET").into_string().expect("text body")
    })
}
