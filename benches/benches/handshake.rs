//! Handshake costs: creating an initiation, the responder consuming it and
//! writing the response, and the initiator consuming the response.

use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;
use std::time::{Duration, Instant, SystemTime};
use wgxdp_dataplane::noise::handshake::{consume_initiation_static, ConsumedInitiation, StaticIdentity};
use wgxdp_dataplane::noise::peer::{Peer, PeerConfig};
use wgxdp_dataplane::noise::{AeadBackend, PresharedKey, PrivateKey};
use wgxdp_dataplane::wire::{HandshakeInitiation, HandshakeResponse};

struct Sides {
    i_id: StaticIdentity,
    r_id: StaticIdentity,
    initiator: Peer,
    responder: Peer,
    start: Instant,
    wall: SystemTime,
    tick: u64,
}

impl Sides {
    fn new() -> Self {
        let i_id = StaticIdentity::new(PrivateKey::generate());
        let r_id = StaticIdentity::new(PrivateKey::generate());
        let psk = PresharedKey::generate();
        let cfg = |k| PeerConfig { public_key: k, preshared_key: psk.clone(), persistent_keepalive: None };
        let initiator = Peer::new(&i_id, cfg(r_id.public), AeadBackend::Ring).unwrap();
        let responder = Peer::new(&r_id, cfg(i_id.public), AeadBackend::Ring).unwrap();
        Self { i_id, r_id, initiator, responder, start: Instant::now(), wall: SystemTime::now(), tick: 0 }
    }

    /// A new initiation at a faked later time: its timestamp is newer than the
    /// last and it arrives past the responder's flood limit.
    fn initiation(&mut self, out: &mut [u8; 148]) -> (Instant, SystemTime) {
        self.tick += 1;
        let now = self.start + Duration::from_millis(100 * self.tick);
        let wall = self.wall + Duration::from_secs(self.tick);
        self.initiator.write_initiation(&self.i_id, 1, false, now, wall, out).unwrap();
        (now, wall)
    }

    fn consume(&self, init: &[u8; 148]) -> ConsumedInitiation {
        let view = HandshakeInitiation::new_checked(&init[..]).unwrap();
        consume_initiation_static(&self.r_id, &view).unwrap().finish(self.responder.keys(), &view).unwrap()
    }
}

fn handshake(c: &mut Criterion) {
    let mut s = Sides::new();
    let (mut init, mut resp) = ([0u8; 148], [0u8; 92]);
    let mut g = c.benchmark_group("handshake");

    g.bench_function("create_initiation", |b| b.iter(|| black_box(s.initiation(&mut init))));

    g.bench_function("consume_initiation_create_response", |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                let (now, _) = s.initiation(&mut init);
                let start = Instant::now();
                let consumed = s.consume(&init);
                black_box(s.responder.write_response(&consumed, 2, now, &mut resp).unwrap());
                timed += start.elapsed();
            }
            timed
        })
    });

    g.bench_function("consume_response", |b| {
        b.iter_custom(|iters| {
            let mut timed = Duration::ZERO;
            for _ in 0..iters {
                let (now, wall) = s.initiation(&mut init);
                let consumed = s.consume(&init);
                s.responder.write_response(&consumed, 2, now, &mut resp).unwrap();
                let start = Instant::now();
                let view = HandshakeResponse::new_checked(&resp[..]).unwrap();
                black_box(s.initiator.consume_response(&s.i_id, &view, now, wall).unwrap());
                timed += start.elapsed();
            }
            timed
        })
    });
    g.finish();
}

criterion_group!(benches, handshake);
criterion_main!(benches);
