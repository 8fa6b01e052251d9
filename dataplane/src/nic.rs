//! What a NIC supports, as the kernel reports it, for `wgxdp check`: the XDP
//! features of the generic-netlink `netdev` family (Linux 6.3+), the driver
//! (sysfs, else `ETHTOOL_GDRVINFO`), the queue counts (`ETHTOOL_GCHANNELS`
//! and sysfs), the MTU, and the MTU arithmetic of sealed packets. Reads only:
//! nothing here changes an interface. Every parser takes arbitrary bytes and
//! never panics.

use crate::frame::udp_headers_len;
use crate::netlink::{self, attrs, push_attr, u16_at, u32_at, u64_at, Rtnetlink};
use crate::noise::session::sealed_len;
use crate::wire::ETHERNET_HEADER_LEN;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// linux/genetlink.h: `struct genlmsghdr` (cmd, version, reserved u16).
const GENL_HDRLEN: usize = 4;
/// linux/genetlink.h: the `nlctrl` family's fixed id and what we ask it.
const GENL_ID_CTRL: u16 = libc::GENL_ID_CTRL as u16;
const CTRL_CMD_GETFAMILY: u8 = libc::CTRL_CMD_GETFAMILY as u8;
const CTRL_ATTR_FAMILY_ID: u16 = libc::CTRL_ATTR_FAMILY_ID as u16;
const CTRL_ATTR_FAMILY_NAME: u16 = libc::CTRL_ATTR_FAMILY_NAME as u16;

/// linux/netdev.h (generated from Documentation/netlink/specs/netdev.yaml).
mod netdev {
    /// `NETDEV_FAMILY_NAME`.
    pub const FAMILY_NAME: &str = "netdev";
    /// `NETDEV_FAMILY_VERSION`.
    pub const FAMILY_VERSION: u8 = 1;
    /// `NETDEV_CMD_DEV_GET`.
    pub const CMD_DEV_GET: u8 = 1;
    /// `NETDEV_A_DEV_IFINDEX` (u32).
    pub const A_DEV_IFINDEX: u16 = 1;
    /// `NETDEV_A_DEV_XDP_FEATURES` (u64, `enum netdev_xdp_act` bits).
    pub const A_DEV_XDP_FEATURES: u16 = 3;
    /// `NETDEV_A_DEV_XDP_ZC_MAX_SEGS` (u32, Linux 6.6+).
    pub const A_DEV_XDP_ZC_MAX_SEGS: u16 = 4;
}

/// linux/ethtool.h and linux/sockios.h.
mod ethtool {
    pub const SIOCETHTOOL: libc::c_ulong = 0x8946;
    pub const GDRVINFO: u32 = 0x0000_0003;
    pub const GCHANNELS: u32 = 0x0000_003c;

    /// `struct ethtool_drvinfo`.
    #[repr(C)]
    pub struct DrvInfo {
        pub cmd: u32,
        pub driver: [u8; 32],
        pub version: [u8; 32],
        pub fw_version: [u8; 32],
        pub bus_info: [u8; 32],
        pub erom_version: [u8; 32],
        pub reserved2: [u8; 12],
        pub n_priv_flags: u32,
        pub n_stats: u32,
        pub testinfo_len: u32,
        pub eedump_len: u32,
        pub regdump_len: u32,
    }

