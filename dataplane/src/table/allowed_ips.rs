//! Cryptokey routing (section 2): longest-prefix match from an IP address to the
//! peer that owns it. Outbound, the destination picks the peer; inbound, the
//! decrypted source must map back to the peer that sent it.
//!
//! A snapshot is never mutated after it is built. `SharedAllowedIps` keeps the
//! authoritative prefix map for writers and publishes rebuilt snapshots
//! atomically; readers load one with a single atomic operation. Building is
//! therefore allowed to cost time and some memory so that a lookup is a few
//! dependent array reads.
//!
//! # Layout
//!
//! Each address family is a multibit trie with *leaf pushing*. A slot is a
//! `u32`: with the top bit (`CHILD`) clear it is a leaf, an index into the
//! snapshot's `values` (`values[0]` is `None`, "no prefix matches"); with the
//! top bit set the low 31 bits name a child node. A prefix is expanded into
//! every slot it covers at the level where it ends (a /17 in a level covering
//! bits 16..24 fills 2^(24-17) = 128 slots), prefixes applied shortest first
//! so longer ones overwrite. When a child is created below a slot, all of the
//! child's slots start out as that slot's leaf, so the longest match for an
//! address is always the last slot read: a lookup follows child slots until it
//! reaches a leaf, with no "best so far" bookkeeping.
//!
//! **IPv4** (DIR-16-8-8): a root array indexed by the top 16 bits (65 536 slots,
//! 256 KiB), then 256-slot chunks for bits 16..24 and 24..32, at most three
//! dependent reads. A family with fewer than `V4_WIDE_ROOT_MIN` (256) prefixes uses
//! an 8-bit root (1 KiB) and three chunk levels instead (four reads in a table
//! that fits in cache), so small tables stay small; a family without prefixes
//! allocates nothing. Every chunk costs 1 KiB: the benchmark's 10 000 random
//! prefixes of lengths 8..32 take about 9.3 MiB, and building them about 4 ms.
//!
//! **IPv6**: 8-bit strides, path-compressed. A node is a header (the bits an
//! address must share with the node, the leaf to answer when it does not, and
//! where its slots are) plus 256 slots in a shared slot array. A chain of
//! levels in which no prefix ends and every longer prefix takes the same slot
//! is skipped, so the node below checks the skipped bits instead (a table under
//! `fd00::/16` starts at the third byte). A node holding a single prefix is a
//! one-slot leaf check: it answers the prefix's value when the address matches
//! all of its bits and the inherited leaf otherwise. A lookup reads one header
//! and one slot per node; the two reads are independent of each other. The
//! benchmark's 10 000 random prefixes (under `fd00::/24`, lengths 24..123)
//! take about 1.2 MB: a few hundred 256-slot nodes near the top and a
//! 52-byte leaf check per prefix below them.

use super::prefix::{mask128, IpPrefix};
use arc_swap::{ArcSwap, Guard};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Set in a slot that names a child node; clear in a leaf (an index into `values`).
const CHILD: u32 = 1 << 31;
/// The leaf "no prefix matches" (`values[0]`).
const NO_MATCH: u32 = 0;
/// The number of IPv4 prefixes from which the IPv4 root indexes 16 bits, not 8.
/// Around this size 256 KiB of root costs about what the chunks it saves do.
const V4_WIDE_ROOT_MIN: usize = 256;

/// A prefix for the builders: left-aligned key with host bits clear, length, leaf.
type Entry<K> = (K, u8, u32);

/// IPv4: a root of 2^8 or 2^16 slots, then 256-slot chunks.
#[derive(Debug, Clone, Default)]
struct V4Table {
    /// Slots indexed by `addr >> root_shift`; empty when the family has no prefix.
    root: Box<[u32]>,
    /// 32 minus the root's width in bits (16 or 24).
    root_shift: u32,
    chunks: Vec<[u32; 256]>,
}

impl V4Table {
    /// `entries` must be deduplicated and sorted by length, shortest first.
    fn build(entries: &[Entry<u32>], root_bits: u32) -> Self {
        if entries.is_empty() {
            return Self::default();
        }
        let mut t = Self {
            root: vec![NO_MATCH; 1 << root_bits].into_boxed_slice(),
            root_shift: 32 - root_bits,
            chunks: Vec::new(),
        };
        for &(key, len, leaf) in entries {
            t.insert(key, u32::from(len), leaf);
        }
        t.chunks.shrink_to_fit();
        t
    }

