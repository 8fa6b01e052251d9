//! The shared backend: PostgreSQL through a pool of `tokio-postgres`
//! connections (deadpool) driven by a runtime of the store's own, so that
//! the store's calls block the way SQLite's do, from any thread, without
//! touching the API's runtime. The schema version is the one row of the
//! `schema_version` table; migrations take an advisory lock, so nodes that
//! start together migrate one at a time.

use super::schema::{self, refuse_newer_schema, SCHEMA_VERSION};
use super::sql::{Database, Dialect, Row, Sql, SqlValue};
use super::{PostgresAt, StoreError};
use bytes::BytesMut;
use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Pool, RecyclingMethod};
use std::future::Future;
use std::time::Duration;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{IsNull, ToSql, Type};

/// Connections the pool keeps at most: the API's blocking threads share them.
const POOL_SIZE: usize = 16;
/// How long a call waits for a connection, or to make one, before it fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a statement may run, or wait for a lock, before the server
/// cancels it: a call fails rather than holding the API up.
const STATEMENT_TIMEOUT_MS: u32 = 15_000;
const LOCK_TIMEOUT_MS: u32 = 5_000;
/// A server that stops answering (host gone, network cut) is noticed by TCP
/// within this, instead of the system's quarter of an hour.
const DEAD_PEER: Duration = Duration::from_secs(15);
/// The advisory lock key migrations hold ("wgxdp" in ASCII).
const MIGRATION_LOCK: i64 = 0x0077_6778_6470;
/// How long a change waits for another node's to end before it is refused.
const EXCLUSIVE_WAIT: Duration = Duration::from_secs(30);
/// How long a node waits for another's migration at start.
const MIGRATION_WAIT_MS: u32 = 120_000;
/// The advisory lock a check-then-write holds fleet-wide ("wgxdpwr").
const WRITE_LOCK: i64 = 0x0077_6778_6470_7772;

pub struct PostgresDb {
    /// `None` only while dropping (the runtime is shut down in the background,
    /// which is allowed from an async context too).
    runtime: Option<tokio::runtime::Runtime>,
    pool: Pool,
    /// How to connect (for `listen`'s own connection).
    config: tokio_postgres::Config,
    described: String,
}

impl std::fmt::Debug for PostgresDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresDb").field("at", &self.described).finish_non_exhaustive()
    }
}

impl Drop for PostgresDb {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn pg_error(e: tokio_postgres::Error) -> StoreError {
    if e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
        return StoreError::Unique;
    }
    // The server's own message when there is one (the error's Display alone says "db error").
    match e.as_db_error() {
        Some(db) => StoreError::Database(format!("{}: {}", db.severity(), db.message())),
        None => {
            // "error connecting to server" says little without its cause.
            let mut text = e.to_string();
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                text.push_str(&format!(": {c}"));
                cause = c.source();
            }
            StoreError::Database(text)
        }
    }
}

/// `?` placeholders (the store's) as `$1`, `$2`… (PostgreSQL's). No
/// statement the store runs has a `?` inside a quoted literal.
fn numbered(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 16);
    let mut n = 0;
    for c in sql.chars() {
        if c == '?' {
            n += 1;
            out.push('$');
            out.push_str(&n.to_string());
        } else {
            out.push(c);
        }
    }
    out
}

