//! Transport sessions (section 5.4.6): one keypair per completed handshake,
//! counter nonces, padding, and receive-side replay protection.
//!
//! A `Keypair` is shared (`Arc`) between the peer state, the receiver-index
//! table and every worker that sends with it: sending uses an atomic counter.
//! Receiving mutates the replay window. A tunnel normally arrives on one NIC
//! queue, so one worker touches the window, but a peer that roams (or a packet
//! the kernel's slow path hands over) may arrive on another queue: the window
//! sits behind a one-word try-lock, uncontended in the steady state, taken only
//! *after* the AEAD proved the packet genuine. Nothing an unauthenticated
//! sender does can claim, hold or move a session's receive side. Before the
//! AEAD, a lock-free check against the newest counter rejects stale replays.

use super::aead::{AeadBackend, TransportKey};
use super::constants::{
    AEAD_TAG_LEN, PADDING_MULTIPLE, REJECT_AFTER_MESSAGES, REJECT_AFTER_TIME, REKEY_AFTER_MESSAGES, REKEY_AFTER_TIME,
};
use super::crypto::counter_nonce;
use super::replay::{ReplayWindow, WINDOW_SIZE};
use crate::wire::{TransportHeader, TRANSPORT_HEADER_LEN};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
}

/// The replay window behind a try-lock, plus a lock-free copy of the newest
/// counter for the pre-decryption check.
struct ReceiveState {
    busy: AtomicBool,
    /// One more than the newest authenticated counter (mirrors the window).
    next: AtomicU64,
    window: UnsafeCell<ReplayWindow>,
}

// `window` is only touched in `record`, between acquiring `busy` (Acquire)
// and releasing it (Release).
// SAFETY: so one thread at a time holds a `&mut` to it, seeing the last one's writes.
unsafe impl Sync for ReceiveState {}

/// Releases the window's lock when dropped (also on unwinding).
struct WindowGuard<'a>(&'a AtomicBool);

impl Drop for WindowGuard<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl ReceiveState {
    fn new() -> Self {
        Self { busy: AtomicBool::new(false), next: AtomicU64::new(0), window: UnsafeCell::new(ReplayWindow::default()) }
    }

    /// Cheap, lock-free: false when `counter` is certainly too old. The window
    /// has the last word after authentication.
    fn may_accept(&self, counter: u64) -> bool {
        counter < REJECT_AFTER_MESSAGES
            && counter.saturating_add(WINDOW_SIZE) >= self.next.load(Ordering::Relaxed).saturating_sub(1)
    }

