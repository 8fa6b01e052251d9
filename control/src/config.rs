//! The `wgxdp serve` configuration file (TOML). Unknown keys are errors, so a
//! typo never silently becomes a default.
//!
//! ```toml
//! [interface]
//! wan = "eth0"                         # tunnel side
//! lan = "eth1"                         # site side
//! listen_port = 51820
//! private_key_file = "/etc/wgxdp/private.key"   # mode 0600
//! # queues = 2            # default: every queue both NICs have
//! # cores = [2, 3]        # pin workers (default: all cores, in order)
//! # crypto_threads = 4    # cores that run one tunnel's AEAD, the worker's own
//! #                       # included (default: every core the gateway may use)
//! # tunnel_mtu = 1420
//! # lan_next_hop = "10.0.0.1"   # default: site destinations are on-link
//! # tracked_flows = 65536  # connection table size (1024-16777216): flows opened
//! #                        # from the site whose replies may come back in
//! # host_interface = "wgxdp0"   # the TUN device through which tunnels reach
//! #                             # the gateway host itself (1-15 characters)
//! # busy_poll = false     # AF_XDP busy polling (SO_PREFER_BUSY_POLL): workers
//! #                       # drive the NIC from their syscalls; see README
//!
//! [[peer]]
//! public_key = "base64…"
//! allowed_ips = ["10.20.0.0/16"]
//! # endpoint = "198.51.100.7:51820"
//! # preshared_key_file = "/etc/wgxdp/site-b.psk"
//! # persistent_keepalive = 25
//! # local_networks = ["10.50.0.0/24"]  # what the peer's site may reach; default:
//! #                  # `[api] site_cidr` if set, else the LAN interface's networks
//! # firewall_default = "allow"         # or "deny": only replies to flows the
//! #                                    # local side opened come back in
//! # [[peer.firewall]]                  # rules as in the API, in order
//! # name = "no ssh"
//! # protocol = "tcp"                   # tcp | udp | icmp | any
//! # port = "22"                        # N or N-M (tcp/udp)
//! # source = "10.20.0.0/16"            # destination = "…"; action = "deny" (default allow)
//! # action = "deny"
//!
//! [api]                                # optional: the HTTP API and its store
//! listen = "127.0.0.1:8080"
//! database = "/var/lib/wgxdp/wgxdp.db" # created with mode 0600 (or [store] below)
//! site_cidr = "10.50.0.0/24"           # default local_network_cidr
//! # public_address = "203.0.113.150"   # default: the WAN interface's address
//! # mutations_per_minute = 100         # per API key
//! # reads_per_minute = 1200
//! # auth_failures_per_minute = 30      # per source address (IPv6: /64), then 429
//! # metrics_auth = false               # true: /metrics needs an API key
//! # metrics_listen = "127.0.0.1:9100"  # serve /metrics here (and not on `listen`)
//!
//! # [node]                             # this serve as one node of a fleet
//! # id = "gw-eu-1"                     # default: the host name
//! # region = "eu-west"                 # the one region it serves (default: every region)
//!
//! # [store]                            # instead of [api] database: a PostgreSQL
//! # url = "postgres://wgxdp@db.example/wgxdp"   # that several nodes share
//! # password_file = "/etc/wgxdp/pg.pass"        # mode 0600; keeps it out of the URL
//! ```
//!
//! Peers from `[[peer]]` are fixed for the process's life; gateways created
//! through the API live in the database and come back after a restart.
//! Traffic from a peer's site reaches only its local networks; replies to
//! flows the local side opened always pass, the rest meets its firewall rules
//! (first match wins), then `firewall_default`.

use crate::api::model::overlaps;
use crate::firewall::parse_action;
use crate::secret::SecretString;
use crate::store::{PostgresAt, StoreLocation};
use serde::Deserialize;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use wgxdp_dataplane::gateway::PeerSpec;
use wgxdp_dataplane::noise::peer::PeerConfig;
use wgxdp_dataplane::noise::{PresharedKey, PrivateKey, PublicKey};
use wgxdp_dataplane::policy::{ForwardingPolicy, MAX_NETWORKS, MAX_RULES};
use wgxdp_dataplane::table::IpPrefix;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub interface: InterfaceSection,
    #[serde(default, rename = "peer")]
    pub peers: Vec<PeerSection>,
    pub api: Option<ApiSection>,
    pub store: Option<StoreSection>,
    pub node: Option<NodeSection>,
}

/// `[node]`: this `serve` as one node of a fleet.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSection {
    /// Default: the host name.
    pub id: Option<String>,
    /// The one region it serves (default: every region).
    pub region: Option<String>,
    /// An address that keepalived (VRRP) moves between the nodes of a
    /// region: this node serves the region's gateways only while the address
    /// is on one of its interfaces (default: always).
    pub floating_address: Option<IpAddr>,
}

/// `[store]`: a PostgreSQL database several nodes share, instead of `[api] database`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreSection {
    pub url: String,
    /// The password, kept out of the URL (mode 0600 like the key files).
    pub password_file: Option<PathBuf>,
    /// Allows a PostgreSQL on another host without TLS (this build speaks
    /// none): only where the network between them is already private (a
    /// VPN, IPsec), since the rows hold pre-shared keys.
    #[serde(default)]
    pub insecure_plaintext: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSection {
    #[serde(default = "default_api_listen")]
    pub listen: SocketAddr,
    pub database: Option<PathBuf>,
    pub site_cidr: Option<String>,
    pub public_address: Option<IpAddr>,
    #[serde(default = "default_mutations")]
    pub mutations_per_minute: u32,
    #[serde(default = "default_reads")]
    pub reads_per_minute: u32,
    #[serde(default = "default_auth_failures")]
    pub auth_failures_per_minute: u32,
    #[serde(default)]
    pub metrics_auth: bool,
    pub metrics_listen: Option<SocketAddr>,
}

fn default_auth_failures() -> u32 {
    crate::api::auth::DEFAULT_AUTH_FAILURES_PER_MINUTE
}

fn default_api_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_mutations() -> u32 {
    100
}
/// More crypto threads than this is a typo, not a machine.
const MAX_CRYPTO_THREADS: usize = 256;