impl ToSql for SqlValue {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        let text = [Type::TEXT, Type::VARCHAR, Type::BPCHAR, Type::NAME, Type::UNKNOWN];
        match self {
            SqlValue::Null => Ok(IsNull::Yes),
            SqlValue::Int(v) if *ty == Type::INT8 => v.to_sql(ty, out),
            SqlValue::Int(v) if *ty == Type::INT4 => i32::try_from(*v)?.to_sql(ty, out),
            SqlValue::Int(v) if *ty == Type::INT2 => i16::try_from(*v)?.to_sql(ty, out),
            SqlValue::Int(v) if *ty == Type::BOOL => (*v != 0).to_sql(ty, out),
            SqlValue::Real(v) if *ty == Type::FLOAT8 => v.to_sql(ty, out),
            SqlValue::Text(v) if text.contains(ty) => v.as_str().to_sql(ty, out),
            SqlValue::Blob(v) if *ty == Type::BYTEA => v.as_slice().to_sql(ty, out),
            v => Err(format!("{v:?} cannot be a {ty} parameter").into()),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    fn to_sql_checked(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        self.to_sql(ty, out)
    }
}

fn row(r: &tokio_postgres::Row) -> Result<Row, StoreError> {
    let column = |i: usize| -> Result<SqlValue, tokio_postgres::Error> {
        let ty = r.columns()[i].type_();
        Ok(match *ty {
            Type::INT8 => r.try_get::<_, Option<i64>>(i)?.into(),
            Type::INT4 => r.try_get::<_, Option<i32>>(i)?.map(i64::from).into(),
            Type::INT2 => r.try_get::<_, Option<i16>>(i)?.map(i64::from).into(),
            Type::BOOL => r.try_get::<_, Option<bool>>(i)?.into(),
            Type::FLOAT8 => r.try_get::<_, Option<f64>>(i)?.map_or(SqlValue::Null, SqlValue::Real),
            Type::BYTEA => r.try_get::<_, Option<Vec<u8>>>(i)?.into(),
            _ => r.try_get::<_, Option<String>>(i)?.into(),
        })
    };
    Ok(Row((0..r.len()).map(column).collect::<Result<_, _>>().map_err(pg_error)?))
}

/// A connection or a transaction, run to completion on the calling thread.
struct PgSql<'a, C: GenericClient>(&'a C);

impl<C: GenericClient> Sql for PgSql<'_, C> {
    fn execute(&self, sql: &str, args: &[SqlValue]) -> Result<u64, StoreError> {
        let params: Vec<&(dyn ToSql + Sync)> = args.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
        futures_executor::block_on(async {
            let stmt = self.0.prepare_cached(&numbered(sql)).await?;
            self.0.execute(&stmt, &params).await
        })
        .map_err(pg_error)
    }

    fn query(&self, sql: &str, args: &[SqlValue]) -> Result<Vec<Row>, StoreError> {
        let params: Vec<&(dyn ToSql + Sync)> = args.iter().map(|a| a as &(dyn ToSql + Sync)).collect();
        let rows = futures_executor::block_on(async {
            let stmt = self.0.prepare_cached(&numbered(sql)).await?;
            self.0.query(&stmt, &params).await
        })
        .map_err(pg_error)?;
        rows.iter().map(row).collect()
    }

    fn dialect(&self) -> Dialect {
        Dialect::Postgres
    }
}

impl Database for PostgresDb {
    fn with(&self, work: &mut dyn FnMut(&dyn Sql) -> Result<(), StoreError>) -> Result<(), StoreError> {
        let client = self.client()?;
        work(&PgSql(&client))
    }

    fn transaction(&self, work: &mut dyn FnMut(&dyn Sql) -> Result<(), StoreError>) -> Result<(), StoreError> {
        let mut client = self.client()?;
        let tx = futures_executor::block_on(client.transaction()).map_err(pg_error)?;
        // An error drops `tx`, which rolls it back.
        work(&PgSql(&tx))?;
        futures_executor::block_on(tx.commit()).map_err(pg_error)
    }

    fn describe(&self) -> String {
        self.described.clone()
    }

    fn is_shared(&self) -> bool {
        true
    }

