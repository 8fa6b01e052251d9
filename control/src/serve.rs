//! `wgxdp serve --config FILE`: starts the gateway and runs until SIGINT or
//! SIGTERM, then stops the workers and detaches XDP.

use crate::config::Config;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wgxdp_dataplane::gateway::{Gateway, GatewayConfig};
use wgxdp_dataplane::noise::AeadBackend;
use wgxdp_dataplane::xsk::XskConfig;

/// The XDP object, built by build.rs (aligned for the ELF parser).
static XDP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/wgxdp.bpf.o"));

pub fn serve(config_path: &Path, stats_every: Option<Duration>) -> anyhow::Result<()> {
    let cfg = Config::load(config_path)?;
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone())?;
    }
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
    // Scripts and tests wait for this line.
    println!("wgxdp: running, public key {}, {} queue(s)", gateway.public_key(), gateway.queues());
    let mut last_stats = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        if let Some(every) = stats_every {
            if last_stats.elapsed() >= every {
                last_stats = Instant::now();
                log_stats(&gateway);
            }
        }
    }
    tracing::info!("signal received; stopping");
    log_stats(&gateway);
    gateway.shutdown();
    println!("wgxdp: stopped");
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
