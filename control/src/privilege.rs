//! Least privilege: the Linux capabilities `wgxdp serve` needs, checked when
//! it starts, before anything is attached, so that a missing one is named
//! with what it is for instead of surfacing later as a bare `EPERM`.
//!
//! Each was found necessary by running `serve` without it (see the README's
//! "Least privilege"); the systemd unit (`packaging/wgxdp.service`) grants
//! exactly `NEEDED` and raises RLIMIT_MEMLOCK instead of granting
//! CAP_IPC_LOCK. A unit test keeps the unit and this list equal.

use crate::config::Config;
use std::fmt;

/// A Linux capability: its name and bit number (linux/capability.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capability {
    pub name: &'static str,
    pub bit: u32,
}

pub const CAP_NET_BIND_SERVICE: Capability = Capability { name: "CAP_NET_BIND_SERVICE", bit: 10 };
pub const CAP_NET_ADMIN: Capability = Capability { name: "CAP_NET_ADMIN", bit: 12 };
pub const CAP_NET_RAW: Capability = Capability { name: "CAP_NET_RAW", bit: 13 };
pub const CAP_IPC_LOCK: Capability = Capability { name: "CAP_IPC_LOCK", bit: 14 };
pub const CAP_SYS_ADMIN: Capability = Capability { name: "CAP_SYS_ADMIN", bit: 21 };
pub const CAP_PERFMON: Capability = Capability { name: "CAP_PERFMON", bit: 38 };
pub const CAP_BPF: Capability = Capability { name: "CAP_BPF", bit: 39 };

/// A capability `serve` cannot run without, and what for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Need {
    pub capability: Capability,
    /// One the kernel accepts instead (CAP_SYS_ADMIN for CAP_BPF and
    /// CAP_PERFMON, as before 5.8).
    pub instead: Option<Capability>,
    pub purpose: &'static str,
}

impl Need {
    fn met_by(&self, set: CapSet) -> bool {
        set.has(self.capability) || self.instead.is_some_and(|c| set.has(c))
    }
}

/// Every capability `serve` needs, whatever the configuration.
pub const NEEDED: &[Need] = &[
    Need {
        capability: CAP_NET_ADMIN,
        instead: None,
        purpose: "to attach the XDP programs to the WAN and LAN interfaces and to create the host interface \
                  (TUN) and its routes",
    },
    Need { capability: CAP_NET_RAW, instead: None, purpose: "to open the AF_XDP sockets" },
    Need { capability: CAP_BPF, instead: Some(CAP_SYS_ADMIN), purpose: "to load the XDP program and create its maps" },
    Need {
        capability: CAP_PERFMON,
        instead: Some(CAP_SYS_ADMIN),
        purpose: "for the kernel's verifier to accept the XDP program (without it, arithmetic on packet pointers \
                  is \"prohibited for !root\")",
    },
];

/// What a configuration with a port below `ip_unprivileged_port_start`
/// (`listen_port`, `[api] listen` or `metrics_listen`, e.g. 443) also needs;
/// wgxdp.service does not grant it unless the operator adds it.
pub const NEED_LOW_PORT: Need = Need {
    capability: CAP_NET_BIND_SERVICE,
    instead: None,
    purpose: "to bind a port below net.ipv4.ip_unprivileged_port_start (`listen_port` or an `[api]` address); \
              add it to wgxdp.service's CapabilityBoundingSet= and AmbientCapabilities= if you use one",
};

/// `NEED_LOW_PORT` if one of `ports` is below `unprivileged_start` and the
/// process cannot bind it.
pub fn check_ports(effective: CapSet, ports: &[u16], unprivileged_start: u16) -> Result<(), PrivilegeError> {
    if ports.iter().any(|&p| p < unprivileged_start) && !NEED_LOW_PORT.met_by(effective) {
        return Err(PrivilegeError::Missing(vec![NEED_LOW_PORT]));
    }
    Ok(())
}

/// The lowest port a process without CAP_NET_BIND_SERVICE may bind.
fn unprivileged_port_start() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .unwrap_or(1024)
}

/// A set of capabilities (one bit each, as in `/proc/<pid>/status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CapSet(pub u64);

