//! Fingerprints of source bytes: how the pipeline tells that a source has not changed since
//! its chunk was encrypted. XXH3-128: fast (it is on the request path) and 128 bits, so a
//! changed chunk passes for the old one with probability about 2^-128. It guards against the
//! serving program changing its own buffers, not against an adversary (who would need to
//! write the process's memory, which already defeats any check).

pub type Fingerprint = u128;

pub fn fingerprint(bytes: &[u8]) -> Fingerprint {
    xxhash_rust::xxh3::xxh3_128(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_single_bit_change_changes_the_fingerprint() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
        let f = fingerprint(&data);
        for pos in [0, 1, 2047, 4095] {
            for bit in 0..8 {
                let mut d = data.clone();
                d[pos] ^= 1 << bit;
                assert_ne!(fingerprint(&d), f);
            }
        }
        assert_ne!(fingerprint(&data[..4095]), f);
    }
}
