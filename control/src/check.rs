//! `wgxdp check --config FILE`: everything `serve` would check before it
//! attaches anything, plus what the NICs support, one line per check
//! (`ok`, `warning` or `error`), without attaching, binding a socket for long
//! or creating a file. The configuration is validated by `Config::parse_with`
//! itself (a key file's problem is reported and a stand-in key lets the rest
//! be validated too); the interface checks read sysfs, rtnetlink, the
//! kernel's `netdev` generic-netlink family and ethtool, which need no root.

use crate::config::{self, Config, ConfigError, WgSocket};
use crate::uapi::SocketState;
use std::cell::RefCell;
use std::fmt;
use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use wgxdp_dataplane::gateway::{
    check_tunnel_mtu, interface_addresses, interface_networks, max_received_mtu, queue_count, usable_cores, CryptoPlan,
};
use wgxdp_dataplane::loader::{attached_programs, AttachedXdp};
use wgxdp_dataplane::nic::{self, NicError, XdpFeatures};
use wgxdp_dataplane::noise::{PresharedKey, PrivateKey};
use wgxdp_dataplane::xsk::XskConfig;

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Ok,
    /// `serve` runs, but not as well as it could, or something may surprise.
    Warning,
    /// `serve` refuses to start, or traffic will not flow.
    Error,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Ok => "ok",
            Severity::Warning => "warning",
            Severity::Error => "error",
        }
    }
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub severity: Severity,
    /// What was checked (`config`, `wan eth0 mtu`, …).
    pub check: String,
    pub message: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:<7} {}: {}", self.severity.as_str(), self.check, self.message)
    }
}

/// Every finding, in the order checked.
#[derive(Debug, Default)]
pub struct Report {
    findings: Vec<Finding>,
}

impl Report {
    fn push(&mut self, severity: Severity, check: impl Into<String>, message: impl Into<String>) {
        self.findings.push(Finding { severity, check: check.into(), message: message.into() });
    }

    fn ok(&mut self, check: impl Into<String>, message: impl Into<String>) {
        self.push(Severity::Ok, check, message);
    }

    fn warn(&mut self, check: impl Into<String>, message: impl Into<String>) {
        self.push(Severity::Warning, check, message);
    }

    fn error(&mut self, check: impl Into<String>, message: impl Into<String>) {
        self.push(Severity::Error, check, message);
    }

    pub fn findings(&self) -> &[Finding] {
        &self.findings
    }

    pub fn count(&self, severity: Severity) -> usize {
        self.findings.iter().filter(|f| f.severity == severity).count()
    }
}

/// `wgxdp check`: prints the report; an error if any check failed.
pub fn check(config: &Path, out: &mut impl Write) -> anyhow::Result<()> {
    let report = run(config);
    for f in report.findings() {
        writeln!(out, "{f}")?;
    }
    let (errors, warnings) = (report.count(Severity::Error), report.count(Severity::Warning));
    writeln!(out, "{errors} error(s), {warnings} warning(s); nothing was attached or changed")?;
    if errors > 0 {
        anyhow::bail!("{} has {errors} problem(s) `serve` would stop at or traffic would meet", config.display());
    }
    Ok(())
}

/// Every check of the configuration at `path` and of its interfaces.
pub fn run(path: &Path) -> Report {
    let mut r = Report::default();
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(source) => {
            r.error("config", ConfigError::Read { path: path.into(), source }.to_string());
            return r;
        }
    };
    let cfg = check_config(&mut r, &text, path);
    let names = match &cfg {
        Some(c) => Some((c.wan.clone(), c.lan.clone())),
        // Still look at the NICs of a file that names them.
        None => config::interfaces(path).ok(),
    };
    let Some((wan, lan)) = names else {
        r.warn("interfaces", "the file names no interfaces that can be read; the NICs were not checked");
        return r;
    };
    check_interfaces(&mut r, &wan, &lan, cfg.as_ref());
    if let Some(cfg) = &cfg {
        let frame_size = XskConfig::default().frame_size;
        match check_tunnel_mtu(cfg.tunnel_mtu, frame_size) {
            Ok(()) => r.ok(
                "tunnel_mtu frames",
                format!("tunnel_mtu {} fits AF_XDP frames of {frame_size} bytes", cfg.tunnel_mtu),
            ),
            Err(e) => r.error("tunnel_mtu frames", e.to_string()),
        }
        check_cores(&mut r, cfg);
        check_busy_poll(&mut r, cfg);
        check_listen_port(&mut r, cfg.listen_port);
        if let Some(api) = &cfg.api {
            check_api(&mut r, api);
        }
        check_wg_socket(&mut r, &cfg.wg_socket);
    }
    r
}

/// A stand-in for a key file that cannot be used, so that validation goes on.
fn stand_in(what: &str) -> zeroize::Zeroizing<String> {
    if what == "pre-shared key" {
        PresharedKey::generate().to_base64_secret()
    } else {
        PrivateKey::generate().to_base64_secret()
    }
}

