//! What the data-plane workers see of a peer, lock-free: the keypair to send
//! with (published by the control thread after each handshake), the endpoint
//! (moved by workers when a peer roams), traffic counters, and activity
//! timestamps that the control thread turns into timer events.

use crate::noise::Keypair;
use crate::policy::CompiledPolicy;
use crate::table::FastMap;
use crate::wire::MacAddr;
use arc_swap::{ArcSwap, ArcSwapOption};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

/// A peer's handle inside one device.
pub type PeerId = u32;

/// The link-layer path a peer's packets arrive on, so replies can be framed
/// without asking the kernel: Ethernet addresses and our own IP address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L2Path {
    pub local_mac: MacAddr,
    /// The next hop towards the peer (the source MAC of its frames).
    pub remote_mac: MacAddr,
    /// Our address and port the peer sends to.
    pub local: SocketAddr,
}

/// Where a peer is: its UDP address and, once a frame from it was seen, the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub path: Option<L2Path>,
}

impl From<SocketAddr> for Endpoint {
    fn from(addr: SocketAddr) -> Self {
        Self { addr, path: None }
    }
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(|| Instant::now() - std::time::Duration::from_secs(1))
}

/// Nanoseconds since a process-wide monotonic epoch (0 means "never").
pub fn monotonic_nanos(now: Instant) -> u64 {
    now.saturating_duration_since(epoch()).as_nanos() as u64
}

/// The inverse of `monotonic_nanos` (exact, also for a simulated clock ahead
/// of the real one).
pub fn instant_from_nanos(nanos: u64) -> Instant {
    epoch() + std::time::Duration::from_nanos(nanos)
}

/// Per-peer counters, updated by workers with relaxed atomics.
#[derive(Debug, Default)]
pub struct PeerCounters {
    pub rx_bytes: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub rx_packets: AtomicU64,
    pub tx_packets: AtomicU64,
}

/// When the peer last did each kind of thing (see `monotonic_nanos`).
#[derive(Debug, Default)]
pub struct Activity {
    pub data_sent: AtomicU64,
    pub data_received: AtomicU64,
    pub authenticated_sent: AtomicU64,
    pub authenticated_received: AtomicU64,
}

impl Activity {
    pub fn record(slot: &AtomicU64, now_nanos: u64) {
        // Only move forward; cheap when unchanged (no write).
        if slot.load(Ordering::Relaxed) < now_nanos {
            slot.store(now_nanos, Ordering::Relaxed);
        }
    }
}

#[derive(Debug)]
pub struct PeerView {
    pub id: PeerId,
    /// The keypair workers send with (None: no session yet).
    pub current: ArcSwapOption<Keypair>,
    pub endpoint: ArcSwapOption<Endpoint>,
    pub counters: PeerCounters,
    pub activity: Activity,
    /// Set by a worker that wants the control thread to look at this peer
    /// (a new keypair was used, a send found no session).
    pub attention: AtomicBool,
    /// What this peer's remote site may reach (published by the control thread).
    pub policy: ArcSwap<CompiledPolicy>,
}

impl PeerView {
    pub fn new(id: PeerId, endpoint: Option<SocketAddr>) -> Self {
        Self {
            id,
            current: ArcSwapOption::empty(),
            endpoint: ArcSwapOption::new(endpoint.map(|a| Arc::new(Endpoint::from(a)))),
            counters: PeerCounters::default(),
            activity: Activity::default(),
            attention: AtomicBool::new(false),
            policy: ArcSwap::from_pointee(CompiledPolicy::default()),
        }
    }

    /// Moves the endpoint if it changed (allocates only then).
    pub fn update_endpoint(&self, endpoint: Endpoint) {
        let cur = self.endpoint.load();
        if cur.as_deref() != Some(&endpoint) {
            self.endpoint.store(Some(Arc::new(endpoint)));
        }
    }

    /// Learns the address from a handshake or data packet, keeping a known L2
    /// path if the address did not change.
    pub fn learn_addr(&self, addr: SocketAddr) {
        let cur = self.endpoint.load();
        match cur.as_deref() {
            Some(e) if e.addr == addr => {}
            _ => self.endpoint.store(Some(Arc::new(Endpoint::from(addr)))),
        }
    }

    /// Learns where the peer is from an authenticated packet (section 2.1):
    /// with the frame's link-layer path when it came through AF_XDP, else the
    /// address alone (a known path for the same address is kept).
    pub fn learn(&self, from: Endpoint) {
        if from.path.is_some() {
            self.update_endpoint(from);
        } else {
            self.learn_addr(from.addr);
        }
    }

    pub fn endpoint_addr(&self) -> Option<SocketAddr> {
        self.endpoint.load().as_ref().map(|e| e.addr)
    }
}

/// Every peer's view by id, as one published snapshot holds them.
pub type ViewMap = FastMap<PeerId, Arc<PeerView>>;

/// A loaded snapshot of every peer's view.
pub type ViewsGuard = arc_swap::Guard<Arc<ViewMap>>;

/// Every peer's view, by id: an immutable map swapped as peers come and go.
#[derive(Debug, Default)]
pub struct PeerViews {
    map: ArcSwap<FastMap<PeerId, Arc<PeerView>>>,
}

impl PeerViews {
    #[inline]
    pub fn get(&self, id: PeerId) -> Option<Arc<PeerView>> {
        self.map.load().get(&id).cloned()
    }

    /// The current map, held for a while without touching any peer's
    /// reference count (the per-packet way to reach a view).
    #[inline]
    pub fn load(&self) -> ViewsGuard {
        self.map.load()
    }

    /// A snapshot of all views (for iteration).
    pub fn snapshot(&self) -> Arc<FastMap<PeerId, Arc<PeerView>>> {
        self.map.load_full()
    }

    pub(crate) fn insert(&self, view: Arc<PeerView>) {
        self.map.rcu(|m| {
            let mut m = FastMap::clone(m);
            m.insert(view.id, view.clone());
            m
        });
    }

    pub(crate) fn remove(&self, id: PeerId) {
        self.map.rcu(|m| {
            let mut m = FastMap::clone(m);
            m.remove(&id);
            m
        });
    }
}
