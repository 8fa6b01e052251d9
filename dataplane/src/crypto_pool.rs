//! Parallel AEAD for one tunnel, delivered in order.
//!
//! A tunnel is one UDP 5-tuple, so RSS puts all of it on one queue and one
//! worker. With `crypto_threads > 1` that worker (the *owner*) still parses,
//! routes and decides every packet, and assigns every send counter, but the
//! ChaCha20-Poly1305 work goes through a `SequenceRing`: the owner publishes a
//! job per packet (a descriptor of a frame in the shared UMEM, never a copy),
//! helper threads and the owner itself claim jobs in publication order, and the
//! owner delivers completions strictly in publication order (`next_in_order`):
//! it forwards only the head, helping with unclaimed work while the head is
//! still being processed. Publication order is arrival order on the queue, so
//! every peer's packets leave in the order they came, the replay window records
//! counters in that order after authentication, and the endpoint follows the
//! last authenticated packet. A job that fails (a forged packet) completes as
//! failed and releases its slot at once: it never stalls the packets behind it.
//!
//! One ring per worker, one pool of helpers for all rings. Helpers spin briefly
//! when they run out of work, then park; an owner that publishes wakes parked
//! helpers (a missed wake-up costs at most `PARK` of help, never a packet: the
//! owner works through its own ring).

use crate::noise::Keypair;
use std::cell::UnsafeCell;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

/// A pause in a wait loop that ends within a job's time. Not the CPU's
/// `pause` hint: under a hypervisor a `pause` loop makes the virtual CPU
/// exit (pause-loop exiting) and lose its time slice, which costs far more
/// than the wait.
#[inline]
fn relax() {
    std::hint::black_box(());
}

/// Work a thread runs on a job it claimed: `Some(value)` on success, `None`
/// when it failed.
pub trait Job: Copy + Send + 'static {
    /// # Safety
    /// Only the thread that claimed the job from its ring runs it, once,
    /// before the job's outcome is stored (what the job points at is valid
    /// only until then).
    unsafe fn run(&self) -> Option<u32>;

    /// Roughly how much work it is (bytes through the AEAD): a claim takes
    /// many small jobs at once, fewer large ones.
    fn size(&self) -> u32;

    /// Starts loading what `run` will touch (a hint: it reads and writes
    /// nothing): called for every job of a claim before the first runs, and
    /// by the owner for a finished job it is about to deliver.
    fn prefetch(&self) {}
}

/// Jobs a helper claims at once, at most, and bytes of AEAD they may add up
/// to: one contended update of the claim counter for all of them, and their
/// slots and frames prefetched together, so the misses on lines the owner
/// wrote overlap instead of stalling one after another (32 jobs of 64 bytes,
/// 22 of 1420, 3 jumbo frames). The owner never waits for more than the
/// oldest of them: a claim runs oldest first.
const HELPER_CLAIM: u64 = 32;
const HELPER_CLAIM_BYTES: u32 = 32768;

/// The same for the owner, while it waits for the oldest job's outcome: a
/// few at a time (it has its own work to get back to).
const OWNER_CLAIM: u64 = 4;
const OWNER_CLAIM_BYTES: u32 = 8192;

/// How long an idle helper spins before it parks, and how long it parks at most.
const SPIN: Duration = Duration::from_micros(200);
const PARK: Duration = Duration::from_millis(5);

/// A slot's outcome word: 0 while pending; `DONE`, with `OK` and the value.
const DONE: u64 = 1 << 63;
const OK: u64 = 1 << 62;
/// The owner ran it (for `take_offloaded`).
const HERE: u64 = 1 << 61;

/// One job and its outcome, on a cache line of its own: the owner filling
/// the next slot never stalls a helper finishing this one.
#[repr(align(64))]
struct Slot<J> {
    job: UnsafeCell<MaybeUninit<J>>,
    /// `Job::size` of the job, readable before it is claimed.
    size: AtomicU32,
    outcome: AtomicU64,
}

/// Keeps a hot atomic on its own cache lines (no false sharing between the
/// owner's and the helpers' counters).
#[repr(align(128))]
struct Padded<T>(T);

