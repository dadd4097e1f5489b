//! Host memory with a second, writable mapping for the writes the application expects (a
//! KV block swapped out, a weight shard loaded), so that page-protection validation costs no
//! fault and no `mprotect` per rewrite.
//!
//! With page protection, a pre-encrypted chunk is valid while its pages stay write-protected;
//! a source that is rewritten between uses (vLLM's CPU KV blocks, rewritten by every
//! swap-out) pays a fault, an `mprotect` to unprotect and another (with a TLB shootdown) to
//! arm it again, every time. A `HostPool` is one `memfd` mapped twice: the *view*, which is
//! what transfers read (watched as usual, and kept armed between uses), and the *alias*,
//! through which [`HostPool::write`] and [`HostPool::write_with`] write. Those writes are
//! announced to the write-detection registry (`writeguard::begin_alias_write`), which
//! invalidates every stamp over the range without touching the view's protection. Writes
//! through the view itself still work and are still caught (a fault, as for any watched
//! source). A forked child does not inherit the pool (`MADV_DONTFORK`): shared mappings
//! would otherwise let it write the parent's bytes.

use crate::error::{Error, Result};
use crate::space::{Conflicts, Kind, Whose};
use crate::span::Span;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// True if any byte of `[addr, addr + len)` is in a live pool's view (each pool registers
/// its view in the process's table, `space`): for callers that must refuse pool memory, such
/// as the driver interposer's watches, which would miss alias writes.
pub fn overlaps_a_host_pool(addr: usize, len: usize) -> bool {
    let span = Span::of(addr, len.max(1));
    crate::space::overlapping(span, Kind::PoolView.set(), Whose::Anyone).is_some()
}

/// Host memory mapped twice: a view that transfers read, an alias that writes go through.
pub struct HostPool {
    view: *mut u8,
    alias: *mut u8,
    len: usize,
    /// Lent to the driver interposer (see [`HostPool::lend_to_driver`]).
    lent: std::sync::atomic::AtomicBool,
    _fd: OwnedFd,
}

// SAFETY: the pool owns its two mappings (like a Box<[u8]> owns its allocation); moving it
// between threads moves that ownership. Shared access only reads through the view or writes
// through the alias announced to the write-detection registry (callers of the unsafe `write_with`
// promise no overlapping concurrent writes, see there).
unsafe impl Send for HostPool {}
// SAFETY: see Send; `&HostPool` gives reads of the view and bracketed writes.
unsafe impl Sync for HostPool {}

impl HostPool {
    /// A zeroed pool of `len` bytes (rounded up to whole pages in memory).
    pub fn new(len: usize) -> Result<Self> {
        if len == 0 {
            return Err(Error::InvalidLength(
                "a host pool needs at least 1 byte".into(),
            ));
        }
        let page = crate::page::size();
        let size = len
            .checked_next_multiple_of(page)
            .ok_or_else(|| Error::InvalidLength(format!("host pool of {len} bytes")))?;
        // SAFETY: memfd_create reads the NUL-terminated name; a negative result is an error.
        let fd = unsafe { libc::memfd_create(c"pipellm-host-pool".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(Error::last_os("memfd_create"));
        }
        // SAFETY: `fd` is a fresh descriptor we own; OwnedFd closes it exactly once.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: ftruncate on our own descriptor.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), size as libc::off_t) } != 0 {
            return Err(Error::last_os("sizing the host pool"));
        }
        let map = || {
            // SAFETY: a new shared mapping of our memfd at an address the kernel picks; it
            // overlaps nothing, and a failure is reported as MAP_FAILED.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    size,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd.as_raw_fd(),
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                Err(Error::last_os("mapping the host pool"))
            } else {
                Ok(p as *mut u8)
            }
        };
        let view = map()?;
        let alias = match map() {
            Ok(a) => a,
            Err(e) => {
                // SAFETY: unmapping the view we just mapped, which nothing else knows of.
                unsafe { libc::munmap(view.cast(), size) };
                return Err(e);
            }
        };
        let pool = Self {
            view,
            alias,
            len,
            lent: std::sync::atomic::AtomicBool::new(false),
            _fd: fd,
        };
        // Shared mappings would be shared with a forked child (private memory is copied on
        // write): a child writing the pool would change the parent's bytes behind its
        // validation, and the pool's plaintext would outlive the parent's control. Children
        // do not inherit the mappings at all.
        for p in [view, alias] {
            // SAFETY: `p` is one of the two mappings of `size` bytes made above.
            if unsafe { libc::madvise(p.cast(), size, libc::MADV_DONTFORK) } != 0 {
                return Err(Error::last_os("madvise(MADV_DONTFORK)"));
            }
        }
        if crate::space::insert(pool.view_span(), Kind::PoolView, Conflicts::default()).is_err() {
            // Only a failed allocation: nothing conflicts with a pool's fresh mapping.
            return Err(Error::OutOfMemory("cannot register a host pool".into()));
        }
        Ok(pool)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes mapped (the length rounded up to whole pages).
    pub fn mapped_len(&self) -> usize {
        crate::page::round_up(self.len)
    }

