//! A real PostgreSQL for tests: Debian's server (`/usr/lib/postgresql/*/bin`),
//! one cluster per test process, `initdb` into a temporary directory,
//! listening only on a Unix socket there. Each test takes a database of its
//! own (`database()`). The server is watched by a shell whose standard input
//! is a pipe from this process: when the process ends, however it ends, the
//! pipe closes and the shell stops the server and removes the directory.

use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The port the socket is named after (nothing listens on TCP).
const PORT: u16 = 5432;

#[derive(Debug)]
pub struct Cluster {
    dir: PathBuf,
    bin: PathBuf,
    /// Closing it (at exit) stops the server.
    _watch: Mutex<(Child, ChildStdin)>,
}

/// Where Debian installs the server's programs (the newest version).
fn server_bin() -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|bin| bin.join("initdb").exists() && bin.join("postgres").exists())
        .collect();
    found.sort_by_key(|p| p.parent().and_then(|v| v.file_name()?.to_str()?.parse::<u32>().ok()).unwrap_or(0));
    found.pop().expect(
        "PostgreSQL's server is not installed (/usr/lib/postgresql/*/bin/initdb): `cargo xtask setup` installs it",
    )
}

/// `command` as the user the server runs as: `postgres` when this process
/// is root (the server refuses root), this user otherwise.
fn as_server_user(program: &Path) -> Command {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn checked(mut c: Command, what: &str) {
    let out = c.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Cluster {
    /// The cluster of this test process, started on first use.
    pub fn shared() -> &'static Cluster {
        static CLUSTER: OnceLock<Cluster> = OnceLock::new();
        CLUSTER.get_or_init(Cluster::start)
    }

    fn start() -> Cluster {
        let bin = server_bin();
        let dir = std::env::temp_dir().join(crate::unique_name("wgxdp-pg-"));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            let mut chown = Command::new("chown");
            chown.arg("postgres:postgres").arg(&dir);
            checked(chown, "chown");
        }
        let data = dir.join("data");
        let mut initdb = as_server_user(&bin.join("initdb"));
        initdb.arg("-D").arg(&data).args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"]);
        // A linguistic default collation (ICU, English), as production
        // servers often have: orders that depend on it differ from byte
        // order ("a" < "B" < "b"), so the store must not.
        initdb.args(["--locale=C.UTF-8", "--locale-provider=icu", "--icu-locale=en-US"]);
        checked(initdb, "initdb");
        // The watcher: starts the server, waits for its standard input to
        // close (this process gone), then stops it and removes the directory.
        // Signals to the test's process group (a `timeout`) are ignored: only
        // the pipe's end stops the watcher, so the directory always goes.
        let script = r#"
            trap '' INT TERM HUP
            "$1/postgres" -D "$2/data" -k "$2" -p "$3" -c listen_addresses='' -c max_connections=200 \
                >"$2/server.log" 2>&1 &
            server=$!
            cat >/dev/null
            kill -INT "$server"
            wait "$server"
            rm -rf "$2"
        "#;
        let mut watch = as_server_user(Path::new("/bin/sh"));
        watch.args(["-c", script, "sh"]).arg(&bin).arg(&dir).arg(PORT.to_string());
        let mut child = watch.stdin(Stdio::piped()).stdout(Stdio::null()).spawn().expect("start the server's watcher");
        let stdin = child.stdin.take().expect("a pipe");
        let cluster = Cluster { dir, bin, _watch: Mutex::new((child, stdin)) };
        cluster.wait_ready();
        cluster
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ready = Command::new(self.bin.join("pg_isready"))
                .arg("-h")
                .arg(&self.dir)
                .args(["-p", &PORT.to_string(), "-q"])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return;
            }
            let log = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
            assert!(Instant::now() < deadline, "PostgreSQL did not start within 60 s:\n{log}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `sql` as the superuser in database `postgres`.
    pub fn psql(&self, sql: &str) {
        let mut c = Command::new(self.bin.join("psql"));
        c.arg("-h").arg(&self.dir).args(["-p", &PORT.to_string(), "-U", "postgres", "-d", "postgres"]);
        c.args(["-v", "ON_ERROR_STOP=1", "-q", "-c", sql]);
        checked(c, &format!("psql {sql}"));
    }

    /// Runs `sql` in the database at `url` (`database()`'s) as the
    /// superuser; its output, unaligned, one row per line.
    pub fn psql_at(&self, url: &str, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args(["-d", url, "-v", "ON_ERROR_STOP=1", "-q", "-A", "-t", "-c", sql])
            .output()
            .expect("psql runs");
        assert!(out.status.success(), "psql {sql}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Every row of the database at `url`, as `pg_dump` writes them.
    pub fn dump(&self, url: &str) -> String {
        let out =
            Command::new(self.bin.join("pg_dump")).args(["--data-only", "-d", url]).output().expect("pg_dump runs");
        assert!(out.status.success(), "pg_dump: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A new, empty database; its URL (the Unix socket, no password).
    pub fn database(&self) -> String {
        let name = crate::unique_name("t").replace('-', "_").to_lowercase();
        self.psql(&format!("CREATE DATABASE {name}"));
        self.url(&name)
    }

    /// The URL of database `name`.
    pub fn url(&self, name: &str) -> String {
        format!("postgresql:///{name}?host={}&port={PORT}&user=postgres", self.dir.display())
    }

    /// What the server logged (for a failing test's message).
    pub fn server_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }
}
