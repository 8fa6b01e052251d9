//! What the forwarding policy and the connection table need to know of an
//! inner packet: addresses, the transport protocol past any IPv6 extension
//! headers, ports or ICMP echo identifier, the flow an ICMP error is about,
//! and fragmentation. One parse, on the typed wire views, for both directions.
//!
//! Fragments: only the first fragment carries the transport header. A first
//! fragment too short to hold the ports, and an IPv4 TCP fragment at offset 8
//! (which could rewrite the TCP flags, RFC 1858), are refused: a filter could
//! not judge them.

use crate::drops::DropReason;
use crate::wire::{ip_protocol, Ipv4Packet, Ipv6Packet};
use std::net::IpAddr;

/// Transport protocols whose first four bytes are source and destination port.
const UDPLITE: u8 = 136;
const SCTP: u8 = 132;
const DCCP: u8 = 33;
/// IPv6 extension headers walked over (RFC 8200 section 4; AH, RFC 4302).
const HOP_BY_HOP: u8 = 0;
const ROUTING: u8 = 43;
const FRAGMENT: u8 = 44;
const AUTHENTICATION: u8 = 51;
const DESTINATION_OPTIONS: u8 = 60;
/// At most this many extension headers are walked; a longer chain is refused.
const MAX_EXTENSION_HEADERS: usize = 8;

/// The transport part of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// TCP, UDP, UDP-Lite, SCTP, DCCP.
    Ports { src: u16, dst: u16 },
    /// ICMP / ICMPv6 echo request or reply.
    Echo { id: u16, request: bool },
    /// An ICMP error about a packet (quoted) that went the other way.
    IcmpError(Quoted),
    /// Any other protocol or ICMP message.
    Other,
    /// A fragment past the first: no transport header.
    LaterFragment,
}

/// The packet an ICMP error quotes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quoted {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: u8,
    /// Ports, or (echo identifier, 0), or (0, 0).
    pub ids: (u16, u16),
}

/// One parsed inner packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// The transport protocol (after IPv6 extension headers).
    pub protocol: u8,
    pub transport: Transport,
    /// The fragment identification, for any fragment (first or later).
    pub fragment: Option<u32>,
    /// TCP flags (`tcp_flags::*`), 0 when not TCP or not in this packet.
    pub tcp_flags: u8,
    /// The TTL / hop limit it arrived with.
    pub hop_limit: u8,
}

/// TCP header flags (RFC 9293).
pub mod tcp_flags {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;
}

/// The TCP flags of a transport header, when it holds them (byte 13).
fn tcp_flags_of(protocol: u8, transport_header: &[u8]) -> u8 {
    match protocol {
        ip_protocol::TCP => transport_header.get(13).copied().unwrap_or(0),
        _ => 0,
    }
}

impl Flow {
    pub fn is_icmp(&self) -> bool {
        self.protocol == if self.src.is_ipv6() { ip_protocol::ICMPV6 } else { ip_protocol::ICMP }
    }

    /// The first fragment of a fragmented packet.
    pub fn is_first_fragment(&self) -> bool {
        self.fragment.is_some() && self.transport != Transport::LaterFragment
    }

    /// Parses a whole IP packet (IPv4 or IPv6).
    pub fn parse(packet: &[u8]) -> Result<Self, DropReason> {
        match packet.first().map(|b| b >> 4) {
            Some(4) => {
                let ip = Ipv4Packet::new_checked(packet).map_err(|_| DropReason::BadInnerPacket)?;
                let (src, dst) = (IpAddr::V4(ip.source()), IpAddr::V4(ip.destination()));
                let protocol = ip.protocol();
                let fragment = ip.is_fragment().then_some(u32::from(ip.ident()));
                let (transport, tcp_flags) = match ip.fragment_offset() {
                    0 => (
                        transport(protocol, ip.payload(), false, fragment.is_some())?,
                        tcp_flags_of(protocol, ip.payload()),
                    ),
                    8 if protocol == ip_protocol::TCP => return Err(DropReason::BadFragment),
                    _ => (Transport::LaterFragment, 0),
                };
                Ok(Self { src, dst, protocol, transport, fragment, tcp_flags, hop_limit: ip.ttl() })
            }
            Some(6) => {
                let ip = Ipv6Packet::new_checked(packet).map_err(|_| DropReason::BadInnerPacket)?;
                let (src, dst) = (IpAddr::V6(ip.source()), IpAddr::V6(ip.destination()));
                let chain = walk_extension_headers(ip.next_header(), ip.payload())?;
                let transport = match chain.fragment {
                    Some((offset, _)) if offset > 0 => Transport::LaterFragment,
                    fragment => transport(chain.protocol, chain.rest, true, fragment.is_some())?,
                };
                let tcp_flags = tcp_flags_of(chain.protocol, chain.rest);
                let fragment = chain.fragment.map(|(_, id)| id);
                let hop_limit = ip.hop_limit();
                Ok(Self { src, dst, protocol: chain.protocol, transport, fragment, tcp_flags, hop_limit })
            }
            _ => Err(DropReason::BadInnerPacket),
        }
    }
}

