//! MAC1, MAC2 and cookie replies (section 5.4.4, 5.4.7).
//!
//! - `MacKeys`: the two keys derived from one public key: the MAC1 key
//!   HASH(LABEL_MAC1 || pub) and the cookie encryption key HASH(LABEL_COOKIE || pub).
//! - `CookieChecker` (responder side, one per gateway): verifies MAC1 and MAC2,
//!   and writes cookie replies bound to the sender's IP address and port with a
//!   secret that rotates every two minutes.
//! - `CookieJar` (initiator side, one per peer): stamps MAC1/MAC2 on our
//!   handshake messages and stores the cookie from a reply.

use super::constants::{COOKIE_NONCE_LEN, COOKIE_REFRESH_TIME, LABEL_COOKIE, LABEL_MAC1, MAC_LEN};
use super::crypto::{hash, mac, xaead_open, xaead_seal, AeadError};
use super::keys::PublicKey;
use crate::wire::{CookieReply, HANDSHAKE_INITIATION_LEN, HANDSHAKE_RESPONSE_LEN};
use arc_swap::ArcSwap;
use rand_core::{OsRng, RngCore};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// Keys derived from a public key for MAC1 and cookie encryption.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct MacKeys {
    mac1: [u8; 32],
    cookie: [u8; 32],
}

impl core::fmt::Debug for MacKeys {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("MacKeys(..)")
    }
}

impl MacKeys {
    pub fn new(public: &PublicKey) -> Self {
        Self { mac1: hash(&[LABEL_MAC1, public.as_bytes()]), cookie: hash(&[LABEL_COOKIE, public.as_bytes()]) }
    }
}

/// Where MAC1 and MAC2 start in a handshake message (section 5.4.4): only an
/// initiation or a response carries them; any other length is refused, so a
/// short datagram can never underflow an offset.
fn mac_offsets(len: usize) -> Option<(usize, usize)> {
    match len {
        HANDSHAKE_INITIATION_LEN | HANDSHAKE_RESPONSE_LEN => Some((len - 2 * MAC_LEN, len - MAC_LEN)),
        _ => None,
    }
}

/// (bytes before MAC1, MAC1, bytes before MAC2, MAC2) of a handshake message.
type MacParts<'a> = (&'a [u8], &'a [u8], &'a [u8], &'a [u8]);

fn split_macs(msg: &[u8]) -> Option<MacParts<'_>> {
    let (m1, m2) = mac_offsets(msg.len())?;
    Some((msg.get(..m1)?, msg.get(m1..m2)?, msg.get(..m2)?, msg.get(m2..)?))
}

/// What a handshake message's MACs say, as checked by `CookieChecker::verify`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MacVerdict {
    /// MAC1 is wrong: drop silently.
    InvalidMac1,
    /// MAC1 is right and MAC2 carries a valid, current cookie.
    ValidWithCookie,
    /// MAC1 is right, MAC2 is absent or stale.
    ValidWithoutCookie,
}

struct CookieSecret {
    bytes: Zeroizing<[u8; 32]>,
    born: Instant,
}

/// The responder's MAC checks and cookie replies; shared by every thread that
/// handles handshakes (`&self` everywhere; the secret rotates lock-free).
pub struct CookieChecker {
    keys: MacKeys,
    secret: ArcSwap<CookieSecret>,
}

impl core::fmt::Debug for CookieChecker {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("CookieChecker(<redacted>)")
    }
}

/// The cookie's input: the sender's IP address then its port (big-endian).
fn source_bytes(src: SocketAddr) -> ([u8; 18], usize) {
    let mut b = [0u8; 18];
    let n = match src {
        SocketAddr::V4(a) => {
            b[..4].copy_from_slice(&a.ip().octets());
            b[4..6].copy_from_slice(&a.port().to_be_bytes());
            6
        }
        SocketAddr::V6(a) => {
            b[..16].copy_from_slice(&a.ip().octets());
            b[16..18].copy_from_slice(&a.port().to_be_bytes());
            18
        }
    };
    (b, n)
}

impl CookieChecker {
    /// `local` is our own public key: initiators compute MAC1 with it.
    pub fn new(local: &PublicKey, now: Instant) -> Self {
        Self { keys: MacKeys::new(local), secret: ArcSwap::from_pointee(Self::fresh_secret(now)) }
    }

    fn fresh_secret(now: Instant) -> CookieSecret {
        let mut bytes = Zeroizing::new([0u8; 32]);
        OsRng.fill_bytes(&mut bytes[..]);
        CookieSecret { bytes, born: now }
    }