fn default_reads() -> u32 {
    1200
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterfaceSection {
    pub wan: String,
    pub lan: String,
    #[serde(default = "default_port")]
    pub listen_port: u16,
    pub private_key_file: PathBuf,
    pub queues: Option<u32>,
    #[serde(default)]
    pub cores: Vec<usize>,
    pub crypto_threads: Option<usize>,
    #[serde(default = "default_mtu")]
    pub tunnel_mtu: usize,
    pub lan_next_hop: Option<IpAddr>,
    #[serde(default = "default_frames")]
    pub frames_per_socket: u32,
    #[serde(default = "default_true")]
    pub zero_copy: bool,
    #[serde(default)]
    pub busy_poll: bool,
    #[serde(default = "default_tracked_flows")]
    pub tracked_flows: usize,
    #[serde(default = "default_host_interface")]
    pub host_interface: String,
    /// The WireGuard interface name `wg(8)` knows the gateway by (its socket
    /// is /var/run/wireguard/<name>.sock); default: `host_interface`.
    pub name: Option<String>,
    /// Serve the `wg` socket (default true).
    #[serde(default = "default_true")]
    pub wg_socket: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerSection {
    pub public_key: String,
    #[serde(default)]
    pub allowed_ips: Vec<String>,
    pub endpoint: Option<String>,
    pub preshared_key_file: Option<PathBuf>,
    pub persistent_keepalive: Option<u16>,
    pub local_networks: Option<Vec<String>>,
    pub firewall_default: Option<String>,
    /// Rules in the API's shape (`[[peer.firewall]]` tables), in order.
    #[serde(default)]
    pub firewall: Vec<crate::firewall::FirewallRuleText>,
}

fn default_port() -> u16 {
    51820
}
fn default_mtu() -> usize {
    1420
}
fn default_frames() -> u32 {
    4096
}
fn default_true() -> bool {
    true
}
fn default_tracked_flows() -> usize {
    wgxdp_dataplane::conntrack::DEFAULT_FLOWS
}
fn default_host_interface() -> String {
    "wgxdp0".into()
}

/// Bounds of `[interface] tracked_flows`.
pub const TRACKED_FLOWS: std::ops::RangeInclusive<usize> = 1024..=16_777_216;

/// Why `name` cannot be a Linux interface name (the kernel's
/// `dev_valid_name`: 1-15 bytes, not `.` or `..`, no `/`, `:` or whitespace).
pub fn invalid_interface_name(name: &str) -> Option<&'static str> {
    if name.is_empty() || name.len() > 15 {
        Some("must be 1-15 characters")
    } else if name == "." || name == ".." {
        Some("cannot be `.` or `..`")
    } else if name.chars().any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control()) {
        Some("must not contain `/`, `:` or whitespace")
    } else {
        None
    }
}

/// A configuration problem, with the fix where there is one.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Syntax { path: PathBuf, message: String },
    #[error("{path} is readable by group or others (mode {mode:o}); run `chmod 600 {path}`")]
    LoosePermissions { path: PathBuf, mode: u32 },
    #[error("{what} in {path}: {reason}")]
    BadKey { what: &'static str, path: PathBuf, reason: String },
    #[error("peer {index}: {reason}")]
    Peer { index: usize, reason: String },
    #[error("interface: {0}")]
    Interface(String),
    #[error("api: {0}")]
    Api(String),
}

/// Which `wg` socket `serve` offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WgSocket {
    /// `wg_socket = false`.
    Off,
    /// `name = "…"`: a socket that cannot be served stops the start.
    Named(String),
    /// No `name`: `host_interface`'s; one that cannot be served (an invalid
    /// name for `wg`, another process on it) is left out with a warning.
    Default(String),
}

/// The validated configuration.
#[derive(Debug)]
pub struct Config {
    pub wan: String,
    pub lan: String,
    pub listen_port: u16,
    pub private_key: PrivateKey,
    pub peers: Vec<PeerSpec>,
    pub queues: Option<u32>,
    pub cores: Vec<usize>,
    /// Threads running AEAD for one queue's tunnels, its worker included
    /// (`None`: every usable core).
    pub crypto_threads: Option<usize>,
    pub tunnel_mtu: usize,
    pub lan_next_hop: Option<IpAddr>,
    pub frames_per_socket: u32,
    pub zero_copy: bool,
    pub busy_poll: bool,
    pub tracked_flows: usize,
    pub host_interface: String,
    /// The `wg` socket to serve.
    pub wg_socket: WgSocket,
    pub api: Option<ApiConfig>,
}

/// The validated `[api]` section.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    /// `[node] id` (default: the host name).
    pub node_id: String,
    /// `[node] region`, or `store::EVERY_REGION`.
    pub node_region: String,
    /// `[node] floating_address`.
    pub floating_address: Option<IpAddr>,
    /// `[api] database` (SQLite), or `[store]` (PostgreSQL).
    pub store: StoreLocation,
    pub site_cidr: Option<IpPrefix>,
    pub public_address: Option<IpAddr>,
    pub mutations_per_minute: u32,
    pub reads_per_minute: u32,
    pub auth_failures_per_minute: u32,
    pub metrics_auth: bool,
    pub metrics_listen: Option<SocketAddr>,
}

/// Where the API keeps its data: `[api] database` or `[store]`, exactly one.
fn store_location(
    database: Option<PathBuf>,
    store: Option<StoreSection>,
    read_secret: SecretReader<'_>,
) -> Result<StoreLocation, ConfigError> {
    match (database, store) {
        (Some(path), None) => Ok(StoreLocation::Sqlite(path)),
        (None, Some(st)) => {
            let parsed =
                crate::store::parse_postgres_url(&st.url).map_err(|e| ConfigError::Api(format!("[store] url: {e}")))?;
            if parsed.get_password().is_some() {
                return Err(ConfigError::Api(
                    "[store] url holds a password: put it in password_file (mode 0600) instead, so that the \
                     configuration file holds no secret"
                        .into(),
                ));
            }
            let remote = crate::store::postgres_plaintext_hosts(&parsed);
            if !remote.is_empty() && !st.insecure_plaintext {
                return Err(ConfigError::Api(format!(
                    "[store] url reaches {} over the network, and this build speaks no TLS to PostgreSQL: the rows \
                     (pre-shared keys among them) would cross it in clear. Use a Unix socket or loopback (a local \
                     PostgreSQL, or a tunnel to the remote one), or set insecure_plaintext = true where the network \
                     is already private",
                    remote.join(", ")
                )));
            }
            let password = match &st.password_file {
                Some(path) => {
                    let text = read_secret(path, "PostgreSQL password")?;
                    Some(SecretString::new(text.trim_end_matches(['\r', '\n']).to_owned()))
                }
                None => None,
            };
            Ok(StoreLocation::Postgres(PostgresAt { url: st.url, password }))
        }
        (Some(_), Some(_)) => Err(ConfigError::Api(
            "both `database` and [store] name the store: keep `database` (SQLite on this host) or [store] url (a \
             PostgreSQL several nodes share)"
                .into(),
        )),
        (None, None) => Err(ConfigError::Api(
            "[api] needs `database` (a SQLite file) or a [store] section with a PostgreSQL `url`".into(),
        )),
    }
}

