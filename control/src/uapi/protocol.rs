//! The cross-platform userspace configuration protocol that `wg(8)` speaks
//! over `/var/run/wireguard/<name>.sock` (wireguard.com/xplatform): the text
//! of `get=1` answers and the parsing of `set=1` requests. I/O-free: the
//! server hands it whole requests.
//!
//! A request is `get=1\n\n` or `set=1\n` followed by `key=value` lines and an
//! empty line; every answer ends `errno=N\n\n` (0, or a negative errno).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};
use wgxdp_dataplane::noise::{PresharedKey, PublicKey};
use wgxdp_dataplane::table::IpPrefix;
use zeroize::Zeroizing;

/// Errno values the protocol answers with (negated on the wire).
pub mod errno {
    pub const EPERM: i32 = 1;
    pub const ENOENT: i32 = 2;
    pub const EIO: i32 = 5;
    pub const EEXIST: i32 = 17;
    pub const EINVAL: i32 = 22;
    pub const EPROTO: i32 = 71;
    pub const EMSGSIZE: i32 = 90;
    pub const EADDRINUSE: i32 = 98;
}

/// Most allowed IPs one peer of a request may list (a gateway routes at most
/// 64 networks; the configuration file's peers may have more).
pub const MAX_ALLOWED_IPS: usize = 1024;

/// The largest `set` request accepted (a few thousand peers); a longer one is
/// answered `-EMSGSIZE` and the connection closed.
pub const MAX_REQUEST_BYTES: usize = 4 << 20;

/// A refused request: the errno to answer and, for the log, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UapiError {
    /// Positive; the answer carries `errno=-{errno}`.
    pub errno: i32,
    pub message: String,
}

impl UapiError {
    pub fn new(errno: i32, message: impl Into<String>) -> Self {
        Self { errno, message: message.into() }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(errno::EINVAL, message)
    }

    fn protocol(message: impl Into<String>) -> Self {
        Self::new(errno::EPROTO, message)
    }
}

impl std::fmt::Display for UapiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (errno -{})", self.message, self.errno)
    }
}

/// The answer's last line and the empty line after it.
pub fn status_line(result: &Result<(), UapiError>) -> String {
    match result {
        Ok(()) => "errno=0\n\n".to_owned(),
        Err(e) => format!("errno=-{}\n\n", e.errno),
    }
}

/// One peer in a `set` request, in the order its lines came.
#[derive(Clone, PartialEq, Eq)]
pub struct PeerChange {
    pub public_key: PublicKey,
    pub remove: bool,
    pub update_only: bool,
    pub preshared_key: Option<PresharedKey>,
    pub endpoint: Option<SocketAddr>,
    pub persistent_keepalive: Option<u16>,
    /// `replace_allowed_ips=true` came: the peer's allowed IPs become
    /// `allowed_ips` (those listed after the last such line).
    pub replace_allowed_ips: bool,
    pub allowed_ips: Vec<IpPrefix>,
}

impl std::fmt::Debug for PeerChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerChange")
            .field("public_key", &self.public_key)
            .field("remove", &self.remove)
            .field("update_only", &self.update_only)
            .field("preshared_key", &self.preshared_key.as_ref().map(|_| "<redacted>"))
            .field("endpoint", &self.endpoint)
            .field("persistent_keepalive", &self.persistent_keepalive)
            .field("replace_allowed_ips", &self.replace_allowed_ips)
            .field("allowed_ips", &self.allowed_ips)
            .finish()
    }
}

impl PeerChange {
    fn new(public_key: PublicKey) -> Self {
        Self {
            public_key,
            remove: false,
            update_only: false,
            preshared_key: None,
            endpoint: None,
            persistent_keepalive: None,
            replace_allowed_ips: false,
            allowed_ips: Vec::new(),
        }
    }
}

/// A parsed `set=1` request.
#[derive(Default, Clone, PartialEq, Eq)]
pub struct SetRequest {
    pub private_key: Option<Zeroizing<[u8; 32]>>,
    pub listen_port: Option<u16>,
    pub fwmark: Option<u32>,
    pub replace_peers: bool,
    pub peers: Vec<PeerChange>,
}

impl std::fmt::Debug for SetRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SetRequest")
            .field("private_key", &self.private_key.as_ref().map(|_| "<redacted>"))
            .field("listen_port", &self.listen_port)
            .field("fwmark", &self.fwmark)
            .field("replace_peers", &self.replace_peers)
            .field("peers", &self.peers)
            .finish()
    }
}

