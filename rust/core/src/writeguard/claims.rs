//! Which copy of this library write-protects which pages, one table per process.
//!
//! The extension (`pipellm._core`) and the interposer (`libpipellm_cc_shim.so`, loaded as
//! the process's `libcrypto.so.3`) each link their own copy of this crate, so each has its
//! own region table and, with the mprotect tracker, its own SIGSEGV handler. Two copies
//! protecting the same page would each trust their own bookkeeping: a write faults into
//! whichever handler is on top, which records it for its own regions only and makes the page
//! writable, and the other copy's region still reads as unwritten: a stale hit. So before a
//! copy's mprotect tracker protects pages it *claims* them here, and a claim that overlaps
//! another copy's is refused (the chunk is then validated by fingerprint). The userfaultfd
//! tracker needs no claim: the kernel refuses a second userfaultfd on registered pages.
//!
//! The table is the one in the copy that `dlsym` finds in the process's global scope: the
//! interposer's, when it is loaded (the extension, loaded `RTLD_LOCAL` by Python, is never
//! found there). Without it each copy asks itself, and only one copy protects pages. The
//! entry points are C functions with a version in their names, so copies of different
//! builds agree on them or do not find each other.

use crate::locks::lock;
use crate::span::Span;
use std::sync::{Mutex, MutexGuard, OnceLock};

/// This copy's identity in the table: the address of one of its statics.
static OWNER: u8 = 0;

fn owner() -> usize {
    std::ptr::addr_of!(OWNER) as usize
}

/// `(start, end, owner)` of every claim, in this copy if it is the one the process uses.
static TABLE: Mutex<Vec<(usize, usize, usize)>> = Mutex::new(Vec::new());

/// Claims `[start, end)` for `owner`: 0, or -1 if a page of it is claimed by another owner.
/// An owner may claim overlapping ranges several times (its own table sorts them out).
#[no_mangle]
pub extern "C" fn pipellm_page_claim_v1(start: usize, end: usize, owner: usize) -> i32 {
    claim_here(start, end, owner)
}

/// Releases one claim of exactly `[start, end)` by `owner` (made by `pipellm_page_claim_v1`).
#[no_mangle]
pub extern "C" fn pipellm_page_release_v1(start: usize, end: usize, owner: usize) {
    release_here(start, end, owner)
}

// The table of this copy. Not exported, so a reference to them is never resolved to another
// copy's (a reference to an exported name may be: ELF interposition).
extern "C" fn claim_here(start: usize, end: usize, owner: usize) -> i32 {
    // A panic must not unwind into C: the only one possible is a failed allocation.
    std::panic::catch_unwind(|| {
        let mut t = lock(&TABLE);
        let r = Span::new(start, end);
        if t.iter()
            .any(|&(s, e, o)| o != owner && Span::new(s, e).overlaps(r))
        {
            return -1;
        }
        t.push((start, end, owner));
        0
    })
    .unwrap_or(-1)
}

extern "C" fn release_here(start: usize, end: usize, owner: usize) {
    let _ = std::panic::catch_unwind(|| {
        let mut t = lock(&TABLE);
        if let Some(i) = t.iter().position(|&c| c == (start, end, owner)) {
            t.swap_remove(i);
        }
    });
}

type ClaimFn = extern "C" fn(usize, usize, usize) -> i32;
type ReleaseFn = extern "C" fn(usize, usize, usize);

struct Api {
    claim: ClaimFn,
    release: ReleaseFn,
    shared: bool,
}

static API: OnceLock<Api> = OnceLock::new();

fn api() -> &'static Api {
    API.get_or_init(|| {
        let names = [c"pipellm_page_claim_v1", c"pipellm_page_release_v1"];
        let Some([c, r]) = super::peer::symbols(names, std::ptr::addr_of!(OWNER).cast()) else {
            // None in the global scope, or this very copy's: this copy's own table.
            return Api {
                claim: claim_here,
                release: release_here,
                shared: false,
            };
        };
        // SAFETY: symbols under these versioned names are the functions above in another
        // copy of this crate (both found in the same object), with exactly these signatures.
        unsafe {
            Api {
                claim: std::mem::transmute::<*mut libc::c_void, ClaimFn>(c),
                release: std::mem::transmute::<*mut libc::c_void, ReleaseFn>(r),
                shared: true,
            }
        }
    })
}

/// Claims the pages `[start, end)` for this copy; false if another copy claimed some.
pub(crate) fn claim(start: usize, end: usize) -> bool {
    (api().claim)(start, end, owner()) == 0
}

/// Releases a claim made by `claim` with the same range.
pub(crate) fn release(start: usize, end: usize) {
    (api().release)(start, end, owner())
}

/// For a fork handler (see [`super::hold_for_fork`]): the process's table, locked, if it is
/// this copy's. Without a lookup made yet (none is made here: `dlsym` in a fork handler could
/// wait on the loader's lock), another copy may still be using this one's through the
/// exported names, so it is locked then too.
pub(super) fn hold_for_fork() -> Option<MutexGuard<'static, Vec<(usize, usize, usize)>>> {
    match API.get() {
        Some(a) if a.shared => None,
        _ => Some(lock(&TABLE)),
    }
}

/// True if this copy uses another copy's table (the interposer's, from the extension).
pub fn shared() -> bool {
    api().shared
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_overlapping_another_owners_is_refused_and_released_claims_free_the_pages() {
        assert!(!shared(), "a test binary holds one copy");
        let (a, b) = (0x7000_0000_0000usize, 0x7000_0000_4000usize);
        let other = owner() + 1;
        assert_eq!(pipellm_page_claim_v1(a, b, other), 0);
        assert!(
            !claim(a + 0x1000, a + 0x2000),
            "inside another copy's claim"
        );
        assert!(!claim(a - 0x1000, a + 0x1000), "overlapping its start");
        assert!(claim(b, b + 0x1000), "next to it");
        assert_eq!(
            pipellm_page_claim_v1(b, b + 0x1000, other),
            -1,
            "and the other way"
        );
        release(b, b + 0x1000);
        pipellm_page_release_v1(a, b, other);
        assert!(claim(a, b), "released");
        assert!(claim(a, b), "an owner may claim again");
        release(a, b);
        release(a, b);
        assert_eq!(pipellm_page_claim_v1(a, b, other), 0);
        pipellm_page_release_v1(a, b, other);
    }
}
