//! The per-queue data-plane loop: one thread owns the WAN and LAN AF_XDP
//! sockets of one queue and moves batches between them.
//!
//! - WAN rx, transport data: `transport::open` (the one receive path) decrypts
//!   in place → the inner packet is framed for the LAN (next-hop MAC from the
//!   neighbour table) → LAN tx.
//! - WAN rx, handshake messages: copied to the control thread's bounded queue.
//!   When that queue is filling ("under load", sticky for a second),
//!   initiations without a valid cookie are answered here with a cookie reply.
//! - LAN rx: destination → peer (allowed IPs) → `transport::seal` on the peer's
//!   published keypair, written straight into a WAN frame → WAN tx. Without a
//!   usable session the packet is staged with the control thread (a buffer
//!   from the bounded staging pool), which starts a handshake.
//!
//! With crypto threads (`set_crypto`, `crypto_pool.rs`) the AEAD of both
//! directions runs on any of them while this thread keeps everything else:
//! it publishes each packet's AEAD job in arrival order, one ring per
//! direction (receive: after the index lookup and stale-counter check; send:
//! after it took the counter and wrote the header), and takes the outcomes
//! back in the same order, helping while it waits — the replay window,
//! roaming, the policy and the forwarding of each packet run here, in order.
//! Up to a batch of jobs per direction stays in flight from one batch to the
//! next (so the helpers never wait for this thread's own per-packet work); a
//! batch that receives nothing on a side finishes that side's jobs, so an
//! idle worker has nothing in flight.
//!
//! Nothing here takes a lock or allocates per packet.

