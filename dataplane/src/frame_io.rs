//! What a worker needs from its queue's packet I/O: batches of received frames
//! from either port (WAN, LAN), frames to fill and send on either port, and a
//! flush per batch. Both ports share one pool of frames, so a frame received
//! on one port can be sent on the other where it lies. `XskQueue` is the real
//! one (two AF_XDP sockets over one UMEM); `MemoryFrames` is an in-memory one,
//! so the whole worker loop can be tested and benchmarked without a NIC.

pub use crate::xsk::{tx_bound, Port};
use crate::xsk::{Frame, XskQueue};

/// A queue's frames and its two ports.
///
/// # Safety
/// A frame's bytes stay valid and at one address from the moment the worker
/// receives or allocates the frame until it releases or sends it, and the
/// implementation reads or writes them in between only through `data` and
/// `with_data_mut`: crypto threads work on them through a pointer taken in
/// `with_data_mut` (`crypto_pool::AeadJob`) while the worker holds the frame.
pub unsafe trait FrameIo {
    /// A frame the worker owns until it releases or sends it.
    type Frame;
    /// Appends up to `max` frames received on `port` to `out`; returns how many.
    fn recv(&mut self, port: Port, out: &mut Vec<Self::Frame>, max: usize) -> usize;
    /// A free frame with room for `len` bytes, if one is available.
    fn alloc(&mut self, len: usize) -> Option<Self::Frame>;
    fn data<'a>(&'a self, frame: &'a Self::Frame) -> &'a [u8];
    /// Runs `f` on the frame's bytes; with `Some(len)`, first sets its length
    /// (at most the frame's capacity: check the length `f` sees).
    fn with_data_mut<R>(&mut self, frame: &mut Self::Frame, len: Option<usize>, f: impl FnOnce(&mut [u8]) -> R) -> R;
    /// Gives a frame back without sending it.
    fn release(&mut self, frame: Self::Frame);
    /// Queues a frame for transmission on `port`; if that port's transmit
    /// backlog is at its bound (`tx_bound`), the frame is freed instead and
    /// counted (`take_tx_full`): one slow link can never hold every frame of
    /// the pool that both ports receive into.
    fn send(&mut self, port: Port, frame: Self::Frame);
    /// Frames `send` dropped at the bound since the last call.
    fn take_tx_full(&mut self) -> u64;
    /// Hands queued frames over and recycles finished ones; once per batch.
    fn flush(&mut self);
}

// A frame is a descriptor of a fixed chunk of the UMEM, mapped for the queue's
// lifetime. SAFETY: the kernel touches a chunk only while it sits in
// a fill or tx ring, never while the worker holds it.
unsafe impl FrameIo for XskQueue {
    type Frame = Frame;

    fn recv(&mut self, port: Port, out: &mut Vec<Frame>, max: usize) -> usize {
        XskQueue::recv(self, port, out, max)
    }
    fn alloc(&mut self, len: usize) -> Option<Frame> {
        XskQueue::alloc(self, len)
    }
    fn data<'a>(&'a self, frame: &'a Frame) -> &'a [u8] {
        XskQueue::data(self, frame)
    }
    fn with_data_mut<R>(&mut self, frame: &mut Frame, len: Option<usize>, f: impl FnOnce(&mut [u8]) -> R) -> R {
        XskQueue::with_data_mut(self, frame, len, f)
    }
    fn release(&mut self, frame: Frame) {
        XskQueue::release(self, frame)
    }
    fn send(&mut self, port: Port, frame: Frame) {
        XskQueue::send(self, port, frame)
    }
    fn take_tx_full(&mut self) -> u64 {
        XskQueue::take_tx_full(self)
    }
    fn flush(&mut self) {
        XskQueue::flush(self)
    }
}

/// A frame of a `MemoryFrames` pool (an index; not `Clone`).
#[derive(Debug)]
pub struct MemoryFrame {
    index: usize,
}

/// An in-memory frame pool with, per port, an rx queue the caller fills
/// (`inject`) and a tx queue it empties (`take_sent`). Frame buffers are
/// allocated once.
#[derive(Debug)]
pub struct MemoryFrames {
    buffers: Vec<Box<[u8]>>,
    lens: Vec<usize>,
    free: Vec<usize>,
    rx: [std::collections::VecDeque<usize>; 2],
    sent: [Vec<usize>; 2],
    /// At most this many frames wait in each port's `sent` (its "tx ring").
    tx_bound: usize,
    tx_full: u64,
}

impl MemoryFrames {
    pub fn new(frames: usize, frame_size: usize) -> Self {
        Self {
            buffers: (0..frames).map(|_| vec![0u8; frame_size].into_boxed_slice()).collect(),
            lens: vec![0; frames],
            free: (0..frames).rev().collect(),
            rx: [(); 2].map(|_| std::collections::VecDeque::with_capacity(frames)),
            sent: [(); 2].map(|_| Vec::with_capacity(frames)),
            tx_bound: tx_bound(frames),
            tx_full: 0,
        }
    }

