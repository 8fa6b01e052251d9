//! Fixtures for tests, fuzzing and benches (feature `testing`): a gateway and a
//! client `Device` with a confirmed session, and inner packets of a given size.

use crate::device::{Action, Device, PeerId};
use crate::noise::peer::PeerConfig;
use crate::noise::{AeadBackend, PresharedKey, PrivateKey};
use crate::wire::{ip_protocol, Ipv4Packet, IPV4_HEADER_LEN};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant, SystemTime};

pub const GATEWAY_ADDR: &str = "192.0.2.1:51820";
pub const CLIENT_ADDR: &str = "192.0.2.2:51820";

/// The gateway routes 10.0.2.0/24 to the client; the client routes everything
/// to the gateway.
#[derive(Debug)]
pub struct ConnectedPair {
    pub gateway: Device,
    pub client: Device,
    pub gateway_peer: PeerId,
    pub client_peer: PeerId,
    /// The gateway's receiver index for the session (what the client sends to).
    pub gateway_index: u32,
}

/// Both devices after a full handshake; the gateway has not yet received the
/// client's confirming keepalive (returned, as a UDP payload).
pub fn handshaken_pair(backend: AeadBackend) -> (ConnectedPair, Vec<u8>) {
    let now = Instant::now();
    let wall = SystemTime::now();
    let (kg, kc) = (PrivateKey::generate(), PrivateKey::generate());
    let (pg, pc) = (kg.public_key(), kc.public_key());
    let psk = PresharedKey::generate();
    let mut gateway = Device::new(kg, backend, 12, now);
    let mut client = Device::new(kc, backend, 12, now);
    let cfg = |k| PeerConfig { public_key: k, preshared_key: psk.clone(), persistent_keepalive: None };
    let gateway_peer = gateway.add_peer(cfg(pc), None, &["10.0.2.0/24".parse().expect("prefix")]).expect("peer");
    let client_peer = client
        .add_peer(cfg(pg), Some(GATEWAY_ADDR.parse().expect("addr")), &["0.0.0.0/0".parse().expect("prefix")])
        .expect("peer");
    let (g, c): (SocketAddr, SocketAddr) = (GATEWAY_ADDR.parse().expect("addr"), CLIENT_ADDR.parse().expect("addr"));
    let (mut out, mut out2) = (vec![0u8; 2048], vec![0u8; 2048]);
    client.initiate(client_peer);
    let t = client.poll_transmit(now, wall, &mut out).expect("initiation");
    let mut init = out[..t.len].to_vec();
    let Ok(Action::Send { bytes, .. }) = gateway.receive(c, &mut init, false, now, wall, &mut out2) else {
        panic!("the gateway did not answer the initiation")
    };
    let mut resp = bytes.to_vec();
    client.receive(g, &mut resp, false, now, wall, &mut out).expect("response accepted");
    let t = client.poll_transmit(now, wall, &mut out).expect("confirming keepalive");
    let gateway_index = u32::from_le_bytes(out[4..8].try_into().expect("4 bytes"));
    let keepalive = out[..t.len].to_vec();
    (ConnectedPair { gateway, client, gateway_peer, client_peer, gateway_index }, keepalive)
}

/// Builds both devices and runs a full handshake plus the confirming keepalive.
pub fn connected_pair(backend: AeadBackend) -> ConnectedPair {
    let (mut pair, mut keepalive) = handshaken_pair(backend);
    let mut out = vec![0u8; 2048];
    let c: SocketAddr = CLIENT_ADDR.parse().expect("addr");
    pair.gateway
        .receive(c, &mut keepalive, false, Instant::now(), SystemTime::now(), &mut out)
        .expect("keepalive accepted");
    pair
}

/// An IPv4/UDP packet of exactly `len` (≥ 20) bytes.
pub fn ipv4_packet(len: usize, src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    let mut buf = vec![0xabu8; len.max(IPV4_HEADER_LEN)];
    let payload = buf.len() - IPV4_HEADER_LEN;
    Ipv4Packet::emit(&mut buf[..], Ipv4Addr::from(src), Ipv4Addr::from(dst), ip_protocol::UDP, 64, payload)
        .expect("fits");
    buf
}

