//! The per-queue data-plane loop: one thread owns the WAN and LAN AF_XDP
//! sockets of one queue and moves batches between them.
//!
//! - WAN rx, transport data: receiver index → keypair → decrypt in place →
//!   allowed-IPs source check → copy into a LAN frame (next-hop MAC from the
//!   neighbour table) → LAN tx.
//! - WAN rx, handshake messages: copied to the control thread's bounded queue.
//!   When that queue is filling ("under load", sticky for a second),
//!   initiations without a valid cookie are answered here with a cookie reply.
//! - LAN rx: destination → peer (allowed IPs) → the peer's published keypair
//!   and endpoint → headers and sealed payload written straight into a WAN
//!   frame → WAN tx. Without a session the packet is staged with the control
//!   thread, which starts a handshake.
//!
//! Nothing here takes a lock or allocates per packet (staging a packet for a
//! peer with no session copies it once; that is the slow path).

use crate::device::{IndexValue, PeerId};
use crate::frame::{parse_ip_frame, parse_udp_frame, udp_headers_len, write_ethernet_header, write_udp_headers};
use crate::frame_io::FrameIo;
use crate::neighbors::{NeighborTable, RawInjector};
use crate::noise::cookie::{CookieChecker, MacVerdict};
use crate::noise::session::{sealed_len, WorkerToken};
use crate::peer_view::{monotonic_nanos, Activity, Endpoint, PeerViews};
use crate::table::{IndexTable, SharedAllowedIps};
use crate::wire::{MacAddr, MessageType, TransportHeader, COOKIE_REPLY_LEN, ETHERNET_HEADER_LEN, TRANSPORT_HEADER_LEN};
use crate::xsk::XskSocket;
use crossbeam_channel::{Sender, TrySendError};
use std::net::{IpAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Frames taken from each ring per loop iteration.
pub const BATCH: usize = 64;
/// "Under load" lasts this long after the handshake queue was last found filling.
const UNDER_LOAD_STICKY: Duration = Duration::from_secs(1);

/// A handshake message for the control thread, with where it came from.
#[derive(Debug, Clone)]
pub struct HandshakeJob {
    pub bytes: [u8; 148],
    pub len: usize,
    pub from: Endpoint,
}

/// Work for the control thread besides handshakes.
pub enum ControlEvent {
    /// A packet for `peer`, which has no session yet.
    Stage { peer: PeerId, packet: Vec<u8> },
    /// Run this on the control thread (configuration changes, status queries).
    Exec(Box<dyn FnOnce(&mut crate::device::Device) + Send>),
}

impl core::fmt::Debug for ControlEvent {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::Stage { peer, packet } => write!(f, "Stage({peer}, {} bytes)", packet.len()),
            Self::Exec(_) => f.write_str("Exec(..)"),
        }
    }
}

/// What one worker did, by outcome. Relaxed atomics: read for metrics.
#[derive(Debug, Default)]
pub struct WorkerCounters {
    pub wan_rx: AtomicU64,
    pub lan_rx: AtomicU64,
    pub decrypted: AtomicU64,
    pub encrypted: AtomicU64,
    pub keepalives_received: AtomicU64,
    pub handshakes_queued: AtomicU64,
    pub cookie_replies: AtomicU64,
    pub via_kernel: AtomicU64,
    pub neighbor_misses: AtomicU64,
    pub staged: AtomicU64,
    pub drop_malformed: AtomicU64,
    pub drop_unknown_index: AtomicU64,
    pub drop_replay: AtomicU64,
    pub drop_authentication: AtomicU64,
    pub drop_expired: AtomicU64,
    pub drop_wrong_worker: AtomicU64,
    pub drop_source_not_allowed: AtomicU64,
    pub drop_no_route: AtomicU64,
    pub drop_oversize: AtomicU64,
    pub icmp_too_big: AtomicU64,
    pub drop_no_frame: AtomicU64,
    pub drop_handshake_queue_full: AtomicU64,
    pub drop_invalid_mac1: AtomicU64,
}

