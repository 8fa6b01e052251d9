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
//! - `crypto_threads`: both directions of one tunnel with the AEAD on 1 and 2
//!   crypto threads (the worker and one helper, `crypto_pool.rs`): one
//!   tunnel's throughput per added core.
//!
//! The frame copy into the rx queue stands for the NIC's DMA and is timed too.
//! Received datagrams are sealed by the client ahead of the timed region,
//! 4096 at a time (so a helper thread sees sustained traffic, not a gap per
//! batch).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};
use wgxdp_dataplane::conntrack::{ConnTrack, FlowKey};
use wgxdp_dataplane::flow::{tcp_flags, Flow};
use wgxdp_dataplane::frame_io::Port;
use wgxdp_dataplane::noise::AeadBackend;
use wgxdp_dataplane::policy::{FirewallRule, ForwardingPolicy, PortRange, RuleAction, RuleProtocol};
use wgxdp_dataplane::testing::{ipv4_l4_packet, ipv4_packet, with_tcp_flags, MemoryWorker, CLIENT_TUNNEL, LAN_HOST};

const BATCH: usize = 64;
/// Frames fed to the worker between emptying its tx queues.
const CHUNK: usize = 256;
/// For `crypto_threads`: a bigger pool and longer runs, so that filling and
/// draining the crypto pipeline at each run's ends stays a small share.
const LONG_POOL: usize = 8192;
const LONG_CHUNK: usize = 2048;
/// Datagrams the client seals ahead, outside the timed region, then fed in
/// one timed run (sustained traffic: a helper thread parks only between runs).
const SEALED_AHEAD: usize = 4096;
const SIZES: [usize; 2] = [64, 1420];

fn wan_to_lan(c: &mut Criterion) {
    let mut g = c.benchmark_group("worker_wan_to_lan");
    for size in SIZES {
        g.throughput(Throughput::Elements(1));
        let m = MemoryWorker::new(AeadBackend::Ring);
        bench_wan_to_lan(&mut g, BenchmarkId::new("per_packet", size), m, size, Dma::Timed, CHUNK);
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
            bench_wan_to_lan(&mut g, BenchmarkId::new(format!("{rules}_rules"), size), m, size, Dma::Timed, CHUNK);
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

/// Frames processed untimed before a timed run: a helper parked while the
/// bench prepared (sealing ahead, criterion's own work between samples) is
/// woken by them, and its wake-up latency stays out of the per-packet time.
const WARM_UP: usize = BATCH;

fn warm_up_helpers(
    m: &mut MemoryWorker,
    batch: &mut Vec<wgxdp_dataplane::frame_io::MemoryFrame>,
    frames: &[Vec<u8>],
    port: Port,
    now: Instant,
) {
    for f in frames {
        m.worker.frames_mut().inject(port, f);
    }
    m.run_until_idle(batch, now);
    let out = if port == Port::Wan { Port::Lan } else { Port::Wan };
    assert_eq!(m.worker.frames_mut().take_sent(out, |_| {}), frames.len(), "the warm-up went through");
}

/// Whether the copy into the rx queue (the NIC's DMA) is timed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Dma {
    Timed,
    /// Not: the worker's own work only. In production the NIC (zero-copy) or
    /// the sender's core (copy mode on veth) does it, never a crypto core,
    /// and it leaves the packet in memory, not in the worker's cache: the
    /// copied frames are flushed from the cache before the timed run.
    Untimed,
}

fn bench_wan_to_lan(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    id: BenchmarkId,
    mut m: MemoryWorker,
    size: usize,
    dma: Dma,
    chunk: usize,
) {
    let inner = ipv4_packet(size, CLIENT_TUNNEL, LAN_HOST);
    let mut batch = Vec::with_capacity(BATCH);
    let label = format!("wan_to_lan {size} B");
    g.bench_function(id, |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            let mut left = iters as usize;
            let mut frames: Vec<Vec<u8>> = Vec::with_capacity(SEALED_AHEAD);
            while left > 0 {
                let n = left.min(SEALED_AHEAD);
                // Counters must grow: encrypt outside the timed region.
                frames.clear();
                let now = Instant::now();
                frames.extend((0..n + WARM_UP).map(|_| m.wan_frame(&inner, now)));
                let (warm_up, frames) = frames.split_at(WARM_UP);
                warm_up_helpers(&mut m, &mut batch, warm_up, Port::Wan, now);
                let mut delivered = 0;
                for chunk in frames.chunks(chunk) {
                    let copy = Instant::now();
                    let io = m.worker.frames_mut();
                    for f in chunk {
                        io.inject(Port::Wan, f);
                    }
                    if dma == Dma::Untimed {
                        io.evict_received();
                    }
                    // As sustained traffic would, not parked by the untimed copy.
                    m.wake_helpers();
                    let work = Instant::now();
                    m.run_until_idle(&mut batch, now);
                    delivered += m.worker.frames_mut().take_sent(Port::Lan, |f| {
                        std::hint::black_box(f.len());
                    });
                    timed += if dma == Dma::Timed { copy.elapsed() } else { work.elapsed() };
                }
                assert_eq!(delivered, n, "every packet reaches the LAN queue");
                left -= n;
            }
            timed
        })
    });
    report_helper_share(&label, &m, m.counters.decrypted.load(Relaxed));
}

