//! Write detection by page protection (the way the PipeLLM paper validates pre-encrypted
//! chunks): before a chunk's source pages are read for encryption they are write-protected;
//! a write after that is recorded and goes ahead. Checking that a source is unchanged is then
//! a page-table query or a load, whatever its size, instead of a hash over its bytes.
//!
//! Two trackers, one chosen per process at first use (`PIPELLM_WRITE_TRACKER=mprotect|uffd`
//! forces one):
//! - **userfaultfd asynchronous write protection** ([`uffd`], Linux 6.7+), preferred: the
//!   kernel records writes in the page tables itself, no signal is involved (so a SIGSEGV
//!   handler installed later by anyone changes nothing), and kernel writes into the memory
//!   (`read(2)`, `recv_into`) succeed and are recorded;
//! - **`mprotect` + SIGSEGV**, where userfaultfd is missing or not allowed: the pages are made
//!   read-only and the first write faults into our handler, which records the write (bumps
//!   the region's generation), makes the pages writable again and lets the write go ahead.
//!
//! Either way, only private anonymous memory is watched ([`vma`]): what another process
//! writes through shared memory, or a file's new contents, reaches the pages without a write
//! by this process, which no tracker here can see; such ranges are refused (the pipeline then
//! validates by fingerprint).
//!
//! Rules the mprotect tracker's handler keeps (it runs in signal context: only atomics and the async-signal-safe
//! `mprotect`/`sigaction`; no allocation, no locks other than per-region spin flags that no
//! thread holds while touching watched memory):
//! - a fault at an address inside any registered region is ours: each region containing it
//!   is marked written and its pages are made writable, except pages another armed region
//!   still protects (so a neighbour sharing a boundary page keeps its protection and its
//!   validity; a write on the shared page itself hits both and marks both);
//! - any other fault goes to the handler that was installed before ours (Python's
//!   faulthandler, Rust's stack-overflow handler, or the default action).
//!
//! Limits of the mprotect tracker: memory that the kernel or a device writes (read(2) into
//! the buffer, DMA) gets EFAULT or a device error instead of a fault we can catch; a SIGSEGV
//! handler installed after ours sees our faults first until we install ours again on top
//! (at the next arm or gate closing: `reassert`); and every write to a neighbour sharing a page costs
//! a fault and a spurious re-encryption (the pipeline watches only pages wholly inside its
//! source, see `pipeline::watches`).

mod delegate;
mod uffd;
mod vma;

use crate::error::{Error, Result};
use crate::locks::lock;
use crate::space::{self, Conflicts, Kind, Whose};
use crate::span::Span;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, Once};

/// Regions watched at once, process-wide.
pub const MAX_REGIONS: usize = 4096;
const _: () = assert!(
    MAX_REGIONS.is_multiple_of(64),
    "release_pages keeps a bitmap of held locks"
);

