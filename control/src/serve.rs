//! `wgxdp serve --config FILE`: starts the gateway (and, with an `[api]`
//! section, the HTTP API over its durable store) and runs until SIGINT or
//! SIGTERM, then stops the API, the workers, and detaches XDP.

use crate::api::{self, ApiSettings, AppState, StaticPeer};
use crate::config::{ApiConfig, Config, WgSocket};
use crate::plane::{DataPlane, GatewayPlane};
use crate::store::{Store, ThisNode};
use crate::uapi::{self, UapiDevice, UapiSocket};
use anyhow::Context;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use wgxdp_dataplane::gateway::{interface_addrs, interface_networks, Gateway, GatewayConfig, PeerSpec};
use wgxdp_dataplane::loader::{self, DetachError};
use wgxdp_dataplane::noise::{AeadBackend, PrivateKey};
use wgxdp_dataplane::xsk::XskConfig;

/// The XDP object, built by build.rs (aligned for the ELF parser).
static XDP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/wgxdp.bpf.o"));

/// The API's pieces that can fail before anything is attached.
struct ApiStart {
    store: Arc<Store>,
    listener: std::net::TcpListener,
    metrics_listener: Option<std::net::TcpListener>,
    config: ApiConfig,
    static_peers: Vec<StaticPeer>,
    /// This process as a node of the store's fleet, registered.
    node: ThisNode,
}

fn bind(addr: std::net::SocketAddr, what: &str) -> anyhow::Result<std::net::TcpListener> {
    let listener = std::net::TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr} for {what}"))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// What the remote sites configure to reach this node: key, address, port.
struct RemoteSide {
    public_key: String,
    public_address: Option<std::net::IpAddr>,
    listen_port: u16,
}

fn prepare_api(config: ApiConfig, static_peers: Vec<StaticPeer>, side: RemoteSide) -> anyhow::Result<ApiStart> {
    let store = Arc::new(Store::open_at(&config.store)?);
    let listener = bind(config.listen, "the API")?;
    let metrics_listener = config.metrics_listen.map(|a| bind(a, "/metrics")).transpose()?;
    let node = ThisNode {
        id: config.node_id.clone(),
        region: config.node_region.clone(),
        api: config.listen.to_string(),
        incarnation: crate::store::incarnation(),
        started_at: crate::store::now_millis(),
        public_key: side.public_key,
        public_address: side.public_address.map(|a| a.to_string()).unwrap_or_default(),
        listen_port: side.listen_port,
        site_cidr: config.site_cidr.map(|c| c.to_string()).unwrap_or_default(),
    };
    // Registered before anything is attached: a second process with this
    // node id stops here.
    register(&store, &node).with_context(|| format!("cannot register node {} in {}", node.id, store.describe()))?;
    tracing::info!(node = %node.id, region = %node.region, store = %store.describe(), "node registered");
    Ok(ApiStart { store, listener, metrics_listener, config, static_peers, node })
}