/// A key file the configuration read: what it holds, where, and why it
/// could not be used.
type KeyFile = (&'static str, PathBuf, Result<(), String>);

/// `Config::parse_with` with the real key reader; each key file gets a line
/// of its own, and one that cannot be used is replaced by a stand-in so that
/// the rest of the file is still validated.
fn check_config(r: &mut Report, text: &str, path: &Path) -> Option<Config> {
    let keys: RefCell<Vec<KeyFile>> = RefCell::default();
    let reader = |p: &Path, what: &'static str| match config::read_secret(p, what) {
        Ok(secret) => {
            keys.borrow_mut().push((what, p.to_path_buf(), Ok(())));
            Ok(secret)
        }
        Err(e) => {
            keys.borrow_mut().push((what, p.to_path_buf(), Err(e.to_string())));
            Ok(stand_in(what))
        }
    };
    let parsed = Config::parse_with(text, path, &reader);
    let keys = keys.into_inner();
    let key_failed = keys.iter().any(|(_, _, k)| k.is_err());
    // A key file that reads but holds no key: reported on its own line.
    let mut bad_key = None;
    match &parsed {
        Ok(cfg) => {
            let what = if key_failed { "valid apart from its key files" } else { "valid" };
            r.ok(
                "config",
                format!(
                    "{}: {what}; {} peer(s), listen port {}, tunnel_mtu {}",
                    path.display(),
                    cfg.peers.len(),
                    cfg.listen_port,
                    cfg.tunnel_mtu
                ),
            );
        }
        Err(e @ ConfigError::BadKey { path, .. }) => bad_key = Some((path.clone(), e.to_string())),
        Err(e) => r.error("config", e.to_string()),
    }
    for (what, p, result) in keys {
        match (result, &bad_key) {
            (Ok(()), Some((bad, message))) if *bad == p => r.error(what, message.clone()),
            (Ok(()), _) => {
                let mode = std::fs::metadata(&p).map(|m| m.permissions().mode() & 0o777).unwrap_or(0);
                r.ok(what, format!("{} (mode {mode:04o})", p.display()));
            }
            (Err(message), _) => r.error(what, message),
        }
    }
    parsed.ok()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Wan,
    Lan,
}

impl Side {
    fn label(self) -> &'static str {
        match self {
            Side::Wan => "wan",
            Side::Lan => "lan",
        }
    }
}

fn check_interfaces(r: &mut Report, wan: &str, lan: &str, cfg: Option<&Config>) {
    let workers = queue_count(wan, lan, cfg.and_then(|c| c.queues));
    for (side, iface) in [(Side::Wan, wan), (Side::Lan, lan)] {
        let name = format!("{} {iface}", side.label());
        let index = match nic::ifindex(iface) {
            Ok(i) => i,
            Err(e) => {
                r.error(&name, format!("{e}; `ip link` lists the interfaces"));
                continue;
            }
        };
        match nic::link_state(iface) {
            Ok(nic::LinkState { admin_up: false, .. }) => r.warn(
                &name,
                format!("exists (index {index}) but is down: no traffic until `ip link set dev {iface} up`"),
            ),
            Ok(nic::LinkState { carrier: Some(false), .. }) => r.warn(
                &name,
                format!("exists (index {index}), up, but has no carrier (cable, switch port, veth peer down)"),
            ),
            Ok(_) => r.ok(&name, format!("exists (index {index}), up")),
            Err(e) => r.warn(&name, format!("exists (index {index}); its state cannot be read: {e}")),
        }
        match nic::driver(iface) {
            Ok(d) => {
                let mut details: Vec<String> = Vec::new();
                for (label, v) in [("version", &d.version), ("firmware", &d.firmware), ("bus", &d.bus)] {
                    if !v.is_empty() && v != "N/A" {
                        details.push(format!("{label} {v}"));
                    }
                }
                let details = if details.is_empty() { String::new() } else { format!(" ({})", details.join(", ")) };
                r.ok(format!("{name} driver"), format!("{}{details}", d.driver));
            }
            Err(e) => r.warn(format!("{name} driver"), format!("cannot tell: {e}")),
        }
        check_xdp_features(r, &name, iface, index, cfg);
        check_queues(r, &name, side, iface, workers, cfg.and_then(|c| c.queues));
        if let Some(cfg) = cfg {
            check_mtu(r, &name, side, iface, cfg);
        }
        check_attached(r, &name, iface);
    }
    if let Some(cfg) = cfg {
        if cfg.peers.iter().any(|p| p.policy.local_networks.is_empty()) && interface_networks(lan).is_empty() {
            r.warn(
                format!("lan {lan} networks"),
                "the LAN interface has no addresses, and peers without `local_networks` (and no `[api] site_cidr`) \
                 reach the LAN's networks: they would reach nothing",
            );
        }
        let wan_addresses = interface_addresses(wan);
        if wan_addresses.is_empty() && nic::ifindex(wan).is_ok() {
            r.warn(
                format!("wan {wan} addresses"),
                "the WAN interface has no address: the XDP program steers WireGuard to the gateway's own addresses, \
                 so nothing reaches the workers until one is added (serve follows address changes)",
            );
        }
    }
}

