//! Request and response bodies of the vpn-gateways API, and their validation.
//! Every rule names the field it checks; a failed rule is a 422.

use super::error::ApiError;
use super::networks::{
    check_local_network, parse_list, validate_network, validate_remote_cidr, GatewayNetworks, ADDITIONAL_LOCAL,
    ADDITIONAL_REMOTE, REMOTE,
};
use crate::firewall::{parse_action, parse_rules, rule_texts, FirewallAction, FirewallRuleText};
use crate::plane::{Tunnel, TunnelStatus};
use crate::secret::SecretString;
use crate::store::{GatewayChanges, GatewayRecord, Status};
use serde::{Deserialize, Serialize};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use utoipa::ToSchema;
use wgxdp_dataplane::noise::{PresharedKey, PublicKey};
use wgxdp_dataplane::policy::{FirewallRule, ForwardingPolicy, RuleAction, MAX_RULES};
use wgxdp_dataplane::table::IpPrefix;

/// WireGuard's REJECT_AFTER_TIME: a tunnel is "up" if it shook hands since.
pub const UP_WITHIN: Duration = Duration::from_secs(180);

/// What a masked secret reads as after creation.
pub const MASK: &str = "********";

/// `POST /api/v1/vpn-gateways`. Every field is an `Option` here so that a
/// missing one is reported as a 422 naming it; the document says which are
/// required. `null` is the same as leaving a field out.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateGateway {
    #[schema(value_type = GatewayName, required = true)]
    pub name: Option<String>,
    #[schema(value_type = Region, required = true)]
    pub region: Option<String>,
    #[schema(value_type = TunnelType, required = true)]
    pub tunnel_type: Option<String>,
    /// The remote site's network, routed into the tunnel.
    #[schema(value_type = RemoteNetwork, required = true)]
    pub remote_network_cidr: Option<String>,
    /// Public IP of the remote WireGuard peer.
    #[schema(value_type = PeerAddress, required = true)]
    pub remote_peer_ip: Option<String>,
    /// The remote peer's WireGuard public key; not this gateway's own key
    /// (409), nor one another gateway or a configuration-file peer uses (409).
    #[schema(value_type = WireguardKey, required = true)]
    pub remote_public_key: Option<String>,
    /// The remote peer's UDP port (absent or null: 51820).
    #[schema(minimum = 1, maximum = 65535)]
    pub remote_peer_port: Option<u16>,
    /// Pre-shared key; generated when absent or null.
    #[schema(value_type = Option<WireguardKey>)]
    pub pre_shared_key: Option<SecretString>,
    /// This site's network (absent or null: the configured `[api] site_cidr`;
    /// required, and so listed, when none is configured).
    #[schema(value_type = Option<LocalNetwork>)]
    pub local_network_cidr: Option<String>,
    /// Seconds between keepalives (0, absent or null: off).
    #[schema(minimum = 0, maximum = 65535)]
    pub persistent_keepalive: Option<u16>,
    /// More remote networks routed into this tunnel besides
    /// `remote_network_cidr` (at most 63). No two remote networks of any
    /// gateways may overlap (409).
    #[schema(value_type = Option<Vec<RemoteNetwork>>, max_items = 63, example = json!(["10.2.0.0/16", "fd10::/64"]))]
    pub additional_remote_network_cidrs: Option<Vec<String>>,
    /// More networks of this site the remote site may reach besides
    /// `local_network_cidr` (at most 63; each listed once, none overlapping
    /// a remote network of this gateway: 409 otherwise). The remote site
    /// reaches nothing outside its local networks.
    #[schema(value_type = Option<Vec<LocalNetwork>>, max_items = 63, example = json!(["10.51.0.0/24", "fd50::/64"]))]
    pub additional_local_network_cidrs: Option<Vec<String>>,
    /// Firewall rules for traffic entering from the remote site (at most 256),
    /// evaluated in order: the first rule that matches decides; traffic no
    /// rule matches gets `firewall_default`. Names need not be unique. Whatever
    /// the rules say, the remote site only reaches the local networks, and
    /// replies to connections the local side opened are always let back in.
    /// Packets to the gateway host's own addresses (e.g. pinging its LAN
    /// address) need an `allow` rule whose `destination` is that one address
    /// (/32 or /128; `firewall_default` and rules for the site's networks
    /// never let them in), e.g. `{"name":"ping gateway","protocol":"icmp",
    /// "destination":"10.50.0.1/32","action":"allow"}`. Absent or null: no rules.
    #[schema(max_items = 256, example = json!([
        {"name": "ping gateway", "protocol": "icmp", "destination": "10.50.0.1/32", "action": "allow"},
        {"name": "no ssh", "protocol": "tcp", "port": "22", "action": "deny"}
    ]))]
    pub firewall: Option<Vec<FirewallRuleText>>,
    /// What happens to traffic from the remote site that no rule matches
    /// (absent or null: `allow`).
    #[schema(value_type = Option<FirewallAction>)]
    pub firewall_default: Option<String>,
}