struct Region {
    /// Spin flag guarding `protected` transitions and the mprotect calls that go with them.
    busy: AtomicBool,
    in_use: AtomicBool,
    start: AtomicUsize,
    end: AtomicUsize,
    /// Bumped on every detected write (and on unregistering).
    generation: AtomicU64,
    protected: AtomicBool,
    /// Writes through another mapping (`begin_alias_write`) in progress over the region, or
    /// a neighbour's re-protection of a shared page (userfaultfd tracker, see `arm`).
    writing: AtomicU32,
    /// Tracked by userfaultfd (`protected` then means armed: writes do not clear it, the
    /// page tables record them).
    uffd: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const EMPTY: Region = Region {
    busy: AtomicBool::new(false),
    in_use: AtomicBool::new(false),
    start: AtomicUsize::new(0),
    end: AtomicUsize::new(0),
    generation: AtomicU64::new(0),
    protected: AtomicBool::new(false),
    writing: AtomicU32::new(0),
    uffd: AtomicBool::new(false),
};

static REGIONS: [Region; MAX_REGIONS] = [EMPTY; MAX_REGIONS];
/// One past the highest slot ever used: scans stop there.
static HIGH_WATER: AtomicUsize = AtomicUsize::new(0);

/// Access faults no region claimed since pages were last released (see `on_segv`).
static UNCLAIMED_SINCE_RELEASE: AtomicU32 = AtomicU32::new(0);
/// How many unclaimed access faults are retried before the previous handler gets one.
const UNCLAIMED_RETRIES: u32 = 64;
/// `si_code` of a fault on a mapped page without the needed permission (Linux's
/// SEGV_ACCERR; the libc crate does not export it).
const SEGV_ACCERR: libc::c_int = 2;

/// Serialises registration, arming, unregistering and alias writes; holds the ranges of the
/// alias writes in progress. Never taken in the handler.
static REGISTRY: Mutex<Vec<(usize, usize)>> = Mutex::new(Vec::new());
static INSTALL: Once = Once::new();
static INSTALLED_OK: AtomicBool = AtomicBool::new(false);
/// Why installing failed (an errno), if it did.
static INSTALL_ERRNO: AtomicI32 = AtomicI32::new(0);
/// Serialises installing our handler again over a later one (`reassert`).
static REASSERT: Mutex<()> = Mutex::new(());
/// The handler that faults not ours go to: the SIGSEGV action that was in place before ours
/// was (last) installed. Its two fields the handler needs are published under a sequence
/// count (odd while they are being written; only `install`/`reassert` write, outside signal
/// context), so the handler never calls half of one action with the flags of another.
static PREV_SEQ: AtomicU64 = AtomicU64::new(0);
static PREV_HANDLER: AtomicUsize = AtomicUsize::new(libc::SIG_DFL);
static PREV_FLAGS: AtomicI32 = AtomicI32::new(0);
/// Set when a fault was passed on to the previous handler: a SIGSEGV sent by a program
/// (`raise`) right after is that handler re-raising the fault to end the process, and gets
/// the default action (passing it on again would loop where that handler's own "previous" is
/// ours, as when ours was installed again over it).
static FORWARDED: AtomicBool = AtomicBool::new(false);
/// The thread passing a fault on to the previous handler right now (0: none); see `on_segv`.
static FORWARDING: AtomicI32 = AtomicI32::new(0);

fn set_previous(act: &libc::sigaction) {
    PREV_SEQ.fetch_add(1, Ordering::AcqRel);
    PREV_HANDLER.store(act.sa_sigaction, Ordering::Release);
    PREV_FLAGS.store(act.sa_flags, Ordering::Release);
    PREV_SEQ.fetch_add(1, Ordering::AcqRel);
}

/// The previous handler and its flags, read consistently (async-signal-safe).
fn previous() -> (usize, libc::c_int) {
    loop {
        let s1 = PREV_SEQ.load(Ordering::Acquire);
        let h = PREV_HANDLER.load(Ordering::Acquire);
        let f = PREV_FLAGS.load(Ordering::Acquire);
        if s1.is_multiple_of(2) && PREV_SEQ.load(Ordering::Acquire) == s1 {
            return (h, f);
        }
        std::hint::spin_loop();
    }
}

/// The size of the pages protection works on (what `register` rounds ranges out to).
pub use crate::page::size as page;

fn lock_region(r: &Region) {
    while r
        .busy
        .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
        .is_err()
    {
        std::hint::spin_loop();
    }
}

fn unlock_region(r: &Region) {
    r.busy.store(false, Ordering::Release);
}

/// Marks region `j` written without touching its pages.
fn mark_written(j: usize) {
    let r = &REGIONS[j];
    lock_region(r);
    r.protected.store(false, Ordering::Release);
    r.generation.fetch_add(1, Ordering::AcqRel);
    unlock_region(r);
}

fn range(j: usize) -> (usize, usize) {
    (
        REGIONS[j].start.load(Ordering::Relaxed),
        REGIONS[j].end.load(Ordering::Relaxed),
    )
}

/// True if an armed region other than `except` protects the page at `addr`. Callers hold
/// the locks of every region overlapping the range they scan.
fn protected_by_other(addr: usize, except: usize, high: usize) -> bool {
    REGIONS.iter().take(high).enumerate().any(|(j, r)| {
        j != except
            && r.in_use.load(Ordering::Acquire)
            && r.protected.load(Ordering::Acquire)
            && r.start.load(Ordering::Relaxed) <= addr
            && addr < r.end.load(Ordering::Relaxed)
    })
}

fn overlapping(j: usize, start: usize, end: usize) -> bool {
    let (s, e) = range(j);
    REGIONS[j].in_use.load(Ordering::Acquire) && Span::new(s, e).overlaps(Span::new(start, end))
}

/// Makes writable the pages of region `slot` that no other armed region protects. Holds the
/// spin locks of every region overlapping the range (taken in index order, so two faulting
/// threads cannot deadlock) from the scan to the mprotect: `arm` changes a region's
/// protection only under its lock, so no neighbour can be armed over a page between our
/// decision that it is free and our making it writable. Async-signal-safe.
fn release_pages(slot: usize) {
    let (start, end) = range(slot);
    let high = HIGH_WATER.load(Ordering::Acquire);
    // The locks taken, remembered so that exactly those are released: a neighbour may be
    // unregistered (or a slot registered) while we hold them, which changes `overlapping`.
    let mut held = [0u64; MAX_REGIONS / 64];
    for (j, r) in REGIONS.iter().enumerate().take(high) {
        if j == slot || overlapping(j, start, end) {
            lock_region(r);
            held[j / 64] |= 1 << (j % 64);
        }
    }
    // Under our own lock: if the region was armed again since it was marked written, that
    // arm's stamp must not survive the pages we are about to open.
    let me = &REGIONS[slot];
    me.protected.store(false, Ordering::Release);
    me.generation.fetch_add(1, Ordering::AcqRel);
    // The armed neighbours' ranges, gathered once (a fixed array: no allocation in signal
    // context); with more than fit, fall back to asking every region for every page.
    let mut near = [(0usize, 0usize); 32];
    let mut n_near = 0;
    let mut overflow = false;
    for (j, r) in REGIONS.iter().enumerate().take(high) {
        if j != slot && overlapping(j, start, end) && r.protected.load(Ordering::Acquire) {
            if n_near < near.len() {
                near[n_near] = range(j);
                n_near += 1;
            } else {
                overflow = true;
            }
        }
    }
    let covered = |addr: usize| {
        // A gated page stays closed until its gate opens (see `gate`).
        if space::gate_slots::gated(addr) {
            true
        } else if overflow {
            protected_by_other(addr, slot, high)
        } else {
            near[..n_near]
                .iter()
                .any(|&(s0, e0)| s0 <= addr && addr < e0)
        }
    };
    // SAFETY: the region's range, which its registrant vouched for; making its pages
    // writable restores the access they had before we protected them.
    unsafe { open_pages_except(start, end, covered) };
    // A fault taken on these pages just before they opened may reach its handler after the
    // region is gone: the handler retries such faults (see `on_segv`).
    note_pages_opened();
    for (j, r) in REGIONS.iter().enumerate().take(high) {
        if held[j / 64] & (1 << (j % 64)) != 0 {
            unlock_region(r);
        }
    }
}

/// Makes read-write every page of `[start, end)` (page-aligned) for which `keep_closed` is
/// false, one `mprotect` per run of such pages. Async-signal-safe (no allocation, no lock):
/// shared by releasing a write watch (here, in the handler too) and opening a gate.
///
/// # Safety
/// The range must be mapped, and read-write before its protection was changed by us: this
/// restores that access.
// SAFETY: an `unsafe fn` for the contract in `# Safety` above; callers argue it where they
// call.
pub(crate) unsafe fn open_pages_except(
    start: usize,
    end: usize,
    keep_closed: impl Fn(usize) -> bool,
) {
    let p = page();
    let mut run: Option<usize> = None;
    let mut addr = start;
    while addr <= end {
        let free = addr < end && !keep_closed(addr);
        match (free, run) {
            (true, None) => run = Some(addr),
            (false, Some(s0)) => {
                // SAFETY: a page-aligned run inside the range the caller vouched for (see
                // `# Safety`).
                unsafe {
                    libc::mprotect(
                        s0 as *mut libc::c_void,
                        addr - s0,
                        libc::PROT_READ | libc::PROT_WRITE,
                    )
                };
                run = None;
            }
            _ => {}
        }
        addr += p;
    }
}

/// Whether this copy's gates or write-watched regions hold the page of the access fault at
/// `addr`, handling it if so: waits for a gate to open, or marks every region on the page
/// written and opens its pages. Async-signal-safe.
fn claim(addr: usize) -> bool {
    // A page held inaccessible until its content is ready: wait for it, then retry.
    if space::gate_slots::wait_while_gated(addr) {
        return true;
    }
    let high = HIGH_WATER.load(Ordering::Acquire);
    let contains = |r: &Region| {
        r.in_use.load(Ordering::Acquire)
            && !r.uffd.load(Ordering::Acquire)
            && Span::new(
                r.start.load(Ordering::Relaxed),
                r.end.load(Ordering::Relaxed),
            )
            .contains_addr(addr)
    };
    let mut ours = false;
    // First mark every region holding the faulting page as written, so none of them keeps
    // that page protected; then open each one's pages that no other armed region needs.
    for (i, r) in REGIONS.iter().enumerate().take(high) {
        if contains(r) {
            ours = true;
            mark_written(i);
        }
    }
    for (i, r) in REGIONS.iter().enumerate().take(high) {
        if contains(r) {
            release_pages(i);
        }
    }
    ours
}

/// `claim` for the handler of another copy this one delegates to (`delegate`).
extern "C" fn claim_for_provider(addr: usize) -> i32 {
    claim(addr) as i32
}

extern "C" fn on_segv(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let code = unsafe { (*info).si_code };
    // Only a permission fault can be ours (a write to a page we made read-only, an access
    // to a gated page); the address of anything else (an unmapped address, a SIGSEGV sent
    // with kill or raise, whose siginfo holds no address) is never looked up.
    let accerr = code == SEGV_ACCERR;
    let addr = if accerr {
        // SAFETY: as above; si_addr is meaningful for faults, and only used for those.
        (unsafe { (*info).si_addr() }) as usize
    } else {
        0
    };
    // This copy's gates and regions first, then those of the copies that use this handler
    // (`delegate`): a claimed fault is retried, now on open pages.
    // Every table is asked, also when an earlier one claimed the fault: each must see a
    // write to a page it protects.
    if accerr && (claim(addr) | delegate::clients_claim(addr)) {
        return;
    }
    // No region claims the page. It may have been protected when the write faulted and
    // released (its watch dropped by another thread) before we looked: then the write
    // succeeds if retried. A real protection fault repeats; after a bounded number of
    // retries with no release in between, it goes to the previous handler as before.
    if accerr && UNCLAIMED_SINCE_RELEASE.fetch_add(1, Ordering::AcqRel) < UNCLAIMED_RETRIES {
        return;
    }
    if code <= 0 && FORWARDED.load(Ordering::Acquire) {
        // A handler we passed a fault to re-raised it: end the process as it meant to.
        // SAFETY: resetting a signal to SIG_DFL is async-signal-safe.
        unsafe { libc::signal(libc::SIGSEGV, libc::SIG_DFL) };
        return;
    }
    let (h, flags) = previous();
    if h == libc::SIG_DFL || h == libc::SIG_IGN {
        // Restore the default action and return: the access faults again and the process
        // gets the ordinary SIGSEGV behaviour (a real crash stays a crash).
        // SAFETY: resetting a signal to SIG_DFL is async-signal-safe.
        unsafe { libc::signal(libc::SIGSEGV, libc::SIG_DFL) };
        return;
    }
    if code > 0 {
        FORWARDED.store(true, Ordering::Release);
    }
    // Two handlers that each found the other installed (this library's two copies, each
    // putting itself back on top) would pass a fault back and forth for ever: entered again
    // on the thread that is passing a fault on, we are in such a cycle, and nobody claimed
    // the fault.
    // SAFETY: gettid has no preconditions and is async-signal-safe.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) } as i32;
    if FORWARDING.load(Ordering::Acquire) == tid {
        // SAFETY: resetting a signal to SIG_DFL is async-signal-safe.
        unsafe { libc::signal(libc::SIGSEGV, libc::SIG_DFL) };
        return;
    }
    let marked = FORWARDING
        .compare_exchange(0, tid, Ordering::AcqRel, Ordering::Acquire)
        .is_ok();
    if flags & libc::SA_SIGINFO != 0 {
        // SAFETY: the previous handler was installed with SA_SIGINFO, so it has this type.
        let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            unsafe { std::mem::transmute(h) };
        f(sig, info, ctx);
    } else {
        // SAFETY: a plain handler takes the signal number only.
        let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(h) };
        f(sig);
    }
    if marked {
        FORWARDING.store(0, Ordering::Release);
    }
}

