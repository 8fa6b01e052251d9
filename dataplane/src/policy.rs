//! What a remote site may reach: the forwarding policy of one tunnel.
//!
//! A packet that enters from a remote site (decrypted, its source already
//! checked against the peer's allowed IPs) is forwarded only when
//!
//! 1. its destination is inside the tunnel's local networks (default deny
//!    outside the site: nothing reaches other networks the host can route to),
//!    and is not a multicast or broadcast group, link-local, loopback or
//!    otherwise special address;
//! 2. it answers a flow the site side opened (the connection table,
//!    `conntrack.rs`), or the tunnel's firewall rules allow it: evaluated in
//!    order, first match wins, no match takes the default action;
//! 3. its TTL / hop limit allows one more hop (decremented on the way).
//!
//! Packets to the gateway host's own addresses (and the directed broadcast of
//! its networks) are delivered to the host only when an `allow` rule whose
//! destination is that one address (/32 or /128) matches them: neither the
//! default action nor a rule written for the site's networks opens the host.
//!
//! The operator's policy (`ForwardingPolicy`) is compiled into a
//! `CompiledPolicy` that the control thread publishes into the peer's view;
//! workers read it lock-free, and count each rule's hits there.

use crate::conntrack::{ConnTrack, FlowKey};
use crate::drops::DropReason;
use crate::flow::{Flow, Transport};
use crate::table::IpPrefix;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Most firewall rules one tunnel carries.
pub const MAX_RULES: usize = 256;
/// Most local (or remote) networks one tunnel carries.
pub const MAX_NETWORKS: usize = 64;
/// Longest rule name, in characters.
pub const MAX_RULE_NAME: usize = 64;

/// Which traffic a rule is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RuleProtocol {
    Tcp,
    Udp,
    /// ICMP for IPv4, ICMPv6 for IPv6.
    Icmp,
    Any,
}

impl RuleProtocol {
    pub const NAMES: [&'static str; 4] = ["tcp", "udp", "icmp", "any"];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Icmp => "icmp",
            Self::Any => "any",
        }
    }

    /// Whether rules of this protocol may name ports.
    pub fn has_ports(self) -> bool {
        matches!(self, Self::Tcp | Self::Udp)
    }
}

impl FromStr for RuleProtocol {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tcp" => Ok(Self::Tcp),
            "udp" => Ok(Self::Udp),
            "icmp" => Ok(Self::Icmp),
            "any" => Ok(Self::Any),
            other => Err(format!("`{other}` is not a protocol; use tcp, udp, icmp or any")),
        }
    }
}

/// What a matching rule (or the default) does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum RuleAction {
    #[default]
    Allow,
    Deny,
}

impl RuleAction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
        }
    }
}

impl FromStr for RuleAction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "allow" => Ok(Self::Allow),
            "deny" => Ok(Self::Deny),
            other => Err(format!("`{other}` is not an action; use allow or deny")),
        }
    }
}

/// Destination ports `first..=last` (1-65535).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub const ALL: PortRange = PortRange { first: 1, last: u16::MAX };

    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.first == self.last {
            write!(f, "{}", self.first)
        } else {
            write!(f, "{}-{}", self.first, self.last)
        }
    }
}

/// `N` or `N-M`, 1 <= N <= M <= 65535.
impl FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let port = |p: &str| match p.parse::<u16>() {
            Ok(n) if n > 0 && p.bytes().all(|b| b.is_ascii_digit()) => Ok(n),
            _ => Err(format!("`{s}` is not a port or range: use N or N-M with 1 <= N <= M <= 65535")),
        };
        let (first, last) = match s.split_once('-') {
            Some((a, b)) => (port(a)?, port(b)?),
            None => (port(s)?, port(s)?),
        };
        if first > last {
            return Err(format!("`{s}`: the range's first port is above its last"));
        }
        Ok(Self { first, last })
    }
}

/// One firewall rule on traffic entering from the remote site (seed-004 shape
/// plus an action). `None` fields match everything.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FirewallRule {
    pub name: String,
    pub protocol: RuleProtocol,
    /// Destination ports (TCP and UDP rules only).
    pub ports: Option<PortRange>,
    /// The remote-site source; an IPv4 prefix matches only IPv4 packets.
    pub source: Option<IpPrefix>,
    /// The destination on this side.
    pub destination: Option<IpPrefix>,
    pub action: RuleAction,
}

