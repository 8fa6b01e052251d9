//! The kernel's neighbour table over rtnetlink: one `RTM_GETNEIGH` dump on a
//! `NETLINK_ROUTE` socket, parsed into (IP → MAC) for one interface. Used by
//! the neighbour resolver thread, never by workers.

use crate::wire::MacAddr;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

// rtnetlink constants (linux/netlink.h, linux/rtnetlink.h, linux/neighbour.h).
const NLMSG_HDR_LEN: usize = 16;
const NLMSG_DONE: u16 = 3;
const NLMSG_ERROR: u16 = 2;
const RTM_NEWNEIGH: u16 = 28;
const RTM_GETNEIGH: u16 = 30;
const NLM_F_REQUEST: u16 = 0x01;
const NLM_F_DUMP: u16 = 0x300;
const NDMSG_LEN: usize = 12;
const NDA_DST: u16 = 1;
const NDA_LLADDR: u16 = 2;
const NUD_INCOMPLETE: u16 = 0x01;
const NUD_FAILED: u16 = 0x20;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// What one buffer of a dump held.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DumpPart {
    pub neighbors: HashMap<IpAddr, MacAddr>,
    /// The dump ended (NLMSG_DONE) in this buffer.
    pub done: bool,
    /// The kernel answered with an error (negative errno).
    pub error: Option<i32>,
}

/// Parses one received buffer of an `RTM_GETNEIGH` dump, keeping entries of
/// `ifindex` that have a link-layer address and are not failed/incomplete.
/// Messages of another request (sequence number other than `seq`) are
/// skipped. Malformed input ends the parse; it never panics.
pub fn parse_neighbor_dump(buf: &[u8], ifindex: u32, seq: u32) -> DumpPart {
    let mut part = DumpPart::default();
    let mut off = 0;
    while off + NLMSG_HDR_LEN <= buf.len() {
        let (Some(len), Some(kind)) = (u32_at(buf, off), u16_at(buf, off + 4)) else { break };
        let len = len as usize;
        if len < NLMSG_HDR_LEN || off + len > buf.len() {
            break;
        }
        let msg = &buf[off + NLMSG_HDR_LEN..off + len];
        if u32_at(buf, off + 8) != Some(seq) {
            off += align4(len);
            continue;
        }
        match kind {
            NLMSG_DONE => {
                part.done = true;
                break;
            }
            NLMSG_ERROR => {
                part.error = Some(u32_at(msg, 0).map_or(-1, |e| e as i32));
                part.done = true;
                break;
            }
            RTM_NEWNEIGH if msg.len() >= NDMSG_LEN => {
                let index = u32_at(msg, 4).unwrap_or(0);
                let state = u16_at(msg, 8).unwrap_or(0);
                if index == ifindex && state & (NUD_INCOMPLETE | NUD_FAILED) == 0 {
                    let (mut dst, mut mac) = (None, None);
                    let mut a = NDMSG_LEN;
                    while a + 4 <= msg.len() {
                        let (Some(alen), Some(atype)) = (u16_at(msg, a), u16_at(msg, a + 2)) else { break };
                        let alen = usize::from(alen);
                        if alen < 4 || a + alen > msg.len() {
                            break;
                        }
                        let value = &msg[a + 4..a + alen];
                        match atype {
                            NDA_DST => dst = ip_from(value),
                            NDA_LLADDR => mac = <[u8; 6]>::try_from(value).ok().map(MacAddr),
                            _ => {}
                        }
                        a += align4(alen);
                    }
                    if let (Some(ip), Some(mac)) = (dst, mac) {
                        part.neighbors.insert(ip, mac);
                    }
                }
            }
            _ => {}
        }
        off += align4(len);
    }
    part
}

fn ip_from(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => Some(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(bytes).ok()?))),
        16 => Some(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?))),
        _ => None,
    }
}