fn our_action() -> libc::sigaction {
    // SAFETY: a zeroed sigaction is a valid value; we fill its handler, mask and flags.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = on_segv as *const () as usize;
    act.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_RESTART;
    // SAFETY: sa_mask is a field of a live value.
    unsafe { libc::sigemptyset(&mut act.sa_mask) };
    act
}

/// Installs our handler again if another one replaced it since (Python's faulthandler,
/// `signal.signal`, any library): ours goes on top again and passes the faults that are not
/// ours to the one it found. Called wherever pages are about to be protected, so that the
/// faults they will take reach us. A write taken between the other handler's install and
/// this call went to that handler (docs/hardening.md).
pub(crate) fn reassert() {
    match delegate::provider() {
        Some(p) if DELEGATED.load(Ordering::Acquire) => p.reassert(),
        _ => reassert_own(),
    }
}

/// `reassert` for this copy's own handler (also on behalf of a client, `delegate`).
pub(crate) fn reassert_own() {
    if !INSTALLED_OK.load(Ordering::Acquire) {
        return;
    }
    let _g = lock(&REASSERT);
    // SAFETY: a query of the current action into a zeroed value we own.
    let mut cur: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: as above; a null new action only reads.
    if unsafe { libc::sigaction(libc::SIGSEGV, std::ptr::null(), &mut cur) } != 0
        || cur.sa_sigaction == on_segv as *const () as usize
    {
        return;
    }
    // The handler we found is the one to pass faults on to from now on: published before
    // ours can run again, so no fault meets a stale previous.
    set_previous(&cur);
    REASSERTED.fetch_add(1, Ordering::Relaxed);
    let act = our_action();
    // SAFETY: installs our handler, which is valid for the life of the process.
    unsafe { libc::sigaction(libc::SIGSEGV, &act, std::ptr::null_mut()) };
}

/// How many times `reassert` found our handler replaced (for tests and stats).
static REASSERTED: AtomicU64 = AtomicU64::new(0);

/// How many times our SIGSEGV handler was found replaced and installed again on top.
pub fn handler_reasserted() -> u64 {
    REASSERTED.load(Ordering::Relaxed)
}

/// Set once this copy's faults are claimed through another copy's handler (`delegate`).
static DELEGATED: AtomicBool = AtomicBool::new(false);
static JOIN: Once = Once::new();

/// Makes sure faults on this copy's protected pages reach this copy: through the process's
/// one pipellm SIGSEGV handler, another copy's when there is one (`delegate`), else ours,
/// installed once. Shared with [`crate::gate`].
pub(crate) fn install() -> Result<()> {
    if let Some(p) = delegate::provider() {
        JOIN.call_once(|| {
            if p.add_client(claim_for_provider) {
                DELEGATED.store(true, Ordering::Release);
            }
        });
        if DELEGATED.load(Ordering::Acquire) {
            p.reassert();
            return Ok(());
        }
        // The provider refused (no slot, no handler): this copy installs its own, as
        // without one.
    }
    install_own()
}

