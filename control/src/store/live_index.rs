//! What the conflict checks ask of the live gateways (all but `deleted`),
//! kept in memory so that a create costs O(log n), not a scan of every
//! gateway: which gateway has a remote network overlapping a prefix, and
//! which has a remote key. The store keeps it exact under its connection
//! lock: every write that changes a gateway's networks, key or liveness
//! updates it after the database took the write.
//!
//! Remote networks of live gateways never overlap (the API refuses it), so
//! only two kinds of entry can overlap a queried range [a, b]: those that
//! start inside it, and the one entry that starts before `a` and may reach
//! into it (the last to start before `a`).

use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;
use wgxdp_dataplane::noise::PublicKey;
use wgxdp_dataplane::table::IpPrefix;

/// A prefix as a range of addresses of one IP version: (is IPv6, first, last).
pub fn address_range(p: &IpPrefix) -> (bool, u128, u128) {
    let (v6, bits, first) = match p.addr() {
        IpAddr::V4(a) => (false, 32, u128::from(u32::from(a))),
        IpAddr::V6(a) => (true, 128, u128::from(a)),
    };
    let host_bits = bits - u32::from(p.prefix_len());
    let span = if host_bits >= 128 { u128::MAX } else { (1u128 << host_bits) - 1 };
    (v6, first, first + span)
}

/// The prefix whose `address_range` is (v6, first, last).
fn prefix_of(v6: bool, first: u128, last: u128) -> Option<IpPrefix> {
    let host_bits = (last - first).count_ones() as u8;
    let (addr, bits) =
        if v6 { (IpAddr::V6(first.into()), 128) } else { (IpAddr::V4(u32::try_from(first).ok()?.into()), 32) };
    IpPrefix::new(addr, bits - host_bits).ok()
}

#[derive(Debug, Default)]
struct Entry {
    key: Option<PublicKey>,
    networks: Vec<IpPrefix>,
}

#[derive(Debug, Default)]
pub struct LiveIndex {
    /// (is IPv6, first, last, gateway id) of every remote network.
    ranges: BTreeSet<(bool, u128, u128, String)>,
    gateways: HashMap<String, Entry>,
    /// Remote public key → gateway id.
    keys: HashMap<PublicKey, String>,
    /// Remote networks per address family (IPv4, IPv6).
    counts: [usize; 2],
    /// Two live remote networks overlap (a database from before the checks,
    /// or edited by hand): `overlap` can no longer rely on disjoint entries
    /// and scans them all.
    overlapping: bool,
}

impl LiveIndex {
    /// Gateway `id` now has `key` (none: its stored key does not decode) and
    /// `networks` (replacing what it had).
    pub fn put(&mut self, id: &str, key: Option<PublicKey>, networks: Vec<IpPrefix>) {
        self.remove(id);
        for p in &networks {
            if !self.overlapping {
                if let Some((other, q)) = self.overlap(p, None) {
                    tracing::warn!(gateway = %id, %p, other = %other, %q, "live remote networks overlap; conflict checks scan");
                    self.overlapping = true;
                }
            }
            let (v6, first, last) = address_range(p);
            self.ranges.insert((v6, first, last, id.to_owned()));
            self.counts[usize::from(v6)] += 1;
        }
        if let Some(key) = key {
            self.keys.insert(key, id.to_owned());
        }
        self.gateways.insert(id.to_owned(), Entry { key, networks });
    }

    /// Gateway `id` is no longer live.
    pub fn remove(&mut self, id: &str) {
        let Some(old) = self.gateways.remove(id) else { return };
        for p in &old.networks {
            let (v6, first, last) = address_range(p);
            self.ranges.remove(&(v6, first, last, id.to_owned()));
            self.counts[usize::from(v6)] -= 1;
        }
        if let Some(key) = old.key.filter(|k| self.keys.get(k).is_some_and(|owner| owner == id)) {
            self.keys.remove(&key);
        }
    }

    /// A live gateway other than `except` with a remote network `prefix`
    /// overlaps, and that network.
    pub fn overlap(&self, prefix: &IpPrefix, except: Option<&str>) -> Option<(String, IpPrefix)> {
        let (v6, a, b) = address_range(prefix);
        let other = |id: &String| Some(id.as_str()) != except;
        let found =
            |(_, first, last, id): &(bool, u128, u128, String)| Some((id.clone(), prefix_of(v6, *first, *last)?));
        if self.overlapping {
            return self.ranges.iter().filter(|e| e.0 == v6 && e.1 <= b && e.2 >= a && other(&e.3)).find_map(found);
        }
        // Starting inside [a, b].
        let inside = self.ranges.range((v6, a, 0, String::new())..).take_while(|e| e.0 == v6 && e.1 <= b);
        if let Some(hit) = inside.filter(|e| other(&e.3)).find_map(&found) {
            return Some(hit);
        }
        // Starting before `a` and reaching it: with disjoint entries, only
        // the last ones to start before `a` can (one per gateway `except` skips).
        self.ranges
            .range(..(v6, a, 0, String::new()))
            .rev()
            .take_while(|e| e.0 == v6)
            .filter(|e| other(&e.3))
            .take(1)
            .filter(|e| e.2 >= a)
            .find_map(found)
    }

    /// The live gateway (other than `except`) whose remote key is `key`.
    pub fn key_owner(&self, key: &PublicKey, except: Option<&str>) -> Option<&str> {
        self.keys.get(key).map(String::as_str).filter(|id| Some(*id) != except)
    }

