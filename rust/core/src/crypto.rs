//! The one module that calls into AWS-LC (chosen by measurement: see bench/RESULTS.md). Every
//! `unsafe` block of the cryptographic core is here, each with the argument for why it is sound.
//!
//! We call `aws-lc-sys` rather than `aws-lc-rs` for two things the safe crate does not offer:
//! sealing out of place (source buffer → staging buffer, no extra copy) and owning the
//! `EVP_AEAD_CTX` memory, so that the expanded key schedule is zeroized by us on drop.

use crate::error::{check_same_len, Error, Result};
use crate::header::{IV_LEN, TAG_LEN};
use aws_lc_sys as ffi;
use std::mem::MaybeUninit;
use zeroize::{Zeroize, Zeroizing};

pub const KEY_LEN: usize = 32;

/// An AES-256-GCM key ready to seal and open (16-byte tags, 12-byte IVs).
pub struct AeadKey {
    /// Boxed so its address is stable: AWS-LC may keep pointers into its own state.
    ctx: Box<MaybeUninit<ffi::EVP_AEAD_CTX>>,
    /// Raw key, kept for the streaming verifier (the EVP_CIPHER API needs it at init) and
    /// for counter-mode decryption.
    raw: Zeroizing<[u8; KEY_LEN]>,
    /// GHASH's key H = AES_K(0^128), for [`AeadKey::snapshot_and_tag`].
    hash_key: Zeroizing<[u8; 16]>,
}

// SAFETY: AWS-LC documents that an initialised EVP_AEAD_CTX may be used from several threads at
// once through its `const` functions (seal/open/seal_scatter/open_gather take `const
// EVP_AEAD_CTX *` and keep no per-call state in it); we never mutate it after `new` except in
// `drop`, which has exclusive access. `raw` is plain bytes.
unsafe impl Send for AeadKey {}
// SAFETY: see `Send`: shared use only goes through AWS-LC's const, thread-safe functions.
unsafe impl Sync for AeadKey {}

impl AeadKey {
    pub fn new(key: &[u8; KEY_LEN]) -> Result<Self> {
        let mut ctx = Box::new(MaybeUninit::<ffi::EVP_AEAD_CTX>::zeroed());
        // SAFETY: `ctx` points to writable memory of the right size and alignment for an
        // EVP_AEAD_CTX; `key` is KEY_LEN readable bytes; AES-256-GCM is a static table.
        let ok = unsafe {
            ffi::EVP_AEAD_CTX_init(
                ctx.as_mut_ptr(),
                ffi::EVP_aead_aes_256_gcm(),
                key.as_ptr(),
                KEY_LEN,
                TAG_LEN,
                std::ptr::null_mut(),
            )
        };
        if ok != 1 {
            return Err(Error::Backend("EVP_AEAD_CTX_init failed"));
        }
        let mut schedule = AesSchedule::new(key)?;
        let mut hash_key = Zeroizing::new([0u8; 16]);
        schedule.encrypt_block(&[0u8; 16], &mut hash_key);
        drop(schedule);
        Ok(Self {
            ctx,
            raw: Zeroizing::new(*key),
            hash_key,
        })
    }

    fn ctx(&self) -> *const ffi::EVP_AEAD_CTX {
        self.ctx.as_ptr()
    }

    /// Encrypts `src` into `dst` (same length) and returns the tag.
    pub fn seal(
        &self,
        iv: &[u8; IV_LEN],
        aad: &[u8],
        src: &[u8],
        dst: &mut [u8],
    ) -> Result<[u8; TAG_LEN]> {
        check_same_len(dst.len(), src.len())?;
        // SAFETY: `src` and `dst` are distinct borrows (the borrow checker forbids aliasing a
        // `&` and a `&mut`), each valid for `len` bytes; AWS-LC requires in/out to alias
        // exactly or not at all. The tag buffer holds TAG_LEN bytes, the limit we pass.
        unsafe { self.seal_raw(iv, aad, src.as_ptr(), dst.as_mut_ptr(), src.len()) }
    }

