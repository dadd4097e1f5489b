//! The fingerprint's price: pipellm's keyed GMAC (`pipellm_core::fingerprint`) against the
//! unkeyed XXH3-128 it replaced, side by side in one run, per 1 MiB and 4 MiB chunk, on a
//! chunk in cache (hashed again and again) and on cold chunks (a walk over 1 GiB, each chunk
//! hashed by one of the two per pass, as a hit's validation reads a source the device copy
//! has not touched). Prints medians and the ratio; no assertion.
//!
//!     cargo bench -p pipellm-bench --bench fingerprint

use std::hint::black_box;
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median seconds per chunk of `f` and of `g`, measured alternately. Hot: both hash the one
/// chunk, again and again. Cold: they take turns over the chunks in order, each chunk hashed
/// by one of them once per pass (its neighbour by the other), so each reads memory nothing
/// touched since the previous pass.
fn side_by_side(
    chunks: &[&[u8]],
    rounds: usize,
    f: impl Fn(&[u8]) -> u128,
    g: impl Fn(&[u8]) -> u128,
) -> (f64, f64) {
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        for i in 0..chunks.len().max(2) {
            let c = chunks[i % chunks.len()];
            let t = Instant::now();
            // Which function takes chunk i alternates between passes, so both see every
            // chunk (and the same mix of machine states).
            if (r + i) % 2 == 0 {
                black_box(f(black_box(c)));
                a.push(t.elapsed().as_secs_f64());
            } else {
                black_box(g(black_box(c)));
                b.push(t.elapsed().as_secs_f64());
            }
        }
    }
    (median(a), median(b))
}

fn main() {
    let gmac = |b: &[u8]| pipellm_core::fingerprint::fingerprint(b);
    let xxh3 = |b: &[u8]| xxhash_rust::xxh3::xxh3_128(b);
    println!("fingerprint per chunk: keyed GMAC (pipellm) vs XXH3-128, medians");
    println!(
        "{:>6} {:>5} {:>12} {:>12} {:>7}",
        "chunk", "data", "GMAC us", "XXH3 us", "ratio"
    );
    for chunk in [1usize << 20, 4 << 20] {
        let hot = vec![0x5au8; chunk];
        let (g, x) = side_by_side(&[&hot[..]], 400, gmac, xxh3);
        row(chunk, "hot", g, x);
        let total = 1usize << 30;
        let cold: Vec<u8> = (0..total).map(|i| (i * 131 + 7) as u8).collect();
        let chunks: Vec<&[u8]> = cold.chunks(chunk).collect();
        let (g, x) = side_by_side(&chunks, 4, gmac, xxh3);
        row(chunk, "cold", g, x);
    }
}

fn row(chunk: usize, what: &str, g: f64, x: f64) {
    let gbps = |s: f64| chunk as f64 / s / 1e9;
    println!(
        "{:>4}Mi {:>5} {:>7.1} ({:>4.1} GB/s) {:>7.1} ({:>4.1} GB/s) {:>6.2}x",
        chunk >> 20,
        what,
        g * 1e6,
        gbps(g),
        x * 1e6,
        gbps(x),
        g / x
    );
}
