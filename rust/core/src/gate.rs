//! Gates: pages held inaccessible (closed) until their content is ready; a reader waits at
//! the gate, it never sees what is there before. (Not to be confused with *sealing*, which in
//! this crate means AEAD encryption: [`crate::sequencer::Sealed`].)
//!
//! For deferred decryption (the driver interposer's D2H path): the ciphertext is copied into
//! the destination through a second mapping of the same memory, its tag is checked, and it
//! is decrypted in place later on another thread, while the destination's pages, as the
//! application maps them, are `PROT_NONE`. A thread that touches them faults into the
//! write-detection handler ([`crate::writeguard`], one SIGSEGV handler for both), which
//! waits here until the gate opens, then lets the access retry on readable pages.
//!
//! Rules for callers (see [`close`]): gated memory is normally mapped read-write (opening
//! restores exactly that); it is not write-watched by either copy of the library (each gate
//! is registered in the process's table, `space`, where `close` refuses pages a write watch
//! holds and a write watch refuses gated pages); and the thread that will open a gate
//! never touches the gated pages through this mapping (it would wait for itself).
//!
//! Gates may share pages (two messages decrypted into neighbouring bytes): a page opens
//! when the last gate covering it opens. Every protection change happens under one mutex,
//! together with the decision that it is the right one, so two threads cannot apply
//! decisions in the wrong order; the handler takes no lock, it only reads the slots.

use crate::error::{Error, Result};
use crate::space::gate_slots as slots;
use crate::space::{Conflicts, Kind};
use crate::span::Span;
use std::sync::Mutex;

pub use slots::MAX_GATES;

/// Serialises closing and opening (never taken in the handler).
static LOCK: Mutex<()> = Mutex::new(());

/// Pages made inaccessible by [`close`]; opened by [`Gate::open`] or on drop.
#[derive(Debug)]
pub struct Gate {
    slot: usize,
}

use crate::page::size as page;

fn lock() -> std::sync::MutexGuard<'static, ()> {
    crate::locks::lock(&LOCK)
}

/// Makes the pages holding `[ptr, ptr + len)` inaccessible until the returned gate opens.
///
/// # Safety
/// The memory must stay mapped, read-write, until the gate opens, and nothing else may
/// change its protection meanwhile; whoever opens the gate must not touch these pages
/// through this mapping before. Code that touches them meanwhile waits (in a fault handler)
/// for the gate to open, so it must not hold anything the opener needs.
// SAFETY: an `unsafe fn` for the contract in `# Safety` above; callers argue it where they
// call.
pub unsafe fn close(ptr: *const u8, len: usize) -> Result<Gate> {
    crate::writeguard::install()?;
    let p = page();
    let start = (ptr as usize) / p * p;
    let end = (ptr as usize)
        .checked_add(len.max(1))
        .ok_or_else(|| Error::InvalidLength("range past the end of memory".into()))?
        .div_ceil(p)
        * p;
    let _g = lock();
    let slot = slots::free_gate_slot()
        .ok_or_else(|| Error::Capacity(format!("more than {MAX_GATES} gates closed")))?;
    let no_watch = Conflicts {
        any: Kind::WriteWatch.set(),
        ..Conflicts::default()
    };
    if crate::space::insert(Span::new(start, end), Kind::Gate, no_watch).is_err() {
        return Err(Error::InvalidArgument(
            "cannot close pages that a write watch covers".into(),
        ));
    }
    slots::activate_gate(slot, start, end);
    // SAFETY: the caller vouched for the range (see `# Safety`); no access is a subset of
    // the access it had, restored by `open`.
    if unsafe { libc::mprotect(start as *mut libc::c_void, end - start, libc::PROT_NONE) } != 0 {
        let err = std::io::Error::last_os_error();
        // Pages a failed mprotect may have closed in part are opened again by the same
        // rule as any gate's.
        release(slot);
        return Err(Error::os("cannot close the destination pages", &err));
    }
    Ok(Gate { slot })
}

/// Opens the pages of `slot` that no other gate covers, then frees the slot. Caller holds
/// the lock.
fn release(slot: usize) {
    let (start, end) = slots::gate_span(slot);
    // SAFETY: part of a range the closer vouched for, mapped read-write before it was
    // gated: this restores that access, except on pages another gate still holds.
    unsafe {
        crate::writeguard::open_pages_except(start, end, |addr| slots::gated_by_other(addr, slot))
    };
    // The slot is freed only once its pages are readable: a waiting reader then retries on
    // open pages (or waits on for a gate that still covers its page).
    slots::deactivate_gate(slot);
    crate::space::remove(Span::new(start, end), Kind::Gate);
    crate::writeguard::note_pages_opened();
}

