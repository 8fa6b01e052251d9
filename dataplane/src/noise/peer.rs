//! One remote peer's protocol state (I/O-free): handshake in progress, the
//! current / previous / next keypairs, the cookie jar, timers and the replay
//! defences on initiations. The caller owns the receiver-index table and the
//! sockets: each method says which local indices it created or retired.

use super::aead::AeadBackend;
use super::constants::{
    INITIATIONS_MIN_INTERVAL, KEEPALIVE_TIMEOUT, REJECT_AFTER_MESSAGES, REJECT_AFTER_TIME, REKEY_TIMEOUT,
};
use super::cookie::{CookieJar, MacKeys};
use super::crypto::AeadError;
use super::handshake::{
    consume_response, create_initiation, create_response, ConsumedInitiation, HandshakeError, InitiatorState, PeerKeys,
    StaticIdentity,
};
use super::keys::{PresharedKey, PublicKey};
use super::session::Keypair;
use super::tai64n::Tai64N;
use super::timers::{TimerActions, Timers};
use crate::wire::{CookieReply, HandshakeInitiation, HandshakeResponse};
use rand_core::{OsRng, RngCore};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// How a peer is configured.
#[derive(Debug, Clone)]
pub struct PeerConfig {
    pub public_key: PublicKey,
    pub preshared_key: PresharedKey,
    pub persistent_keepalive: Option<Duration>,
}

/// Local indices that stopped being valid; remove them from the index table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retired {
    indices: [Option<u32>; 4],
}

impl Retired {
    fn push(&mut self, index: u32) {
        if let Some(slot) = self.indices.iter_mut().find(|s| s.is_none()) {
            *slot = Some(index);
        }
    }

    fn push_keypair(&mut self, kp: Option<Arc<Keypair>>) {
        if let Some(kp) = kp {
            self.push(kp.local_index);
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.indices.iter().flatten().copied()
    }
}

#[derive(Debug, Default)]
struct Keypairs {
    current: Option<Arc<Keypair>>,
    previous: Option<Arc<Keypair>>,
    /// A responder's keypair, unconfirmed until the initiator first uses it.
    next: Option<Arc<Keypair>>,
}

pub struct Peer {
    keys: PeerKeys,
    mac_keys: MacKeys,
    backend: AeadBackend,
    cookies: CookieJar,
    handshake: Option<InitiatorState>,
    keypairs: Keypairs,
    pub timers: Timers,
    latest_timestamp: Option<Tai64N>,
    last_initiation_received: Option<Instant>,
    last_initiation_sent: Option<Instant>,
    /// Set when we already started a handshake because a session is near
    /// REJECT_AFTER_TIME on receive (so we do it once per session).
    sent_last_minute_handshake: bool,
    last_handshake: Option<SystemTime>,
}

impl core::fmt::Debug for Peer {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Peer")
            .field("public_key", &self.keys.remote_static)
            .field("keypairs", &self.keypairs)
            .finish_non_exhaustive()
    }
}

impl Peer {
    pub fn new(local: &StaticIdentity, config: PeerConfig, backend: AeadBackend) -> Result<Self, HandshakeError> {
        Ok(Self {
            mac_keys: MacKeys::new(&config.public_key),
            keys: PeerKeys::new(local, config.public_key, config.preshared_key)?,
            backend,
            cookies: CookieJar::default(),
            handshake: None,
            keypairs: Keypairs::default(),
            timers: Timers::new(config.persistent_keepalive),
            latest_timestamp: None,
            last_initiation_received: None,
            last_initiation_sent: None,
            sent_last_minute_handshake: false,
            last_handshake: None,
        })
    }

    pub fn public_key(&self) -> &PublicKey {
        &self.keys.remote_static
    }

    pub fn keys(&self) -> &PeerKeys {
        &self.keys
    }

    /// Uses a new pre-shared key from the next handshake on; the current
    /// session keeps its keys until it is replaced.
    pub fn set_preshared_key(&mut self, psk: PresharedKey) {
        self.keys.psk = psk;
    }

    pub fn set_persistent_keepalive(&mut self, interval: Option<Duration>) {
        self.timers.persistent_keepalive = interval;
    }

    /// Wall-clock time of the last completed handshake.
    pub fn last_handshake(&self) -> Option<SystemTime> {
        self.last_handshake
    }