    /// Encrypts `len = dst.len()` bytes read straight from `src` into `dst`, for a source
    /// that other threads may write meanwhile (memory the caller watches for writes): the
    /// bytes read are then a mix, and the caller must discard the result unless its watch
    /// says nothing wrote since before this call. No `&[u8]` of the source is ever formed.
    ///
    /// # Safety
    /// `src` must be readable for `dst.len()` bytes for the whole call and must not overlap
    /// `dst`.
    // SAFETY: an `unsafe fn` because of the pointer contract above; every caller states why
    // it holds at its call site.
    pub unsafe fn seal_from_raw(
        &self,
        iv: &[u8; IV_LEN],
        aad: &[u8],
        src: *const u8,
        dst: &mut [u8],
    ) -> Result<[u8; TAG_LEN]> {
        // SAFETY: the caller guarantees `src` readable and disjoint from `dst`, which is an
        // exclusive borrow valid for its length.
        unsafe { self.seal_raw(iv, aad, src, dst.as_mut_ptr(), dst.len()) }
    }

    /// Encrypts `src` into uninitialised memory `dst` (same length): for fresh output buffers,
    /// which then need no zeroing first.
    pub fn seal_uninit(
        &self,
        iv: &[u8; IV_LEN],
        aad: &[u8],
        src: &[u8],
        dst: &mut [MaybeUninit<u8>],
    ) -> Result<[u8; TAG_LEN]> {
        check_same_len(dst.len(), src.len())?;
        // SAFETY: as in `seal`; AWS-LC only writes the output (never reads it), so it may be
        // uninitialised, and on success it has written all `len` bytes.
        unsafe { self.seal_raw(iv, aad, src.as_ptr(), dst.as_mut_ptr().cast(), src.len()) }
    }

    /// Encrypts `buf` in place and returns the tag.
    pub fn seal_in_place(
        &self,
        iv: &[u8; IV_LEN],
        aad: &[u8],
        buf: &mut [u8],
    ) -> Result<[u8; TAG_LEN]> {
        let p = buf.as_mut_ptr();
        // SAFETY: input and output alias exactly, which AWS-LC allows; `buf` is valid for
        // reads and writes of its length and exclusively ours for the call.
        unsafe { self.seal_raw(iv, aad, p, p, buf.len()) }
    }

    /// # Safety
    /// `src` must be readable and `dst` writable for `len` bytes, and they must either be the
    /// same pointer or not overlap.
    // SAFETY: an `unsafe fn` because of the pointer contract above; every caller states why
    // it holds at its call site.
    unsafe fn seal_raw(
        &self,
        iv: &[u8; IV_LEN],
        aad: &[u8],
        src: *const u8,
        dst: *mut u8,
        len: usize,
    ) -> Result<[u8; TAG_LEN]> {
        let mut tag = [0u8; TAG_LEN];
        let mut tag_len = 0usize;
        // SAFETY: the caller guarantees src/dst; iv, tag and aad are live Rust buffers of the
        // lengths passed; the context was initialised in `new` and lives as long as `self`.
        let ok = unsafe {
            ffi::EVP_AEAD_CTX_seal_scatter(
                self.ctx(),
                dst,
                tag.as_mut_ptr(),
                &mut tag_len,
                TAG_LEN,
                iv.as_ptr(),
                IV_LEN,
                src,
                len,
                std::ptr::null(),
                0,
                aad.as_ptr(),
                aad.len(),
            )
        };
        if ok != 1 || tag_len != TAG_LEN {
            return Err(Error::Backend("EVP_AEAD_CTX_seal_scatter failed"));
        }
        Ok(tag)
    }

    /// Verifies and decrypts `ct` into `dst`, which must be memory nobody else can read until
    /// this returns `Ok` (a buffer this process just allocated, or one the caller hides).
    /// AWS-LC writes plaintext while it computes the tag, so on failure `dst` is zeroed before
    /// returning.
    pub fn open_private(
        &self,
        iv: &[u8; IV_LEN],
        aad: &[u8],
        ct: &[u8],
        tag: &[u8; TAG_LEN],
        dst: &mut [u8],
    ) -> Result<()> {
        check_same_len(dst.len(), ct.len())?;
        // SAFETY: `ct` and `dst` are distinct borrows valid for their (equal) lengths; iv, tag
        // and aad are live buffers of the lengths passed; the context is initialised.
        let ok = unsafe {
            ffi::EVP_AEAD_CTX_open_gather(
                self.ctx(),
                dst.as_mut_ptr(),
                iv.as_ptr(),
                IV_LEN,
                ct.as_ptr(),
                ct.len(),
                tag.as_ptr(),
                TAG_LEN,
                aad.as_ptr(),
                aad.len(),
            )
        };
        if ok != 1 {
            dst.zeroize();
            return Err(Error::Authentication(
                "tag does not match header and ciphertext",
            ));
        }
        Ok(())
    }

