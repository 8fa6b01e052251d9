//! `POST /api/v1/vpn-gateways/import`: a gateway from a wg-quick `[Peer]`
//! section, the remote site as an existing WireGuard configuration already
//! describes it. The section becomes a create request (`CreateGateway`) and
//! takes exactly the create's validation and conflict checks; errors name the
//! section's keys (`peer.AllowedIPs[1]`) instead of the create's fields.
//!
//! The section is read as `wg` reads one: keys case-insensitive, `#` starts
//! a comment, `AllowedIPs` repeatable and comma-separated, a bare address is
//! a host route. What a gateway cannot take is refused, never skipped: an
//! `[Interface]` or a second `[Peer]`, an unknown or repeated key, an
//! `Endpoint` by host name. The section may hold a pre-shared key, so errors
//! quote line numbers, never the lines.

use super::error::ApiError;
use super::model::{decode_json, invalid, CreateGateway, NewGateway};
use super::networks::{ADDITIONAL_REMOTE, REMOTE};
use crate::firewall::FirewallRuleText;
use crate::secret::SecretString;
use serde::Deserialize;
use std::net::{IpAddr, SocketAddr};
use utoipa::ToSchema;
use wgxdp_dataplane::noise::PublicKey;
use wgxdp_dataplane::policy::MAX_NETWORKS;
use wgxdp_dataplane::table::IpPrefix;

/// Longest `peer` text taken (a section with 64 networks is far shorter).
pub const MAX_SECTION: usize = 8192;

/// `POST /api/v1/vpn-gateways/import`. `null` is the same as leaving a
/// field out.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImportGateway {
    #[schema(value_type = GatewayName, required = true)]
    pub name: Option<String>,
    #[schema(value_type = Region, required = true)]
    pub region: Option<String>,
    /// The remote site as a wg-quick `[Peer]` section: `PublicKey` and
    /// `Endpoint` (an IP address and port) required; `AllowedIPs` (the remote
    /// site's networks, the first one its `remote_network_cidr`) at least one;
    /// `PresharedKey` (generated when absent) and `PersistentKeepalive`
    /// optional.
    #[schema(value_type = WgQuickPeer, required = true)]
    pub peer: Option<SecretString>,
    /// As in `CreateGateway`.
    #[schema(value_type = Option<LocalNetwork>)]
    pub local_network_cidr: Option<String>,
    /// As in `CreateGateway`.
    #[schema(value_type = Option<Vec<LocalNetwork>>, max_items = 63)]
    pub additional_local_network_cidrs: Option<Vec<String>>,
    /// As in `CreateGateway`.
    #[schema(max_items = 256)]
    pub firewall: Option<Vec<FirewallRuleText>>,
    /// As in `CreateGateway`.
    #[schema(value_type = Option<FirewallAction>)]
    pub firewall_default: Option<String>,
}

/// A `[Peer]` section's values.
#[derive(Debug, Default, PartialEq)]
pub struct PeerSection {
    pub public_key: Option<String>,
    pub preshared_key: Option<SecretString>,
    pub endpoint: Option<SocketAddr>,
    /// As written, bare addresses made host routes (`10.0.0.1/32`).
    pub allowed_ips: Vec<String>,
    pub persistent_keepalive: Option<u16>,
}

fn peer_error(line: usize, message: impl std::fmt::Display) -> ApiError {
    invalid("peer", format!("line {line}: {message}"))
}

