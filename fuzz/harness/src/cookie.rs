//! `cookie`: the responder's `CookieChecker::verify` and `write_reply` on
//! arbitrary bytes of every length, and the initiator's side (`CookieJar`):
//! consuming the reply the checker wrote (which must succeed for a message the
//! jar stamped, after which MAC2 must verify) and consuming arbitrary replies.
//!
//! Input: a flags byte, then the message.

use std::net::SocketAddr;
use std::time::{Duration, Instant};
use wgxdp_dataplane::noise::cookie::{CookieChecker, CookieJar, MacKeys, MacVerdict};
use wgxdp_dataplane::noise::PrivateKey;
use wgxdp_dataplane::wire::{CookieReply, COOKIE_REPLY_LEN, HANDSHAKE_INITIATION_LEN, HANDSHAKE_RESPONSE_LEN};

pub mod flag {
    /// The initiator stamps MAC1 (and MAC2 if it holds a cookie) on a 148- or 92-byte message.
    pub const STAMP: u8 = 1;
    /// The sender's address is IPv6.
    pub const V6: u8 = 2;
    /// The responder checks two minutes later (its cookie secret has rotated).
    pub const LATER: u8 = 4;
    /// Flip a bit of the cookie reply (position: the high nibble) before the initiator reads it.
    pub const MUTATE_REPLY: u8 = 8;
}

pub fn cookie(data: &[u8]) {
    let Some((&flags, msg)) = data.split_first() else { return };
    let responder = PrivateKey::generate().public_key();
    let start = Instant::now();
    let checker = CookieChecker::new(&responder, start);
    let keys = MacKeys::new(&responder);
    let now = if flags & flag::LATER != 0 { start + Duration::from_secs(121) } else { start };
    let src: SocketAddr =
        if flags & flag::V6 != 0 { "[2001:db8::7]:40000".parse() } else { "198.51.100.7:40000".parse() }.expect("addr");

    let mut msg = msg.to_vec();
    let mut jar = CookieJar::default();
    let stamped = flags & flag::STAMP != 0 && matches!(msg.len(), HANDSHAKE_INITIATION_LEN | HANDSHAKE_RESPONSE_LEN);
    if stamped {
        jar.stamp(&keys, &mut msg, start);
    }
    let verdict = checker.verify(&msg, src, now);
    if stamped {
        assert_ne!(verdict, MacVerdict::InvalidMac1, "a stamped MAC1 verifies");
    }
    let sender = msg.get(4..8).map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let mut reply = [0u8; COOKIE_REPLY_LEN];
    let written = checker.write_reply(&msg, sender, src, now, &mut reply);
    assert_eq!(
        written,
        matches!(msg.len(), HANDSHAKE_INITIATION_LEN | HANDSHAKE_RESPONSE_LEN),
        "a reply exactly for handshake-sized messages"
    );
    let mutate = flags & flag::MUTATE_REPLY != 0;
    if mutate {
        reply[usize::from(flags >> 4) * 4] ^= 1;
    }
    let view = CookieReply::new_checked(&reply[..]);
    let consumed = view.as_ref().map(|v| jar.consume_reply(&keys, v, now).is_ok());
    if stamped && !mutate {
        assert_eq!(consumed, Ok(true), "the reply to a message the jar stamped is accepted");
        // The next message carries MAC2 with that cookie, valid for this source.
        jar.stamp(&keys, &mut msg, now);
        assert_eq!(checker.verify(&msg, src, now), MacVerdict::ValidWithCookie);
    }
    // The input itself as a cookie reply, for an initiator that sent something.
    if let Ok(v) = CookieReply::new_checked(&msg[..]) {
        let mut jar = CookieJar::default();
        let mut sent = [0u8; HANDSHAKE_INITIATION_LEN];
        sent[0] = 1;
        jar.stamp(&keys, &mut sent, start);
        let _ = jar.consume_reply(&keys, &v, now);
        let _ = CookieJar::default().consume_reply(&keys, &v, now);
    }
}