/// `PATCH /api/v1/vpn-gateways/{id}`: any subset of these (a field absent
/// or `null` stays as it is).
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateGateway {
    #[schema(value_type = Option<GatewayName>)]
    pub name: Option<String>,
    #[schema(value_type = Option<RemoteNetwork>)]
    pub remote_network_cidr: Option<String>,
    #[schema(value_type = Option<PeerAddress>)]
    pub remote_peer_ip: Option<String>,
    #[schema(minimum = 1, maximum = 65535)]
    pub remote_peer_port: Option<u16>,
    /// Rotates the pre-shared key (the remote side must rotate too).
    #[schema(value_type = Option<WireguardKey>)]
    pub pre_shared_key: Option<SecretString>,
    /// Seconds; 0 turns keepalives off.
    #[schema(minimum = 0, maximum = 65535)]
    pub persistent_keepalive: Option<u16>,
    /// Replaces the whole list (`[]`: none); at most 63.
    #[schema(value_type = Option<Vec<RemoteNetwork>>, max_items = 63)]
    pub additional_remote_network_cidrs: Option<Vec<String>>,
    /// Replaces the whole list (`[]`: none); at most 63.
    #[schema(value_type = Option<Vec<LocalNetwork>>, max_items = 63)]
    pub additional_local_network_cidrs: Option<Vec<String>>,
    /// Replaces every firewall rule (`[]`: none); at most 256, evaluated in
    /// order, first match wins (see `CreateGateway.firewall`). The running
    /// tunnel follows at once, without a restart; rule counters restart.
    #[schema(max_items = 256)]
    pub firewall: Option<Vec<FirewallRuleText>>,
    /// For traffic no rule matches.
    #[schema(value_type = Option<FirewallAction>)]
    pub firewall_default: Option<String>,
}

/// The only tunnel type: `wireguard`.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TunnelType {
    Wireguard,
}

/// A VPN gateway: one remote site, one WireGuard peer of this gateway.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct GatewayView {
    #[schema(example = "vpn_abc123")]
    pub id: String,
    pub name: String,
    pub status: Status,
    pub region: String,
    #[schema(example = "wireguard")]
    pub tunnel_type: String,
    pub local_network_cidr: String,
    /// Further local networks the remote site may reach (`[]`: none).
    pub additional_local_network_cidrs: Vec<String>,
    pub remote_network_cidr: String,
    /// Further remote networks routed into the tunnel (`[]`: none).
    pub additional_remote_network_cidrs: Vec<String>,
    /// Firewall rules on traffic from the remote site, in evaluation order
    /// (first match wins), normalised: `port`, `source` and `destination`
    /// are left out when a rule has none, `action` is always present.
    /// Packets to the gateway host's own addresses need an `allow` rule whose
    /// `destination` is that one address; replies to connections the local
    /// side opened always pass.
    pub firewall: Vec<FirewallRuleText>,
    /// For traffic no rule matches.
    #[schema(value_type = FirewallAction, inline)]
    pub firewall_default: String,
    pub remote_peer_ip: String,
    pub remote_peer_port: u16,
    pub remote_public_key: String,
    /// The key itself only in the response that created it; masked afterwards.
    pub pre_shared_key: String,
    pub persistent_keepalive: Option<u16>,
    /// This gateway's public address and WireGuard port and key.
    pub local_ip: String,
    pub local_port: u16,
    pub local_public_key: String,
    /// `up` if a handshake completed within the last 180 s.
    #[schema(example = "up")]
    pub tunnel_status: String,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub last_handshake: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

