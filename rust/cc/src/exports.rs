//! The EVP functions we export in place of libcrypto's, and our own C API.
//!
//! Every hook follows the same rules:
//! - if the real library could not be loaded, the call fails (returns 0, OpenSSL's error
//!   value) rather than crashing: nothing else is safe;
//! - calls made *by* the real library into these names (libcrypto calls some of its own
//!   EVP functions through its PLT, which resolves to us) are forwarded untouched, as are all
//!   calls in a forked child and all calls when `PIPELLM_CC_DISABLE=1`;
//! - our own bookkeeping runs under `catch_unwind`: a panic is counted and the call is
//!   forwarded, never unwound into C;
//! - before forwarding a call on a context that holds a served (hit) message, the real
//!   context is brought up to date (`resync`), so its answers stay OpenSSL's.
//!
//! Each hook is defined as `pipellm_<name>`; the `pipellm-cc-shim` cdylib binds it to
//! `<name>@@OPENSSL_3.0.0` with `.symver` (a version node only a shared library can carry, so
//! it is not done here, where tests and examples link this crate into executables).

use crate::config::{config, log};
use crate::d2h;
use crate::engine::{engine, Decision, Engine, InitChange, TAG_LEN};
use crate::real::{real, Cipher, Ctx, Engine as EngineHandle, Real};
use std::cell::Cell;
use std::ffi::{c_char, c_int, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use zeroize::Zeroize;

const NID_AES_256_GCM: c_int = 901;
const CTRL_SET_IVLEN: c_int = 0x9;
const CTRL_GET_TAG: c_int = 0x10;
const CTRL_SET_TAG: c_int = 0x11;
const CTRL_GET_IVLEN: c_int = 0x25;
const CTRL_GET_TAGLEN: c_int = 0x26;

thread_local! {
    static IN_REAL: Cell<bool> = const { Cell::new(false) };
}

static FORKED: AtomicBool = AtomicBool::new(false);
static ATFORK: std::sync::Once = std::sync::Once::new();
static LOAD_LOGGED: std::sync::Once = std::sync::Once::new();

extern "C" fn in_child_after_fork() {
    // The child has our state but not our worker threads, and a lock may have been held
    // at the fork: it forwards everything from now on.
    FORKED.store(true, Ordering::Relaxed);
}

extern "C" fn report_at_exit() {
    let snap = engine().stats.snapshot();
    let line: Vec<String> = crate::stats::NAMES
        .iter()
        .zip(snap)
        .map(|(n, v)| format!("{n}={v}"))
        .collect();
    log(format_args!("stats {}", line.join(" ")));
}

/// True if this call should only be forwarded.
fn passthrough() -> bool {
    ATFORK.call_once(|| {
        // SAFETY: registering plain extern "C" fns with no preconditions.
        unsafe {
            libc::pthread_atfork(None, None, Some(in_child_after_fork));
            if config().log {
                libc::atexit(report_at_exit);
            }
        }
    });
    config().disabled
        || FORKED.load(Ordering::Relaxed)
        || IN_REAL.try_with(|c| c.get()).unwrap_or(true)
}

/// Calls into the real library with the re-entry flag set.
fn forward<R>(f: impl FnOnce() -> R) -> R {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            let _ = IN_REAL.try_with(|c| c.set(self.0));
        }
    }
    let prev = IN_REAL.try_with(|c| c.replace(true)).unwrap_or(true);
    let _reset = Reset(prev);
    f()
}

fn with_real() -> Option<&'static Real> {
    match real() {
        Ok(r) => {
            LOAD_LOGGED.call_once(|| log(format_args!("forwarding to {}", r.path)));
            Some(r)
        }
        Err(e) => {
            LOAD_LOGGED.call_once(|| eprintln!("pipellm-cc: {}", e.0));
            None
        }
    }
}

/// Runs our bookkeeping; a panic is counted and reported as `None`.
fn guarded<R>(f: impl FnOnce() -> R) -> Option<R> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => Some(r),
        Err(_) => {
            crate::stats::Stats::add(&engine().stats.panics, 1);
            None
        }
    }
}

