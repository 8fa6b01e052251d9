//! Which handshake messages may cost the control thread a Diffie-Hellman:
//! one decision for every path that receives them (the AF_XDP workers and
//! the kernel slow path), made lock-free before anything is queued.
//!
//! - Classified by the received bytes and their exact length (148 / 92 / 64).
//! - Initiations and responses need a valid MAC1 (only the gateway's public
//!   key is needed to make one, but garbage never reaches the queue).
//! - Responses must name one of our pending initiations, cookie replies one of
//!   our indices, by receiver index (chosen at random by us: an off-path
//!   sender cannot guess).
//! - Under load (the handshake queue at least 1/8 full, sticky for a second,
//!   section 5.3 / the kernel), initiations and responses without a valid
//!   MAC2 cookie for their source address and port get a cookie reply instead
//!   (section 5.4.7); those with one are limited per source address (IPv4
//!   address, IPv6 /64), so one real host cannot fill the queue either.

use crate::drops::DropReason;
use crate::noise::cookie::MacVerdict;
use crate::peer_view::{monotonic_nanos, Endpoint};
use crate::table::FastMap;
use crate::wire::{MessageType, COOKIE_REPLY_LEN, HANDSHAKE_INITIATION_LEN, HANDSHAKE_RESPONSE_LEN};
use crate::worker::{HandshakeJob, Shared, HANDSHAKE_JOB_LEN};
use std::net::IpAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

/// "Under load" lasts this long after the handshake queue was last found filling.
pub const UNDER_LOAD_STICKY: Duration = Duration::from_secs(1);
/// Handshake messages per source and second admitted under load (the kernel
/// allows 20 per second with a burst of 5; a one-second window of 20 here).
pub const PER_SOURCE_PER_SECOND: u32 = 20;
/// Sources a limiter tracks at once; past that, new sources are admitted
/// (spoofed sources cannot hold valid cookies, so they never get this far).
const LIMITER_SOURCES: usize = 4096;

/// What to do with a received handshake message.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // returned by value: no allocation per message
pub enum Admission {
    /// Hand it to the control thread.
    Queue(HandshakeJob),
    /// Answer with this cookie reply (section 5.4.7) to the sender.
    CookieReply([u8; COOKIE_REPLY_LEN]),
}

/// Per-source counts for the current second; one per receiving thread (a
/// source normally arrives on one queue), bounded, no allocation once warm.
#[derive(Debug)]
pub struct SourceLimiter {
    second: Option<Instant>,
    counts: FastMap<[u8; 16], u32>,
}

impl Default for SourceLimiter {
    fn default() -> Self {
        let mut counts = FastMap::default();
        counts.reserve(LIMITER_SOURCES);
        Self { second: None, counts }
    }
}

impl SourceLimiter {
    /// True if `src` may send one more handshake message this second.
    pub fn allow(&mut self, src: IpAddr, now: Instant) -> bool {
        if self.second.is_none_or(|s| now.saturating_duration_since(s) >= Duration::from_secs(1)) {
            self.second = Some(now);
            self.counts.clear();
        }
        let key = match src {
            IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
            IpAddr::V6(a) => {
                let mut k = a.octets();
                k[8..].fill(0); // one /64 is one host (or one attacker)
                k
            }
        };
        if !self.counts.contains_key(&key) && self.counts.len() >= LIMITER_SOURCES {
            return true;
        }
        let n = self.counts.entry(key).or_insert(0);
        *n += 1;
        *n <= PER_SOURCE_PER_SECOND
    }
}

