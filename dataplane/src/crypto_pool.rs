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
//! What crosses between cores is kept to one transfer per line and direction
//! (`aead_cores` in the `aead` bench is the ceiling: bare AEAD on two cores):
//! a job is a cache line the owner writes and its claimer reads; outcomes are
//! tagged with their job's number (nothing is reset), eight to a line, and a
//! claimer stores them a line at a time, so the owner reads each line about
//! once instead of taking it back from the claimer per job. Claimers load a
//! claim's first lines together and the next job's frame whole while one
//! runs, for writing (PREFETCHW), and hand what the owner reads next to the
//! shared cache (CLDEMOTE, `prefetch.rs`).
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

    /// Cache hints (they read and write nothing). `prefetch`: the first
    /// lines `run` touches, for every job of a claim before the first runs.
    fn prefetch(&self) {}

    /// All that `run` touches: the claim's next job, while one runs.
    fn prefetch_whole(&self) {}

    /// What the claimer hands back for the owner to read, to the shared
    /// cache (after `run`, by a helper).
    fn demote_result(&self) {}

    /// What the owner touches of a finished job, before it delivers it.
    fn prefetch_result(&self) {}
}

/// Jobs a helper claims at once, at most, and bytes of AEAD they may add up
/// to: one contended update of the claim counter for all of them, and their
/// slots and frames prefetched together, so the misses on lines the owner
/// wrote overlap instead of stalling one after another (32 jobs of 64 bytes,
/// 22 of 1420, 3 jumbo frames). A claim runs oldest first and stores its
/// first outcome at once, the rest a line at a time (`ClaimOutcomes`): the
/// owner waits for the oldest job, then at most for the rest of its outcome
/// line (7 jobs).
const HELPER_CLAIM: u64 = 32;
const HELPER_CLAIM_BYTES: u32 = 32768;

/// The same for the owner, while it waits for the oldest job's outcome: a
/// few at a time (it has its own work to get back to).
const OWNER_CLAIM: u64 = 4;
const OWNER_CLAIM_BYTES: u32 = 8192;

/// How long an idle helper spins before it parks, and how long it parks at most.
const SPIN: Duration = Duration::from_micros(200);
const PARK: Duration = Duration::from_millis(5);

/// A job's outcome word: its tag (`tag`) once it is done, then whether it
/// succeeded (`OK`), whether the owner ran it (`HERE`, for
/// `take_offloaded`), and the job's value (a value above `VALUE` fails it).
const OK: u64 = 1 << 31;
const HERE: u64 = 1 << 30;
const VALUE: u64 = HERE - 1;

/// The outcome word's tag for the job numbered `index`: the low 32 bits of
/// `index + 1`. Neither the initial 0 nor the word the slot's previous job
/// left (`index + 1 - capacity`) carries it (a ring holds at most 2^31
/// jobs), so nothing is reset between jobs: the owner only reads outcome
/// lines, never writes them.
fn tag(index: u64) -> u64 {
    (index.wrapping_add(1) & 0xffff_ffff) << 32
}

/// Whether `word` is the outcome of the job numbered `index`.
fn is_done(word: u64, index: u64) -> bool {
    word & !0xffff_ffff == tag(index)
}

/// One job, on a cache line of its own: written by the owner, read by the
/// thread that claims it (one transfer, one way).
#[repr(align(64))]
struct Slot<J> {
    job: UnsafeCell<MaybeUninit<J>>,
    /// `Job::size` of the job, readable before it is claimed.
    size: AtomicU32,
}

/// Outcomes of consecutive jobs, a cache line of them: written by the
/// claimers, read by the owner, which takes eight back in one transfer.
#[repr(align(64))]
struct OutcomeLine([AtomicU64; OUTCOMES_PER_LINE]);

const OUTCOMES_PER_LINE: usize = 8;

/// Keeps a hot atomic on its own cache lines (no false sharing between the
/// owner's and the helpers' counters).
#[repr(align(128))]
struct Padded<T>(T);

