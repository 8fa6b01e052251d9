//! Per-peer timers (section 6), I/O-free: events are reported with `now`, and
//! `poll(now)` says what is due. Deadlines follow the reference implementations:
//!
//! | timer | armed by | fires as |
//! |---|---|---|
//! | retransmit handshake | sending an initiation (REKEY_TIMEOUT + jitter) | resend, or give up after REKEY_ATTEMPT_TIME |
//! | send keepalive | receiving data with nothing sent back (KEEPALIVE_TIMEOUT) | an empty transport message |
//! | new handshake | sending data with nothing received (KEEPALIVE + REKEY_TIMEOUT) | a new initiation |
//! | zero keys | deriving a session (3 × REJECT_AFTER_TIME) | all key material erased |
//! | persistent keepalive | any authenticated packet either way (configured interval) | an empty transport message |

use super::constants::{
    KEEPALIVE_TIMEOUT, REKEY_ATTEMPT_TIME, REKEY_TIMEOUT, REKEY_TIMEOUT_JITTER_MAX, ZERO_KEYS_AFTER,
};
use std::time::{Duration, Instant};

/// What `poll` found due. Several may be due at once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TimerActions {
    /// Send a (new or retried) handshake initiation.
    pub send_initiation: bool,
    /// Send a keepalive (an empty transport message).
    pub send_keepalive: bool,
    /// Erase every keypair and handshake state.
    pub zero_keys: bool,
    /// The handshake was retried for REKEY_ATTEMPT_TIME without an answer.
    pub gave_up: bool,
}

#[derive(Debug, Clone, Default)]
pub struct Timers {
    pub persistent_keepalive: Option<Duration>,
    retransmit_handshake: Option<Instant>,
    send_keepalive: Option<Instant>,
    new_handshake: Option<Instant>,
    zero_keys: Option<Instant>,
    persistent_keepalive_at: Option<Instant>,
    /// When the current series of initiation retries started.
    attempt_started: Option<Instant>,
    need_another_keepalive: bool,
}

fn due(deadline: &mut Option<Instant>, now: Instant) -> bool {
    match *deadline {
        Some(t) if now >= t => {
            *deadline = None;
            true
        }
        _ => false,
    }
}

impl Timers {
    pub fn new(persistent_keepalive: Option<Duration>) -> Self {
        Self { persistent_keepalive, ..Self::default() }
    }

    /// A data packet (not a keepalive) was sent.
    pub fn on_data_sent(&mut self, now: Instant) {
        if self.new_handshake.is_none() {
            self.new_handshake = Some(now + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT);
        }
    }

    /// A data packet (not a keepalive) was received and authenticated.
    pub fn on_data_received(&mut self, now: Instant) {
        if self.send_keepalive.is_none() {
            self.send_keepalive = Some(now + KEEPALIVE_TIMEOUT);
        } else {
            self.need_another_keepalive = true;
        }
    }

    /// Any authenticated packet (data, keepalive or handshake) was sent.
    pub fn on_authenticated_sent(&mut self, now: Instant) {
        self.send_keepalive = None;
        self.on_traversal(now);
    }

    /// Any authenticated packet was received.
    pub fn on_authenticated_received(&mut self, now: Instant) {
        self.new_handshake = None;
        self.on_traversal(now);
    }

    fn on_traversal(&mut self, now: Instant) {
        if let Some(interval) = self.persistent_keepalive {
            self.persistent_keepalive_at = Some(now + interval);
        }
    }

    /// An initiation was sent; `jitter` in [0, 1) scales REKEY_TIMEOUT_JITTER_MAX.
    /// `retry` keeps the current attempt series going.
    pub fn on_initiation_sent(&mut self, now: Instant, jitter: f64, retry: bool) {
        if !retry || self.attempt_started.is_none() {
            self.attempt_started = Some(now);
        }
        let jitter = REKEY_TIMEOUT_JITTER_MAX.mul_f64(jitter.clamp(0.0, 1.0));
        self.retransmit_handshake = Some(now + REKEY_TIMEOUT + jitter);
        self.on_authenticated_sent(now);
    }

    /// A handshake completed (response consumed, or first data on a responder keypair).
    pub fn on_handshake_complete(&mut self) {
        self.retransmit_handshake = None;
        self.attempt_started = None;
    }

    /// A new keypair was derived.
    pub fn on_session_derived(&mut self, now: Instant) {
        self.zero_keys = Some(now + ZERO_KEYS_AFTER);
    }

    /// True while a series of initiations awaits a response (also in the
    /// moment the retransmit timer fired and the retry is not yet sent, so the
    /// retry continues the series and REKEY_ATTEMPT_TIME is counted from its
    /// first initiation).
    pub fn handshake_pending(&self) -> bool {
        self.retransmit_handshake.is_some() || self.attempt_started.is_some()
    }