/// The XDP features the kernel reports, and what they mean for `serve`.
fn check_xdp_features(r: &mut Report, name: &str, iface: &str, index: u32, cfg: Option<&Config>) {
    let check = format!("{name} xdp features");
    let dev = match nic::query_xdp(index) {
        Ok(dev) => dev,
        Err(e @ NicError::NoNetdevFamily) => {
            r.warn(check, format!("{e}; `serve` tries native XDP and falls back to generic mode by itself"));
            return;
        }
        Err(e) => {
            r.warn(check, format!("cannot tell: {e}"));
            return;
        }
    };
    let segs = dev.zc_max_segs.map(|n| format!("; zero-copy frames span at most {n} buffer(s)")).unwrap_or_default();
    r.ok(&check, format!("{}{segs}", dev.features));
    let f = dev.features;
    if f.native_redirect() {
        r.ok(format!("{name} xdp mode"), "native: the driver runs XDP and redirects to AF_XDP sockets");
    } else {
        r.warn(
            format!("{name} xdp mode"),
            format!(
                "the driver lacks native XDP redirect ({}); `serve` attaches in generic (SKB) mode: correct, but \
                 every packet costs an skb and a copy",
                if f.has(XdpFeatures::BASIC) { "no `redirect`" } else { "no `basic`" }
            ),
        );
    }
    let zero_copy_wanted = cfg.is_none_or(|c| c.zero_copy);
    match (f.has(XdpFeatures::XSK_ZEROCOPY), zero_copy_wanted) {
        (true, true) => r.ok(format!("{name} zero-copy"), "AF_XDP zero-copy supported (`zero_copy = true`)"),
        (true, false) => r.warn(
            format!("{name} zero-copy"),
            "the driver supports AF_XDP zero-copy but `zero_copy = false` keeps sockets in copy mode",
        ),
        (false, true) => r.warn(
            format!("{name} zero-copy"),
            format!(
                "{iface}'s driver has no AF_XDP zero-copy: sockets bind in copy mode (the kernel copies every frame); \
                 see README \"Deployment on real NICs\" for drivers that have it"
            ),
        ),
        (false, false) => {
            r.ok(format!("{name} zero-copy"), "copy mode (`zero_copy = false`; the driver has no zero-copy)")
        }
    }
}

/// NIC queues against the workers `serve` would start.
fn check_queues(r: &mut Report, name: &str, side: Side, iface: &str, workers: u32, limit: Option<u32>) {
    let rx = nic::rx_queues(iface);
    let channels = match nic::channels(iface) {
        Ok(Some(c)) => Some(c),
        Ok(None) | Err(_) => None,
    };
    let shown = match channels {
        Some(c) => format!(
            "{rx} rx queue(s) (ethtool channels: combined {}/{} max, rx {}/{} max)",
            c.combined, c.max_combined, c.rx, c.max_rx
        ),
        None => format!("{rx} rx queue(s)"),
    };
    let check = format!("{name} queues");
    if rx > workers {
        let set = match channels {
            Some(c) if c.combined > 0 || c.max_combined > 0 => format!("`ethtool -L {iface} combined {workers}`"),
            Some(_) => format!("`ethtool -L {iface} rx {workers}`"),
            None => format!("`ethtool -L {iface} combined {workers}` (if the driver allows)"),
        };
        let fate = match side {
            Side::Wan => {
                "WireGuard arriving on the others has no AF_XDP socket and takes the kernel slow path \
                          (counted as wan_no_socket)"
            }
            Side::Lan => {
                "site traffic for a tunnel arriving on the others has no AF_XDP socket and reaches the kernel, \
                          which does not carry it into the tunnel (counted as lan_no_socket)"
            }
        };
        let raise = match limit {
            Some(q) if q < rx => format!(" or raise `queues` ({q})"),
            _ => String::new(),
        };
        r.warn(
            check,
            format!("{shown}, but {workers} worker(s) serve queues 0-{}: {fate}; run {set}{raise}", workers - 1),
        );
    } else {
        r.ok(check, format!("{shown}; {workers} worker(s), one per queue"));
    }
}

/// The address families of the outer (tunnel) packets: those of the WAN's
/// addresses and of the peers' endpoints; both when nothing says.
fn outer_families(wan: &str, cfg: &Config) -> (bool, bool) {
    let mut v4 = false;
    let mut v6 = false;
    for a in interface_addresses(wan) {
        match a {
            IpAddr::V4(_) => v4 = true,
            IpAddr::V6(a) if !a.is_unicast_link_local() => v6 = true,
            IpAddr::V6(_) => {}
        }
    }
    for e in cfg.peers.iter().filter_map(|p| p.endpoint) {
        match e {
            SocketAddr::V4(_) => v4 = true,
            SocketAddr::V6(_) => v6 = true,
        }
    }
    if !v4 && !v6 {
        (true, true)
    } else {
        (v4, v6)
    }
}

