//! Sources the application registered as watched (`pipellm_cc_watch`): their chunks are
//! validated by page protection instead of fingerprints, so a hit no longer reads the
//! source, it only copies the ciphertext.
//!
//! Why registration: a fingerprint works on any memory, but costs a pass over the source's
//! bytes on the hit path. Page protection costs nothing there, but is only safe on memory
//! whose lifetime is known (pages made read-only must not be freed and mapped again by
//! someone else behind our back: glibc's `free` unmaps large blocks without any call we could
//! see) and that only user-space code writes (a write by the kernel or a device would fail
//! instead of faulting). The application promises both for a registered range, until it
//! unregisters it (`pipellm_cc_unwatch`, which makes the pages writable again before it
//! returns). Offloaded weights, KV swap space and adapters are such memory: allocated once,
//! written by the application's own code.
//!
//! Each predicted chunk (input pointer, length) inside a registered range gets its own write
//! watch, made on first use and kept armed between uses; a chunk's stamp names the range it
//! came from, so a range unregistered and registered again never validates an old chunk.

use pipellm_core::locks::lock;
use pipellm_core::space::{self, Conflicts, Kind, Whose};
use pipellm_core::span::Span;
use pipellm_core::writeguard::{Stamp, WriteWatch};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::sync::{Mutex, MutexGuard};

/// Registered ranges at once.
pub const MAX_RANGES: usize = 256;
/// Chunk watches at once, over all ranges (a share of the process-wide region table).
pub const MAX_SPANS: usize = 1024;

struct Range {
    id: u64,
    start: usize,
    len: usize,
    spans: HashMap<(usize, usize), WriteWatch>,
    /// Workers reading the range's memory right now (see [`Reading`]); `unwatch` waits for
    /// none before it returns, since the registrant may unmap the memory right after.
    readers: Arc<AtomicUsize>,
}

impl Range {
    fn span(&self) -> Span {
        Span::of(self.start, self.len)
    }
}

/// A worker's read of a chunk of a registered range in progress: the range stays mapped (its
/// registrant promised so until `unwatch` returns, and `unwatch` waits for every `Reading`
/// of it to be dropped), so the worker may encrypt straight from the source, with no
/// snapshot copy. A write meanwhile is caught by the chunk's watch, armed before the read.
pub struct Reading(Arc<AtomicUsize>);

impl Drop for Reading {
    fn drop(&mut self) {
        // Release: the reads of the range happen before `unwatch` sees the count fall.
        self.0.fetch_sub(1, Ordering::Release);
    }
}

#[derive(Default)]
struct Registry {
    ranges: Vec<Range>,
    next_id: u64,
    spans: usize,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    ranges: Vec::new(),
    next_id: 1,
    spans: 0,
});

fn registry() -> MutexGuard<'static, Registry> {
    lock(&REGISTRY)
}

/// The registry's lock, held by a fork handler across `fork()` (after the engine's contexts,
/// before the write tracker's locks: the order `arm` takes them in), so that no worker holds
/// it in a forked child, whose `unwatch` would otherwise wait for it forever.
pub struct ForkHold {
    _held: MutexGuard<'static, Registry>,
}

/// See [`ForkHold`].
pub fn hold_for_fork() -> ForkHold {
    ForkHold { _held: registry() }
}

/// Why a registration was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchError {
    Empty,
    Overlaps,
    Full,
}

/// A chunk's validation: the range it came from and its watch's stamp when it was encrypted.
#[derive(Debug, Clone, Copy)]
pub struct SpanStamp {
    range: u64,
    span: (usize, usize),
    stamp: Stamp,
}

/// Registers `[start, start + len)`.
///
/// # Safety
/// The range must stay mapped, and be written only by this process's user-space code, until
/// [`unwatch`] returns for it.
// SAFETY: an `unsafe fn` for the contract in `# Safety` above; callers argue it where
// they call.
pub unsafe fn watch(start: usize, len: usize) -> Result<(), WatchError> {
    if len == 0 || start.checked_add(len).is_none() {
        return Err(WatchError::Empty);
    }
    // Before the registry's lock, which the fork handlers take: the first chunk watch (in
    // `arm`, under that lock) must not be what opens the write tracker (see
    // `writeguard::decide_tracker`).
    pipellm_core::writeguard::decide_tracker();
    let mut reg = registry();
    if reg.ranges.len() >= MAX_RANGES {
        return Err(WatchError::Full);
    }
    // In the process's table, unless it overlaps another watched range, a receive pool (whose
    // gates would take the pages' protection from the chunks' watches) or a host pool's view
    // (written through a second mapping no watch of ours sees).
    let conflicts = Conflicts {
        any: Kind::WatchedRange
            .set()
            .with(Kind::ReceivePool)
            .with(Kind::PoolView),
        ..Conflicts::default()
    };
    if space::insert(Span::of(start, len), Kind::WatchedRange, conflicts).is_err() {
        return Err(WatchError::Overlaps);
    }
    let id = reg.next_id;
    reg.next_id += 1;
    reg.ranges.push(Range {
        id,
        start,
        len,
        spans: HashMap::new(),
        readers: Arc::new(AtomicUsize::new(0)),
    });
    Ok(())
}

/// Unregisters the range that starts at `start`: once no worker reads it any more, its
/// chunks' watches are dropped (pages writable again) before this returns, and its chunks
/// never validate again. False if no range starts there.
pub fn unwatch(start: usize) -> bool {
    let range = {
        let mut reg = registry();
        let Some(i) = reg.ranges.iter().position(|r| r.start == start) else {
            return false;
        };
        let r = reg.ranges.swap_remove(i);
        reg.spans -= r.spans.len();
        space::remove(r.span(), Kind::WatchedRange);
        r
    };
    // Removed under the lock, so no new `Reading` of it can start; the ones in progress
    // end within a chunk's encryption.
    let mut spins = 0u32;
    // In a forked child no worker came along: a `Reading` counted at the fork never ends.
    while range.readers.load(Ordering::Acquire) > 0 && !crate::process::forked() {
        spins += 1;
        if spins < 64 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(std::time::Duration::from_micros(50));
        }
    }
    drop(range); // the mprotect calls, outside the lock
    true
}