    fn listen(&self, changed: std::sync::Arc<dyn Fn() + Send + Sync>) -> Result<(), StoreError> {
        let (config, described) = (self.config.clone(), self.described.clone());
        self.runtime().spawn(async move {
            let mut failing = false;
            loop {
                match listen_once(&config, &changed).await {
                    Err(e) if !failing => {
                        tracing::warn!(store = %described, error = %e,
                            "not told of other nodes' changes; reading them once a second until the store answers");
                        failing = true;
                    }
                    Err(_) => {}
                    Ok(()) => failing = false,
                }
                // Whatever the gap hid is read at once.
                changed();
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        Ok(())
    }

    fn exclusive(&self) -> Result<Option<Box<dyn Send>>, StoreError> {
        let client = self.client()?;
        // Tried, not waited for on the server: a change of another node that
        // runs long (a restore) outlasts the lock timeout, and this wait has
        // a bound of its own.
        let deadline = std::time::Instant::now() + EXCLUSIVE_WAIT;
        let mut pause = Duration::from_millis(5);
        loop {
            let row = futures_executor::block_on(client.query_one("SELECT pg_try_advisory_lock($1)", &[&WRITE_LOCK]))
                .map_err(pg_error)?;
            if row.get::<_, bool>(0) {
                return Ok(Some(Box::new(WriteLock(Some(client)))));
            }
            if std::time::Instant::now() >= deadline {
                return Err(StoreError::Database(format!(
                    "another node held the store's write lock for {} s",
                    EXCLUSIVE_WAIT.as_secs()
                )));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(100));
        }
    }
}

/// The session-level lock `exclusive` took, on the connection holding it.
struct WriteLock(Option<deadpool_postgres::Object>);

impl Drop for WriteLock {
    fn drop(&mut self) {
        let Some(client) = self.0.take() else { return };
        let unlocked = futures_executor::block_on(client.execute("SELECT pg_advisory_unlock($1)", &[&WRITE_LOCK]));
        if let Err(e) = unlocked {
            // Closing the connection ends its session, and the lock with it.
            tracing::warn!(error = %pg_error(e), "cannot release the store's write lock; closing its connection");
            drop(deadpool_postgres::Object::take(client));
        }
    }
}

/// The channel `Dialect::notify_change` notifies.
const CHANGE_CHANNEL: &str = "wgxdp_gateways";

/// Listens on `CHANGE_CHANNEL` over a connection of its own, calling
/// `changed` for each notification, until the connection ends. `changed`
/// is called once the listening starts as well: what changed before it
/// (or while a previous connection was down) is read then.
async fn listen_once(
    config: &tokio_postgres::Config,
    changed: &std::sync::Arc<dyn Fn() + Send + Sync>,
) -> Result<(), tokio_postgres::Error> {
    let (client, mut connection) = config.connect(tokio_postgres::NoTls).await?;
    let heard = changed.clone();
    let driver = tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(tokio_postgres::AsyncMessage::Notification(_))) => heard(),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e),
                None => return Ok(()),
            }
        }
    });
    client.batch_execute(&format!("LISTEN {CHANGE_CHANNEL}")).await?;
    changed();
    let ended = driver.await;
    drop(client);
    ended.unwrap_or(Ok(()))
}

impl PostgresDb {
    fn runtime(&self) -> &tokio::runtime::Runtime {
        self.runtime.as_ref().expect("the runtime lives until the store is dropped")
    }