/// A finding about a WAN MTU for `tunnel_mtu` with the outer family given.
pub fn wan_mtu_finding(iface: &str, wan_mtu: usize, tunnel_mtu: usize, ipv6_outer: bool) -> (Severity, String) {
    let family = if ipv6_outer { "IPv6" } else { "IPv4" };
    let unpadded = nic::wan_mtu_unpadded(tunnel_mtu, ipv6_outer);
    let padded = nic::sealed_ip_len(tunnel_mtu, ipv6_outer);
    let fits = nic::max_tunnel_mtu_for_wan(wan_mtu, ipv6_outer);
    if wan_mtu < unpadded {
        (
            Severity::Error,
            format!(
                "MTU {wan_mtu} is too small for tunnel_mtu {tunnel_mtu} over {family}: a full-size tunnel packet is \
                 {padded} bytes (tunnel_mtu + {} of headers{}); raise the MTU to {padded} \
                 (`ip link set dev {iface} mtu {padded}`) or set tunnel_mtu = {fits}",
                unpadded - tunnel_mtu,
                if padded > unpadded { format!(" + {} of padding", padded - unpadded) } else { String::new() },
            ),
        )
    } else if wan_mtu < padded {
        (
            Severity::Warning,
            format!(
                "MTU {wan_mtu} is {} byte(s) short for full-size packets over {family}: wgxdp pads the inner packet \
                 to a multiple of 16, so tunnel_mtu {tunnel_mtu} makes {padded}-byte packets; set tunnel_mtu = {fits} \
                 (a multiple of 16) or the MTU to {padded}",
                padded - wan_mtu
            ),
        )
    } else {
        (
            Severity::Ok,
            format!("MTU {wan_mtu} carries tunnel_mtu {tunnel_mtu} over {family} (packets up to {padded} bytes)"),
        )
    }
}

fn check_mtu(r: &mut Report, name: &str, side: Side, iface: &str, cfg: &Config) {
    let check = format!("{name} mtu");
    let mtu = match nic::mtu(iface) {
        Ok(m) => m as usize,
        Err(e) => {
            r.warn(check, format!("cannot tell: {e}"));
            return;
        }
    };
    match side {
        Side::Wan => {
            let (v4, v6) = outer_families(iface, cfg);
            let worst = [(v6, true), (v4, false)]
                .into_iter()
                .filter(|(used, _)| *used)
                .map(|(_, ipv6)| wan_mtu_finding(iface, mtu, cfg.tunnel_mtu, ipv6))
                .max_by_key(|(s, _)| *s);
            if let Some((severity, message)) = worst {
                r.push(severity, &check, message);
            }
        }
        Side::Lan if mtu < cfg.tunnel_mtu => r.error(
            &check,
            format!(
                "MTU {mtu} is below tunnel_mtu {}: packets from the tunnels up to {} bytes cannot be delivered to \
                 the site; raise it (`ip link set dev {iface} mtu {}`) or lower tunnel_mtu",
                cfg.tunnel_mtu, cfg.tunnel_mtu, cfg.tunnel_mtu
            ),
        ),
        Side::Lan => r.ok(&check, format!("MTU {mtu} takes packets of tunnel_mtu {} from the tunnels", cfg.tunnel_mtu)),
    }
    // What AF_XDP frames can receive, and what a sealed packet needs.
    let frame_size = XskConfig::default().frame_size;
    let max = max_received_mtu(frame_size);
    if mtu > max {
        let what = match side {
            Side::Wan => "WireGuard datagrams",
            Side::Lan => "site packets",
        };
        r.warn(
            format!("{name} frames"),
            format!(
                "MTU {mtu} exceeds what an AF_XDP frame of {frame_size} bytes receives ({max} after the kernel's \
                 headroom): {what} longer than {max} bytes are dropped before a worker sees them; set the MTU to at \
                 most {max}"
            ),
        );
    }
}

/// XDP programs already on the interface: what `serve` would do about them.
fn check_attached(r: &mut Report, name: &str, iface: &str) {
    let check = format!("{name} xdp program");
    let found = match attached_programs(iface) {
        Ok(found) => found,
        Err(e) => {
            r.warn(check, format!("cannot tell: {e}"));
            return;
        }
    };
    if found.is_empty() {
        r.ok(check, "none attached");
        return;
    }
    let describe = |p: &AttachedXdp| {
        format!("program {} `{}` ({} mode)", p.prog_id, p.name.as_deref().unwrap_or("name unreadable"), p.mode.as_str())
    };
    for p in &found {
        if p.held_by_link {
            r.warn(
                &check,
                format!(
                    "{} is held by a running process (is `wgxdp serve` running?): a second serve would stop",
                    describe(p)
                ),
            );
        } else if p.is_ours() {
            r.warn(
                &check,
                format!("{} is a stale wgxdp program: `serve` replaces it (`wgxdp detach` removes it)", describe(p)),
            );
        } else if p.name.is_none() {
            r.warn(
                &check,
                format!("{}: its name cannot be read without CAP_SYS_ADMIN, nor whether a running process holds it (run as root to tell)", describe(p)),
            );
        } else {
            r.error(
                &check,
                format!(
                    "{} is another tool's: `serve` refuses to replace it; remove it with `ip link set dev {iface} {} off` \
                     if it is not needed",
                    describe(p),
                    p.mode.ip_link_keyword()
                ),
            );
        }
    }
}

/// Workers against the configured and available cores.
fn check_cores(r: &mut Report, cfg: &Config) {
    let interfaces = nic::ifindex(&cfg.wan).is_ok() && nic::ifindex(&cfg.lan).is_ok();
    let workers = interfaces.then(|| queue_count(&cfg.wan, &cfg.lan, cfg.queues));
    let (severity, message) = cores_finding(&cfg.cores, &usable_cores(), workers);
    r.push(severity, "cores", message);
    if let Some(workers) = workers {
        let (severity, message) = crypto_finding(cfg, workers);
        r.push(severity, "crypto threads", message);
    }
}

