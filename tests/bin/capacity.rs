//! Capacity workloads: a generator that out-runs the gateway, the gateway
//! pinned to one core, the generator to the other, and the XDP sink counting
//! what the gateway delivered.
//!
//! - decrypt + forward: the generator completes a handshake as a client,
//!   pre-encrypts a ring of transport packets with increasing counters and
//!   blasts them at the gateway's WAN veth; the sink on the LAN host counts the
//!   inner packets that arrive.
//! - encrypt + forward: the LAN host blasts plain packets towards the tunnel
//!   prefix; the sink on the client veth counts the transport packets.

use std::net::{SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use wgxdp_dataplane::noise::{PrivateKey, PublicKey};
use wgxdp_integration::blast::{
    inner_packet, mac_of, pin_current_thread, ClientSession, FrameRing, Framing, PacketSocket, Sink,
};
use wgxdp_integration::site::{
    write_private_key, ServeProcess, SiteTopology, TempDir, GATEWAY_WAN, LAN_HOST, LISTEN_PORT,
};
use wgxdp_integration::{Userspace, WireguardGo};

pub const GATEWAY_CPU: usize = 0;
pub const GENERATOR_CPU: usize = 1;
pub const SIZES: [usize; 2] = [64, 1420];
pub const SINK_PORT: u16 = 9999;
pub const GENERATOR: &str = "10.100.0.2:40001";
pub const TUNNEL_SRC: &str = "10.200.0.2";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Wgxdp,
    /// wgxdp with `busy_poll = true` in its `[interface]` section.
    WgxdpBusyPoll,
    Userspace(Userspace),
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Wgxdp => "wgxdp",
            Kind::WgxdpBusyPoll => "wgxdp (busy poll)",
            Kind::Userspace(Userspace::WireguardGo) => "wireguard-go",
            Kind::Userspace(Userspace::Boringtun) => "boringtun",
        }
    }
}

/// One workload's figures: what the generator offered and what came out.
#[derive(Debug, Default, Clone, Copy)]
pub struct Rate {
    pub offered_pps: f64,
    pub delivered_pps: f64,
    /// Inner (plaintext) bits per second delivered.
    pub delivered_gbps: f64,
}

