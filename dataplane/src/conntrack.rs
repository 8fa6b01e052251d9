//! The connection table: flows the site side opened into a tunnel, so that
//! their replies are let back in whatever the tunnel's firewall says (a
//! deny-all-inbound site still works for LAN-initiated traffic).
//!
//! One table for the whole gateway, not one per worker: a flow's packets
//! towards the tunnel arrive on the LAN queue RSS picks for the inner 5-tuple,
//! its replies on the WAN queue RSS picks for the peer's outer UDP 4-tuple, so
//! the two directions are usually seen by different workers.
//!
//! Bounded and lock-free: a fixed array of 4-way sets (one cache line each),
//! allocated once. A flow is a 64-bit tag (a keyed hash of peer, protocol,
//! addresses and ports/identifier, keyed with a random secret so a remote site
//! cannot aim floods at chosen sets or forge tags), the second it was last
//! seen and its idle-timeout class. An insert takes, in order: the flow's own
//! slot, an empty or expired slot, or else evicts the least recently seen
//! flow of the set; evictions are counted.
//!
//! Only packets from the site side open flows, and for TCP only a SYN or a
//! mid-stream segment (a connection picked up after a restart or a policy
//! change): a LAN host's SYN-ACK or RST answering the remote site opens
//! nothing. And a flow is opened only when the tunnel's rules would not let
//! its replies in anyway (`worker::track_outbound`), so a remote site using a
//! LAN service it is allowed to reach creates no entries at all. Writers race benignly: two workers writing one slot
//! leave one of the flows, and the other is tracked again by its next packet.
//! The fragments of admitted packets (which a remote site causes) live in a
//! separate, smaller array, so they can never push out the site side's flows.
//!
//! Timeouts (seconds of idleness): TCP 7440 once both sides spoke (RFC
//! 5382's two hours and four minutes), a TCP connection being opened and UDP
//! 180 (RFC 4787 asks for at least 120), ICMP echo 30, other protocols 600,
//! fragments of an admitted first fragment 30.

use crate::flow::{Flow, Transport};
use crate::wire::ip_protocol;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};

/// Ways per set: four 16-byte slots fill one 64-byte cache line.
const WAYS: usize = 4;
/// The default capacity, in flows.
pub const DEFAULT_FLOWS: usize = 65_536;

/// How long a flow lives idle; two bits of its slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u32)]
pub enum Idle {
    /// ICMP echo, fragments.
    Short = 0,
    /// UDP, a TCP connection being opened.
    Medium = 1,
    /// Other protocols.
    Long = 2,
    /// TCP once both sides spoke.
    Established = 3,
}

impl Idle {
    pub const fn seconds(self) -> u32 {
        match self {
            Idle::Short => 30,
            Idle::Medium => 180,
            Idle::Long => 600,
            Idle::Established => 7440,
        }
    }

    fn from_bits(bits: u32) -> Self {
        match bits & 3 {
            0 => Idle::Short,
            1 => Idle::Medium,
            2 => Idle::Long,
            _ => Idle::Established,
        }
    }
}

/// The last second the table's clock can say (30 bits: 34 years).
const MAX_SECS: u32 = (1 << 30) - 1;

/// A flow as the table names it, oriented from the site side ("local") to
/// the remote site.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowKey {
    peer: u32,
    protocol: u8,
    /// 0: a flow; 1: the fragments of one admitted packet.
    fragments: bool,
    local: u128,
    remote: u128,
    /// Local port << 16 | remote port; echo identifier << 16; fragment id.
    ids: u32,
    idle: Idle,
    /// Whether this packet may start tracking the flow (not just refresh it).
    opens: bool,
}

fn idle_of(protocol: u8) -> Idle {
    match protocol {
        ip_protocol::TCP => Idle::Established,
        ip_protocol::UDP => Idle::Medium,
        ip_protocol::ICMP | ip_protocol::ICMPV6 => Idle::Short,
        _ => Idle::Long,
    }
}

impl FlowKey {
    fn new(peer: u32, protocol: u8, local: std::net::IpAddr, remote: std::net::IpAddr, ids: u32) -> Self {
        let key = crate::table::addr_key;
        Self {
            peer,
            protocol,
            fragments: false,
            local: key(local),
            remote: key(remote),
            ids,
            idle: idle_of(protocol),
            opens: true,
        }
    }