/// The shared half of one worker's ring; see the module documentation.
pub struct SequenceRing<J> {
    slots: Box<[Slot<J>]>,
    mask: u64,
    /// Jobs `[0, published)` are written (only the owner stores).
    published: Padded<AtomicU64>,
    /// The next job to claim (the owner and helpers advance it).
    claimed: Padded<AtomicU64>,
    wake: Arc<Wake>,
}

impl<J> core::fmt::Debug for SequenceRing<J> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SequenceRing")
            .field("slots", &self.slots.len())
            .field("published", &self.published.0.load(Ordering::Relaxed))
            .field("claimed", &self.claimed.0.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

// A slot's `job` is written only by the owner, before it publishes the slot
// (Release on `published`), and only after the owner took the previous job's
// outcome, which its claimer stored after its last read of the job.
// SAFETY: claimers read a job only after claiming an index below `published`
// (Acquire), and the owner reads only jobs it wrote itself, so no read races
// a write; every other field is atomic.
unsafe impl<J: Job> Sync for SequenceRing<J> {}

impl<J: Job> SequenceRing<J> {
    /// Claims up to `max` of the oldest unclaimed jobs at once, as long as
    /// they add up to at most `budget` bytes (always at least one): one
    /// contended update for all of them, whose lines load together. Runs
    /// them oldest first, records each outcome; returns how many.
    pub fn work(&self, max: u64, budget: u32) -> usize {
        self.work_as(max, budget, 0)
    }

    /// `work`, keeping `here` (`HERE` or 0) in each outcome: whether the
    /// owner ran it.
    fn work_as(&self, max: u64, budget: u32, here: u64) -> usize {
        let Some(claimed) = self.claim(max, budget) else { return 0 };
        // Should a job panic (or its prefetch), the rest of the claim
        // completes as failed too.
        let mut rest = FailRest { ring: self, next: claimed.start, end: claimed.end };
        // The claim's frames and outcomes load together, not one miss per job.
        for index in claimed.clone() {
            let slot = &self.slots[(index & self.mask) as usize];
            // SAFETY: claimed by this thread: written, and not rewritten
            // before its outcome is stored (a copy of a `Copy` job).
            unsafe { (*slot.job.get()).assume_init_read() }.prefetch();
            crate::prefetch::lines(slot.outcome.as_ptr().cast(), 8, 1);
        }
        for index in claimed.clone() {
            rest.next = index + 1;
            self.run(index, here);
        }
        claimed.count()
    }

    /// Runs the claimed job `index`; `here` (`HERE` or 0) is kept in its
    /// outcome: whether the owner ran it.
    fn run(&self, index: u64, here: u64) {
        let slot = &self.slots[(index & self.mask) as usize];
        // (`index` was published: its job written before the Release store
        // this thread's Acquire load saw.)
        // SAFETY: claimed by this thread alone; not rewritten before its outcome.
        let job = unsafe { (*slot.job.get()).assume_init_read() };
        // Failed unless the job returns: a panicking job must not leave its
        // owner waiting forever.
        let mut outcome = Outcome { slot: &slot.outcome, value: DONE | here };
        // SAFETY: this thread claimed the job just now, and runs it once,
        // before `outcome` stores its result.
        if let Some(value) = unsafe { job.run() } {
            outcome.value = DONE | OK | here | u64::from(value);
        }
    }

    /// Claims the oldest published, unclaimed jobs (see `work`).
    fn claim(&self, max: u64, budget: u32) -> Option<core::ops::Range<u64>> {
        let mut next = self.claimed.0.load(Ordering::Relaxed);
        loop {
            let published = self.published.0.load(Ordering::Acquire);
            if next >= published {
                return None;
            }
            let mut end = next + 1;
            let mut bytes = self.slots[(next & self.mask) as usize].size.load(Ordering::Relaxed);
            while end < published.min(next + max) {
                bytes = bytes.saturating_add(self.slots[(end & self.mask) as usize].size.load(Ordering::Relaxed));
                if bytes > budget {
                    break;
                }
                end += 1;
            }
            match self.claimed.0.compare_exchange_weak(next, end, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return Some(next..end),
                Err(now) => next = now,
            }
        }
    }

    fn has_unclaimed(&self) -> bool {
        self.claimed.0.load(Ordering::SeqCst) < self.published.0.load(Ordering::SeqCst)
    }
}

/// Completes the claimed jobs `next..end` as failed when dropped before they
/// ran (a job of the same claim panicked).
struct FailRest<'a, J> {
    ring: &'a SequenceRing<J>,
    next: u64,
    end: u64,
}