    /// Checks the tag without writing plaintext anywhere the caller can see: decrypts in
    /// small pieces into a scratch buffer of our own that is wiped afterwards. Costs one
    /// decryption pass; used before decrypting into caller-visible memory.
    pub fn verify(
        &self,
        iv: &[u8; IV_LEN],
        aad: &[u8],
        ct: &[u8],
        tag: &[u8; TAG_LEN],
    ) -> Result<()> {
        StreamingCipher::new(&self.raw, iv, false)?.verify(aad, ct, tag)
    }
}

/// Largest GCM plaintext: 2^32 - 2 blocks (SP 800-38D §5.2.1.1), so the 32-bit block
/// counter, which starts at 2 for the first plaintext block, never wraps.
const GCM_MAX_LEN: u64 = ((1u64 << 32) - 2) * 16;

impl AeadKey {
    /// Copies `src` into `dst` (same length) and returns the GCM tag that a message without
    /// AAD whose ciphertext is `dst` must carry, without decrypting anything: a tag check
    /// that costs one GHASH pass instead of a whole decryption, so that decryption itself
    /// can be done later, elsewhere. One pass over the bytes: each piece is hashed right
    /// after it is copied, while it is still in cache. The tag is of the copy, never of
    /// `src`: for a source another party can change (a buffer shared with the host), what
    /// is checked is exactly what stays. Compare in constant time ([`tags_equal`]).
    ///
    /// How: GCM's tag is GHASH_H(blocks, length block) ^ AES_K(J0). GMAC of the same bytes
    /// taken as AAD (a GCM encryption of no plaintext after that AAD) hashes the very same
    /// padded blocks under the same H and masks with the same AES_K(J0); only the final
    /// length block differs (len(A) || len(C) = bits || 0 instead of 0 || bits). GHASH's
    /// last step is (X ^ L)·H, so the two tags differ by exactly (L_gmac ^ L_gcm)·H, one
    /// product in GF(2^128).
    pub fn snapshot_and_tag(
        &self,
        iv: &[u8; IV_LEN],
        src: &[u8],
        dst: &mut [u8],
    ) -> Result<[u8; TAG_LEN]> {
        check_same_len(dst.len(), src.len())?;
        if src.len() as u64 > GCM_MAX_LEN {
            return Err(Error::InvalidLength(format!(
                "{} bytes is over GCM's message limit",
                src.len()
            )));
        }
        let mut gmac = StreamingCipher::new(&self.raw, iv, true)?;
        for (s, d) in src.chunks(SNAPSHOT_STEP).zip(dst.chunks_mut(SNAPSHOT_STEP)) {
            d.copy_from_slice(s);
            gmac.aad(d)?;
        }
        let tag = gmac.finish_tag()?;
        Ok(self.gmac_to_gcm_tag(tag, src.len()))
    }

    /// Turns the GMAC of `len` bytes (taken as AAD) into the GCM tag of the same bytes taken
    /// as ciphertext (see [`AeadKey::snapshot_and_tag`]).
    fn gmac_to_gcm_tag(&self, mut tag: [u8; TAG_LEN], len: usize) -> [u8; TAG_LEN] {
        let bits = (len as u64 * 8).to_be_bytes();
        let mut diff = [0u8; 16];
        diff[..8].copy_from_slice(&bits);
        diff[8..].copy_from_slice(&bits);
        let correction = Zeroizing::new(crate::gf128::mul(&diff, &self.hash_key));
        for (t, c) in tag.iter_mut().zip(correction.iter()) {
            *t ^= c;
        }
        tag
    }

