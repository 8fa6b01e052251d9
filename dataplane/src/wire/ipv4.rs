//! IPv4 packets (RFC 791).

use super::{checksum::internet_checksum, read_u16_be, write_u16_be, WireError};
use core::net::Ipv4Addr;

mod field {
    use super::super::Field;
    pub const VER_IHL: usize = 0;
    pub const DSCP_ECN: usize = 1;
    pub const TOTAL_LEN: Field = 2..4;
    pub const IDENT: Field = 4..6;
    pub const FLAGS_FRAG: Field = 6..8;
    pub const TTL: usize = 8;
    pub const PROTOCOL: usize = 9;
    pub const CHECKSUM: Field = 10..12;
    pub const SOURCE: Field = 12..16;
    pub const DESTINATION: Field = 16..20;
}

pub const IPV4_HEADER_LEN: usize = 20;

/// A view of an IPv4 packet. `new_checked` guarantees version 4, a header length
/// of at least 20 bytes, and a total length that fits the buffer; bytes past the
/// total length (Ethernet padding) are not part of the payload.
#[derive(Debug, Clone)]
pub struct Ipv4Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Ipv4Packet<T> {
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        Self::check(buffer, true)
    }

    /// A packet quoted in an ICMP error: the header must be whole, the rest
    /// may be cut short (`payload` is then what is there).
    pub fn new_truncated(buffer: T) -> Result<Self, WireError> {
        Self::check(buffer, false)
    }

    /// Version 4, a header of at least 20 bytes inside the buffer, a total
    /// length that holds the header and (`whole`) fits the buffer.
    fn check(buffer: T, whole: bool) -> Result<Self, WireError> {
        let b = buffer.as_ref();
        if b.len() < IPV4_HEADER_LEN {
            return Err(WireError::Truncated);
        }
        if b[field::VER_IHL] >> 4 != 4 {
            return Err(WireError::BadVersion);
        }
        let header_len = usize::from(b[field::VER_IHL] & 0x0f) * 4;
        let total_len = usize::from(read_u16_be(b, field::TOTAL_LEN));
        let within = if whole { total_len } else { header_len };
        if header_len < IPV4_HEADER_LEN || total_len < header_len || within > b.len() {
            return Err(WireError::BadLength);
        }
        Ok(Self { buffer })
    }

    fn bytes(&self) -> &[u8] {
        self.buffer.as_ref()
    }

    pub fn header_len(&self) -> usize {
        usize::from(self.bytes()[field::VER_IHL] & 0x0f) * 4
    }

    pub fn total_len(&self) -> usize {
        usize::from(read_u16_be(self.bytes(), field::TOTAL_LEN))
    }

    pub fn dscp_ecn(&self) -> u8 {
        self.bytes()[field::DSCP_ECN]
    }

    pub fn ident(&self) -> u16 {
        read_u16_be(self.bytes(), field::IDENT)
    }

    /// True when the Don't Fragment bit is set.
    pub fn dont_fragment(&self) -> bool {
        read_u16_be(self.bytes(), field::FLAGS_FRAG) & 0x4000 != 0
    }

    /// True for any fragment (More Fragments set or a non-zero offset).
    pub fn is_fragment(&self) -> bool {
        read_u16_be(self.bytes(), field::FLAGS_FRAG) & 0x3fff != 0
    }

    /// True when more fragments of the same datagram follow this one.
    pub fn more_fragments(&self) -> bool {
        read_u16_be(self.bytes(), field::FLAGS_FRAG) & 0x2000 != 0
    }

    /// Where this fragment's data starts in the original datagram, in bytes.
    pub fn fragment_offset(&self) -> usize {
        usize::from(read_u16_be(self.bytes(), field::FLAGS_FRAG) & 0x1fff) * 8
    }

    pub fn ttl(&self) -> u8 {
        self.bytes()[field::TTL]
    }

    pub fn protocol(&self) -> u8 {
        self.bytes()[field::PROTOCOL]
    }

    pub fn checksum(&self) -> u16 {
        read_u16_be(self.bytes(), field::CHECKSUM)
    }

    pub fn source(&self) -> Ipv4Addr {
        Ipv4Addr::from(super::array::<4>(self.bytes(), field::SOURCE))
    }

    pub fn destination(&self) -> Ipv4Addr {
        Ipv4Addr::from(super::array::<4>(self.bytes(), field::DESTINATION))
    }

    pub fn verify_checksum(&self) -> bool {
        internet_checksum(&self.bytes()[..self.header_len()]) == 0
    }

    /// The payload up to the total length (options and Ethernet padding
    /// excluded; for a truncated view, as far as the buffer goes).
    pub fn payload(&self) -> &[u8] {
        &self.bytes()[self.header_len()..self.total_len().min(self.bytes().len())]
    }

    /// The packet up to its total length.
    pub fn packet(&self) -> &[u8] {
        &self.bytes()[..self.total_len().min(self.bytes().len())]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Ipv4Packet<T> {
    /// Writes a 20-byte header with no options into `buffer` and returns the view.
    /// `payload_len` bytes after the header belong to the packet.
    pub fn emit(
        mut buffer: T,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        protocol: u8,
        ttl: u8,
        payload_len: usize,
    ) -> Result<Self, WireError> {
        let total = IPV4_HEADER_LEN + payload_len;
        let b = buffer.as_mut();
        if total > b.len() || total > usize::from(u16::MAX) {
            return Err(WireError::BadLength);
        }
        b[field::VER_IHL] = 0x45;
        b[field::DSCP_ECN] = 0;
        write_u16_be(b, field::TOTAL_LEN, total as u16);
        write_u16_be(b, field::IDENT, 0);
        write_u16_be(b, field::FLAGS_FRAG, 0x4000);
        b[field::TTL] = ttl;
        b[field::PROTOCOL] = protocol;
        b[field::SOURCE].copy_from_slice(&src.octets());
        b[field::DESTINATION].copy_from_slice(&dst.octets());
        let mut p = Self { buffer };
        p.fill_checksum();
        Ok(p)
    }

    pub fn fill_checksum(&mut self) {
        let hl = self.header_len();
        let b = self.buffer.as_mut();
        write_u16_be(b, field::CHECKSUM, 0);
        let c = internet_checksum(&b[..hl]);
        write_u16_be(b, field::CHECKSUM, c);
    }

    /// Rewrites the total length and the flags/fragment-offset word (for a
    /// fragment cut from a larger packet) and refreshes the header checksum.
    /// `total_len` must fit the buffer and hold the header.
    pub fn set_fragment(&mut self, total_len: u16, flags_fragment: u16) -> Result<(), WireError> {
        let hl = self.header_len();
        let b = self.buffer.as_mut();
        if usize::from(total_len) < hl || usize::from(total_len) > b.len() {
            return Err(WireError::BadLength);
        }
        write_u16_be(b, field::TOTAL_LEN, total_len);
        write_u16_be(b, field::FLAGS_FRAG, flags_fragment);
        self.fill_checksum();
        Ok(())
    }

    pub fn payload_mut(&mut self) -> &mut [u8] {
        let (hl, tl) = (self.header_len(), self.total_len().min(self.bytes().len()));
        &mut self.buffer.as_mut()[hl..tl]
    }

    /// Takes one hop off the TTL, updating the header checksum incrementally
    /// (RFC 1624, eqn. 3). `false` (and nothing changed) when the TTL is 0 or 1:
    /// the packet may not be forwarded.
    pub fn decrement_ttl(&mut self) -> bool {
        let b = self.buffer.as_mut();
        let ttl = b[field::TTL];
        if ttl <= 1 {
            return false;
        }
        let old = u16::from_be_bytes([ttl, b[field::PROTOCOL]]);
        let new = u16::from_be_bytes([ttl - 1, b[field::PROTOCOL]]);
        let checksum = read_u16_be(b, field::CHECKSUM);
        b[field::TTL] = ttl - 1;
        write_u16_be(b, field::CHECKSUM, super::checksum::update(checksum, old, new));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emit_then_parse() {
        let mut buf = [0u8; 64];
        let p =
            Ipv4Packet::emit(&mut buf[..], Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2), 17, 64, 8).unwrap();
        assert!(p.verify_checksum());
        let p = Ipv4Packet::new_checked(&buf[..]).unwrap();
        assert_eq!(p.total_len(), 28);
        assert_eq!(p.payload().len(), 8);
        assert_eq!(p.source(), Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(p.destination(), Ipv4Addr::new(10, 0, 0, 2));
        assert!(p.dont_fragment() && !p.is_fragment());
        assert_eq!((p.protocol(), p.ttl()), (17, 64));
    }

    #[test]
    fn rejects_bad_headers() {
        let mut buf = [0u8; 40];
        buf[0] = 0x45;
        buf[3] = 41; // total length beyond the buffer
        assert_eq!(Ipv4Packet::new_checked(&buf[..]).unwrap_err(), WireError::BadLength);
        buf[3] = 40;
        buf[0] = 0x44; // IHL 16 bytes
        assert_eq!(Ipv4Packet::new_checked(&buf[..]).unwrap_err(), WireError::BadLength);
        buf[0] = 0x65;
        assert_eq!(Ipv4Packet::new_checked(&buf[..]).unwrap_err(), WireError::BadVersion);
        assert_eq!(Ipv4Packet::new_checked(&buf[..19]).unwrap_err(), WireError::Truncated);
        buf[0] = 0x4f; // IHL 60 > total length 40
        assert_eq!(Ipv4Packet::new_checked(&buf[..]).unwrap_err(), WireError::BadLength);
    }
}
