//! Cryptokey routing (section 2): longest-prefix match from an IP address to the
//! peer that owns it. Outbound, the destination picks the peer; inbound, the
//! decrypted source must map back to the peer that sent it.
//!
//! A snapshot is a path-compressed binary trie per address family, stored in an
//! arena (`Vec<Node>`) and never mutated after it is built. `SharedAllowedIps`
//! keeps the authoritative prefix map for writers and publishes rebuilt
//! snapshots atomically; readers load one with a single atomic operation.

use super::prefix::{addr_key, mask128, IpPrefix};
use arc_swap::{ArcSwap, Guard};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

const NONE: u32 = u32::MAX;

#[derive(Debug, Clone)]
struct Node<V> {
    /// Prefix bits, left-aligned and masked to `len`.
    key: u128,
    len: u8,
    value: Option<V>,
    child: [u32; 2],
}

fn bit_at(key: u128, i: u8) -> usize {
    ((key >> (127 - u32::from(i))) & 1) as usize
}

fn common_prefix_len(a: u128, b: u128) -> u8 {
    (a ^ b).leading_zeros().min(128) as u8
}

#[derive(Debug, Clone)]
struct Trie<V> {
    nodes: Vec<Node<V>>,
    root: u32,
    /// 32 or 128.
    width: u8,
}

impl<V: Copy> Trie<V> {
    fn new(width: u8) -> Self {
        Self { nodes: Vec::new(), root: NONE, width }
    }

    fn push(&mut self, key: u128, len: u8, value: Option<V>) -> u32 {
        self.nodes.push(Node { key: key & mask128(len), len, value, child: [NONE; 2] });
        (self.nodes.len() - 1) as u32
    }

    fn insert(&mut self, key: u128, len: u8, value: V) {
        let key = key & mask128(len);
        // `link` is the slot that points at `cur`: None for the root.
        let mut link: Option<(u32, usize)> = None;
        let mut cur = self.root;
        loop {
            if cur == NONE {
                let leaf = self.push(key, len, Some(value));
                self.set_link(link, leaf);
                return;
            }
            let (nkey, nlen) = (self.nodes[cur as usize].key, self.nodes[cur as usize].len);
            let common = common_prefix_len(nkey, key).min(nlen).min(len);
            if common == nlen {
                if len == nlen {
                    self.nodes[cur as usize].value = Some(value);
                    return;
                }
                let b = bit_at(key, nlen);
                link = Some((cur, b));
                cur = self.nodes[cur as usize].child[b];
                continue;
            }
            // `cur` must hang below a new node of length `common`.
            let parent = if common == len {
                self.push(key, len, Some(value))
            } else {
                let glue = self.push(key, common, None);
                let leaf = self.push(key, len, Some(value));
                self.nodes[glue as usize].child[bit_at(key, common)] = leaf;
                glue
            };
            self.nodes[parent as usize].child[bit_at(nkey, common)] = cur;
            self.set_link(link, parent);
            return;
        }
    }

    fn set_link(&mut self, link: Option<(u32, usize)>, to: u32) {
        match link {
            None => self.root = to,
            Some((p, b)) => self.nodes[p as usize].child[b] = to,
        }
    }

    #[inline]
    fn lookup(&self, addr: u128) -> Option<V> {
        let mut best = None;
        let mut cur = self.root;
        while let Some(n) = self.nodes.get(cur as usize) {
            if (addr ^ n.key) & mask128(n.len) != 0 {
                break;
            }
            if n.value.is_some() {
                best = n.value;
            }
            if n.len >= self.width {
                break;
            }
            cur = n.child[bit_at(addr, n.len)];
        }
        best
    }
}

/// An immutable allowed-IPs snapshot mapping prefixes to values (peer ids).
#[derive(Debug, Clone)]
pub struct AllowedIps<V> {
    v4: Trie<V>,
    v6: Trie<V>,
}

impl<V: Copy> Default for AllowedIps<V> {
    fn default() -> Self {
        Self { v4: Trie::new(32), v6: Trie::new(128) }
    }
}

impl<V: Copy> AllowedIps<V> {
    pub fn from_entries<'a>(entries: impl IntoIterator<Item = (&'a IpPrefix, &'a V)>) -> Self
    where
        V: 'a,
    {
        let mut t = Self::default();
        for (p, v) in entries {
            let trie = if p.addr().is_ipv4() { &mut t.v4 } else { &mut t.v6 };
            trie.insert(p.key(), p.prefix_len(), *v);
        }
        t
    }