/// Brings the real context up to date with whatever we answered for it (a served H2D
/// message, a deferred D2H one) before it is used.
fn resync(r: &Real, ctx: Ctx) {
    resync_hit(r, ctx);
    resync_d2h(r, ctx);
}

/// A deferred D2H message: the real context decrypts the snapshot in place (its output then
/// is exactly what it would have written had it seen the Update), and the destination opens.
fn resync_d2h(r: &Real, ctx: Ctx) {
    let Some(Some(rs)) = guarded(|| d2h::take_for_resync(ctx as usize)) else {
        return;
    };
    let mut n: c_int = 0;
    // SAFETY: ctx is the caller's live context; the alias holds `len` bytes of ciphertext,
    // ours (sealed) until `finish`; in-place decryption is allowed by OpenSSL; len came from
    // a c_int.
    forward(|| unsafe {
        (r.decrypt_update)(ctx, rs.alias(), &mut n, rs.alias(), rs.bytes() as c_int)
    });
    rs.finish();
}

/// Brings the real context up to date with a message we served, before it is used.
fn resync_hit(r: &Real, ctx: Ctx) {
    let Some(Some(rs)) = guarded(|| engine().take_hit_for_resync(ctx as usize)) else {
        return;
    };
    let len = rs.prepared.len;
    let mut plain = vec![0u8; len];
    let opened = rs
        .key
        .open_private(&rs.iv, &[], &rs.prepared.ct, &rs.prepared.tag, &mut plain);
    if opened.is_ok() {
        let mut scratch = vec![0u8; len + 16];
        let mut n: c_int = 0;
        forward(|| {
            // SAFETY: ctx is the caller's live context; iv is 12 bytes; plain and scratch
            // are our buffers of the lengths passed (GCM writes exactly what it reads).
            unsafe {
                (r.encrypt_init_ex)(
                    ctx,
                    std::ptr::null(),
                    std::ptr::null_mut(),
                    std::ptr::null(),
                    rs.iv.as_ptr(),
                );
                (r.encrypt_update)(
                    ctx,
                    scratch.as_mut_ptr(),
                    &mut n,
                    plain.as_ptr(),
                    len as c_int,
                );
                if rs.finalized {
                    (r.encrypt_final_ex)(ctx, scratch.as_mut_ptr(), &mut n);
                }
            }
        });
    }
    plain.zeroize();
    engine().recycle_prepared(rs.prepared);
}

fn cipher_ok(r: &Real, cipher: Cipher, impl_: EngineHandle) -> Option<bool> {
    if cipher.is_null() {
        return None;
    }
    // SAFETY: a non-null cipher the caller passed to an init call, as OpenSSL requires.
    let nid = forward(|| unsafe { (r.cipher_get_nid)(cipher) });
    Some(nid == NID_AES_256_GCM && impl_.is_null())
}

fn read_key(key: *const u8) -> Option<[u8; 32]> {
    if key.is_null() {
        return None;
    }
    let mut k = [0u8; 32];
    // SAFETY: for AES-256-GCM (the only cipher we track) the key is 32 readable bytes.
    unsafe { std::ptr::copy_nonoverlapping(key, k.as_mut_ptr(), 32) };
    Some(k)
}

fn read_iv(iv: *const u8) -> Option<[u8; 12]> {
    if iv.is_null() {
        return None;
    }
    let mut v = [0u8; 12];
    // SAFETY: with the default (12-byte) IV length, which a tracked context has, the IV
    // argument is 12 readable bytes.
    unsafe { std::ptr::copy_nonoverlapping(iv, v.as_mut_ptr(), 12) };
    Some(v)
}

/// Common part of every init hook, after the real call succeeded: reads what the call set
/// (key and IV only for AES-256-GCM, whose lengths we know) and hands it to `record`; the
/// key copy is wiped afterwards.
fn read_init(
    r: &Real,
    cipher: Cipher,
    impl_: EngineHandle,
    key: *const u8,
    iv: *const u8,
    record: impl FnOnce(Option<bool>, Option<&[u8; 32]>, Option<[u8; 12]>),
) {
    guarded(|| {
        let ok = cipher_ok(r, cipher, impl_);
        let tracked_cipher = ok.unwrap_or(true);
        let mut k = if tracked_cipher { read_key(key) } else { None };
        let v = if tracked_cipher { read_iv(iv) } else { None };
        record(ok, k.as_ref(), v);
        k.zeroize();
    });
}

