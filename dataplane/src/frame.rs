//! Whole Ethernet frames as the workers see them: parsing a received UDP frame
//! (WAN) or IP frame (LAN), and writing the outer headers of frames we send.

use crate::peer_view::L2Path;
use crate::wire::{
    ip_protocol, EtherType, EthernetFrame, Ipv4Packet, Ipv6Packet, MacAddr, UdpDatagram, WireError,
    ETHERNET_HEADER_LEN, IPV4_HEADER_LEN, IPV6_HEADER_LEN, UDP_HEADER_LEN,
};
use core::ops::Range;
use std::net::{IpAddr, SocketAddr};

/// A received UDP datagram in an Ethernet frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UdpFrame {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub src_mac: MacAddr,
    pub dst_mac: MacAddr,
    /// Where the UDP payload lies in the frame.
    pub payload: Range<usize>,
}

impl UdpFrame {
    /// The path replies to this frame's sender take.
    pub fn reply_path(&self) -> L2Path {
        L2Path { local_mac: self.dst_mac, remote_mac: self.src_mac, local: self.dst }
    }
}

/// Parses Ethernet / IPv4 or IPv6 / UDP. IPv4 fragments and IPv6 extension
/// headers are refused (the XDP program never steers them here).
pub fn parse_udp_frame(frame: &[u8]) -> Result<UdpFrame, WireError> {
    let eth = EthernetFrame::new_checked(frame)?;
    let (src_ip, dst_ip, l4_offset, l4_len): (IpAddr, IpAddr, usize, usize) = match eth.ethertype() {
        EtherType::Ipv4 => {
            let ip = Ipv4Packet::new_checked(eth.payload())?;
            if ip.protocol() != ip_protocol::UDP || ip.is_fragment() {
                return Err(WireError::UnknownType);
            }
            (ip.source().into(), ip.destination().into(), ETHERNET_HEADER_LEN + ip.header_len(), ip.payload().len())
        }
        EtherType::Ipv6 => {
            let ip = Ipv6Packet::new_checked(eth.payload())?;
            if ip.next_header() != ip_protocol::UDP {
                return Err(WireError::UnknownType);
            }
            (ip.source().into(), ip.destination().into(), ETHERNET_HEADER_LEN + IPV6_HEADER_LEN, ip.payload().len())
        }
        _ => return Err(WireError::UnknownType),
    };
    let udp = UdpDatagram::new_checked(&frame[l4_offset..l4_offset + l4_len])?;
    let start = l4_offset + UDP_HEADER_LEN;
    Ok(UdpFrame {
        src: SocketAddr::new(src_ip, udp.src_port()),
        dst: SocketAddr::new(dst_ip, udp.dst_port()),
        src_mac: eth.source(),
        dst_mac: eth.destination(),
        payload: start..start + udp.payload().len(),
    })
}

/// A received IP packet in an Ethernet frame (LAN side).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpFrame {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// The IP packet (Ethernet padding excluded).
    pub packet: Range<usize>,
}

pub fn parse_ip_frame(frame: &[u8]) -> Result<IpFrame, WireError> {
    let eth = EthernetFrame::new_checked(frame)?;
    let (src, dst, len): (IpAddr, IpAddr, usize) = match eth.ethertype() {
        EtherType::Ipv4 => {
            let ip = Ipv4Packet::new_checked(eth.payload())?;
            (ip.source().into(), ip.destination().into(), ip.total_len())
        }
        EtherType::Ipv6 => {
            let ip = Ipv6Packet::new_checked(eth.payload())?;
            (ip.source().into(), ip.destination().into(), ip.total_len())
        }
        _ => return Err(WireError::UnknownType),
    };
    Ok(IpFrame { src, dst, packet: ETHERNET_HEADER_LEN..ETHERNET_HEADER_LEN + len })
}

/// An inner IP packet (decrypted from the tunnel): addresses and its length
/// by its own header (padding excluded).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InnerPacket {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub len: usize,
}

pub fn parse_ip_frame_payload(packet: &[u8]) -> Result<InnerPacket, WireError> {
    match packet.first().map(|b| b >> 4) {
        Some(4) => {
            let ip = Ipv4Packet::new_checked(packet)?;
            Ok(InnerPacket { src: ip.source().into(), dst: ip.destination().into(), len: ip.total_len() })
        }
        Some(6) => {
            let ip = Ipv6Packet::new_checked(packet)?;
            Ok(InnerPacket { src: ip.source().into(), dst: ip.destination().into(), len: ip.total_len() })
        }
        Some(_) => Err(WireError::BadVersion),
        None => Err(WireError::Truncated),
    }
}

/// Bytes of Ethernet + IP + UDP header before a datagram to `dst`.
pub const fn udp_headers_len(dst_is_v6: bool) -> usize {
    ETHERNET_HEADER_LEN + if dst_is_v6 { IPV6_HEADER_LEN } else { IPV4_HEADER_LEN } + UDP_HEADER_LEN
}