pub fn serve(config_path: &Path, stats_every: Option<Duration>) -> anyhow::Result<()> {
    let mut cfg = Config::load(config_path)?;
    crate::privilege::check_serve(&cfg)?;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())?;
    }
    // Everything an operator can get wrong is checked before XDP is attached.
    let static_peers: Vec<StaticPeer> = cfg
        .peers
        .iter()
        .map(|p| StaticPeer { public_key: p.config.public_key, allowed_ips: p.allowed_ips.clone() })
        .collect();
    let public_address = cfg
        .api
        .as_ref()
        .and_then(|a| a.public_address.or(a.floating_address))
        .or_else(|| interface_addrs(&cfg.wan).0.map(Into::into));
    let listen_port = cfg.listen_port;
    let side = RemoteSide { public_key: cfg.private_key.public_key().to_base64(), public_address, listen_port };
    let api = cfg.api.clone().map(|a| prepare_api(a, static_peers, side)).transpose()?;
    // The host's own addresses (every interface): no API tunnel may route them.
    let host_addresses = wgxdp_dataplane::gateway::host_addresses();
    // What a `[[peer]]` site reaches when neither it nor `[api] site_cidr` says.
    let lan_networks = interface_networks(&cfg.lan);
    if lan_networks.is_empty() && cfg.peers.iter().any(|p| p.policy.local_networks.is_empty()) {
        tracing::warn!(lan = %cfg.lan, "the LAN interface has no networks: peers without `local_networks` reach nothing");
    }
    cfg.default_local_networks(&lan_networks);
    for p in &cfg.peers {
        let nets: Vec<String> = p.policy.local_networks.iter().map(ToString::to_string).collect();
        tracing::info!(peer = %p.config.public_key, local_networks = %nets.join(", "),
            firewall_default = p.policy.default_action.as_str(), "configuration peer");
    }
    let uapi = UapiStart {
        socket: bind_wg_socket(&cfg.wg_socket)?,
        private_key: cfg.private_key.clone(),
        config_peers: cfg.peers.clone(),
    };
    take_over(&cfg.wan, &cfg.lan)?;
    let gateway = Gateway::start(GatewayConfig {
        wan_interface: cfg.wan,
        lan_interface: cfg.lan,
        listen_port: cfg.listen_port,
        private_key: cfg.private_key,
        peers: cfg.peers,
        queues: cfg.queues,
        cores: cfg.cores,
        crypto_threads: cfg.crypto_threads,
        xsk: XskConfig {
            frame_count: cfg.frames_per_socket,
            zero_copy: cfg.zero_copy,
            busy_poll: cfg.busy_poll,
            ..XskConfig::default()
        },
        xdp_object: XDP_OBJECT.to_vec(),
        tunnel_mtu: cfg.tunnel_mtu,
        lan_next_hop: cfg.lan_next_hop,
        handshake_queue: 4096,
        tracked_flows: cfg.tracked_flows,
        host_interface: cfg.host_interface,
        backend: AeadBackend::default(),
    })?;
    let plane = Arc::new(GatewayPlane::new(gateway, listen_port));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("wgxdp-api")
        .enable_all()
        .build()
        .context("cannot start the API runtime")?;
    let result = runtime.block_on(run(plane.clone(), api, uapi, public_address, host_addresses, stop, stats_every));
    runtime.shutdown_timeout(Duration::from_secs(5));
    log_stats(plane.gateway());
    drop(plane);
    println!("wgxdp: stopped");
    result
}

/// The `wg` socket, bound before anything is attached, and what it reports.
struct UapiStart {
    socket: Option<UapiSocket>,
    private_key: PrivateKey,
    config_peers: Vec<PeerSpec>,
}