use crate::admission::{self, Admission, SourceLimiter};
use crate::conntrack::{ConnTrack, FlowKey};
use crate::crypto_pool::{AeadJob, AeadOp, CryptoPoolBuilder, RingOwner};
use crate::drops::{DropCounters, DropReason};
use crate::flow::{self, Flow};
use crate::fragment::{fragment_ipv4, FragmentError};
use crate::frame::{
    parse_ip_frame, parse_ip_frame_payload, parse_udp_frame, udp_headers_len, write_ethernet_header, write_udp_headers,
    InnerPacket, UdpFrame,
};
use crate::frame_io::FrameIo;
use crate::host::{HostAddresses, HostTun};
use crate::icmp::IcmpError;
use crate::neighbors::{NeighborMap, NeighborTable, NeighborWait};
use crate::noise::cookie::CookieChecker;
use crate::noise::session::sealed_len;
use crate::noise::Keypair;
use crate::peer_view::{Endpoint, PeerId};
use crate::policy::Inbound;
use crate::snapshot::{PeerTally, Snapshot};
use crate::staging::StagingPool;
use crate::transport::{self, Opened, SealError, Tables};
use crate::wire::{
    MacAddr, MessageType, COOKIE_REPLY_LEN, ETHERNET_HEADER_LEN, HANDSHAKE_INITIATION_LEN, TRANSPORT_HEADER_LEN,
};
use crate::xsk::{Port, XskQueue};
use crossbeam_channel::Sender;
use std::net::{IpAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Frames taken from each ring per loop iteration.
pub const BATCH: usize = 64;
/// The largest handshake-queue message (an initiation).
pub const HANDSHAKE_JOB_LEN: usize = HANDSHAKE_INITIATION_LEN;

/// A handshake message for the control thread, with where it came from.
#[derive(Debug, Clone)]
pub struct HandshakeJob {
    pub bytes: [u8; HANDSHAKE_JOB_LEN],
    pub len: usize,
    pub from: Endpoint,
}

impl HandshakeJob {
    /// The message as received: exactly `len` bytes.
    pub fn message_mut(&mut self) -> &mut [u8] {
        let len = self.len.min(HANDSHAKE_JOB_LEN);
        &mut self.bytes[..len]
    }
}

/// Work for the control thread besides handshakes.
pub enum ControlEvent {
    /// A packet for `peer`, which has no usable session (a staging buffer).
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

macro_rules! worker_events {
    ($($(#[doc = $doc:literal])* $f:ident,)*) => {
        /// What one worker did, by outcome, besides drops (which are in
        /// `drops`, by reason). Relaxed atomics: read for metrics.
        #[derive(Debug, Default)]
        pub struct WorkerCounters {
            $($(#[doc = $doc])* pub $f: AtomicU64,)*
            pub drops: DropCounters,
        }

        impl WorkerCounters {
            /// (name, value) for every counter, drops last as `drop_<reason>`.
            pub fn named(&self) -> Vec<(&'static str, u64)> {
                let mut v = vec![$((stringify!($f), self.$f.load(Relaxed)),)*];
                v.extend(self.drops.named());
                v
            }
        }
    };
}

worker_events! {
    /// Frames received on the WAN socket.
    wan_rx,
    /// Frames received on the LAN socket.
    lan_rx,
    /// Transport data opened and forwarded to the site.
    decrypted,
    /// Inner packets sealed into the tunnel.
    encrypted,
    keepalives_received,
    /// Handshake messages handed to the control thread.
    handshakes_queued,
    /// Cookie replies sent by this worker under load.
    cookie_replies,
    /// Packets the kernel sent for us (neighbour or endpoint path unknown).
    via_kernel,
    neighbor_misses,
    /// Packets handed to the control thread to wait for a handshake.
    staged,
    /// ICMP "fragmentation needed" / "packet too big" sent.
    icmp_too_big,
    /// ICMP "time exceeded" sent (to the LAN or into a tunnel).
    icmp_time_exceeded,
    /// Packets from a tunnel delivered to the gateway host (an allow rule).
    to_host,
    /// AEAD jobs (either direction) a crypto thread other than the worker ran.
    crypto_offloaded,
}

impl WorkerCounters {
    #[inline]
    fn dropped(&self, reason: DropReason) {
        self.drops.count(reason);
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Relaxed);
}

fn add(c: &AtomicU64, n: usize) {
    if n > 0 {
        c.fetch_add(n as u64, Relaxed);
    }
}

/// Everything the workers share (read-mostly, lock-free).
pub struct Shared {
    pub tables: Tables,
    pub cookies: Arc<CookieChecker>,
    /// Packets waiting for a handshake (LAN to WAN).
    pub staging: Arc<StagingPool>,
    /// Inner packets the kernel slow path decrypted, on their way to worker 0
    /// (its own pool: outbound staging can never starve inbound traffic).
    pub from_kernel: Arc<StagingPool>,
    pub handshakes: Sender<HandshakeJob>,
    pub control: Sender<ControlEvent>,
    pub neighbors: Arc<NeighborTable>,
    /// The kernel's view of the tunnels (`host.rs`): packets for the gateway
    /// host enter the kernel here as received traffic (`None`: they are
    /// dropped, counted, e.g. in tests).
    pub host_tun: Option<Arc<HostTun>>,
    /// Every address of the gateway host.
    pub host_addresses: Arc<HostAddresses>,
    /// For datagrams to a peer whose link-layer path is not known yet
    /// (non-blocking: a full send buffer is a counted drop, never a wait).
    pub kernel_udp: Arc<UdpSocket>,
    /// Which WAN destinations the kernel can send to without queueing.
    pub wan_next_hops: Arc<crate::neighbors::WanNextHops>,
    pub lan_mac: MacAddr,
    /// Next hop for every LAN-bound packet; `None`: the destination is on-link.
    pub lan_next_hop: Option<IpAddr>,
    /// Largest inner packet sent into the tunnel.
    pub tunnel_mtu: usize,
    /// Our addresses on the LAN, the source of ICMP errors we send there.
    pub lan_ipv4: Option<std::net::Ipv4Addr>,
    pub lan_ipv6: Option<std::net::Ipv6Addr>,
    /// Flows the site side opened, whose replies the firewall lets in.
    pub conntrack: Arc<crate::conntrack::ConnTrack>,
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
pub struct Worker<S: FrameIo = XskQueue> {
    pub queue: u32,
    pub(crate) shared: Arc<Shared>,
    /// The AEAD jobs this worker has handed to the crypto threads, in arrival
    /// order (`None`: it seals and opens inline). Before `io`: dropped first,
    /// waiting for any job still writing into a frame.
    crypto: Option<CryptoRings<S::Frame>>,
    /// The queue's frames and its WAN and LAN ports.
    io: S,
    counters: Arc<WorkerCounters>,
    /// For the rare datagram sent through the kernel (no link-layer path yet),
    /// and for quoting a packet in an ICMP error.
    scratch: Vec<u8>,
    /// ICMP errors this worker may still send this second onto the LAN, and
    /// into tunnels (apart: a site spending its own cannot silence the
    /// "too big" that path-MTU discovery on the LAN needs).
    icmp_lan: IcmpBudget,
    icmp_tunnel: IcmpBudget,
    /// Handshake messages per source under load.
    limiter: SourceLimiter,
    /// Where IPv4 fragments of an oversize inner packet are built.
    fragment: Vec<u8>,
    /// A packet copied out of its frame (`spill`): to be fragmented, or sent
    /// or staged as a copy.
    spill: Vec<u8>,
    /// Packets decrypted this batch (added to the shared counter once).
    decrypted: usize,
    /// Packets for site neighbours being resolved.
    waiting: NeighborWait,
    /// Inner packets the kernel slow path decrypted, for this worker's LAN
    /// socket (worker 0 only).
    slow_path: Option<crossbeam_channel::Receiver<(PeerId, Vec<u8>)>>,
}

/// Packets one worker keeps while their site neighbour resolves, and the
/// longest (an inner packet the tunnel can carry, or a fragment-reassembled one
/// from the slow path up to this size; longer ones are dropped, counted).
const NEIGHBOR_WAIT_SLOTS: usize = 64;
const NEIGHBOR_WAIT_SLOT_LEN: usize = 9216;

/// ICMP errors per worker (or slow path) per second, at most (routers
/// rate-limit them, RFC 1812 section 4.3.2.8).
const ICMP_PER_SECOND: u32 = 100;

/// The ICMP errors one thread may still send this second.
#[derive(Debug)]
pub(crate) struct IcmpBudget {
    left: u32,
    second: Instant,
}

impl Default for IcmpBudget {
    fn default() -> Self {
        Self { left: ICMP_PER_SECOND, second: Instant::now() }
    }
}

impl IcmpBudget {
    /// Spends one error if the budget allows.
    pub(crate) fn take(&mut self, now: Instant) -> bool {
        if now.saturating_duration_since(self.second) >= Duration::from_secs(1) {
            self.second = now;
            self.left = ICMP_PER_SECOND;
        }
        let ok = self.left > 0;
        self.left = self.left.saturating_sub(1);
        ok
    }
}

impl<S: FrameIo> Worker<S> {
    pub fn new(queue: u32, shared: Arc<Shared>, io: S, counters: Arc<WorkerCounters>) -> Self {
        Self {
            queue,
            shared,
            crypto: None,
            io,
            counters,
            scratch: vec![0u8; 65536],
            icmp_lan: IcmpBudget::default(),
            icmp_tunnel: IcmpBudget::default(),
            slow_path: None,
            limiter: SourceLimiter::default(),
            fragment: vec![0u8; 65536],
            spill: vec![0u8; 65536],
            decrypted: 0,
            waiting: NeighborWait::new(NEIGHBOR_WAIT_SLOTS, NEIGHBOR_WAIT_SLOT_LEN),
        }
    }

    /// Makes this worker forward what the kernel slow path decrypted.
    pub fn set_slow_path(&mut self, from_kernel: crossbeam_channel::Receiver<(PeerId, Vec<u8>)>) {
        self.slow_path = Some(from_kernel);
    }

    /// Hands this worker's AEAD work to the crypto threads behind `rings`.
    pub fn set_crypto(&mut self, rings: CryptoRings<S::Frame>) {
        self.crypto = Some(rings);
    }

    /// One batch from each side, processed and flushed; returns the frames
    /// taken plus the packets whose crypto finished (0: idle, nothing in flight).
    pub fn process_batch(&mut self, batch: &mut Vec<S::Frame>, now: Instant) -> usize {
        // What waited for a neighbour goes first (before newer packets of its flow).
        if !self.waiting.is_empty() {
            let (io, shared, counters) = (&mut self.io, &self.shared, &self.counters);
            let expired = self.waiting.release(&shared.neighbors, now, |mac, packet| {
                frame_for_site(io, shared, counters, mac, packet);
            });
            for _ in 0..expired {
                counters.dropped(DropReason::NoNextHop);
            }
        }
        // The tables as this batch sees them (`snapshot.rs`): loaded once, with
        // per-peer counters and roaming written back once.
        let shared = self.shared.clone();
        let mut snapshot = Snapshot::load(&shared.tables);
        let neighbors = shared.neighbors.load();
        let received = self.io.recv(Port::Wan, batch, BATCH);
        add(&self.counters.wan_rx, received);
        let opens_before = self.crypto.as_ref().map_or(0, |r| r.opens.next_seq());
        self.drain_batch(batch, |w, frame| w.on_wan(frame, &mut snapshot, &neighbors, now));
        let opens_queued = self.crypto.as_mut().map_or(0, |r| {
            r.opens.publish();
            r.opens.next_seq() - opens_before
        });
        let mut finished = self.settle_opens(&mut snapshot, &neighbors, kept_in_flight(opens_queued), now);
        // Sends follow an endpoint that a received packet just moved.
        snapshot.flush();
        let sent = self.io.recv(Port::Lan, batch, BATCH);
        add(&self.counters.lan_rx, sent);
        let seals_before = self.crypto.as_ref().map_or(0, |r| r.seals.next_seq());
        self.drain_batch(batch, |w, frame| w.on_lan(frame, &mut snapshot, now));
        let seals_queued = self.crypto.as_mut().map_or(0, |r| {
            r.seals.publish();
            r.seals.next_seq() - seals_before
        });
        finished += self.settle_seals(kept_in_flight(seals_queued));
        drop(snapshot);
        add(&self.counters.decrypted, std::mem::take(&mut self.decrypted));
        if let Some(rings) = self.crypto.as_mut() {
            let offloaded = rings.opens.take_offloaded() + rings.seals.take_offloaded();
            add(&self.counters.crypto_offloaded, offloaded as usize);
        }
        let mut work = received + sent + finished;
        if let Some(from_kernel) = &self.slow_path {
            for (peer, packet) in from_kernel.try_iter().take(BATCH) {
                let (io, waiting, counters) = (&mut self.io, &mut self.waiting, &self.counters);
                deliver_inner(io, waiting, &neighbors, &shared, counters, peer, &packet, now);
                shared.from_kernel.give(packet);
                work += 1;
            }
        }
        self.io.flush();
        self.counters.drops.count_n(DropReason::TxFull, self.io.take_tx_full());
        work
    }

    /// Hands each frame of a received `batch` to `handle`, in order, their
    /// headers loading together first. With the AEAD on this thread (no
    /// crypto threads), the next frame also starts loading whole: it is read
    /// and written through while this one is handled.
    fn drain_batch(&mut self, batch: &mut Vec<S::Frame>, mut handle: impl FnMut(&mut Self, S::Frame)) {
        prefetch_headers(&self.io, batch);
        let inline = self.crypto.is_none();
        let mut frames = batch.drain(..).peekable();
        while let Some(frame) = frames.next() {
            if let (true, Some(next)) = (inline, frames.peek()) {
                prefetch_whole(&self.io, next);
            }
            handle(self, frame);
        }
    }

    /// The queue's frames (for tests and benches that feed them).
    pub fn frames_mut(&mut self) -> &mut S {
        &mut self.io
    }

    fn on_wan(&mut self, mut frame: S::Frame, snapshot: &mut Snapshot<'_>, neighbors: &NeighborMap, now: Instant) {
        let Ok(udp) = parse_udp_frame(self.io.data(&frame)) else {
            self.counters.dropped(DropReason::Malformed);
            return self.io.release(frame);
        };
        let kind = self.io.data(&frame).get(udp.payload.clone()).map(MessageType::of);
        match kind {
            Some(Ok(MessageType::Transport)) => {
                let from = Endpoint { addr: udp.src, path: Some(udp.reply_path()) };
                // Decrypted so that the inner packet lands right behind room
                // for its Ethernet header: the frame goes to the LAN as it is.
                let message_at = udp.payload.start - ETHERNET_HEADER_LEN;
                let message = ETHERNET_HEADER_LEN..udp.payload.end;
                if self.crypto.is_some() {
                    return self.open_in_parallel(frame, snapshot, neighbors, message, message_at, from, now);
                }
                let opened = self.io.with_data_mut(&mut frame, None, |buf| match buf.get_mut(message) {
                    Some(buf) => transport::open(snapshot, buf, message_at, from, now),
                    None => Err(DropReason::Malformed),
                });
                self.after_open(frame, opened, snapshot, neighbors, now);
            }
            Some(Ok(_)) => self.on_handshake(frame, &udp, now),
            _ => {
                self.counters.dropped(DropReason::Malformed);
                self.io.release(frame);
            }
        }
    }

    /// What became of a transport message: its inner packet is forwarded, a
    /// keepalive counted, a failure counted as a drop.
    fn after_open(
        &mut self,
        frame: S::Frame,
        opened: Result<Opened, DropReason>,
        snapshot: &mut Snapshot<'_>,
        neighbors: &NeighborMap,
        now: Instant,
    ) {
        match opened {
            Ok(Opened::Data { peer, inner }) => {
                self.decrypted += 1;
                return self.forward_from_tunnel(frame, snapshot, neighbors, peer, inner, now);
            }
            Ok(Opened::Keepalive { .. }) => bump(&self.counters.keepalives_received),
            Err(reason) => self.counters.dropped(reason),
        }
        self.io.release(frame);
    }

    /// `transport::open` in three steps: `incoming` here, the AEAD on a crypto
    /// thread (the frame's `message` range, decrypted to its start, where the
    /// inner packet lands behind room for its Ethernet header), `accept` here
    /// when `settle_opens` takes it back in order.
    #[allow(clippy::too_many_arguments)]
    fn open_in_parallel(
        &mut self,
        mut frame: S::Frame,
        snapshot: &mut Snapshot<'_>,
        neighbors: &NeighborMap,
        message: core::ops::Range<usize>,
        message_at: usize,
        from: Endpoint,
        now: Instant,
    ) {
        let crypto = &mut self.crypto;
        let job = self.io.with_data_mut(&mut frame, None, |buf| {
            let buf = buf.get_mut(message).ok_or(DropReason::Malformed)?;
            let incoming = transport::incoming(snapshot, buf.get(message_at..).ok_or(DropReason::Malformed)?, now)?;
            let rings = crypto.as_mut().ok_or(DropReason::Malformed)?;
            // Alive until the job queued next (below, at this sequence
            // number: a full ring delivers from the head, never moves the tail)
            // is taken back.
            rings.open_pins.pin(rings.opens.next_seq(), incoming.keypair);
            let op = AeadOp::Open { src: message_at + TRANSPORT_HEADER_LEN };
            // Nothing touches the frame's bytes until `settle_opens` takes it back.
            // SAFETY: so the keypair (pinned) and the frame (in the job's
            // local) stay alive, put (`FrameIo`) and unaliased.
            let job = unsafe { AeadJob::new(incoming.keypair, incoming.counter, std::ptr::from_mut(buf), op) };
            Ok((job, incoming.peer, incoming.counter))
        });
        let (job, peer, counter) = match job {
            Ok(prepared) => prepared,
            Err(reason) => {
                self.counters.dropped(reason);
                return self.io.release(frame);
            }
        };
        let mut item = (job, Opening { frame, peer, counter, from });
        while let Some(rings) = self.crypto.as_mut() {
            match rings.opens.push(item.0, item.1) {
                Ok(()) => break,
                // Full: the oldest first.
                Err(back) => item = back,
            }
            let in_flight = rings.opens.in_flight();
            self.settle_opens(snapshot, neighbors, in_flight - 1, now);
        }
    }

    /// Finishes received packets whose AEAD is done, in arrival order: every
    /// one that is ready, then more (waiting for them, helping) until at most
    /// `keep` are in flight. Returns how many it finished.
    fn settle_opens(
        &mut self,
        snapshot: &mut Snapshot<'_>,
        neighbors: &NeighborMap,
        keep: usize,
        now: Instant,
    ) -> usize {
        let mut finished = 0;
        while let Some(rings) = self.crypto.as_mut() {
            let seq = rings.opens.head_seq();
            let next =
                if rings.opens.in_flight() > keep { rings.opens.next_in_order() } else { rings.opens.next_ready() };
            let Some((Opening { frame, peer, counter, from }, outcome)) = next else { break };
            finished += 1;
            let opened = match (outcome, rings.open_pins.of(seq)) {
                (Some(plain_len), Some(keypair)) => {
                    let plain = ETHERNET_HEADER_LEN..ETHERNET_HEADER_LEN + plain_len as usize;
                    match self.io.data(&frame).get(plain) {
                        Some(plain) => transport::accept(snapshot, keypair, peer, counter, plain, from, now),
                        None => Err(DropReason::Malformed),
                    }
                }
                (Some(_), None) => Err(DropReason::Malformed),
                (None, _) => Err(DropReason::Authentication),
            };
            self.after_open(frame, opened, snapshot, neighbors, now);
        }
        if let Some(rings) = self.crypto.as_mut() {
            rings.open_pins.release_before(rings.opens.head_seq());
        }
        finished
    }

    /// `settle_opens` for packets being sealed: each one done, in order, is
    /// framed and sent. Returns how many it finished.
    fn settle_seals(&mut self, keep: usize) -> usize {
        let mut finished = 0;
        while let Some(rings) = self.crypto.as_mut() {
            let next =
                if rings.seals.in_flight() > keep { rings.seals.next_in_order() } else { rings.seals.next_ready() };
            let Some((Sealing { frame, path, to }, outcome)) = next else { break };
            finished += 1;
            match outcome {
                Some(_) => self.send_sealed(frame, &path, to),
                None => {
                    self.counters.dropped(DropReason::BufferTooSmall);
                    self.io.release(frame);
                }
            }
        }
        if let Some(rings) = self.crypto.as_mut() {
            rings.seal_pins.release_before(rings.seals.head_seq());
        }
        finished
    }

    /// A sealed message in place behind room for its outer headers: framed
    /// from `path` to `to` and sent on the WAN.
    fn send_sealed(&mut self, mut frame: S::Frame, path: &crate::peer_view::L2Path, to: std::net::SocketAddr) {
        if self.io.with_data_mut(&mut frame, None, |buf| write_udp_headers(buf, path, to, false).is_ok()) {
            return self.io.send(Port::Wan, frame);
        }
        self.counters.dropped(DropReason::BufferTooSmall);
        self.io.release(frame);
    }

    /// A decrypted inner packet (at `frame[14..]`): the policy decides, then it
    /// leaves on the LAN in the same frame, enters the host, waits for its
    /// neighbour, or is dropped.
    fn forward_from_tunnel(
        &mut self,
        mut frame: S::Frame,
        snapshot: &mut Snapshot<'_>,
        neighbors: &NeighborMap,
        peer: PeerId,
        inner: InnerPacket,
        now: Instant,
    ) {
        let end = ETHERNET_HEADER_LEN + inner.len;
        let (shared, counters) = (&*self.shared, &*self.counters);
        let packet = self.io.data(&frame).get(ETHERNET_HEADER_LEN..end);
        let verdict = match (packet, snapshot.last_received_mut()) {
            (Some(packet), Some(tally)) => from_tunnel(shared, tally, packet, &mut self.scratch, now),
            _ => Err(Refusal::Drop(DropReason::BadInnerPacket)),
        };
        match verdict {
            Ok(Inbound::Forward) => {
                let next_hop = shared.lan_next_hop.unwrap_or(inner.dst);
                match neighbors.get(&next_hop) {
                    Some(&mac) => {
                        let lan_mac = shared.lan_mac;
                        let framed = self.io.with_data_mut(&mut frame, Some(end), |buf| {
                            buf.len() == end && frame_packet(buf, mac, lan_mac)
                        });
                        if framed {
                            return self.io.send(Port::Lan, frame);
                        }
                        counters.dropped(DropReason::BufferTooSmall);
                    }
                    None => {
                        let packet = &self.io.data(&frame)[ETHERNET_HEADER_LEN..end];
                        wait_for_neighbor(&mut self.waiting, shared, counters, peer, next_hop, packet, now);
                    }
                }
            }
            Ok(Inbound::ToHost) => to_host(shared, counters, &self.io.data(&frame)[ETHERNET_HEADER_LEN..end]),
            Err(Refusal::Drop(reason)) => counters.dropped(reason),
            Err(Refusal::Expired(expired)) => {
                counters.dropped(DropReason::TtlExceeded);
                // The answer follows the endpoint this packet taught (written back now).
                snapshot.flush();
                self.time_exceeded_into_tunnel(snapshot, peer, expired, now);
            }
        }
        self.io.release(frame);
    }

    fn on_handshake(&mut self, frame: S::Frame, udp: &UdpFrame, now: Instant) {
        let msg = self.io.data(&frame).get(udp.payload.clone()).unwrap_or_default();
        let from = Endpoint { addr: udp.src, path: Some(udp.reply_path()) };
        match admission::admit(&self.shared, &mut self.limiter, msg, from, now) {
            Ok(Admission::CookieReply(reply)) => self.answer_with_cookie(frame, udp, &reply),
            Ok(Admission::Queue(job)) => {
                self.io.release(frame);
                match admission::enqueue(&self.shared, job, now) {
                    Ok(()) => bump(&self.counters.handshakes_queued),
                    Err(reason) => self.counters.dropped(reason),
                }
            }
            Err(reason) => {
                self.counters.dropped(reason);
                self.io.release(frame);
            }
        }
    }

    /// Turns the received frame into a cookie reply to its sender (section 5.4.7).
    fn answer_with_cookie(&mut self, mut frame: S::Frame, udp: &UdpFrame, reply: &[u8; COOKIE_REPLY_LEN]) {
        let hdr = udp_headers_len(udp.src.is_ipv6());
        let path = udp.reply_path();
        let ok = self.io.with_data_mut(&mut frame, Some(hdr + COOKIE_REPLY_LEN), |buf| {
            match buf.get_mut(hdr..) {
                Some(body) if body.len() == COOKIE_REPLY_LEN => body.copy_from_slice(reply),
                _ => return false,
            }
            write_udp_headers(buf, &path, udp.src, false).is_ok()
        });
        if ok {
            bump(&self.counters.cookie_replies);
            self.io.send(Port::Wan, frame);
        } else {
            self.counters.dropped(DropReason::BufferTooSmall);
            self.io.release(frame);
        }
    }

    fn on_lan(&mut self, mut frame: S::Frame, snapshot: &mut Snapshot<'_>, now: Instant) {
        match self.encrypt_to_wan(&mut frame, snapshot, now) {
            Ok(Sealed::InFrame) => return self.io.send(Port::Wan, frame),
            Ok(Sealed::Queued(job, path, to)) => {
                let mut item = (job, Sealing { frame, path, to });
                while let Some(rings) = self.crypto.as_mut() {
                    match rings.seals.push(item.0, item.1) {
                        Ok(()) => break,
                        Err(back) => item = back,
                    }
                    let in_flight = rings.seals.in_flight();
                    self.settle_seals(in_flight - 1);
                }
                return;
            }
            Ok(Sealed::Elsewhere) => {}
            Err(reason) => self.counters.dropped(reason),
        }
        self.io.release(frame);
    }

    fn encrypt_to_wan(
        &mut self,
        frame: &mut S::Frame,
        snapshot: &mut Snapshot<'_>,
        now: Instant,
    ) -> Result<Sealed, DropReason> {
        let data = self.io.data(frame);
        let ip = parse_ip_frame(data).map_err(|_| DropReason::Malformed)?;
        let inner = data.get(ip.packet.clone()).ok_or(DropReason::Malformed)?;
        let tally = snapshot.route(ip.dst)?;
        if flow::hop_limit(inner).is_some_and(|hops| hops <= 1) {
            // A router may not forward it (traceroute from the site sees us).
            let sender_mac = crate::wire::EthernetFrame::new_checked(data).map(|e| e.source()).ok();
            if let Some(mac) = sender_mac.filter(|_| crate::icmp::may_send_error(inner, IcmpError::TimeExceeded)) {
                let quote_len = inner.len().min(crate::icmp::quote_limit(ip.src.is_ipv6()));
                self.scratch[..quote_len].copy_from_slice(&inner[..quote_len]);
                self.send_icmp_error(IcmpError::TimeExceeded, mac, ip.src, quote_len, now);
            }
            return Err(DropReason::TtlExceeded);
        }
        track_outbound(&self.shared, tally, inner, now);
        if inner.len() <= self.shared.tunnel_mtu {
            if let Some(sealed) = self.seal_in_frame(frame, ip.packet.clone(), tally, now) {
                return sealed;
            }
            // No link-layer path to the peer yet, or no usable session: the
            // one sealing path for copies decides (kernel, staging). A packet
            // the kernel sends at once goes after what is in flight; a staged
            // one waits for a new session anyway.
            if tally.keypair().is_some_and(|k| !k.is_expired(now)) {
                self.settle_seals(0);
            }
            let inner = spill(&self.io, frame, ip.packet.clone(), &mut self.spill);
            let (io, shared, counters, scratch) = (&mut self.io, &self.shared, &self.counters, &mut self.scratch);
            return seal_to_wan(io, shared, counters, scratch, tally, inner, true, now).map(|()| Sealed::Elsewhere);
        }
        // Too big for the tunnel. RFC 1191 / 8201: a packet that forbids
        // fragmentation (IPv4 DF, or any IPv6 packet) is answered with "too
        // big"; an IPv4 packet that allows it is fragmented, as a router does.
        let v4 = crate::wire::Ipv4Packet::new_checked(inner).ok();
        if let Some(false) = v4.map(|p| p.dont_fragment()) {
            // The fragments leave at once: after what is in flight.
            self.settle_seals(0);
            // Out of its frame: the pieces take new frames from the same pool.
            let inner = spill(&self.io, frame, ip.packet.clone(), &mut self.spill);
            let (io, shared, counters, scratch) = (&mut self.io, &self.shared, &self.counters, &mut self.scratch);
            let pieces = fragment_ipv4(inner, shared.tunnel_mtu, &mut self.fragment, |piece| {
                seal_to_wan(io, shared, counters, scratch, tally, piece, true, now)
            });
            return match pieces {
                Ok(_) => Ok(Sealed::Elsewhere),
                Err(FragmentError::Emit(reason)) => Err(reason),
                Err(FragmentError::Refused(_)) => Err(DropReason::Oversize),
            };
        }
        let sender_mac = crate::wire::EthernetFrame::new_checked(data).map(|e| e.source()).ok();
        let mtu = self.shared.tunnel_mtu.min(usize::from(u16::MAX)) as u16;
        if let Some(mac) = sender_mac.filter(|_| crate::icmp::may_send_error(inner, IcmpError::TooBig { mtu })) {
            let quote_len = inner.len().min(crate::icmp::quote_limit(ip.src.is_ipv6()));
            self.scratch[..quote_len].copy_from_slice(&inner[..quote_len]);
            self.send_icmp_error(IcmpError::TooBig { mtu }, mac, ip.src, quote_len, now);
        }
        Err(DropReason::Oversize)
    }

    /// Seals the inner packet at `frame[inner]` where it lies: moved behind
    /// room for the outer headers, one hop less, sealed, framed for the WAN.
    /// `None` when it must take the other way (no link-layer path to the peer
    /// yet, or no usable session: `seal_to_wan` sends it through the kernel or
    /// stages it).
    fn seal_in_frame(
        &mut self,
        frame: &mut S::Frame,
        inner: core::ops::Range<usize>,
        tally: &mut PeerTally,
        now: Instant,
    ) -> Option<Result<Sealed, DropReason>> {
        let ep = tally.endpoint()?;
        let path = usable_path(&ep)?;
        if tally.keypair().is_none_or(|k| k.is_expired(now)) {
            return None;
        }
        let len = inner.len();
        let hdr = udp_headers_len(ep.addr.is_ipv6());
        let total = hdr + sealed_len(len);
        let body = hdr + TRANSPORT_HEADER_LEN;
        // With crypto threads: the hop and the counter here; the move behind
        // the headers, the padding and the AEAD there.
        let parallel = self.crypto.is_some();
        let at = if parallel { inner.start } else { body };
        let sealed = self.io.with_data_mut(frame, Some(total), |buf| {
            if buf.len() != total {
                return Err(SealError::BufferTooSmall);
            }
            if !parallel {
                buf.copy_within(inner, body);
                return seal_frame(buf, hdr, len, true, tally, &path, ep.addr, now).map(|_| None);
            }
            flow::decrement_hop(&mut buf[inner.clone()]);
            let counter = transport::reserve_seal(tally, len, now)?;
            let keypair = tally.keypair().ok_or(SealError::NoSession)?;
            let op = AeadOp::Seal { inner_at: inner.start, message_at: hdr, len };
            // The keypair is the tally's (which holds it until the pin
            // below), then pinned; the frame goes into the job's local
            // (`on_lan`); nothing touches the frame's bytes until
            // `settle_seals` takes it back.
            // SAFETY: so both stay alive, put (`FrameIo`) and unaliased.
            Ok(Some(unsafe { AeadJob::new(keypair, counter, std::ptr::from_mut(buf), op) }))
        });
        let (shared, counters) = (&*self.shared, &*self.counters);
        let sealed = match sealed {
            Ok(job) => job,
            Err(e) => {
                // (The packet is in place, one hop less, should it have to be staged.)
                let moved = self.io.data(frame).get(at..at + len).unwrap_or_default();
                return Some(
                    finish_seal(shared, counters, tally.view(), moved, false, Err(e)).map(|()| Sealed::Elsewhere),
                );
            }
        };
        let Some(job) = sealed else {
            bump(&counters.encrypted);
            return Some(Ok(Sealed::InFrame));
        };
        let (Some(rings), Some(keypair)) = (self.crypto.as_mut(), tally.keypair_arc()) else {
            // (Unreachable: the job was made on this keypair, for these
            // rings.) Its frame is not sealed yet: never sent as it is.
            debug_assert!(false, "a sealing job without rings or keypair");
            return Some(Err(DropReason::Expired));
        };
        // Alive until the job `on_lan` queues next (at this sequence number:
        // a full ring delivers from the head) is taken back.
        rings.seal_pins.pin(rings.seals.next_seq(), keypair);
        bump(&counters.encrypted);
        Some(Ok(Sealed::Queued(job, path, ep.addr)))
    }
}

/// Starts loading the headers of a received batch into this core's cache:
/// the NIC wrote the frames to memory, and each one's first lines are read
/// one after the other below (the loads overlap instead of stalling in turn).
fn prefetch_headers<S: FrameIo>(io: &S, batch: &[S::Frame]) {
    for frame in batch {
        let data = io.data(frame);
        crate::prefetch::lines(data.as_ptr(), data.len(), 2);
    }
}

/// Starts loading all of a frame, for writing (the AEAD runs through it in
/// place).
fn prefetch_whole<S: FrameIo>(io: &S, frame: &S::Frame) {
    let data = io.data(frame);
    crate::prefetch::lines_for_write(data.as_ptr(), data.len(), usize::MAX);
}

/// A copy of `frame[range]` in `buf`, out of the frame pool (for the rare
/// paths that take new frames from the pool while the packet is read).
fn spill<'b, S: FrameIo>(io: &S, frame: &S::Frame, range: core::ops::Range<usize>, buf: &'b mut [u8]) -> &'b [u8] {
    let packet = io.data(frame).get(range).unwrap_or_default();
    let len = packet.len().min(buf.len());
    buf[..len].copy_from_slice(&packet[..len]);
    &buf[..len]
}

/// The link-layer path a packet to `ep` can be framed for (learned from the
/// peer's own frames, same address family).
fn usable_path(ep: &Endpoint) -> Option<crate::peer_view::L2Path> {
    ep.path.filter(|p| p.local.is_ipv6() == ep.addr.is_ipv6())
}

/// Where a packet from the LAN went.
enum Sealed {
    /// Sealed in its own frame, which now goes out on the WAN.
    InFrame,
    /// Prepared in its own frame, whose AEAD the crypto threads run; then
    /// framed from the path to the address.
    Queued(AeadJob, crate::peer_view::L2Path, std::net::SocketAddr),
    /// Sent or staged from a copy; its frame is free.
    Elsewhere,
}

/// A worker's two rings of AEAD jobs (`crypto_pool.rs`): received packets
/// and packets being sealed, each in arrival order.
#[derive(Debug)]
pub struct CryptoRings<F> {
    opens: RingOwner<AeadJob, Opening<F>>,
    seals: RingOwner<AeadJob, Sealing<F>>,
    /// The keypairs of both rings' jobs. Declared after the rings: dropped
    /// after them, once their drop waited for every claimed job.
    open_pins: KeypairPins,
    seal_pins: KeypairPins,
}

impl<F> CryptoRings<F> {
    /// A worker's rings, served by `pool`'s helpers.
    pub fn new(pool: &mut CryptoPoolBuilder<AeadJob>) -> Self {
        Self {
            opens: pool.ring(CRYPTO_RING),
            seals: pool.ring(CRYPTO_RING),
            open_pins: KeypairPins::with_capacity(CRYPTO_RING),
            seal_pins: KeypairPins::with_capacity(CRYPTO_RING),
        }
    }
}

/// The keypairs of one ring's jobs in flight, kept alive without an `Arc`
/// per packet: consecutive jobs on one keypair (a tunnel's traffic) share one
/// reference, released once the last of them is taken back.
#[derive(Debug)]
struct KeypairPins {
    /// The sequence numbers of the first and last job on each keypair, oldest
    /// first, each run after the one before it. At most one entry per job in
    /// flight plus the job being queued: never grows past its capacity.
    pinned: std::collections::VecDeque<(u64, u64, Arc<Keypair>)>,
}

impl KeypairPins {
    fn with_capacity(jobs: usize) -> Self {
        Self { pinned: std::collections::VecDeque::with_capacity(jobs + 1) }
    }

    /// Keeps `keypair` alive for the job `seq` (the next one queued). Should
    /// a pin for `seq` be there already (its job never queued), this one
    /// replaces it: `of` finds the keypair the queued job uses.
    fn pin(&mut self, seq: u64, keypair: &Arc<Keypair>) {
        match self.pinned.back_mut() {
            Some((_, last, pinned)) if Arc::ptr_eq(pinned, keypair) => *last = seq,
            Some((first, last, pinned)) if *last == seq => {
                if *first == seq {
                    *pinned = keypair.clone();
                } else {
                    *last -= 1;
                    self.pinned.push_back((seq, seq, keypair.clone()));
                }
            }
            _ => self.pinned.push_back((seq, seq, keypair.clone())),
        }
    }

    /// The keypair of the job `seq`, once every job before it was taken back
    /// (their keypairs are released here).
    fn of(&mut self, seq: u64) -> Option<&Keypair> {
        self.release_before(seq);
        self.pinned.front().filter(|&&(first, _, _)| first <= seq).map(|(_, _, keypair)| &**keypair)
    }

    /// Releases the keypairs only jobs before `seq` used.
    fn release_before(&mut self, seq: u64) {
        while self.pinned.front().is_some_and(|&(_, last, _)| last < seq) {
            self.pinned.pop_front();
        }
    }
}

/// A received message whose AEAD is in flight: its frame, kept here until the
/// outcome comes back (its keypair in the ring's pins), and what `accept`
/// needs then.
#[derive(Debug)]
struct Opening<F> {
    frame: F,
    peer: PeerId,
    counter: u64,
    from: Endpoint,
}

/// A message being sealed for `to`, framed from `path` when it is done.
#[derive(Debug)]
struct Sealing<F> {
    frame: F,
    path: crate::peer_view::L2Path,
    to: std::net::SocketAddr,
}

/// Slots per ring: the jobs kept in flight, the next batch, and room.
const CRYPTO_RING: usize = 4 * BATCH;
/// Jobs per direction left in flight at the end of a batch that queued some:
/// the helpers' work while this thread delivers and parses the next.
const CRYPTO_IN_FLIGHT: usize = 2 * BATCH;

/// Jobs left in flight after a batch that queued `queued` of them: none when
/// it queued none (nothing received, or only frames that need no AEAD:
/// handshakes, garbage, refused messages), so that such frames never hold
/// packets back waiting for helpers.
fn kept_in_flight(queued: u64) -> usize {
    if queued == 0 {
        0
    } else {
        CRYPTO_IN_FLIGHT
    }
}

/// With an inner packet at `buf[hdr + 16..][..len]`: one hop less when it is
/// being forwarded (`hop`), sealed on `tally`'s keypair behind its transport
/// header, and framed behind Ethernet, IP and UDP headers from `path` to `to`.
#[allow(clippy::too_many_arguments)]
fn seal_frame(
    buf: &mut [u8],
    hdr: usize,
    len: usize,
    hop: bool,
    tally: &mut PeerTally,
    path: &crate::peer_view::L2Path,
    to: std::net::SocketAddr,
    now: Instant,
) -> Result<usize, SealError> {
    let body =
        buf.get_mut(hdr + TRANSPORT_HEADER_LEN..hdr + TRANSPORT_HEADER_LEN + len).ok_or(SealError::BufferTooSmall)?;
    if hop {
        flow::decrement_hop(body);
    }
    let n = transport::seal(tally, buf.get_mut(hdr..).ok_or(SealError::BufferTooSmall)?, len, now)?;
    write_udp_headers(buf, path, to, false).map_err(|_| SealError::BufferTooSmall)?;
    Ok(n)
}

/// Seals a copy of `inner` for the peer of `tally` into a new WAN frame (or,
/// before any frame from the peer was seen, through the kernel), or stages it
/// when there is no usable session. `scratch` is for the kernel path. `hop`:
/// the packet is being forwarded (its TTL / hop limit, checked to be above 1,
/// loses one on the copy that leaves).
#[allow(clippy::too_many_arguments)]
fn seal_to_wan<S: FrameIo>(
    io: &mut S,
    shared: &Shared,
    counters: &WorkerCounters,
    scratch: &mut [u8],
    tally: &mut PeerTally,
    inner: &[u8],
    hop: bool,
    now: Instant,
) -> Result<(), DropReason> {
    let Some(ep) = tally.endpoint() else { return Err(DropReason::NoEndpoint) };
    let len = inner.len();
    let sealed = match usable_path(&ep) {
        Some(path) => {
            let hdr = udp_headers_len(ep.addr.is_ipv6());
            let Some(mut out) = io.alloc(hdr + sealed_len(len)) else { return Err(DropReason::NoFrame) };
            let sealed = io.with_data_mut(&mut out, None, |buf| {
                let body = buf.get_mut(hdr + TRANSPORT_HEADER_LEN..hdr + TRANSPORT_HEADER_LEN + len);
                body.ok_or(SealError::BufferTooSmall)?.copy_from_slice(inner);
                seal_frame(buf, hdr, len, hop, tally, &path, ep.addr, now)
            });
            match sealed {
                Ok(_) => io.send(Port::Wan, out),
                Err(_) => io.release(out),
            }
            sealed.map(|_| ())
        }
        None => return seal_via_kernel(shared, counters, scratch, tally, ep.addr, inner, hop, now),
    };
    finish_seal(shared, counters, tally.view(), inner, hop, sealed)
}

/// Seals `inner` for `tally`'s peer at `to` into `scratch` and sends it
/// through the kernel's UDP socket (no link-layer path known: the worker
/// before the peer's first frame, the slow path always), or stages it.
#[allow(clippy::too_many_arguments)]
pub(crate) fn seal_via_kernel(
    shared: &Shared,
    counters: &WorkerCounters,
    scratch: &mut [u8],
    tally: &mut PeerTally,
    to: std::net::SocketAddr,
    inner: &[u8],
    hop: bool,
    now: Instant,
) -> Result<(), DropReason> {
    let len = inner.len();
    let body = scratch.get_mut(TRANSPORT_HEADER_LEN..TRANSPORT_HEADER_LEN + len).ok_or(DropReason::BufferTooSmall)?;
    body.copy_from_slice(inner);
    if hop {
        flow::decrement_hop(body);
    }
    let has_session = tally.keypair().is_some_and(|k| !k.is_expired(now));
    if has_session && !shared.wan_next_hops.is_ready(to.ip()) {
        // Never queue behind an unresolved next hop in the kernel.
        shared.wan_next_hops.request(to.ip());
        return Err(DropReason::NoNextHop);
    }
    // (Without a session `seal` says so and the packet is staged.)
    let sealed =
        transport::seal(tally, scratch, len, now).map(|n| match shared.kernel_udp.send_to(&scratch[..n], to) {
            Ok(_) => bump(&counters.via_kernel),
            Err(_) => counters.dropped(DropReason::KernelSend),
        });
    finish_seal(shared, counters, tally.view(), inner, hop, sealed)
}

/// Counts a sealed packet, or stages one that found no usable session.
fn finish_seal(
    shared: &Shared,
    counters: &WorkerCounters,
    view: &crate::peer_view::PeerView,
    inner: &[u8],
    hop: bool,
    sealed: Result<(), SealError>,
) -> Result<(), DropReason> {
    match sealed {
        Ok(()) => {
            bump(&counters.encrypted);
            Ok(())
        }
        Err(SealError::BufferTooSmall) => Err(DropReason::BufferTooSmall),
        Err(SealError::NoSession) => {
            // No usable session (none yet, or expired): wait for a handshake.
            view.attention.store(true, Relaxed);
            let mut packet = shared.staging.take(inner).ok_or(DropReason::StagingFull)?;
            if hop {
                flow::decrement_hop(&mut packet);
            }
            match shared.control.try_send(ControlEvent::Stage { peer: view.id, packet }) {
                Ok(()) => {
                    bump(&counters.staged);
                    Ok(())
                }
                Err(e) => {
                    if let ControlEvent::Stage { packet, .. } = e.into_inner() {
                        shared.staging.give(packet);
                    }
                    Err(DropReason::StagingFull)
                }
            }
        }
    }
}

impl<S: FrameIo> Worker<S> {
    /// The ICMP error `kind` back to `to` on the LAN (at `to_mac`), quoting
    /// the first `quote_len` bytes of `scratch`. Rate-limited per worker.
    fn send_icmp_error(&mut self, kind: IcmpError, to_mac: MacAddr, to: IpAddr, quote_len: usize, now: Instant) {
        let Some(router) = self.shared.router_address(to) else { return };
        if !self.icmp_lan.take(now) {
            return;
        }
        let len = crate::icmp::error_frame_len(quote_len, to.is_ipv6());
        let Some(mut out) = self.io.alloc(len) else { return self.counters.dropped(DropReason::NoFrame) };
        let quote = &self.scratch[..quote_len];
        let lan_mac = self.shared.lan_mac;
        let ok = self
            .io
            .with_data_mut(&mut out, None, |buf| {
                crate::icmp::error_frame(buf, kind, quote, to, router, to_mac, lan_mac)
            })
            .is_ok();
        if ok {
            bump(match kind {
                IcmpError::TooBig { .. } => &self.counters.icmp_too_big,
                IcmpError::TimeExceeded => &self.counters.icmp_time_exceeded,
            });
            self.io.send(Port::Lan, out);
        } else {
            self.io.release(out);
        }
    }

    /// ICMP "time exceeded" into `peer`'s tunnel, to the sender of a packet
    /// that arrived from it with its TTL spent (the quote is in `scratch`).
    fn time_exceeded_into_tunnel(&mut self, snapshot: &mut Snapshot<'_>, peer: PeerId, expired: Expired, now: Instant) {
        let Some(len) = expired.answer(&self.shared, &mut self.icmp_tunnel, &self.scratch, &mut self.fragment, now)
        else {
            return;
        };
        // It leaves at once: after the packets being sealed.
        self.settle_seals(0);
        let Ok(tally) = snapshot.sending_to(peer) else { return };
        let (io, shared, counters) = (&mut self.io, &self.shared, &self.counters);
        match seal_to_wan(io, shared, counters, &mut self.scratch, tally, &self.fragment[..len], false, now) {
            Ok(()) => bump(&counters.icmp_time_exceeded),
            Err(reason) => counters.dropped(reason),
        }
    }
}

impl Shared {
    /// Our LAN address of `to`'s family: where the gateway's ICMP errors come from.
    pub(crate) fn router_address(&self, to: IpAddr) -> Option<IpAddr> {
        match to {
            IpAddr::V4(_) => self.lan_ipv4.map(IpAddr::V4),
            IpAddr::V6(_) => self.lan_ipv6.map(IpAddr::V6),
        }
    }
}

/// Why a packet from a tunnel is not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    Drop(DropReason),
    /// Its TTL / hop limit ran out here: answer with "time exceeded".
    Expired(Expired),
}

impl From<DropReason> for Refusal {
    fn from(reason: DropReason) -> Self {
        Self::Drop(reason)
    }
}

/// A packet whose TTL ran out: its sender, and how much of it is quoted
/// (copied to the start of the caller's scratch buffer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Expired {
    pub quote_len: usize,
    pub to: IpAddr,
}

impl Expired {
    /// Writes the "time exceeded" answer (quoting `scratch[..quote_len]`) into
    /// `out` if `budget` allows one and we have an address to send it from;
    /// returns its length.
    pub(crate) fn answer(
        &self,
        shared: &Shared,
        budget: &mut IcmpBudget,
        scratch: &[u8],
        out: &mut [u8],
        now: Instant,
    ) -> Option<usize> {
        let router = shared.router_address(self.to)?;
        if !budget.take(now) {
            return None;
        }
        let len = crate::icmp::error_packet_len(self.quote_len, self.to.is_ipv6());
        let (quote, packet) = (scratch.get(..self.quote_len)?, out.get_mut(..len)?);
        crate::icmp::error_packet(packet, IcmpError::TimeExceeded, quote, self.to, router).ok()?;
        Some(len)
    }
}

/// Decides on a packet that the remote site of `view`'s peer sent
/// (`policy.rs`): where it goes, or why not. A packet forwarded with its TTL
/// spent is quoted into `scratch` for the "time exceeded" answer (when RFC
/// 1812/4443 allow one).
pub(crate) fn from_tunnel(
    shared: &Shared,
    tally: &mut PeerTally,
    packet: &[u8],
    scratch: &mut [u8],
    now: Instant,
) -> Result<Inbound, Refusal> {
    let flow = Flow::parse(packet)?;
    let peer = tally.view().id;
    let policy = tally.policy();
    let hosts = &shared.host_addresses;
    let now_secs = ConnTrack::now_secs(now);
    let verdict = policy.admit_inbound(&flow, peer, &shared.conntrack, |ip| hosts.contains(ip), now_secs)?;
    if verdict == Inbound::Forward && flow.hop_limit <= 1 {
        if !crate::icmp::may_send_error(packet, IcmpError::TimeExceeded) {
            return Err(Refusal::Drop(DropReason::TtlExceeded));
        }
        let quote_len = packet.len().min(crate::icmp::quote_limit(flow.src.is_ipv6())).min(scratch.len());
        scratch[..quote_len].copy_from_slice(&packet[..quote_len]);
        return Err(Refusal::Expired(Expired { quote_len, to: flow.src }));
    }
    Ok(verdict)
}

/// Tracks the flow a packet from the site into `view`'s tunnel opens or
/// continues, where the tunnel's rules could refuse its replies: a new entry
/// only if they would (a flow whose replies the rules admit anyway needs
/// none), and never for a source that is the gateway host's own (a spoofed
/// frame must not plant a way into the host).
#[inline]
pub(crate) fn track_outbound(shared: &Shared, tally: &mut PeerTally, packet: &[u8], now: Instant) {
    let peer = tally.view().id;
    let policy = tally.policy();
    if policy.allows_all() {
        return;
    }
    let Ok(flow) = Flow::parse(packet) else { return };
    if let Some(key) = FlowKey::of_outbound(peer, &flow) {
        shared.conntrack.track_if(&key, ConnTrack::now_secs(now), || {
            !shared.host_addresses.contains(flow.src) && !policy.admits_replies_of(&flow)
        });
    }
}

/// Hands a packet from a tunnel to the gateway host's kernel (as received on
/// the host interface, so the host's INPUT rules apply).
pub(crate) fn to_host(shared: &Shared, counters: &WorkerCounters, packet: &[u8]) {
    match shared.host_tun.as_ref().map(|tun| tun.write(packet)) {
        Some(Ok(())) => bump(&counters.to_host),
        _ => counters.dropped(DropReason::HostInterface),
    }
}

/// Sends a decrypted inner packet the policy admitted to the site (a copy:
/// from the slow path): framed for the next hop's MAC from the neighbour table
/// into a new LAN frame, one hop less, or parked while the neighbour resolves.
#[allow(clippy::too_many_arguments)]
fn deliver_inner<S: FrameIo>(
    io: &mut S,
    waiting: &mut NeighborWait,
    neighbors: &NeighborMap,
    shared: &Shared,
    counters: &WorkerCounters,
    peer: PeerId,
    inner: &[u8],
    now: Instant,
) {
    let Ok(ip) = parse_ip_frame_payload(inner) else {
        return counters.dropped(DropReason::BadInnerPacket);
    };
    let next_hop = shared.lan_next_hop.unwrap_or(ip.dst);
    match neighbors.get(&next_hop) {
        Some(&mac) => frame_for_site(io, shared, counters, mac, inner),
        None => wait_for_neighbor(waiting, shared, counters, peer, next_hop, inner, now),
    }
}

/// A packet for a site neighbour not resolved yet: never block, never hand it
/// to the kernel; it waits (bounded) while the resolver kicks the kernel's
/// resolution.
fn wait_for_neighbor(
    waiting: &mut NeighborWait,
    shared: &Shared,
    counters: &WorkerCounters,
    peer: PeerId,
    next_hop: IpAddr,
    packet: &[u8],
    now: Instant,
) {
    bump(&counters.neighbor_misses);
    match waiting.park(peer, next_hop, packet, now) {
        Ok(()) => shared.neighbors.request(next_hop),
        Err(reason) => counters.dropped(reason),
    }
}

/// Frames a copy of `inner` for the site neighbour at `mac` into a new LAN
/// frame, one hop less.
fn frame_for_site<S: FrameIo>(io: &mut S, shared: &Shared, counters: &WorkerCounters, mac: MacAddr, inner: &[u8]) {
    let len = ETHERNET_HEADER_LEN + inner.len();
    let Some(mut out) = io.alloc(len) else {
        return counters.dropped(DropReason::NoFrame);
    };
    let lan_mac = shared.lan_mac;
    let written = io.with_data_mut(&mut out, None, |buf| match buf.get_mut(ETHERNET_HEADER_LEN..) {
        Some(body) if body.len() == inner.len() => {
            body.copy_from_slice(inner);
            frame_packet(buf, mac, lan_mac)
        }
        _ => false,
    });
    if written {
        io.send(Port::Lan, out);
    } else {
        io.release(out);
        counters.dropped(DropReason::BufferTooSmall);
    }
}

/// With an inner packet at `buf[14..]`: one hop less, behind an Ethernet
/// header from the LAN (`lan_mac`) to the site neighbour at `mac`.
fn frame_packet(buf: &mut [u8], mac: MacAddr, lan_mac: MacAddr) -> bool {
    let Some(packet) = buf.get_mut(ETHERNET_HEADER_LEN..) else { return false };
    let v6 = packet.first().is_some_and(|b| b >> 4 == 6);
    flow::decrement_hop(packet);
    write_ethernet_header(buf, mac, lan_mac, v6).is_ok()
}

impl Worker<XskQueue> {
    /// Runs until `shared.stop` is set.
    pub fn run(mut self) {
        let mut batch = Vec::with_capacity(BATCH);
        let fds = [self.io.raw_fd(Port::Wan), self.io.raw_fd(Port::Lan)];
        while !self.shared.stop.load(Relaxed) {
            if self.process_batch(&mut batch, Instant::now()) == 0 {
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
    use crate::frame_io::{MemoryFrames, Port};
    use crate::noise::AeadBackend;
    use crate::testing::{
        ipv4_packet, MemoryWorker, CLIENT_TUNNEL, GATEWAY_LAN_MAC, GATEWAY_WAN_MAC, LAN_HOST, LAN_HOST_MAC,
    };
    use std::sync::Arc;
    use std::time::SystemTime;

    fn keypair(index: u32) -> Arc<Keypair> {
        let key = [index as u8; 32];
        Arc::new(Keypair::new(AeadBackend::Ring, index, index + 1, true, Instant::now(), &key, &key))
    }

    /// A ring's keypairs stay alive, one reference per run of jobs on the same
    /// keypair, until the last job of the run is taken back; each job finds
    /// its own keypair however the runs change.
    #[test]
    fn keypair_pins_keep_each_jobs_keypair_until_it_is_taken_back() {
        let (a, b) = (keypair(1), keypair(2));
        let mut pins = KeypairPins::with_capacity(8);
        // Jobs 0-2 on a, 3 on b, 4-5 on a again (a rekey and back).
        for (seq, k) in [(0, &a), (1, &a), (2, &a), (3, &b), (4, &a), (5, &a)] {
            pins.pin(seq, k);
        }
        assert_eq!(pins.pinned.len(), 3, "one entry per run, not per job");
        assert_eq!(pins.pinned.capacity(), 9, "room for every job in flight and the one being queued");
        assert_eq!(Arc::strong_count(&a), 3, "a is pinned twice (two runs), not once per job");
        for (seq, k) in [(0, &a), (1, &a), (2, &a), (3, &b), (4, &a), (5, &a)] {
            let found = pins.of(seq).expect("a pinned job");
            assert!(std::ptr::eq(found, &**k), "job {seq} got another keypair");
        }
        assert_eq!(Arc::strong_count(&b), 1, "b's only job was taken back: released");
        assert_eq!(Arc::strong_count(&a), 2, "a's last run still pinned until job 5 is delivered");
        pins.release_before(6);
        assert_eq!((Arc::strong_count(&a), pins.pinned.len()), (1, 0));
        assert!(pins.of(6).is_none());
    }

    /// A pin whose job was never queued is replaced by the next pin for the
    /// same sequence number: the job queued there finds its own keypair, and
    /// the jobs before it keep theirs.
    #[test]
    fn a_pin_for_a_job_never_queued_is_replaced() {
        let (a, b, c) = (keypair(1), keypair(2), keypair(3));
        let mut pins = KeypairPins::with_capacity(8);
        pins.pin(0, &a);
        pins.pin(1, &a);
        // Job 2: pinned on a (joining a's run), never queued; then queued on c.
        pins.pin(2, &a);
        pins.pin(2, &c);
        // Job 3: pinned on b (a run of its own), never queued; then queued on c.
        pins.pin(3, &b);
        pins.pin(3, &c);
        assert_eq!(Arc::strong_count(&b), 1, "the orphan pin is gone");
        for (seq, k) in [(0, &a), (1, &a), (2, &c), (3, &c)] {
            assert!(std::ptr::eq(pins.of(seq).expect("pinned"), &**k), "job {seq} got another keypair");
        }
    }

    fn io(m: &mut MemoryWorker) -> &mut MemoryFrames {
        m.worker.frames_mut()
    }

    #[test]
    fn the_loop_decrypts_to_the_lan_and_encrypts_back_without_a_nic() {
        let mut m = MemoryWorker::new(AeadBackend::Ring);
        let now = Instant::now();
        let mut batch = Vec::new();
        // WAN → LAN: decrypted, framed for the LAN host.
        let inner = ipv4_packet(100, CLIENT_TUNNEL, LAN_HOST);
        let frame = m.wan_frame(&inner, now);
        assert!(io(&mut m).inject(Port::Wan, &frame));
        assert_eq!(m.run_until_idle(&mut batch, now), 1);
        let mut out = Vec::new();
        assert_eq!(io(&mut m).take_sent(Port::Lan, |f| out.push(f.to_vec())), 1);
        assert_eq!(&out[0][..6], &LAN_HOST_MAC.0, "to the LAN host's MAC");
        assert_eq!(&out[0][6..12], &GATEWAY_LAN_MAC.0);
        assert_eq!(&out[0][14..], &crate::testing::forwarded(&inner)[..], "one hop less");
        assert_eq!(m.counters.decrypted.load(Relaxed), 1);
        // The same frame again is a replay: counted, not delivered.
        assert!(io(&mut m).inject(Port::Wan, &frame));
        m.run_until_idle(&mut batch, now);
        assert_eq!(io(&mut m).take_sent(Port::Lan, |_| {}), 0);
        assert_eq!(m.counters.drops.get(DropReason::Replay), 1);

        // LAN → WAN: sealed straight into a WAN frame back to the client.
        let reply = ipv4_packet(200, LAN_HOST, CLIENT_TUNNEL);
        assert!(io(&mut m).inject(Port::Lan, &MemoryWorker::lan_frame(&reply)));
        m.run_until_idle(&mut batch, now);
        let mut sent = Vec::new();
        assert_eq!(io(&mut m).take_sent(Port::Wan, |f| sent.push(f.to_vec())), 1);
        let udp = crate::frame::parse_udp_frame(&sent[0]).expect("a UDP frame");
        assert_eq!(udp.src_mac, GATEWAY_WAN_MAC);
        assert_eq!(udp.dst, crate::testing::CLIENT_ADDR.parse().unwrap());
        let mut payload = sent[0][udp.payload.clone()].to_vec();
        let mut buf = vec![0u8; 2048];
        let got = m.client.receive(udp.src, &mut payload, false, now, SystemTime::now(), &mut buf);
        match got {
            Ok(Action::Deliver { packet, .. }) => assert_eq!(packet, &crate::testing::forwarded(&reply)[..]),
            other => panic!("the client did not accept the gateway's packet: {other:?}"),
        }
        // No frame leaked on either side.
        assert_eq!(io(&mut m).free_frames(), 2048, "every frame is back in the pool");
    }

    /// A LAN that drains slower than the tunnel delivers cannot take every
    /// frame of the shared pool: past its bound a port's backlog is dropped,
    /// counted, and the WAN port keeps working.
    #[test]
    fn a_stalled_port_holds_at_most_its_bound_of_the_shared_frames() {
        let mut m = MemoryWorker::new(AeadBackend::Ring);
        let now = Instant::now();
        let mut batch = Vec::new();
        let bound = crate::frame_io::tx_bound(crate::testing::MEMORY_FRAMES);
        let inner = ipv4_packet(100, CLIENT_TUNNEL, LAN_HOST);
        for _ in 0..bound + 100 {
            let frame = m.wan_frame(&inner, now);
            assert!(io(&mut m).inject(Port::Wan, &frame));
            m.run_until_idle(&mut batch, now);
        }
        assert_eq!(m.counters.drops.get(DropReason::TxFull), 100, "{:?}", m.counters.named());
        // The LAN never drained; the other direction still has frames and room.
        let reply = ipv4_packet(200, LAN_HOST, CLIENT_TUNNEL);
        assert!(io(&mut m).inject(Port::Lan, &MemoryWorker::lan_frame(&reply)));
        m.run_until_idle(&mut batch, now);
        assert_eq!(io(&mut m).take_sent(Port::Wan, |_| {}), 1, "the WAN port still sends");
        assert_eq!(io(&mut m).take_sent(Port::Lan, |_| {}), bound);
        assert_eq!(io(&mut m).free_frames(), crate::testing::MEMORY_FRAMES, "nothing leaked");
    }

    #[test]
    fn garbage_frames_are_counted_drops() {
        let mut m = MemoryWorker::new(AeadBackend::Ring);
        let now = Instant::now();
        let mut batch = Vec::new();
        let good = m.wan_frame(&ipv4_packet(64, CLIENT_TUNNEL, LAN_HOST), now);
        for len in [0, 13, 14, 42, 50, good.len() - 1] {
            assert!(io(&mut m).inject(Port::Wan, &good[..len]));
            assert!(io(&mut m).inject(Port::Lan, &good[..len]));
        }
        let mut flipped = good.clone();
        flipped[60] ^= 1;
        assert!(io(&mut m).inject(Port::Wan, &flipped));
        m.run_until_idle(&mut batch, now);
        assert_eq!(io(&mut m).take_sent(Port::Lan, |_| {}), 0);
        assert_eq!(io(&mut m).take_sent(Port::Wan, |_| {}), 0);
        assert_eq!(m.counters.drops.total(), 13, "every bad frame is a counted drop: {:?}", m.counters.named());
    }

    /// Frames that queue no AEAD (garbage here) never leave earlier packets
    /// waiting for helpers: a batch that queued none finishes what is in
    /// flight, on this thread if need be.
    #[test]
    fn a_batch_that_queues_no_aead_finishes_what_is_in_flight() {
        let mut m = MemoryWorker::with_crypto_threads(AeadBackend::Ring, 2);
        // The worker alone runs jobs now, and only when it waits for one.
        m.stop_helpers();
        let now = Instant::now();
        let mut batch = Vec::new();
        for i in 0..10 {
            let frame = m.wan_frame(&numbered(i, 100, CLIENT_TUNNEL, LAN_HOST), now);
            assert!(io(&mut m).inject(Port::Wan, &frame));
        }
        m.worker.process_batch(&mut batch, now);
        assert_eq!(io(&mut m).take_sent(Port::Lan, |_| {}), 0, "kept in flight for helpers");
        assert!(io(&mut m).inject(Port::Wan, &[0u8; 20]));
        m.worker.process_batch(&mut batch, now);
        let mut got = Vec::new();
        io(&mut m).take_sent(Port::Lan, |f| got.push(id_of(&f[14..])));
        assert_eq!(got, (0..10).collect::<Vec<_>>(), "finished behind a batch of garbage");
        assert_eq!(m.counters.drops.total(), 1, "{:?}", m.counters.named());
    }

    /// The crash seen in the field: under load (a valid-MAC1 flood), datagrams
    /// of 4..31 bytes whose type byte says "handshake" were classified from a
    /// zero-padded copy and reached `split_macs`, which underflowed.
    #[test]
    fn short_handshake_typed_datagrams_under_load_are_counted_drops() {
        let mut m = MemoryWorker::new(AeadBackend::Ring);
        let now = Instant::now();
        m.worker.shared.under_load_until.store(u64::MAX, Relaxed);
        let mut batch = Vec::new();
        let mut sent = 0;
        for kind in 1u8..=4 {
            for len in 0..200usize {
                if [148, 92, 64].contains(&len) && kind < 4 {
                    continue;
                }
                let mut payload = vec![0u8; len];
                if let Some(b) = payload.first_mut() {
                    *b = kind;
                }
                let frame = m.frame_payload(&payload);
                assert!(io(&mut m).inject(Port::Wan, &frame));
                sent += 1;
                if sent % 512 == 0 {
                    m.run_until_idle(&mut batch, now);
                }
            }
        }
        m.run_until_idle(&mut batch, now);
        let dropped = m.counters.drops.total();
        assert_eq!(dropped, sent, "every short or odd-sized datagram is a counted drop");
        assert_eq!(m.counters.cookie_replies.load(Relaxed), 0);
        assert_eq!(m.counters.handshakes_queued.load(Relaxed), 0);
        // The session still works.
        let frame = m.wan_frame(&ipv4_packet(64, CLIENT_TUNNEL, LAN_HOST), now);
        assert!(io(&mut m).inject(Port::Wan, &frame));
        m.run_until_idle(&mut batch, now);
        assert_eq!(io(&mut m).take_sent(Port::Lan, |_| {}), 1);
    }

    /// A forged transport packet carrying the session's receiver index (seen
    /// in cleartext) arriving on another queue first used to claim the
    /// session's receive side for that queue, so every genuine packet then
    /// failed as "wrong worker". Now nothing is claimed before the AEAD, and a
    /// session follows its authenticated packets to whichever queue they reach.
    #[test]
    fn forged_index_on_another_queue_claims_nothing_and_sessions_roam_between_queues() {
        let mut m = MemoryWorker::new(AeadBackend::Ring);
        let now = Instant::now();
        let mut batch = Vec::new();
        let frames = || MemoryFrames::new(128, 2048);
        let counters2 = Arc::new(WorkerCounters::default());
        let mut other = Worker::new(1, m.worker.shared.clone(), frames(), counters2.clone());
        let genuine = m.wan_frame(&ipv4_packet(80, CLIENT_TUNNEL, LAN_HOST), now);
        let mut forged = genuine.clone();
        let n = forged.len();
        forged[n - 20] ^= 0x55;
        assert!(other.frames_mut().inject(Port::Wan, &forged));
        while other.process_batch(&mut batch, now) > 0 {}
        assert_eq!(counters2.drops.get(DropReason::Authentication), 1);
        // The genuine packet on queue 0 is delivered.
        assert!(io(&mut m).inject(Port::Wan, &genuine));
        m.run_until_idle(&mut batch, now);
        assert_eq!(io(&mut m).take_sent(Port::Lan, |_| {}), 1);
        // The peer roams onto queue 1: its next packets are delivered there.
        for _ in 0..3 {
            let f = m.wan_frame(&ipv4_packet(80, CLIENT_TUNNEL, LAN_HOST), now);
            assert!(other.frames_mut().inject(Port::Wan, &f));
        }
        while other.process_batch(&mut batch, now) > 0 {}
        assert_eq!(other.frames_mut().take_sent(Port::Lan, |_| {}), 3);
        assert_eq!(counters2.drops.total(), 1, "only the forgery was dropped");
        assert_eq!(m.counters.drops.total(), 0);
    }

    /// Under load: no cookie, a cookie reply; with a valid cookie, queued but
    /// limited per source; cookie replies and responses that name no pending
    /// handshake of ours never reach the queue.
    #[test]
    fn under_load_handshakes_need_cookies_and_are_limited_per_source() {
        let mut m = MemoryWorker::new(AeadBackend::Ring);
        // Past REKEY_TIMEOUT after the fixture's own handshake.
        let now = Instant::now() + Duration::from_secs(6);
        let wall = SystemTime::now();
        let mut batch = Vec::new();
        m.worker.shared.under_load_until.store(u64::MAX, Relaxed);
        let peer = m.client_peer;
        let mut out = vec![0u8; 2048];
        m.client.initiate(peer);
        let t = m.client.poll_transmit(now, wall, &mut out).expect("an initiation");
        let frame = m.frame_payload(&out[..t.len]);
        assert!(io(&mut m).inject(Port::Wan, &frame));
        m.run_until_idle(&mut batch, now);
        let mut replies = Vec::new();
        assert_eq!(io(&mut m).take_sent(Port::Wan, |f| replies.push(f.to_vec())), 1);
        assert_eq!(m.counters.handshakes_queued.load(Relaxed), 0, "no cookie, not queued");
        let udp = crate::frame::parse_udp_frame(&replies[0]).unwrap();
        let mut reply = replies[0][udp.payload.clone()].to_vec();
        assert_eq!(reply.len(), COOKIE_REPLY_LEN);
        let gw: std::net::SocketAddr = crate::testing::GATEWAY_ADDR.parse().unwrap();
        m.client.receive(gw, &mut reply, false, now, wall, &mut out).expect("the client takes the cookie");
        // The retry carries MAC2 for this source: queued, up to the per-source limit.
        let later = now + Duration::from_secs(6);
        m.client.tick_at(later, wall);
        let t = m.client.poll_transmit(later, wall, &mut out).expect("a retry");
        let retry = m.frame_payload(&out[..t.len]);
        for _ in 0..(crate::admission::PER_SOURCE_PER_SECOND + 5) {
            assert!(io(&mut m).inject(Port::Wan, &retry));
        }
        m.run_until_idle(&mut batch, later);
        assert_eq!(m.counters.handshakes_queued.load(Relaxed), u64::from(crate::admission::PER_SOURCE_PER_SECOND));
        assert_eq!(m.counters.drops.get(DropReason::RateLimited), 5);
        // Junk cookie replies and responses (random receiver index) never queue.
        for i in 0..50u32 {
            let mut junk = vec![0u8; COOKIE_REPLY_LEN];
            junk[0] = 3;
            junk[4..8].copy_from_slice(&(i.wrapping_mul(0x9e37_79b9)).to_le_bytes());
            let f = m.frame_payload(&junk);
            assert!(io(&mut m).inject(Port::Wan, &f));
            let mut junk = vec![0u8; crate::wire::HANDSHAKE_RESPONSE_LEN];
            junk[0] = 2;
            junk[8..12].copy_from_slice(&(i.wrapping_mul(0x85eb_ca6b)).to_le_bytes());
            let f = m.frame_payload(&junk);
            assert!(io(&mut m).inject(Port::Wan, &f));
        }
        m.run_until_idle(&mut batch, later);
        assert_eq!(m.counters.drops.get(DropReason::UnknownIndex), 100);
        // A cookie reply may answer our response too: one naming a session's
        // index is handed on (the control thread checks it).
        let queued = m.counters.handshakes_queued.load(Relaxed);
        let mut reply = vec![0u8; COOKIE_REPLY_LEN];
        reply[0] = 3;
        reply[4..8].copy_from_slice(&m.gateway_index.to_le_bytes());
        let f = m.frame_payload(&reply);
        // (A new second: the per-source limit does not apply to cookie replies anyway.)
        assert!(io(&mut m).inject(Port::Wan, &f));
        m.run_until_idle(&mut batch, later);
        assert_eq!(queued, u64::from(crate::admission::PER_SOURCE_PER_SECOND), "junk queued nothing");
        assert_eq!(m.counters.handshakes_queued.load(Relaxed), queued + 1);
    }

    /// An IPv4 packet above the tunnel MTU that allows fragmentation is split
    /// into fragments that each fit (and reach the client); one with DF set
    /// gets "fragmentation needed" instead.
    #[test]
    fn oversize_ipv4_without_df_is_fragmented_with_df_answered() {
        let mut m = MemoryWorker::new(AeadBackend::Ring);
        let now = Instant::now();
        let mut batch = Vec::new();
        let mut big = ipv4_packet(1900, LAN_HOST, CLIENT_TUNNEL);
        big[6] &= !0x40; // clear DF
        crate::wire::Ipv4Packet::new_checked(&mut big[..]).unwrap().fill_checksum();
        assert!(io(&mut m).inject(Port::Lan, &MemoryWorker::lan_frame(&big)));
        m.run_until_idle(&mut batch, now);
        let mut sent = Vec::new();
        assert_eq!(io(&mut m).take_sent(Port::Wan, |f| sent.push(f.to_vec())), 2, "two fragments");
        let mut data = vec![0u8; 1880];
        for frame in &sent {
            let udp = crate::frame::parse_udp_frame(frame).unwrap();
            let mut payload = frame[udp.payload.clone()].to_vec();
            let mut buf = vec![0u8; 2048];
            let got = m.client.receive(udp.src, &mut payload, false, now, SystemTime::now(), &mut buf);
            let Ok(Action::Deliver { packet, .. }) = got else { panic!("{got:?}") };
            assert!(packet.len() <= 1420);
            let ip = crate::wire::Ipv4Packet::new_checked(packet).unwrap();
            assert!(ip.verify_checksum());
            let off = ip.fragment_offset();
            data[off..off + ip.payload().len()].copy_from_slice(ip.payload());
        }
        assert_eq!(&data[..], &big[20..], "the fragments reassemble to the original");
        assert_eq!(m.counters.encrypted.load(Relaxed), 2);
        // With DF: no fragments, an ICMP error to the sender instead.
        let df = ipv4_packet(1900, LAN_HOST, CLIENT_TUNNEL);
        assert!(io(&mut m).inject(Port::Lan, &MemoryWorker::lan_frame(&df)));
        m.run_until_idle(&mut batch, now);
        assert_eq!(io(&mut m).take_sent(Port::Wan, |_| {}), 0);
        assert_eq!(io(&mut m).take_sent(Port::Lan, |_| {}), 1, "fragmentation needed");
        assert_eq!(m.counters.drops.get(DropReason::Oversize), 1);
    }

    /// An inner packet from the client's site of `len` bytes, numbered `id`
    /// (in its first payload bytes).
    fn numbered(id: u32, len: usize, src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
        let mut p = ipv4_packet(len.max(24), src, dst);
        p[20..24].copy_from_slice(&id.to_be_bytes());
        p
    }

    fn id_of(inner: &[u8]) -> u32 {
        u32::from_be_bytes(inner[20..24].try_into().unwrap())
    }

    /// The client's datagram for `inner`, framed from `from` (a roaming client).
    fn wan_frame_from(m: &mut MemoryWorker, inner: &[u8], from: std::net::SocketAddr, now: Instant) -> Vec<u8> {
        let payload = crate::testing::sent_bytes(&mut m.client, inner, now);
        let mut frame = vec![0u8; crate::frame::udp_headers_len(false) + payload.len()];
        frame[crate::frame::udp_headers_len(false)..].copy_from_slice(&payload);
        let path = crate::peer_view::L2Path {
            local_mac: crate::testing::CLIENT_MAC,
            remote_mac: GATEWAY_WAN_MAC,
            local: from,
        };
        let to = crate::testing::GATEWAY_ADDR.parse().unwrap();
        crate::frame::write_udp_headers(&mut frame, &path, to, false).unwrap();
        frame
    }

    /// What a mix of genuine, forged and replayed datagrams (and their sizes,
    /// so the AEAD takes a different time for each) becomes: the ids of the
    /// packets the LAN got, in order, with the drop counters.
    fn deliver_mix(crypto_threads: usize, mix: &[(u8, usize)]) -> (Vec<u32>, Vec<u32>, MemoryWorker) {
        let mut m = MemoryWorker::with_crypto_threads(AeadBackend::Ring, crypto_threads);
        let now = Instant::now();
        let mut batch = Vec::new();
        let (mut sent, mut expected): (Vec<Vec<u8>>, Vec<u32>) = (Vec::new(), Vec::new());
        for (i, &(kind, len)) in mix.iter().enumerate() {
            let inner = numbered(i as u32, len, CLIENT_TUNNEL, LAN_HOST);
            let mut frame = m.wan_frame(&inner, now);
            match kind % 8 {
                // Forged: one ciphertext bit flipped.
                0 => *frame.last_mut().unwrap() ^= 1,
                // A replay of an earlier genuine datagram.
                1 if !sent.is_empty() => frame = sent[(i * 7) % sent.len()].clone(),
                _ => {
                    expected.push(i as u32);
                    sent.push(frame.clone());
                }
            }
            assert!(io(&mut m).inject(Port::Wan, &frame));
        }
        m.run_until_idle(&mut batch, now);
        let mut got = Vec::new();
        io(&mut m).take_sent(Port::Lan, |f| got.push(id_of(&f[14..])));
        assert_eq!(io(&mut m).free_frames(), crate::testing::MEMORY_FRAMES, "every frame is back in the pool");
        (got, expected, m)
    }

    /// With two crypto threads (a helper and the worker itself) the packets
    /// of one tunnel reach the LAN in the order they arrived, whatever order
    /// their AEAD finished in; forged ones do not hold the rest back; replays
    /// are refused; the counters are those of one thread.
    #[test]
    fn parallel_crypto_delivers_in_arrival_order_and_refuses_forgeries_and_replays() {
        let sizes = [64usize, 1400, 200, 1000, 80, 1420, 600];
        let mix: Vec<(u8, usize)> = (0..500)
            .map(|i| {
                (
                    if i % 37 == 5 {
                        0
                    } else if i % 41 == 9 {
                        1
                    } else {
                        2
                    },
                    sizes[i % 7],
                )
            })
            .collect();
        let (got, expected, m) = deliver_mix(2, &mix);
        assert_eq!(m.crypto_helpers(), 1);
        assert_eq!(got, expected, "delivered in arrival order, exactly the genuine ones");
        let forged = mix.iter().filter(|k| k.0 == 0).count() as u64;
        let replayed = (mix.len() - expected.len()) as u64 - forged;
        assert_eq!(m.counters.drops.get(DropReason::Authentication), forged);
        assert_eq!(m.counters.drops.get(DropReason::Replay), replayed);
        assert_eq!(m.counters.decrypted.load(Relaxed), expected.len() as u64);
        let view = m.shared.tables.views.load().get(&m.gateway_peer).unwrap().clone();
        assert_eq!(view.counters.rx_packets.load(Relaxed), expected.len() as u64, "the peer's data packets");
    }

    /// The helper does take a share of one tunnel's AEAD (retried: on a busy
    /// machine it may not be scheduled during the first rounds).
    #[test]
    fn a_helper_takes_a_share_of_one_tunnels_aead() {
        let mut m = MemoryWorker::with_crypto_threads(AeadBackend::Ring, 2);
        let mut batch = Vec::new();
        let inner = numbered(1, 1420, CLIENT_TUNNEL, LAN_HOST);
        for _ in 0..200 {
            let now = Instant::now();
            for _ in 0..256 {
                let frame = m.wan_frame(&inner, now);
                assert!(io(&mut m).inject(Port::Wan, &frame));
            }
            m.run_until_idle(&mut batch, now);
            assert_eq!(io(&mut m).take_sent(Port::Lan, |_| {}), 256);
            if m.counters.crypto_offloaded.load(Relaxed) > 0 {
                return;
            }
        }
        panic!("the helper never ran a job");
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(24))]
        /// Any mix of genuine, forged and replayed datagrams of any sizes:
        /// two and three crypto threads deliver exactly what one thread does,
        /// in the same order.
        #[test]
        fn parallel_crypto_delivers_what_one_thread_does(
            mix in proptest::collection::vec((0u8..8, 20usize..1420), 1..200),
            threads in 2usize..4,
        ) {
            let (one, expected, _) = deliver_mix(1, &mix);
            let (many, _, _) = deliver_mix(threads, &mix);
            proptest::prop_assert_eq!(&one, &expected);
            proptest::prop_assert_eq!(&many, &expected);
        }
    }

    /// Sealing on two crypto threads: the counters (nonces) are assigned in
    /// order on the worker, so the client sees every packet in order with
    /// consecutive counters and accepts them all.
    #[test]
    fn parallel_crypto_seals_with_counters_in_order() {
        let mut m = MemoryWorker::with_crypto_threads(AeadBackend::Ring, 2);
        let now = Instant::now();
        let mut batch = Vec::new();
        // The client's first packet teaches the worker its link-layer path.
        let first = m.wan_frame(&numbered(0, 64, CLIENT_TUNNEL, LAN_HOST), now);
        assert!(io(&mut m).inject(Port::Wan, &first));
        m.run_until_idle(&mut batch, now);
        io(&mut m).take_sent(Port::Lan, |_| {});
        let sizes = [1420usize, 64, 700, 1200, 90];
        let replies: Vec<Vec<u8>> =
            (0..300).map(|i| numbered(i, sizes[i as usize % 5], LAN_HOST, CLIENT_TUNNEL)).collect();
        for reply in &replies {
            assert!(io(&mut m).inject(Port::Lan, &MemoryWorker::lan_frame(reply)));
        }
        m.run_until_idle(&mut batch, now);
        let mut frames = Vec::new();
        assert_eq!(io(&mut m).take_sent(Port::Wan, |f| frames.push(f.to_vec())), replies.len());
        let mut buf = vec![0u8; 2048];
        for (i, frame) in frames.iter().enumerate() {
            let udp = crate::frame::parse_udp_frame(frame).unwrap();
            let mut payload = frame[udp.payload.clone()].to_vec();
            let counter = u64::from_le_bytes(payload[8..16].try_into().unwrap());
            assert_eq!(counter, i as u64, "nonces in send order");
            match m.client.receive(udp.src, &mut payload, false, now, SystemTime::now(), &mut buf) {
                Ok(Action::Deliver { packet, .. }) => {
                    assert_eq!(packet, &crate::testing::forwarded(&replies[i])[..], "packet {i}")
                }
                other => panic!("the client refused packet {i}: {other:?}"),
            }
        }
        assert_eq!(m.counters.encrypted.load(Relaxed), replies.len() as u64);
        assert_eq!(io(&mut m).free_frames(), crate::testing::MEMORY_FRAMES);
    }

    /// A rekey with two crypto threads: datagrams sealed on the old and on the
    /// new keypair, interleaved in one batch, are each opened and accepted on
    /// their own keypair (its replay window; both count from 0), so every one
    /// reaches the LAN, in arrival order, and none is refused as a replay.
    #[test]
    fn parallel_crypto_accepts_two_keypairs_interleaved_in_one_batch() {
        let mut m = MemoryWorker::with_crypto_threads(AeadBackend::Ring, 2);
        let (now, wall) = (Instant::now(), SystemTime::now());
        let gateway: std::net::SocketAddr = crate::testing::GATEWAY_ADDR.parse().unwrap();
        let old: Vec<Vec<u8>> = (0..40)
            .map(|i| m.wan_frame(&numbered(2 * i, 64 + 30 * i as usize, CLIENT_TUNNEL, LAN_HOST), now))
            .collect();
        // Past the rekey timeout the client starts a new handshake; the worker
        // hands the initiation to the control side, whose answer gives the
        // client its new keypair.
        let (now, wall) = (now + std::time::Duration::from_secs(6), wall + std::time::Duration::from_secs(6));
        let mut out = vec![0u8; 2048];
        m.client.initiate(m.client_peer);
        let initiation =
            m.client.poll_transmit(now, wall, &mut out).map(|t| out[..t.len].to_vec()).expect("an initiation");
        let frame = m.frame_payload(&initiation);
        assert!(io(&mut m).inject(Port::Wan, &frame));
        m.run_until_idle(&mut Vec::new(), now);
        let (jobs, _, control) = m.control_side();
        let mut job = jobs.try_recv().expect("the initiation reached the control side");
        let len = job.len;
        let mut response = match control.receive_from(job.from, &mut job.bytes[..len], false, now, wall, &mut out) {
            Ok(Action::Send { bytes, .. }) => bytes.to_vec(),
            other => panic!("expected a response, got {other:?}"),
        };
        let mut scratch = vec![0u8; 2048];
        let _ = m.client.receive(gateway, &mut response, false, now, wall, &mut scratch);
        let new: Vec<Vec<u8>> = (0..40)
            .map(|i| m.wan_frame(&numbered(2 * i + 1, 1420 - 30 * i as usize, CLIENT_TUNNEL, LAN_HOST), now))
            .collect();
        assert_ne!(old[0][46..50], new[0][46..50], "the new datagrams name another receiver index");
        let mut expected = Vec::new();
        for (i, (o, n)) in old.iter().zip(&new).enumerate() {
            assert!(io(&mut m).inject(Port::Wan, n));
            assert!(io(&mut m).inject(Port::Wan, o));
            expected.extend([2 * i as u32 + 1, 2 * i as u32]);
        }
        m.run_until_idle(&mut Vec::new(), now);
        let mut got = Vec::new();
        io(&mut m).take_sent(Port::Lan, |f| got.push(id_of(&f[14..])));
        assert_eq!(got, expected);
        assert_eq!(m.counters.drops.get(DropReason::Replay), 0);
        assert_eq!(io(&mut m).free_frames(), crate::testing::MEMORY_FRAMES, "every frame is back in the pool");
    }

    /// Roaming with two crypto threads: the endpoint follows the last
    /// authenticated packet in arrival order, and replies go there.
    #[test]
    fn parallel_crypto_roams_to_the_last_authenticated_sender() {
        let mut m = MemoryWorker::with_crypto_threads(AeadBackend::Ring, 2);
        let now = Instant::now();
        let mut batch = Vec::new();
        let (a, b): (std::net::SocketAddr, std::net::SocketAddr) =
            ("192.0.2.50:4000".parse().unwrap(), "192.0.2.60:5000".parse().unwrap());
        for i in 0..100u32 {
            let from = if i < 99 { a } else { b };
            let frame = wan_frame_from(&mut m, &numbered(i, 300, CLIENT_TUNNEL, LAN_HOST), from, now);
            assert!(io(&mut m).inject(Port::Wan, &frame));
        }
        // A forged datagram from the old address after them moves nothing.
        let mut forged = wan_frame_from(&mut m, &numbered(100, 300, CLIENT_TUNNEL, LAN_HOST), a, now);
        *forged.last_mut().unwrap() ^= 1;
        assert!(io(&mut m).inject(Port::Wan, &forged));
        m.run_until_idle(&mut batch, now);
        assert_eq!(io(&mut m).take_sent(Port::Lan, |_| {}), 100);
        let view = m.shared.tables.views.load().get(&m.gateway_peer).unwrap().clone();
        assert_eq!(view.endpoint_addr(), Some(b), "the last authenticated sender");
        let reply = MemoryWorker::lan_frame(&numbered(1, 100, LAN_HOST, CLIENT_TUNNEL));
        assert!(io(&mut m).inject(Port::Lan, &reply));
        m.run_until_idle(&mut batch, now);
        let mut to = None;
        io(&mut m).take_sent(Port::Wan, |f| to = Some(crate::frame::parse_udp_frame(f).unwrap().dst));
        assert_eq!(to, Some(b), "the reply follows the peer");
    }
}
