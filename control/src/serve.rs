//! `wgxdp serve --config FILE`: starts the gateway (and, with an `[api]`
//! section, the HTTP API over its durable store) and runs until SIGINT or
//! SIGTERM, then stops the API, the workers, and detaches XDP.

use crate::api::{self, ApiSettings, AppState};
use crate::config::{ApiConfig, Config};
use crate::plane::{DataPlane, GatewayPlane};
use crate::store::Store;
use anyhow::Context;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use wgxdp_dataplane::gateway::{interface_addrs, Gateway, GatewayConfig};
use wgxdp_dataplane::noise::AeadBackend;
use wgxdp_dataplane::xsk::XskConfig;

/// The XDP object, built by build.rs (aligned for the ELF parser).
static XDP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/wgxdp.bpf.o"));

/// The API's pieces that can fail before anything is attached.
struct ApiStart {
    store: Arc<Store>,
    listener: std::net::TcpListener,
    config: ApiConfig,
}

fn prepare_api(config: ApiConfig) -> anyhow::Result<ApiStart> {
    let store = Arc::new(Store::open(&config.database)?);
    let listener = std::net::TcpListener::bind(config.listen)
        .with_context(|| format!("cannot listen on {} for the API", config.listen))?;
    listener.set_nonblocking(true)?;
    Ok(ApiStart { store, listener, config })
}

pub fn serve(config_path: &Path, stats_every: Option<Duration>) -> anyhow::Result<()> {
    let cfg = Config::load(config_path)?;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())?;
    }
    // Everything an operator can get wrong is checked before XDP is attached.
    let api = cfg.api.clone().map(prepare_api).transpose()?;
    let public_address =
        api.as_ref().and_then(|a| a.config.public_address).or_else(|| interface_addrs(&cfg.wan).0.map(Into::into));
    let listen_port = cfg.listen_port;
    let gateway = Gateway::start(GatewayConfig {
        wan_interface: cfg.wan,
        lan_interface: cfg.lan,
        listen_port: cfg.listen_port,
        private_key: cfg.private_key,
        peers: cfg.peers,
        queues: cfg.queues,
        cores: cfg.cores,
        xsk: XskConfig { frame_count: cfg.frames_per_socket, zero_copy: cfg.zero_copy, ..XskConfig::default() },
        xdp_object: XDP_OBJECT.to_vec(),
        tunnel_mtu: cfg.tunnel_mtu,
        lan_next_hop: cfg.lan_next_hop,
        handshake_queue: 4096,
        backend: AeadBackend::default(),
    })?;
    let plane = Arc::new(GatewayPlane::new(gateway, listen_port));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("wgxdp-api")
        .enable_all()
        .build()
        .context("cannot start the API runtime")?;
    let result = runtime.block_on(run(plane.clone(), api, public_address, stop, stats_every));
    runtime.shutdown_timeout(Duration::from_secs(5));
    log_stats(plane.gateway());
    drop(plane);
    println!("wgxdp: stopped");
    result
}

async fn run(
    plane: Arc<GatewayPlane>,
    api: Option<ApiStart>,
    public_address: Option<std::net::IpAddr>,
    stop: Arc<AtomicBool>,
    stats_every: Option<Duration>,
) -> anyhow::Result<()> {
    let stopped = {
        let stop = stop.clone();
        async move {
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let server = match api {
        Some(a) => {
            let store = a.store.clone();
            let p: Arc<dyn DataPlane> = plane.clone();
            let restored = tokio::task::spawn_blocking(move || api::replay(&store, &*p)).await??;
            let settings = ApiSettings {
                site_cidr: a.config.site_cidr.clone(),
                public_address: public_address.map_or_else(|| "0.0.0.0".into(), |a| a.to_string()),
                mutations_per_minute: a.config.mutations_per_minute,
                reads_per_minute: a.config.reads_per_minute,
            };
            let app = api::app(AppState::new(a.store, plane.clone(), settings));
            let listener = tokio::net::TcpListener::from_std(a.listener)?;
            tracing::info!(listen = %a.config.listen, restored, "API serving");
            println!("wgxdp: api listening on {}, {restored} tunnel(s) restored", a.config.listen);
            Some(tokio::spawn(async move { axum::serve(listener, app).with_graceful_shutdown(stopped).await }))
        }
        None => {
            tokio::spawn(stopped);
            None
        }
    };
    println!("wgxdp: running, public key {}, {} queue(s)", plane.gateway().public_key(), plane.gateway().queues());
    let mut ticker = tokio::time::interval(stats_every.unwrap_or(Duration::from_secs(3600)));
    ticker.tick().await;
    while !stop.load(Ordering::Relaxed) {
        tokio::select! {
            _ = ticker.tick(), if stats_every.is_some() => log_stats(plane.gateway()),
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
    tracing::info!("signal received; stopping");
    if let Some(server) = server {
        server.await?.context("the API server failed")?;
    }
    Ok(())
}

fn log_stats(gateway: &Gateway) {
    let stats = gateway.stats();
    let xdp: Vec<String> = stats.xdp.named().map(|(k, v)| format!("{k}={v}")).collect();
    println!("wgxdp: stats xdp {}", xdp.join(" "));
    for (q, w) in stats.workers.iter().enumerate() {
        let nonzero: Vec<String> = w.iter().filter(|(_, v)| *v > 0).map(|(k, v)| format!("{k}={v}")).collect();
        println!("wgxdp: stats queue{q} {}", nonzero.join(" "));
    }
}
