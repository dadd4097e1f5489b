//! Device-to-host decryption off the critical path, into memory registered for it.
//!
//! The driver decrypts each D2H chunk with `EVP_DecryptInit_ex(iv)`, `SET_TAG`,
//! `EVP_DecryptUpdate(out = destination, in = bounce buffer)` and `EVP_DecryptFinal_ex`,
//! whose answer (tag good or not) it reports to the application. Decryption is the expensive
//! part; the tag check alone is one GHASH pass
//! ([`pipellm_core::crypto::AeadKey::tag_of_ciphertext`]). So, for a destination inside a
//! *receive pool* (memory mapped twice, registered with `pipellm_cc_receive(view, alias,
//! len)`: the application reads the view, we write through the alias):
//!
//! - `DecryptUpdate` copies the ciphertext from the bounce buffer (shared with the host, so
//!   it is snapshotted before anything is computed from it) into the destination *through the
//!   alias*, and seals the destination's pages in the view (`PROT_NONE`,
//!   [`pipellm_core::sealed`]): whoever touches them waits;
//! - `DecryptFinal` checks the tag over that snapshot, synchronously. A wrong tag: the
//!   destination is zeroed, the seal opened, the call fails as OpenSSL's would, and the
//!   pipeline stops (nothing is deferred or served from pre-encrypted chunks any more; see
//!   [`stopped`]). A right tag: the call succeeds and a decryption thread decrypts the
//!   snapshot in place (checking the tag once more as it goes) and then opens the seal.
//!
//! So the driver never reports success for bytes that will not verify, and nobody reads the
//! destination before its plaintext is there. Everything else is forwarded: destinations
//! outside every pool, keys our AES-GCM has not yet reproduced (the first message under a
//! key is decrypted by the real library and used to confirm it), calls outside the driver's
//! pattern. A call we do not model arriving mid-message first *resyncs*: the real context
//! decrypts the snapshot in place, exactly as if it had seen the Update, and the seal opens.

use crate::config::{config, log};
use crate::engine::Tag;
use crate::ivmodel::Iv;
use crate::stats::Stats;
use pipellm_core::crypto::{tags_equal, AeadKey};
use pipellm_core::sealed::Seal;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};

/// Receive pools at once.
pub const MAX_POOLS: usize = 64;
/// Decryptions queued or running at once; beyond this a chunk is decrypted synchronously
/// (forwarded), which bounds how far the application can run ahead of its plaintext.
pub const MAX_QUEUED: usize = 64;
/// Failed confirmations after which a key is left alone.
const CONFIRM_TRIES: u8 = 3;

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
struct PendingGuard(Arc<AtomicUsize>);

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A message whose ciphertext sits in a sealed destination. Dropping it opens the seal and
/// *then* releases the pool (fields drop in order): `unreceive`, which waits for the pool's
/// count, never lets the pool be unmapped under a seal still to open.
struct Deferred {
    alias: usize,
    len: usize,
    /// The GCM tag of the snapshot, computed as it was copied: Final compares it with the
    /// tag the driver set.
    tag: Tag,
    /// Held for its drop, which opens the pages.
    _seal: Seal,
    pending: PendingGuard,
}

/// The current message of a followed context (`None` in `DecCtx::msg`: no message started,
/// or one we do not follow).
enum DMsg {
    /// Init with an IV seen, no data yet.
    Fresh,
    /// Ciphertext snapshotted into a sealed destination, Final not seen yet.
    Deferred(Deferred),
    /// Decrypted by the real library into `out`: confirms the key at Final if needed.
    Forwarded { out: usize, len: usize },
}

#[derive(Default)]
struct DecCtx {
    key: Option<Arc<AeadKey>>,
    confirmed: bool,
    confirm_failures: u8,
    iv: Option<Iv>,
    tag: Option<Tag>,
    msg: Option<DMsg>,
}

/// The snapshot a forwarded call must first hand to the real context (see `resync`).
pub struct Resync {
    msg: Deferred,
}

impl Resync {
    /// The destination's second mapping, holding the ciphertext: the real context decrypts
    /// it in place.
    pub fn alias(&self) -> *mut u8 {
        self.msg.alias as *mut u8
    }

    /// The message's length (never 0: empty Updates are not deferred).
    pub fn bytes(&self) -> usize {
        self.msg.len
    }

