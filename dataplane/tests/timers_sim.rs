//! Two devices on a simulated clock and a lossless (or cut) link: rekey cycles
//! with traffic both ways, idle gaps longer than REJECT_AFTER_TIME, the first
//! packet after them delivered once a new handshake completes (staged, not
//! dropped), and giving up after REKEY_ATTEMPT_TIME with keys zeroed.

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant, SystemTime};
use wgxdp_dataplane::device::{Action, Device, PeerId};
use wgxdp_dataplane::drops::DropReason;
use wgxdp_dataplane::noise::constants::{REJECT_AFTER_TIME, REKEY_AFTER_TIME, REKEY_ATTEMPT_TIME, ZERO_KEYS_AFTER};
use wgxdp_dataplane::noise::peer::PeerConfig;
use wgxdp_dataplane::noise::{AeadBackend, PresharedKey, PrivateKey};
use wgxdp_dataplane::wire::Ipv4Packet;

const A_ADDR: &str = "192.0.2.1:51820";
const B_ADDR: &str = "192.0.2.2:51820";
const TICK: Duration = Duration::from_millis(100);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Side {
    A,
    B,
}

struct Sim {
    a: Device,
    b: Device,
    a_peer: PeerId,
    b_peer: PeerId,
    start: Instant,
    now: Instant,
    wall0: SystemTime,
    /// Datagrams in flight: (to, bytes).
    link: VecDeque<(Side, Vec<u8>)>,
    /// While false, everything sent to B is lost.
    b_reachable: bool,
    delivered_a: Vec<Vec<u8>>,
    delivered_b: Vec<Vec<u8>>,
    /// Handshake initiations A sent.
    initiations_from_a: usize,
}

fn packet(src: [u8; 4], dst: [u8; 4], seq: u32) -> Vec<u8> {
    let mut buf = vec![0u8; 40];
    Ipv4Packet::emit(&mut buf[..], Ipv4Addr::from(src), Ipv4Addr::from(dst), 17, 64, 20).unwrap();
    buf[20..24].copy_from_slice(&seq.to_be_bytes());
    buf
}

impl Sim {
    fn new() -> Self {
        Self::with_keepalive(None)
    }

    fn with_keepalive(keepalive: Option<Duration>) -> Self {
        let start = Instant::now();
        let (ka, kb) = (PrivateKey::generate(), PrivateKey::generate());
        let psk = PresharedKey::generate();
        let (pa, pb) = (ka.public_key(), kb.public_key());
        let mut a = Device::new(ka, AeadBackend::Ring, 8, start);
        let mut b = Device::new(kb, AeadBackend::RustCrypto, 8, start);
        let cfg = |k| PeerConfig { public_key: k, preshared_key: psk.clone(), persistent_keepalive: keepalive };
        let a_peer = a.add_peer(cfg(pb), Some(B_ADDR.parse().unwrap()), &["10.0.2.0/24".parse().unwrap()]).unwrap();
        let b_peer = b.add_peer(cfg(pa), Some(A_ADDR.parse().unwrap()), &["10.0.1.0/24".parse().unwrap()]).unwrap();
        Self {
            a,
            b,
            a_peer,
            b_peer,
            start,
            now: start,
            wall0: SystemTime::now(),
            link: VecDeque::new(),
            b_reachable: true,
            delivered_a: Vec::new(),
            delivered_b: Vec::new(),
            initiations_from_a: 0,
        }
    }

    fn wall(&self) -> SystemTime {
        self.wall0 + self.now.duration_since(self.start)
    }

    fn dev(&mut self, side: Side) -> &mut Device {
        match side {
            Side::A => &mut self.a,
            Side::B => &mut self.b,
        }
    }

    fn put(&mut self, to: Side, bytes: Vec<u8>) {
        if to == Side::B && bytes.first() == Some(&1) {
            self.initiations_from_a += 1;
        }
        if to == Side::B && !self.b_reachable {
            return;
        }
        self.link.push_back((to, bytes));
    }

    /// The LAN behind `side` sends an inner packet into the tunnel.
    fn send(&mut self, side: Side, inner: &[u8]) {
        let (now, wall) = (self.now, self.wall());
        let mut out = vec![0u8; 2048];
        let sent = match self.dev(side).send(inner, now, wall, &mut out) {
            Ok(Action::Send { bytes, .. }) => Some(bytes.to_vec()),
            Ok(_) => None,
            Err(e) => panic!("{side:?} could not send: {e}"),
        };
        if let Some(bytes) = sent {
            self.put(other(side), bytes);
        }
        self.pump();
    }

