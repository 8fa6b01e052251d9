//! The transport-data path (section 5.4.6), once, for every caller: the
//! per-queue `Worker` (frames from AF_XDP), the kernel slow path and the
//! I/O-free `Device` all open and seal through here.
//!
//! Receive: receiver index → keypair → lock-free stale-counter check → age →
//! AEAD open in place → replay window records the counter → roaming (the
//! endpoint follows the last authenticated packet, section 2.1) → inner
//! packet parse → allowed-IPs source check (cryptokey routing) → activity and
//! per-peer counters. Send: the peer's published keypair → counter → pad →
//! seal → activity and counters.
//!
//! Activity is recorded in the peer's `PeerView` (atomics); the control thread
//! turns it into timer events (`Device::sync_peer`). Nothing here allocates or
//! takes a lock a writer can hold.

use crate::drops::DropReason;
use crate::frame::{parse_ip_frame_payload, InnerPacket};
use crate::noise::session::{Keypair, ReceiveError, SendError};
use crate::peer_view::{Endpoint, PeerId, PeerViews};
use crate::snapshot::{PeerTally, Snapshot};
use crate::table::{IndexTable, SharedAllowedIps};
use crate::wire::{TransportHeader, TRANSPORT_HEADER_LEN};
use std::sync::Arc;
use std::time::Instant;

/// What a receiver index points at: a handshake we initiated (no keypair yet),
/// or a session's keypair.
#[derive(Debug, Clone)]
pub struct IndexValue {
    pub peer: PeerId,
    pub keypair: Option<Arc<Keypair>>,
}

/// The shared tables the transport path reads: written by the control thread,
/// read lock-free by everyone.
#[derive(Debug, Clone)]
pub struct Tables {
    pub indices: Arc<IndexTable<IndexValue>>,
    pub allowed_ips: Arc<SharedAllowedIps<PeerId>>,
    pub views: Arc<PeerViews>,
}

impl Tables {
    pub fn new(index_slot_bits: u32) -> Self {
        Self {
            indices: Arc::new(IndexTable::new(index_slot_bits)),
            allowed_ips: Arc::new(SharedAllowedIps::default()),
            views: Arc::new(PeerViews::default()),
        }
    }
}

/// An authenticated transport message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opened {
    /// An empty message (section 6.5).
    Keepalive { peer: PeerId },
    /// An inner packet from `peer`, at the start of the buffer, `inner.len`
    /// bytes long (padding excluded); its source is one of the peer's allowed IPs.
    Data { peer: PeerId, inner: InnerPacket },
}

impl Opened {
    pub fn peer(&self) -> PeerId {
        match *self {
            Self::Keepalive { peer } | Self::Data { peer, .. } => peer,
        }
    }
}

impl From<ReceiveError> for DropReason {
    fn from(e: ReceiveError) -> Self {
        match e {
            ReceiveError::Replay => DropReason::Replay,
            ReceiveError::Expired => DropReason::Expired,
            ReceiveError::Authentication => DropReason::Authentication,
        }
    }
}

/// Opens the transport message at `buf[message_at..]` (a whole UDP payload)
/// that arrived from `from`, through the caller's `snapshot` of the tables (a
/// worker keeps one per batch). The inner packet is decrypted to the start of
/// `buf` (a worker leaves room for an Ethernet header before it; 0 opens in
/// place). The peer's counters, activity and endpoint are added to the
/// snapshot's tally and written back with it.
///
/// Three steps, which a worker with crypto threads runs apart (`incoming` and
/// `accept` on the owning thread, in arrival order; the AEAD on any thread):
/// this is the same path in one go.
pub fn open(
    snapshot: &mut Snapshot<'_>,
    buf: &mut [u8],
    message_at: usize,
    from: Endpoint,
    now: Instant,
) -> Result<Opened, DropReason> {
    let (peer, plain_len) = {
        let incoming = incoming(snapshot, buf.get(message_at..).ok_or(DropReason::Malformed)?, now)?;
        let keypair = incoming.keypair;
        let plain_len = keypair.decrypt(incoming.counter, buf, message_at + TRANSPORT_HEADER_LEN)?;
        keypair.accept_counter(incoming.counter)?;
        (incoming.peer, plain_len)
    };
    accepted(snapshot, peer, &buf[..plain_len], from, now)
}

/// A transport message whose keypair is known and whose counter is not
/// certainly stale: what the AEAD needs.
#[derive(Debug)]
pub struct Incoming<'s> {
    pub peer: PeerId,
    pub keypair: &'s Arc<Keypair>,
    pub counter: u64,
}

