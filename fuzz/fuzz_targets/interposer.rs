//! The libcrypto interposer against libcrypto itself, in-process: the input decodes into a
//! sequence of EVP operations, each run twice with the same arguments on separate, identical
//! buffers: on context A through the interposer's hooks (`pipellm_cc::exports`), on context B
//! directly through the real libcrypto the hooks forward to (dlopen + dlsym, the same loaded
//! library). Every return value, `outl`, output byte, tag and parameter must be the same.
//!
//! Invariant: whatever a program does, its libcrypto results are those of libcrypto. The
//! "driver phase" operation makes the interposer serve messages from pre-encrypted chunks
//! (`PIPELLM_CC_WAIT_INFLIGHT=1`, set at start-up, makes that independent of timing), so the
//! served path is compared too, and the other operations perturb it.
//!
//! The input, byte by byte (a missing byte reads as 0): one byte seeding the buffers' bytes,
//! then operations, each an opcode byte (`% 13`) and its argument bytes (see `decode`), at
//! most `MAX_OPS`. `PIPELLM_FUZZ_TRACE=1` prints each input's decoded operations;
//! `PIPELLM_FUZZ_REPORT=1` prints the interposer's counters (hits among them) at exit.
//!
//! Operations never make libcrypto's output nondeterministic: a small model of each context
//! (from the calls made and their results, which are the same on both sides) puts an IV in
//! place before any data on a GCM context that could otherwise encrypt under a random IV
//! (and a key on a CTR context that has none), as tests/evp_diff does.
#![no_main]
#![deny(clippy::undocumented_unsafe_blocks)]

use libfuzzer_sys::fuzz_target;
use pipellm_cc::exports as hook;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::fmt::{Debug, Write as _};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

type Ctx = *mut c_void;
type Cipher = *const c_void;
type Engine = *mut c_void;
type NewFn = unsafe extern "C" fn() -> Ctx;
type FreeFn = unsafe extern "C" fn(Ctx);
type ResetFn = unsafe extern "C" fn(Ctx) -> c_int;
type CopyFn = unsafe extern "C" fn(Ctx, Ctx) -> c_int;
type CtrlFn = unsafe extern "C" fn(Ctx, c_int, c_int, *mut c_void) -> c_int;
type GetParamsFn = unsafe extern "C" fn(Ctx, *mut c_void) -> c_int;
type InitFn = unsafe extern "C" fn(Ctx, Cipher, Engine, *const u8, *const u8) -> c_int;
type Init2Fn = unsafe extern "C" fn(Ctx, Cipher, *const u8, *const u8, *const c_void) -> c_int;
type CipherInitFn = unsafe extern "C" fn(Ctx, Cipher, Engine, *const u8, *const u8, c_int) -> c_int;
type UpdateFn = unsafe extern "C" fn(Ctx, *mut u8, *mut c_int, *const u8, c_int) -> c_int;
type FinalFn = unsafe extern "C" fn(Ctx, *mut u8, *mut c_int) -> c_int;
type CipherGetFn = unsafe extern "C" fn() -> Cipher;

const CTRL_SET_IVLEN: c_int = 0x9;
const CTRL_GET_TAG: c_int = 0x10;
const CTRL_SET_TAG: c_int = 0x11;
const OSSL_PARAM_UNSIGNED_INTEGER: u32 = 2;
const OSSL_PARAM_OCTET_STRING: u32 = 5;
const OSSL_PARAM_UNMODIFIED: usize = usize::MAX;

/// Context pairs (A through the hooks, B direct).
const NSLOT: usize = 3;
/// Buffers per side: 0..=2 are the driver phases' sources, 3 their bounce buffer, 4 scratch
/// (and AAD); any of them may be an Update's input or output.
const NBUF: usize = 5;
const BOUNCE: usize = 3;
const SCRATCH: usize = 4;
const BUF_LEN: usize = (64 << 10) + 64;
const NKEYS: usize = 4;
const MAX_OPS: usize = 64;
/// Driver messages per input, all phases together (each at most 64 KiB, on both sides).
const MAX_MSGS: usize = 192;

const LENS: [usize; 8] = [0, 1, 16, 17, 4096, 4111, 16 << 10, 64 << 10];
const OFFS: [usize; 3] = [0, 16, 64];
const WRITE_LENS: [usize; 4] = [1, 16, 256, 4096];
const IVLENS: [c_int; 4] = [12, 8, 12, 16];

/// The driver phases' cycles: (source buffer, offset, length) in the order encrypted.
const LAYOUTS: [&[(usize, usize, usize)]; 4] = [
    &[(0, 0, 64 << 10), (1, 0, 64 << 10), (2, 0, 64 << 10)],
    &[
        (0, 0, 16 << 10),
        (0, 16 << 10, 16 << 10),
        (0, 32 << 10, 16 << 10),
        (0, 48 << 10, 16 << 10),
        (1, 0, 64 << 10),
    ],
    &[
        (0, 0, 64 << 10),
        (1, 0, 4096),
        (2, 0, 64 << 10),
        (1, 4096, 64),
    ],
    &[(0, 0, 32 << 10), (1, 32 << 10, 32 << 10)],
];

/// One side's EVP functions.
#[derive(Clone, Copy)]
struct Api {
    new: NewFn,
    free: FreeFn,
    reset: ResetFn,
    copy: CopyFn,
    ctrl: CtrlFn,
    get_params: GetParamsFn,
    encrypt_init_ex: InitFn,
    encrypt_init_ex2: Init2Fn,
    cipher_init_ex: CipherInitFn,
    decrypt_init_ex: InitFn,
    encrypt_update: UpdateFn,
    cipher_update: UpdateFn,
    decrypt_update: UpdateFn,
    encrypt_final_ex: FinalFn,
    encrypt_final: FinalFn,
    cipher_final_ex: FinalFn,
    decrypt_final_ex: FinalFn,
}

struct Env {
    hooks: Api,
    real: Api,
    /// EVP_aes_256_gcm, EVP_aes_128_gcm, EVP_aes_256_ctr (static objects of libcrypto).
    ciphers: [usize; 3],
    /// Index of the interposer's `panics` counter.
    panics: Option<usize>,
}