/// Which SIGSEGV handler serves this copy: "delegated" (another copy's, see `delegate`),
/// "own", or "none" (nothing protected with the mprotect tracker or gated yet).
pub fn handler() -> &'static str {
    if DELEGATED.load(Ordering::Acquire) {
        "delegated"
    } else if INSTALLED_OK.load(Ordering::Acquire) {
        "own"
    } else {
        "none"
    }
}

/// Installs this copy's own SIGSEGV handler (once).
pub(crate) fn install_own() -> Result<()> {
    INSTALL.call_once(|| {
        let act = our_action();
        // SAFETY: a zeroed value we own receives the action in place before ours.
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        // The previous action is published before ours is installed (no region is
        // registered before install returns, so no fault is ours before then either).
        // SAFETY: a query of the current action into `old`.
        if unsafe { libc::sigaction(libc::SIGSEGV, std::ptr::null(), &mut old) } == 0 {
            set_previous(&old);
            // SAFETY: installs our handler, which is valid for the life of the process.
            if unsafe { libc::sigaction(libc::SIGSEGV, &act, std::ptr::null_mut()) } == 0 {
                INSTALLED_OK.store(true, Ordering::Release);
                return;
            }
        }
        let e = std::io::Error::last_os_error();
        INSTALL_ERRNO.store(e.raw_os_error().unwrap_or(libc::EIO), Ordering::Release);
    });
    reassert_own();
    if INSTALLED_OK.load(Ordering::Acquire) {
        Ok(())
    } else {
        Err(Error::Os {
            what: "could not install the write-detection signal handler".into(),
            errno: INSTALL_ERRNO.load(Ordering::Acquire),
        })
    }
}

/// Pages were opened elsewhere (a gate): faults taken on them just before are retried.
/// Async-signal-safe.
pub(crate) fn note_pages_opened() {
    note_pages_opened_here();
    if DELEGATED.load(Ordering::Acquire) {
        // The handler that counts unclaimed faults is the provider's.
        if let Some(p) = delegate::provider() {
            p.pages_opened();
        }
    }
}

/// `note_pages_opened` for this copy's own handler (also on behalf of a client).
pub(crate) fn note_pages_opened_here() {
    UNCLAIMED_SINCE_RELEASE.store(0, Ordering::Release);
}

/// A write to `[start, start + len)` through another mapping of the same memory (a
/// [`crate::hostpool::HostPool`]'s write alias), in progress until dropped. While it lasts,
/// no stamp over the range validates; when it ends, every watched region overlapping the
/// range gets a new generation, so stamps taken before or during the write no longer
/// validate either. The regions' pages keep their protection: they were not written through
/// this mapping, so no fault happened and none is needed, and the next `arm` costs no
/// `mprotect`. Not for signal context.
pub struct AliasWrite {
    start: usize,
    end: usize,
}

fn registry() -> std::sync::MutexGuard<'static, Vec<(usize, usize)>> {
    lock(&REGISTRY)
}

/// The locks that dropping a [`WriteWatch`] takes (the tracker's registry, then the
/// process's address-space table where this copy holds it: `space`), held by a fork handler across
/// `fork()`: a forked child has no thread but the one that forked, so a lock another thread
/// held at the fork would never be released there, and the child's first dropped watch
/// would wait forever. Taken in the lock order (a caller holding locks of its own that are
/// taken before the registry, such as the interposer's watched ranges, takes them first).
pub struct ForkHold {
    _registry: std::sync::MutexGuard<'static, Vec<(usize, usize)>>,
    _space: Option<std::sync::MutexGuard<'static, Vec<space::Entry>>>,
}

/// See [`ForkHold`].
pub fn hold_for_fork() -> ForkHold {
    let registry = registry();
    ForkHold {
        _registry: registry,
        _space: space::hold_for_fork(),
    }
}

/// Marks the start (`starting`) or end of an alias write on every region overlapping
/// `[start, end)`: a new generation either way, and one write more or less in progress.
/// Callers hold the registry mutex. Every in-use region overlapping the range counts the
/// write once: at its start, or at its registration (which reads the list of writes in
/// progress under the same mutex).
fn mark_alias_write(start: usize, end: usize, starting: bool) {
    let high = HIGH_WATER.load(Ordering::Acquire);
    for (j, r) in REGIONS.iter().enumerate().take(high) {
        if overlapping(j, start, end) {
            lock_region(r);
            r.generation.fetch_add(1, Ordering::AcqRel);
            if starting {
                r.writing.fetch_add(1, Ordering::AcqRel);
            } else {
                r.writing.fetch_sub(1, Ordering::AcqRel);
            }
            unlock_region(r);
        }
    }
}

/// Starts an alias write (see [`AliasWrite`]); the caller writes after this returns.
pub fn begin_alias_write(start: usize, len: usize) -> AliasWrite {
    let end = start.saturating_add(len.max(1));
    let mut writes = registry();
    writes.push((start, end));
    mark_alias_write(start, end, true);
    drop(writes);
    // The marks above are ordered before the caller's data stores: a reader that sees any
    // new byte then sees the write in progress (or its end's new generation); it pairs with
    // the fence in `unchanged_since`.
    std::sync::atomic::fence(Ordering::SeqCst);
    AliasWrite { start, end }
}

impl Drop for AliasWrite {
    fn drop(&mut self) {
        // The caller's data stores are ordered before the end marks.
        std::sync::atomic::fence(Ordering::SeqCst);
        let mut writes = registry();
        if let Some(i) = writes.iter().position(|&w| w == (self.start, self.end)) {
            writes.swap_remove(i);
        }
        mark_alias_write(self.start, self.end, false);
    }
}

/// A watched range of memory (rounded out to whole pages).
pub struct WriteWatch {
    slot: usize,
}

/// What `arm` returns: the state to compare against later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp(u64);

