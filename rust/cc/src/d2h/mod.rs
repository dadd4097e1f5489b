//! Device-to-host decryption off the critical path, into memory registered for it.
//!
//! The driver decrypts each D2H chunk with `EVP_DecryptInit_ex(iv)`, `SET_TAG`,
//! `EVP_DecryptUpdate(out = destination, in = bounce buffer)` and `EVP_DecryptFinal_ex`,
//! whose answer (tag good or not) it reports to the application. Decryption is the expensive
//! part; the tag check alone is one GHASH pass
//! ([`pipellm_core::crypto::AeadKey::snapshot_and_tag`]). So, for a destination inside a
//! *receive pool* (memory mapped twice, registered with `pipellm_cc_receive(view, alias,
//! len)`: the application reads the view, we write through the alias):
//!
//! - `DecryptUpdate` copies the ciphertext from the bounce buffer (shared with the host, so
//!   it is snapshotted before anything is computed from it) into the destination *through the
//!   alias*, and closes the destination's pages in the view (a gate: `PROT_NONE`,
//!   [`pipellm_core::gate`]): whoever touches them waits;
//! - `DecryptFinal` checks the tag over that snapshot, synchronously. A wrong tag: the
//!   destination is zeroed, the gate opened, the call fails as OpenSSL's would, and the
//!   pipeline stops (nothing is deferred or served from pre-encrypted chunks any more; see
//!   [`stopped`]). A right tag: the call succeeds and a decryption thread decrypts the
//!   snapshot in place (checking the tag once more as it goes) and then opens the gate.
//!
//! So the driver never reports success for bytes that will not verify, and nobody reads the
//! destination before its plaintext is there. Everything else is forwarded: destinations
//! outside every pool, keys our AES-GCM has not yet reproduced (the first message under a
//! key is decrypted by the real library and used to confirm it), calls outside the driver's
//! pattern. A call we do not model arriving mid-message first *resyncs*: the real context
//! decrypts the snapshot in place, exactly as if it had seen the Update, and the gate opens.

mod decrypt;
mod pools;

pub use decrypt::MAX_QUEUED;
pub use pools::{receive, unreceive, ReceiveError, UnreceiveError, MAX_POOLS};

use crate::config::{config, log};
use crate::context::Tag;
use crate::ivmodel::Iv;
use crate::stats::Stats;
use pipellm_core::crypto::{tags_equal, AeadKey};
use pipellm_core::gate::Gate;
use pipellm_core::locks::lock;
use pools::PendingGuard;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use zeroize::Zeroize;

/// Failed confirmations after which a key is left alone.
const CONFIRM_TRIES: u8 = 3;

/// A message whose ciphertext sits in a gated destination. Dropping it opens the gate and
/// *then* releases the pool (fields drop in order): `unreceive`, which waits for the pool's
/// count, never lets the pool be unmapped under a gate still to open.
struct Deferred {
    alias: usize,
    len: usize,
    /// The GCM tag of the snapshot, computed as it was copied: Final compares it with the
    /// tag the driver set.
    tag: Tag,
    /// Held for its drop, which opens the pages.
    _gate: Gate,
    pending: PendingGuard,
}

/// The current message of a followed context (`None` in `DecCtx::msg`: no message started,
/// or one we do not follow).
enum DMsg {
    /// Init with an IV seen, no data yet.
    Fresh,
    /// Ciphertext snapshotted into a gated destination, Final not seen yet.
    Deferred(Deferred),
    /// Decrypted by the real library. `ours`: when this message confirms the
    /// key, the tag our AES-GCM computed over the plaintext during the Update (compared with
    /// the tag the driver set at Final: no buffer is read after its call returned).
    Forwarded { len: usize, ours: Option<Tag> },
}

#[derive(Default)]
struct DecCtx {
    key: Option<Arc<AeadKey>>,
    /// The raw key, to tell a re-init with the same key (kept state) from a new key.
    key_bytes: Option<zeroize::Zeroizing<[u8; 32]>>,
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

struct D2h {
    ctxs: Mutex<HashMap<usize, DecCtx>>,
    /// Contexts holding a `Deferred` message: when 0, hooks skip the resync lookup.
    in_message: AtomicUsize,
}

fn d2h() -> &'static D2h {
    static D: OnceLock<D2h> = OnceLock::new();
    D.get_or_init(|| D2h {
        ctxs: Mutex::new(HashMap::new()),
        in_message: AtomicUsize::new(0),
    })
}

