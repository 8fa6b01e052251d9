//! The full transport paths through the `Device`, next to the bare AEAD on the
//! same buffers in the same run (the README's ratio comes from these pairs):
//!
//! - decrypt: copy a received message into the work buffer, parse, receiver-
//!   index lookup, replay check, AEAD open, allowed-IPs source check, timers;
//! - encrypt: parse the inner packet, allowed-IPs lookup, copy behind the
//!   header, pad, AEAD seal.
//!
//! Decrypt consumes counters (replays are rejected), so messages are made in
//! chunks outside the timed region and the timed loop walks a chunk.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};
use wgxdp_dataplane::device::Action;
use wgxdp_dataplane::noise::crypto::counter_nonce;
use wgxdp_dataplane::noise::{AeadBackend, TransportKey};
use wgxdp_dataplane::testing::{connected_pair, ipv4_packet, CLIENT_ADDR};

const CHUNK: usize = 1024;
/// Inner packet sizes: minimum-ish, middle, and a full 1420-byte tunnel MTU.
const SIZES: [usize; 3] = [64, 512, 1420];

fn decrypt(c: &mut Criterion) {
    let mut g = c.benchmark_group("transport_decrypt");
    let src: SocketAddr = CLIENT_ADDR.parse().unwrap();
    for size in SIZES {
        g.throughput(Throughput::Bytes(size as u64));
        let packet = ipv4_packet(size, [10, 0, 2, 7], [10, 0, 1, 1]);

        let mut s = connected_pair(AeadBackend::Ring);
        let mut out = vec![0u8; 2048];
        let mut chunk: Vec<Vec<u8>> = Vec::with_capacity(CHUNK);
        let mut work = vec![0u8; 2048];
        g.bench_with_input(BenchmarkId::new("device", size), &size, |b, _| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                let mut left = iters as usize;
                let now = Instant::now();
                let wall = SystemTime::now();
                while left > 0 {
                    let n = left.min(CHUNK);
                    chunk.clear();
                    for _ in 0..n {
                        match s.client.send(&packet, now, wall, &mut out) {
                            Ok(Action::Send { bytes, .. }) => chunk.push(bytes.to_vec()),
                            other => panic!("client send: {other:?}"),
                        }
                    }
                    let start = Instant::now();
                    for msg in &chunk {
                        let w = &mut work[..msg.len()];
                        w.copy_from_slice(msg);
                        let r = s.gateway.receive(src, w, false, now, wall, &mut out);
                        debug_assert!(matches!(r, Ok(Action::Deliver { .. })));
                        black_box(r.is_ok());
                    }
                    timed += start.elapsed();
                    left -= n;
                }
                timed
            })
        });
        assert_eq!(s.gateway.drops.total(), 0, "every benchmarked message must be delivered");

        // The bare AEAD open of the same message size, same copying, same chunking.
        let key = TransportKey::new(AeadBackend::Ring, &[9u8; 32]);
        let msg_len = wgxdp_dataplane::noise::session::sealed_len(size) - 16;
        let sealed: Vec<Vec<u8>> = (0..CHUNK as u64)
            .map(|i| {
                let mut m = vec![0x42u8; msg_len];
                key.seal(&counter_nonce(i), &[], &mut m);
                m
            })
            .collect();
        g.bench_with_input(BenchmarkId::new("bare_aead_open", size), &size, |b, _| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                let mut left = iters as usize;
                while left > 0 {
                    let n = left.min(CHUNK);
                    let start = Instant::now();
                    for (i, m) in sealed[..n].iter().enumerate() {
                        let w = &mut work[..m.len()];
                        w.copy_from_slice(m);
                        black_box(key.open(&counter_nonce(i as u64), &[], w).is_ok());
                    }
                    timed += start.elapsed();
                    left -= n;
                }
                timed
            })
        });
    }
    g.finish();
}

fn encrypt(c: &mut Criterion) {
    let mut g = c.benchmark_group("transport_encrypt");
    for size in SIZES {
        g.throughput(Throughput::Bytes(size as u64));
        let packet = ipv4_packet(size, [10, 0, 1, 1], [10, 0, 2, 7]);
        let mut s = connected_pair(AeadBackend::Ring);
        // The gateway needs the client's endpoint: it has it from the handshake.
        let mut out = vec![0u8; 2048];
        let now = Instant::now();
        let wall = SystemTime::now();
        g.bench_with_input(BenchmarkId::new("device", size), &size, |b, _| {
            b.iter(|| {
                let r = s.gateway.send(black_box(&packet), now, wall, &mut out);
                black_box(matches!(r, Ok(Action::Send { .. })))
            })
        });
        assert_eq!(s.gateway.drops.total(), 0);

        let key = TransportKey::new(AeadBackend::Ring, &[9u8; 32]);
        let msg_len = wgxdp_dataplane::noise::session::sealed_len(size) - 16;
        let mut n = 0u64;
        g.bench_with_input(BenchmarkId::new("bare_aead_seal", size), &size, |b, _| {
            b.iter(|| {
                let w = &mut out[16..16 + msg_len];
                w[..size].copy_from_slice(&packet);
                n += 1;
                key.seal(&counter_nonce(n), &[], black_box(w));
            })
        });
    }
    g.finish();
}

criterion_group!(benches, decrypt, encrypt);
criterion_main!(benches);