impl WorkerCounters {
    /// (name, value) for every counter, for logs and metrics.
    pub fn named(&self) -> Vec<(&'static str, u64)> {
        macro_rules! all {
            ($($f:ident),*) => { vec![$((stringify!($f), self.$f.load(Relaxed))),*] };
        }
        all!(
            wan_rx,
            lan_rx,
            decrypted,
            encrypted,
            keepalives_received,
            handshakes_queued,
            cookie_replies,
            via_kernel,
            neighbor_misses,
            staged,
            drop_malformed,
            drop_unknown_index,
            drop_replay,
            drop_authentication,
            drop_expired,
            drop_wrong_worker,
            drop_source_not_allowed,
            drop_no_route,
            drop_oversize,
            icmp_too_big,
            drop_no_frame,
            drop_handshake_queue_full,
            drop_invalid_mac1
        )
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Relaxed);
}

/// Everything the workers share (read-mostly, lock-free).
pub struct Shared {
    pub indices: Arc<IndexTable<IndexValue>>,
    pub allowed_ips: Arc<SharedAllowedIps<PeerId>>,
    pub views: Arc<PeerViews>,
    pub cookies: Arc<CookieChecker>,
    pub handshakes: Sender<HandshakeJob>,
    pub control: Sender<ControlEvent>,
    pub neighbors: Arc<NeighborTable>,
    /// Sends packets whose next hop is not resolved yet through the kernel
    /// (`None`: such packets wait for the resolver, e.g. in tests).
    pub injector: Option<RawInjector>,
    /// For datagrams to a peer whose link-layer path is not known yet.
    pub kernel_udp: Arc<UdpSocket>,
    pub lan_mac: MacAddr,
    /// Next hop for every LAN-bound packet; `None`: the destination is on-link.
    pub lan_next_hop: Option<IpAddr>,
    /// Largest inner packet sent into the tunnel.
    pub tunnel_mtu: usize,
    /// Our addresses on the LAN, the source of ICMP errors we send there.
    pub lan_ipv4: Option<std::net::Ipv4Addr>,
    pub lan_ipv6: Option<std::net::Ipv6Addr>,
    /// Until when (monotonic nanos) the gateway counts as under load.
    pub under_load_until: AtomicU64,
    pub stop: AtomicBool,
}

impl core::fmt::Debug for Shared {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Shared").field("lan_mac", &self.lan_mac).finish_non_exhaustive()
    }
}

/// One queue's worker. Built anywhere, `run` on its own (pinned) thread.
/// Generic over its frame queues so the same loop runs on AF_XDP sockets and,
/// for tests and benches, on `MemoryFrames`.
#[derive(Debug)]
pub struct Worker<S: FrameIo = XskSocket> {
    pub queue: u32,
    shared: Arc<Shared>,
    wan: S,
    lan: S,
    counters: Arc<WorkerCounters>,
    /// For the rare datagram sent through the kernel (no link-layer path yet),
    /// and for quoting a packet in an ICMP error.
    scratch: Vec<u8>,
    /// ICMP errors this worker may still send in the current second.
    icmp_budget: u32,
    icmp_second: Instant,
}

/// ICMP errors per worker per second, at most (routers rate-limit them).
const ICMP_PER_SECOND: u32 = 100;

enum TransportOutcome {
    Keepalive,
    /// The inner packet lies at this range of the WAN frame.
    Data {
        peer: PeerId,
        packet: core::ops::Range<usize>,
    },
}

impl<S: FrameIo> Worker<S> {
    pub fn new(queue: u32, shared: Arc<Shared>, wan: S, lan: S, counters: Arc<WorkerCounters>) -> Self {
        Self {
            queue,
            shared,
            wan,
            lan,
            counters,
            scratch: vec![0u8; 65536],
            icmp_budget: ICMP_PER_SECOND,
            icmp_second: Instant::now(),
        }
    }