/// A whole IP packet's transport protocol and header (past IPv6 extension
/// headers); `None` for a later fragment or a packet that does not parse.
pub fn transport_header(packet: &[u8]) -> Option<(u8, &[u8])> {
    match packet.first().map(|b| b >> 4) {
        Some(4) => {
            let ip = Ipv4Packet::new_checked(packet).ok()?;
            let header = packet.get(ip.header_len()..ip.total_len())?;
            (ip.fragment_offset() == 0).then_some((ip.protocol(), header))
        }
        Some(6) => {
            let ip = Ipv6Packet::new_checked(packet).ok()?;
            let start = crate::wire::IPV6_HEADER_LEN;
            let payload = packet.get(start..ip.total_len())?;
            let chain = walk_extension_headers(ip.next_header(), payload).ok()?;
            if chain.fragment.is_some_and(|(offset, _)| offset > 0) {
                return None;
            }
            Some((chain.protocol, chain.rest))
        }
        _ => None,
    }
}

/// An IP packet's TTL / hop limit (`None`: not an IP packet).
pub fn hop_limit(packet: &[u8]) -> Option<u8> {
    match packet.first().map(|b| b >> 4) {
        Some(4) => Ipv4Packet::new_checked(packet).ok().map(|ip| ip.ttl()),
        Some(6) => Ipv6Packet::new_checked(packet).ok().map(|ip| ip.hop_limit()),
        _ => None,
    }
}

/// Takes one hop off an IP packet's TTL / hop limit; `false` when it may not
/// be forwarded (the TTL was 0 or 1, or the packet is not IP).
pub fn decrement_hop(packet: &mut [u8]) -> bool {
    match packet.first().map(|b| b >> 4) {
        Some(4) => Ipv4Packet::new_checked(packet).is_ok_and(|mut ip| ip.decrement_ttl()),
        Some(6) => Ipv6Packet::new_checked(packet).is_ok_and(|mut ip| ip.decrement_hop_limit()),
        _ => false,
    }
}

/// An IPv6 packet's transport protocol and what follows its extension headers.
struct Chain<'a> {
    protocol: u8,
    rest: &'a [u8],
    /// (offset in bytes, identification) when a fragment header was seen.
    fragment: Option<(usize, u32)>,
}

fn walk_extension_headers(mut next: u8, mut rest: &[u8]) -> Result<Chain<'_>, DropReason> {
    let mut fragment = None;
    for _ in 0..MAX_EXTENSION_HEADERS {
        let len = match next {
            // A routing header that still has segments to visit would take the
            // packet past its destination, beyond what the policy judged.
            ROUTING if rest.get(3).is_some_and(|&segments_left| segments_left > 0) => {
                return Err(DropReason::BadInnerPacket)
            }
            HOP_BY_HOP | ROUTING | DESTINATION_OPTIONS => rest.get(1).map(|&l| (usize::from(l) + 1) * 8),
            AUTHENTICATION => rest.get(1).map(|&l| (usize::from(l) + 2) * 4),
            FRAGMENT => {
                let header = rest.get(..8).ok_or(DropReason::BadFragment)?;
                let offset_flags = u16::from_be_bytes([header[2], header[3]]);
                let id = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
                fragment = Some((usize::from(offset_flags >> 3) * 8, id));
                if offset_flags >> 3 != 0 {
                    return Ok(Chain { protocol: header[0], rest: &[], fragment });
                }
                Some(8)
            }
            _ => return Ok(Chain { protocol: next, rest, fragment }),
        };
        let header = len.and_then(|l| rest.get(..l)).ok_or(DropReason::BadInnerPacket)?;
        next = header[0];
        rest = &rest[header.len()..];
    }
    Err(DropReason::BadInnerPacket)
}

/// The transport part of a first (or only) fragment's payload.
fn transport(protocol: u8, payload: &[u8], v6: bool, fragmented: bool) -> Result<Transport, DropReason> {
    let short = if fragmented { DropReason::BadFragment } else { DropReason::BadInnerPacket };
    match protocol {
        ip_protocol::TCP | ip_protocol::UDP | UDPLITE | SCTP | DCCP => {
            let p = payload.get(..4).ok_or(short)?;
            Ok(Transport::Ports { src: u16::from_be_bytes([p[0], p[1]]), dst: u16::from_be_bytes([p[2], p[3]]) })
        }
        ip_protocol::ICMP if !v6 => icmp(payload, false).ok_or(short),
        ip_protocol::ICMPV6 if v6 => icmp(payload, true).ok_or(short),
        _ => Ok(Transport::Other),
    }
}

