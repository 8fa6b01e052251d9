//! The durable store: the VPN gateways, the hashed API keys, the audit log,
//! the events and the webhooks. Two backends hold them, behind one contract
//! (`sql::Database`): an embedded SQLite file (the default, one node) and a
//! PostgreSQL database (`[store] url`, shared by a fleet). Every write is
//! committed (and, on SQLite, fsynced) before it returns, so an acknowledged
//! change survives `kill -9`. All calls block: the API runs them off the
//! async runtime.
//!
//! Every query is written once (`?` placeholders, `sql::Sql`) and every row
//! decoded once (`sql::Row`). Lists (additional networks, firewall rules) are
//! JSON in TEXT columns. A stored value that cannot be read back is a
//! `StoreError::Corrupt` naming the gateway and the column.

use crate::firewall::{rule_texts, FirewallRuleText};
use crate::secret::SecretString;
use base64::Engine;
use blake2::{Blake2s256, Digest};
use sql::{args, Database, Row, Sql, SqlValue};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};
use wgxdp_dataplane::noise::{PresharedKey, PublicKey};
use wgxdp_dataplane::policy::{FirewallRule, RuleAction};
use wgxdp_dataplane::table::IpPrefix;

mod audit;
mod events;
mod idempotency;
mod leases;
mod live_index;
mod nodes;
mod postgres;
mod schema;
pub(crate) mod sql;
mod sqlite;
#[cfg(test)]
pub(crate) mod testing;
mod webhooks;
pub use audit::AuditEntry;
pub use events::{Event, EventFilter, EventKind};
pub use idempotency::StoredResponse;
pub use leases::{Lease, PublishedStatus, ServedChanges};
pub use live_index::LiveIndex;
pub use nodes::{
    holder_is_dead, incarnation, is_region_name, NodeIdTaken, NodeRecord, ThisNode, EVERY_REGION, HEARTBEAT_MILLIS,
    NODE_TTL_MILLIS, REGION_NAME_RULE,
};
pub use postgres::{
    describe as describe_postgres, parse_url as parse_postgres_url, plaintext_hosts as postgres_plaintext_hosts,
    schema_version_at as postgres_schema_version,
};
pub use schema::{refuse_newer_schema, SCHEMA_VERSION};
pub use sqlite::schema_version_of;
pub use webhooks::{
    is_webhook_secret, Attempt, Delivery, DeliveryState, DueDelivery, EventSelection, Webhook, GIVE_UP_AFTER_MILLIS,
};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}: {reason}")]
    Open { path: String, reason: String },
    #[error("a live gateway already uses this remote public key")]
    DuplicateKey,
    #[error("a row with this key already exists")]
    Unique,
    #[error("database error: {0}")]
    Database(String),
    #[error("database: {0}")]
    Corrupt(CorruptValue),
    #[error("cannot encode a value for the database: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("{0}")]
    NodeIdTaken(NodeIdTaken),
    #[error("database error: write failed (injected fault)")]
    InjectedFault,
}

/// A stored value that does not decode (edited by hand, or written by a
/// newer version): which gateway, which column, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("gateway {id}: the stored {column} cannot be read ({reason}); correct or remove that row")]
pub struct CorruptValue {
    pub id: String,
    pub column: &'static str,
    pub reason: String,
}

/// Where a gateway is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Creating,
    Active,
    Deleting,
    Deleted,
}

impl Status {
    pub const ALL: [Status; 4] = [Status::Creating, Status::Active, Status::Deleting, Status::Deleted];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Creating => "creating",
            Status::Active => "active",
            Status::Deleting => "deleting",
            Status::Deleted => "deleted",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }

    fn index(self) -> usize {
        self as usize
    }

    /// Creating and deleting are transient: changes wait until they end.
    pub fn is_transient(self) -> bool {
        matches!(self, Status::Creating | Status::Deleting)
    }
}

/// One VPN gateway (one remote site, one WireGuard peer), as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayRecord {
    pub id: String,
    /// Insertion order: the tie-breaker that makes every sort stable.
    pub seq: i64,
    pub name: String,
    pub status: Status,
    pub region: String,
    pub local_network_cidr: IpPrefix,
    pub remote_network_cidr: IpPrefix,
    /// `remote_peer_ip` and `remote_peer_port`.
    pub remote_endpoint: SocketAddr,
    pub remote_public_key: PublicKey,
    /// Boxed: a record moves (vectors grow, pages are built) while the key
    /// stays in one place, zeroized when the record is dropped.
    pub pre_shared_key: Box<PresharedKey>,
    pub persistent_keepalive: Option<u16>,
    /// Remote networks routed into the tunnel besides `remote_network_cidr`.
    pub additional_remote_network_cidrs: Vec<IpPrefix>,
    /// Networks of this site the remote site may reach besides `local_network_cidr`.
    pub additional_local_network_cidrs: Vec<IpPrefix>,
    /// Rules on traffic from the remote site, in evaluation order.
    pub firewall: Vec<FirewallRule>,
    /// What happens to traffic from the remote site no rule matches.
    pub firewall_default: RuleAction,
    /// Unix milliseconds.
    pub created_at: i64,
    pub updated_at: i64,
}

impl GatewayRecord {
    /// Every remote network, the seed first.
    pub fn remote_prefixes(&self) -> impl Iterator<Item = IpPrefix> + '_ {
        std::iter::once(self.remote_network_cidr).chain(self.additional_remote_network_cidrs.iter().copied())
    }

    /// Every local network, the seed first.
    pub fn local_prefixes(&self) -> impl Iterator<Item = IpPrefix> + '_ {
        std::iter::once(self.local_network_cidr).chain(self.additional_local_network_cidrs.iter().copied())
    }
}

/// The fields an update may change (`None`: unchanged).
#[derive(Debug, Clone, Default)]
pub struct GatewayChanges {
    pub name: Option<String>,
    pub remote_network_cidr: Option<IpPrefix>,
    pub remote_peer_ip: Option<IpAddr>,
    pub remote_peer_port: Option<u16>,
    pub pre_shared_key: Option<PresharedKey>,
    pub persistent_keepalive: Option<Option<u16>>,
    /// Replaces the whole list.
    pub additional_remote_network_cidrs: Option<Vec<IpPrefix>>,
    /// Replaces the whole list.
    pub additional_local_network_cidrs: Option<Vec<IpPrefix>>,
    /// Replaces every rule.
    pub firewall: Option<Vec<FirewallRule>>,
    pub firewall_default: Option<RuleAction>,
}

impl GatewayRecord {
    pub fn apply(&mut self, c: &GatewayChanges) {
        if let Some(v) = &c.name {
            self.name = v.clone();
        }
        if let Some(v) = c.remote_network_cidr {
            self.remote_network_cidr = v;
        }
        if let Some(v) = c.remote_peer_ip {
            self.remote_endpoint.set_ip(v);
        }
        if let Some(v) = c.remote_peer_port {
            self.remote_endpoint.set_port(v);
        }
        if let Some(v) = &c.pre_shared_key {
            *self.pre_shared_key = v.clone();
        }
        if let Some(v) = c.persistent_keepalive {
            self.persistent_keepalive = v;
        }
        if let Some(v) = &c.additional_remote_network_cidrs {
            self.additional_remote_network_cidrs = v.clone();
        }
        if let Some(v) = &c.additional_local_network_cidrs {
            self.additional_local_network_cidrs = v.clone();
        }
        if let Some(v) = &c.firewall {
            self.firewall = v.clone();
        }
        if let Some(v) = c.firewall_default {
            self.firewall_default = v;
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SortField {
    Name,
    CreatedAt,
}

/// A position in a sorted listing: the last item's sort key and sequence.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SortKey {
    Name(String),
    CreatedAt(i64),
}

#[derive(Debug, Clone)]
pub struct ListQuery {
    /// `None`: every gateway not deleted.
    pub status: Option<Status>,
    pub sort: SortField,
    pub descending: bool,
    /// Items strictly after this (key, seq) in the chosen order.
    pub after: Option<(SortKey, i64)>,
    pub limit: usize,
}

/// An API key as listed (the secret itself is never stored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyInfo {
    pub id: String,
    pub name: String,
    pub scope: Scope,
    pub created_at: i64,
}

/// What an API key may do: `read` (every GET), or `admin` (everything).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Read,
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Scope::Read, Scope::Admin].into_iter().find(|v| v.as_str() == s)
    }
}