impl WriteWatch {
    /// ChunkWatches the pages holding `[ptr, ptr + len)`.
    ///
    /// # Safety
    /// The memory must stay mapped while this value lives, and must only be written by
    /// user-space code of this process (not by the kernel or a device): those writes would
    /// fail instead of faulting into the handler.
    // SAFETY: an `unsafe fn` for the contract in `# Safety` above; callers argue it where
    // they call.
    pub unsafe fn register(ptr: *const u8, len: usize) -> Result<Self> {
        let p = page();
        let start = (ptr as usize) / p * p;
        let end = (ptr as usize + len.max(1)).div_ceil(p) * p;
        let tracker = match uffd::tracker_kind() {
            uffd::Kind::Uffd => Some(uffd::tracker().ok_or_else(|| {
                Error::InvalidArgument("cannot watch pages in a forked child".into())
            })?),
            uffd::Kind::Unavailable => {
                return Err(Error::InvalidArgument(
                    "PIPELLM_WRITE_TRACKER=uffd, but this kernel offers no asynchronous \
                     userfaultfd write protection"
                        .into(),
                ))
            }
            uffd::Kind::Mprotect => {
                install()?;
                None
            }
        };
        let span = Span::new(start, end);
        let in_my_pool = || space::containing(span, Kind::PoolView.set(), Whose::Mine).is_some();
        if !vma::private_anonymous(start, end) && !in_my_pool() {
            return Err(Error::InvalidArgument(
                "only private anonymous memory can be watched (shared or file mappings \
                 change without a write by this process)"
                    .into(),
            ));
        }
        let writes = registry();
        let slot = REGIONS
            .iter()
            .position(|r| !r.in_use.load(Ordering::Acquire))
            .ok_or_else(|| Error::Capacity(format!("more than {MAX_REGIONS} watched regions")))?;
        // In the process's table (see `space`), unless the pages are gated, lent to the
        // interposer or received into by it, or watched by the other copy of this library (each copy trusts its own
        // bookkeeping: two protecting one page would make a stale hit). Removed in `drop`.
        let watch = Conflicts {
            any: Kind::Gate
                .set()
                .with(Kind::LentPool)
                .with(Kind::ReceivePool),
            foreign: Kind::WriteWatch.set(),
        };
        if let Err(k) = space::insert(span, Kind::WriteWatch, watch) {
            return Err(Error::InvalidArgument(match k {
                Kind::Gate => "cannot watch pages gated for a deferred decryption".into(),
                Kind::LentPool | Kind::ReceivePool => {
                    "cannot watch a host pool lent to the driver interposer".into()
                }
                _ => "another copy of pipellm in this process watches these pages".into(),
            }));
        }
        if let Some(t) = tracker {
            // Registering again pages another region registered is a no-op for the kernel.
            if let Err(e) = t.register(start, end) {
                space::remove(span, Kind::WriteWatch);
                return Err(Error::os("cannot track writes to these pages", &e));
            }
        }
        let r = &REGIONS[slot];
        lock_region(r);
        r.start.store(start, Ordering::Relaxed);
        r.end.store(end, Ordering::Relaxed);
        r.protected.store(false, Ordering::Relaxed);
        r.uffd.store(tracker.is_some(), Ordering::Relaxed);
        let in_progress = writes
            .iter()
            .filter(|&&(s0, e0)| Span::new(s0, e0).overlaps(Span::new(start, end)))
            .count();
        r.writing.store(in_progress as u32, Ordering::Relaxed);
        unlock_region(r);
        HIGH_WATER.fetch_max(slot + 1, Ordering::AcqRel);
        r.in_use.store(true, Ordering::Release);
        Ok(Self { slot })
    }

    /// Write-protects the pages (if not already) and returns the current stamp. Take the
    /// snapshot *after* this: a write between the two is then caught.
    pub fn arm(&self) -> Result<Stamp> {
        self.arm_again().map(|(stamp, _)| stamp)
    }

    /// As `arm`, and whether the pages were still protected from the last arm with nothing
    /// written since (this arm then changed nothing: no `mprotect`, nothing re-protected).
    pub fn arm_again(&self) -> Result<(Stamp, bool)> {
        let _g = registry();
        let r = &REGIONS[self.slot];
        let result = if r.uffd.load(Ordering::Relaxed) {
            arm_tracked(self.slot)
        } else {
            arm_mprotect(self.slot)
        };
        // Orders the registration (and the stamp) before the caller's reads of the bytes,
        // against an alias writer's marks (see `begin_alias_write`).
        std::sync::atomic::fence(Ordering::SeqCst);
        result
    }

    /// Whether the region's pages are write-protected now (armed and not written since).
    pub fn is_protected(&self) -> bool {
        let r = &REGIONS[self.slot];
        r.protected.load(Ordering::Acquire)
            && (!r.uffd.load(Ordering::Relaxed) || {
                let (s, e) = range(self.slot);
                uffd::tracker().is_some_and(|t| !t.any_written(s, e))
            })
    }

    /// True if no write reached the pages since `stamp` was taken.
    pub fn unchanged_since(&self, stamp: Stamp) -> bool {
        // Orders the caller's earlier reads of the bytes before the loads below (pairs with
        // the fence in `begin_alias_write`).
        std::sync::atomic::fence(Ordering::SeqCst);
        let r = &REGIONS[self.slot];
        if r.uffd.load(Ordering::Relaxed) {
            // The page tables first, the counters after: a neighbour that re-protects a
            // shared page written since our stamp marks us (`writing`, then a new
            // generation) before its scan, so either our scan sees the page written or the
            // loads below see the mark (see `arm_tracked`).
            let (s, e) = range(self.slot);
            if uffd::tracker().is_none_or(|t| t.any_written(s, e)) {
                return false;
            }
            std::sync::atomic::fence(Ordering::SeqCst);
        }
        r.protected.load(Ordering::Acquire)
            && r.writing.load(Ordering::Acquire) == 0
            && r.generation.load(Ordering::Acquire) == stamp.0
    }
}

/// `arm_again` with the mprotect tracker (registry mutex held).
fn arm_mprotect(slot: usize) -> Result<(Stamp, bool)> {
    // A handler installed since our last look would see the coming faults first.
    reassert();
    let r = &REGIONS[slot];
    lock_region(r);
    let mut rc = 0;
    let was = r.protected.load(Ordering::Acquire);
    if !was {
        let (s, e) = range(slot);
        // SAFETY: the registrant vouched for the range (see `register`); read-only is a
        // subset of the access it had.
        rc = unsafe { libc::mprotect(s as *mut libc::c_void, e - s, libc::PROT_READ) };
        if rc == 0 {
            r.protected.store(true, Ordering::Release);
        }
    }
    let g = r.generation.load(Ordering::Acquire);
    unlock_region(r);
    if rc != 0 {
        return Err(Error::last_os("cannot write-protect the source pages"));
    }
    Ok((Stamp(g), was))
}

