//! The durable store: one embedded SQLite file (WAL, `synchronous=FULL`, mode
//! 0600) holding the VPN gateways and the hashed API keys. Every write is
//! committed (and fsynced) before it returns, so an acknowledged change
//! survives `kill -9`. All calls block: the API runs them off the async runtime.
//!
//! Lists (additional networks, firewall rules) are JSON in TEXT columns. A
//! database from before a column existed gains it on open (`ADDED_COLUMNS`),
//! and a stored value that cannot be read back is a `StoreError::Corrupt`
//! naming the gateway and the column.

use crate::firewall::{rule_texts, FirewallRuleText};
use crate::secret::SecretString;
use base64::Engine;
use blake2::{Blake2s256, Digest};
use rusqlite::types::Value;
use rusqlite::{params, Connection, OptionalExtension, Row};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};
use wgxdp_dataplane::noise::{PresharedKey, PublicKey};
use wgxdp_dataplane::policy::{FirewallRule, RuleAction};
use wgxdp_dataplane::table::IpPrefix;

mod audit;
mod events;
mod idempotency;
mod live_index;
mod webhooks;
pub use audit::AuditEntry;
pub use events::{Event, EventFilter, EventKind};
pub use idempotency::StoredResponse;
pub use live_index::LiveIndex;
pub use webhooks::{
    is_webhook_secret, Attempt, Delivery, DeliveryState, DueDelivery, EventSelection, Webhook, GIVE_UP_AFTER_MILLIS,
};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}: {reason}")]
    Open { path: String, reason: String },
    #[error("a live gateway already uses this remote public key")]
    DuplicateKey,
    #[error("database error: {0}")]
    Sqlite(rusqlite::Error),
    #[error("database: {0}")]
    Corrupt(CorruptValue),
    #[error("cannot encode a value for the database: {0}")]
    Encode(#[from] serde_json::Error),
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

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        // `record` reports undecodable values through rusqlite's conversion error.
        if let rusqlite::Error::FromSqlConversionFailure(_, _, inner) = &e {
            if let Some(corrupt) = inner.downcast_ref::<CorruptValue>() {
                return Self::Corrupt(corrupt.clone());
            }
        }
        Self::Sqlite(e)
    }
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
    conn: Mutex<Connection>,
    /// How many times the connection was used (reads and writes): lets tests
    /// prove that a path (e.g. `/metrics`) never touches the database.
    queries: AtomicU64,
    /// Gateways per status (`Status as usize`), kept exact under the
    /// connection lock by every write, so counting them costs no query.
    counts: [AtomicU64; 4],
    faults: Mutex<WriteFaults>,
    /// The live gateways' remote networks and keys, for the conflict
    /// checks; kept exact under the connection lock like `counts`.
    live_index: Mutex<LiveIndex>,
}

/// Injected write failures (tests of the error paths): after `skip` more
/// successful writes, the next `fail` writes fail.
#[derive(Debug, Default)]
struct WriteFaults {
    skip: u32,
    fail: u32,
}

/// The first schema. Columns added since are in `ADDED_*_COLUMNS`, which every
/// open applies where missing (to new databases too), so each column is
/// declared once.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS gateways (
    seq                  INTEGER PRIMARY KEY AUTOINCREMENT,
    id                   TEXT NOT NULL UNIQUE,
    name                 TEXT NOT NULL,
    status               TEXT NOT NULL,
    region               TEXT NOT NULL,
    local_network_cidr   TEXT NOT NULL,
    remote_network_cidr  TEXT NOT NULL,
    remote_peer_ip       TEXT NOT NULL,
    remote_peer_port     INTEGER NOT NULL,
    remote_public_key    TEXT NOT NULL,
    pre_shared_key       TEXT NOT NULL,
    persistent_keepalive INTEGER,
    created_at           INTEGER NOT NULL,
    updated_at           INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS gateways_live_key ON gateways(remote_public_key) WHERE status != 'deleted';
