//! The threads that decrypt deferred D2H chunks in place, once their tag was checked, and
//! then open their pages.

use super::{stats, Deferred};
use crate::config::{config, log};
use crate::context::Tag;
use crate::ivmodel::Iv;
use crate::stats::Stats;
use pipellm_core::crypto::AeadKey;
use pipellm_core::locks::{lock, wait};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

/// Decryptions queued or running at once; beyond this a chunk is decrypted synchronously
/// (forwarded), which bounds how far the application can run ahead of its plaintext.
pub const MAX_QUEUED: usize = 64;

pub(super) struct Job {
    pub key: Arc<AeadKey>,
    pub iv: Iv,
    pub tag: Tag,
    pub msg: Deferred,
}

struct Queue {
    jobs: Mutex<VecDeque<Job>>,
    job_ready: Condvar,
    queued: AtomicUsize,
    threads: std::sync::Once,
}

fn queue() -> &'static Queue {
    static Q: OnceLock<Queue> = OnceLock::new();
    Q.get_or_init(|| Queue {
        jobs: Mutex::new(VecDeque::new()),
        job_ready: Condvar::new(),
        queued: AtomicUsize::new(0),
        threads: std::sync::Once::new(),
    })
}

/// True if as many decryptions as allowed are queued or running.
pub(super) fn full() -> bool {
    queue().queued.load(Ordering::Acquire) >= MAX_QUEUED
}

/// Queues a verified message for decryption (or decrypts it here with no threads).
pub(super) fn submit(job: Job) {
    let q = queue();
    q.queued.fetch_add(1, Ordering::AcqRel);
    q.threads.call_once(|| {
        for i in 0..config().d2h_threads {
            let spawned = crate::process::spawn(format!("pipellm-d2h-{i}"), decrypt_loop);
            if spawned.is_err() {
                log(format_args!("could not start a decryption thread"));
            }
        }
    });
    if config().d2h_threads == 0 {
        decrypt(job);
    } else {
        lock(&q.jobs).push_back(job);
        q.job_ready.notify_one();
    }
}

fn decrypt_loop() {
    crate::process::background_priority();
    let q = queue();
    loop {
        let job = {
            let mut jobs = lock(&q.jobs);
            loop {
                if let Some(j) = jobs.pop_front() {
                    break j;
                }
                jobs = wait(&q.job_ready, jobs);
            }
        };
        decrypt(job);
    }
}

fn decrypt(job: Job) {
    let Job { key, iv, tag, msg } = job;
    // SAFETY: as in `on_final`: the gated destination's alias, ours until the gate opens.
    let buf = unsafe { std::slice::from_raw_parts_mut(msg.alias as *mut u8, msg.len) };
    // The tag is checked again as the bytes are decrypted (AWS-LC's AES-GCM open is faster
    // than its bare counter mode): it can only fail if something wrote the alias since the
    // check, against the registration's contract. The bytes are zeroed then, never shown.
    let done = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        key.open_in_place(&iv, &tag, buf).is_ok()
    }));
    if !matches!(done, Ok(true)) {
        buf.fill(0);
        Stats::add(&stats().d2h_late_failures, 1);
        if crate::process::stop() {
            log(format_args!(
                "a deferred D2H chunk changed after its tag check; pipeline stopped"
            ));
        }
    }
    drop(msg); // opens the gate
    queue().queued.fetch_sub(1, Ordering::AcqRel);
}
