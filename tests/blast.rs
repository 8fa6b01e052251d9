//! Load generation for `bench-e2e`: a WireGuard client session driven by the
//! protocol core, whole Ethernet frames built ahead of time, an AF_PACKET
//! socket that sends them in batches with `sendmmsg`, and the XDP sink that
//! counts what comes out of the gateway on the receiving host.

use crate::Netns;
use aya::maps::{Array, MapData, PerCpuArray};
use aya::programs::{Xdp, XdpFlags};
use aya::Ebpf;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant, SystemTime};
use wgxdp_common::{maps, programs, sink};
use wgxdp_dataplane::device::{Action, Device, PeerId};
use wgxdp_dataplane::noise::peer::PeerConfig;
use wgxdp_dataplane::noise::{AeadBackend, PresharedKey, PrivateKey, PublicKey};
use wgxdp_dataplane::wire::{
    ip_protocol, Ipv4Packet, MacAddr, UdpDatagram, ETHERNET_HEADER_LEN, IPV4_HEADER_LEN, UDP_HEADER_LEN,
};

/// The MAC address of `iface` in `ns`.
pub fn mac_of(ns: &Netns, iface: &str) -> MacAddr {
    let text = ns.exec("cat", &[&format!("/sys/class/net/{iface}/address")]);
    let mut mac = [0u8; 6];
    for (b, part) in mac.iter_mut().zip(text.trim().split(':')) {
        *b = u8::from_str_radix(part, 16).expect("hex MAC");
    }
    MacAddr(mac)
}

/// Pins the calling thread to one CPU.
pub fn pin_current_thread(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_ZERO/CPU_SET only write inside it,
    // and sched_setaffinity(0, …) affects only the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// The benchmark sink (`wgxdp_sink`) attached to an interface; detached on drop.
pub struct Sink {
    stats: PerCpuArray<MapData, u64>,
    _ebpf: Ebpf,
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sink").field("packets", &self.packets()).finish()
    }
}

impl Sink {
    /// Attaches to `iface` in `ns`, counting UDP to `dst_port` and WireGuard
    /// transport data from `wg_src_port` (0 disables either).
    pub fn attach(ns: &Netns, iface: &str, object: Vec<u8>, dst_port: u16, wg_src_port: u16) -> Self {
        let iface = iface.to_owned();
        ns.enter(move || {
            let mut ebpf = Ebpf::load(&object).expect("load the XDP object");
            let prog: &mut Xdp =
                ebpf.program_mut(programs::SINK).expect("sink program").try_into().expect("an XDP program");
            prog.load().expect("verifier accepts the sink");
            prog.attach(&iface, XdpFlags::DRV_MODE).expect("attach the sink (native)");
            let mut config: Array<MapData, u32> =
                Array::try_from(ebpf.take_map(maps::SINK_CONFIG).expect("config map")).expect("array");
            config.set(sink::DST_PORT, u32::from(dst_port), 0).expect("set port");
            config.set(sink::WG_SRC_PORT, u32::from(wg_src_port), 0).expect("set port");
            let stats = PerCpuArray::try_from(ebpf.take_map(maps::SINK_STATS).expect("stats map")).expect("per-cpu");
            Self { stats, _ebpf: ebpf }
        })
    }

    /// Packets counted so far (all CPUs).
    pub fn packets(&self) -> u64 {
        self.stats.get(&sink::PACKETS, 0).map(|v| v.iter().sum()).unwrap_or(0)
    }
}

/// Frames of equal length, back to back.
#[derive(Debug)]
pub struct FrameRing {
    pub data: Vec<u8>,
    pub frame_len: usize,
}

impl FrameRing {
    pub fn with_capacity(frame_len: usize, count: usize) -> Self {
        Self { data: Vec::with_capacity(frame_len * count), frame_len }
    }

    pub fn len(&self) -> usize {
        self.data.len() / self.frame_len
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn frame(&self, i: usize) -> &[u8] {
        &self.data[i * self.frame_len..(i + 1) * self.frame_len]
    }
}

/// Addresses for Ethernet + IPv4 + UDP framing.
#[derive(Debug, Clone, Copy)]
pub struct Framing {
    pub src_mac: MacAddr,
    pub dst_mac: MacAddr,
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
}

impl Framing {
    pub fn frame_len(payload_len: usize) -> usize {
        ETHERNET_HEADER_LEN + IPV4_HEADER_LEN + UDP_HEADER_LEN + payload_len
    }