    /// Opens the destination once the real context has decrypted into it.
    pub fn finish(self) {
        drop(self.msg);
    }
}

/// What `DecryptFinal` answers for a deferred message.
pub enum FinalOutcome {
    /// Tag verified; decryption queued.
    Verified,
    /// Tag wrong (or no tag set): destination zeroed and opened; fail the call.
    Rejected,
}

struct Job {
    key: Arc<AeadKey>,
    iv: Iv,
    tag: Tag,
    msg: Deferred,
}

struct D2h {
    ctxs: Mutex<HashMap<usize, DecCtx>>,
    /// Contexts holding a `Deferred` message: when 0, hooks skip the resync lookup.
    in_message: AtomicUsize,
    pools: Mutex<Vec<Pool>>,
    jobs: Mutex<VecDeque<Job>>,
    job_ready: Condvar,
    queued: AtomicUsize,
    threads: std::sync::Once,
}

fn d2h() -> &'static D2h {
    static D: OnceLock<D2h> = OnceLock::new();
    D.get_or_init(|| D2h {
        ctxs: Mutex::new(HashMap::new()),
        in_message: AtomicUsize::new(0),
        pools: Mutex::new(Vec::new()),
        jobs: Mutex::new(VecDeque::new()),
        job_ready: Condvar::new(),
        queued: AtomicUsize::new(0),
        threads: std::sync::Once::new(),
    })
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn stats() -> &'static crate::stats::Stats {
    &crate::engine::engine().stats
}

/// True once a deferred D2H chunk failed its tag: from then on nothing is deferred and no
/// pre-encrypted chunk is served (the engine checks this), everything is forwarded.
pub fn stopped() -> bool {
    crate::engine::engine().is_stopped()
}