impl<J> Drop for FailRest<'_, J> {
    fn drop(&mut self) {
        for index in self.next..self.end {
            self.ring.slots[(index & self.ring.mask) as usize].outcome.store(DONE, Ordering::Release);
        }
    }
}

/// Stores a job's outcome when dropped (also while unwinding).
struct Outcome<'a> {
    slot: &'a AtomicU64,
    value: u64,
}

impl Drop for Outcome<'_> {
    fn drop(&mut self) {
        self.slot.store(self.value, Ordering::Release);
    }
}

/// The owning thread's half of a ring: it publishes jobs, each with a `local`
/// value that never leaves this thread (e.g. the frame), and takes them back
/// in publication order.
pub struct RingOwner<J, L> {
    ring: Arc<SequenceRing<J>>,
    local: Box<[Option<L>]>,
    /// The oldest job not delivered yet, the next to queue, and how far the
    /// helpers may claim.
    head: u64,
    tail: u64,
    published: u64,
    /// Jobs delivered, and jobs this thread ran itself, since `take_offloaded`.
    delivered: u64,
    ran_here: u64,
}

impl<J, L> core::fmt::Debug for RingOwner<J, L> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("RingOwner").field("in_flight", &(self.tail - self.head)).finish_non_exhaustive()
    }
}

impl<J: Job, L> RingOwner<J, L> {
    /// Queues `job` (visible to the helpers at the next `publish`, or when
    /// this thread waits in `next_in_order`); gives both back when the ring
    /// is full (take a completion with `next_in_order` first).
    pub fn push(&mut self, job: J, local: L) -> Result<(), (J, L)> {
        if self.tail - self.head > self.ring.mask {
            return Err((job, local));
        }
        let index = (self.tail & self.ring.mask) as usize;
        let slot = &self.ring.slots[index];
        // SAFETY: the slot is not published (index ≥ `published`) and its
        // previous job was delivered (`head` passed it), so no claimer reads it.
        unsafe { (*slot.job.get()).write(job) };
        slot.size.store(job.size(), Ordering::Relaxed);
        self.local[index] = Some(local);
        self.tail += 1;
        Ok(())
    }

    /// Jobs delivered since the last call that another thread ran.
    pub fn take_offloaded(&mut self) -> u64 {
        let n = self.delivered.saturating_sub(self.ran_here);
        (self.delivered, self.ran_here) = (0, 0);
        n
    }

    /// True when nothing is in flight.
    pub fn is_empty(&self) -> bool {
        self.head == self.tail
    }

    /// The sequence number the next job queued gets (jobs are numbered from
    /// 0 in queueing order; a full ring's `push` does not take one).
    pub fn next_seq(&self) -> u64 {
        self.tail
    }

    /// The sequence number of the oldest job in flight (the next delivered).
    pub fn head_seq(&self) -> u64 {
        self.head
    }

    /// Jobs published and not taken back yet.
    pub fn in_flight(&self) -> usize {
        (self.tail - self.head) as usize
    }

    /// The oldest job in flight with its outcome if it has one already (no
    /// waiting).
    pub fn next_ready(&mut self) -> Option<(L, Option<u32>)> {
        let slot = &self.ring.slots[(self.head & self.ring.mask) as usize];
        if self.is_empty() || slot.outcome.load(Ordering::Acquire) & DONE == 0 {
            return None;
        }
        self.next_in_order()
    }

    /// The oldest job in flight with its outcome, once it has one (helping
    /// with unclaimed jobs, oldest first, while it has none); `None` when
    /// nothing is in flight.
    pub fn next_in_order(&mut self) -> Option<(L, Option<u32>)> {
        if self.is_empty() {
            return None;
        }
        self.publish();
        let index = (self.head & self.ring.mask) as usize;
        let slot = &self.ring.slots[index];
        let mut outcome = slot.outcome.load(Ordering::Acquire);
        let mut idle = 0u32;
        while outcome & DONE == 0 {
            if self.ring.work_as(OWNER_CLAIM, OWNER_CLAIM_BYTES, HERE) == 0 {
                idle += 1;
                // The head's claimer was preempted (a job takes microseconds):
                // let the scheduler run it rather than spin through its slice.
                if idle.is_multiple_of(4096) {
                    std::thread::yield_now();
                } else {
                    relax();
                }
            }
            outcome = slot.outcome.load(Ordering::Acquire);
        }
        slot.outcome.store(0, Ordering::Relaxed);
        self.head += 1;
        self.prefetch_ahead();
        self.delivered += 1;
        self.ran_here += u64::from(outcome & HERE != 0);
        let local = self.local[index].take()?;
        Some((local, (outcome & OK != 0).then_some(outcome as u32)))
    }

