//! Link settings that make `libpipellm_cc.so` able to stand in for `libcrypto.so.3`:
//! - SONAME `libcrypto.so.3`, so a later `dlopen("libcrypto.so.3")` (how the CUDA driver
//!   reaches OpenSSL) finds the already loaded interposer rather than the real library;
//! - the version nodes OpenSSL 3 defines, so libraries linked against libcrypto (libssl,
//!   Python's `_ssl`) pass the loader's version check and our hooks bind to their versioned
//!   references (the hooks are bound to `OPENSSL_3.0.0` with `.symver` in `exports.rs`);
//! - a DT_NEEDED entry on `libpipellm-real-crypto.so.3`, a name the launcher points at the
//!   real libcrypto: every symbol we do not define (SHA256, HMAC, ...) resolves there, also
//!   through `dlsym(handle, ...)` on our handle, which searches our dependencies.
use std::path::PathBuf;
use std::process::Command;

const VERSIONS: &[&str] = &[
    "OPENSSL_3.0.0",
    "OPENSSL_3.0.3",
    "OPENSSL_3.0.8",
    "OPENSSL_3.0.9",
    "OPENSSL_3.1.0",
    "OPENSSL_3.2.0",
    "OPENSSL_3.3.0",
    "OPENSSL_3.4.0",
    "OPENSSL_3.5.0",
    "OPENSSL_3.6.0",
];

pub const REAL_ALIAS: &str = "libpipellm-real-crypto.so.3";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux") {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let mut script = String::new();
    let mut prev: Option<&str> = None;
    for v in VERSIONS {
        match prev {
            None => script.push_str(&format!("{v} {{ }};\n")),
            Some(p) => script.push_str(&format!("{v} {{ }} {p};\n")),
        }
        prev = Some(v);
    }
    let map = out.join("openssl-versions.map");
    std::fs::write(&map, script).expect("write version script");

    // A stub carrying only the alias SONAME: linking it records the DT_NEEDED entry.
    let stub_c = out.join("stub.c");
    std::fs::write(&stub_c, "/* DT_NEEDED carrier for the real libcrypto */\n")
        .expect("write stub");
    let stub = out.join(REAL_ALIAS);
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let ok = Command::new(&cc)
        .args(["-shared", "-fPIC", "-o"])
        .arg(&stub)
        .arg(format!("-Wl,-soname,{REAL_ALIAS}"))
        .arg(&stub_c)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "building the {REAL_ALIAS} link stub with `{cc}` failed");

    println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libcrypto.so.3");
    println!(
        "cargo:rustc-cdylib-link-arg=-Wl,--version-script={}",
        map.display()
    );
    println!("cargo:rustc-cdylib-link-arg=-Wl,-rpath,$ORIGIN");
    println!("cargo:rustc-cdylib-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-cdylib-link-arg={}", stub.display());
}