/// Where `serve` would run the crypto helpers (`CryptoPlan`, as `serve` computes it).
fn crypto_finding(cfg: &Config, workers: u32) -> (Severity, String) {
    let cores = if cfg.cores.is_empty() { usable_cores() } else { cfg.cores.clone() };
    let plan = CryptoPlan::new(&cores, workers as usize, cfg.crypto_threads);
    let helpers = plan.helper_cores.len();
    let what = if helpers == 0 {
        "no helper: each worker seals and opens its own packets (one tunnel runs on one core)".to_owned()
    } else {
        format!(
            "{helpers} helper(s) on core(s) {}: one tunnel's AEAD runs on {} cores",
            list(&plan.helper_cores),
            helpers + 1
        )
    };
    match (plan.shortfall, cfg.crypto_threads) {
        (Some(why), Some(_)) => (Severity::Warning, format!("{what}; {why}")),
        _ => (Severity::Ok, what),
    }
}

fn list(items: &[usize]) -> String {
    items.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

/// `cores` against the cores this process may use (`usable`) and the
/// workers `serve` would start (`None`: unknown, an interface is missing).
pub fn cores_finding(cores: &[usize], usable: &[usize], workers: Option<u32>) -> (Severity, String) {
    let missing: Vec<usize> = cores.iter().copied().filter(|c| !usable.is_empty() && !usable.contains(c)).collect();
    if !missing.is_empty() {
        return (
            Severity::Warning,
            format!(
                "core(s) {} are not available to this process (usable: {}): their workers would run unpinned",
                list(&missing),
                list(usable)
            ),
        );
    }
    let Some(workers) = workers else {
        return (Severity::Ok, format!("cores {} exist (workers unknown until both interfaces do)", list(cores)));
    };
    let n = workers as usize;
    if cores.is_empty() {
        let first: Vec<usize> = usable.iter().copied().take(n).collect();
        (
            Severity::Ok,
            format!(
                "{workers} worker(s) on cores {} (the first usable ones; `cores` pins them elsewhere)",
                list(&first)
            ),
        )
    } else if cores.len() < n {
        (
            Severity::Warning,
            format!(
                "{workers} workers on {} core(s) ({}): workers share cores (assigned in turn); list {workers} cores \
                 or set queues = {}",
                cores.len(),
                list(cores),
                cores.len()
            ),
        )
    } else {
        (Severity::Ok, format!("{workers} worker(s) pinned to cores {}", list(&cores[..n])))
    }
}

/// Busy polling keeps the NIC's interrupts off only with NAPI deferral.
fn check_busy_poll(r: &mut Report, cfg: &Config) {
    if cfg.busy_poll {
        for iface in [&cfg.wan, &cfg.lan] {
            if nic::ifindex(iface).is_err() {
                continue;
            }
            let read = |attr: &str| {
                std::fs::read_to_string(format!("/sys/class/net/{iface}/{attr}")).ok().map(|t| t.trim().to_owned())
            };
            match (read("napi_defer_hard_irqs"), read("gro_flush_timeout")) {
                (Some(d), Some(g)) if d != "0" && g != "0" => {
                    r.ok(format!("busy_poll {iface}"), format!("napi_defer_hard_irqs {d}, gro_flush_timeout {g}"))
                }
                (d, g) => r.warn(
                    format!("busy_poll {iface}"),
                    format!(
                        "napi_defer_hard_irqs {} and gro_flush_timeout {}: with busy_poll the NIC's interrupts keep \
                         firing; `echo 2 > /sys/class/net/{iface}/napi_defer_hard_irqs` and `echo 200000 > \
                         /sys/class/net/{iface}/gro_flush_timeout`",
                        d.as_deref().unwrap_or("?"),
                        g.as_deref().unwrap_or("?")
                    ),
                ),
            }
        }
    }
}

/// Whether a bind to `addr` would work now (the socket is closed at once).
fn try_bind(addr: SocketAddr, udp: bool) -> std::io::Result<()> {
    if udp {
        std::net::UdpSocket::bind(addr).map(drop)
    } else {
        std::net::TcpListener::bind(addr).map(drop)
    }
}

/// A finding for binding `addr`.
fn bind_finding(r: &mut Report, check: &str, addr: SocketAddr, udp: bool, purpose: &str) {
    let proto = if udp { "UDP" } else { "TCP" };
    match try_bind(addr, udp) {
        Ok(()) => r.ok(check, format!("{proto} {addr} is free for {purpose}")),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => r.error(
            check,
            format!(
                "{proto} {addr} is in use (another WireGuard, or `wgxdp serve` already running?); {purpose} needs it"
            ),
        ),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            r.warn(check, format!("cannot test {proto} {addr} without root (`serve` runs as root): {e}"))
        }
        Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable => {
            r.error(check, format!("{addr} is not an address of this host: {e}"))
        }
        Err(e) => r.error(check, format!("{proto} {addr}: {e}")),
    }
}

fn check_listen_port(r: &mut Report, port: u16) {
    // `serve` binds [::] (dual stack) and falls back to 0.0.0.0.
    let any6 = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port));
    let addr = match try_bind(any6, true) {
        Err(e) if e.kind() != std::io::ErrorKind::AddrInUse && e.kind() != std::io::ErrorKind::PermissionDenied => {
            SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, port))
        }
        _ => any6,
    };
    bind_finding(r, "listen port", addr, true, "WireGuard handshakes and the kernel slow path");
}

