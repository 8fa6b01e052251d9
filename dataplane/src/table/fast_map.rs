//! A `HashMap` with a cheap multiply-rotate hasher (FxHash-style) for the
//! small per-packet maps whose keys are not chosen by remote parties (peer ids,
//! next hops from the kernel's neighbour table). SipHash, the default, costs
//! tens of nanoseconds per lookup that the data path cannot spare.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

#[derive(Debug, Default, Clone, Copy)]
pub struct FastHasher {
    hash: u64,
}

impl FastHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for FastHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            self.add(u64::from_le_bytes(c.try_into().expect("8 bytes")));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut last = [0u8; 8];
            last[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(last));
        }
    }

    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.hash
    }
}

pub type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FastHasher>>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    #[test]
    fn distinct_keys_stay_distinct() {
        let mut m: FastMap<IpAddr, u32> = FastMap::default();
        for i in 0..10_000u32 {
            m.insert(IpAddr::from(i.to_be_bytes()), i);
            m.insert(IpAddr::from(u128::from(i).to_be_bytes()), i + 1);
        }
        assert_eq!(m.len(), 20_000);
        assert_eq!(m[&IpAddr::from(7u32.to_be_bytes())], 7);
        assert_eq!(m[&IpAddr::from(7u128.to_be_bytes())], 8);
    }
}
