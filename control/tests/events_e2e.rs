//! Events from the real data plane, end to end: a wireguard-go site's tunnel
//! goes up and its gateway is deleted while a Server-Sent Events client
//! watches (`gateway.created` → `tunnel.up` → `gateway.deleted`, resumed
//! after a disconnect without gaps); a site with another pre-shared key
//! keeps failing its handshakes (`handshake.failed`); a webhook whose
//! receiver was down the whole time gets every delivery, signed and in
//! order, after a `serve` restart.

use serde_json::{json, Value};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;
use wgxdp_dataplane::noise::{PresharedKey, PrivateKey};
use wgxdp_integration::events::{verify_signature, Sse, SseClient, WebhookReceiver};
use wgxdp_integration::site::{
    create_api_key, ping_from, ApiClient, ApiSite, API_LISTEN, CLIENT_TUNNEL, CLIENT_WAN, LAN_HOST,
};
use wgxdp_integration::{Netns, WireguardGo};

fn wgxdp() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_wgxdp"))
}

fn http(ns: &Netns, method: &'static str, path: &str, key: &str, body: Option<Value>) -> (u16, Value) {
    ApiClient::new(ns, API_LISTEN, key).call(method, path, body).unwrap()
}

/// An event stream from inside the gateway's namespace.
fn stream(ns: &Netns, key: &str, path: &str, last_event_id: Option<i64>) -> SseClient {
    let socket = ns.enter(|| TcpStream::connect(API_LISTEN).expect("connect to the API"));
    SseClient::open(socket, path, key, last_event_id)
}

fn create(ns: &Netns, key: &str, name: &str, cidr: &str, client: &PrivateKey, psk: &str) -> String {
    let body = json!({
        "name": name, "region": "local", "tunnel_type": "wireguard",
        "remote_network_cidr": cidr, "remote_peer_ip": CLIENT_WAN, "remote_peer_port": 40001,
        "remote_public_key": client.public_key().to_base64(), "pre_shared_key": psk,
    });
    let (code, created) = http(ns, "POST", "/api/v1/vpn-gateways", key, Some(body));
    assert_eq!(code, 201, "{created}");
    created["data"]["id"].as_str().unwrap().to_owned()
}

fn client(site: &ApiSite, key: &PrivateKey, psk: &str) -> WireguardGo {
    let wg = site.topo.start_client(key, &site.gateway_key, CLIENT_TUNNEL);
    let psk_file = site.dir.join(&format!("{}.psk", wg.interface));
    std::fs::write(&psk_file, psk).unwrap();
    wg.set(&["peer", &site.gateway_key.to_base64(), "preshared-key", psk_file.to_str().unwrap()]);
    wg
}

fn kinds(events: &[Sse]) -> Vec<&str> {
    events.iter().map(|e| e.1.as_str()).collect()
}