/// What a database's schema `version` means to `serve`: an error for one a
/// newer wgxdp wrote (`serve` would refuse it), else what `serve` does.
fn schema_finding(database: &str, version: i64) -> Result<String, String> {
    crate::store::refuse_newer_schema(version).map_err(|e| format!("{database}: {e}"))?;
    let to = crate::store::SCHEMA_VERSION;
    Ok(match version {
        v if v < to => format!("schema version {v}; `serve` brings it to {to}"),
        v => format!("schema version {v}"),
    })
}

/// Whether `serve` can use the PostgreSQL at `at`: it answers, and its
/// schema is one this build reads. Reads only.
pub fn postgres_finding(at: &crate::store::PostgresAt) -> (Severity, String) {
    let described =
        crate::store::parse_postgres_url(&at.url).map_or_else(|e| e, |c| crate::store::describe_postgres(&c));
    match crate::store::postgres_schema_version(at).and_then(|v| schema_finding(&described, v)) {
        Ok(found) => (Severity::Ok, format!("{described} answers ({found})")),
        Err(e) => (Severity::Error, format!("{described}: {e}")),
    }
}

/// The database's directory: `serve` creates what is missing.
pub fn database_finding(database: &Path) -> (Severity, String) {
    let writable = |p: &Path| {
        let Ok(c) = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()) else { return false };
        // SAFETY: access(2) reads the NUL-terminated path we own and nothing else.
        unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) == 0 }
    };
    let dir = database.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if database.is_dir() {
        return (Severity::Error, format!("{} is a directory; `database` names the file", database.display()));
    }
    // The nearest directory that exists: the rest would be created.
    let mut existing = dir;
    while !existing.exists() {
        match existing.parent() {
            Some(p) if !p.as_os_str().is_empty() => existing = p,
            _ => {
                existing = Path::new(".");
                break;
            }
        }
    }
    if !existing.is_dir() {
        return (
            Severity::Error,
            format!("{} is not a directory, so {} cannot be created", existing.display(), database.display()),
        );
    }
    if !writable(existing) {
        return (
            Severity::Error,
            format!(
                "{} is not writable (by this user; `serve` runs as root), so {} {}",
                existing.display(),
                database.display(),
                if database.exists() { "cannot keep its journal (WAL) beside it" } else { "cannot be created" }
            ),
        );
    }
    if database.exists() {
        let found = crate::store::schema_version_of(database)
            .map_err(|e| format!("{} cannot be read as a database: {e}", database.display()))
            .and_then(|v| schema_finding(&database.display().to_string(), v));
        match found {
            Err(message) => (Severity::Error, message),
            Ok(found) => (Severity::Ok, format!("{} exists ({found}); its directory is writable", database.display())),
        }
    } else if existing == dir {
        (Severity::Ok, format!("{} will be created (mode 0600) in {}", database.display(), dir.display()))
    } else {
        (Severity::Ok, format!("{} will be created with its directory {}", database.display(), dir.display()))
    }
}

fn check_api(r: &mut Report, api: &config::ApiConfig) {
    bind_finding(r, "api listen", api.listen, false, "the HTTP API");
    if let Some(m) = api.metrics_listen {
        bind_finding(r, "metrics listen", m, false, "/metrics");
    }
    let (severity, message) = match &api.store {
        crate::store::StoreLocation::Sqlite(path) => database_finding(path),
        crate::store::StoreLocation::Postgres(at) => postgres_finding(at),
    };
    r.push(severity, "api database", message);
}

