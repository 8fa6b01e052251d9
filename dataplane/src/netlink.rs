//! rtnetlink, once for the whole data plane: one request/reply exchange on a
//! `NETLINK_ROUTE` socket (`Rtnetlink::request`), that believes only the
//! kernel (`nl_pid` 0) and only replies to its own sequence number, plus the
//! few messages the gateway needs: the neighbour table (`RTM_GETNEIGH`), a
//! route lookup (`RTM_GETROUTE`), a resolution kick (`RTM_NEWNEIGH` with
//! `NTF_USE`), and the XDP attributes of a link (`loader.rs`). The same
//! exchange runs on a `NETLINK_GENERIC` socket (`Rtnetlink::open_generic`)
//! for what `nic.rs` asks the kernel's `netdev` family. Used by the resolver
//! threads, the loader and `wgxdp check`, never by workers. Every parser
//! takes arbitrary bytes and never panics.

use crate::table::IpPrefix;
use crate::wire::MacAddr;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

// linux/netlink.h, linux/rtnetlink.h, linux/neighbour.h.
pub const NLMSG_HDR_LEN: usize = 16;
pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
pub const RTM_NEWLINK: u16 = 16;
pub const RTM_GETLINK: u16 = 18;
pub const RTM_SETLINK: u16 = 19;
pub const RTM_NEWROUTE: u16 = 24;
pub const RTM_DELROUTE: u16 = 25;
pub const RTM_GETROUTE: u16 = 26;
pub const RTM_NEWNEIGH: u16 = 28;
pub const RTM_GETNEIGH: u16 = 30;
pub const NLM_F_REQUEST: u16 = 0x01;
const NLM_F_MULTI: u16 = 0x02;
pub const NLM_F_ACK: u16 = 0x04;
pub const NLM_F_REPLACE: u16 = 0x100;
pub const NLM_F_EXCL: u16 = 0x200;
pub const NLM_F_CREATE: u16 = 0x400;
pub const NLM_F_DUMP: u16 = 0x300;
pub const NLA_F_NESTED: u16 = 1 << 15;
const NDMSG_LEN: usize = 12;
const NDA_DST: u16 = 1;
const NDA_LLADDR: u16 = 2;
const NTF_USE: u8 = 0x01;
const NUD_INCOMPLETE: u16 = 0x01;
const NUD_FAILED: u16 = 0x20;
const RTMSG_LEN: usize = 12;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
/// How long any exchange may wait for the kernel.
const REPLY_TIMEOUT: Duration = Duration::from_secs(2);

pub fn align4(n: usize) -> usize {
    n.saturating_add(3) & !3
}

pub fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at.checked_add(2)?)?.try_into().ok()?))
}

pub fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at.checked_add(4)?)?.try_into().ok()?))
}

pub fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(at..at.checked_add(8)?)?.try_into().ok()?))
}

/// (type, payload) of each attribute in `b` (the nested flag cleared); stops
/// at the first malformed one.
pub fn attrs(b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        let len = usize::from(u16_at(b, at)?);
        let kind = u16_at(b, at.checked_add(2)?)? & !NLA_F_NESTED;
        let payload = b.get(at.checked_add(4)?..at.checked_add(len)?).filter(|_| len >= 4)?;
        at = at.checked_add(align4(len))?;
        Some((kind, payload))
    })
}

/// Appends one attribute (padded to 4 bytes).
pub fn push_attr(out: &mut Vec<u8>, kind: u16, value: &[u8]) {
    out.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(value);
    out.resize(align4(out.len()), 0);
}

/// A whole request: the netlink header, then `body` (the family header and
/// attributes, already encoded).
pub fn encode(kind: u16, flags: u16, seq: u32, body: &[u8]) -> Vec<u8> {
    let len = NLMSG_HDR_LEN + body.len();
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(body);
    m
}

/// Where an exchange stands after one received datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// More datagrams belong to the answer.
    More,
    /// The answer is complete.
    Done,
    /// The kernel refused: a negative errno.
    Failed(i32),
}