/// Live tunnel state from the data plane.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct StatusView {
    pub id: String,
    #[schema(example = "up")]
    pub tunnel_status: String,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub packets_sent: u64,
    pub packets_received: u64,
    pub handshakes: u64,
    /// Handshakes with the remote peer (authenticated by its key) that did
    /// not complete: typically a pre-shared key that differs on its side.
    pub handshake_failures: u64,
    pub last_handshake: Option<String>,
    /// Where the remote peer's packets come from now (it may roam).
    pub remote_endpoint: Option<String>,
    /// Packets each firewall rule matched, in rule order, since the rules
    /// last changed (or the gateway started).
    pub firewall_hits: Vec<FirewallRuleHits>,
    /// The node whose data plane runs this tunnel (`GET /api/v1/nodes`);
    /// null while none does (no live node of its region has taken it yet).
    pub serving_node: Option<String>,
}

/// How often one firewall rule matched.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct FirewallRuleHits {
    pub name: String,
    pub hits: u64,
}

/// `meta` of a single-object response.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ObjectMeta {
    /// `synced`: the record is durable on disk.
    pub persistence: String,
}

/// `meta` of a list response.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ListMeta {
    pub limit: usize,
    pub count: usize,
    /// Pass as `cursor` for the next page; null on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct GatewayEnvelope {
    pub data: GatewayView,
    pub meta: ObjectMeta,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct GatewayListEnvelope {
    pub data: Vec<GatewayView>,
    pub meta: ListMeta,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct StatusEnvelope {
    pub data: StatusView,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// Machine-readable: bad_request, unauthorized, forbidden, not_found,
    /// conflict, precondition_failed, validation_failed, idempotency_key_reused,
    /// payload_too_large,
    /// unsupported_media_type, rate_limited, unavailable, internal_error.
    pub code: String,
    pub message: String,
    /// The offending field, for validation errors.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ErrorEnvelope {
    pub error: ErrorBody,
}

/// RFC 3339, seconds, UTC.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

pub fn rfc3339_millis(ms: i64) -> String {
    rfc3339(UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0)))
}

pub fn is_up(status: &TunnelStatus, now: SystemTime) -> bool {
    status.last_handshake.is_some_and(|t| now.duration_since(t).map(|d| d <= UP_WITHIN).unwrap_or(true))
}

/// What the gateway says about itself in every view.
#[derive(Debug, Clone)]
pub struct LocalSide {
    pub ip: IpAddr,
    pub port: u16,
    pub public_key: PublicKey,
}

impl GatewayView {
    pub fn new(g: &GatewayRecord, live: Option<&TunnelStatus>, local: &LocalSide, reveal_psk: bool) -> Self {
        let live = live.cloned().unwrap_or_default();
        Self {
            id: g.id.clone(),
            name: g.name.clone(),
            status: g.status,
            region: g.region.clone(),
            tunnel_type: "wireguard".into(),
            local_network_cidr: g.local_network_cidr.to_string(),
            additional_local_network_cidrs: g.additional_local_network_cidrs.iter().map(ToString::to_string).collect(),
            remote_network_cidr: g.remote_network_cidr.to_string(),
            additional_remote_network_cidrs: g
                .additional_remote_network_cidrs
                .iter()
                .map(ToString::to_string)
                .collect(),
            firewall: rule_texts(&g.firewall),
            firewall_default: g.firewall_default.as_str().to_owned(),
            remote_peer_ip: g.remote_endpoint.ip().to_string(),
            remote_peer_port: g.remote_endpoint.port(),
            remote_public_key: g.remote_public_key.to_base64(),
            pre_shared_key: if reveal_psk { g.pre_shared_key.to_base64_secret().to_string() } else { MASK.into() },
            persistent_keepalive: g.persistent_keepalive,
            local_ip: local.ip.to_string(),
            local_port: local.port,
            local_public_key: local.public_key.to_base64(),
            tunnel_status: if is_up(&live, SystemTime::now()) { "up" } else { "down" }.into(),
            bytes_sent: live.bytes_sent,
            bytes_received: live.bytes_received,
            last_handshake: live.last_handshake.map(rfc3339),
            created_at: rfc3339_millis(g.created_at),
            updated_at: rfc3339_millis(g.updated_at),
        }
    }
}

