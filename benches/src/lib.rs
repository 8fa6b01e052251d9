//! Fixtures shared by the benches: two devices with an established session,
//! and inner packets of a given size.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Instant, SystemTime};
use wgxdp_dataplane::device::{Action, Device, PeerId};
use wgxdp_dataplane::noise::peer::PeerConfig;
use wgxdp_dataplane::noise::{AeadBackend, PresharedKey, PrivateKey};
use wgxdp_dataplane::wire::{ip_protocol, Ipv4Packet, IPV4_HEADER_LEN};

/// Inner packet sizes the issue asks for.
pub const SIZES: [usize; 3] = [64, 512, 1420];

pub const GATEWAY_ADDR: &str = "192.0.2.1:51820";
pub const CLIENT_ADDR: &str = "192.0.2.2:51820";

/// An IPv4/UDP packet of exactly `len` bytes from `src` to `dst`.
pub fn inner_packet(len: usize, src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    let mut buf = vec![0xabu8; len];
    Ipv4Packet::emit(
        &mut buf[..],
        Ipv4Addr::from(src),
        Ipv4Addr::from(dst),
        ip_protocol::UDP,
        64,
        len - IPV4_HEADER_LEN,
    )
    .expect("len >= 20");
    buf
}

/// The gateway and one client, with a confirmed session in both directions.
#[derive(Debug)]
pub struct Session {
    pub gateway: Device,
    pub client: Device,
    pub gateway_peer: PeerId,
    pub client_peer: PeerId,
}

pub fn session(backend: AeadBackend) -> Session {
    let now = Instant::now();
    let (kg, kc) = (PrivateKey::generate(), PrivateKey::generate());
    let (pg, pc) = (kg.public_key(), kc.public_key());
    let psk = PresharedKey::generate();
    let mut gateway = Device::new(kg, backend, 12, now);
    let mut client = Device::new(kc, backend, 12, now);
    let cfg = |k| PeerConfig {
        public_key: k,
        preshared_key: psk.clone(),
        persistent_keepalive: None,
    };
    let gateway_peer = gateway
        .add_peer(cfg(pc), None, &["10.0.2.0/24".parse().unwrap()])
        .unwrap();
    let client_peer = client
        .add_peer(
            cfg(pg),
            Some(GATEWAY_ADDR.parse().unwrap()),
            &["0.0.0.0/0".parse().unwrap()],
        )
        .unwrap();
    let (g, c): (SocketAddr, SocketAddr) =
        (GATEWAY_ADDR.parse().unwrap(), CLIENT_ADDR.parse().unwrap());
    let mut out = vec![0u8; 2048];
    let mut out2 = vec![0u8; 2048];
    client.initiate(client_peer);
    let t = client
        .poll_transmit(now, SystemTime::now(), &mut out)
        .expect("initiation");
    let mut msg = out[..t.len].to_vec();
    let Ok(Action::Send { bytes, .. }) =
        gateway.receive(c, &mut msg, false, now, SystemTime::now(), &mut out2)
    else {
        panic!("no response")
    };
    let mut resp = bytes.to_vec();
    client
        .receive(g, &mut resp, false, now, SystemTime::now(), &mut out)
        .expect("response accepted");
    let t = client
        .poll_transmit(now, SystemTime::now(), &mut out)
        .expect("confirming keepalive");
    let mut ka = out[..t.len].to_vec();
    gateway
        .receive(c, &mut ka, false, now, SystemTime::now(), &mut out2)
        .expect("keepalive accepted");
    Session {
        gateway,
        client,
        gateway_peer,
        client_peer,
    }
}
