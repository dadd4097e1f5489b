//! `libpipellm_cc_shim.so`: the interposer as a shared library. The hooks live in
//! `pipellm-cc`; this crate exports them under OpenSSL's names and versions (and build.rs
//! gives the library the SONAME, version nodes and DT_NEEDED entry that let it stand in for
//! `libcrypto.so.3`: see there).

// Keep the hooks (and our C API) linked in and exported.
pub use pipellm_cc::exports::*;

/// Runs when the library is loaded: the fork handlers go in before any thread of the process
/// can take the locks they hold across `fork()` (see `install_process_hooks`).
extern "C" fn at_load() {
    // Nothing may unwind out of a constructor.
    let _ = std::panic::catch_unwind(pipellm_cc::exports::install_process_hooks);
}

// In this crate (the library's own object), so the linker always keeps it.
#[used]
#[link_section = ".init_array"]
static AT_LOAD: extern "C" fn() = at_load;

/// For each hook: a trampoline in this object (`.symver` can only version a symbol defined in
/// the same assembly unit) that tail-jumps to the hook, exported as `<name>@@OPENSSL_3.0.0`.
/// A tail jump keeps the caller's arguments and return address untouched.
macro_rules! versioned {
    ($($ours:literal => $theirs:literal),* $(,)?) => {
        $(
            #[cfg(target_arch = "x86_64")]
            std::arch::global_asm!(
                concat!(".globl shim_", $theirs),
                concat!(".type shim_", $theirs, ",@function"),
                concat!("shim_", $theirs, ":"),
                concat!("jmp ", $ours, "@PLT"),
                concat!(".symver shim_", $theirs, ", ", $theirs, "@@OPENSSL_3.0.0"),
            );
            #[cfg(target_arch = "aarch64")]
            std::arch::global_asm!(
                concat!(".globl shim_", $theirs),
                concat!(".type shim_", $theirs, ",%function"),
                concat!("shim_", $theirs, ":"),
                concat!("b ", $ours),
                concat!(".symver shim_", $theirs, ", ", $theirs, "@@OPENSSL_3.0.0"),
            );
        )*
    };
}

versioned! {
    "pipellm_EVP_EncryptInit_ex" => "EVP_EncryptInit_ex",
    "pipellm_EVP_EncryptInit" => "EVP_EncryptInit",
    "pipellm_EVP_EncryptInit_ex2" => "EVP_EncryptInit_ex2",
    "pipellm_EVP_DecryptInit_ex" => "EVP_DecryptInit_ex",
    "pipellm_EVP_DecryptInit" => "EVP_DecryptInit",
    "pipellm_EVP_DecryptInit_ex2" => "EVP_DecryptInit_ex2",
    "pipellm_EVP_CipherInit_ex" => "EVP_CipherInit_ex",
    "pipellm_EVP_CipherInit" => "EVP_CipherInit",
    "pipellm_EVP_CipherInit_ex2" => "EVP_CipherInit_ex2",
    "pipellm_EVP_EncryptUpdate" => "EVP_EncryptUpdate",
    "pipellm_EVP_DecryptUpdate" => "EVP_DecryptUpdate",
    "pipellm_EVP_CipherUpdate" => "EVP_CipherUpdate",
    "pipellm_EVP_EncryptFinal_ex" => "EVP_EncryptFinal_ex",
    "pipellm_EVP_EncryptFinal" => "EVP_EncryptFinal",
    "pipellm_EVP_DecryptFinal_ex" => "EVP_DecryptFinal_ex",
    "pipellm_EVP_DecryptFinal" => "EVP_DecryptFinal",
    "pipellm_EVP_CipherFinal_ex" => "EVP_CipherFinal_ex",
    "pipellm_EVP_CipherFinal" => "EVP_CipherFinal",
    "pipellm_EVP_CIPHER_CTX_ctrl" => "EVP_CIPHER_CTX_ctrl",
    "pipellm_EVP_CIPHER_CTX_free" => "EVP_CIPHER_CTX_free",
    "pipellm_EVP_CIPHER_CTX_reset" => "EVP_CIPHER_CTX_reset",
    "pipellm_EVP_CIPHER_CTX_copy" => "EVP_CIPHER_CTX_copy",
    "pipellm_EVP_CIPHER_CTX_set_params" => "EVP_CIPHER_CTX_set_params",
    "pipellm_EVP_CIPHER_CTX_get_params" => "EVP_CIPHER_CTX_get_params",
    "pipellm_EVP_CIPHER_CTX_set_key_length" => "EVP_CIPHER_CTX_set_key_length",
}
