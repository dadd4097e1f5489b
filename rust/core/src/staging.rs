//! Staging buffers: the memory a pre-encrypted chunk waits in until the device copies it.
//! Allocated page-aligned by the core (so the device layer can register them as pinned memory)
//! or handed in by the caller; wiped when dropped, since they hold plaintext snapshots briefly.

use crate::error::{Error, Result};
use crate::locks::lock;
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ptr::NonNull;
use std::sync::Mutex;
use zeroize::Zeroize;

/// A fixed-size buffer of bytes that this process owns exclusively.
pub struct StagingBuf {
    ptr: NonNull<u8>,
    len: usize,
    owner: Owner,
}

enum Owner {
    /// Allocated here with this layout.
    Core(Layout),
    /// Memory the caller handed in; `_keep` keeps it alive (e.g. a Python object).
    External(#[allow(dead_code)] Box<dyn Send + Sync>),
}

// SAFETY: a StagingBuf is the unique owner of its memory, like a Box<[u8]>: moving it to
// another thread moves that ownership; `&StagingBuf` only gives `&[u8]`.
unsafe impl Send for StagingBuf {}
// SAFETY: shared references only read the bytes.
unsafe impl Sync for StagingBuf {}

impl StagingBuf {
    /// A zeroed, page-aligned buffer of `len` bytes (rounded up to whole pages in memory).
    pub fn alloc(len: usize) -> Result<Self> {
        let size = crate::page::round_up(len.max(1));
        let layout = Layout::from_size_align(size, crate::page::size()).map_err(|_| {
            Error::InvalidLength(format!("staging buffer of {len} bytes is too large"))
        })?;
        // SAFETY: `layout` has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr).ok_or_else(|| {
            Error::OutOfMemory(format!(
                "could not allocate a staging buffer of {size} bytes"
            ))
        })?;
        Ok(Self {
            ptr,
            len,
            owner: Owner::Core(layout),
        })
    }

    /// Wraps memory the caller provides (for example pinned memory from the device layer).
    ///
    /// # Safety
    /// `ptr` must be valid for reads and writes of `len` bytes for as long as `keep` lives,
    /// and nothing else may access that memory while this value exists.
    // SAFETY: an `unsafe fn` for the contract in `# Safety` above; callers argue it where
    // they call.
    pub unsafe fn external(ptr: NonNull<u8>, len: usize, keep: Box<dyn Send + Sync>) -> Self {
        Self {
            ptr,
            len,
            owner: Owner::External(keep),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `len` bytes (allocated or guaranteed by `external`'s
        // contract) and we own it exclusively; `&self` excludes writers.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// Overwrites every byte with zeros (volatile writes the compiler cannot drop).
    pub fn wipe(&mut self) {
        self.as_mut_slice().zeroize();
    }
}

impl Drop for StagingBuf {
    fn drop(&mut self) {
        self.wipe();
        if let Owner::Core(layout) = self.owner {
            // SAFETY: allocated in `alloc` with exactly this layout, freed once.
            unsafe { dealloc(self.ptr.as_ptr(), layout) };
        }
    }
}

/// Writes the first byte of `page` (already zero) so the kernel maps the page now.
fn touch(page: &mut [u8]) {
    if let Some(b) = page.first_mut() {
        *std::hint::black_box(b) = 0;
    }
}

/// A fixed set of staging buffers: the cap on staging memory. Taking never blocks; when none
/// is free the pipeline's planner leaves predictions queued until one is returned.
pub struct StagingPool {
    free: Mutex<Vec<StagingBuf>>,
}

impl StagingPool {
    /// `count` buffers of `len` bytes, each touched once so its pages are resident before
    /// the first chunk needs them (a page fault per page would otherwise land on whichever
    /// encryption first uses the buffer, possibly on the request path).
    pub fn new(count: usize, len: usize) -> Result<Self> {
        let free = (0..count)
            .map(|_| {
                let mut b = StagingBuf::alloc(len)?;
                b.as_mut_slice()
                    .chunks_mut(crate::page::size())
                    .for_each(touch);
                Ok(b)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self::from_buffers(free))
    }

    pub fn from_buffers(free: Vec<StagingBuf>) -> Self {
        Self {
            free: Mutex::new(free),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<StagingBuf>> {
        lock(&self.free)
    }

    pub fn try_take(&self) -> Option<StagingBuf> {
        self.lock().pop()
    }

    /// Returns a buffer. It must not hold plaintext: buffers come back holding ciphertext
    /// (a snapshot is encrypted in place), and every path that can leave a plaintext snapshot
    /// behind wipes it first (a 4 MiB wipe here, on every return, would sit on the request
    /// path). Dropped buffers are wiped regardless.
    pub fn put(&self, buf: StagingBuf) {
        self.lock().push(buf);
    }

    pub fn free_count(&self) -> usize {
        self.lock().len()
    }

    /// Wipes and frees every buffer currently in the pool.
    pub fn clear(&self) {
        self.lock().clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_aligned_zeroed_and_wiped() {
        let mut b = StagingBuf::alloc(10_000).unwrap();
        assert_eq!(b.as_ptr() as usize % crate::page::size(), 0);
        assert!(b.as_slice().iter().all(|&x| x == 0));
        b.as_mut_slice().fill(7);
        b.wipe();
        assert!(b.as_slice().iter().all(|&x| x == 0));
    }

    #[test]
    fn pool_caps_the_number_of_buffers() {
        let pool = StagingPool::new(2, 64).unwrap();
        let a = pool.try_take().unwrap();
        let _b = pool.try_take().unwrap();
        assert!(pool.try_take().is_none());
        pool.put(a);
        assert_eq!(pool.free_count(), 1);
        assert!(pool.try_take().is_some());
    }

    #[test]
    fn external_memory_is_wiped_not_freed() {
        let mem = Box::leak(vec![5u8; 100].into_boxed_slice());
        let ptr = NonNull::new(mem.as_mut_ptr()).unwrap();
        // SAFETY: `mem` is leaked (lives forever) and used only through the StagingBuf.
        let b = unsafe { StagingBuf::external(ptr, 100, Box::new(())) };
        assert_eq!(b.as_slice()[0], 5);
        drop(b);
        assert!(mem.iter().all(|&x| x == 0));
    }
}
