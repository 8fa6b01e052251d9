//! Buffers for packets that wait for a handshake ("staged"), shared by the
//! workers (which fill them) and the control thread (which sends or drops them
//! and hands them back). The total is bounded: at most `limit` buffers exist,
//! allocated on first need and recycled afterwards, so a flood of LAN traffic
//! towards peers without a session costs no allocation and no unbounded memory;
//! a packet that finds no buffer is dropped and counted (`staging_full`).

use crossbeam_channel::{Receiver, Sender};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Largest packet a staging buffer is sized for up front (grows if needed).
const BUFFER_CAPACITY: usize = 2048;

#[derive(Debug)]
pub struct StagingPool {
    free_tx: Sender<Vec<u8>>,
    free_rx: Receiver<Vec<u8>>,
    allocated: AtomicUsize,
    limit: usize,
}

impl StagingPool {
    pub fn new(limit: usize) -> Self {
        let (free_tx, free_rx) = crossbeam_channel::bounded(limit.max(1));
        Self { free_tx, free_rx, allocated: AtomicUsize::new(0), limit }
    }

    /// A buffer holding a copy of `packet`, or `None` when every buffer is in use.
    pub fn take(&self, packet: &[u8]) -> Option<Vec<u8>> {
        let mut buf = match self.free_rx.try_recv() {
            Ok(buf) => buf,
            Err(_) => {
                let mut n = self.allocated.load(Ordering::Relaxed);
                loop {
                    if n >= self.limit {
                        return None;
                    }
                    match self.allocated.compare_exchange_weak(n, n + 1, Ordering::Relaxed, Ordering::Relaxed) {
                        Ok(_) => break Vec::with_capacity(BUFFER_CAPACITY),
                        Err(cur) => n = cur,
                    }
                }
            }
        };
        buf.clear();
        buf.extend_from_slice(packet);
        Some(buf)
    }

    /// Returns a buffer for reuse.
    pub fn give(&self, buf: Vec<u8>) {
        // Never full: at most `limit` buffers exist and the channel holds `limit`.
        let _ = self.free_tx.try_send(buf);
    }

    /// Buffers currently out of the pool (staged or in flight).
    pub fn in_use(&self) -> usize {
        self.allocated.load(Ordering::Relaxed).saturating_sub(self.free_rx.len())
    }

    pub fn limit(&self) -> usize {
        self.limit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_recycled() {
        let pool = StagingPool::new(3);
        let bufs: Vec<Vec<u8>> = (0..3).map(|i| pool.take(&[i; 10]).unwrap()).collect();
        assert!(pool.take(b"x").is_none(), "the fourth finds no buffer");
        assert_eq!(pool.in_use(), 3);
        let ptr = bufs[0].as_ptr();
        for b in bufs {
            pool.give(b);
        }
        assert_eq!(pool.in_use(), 0);
        let again = pool.take(b"abc").unwrap();
        assert_eq!(again, b"abc");
        assert!(
            [ptr].contains(&again.as_ptr()) || again.capacity() >= BUFFER_CAPACITY,
            "a recycled buffer, not a new allocation"
        );
        assert_eq!(pool.allocated.load(Ordering::Relaxed), 3, "no allocation past the limit");
    }
}
