//! `device_receive`: `Device::receive` on the gateway side of a connected pair
//! (session established by a real handshake), with arbitrary datagrams, an
//! arbitrary `under_load` flag and arbitrary clock steps; `Device::send` of
//! arbitrary inner packets; `tick`. The client `Device` of the pair makes
//! genuine messages (data, keepalives, handshake initiations on rekey) and
//! consumes the gateway's answers (responses, cookie replies, data), so the
//! handshake, cookie-reply and transport consumers on both sides are reached.
//!
//! Property (as in `dataplane/tests/fuzz_receive.rs`): no panic, and every
//! rejection the gateway returns is counted exactly once.

use crate::{clock_step, ipv4_with_payload, records};
use std::net::SocketAddr;
use std::time::{Instant, SystemTime};
use wgxdp_dataplane::device::Action;
use wgxdp_dataplane::noise::cookie::{CookieJar, MacKeys};
use wgxdp_dataplane::noise::AeadBackend;
use wgxdp_dataplane::testing::{handshaken_pair, ConnectedPair, CLIENT_ADDR, CLIENT_TUNNEL, GATEWAY_ADDR, LAN_HOST};
use wgxdp_dataplane::wire::{HANDSHAKE_INITIATION_LEN, HANDSHAKE_RESPONSE_LEN};

/// Operations (`record.op % OPS`).
pub mod op {
    /// `bytes` as a datagram to the gateway (flags: `flag::*`).
    pub const DATAGRAM: u8 = 0;
    /// The gateway sends `bytes` as an inner packet (to the client if routed there).
    pub const SEND: u8 = 1;
    /// The clock moves on by `clock_step(bytes)`; both sides tick and exchange.
    pub const CLOCK: u8 = 2;
    /// The client sends a packet carrying `bytes` (or `bytes` itself with
    /// `flag::RAW`) through the tunnel; `flag::MUTATE` flips one bit of the datagram.
    pub const CLIENT_DATA: u8 = 3;
    /// Both sides send what they have queued (handshakes, keepalives, staged data).
    pub const EXCHANGE: u8 = 4;
    /// The client's confirming keepalive from the handshake, (re)delivered.
    pub const KEEPALIVE: u8 = 5;
    pub const OPS: u8 = 6;
}

/// Flags of a record.
pub mod flag {
    /// Sent from the client's address (else from a stranger's).
    pub const FROM_CLIENT: u8 = 1;
    /// Patch the live receiver index into the message (types 2, 3, 4).
    pub const LIVE_INDEX: u8 = 2;
    /// Stamp a valid MAC1 (for the gateway's key) on a 148- or 92-byte message.
    pub const STAMP_MAC1: u8 = 4;
    /// The gateway is under load for what it receives in this step.
    pub const UNDER_LOAD: u8 = 8;
    /// Stranger's address is IPv6.
    pub const V6: u8 = 16;
    /// CLIENT_DATA: `bytes` is the inner packet itself.
    pub const RAW: u8 = 32;
    /// CLIENT_DATA: flip one bit of the datagram (position from the bytes).
    pub const MUTATE: u8 = 64;
}

struct Net {
    pair: ConnectedPair,
    keepalive: Vec<u8>,
    gateway_macs: MacKeys,
    now: Instant,
    wall: SystemTime,
    out: Vec<u8>,
    reply: Vec<u8>,
}

fn gateway_addr() -> SocketAddr {
    GATEWAY_ADDR.parse().expect("addr")
}
fn client_addr() -> SocketAddr {
    CLIENT_ADDR.parse().expect("addr")
}

impl Net {
    /// The gateway receives `datagram` from `src`; what it answers to the
    /// client's address, the client receives.
    fn deliver_to_gateway(&mut self, src: SocketAddr, datagram: &mut [u8], under_load: bool) {
        let gw = &mut self.pair.gateway;
        let before = gw.drops.total();
        let r = gw.receive(src, datagram, under_load, self.now, self.wall, &mut self.out);
        let counted = gw.drops.total() - before;
        let answer = match r {
            Err(d) => {
                assert_eq!(counted, 1, "the drop {d:?} must be counted once");
                None
            }
            Ok(a) => {
                assert_eq!(counted, 0, "an accepted datagram is not a drop");
                match a {
                    Action::Send { to, bytes } if to == client_addr() => Some(bytes.to_vec()),
                    _ => None,
                }
            }
        };
        if let Some(mut a) = answer {
            self.deliver_to_client(&mut a);
        }
    }

    fn deliver_to_client(&mut self, datagram: &mut [u8]) {
        let _ = self.pair.client.receive(gateway_addr(), datagram, false, self.now, self.wall, &mut self.reply);
    }

