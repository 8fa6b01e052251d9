//! Next hops on both sides.
//!
//! WAN (`WanNextHops`): the control thread sends handshakes and keepalives
//! through the kernel's UDP socket. Sent to a next hop the kernel has not
//! resolved, a datagram would wait in the kernel (charged to the socket's
//! send buffer, which every peer shares) until resolution fails seconds later,
//! so one unreachable peer would cost all the others. Instead the control
//! thread sends only towards resolved next hops; for the others it asks the
//! WAN resolver thread, which looks the route up, kicks the kernel's
//! resolution without queueing anything (`netlink::solicit`), watches the
//! neighbour table, and publishes the destinations that became ready. Until
//! then the datagram waits in a small bounded queue on the control thread
//! (`KernelSender`), and is dropped, counted, after a few seconds.
//!
//! LAN: next-hop MAC addresses for the site-side NIC.
//!
//! Workers look up a lock-free snapshot (`NeighborTable::lookup`). On a miss a
//! worker never blocks and never hands the packet to the kernel: it parks it
//! in its own small set of buffers (`NeighborWait`, bounded in number and
//! time) and asks the resolver thread, which kicks the kernel's resolution
//! (`netlink::solicit`: ARP / neighbour solicitation, no packet of ours
//! queued, rate-limited), reads the kernel's neighbour table over rtnetlink
//! (`netlink.rs`) every 20 ms while kicks are fresh and once a second
//! otherwise, and publishes a new snapshot; the worker then sends what waited.

use crate::drops::{DropCounters, DropReason};
use crate::netlink::{self, Route, Rtnetlink};
use crate::table::FastMap;
use crate::wire::MacAddr;
use arc_swap::ArcSwap;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Next-hop address → MAC.
pub type NeighborMap = FastMap<IpAddr, MacAddr>;

/// A loaded snapshot of the neighbour table.
pub type NeighborsGuard = arc_swap::Guard<Arc<NeighborMap>>;

#[derive(Debug)]
pub struct NeighborTable {
    map: ArcSwap<NeighborMap>,
    requests: Sender<IpAddr>,
}

impl NeighborTable {
    /// A table and the receiving end of its resolution requests.
    pub fn new() -> (Arc<Self>, Receiver<IpAddr>) {
        let (tx, rx) = crossbeam_channel::bounded(1024);
        (Arc::new(Self { map: ArcSwap::from_pointee(FastMap::default()), requests: tx }), rx)
    }

    /// The current map, held for one batch (one load instead of one per packet).
    #[inline]
    pub fn load(&self) -> NeighborsGuard {
        self.map.load()
    }

    #[inline]
    pub fn lookup(&self, ip: IpAddr) -> Option<MacAddr> {
        self.map.load().get(&ip).copied()
    }

    /// Asks for `ip` to be resolved; never blocks (a full queue drops the ask:
    /// the periodic refresh still runs).
    pub fn request(&self, ip: IpAddr) {
        match self.requests.try_send(ip) {
            Ok(()) | Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {}
        }
    }

    pub fn replace(&self, map: HashMap<IpAddr, MacAddr>) {
        self.map.store(Arc::new(map.into_iter().collect()));
    }
}

/// How long a packet waits for its site neighbour to resolve.
pub const NEIGHBOR_WAIT: Duration = Duration::from_secs(3);

/// One packet waiting for a site neighbour.
#[derive(Debug, Clone, Copy)]
struct Waiting {
    /// The tunnel it came from (each holds a bounded share of the slots).
    peer: u32,
    next_hop: IpAddr,
    len: usize,
    since: Instant,
    /// Arrival order: packets leave in it.
    seq: u64,
}

