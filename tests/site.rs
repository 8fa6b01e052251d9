//! The site-to-site topology every gateway scenario uses, and a `wgxdp serve`
//! process to run in it:
//!
//! ```text
//!  client ns                 gateway ns                      lan ns
//!  wireguard-go  10.100.0.2 ─ 10.100.0.1 [wgxdp] 10.50.0.1 ─ 10.50.0.2
//!  tunnel addr   10.200.0.2                      fd50::1   ─ fd50::2
//!                fd20::2
//! ```
//!
//! The LAN host routes the tunnel prefixes (10.200.0.0/16, fd20::/64) via the
//! gateway. Used by the end-to-end tests, `cargo xtask demo` and bench-e2e.

use crate::{veth_pair, Netns, WireguardGo};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};
use wgxdp_dataplane::noise::{PrivateKey, PublicKey};

pub const CLIENT_WAN: &str = "10.100.0.2";
pub const GATEWAY_WAN: &str = "10.100.0.1";
pub const GATEWAY_LAN: &str = "10.50.0.1";
pub const LAN_HOST: &str = "10.50.0.2";
pub const LAN_HOST_V6: &str = "fd50::2";
pub const SITE_CIDR: &str = "10.50.0.0/24";
pub const CLIENT_TUNNEL: &str = "10.200.0.2";
pub const CLIENT_TUNNEL_V6: &str = "fd20::2";
pub const LISTEN_PORT: u16 = 51820;

#[derive(Debug)]
pub struct SiteTopology {
    pub client: Netns,
    pub gateway: Netns,
    pub lan: Netns,
    pub client_if: String,
    pub gateway_wan: String,
    pub gateway_lan: String,
    pub lan_if: String,
    /// The gateway's `wg(8)` interface name (its socket in /var/run/wireguard
    /// is global, so unique per topology).
    pub wg_name: String,
}

impl SiteTopology {
    pub fn new(prefix: &str) -> Self {
        let client = Netns::new(&format!("{prefix}c"));
        let gateway = Netns::new(&format!("{prefix}g"));
        let lan = Netns::new(&format!("{prefix}l"));
        let (client_if, gateway_wan) =
            veth_pair(&client, &format!("{CLIENT_WAN}/24"), &gateway, &format!("{GATEWAY_WAN}/24"));
        let (gateway_lan, lan_if) = veth_pair(&gateway, &format!("{GATEWAY_LAN}/24"), &lan, &format!("{LAN_HOST}/24"));
        gateway.ip(&["-6", "addr", "add", "fd50::1/64", "dev", &gateway_lan, "nodad"]);
        lan.ip(&["-6", "addr", "add", &format!("{LAN_HOST_V6}/64"), "dev", &lan_if, "nodad"]);
        lan.ip(&["route", "add", "10.200.0.0/16", "via", GATEWAY_LAN]);
        lan.ip(&["route", "add", "10.100.0.0/24", "via", GATEWAY_LAN]);
        lan.ip(&["-6", "route", "add", "fd20::/64", "via", "fd50::1"]);
        gateway.exec("sysctl", &["-qw", "net.ipv4.ip_forward=1"]);
        // Veth hands over TCP/UDP with checksums left for the NIC to finish; real
        // NICs deliver complete ones. Make the hosts that send into the gateway's
        // XDP interfaces compute them, as a physical link would carry them.
        client.exec("ethtool", &["-K", &client_if, "tx", "off"]);
        lan.exec("ethtool", &["-K", &lan_if, "tx", "off"]);
        static NAMES: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NAMES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let wg_name = format!("wgt{}-{n}", std::process::id() % 100_000);
        Self { client, gateway, lan, client_if, gateway_wan, gateway_lan, lan_if, wg_name }
    }

    /// The `[interface]` section for a gateway in this topology.
    pub fn interface_section(&self, key_file: &Path) -> String {
        format!(
            "[interface]\nwan = \"{}\"\nlan = \"{}\"\nlisten_port = {LISTEN_PORT}\nprivate_key_file = \"{}\"\n\
             name = \"{}\"\n",
            self.gateway_wan,
            self.gateway_lan,
            key_file.display(),
            self.wg_name
        )
    }

    /// A whole `wgxdp serve` configuration for this topology with an `[api]`
    /// section on `listen`, its database at `database`, plus `extra` lines.
    pub fn api_config(&self, key_file: &Path, listen: &str, database: &Path, extra: &str) -> String {
        self.api_config_on(key_file, listen, &StoreAt::Sqlite(database.to_owned()), extra)
    }

