//! What a thread reads from the shared tables for one batch of packets, and
//! what it writes back once per batch.
//!
//! Every shared table is an atomically swapped pointer (`arc-swap`); loading
//! one costs a few atomic operations, and the profile of the worker loop showed
//! them taking a sixth of the per-packet time when every packet loaded every
//! table. A `Snapshot` loads the peer views and the allowed-IPs trie once, keeps
//! the receiver index last looked up (a batch is mostly one tunnel's packets),
//! and for the last peer seen in each direction a `PeerTally`: that peer's
//! keypair, endpoint and policy, loaded once, and its counters, activity times
//! and roaming address added up and written back once — when the next packet is
//! another peer's, at `flush`, or on drop.
//!
//! Within one batch (at most a few hundred microseconds) a packet therefore sees
//! the tables as they were when the batch began: a key, route or policy change
//! published meanwhile applies from the next batch. The endpoint follows the
//! last authenticated packet of the batch (section 2.1), so roaming is as
//! before, written once.

use crate::drops::DropReason;
use crate::noise::Keypair;
use crate::peer_view::{monotonic_nanos, Activity, Endpoint, PeerId, PeerView, ViewMap, ViewsGuard};
use crate::policy::CompiledPolicy;
use crate::table::{AllowedIps, IndexEntry, IndexGuard};
use crate::transport::{IndexValue, Tables};
use arc_swap::Guard;
use std::net::IpAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

/// The shared tables as one batch sees them; see the module documentation.
pub struct Snapshot<'t> {
    tables: &'t Tables,
    views: ViewsGuard,
    allowed_ips: Guard<Arc<AllowedIps<PeerId>>>,
    /// The receiver index last found (kept for the batch).
    index: Option<IndexGuard<IndexValue>>,
    /// The peer whose packets were last received / sent.
    rx: Option<PeerTally>,
    tx: Option<PeerTally>,
}

impl core::fmt::Debug for Snapshot<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Snapshot").field("peers", &self.views.len()).finish_non_exhaustive()
    }
}

impl<'t> Snapshot<'t> {
    pub fn load(tables: &'t Tables) -> Self {
        Self {
            tables,
            views: tables.views.load(),
            allowed_ips: tables.allowed_ips.load(),
            index: None,
            rx: None,
            tx: None,
        }
    }

    /// The peer whose allowed IPs hold `addr` (cryptokey routing).
    #[inline]
    pub fn owner_of(&self, addr: IpAddr) -> Option<PeerId> {
        self.allowed_ips.lookup(addr)
    }

    /// The entry registered under our receiver index `index`.
    #[inline]
    pub(crate) fn index(&mut self, index: u32) -> Option<&IndexEntry<IndexValue>> {
        if self.index.as_ref().is_none_or(|g| g.index != index) {
            self.index = Some(self.tables.indices.get(index)?);
        }
        self.index.as_deref()
    }

    /// The tally of `peer`'s received packets (written back when another
    /// peer's packet comes, or at `flush`).
    #[inline]
    pub(crate) fn received_from(&mut self, peer: PeerId) -> Result<&mut PeerTally, DropReason> {
        tally_of(&mut self.rx, &self.views, peer).ok_or(DropReason::UnknownIndex)
    }

    /// The last peer a packet was received from (after `transport::open`).
    pub(crate) fn last_received_mut(&mut self) -> Option<&mut PeerTally> {
        self.rx.as_mut()
    }

    /// The tally of packets sent to `peer`.
    #[inline]
    pub(crate) fn sending_to(&mut self, peer: PeerId) -> Result<&mut PeerTally, DropReason> {
        tally_of(&mut self.tx, &self.views, peer).ok_or(DropReason::NoRoute)
    }

    /// The tally of the peer that owns `dst` (cryptokey routing, outbound).
    #[inline]
    pub(crate) fn route(&mut self, dst: IpAddr) -> Result<&mut PeerTally, DropReason> {
        let peer = self.owner_of(dst).ok_or(DropReason::NoRoute)?;
        self.sending_to(peer).map_err(|_| DropReason::NoRoute)
    }

    /// Writes every tally back now (e.g. between the receive and send halves
    /// of a batch, so sends use the endpoint a received packet just moved).
    pub fn flush(&mut self) {
        self.rx = None;
        self.tx = None;
    }
}

