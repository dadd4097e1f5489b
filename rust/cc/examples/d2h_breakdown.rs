//! Where a deferred D2H chunk's time goes, per 1 MiB: a plain copy (for scale), the
//! snapshot copy with its tag check (one pass), closing and opening the destination's pages (its gate),
//! the deferred decryption, against a whole AES-GCM open of the same bytes (AWS-LC; the
//! driver's OpenSSL is measured by the emulator's `bench-d2h`). With `SHARED=1` the
//! destinations are a shared memfd mapping, as a receive pool's are.
//! `cargo run --release -p pipellm-cc --example d2h_breakdown`.

fn main() {
    use pipellm_core::crypto::AeadKey;
    use std::time::Instant;
    const LEN: usize = 1 << 20;
    const SLOTS: usize = 16;
    const ROUNDS: usize = 400;
    let key = AeadKey::new(&[7u8; 32]).unwrap();
    let iv = [3u8; 12];
    let pt = vec![0x5au8; LEN];
    let mut bounce = vec![0u8; LEN];
    let tag = key.seal(&iv, &[], &pt, &mut bounce).unwrap();
    // Destinations: 16 MiB, cycled, as a receive pool would be.
    let shared = std::env::var("SHARED").is_ok();
    let mut heap = vec![0u8; LEN * SLOTS];
    let dst: &mut [u8] = if shared {
        // SAFETY: test set-up: a fresh memfd mapping, checked.
        unsafe {
            let fd = libc::memfd_create(c"x".as_ptr(), 0);
            libc::ftruncate(fd, (LEN * SLOTS) as i64);
            let p = libc::mmap(
                std::ptr::null_mut(),
                LEN * SLOTS,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            );
            std::slice::from_raw_parts_mut(p.cast::<u8>(), LEN * SLOTS)
        }
    } else {
        &mut heap
    };
    let mut t: [Vec<f64>; 6] = Default::default();
    for r in 0..ROUNDS {
        let d = &mut dst[(r % SLOTS) * LEN..][..LEN];
        let t0 = Instant::now();
        d.copy_from_slice(&bounce);
        let t1 = Instant::now();
        let ok = key.snapshot_and_tag(&iv, &bounce, d).unwrap() == tag;
        let t2 = Instant::now();
        // SAFETY: our own heap buffer, read-write; opened below before anyone touches it.
        let gate = unsafe { pipellm_core::gate::close(d.as_ptr(), LEN) }.unwrap();
        let t3 = Instant::now();
        drop(gate);
        let t4 = Instant::now();
        key.open_in_place(&iv, &tag, d).unwrap();
        let t5 = Instant::now();
        let d2 = &mut dst[((r + 7) % SLOTS) * LEN..][..LEN];
        let t6 = Instant::now();
        key.open_private(&iv, &[], &bounce, &tag, d2).unwrap();
        let t7 = Instant::now();
        assert!(ok);
        for (v, (a, b)) in
            t.iter_mut()
                .zip([(t0, t1), (t1, t2), (t2, t3), (t3, t4), (t4, t5), (t6, t7)])
        {
            v.push((b - a).as_secs_f64() * 1e6);
        }
    }
    let names = [
        "copy",
        "copy_and_tag",
        "gate",
        "open",
        "open_in_place",
        "gcm_open",
    ];
    for (n, v) in names.iter().zip(t.iter_mut()) {
        v.sort_by(f64::total_cmp);
        println!("{n:12} median {:8.2} us", v[v.len() / 2]);
    }
}