impl StatusView {
    pub fn new(g: &GatewayRecord, live: Option<&TunnelStatus>, serving_node: Option<String>) -> Self {
        let live = live.cloned().unwrap_or_default();
        Self {
            serving_node,
            id: g.id.clone(),
            tunnel_status: if is_up(&live, SystemTime::now()) { "up" } else { "down" }.into(),
            bytes_sent: live.bytes_sent,
            bytes_received: live.bytes_received,
            packets_sent: live.packets_sent,
            packets_received: live.packets_received,
            handshakes: live.handshakes,
            handshake_failures: live.handshake_failures,
            last_handshake: live.last_handshake.map(rfc3339),
            remote_endpoint: live.endpoint.map(|e| e.to_string()),
            // A rule without a counter yet (the rules changed a moment ago) counts 0.
            firewall_hits: g
                .firewall
                .iter()
                .enumerate()
                .map(|(i, r)| FirewallRuleHits {
                    name: r.name.clone(),
                    hits: live.rule_hits.get(i).copied().unwrap_or(0),
                })
                .collect(),
        }
    }
}

pub(crate) fn invalid(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::validation(field, format!("{field}: {}", message.into()))
}

fn required<T>(v: Option<T>, field: &str) -> Result<T, ApiError> {
    v.ok_or_else(|| invalid(field, "is required"))
}

/// A gateway name as `GatewayName` documents it: kept as given.
pub fn validate_name(name: &str) -> Result<String, ApiError> {
    let chars = name.chars().count();
    if !(2..=40).contains(&chars) {
        return Err(invalid("name", format!("must be 2-40 characters (got {chars})")));
    }
    if name.chars().any(char::is_control) {
        return Err(invalid("name", "must not contain control characters"));
    }
    if name.chars().all(char::is_whitespace) {
        return Err(invalid("name", "must not be all white space"));
    }
    Ok(name.to_owned())
}

fn validate_region(region: &str) -> Result<String, ApiError> {
    if !crate::store::is_region_name(region) {
        return Err(invalid("region", crate::store::REGION_NAME_RULE));
    }
    Ok(region.to_owned())
}

fn validate_tunnel_type(t: &str) -> Result<(), ApiError> {
    match t {
        "wireguard" => Ok(()),
        "ipsec" => Err(invalid("tunnel_type", "ipsec is not supported; only wireguard is")),
        other => Err(invalid("tunnel_type", format!("`{other}` is not a tunnel type; only wireguard is supported"))),
    }
}

pub fn validate_cidr(field: &str, s: &str) -> Result<IpPrefix, ApiError> {
    s.parse::<IpPrefix>().map_err(|e| invalid(field, format!("`{s}` is not a valid CIDR block ({e})")))
}

pub fn validate_peer_ip(s: &str) -> Result<IpAddr, ApiError> {
    let ip: IpAddr = s.parse().map_err(|_| invalid("remote_peer_ip", format!("`{s}` is not an IP address")))?;
    if ip.is_unspecified() || ip.is_multicast() || ip == IpAddr::V4(std::net::Ipv4Addr::BROADCAST) {
        return Err(invalid("remote_peer_ip", format!("{ip} cannot be a peer's address")));
    }
    Ok(ip)
}

fn validate_port(field: &str, port: u16) -> Result<u16, ApiError> {
    if port == 0 {
        return Err(invalid(field, "must be 1-65535"));
    }
    Ok(port)
}

/// A key exactly as `WireguardKey` documents it (no surrounding white space).
pub(crate) fn exact_key<K: std::str::FromStr>(field: &str, what: &str, s: &str) -> Result<K, ApiError> {
    let refuse = || invalid(field, format!("must be a base64 WireGuard {what} (32 bytes, 44 characters)"));
    if s.len() != 44 || s.trim() != s {
        return Err(refuse());
    }
    s.parse().map_err(|_| refuse())
}

pub fn validate_public_key(s: &str, ours: &PublicKey) -> Result<PublicKey, ApiError> {
    let key: PublicKey = exact_key("remote_public_key", "public key", s)?;
    if &key == ours {
        return Err(ApiError::conflict_at("remote_public_key", "remote_public_key: is this gateway's own key"));
    }
    Ok(key)
}

