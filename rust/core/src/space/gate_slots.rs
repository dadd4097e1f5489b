//! This copy's gates, as the SIGSEGV handler reads them: a fixed array of slots, atomics
//! only (signal context takes no lock). The registry of record is the process's table
//! (`space`), where `gate` registers each gate too; these slots mirror this copy's, so the
//! handler can tell in signal context whether a faulting page is held closed, and wait.
//! `gate` serialises taking and freeing slots under its lock.

use crate::span::Span;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};

/// Gates closed at once, in this copy.
pub const MAX_GATES: usize = 256;

struct Slot {
    active: AtomicBool,
    start: AtomicUsize,
    end: AtomicUsize,
}

#[allow(clippy::declare_interior_mutable_const)]
const FREE: Slot = Slot {
    active: AtomicBool::new(false),
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
};

static SLOTS: [Slot; MAX_GATES] = [FREE; MAX_GATES];
/// One past the highest slot ever used: the handler's scan stops there.
static HIGH_WATER: AtomicUsize = AtomicUsize::new(0);
/// The process that gated: a forked child inherits the table but no thread that would
/// open its gates, so it must not wait on them (it gets the ordinary fault instead).
static CLOSER: AtomicI32 = AtomicI32::new(0);

/// A free gate slot (the caller, `gate`, serialises taking and freeing slots).
pub(crate) fn free_gate_slot() -> Option<usize> {
    SLOTS.iter().position(|s| !s.active.load(Ordering::Acquire))
}

/// Makes `slot` an active gate over `[start, end)`, from this process.
pub(crate) fn activate_gate(slot: usize, start: usize, end: usize) {
    // SAFETY: getpid has no preconditions.
    CLOSER.store(unsafe { libc::getpid() }, Ordering::Release);
    let s = &SLOTS[slot];
    s.start.store(start, Ordering::Relaxed);
    s.end.store(end, Ordering::Relaxed);
    HIGH_WATER.fetch_max(slot + 1, Ordering::AcqRel);
    // Active before the pages close: any fault on them then finds the gate.
    s.active.store(true, Ordering::Release);
}

/// Frees `slot` (its pages are open again).
pub(crate) fn deactivate_gate(slot: usize) {
    SLOTS[slot].active.store(false, Ordering::Release);
}

fn slot_span(s: &Slot) -> Span {
    Span::new(
        s.start.load(Ordering::Relaxed),
        s.end.load(Ordering::Relaxed),
    )
}

/// The range of gate `slot`, in whole pages.
pub(crate) fn gate_span(slot: usize) -> (usize, usize) {
    let r = slot_span(&SLOTS[slot]);
    (r.start, r.end)
}

/// True if an active gate other than `except` covers the page at `addr`. Async-signal-safe.
pub(crate) fn gated_by_other(addr: usize, except: usize) -> bool {
    let high = HIGH_WATER.load(Ordering::Acquire);
    SLOTS.iter().take(high).enumerate().any(|(i, s)| {
        i != except && s.active.load(Ordering::Acquire) && slot_span(s).contains_addr(addr)
    })
}

/// True if an active gate covers the page at `addr` (for the write-detection handler,
/// which must not open such a page). Async-signal-safe.
pub(crate) fn gated(addr: usize) -> bool {
    gated_by_other(addr, usize::MAX)
}

/// Called by the SIGSEGV handler for a permission fault (`SEGV_ACCERR`: a mapped page) at
/// `addr`: if a gate covers it, waits until none does and returns true (the access is then
/// retried); false if no gate covers it, or if this is not the process that gated (a
/// forked child: nobody there would ever open the gate). Async-signal-safe: atomics,
/// `getpid`, `sched_yield` and `nanosleep` only.
pub(crate) fn wait_while_gated(addr: usize) -> bool {
    // SAFETY: getpid has no preconditions.
    if unsafe { libc::getpid() } != CLOSER.load(Ordering::Acquire) {
        return false;
    }
    let mut waited = 0u32;
    while gated(addr) {
        if waited < 64 {
            // SAFETY: sched_yield has no preconditions.
            unsafe { libc::sched_yield() };
        } else {
            let ts = libc::timespec {
                tv_sec: 0,
                tv_nsec: 20_000,
            };
            // SAFETY: a valid timespec; the remaining time is not wanted.
            unsafe { libc::nanosleep(&ts, std::ptr::null_mut()) };
        }
        waited = waited.saturating_add(1);
    }
    waited > 0
}