#[test]
fn sse_and_webhooks_follow_real_tunnels_and_survive_a_restart() {
    let site = ApiSite::new("ev", "mutations_per_minute = 100000\n");
    let mut serve = site.serve(wgxdp());
    let key = create_api_key(wgxdp(), &site.config);
    let ns = &site.topo.gateway;

    // A webhook for everything, whose receiver is down for the whole first run.
    let port = ns.enter(|| TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port());
    let hook_body = json!({"url": format!("http://127.0.0.1:{port}/wgxdp"), "description": "e2e"});
    let (code, hook) = http(ns, "POST", "/api/v1/webhooks", &key, Some(hook_body));
    assert_eq!(code, 201, "{hook}");
    let (hook_id, secret) =
        (hook["data"]["id"].as_str().unwrap().to_owned(), hook["data"]["secret"].as_str().unwrap().to_owned());

    let mut events = stream(ns, &key, "/api/v1/events", None);
    let site_key = PrivateKey::generate();
    let psk = PresharedKey::generate().to_base64_secret().to_string();
    let id = create(ns, &key, "branch", "10.200.0.0/24", &site_key, &psk);
    let wg = client(&site, &site_key, &psk);
    assert!(ping_from(&site.topo.client, CLIENT_TUNNEL, LAN_HOST, 5, 3), "no traffic: {}", serve.errors());
    let seen = events.until("tunnel.up", Duration::from_secs(15));
    assert!(events.status.contains("200"), "{}", events.status);
    assert_eq!(kinds(&seen), ["gateway.created", "tunnel.up"], "{seen:?}");
    assert_eq!(seen[1].0, seen[0].0 + 1);
    assert_eq!(
        (seen[0].2["gateway_id"].as_str(), seen[1].2["gateway_id"].as_str()),
        (Some(id.as_str()), Some(id.as_str()))
    );
    assert!(seen[1].2["data"]["endpoint"].as_str().is_some_and(|e| e.starts_with(CLIENT_WAN)), "{:?}", seen[1]);

    // The client disconnects; the gateway is deleted meanwhile.
    drop(events);
    let (code, _) = http(ns, "DELETE", &format!("/api/v1/vpn-gateways/{id}"), &key, None);
    assert_eq!(code, 200);
    drop(wg);
    let mut resumed = stream(ns, &key, "/api/v1/events", Some(seen[1].0));
    let rest = resumed.until("tunnel.down", Duration::from_secs(10));
    assert_eq!(kinds(&rest), ["gateway.deleted", "tunnel.down"], "{rest:?}");
    assert_eq!((rest[0].0, rest[1].0), (seen[1].0 + 1, seen[1].0 + 2), "resumed without gaps");

    // A site whose pre-shared key differs: its initiations authenticate
    // (IKpsk2 mixes the key in at the response), our responses never do.
    let other_key = PrivateKey::generate();
    let ours = PresharedKey::generate().to_base64_secret().to_string();
    let theirs = PresharedKey::generate().to_base64_secret().to_string();
    let failing = create(ns, &key, "wrong-psk", "10.200.0.0/24", &other_key, &ours);
    let wg = client(&site, &other_key, &theirs);
    // Traffic keeps wireguard-go initiating (every 5 s).
    let pinger = site.topo.client.command("ping").args(["-c", "40", "-i", "1", "-I", CLIENT_TUNNEL, LAN_HOST]).spawn();
    let failed = resumed.until("handshake.failed", Duration::from_secs(45));
    let _ = pinger.map(|mut p| p.kill());
    assert_eq!(kinds(&failed), ["gateway.created", "handshake.failed"], "{failed:?}\n{}", serve.errors());
    assert_eq!(failed[1].2["gateway_id"], failing.as_str());
    assert!(failed[1].2["data"]["failures"].as_u64() >= Some(3), "{:?}", failed[1]);
    let (_, status) = http(ns, "GET", &format!("/api/v1/vpn-gateways/{failing}/status"), &key, None);
    assert_eq!(status["data"]["tunnel_status"], "down");
    assert!(status["data"]["handshake_failures"].as_u64() >= Some(3), "{status}");
    drop(wg);
    drop(resumed);
    let (_, log) = http(ns, "GET", &format!("/api/v1/webhooks/{hook_id}/deliveries"), &key, None);
    assert!(log["data"].as_array().unwrap().iter().all(|d| d["state"] == "pending"), "{log}");
    assert!(log["data"].as_array().unwrap().iter().any(|d| d["attempts"].as_u64() >= Some(1)), "{log}");

    // A stream still open does not hold the server up: stopping ends it.
    let mut watching = stream(ns, &key, "/api/v1/events", None);
    assert!(watching.next(Duration::from_millis(300)).is_none());
    let stopped = serve.terminate_within(Duration::from_secs(15));
    assert!(stopped.is_some_and(|s| s.success()), "serve did not stop with a stream open: {stopped:?}");
    assert!(watching.next(Duration::from_secs(2)).is_none(), "the stream ended");

    // Restart with the receiver up: every event, in order, signed.
    let receiver =
        WebhookReceiver::start(ns.enter(move || TcpListener::bind(("127.0.0.1", port)).unwrap()), Vec::new());
    let serve = site.serve(wgxdp());
    let mut got = Vec::new();
    while let Some(d) = receiver.next(Duration::from_secs(20)) {
        verify_signature(&d, &secret).unwrap_or_else(|e| panic!("{e}: {d:?}"));
        let e = d.event();
        assert_eq!(d.headers["wgxdp-event"], e["type"].as_str().unwrap());
        got.push((e["id"].as_i64().unwrap(), e["type"].as_str().unwrap().to_owned()));
        if got.len() >= 6 {
            break;
        }
    }
    let types: Vec<&str> = got.iter().map(|(_, t)| t.as_str()).collect();
    assert_eq!(
        types,
        ["gateway.created", "tunnel.up", "gateway.deleted", "tunnel.down", "gateway.created", "handshake.failed"],
        "{got:?}\n{}",
        serve.errors()
    );
    assert!(got.windows(2).all(|w| w[0].0 < w[1].0), "in order: {got:?}");
    let (_, log) = http(ns, "GET", &format!("/api/v1/webhooks/{hook_id}/deliveries?limit=6"), &key, None);
    assert!(log["data"].as_array().unwrap().iter().all(|d| d["state"] == "delivered"), "{log}");
}
