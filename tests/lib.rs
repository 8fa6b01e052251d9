//! Test harness for tests that need real network plumbing: network namespaces
//! joined by veth pairs, a wireguard-go peer, and sockets opened inside a
//! namespace. Everything created here is removed on drop.
//!
//! These tests need root, `ip`, `wireguard-go` and `wg`. `cargo xtask test`
//! installs them; when run without them, the tests fail with a message saying
//! what is missing (they never pass vacuously).

use std::fs::File;
use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub mod blast;
pub mod events;
pub mod fleet;
pub mod hostile;
pub mod icmp;
pub mod postgres;
pub mod site;

/// Runs a command, panicking with its output if it fails.
pub fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Fails the test (with the fix) if a prerequisite is missing.
pub fn require_tools(tools: &[&str]) {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "network-namespace tests need root (run `cargo xtask test` as root)");
    for t in tools {
        let found = Command::new("sh").args(["-c", &format!("command -v {t}")]).output().map(|o| o.status.success());
        assert!(found.unwrap_or(false), "`{t}` is not installed: run `cargo xtask setup` first");
    }
}

/// A short name unique to this process and call, for namespaces and interfaces
/// (Linux interface names are at most 15 bytes).
pub fn unique_name(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{prefix}{}{}", std::process::id() % 100_000, N.fetch_add(1, Ordering::Relaxed))
}

/// A network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
    /// Deleted on drop only if this handle created it.
    owned: bool,
}

impl Netns {
    pub fn new(prefix: &str) -> Self {
        let name = unique_name(prefix);
        run("ip", &["netns", "add", &name]);
        let ns = Self { name, owned: true };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// A handle on an existing namespace (e.g. for another thread); not deleted on drop.
    pub fn attach(name: &str) -> Self {
        Self { name: name.to_owned(), owned: false }
    }

    /// `ip -n NAME ...`
    pub fn ip(&self, args: &[&str]) -> String {
        let mut a = vec!["-n", self.name.as_str()];
        a.extend_from_slice(args);
        run("ip", &a)
    }

    /// `ip netns exec NAME cmd args...`, returning stdout (panics on failure).
    pub fn exec(&self, cmd: &str, args: &[&str]) -> String {
        let mut a = vec!["netns", "exec", self.name.as_str(), cmd];
        a.extend_from_slice(args);
        run("ip", &a)
    }

    /// A command to run inside the namespace.
    pub fn command(&self, cmd: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, cmd]);
        c
    }

    /// Runs `f` on a thread that has entered this namespace; sockets it opens
    /// stay in the namespace afterwards, whichever thread uses them.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: `file` is an open namespace file descriptor for the duration
            // of the call; setns only affects this (short-lived) thread.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns({path}): {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .expect("thread inside the namespace panicked")
    }

    /// A TCP listener bound inside this namespace.
    pub fn tcp_listener(&self, addr: &str) -> std::net::TcpListener {
        let addr = addr.to_owned();
        self.enter(move || std::net::TcpListener::bind(&addr).unwrap_or_else(|e| panic!("listen {addr}: {e}")))
    }

    /// A TCP connection made from inside this namespace.
    pub fn tcp_connect(&self, addr: &str, timeout: Duration) -> std::io::Result<std::net::TcpStream> {
        let addr: std::net::SocketAddr = addr.parse().expect("socket address");
        self.enter(move || std::net::TcpStream::connect_timeout(&addr, timeout))
    }

    /// `ping` from this namespace; true if at least `min_replies` of `count` came back.
    pub fn ping(&self, dst: &str, count: u32, min_replies: u32) -> bool {
        let count = count.to_string();
        self.ping_with(&["-c", &count, "-i", "0.2", "-W", "2", dst]).0 >= min_replies
    }

    /// `ping ARGS` from this namespace: how many replies came back, and
    /// ping's output.
    pub fn ping_with(&self, args: &[&str]) -> (u32, String) {
        let out = self.command("ping").args(args).output().expect("run ping");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let received = text
            .split(',')
            .find_map(|part| part.trim().strip_suffix(" received").and_then(|n| n.trim().parse::<u32>().ok()))
            .unwrap_or(0);
        (received, text)
    }

    /// A UDP socket bound inside this namespace.
    pub fn udp_socket(&self, addr: &str) -> UdpSocket {
        let addr = addr.to_owned();
        self.enter(move || UdpSocket::bind(&addr).unwrap_or_else(|e| panic!("bind {addr}: {e}")))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// Joins two namespaces with a veth pair and gives each end an IPv4 address
/// (a /24 whose first three octets are `net`), plus optional IPv6 (`fdXX::1/64`
/// style prefixes given whole).
pub fn veth_pair(a: &Netns, a_addr: &str, b: &Netns, b_addr: &str) -> (String, String) {
    let (ea, eb) = (unique_name("va"), unique_name("vb"));
    run("ip", &["link", "add", &ea, "netns", &a.name, "type", "veth", "peer", "name", &eb, "netns", &b.name]);
    a.ip(&["addr", "add", a_addr, "dev", &ea]);
    b.ip(&["addr", "add", b_addr, "dev", &eb]);
    a.ip(&["link", "set", &ea, "up"]);
    b.ip(&["link", "set", &eb, "up"]);
    (ea, eb)
}

/// Userspace WireGuard implementations driven through `wg`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Userspace {
    WireguardGo,
    Boringtun,
}

impl Userspace {
    pub fn binary(self) -> &'static str {
        match self {
            Userspace::WireguardGo => "wireguard-go",
            Userspace::Boringtun => "boringtun-cli",
        }
    }
}

/// A wireguard-go (or boringtun) instance in a namespace; stopped (SIGTERM) on drop.
#[derive(Debug)]
pub struct WireguardGo {
    pub interface: String,
    child: Child,
    log: PathBuf,
    key_file: PathBuf,
}

