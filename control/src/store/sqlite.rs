//! The embedded backend: one SQLite file (WAL, `synchronous=FULL`, mode
//! 0600), one connection behind a lock. The schema version is
//! `PRAGMA user_version`.

use super::schema::{self, refuse_newer_schema, SCHEMA_VERSION};
use super::sql::{Database, Dialect, Row, Sql, SqlValue};
use super::StoreError;
use rusqlite::types::{ToSqlOutput, ValueRef};
use rusqlite::Connection;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        if let rusqlite::Error::SqliteFailure(f, _) = &e {
            let unique = [rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE, rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY];
            if unique.contains(&f.extended_code) {
                return Self::Unique;
            }
        }
        Self::Database(e.to_string())
    }
}

impl rusqlite::ToSql for SqlValue {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match self {
            SqlValue::Null => ValueRef::Null,
            SqlValue::Int(v) => ValueRef::Integer(*v),
            SqlValue::Real(v) => ValueRef::Real(*v),
            SqlValue::Text(v) => ValueRef::Text(v.as_bytes()),
            SqlValue::Blob(v) => ValueRef::Blob(v),
        }))
    }
}

fn value(v: ValueRef<'_>) -> SqlValue {
    match v {
        ValueRef::Null => SqlValue::Null,
        ValueRef::Integer(v) => SqlValue::Int(v),
        ValueRef::Real(v) => SqlValue::Real(v),
        // Text that is not UTF-8 (written by hand) reads as a blob: whatever
        // expects text then names it.
        ValueRef::Text(t) => std::str::from_utf8(t).map_or_else(|_| SqlValue::Blob(t.to_vec()), SqlValue::from),
        ValueRef::Blob(b) => SqlValue::Blob(b.to_vec()),
    }
}

impl Sql for Connection {
    fn execute(&self, sql: &str, args: &[SqlValue]) -> Result<u64, StoreError> {
        let n = self.prepare_cached(sql)?.execute(rusqlite::params_from_iter(args))?;
        Ok(n as u64)
    }

    fn query(&self, sql: &str, args: &[SqlValue]) -> Result<Vec<Row>, StoreError> {
        let mut stmt = self.prepare_cached(sql)?;
        let columns = stmt.column_count();
        let mut rows = stmt.query(rusqlite::params_from_iter(args))?;
        let mut out = Vec::new();
        while let Some(r) = rows.next()? {
            out.push(Row((0..columns).map(|i| r.get_ref(i).map(value)).collect::<Result<_, _>>()?));
        }
        Ok(out)
    }

    fn dialect(&self) -> Dialect {
        Dialect::Sqlite
    }
}

#[derive(Debug)]
pub struct SqliteDb {
    conn: Mutex<Connection>,
    path: PathBuf,
}

impl Database for SqliteDb {
    fn with(&self, work: &mut dyn FnMut(&dyn Sql) -> Result<(), StoreError>) -> Result<(), StoreError> {
        work(&*self.conn())
    }

    fn transaction(&self, work: &mut dyn FnMut(&dyn Sql) -> Result<(), StoreError>) -> Result<(), StoreError> {
        let conn = self.conn();
        // Write-locked from the start: a read first would make a later write
        // fail at once if another connection wrote in between.
        let tx = rusqlite::Transaction::new_unchecked(&conn, rusqlite::TransactionBehavior::Immediate)?;
        work(&*tx)?;
        Ok(tx.commit()?)
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}

impl SqliteDb {
    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Opens (creating if needed, mode 0600) the database at `path`, brought
    /// to `SCHEMA_VERSION`.
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
        Ok(Self { conn: Mutex::new(conn), path: path.to_owned() })
    }
}

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

/// Brings the database to `SCHEMA_VERSION` in one transaction, taken before
/// the version is read (two processes opening an old database at once: the
/// second waits, then finds it current); an error rolls it all back.
fn migrate_schema(conn: &Connection) -> Result<(), String> {
    let tx = rusqlite::Transaction::new_unchecked(conn, rusqlite::TransactionBehavior::Immediate)
        .map_err(|e| e.to_string())?;
    let version = schema_version(&tx)?;
    refuse_newer_schema(version)?;
    make_schema(&tx, version).and_then(|()| Ok(tx.commit()?)).map_err(|e| e.to_string())?;
    schema::log_migrated(version);
    Ok(())
}

/// Version 0 is a new database, or one from before versions (any of the
/// earlier schemas). At every version what is missing is made; then the
/// version is stamped.
fn make_schema(conn: &Connection, version: i64) -> Result<(), StoreError> {
    conn.execute_batch(&schema::tables(Dialect::Sqlite))?;
    for (table, added) in schema::ADDED_COLUMNS {
        add_columns(conn, table, added)?;
    }
    for (_, index) in schema::ADDED_INDEXES {
        conn.execute_batch(index)?;
    }
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

#[cfg(test)]
mod tests {
    //! What only the SQLite backend has: its file, its pragmas, its
    //! migrations from earlier releases, and rows edited by hand (SQLite
    //! takes any value in any column).
    use super::super::tests::rule;
    use super::super::{random_id, sample, test_key, Status, Store, StoreError};
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use wgxdp_dataplane::policy::RuleAction;

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
        let conn = Connection::open(&path).unwrap();
        let mode: String = conn.query_row("PRAGMA journal_mode", [], |r| r.get(0)).unwrap();
        let sync: i64 = conn.query_row("PRAGMA synchronous", [], |r| r.get(0)).unwrap();
        assert_eq!((mode.as_str(), sync), ("wal", 2), "WAL with synchronous=FULL");
        let perms = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(perms, 0o600);
        drop((conn, store));
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
            let stored = store.query_raw(&format!("SELECT {column} FROM gateways"), &[])[0].value(0);
            store.execute_raw(&format!("UPDATE gateways SET {column} = ?"), &[SqlValue::from(value)]);
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
            store.execute_raw(&format!("UPDATE gateways SET {column} = ?"), &[stored]);
        }
        assert_eq!(store.get(&g.id).unwrap().unwrap(), g);
        drop(store);
        remove_db(&path);
    }
}
