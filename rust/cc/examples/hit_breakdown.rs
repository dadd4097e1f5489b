//! Where the interposer's time goes on the driver's critical path: drives the hooks
//! in-process, in the driver's pattern (init with IV, one update, final, GET_TAG), over a
//! layer cycle of 1 MiB chunks from 32 MiB of sources, and prints the median time of each
//! call once the cycle is learned.
//!
//!     cargo run --release -p pipellm-cc --example hit_breakdown [watch]
use pipellm_cc::exports::*;
use pipellm_cc::real::real;
use std::ffi::c_void;
use std::time::{Duration, Instant};

const CHUNK: usize = 1 << 20;

fn main() {
    let r = real().expect("a real libcrypto");
    let sources: Vec<Vec<u8>> = (0..8).map(|i| vec![i as u8 + 1; 4 * CHUNK]).collect();
    let mut bounce = vec![0u8; CHUNK + 64];
    let key = [7u8; 32];
    // SAFETY: the real library's constructor and cipher table, with no arguments.
    let (ctx, aes) = unsafe {
        let h = libc::dlopen(c"libcrypto.so.3".as_ptr(), libc::RTLD_NOW);
        let f: unsafe extern "C" fn() -> *const c_void =
            std::mem::transmute(libc::dlsym(h, c"EVP_aes_256_gcm".as_ptr()));
        ((r.ctx_new)(), f())
    };
    let null = std::ptr::null_mut();
    // SAFETY: a fresh context, a 32-byte key (AES-256-GCM), no IV yet.
    unsafe { pipellm_EVP_EncryptInit_ex(ctx, aes, null, key.as_ptr(), std::ptr::null()) };
    // With `watch` as the first argument the sources are registered (pipellm_cc_watch):
    // hits are then validated by page protection instead of fingerprints.
    if std::env::args().nth(1).as_deref() == Some("watch") {
        for s in &sources {
            // SAFETY: the sources live (and are written by nobody) until the end of main.
            let rc = unsafe { pipellm_cc_watch(s.as_ptr().cast(), s.len()) };
            assert_eq!(rc, 0, "pipellm_cc_watch");
        }
    }
    let mut samples: Vec<[f64; 4]> = Vec::new();
    for k in 0..800u32 {
        let src = sources[(k as usize / 4) % 8][(k as usize % 4) * CHUNK..].as_ptr();
        let mut iv = [0u8; 12];
        iv[..4].copy_from_slice(&(k + 1).to_le_bytes());
        let (mut n, mut m) = (0, 0);
        let mut tag = [0u8; 16];
        let t0 = Instant::now();
        // SAFETY: the driver's pattern on our live context: a 12-byte IV.
        unsafe {
            pipellm_EVP_EncryptInit_ex(ctx, std::ptr::null(), null, std::ptr::null(), iv.as_ptr());
        }
        let t1 = Instant::now();
        // SAFETY: `src` readable and `bounce` writable for CHUNK bytes.
        unsafe { pipellm_EVP_EncryptUpdate(ctx, bounce.as_mut_ptr(), &mut n, src, CHUNK as i32) };
        let t2 = Instant::now();
        // SAFETY: GCM writes nothing at final; `bounce` has 64 spare bytes past the chunk.
        unsafe { pipellm_EVP_EncryptFinal_ex(ctx, bounce.as_mut_ptr().add(n as usize), &mut m) };
        let t3 = Instant::now();
        // SAFETY: GET_TAG with 16 writes 16 bytes into `tag`.
        unsafe { pipellm_EVP_CIPHER_CTX_ctrl(ctx, 0x10, 16, tag.as_mut_ptr().cast()) };
        let t4 = Instant::now();
        if k >= 200 {
            let us = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e6;
            samples.push([us(t0, t1), us(t1, t2), us(t2, t3), us(t3, t4)]);
        }
        std::thread::sleep(Duration::from_micros(400)); // the copy engine's time
    }
    for (i, name) in ["init", "update", "final", "get_tag"].iter().enumerate() {
        let mut v: Vec<f64> = samples.iter().map(|s| s[i]).collect();
        v.sort_by(f64::total_cmp);
        println!("{name:8} median {:8.1} us", v[v.len() / 2]);
    }
    let stats = pipellm_cc::stats::stats().snapshot();
    let named: Vec<String> = pipellm_cc::stats::NAMES
        .iter()
        .zip(stats)
        .map(|(n, v)| format!("{n}={v}"))
        .collect();
    println!("{}", named.join(" "));
}
