//! What the interposer knows about each EVP encryption context, and the decisions it makes:
//! when a call can be served from a pre-encrypted chunk, and what to pre-encrypt next.
//!
//! A context is *eligible for hits* only when all of these hold:
//! - its cipher is AES-256-GCM with the default provider path (no ENGINE), 12-byte IVs;
//! - its key was set through a call we saw, and our AES-GCM reproduced, byte for byte, the
//!   ciphertext and tag the real library produced for one whole message under that key;
//! - the current message was started by an init call with an IV we saw, has no AAD, and is
//!   encrypted by one EncryptUpdate call;
//! - a chunk pre-encrypted for exactly that IV, input pointer and length exists, and the
//!   input bytes still have the fingerprint they had when the chunk was encrypted.
//!
//! Then the stored ciphertext goes to the driver's output and the stored tag answers
//! `GET_TAG`: the driver gets exactly what OpenSSL would have computed. Any call we do not
//! model on a tracked context takes it out of tracking (its later calls are forwarded only),
//! and any call after a hit that needs the real context's state first brings the real
//! context up to date (`resync`), so OpenSSL's own answers stay right too. The state model,
//! call by call, is written down in docs/driver-backend.md ("What the interposer keeps").

use crate::config::{config, log};
pub use crate::context::{CtxState, Msg, Prepared, Tag, TAG_LEN};
use crate::ivmodel::{Iv, ModelState};
use crate::stats::{stats, Stats};
pub use crate::workers::Job;
use pipellm_core::crypto::AeadKey;
use pipellm_core::locks::{lock, wait_timeout};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};
use zeroize::{Zeroize, Zeroizing};

/// With `PIPELLM_CC_WAIT_INFLIGHT=1`: the longest an EncryptUpdate waits for its chunk (a
/// worker that died with it, or no worker at all, costs this once per message, then the
/// message is encrypted by the real library and counted `late`, as without the option).
const WAIT_INFLIGHT_CAP: Duration = Duration::from_secs(10);

pub struct Engine {
    ctxs: Mutex<HashMap<usize, CtxState>>,
    /// Paired with `ctxs`: notified when a worker settles a chunk (its IV leaves
    /// `inflight`), only with `PIPELLM_CC_WAIT_INFLIGHT=1` (see `wait_settled`).
    settled: Condvar,
    /// Callers waiting on `settled` for a chunk that is nearly done (see `nearly_done`).
    waiters: AtomicUsize,
    /// How long a worker takes for a chunk, a moving average in ns (0: none done yet).
    job_ns: std::sync::atomic::AtomicU64,
    next_gen: std::sync::atomic::AtomicU64,
    /// Bytes the real library encrypted on tracked contexts, and bytes we encrypted again to
    /// confirm keys (see `after_real_update`).
    tracked_bytes: std::sync::atomic::AtomicU64,
    confirm_bytes: std::sync::atomic::AtomicU64,
}

pub fn engine() -> &'static Engine {
    static E: OnceLock<Engine> = OnceLock::new();
    E.get_or_init(|| Engine {
        ctxs: Mutex::new(HashMap::new()),
        settled: Condvar::new(),
        waiters: AtomicUsize::new(0),
        job_ns: std::sync::atomic::AtomicU64::new(0),
        next_gen: std::sync::atomic::AtomicU64::new(1),
        tracked_bytes: std::sync::atomic::AtomicU64::new(0),
        confirm_bytes: std::sync::atomic::AtomicU64::new(0),
    })
}

/// What an encrypting init call changed (after the real call succeeded; decrypting inits
/// go to `d2h`).
pub struct InitChange<'a> {
    /// `Some(ok)` if a cipher was given: whether it is AES-256-GCM on the default engine.
    pub cipher_ok: Option<bool>,
    pub key: Option<&'a [u8; 32]>,
    pub iv: Option<Iv>,
}

/// What the real context must replay to catch up with a message we served.
pub struct Resync {
    pub iv: Iv,
    pub prepared: Prepared,
    pub key: Arc<AeadKey>,
    pub finalized: bool,
}

