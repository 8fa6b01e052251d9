//! The fleet section: three `serve` processes on one PostgreSQL
//! (`wgxdp_integration::fleet`: a1 and a2 in region eu, b1 in us).
//!
//! - Propagation: a change made through b1's API to a gateway a1 serves is
//!   answered once a1's data plane runs it (a1 acknowledges the version in
//!   the store). Its latency, p50/p99, beside the same change made through
//!   a1 itself (no propagation), in the same run: the difference is what
//!   the trip through the store and the serving node's pass cost.
//! - Fail-over: `kill -9` of a1 with the floating address moved to a2; the
//!   time until b1's API shows a2 serving, and until a2 runs every gateway.

use super::percentile;
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};
use wgxdp_dataplane::noise::PrivateKey;
use wgxdp_integration::fleet::Fleet;
use wgxdp_integration::postgres::Cluster;
use wgxdp_integration::site::{create_api_key, ApiClient, API_LISTEN};

fn gateway(i: u32) -> Value {
    json!({
        "name": format!("fleet-{i}"), "region": "eu", "tunnel_type": "wireguard",
        "remote_network_cidr": format!("10.{}.{}.0/24", 120 + i / 250, i % 250),
        "remote_peer_ip": "192.0.2.7",
        "remote_public_key": PrivateKey::generate().public_key().to_base64(),
    })
}

/// Latencies (sorted) of `n` calls `call(i)` that must answer `want`.
fn timed(
    api: &ApiClient,
    n: u32,
    want: u16,
    call: impl Fn(u32) -> (&'static str, String, Value) + Send + 'static,
) -> Vec<Duration> {
    let mut lat = api.with_caller(move |caller| {
        (0..n)
            .map(|i| {
                let (method, path, body) = call(i);
                let start = Instant::now();
                let (code, reply) = caller(method, &path, Some(body)).expect("the API answers");
                assert_eq!(code, want, "{method} {path}: {reply}");
                start.elapsed()
            })
            .collect::<Vec<_>>()
    });
    lat.sort();
    lat
}

fn ms(sorted: &[Duration]) -> Value {
    json!({"p50": percentile(sorted, 0.5), "p99": percentile(sorted, 0.99), "max": percentile(sorted, 1.0)})
}

/// Runs the section with `gateways` gateways in region eu.
pub fn measure(wgxdp: &Path, gateways: u32) -> Value {
    let fleet = Fleet::new("bf", &Cluster::shared().database());
    let mut a1 = fleet.serve(wgxdp, "a1");
    let _a2 = fleet.serve(wgxdp, "a2");
    let _b1 = fleet.serve(wgxdp, "b1");
    let key = create_api_key(wgxdp, &fleet.node("b1").config);
    let (a1_api, b1_api) = (
        ApiClient::new(&fleet.node("a1").ns, API_LISTEN, &key),
        ApiClient::new(&fleet.node("b1").ns, API_LISTEN, &key),
    );

    let created = timed(&b1_api, gateways, 201, |i| ("POST", "/api/v1/vpn-gateways".into(), gateway(i)));
    let (code, list) = b1_api.call("GET", "/api/v1/vpn-gateways?limit=100", None).expect("list");
    assert_eq!(code, 200, "{list}");
    let ids: Vec<String> =
        list["data"].as_array().expect("a page").iter().map(|g| g["id"].as_str().expect("id").to_owned()).collect();
    let patch = move |ids: Vec<String>| {
        move |i: u32| {
            let id = &ids[i as usize % ids.len()];
            ("PATCH", format!("/api/v1/vpn-gateways/{id}"), json!({"persistent_keepalive": 10 + i % 50}))
        }
    };
    let rounds = gateways.max(200);
    let remote = timed(&b1_api, rounds, 200, patch(ids.clone()));
    let local = timed(&a1_api, rounds, 200, patch(ids.clone()));

    // Fail-over.
    a1.kill9();
    let killed = Instant::now();
    fleet.give_floating_addresses("a2");
    let status = format!("/api/v1/vpn-gateways/{}/status", ids[0]);
    let deadline = killed + Duration::from_secs(60);
    let mut serving = None;
    let mut all = None;
    while (serving.is_none() || all.is_none()) && Instant::now() < deadline {
        if serving.is_none() {
            if let Ok((200, s)) = b1_api.call("GET", &status, None) {
                if s["data"]["serving_node"] == "a2" {
                    serving = Some(killed.elapsed());
                }
            }
        }
        if all.is_none() {
            if let Ok((200, nodes)) = b1_api.call("GET", "/api/v1/nodes", None) {
                let served = nodes["data"].as_array().into_iter().flatten().find(|n| n["id"] == "a2");
                if served.is_some_and(|n| n["gateways_served"].as_u64() == Some(u64::from(gateways))) {
                    all = Some(killed.elapsed());
                }
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    json!({
        "gateways": gateways,
        "changes": rounds,
        "create_through_other_region_ms": ms(&created),
        "change_through_other_region_ms": ms(&remote),
        "change_on_serving_node_ms": ms(&local),
        "propagation_p50_ms": percentile(&remote, 0.5) - percentile(&local, 0.5),
        "failover": {
            "serving_node_moved_s": serving.map(|d| d.as_secs_f64()),
            "all_gateways_moved_s": all.map(|d| d.as_secs_f64()),
        },
    })
}

/// Prints the section's table.
pub fn print(f: &Value) {
    let row = |name: &str, v: &Value| {
        println!(
            "{name:<52}{:>10.2}{:>10.2}{:>10.2}",
            v["p50"].as_f64().unwrap_or(0.0),
            v["p99"].as_f64().unwrap_or(0.0),
            v["max"].as_f64().unwrap_or(0.0)
        )
    };
    println!(
        "\nfleet on PostgreSQL, {} gateways in region eu (ms){:>13}{:>10}{:>10}",
        f["gateways"], "p50", "p99", "max"
    );
    row("create through b1 (us), answered once a1 runs it", &f["create_through_other_region_ms"]);
    row("change through b1, answered once a1 runs it", &f["change_through_other_region_ms"]);
    row("the same change through a1 (no propagation)", &f["change_on_serving_node_ms"]);
    println!("{:<52}{:>10.2}", "propagation (p50 difference)", f["propagation_p50_ms"].as_f64().unwrap_or(0.0));
    let s = |v: &Value| v.as_f64().map_or("- (not within 60 s)".into(), |s| format!("{s:.1} s"));
    println!(
        "fail-over: kill -9 of a1, address moved to a2: b1 shows a2 serving after {}, all {} gateways after {}",
        s(&f["failover"]["serving_node_moved_s"]),
        f["gateways"],
        s(&f["failover"]["all_gateways_moved_s"])
    );
}
