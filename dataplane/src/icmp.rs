//! ICMP errors the gateway sends as a router: IPv4 "fragmentation needed"
//! (type 3 code 4, RFC 1191) and ICMPv6 "packet too big" (type 2, RFC 4443)
//! for inner packets larger than the tunnel MTU, so senders lower their path
//! MTU instead of losing packets silently; and "time exceeded" (IPv4 type 11,
//! ICMPv6 type 3) for packets whose TTL / hop limit runs out here.

use crate::frame::write_ethernet_header;
use crate::wire::{
    internet_checksum, ip_protocol, pseudo_header_sum, Ipv4Packet, Ipv6Packet, MacAddr, WireError, ETHERNET_HEADER_LEN,
    IPV4_HEADER_LEN, IPV6_HEADER_LEN,
};
use std::net::IpAddr;

/// An ICMPv4 error quotes at most this much in all (RFC 1812: a 576-byte datagram).
const V4_MAX_DATAGRAM: usize = 576;
/// An ICMPv6 error must fit the minimum IPv6 MTU.
const V6_MAX_DATAGRAM: usize = 1280;
const ICMP_HEADER_LEN: usize = 8;

/// How many bytes of the offending packet an error quotes, at most.
pub const fn quote_limit(v6: bool) -> usize {
    if v6 {
        V6_MAX_DATAGRAM - IPV6_HEADER_LEN - ICMP_HEADER_LEN
    } else {
        V4_MAX_DATAGRAM - IPV4_HEADER_LEN - ICMP_HEADER_LEN
    }
}

/// Whether a router may answer `packet` (a whole IP packet it cannot forward)
/// with the ICMP error `kind` at all. RFC 1812 section 4.3.2.7 (IPv4): never
/// about an ICMP error, a non-initial fragment, or a packet whose source does
/// not name one host (unspecified, loopback, multicast, broadcast, class E),
/// nor about a packet sent to a multicast or broadcast address. RFC 4443
/// section 2.4(e) (IPv6): never about an ICMPv6 error (also behind extension
/// headers) or from a source that is not unicast, and about a packet sent to
/// a multicast address only "packet too big".
pub fn may_send_error(packet: &[u8], kind: IcmpError) -> bool {
    match packet.first().map(|b| b >> 4) {
        Some(4) => {
            let Ok(ip) = Ipv4Packet::new_checked(packet) else { return false };
            let (src, dst) = (ip.source(), ip.destination());
            let one_host = !(src.is_unspecified()
                || src.is_loopback()
                || src.is_multicast()
                || src.is_broadcast()
                || src.octets()[0] >= 240);
            let to_group = dst.is_multicast() || dst.is_broadcast();
            let icmp_error =
                ip.protocol() == ip_protocol::ICMP && matches!(ip.payload().first(), Some(3 | 4 | 5 | 11 | 12));
            one_host && !to_group && ip.fragment_offset() == 0 && !icmp_error
        }
        Some(6) => {
            let Ok(ip) = Ipv6Packet::new_checked(packet) else { return false };
            let src = ip.source();
            let unicast = !(src.is_unspecified() || src.is_loopback() || src.is_multicast());
            let to_group = ip.destination().is_multicast() && !matches!(kind, IcmpError::TooBig { .. });
            let icmp_error = match crate::flow::transport_header(packet) {
                Some((protocol, header)) => protocol == ip_protocol::ICMPV6 && header.first().is_some_and(|&t| t < 128),
                // A later fragment, or a header chain we cannot follow: it may hide one.
                None => true,
            };
            unicast && !to_group && !icmp_error
        }
        _ => false,
    }
}

/// Which ICMP error the gateway sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IcmpError {
    /// IPv4 "fragmentation needed" / ICMPv6 "packet too big", with the MTU.
    TooBig { mtu: u16 },
    /// "Time exceeded in transit" (TTL / hop limit exhausted).
    TimeExceeded,
}

/// The IP packet length `error_packet` writes for a quote of `quote_len` bytes.
pub const fn error_packet_len(quote_len: usize, v6: bool) -> usize {
    (if v6 { IPV6_HEADER_LEN } else { IPV4_HEADER_LEN }) + ICMP_HEADER_LEN + quote_len
}

/// The Ethernet frame length `error_frame` writes for a quote of `quote_len` bytes.
pub const fn error_frame_len(quote_len: usize, v6: bool) -> usize {
    ETHERNET_HEADER_LEN + error_packet_len(quote_len, v6)
}