static ENV: OnceLock<Env> = OnceLock::new();
static EXECS: AtomicU64 = AtomicU64::new(0);
static MESSAGES: AtomicU64 = AtomicU64::new(0);

fn sym(h: *mut c_void, name: &str) -> *mut c_void {
    let c = CString::new(name).expect("no NUL in symbol names");
    // SAFETY: `h` is a live handle from dlopen, `c` a NUL-terminated string.
    let p = unsafe { libc::dlsym(h, c.as_ptr()) };
    assert!(!p.is_null(), "libcrypto has no {name}");
    p
}

fn stat_names() -> Vec<String> {
    // SAFETY: a null output with n = 0 only returns the number of counters.
    let n = unsafe { hook::pipellm_cc_stats(std::ptr::null_mut(), 0) };
    (0..n)
        .map(|i| {
            let p = hook::pipellm_cc_stat_name(i);
            if p.is_null() {
                format!("stat{i}")
            } else {
                // SAFETY: a non-null name is a static NUL-terminated string.
                unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
            }
        })
        .collect()
}

fn stats() -> Vec<u64> {
    let mut v = vec![0u64; 64];
    // SAFETY: `v` is writable for its length.
    let n = unsafe { hook::pipellm_cc_stats(v.as_mut_ptr(), v.len()) };
    v.truncate(n.min(64));
    v
}

extern "C" fn report_at_exit() {
    let line: Vec<String> = stat_names()
        .iter()
        .zip(stats())
        .map(|(n, v)| format!("{n}={v}"))
        .collect();
    eprintln!(
        "pipellm-fuzz interposer: execs={} driver_messages={} {}",
        EXECS.load(Ordering::Relaxed),
        MESSAGES.load(Ordering::Relaxed),
        line.join(" ")
    );
}

fn env_flag(name: &str) -> bool {
    matches!(std::env::var(name).as_deref(), Ok("1"))
}

fn setup() -> Env {
    // The interposer reads its settings once, at its first use: before any hook is called.
    // Waiting for in-flight chunks makes hits follow from the calls alone; chunks from 4 KiB
    // are pre-encrypted and served in 32 KiB pieces, so small phases exercise both.
    for (k, v) in [
        ("PIPELLM_CC_WAIT_INFLIGHT", "1"),
        ("PIPELLM_CC_MIN_BYTES", "4096"),
        ("PIPELLM_CC_SPLIT_BYTES", "32768"),
    ] {
        if std::env::var_os(k).is_none() {
            std::env::set_var(k, v);
        }
    }
    let r = pipellm_cc::real::real().expect("the interposer needs a real libcrypto.so.3");
    let path = CString::new(r.path.as_str()).expect("no NUL in a path");
    // SAFETY: a NUL-terminated path; the library is already loaded (by the interposer), so
    // this only takes another reference to it.
    let h = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    assert!(!h.is_null(), "dlopen {}", r.path);
    macro_rules! f {
        ($ty:ty, $name:literal) => {
            // SAFETY: OpenSSL 3's public function of that name has the C signature `$ty`.
            unsafe { std::mem::transmute::<*mut c_void, $ty>(sym(h, $name)) }
        };
    }
    let real = Api {
        new: f!(NewFn, "EVP_CIPHER_CTX_new"),
        free: f!(FreeFn, "EVP_CIPHER_CTX_free"),
        reset: f!(ResetFn, "EVP_CIPHER_CTX_reset"),
        copy: f!(CopyFn, "EVP_CIPHER_CTX_copy"),
        ctrl: f!(CtrlFn, "EVP_CIPHER_CTX_ctrl"),
        get_params: f!(GetParamsFn, "EVP_CIPHER_CTX_get_params"),
        encrypt_init_ex: f!(InitFn, "EVP_EncryptInit_ex"),
        encrypt_init_ex2: f!(Init2Fn, "EVP_EncryptInit_ex2"),
        cipher_init_ex: f!(CipherInitFn, "EVP_CipherInit_ex"),
        decrypt_init_ex: f!(InitFn, "EVP_DecryptInit_ex"),
        encrypt_update: f!(UpdateFn, "EVP_EncryptUpdate"),
        cipher_update: f!(UpdateFn, "EVP_CipherUpdate"),
        decrypt_update: f!(UpdateFn, "EVP_DecryptUpdate"),
        encrypt_final_ex: f!(FinalFn, "EVP_EncryptFinal_ex"),
        encrypt_final: f!(FinalFn, "EVP_EncryptFinal"),
        cipher_final_ex: f!(FinalFn, "EVP_CipherFinal_ex"),
        decrypt_final_ex: f!(FinalFn, "EVP_DecryptFinal_ex"),
    };
    // The same library as the hooks': the same functions.
    assert_eq!(real.encrypt_update as usize, r.encrypt_update as usize);
    assert_eq!(real.ctrl as usize, r.ctx_ctrl as usize);
    let cipher = |name: &str| {
        // SAFETY: EVP_aes_*() take no argument and return a static cipher object.
        unsafe { std::mem::transmute::<*mut c_void, CipherGetFn>(sym(h, name))() as usize }
    };
    let ciphers = [
        cipher("EVP_aes_256_gcm"),
        cipher("EVP_aes_128_gcm"),
        cipher("EVP_aes_256_ctr"),
    ];
    let hooks = Api {
        new: real.new, // not interposed
        free: hook::pipellm_EVP_CIPHER_CTX_free,
        reset: hook::pipellm_EVP_CIPHER_CTX_reset,
        copy: hook::pipellm_EVP_CIPHER_CTX_copy,
        ctrl: hook::pipellm_EVP_CIPHER_CTX_ctrl,
        get_params: hook::pipellm_EVP_CIPHER_CTX_get_params,
        encrypt_init_ex: hook::pipellm_EVP_EncryptInit_ex,
        encrypt_init_ex2: hook::pipellm_EVP_EncryptInit_ex2,
        cipher_init_ex: hook::pipellm_EVP_CipherInit_ex,
        decrypt_init_ex: hook::pipellm_EVP_DecryptInit_ex,
        encrypt_update: hook::pipellm_EVP_EncryptUpdate,
        cipher_update: hook::pipellm_EVP_CipherUpdate,
        decrypt_update: hook::pipellm_EVP_DecryptUpdate,
        encrypt_final_ex: hook::pipellm_EVP_EncryptFinal_ex,
        encrypt_final: hook::pipellm_EVP_EncryptFinal,
        cipher_final_ex: hook::pipellm_EVP_CipherFinal_ex,
        decrypt_final_ex: hook::pipellm_EVP_DecryptFinal_ex,
    };
    assert_eq!(hook::pipellm_cc_active(), 1, "the interposer is inert");
    if env_flag("PIPELLM_FUZZ_REPORT") {
        // SAFETY: registers a plain extern "C" fn with no preconditions.
        unsafe { libc::atexit(report_at_exit) };
    }
    let panics = stat_names().iter().position(|n| n == "panics");
    Env {
        hooks,
        real,
        ciphers,
        panics,
    }
}

