//! A running gateway: XDP programs attached, one pinned worker per queue, the
//! control thread (handshakes, timers, configuration) and the neighbour
//! resolver. `Gateway::start` checks everything an operator can get wrong and
//! says what; `shutdown` (or drop) stops the threads and detaches XDP.

use crate::crypto_pool::{AeadJob, CryptoPool, CryptoPoolBuilder};
use crate::device::{Action, Device, PeerId, PeerStats, PeerUpdate};
use crate::frame::udp_headers_len;
use crate::host::{HostAddresses, HostTun};
use crate::loader::{LoaderError, Side, XdpPrograms, XdpStats};
use crate::neighbors::{run_resolver, run_wan_resolver, KernelSender, NeighborTable, WanNextHops};
use crate::nic::rx_queues;
use crate::noise::peer::PeerConfig;
use crate::noise::{AeadBackend, PrivateKey, PublicKey};
use crate::policy::ForwardingPolicy;
use crate::table::IpPrefix;
use crate::wire::MacAddr;
use crate::worker::{ControlEvent, CryptoRings, HandshakeJob, Shared, Worker, WorkerCounters};
use crate::xsk::{Port, XskConfig, XskError, XskQueue};
use crossbeam_channel::{select, Receiver};
use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

/// How long a caller waits for the control thread to take a request.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);
const JOB_PENDING: u8 = 0;
const JOB_RUNNING: u8 = 1;
const JOB_CANCELLED: u8 = 2;

/// One configured peer.
#[derive(Debug, Clone)]
pub struct PeerSpec {
    pub config: PeerConfig,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpPrefix>,
    /// What the peer's remote site may reach on this side.
    pub policy: ForwardingPolicy,
}

#[derive(Debug)]
pub struct GatewayConfig {
    pub wan_interface: String,
    pub lan_interface: String,
    pub listen_port: u16,
    pub private_key: PrivateKey,
    pub peers: Vec<PeerSpec>,
    /// At most this many queues (and workers); default: all the NICs share.
    pub queues: Option<u32>,
    /// Cores to pin workers to, in queue order (cycled); empty: every core.
    pub cores: Vec<usize>,
    /// Threads that run one queue's AEAD, its worker included
    /// (`crypto_pool.rs`): `crypto_threads - 1` helpers are started, shared by
    /// all workers. `None`: the number of usable cores; 1: no helpers, each
    /// worker seals and opens inline.
    pub crypto_threads: Option<usize>,
    pub xsk: XskConfig,
    /// The compiled XDP object.
    pub xdp_object: Vec<u8>,
    /// Largest inner packet sent into the tunnel (1420 as wg-quick).
    pub tunnel_mtu: usize,
    /// Next hop for site-bound packets; `None`: destinations are on-link.
    pub lan_next_hop: Option<IpAddr>,
    /// Bounded queue of handshake messages from workers to the control thread.
    pub handshake_queue: usize,
    /// Flows the connection table tracks at most (`conntrack::DEFAULT_FLOWS`).
    pub tracked_flows: usize,
    /// The TUN interface through which packets from a tunnel reach the gateway
    /// host (when a rule allows it) and the host's own packets enter tunnels.
    pub host_interface: String,
    pub backend: AeadBackend,
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("interface `{0}` does not exist")]
    NoSuchInterface(String),
    #[error("cannot read the MAC address of `{iface}`: {reason}")]
    Mac { iface: String, reason: String },
    #[error("UDP port {0} is already in use on this host")]
    PortInUse(u16),
    #[error("cannot open the UDP socket on port {port}: {source}")]
    Udp { port: u16, source: std::io::Error },
    #[error("cannot create the host interface `{name}` (needs /dev/net/tun and CAP_NET_ADMIN; `host_interface` names it): {source}")]
    HostInterface { name: String, source: std::io::Error },
    #[error("peer {key}: {reason}")]
    Peer { key: PublicKey, reason: String },
    #[error(transparent)]
    Xdp(#[from] LoaderError),
    #[error(transparent)]
    Xsk(#[from] XskError),
    #[error(
        "tunnel_mtu {mtu} does not fit AF_XDP frames of {frame_size} bytes: at most {max} \
         (a sealed packet needs {overhead} bytes of headers and the kernel keeps {headroom} bytes of headroom)"
    )]
    TunnelMtu { mtu: usize, frame_size: u32, max: usize, overhead: usize, headroom: usize },
    #[error("the gateway is stopping")]
    Stopping,
    #[error("the control thread did not take the request within {0:?} (overloaded); nothing was changed")]
    ControlTimeout(Duration),
    #[error("cannot start thread: {0}")]
    Thread(std::io::Error),
}

/// A peer's live state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    pub stats: PeerStats,
    /// Packets each firewall rule matched (in rule order) since the rules last changed.
    pub rule_hits: Vec<u64>,
    pub last_handshake: Option<SystemTime>,
    pub endpoint: Option<SocketAddr>,
}