/// Writes an IP packet (exactly `error_packet_len` bytes) into `packet`: the
/// ICMP error `kind` from `router` (our address) to `to` (the offending
/// packet's source), quoting `quote` (the start of the offending packet, at
/// most `quote_limit`).
pub fn error_packet(
    packet: &mut [u8],
    kind: IcmpError,
    quote: &[u8],
    to: IpAddr,
    router: IpAddr,
) -> Result<(), WireError> {
    let v6 = to.is_ipv6();
    if quote.len() > quote_limit(v6) || packet.len() != error_packet_len(quote.len(), v6) {
        return Err(WireError::BadLength);
    }
    let body_len = ICMP_HEADER_LEN + quote.len();
    // Type, code and the 4 bytes after the checksum, per family (RFC 792/1191, RFC 4443).
    let header = |v6: bool| -> [u8; ICMP_HEADER_LEN] {
        match (kind, v6) {
            (IcmpError::TooBig { mtu }, false) => {
                let m = mtu.to_be_bytes();
                [3, 4, 0, 0, 0, 0, m[0], m[1]]
            }
            (IcmpError::TooBig { mtu }, true) => {
                let m = u32::from(mtu).to_be_bytes();
                [2, 0, 0, 0, m[0], m[1], m[2], m[3]]
            }
            (IcmpError::TimeExceeded, false) => [11, 0, 0, 0, 0, 0, 0, 0],
            (IcmpError::TimeExceeded, true) => [3, 0, 0, 0, 0, 0, 0, 0],
        }
    };
    match (router, to) {
        (IpAddr::V4(router), IpAddr::V4(to)) => {
            Ipv4Packet::emit(&mut *packet, router, to, ip_protocol::ICMP, 64, body_len)?;
            let icmp = &mut packet[IPV4_HEADER_LEN..IPV4_HEADER_LEN + body_len];
            icmp[..ICMP_HEADER_LEN].copy_from_slice(&header(false));
            icmp[ICMP_HEADER_LEN..].copy_from_slice(quote);
            let c = internet_checksum(icmp);
            icmp[2..4].copy_from_slice(&c.to_be_bytes());
        }
        (IpAddr::V6(router), IpAddr::V6(to)) => {
            Ipv6Packet::emit(&mut *packet, router, to, ip_protocol::ICMPV6, 64, body_len)?;
            let icmp = &mut packet[IPV6_HEADER_LEN..IPV6_HEADER_LEN + body_len];
            icmp[..ICMP_HEADER_LEN].copy_from_slice(&header(true));
            icmp[ICMP_HEADER_LEN..].copy_from_slice(quote);
            let mut acc = pseudo_header_sum(&router.octets(), &to.octets(), ip_protocol::ICMPV6, body_len as u32);
            let c = acc.add(icmp).finish();
            icmp[2..4].copy_from_slice(&c.to_be_bytes());
        }
        _ => return Err(WireError::BadVersion),
    }
    Ok(())
}

