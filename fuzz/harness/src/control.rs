//! `config_file`: the `wgxdp serve` configuration parser on arbitrary text
//! (with real key files it can name). `api_bodies`: the API request bodies
//! (`CreateGateway` / `UpdateGateway` deserialisation and validation,
//! additional networks and firewall rules included), and the whole router
//! (`api::app`, through `tower::ServiceExt::oneshot`) over an in-memory data
//! plane and a SQLite store on tmpfs.

use axum::body::Body;
use axum::http::{header, Method, Request};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use tower::ServiceExt;
use wgxdp_control::api::events::StreamParams;
use wgxdp_control::api::extract::parse_query;
use wgxdp_control::api::import::parse_import;
use wgxdp_control::api::model::{CreateGateway, UpdateGateway};
use wgxdp_control::api::webhooks::parse_create_webhook;
use wgxdp_control::api::{app, ApiSettings, AppState};
use wgxdp_control::config::Config;
use wgxdp_control::firewall::FirewallRuleText;
use wgxdp_control::plane::MemoryPlane;
use wgxdp_control::store::{GatewayRecord, Store};
use wgxdp_dataplane::noise::{PresharedKey, PrivateKey, PublicKey};

/// Where the key files a fuzzed configuration may name live (seeds name them).
pub fn key_dir() -> PathBuf {
    std::env::temp_dir().join("wgxdp-fuzz-keys")
}

fn write_key(name: &str, contents: &str, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = key_dir();
    std::fs::create_dir_all(&dir)?;
    // Written aside and renamed: parallel fuzzing jobs share the directory.
    let tmp = dir.join(format!(".{name}.{}", std::process::id()));
    std::fs::write(&tmp, contents)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, dir.join(name))
}

/// `private.key` and `psk.key` (mode 600), `loose.key` (644), `empty.key`.
fn key_files() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let private = PrivateKey::generate().to_base64_secret();
        let psk = PresharedKey::generate().to_base64_secret();
        let written = write_key("private.key", &private, 0o600)
            .and_then(|_| write_key("psk.key", &psk, 0o600))
            .and_then(|_| write_key("loose.key", &psk, 0o644))
            .and_then(|_| write_key("empty.key", "", 0o600));
        written.expect("cannot write the fuzzing key files");
    });
}

pub fn config_file(data: &[u8]) {
    key_files();
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Config::parse(text, Path::new("fuzz.toml"));
    }
}

struct Api {
    rt: tokio::runtime::Runtime,
    router: axum::Router,
    key: String,
    id: String,
    /// A registered webhook's id.
    hook: String,
    ours: PublicKey,
    record: GatewayRecord,
}

fn site_cidr() -> wgxdp_dataplane::table::IpPrefix {
    "10.50.0.0/24".parse().expect("a prefix")
}

fn api() -> &'static Api {
    static API: OnceLock<Api> = OnceLock::new();
    API.get_or_init(|| {
        let dir = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
        // Databases of fuzzing processes that have exited.
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let pid = name.strip_prefix("wgxdp-fuzz-api-").and_then(|r| r.split(['.', '-']).next());
                if pid.is_some_and(|p| !Path::new("/proc").join(p).exists()) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let db = dir.join(format!("wgxdp-fuzz-api-{}.db", std::process::id()));
        let store = Arc::new(Store::open(&db).expect("store"));
        let (_, key) = store.create_api_key("fuzz", wgxdp_control::store::Scope::Admin).expect("api key");
        let ours = PrivateKey::generate().public_key();
        let plane = Arc::new(MemoryPlane::new(ours));
        let settings = ApiSettings {
            site_cidr: Some(site_cidr()),
            public_address: std::net::Ipv4Addr::new(198, 51, 100, 1).into(),
            mutations_per_minute: 1_000_000,
            reads_per_minute: 1_000_000,
            auth_failures_per_minute: 1_000_000,
            ..ApiSettings::default()
        };
        let router = app(AppState::new(store.clone(), plane, settings));
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let remote = PrivateKey::generate().public_key().to_base64();
        let body = format!(
            r#"{{"name":"fuzz-site","region":"us-east","tunnel_type":"wireguard","remote_network_cidr":"10.9.0.0/16","remote_peer_ip":"203.0.113.9","remote_public_key":"{remote}"}}"#
        );
        let key = key.expose().to_owned();
        let (status, text) = rt.block_on(call(&router, &key, Method::POST, "/api/v1/vpn-gateways", body.into_bytes()));
        assert!(status < 300, "creating the first gateway: {status} {text}");
        let v: serde_json::Value = serde_json::from_str(&text).expect("json");
        let id = v["data"]["id"].as_str().expect("an id").to_owned();
        let record = store.get(&id).expect("store").expect("the gateway");
        let hook_body = br#"{"url":"http://192.0.2.1:9/fuzz","events":["tunnel.up"]}"#.to_vec();
        let (status, text) = rt.block_on(call(&router, &key, Method::POST, "/api/v1/webhooks", hook_body));
        assert!(status < 300, "registering a webhook: {status} {text}");
        let v: serde_json::Value = serde_json::from_str(&text).expect("json");
        let hook = v["data"]["id"].as_str().expect("an id").to_owned();
        Api { rt, router, key, id, hook, ours, record }
    })
}