/// A 32-byte key as the protocol writes it: 64 hex digits (either case).
fn parse_hex_key(field: &str, value: &str) -> Result<Zeroizing<[u8; 32]>, UapiError> {
    let bytes = value.as_bytes();
    if bytes.len() != 64 {
        return Err(UapiError::invalid(format!("{field}: expected 64 hex digits, got {} characters", bytes.len())));
    }
    let mut key = Zeroizing::new([0u8; 32]);
    for (i, pair) in bytes.chunks_exact(2).enumerate() {
        let digit = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
        match (digit(pair[0]), digit(pair[1])) {
            (Some(hi), Some(lo)) => key[i] = hi << 4 | lo,
            _ => return Err(UapiError::invalid(format!("{field}: not a hex key"))),
        }
    }
    Ok(key)
}

fn write_hex_key(out: &mut String, field: &str, key: &[u8; 32]) {
    out.push_str(field);
    out.push('=');
    for b in key {
        let _ = write!(out, "{b:02x}");
    }
    out.push('\n');
}

fn parse_true(field: &str, value: &str) -> Result<bool, UapiError> {
    match value {
        "true" => Ok(true),
        _ => Err(UapiError::invalid(format!("{field}: the only value is `true` (got `{}`)", printable(value)))),
    }
}

fn parse_number<T: std::str::FromStr>(field: &str, value: &str) -> Result<T, UapiError> {
    let bad = || UapiError::invalid(format!("{field}: `{}` is not a number in range", printable(value)));
    // Digits only: `+5` and ` 5` are not numbers here.
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    value.parse().map_err(|_| bad())
}

/// `ADDRESS:PORT` or `[ADDRESS]:PORT`. Scoped (link-local) IPv6 endpoints are
/// refused: a gateway's peers are reached through its WAN's routes, and `wg`
/// names the scope by interface, which cannot be stored as a gateway's address.
fn parse_endpoint(value: &str) -> Result<SocketAddr, UapiError> {
    let refuse = |why: &str| UapiError::invalid(format!("endpoint `{}`: {why}", printable(value)));
    if value.contains('%') {
        return Err(refuse("scoped (link-local) addresses are not supported"));
    }
    let addr: SocketAddr = value.parse().map_err(|_| refuse("expected ADDRESS:PORT or [ADDRESS]:PORT"))?;
    if let SocketAddr::V6(a) = addr {
        if a.ip().segments()[0] & 0xffc0 == 0xfe80 {
            return Err(refuse("link-local addresses are not supported"));
        }
    }
    Ok(addr)
}

/// `ADDRESS/LENGTH`; host bits are cleared, as the kernel does.
fn parse_allowed_ip(value: &str) -> Result<IpPrefix, UapiError> {
    let bad = || UapiError::invalid(format!("allowed_ip: `{}` is not ADDRESS/LENGTH", printable(value)));
    let (addr, len) = value.split_once('/').ok_or_else(bad)?;
    let addr: std::net::IpAddr = addr.parse().map_err(|_| bad())?;
    let len: u8 = parse_number("allowed_ip", len).map_err(|_| bad())?;
    IpPrefix::new(addr, len).map_err(|e| UapiError::invalid(format!("allowed_ip: `{}`: {e}", printable(value))))
}