    /// Appends one frame carrying `payload` to `ring` (UDP checksum 0, as IPv4 allows).
    pub fn push(&self, ring: &mut FrameRing, payload: &[u8]) {
        let start = ring.data.len();
        ring.data.resize(start + Self::frame_len(payload.len()), 0);
        let f = &mut ring.data[start..];
        f[..6].copy_from_slice(&self.dst_mac.0);
        f[6..12].copy_from_slice(&self.src_mac.0);
        f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        let ip = &mut f[ETHERNET_HEADER_LEN..];
        Ipv4Packet::emit(
            &mut *ip,
            *self.src.ip(),
            *self.dst.ip(),
            ip_protocol::UDP,
            64,
            UDP_HEADER_LEN + payload.len(),
        )
        .expect("room for the IPv4 header");
        let udp = &mut ip[IPV4_HEADER_LEN..];
        UdpDatagram::emit(&mut *udp, self.src.port(), self.dst.port(), payload.len()).expect("room for UDP");
        udp[6..8].copy_from_slice(&[0, 0]);
        udp[UDP_HEADER_LEN..].copy_from_slice(payload);
    }
}

/// An inner IPv4/UDP packet of exactly `len` bytes (≥ 28).
pub fn inner_packet(len: usize, src: Ipv4Addr, dst: Ipv4Addr, dst_port: u16) -> Vec<u8> {
    let mut p = vec![0x5au8; len.max(IPV4_HEADER_LEN + UDP_HEADER_LEN)];
    let payload = p.len() - IPV4_HEADER_LEN - UDP_HEADER_LEN;
    Ipv4Packet::emit(&mut p[..], src, dst, ip_protocol::UDP, 64, UDP_HEADER_LEN + payload).expect("room");
    UdpDatagram::emit(&mut p[IPV4_HEADER_LEN..], 9998, dst_port, payload).expect("room");
    p[IPV4_HEADER_LEN + 6..IPV4_HEADER_LEN + 8].copy_from_slice(&[0, 0]);
    p
}

/// An AF_PACKET socket of `kind` (SOCK_RAW / SOCK_DGRAM) for `protocol`
/// (network byte order; 0: send only) bound to `iface` in the calling
/// thread's network namespace. Panics with the reason when that fails.
pub fn bound_packet_socket(iface: &str, kind: libc::c_int, protocol: u16) -> OwnedFd {
    let name = std::ffi::CString::new(iface).expect("interface name");
    // SAFETY: plain socket(2)/if_nametoindex(3) calls; the name is a valid C string.
    let (raw, index) =
        unsafe { (libc::socket(libc::AF_PACKET, kind, i32::from(protocol)), libc::if_nametoindex(name.as_ptr())) };
    assert!(raw >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
    assert!(index > 0, "no interface {iface}");
    // SAFETY: `raw` is a fresh, valid descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: sockaddr_ll is plain data, fully initialised here, and bind gets
    // its exact size; `fd` is open.
    let rc = unsafe {
        let mut addr: libc::sockaddr_ll = std::mem::zeroed();
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = protocol;
        addr.sll_ifindex = index as i32;
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(rc, 0, "bind AF_PACKET: {}", std::io::Error::last_os_error());
    fd
}

/// An AF_PACKET socket bound to one interface, bypassing the qdisc.
#[derive(Debug)]
pub struct PacketSocket {
    fd: OwnedFd,
}

const BATCH: usize = 256;

impl PacketSocket {
    pub fn open(ns: &Netns, iface: &str) -> Self {
        let iface = iface.to_owned();
        ns.enter(move || {
            let fd = bound_packet_socket(&iface, libc::SOCK_RAW, 0);
            let one: libc::c_int = 1;
            // SAFETY: `one` is a valid c_int for the size given and `fd` is open.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_PACKET,
                    libc::PACKET_QDISC_BYPASS,
                    (&one as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as u32,
                )
            };
            Self { fd }
        })
    }

    /// Sends frames `range` of `ring` in batches; returns how many the kernel took.
    pub fn send(&self, ring: &FrameRing, range: std::ops::Range<usize>) -> usize {
        let mut iov: Vec<libc::iovec> = vec![libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; BATCH];
        // SAFETY: mmsghdr is plain data; all-zero is a valid (empty) value.
        let mut msgs: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; BATCH];
        let mut sent = 0;
        let mut i = range.start;
        while i < range.end {
            let n = (range.end - i).min(BATCH);
            for k in 0..n {
                let f = ring.frame(i + k);
                iov[k] = libc::iovec { iov_base: f.as_ptr() as *mut libc::c_void, iov_len: f.len() };
                msgs[k].msg_hdr.msg_iov = &mut iov[k];
                msgs[k].msg_hdr.msg_iovlen = 1;
            }
            // SAFETY: `msgs[..n]` point at `iov[..n]`, which point into `ring`,
            // all alive and unchanged for the duration of the call.
            let rc = unsafe { libc::sendmmsg(self.fd.as_raw_fd(), msgs.as_mut_ptr(), n as u32, 0) };
            if rc <= 0 {
                // ENOBUFS and the like: the device is saturated; skip ahead.
                i += n;
                continue;
            }
            sent += rc as usize;
            i += rc as usize;
        }
        sent
    }
}

/// A WireGuard client session with the gateway, driven by the protocol core
/// over a UDP socket in the client namespace.
#[derive(Debug)]
pub struct ClientSession {
    pub device: Device,
    pub peer: PeerId,
    pub socket: UdpSocket,
    pub local: SocketAddrV4,
}

impl ClientSession {
    /// Completes a handshake with the gateway at `gateway` (`gateway_key`).
    pub fn connect(
        ns: &Netns,
        key: PrivateKey,
        local: SocketAddrV4,
        gateway: SocketAddr,
        gateway_key: PublicKey,
    ) -> Self {
        let socket = ns.udp_socket(&local.to_string());
        socket.set_read_timeout(Some(Duration::from_millis(200))).expect("timeout");
        let mut device = Device::new(key, AeadBackend::Ring, 12, Instant::now());
        let cfg =
            PeerConfig { public_key: gateway_key, preshared_key: PresharedKey::default(), persistent_keepalive: None };
        let peer = device.add_peer(cfg, Some(gateway), &["0.0.0.0/0".parse().expect("prefix")]).expect("peer");
        let mut s = Self { device, peer, socket, local };
        let mut out = vec![0u8; 2048];
        let mut buf = vec![0u8; 2048];
        let deadline = Instant::now() + Duration::from_secs(10);
        while s.device.peer_last_handshake(peer).is_none() {
            assert!(Instant::now() < deadline, "no handshake with the gateway at {gateway}");
            s.device.initiate(peer);
            s.device.tick(Instant::now());
            while let Some(t) = s.device.poll_transmit(Instant::now(), SystemTime::now(), &mut out) {
                s.socket.send_to(&out[..t.len], t.to).expect("send");
            }
            if let Ok((n, from)) = s.socket.recv_from(&mut buf) {
                let _ = s.device.receive(from, &mut buf[..n], false, Instant::now(), SystemTime::now(), &mut out);
            }
        }
        // Confirm the session (the responder waits for our first data packet).
        let mut ka = vec![0u8; 64];
        if let Ok(t) = s.device.send_keepalive(peer, Instant::now(), &mut ka) {
            s.socket.send_to(&ka[..t.len], t.to).expect("send keepalive");
        }
        s
    }

    /// `count` transport packets carrying `inner`, with increasing counters,
    /// framed for the wire by `framing`.
    pub fn encrypt_ring(&mut self, inner: &[u8], count: usize, framing: &Framing) -> FrameRing {
        let mut out = vec![0u8; inner.len() + 64];
        let mut ring = FrameRing::with_capacity(Framing::frame_len(inner.len() + 32 + 15), count);
        let mut first_len = None;
        for _ in 0..count {
            match self.device.send(inner, Instant::now(), SystemTime::now(), &mut out) {
                Ok(Action::Send { bytes, .. }) => {
                    let len = bytes.len();
                    assert_eq!(*first_len.get_or_insert(len), len, "equal-length frames");
                    framing.push(&mut ring, bytes);
                }
                other => panic!("encrypting a benchmark packet failed: {other:?}"),
            }
        }
        ring.frame_len = Framing::frame_len(first_len.unwrap_or(0));
        ring
    }
}