// ---- the input --------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CipherSel {
    Aes256Gcm,
    Aes128Gcm,
    Aes256Ctr,
}

impl CipherSel {
    fn gcm(self) -> bool {
        self != CipherSel::Aes256Ctr
    }
}

#[derive(Debug, Clone, Copy)]
enum InitVariant {
    EncryptInitEx,
    /// With params NULL.
    EncryptInitEx2,
    CipherInitEx,
    DecryptInitEx,
}

#[derive(Debug, Clone, Copy)]
enum UpdateKind {
    Encrypt,
    Cipher,
    Decrypt,
}

#[derive(Debug, Clone, Copy)]
enum FinalKind {
    EncryptEx,
    Encrypt,
    CipherEx,
    DecryptEx,
}

#[derive(Debug, Clone, Copy)]
enum Out {
    /// The input's own bytes (`out == in`).
    InPlace,
    Buf {
        buf: usize,
        off: usize,
    },
}

/// A second parameter asked for with the tag: "ivlen", before or after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Extra {
    None,
    IvlenBefore,
    IvlenAfter,
}

/// How a driver phase starts each message.
#[derive(Debug, Clone, Copy)]
enum Spelling {
    /// EncryptInit_ex(ctx, NULL, NULL, NULL, iv): the CUDA driver's.
    IvOnly,
    /// EncryptInit_ex2(ctx, NULL, NULL, iv, NULL).
    IvOnlyEx2,
    /// CipherInit_ex(ctx, NULL, NULL, NULL, iv, 1).
    IvOnlyCipherInit,
    /// EncryptInit_ex(ctx, NULL, NULL, key, iv).
    KeyIv,
    /// EncryptInit_ex(ctx, aes-256-gcm, NULL, key, iv): a re-keying driver's.
    CipherKeyIv,
}

#[derive(Debug, Clone)]
enum Op {
    Free {
        slot: usize,
    },
    Init {
        slot: usize,
        variant: InitVariant,
        cipher: Option<CipherSel>,
        key: Option<usize>,
        /// The IV's bytes derive from this (see `iv_bytes`).
        iv: Option<u8>,
        /// CipherInit_ex only.
        enc: c_int,
    },
    SetIvlen {
        slot: usize,
        len: c_int,
    },
    /// EncryptUpdate(ctx, NULL, &outl, scratch, len).
    Aad {
        slot: usize,
        len: usize,
    },
    Update {
        slot: usize,
        kind: UpdateKind,
        input: usize,
        in_off: usize,
        out: Out,
        len: usize,
        /// Two Updates, the first of this many bytes.
        split: Option<usize>,
    },
    Final {
        slot: usize,
        kind: FinalKind,
        null_outl: bool,
    },
    GetTag {
        slot: usize,
        len: c_int,
    },
    /// SET_TAG with the slot's last tag.
    SetTag {
        slot: usize,
        len: c_int,
    },
    /// get_params with a "tag" octet string of `size` bytes (data NULL if `null_data`).
    GetParams {
        slot: usize,
        size: usize,
        null_data: bool,
        extra: Extra,
    },
    Copy {
        from: usize,
        to: usize,
    },
    Reset {
        slot: usize,
    },
    /// Rewrites bytes of a buffer (both sides alike): byte i becomes value ^ i.
    Write {
        buf: usize,
        off: usize,
        len: usize,
        value: u8,
    },
    /// `msgs` messages of the driver's pattern on the slot, continuing its IV counter and
    /// its place in the cycle unless `restart`: init (in `spelling`) with a 96-bit IV whose
    /// low 64 bits (little-endian, bytes 4..12, under a mask) count up by one, EncryptUpdate
    /// of the cycle's next chunk into the bounce buffer, EncryptFinal_ex, GET_TAG 16.
    /// `full_init`: EncryptInit_ex(ctx, aes-256-gcm, NULL, key, NULL) first.
    Driver {
        slot: usize,
        msgs: usize,
        layout: usize,
        spelling: Spelling,
        key: usize,
        full_init: bool,
        restart: Option<u8>,
    },
}

struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn byte(&mut self) -> u8 {
        let b = self.data.get(self.at).copied().unwrap_or(0);
        self.at += 1;
        b
    }

    fn more(&self) -> bool {
        self.at < self.data.len()
    }

    fn slot(&mut self) -> usize {
        self.byte() as usize % NSLOT
    }
}