    /// `api_config` with its store at `store`.
    pub fn api_config_on(&self, key_file: &Path, listen: &str, store: &StoreAt, extra: &str) -> String {
        let (database, section) = match store {
            StoreAt::Sqlite(path) => (format!("database = \"{}\"\n", path.display()), String::new()),
            StoreAt::Postgres(url) => (String::new(), format!("\n[store]\nurl = \"{url}\"\n")),
        };
        format!(
            "{}\n[api]\nlisten = \"{listen}\"\n{database}site_cidr = \"{SITE_CIDR}\"\n{extra}{section}",
            self.interface_section(key_file),
        )
    }

    /// Starts wireguard-go in the client namespace with `key`, peered with the
    /// gateway (`gateway_key`), tunnel address `tunnel_addr`, routing the site.
    pub fn start_client(&self, key: &PrivateKey, gateway_key: &PublicKey, tunnel_addr: &str) -> WireguardGo {
        let wg = WireguardGo::start(&self.client, &key.to_base64_secret(), 40_001);
        wg.set(&[
            "peer",
            &gateway_key.to_base64(),
            "endpoint",
            &format!("{GATEWAY_WAN}:{LISTEN_PORT}"),
            "allowed-ips",
            "10.50.0.0/24,fd50::/64",
        ]);
        self.client.ip(&["addr", "add", &format!("{tunnel_addr}/32"), "dev", &wg.interface]);
        self.client.ip(&["-6", "addr", "add", &format!("{CLIENT_TUNNEL_V6}/128"), "dev", &wg.interface, "nodad"]);
        self.client.ip(&["link", "set", &wg.interface, "up"]);
        self.client.ip(&["route", "add", SITE_CIDR, "dev", &wg.interface]);
        self.client.ip(&["-6", "route", "add", "fd50::/64", "dev", &wg.interface]);
        wg
    }
}

/// A private directory (mode 0700) removed on drop.
#[derive(Debug)]
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> Self {
        let p = std::env::temp_dir().join(crate::unique_name(prefix));
        std::fs::create_dir_all(&p).expect("create temp dir");
        std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o700)).expect("chmod temp dir");
        Self(p)
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes a fresh private key to `path` with mode 0600.
pub fn write_private_key(path: &Path) -> PrivateKey {
    let key = PrivateKey::generate();
    std::fs::write(path, &*key.to_base64_secret()).expect("write key");
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod key");
    key
}

