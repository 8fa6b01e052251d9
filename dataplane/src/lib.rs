//! The wgxdp data plane: packet views, the WireGuard protocol core and the
//! lock-free tables the workers read. No HTTP, no database.

pub mod admission;
pub mod conntrack;
pub mod crypto_pool;
pub mod device;
pub mod drops;
pub mod flow;
pub mod fragment;
pub mod frame;
pub mod frame_io;
pub mod gateway;
pub mod host;
pub mod icmp;
pub mod loader;
pub mod neighbors;
pub mod netlink;
pub mod nic;
pub mod noise;
pub mod peer_view;
pub mod policy;
pub mod prefetch;
pub mod slow_path;
pub mod snapshot;
pub mod staging;
pub mod table;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod transport;
pub mod wire;
pub mod worker;
pub mod xsk;