impl CapSet {
    pub fn has(self, cap: Capability) -> bool {
        self.0 & (1u64 << cap.bit) != 0
    }

    /// The `CapEff:` line of a `/proc/<pid>/status` text.
    pub fn effective_from_status(status: &str) -> Result<Self, PrivilegeError> {
        let hex = status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .ok_or_else(|| PrivilegeError::Unreadable("no CapEff line".into()))?
            .trim();
        u64::from_str_radix(hex, 16).map(CapSet).map_err(|e| PrivilegeError::Unreadable(format!("CapEff `{hex}`: {e}")))
    }

    /// This process's effective capabilities.
    pub fn current() -> Result<Self, PrivilegeError> {
        let status = std::fs::read_to_string("/proc/self/status")
            .map_err(|e| PrivilegeError::Unreadable(format!("/proc/self/status: {e}")))?;
        Self::effective_from_status(&status)
    }
}

/// Bytes of AF_XDP memory (UMEM) that `serve` registers, which the kernel
/// counts against RLIMIT_MEMLOCK unless the process has CAP_IPC_LOCK. (The
/// kernel counts the memory all processes of the user have locked: this is
/// what `serve` adds, a lower bound of what the limit must allow.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockedMemory {
    pub queues: u32,
    pub bytes: u64,
}

impl LockedMemory {
    /// Per queue, one UMEM shared by the WAN and LAN sockets: twice
    /// `frames_per_socket` frames of `frame_size` bytes. With `zero_copy`,
    /// twice that again: when a NIC refuses zero-copy (veth, most drivers
    /// without AF_XDP support), the kernel releases that attempt's UMEM only
    /// after the copy-mode one has been counted (seen on veth, 1024 frames per
    /// socket: with zero-copy on they start under an 8 MiB limit and fail
    /// under 7.5 MiB; with it off they start under 4 MiB and fail under
    /// 4 MiB - 4 KiB).
    pub fn umem(queues: u32, frames_per_socket: u32, frame_size: u32, zero_copy: bool) -> Self {
        let attempts = if zero_copy { 2 } else { 1 };
        let per_queue = 2 * u64::from(frames_per_socket) * u64::from(frame_size);
        Self { queues, bytes: attempts * u64::from(queues) * per_queue }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("cannot read this process's capabilities: {0}")]
    Unreadable(String),
    #[error(
        "missing {}; run `wgxdp serve` as root or grant {} (the systemd unit wgxdp.service does)",
        list(.0),
        if .0.len() == 1 { "it" } else { "them" }
    )]
    Missing(Vec<Need>),
    #[error(
        "RLIMIT_MEMLOCK is {} but the AF_XDP memory of {} queue(s) needs {} and CAP_IPC_LOCK (which lifts \
         the limit) is missing: raise the limit (`ulimit -l unlimited`; wgxdp.service sets \
         LimitMEMLOCK=infinity), grant CAP_IPC_LOCK, or lower `frames_per_socket` (or set `zero_copy = false`: \
         a NIC without zero-copy makes the UMEM count twice while it is refused)",
        Bytes(*.limit), .memory.queues, Bytes(.memory.bytes)
    )]
    Memlock { limit: u64, memory: LockedMemory },
}

fn list(missing: &[Need]) -> String {
    missing.iter().map(|n| format!("{}: needed {}", n.capability.name, n.purpose)).collect::<Vec<_>>().join("; ")
}

/// A byte count in the unit that reads best.
struct Bytes(u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const MIB: u64 = 1 << 20;
        match self.0 {
            b if b >= MIB && b % MIB == 0 => write!(f, "{} MiB", b / MIB),
            b if b >= 1024 && b % 1024 == 0 => write!(f, "{} KiB", b / 1024),
            b => write!(f, "{b} bytes"),
        }
    }
}

/// Whether a process with `effective` capabilities and the RLIMIT_MEMLOCK
/// soft limit `memlock` (`None`: unlimited) can run `serve` with `memory`.
pub fn check(effective: CapSet, memlock: Option<u64>, memory: LockedMemory) -> Result<(), PrivilegeError> {
    let missing: Vec<Need> = NEEDED.iter().copied().filter(|n| !n.met_by(effective)).collect();
    if !missing.is_empty() {
        return Err(PrivilegeError::Missing(missing));
    }
    match memlock {
        Some(limit) if !effective.has(CAP_IPC_LOCK) && memory.bytes > limit => {
            Err(PrivilegeError::Memlock { limit, memory })
        }
        _ => Ok(()),
    }
}

