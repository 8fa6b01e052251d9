//! Typed views over packet bytes (after smoltcp's `wire`).
//!
//! Every view is `Packet<T: AsRef<[u8]>>` built with `new_checked`, which verifies
//! that every fixed field and every length the header claims lies inside the buffer.
//! After that, accessors cannot panic. Field offsets live in each file's `mod field`
//! and nowhere else.

mod checksum;
mod ethernet;
mod ipv4;
mod ipv6;
mod udp;
mod wireguard;

pub use checksum::{internet_checksum, pseudo_header_sum, ChecksumAccumulator};
pub use ethernet::{EtherType, EthernetFrame, MacAddr, ETHERNET_HEADER_LEN};
pub use ipv4::{Ipv4Packet, IPV4_HEADER_LEN};
pub use ipv6::{Ipv6Packet, IPV6_HEADER_LEN};
pub use udp::{UdpDatagram, UDP_HEADER_LEN};
pub use wireguard::{
    CookieReply, HandshakeInitiation, HandshakeResponse, MacCovered, Message, MessageType, TransportHeader,
    COOKIE_REPLY_LEN, HANDSHAKE_INITIATION_LEN, HANDSHAKE_RESPONSE_LEN, TRANSPORT_HEADER_LEN,
};

/// IP protocol numbers used by the gateway.
pub mod ip_protocol {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMPV6: u8 = 58;
}

/// Why a buffer is not a valid packet of the requested kind. Small and `Copy`:
/// it is returned on the per-packet path and counted, never formatted there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("buffer shorter than the header")]
    Truncated,
    #[error("a length field points outside the buffer")]
    BadLength,
    #[error("wrong IP version")]
    BadVersion,
    #[error("unknown message type")]
    UnknownType,
    #[error("message has the wrong size for its type")]
    BadSize,
}

type Field = core::ops::Range<usize>;

fn read_u16_be(b: &[u8], f: Field) -> u16 {
    u16::from_be_bytes([b[f.start], b[f.start + 1]])
}

fn write_u16_be(b: &mut [u8], f: Field, v: u16) {
    b[f].copy_from_slice(&v.to_be_bytes());
}

fn read_u32_le(b: &[u8], f: Field) -> u32 {
    u32::from_le_bytes([b[f.start], b[f.start + 1], b[f.start + 2], b[f.start + 3]])
}

fn write_u32_le(b: &mut [u8], f: Field, v: u32) {
    b[f].copy_from_slice(&v.to_le_bytes());
}

/// The bytes of `f` as a fixed-size array. `f.len()` must be `N` (a compile-time
/// pairing in the callers: every use passes a `field::` constant of that length).
fn array<const N: usize>(b: &[u8], f: Field) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&b[f]);
    out
}