// ---- init ---------------------------------------------------------------------------------

/// An init hook: forward, then (on success) record what changed (cipher, ENGINE or null,
/// key, IV): for the encrypting side if `$follow` holds (an encrypting init we can model),
/// for the decrypting side (`d2h`) if `$dfollow` does; each side not followed stops
/// following the context.
macro_rules! init_hook {
    ($name:ident, $field:ident, ($($arg:ident: $ty:ty),*), follow: $follow:expr,
     dfollow: $dfollow:expr, record: ($cipher:expr, $impl_:expr, $key:expr, $iv:expr)) => {
        /// # Safety
        /// OpenSSL's contract for the function of the same name without the prefix.
        #[no_mangle]
        pub unsafe extern "C" fn $name(ctx: Ctx, $($arg: $ty),*) -> c_int {
            let Some(r) = with_real() else { return 0 };
            // SAFETY: forwarding the caller's arguments unchanged.
            let call = || forward(|| unsafe { (r.$field)(ctx, $($arg),*) });
            if passthrough() {
                return call();
            }
            resync(r, ctx);
            let rc = call();
            if rc == 1 && $follow {
                read_init(r, $cipher, $impl_, $key, $iv, |cipher_ok, key, iv| {
                    let change = InitChange { cipher_ok, key, iv };
                    engine().on_init(ctx as usize, change)
                });
            } else {
                guarded(|| engine().untrack(ctx as usize));
            }
            if rc == 1 && $dfollow {
                read_init(r, $cipher, $impl_, $key, $iv, |cipher_ok, key, iv| {
                    d2h::on_init(ctx as usize, d2h::DecInit { cipher_ok, key, iv })
                });
            } else {
                guarded(|| d2h::forget(ctx as usize));
            }
            rc
        }
    };
}

init_hook!(pipellm_EVP_EncryptInit_ex, encrypt_init_ex,
    (cipher: Cipher, impl_: EngineHandle, key: *const u8, iv: *const u8),
    follow: true, dfollow: false, record: (cipher, impl_, key, iv));
init_hook!(pipellm_EVP_EncryptInit, encrypt_init,
    (cipher: Cipher, key: *const u8, iv: *const u8),
    follow: true, dfollow: false, record: (cipher, std::ptr::null_mut(), key, iv));
// Parameters may change IV or tag length: a context initialised with some is not modelled.
init_hook!(pipellm_EVP_EncryptInit_ex2, encrypt_init_ex2,
    (cipher: Cipher, key: *const u8, iv: *const u8, params: *const c_void),
    follow: params.is_null(), dfollow: false, record: (cipher, std::ptr::null_mut(), key, iv));
init_hook!(pipellm_EVP_DecryptInit_ex, decrypt_init_ex,
    (cipher: Cipher, impl_: EngineHandle, key: *const u8, iv: *const u8),
    follow: false, dfollow: true, record: (cipher, impl_, key, iv));
init_hook!(pipellm_EVP_DecryptInit, decrypt_init,
    (cipher: Cipher, key: *const u8, iv: *const u8),
    follow: false, dfollow: true, record: (cipher, std::ptr::null_mut(), key, iv));
init_hook!(pipellm_EVP_DecryptInit_ex2, decrypt_init_ex2,
    (cipher: Cipher, key: *const u8, iv: *const u8, params: *const c_void),
    follow: false, dfollow: params.is_null(), record: (cipher, std::ptr::null_mut(), key, iv));
// enc = 1 encrypts, 0 decrypts; -1 keeps a direction we may not know: forwarded only.
init_hook!(pipellm_EVP_CipherInit_ex, cipher_init_ex,
    (cipher: Cipher, impl_: EngineHandle, key: *const u8, iv: *const u8, enc: c_int),
    follow: enc == 1, dfollow: enc == 0, record: (cipher, impl_, key, iv));