async fn call(router: &axum::Router, key: &str, method: Method, uri: &str, body: Vec<u8>) -> (u16, String) {
    call_with(router, key, method, uri, None, body).await
}

/// `conditions`: a value sent as both `Idempotency-Key` and `If-Match`.
async fn call_with(
    router: &axum::Router,
    key: &str,
    method: Method,
    uri: &str,
    conditions: Option<&[u8]>,
    body: Vec<u8>,
) -> (u16, String) {
    use http_body_util::BodyExt;
    let mut builder = Request::builder()
        .method(method)
        .uri(uri)
        .header(header::AUTHORIZATION, format!("Bearer {key}"))
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(value) = conditions {
        builder = builder.header("idempotency-key", value).header(header::IF_MATCH, value);
    }
    let Ok(req) = builder.body(Body::from(body)) else {
        return (0, String::new());
    };
    let resp = router.clone().oneshot(req).await.expect("infallible");
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

/// The first byte selects: bits 0-1 what (0 create body, 1 update body, 2
/// the router on gateway paths, 3 the router on webhook and event-history
/// paths); create: bit 2 no site CIDR configured, bit 3 a webhook
/// registration instead, bit 4 a wg-quick import instead, bit 5 a restore
/// (through the router) instead; router: bits 2-3 the
/// method, bits 4-5 the path, bit 6 the text up to the first newline is the
/// query string (and after a `|` in it, the `Idempotency-Key` and `If-Match`
/// header values), bit 7 a wrong API key. The rest is the body. No request may
/// answer 5xx, and every refusal carries the API's error body. Accepted
/// firewall rules read back (as the API shows and the store keeps them) as
/// the same rules.
pub fn api_bodies(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else { return };
    let api = api();
    match sel & 3 {
        0 if sel & 8 != 0 => {
            if let Ok(new) = parse_create_webhook(rest) {
                assert!(new.url.starts_with("http://") || new.url.starts_with("https://"), "{}", new.url);
            }
        }
        0 if sel & 32 != 0 => {
            // A restore through the router; one that succeeds, then the
            // backup of everything, restores again as all unchanged.
            let post =
                |body: Vec<u8>| api.rt.block_on(call(&api.router, &api.key, Method::POST, "/api/v1/restore", body));
            let (status, text) = post(rest.to_vec());
            assert!(status < 500, "restore answered {status}: {text}");
            if status == 200 {
                let (status, backup) = api.rt.block_on(call(
                    &api.router,
                    &api.key,
                    Method::GET,
                    "/api/v1/backup?include_secrets=true",
                    Vec::new(),
                ));
                assert_eq!(status, 200, "{backup}");
                let (status, again) = post(backup.into_bytes());
                let v: serde_json::Value = serde_json::from_str(&again).unwrap_or_default();
                assert_eq!(status, 200, "{again}");
                assert_eq!(v["data"]["gateways"]["restored"], serde_json::json!([]), "{again}");
                assert_eq!(v["data"]["webhooks"]["restored"], serde_json::json!([]), "{again}");
                // What this input restored goes again, so that the next
                // inputs meet the same gateway (and no webhook limit).
                let first: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                for (kind, path) in [("gateways", "vpn-gateways"), ("webhooks", "webhooks")] {
                    for id in
                        first["data"][kind]["restored"].as_array().into_iter().flatten().filter_map(|v| v.as_str())
                    {
                        let uri = format!("/api/v1/{path}/{id}");
                        let (status, text) =
                            api.rt.block_on(call(&api.router, &api.key, Method::DELETE, &uri, Vec::new()));
                        assert!(status < 300, "{uri}: {status} {text}");
                    }
                }
            }
        }
        0 if sel & 16 != 0 => {
            let site = (sel & 4 == 0).then(site_cidr);
            match parse_import(rest, |_| site, &api.ours) {
                Ok(new) => rules_read_back(&new.firewall),
                // The section may hold a pre-shared key: an error names lines, never quotes them.
                Err(e) => assert!(e.status.is_client_error(), "{}", e.message),
            }
        }
        0 => {
            if let Ok(body) = serde_json::from_slice::<CreateGateway>(rest) {
                let site = (sel & 4 == 0).then(site_cidr);
                if let Ok(new) = body.validate(site, &api.ours) {
                    rules_read_back(&new.firewall);
                }
            }
        }
        1 => {
            if let Ok(body) = serde_json::from_slice::<UpdateGateway>(rest) {
                if let Ok(changes) = body.validate(&api.record) {
                    rules_read_back(changes.firewall.as_deref().unwrap_or_default());
                }
            }
        }
        kind => {
            let method = [Method::GET, Method::POST, Method::PATCH, Method::DELETE][usize::from(sel >> 2 & 3)].clone();
            let (gateways, hooks) = ("/api/v1/vpn-gateways", "/api/v1/webhooks");
            let path = match (kind, sel >> 4 & 3) {
                (2, 0) => gateways.to_owned(),
                (2, 1) => format!("{gateways}/{}", api.id),
                (2, 2) => format!("{gateways}/{}/status", api.id),
                (2, _) => format!("{gateways}/{}/config", api.id),
                (_, 0) => hooks.to_owned(),
                (_, 1) => format!("{hooks}/{}", api.hook),
                (_, 2) => format!("{hooks}/{}/deliveries", api.hook),
                // (Not the event stream: it never ends; its query is decoded below.)
                (_, _) => "/api/v1/events/history".to_owned(),
            };
            let (first_line, body) = match (sel & 64 != 0, rest.iter().position(|&b| b == b'\n')) {
                (true, Some(nl)) => (Some(&rest[..nl]), &rest[nl + 1..]),
                _ => (None, rest),
            };
            // The first line: a query string, then after a `|` the value of
            // `Idempotency-Key` and `If-Match`.
            let (query, conditions) = match first_line.map(|l| (l, l.iter().position(|&b| b == b'|'))) {
                Some((l, Some(bar))) => (Some(&l[..bar]), Some(&l[bar + 1..])),
                Some((l, None)) => (Some(l), None),
                None => (None, None),
            };
            if let (Some(q), 3, 3) = (query, kind, sel >> 4 & 3) {
                // The event stream's parameters (the stream itself never ends),
                // through the decoder it runs: never a panic, and an accepted
                // `types` names at least one event type.
                let q = String::from_utf8_lossy(q);
                if let Ok(StreamParams { types: Some(kinds), .. }) = parse_query::<StreamParams>(&q) {
                    assert!(!kinds.0.is_empty(), "{q}");
                }
            }
            let uri = match query {
                Some(q) => format!("{path}?{}", String::from_utf8_lossy(q)),
                None => path,
            };
            let key = if sel & 128 != 0 { "wgx_not-a-key" } else { api.key.as_str() };
            let (status, text) =
                api.rt.block_on(call_with(&api.router, key, method.clone(), &uri, conditions, body.to_vec()));
            assert!(status < 500, "{method} {uri} answered {status}: {text}");
            // Every refusal is an `{"error": {"code", "message"}}` body. Known
            // exception: axum's own 405 (empty body) for a method a route lacks.
            if status >= 400 && status != 405 {
                let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                assert!(
                    v["error"]["code"].is_string() && v["error"]["message"].is_string(),
                    "{method} {uri} {status}: {text}"
                );
            }
        }
    }
}

/// The normalised text of each accepted rule, through JSON as the store keeps
/// it, parses back to the same rule.
fn rules_read_back(rules: &[wgxdp_dataplane::policy::FirewallRule]) {
    let text = serde_json::to_string(&wgxdp_control::firewall::rule_texts(rules)).expect("rules encode");
    let texts: Vec<FirewallRuleText> = serde_json::from_str(&text).expect("encoded rules decode");
    let again = wgxdp_control::firewall::parse_rules(&texts).expect("normalised rules parse");
    assert_eq!(again, rules, "{text}");
}
