//! Transport sessions (section 5.4.6): one keypair per completed handshake,
//! counter nonces, padding, and receive-side replay protection.
//!
//! A `Keypair` is shared (`Arc`) between the peer state, the receiver-index
//! table and every worker that sends with it: sending uses an atomic counter.
//! Receiving mutates the replay window, which belongs to exactly one worker:
//! the first `WorkerToken` to open a packet claims the keypair's receive side,
//! and other tokens are refused (the data plane steers a receiver index to one
//! worker). That makes the window single-owner without a lock.

use super::aead::{AeadBackend, TransportKey};
use super::constants::{
    AEAD_TAG_LEN, PADDING_MULTIPLE, REJECT_AFTER_MESSAGES, REJECT_AFTER_TIME, REKEY_AFTER_MESSAGES, REKEY_AFTER_TIME,
};
use super::crypto::counter_nonce;
use super::replay::ReplayWindow;
use crate::wire::{TransportHeader, TRANSPORT_HEADER_LEN};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Why a packet could not be sent on a keypair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("the keypair is past REJECT_AFTER_TIME or REJECT_AFTER_MESSAGES")]
    Expired,
    #[error("the output buffer is too small")]
    BufferTooSmall,
}

/// Why a transport message was dropped. Counted per reason by the data plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ReceiveError {
    #[error("replayed or too old counter")]
    Replay,
    #[error("keypair expired")]
    Expired,
    #[error("authentication failed")]
    Authentication,
    #[error("receive side is owned by another worker")]
    WrongWorker,
}

/// Identifies the one thread allowed to mutate a keypair's receive state.
/// Unique (never cloned, ids from a global counter) and `!Sync`: it can move to
/// another thread (a move orders every earlier use before every later one) but
/// can never be used from two threads at once.
#[derive(Debug)]
pub struct WorkerToken {
    id: u64,
    _not_sync: core::marker::PhantomData<core::cell::Cell<()>>,
}

impl WorkerToken {
    pub fn new() -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        Self { id: NEXT.fetch_add(1, Ordering::Relaxed), _not_sync: core::marker::PhantomData }
    }
}

impl Default for WorkerToken {
    fn default() -> Self {
        Self::new()
    }
}

/// The replay window plus the id of the worker that owns it (0: unclaimed).
struct ReceiveState {
    owner: AtomicU64,
    window: UnsafeCell<ReplayWindow>,
}

// SAFETY: `window` is only touched in `with_window`, after `owner` has been
// claimed by (or already equals) the caller's token id. Token ids are unique and
// tokens are `!Sync`, so no two threads use the same token at once; a token that
// moves between threads carries a happens-before edge with it.
unsafe impl Sync for ReceiveState {}

impl ReceiveState {
    fn with_window<R>(&self, token: &WorkerToken, f: impl FnOnce(&mut ReplayWindow) -> R) -> Result<R, ReceiveError> {
        let owner = self.owner.load(Ordering::Acquire);
        if owner != token.id {
            if owner != 0 {
                return Err(ReceiveError::WrongWorker);
            }
            if self.owner.compare_exchange(0, token.id, Ordering::AcqRel, Ordering::Acquire).is_err() {
                return Err(ReceiveError::WrongWorker);
            }
        }
        // SAFETY: the caller's token owns this state (checked or claimed just above),
        // and `f` cannot reach `with_window` again for this keypair with another token
        // on this thread while the borrow lives, because tokens own their ids.
        Ok(f(unsafe { &mut *self.window.get() }))
    }
}

/// The keys and counters of one session.
pub struct Keypair {
    /// Our index: what the peer puts in the receiver field of its messages.
    pub local_index: u32,
    /// The peer's index: what we put in the receiver field.
    pub remote_index: u32,
    /// Whether we initiated the handshake that made this keypair.
    pub is_initiator: bool,
    pub created: Instant,
    sending: TransportKey,
    receiving: TransportKey,
    send_counter: AtomicU64,
    receive: ReceiveState,
    /// Set once a message authenticated on this keypair: a responder's keypair
    /// is confirmed by its first use.
    used: core::sync::atomic::AtomicBool,
}