    /// The flow a packet from the site side towards `peer`'s remote site opens
    /// or continues; `None` for what belongs to no flow (errors, echo
    /// replies, other ICMP messages, later fragments). A TCP segment opens
    /// the flow only as a SYN or mid-stream (not a SYN-ACK, RST or FIN: those
    /// answer or end what the remote site opened); it refreshes it anyway.
    pub fn of_outbound(peer: u32, flow: &Flow) -> Option<Self> {
        let ids = match flow.transport {
            Transport::Ports { src, dst } => u32::from(src) << 16 | u32::from(dst),
            Transport::Echo { id, request: true } => u32::from(id) << 16,
            Transport::Other if !flow.is_icmp() => 0,
            Transport::Other
            | Transport::Echo { request: false, .. }
            | Transport::IcmpError(_)
            | Transport::LaterFragment => return None,
        };
        let mut key = Self::new(peer, flow.protocol, flow.src, flow.dst, ids);
        if flow.protocol == ip_protocol::TCP {
            use crate::flow::tcp_flags::{ACK, FIN, RST, SYN};
            let f = flow.tcp_flags;
            let syn = f & (SYN | ACK | RST | FIN) == SYN;
            let mid_stream = f & ACK != 0 && f & (SYN | RST | FIN) == 0;
            key.opens = syn || mid_stream;
            if syn {
                key.idle = Idle::Medium;
            }
        }
        Some(key)
    }

    /// The tracked flow a packet from `peer`'s remote site would answer: a
    /// reply, an ICMP error about a packet the site side sent (addressed to
    /// that packet's sender), or a later fragment of an admitted packet.
    pub fn of_reply(peer: u32, flow: &Flow) -> Option<Self> {
        match flow.transport {
            Transport::Ports { src, dst } => {
                Some(Self::new(peer, flow.protocol, flow.dst, flow.src, u32::from(dst) << 16 | u32::from(src)))
            }
            Transport::Echo { id, request: false } => {
                Some(Self::new(peer, flow.protocol, flow.dst, flow.src, u32::from(id) << 16))
            }
            Transport::Echo { request: true, .. } => None,
            Transport::IcmpError(q) if q.src == flow.dst => {
                Some(Self::new(peer, q.protocol, q.src, q.dst, u32::from(q.ids.0) << 16 | u32::from(q.ids.1)))
            }
            Transport::IcmpError(_) => None,
            Transport::Other if !flow.is_icmp() => Some(Self::new(peer, flow.protocol, flow.dst, flow.src, 0)),
            Transport::Other => None,
            Transport::LaterFragment => Self::fragments_of(peer, flow),
        }
    }

    /// For the first fragment of a packet from the remote site: the key its
    /// later fragments are admitted by.
    pub fn first_fragment(peer: u32, flow: &Flow) -> Option<Self> {
        if flow.is_first_fragment() {
            Self::fragments_of(peer, flow)
        } else {
            None
        }
    }

    fn fragments_of(peer: u32, flow: &Flow) -> Option<Self> {
        let id = flow.fragment?;
        let mut key = Self::new(peer, flow.protocol, flow.dst, flow.src, id);
        key.fragments = true;
        key.idle = Idle::Short;
        Some(key)
    }
}

#[derive(Debug, Default)]
#[repr(C)]
struct Slot {
    /// 0: empty.
    tag: AtomicU64,
    /// The second the flow was last seen (see `ConnTrack::now_secs`) << 2,
    /// and its `Idle` class in the low two bits.
    seen: AtomicU32,
}

impl Slot {
    /// When the flow was last seen, if it is still live at `now`.
    #[inline]
    fn live_since(&self, now: u32) -> Option<u32> {
        let word = self.seen.load(Relaxed);
        let (seen, idle) = (word >> 2, Idle::from_bits(word));
        (seen + idle.seconds() >= now).then_some(seen)
    }

    /// Seen at `now`, with at least class `idle` (a flow only gets longer-lived).
    /// No write when nothing changes: packets of the same second on several
    /// workers do not bounce the cache line.
    #[inline]
    fn touch(&self, now: u32, idle: Idle) {
        let old = self.seen.load(Relaxed);
        let new = now << 2 | (old & 3).max(idle as u32);
        if new > old {
            self.seen.store(new, Relaxed);
        }
    }
}