    /// One batch from each side, processed and flushed; returns the frames taken.
    pub fn process_batch(&mut self, batch: &mut Vec<S::Frame>, token: &WorkerToken, now: Instant) -> usize {
        let mut work = self.wan.recv(batch, BATCH);
        for frame in batch.drain(..) {
            self.on_wan(frame, token, now);
        }
        work += self.lan.recv(batch, BATCH);
        for frame in batch.drain(..) {
            self.on_lan(frame, now);
        }
        self.wan.flush();
        self.lan.flush();
        work
    }

    /// The WAN and LAN frame queues (for tests and benches that feed them).
    pub fn queues_mut(&mut self) -> (&mut S, &mut S) {
        (&mut self.wan, &mut self.lan)
    }

    fn on_wan(&mut self, mut frame: S::Frame, token: &WorkerToken, now: Instant) {
        bump(&self.counters.wan_rx);
        let Ok(udp) = parse_udp_frame(self.wan.data(&frame)) else {
            bump(&self.counters.drop_malformed);
            return self.wan.release(frame);
        };
        let kind = MessageType::of(&self.wan.data(&frame)[udp.payload.clone()]);
        match kind {
            Ok(MessageType::Transport) => {
                let outcome = self.open_transport(&mut frame, &udp, token, now);
                match outcome {
                    Some(TransportOutcome::Data { peer, packet }) => self.deliver_to_lan(&frame, peer, packet),
                    Some(TransportOutcome::Keepalive) => bump(&self.counters.keepalives_received),
                    None => {}
                }
                self.wan.release(frame);
            }
            Ok(_) => self.on_handshake(frame, &udp, now),
            Err(_) => {
                bump(&self.counters.drop_malformed);
                self.wan.release(frame);
            }
        }
    }

    /// Decrypts in place; counts and returns None on any rejection.
    fn open_transport(
        &mut self,
        frame: &mut S::Frame,
        udp: &crate::frame::UdpFrame,
        token: &WorkerToken,
        now: Instant,
    ) -> Option<TransportOutcome> {
        let shared = &self.shared;
        let c = &self.counters;
        let payload = udp.payload.clone();
        let result = self.wan.with_data_mut(frame, None, |buf| {
            let msg = TransportHeader::new_checked(&mut buf[payload.clone()]).map_err(|_| &c.drop_malformed)?;
            let entry = shared.indices.get(msg.receiver()).ok_or(&c.drop_unknown_index)?;
            let keypair = entry.value.keypair.as_ref().ok_or(&c.drop_unknown_index)?;
            let plain = keypair.open(token, msg, now).map_err(|e| match e {
                crate::noise::ReceiveError::Replay => &c.drop_replay,
                crate::noise::ReceiveError::Authentication => &c.drop_authentication,
                crate::noise::ReceiveError::Expired => &c.drop_expired,
                crate::noise::ReceiveError::WrongWorker => &c.drop_wrong_worker,
            })?;
            Ok((entry.value.peer, plain.len()))
        });
        let (peer, plain_len) = match result {
            Ok(v) => v,
            Err(counter) => {
                bump(counter);
                return None;
            }
        };
        let view = shared.views.get(peer)?;
        let nanos = monotonic_nanos(now);
        Activity::record(&view.activity.authenticated_received, nanos);
        // Roaming (section 2.1): the endpoint follows the last authenticated packet.
        view.update_endpoint(Endpoint { addr: udp.src, path: Some(udp.reply_path()) });
        if plain_len == 0 {
            return Some(TransportOutcome::Keepalive);
        }
        let start = payload.start + TRANSPORT_HEADER_LEN;
        let inner = &self.wan.data(frame)[start..start + plain_len];
        let Ok(ip) = crate::frame::parse_ip_frame_payload(inner) else {
            bump(&c.drop_malformed);
            return None;
        };
        if shared.allowed_ips.load().lookup(ip.src) != Some(peer) {
            bump(&c.drop_source_not_allowed);
            return None;
        }
        Activity::record(&view.activity.data_received, nanos);
        view.counters.rx_bytes.fetch_add(ip.len as u64, Relaxed);
        view.counters.rx_packets.fetch_add(1, Relaxed);
        bump(&c.decrypted);
        Some(TransportOutcome::Data { peer, packet: start..start + ip.len })
    }