/// The authenticated API key of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub key_id: String,
    pub scope: Scope,
}

#[derive(Debug)]
pub struct Store {
    db: Box<dyn Database>,
    /// How many times the database was used (reads and writes): lets tests
    /// prove that a path (e.g. `/metrics`) never touches the database.
    queries: AtomicU64,
    /// Gateways per status (`Status as usize`), kept by every write once it
    /// is committed, so counting them costs no query. Exact for this node's
    /// writes; the writes of other nodes on a shared store show after a
    /// restart.
    counts: [AtomicU64; 4],
    faults: Mutex<WriteFaults>,
    /// The live gateways' remote networks and keys, for the conflict
    /// checks; kept exact like `counts`.
    live_index: Mutex<LiveIndex>,
    /// The gateways' revision (`store_meta`) this node's counts and index
    /// reflect: another node's write moves it, and the next `exclusive`
    /// reloads them.
    seen_revision: AtomicI64,
    /// Moved by every change of the gateways or their leases this process
    /// commits, and by other nodes' (once `watch_changes` listens).
    changes: std::sync::Arc<ChangeSignal>,
    listening: std::sync::Once,
}

/// A counter that moves at each change, and wakes who waits for one.
#[derive(Debug, Default)]
struct ChangeSignal {
    count: Mutex<u64>,
    moved: std::sync::Condvar,
}

impl ChangeSignal {
    fn signal(&self) {
        *self.count.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.moved.notify_all();
    }
}

/// The store-wide write lock (`Store::exclusive`), held until dropped.
pub struct Exclusive(#[allow(dead_code)] Option<Box<dyn Send>>);

impl std::fmt::Debug for Exclusive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Exclusive(held)" } else { "Exclusive(this process)" })
    }
}

/// Injected write failures (tests of the error paths): after `skip` more
/// successful writes, the next `fail` writes fail.
#[derive(Debug, Default)]
struct WriteFaults {
    skip: u32,
    fail: u32,
}

fn encode_prefixes(prefixes: &[IpPrefix]) -> Result<String, StoreError> {
    Ok(serde_json::to_string(&prefixes.iter().map(ToString::to_string).collect::<Vec<_>>())?)
}

fn encode_rules(rules: &[FirewallRule]) -> Result<String, StoreError> {
    Ok(serde_json::to_string(&rule_texts(rules))?)
}

const COLUMNS: &str = "id, seq, name, status, region, local_network_cidr, remote_network_cidr, remote_peer_ip, \
                       remote_peer_port, remote_public_key, pre_shared_key, persistent_keepalive, created_at, updated_at, \
                       additional_remote_network_cidrs, additional_local_network_cidrs, firewall, firewall_default";

/// What the live index needs of a row (`index_entry`): a narrow read that
/// decodes no firewall.
const INDEX_COLUMNS: &str = "id, remote_public_key, remote_network_cidr, additional_remote_network_cidrs";

/// (id, remote key, remote networks) of a row read with `INDEX_COLUMNS`; a
/// value that does not decode is left out (reading the whole row names it).
fn index_entry(row: &Row) -> Result<(String, Option<PublicKey>, Vec<IpPrefix>), StoreError> {
    let id = row.text(0).map_err(|e| sql::unreadable("gateways", e))?;
    let key = row.text(1).ok().and_then(|k| k.parse().ok());
    let networks = row
        .text(2)
        .ok()
        .and_then(|seed| seed.parse::<IpPrefix>().ok())
        .into_iter()
        .chain(row.text(3).ok().and_then(|more| decode_prefixes(&more).ok()).unwrap_or_default())
        .collect();
    Ok((id, key, networks))
}

fn decode_prefixes(json: &str) -> Result<Vec<IpPrefix>, String> {
    let texts: Vec<String> = serde_json::from_str(json).map_err(|e| format!("not a JSON list of strings: {e}"))?;
    texts.iter().map(|s| s.parse::<IpPrefix>().map_err(|e| format!("`{s}`: {e}"))).collect()
}

fn decode_rules(json: &str) -> Result<Vec<FirewallRule>, String> {
    let texts: Vec<FirewallRuleText> =
        serde_json::from_str(json).map_err(|e| format!("not a JSON list of rules: {e}"))?;
    crate::firewall::parse_rules(&texts).map_err(|(i, e)| format!("rule {i}: {e}"))
}

pub fn now_millis() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// A random identifier: `prefix` + 16 base32-ish lowercase characters.
pub fn random_id(prefix: &str) -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut bytes = [0u8; 16];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut bytes);
    let tail: String = bytes.iter().map(|b| ALPHABET[usize::from(b & 31)] as char).collect();
    format!("{prefix}{tail}")
}

/// The stored hash of an API key. A `read` key's is taken in a domain of its
/// own, so that a binary from before scopes (which ignores the column and
/// hashes plainly) finds no read key at all: a downgrade fails closed.
fn hash_api_key(secret: &str, scope: Scope) -> String {
    let digest = match scope {
        Scope::Admin => Blake2s256::digest(secret.as_bytes()),
        Scope::Read => Blake2s256::new().chain_update(b"wgxdp read key\0").chain_update(secret.as_bytes()).finalize(),
    };
    hex(&digest)
}

/// Lowercase hexadecimal of `bytes` (hashes and fingerprints the store keeps or the API shows).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A distinct public key per `tag` (at most 32 bytes), for tests.
#[cfg(test)]
pub(crate) fn test_key(tag: &str) -> PublicKey {
    let mut key = [0u8; 32];
    key[..tag.len()].copy_from_slice(tag.as_bytes());
    PublicKey(key)
}

/// An active gateway for tests, named `name`, with remote key `test_key(key)`.
#[cfg(test)]
pub(crate) fn sample(name: &str, key: &str) -> GatewayRecord {
    let now = now_millis();
    GatewayRecord {
        id: random_id("vpn_"),
        seq: 0,
        name: name.into(),
        status: Status::Active,
        region: "local".into(),
        local_network_cidr: "10.50.0.0/24".parse().expect("a prefix"),
        remote_network_cidr: "10.200.0.0/24".parse().expect("a prefix"),
        remote_endpoint: "192.0.2.1:51820".parse().expect("an endpoint"),
        remote_public_key: test_key(key),
        pre_shared_key: Box::new(PresharedKey::generate()),
        persistent_keepalive: Some(25),
        additional_remote_network_cidrs: Vec::new(),
        additional_local_network_cidrs: Vec::new(),
        firewall: Vec::new(),
        firewall_default: RuleAction::Allow,
        created_at: now,
        updated_at: now,
    }
}

/// `sample`, in `region`.
#[cfg(test)]
pub(crate) fn sample_in(name: &str, key: &str, region: &str) -> GatewayRecord {
    GatewayRecord { region: region.into(), ..sample(name, key) }
}