    pub fn current_keypair(&self) -> Option<&Arc<Keypair>> {
        self.keypairs.current.as_ref()
    }

    /// True when the current keypair can still send: present, younger than
    /// REJECT_AFTER_TIME and below REJECT_AFTER_MESSAGES. Without one, traffic
    /// for the peer waits for a new handshake.
    pub fn has_usable_session(&self, now: Instant) -> bool {
        self.keypairs.current.as_ref().is_some_and(|k| !k.is_expired(now) && k.sent_messages() < REJECT_AFTER_MESSAGES)
    }

    /// The local index of the handshake in progress, if any.
    pub fn handshake_index(&self) -> Option<u32> {
        self.handshake.as_ref().map(|h| h.local_index)
    }

    /// Initiations are sent at most once per REKEY_TIMEOUT (section 6.1).
    pub fn may_initiate(&self, now: Instant) -> bool {
        self.last_initiation_sent.is_none_or(|t| now.saturating_duration_since(t) >= REKEY_TIMEOUT)
    }

    /// Writes a complete initiation (body and MACs) into `out` using `local_index`.
    /// A handshake already in progress is replaced; its index is retired.
    pub fn write_initiation(
        &mut self,
        local: &StaticIdentity,
        local_index: u32,
        retry: bool,
        now: Instant,
        wall: SystemTime,
        out: &mut [u8; 148],
    ) -> Result<Retired, HandshakeError> {
        let mut retired = Retired::default();
        let mut msg = HandshakeInitiation::new_zeroed(&mut out[..]).expect("148 bytes is an initiation");
        let state = create_initiation(local, &self.keys, local_index, Tai64N::from_system_time(wall), now, &mut msg)?;
        self.cookies.stamp(&self.mac_keys, &mut out[..], now);
        if let Some(old) = self.handshake.replace(state) {
            retired.push(old.local_index);
        }
        self.last_initiation_sent = Some(now);
        self.timers.on_initiation_sent(now, jitter(), retry);
        Ok(retired)
    }

    /// Answers a consumed initiation from this peer: checks that its timestamp is
    /// newer than any before (replay) and that initiations are not flooding,
    /// writes the response into `out`, and installs the new keypair as `next`.
    pub fn write_response(
        &mut self,
        init: &ConsumedInitiation,
        local_index: u32,
        now: Instant,
        out: &mut [u8; 92],
    ) -> Result<(Arc<Keypair>, Retired), HandshakeError> {
        if init.remote_static != self.keys.remote_static {
            return Err(HandshakeError::UnknownPeer);
        }
        if self.latest_timestamp.is_some_and(|t| init.timestamp <= t) {
            return Err(HandshakeError::ReplayedInitiation);
        }
        if self.last_initiation_received.is_some_and(|t| now.saturating_duration_since(t) < INITIATIONS_MIN_INTERVAL) {
            return Err(HandshakeError::Flood);
        }
        let mut msg = HandshakeResponse::new_zeroed(&mut out[..]).expect("92 bytes is a response");
        let keypair = Arc::new(create_response(init, &self.keys, local_index, self.backend, now, &mut msg)?);
        self.cookies.stamp(&self.mac_keys, &mut out[..], now);
        self.latest_timestamp = Some(init.timestamp);
        self.last_initiation_received = Some(now);
        // As the kernel does: a response counts as a handshake message sent,
        // so we do not cross it with an initiation of our own for
        // REKEY_TIMEOUT (which would replace the session the peer is using).
        self.last_initiation_sent = Some(now);

        let mut retired = Retired::default();
        // A responder's keypair waits in `next` until the initiator uses it.
        retired.push_keypair(self.keypairs.next.replace(keypair.clone()));
        self.timers.on_session_derived(now);
        self.timers.on_authenticated_sent(now);
        Ok((keypair, retired))
    }

