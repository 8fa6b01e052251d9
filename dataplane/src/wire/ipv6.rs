//! IPv6 packets (RFC 8200), fixed header only: extension headers are payload.

use super::{read_u16_be, write_u16_be, WireError};
use core::net::Ipv6Addr;

mod field {
    use super::super::Field;
    pub const VER_TC_FLOW: Field = 0..4;
    pub const PAYLOAD_LEN: Field = 4..6;
    pub const NEXT_HEADER: usize = 6;
    pub const HOP_LIMIT: usize = 7;
    pub const SOURCE: Field = 8..24;
    pub const DESTINATION: Field = 24..40;
}

pub const IPV6_HEADER_LEN: usize = 40;

/// A view of an IPv6 packet; `new_checked` guarantees version 6 and a payload
/// length that fits the buffer.
#[derive(Debug, Clone)]
pub struct Ipv6Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Ipv6Packet<T> {
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        Self::check(buffer, true)
    }

    /// A packet quoted in an ICMP error: the fixed header must be whole, the
    /// rest may be cut short (`payload` is then what is there).
    pub fn new_truncated(buffer: T) -> Result<Self, WireError> {
        Self::check(buffer, false)
    }

    /// Version 6, the fixed header inside the buffer, and (`whole`) a payload
    /// length that fits it.
    fn check(buffer: T, whole: bool) -> Result<Self, WireError> {
        let b = buffer.as_ref();
        if b.len() < IPV6_HEADER_LEN {
            return Err(WireError::Truncated);
        }
        if b[field::VER_TC_FLOW.start] >> 4 != 6 {
            return Err(WireError::BadVersion);
        }
        if whole && IPV6_HEADER_LEN + usize::from(read_u16_be(b, field::PAYLOAD_LEN)) > b.len() {
            return Err(WireError::BadLength);
        }
        Ok(Self { buffer })
    }

    fn bytes(&self) -> &[u8] {
        self.buffer.as_ref()
    }

    pub fn payload_len(&self) -> usize {
        usize::from(read_u16_be(self.bytes(), field::PAYLOAD_LEN))
    }

    pub fn total_len(&self) -> usize {
        IPV6_HEADER_LEN + self.payload_len()
    }

    pub fn next_header(&self) -> u8 {
        self.bytes()[field::NEXT_HEADER]
    }

    pub fn hop_limit(&self) -> u8 {
        self.bytes()[field::HOP_LIMIT]
    }

    pub fn source(&self) -> Ipv6Addr {
        Ipv6Addr::from(super::array::<16>(self.bytes(), field::SOURCE))
    }

    pub fn destination(&self) -> Ipv6Addr {
        Ipv6Addr::from(super::array::<16>(self.bytes(), field::DESTINATION))
    }

    /// The payload (for a truncated view, as far as the buffer goes).
    pub fn payload(&self) -> &[u8] {
        &self.bytes()[IPV6_HEADER_LEN..self.total_len().min(self.bytes().len())]
    }

    pub fn packet(&self) -> &[u8] {
        &self.bytes()[..self.total_len().min(self.bytes().len())]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Ipv6Packet<T> {
    /// Writes a fixed header into `buffer` and returns the view.
    pub fn emit(
        mut buffer: T,
        src: Ipv6Addr,
        dst: Ipv6Addr,
        next_header: u8,
        hop_limit: u8,
        payload_len: usize,
    ) -> Result<Self, WireError> {
        let b = buffer.as_mut();
        if IPV6_HEADER_LEN + payload_len > b.len() || payload_len > usize::from(u16::MAX) {
            return Err(WireError::BadLength);
        }
        b[field::VER_TC_FLOW].copy_from_slice(&[0x60, 0, 0, 0]);
        write_u16_be(b, field::PAYLOAD_LEN, payload_len as u16);
        b[field::NEXT_HEADER] = next_header;
        b[field::HOP_LIMIT] = hop_limit;
        b[field::SOURCE].copy_from_slice(&src.octets());
        b[field::DESTINATION].copy_from_slice(&dst.octets());
        Ok(Self { buffer })
    }

    pub fn payload_mut(&mut self) -> &mut [u8] {
        let tl = self.total_len().min(self.bytes().len());
        &mut self.buffer.as_mut()[IPV6_HEADER_LEN..tl]
    }

    /// Takes one hop off the hop limit; `false` (and nothing changed) when it
    /// is 0 or 1: the packet may not be forwarded.
    pub fn decrement_hop_limit(&mut self) -> bool {
        let b = self.buffer.as_mut();
        let hops = b[field::HOP_LIMIT];
        if hops <= 1 {
            return false;
        }
        b[field::HOP_LIMIT] = hops - 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emit_then_parse() {
        let mut buf = [0u8; 80];
        let src: Ipv6Addr = "fd00::1".parse().unwrap();
        let dst: Ipv6Addr = "fd00::2".parse().unwrap();
        Ipv6Packet::emit(&mut buf[..], src, dst, 58, 64, 16).unwrap();
        let p = Ipv6Packet::new_checked(&buf[..]).unwrap();
        assert_eq!((p.source(), p.destination()), (src, dst));
        assert_eq!((p.next_header(), p.hop_limit(), p.payload().len()), (58, 64, 16));
        assert_eq!(Ipv6Packet::new_checked(&buf[..55]).unwrap_err(), WireError::BadLength);
        buf[0] = 0x40;
        assert_eq!(Ipv6Packet::new_checked(&buf[..]).unwrap_err(), WireError::BadVersion);
    }
}