pub fn validate_psk(s: &str) -> Result<PresharedKey, ApiError> {
    exact_key("pre_shared_key", "pre-shared key", s)
}

pub fn overlaps(a: &IpPrefix, b: &IpPrefix) -> bool {
    a.contains(b.addr()) || b.contains(a.addr())
}

/// `firewall`: at most `MAX_RULES` rules, each valid; errors name the rule
/// and its field (`firewall[3].port`).
fn validate_firewall(rules: &[FirewallRuleText]) -> Result<Vec<FirewallRule>, ApiError> {
    if rules.len() > MAX_RULES {
        return Err(invalid("firewall", format!("holds at most {MAX_RULES} rules (got {})", rules.len())));
    }
    parse_rules(rules).map_err(|(i, e)| invalid(&format!("firewall[{i}].{}", e.field), e.message))
}

fn validate_firewall_default(s: &str) -> Result<RuleAction, ApiError> {
    parse_action(s).map_err(|e| invalid("firewall_default", e))
}

/// A validated create request, ready to store.
#[derive(Debug)]
pub struct NewGateway {
    pub name: String,
    pub region: String,
    pub local_network_cidr: IpPrefix,
    pub remote_network_cidr: IpPrefix,
    pub remote_endpoint: SocketAddr,
    pub remote_public_key: PublicKey,
    pub pre_shared_key: Box<PresharedKey>,
    pub persistent_keepalive: Option<u16>,
    pub additional_remote_network_cidrs: Vec<IpPrefix>,
    pub additional_local_network_cidrs: Vec<IpPrefix>,
    pub firewall: Vec<FirewallRule>,
    pub firewall_default: RuleAction,
}

impl NewGateway {
    /// The record to store for it: `creating`, with a fresh id, made `now`.
    pub fn into_record(self, now: i64) -> GatewayRecord {
        GatewayRecord {
            id: crate::store::random_id("vpn_"),
            seq: 0,
            name: self.name,
            status: Status::Creating,
            region: self.region,
            local_network_cidr: self.local_network_cidr,
            remote_network_cidr: self.remote_network_cidr,
            remote_endpoint: self.remote_endpoint,
            remote_public_key: self.remote_public_key,
            pre_shared_key: self.pre_shared_key,
            persistent_keepalive: self.persistent_keepalive,
            additional_remote_network_cidrs: self.additional_remote_network_cidrs,
            additional_local_network_cidrs: self.additional_local_network_cidrs,
            firewall: self.firewall,
            firewall_default: self.firewall_default,
            created_at: now,
            updated_at: now,
        }
    }

    /// Every network of the new gateway, each named by its field.
    pub fn networks(&self) -> GatewayNetworks {
        GatewayNetworks::new(
            self.remote_network_cidr,
            &self.additional_remote_network_cidrs,
            self.local_network_cidr,
            &self.additional_local_network_cidrs,
        )
    }
}

/// Decodes a JSON request body strictly (unknown fields are errors): the one
/// decoder the handlers use, public so that fuzzers can drive it without HTTP.
/// Malformed JSON and wrong shapes are 400s; it never panics.
pub fn decode_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ApiError::bad_request(format!("invalid body: {e}")),
        _ => ApiError::bad_request(format!("malformed JSON: {e}")),
    })
}

/// A list of at most `MAX` items, refused while it is decoded (a huge list
/// of tiny items never reaches memory): `#[serde(deserialize_with =
/// "bounded::<_, _, MAX>")]`.
pub fn bounded<'de, D, T, const MAX: usize>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct Items<T, const MAX: usize>(std::marker::PhantomData<T>);
    impl<'de, T: Deserialize<'de>, const MAX: usize> serde::de::Visitor<'de> for Items<T, MAX> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "a list of at most {MAX} items")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(MAX).min(1024));
            while let Some(item) = seq.next_element()? {
                if items.len() == MAX {
                    return Err(serde::de::Error::custom(format!("a list of more than {MAX} items")));
                }
                items.push(item);
            }
            Ok(items)
        }
    }
    d.deserialize_seq(Items::<T, MAX>(std::marker::PhantomData))
}

