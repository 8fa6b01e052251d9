//! Fixtures for tests, fuzzing and benches (feature `testing`): a gateway and a
//! client `Device` with a confirmed session, and inner packets of a given size.

use crate::device::{Action, Device, PeerId};
use crate::noise::peer::PeerConfig;
use crate::noise::{AeadBackend, PresharedKey, PrivateKey};
use crate::wire::{ip_protocol, Ipv4Packet, IPV4_HEADER_LEN};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Instant, SystemTime};

pub const GATEWAY_ADDR: &str = "192.0.2.1:51820";
pub const CLIENT_ADDR: &str = "192.0.2.2:51820";

/// The gateway routes 10.0.2.0/24 to the client; the client routes everything
/// to the gateway.
#[derive(Debug)]
pub struct ConnectedPair {
    pub gateway: Device,
    pub client: Device,
    pub gateway_peer: PeerId,
    pub client_peer: PeerId,
    /// The gateway's receiver index for the session (what the client sends to).
    pub gateway_index: u32,
}

/// Builds both devices and runs a full handshake plus the confirming keepalive.
pub fn connected_pair(backend: AeadBackend) -> ConnectedPair {
    let now = Instant::now();
    let wall = SystemTime::now();
    let (kg, kc) = (PrivateKey::generate(), PrivateKey::generate());
    let (pg, pc) = (kg.public_key(), kc.public_key());
    let psk = PresharedKey::generate();
    let mut gateway = Device::new(kg, backend, 12, now);
    let mut client = Device::new(kc, backend, 12, now);
    let cfg = |k| PeerConfig { public_key: k, preshared_key: psk.clone(), persistent_keepalive: None };
    let gateway_peer = gateway.add_peer(cfg(pc), None, &["10.0.2.0/24".parse().expect("prefix")]).expect("peer");
    let client_peer = client
        .add_peer(cfg(pg), Some(GATEWAY_ADDR.parse().expect("addr")), &["0.0.0.0/0".parse().expect("prefix")])
        .expect("peer");
    let (g, c): (SocketAddr, SocketAddr) = (GATEWAY_ADDR.parse().expect("addr"), CLIENT_ADDR.parse().expect("addr"));
    let (mut out, mut out2) = (vec![0u8; 2048], vec![0u8; 2048]);
    client.initiate(client_peer);
    let t = client.poll_transmit(now, wall, &mut out).expect("initiation");
    let mut init = out[..t.len].to_vec();
    let Ok(Action::Send { bytes, .. }) = gateway.receive(c, &mut init, false, now, wall, &mut out2) else {
        panic!("the gateway did not answer the initiation")
    };
    let mut resp = bytes.to_vec();
    client.receive(g, &mut resp, false, now, wall, &mut out).expect("response accepted");
    let t = client.poll_transmit(now, wall, &mut out).expect("confirming keepalive");
    let gateway_index = u32::from_le_bytes(out[4..8].try_into().expect("4 bytes"));
    let mut keepalive = out[..t.len].to_vec();
    gateway.receive(c, &mut keepalive, false, now, wall, &mut out2).expect("keepalive accepted");
    ConnectedPair { gateway, client, gateway_peer, client_peer, gateway_index }
}

/// An IPv4/UDP packet of exactly `len` (≥ 20) bytes.
pub fn ipv4_packet(len: usize, src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    let mut buf = vec![0xabu8; len.max(IPV4_HEADER_LEN)];
    let payload = buf.len() - IPV4_HEADER_LEN;
    Ipv4Packet::emit(&mut buf[..], Ipv4Addr::from(src), Ipv4Addr::from(dst), ip_protocol::UDP, 64, payload)
        .expect("fits");
    buf
}

/// The bytes `dev.send(packet)` produced, panicking if it did not send.
pub fn sent_bytes(dev: &mut Device, packet: &[u8], now: Instant) -> Vec<u8> {
    let mut out = vec![0u8; 65536];
    match dev.send(packet, now, SystemTime::now(), &mut out) {
        Ok(Action::Send { bytes, .. }) => bytes.to_vec(),
        other => panic!("expected a datagram to send, got {other:?}"),
    }
}