/// The buffers' seed and the operations; the bytes of each operation are listed in order.
fn decode(data: &[u8]) -> (u8, Vec<Op>) {
    let mut r = Reader { data, at: 0 };
    let seed = r.byte();
    let mut ops = Vec::new();
    while r.more() && ops.len() < MAX_OPS {
        let op = match r.byte() % 13 {
            // slot
            0 => Op::Free { slot: r.slot() },
            // slot, variant, cipher, key, iv, enc
            1 => Op::Init {
                slot: r.slot(),
                variant: match r.byte() % 4 {
                    0 => InitVariant::EncryptInitEx,
                    1 => InitVariant::EncryptInitEx2,
                    2 => InitVariant::CipherInitEx,
                    _ => InitVariant::DecryptInitEx,
                },
                cipher: match r.byte() % 8 {
                    0 | 1 => None,
                    6 => Some(CipherSel::Aes128Gcm),
                    7 => Some(CipherSel::Aes256Ctr),
                    _ => Some(CipherSel::Aes256Gcm),
                },
                key: match r.byte() as usize % (NKEYS + 1) {
                    0 => None,
                    k => Some(k - 1),
                },
                iv: match r.byte() {
                    0 => None,
                    v => Some(v),
                },
                enc: [1, 0, -1][r.byte() as usize % 3],
            },
            // slot, len
            2 => Op::SetIvlen {
                slot: r.slot(),
                len: IVLENS[r.byte() as usize % IVLENS.len()],
            },
            // slot, len
            3 => Op::Aad {
                slot: r.slot(),
                len: LENS[r.byte() as usize % LENS.len()],
            },
            // slot, kind, input, in_off, out, out_off, len, split
            4 => {
                let slot = r.slot();
                let kind = match r.byte() % 8 {
                    6 => UpdateKind::Cipher,
                    7 => UpdateKind::Decrypt,
                    _ => UpdateKind::Encrypt,
                };
                let input = r.byte() as usize % NBUF;
                let in_off = OFFS[r.byte() as usize % OFFS.len()];
                let out = match r.byte() % 7 {
                    0 => Out::InPlace,
                    6 => Out::Buf {
                        buf: BOUNCE,
                        off: OFFS[r.byte() as usize % OFFS.len()],
                    },
                    b => Out::Buf {
                        buf: b as usize - 1,
                        off: OFFS[r.byte() as usize % OFFS.len()],
                    },
                };
                if matches!(out, Out::InPlace) {
                    r.byte(); // out_off, unused: the same layout either way
                }
                let len = LENS[r.byte() as usize % LENS.len()];
                let s = r.byte() as usize;
                let split = (s >= 128).then(|| len * (s - 128) / 127);
                Op::Update {
                    slot,
                    kind,
                    input,
                    in_off,
                    out,
                    len,
                    split,
                }
            }
            // slot, kind, flags
            5 => Op::Final {
                slot: r.slot(),
                kind: match r.byte() % 6 {
                    3 => FinalKind::Encrypt,
                    4 => FinalKind::CipherEx,
                    5 => FinalKind::DecryptEx,
                    _ => FinalKind::EncryptEx,
                },
                null_outl: r.byte() % 16 == 15,
            },
            // slot, len
            6 => Op::GetTag {
                slot: r.slot(),
                len: 1 + (r.byte() % 17) as c_int,
            },
            // slot, len
            7 => Op::SetTag {
                slot: r.slot(),
                len: 1 + (r.byte() % 17) as c_int,
            },
            // slot, size, flags
            8 => {
                let slot = r.slot();
                let size = r.byte() as usize % 18;
                let flags = r.byte();
                Op::GetParams {
                    slot,
                    size,
                    null_data: flags & 1 == 1,
                    extra: match (flags >> 1) % 4 {
                        1 => Extra::IvlenBefore,
                        2 => Extra::IvlenAfter,
                        _ => Extra::None,
                    },
                }
            }
            // from, to
            9 => {
                let from = r.slot();
                let mut to = r.slot();
                if to == from {
                    to = (to + 1) % NSLOT;
                }
                Op::Copy { from, to }
            }
            // slot
            10 => Op::Reset { slot: r.slot() },
            // buf, off (2 bytes, little-endian), len, value
            11 => {
                let buf = r.byte() as usize % NBUF;
                let off = u16::from_le_bytes([r.byte(), r.byte()]) as usize % BUF_LEN;
                let len = WRITE_LENS[r.byte() as usize % WRITE_LENS.len()].min(BUF_LEN - off);
                Op::Write {
                    buf,
                    off,
                    len,
                    value: r.byte(),
                }
            }
            // slot, msgs, layout, spelling, flags, key, restart
            _ => {
                let slot = r.slot();
                let msgs = 8 + r.byte() as usize % 57;
                let layout = r.byte() as usize % LAYOUTS.len();
                let spelling = match r.byte() % 10 {
                    6 => Spelling::IvOnlyEx2,
                    7 => Spelling::IvOnlyCipherInit,
                    8 => Spelling::KeyIv,
                    9 => Spelling::CipherKeyIv,
                    _ => Spelling::IvOnly,
                };
                let flags = r.byte();
                let key = r.byte() as usize % NKEYS;
                let restart = r.byte();
                Op::Driver {
                    slot,
                    msgs,
                    layout,
                    spelling,
                    key,
                    full_init: flags & 1 == 1,
                    restart: (flags & 2 == 2).then_some(restart),
                }
            }
        };
        ops.push(op);
    }
    (seed, ops)
}

fn iv_bytes(v: u8) -> [u8; 16] {
    std::array::from_fn(|i| v.wrapping_mul(31).wrapping_add((i as u8).wrapping_mul(59)))
}

fn fill(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for b in buf.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
}

// ---- one side: its contexts and buffers -------------------------------------------------------

#[repr(C)]
struct OsslParam {
    key: *const c_char,
    data_type: u32,
    data: *mut c_void,
    data_size: usize,
    return_size: usize,
}

impl OsslParam {
    fn end() -> Self {
        Self {
            key: std::ptr::null(),
            data_type: 0,
            data: std::ptr::null_mut(),
            data_size: 0,
            return_size: 0,
        }
    }
}

struct Side {
    api: Api,
    ctx: [Ctx; NSLOT],
    bufs: Vec<Vec<u8>>,
    keys: [[u8; 32]; NKEYS],
    iv: [u8; 16],
    tag_in: [u8; 32],
    /// Outputs of Final, GET_TAG, get_params: larger than any request, checked whole.
    fin: [u8; 32],
    tag: [u8; 32],
    param: [u8; 32],
    ivlen_out: usize,
}

/// What a get_params call answered: rc, the tag's and ivlen's return_size.
type ParamsOutcome = (c_int, usize, usize);