/// Parses the lines of a `set=1` request (after `set=1`, up to the empty
/// line). Keys are processed in order, as the reference implementation does:
/// device keys first, then each `public_key=` starts a peer whose keys follow.
pub fn parse_set(body: &str) -> Result<SetRequest, UapiError> {
    let mut req = SetRequest::default();
    // The current peer's allowed IPs, for de-duplication in constant time.
    let mut seen = std::collections::HashSet::new();
    for line in body.split('\n').filter(|l| !l.is_empty()) {
        let (key, value) = line.split_once('=').ok_or_else(|| UapiError::protocol("a line without `=`"))?;
        if key == "public_key" {
            let bytes = parse_hex_key(key, value)?;
            req.peers.push(PeerChange::new(PublicKey(*bytes)));
            seen.clear();
            continue;
        }
        let Some(peer) = req.peers.last_mut() else {
            match key {
                "private_key" => req.private_key = Some(parse_hex_key(key, value)?),
                "listen_port" => req.listen_port = Some(parse_number(key, value)?),
                "fwmark" => req.fwmark = Some(parse_number(key, value)?),
                "replace_peers" => req.replace_peers = parse_true(key, value)?,
                _ => return Err(UapiError::invalid(format!("`{}` is not a device key", printable(key)))),
            }
            continue;
        };
        match key {
            "remove" => peer.remove = parse_true(key, value)?,
            "update_only" => peer.update_only = parse_true(key, value)?,
            "preshared_key" => peer.preshared_key = Some(PresharedKey::from_bytes(*parse_hex_key(key, value)?)),
            "endpoint" => peer.endpoint = Some(parse_endpoint(value)?),
            "persistent_keepalive_interval" => peer.persistent_keepalive = Some(parse_number(key, value)?),
            "replace_allowed_ips" => {
                peer.replace_allowed_ips = parse_true(key, value)?;
                peer.allowed_ips.clear();
                seen.clear();
            }
            "allowed_ip" => {
                let p = parse_allowed_ip(value)?;
                if seen.insert(p) {
                    if peer.allowed_ips.len() == MAX_ALLOWED_IPS {
                        return Err(UapiError::invalid(format!(
                            "peer {}: more than {MAX_ALLOWED_IPS} allowed IPs",
                            peer.public_key
                        )));
                    }
                    peer.allowed_ips.push(p);
                }
            }
            "protocol_version" => {
                if value != "1" {
                    return Err(UapiError::invalid(format!("protocol_version {} is not supported", printable(value))));
                }
            }
            _ => return Err(UapiError::invalid(format!("`{}` is not a peer key", printable(key)))),
        }
    }
    Ok(req)
}

/// At most 64 characters of client text, control characters escaped, for logs.
fn printable(s: &str) -> String {
    s.chars().take(64).flat_map(char::escape_debug).collect()
}

/// A private key's bytes: zeroed on drop, never shown by `Debug`.
pub struct RedactedKey(pub Zeroizing<[u8; 32]>);

impl std::fmt::Debug for RedactedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// What a `get=1` answer reports of the device.
#[derive(Debug)]
pub struct DeviceState {
    pub private_key: RedactedKey,
    pub listen_port: u16,
    pub fwmark: u32,
    pub peers: Vec<PeerState>,
}

/// One peer of a `get=1` answer (its pre-shared key's `Debug` is redacted).
#[derive(Debug)]
pub struct PeerState {
    pub public_key: PublicKey,
    pub preshared_key: PresharedKey,
    pub endpoint: Option<SocketAddr>,
    pub last_handshake: Option<SystemTime>,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub persistent_keepalive: u16,
    pub allowed_ips: Vec<IpPrefix>,
}