    #[inline]
    pub fn lookup(&self, addr: IpAddr) -> Option<V> {
        match addr {
            IpAddr::V4(_) => self.v4.lookup(addr_key(addr)),
            IpAddr::V6(_) => self.v6.lookup(addr_key(addr)),
        }
    }

    #[inline]
    pub fn lookup_v4(&self, addr: [u8; 4]) -> Option<V> {
        self.v4.lookup(u128::from(u32::from_be_bytes(addr)) << 96)
    }

    #[inline]
    pub fn lookup_v6(&self, addr: [u8; 16]) -> Option<V> {
        self.v6.lookup(u128::from_be_bytes(addr))
    }
}

/// The published snapshot plus the writers' authoritative map.
#[derive(Debug)]
pub struct SharedAllowedIps<V> {
    snapshot: ArcSwap<AllowedIps<V>>,
    entries: Mutex<BTreeMap<IpPrefix, V>>,
}

impl<V: Copy + PartialEq + core::fmt::Debug> Default for SharedAllowedIps<V> {
    fn default() -> Self {
        Self { snapshot: ArcSwap::from_pointee(AllowedIps::default()), entries: Mutex::new(BTreeMap::new()) }
    }
}

impl<V: Copy + PartialEq + core::fmt::Debug> SharedAllowedIps<V> {
    /// The current snapshot: one atomic load, never blocks.
    #[inline]
    pub fn load(&self) -> Guard<Arc<AllowedIps<V>>> {
        self.snapshot.load()
    }

