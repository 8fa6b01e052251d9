//! TAI64N timestamps (section 5.4.2): 8 bytes big-endian TAI64 seconds label,
//! then 4 bytes big-endian nanoseconds. Big-endian makes byte order equal time
//! order, so "newer" is a plain comparison.

use super::constants::TIMESTAMP_LEN;
use std::time::{SystemTime, UNIX_EPOCH};

/// 2^62 + 10: the TAI64 label of the Unix epoch (TAI was 10 s ahead of UTC then).
const TAI64_UNIX_EPOCH: u64 = 0x4000_0000_0000_000a;
/// Nanoseconds are rounded down to this granularity so that timestamps do not
/// leak a precise clock (as the reference implementations do, ~16.7 ms).
const WHITENER_NANOS: u32 = 0x100_0000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Hash)]
pub struct Tai64N(pub [u8; TIMESTAMP_LEN]);

impl Tai64N {
    pub fn from_system_time(t: SystemTime) -> Self {
        let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
        let secs = TAI64_UNIX_EPOCH.saturating_add(d.as_secs());
        let nanos = d.subsec_nanos() - d.subsec_nanos() % WHITENER_NANOS;
        let mut b = [0u8; TIMESTAMP_LEN];
        b[..8].copy_from_slice(&secs.to_be_bytes());
        b[8..].copy_from_slice(&nanos.to_be_bytes());
        Self(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn encodes_epoch_and_orders_by_time() {
        let epoch = Tai64N::from_system_time(UNIX_EPOCH);
        assert_eq!(epoch.0, [0x40, 0, 0, 0, 0, 0, 0, 0x0a, 0, 0, 0, 0]);
        let a = Tai64N::from_system_time(UNIX_EPOCH + Duration::new(1_700_000_000, 500_000_000));
        let b = Tai64N::from_system_time(UNIX_EPOCH + Duration::new(1_700_000_001, 0));
        assert!(a < b);
        // 500 ms rounded down to the whitener granularity.
        let nanos = u32::from_be_bytes([a.0[8], a.0[9], a.0[10], a.0[11]]);
        assert_eq!(nanos % WHITENER_NANOS, 0);
        assert!(nanos <= 500_000_000 && nanos > 480_000_000);
    }
}