/// Walks one datagram from the kernel: every message answering `seq` goes to
/// `each` as (type, payload after the header). Messages of other requests are
/// skipped; malformed bytes end the walk. `acked`: the request asked for an
/// acknowledgement, so a lone reply does not end the exchange.
pub fn walk_replies(buf: &[u8], seq: u32, acked: bool, mut each: impl FnMut(u16, &[u8])) -> Progress {
    let mut at = 0usize;
    while let Some(len) = u32_at(buf, at).map(|l| l as usize) {
        let Some(msg) = at.checked_add(len).and_then(|end| buf.get(at..end)).filter(|_| len >= NLMSG_HDR_LEN) else {
            break;
        };
        let (Some(kind), Some(flags), Some(msg_seq)) = (u16_at(msg, 4), u16_at(msg, 6), u32_at(msg, 8)) else {
            break;
        };
        let payload = msg.get(NLMSG_HDR_LEN..).unwrap_or_default();
        if msg_seq == seq {
            match kind {
                NLMSG_DONE => return Progress::Done,
                NLMSG_ERROR => {
                    return match u32_at(payload, 0).map(|e| e as i32) {
                        Some(0) => Progress::Done,
                        Some(e) => Progress::Failed(e),
                        None => Progress::Failed(-libc::EPROTO),
                    }
                }
                _ => {
                    each(kind, payload);
                    if flags & NLM_F_MULTI == 0 && !acked {
                        return Progress::Done;
                    }
                }
            }
        }
        match at.checked_add(align4(len)) {
            Some(next) => at = next,
            None => break,
        }
    }
    Progress::More
}

/// A `NETLINK_ROUTE` (or, from `open_generic`, `NETLINK_GENERIC`) socket
/// that talks to the kernel only.
#[derive(Debug)]
pub struct Rtnetlink {
    fd: OwnedFd,
}

impl Rtnetlink {
    pub fn open() -> io::Result<Self> {
        Self::open_protocol(libc::NETLINK_ROUTE)
    }

    /// A generic-netlink socket: requests go to a family by its id (the
    /// message type), which the `nlctrl` family resolves from its name.
    pub fn open_generic() -> io::Result<Self> {
        Self::open_protocol(libc::NETLINK_GENERIC)
    }

    fn open_protocol(protocol: libc::c_int) -> io::Result<Self> {
        // SAFETY: socket(2) with constant arguments; the result is checked below.
        let raw = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, protocol) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new, valid descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let timeout =
            libc::timeval { tv_sec: REPLY_TIMEOUT.as_secs() as libc::time_t, tv_usec: 0 as libc::suseconds_t };
        // SAFETY: `timeout` is a valid timeval and the length given is its size.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { fd })
    }

    /// Sends one request and hands every message of the kernel's answer to
    /// `each` (type, payload). A refusal is the kernel's errno; no answer
    /// within two seconds is `TimedOut`/`WouldBlock`.
    pub fn request(&self, kind: u16, flags: u16, body: &[u8], mut each: impl FnMut(u16, &[u8])) -> io::Result<()> {
        static NEXT_SEQ: AtomicU32 = AtomicU32::new(1);
        let seq = NEXT_SEQ.fetch_add(1, Ordering::Relaxed);
        let msg = encode(kind, NLM_F_REQUEST | flags, seq, body);
        // SAFETY: an all-zero sockaddr_nl is valid (pid 0, groups 0 = the kernel).
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: `msg` is valid for its length; `kernel` is a valid sockaddr_nl of the size given.
        let sent = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&kernel as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: an all-zero sockaddr_nl is valid; recvfrom fills it.
            let mut from: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
            let mut from_len = std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t;
            // SAFETY: `buf` is writable for its length; `from`/`from_len` describe a valid sockaddr_nl.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&mut from as *mut libc::sockaddr_nl).cast(),
                    &mut from_len,
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            if from.nl_pid != 0 {
                continue; // only the kernel answers; anything else is not ours to believe
            }
            let got = buf.get(..n as usize).unwrap_or_default();
            match walk_replies(got, seq, flags & NLM_F_ACK != 0, &mut each) {
                Progress::More if n > 0 => {}
                Progress::More | Progress::Done => return Ok(()),
                Progress::Failed(e) => return Err(io::Error::from_raw_os_error(-e)),
            }
        }
    }
}