#[derive(Debug, Default)]
#[repr(C, align(64))]
struct Set {
    ways: [Slot; WAYS],
}

/// Counters of the connection table (relaxed atomics, read for metrics).
#[derive(Debug, Default)]
pub struct ConnTrackCounters {
    /// Flows newly tracked.
    pub inserts: AtomicU64,
    /// Live flows pushed out by new ones (the table was full in their set).
    pub evictions: AtomicU64,
    /// Packets from a remote site let in as part of a tracked flow (counted
    /// per packet by every worker: striped, so no cache line bounces).
    pub replies: StripedCounter,
}

/// Threads a striped counter spreads over (more threads share stripes).
const STRIPES: usize = 16;

/// A counter that many threads add to per packet without sharing a cache
/// line: each thread adds to its own stripe; reading sums them.
#[derive(Debug, Default)]
pub struct StripedCounter {
    stripes: [Stripe; STRIPES],
}

#[derive(Debug, Default)]
#[repr(align(64))]
struct Stripe(AtomicU64);

impl StripedCounter {
    #[inline]
    pub fn add(&self, n: u64) {
        thread_local! {
            static STRIPE: usize = {
                static NEXT: AtomicU64 = AtomicU64::new(0);
                NEXT.fetch_add(1, Relaxed) as usize % STRIPES
            };
        }
        let i = STRIPE.with(|s| *s);
        self.stripes[i % STRIPES].0.fetch_add(n, Relaxed);
    }

    pub fn load(&self) -> u64 {
        self.stripes.iter().map(|s| s.0.load(Relaxed)).sum()
    }
}

/// The bounded, lock-free connection table: flows, and (apart, so that a
/// site sending many fragmented packets cannot push out the site side's
/// flows) the fragments of admitted packets.
#[derive(Debug)]
pub struct ConnTrack {
    flows: Sets,
    fragments: Sets,
    keys: [u64; 3],
    pub counters: ConnTrackCounters,
}

/// A power-of-two array of sets.
#[derive(Debug)]
struct Sets {
    sets: Box<[Set]>,
    mask: usize,
}

impl Sets {
    fn new(slots: usize) -> Self {
        let sets = slots.div_ceil(WAYS).max(1).next_power_of_two();
        Self { sets: (0..sets).map(|_| Set::default()).collect(), mask: sets - 1 }
    }

    #[inline]
    fn set(&self, tag: u64) -> &Set {
        &self.sets[(tag >> 32) as usize & self.mask]
    }

    fn slots(&self) -> usize {
        self.sets.len() * WAYS
    }

    fn live(&self, now: u32) -> usize {
        let slots = self.sets.iter().flat_map(|s| &s.ways);
        slots.filter(|s| s.tag.load(Relaxed) != 0 && s.live_since(now).is_some()).count()
    }
}

/// The high and low halves of a 128-bit product, folded (as in ahash).
#[inline]
fn fold(a: u64, b: u64) -> u64 {
    let r = u128::from(a) * u128::from(b);
    (r as u64) ^ ((r >> 64) as u64)
}

const MULTIPLE: u64 = 0x5851_f42d_4c95_7f2d;

