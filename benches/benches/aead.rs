//! Bare ChaCha20-Poly1305 seal and open, both backends, at 64/512/1420 bytes.
//! Open copies a pristine ciphertext into the work buffer first (as the transport
//! bench must), so the two benches are directly comparable.

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

criterion_group!(benches, aead);
criterion_main!(benches);
