//! AF_XDP sockets (over xsk-rs): per queue, the WAN and the LAN socket share
//! one UMEM (`XDP_SHARED_UMEM`, each with its own fill and completion ring), so
//! a packet leaves from the frame it arrived in — decrypted or sealed where it
//! lies, never copied into another socket's memory.
//!
//! **Frame ownership.** Every frame of a queue's UMEM is at any moment in
//! exactly one place: a fill ring or rx ring (the kernel's), a tx ring or
//! completion ring (the kernel's), or in our hands as a `Frame`. A `Frame` is
//! not `Clone`, carries the id of the UMEM it belongs to, and is created only
//! from a descriptor the kernel handed back (rx or completion) or that was never
//! given away. Frame memory is reachable only through a `Frame` and its own
//! `XskQueue`, so we never touch memory the kernel owns or another queue's UMEM.
//! A `Frame` goes back to the kernel through `send` (either port's tx) or
//! `release` (the shared free list, from which both fill rings are topped up).

use std::num::NonZeroU32;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use xsk_rs::config::{BindFlags, FrameSize, Interface, LibxdpFlags, QueueSize, SocketConfig, UmemConfig};
use xsk_rs::{CompQueue, FillQueue, FrameDesc, RxQueue, Socket, TxQueue, Umem};

#[derive(Debug, thiserror::Error)]
pub enum XskError {
    #[error("invalid AF_XDP sizes: {0}")]
    Config(String),
    #[error("cannot create the UMEM ({frames} frames of {frame_size} bytes): {reason}")]
    Umem { frames: u32, frame_size: u32, reason: String },
    #[error("cannot bind an AF_XDP socket to {iface} queue {queue}: {reason} (does the kernel support AF_XDP, and XDP_SHARED_UMEM across interfaces (5.10+)?)")]
    Bind { iface: String, queue: u32, reason: String },
}

/// Sizes of one queue's UMEM and rings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XskConfig {
    /// Frames per socket (power of two): the queue's shared UMEM holds twice
    /// this; each fill ring is kept at most half of it full.
    pub frame_count: u32,
    /// 2048 or 4096.
    pub frame_size: u32,
    /// Entries in each of the four rings (power of two).
    pub ring_size: u32,
    /// Try a zero-copy bind first (falls back to copy mode).
    pub zero_copy: bool,
    /// Prefer busy polling (`SO_PREFER_BUSY_POLL`, `SO_BUSY_POLL`,
    /// `SO_BUSY_POLL_BUDGET`): the worker drives the NIC's NAPI from its own
    /// syscalls instead of waiting for interrupts. Off by default.
    pub busy_poll: bool,
}

impl Default for XskConfig {
    fn default() -> Self {
        Self { frame_count: 4096, frame_size: 2048, ring_size: 2048, zero_copy: true, busy_poll: false }
    }
}

/// How the socket was bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindMode {
    ZeroCopy,
    Copy,
}

/// Frames one port may hold for transmission (in its tx ring, queued or
/// not yet completed) out of a pool of `frames` that both ports share: a
/// quarter, so the two ports' backlogs and both fill rings (a quarter each at
/// most) can never take every frame.
pub const fn tx_bound(frames: usize) -> usize {
    if frames / 4 > 1 {
        frames / 4
    } else {
        1
    }
}

/// Which of a queue's two sockets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    /// The Internet side: WireGuard datagrams.
    Wan = 0,
    /// The site side: plain IP packets.
    Lan = 1,
}

/// A frame we own; see the module documentation.
#[derive(Debug)]
pub struct Frame {
    desc: FrameDesc,
    umem: u32,
}