/// This process's RLIMIT_MEMLOCK soft limit (`None`: unlimited).
fn memlock_limit() -> Result<Option<u64>, PrivilegeError> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one `rlimit` into the struct we pass, which
    // lives on our stack for the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(PrivilegeError::Unreadable(format!("RLIMIT_MEMLOCK: {e}")));
    }
    Ok((limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur))
}

/// Checks that this process may run the gateway `cfg` describes: every
/// capability of `NEEDED`, and room for its AF_XDP memory.
pub fn check_serve(cfg: &Config) -> Result<(), PrivilegeError> {
    let queues = wgxdp_dataplane::gateway::queue_count(&cfg.wan, &cfg.lan, cfg.queues);
    let frame_size = wgxdp_dataplane::xsk::XskConfig::default().frame_size;
    let effective = CapSet::current()?;
    check(effective, memlock_limit()?, LockedMemory::umem(queues, cfg.frames_per_socket, frame_size, cfg.zero_copy))?;
    let mut ports = vec![cfg.listen_port];
    if let Some(api) = &cfg.api {
        ports.push(api.listen.port());
        ports.extend(api.metrics_listen.map(|a| a.port()));
    }
    check_ports(effective, &ports, unprivileged_port_start())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What root has on this kind of machine (every capability of 6.x but
    /// CAP_SYS_RESOURCE), and what `setpriv --bounding-set=-all,+net_admin,
    /// +net_raw,+bpf,+perfmon` leaves, as /proc/<pid>/status showed them.
    const ROOT: &str = "Name:\twgxdp\nCapInh:\t0000000000000000\nCapPrm:\t000001fffeffffff\n\
                        CapEff:\t000001fffeffffff\nCapBnd:\t000001fffeffffff\n";
    const UNIT: &str = "CapPrm:\t000000c000003000\nCapEff:\t000000c000003000\n";
    const SMALL: LockedMemory = LockedMemory { queues: 1, bytes: 4 << 20 };
    const DEFAULT: LockedMemory = LockedMemory { queues: 1, bytes: 16 << 20 };

    fn without(set: CapSet, cap: Capability) -> CapSet {
        CapSet(set.0 & !(1 << cap.bit))
    }

    #[test]
    fn a_port_below_the_unprivileged_start_needs_net_bind_service() {
        let unit = CapSet::effective_from_status(UNIT).unwrap();
        check_ports(unit, &[51820, 8080], 1024).unwrap();
        let e = check_ports(unit, &[443, 8080], 1024).unwrap_err().to_string();
        assert!(e.contains("missing CAP_NET_BIND_SERVICE") && e.contains("AmbientCapabilities"), "{e}");
        check_ports(unit, &[443], 0).unwrap();
        check_ports(CapSet(unit.0 | 1 << CAP_NET_BIND_SERVICE.bit), &[443, 80], 1024).unwrap();
        let root = CapSet::effective_from_status(ROOT).unwrap();
        check_ports(root, &[53], 1024).unwrap();
    }

    #[test]
    fn parses_the_effective_set() {
        let root = CapSet::effective_from_status(ROOT).unwrap();
        assert_eq!(root, CapSet(0x1fffeffffff));
        assert!(root.has(CAP_BPF) && root.has(CAP_NET_ADMIN) && root.has(CAP_IPC_LOCK));
        let unit = CapSet::effective_from_status(UNIT).unwrap();
        assert!(unit.has(CAP_NET_ADMIN) && unit.has(CAP_NET_RAW) && unit.has(CAP_BPF) && unit.has(CAP_PERFMON));
        assert!(!unit.has(CAP_IPC_LOCK) && !unit.has(CAP_SYS_ADMIN));
        assert!(matches!(CapSet::effective_from_status("CapEff:\tzz\n"), Err(PrivilegeError::Unreadable(_))));
        assert!(matches!(CapSet::effective_from_status("Name:\tx\n"), Err(PrivilegeError::Unreadable(_))));
    }

    #[test]
    fn root_and_the_unit_set_may_serve() {
        let root = CapSet::effective_from_status(ROOT).unwrap();
        check(root, Some(64 << 10), DEFAULT).unwrap();
        let unit = CapSet::effective_from_status(UNIT).unwrap();
        check(unit, None, DEFAULT).unwrap();
        check(unit, Some(8 << 20), SMALL).unwrap();
    }

    #[test]
    fn a_missing_capability_is_named_with_its_purpose() {
        let unit = CapSet::effective_from_status(UNIT).unwrap();
        for need in NEEDED {
            let e = check(without(unit, need.capability), None, DEFAULT).unwrap_err().to_string();
            assert!(e.starts_with(&format!("missing {}: needed {}", need.capability.name, need.purpose)), "{e}");
            assert!(e.contains("grant it (the systemd unit wgxdp.service does)"), "{e}");
        }
        let e = check(CapSet(0), None, DEFAULT).unwrap_err().to_string();
        for need in NEEDED {
            assert!(e.contains(need.capability.name), "{e}");
        }
        assert!(e.contains("grant them"), "{e}");
        // Before CAP_BPF and CAP_PERFMON (5.8), CAP_SYS_ADMIN was what the kernel asked for.
        let old = without(without(unit, CAP_BPF), CAP_PERFMON);
        check(CapSet(old.0 | 1 << CAP_SYS_ADMIN.bit), None, DEFAULT).unwrap();
    }

    #[test]
    fn without_ipc_lock_the_memory_must_fit_the_limit() {
        let unit = CapSet::effective_from_status(UNIT).unwrap();
        let e = check(unit, Some(8 << 20), DEFAULT).unwrap_err().to_string();
        assert!(e.starts_with("RLIMIT_MEMLOCK is 8 MiB but the AF_XDP memory of 1 queue(s) needs 16 MiB"), "{e}");
        assert!(e.contains("LimitMEMLOCK=infinity") && e.contains("CAP_IPC_LOCK"), "{e}");
        // Exactly the limit fits; CAP_IPC_LOCK lifts it.
        check(unit, Some(16 << 20), DEFAULT).unwrap();
        check(CapSet(unit.0 | 1 << CAP_IPC_LOCK.bit), Some(0), DEFAULT).unwrap();
    }

    #[test]
    fn umem_size_follows_the_configuration() {
        assert_eq!(LockedMemory::umem(1, 4096, 2048, false), DEFAULT);
        assert_eq!(LockedMemory::umem(4, 1024, 4096, false).bytes, 32 << 20);
        // The limits seen on veth (copy mode only): 1024 frames per socket need
        // 8 MiB with zero-copy tried first, 4 MiB without.
        assert_eq!(LockedMemory::umem(1, 1024, 2048, true).bytes, 8 << 20);
        assert_eq!(LockedMemory::umem(1, 1024, 2048, false).bytes, 4 << 20);
        assert_eq!(Bytes(3 << 20).to_string(), "3 MiB");
        assert_eq!(Bytes(8192).to_string(), "8 KiB");
        assert_eq!(Bytes(1000).to_string(), "1000 bytes");
    }

    /// The unit grants exactly `NEEDED`, in both capability lines.
    #[test]
    fn the_systemd_unit_grants_exactly_what_is_needed() {
        let unit = include_str!("../../packaging/wgxdp.service");
        let mut expected: Vec<&str> = NEEDED.iter().map(|n| n.capability.name).collect();
        expected.sort_unstable();
        for key in ["CapabilityBoundingSet=", "AmbientCapabilities="] {
            let line = unit.lines().find_map(|l| l.strip_prefix(key)).unwrap_or_else(|| panic!("no {key}"));
            let mut caps: Vec<&str> = line.split_whitespace().collect();
            caps.sort_unstable();
            assert_eq!(caps, expected, "{key}");
        }
        assert!(unit.contains("\nLimitMEMLOCK=infinity\n"), "the unit must lift RLIMIT_MEMLOCK (no CAP_IPC_LOCK)");
    }
}
