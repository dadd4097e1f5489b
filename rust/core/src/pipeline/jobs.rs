//! Work for the encryption threads: speculative entries and on-demand chunks, the queue they
//! wait on, and the signal that tells waiters a job finished.

use super::chunk_watches::ChunkWatches;
use super::entry::{Check, Entry, FAILED, READY};
use super::source::Chunk;
use super::stats::Stats;
use super::{Inner, Lease, Payload};
use crate::error::{Error, Result};
use crate::fingerprint::fingerprint;
use crate::locks::{lock, wait, wait_timeout};
use crate::message::Message;
use crate::sequencer::{Fallback, Reservation};
use crate::staging::StagingBuf;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::sync::Weak;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

/// A generation counter with a condvar: anyone who finishes a job bumps it and wakes all
/// waiters; a waiter re-checks its condition under the lock, so no wake-up is lost.
#[derive(Default)]
pub(crate) struct Signal {
    generation: Mutex<u64>,
    cv: Condvar,
}

impl Signal {
    pub fn notify(&self) {
        *lock(&self.generation) += 1;
        self.cv.notify_all();
    }

    /// Blocks until `done()` holds.
    pub fn wait_until(&self, mut done: impl FnMut() -> bool) {
        let mut g = lock(&self.generation);
        while !done() {
            g = wait(&self.cv, g);
        }
    }
}

/// Test hooks that make the next N jobs of a kind panic, to prove a dying worker costs
/// speed, not data. Zero (the default) costs one relaxed load per job.
#[derive(Default)]
pub struct Faults {
    pub panic_speculative: AtomicU32,
    pub panic_on_demand: AtomicU32,
}

fn take_fault(counter: &AtomicU32) -> bool {
    counter
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
        .is_ok()
}

/// What an on-demand chunk is sealed with: a fresh position (data) or the fallback of a
/// position whose speculative chunk is not delivered (substitute).
pub(crate) enum OnDemandToken {
    Fresh(Reservation),
    Replace(Fallback),
}

const OD_QUEUED: u8 = 0;
const OD_RUNNING: u8 = 1;
const OD_DONE: u8 = 2;

/// One chunk encrypted on demand, by a worker or by the waiting caller, whoever comes first.
pub(crate) struct OnDemand {
    /// The chunk's length (the chunk itself leaves with the token).
    len: usize,
    state: AtomicU8,
    /// The position and the chunk, taken by whoever seals (or abandons) the job. The chunk
    /// (and with it the last reference to its source's memory) is dropped when the seal is
    /// done, before the job counts as done: a job that lingers in the queue or in a worker's
    /// hands after its message was taken does not keep the source alive.
    work: Mutex<Option<(OnDemandToken, Chunk)>>,
    /// A staging buffer to seal into, when the pool had one free: its pages are already
    /// mapped, where a fresh allocation of megabytes would page-fault on every 4 KiB.
    staging: Mutex<Option<(StagingBuf, Weak<Inner>)>>,
    result: Mutex<Option<Result<Message<Payload>>>>,
}

impl OnDemand {
    pub fn new(
        chunk: Chunk,
        token: OnDemandToken,
        staging: Option<(StagingBuf, Weak<Inner>)>,
    ) -> Self {
        Self {
            len: chunk.len(),
            state: AtomicU8::new(OD_QUEUED),
            work: Mutex::new(Some((token, chunk))),
            staging: Mutex::new(staging),
            result: Mutex::new(None),
        }
    }