/// True if any byte of `[start, start + len)` is in a receive pool's view or alias.
pub fn overlaps_a_pool(start: usize, len: usize) -> bool {
    let end = start.saturating_add(len.max(1));
    lock(&d2h().pools).iter().any(|p| {
        (p.view < end && start < p.view + p.len) || (p.alias < end && start < p.alias + p.len)
    })
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
    let page = pipellm_core::staging::PAGE;
    if len == 0
        || !view.is_multiple_of(page)
        || !alias.is_multiple_of(page)
        || view.checked_add(len).is_none()
        || alias.checked_add(len).is_none()
    {
        return Err(ReceiveError::BadRange);
    }
    if view < alias + len && alias < view + len {
        return Err(ReceiveError::BadRange);
    }
    let _reg = crate::watched::registrations();
    if crate::watched::overlaps(view, len) || crate::watched::overlaps(alias, len) {
        return Err(ReceiveError::Overlaps);
    }
    let mut pools = lock(&d2h().pools);
    if pools.iter().any(|p| {
        let hit = |a: usize| a < p.view + p.len && p.view < a + len;
        let hit_alias = |a: usize| a < p.alias + p.len && p.alias < a + len;
        hit(view) || hit(alias) || hit_alias(view) || hit_alias(alias)
    }) {
        return Err(ReceiveError::Overlaps);
    }
    if pools.len() >= MAX_POOLS {
        return Err(ReceiveError::Full);
    }
    // A forked child must not inherit pages that may be sealed (no decryption thread there
    // would ever open them) nor a shared alias it could write the parent's bytes through.
    for (a, n) in [(view, len), (alias, len)] {
        // SAFETY: madvise on a range the caller vouched is mapped; DONTFORK only changes
        // what fork copies.
        if unsafe { libc::madvise(a as *mut libc::c_void, n, libc::MADV_DONTFORK) } != 0 {
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
    let pending = {
        let mut pools = lock(&d2h().pools);
        let i = pools
            .iter()
            .position(|p| p.view == view)
            .ok_or(UnreceiveError::NotFound)?;
        let pending = pools[i].pending.clone();
        let mid_message = lock(&d2h().ctxs).values().any(|c| match &c.msg {
            Some(DMsg::Deferred(d)) => Arc::ptr_eq(&d.pending.0, &pending),
            _ => false,
        });
        if mid_message {
            return Err(UnreceiveError::Busy);
        }
        pools.swap_remove(i);
        pending
    };
    // Queued decryptions always finish (a decryption thread takes every job).
    while pending.load(Ordering::Acquire) != 0 {
        std::thread::sleep(std::time::Duration::from_micros(50));
    }
    Ok(())
}

/// What a decrypting init call changed (after the real call succeeded).
pub struct DecInit<'a> {
    /// `Some(ok)` if a cipher was given: whether it is AES-256-GCM on the default engine.
    pub cipher_ok: Option<bool>,
    pub key: Option<&'a [u8; 32]>,
    pub iv: Option<Iv>,
}

/// Records a decrypting init. The caller resynced any deferred message first.
pub fn on_init(ctx: usize, ch: DecInit<'_>) {
    let mut m = lock(&d2h().ctxs);
    let st = m.entry(ctx).or_default();
    discard(st.msg.take());
    if ch.cipher_ok == Some(false) {
        *st = DecCtx::default();
        return;
    }
    if ch.cipher_ok == Some(true) && st.key.is_none() && ch.key.is_none() {
        // A cipher without a key: nothing to follow until the key comes.
        st.msg = None;
    }
    if let Some(k) = ch.key {
        match AeadKey::new(k) {
            Ok(key) => {
                *st = DecCtx {
                    key: Some(Arc::new(key)),
                    ..DecCtx::default()
                }
            }
            Err(_) => {
                *st = DecCtx::default();
                return;
            }
        }
    }
    st.tag = None;
    match ch.iv {
        Some(iv) if st.key.is_some() => {
            st.iv = Some(iv);
            st.msg = Some(DMsg::Fresh);
        }
        // Re-init without an IV would reuse the old one; not the driver's pattern.
        _ => st.msg = None,
    }
}

/// The context is gone, reset, or left what we model. The caller resynced first.
pub fn forget(ctx: usize) {
    let old = lock(&d2h().ctxs).remove(&ctx);
    if let Some(st) = old {
        discard(st.msg);
    }
}

/// A message dropped without a resync (callers resync first; this is the backstop): a
/// deferred destination opens on zeroes, never on ciphertext.
fn discard(msg: Option<DMsg>) {
    if let Some(DMsg::Deferred(msg)) = msg {
        d2h().in_message.fetch_sub(1, Ordering::AcqRel);
        // SAFETY: our sealed destination's alias, ours to write until the seal opens.
        unsafe { std::ptr::write_bytes(msg.alias as *mut u8, 0, msg.len) };
    }
}

/// `SET_TAG` on a followed context.
pub fn on_set_tag(ctx: usize, tag: &Tag) {
    if let Some(st) = lock(&d2h().ctxs).get_mut(&ctx) {
        st.tag = Some(*tag);
    }
}

/// The current message of the context leaves what we model (CipherUpdate, an empty Update).
/// The caller resynced first.
pub fn untrack_message(ctx: usize) {
    if let Some(st) = lock(&d2h().ctxs).get_mut(&ctx) {
        discard(st.msg.take());
    }
}

/// Takes the deferred message of `ctx` for a resync; the message is not followed further.
pub fn take_for_resync(ctx: usize) -> Option<Resync> {
    let d = d2h();
    if d.in_message.load(Ordering::Acquire) == 0 {
        return None;
    }
    let mut m = lock(&d.ctxs);
    let st = m.get_mut(&ctx)?;
    match st.msg.take() {
        Some(DMsg::Deferred(msg)) => {
            d.in_message.fetch_sub(1, Ordering::AcqRel);
            Stats::add(&stats().d2h_resyncs, 1);
            Some(Resync { msg })
        }
        other => {
            st.msg = other;
            None
        }
    }
}

/// Before forwarding `DecryptUpdate`: defers the message if it is one we may. Returns true
/// if the call is answered (the caller reports `inl` bytes written).
///
/// # Safety
/// `input` must be readable for `len` bytes and `out` writable for `len` bytes (the
/// EVP_DecryptUpdate contract).
pub unsafe fn try_defer(ctx: usize, out: *mut u8, input: *const u8, len: usize) -> bool {
    let d = d2h();
    let (out_a, in_a) = (out as usize, input as usize);
    let (key, iv) = {
        let mut m = lock(&d.ctxs);
        let Some(st) = m.get_mut(&ctx) else {
            return false;
        };
        if !matches!(st.msg, Some(DMsg::Fresh)) {
            // A second Update, AAD, or a message we do not follow: forwarded from here on
            // (the caller resynced a deferred one first).
            discard(st.msg.take());
            return false;
        }
        if out.is_null() {
            st.msg = None; // AAD: not the driver's pattern
            return false;
        }
        // Forwarded unless deferred below (the real library then decrypts into `out`).
        st.msg = Some(DMsg::Forwarded { out: out_a, len });
        if !st.confirmed || stopped() || !config().d2h {
            return false;
        }
        match (st.key.clone(), st.iv) {
            (Some(k), Some(iv)) => (k, iv),
            _ => return false,
        }
    };
    // The pool, counted as busy from here (its unregistration waits for the count), so it
    // stays mapped while the ciphertext is copied without the contexts' lock held: other
    // channels' chunks are not serialised behind this one's copy.
    let found = lock(&d.pools).iter().find_map(|p| {
        let inside = out_a >= p.view && out_a.checked_add(len)? <= p.view + p.len;
        let end = in_a.checked_add(len)?;
        let apart = |a: usize, n: usize| end <= a || a + n <= in_a;
        let input_clear = apart(p.view, p.len) && apart(p.alias, p.len);
        inside.then_some(())?;
        input_clear.then(|| {
            p.pending.fetch_add(1, Ordering::AcqRel);
            (p.alias + (out_a - p.view), PendingGuard(p.pending.clone()))
        })
    });
    let Some((alias, pending)) = found else {
        return false;
    };
    if d.queued.load(Ordering::Acquire) >= MAX_QUEUED {
        Stats::add(&stats().d2h_backpressure, 1);
        return false;
    }
    // Snapshot first (the bounce buffer is shared with the host), hashing each piece as it
    // is copied (the tag is of the copy, the bytes that stay), then seal the view: the copy
    // goes through the alias, so it needs no access to the view.
    // SAFETY: the caller guarantees `input` readable for `len`; `alias` is the pool's second
    // mapping of `out`'s bytes, writable for `len` (registration contract; mapped while
    // `pending` counts), and does not overlap `input` (checked above).
    let (src, snap) = unsafe {
        (
            std::slice::from_raw_parts(input, len),
            std::slice::from_raw_parts_mut(alias as *mut u8, len),
        )
    };
    let Ok(tag) = key.snapshot_and_tag(&iv, src, snap) else {
        return false;
    };
    // SAFETY: `out` lies inside a registered pool's view: mapped read-write while `pending`
    // counts, protection ours to change; the thread that opens the seal (a decryption
    // thread, or this one on a resync or a failed tag) writes through the alias only.
    let Ok(seal) = (unsafe { pipellm_core::sealed::seal(out, len) }) else {
        // Out of seal slots: let the real library decrypt (it rewrites `out`).
        Stats::add(&stats().d2h_backpressure, 1);
        return false;
    };
    let msg = Deferred {
        alias,
        len,
        tag,
        _seal: seal,
        pending,
    };
    let mut m = lock(&d.ctxs);
    match m.get_mut(&ctx) {
        Some(st) if matches!(st.msg, Some(DMsg::Forwarded { .. })) => {
            d.in_message.fetch_add(1, Ordering::AcqRel);
            st.msg = Some(DMsg::Deferred(msg));
            true
        }
        _ => {
            // The context changed under this call (another thread used it: a caller bug).
            // Open the pages and let the real library decrypt into them.
            drop(m);
            drop(msg);
            false
        }
    }
}

/// `DecryptFinal` on a deferred message: the tag check; `None` if there is none (forward).
pub fn on_final(ctx: usize) -> Option<FinalOutcome> {
    let d = d2h();
    let (msg, key, iv, tag) = {
        let mut m = lock(&d.ctxs);
        let st = m.get_mut(&ctx)?;
        if !matches!(st.msg, Some(DMsg::Deferred(_))) {
            return None;
        }
        let Some(DMsg::Deferred(msg)) = st.msg.take() else {
            unreachable!()
        };
        d.in_message.fetch_sub(1, Ordering::AcqRel);
        (msg, st.key.clone(), st.iv, st.tag.take())
    };
    let (Some(key), Some(iv)) = (key, iv) else {
        return Some(reject(msg, "no key or IV"));
    };
    let Some(tag) = tag else {
        return Some(reject(msg, "no tag set"));
    };
    if !tags_equal(&msg.tag, &tag) {
        return Some(reject(msg, "tag mismatch"));
    }
    Stats::add(&stats().d2h_deferred, 1);
    Stats::add(&stats().d2h_deferred_bytes, msg.len as u64);
    d.queued.fetch_add(1, Ordering::AcqRel);
    d.threads.call_once(|| {
        for i in 0..config().d2h_threads {
            let spawned = std::thread::Builder::new()
                .name(format!("pipellm-d2h-{i}"))
                .spawn(decrypt_loop);
            if spawned.is_err() {
                log(format_args!("could not start a decryption thread"));
            }
        }
    });
    let job = Job { key, iv, tag, msg };
    if config().d2h_threads == 0 {
        decrypt(job);
    } else {
        lock(&d.jobs).push_back(job);
        d.job_ready.notify_one();
    }
    Some(FinalOutcome::Verified)
}

/// A deferred message that will not verify: zeroed, opened, and the pipeline stops.
fn reject(msg: Deferred, why: &str) -> FinalOutcome {
    // SAFETY: as in `on_final`: our sealed destination's alias, ours to write.
    unsafe { std::ptr::write_bytes(msg.alias as *mut u8, 0, msg.len) };
    drop(msg); // opens the seal on zeroes
    Stats::add(&stats().d2h_tag_failures, 1);
    if crate::engine::engine().stop() {
        log(format_args!(
            "a D2H chunk failed its tag check ({why}); pipeline stopped, everything forwarded"
        ));
    }
    FinalOutcome::Rejected
}

fn decrypt_loop() {
    crate::engine::background_priority();
    let d = d2h();
    loop {
        let job = {
            let mut q = lock(&d.jobs);
            loop {
                if let Some(j) = q.pop_front() {
                    break j;
                }
                q = d.job_ready.wait(q).unwrap_or_else(PoisonError::into_inner);
            }
        };
        decrypt(job);
    }
}

fn decrypt(job: Job) {
    let Job { key, iv, tag, msg } = job;
    // SAFETY: as in `on_final`: the sealed destination's alias, ours until the seal opens.
    let buf = unsafe { std::slice::from_raw_parts_mut(msg.alias as *mut u8, msg.len) };
    // The tag is checked again as the bytes are decrypted (AWS-LC's AES-GCM open is faster
    // than its bare counter mode): it can only fail if something wrote the alias since the
    // check, against the registration's contract. The bytes are zeroed then, never shown.
    let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        key.open_in_place(&iv, &tag, buf).is_ok()
    }));
    if !matches!(done, Ok(true)) {
        buf.fill(0);
        Stats::add(&stats().d2h_late_failures, 1);
        if crate::engine::engine().stop() {
            log(format_args!(
                "a deferred D2H chunk changed after its tag check; pipeline stopped"
            ));
        }
    }
    drop(msg); // opens the seal
    d2h().queued.fetch_sub(1, Ordering::AcqRel);
}

