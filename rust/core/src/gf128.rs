//! Multiplication in GCM's field GF(2^128) (NIST SP 800-38D §6.3), for the one product the
//! split tag check needs (see [`crate::crypto::AeadKey::tag_of_ciphertext`]).
//!
//! Blocks are 16 bytes in GCM's bit order: the first bit of byte 0 is the coefficient of
//! x^0. Read big-endian into a `u128`, that bit is the most significant one, and a
//! multiplication by x is a right shift with the reduction constant 0xE1 << 120.
//!
//! Branch-free in both operands (masks instead of `if`), since one of them is the hash key H.

/// `x · y` in GF(2^128).
pub fn mul(x: &[u8; 16], y: &[u8; 16]) -> [u8; 16] {
    const R: u128 = 0xE1 << 120;
    let x = u128::from_be_bytes(*x);
    let mut v = u128::from_be_bytes(*y);
    let mut z = 0u128;
    for i in 0..128 {
        // All ones if bit i of x (counting from the most significant) is set.
        let take = 0u128.wrapping_sub((x >> (127 - i)) & 1);
        z ^= v & take;
        let carry = 0u128.wrapping_sub(v & 1);
        v = (v >> 1) ^ (R & carry);
    }
    z.to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The field's one: x^0, the most significant bit of byte 0.
    const ONE: [u8; 16] = {
        let mut b = [0u8; 16];
        b[0] = 0x80;
        b
    };

    fn from_hex(s: &str) -> [u8; 16] {
        let mut b = [0u8; 16];
        for (i, out) in b.iter_mut().enumerate() {
            *out = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
        }
        b
    }

    #[test]
    fn one_is_neutral_and_zero_absorbs() {
        let a = from_hex("66e94bd4ef8a2c3b884cfa59ca342b2e");
        assert_eq!(mul(&ONE, &a), a);
        assert_eq!(mul(&a, &ONE), a);
        assert_eq!(mul(&[0; 16], &a), [0; 16]);
    }

    #[test]
    fn matches_gcm_test_case_2_ghash() {
        // McGrew & Viega, test case 2 (AES-128, zero key, zero IV, one zero block):
        // H = 66e94bd4..., C = 0388dace..., len block = 0...0 || 0x80 (128 bits).
        // GHASH = ((C · H) ^ L) · H = f38cbb1a d69223dc c3457ae5 b6b0f885.
        let h = from_hex("66e94bd4ef8a2c3b884cfa59ca342b2e");
        let c = from_hex("0388dace60b6a392f328c2b971b2fe78");
        let mut l = [0u8; 16];
        l[15] = 0x80;
        let mut x = mul(&c, &h);
        for (a, b) in x.iter_mut().zip(l) {
            *a ^= b;
        }
        assert_eq!(mul(&x, &h), from_hex("f38cbb1ad69223dcc3457ae5b6b0f885"));
    }

    #[test]
    fn commutes_and_distributes() {
        let a = from_hex("0123456789abcdef0fedcba987654321");
        let b = from_hex("deadbeef00112233445566778899aabb");
        let c = from_hex("ffffffffffffffff0000000000000001");
        assert_eq!(mul(&a, &b), mul(&b, &a));
        let mut bc = b;
        for (x, y) in bc.iter_mut().zip(c) {
            *x ^= y;
        }
        let mut sum = mul(&a, &b);
        for (x, y) in sum.iter_mut().zip(mul(&a, &c)) {
            *x ^= y;
        }
        assert_eq!(mul(&a, &bc), sum);
    }
}