/// Reads a wg-quick `[Peer]` section (see the module's notes).
pub fn parse_peer_section(text: &str) -> Result<PeerSection, ApiError> {
    if text.len() > MAX_SECTION {
        return Err(invalid("peer", format!("at most {MAX_SECTION} bytes (got {})", text.len())));
    }
    let mut peer = PeerSection::default();
    let mut in_peer = false;
    let mut seen: Vec<&'static str> = Vec::new();
    // (A byte order mark, as some editors write one, is no text.)
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let line = raw.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        if line.starts_with('[') {
            match line.to_ascii_lowercase().as_str() {
                "[peer]" if in_peer => return Err(peer_error(n, "a second [Peer]: import one remote site at a time")),
                "[peer]" => in_peer = true,
                "[interface]" => {
                    return Err(peer_error(n, "[Interface] is this gateway's own side: send only the [Peer] section"))
                }
                _ => return Err(peer_error(n, "not a section wg-quick knows ([Peer])")),
            }
            continue;
        }
        if !in_peer {
            return Err(peer_error(n, "a setting before [Peer]"));
        }
        let Some((key, value)) = line.split_once('=') else {
            return Err(peer_error(n, "not a `Key = Value` line"));
        };
        let value = value.trim();
        let key =
            match key.trim().to_ascii_lowercase().as_str() {
                "publickey" => "PublicKey",
                "presharedkey" => "PresharedKey",
                "endpoint" => "Endpoint",
                "allowedips" => "AllowedIPs",
                "persistentkeepalive" => "PersistentKeepalive",
                _ => return Err(peer_error(
                    n,
                    "not a key a [Peer] section of a gateway takes (PublicKey, PresharedKey, Endpoint, AllowedIPs, \
                     PersistentKeepalive)",
                )),
            };
        if key != "AllowedIPs" {
            if seen.contains(&key) {
                return Err(peer_error(n, format!("{key} is given twice")));
            }
            seen.push(key);
        }
        match key {
            "PublicKey" => peer.public_key = Some(value.to_owned()),
            "PresharedKey" => peer.preshared_key = Some(SecretString::new(value.to_owned())),
            "Endpoint" => {
                let endpoint = value.parse::<SocketAddr>().map_err(|_| {
                    peer_error(n, "Endpoint must be an IP address and a port (`203.0.113.5:51820`, `[2001:db8::5]:51820`); host names are not resolved")
                })?;
                peer.endpoint = Some(endpoint);
            }
            "AllowedIPs" => {
                for item in value.split(',').map(str::trim) {
                    if item.is_empty() {
                        return Err(peer_error(n, "AllowedIPs has an empty entry"));
                    }
                    // Only what an address and a prefix length are made of:
                    // anything else (a key run into the line) is never quoted back.
                    if !item.bytes().all(|b| b.is_ascii_hexdigit() || b"./:".contains(&b)) {
                        return Err(peer_error(n, "AllowedIPs holds something that is not an IP network"));
                    }
                    let network = match item.parse::<IpAddr>() {
                        Ok(ip) => wgxdp_dataplane::table::IpPrefix::host(ip).to_string(),
                        Err(_) => item.to_owned(),
                    };
                    peer.allowed_ips.push(network);
                }
            }
            _ => {
                let refuse = || peer_error(n, "PersistentKeepalive must be `off` or seconds from 0 to 65535");
                peer.persistent_keepalive = match value {
                    v if v.eq_ignore_ascii_case("off") => Some(0),
                    v if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) => {
                        Some(v.parse::<u16>().map_err(|_| refuse())?)
                    }
                    _ => return Err(refuse()),
                }
            }
        }
    }
    if !in_peer {
        return Err(invalid("peer", "holds no [Peer] section"));
    }
    Ok(peer)
}