/// What one tunnel's remote site may reach.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct ForwardingPolicy {
    /// The networks on this side the site may reach (nothing else).
    pub local_networks: Vec<IpPrefix>,
    pub rules: Vec<FirewallRule>,
    /// For traffic no rule matches (never for the gateway host's own addresses).
    pub default_action: RuleAction,
}

impl ForwardingPolicy {
    /// Everything inside `local_networks`, no rules, default allow.
    pub fn allow_local(local_networks: Vec<IpPrefix>) -> Self {
        Self { local_networks, rules: Vec::new(), default_action: RuleAction::Allow }
    }
}

/// A prefix as (address, mask) left-aligned in 128 bits, tagged by family.
#[derive(Debug, Clone, Copy)]
struct Net {
    v6: bool,
    addr: u128,
    mask: u128,
}

impl Net {
    fn new(p: &IpPrefix) -> Self {
        let (addr, mask) = p.key_and_mask();
        Self { v6: p.addr().is_ipv6(), addr, mask }
    }

    #[inline]
    fn contains(&self, v6: bool, key: u128) -> bool {
        self.v6 == v6 && key & self.mask == self.addr
    }
}

#[derive(Debug)]
struct CompiledRule {
    protocol: RuleProtocol,
    ports: Option<PortRange>,
    source: Option<Net>,
    destination: Option<Net>,
    allow: bool,
    /// The destination is one address (/32 or /128): only such an allow rule
    /// opens the gateway host itself.
    names_one_address: bool,
}

/// A policy in the form the per-packet path reads, with per-rule hit counters.
#[derive(Debug)]
pub struct CompiledPolicy {
    policy: ForwardingPolicy,
    local: Vec<Net>,
    rules: Vec<CompiledRule>,
    default_allow: bool,
    /// No rule denies and the default allows: every packet to the site passes
    /// (the connection table need not be asked).
    allows_all: bool,
    hits: Vec<AtomicU64>,
}

impl Default for CompiledPolicy {
    /// No local networks: nothing from the site is forwarded.
    fn default() -> Self {
        Self::new(ForwardingPolicy::default())
    }
}

/// An address no packet from a tunnel is forwarded to (nor delivered to the
/// host at), whatever the local networks say: multicast and broadcast
/// groups, link-local (169.254.169.254 metadata services, fe80::),
/// loopback, unspecified, "this network" and reserved IPv4, IPv4-mapped IPv6.
fn never_forwarded(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            let first = a.octets()[0];
            a.is_multicast() || a.is_broadcast() || a.is_link_local() || a.is_loopback() || first == 0 || first >= 240
        }
        IpAddr::V6(a) => {
            let link_local = a.is_unicast_link_local();
            a.is_multicast() || a.is_loopback() || a.is_unspecified() || link_local || a.to_ipv4_mapped().is_some()
        }
    }
}

/// What happens to a packet from a remote site.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inbound {
    /// Forward it to the site (TTL already decremented).
    Forward,
    /// Deliver it to the gateway host itself (through the kernel).
    ToHost,
}

impl CompiledPolicy {
    pub fn new(policy: ForwardingPolicy) -> Self {
        let local = policy.local_networks.iter().map(Net::new).collect();
        let rules = policy
            .rules
            .iter()
            .map(|r| CompiledRule {
                protocol: r.protocol,
                ports: r.ports.filter(|p| r.protocol.has_ports() && *p != PortRange::ALL),
                source: r.source.as_ref().map(Net::new),
                destination: r.destination.as_ref().map(Net::new),
                allow: r.action == RuleAction::Allow,
                names_one_address: r
                    .destination
                    .is_some_and(|d| d.prefix_len() == if d.addr().is_ipv4() { 32 } else { 128 }),
            })
            .collect();
        let hits = policy.rules.iter().map(|_| AtomicU64::new(0)).collect();
        let default_allow = policy.default_action == RuleAction::Allow;
        let allows_all = default_allow && policy.rules.iter().all(|r| r.action == RuleAction::Allow);
        Self { default_allow, allows_all, policy, local, rules, hits }
    }

    pub fn policy(&self) -> &ForwardingPolicy {
        &self.policy
    }

    /// How many packets each rule matched (in rule order) since it was published.
    pub fn rule_hits(&self) -> Vec<u64> {
        self.hits.iter().map(|h| h.load(Relaxed)).collect()
    }

    /// Whether `dst` is inside the local networks.
    #[inline]
    pub fn is_local(&self, dst: IpAddr) -> bool {
        let (v6, key) = (dst.is_ipv6(), crate::table::addr_key(dst));
        self.local.iter().any(|n| n.contains(v6, key))
    }

