//! Receive pools: the destinations registered for deferred D2H decryption (a view the
//! application reads, an alias we write through), and the count of messages in flight into
//! each, which unregistering waits for.

use pipellm_core::locks::lock;
use pipellm_core::space::{self, Conflicts, Kind};
use pipellm_core::span::Span;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Receive pools at once.
pub const MAX_POOLS: usize = 64;

static POOLS: Mutex<Vec<Pool>> = Mutex::new(Vec::new());

/// A registered destination: `alias + (addr - view)` is `addr`'s second mapping.
struct Pool {
    view: usize,
    alias: usize,
    len: usize,
    /// Messages into this pool deferred and not yet decrypted (Update done).
    pending: Arc<AtomicUsize>,
}

/// Why a registration was refused (the C API's codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiveError {
    /// Empty, wrapping or not page-aligned.
    BadRange,
    /// Overlaps another pool or a watched range.
    Overlaps,
    Full,
    /// `madvise(MADV_DONTFORK)` failed: not a private mapping we may change.
    NotMapped,
}

/// Why an unregistration did not happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnreceiveError {
    NotFound,
    /// A message into the pool is between its Update and its Final.
    Busy,
}

/// Counts a message in its pool's `pending` until dropped.
pub(super) struct PendingGuard(pub(super) Arc<AtomicUsize>);

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Registers a receive pool.
///
/// # Safety
/// `view` and `alias` must be two read-write mappings of the same memory, `len` bytes each,
/// that stay mapped until [`unreceive`] returns for `view`; the view's protection is ours to
/// change meanwhile (nothing else may `mprotect` it), and nothing but this library writes
/// the alias while a chunk is being decrypted into it.
// SAFETY: an `unsafe fn` for the contract in `# Safety` above; callers argue it where they
// call.
pub unsafe fn receive(view: usize, alias: usize, len: usize) -> Result<(), ReceiveError> {
    let page = pipellm_core::page::size();
    if len == 0
        || !view.is_multiple_of(page)
        || !alias.is_multiple_of(page)
        || view.checked_add(len).is_none()
        || alias.checked_add(len).is_none()
    {
        return Err(ReceiveError::BadRange);
    }
    let (v, a) = (Span::of(view, len), Span::of(alias, len));
    if v.overlaps(a) {
        return Err(ReceiveError::BadRange);
    }
    let mut pools = lock(&POOLS);
    if pools.len() >= MAX_POOLS {
        return Err(ReceiveError::Full);
    }
    // Both mappings in the process's table, unless they overlap another pool, a watched range
    // or a write watch (of either copy: its protection would be lost to our gates). Removed
    // again by `unreceive`, or below if the pool is refused after all.
    let conflicts = Conflicts {
        any: Kind::ReceivePool
            .set()
            .with(Kind::WatchedRange)
            .with(Kind::WriteWatch),
        ..Conflicts::default()
    };
    if space::insert(v, Kind::ReceivePool, conflicts).is_err() {
        return Err(ReceiveError::Overlaps);
    }
    if space::insert(a, Kind::ReceivePool, conflicts).is_err() {
        space::remove(v, Kind::ReceivePool);
        return Err(ReceiveError::Overlaps);
    }
    let unregister = || [v, a].map(|s| space::remove(s, Kind::ReceivePool));
    // A forked child must not inherit pages that may be gated (no decryption thread there
    // would ever open them) nor a shared alias it could write the parent's bytes through.
    for s in [v, a] {
        // SAFETY: madvise on a range the caller vouched is mapped; DONTFORK only changes
        // what fork copies.
        if unsafe { libc::madvise(s.start as *mut libc::c_void, len, libc::MADV_DONTFORK) } != 0 {
            unregister();
            return Err(ReceiveError::NotMapped);
        }
    }
    pools.push(Pool {
        view,
        alias,
        len,
        pending: Arc::new(AtomicUsize::new(0)),
    });
    Ok(())
}