init_hook!(pipellm_EVP_CipherInit, cipher_init,
    (cipher: Cipher, key: *const u8, iv: *const u8, enc: c_int),
    follow: enc == 1, dfollow: enc == 0, record: (cipher, std::ptr::null_mut(), key, iv));
init_hook!(pipellm_EVP_CipherInit_ex2, cipher_init_ex2,
    (cipher: Cipher, key: *const u8, iv: *const u8, enc: c_int, params: *const c_void),
    follow: enc == 1 && params.is_null(), dfollow: enc == 0 && params.is_null(),
    record: (cipher, std::ptr::null_mut(), key, iv));

/// A hook for calls we only forward: bring the real context up to date with a message we
/// served (`resync`), forward, then tell the engine what the call did (`after`: stop following
/// the context, stop following its current message, or nothing).
macro_rules! forwarding_hook {
    ($name:ident, $field:ident, ($($arg:ident: $ty:ty),*), after: $after:expr) => {
        /// # Safety
        /// OpenSSL's contract for the function of the same name without the prefix.
        #[no_mangle]
        pub unsafe extern "C" fn $name(ctx: Ctx, $($arg: $ty),*) -> c_int {
            let Some(r) = with_real() else { return 0 };
            let follow = !passthrough();
            if follow {
                resync(r, ctx);
            }
            // SAFETY: forwarding the caller's arguments unchanged.
            let rc = forward(|| unsafe { (r.$field)(ctx, $($arg),*) });
            if follow {
                let after: fn(&Engine, usize) = $after;
                guarded(|| after(engine(), ctx as usize));
            }
            rc
        }
    };
}

/// The context leaves what we model (parameter or key-length changes): forwarded from now
/// on, on both sides.
const UNTRACK: fn(&Engine, usize) = |e, ctx| {
    e.untrack(ctx);
    d2h::forget(ctx);
};
/// Only the current message leaves the driver's pattern (CipherUpdate).
const UNTRACK_MESSAGE: fn(&Engine, usize) = |e, ctx| {
    e.untrack_message(ctx);
    d2h::untrack_message(ctx);
};

// ---- update -------------------------------------------------------------------------------

/// The hit path.
///
/// # Safety
/// OpenSSL's contract for `EVP_EncryptUpdate`: `in` readable and `out` writable for `inl`
/// bytes, `outl` writable.
#[no_mangle]
pub unsafe extern "C" fn pipellm_EVP_EncryptUpdate(
    ctx: Ctx,
    out: *mut u8,
    outl: *mut c_int,
    input: *const u8,
    inl: c_int,
) -> c_int {
    let Some(r) = with_real() else { return 0 };
    // SAFETY: forwarding the caller's arguments unchanged.
    let call = || forward(|| unsafe { (r.encrypt_update)(ctx, out, outl, input, inl) });
    if passthrough() || inl <= 0 || outl.is_null() || input.is_null() {
        return call();
    }
    resync(r, ctx);
    // SAFETY: the caller's EVP_EncryptUpdate contract is try_hit's contract.
    let decision = guarded(|| unsafe { engine().try_hit(ctx as usize, out, input, inl as usize) });
    match decision {
        Some(Decision::Served) => {
            // SAFETY: outl is non-null (checked above) and writable per the contract.
            unsafe { *outl = inl };
            1
        }
        _ => call(),
    }
}

