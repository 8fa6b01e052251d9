//! AF_XDP sockets (over xsk-rs): one UMEM and one socket per (interface, queue).
//!
//! **Frame ownership.** Every frame of a socket's UMEM is at any moment in
//! exactly one place: the fill ring or rx ring (the kernel's), the tx ring or
//! completion ring (the kernel's), or in our hands as a `Frame`. A `Frame` is
//! not `Clone`, carries the id of the socket it belongs to, and is created only
//! from a descriptor the kernel handed back (rx or completion) or that was never
//! given away. Frame memory is reachable only through a `Frame` and its own
//! socket, so we never touch memory the kernel owns or another socket's UMEM.
//! A `Frame` goes back to the kernel through `send` (tx) or `release` (the free
//! list, from which the fill ring is topped up).

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
    #[error("cannot bind an AF_XDP socket to {iface} queue {queue}: {reason} (does the kernel support AF_XDP?)")]
    Bind { iface: String, queue: u32, reason: String },
}

/// Sizes of one socket's UMEM and rings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XskConfig {
    /// Frames in the UMEM (power of two); half start in the fill ring.
    pub frame_count: u32,
    /// 2048 or 4096.
    pub frame_size: u32,
    /// Entries in each of the four rings (power of two).
    pub ring_size: u32,
    /// Try a zero-copy bind first (falls back to copy mode).
    pub zero_copy: bool,
}

impl Default for XskConfig {
    fn default() -> Self {
        Self { frame_count: 4096, frame_size: 2048, ring_size: 2048, zero_copy: true }
    }
}

/// How the socket was bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindMode {
    ZeroCopy,
    Copy,
}

/// A frame we own; see the module documentation.
#[derive(Debug)]
pub struct Frame {
    desc: FrameDesc,
    socket: u32,
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

pub struct XskSocket {
    id: u32,
    umem: Umem,
    fill: FillQueue,
    comp: CompQueue,
    rx: RxQueue,
    tx: TxQueue,
    mode: BindMode,
    /// Frames in our hands that carry nothing: for tx, or to refill the fill ring.
    free: Vec<FrameDesc>,
    /// Frames queued by `send`, handed to the tx ring by `flush`.
    pending_tx: Vec<FrameDesc>,
    scratch: Vec<FrameDesc>,
    /// How many frames to keep in the fill ring.
    fill_target: usize,
    in_fill: usize,
    in_tx: usize,
    capacity: usize,
}

impl core::fmt::Debug for XskSocket {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("XskSocket").field("mode", &self.mode).field("free", &self.free.len()).finish_non_exhaustive()
    }
}

fn queue_size(n: u32) -> Result<QueueSize, XskError> {
    QueueSize::new(n).map_err(|e| XskError::Config(e.to_string()))
}