    /// Consumes a response to our initiation and makes its keypair current.
    pub fn consume_response(
        &mut self,
        local: &StaticIdentity,
        msg: &HandshakeResponse<&[u8]>,
        now: Instant,
        wall: SystemTime,
    ) -> Result<(Arc<Keypair>, Retired), HandshakeError> {
        let state = self.handshake.as_ref().ok_or(HandshakeError::UnexpectedResponse)?;
        let keypair = Arc::new(consume_response(state, local, &self.keys, msg, self.backend, now)?);
        self.handshake = None;
        let mut retired = Retired::default();
        // Initiator: the new keypair is current at once. If the peer also
        // completed a handshake with us (an unconfirmed `next`, which it may
        // already be sending on), that one becomes previous so its packets
        // still open; otherwise the old current does (as the kernel does).
        let k = &mut self.keypairs;
        retired.push_keypair(k.previous.take());
        match k.next.take() {
            Some(next) => {
                retired.push_keypair(k.current.take());
                k.previous = Some(next);
            }
            None => k.previous = k.current.take(),
        }
        k.current = Some(keypair.clone());
        self.sent_last_minute_handshake = false;
        self.last_handshake = Some(wall);
        self.timers.on_handshake_complete();
        self.timers.on_session_derived(now);
        self.timers.on_authenticated_received(now);
        Ok((keypair, retired))
    }

    /// Stores the cookie from a reply to our last handshake message.
    pub fn consume_cookie_reply(&mut self, msg: &CookieReply<&[u8]>, now: Instant) -> Result<(), AeadError> {
        self.cookies.consume_reply(&self.mac_keys, msg, now)
    }

    /// True while our last response's keypair waits in `next` unused: the
    /// initiator has not (yet) completed that handshake. A new initiation
    /// from it then means the last one failed on its side (a wrong
    /// pre-shared key, or a response lost on the way).
    pub fn response_unconfirmed(&self) -> bool {
        self.keypairs.next.as_ref().is_some_and(|k| !k.was_used())
    }

    /// Promotes `next` to current if `keypair` is it: the initiator used the
    /// responder's new keypair, which confirms it.
    fn confirm_next(&mut self, keypair: &Arc<Keypair>, wall: SystemTime) -> Retired {
        let mut retired = Retired::default();
        let k = &mut self.keypairs;
        if k.next.as_ref().is_some_and(|n| Arc::ptr_eq(n, keypair)) {
            retired.push_keypair(k.previous.take());
            k.previous = k.current.take();
            k.current = k.next.take();
            self.last_handshake = Some(wall);
            self.timers.on_handshake_complete();
        }
        retired
    }

    /// For traffic handled outside this object (data-plane workers): promotes a
    /// `next` keypair that a worker authenticated a message on.
    pub fn confirm_next_if_used(&mut self, wall: SystemTime) -> Retired {
        match self.keypairs.next.clone() {
            Some(next) if next.was_used() => self.confirm_next(&next, wall),
            _ => Retired::default(),
        }
    }

    /// Section 6.2: an initiator receiving on a session close to
    /// REJECT_AFTER_TIME starts a new handshake, once per session.
    fn rekey_on_receive_due(&mut self, keypair: &Keypair, now: Instant) -> bool {
        let due = !self.sent_last_minute_handshake
            && self.handshake.is_none()
            && now.saturating_duration_since(keypair.created) >= REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT;
        if due {
            self.sent_last_minute_handshake = true;
        }
        due
    }

    /// The rekey rules of section 6.2 for traffic handled outside this object:
    /// `sent`/`received` say whether data went that way on the current keypair.
    pub fn rekey_due(&mut self, now: Instant, sent: bool, received: bool) -> bool {
        let Some(kp) = self.keypairs.current.clone() else { return false };
        if self.handshake.is_some() {
            return false;
        }
        (sent && kp.needs_rekey_for_send(now)) || (received && kp.is_initiator && self.rekey_on_receive_due(&kp, now))
    }

    /// Runs due timers. When keys are zeroed, their indices are returned.
    pub fn tick(&mut self, now: Instant) -> (TimerActions, Retired) {
        let mut actions = self.timers.poll(now);
        let mut retired = Retired::default();
        if actions.gave_up {
            if let Some(h) = self.handshake.take() {
                retired.push(h.local_index);
            }
        }
        if actions.zero_keys {
            // Both may fire in one tick: keep the handshake index retired above.
            for index in self.zero_keys().iter() {
                retired.push(index);
            }
            actions.send_initiation = false;
        }
        if actions.send_keepalive && !self.has_usable_session(now) {
            // As the kernel does: the keepalive waits for a new session, so a
            // persistent keepalive keeps an idle tunnel (and its NAT) alive.
            actions.send_keepalive = false;
            if !actions.zero_keys && !actions.gave_up {
                actions.send_initiation = true;
            }
        }
        (actions, retired)
    }