    /// Records an authenticated counter; false if it is a replay.
    fn record(&self, counter: u64) -> bool {
        let mut spins = 0u32;
        while self.busy.compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
            spins += 1;
            if spins < 128 {
                core::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        let _guard = WindowGuard(&self.busy);
        // SAFETY: `busy` is held (acquired just above, released by `_guard`), so
        // this is the only live reference to the window.
        let window = unsafe { &mut *self.window.get() };
        let fresh = window.update(counter);
        self.next.store(window.newest_plus_one(), Ordering::Relaxed);
        fresh
    }
}

/// A value that shares no cache line with its neighbours (128: the pair of
/// lines x86 prefetches together).
#[repr(align(128))]
struct OwnLine<T>(T);

impl<T> core::ops::Deref for OwnLine<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
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
    /// The keys on cache lines of their own: crypto threads read them while
    /// the owning worker writes the counters and the window (`crypto_pool.rs`).
    sending: OwnLine<TransportKey>,
    receiving: OwnLine<TransportKey>,
    send_counter: OwnLine<AtomicU64>,
    receive: OwnLine<ReceiveState>,
    /// Set once a message authenticated on this keypair: a responder's keypair
    /// is confirmed by its first use.
    used: AtomicBool,
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
            sending: OwnLine(TransportKey::new(backend, send_key)),
            receiving: OwnLine(TransportKey::new(backend, receive_key)),
            send_counter: OwnLine(AtomicU64::new(0)),
            receive: OwnLine(ReceiveState::new()),
            used: AtomicBool::new(false),
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
        let counter = self.prepare_message(buf, payload_len, now)?;
        let total = sealed_len(payload_len);
        self.encrypt_message(&mut buf[..total], counter);
        Ok(total)
    }

    /// The first part of `seal`, on the thread that owns the send order:
    /// takes the next counter (the nonce), then writes the header and the zero
    /// padding around the plaintext at `buf[16..16 + payload_len]`.
    pub fn prepare_message(&self, buf: &mut [u8], payload_len: usize, now: Instant) -> Result<u64, SendError> {
        if buf.len() < sealed_len(payload_len) {
            return Err(SendError::BufferTooSmall);
        }
        let counter = self.reserve_counter(now)?;
        self.frame_message(buf, payload_len, counter)?;
        Ok(counter)
    }

    /// The next send counter, in order (the thread that owns the send order).
    pub fn reserve_counter(&self, now: Instant) -> Result<u64, SendError> {
        if self.is_expired(now) {
            return Err(SendError::Expired);
        }
        let counter = self.send_counter.fetch_add(1, Ordering::Relaxed);
        if counter >= REJECT_AFTER_MESSAGES {
            // Keep the counter pinned so it can never wrap around.
            self.send_counter.store(REJECT_AFTER_MESSAGES, Ordering::Relaxed);
            return Err(SendError::Expired);
        }
        Ok(counter)
    }

    /// Writes the header for `counter` and the zero padding around the
    /// plaintext at `buf[16..16 + payload_len]` (any thread).
    pub fn frame_message(&self, buf: &mut [u8], payload_len: usize, counter: u64) -> Result<(), SendError> {
        let total = sealed_len(payload_len);
        let msg = buf.get_mut(..total).ok_or(SendError::BufferTooSmall)?;
        msg[TRANSPORT_HEADER_LEN + payload_len..total - AEAD_TAG_LEN].fill(0);
        TransportHeader::emit(msg, self.remote_index, counter).map_err(|_| SendError::BufferTooSmall)?;
        Ok(())
    }

    /// The second half of `seal`: encrypts the prepared message `msg` (header,
    /// padded plaintext, room for the tag) under `counter`'s nonce.
    pub fn encrypt_message(&self, msg: &mut [u8], counter: u64) {
        if let Some(body) = msg.get_mut(TRANSPORT_HEADER_LEN..) {
            self.sending.seal(&counter_nonce(counter), &[], body);
        }
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
    /// padded plaintext (empty for a keepalive), behind the header.
    pub fn open<'a>(&self, msg: TransportHeader<&'a mut [u8]>, now: Instant) -> Result<&'a mut [u8], ReceiveError> {
        let counter = msg.counter();
        let body = msg.into_inner().get_mut(TRANSPORT_HEADER_LEN..).ok_or(ReceiveError::Authentication)?;
        let n = self.open_counter(counter, body, 0, now)?;
        Ok(&mut body[..n])
    }

    /// Order: cheap lock-free check for stale counters, age, AEAD (ciphertext
    /// and tag at `buf[src..]`, plaintext to `buf[..]`), then the replay window
    /// records the counter.
    fn open_counter(&self, counter: u64, buf: &mut [u8], src: usize, now: Instant) -> Result<usize, ReceiveError> {
        self.check_counter(counter, now)?;
        let n = self.decrypt(counter, buf, src)?;
        self.accept_counter(counter)?;
        Ok(n)
    }

    /// Before the AEAD: a lock-free check that `counter` is not certainly
    /// stale, and the keypair's age.
    pub fn check_counter(&self, counter: u64, now: Instant) -> Result<(), ReceiveError> {
        if !self.receive.may_accept(counter) {
            return Err(ReceiveError::Replay);
        }
        if self.is_expired(now) {
            return Err(ReceiveError::Expired);
        }
        Ok(())
    }

    /// The AEAD alone (any thread): authenticates and decrypts the ciphertext
    /// and tag at `buf[src..]` under `counter`'s nonce, writing the plaintext
    /// to `buf[..]`; returns its length. Changes no state of the keypair.
    pub fn decrypt(&self, counter: u64, buf: &mut [u8], src: usize) -> Result<usize, ReceiveError> {
        self.receiving.open_within(&counter_nonce(counter), &[], buf, src).map_err(|_| ReceiveError::Authentication)
    }

    /// After the AEAD proved the message genuine, in the order the owning
    /// thread delivers: the replay window records `counter` (a replay is
    /// refused here), and the keypair counts as used.
    pub fn accept_counter(&self, counter: u64) -> Result<(), ReceiveError> {
        if !self.receive.record(counter) {
            return Err(ReceiveError::Replay);
        }
        if !self.used.load(Ordering::Relaxed) {
            self.used.store(true, Ordering::Relaxed);
        }
        Ok(())
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
        let mut buf = [0u8; 128];
        let n = a.encrypt(b"hello", &mut buf, now).unwrap();
        assert_eq!(n, 16 + 16 + 16, "5 bytes pad to 16");
        let sent = buf;
        let msg = TransportHeader::new_checked(&mut buf[..n]).unwrap();
        assert_eq!(msg.receiver(), 20);
        let plain = b.open(msg, now).unwrap();
        assert_eq!(&plain[..5], b"hello");
        assert!(plain[5..].iter().all(|&x| x == 0));

        let mut replay = sent;
        let msg = TransportHeader::new_checked(&mut replay[..n]).unwrap();
        assert_eq!(b.open(msg, now).unwrap_err(), ReceiveError::Replay);

        let n2 = a.encrypt(b"world", &mut buf, now).unwrap();
        buf[20] ^= 0x01;
        let msg = TransportHeader::new_checked(&mut buf[..n2]).unwrap();
        assert_eq!(b.open(msg, now).unwrap_err(), ReceiveError::Authentication);
        // A forged packet must not consume its counter: the genuine one still opens.
        buf[20] ^= 0x01;
        let msg = TransportHeader::new_checked(&mut buf[..n2]).unwrap();
        assert!(b.open(msg, now).is_ok());
    }

    #[test]
    fn keepalive_is_empty_and_expiry_is_enforced() {
        let now = Instant::now();
        let (a, b) = pair(now);
        let mut buf = [0u8; 32];
        assert_eq!(a.encrypt(&[], &mut buf, now).unwrap(), 32);
        let msg = TransportHeader::new_checked(&mut buf[..]).unwrap();
        assert_eq!(b.open(msg, now).unwrap().len(), 0);
        let late = now + REJECT_AFTER_TIME;
        assert_eq!(a.encrypt(&[], &mut buf, late).unwrap_err(), SendError::Expired);
        assert!(a.needs_rekey_for_send(now + REKEY_AFTER_TIME));
        assert!(!b.needs_rekey_for_send(now + REKEY_AFTER_TIME), "only the initiator rekeys on age");
    }

    #[test]
    fn any_thread_may_receive_and_forgeries_claim_nothing() {
        let now = Instant::now();
        let (a, b) = pair(now);
        let b = std::sync::Arc::new(b);
        // A forged packet (right index, garbage body) changes nothing.
        let mut forged = [0u8; 64];
        let n = a.encrypt(b"x", &mut forged, now).unwrap();
        forged[40] ^= 1;
        let err = b.open(TransportHeader::new_checked(&mut forged[..n]).unwrap(), now).unwrap_err();
        assert_eq!(err, ReceiveError::Authentication);
        // Genuine packets open on whichever thread they arrive, each counter once.
        let packets: Vec<Vec<u8>> = (0..2000)
            .map(|_| {
                let mut buf = vec![0u8; 64];
                let n = a.encrypt(b"y", &mut buf, now).unwrap();
                buf.truncate(n);
                buf
            })
            .collect();
        let threads: Vec<_> = (0..2)
            .map(|t| {
                let (b, mut packets) = (b.clone(), packets.clone());
                std::thread::spawn(move || {
                    let mut ok = 0;
                    // Both threads try every packet (thread 1 from the end).
                    if t == 1 {
                        packets.reverse();
                    }
                    for p in packets.iter_mut() {
                        if b.open(TransportHeader::new_checked(&mut p[..]).unwrap(), now).is_ok() {
                            ok += 1;
                        }
                    }
                    ok
                })
            })
            .collect();
        let accepted: usize = threads.into_iter().map(|t| t.join().unwrap()).sum();
        assert_eq!(accepted, packets.len(), "every counter accepted exactly once across both threads");
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