/// The D2H path: a message into a receive pool is snapshotted there and answered (see
/// `d2h`); anything else is forwarded.
///
/// # Safety
/// OpenSSL's contract for `EVP_DecryptUpdate`: `in` readable and `out` writable for `inl`
/// bytes, `outl` writable.
#[no_mangle]
pub unsafe extern "C" fn pipellm_EVP_DecryptUpdate(
    ctx: Ctx,
    out: *mut u8,
    outl: *mut c_int,
    input: *const u8,
    inl: c_int,
) -> c_int {
    let Some(r) = with_real() else { return 0 };
    // SAFETY: forwarding the caller's arguments unchanged.
    let call = || forward(|| unsafe { (r.decrypt_update)(ctx, out, outl, input, inl) });
    if passthrough() {
        return call();
    }
    resync(r, ctx);
    if inl > 0 && !outl.is_null() && !input.is_null() {
        // SAFETY: the caller's EVP_DecryptUpdate contract is try_defer's contract.
        let deferred =
            guarded(|| unsafe { d2h::try_defer(ctx as usize, out, input, inl as usize) });
        if deferred == Some(true) {
            // SAFETY: outl is non-null (checked above) and writable per the contract.
            unsafe { *outl = inl };
            return 1;
        }
    } else {
        guarded(|| d2h::untrack_message(ctx as usize));
    }
    let rc = call();
    guarded(|| engine().untrack_message(ctx as usize));
    rc
}
forwarding_hook!(pipellm_EVP_CipherUpdate, cipher_update,
    (out: *mut u8, outl: *mut c_int, input: *const u8, inl: c_int), after: UNTRACK_MESSAGE);

// ---- final --------------------------------------------------------------------------------

macro_rules! encrypt_final {
    ($name:ident, $field:ident) => {
        /// # Safety
        /// OpenSSL's contract for the function of the same name without the prefix.
        #[no_mangle]
        pub unsafe extern "C" fn $name(ctx: Ctx, out: *mut u8, outl: *mut c_int) -> c_int {
            let Some(r) = with_real() else { return 0 };
            if !passthrough() && !outl.is_null() {
                if let Some(true) = guarded(|| engine().on_final(ctx as usize)) {
                    // GCM emits nothing at final; the tag is kept for GET_TAG.
                    // SAFETY: outl is non-null and writable per the contract.
                    unsafe { *outl = 0 };
                    return 1;
                }
                resync(r, ctx);
            }
            // SAFETY: forwarding the caller's arguments unchanged.
            forward(|| unsafe { (r.$field)(ctx, out, outl) })
        }
    };
}

encrypt_final!(pipellm_EVP_EncryptFinal_ex, encrypt_final_ex);
encrypt_final!(pipellm_EVP_EncryptFinal, encrypt_final);
encrypt_final!(pipellm_EVP_CipherFinal_ex, cipher_final_ex);
encrypt_final!(pipellm_EVP_CipherFinal, cipher_final);

/// A decrypting final: a deferred message gets its tag checked here, synchronously (the
/// answer is the tag's); a forwarded one may confirm its context's key.
macro_rules! decrypt_final {
    ($name:ident, $field:ident) => {
        /// # Safety
        /// OpenSSL's contract for the function of the same name without the prefix.
        #[no_mangle]
        pub unsafe extern "C" fn $name(ctx: Ctx, out: *mut u8, outl: *mut c_int) -> c_int {
            let Some(r) = with_real() else { return 0 };
            // SAFETY: forwarding the caller's arguments unchanged.
            let call = || forward(|| unsafe { (r.$field)(ctx, out, outl) });
            if passthrough() {
                return call();
            }
            let answer = match guarded(|| d2h::on_final(ctx as usize)) {
                Some(Some(d2h::FinalOutcome::Verified)) => Some(1),
                Some(Some(d2h::FinalOutcome::Rejected)) => Some(0),
                _ => None,
            };
            if let Some(rc) = answer {
                if !outl.is_null() {
                    // SAFETY: non-null and writable per the contract; GCM emits nothing at
                    // final.
                    unsafe { *outl = 0 };
                }
                return rc;
            }
            resync(r, ctx);
            let rc = call();
            // SAFETY: the message's output is the driver's destination, read right after
            // its own Final (see `after_real_final`).
            guarded(|| unsafe { d2h::after_real_final(ctx as usize, rc == 1) });
            rc
        }
    };
}

decrypt_final!(pipellm_EVP_DecryptFinal_ex, decrypt_final_ex);
decrypt_final!(pipellm_EVP_DecryptFinal, decrypt_final);

// ---- ctrl and context life ----------------------------------------------------------------