    /// Starts loading what delivering the next jobs will read: the frame of
    /// the job `DELIVERY_AHEAD` places after the head when it is finished,
    /// and the outcome line of the one as far again after it.
    fn prefetch_ahead(&self) {
        let done = self.head + DELIVERY_AHEAD;
        if done < self.tail {
            let slot = &self.ring.slots[(done & self.ring.mask) as usize];
            if slot.outcome.load(Ordering::Relaxed) & DONE != 0 {
                // SAFETY: a published job, not rewritten before it is
                // delivered (by this thread); claimers only read it.
                unsafe { (*slot.job.get()).assume_init_read() }.prefetch();
            }
        }
        let later = done + DELIVERY_AHEAD;
        if later < self.tail {
            let slot = &self.ring.slots[(later & self.ring.mask) as usize];
            crate::prefetch::lines(slot.outcome.as_ptr().cast(), 8, 1);
        }
    }
}

/// How many jobs after the head delivery loads ahead.
const DELIVERY_AHEAD: u64 = 8;

impl<J, L> RingOwner<J, L> {
    /// Makes the queued jobs visible to the helpers (once per batch: one
    /// store the helpers read, not one per job) and wakes a parked one.
    pub fn publish(&mut self) {
        if self.published < self.tail {
            self.published = self.tail;
            self.ring.published.0.store(self.tail, Ordering::Release);
            // Pairs with the helper's SeqCst store of `asleep` and load of
            // `published`: one of the two sides sees the other's store.
            std::sync::atomic::fence(Ordering::SeqCst);
            self.ring.wake.notify();
        }
    }
}

impl<J, L> Drop for RingOwner<J, L> {
    fn drop(&mut self) {
        // Claimed jobs may still be writing into memory their locals own (frames).
        self.publish();
        while self.head < self.tail {
            let slot = &self.ring.slots[(self.head & self.ring.mask) as usize];
            if slot.outcome.load(Ordering::Acquire) & DONE != 0 {
                slot.outcome.store(0, Ordering::Relaxed);
                self.head += 1;
            } else if !self.ring.claim_and_skip(self.head) {
                relax();
            }
        }
    }
}

impl<J> SequenceRing<J> {
    /// On the owner's drop: completes unclaimed jobs up to `head` without
    /// running them (their frames go away with the owner).
    fn claim_and_skip(&self, head: u64) -> bool {
        let next = self.claimed.0.load(Ordering::Relaxed);
        if next > head || next >= self.published.0.load(Ordering::Acquire) {
            return false;
        }
        if self.claimed.0.compare_exchange(next, next + 1, Ordering::AcqRel, Ordering::Relaxed).is_err() {
            return false;
        }
        self.slots[(next & self.mask) as usize].outcome.store(DONE, Ordering::Release);
        true
    }
}

/// Parked helpers, woken when an owner publishes.
#[derive(Default)]
struct Wake {
    helpers: OnceLock<Vec<(Thread, Arc<AtomicBool>)>>,
}

impl Wake {
    /// Wakes one parked helper, if any (one per `publish`: a busy ring keeps
    /// waking more).
    fn notify(&self) {
        self.wake_parked(1);
    }

    /// Wakes up to `max` parked helpers (a woken one finds its flag cleared).
    fn wake_parked(&self, max: usize) {
        let parked = self.helpers.get().map(Vec::as_slice).unwrap_or_default().iter();
        for (thread, _) in parked
            .filter(|(_, asleep)| asleep.load(Ordering::Relaxed) && asleep.swap(false, Ordering::AcqRel))
            .take(max)
        {
            thread.unpark();
        }
    }
}

