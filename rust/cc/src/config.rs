//! Settings, read once from the environment (the launcher `pipellm run` writes them).

use std::sync::OnceLock;

#[derive(Debug, Clone)]
pub struct Config {
    /// `PIPELLM_CC_DISABLE=1`: forward every call untouched (the interposer stays inert).
    pub disabled: bool,
    /// `PIPELLM_CC_WORKERS`: pre-encryption threads (default 2).
    pub workers: usize,
    /// `PIPELLM_CC_DEPTH`: messages pre-encrypted ahead per context (default 8).
    pub depth: usize,
    /// `PIPELLM_CC_MIN_BYTES`: smaller messages are observed but not pre-encrypted (default
    /// 64 KiB): handling a tiny prediction costs more than encrypting it.
    pub min_bytes: usize,
    /// `PIPELLM_CC_HELPERS`: threads that serve a hit's pieces beside the caller (default:
    /// one less than the CPUs, at most 3).
    pub helpers: usize,
    /// `PIPELLM_CC_SPLIT_BYTES`: a hit is served in one piece per this many bytes (default
    /// 256 KiB; 0: never split).
    pub split_bytes: usize,
    /// `PIPELLM_CC_D2H=0`: decrypt every D2H chunk synchronously, even into receive pools
    /// (default: deferred there).
    pub d2h: bool,
    /// `PIPELLM_CC_D2H_THREADS`: threads that decrypt deferred D2H chunks (default 2; 0:
    /// right after the tag check, on the caller: for tests).
    pub d2h_threads: usize,
    /// `PIPELLM_CC_LOG=1`: one line on stderr per notable event (library found, a context's
    /// IV model rejected, a key that failed confirmation).
    pub log: bool,
    /// `PIPELLM_CC_WAIT_INFLIGHT=1`, a test aid, never for production: an EncryptUpdate
    /// whose chunk a worker is still encrypting waits for it (at most 10 s) instead of
    /// falling back to the real library at once. Hits, `late` and everything they decide
    /// (probing) then follow from the order of the calls, not from the machine's speed; the
    /// driver's critical path pays for the wait, which is what the default avoids.
    pub wait_inflight: bool,
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

fn env_flag(name: &str) -> bool {
    matches!(
        std::env::var(name).as_deref().map(str::trim),
        Ok("1") | Ok("true") | Ok("yes")
    )
}

pub fn config() -> &'static Config {
    static C: OnceLock<Config> = OnceLock::new();
    C.get_or_init(|| Config {
        disabled: env_flag("PIPELLM_CC_DISABLE"),
        workers: env_usize("PIPELLM_CC_WORKERS", 2).clamp(1, 64),
        depth: env_usize("PIPELLM_CC_DEPTH", 8).clamp(1, 256),
        min_bytes: env_usize("PIPELLM_CC_MIN_BYTES", 64 << 10),
        helpers: env_usize(
            "PIPELLM_CC_HELPERS",
            std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .saturating_sub(1)
                .min(3),
        )
        .min(64),
        split_bytes: env_usize("PIPELLM_CC_SPLIT_BYTES", 256 << 10),
        d2h: std::env::var("PIPELLM_CC_D2H").map_or(true, |v| v.trim() != "0"),
        d2h_threads: env_usize("PIPELLM_CC_D2H_THREADS", 2).min(16),
        log: env_flag("PIPELLM_CC_LOG"),
        wait_inflight: env_flag("PIPELLM_CC_WAIT_INFLIGHT"),
    })
}

pub fn log(msg: std::fmt::Arguments<'_>) {
    if config().log {
        eprintln!("pipellm-cc: {msg}");
    }
}