/// The `wg` socket `serve` would offer: its name, and whether a live
/// process already answers on it.
fn check_wg_socket(r: &mut Report, wanted: &WgSocket) {
    let (name, explicit) = match wanted {
        WgSocket::Off => return r.ok("wg socket", "off (`wg_socket = false`)"),
        WgSocket::Named(n) => (n, true),
        WgSocket::Default(n) => (n, false),
    };
    if let Err(e) = crate::uapi::validate_name(name) {
        return r.warn("wg socket", format!("{e}: serve runs without one; set `[interface] name`"));
    }
    let socket = Path::new(crate::uapi::SOCKET_DIR).join(format!("{name}.sock"));
    let trouble = match crate::uapi::probe(&socket) {
        SocketState::Free | SocketState::Stale => {
            return r.ok("wg socket", format!("`wg show {name}` will find {}", socket.display()))
        }
        SocketState::Live => format!("another process answers on {}", socket.display()),
        SocketState::NotASocket => format!("{} exists and is not a socket", socket.display()),
        SocketState::Unknown => format!("{} exists and cannot be probed without root", socket.display()),
    };
    if explicit {
        r.error("wg socket", format!("{trouble}; set another `[interface] name`"));
    } else {
        r.warn("wg socket", format!("{trouble}: serve runs without a wg socket; set `[interface] name`"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wan_mtu_lines_say_what_fits() {
        let (s, m) = wan_mtu_finding("eth0", 1500, 1420, false);
        assert_eq!(s, Severity::Ok, "{m}");
        assert!(m.contains("up to 1484 bytes"), "{m}");
        // 1420 over IPv6: 1500 fits the unpadded packet, not the padded one.
        let (s, m) = wan_mtu_finding("eth0", 1500, 1420, true);
        assert_eq!(s, Severity::Warning, "{m}");
        assert!(m.contains("4 byte(s) short") && m.contains("tunnel_mtu = 1408") && m.contains("1504"), "{m}");
        assert_eq!(wan_mtu_finding("eth0", 1500, 1408, true).0, Severity::Ok);
        let (s, m) = wan_mtu_finding("eth0", 1400, 1420, false);
        assert_eq!(s, Severity::Error, "{m}");
        assert!(m.contains("MTU 1400 is too small") && m.contains("1484") && m.contains("tunnel_mtu = 1328"), "{m}");
        assert!(m.contains("tunnel_mtu + 60 of headers + 4 of padding"), "{m}");
        assert!(m.contains("`ip link set dev eth0 mtu 1484`"), "{m}");
        let (s, m) = wan_mtu_finding("eth0", 1280, 1280, true);
        assert_eq!(s, Severity::Error);
        assert!(m.contains("tunnel_mtu + 80 of headers") && !m.contains("padding"), "{m}");
    }

    #[test]
    fn cores_against_workers() {
        let usable = [0, 1, 2, 3];
        assert_eq!(
            cores_finding(&[], &usable, Some(2)),
            (Severity::Ok, "2 worker(s) on cores 0, 1 (the first usable ones; `cores` pins them elsewhere)".into())
        );
        assert_eq!(cores_finding(&[2, 3], &usable, Some(2)), (Severity::Ok, "2 worker(s) pinned to cores 2, 3".into()));
        let (s, m) = cores_finding(&[3], &usable, Some(2));
        assert_eq!(s, Severity::Warning);
        assert!(m.contains("workers share cores") && m.contains("queues = 1"), "{m}");
        let (s, m) = cores_finding(&[1, 9], &usable, None);
        assert_eq!(s, Severity::Warning);
        assert_eq!(
            m,
            "core(s) 9 are not available to this process (usable: 0, 1, 2, 3): their workers would run unpinned"
        );
        assert_eq!(cores_finding(&[1], &usable, None).0, Severity::Ok);
    }

    #[test]
    fn findings_print_one_line_each() {
        let mut r = Report::default();
        r.ok("config", "fine");
        r.warn("wan eth0 queues", "4 rx queues");
        r.error("listen port", "in use");
        let lines: Vec<String> = r.findings().iter().map(ToString::to_string).collect();
        assert_eq!(
            lines,
            ["ok      config: fine", "warning wan eth0 queues: 4 rx queues", "error   listen port: in use"]
        );
        assert_eq!((r.count(Severity::Error), r.count(Severity::Warning), r.count(Severity::Ok)), (1, 1, 1));
    }

    #[test]
    fn database_directories() {
        let dir = std::env::temp_dir().join(format!("wgxdp-check-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (s, m) = database_finding(&dir.join("db"));
        assert_eq!(s, Severity::Ok, "{m}");
        assert!(m.contains("will be created (mode 0600)"), "{m}");
        let (s, m) = database_finding(&dir.join("state/sub/db"));
        assert_eq!(s, Severity::Ok, "{m}");
        assert!(m.contains("with its directory"), "{m}");
        assert_eq!(database_finding(&dir).0, Severity::Error, "a directory is no database");
        std::fs::write(dir.join("file"), b"").unwrap();
        let (s, m) = database_finding(&dir.join("file/db"));
        assert_eq!(s, Severity::Error, "{m}");
        assert!(m.contains("is not a directory"), "{m}");
        // An existing database: its schema version; a newer one than this
        // build knows, or a file that is no database, is an error.
        let db = dir.join("store.db");
        drop(crate::store::Store::open(&db).unwrap());
        let (s, m) = database_finding(&db);
        assert_eq!(s, Severity::Ok, "{m}");
        assert!(m.contains(&format!("schema version {}", crate::store::SCHEMA_VERSION)), "{m}");
        let newer = crate::store::SCHEMA_VERSION + 1;
        rusqlite::Connection::open(&db).unwrap().pragma_update(None, "user_version", newer).unwrap();
        let (s, m) = database_finding(&db);
        assert_eq!(s, Severity::Error, "{m}");
        assert!(m.contains(&format!("version {newer}")) && m.contains("newer wgxdp"), "{m}");
        std::fs::write(dir.join("text.db"), b"not a database at all, just text").unwrap();
        let (s, m) = database_finding(&dir.join("text.db"));
        assert_eq!(s, Severity::Error, "{m}");
        assert!(m.contains("cannot be read as a database"), "{m}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A PostgreSQL store: whether it answers and what its schema means to
    /// `serve`, read without writing.
    #[test]
    fn a_postgresql_store() {
        use crate::store::{PostgresAt, Store, StoreLocation};
        let cluster = wgxdp_integration::postgres::Cluster::shared();
        let url = cluster.database();
        let at = PostgresAt::url(url.clone());
        let (s, m) = postgres_finding(&at);
        assert_eq!(s, Severity::Ok, "{m}");
        assert!(m.contains("answers (schema version 0; `serve` brings it to"), "{m}");
        assert!(m.contains("PostgreSQL postgres@"), "{m}");
        assert_eq!(cluster.psql_at(&url, "SELECT to_regclass('gateways') IS NULL"), "t", "check wrote nothing");
        drop(Store::open_at(&StoreLocation::Postgres(at.clone())).unwrap());
        let (s, m) = postgres_finding(&at);
        assert_eq!(
            (s, m.contains(&format!("(schema version {})", crate::store::SCHEMA_VERSION))),
            (Severity::Ok, true),
            "{m}"
        );
        let newer = crate::store::SCHEMA_VERSION + 1;
        cluster.psql_at(&url, &format!("UPDATE schema_version SET version = {newer}"));
        let (s, m) = postgres_finding(&at);
        assert_eq!(s, Severity::Error, "{m}");
        assert!(m.contains("newer wgxdp"), "{m}");
        let nowhere = PostgresAt::url("postgresql:///x?host=/nonexistent-wgxdp&user=u");
        let (s, m) = postgres_finding(&nowhere);
        assert_eq!(s, Severity::Error, "{m}");
        assert!(m.contains("PostgreSQL u@/nonexistent-wgxdp/x"), "{m}");
    }

    #[test]
    fn a_refused_key_file_is_its_own_line_and_the_rest_is_still_checked() {
        use std::io::Write as _;
        let dir = std::env::temp_dir().join(format!("wgxdp-check-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("k");
        std::fs::File::create(&key).unwrap().write_all(PrivateKey::generate().to_base64_secret().as_bytes()).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let peer = PrivateKey::generate().public_key();
        let text = format!(
            "[interface]\nwan = \"a\"\nlan = \"b\"\nprivate_key_file = \"{}\"\n[[peer]]\npublic_key = \"{peer}\"\n\
             allowed_ips = [\"10.1.0.0/16\"]\n",
            key.display()
        );
        let mut r = Report::default();
        let cfg = check_config(&mut r, &text, Path::new("t.toml")).expect("validated with a stand-in key");
        assert_eq!(cfg.peers.len(), 1);
        let lines: Vec<String> = r.findings().iter().map(ToString::to_string).collect();
        assert!(lines[0].starts_with("ok      config: t.toml: valid apart from its key files; 1 peer(s)"), "{lines:?}");
        assert!(lines[1].starts_with("error   private key: ") && lines[1].contains("chmod 600"), "{lines:?}");
        // A later mistake is still found.
        let bad = text.replace("10.1.0.0/16", "10.1.0.1/16");
        let mut r = Report::default();
        assert!(check_config(&mut r, &bad, Path::new("t.toml")).is_none());
        assert!(r.findings().iter().any(|f| f.severity == Severity::Error && f.message.contains("10.1.0.0/16")));
        assert!(r.findings().iter().any(|f| f.check == "private key" && f.severity == Severity::Error));
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let mut r = Report::default();
        assert!(check_config(&mut r, &text, Path::new("t.toml")).is_some());
        assert_eq!(r.findings()[1].to_string(), format!("ok      private key: {} (mode 0600)", key.display()));
        std::fs::write(&key, "not a key").unwrap();
        let mut r = Report::default();
        assert!(check_config(&mut r, &text, Path::new("t.toml")).is_none());
        let lines: Vec<String> = r.findings().iter().map(ToString::to_string).collect();
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert!(
            lines[0].starts_with("error   private key: private key in ") && lines[0].contains("base64"),
            "{lines:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_wg_socket_line_says_what_serve_will_do() {
        let mut r = Report::default();
        check_wg_socket(&mut r, &WgSocket::Off);
        check_wg_socket(&mut r, &WgSocket::Default("bad name!".into()));
        check_wg_socket(&mut r, &WgSocket::Named("wgxchk-free".into()));
        let f = r.findings();
        assert_eq!(
            (f[0].severity, f[1].severity, f[2].severity),
            (Severity::Ok, Severity::Warning, Severity::Ok),
            "{f:?}"
        );
        assert!(f[1].message.contains("serve runs without one"), "{f:?}");
        assert!(f[2].message.contains("wg show wgxchk-free"), "{f:?}");
        // A name a live process answers on: an error if named, else a warning.
        let name = format!("wgxchk{}", std::process::id() % 100_000);
        let Ok(live) = crate::uapi::UapiSocket::bind(Path::new(crate::uapi::SOCKET_DIR), &name) else {
            return eprintln!("cannot bind in {} (not root?): the in-use case is not checked", crate::uapi::SOCKET_DIR);
        };
        let mut r = Report::default();
        check_wg_socket(&mut r, &WgSocket::Named(name.clone()));
        check_wg_socket(&mut r, &WgSocket::Default(name));
        drop(live);
        let f = r.findings();
        assert_eq!((f[0].severity, f[1].severity), (Severity::Error, Severity::Warning), "{f:?}");
        assert!(f[0].message.contains("another process answers"), "{f:?}");
        // A file that is not a socket stops serve as it stops bind.
        let dir = std::env::temp_dir().join(crate::store::random_id("wgxdp-check-"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("x.sock"), b"").unwrap();
        assert_eq!(crate::uapi::probe(&dir.join("x.sock")), SocketState::NotASocket);
        assert_eq!(crate::uapi::probe(&dir.join("y.sock")), SocketState::Free);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
