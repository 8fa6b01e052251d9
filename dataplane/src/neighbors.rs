//! Next-hop MAC addresses for the site-side NIC.
//!
//! Workers look up a lock-free snapshot (`NeighborTable::lookup`). On a miss a
//! worker never waits: it hands that one packet to the kernel through a raw IP
//! socket (`RawInjector`; the kernel resolves ARP/ND and queues the packet while
//! it does) and asks the resolver thread to refresh. The resolver reads the
//! kernel's neighbour table over rtnetlink (`netlink.rs`) once a second and
//! shortly after each request, and publishes a new snapshot.

use crate::table::FastMap;
use crate::wire::MacAddr;
use arc_swap::ArcSwap;
use crossbeam_channel::{Receiver, Sender, TrySendError};
use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct NeighborTable {
    map: ArcSwap<FastMap<IpAddr, MacAddr>>,
    requests: Sender<IpAddr>,
}

impl NeighborTable {
    /// A table and the receiving end of its resolution requests.
    pub fn new() -> (Arc<Self>, Receiver<IpAddr>) {
        let (tx, rx) = crossbeam_channel::bounded(1024);
        (Arc::new(Self { map: ArcSwap::from_pointee(FastMap::default()), requests: tx }), rx)
    }

    #[inline]
    pub fn lookup(&self, ip: IpAddr) -> Option<MacAddr> {
        self.map.load().get(&ip).copied()
    }

    /// Asks for `ip` to be resolved; never blocks (a full queue drops the ask:
    /// the periodic refresh still runs).
    pub fn request(&self, ip: IpAddr) {
        match self.requests.try_send(ip) {
            Ok(()) | Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {}
        }
    }

    pub fn replace(&self, map: HashMap<IpAddr, MacAddr>) {
        self.map.store(Arc::new(map.into_iter().collect()));
    }
}

/// Keeps `table` in step with the kernel until `stop` is set.
pub fn run_resolver(table: Arc<NeighborTable>, requests: Receiver<IpAddr>, iface: String, stop: Arc<AtomicBool>) {
    let mut last_refresh = Instant::now() - Duration::from_secs(10);
    while !stop.load(Ordering::Relaxed) {
        let asked = requests.recv_timeout(Duration::from_millis(200)).is_ok();
        if asked {
            // Give the kernel a moment to finish resolving what the worker injected,
            // and fold the burst of requests into one refresh.
            std::thread::sleep(Duration::from_millis(20));
            while requests.try_recv().is_ok() {}
        }
        if asked || last_refresh.elapsed() >= Duration::from_secs(1) {
            match crate::netlink::read_neighbors(&iface) {
                Ok(map) => table.replace(map),
                Err(e) => tracing::warn!(%iface, error = %e, "reading the neighbour table failed"),
            }
            last_refresh = Instant::now();
        }
    }
}

/// Raw IP sockets that hand a complete IP packet to the kernel's routing (it
/// resolves the next hop itself). Used only for neighbour misses.
#[derive(Debug)]
pub struct RawInjector {
    v4: OwnedFd,
    v6: OwnedFd,
}

fn raw_socket(family: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(family, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::IPPROTO_RAW) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl RawInjector {
    pub fn new() -> io::Result<Self> {
        Ok(Self { v4: raw_socket(libc::AF_INET)?, v6: raw_socket(libc::AF_INET6)? })
    }

    /// Sends `packet` (a whole IP packet, header included) towards `dst`.
    pub fn send(&self, packet: &[u8], dst: IpAddr) -> io::Result<()> {
        let rc = match dst {
            IpAddr::V4(a) => {
                // SAFETY: all-zero is a valid sockaddr_in; fields are set below.
                let mut sa: libc::sockaddr_in = unsafe { core::mem::zeroed() };
                sa.sin_family = libc::AF_INET as libc::sa_family_t;
                sa.sin_addr = libc::in_addr { s_addr: u32::from_ne_bytes(a.octets()) };
                // SAFETY: `packet` and `sa` are valid for the lengths passed.
                unsafe {
                    libc::sendto(
                        self.v4.as_raw_fd(),
                        packet.as_ptr().cast(),
                        packet.len(),
                        libc::MSG_DONTWAIT,
                        (&sa as *const libc::sockaddr_in).cast(),
                        core::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                    )
                }
            }
            IpAddr::V6(a) => {
                // SAFETY: all-zero is a valid sockaddr_in6; fields are set below.
                let mut sa: libc::sockaddr_in6 = unsafe { core::mem::zeroed() };
                sa.sin6_family = libc::AF_INET6 as libc::sa_family_t;
                sa.sin6_addr = libc::in6_addr { s6_addr: a.octets() };
                // SAFETY: `packet` and `sa` are valid for the lengths passed.
                unsafe {
                    libc::sendto(
                        self.v6.as_raw_fd(),
                        packet.as_ptr().cast(),
                        packet.len(),
                        libc::MSG_DONTWAIT,
                        (&sa as *const libc::sockaddr_in6).cast(),
                        core::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
                    )
                }
            }
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_see_published_snapshots_and_requests_never_block() {
        let (t, rx) = NeighborTable::new();
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(t.lookup(ip), None);
        t.replace(HashMap::from([(ip, MacAddr([1; 6]))]));
        assert_eq!(t.lookup(ip), Some(MacAddr([1; 6])));
        for _ in 0..5000 {
            t.request(ip);
        }
        assert_eq!(rx.len(), 1024);
    }
}
