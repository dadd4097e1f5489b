//! The real libcrypto: found at run time, never ourselves.
//!
//! Where it comes from, first hit wins:
//! 1. `PIPELLM_REAL_LIBCRYPTO` (a path), if set;
//! 2. `libpipellm-real-crypto.so.3`, our DT_NEEDED alias (the launcher points it at the real
//!    library), already loaded with us;
//! 3. `libcrypto.so.3` as the dynamic loader finds it (outside the interposer, e.g. in this
//!    crate's examples; inside it, that name is the interposer itself and is refused).
//!
//! Every function pointer is checked to lie outside our own object (`dladdr`), so a
//! misconfiguration can never make a hook call itself.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::OnceLock;

pub type Ctx = *mut c_void;
pub type Cipher = *const c_void;
pub type Engine = *mut c_void;

pub type InitFn = unsafe extern "C" fn(Ctx, Cipher, Engine, *const u8, *const u8) -> c_int;
pub type CipherInitFn =
    unsafe extern "C" fn(Ctx, Cipher, Engine, *const u8, *const u8, c_int) -> c_int;
pub type Init2Fn = unsafe extern "C" fn(Ctx, Cipher, *const u8, *const u8, *const c_void) -> c_int;
pub type CipherInit2Fn =
    unsafe extern "C" fn(Ctx, Cipher, *const u8, *const u8, c_int, *const c_void) -> c_int;
pub type UpdateFn = unsafe extern "C" fn(Ctx, *mut u8, *mut c_int, *const u8, c_int) -> c_int;
pub type FinalFn = unsafe extern "C" fn(Ctx, *mut u8, *mut c_int) -> c_int;
pub type CtrlFn = unsafe extern "C" fn(Ctx, c_int, c_int, *mut c_void) -> c_int;
pub type CtxFn = unsafe extern "C" fn(Ctx) -> c_int;
pub type FreeFn = unsafe extern "C" fn(Ctx);
pub type NewFn = unsafe extern "C" fn() -> Ctx;
pub type CopyFn = unsafe extern "C" fn(Ctx, Ctx) -> c_int;
pub type SetParamsFn = unsafe extern "C" fn(Ctx, *const c_void) -> c_int;
pub type CipherNidFn = unsafe extern "C" fn(Cipher) -> c_int;

/// The real functions we wrap (each hook forwards to its own).
pub struct Real {
    pub path: String,
    pub encrypt_init_ex: InitFn,
    pub encrypt_init: InitFn4,
    pub encrypt_init_ex2: Init2Fn,
    pub decrypt_init_ex: InitFn,
    pub decrypt_init: InitFn4,
    pub decrypt_init_ex2: Init2Fn,
    pub cipher_init_ex: CipherInitFn,
    pub cipher_init: CipherInitFn5,
    pub cipher_init_ex2: CipherInit2Fn,
    pub encrypt_update: UpdateFn,
    pub decrypt_update: UpdateFn,
    pub cipher_update: UpdateFn,
    pub encrypt_final_ex: FinalFn,
    pub encrypt_final: FinalFn,
    pub decrypt_final_ex: FinalFn,
    pub decrypt_final: FinalFn,
    pub cipher_final_ex: FinalFn,
    pub cipher_final: FinalFn,
    pub ctx_ctrl: CtrlFn,
    pub ctx_new: NewFn,
    pub ctx_free: FreeFn,
    pub ctx_reset: CtxFn,
    pub ctx_copy: CopyFn,
    pub ctx_set_params: SetParamsFn,
    pub ctx_get_params: GetParamsFn,
    pub ctx_set_key_length: CtrlLenFn,
    pub cipher_get_nid: CipherNidFn,
    /// What an init left in the context (read back instead of assumed: see `exports`).
    pub ctx_get0_cipher: CtxCipherFn,
    pub ctx_get_key_length: CtxIntFn,
    pub ctx_get_iv_length: CtxIntFn,
    pub ctx_is_encrypting: CtxIntFn,
}

pub type GetParamsFn = unsafe extern "C" fn(Ctx, *mut c_void) -> c_int;
pub type CtxCipherFn = unsafe extern "C" fn(Ctx) -> Cipher;
pub type CtxIntFn = unsafe extern "C" fn(Ctx) -> c_int;

pub type InitFn4 = unsafe extern "C" fn(Ctx, Cipher, *const u8, *const u8) -> c_int;
pub type CipherInitFn5 = unsafe extern "C" fn(Ctx, Cipher, *const u8, *const u8, c_int) -> c_int;
pub type CtrlLenFn = unsafe extern "C" fn(Ctx, c_int) -> c_int;

/// Why the real library could not be used (the hooks then cannot forward: see `exports`).
#[derive(Debug, Clone)]
pub struct LoadError(pub String);

static REAL: OnceLock<Result<Real, LoadError>> = OnceLock::new();

pub fn real() -> Result<&'static Real, &'static LoadError> {
    REAL.get_or_init(load).as_ref()
}

fn dlerror_string() -> String {
    // SAFETY: dlerror returns null or a pointer to a NUL-terminated string owned by libdl,
    // valid until the next dl* call on this thread; we copy it at once.
    unsafe {
        let e = libc::dlerror();
        if e.is_null() {
            "unknown dlopen error".into()
        } else {
            CStr::from_ptr(e).to_string_lossy().into_owned()
        }
    }
}

/// Base address of the object holding `addr` (0 if none).
fn object_base(addr: *const c_void) -> usize {
    // SAFETY: dladdr only reads the loader's tables; `info` is a valid out-pointer.
    unsafe {
        let mut info: libc::Dl_info = std::mem::zeroed();
        if libc::dladdr(addr, &mut info) != 0 {
            info.dli_fbase as usize
        } else {
            0
        }
    }
}