    /// Sends a decrypted inner packet (at `packet` in the WAN frame) to the site.
    fn deliver_to_lan(&mut self, wan_frame: &S::Frame, _peer: PeerId, packet: core::ops::Range<usize>) {
        let inner = &self.wan.data(wan_frame)[packet];
        let v6 = inner[0] >> 4 == 6;
        let dst = crate::frame::parse_ip_frame_payload(inner).map(|p| p.dst).ok();
        let Some(dst) = dst else { return };
        let next_hop = self.shared.lan_next_hop.unwrap_or(dst);
        let Some(mac) = self.shared.neighbors.lookup(next_hop) else {
            // Never wait: the kernel resolves and sends this one; later ones hit.
            bump(&self.counters.neighbor_misses);
            self.shared.neighbors.request(next_hop);
            if self.shared.injector.as_ref().is_some_and(|i| i.send(inner, dst).is_ok()) {
                bump(&self.counters.via_kernel);
            }
            return;
        };
        let Some(mut out) = self.lan.alloc(ETHERNET_HEADER_LEN + inner.len()) else {
            bump(&self.counters.drop_no_frame);
            return;
        };
        let lan_mac = self.shared.lan_mac;
        self.lan
            .with_data_mut(&mut out, None, |buf| {
                buf[ETHERNET_HEADER_LEN..].copy_from_slice(inner);
                write_ethernet_header(buf, mac, lan_mac, v6)
            })
            .ok();
        self.lan.send(out);
    }