/// For a chunk about to be read for encryption: if it lies inside a registered range, arms
/// its watch (made on first use) and returns the stamp to validate it with later, and the
/// [`Reading`] that keeps the range registered while the caller reads it; None otherwise
/// (the caller snapshots and fingerprints instead).
pub fn arm(input: usize, len: usize) -> Option<(SpanStamp, Reading)> {
    let end = input.checked_add(len)?;
    let mut reg = registry();
    let full = reg.spans >= MAX_SPANS;
    let r = reg
        .ranges
        .iter_mut()
        .find(|r| r.span().contains(Span::new(input, end)))?;
    let (range, span, readers) = (r.id, (input, len), r.readers.clone());
    let mut made = false;
    let watch = match r.spans.entry(span) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::hash_map::Entry::Vacant(e) => {
            if full {
                return None;
            }
            // SAFETY: the range's registrant promised it stays mapped (and written only by
            // user-space code) until unwatch, which drops this watch first.
            let w = unsafe { WriteWatch::register(input as *const u8, len) }.ok()?;
            made = true;
            e.insert(w)
        }
    };
    let stamp = watch.arm();
    if made {
        reg.spans += 1;
    }
    let stamp = stamp.ok()?;
    // Counted under the registry lock (held until we return), under which `unwatch`
    // removes the range: it either sees this count or this call does not find the range.
    readers.fetch_add(1, Ordering::Relaxed);
    Some((SpanStamp { range, span, stamp }, Reading(readers)))
}

/// True if nothing wrote the chunk since `s` was taken (and its range is still registered).
pub fn unchanged(s: &SpanStamp) -> bool {
    let reg = registry();
    reg.ranges
        .iter()
        .find(|r| r.id == s.range)
        .and_then(|r| r.spans.get(&s.span))
        .is_some_and(|w| w.unchanged_since(s.stamp))
}

/// The end of the registered range `[input, input + len)` lies in, if any. From the
/// process's table, not the registry: a driver thread planning its next chunks must not wait
/// while a worker holds the registry over an `mprotect` (`arm`).
pub fn range_end(input: usize, len: usize) -> Option<usize> {
    let end = input.checked_add(len)?;
    space::containing(Span::new(input, end), Kind::WatchedRange.set(), Whose::Mine).map(|r| r.end)
}

/// Registered ranges and chunk watches now.
pub fn counts() -> (usize, usize) {
    let reg = registry();
    (reg.ranges.len(), reg.spans)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pages(n: usize) -> (*mut u8, usize) {
        // SAFETY: a fresh private anonymous mapping, unmapped by the test.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                n * 4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        (p.cast(), n * 4096)
    }

    #[test]
    fn watched_chunks_validate_until_written_and_never_after_unwatch() {
        let (p, len) = pages(4);
        let base = p as usize;
        // SAFETY: the mapping lives until the end of the test, after unwatch.
        unsafe { watch(base, len) }.unwrap();
        // SAFETY: as above.
        assert_eq!(unsafe { watch(base + 4096, 10) }, Err(WatchError::Overlaps));
        assert_eq!(range_end(base + 4096, 10), Some(base + len));
        assert!(arm(base + len - 10, 20).is_none(), "not inside the range");
        let (s, _) = arm(base, 8192).unwrap();
        assert!(unchanged(&s));
        // SAFETY: inside the mapping; the write faults once and goes through.
        unsafe { std::ptr::write_volatile(p.add(100), 1) };
        assert!(!unchanged(&s));
        let (s2, _) = arm(base, 8192).unwrap();
        assert!(unchanged(&s2));
        let (other, _) = arm(base + 8192, 8192).unwrap();
        // SAFETY: as above, in the other chunk.
        unsafe { std::ptr::write_volatile(p.add(9000), 1) };
        assert!(unchanged(&s2), "a write to another chunk's pages");
        assert!(!unchanged(&other));
        assert!(unwatch(base));
        assert!(!unwatch(base));
        assert!(!unchanged(&s2), "its range is gone");
        // Registered again: an old stamp still does not validate.
        // SAFETY: as above.
        unsafe { watch(base, len) }.unwrap();
        assert!(!unchanged(&s2));
        assert!(unwatch(base));
        // SAFETY: our mapping, no longer watched.
        unsafe {
            std::ptr::write_volatile(p, 2);
            libc::munmap(p.cast(), len);
        }
    }

    #[test]
    fn unwatch_waits_for_a_read_in_progress() {
        let (p, len) = pages(2);
        let base = p as usize;
        // SAFETY: the mapping lives until the end of the test, after unwatch.
        unsafe { watch(base, len) }.unwrap();
        let (_, reading) = arm(base, len).unwrap();
        let t = std::thread::spawn(move || unwatch(base));
        // Once the range is gone from the registry, unwatch is past its lock and waiting.
        while range_end(base, len).is_some() {
            std::thread::yield_now();
        }
        assert!(
            arm(base, len).is_none(),
            "a new read of an unregistered range"
        );
        assert!(
            !t.is_finished(),
            "unwatch returned while a worker still read the range"
        );
        drop(reading);
        assert!(t.join().unwrap());
        // SAFETY: our mapping, no longer watched or read.
        unsafe { libc::munmap(p.cast(), len) };
    }
}
