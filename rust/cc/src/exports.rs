//! The EVP functions we export in place of libcrypto's, and our own C API.
//!
//! Every hook follows the same rules:
//! - if the real library could not be loaded, the call fails (returns 0, OpenSSL's error
//!   value) rather than crashing: nothing else is safe;
//! - calls made *by* the real library into these names (libcrypto calls some of its own
//!   EVP functions through its PLT, which resolves to us) are forwarded untouched, as are all
//!   calls when `PIPELLM_CC_DISABLE=1`; in a forked child nothing new is served or
//!   pre-encrypted and D2H calls are forwarded, but a served message the child inherited is
//!   still answered and replayed as in the parent (see `process::enter_child`);
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

static ATFORK: std::sync::Once = std::sync::Once::new();
static LOAD_LOGGED: std::sync::Once = std::sync::Once::new();

/// The locks held by the forking thread from `before_fork` to the handler that runs after
/// it in the parent or the child, in the lock order (docs/architecture.md): the engine's
/// contexts, the watched ranges, the write tracker's. Released in field order.
struct HeldForFork {
    _ctxs:
        std::sync::MutexGuard<'static, std::collections::HashMap<usize, crate::engine::CtxState>>,
    _ranges: crate::watch_ranges::ForkHold,
    _tracker: pipellm_core::writeguard::ForkHold,
}

thread_local! {
    static HELD_FOR_FORK: std::cell::RefCell<Option<HeldForFork>> =
        const { std::cell::RefCell::new(None) };
}

extern "C" fn before_fork() {
    // No other thread is inside the contexts' table at the fork, so the child inherits it
    // consistent and can keep answering for messages it holds (a served message the real
    // context has not seen must be replayed there too, or the child's tag is wrong). No
    // worker is inside the watched ranges or the write tracker either (a worker arms a
    // chunk's watch there before it reads the chunk): the child's unwatch takes both.
    let held = || HeldForFork {
        _ctxs: engine().lock_for_fork(),
        _ranges: crate::watch_ranges::hold_for_fork(),
        _tracker: pipellm_core::writeguard::hold_for_fork(),
    };
    let _ = HELD_FOR_FORK.try_with(|h| *h.borrow_mut() = Some(held()));
}

extern "C" fn after_fork_in_parent() {
    let _ = HELD_FOR_FORK.try_with(|h| h.borrow_mut().take());
}

extern "C" fn in_child_after_fork() {
    // The child has our state but not our threads, and what they had in hand never completes
    // there: where any had started, the child serves nothing new, plans nothing and forwards
    // D2H calls from now on (`process::enter_child`).
    crate::process::enter_child();
    let _ = HELD_FOR_FORK.try_with(|h| h.borrow_mut().take());
}

extern "C" fn report_at_exit() {
    // Read here, not when the hook went in: the settings are read at their first use, and
    // the library's constructor comes before the program's own code.
    if !config().log {
        return;
    }
    let snap = crate::stats::stats().snapshot();
    let line: Vec<String> = crate::stats::NAMES
        .iter()
        .zip(snap)
        .map(|(n, v)| format!("{n}={v}"))
        .collect();
    log(format_args!("stats {}", line.join(" ")));
}

/// Registers the fork handlers (and the exit report), once: when the library is loaded (the
/// shim's constructor), since the extension may use this copy's address-space table
/// (`pipellm_core::space`) before any hooked call, and a fork must never leave it held;
/// again (a no-op then) at the first hooked call and registration of memory.
pub fn install_process_hooks() {
    ATFORK.call_once(|| {
        // SAFETY: registering plain extern "C" fns with no preconditions.
        unsafe {
            libc::pthread_atfork(
                Some(before_fork),
                Some(after_fork_in_parent),
                Some(in_child_after_fork),
            );
            libc::atexit(report_at_exit);
        }
    });
}

