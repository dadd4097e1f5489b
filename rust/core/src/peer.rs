//! Finding the other copy of this library in the process: the extension and the interposer
//! each link their own copy of this crate, and some process-wide facts (the pages protected,
//! the SIGSEGV handler) must have one owner. The owner is the copy whose versioned C entry
//! points `dlsym` finds in the global scope (the interposer, loaded as the process's
//! `libcrypto.so.3`; the extension, loaded `RTLD_LOCAL` by Python, is never found there).
//! `dladdr` tells another copy's symbols from this copy's own, since ELF interposition may
//! resolve even this copy's own exported names to the interposer's.

use std::ffi::CStr;

/// The base address of the object (library) that `p` lies in; 0 if none.
fn object_of(p: *const libc::c_void) -> usize {
    // SAFETY: dladdr only reads the loader's tables; `info` is a plain out-parameter.
    unsafe {
        let mut info: libc::Dl_info = std::mem::zeroed();
        if libc::dladdr(p, &mut info) == 0 {
            return 0;
        }
        info.dli_fbase as usize
    }
}

/// The addresses of `names` in another copy of this library, if the global scope holds one
/// with all of them (in one object); None if it holds none, or only this copy's (`mine`: the
/// address of anything in this copy). Not for signal context (it calls the loader).
pub(crate) fn symbols<const N: usize>(
    names: [&CStr; N],
    mine: *const libc::c_void,
) -> Option<[*mut libc::c_void; N]> {
    // SAFETY: dlsym with RTLD_DEFAULT and NUL-terminated names only reads the loader's
    // tables.
    let found = names.map(|n| unsafe { libc::dlsym(libc::RTLD_DEFAULT, n.as_ptr()) });
    let theirs = object_of(found[0]);
    let ok = found
        .iter()
        .all(|p| !p.is_null() && object_of(*p) == theirs)
        && theirs != object_of(mine);
    ok.then_some(found)
}
