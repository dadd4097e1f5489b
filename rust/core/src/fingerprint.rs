//! Fingerprints of source bytes: how both backends tell that a source has not changed since
//! its chunk was encrypted (the pipeline's `validation="fingerprint"` and the edges of
//! watched chunks; the interposer's hits on memory nobody registered).
//!
//! The one fingerprint of the workspace: a 128-bit GMAC of the bytes under a key drawn at
//! random once per process (the bytes are the AAD of an empty AES-GCM message; the tag is
//! their GHASH, masked). Why keyed, and not a fast unkeyed hash (XXH3-128 served here
//! before): the bytes being checked are not only the serving program's own. They come from
//! whoever feeds it (a tenant's LoRA adapter written over another's, a KV block rewritten
//! from a request), and a stale hit delivers the old bytes in place of the new, exactly what
//! the design must never do. Collisions of an unkeyed hash can be constructed by whoever
//! knows the old bytes; for GMAC, two different inputs of `n` bytes collide with probability
//! at most about `n/16 * 2^-128` whatever they are, unless they were chosen knowing the key,
//! which never leaves this process. The price, measured side by side in bench/RESULTS.md,
//! is small: GHASH with carry-less multiplication runs at memory speed on cold sources.

use crate::crypto::AeadKey;
use crate::error::Result;
use std::sync::OnceLock;
use zeroize::Zeroize;

/// A fingerprint: equal bytes give equal values within one process.
pub type Fingerprint = u128;

static K: OnceLock<AeadKey> = OnceLock::new();

fn draw() -> Result<AeadKey> {
    let mut raw = [0u8; 32];
    let drawn = crate::crypto::fill_random(&mut raw);
    let k = drawn.and_then(|()| AeadKey::new(&raw));
    raw.zeroize();
    k
}

/// Draws the process's fingerprint key now, if it has none yet. Whoever starts threads that
/// fingerprint calls this first, on its own thread: drawing takes the crypto library's
/// random generator, whose global state its destructors tear down while the process exits,
/// and a worker drawing it then (a thread still running at exit) would abort the process.
pub fn prepare() -> Result<()> {
    if K.get().is_none() {
        let _ = K.set(draw()?); // a racing caller's key won: either serves
    }
    Ok(())
}

fn key() -> &'static AeadKey {
    K.get_or_init(|| draw().expect("system randomness")) // `prepare` reports its failure
}

pub fn fingerprint(bytes: &[u8]) -> Fingerprint {
    let tag = key()
        .seal(&[0u8; 12], bytes, &[], &mut [])
        .expect("GMAC of a slice");
    u128::from_le_bytes(tag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_single_bit_change_changes_the_fingerprint() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
        let f = fingerprint(&data);
        assert_eq!(
            fingerprint(&data.clone()),
            f,
            "equal bytes, equal fingerprints"
        );
        for pos in [0, 1, 2047, 4095] {
            for bit in 0..8 {
                let mut d = data.clone();
                d[pos] ^= 1 << bit;
                assert_ne!(fingerprint(&d), f);
            }
        }
        assert_ne!(fingerprint(&data[..4095]), f);
        let mut longer = data.clone();
        longer.push(0);
        assert_ne!(
            fingerprint(&longer),
            f,
            "a trailing zero byte changes the length block"
        );
    }
}