async fn run(
    plane: Arc<GatewayPlane>,
    api: Option<ApiStart>,
    uapi: UapiStart,
    public_address: Option<std::net::IpAddr>,
    host_addresses: Vec<std::net::IpAddr>,
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
    let mut api_state = None;
    let server = match api {
        Some(a) => {
            let settings = ApiSettings {
                site_cidr: a.config.site_cidr,
                host_addresses,
                public_address: public_address.unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into()),
                mutations_per_minute: a.config.mutations_per_minute,
                reads_per_minute: a.config.reads_per_minute,
                auth_failures_per_minute: a.config.auth_failures_per_minute,
                static_peers: a.static_peers,
                metrics_auth: a.config.metrics_auth,
                metrics_separate: a.metrics_listener.is_some(),
                node: a.node,
                floating_address: a.config.floating_address,
                ..ApiSettings::default()
            };
            let state = AppState::new(a.store, plane.clone(), settings);
            let replayed = state.clone();
            let restored = tokio::task::spawn_blocking(move || api::changes::replay(&replayed)).await??;
            {
                let (state, stop) = (state.clone(), stop.clone());
                std::thread::Builder::new()
                    .name("wgxdp-serving".into())
                    .spawn(move || api::serving::run(state, stop))
                    .context("cannot start the serving thread")?;
            }
            tokio::spawn(api::tunnel_watch::run(state.clone()));
            tokio::spawn(api::webhook_delivery::run(state.clone()));
            tokio::spawn(heartbeat(state.clone(), stop.clone()));
            api_state = Some(state.clone());
            // Event streams never end on their own: the graceful shutdown
            // ends them, or it would wait for their clients forever.
            let events = state.events.clone();
            let app = api::app(state.clone()).into_make_service_with_connect_info::<SocketAddr>();
            let listener = tokio::net::TcpListener::from_std(a.listener)?;
            if let Some(ml) = a.metrics_listener {
                let metrics = api::metrics_app(state).into_make_service_with_connect_info::<SocketAddr>();
                let ml = tokio::net::TcpListener::from_std(ml)?;
                println!("wgxdp: metrics listening on {}", ml.local_addr()?);
                let stop = stop.clone();
                tokio::spawn(async move {
                    let stopped = async move {
                        while !stop.load(Ordering::Relaxed) {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    };
                    if let Err(e) = axum::serve(ml, metrics).with_graceful_shutdown(stopped).await {
                        tracing::error!(error = %e, "the metrics listener failed");
                    }
                });
            }
            tracing::info!(listen = %a.config.listen, restored, "API serving");
            println!("wgxdp: api listening on {}, {restored} tunnel(s) restored", a.config.listen);
            let stopped = async move {
                stopped.await;
                events.close();
            };
            Some(tokio::spawn(async move { axum::serve(listener, app).with_graceful_shutdown(stopped).await }))
        }
        None => {
            tokio::spawn(stopped);
            None
        }
    };
    let device = Arc::new(UapiDevice::new(
        uapi.private_key,
        plane.listen_port(),
        uapi.config_peers,
        plane.clone(),
        api_state.clone(),
    ));
    let uapi_server = uapi.socket.map(|socket| {
        println!("wgxdp: wg socket on {}", socket.path().display());
        tokio::spawn(socket.serve(device, stop.clone()))
    });
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
    if let Some(uapi_server) = uapi_server {
        uapi_server.await?.context("the wg socket failed")?;
    }
    if let Some(server) = server {
        server.await?.context("the API server failed")?;
    }
    if let Some(state) = api_state {
        let left = state.drain(Duration::from_secs(3)).await;
        if left > 0 {
            tracing::warn!(left, "API changes still running at exit; the next start replays the store");
        }
        // The other nodes see this one lost at once, not after the TTL.
        let leaving = state.clone();
        let left = tokio::task::spawn_blocking(move || leaving.store.leave(&leaving.settings.node)).await;
        if let Err(e) = left.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string())) {
            tracing::warn!(error = %e, "cannot mark this node stopped in the store");
        }
    }
    Ok(())
}

/// Registers `node`. Its id held by a process of this host that is gone (a
/// crash, then a restart): taken over at once. Held by a process that may
/// still run (here or elsewhere): waits until the holder has been silent for
/// the TTL, and gives up (another live process has this id) after twice it.
fn register(store: &Store, node: &ThisNode) -> Result<(), crate::store::StoreError> {
    let deadline = std::time::Instant::now() + Duration::from_millis(2 * crate::store::NODE_TTL_MILLIS.unsigned_abs());
    loop {
        match store.heartbeat(node) {
            Err(crate::store::StoreError::NodeIdTaken(taken)) if crate::store::holder_is_dead(&taken.holder) => {
                if store.take_over(node, &taken.holder)? {
                    tracing::info!(node = %node.id, "node id taken over from a process of this host that is gone");
                    return Ok(());
                }
            }
            Err(crate::store::StoreError::NodeIdTaken(taken)) if std::time::Instant::now() < deadline => {
                tracing::warn!(node = %node.id, silent_for_ms = taken.silent_for_millis,
                    "node id held by another process; waiting for it to go silent");
                std::thread::sleep(Duration::from_millis(500));
            }
            other => return other,
        }
    }
}