    fn insert(&mut self, key: u32, len: u32, leaf: u32) {
        let root_bits = 32 - self.root_shift;
        // `node` is None for the root; the level covers bits `end - bits .. end`.
        let (mut node, mut bits, mut end): (Option<usize>, u32, u32) = (None, root_bits, root_bits);
        loop {
            let idx = (key >> (32 - end)) as usize & ((1 << bits) - 1);
            let next = self.chunks.len();
            let slots: &mut [u32] = match node {
                None => &mut self.root,
                Some(c) => &mut self.chunks[c][..],
            };
            if len <= end {
                // The host bits of `key` are clear, so `idx` is the first slot covered.
                let covered = &mut slots[idx..idx + (1 << (end - len))];
                // Shorter prefixes come first: nothing below this level exists yet.
                debug_assert!(covered.iter().all(|s| s & CHILD == 0));
                covered.fill(leaf);
                return;
            }
            let slot = slots[idx];
            let child = if slot & CHILD != 0 {
                (slot & !CHILD) as usize
            } else {
                slots[idx] =
                    CHILD | u32::try_from(next).ok().filter(|c| c & CHILD == 0).expect("fewer than 2^31 chunks");
                // Leaf pushing: the new chunk starts with the slot's value.
                self.chunks.push([slot; 256]);
                next
            };
            (node, bits, end) = (Some(child), 8, end + 8);
        }
    }

    #[inline]
    fn lookup(&self, addr: u32) -> u32 {
        let mut shift = self.root_shift;
        let mut slot = self.root.get((addr >> shift) as usize).copied().unwrap_or(NO_MATCH);
        while slot & CHILD != 0 {
            // Chunks covering the last byte (shift 0) hold only leaves.
            shift -= 8;
            slot = self.chunks[(slot & !CHILD) as usize][(addr >> shift) as u8 as usize];
        }
        slot
    }

    #[cfg(test)]
    fn heap_bytes(&self) -> usize {
        self.root.len() * 4 + self.chunks.capacity() * core::mem::size_of::<[u32; 256]>()
    }
}

/// An IPv6 node: the slot for an address is `slots[base + (addr >> shift & index_mask)]`
/// when `addr & mask == key`, and the leaf `fallback` otherwise.
#[derive(Debug, Clone, Copy)]
struct Node6 {
    key: u128,
    mask: u128,
    fallback: u32,
    base: u32,
    shift: u32,
    /// 255 for a 256-slot node, 0 for a single-prefix leaf check.
    index_mask: u32,
}

#[derive(Debug, Clone)]
struct V6Table {
    /// A leaf, or the root node.
    root: u32,
    nodes: Vec<Node6>,
    slots: Vec<u32>,
}

impl Default for V6Table {
    fn default() -> Self {
        Self { root: NO_MATCH, nodes: Vec::new(), slots: Vec::new() }
    }
}

/// The byte of `key` at bit offset `depth` (a multiple of 8, below 128).
fn byte_at(key: u128, depth: u32) -> usize {
    (key >> (120 - depth)) as usize & 0xff
}

impl V6Table {
    /// `entries` must be deduplicated and sorted by (key, length); `default` is
    /// the leaf for `::/0`.
    fn build(entries: &[Entry<u128>], default: u32) -> Self {
        let mut t = Self { root: default, ..Self::default() };
        let entries: Vec<_> = entries.iter().copied().filter(|&(_, len, _)| len > 0).collect();
        if !entries.is_empty() {
            t.root = t.node(&entries, 0, default);
        }
        t.nodes.shrink_to_fit();
        t.slots.shrink_to_fit();
        t
    }