impl ConnTrack {
    /// A table for at least `flows` flows (rounded up to a power of two sets).
    pub fn new(flows: usize) -> Self {
        let mut secret = [0u8; 24];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut secret);
        let word = |i: usize| u64::from_le_bytes(secret[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        Self::with_keys(flows, [word(0), word(1), word(2)])
    }

    fn with_keys(flows: usize, keys: [u64; 3]) -> Self {
        let fragments = (flows / 16).max(1024);
        Self { flows: Sets::new(flows), fragments: Sets::new(fragments), keys, counters: Default::default() }
    }

    /// How many flows the table holds at most.
    pub fn capacity(&self) -> usize {
        self.flows.slots()
    }

    /// The table's clock: whole seconds since the process epoch, from 1.
    pub fn now_secs(now: std::time::Instant) -> u32 {
        (crate::peer_view::monotonic_nanos(now) / 1_000_000_000).min(u64::from(MAX_SECS - 1)) as u32 + 1
    }

    #[inline]
    fn tag(&self, key: &FlowKey) -> u64 {
        let [k0, k1, k2] = self.keys;
        let mut h = k0;
        for w in [
            key.local as u64,
            (key.local >> 64) as u64,
            key.remote as u64,
            (key.remote >> 64) as u64,
            u64::from(key.peer) << 32 | u64::from(key.ids),
            u64::from(key.protocol) | u64::from(key.fragments) << 8,
        ] {
            h = fold(h ^ w, MULTIPLE ^ k1);
        }
        match fold(h, k2).rotate_left(23) {
            0 => 1,
            t => t,
        }
    }

    #[inline]
    fn set(&self, key: &FlowKey, tag: u64) -> &Set {
        if key.fragments {
            self.fragments.set(tag)
        } else {
            self.flows.set(tag)
        }
    }

    /// Whether `key` is tracked (and live) at `now`, for a packet from the
    /// remote site; a hit refreshes it (a TCP flow is then established).
    #[inline]
    pub fn refresh(&self, key: &FlowKey, now: u32) -> bool {
        let tag = self.tag(key);
        for slot in &self.set(key, tag).ways {
            if slot.tag.load(Relaxed) == tag && slot.live_since(now).is_some() {
                slot.touch(now, key.idle);
                self.counters.replies.add(1);
                return true;
            }
        }
        false
    }

    /// Tracks `key` from `now` for a packet from the site side: refreshes it
    /// if tracked, else starts tracking it if the packet may open it.
    #[inline]
    pub fn track(&self, key: &FlowKey, now: u32) {
        self.track_if(key, now, || true);
    }

    /// As `track`, but a new entry is made only if `needed()` says so (asked
    /// only then: once per new flow, not per packet).
    #[inline]
    pub fn track_if(&self, key: &FlowKey, now: u32, needed: impl FnOnce() -> bool) {
        let tag = self.tag(key);
        let set = self.set(key, tag);
        let mut victim = &set.ways[0];
        let mut victim_seen = u32::MAX;
        for slot in &set.ways {
            let live = if slot.tag.load(Relaxed) == 0 { None } else { slot.live_since(now) };
            if live.is_some() && slot.tag.load(Relaxed) == tag {
                return slot.touch(now, key.idle);
            }
            // Empty and expired slots first (as seen at 0), then the least recently seen.
            let seen = live.unwrap_or(0);
            if seen < victim_seen {
                victim = slot;
                victim_seen = seen;
            }
        }
        if !key.opens || !needed() {
            return;
        }
        if victim_seen != 0 {
            self.counters.evictions.fetch_add(1, Relaxed);
        }
        self.counters.inserts.fetch_add(1, Relaxed);
        victim.tag.store(tag, Relaxed);
        victim.seen.store(now << 2 | key.idle as u32, Relaxed);
    }

    /// Live flows at `now` (a scan: for metrics, not the packet path).
    pub fn live(&self, now: u32) -> usize {
        self.flows.live(now)
    }

    /// (name, value) for metrics: capacity, live flows, inserts, evictions, replies.
    pub fn named(&self, now: u32) -> Vec<(&'static str, u64)> {
        vec![
            ("conntrack_capacity", self.capacity() as u64),
            ("conntrack_flows", self.live(now) as u64),
            ("conntrack_inserts", self.counters.inserts.load(Relaxed)),
            ("conntrack_evictions", self.counters.evictions.load(Relaxed)),
            ("conntrack_replies", self.counters.replies.load()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::net::IpAddr;

    fn udp(local: [u8; 4], lport: u16, remote: [u8; 4], rport: u16) -> Flow {
        Flow {
            src: IpAddr::from(local),
            dst: IpAddr::from(remote),
            protocol: ip_protocol::UDP,
            transport: Transport::Ports { src: lport, dst: rport },
            fragment: None,
            tcp_flags: 0,
            hop_limit: 64,
        }
    }

    fn reply(f: &Flow) -> Flow {
        let Transport::Ports { src, dst } = f.transport else { unreachable!() };
        Flow { src: f.dst, dst: f.src, transport: Transport::Ports { src: dst, dst: src }, ..*f }
    }

    #[test]
    fn replies_of_tracked_flows_and_nothing_else() {
        let t = ConnTrack::new(1024);
        let out = udp([10, 50, 0, 2], 40000, [10, 200, 0, 2], 53);
        t.track(&FlowKey::of_outbound(1, &out).unwrap(), 100);
        assert!(t.refresh(&FlowKey::of_reply(1, &reply(&out)).unwrap(), 101));
        // Another peer, another port, the same direction again: not replies.
        assert!(!t.refresh(&FlowKey::of_reply(2, &reply(&out)).unwrap(), 101));
        let other = udp([10, 50, 0, 2], 40001, [10, 200, 0, 2], 53);
        assert!(!t.refresh(&FlowKey::of_reply(1, &reply(&other)).unwrap(), 101));
        assert!(!t.refresh(&FlowKey::of_reply(1, &out).unwrap(), 101));
        // Idle past the UDP timeout: gone.
        assert!(!t.refresh(&FlowKey::of_reply(1, &reply(&out)).unwrap(), 101 + Idle::Medium.seconds() + 1));
        assert_eq!(t.counters.inserts.load(Relaxed), 1);
    }

    #[test]
    fn icmp_errors_about_our_packets_are_related() {
        let t = ConnTrack::new(64);
        let out = udp([10, 50, 0, 2], 40000, [10, 200, 0, 9], 53);
        t.track(&FlowKey::of_outbound(1, &out).unwrap(), 10);
        let quoted = crate::flow::Quoted { src: out.src, dst: out.dst, protocol: ip_protocol::UDP, ids: (40000, 53) };
        let error = Flow {
            src: IpAddr::from([10, 200, 0, 1]),
            dst: out.src,
            protocol: ip_protocol::ICMP,
            transport: Transport::IcmpError(quoted),
            fragment: None,
            tcp_flags: 0,
            hop_limit: 64,
        };
        assert!(t.refresh(&FlowKey::of_reply(1, &error).unwrap(), 11));
        // Aimed at someone else than the quoted sender: not related.
        let elsewhere = Flow { dst: IpAddr::from([10, 50, 0, 3]), ..error };
        assert!(FlowKey::of_reply(1, &elsewhere).is_none());
    }

    /// A full set evicts its least recently seen flow, never a fresher one,
    /// whatever their timeouts, and counts it.
    #[test]
    fn eviction_takes_the_stalest_flow_of_a_full_set() {
        let t = ConnTrack::with_keys(WAYS, [1, 2, 3]); // one set
        let flows: Vec<Flow> = (0..5).map(|i| udp([10, 50, 0, 2], 1000 + i, [10, 200, 0, 2], 53)).collect();
        let key = |f: &Flow| FlowKey::of_outbound(1, f).unwrap();
        for (i, f) in flows[..4].iter().enumerate() {
            t.track(&key(f), 10 + i as u32);
        }
        // Refresh the oldest: now flow 1 is the stalest.
        t.track(&key(&flows[0]), 20);
        t.track(&key(&flows[4]), 21);
        assert_eq!(t.counters.evictions.load(Relaxed), 1);
        let live = |f: &Flow| t.refresh(&FlowKey::of_reply(1, &reply(f)).unwrap(), 21);
        assert!(live(&flows[0]) && !live(&flows[1]) && live(&flows[2]) && live(&flows[3]) && live(&flows[4]));
        // An expired slot is reused before any live one is evicted.
        let later = 21 + Idle::Medium.seconds() + 1; // every flow idle past its timeout
        t.track(&key(&flows[1]), later);
        assert_eq!(t.counters.evictions.load(Relaxed), 1, "took an expired slot");
        assert_eq!(t.live(later), 1);
    }

    /// Only a SYN or a mid-stream segment from the site side opens a TCP
    /// flow: a LAN host's SYN-ACK or RST answering the remote site does not.
    #[test]
    fn tcp_flows_open_with_a_syn_or_mid_stream_only() {
        use crate::flow::tcp_flags::{ACK, RST, SYN};
        let t = ConnTrack::new(1024);
        let tcp = |lport: u16, flags: u8| Flow {
            protocol: ip_protocol::TCP,
            tcp_flags: flags,
            ..udp([10, 50, 0, 2], lport, [10, 200, 0, 2], 443)
        };
        let reply_of = |f: &Flow| FlowKey::of_reply(1, &reply(f)).unwrap();
        for (port, flags, opens) in [(1, SYN, true), (2, ACK, true), (3, SYN | ACK, false), (4, RST | ACK, false)] {
            let f = tcp(port, flags);
            t.track(&FlowKey::of_outbound(1, &f).unwrap(), 10);
            assert_eq!(t.refresh(&reply_of(&f), 10), opens, "flags {flags:#x}");
        }
        // A SYN's flow lives 180 s until the far side answers; then two hours.
        let syn = tcp(5, SYN);
        t.track(&FlowKey::of_outbound(1, &syn).unwrap(), 10);
        assert!(!t.refresh(&reply_of(&syn), 10 + Idle::Medium.seconds() + 1));
        let syn = tcp(6, SYN);
        t.track(&FlowKey::of_outbound(1, &syn).unwrap(), 10);
        assert!(t.refresh(&reply_of(&syn), 11), "the SYN-ACK");
        assert!(t.refresh(&reply_of(&syn), 11 + Idle::Medium.seconds() + 1), "established");
        // A SYN-ACK from the LAN still refreshes a flow it belongs to.
        let ack = tcp(2, SYN | ACK);
        t.track(&FlowKey::of_outbound(1, &ack).unwrap(), 5000);
        assert!(t.refresh(&reply_of(&ack), 5000));
        // ICMP messages other than echo belong to no flow.
        let other = Flow {
            protocol: ip_protocol::ICMP,
            transport: Transport::Other,
            ..udp([10, 50, 0, 2], 0, [10, 200, 0, 2], 0)
        };
        assert!(FlowKey::of_outbound(1, &other).is_none() && FlowKey::of_reply(1, &other).is_none());
    }

    /// A flood of admitted fragmented packets (each tracks its fragments)
    /// never pushes out a flow the site side opened.
    #[test]
    fn fragment_floods_cannot_evict_flows() {
        let t = ConnTrack::new(64);
        let out = udp([10, 50, 0, 2], 40000, [10, 200, 0, 2], 53);
        t.track(&FlowKey::of_outbound(1, &out).unwrap(), 10);
        for id in 0..100_000u32 {
            let first = Flow { fragment: Some(id), ..reply(&out) };
            t.track(&FlowKey::first_fragment(1, &first).unwrap(), 10);
        }
        assert!(t.refresh(&FlowKey::of_reply(1, &reply(&out)).unwrap(), 11));
        assert_eq!(t.live(11), 1);
    }

    proptest! {
        /// Under a flood of new flows the table never grows, the newest flow is
        /// always found, and every insert past capacity is an eviction or a
        /// reuse of an expired slot.
        #[test]
        fn bounded_under_a_flood(ports in proptest::collection::vec(any::<(u16, u16, u8)>(), 1..3000)) {
            let t = ConnTrack::new(256);
            let cap = t.capacity();
            for (i, &(a, b, host)) in ports.iter().enumerate() {
                let f = udp([10, 50, 0, host], a, [10, 200, 0, 2], b);
                let now = 100 + (i as u32) / 64;
                t.track(&FlowKey::of_outbound(7, &f).unwrap(), now);
                prop_assert!(t.refresh(&FlowKey::of_reply(7, &reply(&f)).unwrap(), now));
                prop_assert!(t.live(now) <= cap);
            }
            let inserts = t.counters.inserts.load(Relaxed) as usize;
            let evictions = t.counters.evictions.load(Relaxed) as usize;
            prop_assert!(inserts <= ports.len());
            prop_assert!(inserts - evictions <= cap, "{inserts} inserts, {evictions} evictions, capacity {cap}");
            prop_assert_eq!(std::mem::size_of::<Set>(), 64);
        }
    }

    #[test]
    fn striped_counts_add_up_across_threads() {
        let c = std::sync::Arc::new(StripedCounter::default());
        let threads: Vec<_> = (0..20)
            .map(|_| {
                let c = c.clone();
                std::thread::spawn(move || (0..1000).for_each(|_| c.add(1)))
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        c.add(5);
        assert_eq!(c.load(), 20_005, "20 threads over 16 stripes: every add counted");
    }
}
