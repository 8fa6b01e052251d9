//! `wire_views`: every typed view in `dataplane/src/wire/` (`new_checked`, then
//! every accessor, then every mutator on a copy) and the frame parsers the
//! workers run, on arbitrary bytes. The ranges the parsers return are sliced
//! as the worker slices them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use wgxdp_dataplane::frame::{parse_ip_frame, parse_ip_frame_payload, parse_udp_frame};
use wgxdp_dataplane::wire::{
    internet_checksum, pseudo_header_sum, CookieReply, EtherType, EthernetFrame, HandshakeInitiation,
    HandshakeResponse, Ipv4Packet, Ipv6Packet, MacAddr, MacCovered, Message, MessageType, TransportHeader, UdpDatagram,
};

pub fn wire_views(data: &[u8]) {
    let mut copy = data.to_vec();

    if let Ok(f) = EthernetFrame::new_checked(data) {
        let _ = (f.source(), f.destination(), u16::from(f.ethertype()), f.payload().len());
    }
    if let Ok(mut f) = EthernetFrame::new_checked(&mut copy[..]) {
        f.set_destination(MacAddr([1; 6]));
        f.set_source(MacAddr([2; 6]));
        f.set_ethertype(EtherType::Ipv6);
        f.payload_mut().fill(0);
    }

    copy.copy_from_slice(data);
    if let Ok(p) = Ipv4Packet::new_checked(data) {
        let _ = (p.header_len(), p.total_len(), p.dscp_ecn(), p.ident(), p.dont_fragment(), p.is_fragment());
        let _ = (p.ttl(), p.protocol(), p.checksum(), p.source(), p.destination(), p.verify_checksum());
        assert!(p.payload().len() <= p.packet().len() && p.packet().len() <= data.len());
    }
    if let Ok(mut p) = Ipv4Packet::new_checked(&mut copy[..]) {
        p.fill_checksum();
        assert!(p.verify_checksum());
        p.payload_mut().fill(0);
    }

    copy.copy_from_slice(data);
    if let Ok(p) = Ipv6Packet::new_checked(data) {
        let _ = (p.payload_len(), p.total_len(), p.next_header(), p.hop_limit(), p.source(), p.destination());
        assert!(p.payload().len() <= p.packet().len() && p.packet().len() <= data.len());
    }
    if let Ok(mut p) = Ipv6Packet::new_checked(&mut copy[..]) {
        p.payload_mut().fill(0);
    }

    copy.copy_from_slice(data);
    let (v4a, v4b) = (IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)));
    let v6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
    if let Ok(u) = UdpDatagram::new_checked(data) {
        let _ = (u.src_port(), u.dst_port(), u.len(), u.is_empty(), u.checksum(), u.payload().len());
        let _ = (u.verify_checksum(v4a, v4b), u.verify_checksum(v6, v6), u.verify_checksum(v4a, v6));
    }
    if let Ok(mut u) = UdpDatagram::new_checked(&mut copy[..]) {
        u.fill_checksum(v4a, v4b);
        assert!(u.verify_checksum(v4a, v4b));
        u.fill_checksum(v6, v6);
        u.payload_mut().fill(0);
    }

    let _ = internet_checksum(data);
    let half = data.len() / 2;
    let _ = pseudo_header_sum(&data[..half], &data[half..], 17, data.len() as u32).add(data).finish();

    let _ = MessageType::of(data);
    match Message::parse(data) {
        Ok(Message::HandshakeInitiation(m)) => {
            let _ = (m.sender(), m.ephemeral(), m.encrypted_static(), m.encrypted_timestamp(), m.mac1(), m.mac2());
            let _ = (m.before_mac1().len(), m.before_mac2().len(), m.as_bytes().len());
        }
        Ok(Message::HandshakeResponse(m)) => {
            let _ = (m.sender(), m.receiver(), m.ephemeral(), m.encrypted_nothing(), m.mac1(), m.mac2());
            let _ = (m.before_mac1().len(), m.before_mac2().len(), m.as_bytes().len());
        }
        Ok(Message::CookieReply(m)) => {
            let _ = (m.receiver(), m.nonce(), m.encrypted_cookie(), m.as_bytes().len());
        }
        Ok(Message::Transport(t)) => {
            let _ = (t.receiver(), t.counter(), t.encrypted().len(), t.as_bytes().len());
        }
        Err(_) => {}
    }
    copy.copy_from_slice(data);
    if let Ok(mut m) = HandshakeInitiation::new_checked(&mut copy[..]) {
        m.set_sender(1);
        m.ephemeral_mut().fill(0);
        m.encrypted_static_mut().fill(0);
        m.encrypted_timestamp_mut().fill(0);
        m.mac1_mut().fill(0);
        m.mac2_mut().fill(0);
    }
    if let Ok(mut m) = HandshakeResponse::new_checked(&mut copy[..]) {
        m.set_sender(1);
        m.set_receiver(2);
        m.ephemeral_mut().fill(0);
        m.encrypted_nothing_mut().fill(0);
        m.mac1_mut().fill(0);
        m.mac2_mut().fill(0);
    }
    if let Ok(mut m) = CookieReply::new_checked(&mut copy[..]) {
        m.set_receiver(3);
        m.nonce_mut().fill(0);
        m.encrypted_cookie_mut().fill(0);
    }
    if let Ok(mut t) = TransportHeader::new_checked(&mut copy[..]) {
        t.encrypted_mut().fill(0);
    }
    // `new_zeroed` and `emit` on buffers of the input's length.
    copy.copy_from_slice(data);
    let _ = HandshakeInitiation::new_zeroed(&mut copy[..]).is_ok();
    let _ = HandshakeResponse::new_zeroed(&mut copy[..]).is_ok();
    let _ = CookieReply::new_zeroed(&mut copy[..]).is_ok();
    let _ = TransportHeader::emit(&mut copy[..], 1, 2).is_ok();
    let claimed = data.first().map_or(0, |&b| usize::from(b) * 8);
    let _ = Ipv4Packet::emit(&mut copy[..], Ipv4Addr::LOCALHOST, Ipv4Addr::LOCALHOST, 17, 64, claimed).is_ok();
    let _ = Ipv6Packet::emit(&mut copy[..], Ipv6Addr::LOCALHOST, Ipv6Addr::LOCALHOST, 17, 64, claimed).is_ok();
    let _ = UdpDatagram::emit(&mut copy[..], 1, 2, claimed).is_ok();

    // The frame parsers, and their ranges sliced as the worker slices them.
    if let Ok(f) = parse_udp_frame(data) {
        let payload = &data[f.payload.clone()];
        let _ = (f.reply_path(), MessageType::of(payload));
    }
    if let Ok(f) = parse_ip_frame(data) {
        let packet = &data[f.packet.clone()];
        let _ = parse_ip_frame_payload(packet);
    }
    if let Ok(p) = parse_ip_frame_payload(data) {
        let _ = &data[..p.len];
    }
}
