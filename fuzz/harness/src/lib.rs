//! The fuzz harnesses: one function per libFuzzer target in `fuzz/fuzz_targets/`,
//! each driving the code production runs (no copies of its logic here). They
//! live in this ordinary library so that the seed generator (`fuzz-seeds`) and
//! the crash regression tests (`tests/regressions.rs`, part of `cargo test`)
//! run exactly what the fuzzer ran.
//!
//! Stateful targets (`device_receive`, `worker_loop`) read their input as a
//! sequence of [`records`]: an operation, a flags byte and a byte string. The
//! operations use a real peer (the client `Device` of the fixture) to make
//! genuine messages, and flags patch in what random keys make unguessable (the
//! live receiver index, a valid MAC1), so the fuzzer gets past the cheap checks.
//! Every input starts from a fresh fixture, so a crashing input replays alone.

pub mod control;
pub mod cookie;
pub mod device;
pub mod uapi;
pub mod wire_views;
pub mod worker;

pub use control::{api_bodies, config_file};
pub use cookie::cookie;
pub use device::device_receive;
pub use uapi::uapi_socket;
pub use wire_views::wire_views;
pub use worker::worker_loop;

/// Most records one input may hold (bounds the time per input).
pub const MAX_RECORDS: usize = 64;

/// One step of a structured input.
#[derive(Debug, Clone, Copy)]
pub struct Record<'a> {
    pub op: u8,
    pub flags: u8,
    pub bytes: &'a [u8],
}

/// Splits `data` into records: `op: u8, flags: u8, len: u16 (LE), bytes[len]`.
/// A short last record takes what is left; at most `MAX_RECORDS`.
pub fn records(data: &[u8]) -> impl Iterator<Item = Record<'_>> {
    let mut rest = data;
    std::iter::from_fn(move || {
        let (&op, after) = rest.split_first()?;
        let (flags, after) = after.split_first().map(|(f, a)| (*f, a)).unwrap_or((0, after));
        let (len, after) = match after {
            [a, b, tail @ ..] => (usize::from(u16::from_le_bytes([*a, *b])), tail),
            _ => (0, &[][..]),
        };
        let (bytes, after) = after.split_at(len.min(after.len()));
        rest = after;
        Some(Record { op, flags, bytes })
    })
    .take(MAX_RECORDS)
}

/// Appends one record in the format `records` reads (for seeds).
pub fn encode(out: &mut Vec<u8>, op: u8, flags: u8, bytes: &[u8]) {
    let len = u16::try_from(bytes.len()).expect("a record holds at most 65535 bytes");
    out.extend_from_slice(&[op, flags]);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(bytes);
}

/// A clock step from a record's bytes: little-endian milliseconds, at most
/// ten minutes (several rekey intervals and REJECT_AFTER_TIME in a few steps).
pub fn clock_step(bytes: &[u8]) -> std::time::Duration {
    let mut ms = [0u8; 4];
    let n = bytes.len().min(4);
    ms[..n].copy_from_slice(&bytes[..n]);
    std::time::Duration::from_millis(u64::from(u32::from_le_bytes(ms)) % 600_000)
}

/// Encodes a clock step for seeds.
pub fn step_bytes(d: std::time::Duration) -> [u8; 4] {
    u32::try_from(d.as_millis()).expect("a step of under ten minutes").to_le_bytes()
}

/// An IPv4/UDP packet from `src` to `dst` carrying `payload` (truncated to 1400 bytes).
pub fn ipv4_with_payload(src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
    use wgxdp_dataplane::wire::{ip_protocol, Ipv4Packet, IPV4_HEADER_LEN};
    let payload = &payload[..payload.len().min(1400)];
    let mut b = vec![0u8; IPV4_HEADER_LEN + payload.len()];
    b[IPV4_HEADER_LEN..].copy_from_slice(payload);
    Ipv4Packet::emit(&mut b[..], src.into(), dst.into(), ip_protocol::UDP, 64, payload.len()).expect("fits");
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_tolerate_truncation() {
        let mut data = Vec::new();
        encode(&mut data, 1, 2, b"abc");
        encode(&mut data, 3, 4, b"");
        let r: Vec<_> = records(&data).map(|r| (r.op, r.flags, r.bytes.to_vec())).collect();
        assert_eq!(r, vec![(1, 2, b"abc".to_vec()), (3, 4, vec![])]);
        assert_eq!(records(&[7]).count(), 1);
        assert_eq!(records(&[7, 0, 9, 0, 1]).next().unwrap().bytes, &[1]);
        assert_eq!(clock_step(&step_bytes(std::time::Duration::from_secs(130))).as_secs(), 130);
    }
}