/// `POST /api/v1/vpn-gateways` body → a validated gateway (what the handler
/// runs). `site_cidr_of`: the site network of the region the body names
/// (the default `local_network_cidr`).
pub fn parse_create(
    bytes: &[u8],
    site_cidr_of: impl FnOnce(&str) -> Option<IpPrefix>,
    ours: &PublicKey,
) -> Result<NewGateway, ApiError> {
    CreateGateway::from_json(bytes)?.validate_in(site_cidr_of, ours)
}

/// `PATCH /api/v1/vpn-gateways/{id}` body → validated changes to `current`.
pub fn parse_update(bytes: &[u8], current: &GatewayRecord) -> Result<GatewayChanges, ApiError> {
    UpdateGateway::from_json(bytes)?.validate(current)
}

impl CreateGateway {
    pub fn from_json(bytes: &[u8]) -> Result<Self, ApiError> {
        decode_json(bytes)
    }

    /// `validate`, with the site network of the region the body names.
    pub fn validate_in(
        self,
        site_cidr_of: impl FnOnce(&str) -> Option<IpPrefix>,
        ours: &PublicKey,
    ) -> Result<NewGateway, ApiError> {
        let site_cidr = self.region.as_deref().and_then(site_cidr_of);
        self.validate(site_cidr, ours)
    }

    pub fn validate(self, site_cidr: Option<IpPrefix>, ours: &PublicKey) -> Result<NewGateway, ApiError> {
        let name = validate_name(&required(self.name, "name")?)?;
        let region = validate_region(&required(self.region, "region")?)?;
        validate_tunnel_type(&required(self.tunnel_type, "tunnel_type")?)?;
        let remote = validate_remote_cidr(REMOTE, &required(self.remote_network_cidr, REMOTE)?)?;
        let peer_ip = validate_peer_ip(&required(self.remote_peer_ip, "remote_peer_ip")?)?;
        let key = validate_public_key(&required(self.remote_public_key, "remote_public_key")?, ours)?;
        let port = validate_port("remote_peer_port", self.remote_peer_port.unwrap_or(51820))?;
        let psk = match self.pre_shared_key {
            Some(s) => Box::new(validate_psk(s.expose())?),
            None => Box::new(PresharedKey::generate()),
        };
        let local = match (self.local_network_cidr, site_cidr) {
            (Some(s), _) => validate_network("local_network_cidr", &s)?,
            (None, Some(site)) => check_local_network("local_network_cidr", site)?,
            (None, None) => {
                return Err(invalid("local_network_cidr", "is required (no site CIDR is configured on this gateway)"))
            }
        };
        let additional_remote =
            parse_list(ADDITIONAL_REMOTE, &self.additional_remote_network_cidrs.unwrap_or_default())?;
        let additional_local = parse_list(ADDITIONAL_LOCAL, &self.additional_local_network_cidrs.unwrap_or_default())?;
        GatewayNetworks::new(remote, &additional_remote, local, &additional_local).check(|_| true)?;
        let firewall = validate_firewall(&self.firewall.unwrap_or_default())?;
        let firewall_default = match self.firewall_default {
            Some(s) => validate_firewall_default(&s)?,
            None => RuleAction::Allow,
        };
        Ok(NewGateway {
            name,
            region,
            local_network_cidr: local,
            remote_network_cidr: remote,
            remote_endpoint: SocketAddr::new(peer_ip, port),
            remote_public_key: key,
            pre_shared_key: psk,
            persistent_keepalive: self.persistent_keepalive.filter(|&k| k > 0),
            additional_remote_network_cidrs: additional_remote,
            additional_local_network_cidrs: additional_local,
            firewall,
            firewall_default,
        })
    }
}

impl UpdateGateway {
    pub fn from_json(bytes: &[u8]) -> Result<Self, ApiError> {
        decode_json(bytes)
    }