    /// No rule denies and the default allows: nothing from the site is refused
    /// inside the local networks (the connection table need not track flows).
    pub fn allows_all(&self) -> bool {
        self.allows_all
    }

    /// Whether the rules would let in, unasked, the replies of a flow the site
    /// side opens with `outbound` (then it need not be tracked). Counts no hit.
    pub fn admits_replies_of(&self, outbound: &Flow) -> bool {
        let transport = match outbound.transport {
            Transport::Ports { src, dst } => Transport::Ports { src: dst, dst: src },
            Transport::Echo { id, .. } => Transport::Echo { id, request: false },
            other => other,
        };
        let reply = Flow { src: outbound.dst, dst: outbound.src, transport, ..*outbound };
        match self.first_match(&reply, false) {
            Some(i) => self.rules[i].allow,
            None => self.default_allow,
        }
    }

    /// The first rule matching `flow` (counted), as allow/deny; `None`: no rule
    /// matched. For a packet to the gateway host (`to_host`) an allow rule
    /// counts only if its destination is that one address.
    #[inline]
    pub fn evaluate_rules(&self, flow: &Flow, to_host: bool) -> Option<bool> {
        let i = self.first_match(flow, to_host)?;
        self.hits[i].fetch_add(1, Relaxed);
        Some(self.rules[i].allow)
    }

    /// The index of the first rule matching `flow`.
    #[inline]
    fn first_match(&self, flow: &Flow, to_host: bool) -> Option<usize> {
        let v6 = flow.src.is_ipv6();
        let (src, dst) = (crate::table::addr_key(flow.src), crate::table::addr_key(flow.dst));
        let dst_port = match flow.transport {
            Transport::Ports { dst, .. } => Some(dst),
            _ => None,
        };
        for (i, rule) in self.rules.iter().enumerate() {
            let protocol = match rule.protocol {
                RuleProtocol::Any => true,
                RuleProtocol::Tcp => flow.protocol == crate::wire::ip_protocol::TCP,
                RuleProtocol::Udp => flow.protocol == crate::wire::ip_protocol::UDP,
                RuleProtocol::Icmp => flow.is_icmp(),
            };
            let matches = protocol
                && !(to_host && rule.allow && !rule.names_one_address)
                && rule.ports.is_none_or(|r| dst_port.is_some_and(|p| r.contains(p)))
                && rule.source.is_none_or(|n| n.contains(v6, src))
                && rule.destination.is_none_or(|n| n.contains(v6, dst));
            if matches {
                return Some(i);
            }
        }
        None
    }