/// A gateway row read with `COLUMNS`. A value that does not decode is
/// `Corrupt`, naming the row and the column.
fn record(row: &Row) -> Result<GatewayRecord, StoreError> {
    let id = row.text(0).map_err(|e| sql::unreadable("gateways", e))?;
    let bad = |column: &'static str| {
        let id = id.clone();
        move |reason: String| StoreError::Corrupt(CorruptValue { id, column, reason })
    };
    let text = |index: usize, column: &'static str| row.text(index).map_err(bad(column));
    let int = |index: usize, column: &'static str| row.int(index).map_err(bad(column));
    fn parse<T: std::str::FromStr>(
        text: String,
        what: &str,
        bad: impl FnOnce(String) -> StoreError,
    ) -> Result<T, StoreError>
    where
        T::Err: std::fmt::Display,
    {
        text.parse().map_err(|e| bad(format!("`{text}` is not {what}: {e}")))
    }
    let status = Status::parse(&text(3, "status")?)
        .ok_or_else(|| bad("status")("not creating, active, deleting or deleted".into()))?;
    let local_network_cidr = parse(text(5, "local_network_cidr")?, "a CIDR", bad("local_network_cidr"))?;
    let remote_network_cidr = parse(text(6, "remote_network_cidr")?, "a CIDR", bad("remote_network_cidr"))?;
    let remote_peer_ip: IpAddr = parse(text(7, "remote_peer_ip")?, "an IP address", bad("remote_peer_ip"))?;
    let port = int(8, "remote_peer_port")?;
    let remote_peer_port = u16::try_from(port)
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(|| bad("remote_peer_port")(format!("{port} is not a port (1-65535)")))?;
    let remote_public_key = parse(text(9, "remote_public_key")?, "a key", bad("remote_public_key"))?;
    // Parsed straight from the row: no copy of the secret text outlives this.
    let pre_shared_key = {
        let secret = zeroize::Zeroizing::new(text(10, "pre_shared_key")?);
        let key = secret.parse::<PresharedKey>().map_err(|e| bad("pre_shared_key")(format!("not a key: {e}")))?;
        Box::new(key)
    };
    let persistent_keepalive = row
        .opt_int(11)
        .map_err(bad("persistent_keepalive"))?
        .map(|k| u16::try_from(k).map_err(|_| bad("persistent_keepalive")(format!("{k} is not 0-65535 seconds"))))
        .transpose()?;
    let additional_remote_network_cidrs = decode_prefixes(&text(14, "additional_remote_network_cidrs")?)
        .map_err(bad("additional_remote_network_cidrs"))?;
    let additional_local_network_cidrs =
        decode_prefixes(&text(15, "additional_local_network_cidrs")?).map_err(bad("additional_local_network_cidrs"))?;
    let firewall = decode_rules(&text(16, "firewall")?).map_err(bad("firewall"))?;
    let firewall_default =
        crate::firewall::parse_action(&text(17, "firewall_default")?).map_err(bad("firewall_default"))?;
    Ok(GatewayRecord {
        seq: int(1, "seq")?,
        name: text(2, "name")?,
        status,
        region: text(4, "region")?,
        local_network_cidr,
        remote_network_cidr,
        remote_endpoint: SocketAddr::new(remote_peer_ip, remote_peer_port),
        remote_public_key,
        pre_shared_key,
        persistent_keepalive,
        additional_remote_network_cidrs,
        additional_local_network_cidrs,
        firewall,
        firewall_default,
        created_at: int(12, "created_at")?,
        updated_at: int(13, "updated_at")?,
        id,
    })
}

/// The gateways' revision: moved by every write of a gateway row.
fn revision(sql: &dyn Sql) -> Result<i64, StoreError> {
    let row = sql.query_one("SELECT COALESCE(MAX(gateway_revision), 0) FROM store_meta", &[])?;
    row.int(0).map_err(|e| sql::unreadable("store_meta", e))
}

/// Moves the revision, inside a gateway write's transaction, and stamps
/// gateway `id`'s row with it (if the row is still there); the new value.
/// The revision's row stays locked until the commit, so writes commit in
/// revision order: a reader that sees one has seen every lower one. The
/// serving nodes are told (PostgreSQL: `NOTIFY`, sent at the commit). Its
/// row gone (removed by hand) fails the write: the other nodes would no
/// longer see this node's writes.
fn bump_revision(sql: &dyn Sql, id: &str) -> Result<i64, StoreError> {
    let row = sql.query_opt(
        "UPDATE store_meta SET gateway_revision = gateway_revision + 1 WHERE id = 1 RETURNING gateway_revision",
        &[],
    )?;
    let row = row.ok_or_else(|| StoreError::Database("the store_meta row is gone; restart to remake it".into()))?;
    let revision = row.int(0).map_err(|e| sql::unreadable("store_meta", e))?;
    sql.execute("UPDATE gateways SET revision = ? WHERE id = ?", args![revision, id])?;
    if let Some(notify) = sql.dialect().notify_change() {
        sql.execute(notify, &[])?;
    }
    Ok(revision)
}

/// Where the store keeps its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// The embedded default: one SQLite file on this host.
    Sqlite(PathBuf),
    /// A PostgreSQL database that several nodes share.
    Postgres(PostgresAt),
}

/// A PostgreSQL database: its URL (`postgres://user@host/db`, or
/// `postgresql:///db?host=/run/postgresql` for a Unix socket) and, kept apart
/// from it, the password (`[store] password_file`), if any.
#[derive(Clone, PartialEq, Eq)]
pub struct PostgresAt {
    pub url: String,
    pub password: Option<SecretString>,
}

/// The URL may hold a password: shown as `describe_postgres` shows it.
impl std::fmt::Debug for PostgresAt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let at =
            parse_postgres_url(&self.url).map_or_else(|_| "<not a PostgreSQL URL>".into(), |c| describe_postgres(&c));
        f.debug_struct("PostgresAt").field("at", &at).field("password", &self.password).finish()
    }
}

impl PostgresAt {
    /// A database at `url` with no password of its own.
    pub fn url(url: impl Into<String>) -> Self {
        Self { url: url.into(), password: None }
    }
}

