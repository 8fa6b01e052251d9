//! The Internet checksum (RFC 1071), incremental so that pseudo-headers and
//! payloads can be summed without copying.

/// One's-complement sum in progress.
#[derive(Debug, Clone, Copy, Default)]
pub struct ChecksumAccumulator {
    sum: u64,
}

impl ChecksumAccumulator {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `data` as a run of big-endian 16-bit words. A trailing odd byte is
    /// padded with zero, so only the last chunk of a message may have odd length.
    pub fn add(&mut self, data: &[u8]) -> &mut Self {
        let mut chunks = data.chunks_exact(4);
        for c in &mut chunks {
            self.sum += u64::from(u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
        }
        let rest = chunks.remainder();
        let mut words = rest.chunks_exact(2);
        for w in &mut words {
            self.sum += u64::from(u16::from_be_bytes([w[0], w[1]]));
        }
        if let [last] = words.remainder() {
            self.sum += u64::from(u16::from_be_bytes([*last, 0]));
        }
        self
    }

    pub fn add_u16(&mut self, v: u16) -> &mut Self {
        self.sum += u64::from(v);
        self
    }

    /// The folded, complemented checksum ready to be written into a header.
    pub fn finish(&self) -> u16 {
        let mut s = self.sum;
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        !(s as u16)
    }
}

/// The checksum of one contiguous buffer.
pub fn internet_checksum(data: &[u8]) -> u16 {
    ChecksumAccumulator::new().add(data).finish()
}

/// The checksum `checksum` after one 16-bit word it covers changed from
/// `old` to `new` (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')).
pub fn update(checksum: u16, old: u16, new: u16) -> u16 {
    let mut s = u32::from(!checksum) + u32::from(!old) + u32::from(new);
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

/// Starts a UDP/TCP/ICMPv6 checksum with the IPv4 or IPv6 pseudo-header.
/// `src` and `dst` are 4 or 16 bytes each.
pub fn pseudo_header_sum(src: &[u8], dst: &[u8], protocol: u8, length: u32) -> ChecksumAccumulator {
    let mut acc = ChecksumAccumulator::new();
    acc.add(src).add(dst);
    acc.add_u16((length >> 16) as u16).add_u16(length as u16);
    acc.add_u16(u16::from(protocol));
    acc
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// An incremental update equals recomputing the checksum over the
        /// changed data (RFC 1624), for any header and any changed word.
        #[test]
        fn incremental_update_matches_a_full_recompute(mut words in proptest::collection::vec(any::<u16>(), 2..30), at in any::<prop::sample::Index>(), new in any::<u16>()) {
            let bytes = |w: &[u16]| w.iter().flat_map(|x| x.to_be_bytes()).collect::<Vec<u8>>();
            let i = at.index(words.len() - 1) + 1;
            words[0] = 0;
            words[0] = internet_checksum(&bytes(&words));
            let old = words[i];
            words[i] = new;
            let updated = update(words[0], old, new);
            words[0] = updated;
            prop_assert_eq!(internet_checksum(&bytes(&words)), 0, "a checksummed header verifies");
        }
    }

    #[test]
    fn rfc1071_example() {
        // RFC 1071 section 3: the words 0001 f203 f4f5 f6f7 sum to ddf2 (before complement).
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(internet_checksum(&data), !0xddf2);
    }

    #[test]
    fn known_ipv4_header() {
        // A captured header whose checksum field (0xb861) is correct.
        let hdr = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0xb8, 0x61, 0xc0, 0xa8, 0x00, 0x01, 0xc0, 0xa8,
            0x00, 0xc7,
        ];
        assert_eq!(internet_checksum(&hdr), 0);
        let mut zeroed = hdr;
        zeroed[10] = 0;
        zeroed[11] = 0;
        assert_eq!(internet_checksum(&zeroed), 0xb861);
    }

    #[test]
    fn odd_length_and_split_sums_agree() {
        let data: Vec<u8> = (0u8..=200).collect();
        let whole = internet_checksum(&data);
        let mut acc = ChecksumAccumulator::new();
        acc.add(&data[..100]).add(&data[100..]);
        assert_eq!(acc.finish(), whole);
    }
}
