//! The receiver-index table: our 32-bit indices (section 5.4.1) are chosen so
//! that a data packet finds its session with one array load. The low `slot_bits`
//! of an index name a slot; the high bits are random generation bits, so a
//! stale index (slot reused) does not match. Slots are handed out in random
//! order (a uniformly chosen free slot, not last-in-first-out), so with a
//! sparsely used table every bit of an index is unpredictable: an attacker
//! learns nothing about the next index from the ones it has seen.
//!
//! Readers (`get`) do one atomic load of the slot and compare the stored index;
//! writers (`insert`, `remove`) take a mutex that only writers use (the free list).

use arc_swap::{ArcSwapOption, Guard};
use rand_core::{OsRng, RngCore};
use std::sync::{Arc, Mutex};

/// A table entry: the full index it was registered under, and the value.
#[derive(Debug)]
pub struct IndexEntry<T> {
    pub index: u32,
    pub value: T,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the receiver-index table is full")]
pub struct IndexTableFull;

pub struct IndexTable<T> {
    slots: Box<[ArcSwapOption<IndexEntry<T>>]>,
    slot_bits: u32,
    free: Mutex<Vec<u32>>,
}

impl<T> core::fmt::Debug for IndexTable<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("IndexTable").field("capacity", &self.slots.len()).finish_non_exhaustive()
    }
}

/// A loaded entry; derefs to it. Holding it keeps the entry alive.
pub struct IndexGuard<T>(Guard<Option<Arc<IndexEntry<T>>>>);

impl<T> core::ops::Deref for IndexGuard<T> {
    type Target = IndexEntry<T>;
    fn deref(&self) -> &IndexEntry<T> {
        self.0.as_ref().expect("IndexGuard is only built around a present entry")
    }
}

impl<T: core::fmt::Debug> core::fmt::Debug for IndexGuard<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        (**self).fmt(f)
    }
}

impl<T> IndexTable<T> {
    /// A table with `2^slot_bits` slots (1 ≤ slot_bits ≤ 24).
    pub fn new(slot_bits: u32) -> Self {
        let slot_bits = slot_bits.clamp(1, 24);
        let n = 1usize << slot_bits;
        Self {
            slots: (0..n).map(|_| ArcSwapOption::empty()).collect(),
            slot_bits,
            free: Mutex::new((0..n as u32).collect()),
        }
    }

    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    fn slot_of(&self, index: u32) -> usize {
        (index & ((1u32 << self.slot_bits) - 1)) as usize
    }

    /// Registers `value` under a fresh random index and returns the index.
    pub fn insert(&self, value: T) -> Result<u32, IndexTableFull> {
        let slot = {
            let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
            if free.is_empty() {
                return Err(IndexTableFull);
            }
            let pick = OsRng.next_u32() as usize % free.len();
            free.swap_remove(pick)
        };
        let generation = OsRng.next_u32() << self.slot_bits;
        let index = generation | slot;
        self.slots[slot as usize].store(Some(Arc::new(IndexEntry { index, value })));
        Ok(index)
    }

    /// Replaces the value under an existing index (e.g. a pending handshake
    /// becoming a keypair). False if the index is not registered.
    pub fn replace(&self, index: u32, value: T) -> bool {
        let _writer = self.free.lock().unwrap_or_else(|p| p.into_inner());
        let slot = &self.slots[self.slot_of(index)];
        if slot.load().as_ref().is_none_or(|e| e.index != index) {
            return false;
        }
        slot.store(Some(Arc::new(IndexEntry { index, value })));
        true
    }

    /// The entry registered under exactly `index`: one atomic load, no lock.
    #[inline]
    pub fn get(&self, index: u32) -> Option<IndexGuard<T>> {
        let g = self.slots[self.slot_of(index)].load();
        match &*g {
            Some(e) if e.index == index => Some(IndexGuard(g)),
            _ => None,
        }
    }

    /// Unregisters `index`; false if it was not registered.
    pub fn remove(&self, index: u32) -> bool {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        let slot_no = self.slot_of(index);
        let slot = &self.slots[slot_no];
        if slot.load().as_ref().is_none_or(|e| e.index != index) {
            return false;
        }
        slot.store(None);
        free.push(slot_no as u32);
        true
    }

    /// Number of registered entries.
    pub fn len(&self) -> usize {
        self.capacity() - self.free.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_get_replace_remove() {
        let t = IndexTable::new(4);
        let a = t.insert("a").unwrap();
        let b = t.insert("b").unwrap();
        assert_ne!(a, b);
        assert_eq!(t.get(a).unwrap().value, "a");
        assert_eq!(t.get(b).unwrap().index, b);
        assert!(t.replace(a, "a2"));
        assert_eq!(t.get(a).unwrap().value, "a2");
        assert!(t.remove(a));
        assert!(t.get(a).is_none());
        assert!(!t.remove(a));
        assert!(!t.replace(a, "x"));
        // A stale index whose slot was reused does not match the new entry.
        // A stale index never finds a new entry, whichever slot it lands in.
        for _ in 0..100 {
            let c = t.insert("c").unwrap();
            if c != a {
                assert!(t.get(a).is_none());
            }
            assert!(t.remove(c));
        }
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn slots_are_handed_out_in_random_order() {
        let t = IndexTable::new(16);
        let slots: Vec<u32> = (0..64).map(|i| t.insert(i).unwrap() & 0xffff).collect();
        assert_ne!(slots, (0..64).collect::<Vec<u32>>(), "not sequential");
        // Uniform over 65 536 slots: about half land in the upper half (a
        // false failure has odds below 1e-8).
        let high = slots.iter().filter(|&&s| s >= 0x8000).count();
        assert!((10..=54).contains(&high), "{high} of 64 in the upper half");
        // Freed and re-taken: not last-in-first-out.
        let again: Vec<u32> = (0..8)
            .map(|_| {
                let i = t.insert(99).unwrap();
                assert!(t.remove(i));
                i & 0xffff
            })
            .collect();
        assert!(again.windows(2).any(|w| w[0] != w[1]), "a freed slot is not simply handed back");
    }

    #[test]
    fn fills_up_and_reports_it() {
        let t = IndexTable::new(2);
        let ids: Vec<u32> = (0..4).map(|i| t.insert(i).unwrap()).collect();
        assert_eq!(t.insert(9), Err(IndexTableFull));
        assert!(t.remove(ids[2]));
        assert!(t.insert(9).is_ok());
    }

    #[test]
    fn concurrent_readers_and_writers() {
        let t = Arc::new(IndexTable::new(10));
        let stable = t.insert(u64::MAX).unwrap();
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let t = t.clone();
                std::thread::spawn(move || {
                    for _ in 0..50_000 {
                        assert_eq!(t.get(stable).unwrap().value, u64::MAX);
                    }
                })
            })
            .collect();
        for i in 0..5_000u64 {
            let idx = t.insert(i).unwrap();
            assert_eq!(t.get(idx).unwrap().value, i);
            assert!(t.remove(idx));
        }
        for r in readers {
            r.join().unwrap();
        }
        assert_eq!(t.len(), 1);
    }
}
