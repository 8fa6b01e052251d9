//! The kernel slow path: WireGuard datagrams the XDP program leaves to the
//! kernel reach the gateway's own UDP socket, and this thread reads them.
//! That covers IPv4 fragments (the kernel reassembles them), IPv6 with
//! extension headers, rx queues without an AF_XDP socket (a WAN NIC with more
//! queues than workers) and UDP to another of the host's addresses.
//!
//! Handshake messages join the workers' handshake queue; transport data goes
//! through `transport::open` (the one receive path) and the forwarding
//! policy (`worker::from_tunnel`, the workers' own), and the inner packet is
//! handed, in a buffer from the bounded staging pool, to worker 0, which owns a
//! LAN socket and frames it like any other.
//!
//! It also reads the host interface (`host.rs`): the host's own packets that
//! the kernel routed into a tunnel are sealed and sent through the kernel.
//! Everything is counted; nothing here blocks for long or grows without bound.

use crate::admission::{self, Admission, SourceLimiter};
use crate::drops::DropReason;
use crate::frame::parse_ip_frame_payload;
use crate::peer_view::{Endpoint, PeerId};
use crate::policy::Inbound;
use crate::snapshot::Snapshot;
use crate::transport::{self, Opened};
use crate::wire::MessageType;
use crate::worker::{from_tunnel, seal_via_kernel, to_host, Expired, IcmpBudget, Refusal, Shared, WorkerCounters};
use crossbeam_channel::Sender;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

/// The slow path's state: its limiter, ICMP budget and buffers.
#[derive(Debug)]
pub struct SlowPath {
    shared: Arc<Shared>,
    to_lan: Sender<(PeerId, Vec<u8>)>,
    pub counters: Arc<WorkerCounters>,
    limiter: SourceLimiter,
    icmp: IcmpBudget,
    /// Where packets are sealed (and ICMP errors quoted and built).
    scratch: Vec<u8>,
    error: Vec<u8>,
}

impl SlowPath {
    pub fn new(shared: Arc<Shared>, to_lan: Sender<(PeerId, Vec<u8>)>, counters: Arc<WorkerCounters>) -> Self {
        Self {
            shared,
            to_lan,
            counters,
            limiter: SourceLimiter::default(),
            icmp: IcmpBudget::default(),
            scratch: vec![0u8; 65536],
            error: vec![0u8; 2048],
        }
    }

    /// Handles one datagram the kernel received on the listen port.
    pub fn handle_datagram(&mut self, datagram: &mut [u8], from: SocketAddr, now: Instant) {
        self.counters.wan_rx.fetch_add(1, Relaxed);
        if let Err(reason) = self.handle(datagram, from, now) {
            self.counters.drops.count(reason);
        }
    }

    fn handle(&mut self, datagram: &mut [u8], from: SocketAddr, now: Instant) -> Result<(), DropReason> {
        let shared = &*self.shared;
        if MessageType::of(datagram).map_err(|_| DropReason::Malformed)? != MessageType::Transport {
            // The same admission as on the AF_XDP path: MACs, pending indices,
            // cookies under load, per-source limits.
            return match admission::admit(shared, &mut self.limiter, datagram, Endpoint::from(from), now)? {
                Admission::Queue(job) => {
                    admission::enqueue(shared, job, now)?;
                    self.counters.handshakes_queued.fetch_add(1, Relaxed);
                    Ok(())
                }
                Admission::CookieReply(reply) => {
                    // Unauthenticated sender: never let an answer to it wait in the
                    // kernel behind an unresolved (perhaps spoofed) next hop, where
                    // it would hold the socket's send buffer that every handshake
                    // shares. Nor ask for resolution on its behalf.
                    if !shared.wan_next_hops.is_ready(from.ip()) {
                        return Err(DropReason::NoNextHop);
                    }
                    shared.kernel_udp.send_to(&reply, from).map_err(|_| DropReason::KernelSend)?;
                    self.counters.cookie_replies.fetch_add(1, Relaxed);
                    Ok(())
                }
            };
        }
        let mut snapshot = Snapshot::load(&shared.tables);
        match transport::open(&mut snapshot, datagram, 0, Endpoint::from(from), now)? {
            Opened::Keepalive { .. } => {
                self.counters.keepalives_received.fetch_add(1, Relaxed);
                Ok(())
            }
            Opened::Data { peer, inner } => {
                self.counters.decrypted.fetch_add(1, Relaxed);
                let packet = datagram.get(..inner.len).ok_or(DropReason::BadInnerPacket)?;
                let tally = snapshot.last_received_mut().ok_or(DropReason::UnknownIndex)?;
                match from_tunnel(shared, tally, packet, &mut self.scratch, now) {
                    Ok(Inbound::ToHost) => {
                        to_host(shared, &self.counters, packet);
                        Ok(())
                    }
                    // Worker 0 owns a LAN socket: it frames the packet.
                    Ok(Inbound::Forward) => {
                        let buf = shared.from_kernel.take(packet).ok_or(DropReason::NoFrame)?;
                        self.to_lan.try_send((peer, buf)).map_err(|e| {
                            shared.from_kernel.give(e.into_inner().1);
                            DropReason::NoFrame
                        })
                    }
                    Err(Refusal::Drop(reason)) => Err(reason),
                    Err(Refusal::Expired(expired)) => {
                        // The answer follows the endpoint this packet taught.
                        drop(snapshot);
                        self.time_exceeded_into_tunnel(peer, expired, now);
                        Err(DropReason::TtlExceeded)
                    }
                }
            }
        }
    }