    /// Verifies and decrypts `buf` in place (a message without AAD). Decryption deferred
    /// past a [`AeadKey::snapshot_and_tag`] check uses this rather than bare counter mode:
    /// AWS-LC's stitched AES-GCM is faster than its standalone CTR here (see the D2H
    /// breakdown in bench/RESULTS.md), and the tag is checked a second time for free. On
    /// failure `buf` is zeroed: it held unverified plaintext.
    pub fn open_in_place(
        &self,
        iv: &[u8; IV_LEN],
        tag: &[u8; TAG_LEN],
        buf: &mut [u8],
    ) -> Result<()> {
        let p = buf.as_mut_ptr();
        // SAFETY: input and output alias exactly, which AWS-LC allows; `buf` is valid for
        // reads and writes of its length and exclusively ours for the call; iv and tag are
        // live buffers of the lengths passed; the context is initialised.
        let ok = unsafe {
            ffi::EVP_AEAD_CTX_open_gather(
                self.ctx(),
                p,
                iv.as_ptr(),
                IV_LEN,
                p,
                buf.len(),
                tag.as_ptr(),
                TAG_LEN,
                std::ptr::null(),
                0,
            )
        };
        if ok != 1 {
            buf.zeroize();
            return Err(Error::Authentication("tag does not match the ciphertext"));
        }
        Ok(())
    }
}

/// Tag comparison whose time does not depend on where the tags differ.
pub fn tags_equal(a: &[u8; TAG_LEN], b: &[u8; TAG_LEN]) -> bool {
    ct_eq(a, b)
}

/// Comparison of two secrets (tags, keys) whose time does not depend on where they differ.
pub fn ct_eq<const N: usize>(a: &[u8; N], b: &[u8; N]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // black_box keeps the compiler from turning the fold into an early-exit compare.
    std::hint::black_box(diff) == 0
}

/// An expanded AES-256 encryption key, wiped on drop.
struct AesSchedule(ffi::AES_KEY);

impl AesSchedule {
    fn new(key: &[u8; KEY_LEN]) -> Result<Self> {
        // SAFETY: AES_KEY is plain integers; all zeroes is a valid (if useless) value.
        let mut s = Self(unsafe { std::mem::zeroed() });
        // SAFETY: `key` is 32 readable bytes (256 bits, as passed); the schedule is writable.
        if unsafe { ffi::AES_set_encrypt_key(key.as_ptr(), 256, &mut s.0) } != 0 {
            return Err(Error::Backend("AES_set_encrypt_key failed"));
        }
        Ok(s)
    }

    fn encrypt_block(&mut self, input: &[u8; 16], out: &mut [u8; 16]) {
        // SAFETY: 16-byte input and output blocks and an initialised schedule.
        unsafe { ffi::AES_encrypt(input.as_ptr(), out.as_mut_ptr(), &self.0) };
    }
}

impl Drop for AesSchedule {
    fn drop(&mut self) {
        self.0.rd_key.zeroize();
        self.0.rounds.zeroize();
    }
}

impl Drop for AeadKey {
    fn drop(&mut self) {
        // SAFETY: the context was initialised in `new` and is dropped exactly once.
        unsafe { ffi::EVP_AEAD_CTX_cleanup(self.ctx.as_mut_ptr()) };
        // The AES-GCM state (key schedule, GHASH table) lives inline in the context; wipe
        // every byte of it with volatile writes.
        // SAFETY: the Box holds size_of::<EVP_AEAD_CTX>() bytes that are ours to overwrite;
        // after cleanup AWS-LC no longer references them.
        let bytes = unsafe {
            std::slice::from_raw_parts_mut(
                self.ctx.as_mut_ptr().cast::<u8>(),
                std::mem::size_of::<ffi::EVP_AEAD_CTX>(),
            )
        };
        bytes.zeroize();
        // `raw` zeroizes itself (Zeroizing).
    }
}

/// AES-GCM through the streaming EVP_CIPHER interface: decryption to check a tag
/// (`verify`), or encryption of nothing after streamed AAD (a GMAC: `aad`, `finish_tag`).
struct StreamingCipher {
    ctx: *mut ffi::EVP_CIPHER_CTX,
}

/// Bytes decrypted per step of the streaming verifier: small enough to stay in L1/L2.
const VERIFY_STEP: usize = 16 << 10;
/// Bytes copied and then hashed per step of `snapshot_and_tag`: the piece is hashed while
/// it is still in L2.
const SNAPSHOT_STEP: usize = 64 << 10;

