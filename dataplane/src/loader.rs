//! Loading the XDP programs (aya), attaching them to the tunnel-side (WAN) and
//! site-side (LAN) interfaces, and filling their maps.
//!
//! Attachment goes through a BPF link, so the kernel detaches the program when
//! the link's file descriptor closes: on `Drop`, on a clean exit, and even if
//! the process is killed. No program is left behind on the interfaces.

use crate::table::IpPrefix;
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, MapData, PerCpuArray, XskMap};
use aya::programs::{Xdp, XdpFlags};
use aya::Ebpf;
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use wgxdp_common::{config, maps, programs, stat};

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("cannot load the XDP object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("the XDP object has no program `{0}`")]
    MissingProgram(&'static str),
    #[error("the XDP object has no map `{0}`")]
    MissingMap(&'static str),
    #[error("the kernel refused XDP program `{name}`: {source}")]
    Program { name: &'static str, source: aya::programs::ProgramError },
    #[error("interface `{0}` does not exist")]
    NoSuchInterface(String),
    #[error("cannot attach XDP to `{iface}` in native or generic mode: {source}")]
    Attach { iface: String, source: aya::programs::ProgramError },
    #[error("XDP map update failed: {0}")]
    Map(#[from] aya::maps::MapError),
}

/// Which NIC a program or socket belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// Tunnel side: WireGuard UDP.
    Wan,
    /// Site side: plain IP to and from the remote networks.
    Lan,
}

impl Side {
    fn program(self) -> &'static str {
        match self {
            Side::Wan => programs::WAN,
            Side::Lan => programs::LAN,
        }
    }
}

/// How the program was attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    /// In the driver (`XDP_FLAGS_DRV_MODE`): the fast path.
    Native,
    /// Generic/SKB mode: works everywhere, after the kernel built an skb.
    Generic,
}

/// Counters the XDP programs keep, summed over CPUs (indices: `wgxdp_common::stat`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XdpStats(pub [u64; stat::COUNT as usize]);

impl XdpStats {
    pub fn get(&self, index: u32) -> u64 {
        self.0[index as usize]
    }

    /// (name, value) pairs, for logs and metrics.
    pub fn named(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        stat::NAMES.iter().copied().zip(self.0.iter().copied())
    }
}

/// The loaded programs and their maps. Dropping it detaches everything.
pub struct XdpPrograms {
    ebpf: Ebpf,
    wan_xsks: XskMap<MapData>,
    lan_xsks: XskMap<MapData>,
    config: Array<MapData, u32>,
    tunnel_v4: LpmTrie<MapData, [u8; 4], u32>,
    tunnel_v6: LpmTrie<MapData, [u8; 16], u32>,
    stats: PerCpuArray<MapData, u64>,
    wan_addrs_v4: aya::maps::HashMap<MapData, [u8; 4], u8>,
    wan_addrs_v6: aya::maps::HashMap<MapData, [u8; 16], u8>,
    wan_addrs: BTreeSet<IpAddr>,
    tunnel_prefixes: BTreeSet<IpPrefix>,
    attached: Vec<(Side, String, AttachMode)>,
}

impl core::fmt::Debug for XdpPrograms {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("XdpPrograms").field("attached", &self.attached).finish_non_exhaustive()
    }
}

fn take<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T, LoaderError> {
    Ok(T::try_from(ebpf.take_map(name).ok_or(LoaderError::MissingMap(name))?)?)
}

