//! A WireGuard device, I/O-free: many peers, one static identity, the receiver-
//! index table and cryptokey routing. The caller moves bytes (UDP payloads in,
//! inner IP packets in) and passes `now`; the device answers with what to send
//! or deliver, and counts every drop by reason.
//!
//! Transport data goes through `transport.rs`, the same code the workers run;
//! the device then turns the peer's recorded activity into timer events
//! (`sync_peer`), exactly as it does for traffic the workers handled.
//!
//! Outputs that are not a direct answer to an input (staged packets after a
//! handshake, timer-driven initiations and keepalives) are pulled with
//! `poll_transmit` after each input and after `tick`.

use crate::drops::{DropCounters, DropReason};
use crate::frame::parse_ip_frame_payload;
use crate::noise::cookie::{CookieChecker, MacVerdict};
use crate::noise::handshake::{consume_initiation_static, StaticIdentity};
use crate::noise::peer::{Peer, PeerConfig, Retired};
use crate::noise::session::sealed_len;
use crate::noise::{AeadBackend, PresharedKey, PrivateKey, PublicKey};
use crate::peer_view::{instant_from_nanos, Endpoint, PeerView, PeerViews};
use crate::policy::{CompiledPolicy, ForwardingPolicy};
use crate::snapshot::{PeerTally, Snapshot};
use crate::staging::StagingPool;
use crate::table::{IndexTable, IpPrefix, SharedAllowedIps};
use crate::transport::{self, Opened, SealError, Tables};
use crate::wire::{
    HandshakeInitiation, HandshakeResponse, Message, COOKIE_REPLY_LEN, HANDSHAKE_INITIATION_LEN,
    HANDSHAKE_RESPONSE_LEN, TRANSPORT_HEADER_LEN,
};
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

pub use crate::peer_view::PeerId;
pub use crate::transport::IndexValue;

/// Packets held per peer while a handshake completes (as wireguard-go does).
pub const MAX_STAGED_PACKETS: usize = 128;
/// Packets held for all peers together while handshakes complete.
pub const MAX_STAGED_TOTAL: usize = 8192;

/// What to do with an input that was accepted.
#[derive(Debug)]
pub enum Action<'a> {
    /// Send `bytes` as one UDP datagram to `to`.
    Send { to: SocketAddr, bytes: &'a [u8] },
    /// Deliver this inner IP packet (padding removed) from `peer` to the site.
    Deliver { peer: PeerId, packet: &'a [u8] },
    /// Accepted; nothing to send right now (keepalive, cookie, handshake done).
    Nothing,
}

/// A datagram produced by `poll_transmit`, in the caller's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transmit {
    pub to: SocketAddr,
    pub len: usize,
    /// The peer it is for.
    pub peer: PeerId,
}

/// What `Device::update_peer` changes; `None` fields stay as they are.
#[derive(Debug, Clone, Default)]
pub struct PeerUpdate {
    pub preshared_key: Option<PresharedKey>,
    pub persistent_keepalive: Option<Option<std::time::Duration>>,
    pub endpoint: Option<SocketAddr>,
}

/// Per-peer traffic counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerStats {
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub handshakes: u64,
    /// Handshakes with this (authenticated) peer that did not complete: our
    /// response went unused before it initiated again, or its response to
    /// our initiation did not authenticate.
    pub handshake_failures: u64,
}

struct PeerSlot {
    peer: Peer,
    /// Shared with the workers: endpoint, published keypair, counters, activity.
    view: Arc<PeerView>,
    staged: VecDeque<Vec<u8>>,
    /// A new handshake is wanted even if a session exists (rekey, a new
    /// pre-shared key, an explicit start). Kept until an initiation goes out,
    /// so one refused by the REKEY_TIMEOUT rate limit is sent when it allows.
    want_initiation: bool,
    want_keepalive: bool,
    handshakes: u64,
    handshake_failures: u64,
    /// The initiation (its local index) whose response already counted as
    /// a failure: forged responses to one initiation count once.
    failed_initiation: Option<u32>,
    /// Worker activity already turned into timer events (see `sync_from_workers`).
    seen: [u64; 4],
}

impl PeerSlot {
    /// Makes the peer's current keypair the one workers send with.
    fn publish(&self) {
        let cur = self.peer.current_keypair();
        let published = self.view.current.load();
        let same = match (cur, published.as_ref()) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        if !same {
            self.view.current.store(cur.cloned());
        }
    }

    fn endpoint(&self) -> Option<SocketAddr> {
        self.view.endpoint_addr()
    }

    /// A handshake is due now: explicitly wanted, or packets wait with no
    /// usable session and no handshake under way (retrying one is the
    /// retransmit timer's job, which gives up after REKEY_ATTEMPT_TIME).
    fn needs_initiation(&self, now: Instant) -> bool {
        self.want_initiation
            || (!self.staged.is_empty() && !self.peer.has_usable_session(now) && !self.peer.timers.handshake_pending())
    }
}

pub struct Device {
    identity: StaticIdentity,
    backend: AeadBackend,
    cookies: Arc<CookieChecker>,
    tables: Tables,
    peers: HashMap<PeerId, PeerSlot>,
    by_key: HashMap<PublicKey, PeerId>,
    next_peer_id: PeerId,
    staging: Arc<StagingPool>,
    ready: VecDeque<PeerId>,
    pub drops: Arc<DropCounters>,
    pub cookie_replies_sent: u64,
}

impl core::fmt::Debug for Device {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Device")
            .field("public_key", &self.identity.public)
            .field("peers", &self.peers.len())
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PeerConfigError {
    #[error("a peer with this public key already exists")]
    DuplicateKey,
    #[error("the public key is invalid (low-order point) or our own")]
    InvalidKey,
}

impl Device {
    pub fn new(private_key: PrivateKey, backend: AeadBackend, index_slot_bits: u32, now: Instant) -> Self {
        let identity = StaticIdentity::new(private_key);
        Self {
            cookies: Arc::new(CookieChecker::new(&identity.public, now)),
            tables: Tables::new(index_slot_bits),
            identity,
            backend,
            peers: HashMap::new(),
            by_key: HashMap::new(),
            next_peer_id: 1,
            staging: Arc::new(StagingPool::new(MAX_STAGED_TOTAL)),
            ready: VecDeque::new(),
            drops: Arc::new(DropCounters::default()),
            cookie_replies_sent: 0,
        }
    }

