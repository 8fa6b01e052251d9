//! Test fixtures: a store on each backend, opened (and reopened) like a
//! restarted `serve` would. `each_backend` runs one test body on SQLite and
//! on a real PostgreSQL (`wgxdp_integration::postgres`): the contract both
//! must keep.

use super::{random_id, PostgresAt, Store, StoreLocation};

/// A database made for one test: a temporary SQLite file, or a new database
/// in the test process's PostgreSQL cluster.
#[derive(Debug)]
pub struct TestDb {
    pub location: StoreLocation,
}

impl TestDb {
    pub fn sqlite() -> Self {
        let path = std::env::temp_dir().join(format!("{}.db", random_id("wgxdp-store-")));
        Self { location: StoreLocation::Sqlite(path) }
    }

    pub fn postgres() -> Self {
        let url = wgxdp_integration::postgres::Cluster::shared().database();
        Self { location: StoreLocation::Postgres(PostgresAt::url(url)) }
    }

    /// Opens the store, as `serve` does at start.
    pub fn open(&self) -> Store {
        Store::open_at(&self.location).unwrap_or_else(|e| panic!("open {:?}: {e}", self.location))
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        // PostgreSQL's databases go with the cluster's directory at exit.
        if let StoreLocation::Sqlite(path) = &self.location {
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
            }
        }
    }
}

/// Runs `test` on a new database of each backend, SQLite first; a failure
/// names the backend.
pub fn each_backend(test: impl Fn(&TestDb)) {
    for (name, make) in [("SQLite", TestDb::sqlite as fn() -> TestDb), ("PostgreSQL", TestDb::postgres)] {
        let db = make();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| test(&db)));
        if let Err(panic) = outcome {
            eprintln!("^ failed on {name}");
            std::panic::resume_unwind(panic);
        }
    }
}
