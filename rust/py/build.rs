//! With the `interposer` feature (which pyproject.toml turns on for every maturin build:
//! `pip install .`, `pip wheel .`, the sdist, `maturin build` and `maturin develop`), this
//! script also builds the libcrypto interposer, `libpipellm_cc_shim.so`, and puts it at
//! `python/pipellm/_lib/`, where maturin's `include` picks it up for the wheel and where
//! `pipellm.cc` looks for it at run time. One build command therefore makes both libraries.
//!
//! Why a nested cargo build here: maturin builds exactly one cdylib and has no post-build
//! hook; the interposer is a second cdylib with its own link settings (SONAME
//! `libcrypto.so.3`, OpenSSL's version nodes: `rust/cc-shim/build.rs`) that must not be linked
//! into the extension (importing `pipellm` must never interpose a process's libcrypto).
//! The nested build uses its own target directory (the outer build holds the lock on
//! its own) beside the outer one, so it is incremental across builds, and the same profile
//! and target as the outer build. Without the feature (plain `cargo build/test/clippy` of the
//! workspace) nothing extra happens.
use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

const SHIM: &str = "libpipellm_cc_shim.so";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if env::var_os("CARGO_FEATURE_INTERPOSER").is_none() {
        return;
    }
    if env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("linux") {
        // The interposer stands in for Linux's libcrypto.so.3; there is nothing to build.
        return;
    }
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let root = manifest_dir
        .ancestors()
        .nth(2)
        .expect("rust/py sits two levels below the workspace root")
        .to_path_buf();
    for dir in ["rust/cc", "rust/cc-shim", "rust/core", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }

    // OUT_DIR is <target-dir>[/<triple>]/<profile-dir>/build/<pkg>-<hash>/out.
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    let profile_dir = out_dir
        .ancestors()
        .nth(3)
        .expect("OUT_DIR has cargo's layout");
    let profile_name = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .expect("a profile directory name");
    // The "dev" profile builds into "debug"; every other profile into its own name.
    let profile = if profile_name == "debug" {
        "dev"
    } else {
        profile_name
    };
    let target = env::var("TARGET").expect("TARGET");
    let cross = env::var("HOST").ok().as_deref() != Some(target.as_str());
    let target_dir = profile_dir
        .parent()
        .expect("a target directory")
        .join("pipellm-interposer");

    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.arg("build")
        .arg("--manifest-path")
        .arg(root.join("Cargo.toml"))
        .args(["-p", "pipellm-cc-shim", "--profile", profile])
        .arg("--target-dir")
        .arg(&target_dir);
    if cross {
        cmd.args(["--target", &target]);
    }
    // Variables cargo sets for this build script describe *this* package; the nested cargo
    // sets its own for the packages it builds. RUSTC, the encoded rustflags and the jobserver
    // (CARGO_MAKEFLAGS) are kept: the same compiler and flags, and no more parallel jobs than
    // the outer build allows.
    for (k, _) in env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        if k.starts_with("CARGO_FEATURE_")
            || k.starts_with("CARGO_CFG_")
            || k.starts_with("CARGO_PKG_")
            || k.starts_with("CARGO_MANIFEST_")
            || k.starts_with("DEP_")
            || matches!(
                k.as_str(),
                "OUT_DIR" | "TARGET" | "HOST" | "PROFILE" | "OPT_LEVEL" | "DEBUG" | "NUM_JOBS"
            )
        {
            cmd.env_remove(&k);
        }
    }
    let status = cmd
        .status()
        .expect("could not start cargo to build the interposer");
    assert!(
        status.success(),
        "building the interposer (pipellm-cc-shim) failed"
    );

    let mut built = target_dir;
    if cross {
        built.push(&target);
    }
    built.push(profile_name);
    built.push(SHIM);
    let dest_dir = root.join("python").join("pipellm").join("_lib");
    std::fs::create_dir_all(&dest_dir).expect("create python/pipellm/_lib");
    copy_atomically(&built, &dest_dir.join(SHIM));
}

/// Replace `dest` by a copy of `src` with a rename, so a process that has the previous
/// library mapped (a test run, `pipellm run`) keeps its pages and never sees a torn file.
fn copy_atomically(src: &Path, dest: &Path) {
    let tmp = dest.with_extension("so.tmp");
    std::fs::copy(src, &tmp)
        .unwrap_or_else(|e| panic!("copy {} to {}: {e}", src.display(), tmp.display()));
    std::fs::rename(&tmp, dest)
        .unwrap_or_else(|e| panic!("rename {} to {}: {e}", tmp.display(), dest.display()));
}
