//! The kernel slow path: WireGuard datagrams the XDP program leaves to the
//! kernel reach the gateway's own UDP socket, and this thread reads them.
//! That covers IPv4 fragments (the kernel reassembles them), IPv6 with
//! extension headers, rx queues without an AF_XDP socket (a WAN NIC with more
//! queues than workers) and UDP to another of the host's addresses.
//!
//! Handshake messages join the workers' handshake queue; transport data goes
//! through `transport::open` (the one receive path) and the inner packet is
//! handed, in a buffer from the bounded staging pool, to worker 0, which owns a
//! LAN socket and frames it like any other. Everything is counted; nothing
//! here blocks for long or grows without bound.

use crate::admission::{self, Admission, SourceLimiter};
use crate::drops::DropReason;
use crate::peer_view::Endpoint;
use crate::transport::{self, Opened};
use crate::wire::MessageType;
use crate::worker::{Shared, WorkerCounters};
use crossbeam_channel::Sender;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

/// Handles one datagram the kernel received on the listen port. Cookie
/// replies (under load) go back through `reply_via`.
pub fn handle_datagram(
    shared: &Shared,
    limiter: &mut SourceLimiter,
    to_lan: &Sender<Vec<u8>>,
    counters: &WorkerCounters,
    datagram: &mut [u8],
    from: SocketAddr,
    now: Instant,
) {
    counters.wan_rx.fetch_add(1, Relaxed);
    if let Err(reason) = handle(shared, limiter, to_lan, counters, datagram, from, now) {
        counters.drops.count(reason);
    }
}

fn handle(
    shared: &Shared,
    limiter: &mut SourceLimiter,
    to_lan: &Sender<Vec<u8>>,
    counters: &WorkerCounters,
    datagram: &mut [u8],
    from: SocketAddr,
    now: Instant,
) -> Result<(), DropReason> {
    if MessageType::of(datagram).map_err(|_| DropReason::Malformed)? != MessageType::Transport {
        // The same admission as on the AF_XDP path: MACs, pending indices,
        // cookies under load, per-source limits.
        return match admission::admit(shared, limiter, datagram, Endpoint::from(from), now)? {
            Admission::Queue(job) => {
                admission::enqueue(shared, job, now)?;
                counters.handshakes_queued.fetch_add(1, Relaxed);
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
                counters.cookie_replies.fetch_add(1, Relaxed);
                Ok(())
            }
        };
    }
    match transport::open(&shared.tables, datagram, Endpoint::from(from), now)? {
        Opened::Keepalive { .. } => {
            counters.keepalives_received.fetch_add(1, Relaxed);
            Ok(())
        }
        Opened::Data { inner, offset, .. } => {
            let packet = datagram.get(offset..offset + inner.len).ok_or(DropReason::BadInnerPacket)?;
            let buf = shared.from_kernel.take(packet).ok_or(DropReason::NoFrame)?;
            match to_lan.try_send(buf) {
                Ok(()) => {
                    counters.decrypted.fetch_add(1, Relaxed);
                    Ok(())
                }
                Err(e) => {
                    shared.from_kernel.give(e.into_inner());
                    Err(DropReason::NoFrame)
                }
            }
        }
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

/// Reads the kernel socket until `shared.stop` is set.
pub fn run(shared: Arc<Shared>, socket: Arc<UdpSocket>, to_lan: Sender<Vec<u8>>, counters: Arc<WorkerCounters>) {
    let mut buf = vec![0u8; 65536];
    let mut limiter = SourceLimiter::default();
    let fd = socket.as_raw_fd();
    while !shared.stop.load(Relaxed) {
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: `pfd` is one valid pollfd for the duration of the call.
        if unsafe { libc::poll(&mut pfd, 1, 100) } <= 0 {
            continue;
        }
        // The socket is non-blocking: drain what is there, then poll again.
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            let from = canonical(from);
            handle_datagram(&shared, &mut limiter, &to_lan, &counters, &mut buf[..n], from, Instant::now());
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
        let counters = WorkerCounters::default();
        let mut limiter = SourceLimiter::default();
        let from: SocketAddr = crate::testing::CLIENT_ADDR.parse().unwrap();
        // Outbound staging exhausted (many peers waiting for handshakes):
        // inbound traffic from the kernel has its own buffers.
        let held: Vec<Vec<u8>> = std::iter::from_fn(|| shared.staging.take(b"x")).collect();
        assert_eq!(held.len(), shared.staging.limit());
        let inner = ipv4_packet(1000, CLIENT_TUNNEL, LAN_HOST);
        let mut datagram = crate::testing::sent_bytes(&mut m.client, &inner, now);
        let replayed = datagram.clone();
        handle_datagram(&shared, &mut limiter, &to_lan, &counters, &mut datagram, from, now);
        assert_eq!(counters.decrypted.load(Relaxed), 1);
        m.run_until_idle(&mut Vec::new(), now);
        let mut out = Vec::new();
        assert_eq!(m.worker.queues_mut().1.take_sent(|f| out.push(f.to_vec())), 1, "worker 0 framed it");
        assert_eq!(&out[0][14..], &inner[..]);
        // A replay, garbage of every length and short handshakes: counted drops.
        let mut again = replayed;
        handle_datagram(&shared, &mut limiter, &to_lan, &counters, &mut again, from, now);
        assert_eq!(counters.drops.get(DropReason::Replay), 1);
        for len in 0..200usize {
            for kind in [1u8, 2, 3, 4, 9] {
                let mut d = vec![0u8; len];
                if let Some(b) = d.first_mut() {
                    *b = kind;
                }
                handle_datagram(&shared, &mut limiter, &to_lan, &counters, &mut d, from, now);
            }
        }
        assert_eq!(counters.wan_rx.load(Relaxed), 2 + 200 * 5);
        assert_eq!(counters.handshakes_queued.load(Relaxed), 0, "no MAC1, no pending index: nothing queued");
        assert_eq!(counters.drops.total() + 1, counters.wan_rx.load(Relaxed));
        assert_eq!(shared.from_kernel.in_use(), 0, "buffers went back to the pool");
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
        let counters = WorkerCounters::default();
        let mut limiter = SourceLimiter::default();
        let from: SocketAddr = crate::testing::CLIENT_ADDR.parse().unwrap();
        let mut out = vec![0u8; 2048];
        m.client.initiate(m.client_peer);
        let t = m.client.poll_transmit(now, std::time::SystemTime::now(), &mut out).expect("an initiation");
        let mut init = out[..t.len].to_vec();
        let init_copy = init.clone();
        let mut forged = init.clone();
        forged[120] ^= 1;
        handle_datagram(&shared, &mut limiter, &to_lan, &counters, &mut init, from, now);
        handle_datagram(&shared, &mut limiter, &to_lan, &counters, &mut forged, from, now);
        assert_eq!(counters.handshakes_queued.load(Relaxed), 0, "nothing reached the control thread");
        assert_eq!(counters.drops.get(DropReason::NoNextHop), 1, "no cookie reply towards an unresolved next hop");
        shared.wan_next_hops.mark_ready(from.ip());
        let mut again = init_copy;
        handle_datagram(&shared, &mut limiter, &to_lan, &counters, &mut again, from, now);
        let answered = counters.cookie_replies.load(Relaxed) + counters.drops.get(DropReason::KernelSend);
        assert_eq!(answered, 1, "a cookie reply (sent, or refused by this test's loopback socket)");
        assert_eq!(counters.drops.get(DropReason::InvalidMac1), 1);
    }
}
