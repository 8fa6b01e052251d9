//! What a remote site may reach: the forwarding policy of one tunnel.
//!
//! A packet that enters from a remote site (decrypted, its source already
//! checked against the peer's allowed IPs) is forwarded only when
//!
//! 1. its destination is inside the tunnel's local networks (default deny
//!    outside the site: nothing reaches other networks the host can route to);
//! 2. it answers a flow the site side opened (the connection table,
//!    `conntrack.rs`), or the tunnel's firewall rules allow it: evaluated in
//!    order, first match wins, no match takes the default action;
//! 3. its TTL / hop limit allows one more hop (decremented on the way).
//!
//! Packets to the gateway host's own addresses are delivered to the host only
//! when an explicit `allow` rule matches them (the default action never
//! applies to them).
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
}

/// A policy in the form the per-packet path reads, with per-rule hit counters.
#[derive(Debug)]
pub struct CompiledPolicy {
    policy: ForwardingPolicy,
    local: Vec<Net>,
    rules: Vec<CompiledRule>,
    default_allow: bool,
    hits: Vec<AtomicU64>,
}

impl Default for CompiledPolicy {
    /// No local networks: nothing from the site is forwarded.
    fn default() -> Self {
        Self::new(ForwardingPolicy::default())
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
            })
            .collect();
        let hits = policy.rules.iter().map(|_| AtomicU64::new(0)).collect();
        Self { default_allow: policy.default_action == RuleAction::Allow, policy, local, rules, hits }
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

    /// The first rule matching `flow` (counted), as allow/deny; `None`: no rule matched.
    #[inline]
    pub fn evaluate_rules(&self, flow: &Flow) -> Option<bool> {
        let v6 = flow.src.is_ipv6();
        let (src, dst) = (crate::table::addr_key(flow.src), crate::table::addr_key(flow.dst));
        let dst_port = match flow.transport {
            Transport::Ports { dst, .. } => Some(dst),
            _ => None,
        };
        for (rule, hits) in self.rules.iter().zip(&self.hits) {
            let protocol = match rule.protocol {
                RuleProtocol::Any => true,
                RuleProtocol::Tcp => flow.protocol == crate::wire::ip_protocol::TCP,
                RuleProtocol::Udp => flow.protocol == crate::wire::ip_protocol::UDP,
                RuleProtocol::Icmp => flow.is_icmp(),
            };
            let matches = protocol
                && rule.ports.is_none_or(|r| dst_port.is_some_and(|p| r.contains(p)))
                && rule.source.is_none_or(|n| n.contains(v6, src))
                && rule.destination.is_none_or(|n| n.contains(v6, dst));
            if matches {
                hits.fetch_add(1, Relaxed);
                return Some(rule.allow);
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
        if !self.is_local(flow.dst) {
            return Err(DropReason::NotLocalDestination);
        }
        let to_host = is_host(flow.dst);
        let tracked = match FlowKey::of_reply(peer, flow) {
            Some(key) => conntrack.refresh(&key, now_secs),
            None => false,
        };
        if !tracked {
            match self.evaluate_rules(flow) {
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
