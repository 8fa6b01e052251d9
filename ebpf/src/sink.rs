//! `wgxdp_sink`: the benchmarks' packet counter. Attached to the host that
//! receives a gateway's output, it counts (per CPU) and drops IPv4 UDP
//! packets to the configured destination port, and WireGuard transport data
//! (type 4, longer than a keepalive) from the configured source port, so the
//! figures are what really came out of the gateway. Everything else passes.

use crate::{read, Truncated, ETH_HDR_LEN, ETH_P_IPV4, IPPROTO_UDP};
use aya_ebpf::bindings::xdp_action;
use aya_ebpf::macros::{map, xdp};
use aya_ebpf::maps::{Array, PerCpuArray};
use aya_ebpf::programs::XdpContext;
use wgxdp_common::sink;

#[map]
static SINK_CONFIG: Array<u32> = Array::with_max_entries(sink::CONFIG_COUNT, 0);
#[map]
static SINK_STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(sink::STATS_COUNT, 0);

/// A WireGuard transport message with no payload (a keepalive) is 32 bytes.
const KEEPALIVE_LEN: u16 = 32;
const UDP_HDR_LEN: u16 = 8;

#[xdp]
pub fn wgxdp_sink(ctx: XdpContext) -> u32 {
    match measured(&ctx) {
        Ok(true) => {
            add(sink::PACKETS, 1);
            add(sink::BYTES, (ctx.data_end() - ctx.data()) as u64);
            xdp_action::XDP_DROP
        }
        Ok(false) | Err(Truncated) => xdp_action::XDP_PASS,
    }
}

#[inline(always)]
fn add(index: u32, value: u64) {
    if let Some(c) = SINK_STATS.get_ptr_mut(index) {
        // SAFETY: this CPU's slot of a per-CPU map, valid for the program run.
        unsafe { *c += value };
    }
}

#[inline(always)]
fn measured(ctx: &XdpContext) -> Result<bool, Truncated> {
    if u16::from_be_bytes(read::<2>(ctx, 12)?) != ETH_P_IPV4 {
        return Ok(false);
    }
    let [ver_ihl] = read::<1>(ctx, ETH_HDR_LEN)?;
    let [proto] = read::<1>(ctx, ETH_HDR_LEN + 9)?;
    if ver_ihl != 0x45 || proto != IPPROTO_UDP {
        return Ok(false);
    }
    let udp = ETH_HDR_LEN + 20;
    let src = u32::from(u16::from_be_bytes(read::<2>(ctx, udp)?));
    let dst = u32::from(u16::from_be_bytes(read::<2>(ctx, udp + 2)?));
    let len = u16::from_be_bytes(read::<2>(ctx, udp + 4)?);
    let dst_port = SINK_CONFIG.get(sink::DST_PORT).copied().unwrap_or(0);
    if dst_port != 0 && dst == dst_port {
        return Ok(true);
    }
    let wg_port = SINK_CONFIG.get(sink::WG_SRC_PORT).copied().unwrap_or(0);
    if wg_port != 0 && src == wg_port && len > UDP_HDR_LEN + KEEPALIVE_LEN {
        let [msg_type] = read::<1>(ctx, udp + 8)?;
        return Ok(msg_type == 4);
    }
    Ok(false)
}
