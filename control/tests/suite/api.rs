//! The HTTP API driven through `app()` with `oneshot`: every endpoint, every
//! error code, pagination under concurrent inserts, sorting, filtering, auth
//! and rate limits. The data plane is the in-memory one; the real one is
//! covered by `api_e2e.rs`. The store is the one the test target names
//! (`super::POSTGRES`): `api.rs` runs this suite on SQLite, `api_postgres.rs`
//! on PostgreSQL.

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{header, Method, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tower::ServiceExt;
use wgxdp_control::api::{app, ApiSettings, AppState, StaticPeer};
use wgxdp_control::plane::{MemoryPlane, TunnelStatus};
use wgxdp_control::store::{
    random_id, DeliveryState, PostgresAt, Scope, Status, Store, StoreLocation, ThisNode, EVERY_REGION,
};
use wgxdp_dataplane::noise::{PresharedKey, PrivateKey};
use wgxdp_integration::events::{verify_signature, WebhookReceiver};
use wgxdp_integration::postgres::Cluster;

struct Api {
    router: Router,
    state: Arc<AppState>,
    key: String,
    plane: Arc<MemoryPlane>,
    store: Arc<Store>,
    db: StoreLocation,
}

impl Drop for Api {
    fn drop(&mut self) {
        if let StoreLocation::Sqlite(path) = &self.db {
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
            }
        }
    }
}

/// A new database on the suite's backend.
fn new_database() -> StoreLocation {
    if super::POSTGRES {
        StoreLocation::Postgres(PostgresAt::url(Cluster::shared().database()))
    } else {
        StoreLocation::Sqlite(std::env::temp_dir().join(format!("{}.db", random_id("wgxdp-api-"))))
    }
}

/// Runs `statement` (values inline) on the database by hand, as an
/// operator's SQL client would.
fn edit_by_hand(db: &StoreLocation, statement: &str) {
    match db {
        StoreLocation::Sqlite(path) => rusqlite::Connection::open(path).unwrap().execute_batch(statement).unwrap(),
        StoreLocation::Postgres(at) => {
            Cluster::shared().psql_at(&at.url, statement);
        }
    }
}

/// Everything the database holds, as text (a search for a secret in it).
fn stored_text(db: &StoreLocation) -> String {
    match db {
        StoreLocation::Sqlite(path) => ["", "-wal"]
            .iter()
            .map(|suffix| {
                String::from_utf8_lossy(&std::fs::read(format!("{}{suffix}", path.display())).unwrap_or_default())
                    .into_owned()
            })
            .collect(),
        StoreLocation::Postgres(at) => Cluster::shared().dump(&at.url),
    }
}

struct Reply {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    body: Value,
    text: String,
}

impl Api {
    fn new(mutations_per_minute: u32) -> Self {
        Self::with(ApiSettings { mutations_per_minute, reads_per_minute: 100_000, ..settings() })
    }

    fn with(settings: ApiSettings) -> Self {
        let db = new_database();
        let store = Arc::new(Store::open_at(&db).unwrap());
        let (_, key) = store.create_api_key("test", Scope::Admin).unwrap();
        let plane = Arc::new(MemoryPlane::new(PrivateKey::generate().public_key()));
        let state = AppState::new(store.clone(), plane.clone(), settings);
        let router = app(state.clone());
        Self { router, state, key: key.expose().to_owned(), plane, store, db }
    }

    /// Another node on this one's database (its own store handle, data plane
    /// and key pair, which its node record shows), as another `serve` of the
    /// fleet would be.
    fn beside(&self, mut settings: ApiSettings) -> Self {
        let store = Arc::new(Store::open_at(&self.db).unwrap());
        let public_key = PrivateKey::generate().public_key();
        settings.node.public_key = public_key.to_base64();
        let plane = Arc::new(MemoryPlane::new(public_key));
        let state = AppState::new(store.clone(), plane.clone(), settings);
        let router = app(state.clone());
        Self { router, state, key: self.key.clone(), plane, store, db: self.db.clone() }
    }

    async fn raw(&self, req: Request<Body>) -> Reply {
        let resp = self.router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Reply { status, headers, body, text }
    }

    async fn call_as(&self, key: Option<&str>, method: Method, uri: &str, body: Option<Value>) -> Reply {
        let mut b = Request::builder().method(method).uri(uri);
        if let Some(k) = key {
            b = b.header(header::AUTHORIZATION, format!("Bearer {k}"));
        }
        let req = match body {
            Some(v) => b.header(header::CONTENT_TYPE, "application/json").body(Body::from(v.to_string())),
            None => b.body(Body::empty()),
        };
        self.raw(req.unwrap()).await
    }

    async fn call(&self, method: Method, uri: &str, body: Option<Value>) -> Reply {
        self.call_as(Some(&self.key.clone()), method, uri, body).await
    }

    /// `method uri` with `If-Match: if_match`.
    async fn call_if(&self, method: Method, uri: &str, if_match: &str, body: Option<Value>) -> Reply {
        self.call_with(&self.key.clone(), method, uri, &[("if-match", if_match)], body).await
    }

