//! The cross-platform userspace API of WireGuard on
//! `/var/run/wireguard/<name>.sock`, so that `wg show`, `wg showconf`,
//! `wg set` / `wg setconf` and the tools built on them (Prometheus exporters,
//! Rosenpass) work with wgxdp as with wireguard-go. `protocol` is the text
//! format, `device` maps it onto the gateway (through the API's changes),
//! `server` is the socket.

pub mod device;
pub mod protocol;
pub mod server;

pub use device::UapiDevice;
pub use server::{probe, SocketState, UapiSocket, SOCKET_DIR};

/// An interface name as `wg(8)` accepts one: 1-15 of `A-Z a-z 0-9 _ = + . -`,
/// not `.` or `..`.
pub fn validate_name(name: &str) -> Result<(), String> {
    let ok_chars = name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_=+.-".contains(&b));
    if !(1..=15).contains(&name.len()) || !ok_chars || name == "." || name == ".." {
        return Err(format!("`{name}` is not a WireGuard interface name: 1-15 characters of A-Z, a-z, 0-9, `_=+.-`"));
    }
    Ok(())
}
