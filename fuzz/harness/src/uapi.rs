//! `uapi_socket`: the `wg` socket's connection loop
//! (`uapi::server::serve_connection`) on an arbitrary byte stream, over the
//! API's state (an in-memory data plane, a SQLite store on tmpfs) and one
//! configuration-file peer. After every input the store and the data plane
//! agree on every gateway (the socket's changes go through the API's path),
//! and the configuration-file peer is untouched; refused requests change
//! nothing; then the gateways the input
//! made are taken out again, so that every input starts from the same state.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use wgxdp_control::api::model::tunnel_of;
use wgxdp_control::api::{ApiSettings, AppState};
use wgxdp_control::plane::{DataPlane, MemoryPlane};
use wgxdp_control::store::Store;
use wgxdp_control::uapi::UapiDevice;
use wgxdp_dataplane::gateway::PeerSpec;
use wgxdp_dataplane::noise::peer::PeerConfig;
use wgxdp_dataplane::noise::{PresharedKey, PrivateKey, PublicKey};

struct Fixture {
    rt: tokio::runtime::Runtime,
    device: Arc<UapiDevice>,
    store: Arc<Store>,
    plane: Arc<MemoryPlane>,
}

/// The configuration-file peer's public key (its bytes are fixed so that
/// seeds can name it): 32 bytes of 0x11.
pub const CONFIG_PEER: [u8; 32] = [0x11; 32];
/// The device's private key (fixed, so seeds can send it back unchanged).
pub const PRIVATE_KEY: [u8; 32] = [0x22; 32];
/// The listen port the device reports.
pub const LISTEN_PORT: u16 = 51820;

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
        let db = dir.join(format!("wgxdp-fuzz-uapi-{}.db", std::process::id()));
        let _ = std::fs::remove_file(&db);
        let store = Arc::new(Store::open(&db).expect("store"));
        let private_key = PrivateKey::from_bytes(PRIVATE_KEY);
        let plane = Arc::new(MemoryPlane::new(private_key.public_key()));
        let config_peer = PeerSpec {
            config: PeerConfig {
                public_key: PublicKey(CONFIG_PEER),
                preshared_key: PresharedKey::default(),
                persistent_keepalive: None,
            },
            endpoint: Some("192.0.2.11:51820".parse().expect("endpoint")),
            allowed_ips: vec!["10.11.0.0/16".parse().expect("prefix")],
            policy: Default::default(),
        };
        let settings = ApiSettings {
            site_cidr: Some("10.50.0.0/24".parse().expect("a prefix")),
            static_peers: vec![wgxdp_control::api::StaticPeer {
                public_key: config_peer.config.public_key,
                allowed_ips: config_peer.allowed_ips.clone(),
            }],
            ..ApiSettings::default()
        };
        let state = AppState::new(store.clone(), plane.clone(), settings);
        let device = Arc::new(UapiDevice::new(private_key, LISTEN_PORT, vec![config_peer], plane.clone(), Some(state)));
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        Fixture { rt, device, store, plane }
    })
}

pub fn uapi_socket(data: &[u8]) {
    run(data);
}

/// Runs one input; returns what the socket answered.
pub fn run(data: &[u8]) -> String {
    let f = fixture();
    let mut stream = tokio::io::join(data, Vec::new());
    f.rt.block_on(wgxdp_control::uapi::server::serve_connection(&f.device, &mut stream));
    let answers = String::from_utf8_lossy(&stream.into_inner().1).into_owned();
    let live = f.store.live().expect("store");
    // Every input starts with no gateways: a stream whose every request was
    // refused leaves none (a refused set changes nothing).
    if !answers.contains("errno=0\n") {
        assert!(live.is_empty(), "refused requests left gateways: {answers}");
    }
    let running = f.plane.tunnels.lock().unwrap_or_else(|p| p.into_inner()).len();
    assert_eq!(running, live.len(), "the data plane runs a tunnel the store does not hold");
    for g in &live {
        let want = tunnel_of(g);
        assert_eq!(f.plane.tunnel(&g.id).as_ref(), Some(&want), "the store and the data plane disagree on {}", g.id);
        assert_ne!(g.remote_public_key, PublicKey(CONFIG_PEER), "a gateway took the config peer's key");
    }
    // Back to the starting state.
    for g in live {
        f.plane.remove(&g.id).expect("memory plane");
        f.store.purge(&g.id).expect("store");
    }
    answers
}
