//! The XDP programs.
//!
//! - `wgxdp_wan` (tunnel-side NIC): UDP to the gateway's listen port goes to the
//!   AF_XDP socket of the frame's rx queue; everything else goes to the kernel.
//! - `wgxdp_lan` (site-side NIC): IP packets whose destination lies in a tunnel
//!   prefix (a peer's allowed IPs) go to the AF_XDP socket; everything else,
//!   ARP/ND and local traffic included, goes to the kernel.
//!
//! - `wgxdp_sink` (benchmarks only, see `sink.rs`): counts and drops what a
//!   benchmark measures on the receiving host.
//!
//! Malformed or truncated frames are never dropped here: the kernel sees them
//! untouched. Every decision is counted per CPU.
#![no_std]
#![no_main]

use aya_ebpf::bindings::xdp_action;
use aya_ebpf::macros::{map, xdp};
use aya_ebpf::maps::lpm_trie::Key;
use aya_ebpf::maps::{Array, HashMap, LpmTrie, PerCpuArray, XskMap};
use aya_ebpf::programs::XdpContext;
use core::mem::size_of;
use wgxdp_common::{config, stat, MAX_QUEUES, MAX_TUNNEL_PREFIXES, MAX_WAN_ADDRS};

mod sink;

#[map]
static WAN_XSKS: XskMap = XskMap::with_max_entries(MAX_QUEUES, 0);
#[map]
static LAN_XSKS: XskMap = XskMap::with_max_entries(MAX_QUEUES, 0);
#[map]
static CONFIG: Array<u32> = Array::with_max_entries(config::COUNT, 0);
#[map]
static TUNNEL_V4: LpmTrie<[u8; 4], u32> = LpmTrie::with_max_entries(MAX_TUNNEL_PREFIXES, 0);
#[map]
static TUNNEL_V6: LpmTrie<[u8; 16], u32> = LpmTrie::with_max_entries(MAX_TUNNEL_PREFIXES, 0);
/// The gateway's own WAN addresses: only UDP to one of them is ours.
#[map]
static WAN_ADDRS_V4: HashMap<[u8; 4], u8> = HashMap::with_max_entries(MAX_WAN_ADDRS, 0);
#[map]
static WAN_ADDRS_V6: HashMap<[u8; 16], u8> = HashMap::with_max_entries(MAX_WAN_ADDRS, 0);
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

const ETH_HDR_LEN: usize = 14;
const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_UDP: u8 = 17;
const IPV6_HDR_LEN: usize = 40;

/// A frame too short for the header being read.
struct Truncated;

/// What the classifier decided.
enum Verdict {
    Ours,
    NotOurs,
    /// WireGuard's port, but another host's address (WAN only).
    NotOurAddress,
}

#[xdp]
pub fn wgxdp_wan(ctx: XdpContext) -> u32 {
    let base = stat::WAN_REDIRECTED;
    match classify_wan(&ctx) {
        Ok(Verdict::Ours) => redirect(&ctx, &WAN_XSKS, base),
        Ok(Verdict::NotOurs) => pass(base + 1),
        Ok(Verdict::NotOurAddress) => pass(stat::WAN_NOT_OUR_ADDRESS),
        Err(Truncated) => pass(base + 2),
    }
}

#[xdp]
pub fn wgxdp_lan(ctx: XdpContext) -> u32 {
    let base = stat::LAN_REDIRECTED;
    match classify_lan(&ctx) {
        Ok(Verdict::Ours) => redirect(&ctx, &LAN_XSKS, base),
        Ok(Verdict::NotOurs | Verdict::NotOurAddress) => pass(base + 1),
        Err(Truncated) => pass(base + 2),
    }
}

/// Redirects to the socket of this rx queue; without one, the kernel gets it.
/// `base` is the interface's first counter (redirected; +3 is no-socket).
#[inline(always)]
fn redirect(ctx: &XdpContext, sockets: &XskMap, base: u32) -> u32 {
    // SAFETY: `ctx.ctx` is the xdp_md the kernel passed to this program run.
    let queue = unsafe { (*ctx.ctx).rx_queue_index };
    if sockets.get(queue).is_none() {
        return pass(base + 3);
    }
    match sockets.redirect(queue, 0) {
        Ok(action) => {
            count(base);
            action
        }
        Err(_) => pass(base + 3),
    }
}