impl Gate {
    /// Opens the gate: readers waiting on these pages go ahead. The content must be final.
    pub fn open(self) {
        drop(self)
    }

    /// The gated range, in whole pages.
    pub fn span(&self) -> (usize, usize) {
        slots::gate_span(self.slot)
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        let _g = lock();
        release(self.slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::space::gate_slots::gated as covers;
    use std::sync::atomic::AtomicU64;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    /// A shared memfd mapping twice: (view, alias, len).
    fn double_map(len: usize) -> (*mut u8, *mut u8) {
        // SAFETY: test set-up: a fresh memfd, sized, mapped twice, checked.
        unsafe {
            let fd = libc::memfd_create(c"gate-test".as_ptr(), 0);
            assert!(fd >= 0);
            assert_eq!(libc::ftruncate(fd, len as libc::off_t), 0);
            let m = |_| {
                let p = libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd,
                    0,
                );
                assert_ne!(p, libc::MAP_FAILED);
                p.cast::<u8>()
            };
            let (v, a) = (m(0), m(1));
            libc::close(fd);
            (v, a)
        }
    }

    #[test]
    fn a_reader_waits_for_the_content_and_never_sees_what_was_there() {
        let len = 8 * page();
        let (view, alias) = double_map(len);
        for round in 0..20u8 {
            // Old content: `round`; new content, written through the alias while gated:
            // `round + 100`.
            // SAFETY: our own mappings, not gated yet.
            unsafe { std::ptr::write_bytes(view, round, len) };
            // SAFETY: our mapping, read-write, opened below by this thread, which does not
            // touch the view meanwhile.
            let gate = unsafe { close(view.add(100), len - 200) }.unwrap();
            let v = view as usize;
            let reader = std::thread::spawn(move || {
                // SAFETY: reads our mapping; a gated page makes this wait in the handler.
                let b = unsafe { std::ptr::read_volatile((v + len / 2) as *const u8) };
                // SAFETY: as above (page 0, outside the gated bytes but on a gated page).
                let first = unsafe { std::ptr::read_volatile(v as *const u8) };
                (b, first)
            });
            std::thread::sleep(Duration::from_millis(2));
            // SAFETY: writes through our second mapping.
            unsafe { std::ptr::write_bytes(alias, round + 100, len) };
            gate.open();
            let (b, first) = reader.join().unwrap();
            assert_eq!(
                b,
                round + 100,
                "the reader saw content from before the gate opened"
            );
            assert_eq!(first, round + 100);
        }
    }

    #[test]
    fn a_shared_page_opens_with_the_last_gate() {
        let len = 4 * page();
        let (view, _alias) = double_map(len);
        // Two gates sharing page 1.
        // SAFETY: our read-write mapping; opened below by this thread, which does not touch
        // the view while gated.
        let a = unsafe { close(view, page() + 10) }.unwrap();
        // SAFETY: as above.
        let b = unsafe { close(view.add(page() + 20), page()) }.unwrap();
        assert_eq!(a.span(), (view as usize, view as usize + 2 * page()));
        a.open();
        assert!(covers(view as usize + page()), "page 1 is still b's");
        assert!(!covers(view as usize));
        let v = view as usize + page();
        let done = Arc::new(AtomicU64::new(0));
        let d = done.clone();
        let reader = std::thread::spawn(move || {
            // SAFETY: reads our mapping; waits while b covers the page.
            let x = unsafe { std::ptr::read_volatile(v as *const u8) };
            d.store(1, Ordering::SeqCst);
            x
        });
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_millis(20) {
            assert_eq!(
                done.load(Ordering::SeqCst),
                0,
                "read went ahead through a gate"
            );
            std::thread::yield_now();
        }
        b.open();
        reader.join().unwrap();
        // Page 0 is readable and writable again.
        // SAFETY: our mapping, no gate left.
        unsafe { std::ptr::write_volatile(view, 7) };
    }

    #[test]
    fn watched_pages_cannot_be_gated() {
        let len = 2 * page();
        // Private anonymous memory: what a write watch accepts.
        let mut buf = crate::staging::StagingBuf::alloc(len).unwrap();
        let view = buf.as_mut_slice().as_mut_ptr();
        // SAFETY: our mapping, written only by this test's code.
        let w = unsafe { crate::writeguard::WriteWatch::register(view, 10) }.unwrap();
        // SAFETY: as in the other tests (the call is refused).
        assert!(unsafe { close(view, len) }.is_err());
        drop(w);
        // SAFETY: as above; now allowed.
        let s = unsafe { close(view, len) }.unwrap();
        // SAFETY: registering is refused while gated (nothing is protected).
        assert!(unsafe { crate::writeguard::WriteWatch::register(view, 10) }.is_err());
        s.open();
    }

    #[test]
    fn a_forked_child_touching_a_gated_page_faults_instead_of_waiting_forever() {
        let len = 2 * page();
        let (view, alias) = double_map(len);
        // SAFETY: our read-write mapping; opened below by this thread.
        let s = unsafe { close(view, len) }.unwrap();
        // SAFETY: the child only reads one byte (faulting into the handler, which calls
        // async-signal-safe functions only) and exits; the parent waits for it.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: the child's inherited view of the gated page.
            unsafe { std::ptr::read_volatile(view) };
            // SAFETY: _exit is async-signal-safe; reached only if the read went through.
            unsafe { libc::_exit(0) };
        }
        assert!(pid > 0);
        let t0 = Instant::now();
        let mut status = 0;
        loop {
            // SAFETY: waiting for our own child without blocking.
            let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            if r == pid {
                break;
            }
            if t0.elapsed() > Duration::from_secs(10) {
                // SAFETY: killing and reaping our own child.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                    libc::waitpid(pid, &mut status, 0);
                }
                panic!("the child waited on a gate nobody in it would open");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSEGV);
        s.open();
        // SAFETY: our own mappings, no gate left.
        unsafe {
            libc::munmap(view.cast(), len);
            libc::munmap(alias.cast(), len);
        }
    }