/// As `error_packet`, framed for the LAN: a whole Ethernet frame (exactly
/// `error_frame_len` bytes) from `src_mac` to `dst_mac`.
#[allow(clippy::too_many_arguments)]
pub fn error_frame(
    frame: &mut [u8],
    kind: IcmpError,
    quote: &[u8],
    to: IpAddr,
    router: IpAddr,
    dst_mac: MacAddr,
    src_mac: MacAddr,
) -> Result<(), WireError> {
    let packet = frame.get_mut(ETHERNET_HEADER_LEN..).ok_or(WireError::BadLength)?;
    error_packet(packet, kind, quote, to, router)?;
    write_ethernet_header(frame, dst_mac, src_mac, to.is_ipv6())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::parse_ip_frame;
    use std::net::{Ipv4Addr, Ipv6Addr};

    #[test]
    fn fragmentation_needed_v4() {
        let mut original = vec![0u8; 1500];
        Ipv4Packet::emit(&mut original[..], Ipv4Addr::new(10, 50, 0, 2), Ipv4Addr::new(10, 200, 0, 2), 6, 64, 1480)
            .unwrap();
        let quote = &original[..quote_limit(false)];
        let mut frame = vec![0u8; error_frame_len(quote.len(), false)];
        assert_eq!(frame.len(), 14 + 576);
        let to = IpAddr::V4(Ipv4Addr::new(10, 50, 0, 2));
        error_frame(
            &mut frame,
            IcmpError::TooBig { mtu: 1420 },
            quote,
            to,
            "10.50.0.1".parse().unwrap(),
            MacAddr([1; 6]),
            MacAddr([2; 6]),
        )
        .unwrap();
        let f = parse_ip_frame(&frame).unwrap();
        assert_eq!(f.dst, IpAddr::V4(Ipv4Addr::new(10, 50, 0, 2)));
        let ip = Ipv4Packet::new_checked(&frame[14..]).unwrap();
        assert!(ip.verify_checksum());
        let icmp = ip.payload();
        assert_eq!((icmp[0], icmp[1]), (3, 4));
        assert_eq!(u16::from_be_bytes([icmp[6], icmp[7]]), 1420);
        assert_eq!(internet_checksum(icmp), 0);
        assert_eq!(&icmp[8..28], &original[..20], "quotes the original header");
    }

    #[test]
    fn packet_too_big_v6() {
        let src: Ipv6Addr = "fd50::2".parse().unwrap();
        let mut original = vec![0u8; 1500];
        Ipv6Packet::emit(&mut original[..], src, "fd20::2".parse().unwrap(), 17, 64, 1460).unwrap();
        let quote = &original[..quote_limit(true)];
        let mut frame = vec![0u8; error_frame_len(quote.len(), true)];
        assert_eq!(frame.len(), 14 + 1280);
        let router: Ipv6Addr = "fd50::1".parse().unwrap();
        error_frame(
            &mut frame,
            IcmpError::TooBig { mtu: 1420 },
            quote,
            src.into(),
            router.into(),
            MacAddr([1; 6]),
            MacAddr([2; 6]),
        )
        .unwrap();
        let ip = Ipv6Packet::new_checked(&frame[14..]).unwrap();
        assert_eq!((ip.source(), ip.destination()), (router, src));
        let icmp = ip.payload();
        assert_eq!(icmp[0], 2);
        assert_eq!(u32::from_be_bytes([icmp[4], icmp[5], icmp[6], icmp[7]]), 1420);
        let mut acc = pseudo_header_sum(&router.octets(), &src.octets(), ip_protocol::ICMPV6, icmp.len() as u32);
        assert_eq!(acc.add(icmp).finish(), 0, "checksum verifies");
    }

    #[test]
    fn errors_only_about_packets_rfc_1812_and_4443_allow() {
        const TE: IcmpError = IcmpError::TimeExceeded;
        const BIG: IcmpError = IcmpError::TooBig { mtu: 1280 };
        let v4 = |src: &str, dst: &str, proto: u8, first: u8, frag: u16| {
            let mut p = vec![0u8; 60];
            Ipv4Packet::emit(&mut p[..], src.parse().unwrap(), dst.parse().unwrap(), proto, 64, 40).unwrap();
            p[6..8].copy_from_slice(&frag.to_be_bytes());
            p[20] = first;
            p
        };
        assert!(may_send_error(&v4("10.0.0.2", "10.1.0.2", 6, 0, 0x4000), TE), "plain TCP with DF");
        assert!(may_send_error(&v4("10.0.0.2", "10.1.0.2", 1, 8, 0), TE), "an echo request is not an error");
        assert!(!may_send_error(&v4("10.0.0.2", "10.1.0.2", 1, 3, 0), TE), "about an ICMP error");
        assert!(!may_send_error(&v4("10.0.0.2", "10.1.0.2", 1, 11, 0), TE), "about time exceeded");
        assert!(!may_send_error(&v4("10.0.0.2", "10.1.0.2", 17, 0, 0x2001), TE), "non-initial fragment");
        assert!(may_send_error(&v4("10.0.0.2", "10.1.0.2", 17, 0, 0x2000), TE), "the first fragment may");
        for src in ["0.0.0.0", "127.0.0.1", "224.0.0.5", "255.255.255.255", "240.0.0.1"] {
            assert!(!may_send_error(&v4(src, "10.1.0.2", 17, 0, 0), TE), "source {src}");
        }
        for dst in ["224.0.0.5", "255.255.255.255"] {
            assert!(!may_send_error(&v4("10.0.0.2", dst, 17, 0, 0), TE), "destination {dst}");
        }
        let v6 = |src: &str, dst: &str, next: u8, first: u8| {
            let mut p = vec![0u8; 80];
            Ipv6Packet::emit(&mut p[..], src.parse().unwrap(), dst.parse().unwrap(), next, 64, 40).unwrap();
            p[40] = first;
            p
        };
        assert!(may_send_error(&v6("fd00::2", "fd01::2", 17, 0), TE));
        assert!(may_send_error(&v6("fd00::2", "ff02::1", 17, 0), BIG), "packet too big may answer multicast");
        assert!(!may_send_error(&v6("fd00::2", "ff02::16", 17, 0), TE), "time exceeded may not (MLD, hop limit 1)");
        // An ICMPv6 error behind a destination-options header is still one.
        let mut behind = v6("fd00::2", "fd01::2", 60, 58);
        behind[41] = 0;
        behind[48] = 1;
        assert!(!may_send_error(&behind, TE), "an ICMPv6 error behind an extension header");
        assert!(may_send_error(&v6("fd00::2", "fd01::2", 58, 128), TE), "echo request");
        assert!(!may_send_error(&v6("fd00::2", "fd01::2", 58, 1), TE), "about an ICMPv6 error");
        for src in ["::", "::1", "ff02::1"] {
            assert!(!may_send_error(&v6(src, "fd01::2", 17, 0), TE), "source {src}");
        }
        assert!(!may_send_error(&[0x45, 0, 0], TE), "truncated");
        assert!(!may_send_error(&[], BIG));
    }

    #[test]
    fn refuses_mismatched_families_and_sizes() {
        let mut original = vec![0u8; 100];
        Ipv4Packet::emit(&mut original[..], Ipv4Addr::LOCALHOST, Ipv4Addr::LOCALHOST, 6, 64, 80).unwrap();
        let mut frame = vec![0u8; error_frame_len(original.len(), false)];
        let (v4, v6): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "::1".parse().unwrap());
        let m = MacAddr([0; 6]);
        assert!(
            error_frame(&mut frame, IcmpError::TooBig { mtu: 1420 }, &original, v4, v6, m, m).is_err(),
            "family mismatch"
        );
        assert!(
            error_frame(&mut frame[1..], IcmpError::TooBig { mtu: 1420 }, &original, v4, v4, m, m).is_err(),
            "wrong frame size"
        );
        let long = vec![0u8; quote_limit(false) + 1];
        let mut frame = vec![0u8; error_frame_len(long.len(), false)];
        assert!(
            error_frame(&mut frame, IcmpError::TooBig { mtu: 1420 }, &long, v4, v4, m, m).is_err(),
            "quote too long"
        );
    }

    #[test]
    fn time_exceeded_as_a_bare_packet_for_the_tunnel() {
        let mut original = vec![0u8; 100];
        Ipv4Packet::emit(&mut original[..], Ipv4Addr::new(10, 200, 0, 2), Ipv4Addr::new(10, 50, 0, 2), 17, 1, 80)
            .unwrap();
        let mut packet = vec![0u8; error_packet_len(original.len(), false)];
        let to = IpAddr::V4(Ipv4Addr::new(10, 200, 0, 2));
        error_packet(&mut packet, IcmpError::TimeExceeded, &original, to, "10.50.0.1".parse().unwrap()).unwrap();
        let ip = Ipv4Packet::new_checked(&packet[..]).unwrap();
        assert!(ip.verify_checksum());
        assert_eq!((ip.destination(), ip.protocol()), (Ipv4Addr::new(10, 200, 0, 2), ip_protocol::ICMP));
        assert_eq!(&ip.payload()[..2], &[11, 0], "time exceeded in transit");
        assert_eq!(internet_checksum(ip.payload()), 0);
        assert_eq!(&ip.payload()[8..], &original[..]);
        let mut v6 = vec![0u8; 60];
        Ipv6Packet::emit(&mut v6[..], "fd20::2".parse().unwrap(), "fd50::2".parse().unwrap(), 17, 1, 20).unwrap();
        let mut packet = vec![0u8; error_packet_len(v6.len(), true)];
        let to: IpAddr = "fd20::2".parse().unwrap();
        error_packet(&mut packet, IcmpError::TimeExceeded, &v6, to, "fd50::1".parse().unwrap()).unwrap();
        let ip = Ipv6Packet::new_checked(&packet[..]).unwrap();
        assert_eq!(&ip.payload()[..2], &[3, 0]);
    }
}