CREATE INDEX IF NOT EXISTS gateways_name ON gateways(name, seq);
CREATE INDEX IF NOT EXISTS gateways_created ON gateways(created_at, seq);
CREATE TABLE IF NOT EXISTS api_keys (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    hash       TEXT NOT NULL UNIQUE,
    created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_log (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    at         INTEGER NOT NULL,
    key_id     TEXT NOT NULL,
    action     TEXT NOT NULL,
    target     TEXT,
    status     INTEGER NOT NULL,
    error_code TEXT,
    replayed   INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS audit_log_age ON audit_log(at);
CREATE TABLE IF NOT EXISTS idempotency (
    key_id      TEXT NOT NULL,
    idem_key    TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    status      INTEGER NOT NULL,
    headers     TEXT NOT NULL,
    body        BLOB NOT NULL,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (key_id, idem_key)
);
CREATE INDEX IF NOT EXISTS idempotency_age ON idempotency(created_at);
CREATE TABLE IF NOT EXISTS events (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    at         INTEGER NOT NULL,
    kind       TEXT NOT NULL,
    gateway_id TEXT NOT NULL,
    data       TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_age ON events(at);
CREATE INDEX IF NOT EXISTS events_gateway ON events(gateway_id, seq);
CREATE INDEX IF NOT EXISTS events_kind ON events(kind, seq);
CREATE TABLE IF NOT EXISTS webhooks (
    id          TEXT PRIMARY KEY,
    url         TEXT NOT NULL,
    events      TEXT NOT NULL,
    description TEXT NOT NULL,
    secret      TEXT NOT NULL,
    created_at  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    webhook_id      TEXT NOT NULL,
    event_seq       INTEGER NOT NULL,
    state           TEXT NOT NULL,
    attempts        INTEGER NOT NULL,
    next_attempt_at INTEGER,
    last_attempt_at INTEGER,
    last_status     INTEGER,
    last_error      TEXT,
    created_at      INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS webhook_deliveries_pending ON webhook_deliveries(webhook_id, seq) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS webhook_deliveries_of ON webhook_deliveries(webhook_id, seq);
CREATE INDEX IF NOT EXISTS webhook_deliveries_age ON webhook_deliveries(created_at);
";

/// Columns of `gateways` added after the first schema, with the value rows
/// that predate them get: no additional networks, no rules, default allow
/// (what those gateways did before rules existed).
const ADDED_GATEWAY_COLUMNS: [(&str, &str); 4] = [
    ("additional_remote_network_cidrs", "TEXT NOT NULL DEFAULT '[]'"),
    ("additional_local_network_cidrs", "TEXT NOT NULL DEFAULT '[]'"),
    ("firewall", "TEXT NOT NULL DEFAULT '[]'"),
    ("firewall_default", "TEXT NOT NULL DEFAULT 'allow'"),
];

const COLUMNS: &str = "id, seq, name, status, region, local_network_cidr, remote_network_cidr, remote_peer_ip, \
                       remote_peer_port, remote_public_key, pre_shared_key, persistent_keepalive, created_at, updated_at, \
                       additional_remote_network_cidrs, additional_local_network_cidrs, firewall, firewall_default";

/// Columns of `api_keys` added after the first schema: keys from before
/// scopes existed could do everything, and still can.
const ADDED_API_KEY_COLUMNS: [(&str, &str); 1] = [("scope", "TEXT NOT NULL DEFAULT 'admin'")];

/// The schema version this build reads and writes (`PRAGMA user_version`).
/// Version 1 is every table, index and column as `SCHEMA` and the `ADDED_*`
/// lists make them (idempotent: run at every open, they also remake what was
/// removed by hand); a later change of the schema is a step in
/// `migrate_schema` for databases below its version, with this number raised.
pub const SCHEMA_VERSION: i64 = 1;

fn schema_version(conn: &Connection) -> Result<i64, String> {
    conn.query_row("PRAGMA user_version", [], |r| r.get(0)).map_err(|e| e.to_string())
}

/// The schema version of the database file at `path`, read without writing
/// (`wgxdp check`); an error when it is no SQLite database.
pub fn schema_version_of(path: &Path) -> Result<i64, String> {
    let conn =
        Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(|e| e.to_string())?;
    schema_version(&conn)
}

/// Refuses a database a newer wgxdp wrote (a higher version): this build
/// would misread it. Only reads.
pub fn refuse_newer_schema(version: i64) -> Result<(), String> {
    if version > SCHEMA_VERSION {
        return Err(format!(
            "its schema is version {version}, written by a newer wgxdp; this one knows versions up to \
             {SCHEMA_VERSION}: run a wgxdp at least as new as the one that wrote it"
        ));
    }
    Ok(())
}

/// Brings the database to `SCHEMA_VERSION` in one transaction, taken before
/// the version is read (two processes opening an old database at once: the
/// second waits, then finds it current); an error rolls it all back.
fn migrate_schema(conn: &Connection) -> Result<(), String> {
    let tx = rusqlite::Transaction::new_unchecked(conn, rusqlite::TransactionBehavior::Immediate)
        .map_err(|e| e.to_string())?;
    let version = schema_version(&tx)?;
    refuse_newer_schema(version)?;
    make_schema(&tx, version).and_then(|()| Ok(tx.commit()?)).map_err(|e| e.to_string())?;
    if version > 0 && version < SCHEMA_VERSION {
        tracing::info!(from = version, to = SCHEMA_VERSION, "database schema migrated");
    }
    Ok(())
}

/// Version 0 is a new database, or one from before versions (any of the
/// earlier schemas). At every version what is missing is made; then the
/// version is stamped.
fn make_schema(conn: &Connection, version: i64) -> Result<(), StoreError> {
    conn.execute_batch(SCHEMA)?;
    add_columns(conn, "gateways", &ADDED_GATEWAY_COLUMNS)?;
    add_columns(conn, "api_keys", &ADDED_API_KEY_COLUMNS)?;
    if version < SCHEMA_VERSION {
        conn.pragma_update(None, "user_version", SCHEMA_VERSION)?;
    }
    Ok(())
}

/// Adds the columns of `added` that `table` lacks (inside the caller's
/// transaction).
fn add_columns(conn: &Connection, table: &str, added: &[(&str, &str)]) -> Result<(), StoreError> {
    let present: Vec<String> = conn
        .prepare(&format!("SELECT name FROM pragma_table_info('{table}')"))?
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let missing: Vec<_> = added.iter().filter(|(name, _)| !present.iter().any(|p| p == name)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let had_rows: bool = conn.query_row(&format!("SELECT EXISTS (SELECT 1 FROM {table})"), [], |r| r.get(0))?;
    for (name, declaration) in &missing {
        conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {name} {declaration}"))?;
    }
    if had_rows {
        let names: Vec<&str> = missing.iter().map(|(n, _)| *n).collect();
        tracing::info!(table, columns = %names.join(", "), "database migrated: existing rows gained columns");
    }
    Ok(())
}

fn encode_prefixes(prefixes: &[IpPrefix]) -> Result<String, StoreError> {
    Ok(serde_json::to_string(&prefixes.iter().map(ToString::to_string).collect::<Vec<_>>())?)
}

fn encode_rules(rules: &[FirewallRule]) -> Result<String, StoreError> {
    Ok(serde_json::to_string(&rule_texts(rules))?)
}

/// What the live index needs of a row (`index_entry`): a narrow read that
/// decodes no firewall.
const INDEX_COLUMNS: &str = "id, remote_public_key, remote_network_cidr, additional_remote_network_cidrs";

/// (id, remote key, remote networks) of a row read with `INDEX_COLUMNS`; a
/// value that does not decode is left out (reading the whole row names it).
fn index_entry(row: &Row<'_>) -> rusqlite::Result<(String, Option<PublicKey>, Vec<IpPrefix>)> {
    let text = |index: usize| match row.get::<_, Value>(index) {
        Ok(Value::Text(t)) => Some(t),
        _ => None,
    };
    let id: String = row.get(0)?;
    let key = text(1).and_then(|k| k.parse().ok());
    let networks = text(2)
        .and_then(|seed| seed.parse::<IpPrefix>().ok())
        .into_iter()
        .chain(text(3).and_then(|more| decode_prefixes(&more).ok()).unwrap_or_default())
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

/// A stored value that does not decode, as a conversion error `StoreError`
/// recognises (`Corrupt`, naming the row and the column).
fn corrupt(index: usize, id: &str, column: &'static str, reason: String) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(
        index,
        rusqlite::types::Type::Text,
        Box::new(CorruptValue { id: id.to_owned(), column, reason }),
    )
}

/// Column `index` of gateway `id`'s row as `T`: a value of another type is
/// `corrupt`; a failing database stays the error it is.
fn column_as<T: rusqlite::types::FromSql>(
    row: &Row<'_>,
    id: &str,
    index: usize,
    column: &'static str,
) -> rusqlite::Result<T> {
    row.get(index).map_err(|e| match e {
        rusqlite::Error::InvalidColumnType(..)
        | rusqlite::Error::FromSqlConversionFailure(..)
        | rusqlite::Error::IntegralValueOutOfRange(..) => corrupt(index, id, column, e.to_string()),
        e => e,
    })
}

/// Text column `index` parsed as `what`.
fn column_parsed<T: std::str::FromStr>(
    row: &Row<'_>,
    id: &str,
    index: usize,
    column: &'static str,
    what: &str,
) -> rusqlite::Result<T>
where
    T::Err: std::fmt::Display,
{
    let text: String = column_as(row, id, index, column)?;
    text.parse().map_err(|e| corrupt(index, id, column, format!("`{text}` is not {what}: {e}")))
}

fn record(row: &Row<'_>) -> rusqlite::Result<GatewayRecord> {
    let id: String = row.get(0)?;
    let id = id.as_str();
    let with = |index: usize, column: &'static str| move |reason: String| corrupt(index, id, column, reason);
    let status = Status::parse(&column_as::<String>(row, id, 3, "status")?)
        .ok_or_else(|| corrupt(3, id, "status", "not creating, active, deleting or deleted".into()))?;
    let local_network_cidr = column_parsed(row, id, 5, "local_network_cidr", "a CIDR")?;
    let remote_network_cidr = column_parsed(row, id, 6, "remote_network_cidr", "a CIDR")?;
    let remote_peer_ip: IpAddr = column_parsed(row, id, 7, "remote_peer_ip", "an IP address")?;
    let port: i64 = column_as(row, id, 8, "remote_peer_port")?;
    let remote_peer_port = u16::try_from(port)
        .ok()
        .filter(|&p| p != 0)
        .ok_or_else(|| corrupt(8, id, "remote_peer_port", format!("{port} is not a port (1-65535)")))?;
    let remote_public_key = column_parsed(row, id, 9, "remote_public_key", "a key")?;
    // Parsed straight from the row: no copy of the secret text outlives this.
    let pre_shared_key = {
        let text = zeroize::Zeroizing::new(column_as::<String>(row, id, 10, "pre_shared_key")?);
        let key =
            text.parse::<PresharedKey>().map_err(|e| corrupt(10, id, "pre_shared_key", format!("not a key: {e}")))?;
        Box::new(key)
    };
    let keepalive: Option<i64> = column_as(row, id, 11, "persistent_keepalive")?;
    let persistent_keepalive = keepalive
        .map(|k| {
            u16::try_from(k).map_err(|_| corrupt(11, id, "persistent_keepalive", format!("{k} is not 0-65535 seconds")))
        })
        .transpose()?;
    let text = |index: usize, column: &'static str| column_as::<String>(row, id, index, column);
    let additional_remote_network_cidrs = decode_prefixes(&text(14, "additional_remote_network_cidrs")?)
        .map_err(with(14, "additional_remote_network_cidrs"))?;
    let additional_local_network_cidrs = decode_prefixes(&text(15, "additional_local_network_cidrs")?)
        .map_err(with(15, "additional_local_network_cidrs"))?;
    let firewall = decode_rules(&text(16, "firewall")?).map_err(with(16, "firewall"))?;
    let firewall_default =
        crate::firewall::parse_action(&text(17, "firewall_default")?).map_err(with(17, "firewall_default"))?;
    Ok(GatewayRecord {
        id: id.to_owned(),
        seq: row.get(1)?,
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
        created_at: column_as(row, id, 12, "created_at")?,
        updated_at: column_as(row, id, 13, "updated_at")?,
    })
}

impl Store {
    /// Opens (creating if needed, mode 0600) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let err = |reason: String| StoreError::Open { path: path.display().to_string(), reason };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| err(format!("cannot create its directory: {e}")))?;
        }
        // Create the file ourselves so it is never readable by others, even briefly.
        std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(path).map_err(|e| err(e.to_string()))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|e| err(e.to_string()))?;
        let conn = Connection::open(path).map_err(|e| err(e.to_string()))?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // Before anything writes to it (the journal mode included).
        schema_version(&conn).and_then(refuse_newer_schema).map_err(|e| err(format!("cannot use its schema: {e}")))?;
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        if mode != "wal" {
            return Err(err(format!("cannot switch to WAL (journal mode is {mode})")));
        }
        conn.execute_batch("PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;")?;
        migrate_schema(&conn).map_err(|e| err(format!("cannot use its schema: {e}")))?;
        // The WAL and shared-memory files hold the same data: same mode.
        for suffix in ["-wal", "-shm"] {
            let side = format!("{}{suffix}", path.display());
            if Path::new(&side).exists() {
                std::fs::set_permissions(&side, std::fs::Permissions::from_mode(0o600))
                    .map_err(|e| err(e.to_string()))?;
            }
        }
        let counts: [AtomicU64; 4] = Default::default();
        {
            let mut stmt = conn.prepare("SELECT status, COUNT(*) FROM gateways GROUP BY status")?;
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
            for row in rows {
                let (status, n) = row?;
                let status = Status::parse(&status).unwrap_or(Status::Deleted);
                counts[status.index()].fetch_add(u64::try_from(n).unwrap_or(0), Ordering::Relaxed);
            }
        }
        let store = Self {
            conn: Mutex::new(conn),
            queries: AtomicU64::new(0),
            counts,
            faults: Mutex::default(),
            live_index: Mutex::default(),
        };
        {
            let conn = store.conn();
            let sql = format!("SELECT {INDEX_COLUMNS} FROM gateways WHERE status != 'deleted'");
            let mut stmt = conn.prepare(&sql)?;
            let rows = stmt.query_map([], index_entry)?.collect::<Result<Vec<_>, _>>()?;
            let mut index = store.index();
            for (id, key, networks) in rows {
                index.put(&id, key, networks);
            }
        }
        Ok(store)
    }

    fn index(&self) -> std::sync::MutexGuard<'_, LiveIndex> {
        self.live_index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// After a write of `g` (under the connection lock): the index follows.
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

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.queries.fetch_add(1, Ordering::Relaxed);
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
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
            self.counts[s.index()].fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(s) = to {
            self.counts[s.index()].fetch_add(1, Ordering::Relaxed);
        }
    }

    fn status_of(conn: &Connection, id: &str) -> Result<Option<Status>, StoreError> {
        let s: Option<String> =
            conn.query_row("SELECT status FROM gateways WHERE id = ?1", [id], |r| r.get(0)).optional()?;
        Ok(s.map(|s| Status::parse(&s).unwrap_or(Status::Deleted)))
    }

    /// True if the database answers.
    pub fn ping(&self) -> bool {
        self.conn().query_row("SELECT 1", [], |r| r.get::<_, i64>(0)).is_ok()
    }

    /// Inserts a new gateway and returns it with its sequence number.
    pub fn insert(&self, mut g: GatewayRecord) -> Result<GatewayRecord, StoreError> {
        self.check_write()?;
        let (additional_remote, additional_local) =
            (encode_prefixes(&g.additional_remote_network_cidrs)?, encode_prefixes(&g.additional_local_network_cidrs)?);
        let firewall = encode_rules(&g.firewall)?;
        let psk = g.pre_shared_key.to_base64_secret();
        let conn = self.conn();
        let r = conn.execute(
            "INSERT INTO gateways (id, name, status, region, local_network_cidr, remote_network_cidr, remote_peer_ip,
                 remote_peer_port, remote_public_key, pre_shared_key, persistent_keepalive, created_at, updated_at,
                 additional_remote_network_cidrs, additional_local_network_cidrs, firewall, firewall_default)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
            params![
                g.id,
                g.name,
                g.status.as_str(),
                g.region,
                g.local_network_cidr.to_string(),
                g.remote_network_cidr.to_string(),
                g.remote_endpoint.ip().to_string(),
                i64::from(g.remote_endpoint.port()),
                g.remote_public_key.to_base64(),
                *psk,
                g.persistent_keepalive.map(i64::from),
                g.created_at,
                g.updated_at,
                additional_remote,
                additional_local,
                firewall,
                g.firewall_default.as_str()
            ],
        );
        match r {
            Ok(_) => {
                g.seq = conn.last_insert_rowid();
                self.count_change(None, Some(g.status));
                self.index_record(&g);
                Ok(g)
            }
            Err(rusqlite::Error::SqliteFailure(e, _)) if e.code == rusqlite::ErrorCode::ConstraintViolation => {
                Err(StoreError::DuplicateKey)
            }
            Err(e) => Err(e.into()),
        }
    }

    pub fn get(&self, id: &str) -> Result<Option<GatewayRecord>, StoreError> {
        let sql = format!("SELECT {COLUMNS} FROM gateways WHERE id = ?1");
        Ok(self.conn().query_row(&sql, [id], record).optional()?)
    }

    pub fn set_status(&self, id: &str, status: Status) -> Result<(), StoreError> {
        self.set_status_at(id, status, now_millis())
    }

    /// `set_status`, stamping `updated_at` with `at` (Unix milliseconds).
    pub fn set_status_at(&self, id: &str, status: Status, at: i64) -> Result<(), StoreError> {
        self.check_write()?;
        let conn = self.conn();
        let old = Self::status_of(&conn, id)?;
        // A gateway that comes back to life: what the index needs, read
        // before the write (a read that fails then changes nothing).
        let revived = if old == Some(Status::Deleted) && status != Status::Deleted {
            let sql = format!("SELECT {INDEX_COLUMNS} FROM gateways WHERE id = ?1");
            Some(conn.query_row(&sql, [id], index_entry)?)
        } else {
            None
        };
        let n = conn.execute(
            "UPDATE gateways SET status = ?2, updated_at = ?3 WHERE id = ?1",
            params![id, status.as_str(), at],
        )?;
        if n > 0 {
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
        let conn = self.conn();
        let old = Self::status_of(&conn, id)?;
        if conn.execute("DELETE FROM gateways WHERE id = ?1", [id])? > 0 {
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
        self.check_write()?;
        let (additional_remote, additional_local) =
            (encode_prefixes(&g.additional_remote_network_cidrs)?, encode_prefixes(&g.additional_local_network_cidrs)?);
        let firewall = encode_rules(&g.firewall)?;
        let psk = g.pre_shared_key.to_base64_secret();
        let conn = self.conn();
        let old = Self::status_of(&conn, &g.id)?;
        let tx = rusqlite::Transaction::new_unchecked(&conn, rusqlite::TransactionBehavior::Immediate)?;
        let n = tx.execute(
            "UPDATE gateways SET name = ?2, remote_network_cidr = ?3, remote_peer_ip = ?4, remote_peer_port = ?5,
                 pre_shared_key = ?6, persistent_keepalive = ?7, status = ?8, updated_at = ?9,
                 additional_remote_network_cidrs = ?10, additional_local_network_cidrs = ?11, firewall = ?12,
                 firewall_default = ?13 WHERE id = ?1",
            params![
                g.id,
                g.name,
                g.remote_network_cidr.to_string(),
                g.remote_endpoint.ip().to_string(),
                i64::from(g.remote_endpoint.port()),
                *psk,
                g.persistent_keepalive.map(i64::from),
                g.status.as_str(),
                g.updated_at,
                additional_remote,
                additional_local,
                firewall,
                g.firewall_default.as_str()
            ],
        )?;
        let event = event.map(|(kind, data)| events::insert(&tx, kind, &g.id, data)).transpose()?;
        tx.commit()?;
        if n > 0 {
            self.count_change(old, Some(g.status));
            self.index_record(g);
        }
        if let Some(e) = &event {
            published(e);
        }
        Ok(())
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
        let sql = format!("SELECT {COLUMNS} FROM gateways WHERE status != 'deleted' ORDER BY seq");
        let conn = self.conn();
        let mut stmt = conn.prepare(&sql)?;
        let rows = stmt.query_map([], record)?.map(|r| r.map_err(StoreError::from)).collect();
        Ok(rows)
    }

    /// One page of a listing in a stable order: (sort key, seq), keyset-paginated,
    /// so concurrent inserts never make an item repeat or vanish between pages.
    pub fn list(&self, q: &ListQuery) -> Result<Vec<GatewayRecord>, StoreError> {
        let column = match q.sort {
            SortField::Name => "name",
            SortField::CreatedAt => "created_at",
        };
        let (cmp, dir) = if q.descending { ("<", "DESC") } else { (">", "ASC") };
        let mut sql = format!("SELECT {COLUMNS} FROM gateways WHERE 1=1");
        let mut args: Vec<rusqlite::types::Value> = Vec::new();
        match q.status {
            Some(s) => {
                sql.push_str(" AND status = ?");
                args.push(s.as_str().to_owned().into());
            }
            // Deleted gateways are listed only when asked for.
            None => sql.push_str(" AND status != 'deleted'"),
        }
        if let Some((key, seq)) = &q.after {
            sql.push_str(&format!(" AND ({column}, seq) {cmp} (?, ?)"));
            args.push(match key {
                SortKey::Name(n) => n.clone().into(),
                SortKey::CreatedAt(t) => (*t).into(),
            });
            args.push((*seq).into());
        }
        sql.push_str(&format!(" ORDER BY {column} {dir}, seq {dir} LIMIT ?"));
        args.push((q.limit as i64).into());
        let conn = self.conn();
        let mut stmt = conn.prepare(&sql)?;
        let rows = stmt.query_map(rusqlite::params_from_iter(args), record)?.collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Creates an API key; the secret is returned once and only its hash is kept.
    pub fn create_api_key(&self, name: &str, scope: Scope) -> Result<(ApiKeyInfo, SecretString), StoreError> {
        let mut raw = [0u8; 32];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut raw);
        let secret = format!("wgxdp_{}", base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw));
        let info = ApiKeyInfo { id: random_id("key_"), name: name.to_owned(), scope, created_at: now_millis() };
        self.conn().execute(
            "INSERT INTO api_keys (id, name, hash, created_at, scope) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![info.id, info.name, hash_api_key(&secret, scope), info.created_at, scope.as_str()],
        )?;
        Ok((info, SecretString::new(secret)))
    }

    /// Who `secret` is, if it is a valid API key: a row whose hash, taken in
    /// its scope's domain, is the secret's. A scope the store does not know
    /// (written by a newer version) matches nothing.
    pub fn verify_api_key(&self, secret: &str) -> Result<Option<Caller>, StoreError> {
        let (admin, read) = (hash_api_key(secret, Scope::Admin), hash_api_key(secret, Scope::Read));
        let row: Option<(String, String, String)> = self
            .conn()
            .query_row("SELECT id, scope, hash FROM api_keys WHERE hash IN (?1, ?2)", params![admin, read], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()?;
        Ok(row.and_then(|(key_id, scope, hash)| {
            let scope = Scope::parse(&scope)?;
            (hash == hash_api_key(secret, scope)).then_some(Caller { key_id, scope })
        }))
    }

    pub fn list_api_keys(&self) -> Result<Vec<ApiKeyInfo>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT id, name, created_at, scope FROM api_keys ORDER BY created_at, id")?;
        let rows = stmt
            .query_map([], |r| {
                Ok(ApiKeyInfo {
                    id: r.get(0)?,
                    name: r.get(1)?,
                    created_at: r.get(2)?,
                    scope: Scope::parse(&r.get::<_, String>(3)?).unwrap_or(Scope::Read),
                })
            })?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(rows)
    }

    /// Revokes a key; false if there was none with this id.
    pub fn revoke_api_key(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self.conn().execute("DELETE FROM api_keys WHERE id = ?1", [id])? > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(json: serde_json::Value) -> FirewallRule {
        serde_json::from_value::<FirewallRuleText>(json).unwrap().to_rule().unwrap()
    }

    fn remove_db(path: &Path) {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
    }

    fn temp_db() -> (std::path::PathBuf, Store) {
        let path = std::env::temp_dir().join(format!("{}.db", random_id("wgxdp-store-")));
        let store = Store::open(&path).unwrap();
        (path, store)
    }

    #[test]
    fn durable_settings_and_private_file() {
        let (path, store) = temp_db();
        let conn = store.conn();
        let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
        let sync: i64 = conn.query_row("PRAGMA synchronous", [], |r| r.get(0)).unwrap();
        assert_eq!((mode.as_str(), sync), ("wal", 2), "WAL with synchronous=FULL");
        let perms = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(perms, 0o600);
        drop(conn);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn records_round_trip_and_keys_are_unique_among_live_gateways() {
        let (path, store) = temp_db();
        let a = store.insert(sample("alpha", "K1")).unwrap();
        assert_eq!(store.get(&a.id).unwrap().unwrap(), a);
        assert!(matches!(store.insert(sample("beta", "K1")), Err(StoreError::DuplicateKey)));
        store.set_status(&a.id, Status::Deleted).unwrap();
        store.insert(sample("beta", "K1")).expect("a deleted gateway's key may be reused");
        assert_eq!(store.live().unwrap().len(), 1);
        let mut b = store.live().unwrap().remove(0);
        b.apply(&GatewayChanges { name: Some("gamma".into()), persistent_keepalive: Some(None), ..Default::default() });
        store.save(&b).unwrap();
        let again = store.get(&b.id).unwrap().unwrap();
        assert_eq!((again.name.as_str(), again.persistent_keepalive), ("gamma", None));
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn networks_and_firewall_round_trip_and_survive_a_reopen() {
        let (path, store) = temp_db();
        let mut g = sample("policy", "K1");
        g.additional_remote_network_cidrs = vec!["10.201.0.0/16".parse().unwrap(), "fd20::/64".parse().unwrap()];
        g.additional_local_network_cidrs = vec!["10.51.0.0/24".parse().unwrap()];
        g.firewall = vec![
            rule(serde_json::json!({"name":"Allow ICMP","protocol":"icmp","port":"1-65535",
                "source":"0.0.0.0/0","destination":"0.0.0.0/0"})),
            rule(serde_json::json!({"name":"say \"hi\"\\","protocol":"tcp","port":"22","action":"deny"})),
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
        let store = Store::open(&path).unwrap();
        let again = store.get(&g.id).unwrap().unwrap();
        assert_eq!(again, changed);
        assert_eq!(again.additional_local_network_cidrs, g.additional_local_network_cidrs, "untouched by the change");
        assert_eq!(store.live().unwrap(), vec![changed]);
        drop(store);
        remove_db(&path);
    }

    /// The `gateways` table as the first release created it.
    const FIRST_SCHEMA: &str = "
        CREATE TABLE gateways (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, name TEXT NOT NULL,
            status TEXT NOT NULL, region TEXT NOT NULL, local_network_cidr TEXT NOT NULL,
            remote_network_cidr TEXT NOT NULL, remote_peer_ip TEXT NOT NULL, remote_peer_port INTEGER NOT NULL,
            remote_public_key TEXT NOT NULL, pre_shared_key TEXT NOT NULL, persistent_keepalive INTEGER,
            created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL);
        CREATE UNIQUE INDEX gateways_live_key ON gateways(remote_public_key) WHERE status != 'deleted';
        INSERT INTO gateways (id, name, status, region, local_network_cidr, remote_network_cidr, remote_peer_ip,
            remote_peer_port, remote_public_key, pre_shared_key, persistent_keepalive, created_at, updated_at)
        VALUES ('vpn_old', 'old-site', 'active', 'eu', '10.50.0.0/24', '10.9.0.0/16', '192.0.2.9', 51820,
            'SzkAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=', 'sjIbzf0fbRgxz3s0hK2wPgl8g2Gh5d7g2xSpKBs1Ots=', NULL, 1000,
            2000);";

    #[test]
    fn a_database_of_the_first_schema_is_migrated_on_open() {
        let path = std::env::temp_dir().join(format!("{}.db", random_id("wgxdp-store-old-")));
        Connection::open(&path).unwrap().execute_batch(FIRST_SCHEMA).unwrap();
        let store = Store::open(&path).unwrap();
        assert_eq!(user_version(&path), SCHEMA_VERSION, "migrated and stamped with the current version");
        let old = store.get("vpn_old").unwrap().expect("the old gateway is still there");
        assert_eq!(
            (old.name.as_str(), old.remote_network_cidr.to_string().as_str(), old.updated_at),
            ("old-site", "10.9.0.0/16", 2000)
        );
        assert_eq!(
            (old.remote_public_key, old.remote_endpoint.to_string()),
            (test_key("K9"), "192.0.2.9:51820".into())
        );
        assert_eq!(*old.pre_shared_key.to_base64_secret(), "sjIbzf0fbRgxz3s0hK2wPgl8g2Gh5d7g2xSpKBs1Ots=");
        assert!(old.additional_remote_network_cidrs.is_empty() && old.additional_local_network_cidrs.is_empty());
        assert!(old.firewall.is_empty());
        assert_eq!(old.firewall_default, RuleAction::Allow, "what the gateway did before rules existed");
        assert_eq!(store.status_counts()[1], (Status::Active, 1));
        // The new columns take writes, and opening again changes nothing.
        let mut changed = old.clone();
        changed.firewall = vec![rule(serde_json::json!({"name":"ssh","protocol":"tcp","port":"22"}))];
        store.save(&changed).unwrap();
        drop(store);
        let store = Store::open(&path).unwrap();
        assert_eq!(store.live().unwrap(), vec![changed]);
        drop(store);
        remove_db(&path);
    }

    fn user_version(path: &Path) -> i64 {
        Connection::open(path).unwrap().query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap()
    }

    /// A new database gets the current schema version; one a newer wgxdp
    /// wrote (a higher version) is refused with an error naming both
    /// versions, and left as it was.
    #[test]
    fn the_schema_is_versioned_and_a_newer_one_is_refused() {
        let (path, store) = temp_db();
        assert_eq!(user_version(&path), SCHEMA_VERSION);
        store.insert(sample("kept", "K1")).unwrap();
        drop(store);
        let newer = SCHEMA_VERSION + 1;
        Connection::open(&path).unwrap().pragma_update(None, "user_version", newer).unwrap();
        let refused = Store::open(&path).map(|_| ()).unwrap_err().to_string();
        for says in [format!("version {newer}"), format!("up to {SCHEMA_VERSION}"), "newer wgxdp".to_owned()] {
            assert!(refused.contains(&says), "{refused:?} should say {says:?}");
        }
        assert_eq!(user_version(&path), newer, "left as it was");
        Connection::open(&path).unwrap().pragma_update(None, "user_version", SCHEMA_VERSION).unwrap();
        assert_eq!(Store::open(&path).unwrap().live().unwrap().len(), 1, "the rows are intact");
        remove_db(&path);
    }

    /// A migration that fails part way (here an `api_keys` that is a view,
    /// which takes no new column) leaves nothing of itself: no table made,
    /// the version as it was.
    #[test]
    fn a_failed_migration_changes_nothing() {
        let path = std::env::temp_dir().join(format!("{}.db", random_id("wgxdp-store-view-")));
        Connection::open(&path).unwrap().execute_batch("CREATE VIEW api_keys AS SELECT 1 AS id;").unwrap();
        let refused = Store::open(&path).map(|_| ()).unwrap_err().to_string();
        assert!(refused.contains("cannot use its schema"), "{refused}");
        let conn = Connection::open(&path).unwrap();
        let tables: i64 =
            conn.query_row("SELECT COUNT(*) FROM sqlite_schema WHERE type = 'table'", [], |r| r.get(0)).unwrap();
        assert_eq!((tables, user_version(&path)), (0, 0), "rolled back whole");
        drop(conn);
        remove_db(&path);
    }

    /// At the current version a table or index removed by hand is made again
    /// at open (the rule it carries is back).
    #[test]
    fn what_was_removed_by_hand_is_made_again_at_open() {
        let (path, store) = temp_db();
        drop(store);
        Connection::open(&path).unwrap().execute_batch("DROP TABLE idempotency; DROP INDEX events_kind;").unwrap();
        drop(Store::open(&path).unwrap());
        let conn = Connection::open(&path).unwrap();
        let present: i64 = conn
            .query_row("SELECT COUNT(*) FROM sqlite_schema WHERE name IN ('idempotency', 'events_kind')", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(present, 2);
        drop(conn);
        remove_db(&path);
    }

    #[test]
    fn a_stored_value_that_does_not_decode_is_a_clear_error() {
        let (path, store) = temp_db();
        let g = store.insert(sample("corrupt", "K1")).unwrap();
        for (column, value, says) in [
            ("local_network_cidr", "10.50.0.1/24", "not a CIDR"),
            ("remote_network_cidr", "10.200.0.0", "not a CIDR"),
            ("remote_peer_ip", "192.0.2.300", "not an IP address"),
            ("remote_peer_port", "0", "0 is not a port"),
            ("remote_peer_port", "70000", "70000 is not a port"),
            ("remote_peer_port", "many", "remote_peer_port"),
            ("persistent_keepalive", "70000", "70000 is not 0-65535 seconds"),
            ("status", "paused", "not creating, active, deleting or deleted"),
            ("remote_public_key", "K1", "not a key"),
            ("pre_shared_key", "psk", "not a key"),
            ("firewall", "[{\"name\":\"x\",\"protocol\":\"gre\"}]", "rule 0: protocol"),
            ("firewall", "not json", "not a JSON list of rules"),
            ("additional_local_network_cidrs", "[\"10.1.2.3/16\"]", "10.1.2.3/16"),
            ("additional_remote_network_cidrs", "{}", "not a JSON list"),
            ("firewall_default", "maybe", "allow or deny"),
        ] {
            let stored: rusqlite::types::Value =
                store.conn().query_row(&format!("SELECT {column} FROM gateways"), [], |r| r.get(0)).unwrap();
            store.conn().execute(&format!("UPDATE gateways SET {column} = ?1"), [value]).unwrap();
            let err = store.get(&g.id).unwrap_err();
            let StoreError::Corrupt(c) = &err else { panic!("{column}: {err:?}") };
            assert_eq!((c.id.as_str(), c.column), (g.id.as_str(), column));
            let shown = err.to_string();
            assert!(shown.contains(&g.id) && shown.contains(column) && shown.contains(says), "{shown}");
            assert!(matches!(store.live(), Err(StoreError::Corrupt(_))));
            // Still opens (API keys stay manageable), what still decodes still indexed.
            let again = Store::open(&path).unwrap();
            assert!(again.list_api_keys().is_ok(), "{column}");
            let owner = again.remote_key_owner(&test_key("K1"), None);
            assert_eq!(owner.is_some(), column != "remote_public_key", "{column}");
            drop(again);
            store.conn().execute(&format!("UPDATE gateways SET {column} = ?1"), [stored]).unwrap();
        }
        assert_eq!(store.get(&g.id).unwrap().unwrap(), g);
        drop(store);
        remove_db(&path);
    }

    #[test]
    fn the_live_index_follows_every_write_and_a_reopen() {
        let (path, store) = temp_db();
        let a = store.insert(sample("a", "KA")).unwrap();
        let seed = a.remote_network_cidr;
        assert_eq!(store.remote_overlap(&seed, None).map(|h| h.0), Some(a.id.clone()));
        store.set_status(&a.id, Status::Deleted).unwrap();
        assert_eq!((store.remote_overlap(&seed, None), store.remote_key_owner(&test_key("KA"), None)), (None, None));
        assert!(
            Store::open(&path).unwrap().remote_key_owner(&test_key("KA"), None).is_none(),
            "deleted: not indexed on open"
        );
        store.set_status(&a.id, Status::Active).unwrap();
        assert_eq!(store.remote_key_owner(&test_key("KA"), None), Some(a.id.clone()), "revived");
        let moved = GatewayRecord {
            remote_network_cidr: "10.99.0.0/16".parse().unwrap(),
            ..store.get(&a.id).unwrap().unwrap()
        };
        store.save(&moved).unwrap();
        assert_eq!(store.remote_overlap(&seed, None), None);
        assert_eq!(store.remote_overlap(&"10.99.1.0/24".parse().unwrap(), None).map(|h| h.0), Some(a.id.clone()));
        let reopened = Store::open(&path).unwrap();
        assert_eq!(reopened.remote_overlap(&"10.99.1.0/24".parse().unwrap(), None).map(|h| h.0), Some(a.id.clone()));
        drop(reopened);
        store.purge(&a.id).unwrap();
        assert_eq!(store.remote_key_owner(&test_key("KA"), None), None);
        drop(store);
        remove_db(&path);
    }

    #[test]
    fn keyset_pages_are_stable_in_both_directions() {
        let (path, store) = temp_db();
        for (i, n) in ["m", "c", "x", "c", "a", "q", "c"].iter().enumerate() {
            store.insert(sample(n, &format!("K{i}"))).unwrap();
        }
        for descending in [false, true] {
            let mut seen = Vec::new();
            let mut after = None;
            loop {
                let q = ListQuery { status: None, sort: SortField::Name, descending, after: after.clone(), limit: 2 };
                let page = store.list(&q).unwrap();
                let Some(last) = page.last() else { break };
                after = Some((SortKey::Name(last.name.clone()), last.seq));
                seen.extend(page.iter().map(|g| (g.name.clone(), g.seq)));
            }
            let mut expected = seen.clone();
            expected.sort();
            if descending {
                expected.reverse();
            }
            assert_eq!(seen, expected);
            assert_eq!(seen.len(), 7);
        }
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn status_counts_follow_every_write_and_survive_a_reopen() {
        let (path, store) = temp_db();
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
        assert_eq!(Store::open(&path).unwrap().status_counts(), expected);
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn injected_write_failures() {
        let (path, store) = temp_db();
        store.inject_write_failures(1, 2);
        let a = store.insert(sample("a", "K1")).unwrap();
        assert!(matches!(store.set_status(&a.id, Status::Deleted), Err(StoreError::InjectedFault)));
        assert!(store.purge(&a.id).is_err());
        store.set_status(&a.id, Status::Deleted).unwrap();
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn api_keys_are_stored_hashed() {
        let (path, store) = temp_db();
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
        let stored: String = store.conn().query_row("SELECT hash FROM api_keys LIMIT 1", [], |r| r.get(0)).unwrap();
        assert!(!stored.contains(secret.expose()), "only the hash is stored");
        // A read key's hash is not the plain one an older binary looks up.
        let plain = hash_api_key(secret2.expose(), Scope::Admin);
        let found: i64 =
            store.conn().query_row("SELECT COUNT(*) FROM api_keys WHERE hash = ?1", [plain], |r| r.get(0)).unwrap();
        assert_eq!(found, 0);
        // A scope changed behind the store's back grants nothing.
        store.conn().execute("UPDATE api_keys SET scope = 'admin' WHERE id = ?1", [&reader.id]).unwrap();
        assert_eq!(store.verify_api_key(secret2.expose()).unwrap(), None);
        assert!(store.revoke_api_key(&info.id).unwrap());
        assert_eq!(store.verify_api_key(secret.expose()).unwrap(), None);
        let _ = std::fs::remove_file(&path);
    }
}