impl Store {
    /// Opens (creating if needed, mode 0600) the SQLite database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::with_database(Box::new(sqlite::SqliteDb::open(path)?))
    }

    /// Opens the store at `location`, its schema brought up to date.
    pub fn open_at(location: &StoreLocation) -> Result<Self, StoreError> {
        match location {
            StoreLocation::Sqlite(path) => Self::open(path),
            StoreLocation::Postgres(at) => Self::with_database(Box::new(postgres::PostgresDb::open(at)?)),
        }
    }

    fn with_database(db: Box<dyn Database>) -> Result<Self, StoreError> {
        let store = Self {
            db,
            queries: AtomicU64::new(0),
            counts: Default::default(),
            faults: Mutex::default(),
            live_index: Mutex::default(),
            seen_revision: AtomicI64::new(-1),
            changes: Default::default(),
            listening: std::sync::Once::new(),
        };
        store.reload()?;
        Ok(store)
    }

    /// Reads the counts and the live index afresh, and the revision they reflect.
    fn reload(&self) -> Result<(), StoreError> {
        let (revision, counts, rows) = self.transaction(|sql| {
            let revision = revision(sql)?;
            let counts = sql.query("SELECT status, COUNT(*) FROM gateways GROUP BY status", &[])?;
            let rows = sql.query(&format!("SELECT {INDEX_COLUMNS} FROM gateways WHERE status != 'deleted'"), &[])?;
            Ok((revision, counts, rows))
        })?;
        let mut fresh: [u64; 4] = [0; 4];
        for row in counts {
            let (status, n) = (row.text(0), row.int(1).map_err(|e| sql::unreadable("gateways", e))?);
            let status = status.ok().and_then(|s| Status::parse(&s)).unwrap_or(Status::Deleted);
            fresh[status.index()] += u64::try_from(n).unwrap_or(0);
        }
        let mut index = LiveIndex::default();
        for row in &rows {
            let (id, key, networks) = index_entry(row)?;
            index.put(&id, key, networks);
        }
        *self.index() = index;
        for (count, n) in self.counts.iter().zip(fresh) {
            count.store(n, Ordering::Relaxed);
        }
        self.seen_revision.store(revision, Ordering::Relaxed);
        Ok(())
    }

    /// Takes the store-wide write lock for a check-then-write (on a shared
    /// store, one node at a time) and brings this node's counts and index up
    /// to date with what other nodes wrote. Held until the guard drops.
    pub fn exclusive(&self) -> Result<Exclusive, StoreError> {
        let guard = self.db.exclusive()?;
        let current = self.run(revision)?;
        if current != self.seen_revision.load(Ordering::Relaxed) {
            self.reload()?;
        }
        Ok(Exclusive(guard))
    }

    /// After this node's committed write that moved the revision to `to`:
    /// still in step only if nobody else wrote in between.
    fn wrote(&self, to: Option<i64>) {
        if let Some(to) = to {
            let _ = self.seen_revision.compare_exchange(to - 1, to, Ordering::Relaxed, Ordering::Relaxed);
            self.changes.signal();
        }
    }

    /// Several nodes may share it (PostgreSQL).
    pub fn is_shared(&self) -> bool {
        self.db.is_shared()
    }

    /// Where the change counter stands (for `wait_for_change`).
    pub fn change_mark(&self) -> u64 {
        *self.changes.count.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until the change counter moved past `mark` or `limit` passed;
    /// where it stands then.
    pub fn wait_for_change(&self, mark: u64, limit: std::time::Duration) -> u64 {
        let count = self.changes.count.lock().unwrap_or_else(|p| p.into_inner());
        let (count, _) =
            self.changes.moved.wait_timeout_while(count, limit, |c| *c == mark).unwrap_or_else(|p| p.into_inner());
        *count
    }

    /// From now on, other nodes' committed changes move the change counter
    /// as well (PostgreSQL: `LISTEN`; a lost connection is made again). Once.
    pub fn watch_changes(&self) {
        self.listening.call_once(|| {
            let changes = self.changes.clone();
            if let Err(e) = self.db.listen(std::sync::Arc::new(move || changes.signal())) {
                tracing::warn!(error = %e, "cannot listen for other nodes' changes; reading them once a second");
            }
        });
    }

    /// Runs `work` on a connection (each statement on its own).
    fn run<T>(&self, work: impl FnOnce(&dyn Sql) -> Result<T, StoreError>) -> Result<T, StoreError> {
        self.queries.fetch_add(1, Ordering::Relaxed);
        sql::run(&*self.db, false, work)
    }

    /// Runs `work` in one transaction, write-locked from its start.
    fn transaction<T>(&self, work: impl FnOnce(&dyn Sql) -> Result<T, StoreError>) -> Result<T, StoreError> {
        self.queries.fetch_add(1, Ordering::Relaxed);
        sql::run(&*self.db, true, work)
    }

    /// Where the data is (a path, or PostgreSQL without the password).
    pub fn describe(&self) -> String {
        self.db.describe()
    }

    fn index(&self) -> std::sync::MutexGuard<'_, LiveIndex> {
        self.live_index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// After a committed write of `g`: the index follows.
    fn index_record(&self, g: &GatewayRecord) {
        let mut index = self.index();
        if g.status == Status::Deleted {
            index.remove(&g.id);
        } else {
            index.put(&g.id, Some(g.remote_public_key), g.remote_prefixes().collect());
        }
    }

    /// A live gateway (other than `except`) with a remote network that
    /// `prefix` overlaps, and that network: O(log n), no query.
    pub fn remote_overlap(&self, prefix: &IpPrefix, except: Option<&str>) -> Option<(String, IpPrefix)> {
        self.index().overlap(prefix, except)
    }

    /// How many remote networks of one family the live gateways other than
    /// `except` route: no query.
    pub fn remote_network_count(&self, v6: bool, except: Option<&str>) -> usize {
        self.index().network_count(v6, except)
    }

    /// The live gateway (other than `except`) whose remote key is `key`.
    pub fn remote_key_owner(&self, key: &PublicKey, except: Option<&str>) -> Option<String> {
        self.index().key_owner(key, except).map(str::to_owned)
    }

    /// How many times the database has been used since it was opened.
    pub fn queries(&self) -> u64 {
        self.queries.load(Ordering::Relaxed)
    }

    /// Gateways per status, from memory (no query).
    pub fn status_counts(&self) -> [(Status, u64); 4] {
        Status::ALL.map(|s| (s, self.counts[s.index()].load(Ordering::Relaxed)))
    }

    /// Test hook: let `skip` more gateway writes succeed, then fail the next
    /// `fail` ones (`u32::MAX`: all) as a full or read-only disk would.
    pub fn inject_write_failures(&self, skip: u32, fail: u32) {
        *self.faults.lock().unwrap_or_else(|p| p.into_inner()) = WriteFaults { skip, fail };
    }

    fn check_write(&self) -> Result<(), StoreError> {
        let mut f = self.faults.lock().unwrap_or_else(|p| p.into_inner());
        if f.skip > 0 {
            f.skip -= 1;
            return Ok(());
        }
        if f.fail > 0 {
            if f.fail != u32::MAX {
                f.fail -= 1;
            }
            return Err(StoreError::InjectedFault);
        }
        Ok(())
    }

    fn count_change(&self, from: Option<Status>, to: Option<Status>) {
        if let Some(s) = from {
            // Never below zero, whatever a concurrent writer did.
            let _ = self.counts[s.index()].fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        }
        if let Some(s) = to {
            self.counts[s.index()].fetch_add(1, Ordering::Relaxed);
        }
    }

    fn status_of(sql: &dyn Sql, id: &str) -> Result<Option<Status>, StoreError> {
        let row = sql.query_opt("SELECT status FROM gateways WHERE id = ?", args![id])?;
        Ok(row.map(|r| r.text(0).ok().and_then(|s| Status::parse(&s)).unwrap_or(Status::Deleted)))
    }

    /// True if the database answers.
    pub fn ping(&self) -> bool {
        self.run(|sql| sql.query_one("SELECT 1", &[])).is_ok()
    }

    /// Inserts a new gateway and returns it with its sequence number.
    pub fn insert(&self, g: GatewayRecord) -> Result<GatewayRecord, StoreError> {
        self.insert_leased(g, None)
    }

    /// `insert`, with the gateway's lease held by `me` from the same
    /// transaction on (no other node can claim it in between).
    pub fn insert_served(&self, g: GatewayRecord, me: &ThisNode) -> Result<GatewayRecord, StoreError> {
        self.insert_leased(g, Some(me))
    }

    fn insert_leased(&self, mut g: GatewayRecord, me: Option<&ThisNode>) -> Result<GatewayRecord, StoreError> {
        self.check_write()?;
        let (additional_remote, additional_local) =
            (encode_prefixes(&g.additional_remote_network_cidrs)?, encode_prefixes(&g.additional_local_network_cidrs)?);
        let firewall = encode_rules(&g.firewall)?;
        let psk = g.pre_shared_key.to_base64_secret();
        let inserted = self.transaction(|sql| {
            let row = sql.query_one(
                "INSERT INTO gateways (id, name, status, region, local_network_cidr, remote_network_cidr,
                     remote_peer_ip, remote_peer_port, remote_public_key, pre_shared_key, persistent_keepalive,
                     created_at, updated_at, additional_remote_network_cidrs, additional_local_network_cidrs,
                     firewall, firewall_default)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING seq",
                args![
                    &g.id,
                    &g.name,
                    g.status.as_str(),
                    &g.region,
                    g.local_network_cidr.to_string(),
                    g.remote_network_cidr.to_string(),
                    g.remote_endpoint.ip().to_string(),
                    i64::from(g.remote_endpoint.port()),
                    g.remote_public_key.to_base64(),
                    psk.as_str(),
                    g.persistent_keepalive.map(i64::from),
                    g.created_at,
                    g.updated_at,
                    additional_remote,
                    additional_local,
                    firewall,
                    g.firewall_default.as_str()
                ],
            )?;
            let seq = row.int(0).map_err(|e| sql::unreadable("gateways", e))?;
            if let Some(me) = me {
                leases::hold_new(sql, me, &g.id)?;
            }
            Ok((seq, Some(bump_revision(sql, &g.id)?)))
        });
        match inserted {
            Ok((seq, revision)) => {
                g.seq = seq;
                self.wrote(revision);
                self.count_change(None, Some(g.status));
                self.index_record(&g);
                Ok(g)
            }
            Err(StoreError::Unique) => Err(StoreError::DuplicateKey),
            Err(e) => Err(e),
        }
    }

    pub fn get(&self, id: &str) -> Result<Option<GatewayRecord>, StoreError> {
        if sql::holds_nul(id) {
            return Ok(None);
        }
        let row = self.run(|sql| sql.query_opt(&format!("SELECT {COLUMNS} FROM gateways WHERE id = ?"), args![id]))?;
        row.as_ref().map(record).transpose()
    }

    pub fn set_status(&self, id: &str, status: Status) -> Result<(), StoreError> {
        self.set_status_at(id, status, now_millis())
    }

    /// `set_status`, stamping `updated_at` with `at` (Unix milliseconds).
    pub fn set_status_at(&self, id: &str, status: Status, at: i64) -> Result<(), StoreError> {
        self.check_write()?;
        let (old, changed, revived) = self.transaction(|sql| {
            let old = Self::status_of(sql, id)?;
            // A gateway that comes back to life: what the index needs, read
            // before the write (a read that fails then changes nothing).
            let revived = if old == Some(Status::Deleted) && status != Status::Deleted {
                let sql_text = format!("SELECT {INDEX_COLUMNS} FROM gateways WHERE id = ?");
                sql.query_opt(&sql_text, args![id])?.as_ref().map(index_entry).transpose()?
            } else {
                None
            };
            let n = sql.execute(
                "UPDATE gateways SET status = ?, updated_at = ? WHERE id = ?",
                args![status.as_str(), at, id],
            )?;
            let revision = if n > 0 { Some(bump_revision(sql, id)?) } else { None };
            Ok((old, n > 0, (revived, revision)))
        })?;
        let (revived, revision) = revived;
        // Memory follows only what was committed.
        self.wrote(revision);
        if changed {
            self.count_change(old, Some(status));
            if status == Status::Deleted {
                self.index().remove(id);
            } else if let Some((id, key, networks)) = revived {
                self.index().put(&id, key, networks);
            }
        }
        Ok(())
    }

    /// Removes a record that was never acknowledged (a create that failed).
    pub fn purge(&self, id: &str) -> Result<(), StoreError> {
        self.check_write()?;
        let (old, removed, revision) = self.transaction(|sql| {
            let old = Self::status_of(sql, id)?;
            let removed = sql.execute("DELETE FROM gateways WHERE id = ?", args![id])? > 0;
            sql.execute("DELETE FROM leases WHERE gateway_id = ?", args![id])?;
            Ok((old, removed, if removed { Some(bump_revision(sql, id)?) } else { None }))
        })?;
        self.wrote(revision);
        if removed {
            self.count_change(old, None);
            self.index().remove(id);
        }
        Ok(())
    }

    /// Writes every mutable field of `g` (and its `updated_at`).
    pub fn save(&self, g: &GatewayRecord) -> Result<(), StoreError> {
        self.save_with_event(g, None, |_| {})
    }

    /// Saves `g` and, in the same transaction, the event that records the
    /// change (an acknowledged change is never without its event); then
    /// `published` gets the event, in order with every other append.
    pub fn save_with_event(
        &self,
        g: &GatewayRecord,
        event: Option<(EventKind, serde_json::Value)>,
        published: impl FnOnce(&Event),
    ) -> Result<(), StoreError> {
        self.save_if(g, None, event, published).map(|_| ())
    }

    /// `save_with_event`, only if the stored gateway is still `from` (its
    /// status and `updated_at`): a write that settles what was read before
    /// it, which another node's change since must not be overwritten by.
    /// False (nothing written, no event) if it changed.
    pub fn settle_from(
        &self,
        g: &GatewayRecord,
        from: (Status, i64),
        event: (EventKind, serde_json::Value),
        published: impl FnOnce(&Event),
    ) -> Result<bool, StoreError> {
        self.save_if(g, Some(from), Some(event), published)
    }

    fn save_if(
        &self,
        g: &GatewayRecord,
        from: Option<(Status, i64)>,
        event: Option<(EventKind, serde_json::Value)>,
        published: impl FnOnce(&Event),
    ) -> Result<bool, StoreError> {
        self.check_write()?;
        let (additional_remote, additional_local) =
            (encode_prefixes(&g.additional_remote_network_cidrs)?, encode_prefixes(&g.additional_local_network_cidrs)?);
        let firewall = encode_rules(&g.firewall)?;
        let psk = g.pre_shared_key.to_base64_secret();
        let condition = if from.is_some() { " AND status = ? AND updated_at = ?" } else { "" };
        let saved = self.transaction(|sql| {
            let old = Self::status_of(sql, &g.id)?;
            let mut params = args![
                &g.name,
                g.remote_network_cidr.to_string(),
                g.remote_endpoint.ip().to_string(),
                i64::from(g.remote_endpoint.port()),
                psk.as_str(),
                g.persistent_keepalive.map(i64::from),
                g.status.as_str(),
                g.updated_at,
                additional_remote,
                additional_local,
                firewall,
                g.firewall_default.as_str(),
                &g.id
            ]
            .to_vec();
            if let Some((status, at)) = from {
                params.extend([SqlValue::from(status.as_str()), SqlValue::from(at)]);
            }
            let n = sql.execute(
                &format!(
                    "UPDATE gateways SET name = ?, remote_network_cidr = ?, remote_peer_ip = ?, remote_peer_port = ?,
                         pre_shared_key = ?, persistent_keepalive = ?, status = ?, updated_at = ?,
                         additional_remote_network_cidrs = ?, additional_local_network_cidrs = ?, firewall = ?,
                         firewall_default = ? WHERE id = ?{condition}"
                ),
                &params,
            )?;
            // A conditional write that found the gateway changed records nothing.
            let event = if n > 0 || from.is_none() {
                event.map(|(kind, data)| events::insert(sql, kind, &g.id, data)).transpose()?
            } else {
                None
            };
            let revision = if n > 0 { Some(bump_revision(sql, &g.id)?) } else { None };
            Ok((old, n > 0, event, revision))
        })?;
        // Memory follows only what was committed.
        let (old, changed, event, revision) = saved;
        self.wrote(revision);
        if changed {
            self.count_change(old, Some(g.status));
            self.index_record(g);
        }
        if let Some(e) = &event {
            published(e);
        }
        Ok(changed)
    }

    /// Every gateway not yet deleted, oldest first (what the data plane should hold).
    pub fn live(&self) -> Result<Vec<GatewayRecord>, StoreError> {
        self.live_rows()?.into_iter().collect()
    }

    /// `live` without the rows that do not decode (edited by hand): each is
    /// logged, naming it and its column, and left out; the others come back.
    /// A failing database is still an error.
    pub fn live_readable(&self) -> Result<Vec<GatewayRecord>, StoreError> {
        let mut out = Vec::new();
        for row in self.live_rows()? {
            match row {
                Ok(g) => out.push(g),
                Err(e @ StoreError::Corrupt(_)) => {
                    tracing::error!(error = %e, "a stored gateway cannot be read; left out")
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// `live`, row by row: a row that does not decode is its own error
    /// (`Corrupt`, naming it), and the others still come back.
    fn live_rows(&self) -> Result<Vec<Result<GatewayRecord, StoreError>>, StoreError> {
        let sql_text = format!("SELECT {COLUMNS} FROM gateways WHERE status != 'deleted' ORDER BY seq");
        let rows = self.run(|sql| sql.query(&sql_text, &[]))?;
        Ok(rows.iter().map(record).collect())
    }

    /// One page of a listing in a stable order: (sort key, seq), keyset-paginated,
    /// so concurrent inserts never make an item repeat or vanish between pages.
    pub fn list(&self, q: &ListQuery) -> Result<Vec<GatewayRecord>, StoreError> {
        let column = match q.sort {
            SortField::Name => "name",
            SortField::CreatedAt => "created_at",
        };
        let (cmp, dir) = if q.descending { ("<", "DESC") } else { (">", "ASC") };
        let mut sql_text = format!("SELECT {COLUMNS} FROM gateways WHERE 1=1");
        let mut params: Vec<SqlValue> = Vec::new();
        match q.status {
            Some(s) => {
                sql_text.push_str(" AND status = ?");
                params.push(s.as_str().into());
            }
            // Deleted gateways are listed only when asked for.
            None => sql_text.push_str(" AND status != 'deleted'"),
        }
        if let Some((key, seq)) = &q.after {
            sql_text.push_str(&format!(" AND ({column}, seq) {cmp} (?, ?)"));
            params.push(match key {
                SortKey::Name(n) => n.into(),
                SortKey::CreatedAt(t) => (*t).into(),
            });
            params.push((*seq).into());
        }
        sql_text.push_str(&format!(" ORDER BY {column} {dir}, seq {dir} LIMIT ?"));
        params.push(i64::try_from(q.limit).unwrap_or(i64::MAX).into());
        let rows = self.run(|sql| sql.query(&sql_text, &params))?;
        rows.iter().map(record).collect()
    }

    /// Creates an API key; the secret is returned once and only its hash is kept.
    pub fn create_api_key(&self, name: &str, scope: Scope) -> Result<(ApiKeyInfo, SecretString), StoreError> {
        let mut raw = [0u8; 32];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut raw);
        let secret = format!("wgxdp_{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw));
        let info = ApiKeyInfo { id: random_id("key_"), name: name.to_owned(), scope, created_at: now_millis() };
        self.run(|sql| {
            sql.execute(
                "INSERT INTO api_keys (id, name, hash, created_at, scope) VALUES (?, ?, ?, ?, ?)",
                args![&info.id, &info.name, hash_api_key(&secret, scope), info.created_at, scope.as_str()],
            )
        })?;
        Ok((info, SecretString::new(secret)))
    }

    /// Who `secret` is, if it is a valid API key: a row whose hash, taken in
    /// its scope's domain, is the secret's. A scope the store does not know
    /// (written by a newer version) matches nothing.
    pub fn verify_api_key(&self, secret: &str) -> Result<Option<Caller>, StoreError> {
        let (admin, read) = (hash_api_key(secret, Scope::Admin), hash_api_key(secret, Scope::Read));
        let row = self.run(|sql| {
            sql.query_opt("SELECT id, scope, hash FROM api_keys WHERE hash IN (?, ?)", args![admin, read])
        })?;
        let Some(row) = row else { return Ok(None) };
        let read = |i: usize| row.text(i).map_err(|e| sql::unreadable("api_keys", e));
        let (key_id, scope, hash) = (read(0)?, read(1)?, read(2)?);
        Ok(Scope::parse(&scope)
            .filter(|&scope| hash == hash_api_key(secret, scope))
            .map(|scope| Caller { key_id, scope }))
    }

    pub fn list_api_keys(&self) -> Result<Vec<ApiKeyInfo>, StoreError> {
        let rows =
            self.run(|sql| sql.query("SELECT id, name, created_at, scope FROM api_keys ORDER BY created_at, id", &[]))?;
        rows.iter()
            .map(|r| {
                Ok(ApiKeyInfo {
                    id: r.text(0)?,
                    name: r.text(1)?,
                    created_at: r.int(2)?,
                    scope: Scope::parse(&r.text(3)?).unwrap_or(Scope::Read),
                })
            })
            .collect::<Result<_, String>>()
            .map_err(|e| sql::unreadable("api_keys", e))
    }

    /// Revokes a key; false if there was none with this id.
    pub fn revoke_api_key(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self.run(|sql| sql.execute("DELETE FROM api_keys WHERE id = ?", args![id]))? > 0)
    }

    /// Runs a statement as it is (tests that edit rows by hand).
    #[cfg(test)]
    pub(crate) fn execute_raw(&self, sql_text: &str, params: &[SqlValue]) -> u64 {
        self.run(|sql| sql.execute(sql_text, params)).expect("the statement runs")
    }

    /// Runs a query as it is (tests that read rows as stored).
    #[cfg(test)]
    pub(crate) fn query_raw(&self, sql_text: &str, params: &[SqlValue]) -> Vec<Row> {
        self.run(|sql| sql.query(sql_text, params)).expect("the query runs")
    }
}

#[cfg(test)]
mod tests {
    //! The contract both backends keep (`each_backend`); what only one of
    //! them has (SQLite's file, PostgreSQL's migration lock) is tested
    //! beside it.
    use super::testing::{each_backend, TestDb};
    use super::*;

    pub(crate) fn rule(json: serde_json::Value) -> FirewallRule {
        serde_json::from_value::<FirewallRuleText>(json).unwrap().to_rule().unwrap()
    }

    #[test]
    fn records_round_trip_and_keys_are_unique_among_live_gateways() {
        each_backend(|db| {
            let store = db.open();
            let a = store.insert(sample("alpha", "K1")).unwrap();
            assert_eq!(store.get(&a.id).unwrap().unwrap(), a);
            assert!(matches!(store.insert(sample("beta", "K1")), Err(StoreError::DuplicateKey)));
            store.set_status(&a.id, Status::Deleted).unwrap();
            store.insert(sample("beta", "K1")).expect("a deleted gateway's key may be reused");
            assert_eq!(store.live().unwrap().len(), 1);
            let mut b = store.live().unwrap().remove(0);
            b.apply(&GatewayChanges {
                name: Some("gamma".into()),
                persistent_keepalive: Some(None),
                ..Default::default()
            });
            store.save(&b).unwrap();
            let again = store.get(&b.id).unwrap().unwrap();
            assert_eq!((again.name.as_str(), again.persistent_keepalive), ("gamma", None));
            assert_eq!(store.get("vpn_missing").unwrap(), None);
        });
    }

    #[test]
    fn networks_and_firewall_round_trip_and_survive_a_reopen() {
        each_backend(|db| {
            let store = db.open();
            let mut g = sample("policy", "K1");
            g.additional_remote_network_cidrs = vec!["10.201.0.0/16".parse().unwrap(), "fd20::/64".parse().unwrap()];
            g.additional_local_network_cidrs = vec!["10.51.0.0/24".parse().unwrap()];
            g.firewall = vec![
                rule(serde_json::json!({"name":"Allow ICMP","protocol":"icmp","port":"1-65535",
                    "source":"0.0.0.0/0","destination":"0.0.0.0/0"})),
                rule(serde_json::json!({"name":"say \"hi\"\\ 'ünï' ?","protocol":"tcp","port":"22","action":"deny"})),
            ];
            g.firewall_default = RuleAction::Deny;
            let g = store.insert(g).unwrap();
            assert_eq!(store.get(&g.id).unwrap().unwrap(), g);
            let mut changed = g.clone();
            changed.apply(&GatewayChanges {
                additional_remote_network_cidrs: Some(Vec::new()),
                firewall: Some(vec![rule(serde_json::json!({"name":"web","protocol":"udp","port":"8000-8080"}))]),
                firewall_default: Some(RuleAction::Allow),
                ..Default::default()
            });
            store.save(&changed).unwrap();
            drop(store);
            let store = db.open();
            let again = store.get(&g.id).unwrap().unwrap();
            assert_eq!(again, changed);
            assert_eq!(again.additional_local_network_cidrs, g.additional_local_network_cidrs, "untouched");
            assert_eq!(store.live().unwrap(), vec![changed]);
        });
    }

    /// A write is acknowledged only once it is committed: another handle on
    /// the same database (another connection, as another node or a restart
    /// has) sees it as soon as the call returns, with the first still open.
    #[test]
    fn an_acknowledged_write_is_seen_at_once_by_another_handle() {
        each_backend(|db| {
            let (a, b) = (db.open(), db.open());
            let g = a.insert(sample("seen", "K1")).unwrap();
            assert_eq!(b.get(&g.id).unwrap().as_ref(), Some(&g));
            let deleted = GatewayRecord { status: Status::Deleted, updated_at: g.updated_at + 1, ..g.clone() };
            a.save_with_event(&deleted, Some((EventKind::GatewayDeleted, serde_json::json!({}))), |_| {}).unwrap();
            assert_eq!(b.get(&g.id).unwrap().map(|g| g.status), Some(Status::Deleted));
            assert_eq!(b.events_after(0, 10).unwrap().len(), 1, "the event came with the change");
            let (info, secret) = a.create_api_key("k", Scope::Admin).unwrap();
            assert_eq!(b.verify_api_key(secret.expose()).unwrap().map(|c| c.key_id), Some(info.id));
            a.record_audit(AuditEntry {
                seq: 0,
                at: now_millis(),
                key_id: "key_a".into(),
                action: "gateway.create".into(),
                target: None,
                status: 201,
                error_code: None,
                replayed: false,
            })
            .unwrap();
            assert_eq!(b.audit_log(None, 10).unwrap().len(), 1);
        });
    }

    /// Two nodes on one store: under `exclusive` (what every API change
    /// takes), each sees the other's writes in its conflict checks and
    /// counts; writes of its own keep it in step without a reload.
    #[test]
    fn each_node_sees_the_others_writes_under_the_write_lock() {
        each_backend(|db| {
            let (a, b) = (db.open(), db.open());
            let g = a.insert(sample("a", "KA")).unwrap();
            let seed = g.remote_network_cidr;
            assert_eq!(b.remote_overlap(&seed, None), None, "not yet seen");
            drop(b.exclusive().unwrap());
            assert_eq!(b.remote_overlap(&seed, None).map(|h| h.0), Some(g.id.clone()), "seen under the lock");
            assert_eq!(b.remote_key_owner(&test_key("KA"), None), Some(g.id.clone()));
            assert_eq!(b.status_counts()[1], (Status::Active, 1));
            b.set_status(&g.id, Status::Deleted).unwrap();
            let before = a.queries();
            drop(a.exclusive().unwrap());
            assert_eq!(a.remote_overlap(&seed, None), None, "the delete on the other node is seen");
            assert_eq!(a.status_counts()[3], (Status::Deleted, 1));
            assert!(a.queries() > before);
            // Its own writes only: no reload (one query for the revision).
            let before = a.queries();
            a.insert(sample("c", "KC")).unwrap();
            let _held = a.exclusive().unwrap();
            assert_eq!(a.queries(), before + 2, "the insert and the revision read");
        });
    }

    /// Two handles inserting the same remote key at once: the database
    /// itself keeps it unique among live gateways, whoever wins.
    #[test]
    fn a_live_key_stays_unique_under_concurrent_inserts_from_two_handles() {
        each_backend(|db| {
            let stores = [db.open(), db.open()];
            for round in 0..10 {
                let key = format!("R{round}");
                let won: Vec<bool> = std::thread::scope(|s| {
                    let runs: Vec<_> = stores
                        .iter()
                        .map(|store| {
                            let key = key.clone();
                            s.spawn(move || match store.insert(sample("race", &key)) {
                                Ok(_) => true,
                                Err(StoreError::DuplicateKey) => false,
                                Err(e) => panic!("{e}"),
                            })
                        })
                        .collect();
                    runs.into_iter().map(|r| r.join().unwrap()).collect()
                });
                assert_eq!(won.iter().filter(|w| **w).count(), 1, "round {round}: {won:?}");
            }
            assert_eq!(stores[0].live().unwrap().len(), 10);
        });
    }

    #[test]
    fn the_live_index_follows_every_write_and_a_reopen() {
        each_backend(|db| {
            let store = db.open();
            let a = store.insert(sample("a", "KA")).unwrap();
            let seed = a.remote_network_cidr;
            assert_eq!(store.remote_overlap(&seed, None).map(|h| h.0), Some(a.id.clone()));
            assert_eq!(store.remote_overlap(&seed, Some(&a.id)), None, "a gateway never conflicts with itself");
            let inside: IpPrefix = "10.200.0.128/25".parse().unwrap();
            assert_eq!(store.remote_overlap(&inside, None).map(|h| h.1), Some(seed), "a network inside overlaps");
            store.set_status(&a.id, Status::Deleted).unwrap();
            assert_eq!(
                (store.remote_overlap(&seed, None), store.remote_key_owner(&test_key("KA"), None)),
                (None, None)
            );
            assert!(db.open().remote_key_owner(&test_key("KA"), None).is_none(), "deleted: not indexed on open");
            store.set_status(&a.id, Status::Active).unwrap();
            assert_eq!(store.remote_key_owner(&test_key("KA"), None), Some(a.id.clone()), "revived");
            let moved = GatewayRecord {
                remote_network_cidr: "10.99.0.0/16".parse().unwrap(),
                ..store.get(&a.id).unwrap().unwrap()
            };
            store.save(&moved).unwrap();
            assert_eq!(store.remote_overlap(&seed, None), None);
            let within: IpPrefix = "10.99.1.0/24".parse().unwrap();
            assert_eq!(store.remote_overlap(&within, None).map(|h| h.0), Some(a.id.clone()));
            assert_eq!(db.open().remote_overlap(&within, None).map(|h| h.0), Some(a.id.clone()), "after a reopen");
            assert_eq!(store.remote_network_count(false, None), 1);
            store.purge(&a.id).unwrap();
            assert_eq!(store.remote_key_owner(&test_key("KA"), None), None);
            assert_eq!(store.get(&a.id).unwrap(), None, "purged: gone");
        });
    }

    #[test]
    fn keyset_pages_are_stable_in_both_directions() {
        each_backend(|db| {
            let store = db.open();
            for (i, n) in ["m", "c", "x", "c", "a", "q", "c", "C", "é"].iter().enumerate() {
                store.insert(sample(n, &format!("K{i}"))).unwrap();
            }
            for descending in [false, true] {
                let seen = pages(&store, SortField::Name, descending, 2, || {});
                let names: Vec<(String, i64)> = seen.iter().map(|g| (g.name.clone(), g.seq)).collect();
                let mut expected = names.clone();
                // Byte order (SQLite's BINARY, PostgreSQL's "C" for this
                // column): the same order on both backends.
                expected.sort();
                if descending {
                    expected.reverse();
                }
                assert_eq!(names, expected);
                assert_eq!(names.len(), 9);
            }
        });
    }

    /// Every page of a listing in `sort`, `limit` at a time; `between` runs
    /// after each page.
    fn pages(
        store: &Store,
        sort: SortField,
        descending: bool,
        limit: usize,
        mut between: impl FnMut(),
    ) -> Vec<GatewayRecord> {
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let q = ListQuery { status: None, sort, descending, after: after.clone(), limit };
            let page = store.list(&q).unwrap();
            let Some(last) = page.last() else { break };
            let key = match sort {
                SortField::Name => SortKey::Name(last.name.clone()),
                SortField::CreatedAt => SortKey::CreatedAt(last.created_at),
            };
            after = Some((key, last.seq));
            seen.extend(page);
            between();
        }
        seen
    }

    /// Inserts land while a client pages through (another handle, one
    /// between two pages, with stamps before, inside and after the pages
    /// read): every gateway there before the first page comes exactly once,
    /// and nothing comes twice.
    #[test]
    fn keyset_pages_never_repeat_or_lose_a_row_under_concurrent_inserts() {
        each_backend(|db| {
            let (reader, writer) = (db.open(), db.open());
            let mut before = Vec::new();
            for i in 0..20 {
                let mut g = sample(&format!("n{:02}", i * 5), &format!("B{i}"));
                g.created_at = 1_000 + i * 10;
                before.push(writer.insert(g).unwrap().id);
            }
            for (sort, descending) in [(SortField::CreatedAt, false), (SortField::Name, true)] {
                let mut n = 0;
                let seen = pages(&reader, sort, descending, 3, || {
                    n += 1;
                    let stamp = [500, 1_095, 5_000][n as usize % 3] + n;
                    let mut g = sample(&format!("n{:02}", (n * 7) % 100), &format!("C{}{n}", descending as u8));
                    g.created_at = stamp;
                    writer.insert(g).unwrap();
                });
                let ids: Vec<&str> = seen.iter().map(|g| g.id.as_str()).collect();
                let mut unique = ids.clone();
                unique.sort();
                unique.dedup();
                assert_eq!(unique.len(), ids.len(), "no gateway twice");
                for id in &before {
                    assert!(ids.contains(&id.as_str()), "{id} was there before the first page");
                }
                assert!(n >= 7, "inserts ran between the pages");
            }
        });
    }

    #[test]
    fn status_counts_follow_every_write_and_survive_a_reopen() {
        each_backend(|db| {
            let store = db.open();
            let a = store.insert(sample("a", "K1")).unwrap();
            let mut b = store.insert(sample("b", "K2")).unwrap();
            store.set_status(&a.id, Status::Deleting).unwrap();
            b.status = Status::Creating;
            store.save(&b).unwrap();
            let c = store.insert(sample("c", "K3")).unwrap();
            store.purge(&c.id).unwrap();
            store.set_status("vpn_missing", Status::Active).unwrap();
            let expected = [(Status::Creating, 1), (Status::Active, 0), (Status::Deleting, 1), (Status::Deleted, 0)];
            let before = store.queries();
            assert_eq!(store.status_counts(), expected);
            assert_eq!(store.queries(), before, "counting is free");
            drop(store);
            assert_eq!(db.open().status_counts(), expected);
        });
    }

    #[test]
    fn injected_write_failures() {
        each_backend(|db| {
            let store = db.open();
            store.inject_write_failures(1, 2);
            let a = store.insert(sample("a", "K1")).unwrap();
            assert!(matches!(store.set_status(&a.id, Status::Deleted), Err(StoreError::InjectedFault)));
            assert!(store.purge(&a.id).is_err());
            store.set_status(&a.id, Status::Deleted).unwrap();
        });
    }

    #[test]
    fn api_keys_are_stored_hashed() {
        each_backend(|db| {
            let store = db.open();
            let (info, secret) = store.create_api_key("ops", Scope::Admin).unwrap();
            assert!(secret.expose().starts_with("wgxdp_"));
            let caller = Caller { key_id: info.id.clone(), scope: Scope::Admin };
            assert_eq!(store.verify_api_key(secret.expose()).unwrap(), Some(caller));
            let (reader, secret2) = store.create_api_key("dashboards", Scope::Read).unwrap();
            assert_eq!(store.verify_api_key(secret2.expose()).unwrap().unwrap().scope, Scope::Read);
            let scopes: Vec<_> = store.list_api_keys().unwrap().into_iter().map(|k| (k.id, k.scope)).collect();
            assert!(
                scopes.contains(&(reader.id.clone(), Scope::Read)) && scopes.contains(&(info.id.clone(), Scope::Admin))
            );
            assert_eq!(store.verify_api_key("wgxdp_wrong").unwrap(), None);
            let stored = store.query_raw("SELECT hash FROM api_keys", &[]);
            assert!(stored.iter().all(|r| !r.text(0).unwrap().contains(secret.expose())), "only the hash is stored");
            // A read key's hash is not the plain one an older binary looks up.
            let plain = hash_api_key(secret2.expose(), Scope::Admin);
            let found = store.query_raw("SELECT COUNT(*) FROM api_keys WHERE hash = ?", args![plain]);
            assert_eq!(found[0].int(0), Ok(0));
            // A scope changed behind the store's back grants nothing.
            store.execute_raw("UPDATE api_keys SET scope = 'admin' WHERE id = ?", args![&reader.id]);
            assert_eq!(store.verify_api_key(secret2.expose()).unwrap(), None);
            assert!(store.revoke_api_key(&info.id).unwrap());
            assert!(!store.revoke_api_key(&info.id).unwrap());
            assert_eq!(store.verify_api_key(secret.expose()).unwrap(), None);
        });
    }

    /// A key with a NUL character (which PostgreSQL refuses in text) matches
    /// nothing on either backend, without an error; an audit entry naming
    /// one is kept, the character replaced.
    #[test]
    fn a_key_with_a_nul_character_matches_nothing() {
        each_backend(|db| {
            let store = db.open();
            let g = store.insert(sample("a", "K1")).unwrap();
            let nul = format!("{}\0", g.id);
            assert_eq!(store.get(&nul).unwrap(), None);
            assert_eq!(store.webhook("wh_\0").unwrap().map(|w| w.id), None);
            assert!(store.delete_webhook("wh_\0").unwrap().is_none());
            assert!(store.deliveries("wh_\0", None, 10).unwrap().is_empty());
            let filter = EventFilter { gateway_id: Some(nul.clone()), kind: None };
            assert!(store.events_before(None, &filter, 10).unwrap().is_empty());
            let entry = AuditEntry {
                seq: 0,
                at: now_millis(),
                key_id: "key_a".into(),
                action: "gateway.get".into(),
                target: Some(nul),
                status: 404,
                error_code: Some("not_found".into()),
                replayed: false,
            };
            store.record_audit(entry).unwrap();
            assert_eq!(store.audit_log(None, 1).unwrap()[0].target, Some(format!("{}\u{fffd}", g.id)));
        });
    }

    /// A database that cannot be reached is a clear error at open, naming
    /// where it was looked for; a database that is not there too.
    #[test]
    fn an_unreachable_postgresql_is_a_clear_error() {
        let url = "postgresql:///nowhere?host=/nonexistent-wgxdp&port=1&user=postgres";
        let e = Store::open_at(&StoreLocation::Postgres(PostgresAt::url(url))).map(|_| ()).unwrap_err().to_string();
        assert!(e.contains("PostgreSQL postgres@/nonexistent-wgxdp/nowhere"), "{e}");
        assert!(e.contains("No such file or directory"), "the cause: {e}");
        let with_password = PostgresAt::url("postgres://wg:hunter2@db.example/x");
        assert!(!format!("{with_password:?}").contains("hunter2"), "{with_password:?}");
        let db = TestDb::postgres();
        let StoreLocation::Postgres(at) = &db.location else { unreachable!() };
        let store = db.open();
        assert!(store.ping());
        // The same server, a database that is not there.
        let gone = at.url.replace("postgresql:///", "postgresql:///missing_");
        let e = Store::open_at(&StoreLocation::Postgres(PostgresAt::url(gone))).map(|_| ()).unwrap_err().to_string();
        assert!(e.contains("does not exist"), "{e}");
    }
}