/// The rings of all workers, before the helpers start.
pub struct CryptoPoolBuilder<J> {
    wake: Arc<Wake>,
    rings: Vec<Arc<SequenceRing<J>>>,
}

impl<J> core::fmt::Debug for CryptoPoolBuilder<J> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("CryptoPoolBuilder").field("rings", &self.rings.len()).finish_non_exhaustive()
    }
}

impl<J: Job> Default for CryptoPoolBuilder<J> {
    fn default() -> Self {
        Self { wake: Arc::default(), rings: Vec::new() }
    }
}

impl<J: Job> CryptoPoolBuilder<J> {
    /// A new ring of `capacity` (a power of two) slots, for one owner.
    pub fn ring<L>(&mut self, capacity: usize) -> RingOwner<J, L> {
        let capacity = capacity.next_power_of_two().max(2);
        let slots = (0..capacity)
            .map(|_| Slot {
                job: UnsafeCell::new(MaybeUninit::uninit()),
                size: AtomicU32::new(0),
                outcome: AtomicU64::new(0),
            })
            .collect();
        let ring = Arc::new(SequenceRing {
            slots,
            mask: capacity as u64 - 1,
            published: Padded(AtomicU64::new(0)),
            claimed: Padded(AtomicU64::new(0)),
            wake: self.wake.clone(),
        });
        self.rings.push(ring.clone());
        let local = (0..capacity).map(|_| None).collect();
        RingOwner { ring, local, head: 0, tail: 0, published: 0, delivered: 0, ran_here: 0 }
    }

    /// Starts `helpers` threads over every ring, helper `i` pinned to
    /// `cores[i % len]` when `cores` is not empty.
    pub fn start(self, helpers: usize, cores: &[usize]) -> std::io::Result<CryptoPool> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::with_capacity(helpers);
        let mut handles = Vec::with_capacity(helpers);
        for i in 0..helpers {
            let (rings, halt) = (self.rings.clone(), stop.clone());
            let asleep = Arc::new(AtomicBool::new(false));
            let core = (!cores.is_empty()).then(|| cores[i % cores.len()]);
            let flag = asleep.clone();
            let spawned = std::thread::Builder::new().name(format!("wgxdp-crypto{i}")).spawn(move || {
                if let Some(id) = core {
                    if !core_affinity::set_for_current(core_affinity::CoreId { id }) {
                        tracing::warn!(helper = i, core = id, "could not pin the crypto thread");
                    }
                }
                help(&rings, &flag, &halt, i);
            });
            match spawned {
                Ok(t) => {
                    handles.push((t.thread().clone(), asleep));
                    threads.push(t);
                }
                Err(e) => {
                    stop.store(true, Ordering::Relaxed);
                    for t in &threads {
                        t.thread().unpark();
                    }
                    return Err(e);
                }
            }
        }
        let _ = self.wake.helpers.set(handles);
        Ok(CryptoPool { stop, wake: self.wake, threads })
    }
}

/// A helper's loop: the rings' oldest jobs, round-robin from its own offset.
/// After work it spins for `SPIN` (traffic comes in batches), then parks
/// until an owner publishes (or `PARK` passes: a missed wake-up costs that
/// much help, never a packet). An idle helper only wakes every `PARK`.
fn help<J: Job>(rings: &[Arc<SequenceRing<J>>], asleep: &AtomicBool, stop: &AtomicBool, offset: usize) {
    let mut idle_since: Option<Instant> = None;
    let mut spins = 0u32;
    while !stop.load(Ordering::Relaxed) {
        let mut worked = false;
        for k in 0..rings.len() {
            worked |= rings[(offset + k) % rings.len()].work(HELPER_CLAIM, HELPER_CLAIM_BYTES) > 0;
        }
        if worked {
            idle_since = None;
            spins = 0;
            continue;
        }
        spins = spins.wrapping_add(1);
        if !spins.is_multiple_of(64) {
            relax();
            continue;
        }
        let since = *idle_since.get_or_insert_with(Instant::now);
        if since.elapsed() < SPIN {
            continue;
        }
        asleep.store(true, Ordering::SeqCst);
        if rings.iter().any(|r| r.has_unclaimed()) || stop.load(Ordering::SeqCst) {
            asleep.store(false, Ordering::Relaxed);
            continue;
        }
        std::thread::park_timeout(PARK);
        // A waker (`notify`, `wake_all`) cleared the flag: look for work for
        // `SPIN` again. A timeout (or a spurious return) without work: straight
        // back to sleep.
        if !asleep.swap(false, Ordering::AcqRel) {
            (idle_since, spins) = (None, 0);
        } else if !rings.iter().any(|r| r.has_unclaimed()) {
            spins = 63;
        }
    }
}