    /// Replaces every prefix that maps to `value` with `prefixes`. A prefix
    /// owned by another value moves to this one (as `wg set` does).
    pub fn set_prefixes(&self, value: V, prefixes: &[IpPrefix]) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.retain(|_, v| *v != value);
        for p in prefixes {
            entries.insert(*p, value);
        }
        self.snapshot.store(Arc::new(AllowedIps::from_entries(entries.iter())));
    }

    pub fn remove_value(&self, value: V) {
        self.set_prefixes(value, &[]);
    }

    /// The prefixes currently mapped to `value`.
    pub fn prefixes_of(&self, value: V) -> Vec<IpPrefix> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.iter().filter(|(_, v)| **v == value).map(|(p, _)| *p).collect()
    }

    /// Every (prefix, value), in prefix order.
    pub fn entries(&self) -> Vec<(IpPrefix, V)> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.iter().map(|(p, v)| (*p, *v)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    /// The specification, naively: the value of the longest matching prefix.
    fn naive(entries: &BTreeMap<IpPrefix, u32>, addr: IpAddr) -> Option<u32> {
        entries.iter().filter(|(p, _)| p.contains(addr)).max_by_key(|(p, _)| p.prefix_len()).map(|(_, v)| *v)
    }

    #[test]
    fn basic_longest_prefix() {
        let table = SharedAllowedIps::default();
        table.set_prefixes(1u32, &["10.0.0.0/8".parse().unwrap(), "fd00::/16".parse().unwrap()]);
        table.set_prefixes(2u32, &["10.1.0.0/16".parse().unwrap(), "10.1.2.3/32".parse().unwrap()]);
        table.set_prefixes(3u32, &["0.0.0.0/0".parse().unwrap()]);
        let s = table.load();
        assert_eq!(s.lookup("10.2.0.1".parse().unwrap()), Some(1));
        assert_eq!(s.lookup("10.1.9.9".parse().unwrap()), Some(2));
        assert_eq!(s.lookup("10.1.2.3".parse().unwrap()), Some(2));
        assert_eq!(s.lookup("192.0.2.1".parse().unwrap()), Some(3));
        assert_eq!(s.lookup("fd00:1::1".parse().unwrap()), Some(1));
        assert_eq!(s.lookup("fe80::1".parse().unwrap()), None);
        assert_eq!(s.lookup_v4([10, 1, 0, 0]), Some(2));
        // Moving a prefix to another peer, and removing a peer.
        table.set_prefixes(3, &["10.1.0.0/16".parse().unwrap()]);
        assert_eq!(table.load().lookup("10.1.9.9".parse().unwrap()), Some(3));
        assert_eq!(table.load().lookup("192.0.2.1".parse().unwrap()), None);
        table.remove_value(2);
        assert_eq!(table.load().lookup("10.1.2.3".parse().unwrap()), Some(3));
        assert_eq!(table.prefixes_of(1).len(), 2);
        // An old snapshot is unaffected by later writes.
        assert_eq!(s.lookup("10.1.2.3".parse().unwrap()), Some(2));
    }

    /// ≥ 10 000 random prefixes (clustered so they nest and share bits) and
    /// lookups, checked against the naive definition.
    #[test]
    fn matches_naive_reference_on_10000_random_prefixes() {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut entries = BTreeMap::new();
        while entries.len() < 10_000 {
            let r = next();
            let p = if r % 2 == 0 {
                // IPv4 in 10.0.0.0/8-ish clusters so many prefixes nest.
                let a = Ipv4Addr::from(0x0a00_0000 | (next() as u32 & 0x00ff_ffff));
                IpPrefix::new(a.into(), (8 + next() % 25) as u8).unwrap()
            } else {
                let a = Ipv6Addr::from((0xfd00u128 << 112) | (u128::from(next()) << 48) | u128::from(next() & 0xffff));
                IpPrefix::new(a.into(), (16 + next() % 113) as u8).unwrap()
            };
            entries.insert(p, (next() % 500) as u32);
        }
        let snap = AllowedIps::from_entries(entries.iter());
        for i in 0..20_000 {
            let addr: IpAddr = if i % 2 == 0 {
                Ipv4Addr::from(0x0a00_0000 | (next() as u32 & 0x00ff_ffff)).into()
            } else if i % 4 == 1 {
                // Addresses inside a stored prefix, to exercise deep matches.
                let (p, _) = entries.iter().nth((next() % entries.len() as u64) as usize).unwrap();
                match p.addr() {
                    IpAddr::V4(a) => Ipv4Addr::from(
                        u32::from(a)
                            | (next() as u32 & !(u32::MAX.checked_shl(32 - u32::from(p.prefix_len())).unwrap_or(0))),
                    )
                    .into(),
                    IpAddr::V6(a) => {
                        Ipv6Addr::from(u128::from(a) | (u128::from(next()) & !mask128(p.prefix_len()))).into()
                    }
                }
            } else {
                Ipv6Addr::from((0xfd00u128 << 112) | (u128::from(next()) << 48) | u128::from(next() & 0xffff)).into()
            };
            assert_eq!(snap.lookup(addr), naive(&entries, addr), "lookup {addr}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn small_tables_match_reference(
            prefixes in proptest::collection::vec((any::<u32>(), 0u8..=32, 0u32..8), 0..40),
            probes in proptest::collection::vec(any::<u32>(), 1..40),
        ) {
            let mut entries = BTreeMap::new();
            for (a, l, v) in prefixes {
                entries.insert(IpPrefix::new(Ipv4Addr::from(a).into(), l).unwrap(), v);
            }
            let snap = AllowedIps::from_entries(entries.iter());
            for (a, _) in entries.iter() {
                prop_assert_eq!(snap.lookup(a.addr()), naive(&entries, a.addr()));
            }
            for p in probes {
                let addr = Ipv4Addr::from(p).into();
                prop_assert_eq!(snap.lookup(addr), naive(&entries, addr));
            }
        }
    }

    #[test]
    fn readers_never_block_while_a_writer_publishes() {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        let table = Arc::new(SharedAllowedIps::default());
        table.set_prefixes(1u32, &["10.0.0.0/8".parse().unwrap()]);
        let stop = Arc::new(AtomicBool::new(false));
        let hits = Arc::new(AtomicU64::new(0));
        let reader = {
            let (table, stop, hits) = (table.clone(), stop.clone(), hits.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    // Peer 1 owns 10/8 in every snapshot the writer publishes.
                    assert_eq!(table.load().lookup("10.9.9.9".parse().unwrap()), Some(1));
                    hits.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        // Start writing only once the reader is running, so they overlap.
        while hits.load(Ordering::Relaxed) == 0 {
            std::thread::yield_now();
        }
        let before = hits.load(Ordering::Relaxed);
        for i in 0..200u32 {
            let p = IpPrefix::new(Ipv4Addr::from(0xc000_0200 + i).into(), 32).unwrap();
            table.set_prefixes(2 + i, &[p]);
        }
        stop.store(true, Ordering::Relaxed);
        reader.join().unwrap();
        assert!(hits.load(Ordering::Relaxed) >= before);
        assert_eq!(table.entries().len(), 201);
    }
}