    pub fn public_key(&self) -> PublicKey {
        self.identity.public
    }

    pub fn add_peer(
        &mut self,
        config: PeerConfig,
        endpoint: Option<SocketAddr>,
        allowed_ips: &[IpPrefix],
    ) -> Result<PeerId, PeerConfigError> {
        if self.by_key.contains_key(&config.public_key) {
            return Err(PeerConfigError::DuplicateKey);
        }
        if config.public_key == self.identity.public {
            return Err(PeerConfigError::InvalidKey);
        }
        let key = config.public_key;
        let peer = Peer::new(&self.identity, config, self.backend).map_err(|_| PeerConfigError::InvalidKey)?;
        let id = self.next_peer_id;
        self.next_peer_id += 1;
        let view = Arc::new(PeerView::new(id, endpoint));
        self.tables.views.insert(view.clone());
        self.peers.insert(
            id,
            PeerSlot {
                peer,
                view,
                staged: VecDeque::new(),
                want_initiation: false,
                want_keepalive: false,
                handshakes: 0,
                handshake_failures: 0,
                failed_initiation: None,
                seen: [0; 4],
            },
        );
        self.by_key.insert(key, id);
        self.tables.allowed_ips.set_prefixes(id, allowed_ips);
        Ok(id)
    }

    /// Removes a peer, its routes and its indices; its keys are zeroized.
    pub fn remove_peer(&mut self, id: PeerId) -> bool {
        let Some(mut slot) = self.peers.remove(&id) else {
            return false;
        };
        self.by_key.remove(slot.peer.public_key());
        self.tables.allowed_ips.remove_value(id);
        self.tables.views.remove(id);
        self.retire(slot.peer.zero_keys());
        slot.publish();
        for buf in slot.staged.drain(..) {
            self.staging.give(buf);
        }
        true
    }

    pub fn set_allowed_ips(&mut self, id: PeerId, prefixes: &[IpPrefix]) {
        self.tables.allowed_ips.set_prefixes(id, prefixes);
    }

    /// Publishes what `id`'s remote site may reach (its rule counters restart).
    /// False if there is no such peer.
    pub fn set_policy(&mut self, id: PeerId, policy: ForwardingPolicy) -> bool {
        let Some(slot) = self.peers.get(&id) else { return false };
        slot.view.policy.store(Arc::new(CompiledPolicy::new(policy)));
        true
    }

    /// `id`'s forwarding policy and each rule's hits since it was published.
    pub fn policy(&self, id: PeerId) -> Option<(ForwardingPolicy, Vec<u64>)> {
        let policy = self.peers.get(&id)?.view.policy.load();
        Some((policy.policy().clone(), policy.rule_hits()))
    }

    /// Changes a running peer in place (its session and counters survive).
    /// A new pre-shared key takes effect with a fresh handshake, started as
    /// soon as the initiation rate limit (REKEY_TIMEOUT) allows.
    pub fn update_peer(&mut self, id: PeerId, update: PeerUpdate) -> bool {
        let Some(slot) = self.peers.get_mut(&id) else { return false };
        if let Some(psk) = update.preshared_key {
            slot.peer.set_preshared_key(psk);
            slot.want_initiation = true;
            self.ready.push_back(id);
        }
        if let Some(keepalive) = update.persistent_keepalive {
            slot.peer.set_persistent_keepalive(keepalive);
        }
        if let Some(addr) = update.endpoint {
            slot.view.learn_addr(addr);
        }
        true
    }

    pub fn peer_stats(&self, id: PeerId) -> Option<PeerStats> {
        use std::sync::atomic::Ordering::Relaxed;
        self.peers.get(&id).map(|s| {
            let c = &s.view.counters;
            PeerStats {
                rx_bytes: c.rx_bytes.load(Relaxed),
                tx_bytes: c.tx_bytes.load(Relaxed),
                rx_packets: c.rx_packets.load(Relaxed),
                tx_packets: c.tx_packets.load(Relaxed),
                handshakes: s.handshakes,
                handshake_failures: s.handshake_failures,
            }
        })
    }

    pub fn peer_endpoint(&self, id: PeerId) -> Option<SocketAddr> {
        self.peers.get(&id).and_then(|s| s.endpoint())
    }

    /// Packets waiting for `id`'s handshake.
    pub fn staged_packets(&self, id: PeerId) -> usize {
        self.peers.get(&id).map_or(0, |s| s.staged.len())
    }

    /// The tables the transport path reads (shared with the workers).
    pub fn tables(&self) -> &Tables {
        &self.tables
    }

    /// The peers as the workers see them.
    pub fn views(&self) -> &Arc<PeerViews> {
        &self.tables.views
    }

    /// The buffers workers stage packets in.
    pub fn staging(&self) -> &Arc<StagingPool> {
        &self.staging
    }

    /// The responder-side MAC checks and cookie replies, for workers that answer
    /// under load without queueing.
    pub fn cookie_checker(&self) -> &Arc<CookieChecker> {
        &self.cookies
    }

    pub fn peer_last_handshake(&self, id: PeerId) -> Option<SystemTime> {
        self.peers.get(&id).and_then(|s| s.peer.last_handshake())
    }

    pub fn indices(&self) -> &Arc<IndexTable<IndexValue>> {
        &self.tables.indices
    }

    pub fn allowed_ips(&self) -> &Arc<SharedAllowedIps<PeerId>> {
        &self.tables.allowed_ips
    }

    fn retire(&self, retired: Retired) {
        for index in retired.iter() {
            self.tables.indices.remove(index);
        }
    }