    /// ICMP "time exceeded" into `peer`'s tunnel (the quote is in `scratch`).
    fn time_exceeded_into_tunnel(&mut self, peer: PeerId, expired: Expired, now: Instant) {
        let Some(len) = expired.answer(&self.shared, &mut self.icmp, &self.scratch, &mut self.error, now) else {
            return;
        };
        if let Err(reason) = self.seal_into_tunnel(peer, len, now) {
            self.counters.drops.count(reason);
        } else {
            self.counters.icmp_time_exceeded.fetch_add(1, Relaxed);
        }
    }

    /// Seals the packet in `error[..len]` into `peer`'s tunnel through the kernel.
    fn seal_into_tunnel(&mut self, peer: PeerId, len: usize, now: Instant) -> Result<(), DropReason> {
        let shared = &*self.shared;
        let mut snapshot = Snapshot::load(&shared.tables);
        let tally = snapshot.sending_to(peer)?;
        let to = tally.endpoint().ok_or(DropReason::NoEndpoint)?.addr;
        let packet = self.error.get(..len).ok_or(DropReason::BufferTooSmall)?;
        seal_via_kernel(shared, &self.counters, &mut self.scratch, tally, to, packet, false, now)
    }

    /// One packet the host's kernel routed into a tunnel (read from the host
    /// interface): from one of the host's own addresses only, then cryptokey
    /// routing, sealed through the kernel (untracked).
    pub fn handle_host_packet(&mut self, packet: &[u8], now: Instant) {
        self.counters.lan_rx.fetch_add(1, Relaxed);
        if let Err(reason) = self.seal_host_packet(packet, now) {
            self.counters.drops.count(reason);
        }
    }

    fn seal_host_packet(&mut self, packet: &[u8], now: Instant) -> Result<(), DropReason> {
        let shared = &*self.shared;
        let ip = parse_ip_frame_payload(packet).map_err(|_| DropReason::Malformed)?;
        let packet = packet.get(..ip.len).ok_or(DropReason::Malformed)?;
        if !shared.host_addresses.contains(ip.src) {
            // The kernel forwarded it here (from the WAN, a container, another
            // network): only the host's own packets may enter a tunnel this way.
            return Err(DropReason::ForeignSource);
        }
        if packet.len() > shared.tunnel_mtu {
            // The host interface's MTU is the tunnel MTU: the kernel fragments
            // or answers "too big" itself before this can happen.
            return Err(DropReason::Oversize);
        }
        let mut snapshot = Snapshot::load(&shared.tables);
        let tally = snapshot.route(ip.dst)?;
        // (Opens no flow: a forged source could pass for the host's own here,
        // so replies to the host need a rule naming it, as anything else to it.)
        let to = tally.endpoint().ok_or(DropReason::NoEndpoint)?.addr;
        // Locally generated: the kernel set its TTL; no hop to count here.
        seal_via_kernel(shared, &self.counters, &mut self.scratch, tally, to, packet, false, now)
    }
}

/// A dual-stack socket reports IPv4 senders as `::ffff:a.b.c.d`: use the
/// IPv4 address, as the AF_XDP path does, so an endpoint has one spelling.
pub fn canonical(from: SocketAddr) -> SocketAddr {
    match from {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => from,
        },
        v4 => v4,
    }
}