/// This node's (id, region): `[node]`, or the host name and every region.
fn node_identity(node: Option<&NodeSection>) -> Result<(String, String), ConfigError> {
    let node = node.cloned().unwrap_or_default();
    let id = match node.id {
        Some(id) => node_name(&id).map_err(|e| ConfigError::Api(format!("[node] id `{id}` {e}")))?,
        None => {
            let host = host_name().replace(['.', '_'], "-").to_lowercase();
            node_name(&host)
                .map_err(|e| ConfigError::Api(format!("the host name `{host}` as a node id {e}: set [node] id")))?
        }
    };
    let region = match node.region {
        Some(r) => node_name(&r).map_err(|e| ConfigError::Api(format!("[node] region `{r}` {e}")))?,
        None => crate::store::EVERY_REGION.to_owned(),
    };
    Ok((id, region))
}

/// A node id or region: what the API takes as a region (1-64 of a-z, 0-9, '-').
fn node_name(name: &str) -> Result<String, String> {
    let ok = crate::store::is_region_name(name);
    ok.then(|| name.to_owned()).ok_or_else(|| crate::store::REGION_NAME_RULE.to_owned())
}

/// This host's name (`uname -n`).
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_owned()).unwrap_or_default()
}

/// How `Config::parse_with` obtains the contents of a key file.
pub type SecretReader<'a> = &'a dyn Fn(&Path, &'static str) -> Result<zeroize::Zeroizing<String>, ConfigError>;

/// Reads a key file that must not be readable by anyone but its owner (what
/// `Config::parse` reads key files with).
pub fn read_secret(path: &Path, what: &'static str) -> Result<zeroize::Zeroizing<String>, ConfigError> {
    let meta = std::fs::metadata(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(ConfigError::LoosePermissions { path: path.into(), mode });
    }
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
    if text.trim().is_empty() {
        return Err(ConfigError::BadKey { what, path: path.into(), reason: "the file is empty".into() });
    }
    Ok(zeroize::Zeroizing::new(text))
}

/// The (WAN, LAN) interface names of the configuration file at `path`,
/// without reading or validating anything else (for `wgxdp detach`).
pub fn interfaces(path: &Path) -> Result<(String, String), ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
    #[derive(Deserialize)]
    struct Only {
        interface: Ifaces,
    }
    #[derive(Deserialize)]
    struct Ifaces {
        wan: String,
        lan: String,
    }
    let only: Only =
        toml::from_str(&text).map_err(|e| ConfigError::Syntax { path: path.into(), message: e.to_string() })?;
    Ok((only.interface.wan, only.interface.lan))
}

/// The smallest `tunnel_mtu`: IPv6's minimum link MTU (RFC 8200 section 5).
pub const MIN_TUNNEL_MTU: usize = 1280;

