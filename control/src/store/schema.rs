//! The schema both backends hold, written once: `{serial}`, `{int}`,
//! `{blob}` and `{bytewise}` become each database's types. A column added after the first
//! schema is listed in `ADDED_COLUMNS` (each declared once), applied where
//! missing at every open.

use super::sql::Dialect;

/// The first schema. Columns added since are in `ADDED_COLUMNS`.
const TEMPLATE: &str = "
CREATE TABLE IF NOT EXISTS gateways (
    seq                  {serial},
    id                   TEXT NOT NULL UNIQUE,
    name                 TEXT{bytewise} NOT NULL,
    status               TEXT NOT NULL,
    region               TEXT NOT NULL,
    local_network_cidr   TEXT NOT NULL,
    remote_network_cidr  TEXT NOT NULL,
    remote_peer_ip       TEXT NOT NULL,
    remote_peer_port     {int} NOT NULL,
    remote_public_key    TEXT NOT NULL,
    pre_shared_key       TEXT NOT NULL,
    persistent_keepalive {int},
    created_at           {int} NOT NULL,
    updated_at           {int} NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS gateways_live_key ON gateways(remote_public_key) WHERE status != 'deleted';
CREATE INDEX IF NOT EXISTS gateways_name ON gateways(name, seq);
CREATE INDEX IF NOT EXISTS gateways_created ON gateways(created_at, seq);
CREATE TABLE IF NOT EXISTS api_keys (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    hash       TEXT NOT NULL UNIQUE,
    created_at {int} NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_log (
    seq        {serial},
    at         {int} NOT NULL,
    key_id     TEXT NOT NULL,
    action     TEXT NOT NULL,
    target     TEXT,
    status     {int} NOT NULL,
    error_code TEXT,
    replayed   {int} NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS audit_log_age ON audit_log(at);
CREATE TABLE IF NOT EXISTS idempotency (
    key_id      TEXT NOT NULL,
    idem_key    TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    status      {int} NOT NULL,
    headers     TEXT NOT NULL,
    body        {blob} NOT NULL,
    created_at  {int} NOT NULL,
    PRIMARY KEY (key_id, idem_key)
);
CREATE INDEX IF NOT EXISTS idempotency_age ON idempotency(created_at);
CREATE TABLE IF NOT EXISTS events (
    seq        {serial},
    at         {int} NOT NULL,
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
    created_at  {int} NOT NULL
);
CREATE TABLE IF NOT EXISTS webhook_deliveries (
    seq             {serial},
    webhook_id      TEXT NOT NULL,
    event_seq       {int} NOT NULL,
    state           TEXT NOT NULL,
    attempts        {int} NOT NULL,
    next_attempt_at {int},
    last_attempt_at {int},
    last_status     {int},
    last_error      TEXT,
    created_at      {int} NOT NULL
);
CREATE INDEX IF NOT EXISTS webhook_deliveries_pending ON webhook_deliveries(webhook_id, seq) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS webhook_deliveries_of ON webhook_deliveries(webhook_id, seq);
CREATE INDEX IF NOT EXISTS webhook_deliveries_age ON webhook_deliveries(created_at);
CREATE TABLE IF NOT EXISTS store_meta (
    id               {int} PRIMARY KEY,
    gateway_revision {int} NOT NULL
);
INSERT INTO store_meta (id, gateway_revision) VALUES (1, 0) ON CONFLICT (id) DO NOTHING;
CREATE TABLE IF NOT EXISTS nodes (
    id           TEXT PRIMARY KEY,
    region       TEXT NOT NULL,
    api          TEXT NOT NULL,
    incarnation  TEXT NOT NULL,
    started_at   {int} NOT NULL,
    heartbeat_at {int} NOT NULL
);
CREATE TABLE IF NOT EXISTS leases (
    gateway_id TEXT PRIMARY KEY,
    node_id    TEXT NOT NULL,
    since      {int} NOT NULL,
    applied_at {int} NOT NULL
);
CREATE INDEX IF NOT EXISTS leases_node ON leases(node_id, applied_at);
CREATE TABLE IF NOT EXISTS tunnel_status (
    gateway_id       TEXT PRIMARY KEY,
    node_id          TEXT NOT NULL,
    published_at     {int} NOT NULL,
    bytes_sent       {int} NOT NULL,
    bytes_received   {int} NOT NULL,
    packets_sent     {int} NOT NULL,
    packets_received {int} NOT NULL,
    handshakes       {int} NOT NULL,
    handshake_failures {int} NOT NULL,
    last_handshake   {int},
    endpoint         TEXT,
    rule_hits        TEXT NOT NULL
);
";

/// Every table and index as `dialect` declares them.
pub fn tables(dialect: Dialect) -> String {
    // `{bytewise}`: names sort by their bytes on both (SQLite's default;
    // PostgreSQL's would follow the server's locale), so that a listing's
    // order and its page cursors mean the same on either.
    let (serial, int, blob, bytewise) = match dialect {
        Dialect::Sqlite => ("INTEGER PRIMARY KEY AUTOINCREMENT", "INTEGER", "BLOB", ""),
        Dialect::Postgres => ("BIGSERIAL PRIMARY KEY", "BIGINT", "BYTEA", " COLLATE \"C\""),
    };
    TEMPLATE.replace("{serial}", serial).replace("{int}", int).replace("{blob}", blob).replace("{bytewise}", bytewise)
}

/// Columns of `gateways` added after the first schema, with the value rows
/// that predate them get: no additional networks, no rules, default allow
/// (what those gateways did before rules existed).
const ADDED_GATEWAY_COLUMNS: [(&str, &str); 5] = [
    ("additional_remote_network_cidrs", "TEXT NOT NULL DEFAULT '[]'"),
    ("additional_local_network_cidrs", "TEXT NOT NULL DEFAULT '[]'"),
    ("firewall", "TEXT NOT NULL DEFAULT '[]'"),
    ("firewall_default", "TEXT NOT NULL DEFAULT 'allow'"),
    // The gateways' revision (`store_meta`) its last write moved it to: the
    // serving nodes read what changed since they last looked.
    ("revision", "BIGINT NOT NULL DEFAULT 0"),
];

/// Columns of `api_keys` added after the first schema: keys from before
/// scopes existed could do everything, and still can.
const ADDED_API_KEY_COLUMNS: [(&str, &str); 1] = [("scope", "TEXT NOT NULL DEFAULT 'admin'")];

/// Indexes on columns added after the first schema (made after them), by name.
pub const ADDED_INDEXES: [(&str, &str); 1] = [
    // What the serving nodes read at each pass: the gateways written since.
    ("gateways_revision", "CREATE INDEX IF NOT EXISTS gateways_revision ON gateways(revision)"),
];

/// The tables and indexes `tables` and `ADDED_INDEXES` make, by name.
pub fn objects() -> Vec<&'static str> {
    TEMPLATE
        .split(" IF NOT EXISTS ")
        .skip(1)
        .filter_map(|rest| rest.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).next())
        .chain(ADDED_INDEXES.iter().map(|(name, _)| *name))
        .collect()
}

/// Columns of `webhook_deliveries` added after the first schema: until when
/// a node has claimed a delivery (Unix milliseconds, the database's clock).
const ADDED_DELIVERY_COLUMNS: [(&str, &str); 1] = [("claimed_until", "BIGINT")];

/// Columns of `nodes` added after the first schema: what the remote sites
/// of the node's region configure (its key, address and port; empty and 0
/// until it says) and the site's network it serves (`[api] site_cidr`).
const ADDED_NODE_COLUMNS: [(&str, &str); 4] = [
    ("public_key", "TEXT NOT NULL DEFAULT ''"),
    ("site_cidr", "TEXT NOT NULL DEFAULT ''"),
    ("public_address", "TEXT NOT NULL DEFAULT ''"),
    ("listen_port", "BIGINT NOT NULL DEFAULT 0"),
];

/// Columns of `store_meta` added after the first schema: moved each time a
/// node takes a lease another node held (its holder must stop serving it).
const ADDED_META_COLUMNS: [(&str, &str); 1] = [("lease_revision", "BIGINT NOT NULL DEFAULT 0")];

/// Every table's added columns.
pub const ADDED_COLUMNS: [(&str, &[(&str, &str)]); 5] = [
    ("store_meta", &ADDED_META_COLUMNS),
    ("gateways", &ADDED_GATEWAY_COLUMNS),
    ("api_keys", &ADDED_API_KEY_COLUMNS),
    ("webhook_deliveries", &ADDED_DELIVERY_COLUMNS),
    ("nodes", &ADDED_NODE_COLUMNS),
];

/// The schema version this build reads and writes (SQLite: `PRAGMA user_version`;
/// PostgreSQL: the `schema_version` table).
/// Each version is every table, index and column as `TEMPLATE` and
/// `ADDED_COLUMNS` make them (idempotent: run where anything is missing,
/// they also remake what was removed by hand). Version 2 added the nodes,
/// the gateways' revision (`store_meta`) and claimed webhook deliveries: a
/// build of version 1 would write gateways without moving the revision,
/// which the other nodes rely on, so it refuses a version-2 database.
/// Version 3 added the leases (which node serves each gateway), the
/// published tunnel statuses, each gateway row's revision and the nodes'
/// public keys and addresses: a version-2 build would write gateways without
/// their row's revision, which the serving nodes rely on. A
/// change that needs more than adding is a step of its own in each
/// backend's migration, with this number raised.
pub const SCHEMA_VERSION: i64 = 3;

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

/// Logs a migration from `version` (0: a new database, nothing to say).
pub fn log_migrated(version: i64) {
    if version > 0 && version < SCHEMA_VERSION {
        tracing::info!(from = version, to = SCHEMA_VERSION, "database schema migrated");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_objects_are_every_table_and_index() {
        let objects = objects();
        for name in
            ["gateways", "gateways_live_key", "api_keys", "events", "events_kind", "nodes", "webhook_deliveries_age"]
        {
            assert!(objects.contains(&name), "{name}: {objects:?}");
        }
        assert_eq!(objects.len(), TEMPLATE.matches("IF NOT EXISTS").count() + ADDED_INDEXES.len());
    }
}