    /// Seals into the staging buffer if there is one (returning a lease), else a new Vec.
    fn seal(&self, token: OnDemandToken, chunk: Chunk) -> Result<Message<Payload>> {
        let src = chunk.bytes();
        let staged = lock(&self.staging).take();
        if let Some((mut buf, home)) = staged {
            if let Some(home) = home.upgrade() {
                let dst = &mut buf.as_mut_slice()[..src.len()];
                let sealed = match token {
                    OnDemandToken::Fresh(r) => r.seal_into(src, dst).map_err(|e| e.error),
                    OnDemandToken::Replace(f) => f.substitute_into(src, dst).map_err(|e| e.error),
                };
                let sealed = match sealed {
                    Ok(s) => s,
                    Err(e) => {
                        home.return_staging(buf); // out-of-place: it holds no plaintext
                        return Err(e);
                    }
                };
                let lease = Lease {
                    buf: Some(buf),
                    len: src.len(),
                    home,
                };
                return Message::new(sealed.header, sealed.tag, Payload::Staged(lease));
            }
        }
        let m = match token {
            OnDemandToken::Fresh(r) => r.seal_to_vec(src).map_err(|e| e.error)?,
            OnDemandToken::Replace(f) => f.substitute_to_vec(src).map_err(|e| e.error)?,
        };
        Ok(m.map_payload(Payload::Owned))
    }

    /// Takes the position back from a job nobody can have started (it was never queued for
    /// the threads), returning its staging buffer to the pool; the chunk is dropped. None if
    /// it was taken already.
    pub fn abandon(&self) -> Option<OnDemandToken> {
        if self
            .state
            .compare_exchange(OD_QUEUED, OD_DONE, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return None;
        }
        if let Some((buf, home)) = lock(&self.staging).take() {
            if let Some(home) = home.upgrade() {
                home.return_staging(buf);
            }
        }
        *lock(&self.result) = Some(Err(Error::Backend("on-demand job abandoned")));
        lock(&self.work).take().map(|(token, _chunk)| token)
    }

    pub fn is_done(&self) -> bool {
        self.state.load(Ordering::Acquire) == OD_DONE
    }

    /// Runs the job if nobody has claimed it. Returns false if someone else has.
    pub fn try_run(&self, stats: &Stats, faults: &Faults, signal: &Signal) -> bool {
        if self
            .state
            .compare_exchange(OD_QUEUED, OD_RUNNING, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return false;
        }
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            if take_fault(&faults.panic_on_demand) {
                panic!("injected fault: on-demand job");
            }
            // Nothing above can lose the token; from here on nothing panics (length checks
            // return the token, AWS-LC reports errors by value).
            let (token, chunk) = lock(&self.work)
                .take()
                .expect("token present while QUEUED/RUNNING");
            self.seal(token, chunk) // drops the chunk
        }));
        match outcome {
            Ok(result) => {
                if result.is_ok() {
                    Stats::add(&stats.chunks_on_demand, 1);
                    Stats::add(&stats.bytes_on_demand, self.len as u64);
                }
                *lock(&self.result) = Some(result);
                self.state.store(OD_DONE, Ordering::Release);
            }
            Err(_) => {
                // The token is still in place (the only panic point is before taking it):
                // hand the job back so another thread, or the waiting caller, runs it.
                Stats::add(&stats.worker_failures, 1);
                if lock(&self.work).is_some() {
                    self.state.store(OD_QUEUED, Ordering::Release);
                } else {
                    *lock(&self.result) = Some(Err(Error::Backend(
                        "an encryption thread died holding a reserved position",
                    )));
                    self.state.store(OD_DONE, Ordering::Release);
                }
            }
        }
        signal.notify();
        true
    }

    /// Runs the job here or waits for whoever runs it, then takes its result.
    pub fn finish(
        &self,
        stats: &Stats,
        faults: &Faults,
        signal: &Signal,
    ) -> Result<Message<Payload>> {
        loop {
            if self.try_run(stats, faults, signal) && self.is_done() {
                break;
            }
            let t0 = std::time::Instant::now();
            signal.wait_until(|| self.is_done() || self.state.load(Ordering::Acquire) == OD_QUEUED);
            Stats::add_time(&stats.stall_ns, t0.elapsed());
            if self.is_done() {
                break;
            }
        }
        lock(&self.result)
            .take()
            .unwrap_or(Err(Error::Backend("on-demand result taken twice")))
    }
}

pub(crate) enum Job {
    Speculative(Arc<Entry>),
    OnDemand(Arc<OnDemand>),
}