    /// Validates the changes against the gateway they apply to.
    pub fn validate(self, current: &GatewayRecord) -> Result<GatewayChanges, ApiError> {
        let mut c = GatewayChanges::default();
        if let Some(n) = self.name {
            c.name = Some(validate_name(&n)?);
        }
        let in_request = |list: &str| match list {
            REMOTE => self.remote_network_cidr.is_some(),
            ADDITIONAL_REMOTE => self.additional_remote_network_cidrs.is_some(),
            ADDITIONAL_LOCAL => self.additional_local_network_cidrs.is_some(),
            _ => false,
        };
        if [REMOTE, ADDITIONAL_REMOTE, ADDITIONAL_LOCAL].into_iter().any(in_request) {
            if let Some(s) = &self.remote_network_cidr {
                c.remote_network_cidr = Some(validate_remote_cidr(REMOTE, s)?);
            }
            if let Some(list) = &self.additional_remote_network_cidrs {
                c.additional_remote_network_cidrs = Some(parse_list(ADDITIONAL_REMOTE, list)?);
            }
            if let Some(list) = &self.additional_local_network_cidrs {
                c.additional_local_network_cidrs = Some(parse_list(ADDITIONAL_LOCAL, list)?);
            }
            // The rules hold for the gateway as it would be.
            let mut next = current.clone();
            next.apply(&c);
            GatewayNetworks::of_record(&next).check(in_request)?;
        }
        if let Some(s) = self.remote_peer_ip {
            c.remote_peer_ip = Some(validate_peer_ip(&s)?);
        }
        if let Some(p) = self.remote_peer_port {
            c.remote_peer_port = Some(validate_port("remote_peer_port", p)?);
        }
        if let Some(s) = self.pre_shared_key {
            c.pre_shared_key = Some(validate_psk(s.expose())?);
        }
        if let Some(k) = self.persistent_keepalive {
            c.persistent_keepalive = Some((k > 0).then_some(k));
        }
        if let Some(rules) = &self.firewall {
            c.firewall = Some(validate_firewall(rules)?);
        }
        if let Some(s) = &self.firewall_default {
            c.firewall_default = Some(validate_firewall_default(s)?);
        }
        Ok(c)
    }
}

/// The data plane's view of a stored gateway.
pub fn tunnel_of(g: &GatewayRecord) -> Tunnel {
    Tunnel {
        public_key: g.remote_public_key,
        preshared_key: (*g.pre_shared_key).clone(),
        endpoint: Some(g.remote_endpoint),
        allowed_ips: g.remote_prefixes().collect(),
        persistent_keepalive: g.persistent_keepalive,
        policy: ForwardingPolicy {
            local_networks: g.local_prefixes().collect(),
            rules: g.firewall.clone(),
            default_action: g.firewall_default,
        },
    }
}

