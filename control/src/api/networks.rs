//! The networks of one gateway and the rules they keep. Remote networks
//! (`remote_network_cidr` plus `additional_remote_network_cidrs`) are routed
//! into the tunnel: they must not overlap one another, this site, or any
//! remote network of another tunnel. Local networks (`local_network_cidr`
//! plus `additional_local_network_cidrs`) are what the remote site may reach:
//! none may overlap a remote network of the same gateway. Every prefix keeps
//! the request field that names it (`additional_remote_network_cidrs[2]`), so
//! a refusal names the field to fix. A prefix that is not a network a tunnel
//! can carry is a 422; networks that clash with one another are a 409.

use super::error::ApiError;
use super::model::{invalid, overlaps, validate_cidr};
use crate::store::GatewayRecord;
use std::net::IpAddr;
use wgxdp_dataplane::policy::MAX_NETWORKS;
use wgxdp_dataplane::table::IpPrefix;

pub const REMOTE: &str = "remote_network_cidr";
pub const ADDITIONAL_REMOTE: &str = "additional_remote_network_cidrs";
pub const LOCAL: &str = "local_network_cidr";
pub const ADDITIONAL_LOCAL: &str = "additional_local_network_cidrs";

/// Most prefixes an `additional_*` list holds: with its seed field, a tunnel
/// carries at most `MAX_NETWORKS` remote and `MAX_NETWORKS` local networks.
pub const MAX_ADDITIONAL: usize = MAX_NETWORKS - 1;

/// One prefix of a gateway and the field it comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    /// The top-level field: `REMOTE`, `ADDITIONAL_REMOTE`, `LOCAL` or `ADDITIONAL_LOCAL`.
    pub list: &'static str,
    /// The field of this very prefix, e.g. `additional_local_network_cidrs[1]`.
    pub field: String,
    pub prefix: IpPrefix,
}

/// Address ranges no tunnel carries, remote or local: they never name hosts
/// of a site (loopback, link-local, multicast, "this network", reserved,
/// broadcast, IPv4-mapped IPv6).
const SPECIAL: [(&str, &str); 11] = [
    ("0.0.0.0/8", "\"this network\""),
    ("127.0.0.0/8", "loopback"),
    ("169.254.0.0/16", "link-local"),
    ("224.0.0.0/4", "multicast"),
    ("240.0.0.0/4", "reserved (and broadcast)"),
    ("::/128", "the unspecified address"),
    ("::1/128", "loopback"),
    ("::ffff:0:0/96", "IPv4-mapped"),
    ("fe80::/10", "link-local"),
    ("ff00::/8", "multicast"),
    ("fec0::/10", "site-local (deprecated)"),
];

/// A strict CIDR a tunnel can carry as a local network: not inside a special
/// range (a wider one, even `0.0.0.0/0`, may be local: the data plane never
/// forwards to multicast or broadcast groups).
pub fn validate_network(field: &str, s: &str) -> Result<IpPrefix, ApiError> {
    carried(field, validate_cidr(field, s)?, false)
}

/// `validate_network` of a prefix already parsed (the configured site CIDR).
pub fn check_local_network(field: &str, prefix: IpPrefix) -> Result<IpPrefix, ApiError> {
    carried(field, prefix, false)
}

/// `prefix` unless it clashes with a special range: lies inside one, or (for
/// a `remote` one, which steers the LAN's packets into the tunnel and is
/// routed on the host) overlaps one either way.
fn carried(field: &str, prefix: IpPrefix, remote: bool) -> Result<IpPrefix, ApiError> {
    for (range, what) in SPECIAL {
        let special: IpPrefix = range.parse().expect("a valid prefix");
        let inside = special.contains(prefix.addr()) && special.prefix_len() <= prefix.prefix_len();
        let clash = if remote { overlaps(&prefix, &special) } else { inside };
        if clash {
            return Err(invalid(
                field,
                format!("{prefix} overlaps {special} ({what} addresses), which no tunnel can carry"),
            ));
        }
    }
    Ok(prefix)
}

/// A remote network is routed into its tunnel (the LAN-side XDP program
/// steers every packet to it there): a default route would take the whole
/// site's traffic.
pub fn validate_remote_cidr(field: &str, s: &str) -> Result<IpPrefix, ApiError> {
    let remote = validate_cidr(field, s)?;
    if remote.prefix_len() == 0 {
        return Err(invalid(
            field,
            format!("{remote} is a default route; a tunnel carries a remote site's networks, not all traffic"),
        ));
    }
    carried(field, remote, true)
}

