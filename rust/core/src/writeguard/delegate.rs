//! One SIGSEGV handler per process. The extension and the interposer each link their own copy
//! of this crate; with the mprotect tracker both would install a handler and chain to each
//! other. Instead, the copy that `dlsym` finds in the global scope (the interposer, loaded as
//! the process's `libcrypto.so.3`) installs the handler, and any other copy (the extension)
//! registers with it the function that claims faults on its own regions and gates, and asks
//! it, where it would have put a handler of its own back on top, to put that one back. The
//! handler asks its clients about an access fault none of its own tables claims, before the
//! bounded retry and the previous handler.
//!
//! The entry points are C functions with a version in their names, found with `dlsym` and
//! told apart from this copy's own with `dladdr` (ELF interposition would otherwise resolve
//! even this copy's reference to the interposer's). Without a provider a copy installs its
//! own handler, as before.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// A client's claim: given the address of an access fault, 1 if the client handled it (the
/// access is then retried), 0 if not. Must be async-signal-safe.
pub(crate) type ClaimFn = extern "C" fn(usize) -> i32;

/// Clients at once (there is one other copy in practice; a few more cost nothing).
const MAX_CLIENTS: usize = 4;

/// The registered claims, as addresses (0: free). Read by the handler: atomics only.
static CLIENTS: [AtomicUsize; MAX_CLIENTS] = [const { AtomicUsize::new(0) }; MAX_CLIENTS];

/// Registers a client's claim with this copy's handler, installing the handler first.
/// 0, or -1 if the handler cannot be installed or no slot is free.
#[no_mangle]
pub extern "C" fn pipellm_segv_add_client_v1(claim: ClaimFn) -> i32 {
    if super::install_own().is_err() {
        return -1;
    }
    let f = claim as usize;
    for c in &CLIENTS {
        match c.compare_exchange(0, f, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return 0,
            Err(existing) if existing == f => return 0,
            Err(_) => {}
        }
    }
    -1
}

/// Puts this copy's handler back on top if another replaced it (a client's `reassert`).
#[no_mangle]
pub extern "C" fn pipellm_segv_reassert_v1() {
    super::reassert_own();
}

/// A client opened pages: faults taken on them just before are retried (see `on_segv`).
/// Async-signal-safe (an atomic store).
#[no_mangle]
pub extern "C" fn pipellm_segv_pages_opened_v1() {
    super::note_pages_opened_here();
}

/// For the handler: whether a client claims the access fault at `addr`. Async-signal-safe.
pub(crate) fn clients_claim(addr: usize) -> bool {
    CLIENTS.iter().any(|c| {
        let f = c.load(Ordering::Acquire);
        f != 0 && {
            // SAFETY: only `pipellm_segv_add_client_v1` stores non-zero values, each the
            // address of a `ClaimFn` in a copy of this crate that stays loaded (the
            // extension and the interposer are never unloaded).
            let claim = unsafe { std::mem::transmute::<usize, ClaimFn>(f) };
            claim(addr) != 0
        }
    })
}

pub(crate) struct Provider {
    add_client: extern "C" fn(ClaimFn) -> i32,
    reassert: extern "C" fn(),
    pages_opened: extern "C" fn(),
}

impl Provider {
    pub(crate) fn add_client(&self, claim: ClaimFn) -> bool {
        (self.add_client)(claim) == 0
    }
    pub(crate) fn reassert(&self) {
        (self.reassert)()
    }
    pub(crate) fn pages_opened(&self) {
        (self.pages_opened)()
    }
}

/// Another copy's handler, if the global scope holds one (decided once).
pub(crate) fn provider() -> Option<&'static Provider> {
    static P: OnceLock<Option<Provider>> = OnceLock::new();
    P.get_or_init(|| {
        let names = [
            c"pipellm_segv_add_client_v1",
            c"pipellm_segv_reassert_v1",
            c"pipellm_segv_pages_opened_v1",
        ];
        let [a, r, o] = crate::peer::symbols(names, std::ptr::addr_of!(CLIENTS).cast())?;
        // SAFETY: symbols under these versioned names are the functions above in another
        // copy of this crate (all three in the same object), with exactly these signatures.
        unsafe {
            Some(Provider {
                add_client: std::mem::transmute::<*mut libc::c_void, extern "C" fn(ClaimFn) -> i32>(
                    a,
                ),
                reassert: std::mem::transmute::<*mut libc::c_void, extern "C" fn()>(r),
                pages_opened: std::mem::transmute::<*mut libc::c_void, extern "C" fn()>(o),
            })
        }
    })
    .as_ref()
}