#[derive(Default)]
struct Queues {
    urgent: VecDeque<Arc<OnDemand>>,
    speculative: VecDeque<Arc<Entry>>,
    closed: bool,
    /// Threads start no new job while held (see `Pipeline::hold_workers`).
    held: bool,
    /// Jobs popped and not finished yet (see [`Claimed`]). A plain integer under the same
    /// mutex as the queues: `pop` moves a job from a queue to `busy` in one critical section,
    /// so at every moment a job is either queued or counted busy, and "queues empty and
    /// `busy == 0`" read under the lock means no job is anywhere between the two.
    busy: usize,
}

/// The threads' work queue: on-demand chunks (someone waits for them) before speculative ones.
#[derive(Default)]
pub(crate) struct JobQueue {
    q: Mutex<Queues>,
    /// Wakes threads waiting for a job (`pop`).
    cv: Condvar,
    /// Wakes threads waiting for the workers to go idle (`wait_idle`): notified when `busy`
    /// drops to 0, on `hold` and on `close`, each time after the change was made under the
    /// lock (a waiter checks under the lock before it waits, so no wake-up is lost).
    idle_cv: Condvar,
}

/// A job a worker popped. Dropping it (after the job ran, or while unwinding from a panic
/// that escaped the job) drops the job first, then marks the worker no longer busy: what the
/// job held (its entry, and with it a write watch) is gone before `wait_idle` can return.
pub(crate) struct Claimed<'q> {
    job: Option<Job>,
    queue: &'q JobQueue,
}

impl Claimed<'_> {
    /// The job, to run. Called once.
    pub fn take(&mut self) -> Job {
        self.job.take().expect("a claimed job is taken once")
    }
}

impl Drop for Claimed<'_> {
    fn drop(&mut self) {
        drop(self.job.take());
        self.queue.finished();
    }
}

impl JobQueue {
    pub fn push(&self, job: Job) {
        let mut q = lock(&self.q);
        match job {
            Job::OnDemand(j) => q.urgent.push_back(j),
            Job::Speculative(e) => q.speculative.push_back(e),
        }
        drop(q);
        self.cv.notify_one();
    }

    /// The next job, counted busy until the returned claim is dropped; None once closed.
    pub fn pop(&self) -> Option<Claimed<'_>> {
        let mut q = lock(&self.q);
        loop {
            if q.closed {
                return None;
            }
            if q.held {
                q = wait(&self.cv, q);
                continue;
            }
            let job = if let Some(j) = q.urgent.pop_front() {
                Some(Job::OnDemand(j))
            } else {
                q.speculative.pop_front().map(Job::Speculative)
            };
            if let Some(job) = job {
                // Same critical section as the pop: never "dequeued but not busy".
                q.busy += 1;
                return Some(Claimed {
                    job: Some(job),
                    queue: self,
                });
            }
            q = wait(&self.cv, q);
        }
    }

    /// A claimed job is finished (its effects, entry state and statistics, were all written
    /// before this lock is taken, so whoever sees `busy` drop under the lock sees them too:
    /// the unlock here happens-before that thread's lock, which orders even the relaxed
    /// counter updates).
    fn finished(&self) {
        let mut q = lock(&self.q);
        q.busy -= 1;
        let idle = q.busy == 0;
        drop(q);
        if idle {
            // After the unlock: a woken waiter re-checks under the lock, and one that has not
            // started waiting yet checks before it waits, so no wake-up is lost.
            self.idle_cv.notify_all();
        }
    }

    /// Waits until no worker holds a job and, unless the workers are held or the queue is
    /// closed, no job is queued. False if `deadline` passed first (None: no deadline).
    pub fn wait_idle(&self, deadline: Option<Instant>) -> bool {
        let mut q = lock(&self.q);
        loop {
            let drained = q.closed || q.held || (q.urgent.is_empty() && q.speculative.is_empty());
            if q.busy == 0 && drained {
                return true;
            }
            q = match deadline {
                None => wait(&self.idle_cv, q),
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return false;
                    }
                    wait_timeout(&self.idle_cv, q, d - now).0
                }
            };
        }
    }

    pub fn hold(&self, held: bool) {
        lock(&self.q).held = held;
        self.cv.notify_all();
        self.idle_cv.notify_all();
    }

    pub fn close(&self) {
        let mut q = lock(&self.q);
        q.closed = true;
        q.urgent.clear();
        q.speculative.clear();
        drop(q);
        self.cv.notify_all();
        self.idle_cv.notify_all();
    }
}

