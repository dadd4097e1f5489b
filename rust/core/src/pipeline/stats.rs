//! Counters of the pipeline, updated with relaxed atomics (they are statistics: each is
//! exact on its own, and a snapshot taken while requests run may mix moments).
//!
//! Every counter is named once, in the `stats!` invocation below: it makes the atomics, the
//! snapshot's fields and [`StatsSnapshot::fields`], through which the bindings build their
//! dictionary (the Python stub's `PipelineStats` is checked against it by a test).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// One entry of [`StatsSnapshot::fields`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StatValue {
    Count(u64),
    Seconds(f64),
}

macro_rules! stats {
    (
        counts { $($c:ident: $cdoc:literal,)* }
        times { $($t:ident in $tns:ident: $tdoc:literal,)* }
        kept { $($k:ident: $kdoc:literal,)* }
    ) => {
        #[derive(Default)]
        pub(crate) struct Stats {
            $(pub $c: AtomicU64,)*
            $(pub $tns: AtomicU64,)*
        }

        /// A copy of the counters. Accounting identity once every transfer has been consumed
        /// and the ring relinquished: `positions_reserved == hits + chunks_on_demand + nops`.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
        pub struct StatsSnapshot {
            $(#[doc = $cdoc] pub $c: u64,)*
            $(#[doc = $tdoc] pub $t: Duration,)*
            $(#[doc = $kdoc] pub $k: u64,)*
        }

        impl Stats {
            /// The counters now; the `kept` ones are filled in by the pipeline (they are not
            /// counted here but read from its kept watches).
            pub fn snapshot(&self) -> StatsSnapshot {
                StatsSnapshot {
                    $($c: self.$c.load(Relaxed),)*
                    $($t: Duration::from_nanos(self.$tns.load(Relaxed)),)*
                    $($k: 0,)*
                }
            }
        }

        impl StatsSnapshot {
            /// Every counter by name, in declaration order; times in seconds, named
            /// `<name>_seconds`.
            pub fn fields(&self) -> Vec<(&'static str, StatValue)> {
                vec![
                    $((stringify!($c), StatValue::Count(self.$c)),)*
                    $((concat!(stringify!($t), "_seconds"), StatValue::Seconds(self.$t.as_secs_f64())),)*
                    $((stringify!($k), StatValue::Count(self.$k)),)*
                ]
            }
        }
    };
}

stats! {
    counts {
        hits: "Chunks served from a valid pre-encrypted slot (the request paid no encryption).",
        misses: "Chunks nobody predicted: encrypted on demand.",
        late: "Predicted chunks whose encryption had not started yet: encrypted on demand.",
        stale: "Predicted chunks whose source changed after encryption: re-encrypted on demand.",
        nops: "NOP messages emitted (positions skipped).",
        chunks_pre_encrypted: "Chunks the workers encrypted ahead of their request.",
        bytes_pre_encrypted: "Bytes the workers encrypted ahead of their request.",
        chunks_on_demand: "Chunks encrypted when requested instead of ahead (misses, late, \
            stale, and chunks whose pre-encryption failed).",
        bytes_on_demand: "Bytes encrypted on the request path.",
        wasted_bytes: "Bytes encrypted ahead of time and never delivered.",
        validation_bytes_hashed: "Source bytes the request path hashed to check them \
            (fingerprint validation, and chunks whose pages could not be protected); 0 where \
            page protection checked them all.",
        positions_reserved: "IV positions reserved (speculatively or on demand).",
        worker_failures: "Encryptions a thread could not finish (a panic caught, an error \
            returned): the chunk is encrypted on demand again, or its error reported.",
        requests: "Transfers requested.",
        bytes_requested: "Bytes requested.",
    }
    times {
        stall in stall_ns: "Time the request path waited for a worker to finish a chunk it needed.",
        validation in validation_ns: "Time the request path spent checking that sources were \
            unchanged.",
    }
    kept {
        watches_reused: "Arms that found a kept chunk still write-protected (no `mprotect` \
            needed).",
        watches_kept: "Chunks kept write-protected between uses now.",
    }
}

impl Stats {
    pub fn add(c: &AtomicU64, v: u64) {
        c.fetch_add(v, Relaxed);
    }

    pub fn add_time(c: &AtomicU64, d: Duration) {
        c.fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_name_every_counter_once_with_its_value() {
        let s = Stats::default();
        Stats::add(&s.hits, 3);
        Stats::add(&s.bytes_requested, 7);
        Stats::add_time(&s.stall_ns, Duration::from_millis(1500));
        let mut snap = s.snapshot();
        snap.watches_kept = 2;
        let f = snap.fields();
        let names: std::collections::HashSet<_> = f.iter().map(|(n, _)| *n).collect();
        assert_eq!(names.len(), f.len(), "a name twice");
        let get = |n: &str| f.iter().find(|(k, _)| *k == n).map(|(_, v)| *v);
        assert_eq!(get("hits"), Some(StatValue::Count(3)));
        assert_eq!(get("bytes_requested"), Some(StatValue::Count(7)));
        assert_eq!(get("stall_seconds"), Some(StatValue::Seconds(1.5)));
        assert_eq!(get("watches_kept"), Some(StatValue::Count(2)));
        assert_eq!(get("stall"), None);
    }
}