/// `packet` as a router forwards it: one hop less (TTL and checksum).
pub fn forwarded(packet: &[u8]) -> Vec<u8> {
    let mut p = packet.to_vec();
    assert!(crate::flow::decrement_hop(&mut p), "a forwardable packet");
    p
}

/// An IPv4 packet of `len` bytes of `protocol` (6 TCP, 17 UDP, 1 ICMP) with
/// these ports (for ICMP: type and code in the first, identifier in the
/// second), TTL `ttl` and a valid header checksum.
pub fn ipv4_l4_packet(len: usize, src: [u8; 4], dst: [u8; 4], protocol: u8, ports: (u16, u16), ttl: u8) -> Vec<u8> {
    let mut buf = vec![0u8; len.max(IPV4_HEADER_LEN + 8)];
    let payload = buf.len() - IPV4_HEADER_LEN;
    Ipv4Packet::emit(&mut buf[..], Ipv4Addr::from(src), Ipv4Addr::from(dst), protocol, ttl, payload).expect("fits");
    let l4 = &mut buf[IPV4_HEADER_LEN..];
    if protocol == ip_protocol::ICMP {
        l4[..2].copy_from_slice(&ports.0.to_be_bytes());
        l4[4..6].copy_from_slice(&ports.1.to_be_bytes());
    } else {
        l4[..2].copy_from_slice(&ports.0.to_be_bytes());
        l4[2..4].copy_from_slice(&ports.1.to_be_bytes());
    }
    buf
}

/// `packet` (an IPv4 TCP packet of `ipv4_l4_packet`) with these TCP flags
/// (`flow::tcp_flags`).
pub fn with_tcp_flags(mut packet: Vec<u8>, flags: u8) -> Vec<u8> {
    packet[IPV4_HEADER_LEN + 13] = flags;
    packet
}

/// An IPv6/UDP packet with `payload_len` payload bytes.
pub fn ipv6_packet(payload_len: usize, src: std::net::Ipv6Addr, dst: std::net::Ipv6Addr) -> Vec<u8> {
    let mut buf = vec![0xabu8; crate::wire::IPV6_HEADER_LEN + payload_len];
    crate::wire::Ipv6Packet::emit(&mut buf[..], src, dst, ip_protocol::UDP, 64, payload_len).expect("fits");
    buf
}

/// The bytes `dev.send(packet)` produced, panicking if it did not send.
pub fn sent_bytes(dev: &mut Device, packet: &[u8], now: Instant) -> Vec<u8> {
    let mut out = vec![0u8; 65536];
    match dev.send(packet, now, SystemTime::now(), &mut out) {
        Ok(Action::Send { bytes, .. }) => bytes.to_vec(),
        other => panic!("expected a datagram to send, got {other:?}"),
    }
}

/// Frames in a `MemoryWorker`'s pool (both ports).
pub const MEMORY_FRAMES: usize = 2048;

/// A worker over in-memory frame queues, with a client `Device` that has a
/// session with it: the whole per-packet loop without a NIC.
pub struct MemoryWorker {
    pub worker: crate::worker::Worker<crate::frame_io::MemoryFrames>,
    pub client: Device,
    /// The client's peer id for the gateway.
    pub client_peer: PeerId,
    /// The gateway's peer id for the client.
    pub gateway_peer: PeerId,
    /// The gateway's receiver index for the session.
    pub gateway_index: u32,
    pub counters: std::sync::Arc<crate::worker::WorkerCounters>,
    /// What the worker shares with the others (tables, the under-load deadline).
    pub shared: std::sync::Arc<crate::worker::Shared>,
    /// Kept so the worker's queues stay connected.
    _handshakes: crossbeam_channel::Receiver<crate::worker::HandshakeJob>,
    _control: crossbeam_channel::Receiver<crate::worker::ControlEvent>,
    _gateway: Device,
    /// The crypto threads' helpers (after `worker`: stopped after it).
    crypto: Option<crate::crypto_pool::CryptoPool>,
    /// Where the client seals (reused: benches seal thousands ahead).
    client_out: Vec<u8>,
}

impl core::fmt::Debug for MemoryWorker {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("MemoryWorker").finish_non_exhaustive()
    }
}

