//! Loading the XDP programs (aya), attaching them to the tunnel-side (WAN) and
//! site-side (LAN) interfaces, and filling their maps.
//!
//! Attachment goes through a BPF link, so the kernel detaches the program when
//! the link's file descriptor closes: on `Drop`, on a clean exit, and even if
//! the process is killed. No program is left behind on the interfaces.

use crate::netlink;
use crate::table::IpPrefix;
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, MapData, PerCpuArray, XskMap};
use aya::programs::{Xdp, XdpFlags};
use aya::Ebpf;
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
/// Most tunnel prefixes the LAN program steers, per address family.
pub use wgxdp_common::MAX_TUNNEL_PREFIXES;
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
        let gone = self.tunnel_prefixes.difference(&wanted).map(|p| (*p, false));
        let changes: Vec<(IpPrefix, bool)> =
            gone.chain(wanted.difference(&self.tunnel_prefixes).map(|p| (*p, true))).collect();
        self.update_tunnel_prefixes(&changes)
    }

    /// Steers (`true`) or stops steering each prefix of `changes`; the others
    /// stay as they are. O(k log n) for k changes: what one peer's change
    /// costs, however many peers there are. Each entry is recorded as soon as
    /// the map took it, so a failure midway leaves nothing untracked.
    pub fn update_tunnel_prefixes(&mut self, changes: &[(IpPrefix, bool)]) -> Result<(), LoaderError> {
        for &(p, wanted) in changes {
            let held = self.tunnel_prefixes.contains(&p);
            if wanted && !held {
                match p.addr() {
                    IpAddr::V4(a) => self.tunnel_v4.insert(&Key::new(u32::from(p.prefix_len()), a.octets()), 1, 0)?,
                    IpAddr::V6(a) => self.tunnel_v6.insert(&Key::new(u32::from(p.prefix_len()), a.octets()), 1, 0)?,
                }
                self.tunnel_prefixes.insert(p);
            } else if !wanted && held {
                let r = match p.addr() {
                    IpAddr::V4(a) => self.tunnel_v4.remove(&Key::new(u32::from(p.prefix_len()), a.octets())),
                    IpAddr::V6(a) => self.tunnel_v6.remove(&Key::new(u32::from(p.prefix_len()), a.octets())),
                };
                if let Err(e) = r {
                    tracing::warn!(prefix = %p, error = %e, "removing a tunnel prefix from XDP failed");
                }
                self.tunnel_prefixes.remove(&p);
            }
        }
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachedXdp {
    pub prog_id: u32,
    pub mode: XdpMode,
    /// The program's name as the kernel reports it (`None`: could not be read).
    pub name: Option<String>,
    /// Attached through a BPF link: a running process holds it.
    pub held_by_link: bool,
}

impl AttachedXdp {
    /// One of wgxdp's programs (by the name the kernel reports).
    pub fn is_ours(&self) -> bool {
        matches!(self.name.as_deref(), Some(n) if n == programs::WAN || n == programs::LAN)
    }

    fn name_or_unknown(&self) -> String {
        self.name.clone().unwrap_or_else(|| "unknown name".into())
    }
}

impl XdpMode {
    /// The `ip link set dev IFACE … off` keyword that removes a program in this mode.
    pub fn ip_link_keyword(self) -> &'static str {
        match self {
            XdpMode::Driver => "xdpdrv",
            XdpMode::Generic => "xdpgeneric",
            XdpMode::Offload => "xdpoffload",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DetachError {
    #[error("interface `{0}` does not exist (in this network namespace)")]
    NoSuchInterface(String),
    #[error(
        "XDP program {prog_id} (`{name}`) on `{iface}` ({mode} mode) is held by a BPF link of a running process \
         (is `wgxdp serve` still running? stop it; its programs go with it)"
    )]
    HeldByLink { iface: String, prog_id: u32, name: String, mode: &'static str },
    #[error(
        "XDP program {prog_id} (`{name}`, {mode} mode) on `{iface}` is not wgxdp's, so it was left alone \
         (another tool's?); if it is not needed, remove it with `ip link set dev {iface} {keyword} off` \
         or `wgxdp detach --force`"
    )]
    NotOurs { iface: String, prog_id: u32, name: String, mode: &'static str, keyword: &'static str },
    #[error("netlink request for `{iface}` failed: {source}")]
    Netlink { iface: String, source: std::io::Error },
}