    /// Queues a copy of `bytes` as a frame received on `port`; false if no
    /// frame is free or it does not fit.
    pub fn inject(&mut self, port: Port, bytes: &[u8]) -> bool {
        let Some(&index) = self.free.last() else { return false };
        if bytes.len() > self.buffers[index].len() {
            return false;
        }
        self.free.pop();
        self.buffers[index][..bytes.len()].copy_from_slice(bytes);
        self.lens[index] = bytes.len();
        self.rx[port as usize].push_back(index);
        true
    }

    /// Frames sent on `port` since the last call, each passed to `f`, then freed.
    pub fn take_sent(&mut self, port: Port, mut f: impl FnMut(&[u8])) -> usize {
        let sent = &mut self.sent[port as usize];
        let n = sent.len();
        for index in sent.drain(..) {
            f(&self.buffers[index][..self.lens[index]]);
            self.free.push(index);
        }
        n
    }

    pub fn free_frames(&self) -> usize {
        self.free.len()
    }

    /// Writes the frames waiting in the rx queues back to memory and drops
    /// them from this core's caches, as a NIC's DMA leaves them (benches: a
    /// copy by `inject` would leave them hot in the caller's cache, which no
    /// NIC does).
    pub fn evict_received(&self) {
        #[cfg(target_arch = "x86_64")]
        for &index in self.rx.iter().flatten() {
            let frame = &self.buffers[index][..self.lens[index]];
            for line in frame.chunks(64) {
                // SAFETY: `line` points into a live buffer; CLFLUSH (SSE2, part
                // of x86-64) only writes the line back and invalidates it.
                unsafe { core::arch::x86_64::_mm_clflush(line.as_ptr()) };
            }
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: MFENCE has no operands; it orders the flushes before what follows.
        unsafe {
            core::arch::x86_64::_mm_mfence()
        };
    }
}

// Every frame is a boxed buffer allocated once in `new`, never reallocated.
// SAFETY: `inject` and `take_sent` touch only frames in the rx and
// sent queues, never one a worker holds.
unsafe impl FrameIo for MemoryFrames {
    type Frame = MemoryFrame;

    fn recv(&mut self, port: Port, out: &mut Vec<MemoryFrame>, max: usize) -> usize {
        let rx = &mut self.rx[port as usize];
        let n = max.min(rx.len());
        out.extend(rx.drain(..n).map(|index| MemoryFrame { index }));
        n
    }

    fn alloc(&mut self, len: usize) -> Option<MemoryFrame> {
        let index = *self.free.last()?;
        if len > self.buffers[index].len() {
            return None;
        }
        self.free.pop();
        self.lens[index] = len;
        Some(MemoryFrame { index })
    }

    fn data<'a>(&'a self, frame: &'a MemoryFrame) -> &'a [u8] {
        &self.buffers[frame.index][..self.lens[frame.index]]
    }

    fn with_data_mut<R>(&mut self, frame: &mut MemoryFrame, len: Option<usize>, f: impl FnOnce(&mut [u8]) -> R) -> R {
        let index = frame.index;
        if let Some(len) = len {
            self.lens[index] = len.min(self.buffers[index].len());
        }
        f(&mut self.buffers[index][..self.lens[index]])
    }

    fn release(&mut self, frame: MemoryFrame) {
        self.free.push(frame.index);
    }

    fn send(&mut self, port: Port, frame: MemoryFrame) {
        if self.sent[port as usize].len() >= self.tx_bound {
            self.tx_full += 1;
            return self.release(frame);
        }
        self.sent[port as usize].push(frame.index);
    }

    fn take_tx_full(&mut self) -> u64 {
        std::mem::take(&mut self.tx_full)
    }

    fn flush(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_cycle_between_ports_without_leaks() {
        let mut m = MemoryFrames::new(4, 64);
        assert!(m.inject(Port::Wan, b"hello"));
        assert!(!m.inject(Port::Wan, &[0u8; 65]), "too big");
        let mut got = Vec::new();
        assert_eq!(m.recv(Port::Lan, &mut got, 8), 0, "nothing arrived on the LAN");
        assert_eq!(m.recv(Port::Wan, &mut got, 8), 1);
        let mut f = got.pop().unwrap();
        assert_eq!(m.data(&f), b"hello");
        m.with_data_mut(&mut f, Some(3), |b| b.copy_from_slice(b"abc"));
        assert_eq!(m.data(&f), b"abc");
        // Received on one port, sent on the other from the same frame.
        m.send(Port::Lan, f);
        let out = m.alloc(10).unwrap();
        m.release(out);
        let mut seen = Vec::new();
        assert_eq!(m.take_sent(Port::Wan, |_| {}), 0);
        assert_eq!(m.take_sent(Port::Lan, |b| seen.extend_from_slice(b)), 1);
        assert_eq!(seen, b"abc");
        assert_eq!(m.free_frames(), 4);
    }
}