    /// Builds the node for `entries`, which all are longer than `depth` bits and
    /// share their first `depth` bits; `inherited` is the leaf the node answers
    /// where none of them matches. Returns the slot naming the node.
    fn node(&mut self, entries: &[Entry<u128>], mut depth: u32, inherited: u32) -> u32 {
        let index =
            CHILD | u32::try_from(self.nodes.len()).ok().filter(|i| i & CHILD == 0).expect("node count fits 31 bits");
        let base = u32::try_from(self.slots.len()).expect("slot count fits 32 bits");
        if let [(key, len, leaf)] = *entries {
            self.slots.push(leaf);
            self.nodes.push(Node6 { key, mask: mask128(len), fallback: inherited, base, shift: 0, index_mask: 0 });
            return index;
        }
        // Path compression: skip levels where no prefix ends and all go the same way.
        // Sorted keys sharing `depth` bits have their next byte in order, so the
        // first and last agree only if all do.
        while entries.iter().all(|&(_, len, _)| u32::from(len) > depth + 8)
            && byte_at(entries[0].0, depth) == byte_at(entries[entries.len() - 1].0, depth)
        {
            depth += 8;
        }
        let mask = mask128(depth as u8);
        self.nodes.push(Node6 {
            key: entries[0].0 & mask,
            mask,
            fallback: inherited,
            base,
            shift: 120 - depth,
            index_mask: 0xff,
        });
        let base = base as usize;
        self.slots.resize(base + 256, inherited);
        let ends_here = |&(_, len, _): &Entry<u128>| u32::from(len) <= depth + 8;
        let mut ending: Vec<_> = entries.iter().copied().filter(ends_here).collect();
        ending.sort_by_key(|&(_, len, _)| len);
        for (key, len, leaf) in ending {
            let first = base + byte_at(key, depth);
            self.slots[first..first + (1 << (depth + 8 - u32::from(len)))].fill(leaf);
        }
        // Longer prefixes, grouped by their byte at `depth`. Within a group the
        // prefixes ending here sort first (their key is the group's smallest).
        let mut rest = entries;
        while let Some(&(key, _, _)) = rest.first() {
            let b = byte_at(key, depth);
            let (group, tail) = rest.split_at(rest.partition_point(|&(k, _, _)| byte_at(k, depth) == b));
            rest = tail;
            let longer = &group[group.partition_point(ends_here)..];
            if !longer.is_empty() {
                let child = self.node(longer, depth + 8, self.slots[base + b]);
                self.slots[base + b] = child;
            }
        }
        index
    }

    #[inline]
    fn lookup(&self, addr: u128) -> u32 {
        let mut slot = self.root;
        while slot & CHILD != 0 {
            let n = &self.nodes[(slot & !CHILD) as usize];
            if (addr ^ n.key) & n.mask != 0 {
                return n.fallback;
            }
            slot = self.slots[n.base as usize + ((addr >> n.shift) as usize & n.index_mask as usize)];
        }
        slot
    }

    #[cfg(test)]
    fn heap_bytes(&self) -> usize {
        self.nodes.capacity() * core::mem::size_of::<Node6>() + self.slots.capacity() * 4
    }
}

/// An immutable allowed-IPs snapshot mapping prefixes to values (peer ids).
#[derive(Debug, Clone)]
pub struct AllowedIps<V> {
    /// What a leaf slot answers; `values[0]` is `None`. Empty in an empty table.
    values: Vec<Option<V>>,
    v4: V4Table,
    v6: V6Table,
}

impl<V: Copy> Default for AllowedIps<V> {
    fn default() -> Self {
        Self { values: Vec::new(), v4: V4Table::default(), v6: V6Table::default() }
    }
}

impl<V: Copy> AllowedIps<V> {
    /// Builds a snapshot. If a prefix is given twice, the last value wins.
    pub fn from_entries<'a>(entries: impl IntoIterator<Item = (&'a IpPrefix, &'a V)>) -> Self
    where
        V: 'a,
    {
        Self::build(entries, None)
    }

    /// `v4_root_bits` forces the IPv4 root's width (tests); by default it follows
    /// the number of IPv4 prefixes.
    fn build<'a>(entries: impl IntoIterator<Item = (&'a IpPrefix, &'a V)>, v4_root_bits: Option<u32>) -> Self
    where
        V: 'a,
    {
        let mut values = vec![None];
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        for (p, v) in entries {
            let leaf = u32::try_from(values.len()).ok().filter(|i| i & CHILD == 0).expect("fewer than 2^31 prefixes");
            values.push(Some(*v));
            match p.addr() {
                IpAddr::V4(a) => v4.push((u32::from(a), p.prefix_len(), leaf)),
                IpAddr::V6(a) => v6.push((u128::from(a), p.prefix_len(), leaf)),
            }
        }
        if v4.is_empty() && v6.is_empty() {
            return Self::default();
        }
        // Sorted by (key, length), the last given first among duplicates, which
        // `dedup_by_key` keeps.
        v4.sort_unstable_by_key(|&(k, l, leaf)| (k, l, core::cmp::Reverse(leaf)));
        v4.dedup_by_key(|&mut (k, l, _)| (k, l));
        v6.sort_unstable_by_key(|&(k, l, leaf)| (k, l, core::cmp::Reverse(leaf)));
        v6.dedup_by_key(|&mut (k, l, _)| (k, l));
        let v4_root_bits = v4_root_bits.unwrap_or(if v4.len() >= V4_WIDE_ROOT_MIN { 16 } else { 8 });
        v4.sort_by_key(|&(_, len, _)| len);
        let v6_default = match v6.first() {
            Some(&(_, 0, leaf)) => leaf,
            _ => NO_MATCH,
        };
        Self { values, v4: V4Table::build(&v4, v4_root_bits), v6: V6Table::build(&v6, v6_default) }
    }