/// `arm` with the userfaultfd tracker (registry mutex held). Protecting a page again erases
/// the record that it was written, which every region on that page relies on: so every
/// other region overlapping the range counts a change in progress (`writing`) from before
/// the page tables are touched until the regions whose pages were found written have a new
/// generation. A validator of a neighbour either sees the page written (its scan came
/// first) or sees the mark.
fn arm_tracked(slot: usize) -> Result<(Stamp, bool)> {
    let t = uffd::tracker()
        .ok_or_else(|| Error::InvalidArgument("cannot watch pages in a forked child".into()))?;
    let (s, e) = range(slot);
    let high = HIGH_WATER.load(Ordering::Acquire);
    let neighbour = |j: usize| j != slot && overlapping(j, s, e);
    for (j, r) in REGIONS.iter().enumerate().take(high) {
        if neighbour(j) {
            r.writing.fetch_add(1, Ordering::AcqRel);
        }
    }
    std::sync::atomic::fence(Ordering::SeqCst);
    let mut found = [uffd::PageRegion::default(); 32];
    let mut own_written = false;
    let mut at = s;
    let outcome = loop {
        match t.protect_written(at, e, &mut found) {
            Ok((n, walk_end)) => {
                for w in &found[..n] {
                    let (ws, we) = (w.start as usize, w.end as usize);
                    own_written |= Span::new(ws, we).overlaps(Span::new(s, e));
                    for (j, r) in REGIONS.iter().enumerate().take(high) {
                        if overlapping(j, ws, we) {
                            r.generation.fetch_add(1, Ordering::AcqRel);
                        }
                    }
                }
                if n < found.len() || walk_end >= e {
                    break Ok(());
                }
                at = walk_end;
            }
            Err(err) => break Err(err),
        }
    };
    std::sync::atomic::fence(Ordering::SeqCst);
    for (j, r) in REGIONS.iter().enumerate().take(high) {
        if neighbour(j) {
            r.writing.fetch_sub(1, Ordering::AcqRel);
        }
    }
    let r = &REGIONS[slot];
    match outcome {
        Ok(()) => {
            let was = r.protected.swap(true, Ordering::AcqRel) && !own_written;
            Ok((Stamp(r.generation.load(Ordering::Acquire)), was))
        }
        Err(err) => {
            r.protected.store(false, Ordering::Release);
            Err(Error::os("cannot write-protect the source pages", &err))
        }
    }
}

impl Drop for WriteWatch {
    fn drop(&mut self) {
        // Serialised with `arm` (same lock): no neighbour protects a page between the scan
        // and the mprotect in `release_pages`.
        let _g = registry();
        mark_written(self.slot);
        // With the userfaultfd tracker the pages stay registered and write-protected: a
        // write to them is still resolved by the kernel (about a microsecond per page, once),
        // whereas removing the protection costs an ioctl under the address space's write lock
        // (about 100 µs per 4 MiB), on the request path when a transfer's last message
        // releases its watches; the next watch over them registers in a microsecond. With
        // mprotect, pages a neighbour still protects stay read-only for it and the others
        // become writable; only then do we stop claiming faults in this range.
        let mprotected = !REGIONS[self.slot].uffd.load(Ordering::Relaxed);
        if mprotected {
            release_pages(self.slot);
        }
        let (s, e) = range(self.slot);
        REGIONS[self.slot].in_use.store(false, Ordering::Release);
        // Out of the process's table only once this copy's handler no longer claims faults
        // in the range: a region still in use after its entry went could open pages another
        // copy has since registered and protected.
        space::remove(Span::new(s, e), Kind::WriteWatch);
    }
}

/// Whether the page at `addr` is write-protected by a tracker now (for tests: the
/// mprotect tracker's pages are read-only in `/proc/self/maps`, the userfaultfd tracker's
/// read back as not written).
#[cfg(test)]
pub(crate) fn page_protected(addr: usize) -> bool {
    let p = page();
    let at = addr / p * p;
    if uffd::tracker_kind() == uffd::Kind::Uffd {
        return uffd::tracker().is_some_and(|t| !t.any_written(at, at + p));
    }
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines().any(|l| {
        let mut f = l.split_whitespace();
        let (range, perms) = (f.next().unwrap(), f.next().unwrap());
        let (s, e) = range.split_once('-').unwrap();
        let s = usize::from_str_radix(s, 16).unwrap();
        let e = usize::from_str_radix(e, 16).unwrap();
        s <= at && at < e && perms.as_bytes()[1] != b'w'
    })
}

/// Which write tracker this process uses ("uffd" or "mprotect"), deciding it if no watch
/// did yet.
/// Decides (once) which tracker the process uses, opening the userfaultfd one where it is
/// the one. Opening registers a fork handler (`pthread_atfork`), which waits for glibc's
/// fork lock, held while fork handlers run: code that may register a watch while holding a
/// lock some fork handler takes (the interposer's watched ranges) calls this first, holding
/// nothing, so that no registration under that lock opens the tracker.
pub fn decide_tracker() {
    let _ = uffd::tracker_kind();
}