    fn on_handshake(&mut self, frame: S::Frame, udp: &crate::frame::UdpFrame, now: Instant) {
        let msg = &self.wan.data(&frame)[udp.payload.clone()];
        let mut job = HandshakeJob {
            bytes: [0u8; 148],
            len: msg.len(),
            from: Endpoint { addr: udp.src, path: Some(udp.reply_path()) },
        };
        if msg.len() > job.bytes.len() {
            bump(&self.counters.drop_malformed);
            return self.wan.release(frame);
        }
        job.bytes[..msg.len()].copy_from_slice(msg);
        let nanos = monotonic_nanos(now);
        let queue = &self.shared.handshakes;
        let filling = queue.capacity().is_some_and(|cap| queue.len() >= cap / 8);
        if filling {
            self.shared.under_load_until.store(nanos + UNDER_LOAD_STICKY.as_nanos() as u64, Relaxed);
        }
        let under_load = nanos < self.shared.under_load_until.load(Relaxed);
        let is_handshake = matches!(
            MessageType::of(&job.bytes),
            Ok(MessageType::HandshakeInitiation | MessageType::HandshakeResponse)
        );
        if under_load && is_handshake {
            match self.shared.cookies.verify(&job.bytes[..job.len], udp.src, now) {
                MacVerdict::InvalidMac1 => {
                    bump(&self.counters.drop_invalid_mac1);
                    return self.wan.release(frame);
                }
                MacVerdict::ValidWithoutCookie => return self.answer_with_cookie(frame, udp, &job, now),
                MacVerdict::ValidWithCookie => {}
            }
        }
        self.wan.release(frame);
        match queue.try_send(job) {
            Ok(()) => bump(&self.counters.handshakes_queued),
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.shared.under_load_until.store(nanos + UNDER_LOAD_STICKY.as_nanos() as u64, Relaxed);
                bump(&self.counters.drop_handshake_queue_full);
            }
        }
    }

    /// Turns the received frame into a cookie reply to its sender (section 5.4.7).
    fn answer_with_cookie(
        &mut self,
        mut frame: S::Frame,
        udp: &crate::frame::UdpFrame,
        job: &HandshakeJob,
        now: Instant,
    ) {
        let sender = u32::from_le_bytes([job.bytes[4], job.bytes[5], job.bytes[6], job.bytes[7]]);
        let mut reply = [0u8; COOKIE_REPLY_LEN];
        self.shared.cookies.write_reply(&job.bytes[..job.len], sender, udp.src, now, &mut reply);
        let hdr = udp_headers_len(udp.src.is_ipv6());
        let path = udp.reply_path();
        let ok = self.wan.with_data_mut(&mut frame, Some(hdr + COOKIE_REPLY_LEN), |buf| {
            if buf.len() != hdr + COOKIE_REPLY_LEN {
                return false;
            }
            buf[hdr..].copy_from_slice(&reply);
            write_udp_headers(buf, &path, udp.src, false).is_ok()
        });
        if ok {
            bump(&self.counters.cookie_replies);
            self.wan.send(frame);
        } else {
            self.wan.release(frame);
        }
    }

    fn on_lan(&mut self, frame: S::Frame, now: Instant) {
        bump(&self.counters.lan_rx);
        self.encrypt_to_wan(&frame, now);
        self.lan.release(frame);
    }

    fn encrypt_to_wan(&mut self, frame: &S::Frame, now: Instant) {
        let shared = &self.shared;
        let c = &self.counters;
        let data = self.lan.data(frame);
        let Ok(ip) = parse_ip_frame(data) else { return bump(&c.drop_malformed) };
        let inner = &data[ip.packet.clone()];
        let Some(peer) = shared.allowed_ips.load().lookup(ip.dst) else { return bump(&c.drop_no_route) };
        let Some(view) = shared.views.get(peer) else { return bump(&c.drop_no_route) };
        if inner.len() > shared.tunnel_mtu {
            bump(&c.drop_oversize);
            let sender_mac = crate::wire::EthernetFrame::new_checked(data).map(|e| e.source()).ok();
            let v6 = ip.src.is_ipv6();
            let quote_len = inner.len().min(crate::icmp::quote_limit(v6));
            self.scratch[..quote_len].copy_from_slice(&inner[..quote_len]);
            if let Some(mac) = sender_mac {
                self.send_too_big(mac, ip.src, quote_len, now);
            }
            return;
        }
        let keypair = view.current.load();
        let endpoint = view.endpoint.load();
        let (Some(kp), Some(ep)) = (keypair.as_ref(), endpoint.as_ref()) else {
            view.attention.store(true, Relaxed);
            bump(&c.staged);
            let _ = shared.control.try_send(ControlEvent::Stage { peer, packet: inner.to_vec() });
            return;
        };
        if kp.is_expired(now) {
            view.attention.store(true, Relaxed);
            bump(&c.staged);
            let _ = shared.control.try_send(ControlEvent::Stage { peer, packet: inner.to_vec() });
            return;
        }
        let len = inner.len();
        match ep.path.filter(|p| p.local.is_ipv6() == ep.addr.is_ipv6()) {
            Some(path) => {
                let hdr = udp_headers_len(ep.addr.is_ipv6());
                let Some(mut out) = self.wan.alloc(hdr + sealed_len(len)) else { return bump(&c.drop_no_frame) };
                let sealed = self.wan.with_data_mut(&mut out, None, |buf| {
                    buf[hdr + TRANSPORT_HEADER_LEN..hdr + TRANSPORT_HEADER_LEN + len].copy_from_slice(inner);
                    kp.seal(&mut buf[hdr..], len, now).ok()?;
                    write_udp_headers(buf, &path, ep.addr, false).ok()
                });
                if sealed.is_none() {
                    self.wan.release(out);
                    return bump(&c.drop_expired);
                }
                self.wan.send(out);
            }
            None => {
                // No frame from this peer seen yet: let the kernel route this one.
                let Ok(n) = kp.encrypt(inner, &mut self.scratch, now) else { return bump(&c.drop_expired) };
                if shared.kernel_udp.send_to(&self.scratch[..n], ep.addr).is_err() {
                    return bump(&c.drop_no_route);
                }
                bump(&c.via_kernel);
            }
        }
        let nanos = monotonic_nanos(now);
        Activity::record(&view.activity.data_sent, nanos);
        Activity::record(&view.activity.authenticated_sent, nanos);
        view.counters.tx_bytes.fetch_add(len as u64, Relaxed);
        view.counters.tx_packets.fetch_add(1, Relaxed);
        bump(&c.encrypted);
    }
}