impl XdpPrograms {
    /// Loads the object (both programs are verified now) and sets the listen port.
    pub fn load(object: &[u8], listen_port: u16) -> Result<Self, LoaderError> {
        let mut ebpf = Ebpf::load(object)?;
        for name in [programs::WAN, programs::LAN] {
            let prog: &mut Xdp = ebpf
                .program_mut(name)
                .ok_or(LoaderError::MissingProgram(name))?
                .try_into()
                .map_err(|source| LoaderError::Program { name, source })?;
            prog.load().map_err(|source| LoaderError::Program { name, source })?;
        }
        let mut config: Array<MapData, u32> = take(&mut ebpf, maps::CONFIG)?;
        config.set(config::LISTEN_PORT, u32::from(listen_port), 0)?;
        Ok(Self {
            wan_xsks: take(&mut ebpf, maps::WAN_XSKS)?,
            lan_xsks: take(&mut ebpf, maps::LAN_XSKS)?,
            tunnel_v4: take(&mut ebpf, maps::TUNNEL_V4)?,
            tunnel_v6: take(&mut ebpf, maps::TUNNEL_V6)?,
            stats: take(&mut ebpf, maps::STATS)?,
            wan_addrs_v4: take(&mut ebpf, maps::WAN_ADDRS_V4)?,
            wan_addrs_v6: take(&mut ebpf, maps::WAN_ADDRS_V6)?,
            wan_addrs: BTreeSet::new(),
            config,
            ebpf,
            tunnel_prefixes: BTreeSet::new(),
            attached: Vec::new(),
        })
    }

    /// Attaches `side`'s program to `iface`: native mode, else generic mode (logged).
    /// The interface is looked up in the calling thread's network namespace.
    pub fn attach(&mut self, side: Side, iface: &str) -> Result<AttachMode, LoaderError> {
        let name = side.program();
        let prog: &mut Xdp = self
            .ebpf
            .program_mut(name)
            .ok_or(LoaderError::MissingProgram(name))?
            .try_into()
            .map_err(|source| LoaderError::Program { name, source })?;
        let mode = match prog.attach(iface, XdpFlags::DRV_MODE) {
            Ok(_) => AttachMode::Native,
            Err(aya::programs::ProgramError::UnknownInterface { .. }) => {
                return Err(LoaderError::NoSuchInterface(iface.to_owned()))
            }
            Err(native) => {
                tracing::warn!(%iface, error = %native, "native XDP refused; falling back to generic (SKB) mode");
                prog.attach(iface, XdpFlags::SKB_MODE)
                    .map_err(|source| LoaderError::Attach { iface: iface.to_owned(), source })?;
                AttachMode::Generic
            }
        };
        tracing::info!(%iface, ?side, ?mode, "XDP program attached");
        self.attached.push((side, iface.to_owned(), mode));
        Ok(mode)
    }

    /// Registers the AF_XDP socket serving `queue` on `side`.
    pub fn register_socket(&mut self, side: Side, queue: u32, fd: impl AsRawFd) -> Result<(), LoaderError> {
        let map = match side {
            Side::Wan => &mut self.wan_xsks,
            Side::Lan => &mut self.lan_xsks,
        };
        map.set(queue, fd, 0)?;
        Ok(())
    }

    /// Makes the LAN program steer exactly these destinations (the union of the
    /// peers' allowed IPs), changing only the entries that differ.
    pub fn set_tunnel_prefixes(&mut self, prefixes: &[IpPrefix]) -> Result<(), LoaderError> {
        let wanted: BTreeSet<IpPrefix> = prefixes.iter().copied().collect();
        for p in self.tunnel_prefixes.difference(&wanted) {
            let r = match p.addr() {
                IpAddr::V4(a) => self.tunnel_v4.remove(&Key::new(u32::from(p.len()), a.octets())),
                IpAddr::V6(a) => self.tunnel_v6.remove(&Key::new(u32::from(p.len()), a.octets())),
            };
            if let Err(e) = r {
                tracing::warn!(prefix = %p, error = %e, "removing a tunnel prefix from XDP failed");
            }
        }
        for p in wanted.difference(&self.tunnel_prefixes) {
            match p.addr() {
                IpAddr::V4(a) => self.tunnel_v4.insert(&Key::new(u32::from(p.len()), a.octets()), 1, 0)?,
                IpAddr::V6(a) => self.tunnel_v6.insert(&Key::new(u32::from(p.len()), a.octets()), 1, 0)?,
            }
        }
        self.tunnel_prefixes = wanted;
        Ok(())
    }