#[inline(always)]
fn pass(counter: u32) -> u32 {
    count(counter);
    xdp_action::XDP_PASS
}

#[inline(always)]
fn count(index: u32) {
    if let Some(c) = STATS.get_ptr_mut(index) {
        // SAFETY: the pointer is this CPU's slot of a per-CPU map, valid for the
        // program run; nothing else runs on this CPU's slot meanwhile.
        unsafe { *c += 1 };
    }
}

/// The only way these programs read packet memory: a pointer to a `T` at
/// `offset`, if all of it lies inside the frame (the verifier sees the check).
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*const T, Truncated> {
    let start = ctx.data();
    if start + offset + size_of::<T>() > ctx.data_end() {
        return Err(Truncated);
    }
    Ok((start + offset) as *const T)
}

/// Reads a byte array at `offset` (alignment 1, so any offset is fine).
#[inline(always)]
fn read<const N: usize>(ctx: &XdpContext, offset: usize) -> Result<[u8; N], Truncated> {
    let p = ptr_at::<[u8; N]>(ctx, offset)?;
    // SAFETY: `ptr_at` checked that all N bytes lie inside the frame.
    Ok(unsafe { *p })
}

#[inline(always)]
fn ethertype(ctx: &XdpContext) -> Result<u16, Truncated> {
    Ok(u16::from_be_bytes(read::<2>(ctx, 12)?))
}

/// UDP to the configured listen port on one of the gateway's own WAN
/// addresses, over IPv4 (unfragmented) or IPv6 (no extension headers).
/// Anything else is the kernel's.
#[inline(always)]
fn classify_wan(ctx: &XdpContext) -> Result<Verdict, Truncated> {
    let mut ours = false;
    let udp_offset = match ethertype(ctx)? {
        ETH_P_IPV4 => {
            let [ver_ihl] = read::<1>(ctx, ETH_HDR_LEN)?;
            let frag = u16::from_be_bytes(read::<2>(ctx, ETH_HDR_LEN + 6)?);
            let [proto] = read::<1>(ctx, ETH_HDR_LEN + 9)?;
            if ver_ihl >> 4 != 4 || proto != IPPROTO_UDP || frag & 0x3fff != 0 {
                return Ok(Verdict::NotOurs);
            }
            let ihl = usize::from(ver_ihl & 0x0f) * 4;
            if ihl < 20 {
                return Err(Truncated);
            }
            let dst = read::<4>(ctx, ETH_HDR_LEN + 16)?;
            ours = WAN_ADDRS_V4.get_ptr(&dst).is_some();
            ETH_HDR_LEN + ihl
        }
        ETH_P_IPV6 => {
            let [next_header] = read::<1>(ctx, ETH_HDR_LEN + 6)?;
            if next_header != IPPROTO_UDP {
                return Ok(Verdict::NotOurs);
            }
            let dst = read::<16>(ctx, ETH_HDR_LEN + 24)?;
            ours = WAN_ADDRS_V6.get_ptr(&dst).is_some();
            ETH_HDR_LEN + IPV6_HDR_LEN
        }
        _ => return Ok(Verdict::NotOurs),
    };
    let dst_port = u16::from_be_bytes(read::<2>(ctx, udp_offset + 2)?);
    let listen_port = CONFIG.get(config::LISTEN_PORT).copied().unwrap_or(0);
    if listen_port == 0 || u32::from(dst_port) != listen_port {
        Ok(Verdict::NotOurs)
    } else if ours {
        Ok(Verdict::Ours)
    } else {
        Ok(Verdict::NotOurAddress)
    }
}

/// An IP packet whose destination is inside a tunnel prefix.
#[inline(always)]
fn classify_lan(ctx: &XdpContext) -> Result<Verdict, Truncated> {
    let hit = match ethertype(ctx)? {
        ETH_P_IPV4 => {
            let dst = read::<4>(ctx, ETH_HDR_LEN + 16)?;
            TUNNEL_V4.get(&Key::new(32, dst)).is_some()
        }
        ETH_P_IPV6 => {
            let dst = read::<16>(ctx, ETH_HDR_LEN + 24)?;
            TUNNEL_V6.get(&Key::new(128, dst)).is_some()
        }
        _ => false,
    };
    Ok(if hit { Verdict::Ours } else { Verdict::NotOurs })
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
