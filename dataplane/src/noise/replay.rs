//! Sliding replay window (RFC 6479): a ring of 64-bit words, the newest counter
//! seen, and whole-word clearing as the window advances. 8192 bits as in the
//! kernel; counters up to `WINDOW_SIZE` behind the newest are still accepted
//! once each, so reordered packets survive.
//!
//! Two phases: `check` (before decryption, rejects obvious replays cheaply, does
//! not change state) and `update` (after authentication, records the counter).
//! Only authenticated counters move the window.

use super::constants::{REJECT_AFTER_MESSAGES, REPLAY_BITMAP_BITS};

const WORDS: usize = REPLAY_BITMAP_BITS / 64;
const _: () = assert!(WORDS.is_power_of_two());
/// How far behind the newest counter a packet may be and still be accepted.
pub const WINDOW_SIZE: u64 = (REPLAY_BITMAP_BITS - 64) as u64;

#[derive(Clone)]
pub struct ReplayWindow {
    /// One more than the newest accepted counter (0: none accepted yet).
    next: u64,
    bitmap: [u64; WORDS],
}

impl Default for ReplayWindow {
    fn default() -> Self {
        Self { next: 0, bitmap: [0; WORDS] }
    }
}

impl core::fmt::Debug for ReplayWindow {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("ReplayWindow").field("next", &self.next).finish_non_exhaustive()
    }
}

impl ReplayWindow {
    fn locate(counter: u64) -> (usize, u64) {
        ((counter >> 6) as usize & (WORDS - 1), 1u64 << (counter & 63))
    }

    /// Would `counter` be accepted? Does not record it.
    pub fn check(&self, counter: u64) -> bool {
        if counter >= REJECT_AFTER_MESSAGES {
            return false;
        }
        if counter >= self.next {
            return true;
        }
        if counter + WINDOW_SIZE < self.next - 1 {
            return false;
        }
        let (word, bit) = Self::locate(counter);
        self.bitmap[word] & bit == 0
    }

    /// Records an authenticated `counter`; false if it is a replay or too old.
    pub fn update(&mut self, counter: u64) -> bool {
        if !self.check(counter) {
            return false;
        }
        if counter >= self.next {
            // Advance: clear every word between the old newest block and the new one.
            let old_block = if self.next == 0 { None } else { Some((self.next - 1) >> 6) };
            let new_block = counter >> 6;
            match old_block {
                Some(old) if new_block - old < WORDS as u64 => {
                    for b in old + 1..=new_block {
                        self.bitmap[b as usize & (WORDS - 1)] = 0;
                    }
                }
                Some(_) => self.bitmap = [0; WORDS],
                None => {}
            }
            self.next = counter + 1;
        }
        let (word, bit) = Self::locate(counter);
        self.bitmap[word] |= bit;
        true
    }

    /// The newest accepted counter, if any.
    /// One more than the newest recorded counter (0: none yet).
    pub fn newest_plus_one(&self) -> u64 {
        self.next
    }

    pub fn newest(&self) -> Option<u64> {
        self.next.checked_sub(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    /// The specification, written naively: accept a counter once, unless it is
    /// more than WINDOW_SIZE behind the newest accepted one or past the limit.
    #[derive(Default)]
    struct Reference {
        seen: HashSet<u64>,
        newest: Option<u64>,
    }

    impl Reference {
        fn update(&mut self, c: u64) -> bool {
            if c >= REJECT_AFTER_MESSAGES || self.seen.contains(&c) {
                return false;
            }
            if let Some(n) = self.newest {
                if c + WINDOW_SIZE < n {
                    return false;
                }
            }
            self.seen.insert(c);
            self.newest = Some(self.newest.map_or(c, |n| n.max(c)));
            true
        }
    }

    #[test]
    fn in_order_duplicates_and_reordering() {
        let mut w = ReplayWindow::default();
        assert!(w.update(0));
        assert!(!w.update(0));
        assert!(w.update(5));
        assert!(w.update(2), "reordered inside the window");
        assert!(!w.update(2));
        assert!(w.update(10_000));
        assert!(w.update(10_000 - WINDOW_SIZE), "the oldest counter still in the window");
        assert!(!w.update(10_000 - WINDOW_SIZE - 1), "just outside");
        assert!(w.update(1_000_000));
        assert!(!w.update(10_000 + 1), "after a jump, old counters are gone");
        assert!(!w.update(REJECT_AFTER_MESSAGES));
        assert!(w.update(REJECT_AFTER_MESSAGES - 1));
        assert_eq!(w.newest(), Some(REJECT_AFTER_MESSAGES - 1));
    }

    #[test]
    fn window_is_at_least_2048() {
        let mut w = ReplayWindow::default();
        assert!(w.update(10_000));
        for c in (10_000 - 2048..10_000).rev() {
            assert!(w.update(c), "counter {c}");
        }
    }

    fn against_reference(seq: &[u64]) {
        let mut w = ReplayWindow::default();
        let mut r = Reference::default();
        for (i, &c) in seq.iter().enumerate() {
            let checked = w.check(c);
            let got = w.update(c);
            assert_eq!(checked, got, "check and update disagree at step {i} for {c}");
            assert_eq!(got, r.update(c), "step {i}, counter {c}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        /// Mostly-increasing counters with jitter, duplicates and jumps, compared
        /// step by step against the naive reference.
        #[test]
        fn matches_naive_reference(ops in proptest::collection::vec((0u8..10, 0u64..20_000), 1..600)) {
            let mut base = 0u64;
            let seq: Vec<u64> = ops.iter().map(|&(kind, x)| match kind {
                0..=5 => { base += x % 64; base }
                6 => base.saturating_sub(x % (WINDOW_SIZE + 200)),
                7 => { base += x * 3; base }
                8 => base,
                _ => x,
            }).collect();
            against_reference(&seq);
        }

        #[test]
        fn matches_reference_near_the_limit(offsets in proptest::collection::vec(0u64..16_000, 1..200)) {
            let seq: Vec<u64> = offsets.iter().map(|o| REJECT_AFTER_MESSAGES - 10_000 + o).collect();
            against_reference(&seq);
        }
    }
}