    /// How many remote networks of one family (`v6`) the live gateways
    /// other than `except` route.
    pub fn network_count(&self, v6: bool, except: Option<&str>) -> usize {
        let own = except
            .and_then(|id| self.gateways.get(id))
            .map_or(0, |g| g.networks.iter().filter(|p| p.addr().is_ipv6() == v6).count());
        self.counts[usize::from(v6)] - own
    }

    pub fn len(&self) -> usize {
        self.gateways.len()
    }

    pub fn is_empty(&self) -> bool {
        self.gateways.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> IpPrefix {
        s.parse().unwrap()
    }

    fn k(tag: &str) -> Option<PublicKey> {
        Some(crate::store::test_key(tag))
    }

    fn overlapping(x: &IpPrefix, y: &IpPrefix) -> bool {
        let (a, b) = (address_range(x), address_range(y));
        a.0 == b.0 && a.1 <= b.2 && b.1 <= a.2
    }

    /// The index against a plain scan of every entry, on random disjoint sets.
    #[test]
    fn overlap_agrees_with_a_scan() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for round in 0..200 {
            let mut index = LiveIndex::default();
            let mut held: Vec<(String, IpPrefix)> = Vec::new();
            for g in 0..20 {
                let id = format!("vpn_{g}");
                let mut nets = Vec::new();
                for _ in 0..(next() % 4) {
                    let len = 8 + (next() % 17) as u8;
                    let addr = std::net::Ipv4Addr::from((next() as u32) & (u32::MAX << (32 - len)));
                    let net = IpPrefix::new(IpAddr::V4(addr), len).unwrap();
                    if !held.iter().map(|(_, q)| q).chain(&nets).any(|q| overlapping(q, &net)) {
                        nets.push(net);
                    }
                }
                held.extend(nets.iter().map(|n| (id.clone(), *n)));
                index.put(&id, k(&format!("key{g}")), nets);
            }
            for _ in 0..50 {
                let len = (next() % 33) as u8;
                let addr =
                    std::net::Ipv4Addr::from((next() as u32) & u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0));
                let q = IpPrefix::new(IpAddr::V4(addr), len).unwrap();
                let except = (next() % 3 == 0).then(|| format!("vpn_{}", next() % 20));
                let scan = held.iter().filter(|(id, _)| Some(id) != except.as_ref()).any(|(_, n)| overlapping(n, &q));
                let found = index.overlap(&q, except.as_deref());
                assert_eq!(found.is_some(), scan, "round {round}: {q} except {except:?}: {found:?}");
                if let Some((id, n)) = found {
                    assert!(overlapping(&n, &q) && Some(&id) != except.as_ref());
                    assert!(held.contains(&(id, n)));
                }
            }
        }
    }

    #[test]
    fn overlapping_entries_from_an_old_database_are_still_found() {
        let mut index = LiveIndex::default();
        index.put("vpn_a", k("KA"), vec![p("10.0.0.0/8")]);
        index.put("vpn_b", k("KB"), vec![p("10.1.0.0/16")]);
        assert_eq!(index.overlap(&p("10.2.0.0/16"), None), Some(("vpn_a".into(), p("10.0.0.0/8"))));
        assert_eq!(index.overlap(&p("10.1.2.0/24"), Some("vpn_b")), Some(("vpn_a".into(), p("10.0.0.0/8"))));
        let mut within = LiveIndex::default();
        within.put("vpn_c", k("KC"), vec![p("fd00::/8"), p("fd01::/16")]);
        assert_eq!(within.overlap(&p("fd02::/16"), None), Some(("vpn_c".into(), p("fd00::/8"))));
    }

    #[test]
    fn put_replaces_and_remove_forgets() {
        let mut index = LiveIndex::default();
        index.put("vpn_a", k("KA"), vec![p("10.1.0.0/16"), p("fd01::/64")]);
        index.put("vpn_b", k("KB"), vec![p("10.2.0.0/16")]);
        assert_eq!(index.overlap(&p("10.1.2.0/24"), None), Some(("vpn_a".into(), p("10.1.0.0/16"))));
        assert_eq!(index.overlap(&p("10.0.0.0/8"), Some("vpn_a")), Some(("vpn_b".into(), p("10.2.0.0/16"))));
        assert_eq!((index.network_count(false, None), index.network_count(true, None)), (2, 1));
        assert_eq!((index.network_count(false, Some("vpn_a")), index.network_count(true, Some("vpn_a"))), (1, 0));
        assert_eq!(index.overlap(&p("fd01::1/128"), None), Some(("vpn_a".into(), p("fd01::/64"))));
        assert_eq!(index.overlap(&p("10.1.0.0/16"), Some("vpn_a")), None);
        assert_eq!(index.overlap(&p("::/0"), Some("vpn_a")), None, "IPv6 ranges are apart from IPv4 ones");
        assert_eq!(index.key_owner(&k("KA").unwrap(), None), Some("vpn_a"));
        assert_eq!(index.key_owner(&k("KA").unwrap(), Some("vpn_a")), None);
        index.put("vpn_a", k("KA2"), vec![p("10.3.0.0/16")]);
        assert_eq!(index.overlap(&p("10.1.0.0/16"), None), None, "the old networks are gone");
        assert_eq!(
            (index.key_owner(&k("KA").unwrap(), None), index.key_owner(&k("KA2").unwrap(), None)),
            (None, Some("vpn_a"))
        );
        index.remove("vpn_a");
        index.remove("vpn_a");
        assert_eq!((index.network_count(false, None), index.network_count(true, None)), (1, 0));
        assert_eq!((index.overlap(&p("10.3.0.0/16"), None), index.len()), (None, 1));
        assert_eq!(address_range(&p("0.0.0.0/0")), (false, 0, u128::from(u32::MAX)));
        assert_eq!(address_range(&p("::/0")), (true, 0, u128::MAX));
    }
}