    /// The current secret, rotated first if it is older than two minutes.
    fn secret(&self, now: Instant) -> arc_swap::Guard<Arc<CookieSecret>> {
        let cur = self.secret.load();
        if now.saturating_duration_since(cur.born) < COOKIE_REFRESH_TIME {
            return cur;
        }
        let next = Arc::new(Self::fresh_secret(now));
        // If another thread rotated first, keep its secret.
        let _ = self.secret.compare_and_swap(&*cur, next);
        self.secret.load()
    }

    fn cookie(&self, src: SocketAddr, now: Instant) -> [u8; MAC_LEN] {
        let (b, n) = source_bytes(src);
        mac(&self.secret(now).bytes[..], &[&b[..n]])
    }

    /// Checks MAC1, then MAC2 against the cookie for `src`. `msg` is a whole
    /// initiation or response (already size-checked by the wire view).
    pub fn verify(&self, msg: &[u8], src: SocketAddr, now: Instant) -> MacVerdict {
        let Some((before1, mac1, before2, mac2)) = split_macs(msg) else { return MacVerdict::InvalidMac1 };
        let expected1 = mac(&self.keys.mac1, &[before1]);
        if !constant_time_eq(&expected1, mac1) {
            return MacVerdict::InvalidMac1;
        }
        let cookie = self.cookie(src, now);
        let expected2 = mac(&cookie, &[before2]);
        if constant_time_eq(&expected2, mac2) {
            MacVerdict::ValidWithCookie
        } else {
            MacVerdict::ValidWithoutCookie
        }
    }

    /// Writes a cookie reply to `msg` (whose MAC1 was valid) into `out`; false
    /// (nothing written) when `msg` is not a handshake message.
    #[must_use]
    pub fn write_reply(
        &self,
        msg: &[u8],
        sender_index: u32,
        src: SocketAddr,
        now: Instant,
        out: &mut [u8; 64],
    ) -> bool {
        let Some((_, mac1, _, _)) = split_macs(msg) else { return false };
        let mut reply = CookieReply::new_zeroed(&mut out[..]).expect("64 bytes is a cookie reply");
        reply.set_receiver(sender_index);
        let mut nonce = [0u8; COOKIE_NONCE_LEN];
        OsRng.fill_bytes(&mut nonce);
        reply.nonce_mut().copy_from_slice(&nonce);
        let cookie = self.cookie(src, now);
        let sealed = reply.encrypted_cookie_mut();
        sealed[..MAC_LEN].copy_from_slice(&cookie);
        xaead_seal(&self.keys.cookie, &nonce, sealed, mac1);
        true
    }
}

/// Initiator-side state for one peer: the last MAC1 we sent (the cookie reply's
/// associated data) and the last cookie we received.
#[derive(Default, Zeroize, ZeroizeOnDrop)]
pub struct CookieJar {
    last_mac1: Option<[u8; MAC_LEN]>,
    cookie: Option<[u8; MAC_LEN]>,
    #[zeroize(skip)]
    cookie_received: Option<Instant>,
}

impl core::fmt::Debug for CookieJar {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("CookieJar").field("has_cookie", &self.cookie.is_some()).finish()
    }
}

impl CookieJar {
    /// Writes MAC1 (keyed for `peer`) and MAC2 (if we hold a fresh cookie) into a
    /// handshake message we are about to send.
    pub fn stamp(&mut self, peer: &MacKeys, msg: &mut [u8], now: Instant) {
        let Some((m1, m2)) = mac_offsets(msg.len()) else { return };
        let mac1 = mac(&peer.mac1, &[&msg[..m1]]);
        msg[m1..m2].copy_from_slice(&mac1);
        self.last_mac1 = Some(mac1);
        let fresh = self.cookie_received.is_some_and(|t| now.saturating_duration_since(t) < COOKIE_REFRESH_TIME);
        match (&self.cookie, fresh) {
            (Some(cookie), true) => {
                let mac2 = mac(cookie, &[&msg[..m2]]);
                msg[m2..].copy_from_slice(&mac2);
            }
            _ => msg[m2..].fill(0),
        }
    }