/// # Safety
/// OpenSSL's contract for `EVP_CIPHER_CTX_ctrl`.
#[no_mangle]
pub unsafe extern "C" fn pipellm_EVP_CIPHER_CTX_ctrl(
    ctx: Ctx,
    type_: c_int,
    arg: c_int,
    ptr: *mut c_void,
) -> c_int {
    let Some(r) = with_real() else { return 0 };
    // SAFETY: forwarding the caller's arguments unchanged.
    let call = || forward(|| unsafe { (r.ctx_ctrl)(ctx, type_, arg, ptr) });
    if passthrough() {
        return call();
    }
    if type_ == CTRL_GET_TAG && arg == TAG_LEN as c_int && !ptr.is_null() {
        if let Some(Some(tag)) = guarded(|| engine().hit_tag(ctx as usize)) {
            // SAFETY: GET_TAG with arg 16 means ptr is 16 writable bytes.
            unsafe { std::ptr::copy_nonoverlapping(tag.as_ptr(), ptr.cast::<u8>(), TAG_LEN) };
            return 1;
        }
        resync(r, ctx);
        let rc = call();
        if rc == 1 {
            let mut tag = [0u8; TAG_LEN];
            // SAFETY: the real call just wrote 16 bytes at ptr.
            unsafe { std::ptr::copy_nonoverlapping(ptr.cast::<u8>(), tag.as_mut_ptr(), TAG_LEN) };
            // SAFETY: the message's input and output are the driver's live buffers, read
            // right after its GET_TAG (see `after_real_tag`).
            guarded(|| unsafe { engine().after_real_tag(ctx as usize, &tag) });
        }
        return rc;
    }
    if type_ == CTRL_SET_TAG && arg == TAG_LEN as c_int && !ptr.is_null() {
        // Recorded for a deferred message's tag check; no resync needed (the real context
        // takes the tag whatever it has seen).
        resync_hit(r, ctx);
        let rc = call();
        if rc == 1 {
            let mut tag = [0u8; TAG_LEN];
            // SAFETY: SET_TAG with arg 16 means ptr is 16 readable bytes.
            unsafe { std::ptr::copy_nonoverlapping(ptr.cast::<u8>(), tag.as_mut_ptr(), TAG_LEN) };
            guarded(|| d2h::on_set_tag(ctx as usize, &tag));
        }
        guarded(|| engine().untrack(ctx as usize));
        return rc;
    }
    resync(r, ctx);
    let rc = call();
    let harmless =
        matches!(type_, CTRL_GET_IVLEN | CTRL_GET_TAGLEN) || (type_ == CTRL_SET_IVLEN && arg == 12);
    if !harmless {
        guarded(|| engine().untrack(ctx as usize));
        guarded(|| d2h::forget(ctx as usize));
    }
    rc
}

/// # Safety
/// OpenSSL's contract for `EVP_CIPHER_CTX_free`.
#[no_mangle]
pub unsafe extern "C" fn pipellm_EVP_CIPHER_CTX_free(ctx: Ctx) {
    let Some(r) = with_real() else { return };
    if !passthrough() {
        // A deferred D2H message opens with what OpenSSL would have left there.
        resync_d2h(r, ctx);
        guarded(|| d2h::forget(ctx as usize));
        guarded(|| engine().forget(ctx as usize));
    }
    // SAFETY: forwarding the caller's argument unchanged.
    forward(|| unsafe { (r.ctx_free)(ctx) })
}

/// # Safety
/// OpenSSL's contract for `EVP_CIPHER_CTX_reset`.
#[no_mangle]
pub unsafe extern "C" fn pipellm_EVP_CIPHER_CTX_reset(ctx: Ctx) -> c_int {
    let Some(r) = with_real() else { return 0 };
    if !passthrough() {
        resync_d2h(r, ctx);
        guarded(|| d2h::forget(ctx as usize));
        guarded(|| engine().forget(ctx as usize));
    }
    // SAFETY: forwarding the caller's argument unchanged.
    forward(|| unsafe { (r.ctx_reset)(ctx) })
}