/// An `additional_*` list of CIDR strings: at most `MAX_ADDITIONAL`, each
/// a strict CIDR (remote ones no default route). Duplicates and overlaps are
/// `GatewayNetworks::check`'s business (they involve the seed field too).
pub fn parse_list(list: &'static str, items: &[String]) -> Result<Vec<IpPrefix>, ApiError> {
    if items.len() > MAX_ADDITIONAL {
        return Err(invalid(
            list,
            format!("lists at most {MAX_ADDITIONAL} networks (got {}); a tunnel carries {MAX_NETWORKS}", items.len()),
        ));
    }
    let remote = list == ADDITIONAL_REMOTE;
    items
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let field = format!("{list}[{i}]");
            if remote {
                validate_remote_cidr(&field, s)
            } else {
                validate_network(&field, s)
            }
        })
        .collect()
}

/// A network that clashes with another (of the request, of the gateway as
/// it would be, of this site): 409, naming the field. The document cannot
/// say which combinations clash, only that they answer 409.
fn clash(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::conflict_at(field, format!("{field}: {}", message.into()))
}

/// Every network of one gateway, in field order (seed first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayNetworks {
    pub remote: Vec<Network>,
    pub local: Vec<Network>,
}

fn named(seed_list: &'static str, seed: IpPrefix, list: &'static str, more: &[IpPrefix]) -> Vec<Network> {
    let seed = Network { list: seed_list, field: seed_list.to_owned(), prefix: seed };
    let more = more.iter().enumerate().map(|(i, p)| Network { list, field: format!("{list}[{i}]"), prefix: *p });
    std::iter::once(seed).chain(more).collect()
}

/// Of two clashing networks (`a` listed before `b`), the one to name and the
/// other: the later, unless only the earlier was in the request.
fn to_blame<'n>(a: &'n Network, b: &'n Network, in_request: &impl Fn(&str) -> bool) -> (&'n Network, &'n Network) {
    if !in_request(b.list) && in_request(a.list) {
        (a, b)
    } else {
        (b, a)
    }
}

impl GatewayNetworks {
    pub fn new(
        remote: IpPrefix,
        additional_remote: &[IpPrefix],
        local: IpPrefix,
        additional_local: &[IpPrefix],
    ) -> Self {
        Self {
            remote: named(REMOTE, remote, ADDITIONAL_REMOTE, additional_remote),
            local: named(LOCAL, local, ADDITIONAL_LOCAL, additional_local),
        }
    }

    /// The networks of a stored gateway.
    pub fn of_record(g: &GatewayRecord) -> Self {
        Self::new(
            g.remote_network_cidr,
            &g.additional_remote_network_cidrs,
            g.local_network_cidr,
            &g.additional_local_network_cidrs,
        )
    }

    /// The rules that hold within one gateway: remote networks disjoint,
    /// local networks listed once, no remote network overlapping a local one.
    /// `in_request(list)` says whether the request named that top-level field:
    /// a refusal names a prefix the request gave (on create, all of them).
    pub fn check(&self, in_request: impl Fn(&str) -> bool) -> Result<(), ApiError> {
        for (j, b) in self.remote.iter().enumerate() {
            if let Some(a) = self.remote[..j].iter().find(|a| overlaps(&a.prefix, &b.prefix)) {
                let (at, other) = to_blame(a, b, &in_request);
                let what = if a.prefix == b.prefix { "is also" } else { "overlaps" };
                return Err(clash(
                    &at.field,
                    format!(
                        "{} {what} {} ({}); a gateway's remote networks must not overlap one another",
                        at.prefix, other.prefix, other.field
                    ),
                ));
            }
        }
        for (j, b) in self.local.iter().enumerate() {
            if let Some(a) = self.local[..j].iter().find(|a| a.prefix == b.prefix) {
                let (at, other) = to_blame(a, b, &in_request);
                return Err(clash(&at.field, format!("{} is listed twice (also {})", at.prefix, other.field)));
            }
        }
        for r in &self.remote {
            if let Some(l) = self.local.iter().find(|l| overlaps(&r.prefix, &l.prefix)) {
                return Err(if in_request(r.list) || !in_request(l.list) {
                    clash(
                        &r.field,
                        format!(
                            "{} overlaps the local network {} ({}); the two sites need distinct address space",
                            r.prefix, l.prefix, l.field
                        ),
                    )
                } else {
                    clash(
                        &l.field,
                        format!(
                            "{} overlaps the remote network {} ({}); the two sites need distinct address space",
                            l.prefix, r.prefix, r.field
                        ),
                    )
                });
            }
        }
        Ok(())
    }

    pub fn remote_prefixes(&self) -> Vec<IpPrefix> {
        self.remote.iter().map(|n| n.prefix).collect()
    }

    pub fn local_prefixes(&self) -> Vec<IpPrefix> {
        self.local.iter().map(|n| n.prefix).collect()
    }
}