impl WireguardGo {
    /// Starts wireguard-go on a fresh interface in `ns`, with `private_key`
    /// (base64), listening on `port`.
    pub fn start(ns: &Netns, private_key: &str, port: u16) -> Self {
        Self::start_pinned(ns, private_key, port, None)
    }

    /// As `start`, with every thread of wireguard-go on `cpu` (taskset).
    pub fn start_pinned(ns: &Netns, private_key: &str, port: u16, cpu: Option<usize>) -> Self {
        Self::start_program(ns, Userspace::WireguardGo, private_key, port, cpu)
    }

    /// Starts a userspace WireGuard that speaks the same control protocol as
    /// wireguard-go (`wg set`), optionally pinned to `cpu`.
    pub fn start_program(ns: &Netns, program: Userspace, private_key: &str, port: u16, cpu: Option<usize>) -> Self {
        let interface = unique_name("wgi");
        let log = std::env::temp_dir().join(format!("{interface}.log"));
        let key_file = std::env::temp_dir().join(format!("{interface}.key"));
        std::fs::write(&key_file, private_key).expect("write key file");
        let mut cmd = match cpu {
            Some(c) => {
                let mut cmd = ns.command("taskset");
                cmd.args(["-c", &c.to_string(), program.binary()]);
                cmd
            }
            None => ns.command(program.binary()),
        };
        match program {
            Userspace::WireguardGo => cmd.args(["-f", &interface]),
            Userspace::Boringtun => cmd.args(["--foreground", "--disable-drop-privileges", &interface]),
        };
        let child = cmd
            .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1")
            .env("LOG_LEVEL", "debug")
            .stdout(File::create(&log).expect("log file"))
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", program.binary()));
        let sock = PathBuf::from(format!("/var/run/wireguard/{interface}.sock"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            assert!(Instant::now() < deadline, "wireguard-go did not create {}", sock.display());
            std::thread::sleep(Duration::from_millis(20));
        }
        let wg = Self { interface, child, log, key_file };
        wg.set(&["private-key", wg.key_file.to_str().expect("utf-8 path"), "listen-port", &port.to_string()]);
        wg
    }

    /// `wg set IFACE args...`
    pub fn set(&self, args: &[&str]) {
        let mut a = vec!["set", self.interface.as_str()];
        a.extend_from_slice(args);
        run("wg", &a);
    }

    /// `wg show IFACE what` (e.g. "transfer", "latest-handshakes").
    pub fn show(&self, what: &str) -> String {
        run("wg", &["show", &self.interface, what])
    }

    /// (rx, tx) bytes of the first peer, from `wg show transfer`.
    pub fn transfer(&self) -> (u64, u64) {
        let s = self.show("transfer");
        let f: Vec<&str> = s.split_whitespace().collect();
        assert!(f.len() >= 3, "unexpected `wg show transfer` output: {s:?}");
        (f[1].parse().expect("rx bytes"), f[2].parse().expect("tx bytes"))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The process id (`ip netns exec` and `taskset` exec in place, so this
    /// is wireguard-go or boringtun itself).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for WireguardGo {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid; at worst it fails with ESRCH.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.key_file);
        let _ = std::fs::remove_file(&self.log);
        let _ = std::fs::remove_file(format!("/var/run/wireguard/{}.sock", self.interface));
    }
}

/// The XDP object built by `cargo xtask build-ebpf`.
pub fn xdp_object() -> Vec<u8> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../ebpf/target/bpfel-unknown-none/release/wgxdp");
    std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}; run `cargo xtask build-ebpf` first"))
}

/// A deterministic byte stream (xorshift), so two ends can check a transfer
/// without holding it in memory.
#[derive(Debug, Clone)]
pub struct TestStream(u64);

impl TestStream {
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            chunk.copy_from_slice(&self.0.to_le_bytes()[..chunk.len()]);
        }
    }
}

/// Sends `len` bytes of `TestStream::new(seed)` on `w`.
pub fn send_stream(w: &mut impl std::io::Write, seed: u64, len: usize) -> std::io::Result<()> {
    let mut s = TestStream::new(seed);
    let mut buf = vec![0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len());
        s.fill(&mut buf[..n]);
        w.write_all(&buf[..n])?;
        left -= n;
    }
    w.flush()
}

/// Reads from `r` until EOF and checks it is exactly `len` bytes of the stream.
/// Returns a description of the first difference, if any.
pub fn check_stream(r: &mut impl std::io::Read, seed: u64, len: usize) -> Result<(), String> {
    let mut s = TestStream::new(seed);
    let mut got = vec![0u8; 64 * 1024];
    let mut want = vec![0u8; 64 * 1024];
    let mut total = 0usize;
    let mut pending = 0usize; // bytes of `want` generated but not yet compared
    let mut want_off = 0usize;
    loop {
        let n = r.read(&mut got).map_err(|e| format!("read after {total} bytes: {e}"))?;
        if n == 0 {
            break;
        }
        let mut i = 0;
        while i < n {
            if pending == 0 {
                let m = want.len().min(len.saturating_sub(total).max(1));
                s.fill(&mut want[..m]);
                pending = m;
                want_off = 0;
            }
            let k = (n - i).min(pending);
            if got[i..i + k] != want[want_off..want_off + k] || total + k > len {
                return Err(format!("data differs at byte {}", total));
            }
            i += k;
            total += k;
            pending -= k;
            want_off += k;
        }
    }
    if total != len {
        return Err(format!("received {total} bytes, expected {len}"));
    }
    Ok(())
}

/// Convenience: an IPv4 address from a string literal.
pub fn v4(s: &str) -> Ipv4Addr {
    s.parse().expect("IPv4 literal")
}