/// ICMP echo (v4 types 8/0, v6 128/129) and errors that quote a packet
/// (v4 3, 11, 12; v6 1-4). Needs the 8-byte ICMP header.
fn icmp(payload: &[u8], v6: bool) -> Option<Transport> {
    let header = payload.get(..8)?;
    let id = u16::from_be_bytes([header[4], header[5]]);
    let kind = header[0];
    Some(match (v6, kind) {
        (false, 8) | (true, 128) => Transport::Echo { id, request: true },
        (false, 0) | (true, 129) => Transport::Echo { id, request: false },
        (false, 3 | 11 | 12) | (true, 1..=4) => match quoted(&payload[8..], v6) {
            Some(q) => Transport::IcmpError(q),
            None => Transport::Other,
        },
        _ => Transport::Other,
    })
}

/// The flow of a packet quoted in an ICMP error (cut short, as quotes are).
fn quoted(quote: &[u8], v6: bool) -> Option<Quoted> {
    let quoted = |src, dst, protocol, rest: &[u8]| {
        let ids = match transport(protocol, rest, v6, false).ok()? {
            Transport::Ports { src, dst } => (src, dst),
            Transport::Echo { id, request: true } => (id, 0),
            Transport::Other => (0, 0),
            // An error about an error or an echo reply relates to no flow we track.
            _ => return None,
        };
        Some(Quoted { src, dst, protocol, ids })
    };
    if v6 {
        let ip = Ipv6Packet::new_truncated(quote).ok()?;
        let chain = walk_extension_headers(ip.next_header(), ip.payload()).ok()?;
        if chain.fragment.is_some_and(|(offset, _)| offset > 0) {
            return None;
        }
        quoted(IpAddr::V6(ip.source()), IpAddr::V6(ip.destination()), chain.protocol, chain.rest)
    } else {
        let ip = Ipv4Packet::new_truncated(quote).ok()?;
        if ip.fragment_offset() > 0 {
            return None;
        }
        quoted(IpAddr::V4(ip.source()), IpAddr::V4(ip.destination()), ip.protocol(), ip.payload())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{ipv4_packet, ipv6_packet};
    use proptest::prelude::*;

    const SITE: [u8; 4] = [10, 200, 0, 2];
    const SITE9: [u8; 4] = [10, 200, 0, 9];
    const LAN: [u8; 4] = [10, 50, 0, 2];
    const SITE6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0xfd20, 0, 0, 0, 0, 0, 0, 2);
    const LAN6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0xfd50, 0, 0, 0, 0, 0, 0, 2);

    fn v4(bytes: &mut [u8], protocol: u8, frag: u16) {
        bytes[9] = protocol;
        bytes[6..8].copy_from_slice(&frag.to_be_bytes());
        Ipv4Packet::new_checked(&mut bytes[..]).unwrap().fill_checksum();
    }

    #[test]
    fn ports_echo_and_fragments_of_ipv4() {
        let mut p = ipv4_packet(60, SITE, LAN);
        v4(&mut p, ip_protocol::TCP, 0x4000);
        p[20..24].copy_from_slice(&[0x30, 0x39, 0x00, 0x16]);
        let f = Flow::parse(&p).unwrap();
        assert_eq!(f.transport, Transport::Ports { src: 12345, dst: 22 });
        assert_eq!((f.protocol, f.fragment), (6, None));
        // First fragment (MF): ports, and the identification.
        v4(&mut p, ip_protocol::TCP, 0x2000);
        let f = Flow::parse(&p).unwrap();
        assert!(f.is_first_fragment());
        assert_eq!(f.transport, Transport::Ports { src: 12345, dst: 22 });
        // Later fragment: no transport; TCP at offset 8 refused (RFC 1858).
        v4(&mut p, ip_protocol::TCP, 2);
        assert_eq!(Flow::parse(&p).unwrap().transport, Transport::LaterFragment);
        v4(&mut p, ip_protocol::TCP, 1);
        assert_eq!(Flow::parse(&p), Err(DropReason::BadFragment));
        // A first fragment too short for the ports is refused.
        let mut tiny = ipv4_packet(22, SITE, LAN);
        v4(&mut tiny, ip_protocol::UDP, 0x2000);
        assert_eq!(Flow::parse(&tiny), Err(DropReason::BadFragment));
        // ICMP echo request with its identifier.
        v4(&mut p, ip_protocol::ICMP, 0);
        p[20..28].copy_from_slice(&[8, 0, 0, 0, 0x12, 0x34, 0, 1]);
        assert_eq!(Flow::parse(&p).unwrap().transport, Transport::Echo { id: 0x1234, request: true });
    }

    #[test]
    fn icmp_errors_name_the_quoted_flow() {
        // A port unreachable from 10.200.0.9 about 10.50.0.2:40000 -> 10.200.0.9:53 (UDP).
        let mut quote = ipv4_packet(28, LAN, SITE9);
        v4(&mut quote, ip_protocol::UDP, 0x4000);
        quote[20..24].copy_from_slice(&[0x9c, 0x40, 0x00, 0x35]);
        let mut err = ipv4_packet(20 + 8 + 28, SITE9, LAN);
        v4(&mut err, ip_protocol::ICMP, 0);
        err[20..28].copy_from_slice(&[3, 3, 0, 0, 0, 0, 0, 0]);
        err[28..].copy_from_slice(&quote);
        let f = Flow::parse(&err).unwrap();
        let Transport::IcmpError(q) = f.transport else { panic!("{f:?}") };
        assert_eq!((q.src, q.dst, q.protocol, q.ids), (IpAddr::from(LAN), IpAddr::from(SITE9), 17, (40000, 53)));
        // A quote cut after 8 bytes of UDP still names it.
        let cut = &err[..20 + 8 + 28];
        assert!(matches!(Flow::parse(cut).unwrap().transport, Transport::IcmpError(_)));
    }

    #[test]
    fn ipv6_extension_headers_and_fragments() {
        // fixed header → hop-by-hop (8 bytes) → fragment (first, M) → UDP.
        let mut p = ipv6_packet(8 + 8 + 8, SITE6, LAN6);
        p[6] = HOP_BY_HOP;
        p[40..48].copy_from_slice(&[FRAGMENT, 0, 0, 0, 0, 0, 0, 0]);
        p[48..56].copy_from_slice(&[ip_protocol::UDP, 0, 0x00, 0x01, 0, 0, 0, 7]);
        p[56..60].copy_from_slice(&[0x00, 0x35, 0x1f, 0x90]);
        let f = Flow::parse(&p).unwrap();
        assert_eq!((f.protocol, f.fragment), (ip_protocol::UDP, Some(7)));
        assert_eq!(f.transport, Transport::Ports { src: 53, dst: 8080 });
        // The same at offset 8: a later fragment.
        p[50..52].copy_from_slice(&(8u16 << 3).to_be_bytes());
        assert_eq!(Flow::parse(&p).unwrap().transport, Transport::LaterFragment);
        // A routing header with segments left would carry it past what the
        // policy judged: refused; with none left it is walked over.
        let mut r = ipv6_packet(8 + 8, SITE6, LAN6);
        r[6] = ROUTING;
        r[40..48].copy_from_slice(&[ip_protocol::UDP, 0, 0, 1, 0, 0, 0, 0]);
        r[48..52].copy_from_slice(&[0x00, 0x35, 0x00, 0x35]);
        assert_eq!(Flow::parse(&r), Err(DropReason::BadInnerPacket));
        r[43] = 0;
        assert_eq!(Flow::parse(&r).unwrap().transport, Transport::Ports { src: 53, dst: 53 });
        // A header chain that runs off the end is refused.
        let mut q = ipv6_packet(4, SITE6, LAN6);
        q[6] = ROUTING;
        q[40..44].copy_from_slice(&[ip_protocol::UDP, 9, 0, 0]);
        assert_eq!(Flow::parse(&q), Err(DropReason::BadInnerPacket));
    }

    #[test]
    fn hop_limits_are_decremented_and_stop_at_one() {
        let mut p = ipv4_packet(40, SITE, LAN);
        p[8] = 2;
        Ipv4Packet::new_checked(&mut p[..]).unwrap().fill_checksum();
        assert!(decrement_hop(&mut p));
        let ip = Ipv4Packet::new_checked(&p[..]).unwrap();
        assert_eq!(ip.ttl(), 1);
        assert!(ip.verify_checksum());
        assert!(!decrement_hop(&mut p), "TTL 1: may not be forwarded");
        assert_eq!(p[8], 1, "unchanged");
        let mut q = ipv6_packet(8, SITE6, LAN6);
        q[7] = 64;
        assert!(decrement_hop(&mut q));
        assert_eq!(q[7], 63);
    }

    proptest! {
        /// Any bytes parse to a flow or a counted reason, never a panic; and a
        /// forwarded header still verifies.
        #[test]
        fn any_bytes_parse_or_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..200), ttl in 0u8..=255) {
            let _ = Flow::parse(&bytes);
            let mut p = ipv4_packet(40, SITE, LAN);
            p[8] = ttl;
            Ipv4Packet::new_checked(&mut p[..]).unwrap().fill_checksum();
            let forwarded = decrement_hop(&mut p);
            prop_assert_eq!(forwarded, ttl > 1);
            prop_assert!(Ipv4Packet::new_checked(&p[..]).unwrap().verify_checksum());
        }
    }
}