    /// `struct ethtool_channels`.
    #[repr(C)]
    #[derive(Default)]
    pub struct Channels {
        pub cmd: u32,
        pub max_rx: u32,
        pub max_tx: u32,
        pub max_other: u32,
        pub max_combined: u32,
        pub rx_count: u32,
        pub tx_count: u32,
        pub other_count: u32,
        pub combined_count: u32,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NicError {
    #[error("the kernel has no netdev netlink family (it arrived in Linux 6.3); cannot tell")]
    NoNetdevFamily,
    #[error("interface `{0}` does not exist (in this network namespace)")]
    NoSuchInterface(String),
    #[error("{what} failed: {source}")]
    Io { what: &'static str, source: io::Error },
    #[error("the kernel's answer to {0} lacked the attributes it should carry")]
    Incomplete(&'static str),
}

/// The XDP features a device reports (`enum netdev_xdp_act`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XdpFeatures(pub u64);

impl XdpFeatures {
    /// XDP_ABORTED, XDP_DROP, XDP_PASS and XDP_TX in the driver.
    pub const BASIC: u64 = 1;
    /// XDP_REDIRECT (what steering into AF_XDP sockets needs).
    pub const REDIRECT: u64 = 2;
    /// The driver implements `ndo_xdp_xmit` (it takes redirected frames).
    pub const NDO_XMIT: u64 = 4;
    /// AF_XDP zero-copy.
    pub const XSK_ZEROCOPY: u64 = 8;
    /// Offload to the NIC.
    pub const HW_OFFLOAD: u64 = 16;
    /// Multi-buffer (scatter-gather) frames on receive.
    pub const RX_SG: u64 = 32;
    /// Multi-buffer frames through `ndo_xdp_xmit`.
    pub const NDO_XMIT_SG: u64 = 64;

    /// Every bit with the name the kernel's spec gives it, in bit order.
    pub const NAMES: [(u64, &'static str); 7] = [
        (Self::BASIC, "basic"),
        (Self::REDIRECT, "redirect"),
        (Self::NDO_XMIT, "ndo-xmit"),
        (Self::XSK_ZEROCOPY, "xsk-zerocopy"),
        (Self::HW_OFFLOAD, "hw-offload"),
        (Self::RX_SG, "rx-sg"),
        (Self::NDO_XMIT_SG, "ndo-xmit-sg"),
    ];

    pub fn has(self, bit: u64) -> bool {
        self.0 & bit == bit
    }

    /// The driver runs XDP itself and redirects to sockets: native mode works.
    pub fn native_redirect(self) -> bool {
        self.has(Self::BASIC | Self::REDIRECT)
    }

    /// The names of the bits set, in bit order; bits this version does not
    /// know appear as `bit N`.
    pub fn names(self) -> Vec<String> {
        (0..64)
            .map(|i| 1u64 << i)
            .filter(|bit| self.0 & bit != 0)
            .map(|bit| match Self::NAMES.iter().find(|(b, _)| *b == bit) {
                Some((_, name)) => (*name).to_owned(),
                None => format!("bit {}", bit.trailing_zeros()),
            })
            .collect()
    }
}

impl core::fmt::Display for XdpFeatures {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let names = self.names();
        if names.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&names.join(", "))
        }
    }
}

/// One device as `NETDEV_CMD_DEV_GET` describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NetdevXdp {
    pub ifindex: u32,
    pub features: XdpFeatures,
    /// Fragments a zero-copy AF_XDP frame may span (`None`: the kernel does
    /// not say; before 6.6).
    pub zc_max_segs: Option<u32>,
}

/// A generic-netlink request body: the `genlmsghdr`, then `attributes`.
fn genl_body(cmd: u8, version: u8, attributes: &[u8]) -> Vec<u8> {
    let mut body = vec![0u8; GENL_HDRLEN];
    body[0] = cmd;
    body[1] = version;
    body.extend_from_slice(attributes);
    body
}

/// The attributes behind the `genlmsghdr` of a reply payload.
fn genl_attrs(payload: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    attrs(payload.get(GENL_HDRLEN..).unwrap_or_default())
}

/// `CTRL_ATTR_FAMILY_ID` of an `nlctrl` reply (`CTRL_CMD_NEWFAMILY`).
pub fn parse_family_id(payload: &[u8]) -> Option<u16> {
    genl_attrs(payload).find(|(kind, _)| *kind == CTRL_ATTR_FAMILY_ID).and_then(|(_, v)| u16_at(v, 0))
}

/// The device of a `netdev` reply: its index and XDP features are required.
pub fn parse_netdev_dev(payload: &[u8]) -> Option<NetdevXdp> {
    let (mut ifindex, mut features, mut zc_max_segs) = (None, None, None);
    for (kind, value) in genl_attrs(payload) {
        match kind {
            netdev::A_DEV_IFINDEX => ifindex = u32_at(value, 0),
            netdev::A_DEV_XDP_FEATURES => features = u64_at(value, 0).map(XdpFeatures),
            netdev::A_DEV_XDP_ZC_MAX_SEGS => zc_max_segs = u32_at(value, 0),
            _ => {}
        }
    }
    Some(NetdevXdp { ifindex: ifindex?, features: features?, zc_max_segs })
}

/// The id of the generic-netlink family `name` (`None`: this kernel has none).
fn family_id(nl: &Rtnetlink, name: &str) -> Result<Option<u16>, NicError> {
    let mut name_z = name.as_bytes().to_vec();
    name_z.push(0);
    let mut a = Vec::new();
    push_attr(&mut a, CTRL_ATTR_FAMILY_NAME, &name_z);
    let mut id = None;
    match nl.request(GENL_ID_CTRL, 0, &genl_body(CTRL_CMD_GETFAMILY, 1, &a), |_, payload| {
        id = id.or(parse_family_id(payload));
    }) {
        Ok(()) => id.map(Some).ok_or(NicError::Incomplete("CTRL_CMD_GETFAMILY")),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
        Err(source) => Err(NicError::Io { what: "resolving the netdev netlink family", source }),
    }
}

/// The XDP features of interface `ifindex` (`NETDEV_CMD_DEV_GET`).
pub fn query_xdp(ifindex: u32) -> Result<NetdevXdp, NicError> {
    let io_err = |what| move |source| NicError::Io { what, source };
    let nl = Rtnetlink::open_generic().map_err(io_err("opening a generic-netlink socket"))?;
    let family = family_id(&nl, netdev::FAMILY_NAME)?.ok_or(NicError::NoNetdevFamily)?;
    let mut a = Vec::new();
    push_attr(&mut a, netdev::A_DEV_IFINDEX, &ifindex.to_ne_bytes());
    let mut dev = None;
    nl.request(family, 0, &genl_body(netdev::CMD_DEV_GET, netdev::FAMILY_VERSION, &a), |_, payload| {
        dev = dev.or(parse_netdev_dev(payload).filter(|d| d.ifindex == ifindex));
    })
    .map_err(io_err("NETDEV_CMD_DEV_GET"))?;
    dev.ok_or(NicError::Incomplete("NETDEV_CMD_DEV_GET"))
}

/// The index of `iface` in the calling thread's network namespace.
pub fn ifindex(iface: &str) -> Result<u32, NicError> {
    netlink::ifindex(iface).map_err(|_| NicError::NoSuchInterface(iface.to_owned()))
}

/// What the driver says about itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DriverInfo {
    pub driver: String,
    pub version: String,
    pub firmware: String,
    /// PCI address and the like (empty for virtual devices).
    pub bus: String,
}