    /// Runs `f` on the store's runtime (what needs one: connecting, pool
    /// timers) and waits for it, from any thread.
    fn on_runtime<T: Send + 'static>(&self, f: impl Future<Output = T> + Send + 'static) -> Result<T, StoreError> {
        futures_executor::block_on(self.runtime().spawn(f))
            .map_err(|e| StoreError::Database(format!("the store's runtime failed: {e}")))
    }

    fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        let pool = self.pool.clone();
        self.on_runtime(async move { pool.get().await })?.map_err(|e| match e {
            deadpool_postgres::PoolError::Backend(e) => pg_error(e),
            e => StoreError::Database(format!("no connection to PostgreSQL: {e}")),
        })
    }

    /// Connects to the database at `url` (`postgres://user@host/db`, or
    /// `postgresql:///db?host=/run/postgresql` for a Unix socket) and brings
    /// its schema to `SCHEMA_VERSION`.
    pub fn open(at: &PostgresAt) -> Result<Self, StoreError> {
        let db = Self::connect(at)?;
        db.migrate().map_err(|e| StoreError::Open {
            path: db.described.clone(),
            reason: format!("cannot use its schema: {e}"),
        })?;
        Ok(db)
    }

    /// The pool for the database at `at`, its schema as it is. No
    /// connection is made until the first call.
    fn connect(at: &PostgresAt) -> Result<Self, StoreError> {
        let mut config =
            parse_url(&at.url).map_err(|reason| StoreError::Open { path: "[store] url".into(), reason })?;
        if let Some(password) = &at.password {
            config.password(password.expose());
        }
        limit(&mut config);
        let described = describe(&config);
        let err = |reason: String| StoreError::Open { path: described.clone(), reason };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("wgxdp-store")
            .enable_all()
            .build()
            .map_err(|e| err(format!("cannot start the store's runtime: {e}")))?;
        let manager = Manager::from_config(
            config.clone(),
            tokio_postgres::NoTls,
            ManagerConfig { recycling_method: RecyclingMethod::Fast },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(CONNECT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| err(e.to_string()))?;
        Ok(Self { runtime: Some(runtime), pool, config, described })
    }

    /// Brings the schema to `SCHEMA_VERSION` in one transaction under the
    /// migration lock; a newer version is refused before anything is written.
    fn migrate(&self) -> Result<(), StoreError> {
        let mut version = 0;
        self.transaction(&mut |sql| {
            // Another node's migration may outlast the connection's lock timeout.
            sql.execute(&format!("SET LOCAL lock_timeout = {MIGRATION_WAIT_MS}"), &[])?;
            sql.execute("SELECT pg_advisory_xact_lock(?)", &[SqlValue::Int(MIGRATION_LOCK)])?;
            version = schema_version(sql)?;
            refuse_newer_schema(version).map_err(StoreError::Database)?;
            // A schema already whole is left alone: DDL would take strong
            // locks on busy tables, and needs a role that owns them.
            if version == SCHEMA_VERSION && schema_is_whole(sql)? {
                return Ok(());
            }
            for statement in schema::tables(Dialect::Postgres).split(';').filter(|s| !s.trim().is_empty()) {
                sql.execute(statement, &[])?;
            }
            for (table, added) in schema::ADDED_COLUMNS {
                for (name, declaration) in added {
                    sql.execute(&format!("ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {name} {declaration}"), &[])?;
                }
            }
            for (_, index) in schema::ADDED_INDEXES {
                sql.execute(index, &[])?;
            }
            sql.execute("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)", &[])?;
            if version < SCHEMA_VERSION {
                sql.execute("DELETE FROM schema_version", &[])?;
                sql.execute("INSERT INTO schema_version (version) VALUES (?)", &[SqlValue::Int(SCHEMA_VERSION)])?;
            }
            Ok(())
        })?;
        schema::log_migrated(version);
        Ok(())
    }
}

/// The schema version of a database (0 for one wgxdp never used).
fn schema_version(sql: &dyn Sql) -> Result<i64, StoreError> {
    let table = sql.query_one("SELECT to_regclass('schema_version') IS NOT NULL", &[])?;
    if table.int(0).map_err(StoreError::Database)? == 0 {
        return Ok(0);
    }
    let row = sql.query_one("SELECT COALESCE(MAX(version), 0) FROM schema_version", &[])?;
    row.int(0).map_err(StoreError::Database)
}

/// The schema version of the database at `at`, read without writing
/// (`wgxdp check`); 0 for a database wgxdp never used.
pub fn schema_version_at(at: &PostgresAt) -> Result<i64, String> {
    let db = PostgresDb::connect(at).map_err(|e| e.to_string())?;
    super::sql::run(&db, false, schema_version).map_err(|e| match e {
        StoreError::Database(reason) => reason,
        e => e.to_string(),
    })
}