/// How much of the AEAD the helper ran (the rest: the worker itself, while
/// it waited for the oldest packet's).
fn report_helper_share(label: &str, m: &MemoryWorker, packets: u64) {
    if m.crypto_helpers() > 0 && packets > 0 {
        let helped = m.counters.crypto_offloaded.load(Relaxed);
        eprintln!("{label}: the helper ran {:.0} % of the AEAD jobs", 100.0 * helped as f64 / packets as f64);
    }
}

fn lan_to_wan(c: &mut Criterion) {
    let mut g = c.benchmark_group("worker_lan_to_wan");
    for size in SIZES {
        g.throughput(Throughput::Elements(1));
        let m = MemoryWorker::new(AeadBackend::Ring);
        bench_lan_to_wan(&mut g, BenchmarkId::new("per_packet", size), m, size, Dma::Timed, CHUNK);
    }
    g.finish();
}

fn bench_lan_to_wan(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    id: BenchmarkId,
    mut m: MemoryWorker,
    size: usize,
    dma: Dma,
    chunk: usize,
) {
    {
        // Teach the worker the client's link-layer path (its first frame does).
        let now = Instant::now();
        let first = m.wan_frame(&ipv4_packet(64, CLIENT_TUNNEL, LAN_HOST), now);
        m.worker.frames_mut().inject(Port::Wan, &first);
        let mut batch = Vec::with_capacity(BATCH);
        m.run_until_idle(&mut batch, now);
        m.worker.frames_mut().take_sent(Port::Lan, |_| {});
        let frame = MemoryWorker::lan_frame(&ipv4_packet(size, LAN_HOST, CLIENT_TUNNEL));
        let label = format!("lan_to_wan {size} B");
        g.bench_function(id, |b| {
            b.iter_custom(|iters| {
                let mut left = iters as usize;
                let mut timed = Duration::ZERO;
                warm_up_helpers(&mut m, &mut batch, &vec![frame.clone(); WARM_UP], Port::Lan, Instant::now());
                while left > 0 {
                    let n = left.min(chunk);
                    let copy = Instant::now();
                    let io = m.worker.frames_mut();
                    for _ in 0..n {
                        io.inject(Port::Lan, &frame);
                    }
                    if dma == Dma::Untimed {
                        io.evict_received();
                    }
                    // As sustained traffic would, not parked by the untimed copy.
                    m.wake_helpers();
                    let work = Instant::now();
                    m.run_until_idle(&mut batch, work);
                    let sent = m.worker.frames_mut().take_sent(Port::Wan, |f| {
                        std::hint::black_box(f.len());
                    });
                    timed += if dma == Dma::Timed { copy.elapsed() } else { work.elapsed() };
                    assert_eq!(sent, n, "every packet leaves on the WAN queue");
                    left -= n;
                }
                timed
            })
        });
        report_helper_share(&label, &m, m.counters.encrypted.load(Relaxed));
    }
}

/// One tunnel, both directions, with 1 and 2 crypto threads (same run: the
/// ratio is the scaling of one tunnel onto a second core).
fn crypto_threads(c: &mut Criterion) {
    // Every worker first: their helpers are started (and pinned to the cores
    // after the first) while this thread may still run anywhere.
    let mut workers = Vec::new();
    for size in SIZES {
        for threads in [1usize, 2] {
            let wan = MemoryWorker::with_frames(AeadBackend::Ring, threads, LONG_POOL);
            let lan = MemoryWorker::with_frames(AeadBackend::Ring, threads, LONG_POOL);
            workers.push((size, threads, wan, lan));
        }
    }
    // This thread is the worker: on the first usable core, as a gateway pins
    // its first worker. Unpinned, the scheduler may wake a helper onto the
    // worker's own core.
    if let Some(&first) = wgxdp_dataplane::gateway::usable_cores().first() {
        assert!(core_affinity::set_for_current(core_affinity::CoreId { id: first }), "pin the bench thread");
    }
    let mut g = c.benchmark_group("worker_crypto_threads");
    for (size, threads, wan, lan) in workers {
        g.throughput(Throughput::Elements(1));
        let id = BenchmarkId::new(format!("wan_to_lan_{threads}_threads"), size);
        bench_wan_to_lan(&mut g, id, wan, size, Dma::Untimed, LONG_CHUNK);
        let id = BenchmarkId::new(format!("lan_to_wan_{threads}_threads"), size);
        bench_lan_to_wan(&mut g, id, lan, size, Dma::Untimed, LONG_CHUNK);
    }
    g.finish();
}

criterion_group!(benches, wan_to_lan, lan_to_wan, firewall, crypto_threads);
criterion_main!(benches);