    /// Handles one received UDP payload from `src`. `under_load` is the caller's
    /// judgement (e.g. its handshake queue is filling): then initiations and
    /// responses without a valid cookie get a cookie reply instead of an answer.
    pub fn receive<'a>(
        &mut self,
        src: SocketAddr,
        datagram: &'a mut [u8],
        under_load: bool,
        now: Instant,
        wall: SystemTime,
        out: &'a mut [u8],
    ) -> Result<Action<'a>, DropReason> {
        self.receive_from(Endpoint::from(src), datagram, under_load, now, wall, out)
    }

    /// `receive`, with the link-layer path the datagram arrived on when known.
    pub fn receive_from<'a>(
        &mut self,
        src: Endpoint,
        datagram: &'a mut [u8],
        under_load: bool,
        now: Instant,
        wall: SystemTime,
        out: &'a mut [u8],
    ) -> Result<Action<'a>, DropReason> {
        let result = self.receive_inner(src, datagram, under_load, now, wall, out);
        if let Err(d) = result {
            tracing::trace!(from = %src.addr, reason = %d, "dropped");
            self.drops.count(d);
        }
        result
    }

    fn receive_inner<'a>(
        &mut self,
        from: Endpoint,
        datagram: &'a mut [u8],
        under_load: bool,
        now: Instant,
        wall: SystemTime,
        out: &'a mut [u8],
    ) -> Result<Action<'a>, DropReason> {
        let src = from.addr;
        let kind = Message::parse(&*datagram).map_err(|_| DropReason::Malformed)?;
        match kind {
            Message::HandshakeInitiation(_) | Message::HandshakeResponse(_) => {
                let sender = match &kind {
                    Message::HandshakeInitiation(m) => m.sender(),
                    Message::HandshakeResponse(m) => m.sender(),
                    _ => unreachable!("matched above"),
                };
                match self.cookies.verify(datagram, src, now) {
                    MacVerdict::InvalidMac1 => return Err(DropReason::InvalidMac1),
                    MacVerdict::ValidWithoutCookie if under_load => {
                        let reply: &mut [u8; COOKIE_REPLY_LEN] = out
                            .get_mut(..COOKIE_REPLY_LEN)
                            .and_then(|b| b.try_into().ok())
                            .ok_or(DropReason::BufferTooSmall)?;
                        if !self.cookies.write_reply(datagram, sender, src, now, reply) {
                            return Err(DropReason::Malformed);
                        }
                        self.cookie_replies_sent += 1;
                        return Ok(Action::Send { to: src, bytes: &out[..COOKIE_REPLY_LEN] });
                    }
                    _ => {}
                }
                if matches!(kind, Message::HandshakeInitiation(_)) {
                    self.on_initiation(from, datagram, now, out)
                } else {
                    self.on_response(from, datagram, now, wall)
                }
            }
            Message::CookieReply(m) => {
                let entry = self.tables.indices.get(m.receiver()).ok_or(DropReason::UnknownIndex)?;
                let slot = self.peers.get_mut(&entry.value.peer).ok_or(DropReason::UnknownIndex)?;
                slot.peer.consume_cookie_reply(&m, now).map_err(|_| DropReason::BadCookieReply)?;
                Ok(Action::Nothing)
            }
            Message::Transport(_) => self.on_transport(from, datagram, now, wall),
        }
    }

    fn on_initiation<'a>(
        &mut self,
        from: Endpoint,
        datagram: &[u8],
        now: Instant,
        out: &'a mut [u8],
    ) -> Result<Action<'a>, DropReason> {
        let buf: &mut [u8; HANDSHAKE_RESPONSE_LEN] =
            out.get_mut(..HANDSHAKE_RESPONSE_LEN).and_then(|b| b.try_into().ok()).ok_or(DropReason::BufferTooSmall)?;
        let msg = HandshakeInitiation::new_checked(datagram).map_err(|_| DropReason::Malformed)?;
        let refused = |e: crate::noise::handshake::HandshakeError| {
            tracing::debug!(from = %from.addr, error = %e, "initiation refused");
            DropReason::Handshake
        };
        let partial = consume_initiation_static(&self.identity, &msg).map_err(refused)?;
        let Some(&id) = self.by_key.get(&partial.remote_static) else {
            tracing::debug!(from = %from.addr, key = %partial.remote_static, "initiation from an unknown peer");
            return Err(DropReason::Handshake);
        };
        let slot = self.peers.get_mut(&id).ok_or(DropReason::Handshake)?;
        let consumed = partial.finish(slot.peer.keys(), &msg).map_err(refused)?;
        // Counted once the initiation authenticated: a replay or a flood
        // (refused below) is not the peer failing.
        let previous_unconfirmed = slot.peer.response_unconfirmed();
        let index = self
            .tables
            .indices
            .insert(IndexValue { peer: id, keypair: None })
            .map_err(|_| DropReason::IndexTableFull)?;
        match slot.peer.write_response(&consumed, index, now, buf) {
            Ok((keypair, retired)) => {
                self.tables.indices.replace(index, IndexValue { peer: id, keypair: Some(keypair) });
                slot.view.learn(from);
                slot.handshakes += 1;
                slot.handshake_failures += u64::from(previous_unconfirmed);
                // Any handshake completed from here on satisfies a pending wish
                // for one (it already uses the current pre-shared key).
                slot.want_initiation = false;
                self.retire(retired);
                Ok(Action::Send { to: from.addr, bytes: &out[..HANDSHAKE_RESPONSE_LEN] })
            }
            Err(e) => {
                self.tables.indices.remove(index);
                Err(refused(e))
            }
        }
    }

    fn on_response<'a>(
        &mut self,
        from: Endpoint,
        datagram: &[u8],
        now: Instant,
        wall: SystemTime,
    ) -> Result<Action<'a>, DropReason> {
        let msg = HandshakeResponse::new_checked(datagram).map_err(|_| DropReason::Malformed)?;
        let entry = self.tables.indices.get(msg.receiver()).ok_or(DropReason::UnknownIndex)?;
        if entry.value.keypair.is_some() {
            return Err(DropReason::Handshake);
        }
        let id = entry.value.peer;
        drop(entry);
        let slot = self.peers.get_mut(&id).ok_or(DropReason::UnknownIndex)?;
        let (keypair, retired) = slot.peer.consume_response(&self.identity, &msg, now, wall).map_err(|e| {
            tracing::debug!(from = %from.addr, error = %e, "response refused");
            // A response to our pending initiation that does not decrypt: the
            // peer's keys (its pre-shared key) differ. Counted once per
            // initiation, however many (forged) responses come.
            if e == crate::noise::handshake::HandshakeError::Decryption
                && slot.failed_initiation != Some(msg.receiver())
            {
                slot.failed_initiation = Some(msg.receiver());
                slot.handshake_failures += 1;
            }
            DropReason::Handshake
        })?;
        slot.view.learn(from);
        slot.handshakes += 1;
        slot.want_initiation = false;
        slot.publish();
        // Section 6.3 / wireguard-go: confirm the session at once, with the staged
        // packets if there are any, else with a keepalive.
        if slot.staged.is_empty() {
            slot.want_keepalive = true;
        }
        self.tables.indices.replace(keypair.local_index, IndexValue { peer: id, keypair: Some(keypair) });
        self.retire(retired);
        self.ready.push_back(id);
        Ok(Action::Nothing)
    }

    fn on_transport<'a>(
        &mut self,
        from: Endpoint,
        datagram: &'a mut [u8],
        now: Instant,
        wall: SystemTime,
    ) -> Result<Action<'a>, DropReason> {
        // (The snapshot's tally is written back before the timers look at it.)
        let opened = transport::open(&mut Snapshot::load(&self.tables), datagram, 0, from, now)?;
        self.sync_peer(opened.peer(), now, wall);
        match opened {
            Opened::Keepalive { .. } => Ok(Action::Nothing),
            Opened::Data { peer, inner } => Ok(Action::Deliver { peer, packet: &datagram[..inner.len] }),
        }
    }

    /// Encrypts an inner IP packet for the peer that owns its destination. If no
    /// session exists yet, the packet is staged and a handshake initiation is
    /// returned instead (the packet follows via `poll_transmit`).
    pub fn send<'a>(
        &mut self,
        packet: &[u8],
        now: Instant,
        wall: SystemTime,
        out: &'a mut [u8],
    ) -> Result<Action<'a>, DropReason> {
        let r = self.send_inner(packet, now, wall, out);
        if let Err(d) = r {
            self.drops.count(d);
        }
        r
    }

    fn send_inner<'a>(
        &mut self,
        packet: &[u8],
        now: Instant,
        wall: SystemTime,
        out: &'a mut [u8],
    ) -> Result<Action<'a>, DropReason> {
        let inner = parse_ip_frame_payload(packet).map_err(|_| DropReason::BadInnerPacket)?;
        let packet = packet.get(..inner.len).ok_or(DropReason::BadInnerPacket)?;
        let mut snapshot = Snapshot::load(&self.tables);
        let tally = snapshot.route(inner.dst)?;
        let (peer, to) = (tally.view().id, tally.endpoint().ok_or(DropReason::NoEndpoint)?.addr);
        let body =
            out.get_mut(TRANSPORT_HEADER_LEN..TRANSPORT_HEADER_LEN + packet.len()).ok_or(DropReason::BufferTooSmall)?;
        body.copy_from_slice(packet);
        let sealed = transport::seal(tally, out, packet.len(), now);
        drop(snapshot);
        match sealed {
            Ok(n) => {
                self.sync_peer(peer, now, wall);
                Ok(Action::Send { to, bytes: &out[..n] })
            }
            Err(SealError::BufferTooSmall) => Err(DropReason::BufferTooSmall),
            Err(SealError::NoSession) => {
                let buf = self.staging.take(packet).ok_or(DropReason::StagingFull)?;
                self.stage(peer, buf, now, wall);
                match self.poll_transmit(now, wall, out) {
                    Some(t) => Ok(Action::Send { to: t.to, bytes: &out[..t.len] }),
                    None => Ok(Action::Nothing),
                }
            }
        }
    }

    /// Starts a handshake with `id` now (e.g. on configuration), if allowed.
    pub fn initiate(&mut self, id: PeerId) {
        if let Some(slot) = self.peers.get_mut(&id) {
            slot.want_initiation = true;
            self.ready.push_back(id);
        }
    }

    /// Sends a keepalive to `id` now on its current session.
    pub fn send_keepalive(&mut self, id: PeerId, now: Instant, out: &mut [u8]) -> Result<Transmit, DropReason> {
        let slot = self.peers.get(&id).ok_or(DropReason::NoRoute)?;
        let to = slot.endpoint().ok_or(DropReason::NoEndpoint)?;
        match transport::seal(&mut PeerTally::new(slot.view.clone()), out, 0, now) {
            Ok(len) => Ok(Transmit { to, len, peer: id }),
            Err(SealError::BufferTooSmall) => Err(DropReason::BufferTooSmall),
            Err(SealError::NoSession) => Err(DropReason::Expired),
        }
    }

    /// Runs every peer's timers (once per call, however many packets were
    /// staged since); due work is then pulled with `poll_transmit`.
    pub fn tick(&mut self, now: Instant) {
        self.tick_at(now, SystemTime::now());
    }

    /// `tick` with an explicit wall clock (recorded as the handshake time when a
    /// worker confirmed a new session).
    pub fn tick_at(&mut self, now: Instant, wall: SystemTime) {
        let mut retired_all = Vec::new();
        for (id, slot) in self.peers.iter_mut() {
            retired_all.push(Self::sync_from_workers(slot, now, wall));
            let (actions, retired) = slot.peer.tick(now);
            slot.publish();
            retired_all.push(retired);
            if actions.gave_up {
                // REKEY_ATTEMPT_TIME without an answer: what waited is dropped, counted.
                for buf in slot.staged.drain(..) {
                    self.drops.count(DropReason::StagingExpired);
                    self.staging.give(buf);
                }
                slot.want_initiation = false;
            }
            if actions.send_initiation {
                slot.want_initiation = true;
            }
            if actions.send_keepalive {
                slot.want_keepalive = true;
            }
            if slot.want_initiation || slot.want_keepalive || !slot.staged.is_empty() {
                self.ready.push_back(*id);
            }
        }
        for r in retired_all {
            self.retire(r);
        }
    }

    /// Turns `id`'s activity since the last look into timer events at once
    /// (the device's own traffic; workers' traffic is picked up by `tick`).
    fn sync_peer(&mut self, id: PeerId, now: Instant, wall: SystemTime) {
        let Some(slot) = self.peers.get_mut(&id) else { return };
        let retired = Self::sync_from_workers(slot, now, wall);
        if slot.needs_initiation(now) || !slot.staged.is_empty() {
            self.ready.push_back(id);
        }
        self.retire(retired);
    }

    /// Turns what was sent and received on the peer's sessions since the last
    /// look into the peer's timer events, confirms a responder keypair that was
    /// used, and applies the rekey rules.
    fn sync_from_workers(slot: &mut PeerSlot, now: Instant, wall: SystemTime) -> Retired {
        use std::sync::atomic::Ordering::Relaxed;
        let a = &slot.view.activity;
        let current = [
            a.data_sent.load(Relaxed),
            a.data_received.load(Relaxed),
            a.authenticated_sent.load(Relaxed),
            a.authenticated_received.load(Relaxed),
        ];
        let mut events = [(0u64, 0usize); 4];
        let mut n = 0;
        for (kind, (&at, &seen)) in current.iter().zip(&slot.seen).enumerate() {
            if at > seen {
                events[n] = (at, kind);
                n += 1;
            }
        }
        let events = &mut events[..n];
        events.sort_unstable();
        for &(nanos, kind) in events.iter() {
            let at = instant_from_nanos(nanos);
            let t = &mut slot.peer.timers;
            match kind {
                0 => t.on_data_sent(at),
                1 => t.on_data_received(at),
                2 => t.on_authenticated_sent(at),
                _ => t.on_authenticated_received(at),
            }
        }
        // Keepalives count too (the kernel keeps keys fresh on every
        // authenticated packet, section 6.2): an idle tunnel with a persistent
        // keepalive rekeys instead of running into REJECT_AFTER_TIME.
        let sent = current[2] > slot.seen[2];
        let received = current[3] > slot.seen[3];
        slot.seen = current;
        let before = slot.peer.current_keypair().map(Arc::as_ptr);
        let retired = slot.peer.confirm_next_if_used(wall);
        if slot.peer.current_keypair().map(Arc::as_ptr) != before {
            // The peer confirmed the session we answered: a wish for a new
            // handshake raised meanwhile (a packet found no session) is met.
            slot.want_initiation = false;
        }
        if slot.peer.rekey_due(now, sent, received) {
            slot.want_initiation = true;
        }
        if slot.view.attention.swap(false, Relaxed)
            && !slot.peer.has_usable_session(now)
            && !slot.peer.timers.handshake_pending()
        {
            slot.want_initiation = true;
        }
        slot.publish();
        retired
    }

    /// Stages a packet (in a buffer from `staging()`) that could not be sent
    /// for lack of a session; a handshake follows via `poll_transmit` and the
    /// packet once the session exists. Bounded per peer: the oldest is dropped.
    pub fn stage(&mut self, id: PeerId, packet: Vec<u8>, now: Instant, wall: SystemTime) {
        // A worker may have just confirmed a new session (the peer's first
        // packet on our responder keypair): take it into account first, so the
        // packet goes out on it instead of starting a needless handshake.
        self.sync_peer(id, now, wall);
        let Some(slot) = self.peers.get_mut(&id) else {
            self.drops.count(DropReason::NoRoute);
            return self.staging.give(packet);
        };
        if slot.staged.len() >= MAX_STAGED_PACKETS {
            if let Some(old) = slot.staged.pop_front() {
                self.drops.count(DropReason::StagingFull);
                self.staging.give(old);
            }
        }
        slot.staged.push_back(packet);
        self.ready.push_back(id);
    }

    /// The next datagram the device wants to send, written into `out`.
    pub fn poll_transmit(&mut self, now: Instant, wall: SystemTime, out: &mut [u8]) -> Option<Transmit> {
        while let Some(&id) = self.ready.front() {
            let Some(slot) = self.peers.get_mut(&id) else {
                self.ready.pop_front();
                continue;
            };
            let Some(to) = slot.endpoint() else {
                // Nowhere to send: wait for the peer to reach us (it may roam in).
                slot.want_keepalive = false;
                self.ready.pop_front();
                continue;
            };
            let rate_limited = slot.needs_initiation(now) && !slot.peer.may_initiate(now);
            if rate_limited && !slot.peer.has_usable_session(now) {
                // Rate-limited (section 6.1): `tick` brings it back when allowed.
                self.ready.pop_front();
                continue;
            }
            if slot.needs_initiation(now) && !rate_limited {
                let Some(buf) = out.get_mut(..HANDSHAKE_INITIATION_LEN).and_then(|b| b.try_into().ok()) else {
                    self.drops.count(DropReason::BufferTooSmall);
                    self.ready.pop_front();
                    continue;
                };
                let retry = slot.peer.timers.handshake_pending();
                let Ok(index) = self.tables.indices.insert(IndexValue { peer: id, keypair: None }) else {
                    self.drops.count(DropReason::IndexTableFull);
                    self.ready.pop_front();
                    continue;
                };
                match slot.peer.write_initiation(&self.identity, index, retry, now, wall, buf) {
                    Ok(retired) => {
                        // Only a sent initiation satisfies the wish; a failed
                        // attempt is retried at the next tick.
                        slot.want_initiation = false;
                        self.retire(retired);
                        return Some(Transmit { to, len: HANDSHAKE_INITIATION_LEN, peer: id });
                    }
                    Err(_) => {
                        self.tables.indices.remove(index);
                        self.drops.count(DropReason::Handshake);
                        self.ready.pop_front();
                        continue;
                    }
                }
            }
            if slot.peer.has_usable_session(now) {
                if let Some(packet) = slot.staged.pop_front() {
                    let len = packet.len();
                    let room = out.len() >= sealed_len(len);
                    let sealed = match out.get_mut(TRANSPORT_HEADER_LEN..TRANSPORT_HEADER_LEN + len) {
                        Some(body) if room => {
                            body.copy_from_slice(&packet);
                            let mut tally = PeerTally::new(slot.view.clone());
                            transport::seal(&mut tally, out, len, now).map_err(|_| DropReason::Expired)
                        }
                        _ => Err(DropReason::BufferTooSmall),
                    };
                    self.staging.give(packet);
                    match sealed {
                        Ok(n) => {
                            slot.want_keepalive = false;
                            return Some(Transmit { to, len: n, peer: id });
                        }
                        Err(reason) => {
                            self.drops.count(reason);
                            continue;
                        }
                    }
                }
                if slot.want_keepalive {
                    slot.want_keepalive = false;
                    if let Ok(n) = transport::seal(&mut PeerTally::new(slot.view.clone()), out, 0, now) {
                        return Some(Transmit { to, len: n, peer: id });
                    }
                }
            }
            slot.want_keepalive = false;
            self.ready.pop_front();
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::noise::PresharedKey;
    use crate::testing::sent_bytes;
    use crate::wire::Ipv4Packet;
    use std::net::Ipv4Addr;
    use std::time::Duration;

    const A_ADDR: &str = "192.0.2.1:51820";
    const B_ADDR: &str = "192.0.2.2:51821";

    struct Pair {
        a: Device,
        b: Device,
        a_peer: PeerId,
        b_peer: PeerId,
    }

    fn pair(now: Instant) -> Pair {
        let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
        let psk = PresharedKey::generate();
        let (pa, pb) = (ka.public_key(), kb.public_key());
        let mut a = Device::new(ka, AeadBackend::Ring, 8, now);
        let mut b = Device::new(kb, AeadBackend::RustCrypto, 8, now);
        let cfg = |k| PeerConfig { public_key: k, preshared_key: psk.clone(), persistent_keepalive: None };
        let a_peer = a.add_peer(cfg(pb), Some(B_ADDR.parse().unwrap()), &["10.0.2.0/24".parse().unwrap()]).unwrap();
        let b_peer = b.add_peer(cfg(pa), None, &["10.0.1.0/24".parse().unwrap()]).unwrap();
        Pair { a, b, a_peer, b_peer }
    }

    fn ipv4(src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
        let mut buf = vec![0u8; 20 + payload.len()];
        Ipv4Packet::emit(&mut buf[..], Ipv4Addr::from(src), Ipv4Addr::from(dst), 17, 64, payload.len()).unwrap();
        buf[20..].copy_from_slice(payload);
        buf
    }

    /// Delivers `bytes` from `from_addr` into `to`, returns what it wants sent.
    fn deliver(to: &mut Device, from_addr: &str, bytes: &[u8], now: Instant) -> Result<Vec<u8>, DropReason> {
        let mut d = bytes.to_vec();
        let mut out = vec![0u8; 2048];
        match to.receive(from_addr.parse().unwrap(), &mut d, false, now, SystemTime::now(), &mut out)? {
            Action::Send { bytes, .. } | Action::Deliver { packet: bytes, .. } => Ok(bytes.to_vec()),
            Action::Nothing => Ok(Vec::new()),
        }
    }

    fn drain(dev: &mut Device, now: Instant) -> Vec<Vec<u8>> {
        let mut out = vec![0u8; 2048];
        let mut v = Vec::new();
        while let Some(t) = dev.poll_transmit(now, SystemTime::now(), &mut out) {
            v.push(out[..t.len].to_vec());
        }
        v
    }

    /// a initiates, b responds, a confirms with a keepalive that b accepts.
    fn handshake(p: &mut Pair, now: Instant) {
        p.a.initiate(p.a_peer);
        let init = drain(&mut p.a, now).remove(0);
        let resp = deliver(&mut p.b, A_ADDR, &init, now).unwrap();
        deliver(&mut p.a, B_ADDR, &resp, now).unwrap();
        let confirm = drain(&mut p.a, now);
        assert_eq!(confirm.len(), 1);
        assert_eq!(confirm[0].len(), 32, "a keepalive confirms the session");
        assert!(deliver(&mut p.b, A_ADDR, &confirm[0], now).unwrap().is_empty());
    }

    #[test]
    fn handshakes_that_do_not_complete_are_counted_on_both_sides() {
        let now = Instant::now();
        let mut p = pair(now);
        // b now holds another pre-shared key: a's initiations still
        // authenticate at b (IKpsk2 mixes the key in at the response), but
        // b's responses do not authenticate at a.
        let update = PeerUpdate { preshared_key: Some(PresharedKey::generate()), ..PeerUpdate::default() };
        assert!(p.b.update_peer(p.b_peer, update));
        drain(&mut p.b, now);
        // Initiation timestamps are whitened to ~16.7 ms: each round a newer one.
        let newer_timestamp = || std::thread::sleep(Duration::from_millis(20));
        for round in 0..3u32 {
            let t = now + crate::noise::constants::REKEY_TIMEOUT * (round + 1) + Duration::from_millis(10);
            newer_timestamp();
            p.a.initiate(p.a_peer);
            let init = drain(&mut p.a, t).remove(0);
            let resp = deliver(&mut p.b, A_ADDR, &init, t).unwrap_or_else(|e| panic!("round {round}: {e:?}"));
            assert_eq!(resp.len(), 92, "b answers every initiation");
            assert_eq!(deliver(&mut p.a, B_ADDR, &resp, t), Err(DropReason::Handshake));
            assert_eq!(p.a.peer_stats(p.a_peer).unwrap().handshake_failures, u64::from(round) + 1);
            // b learns of a failure when the next initiation comes instead of data.
            assert_eq!(p.b.peer_stats(p.b_peer).unwrap().handshake_failures, u64::from(round));
        }
        // The same (or a forged) response again counts no second failure.
        let t = now + crate::noise::constants::REKEY_TIMEOUT * 5;
        newer_timestamp();
        p.a.initiate(p.a_peer);
        let init = drain(&mut p.a, t).remove(0);
        let resp = deliver(&mut p.b, A_ADDR, &init, t).unwrap();
        for _ in 0..3 {
            assert_eq!(deliver(&mut p.a, B_ADDR, &resp, t), Err(DropReason::Handshake));
        }
        assert_eq!(p.a.peer_stats(p.a_peer).unwrap().handshake_failures, 4);
        // A replay of an initiation is no failure of the peer's.
        let mut p = pair(now);
        p.a.initiate(p.a_peer);
        let init = drain(&mut p.a, now).remove(0);
        deliver(&mut p.b, A_ADDR, &init, now).unwrap();
        assert!(deliver(&mut p.b, A_ADDR, &init, now + Duration::from_secs(1)).is_err());
        assert_eq!(p.b.peer_stats(p.b_peer).unwrap().handshake_failures, 0);
        // Nor is a completed handshake.
        let mut p = pair(now);
        handshake(&mut p, now);
        let later = now + crate::noise::constants::REKEY_TIMEOUT * 2;
        newer_timestamp();
        handshake(&mut p, later);
        assert_eq!(p.a.peer_stats(p.a_peer).unwrap().handshake_failures, 0);
        assert_eq!(p.b.peer_stats(p.b_peer).unwrap().handshake_failures, 0);
    }

    #[test]
    fn staged_packet_flows_after_handshake_and_answers_come_back() {
        let now = Instant::now();
        let mut p = pair(now);
        let mut out = vec![0u8; 2048];
        let ping = ipv4([10, 0, 1, 5], [10, 0, 2, 9], b"ping");
        let init = sent_bytes(&mut p.a, &ping, now);
        assert_eq!(init.len(), 148, "no session yet: an initiation goes first");
        let resp = deliver(&mut p.b, A_ADDR, &init, now).unwrap();
        assert_eq!(resp.len(), 92);
        assert_eq!(p.b.peer_endpoint(p.b_peer), Some(A_ADDR.parse().unwrap()));
        assert!(deliver(&mut p.a, B_ADDR, &resp, now).unwrap().is_empty());
        let flushed = drain(&mut p.a, now);
        assert_eq!(flushed.len(), 1, "the staged ping, and no extra keepalive");
        let delivered = deliver(&mut p.b, A_ADDR, &flushed[0], now).unwrap();
        assert_eq!(delivered, ping);
        // The answer goes straight out on the now-confirmed session.
        let pong = ipv4([10, 0, 2, 9], [10, 0, 1, 5], b"pong");
        let enc = sent_bytes(&mut p.b, &pong, now);
        assert_eq!(deliver(&mut p.a, B_ADDR, &enc, now).unwrap(), pong);
        assert_eq!(p.a.peer_stats(p.a_peer).unwrap().rx_packets, 1);
        assert_eq!(p.b.peer_stats(p.b_peer).unwrap().handshakes, 1);

        // Replays and forgeries are dropped and counted.
        assert_eq!(deliver(&mut p.a, B_ADDR, &enc, now), Err(DropReason::Replay));
        // A seen counter with a forged body fails authentication first (the
        // window is consulted under its lock only after the AEAD).
        let mut forged = enc.clone();
        forged[20] ^= 0x40;
        assert_eq!(deliver(&mut p.a, B_ADDR, &forged, now), Err(DropReason::Authentication));
        let enc2 = sent_bytes(&mut p.b, &pong, now);
        let mut forged = enc2.clone();
        forged[40] ^= 0x01;
        assert_eq!(deliver(&mut p.a, B_ADDR, &forged, now), Err(DropReason::Authentication));
        assert_eq!(deliver(&mut p.a, B_ADDR, &enc2, now).unwrap(), pong);
        assert_eq!((p.a.drops.get(DropReason::Replay), p.a.drops.get(DropReason::Authentication)), (1, 2));

        // A peer may only send from its own allowed IPs.
        let spoof = ipv4([10, 0, 3, 1], [10, 0, 1, 5], b"spoof");
        let enc3 = match p.b.send(&ipv4([10, 0, 2, 9], [10, 0, 1, 5], b"x"), now, SystemTime::now(), &mut out) {
            Ok(Action::Send { .. }) => {
                // Build a spoofed packet by encrypting it on b's session directly.
                let kp = p.b.peers.get(&p.b_peer).unwrap().peer.current_keypair().unwrap().clone();
                let mut buf = vec![0u8; 2048];
                let n = kp.encrypt(&spoof, &mut buf, now).unwrap();
                buf[..n].to_vec()
            }
            other => panic!("{other:?}"),
        };
        assert_eq!(deliver(&mut p.a, B_ADDR, &enc3, now), Err(DropReason::SourceNotAllowed));
        assert_eq!(p.a.drops.get(DropReason::SourceNotAllowed), 1);
        // Nobody owns 10.9.0.0: no route.
        let err = p.a.send(&ipv4([10, 0, 1, 5], [10, 9, 0, 1], b"?"), now, SystemTime::now(), &mut out).unwrap_err();
        assert_eq!(err, DropReason::NoRoute);
    }

    #[test]
    fn under_load_initiations_get_cookie_replies_then_succeed_with_mac2() {
        let now = Instant::now();
        let mut p = pair(now);
        p.a.initiate(p.a_peer);
        let init = drain(&mut p.a, now).remove(0);
        let mut out = vec![0u8; 256];
        let mut d = init.clone();
        let reply = match p.b.receive(A_ADDR.parse().unwrap(), &mut d, true, now, SystemTime::now(), &mut out) {
            Ok(Action::Send { bytes, .. }) => bytes.to_vec(),
            other => panic!("{other:?}"),
        };
        assert_eq!(reply.len(), 64, "a cookie reply, not a response");
        assert_eq!(p.b.cookie_replies_sent, 1);
        assert!(deliver(&mut p.a, B_ADDR, &reply, now).unwrap().is_empty());
        // The retry carries MAC2 and is answered even under load.
        let later = now + Duration::from_secs(6);
        p.a.tick(later);
        let retry = drain(&mut p.a, later).remove(0);
        let mut d = retry.clone();
        match p.b.receive(A_ADDR.parse().unwrap(), &mut d, true, later, SystemTime::now(), &mut out) {
            Ok(Action::Send { bytes, .. }) => assert_eq!(bytes.len(), 92),
            other => panic!("{other:?}"),
        }
        // The same message from another port has no valid cookie there.
        let mut d = retry.clone();
        match p.b.receive("192.0.2.1:1".parse().unwrap(), &mut d, true, later, SystemTime::now(), &mut out) {
            Ok(Action::Send { bytes, .. }) => assert_eq!(bytes.len(), 64),
            other => panic!("{other:?}"),
        }
        // Garbage MAC1 is dropped silently, under load or not.
        let mut bad = init.clone();
        bad[120] ^= 1;
        assert_eq!(deliver(&mut p.b, A_ADDR, &bad, now), Err(DropReason::InvalidMac1));
    }

    #[test]
    fn keepalive_timer_and_removal() {
        let now = Instant::now();
        let mut p = pair(now);
        handshake(&mut p, now);
        // Data from a, nothing back from b for 10 s: b sends a keepalive.
        let mut out = vec![0u8; 2048];
        let data = match p.a.send(&ipv4([10, 0, 1, 5], [10, 0, 2, 9], b"d"), now, SystemTime::now(), &mut out) {
            Ok(Action::Send { bytes, .. }) => bytes.to_vec(),
            other => panic!("{other:?}"),
        };
        deliver(&mut p.b, A_ADDR, &data, now).unwrap();
        let t = now + Duration::from_secs(10);
        p.b.tick(t);
        let ka = drain(&mut p.b, t);
        assert_eq!(ka.len(), 1);
        assert_eq!(ka[0].len(), 32);
        assert!(!p.b.indices().is_empty());
        assert!(p.b.remove_peer(p.b_peer));
        assert_eq!(p.b.indices().len(), 0, "removing a peer frees its indices");
        assert_eq!(deliver(&mut p.b, A_ADDR, &data, now), Err(DropReason::UnknownIndex));
    }

    #[test]
    fn preshared_key_rotation_in_place() {
        let now = Instant::now();
        let mut p = pair(now);
        handshake(&mut p, now);
        // Only b rotates: the initiation itself does not use the PSK, but a
        // cannot consume b's response (the PSK is mixed into it).
        let new_psk = PresharedKey::generate();
        let update = || PeerUpdate { preshared_key: Some(new_psk.clone()), ..PeerUpdate::default() };
        assert!(p.b.update_peer(p.b_peer, update()));
        assert!(!p.b.update_peer(999, update()), "unknown peer");
        let later = now + Duration::from_secs(6);
        std::thread::sleep(Duration::from_millis(30));
        p.a.initiate(p.a_peer);
        let stale = drain(&mut p.a, later).remove(0);
        let resp = deliver(&mut p.b, A_ADDR, &stale, later).unwrap();
        assert!(matches!(deliver(&mut p.a, B_ADDR, &resp, later), Err(DropReason::Handshake)));
        // Both rotated: the handshake completes. (Initiation timestamps must
        // grow: let the wall clock move past their granularity.)
        std::thread::sleep(Duration::from_millis(30));
        assert!(p.a.update_peer(p.a_peer, update()));
        let much_later = later + Duration::from_secs(6);
        let init = drain(&mut p.a, much_later).remove(0);
        assert_eq!(init.len(), 148, "rotation starts a handshake");
        let resp = deliver(&mut p.b, A_ADDR, &init, much_later).unwrap();
        assert_eq!(resp.len(), 92);
        assert!(deliver(&mut p.a, B_ADDR, &resp, much_later).is_ok());
        assert_eq!(p.a.peer_stats(p.a_peer).unwrap().handshakes, 2, "counters survive the rotation");
    }

    #[test]
    fn garbage_never_panics() {
        let now = Instant::now();
        let mut p = pair(now);
        let mut out = vec![0u8; 2048];
        for len in 0..200usize {
            for first in [0u8, 1, 2, 3, 4, 5, 0x45, 0x60, 0xff] {
                let mut d = vec![first; len];
                if len >= 4 {
                    d[1..4].fill(0);
                }
                let _ = p.a.receive(B_ADDR.parse().unwrap(), &mut d, len % 2 == 0, now, SystemTime::now(), &mut out);
                let _ = p.a.send(&d, now, SystemTime::now(), &mut out);
            }
        }
    }

    #[test]
    fn small_output_buffers_are_counted_drops_not_panics() {
        let now = Instant::now();
        let mut p = pair(now);
        p.a.initiate(p.a_peer);
        let init = drain(&mut p.a, now).remove(0);
        for size in [0usize, 10, 63, 64, 91] {
            let mut out = vec![0u8; size];
            let mut d = init.clone();
            let r = p.b.receive(A_ADDR.parse().unwrap(), &mut d, size < 64, now, SystemTime::now(), &mut out);
            assert_eq!(r.unwrap_err(), DropReason::BufferTooSmall, "{size}-byte buffer");
            let r = p.a.send(&ipv4([10, 0, 1, 5], [10, 0, 2, 9], b"x"), now, SystemTime::now(), &mut out);
            assert!(r.is_err() || matches!(r, Ok(Action::Nothing)), "{size}: {r:?}");
            assert!(p.a.poll_transmit(now, SystemTime::now(), &mut out).is_none());
        }
    }

    #[test]
    fn staging_is_bounded_per_peer_and_counted() {
        let now = Instant::now();
        let mut p = pair(now);
        let mut out = vec![0u8; 2048];
        for i in 0..(MAX_STAGED_PACKETS + 10) {
            let _ = p.a.send(&ipv4([10, 0, 1, 5], [10, 0, 2, 9], &[i as u8; 8]), now, SystemTime::now(), &mut out);
        }
        assert_eq!(p.a.staged_packets(p.a_peer), MAX_STAGED_PACKETS);
        assert_eq!(p.a.drops.get(DropReason::StagingFull), 10, "the oldest were pushed out and counted");
        assert_eq!(p.a.staging().in_use(), MAX_STAGED_PACKETS);
        assert!(p.a.remove_peer(p.a_peer));
        assert_eq!(p.a.staging().in_use(), 0, "removing the peer returns its buffers");
    }

    /// We answered the peer's initiation; a packet for it finds the session
    /// not yet confirmed and waits. The peer's first packet confirms the
    /// session: the waiting packet goes out on it, and no needless initiation
    /// of ours replaces the session the peer just made.
    #[test]
    fn a_packet_waiting_for_our_responder_session_goes_out_once_confirmed() {
        let now = Instant::now();
        let mut p = pair(now);
        p.a.initiate(p.a_peer);
        let init = drain(&mut p.a, now).remove(0);
        let resp = deliver(&mut p.b, A_ADDR, &init, now).unwrap();
        assert!(deliver(&mut p.a, B_ADDR, &resp, now).unwrap().is_empty());
        let _confirm_later = drain(&mut p.a, now);
        // b's session is not confirmed yet: its packet waits, no initiation.
        let mut out = vec![0u8; 2048];
        let waiting = ipv4([10, 0, 2, 9], [10, 0, 1, 5], b"waits");
        let r = p.b.send(&waiting, now, SystemTime::now(), &mut out);
        assert!(matches!(r, Ok(Action::Nothing)), "{r:?}");
        assert_eq!(p.b.staged_packets(p.b_peer), 1);
        // a's data confirms b's session.
        let data = sent_bytes(&mut p.a, &ipv4([10, 0, 1, 5], [10, 0, 2, 9], b"hi"), now);
        deliver(&mut p.b, A_ADDR, &data, now).unwrap();
        let out = drain(&mut p.b, now);
        assert_eq!(
            out.len(),
            1,
            "only the waiting packet, no initiation: {:?}",
            out.iter().map(Vec::len).collect::<Vec<_>>()
        );
        assert_eq!(deliver(&mut p.a, B_ADDR, &out[0], now).unwrap(), waiting);
        // And nothing later either.
        p.b.tick(now + Duration::from_secs(6));
        assert!(drain(&mut p.b, now + Duration::from_secs(6)).iter().all(|m| m.len() != 148));
    }
}