/// Packets for site neighbours that are being resolved, per worker: a fixed
/// number of preallocated buffers (nothing allocated per packet); each waits
/// at most `NEIGHBOR_WAIT`, then is dropped, counted. A full set, or a tunnel
/// holding its share (a quarter), refuses new packets (counted) rather than
/// pushing out older ones: one site sending to addresses nobody answers
/// cannot keep the others' first packets out.
#[derive(Debug)]
pub struct NeighborWait {
    buffers: Vec<u8>,
    slot_len: usize,
    slots: Vec<Option<Waiting>>,
    used: usize,
    next_seq: u64,
    /// Ready slots of one `release`, sorted by arrival (kept: no allocation).
    ready: Vec<(u64, usize, MacAddr)>,
}

impl NeighborWait {
    /// `slots` packets of at most `slot_len` bytes.
    pub fn new(slots: usize, slot_len: usize) -> Self {
        Self {
            buffers: vec![0u8; slots * slot_len],
            slot_len,
            slots: vec![None; slots],
            used: 0,
            next_seq: 0,
            ready: Vec::with_capacity(slots),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.used == 0
    }

    /// Keeps a copy of `packet` from `peer`'s tunnel until `next_hop`
    /// resolves; refused (with the reason to count) when the set or the
    /// tunnel's share is full, or the packet is longer than a slot.
    pub fn park(&mut self, peer: u32, next_hop: IpAddr, packet: &[u8], now: Instant) -> Result<(), DropReason> {
        if packet.len() > self.slot_len {
            return Err(DropReason::BufferTooSmall);
        }
        let share = (self.slots.len() / 4).max(1);
        if self.slots.iter().flatten().filter(|w| w.peer == peer).count() >= share {
            return Err(DropReason::NeighborWaitFull);
        }
        let i = self.slots.iter().position(Option::is_none).ok_or(DropReason::NeighborWaitFull)?;
        let at = i * self.slot_len;
        self.buffers[at..at + packet.len()].copy_from_slice(packet);
        self.slots[i] = Some(Waiting { peer, next_hop, len: packet.len(), since: now, seq: self.next_seq });
        self.next_seq += 1;
        self.used += 1;
        Ok(())
    }

    /// Hands every packet whose next hop `table` now knows to `send` (with
    /// the MAC), in arrival order per slot; returns how many waited too long
    /// and were dropped.
    pub fn release(&mut self, table: &NeighborTable, now: Instant, mut send: impl FnMut(MacAddr, &[u8])) -> usize {
        let mut expired = 0;
        self.ready.clear();
        for (i, slot) in self.slots.iter_mut().enumerate() {
            let Some(w) = *slot else { continue };
            if let Some(mac) = table.lookup(w.next_hop) {
                self.ready.push((w.seq, i, mac));
                continue;
            } else if now.saturating_duration_since(w.since) < NEIGHBOR_WAIT {
                continue;
            }
            expired += 1;
            *slot = None;
            self.used -= 1;
        }
        self.ready.sort_unstable_by_key(|&(seq, _, _)| seq);
        for &(_, i, mac) in &self.ready {
            if let Some(w) = self.slots[i].take() {
                let at = i * self.slot_len;
                send(mac, &self.buffers[at..at + w.len]);
                self.used -= 1;
            }
        }
        expired
    }
}

/// Resolution kicks the LAN resolver sends per second at most (a remote
/// site choosing destinations must not turn the gateway into an ARP storm).
const LAN_KICKS_PER_SECOND: usize = 100;
/// How long a kicked address is not kicked again (the kernel retries on its
/// own meanwhile), and the table is watched closely: as long as a packet waits.
const LAN_KICK_WINDOW: Duration = NEIGHBOR_WAIT;

/// Keeps `table` in step with the kernel until `stop` is set. A requested
/// address is kicked (`netlink::solicit`: ARP / neighbour solicitation, no
/// packet queued), so resolution never depends on the kernel forwarding the
/// packet that missed; the table is re-read every 20 ms while kicks are
/// fresh, else once a second.
pub fn run_resolver(table: Arc<NeighborTable>, requests: Receiver<IpAddr>, iface: String, stop: Arc<AtomicBool>) {
    let nl = Rtnetlink::open();
    if let Err(e) = &nl {
        tracing::warn!(%iface, error = %e, "no rtnetlink socket: site neighbours are not kicked, only read");
    }
    let mut kicked: HashMap<IpAddr, Instant> = HashMap::new();
    let mut kicks_this_second = (Instant::now(), 0usize);
    let mut last_refresh = Instant::now() - Duration::from_secs(10);
    while !stop.load(Ordering::Relaxed) {
        let wait = if kicked.is_empty() { Duration::from_millis(200) } else { Duration::from_millis(20) };
        let first = requests.recv_timeout(wait).ok();
        let now = Instant::now();
        kicked.retain(|_, at| now.duration_since(*at) < LAN_KICK_WINDOW);
        if now.duration_since(kicks_this_second.0) >= Duration::from_secs(1) {
            kicks_this_second = (now, 0);
        }
        let known = table.map.load();
        for ip in first.into_iter().chain(requests.try_iter()) {
            if known.contains_key(&ip) || kicked.contains_key(&ip) || kicks_this_second.1 >= LAN_KICKS_PER_SECOND {
                continue;
            }
            if let (Ok(nl), Ok(index)) = (&nl, netlink::ifindex(&iface)) {
                if let Err(e) = netlink::solicit(nl, index, ip) {
                    tracing::debug!(%ip, error = %e, "could not start neighbour resolution");
                }
            }
            kicked.insert(ip, now);
            kicks_this_second.1 += 1;
        }
        drop(known);
        if !kicked.is_empty() || last_refresh.elapsed() >= Duration::from_secs(1) {
            match netlink::read_neighbors(&iface) {
                Ok(map) => table.replace(map),
                Err(e) => tracing::warn!(%iface, error = %e, "reading the neighbour table failed"),
            }
            last_refresh = Instant::now();
        }
    }
}

/// WAN destinations the kernel can send to at once (next hop resolved).
#[derive(Debug)]
pub struct WanNextHops {
    ready: ArcSwap<FastMap<IpAddr, ()>>,
    requests: Sender<IpAddr>,
}

impl WanNextHops {
    pub fn new() -> (Arc<Self>, Receiver<IpAddr>) {
        let (tx, rx) = crossbeam_channel::bounded(4096);
        (Arc::new(Self { ready: ArcSwap::from_pointee(FastMap::default()), requests: tx }), rx)
    }