/// `IFLA_XDP` and its nested attributes (linux/if_link.h).
mod ifla {
    pub const XDP: u16 = 43;
    pub const XDP_FD: u16 = 1;
    pub const XDP_FLAGS: u16 = 3;
    pub const XDP_DRV_PROG_ID: u16 = 5;
    pub const XDP_SKB_PROG_ID: u16 = 6;
    pub const XDP_HW_PROG_ID: u16 = 7;
    /// `ifinfomsg`: family, pad, type, index, flags, change.
    pub const IFINFO_LEN: usize = 16;
}

/// `ifinfomsg` for `index`, then `attrs`.
fn link_body(index: u32, attrs: &[u8]) -> Vec<u8> {
    let mut body = vec![0u8; ifla::IFINFO_LEN];
    body[4..8].copy_from_slice(&(index as i32).to_ne_bytes());
    body.extend_from_slice(attrs);
    body
}

/// `IFLA_XDP { IFLA_XDP_FD = fd, IFLA_XDP_FLAGS = flags }` (fd -1 detaches).
fn xdp_attr(fd: i32, flags: u32) -> Vec<u8> {
    let mut inner = Vec::new();
    netlink::push_attr(&mut inner, ifla::XDP_FD, &fd.to_ne_bytes());
    netlink::push_attr(&mut inner, ifla::XDP_FLAGS, &flags.to_ne_bytes());
    let mut a = Vec::new();
    netlink::push_attr(&mut a, ifla::XDP | netlink::NLA_F_NESTED, &inner);
    a
}

/// (driver, generic, offload) program ids in an `RTM_NEWLINK` payload, 0 = none.
fn xdp_prog_ids(payload: &[u8]) -> [u32; 3] {
    let mut ids = [0u32; 3];
    for (kind, value) in netlink::attrs(payload.get(ifla::IFINFO_LEN..).unwrap_or_default()) {
        if kind != ifla::XDP {
            continue;
        }
        for (k, v) in netlink::attrs(value) {
            let slot = match k {
                ifla::XDP_DRV_PROG_ID => 0,
                ifla::XDP_SKB_PROG_ID => 1,
                ifla::XDP_HW_PROG_ID => 2,
                _ => continue,
            };
            ids[slot] = netlink::u32_at(v, 0).unwrap_or(0);
        }
    }
    ids
}

fn ifindex(iface: &str) -> Result<u32, DetachError> {
    netlink::ifindex(iface).map_err(|_| DetachError::NoSuchInterface(iface.to_owned()))
}

/// Sets `IFLA_XDP` on `iface`; the kernel's errno on refusal.
fn set_link_xdp(iface: &str, fd: i32, mode: XdpMode) -> Result<(), DetachError> {
    let netlink_err = |source| DetachError::Netlink { iface: iface.to_owned(), source };
    let nl = netlink::Rtnetlink::open().map_err(netlink_err)?;
    let body = link_body(ifindex(iface)?, &xdp_attr(fd, mode.flags()));
    nl.request(netlink::RTM_SETLINK, netlink::NLM_F_ACK, &body, |_, _| {}).map_err(netlink_err)
}

/// Names of the loaded BPF programs among `ids` (by `BPF_OBJ_GET_INFO_BY_FD`).
fn program_names(ids: &[u32]) -> Vec<(u32, String)> {
    if ids.is_empty() {
        return Vec::new();
    }
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|p| ids.contains(&p.id()))
        .filter_map(|p| Some((p.id(), p.name_as_str()?.to_owned())))
        .collect()
}

/// `BPF_LINK_TYPE_XDP` (linux/bpf.h).
const BPF_LINK_TYPE_XDP: u32 = 6;

/// The programs among `ids` that an XDP BPF link holds.
fn linked_programs(ids: &[u32]) -> Vec<u32> {
    if ids.is_empty() {
        return Vec::new();
    }
    aya::programs::loaded_links()
        .filter_map(Result::ok)
        .filter(|l| l.type_ == BPF_LINK_TYPE_XDP && ids.contains(&l.prog_id))
        .map(|l| l.prog_id)
        .collect()
}

