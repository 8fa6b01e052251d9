//! Property-based fuzzing of everything that parses untrusted bytes: the
//! device's receive path for all four WireGuard messages (with inputs shaped to
//! get past the cheap checks: real receiver indices, valid MAC1, exact sizes),
//! the send path for arbitrary "inner packets", and the wire views.
//! The property: no panic, and every rejection is counted.
//!
//! Bounded by case count so CI time is predictable; raise it with
//! PROPTEST_CASES=100000 for a longer run.

use proptest::prelude::*;
use std::net::SocketAddr;
use std::time::{Instant, SystemTime};
use wgxdp_dataplane::device::Device;
use wgxdp_dataplane::noise::cookie::{CookieJar, MacKeys};
use wgxdp_dataplane::noise::AeadBackend;
use wgxdp_dataplane::testing::{connected_pair, CLIENT_ADDR};
use wgxdp_dataplane::wire::{EthernetFrame, Ipv4Packet, Ipv6Packet, Message, UdpDatagram};

/// The gateway side of a connected pair: transport messages carrying the live
/// receiver index reach the AEAD and replay code.
struct Fixture {
    dev: Device,
    live_index: u32,
    our_mac_keys: MacKeys,
}

fn fixture() -> Fixture {
    let pair = connected_pair(AeadBackend::Ring);
    Fixture {
        our_mac_keys: MacKeys::new(&pair.gateway.public_key()),
        live_index: pair.gateway_index,
        dev: pair.gateway,
    }
}

thread_local! {
    /// Building a fixture costs a handshake: one per test thread, reused by every
    /// case (each case sees the state earlier ones left, which widens coverage).
    static FIXTURE: std::cell::RefCell<Option<Fixture>> = const { std::cell::RefCell::new(None) };
}

fn with_fixture<R>(f: impl FnOnce(&mut Fixture) -> R) -> R {
    FIXTURE.with(|cell| f(cell.borrow_mut().get_or_insert_with(fixture)))
}

fn message_strategy() -> impl Strategy<Value = (u8, Vec<u8>, bool, bool)> {
    (
        prop_oneof![Just(1u8), Just(2), Just(3), Just(4), any::<u8>()],
        prop_oneof![Just(148usize), Just(92), Just(64), Just(32), 16usize..200, 0usize..16, 1400usize..1600]
            .prop_flat_map(|len| proptest::collection::vec(any::<u8>(), len)),
        any::<bool>(), // use a live receiver index
        any::<bool>(), // stamp a valid MAC1
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn receive_never_panics_and_counts_every_drop((kind, mut bytes, live, mac) in message_strategy(), under_load in any::<bool>()) {
        with_fixture(|f| {
        if bytes.len() >= 4 {
            bytes[0] = kind;
            bytes[1..4].fill(0);
        }
        if live && bytes.len() >= 8 && kind != 1 {
            let idx = f.live_index;
            let at = if kind == 2 { 8 } else { 4 };
            if bytes.len() >= at + 4 {
                bytes[at..at + 4].copy_from_slice(&idx.to_le_bytes());
            }
        }
        if mac && (bytes.len() == 148 || bytes.len() == 92) {
            CookieJar::default().stamp(&f.our_mac_keys, &mut bytes, Instant::now());
        }
        let before = f.dev.drops.total();
        let mut out = vec![0u8; 2048];
        let src: SocketAddr = CLIENT_ADDR.parse().unwrap();
        let result = f.dev.receive(src, &mut bytes, under_load, Instant::now(), SystemTime::now(), &mut out);
        let after = f.dev.drops.total();
        match result {
            Err(_) => prop_assert_eq!(after, before + 1, "a drop must be counted once"),
            Ok(_) => prop_assert_eq!(after, before),
        }
        Ok(())
        })?;
    }

    #[test]
    fn send_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1600), first in prop_oneof![Just(0x45u8), Just(0x60), any::<u8>()]) {
        let mut bytes = bytes;
        if let Some(b) = bytes.first_mut() { *b = first; }
        let mut out = vec![0u8; 2048];
        with_fixture(|f| {
            let before = f.dev.drops.total();
            let r = f.dev.send(&bytes, Instant::now(), SystemTime::now(), &mut out).map(|_| ());
            assert_eq!(f.dev.drops.total(), before + u64::from(r.is_err()));
        });
    }

    #[test]
    fn wire_views_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        if let Ok(f) = EthernetFrame::new_checked(&bytes[..]) {
            let _ = (f.source(), f.destination(), f.ethertype(), f.payload().len());
        }
        if let Ok(p) = Ipv4Packet::new_checked(&bytes[..]) {
            let _ = (p.source(), p.destination(), p.payload().len(), p.verify_checksum(), p.is_fragment());
        }
        if let Ok(p) = Ipv6Packet::new_checked(&bytes[..]) {
            let _ = (p.source(), p.destination(), p.payload().len(), p.next_header());
        }
        if let Ok(u) = UdpDatagram::new_checked(&bytes[..]) {
            let _ = (u.src_port(), u.dst_port(), u.payload().len(), u.verify_checksum("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap()));
        }
        if let Ok(Message::Transport(t)) = Message::parse(&bytes[..]) {
            let _ = (t.receiver(), t.counter(), t.encrypted().len());
        }
    }
}
