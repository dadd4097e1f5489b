//! The interposer's two kinds of registered memory never overlap: ranges validated by write
//! watches (`watch_ranges`) and receive pools whose pages are gated while D2H chunks are
//! decrypted into them (`d2h`): a watch there would lose its protection (and a gate its hold)
//! to the other's `mprotect` calls. The C API registers either kind only through here, which
//! checks the other kind under one lock, so two registrations racing cannot both pass. The
//! lock is taken before either registry's own.

use crate::d2h::ReceiveError;
use crate::watch_ranges::WatchError;
use pipellm_core::locks::lock;
use std::sync::Mutex;

static REGISTRATIONS: Mutex<()> = Mutex::new(());

/// Registers a watched range (see `watch_ranges::watch`) unless it overlaps a receive pool.
///
/// # Safety
/// As for `watch_ranges::watch`.
// SAFETY: an `unsafe fn` for the contract in `# Safety` above; callers argue it where they
// call.
pub unsafe fn watch(start: usize, len: usize) -> Result<(), WatchError> {
    let _reg = lock(&REGISTRATIONS);
    if crate::d2h::overlaps_a_receive_pool(start, len) {
        return Err(WatchError::Overlaps);
    }
    // SAFETY: the caller's promise is the one `watch_ranges::watch` needs.
    unsafe { crate::watch_ranges::watch(start, len) }
}

/// Registers a receive pool (see `d2h::receive`) unless its view or alias overlaps a
/// watched range.
///
/// # Safety
/// As for `d2h::receive`.
// SAFETY: an `unsafe fn` for the contract in `# Safety` above; callers argue it where they
// call.
pub unsafe fn receive(view: usize, alias: usize, len: usize) -> Result<(), ReceiveError> {
    let _reg = lock(&REGISTRATIONS);
    if crate::watch_ranges::overlaps(view, len) || crate::watch_ranges::overlaps(alias, len) {
        return Err(ReceiveError::Overlaps);
    }
    // SAFETY: the caller's promise is the one `d2h::receive` needs.
    unsafe { crate::d2h::receive(view, alias, len) }
}
