//! A fleet end to end (`wgxdp_integration::fleet`): three `serve` processes
//! on one PostgreSQL, a1 and a2 in region `eu` (one gateway identity, one
//! floating address), b1 in region `us`, and a wireguard-go remote site.
//!
//! A gateway created through b1's API for region `eu` carries the remote
//! site's traffic through a1; a PATCH through a2 takes effect on a1 before
//! its answer comes; `kill -9` of a1, the floating addresses moved to a2 (as
//! keepalived would): a2 takes the gateway over, the remote site's traffic
//! resumes after its next handshake, no acknowledged write is lost, and the
//! API shows a2 serving it. A DELETE through b1 stops the traffic.

use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};
use wgxdp_dataplane::noise::{PresharedKey, PrivateKey};
use wgxdp_integration::fleet::{Fleet, FLOATING_WAN, REMOTE_TUNNEL, REMOTE_WAN, SITE_HOST};
use wgxdp_integration::postgres::Cluster;
use wgxdp_integration::site::{create_api_key, ping_from, ApiClient, API_LISTEN, LISTEN_PORT};
use wgxdp_integration::WireguardGo;

fn wgxdp() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_wgxdp"))
}

/// Waits (at most `limit`) until `done` gives a value; how long it took.
fn wait_for<T>(what: &str, limit: Duration, mut done: impl FnMut() -> Option<T>) -> (T, Duration) {
    let start = Instant::now();
    loop {
        if let Some(v) = done() {
            return (v, start.elapsed());
        }
        assert!(start.elapsed() < limit, "not within {limit:?}: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn ok(r: Result<(u16, Value), String>, want: u16) -> Value {
    let (code, body) = r.expect("the API answers");
    assert_eq!(code, want, "{body}");
    body
}

#[test]
fn a_fleet_serves_a_region_from_any_node_and_fails_over_within_it() {
    let fleet = Fleet::new("fl", &Cluster::shared().database());
    let mut a1 = fleet.serve(wgxdp(), "a1");
    let _a2 = fleet.serve(wgxdp(), "a2");
    let _b1 = fleet.serve(wgxdp(), "b1");
    let key = create_api_key(wgxdp(), &fleet.node("b1").config);
    let api = |id: &str| ApiClient::new(&fleet.node(id).ns, API_LISTEN, &key);
    let (b1, a2) = (api("b1"), api("a2"));
    let nodes = ok(b1.call("GET", "/api/v1/nodes", None), 200);
    let live: Vec<&str> = nodes["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["state"] == "live")
        .map(|n| n["id"].as_str().unwrap())
        .collect();
    assert_eq!(live, ["a1", "a2", "b1"], "{nodes}");

    // Created through b1 (region us) for region eu: a1 holds the floating address and serves it.
    let remote_key = PrivateKey::generate();
    let psk = PresharedKey::generate().to_base64_secret().to_string();
    let body = json!({
        "name": "branch", "region": "eu", "tunnel_type": "wireguard",
        "remote_network_cidr": "10.200.0.0/24", "remote_peer_ip": REMOTE_WAN, "remote_peer_port": 40001,
        "remote_public_key": remote_key.public_key().to_base64(), "pre_shared_key": psk,
    });
    let created = ok(b1.call("POST", "/api/v1/vpn-gateways", Some(body)), 201);
    let g = &created["data"];
    assert_eq!(g["status"], "active", "{created}");
    assert_eq!(g["local_public_key"], fleet.eu_key.to_base64(), "region eu's identity, not b1's: {created}");
    assert_eq!((g["local_ip"].as_str(), g["local_port"].as_u64()), (Some(FLOATING_WAN), Some(u64::from(LISTEN_PORT))));
    let id = g["id"].as_str().unwrap().to_owned();
    let path = format!("/api/v1/vpn-gateways/{id}");
    let status = |client: &ApiClient| ok(client.call("GET", &format!("{path}/status"), None), 200)["data"].clone();
    assert_eq!(status(&b1)["serving_node"], "a1");

    // The remote site, configured as the API said, reaches the site host through a1.
    let wg = WireguardGo::start(&fleet.remote, &remote_key.to_base64_secret(), 40_001);
    let psk_file = fleet.dir.join("remote.psk");
    std::fs::write(&psk_file, &psk).unwrap();
    let endpoint = format!("{}:{}", g["local_ip"].as_str().unwrap(), g["local_port"]);
    let local_key = g["local_public_key"].as_str().unwrap();
    wg.set(&["peer", local_key, "endpoint", &endpoint, "allowed-ips", "10.50.0.0/24"]);
    wg.set(&["peer", local_key, "preshared-key", psk_file.to_str().unwrap()]);
    fleet.remote.ip(&["addr", "add", &format!("{REMOTE_TUNNEL}/32"), "dev", &wg.interface]);
    fleet.remote.ip(&["link", "set", &wg.interface, "up"]);
    fleet.remote.ip(&["route", "add", "10.50.0.0/24", "dev", &wg.interface]);
    if !ping_from(&fleet.remote, REMOTE_TUNNEL, SITE_HOST, 5, 3) {
        a1.refresh();
        panic!(
            "the tunnel through a1: wg {}\na1: {}\n{}\nremote neigh {}\nsite neigh {}",
            wg.show("dump"),
            a1.output(),
            a1.errors(),
            fleet.remote.ip(&["neigh"]),
            fleet.site.ip(&["neigh"])
        );
    }
    let (_, up) = wait_for("b1 shows the tunnel up from a1's published state", Duration::from_secs(15), || {
        (status(&b1)["tunnel_status"] == "up").then_some(())
    });
    eprintln!("b1 saw a1's tunnel up {up:?} after the first ping");

    // A PATCH through a2 (not serving it): in effect on a1 when the answer comes.
    let started = Instant::now();
    ok(a2.call("PATCH", &path, Some(json!({"remote_network_cidr": "10.201.0.0/24"}))), 200);
    let patched = started.elapsed();
    assert!(!ping_from(&fleet.remote, REMOTE_TUNNEL, SITE_HOST, 2, 1), "10.200.0.2 is no longer the remote network");
    let started = Instant::now();
    ok(a2.call("PATCH", &path, Some(json!({"remote_network_cidr": "10.200.0.0/24"}))), 200);
    let restored = started.elapsed();
    assert!(ping_from(&fleet.remote, REMOTE_TUNNEL, SITE_HOST, 5, 3), "routed again");
    eprintln!("PATCH through a2 answered once a1 ran it: {patched:?}, {restored:?}");

    // a1 dies; keepalived moves the floating addresses to a2.
    a1.kill9();
    let killed = Instant::now();
    fleet.give_floating_addresses("a2");
    let (_, took_over) = wait_for("a2 serves the gateway", Duration::from_secs(30), || {
        (status(&b1)["serving_node"] == "a2").then_some(())
    });
    let taken = killed.elapsed();
    eprintln!("a2 took the gateway over {taken:?} after a1's kill ({took_over:?} of waiting)");
    // Traffic resumes after the remote site's next handshake (a2 has the same key).
    let (_, resumed) = wait_for("traffic through a2", Duration::from_secs(90), || {
        ping_from(&fleet.remote, REMOTE_TUNNEL, SITE_HOST, 3, 1).then_some(())
    });
    eprintln!("traffic resumed {:?} after the kill", killed.elapsed());
    assert!(resumed < Duration::from_secs(90));
    let a2_status = status(&a2);
    assert!(a2_status["handshakes"].as_u64().unwrap_or(0) >= 1, "a2 did the handshake: {a2_status}");
    // No acknowledged write lost: the gateway as last changed, served by a2.
    let g = ok(b1.call("GET", &path, None), 200);
    assert_eq!(
        (g["data"]["status"].as_str(), g["data"]["remote_network_cidr"].as_str()),
        (Some("active"), Some("10.200.0.0/24"))
    );
    let nodes = ok(b1.call("GET", "/api/v1/nodes", None), 200);
    let a1_node = nodes["data"].as_array().unwrap().iter().find(|n| n["id"] == "a1").unwrap().clone();
    assert_eq!((a1_node["state"].as_str(), a1_node["gateways_served"].as_u64()), (Some("lost"), Some(0)), "{nodes}");

    // Deleted through b1: the traffic stops when the answer comes.
    let deleted = ok(b1.call("DELETE", &path, None), 200);
    assert_eq!(deleted["data"]["status"], "deleted", "{deleted}");
    assert!(!ping_from(&fleet.remote, REMOTE_TUNNEL, SITE_HOST, 2, 1), "deleted");
    drop(wg);
}