/// The shared half of one worker's ring; see the module documentation.
pub struct SequenceRing<J> {
    slots: Box<[Slot<J>]>,
    outcomes: Box<[OutcomeLine]>,
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
        // Stored a line at a time; should a job panic (or a prefetch), what
        // is done is stored and the rest of the claim fails.
        let mut outcomes = ClaimOutcomes {
            ring: self,
            first: claimed.start,
            stored: claimed.start,
            next: claimed.start,
            end: claimed.end,
            words: [0; OUTCOMES_PER_LINE],
            demote: here == 0,
        };
        // The claim's first lines and outcomes load together, not one miss
        // per job.
        for index in claimed.clone() {
            self.job(index).prefetch();
            if index == claimed.start || index.is_multiple_of(OUTCOMES_PER_LINE as u64) {
                crate::prefetch::lines_for_write(self.outcome(index).as_ptr().cast(), 8, 1);
            }
        }
        for index in claimed.clone() {
            // The next job's frame loads whole while this one runs.
            if index + 1 < claimed.end {
                self.job(index + 1).prefetch_whole();
            }
            let word = self.run(index, here);
            outcomes.record(index, word);
        }
        claimed.count()
    }

    /// A copy of the job numbered `index`, which this thread claimed.
    fn job(&self, index: u64) -> J {
        let slot = &self.slots[(index & self.mask) as usize];
        // SAFETY: claimed by this thread: published (written before the
        // Release store of `published` this thread's Acquire load saw), and
        // not rewritten before its outcome is stored (a copy of a `Copy` job).
        unsafe { (*slot.job.get()).assume_init_read() }
    }

    /// Runs the claimed job `index` and returns its outcome word (`here`:
    /// `HERE` or 0, whether the owner ran it), to be stored after.
    fn run(&self, index: u64, here: u64) -> u64 {
        let job = self.job(index);
        // SAFETY: this thread claimed the job just now and runs it once; its
        // outcome is stored after (`ClaimOutcomes`).
        let value = unsafe { job.run() }.map(u64::from).filter(|&v| v <= VALUE);
        if here == 0 {
            job.demote_result();
        }
        match value {
            Some(value) => tag(index) | here | OK | value,
            None => tag(index) | here,
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

/// The outcomes of one claim's jobs, stored a cache line at a time: a line
/// the owner polls is written once when this claim's last job on it is done,
/// not once per job (each store would take the line back from the owner,
/// each poll take it back again). Dropped early (a job panicked), it stores
/// what is done and fails the rest.
struct ClaimOutcomes<'a, J> {
    ring: &'a SequenceRing<J>,
    /// The claim's oldest job: the owner may be waiting for it, so its
    /// outcome is stored at once.
    first: u64,
    /// Jobs `[stored, next)` are done, their words in `words` (by position
    /// on their line); `[next, end)` have not run.
    stored: u64,
    next: u64,
    end: u64,
    words: [u64; OUTCOMES_PER_LINE],
    /// Hand each line stored to the shared cache (a helper's: the owner
    /// reads it next).
    demote: bool,
}

impl<J> ClaimOutcomes<'_, J> {
    /// The outcome word of the job `next`, the claim's next in order.
    fn record(&mut self, index: u64, word: u64) {
        debug_assert_eq!(index, self.next, "jobs of a claim run in order");
        self.words[index as usize % OUTCOMES_PER_LINE] = word;
        self.next = index + 1;
        if index == self.first || self.next.is_multiple_of(OUTCOMES_PER_LINE as u64) || self.next == self.end {
            self.store_done();
        }
    }

    /// Stores the words of the jobs done (all on one line: `record` stores
    /// at each line's end), the claim's first job alone.
    fn store_done(&mut self) {
        for index in self.stored..self.next {
            self.ring.outcome(index).store(self.words[index as usize % OUTCOMES_PER_LINE], Ordering::Release);
        }
        if self.demote && self.stored < self.next {
            crate::prefetch::demote(self.ring.outcome(self.stored).as_ptr().cast());
        }
        self.stored = self.next;
    }
}

