//! Cache hints: start loading lines this thread is about to touch, so that
//! several misses (frames the NIC or another core wrote, job slots) overlap
//! instead of stalling one after another, and hand lines written for another
//! core to the shared cache. Hints only: PREFETCHT0, PREFETCHW and CLDEMOTE
//! never fault, read nothing into the program and change no memory, so they
//! take raw pointers (the bytes may still be another thread's, or an atomic)
//! and do nothing on other architectures. PREFETCHW and CLDEMOTE are emitted
//! only where CPUID reports them (asked once), not assumed by the build.

/// Cache lines.
pub const LINE: usize = 64;

/// The starts of the first `lines` cache lines that `ptr[..len]` touches
/// (the first one from `ptr` rounded down: a line is loaded whole).
fn line_starts(ptr: *const u8, len: usize, lines: usize) -> impl Iterator<Item = *const u8> {
    let skew = ptr as usize % LINE;
    let first = ptr.wrapping_sub(skew);
    let touched = if len == 0 { 0 } else { skew.saturating_add(len).div_ceil(LINE) };
    (0..touched.min(lines)).map(move |k| first.wrapping_add(k * LINE))
}

/// Starts loading the first `lines` cache lines of `ptr[..len]`.
#[inline]
pub fn lines(ptr: *const u8, len: usize, lines: usize) {
    #[cfg(target_arch = "x86_64")]
    for line in line_starts(ptr, len, lines) {
        // SAFETY: PREFETCHT0 (SSE, part of x86-64) only hints the cache and
        // never faults, whatever the address; `line_starts` computes it with
        // wrapping arithmetic, and nothing is dereferenced.
        unsafe { core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(line.cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (ptr, len, lines);
}

/// `lines`, for lines this thread is about to write: loaded exclusive
/// (PREFETCHW), so the write that follows takes no second transfer from the
/// core that holds them. A plain read prefetch where the CPU lacks it.
#[inline]
pub fn lines_for_write(ptr: *const u8, len: usize, lines: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        if !cpu().prefetchw {
            return self::lines(ptr, len, lines);
        }
        for line in line_starts(ptr, len, lines) {
            // SAFETY: PREFETCHW (the CPU has it) only hints the cache and
            // never faults, whatever the address; it reads and writes nothing.
            unsafe { core::arch::asm!("prefetchw [{0}]", in(reg) line, options(nostack, preserves_flags, readonly)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (ptr, len, lines);
}

/// Pushes the line holding `ptr` out of this core's private caches into the
/// shared one (CLDEMOTE), where the core that reads it next finds it without
/// asking this one: for a line this thread just wrote for another.
#[inline]
pub fn demote(ptr: *const u8) {
    #[cfg(target_arch = "x86_64")]
    if cpu().cldemote {
        // SAFETY: CLDEMOTE (the CPU has it) only hints the cache and never
        // faults, whatever the address; it reads and writes nothing.
        unsafe { core::arch::asm!("cldemote [{0}]", in(reg) ptr, options(nostack, preserves_flags, readonly)) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = ptr;
}

/// The hints this CPU has beyond x86-64's PREFETCHT0.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Hints {
    prefetchw: bool,
    cldemote: bool,
}

#[cfg(target_arch = "x86_64")]
fn cpu() -> Hints {
    use core::arch::x86_64::{__cpuid, __cpuid_count};
    static HINTS: std::sync::OnceLock<Hints> = std::sync::OnceLock::new();
    *HINTS.get_or_init(|| {
        // CPUID exists on every x86-64 CPU; leaves 0 and 0x8000_0000 give
        // the highest standard and extended leaves, so only leaves that
        // exist are asked. PREFETCHW: 0x8000_0001 ECX bit 8; CLDEMOTE: 7.0
        // ECX bit 25.
        #[allow(unused_unsafe)]
        // SAFETY: CPUID has no effect beyond its result registers.
        let (extended, standard) = unsafe { (__cpuid(0x8000_0000).eax, __cpuid(0).eax) };
        #[allow(unused_unsafe)]
        // SAFETY: as above, for leaves reported to exist.
        let prefetchw = extended >= 0x8000_0001 && unsafe { __cpuid(0x8000_0001).ecx } & (1 << 8) != 0;
        #[allow(unused_unsafe)]
        // SAFETY: as above.
        let cldemote = standard >= 7 && unsafe { __cpuid_count(7, 0).ecx } & (1 << 25) != 0;
        Hints { prefetchw, cldemote }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lines_touched_are_covered_from_the_first_one_rounded_down() {
        let base = 0x1000 as *const u8;
        let starts = |offset: usize, len: usize, max: usize| -> Vec<usize> {
            line_starts(base.wrapping_add(offset), len, max).map(|p| p as usize - 0x1000).collect()
        };
        // A 124-byte message 14 bytes into a frame touches lines 0, 1 and 2.
        assert_eq!(starts(14, 124, usize::MAX), vec![0, 64, 128]);
        assert_eq!(starts(14, 124, 2), vec![0, 64]);
        assert_eq!(starts(0, 64, usize::MAX), vec![0]);
        assert_eq!(starts(63, 2, usize::MAX), vec![0, 64]);
        assert_eq!(starts(64, 1, usize::MAX), vec![64]);
        assert!(starts(5, 0, usize::MAX).is_empty());
        assert_eq!(starts(14, usize::MAX, 3), vec![0, 64, 128], "no overflow");
    }

    #[test]
    fn hints_never_fault_whatever_the_address() {
        let buf = [0u8; 256];
        for ptr in [buf.as_ptr(), core::ptr::null(), usize::MAX as *const u8] {
            lines(ptr, 256, 8);
            lines_for_write(ptr, 256, 8);
            demote(ptr);
        }
        assert_eq!(buf, [0u8; 256], "hints change no memory");
    }
}