    /// The alias's first byte: for lending the pool to the driver interposer, which writes
    /// deferred D2H plaintext through it (see [`HostPool::lend_to_driver`]).
    pub fn alias_ptr(&self) -> *mut u8 {
        self.alias
    }

    /// Marks the pool as lent to the driver interposer as a D2H destination (the caller
    /// then registers view and alias with it): its view pages may be gated while a chunk is
    /// decrypted into them, so no write watch of ours may cover them (refused here if one
    /// does, and refused to new watches while lent), and [`HostPool::write`] first waits for
    /// any gated page of its range (one read per page through the view) so that a
    /// decryption still in flight never lands after the application's write.
    pub fn lend_to_driver(&self) -> Result<()> {
        if self.lent.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(());
        }
        let no_watch = Conflicts {
            any: Kind::WriteWatch.set(),
            ..Conflicts::default()
        };
        crate::space::insert(self.view_span(), Kind::LentPool, no_watch).map_err(|_| {
            Error::InvalidArgument(
                "the pool's memory is watched by a pipeline (unwatch its buffers first)".into(),
            )
        })?;
        if self.lent.swap(true, std::sync::atomic::Ordering::AcqRel) {
            // Lent by another thread meanwhile: one registration is enough.
            crate::space::remove(self.view_span(), Kind::LentPool);
        }
        Ok(())
    }

    /// Ends [`HostPool::lend_to_driver`] (after the interposer unregistered the pool).
    pub fn end_driver_loan(&self) {
        if self.lent.swap(false, std::sync::atomic::Ordering::AcqRel) {
            crate::space::remove(self.view_span(), Kind::LentPool);
        }
    }

    /// The view's pages, as registered in the process's table.
    fn view_span(&self) -> Span {
        Span::of(self.view as usize, self.mapped_len())
    }

    /// The view's first byte: what transfers read.
    pub fn as_ptr(&self) -> *const u8 {
        self.view
    }

    /// The pool's bytes, through the view.
    pub fn view(&self) -> &[u8] {
        // SAFETY: the view maps `len` bytes for the life of `self`. Writes through the alias
        // may change them meanwhile, as any source may change under a transfer; readers of a
        // source treat its bytes as foreign memory whose changes validation detects.
        unsafe { std::slice::from_raw_parts(self.view, self.len) }
    }

    fn check_range(&self, offset: usize, len: usize) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(Error::InvalidLength(format!(
                "range {offset}+{len} is beyond the host pool ({} bytes)",
                self.len
            ))),
        }
    }

    /// Copies `data` into the pool at `offset`, through the alias: chunks pre-encrypted from
    /// the old bytes are invalidated, the view's protection is left as it is. `data` may be a
    /// part of the pool's own view, overlapping the destination: the copy then has `memmove`
    /// semantics (the result is as if `data` had been copied out first).
    pub fn write(&self, offset: usize, data: &[u8]) -> Result<()> {
        let len = data.len();
        // `data` read through the view and the destination written through the alias are
        // the same pages at two addresses: `memmove` cannot see that they overlap. Read such
        // a source through the alias too, so that both ranges are in one mapping.
        let from = data.as_ptr() as usize;
        let src = match from.checked_sub(self.view as usize) {
            Some(at) if at < self.len && len <= self.len - at => {
                // SAFETY: `data` lies in the view (`at + len <= self.len`), so the same range
                // is in bounds of the alias, which maps the same pages.
                unsafe { self.alias.add(at) }.cast_const()
            }
            _ => data.as_ptr(),
        };
        // SAFETY: the range is in bounds (checked by `with_alias`); `src` is valid for `len`
        // reads (the caller's slice, or its twin in the alias). `ptr::copy` handles overlap
        // and needs no exclusive borrow of the pool, so concurrent writers of the same range
        // race only on the bytes (as two memmoves into shared memory would), never on Rust
        // references.
        unsafe { self.with_alias(offset, len, |dst| std::ptr::copy(src, dst, len)) }
    }

    /// Lets `f` write `len` bytes of the pool at `offset` through the alias (for example a
    /// receiver decrypting a device-to-host message straight into the pool).
    ///
    /// # Safety
    /// No other `write_with` over an overlapping range may run at the same time (the slice
    /// handed to `f` is exclusive for its duration).
    // SAFETY: an `unsafe fn` for the contract in `# Safety` above.
    pub unsafe fn write_with<T>(
        &self,
        offset: usize,
        len: usize,
        f: impl FnOnce(&mut [u8]) -> T,
    ) -> Result<T> {
        // SAFETY: `with_alias` hands a pointer to `len` in-bounds bytes of the alias;
        // exclusive for the closure's duration by the caller's promise.
        unsafe {
            self.with_alias(offset, len, |dst| {
                f(std::slice::from_raw_parts_mut(dst, len))
            })
        }
    }

    /// Runs `f` with a pointer to `len` bytes of the alias at `offset`, announced to the write
    /// detection (and, when lent to the driver, after pending decryptions into the range).
    ///
    /// # Safety
    /// As for `write_with`, for whatever `f` writes.
    // SAFETY: an `unsafe fn` for the contract in `# Safety` above.
    unsafe fn with_alias<T>(
        &self,
        offset: usize,
        len: usize,
        f: impl FnOnce(*mut u8) -> T,
    ) -> Result<T> {
        self.check_range(offset, len)?;
        if self.lent.load(std::sync::atomic::Ordering::Acquire) && len > 0 {
            // A D2H chunk may still be decrypting into this range (the interposer gates its
            // pages until the plaintext is in place): reading one byte per page through the
            // view waits for it, so our write lands after it, not under it.
            let page = crate::page::size();
            // The view is page-aligned, so rounding down stays inside it.
            let mut at = (self.view as usize + offset) / page * page;
            while at < self.view as usize + offset + len {
                // SAFETY: inside the view mapping (in bounds, checked above); a volatile
                // read so that it is not elided; a gated page makes it wait in the fault
                // handler.
                unsafe { std::ptr::read_volatile(at as *const u8) };
                at = (at / page + 1) * page;
            }
        }
        let marks = crate::writeguard::begin_alias_write(self.view as usize + offset, len);
        // SAFETY: in bounds (checked); the alias maps the same pages as the view for the life
        // of `self`.
        let dst = unsafe { self.alias.add(offset) };
        let out = f(dst);
        drop(marks); // also if `f` panicked: the unwind drops it
        Ok(out)
    }
}