    /// Delivers everything in flight and everything it causes.
    fn pump(&mut self) {
        let (now, wall) = (self.now, self.wall());
        let mut out = vec![0u8; 2048];
        loop {
            for side in [Side::A, Side::B] {
                while let Some(t) = self.dev(side).poll_transmit(now, wall, &mut out) {
                    let bytes = out[..t.len].to_vec();
                    self.put(other(side), bytes);
                }
            }
            let Some((to, mut bytes)) = self.link.pop_front() else { return };
            let from: SocketAddr = match to {
                Side::A => B_ADDR.parse().unwrap(),
                Side::B => A_ADDR.parse().unwrap(),
            };
            let reply = match self.dev(to).receive(from, &mut bytes, false, now, wall, &mut out) {
                Ok(Action::Send { bytes, .. }) => Some(bytes.to_vec()),
                Ok(Action::Deliver { packet, .. }) => {
                    let p = packet.to_vec();
                    match to {
                        Side::A => self.delivered_a.push(p),
                        Side::B => self.delivered_b.push(p),
                    }
                    None
                }
                _ => None,
            };
            if let Some(r) = reply {
                self.put(other(to), r);
            }
        }
    }

    /// Moves the clock forward in ticks, running both devices' timers.
    fn advance(&mut self, d: Duration) {
        let end = self.now + d;
        while self.now < end {
            self.now += TICK;
            let (now, wall) = (self.now, self.wall());
            self.a.tick_at(now, wall);
            self.b.tick_at(now, wall);
            self.pump();
        }
    }

    fn handshakes(&self) -> (u64, u64) {
        (self.a.peer_stats(self.a_peer).unwrap().handshakes, self.b.peer_stats(self.b_peer).unwrap().handshakes)
    }
}

fn other(s: Side) -> Side {
    match s {
        Side::A => Side::B,
        Side::B => Side::A,
    }
}

#[test]
fn five_rekey_cycles_with_traffic_both_ways_lose_nothing() {
    let mut sim = Sim::new();
    let mut seq = 0;
    let until = sim.now + REKEY_AFTER_TIME * 5 + Duration::from_secs(30);
    while sim.now < until {
        seq += 1;
        sim.send(Side::A, &packet([10, 0, 1, 1], [10, 0, 2, 1], seq));
        sim.send(Side::B, &packet([10, 0, 2, 1], [10, 0, 1, 1], seq));
        sim.advance(Duration::from_secs(1));
    }
    assert_eq!(sim.delivered_b.len(), seq as usize, "every packet from A arrived");
    assert_eq!(sim.delivered_a.len(), seq as usize, "every packet from B arrived");
    let (ha, hb) = sim.handshakes();
    assert!(ha >= 6 && hb >= 6, "a handshake per REKEY_AFTER_TIME: {ha} / {hb}");
    assert_eq!(sim.a.drops.total() + sim.b.drops.total(), 0);
}

/// The black hole seen in the field: after an idle gap longer than
/// REJECT_AFTER_TIME the expired keypair was still present, so nothing ever
/// started a handshake and the first packets vanished uncounted.
fn idle_then_first_packet_from(first: Side, idle: Duration) {
    let mut sim = Sim::new();
    sim.send(Side::A, &packet([10, 0, 1, 1], [10, 0, 2, 1], 1));
    sim.advance(Duration::from_secs(1));
    sim.send(Side::B, &packet([10, 0, 2, 1], [10, 0, 1, 1], 1));
    assert_eq!((sim.delivered_a.len(), sim.delivered_b.len()), (1, 1));
    sim.advance(idle);
    let before = sim.handshakes();
    let p = match first {
        Side::A => packet([10, 0, 1, 1], [10, 0, 2, 1], 2),
        Side::B => packet([10, 0, 2, 1], [10, 0, 1, 1], 2),
    };
    sim.send(first, &p);
    sim.advance(Duration::from_millis(500));
    let got = match first {
        Side::A => &sim.delivered_b,
        Side::B => &sim.delivered_a,
    };
    assert_eq!(got.last(), Some(&p), "the first packet after {idle:?} idle was staged and delivered");
    assert!(sim.handshakes().0 > before.0, "a new handshake carried it");
    assert_eq!(sim.a.drops.total() + sim.b.drops.total(), 0, "nothing dropped");
    // And the answer comes straight back on the new session.
    let back = match first {
        Side::A => packet([10, 0, 2, 1], [10, 0, 1, 1], 3),
        Side::B => packet([10, 0, 1, 1], [10, 0, 2, 1], 3),
    };
    sim.send(other(first), &back);
    let got = match first {
        Side::A => &sim.delivered_a,
        Side::B => &sim.delivered_b,
    };
    assert_eq!(got.last(), Some(&back));
}

#[test]
fn after_an_idle_gap_past_reject_after_time_either_side_reconnects() {
    let gap = REJECT_AFTER_TIME + Duration::from_secs(20);
    idle_then_first_packet_from(Side::A, gap);
    idle_then_first_packet_from(Side::B, gap);
}