fn our_base() -> usize {
    object_base(our_base as *const c_void)
}

fn open(path: &str, noload: bool) -> Option<*mut c_void> {
    let c = CString::new(path).ok()?;
    let flags = libc::RTLD_NOW | libc::RTLD_LOCAL | if noload { libc::RTLD_NOLOAD } else { 0 };
    // SAFETY: `c` is a valid C string; dlopen has no other preconditions.
    let h = unsafe { libc::dlopen(c.as_ptr(), flags) };
    (!h.is_null()).then_some(h)
}

fn load() -> Result<Real, LoadError> {
    let mut tried = Vec::new();
    let mut candidates: Vec<(String, bool)> = Vec::new();
    if let Ok(p) = std::env::var("PIPELLM_REAL_LIBCRYPTO") {
        candidates.push((p, false));
    }
    candidates.push(("libpipellm-real-crypto.so.3".into(), true));
    // Last, the loader's own search (only reached without the alias, e.g. in our examples):
    // inside the interposer this name is the interposer itself, which `resolve` refuses.
    candidates.push(("libcrypto.so.3".into(), false));
    let ours = our_base();
    for (path, noload) in candidates {
        let Some(h) = open(&path, noload) else {
            if !noload {
                tried.push(format!("{path}: {}", dlerror_string()));
            }
            continue;
        };
        match resolve(h, &path, ours) {
            Ok(r) => return Ok(r),
            Err(e) => tried.push(e),
        }
    }
    Err(LoadError(format!(
        "no usable libcrypto.so.3 (set PIPELLM_REAL_LIBCRYPTO): {}",
        tried.join("; ")
    )))
}

fn resolve(h: *mut c_void, path: &str, ours: usize) -> Result<Real, String> {
    let sym = |name: &str| -> Result<*mut c_void, String> {
        let c = CString::new(name).expect("symbol names have no NUL");
        // SAFETY: `h` is a live handle from dlopen; `c` a valid C string.
        let p = unsafe { libc::dlsym(h, c.as_ptr() as *const c_char) };
        if p.is_null() {
            return Err(format!("{path}: no symbol {name}"));
        }
        if object_base(p) == ours {
            return Err(format!("{path}: {name} resolves to the interposer itself"));
        }
        Ok(p)
    };
    macro_rules! f {
        ($ty:ty, $name:literal) => {
            // SAFETY: the symbol is OpenSSL 3's public function of that name, whose C
            // signature is `$ty` (the type of the field it is assigned to).
            unsafe { std::mem::transmute::<*mut c_void, $ty>(sym($name)?) }
        };
    }
    Ok(Real {
        path: path.to_string(),
        encrypt_init_ex: f!(InitFn, "EVP_EncryptInit_ex"),
        encrypt_init: f!(InitFn4, "EVP_EncryptInit"),
        encrypt_init_ex2: f!(Init2Fn, "EVP_EncryptInit_ex2"),
        decrypt_init_ex: f!(InitFn, "EVP_DecryptInit_ex"),
        decrypt_init: f!(InitFn4, "EVP_DecryptInit"),
        decrypt_init_ex2: f!(Init2Fn, "EVP_DecryptInit_ex2"),
        cipher_init_ex: f!(CipherInitFn, "EVP_CipherInit_ex"),
        cipher_init: f!(CipherInitFn5, "EVP_CipherInit"),
        cipher_init_ex2: f!(CipherInit2Fn, "EVP_CipherInit_ex2"),
        encrypt_update: f!(UpdateFn, "EVP_EncryptUpdate"),
        decrypt_update: f!(UpdateFn, "EVP_DecryptUpdate"),
        cipher_update: f!(UpdateFn, "EVP_CipherUpdate"),
        encrypt_final_ex: f!(FinalFn, "EVP_EncryptFinal_ex"),
        encrypt_final: f!(FinalFn, "EVP_EncryptFinal"),
        decrypt_final_ex: f!(FinalFn, "EVP_DecryptFinal_ex"),
        decrypt_final: f!(FinalFn, "EVP_DecryptFinal"),
        cipher_final_ex: f!(FinalFn, "EVP_CipherFinal_ex"),
        cipher_final: f!(FinalFn, "EVP_CipherFinal"),
        ctx_ctrl: f!(CtrlFn, "EVP_CIPHER_CTX_ctrl"),
        ctx_new: f!(NewFn, "EVP_CIPHER_CTX_new"),
        ctx_free: f!(FreeFn, "EVP_CIPHER_CTX_free"),
        ctx_reset: f!(CtxFn, "EVP_CIPHER_CTX_reset"),
        ctx_copy: f!(CopyFn, "EVP_CIPHER_CTX_copy"),
        ctx_set_params: f!(SetParamsFn, "EVP_CIPHER_CTX_set_params"),
        ctx_get_params: f!(GetParamsFn, "EVP_CIPHER_CTX_get_params"),
        ctx_set_key_length: f!(CtrlLenFn, "EVP_CIPHER_CTX_set_key_length"),
        cipher_get_nid: f!(CipherNidFn, "EVP_CIPHER_get_nid"),
        ctx_get0_cipher: f!(CtxCipherFn, "EVP_CIPHER_CTX_get0_cipher"),
        ctx_get_key_length: f!(CtxIntFn, "EVP_CIPHER_CTX_get_key_length"),
        ctx_get_iv_length: f!(CtxIntFn, "EVP_CIPHER_CTX_get_iv_length"),
        ctx_is_encrypting: f!(CtxIntFn, "EVP_CIPHER_CTX_is_encrypting"),
    })
}