impl<S: FrameIo> Worker<S> {
    /// ICMP "fragmentation needed" / "packet too big" back to `to`, quoting the
    /// first `quote_len` bytes of `scratch`. Rate-limited per worker.
    fn send_too_big(&mut self, to_mac: MacAddr, to: IpAddr, quote_len: usize, now: Instant) {
        if now.duration_since(self.icmp_second) >= Duration::from_secs(1) {
            self.icmp_second = now;
            self.icmp_budget = ICMP_PER_SECOND;
        }
        let router = match to {
            IpAddr::V4(_) => self.shared.lan_ipv4.map(IpAddr::V4),
            IpAddr::V6(_) => self.shared.lan_ipv6.map(IpAddr::V6),
        };
        let Some(router) = router else { return };
        if self.icmp_budget == 0 {
            return;
        }
        let len = crate::icmp::packet_too_big_len(quote_len, to.is_ipv6());
        let Some(mut out) = self.lan.alloc(len) else { return bump(&self.counters.drop_no_frame) };
        let mtu = self.shared.tunnel_mtu.min(usize::from(u16::MAX)) as u16;
        let quote = &self.scratch[..quote_len];
        let lan_mac = self.shared.lan_mac;
        let ok = self
            .lan
            .with_data_mut(&mut out, None, |buf| {
                crate::icmp::packet_too_big(buf, quote, to, mtu, router, to_mac, lan_mac)
            })
            .is_ok();
        if ok {
            self.icmp_budget -= 1;
            bump(&self.counters.icmp_too_big);
            self.lan.send(out);
        } else {
            self.lan.release(out);
        }
    }
}

impl Worker<XskSocket> {
    /// Runs until `shared.stop` is set.
    pub fn run(mut self) {
        let token = WorkerToken::new();
        let mut batch = Vec::with_capacity(BATCH);
        let fds = [self.wan.raw_fd(), self.lan.raw_fd()];
        while !self.shared.stop.load(Relaxed) {
            if self.process_batch(&mut batch, &token, Instant::now()) == 0 {
                wait_readable(&fds, 5);
            }
        }
    }
}