/// The index of `iface` in the calling thread's network namespace.
pub fn ifindex(iface: &str) -> io::Result<u32> {
    let name = std::ffi::CString::new(iface).map_err(|_| io::Error::other("interface name contains NUL"))?;
    // SAFETY: if_nametoindex reads a NUL-terminated string we own.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(index)
}

fn ip_from(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => Some(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(bytes).ok()?))),
        16 => Some(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(bytes).ok()?))),
        _ => None,
    }
}

fn family(ip: IpAddr) -> u8 {
    match ip {
        IpAddr::V4(_) => libc::AF_INET as u8,
        IpAddr::V6(_) => libc::AF_INET6 as u8,
    }
}

fn octets(ip: &IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// One entry of the kernel's neighbour table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Neighbor {
    pub ifindex: u32,
    pub ip: IpAddr,
    /// Known link-layer address (`None` while resolving or failed).
    pub mac: Option<MacAddr>,
    /// `NUD_*` bits.
    pub state: u16,
}

impl Neighbor {
    /// Has an address the kernel would send to now (not incomplete or failed).
    pub fn usable(&self) -> bool {
        self.mac.is_some() && self.state & (NUD_INCOMPLETE | NUD_FAILED) == 0
    }
}

/// Parses one `RTM_NEWNEIGH` payload (`ndmsg` + attributes).
pub fn parse_neighbor(payload: &[u8]) -> Option<Neighbor> {
    let ifindex = u32_at(payload, 4)?;
    let state = u16_at(payload, 8)?;
    let (mut ip, mut mac) = (None, None);
    for (kind, value) in attrs(payload.get(NDMSG_LEN..)?) {
        match kind {
            NDA_DST => ip = ip_from(value),
            NDA_LLADDR => mac = <[u8; 6]>::try_from(value).ok().map(MacAddr),
            _ => {}
        }
    }
    Some(Neighbor { ifindex, ip: ip?, mac, state })
}

/// Every neighbour entry of `ifindex`, usable or not.
pub fn dump_neighbors(nl: &Rtnetlink, ifindex: u32) -> io::Result<Vec<Neighbor>> {
    let mut ndmsg = [0u8; NDMSG_LEN];
    ndmsg[0] = libc::AF_UNSPEC as u8;
    let mut out = Vec::new();
    nl.request(RTM_GETNEIGH, NLM_F_DUMP, &ndmsg, |kind, payload| {
        if kind == RTM_NEWNEIGH {
            out.extend(parse_neighbor(payload).filter(|n| n.ifindex == ifindex));
        }
    })?;
    Ok(out)
}

/// The usable neighbours of `iface` in the calling thread's network namespace.
pub fn read_neighbors(iface: &str) -> io::Result<HashMap<IpAddr, MacAddr>> {
    let index = ifindex(iface)?;
    let nl = Rtnetlink::open()?;
    Ok(dump_neighbors(&nl, index)?.into_iter().filter(Neighbor::usable).filter_map(|n| Some((n.ip, n.mac?))).collect())
}

/// How the kernel would send to a destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// The outgoing interface.
    pub oif: u32,
    /// The router to hand packets to; `None`: the destination is on-link.
    pub via: Option<IpAddr>,
}

impl Route {
    /// Whose link-layer address packets to `dst` need.
    pub fn next_hop(&self, dst: IpAddr) -> IpAddr {
        self.via.unwrap_or(dst)
    }
}

/// Parses one `RTM_NEWROUTE` payload (`rtmsg` + attributes).
pub fn parse_route(payload: &[u8]) -> Option<Route> {
    let (mut oif, mut via) = (None, None);
    for (kind, value) in attrs(payload.get(RTMSG_LEN..)?) {
        match kind {
            RTA_OIF => oif = u32_at(value, 0),
            RTA_GATEWAY => via = ip_from(value),
            _ => {}
        }
    }
    Some(Route { oif: oif?, via })
}