    /// True if this process can read the page at `addr` now (`process_vm_readv` on our own
    /// memory reports EFAULT instead of faulting).
    fn readable(addr: usize) -> bool {
        let mut b = [0u8; 1];
        let local = libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: 1,
        };
        let remote = libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: 1,
        };
        // SAFETY: reads one byte of our own address space into a local buffer; the kernel
        // checks the remote range and reports EFAULT for an inaccessible page.
        unsafe { libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) == 1 }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Any sequence of gates (arbitrary, overlapping, unaligned ranges) and opens: a page
        /// is inaccessible exactly while some open gate covers it.
        #[test]
        fn a_page_is_closed_exactly_while_a_gate_covers_it(
            ops in proptest::collection::vec(
                (proptest::prelude::any::<bool>(), 0usize..16 * 4096, 1usize..5 * 4096, 0usize..8),
                1..40,
            )
        ) {
            const PAGES: usize = 16;
            let (view, alias) = double_map(PAGES * page());
            let base = view as usize;
            let mut open: Vec<(Gate, usize, usize)> = Vec::new();
            for (close_it, off, len, pick) in ops {
                if close_it || open.is_empty() {
                    let len = len.min(PAGES * page() - off).max(1);
                    // SAFETY: our read-write mapping, opened below by this thread, which
                    // does not touch the view while gated (it only asks the kernel).
                    let s = unsafe { close(view.add(off), len) }.unwrap();
                    let first = (base + off) / page() * page();
                    let end = (base + off + len).div_ceil(page()) * page();
                    open.push((s, first, end));
                } else {
                    let (s, _, _) = open.swap_remove(pick % open.len());
                    s.open();
                }
                for p in 0..PAGES {
                    let addr = base + p * page();
                    let covered = open.iter().any(|&(_, a, b)| a <= addr && addr < b);
                    proptest::prop_assert_eq!(readable(addr), !covered, "page {}", p);
                }
            }
            drop(open);
            for p in 0..PAGES {
                proptest::prop_assert!(readable(base + p * page()));
            }
            // SAFETY: our own mapping, no gate left on it.
            unsafe {
                libc::munmap(view.cast(), PAGES * page());
                libc::munmap(alias.cast(), PAGES * page());
            }
        }
    }
}
