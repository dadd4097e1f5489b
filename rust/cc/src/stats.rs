//! Counters, readable from C (`pipellm_cc_stats`) and so from Python through ctypes.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($name:ident: $doc:literal),* $(,)?) => {
        #[derive(Default)]
        pub struct Stats { $(#[doc = $doc] pub $name: AtomicU64,)* }
        /// The counters' names, in the order `snapshot` returns them.
        pub const NAMES: &[&str] = &[$(stringify!($name)),*];
        impl Stats {
            pub fn snapshot(&self) -> Vec<u64> {
                vec![$(self.$name.load(Ordering::Relaxed)),*]
            }
        }
    };
}

counters! {
    hits: "EncryptUpdate calls served from a pre-encrypted chunk",
    hit_bytes: "bytes served from pre-encrypted chunks",
    misses: "EncryptUpdate calls on tracked contexts encrypted by the real library",
    mispredicted: "a chunk was ready for the IV but for other memory or length",
    stale: "a chunk was ready but its source changed since it was encrypted",
    late: "the chunk for the IV was still being encrypted",
    waited: "chunks nearly encrypted when the driver needed them: waited for, not encrypted again",
    resyncs: "calls after a hit that needed the real context brought up to date",
    keys_confirmed: "keys whose real ciphertext and tag we reproduced",
    keys_refused: "keys whose real output we could not reproduce (context left alone)",
    models_rejected: "contexts whose IVs follow no known layout (left in pass-through)",
    jobs_done: "chunks pre-encrypted",
    jobs_unreadable: "predicted sources that could not be read (unmapped): skipped",
    jobs_dropped: "pre-encrypted chunks thrown away unused (prediction passed them)",
    continued: "chunks pre-encrypted as the continuation of a copy (no learned prediction)",
    panics: "internal panics caught (the interposer then forwards everything)",
    in_place: "EncryptUpdate calls whose output overlaps their input (never served)",
    confirmations: "messages encrypted a second time by us to confirm their context's key",
    hits_watched: "hits on chunks of watched ranges (validated by page protection, no read)",
    helpers_awake: "windows in which a hit helper stayed awake for a hit due at the recent pace",
    helpers_awake_us: "microseconds hit helpers spent awake in those windows (their cost)",
    helpers_ready: "windows in which the hit a helper stayed awake for came",
    stops: "1 once the pipeline stopped (a D2H chunk failed its tag): everything forwarded since",
    d2h_deferred: "D2H chunks answered after the tag check alone, decrypted later off the critical path",
    d2h_deferred_bytes: "bytes of deferred D2H chunks",
    d2h_forwarded: "D2H chunks on followed contexts decrypted by the real library",
    d2h_tag_failures: "deferred D2H chunks whose tag did not verify (the pipeline then stops)",
    d2h_resyncs: "deferred D2H chunks handed back to the real context by an unexpected call",
    d2h_keys_confirmed: "decryption keys whose real output our AES-GCM reproduced",
    d2h_late_failures: "deferred D2H chunks whose alias was written after the tag check (zeroed; the pipeline stops)",
    d2h_backpressure: "D2H chunks decrypted synchronously because too many were queued",
}

/// The interposer's counters, process-wide.
pub fn stats() -> &'static Stats {
    static S: std::sync::OnceLock<Stats> = std::sync::OnceLock::new();
    S.get_or_init(Stats::default)
}

impl Stats {
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
}