impl XskSocket {
    /// Binds a socket to `iface` queue `queue` in the calling thread's network
    /// namespace. Never loads an XDP program (ours steers into it via the XSKMAP).
    pub fn bind(iface: &str, queue: u32, cfg: &XskConfig) -> Result<Self, XskError> {
        let bind_err = |reason: String| XskError::Bind { iface: iface.to_owned(), queue, reason };
        let name: Interface = iface.parse().map_err(|e| bind_err(format!("{e:?}")))?;
        let attempts: &[(BindMode, BindFlags)] = if cfg.zero_copy {
            &[(BindMode::ZeroCopy, BindFlags::XDP_ZEROCOPY), (BindMode::Copy, BindFlags::XDP_COPY)]
        } else {
            &[(BindMode::Copy, BindFlags::XDP_COPY)]
        };
        let mut last_error = String::new();
        for &(mode, flags) in attempts {
            let umem_cfg = UmemConfig::builder()
                .frame_size(FrameSize::new(cfg.frame_size).map_err(|e| XskError::Config(e.to_string()))?)
                .fill_queue_size(queue_size(cfg.ring_size)?)
                .comp_queue_size(queue_size(cfg.ring_size)?)
                .build()
                .map_err(|e| XskError::Config(e.to_string()))?;
            let frames = NonZeroU32::new(cfg.frame_count).ok_or_else(|| XskError::Config("frame_count is 0".into()))?;
            let (umem, descs) = Umem::new(umem_cfg, frames, false).map_err(|e| XskError::Umem {
                frames: cfg.frame_count,
                frame_size: cfg.frame_size,
                reason: e.to_string(),
            })?;
            let socket_cfg = SocketConfig::builder()
                .rx_queue_size(queue_size(cfg.ring_size)?)
                .tx_queue_size(queue_size(cfg.ring_size)?)
                .libxdp_flags(LibxdpFlags::XSK_LIBXDP_FLAGS_INHIBIT_PROG_LOAD)
                .bind_flags(flags | BindFlags::XDP_USE_NEED_WAKEUP)
                .build();
            // SAFETY: the UMEM is new and not shared with any other socket, so the
            // double-free hazard xsk-rs documents for shared UMEMs cannot arise.
            match unsafe { Socket::new(socket_cfg, &umem, &name, queue) } {
                Ok((tx, rx, Some((fill, comp)))) => {
                    if mode == BindMode::Copy && cfg.zero_copy {
                        tracing::info!(%iface, queue, reason = %last_error, "zero-copy unavailable; AF_XDP in copy mode");
                    }
                    return Ok(Self::new(umem, descs, fill, comp, rx, tx, mode, cfg));
                }
                Ok(_) => return Err(bind_err("the socket came without fill/completion rings".into())),
                Err(e) => last_error = e.to_string(),
            }
        }
        Err(bind_err(last_error))
    }

    #[allow(clippy::too_many_arguments)]
    fn new(
        umem: Umem,
        descs: Vec<FrameDesc>,
        fill: FillQueue,
        comp: CompQueue,
        rx: RxQueue,
        tx: TxQueue,
        mode: BindMode,
        cfg: &XskConfig,
    ) -> Self {
        static NEXT_ID: AtomicU32 = AtomicU32::new(1);
        let capacity = descs.len();
        let ring = cfg.ring_size as usize;
        let mut s = Self {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            umem,
            fill,
            comp,
            rx,
            tx,
            mode,
            free: descs,
            pending_tx: Vec::with_capacity(ring),
            scratch: vec![FrameDesc::default(); ring],
            fill_target: (capacity / 2).min(ring),
            in_fill: 0,
            in_tx: 0,
            capacity,
        };
        s.top_up_fill();
        s
    }

    pub fn mode(&self) -> BindMode {
        self.mode
    }

    /// The socket's descriptor, for the XSKMAP.
    pub fn raw_fd(&self) -> RawFd {
        self.rx.fd().as_raw_fd()
    }