impl StreamingCipher {
    fn new(key: &[u8; KEY_LEN], iv: &[u8; IV_LEN], encrypt: bool) -> Result<Self> {
        // SAFETY: plain allocation; checked for null below.
        let ctx = unsafe { ffi::EVP_CIPHER_CTX_new() };
        if ctx.is_null() {
            return Err(Error::Backend("EVP_CIPHER_CTX_new failed"));
        }
        let this = Self { ctx };
        // SAFETY: ctx is a fresh context; key and iv are live buffers of 32 and 12 bytes
        // (AES-256-GCM's default IV length is 12, so no SET_IVLEN is needed).
        let ok = unsafe {
            ffi::EVP_CipherInit_ex(
                this.ctx,
                ffi::EVP_aes_256_gcm(),
                std::ptr::null_mut(),
                key.as_ptr(),
                iv.as_ptr(),
                encrypt as std::os::raw::c_int,
            )
        };
        if ok != 1 {
            return Err(Error::Backend("EVP_CipherInit_ex failed"));
        }
        Ok(this)
    }

    /// Feeds AAD (any length; only before any data).
    fn aad(&mut self, bytes: &[u8]) -> Result<()> {
        let mut out_len: std::os::raw::c_int = 0;
        // SAFETY: an initialised context; with a null output pointer EVP_CipherUpdate
        // consumes `bytes` (a live buffer of the length passed) as AAD and writes nothing.
        let ok = unsafe {
            ffi::EVP_CipherUpdate(
                self.ctx,
                std::ptr::null_mut(),
                &mut out_len,
                bytes.as_ptr(),
                c_len(bytes.len())?,
            )
        };
        if ok != 1 {
            return Err(Error::Backend("EVP_CipherUpdate(aad) failed"));
        }
        Ok(())
    }

    /// Ends an encryption of no data and returns its tag (the GMAC of the AAD).
    fn finish_tag(self) -> Result<[u8; TAG_LEN]> {
        let mut out_len: std::os::raw::c_int = 0;
        let mut scratch = [0u8; 16];
        let mut tag = [0u8; TAG_LEN];
        // SAFETY: an initialised encryption context; GCM writes nothing at final (the
        // scratch block is room to spare); GET_TAG writes TAG_LEN bytes into `tag`.
        unsafe {
            if ffi::EVP_EncryptFinal_ex(self.ctx, scratch.as_mut_ptr(), &mut out_len) != 1 {
                return Err(Error::Backend("EVP_EncryptFinal_ex failed"));
            }
            if ffi::EVP_CIPHER_CTX_ctrl(
                self.ctx,
                ffi::EVP_CTRL_GCM_GET_TAG,
                TAG_LEN as _,
                tag.as_mut_ptr().cast(),
            ) != 1
            {
                return Err(Error::Backend("EVP_CTRL_GCM_GET_TAG failed"));
            }
        }
        Ok(tag)
    }

    fn verify(self, aad: &[u8], ct: &[u8], tag: &[u8; TAG_LEN]) -> Result<()> {
        let mut scratch = Zeroizing::new([0u8; VERIFY_STEP]);
        let mut out_len: std::os::raw::c_int = 0;
        // SAFETY: (every call in this block) `self.ctx` is an initialised decryption context; every
        // pointer is a live buffer of the length passed; with a null output pointer
        // EVP_DecryptUpdate consumes AAD; GCM writes exactly as many bytes as it reads, so
        // `scratch` (VERIFY_STEP bytes) is large enough for each step.
        unsafe {
            let aad_len = c_len(aad.len())?;
            if ffi::EVP_DecryptUpdate(
                self.ctx,
                std::ptr::null_mut(),
                &mut out_len,
                aad.as_ptr(),
                aad_len,
            ) != 1
            {
                return Err(Error::Backend("EVP_DecryptUpdate(aad) failed"));
            }
            for piece in ct.chunks(VERIFY_STEP) {
                if ffi::EVP_DecryptUpdate(
                    self.ctx,
                    scratch.as_mut_ptr(),
                    &mut out_len,
                    piece.as_ptr(),
                    c_len(piece.len())?,
                ) != 1
                {
                    return Err(Error::Backend("EVP_DecryptUpdate failed"));
                }
            }
            let mut tag_copy = *tag;
            if ffi::EVP_CIPHER_CTX_ctrl(
                self.ctx,
                ffi::EVP_CTRL_GCM_SET_TAG,
                TAG_LEN as _,
                tag_copy.as_mut_ptr().cast(),
            ) != 1
            {
                return Err(Error::Backend("EVP_CTRL_GCM_SET_TAG failed"));
            }
            if ffi::EVP_DecryptFinal_ex(self.ctx, scratch.as_mut_ptr(), &mut out_len) != 1 {
                return Err(Error::Authentication(
                    "tag does not match header and ciphertext",
                ));
            }
        }
        Ok(())
    }
}