    /// Makes the WAN program take WireGuard traffic to exactly these addresses
    /// (the gateway's own); UDP to the port for any other address stays with
    /// the kernel. Changes only the entries that differ.
    pub fn set_wan_addresses(&mut self, addrs: &[IpAddr]) -> Result<(), LoaderError> {
        let wanted: BTreeSet<IpAddr> = addrs.iter().copied().collect();
        for a in self.wan_addrs.difference(&wanted) {
            let r = match a {
                IpAddr::V4(a) => self.wan_addrs_v4.remove(&a.octets()),
                IpAddr::V6(a) => self.wan_addrs_v6.remove(&a.octets()),
            };
            if let Err(e) = r {
                tracing::warn!(addr = %a, error = %e, "removing a WAN address from XDP failed");
            }
        }
        for a in wanted.difference(&self.wan_addrs) {
            match a {
                IpAddr::V4(a) => self.wan_addrs_v4.insert(a.octets(), 1, 0)?,
                IpAddr::V6(a) => self.wan_addrs_v6.insert(a.octets(), 1, 0)?,
            }
        }
        self.wan_addrs = wanted;
        Ok(())
    }

    /// The programs' counters, summed over CPUs.
    pub fn stats(&self) -> Result<XdpStats, LoaderError> {
        let mut s = XdpStats::default();
        for (i, slot) in s.0.iter_mut().enumerate() {
            *slot = self.stats.get(&(i as u32), 0)?.iter().sum();
        }
        Ok(s)
    }

    /// Interfaces the programs are attached to.
    pub fn attached(&self) -> &[(Side, String, AttachMode)] {
        &self.attached
    }

    /// The listen port the WAN program steers.
    pub fn listen_port(&self) -> Result<u16, LoaderError> {
        Ok(self.config.get(&config::LISTEN_PORT, 0)? as u16)
    }
}

// ---------------------------------------------------------------------------
// Finding and removing XDP programs by interface, without a loaded object:
// for `wgxdp detach` after a crash and for `serve` taking over an interface.
// Plain rtnetlink (`RTM_GETLINK` / `RTM_SETLINK` with `IFLA_XDP`).

/// The mode an attached XDP program runs in, as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XdpMode {
    Driver,
    Generic,
    Offload,
}

impl XdpMode {
    /// `XDP_FLAGS_*_MODE` for this mode.
    fn flags(self) -> u32 {
        match self {
            XdpMode::Generic => 1 << 1,
            XdpMode::Driver => 1 << 2,
            XdpMode::Offload => 1 << 3,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            XdpMode::Driver => "driver",
            XdpMode::Generic => "generic",
            XdpMode::Offload => "offload",
        }
    }
}

/// One XDP program attached to an interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttachedXdp {
    pub prog_id: u32,
    pub mode: XdpMode,
}

#[derive(Debug, thiserror::Error)]
pub enum DetachError {
    #[error("interface `{0}` does not exist (in this network namespace)")]
    NoSuchInterface(String),
    #[error(
        "the XDP program on `{iface}` ({mode} mode) is held by a BPF link of a running process \
         (is `wgxdp serve` still running? stop it; its programs go with it)"
    )]
    HeldByLink { iface: String, mode: &'static str },
    #[error("netlink request for `{iface}` failed: {source}")]
    Netlink { iface: String, source: std::io::Error },
}

mod rtnl {
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    const NLMSG_ERROR: u16 = 2;
    const NLMSG_DONE: u16 = 3;
    const RTM_NEWLINK: u16 = 16;
    pub const RTM_GETLINK: u16 = 18;
    pub const RTM_SETLINK: u16 = 19;
    const NLM_F_REQUEST: u16 = 1;
    const NLM_F_ACK: u16 = 4;
    const NLA_F_NESTED: u16 = 1 << 15;
    const IFLA_XDP: u16 = 43;
    pub const IFLA_XDP_FD: u16 = 1;
    pub const IFLA_XDP_FLAGS: u16 = 3;
    const IFLA_XDP_DRV_PROG_ID: u16 = 5;
    const IFLA_XDP_SKB_PROG_ID: u16 = 6;
    const IFLA_XDP_HW_PROG_ID: u16 = 7;
    const HDR: usize = 16;
    const IFINFO: usize = 16;

