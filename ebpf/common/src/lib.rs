//! Types shared by the XDP program and userspace: map layouts and counter
//! indices. `#![no_std]`, `#[repr(C)]`, plain old data only.
#![no_std]

/// Index of each per-CPU counter in the `STATS` map.
pub mod stat {
    /// Frames that were tunnel traffic (WireGuard to our port).
    pub const TUNNEL: u32 = 0;
    /// Frames handed to the kernel (not ours).
    pub const PASSED: u32 = 1;
    /// Frames too short or malformed to classify (passed to the kernel untouched).
    pub const MALFORMED: u32 = 2;
    /// Number of counters.
    pub const COUNT: u32 = 3;
}

/// Index of each value in the `CONFIG` map.
pub mod config {
    /// The gateway's UDP listen port (host byte order).
    pub const LISTEN_PORT: u32 = 0;
    pub const COUNT: u32 = 1;
}