/// The XDP programs attached to `iface` (in the calling thread's network namespace).
pub fn attached_programs(iface: &str) -> Result<Vec<AttachedXdp>, DetachError> {
    let index = ifindex(iface)?;
    let netlink_err = |source| DetachError::Netlink { iface: iface.to_owned(), source };
    let nl = netlink::Rtnetlink::open().map_err(netlink_err)?;
    let mut ids = [0u32; 3];
    nl.request(netlink::RTM_GETLINK, 0, &link_body(index, &[]), |kind, payload| {
        if kind == netlink::RTM_NEWLINK {
            ids = xdp_prog_ids(payload);
        }
    })
    .map_err(netlink_err)?;
    let present: Vec<u32> = ids.iter().copied().filter(|id| *id != 0).collect();
    let names = program_names(&present);
    let linked = linked_programs(&present);
    Ok([XdpMode::Driver, XdpMode::Generic, XdpMode::Offload]
        .into_iter()
        .zip(ids)
        .filter(|(_, id)| *id != 0)
        .map(|(mode, prog_id)| AttachedXdp {
            prog_id,
            mode,
            name: names.iter().find(|(id, _)| *id == prog_id).map(|(_, n)| n.clone()),
            held_by_link: linked.contains(&prog_id),
        })
        .collect())
}

/// The XDP programs `detach_programs(iface, force)` would remove, checked
/// without changing anything: refuses a program held by a live BPF link (a
/// running `serve`: `DetachError::HeldByLink`) and, unless `force`, one that
/// is not wgxdp's (`DetachError::NotOurs`, naming its id and how to remove it).
pub fn check_detach(iface: &str, force: bool) -> Result<Vec<AttachedXdp>, DetachError> {
    let found = attached_programs(iface)?;
    for p in &found {
        if p.held_by_link {
            return Err(DetachError::HeldByLink {
                iface: iface.to_owned(),
                prog_id: p.prog_id,
                name: p.name_or_unknown(),
                mode: p.mode.as_str(),
            });
        }
        if !force && !p.is_ours() {
            return Err(DetachError::NotOurs {
                iface: iface.to_owned(),
                prog_id: p.prog_id,
                name: p.name_or_unknown(),
                mode: p.mode.as_str(),
                keyword: p.mode.ip_link_keyword(),
            });
        }
    }
    Ok(found)
}

/// Removes `programs` (as `check_detach` returned them) from `iface`; a mode
/// whose program changed since is left alone.
pub fn remove_programs(iface: &str, programs: &[AttachedXdp]) -> Result<(), DetachError> {
    let now = attached_programs(iface)?;
    for p in programs {
        if !now.iter().any(|n| n.prog_id == p.prog_id && n.mode == p.mode) {
            continue;
        }
        match set_link_xdp(iface, -1, p.mode) {
            Ok(()) => {}
            Err(DetachError::Netlink { source, .. }) if source.raw_os_error() == Some(libc::EBUSY) => {
                return Err(DetachError::HeldByLink {
                    iface: iface.to_owned(),
                    prog_id: p.prog_id,
                    name: p.name_or_unknown(),
                    mode: p.mode.as_str(),
                });
            }
            Err(e) => return Err(e),
        }
        tracing::info!(%iface, prog_id = p.prog_id, mode = p.mode.as_str(), "XDP program removed");
    }
    Ok(())
}

/// Removes the XDP programs attached to `iface` through netlink (by older
/// versions, `ip link`, libxdp) and returns what it removed: wgxdp's only,
/// unless `force`. Nothing is removed if any of them is refused (see
/// `check_detach`). A program whose process died is gone with its link.
pub fn detach_programs(iface: &str, force: bool) -> Result<Vec<AttachedXdp>, DetachError> {
    let found = check_detach(iface, force)?;
    remove_programs(iface, &found)?;
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
    set_link_xdp(iface, prog_fd.as_raw_fd(), mode)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_replies_give_the_xdp_program_ids() {
        let mut xdp = Vec::new();
        netlink::push_attr(&mut xdp, ifla::XDP_DRV_PROG_ID, &7u32.to_ne_bytes());
        netlink::push_attr(&mut xdp, ifla::XDP_SKB_PROG_ID, &9u32.to_ne_bytes());
        let mut attr = Vec::new();
        netlink::push_attr(&mut attr, ifla::XDP | netlink::NLA_F_NESTED, &xdp);
        let body = link_body(3, &attr);
        assert_eq!(xdp_prog_ids(&body), [7, 9, 0]);
        for cut in 0..body.len() {
            let _ = xdp_prog_ids(&body[..cut]);
        }
        let detach = xdp_attr(-1, XdpMode::Driver.flags());
        let (kind, inner) = netlink::attrs(&detach).next().unwrap();
        assert_eq!(kind, ifla::XDP);
        let inner: Vec<_> = netlink::attrs(inner).collect();
        assert_eq!(inner[0], (ifla::XDP_FD, &(-1i32).to_ne_bytes()[..]));
        assert_eq!(inner[1], (ifla::XDP_FLAGS, &(1u32 << 2).to_ne_bytes()[..]));
    }
}
