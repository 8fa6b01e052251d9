//! What a hostile sender on the WAN side can do without any secret: handshake
//! initiations with a valid MAC1 (it needs only the gateway's public key),
//! datagrams of every length with a WireGuard type byte, forged transport
//! packets under a sniffed receiver index, replays of captured packets, and
//! garbage. Plus the release-profile `wgxdp` binary those tests run against.

use crate::blast::bound_packet_socket;
use crate::Netns;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};
use wgxdp_dataplane::noise::cookie::{CookieJar, MacKeys};
use wgxdp_dataplane::noise::PublicKey;
use wgxdp_dataplane::wire::{ip_protocol, Ipv4Packet, UdpDatagram};

/// The `wgxdp` binary built with the `e2e` profile (release code generation,
/// `panic = "abort"`, no LTO): `target/e2e/wgxdp`, beside the `target/<profile>/`
/// directory of `debug_binary` (the `CARGO_BIN_EXE_wgxdp` of the calling test).
/// `WGXDP_E2E_BIN` overrides it. Fails, saying how to build it, when it is
/// missing or older than a source file of the gateway.
pub fn e2e_binary(debug_binary: &Path) -> PathBuf {
    let bin = match std::env::var_os("WGXDP_E2E_BIN") {
        Some(p) => PathBuf::from(p),
        None => debug_binary
            .parent()
            .and_then(Path::parent)
            .expect("CARGO_BIN_EXE_wgxdp is inside target/<profile>/")
            .join("e2e/wgxdp"),
    };
    let build = "cargo build -p wgxdp-control --bin wgxdp --profile e2e (`cargo xtask test` does it first)";
    let built = std::fs::metadata(&bin)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("{}: {e}; build it with {build}", bin.display()));
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for dir in ["control/src", "dataplane/src", "ebpf/src", "ebpf/common/src"] {
        if let Some((file, t)) = newest(&root.join(dir)) {
            assert!(t <= built, "{} is older than {}: rebuild it with {build}", bin.display(), file.display());
        }
    }
    bin
}

/// The most recently modified file under `dir`.
fn newest(dir: &Path) -> Option<(PathBuf, SystemTime)> {
    let mut best: Option<(PathBuf, SystemTime)> = None;
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let p = e.path();
        let found = if p.is_dir() { newest(&p) } else { e.metadata().and_then(|m| m.modified()).ok().map(|t| (p, t)) };
        if let Some((p, t)) = found {
            if best.as_ref().is_none_or(|(_, b)| t > *b) {
                best = Some((p, t));
            }
        }
    }
    best
}

/// A deterministic xorshift generator (no secrets here, only variety).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.fill(&mut v);
        v
    }
}

/// Handshake initiations (type 1, 148 bytes) with random contents and a valid
/// MAC1 for the gateway: they pass the cheap check and cost it a DH each (or a
/// cookie reply, under load).
#[derive(Debug)]
pub struct InitiationForger {
    keys: MacKeys,
    jar: CookieJar,
    rng: Rng,
    sender: u32,
}

impl InitiationForger {
    pub fn new(gateway: &PublicKey, seed: u64) -> Self {
        Self { keys: MacKeys::new(gateway), jar: CookieJar::default(), rng: Rng::new(seed), sender: 0 }
    }

    pub fn next_message(&mut self) -> [u8; 148] {
        let mut msg = [0u8; 148];
        msg[0] = 1;
        self.sender = self.sender.wrapping_add(1);
        msg[4..8].copy_from_slice(&self.sender.to_le_bytes());
        self.rng.fill(&mut msg[8..116]);
        self.jar.stamp(&self.keys, &mut msg, Instant::now());
        msg
    }
}

/// Datagrams of every length in `lengths` whose first byte is each WireGuard
/// message type (1..=4) followed by three zero bytes (as far as the length
/// allows); the rest is zeros (`rng` = None) or random.
pub fn typed_datagrams(lengths: std::ops::RangeInclusive<usize>, rng: Option<&mut Rng>) -> Vec<Vec<u8>> {
    let mut rng = rng;
    let mut out = Vec::new();
    for len in lengths {
        for ty in 1u8..=4 {
            let mut d = vec![0u8; len];
            if let Some(r) = rng.as_deref_mut() {
                r.fill(&mut d);
            }
            d.iter_mut().take(4).enumerate().for_each(|(i, b)| *b = if i == 0 { ty } else { 0 });
            out.push(d);
        }
    }
    out
}

/// Transport data messages (type 4) under `receiver` with a garbage body:
/// they reach the AEAD and must fail it. Counters start far above `counter`
/// so the replay pre-check lets them through.
pub fn forged_transport(
    receiver: u32,
    counter: u64,
    lengths: std::ops::RangeInclusive<usize>,
    rng: &mut Rng,
) -> Vec<Vec<u8>> {
    lengths
        .map(|len| {
            let mut d = rng.bytes(len.max(16));
            d[..4].copy_from_slice(&[4, 0, 0, 0]);
            d[4..8].copy_from_slice(&receiver.to_le_bytes());
            d[8..16].copy_from_slice(&(counter + 1_000_000 + rng.next_u64() % 1_000_000).to_le_bytes());
            d
        })
        .collect()
}

/// A captured WireGuard transport packet (UDP payload) and its header fields.
#[derive(Debug, Clone)]
pub struct Captured {
    pub payload: Vec<u8>,
    pub receiver: u32,
    pub counter: u64,
}

/// An AF_PACKET socket that sees the packets an interface sends and receives
/// (link-layer header removed).
#[derive(Debug)]
pub struct Sniffer {
    fd: OwnedFd,
}

impl Sniffer {
    pub fn open(ns: &Netns, iface: &str) -> Self {
        let iface = iface.to_owned();
        ns.enter(move || {
            // ETH_P_ALL: sockets bound to one protocol see only received packets,
            // not the ones the interface sends. Non-IPv4 fails `new_checked` below.
            let fd = bound_packet_socket(&iface, libc::SOCK_DGRAM, (libc::ETH_P_ALL as u16).to_be());
            let tv = libc::timeval { tv_sec: 0, tv_usec: 200_000 };
            // SAFETY: `tv` is a valid timeval for the size given and `fd` is open.
            unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&tv as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as u32,
                )
            };
            Self { fd }
        })
    }

    /// Waits up to `timeout` for `count` WireGuard transport packets from
    /// `from` to `to`; returns what it captured (possibly fewer).
    pub fn transport_packets(
        &self,
        from: Ipv4Addr,
        to: SocketAddrV4,
        count: usize,
        timeout: Duration,
    ) -> Vec<Captured> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 65536];
        let mut got = Vec::new();
        while got.len() < count && Instant::now() < deadline {
            // SAFETY: `buf` is valid for writes of its whole length during the call.
            let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            let Ok(n) = usize::try_from(n) else { continue };
            let Ok(ip) = Ipv4Packet::new_checked(&buf[..n]) else { continue };
            if ip.protocol() != ip_protocol::UDP || ip.source() != from || ip.destination() != *to.ip() {
                continue;
            }
            let Ok(udp) = UdpDatagram::new_checked(ip.payload()) else { continue };
            let p = udp.payload();
            if udp.dst_port() != to.port() || p.len() < 32 || p[0] != 4 {
                continue;
            }
            let receiver = u32::from_le_bytes(p[4..8].try_into().expect("4 bytes"));
            let counter = u64::from_le_bytes(p[8..16].try_into().expect("8 bytes"));
            got.push(Captured { payload: p.to_vec(), receiver, counter });
        }
        got
    }
}