pub fn tracker_name() -> &'static str {
    match uffd::tracker_kind() {
        uffd::Kind::Uffd => "uffd",
        uffd::Kind::Mprotect => "mprotect",
        uffd::Kind::Unavailable => "unavailable",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::staging::StagingBuf;

    #[test]
    fn a_write_is_detected_and_allowed() {
        let mut buf = StagingBuf::alloc(3 * 4096).unwrap();
        let p = buf.as_mut_slice().as_mut_ptr();
        // SAFETY: `buf` outlives the watch and only this test writes it.
        let w = unsafe { WriteWatch::register(p, 3 * 4096) }.unwrap();
        let s = w.arm().unwrap();
        assert!(w.unchanged_since(s));
        let _ = buf.as_slice()[100]; // reads are free
        assert!(w.unchanged_since(s));
        // SAFETY: volatile write to our own buffer (the fault is handled transparently).
        unsafe { std::ptr::write_volatile(p.add(5000), 42) };
        assert_eq!(buf.as_slice()[5000], 42, "the write went through");
        assert!(!w.unchanged_since(s));
        let s2 = w.arm().unwrap();
        assert!(w.unchanged_since(s2));
        drop(w);
        buf.as_mut_slice()[0] = 1; // writable again after unregistering
    }

    #[test]
    fn a_write_on_a_shared_page_marks_every_region_on_it() {
        let mut buf = StagingBuf::alloc(4096).unwrap();
        let p = buf.as_mut_slice().as_mut_ptr();
        // SAFETY: as above.
        let (a, b) = unsafe {
            (
                WriteWatch::register(p, 100).unwrap(),
                WriteWatch::register(p.add(2000), 100).unwrap(),
            )
        };
        let (sa, sb) = (a.arm().unwrap(), b.arm().unwrap());
        // SAFETY: as above.
        unsafe { std::ptr::write_volatile(p.add(10), 1) };
        assert!(!a.unchanged_since(sa));
        assert!(
            !b.unchanged_since(sb),
            "b lost its protection, so it must count as written"
        );
    }

    /// ChunkWatches on overlapping ranges are registered, armed and dropped on several threads
    /// while other threads write to the shared pages. Two races the soak test found: a
    /// fault reaching the handler after its region was dropped (it must retry, not crash),
    /// and a lock kept forever when a neighbour was unregistered while `release_pages` held
    /// it (later registrations then spun for ever). Every write must land, nothing may hang.
    /// The threads run until each has done `ROUNDS` iterations (however slow the machine),
    /// the faster ones racing on meanwhile.
    #[test]
    fn concurrent_watchers_and_writers_neither_crash_nor_hang() {
        const PAGES: usize = 8;
        const ROUNDS: u64 = 10_000;
        const THREADS: usize = 5;
        let mut buf = StagingBuf::alloc(PAGES * 4096).unwrap();
        let base = buf.as_mut_slice().as_mut_ptr() as usize;
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        // Threads that have done ROUNDS iterations.
        let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let mut handles = Vec::new();
        for t in 0..3usize {
            let (stop, done) = (stop.clone(), done.clone());
            handles.push(std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let first = (t + n as usize) % (PAGES - 2);
                    // Straddles page boundaries, so neighbours share pages.
                    let (p, len) = ((base + first * 4096 + 2048) as *const u8, 4096 + 100);
                    // SAFETY: inside `buf`, which outlives every thread (joined below);
                    // only user-space code writes it.
                    let w = unsafe { WriteWatch::register(p, len) }.unwrap();
                    let _ = w.arm();
                    n += 1;
                    drop(w);
                    if n == ROUNDS {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
                n
            }));
        }
        for t in 0..2usize {
            let (stop, done) = (stop.clone(), done.clone());
            handles.push(std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    // Even bytes for one writer, odd for the other: each reads back its own.
                    let at = base + ((n as usize * 7919) % (PAGES * 2048)) * 2 + t;
                    // SAFETY: a byte inside `buf` (see above); faults are handled.
                    unsafe { std::ptr::write_volatile(at as *mut u8, n as u8) };
                    // SAFETY: as above.
                    assert_eq!(unsafe { std::ptr::read_volatile(at as *const u8) }, n as u8);
                    n += 1;
                    if n == ROUNDS {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
                n
            }));
        }
        // A bound only against a hang (the property under test): the rounds take
        // about a second here, longer on a loaded machine.
        let t0 = std::time::Instant::now();
        while done.load(Ordering::Relaxed) < THREADS {
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(120),
                "{} of {THREADS} threads finished {ROUNDS} rounds: a hang",
                done.load(Ordering::Relaxed)
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        stop.store(true, Ordering::Relaxed);
        let rounds: Vec<u64> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert!(
            rounds.iter().all(|&n| n >= ROUNDS),
            "every thread did its rounds: {rounds:?}"
        );
        buf.as_mut_slice()[0] = 1; // all pages writable again
    }
}

#[cfg(test)]
mod chain_tests {
    use super::*;
    use crate::staging::StagingBuf;

    #[test]
    fn shared_pages_mark_neighbours_without_cascading() {
        // a: pages 0-1, b: pages 1-2, c: pages 2-3. A write in page 0 opens a (pages 0-1
        // writable), which takes page 1's protection from b: b counts as written. c shares no
        // page with a and keeps its protection; b's page 2 stays read-only for c.
        let mut buf = StagingBuf::alloc(4 * 4096).unwrap();
        let p = buf.as_mut_slice().as_mut_ptr();
        // SAFETY: `buf` outlives the watches and only this test writes it.
        let ws: Vec<_> = unsafe {
            [(0, 5000), (5000, 4096), (9000, 4000)]
                .iter()
                .map(|&(o, l)| WriteWatch::register(p.add(o), l).unwrap())
                .collect()
        };
        let stamps: Vec<_> = ws.iter().map(|w| w.arm().unwrap()).collect();
        // SAFETY: as above.
        unsafe { std::ptr::write_volatile(p.add(1), 9) };
        assert!(!ws[0].unchanged_since(stamps[0]));
        assert!(
            ws[1].unchanged_since(stamps[1]),
            "page 1 stays protected for b"
        );
        assert!(ws[2].unchanged_since(stamps[2]), "c shares no page with a");
        // A write on page 1 (a's and b's) marks both.
        // SAFETY: as above.
        unsafe { std::ptr::write_volatile(p.add(4097), 9) };
        assert!(!ws[1].unchanged_since(stamps[1]));
        // A write in page 2 (b's and c's) is still caught for c.
        // SAFETY: as above.
        unsafe { std::ptr::write_volatile(p.add(9500), 9) };
        assert!(!ws[2].unchanged_since(stamps[2]));
        buf.as_mut_slice().fill(3); // every write goes through
    }
}

#[cfg(test)]
mod drop_tests {
    use super::*;
    use crate::staging::StagingBuf;

    #[test]
    fn unregistering_keeps_pages_a_neighbour_still_protects() {
        let mut buf = StagingBuf::alloc(2 * 4096).unwrap();
        let p = buf.as_mut_slice().as_mut_ptr();
        // SAFETY: `buf` outlives the watches and only this test writes it.
        let (a, b) = unsafe {
            (
                WriteWatch::register(p, 5000).unwrap(),
                WriteWatch::register(p.add(5000), 3000).unwrap(),
            )
        };
        let (_sa, sb) = (a.arm().unwrap(), b.arm().unwrap());
        drop(a); // no write happened: b keeps its stamp and its protection
        assert!(b.unchanged_since(sb));
        // SAFETY: as above.
        unsafe { std::ptr::write_volatile(p.add(4100), 1) }; // page 1: shared, b's now
        assert!(!b.unchanged_since(sb));
        buf.as_mut_slice()[0] = 2; // page 0 is writable again
    }
}

#[cfg(test)]
mod tracker_tests {
    use super::*;
    use crate::staging::StagingBuf;

    fn uffd() -> bool {
        tracker_name() == "uffd"
    }

    #[test]
    fn the_tracker_is_the_one_asked_for() {
        match std::env::var("PIPELLM_WRITE_TRACKER").ok().as_deref() {
            Some("mprotect") => assert_eq!(tracker_name(), "mprotect"),
            // Where the kernel offers it, the default is the signal-free tracker (CI's
            // kernel does; PIPELLM_WRITE_TRACKER=uffd makes its absence a failure).
            Some("uffd") => assert_eq!(tracker_name(), "uffd"),
            _ => assert!(["uffd", "mprotect"].contains(&tracker_name())),
        }
    }

