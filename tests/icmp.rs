//! ICMP echo packets for tests (IPv4 and IPv6), built with the dataplane's wire views.

use std::net::{Ipv4Addr, Ipv6Addr};
use wgxdp_dataplane::wire::{
    internet_checksum, ip_protocol, pseudo_header_sum, Ipv4Packet, Ipv6Packet, IPV4_HEADER_LEN, IPV6_HEADER_LEN,
};

const ECHO_REQUEST_V4: u8 = 8;
const ECHO_REPLY_V4: u8 = 0;
const ECHO_REQUEST_V6: u8 = 128;
const ECHO_REPLY_V6: u8 = 129;

fn echo_body(kind: u8, id: u16, seq: u16, data: &[u8]) -> Vec<u8> {
    let mut b = vec![kind, 0, 0, 0];
    b.extend_from_slice(&id.to_be_bytes());
    b.extend_from_slice(&seq.to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// An IPv4 ICMP echo request (or reply, with `reply`).
pub fn echo_v4(src: Ipv4Addr, dst: Ipv4Addr, id: u16, seq: u16, data: &[u8], reply: bool) -> Vec<u8> {
    let mut body = echo_body(if reply { ECHO_REPLY_V4 } else { ECHO_REQUEST_V4 }, id, seq, data);
    let c = internet_checksum(&body);
    body[2..4].copy_from_slice(&c.to_be_bytes());
    let mut pkt = vec![0u8; IPV4_HEADER_LEN + body.len()];
    Ipv4Packet::emit(&mut pkt[..], src, dst, ip_protocol::ICMP, 64, body.len()).expect("fits");
    pkt[IPV4_HEADER_LEN..].copy_from_slice(&body);
    pkt
}

/// An IPv6 ICMPv6 echo request (or reply).
pub fn echo_v6(src: Ipv6Addr, dst: Ipv6Addr, id: u16, seq: u16, data: &[u8], reply: bool) -> Vec<u8> {
    let mut body = echo_body(if reply { ECHO_REPLY_V6 } else { ECHO_REQUEST_V6 }, id, seq, data);
    let mut acc = pseudo_header_sum(&src.octets(), &dst.octets(), ip_protocol::ICMPV6, body.len() as u32);
    let c = acc.add(&body).finish();
    body[2..4].copy_from_slice(&c.to_be_bytes());
    let mut pkt = vec![0u8; IPV6_HEADER_LEN + body.len()];
    Ipv6Packet::emit(&mut pkt[..], src, dst, ip_protocol::ICMPV6, 64, body.len()).expect("fits");
    pkt[IPV6_HEADER_LEN..].copy_from_slice(&body);
    pkt
}

/// A parsed echo: (is_request, id, seq, data, src, dst) for either family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Echo {
    pub request: bool,
    pub id: u16,
    pub seq: u16,
    pub data: Vec<u8>,
    pub src: std::net::IpAddr,
    pub dst: std::net::IpAddr,
}

/// Parses an ICMP/ICMPv6 echo request or reply, verifying its checksum.
pub fn parse_echo(packet: &[u8]) -> Option<Echo> {
    let (src, dst, body, v6) = match packet.first()? >> 4 {
        4 => {
            let p = Ipv4Packet::new_checked(packet).ok()?;
            if p.protocol() != ip_protocol::ICMP || internet_checksum(p.payload()) != 0 {
                return None;
            }
            (p.source().into(), p.destination().into(), p.payload().to_vec(), false)
        }
        6 => {
            let p = Ipv6Packet::new_checked(packet).ok()?;
            if p.next_header() != ip_protocol::ICMPV6 {
                return None;
            }
            let mut acc = pseudo_header_sum(
                &p.source().octets(),
                &p.destination().octets(),
                ip_protocol::ICMPV6,
                p.payload().len() as u32,
            );
            if acc.add(p.payload()).finish() != 0 {
                return None;
            }
            (p.source().into(), p.destination().into(), p.payload().to_vec(), true)
        }
        _ => return None,
    };
    if body.len() < 8 {
        return None;
    }
    let request = match (body[0], v6) {
        (ECHO_REQUEST_V4, false) | (ECHO_REQUEST_V6, true) => true,
        (ECHO_REPLY_V4, false) | (ECHO_REPLY_V6, true) => false,
        _ => return None,
    };
    Some(Echo {
        request,
        id: u16::from_be_bytes([body[4], body[5]]),
        seq: u16::from_be_bytes([body[6], body[7]]),
        data: body[8..].to_vec(),
        src,
        dst,
    })
}

/// The reply to an echo request, addressed back to its sender.
pub fn reply_to(req: &Echo) -> Vec<u8> {
    match (req.dst, req.src) {
        (std::net::IpAddr::V4(s), std::net::IpAddr::V4(d)) => echo_v4(s, d, req.id, req.seq, &req.data, true),
        (std::net::IpAddr::V6(s), std::net::IpAddr::V6(d)) => echo_v6(s, d, req.id, req.seq, &req.data, true),
        _ => unreachable!("an echo has one address family"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_round_trip_both_families() {
        let p = echo_v4(Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2), 7, 9, b"abc", false);
        let e = parse_echo(&p).unwrap();
        assert!(e.request && e.id == 7 && e.seq == 9 && e.data == b"abc");
        let r = parse_echo(&reply_to(&e)).unwrap();
        assert!(!r.request && r.dst == e.src);
        let p6 = echo_v6("fd00::1".parse().unwrap(), "fd00::2".parse().unwrap(), 1, 2, b"x", false);
        let e6 = parse_echo(&p6).unwrap();
        assert!(e6.request);
        let mut bad = p6.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(parse_echo(&bad).is_none());
    }
}
