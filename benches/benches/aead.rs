//! Bare ChaCha20-Poly1305 seal and open, both backends, at 64/512/1420 bytes.
//! Open copies a pristine ciphertext into the work buffer first (as the transport
//! bench must), so the two benches are directly comparable.
//!
//! `aead_cores`: the same open on 1 and 2 cores at once, each with buffers of
//! its own (nothing shared, nothing handed over): what a second core adds to
//! bare AEAD on this machine, the ceiling for one tunnel on two crypto
//! threads (`worker_loop`'s `worker_crypto_threads`).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;
use wgxdp_dataplane::noise::crypto::counter_nonce;
use wgxdp_dataplane::noise::{AeadBackend, TransportKey};

const SIZES: [usize; 3] = [64, 512, 1420];

fn aead(c: &mut Criterion) {
    let mut g = c.benchmark_group("aead");
    for backend in [AeadBackend::Ring, AeadBackend::RustCrypto] {
        let key = TransportKey::new(backend, &[7u8; 32]);
        for size in SIZES {
            g.throughput(Throughput::Bytes(size as u64));
            let mut buf = vec![0x5au8; size + 16];
            g.bench_with_input(BenchmarkId::new(format!("seal/{backend:?}"), size), &size, |b, _| {
                let mut n = 0u64;
                b.iter(|| {
                    n += 1;
                    key.seal(&counter_nonce(n), &[], black_box(&mut buf));
                })
            });
            let mut sealed = vec![0x5au8; size + 16];
            key.seal(&counter_nonce(1), &[], &mut sealed);
            let mut work = sealed.clone();
            g.bench_with_input(BenchmarkId::new(format!("open/{backend:?}"), size), &size, |b, _| {
                b.iter(|| {
                    work.copy_from_slice(&sealed);
                    black_box(key.open(&counter_nonce(1), &[], black_box(&mut work)).is_ok())
                })
            });
        }
    }
    g.finish();
}

fn aead_cores(c: &mut Criterion) {
    let cores = wgxdp_dataplane::gateway::usable_cores();
    let mut g = c.benchmark_group("aead_cores");
    for size in [64usize, 1420] {
        for threads in [1usize, 2] {
            if threads > cores.len() {
                continue;
            }
            g.throughput(Throughput::Elements(1));
            g.bench_function(BenchmarkId::new(format!("open_{threads}_cores"), size), |b| {
                b.iter_custom(|iters| {
                    let per_thread = iters.div_ceil(threads as u64);
                    let start = std::sync::Barrier::new(threads);
                    std::thread::scope(|s| {
                        let runs: Vec<_> = cores[..threads]
                            .iter()
                            .map(|&core| {
                                let start = &start;
                                s.spawn(move || {
                                    core_affinity::set_for_current(core_affinity::CoreId { id: core });
                                    let key = TransportKey::new(AeadBackend::Ring, &[7u8; 32]);
                                    let mut sealed = vec![0x5au8; size + 16];
                                    key.seal(&counter_nonce(1), &[], &mut sealed);
                                    let mut work = sealed.clone();
                                    start.wait();
                                    let t = std::time::Instant::now();
                                    for _ in 0..per_thread {
                                        work.copy_from_slice(&sealed);
                                        black_box(key.open(&counter_nonce(1), &[], black_box(&mut work)).is_ok());
                                    }
                                    t.elapsed()
                                })
                            })
                            .collect();
                        // Per packet of all threads: the slowest thread's time
                        // over the packets they opened together.
                        let slowest = runs.into_iter().map(|r| r.join().expect("an opening thread")).max();
                        slowest.unwrap_or_default().mul_f64(iters as f64 / (per_thread * threads as u64) as f64)
                    })
                })
            });
        }
    }
    g.finish();
}

criterion_group!(benches, aead, aead_cores);
criterion_main!(benches);
