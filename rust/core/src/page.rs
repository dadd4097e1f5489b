//! The size of the pages the kernel protects, maps and reports: the one source for every
//! page rounding in the workspace (staging buffers, write watches, gated destinations, host
//! pools, the interposer's receive pools and hit pieces). 4 KiB on x86-64; 16 or 64 KiB on
//! some arm64 kernels, where a hard-coded 4096 would misalign every protected range.

use std::sync::atomic::{AtomicUsize, Ordering};

/// 0 until first asked. Relaxed: every thread computes the same value, so a thread that
/// reads 0 and asks the kernel again only repeats the work.
static SIZE: AtomicUsize = AtomicUsize::new(0);

/// The page size in bytes (a power of two). Async-signal-safe after the first call (a load),
/// and before it too: glibc answers `_SC_PAGESIZE` from the auxiliary vector.
pub fn size() -> usize {
    match SIZE.load(Ordering::Relaxed) {
        0 => {
            // SAFETY: sysconf has no preconditions.
            let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
            let p = if p > 0 && (p as usize).is_power_of_two() {
                p as usize
            } else {
                4096
            };
            SIZE.store(p, Ordering::Relaxed);
            p
        }
        p => p,
    }
}

/// `len` rounded up to whole pages.
pub fn round_up(len: usize) -> usize {
    len.next_multiple_of(size())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_page_size_is_the_kernels() {
        let p = super::size();
        assert!(p.is_power_of_two() && p >= 4096);
        // SAFETY: sysconf has no preconditions.
        assert_eq!(p as libc::c_long, unsafe {
            libc::sysconf(libc::_SC_PAGESIZE)
        });
        assert_eq!(super::round_up(1), p);
        assert_eq!(super::round_up(p), p);
        assert_eq!(super::round_up(0), 0);
    }
}