impl Side {
    fn new(api: Api, seed: u8) -> Self {
        let bufs = (0..NBUF)
            .map(|i| {
                let mut b = vec![0u8; BUF_LEN];
                fill(&mut b, ((seed as u64) << 8) | i as u64);
                b
            })
            .collect();
        Self {
            api,
            ctx: [std::ptr::null_mut(); NSLOT],
            bufs,
            keys: std::array::from_fn(|k| {
                std::array::from_fn(|i| (k as u8 + 1).wrapping_mul(0x35) ^ (i as u8))
            }),
            iv: [0; 16],
            tag_in: [0; 32],
            fin: [0; 32],
            tag: [0; 32],
            param: [0; 32],
            ivlen_out: 0,
        }
    }

    fn live(&mut self, s: usize) -> Ctx {
        if self.ctx[s].is_null() {
            // SAFETY: EVP_CIPHER_CTX_new has no preconditions.
            let c = unsafe { (self.api.new)() };
            assert!(!c.is_null(), "EVP_CIPHER_CTX_new failed");
            self.ctx[s] = c;
        }
        self.ctx[s]
    }

    fn buf_ptr(&mut self, b: usize, off: usize) -> *mut u8 {
        assert!(off <= BUF_LEN);
        // SAFETY: off <= the buffer's length. Vec::as_mut_ptr leaves earlier pointers valid.
        unsafe { self.bufs[b].as_mut_ptr().add(off) }
    }

    fn free(&mut self, s: usize) {
        let c = std::mem::replace(&mut self.ctx[s], std::ptr::null_mut());
        if !c.is_null() {
            // SAFETY: a context of ours, not used after this.
            unsafe { (self.api.free)(c) };
        }
    }

    fn init(
        &mut self,
        s: usize,
        variant: InitVariant,
        cipher: Cipher,
        key: Option<usize>,
        iv: Option<&[u8]>,
        enc: c_int,
    ) -> c_int {
        let ctx = self.live(s);
        let k = key.map_or(std::ptr::null(), |k| self.keys[k].as_ptr());
        let v = match iv {
            Some(b) => {
                self.iv = [0; 16];
                self.iv[..b.len()].copy_from_slice(b);
                self.iv.as_ptr()
            }
            None => std::ptr::null(),
        };
        let e = std::ptr::null_mut();
        // SAFETY: a live context; the key is 32 bytes and the IV 16, at least what any of
        // our ciphers and IV lengths (8, 12, 16) reads; the cipher is a libcrypto cipher or
        // null.
        unsafe {
            match variant {
                InitVariant::EncryptInitEx => (self.api.encrypt_init_ex)(ctx, cipher, e, k, v),
                InitVariant::EncryptInitEx2 => {
                    (self.api.encrypt_init_ex2)(ctx, cipher, k, v, std::ptr::null())
                }
                InitVariant::CipherInitEx => (self.api.cipher_init_ex)(ctx, cipher, e, k, v, enc),
                InitVariant::DecryptInitEx => (self.api.decrypt_init_ex)(ctx, cipher, e, k, v),
            }
        }
    }

    fn set_ivlen(&mut self, s: usize, len: c_int) -> c_int {
        let ctx = self.live(s);
        // SAFETY: a live context; SET_IVLEN takes no pointer.
        unsafe { (self.api.ctrl)(ctx, CTRL_SET_IVLEN, len, std::ptr::null_mut()) }
    }

    /// One Update; returns (rc, outl).
    fn update(
        &mut self,
        s: usize,
        kind: UpdateKind,
        out: *mut u8,
        input: *const u8,
        len: usize,
    ) -> (c_int, c_int) {
        let ctx = self.live(s);
        let f = match kind {
            UpdateKind::Encrypt => self.api.encrypt_update,
            UpdateKind::Cipher => self.api.cipher_update,
            UpdateKind::Decrypt => self.api.decrypt_update,
        };
        let mut outl: c_int = -77;
        // SAFETY: a live context; `input` is readable and `out` writable for `len` bytes,
        // within our buffers (the callers check the bounds; our ciphers are stream modes,
        // which write no more than they read); `out` is null only for AAD on a GCM context.
        let rc = unsafe { f(ctx, out, &mut outl, input, len as c_int) };
        (rc, outl)
    }

    fn final_(&mut self, s: usize, kind: FinalKind, null_outl: bool) -> (c_int, c_int) {
        let ctx = self.live(s);
        let f = match kind {
            FinalKind::EncryptEx => self.api.encrypt_final_ex,
            FinalKind::Encrypt => self.api.encrypt_final,
            FinalKind::CipherEx => self.api.cipher_final_ex,
            FinalKind::DecryptEx => self.api.decrypt_final_ex,
        };
        self.fin = [0x5a; 32];
        let mut outl: c_int = -77;
        let po: *mut c_int = if null_outl {
            std::ptr::null_mut()
        } else {
            &mut outl
        };
        // SAFETY: a live context; 32 writable bytes at `fin` (a stream mode writes none).
        let rc = unsafe { f(ctx, self.fin.as_mut_ptr(), po) };
        (rc, outl)
    }

    fn get_tag(&mut self, s: usize, len: c_int) -> c_int {
        let ctx = self.live(s);
        self.tag = [0xee; 32];
        // SAFETY: a live context; GET_TAG writes at most `len` (<= 17) bytes into 32.
        unsafe { (self.api.ctrl)(ctx, CTRL_GET_TAG, len, self.tag.as_mut_ptr().cast()) }
    }

    fn set_tag(&mut self, s: usize, len: c_int, tag: &[u8; 16]) -> c_int {
        let ctx = self.live(s);
        self.tag_in = [0; 32];
        self.tag_in[..16].copy_from_slice(tag);
        // SAFETY: a live context; SET_TAG reads at most `len` (<= 17) bytes of 32.
        unsafe { (self.api.ctrl)(ctx, CTRL_SET_TAG, len, self.tag_in.as_mut_ptr().cast()) }
    }