pub const GATEWAY_WAN_MAC: crate::wire::MacAddr = crate::wire::MacAddr([2, 0, 0, 0, 0, 1]);
pub const CLIENT_MAC: crate::wire::MacAddr = crate::wire::MacAddr([2, 0, 0, 0, 0, 2]);
pub const GATEWAY_LAN_MAC: crate::wire::MacAddr = crate::wire::MacAddr([2, 0, 0, 0, 1, 1]);
pub const LAN_HOST_MAC: crate::wire::MacAddr = crate::wire::MacAddr([2, 0, 0, 0, 1, 2]);
/// The LAN host behind the gateway; the client's tunnel address.
pub const LAN_HOST: [u8; 4] = [10, 0, 1, 5];
pub const CLIENT_TUNNEL: [u8; 4] = [10, 0, 2, 9];

impl MemoryWorker {
    /// A worker that seals and opens inline (`crypto_threads = 1`).
    pub fn new(backend: AeadBackend) -> Self {
        Self::with_crypto_threads(backend, 1)
    }

    /// A worker whose AEAD runs on `crypto_threads` threads, itself included
    /// (`crypto_threads - 1` helpers, pinned to the usable cores after the
    /// first as a gateway pins them when that core runs the worker).
    pub fn with_crypto_threads(backend: AeadBackend, crypto_threads: usize) -> Self {
        Self::with_frames(backend, crypto_threads, MEMORY_FRAMES)
    }