    /// The earliest pending deadline, for a caller that sleeps between polls.
    pub fn next_deadline(&self) -> Option<Instant> {
        [
            self.retransmit_handshake,
            self.send_keepalive,
            self.new_handshake,
            self.zero_keys,
            self.persistent_keepalive_at,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    pub fn poll(&mut self, now: Instant) -> TimerActions {
        let mut a = TimerActions::default();
        if due(&mut self.retransmit_handshake, now) {
            let started = self.attempt_started.unwrap_or(now);
            if now.saturating_duration_since(started) >= REKEY_ATTEMPT_TIME {
                a.gave_up = true;
                self.attempt_started = None;
                self.send_keepalive = None;
                self.new_handshake = None;
                if self.zero_keys.is_none() {
                    self.zero_keys = Some(now + ZERO_KEYS_AFTER);
                }
            } else {
                a.send_initiation = true;
            }
        }
        if due(&mut self.send_keepalive, now) {
            a.send_keepalive = true;
            if self.need_another_keepalive {
                self.need_another_keepalive = false;
                self.send_keepalive = Some(now + KEEPALIVE_TIMEOUT);
            }
        }
        if due(&mut self.new_handshake, now) {
            a.send_initiation = true;
        }
        if due(&mut self.persistent_keepalive_at, now) {
            a.send_keepalive = true;
        }
        if due(&mut self.zero_keys, now) {
            a.zero_keys = true;
            self.retransmit_handshake = None;
            self.attempt_started = None;
        }
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::noise::constants::REJECT_AFTER_TIME;

    #[test]
    fn retransmits_with_jitter_then_gives_up() {
        let t0 = Instant::now();
        let mut t = Timers::new(None);
        t.on_initiation_sent(t0, 0.5, false);
        assert_eq!(t.poll(t0 + REKEY_TIMEOUT), TimerActions::default(), "jitter delays the retry");
        let retry_at = t0 + REKEY_TIMEOUT + REKEY_TIMEOUT_JITTER_MAX.mul_f64(0.5);
        assert!(t.poll(retry_at).send_initiation);
        let mut now = retry_at;
        let mut initiations = 2; // the first one and the retry above
        loop {
            t.on_initiation_sent(now, 0.0, true);
            now += REKEY_TIMEOUT;
            let a = t.poll(now);
            if a.gave_up {
                break;
            }
            assert!(a.send_initiation);
            initiations += 1;
        }
        assert!(now.duration_since(t0) >= REKEY_ATTEMPT_TIME);
        assert_eq!(initiations, 18, "one initiation every 5 s for 90 s");
        assert!(!t.handshake_pending());
        assert!(t.poll(now + ZERO_KEYS_AFTER).zero_keys);
    }

    #[test]
    fn keepalive_after_receiving_without_sending() {
        let t0 = Instant::now();
        let mut t = Timers::new(None);
        t.on_authenticated_received(t0);
        t.on_data_received(t0);
        assert!(!t.poll(t0 + KEEPALIVE_TIMEOUT - Duration::from_millis(1)).send_keepalive);
        assert!(t.poll(t0 + KEEPALIVE_TIMEOUT).send_keepalive);
        // Sending anything cancels a pending keepalive.
        t.on_data_received(t0 + Duration::from_secs(20));
        t.on_authenticated_sent(t0 + Duration::from_secs(21));
        assert!(!t.poll(t0 + Duration::from_secs(60)).send_keepalive);
    }

    #[test]
    fn new_handshake_when_data_goes_unanswered() {
        let t0 = Instant::now();
        let mut t = Timers::new(None);
        t.on_data_sent(t0);
        assert!(t.poll(t0 + KEEPALIVE_TIMEOUT + REKEY_TIMEOUT).send_initiation);
        t.on_data_sent(t0);
        t.on_authenticated_received(t0 + Duration::from_secs(1));
        assert!(!t.poll(t0 + Duration::from_secs(60)).send_initiation);
    }

    #[test]
    fn persistent_keepalive_and_zeroing() {
        let t0 = Instant::now();
        let mut t = Timers::new(Some(Duration::from_secs(25)));
        t.on_session_derived(t0);
        t.on_authenticated_sent(t0);
        assert!(t.poll(t0 + Duration::from_secs(25)).send_keepalive);
        assert_eq!(t.next_deadline(), Some(t0 + 3 * REJECT_AFTER_TIME));
        assert!(t.poll(t0 + 3 * REJECT_AFTER_TIME).zero_keys);
        assert_eq!(t.next_deadline(), None);
    }
}