    fn get_params(
        &mut self,
        s: usize,
        size: usize,
        null_data: bool,
        extra: Extra,
    ) -> ParamsOutcome {
        let ctx = self.live(s);
        self.param = [0xdd; 32];
        self.ivlen_out = 0xaaaa_aaaa;
        let tag = OsslParam {
            key: c"tag".as_ptr(),
            data_type: OSSL_PARAM_OCTET_STRING,
            data: if null_data {
                std::ptr::null_mut()
            } else {
                self.param.as_mut_ptr().cast()
            },
            data_size: size,
            return_size: OSSL_PARAM_UNMODIFIED,
        };
        let ivlen = OsslParam {
            key: c"ivlen".as_ptr(),
            data_type: OSSL_PARAM_UNSIGNED_INTEGER,
            data: (&mut self.ivlen_out as *mut usize).cast(),
            data_size: std::mem::size_of::<usize>(),
            return_size: OSSL_PARAM_UNMODIFIED,
        };
        let (mut params, t, i) = match extra {
            Extra::None => (vec![tag, OsslParam::end()], 0, None),
            Extra::IvlenBefore => (vec![ivlen, tag, OsslParam::end()], 1, Some(0)),
            Extra::IvlenAfter => (vec![tag, ivlen, OsslParam::end()], 0, Some(1)),
        };
        // SAFETY: a live context; an OSSL_PARAM array ended by a null key, each entry's data
        // writable for its data_size bytes (the tag's 32 >= size <= 17) or null.
        let rc = unsafe { (self.api.get_params)(ctx, params.as_mut_ptr().cast()) };
        let ivlen_ret = i.map_or(0, |i| params[i].return_size);
        (rc, params[t].return_size, ivlen_ret)
    }

    fn copy(&mut self, from: usize, to: usize) -> c_int {
        let src = self.live(from);
        let dst = self.live(to);
        // SAFETY: two distinct live contexts.
        unsafe { (self.api.copy)(dst, src) }
    }

    fn reset(&mut self, s: usize) -> c_int {
        let ctx = self.live(s);
        // SAFETY: a live context.
        unsafe { (self.api.reset)(ctx) }
    }
}

// ---- the model: what each context may do deterministically ------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CipherModel {
    None,
    Known(CipherSel),
    /// After a failed init or copy that may have changed it.
    Unknown,
}

#[derive(Debug, Clone, Copy)]
struct Model {
    cipher: CipherModel,
    /// GCM: an IV was set since the cipher (or IV length) was, so no random IV is drawn.
    ivset: bool,
    keyset: bool,
    /// Direction, if known.
    enc: Option<bool>,
    /// The last tag GET_TAG returned (for SET_TAG).
    tag: [u8; 16],
}

impl Model {
    const FRESH: Model = Model {
        cipher: CipherModel::None,
        ivset: false,
        keyset: false,
        enc: None,
        tag: [0; 16],
    };

    /// Data or a Final now could make libcrypto's output nondeterministic (a GCM context
    /// drawing a random IV) or touch key material never set (a CTR context without a key).
    fn risky(&self) -> bool {
        let maybe = |gcm: bool| match self.cipher {
            CipherModel::None => false,
            CipherModel::Unknown => true,
            CipherModel::Known(c) => c.gcm() == gcm,
        };
        (maybe(true) && !self.ivset && self.enc != Some(false)) || (maybe(false) && !self.keyset)
    }

    fn after_init(
        &mut self,
        variant: InitVariant,
        cipher: Option<CipherSel>,
        key: bool,
        iv: bool,
        enc: c_int,
        rc: c_int,
    ) {
        if cipher.is_some() {
            // A cipher named: a new provider context, with no key and no IV until given.
            self.ivset = false;
            self.keyset = false;
        }
        if rc != 1 {
            if cipher.is_some() {
                self.cipher = CipherModel::Unknown;
            }
            self.enc = None;
            return;
        }
        match cipher {
            Some(c) => self.cipher = CipherModel::Known(c),
            None if self.cipher == CipherModel::None => self.cipher = CipherModel::Unknown,
            None => {}
        }
        match variant {
            InitVariant::EncryptInitEx | InitVariant::EncryptInitEx2 => self.enc = Some(true),
            InitVariant::DecryptInitEx => self.enc = Some(false),
            InitVariant::CipherInitEx if enc == 1 => self.enc = Some(true),
            InitVariant::CipherInitEx if enc == 0 => self.enc = Some(false),
            InitVariant::CipherInitEx => {}
        }
        self.keyset |= key;
        self.ivset |= iv;
    }
}

#[derive(Clone, Copy)]
struct DriverState {
    ctr: u64,
    mask: [u8; 12],
    pos: usize,
}

impl DriverState {
    fn new(v: u8) -> Self {
        let m = iv_bytes(v ^ 0xa5);
        Self {
            ctr: 1 + (v as u64) * 1000,
            mask: std::array::from_fn(|i| m[i]),
            pos: 0,
        }
    }

    fn next_iv(&mut self) -> [u8; 12] {
        let mut iv = self.mask;
        for (b, c) in iv[4..].iter_mut().zip(self.ctr.to_le_bytes()) {
            *b ^= c;
        }
        self.ctr += 1;
        iv
    }
}

// ---- one execution ----------------------------------------------------------------------------

struct Run<'e> {
    env: &'e Env,
    a: Side,
    b: Side,
    model: [Model; NSLOT],
    drv: [DriverState; NSLOT],
    ops: Vec<Op>,
    /// Calls the harness added (safety inits), by operation.
    notes: Vec<(usize, String)>,
    /// The operation running, and the driver message within it.
    at: usize,
    msg: Option<usize>,
    msgs_left: usize,
}

