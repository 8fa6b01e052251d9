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

use crate::drops::DropReason;
use crate::peer_view::Endpoint;
use crate::transport::{self, Opened};
use crate::wire::{MessageType, COOKIE_REPLY_LEN, HANDSHAKE_INITIATION_LEN, HANDSHAKE_RESPONSE_LEN};
use crate::worker::{HandshakeJob, Shared, WorkerCounters, HANDSHAKE_JOB_LEN};
use crossbeam_channel::{Sender, TrySendError};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

/// Handles one datagram the kernel received on the listen port.
pub fn handle_datagram(
    shared: &Shared,
    to_lan: &Sender<Vec<u8>>,
    counters: &WorkerCounters,
    datagram: &mut [u8],
    from: SocketAddr,
    now: Instant,
) {
    counters.wan_rx.fetch_add(1, Relaxed);
    if let Err(reason) = handle(shared, to_lan, counters, datagram, from, now) {
        counters.drops.count(reason);
    }
}

fn handle(
    shared: &Shared,
    to_lan: &Sender<Vec<u8>>,
    counters: &WorkerCounters,
    datagram: &mut [u8],
    from: SocketAddr,
    now: Instant,
) -> Result<(), DropReason> {
    let expected = match MessageType::of(datagram).map_err(|_| DropReason::Malformed)? {
        MessageType::Transport => {
            return match transport::open(&shared.tables, datagram, Endpoint::from(from), now)? {
                Opened::Keepalive { .. } => {
                    counters.keepalives_received.fetch_add(1, Relaxed);
                    Ok(())
                }
                Opened::Data { inner, offset, .. } => {
                    let packet = datagram.get(offset..offset + inner.len).ok_or(DropReason::BadInnerPacket)?;
                    let buf = shared.staging.take(packet).ok_or(DropReason::NoFrame)?;
                    match to_lan.try_send(buf) {
                        Ok(()) => {
                            counters.decrypted.fetch_add(1, Relaxed);
                            Ok(())
                        }
                        Err(e) => {
                            shared.staging.give(e.into_inner());
                            Err(DropReason::NoFrame)
                        }
                    }
                }
            };
        }
        MessageType::HandshakeInitiation => HANDSHAKE_INITIATION_LEN,
        MessageType::HandshakeResponse => HANDSHAKE_RESPONSE_LEN,
        MessageType::CookieReply => COOKIE_REPLY_LEN,
    };
    if datagram.len() != expected {
        return Err(DropReason::Malformed);
    }
    let mut job = HandshakeJob { bytes: [0u8; HANDSHAKE_JOB_LEN], len: expected, from: Endpoint::from(from) };
    job.bytes[..expected].copy_from_slice(datagram);
    match shared.handshakes.try_send(job) {
        Ok(()) => {
            counters.handshakes_queued.fetch_add(1, Relaxed);
            Ok(())
        }
        Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => Err(DropReason::HandshakeQueueFull),
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
            handle_datagram(&shared, &to_lan, &counters, &mut buf[..n], from, Instant::now());
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
        let from: SocketAddr = crate::testing::CLIENT_ADDR.parse().unwrap();
        let inner = ipv4_packet(1000, CLIENT_TUNNEL, LAN_HOST);
        let mut datagram = crate::testing::sent_bytes(&mut m.client, &inner, now);
        let replayed = datagram.clone();
        handle_datagram(&shared, &to_lan, &counters, &mut datagram, from, now);
        assert_eq!(counters.decrypted.load(Relaxed), 1);
        m.run_until_idle(&mut Vec::new(), now);
        let mut out = Vec::new();
        assert_eq!(m.worker.queues_mut().1.take_sent(|f| out.push(f.to_vec())), 1, "worker 0 framed it");
        assert_eq!(&out[0][14..], &inner[..]);
        // A replay, garbage of every length and short handshakes: counted drops.
        let mut again = replayed;
        handle_datagram(&shared, &to_lan, &counters, &mut again, from, now);
        assert_eq!(counters.drops.get(DropReason::Replay), 1);
        for len in 0..200usize {
            for kind in [1u8, 2, 3, 4, 9] {
                let mut d = vec![0u8; len];
                if let Some(b) = d.first_mut() {
                    *b = kind;
                }
                handle_datagram(&shared, &to_lan, &counters, &mut d, from, now);
            }
        }
        assert_eq!(counters.wan_rx.load(Relaxed), 2 + 200 * 5);
        let queued = counters.handshakes_queued.load(Relaxed);
        assert_eq!(queued, 3, "only the exact-size 148/92/64-byte messages are queued");
        assert_eq!(counters.drops.total() + queued + 1, counters.wan_rx.load(Relaxed));
        assert_eq!(shared.staging.in_use(), 0, "buffers went back to the pool");
    }
}