impl core::fmt::Debug for Keypair {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Keypair")
            .field("local_index", &format_args!("{:#010x}", self.local_index))
            .field("remote_index", &format_args!("{:#010x}", self.remote_index))
            .field("is_initiator", &self.is_initiator)
            .field("send_counter", &self.send_counter.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// The buffer size `seal` needs for a payload of `len` bytes.
pub const fn sealed_len(payload_len: usize) -> usize {
    TRANSPORT_HEADER_LEN + padded_len(payload_len) + AEAD_TAG_LEN
}

/// Section 5.4.6: plaintext is zero-padded to a multiple of 16 bytes.
pub const fn padded_len(len: usize) -> usize {
    len.div_ceil(PADDING_MULTIPLE) * PADDING_MULTIPLE
}

impl Keypair {
    pub fn new(
        backend: AeadBackend,
        local_index: u32,
        remote_index: u32,
        is_initiator: bool,
        created: Instant,
        send_key: &[u8; 32],
        receive_key: &[u8; 32],
    ) -> Self {
        Self {
            local_index,
            remote_index,
            is_initiator,
            created,
            sending: TransportKey::new(backend, send_key),
            receiving: TransportKey::new(backend, receive_key),
            send_counter: AtomicU64::new(0),
            receive: ReceiveState { owner: AtomicU64::new(0), window: UnsafeCell::new(ReplayWindow::default()) },
            used: core::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Counters used so far for sending.
    pub fn sent_messages(&self) -> u64 {
        self.send_counter.load(Ordering::Relaxed)
    }

    /// True once a message authenticated on this keypair.
    pub fn was_used(&self) -> bool {
        self.used.load(Ordering::Relaxed)
    }

    /// True once the keypair may no longer send or receive.
    pub fn is_expired(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.created) >= REJECT_AFTER_TIME
    }

    /// Section 6.2: an initiator starts a new handshake when sending on a keypair
    /// this old or this used.
    pub fn needs_rekey_for_send(&self, now: Instant) -> bool {
        self.sent_messages() >= REKEY_AFTER_MESSAGES
            || (self.is_initiator && now.saturating_duration_since(self.created) >= REKEY_AFTER_TIME)
    }

    /// Encrypts in place. `buf[16..16 + payload_len]` holds the plaintext on entry;
    /// `buf` must be at least `sealed_len(payload_len)` long. Writes the header,
    /// the zero padding and the tag, and returns the message length.
    pub fn seal(&self, buf: &mut [u8], payload_len: usize, now: Instant) -> Result<usize, SendError> {
        let total = sealed_len(payload_len);
        if buf.len() < total {
            return Err(SendError::BufferTooSmall);
        }
        if self.is_expired(now) {
            return Err(SendError::Expired);
        }
        let counter = self.send_counter.fetch_add(1, Ordering::Relaxed);
        if counter >= REJECT_AFTER_MESSAGES {
            // Keep the counter pinned so it can never wrap around.
            self.send_counter.store(REJECT_AFTER_MESSAGES, Ordering::Relaxed);
            return Err(SendError::Expired);
        }
        let msg = &mut buf[..total];
        msg[TRANSPORT_HEADER_LEN + payload_len..total - AEAD_TAG_LEN].fill(0);
        let mut header =
            TransportHeader::emit(msg, self.remote_index, counter).map_err(|_| SendError::BufferTooSmall)?;
        self.sending.seal(&counter_nonce(counter), &[], header.encrypted_mut());
        Ok(total)
    }

    /// Copies `payload` behind a header in `out` and seals it; returns the length.
    pub fn encrypt(&self, payload: &[u8], out: &mut [u8], now: Instant) -> Result<usize, SendError> {
        if out.len() < sealed_len(payload.len()) {
            return Err(SendError::BufferTooSmall);
        }
        out[TRANSPORT_HEADER_LEN..TRANSPORT_HEADER_LEN + payload.len()].copy_from_slice(payload);
        self.seal(out, payload.len(), now)
    }

    /// Authenticates and decrypts a transport message in place and returns its
    /// padded plaintext (empty for a keepalive). Order: cheap replay check, age,
    /// AEAD, then the replay window records the counter.
    pub fn open<'a>(
        &self,
        token: &WorkerToken,
        msg: TransportHeader<&'a mut [u8]>,
        now: Instant,
    ) -> Result<&'a mut [u8], ReceiveError> {
        let counter = msg.counter();
        if !self.receive.with_window(token, |w| w.check(counter))? {
            return Err(ReceiveError::Replay);
        }
        if self.is_expired(now) {
            return Err(ReceiveError::Expired);
        }
        let buf = msg.into_inner();
        let encrypted = &mut buf[TRANSPORT_HEADER_LEN..];
        let plain =
            self.receiving.open(&counter_nonce(counter), &[], encrypted).map_err(|_| ReceiveError::Authentication)?;
        if !self.receive.with_window(token, |w| w.update(counter))? {
            return Err(ReceiveError::Replay);
        }
        if !self.used.load(Ordering::Relaxed) {
            self.used.store(true, Ordering::Relaxed);
        }
        Ok(plain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn pair(now: Instant) -> (Keypair, Keypair) {
        let (k1, k2) = ([1u8; 32], [2u8; 32]);
        (
            Keypair::new(AeadBackend::Ring, 10, 20, true, now, &k1, &k2),
            Keypair::new(AeadBackend::RustCrypto, 20, 10, false, now, &k2, &k1),
        )
    }

    #[test]
    fn seal_open_pads_and_rejects_replay_and_tamper() {
        let now = Instant::now();
        let (a, b) = pair(now);
        let token = WorkerToken::new();
        let mut buf = [0u8; 128];
        let n = a.encrypt(b"hello", &mut buf, now).unwrap();
        assert_eq!(n, 16 + 16 + 16, "5 bytes pad to 16");
        let sent = buf;
        let msg = TransportHeader::new_checked(&mut buf[..n]).unwrap();
        assert_eq!(msg.receiver(), 20);
        let plain = b.open(&token, msg, now).unwrap();
        assert_eq!(&plain[..5], b"hello");
        assert!(plain[5..].iter().all(|&x| x == 0));

        let mut replay = sent;
        let msg = TransportHeader::new_checked(&mut replay[..n]).unwrap();
        assert_eq!(b.open(&token, msg, now).unwrap_err(), ReceiveError::Replay);

        let n2 = a.encrypt(b"world", &mut buf, now).unwrap();
        buf[20] ^= 0x01;
        let msg = TransportHeader::new_checked(&mut buf[..n2]).unwrap();
        assert_eq!(b.open(&token, msg, now).unwrap_err(), ReceiveError::Authentication);
        // A forged packet must not consume its counter: the genuine one still opens.
        buf[20] ^= 0x01;
        let msg = TransportHeader::new_checked(&mut buf[..n2]).unwrap();
        assert!(b.open(&token, msg, now).is_ok());
    }

    #[test]
    fn keepalive_is_empty_and_expiry_is_enforced() {
        let now = Instant::now();
        let (a, b) = pair(now);
        let token = WorkerToken::new();
        let mut buf = [0u8; 32];
        assert_eq!(a.encrypt(&[], &mut buf, now).unwrap(), 32);
        let msg = TransportHeader::new_checked(&mut buf[..]).unwrap();
        assert_eq!(b.open(&token, msg, now).unwrap().len(), 0);
        let late = now + REJECT_AFTER_TIME;
        assert_eq!(a.encrypt(&[], &mut buf, late).unwrap_err(), SendError::Expired);
        assert!(a.needs_rekey_for_send(now + REKEY_AFTER_TIME));
        assert!(!b.needs_rekey_for_send(now + REKEY_AFTER_TIME), "only the initiator rekeys on age");
    }

    #[test]
    fn receive_side_belongs_to_one_worker() {
        let now = Instant::now();
        let (a, b) = pair(now);
        let (t1, t2) = (WorkerToken::new(), WorkerToken::new());
        let mut buf = [0u8; 64];
        let n = a.encrypt(b"x", &mut buf, now).unwrap();
        let mut copy = buf;
        b.open(&t1, TransportHeader::new_checked(&mut buf[..n]).unwrap(), now).unwrap();
        let err = b.open(&t2, TransportHeader::new_checked(&mut copy[..n]).unwrap(), now).unwrap_err();
        assert_eq!(err, ReceiveError::WrongWorker);
    }

    #[test]
    fn send_counter_stops_at_the_limit() {
        let now = Instant::now();
        let (a, _) = pair(now);
        a.send_counter.store(REJECT_AFTER_MESSAGES - 1, Ordering::Relaxed);
        let mut buf = [0u8; 32];
        assert!(a.encrypt(&[], &mut buf, now).is_ok());
        assert_eq!(a.encrypt(&[], &mut buf, now).unwrap_err(), SendError::Expired);
        assert_eq!(a.encrypt(&[], &mut buf, now).unwrap_err(), SendError::Expired);
    }
}