/// The kernel's route to `dst` (`ip route get`), through interface `oif`
/// when given (`ip route get … oif`: as a socket bound to it is routed).
pub fn route_to(nl: &Rtnetlink, dst: IpAddr, oif: Option<u32>) -> io::Result<Route> {
    let mut body = vec![0u8; RTMSG_LEN];
    body[0] = family(dst);
    body[1] = if dst.is_ipv4() { 32 } else { 128 };
    push_attr(&mut body, RTA_DST, &octets(&dst));
    if let Some(oif) = oif {
        push_attr(&mut body, RTA_OIF, &oif.to_ne_bytes());
    }
    let mut route = None;
    nl.request(RTM_GETROUTE, 0, &body, |kind, payload| {
        if kind == RTM_NEWROUTE {
            route = route.or(parse_route(payload));
        }
    })?;
    route.ok_or_else(|| io::Error::other(format!("no route to {dst}")))
}

/// Adds (`add`) or removes the route to `prefix` through `ifindex` in the
/// main table. Adding never replaces a route someone else installed (that is
/// `AlreadyExists`); removing names the interface, so only ours goes.
pub fn interface_route(nl: &Rtnetlink, prefix: &IpPrefix, ifindex: u32, add: bool) -> io::Result<()> {
    const RT_TABLE_MAIN: u8 = 254;
    const RTPROT_STATIC: u8 = 4;
    const RT_SCOPE_LINK: u8 = 253;
    const RTN_UNICAST: u8 = 1;
    let addr = prefix.addr();
    let mut body = vec![0u8; RTMSG_LEN];
    body[0] = family(addr);
    body[1] = prefix.prefix_len();
    body[4] = RT_TABLE_MAIN;
    body[5] = RTPROT_STATIC;
    body[6] = RT_SCOPE_LINK;
    body[7] = RTN_UNICAST;
    push_attr(&mut body, RTA_DST, &octets(&addr));
    push_attr(&mut body, RTA_OIF, &ifindex.to_ne_bytes());
    if add {
        nl.request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL | NLM_F_ACK, &body, |_, _| {})
    } else {
        nl.request(RTM_DELROUTE, NLM_F_ACK, &body, |_, _| {})
    }
}