/// True if a context holds a message into the pool counted by `pending` between its Update
/// and its Final (for `pools::unreceive`).
fn mid_message_into(pending: &Arc<AtomicUsize>) -> bool {
    lock(&d2h().ctxs).values().any(|c| match &c.msg {
        Some(DMsg::Deferred(d)) => Arc::ptr_eq(&d.pending.0, pending),
        _ => false,
    })
}

fn stats() -> &'static crate::stats::Stats {
    crate::stats::stats()
}

/// True once a deferred D2H chunk failed its tag: from then on nothing is deferred and no
/// pre-encrypted chunk is served (the engine checks this), everything is forwarded.
pub fn stopped() -> bool {
    crate::process::stopped()
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
    if crate::process::forked() {
        return; // a D2H thread may have held these tables at the fork: forward only
    }
    let mut m = lock(&d2h().ctxs);
    let st = m.entry(ctx).or_default();
    discard(st.msg.take());
    if ch.cipher_ok == Some(false) {
        *st = DecCtx::default();
        return;
    }
    if ch.cipher_ok.is_some() && ch.key.is_none() {
        // An init naming a cipher resets the context in OpenSSL, key included: nothing to
        // follow until a key comes.
        *st = DecCtx::default();
        return;
    }
    // The same key again (passed at every init by some drivers) keeps its confirmation;
    // compared in constant time.
    let same_key = match (ch.key, &st.key_bytes) {
        (Some(k), Some(old)) => pipellm_core::crypto::ct_eq(old, k),
        _ => false,
    };
    if let (Some(k), false) = (ch.key, same_key) {
        match AeadKey::new(k) {
            Ok(key) => {
                *st = DecCtx {
                    key: Some(Arc::new(key)),
                    key_bytes: Some(zeroize::Zeroizing::new(*k)),
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
    if crate::process::forked() {
        return; // a D2H thread may have held these tables at the fork: forward only
    }
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
        // SAFETY: our gated destination's alias, ours to write until the gate opens.
        unsafe { std::ptr::write_bytes(msg.alias as *mut u8, 0, msg.len) };
    }
}

/// `SET_TAG` on a followed context.
pub fn on_set_tag(ctx: usize, tag: &Tag) {
    if crate::process::forked() {
        return; // a D2H thread may have held these tables at the fork: forward only
    }
    if let Some(st) = lock(&d2h().ctxs).get_mut(&ctx) {
        st.tag = Some(*tag);
    }
}

/// The current message of the context leaves what we model (CipherUpdate, an empty Update).
/// The caller resynced first.
pub fn untrack_message(ctx: usize) {
    if crate::process::forked() {
        return; // a D2H thread may have held these tables at the fork: forward only
    }
    if let Some(st) = lock(&d2h().ctxs).get_mut(&ctx) {
        discard(st.msg.take());
    }
}

/// Takes the deferred message of `ctx` for a resync; the message is not followed further.
pub fn take_for_resync(ctx: usize) -> Option<Resync> {
    if crate::process::forked() {
        return None; // a D2H thread may have held these tables at the fork: forward only
    }
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
    if crate::process::forked() {
        return false; // a D2H thread may have held these tables at the fork: forward only
    }
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
        st.msg = Some(DMsg::Forwarded { len, ours: None });
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
    let Some((alias, pending)) = pools::find(out_a, len, in_a) else {
        return false;
    };
    if decrypt::full() {
        Stats::add(&stats().d2h_backpressure, 1);
        return false;
    }
    // Snapshot first (the bounce buffer is shared with the host), hashing each piece as it
    // is copied (the tag is of the copy, the bytes that stay), then close the view's pages: the copy
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
    // counts, protection ours to change; the thread that opens the gate (a decryption
    // thread, or this one on a resync or a failed tag) writes through the alias only.
    let Ok(gate) = (unsafe { pipellm_core::gate::close(out, len) }) else {
        // Out of gate slots: let the real library decrypt (it rewrites `out`).
        Stats::add(&stats().d2h_backpressure, 1);
        return false;
    };
    let msg = Deferred {
        alias,
        len,
        tag,
        _gate: gate,
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
    if crate::process::forked() {
        return None; // a D2H thread may have held these tables at the fork: forward only
    }
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
    decrypt::submit(decrypt::Job { key, iv, tag, msg });
    Some(FinalOutcome::Verified)
}

/// A deferred message that will not verify: zeroed, opened, and the pipeline stops.
fn reject(msg: Deferred, why: &str) -> FinalOutcome {
    // SAFETY: as in `on_final`: our gated destination's alias, ours to write.
    unsafe { std::ptr::write_bytes(msg.alias as *mut u8, 0, msg.len) };
    drop(msg); // opens the gate on zeroes
    Stats::add(&stats().d2h_tag_failures, 1);
    if crate::process::stop() {
        log(format_args!(
            "a D2H chunk failed its tag check ({why}); pipeline stopped, everything forwarded"
        ));
    }
    FinalOutcome::Rejected
}
/// After a real DecryptUpdate of a followed message: if it should confirm the context's
/// key, re-encrypts the plaintext now, while the caller's buffers are still ours to read,
/// and keeps the tag for Final. Only for messages into a registered receive pool (the only
/// ones that can be deferred), so no other program pays the extra encryption.
///
/// # Safety
/// `input` and `out` must be readable for `len` bytes: the arguments of the
/// EVP_DecryptUpdate call that just returned, before returning to its caller.
pub unsafe fn after_real_update(ctx: usize, input: *const u8, out: *const u8, len: usize) {
    if crate::process::forked() {
        return; // a D2H thread may have held these tables at the fork: forward only
    }
    let (key, iv) = {
        let mut m = lock(&d2h().ctxs);
        let Some(st) = m.get_mut(&ctx) else { return };
        let Some(DMsg::Forwarded {
            len: n, ours: None, ..
        }) = st.msg
        else {
            return;
        };
        if n != len || st.confirmed || st.confirm_failures >= CONFIRM_TRIES {
            return;
        }
        match (st.key.clone(), st.iv) {
            (Some(k), Some(iv)) => (k, iv),
            _ => return,
        }
    };
    if pools::find(out as usize, len, input as usize).is_none() {
        return;
    }
    // SAFETY: per this function's contract, both are readable for len until we return.
    let (ct, plain) = unsafe {
        (
            std::slice::from_raw_parts(input, len),
            std::slice::from_raw_parts(out, len),
        )
    };
    let mut mine = vec![0u8; len];
    let result = key.seal(&iv, &[], plain, &mut mine);
    let same_ct = mine == ct;
    mine.zeroize();
    let mut m = lock(&d2h().ctxs);
    if let Some(DecCtx {
        msg: Some(DMsg::Forwarded { ours, .. }),
        ..
    }) = m.get_mut(&ctx)
    {
        if let (Ok(tag), true) = (result, same_ct) {
            *ours = Some(tag);
        }
    }
}

/// After a real DecryptFinal of a followed message: confirms the key when the tag computed
/// at the Update matches the one the driver set and the real library accepted.
pub fn after_real_final(ctx: usize, ok: bool) {
    if crate::process::forked() {
        return; // a D2H thread may have held these tables at the fork: forward only
    }
    let mut m = lock(&d2h().ctxs);
    let Some(st) = m.get_mut(&ctx) else { return };
    let msg = st.msg.take();
    let tag = st.tag.take();
    let Some(DMsg::Forwarded { ours, .. }) = msg else {
        return;
    };
    Stats::add(&stats().d2h_forwarded, 1);
    if !ok || st.confirmed || st.confirm_failures >= CONFIRM_TRIES {
        return;
    }
    let (Some(ours), Some(tag)) = (ours, tag) else {
        return;
    };
    if tags_equal(&ours, &tag) {
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
