//! Ethernet II frames (no VLAN tags: tagged frames are not tunnel traffic and
//! go to the kernel).

use super::{read_u16_be, write_u16_be, WireError};

mod field {
    use super::super::Field;
    pub const DESTINATION: Field = 0..6;
    pub const SOURCE: Field = 6..12;
    pub const ETHERTYPE: Field = 12..14;
    pub const PAYLOAD: usize = 14;
}

pub const ETHERNET_HEADER_LEN: usize = field::PAYLOAD;

/// A MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct MacAddr(pub [u8; 6]);

impl core::fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        core::fmt::Display::fmt(self, f)
    }
}

impl core::fmt::Display for MacAddr {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let b = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3], b[4], b[5])
    }
}

/// The EtherTypes the gateway distinguishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EtherType {
    Ipv4,
    Ipv6,
    Arp,
    Other(u16),
}

impl From<u16> for EtherType {
    fn from(v: u16) -> Self {
        match v {
            0x0800 => EtherType::Ipv4,
            0x86dd => EtherType::Ipv6,
            0x0806 => EtherType::Arp,
            o => EtherType::Other(o),
        }
    }
}

impl From<EtherType> for u16 {
    fn from(t: EtherType) -> u16 {
        match t {
            EtherType::Ipv4 => 0x0800,
            EtherType::Ipv6 => 0x86dd,
            EtherType::Arp => 0x0806,
            EtherType::Other(o) => o,
        }
    }
}

/// A view of an Ethernet II frame.
#[derive(Debug, Clone)]
pub struct EthernetFrame<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> EthernetFrame<T> {
    pub fn new_checked(buffer: T) -> Result<Self, WireError> {
        if buffer.as_ref().len() < field::PAYLOAD {
            return Err(WireError::Truncated);
        }
        Ok(Self { buffer })
    }

    pub fn destination(&self) -> MacAddr {
        MacAddr(super::array(self.buffer.as_ref(), field::DESTINATION))
    }

    pub fn source(&self) -> MacAddr {
        MacAddr(super::array(self.buffer.as_ref(), field::SOURCE))
    }

    pub fn ethertype(&self) -> EtherType {
        read_u16_be(self.buffer.as_ref(), field::ETHERTYPE).into()
    }

    pub fn payload(&self) -> &[u8] {
        &self.buffer.as_ref()[field::PAYLOAD..]
    }

    pub fn into_inner(self) -> T {
        self.buffer
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> EthernetFrame<T> {
    pub fn set_destination(&mut self, mac: MacAddr) {
        self.buffer.as_mut()[field::DESTINATION].copy_from_slice(&mac.0);
    }

    pub fn set_source(&mut self, mac: MacAddr) {
        self.buffer.as_mut()[field::SOURCE].copy_from_slice(&mac.0);
    }

    pub fn set_ethertype(&mut self, t: EtherType) {
        write_u16_be(self.buffer.as_mut(), field::ETHERTYPE, t.into());
    }

    pub fn payload_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[field::PAYLOAD..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_build() {
        let mut buf = [0u8; 20];
        let mut f = EthernetFrame::new_checked(&mut buf[..]).unwrap();
        f.set_destination(MacAddr([1, 2, 3, 4, 5, 6]));
        f.set_source(MacAddr([7, 8, 9, 10, 11, 12]));
        f.set_ethertype(EtherType::Ipv6);
        f.payload_mut()[0] = 0x60;
        let f = EthernetFrame::new_checked(&buf[..]).unwrap();
        assert_eq!(f.destination(), MacAddr([1, 2, 3, 4, 5, 6]));
        assert_eq!(f.source().to_string(), "07:08:09:0a:0b:0c");
        assert_eq!(f.ethertype(), EtherType::Ipv6);
        assert_eq!(f.payload().len(), 6);
        assert_eq!(EthernetFrame::new_checked(&buf[..13]).unwrap_err(), WireError::Truncated);
    }
}
