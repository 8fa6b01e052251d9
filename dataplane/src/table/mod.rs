//! The tables the workers read on every packet, without locks: readers load an
//! immutable snapshot (or one atomic slot); writers build the next snapshot under
//! a writer-only mutex and publish it atomically (RCU via arc-swap).

mod allowed_ips;
mod fast_map;
mod index;
mod prefix;

pub use allowed_ips::{AllowedIps, SharedAllowedIps};
pub use fast_map::{FastHasher, FastMap};
pub use index::{IndexEntry, IndexGuard, IndexTable, IndexTableFull};
pub(crate) use prefix::addr_key;
pub use prefix::{IpPrefix, PrefixParseError};