/// Unregisters the pool whose view starts at `view`, after every decryption into it is
/// done. Refused (`Busy`) while a message into it is between its Update and its Final.
pub fn unreceive(view: usize) -> Result<(), UnreceiveError> {
    let (pending, alias, len) = {
        let mut pools = lock(&POOLS);
        let i = pools
            .iter()
            .position(|p| p.view == view)
            .ok_or(UnreceiveError::NotFound)?;
        let pending = pools[i].pending.clone();
        if super::mid_message_into(&pending) {
            return Err(UnreceiveError::Busy);
        }
        let p = pools.swap_remove(i);
        (pending, p.alias, p.len)
    };
    // Queued decryptions always finish (a decryption thread takes every job).
    while pending.load(Ordering::Acquire) != 0 {
        std::thread::sleep(std::time::Duration::from_micros(50));
    }
    space::remove(Span::of(view, len), Kind::ReceivePool);
    space::remove(Span::of(alias, len), Kind::ReceivePool);
    Ok(())
}

/// The pool holding all of `[out, out + len)` in its view, if `input` (the bounce buffer)
/// overlaps neither of its mappings: the alias address of `out`, and the pool counted busy
/// (its unregistration waits until the guard drops).
pub(super) fn find(out: usize, len: usize, input: usize) -> Option<(usize, PendingGuard)> {
    lock(&POOLS).iter().find_map(|p| {
        let inside = out >= p.view && out.checked_add(len)? <= p.view + p.len;
        let end = input.checked_add(len)?;
        let apart = |a: usize, n: usize| end <= a || a + n <= input;
        let input_clear = apart(p.view, p.len) && apart(p.alias, p.len);
        inside.then_some(())?;
        input_clear.then(|| {
            p.pending.fetch_add(1, Ordering::AcqRel);
            (p.alias + (out - p.view), PendingGuard(p.pending.clone()))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(len: usize) -> usize {
        // SAFETY: a fresh private anonymous mapping, checked.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        p as usize
    }

    #[test]
    fn registrations_are_checked_and_found_by_address() {
        let page = pipellm_core::page::size();
        let (v, a) = (map(4 * page), map(4 * page));
        // SAFETY: (every receive below) our own mappings, alive for the test; nothing
        // else changes their protection.
        unsafe {
            assert_eq!(receive(v, a, 0), Err(ReceiveError::BadRange));
            assert_eq!(receive(v + 1, a, page), Err(ReceiveError::BadRange));
            assert_eq!(receive(v, v + page, 2 * page), Err(ReceiveError::BadRange));
            receive(v, a, 2 * page).unwrap();
            assert_eq!(
                receive(v + page, a + 2 * page, page),
                Err(ReceiveError::Overlaps)
            );
            assert_eq!(
                receive(a + page, v + 2 * page, page),
                Err(ReceiveError::Overlaps)
            );
        }
        let registered = |start: usize, len: usize| {
            let mine = pipellm_core::space::Whose::Mine;
            space::overlapping(Span::of(start, len), Kind::ReceivePool.set(), mine).is_some()
        };
        assert!(registered(v + 100, 1) && registered(a + page, 10));
        assert!(!registered(v + 2 * page, page));
        // A destination inside the view maps to the same offset in the alias; a bounce
        // buffer overlapping either mapping is refused.
        let (alias, guard) = find(v + 300, 1000, v + 3 * page).unwrap();
        assert_eq!(alias, a + 300);
        assert!(find(v + 300, 1000, a + 10).is_none());
        assert!(
            find(v + 2 * page - 10, 100, v + 3 * page).is_none(),
            "runs past the pool"
        );
        drop(guard);
        assert_eq!(unreceive(a), Err(UnreceiveError::NotFound));
        unreceive(v).unwrap();
        assert!(!registered(v, 2 * page) && !registered(a, 2 * page));
    }
}