/// Counters of a running gateway.
#[derive(Debug, Clone, Default)]
pub struct GatewayStats {
    pub xdp: XdpStats,
    /// Per queue: (name, value) of the worker's counters.
    pub workers: Vec<Vec<(&'static str, u64)>>,
    /// The same counters for what the kernel slow path handled.
    pub slow_path: Vec<(&'static str, u64)>,
    /// Drops on the control thread (handshake messages, staged packets,
    /// datagrams whose next hop never resolved), by reason.
    pub control: Vec<(&'static str, u64)>,
    /// The connection table: capacity, live flows, inserts, evictions, replies.
    pub conntrack: Vec<(&'static str, u64)>,
}

#[derive(Debug)]
pub struct Gateway {
    programs: Arc<Mutex<XdpPrograms>>,
    shared: Arc<Shared>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    counters: Vec<Arc<WorkerCounters>>,
    /// What the kernel slow path handled.
    slow_counters: Arc<WorkerCounters>,
    /// What the control thread dropped (handshakes, staging, next hops).
    control_drops: Arc<crate::drops::DropCounters>,
    public_key: PublicKey,
    queues: u32,
    /// Tunnel prefixes routed through the host interface.
    routes: Mutex<crate::host::HostRoutes>,
    /// A sync of the tunnel prefixes failed (or a change's prefixes are not
    /// known): the next sync is a full one, which repairs what is off.
    resync: AtomicBool,
    /// The peers `GatewayConfig::peers` started with, in that order.
    config_peers: Vec<PeerId>,
    /// The crypto threads (stopped after the workers: declared after `threads`).
    _crypto: Option<CryptoPool>,
}

fn interface_exists(iface: &str) -> bool {
    std::path::Path::new("/sys/class/net").join(iface).exists()
}

fn interface_mac(iface: &str) -> Result<MacAddr, GatewayError> {
    let err = |reason: String| GatewayError::Mac { iface: iface.to_owned(), reason };
    let text = std::fs::read_to_string(format!("/sys/class/net/{iface}/address")).map_err(|e| err(e.to_string()))?;
    let mut mac = [0u8; 6];
    let parts: Vec<&str> = text.trim().split(':').collect();
    if parts.len() != 6 {
        return Err(err(format!("unexpected address `{}`", text.trim())));
    }
    for (b, p) in mac.iter_mut().zip(parts) {
        *b = u8::from_str_radix(p, 16).map_err(|e| err(e.to_string()))?;
    }
    Ok(MacAddr(mac))
}

/// Every address of `iface` (IPv4 and IPv6, link-local included), in the
/// order the kernel lists them.
pub fn interface_addresses(iface: &str) -> Vec<IpAddr> {
    address_prefixes(Some(iface)).into_iter().map(|(addr, _)| addr).collect()
}

/// Every address of every interface of the host (this network namespace),
/// and the directed-broadcast address of each IPv4 network they are on (the
/// kernel takes packets to those as its own too).
pub fn host_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    for (addr, len) in address_prefixes(None) {
        out.push(addr);
        if let (IpAddr::V4(a), 1..=30) = (addr, len) {
            out.push(IpAddr::V4(std::net::Ipv4Addr::from(u32::from(a) | (u32::MAX >> len))));
        }
    }
    out
}

/// The networks `iface` is attached to (link-local excluded): the sane
/// default for what a tunnel's remote site may reach on the site side.
pub fn interface_networks(iface: &str) -> Vec<IpPrefix> {
    let link_local = |a: &IpAddr| match a {
        IpAddr::V4(a) => a.is_link_local(),
        IpAddr::V6(a) => a.is_unicast_link_local(),
    };
    let mut nets: Vec<IpPrefix> = address_prefixes(Some(iface))
        .into_iter()
        .filter(|(a, _)| !link_local(a))
        .filter_map(|(a, len)| IpPrefix::new(a, len).ok())
        .collect();
    nets.sort_unstable();
    nets.dedup();
    nets
}

/// Every (address, prefix length) of `iface`, or of every interface.
fn address_prefixes(iface: Option<&str>) -> Vec<(IpAddr, u8)> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = core::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we free below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return out;
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a NUL-terminated string owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
        if iface.is_some_and(|i| name.to_bytes() != i.as_bytes()) {
            continue;
        }
        // ifa_addr (and ifa_netmask when not null) point into the list.
        // SAFETY: their family field is valid to read, and the family
        // says which sockaddr type each is.
        let (addr, mask) = unsafe {
            match i32::from((*ifa.ifa_addr).sa_family) {
                libc::AF_INET => {
                    let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    let mask = (!ifa.ifa_netmask.is_null())
                        .then(|| (*(ifa.ifa_netmask as *const libc::sockaddr_in)).sin_addr.s_addr.count_ones() as u8);
                    (IpAddr::V4(std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))), mask.unwrap_or(32))
                }
                libc::AF_INET6 => {
                    let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    let mask = (!ifa.ifa_netmask.is_null()).then(|| {
                        let m = (*(ifa.ifa_netmask as *const libc::sockaddr_in6)).sin6_addr.s6_addr;
                        m.iter().map(|b| b.count_ones()).sum::<u32>() as u8
                    });
                    (IpAddr::V6(std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr)), mask.unwrap_or(128))
                }
                _ => continue,
            }
        };
        out.push((addr, mask));
    }
    // SAFETY: `head` came from getifaddrs and is freed exactly once.
    unsafe { libc::freeifaddrs(head) };
    out
}

