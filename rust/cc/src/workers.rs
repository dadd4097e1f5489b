//! The pre-encryption workers: a queue of jobs (a chunk to encrypt under a context's key and
//! a predicted IV), the threads that take them, and the pool of buffers their results are
//! made in. What a job does is the engine's (`Engine::run`, handed in at `submit`); this
//! module only queues, wakes and waits.

use crate::config::{config, log};
use crate::ivmodel::Iv;
use crate::stats::{stats, Stats};
use pipellm_core::crypto::AeadKey;
use pipellm_core::locks::{lock, wait, wait_timeout};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, Once};
use std::time::{Duration, Instant};

/// A chunk to pre-encrypt: `len` bytes at `input`, under the key of context `ctx` (as of
/// its generation `gen`: a result for an older key is thrown away) and the predicted `iv`.
pub struct Job {
    pub ctx: usize,
    pub gen: u64,
    pub key: Arc<AeadKey>,
    pub iv: Iv,
    pub input: usize,
    pub len: usize,
}

pub struct Workers {
    jobs: Mutex<VecDeque<Job>>,
    job_ready: Condvar,
    /// Workers blocked on `job_ready` (changed under the `jobs` lock): a submission wakes
    /// at most that many, and none when all are busy (a wake-up is a syscall on the
    /// driver's critical path).
    idle: AtomicUsize,
    workers_started: Once,
    /// Worker threads running (set inside `workers_started`, before it completes).
    started: AtomicUsize,
    /// Threads in `quiesce` (changed under the `jobs` lock): a worker going idle wakes them
    /// through `quiet` only when there are some.
    quiescers: AtomicUsize,
    /// Paired with `jobs`: a worker found the queue empty (see `quiesce`).
    quiet: Condvar,
    /// Buffers of finished or dropped chunks, kept for the next jobs (see `recycle`).
    spare: Mutex<Vec<Vec<u8>>>,
}

static WORKERS: Workers = Workers {
    jobs: Mutex::new(VecDeque::new()),
    job_ready: Condvar::new(),
    idle: AtomicUsize::new(0),
    workers_started: Once::new(),
    started: AtomicUsize::new(0),
    quiescers: AtomicUsize::new(0),
    quiet: Condvar::new(),
    spare: Mutex::new(Vec::new()),
};

pub fn workers() -> &'static Workers {
    &WORKERS
}

