//! UDP datagrams (RFC 768).

use super::{checksum::pseudo_header_sum, ip_protocol, read_u16_be, write_u16_be, WireError};
use core::net::IpAddr;

mod field {
    use super::super::Field;
    pub const SRC_PORT: Field = 0..2;
    pub const DST_PORT: Field = 2..4;
    pub const LENGTH: Field = 4..6;
    pub const CHECKSUM: Field = 6..8;
    pub const PAYLOAD: usize = 8;
}

pub const UDP_HEADER_LEN: usize = field::PAYLOAD;

/// A view of a UDP datagram; `new_checked` guarantees that the length field is at
/// least 8 and fits the buffer.
#[derive(Debug, Clone)]
pub struct UdpDatagram<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> UdpDatagram<T> {
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        let b = buffer.as_ref();
        if b.len() < UDP_HEADER_LEN {
            return Err(WireError::Truncated);
        }
        let len = usize::from(read_u16_be(b, field::LENGTH));
        if len < UDP_HEADER_LEN || len > b.len() {
            return Err(WireError::BadLength);
        }
        Ok(Self { buffer })
    }

    fn bytes(&self) -> &[u8] {
        self.buffer.as_ref()
    }

    pub fn src_port(&self) -> u16 {
        read_u16_be(self.bytes(), field::SRC_PORT)
    }

    pub fn dst_port(&self) -> u16 {
        read_u16_be(self.bytes(), field::DST_PORT)
    }

    pub fn len(&self) -> usize {
        usize::from(read_u16_be(self.bytes(), field::LENGTH))
    }

    pub fn is_empty(&self) -> bool {
        self.len() == UDP_HEADER_LEN
    }

    pub fn checksum(&self) -> u16 {
        read_u16_be(self.bytes(), field::CHECKSUM)
    }

    pub fn payload(&self) -> &[u8] {
        &self.bytes()[field::PAYLOAD..self.len()]
    }

    /// Verifies the checksum against the pseudo-header. A zero checksum means
    /// "none" over IPv4 and is accepted there; over IPv6 it is invalid.
    pub fn verify_checksum(&self, src: IpAddr, dst: IpAddr) -> bool {
        if self.checksum() == 0 {
            return src.is_ipv4();
        }
        datagram_sum(src, dst, &self.bytes()[..self.len()]) == 0
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> UdpDatagram<T> {
    /// Writes the header for a datagram carrying `payload_len` bytes that are
    /// already (or will be) in place after it. Call `fill_checksum` once the
    /// payload is final.
    pub fn emit(mut buffer: T, src_port: u16, dst_port: u16, payload_len: usize) -> Result<Self, WireError> {
        let len = UDP_HEADER_LEN + payload_len;
        let b = buffer.as_mut();
        if len > b.len() || len > usize::from(u16::MAX) {
            return Err(WireError::BadLength);
        }
        write_u16_be(b, field::SRC_PORT, src_port);
        write_u16_be(b, field::DST_PORT, dst_port);
        write_u16_be(b, field::LENGTH, len as u16);
        write_u16_be(b, field::CHECKSUM, 0);
        Ok(Self { buffer })
    }

    pub fn fill_checksum(&mut self, src: IpAddr, dst: IpAddr) {
        let len = self.len();
        let b = self.buffer.as_mut();
        write_u16_be(b, field::CHECKSUM, 0);
        let c = match datagram_sum(src, dst, &b[..len]) {
            0 => 0xffff,
            c => c,
        };
        write_u16_be(b, field::CHECKSUM, c);
    }

    pub fn payload_mut(&mut self) -> &mut [u8] {
        let len = self.len();
        &mut self.buffer.as_mut()[field::PAYLOAD..len]
    }
}

fn datagram_sum(src: IpAddr, dst: IpAddr, datagram: &[u8]) -> u16 {
    let len = datagram.len() as u32;
    let mut acc = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => pseudo_header_sum(&s.octets(), &d.octets(), ip_protocol::UDP, len),
        (s, d) => pseudo_header_sum(&ip6(s), &ip6(d), ip_protocol::UDP, len),
    };
    acc.add(datagram).finish()
}

fn ip6(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emit_checksum_parse() {
        let mut buf = [0u8; 32];
        buf[8..13].copy_from_slice(b"hello");
        let src: IpAddr = "192.0.2.1".parse().unwrap();
        let dst: IpAddr = "192.0.2.2".parse().unwrap();
        let mut d = UdpDatagram::emit(&mut buf[..], 1234, 51820, 5).unwrap();
        d.fill_checksum(src, dst);
        let d = UdpDatagram::new_checked(&buf[..]).unwrap();
        assert_eq!((d.src_port(), d.dst_port(), d.payload()), (1234, 51820, &b"hello"[..]));
        assert!(d.verify_checksum(src, dst));
        assert!(!d.verify_checksum(dst, "192.0.2.9".parse().unwrap()));
        let mut bad = buf;
        bad[9] ^= 1;
        assert!(!UdpDatagram::new_checked(&bad[..]).unwrap().verify_checksum(src, dst));
    }

    #[test]
    fn rejects_lengths() {
        let mut buf = [0u8; 8];
        buf[5] = 9;
        assert_eq!(UdpDatagram::new_checked(&buf[..]).unwrap_err(), WireError::BadLength);
        buf[5] = 7;
        assert_eq!(UdpDatagram::new_checked(&buf[..]).unwrap_err(), WireError::BadLength);
        assert_eq!(UdpDatagram::new_checked(&buf[..7]).unwrap_err(), WireError::Truncated);
    }
}