    #[inline]
    pub fn lookup(&self, addr: IpAddr) -> Option<V> {
        match addr {
            IpAddr::V4(a) => self.lookup_v4(a.octets()),
            IpAddr::V6(a) => self.lookup_v6(a.octets()),
        }
    }

    #[inline]
    pub fn lookup_v4(&self, addr: [u8; 4]) -> Option<V> {
        self.value(self.v4.lookup(u32::from_be_bytes(addr)))
    }

    #[inline]
    pub fn lookup_v6(&self, addr: [u8; 16]) -> Option<V> {
        self.value(self.v6.lookup(u128::from_be_bytes(addr)))
    }

    #[inline]
    fn value(&self, leaf: u32) -> Option<V> {
        self.values.get(leaf as usize).copied().flatten()
    }

    /// Heap bytes held by the IPv4 and the IPv6 trie (values not included).
    #[cfg(test)]
    fn trie_bytes(&self) -> (usize, usize) {
        (self.v4.heap_bytes(), self.v6.heap_bytes())
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

    /// Whether some value holds exactly `prefix`.
    pub fn holds(&self, prefix: &IpPrefix) -> bool {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).contains_key(prefix)
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

    /// Every IPv4 root width the builder can choose, for the same entries.
    fn v4_variants(entries: &BTreeMap<IpPrefix, u32>) -> [AllowedIps<u32>; 3] {
        [
            AllowedIps::from_entries(entries.iter()),
            AllowedIps::build(entries.iter(), Some(8)),
            AllowedIps::build(entries.iter(), Some(16)),
        ]
    }

    fn table(entries: &[(&str, u32)]) -> BTreeMap<IpPrefix, u32> {
        entries.iter().map(|(p, v)| (p.parse().unwrap(), *v)).collect()
    }

    /// Nested prefixes that end on both sides of every stride boundary
    /// (the 8- and 16-bit roots, the chunk levels), with and without a default.
    #[test]
    fn known_answers_across_stride_boundaries_v4() {
        let mut entries = table(&[
            ("0.0.0.0/0", 0),
            ("10.0.0.0/8", 8),
            ("10.2.0.0/15", 15),
            ("10.3.0.0/16", 16),
            ("10.3.128.0/17", 17),
            ("10.3.200.0/24", 24),
            ("10.3.200.128/25", 25),
            ("10.3.200.200/32", 32),
            ("10.3.200.255/32", 33),
            ("10.3.201.0/32", 34),
            ("192.0.2.0/31", 31),
        ]);
        let answers = [
            ("0.0.0.0", Some(0)),
            ("9.255.255.255", Some(0)),
            ("10.0.0.0", Some(8)),
            ("10.1.255.255", Some(8)),
            ("10.2.0.0", Some(15)),
            ("10.2.255.255", Some(15)),
            ("10.3.0.0", Some(16)),
            ("10.3.127.255", Some(16)),
            ("10.3.128.0", Some(17)),
            ("10.3.199.255", Some(17)),
            ("10.3.200.0", Some(24)),
            ("10.3.200.127", Some(24)),
            ("10.3.200.128", Some(25)),
            ("10.3.200.199", Some(25)),
            ("10.3.200.200", Some(32)),
            ("10.3.200.201", Some(25)),
            ("10.3.200.255", Some(33)),
            ("10.3.201.0", Some(34)),
            ("10.3.201.1", Some(17)),
            ("10.3.255.255", Some(17)),
            ("10.4.0.0", Some(8)),
            ("11.0.0.0", Some(0)),
            ("192.0.2.1", Some(31)),
            ("192.0.2.2", Some(0)),
            ("255.255.255.255", Some(0)),
        ];
        for snap in v4_variants(&entries) {
            for (a, want) in answers {
                let addr: IpAddr = a.parse().unwrap();
                assert_eq!(snap.lookup(addr), want, "{a}");
                assert_eq!(snap.lookup_v4(a.parse::<std::net::Ipv4Addr>().unwrap().octets()), want, "{a}");
                assert_eq!(snap.lookup("::".parse().unwrap()), None);
            }
        }
        // Without the default route the gaps answer nothing.
        entries.remove(&"0.0.0.0/0".parse().unwrap());
        for snap in v4_variants(&entries) {
            for (a, want) in answers {
                let want = want.filter(|&v| v != 0);
                assert_eq!(snap.lookup(a.parse().unwrap()), want, "{a}");
            }
        }
        // Only a default route.
        for snap in v4_variants(&table(&[("0.0.0.0/0", 7)])) {
            assert_eq!(snap.lookup_v4([1, 2, 3, 4]), Some(7));
            assert_eq!(snap.lookup_v6([0; 16]), None);
        }
    }

    #[test]
    fn known_answers_across_stride_boundaries_v6() {
        let mut entries = table(&[
            ("::/0", 0),
            ("fd00::/15", 15),
            ("fd00::/16", 16),
            ("fd00:0:0:2::/63", 63),
            ("fd00:0:0:3::/64", 64),
            ("fd00:0:0:3:8000::/65", 65),
            ("fd00:0:0:3:8100::/72", 72),
            ("fd00:0:0:3:8100::/127", 127),
            ("fd00:0:0:3:8100::1/128", 128),
            ("2001:db8::/32", 32),
            ("2001:db8::1/128", 129),
            // A path-compressed pair: below the /32 they share 48 more bits.
            ("2001:db8:1:2:3:4::/96", 96),
            ("2001:db8:1:2:3:5::/96", 97),
            // A lone prefix: a one-slot leaf check.
            ("3fff:1:2:3:4:5:6:7/128", 130),
        ]);
        let answers = [
            ("::", Some(0)),
            ("fbff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", Some(0)),
            ("fc00::", Some(0)),
            ("fd01::", Some(15)),
            ("fd02::", Some(0)),
            ("fd00::", Some(16)),
            ("fd00:0:0:1:ffff:ffff:ffff:ffff", Some(16)),
            ("fd00:0:0:2::1", Some(63)),
            ("fd00:0:0:3::", Some(64)),
            ("fd00:0:0:3:7fff:ffff:ffff:ffff", Some(64)),
            ("fd00:0:0:3:8000::", Some(65)),
            ("fd00:0:0:3:80ff::", Some(65)),
            ("fd00:0:0:3:8100::", Some(127)),
            ("fd00:0:0:3:8100::1", Some(128)),
            ("fd00:0:0:3:8100::2", Some(72)),
            ("fd00:0:0:3:81ff:ffff:ffff:ffff", Some(72)),
            ("fd00:0:0:3:8200::", Some(65)),
            ("fd00:0:0:3:ffff:ffff:ffff:ffff", Some(65)),
            ("fd00:0:0:4::", Some(16)),
            ("fe00::", Some(0)),
            ("2001:db8::", Some(32)),
            ("2001:db8::1", Some(129)),
            ("2001:db8::2", Some(32)),
            ("2001:db8:1:2:3:4:ffff:ffff", Some(96)),
            ("2001:db8:1:2:3:5::1", Some(97)),
            ("2001:db8:1:2:3:6::", Some(32)),
            // Differs from the pair only in bits a compressed node skipped.
            ("2001:db8:1:2:9:4::", Some(32)),
            ("2001:db8:ff01:2:3:4::", Some(32)),
            ("2001:db9::", Some(0)),
            ("3fff:1:2:3:4:5:6:7", Some(130)),
            ("3fff:1:2:3:4:5:6:6", Some(0)),
            ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", Some(0)),
        ];
        let snap = AllowedIps::from_entries(entries.iter());
        for (a, want) in answers {
            let addr: std::net::Ipv6Addr = a.parse().unwrap();
            assert_eq!(snap.lookup(addr.into()), want, "{a}");
            assert_eq!(snap.lookup_v6(addr.octets()), want, "{a}");
        }
        assert_eq!(snap.lookup_v4([10, 0, 0, 1]), None);
        entries.remove(&"::/0".parse().unwrap());
        let snap = AllowedIps::from_entries(entries.iter());
        for (a, want) in answers {
            assert_eq!(snap.lookup(a.parse().unwrap()), want.filter(|&v| v != 0), "{a}");
        }
        let snap = AllowedIps::from_entries(table(&[("::/0", 7)]).iter());
        assert_eq!(snap.lookup("fd00::1".parse().unwrap()), Some(7));
        assert_eq!(snap.lookup("10.0.0.1".parse().unwrap()), None);
    }

    #[test]
    fn empty_table_and_repeated_prefixes() {
        let empty = AllowedIps::<u32>::from_entries([]);
        assert_eq!(empty.lookup("10.0.0.1".parse().unwrap()), None);
        assert_eq!(empty.lookup("::1".parse().unwrap()), None);
        assert_eq!(empty.trie_bytes(), (0, 0));
        assert_eq!(AllowedIps::<u32>::default().lookup_v4([0; 4]), None);
        // As when inserting one after the other: the last value given wins.
        let (p4, p6): (IpPrefix, IpPrefix) = ("10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap());
        let snap = AllowedIps::from_entries([(&p4, &1), (&p6, &1), (&p4, &2), (&p6, &3), (&p4, &4)]);
        assert_eq!(snap.lookup_v4([10, 1, 2, 3]), Some(4));
        assert_eq!(snap.lookup("fd00::1".parse().unwrap()), Some(3));
    }

    /// The benchmark's 10 000 random prefixes per family (benches/benches/allowed_ips.rs):
    /// prints what the tries take and keeps it from growing unnoticed.
    #[test]
    fn memory_of_10000_random_prefixes() {
        let mut rng = 0x1234_5678_9abc_def0u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let (mut v4, mut v6) = (BTreeMap::new(), BTreeMap::new());
        for i in 0..10_000u32 {
            let p4 = IpPrefix::new(Ipv4Addr::from(next() as u32).into(), 8 + (i % 25) as u8).unwrap();
            let a6 = Ipv6Addr::from((0xfd00u128 << 112) | u128::from(next()) << 40);
            v4.insert(p4, i);
            v6.insert(IpPrefix::new(a6.into(), 24 + (i % 100) as u8).unwrap(), i);
        }
        let (b4, _) = AllowedIps::from_entries(v4.iter()).trie_bytes();
        let (_, b6) = AllowedIps::from_entries(v6.iter()).trie_bytes();
        eprintln!("10 000 random prefixes: IPv4 trie {b4} bytes, IPv6 trie {b6} bytes");
        assert!(b4 < 12 << 20, "IPv4 trie takes {b4} bytes");
        assert!(b6 < 2 << 20, "IPv6 trie takes {b6} bytes");
    }

    /// The worst shapes a writer could configure cost a bounded amount per
    /// prefix: /32s each in its own /16 (two chunks each), and IPv6 /128s that
    /// branch at every byte (no path to compress).
    #[test]
    fn memory_per_prefix_is_bounded_for_adversarial_sets() {
        let n = 4000usize;
        let v4: BTreeMap<IpPrefix, u32> =
            (0..n as u32).map(|i| (IpPrefix::new(Ipv4Addr::from(i << 16 | 0x0101).into(), 32).unwrap(), i)).collect();
        let v6: BTreeMap<IpPrefix, u32> = (0..n as u128)
            .map(|i| {
                let spread = (i & 0xff) << 120 | ((i >> 8) & 0xff) << 56 | (i * 0x9e37_79b9) & 0xffff_ffff;
                (IpPrefix::new(Ipv6Addr::from(spread).into(), 128).unwrap(), i as u32)
            })
            .collect();
        let (b4, _) = AllowedIps::from_entries(v4.iter()).trie_bytes();
        let (_, b6) = AllowedIps::from_entries(v6.iter()).trie_bytes();
        eprintln!("{n} adversarial prefixes: IPv4 trie {b4} bytes, IPv6 trie {b6} bytes");
        assert!(b4 <= 2200 * n + (256 << 10), "IPv4: {b4} bytes for {n} prefixes");
        assert!(b6 <= 2300 * n + (256 << 10), "IPv6: {b6} bytes for {n} prefixes");
    }

    /// Addresses near `base`: random below a random number of shared leading bits.
    fn near_v4(base: u32, noise: u32, shared: u32) -> Ipv4Addr {
        Ipv4Addr::from(base ^ noise.checked_shr(shared).unwrap_or(0))
    }

    fn near_v6(base: u128, noise: u128, shared: u32) -> Ipv6Addr {
        Ipv6Addr::from(base ^ noise.checked_shr(shared).unwrap_or(0))
    }

    const BASES_V4: [u32; 3] = [0x0a00_0000, 0xc0a8_8000, 0x0000_00ff];
    const BASES_V6: [u128; 3] = [
        0xfd00_0000_0000_0001_0000_0000_0000_0000,
        0x2001_0db8_0000_0000_0000_0000_0000_0000,
        0xffff_ffff_ffff_ffff_ffff_ffff_ffff_ffff,
    ];

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
            for snap in v4_variants(&entries) {
                for (a, _) in entries.iter() {
                    prop_assert_eq!(snap.lookup(a.addr()), naive(&entries, a.addr()));
                }
                for &p in &probes {
                    let addr = Ipv4Addr::from(p).into();
                    prop_assert_eq!(snap.lookup(addr), naive(&entries, addr));
                }
            }
        }

        /// Prefixes clustered around a few addresses, so they nest and share
        /// long runs of bits; probes near the same addresses.
        #[test]
        fn clustered_tables_match_reference(
            prefixes in proptest::collection::vec((0usize..3, any::<u128>(), 0u32..=128, 0u8..=128, 0u32..8), 0..60),
            probes in proptest::collection::vec((0usize..3, any::<u128>(), 0u32..=128), 1..60),
        ) {
            let mut entries = BTreeMap::new();
            for &(b, noise, shared, len, v) in &prefixes {
                let v4 = near_v4(BASES_V4[b], noise as u32, shared / 4);
                entries.insert(IpPrefix::new(v4.into(), len / 4).unwrap(), v);
                entries.insert(IpPrefix::new(near_v6(BASES_V6[b], noise, shared).into(), len).unwrap(), v);
            }
            let probes: Vec<IpAddr> = probes
                .iter()
                .flat_map(|&(b, noise, shared)| {
                    [near_v4(BASES_V4[b], noise as u32, shared / 4).into(), near_v6(BASES_V6[b], noise, shared).into()]
                })
                .chain(entries.keys().map(|p| p.addr()))
                .collect();
            for snap in v4_variants(&entries) {
                for &addr in &probes {
                    prop_assert_eq!(snap.lookup(addr), naive(&entries, addr), "lookup {}", addr);
                }
            }
        }

        /// Writers' operations in any order: every published snapshot answers
        /// as the naive search over the entries the writers asked for.
        #[test]
        fn shared_table_rebuilds_match_reference(
            ops in proptest::collection::vec(
                (0u32..4, proptest::collection::vec((0usize..3, any::<u128>(), 0u32..=128, 0u8..=128, any::<bool>()), 0..6)),
                1..12,
            ),
            probes in proptest::collection::vec((0usize..3, any::<u128>(), 0u32..=128, any::<bool>()), 1..30),
        ) {
            let shared = SharedAllowedIps::default();
            let mut model = BTreeMap::new();
            let probes: Vec<IpAddr> = probes
                .iter()
                .map(|&(b, noise, shared, v4)| {
                    if v4 { near_v4(BASES_V4[b], noise as u32, shared / 4).into() } else { near_v6(BASES_V6[b], noise, shared).into() }
                })
                .collect();
            for (value, prefixes) in ops {
                // An empty list removes the value, as `remove_value` does.
                let prefixes: Vec<IpPrefix> = prefixes
                    .iter()
                    .map(|&(b, noise, shared, len, v4)| {
                        if v4 {
                            IpPrefix::new(near_v4(BASES_V4[b], noise as u32, shared / 4).into(), len / 4).unwrap()
                        } else {
                            IpPrefix::new(near_v6(BASES_V6[b], noise, shared).into(), len).unwrap()
                        }
                    })
                    .collect();
                if prefixes.is_empty() {
                    shared.remove_value(value);
                } else {
                    shared.set_prefixes(value, &prefixes);
                }
                model.retain(|_, v| *v != value);
                model.extend(prefixes.iter().map(|p| (*p, value)));
                prop_assert_eq!(shared.entries(), model.iter().map(|(p, v)| (*p, *v)).collect::<Vec<_>>());
                let snap = shared.load();
                for &addr in probes.iter().chain(model.keys().map(|p| p.addr()).collect::<Vec<_>>().iter()) {
                    prop_assert_eq!(snap.lookup(addr), naive(&model, addr), "lookup {}", addr);
                }
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