/// A wg-quick configuration for the remote side of `g`.
pub fn remote_config(g: &GatewayRecord, local: &LocalSide) -> String {
    let mut s = format!(
        "# wg-quick configuration for the remote side of \"{}\" ({}).\n\
         # Fill in the two placeholders, save as /etc/wireguard/wg0.conf, run `wg-quick up wg0`.\n\
         [Interface]\n\
         PrivateKey = <the private key whose public key is {}>\n\
         ListenPort = {}\n\n\
         [Peer]\n\
         PublicKey = {}\n\
         PresharedKey = <the pre_shared_key returned when this gateway was created or last rotated>\n\
         Endpoint = {}\n\
         AllowedIPs = {}\n",
        g.name,
        g.id,
        g.remote_public_key,
        g.remote_endpoint.port(),
        local.public_key,
        SocketAddr::new(local.ip, local.port),
        g.local_prefixes().map(|p| p.to_string()).collect::<Vec<_>>().join(", "),
    );
    s.push_str(&format!("PersistentKeepalive = {}\n", g.persistent_keepalive.unwrap_or(25)));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const PSK: &str = "sjIbzf0fbRgxz3s0hK2wPgl8g2Gh5d7g2xSpKBs1Ots=";

    #[test]
    fn request_debug_never_shows_the_pre_shared_key() {
        let body = format!(r#"{{"name":"site-a","pre_shared_key":"{PSK}"}}"#);
        let create = CreateGateway::from_json(body.as_bytes()).unwrap();
        let shown = format!("{create:?}");
        assert!(!shown.contains(PSK) && shown.contains("<redacted>"), "{shown}");
        let update = UpdateGateway::from_json(format!(r#"{{"pre_shared_key":"{PSK}"}}"#).as_bytes()).unwrap();
        let shown = format!("{update:?}");
        assert!(!shown.contains(PSK) && shown.contains("<redacted>"), "{shown}");
        let ours = wgxdp_dataplane::noise::PrivateKey::generate().public_key();
        let peer = wgxdp_dataplane::noise::PrivateKey::generate().public_key();
        let body = format!(
            r#"{{"name":"site-a","region":"eu","tunnel_type":"wireguard","remote_network_cidr":"10.1.0.0/16",
               "remote_peer_ip":"192.0.2.1","remote_public_key":"{peer}","pre_shared_key":"{PSK}"}}"#
        );
        let new = parse_create(body.as_bytes(), |_| Some("10.50.0.0/24".parse().unwrap()), &ours).unwrap();
        assert!(!format!("{new:?}").contains(PSK));
    }

    #[test]
    fn fuzz_entry_points_reject_garbage_without_panicking() {
        let ours = wgxdp_dataplane::noise::PrivateKey::generate().public_key();
        let current = GatewayRecord {
            remote_network_cidr: "10.1.0.0/16".parse().unwrap(),
            additional_remote_network_cidrs: vec!["10.2.0.0/16".parse().unwrap()],
            ..crate::store::sample("n", "peer")
        };
        let inputs: [&[u8]; 9] = [
            b"",
            b"{",
            b"[]",
            b"\xff\xfe",
            b"{\"name\": 5}",
            b"{\"remote_network_cidr\": \"10.0.0.0/99\"}",
            b"{\"remote_peer_port\": 70000}",
            b"{\"region\": \"\\u0000\"}",
            b"{\"colour\": 1}",
        ];
        for input in inputs {
            assert!(parse_create(input, |_| None, &ours).is_err());
            let _ = parse_update(input, &current);
        }
        // Overlapping the gateway's local network is a conflict; a default route is no remote network.
        let bad_cidr = parse_update(br#"{"remote_network_cidr":"10.50.0.0/25"}"#, &current).unwrap_err();
        assert_eq!(bad_cidr.status, axum::http::StatusCode::CONFLICT);
        let default = parse_update(br#"{"remote_network_cidr":"0.0.0.0/0"}"#, &current).unwrap_err();
        assert_eq!(default.status, axum::http::StatusCode::UNPROCESSABLE_ENTITY);
        // The stored additional remote network takes part: moving the seed onto it is refused.
        let onto = parse_update(br#"{"remote_network_cidr":"10.2.128.0/17"}"#, &current).unwrap_err();
        assert_eq!(onto.field.as_deref(), Some("remote_network_cidr"), "{}", onto.message);
        // A local network that would overlap a stored remote one: the local one is named.
        let local = parse_update(br#"{"additional_local_network_cidrs":["10.60.0.0/24","10.2.3.0/24"]}"#, &current)
            .unwrap_err();
        assert_eq!(local.field.as_deref(), Some("additional_local_network_cidrs[1]"), "{}", local.message);
    }

    #[test]
    fn the_tunnel_carries_every_network_and_the_firewall() {
        let ours = wgxdp_dataplane::noise::PrivateKey::generate().public_key();
        let peer = wgxdp_dataplane::noise::PrivateKey::generate().public_key();
        let body = format!(
            r#"{{"name":"site-a","region":"eu","tunnel_type":"wireguard","remote_network_cidr":"10.1.0.0/16",
               "remote_peer_ip":"192.0.2.1","remote_public_key":"{peer}",
               "additional_remote_network_cidrs":["fd01::/64"],"additional_local_network_cidrs":["fd50::/64"],
               "firewall":[{{"name":"no ssh","protocol":"tcp","port":"22","action":"deny"}}],
               "firewall_default":"deny"}}"#
        );
        let new = parse_create(body.as_bytes(), |_| Some("10.50.0.0/24".parse().unwrap()), &ours).unwrap();
        let g = new.into_record(crate::store::now_millis());
        let t = tunnel_of(&g);
        let p = |s: &str| s.parse::<IpPrefix>().unwrap();
        assert_eq!(t.allowed_ips, vec![p("10.1.0.0/16"), p("fd01::/64")]);
        assert_eq!(t.policy.local_networks, vec![p("10.50.0.0/24"), p("fd50::/64")]);
        assert_eq!(t.policy.default_action, RuleAction::Deny);
        assert_eq!(t.policy.rules.len(), 1);
        assert_eq!(t.policy.rules[0].name, "no ssh");
        let local = LocalSide { ip: "198.51.100.1".parse().unwrap(), port: 51820, public_key: ours };
        assert!(remote_config(&g, &local).contains("AllowedIPs = 10.50.0.0/24, fd50::/64\n"));
    }
}