    /// Everything both sides want to send, delivered, until quiet (bounded).
    fn exchange(&mut self, under_load: bool) {
        for _ in 0..4 {
            let mut quiet = true;
            while let Some(t) = self.pair.client.poll_transmit(self.now, self.wall, &mut self.reply) {
                quiet = false;
                let mut d = self.reply[..t.len].to_vec();
                self.deliver_to_gateway(client_addr(), &mut d, under_load);
            }
            while let Some(t) = self.pair.gateway.poll_transmit(self.now, self.wall, &mut self.out) {
                quiet = false;
                let mut d = self.out[..t.len].to_vec();
                if t.to == client_addr() {
                    self.deliver_to_client(&mut d);
                }
            }
            if quiet {
                return;
            }
        }
    }
}

/// Writes the live receiver index where message type `bytes[0]` carries it.
fn patch_index(bytes: &mut [u8], index: u32) {
    let at = match bytes.first() {
        Some(2) => 8,
        Some(3 | 4) => 4,
        _ => return,
    };
    if let Some(field) = bytes.get_mut(at..at + 4) {
        field.copy_from_slice(&index.to_le_bytes());
    }
}

pub fn device_receive(data: &[u8]) {
    run(data);
}

/// Runs `data` and returns both devices (for tests that check how deep seeds reach).
pub fn run(data: &[u8]) -> ConnectedPair {
    let (pair, keepalive) = handshaken_pair(AeadBackend::Ring);
    let gateway_macs = MacKeys::new(&pair.gateway.public_key());
    let mut net = Net {
        pair,
        keepalive,
        gateway_macs,
        now: Instant::now(),
        wall: SystemTime::now(),
        out: vec![0u8; 2048],
        reply: vec![0u8; 2048],
    };
    let mut k = net.keepalive.clone();
    net.deliver_to_gateway(client_addr(), &mut k, false);

    for r in records(data) {
        let under_load = r.flags & flag::UNDER_LOAD != 0;
        match r.op % op::OPS {
            op::DATAGRAM => {
                let mut d = r.bytes.to_vec();
                if r.flags & flag::LIVE_INDEX != 0 {
                    patch_index(&mut d, net.pair.gateway_index);
                }
                if r.flags & flag::STAMP_MAC1 != 0
                    && matches!(d.len(), HANDSHAKE_INITIATION_LEN | HANDSHAKE_RESPONSE_LEN)
                {
                    CookieJar::default().stamp(&net.gateway_macs, &mut d, net.now);
                }
                let src = match (r.flags & flag::FROM_CLIENT != 0, r.flags & flag::V6 != 0) {
                    (true, _) => client_addr(),
                    (false, false) => "198.51.100.7:40000".parse().expect("addr"),
                    (false, true) => "[2001:db8::7]:40000".parse().expect("addr"),
                };
                net.deliver_to_gateway(src, &mut d, under_load);
            }
            op::SEND => {
                let gw = &mut net.pair.gateway;
                let before = gw.drops.total();
                let r = gw.send(r.bytes, net.now, net.wall, &mut net.out);
                let counted = gw.drops.total() - before;
                let answer = match r {
                    Err(_) => {
                        assert!(counted >= 1, "a refused send is counted");
                        None
                    }
                    Ok(Action::Send { to, bytes }) if to == client_addr() => Some(bytes.to_vec()),
                    Ok(_) => None,
                };
                if let Some(mut a) = answer {
                    net.deliver_to_client(&mut a);
                }
            }
            op::CLOCK => {
                let step = clock_step(r.bytes);
                net.now += step;
                net.wall += step;
                net.pair.gateway.tick_at(net.now, net.wall);
                net.pair.client.tick_at(net.now, net.wall);
                net.exchange(under_load);
            }
            op::CLIENT_DATA => {
                let inner = if r.flags & flag::RAW != 0 {
                    r.bytes.to_vec()
                } else {
                    ipv4_with_payload(CLIENT_TUNNEL, LAN_HOST, r.bytes)
                };
                let sent = match net.pair.client.send(&inner, net.now, net.wall, &mut net.reply) {
                    Ok(Action::Send { bytes, .. }) => Some(bytes.to_vec()),
                    _ => None,
                };
                if let Some(mut d) = sent {
                    if r.flags & flag::MUTATE != 0 && !d.is_empty() {
                        let at = r.bytes.first().map_or(0, |&b| usize::from(b)) % d.len();
                        d[at] ^= 1 << (r.flags & 7);
                    }
                    net.deliver_to_gateway(client_addr(), &mut d, under_load);
                }
                net.exchange(under_load);
            }
            op::EXCHANGE => net.exchange(under_load),
            _ => {
                let mut k = net.keepalive.clone();
                net.deliver_to_gateway(client_addr(), &mut k, under_load);
            }
        }
    }
    net.pair
}
