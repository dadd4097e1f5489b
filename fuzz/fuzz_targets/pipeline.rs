//! The speculative pipeline under arbitrary sequences of predictions, requests (in range or
//! not), relinquishing, plan clearing and source replacement, with a worker thread racing
//! the request path and a small key-usage limit forcing rotations, validated by fingerprints
//! or page protection (with or without chunks kept armed between uses).
//!
//! Invariants: every message the pipeline emits is accepted by the receiver model in the
//! order emitted and decrypts to the requested bytes; bad requests are typed errors; the
//! receiver ends exactly at the positions the pipeline reserved; nothing panics or hangs.
//! `PIPELLM_FUZZ_REPORT=1` prints at exit how many runs served hits validated by page
//! protection (a run without any would not test it).
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use pipellm_core::pipeline::{Pipeline, PipelineConfig, Source, Validation};
use pipellm_core::{Direction, KeyPolicy, Receiver, SessionKey};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Once};

/// Runs with page protection that served at least one hit without hashing all of its bytes
/// (some of it validated by a write watch).
static WATCHED_RUNS: AtomicU64 = AtomicU64::new(0);
static REPORT: Once = Once::new();

extern "C" fn report_at_exit() {
    eprintln!(
        "pipellm-fuzz pipeline: watched_runs={}",
        WATCHED_RUNS.load(Ordering::Relaxed)
    );
}

#[derive(Arbitrary, Debug)]
enum Op {
    Predict { src: u8, off: u16, len: Option<u16> },
    Request { src: u8, off: u16, len: Option<u16> },
    Relinquish,
    ClearPlan,
    Replace { src: u8, size: u16, seed: u8 },
}

#[derive(Arbitrary, Debug)]
struct Input {
    usage_limit: u16,
    workers: bool,
    /// 0: fingerprints; 1: page protection; 2: page protection, chunks kept armed.
    validation: u8,
    ops: Vec<Op>,
}

const CHUNK: usize = 256;

fn make(size: usize, seed: u8) -> Source {
    Arc::new(
        (0..size)
            .map(|i| (i as u8).wrapping_mul(seed | 1))
            .collect::<Vec<u8>>(),
    )
}

fuzz_target!(|input: Input| {
    REPORT.call_once(|| {
        if std::env::var("PIPELLM_FUZZ_REPORT").as_deref() == Ok("1") {
            // SAFETY: registers a plain extern "C" fn with no preconditions.
            unsafe { libc::atexit(report_at_exit) };
        }
    });
    let key = SessionKey::from_bytes(&[9u8; 32]).expect("32 bytes");
    let policy = KeyPolicy {
        usage_limit: (input.usage_limit as u64).max(4 * CHUNK as u64 / 16 + 4),
        rotate: true,
    };
    let cfg = PipelineConfig {
        channel: 1,
        direction: Direction::HostToDevice,
        policy,
        slots: 4,
        chunk_bytes: CHUNK,
        workers: input.workers as usize,
        // Each slot takes whole pages.
        max_staging_bytes: 4 * 4096,
        validation: match input.validation % 3 {
            0 => Validation::Fingerprint,
            _ => Validation::PageProtection,
        },
        keep_armed: if input.validation % 3 == 2 { 4 } else { 0 },
    };
    let protect = cfg.validation == Validation::PageProtection;
    // A valid configuration: failing here would make every run test nothing.
    let pipe = Pipeline::new(&key, cfg).expect("the pipeline starts");
    let mut rx = Receiver::new(&key, 1, Direction::HostToDevice, policy).expect("receiver");
    // Sources of a few pages: page protection watches only the pages wholly inside a
    // source (its first and last are fingerprinted), so smaller ones would never reach it.
    let mut sources: Vec<Source> = (0..4).map(|i| make(3 * 4096 + 300 * i, i as u8)).collect();
    let mut delivered = 0u64;
    let mut deliver = |rx: &mut Receiver, m: &pipellm_core::Message<_>, expect: &[u8]| {
        let got = rx
            .open(m)
            .expect("the receiver accepts every message in emitted order");
        assert_eq!(got, expect);
        delivered += 1;
    };
    for op in input.ops.iter().take(48) {
        match op {
            Op::Predict { src, off, len } => {
                let s = sources[*src as usize % 4].clone();
                let _ = pipe.predict(&[(s, *off as usize, len.map(|l| l as usize))]);
            }
            Op::Request { src, off, len } => {
                let s = sources[*src as usize % 4].clone();
                let (off, len) = (*off as usize, len.map(|l| l as usize));
                let Ok(mut t) = pipe.request(&s, off, len) else {
                    let end = len.map_or(Some(s.bytes().len()), |l| off.checked_add(l));
                    assert!(off > s.bytes().len() || end.is_none_or(|e| e > s.bytes().len()));
                    continue;
                };
                while let Some(m) = t.next_message() {
                    let (at, m) = m.expect("a valid request's messages are produced");
                    if m.is_nop() {
                        deliver(&mut rx, &m, &[]);
                    } else {
                        let from = off + at as usize;
                        deliver(&mut rx, &m, &s.bytes()[from..from + m.len()]);
                    }
                }
            }
            Op::Relinquish => {
                for (_, m) in pipe.relinquish_all().expect("relinquish") {
                    deliver(&mut rx, &m, &[]);
                }
            }
            Op::ClearPlan => {
                pipe.clear_plan();
            }
            Op::Replace { src, size, seed } => {
                sources[*src as usize % 4] = make(*size as usize % 20_000, *seed);
            }
        }
    }
    for (_, m) in pipe.relinquish_all().expect("relinquish") {
        deliver(&mut rx, &m, &[]);
    }
    let stats = pipe.stats();
    let reserved = stats.positions_reserved;
    if protect && stats.hits > 0 && stats.validation_bytes_hashed < stats.hits * CHUNK as u64 {
        WATCHED_RUNS.fetch_add(1, Ordering::Relaxed);
    }
    pipe.close();
    assert_eq!(
        delivered, reserved,
        "every reserved position reached the receiver"
    );
});