/// # Safety
/// OpenSSL's contract for `EVP_CIPHER_CTX_copy`.
#[no_mangle]
pub unsafe extern "C" fn pipellm_EVP_CIPHER_CTX_copy(out: Ctx, input: Ctx) -> c_int {
    let Some(r) = with_real() else { return 0 };
    if !passthrough() {
        resync(r, input);
        // The copy is not followed (it has no key we saw being set).
        resync_d2h(r, out);
        guarded(|| d2h::forget(out as usize));
        guarded(|| engine().forget(out as usize));
    }
    // SAFETY: forwarding the caller's arguments unchanged.
    forward(|| unsafe { (r.ctx_copy)(out, input) })
}

forwarding_hook!(pipellm_EVP_CIPHER_CTX_set_params, ctx_set_params,
    (params: *const c_void), after: UNTRACK);
forwarding_hook!(pipellm_EVP_CIPHER_CTX_set_key_length, ctx_set_key_length,
    (len: c_int), after: UNTRACK);

// ---- our own API --------------------------------------------------------------------------

/// 1: the interposer is loaded and will act; 0: loaded but inert (disabled, or the real
/// libcrypto is missing). For `pipellm doctor` and `pipellm.cc.status()`.
#[no_mangle]
pub extern "C" fn pipellm_cc_active() -> c_int {
    (!config().disabled && real().is_ok()) as c_int
}

/// Copies up to `n` counters into `out` (names: `pipellm_cc_stat_name`); returns how many
/// counters exist.
///
/// # Safety
/// `out` must be writable for `n` u64 values (or null with n = 0).
#[no_mangle]
pub unsafe extern "C" fn pipellm_cc_stats(out: *mut u64, n: usize) -> usize {
    let snap = engine().stats.snapshot();
    if !out.is_null() {
        for (i, v) in snap.iter().take(n).enumerate() {
            // SAFETY: i < n, and the caller guarantees n writable values.
            unsafe { *out.add(i) = *v };
        }
    }
    snap.len()
}

/// The name of counter `i` (a static NUL-terminated string), or null.
#[no_mangle]
pub extern "C" fn pipellm_cc_stat_name(i: usize) -> *const c_char {
    static NAMES: std::sync::OnceLock<Vec<std::ffi::CString>> = std::sync::OnceLock::new();
    let names = NAMES.get_or_init(|| {
        crate::stats::NAMES
            .iter()
            .map(|s| std::ffi::CString::new(*s).expect("no NUL"))
            .collect()
    });
    names.get(i).map_or(std::ptr::null(), |c| c.as_ptr())
}

/// Registers `[ptr, ptr + len)` as watched: chunks the driver encrypts from inside it are
/// validated by page protection (a hit then only copies the ciphertext; see `watched`).
/// Returns 0, or -1 (empty or wrapping range), -2 (overlaps a registered range), -3 (too
/// many ranges), -4 (internal error).
///
/// # Safety
/// The range must stay mapped, and be written only by this process's user-space code (not
/// by `read(2)`, not by a device), until `pipellm_cc_unwatch(ptr)` returns. Its pages are
/// read-only meanwhile: the first write to a chunk after it was encrypted takes one page
/// fault (handled: the write goes through).
// SAFETY: an `unsafe fn` for the contract in `# Safety` above, which its (C) callers keep.
#[no_mangle]
pub unsafe extern "C" fn pipellm_cc_watch(ptr: *const c_void, len: usize) -> c_int {
    use crate::watched::WatchError;
    // SAFETY: the caller's promise above is the one `watched::watch` needs.
    match std::panic::catch_unwind(|| unsafe { crate::watched::watch(ptr as usize, len) }) {
        Ok(Ok(())) => 0,
        Ok(Err(WatchError::Empty)) => -1,
        Ok(Err(WatchError::Overlaps)) => -2,
        Ok(Err(WatchError::Full)) => -3,
        Err(_) => -4,
    }
}

/// Unregisters the watched range that starts at `ptr`; its pages are writable again when
/// this returns. Returns 0, or -1 if no range starts there, -4 (internal error).
#[no_mangle]
pub extern "C" fn pipellm_cc_unwatch(ptr: *const c_void) -> c_int {
    match std::panic::catch_unwind(|| crate::watched::unwatch(ptr as usize)) {
        Ok(true) => 0,
        Ok(false) => -1,
        Err(_) => -4,
    }
}