/// The bounds every connection of the store has: connect, statement and
/// lock timeouts, TCP keepalives and a user timeout (a silent server fails
/// calls instead of hanging them). Options the URL gives come first.
fn limit(config: &mut tokio_postgres::Config) {
    let options = format!(
        "{} -c statement_timeout={STATEMENT_TIMEOUT_MS} -c lock_timeout={LOCK_TIMEOUT_MS}",
        config.get_options().unwrap_or_default()
    );
    config
        .connect_timeout(CONNECT_TIMEOUT)
        .application_name("wgxdp")
        .options(options.trim_start())
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(5))
        .tcp_user_timeout(DEAD_PEER);
}

/// The hosts of `config` that are reached over a network without TLS: TCP
/// hosts other than this machine's loopback (this build speaks no TLS to
/// PostgreSQL; a Unix socket or loopback never leaves the host).
pub fn plaintext_hosts(config: &tokio_postgres::Config) -> Vec<String> {
    let addresses = config.get_hostaddrs();
    let names = config.get_hosts().iter().enumerate().filter_map(|(i, h)| match h {
        // A `hostaddr` is where the connection goes; the name is then only
        // for authentication.
        tokio_postgres::config::Host::Tcp(_) if addresses.get(i).is_some() => None,
        tokio_postgres::config::Host::Tcp(name) => {
            let loopback = name == "localhost" || name.parse::<std::net::IpAddr>().is_ok_and(|a| a.is_loopback());
            (!loopback).then(|| name.clone())
        }
        tokio_postgres::config::Host::Unix(_) => None,
    });
    let addresses = addresses.iter().filter(|a| !a.is_loopback()).map(ToString::to_string);
    names.chain(addresses).collect()
}

/// The connection settings `url` gives; an error that never repeats the URL
/// (it may hold a password).
pub fn parse_url(url: &str) -> Result<tokio_postgres::Config, String> {
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err("not a PostgreSQL URL: it starts with postgres:// or postgresql://".into());
    }
    url.parse().map_err(|e| format!("not a PostgreSQL URL: {e}"))
}

/// Every table, index and added column of the schema is there.
fn schema_is_whole(sql: &dyn Sql) -> Result<bool, StoreError> {
    let objects = schema::objects();
    let marks = vec!["?"; objects.len()].join(", ");
    let args: Vec<SqlValue> = objects.iter().map(|o| SqlValue::from(*o)).collect();
    let found = sql.query_one(
        &format!(
            "SELECT COUNT(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = current_schema() AND c.relname IN ({marks})"
        ),
        &args,
    )?;
    let columns: Vec<(&str, &str)> =
        schema::ADDED_COLUMNS.iter().flat_map(|(t, added)| added.iter().map(move |(c, _)| (*t, *c))).collect();
    let pairs = vec!["(?, ?)"; columns.len()].join(", ");
    let args: Vec<SqlValue> = columns.iter().flat_map(|(t, c)| [SqlValue::from(*t), SqlValue::from(*c)]).collect();
    let added = sql.query_one(
        &format!(
            "SELECT COUNT(*) FROM information_schema.columns
             WHERE table_schema = current_schema() AND (table_name, column_name) IN ({pairs})"
        ),
        &args,
    )?;
    let count = |r: &Row| r.int(0).map_err(StoreError::Database);
    Ok(count(&found)? == objects.len() as i64 && count(&added)? == columns.len() as i64)
}

/// Where the database is, without the password.
pub fn describe(config: &tokio_postgres::Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(name) => name.clone(),
            tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    format!(
        "PostgreSQL {}@{}/{}",
        config.get_user().unwrap_or("(default user)"),
        hosts.join(","),
        config.get_dbname().unwrap_or("(default database)")
    )
}