/// A `wgxdp serve` process in a namespace; killed on drop.
#[derive(Debug)]
pub struct ServeProcess {
    pub child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl ServeProcess {
    /// Starts `wgxdp serve --config <config> --stats-every 1` and waits for it
    /// to say it runs.
    pub fn start(ns: &Netns, wgxdp: &Path, config: &Path, log_dir: &Path) -> Self {
        Self::start_pinned(ns, wgxdp, config, log_dir, None)
    }

    /// As `start`, with the whole process on `cpu` (taskset).
    pub fn start_pinned(ns: &Netns, wgxdp: &Path, config: &Path, log_dir: &Path, cpu: Option<usize>) -> Self {
        let p = Self::spawn(ns, wgxdp, config, log_dir, cpu);
        p.wait_for_output("wgxdp: running", Duration::from_secs(30));
        p
    }

    /// As `start_pinned`, but a process that exits (or stays silent for
    /// `timeout`) before it runs is an `Err` with its error output, not a panic.
    pub fn try_start_pinned(
        ns: &Netns,
        wgxdp: &Path,
        config: &Path,
        log_dir: &Path,
        cpu: Option<usize>,
        timeout: Duration,
    ) -> Result<Self, String> {
        let p = Self::spawn(ns, wgxdp, config, log_dir, cpu);
        let deadline = Instant::now() + timeout;
        while !p.output().contains("wgxdp: running") {
            if p.exited() || Instant::now() >= deadline {
                return Err(p.errors());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(p)
    }

    fn spawn(ns: &Netns, wgxdp: &Path, config: &Path, log_dir: &Path, cpu: Option<usize>) -> Self {
        let n = crate::unique_name("serve");
        let (stdout, stderr) = (log_dir.join(format!("{n}.out")), log_dir.join(format!("{n}.err")));
        let wgxdp = wgxdp.to_str().expect("utf-8 path");
        let mut cmd = match cpu {
            Some(c) => {
                let mut cmd = ns.command("taskset");
                cmd.args(["-c", &c.to_string(), wgxdp]);
                cmd
            }
            None => ns.command(wgxdp),
        };
        let child = cmd
            .args(["serve", "--config", config.to_str().expect("utf-8 path"), "--stats-every", "1"])
            .stdout(std::fs::File::create(&stdout).expect("stdout file"))
            .stderr(std::fs::File::create(&stderr).expect("stderr file"))
            .spawn()
            .expect("start wgxdp serve");
        Self { child, stdout, stderr }
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    pub fn errors(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    pub fn wait_for_output(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.output().contains(needle) {
            assert!(
                Instant::now() < deadline && !self.exited(),
                "`{needle}` not printed{}; stdout:\n{}\nstderr:\n{}",
                if self.exited() { " (wgxdp serve exited)" } else { "" },
                self.output(),
                self.errors()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The process has exited (a zombie not yet reaped, or gone).
    pub fn exited(&self) -> bool {
        match std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())) {
            // The state follows the command name, which is in parentheses.
            Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
            Err(_) => true,
        }
    }

    /// The newest value of `name=` in the printed stats.
    pub fn counter(&self, name: &str) -> u64 {
        let out = self.output();
        let key = format!(" {name}=");
        out.lines()
            .rev()
            .find_map(|l| l.split_once(&key).map(|(_, rest)| rest.split_whitespace().next().unwrap_or("0").to_owned()))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// Waits for a fresh stats line so counters are current.
    pub fn refresh(&self) {
        let n = self.output().matches("stats queue0").count();
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.output().matches("stats queue0").count() == n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid; at worst it fails with ESRCH.
        unsafe { libc::kill(self.child.id() as libc::pid_t, sig) };
    }

    /// SIGTERM and wait for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        self.signal(libc::SIGTERM);
        self.child.wait().expect("wait for wgxdp serve")
    }

    /// SIGTERM and wait at most `limit` for the exit (`None`: still running).
    pub fn terminate_within(&mut self, limit: Duration) -> Option<ExitStatus> {
        self.signal(libc::SIGTERM);
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// SIGKILL (a crash) and wait for the exit.
    pub fn kill9(&mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill9();
        }
    }
}

/// Where a test gateway keeps its store.
#[derive(Debug, Clone)]
pub enum StoreAt {
    /// A SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL database (its URL).
    Postgres(String),
}

/// Where the end-to-end tests' gateways serve the API (in their namespace).
pub const API_LISTEN: &str = "127.0.0.1:8080";

/// A `SiteTopology` with a gateway key and a configuration with an `[api]`
/// section on `API_LISTEN` (database in its private directory), for the
/// tests that drive `wgxdp serve` through its API or its `wg` socket.
#[derive(Debug)]
pub struct ApiSite {
    pub topo: SiteTopology,
    pub dir: TempDir,
    pub config: PathBuf,
    pub gateway_key: PublicKey,
}

impl ApiSite {
    /// `extra`: more lines of the `[api]` section.
    pub fn new(prefix: &str, extra: &str) -> Self {
        Self::on(prefix, extra, None)
    }

    /// `new`, its store on `store` (`None`: a SQLite file in its directory).
    pub fn on(prefix: &str, extra: &str, store: Option<StoreAt>) -> Self {
        crate::require_tools(&["ip", "wireguard-go", "wg", "ping", "ethtool"]);
        let topo = SiteTopology::new(prefix);
        let dir = TempDir::new(&format!("wgxdp-{prefix}"));
        let key_file = dir.join("gw.key");
        let gateway_key = write_private_key(&key_file).public_key();
        let config = dir.join("gw.toml");
        let store = store.unwrap_or_else(|| StoreAt::Sqlite(dir.join("state/wgxdp.db")));
        let text = topo.api_config_on(&key_file, API_LISTEN, &store, extra);
        std::fs::write(&config, text).expect("write the configuration");
        Self { topo, dir, config, gateway_key }
    }

    /// Starts `wgxdp serve` on the configuration and waits for its API.
    pub fn serve(&self, wgxdp: &Path) -> ServeProcess {
        let p = ServeProcess::start(&self.topo.gateway, wgxdp, &self.config, &self.dir.0);
        p.wait_for_output("wgxdp: api listening", Duration::from_secs(10));
        p
    }
}

/// `wgxdp apikey create` for the gateway configured by `config`; the key.
pub fn create_api_key(wgxdp: &Path, config: &Path) -> String {
    let out = std::process::Command::new(wgxdp)
        .args(["apikey", "create", "--name", "harness", "--config", config.to_str().expect("utf-8 path")])
        .output()
        .expect("run wgxdp apikey create");
    assert!(out.status.success(), "wgxdp apikey create: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Calls the API from inside a namespace (where it listens).
#[derive(Debug)]
pub struct ApiClient {
    ns: Netns,
    base: String,
    key: String,
}

impl Clone for ApiClient {
    fn clone(&self) -> Self {
        Self { ns: Netns::attach(&self.ns.name), base: self.base.clone(), key: self.key.clone() }
    }
}

impl ApiClient {
    pub fn new(ns: &Netns, addr: &str, key: &str) -> Self {
        Self { ns: Netns::attach(&ns.name), base: format!("http://{addr}"), key: key.to_owned() }
    }

    /// One request; `Err` only when the server cannot be reached.
    pub fn call(
        &self,
        method: &'static str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<(u16, serde_json::Value), String> {
        let (url, auth) = (format!("{}{path}", self.base), format!("Bearer {}", self.key));
        self.ns.enter(move || call(method, &url, &auth, body))
    }

    /// Runs `f` on a thread inside the namespace with a caller for many requests
    /// (no thread per request: for load generation).
    pub fn with_caller<T: Send + 'static>(
        &self,
        f: impl FnOnce(
                &dyn Fn(&'static str, &str, Option<serde_json::Value>) -> Result<(u16, serde_json::Value), String>,
            ) -> T
            + Send
            + 'static,
    ) -> T {
        let (base, auth) = (self.base.clone(), format!("Bearer {}", self.key));
        self.ns.enter(move || {
            let agent = ureq::AgentBuilder::new().timeout(Duration::from_secs(10)).build();
            let caller = move |method: &'static str, path: &str, body: Option<serde_json::Value>| {
                let req = agent.request(method, &format!("{base}{path}")).set("Authorization", &auth);
                respond(match body {
                    Some(b) => req.send_json(b),
                    None => req.call(),
                })
            };
            f(&caller)
        })
    }
}

fn call(
    method: &str,
    url: &str,
    auth: &str,
    body: Option<serde_json::Value>,
) -> Result<(u16, serde_json::Value), String> {
    let req = ureq::request(method, url).set("Authorization", auth).timeout(Duration::from_secs(10));
    respond(match body {
        Some(b) => req.send_json(b),
        None => req.call(),
    })
}

fn respond(r: Result<ureq::Response, ureq::Error>) -> Result<(u16, serde_json::Value), String> {
    match r {
        Ok(r) => Ok((r.status(), r.into_json().unwrap_or(serde_json::Value::Null))),
        Err(ureq::Error::Status(code, r)) => Ok((code, r.into_json().unwrap_or(serde_json::Value::Null))),
        Err(e) => Err(e.to_string()),
    }
}

/// `len` bytes over TCP between a listener in `listener_ns` on `listen` and a
/// connection from `connector_ns` (towards the listener when `upload`), checked
/// byte for byte on the receiving side.
pub fn tcp_transfer(listener_ns: &Netns, listen: &str, connector_ns: &Netns, upload: bool, seed: u64, len: usize) {
    use crate::{check_stream, send_stream};
    let listener = listener_ns.tcp_listener(listen);
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().expect("accept");
        s.set_read_timeout(Some(Duration::from_secs(30))).expect("read timeout");
        if upload {
            check_stream(&mut s, seed, len)
        } else {
            send_stream(&mut s, seed, len).map_err(|e| e.to_string())
        }
    });
    let mut c = connector_ns.tcp_connect(listen, Duration::from_secs(10)).expect("connect through the tunnel");
    c.set_read_timeout(Some(Duration::from_secs(30))).expect("read timeout");
    let client_result = if upload {
        let r = send_stream(&mut c, seed, len).map_err(|e| e.to_string());
        drop(c);
        r
    } else {
        check_stream(&mut c, seed, len)
    };
    client_result.expect("client side of the transfer");
    server.join().expect("transfer server thread").expect("server side of the transfer");
}

/// `ping -I src dst` from `ns`; true if at least `min` of `count` replies came back.
pub fn ping_from(ns: &Netns, src: &str, dst: &str, count: u32, min: u32) -> bool {
    let count = count.to_string();
    ns.ping_with(&["-c", &count, "-i", "0.2", "-W", "1", "-I", src, dst]).0 >= min
}