/// Writes Ethernet, IP and UDP headers for a `payload_len`-byte datagram from
/// `path.local` to `dst` at the start of `frame` (which must be exactly
/// `udp_headers_len + payload_len` long). The payload must already be in place
/// when `with_checksum` is set (IPv6 requires it; IPv4 may carry zero).
pub fn write_udp_headers(
    frame: &mut [u8],
    path: &L2Path,
    dst: SocketAddr,
    with_checksum: bool,
) -> Result<(), WireError> {
    let v6 = dst.is_ipv6();
    let hdr = udp_headers_len(v6);
    let payload_len = frame.len().checked_sub(hdr).ok_or(WireError::Truncated)?;
    let mut eth = EthernetFrame::new_checked(&mut *frame)?;
    eth.set_destination(path.remote_mac);
    eth.set_source(path.local_mac);
    let l3 = &mut frame[ETHERNET_HEADER_LEN..];
    let udp_len = UDP_HEADER_LEN + payload_len;
    let ip_len = match (path.local.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            Ipv4Packet::emit(&mut *l3, s, d, ip_protocol::UDP, 64, udp_len)?;
            IPV4_HEADER_LEN
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            Ipv6Packet::emit(&mut *l3, s, d, ip_protocol::UDP, 64, udp_len)?;
            IPV6_HEADER_LEN
        }
        _ => return Err(WireError::BadVersion),
    };
    let mut eth = EthernetFrame::new_checked(&mut *frame)?;
    eth.set_ethertype(if v6 { EtherType::Ipv6 } else { EtherType::Ipv4 });
    let udp_start = ETHERNET_HEADER_LEN + ip_len;
    let mut udp = UdpDatagram::emit(&mut frame[udp_start..], path.local.port(), dst.port(), payload_len)?;
    if with_checksum || v6 {
        udp.fill_checksum(path.local.ip(), dst.ip());
    }
    Ok(())
}

/// Writes an Ethernet header for an IP packet that is already in place at
/// `frame[14..]`.
pub fn write_ethernet_header(frame: &mut [u8], dst: MacAddr, src: MacAddr, v6: bool) -> Result<(), WireError> {
    let mut eth = EthernetFrame::new_checked(frame)?;
    eth.set_destination(dst);
    eth.set_source(src);
    eth.set_ethertype(if v6 { EtherType::Ipv6 } else { EtherType::Ipv4 });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(local: &str) -> L2Path {
        L2Path {
            local_mac: MacAddr([2, 0, 0, 0, 0, 1]),
            remote_mac: MacAddr([2, 0, 0, 0, 0, 2]),
            local: local.parse().unwrap(),
        }
    }

    #[test]
    fn udp_frame_round_trip_v4_and_v6() {
        for (local, dst) in [("10.0.0.1:51820", "10.0.0.2:40000"), ("[fd00::1]:51820", "[fd00::2]:40000")] {
            let dst: SocketAddr = dst.parse().unwrap();
            let p = path(local);
            let hdr = udp_headers_len(dst.is_ipv6());
            let mut frame = vec![0u8; hdr + 5];
            frame[hdr..].copy_from_slice(b"hello");
            write_udp_headers(&mut frame, &p, dst, true).unwrap();
            let parsed = parse_udp_frame(&frame).unwrap();
            assert_eq!(parsed.src, p.local);
            assert_eq!(parsed.dst, dst);
            assert_eq!(parsed.src_mac, p.local_mac);
            assert_eq!(&frame[parsed.payload.clone()], b"hello");
            // The receiver's reply path mirrors ours.
            let back = parsed.reply_path();
            assert_eq!((back.local, back.remote_mac), (dst, p.local_mac));
            let ip_start = ETHERNET_HEADER_LEN;
            let udp_start = hdr - UDP_HEADER_LEN;
            let udp = UdpDatagram::new_checked(&frame[udp_start..]).unwrap();
            assert!(udp.verify_checksum(p.local.ip(), dst.ip()));
            if !dst.is_ipv6() {
                assert!(Ipv4Packet::new_checked(&frame[ip_start..]).unwrap().verify_checksum());
            }
        }
    }

    #[test]
    fn rejects_what_is_not_a_plain_udp_frame() {
        let p = path("10.0.0.1:1");
        let mut frame = vec![0u8; udp_headers_len(false) + 4];
        write_udp_headers(&mut frame, &p, "10.0.0.2:2".parse().unwrap(), false).unwrap();
        let mut frag = frame.clone();
        frag[ETHERNET_HEADER_LEN + 6] = 0x20; // More Fragments
        assert!(parse_udp_frame(&frag).is_err());
        let mut tcp = frame.clone();
        tcp[ETHERNET_HEADER_LEN + 9] = 6;
        assert!(parse_udp_frame(&tcp).is_err());
        assert!(parse_udp_frame(&frame[..20]).is_err());
        assert!(write_udp_headers(&mut [0u8; 10], &p, "10.0.0.2:2".parse().unwrap(), false).is_err());
        assert!(write_udp_headers(&mut frame, &p, "[::1]:2".parse().unwrap(), false).is_err(), "family mismatch");
    }

    #[test]
    fn ip_frame_excludes_ethernet_padding() {
        let mut frame = vec![0u8; 64];
        Ipv4Packet::emit(&mut frame[14..], "10.1.0.1".parse().unwrap(), "10.2.0.1".parse().unwrap(), 17, 64, 8)
            .unwrap();
        write_ethernet_header(&mut frame, MacAddr([1; 6]), MacAddr([2; 6]), false).unwrap();
        let f = parse_ip_frame(&frame).unwrap();
        assert_eq!(f.packet, 14..42);
        assert_eq!(f.dst, "10.2.0.1".parse::<IpAddr>().unwrap());
        frame[12] = 0x08;
        frame[13] = 0x06; // ARP
        assert!(parse_ip_frame(&frame).is_err());
    }
}
