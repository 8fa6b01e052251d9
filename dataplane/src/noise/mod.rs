//! The WireGuard protocol, I/O-free: callers pass buffers and `now` in and get
//! results back; nothing here reads a clock, opens a socket or spawns a thread.

pub mod aead;
pub mod constants;
pub mod cookie;
pub mod crypto;
pub mod handshake;
pub mod keys;
pub mod peer;
pub mod replay;
pub mod session;
pub mod tai64n;
pub mod timers;

pub use aead::{AeadBackend, TransportKey};
pub use keys::{KeyParseError, PresharedKey, PrivateKey, PublicKey};
pub use session::{Keypair, ReceiveError, SendError};