    /// Decrypts a cookie reply from `peer` for the last message we sent.
    pub fn consume_reply(&mut self, peer: &MacKeys, reply: &CookieReply<&[u8]>, now: Instant) -> Result<(), AeadError> {
        let aad = self.last_mac1.ok_or(AeadError)?;
        let mut nonce = [0u8; COOKIE_NONCE_LEN];
        nonce.copy_from_slice(reply.nonce());
        let mut buf = Zeroizing::new([0u8; 32]);
        buf.copy_from_slice(reply.encrypted_cookie());
        xaead_open(&peer.cookie, &nonce, &mut buf[..], &aad)?;
        let mut cookie = [0u8; MAC_LEN];
        cookie.copy_from_slice(&buf[..MAC_LEN]);
        self.cookie = Some(cookie);
        self.cookie_received = Some(now);
        Ok(())
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::noise::keys::PrivateKey;

    #[test]
    fn mac1_then_cookie_then_mac2() {
        let responder = PrivateKey::generate().public_key();
        let now = Instant::now();
        let checker = CookieChecker::new(&responder, now);
        let keys = MacKeys::new(&responder);
        let mut jar = CookieJar::default();
        let src: SocketAddr = "192.0.2.7:40000".parse().unwrap();

        let mut msg = [0x55u8; 148];
        jar.stamp(&keys, &mut msg, now);
        assert_eq!(checker.verify(&msg, src, now), MacVerdict::ValidWithoutCookie);

        let mut bad = msg;
        bad[5] ^= 1;
        assert_eq!(checker.verify(&bad, src, now), MacVerdict::InvalidMac1);

        let mut reply = [0u8; 64];
        assert!(checker.write_reply(&msg, 77, src, now, &mut reply));
        let view = CookieReply::new_checked(&reply[..]).unwrap();
        assert_eq!(view.receiver(), 77);
        jar.consume_reply(&keys, &view, now).unwrap();

        jar.stamp(&keys, &mut msg, now);
        assert_eq!(checker.verify(&msg, src, now), MacVerdict::ValidWithCookie);
        // The cookie is bound to the source address and port.
        let other: SocketAddr = "192.0.2.7:40001".parse().unwrap();
        assert_eq!(checker.verify(&msg, other, now), MacVerdict::ValidWithoutCookie);
        // The responder's secret rotates after two minutes: old cookies stop working.
        let later = now + COOKIE_REFRESH_TIME;
        assert_eq!(checker.verify(&msg, src, later), MacVerdict::ValidWithoutCookie);
        // And the initiator stops sending a stale cookie.
        jar.stamp(&keys, &mut msg, later);
        assert!(msg[132..].iter().all(|&b| b == 0));
    }

    /// The crash seen in the field: a datagram of 4..31 bytes whose type says
    /// "handshake" reached `split_macs`, which underflowed.
    #[test]
    fn messages_of_any_other_length_have_no_macs_and_never_panic() {
        let responder = PrivateKey::generate().public_key();
        let now = Instant::now();
        let checker = CookieChecker::new(&responder, now);
        let keys = MacKeys::new(&responder);
        let mut jar = CookieJar::default();
        let src: SocketAddr = "192.0.2.7:40000".parse().unwrap();
        let mut reply = [0u8; 64];
        for len in (0..300).filter(|&l| l != HANDSHAKE_INITIATION_LEN && l != HANDSHAKE_RESPONSE_LEN) {
            let mut msg = vec![1u8; len];
            assert_eq!(checker.verify(&msg, src, now), MacVerdict::InvalidMac1, "len {len}");
            assert!(!checker.write_reply(&msg, 1, src, now, &mut reply), "len {len}");
            jar.stamp(&keys, &mut msg, now);
            assert!(msg.iter().all(|&b| b == 1), "nothing stamped into a {len}-byte buffer");
        }
    }

    #[test]
    fn cookie_reply_for_another_message_is_rejected() {
        let responder = PrivateKey::generate().public_key();
        let now = Instant::now();
        let checker = CookieChecker::new(&responder, now);
        let keys = MacKeys::new(&responder);
        let mut jar = CookieJar::default();
        let src: SocketAddr = "[2001:db8::1]:51820".parse().unwrap();
        let mut first = [1u8; 92];
        jar.stamp(&keys, &mut first, now);
        let mut reply = [0u8; 64];
        assert!(checker.write_reply(&first, 1, src, now, &mut reply));
        let mut second = [2u8; 92];
        jar.stamp(&keys, &mut second, now);
        let view = CookieReply::new_checked(&reply[..]).unwrap();
        assert!(jar.consume_reply(&keys, &view, now).is_err(), "AAD is the newest mac1");
        assert!(CookieJar::default().consume_reply(&keys, &view, now).is_err());
    }
}
