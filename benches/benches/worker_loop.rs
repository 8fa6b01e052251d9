//! The worker's whole per-packet loop over in-memory frame queues (no NIC):
//! frames in on one side, processed in batches of 64 exactly as on AF_XDP,
//! frames out on the other. Per packet, next to the bare AEAD on the same
//! size in the same run, so a regression in any stage of the loop shows here.
//!
//! - `wan_to_lan`: parse Ethernet/IP/UDP, index lookup, replay check, open in
//!   place, allowed-IPs source check, roaming check, forwarding policy (local
//!   networks, connection table, rules), neighbour lookup, copy into a LAN
//!   frame with its Ethernet header, TTL decrement;
//! - `firewall`: the same with 0, 10 and 100 rules that all miss and 10 000
//!   tracked flows (the cost of the rules, next to none in the same run);
//! - `lan_to_wan`: parse, allowed-IPs lookup, peer view, TTL check, flow
//!   tracking, copy into a WAN frame (one hop less), seal, outer headers.
//!
//! The frame copy into the rx queue stands for the NIC's DMA and is timed too.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::time::{Duration, Instant};
use wgxdp_dataplane::conntrack::{ConnTrack, FlowKey};
use wgxdp_dataplane::flow::{tcp_flags, Flow};
use wgxdp_dataplane::frame_io::Port;
use wgxdp_dataplane::noise::AeadBackend;
use wgxdp_dataplane::policy::{FirewallRule, ForwardingPolicy, PortRange, RuleAction, RuleProtocol};
use wgxdp_dataplane::testing::{ipv4_l4_packet, ipv4_packet, with_tcp_flags, MemoryWorker, CLIENT_TUNNEL, LAN_HOST};

const BATCH: usize = 64;
const SIZES: [usize; 2] = [64, 1420];

fn wan_to_lan(c: &mut Criterion) {
    let mut g = c.benchmark_group("worker_wan_to_lan");
    for size in SIZES {
        g.throughput(Throughput::Elements(1));
        let m = MemoryWorker::new(AeadBackend::Ring);
        bench_wan_to_lan(&mut g, BenchmarkId::new("per_packet", size), m, size);
    }
    g.finish();
}

/// The WAN-to-LAN loop with 0, 10 and 100 firewall rules, none of which
/// matches (every rule is evaluated, the default allows), and 10 000 flows
/// in the connection table.
fn firewall(c: &mut Criterion) {
    let mut g = c.benchmark_group("worker_firewall");
    for size in SIZES {
        for rules in [0usize, 10, 100] {
            g.throughput(Throughput::Elements(1));
            let mut m = MemoryWorker::new(AeadBackend::Ring);
            m.set_policy(policy_with(rules));
            let now = ConnTrack::now_secs(Instant::now());
            for i in 0..10_000u32 {
                let lan_host = [10, 0, 1, (i % 250) as u8 + 2];
                let ports = (10_000 + (i / 250) as u16, 443);
                let packet = with_tcp_flags(ipv4_l4_packet(60, lan_host, CLIENT_TUNNEL, 6, ports, 64), tcp_flags::SYN);
                let flow = Flow::parse(&packet).expect("a flow");
                m.shared.conntrack.track(&FlowKey::of_outbound(m.gateway_peer, &flow).expect("tracked"), now);
            }
            assert!(m.shared.conntrack.live(now) >= 9_000, "the table holds the flows");
            bench_wan_to_lan(&mut g, BenchmarkId::new(format!("{rules}_rules"), size), m, size);
        }
    }
    g.finish();
}

/// `n` UDP rules for the client's site that each get as far as the port check
/// (protocol, source and destination match) and miss.
fn policy_with(n: usize) -> ForwardingPolicy {
    let rules = (0..n)
        .map(|i| FirewallRule {
            name: format!("rule {i}"),
            protocol: RuleProtocol::Udp,
            ports: Some(PortRange { first: 1 + i as u16 * 10, last: 5 + i as u16 * 10 }),
            source: Some("10.0.2.0/24".parse().expect("prefix")),
            destination: Some("10.0.1.0/24".parse().expect("prefix")),
            action: RuleAction::Deny,
        })
        .collect();
    ForwardingPolicy {
        local_networks: vec!["10.0.1.0/24".parse().expect("prefix")],
        rules,
        default_action: RuleAction::Allow,
    }
}

fn bench_wan_to_lan(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    id: BenchmarkId,
    mut m: MemoryWorker,
    size: usize,
) {
    let inner = ipv4_packet(size, CLIENT_TUNNEL, LAN_HOST);
    let mut batch = Vec::with_capacity(BATCH);
    g.bench_function(id, |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            let mut left = iters as usize;
            let mut frames: Vec<Vec<u8>> = Vec::with_capacity(BATCH);
            while left > 0 {
                let n = left.min(BATCH);
                // Counters must grow: encrypt outside the timed region.
                frames.clear();
                let now = Instant::now();
                frames.extend((0..n).map(|_| m.wan_frame(&inner, now)));
                let start = Instant::now();
                let io = m.worker.frames_mut();
                for f in &frames {
                    io.inject(Port::Wan, f);
                }
                m.run_until_idle(&mut batch, now);
                let delivered = m.worker.frames_mut().take_sent(Port::Lan, |f| {
                    std::hint::black_box(f.len());
                });
                timed += start.elapsed();
                assert_eq!(delivered, n, "every packet reaches the LAN queue");
                left -= n;
            }
            timed
        })
    });
}

fn lan_to_wan(c: &mut Criterion) {
    let mut g = c.benchmark_group("worker_lan_to_wan");
    for size in SIZES {
        g.throughput(Throughput::Elements(1));
        let mut m = MemoryWorker::new(AeadBackend::Ring);
        // Teach the worker the client's link-layer path (its first frame does).
        let now = Instant::now();
        let first = m.wan_frame(&ipv4_packet(64, CLIENT_TUNNEL, LAN_HOST), now);
        m.worker.frames_mut().inject(Port::Wan, &first);
        let mut batch = Vec::with_capacity(BATCH);
        m.run_until_idle(&mut batch, now);
        m.worker.frames_mut().take_sent(Port::Lan, |_| {});
        let frame = MemoryWorker::lan_frame(&ipv4_packet(size, LAN_HOST, CLIENT_TUNNEL));
        g.bench_with_input(BenchmarkId::new("per_packet", size), &size, |b, _| {
            b.iter_custom(|iters| {
                let mut left = iters as usize;
                let start = Instant::now();
                while left > 0 {
                    let n = left.min(BATCH);
                    let io = m.worker.frames_mut();
                    for _ in 0..n {
                        io.inject(Port::Lan, &frame);
                    }
                    m.run_until_idle(&mut batch, Instant::now());
                    let sent = m.worker.frames_mut().take_sent(Port::Wan, |f| {
                        std::hint::black_box(f.len());
                    });
                    assert_eq!(sent, n, "every packet leaves on the WAN queue");
                    left -= n;
                }
                start.elapsed()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, wan_to_lan, lan_to_wan, firewall);
criterion_main!(benches);
