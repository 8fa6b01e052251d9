//! A cache hint: start loading lines this thread is about to touch, so that
//! several misses (frames the NIC or another core wrote, job slots) overlap
//! instead of stalling one after another. A hint only: PREFETCHT0 never
//! faults, reads nothing into the program and changes no memory, so it takes
//! a raw pointer (the bytes may still be another thread's, or an atomic) and
//! does nothing on other architectures. A line loaded for reading and then
//! written takes one more transfer to this core's ownership; the compiler
//! emits PREFETCHW only with the `prfchw` target feature, which the build
//! does not assume.

/// Cache lines.
pub const LINE: usize = 64;

/// Starts loading the first `lines` cache lines of `ptr[..len]`.
#[inline]
pub fn lines(ptr: *const u8, len: usize, lines: usize) {
    #[cfg(target_arch = "x86_64")]
    for offset in (0..len).step_by(LINE).take(lines) {
        // SAFETY: PREFETCHT0 (SSE, part of x86-64) only hints the cache and
        // never faults, whatever the address; `wrapping_add` computes it
        // without claiming it is in bounds, and nothing is dereferenced.
        unsafe {
            core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(ptr.wrapping_add(offset).cast())
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (ptr, len, lines);
}
