//! The gateway host as the data plane sees it.
//!
//! - Its own addresses (`HostAddresses`, every interface's, followed as they
//!   change): a packet from a tunnel to one of them is for the host itself and
//!   needs an explicit allow rule.
//! - A TUN interface (`HostTun`) that is the kernel's view of the tunnels.
//!   Packets from a tunnel for the host itself (an allow rule let them) enter
//!   the kernel through it as *received* traffic, never as locally generated,
//!   so the host's INPUT rules and reverse-path filtering apply. The routes to
//!   every tunnel prefix point at it, so the host's own packets to a remote
//!   site (its replies to an allowed ping, say) come out of it and are sealed
//!   into the tunnel.

use crate::netlink::{self, Rtnetlink};
use crate::table::IpPrefix;
use arc_swap::ArcSwap;
use std::collections::BTreeSet;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Every address of the gateway host, a lock-free sorted snapshot, behind a
/// one-word filter (a bit per address hash) that answers "no" for most
/// addresses without touching the snapshot.
#[derive(Debug, Default)]
pub struct HostAddresses {
    sorted: ArcSwap<Vec<IpAddr>>,
    filter: AtomicU64,
}

/// The filter bit of `ip`.
#[inline]
fn filter_bit(ip: IpAddr) -> u64 {
    let key = crate::table::addr_key(ip);
    let folded = (key as u64) ^ ((key >> 64) as u64);
    1 << (folded.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 58)
}

impl HostAddresses {
    pub fn new(addresses: Vec<IpAddr>) -> Self {
        let h = Self::default();
        h.replace(addresses);
        h
    }

    #[inline]
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.filter.load(Ordering::Acquire) & filter_bit(ip) != 0 && self.sorted.load().binary_search(&ip).is_ok()
    }

    /// Publishes `addresses` if they changed; true if they did.
    pub fn replace(&self, mut addresses: Vec<IpAddr>) -> bool {
        addresses.sort_unstable();
        addresses.dedup();
        if **self.sorted.load() == addresses {
            return false;
        }
        // Widen the filter first, narrow it after: a reader never misses an
        // address that is in both the old and the new set.
        let filter = addresses.iter().fold(0, |f, &ip| f | filter_bit(ip));
        self.filter.fetch_or(filter, Ordering::AcqRel);
        self.sorted.store(Arc::new(addresses));
        self.filter.store(filter, Ordering::Release);
        true
    }

    pub fn snapshot(&self) -> Arc<Vec<IpAddr>> {
        self.sorted.load_full()
    }
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TUN: libc::c_short = 0x0001;
const IFF_NO_PI: libc::c_short = 0x1000;
/// Fail rather than attach to an existing (persistent) TUN device.
const IFF_TUN_EXCL: libc::c_short = -0x8000;
const IFNAMSIZ: usize = 16;

/// `struct ifreq`: the name, then the union (flags as a short, or the MTU
/// as an int, in native byte order).
#[repr(C)]
struct IfReq {
    name: [libc::c_char; IFNAMSIZ],
    union: [u8; 24],
}

