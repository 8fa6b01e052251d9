//! The XDP program: classifies frames on the tunnel-side NIC. WireGuard UDP to
//! the gateway's listen port is tunnel traffic; everything else, and anything
//! malformed, goes to the kernel untouched. (Redirecting tunnel traffic into
//! AF_XDP sockets builds on this classification.)
#![no_std]
#![no_main]

use aya_ebpf::bindings::xdp_action;
use aya_ebpf::macros::{map, xdp};
use aya_ebpf::maps::{Array, PerCpuArray};
use aya_ebpf::programs::XdpContext;
use core::mem::size_of;
use wgxdp_common::{config, stat};

#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

#[map]
static CONFIG: Array<u32> = Array::with_max_entries(config::COUNT, 0);

const ETH_HDR_LEN: usize = 14;
const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_UDP: u8 = 17;
const IPV6_HDR_LEN: usize = 40;

/// Why a frame could not be classified.
enum Malformed {
    Truncated,
}

#[xdp]
pub fn wgxdp_wan(ctx: XdpContext) -> u32 {
    let (counter, action) = match classify(&ctx) {
        Ok(true) => (stat::TUNNEL, xdp_action::XDP_PASS),
        Ok(false) => (stat::PASSED, xdp_action::XDP_PASS),
        Err(Malformed::Truncated) => (stat::MALFORMED, xdp_action::XDP_PASS),
    };
    count(counter);
    action
}

fn count(index: u32) {
    if let Some(c) = STATS.get_ptr_mut(index) {
        // SAFETY: the pointer comes from the per-CPU map for this CPU, valid for
        // the program's run; no other context writes this CPU's slot meanwhile.
        unsafe { *c += 1 };
    }
}

/// The only way this program reads packet memory: a pointer to a `T` at
/// `offset`, if the whole `T` lies inside the frame (the verifier checks this
/// comparison before any access).
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*const T, Malformed> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return Err(Malformed::Truncated);
    }
    Ok((start + offset) as *const T)
}

#[inline(always)]
fn read_u8(ctx: &XdpContext, offset: usize) -> Result<u8, Malformed> {
    let p = ptr_at::<u8>(ctx, offset)?;
    // SAFETY: `ptr_at` checked that the byte lies inside the frame.
    Ok(unsafe { *p })
}

#[inline(always)]
fn read_be16(ctx: &XdpContext, offset: usize) -> Result<u16, Malformed> {
    let p = ptr_at::<[u8; 2]>(ctx, offset)?;
    // SAFETY: `ptr_at` checked that both bytes lie inside the frame; [u8; 2] has
    // alignment 1.
    Ok(u16::from_be_bytes(unsafe { *p }))
}

/// True for a UDP datagram to the configured listen port.
#[inline(always)]
fn classify(ctx: &XdpContext) -> Result<bool, Malformed> {
    let ethertype = read_be16(ctx, 12)?;
    let udp_offset = match ethertype {
        ETH_P_IPV4 => {
            let ver_ihl = read_u8(ctx, ETH_HDR_LEN)?;
            if read_u8(ctx, ETH_HDR_LEN + 9)? != IPPROTO_UDP {
                return Ok(false);
            }
            ETH_HDR_LEN + usize::from(ver_ihl & 0x0f) * 4
        }
        ETH_P_IPV6 => {
            if read_u8(ctx, ETH_HDR_LEN + 6)? != IPPROTO_UDP {
                return Ok(false);
            }
            ETH_HDR_LEN + IPV6_HDR_LEN
        }
        _ => return Ok(false),
    };
    let dst_port = read_be16(ctx, udp_offset + 2)?;
    let listen_port = CONFIG.get(config::LISTEN_PORT).copied().unwrap_or(0);
    Ok(listen_port != 0 && u32::from(dst_port) == listen_port)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