    #[test]
    fn re_protecting_a_shared_page_keeps_the_neighbours_write() {
        // a and b share page 1. A write there, then b armed again (which protects page 1
        // afresh): a must still count as written.
        let mut buf = StagingBuf::alloc(3 * 4096).unwrap();
        let p = buf.as_mut_slice().as_mut_ptr();
        // SAFETY: `buf` outlives the watches and only this test writes it.
        let (a, b) = unsafe {
            (
                WriteWatch::register(p, 5000).unwrap(),
                WriteWatch::register(p.add(5000), 6000).unwrap(),
            )
        };
        let (sa, _) = (a.arm().unwrap(), b.arm().unwrap());
        // SAFETY: as above.
        unsafe { std::ptr::write_volatile(p.add(4500), 1) };
        let sb = b.arm().unwrap();
        assert!(b.unchanged_since(sb), "b's fresh stamp");
        assert!(!a.unchanged_since(sa), "a's write was not forgotten");
        let sa = a.arm().unwrap();
        assert!(a.unchanged_since(sa));
        assert!(
            b.unchanged_since(sb),
            "nothing was written since b's stamp: a's re-arm leaves it valid"
        );
    }

    /// The kernel writing into a watched page (read(2) from a pipe): the userfaultfd tracker
    /// lets it through and records it; the mprotect tracker cannot (EFAULT), which is why
    /// the pipeline watches only pages wholly inside its sources.
    #[test]
    fn a_kernel_write_is_recorded_by_the_userfaultfd_tracker() {
        if !uffd() {
            return;
        }
        let mut buf = StagingBuf::alloc(2 * 4096).unwrap();
        let p = buf.as_mut_slice().as_mut_ptr();
        // SAFETY: `buf` outlives the watch; the kernel's write is what is under test.
        let w = unsafe { WriteWatch::register(p, 2 * 4096) }.unwrap();
        let s = w.arm().unwrap();
        let mut fds = [0; 2];
        // SAFETY: a fresh pipe; both ends closed below.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: writes 5 bytes from a literal; reads 5 bytes into `buf` (in bounds).
        unsafe {
            assert_eq!(libc::write(fds[1], b"hello".as_ptr().cast(), 5), 5);
            assert_eq!(libc::read(fds[0], p.add(4096).cast(), 5), 5);
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
        assert_eq!(&buf.as_slice()[4096..4101], b"hello");
        assert!(!w.unchanged_since(s));
    }

    #[test]
    fn a_dropped_page_counts_as_changed_with_the_userfaultfd_tracker() {
        if !uffd() {
            return;
        }
        let mut buf = StagingBuf::alloc(2 * 4096).unwrap();
        buf.as_mut_slice().fill(7);
        let p = buf.as_mut_slice().as_mut_ptr();
        // SAFETY: `buf` outlives the watch.
        let w = unsafe { WriteWatch::register(p, 2 * 4096) }.unwrap();
        let s = w.arm().unwrap();
        // SAFETY: our own private anonymous pages; they read back as zeros after this.
        let rc = unsafe { libc::madvise(p.add(4096).cast(), 4096, libc::MADV_DONTNEED) };
        assert_eq!(rc, 0);
        assert!(!w.unchanged_since(s), "bytes changed without a store");
        let s = w.arm().unwrap();
        assert!(w.unchanged_since(s));
        assert_eq!(buf.as_slice()[4096], 0);
        assert!(w.unchanged_since(s), "reading the zero page is no change");
    }

    #[test]
    fn shared_and_file_mappings_are_refused() {
        // SAFETY: a fresh shared anonymous mapping, unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        // SAFETY: the mapping outlives the (refused) registration.
        assert!(unsafe { WriteWatch::register(p.cast(), 100) }.is_err());
        // SAFETY: our mapping.
        unsafe { libc::munmap(p, 4096) };
    }

    /// Faults the foreign handler saw on the test's page (other tests' faults, which run
    /// in parallel and may reach it before ours is back on top, are not counted).
    static FOREIGN: AtomicU32 = AtomicU32::new(0);
    static FOREIGN_PAGE: AtomicUsize = AtomicUsize::new(0);
    extern "C" fn foreign(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
        // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
        let addr = unsafe { (*info).si_addr() } as usize;
        if addr / 4096 == FOREIGN_PAGE.load(Ordering::Relaxed) / 4096 {
            FOREIGN.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A SIGSEGV handler installed after ours (as `signal.signal` or faulthandler do): with
    /// the userfaultfd tracker it never sees a write; with the mprotect tracker the next arm
    /// puts ours back on top, so the write is ours again. The foreign handler here only
    /// counts: had a fault reached it, the write would retry for ever (the test would hang).
    #[test]
    fn a_later_handler_does_not_see_our_writes() {
        let mut buf = StagingBuf::alloc(4096).unwrap();
        let p = buf.as_mut_slice().as_mut_ptr();
        // SAFETY: `buf` outlives the watch.
        let w = unsafe { WriteWatch::register(p, 4096) }.unwrap();
        let before = handler_reasserted();
        let (prev_handler, prev_flags) = previous();
        FOREIGN_PAGE.store(p as usize, Ordering::Relaxed);
        // SAFETY: a zeroed sigaction is a valid value; installs a handler that only counts
        // (ours is restored below either way).
        let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
        act.sa_sigaction = foreign as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO;
        // SAFETY: a zeroed value we own receives the old action.
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: installs a valid handler.
        assert_eq!(unsafe { libc::sigaction(libc::SIGSEGV, &act, &mut old) }, 0);
        let s = w.arm().unwrap();
        // SAFETY: as above; the fault (if any) is handled by ours.
        unsafe { std::ptr::write_volatile(p.add(10), 3) };
        assert_eq!(buf.as_slice()[10], 3);
        assert!(!w.unchanged_since(s));
        assert_eq!(FOREIGN.load(Ordering::Relaxed), 0);
        if !uffd() {
            assert!(handler_reasserted() > before, "ours went back on top");
        }
        drop(w);
        if uffd() {
            // SAFETY: restores what was there (ours or the default) for the other tests.
            unsafe { libc::sigaction(libc::SIGSEGV, &old, std::ptr::null_mut()) };
        } else {
            // Ours stays on top; faults not ours go where they went before the test.
            // SAFETY: a zeroed sigaction is a valid value.
            let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
            act.sa_sigaction = prev_handler;
            act.sa_flags = prev_flags;
            set_previous(&act);
        }
    }
}