#[cfg(test)]
mod tests {
    //! What only the PostgreSQL backend has: its schema version table and
    //! its migration lock (the conformance suite is in `store::tests`).
    use super::super::testing::TestDb;
    use super::super::{sample, Store, StoreLocation};
    use super::*;
    use wgxdp_integration::postgres::Cluster;

    fn url(db: &TestDb) -> &str {
        let StoreLocation::Postgres(at) = &db.location else { unreachable!("a PostgreSQL test database") };
        &at.url
    }

    /// A new database gets the current version; one a newer wgxdp wrote is
    /// refused, naming both versions, with nothing written; the rows stay.
    #[test]
    fn the_schema_is_versioned_and_a_newer_one_is_refused() {
        let db = TestDb::postgres();
        let store = db.open();
        store.insert(sample("kept", "K1")).unwrap();
        drop(store);
        let cluster = Cluster::shared();
        assert_eq!(cluster.psql_at(url(&db), "SELECT version FROM schema_version"), SCHEMA_VERSION.to_string());
        let newer = SCHEMA_VERSION + 1;
        cluster.psql_at(url(&db), &format!("UPDATE schema_version SET version = {newer}; DROP INDEX events_kind"));
        let refused = Store::open_at(&db.location).map(|_| ()).unwrap_err().to_string();
        for says in [format!("version {newer}"), format!("up to {SCHEMA_VERSION}"), "newer wgxdp".to_owned()] {
            assert!(refused.contains(&says), "{refused:?} should say {says:?}");
        }
        let left = "SELECT (SELECT version FROM schema_version), to_regclass('events_kind') IS NULL";
        assert_eq!(cluster.psql_at(url(&db), left), format!("{newer}|t"), "left as it was: nothing remade");
        cluster.psql_at(url(&db), &format!("UPDATE schema_version SET version = {SCHEMA_VERSION}"));
        let store = db.open();
        assert_eq!(store.live().unwrap().len(), 1, "the rows are intact");
        assert_eq!(cluster.psql_at(url(&db), "SELECT to_regclass('events_kind') IS NOT NULL"), "t", "remade");
    }