/// Renews this node's heartbeat every `HEARTBEAT_MILLIS` until `stop`. A
/// store that does not answer is logged once per outage; the node is lost
/// to the others until it answers again.
async fn heartbeat(state: Arc<AppState>, stop: Arc<AtomicBool>) {
    let mut failing = false;
    let mut every = tokio::time::interval(Duration::from_millis(crate::store::HEARTBEAT_MILLIS.unsigned_abs()));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !stop.load(Ordering::Relaxed) {
        every.tick().await;
        let s = state.clone();
        let beat = tokio::task::spawn_blocking(move || s.store.heartbeat(&s.settings.node)).await;
        if let Ok(Err(crate::store::StoreError::NodeIdTaken(taken))) = &beat {
            // Silent past the TTL (a stalled store, a paused host) and another
            // process took this id: two would run one node's tunnels.
            tracing::error!(error = %taken, "this node's id was taken while it was silent; stopping");
            println!("wgxdp: node id {} taken by another process; stopping", taken.id);
            stop.store(true, Ordering::Relaxed);
            return;
        }
        match beat.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string())) {
            Ok(()) if failing => {
                failing = false;
                tracing::info!("node heartbeat recorded again");
            }
            Ok(()) => {}
            Err(e) if !failing => {
                failing = true;
                tracing::error!(error = %e, "cannot record this node's heartbeat; the other nodes will see it lost");
            }
            Err(_) => {}
        }
    }
}

/// Binds the `wg` socket the configuration asks for. One named explicitly
/// must be served; the default (`host_interface`'s name) is left out with a
/// warning if it cannot be (not a name `wg` accepts, or another process
/// answers on it), so that an upgrade never stops a gateway from starting.
fn bind_wg_socket(wanted: &WgSocket) -> anyhow::Result<Option<UapiSocket>> {
    let dir = Path::new(uapi::SOCKET_DIR);
    match wanted {
        WgSocket::Off => Ok(None),
        WgSocket::Named(name) => Ok(Some(UapiSocket::bind(dir, name)?)),
        WgSocket::Default(name) => {
            match uapi::validate_name(name).map_err(anyhow::Error::msg).and_then(|()| UapiSocket::bind(dir, name)) {
                Ok(socket) => Ok(Some(socket)),
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "no wg socket; set [interface] name (or wg_socket = false)");
                    println!("wgxdp: no wg socket: {e:#}");
                    Ok(None)
                }
            }
        }
    }
}

/// Removes wgxdp XDP programs a dead process left on the WAN and LAN
/// interfaces (attached through netlink: by `ip link`, libxdp or an older
/// wgxdp) so ours replace them. Both interfaces are checked before either is
/// changed: another tool's program, or one a live process holds through a BPF
/// link, refuses the start and nothing is touched. Programs a killed `serve`
/// attached through its links are already gone.
fn take_over(wan: &str, lan: &str) -> anyhow::Result<()> {
    let mut plan = Vec::new();
    for iface in [wan, lan] {
        match loader::check_detach(iface, false) {
            Ok(found) => plan.push((iface, found)),
            // Reported with its fix by Gateway::start.
            Err(DetachError::NoSuchInterface(_)) => {}
            Err(e @ (DetachError::HeldByLink { .. } | DetachError::NotOurs { .. })) => {
                anyhow::bail!("cannot take over `{iface}`: {e}")
            }
            Err(e) => tracing::warn!(%iface, error = %e, "cannot check the interface for stale XDP programs"),
        }
    }
    for (iface, found) in plan {
        loader::remove_programs(iface, &found).with_context(|| format!("cannot take over `{iface}`"))?;
        for p in found {
            tracing::warn!(%iface, prog_id = p.prog_id, mode = p.mode.as_str(), "replaced a stale XDP program");
            println!("wgxdp: replaced stale XDP program {} ({} mode) on {iface}", p.prog_id, p.mode.as_str());
        }
    }
    Ok(())
}