    #[inline]
    pub fn is_ready(&self, dst: IpAddr) -> bool {
        self.ready.load().contains_key(&dst)
    }

    /// Asks for `dst` to be resolved; never blocks.
    pub fn request(&self, dst: IpAddr) {
        let _ = self.requests.try_send(dst);
    }

    fn publish(&self, ready: &HashMap<IpAddr, Route>) {
        self.ready.store(Arc::new(ready.keys().map(|&ip| (ip, ())).collect()));
    }

    /// Marks `dst` ready by hand (tests, and set-ups without a resolver).
    pub fn mark_ready(&self, dst: IpAddr) {
        self.ready.rcu(|m| {
            let mut m = FastMap::clone(m);
            m.insert(dst, ());
            m
        });
    }
}

/// Destinations the WAN resolver watches at most at once.
const MAX_WATCHED: usize = 4096;
/// How long a destination is watched for its next hop to resolve.
const RESOLVE_WINDOW: Duration = Duration::from_secs(5);

/// Keeps `table` in step with the kernel until `stop` is set (one thread).
///
/// `wan`: the interface the gateway's UDP socket is bound to (routes are
/// looked up through it, as the kernel routes that socket's datagrams).
pub fn run_wan_resolver(table: Arc<WanNextHops>, requests: Receiver<IpAddr>, wan: Option<u32>, stop: Arc<AtomicBool>) {
    let nl = match Rtnetlink::open() {
        Ok(nl) => nl,
        Err(e) => {
            tracing::error!(error = %e, "no rtnetlink socket for WAN next hops: handshakes go out unchecked");
            return;
        }
    };
    // Ready destinations, and those being resolved (with when and whether kicked).
    let mut ready: HashMap<IpAddr, Route> = HashMap::new();
    let mut watched: HashMap<IpAddr, (Route, Instant, bool)> = HashMap::new();
    // Destinations without a route, not asked about again for a while.
    let mut unroutable: HashMap<IpAddr, Instant> = HashMap::new();
    let mut last_check = Instant::now();
    let mut last_pass = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        let mut changed = false;
        if let Ok(first) = requests.recv_timeout(Duration::from_millis(100)) {
            let now = Instant::now();
            unroutable.retain(|_, since| now.duration_since(*since) < RESOLVE_WINDOW);
            for dst in std::iter::once(first).chain(requests.try_iter()) {
                if ready.contains_key(&dst)
                    || watched.contains_key(&dst)
                    || unroutable.contains_key(&dst)
                    || watched.len() >= MAX_WATCHED
                {
                    continue;
                }
                match netlink::route_to(&nl, dst, wan) {
                    Ok(route) => {
                        watched.insert(dst, (route, now, false));
                    }
                    Err(e) => {
                        tracing::debug!(%dst, error = %e, "no route to a peer");
                        if unroutable.len() < MAX_WATCHED {
                            unroutable.insert(dst, now);
                        }
                    }
                }
            }
        }
        let recheck_ready = last_check.elapsed() >= Duration::from_secs(2);
        // At most one neighbour dump per 100 ms, however many requests arrive.
        if (watched.is_empty() && !recheck_ready) || last_pass.elapsed() < Duration::from_millis(100) {
            continue;
        }
        last_pass = Instant::now();
        // One neighbour dump per outgoing interface in use.
        let mut tables: HashMap<u32, HashMap<IpAddr, bool>> = HashMap::new();
        let mut usable = |nl: &Rtnetlink, route: &Route, dst: IpAddr| -> bool {
            let table = tables.entry(route.oif).or_insert_with(|| {
                netlink::dump_neighbors(nl, route.oif)
                    .map(|v| v.into_iter().map(|n| (n.ip, n.usable())).collect())
                    .unwrap_or_default()
            });
            table.get(&route.next_hop(dst)).copied().unwrap_or(false)
        };
        let now = Instant::now();
        let mut done = Vec::new();
        for (&dst, (route, since, kicked)) in watched.iter_mut() {
            if usable(&nl, route, dst) {
                ready.insert(dst, *route);
                done.push(dst);
                changed = true;
            } else if now.duration_since(*since) > RESOLVE_WINDOW {
                done.push(dst);
            } else if !*kicked {
                if let Err(e) = netlink::solicit(&nl, route.oif, route.next_hop(dst)) {
                    tracing::debug!(%dst, error = %e, "could not start neighbour resolution");
                }
                *kicked = true;
            }
        }
        for dst in done {
            watched.remove(&dst);
        }
        if recheck_ready {
            last_check = Instant::now();
            let before = ready.len();
            ready.retain(|&dst, route| usable(&nl, route, dst));
            changed |= ready.len() != before;
        }
        if changed {
            table.publish(&ready);
        }
    }
}