/// The interface's first IPv4 address and its best IPv6 address (global
/// before link-local), for the ICMP errors the gateway sends as a router.
pub fn interface_addrs(iface: &str) -> (Option<std::net::Ipv4Addr>, Option<std::net::Ipv6Addr>) {
    let all = interface_addresses(iface);
    let v4 = all.iter().find_map(|a| match a {
        IpAddr::V4(a) => Some(*a),
        IpAddr::V6(_) => None,
    });
    let v6s = all.iter().filter_map(|a| match a {
        IpAddr::V6(a) => Some(*a),
        IpAddr::V4(_) => None,
    });
    let link_local = |a: &std::net::Ipv6Addr| a.is_unicast_link_local();
    let mut v6 = None;
    for a in v6s {
        if v6.is_none() || (!link_local(&a) && v6.as_ref().is_some_and(link_local)) {
            v6 = Some(a);
        }
    }
    (v4, v6)
}

/// A dual-stack UDP socket on the listen port, bound to the WAN interface: it
/// sends handshakes, keepalives and the first packets to a peer, and receives
/// what XDP leaves to the kernel (the slow path); holding the port stops
/// anything else from using it. Bound to the WAN, its datagrams never follow
/// a route into a tunnel (a peer whose address is inside a tunnel prefix would
/// otherwise loop its own handshakes through the host interface).
fn bind_kernel_udp(port: u16, wan: &str) -> Result<UdpSocket, GatewayError> {
    let bind = |addr: &str| UdpSocket::bind(addr);
    let sock = bind(&format!("[::]:{port}")).or_else(|e| match e.kind() {
        std::io::ErrorKind::AddrInUse => Err(e),
        _ => bind(&format!("0.0.0.0:{port}")),
    });
    match sock {
        Ok(s) => {
            // A full send buffer (e.g. datagrams queued behind unresolved next
            // hops) must never stall a worker or the control thread.
            s.set_nonblocking(true).map_err(|source| GatewayError::Udp { port, source })?;
            bind_to_device(&s, wan).map_err(|source| GatewayError::Udp { port, source })?;
            Ok(s)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => Err(GatewayError::PortInUse(port)),
        Err(source) => Err(GatewayError::Udp { port, source }),
    }
}

fn bind_to_device(socket: &UdpSocket, iface: &str) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: `iface` is valid for reads of its length for the duration of the
    // call (the kernel copies at most IFNAMSIZ bytes of it).
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            iface.as_ptr().cast(),
            iface.len() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Bytes the kernel reserves in front of packet data in an AF_XDP frame.
const XDP_PACKET_HEADROOM: usize = 256;

/// The largest `tunnel_mtu` whose sealed packets (IPv6 outer headers, the
/// transport header, padding and tag) fit one AF_XDP frame of `frame_size`.
pub fn max_tunnel_mtu(frame_size: u32) -> usize {
    let overhead = udp_headers_len(true) + crate::noise::session::sealed_len(0);
    let room = (frame_size as usize).saturating_sub(XDP_PACKET_HEADROOM + overhead);
    // Padding rounds the inner packet up to 16 bytes.
    room / 16 * 16
}

/// The largest interface MTU whose frames fit an AF_XDP frame of
/// `frame_size` on receive (the kernel keeps its headroom in front; a longer
/// frame is dropped before a worker sees it).
pub fn max_received_mtu(frame_size: u32) -> usize {
    (frame_size as usize).saturating_sub(XDP_PACKET_HEADROOM + crate::wire::ETHERNET_HEADER_LEN)
}

/// Where a gateway's crypto helpers run (`crypto_pool.rs`): only on cores
/// no worker is pinned to. A helper that shared a core with a busy worker
/// would be preempted holding a claimed job, and the worker that owns the
/// job would wait for the scheduler; so the helpers are capped at the free
/// cores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CryptoPlan {
    /// One entry per helper thread: the core it is pinned to.
    pub helper_cores: Vec<usize>,
    /// Why there are fewer helpers than `crypto_threads` asked for.
    pub shortfall: Option<String>,
}

impl CryptoPlan {
    /// `cores`: where workers are pinned, in queue order (cycled; empty:
    /// unknown, no helpers); `crypto_threads`: threads running one queue's
    /// AEAD, its worker included (`None`: one per core in `cores`).
    pub fn new(cores: &[usize], queues: usize, crypto_threads: Option<usize>) -> Self {
        let mut distinct = Vec::new();
        for &c in cores {
            if !distinct.contains(&c) {
                distinct.push(c);
            }
        }
        let workers: Vec<usize> = cores.iter().copied().cycle().take(queues.min(cores.len())).collect();
        let free: Vec<usize> = distinct.iter().copied().filter(|c| !workers.contains(c)).collect();
        let wanted = crypto_threads.unwrap_or(distinct.len()).saturating_sub(1);
        let helpers = wanted.min(free.len());
        let shortfall = (helpers < wanted).then(|| {
            format!(
                "crypto_threads: {} helper thread(s) instead of {wanted}: only {} core(s) run no worker ({} worker(s) \
                 on {} core(s)); give the helpers cores with `queues` below the number of cores, or list more in `cores`",
                helpers,
                free.len(),
                queues,
                distinct.len()
            )
        });
        Self { helper_cores: free[..helpers].to_vec(), shortfall }
    }
}

/// The cores this process may run on: where workers go when `cores` is empty.
pub fn usable_cores() -> Vec<usize> {
    core_affinity::get_core_ids().unwrap_or_default().into_iter().map(|c| c.id).collect()
}