/// Asks the kernel to resolve `ip` on `ifindex` (ARP / neighbour
/// solicitation) without queueing any packet of ours behind it: an entry is
/// created if needed and marked in use (`NTF_USE`), which starts resolution.
pub fn solicit(nl: &Rtnetlink, ifindex: u32, ip: IpAddr) -> io::Result<()> {
    let mut body = vec![0u8; NDMSG_LEN];
    body[0] = family(ip);
    body[4..8].copy_from_slice(&ifindex.to_ne_bytes());
    body[10] = NTF_USE;
    push_attr(&mut body, NDA_DST, &octets(&ip));
    nl.request(RTM_NEWNEIGH, NLM_F_CREATE | NLM_F_REPLACE | NLM_F_ACK, &body, |_, _| {})
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEQ: u32 = 41;

    /// One RTM_NEWNEIGH message as the kernel writes it.
    fn neigh(ifindex: u32, state: u16, dst: &[u8], mac: Option<[u8; 6]>) -> Vec<u8> {
        let mut body = vec![0u8; NDMSG_LEN];
        body[0] = if dst.len() == 4 { 2 } else { 10 };
        body[4..8].copy_from_slice(&ifindex.to_ne_bytes());
        body[8..10].copy_from_slice(&state.to_ne_bytes());
        push_attr(&mut body, NDA_DST, dst);
        if let Some(m) = mac {
            push_attr(&mut body, NDA_LLADDR, &m);
        }
        encode(RTM_NEWNEIGH, NLM_F_MULTI, SEQ, &body)
    }

    fn done(seq: u32) -> Vec<u8> {
        encode(NLMSG_DONE, NLM_F_MULTI, seq, &[0; 4])
    }

    fn collect(buf: &[u8], seq: u32) -> (Vec<Neighbor>, Progress) {
        let mut v = Vec::new();
        let p = walk_replies(buf, seq, false, |kind, payload| {
            if kind == RTM_NEWNEIGH {
                v.extend(parse_neighbor(payload));
            }
        });
        (v, p)
    }

    #[test]
    fn parses_a_neighbor_dump() {
        let mac = [0x7a, 0x1b, 0x2c, 0x3d, 0x4e, 0x5f];
        let v6: [u8; 16] = "fe80::1".parse::<Ipv6Addr>().unwrap().octets();
        let mut buf = Vec::new();
        buf.extend(neigh(7, 0x02, &[10, 211, 0, 2], Some(mac))); // REACHABLE
        buf.extend(neigh(7, 0x04, &v6, Some([1; 6]))); // STALE, IPv6
        buf.extend(neigh(7, NUD_FAILED, &[10, 211, 0, 9], Some([2; 6])));
        buf.extend(neigh(7, NUD_INCOMPLETE, &[10, 211, 0, 8], None));
        let (got, progress) = collect(&buf, SEQ);
        assert_eq!(progress, Progress::More, "a dump goes on until NLMSG_DONE");
        assert_eq!(got.len(), 4);
        let usable: Vec<_> = got.iter().filter(|n| n.usable()).collect();
        assert_eq!(usable.len(), 2);
        assert_eq!(usable[0].mac, Some(MacAddr(mac)));
        assert_eq!(usable[1].ip, IpAddr::from(v6));
        assert_eq!(collect(&done(SEQ), SEQ).1, Progress::Done);
    }

    #[test]
    fn answers_to_another_request_are_ignored_and_errors_reported() {
        let mut stale = neigh(7, 0x02, &[10, 0, 0, 1], Some([9; 6]));
        stale.extend(done(SEQ));
        let (got, progress) = collect(&stale, SEQ + 1);
        assert!(got.is_empty() && progress == Progress::More, "another sequence number: not ours");
        let mut err = encode(NLMSG_ERROR, 0, SEQ, &[0; 20]);
        err[NLMSG_HDR_LEN..NLMSG_HDR_LEN + 4].copy_from_slice(&(-libc::EEXIST).to_ne_bytes());
        assert_eq!(walk_replies(&err, SEQ, true, |_, _| {}), Progress::Failed(-libc::EEXIST));
        let ack = encode(NLMSG_ERROR, 0, SEQ, &[0; 20]);
        assert_eq!(walk_replies(&ack, SEQ, true, |_, _| {}), Progress::Done);
        // A lone (non-multipart) reply ends a plain request.
        let mut route = vec![0u8; RTMSG_LEN];
        push_attr(&mut route, RTA_OIF, &3u32.to_ne_bytes());
        push_attr(&mut route, RTA_GATEWAY, &[10, 0, 0, 1]);
        let msg = encode(RTM_NEWROUTE, 0, SEQ, &route);
        let mut got = None;
        assert_eq!(walk_replies(&msg, SEQ, false, |_, p| got = parse_route(p)), Progress::Done);
        let r = got.unwrap();
        assert_eq!(r, Route { oif: 3, via: Some("10.0.0.1".parse().unwrap()) });
        assert_eq!(r.next_hop("192.0.2.1".parse().unwrap()), "10.0.0.1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn malformed_input_never_panics() {
        let good = neigh(7, 0x02, &[10, 0, 0, 1], Some([9; 6]));
        for len in 0..good.len() {
            let _ = collect(&good[..len], SEQ);
            let _ = parse_neighbor(&good[NLMSG_HDR_LEN.min(len)..len]);
            let _ = parse_route(&good[..len]);
        }
        let mut bad_len = good.clone();
        bad_len[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert!(collect(&bad_len, SEQ).0.is_empty());
        let mut bad_attr = good.clone();
        bad_attr[NLMSG_HDR_LEN + NDMSG_LEN] = 200; // attribute longer than the message
        assert!(collect(&bad_attr, SEQ).0.iter().all(|n| n.mac.is_none()));
        let mut huge = good;
        huge[0..4].copy_from_slice(&u32::MAX.to_ne_bytes());
        assert!(collect(&huge, SEQ).0.is_empty());
    }

    #[test]
    fn live_exchanges_with_the_kernel() {
        // Loopback has no neighbours, but the exchange must work.
        assert!(read_neighbors("lo").is_ok());
        assert!(read_neighbors("no-such-iface0").is_err());
        let nl = Rtnetlink::open().unwrap();
        let r = route_to(&nl, "127.0.0.1".parse().unwrap(), None).unwrap();
        assert_eq!(r.oif, ifindex("lo").unwrap());
        assert_eq!(r.via, None);
    }
}