    /// `method uri` as API key `key`, with more `headers`.
    async fn call_with(
        &self,
        key: &str,
        method: Method,
        uri: &str,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> Reply {
        let mut b = Request::builder().method(method).uri(uri).header(header::AUTHORIZATION, format!("Bearer {key}"));
        for (name, value) in headers {
            b = b.header(*name, *value);
        }
        let req = match body {
            Some(v) => b.header(header::CONTENT_TYPE, "application/json").body(Body::from(v.to_string())),
            None => b.body(Body::empty()),
        };
        self.raw(req.unwrap()).await
    }

    async fn create(&self, body: Value) -> Reply {
        self.call(Method::POST, "/api/v1/vpn-gateways", Some(body)).await
    }

    /// `PATCH` of gateway `id` with `body`.
    async fn patch(&self, id: &str, body: Value) -> Reply {
        self.call(Method::PATCH, &gateway_uri(id), Some(body)).await
    }
}

fn settings() -> ApiSettings {
    ApiSettings {
        site_cidr: Some("10.50.0.0/24".parse().unwrap()),
        public_address: "198.51.100.1".parse().unwrap(),
        mutations_per_minute: 1000,
        reads_per_minute: 100_000,
        ..ApiSettings::default()
    }
}

fn new_gateway(name: &str, cidr: &str) -> Value {
    json!({
        "name": name,
        "region": "eu-west",
        "tunnel_type": "wireguard",
        "remote_network_cidr": cidr,
        "remote_peer_ip": "203.0.113.200",
        "remote_public_key": PrivateKey::generate().public_key().to_base64(),
    })
}

/// How the API refuses a network or key, by what the refusal says: a clash
/// with something else (another network of the request or gateway, this
/// site, the host, another gateway, this gateway's own key) is a 409, a value
/// that is not acceptable on its own a 422.
fn refusal_for(says: &str) -> (StatusCode, &'static str) {
    let clash = ["overlaps", "is also", "listed twice", "site_cidr", "gateway host", "10.50.0.0/24", "own key"];
    if clash.iter().any(|c| says.contains(c)) {
        (StatusCode::CONFLICT, "conflict")
    } else {
        (StatusCode::UNPROCESSABLE_ENTITY, "validation_failed")
    }
}

fn assert_error(r: &Reply, status: StatusCode, code: &str) {
    assert_eq!(r.status, status, "{}", r.text);
    assert_eq!(r.body["error"]["code"], code, "{}", r.text);
    assert!(r.body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{}", r.text);
}

#[tokio::test]
async fn create_get_update_delete_lifecycle() {
    let api = Api::new(1000);
    let psk = PresharedKey::generate().to_base64_secret().to_string();
    let mut body = new_gateway("site-a-vpn", "10.0.0.0/16");
    body["pre_shared_key"] = json!(psk);
    body["persistent_keepalive"] = json!(25);
    let r = api.create(body.clone()).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let g = &r.body["data"];
    let id = g["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("vpn_"));
    assert_eq!(r.headers[header::LOCATION], format!("/api/v1/vpn-gateways/{id}"));
    assert_eq!(g["status"], "active");
    assert_eq!(g["tunnel_type"], "wireguard");
    assert_eq!(g["local_network_cidr"], "10.50.0.0/24", "defaults to the site CIDR");
    assert_eq!(g["remote_peer_port"], 51820);
    assert_eq!(g["pre_shared_key"], psk, "the key is returned once, at creation");
    assert_eq!(g["local_ip"], "198.51.100.1");
    assert_eq!(g["tunnel_status"], "down");
    assert_eq!(r.body["meta"]["persistence"], "synced");
    // The peer is in the data plane.
    let t = api.plane.tunnel(&id).expect("programmed into the data plane");
    assert_eq!(t.allowed_ips, vec!["10.0.0.0/16".parse().unwrap()]);
    assert_eq!(t.endpoint, Some("203.0.113.200:51820".parse().unwrap()));
    assert_eq!(t.persistent_keepalive, Some(25));
    assert_eq!(t.public_key.to_base64(), body["remote_public_key"]);

    // Afterwards the key is masked everywhere.
    let r = api.call(Method::GET, &format!("/api/v1/vpn-gateways/{id}"), None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["data"]["pre_shared_key"], "********");
    assert!(!r.text.contains(&psk));
    let r = api.call(Method::GET, "/api/v1/vpn-gateways", None).await;
    assert!(!r.text.contains(&psk));

    // An auto-generated key when none is given.
    let r = api.create(new_gateway("site-b", "10.1.0.0/16")).await;
    assert_eq!(r.status, StatusCode::CREATED);
    let generated = r.body["data"]["pre_shared_key"].as_str().unwrap();
    assert!(generated.parse::<PresharedKey>().is_ok(), "a real 32-byte key: {generated}");

    // PATCH: name, CIDR and PSK rotation; the running tunnel follows.
    let new_psk = PresharedKey::generate().to_base64_secret().to_string();
    let r = api
        .patch(&id, json!({"name": "site-a-renamed", "remote_network_cidr": "10.2.0.0/16", "pre_shared_key": new_psk}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["data"]["name"], "site-a-renamed");
    assert_eq!(r.body["data"]["remote_network_cidr"], "10.2.0.0/16");
    assert_eq!(r.body["data"]["pre_shared_key"], "********");
    let t = api.plane.tunnel(&id).unwrap();
    assert_eq!(t.allowed_ips, vec!["10.2.0.0/16".parse().unwrap()]);
    assert_eq!(t.preshared_key, new_psk.parse().unwrap());
    assert_eq!(api.store.get(&id).unwrap().unwrap().name, "site-a-renamed", "durable");

    // Status and remote config.
    api.plane.statuses.lock().unwrap().insert(
        id.clone(),
        TunnelStatus {
            bytes_sent: 1000,
            bytes_received: 2000,
            packets_sent: 10,
            packets_received: 20,
            handshakes: 1,
            handshake_failures: 2,
            last_handshake: Some(SystemTime::now() - Duration::from_secs(5)),
            endpoint: Some("203.0.113.200:40000".parse().unwrap()),
            rule_hits: Vec::new(),
        },
    );
    let r = api.call(Method::GET, &format!("/api/v1/vpn-gateways/{id}/status"), None).await;
    assert_eq!(r.status, StatusCode::OK);
    let s = &r.body["data"];
    assert_eq!((s["tunnel_status"].as_str(), s["bytes_sent"].as_u64()), (Some("up"), Some(1000)));
    assert_eq!(s["handshake_failures"], 2);
    assert_eq!(
        (s["bytes_received"].as_u64(), s["remote_endpoint"].as_str()),
        (Some(2000), Some("203.0.113.200:40000"))
    );
    assert!(s["last_handshake"].as_str().unwrap().ends_with('Z'));
    api.plane.statuses.lock().unwrap().get_mut(&id).unwrap().last_handshake =
        Some(SystemTime::now() - Duration::from_secs(181));
    let r = api.call(Method::GET, &format!("/api/v1/vpn-gateways/{id}/status"), None).await;
    assert_eq!(r.body["data"]["tunnel_status"], "down", "no handshake within REJECT_AFTER_TIME");
    let r = api.call(Method::GET, &format!("/api/v1/vpn-gateways/{id}/config"), None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.headers[header::CONTENT_TYPE].to_str().unwrap().starts_with("text/plain"));
    assert!(r.text.contains(&format!("PublicKey = {}", api.plane.public_key_base64())), "{}", r.text);
    assert!(r.text.contains("Endpoint = 198.51.100.1:51820") && r.text.contains("AllowedIPs = 10.50.0.0/24"));
    assert!(!r.text.contains(&new_psk), "the config never carries the secret");

    // DELETE: the tunnel leaves the data plane; the record stays listable as deleted.
    let r = api.call(Method::DELETE, &format!("/api/v1/vpn-gateways/{id}"), None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["data"]["status"], "deleted");
    assert!(api.plane.tunnel(&id).is_none());
    let r = api.call(Method::GET, "/api/v1/vpn-gateways", None).await;
    let ids: Vec<&str> = r.body["data"].as_array().unwrap().iter().map(|g| g["id"].as_str().unwrap()).collect();
    assert!(!ids.contains(&id.as_str()), "deleted gateways are not in the default listing");
    let r = api.call(Method::GET, "/api/v1/vpn-gateways?status=deleted", None).await;
    assert_eq!(r.body["data"][0]["id"], id);
    assert_eq!(r.body["data"].as_array().unwrap().len(), 1);
    let r = api.call(Method::GET, &format!("/api/v1/vpn-gateways/{id}"), None).await;
    assert_eq!(r.body["data"]["status"], "deleted");
    // The deleted gateway's CIDR and key are free again.
    let mut again = body.clone();
    again["remote_network_cidr"] = json!("10.2.0.0/16");
    assert_eq!(api.create(again).await.status, StatusCode::CREATED);
}

#[tokio::test]
async fn validation_errors_name_the_field() {
    let api = Api::new(1000);
    let cases: Vec<(&str, Value, &str)> = vec![
        ("name", json!("x"), "2-40"),
        ("name", json!("x".repeat(41)), "2-40"),
        ("remote_network_cidr", json!("10.0.0.0/33"), "CIDR"),
        ("remote_network_cidr", json!("10.0.0.5/16"), "did you mean 10.0.0.0/16"),
        ("remote_network_cidr", json!("banana"), "CIDR"),
        ("remote_network_cidr", json!("10.50.0.128/25"), "overlaps the local network"),
        ("remote_peer_ip", json!("203.0.113"), "not an IP"),
        ("remote_peer_ip", json!("0.0.0.0"), "cannot be"),
        ("remote_public_key", json!("not-a-key"), "base64"),
        ("tunnel_type", json!("ipsec"), "only wireguard"),
        ("tunnel_type", json!("gre"), "only wireguard"),
        ("pre_shared_key", json!("c2hvcnQ="), "32 bytes"),
        ("region", json!("US East!"), "a-z"),
        ("local_network_cidr", json!("10.0.0.0/8"), "overlaps"),
        ("remote_peer_port", json!(0), "1-65535"),
    ];
    for (field, value, needle) in cases {
        let mut body = new_gateway("valid-name", "10.7.0.0/16");
        body[field] = value.clone();
        let r = api.create(body).await;
        let (status, code) = refusal_for(needle);
        assert_error(&r, status, code);
        let msg = r.body["error"]["message"].as_str().unwrap();
        let expected_field = if field == "local_network_cidr" { "remote_network_cidr" } else { field };
        assert_eq!(r.body["error"]["field"], expected_field, "{field}={value}: {msg}");
        assert!(msg.contains(needle), "{field}={value}: `{msg}` lacks `{needle}`");
    }
    for missing in ["name", "region", "tunnel_type", "remote_network_cidr", "remote_peer_ip", "remote_public_key"] {
        let mut body = new_gateway("valid-name", "10.7.0.0/16");
        body.as_object_mut().unwrap().remove(missing);
        let r = api.create(body).await;
        assert_error(&r, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
        assert_eq!(r.body["error"]["field"], missing);
        assert!(r.body["error"]["message"].as_str().unwrap().contains("required"));
    }
    let mut own = new_gateway("valid-name", "10.7.0.0/16");
    own["remote_public_key"] = json!(api.plane.public_key_base64());
    let r = api.create(own).await;
    assert_error(&r, StatusCode::CONFLICT, "conflict");
    assert_eq!(r.body["error"]["field"], "remote_public_key");
    assert!(api.plane.tunnels.lock().unwrap().is_empty(), "nothing reached the data plane");
    assert!(api.store.live().unwrap().is_empty(), "nothing was stored");
}

#[tokio::test]
async fn malformed_requests() {
    let api = Api::new(1000);
    let uri = "/api/v1/vpn-gateways";
    let post = |body: &'static str, ctype: Option<&'static str>| {
        let mut b = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header(header::AUTHORIZATION, format!("Bearer {}", api.key));
        if let Some(c) = ctype {
            b = b.header(header::CONTENT_TYPE, c);
        }
        b.body(Body::from(body)).unwrap()
    };
    assert_error(&api.raw(post("{\"name\": ", Some("application/json"))).await, StatusCode::BAD_REQUEST, "bad_request");
    assert_error(&api.raw(post("[1,2]", Some("application/json"))).await, StatusCode::BAD_REQUEST, "bad_request");
    let mut unknown = new_gateway("valid-name", "10.7.0.0/16");
    unknown["colour"] = json!("blue");
    let r = api.create(unknown).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "bad_request");
    assert!(r.text.contains("colour"), "{}", r.text);
    let mut wrong_type = new_gateway("valid-name", "10.7.0.0/16");
    wrong_type["remote_peer_port"] = json!("eighty");
    assert_error(&api.create(wrong_type).await, StatusCode::BAD_REQUEST, "bad_request");
    assert_error(&api.raw(post("{}", None)).await, StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type");
    let huge = Box::leak(format!("{{\"name\": \"{}\"}}", "a".repeat(100_000)).into_boxed_str());
    assert_error(
        &api.raw(post(huge, Some("application/json"))).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    );
    // Unknown ids and routes.
    for (m, path) in [
        (Method::GET, "/api/v1/vpn-gateways/vpn_nope"),
        (Method::PATCH, "/api/v1/vpn-gateways/vpn_nope"),
        (Method::DELETE, "/api/v1/vpn-gateways/vpn_nope"),
        (Method::GET, "/api/v1/vpn-gateways/vpn_nope/status"),
        (Method::GET, "/api/v1/vpn-gateways/vpn_nope/config"),
    ] {
        let body = (m == Method::PATCH).then(|| json!({"name": "whatever"}));
        assert_error(&api.call(m, path, body).await, StatusCode::NOT_FOUND, "not_found");
    }
    assert_error(&api.call(Method::GET, "/api/v1/nothing-here", None).await, StatusCode::NOT_FOUND, "not_found");
    // Bad query parameters.
    for q in ["limit=0", "limit=101", "limit=abc", "status=gone", "sort=size", "order=up", "cursor=%%%", "bogus=1"] {
        let r = api.call(Method::GET, &format!("{uri}?{q}"), None).await;
        assert_error(&r, StatusCode::BAD_REQUEST, "bad_request");
    }
    // PATCH validation.
    let id = api.create(new_gateway("patch-me", "10.9.0.0/16")).await.body["data"]["id"].as_str().unwrap().to_owned();
    let path = format!("{uri}/{id}");
    let r = api.call(Method::PATCH, &path, Some(json!({"remote_network_cidr": "10.9.0.1/16"}))).await;
    assert_error(&r, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    assert_eq!(r.body["error"]["field"], "remote_network_cidr");
    let r = api.call(Method::PATCH, &path, Some(json!({"region": "elsewhere"}))).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "bad_request");
    let r = api.call(Method::PATCH, &path, Some(json!({"name": "n"}))).await;
    assert_eq!(r.body["error"]["field"], "name");
    assert_eq!(api.store.get(&id).unwrap().unwrap().name, "patch-me", "a refused change changes nothing");
}

#[tokio::test]
async fn conflicts() {
    let api = Api::new(1000);
    let first = new_gateway("first", "10.10.0.0/16");
    let id = api.create(first.clone()).await.body["data"]["id"].as_str().unwrap().to_owned();
    // Same remote key, or an overlapping remote network: 409.
    let mut same_key = new_gateway("second", "10.11.0.0/16");
    same_key["remote_public_key"] = first["remote_public_key"].clone();
    assert_error(&api.create(same_key).await, StatusCode::CONFLICT, "conflict");
    let r = api.create(new_gateway("third", "10.10.128.0/17")).await;
    assert_error(&r, StatusCode::CONFLICT, "conflict");
    assert!(r.text.contains(&id), "names the gateway it overlaps: {}", r.text);
    let other = api.create(new_gateway("fourth", "10.12.0.0/16")).await.body["data"]["id"].as_str().unwrap().to_owned();
    let r = api.patch(&other, json!({"remote_network_cidr": "10.10.0.0/24"})).await;
    assert_error(&r, StatusCode::CONFLICT, "conflict");
    // Transient states refuse changes; a delete only while deleting (one
    // `creating` outside a change, on the node that serves it, is one its
    // data plane refused to start: it may go).
    for transient in [Status::Creating, Status::Deleting] {
        api.store.set_status(&id, transient).unwrap();
        let path = format!("/api/v1/vpn-gateways/{id}");
        assert_error(
            &api.call(Method::PATCH, &path, Some(json!({"name": "x-y"}))).await,
            StatusCode::CONFLICT,
            "conflict",
        );
    }
    assert_error(&api.call(Method::DELETE, &gateway_uri(&id), None).await, StatusCode::CONFLICT, "conflict");
    api.store.set_status(&id, Status::Active).unwrap();
    let path = format!("/api/v1/vpn-gateways/{id}");
    assert_eq!(api.call(Method::DELETE, &path, None).await.status, StatusCode::OK);
    assert_error(&api.call(Method::DELETE, &path, None).await, StatusCode::CONFLICT, "conflict");
    assert_error(&api.call(Method::PATCH, &path, Some(json!({"name": "x-y"}))).await, StatusCode::CONFLICT, "conflict");
    assert_error(&api.call(Method::GET, &format!("{path}/config"), None).await, StatusCode::CONFLICT, "conflict");
    let stuck = api.create(new_gateway("stuck", "10.30.0.0/16")).await.body["data"]["id"].as_str().unwrap().to_owned();
    api.store.set_status(&stuck, Status::Creating).unwrap();
    let r = api.call(Method::DELETE, &gateway_uri(&stuck), None).await;
    assert_eq!((r.status, r.body["data"]["status"].as_str()), (StatusCode::OK, Some("deleted")), "{}", r.text);
    // A data plane that refuses: 503, and the create is not kept.
    *api.plane.fail_with.lock().unwrap() = Some("prefix map full".into());
    let r = api.create(new_gateway("refused", "10.20.0.0/16")).await;
    assert_error(&r, StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    assert!(api.store.live().unwrap().iter().all(|g| g.name != "refused"));
}

#[tokio::test]
async fn authentication() {
    let api = Api::new(1000);
    let uri = "/api/v1/vpn-gateways";
    for key in [None, Some("wgxdp_not-a-real-key"), Some("")] {
        let r = api.call_as(key, Method::GET, uri, None).await;
        assert_error(&r, StatusCode::UNAUTHORIZED, "unauthorized");
        assert_eq!(r.headers[header::WWW_AUTHENTICATE], "Bearer");
    }
    let basic = Request::builder().uri(uri).header(header::AUTHORIZATION, "Basic dXNlcjpwYXNz").body(Body::empty());
    assert_error(&api.raw(basic.unwrap()).await, StatusCode::UNAUTHORIZED, "unauthorized");
    let r = api.call_as(None, Method::POST, uri, Some(new_gateway("sneaky", "10.30.0.0/16"))).await;
    assert_error(&r, StatusCode::UNAUTHORIZED, "unauthorized");
    assert!(api.store.live().unwrap().is_empty());
    // Every /api/v1 route is behind the key; health, ready and metrics are not.
    for path in
        [uri, "/api/v1/vpn-gateways/vpn_x", "/api/v1/vpn-gateways/vpn_x/status", "/api/v1/vpn-gateways/vpn_x/config"]
    {
        assert_eq!(api.call_as(None, Method::GET, path, None).await.status, StatusCode::UNAUTHORIZED, "{path}");
    }
    assert_eq!(api.call_as(None, Method::GET, "/health", None).await.status, StatusCode::OK);
    assert_eq!(api.call(Method::GET, uri, None).await.status, StatusCode::OK);
    // A revoked key stops working at once.
    let (info, second) = api.store.create_api_key("second", Scope::Admin).unwrap();
    assert_eq!(api.call_as(Some(second.expose()), Method::GET, uri, None).await.status, StatusCode::OK);
    api.store.revoke_api_key(&info.id).unwrap();
    assert_eq!(api.call_as(Some(second.expose()), Method::GET, uri, None).await.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn rate_limits_per_key() {
    let api = Api::new(3);
    for i in 0..3 {
        let r = api.create(new_gateway(&format!("gw-{i}"), &format!("10.{}.0.0/16", 40 + i))).await;
        assert_eq!(r.status, StatusCode::CREATED);
        assert_eq!(r.headers["x-ratelimit-limit"], "3");
        assert_eq!(r.headers["x-ratelimit-remaining"], (2 - i).to_string().as_str());
        let reset: u64 = r.headers["x-ratelimit-reset"].to_str().unwrap().parse().unwrap();
        assert!((1..=60).contains(&reset));
    }
    let r = api.create(new_gateway("gw-over", "10.60.0.0/16")).await;
    assert_error(&r, StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    let retry: u64 = r.headers[header::RETRY_AFTER].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry));
    assert_eq!(r.headers["x-ratelimit-remaining"], "0");
    assert!(api.store.live().unwrap().iter().all(|g| g.name != "gw-over"), "a limited request does nothing");
    // Reads have their own budget, and another key its own.
    assert_eq!(api.call(Method::GET, "/api/v1/vpn-gateways", None).await.status, StatusCode::OK);
    let (_, other) = api.store.create_api_key("other", Scope::Admin).unwrap();
    let r = api
        .call_as(Some(other.expose()), Method::POST, "/api/v1/vpn-gateways", Some(new_gateway("gw-o", "10.61.0.0/16")))
        .await;
    assert_eq!(r.status, StatusCode::CREATED);
}

fn names(r: &Reply) -> Vec<String> {
    r.body["data"].as_array().unwrap().iter().map(|g| g["name"].as_str().unwrap().to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pagination_sorting_filtering() {
    let api = Arc::new(Api::new(100_000));
    let mut initial = HashSet::new();
    for i in 0..30u32 {
        // Names repeat, so the sort needs its tie-breaker.
        let name = format!("site-{:02}", (i * 7) % 13);
        let r = api.create(new_gateway(&name, &format!("10.{}.{}.0/24", 100 + i / 200, i % 200))).await;
        assert_eq!(r.status, StatusCode::CREATED);
        initial.insert(r.body["data"]["id"].as_str().unwrap().to_owned());
    }
    for (sort, order) in [("name", "asc"), ("name", "desc"), ("created_at", "asc"), ("created_at", "desc")] {
        // Insert concurrently while paging: nothing that existed is lost or repeated.
        let writer = {
            let api = api.clone();
            tokio::spawn(async move {
                for i in 0..15u32 {
                    let cidr = format!("10.{}.{}.0/24", 150 + i, rand_octet());
                    let _ = api.create(new_gateway(&format!("late-{i:02}"), &cidr)).await;
                    tokio::task::yield_now().await;
                }
            })
        };
        let mut seen = Vec::new();
        let mut pages = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let mut uri = format!("/api/v1/vpn-gateways?limit=7&sort={sort}&order={order}");
            if let Some(c) = &cursor {
                uri.push_str(&format!("&cursor={c}"));
            }
            let r = api.call(Method::GET, &uri, None).await;
            assert_eq!(r.status, StatusCode::OK, "{}", r.text);
            assert!(r.body["data"].as_array().unwrap().len() <= 7);
            assert_eq!(r.body["meta"]["limit"], 7);
            pages.push(names(&r));
            seen.extend(r.body["data"].as_array().unwrap().iter().map(|g| {
                (g["id"].as_str().unwrap().to_owned(), g["name"].as_str().unwrap().to_owned(), g["created_at"].clone())
            }));
            match r.body["meta"]["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => break,
            }
        }
        writer.await.unwrap();
        let ids: Vec<&String> = seen.iter().map(|(id, _, _)| id).collect();
        let unique: HashSet<&String> = ids.iter().copied().collect();
        assert_eq!(unique.len(), ids.len(), "{sort} {order}: an item repeated across pages");
        for id in &initial {
            assert!(unique.contains(id), "{sort} {order}: {id} was lost while paging");
        }
        if sort == "name" {
            let got: Vec<&String> = seen.iter().map(|(_, n, _)| n).collect();
            let mut sorted = got.clone();
            sorted.sort();
            if order == "desc" {
                sorted.reverse();
            }
            assert_eq!(got, sorted, "sorted by name {order}");
        }
        // Clean up the late arrivals for the next round.
        for g in api.store.live().unwrap().into_iter().filter(|g| g.name.starts_with("late-")) {
            api.store.set_status(&g.id, Status::Deleted).unwrap();
        }
    }
    // A cursor only fits its own query.
    let r = api.call(Method::GET, "/api/v1/vpn-gateways?limit=5&sort=name", None).await;
    let c = r.body["meta"]["next_cursor"].as_str().unwrap().to_owned();
    let r = api.call(Method::GET, &format!("/api/v1/vpn-gateways?limit=5&sort=created_at&cursor={c}"), None).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "bad_request");
    // Filtering by status.
    let r = api.call(Method::GET, "/api/v1/vpn-gateways?status=active&limit=100", None).await;
    assert_eq!(r.body["data"].as_array().unwrap().len(), 30);
    assert!(r.body["data"].as_array().unwrap().iter().all(|g| g["status"] == "active"));
    let r = api.call(Method::GET, "/api/v1/vpn-gateways?status=deleted&limit=100", None).await;
    assert_eq!(r.body["data"].as_array().unwrap().len(), 60, "the late arrivals, deleted");
    let r = api.call(Method::GET, "/api/v1/vpn-gateways?status=creating", None).await;
    assert!(r.body["data"].as_array().unwrap().is_empty());
    // Default page size is 50.
    for i in 0..25u32 {
        api.create(new_gateway(&format!("more-{i}"), &format!("10.200.{i}.0/24"))).await;
    }
    let r = api.call(Method::GET, "/api/v1/vpn-gateways", None).await;
    assert_eq!(r.body["data"].as_array().unwrap().len(), 50);
    assert!(r.body["meta"]["next_cursor"].is_string());
}

fn rand_octet() -> u8 {
    let mut b = [0u8; 1];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut b);
    b[0]
}

#[tokio::test]
async fn health_ready_metrics() {
    let api = Api::new(1000);
    let r = api.call_as(None, Method::GET, "/health", None).await;
    assert_eq!((r.status, r.body["status"].as_str()), (StatusCode::OK, Some("ok")));
    let r = api.call_as(None, Method::GET, "/ready", None).await;
    assert_eq!((r.status, r.body["status"].as_str()), (StatusCode::OK, Some("ok")));
    let mut ids = Vec::new();
    for i in 0..40u32 {
        let r = api.create(new_gateway(&format!("metered-{i}"), &format!("10.70.{i}.0/24"))).await;
        ids.push(r.body["data"]["id"].as_str().unwrap().to_owned());
    }
    for id in &ids[..3] {
        assert_eq!(api.call(Method::DELETE, &format!("/api/v1/vpn-gateways/{id}"), None).await.status, StatusCode::OK);
    }
    // A scrape is served from counters: the database is not touched at all.
    let before = api.store.queries();
    let r = api.call_as(None, Method::GET, "/metrics", None).await;
    assert_eq!(api.store.queries(), before, "a scrape must not query the store");
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.text.contains("# TYPE wgxdp_gateways gauge"), "{}", r.text);
    assert!(r.text.contains("wgxdp_gateways{status=\"active\"} 37"), "{}", r.text);
    assert!(r.text.contains("wgxdp_gateways{status=\"deleted\"} 3"), "{}", r.text);
    assert!(r.text.contains("wgxdp_gateways{status=\"creating\"} 0"), "{}", r.text);
}

#[tokio::test]
async fn metrics_behind_the_api_key_or_on_their_own_listener() {
    let api = Api::with(ApiSettings { metrics_auth: true, ..settings() });
    let r = api.call_as(None, Method::GET, "/metrics", None).await;
    assert_error(&r, StatusCode::UNAUTHORIZED, "unauthorized");
    let r = api.call_as(Some("wgxdp_wrong"), Method::GET, "/metrics", None).await;
    assert_error(&r, StatusCode::UNAUTHORIZED, "unauthorized");
    let r = api.call(Method::GET, "/metrics", None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.text.contains("wgxdp_gateways{status=\"active\"} 0"), "{}", r.text);
    // On its own listener: not on the API's router, on `metrics_app`.
    let api = Api::with(ApiSettings { metrics_separate: true, ..settings() });
    assert_error(&api.call(Method::GET, "/metrics", None).await, StatusCode::NOT_FOUND, "not_found");
    let metrics = wgxdp_control::api::metrics_app(api.state.clone());
    let resp = metrics.oneshot(Request::get("/metrics").body(Body::empty()).unwrap()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let resp = wgxdp_control::api::metrics_app(api.state.clone())
        .oneshot(Request::get("/api/v1/vpn-gateways").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND, "only /metrics there");
}

fn from(addr: &str, key: Option<&str>) -> Request<Body> {
    let mut b = Request::builder().uri("/api/v1/vpn-gateways");
    if let Some(k) = key {
        b = b.header(header::AUTHORIZATION, format!("Bearer {k}"));
    }
    let mut req = b.body(Body::empty()).unwrap();
    req.extensions_mut().insert(ConnectInfo(addr.parse::<SocketAddr>().unwrap()));
    req
}

#[tokio::test]
async fn failed_authentications_are_limited_per_source_before_the_store() {
    let api = Api::with(ApiSettings { auth_failures_per_minute: 5, ..settings() });
    for i in 0..5 {
        let key = (i % 2 == 0).then_some("wgxdp_guess");
        assert_error(&api.raw(from("192.0.2.7:4000", key)).await, StatusCode::UNAUTHORIZED, "unauthorized");
    }
    let before = api.store.queries();
    for key in [Some("wgxdp_guess"), None, Some(api.key.as_str())] {
        let r = api.raw(from("192.0.2.7:4001", key)).await;
        assert_error(&r, StatusCode::TOO_MANY_REQUESTS, "rate_limited");
        let retry: u64 = r.headers[header::RETRY_AFTER].to_str().unwrap().parse().unwrap();
        assert!((1..=60).contains(&retry), "{retry}");
    }
    assert_eq!(api.store.queries(), before, "a limited request never reaches the store");
    // Other sources are not affected.
    assert_eq!(api.raw(from("192.0.2.8:4000", Some(&api.key))).await.status, StatusCode::OK);
    assert_error(&api.raw(from("[2001:db8::1]:4000", None)).await, StatusCode::UNAUTHORIZED, "unauthorized");
    // A flood from many addresses: the table stays bounded, and a client
    // without failures of its own is never refused because of it.
    for i in 0..(wgxdp_control::api::auth::SOURCE_TABLE_CAPACITY as u32 + 50) {
        let addr = SocketAddr::from((std::net::Ipv4Addr::from(0x0a00_0000 + i), 1000));
        let _ = api.raw(from(&addr.to_string(), None)).await;
    }
    assert!(api.state.auth_failures.tracked() <= wgxdp_control::api::auth::SOURCE_TABLE_CAPACITY);
    assert_eq!(api.raw(from("203.0.113.99:1", Some(&api.key))).await.status, StatusCode::OK);
    let r = api.raw(from("203.0.113.98:1", Some("wgxdp_guess"))).await;
    assert_error(&r, StatusCode::UNAUTHORIZED, "unauthorized");
}

#[tokio::test]
async fn config_file_peers_take_part_in_the_conflict_checks() {
    let static_key = PrivateKey::generate().public_key();
    let api = Api::with(ApiSettings {
        static_peers: vec![StaticPeer { public_key: static_key, allowed_ips: vec!["10.20.0.0/16".parse().unwrap()] }],
        ..settings()
    });
    for cidr in ["10.20.0.0/16", "10.20.5.0/24", "10.16.0.0/12"] {
        let r = api.create(new_gateway("takeover", cidr)).await;
        assert_error(&r, StatusCode::CONFLICT, "conflict");
        assert!(r.text.contains("configuration file"), "{}", r.text);
    }
    let mut same_key = new_gateway("same-key", "10.21.0.0/16");
    same_key["remote_public_key"] = json!(static_key.to_base64());
    let r = api.create(same_key).await;
    assert_error(&r, StatusCode::CONFLICT, "conflict");
    assert!(r.text.contains("configuration file"), "{}", r.text);
    // PATCH cannot move onto a static peer's prefix either.
    let id = api.create(new_gateway("neighbour", "10.22.0.0/16")).await.body["data"]["id"].as_str().unwrap().to_owned();
    let r = api.patch(&id, json!({"remote_network_cidr": "10.20.1.0/24"})).await;
    assert_error(&r, StatusCode::CONFLICT, "conflict");
    assert_eq!(api.plane.tunnels.lock().unwrap().len(), 1, "only the non-overlapping gateway reached the data plane");
}

#[tokio::test]
async fn store_failure_after_the_data_plane_changed_is_reconciled() {
    let api = Api::new(1000);
    // Retries ride out a short failure: the create succeeds.
    api.store.inject_write_failures(1, 2);
    let r = api.create(new_gateway("retried", "10.80.0.0/16")).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let retried = r.body["data"]["id"].as_str().unwrap().to_owned();
    assert_eq!(api.store.get(&retried).unwrap().unwrap().status, Status::Active);

    // The insert lands, then every write fails: the tunnel is rolled back.
    api.store.inject_write_failures(1, u32::MAX);
    let r = api.create(new_gateway("stuck", "10.81.0.0/16")).await;
    assert_error(&r, StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    let stuck = api.store.live().unwrap().into_iter().find(|g| g.name == "stuck").expect("the record stayed");
    assert_eq!(stuck.status, Status::Creating);
    assert!(api.plane.tunnel(&stuck.id).is_none(), "no live tunnel behind a record that says creating");
    assert!(events_of(&api.store, &stuck.id).is_empty(), "no event for a create that was not acknowledged");
    // A later start finishes the job, and records it.
    api.store.inject_write_failures(0, 0);
    wgxdp_control::api::changes::replay(&api.state).unwrap();
    assert_eq!(api.store.get(&stuck.id).unwrap().unwrap().status, Status::Active);
    assert_eq!(events_of(&api.store, &stuck.id), ["gateway.created"]);
    assert!(api.plane.tunnel(&stuck.id).is_some());

    // The same, but the rollback of the tunnel fails too: the record is kept
    // (`creating`, with its key and prefix) rather than a tunnel running unrecorded.
    api.store.inject_write_failures(1, 3);
    *api.plane.fail_remove_with.lock().unwrap() = Some("control thread busy".into());
    let r = api.create(new_gateway("stuck-live", "10.82.0.0/16")).await;
    assert_error(&r, StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    *api.plane.fail_remove_with.lock().unwrap() = None;
    api.store.inject_write_failures(0, 0);
    let live = api.store.live().unwrap().into_iter().find(|g| g.name == "stuck-live").expect("the record stayed");
    assert_eq!(live.status, Status::Creating);
    assert!(api.plane.tunnel(&live.id).is_some());
    wgxdp_control::api::changes::replay(&api.state).unwrap();
    assert_eq!(api.store.get(&live.id).unwrap().unwrap().status, Status::Active);

    // A delete whose data-plane removal fails leaves the gateway active, tunnel and all.
    *api.plane.fail_remove_with.lock().unwrap() = Some("control thread busy".into());
    let r = api.call(Method::DELETE, &format!("/api/v1/vpn-gateways/{retried}"), None).await;
    assert_error(&r, StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    assert_eq!(api.store.get(&retried).unwrap().unwrap().status, Status::Active);
    assert!(api.plane.tunnel(&retried).is_some());
    *api.plane.fail_remove_with.lock().unwrap() = None;

    // A delete whose final write fails: no tunnel, `deleting`, finished by the next start.
    api.store.inject_write_failures(1, u32::MAX);
    let r = api.call(Method::DELETE, &format!("/api/v1/vpn-gateways/{retried}"), None).await;
    assert_error(&r, StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    assert_eq!(api.store.get(&retried).unwrap().unwrap().status, Status::Deleting);
    assert!(api.plane.tunnel(&retried).is_none());
    assert_eq!(events_of(&api.store, &retried), ["gateway.created"], "the failed delete recorded nothing");
    api.store.inject_write_failures(0, 0);
    wgxdp_control::api::changes::replay(&api.state).unwrap();
    assert_eq!(api.store.get(&retried).unwrap().unwrap().status, Status::Deleted);
    assert_eq!(events_of(&api.store, &retried), ["gateway.created", "gateway.deleted"]);

    // An update the data plane refuses changes nothing, and records no event.
    let before = api.plane.tunnel(&stuck.id).unwrap();
    *api.plane.fail_with.lock().unwrap() = Some("refused".into());
    let uri = format!("/api/v1/vpn-gateways/{}", stuck.id);
    let r = api.call(Method::PATCH, &uri, Some(json!({"name": "renamed"}))).await;
    assert_error(&r, StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    *api.plane.fail_with.lock().unwrap() = None;
    assert_eq!(api.store.get(&stuck.id).unwrap().unwrap().name, "stuck");
    // One the store cannot record (every retry fails): the tunnel goes back.
    api.store.inject_write_failures(0, u32::MAX);
    let r = api.call(Method::PATCH, &uri, Some(json!({"remote_network_cidr": "10.83.0.0/16"}))).await;
    assert_error(&r, StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    api.store.inject_write_failures(0, 0);
    assert_eq!(api.plane.tunnel(&stuck.id).unwrap(), before, "the data plane runs what the record says");
    assert_eq!(api.store.get(&stuck.id).unwrap().unwrap().remote_network_cidr.to_string(), "10.81.0.0/16");
    assert_eq!(events_of(&api.store, &stuck.id), ["gateway.created"], "no event for a change not made");
    // A write that fails once is retried: the change lands, with its event.
    api.store.inject_write_failures(0, 1);
    let r = api.call(Method::PATCH, &uri, Some(json!({"name": "renamed"}))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(events_of(&api.store, &stuck.id), ["gateway.created", "gateway.updated"]);
}

/// The routes the router serves (method, OpenAPI path).
const ROUTES: [(&str, &str); 24] = [
    ("get", "/api/v1/vpn-gateways"),
    ("get", "/api/v1/nodes"),
    ("post", "/api/v1/vpn-gateways"),
    ("post", "/api/v1/vpn-gateways/import"),
    ("post", "/api/v1/keypairs"),
    ("get", "/api/v1/backup"),
    ("post", "/api/v1/restore"),
    ("get", "/api/v1/vpn-gateways/{id}"),
    ("patch", "/api/v1/vpn-gateways/{id}"),
    ("delete", "/api/v1/vpn-gateways/{id}"),
    ("get", "/api/v1/vpn-gateways/{id}/status"),
    ("get", "/api/v1/vpn-gateways/{id}/config"),
    ("get", "/api/v1/audit-log"),
    ("get", "/api/v1/events"),
    ("get", "/api/v1/events/history"),
    ("get", "/api/v1/webhooks"),
    ("post", "/api/v1/webhooks"),
    ("get", "/api/v1/webhooks/{id}"),
    ("delete", "/api/v1/webhooks/{id}"),
    ("get", "/api/v1/webhooks/{id}/deliveries"),
    ("get", "/health"),
    ("get", "/ready"),
    ("get", "/metrics"),
    ("get", "/api/v1/openapi.json"),
];

#[tokio::test]
async fn openapi_document_validates_and_covers_every_route() {
    let api = Api::new(1000);
    let r = api.call_as(None, Method::GET, "/api/v1/openapi.json", None).await;
    assert_eq!(r.status, StatusCode::OK);
    let doc: openapiv3::OpenAPI = serde_json::from_value(r.body.clone()).expect("a valid OpenAPI 3.0 document");
    assert!(doc.openapi.starts_with("3."));
    let mut documented = HashSet::new();
    for (path, item) in &doc.paths.paths {
        let item = item.as_item().expect("inline path item");
        for (method, op) in item.iter() {
            documented.insert((method.to_owned(), path.clone()));
            assert!(!op.responses.responses.is_empty(), "{method} {path} documents its responses");
            // The router really serves it: not an unknown route, not a wrong method.
            let uri = path.replace("{id}", "vpn_doc");
            let m = Method::from_bytes(method.to_uppercase().as_bytes()).unwrap();
            if path == "/api/v1/events" {
                // An endless stream: its answer's start only.
                let (status, _) = open_stream(&api, &api.key, &uri, &[]).await;
                assert_eq!(status, StatusCode::OK);
                continue;
            }
            let body = matches!(method, "post" | "patch").then(|| json!({}));
            let reply = api.call(m, &uri, body).await;
            assert_ne!(reply.status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
            assert!(
                reply.text != "{\"error\":{\"code\":\"not_found\",\"message\":\"no such endpoint\"}}",
                "{method} {path}"
            );
        }
    }
    let expected: HashSet<(String, String)> = ROUTES.iter().map(|(m, p)| ((*m).to_owned(), (*p).to_owned())).collect();
    assert_eq!(documented, expected, "the document lists exactly the served routes");
    // Every schema reference resolves.
    let schemas = &doc.components.as_ref().expect("components").schemas;
    let text = r.body.to_string();
    for part in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
        let name = part.split('"').next().unwrap();
        assert!(schemas.contains_key(name), "dangling $ref to {name}");
    }
    assert!(doc.components.unwrap().security_schemes.contains_key("bearer"));
}

#[tokio::test]
async fn a_read_key_cannot_write_and_the_audit_log_shows_every_mutation() {
    let api = Api::new(1000);
    let (reader, read_key) = api.store.create_api_key("dashboards", Scope::Read).unwrap();
    let read_key = read_key.expose().to_owned();
    let created = api.create(new_gateway("audited", "10.7.0.0/16")).await;
    let id = id_of(&created);
    let uri = gateway_uri(&id);
    let bad = api.call(Method::PATCH, &uri, Some(json!({"remote_peer_port": 0}))).await;
    assert_error(&bad, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    // The read key reads everything but the audit log, and writes nothing.
    for path in ["/api/v1/vpn-gateways", uri.as_str(), &format!("{uri}/status"), &format!("{uri}/config")] {
        assert_eq!(api.call_as(Some(&read_key), Method::GET, path, None).await.status, StatusCode::OK, "{path}");
    }
    let r = api.call_as(Some(&read_key), Method::GET, "/api/v1/audit-log", None).await;
    assert_error(&r, StatusCode::FORBIDDEN, "forbidden");
    let r = api
        .call_as(Some(&read_key), Method::POST, "/api/v1/vpn-gateways", Some(new_gateway("x-y", "10.8.0.0/16")))
        .await;
    assert_error(&r, StatusCode::FORBIDDEN, "forbidden");
    let r = api.call_as(Some(&read_key), Method::PATCH, &uri, Some(json!({"name": "taken-over"}))).await;
    assert_error(&r, StatusCode::FORBIDDEN, "forbidden");
    let r = api.call_as(Some(&read_key), Method::DELETE, &uri, None).await;
    assert_error(&r, StatusCode::FORBIDDEN, "forbidden");
    assert_eq!(api.store.live().unwrap().len(), 1, "nothing the read key asked for happened");
    assert_eq!(api.store.get(&id).unwrap().unwrap().name, "audited");
    assert_eq!(api.call(Method::DELETE, &uri, None).await.status, StatusCode::OK);
    // Every mutation, newest first, with who, what, on what, and how it ended.
    let log = api.call(Method::GET, "/api/v1/audit-log", None).await;
    assert_eq!(log.status, StatusCode::OK, "{}", log.text);
    let admin = api.store.list_api_keys().unwrap().into_iter().find(|k| k.name == "test").unwrap().id;
    let seen: Vec<(String, String, Value, u64, String, Value)> = log.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["key_id"].as_str().unwrap().to_owned(),
                e["action"].as_str().unwrap().to_owned(),
                e["target"].clone(),
                e["status"].as_u64().unwrap(),
                e["outcome"].as_str().unwrap().to_owned(),
                e["error_code"].clone(),
            )
        })
        .collect();
    let row = |key: &str, action: &str, target: Value, status: u64, error: Value| {
        let outcome = if error.is_null() { "succeeded" } else { "failed" };
        (key.to_owned(), action.to_owned(), target, status, outcome.to_owned(), error)
    };
    let target = json!(id);
    assert_eq!(
        seen,
        vec![
            row(&admin, "gateway.delete", target.clone(), 200, Value::Null),
            row(&reader.id, "gateway.delete", target.clone(), 403, json!("forbidden")),
            row(&reader.id, "gateway.update", target.clone(), 403, json!("forbidden")),
            row(&reader.id, "gateway.create", Value::Null, 403, json!("forbidden")),
            row(&admin, "gateway.update", target.clone(), 422, json!("validation_failed")),
            row(&admin, "gateway.create", target, 201, Value::Null),
        ]
    );
    // Pages: older entries after `before`.
    let page = api.call(Method::GET, "/api/v1/audit-log?limit=4", None).await.body;
    assert_eq!(page["data"].as_array().unwrap().len(), 4);
    let before = page["meta"]["next_before"].as_i64().unwrap();
    let rest = api.call(Method::GET, &format!("/api/v1/audit-log?limit=4&before={before}"), None).await.body;
    assert_eq!(rest["data"].as_array().unwrap().len(), 2);
    assert!(rest["meta"]["next_before"].is_null());
    assert_error(
        &api.call(Method::GET, "/api/v1/audit-log?limit=0", None).await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
}

#[tokio::test]
async fn a_retried_create_returns_the_same_id_and_psk() {
    let api = Api::new(1000);
    let key = api.key.clone();
    let post = |k: &str, idem: &str, body: Value| {
        let (k, idem) = (k.to_owned(), idem.to_owned());
        let api = &api;
        async move {
            api.call_with(&k, Method::POST, "/api/v1/vpn-gateways", &[("idempotency-key", &idem)], Some(body)).await
        }
    };
    let body = new_gateway("retried", "10.7.0.0/16");
    let first = post(&key, "create-1", body.clone()).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.text);
    assert!(first.headers.get("idempotent-replayed").is_none());
    let psk = first.body["data"]["pre_shared_key"].as_str().unwrap().to_owned();
    assert_ne!(psk, "********");
    // The client lost that answer: the retry gets it again, and nothing new happens.
    let again = post(&key, "create-1", body.clone()).await;
    assert_eq!(again.status, StatusCode::CREATED, "{}", again.text);
    assert_eq!(again.headers.get("idempotent-replayed").unwrap(), "true");
    assert_eq!(again.body["data"]["id"], first.body["data"]["id"]);
    assert_eq!(again.body["data"]["pre_shared_key"], psk.as_str(), "the one-time key, once more");
    assert_eq!(again.headers.get(header::LOCATION), first.headers.get(header::LOCATION));
    assert_eq!(api.store.live().unwrap().len(), 1);
    assert_eq!(api.plane.tunnels.lock().unwrap().len(), 1);
    // The same key for another request: refused, nothing created.
    let other = post(&key, "create-1", new_gateway("another", "10.8.0.0/16")).await;
    assert_error(&other, StatusCode::UNPROCESSABLE_ENTITY, "idempotency_key_reused");
    assert_eq!(api.store.live().unwrap().len(), 1);
    // Keys belong to one API key: another may use the same one for its own request.
    let (_, second) = api.store.create_api_key("second-client", Scope::Admin).unwrap();
    let theirs = post(second.expose(), "create-1", new_gateway("theirs", "10.8.0.0/16")).await;
    assert_eq!(theirs.status, StatusCode::CREATED, "{}", theirs.text);
    // A failed request is not stored: its retry (corrected) runs.
    let mut bad = new_gateway("fixed-later", "10.9.0.0/16");
    bad["remote_peer_port"] = json!(0);
    assert_error(&post(&key, "create-2", bad).await, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    let fixed = post(&key, "create-2", new_gateway("fixed-later", "10.9.0.0/16")).await;
    assert_eq!(fixed.status, StatusCode::CREATED, "{}", fixed.text);
    // DELETE: the retry gets the first answer; a malformed key is a 400.
    let uri = gateway_uri(&id_of(&first));
    let del = api.call_with(&key, Method::DELETE, &uri, &[("idempotency-key", "delete-1")], None).await;
    assert_eq!(del.status, StatusCode::OK, "{}", del.text);
    let del2 = api.call_with(&key, Method::DELETE, &uri, &[("idempotency-key", "delete-1")], None).await;
    assert_eq!((del2.status, del2.body.clone()), (StatusCode::OK, del.body.clone()));
    assert_eq!(del2.headers.get("idempotent-replayed").unwrap(), "true");
    let plain = api.call(Method::DELETE, &uri, None).await;
    assert_error(&plain, StatusCode::CONFLICT, "conflict");
    let bad_key = api.call_with(&key, Method::DELETE, &uri, &[("idempotency-key", "has space")], None).await;
    assert_error(&bad_key, StatusCode::BAD_REQUEST, "bad_request");
    // After a restart (the store reopened, a fresh data plane), the retry still gets the first answer.
    let store = Arc::new(Store::open_at(&api.db).unwrap());
    let plane = Arc::new(MemoryPlane::new(PrivateKey::generate().public_key()));
    let state = AppState::new(store.clone(), plane.clone(), settings());
    wgxdp_control::api::changes::replay(&state).unwrap();
    let restarted = app(state);
    let req = Request::builder()
        .method(Method::POST)
        .uri("/api/v1/vpn-gateways")
        .header(header::AUTHORIZATION, format!("Bearer {key}"))
        .header(header::CONTENT_TYPE, "application/json")
        .header("idempotency-key", "create-1")
        .body(Body::from(body.to_string()))
        .unwrap();
    let resp = restarted.oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(resp.headers().get("idempotent-replayed").unwrap(), "true");
    let replayed: Value = serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(replayed["data"]["id"], first.body["data"]["id"]);
    assert_eq!(replayed["data"]["pre_shared_key"], psk.as_str());
    // The audit log tells replays from changes.
    let log = store.audit_log(None, 100).unwrap();
    let creates: Vec<bool> = log
        .iter()
        .filter(|e| e.action == "gateway.create" && e.target.as_deref() == first.body["data"]["id"].as_str())
        .map(|e| e.replayed)
        .collect();
    assert_eq!(creates, [true, true, false], "newest first: the restart's replay, the first replay, the create");
}

fn etag_of(r: &Reply) -> String {
    r.headers.get(header::ETAG).expect("an ETag").to_str().unwrap().to_owned()
}

#[tokio::test]
async fn conditional_writes_with_etag_and_if_match() {
    let api = Api::new(1000);
    let created = api.create(new_gateway("tagged", "10.7.0.0/16")).await;
    let id = id_of(&created);
    let uri = gateway_uri(&id);
    let read = api.call(Method::GET, &uri, None).await;
    let tag = etag_of(&read);
    assert_eq!(etag_of(&created), tag, "the create's tag is the one a read gives");
    assert_eq!(etag_of(&api.call(Method::GET, &uri, None).await), tag, "a read changes nothing");
    // A write with the current tag goes through and makes a new one.
    let r = api.call_if(Method::PATCH, &uri, &tag, Some(json!({"name": "renamed"}))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let newer = etag_of(&r);
    assert_ne!(newer, tag);
    assert_eq!(etag_of(&api.call(Method::GET, &uri, None).await), newer);
    // A stale tag: 412, and nothing changed (store, data plane).
    let r = api.call_if(Method::PATCH, &uri, &tag, Some(json!({"name": "lost-update"}))).await;
    assert_error(&r, StatusCode::PRECONDITION_FAILED, "precondition_failed");
    assert_eq!(api.store.get(&id).unwrap().unwrap().name, "renamed");
    let r = api.call_if(Method::DELETE, &uri, &format!("\"x\", W/{newer}, {tag}"), None).await;
    assert_error(&r, StatusCode::PRECONDITION_FAILED, "precondition_failed");
    assert!(api.plane.tunnel(&id).is_some(), "a refused delete leaves the tunnel");
    // The precondition comes first: a malformed change with a stale tag is a
    // 412, with the current one a 422.
    let r = api.call_if(Method::PATCH, &uri, &tag, Some(json!({"remote_peer_port": 0}))).await;
    assert_error(&r, StatusCode::PRECONDITION_FAILED, "precondition_failed");
    let r = api.call_if(Method::PATCH, &uri, &newer, Some(json!({"remote_peer_port": 0}))).await;
    assert_error(&r, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    // A stale tag is a 412 before anything else about the gateway is looked at.
    let other = id_of(&api.create(new_gateway("neighbour", "10.8.0.0/16")).await);
    let clash = json!({"remote_network_cidr": "10.8.0.0/24"});
    assert_error(
        &api.call_if(Method::PATCH, &uri, &tag, Some(clash.clone())).await,
        StatusCode::PRECONDITION_FAILED,
        "precondition_failed",
    );
    let current = etag_of(&api.call(Method::GET, &uri, None).await);
    assert_error(&api.call_if(Method::PATCH, &uri, &current, Some(clash)).await, StatusCode::CONFLICT, "conflict");
    let _ = other;
    // One of several tags, or `*`.
    let r =
        api.call_if(Method::PATCH, &uri, &format!("{tag}, {newer}"), Some(json!({"persistent_keepalive": 5}))).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = api.call_if(Method::DELETE, &uri, "*", None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(etag_of(&r), etag_of(&api.call(Method::GET, &uri, None).await), "the delete's tag is the stored one");
    assert!(api.plane.tunnel(&id).is_none());
}

/// What the document promises, checked against what the server does (the
/// API fuzzer in `api_fuzz_e2e` checks it at large).
#[tokio::test]
async fn the_document_states_what_the_server_enforces() {
    let api = Api::new(1000);
    let doc = api.call_as(None, Method::GET, "/api/v1/openapi.json", None).await.body;
    let schemas = &doc["components"]["schemas"];
    let create = &schemas["CreateGateway"];
    let required: HashSet<&str> = create["required"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    let wanted = ["name", "region", "tunnel_type", "remote_network_cidr", "remote_peer_ip", "remote_public_key"];
    assert_eq!(required, wanted.into_iter().collect(), "required exactly where the server says `is required`");
    for (field, min, max) in [("remote_peer_port", 1, 65535), ("persistent_keepalive", 0, 65535)] {
        assert_eq!(create["properties"][field]["minimum"], min, "{field}");
        assert_eq!(create["properties"][field]["maximum"], max, "{field}");
    }
    // A port beyond the document's bounds is refused; one inside them is not.
    let mut body = new_gateway("big-port", "10.7.0.0/16");
    body["remote_peer_port"] = json!(2147483646);
    assert_error(&api.create(body).await, StatusCode::BAD_REQUEST, "bad_request");
    // `null` for every optional field is the same as leaving it out.
    let mut body = new_gateway("all-nulls", "10.7.0.0/16");
    for field in [
        "remote_peer_port",
        "pre_shared_key",
        "local_network_cidr",
        "persistent_keepalive",
        "additional_remote_network_cidrs",
        "additional_local_network_cidrs",
        "firewall",
        "firewall_default",
    ] {
        body[field] = Value::Null;
    }
    let r = api.create(body).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.body["data"]["remote_peer_port"], 51820);
    let id = id_of(&r);
    let all_null = json!({"name": null, "remote_network_cidr": null, "remote_peer_ip": null, "remote_peer_port": null,
        "pre_shared_key": null, "persistent_keepalive": null, "additional_remote_network_cidrs": null,
        "additional_local_network_cidrs": null, "firewall": null, "firewall_default": null});
    let r = api.patch(&id, all_null).await;
    assert_eq!((r.status, r.body["data"]["name"].clone()), (StatusCode::OK, json!("all-nulls")), "{}", r.text);
    // Names are kept as given: white space around them is theirs, all-blank is refused.
    let r = api.create(new_gateway(" spaced ", "10.8.0.0/16")).await;
    assert_eq!(r.body["data"]["name"], " spaced ", "{}", r.text);
    assert_error(
        &api.create(new_gateway("  ", "10.9.0.0/16")).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
    );
    // A key with white space around it is not the documented 44 characters.
    let mut body = new_gateway("padded-key", "10.9.0.0/16");
    body["remote_public_key"] = json!(format!(" {}", PrivateKey::generate().public_key().to_base64()));
    assert_error(&api.create(body).await, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    // Every operation lists the answers it shares with its kind.
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let codes = op["responses"].as_object().unwrap();
            let secured = op.get("security").is_some_and(|s| !s.as_array().unwrap().is_empty());
            for (code, needed) in [
                ("401", secured),
                ("429", secured),
                ("500", secured),
                ("400", op.get("requestBody").is_some()),
                ("413", op.get("requestBody").is_some()),
                ("415", op.get("requestBody").is_some()),
                ("422", op.get("requestBody").is_some()),
            ] {
                assert!(!needed || codes.contains_key(code), "{method} {path} does not list {code}");
            }
        }
    }
    // Without a site CIDR configured, a create must name its local network: the document says so.
    let bare = Api::with(ApiSettings { site_cidr: None, ..settings() });
    let doc_bare = bare.call_as(None, Method::GET, "/api/v1/openapi.json", None).await.body;
    for schema in ["CreateGateway", "ImportGateway"] {
        let required = doc_bare["components"]["schemas"][schema]["required"].as_array().unwrap().clone();
        assert!(required.contains(&json!("local_network_cidr")), "{schema}");
        let local = &doc_bare["components"]["schemas"][schema]["properties"]["local_network_cidr"];
        assert_eq!(local, &json!({"$ref": "#/components/schemas/LocalNetwork"}), "{schema}: required, so not nullable");
    }
    assert!(!create["required"].as_array().unwrap().contains(&json!("local_network_cidr")));
    let r = bare.create(new_gateway("no-local", "10.7.0.0/16")).await;
    assert_error(&r, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    assert_eq!(r.body["error"]["field"], "local_network_cidr");
    // The create links to every operation on the new gateway, by its id.
    let links = doc["paths"]["/api/v1/vpn-gateways"]["post"]["responses"]["201"]["links"].as_object().unwrap();
    let operation_ids: HashSet<&str> = doc["paths"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|item| item.as_object().unwrap().values())
        .filter_map(|op| op["operationId"].as_str())
        .collect();
    assert_eq!(links.len(), 5);
    for (name, link) in links {
        assert!(operation_ids.contains(link["operationId"].as_str().unwrap()), "link {name}");
        assert_eq!(link["parameters"]["id"], "$response.body#/data/id");
    }
}

#[tokio::test]
async fn a_tunnel_cannot_claim_the_sites_own_addresses() {
    let api = Api::with(ApiSettings {
        host_addresses: vec!["192.168.7.1".parse().unwrap(), "fd00:7::1".parse().unwrap()],
        ..settings()
    });
    // site_cidr is 10.50.0.0/24; the request names another local network.
    for (cidr, says) in [
        ("10.50.0.0/24", "site_cidr"),
        ("10.50.0.128/25", "site_cidr"),
        ("10.0.0.0/8", "site_cidr"),
        ("0.0.0.0/1", "this network"),
        ("192.168.7.1/32", "gateway host"),
        ("192.168.0.0/16", "gateway host"),
        ("fd00::/8", "gateway host"),
        ("127.0.0.0/8", "loopback"),
        ("fe80::/10", "link-local"),
        ("224.0.0.0/4", "multicast"),
        ("0.0.0.0/0", "default route"),
        ("::/0", "default route"),
    ] {
        let mut body = new_gateway("claim", cidr);
        body["local_network_cidr"] = json!("172.16.0.0/24");
        let r = api.create(body).await;
        let (status, code) = refusal_for(says);
        assert_error(&r, status, code);
        assert_eq!(r.body["error"]["field"], "remote_network_cidr", "{cidr}");
        assert!(r.text.contains(says), "{cidr}: {}", r.text);
    }
    assert!(api.plane.tunnels.lock().unwrap().is_empty(), "nothing reached the data plane");
    // PATCH cannot move a tunnel onto them either.
    let r = api.create(new_gateway("fine", "10.60.0.0/16")).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let id = r.body["data"]["id"].as_str().unwrap().to_owned();
    for (cidr, says) in [("10.50.0.7/32", "site_cidr"), ("192.168.7.0/24", "gateway host"), ("0.0.0.0/0", "default")] {
        let r = api.patch(&id, json!({"remote_network_cidr": cidr})).await;
        let (status, code) = refusal_for(says);
        assert_error(&r, status, code);
        assert_eq!(r.body["error"]["field"], "remote_network_cidr", "{cidr}");
    }
    assert_eq!(api.plane.tunnel(&id).unwrap().allowed_ips, vec!["10.60.0.0/16".parse().unwrap()]);
    // A neighbouring network is fine.
    let r = api.create(new_gateway("next-door", "10.50.1.0/24")).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
}

/// The seed-004 example rule, exactly as the seed shows it.
fn seed_rule() -> Value {
    json!({"name":"Allow ICMP","protocol":"icmp","port":"1-65535","source":"0.0.0.0/0","destination":"0.0.0.0/0"})
}

fn gateway_uri(id: &str) -> String {
    format!("/api/v1/vpn-gateways/{id}")
}

fn id_of(r: &Reply) -> String {
    assert!(r.status.is_success(), "{}", r.text);
    r.body["data"]["id"].as_str().unwrap().to_owned()
}

fn prefixes(list: &[&str]) -> Vec<wgxdp_dataplane::table::IpPrefix> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

#[tokio::test]
async fn networks_and_firewall_in_every_view_and_in_the_data_plane() {
    let api = Api::new(1000);
    let mut body = new_gateway("policy-site", "10.1.0.0/16");
    body["additional_remote_network_cidrs"] = json!(["10.2.0.0/16", "fd01::/64"]);
    body["additional_local_network_cidrs"] = json!(["10.51.0.0/24", "fd50::/64"]);
    let ping_gateway = json!({"name":"ping gateway","protocol":"icmp","destination":"10.50.0.1/32","action":"allow"});
    let no_ssh = json!({"name":"no ssh","protocol":"tcp","port":"22","source":"10.1.0.0/16","action":"deny"});
    body["firewall"] = json!([seed_rule(), ping_gateway, no_ssh]);
    body["firewall_default"] = json!("deny");
    let r = api.create(body).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let id = id_of(&r);
    // Normalised as given: the seed rule comes back as sent, plus its (default) action.
    let mut seed_echo = seed_rule();
    seed_echo["action"] = json!("allow");
    let expected_rules = json!([seed_echo, ping_gateway, no_ssh]);
    for r in [
        r,
        api.call(Method::GET, &gateway_uri(&id), None).await,
        api.call(Method::GET, "/api/v1/vpn-gateways", None).await,
    ] {
        let g = if r.body["data"].is_array() { r.body["data"][0].clone() } else { r.body["data"].clone() };
        assert_eq!(g["additional_remote_network_cidrs"], json!(["10.2.0.0/16", "fd01::/64"]), "{}", r.text);
        assert_eq!(g["additional_local_network_cidrs"], json!(["10.51.0.0/24", "fd50::/64"]));
        assert_eq!(g["firewall"], expected_rules);
        assert_eq!(g["firewall_default"], "deny");
    }
    let t = api.plane.tunnel(&id).unwrap();
    assert_eq!(t.allowed_ips, prefixes(&["10.1.0.0/16", "10.2.0.0/16", "fd01::/64"]));
    assert_eq!(t.policy.local_networks, prefixes(&["10.50.0.0/24", "10.51.0.0/24", "fd50::/64"]));
    assert_eq!(t.policy.default_action, wgxdp_dataplane::policy::RuleAction::Deny);
    let names: Vec<&str> = t.policy.rules.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["Allow ICMP", "ping gateway", "no ssh"], "in order");
    // The remote side's configuration routes every local network into the tunnel.
    let r = api.call(Method::GET, &format!("{}/config", gateway_uri(&id)), None).await;
    assert!(r.text.contains("AllowedIPs = 10.50.0.0/24, 10.51.0.0/24, fd50::/64\n"), "{}", r.text);
    // Without them: empty lists, no rules, default allow (always present).
    let r = api.create(new_gateway("plain-site", "10.3.0.0/16")).await;
    let g = &r.body["data"];
    assert_eq!(
        (&g["additional_remote_network_cidrs"], &g["additional_local_network_cidrs"], &g["firewall"]),
        (&json!([]), &json!([]), &json!([]))
    );
    assert_eq!(g["firewall_default"], "allow");
    let t = api.plane.tunnel(&id_of(&r)).unwrap();
    assert_eq!((t.allowed_ips, t.policy.local_networks), (prefixes(&["10.3.0.0/16"]), prefixes(&["10.50.0.0/24"])));
    assert!(t.policy.rules.is_empty());
}

#[tokio::test]
async fn firewall_and_network_errors_name_the_field() {
    let api = Api::with(ApiSettings { host_addresses: vec!["192.168.7.1".parse().unwrap()], ..settings() });
    let rule = |extra: Value| {
        let mut r = json!({"name": "r", "protocol": "tcp"});
        for (k, v) in extra.as_object().unwrap() {
            r[k] = v.clone();
        }
        r
    };
    let too_many_rules: Vec<Value> = (0..257).map(|i| rule(json!({"name": format!("r{i}")}))).collect();
    let too_many_nets: Vec<String> = (0..64).map(|i| format!("10.200.{i}.0/24")).collect();
    let cases: Vec<(&str, Value, &str, &str)> = vec![
        ("firewall", json!([rule(json!({})), {"protocol": "tcp"}]), "firewall[1].name", "required"),
        ("firewall", json!([rule(json!({"name": ""}))]), "firewall[0].name", "1-64"),
        ("firewall", json!([rule(json!({"name": "x".repeat(65)}))]), "firewall[0].name", "1-64"),
        ("firewall", json!([rule(json!({"name": "a\tb"}))]), "firewall[0].name", "control"),
        ("firewall", json!([{"name": "x"}]), "firewall[0].protocol", "tcp, udp, icmp or any"),
        ("firewall", json!([rule(json!({"protocol": "gre"}))]), "firewall[0].protocol", "tcp, udp, icmp or any"),
        ("firewall", json!([rule(json!({})), rule(json!({"port": "0"}))]), "firewall[1].port", "N-M"),
        ("firewall", json!([rule(json!({"port": "22-21"}))]), "firewall[0].port", "above its last"),
        ("firewall", json!([rule(json!({"port": "65536"}))]), "firewall[0].port", "65535"),
        ("firewall", json!([rule(json!({"protocol": "icmp", "port": "22"}))]), "firewall[0].port", "1-65535"),
        ("firewall", json!([rule(json!({"protocol": "any", "port": "80"}))]), "firewall[0].port", "no ports"),
        ("firewall", json!([rule(json!({"source": "10.1.0.1/16"}))]), "firewall[0].source", "10.1.0.0/16"),
        ("firewall", json!([rule(json!({"destination": "10.50.0.0"}))]), "firewall[0].destination", "CIDR"),
        ("firewall", json!([rule(json!({"name": " \u{3000} "}))]), "firewall[0].name", "white space"),
        ("firewall", json!([rule(json!({"action": "reject"}))]), "firewall[0].action", "allow or deny"),
        ("firewall", json!(too_many_rules), "firewall", "at most 256"),
        ("firewall_default", json!("block"), "firewall_default", "allow or deny"),
        ("additional_remote_network_cidrs", json!(["10.2.0.1/16"]), "additional_remote_network_cidrs[0]", "10.2.0.0"),
        (
            "additional_remote_network_cidrs",
            json!(["10.2.0.0/16", "::/0"]),
            "additional_remote_network_cidrs[1]",
            "default route",
        ),
        ("additional_remote_network_cidrs", json!(too_many_nets), "additional_remote_network_cidrs", "at most 63"),
        (
            "additional_remote_network_cidrs",
            json!(["10.7.3.0/24"]),
            "additional_remote_network_cidrs[0]",
            "overlaps 10.7.0.0/16",
        ),
        (
            "additional_remote_network_cidrs",
            json!(["10.2.0.0/16", "10.2.0.0/16"]),
            "additional_remote_network_cidrs[1]",
            "is also",
        ),
        (
            "additional_remote_network_cidrs",
            json!(["10.50.0.0/25"]),
            "additional_remote_network_cidrs[0]",
            "10.50.0.0/24",
        ),
        (
            "additional_remote_network_cidrs",
            json!(["192.168.0.0/16"]),
            "additional_remote_network_cidrs[0]",
            "gateway host",
        ),
        ("additional_local_network_cidrs", json!(["banana"]), "additional_local_network_cidrs[0]", "CIDR"),
        (
            "additional_local_network_cidrs",
            json!(["10.50.0.0/24"]),
            "additional_local_network_cidrs[0]",
            "listed twice",
        ),
        (
            "additional_local_network_cidrs",
            json!(["10.7.128.0/17"]),
            "remote_network_cidr",
            "overlaps the local network 10.7.128.0/17",
        ),
    ];
    for (field, value, expected_field, needle) in cases {
        let mut body = new_gateway("valid-name", "10.7.0.0/16");
        body[field] = value.clone();
        let r = api.create(body).await;
        let (status, code) = refusal_for(needle);
        assert_error(&r, status, code);
        let msg = r.body["error"]["message"].as_str().unwrap();
        assert_eq!(r.body["error"]["field"], expected_field, "{field}={value}: {msg}");
        assert!(msg.contains(needle), "{field}={value}: `{msg}` lacks `{needle}`");
        assert!(msg.starts_with(expected_field), "the message names the field: {msg}");
    }
    // Wrong JSON shapes and unknown keys inside a rule are malformed requests (400), as elsewhere.
    for (field, value) in [
        ("firewall", json!({"name": "x"})),
        ("firewall", json!([rule(json!({"port": 22}))])),
        ("firewall", json!([rule(json!({"ports": "22"}))])),
        ("additional_local_network_cidrs", json!("10.51.0.0/24")),
    ] {
        let mut body = new_gateway("valid-name", "10.7.0.0/16");
        body[field] = value;
        assert_error(&api.create(body).await, StatusCode::BAD_REQUEST, "bad_request");
    }
    assert!(api.store.live().unwrap().is_empty(), "nothing was stored");
    assert!(api.plane.tunnels.lock().unwrap().is_empty(), "nothing reached the data plane");
    // The seed's example is accepted as it is, and so are 256 rules and 63 networks.
    let mut body = new_gateway("seed-rule", "10.7.0.0/16");
    body["firewall"] = json!([seed_rule()]);
    assert_eq!(api.create(body).await.status, StatusCode::CREATED);
    let mut body = new_gateway("at-the-limits", "10.8.0.0/16");
    body["firewall"] = json!(too_many_rules[..256]);
    body["additional_remote_network_cidrs"] = json!(too_many_nets[..63]);
    let r = api.create(body).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    // PATCH: the same checks; a local network overlapping a remote one names the local one.
    let id = id_of(&r);
    for (patch, expected_field, says) in [
        (
            json!({"firewall": [rule(json!({})), rule(json!({"protocol": "icmp", "port": "7"}))]}),
            "firewall[1].port",
            "no ports",
        ),
        (json!({"firewall_default": "Allow"}), "firewall_default", "allow or deny"),
        (
            json!({"additional_local_network_cidrs": ["10.60.0.0/24", "10.8.1.0/24"]}),
            "additional_local_network_cidrs[1]",
            "overlaps",
        ),
        (json!({"additional_remote_network_cidrs": ["10.8.0.0/24"]}), "additional_remote_network_cidrs[0]", "overlaps"),
        (json!({"remote_network_cidr": "10.200.5.0/24"}), "remote_network_cidr", "overlaps"),
        (
            json!({"additional_remote_network_cidrs": ["192.168.7.0/24"]}),
            "additional_remote_network_cidrs[0]",
            "gateway host",
        ),
    ] {
        let r = api.patch(&id, patch.clone()).await;
        let (status, code) = refusal_for(says);
        assert_error(&r, status, code);
        assert_eq!(r.body["error"]["field"], expected_field, "{patch}: {}", r.text);
    }
    assert_eq!(api.plane.tunnel(&id).unwrap().policy.rules.len(), 256, "a refused change changes nothing");
}

/// The data plane steers a bounded number of remote networks per address
/// family (its XDP map): past it, a create, a change or a restore is a 409
/// that says so, counting every peer; a deleted gateway's networks free room.
#[tokio::test]
async fn remote_networks_beyond_what_the_data_plane_steers_are_refused() {
    let static_key = PrivateKey::generate().public_key();
    let api = Api::with(ApiSettings {
        static_peers: vec![StaticPeer { public_key: static_key, allowed_ips: vec!["10.30.0.0/16".parse().unwrap()] }],
        max_remote_networks: 3,
        ..settings()
    });
    let mut a = new_gateway("site-a", "10.10.0.0/16");
    a["additional_remote_network_cidrs"] = json!(["fd11::/64"]);
    let a = id_of(&api.create(a).await);
    let b = id_of(&api.create(new_gateway("site-b", "10.11.0.0/16")).await);
    // Three IPv4 networks in use (one of them the configuration file's).
    let r = api.create(new_gateway("site-c", "10.12.0.0/16")).await;
    assert_error(&r, StatusCode::CONFLICT, "conflict");
    assert!(r.text.contains("at most 3 IPv4 remote networks") && r.text.contains("3 are in use"), "{}", r.text);
    // Changing a gateway's networks within its own share is fine; growing it is not.
    let r = api.patch(&b, json!({"remote_network_cidr": "10.13.0.0/16"})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = api.patch(&b, json!({"additional_remote_network_cidrs": ["10.14.0.0/16"]})).await;
    assert_error(&r, StatusCode::CONFLICT, "conflict");
    // IPv6 has room of its own.
    let r = api.patch(&a, json!({"additional_remote_network_cidrs": ["fd11::/64", "fd12::/64"]})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    // A restore counts the backup's gateways together.
    let backup = api.call(Method::GET, "/api/v1/backup?include_secrets=true", None).await;
    assert_eq!(backup.status, StatusCode::OK, "{}", backup.text);
    assert_eq!(api.call(Method::DELETE, &gateway_uri(&b), None).await.status, StatusCode::OK);
    let r = api.create(new_gateway("site-d", "10.15.0.0/16")).await;
    assert_eq!(r.status, StatusCode::CREATED, "the deleted gateway's network freed room: {}", r.text);
    let r = api.call(Method::POST, "/api/v1/restore", Some(backup.body.clone())).await;
    assert_error(&r, StatusCode::CONFLICT, "conflict");
    assert!(r.text.contains("at most 3 IPv4 remote networks"), "{}", r.text);
}

#[tokio::test]
async fn remote_networks_may_not_overlap_across_gateways() {
    let static_key = PrivateKey::generate().public_key();
    let api = Api::with(ApiSettings {
        static_peers: vec![StaticPeer { public_key: static_key, allowed_ips: vec!["10.30.0.0/16".parse().unwrap()] }],
        ..settings()
    });
    let mut a = new_gateway("site-a", "10.10.0.0/16");
    a["additional_remote_network_cidrs"] = json!(["10.11.0.0/16", "fd11::/64"]);
    let a = id_of(&api.create(a).await);
    for (remote, additional, says) in [
        ("10.12.0.0/16", json!(["10.11.5.0/24"]), "additional_remote_network_cidrs[0] 10.11.5.0/24 overlaps"),
        ("10.11.0.0/24", json!([]), "remote_network_cidr 10.11.0.0/24 overlaps the remote network 10.11.0.0/16"),
        ("10.12.0.0/16", json!(["fd11::1/128"]), "fd11::/64"),
        ("10.12.0.0/16", json!(["10.30.1.0/24"]), "configuration file"),
    ] {
        let mut b = new_gateway("site-b", remote);
        b["additional_remote_network_cidrs"] = additional;
        let r = api.create(b).await;
        assert_error(&r, StatusCode::CONFLICT, "conflict");
        let msg = r.body["error"]["message"].as_str().unwrap();
        assert!(msg.contains(says), "`{msg}` lacks `{says}`");
        if !says.contains("configuration") {
            assert!(msg.contains(&a), "names the gateway it overlaps: {msg}");
        }
    }
    let mut b = new_gateway("site-b", "10.12.0.0/16");
    b["additional_remote_network_cidrs"] = json!(["10.13.0.0/16"]);
    let b = id_of(&api.create(b).await);
    // PATCH cannot move either gateway onto the other's networks.
    for (id, patch) in [
        (&b, json!({"additional_remote_network_cidrs": ["10.10.128.0/17"]})),
        (&b, json!({"remote_network_cidr": "fd11::/80"})),
        (&a, json!({"remote_network_cidr": "10.13.0.0/24"})),
        (&a, json!({"additional_remote_network_cidrs": ["10.12.0.0/16"]})),
        (&a, json!({"additional_remote_network_cidrs": ["10.30.0.0/24"]})),
    ] {
        let r = api.patch(id, patch.clone()).await;
        assert_error(&r, StatusCode::CONFLICT, "conflict");
    }
    // A gateway may rearrange its own networks, and a deleted one frees them.
    let r = api.patch(&a, json!({"additional_remote_network_cidrs": ["10.10.0.0/16"]})).await;
    assert_error(&r, StatusCode::CONFLICT, "conflict");
    let r = api
        .patch(&a, json!({"remote_network_cidr": "10.11.0.0/16", "additional_remote_network_cidrs": ["10.10.0.0/16"]}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(api.plane.tunnel(&a).unwrap().allowed_ips, prefixes(&["10.11.0.0/16", "10.10.0.0/16"]));
    assert_eq!(api.call(Method::DELETE, &gateway_uri(&a), None).await.status, StatusCode::OK);
    let mut c = new_gateway("site-c", "10.14.0.0/16");
    c["additional_remote_network_cidrs"] = json!(["10.10.0.0/16", "10.11.0.0/16"]);
    assert_eq!(api.create(c).await.status, StatusCode::CREATED);
}

#[tokio::test]
async fn patch_replaces_the_rules_on_the_running_tunnel_and_they_survive_a_restart() {
    let api = Api::new(1000);
    let mut body = new_gateway("patched", "10.1.0.0/16");
    body["firewall"] = json!([seed_rule()]);
    body["additional_local_network_cidrs"] = json!(["10.51.0.0/24"]);
    let id = id_of(&api.create(body).await);
    let before = api.plane.tunnel(&id).unwrap();
    // Only the name: rules and networks stay.
    let r = api.patch(&id, json!({"name": "renamed"})).await;
    assert_eq!(r.body["data"]["firewall"][0]["name"], "Allow ICMP", "{}", r.text);
    assert_eq!(api.plane.tunnel(&id).unwrap(), before);
    // The whole list is replaced, in the new order, and the default changes.
    let rules = json!([
        {"name": "web", "protocol": "tcp", "port": "443", "destination": "10.50.0.10/32"},
        {"name": "rest", "protocol": "any", "action": "deny"}
    ]);
    let r = api
        .patch(&id, json!({"firewall": rules, "firewall_default": "deny", "additional_local_network_cidrs": []}))
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(
        r.body["data"]["firewall"][0],
        json!({"name":"web","protocol":"tcp","port":"443","destination":"10.50.0.10/32","action":"allow"})
    );
    assert_eq!(r.body["data"]["firewall"][1], json!({"name":"rest","protocol":"any","action":"deny"}));
    assert_eq!(r.body["data"]["firewall_default"], "deny");
    assert_eq!(r.body["data"]["additional_local_network_cidrs"], json!([]));
    let t = api.plane.tunnel(&id).unwrap();
    let names: Vec<&str> = t.policy.rules.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["web", "rest"]);
    assert_eq!(t.policy.local_networks, prefixes(&["10.50.0.0/24"]));
    assert_eq!((t.public_key, t.allowed_ips.clone()), (before.public_key, before.allowed_ips.clone()));
    // A data plane that refuses the new rules: 503, and the record keeps the old ones.
    *api.plane.fail_with.lock().unwrap() = Some("control thread busy".into());
    let r = api.patch(&id, json!({"firewall": []})).await;
    assert_error(&r, StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    *api.plane.fail_with.lock().unwrap() = None;
    assert_eq!(api.store.get(&id).unwrap().unwrap().firewall.len(), 2);
    // A restart: the store reopened and replayed into a fresh data plane.
    let expected = api.plane.tunnel(&id).unwrap();
    let store = Arc::new(Store::open_at(&api.db).unwrap());
    let plane = Arc::new(MemoryPlane::new(PrivateKey::generate().public_key()));
    let restarted = AppState::new(store.clone(), plane.clone(), settings());
    assert_eq!(wgxdp_control::api::changes::replay(&restarted).unwrap(), 1);
    assert_eq!(plane.tunnel(&id).unwrap(), expected, "the same tunnel, rules and networks after a restart");
    let record = store.get(&id).unwrap().unwrap();
    assert_eq!(record.firewall_default, wgxdp_dataplane::policy::RuleAction::Deny);
    // An empty list clears every rule.
    let r = api.patch(&id, json!({"firewall": []})).await;
    assert_eq!(r.body["data"]["firewall"], json!([]), "{}", r.text);
    assert!(api.plane.tunnel(&id).unwrap().policy.rules.is_empty());
}

/// A row edited by hand into something that does not decode: the restart
/// logs it and starts every other tunnel; the row itself stays as it was.
#[tokio::test]
async fn a_restart_starts_every_tunnel_but_one_whose_stored_row_does_not_decode() {
    let api = Api::new(1000);
    let good = id_of(&api.create(new_gateway("good", "10.1.0.0/16")).await);
    let broken = id_of(&api.create(new_gateway("broken", "10.2.0.0/16")).await);
    for (column, value) in [("remote_peer_ip", "192.0.2.300"), ("pre_shared_key", "not a key")] {
        edit_by_hand(&api.db, &format!("UPDATE gateways SET {column} = '{value}' WHERE id = '{broken}'"));
        let store = Arc::new(Store::open_at(&api.db).unwrap());
        let err = store.get(&broken).unwrap_err().to_string();
        assert!(err.contains(&broken) && err.contains(column), "{err}");
        let plane = Arc::new(MemoryPlane::new(PrivateKey::generate().public_key()));
        let restarted = AppState::new(store.clone(), plane.clone(), settings());
        assert_eq!(wgxdp_control::api::changes::replay(&restarted).unwrap(), 1, "{column}");
        assert!(plane.tunnel(&good).is_some() && plane.tunnel(&broken).is_none(), "{column}");
        // Still held against new gateways: its networks and key stay taken.
        assert_eq!(store.remote_overlap(&"10.2.3.0/24".parse().unwrap(), None).map(|h| h.0), Some(broken.clone()));
        let original = api.store.get(&good).unwrap().unwrap();
        let psk = original.pre_shared_key.to_base64_secret();
        edit_by_hand(
            &api.db,
            &format!(
                "UPDATE gateways SET remote_peer_ip = '192.0.2.1', pre_shared_key = '{}' WHERE id = '{broken}'",
                *psk
            ),
        );
    }
}

#[tokio::test]
async fn status_counts_hits_per_rule_and_metrics_escape_the_names() {
    let api = Api::new(1000);
    let mut body = new_gateway("counted", "10.1.0.0/16");
    body["firewall"] = json!([
        {"name": "ssh", "protocol": "tcp", "port": "22"},
        {"name": "say \"hi\" \\ back", "protocol": "icmp"}
    ]);
    let id = id_of(&api.create(body).await);
    let plain = id_of(&api.create(new_gateway("no-rules", "10.2.0.0/16")).await);
    let status = |hits: Vec<u64>| TunnelStatus { rule_hits: hits, ..TunnelStatus::default() };
    api.plane.statuses.lock().unwrap().insert(id.clone(), status(vec![5, 7]));
    let r = api.call(Method::GET, &format!("{}/status", gateway_uri(&id)), None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(
        r.body["data"]["firewall_hits"],
        json!([{"name": "ssh", "hits": 5}, {"name": "say \"hi\" \\ back", "hits": 7}]),
        "{}",
        r.text
    );
    let r = api.call(Method::GET, &format!("{}/status", gateway_uri(&plain)), None).await;
    assert_eq!(r.body["data"]["firewall_hits"], json!([]));
    let before = api.store.queries();
    let r = api.call_as(None, Method::GET, "/metrics", None).await;
    assert_eq!(api.store.queries(), before, "a scrape must not query the store");
    assert!(r.text.contains("# TYPE wgxdp_firewall_rule_hits_total counter\n"), "{}", r.text);
    assert!(
        r.text.contains(&format!("wgxdp_firewall_rule_hits_total{{gateway=\"{id}\",rule=\"0\",name=\"ssh\"}} 5\n")),
        "{}",
        r.text
    );
    let escaped =
        format!("wgxdp_firewall_rule_hits_total{{gateway=\"{id}\",rule=\"1\",name=\"say \\\"hi\\\" \\\\ back\"}} 7\n");
    assert!(r.text.contains(&escaped), "{escaped} in\n{}", r.text);
    assert!(!r.text.contains(&plain), "a gateway without rules has no rule counters");
    // New rules: their counters start from zero (the data plane restarts them).
    let r = api.patch(&id, json!({"firewall": [{"name": "only", "protocol": "any"}]})).await;
    assert_eq!(r.status, StatusCode::OK);
    api.plane.statuses.lock().unwrap().insert(id.clone(), status(Vec::new()));
    let r = api.call(Method::GET, &format!("{}/status", gateway_uri(&id)), None).await;
    assert_eq!(r.body["data"]["firewall_hits"], json!([{"name": "only", "hits": 0}]));
}

#[tokio::test]
async fn openapi_documents_the_firewall() {
    let api = Api::new(1000);
    let doc = api.call_as(None, Method::GET, "/api/v1/openapi.json", None).await.body;
    let schemas = &doc["components"]["schemas"];
    let create = &schemas["CreateGateway"]["properties"];
    assert_eq!(create["firewall"]["maxItems"], wgxdp_dataplane::policy::MAX_RULES);
    let max_extra = wgxdp_dataplane::policy::MAX_NETWORKS - 1;
    assert_eq!(create["additional_remote_network_cidrs"]["maxItems"], max_extra);
    assert_eq!(create["additional_local_network_cidrs"]["maxItems"], max_extra);
    assert_eq!(schemas["UpdateGateway"]["properties"]["firewall"]["maxItems"], wgxdp_dataplane::policy::MAX_RULES);
    let description = create["firewall"]["description"].as_str().unwrap();
    for says in ["in order", "first rule that matches", "replies to connections", "that one address", "10.50.0.1/32"] {
        assert!(description.contains(says), "`{description}` lacks `{says}`");
    }
    assert_eq!(schemas["FirewallAction"]["enum"], json!(["allow", "deny"]));
    // Two shapes: ports on tcp/udp rules only (icmp/any: none but the full range).
    let shapes = schemas["FirewallRuleText"]["anyOf"].as_array().unwrap();
    let protocols: Vec<_> = shapes.iter().map(|s| s["properties"]["protocol"]["enum"].clone()).collect();
    assert_eq!(protocols, vec![json!(["tcp", "udp"]), json!(["icmp", "any"])]);
    for shape in shapes {
        assert_eq!(shape["required"], json!(["name", "protocol"]));
        assert_eq!(shape["additionalProperties"], json!(false));
    }
    assert_eq!(shapes[1]["properties"]["port"]["allOf"][0]["enum"], json!(["1-65535"]));
    assert_eq!(schemas["RuleName"]["maxLength"], wgxdp_dataplane::policy::MAX_RULE_NAME);
    assert_eq!(schemas["PortRange"]["format"], "port-range");
    let view = &schemas["GatewayView"]["required"];
    for field in ["additional_remote_network_cidrs", "additional_local_network_cidrs", "firewall", "firewall_default"] {
        assert!(view.as_array().unwrap().contains(&json!(field)), "GatewayView always has {field}");
    }
    assert!(schemas["StatusView"]["properties"]["firewall_hits"].is_object());
}

/// One Server-Sent Event: id, type, data.
type Sse = (i64, String, Value);

/// Opens `GET uri` as a stream (with `headers`); the status and the body.
async fn open_stream(api: &Api, key: &str, uri: &str, headers: &[(&str, &str)]) -> (StatusCode, Body) {
    let mut b = Request::builder().method(Method::GET).uri(uri).header(header::AUTHORIZATION, format!("Bearer {key}"));
    for (name, value) in headers {
        b = b.header(*name, *value);
    }
    let resp = api.router.clone().oneshot(b.body(Body::empty()).unwrap()).await.unwrap();
    let ctype = resp.headers().get(header::CONTENT_TYPE).map(|v| v.to_str().unwrap().to_owned());
    if resp.status() == StatusCode::OK {
        assert_eq!(ctype.as_deref(), Some("text/event-stream"));
    }
    (resp.status(), resp.into_body())
}

/// Reads `n` events from an SSE body (comment lines skipped), failing after 15 s.
async fn read_events(body: &mut Body, pending: &mut String, n: usize) -> Vec<Sse> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while out.len() < n {
        while let Some(end) = pending.find("\n\n") {
            let block: String = pending.drain(..end + 2).collect();
            let (mut id, mut kind, mut data) = (None, None, None);
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id: ") {
                    id = v.parse().ok();
                } else if let Some(v) = line.strip_prefix("event: ") {
                    kind = Some(v.to_owned());
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data = serde_json::from_str(v).ok();
                }
            }
            if let (Some(id), Some(kind), Some(data)) = (id, kind, data) {
                out.push((id, kind, data));
            }
        }
        if out.len() >= n {
            break;
        }
        let frame = tokio::time::timeout_at(deadline, body.frame())
            .await
            .unwrap_or_else(|_| panic!("{} of {n} events in 15 s: {out:?}", out.len()))
            .expect("the stream ended")
            .unwrap();
        if let Ok(data) = frame.into_data() {
            pending.push_str(&String::from_utf8_lossy(&data));
        }
    }
    out
}

/// The types of gateway `id`'s events, oldest first.
fn events_of(store: &Store, id: &str) -> Vec<&'static str> {
    let filter = wgxdp_control::store::EventFilter { gateway_id: Some(id.to_owned()), kind: None };
    store.events_before(None, &filter, 100).unwrap().iter().rev().map(|e| e.kind.as_str()).collect()
}

fn kinds_of(events: &[Sse]) -> Vec<&str> {
    events.iter().map(|(_, k, _)| k.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_stream_in_order_and_resume_after_a_disconnect_without_gaps() {
    let api = Api::new(1000);
    let watch = tokio::spawn(wgxdp_control::api::tunnel_watch::run(api.state.clone()));
    let (_, read_key) = api.store.create_api_key("dashboard", Scope::Read).unwrap();
    let read_key = read_key.expose().to_owned();
    // A read key may follow events.
    let (code, mut stream) = open_stream(&api, &read_key, "/api/v1/events", &[]).await;
    assert_eq!(code, StatusCode::OK);
    let (code, mut ups) = open_stream(&api, &read_key, "/api/v1/events?types=tunnel.up", &[]).await;
    assert_eq!(code, StatusCode::OK);
    let mut pending = String::new();

    let r = api.create(new_gateway("events-a", "10.90.0.0/16")).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let id = id_of(&r);
    // The tunnel shakes hands: the watch sees it within a second.
    api.plane.statuses.lock().unwrap().insert(
        id.clone(),
        TunnelStatus {
            last_handshake: Some(SystemTime::now()),
            endpoint: Some("203.0.113.200:51820".parse().unwrap()),
            ..TunnelStatus::default()
        },
    );
    let first = read_events(&mut stream, &mut pending, 2).await;
    assert_eq!(kinds_of(&first), ["gateway.created", "tunnel.up"]);
    assert_eq!(first[1].0, first[0].0 + 1);
    assert_eq!(first[0].2["gateway_id"], id.as_str());
    assert_eq!(first[0].2["data"]["name"], "events-a");
    assert_eq!(first[0].2["data"]["pre_shared_key"], "********", "no secret in an event");
    assert_eq!(first[1].2["data"]["endpoint"], "203.0.113.200:51820");
    let only_ups = read_events(&mut ups, &mut String::new(), 1).await;
    assert_eq!((only_ups[0].0, only_ups[0].1.as_str()), (first[1].0, "tunnel.up"));

    // The client goes away; meanwhile the gateway changes and is deleted.
    drop(stream);
    let r = api.patch(&id, json!({"name": "events-b"})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = api.call(Method::DELETE, &gateway_uri(&id), None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    // It comes back with the last id it saw: everything since, in order.
    let last = first[1].0.to_string();
    let (code, mut resumed) = open_stream(&api, &read_key, "/api/v1/events", &[("last-event-id", &last)]).await;
    assert_eq!(code, StatusCode::OK);
    let mut pending = String::new();
    let rest = read_events(&mut resumed, &mut pending, 3).await;
    assert_eq!(kinds_of(&rest), ["gateway.updated", "gateway.deleted", "tunnel.down"]);
    let ids: Vec<i64> = rest.iter().map(|e| e.0).collect();
    assert_eq!(ids, [first[1].0 + 1, first[1].0 + 2, first[1].0 + 3], "no gaps");
    assert_eq!(rest[0].2["data"]["name"], "events-b");
    assert_eq!(rest[2].2["data"]["reason"], "deleted");
    // `after` does what the header does.
    let uri = format!("/api/v1/events?after={}&gateway_id={id}", first[0].0);
    let (_, mut from_query) = open_stream(&api, &read_key, &uri, &[]).await;
    let again = read_events(&mut from_query, &mut String::new(), 4).await;
    assert_eq!(kinds_of(&again), ["tunnel.up", "gateway.updated", "gateway.deleted", "tunnel.down"]);

    // The history: newest first, in pages, by gateway and type.
    let h = api.call(Method::GET, &format!("/api/v1/events/history?gateway_id={id}&limit=3"), None).await;
    assert_eq!(h.status, StatusCode::OK, "{}", h.text);
    let types: Vec<&str> = h.body["data"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["tunnel.down", "gateway.deleted", "gateway.updated"]);
    let before = h.body["meta"]["next_before"].as_i64().unwrap();
    let h2 = api.call(Method::GET, &format!("/api/v1/events/history?gateway_id={id}&before={before}"), None).await;
    let types: Vec<&str> = h2.body["data"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!((types, h2.body["meta"]["next_before"].clone()), (vec!["tunnel.up", "gateway.created"], Value::Null));
    let h3 = api.call(Method::GET, "/api/v1/events/history?type=tunnel.up", None).await;
    assert_eq!(h3.body["meta"]["count"], 1);

    // Bad input is a clear 400.
    for (uri, headers) in [
        ("/api/v1/events", &[("last-event-id", "yesterday")][..]),
        ("/api/v1/events?types=tunnel.sideways", &[][..]),
        ("/api/v1/events?after=-1", &[][..]),
    ] {
        let (code, _) = open_stream(&api, &read_key, uri, headers).await;
        assert_eq!(code, StatusCode::BAD_REQUEST, "{uri}");
    }
    let r = api.call(Method::GET, "/api/v1/events/history?type=gateway.*", None).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "bad_request");

    // One key may hold 16 streams (this one holds 3 already); the admin key still gets its own.
    let mut held = Vec::new();
    for _ in 0..13 {
        let (code, body) = open_stream(&api, &read_key, "/api/v1/events", &[]).await;
        assert_eq!(code, StatusCode::OK);
        held.push(body);
    }
    let (code, _) = open_stream(&api, &read_key, "/api/v1/events", &[]).await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
    let admin_key = api.key.clone();
    let (code, mut admin_stream) = open_stream(&api, &admin_key, "/api/v1/events", &[]).await;
    assert_eq!(code, StatusCode::OK);
    held.pop();
    let (code, last) = open_stream(&api, &read_key, "/api/v1/events", &[]).await;
    assert_eq!(code, StatusCode::OK, "a closed stream frees its place");
    held.push(last);
    // The server stops: every stream ends, so a graceful shutdown can finish.
    api.state.events.close();
    for body in held.iter_mut().chain([&mut admin_stream, &mut ups, &mut resumed, &mut from_query]) {
        let end = tokio::time::timeout(Duration::from_secs(5), body.frame()).await.expect("the stream ends");
        assert!(end.is_none(), "no more events once closed");
    }
    assert_eq!(api.state.events.streams(), 0);
    watch.abort();
}

/// A webhook receiver on 127.0.0.1:`port`, answering `answers` in turn.
fn receiver(port: u16, answers: Vec<u16>) -> WebhookReceiver {
    WebhookReceiver::start(std::net::TcpListener::bind(("127.0.0.1", port)).unwrap(), answers)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_get_signed_deliveries_retried_until_the_receiver_is_back_and_after_a_restart() {
    let api = Api::new(1000);
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}/hooks/wgxdp");
    let r = api
        .call(
            Method::POST,
            "/api/v1/webhooks",
            Some(json!({"url": url, "events": ["gateway.created", "gateway.deleted"]})),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let hook = r.body["data"]["id"].as_str().unwrap().to_owned();
    let secret = r.body["data"]["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("whsec_") && secret.len() > 40, "{secret}");
    assert_eq!(r.headers[header::LOCATION], format!("/api/v1/webhooks/{hook}"));
    // The secret is shown once.
    let got = api.call(Method::GET, &format!("/api/v1/webhooks/{hook}"), None).await;
    assert_eq!(got.body["data"]["events"], json!(["gateway.created", "gateway.deleted"]));
    let listed = api.call(Method::GET, "/api/v1/webhooks", None).await;
    assert!(!got.text.contains(&secret) && !listed.text.contains(&secret));
    assert_eq!(listed.body["data"][0]["id"], hook.as_str());
    // Webhooks are for admins.
    let (_, read_key) = api.store.create_api_key("reader", Scope::Read).unwrap();
    let read_key = read_key.expose().to_owned();
    let r = api.call_as(Some(&read_key), Method::GET, "/api/v1/webhooks", None).await;
    assert_error(&r, StatusCode::FORBIDDEN, "forbidden");
    let r = api.call_as(Some(&read_key), Method::POST, "/api/v1/webhooks", Some(json!({"url": url}))).await;
    assert_error(&r, StatusCode::FORBIDDEN, "forbidden");
    let r = api.call(Method::POST, "/api/v1/webhooks", Some(json!({"url": "file:///etc/passwd"}))).await;
    assert_error(&r, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");

    // The receiver is down when the gateway is created.
    let deliverer = tokio::spawn(wgxdp_control::api::webhook_delivery::run(api.state.clone()));
    let r = api.create(new_gateway("hooked", "10.91.0.0/16")).await;
    let id = id_of(&r);
    let log_uri = format!("/api/v1/webhooks/{hook}/deliveries");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let failed = loop {
        let log = api.call(Method::GET, &log_uri, None).await;
        if log.body["data"][0]["attempts"].as_u64() >= Some(1) {
            break log;
        }
        assert!(tokio::time::Instant::now() < deadline, "no attempt: {}", log.text);
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(failed.body["data"][0]["state"], "pending", "{}", failed.text);
    assert!(failed.body["data"][0]["last_error"].as_str().is_some_and(|e| !e.is_empty()), "{}", failed.text);
    assert!(failed.body["data"][0]["next_attempt_at"].is_string());
    // It comes back, answering 503 once: the delivery is retried until a 2xx.
    let back = receiver(port, vec![503]);
    let wait = |r: &WebhookReceiver| {
        tokio::task::block_in_place(|| r.next(Duration::from_secs(30))).expect("a delivery in 30 s")
    };
    let (first, retried) = (wait(&back), wait(&back));
    assert_eq!(first.body, retried.body, "the same delivery, retried after the 503");
    assert_eq!(first.headers["wgxdp-delivery"], retried.headers["wgxdp-delivery"]);
    verify_signature(&retried, &secret).unwrap();
    let mut forged = retried.clone();
    forged.body.push(b' ');
    assert!(verify_signature(&forged, &secret).is_err(), "a changed body does not verify");
    assert!(verify_signature(&retried, "whsec_other").is_err(), "another secret does not verify");
    assert_eq!(retried.headers["wgxdp-event"], "gateway.created");
    assert_eq!(retried.headers["content-type"], "application/json");
    let event = retried.event();
    assert_eq!((event["type"].as_str(), event["gateway_id"].as_str()), (Some("gateway.created"), Some(id.as_str())));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let log = api.call(Method::GET, &log_uri, None).await;
        if log.body["data"][0]["state"] == "delivered" {
            assert!(log.body["data"][0]["attempts"].as_u64().unwrap() >= 3, "{}", log.text);
            assert_eq!(log.body["data"][0]["last_status"], 200);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "not recorded as delivered: {}", log.text);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // An event the webhook did not ask for is not delivered.
    let r = api.patch(&id, json!({"name": "renamed"})).await;
    assert_eq!(r.status, StatusCode::OK);

    // The receiver goes down again, the gateway is deleted, the server stops.
    drop(back);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = api.call(Method::DELETE, &gateway_uri(&id), None).await;
    assert_eq!(r.status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(500)).await;
    deliverer.abort();
    // A new server on the same database, with the receiver back: the
    // outbox still holds the delivery.
    let store = Arc::new(Store::open_at(&api.db).unwrap());
    let plane = Arc::new(MemoryPlane::new(PrivateKey::generate().public_key()));
    let restarted = AppState::new(store.clone(), plane, settings());
    let back = receiver(port, Vec::new());
    let deliverer = tokio::spawn(wgxdp_control::api::webhook_delivery::run(restarted));
    let after = wait(&back);
    verify_signature(&after, &secret).unwrap();
    assert_eq!(after.headers["wgxdp-event"], "gateway.deleted", "only the events asked for, in order");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while store.deliveries(&hook, None, 10).unwrap().iter().any(|d| d.state != DeliveryState::Delivered) {
        assert!(std::time::Instant::now() < deadline, "not recorded as delivered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(back);
    deliverer.abort();
    assert_eq!(store.deliveries(&hook, None, 10).unwrap().len(), 2, "one delivery per event asked for");

    let r = api.call(Method::DELETE, &format!("/api/v1/webhooks/{hook}"), None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let r = api.call(Method::GET, &format!("/api/v1/webhooks/{hook}"), None).await;
    assert_error(&r, StatusCode::NOT_FOUND, "not_found");
    let r = api.call(Method::GET, &log_uri, None).await;
    assert_error(&r, StatusCode::NOT_FOUND, "not_found");
    // The audit log names webhook changes.
    let audit = api.call(Method::GET, "/api/v1/audit-log?limit=500", None).await;
    let actions: Vec<&str> =
        audit.body["data"].as_array().unwrap().iter().map(|e| e["action"].as_str().unwrap()).collect();
    assert!(actions.contains(&"webhook.create") && actions.contains(&"webhook.delete"), "{actions:?}");
}

#[tokio::test]
async fn a_keypair_is_shown_once_and_an_import_takes_a_wg_quick_peer_section() {
    let api = Api::new(1000);
    let key = api.key.clone();
    let (_, read_key) = api.store.create_api_key("dashboards", Scope::Read).unwrap();
    // A keypair: the private key in this answer only, never cached, never replayed.
    let pair = api.call_with(&key, Method::POST, "/api/v1/keypairs", &[("idempotency-key", "kp-1")], None).await;
    assert_eq!(pair.status, StatusCode::CREATED, "{}", pair.text);
    assert_eq!(pair.headers.get(header::CACHE_CONTROL).unwrap(), "no-store");
    let private = pair.body["data"]["private_key"].as_str().unwrap().to_owned();
    let public = pair.body["data"]["public_key"].as_str().unwrap().to_owned();
    assert_eq!(private.parse::<PrivateKey>().unwrap().public_key().to_base64(), public);
    let again = api.call_with(&key, Method::POST, "/api/v1/keypairs", &[("idempotency-key", "kp-1")], None).await;
    assert_eq!(again.status, StatusCode::CREATED);
    assert!(again.headers.get("idempotent-replayed").is_none());
    assert_ne!(again.body["data"]["private_key"], private.as_str(), "a retry makes a new pair, nothing was kept");
    let refused = api.call_as(Some(read_key.expose()), Method::POST, "/api/v1/keypairs", None).await;
    assert_error(&refused, StatusCode::FORBIDDEN, "forbidden");

    // The remote site's [Peer] section, as the site's own wg-quick file would hold it.
    let psk = PresharedKey::generate().to_base64_secret().to_string();
    let section = format!(
        "[Peer]\n# site B\nPublicKey = {public}\nPresharedKey = {psk}\nEndpoint = 203.0.113.9:51900\n\
         AllowedIPs = 10.61.0.0/16, fd61::/64\nAllowedIPs = 10.62.0.0/16\nPersistentKeepalive = 15\n"
    );
    let import = |name: &str, peer: &str| json!({"name": name, "region": "eu-west", "peer": peer});
    let r = api.call(Method::POST, "/api/v1/vpn-gateways/import", Some(import("site-b", &section))).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let id = id_of(&r);
    assert_eq!(r.headers.get(header::LOCATION).unwrap().to_str().unwrap(), gateway_uri(&id));
    let g = &r.body["data"];
    assert_eq!(g["remote_public_key"], public.as_str());
    assert_eq!(g["pre_shared_key"], psk.as_str(), "shown in the 201 as a create shows it");
    assert_eq!((g["remote_peer_ip"].as_str(), g["remote_peer_port"].as_u64()), (Some("203.0.113.9"), Some(51900)));
    assert_eq!(g["remote_network_cidr"], "10.61.0.0/16");
    assert_eq!(g["additional_remote_network_cidrs"], json!(["fd61::/64", "10.62.0.0/16"]));
    assert_eq!(g["local_network_cidr"], "10.50.0.0/24");
    assert_eq!(g["persistent_keepalive"], 15);
    let tunnel = api.plane.tunnels.lock().unwrap().get(&id).cloned().expect("the data plane runs it");
    assert_eq!(tunnel.allowed_ips, prefixes(&["10.61.0.0/16", "fd61::/64", "10.62.0.0/16"]));
    assert_eq!(events_of(&api.store, &id), ["gateway.created"]);
    // The create's rules, in the section's terms: the same peer again clashes.
    let twice = api.call(Method::POST, "/api/v1/vpn-gateways/import", Some(import("site-b2", &section))).await;
    assert_error(&twice, StatusCode::CONFLICT, "conflict");
    let says = twice.body["error"]["message"].as_str().unwrap();
    assert!(says.starts_with("peer.AllowedIPs[0] 10.61.0.0/16 overlaps"), "{says}");
    let moved = section.replace("10.61.0.0/16, fd61::/64", "10.63.0.0/16").replace("10.62.0.0/16", "10.64.0.0/16");
    let same_key = api.call(Method::POST, "/api/v1/vpn-gateways/import", Some(import("site-b2", &moved))).await;
    assert_error(&same_key, StatusCode::CONFLICT, "conflict");
    assert!(same_key.text.contains("already uses this peer.PublicKey"), "{}", same_key.text);
    // An [Interface] is refused by line, its private key never echoed.
    let interface = format!("[Interface]\nPrivateKey = {private}\n{section}");
    let r = api.call(Method::POST, "/api/v1/vpn-gateways/import", Some(import("site-c", &interface))).await;
    assert_error(&r, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    assert_eq!(r.body["error"]["field"], "peer");
    assert!(!r.text.contains(&private) && r.text.contains("line 1"), "{}", r.text);
    let r = api
        .call_as(Some(read_key.expose()), Method::POST, "/api/v1/vpn-gateways/import", Some(import("x-y", &moved)))
        .await;
    assert_error(&r, StatusCode::FORBIDDEN, "forbidden");
    assert_eq!(api.store.live().unwrap().len(), 1);
    // Audited as what they are; the private keys are nowhere on disk.
    let log = api.store.audit_log(None, 100).unwrap();
    let actions: Vec<(&str, u16)> = log.iter().rev().map(|e| (e.action.as_str(), e.status)).collect();
    assert_eq!(
        actions,
        [
            ("keypair.create", 201),
            ("keypair.create", 201),
            ("keypair.create", 403),
            ("gateway.import", 201),
            ("gateway.import", 409),
            ("gateway.import", 409),
            ("gateway.import", 422),
            ("gateway.import", 403),
        ]
    );
    assert_eq!(
        log.iter().find(|e| e.action == "gateway.import" && e.status == 201).unwrap().target.as_deref(),
        Some(id.as_str())
    );
    let second = again.body["data"]["private_key"].as_str().unwrap().to_owned();
    let text = stored_text(&api.db);
    assert!(text.contains(&id), "the dump holds the rows");
    assert!(!text.contains(&private) && !text.contains(&second), "a private key in the database");
}

#[tokio::test]
async fn backup_and_restore_the_whole_configuration() {
    let a = Api::new(1000);
    let (_, read_key) = a.store.create_api_key("dashboards", Scope::Read).unwrap();
    // Two gateways whose firewalls make the backup larger than any other body may be.
    let rules: Vec<Value> = (0..256)
        .map(|i| json!({"name": format!("rule number {i:03} of a long firewall, named for what it is for"), "protocol": "tcp", "port": format!("{}", 1000 + i), "source": "10.7.0.0/16", "action": "deny"}))
        .collect();
    let mut first = new_gateway("site-one", "10.7.0.0/16");
    first["firewall"] = json!(rules);
    first["additional_remote_network_cidrs"] = json!(["fd07::/64"]);
    let one = a.create(first).await;
    let mut second = new_gateway("site-two", "10.8.0.0/16");
    second["firewall"] = json!(rules);
    second["firewall_default"] = json!("deny");
    let two = a.create(second).await;
    let gone = a.create(new_gateway("site-gone", "10.9.0.0/16")).await;
    assert_eq!(a.call(Method::DELETE, &gateway_uri(&id_of(&gone)), None).await.status, StatusCode::OK);
    let hook = a
        .call(Method::POST, "/api/v1/webhooks", Some(json!({"url": "http://192.0.2.1:9/h", "events": ["tunnel.down"]})))
        .await;
    assert_eq!(hook.status, StatusCode::CREATED, "{}", hook.text);
    let (ids, psks) =
        ([id_of(&one), id_of(&two)], [&one.body["data"]["pre_shared_key"], &two.body["data"]["pre_shared_key"]]);

    // Without secrets: an inventory, which no restore takes.
    let plain = a.call(Method::GET, "/api/v1/backup", None).await;
    assert_eq!(plain.status, StatusCode::OK, "{}", plain.text);
    assert_eq!(plain.headers.get(header::CACHE_CONTROL).unwrap(), "no-store");
    assert_eq!((plain.body["format"].as_str(), plain.body["version"].as_u64()), (Some("wgxdp-backup"), Some(1)));
    assert_eq!(plain.body["secrets_included"], false);
    let listed: Vec<&str> =
        plain.body["gateways"].as_array().unwrap().iter().map(|g| g["id"].as_str().unwrap()).collect();
    assert_eq!(listed, ids.iter().map(String::as_str).collect::<Vec<_>>(), "deleted gateways are not configuration");
    for psk in psks {
        assert!(!plain.text.contains(psk.as_str().unwrap()));
    }
    assert!(plain.body["webhooks"][0].get("secret").is_none() && !plain.text.contains("whsec_"));
    for (method, uri) in [(Method::GET, "/api/v1/backup"), (Method::POST, "/api/v1/restore")] {
        let body = (method == Method::POST).then(|| plain.body.clone());
        assert_error(&a.call_as(Some(read_key.expose()), method, uri, body).await, StatusCode::FORBIDDEN, "forbidden");
    }
    // With secrets: everything, and on record.
    let full = a.call(Method::GET, "/api/v1/backup?include_secrets=true", None).await;
    assert_eq!(full.status, StatusCode::OK, "{}", full.text);
    assert!(full.text.len() > 64 * 1024, "larger than an ordinary body ({} bytes)", full.text.len());
    assert_eq!(full.body["gateways"][0]["pre_shared_key"], *psks[0]);
    assert!(full.body["webhooks"][0]["secret"].as_str().unwrap().starts_with("whsec_"));
    let audit = a.store.audit_log(None, 100).unwrap();
    let exported = audit.iter().find(|e| e.action == "config.backup").expect("a backup with secrets is audited");
    assert_eq!(exported.target.as_deref(), Some("with-secrets"));
    assert_error(
        &a.call(Method::GET, "/api/v1/backup?include_secrets=maybe", None).await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );

    // Onto another gateway (another key): the inventory is refused, nothing made.
    let b = Api::new(1000);
    let r = b.call(Method::POST, "/api/v1/restore", Some(plain.body.clone())).await;
    assert_error(&r, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    assert_eq!(r.body["error"]["field"], "gateways[0].pre_shared_key");
    assert!(b.store.live().unwrap().is_empty() && b.store.webhooks().unwrap().is_empty());
    // The full backup: same ids, keys, networks, rules; tunnels running; a warning about the key.
    let r = b.call(Method::POST, "/api/v1/restore", Some(full.body.clone())).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.body["data"]["gateways"]["restored"], json!(ids));
    assert_eq!(r.body["data"]["webhooks"]["restored"], json!([hook.body["data"]["id"]]));
    assert!(
        r.body["data"]["warnings"][0].as_str().unwrap().contains("give the remote sites the new key"),
        "{}",
        r.text
    );
    assert_eq!(b.plane.tunnels.lock().unwrap().len(), 2);
    for id in &ids {
        assert_eq!(events_of(&b.store, id), ["gateway.created"]);
    }
    let restored = b.call(Method::GET, "/api/v1/backup?include_secrets=true", None).await;
    let strip = |mut v: Value| {
        v.as_object_mut().unwrap().retain(|k, _| k != "created_at" && k != "gateway_public_key");
        v
    };
    assert_eq!(strip(restored.body.clone()), strip(full.body.clone()), "a round trip loses nothing");
    let hooks = b.store.webhooks().unwrap();
    assert_eq!(hooks[0].secret.expose(), full.body["webhooks"][0]["secret"].as_str().unwrap());
    // A retry changes nothing.
    let again = b.call(Method::POST, "/api/v1/restore", Some(full.body.clone())).await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.text);
    assert_eq!(again.body["data"]["gateways"]["unchanged"], json!(ids));
    assert_eq!(again.body["data"]["gateways"]["restored"], json!([]));
    assert_eq!(again.body["data"]["webhooks"]["unchanged"].as_array().unwrap().len(), 1);
    // A gateway changed here since: a conflict, nothing touched.
    let renamed = b.call(Method::PATCH, &gateway_uri(&ids[1]), Some(json!({"name": "renamed-here"}))).await;
    assert_eq!(renamed.status, StatusCode::OK);
    let r = b.call(Method::POST, "/api/v1/restore", Some(full.body.clone())).await;
    assert_error(&r, StatusCode::CONFLICT, "conflict");
    assert_eq!(r.body["error"]["field"], "gateways[1].id");
    assert_eq!(b.store.get(&ids[1]).unwrap().unwrap().name, "renamed-here");
    // A gateway deleted here since comes back, with its id.
    assert_eq!(b.call(Method::DELETE, &gateway_uri(&ids[0]), None).await.status, StatusCode::OK);
    assert_eq!(
        b.call(Method::PATCH, &gateway_uri(&ids[1]), Some(json!({"name": "site-two"}))).await.status,
        StatusCode::OK
    );
    let r = b.call(Method::POST, "/api/v1/restore", Some(full.body.clone())).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(
        (r.body["data"]["gateways"]["restored"].clone(), r.body["data"]["gateways"]["unchanged"].clone()),
        (json!([ids[0]]), json!([ids[1]]))
    );
    assert_eq!(b.store.get(&ids[0]).unwrap().unwrap().status, Status::Active);
    assert_eq!(b.plane.tunnels.lock().unwrap().len(), 2);

    // Only what is configured: a gateway being deleted is not.
    b.store.set_status(&ids[1], Status::Deleting).unwrap();
    let now = b.call(Method::GET, "/api/v1/backup", None).await;
    assert_eq!(now.body["gateways"].as_array().unwrap().len(), 1, "{}", now.text);
    b.store.set_status(&ids[1], Status::Active).unwrap();

    // A backup at odds with itself, or with what is here, changes nothing.
    let c = Api::new(1000);
    let mut clash = full.body.clone();
    clash["gateways"][1]["remote_network_cidr"] = json!("10.7.128.0/17");
    let r = c.call(Method::POST, "/api/v1/restore", Some(clash)).await;
    assert_error(&r, StatusCode::CONFLICT, "conflict");
    assert!(r.text.contains("in this backup"), "{}", r.text);
    let mut same_key = full.body.clone();
    same_key["gateways"][1]["remote_public_key"] = full.body["gateways"][0]["remote_public_key"].clone();
    let r = c.call(Method::POST, "/api/v1/restore", Some(same_key)).await;
    assert_error(&r, StatusCode::CONFLICT, "conflict");
    assert_eq!(r.body["error"]["field"], "gateways[1].remote_public_key");
    let here = c.create(new_gateway("already-here", "10.8.1.0/24")).await;
    assert_eq!(here.status, StatusCode::CREATED);
    let r = c.call(Method::POST, "/api/v1/restore", Some(full.body.clone())).await;
    assert_error(&r, StatusCode::CONFLICT, "conflict");
    assert!(r.text.contains("gateways[1]") && r.text.contains("overlaps"), "{}", r.text);
    let mut bad = full.body.clone();
    bad["gateways"][0]["remote_peer_port"] = json!(0);
    let r = c.call(Method::POST, "/api/v1/restore", Some(bad)).await;
    assert_eq!(r.body["error"]["field"], "gateways[0].remote_peer_port", "{}", r.text);
    let mut long_id = full.body.clone();
    long_id["gateways"][0]["id"] = json!(format!("vpn_{}", "x".repeat(5000)));
    let r = c.call(Method::POST, "/api/v1/restore", Some(long_id)).await;
    assert_eq!(r.body["error"]["field"], "gateways[0].id", "{}", r.text);
    assert!(r.text.len() < 1000, "the id is not quoted back: {}", r.text.len());
    // A list longer than its limit is refused while it is read.
    let mut many = full.body.clone();
    many["gateways"][0]["firewall"] = json!(vec![json!({}); 257]);
    let r = c.call(Method::POST, "/api/v1/restore", Some(many)).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "bad_request");
    assert!(r.text.contains("more than 256") && r.text.contains("gateways[0]"), "{}", r.text);
    let mut future = full.body.clone();
    future["version"] = json!(2);
    assert_error(
        &c.call(Method::POST, "/api/v1/restore", Some(future)).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
    );
    assert_eq!(c.store.live().unwrap().len(), 1);
    assert!(c.store.webhooks().unwrap().is_empty());
    let log = c.store.audit_log(None, 100).unwrap();
    assert_eq!(log.iter().filter(|e| e.action == "config.restore").count(), 7);
}

/// A node as `serve` registers it.
fn node(id: &str, region: &str) -> ThisNode {
    ThisNode {
        id: id.into(),
        region: region.into(),
        api: format!("{id}.example:8080"),
        incarnation: wgxdp_control::store::incarnation(),
        started_at: 1_700_000_000_000,
        ..ThisNode::default()
    }
}

/// `GET /nodes` lists every node with its region and liveness. A gateway
/// of a region no live node serves is refused (422), through the API and
/// the restore alike; a region another live node serves is taken.
#[tokio::test]
async fn nodes_are_listed_and_a_region_no_live_node_serves_is_refused() {
    let me = node("gw-eu-1", "eu-west");
    let api = Api::with(ApiSettings { node: me.clone(), mutations_per_minute: 1000, ..settings() });
    api.store.heartbeat(&me).unwrap();
    let everywhere = node("gw-any", EVERY_REGION);
    api.store.heartbeat(&everywhere).unwrap();
    let list = api.call(Method::GET, "/api/v1/nodes", None).await;
    assert_eq!(list.status, StatusCode::OK, "{}", list.text);
    let nodes = list.body["data"].as_array().unwrap();
    assert_eq!(nodes.len(), 2, "{}", list.text);
    assert_eq!(
        (nodes[0]["id"].as_str(), nodes[0]["region"].as_str(), nodes[0]["state"].as_str()),
        (Some("gw-any"), None, Some("live"))
    );
    assert_eq!((nodes[1]["region"].as_str(), nodes[1]["this_node"].as_bool()), (Some("eu-west"), Some(true)));
    assert_eq!(nodes[1]["api"], "gw-eu-1.example:8080");
    assert!(nodes[1]["silent_for_ms"].as_i64().is_some_and(|ms| (0..5_000).contains(&ms)), "{}", list.text);
    // Its own region: created and running here.
    let r = api.create(new_gateway("eu-site", "10.1.0.0/16")).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.body["data"]["status"], "active");
    let list = api.call(Method::GET, "/api/v1/nodes", None).await;
    assert_eq!(list.body["data"][1]["gateways_served"], 1, "{}", list.text);
    // Another region a live node serves (every region): stored for it, not run here.
    let mut us = new_gateway("us-site", "10.2.0.0/16");
    us["region"] = json!("us-east");
    let r = api.create(us.clone()).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    assert_eq!(r.body["data"]["status"], "creating", "nobody ran gw-any's pass: {}", r.text);
    let us_id = r.body["data"]["id"].as_str().unwrap().to_owned();
    assert!(!api.plane.tunnels.lock().unwrap().contains_key(&us_id), "another node's tunnel");
    // That node stops: no live node serves the region, 422.
    api.store.leave(&everywhere).unwrap();
    let mut us2 = new_gateway("us-site-2", "10.3.0.0/16");
    us2["region"] = json!("us-east");
    let r = api.create(us2).await;
    assert_error(&r, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    assert!(r.text.contains("no live node serves region `us-east`"), "{}", r.text);
    let list = api.call(Method::GET, "/api/v1/nodes", None).await;
    assert_eq!(list.body["data"][0]["state"], "lost", "{}", list.text);
    // Its `creating` gateway can still go: nothing runs it, deleted at once.
    let r = api.call(Method::DELETE, &gateway_uri(&us_id), None).await;
    assert_eq!((r.status, r.body["data"]["status"].as_str()), (StatusCode::OK, Some("deleted")), "{}", r.text);
    // A restore of a backup holding a gateway of a region nobody serves: refused whole.
    let backup = api.call(Method::GET, "/api/v1/backup?include_secrets=true", None).await;
    assert_eq!(backup.status, StatusCode::OK, "{}", backup.text);
    let mut body = backup.body.clone();
    let gateways = body["gateways"].as_array_mut().unwrap();
    assert_eq!(gateways.len(), 1, "{}", backup.text);
    gateways[0]["region"] = json!("us-east");
    let fresh = Api::with(ApiSettings { node: me.clone(), mutations_per_minute: 1000, ..settings() });
    let r = fresh.call(Method::POST, "/api/v1/restore", Some(body)).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY, "{}", r.text);
    assert!(r.text.contains("us-east"), "{}", r.text);
    assert!(fresh.store.live().unwrap().is_empty(), "nothing restored");
}

/// A node of a fleet as `serve` runs it: heartbeats, serving passes and
/// the tunnel watch, until dropped (then it stops as a killed node would:
/// silent, its leases left to lapse).
struct FleetNode {
    api: Api,
    stop: Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
    watch: tokio::task::JoinHandle<()>,
}

impl FleetNode {
    fn start(api: Api) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (state, flag) = (api.state.clone(), stop.clone());
        let beats = std::thread::spawn(move || {
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                state.store.heartbeat(&state.settings.node).unwrap();
                std::thread::sleep(Duration::from_millis(300));
            }
        });
        let (state, flag) = (api.state.clone(), stop.clone());
        let serving = std::thread::spawn(move || wgxdp_control::api::serving::run(state, flag));
        let watch = tokio::spawn(wgxdp_control::api::tunnel_watch::run(api.state.clone()));
        Self { api, stop, threads: vec![beats, serving], watch }
    }

    /// Stops as `kill -9` would: no more heartbeats or passes, nothing said.
    fn kill(mut self) -> Api {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads.drain(..) {
            t.join().unwrap();
        }
        self.watch.abort();
        self.api
    }
}

/// Waits (at most 15 s) until `done` holds.
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn fleet_settings(id: &str, region: &str, address: &str) -> ApiSettings {
    let mut node = node(id, region);
    node.public_address = address.into();
    node.listen_port = 51820;
    ApiSettings { node, public_address: address.parse().unwrap(), ..settings() }
}

/// Three nodes on one store, two in eu-west and one in us-east. A gateway
/// created, changed and deleted through us-east's API for eu-west runs on
/// the eu-west node that holds its lease (and only there), each answer
/// given once that node runs the change; the answers show eu-west's side
/// (key, address), the status names the serving node (and, on a shared
/// store, the serving node's published counters). When that node stops,
/// the other eu-west node takes its gateways over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_through_any_node_runs_on_the_node_that_serves_the_gateway() {
    let first = Api::with(fleet_settings("gw-first", "nowhere", "192.0.2.1"));
    let eu1 = FleetNode::start(first.beside(fleet_settings("gw-eu-1", "eu-west", "198.51.100.1")));
    let eu1_key = eu1.api.state.settings.node.public_key.clone();
    let us1 = FleetNode::start(first.beside(fleet_settings("gw-us-1", "us-east", "203.0.113.1")));
    eventually("both nodes heartbeat", || first.store.live_nodes_of("eu-west").unwrap().len() == 1).await;
    eventually("both nodes heartbeat", || first.store.live_nodes_of("us-east").unwrap().len() == 1).await;
    let (us, eu) = (&us1.api, &eu1.api);

    // Created through us-east for eu-west: active once eu-west's node runs it.
    let r = us.create(new_gateway("eu-site", "10.1.0.0/16")).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    let data = &r.body["data"];
    assert_eq!(data["status"], "active", "{}", r.text);
    assert_eq!(
        (data["local_public_key"].as_str(), data["local_ip"].as_str()),
        (Some(eu1_key.as_str()), Some("198.51.100.1"))
    );
    let id = data["id"].as_str().unwrap().to_owned();
    assert!(eu.plane.tunnels.lock().unwrap().contains_key(&id), "running on the serving node");
    assert!(us.plane.tunnels.lock().unwrap().is_empty(), "not on the node that took the request");
    let config = us.call(Method::GET, &format!("{}/config", gateway_uri(&id)), None).await;
    assert!(config.text.contains(&format!("PublicKey = {eu1_key}")), "{}", config.text);
    assert!(config.text.contains("Endpoint = 198.51.100.1:51820"), "{}", config.text);
    let created = first.store.events_after(0, 100).unwrap();
    assert_eq!(created.iter().filter(|e| e.kind.as_str() == "gateway.created").count(), 1, "one event: {created:?}");

    // Its live status through us-east: the serving node, and (shared store) its counters.
    eu.plane
        .statuses
        .lock()
        .unwrap()
        .insert(id.clone(), TunnelStatus { bytes_received: 4242, ..TunnelStatus::default() });
    let status_uri = format!("{}/status", gateway_uri(&id));
    let r = us.call(Method::GET, &status_uri, None).await;
    assert_eq!(r.body["data"]["serving_node"], "gw-eu-1", "{}", r.text);
    if super::POSTGRES {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            let r = us.call(Method::GET, &status_uri, None).await;
            if r.body["data"]["bytes_received"] == 4242 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "never published: {}", r.text);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // Changed through us-east: the serving node runs the change when the answer comes.
    let r = us.patch(&id, json!({"remote_network_cidr": "10.9.0.0/16"})).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let running = eu.plane.tunnels.lock().unwrap().get(&id).cloned().unwrap();
    assert!(running.allowed_ips.contains(&"10.9.0.0/16".parse().unwrap()), "{running:?}");

    // A second eu-west node stands by; the first stops (killed): the second takes over.
    let eu2 = FleetNode::start(first.beside(fleet_settings("gw-eu-2", "eu-west", "198.51.100.1")));
    let r2 = us.create(new_gateway("eu-site-2", "10.2.0.0/16")).await;
    assert_eq!(r2.body["data"]["status"], "active", "{}", r2.text);
    let id2 = r2.body["data"]["id"].as_str().unwrap().to_owned();
    // One node of the region runs it (whichever claimed it first), never both.
    let on = |api: &Api| api.plane.tunnels.lock().unwrap().contains_key(&id2);
    assert!(on(&eu1.api) != on(&eu2.api), "on exactly one node");
    assert!(!on(us), "not on the node that took the request");
    assert!(!eu2.api.plane.tunnels.lock().unwrap().contains_key(&id), "the first gateway stays where it runs");
    let killed = eu1.kill();
    let standby = eu2.api.plane.clone();
    eventually("the standby runs both tunnels", || {
        let t = standby.tunnels.lock().unwrap();
        t.contains_key(&id) && t.contains_key(&id2)
    })
    .await;
    let r = us.call(Method::GET, &status_uri, None).await;
    assert_eq!(r.body["data"]["serving_node"], "gw-eu-2", "{}", r.text);
    let list = us.call(Method::GET, "/api/v1/nodes", None).await;
    let served: Vec<(String, i64)> = list.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["id"].as_str().unwrap().to_owned(), n["gateways_served"].as_i64().unwrap()))
        .collect();
    assert!(served.contains(&("gw-eu-2".into(), 2)), "{served:?}");

    // Deleted through us-east: gone from the serving node when the answer comes.
    let r = us.call(Method::DELETE, &gateway_uri(&id), None).await;
    assert_eq!((r.status, r.body["data"]["status"].as_str()), (StatusCode::OK, Some("deleted")), "{}", r.text);
    assert!(!standby.tunnels.lock().unwrap().contains_key(&id));
    assert!(killed.plane.tunnels.lock().unwrap().contains_key(&id), "the killed node's plane is as it was left");
    drop((eu2.kill(), us1.kill()));
}

/// Ids with a NUL character (which PostgreSQL refuses in text) are simply
/// not found, on either backend; a cursor or a description with one is a
/// clear 400 / 422, never a 500.
#[tokio::test]
async fn nul_characters_are_not_found_or_refused_never_a_server_error() {
    let api = Api::new(1000);
    for uri in ["/api/v1/vpn-gateways/vpn_%00", "/api/v1/webhooks/wh_%00", "/api/v1/webhooks/wh_%00/deliveries"] {
        assert_error(&api.call(Method::GET, uri, None).await, StatusCode::NOT_FOUND, "not_found");
    }
    assert_error(
        &api.call(Method::DELETE, "/api/v1/vpn-gateways/vpn_%00", None).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    let r = api.call(Method::GET, "/api/v1/events/history?gateway_id=vpn_%00", None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    let hook = json!({"url": "https://hooks.example/x", "events": ["*"], "description": "a\u{0}b"});
    let r = api.call(Method::POST, "/api/v1/webhooks", Some(hook)).await;
    assert_error(&r, StatusCode::UNPROCESSABLE_ENTITY, "validation_failed");
    let log = api.store.audit_log(None, 100).unwrap();
    assert!(log.iter().any(|e| e.action == "gateway.delete" && e.status == 404), "audited: {log:?}");
}
