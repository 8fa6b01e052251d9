//! Handshake costs: creating an initiation, and the responder's and
//! initiator's consuming sides.

use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;
use std::time::{Duration, Instant, SystemTime};
use wgxdp_dataplane::noise::handshake::{consume_initiation_static, StaticIdentity};
use wgxdp_dataplane::noise::peer::{Peer, PeerConfig};
use wgxdp_dataplane::noise::{AeadBackend, PresharedKey, PrivateKey};
use wgxdp_dataplane::wire::{HandshakeInitiation, HandshakeResponse};

fn handshake(c: &mut Criterion) {
    let i_id = StaticIdentity::new(PrivateKey::generate());
    let r_id = StaticIdentity::new(PrivateKey::generate());
    let psk = PresharedKey::generate();
    let cfg = |k| PeerConfig {
        public_key: k,
        preshared_key: psk.clone(),
        persistent_keepalive: None,
    };
    let mut initiator = Peer::new(&i_id, cfg(r_id.public), AeadBackend::Ring).unwrap();
    let mut responder = Peer::new(&r_id, cfg(i_id.public), AeadBackend::Ring).unwrap();
    let mut g = c.benchmark_group("handshake");
    let now = Instant::now();
    let mut init = [0u8; 148];

    g.bench_function("create_initiation", |b| {
        b.iter(|| {
            initiator
                .write_initiation(
                    &i_id,
                    1,
                    false,
                    now,
                    SystemTime::now(),
                    black_box(&mut init),
                )
                .unwrap()
        })
    });

    // Responder: consume an initiation and write the response. Each iteration
    // needs a newer timestamp and a gap past the flood limit, so time is faked.
    let base = SystemTime::now();
    let mut tick = 0u64;
    let mut resp = [0u8; 92];
    g.bench_function("consume_initiation_create_response", |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                tick += 1;
                let fake_now = now + Duration::from_millis(100 * tick);
                let wall = base + Duration::from_secs(tick);
                initiator
                    .write_initiation(&i_id, 1, false, fake_now, wall, &mut init)
                    .unwrap();
                let start = Instant::now();
                let view = HandshakeInitiation::new_checked(&init[..]).unwrap();
                let consumed = consume_initiation_static(&r_id, &view)
                    .unwrap()
                    .finish(responder.keys(), &view)
                    .unwrap();
                black_box(
                    responder
                        .write_response(&consumed, 2, fake_now, &mut resp)
                        .unwrap(),
                );
                timed += start.elapsed();
            }
            timed
        })
    });

    // Initiator: consume the response to a fresh initiation.
    g.bench_function("consume_response", |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                tick += 1;
                let fake_now = now + Duration::from_millis(100 * tick);
                let wall = base + Duration::from_secs(tick);
                initiator
                    .write_initiation(&i_id, 1, false, fake_now, wall, &mut init)
                    .unwrap();
                let view = HandshakeInitiation::new_checked(&init[..]).unwrap();
                let consumed = consume_initiation_static(&r_id, &view)
                    .unwrap()
                    .finish(responder.keys(), &view)
                    .unwrap();
                responder
                    .write_response(&consumed, 2, fake_now, &mut resp)
                    .unwrap();
                let start = Instant::now();
                let view = HandshakeResponse::new_checked(&resp[..]).unwrap();
                black_box(
                    initiator
                        .consume_response(&i_id, &view, fake_now, wall)
                        .unwrap(),
                );
                timed += start.elapsed();
            }
            timed
        })
    });
    g.finish();
}

criterion_group!(benches, handshake);
criterion_main!(benches);