/// Refuses an address that two `[[peer]]`s claim (the same prefix twice, or
/// one inside another): the data plane would route it to one of them only.
/// Sorted, so a file with many peers costs n log n, not n².
fn check_peer_overlaps(peers: &[PeerSpec]) -> Result<(), ConfigError> {
    let key = |p: &IpPrefix| match p.addr() {
        IpAddr::V4(a) => (0u8, u128::from(u32::from(a)), p.prefix_len()),
        IpAddr::V6(a) => (1u8, u128::from(a), p.prefix_len()),
    };
    let mut all: Vec<(IpPrefix, usize)> =
        peers.iter().enumerate().flat_map(|(i, p)| p.allowed_ips.iter().map(move |a| (*a, i))).collect();
    // Network address, then shorter (containing) prefixes first.
    all.sort_by_key(|(p, _)| key(p));
    // The prefixes containing the current one, outermost first.
    let mut open: Vec<(IpPrefix, usize)> = Vec::new();
    for (prefix, index) in all {
        while open.last().is_some_and(|(o, _)| !o.contains(prefix.addr())) {
            open.pop();
        }
        if let Some(&(outer, other)) = open.last() {
            if other != index {
                let what = if outer == prefix { "is also" } else { "lies inside" };
                return Err(ConfigError::Peer {
                    index,
                    reason: format!(
                        "allowed_ips `{prefix}` {what} `{outer}` of peer {other} ({}); every address must belong to \
                         one peer",
                        peers[other].config.public_key
                    ),
                });
            }
        }
        open.push((prefix, index));
    }
    Ok(())
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        Self::parse(&text, path)
    }

    /// Parses and validates `text` (key files are read relative to the process).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        Self::parse_with(text, path, &read_secret)
    }

    /// Parses and validates `text`, reading key files through `secrets`: the
    /// whole validation without the file system (for fuzzing). Never panics.
    pub fn parse_with(text: &str, path: &Path, secrets: SecretReader<'_>) -> Result<Self, ConfigError> {
        let read_secret = secrets;
        let file: ConfigFile =
            toml::from_str(text).map_err(|e| ConfigError::Syntax { path: path.into(), message: e.to_string() })?;
        let i = file.interface;
        if i.wan.is_empty() || i.lan.is_empty() {
            return Err(ConfigError::Interface("`wan` and `lan` must name interfaces".into()));
        }
        if i.wan == i.lan {
            return Err(ConfigError::Interface(format!("`wan` and `lan` are both `{}`; they must differ", i.wan)));
        }
        if i.listen_port == 0 {
            return Err(ConfigError::Interface("`listen_port` must be 1-65535".into()));
        }
        if i.queues == Some(0) {
            return Err(ConfigError::Interface(
                "`queues` must be at least 1 (leave it out to serve every queue both NICs have)".into(),
            ));
        }
        if let Some(n) = i.crypto_threads.filter(|n| !(1..=MAX_CRYPTO_THREADS).contains(n)) {
            return Err(ConfigError::Interface(format!(
                "`crypto_threads` {n} is outside 1-{MAX_CRYPTO_THREADS} (1: each worker seals and opens its own \
                 packets; leave it out to use every core)"
            )));
        }
        if !(MIN_TUNNEL_MTU..=9000).contains(&i.tunnel_mtu) {
            return Err(ConfigError::Interface(format!(
                "`tunnel_mtu` {} is outside {MIN_TUNNEL_MTU}-9000 (IPv6 needs at least {MIN_TUNNEL_MTU}: hosts ignore \
                 \"packet too big\" below it)",
                i.tunnel_mtu
            )));
        }
        if !i.frames_per_socket.is_power_of_two() || i.frames_per_socket < 64 {
            return Err(ConfigError::Interface("`frames_per_socket` must be a power of two, at least 64".into()));
        }
        if !TRACKED_FLOWS.contains(&i.tracked_flows) {
            return Err(ConfigError::Interface(format!(
                "`tracked_flows` {} is outside {}-{} (flows the connection table holds; default {})",
                i.tracked_flows,
                TRACKED_FLOWS.start(),
                TRACKED_FLOWS.end(),
                default_tracked_flows()
            )));
        }
        if let Some(why) = invalid_interface_name(&i.host_interface) {
            return Err(ConfigError::Interface(format!(
                "`host_interface` `{}` is not a valid interface name: it {why}",
                i.host_interface.escape_debug()
            )));
        }
        if i.host_interface == i.wan || i.host_interface == i.lan {
            return Err(ConfigError::Interface(format!(
                "`host_interface` `{}` is also `wan` or `lan`; name a new interface for wgxdp to create",
                i.host_interface
            )));
        }
        let wg_socket = match (&i.name, i.wg_socket) {
            (_, false) => WgSocket::Off,
            (Some(name), true) => {
                crate::uapi::validate_name(name).map_err(|e| ConfigError::Interface(format!("`name`: {e}")))?;
                WgSocket::Named(name.clone())
            }
            (None, true) => WgSocket::Default(i.host_interface.clone()),
        };
        // The site's network, if the API names it: the peers' default local network.
        let site_cidr = match file.api.as_ref().and_then(|a| a.site_cidr.as_deref()) {
            Some(c) => {
                let site = c.parse::<IpPrefix>().map_err(|e| ConfigError::Api(format!("site_cidr `{c}`: {e}")))?;
                // What every create without a local_network_cidr takes: the same
                // rules; and no default route (every remote network would overlap it).
                crate::api::networks::check_local_network("site_cidr", site)
                    .map_err(|e| ConfigError::Api(e.message))?;
                if site.prefix_len() == 0 {
                    return Err(ConfigError::Api(format!(
                        "site_cidr {site} is a default route: every remote network would overlap it"
                    )));
                }
                Some(site)
            }
            None => None,
        };
        let key_text = read_secret(&i.private_key_file, "private key")?;
        let private_key: PrivateKey = key_text.trim().parse().map_err(|e: wgxdp_dataplane::noise::KeyParseError| {
            ConfigError::BadKey { what: "private key", path: i.private_key_file.clone(), reason: e.to_string() }
        })?;
        let mut peers = Vec::new();
        for (index, p) in file.peers.into_iter().enumerate() {
            let err = |reason: String| ConfigError::Peer { index, reason };
            let public_key: PublicKey = p
                .public_key
                .parse()
                .map_err(|e: wgxdp_dataplane::noise::KeyParseError| err(format!("public_key: {e}")))?;
            let preshared_key = match &p.preshared_key_file {
                Some(path) => {
                    let t = read_secret(path, "pre-shared key")?;
                    t.trim().parse().map_err(|e: wgxdp_dataplane::noise::KeyParseError| ConfigError::BadKey {
                        what: "pre-shared key",
                        path: path.clone(),
                        reason: e.to_string(),
                    })?
                }
                None => PresharedKey::default(),
            };
            let endpoint = match &p.endpoint {
                Some(e) => {
                    Some(e.parse::<SocketAddr>().map_err(|_| err(format!("endpoint `{e}` is not ADDRESS:PORT")))?)
                }
                None => None,
            };
            let allowed_ips = p
                .allowed_ips
                .iter()
                .map(|s| s.parse::<IpPrefix>().map_err(|e| err(format!("allowed_ips `{s}`: {e}"))))
                .collect::<Result<Vec<_>, _>>()?;
            let local_networks = match &p.local_networks {
                Some(list) => parse_local_networks(list).map_err(err)?,
                None => site_cidr.into_iter().collect(),
            };
            if let Some((a, l)) =
                allowed_ips.iter().find_map(|a| local_networks.iter().find(|l| overlaps(a, l)).map(|l| (a, l)))
            {
                return Err(err(format!(
                    "allowed_ips `{a}` overlaps the local network `{l}`; the two sites need distinct address space"
                )));
            }
            let default_action = match &p.firewall_default {
                Some(a) => parse_action(a).map_err(|e| err(format!("firewall_default: {e}")))?,
                None => Default::default(),
            };
            if p.firewall.len() > MAX_RULES {
                return Err(err(format!("firewall lists at most {MAX_RULES} rules (got {})", p.firewall.len())));
            }
            let rules = crate::firewall::parse_rules(&p.firewall)
                .map_err(|(i, e)| err(format!("firewall[{i}].{}: {}", e.field, e.message)))?;
            peers.push(PeerSpec {
                config: PeerConfig {
                    public_key,
                    preshared_key,
                    persistent_keepalive: p
                        .persistent_keepalive
                        .filter(|&k| k > 0)
                        .map(|k| Duration::from_secs(k.into())),
                },
                endpoint,
                allowed_ips,
                policy: ForwardingPolicy { local_networks, rules, default_action },
            });
        }
        check_peer_overlaps(&peers)?;
        let api = match file.api {
            None if file.store.is_some() || file.node.is_some() => {
                return Err(ConfigError::Api("[store] and [node] belong to the API: they need an [api] section".into()))
            }
            None => None,
            Some(a) => {
                let store = store_location(a.database, file.store, read_secret)?;
                let (node_id, node_region) = node_identity(file.node.as_ref())?;
                let floating_address = file.node.as_ref().and_then(|n| n.floating_address);
                if let (Some(floating), Some(public)) = (floating_address, a.public_address) {
                    if floating != public {
                        tracing::warn!(%floating, %public, "[node] floating_address is not [api] public_address: \
                            the remote sites must reach the floating one");
                    }
                }
                if a.mutations_per_minute == 0 || a.reads_per_minute == 0 || a.auth_failures_per_minute == 0 {
                    return Err(ConfigError::Api("rate limits must be at least 1 per minute".into()));
                }
                if a.metrics_listen == Some(a.listen) {
                    return Err(ConfigError::Api(format!(
                        "metrics_listen {} is the API's own address; leave it out to serve /metrics there",
                        a.listen
                    )));
                }
                Some(ApiConfig {
                    listen: a.listen,
                    node_id,
                    node_region,
                    floating_address,
                    store,
                    site_cidr,
                    public_address: a.public_address,
                    mutations_per_minute: a.mutations_per_minute,
                    reads_per_minute: a.reads_per_minute,
                    auth_failures_per_minute: a.auth_failures_per_minute,
                    metrics_auth: a.metrics_auth,
                    metrics_listen: a.metrics_listen,
                })
            }
        };
        Ok(Self {
            api,
            wan: i.wan,
            lan: i.lan,
            listen_port: i.listen_port,
            private_key,
            peers,
            queues: i.queues,
            cores: i.cores,
            crypto_threads: i.crypto_threads,
            tunnel_mtu: i.tunnel_mtu,
            lan_next_hop: i.lan_next_hop,
            frames_per_socket: i.frames_per_socket,
            zero_copy: i.zero_copy,
            busy_poll: i.busy_poll,
            tracked_flows: i.tracked_flows,
            host_interface: i.host_interface,
            wg_socket,
        })
    }

    /// Gives `lan_networks` (the LAN interface's networks, which only the
    /// running host knows) to the peers whose local networks are left to the
    /// default and no `[api] site_cidr` names: their sites reach the LAN.
    pub fn default_local_networks(&mut self, lan_networks: &[IpPrefix]) {
        for p in &mut self.peers {
            if p.policy.local_networks.is_empty() {
                p.policy.local_networks = lan_networks.to_vec();
            }
        }
    }
}