impl Drop for HostPool {
    fn drop(&mut self) {
        let size = crate::page::round_up(self.len);
        self.end_driver_loan();
        crate::space::remove(self.view_span(), Kind::PoolView);
        // SAFETY: both mappings were made in `new` with this size and are unmapped once;
        // nothing borrows them past `self` (sources holding the pool keep it alive).
        unsafe {
            libc::munmap(self.view.cast(), size);
            libc::munmap(self.alias.cast(), size);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::writeguard::WriteWatch;

    #[test]
    fn writes_from_the_pools_own_view_behave_like_memmove() {
        let n = 3 * 4096;
        let pool = HostPool::new(n).unwrap();
        let init: Vec<u8> = (0..n).map(|i| (i * 7 % 251) as u8).collect();
        pool.write(0, &init).unwrap();
        for (dst, src, len) in [(100, 0, 4096), (0, 100, 4096), (5, 5, 64), (4096, 0, 8192)] {
            let mut expected = pool.view().to_vec();
            expected.copy_within(src..src + len, dst);
            // The source is a slice of the view itself, overlapping the destination.
            // SAFETY: in bounds of the view, which lives as long as `pool`.
            let data = unsafe { std::slice::from_raw_parts(pool.as_ptr().add(src), len) };
            pool.write(dst, data).unwrap();
            assert!(
                pool.view() == &expected[..],
                "dst {dst} src {src} len {len}"
            );
        }
    }

    #[test]
    fn alias_writes_show_in_the_view_and_invalidate_stamps_without_faults() {
        let pool = HostPool::new(3 * 4096).unwrap();
        let p = pool.as_ptr();
        // SAFETY: the pool outlives the watch (dropped first, at the end of scope).
        let w = unsafe { WriteWatch::register(p.wrapping_add(4096), 4096) }.unwrap();
        let s = w.arm().unwrap();
        assert!(w.is_protected());
        pool.write(4096 + 10, &[1, 2, 3]).unwrap();
        assert_eq!(&pool.view()[4096 + 10..4096 + 13], &[1, 2, 3]);
        assert!(
            !w.unchanged_since(s),
            "an alias write invalidates the stamp"
        );
        assert!(
            w.is_protected(),
            "and leaves the view protected: no fault happened"
        );
        let s2 = w.arm().unwrap();
        assert!(w.unchanged_since(s2));
        // Writes elsewhere in the pool leave the watched range valid.
        pool.write(0, &[9; 100]).unwrap();
        pool.write(2 * 4096, &[9; 100]).unwrap();
        assert!(w.unchanged_since(s2));
        drop(w);
    }

    #[test]
    fn a_region_registered_during_a_write_validates_only_after_it() {
        let pool = HostPool::new(4096).unwrap();
        let p = pool.as_ptr();
        let write = crate::writeguard::begin_alias_write(p as usize, 4096);
        // SAFETY: the pool outlives the watch.
        let w = unsafe { WriteWatch::register(p, 4096) }.unwrap();
        let s = w.arm().unwrap();
        assert!(!w.unchanged_since(s), "a write is in progress");
        drop(write);
        assert!(!w.unchanged_since(s), "the write ended after the stamp");
        let s2 = w.arm().unwrap();
        assert!(w.unchanged_since(s2));
        drop(w);
    }

    #[test]
    fn live_pools_are_known_by_address() {
        let pool = HostPool::new(5000).unwrap();
        let a = pool.as_ptr() as usize;
        assert!(overlaps_a_host_pool(a + 4999, 1));
        assert!(overlaps_a_host_pool(a - 10, 11));
        assert!(!overlaps_a_host_pool(a - 10, 10));
        drop(pool);
        assert!(!overlaps_a_host_pool(a, 1));
    }

    #[test]
    fn out_of_range_writes_are_typed_errors() {
        let pool = HostPool::new(1000).unwrap();
        assert!(matches!(
            pool.write(999, &[1, 2]),
            Err(Error::InvalidLength(_))
        ));
        assert!(pool.write(usize::MAX, &[1]).is_err());
        assert!(HostPool::new(0).is_err());
        pool.write(998, &[1, 2]).unwrap();
        assert_eq!(&pool.view()[998..], &[1, 2]);
    }

    #[test]
    fn a_write_racing_an_arm_never_validates_old_bytes() {
        // A reader arms, snapshots and checks while a writer rewrites the range through the
        // alias with a new byte value each time: whenever the check passes, the snapshot
        // must be uniform (never half old, half new).
        let pool = std::sync::Arc::new(HostPool::new(64 << 10).unwrap());
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let (pool, stop) = (pool.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut v = 0u8;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    v = v.wrapping_add(1);
                    pool.write(0, &vec![v; 64 << 10]).unwrap();
                }
            })
        };
        // SAFETY: the pool outlives the watch.
        let w = unsafe { WriteWatch::register(pool.as_ptr(), 64 << 10) }.unwrap();
        let mut validated = 0;
        for _ in 0..2000 {
            let s = w.arm().unwrap();
            let snap = pool.view().to_vec();
            if w.unchanged_since(s) {
                validated += 1;
                assert!(
                    snap.iter().all(|&b| b == snap[0]),
                    "a torn snapshot validated"
                );
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        writer.join().unwrap();
        drop(w);
        let _ = validated; // may be 0 on a busy machine: the property is about the others
    }

    #[test]
    fn a_lent_pool_refuses_watches_and_writes_after_a_gated_decryption() {
        let pool = HostPool::new(3 * 4096 + 10).unwrap();
        // Refused while one of our watches covers it.
        // SAFETY: the pool's view stays mapped while `w` lives; only this code writes it.
        let w = unsafe { WriteWatch::register(pool.as_ptr(), 100) }.unwrap();
        assert!(pool.lend_to_driver().is_err());
        drop(w);
        pool.lend_to_driver().unwrap();
        // SAFETY: as above (the registration is refused).
        assert!(unsafe { WriteWatch::register(pool.as_ptr(), 100) }.is_err());
        // The interposer's side, played here: close a page, "decrypt" through the alias
        // later, then open. A write issued meanwhile must land after the decryption.
        // SAFETY: the view is read-write and stays mapped; this test opens the gate from
        // another thread, which touches only the alias.
        let gate = unsafe { crate::gate::close(pool.as_ptr().wrapping_add(4096), 4096) }.unwrap();
        let alias = pool.alias_ptr() as usize;
        let decryptor = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(30));
            // SAFETY: the pool's alias, mapped while the pool lives (joined below).
            unsafe { std::ptr::write_bytes((alias + 4096) as *mut u8, 0xDD, 4096) };
            gate.open();
        });
        pool.write(4096 + 100, &[0xAA; 50]).unwrap();
        decryptor.join().unwrap();
        let v = pool.view();
        assert!(
            v[4096 + 100..4096 + 150].iter().all(|&b| b == 0xAA),
            "a decryption still in flight overwrote the later write"
        );
        assert_eq!(v[4096 + 99], 0xDD);
        pool.end_driver_loan();
        // SAFETY: as above; allowed again.
        let w = unsafe { WriteWatch::register(pool.as_ptr(), 100) }.unwrap();
        drop(w);
    }
}