/// `wgxdp detach --config FILE [--force]`: removes wgxdp's XDP programs (with
/// `force`, any program attached through netlink) from the WAN and LAN
/// interfaces the configuration names, saying what it removed.
pub fn detach(config: &Path, force: bool, out: &mut impl std::io::Write) -> anyhow::Result<()> {
    let (wan, lan) = crate::config::interfaces(config)?;
    let mut failed = Vec::new();
    for (side, iface) in [("WAN", &wan), ("LAN", &lan)] {
        match loader::detach_programs(iface, force) {
            Ok(removed) if removed.is_empty() => writeln!(out, "{side} {iface}: no XDP program attached")?,
            Ok(removed) => {
                for p in removed {
                    let name = p.name.as_deref().unwrap_or("unknown name");
                    writeln!(
                        out,
                        "{side} {iface}: removed XDP program {} ({} mode): {name}",
                        p.prog_id,
                        p.mode.as_str()
                    )?;
                }
            }
            Err(e) => {
                writeln!(out, "{side} {iface}: {e}")?;
                failed.push(format!("{side} {iface}: {e}"));
            }
        }
    }
    if !failed.is_empty() {
        anyhow::bail!("{}", failed.join("; "));
    }
    Ok(())
}

fn log_stats(gateway: &Gateway) {
    let stats = gateway.stats();
    let xdp: Vec<String> = stats.xdp.named().map(|(k, v)| format!("{k}={v}")).collect();
    println!("wgxdp: stats xdp {}", xdp.join(" "));
    let nonzero: Vec<String> =
        stats.slow_path.iter().filter(|(_, v)| *v > 0).map(|(k, v)| format!("{k}={v}")).collect();
    println!("wgxdp: stats kernel-slow-path {}", nonzero.join(" "));
    let nonzero: Vec<String> = stats.control.iter().filter(|(_, v)| *v > 0).map(|(k, v)| format!("{k}={v}")).collect();
    println!("wgxdp: stats control {}", nonzero.join(" "));
    let conntrack: Vec<String> = stats.conntrack.iter().map(|(k, v)| format!("{k}={v}")).collect();
    println!("wgxdp: stats conntrack {}", conntrack.join(" "));
    for (q, w) in stats.workers.iter().enumerate() {
        let nonzero: Vec<String> = w.iter().filter(|(_, v)| *v > 0).map(|(k, v)| format!("{k}={v}")).collect();
        println!("wgxdp: stats queue{q} {}", nonzero.join(" "));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testing::each_backend;

    fn node(incarnation: String) -> ThisNode {
        ThisNode {
            id: "gw-1".into(),
            region: crate::store::EVERY_REGION.into(),
            api: "127.0.0.1:8080".into(),
            incarnation,
            started_at: crate::store::now_millis(),
            ..ThisNode::default()
        }
    }

    /// A restart after a crash takes the node id from the dead process's
    /// incarnation, without waiting for it to go silent.
    #[test]
    fn a_restart_after_a_crash_takes_the_node_id_at_once() {
        each_backend(|db| {
            let store = db.open();
            let mut child = std::process::Command::new("true").spawn().unwrap();
            let dead = child.id();
            child.wait().unwrap();
            let mine = crate::store::incarnation();
            let boot = mine.split('/').next().unwrap();
            store.heartbeat(&node(format!("{boot}/{dead}/crashed"))).unwrap();
            let restarted = node(crate::store::incarnation());
            // The dead holder's heartbeat an hour ahead: waiting for it to go
            // silent would fail, so only the takeover can succeed.
            store.execute_raw("UPDATE nodes SET heartbeat_at = heartbeat_at + 3600000", &[]);
            register(&store, &restarted).unwrap();
            store.heartbeat(&restarted).expect("this process holds the id now");
        });
    }
}