/// True if this call should only be forwarded.
fn passthrough() -> bool {
    install_process_hooks();
    config().disabled || IN_REAL.try_with(|c| c.get()).unwrap_or(true)
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
            crate::stats::Stats::add(&crate::stats::stats().panics, 1);
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
    // ours (gated) until `finish`; in-place decryption is allowed by OpenSSL; len came from
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

/// Whether the real context, after an init that succeeded, holds AES-256-GCM with a 32-byte
/// key and a 12-byte IV. Read back from the context rather than assumed from the call's
/// arguments: an init without a cipher uses the context's, whose key and IV lengths may be
/// anything (a 16-byte key, an 8-byte IV after SET_IVLEN), and reading 32 or 12 bytes of such
/// an argument would read memory the caller did not hand over.
fn holds_aes_256_gcm(r: &Real, ctx: Ctx) -> bool {
    // SAFETY: ctx is the caller's live context, just initialised by the real library; these
    // accessors only read it (and return 0 or null when nothing is set).
    forward(|| unsafe {
        let c = (r.ctx_get0_cipher)(ctx);
        !c.is_null()
            && (r.cipher_get_nid)(c) == NID_AES_256_GCM
            && (r.ctx_get_key_length)(ctx) == 32
            && (r.ctx_get_iv_length)(ctx) == 12
    })
}

fn read_key(key: *const u8) -> Option<[u8; 32]> {
    if key.is_null() {
        return None;
    }
    let mut k = [0u8; 32];
    // SAFETY: called only when the context holds AES-256-GCM with a 32-byte key
    // (`holds_aes_256_gcm`): the real init just read these 32 bytes.
    unsafe { std::ptr::copy_nonoverlapping(key, k.as_mut_ptr(), 32) };
    Some(k)
}

fn read_iv(iv: *const u8) -> Option<[u8; 12]> {
    if iv.is_null() {
        return None;
    }
    let mut v = [0u8; 12];
    // SAFETY: called only when the context's IV length is 12 (`holds_aes_256_gcm`): the real
    // init just read these 12 bytes.
    unsafe { std::ptr::copy_nonoverlapping(iv, v.as_mut_ptr(), 12) };
    Some(v)
}

/// Common part of every init hook, after the real call succeeded: reads what the call set
/// (key and IV only when the context now holds AES-256-GCM with the lengths we model) and
/// hands it to `record`, with `Some(followable)` when the call named a cipher (AES-256-GCM on
/// the default engine) and `None` when it kept the context's; the key copy is wiped
/// afterwards.
fn read_init(
    r: &Real,
    ctx: Ctx,
    cipher: Cipher,
    impl_: EngineHandle,
    key: *const u8,
    iv: *const u8,
    record: impl FnOnce(Option<bool>, Option<&[u8; 32]>, Option<[u8; 12]>),
) {
    guarded(|| {
        let gcm = holds_aes_256_gcm(r, ctx);
        let ok = (!cipher.is_null()).then_some(gcm && impl_.is_null());
        let mut k = if gcm { read_key(key) } else { None };
        let v = if gcm { read_iv(iv) } else { None };
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
            // An encrypting init that sets an IV starts a new message: a served message the
            // real context has not seen needs no replay (the engine keeps its tag, which
            // OpenSSL's context would still hold). Any other init first brings the real
            // context up to date, so that what it keeps is OpenSSL's.
            let starts_message = $follow && !$iv.is_null();
            if starts_message {
                resync_d2h(r, ctx);
            } else {
                resync(r, ctx);
            }
            let rc = call();
            if rc != 1 && starts_message {
                // A failed init leaves the context as it was (OpenSSL checks before it
                // changes anything): the served message is still its current one.
                resync(r, ctx);
            }
            if rc == 1 && $follow {
                read_init(r, ctx, $cipher, $impl_, $key, $iv, |cipher_ok, key, iv| {
                    let change = InitChange { cipher_ok, key, iv };
                    engine().on_init(ctx as usize, change)
                });
            } else if rc == 1 && !$cipher.is_null() {
                // An init naming a cipher resets the context in OpenSSL (key, last tag,
                // message), whatever its direction: nothing we kept for it holds any more.
                guarded(|| engine().forget(ctx as usize));
            } else {
                guarded(|| engine().untrack(ctx as usize));
            }
            if rc == 1 && $dfollow {
                read_init(r, ctx, $cipher, $impl_, $key, $iv, |cipher_ok, key, iv| {
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
    if passthrough() {
        return call();
    }
    // Any Update after a served message (a second one, or one after its Final) is the real
    // context's to answer once it has seen the message: OpenSSL refuses an Update after
    // Final, so no second plaintext is ever encrypted under the message's key and IV.
    resync(r, ctx);
    if inl <= 0 || outl.is_null() || input.is_null() {
        return call();
    }
    // SAFETY: the caller's EVP_EncryptUpdate contract is try_hit's contract.
    let decision = guarded(|| unsafe { engine().try_hit(ctx as usize, out, input, inl as usize) });
    if let Some(Decision::Served) = decision {
        // SAFETY: outl is non-null (checked above) and writable per the contract.
        unsafe { *outl = inl };
        return 1;
    }
    let rc = call();
    if rc == 1 && !out.is_null() {
        // SAFETY: the call just returned; `input` and `out` are still the caller's buffers of
        // `inl` bytes, handed over for this call.
        guarded(|| unsafe { engine().after_real_update(ctx as usize, input, out, inl as usize) });
    } else if rc != 1 {
        guarded(|| engine().untrack_message(ctx as usize));
    }
    rc
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
    if rc == 1 && inl > 0 && !out.is_null() && !input.is_null() {
        // SAFETY: the call just returned; `input` and `out` are still the caller's buffers of
        // `inl` bytes, handed over for this call.
        guarded(|| unsafe { d2h::after_real_update(ctx as usize, input, out, inl as usize) });
    }
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
            // SAFETY: forwarding the caller's arguments unchanged.
            let call = || forward(|| unsafe { (r.$field)(ctx, out, outl) });
            if passthrough() {
                return call();
            }
            if !outl.is_null() {
                if let Some(true) = guarded(|| engine().on_final(ctx as usize)) {
                    // GCM emits nothing at final; the tag is kept for GET_TAG.
                    // SAFETY: outl is non-null and writable per the contract.
                    unsafe { *outl = 0 };
                    return 1;
                }
            }
            // A second Final of a served message, or any Final we do not answer: the real
            // context answers, after replaying a served message it has not seen.
            resync(r, ctx);
            let rc = call();
            // SAFETY: ctx is the caller's live context.
            if rc == 1 && forward(|| unsafe { (r.ctx_is_encrypting)(ctx) }) == 1 {
                // The real context computed this message's tag: it holds OpenSSL's last tag.
                guarded(|| engine().real_tag_set(ctx as usize));
            }
            rc
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
            guarded(|| d2h::after_real_final(ctx as usize, rc == 1));
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
    if type_ == CTRL_GET_TAG && !ptr.is_null() {
        // OpenSSL's answer depends only on the context's last tag, the length asked for and
        // the direction. Where the real context holds another last tag than OpenSSL's would
        // (`tag_fix`: a served message's), we answer; otherwise the real context does. No
        // replay, however often it is asked.
        let fix = guarded(|| engine().tag_fix(ctx as usize, arg == TAG_LEN as c_int)).flatten();
        if let Some(f) = fix {
            // OpenSSL succeeds for 1..=16 bytes on an encrypting context that has finished a
            // message since its last reset, which is what a fix means (a served message is
            // on an encrypting context; the last served one's needs the direction checked).
            // SAFETY: ctx is the caller's live context.
            let encrypting = f.served || forward(|| unsafe { (r.ctx_is_encrypting)(ctx) }) == 1;
            if (1..=TAG_LEN as c_int).contains(&arg) && encrypting {
                // SAFETY: GET_TAG with arg in 1..=16 means ptr is arg writable bytes.
                unsafe {
                    std::ptr::copy_nonoverlapping(f.tag.as_ptr(), ptr.cast::<u8>(), arg as usize)
                };
                return 1;
            }
            return call(); // refused by the real context as by OpenSSL
        }
        let rc = call();
        if rc == 1 && arg == TAG_LEN as c_int {
            // SAFETY: the real call just wrote 16 bytes at ptr.
            let tag = unsafe { read_tag(ptr) };
            guarded(|| engine().after_real_tag(ctx as usize, &tag));
        }
        return rc;
    }
    if type_ == CTRL_SET_TAG {
        // Recorded for a deferred message's tag check; a served encryption is replayed first
        // (SET_TAG fails on an encrypting context, as it would have).
        resync_hit(r, ctx);
        let rc = call();
        if rc == 1 {
            // The real context's tag buffer now holds the tag set, as OpenSSL's would.
            guarded(|| engine().real_tag_set(ctx as usize));
            if arg == TAG_LEN as c_int && !ptr.is_null() {
                // SAFETY: SET_TAG with arg 16 means ptr is 16 readable bytes.
                let tag = unsafe { read_tag(ptr) };
                guarded(|| d2h::on_set_tag(ctx as usize, &tag));
            }
        }
        if arg != TAG_LEN as c_int {
            guarded(|| d2h::forget(ctx as usize));
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

/// A copy of the 16-byte tag at `ptr`.
///
/// # Safety
/// `ptr` must be readable for 16 bytes.
unsafe fn read_tag(ptr: *const c_void) -> [u8; TAG_LEN] {
    let mut tag = [0u8; TAG_LEN];
    // SAFETY: readable for 16 bytes per this function's contract; `tag` is our own.
    unsafe { std::ptr::copy_nonoverlapping(ptr.cast::<u8>(), tag.as_mut_ptr(), TAG_LEN) };
    tag
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
    let follow = !passthrough();
    if follow {
        // Both contexts brought up to date first: a copy that fails leaves `out` as it was,
        // which must then still answer as OpenSSL's.
        resync(r, input);
        resync(r, out);
    }
    // SAFETY: forwarding the caller's arguments unchanged.
    let rc = forward(|| unsafe { (r.ctx_copy)(out, input) });
    if rc == 1 && follow {
        // The copy is not followed (it has no key we saw being set), but it holds the real
        // context's tag buffer: it needs the same correction.
        guarded(|| d2h::forget(out as usize));
        guarded(|| engine().after_copy(out as usize, input as usize));
    }
    rc
}

/// The layout of OpenSSL's `OSSL_PARAM` (core.h), stable across OpenSSL 3.
#[repr(C)]
#[derive(Clone, Copy)]
struct OsslParam {
    key: *const c_char,
    data_type: std::ffi::c_uint,
    data: *mut c_void,
    data_size: usize,
    return_size: usize,
}

impl OsslParam {
    const END: Self = Self {
        key: std::ptr::null(),
        data_type: 0,
        data: std::ptr::null_mut(),
        data_size: 0,
        return_size: 0,
    };
}

const OSSL_PARAM_OCTET_STRING: std::ffi::c_uint = 5;

/// Reading parameters does not depend on a served message's data, only on its tag (the
/// `tag` parameter of an AEAD cipher), which is answered as for GET_TAG; the real context
/// answers the rest.
///
/// # Safety
/// OpenSSL's contract for `EVP_CIPHER_CTX_get_params`: `params` is an `OSSL_PARAM` array
/// ended by an entry with a null key, each `data` writable for `data_size` bytes.
#[no_mangle]
pub unsafe extern "C" fn pipellm_EVP_CIPHER_CTX_get_params(ctx: Ctx, params: *mut c_void) -> c_int {
    let Some(r) = with_real() else { return 0 };
    // SAFETY: forwarding the caller's arguments unchanged.
    let call = || forward(|| unsafe { (r.ctx_get_params)(ctx, params) });
    if passthrough() || params.is_null() {
        return call();
    }
    let Some(fix) = guarded(|| engine().tag_fix(ctx as usize, false)).flatten() else {
        return call();
    };
    // SAFETY: the caller's array, ended by a null key (the contract above).
    let entries = unsafe { param_entries(params) };
    let is_tag = |e: &OsslParam| {
        // SAFETY: a non-null key of the caller's array is a NUL-terminated string.
        unsafe { std::ffi::CStr::from_ptr(e.key) }.to_bytes() == b"tag"
    };
    if !entries.iter().any(is_tag) {
        return call();
    }
    // The real context's tag is not OpenSSL's (it may hold none at all): it answers every
    // other parameter, through a copy of the array without the tag, and we answer the tag as
    // OpenSSL would (octet string of 1..=16 bytes, encrypting context).
    // SAFETY: ctx is the caller's live context.
    let encrypting = fix.served || forward(|| unsafe { (r.ctx_is_encrypting)(ctx) }) == 1;
    let tag_ok = |e: &OsslParam| {
        e.data_type == OSSL_PARAM_OCTET_STRING && (1..=TAG_LEN).contains(&e.data_size) && encrypting
    };
    if !entries.iter().filter(|e| is_tag(e)).all(tag_ok) {
        return call(); // refused by the real context as by OpenSSL
    }
    let mut others: Vec<OsslParam> = entries.iter().filter(|e| !is_tag(e)).copied().collect();
    others.push(OsslParam::END);
    // SAFETY: `others` is an OSSL_PARAM array ended by a null key whose entries point at the
    // caller's buffers, as the caller's did.
    let rc = forward(|| unsafe { (r.ctx_get_params)(ctx, others.as_mut_ptr().cast()) });
    if rc != 1 {
        return rc;
    }
    let mut rest = others.iter();
    // SAFETY: the caller's entries, as counted by `param_entries`; each tag entry's data is
    // writable for data_size (1..=16) bytes or null (then only its size is reported).
    unsafe {
        let base = params.cast::<OsslParam>();
        for i in 0..entries.len() {
            let e = &mut *base.add(i);
            if is_tag(e) {
                if !e.data.is_null() {
                    std::ptr::copy_nonoverlapping(fix.tag.as_ptr(), e.data.cast(), e.data_size);
                }
                e.return_size = e.data_size;
            } else if let Some(o) = rest.next() {
                e.return_size = o.return_size;
            }
        }
    }
    rc
}

/// The entries of an OSSL_PARAM array, up to (not including) its null-key terminator.
///
/// # Safety
/// `params` must point to an OSSL_PARAM array ended by an entry with a null key.
unsafe fn param_entries<'a>(params: *mut c_void) -> &'a [OsslParam] {
    let base = params.cast::<OsslParam>();
    let mut n = 0;
    // SAFETY: the array is ended by a null key, which bounds the walk.
    while unsafe { !(*base.add(n)).key.is_null() } {
        n += 1;
    }
    // SAFETY: `n` initialised entries precede the terminator.
    unsafe { std::slice::from_raw_parts(base, n) }
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
    // In a forked child nothing is pre-encrypted any more (see `in_child_after_fork`).
    (!config().disabled && real().is_ok() && !crate::process::forked()) as c_int
}

/// Copies up to `n` counters into `out` (names: `pipellm_cc_stat_name`); returns how many
/// counters exist.
///
/// # Safety
/// `out` must be writable for `n` u64 values (or null with n = 0).
#[no_mangle]
pub unsafe extern "C" fn pipellm_cc_stats(out: *mut u64, n: usize) -> usize {
    let snap = crate::stats::stats().snapshot();
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
/// validated by page protection (a hit then only copies the ciphertext; see `watch_ranges`).
/// Returns 0, or -1 (empty or wrapping range), -2 (overlaps a registered range, a receive
/// pool or a host pool's view), -3 (too many ranges), -4 (internal error).
///
/// # Safety
/// The range must stay mapped, and be written only by this process's user-space code (not
/// by `read(2)`, not by a device), until `pipellm_cc_unwatch(ptr)` returns. Its pages are
/// read-only meanwhile: the first write to a chunk after it was encrypted takes one page
/// fault (handled: the write goes through).
// SAFETY: an `unsafe fn` for the contract in `# Safety` above, which its (C) callers keep.
#[no_mangle]
pub unsafe extern "C" fn pipellm_cc_watch(ptr: *const c_void, len: usize) -> c_int {
    use crate::watch_ranges::WatchError;
    install_process_hooks();
    // SAFETY: the caller's promise above is the one `watch_ranges::watch` needs.
    match std::panic::catch_unwind(|| unsafe { crate::watch_ranges::watch(ptr as usize, len) }) {
        Ok(Ok(())) => 0,
        Ok(Err(WatchError::Empty)) => -1,
        Ok(Err(WatchError::Overlaps)) => -2,
        Ok(Err(WatchError::Full)) => -3,
        Err(_) => -4,
    }
}

/// Unregisters the watched range that starts at `ptr`; when this returns, no pre-encryption
/// thread reads it any more (it waits for those that still do: at most a chunk's
/// encryption) and its pages are writable again. Returns 0, or -1 if no range starts there,
/// -4 (internal error).
#[no_mangle]
pub extern "C" fn pipellm_cc_unwatch(ptr: *const c_void) -> c_int {
    match std::panic::catch_unwind(|| crate::watch_ranges::unwatch(ptr as usize)) {
        Ok(true) => 0,
        Ok(false) => -1,
        Err(_) => -4,
    }
}

/// Registers a receive pool: `view` and `alias` are two mappings of the same `len` bytes
/// (page-aligned); D2H chunks the driver decrypts into the view are answered after a
/// synchronous tag check and decrypted later through the alias, the view's pages
/// inaccessible (a reader waits) until then (see `d2h`). Returns 0, or -1 (empty, wrapping,
/// unaligned or self-overlapping), -2 (overlaps a pool, a watched range or a write watch),
/// -3 (too many pools), -4 (internal error), -5 (not a mapping we may advise).
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
    install_process_hooks();
    // SAFETY: the caller's promise above is the one `d2h::receive` needs.
    let r = std::panic::catch_unwind(|| unsafe {
        crate::d2h::receive(view as usize, alias as usize, len)
    });
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
    if crate::process::forked() {
        return 0; // the workers were not forked with us: nothing runs here
    }
    let timeout = std::time::Duration::from_millis(ms);
    match std::panic::catch_unwind(|| crate::workers::workers().quiesce(timeout)) {
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