    fn align4(n: usize) -> usize {
        (n + 3) & !3
    }

    fn u16_at(b: &[u8], at: usize) -> Option<u16> {
        Some(u16::from_ne_bytes(b.get(at..at.checked_add(2)?)?.try_into().ok()?))
    }

    fn u32_at(b: &[u8], at: usize) -> Option<u32> {
        Some(u32::from_ne_bytes(b.get(at..at.checked_add(4)?)?.try_into().ok()?))
    }

    /// (type, payload) of each attribute in `b`; stops at the first malformed one.
    fn attrs(b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
        let mut at = 0usize;
        std::iter::from_fn(move || {
            let len = usize::from(u16_at(b, at)?);
            let kind = u16_at(b, at + 2)? & !NLA_F_NESTED;
            let payload = b.get(at + 4..at.checked_add(len)?).filter(|_| len >= 4)?;
            at = at.checked_add(align4(len))?;
            Some((kind, payload))
        })
    }

    /// A request: header, `ifinfomsg` for `ifindex`, then `attrs` (already encoded).
    pub fn request(kind: u16, seq: u32, ifindex: u32, attrs: &[u8]) -> Vec<u8> {
        let len = HDR + IFINFO + attrs.len();
        let mut m = Vec::with_capacity(len);
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        let flags = if kind == RTM_SETLINK { NLM_F_REQUEST | NLM_F_ACK } else { NLM_F_REQUEST };
        m.extend_from_slice(&flags.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        // ifinfomsg: family AF_UNSPEC, pad, type, index, flags, change.
        m.extend_from_slice(&[0, 0, 0, 0]);
        m.extend_from_slice(&(ifindex as i32).to_ne_bytes());
        m.extend_from_slice(&[0; 8]);
        m.extend_from_slice(attrs);
        m
    }

    /// `IFLA_XDP { IFLA_XDP_FD = -1, IFLA_XDP_FLAGS = flags }`: detach in one mode.
    pub fn xdp_detach_attr(flags: u32) -> Vec<u8> {
        let mut inner = Vec::new();
        inner.extend_from_slice(&8u16.to_ne_bytes());
        inner.extend_from_slice(&IFLA_XDP_FD.to_ne_bytes());
        inner.extend_from_slice(&(-1i32).to_ne_bytes());
        inner.extend_from_slice(&8u16.to_ne_bytes());
        inner.extend_from_slice(&IFLA_XDP_FLAGS.to_ne_bytes());
        inner.extend_from_slice(&flags.to_ne_bytes());
        let mut a = Vec::new();
        a.extend_from_slice(&((4 + inner.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&(IFLA_XDP | NLA_F_NESTED).to_ne_bytes());
        a.extend_from_slice(&inner);
        a
    }

    /// What a reply to request `seq` says.
    #[derive(Debug, PartialEq, Eq)]
    pub enum Reply {
        /// An `NLMSG_ERROR`: 0 is an acknowledgement, else a negative errno.
        Ack(i32),
        /// `RTM_NEWLINK`: (driver, generic, offload) program ids, 0 = none.
        Link([u32; 3]),
    }

    /// Parses one datagram from the kernel, keeping only messages for `seq`
    /// from the kernel itself (`nl_pid` 0 is checked by the caller's socket
    /// address); malformed input is ignored, never a panic.
    pub fn parse(buf: &[u8], seq: u32) -> Option<Reply> {
        let mut at = 0usize;
        while let Some(len) = u32_at(buf, at).map(|l| l as usize) {
            let msg = buf.get(at..at.checked_add(len)?).filter(|_| len >= HDR)?;
            let kind = u16_at(msg, 4)?;
            if u32_at(msg, 8)? == seq {
                match kind {
                    NLMSG_ERROR => return Some(Reply::Ack(u32_at(msg, HDR)? as i32)),
                    RTM_NEWLINK => {
                        let mut ids = [0u32; 3];
                        for (k, payload) in attrs(msg.get(HDR + IFINFO..)?) {
                            if k != IFLA_XDP {
                                continue;
                            }
                            for (k, v) in attrs(payload) {
                                let slot = match k {
                                    IFLA_XDP_DRV_PROG_ID => 0,
                                    IFLA_XDP_SKB_PROG_ID => 1,
                                    IFLA_XDP_HW_PROG_ID => 2,
                                    _ => continue,
                                };
                                ids[slot] = u32_at(v, 0).unwrap_or(0);
                            }
                        }
                        return Some(Reply::Link(ids));
                    }
                    NLMSG_DONE => return None,
                    _ => {}
                }
            }
            at = at.checked_add(align4(len))?;
        }
        None
    }

    /// Sends `msg` on a fresh `NETLINK_ROUTE` socket and returns the kernel's reply to `seq`.
    pub fn call(msg: &[u8], seq: u32) -> io::Result<Reply> {
        // SAFETY: socket(2) with constant arguments; the result is checked below.
        let raw = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new, valid descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let timeout = libc::timeval { tv_sec: 5, tv_usec: 0 };
        // SAFETY: `timeout` is a valid timeval and the length given is its size.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: an all-zero sockaddr_nl is valid (pid 0, groups 0 = the kernel).
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: `msg` is valid for its length; `kernel` is a valid sockaddr_nl of the size given.
        let sent = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&kernel as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: an all-zero sockaddr_nl is valid; recvfrom fills it.
            let mut from: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
            let mut from_len = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
            // SAFETY: `buf` is writable for its length; `from`/`from_len` describe a valid sockaddr_nl.
            let n = unsafe {
                libc::recvfrom(
                    fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&mut from as *mut libc::sockaddr_nl).cast(),
                    &mut from_len,
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            if from.nl_pid != 0 {
                continue; // not from the kernel
            }
            if let Some(reply) = parse(buf.get(..n as usize).unwrap_or(&[]), seq) {
                return Ok(reply);
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn parses_link_replies_and_acks_for_our_sequence_only() {
            let mut xdp = Vec::new();
            for (kind, id) in [(IFLA_XDP_DRV_PROG_ID, 7u32), (IFLA_XDP_SKB_PROG_ID, 9)] {
                xdp.extend_from_slice(&8u16.to_ne_bytes());
                xdp.extend_from_slice(&kind.to_ne_bytes());
                xdp.extend_from_slice(&id.to_ne_bytes());
            }
            let mut attr = Vec::new();
            attr.extend_from_slice(&((4 + xdp.len()) as u16).to_ne_bytes());
            attr.extend_from_slice(&(IFLA_XDP | NLA_F_NESTED).to_ne_bytes());
            attr.extend_from_slice(&xdp);
            let mut link = request(RTM_NEWLINK, 5, 3, &attr);
            assert_eq!(parse(&link, 5), Some(Reply::Link([7, 9, 0])));
            assert_eq!(parse(&link, 6), None, "another request's reply");
            let mut ack = request(NLMSG_ERROR, 6, 0, &[]);
            ack[HDR..HDR + 4].copy_from_slice(&(-16i32).to_ne_bytes());
            assert_eq!(parse(&ack, 6), Some(Reply::Ack(-16)));
            for cut in 0..link.len() {
                let _ = parse(&link[..cut], 5);
            }
            link[0] = 0xff;
            let _ = parse(&link, 5);
        }
    }
}

fn ifindex(iface: &str) -> Result<u32, DetachError> {
    let name = std::ffi::CString::new(iface).map_err(|_| DetachError::NoSuchInterface(iface.to_owned()))?;
    // SAFETY: `name` is a valid NUL-terminated string for the duration of the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(DetachError::NoSuchInterface(iface.to_owned()));
    }
    Ok(index)
}

fn next_seq() -> u32 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static SEQ: AtomicU32 = AtomicU32::new(1);
    SEQ.fetch_add(1, Ordering::Relaxed)
}

/// The XDP programs attached to `iface` (in the calling thread's network namespace).
pub fn attached_programs(iface: &str) -> Result<Vec<AttachedXdp>, DetachError> {
    let index = ifindex(iface)?;
    let seq = next_seq();
    let netlink = |source| DetachError::Netlink { iface: iface.to_owned(), source };
    match rtnl::call(&rtnl::request(rtnl::RTM_GETLINK, seq, index, &[]), seq).map_err(netlink)? {
        rtnl::Reply::Link(ids) => Ok([XdpMode::Driver, XdpMode::Generic, XdpMode::Offload]
            .into_iter()
            .zip(ids)
            .filter(|(_, id)| *id != 0)
            .map(|(mode, prog_id)| AttachedXdp { prog_id, mode })
            .collect()),
        rtnl::Reply::Ack(e) => Err(netlink(std::io::Error::from_raw_os_error(-e))),
    }
}

/// Removes every XDP program attached to `iface` and returns what it removed.
/// A program held by a live BPF link (a running `serve`) cannot be removed
/// this way: `DetachError::HeldByLink`. A program whose process died is gone
/// with its link; programs attached through netlink (by older versions,
/// `ip link`, libxdp) stay until removed here.
pub fn detach_programs(iface: &str) -> Result<Vec<AttachedXdp>, DetachError> {
    let found = attached_programs(iface)?;
    for p in &found {
        let seq = next_seq();
        let msg = rtnl::request(rtnl::RTM_SETLINK, seq, ifindex(iface)?, &rtnl::xdp_detach_attr(p.mode.flags()));
        match rtnl::call(&msg, seq).map_err(|source| DetachError::Netlink { iface: iface.to_owned(), source })? {
            rtnl::Reply::Ack(0) => {
                tracing::info!(%iface, prog_id = p.prog_id, mode = p.mode.as_str(), "XDP program removed")
            }
            rtnl::Reply::Ack(e) if -e == libc::EBUSY => {
                return Err(DetachError::HeldByLink { iface: iface.to_owned(), mode: p.mode.as_str() })
            }
            rtnl::Reply::Ack(e) => {
                return Err(DetachError::Netlink {
                    iface: iface.to_owned(),
                    source: std::io::Error::from_raw_os_error(-e),
                })
            }
            rtnl::Reply::Link(_) => {}
        }
    }
    Ok(found)
}

/// Attaches the program `prog_fd` to `iface` through netlink, without a BPF
/// link, in `mode`: what `ip link`, libxdp and older tools do, and what then
/// stays attached after the process exits. For tests of `detach_programs`
/// and of `serve` taking over an interface; production attaches with links.
#[doc(hidden)]
pub fn attach_without_link(
    iface: &str,
    prog_fd: std::os::fd::BorrowedFd<'_>,
    mode: XdpMode,
) -> Result<(), DetachError> {
    use std::os::fd::AsRawFd;
    let mut attr = rtnl::xdp_detach_attr(mode.flags());
    // Same attribute layout; the fd sits right after the nested header and the inner header.
    attr[8..12].copy_from_slice(&prog_fd.as_raw_fd().to_ne_bytes());
    let seq = next_seq();
    let msg = rtnl::request(rtnl::RTM_SETLINK, seq, ifindex(iface)?, &attr);
    let netlink = |source| DetachError::Netlink { iface: iface.to_owned(), source };
    match rtnl::call(&msg, seq).map_err(netlink)? {
        rtnl::Reply::Ack(0) | rtnl::Reply::Link(_) => Ok(()),
        rtnl::Reply::Ack(e) => Err(netlink(std::io::Error::from_raw_os_error(-e))),
    }
}
