//! Counters of the pipeline, updated with relaxed atomics (they are statistics: each is
//! exact on its own, and a snapshot taken while requests run may mix moments).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

#[derive(Default)]
pub(crate) struct Stats {
    pub hits: AtomicU64,
    pub late: AtomicU64,
    pub stale: AtomicU64,
    pub misses: AtomicU64,
    pub nops: AtomicU64,
    pub chunks_pre_encrypted: AtomicU64,
    pub bytes_pre_encrypted: AtomicU64,
    pub chunks_on_demand: AtomicU64,
    pub bytes_on_demand: AtomicU64,
    pub wasted_bytes: AtomicU64,
    pub stall_ns: AtomicU64,
    pub validation_ns: AtomicU64,
    pub validation_bytes_hashed: AtomicU64,
    pub positions_reserved: AtomicU64,
    pub worker_failures: AtomicU64,
    pub requests: AtomicU64,
    pub bytes_requested: AtomicU64,
}

/// A copy of the counters. Accounting identity once every transfer has been consumed and the
/// ring relinquished: `positions_reserved == hits + chunks_on_demand + nops`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StatsSnapshot {
    /// Chunks served from a valid pre-encrypted slot (the request paid no encryption).
    pub hits: u64,
    /// Predicted chunks whose encryption had not started yet: encrypted on demand.
    pub late: u64,
    /// Predicted chunks whose source changed after encryption: re-encrypted on demand.
    pub stale: u64,
    /// Chunks nobody predicted: encrypted on demand.
    pub misses: u64,
    /// NOP messages emitted (positions skipped).
    pub nops: u64,
    pub chunks_pre_encrypted: u64,
    pub bytes_pre_encrypted: u64,
    pub chunks_on_demand: u64,
    pub bytes_on_demand: u64,
    /// Bytes encrypted ahead of time and never delivered.
    pub wasted_bytes: u64,
    /// Time the request path waited for a worker to finish a chunk it needed.
    pub stall: Duration,
    /// Time the request path spent checking that sources were unchanged.
    pub validation: Duration,
    /// Source bytes the request path hashed to check them (fingerprint validation, and
    /// chunks whose pages could not be protected); 0 where page protection checked them all.
    pub validation_bytes_hashed: u64,
    pub positions_reserved: u64,
    pub worker_failures: u64,
    pub requests: u64,
    pub bytes_requested: u64,
    /// Arms that found a kept chunk still write-protected (no `mprotect` needed).
    pub watches_reused: u64,
    /// Chunks kept write-protected between uses now.
    pub watches_kept: u64,
}

impl Stats {
    pub fn add(c: &AtomicU64, v: u64) {
        c.fetch_add(v, Relaxed);
    }

    pub fn add_time(c: &AtomicU64, d: Duration) {
        c.fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Relaxed);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let g = |c: &AtomicU64| c.load(Relaxed);
        StatsSnapshot {
            hits: g(&self.hits),
            late: g(&self.late),
            stale: g(&self.stale),
            misses: g(&self.misses),
            nops: g(&self.nops),
            chunks_pre_encrypted: g(&self.chunks_pre_encrypted),
            bytes_pre_encrypted: g(&self.bytes_pre_encrypted),
            chunks_on_demand: g(&self.chunks_on_demand),
            bytes_on_demand: g(&self.bytes_on_demand),
            wasted_bytes: g(&self.wasted_bytes),
            stall: Duration::from_nanos(g(&self.stall_ns)),
            validation: Duration::from_nanos(g(&self.validation_ns)),
            validation_bytes_hashed: g(&self.validation_bytes_hashed),
            positions_reserved: g(&self.positions_reserved),
            worker_failures: g(&self.worker_failures),
            requests: g(&self.requests),
            bytes_requested: g(&self.bytes_requested),
            watches_reused: 0,
            watches_kept: 0,
        }
    }
}