/// The neighbours of `iface` in the calling thread's network namespace.
pub fn read_neighbors(iface: &str) -> io::Result<HashMap<IpAddr, MacAddr>> {
    let name = std::ffi::CString::new(iface).map_err(|_| io::Error::other("interface name contains NUL"))?;
    // SAFETY: if_nametoindex reads a NUL-terminated string we own.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: plain socket(2); the descriptor is owned right below.
    let raw = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut req = [0u8; NLMSG_HDR_LEN + NDMSG_LEN];
    req[0..4].copy_from_slice(&((NLMSG_HDR_LEN + NDMSG_LEN) as u32).to_ne_bytes());
    req[4..6].copy_from_slice(&RTM_GETNEIGH.to_ne_bytes());
    req[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    static NEXT_SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
    let seq = NEXT_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    req[8..12].copy_from_slice(&seq.to_ne_bytes());
    // Never wait on the kernel for long: the resolver thread must keep going.
    let timeout = libc::timeval { tv_sec: 2, tv_usec: 0 };
    // SAFETY: `timeout` is a valid timeval for the length passed.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        )
    };
    req[NLMSG_HDR_LEN] = libc::AF_UNSPEC as u8;
    // SAFETY: sockaddr_nl is plain data (all-zero = the kernel); `req` is a
    // valid buffer of the given length for the whole call.
    let sent = unsafe {
        let mut kernel: libc::sockaddr_nl = std::mem::zeroed();
        kernel.nl_family = libc::AF_NETLINK as u16;
        libc::sendto(
            fd.as_raw_fd(),
            req.as_ptr().cast(),
            req.len(),
            0,
            (&kernel as *const libc::sockaddr_nl).cast(),
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut neighbors = HashMap::new();
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        // SAFETY: all-zero is a valid sockaddr_nl; `buf` and `from` are writable
        // for the lengths passed during the call.
        let (n, from) = unsafe {
            let mut from: libc::sockaddr_nl = std::mem::zeroed();
            let mut from_len = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
            let n = libc::recvfrom(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                0,
                (&mut from as *mut libc::sockaddr_nl).cast(),
                &mut from_len,
            );
            (n, from)
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if from.nl_pid != 0 {
            // Only the kernel answers a dump; anything else is not ours to believe.
            continue;
        }
        let part = parse_neighbor_dump(&buf[..n as usize], ifindex, seq);
        neighbors.extend(part.neighbors);
        if let Some(errno) = part.error.filter(|&e| e != 0) {
            return Err(io::Error::from_raw_os_error(-errno));
        }
        if part.done || n == 0 {
            return Ok(neighbors);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One RTM_NEWNEIGH message as the kernel writes it.
    fn neigh(ifindex: u32, state: u16, dst: &[u8], mac: Option<[u8; 6]>) -> Vec<u8> {
        let mut body = vec![0u8; NDMSG_LEN];
        body[0] = if dst.len() == 4 { 2 } else { 10 };
        body[4..8].copy_from_slice(&ifindex.to_ne_bytes());
        body[8..10].copy_from_slice(&state.to_ne_bytes());
        let mut attr = |kind: u16, value: &[u8]| {
            body.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
            body.extend_from_slice(&kind.to_ne_bytes());
            body.extend_from_slice(value);
            while body.len() != align4(body.len()) {
                body.push(0);
            }
        };
        attr(NDA_DST, dst);
        if let Some(m) = mac {
            attr(NDA_LLADDR, &m);
        }
        let mut msg = vec![0u8; NLMSG_HDR_LEN];
        msg[0..4].copy_from_slice(&((NLMSG_HDR_LEN + body.len()) as u32).to_ne_bytes());
        msg[4..6].copy_from_slice(&RTM_NEWNEIGH.to_ne_bytes());
        msg[8..12].copy_from_slice(&SEQ.to_ne_bytes());
        msg.extend_from_slice(&body);
        msg
    }

    fn done() -> Vec<u8> {
        let mut m = vec![0u8; NLMSG_HDR_LEN + 4];
        m[0..4].copy_from_slice(&((NLMSG_HDR_LEN + 4) as u32).to_ne_bytes());
        m[4..6].copy_from_slice(&NLMSG_DONE.to_ne_bytes());
        m[8..12].copy_from_slice(&SEQ.to_ne_bytes());
        m
    }

    const SEQ: u32 = 41;

    #[test]
    fn parses_a_dump_and_keeps_usable_entries_of_the_interface() {
        let mac = [0x7a, 0x1b, 0x2c, 0x3d, 0x4e, 0x5f];
        let v6: [u8; 16] = "fe80::1".parse::<Ipv6Addr>().unwrap().octets();
        let mut buf = Vec::new();
        buf.extend(neigh(7, 0x02, &[10, 211, 0, 2], Some(mac))); // REACHABLE
        buf.extend(neigh(7, 0x04, &v6, Some([1; 6]))); // STALE, IPv6
        buf.extend(neigh(7, NUD_FAILED, &[10, 211, 0, 9], Some([2; 6])));
        buf.extend(neigh(7, NUD_INCOMPLETE, &[10, 211, 0, 8], None));
        buf.extend(neigh(8, 0x02, &[10, 99, 0, 1], Some([3; 6]))); // another interface
        buf.extend(neigh(7, 0x02, &[10, 211, 0, 3], None)); // no lladdr
        let part = parse_neighbor_dump(&buf, 7, SEQ);
        assert!(!part.done);
        assert_eq!(part.neighbors.len(), 2);
        assert_eq!(part.neighbors[&IpAddr::from([10, 211, 0, 2])], MacAddr(mac));
        assert_eq!(part.neighbors[&IpAddr::from(v6)], MacAddr([1; 6]));
        assert!(parse_neighbor_dump(&done(), 7, SEQ).done);
    }

    #[test]
    fn malformed_input_never_panics() {
        let good = neigh(7, 0x02, &[10, 0, 0, 1], Some([9; 6]));
        for len in 0..good.len() {
            let _ = parse_neighbor_dump(&good[..len], 7, SEQ);
        }
        let mut bad_len = good.clone();
        bad_len[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert!(parse_neighbor_dump(&bad_len, 7, SEQ).neighbors.is_empty());
        let mut bad_attr = good.clone();
        bad_attr[NLMSG_HDR_LEN + NDMSG_LEN] = 200; // attribute longer than the message
        assert!(parse_neighbor_dump(&bad_attr, 7, SEQ).neighbors.is_empty());
    }

    #[test]
    fn answers_to_another_request_are_ignored() {
        let mut stale = neigh(7, 0x02, &[10, 0, 0, 1], Some([9; 6]));
        stale.extend(done());
        let part = parse_neighbor_dump(&stale, 7, SEQ + 1);
        assert!(part.neighbors.is_empty() && !part.done, "another sequence number: not ours");
        assert_eq!(parse_neighbor_dump(&stale, 7, SEQ).neighbors.len(), 1);
    }

    #[test]
    fn reads_the_loopback_interface_without_error() {
        // A live dump: loopback has no neighbours, but the exchange must work.
        assert!(read_neighbors("lo").is_ok());
        assert!(read_neighbors("no-such-iface0").is_err());
    }
}