/// The first step of `open`, before the AEAD: receiver index → keypair, the
/// lock-free stale-counter check and the keypair's age.
pub fn incoming<'s>(snapshot: &'s mut Snapshot<'_>, message: &[u8], now: Instant) -> Result<Incoming<'s>, DropReason> {
    let header = TransportHeader::new_checked(message).map_err(|_| DropReason::Malformed)?;
    let (receiver, counter) = (header.receiver(), header.counter());
    let entry = snapshot.index(receiver).ok_or(DropReason::UnknownIndex)?;
    let peer = entry.value.peer;
    let keypair = entry.value.keypair.as_ref().ok_or(DropReason::UnknownIndex)?;
    keypair.check_counter(counter, now)?;
    Ok(Incoming { peer, keypair, counter })
}

/// The last step of `open`, for a message the AEAD authenticated (its padded
/// plaintext `plain`, empty for a keepalive), in the order the owning thread
/// delivers: the replay window records the counter, then the peer is alive
/// and may have roamed, and an inner packet is checked against its allowed IPs.
pub fn accept(
    snapshot: &mut Snapshot<'_>,
    keypair: &Keypair,
    peer: PeerId,
    counter: u64,
    plain: &[u8],
    from: Endpoint,
    now: Instant,
) -> Result<Opened, DropReason> {
    keypair.accept_counter(counter)?;
    accepted(snapshot, peer, plain, from, now)
}

/// After the replay window took the counter: activity, roaming, the inner
/// packet and its source.
fn accepted(
    snapshot: &mut Snapshot<'_>,
    peer: PeerId,
    plain: &[u8],
    from: Endpoint,
    now: Instant,
) -> Result<Opened, DropReason> {
    if plain.is_empty() {
        snapshot.received_from(peer)?.received(from, 0, now);
        return Ok(Opened::Keepalive { peer });
    }
    let inner = parse_ip_frame_payload(plain).map_err(|_| DropReason::BadInnerPacket);
    // Authenticated: the peer is alive and may have roamed, whatever it sent.
    let source_ok = inner.map(|inner| snapshot.owner_of(inner.src) == Some(peer));
    let tally = snapshot.received_from(peer)?;
    match (inner, source_ok) {
        (Ok(inner), Ok(true)) => {
            tally.received(from, inner.len, now);
            Ok(Opened::Data { peer, inner })
        }
        (_, Ok(false)) => {
            tally.received(from, 0, now);
            Err(DropReason::SourceNotAllowed)
        }
        (Err(reason), _) | (_, Err(reason)) => {
            tally.received(from, 0, now);
            Err(reason)
        }
    }
}

/// Why `seal` did not produce a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SealError {
    /// No usable session (none yet, or expired): stage and handshake.
    NoSession,
    BufferTooSmall,
}

/// Seals `buf[16..16 + len]` (the inner packet, already in place; empty for a
/// keepalive) on the keypair `tally` holds for its peer into a transport
/// message at the start of `buf`, and returns the message length
/// (`sealed_len(len)`).
///
/// Two steps, which a worker with crypto threads runs apart (`reserve_seal`
/// on the owning thread, in order; the rest on any thread): this is the same
/// path in one go.
pub fn seal(tally: &mut PeerTally, buf: &mut [u8], len: usize, now: Instant) -> Result<usize, SealError> {
    let kp = tally.keypair().ok_or(SealError::NoSession)?;
    let n = kp.seal(buf, len, now).map_err(SealError::from)?;
    tally.sent(len, now);
    Ok(n)
}

impl From<SendError> for SealError {
    fn from(e: SendError) -> Self {
        match e {
            SendError::Expired => Self::NoSession,
            SendError::BufferTooSmall => Self::BufferTooSmall,
        }
    }
}

/// The first step of `seal`, on the thread that owns the send order: the
/// next counter (the nonce) of the keypair `tally` holds, and the peer's
/// counters for a packet of `len` bytes. `Keypair::frame_message` and
/// `Keypair::encrypt_message` (any thread) finish the message.
pub fn reserve_seal(tally: &mut PeerTally, len: usize, now: Instant) -> Result<u64, SealError> {
    let kp = tally.keypair().ok_or(SealError::NoSession)?;
    let counter = kp.reserve_counter(now).map_err(SealError::from)?;
    tally.sent(len, now);
    Ok(counter)
}