    /// Decides on a packet from the site of `peer` (its source already checked
    /// against the peer's allowed IPs). `is_host` says whether an address is the
    /// gateway host's own. Tracks what it lets through that the connection table
    /// must know (the first fragment of a fragmented packet).
    #[inline]
    pub fn admit_inbound(
        &self,
        flow: &Flow,
        peer: u32,
        conntrack: &ConnTrack,
        is_host: impl Fn(IpAddr) -> bool,
        now_secs: u32,
    ) -> Result<Inbound, DropReason> {
        if !self.is_local(flow.dst) || never_forwarded(flow.dst) {
            return Err(DropReason::NotLocalDestination);
        }
        let to_host = is_host(flow.dst);
        if self.allows_all && !to_host {
            return Ok(Inbound::Forward);
        }
        let tracked = match FlowKey::of_reply(peer, flow) {
            Some(key) => conntrack.refresh(&key, now_secs),
            None => false,
        };
        if !tracked {
            match self.evaluate_rules(flow, to_host) {
                Some(true) => {}
                Some(false) => return Err(DropReason::FirewallDenied),
                None if to_host => return Err(DropReason::ToGatewayHost),
                None if self.default_allow => {}
                None => return Err(DropReason::FirewallDenied),
            }
        }
        if let Some(key) = FlowKey::first_fragment(peer, flow) {
            conntrack.track(&key, now_secs);
        }
        Ok(if to_host { Inbound::ToHost } else { Inbound::Forward })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::Transport;
    use crate::wire::ip_protocol;
    use proptest::prelude::*;

    fn flow(src: &str, dst: &str, protocol: u8, dport: u16) -> Flow {
        let transport = match protocol {
            ip_protocol::TCP | ip_protocol::UDP => Transport::Ports { src: 40000, dst: dport },
            _ => Transport::Echo { id: 1, request: true },
        };
        Flow {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            protocol,
            transport,
            fragment: None,
            tcp_flags: 0,
            hop_limit: 64,
        }
    }

    fn rule(protocol: RuleProtocol, ports: Option<&str>, source: Option<&str>, action: RuleAction) -> FirewallRule {
        FirewallRule {
            name: "r".into(),
            protocol,
            ports: ports.map(|p| p.parse().unwrap()),
            source: source.map(|s| s.parse().unwrap()),
            destination: None,
            action,
        }
    }

    #[test]
    fn ports_protocols_and_actions_parse_strictly() {
        assert_eq!("22".parse::<PortRange>(), Ok(PortRange { first: 22, last: 22 }));
        assert_eq!("1-65535".parse::<PortRange>(), Ok(PortRange::ALL));
        for bad in ["", "0", "65536", "30-20", "1-", "-5", "+5", "1 - 2", "a", "1-2-3"] {
            assert!(bad.parse::<PortRange>().is_err(), "{bad:?}");
        }
        assert_eq!(PortRange { first: 8000, last: 8080 }.to_string(), "8000-8080");
        assert_eq!("icmp".parse::<RuleProtocol>(), Ok(RuleProtocol::Icmp));
        assert!("ICMP".parse::<RuleProtocol>().is_err());
        assert!("permit".parse::<RuleAction>().is_err());
    }

    #[test]
    fn rules_match_by_protocol_port_and_family() {
        let p = CompiledPolicy::new(ForwardingPolicy {
            local_networks: vec!["10.50.0.0/24".parse().unwrap(), "fd50::/64".parse().unwrap()],
            rules: vec![
                rule(RuleProtocol::Tcp, Some("22"), None, RuleAction::Deny),
                rule(RuleProtocol::Any, None, Some("10.1.0.0/16"), RuleAction::Deny),
                rule(RuleProtocol::Icmp, Some("1-65535"), None, RuleAction::Allow),
            ],
            default_action: RuleAction::Allow,
        });
        assert_eq!(p.evaluate_rules(&flow("10.2.0.1", "10.50.0.2", ip_protocol::TCP, 22), false), Some(false));
        assert_eq!(
            p.evaluate_rules(&flow("10.2.0.1", "10.50.0.2", ip_protocol::UDP, 22), false),
            None,
            "UDP 22 is not TCP 22"
        );
        assert_eq!(p.evaluate_rules(&flow("10.1.9.9", "10.50.0.2", ip_protocol::UDP, 53), false), Some(false));
        // An IPv4 source prefix says nothing about IPv6 packets.
        assert_eq!(p.evaluate_rules(&flow("fd20::1", "fd50::2", ip_protocol::UDP, 53), false), None);
        assert_eq!(
            p.evaluate_rules(&flow("fd20::1", "fd50::2", ip_protocol::ICMPV6, 0), false),
            Some(true),
            "icmp covers ICMPv6"
        );
        assert_eq!(p.rule_hits(), vec![1, 1, 1]);
        assert!(p.is_local("fd50::9".parse().unwrap()) && !p.is_local("fd51::9".parse().unwrap()));
        assert!(!p.is_local("10.50.1.1".parse().unwrap()));
    }

    /// The gateway host opens only to an allow rule naming its one address;
    /// a deny rule for the site's networks still closes it.
    #[test]
    fn the_host_opens_only_to_a_rule_naming_its_address() {
        let host: IpAddr = "10.50.0.1".parse().unwrap();
        let ct = ConnTrack::new(1024);
        let verdict = |rules: Vec<FirewallRule>| {
            let p = CompiledPolicy::new(ForwardingPolicy {
                local_networks: vec!["10.50.0.0/24".parse().unwrap()],
                rules,
                default_action: RuleAction::Allow,
            });
            p.admit_inbound(&flow("10.1.0.1", "10.50.0.1", ip_protocol::TCP, 22), 1, &ct, |ip| ip == host, 10)
        };
        let to = |dst: &str, action| FirewallRule {
            destination: Some(dst.parse().unwrap()),
            ..rule(RuleProtocol::Tcp, Some("22"), None, action)
        };
        assert_eq!(verdict(vec![]), Err(DropReason::ToGatewayHost), "not by the default");
        assert_eq!(
            verdict(vec![rule(RuleProtocol::Tcp, Some("22"), None, RuleAction::Allow)]),
            Err(DropReason::ToGatewayHost),
            "not by a rule without a destination"
        );
        assert_eq!(
            verdict(vec![to("10.50.0.0/24", RuleAction::Allow)]),
            Err(DropReason::ToGatewayHost),
            "not by the site's network"
        );
        assert_eq!(verdict(vec![to("0.0.0.0/0", RuleAction::Allow)]), Err(DropReason::ToGatewayHost));
        assert_eq!(verdict(vec![to("10.50.0.1/32", RuleAction::Allow)]), Ok(Inbound::ToHost));
        let deny_all_ssh = rule(RuleProtocol::Tcp, Some("22"), None, RuleAction::Deny);
        assert_eq!(verdict(vec![deny_all_ssh, to("10.50.0.1/32", RuleAction::Allow)]), Err(DropReason::FirewallDenied));
        // The same rules for a LAN host: the network rule opens it.
        let p = CompiledPolicy::new(ForwardingPolicy {
            local_networks: vec!["10.50.0.0/24".parse().unwrap()],
            rules: vec![to("10.50.0.0/24", RuleAction::Allow)],
            default_action: RuleAction::Deny,
        });
        let lan = flow("10.1.0.1", "10.50.0.2", ip_protocol::TCP, 22);
        assert_eq!(p.admit_inbound(&lan, 1, &ct, |ip| ip == host, 10), Ok(Inbound::Forward));
    }

    #[test]
    fn special_destinations_are_never_forwarded_even_inside_wide_local_networks() {
        let p = CompiledPolicy::new(ForwardingPolicy::allow_local(vec![
            "0.0.0.0/0".parse().unwrap(),
            "::/0".parse().unwrap(),
        ]));
        let ct = ConnTrack::new(1024);
        for dst in [
            "169.254.169.254",
            "127.0.0.1",
            "0.1.2.3",
            "240.0.0.1",
            "255.255.255.255",
            "224.0.0.1",
            "fe80::1",
            "::1",
            "ff02::1",
            "::ffff:10.0.0.1",
            "::",
        ] {
            let src = if dst.contains(':') { "fd20::1" } else { "10.1.0.1" };
            let f = flow(src, dst, ip_protocol::UDP, 53);
            assert_eq!(p.admit_inbound(&f, 1, &ct, |_| false, 10), Err(DropReason::NotLocalDestination), "{dst}");
        }
        assert_eq!(
            p.admit_inbound(&flow("10.1.0.1", "10.50.0.2", ip_protocol::UDP, 53), 1, &ct, |_| false, 10),
            Ok(Inbound::Forward)
        );
    }

    proptest! {
        /// First match wins: the verdict of a rule list is that of the first rule
        /// that matches the packet on its own, or the default when none does.
        #[test]
        fn the_first_matching_rule_decides(
            rules in proptest::collection::vec((0usize..4, any::<bool>(), 1u16..100, 0u16..50, any::<bool>(), 0u8..33), 0..12),
            dport in 1u16..160,
            protocol in prop::sample::select(vec![ip_protocol::TCP, ip_protocol::UDP, ip_protocol::ICMP, 47]),
            src_last in any::<u8>(),
        ) {
            let protocols = [RuleProtocol::Tcp, RuleProtocol::Udp, RuleProtocol::Icmp, RuleProtocol::Any];
            let rules: Vec<FirewallRule> = rules.iter().map(|&(p, deny, first, span, with_ports, src_len)| FirewallRule {
                name: "r".into(),
                protocol: protocols[p],
                ports: with_ports.then_some(PortRange { first, last: first.saturating_add(span) }),
                source: Some(IpPrefix::new("10.1.0.0".parse().unwrap(), src_len).unwrap()),
                destination: None,
                action: if deny { RuleAction::Deny } else { RuleAction::Allow },
            }).collect();
            let f = flow(&format!("10.1.0.{src_last}"), "10.50.0.2", protocol, dport);
            let alone = |r: &FirewallRule| CompiledPolicy::new(ForwardingPolicy {
                local_networks: vec![],
                rules: vec![r.clone()],
                default_action: RuleAction::Allow,
            }).evaluate_rules(&f, false);
            let expected = rules.iter().find_map(alone);
            let all = CompiledPolicy::new(ForwardingPolicy { local_networks: vec![], rules, default_action: RuleAction::Deny });
            prop_assert_eq!(all.evaluate_rules(&f, false), expected);
            prop_assert_eq!(all.rule_hits().iter().sum::<u64>(), u64::from(expected.is_some()));
        }
    }
}