/// The running helpers; stopped and joined on drop.
pub struct CryptoPool {
    stop: Arc<AtomicBool>,
    wake: Arc<Wake>,
    threads: Vec<JoinHandle<()>>,
}

impl core::fmt::Debug for CryptoPool {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("CryptoPool").field("helpers", &self.threads.len()).finish_non_exhaustive()
    }
}

impl CryptoPool {
    pub fn helpers(&self) -> usize {
        self.threads.len()
    }

    /// Wakes every parked helper: it looks for work for `SPIN` before it
    /// parks again (for a caller that knows traffic is about to come).
    pub fn wake_all(&self) {
        self.wake.wake_parked(usize::MAX);
    }
}

impl Drop for CryptoPool {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for (thread, _) in self.wake.helpers.get().map(Vec::as_slice).unwrap_or_default() {
            thread.unpark();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Lines of a job's frame loaded ahead: a small message whole, a large one's
/// start.
const PREFETCH_LINES: usize = 4;

/// What a transport job does to its frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AeadOp {
    /// Authenticate and decrypt the ciphertext at `buf[src..]` to `buf[..]`.
    Open { src: usize },
    /// Move the inner packet at `buf[inner_at..][..len]` behind the message's
    /// header at `buf[message_at..]`, write the header and padding, encrypt.
    Seal { inner_at: usize, message_at: usize, len: usize },
}

/// The AEAD of one transport message, by descriptor: a keypair and a frame's
/// bytes that the owning worker keeps alive, and does not touch, until it
/// takes the outcome back from its ring. Small enough that a slot (job and
/// outcome) is one cache line: one transfer between cores per job and side.
#[derive(Debug, Clone, Copy)]
pub struct AeadJob {
    keypair: *const Keypair,
    counter: u64,
    buf: *mut u8,
    /// `buf`'s length and the operation's offsets, narrowed: a frame is far
    /// below 4 GiB, and an offset that does not fit fails the job's bounds
    /// checks (`u32::MAX`), a length that does not fit shortens the slice.
    len: u32,
    op: Op,
}

/// `AeadOp` in 32-bit offsets.
#[derive(Debug, Clone, Copy)]
enum Op {
    Open { src: u32 },
    Seal { inner_at: u32, message_at: u32, len: u32 },
}

fn narrow(value: usize) -> u32 {
    u32::try_from(value).unwrap_or(u32::MAX)
}

// SAFETY: the pointers are only dereferenced in `run`, by the one thread that
// claimed the job; see `AeadJob::new` for why they stay valid and unaliased.
unsafe impl Send for AeadJob {}

impl AeadJob {
    /// # Safety
    /// Until the job's outcome is taken back from its ring (`next_in_order`,
    /// or the owner's drop), `keypair` must stay alive and `buf` must stay
    /// valid, at the same address, and be neither read nor written by anyone
    /// else (the owning worker pins the keypair until the job is taken back,
    /// keeps the frame in the job's local and does not touch its bytes).
    pub unsafe fn new(keypair: &Keypair, counter: u64, buf: *mut [u8], op: AeadOp) -> Self {
        let op = match op {
            AeadOp::Open { src } => Op::Open { src: narrow(src) },
            AeadOp::Seal { inner_at, message_at, len } => {
                Op::Seal { inner_at: narrow(inner_at), message_at: narrow(message_at), len: narrow(len) }
            }
        };
        Self { keypair, counter, buf: buf.cast::<u8>(), len: narrow(buf.len()), op }
    }
}

impl Job for AeadJob {
    fn size(&self) -> u32 {
        self.len
    }

    /// The message's first lines; the hardware prefetcher streams the rest.
    fn prefetch(&self) {
        crate::prefetch::lines(self.buf, self.len as usize, PREFETCH_LINES);
    }