/// See `Engine::tag_fix`. `served`: the tag is the current served message's.
#[derive(Clone, Copy)]
pub struct TagFix {
    pub tag: Tag,
    pub served: bool,
}

/// Our AES-GCM did not reproduce the real output under this key: leave the context alone.
fn refuse(ctx: usize, st: &mut CtxState, stats: &Stats) {
    st.refused = true;
    Stats::add(&stats.keys_refused, 1);
    log(format_args!(
        "context {ctx:#x}: real output not reproduced under its key; pass-through"
    ));
}

/// Bytes of key confirmation allowed before the 1/32 budget applies (see
/// `after_real_update`): enough for the first messages of many driver contexts.
const CONFIRM_ALLOWANCE: u64 = 64 << 20;

pub enum Decision {
    /// The ciphertext was written; report success with `len` bytes.
    Served,
    /// Forward to the real library.
    Forward,
}

impl Engine {
    fn gen(&self) -> u64 {
        self.next_gen
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// The context is gone or reset: drop all we know, including prepared chunks.
    pub fn forget(&self, ctx: usize) {
        let old = lock(&self.ctxs).remove(&ctx);
        if let Some(st) = old {
            self.recycle_state(st);
        }
    }

    /// A call we do not model changed the context: stop following it until a full init.
    pub fn untrack(&self, ctx: usize) {
        let mut m = lock(&self.ctxs);
        if let Some(st) = m.get_mut(&ctx) {
            st.tracked = false;
            st.msg = Msg::Untracked;
            st.gen = self.gen();
            let drained: Vec<Prepared> = st.prepared.drain().map(|(_, p)| p).collect();
            st.inflight.clear();
            st.started.clear();
            // What was planned for the IVs of an abandoned plan is no outcome of the
            // predictions when the context is followed again.
            st.planned.clear();
            st.guesses.clear();
            st.shadow = None;
            drop(m);
            for p in drained {
                crate::workers::workers().recycle(p.ct);
            }
        }
    }

    /// A call we do not model touched the current message (CipherUpdate, DecryptUpdate on
    /// an encrypting context): it is forwarded to the end; the context stays followed.
    pub fn untrack_message(&self, ctx: usize) {
        if let Some(st) = lock(&self.ctxs).get_mut(&ctx) {
            st.msg = Msg::Untracked;
        }
    }

    /// After an encrypting init succeeded. The caller brought the real context up to date
    /// first unless the init set an IV (which starts a new message, so a served message the
    /// real context has not seen no longer matters, except for its tag: `buf_tag`).
    pub fn on_init(&self, ctx: usize, ch: InitChange<'_>) {
        let mut m = lock(&self.ctxs);
        let gen = self.gen();
        let st = m.entry(ctx).or_insert_with(|| CtxState::new(gen));
        let prev = std::mem::replace(&mut st.msg, Msg::Idle);
        // The same IV set again before any data is one message to OpenSSL: observed once.
        let same_message = matches!(prev, Msg::Fresh) && ch.iv.is_some() && ch.iv == st.iv;
        // An init that names a cipher resets the context first (OpenSSL calls
        // EVP_CIPHER_CTX_reset inside it): key, last tag and message are gone, in OpenSSL's
        // context as in the real one. The key is set again only if this call passes one.
        let resets = ch.cipher_ok.is_some();
        if let Msg::Hit {
            prepared,
            finalized,
            ..
        } = prev
        {
            if finalized && !resets {
                st.buf_tag = Some(prepared.tag);
            }
            crate::workers::workers().recycle(prepared.ct);
        }
        if resets {
            st.buf_tag = None;
            st.key_set = false;
        }
        if crate::process::stopped() {
            st.tracked = false;
            st.msg = Msg::Untracked;
            return;
        }
        if let Some(ok) = ch.cipher_ok {
            if ok != st.tracked || !ok {
                st.key = None;
                st.key_bytes = None;
            }
            st.tracked = ok;
        }
        if !st.tracked {
            st.msg = Msg::Untracked;
            return;
        }
        if let Some(k) = ch.key {
            // The same key again (a driver may pass it at every init) keeps everything we
            // learned and the key's confirmation; compared in constant time.
            let same = st
                .key_bytes
                .as_ref()
                .is_some_and(|old| pipellm_core::crypto::ct_eq(old, k));
            st.key_set = true;
            if !same {
                match AeadKey::new(k) {
                    Ok(key) => {
                        let mut fresh = CtxState::new(self.gen());
                        fresh.tracked = true;
                        fresh.key = Some(Arc::new(key));
                        fresh.key_bytes = Some(Zeroizing::new(*k));
                        fresh.key_set = true;
                        fresh.buf_tag = st.buf_tag;
                        let old = std::mem::replace(st, fresh);
                        drop(m);
                        self.recycle_state(old);
                        m = lock(&self.ctxs);
                    }
                    Err(_) => {
                        st.tracked = false;
                        st.msg = Msg::Untracked;
                        return;
                    }
                }
            }
        }
        let Some(st) = m.get_mut(&ctx) else { return };
        if st.key.is_none() || !st.key_set {
            st.msg = Msg::Untracked;
            return;
        }
        st.final_seen = false;
        if let Some(iv) = ch.iv {
            st.iv = Some(iv);
            st.msg = Msg::Fresh;
            if !same_message {
                st.model.observe(&iv);
            }
            if st.model.state() == ModelState::Rejected && !st.model_logged {
                st.model_logged = true;
                Stats::add(&stats().models_rejected, 1);
                log(format_args!(
                    "context {ctx:#x}: its IVs follow no known layout; pass-through"
                ));
            }
        } else {
            // Re-init without an IV restarts the message with the old IV: GCM would reuse
            // it. The driver never does this; do not follow such a context.
            st.msg = Msg::Untracked;
        }
    }

    /// Before forwarding EncryptUpdate: serve it from a pre-encrypted chunk if we can.
    ///
    /// # Safety
    /// `input` must be readable for `len` bytes and `out` writable for `len` bytes (the
    /// EVP_EncryptUpdate contract the caller promised the real library).
    pub unsafe fn try_hit(
        &self,
        ctx: usize,
        out: *mut u8,
        input: *const u8,
        len: usize,
    ) -> Decision {
        let mut taken = {
            let mut m = lock(&self.ctxs);
            let Some(st) = m.get_mut(&ctx) else {
                return Decision::Forward;
            };
            match st.msg {
                Msg::Fresh => {}
                Msg::Missed { input, len, .. } | Msg::Diverted { input, len } => {
                    // A second Update in one message: not the driver's pattern, follow this
                    // message no further (but learn it at its tag).
                    st.msg = Msg::Diverted { input, len };
                    return Decision::Forward;
                }
                Msg::Hit { .. } => {
                    // The caller resyncs a hit before any other call: not reached.
                    st.msg = Msg::Untracked;
                    return Decision::Forward;
                }
                _ => return Decision::Forward,
            }
            if out.is_null() {
                st.msg = Msg::Untracked; // AAD: not the driver's pattern
                return Decision::Forward;
            }
            if crate::process::forked() {
                st.msg = Msg::Untracked; // nothing new in a forked child (see `forked`)
                return Decision::Forward;
            }
            let (o, i) = (out as usize, input as usize);
            if o < i.saturating_add(len) && i < o.saturating_add(len) {
                // In place (or overlapping): serving would write ciphertext over bytes the
                // validation, or the real encryption if it fails, still has to read. The
                // driver encrypts into its bounce buffer, never in place.
                Stats::add(&stats().in_place, 1);
                st.msg = Msg::Untracked;
                return Decision::Forward;
            }
            let iv = st.iv.expect("Fresh implies an IV");
            // A message has one outcome (`CtxState::record`): its shadow's, where it has
            // one, else that of what was queued for its IV (below).
            if let Some((shadow_iv, span)) = st.shadow.take() {
                if shadow_iv == iv {
                    st.record(span == (input as usize, len));
                }
            }
            let span = (input as usize, len);
            if !st.prepared.contains_key(&iv) && st.inflight.get(&iv) == Some(&span) {
                if config().wait_inflight {
                    m = self.wait_settled(m, ctx, iv, WAIT_INFLIGHT_CAP);
                } else if let Some(rest) = self.nearly_done(st, iv) {
                    // Waiting for the rest beats encrypting the whole chunk again here.
                    Stats::add(&stats().waited, 1);
                    m = self.wait_settled(m, ctx, iv, rest * 2);
                }
            }
            let Some(st) = m.get_mut(&ctx) else {
                return Decision::Forward; // freed while we waited: a caller bug
            };
            let p = st.prepared.remove(&iv);
            let planned = st.planned.remove(&iv);
            if p.is_none() && !st.inflight.contains_key(&iv) && planned {
                st.record(false); // its guess was thrown away (see `planned`)
            }
            if p.is_none() && st.inflight.contains_key(&iv) {
                // Being encrypted: from this memory (late), or from other memory (a guess
                // that did not hold).
                let ours = st.inflight.get(&iv) == Some(&span);
                Stats::add(
                    if ours {
                        &stats().late
                    } else {
                        &stats().mispredicted
                    },
                    1,
                );
                st.record(false);
            }
            // Until the outcome is known the message counts as missed (the fallback).
            st.msg = Msg::Missed {
                input: input as usize,
                len,
                ours: None,
            };
            if !st.confirmed {
                if let Some(p) = p {
                    drop(m);
                    crate::workers::workers().recycle(p.ct);
                }
                return Decision::Forward;
            }
            match p {
                Some(p) => p,
                None => return Decision::Forward,
            }
        };
        if taken.input != input as usize || taken.len != len {
            Stats::add(&stats().mispredicted, 1);
            crate::workers::workers().recycle(taken.ct);
            self.record_outcome(ctx, false);
            return Decision::Forward;
        }
        // A chunk of a watched range carries no fingerprints: its watch says whether anything
        // wrote its pages since they were protected (before the worker read them), and `serve`
        // then only copies. Otherwise each piece's source bytes are checked against their
        // fingerprint. Either way the ciphertext is copied in pieces, in parallel for a large
        // message.
        let watched_ok = taken.watched.map(|w| crate::watch_ranges::unchanged(&w));
        // SAFETY: the caller guarantees `input` readable and `out` writable for `len` bytes
        // until we return; `taken.ct` is our own buffer of exactly `len` bytes (so it cannot
        // overlap `out`), alive until we return.
        let fresh = watched_ok != Some(false)
            && unsafe {
                crate::pieces::serve(
                    input,
                    taken.ct.as_ptr(),
                    out,
                    // Moved, not copied: after the hit only the ciphertext, tag and span are
                    // used.
                    std::mem::take(&mut taken.ranges),
                    std::mem::take(&mut taken.fps),
                    config().helpers,
                )
            };
        if fresh && watched_ok.is_some() {
            Stats::add(&stats().hits_watched, 1);
        }
        if !fresh {
            // `out` may hold part of the old ciphertext: the real encryption rewrites it all.
            Stats::add(&stats().stale, 1);
            crate::workers::workers().recycle(taken.ct);
            self.record_outcome(ctx, false);
            return Decision::Forward;
        }
        Stats::add(&stats().hits, 1);
        Stats::add(&stats().hit_bytes, len as u64);
        let mut m = lock(&self.ctxs);
        match m.get_mut(&ctx) {
            Some(st) => {
                st.msg = Msg::Hit {
                    prepared: taken,
                    finalized: false,
                    planned: false,
                };
                st.record(true);
                Decision::Served
            }
            None => {
                // Freed by another thread mid-call: a caller bug. Let the real library answer.
                drop(m);
                crate::workers::workers().recycle(taken.ct);
                Decision::Forward
            }
        }
    }

    /// If a worker has been encrypting the chunk for `iv` for at least half the time a chunk
    /// takes, the time it should still need: waiting that long costs the driver less than
    /// encrypting the whole chunk itself (the real library takes about as long as a worker).
    /// None for a chunk still queued or just begun: encrypting it here is faster.
    fn nearly_done(&self, st: &CtxState, iv: Iv) -> Option<Duration> {
        let avg = self.job_ns.load(Ordering::Relaxed);
        let begun = st.started.get(&iv)?.elapsed().as_nanos() as u64;
        (avg > 0 && begun * 2 >= avg)
            .then(|| Duration::from_nanos(avg.saturating_sub(begun).max(20_000)))
    }

    /// Releases the contexts' lock until the chunk a worker has for `iv` on `ctx` is settled
    /// (ready, or dropped), at most `cap` (a chunk nearly done; or, as a test aid with
    /// `PIPELLM_CC_WAIT_INFLIGHT=1`, any chunk in flight, up to `WAIT_INFLIGHT_CAP`). `settle` changes `inflight` under this lock and notifies after
    /// it, and the condition is checked under the lock before each wait, so no notification
    /// is lost; a spurious or unrelated wake-up only re-checks.
    fn wait_settled<'m>(
        &self,
        mut m: MutexGuard<'m, HashMap<usize, CtxState>>,
        ctx: usize,
        iv: Iv,
        cap: Duration,
    ) -> MutexGuard<'m, HashMap<usize, CtxState>> {
        let deadline = Instant::now() + cap;
        // Counted under the lock `settle` changes `inflight` under: a settle after this sees
        // a waiter and notifies.
        self.waiters.fetch_add(1, Ordering::AcqRel);
        let _counted = Uncount(&self.waiters);
        loop {
            let pending = m
                .get(&ctx)
                .is_some_and(|st| st.inflight.contains_key(&iv) && !st.prepared.contains_key(&iv));
            let now = Instant::now();
            if !pending || now >= deadline {
                return m;
            }
            m = wait_timeout(&self.settled, m, deadline - now).0;
        }
    }

    fn record_outcome(&self, ctx: usize, served: bool) {
        if let Some(st) = lock(&self.ctxs).get_mut(&ctx) {
            st.record(served);
        }
    }

    /// A forwarded call found the context holding a served message: returns what the real
    /// context must replay to catch up (IV, ciphertext, tag, key, whether it was finalized);
    /// the rest of the message is forwarded (and still learned at its tag).
    pub fn take_hit_for_resync(&self, ctx: usize) -> Option<Resync> {
        let mut m = lock(&self.ctxs);
        let st = m.get_mut(&ctx)?;
        if !matches!(st.msg, Msg::Hit { .. }) {
            return None;
        }
        let Msg::Hit {
            prepared,
            finalized,
            planned,
        } = std::mem::replace(&mut st.msg, Msg::Untracked)
        else {
            unreachable!()
        };
        if !planned {
            st.msg = Msg::Diverted {
                input: prepared.input,
                len: prepared.len,
            };
        }
        if finalized {
            // The replay ends with the real context's own Final: its tag is then this one.
            st.buf_tag = None;
            st.final_seen = true;
        }
        Stats::add(&stats().resyncs, 1);
        Some(Resync {
            iv: st.iv?,
            prepared,
            key: st.key.clone()?,
            finalized,
        })
    }

    pub fn recycle_prepared(&self, p: Prepared) {
        crate::workers::workers().recycle(p.ct);
    }

    /// EncryptFinal on a served message not finalized yet: GCM has nothing left to output,
    /// the call succeeds. Anything else (a second Final included) is the real context's to
    /// answer, after a replay.
    pub fn on_final(&self, ctx: usize) -> bool {
        let mut m = lock(&self.ctxs);
        if let Some(Msg::Hit { finalized, .. }) = m.get_mut(&ctx).map(|s| &mut s.msg) {
            if !*finalized {
                *finalized = true;
                return true;
            }
        }
        false
    }

    /// The real context's tag buffer was just written (a real encrypting Final, or SET_TAG):
    /// it holds OpenSSL's last tag again, and the current message may be learned at GET_TAG.
    pub fn real_tag_set(&self, ctx: usize) {
        if let Some(st) = lock(&self.ctxs).get_mut(&ctx) {
            st.buf_tag = None;
            st.final_seen = true;
        }
    }

    /// The tag OpenSSL's context holds now, where the real context holds another: the served
    /// message's once it is finalized, else the last served one's (`buf_tag`). GET_TAG and
    /// get_params are forwarded first (the real call checks length, direction and state
    /// exactly as OpenSSL would) and, when they succeed, their bytes are replaced by these.
    /// The first GET_TAG of a served message also learns it and plans the next chunks.
    pub fn tag_fix(&self, ctx: usize, plan: bool) -> Option<TagFix> {
        let mut m = lock(&self.ctxs);
        let st = m.get_mut(&ctx)?;
        let (tag, span, first) = match &mut st.msg {
            Msg::Hit {
                prepared,
                finalized: true,
                planned,
            } => {
                let first = plan && !*planned;
                *planned |= plan;
                (prepared.tag, (prepared.input, prepared.len), first)
            }
            _ => return st.buf_tag.map(|tag| TagFix { tag, served: false }),
        };
        let jobs = if first {
            crate::plan::complete(ctx, st, span)
        } else {
            Vec::new()
        };
        drop(m);
        submit(jobs);
        Some(TagFix { tag, served: true })
    }

    /// After a real EncryptUpdate of a message `try_hit` left to the real library: if this
    /// message should confirm the context's key, encrypts the same input with our AES-GCM now,
    /// while the caller's buffers are still ours to read, and compares the ciphertexts; the
    /// tags are compared at GET_TAG (`after_real_tag`).
    ///
    /// Confirmation costs one more encryption of the message, so it is done only where hits
    /// can follow (the context's IVs fit a layout) and within a budget: at most 1/32 of the
    /// bytes encrypted on tracked contexts, after a first allowance. A program that changes
    /// keys all the time, or whose IVs are random, pays nothing for it.
    ///
    /// # Safety
    /// `input` and `out` must be readable for `len` bytes: the arguments of the
    /// EVP_EncryptUpdate call that just returned, before returning to its caller.
    pub unsafe fn after_real_update(
        &self,
        ctx: usize,
        input: *const u8,
        out: *const u8,
        len: usize,
    ) {
        let mut m = lock(&self.ctxs);
        let Some(st) = m.get_mut(&ctx) else { return };
        let Msg::Missed { ours: None, .. } = st.msg else {
            return;
        };
        self.tracked_bytes.fetch_add(len as u64, Ordering::Relaxed);
        if st.confirmed
            || st.refused
            || st.model.state() != ModelState::Bound
            || crate::process::forked()
        {
            return;
        }
        let spent = self.confirm_bytes.load(Ordering::Relaxed);
        let allowed = CONFIRM_ALLOWANCE + self.tracked_bytes.load(Ordering::Relaxed) / 32;
        if spent + len as u64 > allowed {
            return;
        }
        let (Some(key), Some(iv)) = (st.key.clone(), st.iv) else {
            return;
        };
        drop(m);
        self.confirm_bytes.fetch_add(len as u64, Ordering::Relaxed);
        Stats::add(&stats().confirmations, 1);
        // SAFETY: per this function's contract, both are readable for len until we return.
        let (src, real_ct) = unsafe {
            (
                std::slice::from_raw_parts(input, len),
                std::slice::from_raw_parts(out, len),
            )
        };
        let mut mine = crate::workers::workers().buffer(len);
        let result = key.seal(&iv, &[], src, &mut mine);
        let same_ct = result.is_ok() && mine == real_ct;
        crate::workers::workers().recycle(mine);
        let mut m = lock(&self.ctxs);
        let Some(st) = m.get_mut(&ctx) else { return };
        if let Msg::Missed { ours, .. } = &mut st.msg {
            match result {
                Ok(tag) if same_ct => *ours = Some(tag),
                _ => refuse(ctx, st, stats()),
            }
        }
    }

    /// After a real GET_TAG of a message the real library encrypted: confirm the key if this
    /// message was to (its ciphertext matched ours at the Update), then learn from the message
    /// and plan the next ones. Reads no buffer of the caller.
    pub fn after_real_tag(&self, ctx: usize, tag: &Tag) {
        let mut m = lock(&self.ctxs);
        let Some(st) = m.get_mut(&ctx) else { return };
        if !st.final_seen {
            return; // GET_TAG before Final returns the previous message's tag
        }
        let (input, len, ours) = match std::mem::replace(&mut st.msg, Msg::Idle) {
            Msg::Missed { input, len, ours } => (input, len, ours),
            Msg::Diverted { input, len } => {
                // Learned so the history stays whole; never used to confirm a key.
                let jobs = crate::plan::complete(ctx, st, (input, len));
                drop(m);
                submit(jobs);
                return;
            }
            _ => return,
        };
        Stats::add(&stats().misses, 1);
        if let Some(ours) = ours {
            if pipellm_core::crypto::tags_equal(&ours, tag) {
                st.confirmed = true;
                Stats::add(&stats().keys_confirmed, 1);
            } else {
                refuse(ctx, st, stats());
                return;
            }
        }
        let jobs = crate::plan::complete(ctx, st, (input, len));
        drop(m);
        submit(jobs);
    }

    /// EVP_CIPHER_CTX_copy(out, input) succeeded (after `input` was brought up to date):
    /// `out` is a context we do not follow whose last tag is `input`'s.
    pub fn after_copy(&self, out: usize, input: usize) {
        let mut m = lock(&self.ctxs);
        let buf_tag = m.get(&input).and_then(|st| st.buf_tag);
        let old = m.remove(&out);
        if buf_tag.is_some() {
            let mut st = CtxState::new(self.gen());
            st.msg = Msg::Untracked;
            st.buf_tag = buf_tag;
            m.insert(out, st);
        }
        drop(m);
        if let Some(old) = old {
            self.recycle_state(old);
        }
    }

    /// For the fork handlers: the contexts' lock, held across `fork()` so that the child
    /// gets the table in a consistent state (no other thread is inside it at the fork).
    pub fn lock_for_fork(&self) -> MutexGuard<'_, HashMap<usize, CtxState>> {
        lock(&self.ctxs)
    }

    fn run(&self, job: Job) {
        {
            let mut m = lock(&self.ctxs);
            if let Some(st) = m.get_mut(&job.ctx) {
                if st.gen == job.gen && st.inflight.get(&job.iv) == Some(&(job.input, job.len)) {
                    st.started.insert(job.iv, Instant::now());
                }
            }
        }
        let mut buf = crate::workers::workers().buffer(job.len);
        let cfg = config();
        let ranges = crate::pieces::split(
            job.len,
            crate::pieces::count(job.len, cfg.split_bytes, cfg.helpers),
        );
        // A chunk of a watched range is armed before it is read: a write from then on is
        // seen, so it is encrypted straight from the source (no snapshot copy: on a load,
        // where the workers only just keep up, that copy was a third of their time) and
        // carries no fingerprints (the pieces only split the hit's copy). Anything else is
        // snapshotted first (memory nobody vouched for may be unmapped at any time: the
        // snapshot read reports that instead of faulting), and fingerprinted from the
        // snapshot, so the fingerprints are exactly of the bytes encrypted.
        let (sealed, watched, fps) = match crate::watch_ranges::arm(job.input, job.len) {
            Some((stamp, reading)) => {
                // SAFETY: `reading` keeps the range registered, and so (its registrant's
                // promise) mapped and readable, until it is dropped after this call; `buf` is
                // our own buffer, disjoint from the caller's memory.
                let r = unsafe {
                    job.key
                        .seal_from_raw(&job.iv, &[], job.input as *const u8, &mut buf)
                };
                drop(reading);
                (r, Some(stamp), Vec::new())
            }
            None => {
                if !crate::process::read_own_memory(job.input, &mut buf) {
                    Stats::add(&stats().jobs_unreadable, 1);
                    buf.zeroize();
                    crate::workers::workers().recycle(buf);
                    self.settle(&job, None);
                    return;
                }
                let fps = crate::pieces::fingerprints(&buf, &ranges);
                (job.key.seal_in_place(&job.iv, &[], &mut buf), None, fps)
            }
        };
        match sealed {
            Ok(tag) => {
                Stats::add(&stats().jobs_done, 1);
                self.settle(
                    &job,
                    Some(Prepared {
                        input: job.input,
                        len: job.len,
                        ct: buf,
                        tag,
                        ranges,
                        fps,
                        watched,
                    }),
                );
            }
            Err(_) => {
                buf.zeroize(); // may still be the plaintext snapshot
                crate::workers::workers().recycle(buf);
                self.settle(&job, None);
            }
        }
    }

    fn settle(&self, job: &Job, p: Option<Prepared>) {
        let mut m = lock(&self.ctxs);
        let keep = match m.get_mut(&job.ctx) {
            Some(st)
                if st.gen == job.gen && st.inflight.get(&job.iv) == Some(&(job.input, job.len)) =>
            {
                st.inflight.remove(&job.iv);
                if let Some(t) = st.started.remove(&job.iv) {
                    let d = t.elapsed().as_nanos() as u64;
                    let old = self.job_ns.load(Ordering::Relaxed);
                    let avg = if old == 0 { d } else { old - old / 8 + d / 8 };
                    self.job_ns.store(avg, Ordering::Relaxed);
                }
                if let Some(p) = p {
                    st.prepared.insert(job.iv, p);
                }
                None
            }
            _ => p,
        };
        drop(m);
        if config().wait_inflight || self.waiters.load(Ordering::Acquire) > 0 {
            // After the change, made under the lock `wait_settled` checks under.
            self.settled.notify_all();
        }
        if let Some(p) = keep {
            Stats::add(&stats().jobs_dropped, 1);
            crate::workers::workers().recycle(p.ct);
        }
    }

    fn recycle_state(&self, mut st: CtxState) {
        for (_, p) in st.prepared.drain() {
            crate::workers::workers().recycle(p.ct);
        }
        if let Msg::Hit { prepared, .. } = std::mem::replace(&mut st.msg, Msg::Idle) {
            crate::workers::workers().recycle(prepared.ct);
        }
    }
}