/// Sleeps until one of `fds` is readable or `timeout_ms` passes.
fn wait_readable(fds: &[i32; 2], timeout_ms: i32) {
    let mut pfds = fds.map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 });
    // SAFETY: `pfds` is a valid array of pollfd for the length passed.
    unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout_ms) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::Action;
    use crate::frame_io::MemoryFrames;
    use crate::noise::AeadBackend;
    use crate::testing::{
        ipv4_packet, MemoryWorker, CLIENT_TUNNEL, GATEWAY_LAN_MAC, GATEWAY_WAN_MAC, LAN_HOST, LAN_HOST_MAC,
    };
    use std::time::SystemTime;

    fn wan(m: &mut MemoryWorker) -> &mut MemoryFrames {
        m.worker.queues_mut().0
    }

    fn lan(m: &mut MemoryWorker) -> &mut MemoryFrames {
        m.worker.queues_mut().1
    }

    #[test]
    fn the_loop_decrypts_to_the_lan_and_encrypts_back_without_a_nic() {
        let mut m = MemoryWorker::new(AeadBackend::Ring);
        let now = Instant::now();
        let mut batch = Vec::new();
        // WAN → LAN: decrypted, framed for the LAN host.
        let inner = ipv4_packet(100, CLIENT_TUNNEL, LAN_HOST);
        let frame = m.wan_frame(&inner, now);
        assert!(wan(&mut m).inject(&frame));
        assert_eq!(m.run_until_idle(&mut batch, now), 1);
        let mut out = Vec::new();
        assert_eq!(lan(&mut m).take_sent(|f| out.push(f.to_vec())), 1);
        assert_eq!(&out[0][..6], &LAN_HOST_MAC.0, "to the LAN host's MAC");
        assert_eq!(&out[0][6..12], &GATEWAY_LAN_MAC.0);
        assert_eq!(&out[0][14..], &inner[..]);
        assert_eq!(m.counters.decrypted.load(Relaxed), 1);
        // The same frame again is a replay: counted, not delivered.
        assert!(wan(&mut m).inject(&frame));
        m.run_until_idle(&mut batch, now);
        assert_eq!(lan(&mut m).take_sent(|_| {}), 0);
        assert_eq!(m.counters.drop_replay.load(Relaxed), 1);

        // LAN → WAN: sealed straight into a WAN frame back to the client.
        let reply = ipv4_packet(200, LAN_HOST, CLIENT_TUNNEL);
        assert!(lan(&mut m).inject(&MemoryWorker::lan_frame(&reply)));
        m.run_until_idle(&mut batch, now);
        let mut sent = Vec::new();
        assert_eq!(wan(&mut m).take_sent(|f| sent.push(f.to_vec())), 1);
        let udp = crate::frame::parse_udp_frame(&sent[0]).expect("a UDP frame");
        assert_eq!(udp.src_mac, GATEWAY_WAN_MAC);
        assert_eq!(udp.dst, crate::testing::CLIENT_ADDR.parse().unwrap());
        let mut payload = sent[0][udp.payload.clone()].to_vec();
        let mut buf = vec![0u8; 2048];
        let got = m.client.receive(udp.src, &mut payload, false, now, SystemTime::now(), &mut buf);
        match got {
            Ok(Action::Deliver { packet, .. }) => assert_eq!(packet, &reply[..]),
            other => panic!("the client did not accept the gateway's packet: {other:?}"),
        }
        // No frame leaked on either side.
        assert_eq!(wan(&mut m).free_frames(), 1024);
        assert_eq!(lan(&mut m).free_frames(), 1024);
    }

    #[test]
    fn garbage_frames_are_counted_drops() {
        let mut m = MemoryWorker::new(AeadBackend::Ring);
        let now = Instant::now();
        let mut batch = Vec::new();
        let good = m.wan_frame(&ipv4_packet(64, CLIENT_TUNNEL, LAN_HOST), now);
        for len in [0, 13, 14, 42, 50, good.len() - 1] {
            assert!(wan(&mut m).inject(&good[..len]));
            assert!(lan(&mut m).inject(&good[..len]));
        }
        let mut flipped = good.clone();
        flipped[60] ^= 1;
        assert!(wan(&mut m).inject(&flipped));
        m.run_until_idle(&mut batch, now);
        assert_eq!(lan(&mut m).take_sent(|_| {}), 0);
        assert_eq!(wan(&mut m).take_sent(|_| {}), 0);
        let dropped: u64 = m.counters.named().iter().filter(|(k, _)| k.starts_with("drop_")).map(|(_, v)| v).sum();
        assert_eq!(dropped, 13, "every bad frame is a counted drop: {:?}", m.counters.named());
    }
}