    /// Drops every keypair and the handshake state (their keys zeroize on drop).
    pub fn zero_keys(&mut self) -> Retired {
        let mut retired = Retired::default();
        let k = &mut self.keypairs;
        retired.push_keypair(k.current.take());
        retired.push_keypair(k.previous.take());
        retired.push_keypair(k.next.take());
        if let Some(h) = self.handshake.take() {
            retired.push(h.local_index);
        }
        retired
    }
}

/// A uniform value in [0, 1) for timer jitter.
fn jitter() -> f64 {
    f64::from(OsRng.next_u32()) / (f64::from(u32::MAX) + 1.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::noise::handshake::consume_initiation_static;
    use crate::noise::keys::PrivateKey;
    use crate::wire::TransportHeader;

    static BASE: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);

    struct Side {
        id: StaticIdentity,
        peer: Peer,
    }

    fn sides() -> (Side, Side) {
        let a = StaticIdentity::new(PrivateKey::generate());
        let b = StaticIdentity::new(PrivateKey::generate());
        let psk = PresharedKey::generate();
        let cfg = |pk| PeerConfig { public_key: pk, preshared_key: psk.clone(), persistent_keepalive: None };
        let pa = Peer::new(&a, cfg(b.public), AeadBackend::Ring).unwrap();
        let pb = Peer::new(&b, cfg(a.public), AeadBackend::Ring).unwrap();
        (Side { id: a, peer: pa }, Side { id: b, peer: pb })
    }

    /// i initiates to r; returns (i's keypair, r's keypair).
    fn handshake(i: &mut Side, r: &mut Side, idx: (u32, u32), now: Instant) -> (Arc<Keypair>, Arc<Keypair>) {
        // Wall clock advancing with `now`, so TAI64N timestamps keep increasing.
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000) + now.duration_since(*BASE);
        let mut init = [0u8; 148];
        i.peer.write_initiation(&i.id, idx.0, false, now, wall, &mut init).unwrap();
        let view = HandshakeInitiation::new_checked(&init[..]).unwrap();
        let consumed = consume_initiation_static(&r.id, &view).unwrap().finish(r.peer.keys(), &view).unwrap();
        let mut resp = [0u8; 92];
        let (rk, _) = r.peer.write_response(&consumed, idx.1, now, &mut resp).unwrap();
        let view = HandshakeResponse::new_checked(&resp[..]).unwrap();
        let (ik, _) = i.peer.consume_response(&i.id, &view, now, SystemTime::now()).unwrap();
        (ik, rk)
    }

    /// Sends on `from`'s current keypair; `to` opens on `to_kp` and confirms it.
    fn send(from: &mut Side, to: &mut Side, to_kp: &Arc<Keypair>, payload: &[u8], now: Instant) -> Vec<u8> {
        let mut buf = [0u8; 256];
        let n = from.peer.current_keypair().unwrap().encrypt(payload, &mut buf, now).unwrap();
        let plain = to_kp.open(TransportHeader::new_checked(&mut buf[..n]).unwrap(), now).unwrap().to_vec();
        to.peer.confirm_next_if_used(SystemTime::now());
        plain
    }

    #[test]
    fn responder_promotes_next_on_first_data_and_rotation_keeps_old_sessions() {
        let (mut a, mut b) = sides();
        let now = *BASE;
        let (ak1, bk1) = handshake(&mut a, &mut b, (1, 2), now);
        assert!(b.peer.current_keypair().is_none(), "unconfirmed until used");
        assert!(!b.peer.has_usable_session(now));
        assert_eq!(&send(&mut a, &mut b, &bk1, b"hi", now)[..2], b"hi");
        assert!(Arc::ptr_eq(b.peer.current_keypair().unwrap(), &bk1));
        assert_eq!(&send(&mut b, &mut a, &ak1, b"yo", now)[..2], b"yo");

        // Rekey, b initiating this time. Packets in flight on the old keypair still open.
        let mut in_flight = [0u8; 64];
        let n = a.peer.current_keypair().unwrap().encrypt(b"old", &mut in_flight, now).unwrap();
        let later = now + Duration::from_secs(1);
        let (bk2, ak2) = handshake(&mut b, &mut a, (3, 4), later);
        assert!(Arc::ptr_eq(b.peer.current_keypair().unwrap(), &bk2));
        let msg = TransportHeader::new_checked(&mut in_flight[..n]).unwrap();
        assert_eq!(&bk1.open(msg, later).unwrap()[..3], b"old");
        // a still sends on the old current until b's new keypair is used...
        assert!(Arc::ptr_eq(a.peer.current_keypair().unwrap(), &ak1));
        send(&mut b, &mut a, &ak2, b"new", later);
        assert!(Arc::ptr_eq(a.peer.current_keypair().unwrap(), &ak2));
        // ...and a third handshake retires the oldest keypair.
        let (_, _) = handshake(&mut b, &mut a, (5, 6), later + Duration::from_secs(1));
        let mut init = [0u8; 148];
        let retired = b.peer.write_initiation(&b.id, 7, false, later, SystemTime::now(), &mut init).unwrap();
        assert_eq!(retired.iter().count(), 0, "no handshake was pending");
        let retired = b.peer.write_initiation(&b.id, 8, true, later, SystemTime::now(), &mut init).unwrap();
        assert_eq!(retired.iter().collect::<Vec<_>>(), vec![7]);
    }

    #[test]
    fn replayed_and_flooding_initiations_are_refused() {
        let (mut a, mut b) = sides();
        let now = Instant::now();
        let mut init = [0u8; 148];
        a.peer.write_initiation(&a.id, 1, false, now, SystemTime::now(), &mut init).unwrap();
        let view = HandshakeInitiation::new_checked(&init[..]).unwrap();
        let consumed = consume_initiation_static(&b.id, &view).unwrap().finish(b.peer.keys(), &view).unwrap();
        let mut resp = [0u8; 92];
        b.peer.write_response(&consumed, 2, now, &mut resp).unwrap();
        let again = now + Duration::from_secs(1);
        assert_eq!(
            b.peer.write_response(&consumed, 3, again, &mut resp).unwrap_err(),
            HandshakeError::ReplayedInitiation
        );
        // A newer initiation arriving within 50 ms of the last is a flood.
        let mut init2 = [0u8; 148];
        let wall = SystemTime::now() + Duration::from_secs(1);
        a.peer.write_initiation(&a.id, 4, false, now, wall, &mut init2).unwrap();
        let view = HandshakeInitiation::new_checked(&init2[..]).unwrap();
        let consumed2 = consume_initiation_static(&b.id, &view).unwrap().finish(b.peer.keys(), &view).unwrap();
        assert_eq!(
            b.peer.write_response(&consumed2, 5, now + Duration::from_millis(10), &mut resp).unwrap_err(),
            HandshakeError::Flood
        );
        assert!(b.peer.write_response(&consumed2, 5, now + Duration::from_millis(60), &mut resp).is_ok());
    }

    #[test]
    fn zeroing_retires_every_index() {
        let (mut a, mut b) = sides();
        let now = Instant::now();
        let (_, bk) = handshake(&mut a, &mut b, (1, 2), now);
        send(&mut a, &mut b, &bk, b"x", now);
        let (actions, retired) = b.peer.tick(now + crate::noise::constants::ZERO_KEYS_AFTER);
        assert!(actions.zero_keys);
        assert_eq!(retired.iter().collect::<Vec<_>>(), vec![2]);
        assert!(b.peer.current_keypair().is_none());
    }

    /// "Gave up" and "zero keys" firing in one tick used to lose the pending
    /// handshake's index (zeroing overwrote the list of retired indices).
    #[test]
    fn giving_up_and_zeroing_in_one_tick_retire_every_index() {
        let (mut a, mut b) = sides();
        let now = Instant::now();
        let (_, _) = handshake(&mut a, &mut b, (1, 2), now);
        // A retry series starts long after the session; both deadlines then
        // pass before the next tick.
        let later = now + crate::noise::constants::ZERO_KEYS_AFTER - Duration::from_secs(1);
        let mut init = [0u8; 148];
        a.peer.write_initiation(&a.id, 3, false, later, SystemTime::now(), &mut init).unwrap();
        let much_later = later + crate::noise::constants::REKEY_ATTEMPT_TIME + Duration::from_secs(10);
        a.peer.timers.on_initiation_sent(much_later - Duration::from_secs(6), 0.0, true);
        let (actions, retired) = a.peer.tick(much_later);
        assert!(actions.gave_up && actions.zero_keys, "{actions:?}");
        let mut got: Vec<u32> = retired.iter().collect();
        got.sort_unstable();
        assert_eq!(got, vec![1, 3], "the session's index and the abandoned handshake's");
    }
}