impl IfReq {
    fn new(name: &str) -> io::Result<Self> {
        if name.is_empty() || name.len() >= IFNAMSIZ || name.bytes().any(|b| b == 0 || b == b'/' || b <= b' ') {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("`{name}` is not an interface name")));
        }
        let mut req = Self { name: [0; IFNAMSIZ], union: [0; 24] };
        for (d, s) in req.name.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        Ok(req)
    }

    fn flags(&self) -> libc::c_short {
        libc::c_short::from_ne_bytes([self.union[0], self.union[1]])
    }

    fn set_flags(&mut self, flags: libc::c_short) {
        self.union[..2].copy_from_slice(&flags.to_ne_bytes());
    }

    fn set_int(&mut self, value: libc::c_int) {
        self.union[..4].copy_from_slice(&value.to_ne_bytes());
    }

    /// Issues `request` on `fd` with this ifreq.
    fn ioctl(&mut self, fd: i32, request: libc::c_ulong) -> io::Result<()> {
        // SAFETY: `self` is a valid, initialised ifreq-compatible struct of
        // the size the kernel reads or writes for these requests.
        if unsafe { libc::ioctl(fd, request as _, self as *mut Self) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// The gateway's TUN interface (removed by the kernel when this is dropped).
#[derive(Debug)]
pub struct HostTun {
    fd: OwnedFd,
    name: String,
    ifindex: u32,
}

impl HostTun {
    /// Creates `name` (IFF_TUN, no packet information), non-blocking, with
    /// `mtu`, and brings it up. An existing device of that name is an error
    /// (never attached to: its traffic and routes are not ours).
    pub fn open(name: &str, mtu: usize) -> io::Result<Self> {
        // SAFETY: open(2) on a constant NUL-terminated path; checked below.
        let raw = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new, valid descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut req = IfReq::new(name)?;
        req.set_flags(IFF_TUN | IFF_NO_PI | IFF_TUN_EXCL);
        req.ioctl(fd.as_raw_fd(), TUNSETIFF)?;
        // Flags and MTU are set through any socket.
        // SAFETY: socket(2) with constant arguments; checked below.
        let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if sock < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `sock` is a new, valid descriptor that nothing else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(sock) };
        let mut req = IfReq::new(name)?;
        req.set_int(libc::c_int::try_from(mtu).unwrap_or(libc::c_int::MAX));
        req.ioctl(sock.as_raw_fd(), libc::SIOCSIFMTU as libc::c_ulong)?;
        let mut req = IfReq::new(name)?;
        req.ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS as libc::c_ulong)?;
        let up = req.flags() | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        req.set_flags(up);
        req.ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS as libc::c_ulong)?;
        let ifindex = netlink::ifindex(name)?;
        Ok(Self { fd, name: name.to_owned(), ifindex })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn raw_fd(&self) -> i32 {
        self.fd.as_raw_fd()
    }

    /// Hands one IP packet to the kernel, as received on this interface.
    /// Never blocks.
    pub fn write(&self, packet: &[u8]) -> io::Result<()> {
        // SAFETY: `packet` is valid for reads of its length.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), packet.as_ptr().cast(), packet.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// One packet the kernel routed into a tunnel; `WouldBlock` when none waits.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Makes the routes through this interface exactly `prefixes` (given
    /// what earlier calls did, `routes`, which it updates). As `update_routes`.
    pub fn sync_routes(&self, routes: &mut HostRoutes, prefixes: &[IpPrefix]) -> io::Result<bool> {
        let wanted: BTreeSet<IpPrefix> = prefixes.iter().copied().collect();
        let known = routes.installed.iter().chain(&routes.refused);
        let mut changes: Vec<(IpPrefix, bool)> = known.filter(|p| !wanted.contains(p)).map(|p| (*p, false)).collect();
        changes.extend(wanted.iter().map(|p| (*p, true)));
        self.update_routes(routes, &changes)
    }

    /// Routes (`true`) or stops routing each prefix of `changes` through this
    /// interface; the others stay as they are. A netlink request per prefix
    /// that changes: one gateway of thousands changes one route. A prefix the
    /// host already routes elsewhere is left alone, with a warning (once: it
    /// is not tried again while it stays wanted); the host's own packets to
    /// it then do not enter the tunnel. False if a change failed (logged;
    /// the routes stay as they were for it).
    pub fn update_routes(&self, routes: &mut HostRoutes, changes: &[(IpPrefix, bool)]) -> io::Result<bool> {
        let mut nl = None;
        let mut all_done = true;
        for &(p, wanted) in changes {
            if !wanted {
                // Tried again if it is wanted again.
                routes.refused.remove(&p);
            }
            let add = wanted && !routes.installed.contains(&p) && !routes.refused.contains(&p);
            let remove = !wanted && routes.installed.contains(&p);
            if !add && !remove {
                continue;
            }
            let nl = match &mut nl {
                Some(nl) => nl,
                None => nl.insert(Rtnetlink::open()?),
            };
            match netlink::interface_route(nl, &p, self.ifindex, add) {
                Ok(()) if add => {
                    routes.installed.insert(p);
                }
                Ok(()) => {
                    routes.installed.remove(&p);
                }
                Err(e) if !add && e.raw_os_error() == Some(libc::ESRCH) => {
                    routes.installed.remove(&p);
                }
                // Still ours in the kernel: kept, for a later sync to remove.
                Err(e) if !add => {
                    tracing::warn!(prefix = %p, error = %e, "removing a tunnel route failed");
                    all_done = false;
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    tracing::warn!(
                        prefix = %p, interface = %self.name,
                        "the host already routes this tunnel prefix elsewhere; its own packets to it will not enter \
                         the tunnel (not tried again while the prefix stays)"
                    );
                    routes.refused.insert(p);
                }
                Err(e) => {
                    tracing::warn!(prefix = %p, error = %e, "adding a tunnel route failed");
                    all_done = false;
                }
            }
        }
        Ok(all_done)
    }
}

/// The host routes `HostTun::sync_routes` keeps: those it added through the
/// interface, and those the host already routed elsewhere (warned about
/// once, and left alone while the prefix stays wanted).
#[derive(Debug, Default)]
pub struct HostRoutes {
    installed: BTreeSet<IpPrefix>,
    refused: BTreeSet<IpPrefix>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The routes `ip` shows through `dev`, as text.
    fn routes_through(dev: &str) -> Vec<String> {
        let out = std::process::Command::new("ip").args(["route", "show", "dev", dev]).output().expect("ip");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.split_whitespace().next().unwrap_or("").to_owned())
            .collect()
    }

    /// In a network namespace of this test's own (root, as the suite runs):
    /// only the difference reaches the kernel, a prefix the host routes
    /// elsewhere is refused once and not retried while it stays, and one
    /// that stops being wanted leaves.
    #[test]
    fn host_routes_follow_the_wanted_set() {
        std::thread::spawn(|| {
            // SAFETY: unshare(2) with a constant flag, on this thread only (its
            // own network namespace; the thread ends with the test).
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "{}", io::Error::last_os_error());
            let ip = |args: &[&str]| assert!(std::process::Command::new("ip").args(args).status().unwrap().success());
            ip(&["link", "set", "lo", "up"]);
            ip(&["route", "add", "10.3.0.0/16", "dev", "lo"]);
            let tun = HostTun::open("wgxdp-rt0", 1420).expect("a TUN device");
            let p = |s: &str| s.parse::<IpPrefix>().unwrap();
            let mut routes = HostRoutes::default();
            tun.sync_routes(&mut routes, &[p("10.1.0.0/16"), p("10.2.0.0/16"), p("10.3.0.0/16")]).unwrap();
            assert_eq!(routes_through("wgxdp-rt0"), ["10.1.0.0/16", "10.2.0.0/16"]);
            assert_eq!(routes.refused.iter().copied().collect::<Vec<_>>(), [p("10.3.0.0/16")]);
            // Someone removes ours behind our back: a sync that changes nothing leaves it so.
            ip(&["route", "del", "10.2.0.0/16", "dev", "wgxdp-rt0"]);
            tun.sync_routes(&mut routes, &[p("10.1.0.0/16"), p("10.2.0.0/16"), p("10.3.0.0/16")]).unwrap();
            assert_eq!(routes_through("wgxdp-rt0"), ["10.1.0.0/16"], "no request for what did not change");
            // 10.1 leaves; 10.3 is no longer wanted, so it would be tried again.
            ip(&["route", "del", "10.3.0.0/16", "dev", "lo"]);
            tun.sync_routes(&mut routes, &[p("10.2.0.0/16")]).unwrap();
            assert!(routes.refused.is_empty() && routes_through("wgxdp-rt0").is_empty());
            tun.sync_routes(&mut routes, &[p("10.2.0.0/16"), p("10.3.0.0/16")]).unwrap();
            assert_eq!(routes_through("wgxdp-rt0"), ["10.3.0.0/16"]);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn host_addresses_are_a_sorted_set() {
        let h = HostAddresses::default();
        let a: IpAddr = "10.50.0.1".parse().unwrap();
        let b: IpAddr = "fd50::1".parse().unwrap();
        assert!(!h.contains(a));
        assert!(h.replace(vec![b, a, a]));
        assert!(h.contains(a) && h.contains(b));
        assert!(!h.replace(vec![a, b]), "unchanged");
        assert!(!h.contains("10.50.0.2".parse().unwrap()));
        // Many addresses: every one is found through the filter, others are not.
        let many: Vec<IpAddr> = (0..200u32).map(|i| IpAddr::from((0x0a00_0000 + i * 7).to_be_bytes())).collect();
        h.replace(many.clone());
        assert!(many.iter().all(|&ip| h.contains(ip)));
        assert!(!h.contains(a) && !h.contains(IpAddr::from([10, 0, 0, 1])));
    }

    #[test]
    fn interface_names_are_checked() {
        for bad in ["", "a-name-too-long-x", "a/b", "a b", "a\0b"] {
            assert!(IfReq::new(bad).is_err(), "{bad:?}");
        }
        assert!(IfReq::new("wgxdp0").is_ok());
    }
}