    /// `with_crypto_threads` over a pool of `frames` frames (benches feed
    /// long runs: a quarter of the pool may wait in each tx queue).
    pub fn with_frames(backend: AeadBackend, crypto_threads: usize, frames: usize) -> Self {
        use crate::worker::{Shared, Worker, WorkerCounters};
        use std::sync::atomic::{AtomicBool, AtomicU64};
        use std::sync::Arc;
        let (mut pair, keepalive) = handshaken_pair(backend);
        // The client's site may reach the LAN host's network (10.0.1.0/24).
        let local = crate::policy::ForwardingPolicy::allow_local(vec!["10.0.1.0/24".parse().expect("prefix")]);
        pair.gateway.set_policy(pair.gateway_peer, local);
        let (hs_tx, hs_rx) = crossbeam_channel::bounded(64);
        let (ctl_tx, ctl_rx) = crossbeam_channel::bounded(64);
        let (neighbors, _) = crate::neighbors::NeighborTable::new();
        neighbors.replace([(std::net::IpAddr::from(LAN_HOST), LAN_HOST_MAC)].into_iter().collect());
        let shared = Arc::new(Shared {
            tables: pair.gateway.tables().clone(),
            cookies: pair.gateway.cookie_checker().clone(),
            staging: pair.gateway.staging().clone(),
            from_kernel: Arc::new(crate::staging::StagingPool::new(64)),
            handshakes: hs_tx,
            control: ctl_tx,
            neighbors,
            host_tun: None,
            host_addresses: Arc::new(crate::host::HostAddresses::default()),
            kernel_udp: Arc::new(std::net::UdpSocket::bind("127.0.0.1:0").expect("loopback UDP socket")),
            wan_next_hops: crate::neighbors::WanNextHops::new().0,
            lan_mac: GATEWAY_LAN_MAC,
            lan_next_hop: None,
            tunnel_mtu: 1420,
            lan_ipv4: Some(Ipv4Addr::new(10, 0, 1, 1)),
            lan_ipv6: None,
            conntrack: Arc::new(crate::conntrack::ConnTrack::new(crate::conntrack::DEFAULT_FLOWS)),
            under_load_until: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let counters = Arc::new(WorkerCounters::default());
        let frames = crate::frame_io::MemoryFrames::new(frames, 2048);
        let mut worker = Worker::new(0, shared.clone(), frames, counters.clone());
        let crypto = (crypto_threads > 1).then(|| {
            let mut pool = crate::crypto_pool::CryptoPoolBuilder::default();
            worker.set_crypto(crate::worker::CryptoRings::new(&mut pool));
            // Pinned as a gateway pins them: the worker's core is the first
            // usable one (a bench pins itself there), the helpers the others.
            let cores = crate::gateway::usable_cores();
            let plan = crate::gateway::CryptoPlan::new(&cores, 1, Some(crypto_threads));
            pool.start(crypto_threads - 1, &plan.helper_cores).expect("crypto helpers start")
        });
        let mut m = Self {
            worker,
            client: pair.client,
            client_peer: pair.client_peer,
            gateway_peer: pair.gateway_peer,
            gateway_index: pair.gateway_index,
            counters,
            shared,
            _handshakes: hs_rx,
            _control: ctl_rx,
            _gateway: pair.gateway,
            crypto,
            client_out: vec![0u8; 65536],
        };
        // The confirming keepalive arrives at the worker, as on the wire; the
        // control side then promotes the session and publishes it.
        let frame = m.frame_payload(&keepalive);
        assert!(m.worker.frames_mut().inject(crate::frame_io::Port::Wan, &frame));
        m.run_until_idle(&mut Vec::new(), Instant::now());
        m._gateway.tick_at(Instant::now(), SystemTime::now());
        m
    }

    /// Wakes parked crypto helpers and waits (10 ms at most) until they run
    /// (benches: before a timed run, as sustained traffic keeps them awake).
    pub fn wake_helpers(&self) {
        if let Some(pool) = &self.crypto {
            pool.wake_all(Duration::from_millis(10));
        }
    }

    /// Stops the crypto helpers: the worker runs its jobs itself, when it
    /// waits for one (tests).
    pub fn stop_helpers(&mut self) {
        self.crypto = None;
    }

    /// Helper threads running this worker's AEAD besides itself.
    pub fn crypto_helpers(&self) -> usize {
        self.crypto.as_ref().map_or(0, crate::crypto_pool::CryptoPool::helpers)
    }

    /// The control side: the handshake jobs and events (staged packets) the
    /// worker queued, and the gateway `Device` that serves them (as the control
    /// thread does).
    pub fn control_side(
        &mut self,
    ) -> (
        &crossbeam_channel::Receiver<crate::worker::HandshakeJob>,
        &crossbeam_channel::Receiver<crate::worker::ControlEvent>,
        &mut Device,
    ) {
        (&self._handshakes, &self._control, &mut self._gateway)
    }

    /// Publishes what the client's site may reach (as the control thread does).
    pub fn set_policy(&mut self, policy: crate::policy::ForwardingPolicy) {
        assert!(self._gateway.set_policy(self.gateway_peer, policy));
    }

    /// A client datagram `payload`, framed as it arrives on the WAN.
    pub fn frame_payload(&self, payload: &[u8]) -> Vec<u8> {
        let hdr = crate::frame::udp_headers_len(false);
        let mut frame = vec![0u8; hdr + payload.len()];
        frame[hdr..].copy_from_slice(payload);
        let path = crate::peer_view::L2Path {
            local_mac: CLIENT_MAC,
            remote_mac: GATEWAY_WAN_MAC,
            local: CLIENT_ADDR.parse().expect("addr"),
        };
        crate::frame::write_udp_headers(&mut frame, &path, GATEWAY_ADDR.parse().expect("addr"), false)
            .expect("headers fit");
        frame
    }

    /// The client's transport datagram for `inner`, framed as it arrives on the WAN.
    pub fn wan_frame(&mut self, inner: &[u8], now: Instant) -> Vec<u8> {
        let mut out = std::mem::take(&mut self.client_out);
        let frame = match self.client.send(inner, now, SystemTime::now(), &mut out) {
            Ok(Action::Send { bytes, .. }) => self.frame_payload(bytes),
            other => panic!("expected a datagram to send, got {other:?}"),
        };
        self.client_out = out;
        frame
    }

    /// `inner` as the LAN host sends it to the gateway.
    pub fn lan_frame(inner: &[u8]) -> Vec<u8> {
        let mut frame = vec![0u8; crate::wire::ETHERNET_HEADER_LEN + inner.len()];
        frame[crate::wire::ETHERNET_HEADER_LEN..].copy_from_slice(inner);
        crate::frame::write_ethernet_header(&mut frame, GATEWAY_LAN_MAC, LAN_HOST_MAC, false).expect("fits");
        frame
    }

    /// Runs the worker until its queues are empty; returns frames processed.
    pub fn run_until_idle(&mut self, batch: &mut Vec<crate::frame_io::MemoryFrame>, now: Instant) -> usize {
        let mut total = 0;
        loop {
            let n = self.worker.process_batch(batch, now);
            if n == 0 {
                return total;
            }
            total += n;
        }
    }
}