impl<J> Drop for ClaimOutcomes<'_, J> {
    fn drop(&mut self) {
        self.store_done();
        for index in self.next..self.end {
            self.ring.outcome(index).store(tag(index), Ordering::Release);
        }
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
    /// Queues `job` (visible to the helpers at the next `publish`, at the
    /// latest once `PUBLISH_EVERY` jobs wait, or when this thread waits in
    /// `next_in_order`); gives both back when the ring is full (take a
    /// completion with `next_in_order` first).
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
        if self.tail - self.published >= PUBLISH_EVERY {
            self.publish();
        }
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
        if self.is_empty() || !self.ring.is_done(self.head) {
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
        let word = self.ring.outcome(self.head);
        let mut outcome = word.load(Ordering::Acquire);
        let mut idle = 0u32;
        while !is_done(outcome, self.head) {
            let n = self.ring.work_as(OWNER_CLAIM, OWNER_CLAIM_BYTES, HERE);
            if n == 0 {
                idle += 1;
                // The head's claimer was preempted (a job takes microseconds):
                // let the scheduler run it rather than spin through its slice.
                if idle.is_multiple_of(4096) {
                    std::thread::yield_now();
                } else {
                    relax();
                }
            }
            outcome = word.load(Ordering::Acquire);
        }
        let index = (self.head & self.ring.mask) as usize;
        self.head += 1;
        self.prefetch_ahead();
        self.delivered += 1;
        self.ran_here += u64::from(outcome & HERE != 0);
        let local = self.local[index].take()?;
        Some((local, (outcome & OK != 0).then_some((outcome & VALUE) as u32)))
    }

    /// Starts loading what delivering the jobs of the outcome line after
    /// the head's will touch, those finished (never a frame a claimer is
    /// still writing): once per line, as the head reaches a new one, so
    /// that each outcome line is read about once.
    fn prefetch_ahead(&self) {
        if !self.head.is_multiple_of(OUTCOMES_PER_LINE as u64) {
            return;
        }
        let ahead = self.head + OUTCOMES_PER_LINE as u64;
        for index in ahead..self.tail.min(ahead + OUTCOMES_PER_LINE as u64) {
            if self.ring.is_done(index) {
                let slot = &self.ring.slots[(index & self.ring.mask) as usize];
                // SAFETY: a published job, not rewritten before it is
                // delivered (by this thread); claimers only read it.
                unsafe { (*slot.job.get()).assume_init_read() }.prefetch_result();
            }
        }
    }
}

/// Jobs queued before they are published without waiting for the batch's end.
const PUBLISH_EVERY: u64 = 16;

impl<J, L> RingOwner<J, L> {
    /// Makes the queued jobs visible to the helpers (at a batch's end and
    /// every `PUBLISH_EVERY` jobs: one store the helpers read, not one per
    /// job) and wakes a parked one.
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
            if self.ring.is_done(self.head) {
                self.head += 1;
            } else if !self.ring.claim_and_skip(self.head) {
                relax();
            }
        }
    }
}

impl<J> SequenceRing<J> {
    /// The outcome word of the job numbered `index`.
    fn outcome(&self, index: u64) -> &AtomicU64 {
        let at = (index & self.mask) as usize;
        &self.outcomes[at / OUTCOMES_PER_LINE].0[at % OUTCOMES_PER_LINE]
    }

    /// Whether the job numbered `index` has its outcome.
    fn is_done(&self, index: u64) -> bool {
        is_done(self.outcome(index).load(Ordering::Acquire), index)
    }

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
        self.outcome(next).store(tag(next), Ordering::Release);
        true
    }
}

/// Parked helpers, woken when an owner publishes.
#[derive(Default)]
struct Wake {
    helpers: OnceLock<Vec<(Thread, Arc<AtomicBool>)>>,
    /// Times a helper got back to work after a waker cleared its flag.
    resumed: AtomicU64,
}

impl Wake {
    /// Wakes one parked helper, if any (one per `publish`: a busy ring keeps
    /// waking more).
    fn notify(&self) {
        self.wake_parked(1);
    }

