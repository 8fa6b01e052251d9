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
//! worker never waits: it hands that one packet to the kernel's forwarding
//! path through the host interface (`host.rs`: as received traffic, under the
//! host's FORWARD rules; the kernel resolves ARP/ND and queues the packet
//! while it does) and asks the resolver thread to refresh. The resolver reads
//! the kernel's neighbour table over rtnetlink (`netlink.rs`) once a second
//! and shortly after each request, and publishes a new snapshot.

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

#[derive(Debug)]
pub struct NeighborTable {
    map: ArcSwap<FastMap<IpAddr, MacAddr>>,
    requests: Sender<IpAddr>,
}

impl NeighborTable {
    /// A table and the receiving end of its resolution requests.
    pub fn new() -> (Arc<Self>, Receiver<IpAddr>) {
        let (tx, rx) = crossbeam_channel::bounded(1024);
        (Arc::new(Self { map: ArcSwap::from_pointee(FastMap::default()), requests: tx }), rx)
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

/// Keeps `table` in step with the kernel until `stop` is set.
pub fn run_resolver(table: Arc<NeighborTable>, requests: Receiver<IpAddr>, iface: String, stop: Arc<AtomicBool>) {
    let mut last_refresh = Instant::now() - Duration::from_secs(10);
    while !stop.load(Ordering::Relaxed) {
        let asked = requests.recv_timeout(Duration::from_millis(200)).is_ok();
        if asked {
            // Give the kernel a moment to finish resolving what the worker injected,
            // and fold the burst of requests into one refresh.
            std::thread::sleep(Duration::from_millis(20));
            while requests.try_recv().is_ok() {}
        }
        if asked || last_refresh.elapsed() >= Duration::from_secs(1) {
            match crate::netlink::read_neighbors(&iface) {
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
