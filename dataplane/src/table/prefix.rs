//! IP prefixes ("10.0.0.0/16", "fd00::/64").

use std::net::IpAddr;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrefixParseError {
    #[error("expected ADDRESS/LENGTH, e.g. 10.0.0.0/16")]
    Syntax,
    #[error("prefix length {0} is longer than the address")]
    LengthTooLong(u8),
    #[error("address has bits set past the prefix length (did you mean {0}?)")]
    HostBitsSet(String),
}

/// A network prefix with its host bits cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpPrefix {
    addr: IpAddr,
    len: u8,
}

impl IpPrefix {
    /// Builds a prefix, clearing any host bits.
    pub fn new(addr: IpAddr, len: u8) -> Result<Self, PrefixParseError> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(PrefixParseError::LengthTooLong(len));
        }
        let addr = match addr {
            IpAddr::V4(a) => IpAddr::V4((u32::from(a) & mask32(len)).into()),
            IpAddr::V6(a) => IpAddr::V6((u128::from(a) & mask128(len)).into()),
        };
        Ok(Self { addr, len })
    }

    /// A single address (/32 or /128).
    pub fn host(addr: IpAddr) -> Self {
        Self { addr, len: if addr.is_ipv4() { 32 } else { 128 } }
    }

    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length in bits (0 for a default route).
    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => u32::from(a) & mask32(self.len) == u32::from(n),
            (IpAddr::V6(n), IpAddr::V6(a)) => u128::from(a) & mask128(self.len) == u128::from(n),
            _ => false,
        }
    }

    /// The address and its mask, left-aligned in 128 bits (IPv4 in the top 32).
    pub(crate) fn key_and_mask(&self) -> (u128, u128) {
        (self.key(), mask128(self.len))
    }

    /// The address left-aligned in 128 bits (IPv4 in the top 32), for the trie.
    pub(crate) fn key(&self) -> u128 {
        addr_key(self.addr)
    }
}

pub(crate) fn addr_key(a: IpAddr) -> u128 {
    match a {
        IpAddr::V4(a) => u128::from(u32::from(a)) << 96,
        IpAddr::V6(a) => u128::from(a),
    }
}

fn mask32(len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    }
}

pub(crate) fn mask128(len: u8) -> u128 {
    if len == 0 {
        0
    } else {
        u128::MAX << (128 - u32::from(len))
    }
}

impl core::str::FromStr for IpPrefix {
    type Err = PrefixParseError;
    /// Strict: host bits must be clear, so a typo is not silently widened.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (a, l) = s.trim().split_once('/').ok_or(PrefixParseError::Syntax)?;
        let addr: IpAddr = a.parse().map_err(|_| PrefixParseError::Syntax)?;
        if l.is_empty() || l.len() > 3 || !l.bytes().all(|b| b.is_ascii_digit()) {
            return Err(PrefixParseError::Syntax);
        }
        let len: u8 = l.parse().map_err(|_| PrefixParseError::Syntax)?;
        let p = Self::new(addr, len)?;
        if p.addr != addr {
            return Err(PrefixParseError::HostBitsSet(p.to_string()));
        }
        Ok(p)
    }
}

impl core::fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_display_contains() {
        let p: IpPrefix = "10.1.0.0/16".parse().unwrap();
        assert_eq!(p.to_string(), "10.1.0.0/16");
        assert!(p.contains("10.1.200.3".parse().unwrap()));
        assert!(!p.contains("10.2.0.1".parse().unwrap()));
        assert!(!p.contains("::1".parse().unwrap()));
        let v6: IpPrefix = "fd00:1::/32".parse().unwrap();
        assert!(v6.contains("fd00:1::99".parse().unwrap()));
        assert_eq!("0.0.0.0/0".parse::<IpPrefix>().unwrap().prefix_len(), 0);
        assert_eq!("10.1.2.3/16".parse::<IpPrefix>(), Err(PrefixParseError::HostBitsSet("10.1.0.0/16".into())));
        assert_eq!("10.0.0.0/33".parse::<IpPrefix>(), Err(PrefixParseError::LengthTooLong(33)));
        for bad in ["10.0.0.0", "10.0.0.0/", "x/8", "10.0.0.0/-1", "10.0.0.0/+8", "::/1290"] {
            assert_eq!(bad.parse::<IpPrefix>(), Err(PrefixParseError::Syntax), "{bad}");
        }
    }
}
