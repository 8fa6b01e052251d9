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