    unsafe fn run(&self) -> Option<u32> {
        // SAFETY: `new`'s contract and `run`'s: the keypair is alive and the
        // bytes are this thread's alone until the outcome is stored (`len`
        // is at most the slice's length).
        let (keypair, buf) = unsafe { (&*self.keypair, std::slice::from_raw_parts_mut(self.buf, self.len as usize)) };
        match self.op {
            Op::Open { src } => keypair.decrypt(self.counter, buf, src as usize).ok().map(narrow),
            Op::Seal { inner_at, message_at, len } => {
                let (inner_at, message_at, len) = (inner_at as usize, message_at as usize, len as usize);
                let body = message_at + crate::wire::TRANSPORT_HEADER_LEN;
                if inner_at.max(body) + len > buf.len() {
                    return None;
                }
                buf.copy_within(inner_at..inner_at + len, body);
                let message = &mut buf[message_at..];
                keypair.frame_message(message, len, self.counter).ok()?;
                keypair.encrypt_message(message, self.counter);
                Some(0)
            }
        }
    }
}

// A transport job's slot is one cache line.
const _: () = assert!(core::mem::size_of::<Slot<AeadJob>>() == 64);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A fake crypto stage: takes `delay_us` (spinning, as real work does),
    /// fails when `fail`, and counts how often it ran.
    #[derive(Clone, Copy)]
    struct Fake {
        value: u32,
        delay_us: u16,
        fail: bool,
        runs: &'static AtomicU32,
    }

    impl Job for Fake {
        fn size(&self) -> u32 {
            u32::from(self.delay_us) * 50
        }

        unsafe fn run(&self) -> Option<u32> {
            assert!(self.delay_us != PANICS, "a job that panics");
            let until = Instant::now() + Duration::from_micros(u64::from(self.delay_us));
            while Instant::now() < until {
                core::hint::spin_loop();
            }
            self.runs.fetch_add(1, Ordering::Relaxed);
            (!self.fail).then_some(self.value)
        }
    }

    /// A `Fake::delay_us` that makes the job panic.
    const PANICS: u16 = u16::MAX;