impl Workers {
    /// Queues `jobs`, starting the worker threads (`PIPELLM_CC_WORKERS`) on first use; each
    /// runs `run` on the jobs it takes. Nothing in a forked child (no worker came along).
    pub fn submit(&self, jobs: Vec<Job>, run: fn(Job)) {
        if jobs.is_empty() || crate::process::forked() {
            return;
        }
        self.workers_started.call_once(|| {
            // On this (the application's) thread, before any worker could draw it: a worker
            // still running while the process exits must not reach the crypto library's
            // random generator, which the exit tears down (`fingerprint::prepare`). Without
            // the key no worker starts: chunks are then all encrypted by the real library.
            if pipellm_core::fingerprint::prepare().is_err() {
                log(format_args!(
                    "no randomness for the fingerprint key: nothing pre-encrypted"
                ));
                return;
            }
            for i in 0..config().workers {
                let spawned = crate::process::spawn(format!("pipellm-cc-{i}"), move || {
                    workers().worker_loop(run)
                });
                match spawned {
                    Ok(_) => {
                        self.started.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => log(format_args!("could not start a pre-encryption thread")),
                }
            }
        });
        if self.started.load(Ordering::Relaxed) == 0 {
            return; // no worker would ever take them (every message is then a miss)
        }
        let n = jobs.len();
        let mut q = lock(&self.jobs);
        q.extend(jobs);
        let wake = n.min(self.idle.load(Ordering::Relaxed));
        drop(q);
        for _ in 0..wake {
            self.job_ready.notify_one();
        }
    }

    fn worker_loop(&self, run: fn(Job)) {
        crate::process::background_priority();
        loop {
            let job = {
                let mut q = lock(&self.jobs);
                loop {
                    if let Some(j) = q.pop_front() {
                        break j;
                    }
                    // `idle` changes only under the `jobs` lock, so a submitter that
                    // reads 0 knows every worker will look at the queue before sleeping.
                    self.idle.fetch_add(1, Ordering::Relaxed);
                    if self.quiescers.load(Ordering::Relaxed) > 0 {
                        self.quiet.notify_all(); // see `quiesce`
                    }
                    q = wait(&self.job_ready, q);
                    self.idle.fetch_sub(1, Ordering::Relaxed);
                }
            };
            let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(job)));
            if done.is_err() {
                Stats::add(&stats().panics, 1);
            }
        }
    }

    /// Returns once no pre-encryption job is queued and every worker started is waiting for
    /// work (so every chunk submitted before the call is settled: ready, or dropped), or
    /// false after `timeout`. D2H decryption threads are not counted.
    pub fn quiesce(&self, timeout: Duration) -> bool {
        if !self.workers_started.is_completed() {
            // No job was ever submitted (`submit` starts the workers before it queues).
            return true;
        }
        // `is_completed` is an Acquire load that saw the Once complete, after the spawning
        // thread stored `started`: Relaxed is enough to read it.
        let started = self.started.load(Ordering::Relaxed);
        let deadline = Instant::now().checked_add(timeout);
        let mut q = lock(&self.jobs);
        // `idle` and `quiescers` change only under the `jobs` lock, so reading them (and the
        // queue) under it is one consistent observation, and a worker that goes idle after
        // our check sees `quiescers > 0` and notifies `quiet` (no lost wake-up).
        self.quiescers.fetch_add(1, Ordering::Relaxed);
        let quiet = loop {
            if q.is_empty() && self.idle.load(Ordering::Relaxed) >= started {
                break true;
            }
            let now = Instant::now();
            let wait = match deadline {
                Some(d) if now >= d => break false,
                Some(d) => d - now,
                None => Duration::from_secs(3600),
            };
            q = wait_timeout(&self.quiet, q, wait).0;
        };
        self.quiescers.fetch_sub(1, Ordering::Relaxed);
        quiet
    }

    /// True once starting the workers was tried and none runs (no randomness for the
    /// fingerprint key, or no thread could be spawned): nothing should be planned for them.
    pub fn unavailable(&self) -> bool {
        self.workers_started.is_completed() && self.started.load(Ordering::Relaxed) == 0
    }

    /// Whether the worker threads were started (a job was ever submitted).
    pub fn any_started(&self) -> bool {
        self.workers_started.is_completed()
    }

    /// Jobs queued and not taken by a worker yet.
    pub fn queued(&self) -> usize {
        lock(&self.jobs).len()
    }

    /// A buffer of `len` bytes for a job's snapshot and ciphertext, recycled when possible.
    pub fn buffer(&self, len: usize) -> Vec<u8> {
        if crate::process::forked() {
            return vec![0u8; len];
        }
        let mut spare = lock(&self.spare);
        if let Some(i) = spare.iter().position(|b| b.capacity() >= len) {
            let mut b = spare.swap_remove(i);
            // Only bytes beyond the old length are zero-filled: whoever takes a buffer
            // overwrites all of it (a snapshot of the source), so a recycled buffer keeps its
            // length instead of being cleared and refilled (a 1 MiB memset per chunk).
            if b.len() >= len {
                b.truncate(len);
            } else {
                b.resize(len, 0);
            }
            return b;
        }
        drop(spare);
        vec![0u8; len]
    }

    /// Takes back a buffer holding ciphertext or a zeroized snapshot.
    pub fn recycle(&self, b: Vec<u8>) {
        if crate::process::forked() {
            return; // a worker may have held `spare` at the fork: just free the buffer
        }
        let mut spare = lock(&self.spare);
        if spare.len() < 4 * config().depth * config().workers.max(1) {
            spare.push(b); // ciphertext or a zeroized snapshot: nothing secret stays in it
        }
    }
}
