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
//! # tunnel_mtu = 1420
//! # lan_next_hop = "10.0.0.1"   # default: site destinations are on-link
//!
//! [[peer]]
//! public_key = "base64…"
//! allowed_ips = ["10.20.0.0/16"]
//! # endpoint = "198.51.100.7:51820"
//! # preshared_key_file = "/etc/wgxdp/site-b.psk"
//! # persistent_keepalive = 25
//!
//! [api]                                # optional: the HTTP API and its store
//! listen = "127.0.0.1:8080"
//! database = "/var/lib/wgxdp/wgxdp.db" # created with mode 0600
//! site_cidr = "10.50.0.0/24"           # default local_network_cidr
//! # public_address = "203.0.113.150"   # default: the WAN interface's address
//! # mutations_per_minute = 100         # per API key
//! # reads_per_minute = 1200
//! # auth_failures_per_minute = 30      # per source address (IPv6: /64), then 429
//! # metrics_auth = false               # true: /metrics needs an API key
//! # metrics_listen = "127.0.0.1:9100"  # serve /metrics here (and not on `listen`)
//! ```
//!
//! Peers from `[[peer]]` are fixed for the process's life; gateways created
//! through the API live in the database and come back after a restart.

use serde::Deserialize;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use wgxdp_dataplane::gateway::PeerSpec;
use wgxdp_dataplane::noise::peer::PeerConfig;
use wgxdp_dataplane::noise::{PresharedKey, PrivateKey, PublicKey};
use wgxdp_dataplane::table::IpPrefix;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub interface: InterfaceSection,
    #[serde(default, rename = "peer")]
    pub peers: Vec<PeerSection>,
    pub api: Option<ApiSection>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSection {
    #[serde(default = "default_api_listen")]
    pub listen: SocketAddr,
    pub database: PathBuf,
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
    #[serde(default = "default_mtu")]
    pub tunnel_mtu: usize,
    pub lan_next_hop: Option<IpAddr>,
    #[serde(default = "default_frames")]
    pub frames_per_socket: u32,
    #[serde(default = "default_true")]
    pub zero_copy: bool,
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
    pub tunnel_mtu: usize,
    pub lan_next_hop: Option<IpAddr>,
    pub frames_per_socket: u32,
    pub zero_copy: bool,
    pub api: Option<ApiConfig>,
}

/// The validated `[api]` section.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub listen: SocketAddr,
    pub database: PathBuf,
    pub site_cidr: Option<String>,
    pub public_address: Option<IpAddr>,
    pub mutations_per_minute: u32,
    pub reads_per_minute: u32,
    pub auth_failures_per_minute: u32,
    pub metrics_auth: bool,
    pub metrics_listen: Option<SocketAddr>,
}

/// How `Config::parse_with` obtains the contents of a key file.
pub type SecretReader<'a> = &'a dyn Fn(&Path, &'static str) -> Result<zeroize::Zeroizing<String>, ConfigError>;

/// Reads a key file that must not be readable by anyone but its owner.
fn read_secret(path: &Path, what: &'static str) -> Result<zeroize::Zeroizing<String>, ConfigError> {
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
        if !(576..=9000).contains(&i.tunnel_mtu) {
            return Err(ConfigError::Interface(format!("`tunnel_mtu` {} is outside 576-9000", i.tunnel_mtu)));
        }
        if !i.frames_per_socket.is_power_of_two() || i.frames_per_socket < 64 {
            return Err(ConfigError::Interface("`frames_per_socket` must be a power of two, at least 64".into()));
        }
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
            });
        }
        let api = match file.api {
            None => None,
            Some(a) => {
                if let Some(c) = &a.site_cidr {
                    c.parse::<IpPrefix>().map_err(|e| ConfigError::Api(format!("site_cidr `{c}`: {e}")))?;
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
                    database: a.database,
                    site_cidr: a.site_cidr,
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
            tunnel_mtu: i.tunnel_mtu,
            lan_next_hop: i.lan_next_hop,
            frames_per_socket: i.frames_per_socket,
            zero_copy: i.zero_copy,
        })
    }
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
        assert_eq!((c.listen_port, c.tunnel_mtu, c.zero_copy), (51820, 1420, true));
        assert_eq!(c.peers.len(), 1);
        assert_eq!(c.peers[0].allowed_ips.len(), 2);
        assert_eq!(c.peers[0].config.persistent_keepalive, Some(Duration::from_secs(25)));
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
}