/// Reads the kernel socket and the host interface until `shared.stop` is set.
pub fn run(
    shared: Arc<Shared>,
    socket: Arc<UdpSocket>,
    to_lan: Sender<(PeerId, Vec<u8>)>,
    counters: Arc<WorkerCounters>,
) {
    let mut slow = SlowPath::new(shared.clone(), to_lan, counters);
    let mut buf = vec![0u8; 65536];
    let tun = shared.host_tun.clone();
    let fds = [socket.as_raw_fd(), tun.as_ref().map_or(-1, |t| t.raw_fd())];
    let mut pfds = fds.map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 });
    while !shared.stop.load(Relaxed) {
        // SAFETY: `pfds` is a valid array of pollfd for the length passed
        // (a negative fd is ignored by poll).
        if unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 100) } <= 0 {
            continue;
        }
        // Both are non-blocking: drain what is there (a bounded batch from
        // each, so neither starves the other), then poll again.
        for _ in 0..crate::worker::BATCH {
            let mut idle = true;
            if let Ok((n, from)) = socket.recv_from(&mut buf) {
                slow.handle_datagram(&mut buf[..n], canonical(from), Instant::now());
                idle = false;
            }
            if let Some(Ok(n)) = tun.as_ref().map(|t| t.read(&mut buf)) {
                slow.handle_host_packet(&buf[..n], Instant::now());
                idle = false;
            }
            if idle {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::noise::AeadBackend;
    use crate::testing::{ipv4_packet, MemoryWorker, CLIENT_TUNNEL, LAN_HOST};

    #[test]
    fn v4_mapped_senders_get_their_ipv4_spelling() {
        let mapped: SocketAddr = "[::ffff:192.0.2.7]:51820".parse().unwrap();
        assert_eq!(canonical(mapped), "192.0.2.7:51820".parse().unwrap());
        let v6: SocketAddr = "[2001:db8::1]:1".parse().unwrap();
        assert_eq!(canonical(v6), v6);
    }

    /// What the kernel hands over (a reassembled fragment, a queue without a
    /// socket) is opened by the same transport path and leaves through the LAN.
    #[test]
    fn kernel_datagrams_are_opened_and_forwarded_or_counted() {
        let mut m = MemoryWorker::new(AeadBackend::Ring);
        let now = Instant::now();
        let (to_lan, from_kernel) = crossbeam_channel::bounded(16);
        m.worker.set_slow_path(from_kernel);
        let shared = m.worker.shared.clone();
        let mut slow = SlowPath::new(shared.clone(), to_lan, Arc::new(WorkerCounters::default()));
        let counters = slow.counters.clone();
        let from: SocketAddr = crate::testing::CLIENT_ADDR.parse().unwrap();
        // Outbound staging exhausted (many peers waiting for handshakes):
        // inbound traffic from the kernel has its own buffers.
        let held: Vec<Vec<u8>> = std::iter::from_fn(|| shared.staging.take(b"x")).collect();
        assert_eq!(held.len(), shared.staging.limit());
        let inner = ipv4_packet(1000, CLIENT_TUNNEL, LAN_HOST);
        let mut datagram = crate::testing::sent_bytes(&mut m.client, &inner, now);
        let replayed = datagram.clone();
        slow.handle_datagram(&mut datagram, from, now);
        assert_eq!(counters.decrypted.load(Relaxed), 1);
        m.run_until_idle(&mut Vec::new(), now);
        let mut out = Vec::new();
        assert_eq!(
            m.worker.frames_mut().take_sent(crate::frame_io::Port::Lan, |f| out.push(f.to_vec())),
            1,
            "worker 0 framed it"
        );
        assert_eq!(&out[0][14..], &crate::testing::forwarded(&inner)[..]);
        // A replay, garbage of every length and short handshakes: counted drops.
        let mut again = replayed;
        slow.handle_datagram(&mut again, from, now);
        assert_eq!(counters.drops.get(DropReason::Replay), 1);
        for len in 0..200usize {
            for kind in [1u8, 2, 3, 4, 9] {
                let mut d = vec![0u8; len];
                if let Some(b) = d.first_mut() {
                    *b = kind;
                }
                slow.handle_datagram(&mut d, from, now);
            }
        }
        assert_eq!(counters.wan_rx.load(Relaxed), 2 + 200 * 5);
        assert_eq!(counters.handshakes_queued.load(Relaxed), 0, "no MAC1, no pending index: nothing queued");
        assert_eq!(counters.drops.total() + 1, counters.wan_rx.load(Relaxed));
        assert_eq!(shared.from_kernel.in_use(), 0, "buffers went back to the pool");
    }

    proptest::proptest! {
        /// Whatever the host interface hands over (the kernel forwards there
        /// what others send too), every packet is sealed or a counted drop,
        /// never a panic.
        #[test]
        fn any_bytes_from_the_host_interface_are_sealed_or_counted(
            packets in proptest::collection::vec(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..120), 1..40),
            host_source in proptest::prelude::any::<bool>(),
        ) {
            let m = MemoryWorker::new(AeadBackend::Ring);
            let shared = m.worker.shared.clone();
            let (to_lan, _from_kernel) = crossbeam_channel::bounded(16);
            let mut slow = SlowPath::new(shared.clone(), to_lan, Arc::new(WorkerCounters::default()));
            let counters = slow.counters.clone();
            shared.host_addresses.replace(vec![std::net::IpAddr::from([10, 0, 1, 1])]);
            for mut p in packets.iter().cloned() {
                // Some of them well-formed IPv4 towards the tunnel.
                if p.len() >= 20 && p[0] & 1 == 1 {
                    let src = if host_source { [10, 0, 1, 1] } else { LAN_HOST };
                    p = ipv4_packet(p.len(), src, CLIENT_TUNNEL);
                }
                slow.handle_host_packet(&p, Instant::now());
            }
            let handled = counters.via_kernel.load(Relaxed) + counters.staged.load(Relaxed) + counters.drops.total();
            proptest::prop_assert_eq!(handled, packets.len() as u64);
        }
    }

    /// From the host interface only the host's own packets enter a tunnel:
    /// one the kernel forwarded there from elsewhere is counted, never sealed.
    #[test]
    fn only_the_hosts_own_packets_enter_tunnels_from_the_host_interface() {
        let m = MemoryWorker::new(AeadBackend::Ring);
        let shared = m.worker.shared.clone();
        let (to_lan, _from_kernel) = crossbeam_channel::bounded(16);
        let mut slow = SlowPath::new(shared.clone(), to_lan, Arc::new(WorkerCounters::default()));
        let counters = slow.counters.clone();
        let now = Instant::now();
        let host = [10, 0, 1, 1];
        shared.host_addresses.replace(vec![std::net::IpAddr::from(host)]);
        shared.wan_next_hops.mark_ready(crate::testing::CLIENT_ADDR.parse::<SocketAddr>().unwrap().ip());
        slow.handle_host_packet(&ipv4_packet(100, LAN_HOST, CLIENT_TUNNEL), now);
        assert_eq!(counters.drops.get(DropReason::ForeignSource), 1, "a LAN host's packet via the kernel");
        slow.handle_host_packet(&ipv4_packet(100, host, CLIENT_TUNNEL), now);
        assert_eq!(counters.drops.get(DropReason::ForeignSource), 1);
        let sealed = counters.via_kernel.load(Relaxed) + counters.drops.get(DropReason::KernelSend);
        assert_eq!(sealed, 1, "the host's own packet was sealed (sent, or refused by this test's loopback socket)");
        assert_eq!(shared.conntrack.counters.inserts.load(Relaxed), 0, "and opened no flow");
    }

    /// The kernel path gets the same defences as AF_XDP: under load, no
    /// cookie means a cookie reply, a bad MAC1 means a drop; nothing queued.
    #[test]
    fn kernel_handshakes_get_the_same_admission_under_load() {
        let mut m = MemoryWorker::new(AeadBackend::Ring);
        let now = Instant::now() + std::time::Duration::from_secs(6);
        let shared = m.worker.shared.clone();
        shared.under_load_until.store(u64::MAX, Relaxed);
        let (to_lan, _from_kernel) = crossbeam_channel::bounded(16);
        let mut slow = SlowPath::new(shared.clone(), to_lan, Arc::new(WorkerCounters::default()));
        let counters = slow.counters.clone();
        let from: SocketAddr = crate::testing::CLIENT_ADDR.parse().unwrap();
        let mut out = vec![0u8; 2048];
        m.client.initiate(m.client_peer);
        let t = m.client.poll_transmit(now, std::time::SystemTime::now(), &mut out).expect("an initiation");
        let mut init = out[..t.len].to_vec();
        let init_copy = init.clone();
        let mut forged = init.clone();
        forged[120] ^= 1;
        slow.handle_datagram(&mut init, from, now);
        slow.handle_datagram(&mut forged, from, now);
        assert_eq!(counters.handshakes_queued.load(Relaxed), 0, "nothing reached the control thread");
        assert_eq!(counters.drops.get(DropReason::NoNextHop), 1, "no cookie reply towards an unresolved next hop");
        shared.wan_next_hops.mark_ready(from.ip());
        let mut again = init_copy;
        slow.handle_datagram(&mut again, from, now);
        let answered = counters.cookie_replies.load(Relaxed) + counters.drops.get(DropReason::KernelSend);
        assert_eq!(answered, 1, "a cookie reply (sent, or refused by this test's loopback socket)");
        assert_eq!(counters.drops.get(DropReason::InvalidMac1), 1);
    }
}