/// The `get=1` answer up to (not including) its `errno=0` line. It holds
/// the private and pre-shared keys: the caller writes it to the socket only.
pub fn format_get(state: &DeviceState) -> Zeroizing<String> {
    // Room for every line up front: a reallocation would leave key copies behind.
    let room = 256 + state.peers.iter().map(|p| 520 + p.allowed_ips.len() * 64).sum::<usize>();
    let mut out = Zeroizing::new(String::with_capacity(room));
    if state.private_key.0.iter().any(|&b| b != 0) {
        write_hex_key(&mut out, "private_key", &state.private_key.0);
    }
    if state.listen_port != 0 {
        let _ = writeln!(out, "listen_port={}", state.listen_port);
    }
    if state.fwmark != 0 {
        let _ = writeln!(out, "fwmark={}", state.fwmark);
    }
    for p in &state.peers {
        write_hex_key(&mut out, "public_key", p.public_key.as_bytes());
        write_hex_key(&mut out, "preshared_key", p.preshared_key.as_bytes());
        out.push_str("protocol_version=1\n");
        if let Some(e) = p.endpoint {
            let _ = writeln!(out, "endpoint={e}");
        }
        let since = p.last_handshake.and_then(|t| t.duration_since(UNIX_EPOCH).ok()).unwrap_or_default();
        let _ = writeln!(out, "last_handshake_time_sec={}", since.as_secs());
        let _ = writeln!(out, "last_handshake_time_nsec={}", since.subsec_nanos());
        let _ = writeln!(out, "tx_bytes={}", p.tx_bytes);
        let _ = writeln!(out, "rx_bytes={}", p.rx_bytes);
        let _ = writeln!(out, "persistent_keepalive_interval={}", p.persistent_keepalive);
        for ip in &p.allowed_ips {
            let _ = writeln!(out, "allowed_ip={ip}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    // The keys of the example on wireguard.com/xplatform.
    const PRIVATE: &str = "e84b5a6d2717c1003a13b431570353dbaca9146cf150c5f8575680feba52027a";
    const PEER1: &str = "b85996fecc9c7f1fc6d2572a76eda11d59bcd20be8e543b15ce4bd85a8e75a33";
    const PSK1: &str = "188515093e952f5f22e865cef3012e72f8b5f0b598ac0309d5dacce3b70fcf52";
    const PEER2: &str = "58402e695ba1772b1cc9309755f043251ea77fdcf10fbe63989ceb7e19321376";
    const PEER3: &str = "662e14fd594556f522604703340351258903b64f35553763f19426ab2a515c58";

    fn key(hex: &str) -> [u8; 32] {
        *parse_hex_key("k", hex).unwrap()
    }

    #[test]
    fn the_specs_set_example_parses_line_by_line() {
        let body = format!(
            "private_key={PRIVATE}\nfwmark=0\nlisten_port=12912\nreplace_peers=true\n\
             public_key={PEER1}\npreshared_key={PSK1}\nreplace_allowed_ips=true\nallowed_ip=192.168.4.4/32\n\
             endpoint=[abcd:23::33]:51820\n\
             public_key={PEER2}\nreplace_allowed_ips=true\nallowed_ip=192.168.4.6/32\n\
             persistent_keepalive_interval=111\nendpoint=182.122.22.19:3233\n\
             public_key={PEER3}\nendpoint=5.152.198.39:51820\nreplace_allowed_ips=true\n\
             allowed_ip=192.168.4.10/32\nallowed_ip=192.168.4.11/32\n\
             public_key={PEER1}\nremove=true\n"
        );
        // The example's scoped endpoint (`%2`) is refused: see `parse_endpoint`.
        let scoped = body.replace("[abcd:23::33]:51820", "[abcd:23::33%2]:51820");
        assert_eq!(parse_set(&scoped).unwrap_err().errno, errno::EINVAL);
        let req = parse_set(&body).unwrap();
        assert_eq!(req.private_key.as_deref(), Some(&key(PRIVATE)));
        assert_eq!((req.listen_port, req.fwmark, req.replace_peers), (Some(12912), Some(0), true));
        assert_eq!(req.peers.len(), 4);
        let p = &req.peers[0];
        assert_eq!(p.public_key, PublicKey(key(PEER1)));
        assert_eq!(p.preshared_key.as_ref().map(|k| *k.as_bytes()), Some(key(PSK1)));
        assert!(p.replace_allowed_ips);
        assert_eq!(p.allowed_ips, vec!["192.168.4.4/32".parse().unwrap()]);
        assert_eq!(p.endpoint, Some("[abcd:23::33]:51820".parse().unwrap()));
        let p = &req.peers[1];
        assert_eq!((p.persistent_keepalive, p.endpoint), (Some(111), Some("182.122.22.19:3233".parse().unwrap())));
        assert_eq!(req.peers[2].allowed_ips.len(), 2);
        assert!(req.peers[3].remove && req.peers[3].public_key == PublicKey(key(PEER1)));
    }

    #[test]
    fn malformed_requests_get_the_specs_errnos() {
        let cases: &[(&str, i32)] = &[
            ("listen_port", errno::EPROTO),
            ("listen_port=70000", errno::EINVAL),
            ("listen_port=+5", errno::EINVAL),
            ("listen_port=", errno::EINVAL),
            ("private_key=abcd", errno::EINVAL),
            ("allowed_ip=10.0.0.0/8", errno::EINVAL), // a peer key before any peer
            ("frobnicate=1", errno::EINVAL),
            ("replace_peers=false", errno::EINVAL),
            ("public_key=zz", errno::EINVAL),
        ];
        for (body, want) in cases {
            assert_eq!(parse_set(body).unwrap_err().errno, *want, "{body}");
        }
        let peer = format!("public_key={PEER1}\n");
        let peer_cases: &[(&str, i32)] = &[
            ("allowed_ip=10.0.0.0/33", errno::EINVAL),
            ("allowed_ip=10.0.0.0", errno::EINVAL),
            ("allowed_ip=nonsense/8", errno::EINVAL),
            ("endpoint=10.0.0.1", errno::EINVAL),
            // What `wg` sends for a scoped address, and link-local ones.
            ("endpoint=[fe80::1%eth0]:51820", errno::EINVAL),
            ("endpoint=[fe80::1%2]:51820", errno::EINVAL),
            ("endpoint=[fe80::1]:51820", errno::EINVAL),
            ("protocol_version=2", errno::EINVAL),
            ("persistent_keepalive_interval=65536", errno::EINVAL),
            ("remove=yes", errno::EINVAL),
            ("listen_port=5", errno::EINVAL), // a device key after a peer
            ("preshared_key=0g", errno::EINVAL),
        ];
        for (line, want) in peer_cases {
            assert_eq!(parse_set(&format!("{peer}{line}")).unwrap_err().errno, *want, "{line}");
        }
    }

    #[test]
    fn a_peer_lists_a_bounded_number_of_allowed_ips() {
        let mut body = format!("public_key={PEER1}\n");
        for i in 0..MAX_ALLOWED_IPS {
            body.push_str(&format!("allowed_ip=10.{}.{}.0/24\n", i / 256, i % 256));
        }
        assert_eq!(parse_set(&body).unwrap().peers[0].allowed_ips.len(), MAX_ALLOWED_IPS);
        // Repeats do not count; one more does.
        let again = format!("{body}allowed_ip=10.0.0.0/24\n");
        assert_eq!(parse_set(&again).unwrap().peers[0].allowed_ips.len(), MAX_ALLOWED_IPS);
        assert_eq!(parse_set(&format!("{body}allowed_ip=10.99.0.0/24\n")).unwrap_err().errno, errno::EINVAL);
    }

    #[test]
    fn error_messages_carry_at_most_a_short_escaped_echo() {
        let long = "9".repeat(100_000);
        let e = parse_set(&format!("listen_port={long}\n")).unwrap_err();
        assert!(e.message.len() < 200, "{}", e.message.len());
        let e = parse_set(&format!("public_key={PEER1}\nendpoint=\u{1b}[31m{long}\n")).unwrap_err();
        assert!(e.message.len() < 200 && !e.message.contains('\u{1b}'), "{}", e.message);
    }

    #[test]
    fn allowed_ips_are_masked_deduplicated_and_replaced_in_order() {
        let req = parse_set(&format!(
            "public_key={PEER1}\nallowed_ip=10.1.2.3/16\nallowed_ip=10.1.0.0/16\nreplace_allowed_ips=true\n\
             allowed_ip=fd00::1/64\nallowed_ip=10.9.0.0/16\n"
        ))
        .unwrap();
        let p = &req.peers[0];
        assert!(p.replace_allowed_ips);
        assert_eq!(p.allowed_ips, vec!["fd00::/64".parse().unwrap(), "10.9.0.0/16".parse().unwrap()]);
        let req = parse_set(&format!("public_key={PEER1}\nallowed_ip=10.1.2.3/16\nallowed_ip=10.1.0.0/16\n")).unwrap();
        assert_eq!(req.peers[0].allowed_ips, vec!["10.1.0.0/16".parse().unwrap()]);
        assert!(!req.peers[0].replace_allowed_ips);
    }

    #[test]
    fn the_get_answer_has_the_specs_lines() {
        let state = DeviceState {
            private_key: RedactedKey(Zeroizing::new(key(PRIVATE))),
            listen_port: 12912,
            fwmark: 0,
            peers: vec![PeerState {
                public_key: PublicKey(key(PEER1)),
                preshared_key: PresharedKey::from_bytes(key(PSK1)),
                endpoint: Some("[abcd:23::33]:51820".parse().unwrap()),
                last_handshake: Some(UNIX_EPOCH + Duration::new(1_700_000_000, 42)),
                rx_bytes: 2224,
                tx_bytes: 38333,
                persistent_keepalive: 0,
                allowed_ips: vec!["192.168.4.4/32".parse().unwrap(), "fd00::/64".parse().unwrap()],
            }],
        };
        let want = format!(
            "private_key={PRIVATE}\nlisten_port=12912\npublic_key={PEER1}\npreshared_key={PSK1}\n\
             protocol_version=1\nendpoint=[abcd:23::33]:51820\nlast_handshake_time_sec=1700000000\n\
             last_handshake_time_nsec=42\ntx_bytes=38333\nrx_bytes=2224\npersistent_keepalive_interval=0\n\
             allowed_ip=192.168.4.4/32\nallowed_ip=fd00::/64\n"
        );
        assert_eq!(*format_get(&state), want);
        assert_eq!(status_line(&Ok(())), "errno=0\n\n");
        assert_eq!(status_line(&Err(UapiError::invalid("x"))), "errno=-22\n\n");
    }

    #[test]
    fn debug_output_never_shows_keys() {
        let req = parse_set(&format!("private_key={PRIVATE}\npublic_key={PEER1}\npreshared_key={PSK1}\n")).unwrap();
        let text = format!("{req:?}");
        assert!(!text.contains(&PRIVATE[..16]) && !text.contains("188515"), "{text}");
        assert!(text.contains("<redacted>"));
    }
}