impl ImportGateway {
    /// The create request this import stands for.
    pub fn into_create(self) -> Result<CreateGateway, ApiError> {
        let text = self.peer.ok_or_else(|| invalid("peer", "is required"))?;
        let peer = parse_peer_section(text.expose())?;
        let endpoint = peer.endpoint.ok_or_else(|| {
            invalid("peer", "Endpoint is required: the gateway needs the remote site's address and port")
        })?;
        if peer.allowed_ips.len() > MAX_NETWORKS {
            let got = peer.allowed_ips.len();
            return Err(invalid("peer", format!("AllowedIPs lists at most {MAX_NETWORKS} networks (got {got})")));
        }
        let mut networks = peer.allowed_ips.into_iter();
        let first =
            networks.next().ok_or_else(|| invalid("peer", "AllowedIPs is required (the remote site's networks)"))?;
        Ok(CreateGateway {
            name: self.name,
            region: self.region,
            tunnel_type: Some("wireguard".into()),
            remote_network_cidr: Some(first),
            remote_peer_ip: Some(endpoint.ip().to_string()),
            remote_public_key: Some(peer.public_key.ok_or_else(|| invalid("peer", "PublicKey is required"))?),
            remote_peer_port: Some(endpoint.port()),
            pre_shared_key: peer.preshared_key,
            local_network_cidr: self.local_network_cidr,
            persistent_keepalive: peer.persistent_keepalive,
            additional_remote_network_cidrs: Some(networks.collect()),
            additional_local_network_cidrs: self.additional_local_network_cidrs,
            firewall: self.firewall,
            firewall_default: self.firewall_default,
        })
    }
}

/// The import body → a validated gateway (what the handler and the fuzzer
/// run); errors name the section's keys.
pub fn parse_import(
    bytes: &[u8],
    site_cidr_of: impl FnOnce(&str) -> Option<IpPrefix>,
    ours: &PublicKey,
) -> Result<NewGateway, ApiError> {
    let body: ImportGateway = decode_json(bytes)?;
    body.into_create()?.validate_in(site_cidr_of, ours).map_err(peer_field)
}

/// The create's names for what the section gave, and the section's names
/// for them: `additional_remote_network_cidrs[i]` is `AllowedIPs` entry i + 1.
const RENAMES: [(&str, &str); 6] = [
    ("remote_public_key", "peer.PublicKey"),
    ("pre_shared_key", "peer.PresharedKey"),
    ("remote_peer_ip", "peer.Endpoint"),
    ("remote_peer_port", "peer.Endpoint"),
    ("persistent_keepalive", "peer.PersistentKeepalive"),
    (REMOTE, "peer.AllowedIPs[0]"),
];

/// `text` with the create's field names as the section names them.
fn rename(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    'scan: while !rest.is_empty() {
        if let Some(after) = rest.strip_prefix(ADDITIONAL_REMOTE) {
            let index = after.strip_prefix('[').and_then(|a| a.split_once(']'));
            match index.and_then(|(digits, tail)| Some((digits.parse::<usize>().ok()?, tail))) {
                Some((i, tail)) => {
                    out.push_str(&format!("peer.AllowedIPs[{}]", i + 1));
                    rest = tail;
                }
                None => {
                    out.push_str("peer.AllowedIPs");
                    rest = after;
                }
            }
            continue;
        }
        for (from, to) in RENAMES {
            if let Some(after) = rest.strip_prefix(from) {
                out.push_str(to);
                rest = after;
                continue 'scan;
            }
        }
        let mut chars = rest.chars();
        out.extend(chars.next());
        rest = chars.as_str();
    }
    out
}

