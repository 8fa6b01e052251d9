//! Types shared by the XDP program and userspace: map names, counter indices
//! and the config layout. `#![no_std]`, plain old data only.
#![no_std]

/// Map names, as userspace looks them up.
pub mod maps {
    pub const WAN_XSKS: &str = "WAN_XSKS";
    pub const LAN_XSKS: &str = "LAN_XSKS";
    pub const CONFIG: &str = "CONFIG";
    pub const TUNNEL_V4: &str = "TUNNEL_V4";
    pub const TUNNEL_V6: &str = "TUNNEL_V6";
    pub const STATS: &str = "STATS";
    pub const WAN_ADDRS_V4: &str = "WAN_ADDRS_V4";
    pub const WAN_ADDRS_V6: &str = "WAN_ADDRS_V6";
    pub const SINK_CONFIG: &str = "SINK_CONFIG";
    pub const SINK_STATS: &str = "SINK_STATS";
}

/// Program names (the functions' names in the object).
pub mod programs {
    pub const WAN: &str = "wgxdp_wan";
    pub const LAN: &str = "wgxdp_lan";
    /// Benchmarks only: counts and drops the traffic a run measures.
    pub const SINK: &str = "wgxdp_sink";
}

/// The benchmark sink (`wgxdp_sink`): it counts and drops IPv4 UDP packets to
/// `SINK_CONFIG[DST_PORT]` (inner packets after a decrypting gateway) and
/// WireGuard transport data from `SINK_CONFIG[WG_SRC_PORT]` (what an
/// encrypting gateway sends; keepalives excluded); everything else passes.
pub mod sink {
    pub const DST_PORT: u32 = 0;
    pub const WG_SRC_PORT: u32 = 1;
    pub const CONFIG_COUNT: u32 = 2;
    /// `SINK_STATS` indices (per CPU).
    pub const PACKETS: u32 = 0;
    pub const BYTES: u32 = 1;
    pub const STATS_COUNT: u32 = 2;
}

/// Capacity of the XSK maps: the highest rx queue index + 1 we can serve.
pub const MAX_QUEUES: u32 = 64;
/// Capacity of each map of the gateway's own WAN addresses.
pub const MAX_WAN_ADDRS: u32 = 256;
/// Capacity of each tunnel-prefix LPM map.
pub const MAX_TUNNEL_PREFIXES: u32 = 65_536;

/// Index of each per-CPU counter in the `STATS` map.
pub mod stat {
    /// WAN: WireGuard to our port, redirected to the queue's AF_XDP socket.
    pub const WAN_REDIRECTED: u32 = 0;
    /// WAN: not ours, handed to the kernel.
    pub const WAN_PASSED: u32 = 1;
    /// WAN: too short or malformed to classify, handed to the kernel untouched.
    pub const WAN_MALFORMED: u32 = 2;
    /// WAN: ours, but no socket on this rx queue; handed to the kernel.
    pub const WAN_NO_SOCKET: u32 = 3;
    pub const LAN_REDIRECTED: u32 = 4;
    pub const LAN_PASSED: u32 = 5;
    pub const LAN_MALFORMED: u32 = 6;
    pub const LAN_NO_SOCKET: u32 = 7;
    /// WAN: UDP to the listen port but to an address that is not the
    /// gateway's own (forwarded or bound elsewhere); handed to the kernel.
    pub const WAN_NOT_OUR_ADDRESS: u32 = 8;
    /// Number of counters.
    pub const COUNT: u32 = 9;

    /// Names for logs and metrics, by index.
    pub const NAMES: [&str; COUNT as usize] = [
        "wan_redirected",
        "wan_passed",
        "wan_malformed",
        "wan_no_socket",
        "lan_redirected",
        "lan_passed",
        "lan_malformed",
        "lan_no_socket",
        "wan_not_our_address",
    ];
}

/// Index of each value in the `CONFIG` array.
pub mod config {
    /// The gateway's UDP listen port (host byte order; 0 = redirect nothing).
    pub const LISTEN_PORT: u32 = 0;
    pub const COUNT: u32 = 1;
}