impl Run<'_> {
    fn cipher(&self, c: Option<CipherSel>) -> Cipher {
        match c {
            None => std::ptr::null(),
            Some(c) => self.env.ciphers[c as usize] as Cipher,
        }
    }

    fn both<R>(&mut self, mut f: impl FnMut(&mut Side) -> R) -> (R, R) {
        let ra = f(&mut self.a);
        let rb = f(&mut self.b);
        (ra, rb)
    }

    #[cold]
    fn diverged(&self, detail: std::fmt::Arguments<'_>) -> ! {
        let mut ops = String::new();
        for (i, op) in self.ops.iter().enumerate().take(self.at + 1) {
            let _ = writeln!(ops, "  #{i} {op:?}");
            for (_, note) in self.notes.iter().filter(|(j, _)| *j == i) {
                let _ = writeln!(ops, "      (preceded by a {note})");
            }
        }
        let msg = self
            .msg
            .map_or(String::new(), |m| format!(", driver message {m}"));
        let counters: Vec<String> = stat_names()
            .iter()
            .zip(stats())
            .filter(|(_, v)| *v != 0)
            .map(|(n, v)| format!("{n}={v}"))
            .collect();
        panic!(
            "the interposer (A) diverged from libcrypto (B) at op #{}{msg}: {detail}\n\
             operations so far:\n{ops}interposer counters (this process, nonzero): {}",
            self.at,
            counters.join(" ")
        );
    }

    fn check<T: PartialEq + Debug>(&self, what: &str, a: T, b: T) {
        if a != b {
            self.diverged(format_args!("{what}: A {a:?}, B {b:?}"));
        }
    }

    fn check_bytes(&self, what: &str, a: &[u8], b: &[u8]) {
        if a != b {
            let i = a.iter().zip(b).position(|(x, y)| x != y).unwrap_or(0);
            let n = a.iter().zip(b).filter(|(x, y)| x != y).count();
            let end = (i + 24).min(a.len());
            self.diverged(format_args!(
                "{what}: {n} of {} bytes differ, first at {i}: A {:02x?}, B {:02x?}",
                a.len(),
                &a[i..end],
                &b[i..end]
            ));
        }
    }

    fn check_buf(&self, what: &str, i: usize, range: std::ops::Range<usize>) {
        let (a, b) = (&self.a.bufs[i][range.clone()], &self.b.bufs[i][range]);
        self.check_bytes(&format!("{what}: buffer {i}"), a, b);
    }

    fn check_all_bufs(&self, what: &str) {
        for i in 0..NBUF {
            self.check_buf(what, i, 0..BUF_LEN);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn init(
        &mut self,
        what: &str,
        slot: usize,
        variant: InitVariant,
        cipher: Option<CipherSel>,
        key: Option<usize>,
        iv: Option<&[u8]>,
        enc: c_int,
    ) -> c_int {
        let c = self.cipher(cipher);
        let (ra, rb) = self.both(|s| s.init(slot, variant, c, key, iv, enc));
        self.check(what, ra, rb);
        self.model[slot].after_init(variant, cipher, key.is_some(), iv.is_some(), enc, rb);
        rb
    }

    /// Before data or a Final: an IV (and, for a CTR context without one, a key) is put in
    /// place where the model says libcrypto could otherwise answer nondeterministically.
    /// False if the context is still not safe to use (the operation is left out).
    fn make_safe(&mut self, slot: usize) -> bool {
        if !self.model[slot].risky() {
            return true;
        }
        let key = (!self.model[slot].keyset).then_some(0);
        let v = self.at as u8 | 1;
        let iv = iv_bytes(v);
        let variant = InitVariant::EncryptInitEx;
        let m = self
            .msg
            .map_or(String::new(), |m| format!(" before driver message {m}"));
        let k = if key.is_some() { "key 0" } else { "NULL" };
        let note = format!("safety init{m}: EncryptInit_ex(ctx, NULL, NULL, {k}, iv {v})");
        self.notes.push((self.at, note));
        self.init("safety init rc", slot, variant, None, key, Some(&iv), 1);
        !self.model[slot].risky()
    }

    fn exec(&mut self, op: Op) {
        match op {
            Op::Free { slot } => {
                self.both(|s| s.free(slot));
                self.model[slot] = Model::FRESH;
            }
            Op::Init {
                slot,
                variant,
                cipher,
                key,
                iv,
                enc,
            } => {
                let ivb = iv.map(iv_bytes);
                self.init(
                    "init rc",
                    slot,
                    variant,
                    cipher,
                    key,
                    ivb.as_ref().map(|v| &v[..]),
                    enc,
                );
            }
            Op::SetIvlen { slot, len } => {
                let (ra, rb) = self.both(|s| s.set_ivlen(slot, len));
                self.check("SET_IVLEN rc", ra, rb);
                if !matches!(
                    self.model[slot].cipher,
                    CipherModel::Known(CipherSel::Aes256Ctr)
                ) {
                    self.model[slot].ivset = false;
                }
            }
            Op::Aad { slot, len } => {
                // Only where GCM is certain: any other cipher would write to `out` (NULL).
                let gcm = matches!(self.model[slot].cipher, CipherModel::Known(c) if c.gcm());
                if !gcm || !self.make_safe(slot) {
                    return;
                }
                let (ra, rb) = self.both(|s| {
                    let aad = s.buf_ptr(SCRATCH, 0);
                    s.update(slot, UpdateKind::Encrypt, std::ptr::null_mut(), aad, len)
                });
                self.check("AAD update (rc, outl)", ra, rb);
            }
            Op::Update {
                slot,
                kind,
                input,
                in_off,
                out,
                len,
                split,
            } => {
                if !self.make_safe(slot) {
                    return;
                }
                let (out_buf, out_off) = match out {
                    Out::InPlace => (input, in_off),
                    Out::Buf { buf, off } => (buf, off),
                };
                let len = len.min(BUF_LEN - in_off).min(BUF_LEN - out_off);
                let pieces = match split {
                    Some(a) if a <= len => vec![(0, a), (a, len - a)],
                    _ => vec![(0, len)],
                };
                for (p, (at, n)) in pieces.into_iter().enumerate() {
                    let (ra, rb) = self.both(|s| {
                        let i = s.buf_ptr(input, in_off + at);
                        let o = s.buf_ptr(out_buf, out_off + at);
                        s.update(slot, kind, o, i, n)
                    });
                    self.check(&format!("update piece {p} (rc, outl)"), ra, rb);
                    self.check_buf("update output", out_buf, 0..BUF_LEN);
                }
            }
            Op::Final {
                slot,
                kind,
                null_outl,
            } => {
                if !self.make_safe(slot) {
                    return;
                }
                let (ra, rb) = self.both(|s| s.final_(slot, kind, null_outl));
                self.check("final (rc, outl)", ra, rb);
                self.check_bytes("final output", &self.a.fin, &self.b.fin);
            }
            Op::GetTag { slot, len } => self.get_tag(slot, len),
            Op::SetTag { slot, len } => {
                let tag = self.model[slot].tag;
                let (ra, rb) = self.both(|s| s.set_tag(slot, len, &tag));
                self.check("SET_TAG rc", ra, rb);
            }
            Op::GetParams {
                slot,
                size,
                null_data,
                extra,
            } => {
                let (ra, rb) = self.both(|s| s.get_params(slot, size, null_data, extra));
                self.check(
                    "get_params (rc, tag return_size, ivlen return_size)",
                    ra,
                    rb,
                );
                self.check_bytes("get_params tag bytes", &self.a.param, &self.b.param);
                self.check("get_params ivlen", self.a.ivlen_out, self.b.ivlen_out);
            }
            Op::Copy { from, to } => {
                let (ra, rb) = self.both(|s| s.copy(from, to));
                self.check("copy rc", ra, rb);
                if rb == 1 {
                    self.model[to] = self.model[from];
                } else if self.model[from].cipher != CipherModel::None {
                    let m = &mut self.model[to];
                    m.cipher = CipherModel::Unknown;
                    m.ivset = false;
                    m.keyset = false;
                    m.enc = None;
                }
            }
            Op::Reset { slot } => {
                let (ra, rb) = self.both(|s| s.reset(slot));
                self.check("reset rc", ra, rb);
                self.model[slot] = Model::FRESH;
            }
            Op::Write {
                buf,
                off,
                len,
                value,
            } => {
                self.both(|s| {
                    for (i, b) in s.bufs[buf][off..off + len].iter_mut().enumerate() {
                        *b = value ^ i as u8;
                    }
                });
            }
            Op::Driver {
                slot,
                msgs,
                layout,
                spelling,
                key,
                full_init,
                restart,
            } => self.driver(slot, msgs, layout, spelling, key, full_init, restart),
        }
    }

    fn get_tag(&mut self, slot: usize, len: c_int) {
        let (ra, rb) = self.both(|s| s.get_tag(slot, len));
        self.check(&format!("GET_TAG({len}) rc"), ra, rb);
        self.check_bytes(&format!("GET_TAG({len}) bytes"), &self.a.tag, &self.b.tag);
        if rb == 1 && len == 16 {
            self.model[slot].tag.copy_from_slice(&self.b.tag[..16]);
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn driver(
        &mut self,
        slot: usize,
        msgs: usize,
        layout: usize,
        spelling: Spelling,
        key: usize,
        full_init: bool,
        restart: Option<u8>,
    ) {
        if let Some(v) = restart {
            self.drv[slot] = DriverState::new(v);
        }
        if full_init {
            let gcm = Some(CipherSel::Aes256Gcm);
            let v = InitVariant::EncryptInitEx;
            self.init("driver key init rc", slot, v, gcm, Some(key), None, 1);
        }
        let cycle = LAYOUTS[layout];
        let n = msgs.min(self.msgs_left);
        self.msgs_left -= n;
        MESSAGES.fetch_add(n as u64, Ordering::Relaxed);
        for m in 0..n {
            self.msg = Some(m);
            let iv = self.drv[slot].next_iv();
            let (src, off, len) = cycle[self.drv[slot].pos % cycle.len()];
            self.drv[slot].pos += 1;
            let (variant, cipher, k, enc) = match spelling {
                Spelling::IvOnly => (InitVariant::EncryptInitEx, None, None, 1),
                Spelling::IvOnlyEx2 => (InitVariant::EncryptInitEx2, None, None, 1),
                Spelling::IvOnlyCipherInit => (InitVariant::CipherInitEx, None, None, 1),
                Spelling::KeyIv => (InitVariant::EncryptInitEx, None, Some(key), 1),
                Spelling::CipherKeyIv => {
                    let gcm = Some(CipherSel::Aes256Gcm);
                    (InitVariant::EncryptInitEx, gcm, Some(key), 1)
                }
            };
            self.init("driver init rc", slot, variant, cipher, k, Some(&iv), enc);
            if !self.make_safe(slot) {
                continue;
            }
            let (ra, rb) = self.both(|s| {
                let i = s.buf_ptr(src, off);
                let o = s.buf_ptr(BOUNCE, 0);
                s.update(slot, UpdateKind::Encrypt, o, i, len)
            });
            self.check("driver update (rc, outl)", ra, rb);
            self.check_buf("driver ciphertext", BOUNCE, 0..(len + 64).min(BUF_LEN));
            let (ra, rb) = self.both(|s| s.final_(slot, FinalKind::EncryptEx, false));
            self.check("driver final (rc, outl)", ra, rb);
            self.check_bytes("driver final output", &self.a.fin, &self.b.fin);
            self.get_tag(slot, 16);
        }
        self.msg = None;
        self.check_all_bufs("after the driver phase");
    }
}

fn run(data: &[u8]) {
    let env = ENV.get().expect("initialised");
    let (seed, ops) = decode(data);
    if env_flag("PIPELLM_FUZZ_TRACE") {
        eprintln!("seed {seed}");
        for (i, op) in ops.iter().enumerate() {
            eprintln!("#{i} {op:?}");
        }
    }
    EXECS.fetch_add(1, Ordering::Relaxed);
    let panics_before = env.panics.map(|i| stats()[i]);
    let mut r = Run {
        env,
        a: Side::new(env.hooks, seed),
        b: Side::new(env.real, seed),
        model: [Model::FRESH; NSLOT],
        drv: std::array::from_fn(|s| DriverState::new(s as u8)),
        ops: ops.clone(),
        notes: Vec::new(),
        at: 0,
        msg: None,
        msgs_left: MAX_MSGS,
    };
    for (i, op) in ops.into_iter().enumerate() {
        r.at = i;
        r.exec(op);
    }
    r.at = r.ops.len();
    r.check_all_bufs("at the end");
    for s in 0..NSLOT {
        r.a.free(s);
        r.b.free(s);
    }
    // The workers may still read the sources for chunks predicted for a freed context: let
    // them finish before the buffers go.
    hook::pipellm_cc_quiesce(10_000);
    if let (Some(i), Some(before)) = (env.panics, panics_before) {
        let after = stats()[i];
        assert_eq!(after, before, "the interposer caught internal panics");
    }
}

fuzz_target!(
    init: {
        ENV.get_or_init(setup);
    },
    |data: &[u8]| run(data)
);