#[test]
fn after_an_idle_gap_past_key_zeroing_either_side_reconnects() {
    let gap = ZERO_KEYS_AFTER + Duration::from_secs(20);
    idle_then_first_packet_from(Side::A, gap);
    idle_then_first_packet_from(Side::B, gap);
}

#[test]
fn an_unreachable_peer_is_given_up_counted_and_its_keys_zeroed() {
    let mut sim = Sim::new();
    sim.send(Side::A, &packet([10, 0, 1, 1], [10, 0, 2, 1], 1));
    sim.advance(Duration::from_secs(1));
    assert_eq!(sim.delivered_b.len(), 1);
    assert!(!sim.a.indices().is_empty());
    // B vanishes. After the session expires, A's traffic waits for a handshake
    // that never completes.
    sim.b_reachable = false;
    sim.advance(REJECT_AFTER_TIME);
    for seq in 0..5 {
        sim.send(Side::A, &packet([10, 0, 1, 1], [10, 0, 2, 1], 10 + seq));
    }
    assert_eq!(sim.a.staged_packets(sim.a_peer), 5);
    let inits = sim.initiations_from_a;
    sim.advance(REKEY_ATTEMPT_TIME + Duration::from_secs(10));
    let retries = sim.initiations_from_a - inits;
    assert!((17..=19).contains(&retries), "one initiation per REKEY_TIMEOUT (+ jitter), then none: {retries}");
    assert_eq!(sim.a.staged_packets(sim.a_peer), 0, "given up after REKEY_ATTEMPT_TIME");
    assert_eq!(sim.a.drops.get(DropReason::StagingExpired), 5, "what waited is counted");
    let inits = sim.initiations_from_a;
    sim.advance(Duration::from_secs(30));
    assert_eq!(sim.initiations_from_a, inits, "no more attempts without new traffic");
    // Three REJECT_AFTER_TIMEs after the last session was derived, every key
    // and every receiver index is gone.
    sim.advance(ZERO_KEYS_AFTER);
    assert_eq!(sim.a.indices().len(), 0, "no receiver index left behind");
    assert_eq!(sim.a.staging().in_use(), 0, "every staging buffer went back to the pool");
}

#[test]
fn a_psk_rotation_right_after_an_initiation_still_rekeys() {
    let mut sim = Sim::new();
    sim.send(Side::A, &packet([10, 0, 1, 1], [10, 0, 2, 1], 1));
    sim.advance(Duration::from_secs(1));
    assert_eq!(sim.initiations_from_a, 1);
    // A rotates within REKEY_TIMEOUT of its initiation: the rate limit holds
    // the new initiation back, but it must go out once allowed.
    let psk = PresharedKey::generate();
    let update = |psk: &PresharedKey| wgxdp_dataplane::device::PeerUpdate {
        preshared_key: Some(psk.clone()),
        ..Default::default()
    };
    sim.a.update_peer(sim.a_peer, update(&psk));
    sim.pump();
    assert_eq!(sim.initiations_from_a, 1, "rate-limited for now");
    sim.advance(Duration::from_secs(5));
    assert_eq!(sim.initiations_from_a, 2, "the deferred initiation went out once allowed");
    // B rotates too: the next handshake completes and traffic flows on the new key.
    let before = sim.handshakes();
    sim.b.update_peer(sim.b_peer, update(&psk));
    // (B answered A's initiation just now: its own waits out REKEY_TIMEOUT.)
    sim.advance(Duration::from_secs(6));
    assert!(sim.handshakes().0 > before.0);
    sim.send(Side::A, &packet([10, 0, 1, 1], [10, 0, 2, 1], 2));
    assert_eq!(sim.delivered_b.len(), 2, "traffic flows under the new key");
}

/// A persistent keepalive keeps an idle tunnel (and the NAT in front of it)
/// alive for good: keys are refreshed on keepalives, and a keepalive due
/// without a usable session starts a handshake instead of vanishing.
#[test]
fn a_persistent_keepalive_keeps_an_idle_tunnel_alive_across_rekeys() {
    let mut sim = Sim::with_keepalive(Some(Duration::from_secs(25)));
    sim.send(Side::A, &packet([10, 0, 1, 1], [10, 0, 2, 1], 1));
    sim.advance(Duration::from_secs(1));
    sim.advance(REJECT_AFTER_TIME * 3);
    let (ha, hb) = sim.handshakes();
    assert!(ha >= 3 && hb >= 3, "rekeyed while idle: {ha} / {hb}");
    // Still a working session in both directions, at once.
    sim.send(Side::B, &packet([10, 0, 2, 1], [10, 0, 1, 1], 2));
    assert_eq!(sim.delivered_a.len(), 1);
    sim.send(Side::A, &packet([10, 0, 1, 1], [10, 0, 2, 1], 3));
    assert_eq!(sim.delivered_b.len(), 2);
    assert_eq!(sim.a.drops.total() + sim.b.drops.total(), 0);
}