/// Encrypts one speculative entry. With fingerprints: snapshot the source into the staging
/// buffer, fingerprint the snapshot, seal it in place; encrypting a private snapshot is what
/// makes the fingerprint exact (the ciphertext is of precisely the fingerprinted bytes even if
/// the program writes the source meanwhile). With page protection: arm it, then seal straight
/// from the source (one pass less); a write during the encryption bumps the generation.
pub(crate) fn run_speculative(
    entry: &Entry,
    watches: Option<&Arc<ChunkWatches>>,
    stats: &Stats,
    faults: &Faults,
    signal: &Signal,
) {
    // Lock first, then claim: from the claim until the entry is settled the worker holds the
    // lock, so a request path that lost the race (sees ENCRYPTING) and then locks is sure to
    // find the entry settled.
    let mut data = entry.lock();
    if !entry.claim_for_worker() {
        return; // the request path took it first
    }
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let d = &mut *data;
        let staging = d
            .staging
            .as_mut()
            .expect("queued entry has a staging buffer");
        let len = entry.chunk.len();
        let buf = &mut staging.as_mut_slice()[..len];
        // Page protection is armed before the source is read, so a write racing with the
        // encryption is caught, and the chunk can be sealed straight from the source. Without
        // it, the chunk is sealed from a snapshot whose fingerprint is exact.
        let watched = watches.and_then(|w| watch(w, &entry.chunk));
        if take_fault(&faults.panic_speculative) {
            panic!("injected fault: speculative job");
        }
        // The reservation leaves the entry only here; nothing below panics.
        let r = d
            .reservation
            .take()
            .expect("queued entry has its reservation");
        let sealed = match watched {
            Some((w, stamp)) if w.edges().is_empty() => {
                d.check = Check::Watch(w, stamp, None);
                r.speculate_into(entry.chunk.bytes(), buf)
            }
            Some((w, stamp)) => {
                // Bytes on pages shared with other memory are not watched: seal a snapshot
                // (the watched middle cannot change unseen while it is copied) and keep the
                // edges' fingerprints, which are then exact for what was sealed.
                buf.copy_from_slice(entry.chunk.bytes());
                let e = w.edges();
                let prints = (
                    fingerprint(&buf[..e.head]),
                    fingerprint(&buf[len - e.tail..]),
                );
                d.check = Check::Watch(w, stamp, Some(prints));
                r.speculate_in_place(buf)
            }
            _ => {
                buf.copy_from_slice(entry.chunk.bytes());
                d.check = Check::Fingerprint(fingerprint(buf));
                r.speculate_in_place(buf)
            }
        };
        match sealed {
            Ok(s) => {
                d.speculated = Some(s);
                Ok(())
            }
            Err(refused) => {
                d.reservation = Some(refused.token);
                Err(refused.error)
            }
        }
    }));
    let ok = matches!(outcome, Ok(Ok(())));
    if ok {
        Stats::add(&stats.chunks_pre_encrypted, 1);
        Stats::add(&stats.bytes_pre_encrypted, entry.chunk.len() as u64);
    } else {
        Stats::add(&stats.worker_failures, 1);
        if let Some(s) = data.staging.as_mut() {
            s.wipe(); // it may hold a plaintext snapshot
        }
    }
    entry.set_state(if ok { READY } else { FAILED });
    drop(data);
    signal.notify();
}

fn watch(
    watches: &Arc<ChunkWatches>,
    chunk: &Chunk,
) -> Option<(super::chunk_watches::HeldWatch, crate::writeguard::Stamp)> {
    watches.arm(&chunk.source, chunk.key)
}