    /// The write lock excludes: while one node holds it, another's
    /// `exclusive` waits, and takes it once the first lets go.
    #[test]
    fn the_write_lock_is_held_by_one_node_at_a_time() {
        let db = TestDb::postgres();
        let (a, b) = (db.open(), db.open());
        let held = a.exclusive().unwrap();
        let taken = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            let waiter = s.spawn(|| {
                let _lock = b.exclusive().unwrap();
                taken.store(true, std::sync::atomic::Ordering::SeqCst);
            });
            std::thread::sleep(Duration::from_millis(300));
            assert!(!taken.load(std::sync::atomic::Ordering::SeqCst), "taken while the other node held it");
            drop(held);
            waiter.join().unwrap();
        });
        assert!(taken.into_inner());
        drop(a.exclusive().expect("free again"));
    }

    /// Nodes that start together on a new database migrate one at a time
    /// (the advisory lock): every open succeeds and one version row is left.
    #[test]
    fn nodes_that_start_together_migrate_once() {
        let db = TestDb::postgres();
        std::thread::scope(|s| {
            let opens: Vec<_> = (0..4).map(|_| s.spawn(|| Store::open_at(&db.location).map(|_| ()))).collect();
            for open in opens {
                open.join().unwrap().unwrap();
            }
        });
        let rows = Cluster::shared().psql_at(url(&db), "SELECT COUNT(*), MIN(version) FROM schema_version");
        assert_eq!(rows, format!("1|{SCHEMA_VERSION}"));
    }

    /// Tables and indexes removed by hand are made again at the next open.
    #[test]
    fn what_was_removed_by_hand_is_made_again_at_open() {
        let db = TestDb::postgres();
        drop(db.open());
        let cluster = Cluster::shared();
        cluster.psql_at(url(&db), "DROP TABLE idempotency; DROP INDEX gateways_live_key");
        cluster.psql_at(url(&db), "ALTER TABLE gateways DROP COLUMN firewall_default");
        let store = db.open();
        store.insert(sample("a", "K1")).unwrap();
        assert!(
            matches!(store.insert(sample("b", "K1")), Err(super::super::StoreError::DuplicateKey)),
            "the unique index is back"
        );
        assert_eq!(cluster.psql_at(url(&db), "SELECT to_regclass('idempotency') IS NOT NULL"), "t");
        assert_eq!(
            store.live().unwrap()[0].firewall_default,
            wgxdp_dataplane::policy::RuleAction::Allow,
            "column back"
        );
    }

    /// A whole schema is left alone at open (no DDL): a role that may only
    /// read and write the rows, not change the tables, runs a node.
    #[test]
    fn a_role_that_owns_no_table_can_run_a_node_on_a_whole_schema() {
        let db = TestDb::postgres();
        drop(db.open());
        let role = wgxdp_integration::unique_name("wg_app_");
        let cluster = Cluster::shared();
        cluster.psql_at(
            url(&db),
            &format!(
                "CREATE ROLE {role} LOGIN; GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role};
                 GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}"
            ),
        );
        let as_app = url(&db).replace("user=postgres", &format!("user={role}"));
        let store = Store::open_at(&StoreLocation::Postgres(PostgresAt::url(as_app))).expect("opens without DDL");
        store.insert(sample("a", "K1")).unwrap();
        assert_eq!(store.live().unwrap().len(), 1);
    }

    #[test]
    fn plaintext_hosts_are_the_tcp_hosts_off_this_machine() {
        let hosts = |url: &str| plaintext_hosts(&parse_url(url).unwrap());
        assert_eq!(hosts("postgres://u@db.example/x"), ["db.example"]);
        assert_eq!(hosts("postgres://u@10.0.0.5,127.0.0.1/x"), ["10.0.0.5"]);
        assert!(hosts("postgres://u@localhost/x").is_empty());
        assert!(hosts("postgres://u@[::1]:5433/x").is_empty());
        assert!(hosts("postgresql:///x?host=/run/postgresql").is_empty());
        assert_eq!(hosts("postgres://u@localhost/x?hostaddr=10.0.0.5"), ["10.0.0.5"], "hostaddr is where it goes");
        assert!(hosts("postgres://u@db.example/x?hostaddr=127.0.0.1").is_empty());
    }

    /// Every connection gets the store's timeouts, after the URL's options.
    #[test]
    fn connections_are_bounded() {
        let mut config = parse_url("postgres://u@localhost/x?options=-c%20search_path%3Dwg").unwrap();
        limit(&mut config);
        let options = config.get_options().unwrap();
        assert!(options.starts_with("-c search_path=wg "), "{options}");
        assert!(options.contains("statement_timeout=15000") && options.contains("lock_timeout=5000"), "{options}");
        assert_eq!(config.get_tcp_user_timeout(), Some(&DEAD_PEER));
        assert!(config.get_keepalives());
    }

    #[test]
    fn placeholders_are_numbered_in_order() {
        assert_eq!(numbered("SELECT ? WHERE a = ? AND b IN (?, ?)"), "SELECT $1 WHERE a = $2 AND b IN ($3, $4)");
        assert_eq!(numbered("SELECT 1"), "SELECT 1");
    }

    #[test]
    fn a_url_is_described_without_its_password() {
        let config: tokio_postgres::Config = "postgres://wg:hunter2@db.example:5433/fleet".parse().unwrap();
        let d = describe(&config);
        assert_eq!(d, "PostgreSQL wg@db.example/fleet");
        assert!(!d.contains("hunter2"));
        for bad in ["postgres://wg:hunter2@[::1", "mysql://wg:hunter2@db/x", "hunter2"] {
            let e = PostgresDb::open(&PostgresAt::url(bad)).unwrap_err().to_string();
            assert!(!e.contains("hunter2") && e.contains("[store] url"), "{e}");
        }
    }
}
