//! The worker's whole per-packet loop over in-memory frame queues (no NIC):
//! frames in on one side, processed in batches of 64 exactly as on AF_XDP,
//! frames out on the other. Per packet, next to the bare AEAD on the same
//! size in the same run, so a regression in any stage of the loop shows here.
//!
//! - `wan_to_lan`: parse Ethernet/IP/UDP, index lookup, replay check, open in
//!   place, allowed-IPs source check, roaming check, neighbour lookup, copy
//!   into a LAN frame with its Ethernet header;
//! - `lan_to_wan`: parse, allowed-IPs lookup, peer view, copy into a WAN frame,
//!   seal, outer headers.
//!
//! The frame copy into the rx queue stands for the NIC's DMA and is timed too.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::time::{Duration, Instant};
use wgxdp_dataplane::noise::AeadBackend;
use wgxdp_dataplane::testing::{ipv4_packet, MemoryWorker, CLIENT_TUNNEL, LAN_HOST};

const BATCH: usize = 64;
const SIZES: [usize; 2] = [64, 1420];

fn wan_to_lan(c: &mut Criterion) {
    let mut g = c.benchmark_group("worker_wan_to_lan");
    for size in SIZES {
        g.throughput(Throughput::Elements(1));
        let mut m = MemoryWorker::new(AeadBackend::Ring);
        let inner = ipv4_packet(size, CLIENT_TUNNEL, LAN_HOST);
        let mut batch = Vec::with_capacity(BATCH);
        g.bench_with_input(BenchmarkId::new("per_packet", size), &size, |b, _| {
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
                    let (wan, _) = m.worker.queues_mut();
                    for f in &frames {
                        wan.inject(f);
                    }
                    m.run_until_idle(&mut batch, now);
                    let delivered = m.worker.queues_mut().1.take_sent(|f| {
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
    g.finish();
}

fn lan_to_wan(c: &mut Criterion) {
    let mut g = c.benchmark_group("worker_lan_to_wan");
    for size in SIZES {
        g.throughput(Throughput::Elements(1));
        let mut m = MemoryWorker::new(AeadBackend::Ring);
        // Teach the worker the client's link-layer path (its first frame does).
        let now = Instant::now();
        let first = m.wan_frame(&ipv4_packet(64, CLIENT_TUNNEL, LAN_HOST), now);
        m.worker.queues_mut().0.inject(&first);
        let mut batch = Vec::with_capacity(BATCH);
        m.run_until_idle(&mut batch, now);
        m.worker.queues_mut().1.take_sent(|_| {});
        let frame = MemoryWorker::lan_frame(&ipv4_packet(size, LAN_HOST, CLIENT_TUNNEL));
        g.bench_with_input(BenchmarkId::new("per_packet", size), &size, |b, _| {
            b.iter_custom(|iters| {
                let mut left = iters as usize;
                let start = Instant::now();
                while left > 0 {
                    let n = left.min(BATCH);
                    let (_, lan) = m.worker.queues_mut();
                    for _ in 0..n {
                        lan.inject(&frame);
                    }
                    m.run_until_idle(&mut batch, Instant::now());
                    let sent = m.worker.queues_mut().0.take_sent(|f| {
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

criterion_group!(benches, wan_to_lan, lan_to_wan);
criterion_main!(benches);