fn c_len(n: usize) -> Result<std::os::raw::c_int> {
    std::os::raw::c_int::try_from(n).map_err(|_| Error::InvalidLength("piece too large".into()))
}

impl Drop for StreamingCipher {
    fn drop(&mut self) {
        // SAFETY: `ctx` came from EVP_CIPHER_CTX_new and is freed once. AWS-LC's free path
        // releases the cipher state with OPENSSL_free, which cleanses the allocation.
        unsafe { ffi::EVP_CIPHER_CTX_free(self.ctx) };
    }
}

/// Fills `buf` from AWS-LC's CSPRNG.
pub fn fill_random(buf: &mut [u8]) -> Result<()> {
    // SAFETY: `buf` is writable for its length.
    if unsafe { ffi::RAND_bytes(buf.as_mut_ptr(), buf.len()) } != 1 {
        return Err(Error::Backend("RAND_bytes failed"));
    }
    Ok(())
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> Zeroizing<[u8; 32]> {
    let mut out = Zeroizing::new([0u8; 32]);
    // SAFETY: `data` is readable for its length and `out` holds the 32-byte digest.
    unsafe { ffi::SHA256(data.as_ptr(), data.len(), out.as_mut_ptr()) };
    out
}

/// HKDF-SHA256-Expand(prk, info) to 32 bytes (RFC 5869 §2.3).
pub fn hkdf_sha256_expand(prk: &[u8; 32], info: &[u8]) -> Result<Zeroizing<[u8; KEY_LEN]>> {
    let mut out = Zeroizing::new([0u8; KEY_LEN]);
    // SAFETY: all pointers are live buffers of the lengths passed; SHA-256 is a static table.
    let ok = unsafe {
        ffi::HKDF_expand(
            out.as_mut_ptr(),
            KEY_LEN,
            ffi::EVP_sha256(),
            prk.as_ptr(),
            prk.len(),
            info.as_ptr(),
            info.len(),
        )
    };
    if ok != 1 {
        return Err(Error::Backend("HKDF_expand failed"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    // NIST GCM test vector (gcmEncryptExtIV256.rsp, Count 0 with 128-bit PT and 128-bit AAD).
    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn matches_known_answer() {
        // McGrew & Viega, "The Galois/Counter Mode of Operation", test case 16 (AES-256).
        let key: [u8; 32] = hex("feffe9928665731c6d6a8f9467308308feffe9928665731c6d6a8f9467308308")
            .try_into()
            .unwrap();
        let iv: [u8; 12] = hex("cafebabefacedbaddecaf888").try_into().unwrap();
        let pt = hex("d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a721c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39");
        let aad = hex("feedfacedeadbeeffeedfacedeadbeefabaddad2");
        let ct = hex("522dc1f099567d07f47f37a32a84427d643a8cdcbfe5c0c97598a2bd2555d1aa8cb08e48590dbb3da7b08b1056828838c5f61e6393ba7a0abcc9f662");
        let tag = hex("76fc6ece0f4e1768cddf8853bb2d551b");
        let k = AeadKey::new(&key).unwrap();
        let mut out = vec![0u8; pt.len()];
        let t = k.seal(&iv, &aad, &pt, &mut out).unwrap();
        assert_eq!(out, ct);
        assert_eq!(t.to_vec(), tag);
        k.verify(&iv, &aad, &ct, &t).unwrap();
        let mut back = vec![0u8; ct.len()];
        k.open_private(&iv, &aad, &ct, &t, &mut back).unwrap();
        assert_eq!(back, pt);
    }

    #[test]
    fn verify_and_open_reject_any_flip() {
        let k = AeadKey::new(&[9u8; 32]).unwrap();
        let iv = [1u8; 12];
        let pt: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let mut ct = vec![0u8; pt.len()];
        let tag = k.seal(&iv, b"aad", &pt, &mut ct).unwrap();
        for pos in [0, 16_383, 16_384, 99_999] {
            let mut bad = ct.clone();
            bad[pos] ^= 0x80;
            assert!(k.verify(&iv, b"aad", &bad, &tag).is_err());
            let mut out = vec![0xAAu8; pt.len()];
            assert!(k.open_private(&iv, b"aad", &bad, &tag, &mut out).is_err());
            assert!(
                out.iter().all(|&b| b == 0),
                "failed open must wipe its output"
            );
        }
        assert!(k.verify(&iv, b"aaD", &ct, &tag).is_err());
        let mut bad_tag = tag;
        bad_tag[15] ^= 1;
        assert!(k.verify(&iv, b"aad", &ct, &bad_tag).is_err());
        assert!(k.verify(&[2u8; 12], b"aad", &ct, &tag).is_err());
    }

    #[test]
    fn split_check_matches_gcm_for_any_length() {
        let k = AeadKey::new(&[0x42u8; 32]).unwrap();
        for len in [0usize, 1, 15, 16, 17, 4095, 4096, 65_537, 1 << 20] {
            let iv = [(len % 251) as u8; 12];
            let pt: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
            let mut ct = vec![0u8; len];
            let tag = k.seal(&iv, b"", &pt, &mut ct).unwrap();
            let mut copy = vec![0u8; len];
            let t2 = k.snapshot_and_tag(&iv, &ct, &mut copy).unwrap();
            assert!(tags_equal(&t2, &tag), "len {len}");
            assert_eq!(copy, ct);
            let mut back = ct.clone();
            k.open_in_place(&iv, &tag, &mut back).unwrap();
            assert_eq!(back, pt, "len {len}");
            if len > 0 {
                let mut bad = ct.clone();
                bad[len / 2] ^= 1;
                assert!(!tags_equal(
                    &k.snapshot_and_tag(&iv, &bad, &mut copy).unwrap(),
                    &tag
                ));
            }
            let mut other_iv = iv;
            other_iv[11] ^= 1;
            assert!(!tags_equal(
                &k.snapshot_and_tag(&other_iv, &ct, &mut copy).unwrap(),
                &tag
            ));
        }
    }

    proptest::proptest! {
        #[test]
        fn split_check_agrees_with_gcm(
            key in proptest::array::uniform32(proptest::prelude::any::<u8>()),
            iv in proptest::array::uniform12(proptest::prelude::any::<u8>()),
            pt in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..5000),
            flip in proptest::prelude::any::<usize>(),
        ) {
            let k = AeadKey::new(&key).unwrap();
            let mut ct = vec![0u8; pt.len()];
            let tag = k.seal(&iv, b"", &pt, &mut ct).unwrap();
            let mut copy = vec![0u8; ct.len()];
            proptest::prop_assert!(tags_equal(&k.snapshot_and_tag(&iv, &ct, &mut copy).unwrap(), &tag));
            proptest::prop_assert_eq!(&copy, &ct);
            let mut back = ct.clone();
            k.open_in_place(&iv, &tag, &mut back).unwrap();
            proptest::prop_assert_eq!(&back, &pt);
            if !ct.is_empty() {
                let i = flip % ct.len();
                ct[i] ^= 1 << (flip % 8);
                proptest::prop_assert!(!tags_equal(&k.snapshot_and_tag(&iv, &ct, &mut copy).unwrap(), &tag));
            }
        }
    }

    #[test]
    fn in_place_equals_out_of_place() {
        let k = AeadKey::new(&[3u8; 32]).unwrap();
        let pt = vec![5u8; 5000];
        let mut a = vec![0u8; 5000];
        let ta = k.seal(&[0; 12], b"", &pt, &mut a).unwrap();
        let mut b = pt.clone();
        let tb = k.seal_in_place(&[0; 12], b"", &mut b).unwrap();
        assert_eq!((a, ta), (b, tb));
    }

    #[test]
    fn hkdf_matches_rfc5869_case1_expand() {
        // RFC 5869 test case 1: PRK and OKM (first 32 bytes of the 42).
        let prk: [u8; 32] = hex("077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5")
            .try_into()
            .unwrap();
        let info = hex("f0f1f2f3f4f5f6f7f8f9");
        let okm = hkdf_sha256_expand(&prk, &info).unwrap();
        assert_eq!(
            okm.to_vec(),
            hex("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf")
        );
    }
}