/// Queues chunks for the workers, which run them through `Engine::run`.
fn submit(jobs: Vec<Job>) {
    crate::workers::workers().submit(jobs, |job| engine().run(job));
}

/// Decrements a counter when dropped (see `wait_settled`).
struct Uncount<'a>(&'a AtomicUsize);

impl Drop for Uncount<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiesce_returns_once_every_submitted_chunk_is_settled() {
        let w = crate::workers::workers();
        if !w.any_started() {
            assert!(
                w.quiesce(Duration::ZERO),
                "nothing submitted yet: quiet at once"
            );
        }
        let src = vec![3u8; 1 << 20];
        let key = Arc::new(AeadKey::new(&[7u8; 32]).unwrap());
        let (done, dropped) = (
            stats().jobs_done.load(Ordering::Relaxed),
            stats().jobs_dropped.load(Ordering::Relaxed),
        );
        // For a context nobody tracks: each chunk is encrypted, then thrown away at settle.
        let jobs = (0..6u8)
            .map(|i| Job {
                ctx: usize::MAX - i as usize,
                gen: 0,
                key: key.clone(),
                iv: [i; 12],
                input: src.as_ptr() as usize,
                len: src.len(),
            })
            .collect();
        submit(jobs);
        assert!(w.quiesce(Duration::from_secs(120)), "workers still busy");
        assert!(stats().jobs_done.load(Ordering::Relaxed) - done >= 6);
        assert!(stats().jobs_dropped.load(Ordering::Relaxed) - dropped >= 6);
        assert_eq!(w.queued(), 0);
        assert_eq!(crate::exports::pipellm_cc_quiesce(-1), -1);
        assert_eq!(crate::exports::pipellm_cc_quiesce(1000), 0);
    }
}