    /// Wakes up to `max` parked helpers (a woken one finds its flag
    /// cleared); returns how many.
    fn wake_parked(&self, max: usize) -> usize {
        let parked = self.helpers.get().map(Vec::as_slice).unwrap_or_default().iter();
        let mut woken = 0;
        for (thread, _) in parked
            .filter(|(_, asleep)| asleep.load(Ordering::Relaxed) && asleep.swap(false, Ordering::AcqRel))
            .take(max)
        {
            thread.unpark();
            woken += 1;
        }
        woken
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
        let capacity = capacity.next_power_of_two().max(OUTCOMES_PER_LINE);
        // Outcome tags are the low 32 bits of a job's number (`tag`).
        assert!(capacity <= 1 << 31, "a ring of at most 2^31 jobs");
        let slots = (0..capacity)
            .map(|_| Slot { job: UnsafeCell::new(MaybeUninit::uninit()), size: AtomicU32::new(0) })
            .collect();
        let outcomes = (0..capacity / OUTCOMES_PER_LINE).map(|_| OutcomeLine(Default::default())).collect();
        let ring = Arc::new(SequenceRing {
            slots,
            outcomes,
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
            let (rings, halt, wake) = (self.rings.clone(), stop.clone(), self.wake.clone());
            let asleep = Arc::new(AtomicBool::new(false));
            let core = (!cores.is_empty()).then(|| cores[i % cores.len()]);
            let flag = asleep.clone();
            let spawned = std::thread::Builder::new().name(format!("wgxdp-crypto{i}")).spawn(move || {
                if let Some(id) = core {
                    if !core_affinity::set_for_current(core_affinity::CoreId { id }) {
                        tracing::warn!(helper = i, core = id, "could not pin the crypto thread");
                    }
                }
                help(&rings, &flag, &halt, &wake, i);
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
fn help<J: Job>(rings: &[Arc<SequenceRing<J>>], asleep: &AtomicBool, stop: &AtomicBool, wake: &Wake, offset: usize) {
    let mut idle_since: Option<Instant> = None;
    let mut spins = 0u32;
    while !stop.load(Ordering::Relaxed) {
        let mut worked = false;
        for k in 0..rings.len() {
            let n = rings[(offset + k) % rings.len()].work(HELPER_CLAIM, HELPER_CLAIM_BYTES);
            worked |= n > 0;
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
            // A waker that cleared the flag meanwhile is told this one runs,
            // and it looks for work for `SPIN` as any woken helper does.
            if !asleep.swap(false, Ordering::AcqRel) {
                (idle_since, spins) = (None, 0);
                wake.resumed.fetch_add(1, Ordering::Release);
            }
            continue;
        }
        std::thread::park_timeout(PARK);
        // A waker (`notify`, `wake_all`) cleared the flag: look for work for
        // `SPIN` again. A timeout (or a spurious return) without work: straight
        // back to sleep.
        if !asleep.swap(false, Ordering::AcqRel) {
            (idle_since, spins) = (None, 0);
            wake.resumed.fetch_add(1, Ordering::Release);
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
    /// Returns how many it woke, once they all run again (or after `wait`
    /// at most; with several helpers, one woken by an owner's publish just
    /// then may count for one of these, so it may return a little early).
    pub fn wake_all(&self, wait: Duration) -> usize {
        let before = self.wake.resumed.load(Ordering::Acquire);
        let woken = self.wake.wake_parked(usize::MAX);
        let since = Instant::now();
        while self.wake.resumed.load(Ordering::Acquire).wrapping_sub(before) < woken as u64 && since.elapsed() < wait {
            std::thread::yield_now();
        }
        woken
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
/// takes the outcome back from its ring. Small enough that a job (with its
/// size) is one cache line: one transfer, from the owner to its claimer.
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
        crate::prefetch::lines_for_write(self.buf, self.len as usize, PREFETCH_LINES);
    }

    fn prefetch_result(&self) {
        crate::prefetch::lines_for_write(self.buf, self.len as usize, 1);
    }

    fn prefetch_whole(&self) {
        crate::prefetch::lines_for_write(self.buf, self.len as usize, usize::MAX);
    }

    fn demote_result(&self) {
        crate::prefetch::demote(self.buf);
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

// A transport job is one cache line.
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

    /// Claims jobs of `delays` (one of them `PANICS`) in one claim on this
    /// thread, which panics; returns what the owner then takes back without
    /// anyone running a job (no waiting: a missing outcome ends the list
    /// rather than hanging).
    fn after_a_panicking_claim(delays: &[u16]) -> Vec<(u8, Option<u32>)> {
        let counter = runs();
        let mut builder = CryptoPoolBuilder::<Fake>::default();
        let mut owner = builder.ring::<u8>(16);
        for (i, &delay_us) in delays.iter().enumerate() {
            owner.push(Fake { value: 9, delay_us, fail: false, runs: counter }, i as u8).map_err(|_| ()).unwrap();
        }
        owner.publish();
        let ring = owner.ring.clone();
        let claim = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || ring.work(16, u32::MAX)));
        assert!(claim.is_err(), "a job panicked");
        std::iter::from_fn(|| owner.next_ready()).collect()
    }

    /// A job that panics completes as failed, and so does the rest of the
    /// claim it was part of: its owner never waits forever.
    #[test]
    fn a_panicking_job_fails_its_whole_claim_instead_of_hanging_the_owner() {
        assert_eq!(after_a_panicking_claim(&[PANICS, 0, 0]), vec![(0, None), (1, None), (2, None)]);
    }

    /// Outcomes are stored a line at a time: a job that panics after others
    /// of its claim finished still stores theirs, and fails itself and the
    /// rest.
    #[test]
    fn a_panic_mid_claim_keeps_the_outcomes_of_the_jobs_done_before_it() {
        assert_eq!(after_a_panicking_claim(&[0, 0, PANICS, 0]), vec![(0, Some(9)), (1, Some(9)), (2, None), (3, None)]);
    }

    /// A value the outcome word cannot hold fails its job rather than being
    /// cut short.
    #[test]
    fn a_value_too_large_for_the_outcome_fails_the_job() {
        let counter = runs();
        let mut builder = CryptoPoolBuilder::<Fake>::default();
        let mut owner = builder.ring::<u8>(8);
        for (i, value) in [VALUE as u32, VALUE as u32 + 1, u32::MAX].into_iter().enumerate() {
            owner.push(Fake { value, delay_us: 0, fail: false, runs: counter }, i as u8).map_err(|_| ()).unwrap();
        }
        let delivered: Vec<_> = std::iter::from_fn(|| owner.next_in_order()).collect();
        assert_eq!(delivered, vec![(0, Some(VALUE as u32)), (1, None), (2, None)]);
    }

    /// Outcome words are never reset: a job's tag tells its outcome from the
    /// initial word and from the one the slot's previous job left, also
    /// where the 32-bit tag wraps.
    #[test]
    fn an_outcome_is_told_from_the_previous_laps_by_its_tag() {
        for capacity in [8u64, 64, 1 << 20] {
            for index in [0, 1, capacity - 1, capacity, (1 << 32) - 2, (1 << 32) - 1, 1 << 32, u64::MAX - 1] {
                let word = tag(index) | OK | 5;
                assert!(is_done(word, index));
                assert!(is_done(tag(index), index), "failed is done too");
                assert!(!is_done(word, index.wrapping_add(capacity)), "a lap later: {index} {capacity}");
                if index >= capacity {
                    assert!(!is_done(tag(index - capacity) | OK, index), "the previous lap's: {index} {capacity}");
                }
            }
        }
        // The initial word: not done for any job of the first laps (a slot's
        // later laps find the word its previous job left).
        assert!((0..1 << 20).all(|index| !is_done(0, index)));
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
        // Woken without work, it runs (`wake_all` returns once it does),
        // looks for some, then parks again.
        // (A park that times out just then wakes it first: asleep again
        // within a few ms, it is woken on the next try.)
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let resumed = pool.wake.resumed.load(Ordering::Acquire);
            if pool.wake_all(Duration::from_secs(2)) == 1 {
                assert!(pool.wake.resumed.load(Ordering::Acquire) > resumed, "running before wake_all returns");
                break;
            }
            assert!(Instant::now() < deadline, "the helper is woken");
            std::thread::sleep(Duration::from_millis(1));
        }
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