/// Refuses a remote network that would route this site's own addresses into
/// a tunnel: the configured `[api] site_cidr` (whatever local networks a
/// request names) and the gateway host's own addresses (on every interface:
/// its LAN address, which the site's hosts reach it at, its WAN address...).
pub fn validate_remote_vs_site(
    remote: &Network,
    site_cidr: Option<IpPrefix>,
    host_addresses: &[IpAddr],
) -> Result<(), ApiError> {
    let (field, prefix) = (remote.field.as_str(), &remote.prefix);
    if let Some(site) = site_cidr {
        if overlaps(prefix, &site) {
            return Err(clash(
                field,
                format!(
                    "{prefix} overlaps this site's network {site} (`[api] site_cidr`); it cannot be routed into a \
                     tunnel"
                ),
            ));
        }
    }
    if let Some(ip) = host_addresses.iter().find(|ip| prefix.contains(**ip)) {
        return Err(clash(
            field,
            format!("{prefix} contains {ip}, an address of this gateway host; it cannot be routed into a tunnel"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> IpPrefix {
        s.parse().unwrap()
    }

    fn field_of(r: Result<(), ApiError>) -> String {
        r.unwrap_err().field.unwrap()
    }

    #[test]
    fn lists_are_bounded_strict_and_remote_ones_never_a_default_route() {
        let many: Vec<String> = (0..MAX_ADDITIONAL + 1).map(|i| format!("10.{i}.0.0/16")).collect();
        assert_eq!(parse_list(ADDITIONAL_LOCAL, &many).unwrap_err().field.as_deref(), Some(ADDITIONAL_LOCAL));
        assert_eq!(parse_list(ADDITIONAL_LOCAL, &many[..MAX_ADDITIONAL]).unwrap().len(), MAX_ADDITIONAL);
        let e = parse_list(ADDITIONAL_REMOTE, &["10.1.0.0/16".into(), "10.2.3.4/16".into()]).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("additional_remote_network_cidrs[1]"));
        assert!(e.message.contains("did you mean 10.2.0.0/16"), "{}", e.message);
        let e = parse_list(ADDITIONAL_REMOTE, &["::/0".into()]).unwrap_err();
        assert!(e.message.contains("default route"), "{}", e.message);
        assert_eq!(parse_list(ADDITIONAL_LOCAL, &["0.0.0.0/0".into()]).unwrap(), vec![p("0.0.0.0/0")]);
        // Special ranges: never remote (either way), never local (inside).
        for special in ["127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/24", "fe80::/64", "ff02::/16", "::ffff:0:0/96"] {
            let e = parse_list(ADDITIONAL_LOCAL, &[special.into()]).unwrap_err();
            assert_eq!(e.field.as_deref(), Some("additional_local_network_cidrs[0]"), "{special}");
            assert!(parse_list(ADDITIONAL_REMOTE, &[special.into()]).is_err(), "{special}");
        }
        let e = parse_list(ADDITIONAL_REMOTE, &["10.1.0.0/16".into(), "0.0.0.0/1".into()]).unwrap_err();
        assert!(e.message.contains("loopback") || e.message.contains("this network"), "{}", e.message);
    }

    #[test]
    fn overlaps_within_a_gateway_blame_the_prefix_the_request_named() {
        let nets = |r: &[&str], l: &[&str]| {
            let r: Vec<IpPrefix> = r.iter().map(|s| p(s)).collect();
            let l: Vec<IpPrefix> = l.iter().map(|s| p(s)).collect();
            GatewayNetworks::new(r[0], &r[1..], l[0], &l[1..])
        };
        let all = |_: &str| true;
        assert!(nets(&["10.1.0.0/16", "10.2.0.0/16", "fd01::/64"], &["10.50.0.0/24", "fd50::/64"]).check(all).is_ok());
        // Remote networks overlapping one another.
        let n = nets(&["10.1.0.0/16", "10.2.0.0/16", "10.1.7.0/24"], &["10.50.0.0/24"]);
        assert_eq!(field_of(n.check(all)), "additional_remote_network_cidrs[1]");
        let n = nets(&["10.1.0.0/16", "10.1.0.0/16"], &["10.50.0.0/24"]);
        let e = n.check(all).unwrap_err();
        assert!(e.message.contains("is also 10.1.0.0/16 (remote_network_cidr)"), "{}", e.message);
        // Only the seed changed: it is the one named.
        assert_eq!(field_of(n.check(|l| l == REMOTE)), "remote_network_cidr");
        // Local networks listed twice.
        let n = nets(&["10.1.0.0/16"], &["10.50.0.0/24", "10.60.0.0/24", "10.60.0.0/24"]);
        assert_eq!(field_of(n.check(all)), "additional_local_network_cidrs[1]");
        // A remote network overlapping a local one: the remote one on create,
        // the local one when only the local list changed.
        let n = nets(&["10.1.0.0/16", "fd00::/16"], &["10.50.0.0/24", "fd00:50::/64"]);
        assert_eq!(field_of(n.check(all)), "additional_remote_network_cidrs[0]");
        let e = n.check(|l| l == ADDITIONAL_LOCAL).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("additional_local_network_cidrs[0]"));
        assert!(e.message.contains("overlaps the remote network fd00::/16"), "{}", e.message);
    }
}