impl Frame {
    /// Bytes of packet data in the frame.
    pub fn len(&self) -> usize {
        self.desc.lengths().data()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One socket's rings.
struct XskPort {
    fill: FillQueue,
    comp: CompQueue,
    rx: RxQueue,
    tx: TxQueue,
    /// Frames queued by `send`, handed to the tx ring by `flush`.
    pending_tx: Vec<FrameDesc>,
    in_fill: usize,
    in_tx: usize,
}

/// The WAN and LAN sockets of one queue over one shared UMEM.
pub struct XskQueue {
    id: u32,
    umem: Umem,
    ports: [XskPort; 2],
    mode: BindMode,
    busy_poll: bool,
    /// Frames in our hands that carry nothing: for tx, or to refill a fill ring.
    free: Vec<FrameDesc>,
    scratch: Vec<FrameDesc>,
    /// How many frames to keep in each fill ring.
    fill_target: usize,
    /// How many frames each port may hold for transmission (`tx_bound`).
    tx_bound: usize,
    /// Frames `send` dropped at that bound, not yet reported.
    tx_full: u64,
    capacity: usize,
}

impl core::fmt::Debug for XskQueue {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("XskQueue").field("mode", &self.mode).field("free", &self.free.len()).finish_non_exhaustive()
    }
}

fn queue_size(n: u32) -> Result<QueueSize, XskError> {
    QueueSize::new(n).map_err(|e| XskError::Config(e.to_string()))
}

/// Socket options for busy polling (constants from the kernel's uapi
/// `asm-generic/socket.h`, not all in the libc crate).
const SO_BUSY_POLL: libc::c_int = 46;
const SO_PREFER_BUSY_POLL: libc::c_int = 69;
const SO_BUSY_POLL_BUDGET: libc::c_int = 70;
/// Microseconds a syscall may busy-poll the NIC.
const BUSY_POLL_USECS: libc::c_int = 20;

/// Turns busy polling on for `fd` (`budget` packets per poll), or, with
/// `budget == 0`, off again.
fn set_busy_poll(fd: RawFd, budget: usize) -> std::io::Result<()> {
    let on = budget > 0;
    let budget = budget.min(libc::c_int::MAX as usize) as libc::c_int;
    let usecs = if on { BUSY_POLL_USECS } else { 0 };
    for (option, value) in
        [(SO_PREFER_BUSY_POLL, libc::c_int::from(on)), (SO_BUSY_POLL, usecs), (SO_BUSY_POLL_BUDGET, budget)]
    {
        // SAFETY: `fd` is an open socket we own; the option value is a c_int
        // on our stack whose size we pass.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                option,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

impl XskQueue {
    /// Binds the WAN and LAN sockets of queue `queue` over one new UMEM, in the
    /// calling thread's network namespace. Never loads an XDP program (ours
    /// steers into them via the XSKMAPs). Tries zero-copy first when asked;
    /// both sockets share the mode (the kernel binds the second like the first).
    pub fn bind(wan: &str, lan: &str, queue: u32, cfg: &XskConfig) -> Result<Self, XskError> {
        let attempts: &[(BindMode, BindFlags)] = if cfg.zero_copy {
            &[(BindMode::ZeroCopy, BindFlags::XDP_ZEROCOPY), (BindMode::Copy, BindFlags::XDP_COPY)]
        } else {
            &[(BindMode::Copy, BindFlags::XDP_COPY)]
        };
        let mut last_error = None;
        for &(mode, flags) in attempts {
            match Self::bind_mode(wan, lan, queue, cfg, mode, flags) {
                Ok(q) => {
                    if mode == BindMode::Copy && cfg.zero_copy {
                        let reason = last_error.as_ref().map(ToString::to_string).unwrap_or_default();
                        tracing::info!(%wan, %lan, queue, %reason, "zero-copy unavailable; AF_XDP in copy mode");
                    }
                    return Ok(q);
                }
                Err(e @ (XskError::Config(_) | XskError::Umem { .. })) => return Err(e),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| XskError::Config("no bind mode to try".into())))
    }

    fn bind_mode(
        wan: &str,
        lan: &str,
        queue: u32,
        cfg: &XskConfig,
        mode: BindMode,
        flags: BindFlags,
    ) -> Result<Self, XskError> {
        let umem_cfg = UmemConfig::builder()
            .frame_size(FrameSize::new(cfg.frame_size).map_err(|e| XskError::Config(e.to_string()))?)
            .fill_queue_size(queue_size(cfg.ring_size)?)
            .comp_queue_size(queue_size(cfg.ring_size)?)
            .build()
            .map_err(|e| XskError::Config(e.to_string()))?;
        let total = cfg.frame_count.checked_mul(2).filter(|&n| n > 0);
        let frames = total.and_then(NonZeroU32::new).ok_or_else(|| XskError::Config("frame_count".into()))?;
        let (umem, descs) = Umem::new(umem_cfg, frames, false).map_err(|e| XskError::Umem {
            frames: frames.get(),
            frame_size: cfg.frame_size,
            reason: e.to_string(),
        })?;
        let socket_cfg = SocketConfig::builder()
            .rx_queue_size(queue_size(cfg.ring_size)?)
            .tx_queue_size(queue_size(cfg.ring_size)?)
            .libxdp_flags(LibxdpFlags::XSK_LIBXDP_FLAGS_INHIBIT_PROG_LOAD)
            .bind_flags(flags | BindFlags::XDP_USE_NEED_WAKEUP)
            .build();
        let mut ports = Vec::with_capacity(2);
        let mut busy_poll = cfg.busy_poll;
        for iface in [wan, lan] {
            let bind_err = |reason: String| XskError::Bind { iface: iface.to_owned(), queue, reason };
            let name: Interface = iface.parse().map_err(|e| bind_err(format!("{e:?}")))?;
            // The conditions xsk-rs documents against a double free hold.
            // SAFETY: the UMEM is shared only by these two sockets, on two
            // (interface, queue) pairs, with the program-load flag inhibited.
            match unsafe { Socket::new(socket_cfg, &umem, &name, queue) } {
                Ok((tx, rx, Some((fill, comp)))) => {
                    if busy_poll {
                        if let Err(e) = set_busy_poll(rx.fd().as_raw_fd(), crate::worker::BATCH) {
                            tracing::warn!(%iface, queue, error = %e, "busy polling unavailable; interrupts as usual");
                            busy_poll = false;
                        }
                    }
                    ports.push(XskPort {
                        fill,
                        comp,
                        rx,
                        tx,
                        pending_tx: Vec::with_capacity(cfg.ring_size as usize),
                        in_fill: 0,
                        in_tx: 0,
                    })
                }
                Ok(_) => return Err(bind_err("the socket came without fill/completion rings".into())),
                Err(e) => return Err(bind_err(e.to_string())),
            }
        }
        if cfg.busy_poll && !busy_poll {
            // All or nothing: a half-set socket would only cost wasted kicks.
            for p in &ports {
                let _ = set_busy_poll(p.rx.fd().as_raw_fd(), 0);
            }
        }
        let lan_port = ports.pop().expect("two ports");
        let wan_port = ports.pop().expect("two ports");
        static NEXT_ID: AtomicU32 = AtomicU32::new(1);
        let capacity = descs.len();
        let ring = cfg.ring_size as usize;
        let mut q = Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            umem,
            ports: [wan_port, lan_port],
            mode,
            busy_poll,
            free: descs,
            scratch: vec![FrameDesc::default(); ring],
            fill_target: (capacity / 4).min(ring),
            tx_bound: tx_bound(capacity),
            tx_full: 0,
            capacity,
        };
        q.top_up_fill(Port::Wan);
        q.top_up_fill(Port::Lan);
        Ok(q)
    }

    pub fn mode(&self) -> BindMode {
        self.mode
    }

    /// A socket's descriptor, for its XSKMAP.
    pub fn raw_fd(&self, port: Port) -> RawFd {
        self.ports[port as usize].rx.fd().as_raw_fd()
    }

    /// Frames neither with the kernel nor queued: free for `alloc`.
    pub fn free_frames(&self) -> usize {
        self.free.len()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Receives up to `max` frames from `port` into `out` (appended); returns how many.
    pub fn recv(&mut self, port: Port, out: &mut Vec<Frame>, max: usize) -> usize {
        let n = max.min(self.scratch.len());
        let p = &mut self.ports[port as usize];
        // SAFETY: `scratch` holds plain descriptors that the kernel overwrites; the
        // ones it returns are frames of this queue's UMEM, now ours (module docs).
        let got = unsafe { p.rx.consume(&mut self.scratch[..n]) };
        p.in_fill -= got.min(p.in_fill);
        let umem = self.id;
        out.extend(self.scratch[..got].iter().map(|&desc| Frame { desc, umem }));
        if got == 0 && self.busy_poll {
            // Busy polling: the syscall is what runs the NIC's receive work.
            // SAFETY: a zero-length, non-blocking recvfrom on our own socket
            // with null buffers touches no memory.
            unsafe {
                libc::recvfrom(
                    p.rx.fd().as_raw_fd(),
                    std::ptr::null_mut(),
                    0,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                )
            };
        }
        got
    }

    /// A free frame with room for `len` bytes of data, if one is available.
    pub fn alloc(&mut self, len: usize) -> Option<Frame> {
        if self.free.is_empty() {
            self.reclaim_completions(Port::Wan);
            self.reclaim_completions(Port::Lan);
        }
        let mut desc = self.free.pop()?;
        let mut frame = Frame { desc, umem: self.id };
        let fits = self.with_data_mut(&mut frame, Some(len), |buf| buf.len() == len);
        if !fits {
            desc = frame.desc;
            self.free.push(desc);
            return None;
        }
        Some(frame)
    }

    fn check(&self, frame: &Frame) {
        assert_eq!(frame.umem, self.id, "a frame was used with a queue it does not belong to");
    }

    /// The frame's packet bytes.
    pub fn data<'a>(&'a self, frame: &'a Frame) -> &'a [u8] {
        self.check(frame);
        // SAFETY: `frame` belongs to this UMEM (checked) and is ours, so the
        // kernel is not writing it and no `&mut` to it exists (we hold `&Frame`).
        unsafe { self.umem.data(&frame.desc) }.contents()
    }

    /// Runs `f` on the frame's bytes; with `Some(len)`, first sets the packet
    /// length to `len` (capped at the frame's capacity).
    pub fn with_data_mut<R>(&self, frame: &mut Frame, len: Option<usize>, f: impl FnOnce(&mut [u8]) -> R) -> R {
        self.check(frame);
        // SAFETY: `frame` belongs to this UMEM (checked), is ours (module docs),
        // and `&mut Frame` guarantees no other reference to its memory exists.
        let mut data = unsafe { self.umem.data_mut(&mut frame.desc) };
        if let Some(len) = len {
            data.cursor().set_pos(len);
        }
        f(data.contents_mut())
    }

    /// Gives a frame back without sending it.
    pub fn release(&mut self, frame: Frame) {
        self.check(&frame);
        self.free.push(frame.desc);
    }

    /// Queues a frame for transmission on `port` (its length is its packet length).
    pub fn send(&mut self, port: Port, frame: Frame) {
        self.check(&frame);
        let p = &mut self.ports[port as usize];
        if p.in_tx + p.pending_tx.len() >= self.tx_bound {
            // Reclaim what the kernel finished before giving up on the frame.
            self.reclaim_completions(port);
            let p = &self.ports[port as usize];
            if p.in_tx + p.pending_tx.len() >= self.tx_bound {
                self.tx_full += 1;
                return self.free.push(frame.desc);
            }
        }
        self.ports[port as usize].pending_tx.push(frame.desc);
    }

    /// Frames `send` dropped at the transmit bound since the last call.
    pub fn take_tx_full(&mut self) -> u64 {
        std::mem::take(&mut self.tx_full)
    }

    /// Hands queued frames to the kernel, wakes it if it asks (always, when
    /// busy polling), reclaims sent frames and tops up both fill rings. Call
    /// once per batch.
    pub fn flush(&mut self) {
        for port in [Port::Wan, Port::Lan] {
            self.flush_port(port);
        }
    }

    fn flush_port(&mut self, port: Port) {
        let busy_poll = self.busy_poll;
        let p = &mut self.ports[port as usize];
        if !p.pending_tx.is_empty() {
            // SAFETY: every pending descriptor is a frame of this UMEM that we owned
            // (only `send` adds them); the kernel owns them from here on.
            let sent = unsafe { p.tx.produce(&p.pending_tx) };
            if sent == 0 {
                // The ring is full: produce is all-or-nothing, so try fewer.
                let room = p.tx.nb_free(p.pending_tx.len() as u32) as usize;
                // SAFETY: as above, for a prefix of the same descriptors.
                let sent = unsafe { p.tx.produce(&p.pending_tx[..room]) };
                p.in_tx += sent;
                p.pending_tx.drain(..sent);
            } else {
                p.in_tx += sent;
                p.pending_tx.clear();
            }
        }
        if p.in_tx > 0 && (busy_poll || p.tx.needs_wakeup()) {
            if let Err(e) = p.tx.wakeup() {
                if e.raw_os_error() != Some(libc::EAGAIN) && e.raw_os_error() != Some(libc::EBUSY) {
                    tracing::debug!(error = %e, "AF_XDP tx wakeup failed");
                }
            }
        }
        self.reclaim_completions(port);
        self.top_up_fill(port);
    }

    fn reclaim_completions(&mut self, port: Port) {
        let p = &mut self.ports[port as usize];
        if p.in_tx == 0 {
            return;
        }
        // SAFETY: completed descriptors are frames of this UMEM the kernel has
        // finished sending; they are ours again.
        let done = unsafe { p.comp.consume(&mut self.scratch) };
        p.in_tx -= done.min(p.in_tx);
        self.free.extend_from_slice(&self.scratch[..done]);
    }

    fn top_up_fill(&mut self, port: Port) {
        let p = &mut self.ports[port as usize];
        let want = self.fill_target.saturating_sub(p.in_fill).min(self.free.len());
        if want == 0 {
            return;
        }
        let start = self.free.len() - want;
        // SAFETY: these descriptors are free frames of this UMEM that we own;
        // the kernel owns them once they are in the fill ring.
        let given = unsafe { p.fill.produce(&self.free[start..]) };
        if given > 0 {
            self.free.truncate(self.free.len() - given);
            p.in_fill += given;
        }
        if p.fill.needs_wakeup() {
            let _ = p.fill.wakeup(p.rx.fd_mut(), 0);
        }
    }
}