/// A peer's `local_networks`: 1 to `MAX_NETWORKS` distinct CIDRs.
fn parse_local_networks(list: &[String]) -> Result<Vec<IpPrefix>, String> {
    if list.is_empty() || list.len() > MAX_NETWORKS {
        return Err(format!(
            "local_networks lists 1-{MAX_NETWORKS} networks (got {}); leave it out for the default",
            list.len()
        ));
    }
    let mut out: Vec<IpPrefix> = Vec::with_capacity(list.len());
    for s in list {
        let p = s.parse::<IpPrefix>().map_err(|e| format!("local_networks `{s}`: {e}"))?;
        if out.contains(&p) {
            return Err(format!("local_networks lists `{p}` twice"));
        }
        out.push(p);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn key_file(mode: u32, contents: &str) -> tempfile_like::TempPath {
        let p = tempfile_like::TempPath::new();
        let mut f = std::fs::File::create(&p.0).unwrap();
        f.write_all(contents.as_bytes()).unwrap();
        std::fs::set_permissions(&p.0, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    /// A path in the temp directory removed on drop (no extra crate needed).
    mod tempfile_like {
        pub struct TempPath(pub std::path::PathBuf);
        impl TempPath {
            pub fn new() -> Self {
                use std::sync::atomic::{AtomicU32, Ordering};
                static N: AtomicU32 = AtomicU32::new(0);
                let n = N.fetch_add(1, Ordering::Relaxed);
                Self(std::env::temp_dir().join(format!("wgxdp-cfg-{}-{n}", std::process::id())))
            }
        }
        impl Drop for TempPath {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    fn config(key: &Path, peer: &str) -> String {
        format!("[interface]\nwan = \"eth0\"\nlan = \"eth1\"\nprivate_key_file = \"{}\"\n{peer}", key.display())
    }

    #[test]
    fn a_valid_file_with_defaults() {
        let k = key_file(0o600, &PrivateKey::generate().to_base64_secret());
        let peer_key = PrivateKey::generate().public_key();
        let text = config(
            &k.0,
            &format!("[[peer]]\npublic_key = \"{peer_key}\"\nallowed_ips = [\"10.1.0.0/16\", \"fd01::/64\"]\nendpoint = \"192.0.2.1:51820\"\npersistent_keepalive = 25\n"),
        );
        let c = Config::parse(&text, Path::new("t.toml")).unwrap();
        assert_eq!((c.listen_port, c.tunnel_mtu, c.zero_copy, c.busy_poll), (51820, 1420, true, false));
        assert_eq!(c.peers.len(), 1);
        assert_eq!(c.peers[0].allowed_ips.len(), 2);
        assert_eq!(c.peers[0].config.persistent_keepalive, Some(Duration::from_secs(25)));
    }

    #[test]
    fn peers_carry_firewall_rules_checked_as_the_api_checks_them() {
        let k = key_file(0o600, &PrivateKey::generate().to_base64_secret());
        let peer_key = PrivateKey::generate().public_key();
        let peer = |rules: &str| {
            format!("[[peer]]\npublic_key = \"{peer_key}\"\nallowed_ips = [\"10.1.0.0/16\"]\nlocal_networks = [\"10.50.0.0/24\"]\nfirewall_default = \"deny\"\n{rules}")
        };
        let rules = "[[peer.firewall]]\nname = \"no ssh\"\nprotocol = \"tcp\"\nport = \"22\"\naction = \"deny\"\n\
                     [[peer.firewall]]\nname = \"web\"\nprotocol = \"tcp\"\nport = \"80-443\"\ndestination = \"10.50.0.0/24\"\n";
        let c = Config::parse(&config(&k.0, &peer(rules)), Path::new("t.toml")).unwrap();
        let policy = &c.peers[0].policy;
        assert_eq!(policy.rules.len(), 2);
        use wgxdp_dataplane::policy::RuleAction;
        assert_eq!((policy.rules[0].name.as_str(), policy.rules[0].action), ("no ssh", RuleAction::Deny));
        assert_eq!(policy.rules[1].ports, Some(wgxdp_dataplane::policy::PortRange { first: 80, last: 443 }));
        assert_eq!(policy.default_action, RuleAction::Deny);
        for (bad, needle) in [
            ("[[peer.firewall]]\nname = \"x\"\nprotocol = \"gre\"\n", "firewall[0].protocol"),
            ("[[peer.firewall]]\nname = \"x\"\nprotocol = \"icmp\"\nport = \"22\"\n", "firewall[0].port"),
            ("[[peer.firewall]]\nname = \"x\"\nprotocol = \"tcp\"\ncolour = 1\n", "colour"),
            ("[[peer.firewall]]\nprotocol = \"tcp\"\n", "firewall[0].name"),
        ] {
            let e = Config::parse(&config(&k.0, &peer(bad)), Path::new("t.toml")).unwrap_err().to_string();
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }

    /// `[store]`: a PostgreSQL instead of `[api] database`, its password
    /// from a private file, never both, never without `[api]`.
    #[test]
    fn store_section() {
        let k = key_file(0o600, &PrivateKey::generate().to_base64_secret());
        let pass = key_file(0o600, "s3cret\n");
        let loose = key_file(0o644, "s3cret\n");
        let pg = |extra: &str| {
            format!("[api]\n[store]\nurl = \"postgres://wg@db.example/fleet\"\ninsecure_plaintext = true\n{extra}")
        };
        let api = Config::parse(&config(&k.0, &pg("")), Path::new("t.toml")).unwrap().api.unwrap();
        assert_eq!(api.store, StoreLocation::Postgres(PostgresAt::url("postgres://wg@db.example/fleet")));
        let with_file = pg(&format!("password_file = \"{}\"\n", pass.0.display()));
        let api = Config::parse(&config(&k.0, &with_file), Path::new("t.toml")).unwrap().api.unwrap();
        let StoreLocation::Postgres(at) = &api.store else { panic!("{:?}", api.store) };
        assert_eq!(at.password.as_ref().map(|p| p.expose()), Some("s3cret"), "the line's end is not the password's");
        assert!(!format!("{api:?}").contains("s3cret"), "redacted in Debug");
        let bad = [
            (pg(&format!("password_file = \"{}\"\n", loose.0.display())), "chmod 600".to_owned()),
            (pg("password_file = \"/nonexistent/pass\"\n"), "/nonexistent/pass".to_owned()),
            (pg("colour = 1\n"), "colour".to_owned()),
            ("[api]\n[store]\nurl = \"mysql://db/x\"\n".to_owned(), "[store] url: not a PostgreSQL URL".to_owned()),
            ("[store]\nurl = \"postgres://db/x\"\n".to_owned(), "need an [api] section".to_owned()),
            ("[api]\ndatabase = \"/d\"\n[store]\nurl = \"postgres://db/x\"\n".to_owned(), "keep `database`".to_owned()),
            ("[api]\n".to_owned(), "or a [store] section".to_owned()),
            ("[api]\n[store]\nurl = \"postgres://wg:hunter2@localhost/x\"\n".to_owned(), "holds a password".to_owned()),
            (
                "[api]\n[store]\nurl = \"postgres://localhost/x?password=hunter2\"\n".to_owned(),
                "password_file".to_owned(),
            ),
            ("[api]\n[store]\nurl = \"postgres://wg@db.example/x\"\n".to_owned(), "reaches db.example".to_owned()),
        ];
        for (text, needle) in bad {
            let e = Config::parse(&config(&k.0, &text), Path::new("t.toml")).unwrap_err().to_string();
            assert!(e.contains(&needle) && !e.contains("hunter2"), "{text}: {e}");
        }
        let local = "[api]\n[store]\nurl = \"postgresql:///x?host=/run/postgresql\"\n";
        assert!(Config::parse(&config(&k.0, local), Path::new("t.toml")).is_ok(), "a Unix socket needs no TLS");
    }

    /// `[node]`: an id and a region of the API's own form; by default the
    /// host name and every region; only beside `[api]`.
    #[test]
    fn node_section() {
        let k = key_file(0o600, &PrivateKey::generate().to_base64_secret());
        let api = |node: &str| format!("[api]\ndatabase = \"/d\"\n{node}");
        let c =
            Config::parse(&config(&k.0, &api("[node]\nid = \"gw-eu-1\"\nregion = \"eu-west\"\n")), Path::new("t.toml"));
        let a = c.unwrap().api.unwrap();
        assert_eq!((a.node_id.as_str(), a.node_region.as_str()), ("gw-eu-1", "eu-west"));
        let a = Config::parse(&config(&k.0, &api("")), Path::new("t.toml")).unwrap().api.unwrap();
        assert_eq!(a.node_region, crate::store::EVERY_REGION);
        assert!(crate::store::is_region_name(&a.node_id), "the host name, made a node id: {}", a.node_id);
        for (node, needle) in [
            ("[node]\nid = \"GW 1\"\n", "[node] id `GW 1` must be 1-64 characters"),
            ("[node]\nregion = \"\"\n", "[node] region `` must be"),
            ("[node]\nzone = \"a\"\n", "zone"),
        ] {
            let e = Config::parse(&config(&k.0, &api(node)), Path::new("t.toml")).unwrap_err().to_string();
            assert!(e.contains(needle), "{node}: {e}");
        }
        let e = Config::parse(&config(&k.0, "[node]\nid = \"a\"\n"), Path::new("t.toml")).unwrap_err().to_string();
        assert!(e.contains("need an [api] section"), "{e}");
    }

    #[test]
    fn api_section() {
        let k = key_file(0o600, &PrivateKey::generate().to_base64_secret());
        let c = Config::parse(&config(&k.0, "[api]\ndatabase = \"/var/lib/wgxdp/db\"\n"), Path::new("t.toml")).unwrap();
        let api = c.api.unwrap();
        assert_eq!(api.listen, "127.0.0.1:8080".parse().unwrap());
        assert_eq!((api.mutations_per_minute, api.reads_per_minute, api.site_cidr), (100, 1200, None));
        assert!(Config::parse(&config(&k.0, ""), Path::new("t.toml")).unwrap().api.is_none());
        assert_eq!((api.auth_failures_per_minute, api.metrics_auth, api.metrics_listen), (30, false, None));
        let metrics = "[api]\ndatabase = \"/d\"\nmetrics_auth = true\nmetrics_listen = \"127.0.0.1:9100\"\n";
        let api = Config::parse(&config(&k.0, metrics), Path::new("t.toml")).unwrap().api.unwrap();
        assert_eq!((api.metrics_auth, api.metrics_listen), (true, Some("127.0.0.1:9100".parse().unwrap())));
        let bad = [
            ("[api]\n", "database"),
            ("[api]\ndatabase = \"/d\"\nsite_cidr = \"10.0.0.1/8\"\n", "site_cidr"),
            (
                "[api]\ndatabase = \"/d\"\nsite_cidr = \"127.0.0.0/8\"\n",
                "site_cidr: 127.0.0.0/8 overlaps 127.0.0.0/8 (loopback",
            ),
            ("[api]\ndatabase = \"/d\"\nsite_cidr = \"fe80::/64\"\n", "link-local"),
            ("[api]\ndatabase = \"/d\"\nsite_cidr = \"0.0.0.0/0\"\n", "site_cidr 0.0.0.0/0 is a default route"),
            ("[api]\ndatabase = \"/d\"\nmutations_per_minute = 0\n", "at least 1"),
            ("[api]\ndatabase = \"/d\"\nlisten = \"nowhere\"\n", "listen"),
            ("[api]\ndatabase = \"/d\"\ncolour = 1\n", "colour"),
            ("[api]\ndatabase = \"/d\"\nauth_failures_per_minute = 0\n", "at least 1"),
            ("[api]\ndatabase = \"/d\"\nmetrics_listen = \"127.0.0.1:8080\"\n", "metrics_listen"),
        ];
        for (section, needle) in bad {
            let err = Config::parse(&config(&k.0, section), Path::new("t.toml")).unwrap_err().to_string();
            assert!(err.contains(needle), "{section}: {err}");
        }
    }

    #[test]
    fn parse_with_needs_no_files_and_never_panics() {
        let key = PrivateKey::generate().to_base64_secret().to_string();
        let secrets = move |_: &Path, _: &'static str| Ok(zeroize::Zeroizing::new(key.clone()));
        let text = "[interface]\nwan = \"a\"\nlan = \"b\"\nprivate_key_file = \"/nowhere\"\n";
        assert!(Config::parse_with(text, Path::new("t.toml"), &secrets).is_ok());
        let deep = "[".repeat(1000);
        for garbage in ["", "[interface]", "\u{0}", "[[peer]]\npublic_key = 1", deep.as_str()] {
            assert!(Config::parse_with(garbage, Path::new("t.toml"), &secrets).is_err());
        }
    }

    #[test]
    fn operator_mistakes_get_clear_errors() {
        let good = key_file(0o600, &PrivateKey::generate().to_base64_secret());
        let loose = key_file(0o644, &PrivateKey::generate().to_base64_secret());
        let err = Config::parse(&config(&loose.0, ""), Path::new("t.toml")).unwrap_err().to_string();
        assert!(err.contains("chmod 600") && err.contains("644"), "{err}");
        let bad = key_file(0o600, "not a key");
        let err = Config::parse(&config(&bad.0, ""), Path::new("t.toml")).unwrap_err().to_string();
        assert!(err.contains("private key") && err.contains("base64"), "{err}");
        let err =
            Config::parse(&config(Path::new("/nonexistent/key"), ""), Path::new("t.toml")).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/key"), "{err}");
        let err = Config::parse(&config(&good.0, "typo_key = 1\n"), Path::new("t.toml")).unwrap_err().to_string();
        assert!(err.contains("typo_key"), "{err}");
        let err = Config::parse(&config(&good.0, "[[peer]]\npublic_key = \"abc\"\n"), Path::new("t.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("peer 0") && err.contains("public_key"), "{err}");
        let pk = PrivateKey::generate().public_key();
        let err = Config::parse(
            &config(&good.0, &format!("[[peer]]\npublic_key = \"{pk}\"\nallowed_ips = [\"10.1.2.3/16\"]\n")),
            Path::new("t.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("10.1.0.0/16"), "suggests the network: {err}");
        let same = "[interface]\nwan = \"eth0\"\nlan = \"eth0\"\nprivate_key_file = \"/x\"\n";
        assert!(Config::parse(same, Path::new("t.toml")).unwrap_err().to_string().contains("must differ"));
        let err = Config::parse("[interface\n", Path::new("t.toml")).unwrap_err().to_string();
        assert!(err.starts_with("t.toml:"), "{err}");
    }

    #[test]
    fn overlapping_allowed_ips_between_peers_are_refused() {
        let k = key_file(0o600, &PrivateKey::generate().to_base64_secret());
        let peer = |ips: &str| {
            format!("[[peer]]\npublic_key = \"{}\"\nallowed_ips = [{ips}]\n", PrivateKey::generate().public_key())
        };
        let parse = |peers: &[&str]| {
            let text = config(&k.0, &peers.iter().map(|ips| peer(ips)).collect::<String>());
            Config::parse(&text, Path::new("t.toml")).map(|c| c.peers.len()).map_err(|e| e.to_string())
        };
        for (peers, says) in [
            (
                &["\"10.1.0.0/16\"", "\"10.1.0.0/16\""][..],
                "peer 1: allowed_ips `10.1.0.0/16` is also `10.1.0.0/16` of peer 0",
            ),
            (
                &["\"10.1.0.0/16\"", "\"10.9.0.0/16\", \"10.1.7.0/24\""],
                "peer 1: allowed_ips `10.1.7.0/24` lies inside `10.1.0.0/16` of peer 0",
            ),
            (
                &["\"10.1.7.0/24\"", "\"10.0.0.0/8\""],
                "peer 0: allowed_ips `10.1.7.0/24` lies inside `10.0.0.0/8` of peer 1",
            ),
            (
                &["\"fd00::/64\"", "\"10.2.0.0/16\"", "\"fd00::1/128\""],
                "peer 2: allowed_ips `fd00::1/128` lies inside `fd00::/64` of peer 0",
            ),
            (&["\"10.1.0.0/16\"", "\"10.2.0.0/16\"", "\"10.1.2.3/32\""], "of peer 0"),
        ] {
            let err = parse(peers).unwrap_err();
            assert!(err.contains(says), "{peers:?}: {err}");
        }
        // Disjoint prefixes, neighbours, both families, and nesting within one peer are fine.
        assert_eq!(
            parse(&[
                "\"10.1.0.0/16\", \"10.1.2.0/24\"",
                "\"10.2.0.0/16\", \"fd00::/64\"",
                "\"10.0.0.0/16\", \"fd00:0:0:1::/64\""
            ]),
            Ok(3)
        );
        // Many peers: still one pass.
        let many: Vec<String> = (0..2000u32).map(|i| format!("\"10.{}.{}.0/24\"", i / 256, i % 256)).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert_eq!(parse(&many), Ok(2000));
    }

    #[test]
    fn peer_local_networks_and_firewall_default() {
        let k = key_file(0o600, &PrivateKey::generate().to_base64_secret());
        let parse = |peer: &str, api: &str| {
            let pk = PrivateKey::generate().public_key();
            let text =
                config(&k.0, &format!("[[peer]]\npublic_key = \"{pk}\"\nallowed_ips = [\"10.1.0.0/16\"]\n{peer}{api}"));
            Config::parse(&text, Path::new("t.toml")).map_err(|e| e.to_string())
        };
        let site = "[api]\ndatabase = \"/d\"\nsite_cidr = \"10.50.0.0/24\"\n";
        // Given, defaulted to site_cidr, or left for the LAN's networks.
        let c =
            parse("local_networks = [\"10.50.0.0/24\", \"fd50::/64\"]\nfirewall_default = \"deny\"\n", site).unwrap();
        let policy = &c.peers[0].policy;
        assert_eq!(policy.local_networks, vec!["10.50.0.0/24".parse().unwrap(), "fd50::/64".parse().unwrap()]);
        assert_eq!(policy.default_action, wgxdp_dataplane::policy::RuleAction::Deny);
        assert!(policy.rules.is_empty());
        let c = parse("", site).unwrap();
        assert_eq!(c.peers[0].policy.local_networks, vec!["10.50.0.0/24".parse().unwrap()]);
        assert_eq!(c.peers[0].policy.default_action, wgxdp_dataplane::policy::RuleAction::Allow);
        let mut c = parse("", "").unwrap();
        assert!(c.peers[0].policy.local_networks.is_empty(), "resolved by serve");
        let lan: Vec<IpPrefix> = vec!["192.168.1.0/24".parse().unwrap()];
        c.default_local_networks(&lan);
        assert_eq!(c.peers[0].policy.local_networks, lan);
        for (peer, says) in [
            ("local_networks = []\n", "1-64 networks"),
            ("local_networks = [\"10.50.0.1/24\"]\n", "10.50.0.0/24"),
            ("local_networks = [\"10.50.0.0/24\", \"10.50.0.0/24\"]\n", "twice"),
            ("local_networks = [\"10.0.0.0/8\"]\n", "overlaps the local network `10.0.0.0/8`"),
            ("firewall_default = \"drop\"\n", "firewall_default: `drop` is not an action; use allow or deny"),
        ] {
            let err = parse(peer, "").unwrap_err();
            assert!(err.contains("peer 0") || err.contains("unknown field"), "{peer}: {err}");
            assert!(err.contains(says), "{peer}: `{err}` lacks `{says}`");
        }
        let err = parse("", "[api]\ndatabase = \"/d\"\nsite_cidr = \"10.0.0.0/8\"\n").unwrap_err();
        assert!(err.contains("overlaps the local network `10.0.0.0/8`"), "{err}");
        // An empty rule list is allowed (no rules).
        assert!(parse("firewall = []\n", "").is_ok());
    }

    #[test]
    fn tracked_flows_and_host_interface() {
        let k = key_file(0o600, &PrivateKey::generate().to_base64_secret());
        let with = |line: &str| {
            let text = config(&k.0, "").replace("[interface]\n", &format!("[interface]\n{line}\n"));
            Config::parse(&text, Path::new("t.toml"))
                .map(|c| (c.tracked_flows, c.host_interface))
                .map_err(|e| e.to_string())
        };
        assert_eq!(with(""), Ok((wgxdp_dataplane::conntrack::DEFAULT_FLOWS, "wgxdp0".to_owned())));
        assert_eq!(with("tracked_flows = 1024"), Ok((1024, "wgxdp0".to_owned())));
        assert_eq!(with("tracked_flows = 16777216").map(|c| c.0), Ok(16_777_216));
        assert_eq!(with("host_interface = \"wg-site.1\"").map(|c| c.1), Ok("wg-site.1".to_owned()));
        for (line, says) in [
            ("queues = 0", "`queues` must be at least 1"),
            ("crypto_threads = 0", "`crypto_threads` 0 is outside 1-256"),
            ("crypto_threads = 100000", "`crypto_threads` 100000 is outside 1-256"),
            ("tracked_flows = 1023", "1024-16777216"),
            ("tracked_flows = 16777217", "1024-16777216"),
            ("tracked_flows = -1", "tracked_flows"),
            ("host_interface = \"\"", "1-15 characters"),
            ("host_interface = \"a-very-long-name\"", "1-15 characters"),
            ("host_interface = \"wg/0\"", "`/`"),
            ("host_interface = \"wg 0\"", "whitespace"),
            ("host_interface = \"wg:0\"", "`:`"),
            ("host_interface = \"..\"", "`..`"),
            ("host_interface = \"eth1\"", "also `wan` or `lan`"),
        ] {
            let err = with(line).unwrap_err();
            assert!(err.contains(says), "{line}: `{err}` lacks `{says}`");
        }
    }

    #[test]
    fn tunnel_mtu_below_the_ipv6_minimum_is_refused() {
        let k = key_file(0o600, &PrivateKey::generate().to_base64_secret());
        let with_mtu = |mtu: usize| {
            let text = config(&k.0, "").replace("[interface]\n", &format!("[interface]\ntunnel_mtu = {mtu}\n"));
            Config::parse(&text, Path::new("t.toml")).map(|c| c.tunnel_mtu).map_err(|e| e.to_string())
        };
        for mtu in [576, 1279, 0, 9001] {
            let err = with_mtu(mtu).unwrap_err();
            assert!(err.contains("tunnel_mtu") && err.contains("1280-9000"), "{mtu}: {err}");
        }
        assert_eq!(with_mtu(1280), Ok(1280));
        assert_eq!(with_mtu(1420), Ok(1420));
    }
}
