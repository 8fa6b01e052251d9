//! Handshake workload: many peers (re)connect at once. The gateway knows 512
//! peers; the generator sends their initiations round-robin (each peer at
//! most every 55 ms, under every implementation's per-peer limit) and counts
//! the responses and cookie replies that come back. Meanwhile an established
//! tunnel sends 1 000 data packets per second; the sink on the LAN host
//! counts how many arrive during the flood.

use crate::capacity::{self, Kind, GENERATOR, SINK_PORT, TUNNEL_SRC};
use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use wgxdp_dataplane::device::Device;
use wgxdp_dataplane::noise::peer::PeerConfig;
use wgxdp_dataplane::noise::{AeadBackend, PresharedKey, PrivateKey, PublicKey};
use wgxdp_integration::blast::{inner_packet, mac_of, ClientSession, Framing, PacketSocket, Sink};
use wgxdp_integration::site::{SiteTopology, GATEWAY_WAN, LAN_HOST, LISTEN_PORT};

const PEERS: usize = 512;
const ROUND: Duration = Duration::from_millis(55);
const DATA_PER_SECOND: usize = 1000;

#[derive(Debug, Default, Clone, Copy)]
pub struct Handshakes {
    pub offered_per_s: f64,
    pub completed_per_s: f64,
    pub cookie_replies_per_s: f64,
    /// Data packets of the established tunnel: sent during the flood, delivered.
    pub tunnel_sent: u64,
    pub tunnel_delivered: u64,
}

/// Initiations for `rounds` rounds of every peer, in sending order.
fn initiations(keys: &[PrivateKey], gateway: PublicKey, to: SocketAddr, rounds: usize) -> Vec<Vec<u8>> {
    let t0 = Instant::now();
    let w0 = SystemTime::now();
    let mut devices: Vec<_> = keys
        .iter()
        .map(|k| {
            let mut d = Device::new(k.clone(), AeadBackend::Ring, 8, t0);
            let cfg =
                PeerConfig { public_key: gateway, preshared_key: PresharedKey::default(), persistent_keepalive: None };
            let p = d.add_peer(cfg, Some(to), &[]).expect("peer");
            (d, p)
        })
        .collect();
    let mut out = vec![0u8; 256];
    let mut all = Vec::with_capacity(rounds * keys.len());
    for r in 0..rounds {
        // Each round is "6 s later" for the protocol (past REKEY_TIMEOUT) and
        // 100 ms later on the wall clock (timestamps must grow per peer).
        let now = t0 + Duration::from_secs(6 * r as u64);
        let wall = w0 + Duration::from_millis(100 * r as u64);
        for (d, p) in &mut devices {
            d.initiate(*p);
            if let Some(t) = d.poll_transmit(now, wall, &mut out) {
                all.push(out[..t.len].to_vec());
            }
        }
    }
    all
}

pub fn measure(kind: Kind, wgxdp: &Path, object: &[u8], seconds: u32) -> Handshakes {
    let topo = SiteTopology::new("hs");
    let tunnel_key = PrivateKey::generate();
    let keys: Vec<PrivateKey> = (0..PEERS).map(|_| PrivateKey::generate()).collect();
    let mut peers = vec![(tunnel_key.public_key(), "10.200.0.0/24".to_owned())];
    peers.extend(
        keys.iter().enumerate().map(|(i, k)| (k.public_key(), format!("10.201.{}.{}/32", i / 250, i % 250 + 1))),
    );
    let (gateway, gateway_key) = capacity::start_gateway(kind, wgxdp, &topo, &peers);
    let gateway_addr: SocketAddr = format!("{GATEWAY_WAN}:{LISTEN_PORT}").parse().expect("addr");
    let generator: SocketAddrV4 = GENERATOR.parse().expect("addr");

    // The established tunnel and its paced data, framed ahead of time.
    let mut session = ClientSession::connect(&topo.client, tunnel_key, generator, gateway_addr, gateway_key);
    let wan = Framing {
        src_mac: mac_of(&topo.client, &topo.client_if),
        dst_mac: mac_of(&topo.gateway, &topo.gateway_wan),
        src: generator,
        dst: SocketAddrV4::new(GATEWAY_WAN.parse().expect("ip"), LISTEN_PORT),
    };
    let inner = inner_packet(64, TUNNEL_SRC.parse().expect("ip"), LAN_HOST.parse().expect("ip"), SINK_PORT);
    let data = session.encrypt_ring(&inner, DATA_PER_SECOND * seconds as usize, &wan);
    let sink = Sink::attach(&topo.lan, &topo.lan_if, object.to_vec(), SINK_PORT, 0);
    let data_socket = PacketSocket::open(&topo.client, &topo.client_if);

    let rounds = (Duration::from_secs(u64::from(seconds)).as_millis() / ROUND.as_millis()) as usize;
    println!("   {}: {} initiations from {PEERS} peers over {seconds} s…", kind.name(), rounds * PEERS);
    let flood = initiations(&keys, gateway_key, gateway_addr, rounds);
    let socket: UdpSocket = topo.client.udp_socket("10.100.0.2:0");
    socket.set_read_timeout(Some(Duration::from_millis(50))).expect("timeout");
    let stop = Arc::new(AtomicBool::new(false));
    let (responses, cookies) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let receiver = {
        let (socket, stop, responses, cookies) =
            (socket.try_clone().expect("clone"), stop.clone(), responses.clone(), cookies.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 256];
            while !stop.load(Relaxed) {
                if let Ok(n) = socket.recv(&mut buf) {
                    match (n, buf[0]) {
                        (92, 2) => responses.fetch_add(1, Relaxed),
                        (64, 3) => cookies.fetch_add(1, Relaxed),
                        _ => 0,
                    };
                }
            }
        })
    };
    let before = sink.packets();
    let start = Instant::now();
    let mut sent_data = 0usize;
    for (r, round) in flood.chunks(PEERS).enumerate() {
        for msg in round {
            let _ = socket.send_to(msg, gateway_addr);
        }
        // The tunnel's data for this round's share of time.
        let due = ((start.elapsed().as_secs_f64() * DATA_PER_SECOND as f64) as usize).min(data.len());
        if due > sent_data {
            sent_data += data_socket.send(&data, sent_data..due);
        }
        let next = start + ROUND * (r as u32 + 1);
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Relaxed);
    receiver.join().expect("receiver");
    let (delivered, _) = capacity::drain(&sink, start, before);
    drop(gateway);
    Handshakes {
        offered_per_s: flood.len() as f64 / elapsed,
        completed_per_s: responses.load(Relaxed) as f64 / elapsed,
        cookie_replies_per_s: cookies.load(Relaxed) as f64 / elapsed,
        tunnel_sent: sent_data as u64,
        tunnel_delivered: delivered,
    }
}