    /// A job that panics completes as failed, and so does the rest of the
    /// claim it was part of: its owner never waits forever.
    #[test]
    fn a_panicking_job_fails_its_whole_claim_instead_of_hanging_the_owner() {
        let counter = runs();
        let mut builder = CryptoPoolBuilder::<Fake>::default();
        let mut owner = builder.ring::<u8>(8);
        let job = |delay_us| Fake { value: 9, delay_us, fail: false, runs: counter };
        for (i, delay) in [PANICS, 0, 0].into_iter().enumerate() {
            owner.push(job(delay), i as u8).map_err(|_| ()).unwrap();
        }
        owner.publish();
        let ring = owner.ring.clone();
        let claimed_three = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || ring.work(4, u32::MAX)));
        assert!(claimed_three.is_err(), "the first job panicked");
        let delivered: Vec<_> = std::iter::from_fn(|| owner.next_in_order()).collect();
        assert_eq!(delivered, vec![(0, None), (1, None), (2, None)]);
    }

    fn runs() -> &'static AtomicU32 {
        Box::leak(Box::new(AtomicU32::new(0)))
    }

    /// Publishes `jobs` (delay, fails) through a ring of `capacity` with
    /// `helpers` helper threads, taking completions whenever the ring is full
    /// and at the end; returns what was delivered, in delivery order.
    fn deliver_all(jobs: &[(u16, bool)], helpers: usize, capacity: usize) -> Vec<(u32, Option<u32>)> {
        let counter = runs();
        let mut builder = CryptoPoolBuilder::<Fake>::default();
        let mut owner = builder.ring::<u32>(capacity);
        let pool = builder.start(helpers, &[]).expect("helpers start");
        let mut delivered = Vec::new();
        for (i, &(delay_us, fail)) in jobs.iter().enumerate() {
            let mut job = (Fake { value: i as u32 * 7, delay_us, fail, runs: counter }, i as u32);
            while let Err(back) = owner.push(job.0, job.1) {
                job = back;
                delivered.extend(owner.next_in_order());
            }
        }
        while let Some(d) = owner.next_in_order() {
            delivered.push(d);
        }
        drop(pool);
        assert_eq!(counter.load(Ordering::Relaxed) as usize, jobs.len(), "every job ran exactly once");
        delivered
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Whatever order the crypto stage finishes in (random delays over
        /// several threads), delivery is publication order, and a failed job
        /// is delivered as failed in its place without holding back the rest.
        #[test]
        fn delivery_is_in_publication_order_under_random_completion_order(
            jobs in proptest::collection::vec((0u16..60, proptest::bool::weighted(0.1)), 1..300),
            helpers in 0usize..4,
            capacity in prop_oneof![Just(4usize), Just(64), Just(128)],
        ) {
            let delivered = deliver_all(&jobs, helpers, capacity);
            prop_assert_eq!(delivered.len(), jobs.len());
            for (i, (local, outcome)) in delivered.iter().enumerate() {
                prop_assert_eq!(*local as usize, i, "delivered out of order");
                let expected = (!jobs[i].1).then_some(i as u32 * 7);
                prop_assert_eq!(*outcome, expected);
            }
        }
    }

    /// A failed job at the head does not wait for anything: the packets
    /// behind it are delivered as soon as they complete.
    #[test]
    fn a_failed_job_never_stalls_delivery() {
        let mut jobs = vec![(0u16, true)];
        jobs.extend(std::iter::repeat_n((5u16, false), 50));
        jobs.push((0, true));
        jobs.extend(std::iter::repeat_n((5u16, false), 50));
        let delivered = deliver_all(&jobs, 1, 16);
        let failed: Vec<_> = delivered.iter().filter(|d| d.1.is_none()).map(|d| d.0).collect();
        assert_eq!(failed, vec![0, 51]);
        assert!(delivered.iter().enumerate().all(|(i, d)| d.0 as usize == i));
    }

    /// Helpers take a share of the work (the owner is not doing it all), and
    /// park when there is none.
    #[test]
    fn helpers_share_the_work_and_park_when_idle() {
        let counter = runs();
        let mut builder = CryptoPoolBuilder::<Fake>::default();
        let mut owner = builder.ring::<()>(64);
        let helper_runs = Arc::new(AtomicU32::new(0));
        let pool = builder.start(1, &[]).expect("helper starts");
        assert_eq!(pool.helpers(), 1);
        for round in 0..20 {
            for _ in 0..32 {
                owner.push(Fake { value: 1, delay_us: 20, fail: false, runs: counter }, ()).map_err(|_| ()).unwrap();
            }
            owner.publish();
            // Let the helper start before the owner joins in.
            std::thread::sleep(Duration::from_micros(if round == 0 { 2000 } else { 200 }));
            let before = counter.load(Ordering::Relaxed);
            helper_runs.fetch_add(before, Ordering::Relaxed);
            while owner.next_in_order().is_some() {}
            counter.store(0, Ordering::Relaxed);
        }
        assert!(helper_runs.load(Ordering::Relaxed) > 0, "the helper ran jobs");
        // Idle now: the helper parks (it is marked asleep within a few ms).
        let deadline = Instant::now() + Duration::from_secs(2);
        let asleep = || pool.wake.helpers.get().unwrap()[0].1.load(Ordering::Relaxed);
        while !asleep() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(asleep(), "an idle helper parks");
        // Woken without work, it looks for some, then parks again.
        pool.wake_all();
        let deadline = Instant::now() + Duration::from_secs(2);
        while !asleep() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(asleep(), "a helper woken without work parks again");
        // And wakes for new work.
        owner.push(Fake { value: 3, delay_us: 0, fail: false, runs: counter }, ()).map_err(|_| ()).unwrap();
        assert_eq!(owner.next_in_order(), Some(((), Some(3))));
    }

    /// Dropping an owner with jobs in flight waits for claimed ones and never
    /// runs the rest.
    #[test]
    fn dropping_an_owner_settles_its_jobs() {
        let counter = runs();
        let mut builder = CryptoPoolBuilder::<Fake>::default();
        let mut owner = builder.ring::<u8>(8);
        let pool = builder.start(2, &[]).expect("helpers start");
        for _ in 0..8 {
            owner.push(Fake { value: 0, delay_us: 200, fail: false, runs: counter }, 0).map_err(|_| ()).unwrap();
        }
        drop(owner);
        let ran = counter.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(counter.load(Ordering::Relaxed), ran, "nothing runs after the owner is gone");
        drop(pool);
    }
}