/// How many queues (AF_XDP socket pairs, workers) a gateway on `wan` and
/// `lan` serves: the rx queues both NICs have, at most `limit` (`queues`).
pub fn queue_count(wan: &str, lan: &str, limit: Option<u32>) -> u32 {
    rx_queues(wan).min(rx_queues(lan)).min(limit.unwrap_or(u32::MAX))
}

/// Refuses a `tunnel_mtu` whose sealed packets do not fit frames of `frame_size`.
pub fn check_tunnel_mtu(mtu: usize, frame_size: u32) -> Result<(), GatewayError> {
    let max = max_tunnel_mtu(frame_size);
    if mtu == 0 || mtu > max {
        return Err(GatewayError::TunnelMtu {
            mtu,
            frame_size,
            max,
            overhead: udp_headers_len(true) + crate::noise::session::sealed_len(0),
            headroom: XDP_PACKET_HEADROOM,
        });
    }
    Ok(())
}

impl Gateway {
    /// Starts the gateway in the calling thread's network namespace.
    pub fn start(cfg: GatewayConfig) -> Result<Self, GatewayError> {
        check_tunnel_mtu(cfg.tunnel_mtu, cfg.xsk.frame_size)?;
        for iface in [&cfg.wan_interface, &cfg.lan_interface] {
            if !interface_exists(iface) {
                return Err(GatewayError::NoSuchInterface(iface.clone()));
            }
        }
        let lan_mac = interface_mac(&cfg.lan_interface)?;
        let (lan_ipv4, lan_ipv6) = interface_addrs(&cfg.lan_interface);
        let kernel_udp = Arc::new(bind_kernel_udp(cfg.listen_port, &cfg.wan_interface)?);
        let host_tun = HostTun::open(&cfg.host_interface, cfg.tunnel_mtu)
            .map_err(|source| GatewayError::HostInterface { name: cfg.host_interface.clone(), source })?;

        let mut device = Device::new(cfg.private_key, cfg.backend, 16, Instant::now());
        let public_key = device.public_key();
        let mut prefixes = BTreeSet::new();
        let mut config_peers = Vec::with_capacity(cfg.peers.len());
        for p in &cfg.peers {
            let id = device
                .add_peer(p.config.clone(), p.endpoint, &p.allowed_ips)
                .map_err(|e| GatewayError::Peer { key: p.config.public_key, reason: e.to_string() })?;
            device.set_policy(id, p.policy.clone());
            config_peers.push(id);
            prefixes.extend(p.allowed_ips.iter().copied());
        }

        let mut programs = XdpPrograms::load(&cfg.xdp_object, cfg.listen_port)?;
        programs.attach(Side::Wan, &cfg.wan_interface)?;
        programs.attach(Side::Lan, &cfg.lan_interface)?;
        let prefixes: Vec<IpPrefix> = prefixes.into_iter().collect();
        programs.set_tunnel_prefixes(&prefixes)?;
        let mut routes = crate::host::HostRoutes::default();
        if let Err(e) = host_tun.sync_routes(&mut routes, &prefixes) {
            tracing::warn!(error = %e, "cannot route the tunnel prefixes through the host interface");
        }
        programs.set_wan_addresses(&interface_addresses(&cfg.wan_interface))?;

        let queues = queue_count(&cfg.wan_interface, &cfg.lan_interface, cfg.queues);
        let mut sockets = Vec::new();
        for q in 0..queues {
            let io = XskQueue::bind(&cfg.wan_interface, &cfg.lan_interface, q, &cfg.xsk)?;
            programs.register_socket(Side::Wan, q, io.raw_fd(Port::Wan))?;
            programs.register_socket(Side::Lan, q, io.raw_fd(Port::Lan))?;
            tracing::info!(queue = q, mode = ?io.mode(), busy_poll = cfg.xsk.busy_poll, "AF_XDP sockets bound (one UMEM)");
            sockets.push(io);
        }

        let (hs_tx, hs_rx) = crossbeam_channel::bounded(cfg.handshake_queue.max(8));
        let (ctl_tx, ctl_rx) = crossbeam_channel::bounded(4096);
        let (neighbors, neighbor_requests) = NeighborTable::new();
        let (wan_next_hops, wan_requests) = WanNextHops::new();
        let control_drops = device.drops.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let shared = Arc::new(Shared {
            tables: device.tables().clone(),
            cookies: device.cookie_checker().clone(),
            staging: device.staging().clone(),
            from_kernel: Arc::new(crate::staging::StagingPool::new(1024)),
            handshakes: hs_tx,
            control: ctl_tx,
            neighbors: neighbors.clone(),
            host_tun: Some(Arc::new(host_tun)),
            host_addresses: Arc::new(HostAddresses::new(host_addresses())),
            kernel_udp: kernel_udp.clone(),
            wan_next_hops: wan_next_hops.clone(),
            lan_mac,
            lan_next_hop: cfg.lan_next_hop,
            tunnel_mtu: cfg.tunnel_mtu,
            lan_ipv4,
            lan_ipv6,
            conntrack: Arc::new(crate::conntrack::ConnTrack::new(cfg.tracked_flows)),
            under_load_until: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });

        let mut threads = Vec::new();
        let spawn = |name: String, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new().name(name).spawn(f).map_err(GatewayError::Thread)
        };
        {
            let (stop, iface) = (stop.clone(), cfg.lan_interface.clone());
            threads.push(spawn(
                "wgxdp-neigh".into(),
                Box::new(move || run_resolver(neighbors, neighbor_requests, iface, stop)),
            )?);
        }
        {
            let (stop, next_hops) = (stop.clone(), wan_next_hops.clone());
            let wan = crate::netlink::ifindex(&cfg.wan_interface).ok();
            threads.push(spawn(
                "wgxdp-wan-nh".into(),
                Box::new(move || run_wan_resolver(next_hops, wan_requests, wan, stop)),
            )?);
        }
        {
            let stop = stop.clone();
            let kernel = KernelSender::new(kernel_udp.clone(), wan_next_hops.clone(), device.drops.clone());
            threads.push(spawn(
                "wgxdp-control".into(),
                Box::new(move || run_control(device, hs_rx, ctl_rx, kernel, stop)),
            )?);
        }
        let programs = Arc::new(Mutex::new(programs));
        let slow_counters = Arc::new(WorkerCounters::default());
        let (to_lan, from_kernel) = crossbeam_channel::bounded(1024);
        {
            let (shared, udp, counters) = (shared.clone(), kernel_udp.clone(), slow_counters.clone());
            threads.push(spawn(
                "wgxdp-slowpath".into(),
                Box::new(move || crate::slow_path::run(shared, udp, to_lan, counters)),
            )?);
        }
        {
            let (stop, programs, iface) = (stop.clone(), programs.clone(), cfg.wan_interface.clone());
            let host = shared.host_addresses.clone();
            threads.push(spawn("wgxdp-addrs".into(), Box::new(move || follow_addresses(programs, iface, host, stop)))?);
        }
        let lan_queues = rx_queues(&cfg.lan_interface);
        if lan_queues > queues {
            tracing::warn!(
                lan_queues,
                queues,
                "the LAN NIC has more rx queues than AF_XDP sockets: site traffic for a tunnel arriving on the \
                 others reaches the kernel, which does not carry it into the tunnel (counted as lan_no_socket); \
                 match them with `ethtool -L`"
            );
        }
        let wan_queues = rx_queues(&cfg.wan_interface);
        if wan_queues > queues {
            tracing::warn!(
                wan_queues,
                queues,
                "the WAN NIC has more rx queues than AF_XDP sockets: WireGuard arriving on the others \
                 takes the kernel slow path (counted as wan_no_socket); match them with `ethtool -L`"
            );
        }
        let mut from_kernel = Some(from_kernel);
        let cores = if cfg.cores.is_empty() { usable_cores() } else { cfg.cores.clone() };
        let plan = CryptoPlan::new(&cores, queues as usize, cfg.crypto_threads);
        if let Some(note) = &plan.shortfall {
            match cfg.crypto_threads {
                Some(_) => tracing::warn!("{note}"),
                None => tracing::info!("{note}"),
            }
        }
        let mut crypto = (!plan.helper_cores.is_empty()).then(CryptoPoolBuilder::<AeadJob>::default);
        let mut rings: Vec<_> = (0..queues).map(|_| crypto.as_mut().map(CryptoRings::new)).collect();
        let crypto = match crypto {
            Some(pool) => Some(pool.start(plan.helper_cores.len(), &plan.helper_cores).map_err(GatewayError::Thread)?),
            None => None,
        };
        let crypto_threads = plan.helper_cores.len() + 1;
        let mut counters = Vec::new();
        for (q, io) in sockets.into_iter().enumerate() {
            let c = Arc::new(WorkerCounters::default());
            counters.push(c.clone());
            let mut worker = Worker::new(q as u32, shared.clone(), io, c);
            if let Some(rx) = from_kernel.take() {
                worker.set_slow_path(rx);
            }
            if let Some(ring) = rings.get_mut(q).and_then(Option::take) {
                worker.set_crypto(ring);
            }
            let core = (!cores.is_empty()).then(|| cores[q % cores.len()]);
            threads.push(spawn(
                format!("wgxdp-q{q}"),
                Box::new(move || {
                    if let Some(id) = core {
                        if !core_affinity::set_for_current(core_affinity::CoreId { id }) {
                            tracing::warn!(queue = q, core = id, "could not pin the worker");
                        }
                    }
                    worker.run();
                }),
            )?);
        }
        tracing::info!(%public_key, queues, crypto_threads, port = cfg.listen_port, "gateway running");
        let routes = Mutex::new(routes);
        Ok(Self {
            programs,
            shared,
            stop,
            threads,
            counters,
            slow_counters,
            control_drops,
            public_key,
            queues,
            routes,
            resync: AtomicBool::new(false),
            config_peers,
            _crypto: crypto,
        })
    }

    pub fn public_key(&self) -> PublicKey {
        self.public_key
    }

    pub fn queues(&self) -> u32 {
        self.queues
    }

    /// The peers the gateway started with (`GatewayConfig::peers`, in order);
    /// a removed one stays listed and reports no status.
    pub fn config_peers(&self) -> &[PeerId] {
        &self.config_peers
    }

    pub fn stats(&self) -> GatewayStats {
        let xdp = self.programs.lock().unwrap_or_else(|p| p.into_inner()).stats().unwrap_or_default();
        GatewayStats {
            xdp,
            workers: self.counters.iter().map(|c| c.named()).collect(),
            slow_path: self.slow_counters.named(),
            control: self.control_drops.named().collect(),
            conntrack: self.shared.conntrack.named(crate::conntrack::ConnTrack::now_secs(Instant::now())),
        }
    }

    /// Runs `f` on the control thread (which owns the protocol state) and
    /// returns its result. Never blocks for long: a request the control thread
    /// has not started within `CONTROL_TIMEOUT` is cancelled and will never
    /// run (so a caller that gave up cannot find it applied later); one it has
    /// started is waited for.
    pub fn with_device<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Device) -> R + Send + 'static,
    ) -> Result<R, GatewayError> {
        run_on_control(&self.shared.control, CONTROL_TIMEOUT, f)
    }

    /// Adds a peer at runtime and steers its prefixes through XDP. With an
    /// endpoint, a handshake starts at once (site-to-site: either side may open).
    pub fn add_peer(&self, spec: PeerSpec) -> Result<PeerId, GatewayError> {
        let key = spec.config.public_key;
        let touched = spec.allowed_ips.clone();
        let done = self.with_device(move |d| {
            let added = d.add_peer(spec.config, spec.endpoint, &spec.allowed_ips).map_err(|e| e.to_string());
            if let Ok(id) = added {
                d.set_policy(id, spec.policy);
                d.initiate(id);
            }
            (spec.allowed_ips, added)
        });
        let (_, added) = self.after_change(done)?;
        let id = added.map_err(|reason| GatewayError::Peer { key, reason })?;
        if let Err(e) = self.sync_tunnel_prefixes(&touched) {
            let _ = self.with_device(move |d| d.remove_peer(id));
            // What the failed sync did take goes back out.
            let _ = self.sync_tunnel_prefixes(&touched);
            return Err(e);
        }
        Ok(id)
    }

    /// Removes a peer: its routes leave XDP, its keys are zeroized. Other
    /// peers are not disturbed. False if there was no such peer.
    pub fn remove_peer(&self, id: PeerId) -> Result<bool, GatewayError> {
        // Its prefixes read with the change, on the control thread.
        let done = self.with_device(move |d| (d.tables().allowed_ips.prefixes_of(id), d.remove_peer(id)));
        let (touched, removed) = self.after_change(done)?;
        self.sync_tunnel_prefixes(&touched)?;
        Ok(removed)
    }

    /// Replaces a peer's allowed IPs (routes and inbound source check).
    pub fn set_allowed_ips(&self, id: PeerId, prefixes: Vec<IpPrefix>) -> Result<(), GatewayError> {
        let done = self.with_device(move |d| {
            let mut touched = d.tables().allowed_ips.prefixes_of(id);
            d.set_allowed_ips(id, &prefixes);
            touched.extend(prefixes);
            (touched, ())
        });
        let (touched, ()) = self.after_change(done)?;
        self.sync_tunnel_prefixes(&touched)
    }

    /// What a change on the control thread returned, with the prefixes it
    /// touched. If it did not answer (it may still have run, or run later),
    /// the prefixes are unknown: a full sync now and at the next change,
    /// then the error.
    fn after_change<R>(
        &self,
        done: Result<(Vec<IpPrefix>, R), GatewayError>,
    ) -> Result<(Vec<IpPrefix>, R), GatewayError> {
        done.inspect_err(|_| {
            self.resync.store(true, Ordering::Relaxed);
            let _ = self.sync_tunnel_prefixes(&[]);
            self.resync.store(true, Ordering::Relaxed);
        })
    }

    /// Replaces what a peer's remote site may reach, on the running data plane
    /// (workers see it with their next packet; its rule counters restart).
    /// False if there was no such peer.
    pub fn set_policy(&self, id: PeerId, policy: ForwardingPolicy) -> Result<bool, GatewayError> {
        self.with_device(move |d| d.set_policy(id, policy))
    }

    /// Changes a peer's pre-shared key, keepalive or endpoint in place.
    pub fn update_peer(&self, id: PeerId, update: PeerUpdate) -> Result<bool, GatewayError> {
        self.with_device(move |d| d.update_peer(id, update))
    }

    /// A peer's live counters, last handshake and endpoint.
    pub fn peer_status(&self, id: PeerId) -> Option<PeerStatus> {
        self.peer_statuses(vec![id]).pop().flatten()
    }

    /// Many peers' live state in one trip to the control thread (in `ids` order).
    pub fn peer_statuses(&self, ids: Vec<PeerId>) -> Vec<Option<PeerStatus>> {
        let n = ids.len();
        self.with_device(move |d| {
            ids.into_iter()
                .map(|id| {
                    Some(PeerStatus {
                        stats: d.peer_stats(id)?,
                        rule_hits: d.policy(id).map(|(_, hits)| hits).unwrap_or_default(),
                        last_handshake: d.peer_last_handshake(id),
                        endpoint: d.peer_endpoint(id),
                    })
                })
                .collect()
        })
        .unwrap_or_else(|_| vec![None; n])
    }

    /// True while the XDP programs are attached and every thread runs.
    pub fn is_healthy(&self) -> bool {
        !self.shared.stop.load(Ordering::Relaxed)
            && self.threads.iter().all(|t| !t.is_finished())
            && self.programs.lock().unwrap_or_else(|p| p.into_inner()).attached().len() == 2
    }

    /// After a change that touched the prefixes `touched` (a peer's old and
    /// new allowed IPs): the LAN program steers, and the host routes through
    /// the host interface, each of them exactly when some peer now routes it.
    /// The others are untouched: O(k log n), whatever the number of peers.
    /// Decided and applied under the programs' lock, so concurrent changes
    /// apply in the order they read the table.
    ///
    /// After a failure (a map or route change refused, a change whose
    /// prefixes are unknown) the next sync is a full one: every peer's
    /// prefixes against what is steered and routed, O(n), repairing what the
    /// failure left off; it stays full until one succeeds.
    fn sync_tunnel_prefixes(&self, touched: &[IpPrefix]) -> Result<(), GatewayError> {
        let mut programs = self.programs.lock().unwrap_or_else(|p| p.into_inner());
        let table = &self.shared.tables.allowed_ips;
        let full = self.resync.swap(false, Ordering::Relaxed);
        let all: Vec<IpPrefix> = if full { table.entries().into_iter().map(|(p, _)| p).collect() } else { Vec::new() };
        let changes: Vec<(IpPrefix, bool)> = touched.iter().map(|p| (*p, table.holds(p))).collect();
        let steered = if full { programs.set_tunnel_prefixes(&all) } else { programs.update_tunnel_prefixes(&changes) };
        // The routes follow even when the map refused a change.
        let mut routed = true;
        if let Some(tun) = &self.shared.host_tun {
            let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
            let r = if full { tun.sync_routes(&mut routes, &all) } else { tun.update_routes(&mut routes, &changes) };
            routed = r.unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot route the tunnel prefixes through the host interface");
                false
            });
        }
        if steered.is_err() || !routed {
            self.resync.store(true, Ordering::Relaxed);
        }
        Ok(steered?)
    }

    /// Stops every thread and detaches the XDP programs.
    pub fn shutdown(mut self) {
        self.stop_threads();
    }

    fn stop_threads(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.stop_threads();
        tracing::info!("gateway stopped; XDP programs detached");
    }
}