/// Datagrams the control thread sends through the kernel, only towards next
/// hops that are resolved; the others wait (bounded, newest per destination)
/// while the WAN resolver works, and are dropped, counted, after a while.
#[derive(Debug)]
pub struct KernelSender {
    udp: Arc<UdpSocket>,
    next_hops: Arc<WanNextHops>,
    waiting: HashMap<SocketAddr, (Vec<u8>, Instant)>,
    drops: Arc<DropCounters>,
}

/// Destinations with a datagram waiting for their next hop, at most.
const MAX_WAITING: usize = 4096;

impl KernelSender {
    pub fn new(udp: Arc<UdpSocket>, next_hops: Arc<WanNextHops>, drops: Arc<DropCounters>) -> Self {
        Self { udp, next_hops, waiting: HashMap::new(), drops }
    }

    /// Sends now if the next hop is resolved, else keeps it (never blocks).
    pub fn send(&mut self, bytes: &[u8], to: SocketAddr, now: Instant) {
        if self.next_hops.is_ready(to.ip()) {
            return self.send_now(bytes, to);
        }
        self.next_hops.request(to.ip());
        if !self.waiting.contains_key(&to) && self.waiting.len() >= MAX_WAITING {
            self.drops.count(DropReason::NoNextHop);
            return;
        }
        if let Some((old, _)) = self.waiting.insert(to, (bytes.to_vec(), now)) {
            // Superseded (a newer handshake message to the same peer).
            drop(old);
            self.drops.count(DropReason::NoNextHop);
        }
    }