    /// Frames neither with the kernel nor queued: free for `alloc`.
    pub fn free_frames(&self) -> usize {
        self.free.len()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Receives up to `max` frames into `out` (appended); returns how many.
    pub fn recv(&mut self, out: &mut Vec<Frame>, max: usize) -> usize {
        let n = max.min(self.scratch.len());
        // SAFETY: `scratch` holds plain descriptors that the kernel overwrites; the
        // ones it returns are frames of this socket's UMEM, now ours (module docs).
        let got = unsafe { self.rx.consume(&mut self.scratch[..n]) };
        self.in_fill -= got.min(self.in_fill);
        out.extend(self.scratch[..got].iter().map(|&desc| Frame { desc, socket: self.id }));
        got
    }

    /// A free frame with room for `len` bytes of data, if one is available.
    pub fn alloc(&mut self, len: usize) -> Option<Frame> {
        if self.free.is_empty() {
            self.reclaim_completions();
        }
        let mut desc = self.free.pop()?;
        let socket = self.id;
        let mut frame = Frame { desc, socket };
        let fits = self.with_data_mut(&mut frame, Some(len), |buf| buf.len() == len);
        if !fits {
            desc = frame.desc;
            self.free.push(desc);
            return None;
        }
        Some(frame)
    }

    fn check(&self, frame: &Frame) {
        assert_eq!(frame.socket, self.id, "a frame was used with a socket it does not belong to");
    }

    /// The frame's packet bytes.
    pub fn data<'a>(&'a self, frame: &'a Frame) -> &'a [u8] {
        self.check(frame);
        // SAFETY: `frame` belongs to this socket (checked) and is ours, so the
        // kernel is not writing it and no `&mut` to it exists (we hold `&Frame`).
        unsafe { self.umem.data(&frame.desc) }.contents()
    }

    /// Runs `f` on the frame's bytes; with `Some(len)`, first sets the packet
    /// length to `len` (capped at the frame's capacity).
    pub fn with_data_mut<R>(&self, frame: &mut Frame, len: Option<usize>, f: impl FnOnce(&mut [u8]) -> R) -> R {
        self.check(frame);
        // SAFETY: `frame` belongs to this socket (checked), is ours (module docs),
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

    /// Queues a frame for transmission (its length is its packet length).
    pub fn send(&mut self, frame: Frame) {
        self.check(&frame);
        self.pending_tx.push(frame.desc);
    }

    /// Hands queued frames to the kernel, wakes it if it asks, reclaims sent
    /// frames and tops up the fill ring. Call once per batch.
    pub fn flush(&mut self) {
        if !self.pending_tx.is_empty() {
            // SAFETY: every pending descriptor is a frame of this UMEM that we owned
            // (only `send` adds them); the kernel owns them from here on.
            let sent = unsafe { self.tx.produce(&self.pending_tx) };
            if sent == 0 {
                // The ring is full: produce is all-or-nothing, so try fewer.
                let room = self.tx.nb_free(self.pending_tx.len() as u32) as usize;
                // SAFETY: as above, for a prefix of the same descriptors.
                let sent = unsafe { self.tx.produce(&self.pending_tx[..room]) };
                self.in_tx += sent;
                self.pending_tx.drain(..sent);
            } else {
                self.in_tx += sent;
                self.pending_tx.clear();
            }
        }
        if self.in_tx > 0 && self.tx.needs_wakeup() {
            if let Err(e) = self.tx.wakeup() {
                if e.raw_os_error() != Some(libc::EAGAIN) && e.raw_os_error() != Some(libc::EBUSY) {
                    tracing::debug!(error = %e, "AF_XDP tx wakeup failed");
                }
            }
        }
        self.reclaim_completions();
        self.top_up_fill();
    }

    fn reclaim_completions(&mut self) {
        if self.in_tx == 0 {
            return;
        }
        // SAFETY: completed descriptors are frames of this UMEM the kernel has
        // finished sending; they are ours again.
        let done = unsafe { self.comp.consume(&mut self.scratch) };
        self.in_tx -= done.min(self.in_tx);
        self.free.extend_from_slice(&self.scratch[..done]);
    }

    fn top_up_fill(&mut self) {
        let want = self.fill_target.saturating_sub(self.in_fill).min(self.free.len());
        if want == 0 {
            return;
        }
        let start = self.free.len() - want;
        // SAFETY: these descriptors are free frames of this UMEM that we own; the
        // kernel owns them once they are in the fill ring.
        let given = unsafe { self.fill.produce(&self.free[start..]) };
        if given > 0 {
            self.free.truncate(self.free.len() - given);
            self.in_fill += given;
        }
        if self.fill.needs_wakeup() {
            let _ = self.fill.wakeup(self.rx.fd_mut(), 0);
        }
    }

    /// Waits up to `timeout_ms` for received frames (for idle workers).
    pub fn poll_rx(&mut self, timeout_ms: i32) -> bool {
        self.rx.poll(timeout_ms).unwrap_or(false)
    }
}