/// An error of the create an import became, in the section's terms.
pub fn peer_field(mut e: ApiError) -> ApiError {
    e.field = e.field.as_deref().map(rename);
    e.message = rename(&e.message);
    e
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::StatusCode;
    use wgxdp_dataplane::noise::{PresharedKey, PrivateKey};

    const PSK: &str = "sjIbzf0fbRgxz3s0hK2wPgl8g2Gh5d7g2xSpKBs1Ots=";

    fn site() -> Option<IpPrefix> {
        Some("10.50.0.0/24".parse().unwrap())
    }

    fn body(peer: &str) -> Vec<u8> {
        serde_json::json!({"name": "site-b", "region": "eu", "peer": peer}).to_string().into_bytes()
    }

    fn ours() -> PublicKey {
        PrivateKey::generate().public_key()
    }

    #[test]
    fn a_wg_quick_peer_section_becomes_a_gateway() {
        let key = PrivateKey::generate().public_key();
        let section = format!(
            "# site B\n[peer]\npublickey = {key}\nPresharedKey={PSK}  # rotated in May\n\
             Endpoint = [2001:db8::5]:51821\nAllowedIPs = 10.1.0.0/16, fd01::/64\nallowedips=10.9.0.7\n\
             PersistentKeepalive = 25\n"
        );
        let new = parse_import(&body(&section), |_| site(), &ours()).unwrap();
        assert_eq!(new.remote_public_key, key);
        assert_eq!(*new.pre_shared_key.to_base64_secret(), PSK);
        assert_eq!(new.remote_endpoint, "[2001:db8::5]:51821".parse().unwrap());
        assert_eq!(new.remote_network_cidr.to_string(), "10.1.0.0/16");
        let more: Vec<String> = new.additional_remote_network_cidrs.iter().map(ToString::to_string).collect();
        assert_eq!(more, ["fd01::/64", "10.9.0.7/32"]);
        assert_eq!(new.persistent_keepalive, Some(25));
        assert_eq!(new.local_network_cidr.to_string(), "10.50.0.0/24");
        // No pre-shared key: one is generated; `off` keepalive is none.
        let bare = format!("\u{feff}[Peer]\r\nPublicKey = {key}\r\nEndpoint = 192.0.2.1:51820\r\nAllowedIPs = 10.1.0.0/16\r\nPersistentKeepalive = Off\r\n");
        let new = parse_import(&body(&bare), |_| site(), &ours()).unwrap();
        assert_ne!(*new.pre_shared_key, PresharedKey::default(), "a generated key");
        assert_eq!(new.persistent_keepalive, None);
    }

    #[test]
    fn what_a_gateway_cannot_take_is_refused_by_line_without_echo() {
        let key = PrivateKey::generate().public_key();
        let peer = |extra: &str| {
            format!("[Peer]\nPublicKey = {key}\nEndpoint = 192.0.2.1:51820\nAllowedIPs = 10.1.0.0/16\n{extra}")
        };
        for (section, says) in [
            (format!("[Interface]\nPrivateKey = {PSK}\n"), "line 1: [Interface]"),
            (format!("PresharedKey = {PSK}\n[Peer]"), "line 1: a setting before [Peer]"),
            (peer("[Peer]\n"), "line 5: a second [Peer]"),
            (peer(&format!("PrivateKey = {PSK}")), "line 5: not a key"),
            (peer(&format!("PresharedKey = {PSK}\npresharedkey = {PSK}")), "line 6: PresharedKey is given twice"),
            (peer("Endpoint = vpn.example.com:51820"), "Endpoint is given twice"),
            (format!("[Peer]\nPublicKey = {key}\nEndpoint = vpn.example.com:51820"), "line 3: Endpoint must be an IP"),
            (peer("Endpoint 192.0.2.9:51820"), "line 5: not a `Key = Value` line"),
            (peer("AllowedIPs = 10.2.0.0/16,,10.3.0.0/16"), "line 5: AllowedIPs has an empty entry"),
            (peer("PersistentKeepalive = 70000"), "line 5: PersistentKeepalive must be"),
            (peer("PersistentKeepalive = +25"), "line 5: PersistentKeepalive must be"),
            (peer(&format!("AllowedIPs = 10.2.0.0/16 PresharedKey = {PSK}")), "line 5: AllowedIPs holds something"),
            (format!("[Peer]\nPublicKey = {key}\nAllowedIPs = 10.1.0.0/16"), "Endpoint is required"),
            (format!("[Peer]\nPublicKey = {key}\nEndpoint = 192.0.2.1:51820"), "AllowedIPs is required"),
            ("# nothing\n".to_owned(), "holds no [Peer] section"),
            ("[Peers]".to_owned(), "line 1: not a section"),
        ] {
            let e = parse_import(&body(&section), |_| site(), &ours()).unwrap_err();
            assert_eq!((e.status, e.field.as_deref()), (StatusCode::UNPROCESSABLE_ENTITY, Some("peer")), "{section}");
            assert!(e.message.contains(says), "{section}: {}", e.message);
            assert!(!e.message.contains(PSK), "{}", e.message);
        }
        let long = format!("[Peer]\n#{}", "x".repeat(MAX_SECTION));
        assert!(parse_import(&body(&long), |_| None, &ours()).unwrap_err().message.contains("at most 8192 bytes"));
        let missing = parse_import(br#"{"name":"site-b","region":"eu"}"#, |_| None, &ours()).unwrap_err();
        assert_eq!(missing.field.as_deref(), Some("peer"));
        let unknown =
            parse_import(br#"{"name":"site-b","region":"eu","peer":"","remote_peer_ip":"1.2.3.4"}"#, |_| None, &ours());
        assert_eq!(unknown.unwrap_err().status, StatusCode::BAD_REQUEST);
    }

    #[test]
    fn the_create_rules_apply_and_name_the_section_keys() {
        let me = ours();
        let key = PrivateKey::generate().public_key();
        let section = |public: &str, endpoint: &str, allowed: &str, psk: &str| {
            format!(
                "[Peer]\nPublicKey = {public}\nPresharedKey = {psk}\nEndpoint = {endpoint}\nAllowedIPs = {allowed}\n"
            )
        };
        for (peer, field, status) in [
            (section(&me.to_base64(), "192.0.2.1:1", "10.1.0.0/16", PSK), "peer.PublicKey", StatusCode::CONFLICT),
            (
                section("not-a-key", "192.0.2.1:1", "10.1.0.0/16", PSK),
                "peer.PublicKey",
                StatusCode::UNPROCESSABLE_ENTITY,
            ),
            (
                section(&key.to_base64(), "192.0.2.1:1", "10.1.0.0/16", "short"),
                "peer.PresharedKey",
                StatusCode::UNPROCESSABLE_ENTITY,
            ),
            (
                section(&key.to_base64(), "0.0.0.0:1", "10.1.0.0/16", PSK),
                "peer.Endpoint",
                StatusCode::UNPROCESSABLE_ENTITY,
            ),
            (
                section(&key.to_base64(), "192.0.2.1:0", "10.1.0.0/16", PSK),
                "peer.Endpoint",
                StatusCode::UNPROCESSABLE_ENTITY,
            ),
            (
                section(&key.to_base64(), "192.0.2.1:1", "0.0.0.0/0", PSK),
                "peer.AllowedIPs[0]",
                StatusCode::UNPROCESSABLE_ENTITY,
            ),
            (
                section(&key.to_base64(), "192.0.2.1:1", "10.1.0.0/16, 10.2.0.1/16", PSK),
                "peer.AllowedIPs[1]",
                StatusCode::UNPROCESSABLE_ENTITY,
            ),
            (
                section(&key.to_base64(), "192.0.2.1:1", "10.1.0.0/16, 10.1.2.0/24", PSK),
                "peer.AllowedIPs[1]",
                StatusCode::CONFLICT,
            ),
        ] {
            let e = parse_import(&body(&peer), |_| site(), &me).unwrap_err();
            assert_eq!((e.status, e.field.as_deref()), (status, Some(field)), "{peer}: {}", e.message);
            assert!(e.message.starts_with("peer."), "{}", e.message);
            assert!(!e.message.contains("remote_") && !e.message.contains(PSK), "{}", e.message);
        }
    }

    #[test]
    fn renames_only_the_create_field_names() {
        assert_eq!(
            rename("additional_remote_network_cidrs[4] 10.2.0.0/16 overlaps remote_network_cidr of local_network_cidr"),
            "peer.AllowedIPs[5] 10.2.0.0/16 overlaps peer.AllowedIPs[0] of local_network_cidr"
        );
        assert_eq!(rename("additional_remote_network_cidrs: lists at most 63"), "peer.AllowedIPs: lists at most 63");
        assert_eq!(rename("ünïcode remote_peer_port"), "ünïcode peer.Endpoint");
    }
}