/// Decides what happens to `msg` (a whole UDP payload) received from `from`.
pub fn admit(
    shared: &Shared,
    limiter: &mut SourceLimiter,
    msg: &[u8],
    from: Endpoint,
    now: Instant,
) -> Result<Admission, DropReason> {
    let kind = MessageType::of(msg).map_err(|_| DropReason::Malformed)?;
    let expected = match kind {
        MessageType::HandshakeInitiation => HANDSHAKE_INITIATION_LEN,
        MessageType::HandshakeResponse => HANDSHAKE_RESPONSE_LEN,
        MessageType::CookieReply => COOKIE_REPLY_LEN,
        MessageType::Transport => return Err(DropReason::Malformed),
    };
    if msg.len() != expected {
        return Err(DropReason::Malformed);
    }
    if kind != MessageType::HandshakeInitiation {
        // Receiver index at bytes 8..12 of a response and 4..8 of a cookie reply.
        let at = if kind == MessageType::HandshakeResponse { 8 } else { 4 };
        let receiver = u32::from_le_bytes([msg[at], msg[at + 1], msg[at + 2], msg[at + 3]]);
        // A response answers one of our pending initiations; a cookie reply
        // may answer our initiation or our response (a session's index).
        let known = shared
            .tables
            .indices
            .get(receiver)
            .is_some_and(|e| kind == MessageType::CookieReply || e.value.keypair.is_none());
        if !known {
            return Err(DropReason::UnknownIndex);
        }
    }
    let nanos = monotonic_nanos(now);
    let queue = &shared.handshakes;
    if queue.capacity().is_some_and(|cap| queue.len() >= cap / 8) {
        shared.under_load_until.store(nanos + UNDER_LOAD_STICKY.as_nanos() as u64, Relaxed);
    }
    let under_load = nanos < shared.under_load_until.load(Relaxed);
    if kind != MessageType::CookieReply {
        match shared.cookies.verify(msg, from.addr, now) {
            MacVerdict::InvalidMac1 => return Err(DropReason::InvalidMac1),
            MacVerdict::ValidWithoutCookie if under_load => {
                let sender = u32::from_le_bytes([msg[4], msg[5], msg[6], msg[7]]);
                let mut reply = [0u8; COOKIE_REPLY_LEN];
                if !shared.cookies.write_reply(msg, sender, from.addr, now, &mut reply) {
                    return Err(DropReason::Malformed);
                }
                return Ok(Admission::CookieReply(reply));
            }
            MacVerdict::ValidWithCookie if under_load && !limiter.allow(from.addr.ip(), now) => {
                return Err(DropReason::RateLimited);
            }
            _ => {}
        }
    }
    let mut job = HandshakeJob { bytes: [0u8; HANDSHAKE_JOB_LEN], len: expected, from };
    job.bytes[..expected].copy_from_slice(msg);
    Ok(Admission::Queue(job))
}

/// Queues an admitted job; a full queue marks the gateway under load.
pub fn enqueue(shared: &Shared, job: HandshakeJob, now: Instant) -> Result<(), DropReason> {
    shared.handshakes.try_send(job).map_err(|_| {
        let nanos = monotonic_nanos(now);
        shared.under_load_until.store(nanos + UNDER_LOAD_STICKY.as_nanos() as u64, Relaxed);
        DropReason::HandshakeQueueFull
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_limited_per_second_and_per_64() {
        let mut l = SourceLimiter::default();
        let now = Instant::now();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        assert!((0..PER_SOURCE_PER_SECOND).all(|_| l.allow(a, now)));
        assert!(!l.allow(a, now), "the 21st in one second");
        assert!(l.allow("192.0.2.2".parse().unwrap(), now), "another host is not affected");
        let v6a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let v6b: IpAddr = "2001:db8:1:2::ffff".parse().unwrap();
        assert!((0..PER_SOURCE_PER_SECOND).all(|_| l.allow(v6a, now)));
        assert!(!l.allow(v6b, now), "the same /64");
        assert!(l.allow(a, now + Duration::from_secs(1)), "a new second");
        // Bounded: past the table size, new sources are admitted, nothing grows.
        for i in 0..(LIMITER_SOURCES as u32 + 100) {
            let _ = l.allow(IpAddr::from((i | 0x0a00_0000).to_be_bytes()), now + Duration::from_secs(2));
        }
        assert_eq!(l.counts.len(), LIMITER_SOURCES);
    }
}