/// Keeps the WAN program's list of our own addresses in step with the
/// interface (addresses come and go, e.g. a floating address).
fn follow_addresses(programs: Arc<Mutex<XdpPrograms>>, iface: String, host: Arc<HostAddresses>, stop: Arc<AtomicBool>) {
    let mut last = interface_addresses(&iface);
    let mut since = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        if since.elapsed() < Duration::from_secs(1) {
            continue;
        }
        since = Instant::now();
        if host.replace(host_addresses()) {
            tracing::info!(addresses = ?host.snapshot(), "host addresses changed");
        }
        let now = interface_addresses(&iface);
        if now != last {
            match programs.lock().unwrap_or_else(|p| p.into_inner()).set_wan_addresses(&now) {
                Ok(()) => tracing::info!(%iface, addresses = ?now, "WAN addresses changed"),
                Err(e) => tracing::warn!(%iface, error = %e, "updating the WAN addresses in XDP failed"),
            }
            last = now;
        }
    }
}

/// `Gateway::with_device` over any control queue, with its timeout.
fn run_on_control<R: Send + 'static>(
    control: &crossbeam_channel::Sender<ControlEvent>,
    timeout: Duration,
    f: impl FnOnce(&mut Device) -> R + Send + 'static,
) -> Result<R, GatewayError> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    let state = Arc::new(AtomicU8::new(JOB_PENDING));
    let job_state = state.clone();
    let job = ControlEvent::Exec(Box::new(move |d| {
        if job_state.compare_exchange(JOB_PENDING, JOB_RUNNING, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            let _ = tx.send(f(d));
        }
    }));
    let deadline = Instant::now() + timeout;
    match control.send_deadline(job, deadline) {
        Ok(()) => {}
        Err(crossbeam_channel::SendTimeoutError::Timeout(_)) => return Err(GatewayError::ControlTimeout(timeout)),
        Err(crossbeam_channel::SendTimeoutError::Disconnected(_)) => return Err(GatewayError::Stopping),
    }
    match rx.recv_deadline(deadline) {
        Ok(r) => Ok(r),
        Err(_) => {
            if state.compare_exchange(JOB_PENDING, JOB_CANCELLED, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                return Err(GatewayError::ControlTimeout(timeout));
            }
            // Already running: it finishes quickly (or the gateway is stopping).
            rx.recv_timeout(timeout).map_err(|_| GatewayError::Stopping)
        }
    }
}