/// Registers a receive pool: `view` and `alias` are two mappings of the same `len` bytes
/// (page-aligned); D2H chunks the driver decrypts into the view are answered after a
/// synchronous tag check and decrypted later through the alias, the view's pages
/// inaccessible (a reader waits) until then (see `d2h`). Returns 0, or -1 (empty, wrapping,
/// unaligned or self-overlapping), -2 (overlaps a pool or a watched range), -3 (too many
/// pools), -4 (internal error), -5 (not a mapping we may advise).
///
/// # Safety
/// `view` and `alias` must map the same memory read-write and stay mapped until
/// `pipellm_cc_unreceive(view)` returns 0; nothing else may change the view's protection
/// meanwhile, and nothing else may write the alias while a chunk is decrypted into it.
// SAFETY: an `unsafe fn` for the contract in `# Safety` above, which its (C) callers keep.
#[no_mangle]
pub unsafe extern "C" fn pipellm_cc_receive(
    view: *mut c_void,
    alias: *mut c_void,
    len: usize,
) -> c_int {
    use crate::d2h::ReceiveError;
    // SAFETY: the caller's promise above is the one `d2h::receive` needs.
    let r =
        std::panic::catch_unwind(|| unsafe { d2h::receive(view as usize, alias as usize, len) });
    match r {
        Ok(Ok(())) => 0,
        Ok(Err(ReceiveError::BadRange)) => -1,
        Ok(Err(ReceiveError::Overlaps)) => -2,
        Ok(Err(ReceiveError::Full)) => -3,
        Ok(Err(ReceiveError::NotMapped)) => -5,
        Err(_) => -4,
    }
}

/// Unregisters the receive pool whose view starts at `view`, once every chunk decrypted
/// into it is in place. Returns 0, or -1 (no such pool), -6 (a chunk into it is between its
/// Update and its Final: try again), -4 (internal error).
#[no_mangle]
pub extern "C" fn pipellm_cc_unreceive(view: *const c_void) -> c_int {
    use crate::d2h::UnreceiveError;
    match std::panic::catch_unwind(|| d2h::unreceive(view as usize)) {
        Ok(Ok(())) => 0,
        Ok(Err(UnreceiveError::NotFound)) => -1,
        Ok(Err(UnreceiveError::Busy)) => -6,
        Err(_) => -4,
    }
}

/// Waits until the pre-encryption workers have nothing left to do: no chunk queued and every
/// started worker waiting for work, so every chunk predicted before the call is ready (or
/// dropped). A test aid: the driver emulator calls it where a test needs "the workers got
/// there first", instead of sleeping and hoping. D2H decryption threads are not waited for.
/// Returns 0, or -1 (`timeout_ms` negative), -6 (still busy after `timeout_ms`
/// milliseconds), -4 (internal error). In a forked child (no workers there) it returns 0.
#[no_mangle]
pub extern "C" fn pipellm_cc_quiesce(timeout_ms: c_int) -> c_int {
    let Ok(ms) = u64::try_from(timeout_ms) else {
        return -1;
    };
    if FORKED.load(Ordering::Relaxed) {
        return 0; // the workers were not forked with us: nothing runs here
    }
    let timeout = std::time::Duration::from_millis(ms);
    match std::panic::catch_unwind(|| engine().quiesce(timeout)) {
        Ok(true) => 0,
        Ok(false) => -6,
        Err(_) => -4,
    }
}

/// Path of the real libcrypto in use (static string), or null if none could be loaded.
#[no_mangle]
pub extern "C" fn pipellm_cc_real_path() -> *const c_char {
    static PATH: std::sync::OnceLock<Option<std::ffi::CString>> = std::sync::OnceLock::new();
    PATH.get_or_init(|| {
        real()
            .ok()
            .and_then(|r| std::ffi::CString::new(r.path.clone()).ok())
    })
    .as_ref()
    .map_or(std::ptr::null(), |c| c.as_ptr())
}