impl Rate {
    /// The gateway kept up with everything offered (≥ 95 %): the generator set
    /// the rate, so the figure is a lower bound of the gateway's capacity.
    pub fn generator_limited(&self) -> bool {
        self.offered_pps > 0.0 && self.delivered_pps >= 0.95 * self.offered_pps
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub struct Capacity {
    /// By size (SIZES order).
    pub decrypt: [Rate; 2],
    pub encrypt: [Rate; 2],
}

/// A gateway under test: what must stay alive while it runs; stopped on drop.
pub enum Running {
    Wgxdp { process: ServeProcess, _dir: TempDir },
    Userspace { process: WireguardGo },
}

impl Running {
    /// The gateway's process id.
    pub fn pid(&self) -> u32 {
        match self {
            Running::Wgxdp { process, .. } => process.child.id(),
            Running::Userspace { process } => process.pid(),
        }
    }
}

/// A `wgxdp serve` configuration for `kind` (wgxdp, with or without busy
/// polling) in `topo` with `peers`: its directory, file and public key.
pub fn wgxdp_config(kind: Kind, topo: &SiteTopology, peers: &[(PublicKey, String)]) -> (TempDir, PathBuf, PublicKey) {
    let dir = TempDir::new("wgxdp-cap");
    let key_file = dir.join("gw.key");
    let key = write_private_key(&key_file).public_key();
    let config = dir.join("gw.toml");
    let mut text = format!("{}cores = [{GATEWAY_CPU}]\n", topo.interface_section(&key_file));
    if kind == Kind::WgxdpBusyPoll {
        text.push_str("busy_poll = true\n");
    }
    for (peer, allowed) in peers {
        text.push_str(&format!("\n[[peer]]\npublic_key = \"{peer}\"\nallowed_ips = [\"{allowed}\"]\n"));
    }
    std::fs::write(&config, text).expect("config");
    (dir, config, key)
}

/// Starts `kind` in the gateway namespace, pinned to the gateway core, with
/// `peers` as (public key, allowed IPs); returns it and its public key.
pub fn start_gateway(
    kind: Kind,
    wgxdp: &Path,
    topo: &SiteTopology,
    peers: &[(PublicKey, String)],
) -> (Running, PublicKey) {
    match kind {
        Kind::Wgxdp | Kind::WgxdpBusyPoll => {
            let (dir, config, key) = wgxdp_config(kind, topo, peers);
            let p = ServeProcess::start_pinned(&topo.gateway, wgxdp, &config, &dir.0, Some(GATEWAY_CPU));
            (Running::Wgxdp { process: p, _dir: dir }, key)
        }
        Kind::Userspace(program) => {
            let key = PrivateKey::generate();
            let wg = WireguardGo::start_program(
                &topo.gateway,
                program,
                &key.to_base64_secret(),
                LISTEN_PORT,
                Some(GATEWAY_CPU),
            );
            let conf = std::env::temp_dir().join(format!("{}.peers.conf", wg.interface));
            let text: String = peers
                .iter()
                .map(|(k, allowed)| format!("[Peer]\nPublicKey = {k}\nAllowedIPs = {allowed}\n\n"))
                .collect();
            std::fs::write(&conf, text).expect("peers file");
            wgxdp_integration::run("wg", &["addconf", &wg.interface, conf.to_str().expect("utf-8")]);
            let _ = std::fs::remove_file(&conf);
            topo.gateway.ip(&["link", "set", &wg.interface, "up"]);
            topo.gateway.ip(&["route", "add", "10.200.0.0/16", "dev", &wg.interface]);
            (Running::Userspace { process: wg }, key.public_key())
        }
    }
}

/// Waits until the sink stops counting; returns (packets, time of the last change since `t0`).
pub fn drain(sink: &Sink, t0: Instant, before: u64) -> (u64, Duration) {
    let mut last = sink.packets();
    let mut last_change = t0.elapsed();
    let mut still_since = Instant::now();
    while still_since.elapsed() < Duration::from_millis(300) && t0.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(10));
        let now = sink.packets();
        if now != last {
            last = now;
            last_change = t0.elapsed();
            still_since = Instant::now();
        }
    }
    (last - before, last_change)
}

/// Sends `ring` from the generator core (once, or repeatedly for `duration`)
/// and measures what the sink counts.
fn blast(socket: &PacketSocket, ring: &FrameRing, repeat_for: Option<Duration>, sink: &Sink, inner_len: usize) -> Rate {
    let before = sink.packets();
    let t0 = Instant::now();
    let (sent, send_time) = std::thread::scope(|s| {
        s.spawn(|| {
            pin_current_thread(GENERATOR_CPU);
            let start = Instant::now();
            let mut sent = 0usize;
            loop {
                sent += socket.send(ring, 0..ring.len());
                if repeat_for.is_none_or(|d| start.elapsed() >= d) {
                    break;
                }
            }
            (sent, start.elapsed())
        })
        .join()
        .expect("generator thread")
    });
    let (delivered, window) = drain(sink, t0, before);
    let secs = window.as_secs_f64().max(send_time.as_secs_f64()).max(1e-3);
    let delivered_pps = delivered as f64 / secs;
    Rate {
        offered_pps: sent as f64 / send_time.as_secs_f64().max(1e-3),
        delivered_pps,
        delivered_gbps: delivered_pps * inner_len as f64 * 8.0 / 1e9,
    }
}