/// The control thread: owns the `Device`; serves handshake messages from the
/// workers, staged packets, configuration closures, and the timers.
fn run_control(
    mut device: Device,
    handshakes: Receiver<HandshakeJob>,
    events: Receiver<ControlEvent>,
    mut kernel: KernelSender,
    stop: Arc<AtomicBool>,
) {
    let mut out = vec![0u8; 65536];
    let mut last_tick = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        select! {
            recv(handshakes) -> job => if let Ok(mut job) = job {
                let (now, wall) = (Instant::now(), SystemTime::now());
                let from = job.from;
                if let Ok(Action::Send { to, bytes }) = device.receive_from(from, job.message_mut(), false, now, wall, &mut out) {
                    // An answer to a frame the peer just sent: it is alive and
                    // reachable, the kernel resolves it at once.
                    kernel.send_now(bytes, to);
                }
            },
            recv(events) -> ev => match ev {
                // Staging only queues the peer: timers run once per tick, not per packet.
                Ok(ControlEvent::Stage { peer, packet }) => device.stage(peer, packet, Instant::now(), SystemTime::now()),
                Ok(ControlEvent::Exec(f)) => f(&mut device),
                Err(_) => {}
            },
            default(Duration::from_millis(20)) => {}
        }
        let (now, wall) = (Instant::now(), SystemTime::now());
        if now.duration_since(last_tick) >= Duration::from_millis(100) {
            device.tick_at(now, wall);
            last_tick = now;
        }
        while let Some(t) = device.poll_transmit(now, wall, &mut out) {
            // A peer whose frames we saw on this address is reachable; others
            // wait for their next hop (never queued behind a failing ARP).
            let seen = device
                .views()
                .get(t.peer)
                .is_some_and(|v| v.endpoint.load().as_ref().is_some_and(|e| e.addr == t.to && e.path.is_some()));
            if seen {
                kernel.send_now(&out[..t.len], t.to);
            } else {
                kernel.send(&out[..t.len], t.to, now);
            }
        }
        kernel.flush(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crypto_helpers_take_only_cores_without_a_worker() {
        let plan = |cores: &[usize], queues, threads| CryptoPlan::new(cores, queues, threads);
        // This VM: one queue on core 0, the helper on core 1.
        assert_eq!(plan(&[0, 1], 1, None).helper_cores, vec![1]);
        assert_eq!(plan(&[0, 1], 1, Some(2)), CryptoPlan { helper_cores: vec![1], shortfall: None });
        assert_eq!(plan(&[0, 1], 1, Some(1)).helper_cores, Vec::<usize>::new());
        // Eight cores, two queues: six helpers by default, fewer when asked.
        let eight: Vec<usize> = (0..8).collect();
        assert_eq!(plan(&eight, 2, None).helper_cores, vec![2, 3, 4, 5, 6, 7]);
        assert_eq!(plan(&eight, 2, Some(3)).helper_cores, vec![2, 3]);
        // A worker on every core: no helper, and the operator is told why.
        let p = plan(&[0, 1], 2, Some(2));
        assert!(p.helper_cores.is_empty());
        assert!(p.shortfall.as_deref().is_some_and(|s| s.contains("only 0 core(s) run no worker")), "{p:?}");
        // More than there are cores: capped, with the reason.
        let p = plan(&[2, 3], 1, Some(64));
        assert_eq!(p.helper_cores, vec![3]);
        assert!(p.shortfall.is_some());
        // Configured cores, with a repeat: workers on 4 and 5, the helper on 6.
        assert_eq!(plan(&[4, 5, 4, 6], 2, None).helper_cores, vec![6]);
        // Unknown cores: no helpers.
        assert_eq!(plan(&[], 1, None).helper_cores, Vec::<usize>::new());
    }
    use crate::noise::PrivateKey;

    #[test]
    fn tunnel_mtu_must_fit_a_frame() {
        assert_eq!(max_received_mtu(2048), 1778, "2048 - 256 headroom - 14 bytes of Ethernet");
        assert_eq!(max_received_mtu(4096), 3826);
        assert!(check_tunnel_mtu(1420, 2048).is_ok());
        assert_eq!(max_tunnel_mtu(2048), 1696, "2048 - 256 headroom - 94 bytes of headers, in 16s");
        assert!(check_tunnel_mtu(1697, 2048).is_err());
        assert!(check_tunnel_mtu(0, 2048).is_err());
        assert!(check_tunnel_mtu(3000, 4096).is_ok());
        let msg = check_tunnel_mtu(9000, 4096).unwrap_err().to_string();
        assert!(msg.contains("at most 3744"), "{msg}");
    }

    /// A control request that timed out must never run later (it used to,
    /// installing an orphan peer after the API had answered with an error).
    #[test]
    fn a_timed_out_control_request_never_runs() {
        let (tx, rx) = crossbeam_channel::bounded(4);
        let ran = Arc::new(AtomicBool::new(false));
        let flag = ran.clone();
        let r = run_on_control(&tx, Duration::from_millis(50), move |_| flag.store(true, Ordering::SeqCst));
        assert!(matches!(r, Err(GatewayError::ControlTimeout(_))), "{r:?}");
        // The control thread gets to it afterwards: it is skipped.
        let mut device = Device::new(PrivateKey::generate(), AeadBackend::Ring, 4, Instant::now());
        match rx.try_recv() {
            Ok(ControlEvent::Exec(f)) => f(&mut device),
            other => panic!("{other:?}"),
        }
        assert!(!ran.load(Ordering::SeqCst));
        // A full queue is a timeout too, never a wait without end.
        let (tx, _rx) = crossbeam_channel::bounded(1);
        let _ = run_on_control(&tx, Duration::from_millis(10), |_| ());
        let r = run_on_control(&tx, Duration::from_millis(10), |_| ());
        assert!(matches!(r, Err(GatewayError::ControlTimeout(_))));
        // Served in time: the result comes back.
        let (tx, rx) = crossbeam_channel::bounded::<ControlEvent>(1);
        let server = std::thread::spawn(move || {
            let mut device = Device::new(PrivateKey::generate(), AeadBackend::Ring, 4, Instant::now());
            if let Ok(ControlEvent::Exec(f)) = rx.recv() {
                f(&mut device);
            }
        });
        assert_eq!(run_on_control(&tx, Duration::from_secs(5), |_| 7).unwrap(), 7);
        server.join().unwrap();
    }
}