/// The text of a NUL-padded C string field.
fn c_field(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).trim().to_owned()
}

/// A socket to issue ethtool ioctls through.
fn ioctl_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; checked below.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a new, valid descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// `SIOCETHTOOL` on `iface` with the command structure `data` (whose first
/// field is the command).
///
/// # Safety
/// `T` must be the `#[repr(C)]` structure the kernel reads and writes for
/// the command stored in `data`'s first field.
unsafe fn ethtool_ioctl<T>(iface: &str, data: &mut T) -> io::Result<()> {
    let sock = ioctl_socket()?;
    // SAFETY: an all-zero ifreq is valid (empty name, null data pointer).
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let name = iface.as_bytes();
    if name.is_empty() || name.len() >= req.ifr_name.len() || name.contains(&0) {
        return Err(io::Error::from_raw_os_error(libc::ENODEV));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(name) {
        *dst = *src as libc::c_char;
    }
    req.ifr_ifru.ifru_data = (data as *mut T).cast();
    // `req` is a valid ifreq whose data pointer points to `data`.
    // SAFETY: the caller guarantees `data` is the structure this command
    // uses; both outlive the call.
    if unsafe { libc::ioctl(sock.as_raw_fd(), ethtool::SIOCETHTOOL as _, &mut req as *mut libc::ifreq) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The driver of `iface`: the name sysfs links (`device/driver`), else the
/// one `ETHTOOL_GDRVINFO` reports (virtual devices such as veth have no
/// device link); version, firmware and bus from `ETHTOOL_GDRVINFO`.
pub fn driver(iface: &str) -> Result<DriverInfo, NicError> {
    let sysfs = std::fs::read_link(format!("/sys/class/net/{iface}/device/driver"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
    let mut info = ethtool::DrvInfo {
        cmd: ethtool::GDRVINFO,
        driver: [0; 32],
        version: [0; 32],
        fw_version: [0; 32],
        bus_info: [0; 32],
        erom_version: [0; 32],
        reserved2: [0; 12],
        n_priv_flags: 0,
        n_stats: 0,
        testinfo_len: 0,
        eedump_len: 0,
        regdump_len: 0,
    };
    // SAFETY: `info` is `struct ethtool_drvinfo` with cmd ETHTOOL_GDRVINFO.
    let ioctl = unsafe { ethtool_ioctl(iface, &mut info) };
    match (sysfs, ioctl) {
        (sysfs, Ok(())) => Ok(DriverInfo {
            driver: sysfs.unwrap_or_else(|| c_field(&info.driver)),
            version: c_field(&info.version),
            firmware: c_field(&info.fw_version),
            bus: c_field(&info.bus_info),
        }),
        (Some(driver), Err(_)) => Ok(DriverInfo { driver, ..DriverInfo::default() }),
        (None, Err(e)) if e.raw_os_error() == Some(libc::ENODEV) => Err(NicError::NoSuchInterface(iface.to_owned())),
        (None, Err(source)) => Err(NicError::Io { what: "ETHTOOL_GDRVINFO", source }),
    }
}

/// The channels (queues) of a NIC, as `ethtool -l` shows them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Channels {
    pub max_rx: u32,
    pub max_tx: u32,
    pub max_combined: u32,
    pub rx: u32,
    pub tx: u32,
    pub combined: u32,
}

/// `ETHTOOL_GCHANNELS` of `iface`; `None` if the driver does not report
/// channels.
pub fn channels(iface: &str) -> Result<Option<Channels>, NicError> {
    let mut c = ethtool::Channels { cmd: ethtool::GCHANNELS, ..Default::default() };
    // SAFETY: `c` is `struct ethtool_channels` with cmd ETHTOOL_GCHANNELS.
    match unsafe { ethtool_ioctl(iface, &mut c) } {
        Ok(()) => Ok(Some(Channels {
            max_rx: c.max_rx,
            max_tx: c.max_tx,
            max_combined: c.max_combined,
            rx: c.rx_count,
            tx: c.tx_count,
            combined: c.combined_count,
        })),
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Err(NicError::NoSuchInterface(iface.to_owned())),
        Err(source) => Err(NicError::Io { what: "ETHTOOL_GCHANNELS", source }),
    }
}

/// Number of rx queues the kernel gives `iface` (`/sys/class/net/IF/queues/rx-*`;
/// at least 1): the gateway binds one AF_XDP socket per queue it serves.
pub fn rx_queues(iface: &str) -> u32 {
    std::fs::read_dir(format!("/sys/class/net/{iface}/queues"))
        .map(|d| d.filter_map(Result::ok).filter(|e| e.file_name().to_string_lossy().starts_with("rx-")).count() as u32)
        .unwrap_or(1)
        .max(1)
}

fn sysfs_text(iface: &str, attr: &'static str) -> Result<String, NicError> {
    std::fs::read_to_string(format!("/sys/class/net/{iface}/{attr}")).map(|t| t.trim().to_owned()).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound {
            NicError::NoSuchInterface(iface.to_owned())
        } else {
            NicError::Io { what: attr, source }
        }
    })
}

/// The MTU of `iface`.
pub fn mtu(iface: &str) -> Result<u32, NicError> {
    let text = sysfs_text(iface, "mtu")?;
    text.parse().map_err(|_| NicError::Io { what: "mtu", source: io::Error::other(format!("unexpected `{text}`")) })
}

/// Whether a link is up, as the kernel has it now (the flags and the
/// carrier; `operstate` follows them only after the link-watch delay).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkState {
    /// Set up by the administrator (`IFF_UP`).
    pub admin_up: bool,
    /// A carrier (cable, a veth peer that is up); `None` while down.
    pub carrier: Option<bool>,
}

/// The link state of `iface` (`/sys/class/net/IF/flags` and `carrier`).
pub fn link_state(iface: &str) -> Result<LinkState, NicError> {
    let flags = sysfs_text(iface, "flags")?;
    let flags = u32::from_str_radix(flags.trim_start_matches("0x"), 16)
        .map_err(|_| NicError::Io { what: "flags", source: io::Error::other(format!("unexpected `{flags}`")) })?;
    let admin_up = flags & libc::IFF_UP as u32 != 0;
    // The kernel refuses to read the carrier of a link that is down.
    let carrier = sysfs_text(iface, "carrier").ok().map(|c| c == "1");
    Ok(LinkState { admin_up, carrier: carrier.filter(|_| admin_up) })
}

/// The outer packet (IP header onward: what the WAN MTU limits) that carries
/// an inner packet of `inner` bytes: outer IP and UDP headers, the transport
/// header, the inner packet zero-padded to a multiple of 16 (this data plane
/// always pads, whitepaper section 5.4.6) and the tag.
pub fn sealed_ip_len(inner: usize, ipv6_outer: bool) -> usize {
    udp_headers_len(ipv6_outer) - ETHERNET_HEADER_LEN + sealed_len(inner)
}

/// The WAN MTU a full-size tunnel packet (`tunnel_mtu` bytes inside) needs,
/// before padding: `tunnel_mtu + 80` with IPv6 outside, `+ 60` with IPv4.
pub fn wan_mtu_unpadded(tunnel_mtu: usize, ipv6_outer: bool) -> usize {
    sealed_ip_len(0, ipv6_outer) + tunnel_mtu
}

/// The largest `tunnel_mtu` whose padded packets fit a WAN MTU of `wan_mtu`.
pub fn max_tunnel_mtu_for_wan(wan_mtu: usize, ipv6_outer: bool) -> usize {
    wan_mtu.saturating_sub(sealed_ip_len(0, ipv6_outer)) / 16 * 16
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netlink::{encode, walk_replies, Progress, NLMSG_HDR_LEN};

    /// `CTRL_CMD_NEWFAMILY` answering `CTRL_CMD_GETFAMILY "netdev"` (seq 7),
    /// captured from Linux 6.18: family id 20, version 1, its operations and
    /// the `mgmt` and `page-pool` multicast groups.
    const CAPTURED_FAMILY_REPLY: [&str; 6] = [
        "1c0100001000000007000000e15d0000010200000b0002006e6574646576000006000100140000000800030001000000",
        "08000400000000000800050000000000a4000600140001000800010001000000080002000e0000001400020008000100",
        "05000000080002000e00000014000300080001000a000000080002000e00000014000400080001000b00000008000200",
        "0e00000014000500080001000c000000080002000c00000014000600080001000d000000080002000b00000014000700",
        "080001000e000000080002000b00000014000800080001000f000000080002000a000000380007001800010008000200",
        "04000000090001006d676d74000000001c00020008000200050000000e000100706167652d706f6f6c000000",
    ];

    /// `NETDEV_CMD_DEV_GET` for a veth (ifindex 8, seq 9), captured from
    /// Linux 6.18: XDP features 0x23 (basic, redirect, rx-sg), then
    /// attributes 5 (rx metadata features) and 6 (xsk features) we do not
    /// read; no zero-copy segment count (the kernel sends it only with
    /// xsk-zerocopy).
    const CAPTURED_VETH_REPLY: [&str; 2] = [
        "400000001400000009000000e15d00000101000008000100080000000c00030023000000000000000c00050007000000",
        "000000000c0006000000000000000000",
    ];

    fn unhex(parts: &[&str]) -> Vec<u8> {
        let hex: String = parts.concat();
        (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect()
    }

    /// A hand-built `NETDEV_CMD_DEV_GET` answer for ifindex 5 as a zero-copy
    /// driver would send it: features 0x2f (basic, redirect, ndo-xmit,
    /// xsk-zerocopy, rx-sg), zero-copy max segments 1.
    const DEV_REPLY: [u8; 48] = [
        48, 0, 0, 0, // nlmsg_len
        0x18, 0, // the netdev family
        0, 0, 9, 0, 0, 0, 0, 0, 0, 0, // flags, seq 9, pid
        1, 1, 0, 0, // genlmsghdr: NETDEV_CMD_DEV_GET, version 1
        8, 0, 1, 0, 5, 0, 0, 0, // NETDEV_A_DEV_IFINDEX 5
        12, 0, 3, 0, 0x2f, 0, 0, 0, 0, 0, 0, 0, // NETDEV_A_DEV_XDP_FEATURES (u64)
        8, 0, 4, 0, 1, 0, 0, 0, // NETDEV_A_DEV_XDP_ZC_MAX_SEGS 1
    ];

    fn payload_of(msg: &[u8], seq: u32) -> Vec<u8> {
        let mut out = Vec::new();
        assert_eq!(walk_replies(msg, seq, false, |_, p| out = p.to_vec()), Progress::Done);
        out
    }

    #[test]
    fn the_feature_bits_carry_the_kernels_names() {
        // Values and names from linux/netdev.h `enum netdev_xdp_act`.
        let all: Vec<(u64, &str)> = XdpFeatures::NAMES.to_vec();
        assert_eq!(
            all,
            [
                (1, "basic"),
                (2, "redirect"),
                (4, "ndo-xmit"),
                (8, "xsk-zerocopy"),
                (16, "hw-offload"),
                (32, "rx-sg"),
                (64, "ndo-xmit-sg")
            ]
        );
        assert_eq!(
            XdpFeatures(0x7f).to_string(),
            "basic, redirect, ndo-xmit, xsk-zerocopy, hw-offload, rx-sg, ndo-xmit-sg"
        );
        assert_eq!(XdpFeatures(0).to_string(), "none");
        assert_eq!(XdpFeatures(0x27).to_string(), "basic, redirect, ndo-xmit, rx-sg");
        assert_eq!(XdpFeatures(0x201).names(), ["basic", "bit 9"], "unknown bits are shown, not dropped");
        assert!(XdpFeatures(0x3).native_redirect());
        assert!(!XdpFeatures(0x1).native_redirect());
        assert!(XdpFeatures(0x0b).has(XdpFeatures::XSK_ZEROCOPY));
    }

    #[test]
    fn decodes_the_kernels_family_and_device_replies() {
        let family = unhex(&CAPTURED_FAMILY_REPLY);
        assert_eq!(family.len(), 284);
        assert_eq!(parse_family_id(&payload_of(&family, 7)), Some(20));
        let veth = unhex(&CAPTURED_VETH_REPLY);
        let dev = parse_netdev_dev(&payload_of(&veth, 9)).unwrap();
        assert_eq!(dev, NetdevXdp { ifindex: 8, features: XdpFeatures(0x23), zc_max_segs: None });
        assert_eq!(dev.features.to_string(), "basic, redirect, rx-sg");
        // A zero-copy driver's answer carries the segment count.
        let dev = parse_netdev_dev(&payload_of(&DEV_REPLY, 9)).unwrap();
        assert_eq!(dev, NetdevXdp { ifindex: 5, features: XdpFeatures(0x2f), zc_max_segs: Some(1) });
        // A reply to another request is not ours.
        let mut out = None;
        walk_replies(&veth, 10, false, |_, p| out = parse_netdev_dev(p));
        assert_eq!(out, None);
    }

    #[test]
    fn requests_are_built_as_the_kernel_expects() {
        let mut a = Vec::new();
        push_attr(&mut a, CTRL_ATTR_FAMILY_NAME, b"netdev\0");
        let msg = encode(GENL_ID_CTRL, netlink::NLM_F_REQUEST, 7, &genl_body(CTRL_CMD_GETFAMILY, 1, &a));
        let expected: [u8; 32] = [
            32, 0, 0, 0, 0x10, 0, 1, 0, 7, 0, 0, 0, 0, 0, 0, 0, // header
            3, 1, 0, 0, // CTRL_CMD_GETFAMILY, version 1
            11, 0, 2, 0, b'n', b'e', b't', b'd', b'e', b'v', 0, 0,
        ];
        assert_eq!(msg, expected);
    }

    #[test]
    fn truncated_or_garbled_replies_never_panic() {
        for len in 0..DEV_REPLY.len() {
            let cut = &DEV_REPLY[NLMSG_HDR_LEN.min(len)..len];
            let _ = parse_netdev_dev(cut);
            let _ = parse_family_id(cut);
        }
        // Without the features attribute the device is not described.
        let mut no_features = DEV_REPLY[NLMSG_HDR_LEN..].to_vec();
        no_features[14] = 99; // the features attribute's type
        assert_eq!(parse_netdev_dev(&no_features), None);
        let mut short_value = DEV_REPLY[NLMSG_HDR_LEN..].to_vec();
        short_value[12] = 8; // the u64 attribute claims 4 bytes of payload
        assert_eq!(parse_netdev_dev(&short_value), None);
    }

    #[test]
    fn mtu_arithmetic() {
        // 1420 is not a multiple of 16: padding adds 4 bytes.
        assert_eq!(sealed_ip_len(1420, false), 20 + 8 + 16 + 1424 + 16);
        assert_eq!(sealed_ip_len(1420, true), 1504);
        assert_eq!(wan_mtu_unpadded(1420, true), 1500);
        assert_eq!(wan_mtu_unpadded(1420, false), 1480);
        assert_eq!(sealed_ip_len(1408, true), 1488);
        assert_eq!(max_tunnel_mtu_for_wan(1500, true), 1408);
        assert_eq!(max_tunnel_mtu_for_wan(1500, false), 1440);
        assert_eq!(max_tunnel_mtu_for_wan(9000, true), 8912);
        assert_eq!(max_tunnel_mtu_for_wan(40, true), 0);
        for mtu in [1280usize, 1420, 1440, 8912] {
            for v6 in [false, true] {
                let wan = sealed_ip_len(mtu, v6);
                assert_eq!(max_tunnel_mtu_for_wan(wan, v6), mtu.div_ceil(16) * 16, "{mtu} {v6}");
                assert!(sealed_ip_len(max_tunnel_mtu_for_wan(wan, v6), v6) <= wan);
                assert!(sealed_ip_len(max_tunnel_mtu_for_wan(wan, v6) + 16, v6) > wan);
            }
        }
    }

    #[test]
    fn live_queries_of_loopback() {
        let lo = ifindex("lo").unwrap();
        match query_xdp(lo) {
            Ok(dev) => assert_eq!(dev.ifindex, lo),
            Err(NicError::NoNetdevFamily) => {}
            Err(e) => panic!("{e}"),
        }
        assert!(matches!(ifindex("no-such-if0"), Err(NicError::NoSuchInterface(_))));
        assert!(mtu("lo").unwrap() >= 1280);
        assert!(rx_queues("lo") >= 1);
        assert!(matches!(mtu("no-such-if0"), Err(NicError::NoSuchInterface(_))));
        assert!(matches!(driver("no-such-if0"), Err(NicError::NoSuchInterface(_))));
        assert!(channels("lo").is_ok());
        assert!(link_state("lo").unwrap().admin_up);
        assert!(matches!(link_state("no-such-if0"), Err(NicError::NoSuchInterface(_))));
    }
}