/// After a forwarded `DecryptFinal`: confirms the context's key on its first message that
/// the real library decrypted and verified.
///
/// # Safety
/// The `Forwarded` message's output must still be readable for its length (the driver's
/// destination, read right after its own Final).
pub unsafe fn after_real_final(ctx: usize, ok: bool) {
    let mut m = lock(&d2h().ctxs);
    let Some(st) = m.get_mut(&ctx) else { return };
    let msg = st.msg.take();
    let tag = st.tag.take();
    let Some(DMsg::Forwarded { out, len }) = msg else {
        return;
    };
    Stats::add(&stats().d2h_forwarded, 1);
    if !ok || st.confirmed || st.confirm_failures >= CONFIRM_TRIES {
        return;
    }
    let (Some(key), Some(iv), Some(tag)) = (st.key.clone(), st.iv, tag) else {
        return;
    };
    // SAFETY: per this function's contract, `out` is readable for `len`.
    let plain = unsafe { std::slice::from_raw_parts(out as *const u8, len) };
    let mut ct = vec![0u8; len];
    let same = matches!(key.seal(&iv, &[], plain, &mut ct), Ok(t) if tags_equal(&t, &tag));
    if same {
        st.confirmed = true;
        Stats::add(&stats().d2h_keys_confirmed, 1);
    } else {
        st.confirm_failures += 1;
        if st.confirm_failures == CONFIRM_TRIES {
            log(format_args!(
                "decrypting context {ctx:#x}: real output not reproduced; forwarded"
            ));
        }
    }
}