    /// Sends now, whatever the next hop's state (the caller knows the peer
    /// is reachable, e.g. it just sent us a frame).
    pub fn send_now(&self, bytes: &[u8], to: SocketAddr) {
        if let Err(e) = self.udp.send_to(bytes, to) {
            tracing::debug!(%to, error = %e, "sending through the kernel failed");
            self.drops.count(DropReason::KernelSend);
        }
    }

    /// Sends what became ready; drops, counted, what waited too long.
    pub fn flush(&mut self, now: Instant) {
        if self.waiting.is_empty() {
            return;
        }
        let mut sent = Vec::new();
        for (&to, (bytes, since)) in &self.waiting {
            if self.next_hops.is_ready(to.ip()) {
                self.send_now(bytes, to);
                sent.push(to);
            } else if now.duration_since(*since) > RESOLVE_WINDOW {
                self.drops.count(DropReason::NoNextHop);
                sent.push(to);
            }
        }
        for to in sent {
            self.waiting.remove(&to);
        }
    }

    /// Destinations with a datagram waiting.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_see_published_snapshots_and_requests_never_block() {
        let (t, rx) = NeighborTable::new();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(t.lookup(ip), None);
        t.replace(HashMap::from([(ip, MacAddr([1; 6]))]));
        assert_eq!(t.lookup(ip), Some(MacAddr([1; 6])));
        for _ in 0..5000 {
            t.request(ip);
        }
        assert_eq!(rx.len(), 1024);
    }

    #[test]
    fn packets_wait_for_their_neighbour_bounded_in_number_and_time() {
        let (t, _rx) = NeighborTable::new();
        let mut w = NeighborWait::new(2, 16);
        let now = Instant::now();
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        assert!(w.park(1, a, b"for a", now).is_ok());
        assert!(w.park(2, a, &[0u8; 17], now).is_err(), "longer than a slot");
        assert!(w.park(2, b, b"for b", now).is_ok());
        assert_eq!(w.park(3, b, b"no room", now), Err(DropReason::NeighborWaitFull), "full: nothing pushed out");
        let mut sent = Vec::new();
        assert_eq!(w.release(&t, now, |m, p| sent.push((m, p.to_vec()))), 0);
        assert!(sent.is_empty(), "nothing resolved yet");
        t.replace(HashMap::from([(a, MacAddr([7; 6]))]));
        assert_eq!(w.release(&t, now, |m, p| sent.push((m, p.to_vec()))), 0);
        assert_eq!(sent, vec![(MacAddr([7; 6]), b"for a".to_vec())]);
        assert_eq!(w.release(&t, now + NEIGHBOR_WAIT, |_, _| panic!("b never resolved")), 1, "expired");
        assert!(w.is_empty());
    }

    /// A tunnel holds at most a quarter of the slots; packets leave in the
    /// order they arrived, whatever slots they took.
    #[test]
    fn each_tunnel_has_a_share_and_packets_leave_in_order() {
        let (t, _rx) = NeighborTable::new();
        let mut w = NeighborWait::new(8, 16);
        let now = Instant::now();
        let hop: IpAddr = "10.0.0.1".parse().unwrap();
        assert!(w.park(1, hop, b"1", now).is_ok() && w.park(1, hop, b"2", now).is_ok());
        assert_eq!(w.park(1, hop, b"3", now), Err(DropReason::NeighborWaitFull), "tunnel 1 holds its share");
        assert!(w.park(2, hop, b"a", now).is_ok(), "another tunnel still gets in");
        // Free slot 0 by releasing... then a later packet takes it: order is kept.
        t.replace(HashMap::from([(hop, MacAddr([1; 6]))]));
        let mut order = Vec::new();
        w.release(&t, now, |_, p| order.push(p.to_vec()));
        assert_eq!(order, vec![b"1".to_vec(), b"2".to_vec(), b"a".to_vec()]);
        // x, y, z wait for different neighbours; y's resolves first and its
        // slot is taken by w: the rest still leave in arrival order.
        t.replace(HashMap::new());
        let (hx, hy, hz): (IpAddr, IpAddr, IpAddr) =
            ("10.0.0.2".parse().unwrap(), "10.0.0.3".parse().unwrap(), "10.0.0.4".parse().unwrap());
        assert!(
            w.park(3, hx, b"x", now).is_ok() && w.park(2, hy, b"y", now).is_ok() && w.park(4, hz, b"z", now).is_ok()
        );
        t.replace(HashMap::from([(hy, MacAddr([1; 6]))]));
        order.clear();
        w.release(&t, now, |_, p| order.push(p.to_vec()));
        assert_eq!(order, vec![b"y".to_vec()]);
        assert!(w.park(4, hx, b"w", now).is_ok(), "takes y's slot, before z's");
        t.replace(HashMap::from([(hx, MacAddr([1; 6])), (hz, MacAddr([1; 6]))]));
        order.clear();
        w.release(&t, now, |_, p| order.push(p.to_vec()));
        assert_eq!(order, vec![b"x".to_vec(), b"z".to_vec(), b"w".to_vec()]);
    }

    #[test]
    fn the_kernel_gets_datagrams_only_for_resolved_next_hops() {
        let (next_hops, requests) = WanNextHops::new();
        let drops = Arc::new(DropCounters::default());
        let sink = UdpSocket::bind("127.0.0.1:0").unwrap();
        sink.set_nonblocking(true).unwrap();
        let udp = Arc::new(UdpSocket::bind("127.0.0.1:0").unwrap());
        udp.set_nonblocking(true).unwrap();
        let mut sender = KernelSender::new(udp, next_hops.clone(), drops.clone());
        let to = sink.local_addr().unwrap();
        let now = Instant::now();
        sender.send(b"first", to, now);
        sender.send(b"second", to, now);
        assert_eq!(requests.try_iter().count(), 2, "resolution was asked for");
        assert_eq!(sender.waiting(), 1, "newest per destination");
        assert_eq!(drops.get(DropReason::NoNextHop), 1, "the superseded one is counted");
        let mut buf = [0u8; 16];
        assert!(sink.recv_from(&mut buf).is_err(), "nothing reached the kernel yet");
        next_hops.mark_ready(to.ip());
        sender.flush(now);
        std::thread::sleep(Duration::from_millis(20));
        let (n, _) = sink.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"second");
        sender.send(b"third", to, now);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(sink.recv_from(&mut buf).map(|(n, _)| buf[..n].to_vec()).unwrap(), b"third");
        // Unresolvable destinations wait a bounded time and a bounded number.
        for port in 1..=(MAX_WAITING as u16 + 10) {
            sender.send(b"x", SocketAddr::new("192.0.2.9".parse().unwrap(), port), now);
        }
        assert_eq!(sender.waiting(), MAX_WAITING);
        sender.flush(now + RESOLVE_WINDOW + Duration::from_secs(1));
        assert_eq!(sender.waiting(), 0);
        assert_eq!(drops.get(DropReason::NoNextHop), 1 + 10 + MAX_WAITING as u64);
    }
}