/// `peer`'s tally in `slot`: the one there, or a new one (the one there is
/// written back by being replaced); `None` if the peer is gone.
#[inline]
fn tally_of<'s>(slot: &'s mut Option<PeerTally>, views: &ViewMap, peer: PeerId) -> Option<&'s mut PeerTally> {
    if slot.as_ref().is_none_or(|t| t.view.id != peer) {
        *slot = Some(PeerTally::new(views.get(&peer)?.clone()));
    }
    slot.as_mut()
}

/// One peer as a batch uses it: what was loaded once, and what is added up
/// and written back when the tally is dropped.
#[derive(Debug)]
pub struct PeerTally {
    pub(crate) view: Arc<PeerView>,
    keypair: Option<Arc<Keypair>>,
    endpoint: Option<Arc<Endpoint>>,
    policy: Option<Arc<CompiledPolicy>>,
    /// The sender of the last authenticated packet received.
    learned: Option<Endpoint>,
    /// When the last authenticated / data packet went through this tally.
    authenticated: Option<Instant>,
    data: Option<Instant>,
    bytes: u64,
    packets: u64,
    received: bool,
}

impl PeerTally {
    /// A tally for one packet or one batch; written back on drop.
    pub fn new(view: Arc<PeerView>) -> Self {
        Self {
            view,
            keypair: None,
            endpoint: None,
            policy: None,
            learned: None,
            authenticated: None,
            data: None,
            bytes: 0,
            packets: 0,
            received: false,
        }
    }

    pub fn view(&self) -> &PeerView {
        &self.view
    }

    /// The keypair to send with (loaded once per tally).
    #[inline]
    pub(crate) fn keypair(&mut self) -> Option<&Keypair> {
        if self.keypair.is_none() {
            self.keypair = self.view.current.load_full();
        }
        self.keypair.as_deref()
    }

    /// The same keypair, shared (for work that outlives the tally).
    #[inline]
    pub(crate) fn keypair_arc(&mut self) -> Option<&Arc<Keypair>> {
        self.keypair();
        self.keypair.as_ref()
    }

    /// Where the peer is (loaded once per tally).
    #[inline]
    pub(crate) fn endpoint(&mut self) -> Option<Endpoint> {
        if self.endpoint.is_none() {
            self.endpoint = self.view.endpoint.load_full();
        }
        self.endpoint.as_deref().copied()
    }

    /// What the peer's remote site may reach (loaded once per tally).
    #[inline]
    pub(crate) fn policy(&mut self) -> &CompiledPolicy {
        self.policy.get_or_insert_with(|| self.view.policy.load_full())
    }

    /// An authenticated packet from `from` carrying `data_len` bytes of inner
    /// packet (0: a keepalive).
    #[inline]
    pub(crate) fn received(&mut self, from: Endpoint, data_len: usize, now: Instant) {
        self.received = true;
        self.learned = Some(from);
        self.count(data_len, now);
    }

    #[inline]
    fn count(&mut self, data_len: usize, now: Instant) {
        self.authenticated = self.authenticated.max(Some(now));
        if data_len > 0 {
            self.data = self.data.max(Some(now));
            self.bytes += data_len as u64;
            self.packets += 1;
        }
    }

    /// A sealed packet carrying `data_len` bytes of inner packet (0: a keepalive).
    #[inline]
    pub(crate) fn sent(&mut self, data_len: usize, now: Instant) {
        self.count(data_len, now);
    }
}

impl Drop for PeerTally {
    fn drop(&mut self) {
        let (view, received) = (&*self.view, self.received);
        let activity = &view.activity;
        let (auth_slot, data_slot) = if received {
            (&activity.authenticated_received, &activity.data_received)
        } else {
            (&activity.authenticated_sent, &activity.data_sent)
        };
        if let Some(at) = self.authenticated {
            Activity::record(auth_slot, monotonic_nanos(at));
        }
        if let Some(at) = self.data {
            Activity::record(data_slot, monotonic_nanos(at));
        }
        if self.packets > 0 {
            let (bytes, packets) = if received {
                (&view.counters.rx_bytes, &view.counters.rx_packets)
            } else {
                (&view.counters.tx_bytes, &view.counters.tx_packets)
            };
            bytes.fetch_add(self.bytes, Relaxed);
            packets.fetch_add(self.packets, Relaxed);
        }
        if let Some(from) = self.learned.take() {
            view.learn(from);
        }
    }
}