pub fn measure(kind: Kind, wgxdp: &Path, object: &[u8], packets: usize, seconds: u32) -> Capacity {
    let topo = SiteTopology::new("cp");
    let generator_key = PrivateKey::generate();
    let peers = [(generator_key.public_key(), "10.200.0.0/24".to_owned())];
    let (gateway, gateway_key) = start_gateway(kind, wgxdp, &topo, &peers);
    let gateway_addr: SocketAddr = format!("{GATEWAY_WAN}:{LISTEN_PORT}").parse().expect("addr");
    let generator: SocketAddrV4 = GENERATOR.parse().expect("addr");
    let mut session = ClientSession::connect(&topo.client, generator_key, generator, gateway_addr, gateway_key);
    let client_mac = mac_of(&topo.client, &topo.client_if);
    let wan_mac = mac_of(&topo.gateway, &topo.gateway_wan);
    let lan_mac = mac_of(&topo.lan, &topo.lan_if);
    let gw_lan_mac = mac_of(&topo.gateway, &topo.gateway_lan);
    let mut cap = Capacity::default();

    println!("   {}: decrypt + forward", kind.name());
    let sink = Sink::attach(&topo.lan, &topo.lan_if, object.to_vec(), SINK_PORT, 0);
    let socket = PacketSocket::open(&topo.client, &topo.client_if);
    let wan = Framing {
        src_mac: client_mac,
        dst_mac: wan_mac,
        src: generator,
        dst: SocketAddrV4::new(GATEWAY_WAN.parse().expect("ip"), LISTEN_PORT),
    };
    for (i, size) in SIZES.into_iter().enumerate() {
        let count = if size < 512 { packets } else { packets / 4 };
        let inner = inner_packet(size, TUNNEL_SRC.parse().expect("ip"), LAN_HOST.parse().expect("ip"), SINK_PORT);
        let ring = session.encrypt_ring(&inner, count, &wan);
        cap.decrypt[i] = blast(&socket, &ring, None, &sink, size);
        println!(
            "     {size:>5} B: offered {:>10.0} pkt/s, delivered {:>10.0} pkt/s",
            cap.decrypt[i].offered_pps, cap.decrypt[i].delivered_pps
        );
    }
    drop(sink);

    println!("   {}: encrypt + forward", kind.name());
    let sink = Sink::attach(&topo.client, &topo.client_if, object.to_vec(), 0, LISTEN_PORT);
    let socket = PacketSocket::open(&topo.lan, &topo.lan_if);
    let lan = Framing {
        src_mac: lan_mac,
        dst_mac: gw_lan_mac,
        src: SocketAddrV4::new(LAN_HOST.parse().expect("ip"), 9998),
        dst: SocketAddrV4::new(TUNNEL_SRC.parse().expect("ip"), SINK_PORT),
    };
    for (i, size) in SIZES.into_iter().enumerate() {
        let inner = inner_packet(size, LAN_HOST.parse().expect("ip"), TUNNEL_SRC.parse().expect("ip"), SINK_PORT);
        let mut ring = FrameRing::with_capacity(Framing::frame_len(size - 28), 1024);
        for _ in 0..1024 {
            lan.push(&mut ring, &inner[28..]);
        }
        cap.encrypt[i] = blast(&socket, &ring, Some(Duration::from_secs(u64::from(seconds))), &sink, size);
        println!(
            "     {size:>5} B: offered {:>10.0} pkt/s, delivered {:>10.0} pkt/s",
            cap.encrypt[i].offered_pps, cap.encrypt[i].delivered_pps
        );
    }
    drop(sink);
    drop(session);
    drop(gateway);
    cap
}

/// Bare ChaCha20-Poly1305 open of 1420-byte payloads (ring) on the generator
/// core, for about a second: packets per second.
pub fn bare_open_rate() -> f64 {
    use wgxdp_dataplane::noise::aead::TransportKey;
    use wgxdp_dataplane::noise::AeadBackend;
    pin_current_thread(GENERATOR_CPU);
    let key = TransportKey::new(AeadBackend::Ring, &[7u8; 32]);
    let nonce = [0u8; 12];
    let mut sealed = vec![0u8; 1420 + 16];
    key.seal(&nonce, &[], &mut sealed);
    let mut buf = sealed.clone();
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs(1) {
        for _ in 0..256 {
            buf.copy_from_slice(&sealed);
            let _ = std::hint::black_box(key.open(&nonce, &[], &mut buf));
        }
        n += 256;
    }
    n as f64 / start.elapsed().as_secs_f64()
}
