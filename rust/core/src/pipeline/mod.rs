//! Speculative pipelined encryption (docs/pipeline.md; docs/architecture.md for how it
//! fits with the rest).
//!
//! `predict` queues the chunks expected next; a planner thread gives each a staging buffer, a
//! reserved position (in order) and a ring entry; worker threads encrypt entries out of order
//! into their staging buffers. `request` (the critical path) walks the ring's window in
//! position order and, per chunk of the real transfer:
//!
//! - finds it at the head, validates it (fingerprint of the source now == fingerprint of the
//!   snapshot that was encrypted) and hands the pre-encrypted slot out: a hit, no encryption;
//! - finds it further on: the skipped positions become NOPs, then as above;
//! - finds it among predictions not yet in the ring: the window is relinquished with NOPs, its
//!   predictions are queued again in their order, and the chunk is encrypted on demand;
//! - finds it nowhere: it is encrypted on demand at the head's position (a substitute if the
//!   head was already encrypted, plain data if no worker had started it) and the head's
//!   prediction is queued again.
//!
//! A stale hit (source changed) is re-encrypted on demand as the position's substitute. Every
//! position is consumed exactly once, in order, and no (key, IV) pair is used twice (see
//! docs/protocol.md). On-demand chunks go to the threads in parallel; the caller takes the
//! messages in order from the returned [`Transfer`], running a chunk itself if no thread has.

mod chunk_watches;
mod entry;
mod jobs;
pub mod source;
mod stats;
pub use chunk_watches::MAX_KEEP_ARMED;

use crate::error::{Error, Result};
use crate::fingerprint::fingerprint;
use crate::header::{data_charge, Direction, MAX_MESSAGE_BYTES};
use crate::locks::{get_mut, lock, wait_timeout};
use crate::message::Message;
use crate::schedule::{Cursor, KeyPolicy};
use crate::sender::Sender;
use crate::sequencer::Fallback;
use crate::staging::{StagingBuf, StagingPool};
use crate::{ring, SessionKey};
use entry::{Check, Entry, CANCELLED, FAILED, READY};
pub use jobs::Faults;
use jobs::{Job, JobQueue, OnDemand, OnDemandToken, Signal};
pub use source::{Chunk, ChunkKey, Source, SourceBytes, MAX_TRANSFER_CHUNKS};
use stats::Stats;
pub use stats::{StatValue, StatsSnapshot};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct PipelineConfig {
    pub channel: u32,
    pub direction: Direction,
    pub policy: KeyPolicy,
    /// Ring entries, each with one staging buffer of `chunk_bytes`.
    pub slots: usize,
    /// Largest message; transfers are split into chunks of this size.
    pub chunk_bytes: usize,
    /// Encryption threads (0: everything is encrypted by the caller, on demand).
    pub workers: usize,
    /// Cap on staging memory: `slots * chunk_bytes`, each slot's `chunk_bytes` rounded up to
    /// whole pages (the memory a staging buffer takes; `crate::page`), must not exceed it.
    pub max_staging_bytes: usize,
    /// How a hit is checked against writes to its source since its snapshot.
    pub validation: Validation,
    /// With page protection: how many source chunks stay write-protected between uses, so
    /// that predicting them again costs no `mprotect` (see `watches`). 0: every chunk's
    /// protection is released once its entry is consumed.
    pub keep_armed: usize,
}

/// How the request path knows a source is unchanged since its chunk was encrypted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validation {
    /// Hash the source's bytes and compare with the snapshot's hash (XXH3-128). Works on any
    /// memory; costs a pass over the bytes on the request path.
    Fingerprint,
    /// Write-protect the source's pages when the snapshot is taken; a write faults once, is
    /// recorded and goes ahead. The check is a load, whatever the size. Only for sources that
    /// nothing but user-space code of this process writes (not read(2) targets, not device
    /// DMA targets: under the mprotect tracker those writes would fail instead). Where pages
    /// cannot be protected (shared or file mappings, a full region table), chunks fall back
    /// to fingerprints.
    PageProtection,
}

impl Default for PipelineConfig {
    fn default() -> Self {
        Self {
            channel: 0,
            direction: Direction::HostToDevice,
            policy: KeyPolicy::default(),
            slots: 64,
            chunk_bytes: 4 << 20,
            workers: 2,
            max_staging_bytes: 1 << 30,
            validation: Validation::Fingerprint,
            keep_armed: 0,
        }
    }
}

impl PipelineConfig {
    /// Units each speculative position reserves: room for the chunk and a substitute.
    fn speculative_charge(&self) -> u64 {
        2 * data_charge(self.chunk_bytes as u64)
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(m));
        if self.slots == 0 {
            return bad("slots must be at least 1".into());
        }
        if self.chunk_bytes < 16 || self.chunk_bytes as u64 > MAX_MESSAGE_BYTES {
            return bad(format!(
                "chunk_bytes must be in 16..={MAX_MESSAGE_BYTES}, got {}",
                self.chunk_bytes
            ));
        }
        if self.workers > 1024 {
            return bad(format!(
                "workers must be at most 1024, got {}",
                self.workers
            ));
        }
        // Each slot's buffer takes whole pages: a 16-byte chunk costs a whole page (and the
        // ring entry a few hundred bytes more), so nominal bytes would let tiny chunks take
        // hundreds of times the cap.
        let per_slot = crate::page::round_up(self.chunk_bytes);
        match self.slots.checked_mul(per_slot) {
            Some(total) if total <= self.max_staging_bytes => {}
            _ => {
                return bad(format!(
                    "slots * chunk_bytes ({} * {}, each rounded up to whole {}-byte pages) \
                     exceeds max_staging_bytes ({})",
                    self.slots,
                    self.chunk_bytes,
                    crate::page::size(),
                    self.max_staging_bytes
                ))
            }
        }
        if self.keep_armed > MAX_KEEP_ARMED {
            return bad(format!(
                "keep_armed must be at most {MAX_KEEP_ARMED}, got {}",
                self.keep_armed
            ));
        }
        if self.keep_armed > 0 && self.validation != Validation::PageProtection {
            return bad("keep_armed needs validation by page protection".into());
        }
        self.policy.validate()?;
        if self.speculative_charge() > self.policy.usage_limit {
            return bad(format!(
                "chunk_bytes {} is too large for usage_limit {}: a speculative position needs {} units",
                self.chunk_bytes,
                self.policy.usage_limit,
                self.speculative_charge()
            ));
        }
        Ok(())
    }
}

/// Where a message's ciphertext lives: its own buffer (encrypted on demand, NOPs) or the
/// staging buffer it was pre-encrypted in, returned to the pool when the message is dropped.
pub enum Payload {
    Owned(Vec<u8>),
    Staged(Lease),
}

impl AsRef<[u8]> for Payload {
    fn as_ref(&self) -> &[u8] {
        match self {
            Payload::Owned(v) => v,
            Payload::Staged(l) => l.as_ref(),
        }
    }
}

impl std::fmt::Debug for Payload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Payload::Owned(v) => write!(f, "Owned({} bytes)", v.len()),
            Payload::Staged(l) => write!(f, "Staged({} bytes)", l.len),
        }
    }
}

/// A staging buffer lent to a message.
pub struct Lease {
    buf: Option<StagingBuf>,
    len: usize,
    home: Arc<Inner>,
}

impl AsRef<[u8]> for Lease {
    fn as_ref(&self) -> &[u8] {
        &self
            .buf
            .as_ref()
            .expect("lease holds its buffer until dropped")
            .as_slice()[..self.len]
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            if self.home.forked() {
                // In a forked child the pool's lock may have been held at the fork, and the
                // memory is the child's copy of the parent's: leak it.
                std::mem::forget(b);
                return;
            }
            self.home.return_staging(b);
        }
    }
}

/// A message with where its payload lands in the transfer (NOPs: 0).
pub type Outgoing = (u64, Message<Payload>);

enum Piece {
    Ready(Outgoing),
    /// A hit while the request is being routed: the position's fallback is kept until every
    /// chunk is routed, so that a request failing part-way can still turn it into a NOP.
    Hit(Outgoing, Fallback),
    Waiting(u64, Arc<OnDemand>),
    Taken,
}

/// The messages of one request, in the order the receiver must get them. Pre-encrypted ones
/// are ready; on-demand ones are being encrypted in parallel and are waited for (or encrypted
/// by the caller) as they are taken, so the first can be copied while later ones are still
/// being encrypted.
pub struct Transfer {
    pieces: Vec<Piece>,
    next: usize,
    inner: Arc<Inner>,
    /// The ring entries retired while routing were dropped (see `release`).
    released: bool,
}

impl Transfer {
    pub fn len(&self) -> usize {
        self.pieces.len()
    }
    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }
    /// Messages not taken yet.
    pub fn remaining(&self) -> usize {
        self.pieces.len() - self.next
    }

    /// The next message in order, waiting for (or doing) its encryption if needed. Once the
    /// last one is taken, the pipeline holds no reference to the transfer's source any more
    /// (except predictions not yet requested, and chunks kept armed).
    pub fn next_message(&mut self) -> Option<Result<Outgoing>> {
        let i = self.next;
        if i >= self.pieces.len() {
            self.release();
            return None;
        }
        if let Err(e) = self.inner.check_owner() {
            return Some(Err(e));
        }
        self.next += 1;
        let piece = std::mem::replace(&mut self.pieces[i], Piece::Taken);
        let out = Some(match piece {
            Piece::Ready(out) | Piece::Hit(out, _) => Ok(out),
            Piece::Waiting(offset, job) => {
                let inner = &self.inner;
                job.finish(&inner.stats, &inner.faults, &inner.signal)
                    .map(|m| (offset, m))
            }
            Piece::Taken => Err(Error::InvalidArgument("message already taken".into())),
        });
        if self.next == self.pieces.len() {
            self.release();
        }
        out
    }

    /// Drops the ring entries retired so far (those of this transfer among them), which hold
    /// the predicted chunks' sources (and, with page protection, their write watches), rather
    /// than leaving them to the planner's next turn. Once per transfer.
    fn release(&mut self) {
        if !self.released && !self.inner.forked() {
            self.released = true;
            self.inner.drain_retired();
        }
    }

    /// All remaining messages, in order.
    pub fn collect_all(mut self) -> Result<Vec<Outgoing>> {
        let mut out = Vec::with_capacity(self.remaining());
        while let Some(m) = self.next_message() {
            out.push(m?);
        }
        Ok(out)
    }
}

impl Iterator for Transfer {
    type Item = Result<Outgoing>;
    fn next(&mut self) -> Option<Self::Item> {
        self.next_message()
    }
}

impl Drop for Transfer {
    fn drop(&mut self) {
        if self.inner.forked() {
            // No thread of the pipeline exists in a forked child and its locks may have been
            // held at the fork: finishing or dropping the pieces could wait forever. Leak them.
            std::mem::forget(std::mem::take(&mut self.pieces));
            return;
        }
        // On-demand chunks nobody took are still finished (their positions must be filled
        // for the stream to stay whole if the caller sends what it did take); their messages
        // are dropped. Waiting here keeps the position accounting exact.
        while self.next_message().is_some() {}
        self.release();
    }
}

struct Inner {
    cfg: PipelineConfig,
    /// Caller-provided staging buffers as (start, end, index), sorted and disjoint: a source
    /// must not overlap them (empty for buffers allocated here, which no caller can see).
    staging_ranges: Vec<(usize, usize, usize)>,
    charge: u64,
    sender: Sender,
    producer: ring::Producer<Arc<Entry>>,
    consumer: Mutex<ring::Consumer<Arc<Entry>>>,
    /// Predictions not yet in the ring, in expected order.
    plan: Mutex<VecDeque<Chunk>>,
    plan_cv: Condvar,
    pool: StagingPool,
    jobs: JobQueue,
    signal: Signal,
    stats: Stats,
    faults: Faults,
    warnings: Mutex<Vec<String>>,
    closed: AtomicBool,
    me: std::sync::Weak<Inner>,
    /// Consumed entries whose write watch (an unregister costs an mprotect and a scan) is
    /// released by the planner thread, off the request path.
    retired: Mutex<Vec<Arc<Entry>>>,
    /// Held by whoever is dropping a batch taken from `retired` (see `drain_retired`).
    draining: Mutex<()>,
    /// With page protection: the write watches (and those kept armed between uses).
    watches: Option<Arc<chunk_watches::ChunkWatches>>,
    /// NOPs for the positions a failed request had consumed (see `abandon`): they go out
    /// first, ahead of the next request's messages or of `relinquish_all`'s NOPs. Touched
    /// under the consumer lock only, so their place in the order is fixed.
    pending: Mutex<Vec<Outgoing>>,
    /// The process that created the pipeline (see `check_owner`).
    owner: u32,
}

impl Inner {
    /// True in a process forked from the one that created the pipeline.
    fn forked(&self) -> bool {
        std::process::id() != self.owner
    }

    fn check_owner(&self) -> Result<()> {
        if self.forked() {
            return Err(Error::Forked { owner: self.owner });
        }
        Ok(())
    }

    fn warn(&self, msg: String) {
        let mut w = lock(&self.warnings);
        if w.len() < 1000 {
            w.push(msg);
        }
    }

    fn return_staging(&self, buf: StagingBuf) {
        if self.closed.load(Ordering::Acquire) {
            drop(buf); // wiped by its Drop
            return;
        }
        self.pool.put(buf);
        self.plan_cv.notify_all();
    }

    /// Moves predictions into the ring while buffers are free. Holds the plan lock, so ring
    /// order is reservation order.
    fn refill(&self, plan: &mut VecDeque<Chunk>) {
        while !plan.is_empty() && !self.closed.load(Ordering::Acquire) {
            let Some(buf) = self.pool.try_take() else {
                break;
            };
            let r = match self.sender.reserve(self.charge) {
                Ok(r) => r,
                Err(e) => {
                    self.pool.put(buf);
                    self.warn(format!("speculation paused: {e}"));
                    break;
                }
            };
            Stats::add(&self.stats.positions_reserved, 1);
            let chunk = plan.pop_front().expect("checked non-empty");
            let entry = Arc::new(Entry::new(chunk, buf, r));
            // Cannot fail: the ring holds at least as many entries as there are buffers.
            if self.producer.try_push(entry.clone()).is_err() {
                unreachable!("ring smaller than the staging pool");
            }
            self.jobs.push(Job::Speculative(entry));
        }
    }

    /// Hands a consumed entry to the planner thread to drop.
    fn retire(&self, entry: Arc<Entry>) {
        // No wake-up: the planner drops retired entries the next time it runs (a prediction,
        // a returned staging buffer, or its periodic tick), off the request path.
        lock(&self.retired).push(entry);
    }

    /// Drops the retired entries (their write watches are unregistered, or kept armed with
    /// `keep_armed`). The batch is dropped outside the `retired` lock (the request path only
    /// pushes there) but inside `draining`, so that a caller returning from here knows every
    /// entry retired before its call is gone, also a batch another thread (the planner) had
    /// taken first. Never called with the plan lock held: a drop costs `mprotect` calls.
    fn drain_retired(&self) {
        let _draining = lock(&self.draining);
        let retired = std::mem::take(&mut *lock(&self.retired));
        drop(retired);
    }

    fn planner_loop(&self) {
        let mut plan = lock(&self.plan);
        while !self.closed.load(Ordering::Acquire) {
            if !lock(&self.retired).is_empty() {
                drop(plan); // watches are unregistered outside the plan lock
                self.drain_retired();
                plan = lock(&self.plan);
            }
            self.refill(&mut plan);
            plan = wait_timeout(&self.plan_cv, plan, Duration::from_millis(100)).0;
        }
    }

    fn worker_loop(&self) {
        // The claim is dropped at the end of each turn, after the job (and the entry it
        // held): only then does the worker stop counting as busy (see `Pipeline::wait_idle`).
        while let Some(mut claimed) = self.jobs.pop() {
            match claimed.take() {
                Job::Speculative(e) => jobs::run_speculative(
                    &e,
                    self.watches.as_ref(),
                    &self.stats,
                    &self.faults,
                    &self.signal,
                ),
                Job::OnDemand(j) => {
                    j.try_run(&self.stats, &self.faults, &self.signal);
                }
            }
        }
    }

    /// Queues `chunk` for encryption on demand, into `staging` if given (the buffer of the
    /// entry whose position it takes: its pages are resident), else a free pool buffer, else
    /// a new allocation.
    fn on_demand(
        &self,
        chunk: Chunk,
        token: OnDemandToken,
        staging: Option<StagingBuf>,
        out: &mut Vec<Piece>,
    ) {
        let offset = chunk.transfer_offset;
        let staging = staging
            .or_else(|| self.pool.try_take())
            .map(|b| (b, self.me.clone()));
        // Queued for the threads only once the whole request is routed (see
        // `Pipeline::request`): until then the position can still be taken back.
        let job = Arc::new(OnDemand::new(chunk, token, staging));
        out.push(Piece::Waiting(offset, job));
    }

    fn nop(&self, m: Message) -> Piece {
        Piece::Ready(self.nop_out(m))
    }

    fn nop_out(&self, m: Message) -> Outgoing {
        Stats::add(&self.stats.nops, 1);
        let (h, t) = (*m.header(), *m.tag());
        (
            0,
            Message::new(h, t, Payload::Owned(Vec::new())).expect("empty NOP"),
        )
    }

    /// A request failed part-way: every position its routed pieces consumed becomes a NOP,
    /// kept in `pending` (consumer lock held), so the stream stays whole. Nothing of the
    /// request was handed out: hits still hold their fallback, on-demand jobs were not queued.
    fn abandon(&self, pieces: Vec<Piece>) {
        let mut nops = Vec::new();
        for p in pieces {
            let nop = match p {
                // NOPs (skipped positions, or pending from an earlier failure).
                Piece::Ready(out) => {
                    nops.push(out);
                    continue;
                }
                Piece::Hit(msg, fallback) => {
                    drop(msg); // its staging buffer goes back to the pool
                    fallback.into_nop().map_err(|e| e.error)
                }
                Piece::Waiting(_, job) => match job.abandon() {
                    Some(OnDemandToken::Fresh(r)) => r.into_nop().map_err(|e| e.error),
                    Some(OnDemandToken::Replace(f)) => f.into_nop().map_err(|e| e.error),
                    None => Err(Error::Backend("on-demand job taken before its request")),
                },
                Piece::Taken => continue,
            };
            match nop {
                Ok(m) => nops.push(self.nop_out(m)),
                Err(e) => self.warn(format!(
                    "a position of a failed request could not be turned into a NOP: {e}"
                )),
            }
        }
        lock(&self.pending).extend(nops);
    }

    /// Waits (if a worker is encrypting it) until `entry` is settled, and locks its data.
    fn settle<'e>(&self, entry: &'e Entry) -> crate::sync::MutexGuard<'e, entry::EntryData> {
        let t0 = Instant::now();
        let data = entry.lock();
        if entry.state() == entry::ENCRYPTING {
            unreachable!("a worker releases the entry only after settling it");
        }
        Stats::add_time(&self.stats.stall_ns, t0.elapsed());
        data
    }

    /// Takes a popped entry's position out of it, whatever state it is in (cancelling it if
    /// no worker started, waiting if one is encrypting): its fallback if it was encrypted
    /// (those bytes are wasted), its reservation otherwise; and its staging buffer.
    fn take_position(&self, entry: &Entry) -> Result<(OnDemandToken, Option<StagingBuf>)> {
        let mut data = if entry.cancel() {
            entry.lock()
        } else {
            self.settle(entry)
        };
        let token = if let Some((_, fallback)) = data.speculated.take() {
            Stats::add(&self.stats.wasted_bytes, entry.chunk.len() as u64);
            OnDemandToken::Replace(fallback)
        } else if let Some(r) = data.reservation.take() {
            OnDemandToken::Fresh(r)
        } else {
            return Err(Error::Backend("ring entry lost its position"));
        };
        Ok((token, data.staging.take()))
    }

    /// Consumes the position of a popped entry with a NOP.
    fn relinquish(&self, entry: &Entry, out: &mut Vec<Piece>) -> Result<()> {
        let (token, staging) = self.take_position(entry)?;
        if let Some(b) = staging {
            self.return_staging(b);
        }
        let nop = match token {
            OnDemandToken::Replace(f) => f.into_nop().map_err(|e| e.error)?,
            OnDemandToken::Fresh(r) => r.into_nop().map_err(|e| e.error)?,
        };
        out.push(self.nop(nop));
        Ok(())
    }

    /// Serves `chunk` from the popped entry that predicted it.
    fn serve_predicted(&self, entry: &Entry, chunk: Chunk, out: &mut Vec<Piece>) -> Result<()> {
        if entry.cancel() {
            // No worker started it: encrypt it now, at its own position, as plain data
            // (take_position finds it cancelled and takes the reservation).
            Stats::add(&self.stats.late, 1);
            let (token, staging) = self.take_position(entry)?;
            self.on_demand(chunk, token, staging, out);
            return Ok(());
        }
        let mut data = self.settle(entry);
        match entry.state() {
            READY => {
                let t0 = Instant::now();
                let unchanged = match &data.check {
                    Check::Fingerprint(f) => {
                        Stats::add(&self.stats.validation_bytes_hashed, chunk.len() as u64);
                        fingerprint(chunk.bytes()) == *f
                    }
                    Check::Watch(w, stamp, edges) => {
                        w.unchanged_since(*stamp)
                            && edges.is_none_or(|(head, tail)| {
                                let e = w.edges();
                                let b = chunk.bytes();
                                Stats::add(
                                    &self.stats.validation_bytes_hashed,
                                    (e.head + e.tail) as u64,
                                );
                                fingerprint(&b[..e.head]) == head
                                    && fingerprint(&b[b.len() - e.tail..]) == tail
                            })
                    }
                    Check::None => false,
                };
                Stats::add_time(&self.stats.validation_ns, t0.elapsed());
                let (sealed, fallback) = data.speculated.take().expect("READY entry has its seal");
                let staging = data.staging.take().expect("READY entry has its buffer");
                drop(data);
                if unchanged {
                    Stats::add(&self.stats.hits, 1);
                    let lease = Lease {
                        buf: Some(staging),
                        len: chunk.len(),
                        home: self.self_arc(),
                    };
                    match Message::new(sealed.header, sealed.tag, Payload::Staged(lease)) {
                        Ok(m) => out.push(Piece::Hit((chunk.transfer_offset, m), fallback)),
                        Err(e) => {
                            out.push(self.nop(fallback.into_nop().map_err(|e| e.error)?));
                            return Err(e);
                        }
                    }
                } else {
                    Stats::add(&self.stats.stale, 1);
                    Stats::add(&self.stats.wasted_bytes, chunk.len() as u64);
                    self.on_demand(chunk, OnDemandToken::Replace(fallback), Some(staging), out);
                }
                Ok(())
            }
            FAILED => {
                Stats::add(&self.stats.late, 1);
                drop(data);
                let (token, staging) = self.take_position(entry)?;
                self.warn("an encryption thread failed; the chunk was encrypted on demand".into());
                self.on_demand(chunk, token, staging, out);
                Ok(())
            }
            s => Err(Error::Backend(if s == CANCELLED {
                "ring entry cancelled twice"
            } else {
                "ring entry in an unexpected state"
            })),
        }
    }

    /// Serves `chunk`, which nobody predicted, at the head entry's position. Returns the
    /// head's chunk (its prediction), to be queued again.
    fn serve_at_head(&self, entry: &Entry, chunk: Chunk, out: &mut Vec<Piece>) -> Result<Chunk> {
        let (token, staging) = self.take_position(entry)?;
        self.on_demand(chunk, token, staging, out);
        Ok(entry.chunk.clone())
    }

    fn self_arc(&self) -> Arc<Inner> {
        // `Inner` always lives in the Arc made by `Arc::new_cyclic` in `Pipeline::new`, and
        // routing runs through a `Pipeline` that holds it, so the upgrade succeeds.
        self.me.upgrade().expect("pipeline alive while routing")
    }

    /// Routes one chunk of a request (consumer lock held).
    fn route(
        &self,
        consumer: &mut ring::Consumer<Arc<Entry>>,
        chunk: Chunk,
        out: &mut Vec<Piece>,
    ) -> Result<()> {
        // Walk the published window until the match (usually the head); no separate pass to
        // measure the window first.
        let found = (0..consumer.capacity())
            .map_while(|k| consumer.get(k).map(|e| (k, e)))
            .find(|(_, e)| e.chunk.key == chunk.key)
            .map(|(k, _)| k);
        if let Some(k) = found {
            for _ in 0..k {
                let e = consumer.pop().expect("in window");
                let r = self.relinquish(&e, out);
                self.retire(e);
                r?;
            }
            let e = consumer.pop().expect("in window");
            let r = self.serve_predicted(&e, chunk, out);
            self.retire(e);
            return r;
        }
        let mut plan = lock(&self.plan);
        if let Some(j) = plan.iter().position(|c| c.key == chunk.key) {
            // Predicted, but later than everything in the ring: the window is out of step
            // with the requests. Relinquish it and queue its predictions again, in order.
            let mut requeue = VecDeque::new();
            while let Some(e) = consumer.pop() {
                requeue.push_back(e.chunk.clone());
                let r = self.relinquish(&e, out);
                self.retire(e);
                r?;
            }
            plan.drain(..=j);
            while let Some(c) = requeue.pop_back() {
                plan.push_front(c);
            }
            Stats::add(&self.stats.late, 1);
            let r = self.sender.reserve(data_charge(chunk.len() as u64))?;
            Stats::add(&self.stats.positions_reserved, 1);
            drop(plan);
            self.on_demand(chunk, OnDemandToken::Fresh(r), None, out);
            return Ok(());
        }
        Stats::add(&self.stats.misses, 1);
        // Under the plan lock no entry can be pushed, so "ring empty" stays true while we
        // reserve: a fresh position cannot overtake one already in the ring.
        if let Some(head) = consumer.pop() {
            drop(plan);
            let displaced = self.serve_at_head(&head, chunk, out);
            self.retire(head);
            lock(&self.plan).push_front(displaced?);
        } else {
            let r = self.sender.reserve(data_charge(chunk.len() as u64))?;
            Stats::add(&self.stats.positions_reserved, 1);
            drop(plan);
            self.on_demand(chunk, OnDemandToken::Fresh(r), None, out);
        }
        Ok(())
    }
}

/// A speculative encryption pipeline for one channel direction.
pub struct Pipeline {
    inner: Arc<Inner>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Pipeline {
    /// A pipeline whose `cfg.slots` staging buffers are allocated here (page-aligned).
    pub fn new(key: &SessionKey, cfg: PipelineConfig) -> Result<Self> {
        cfg.validate()?;
        let pool = StagingPool::new(cfg.slots, cfg.chunk_bytes)?;
        Self::start(key, cfg, pool, Vec::new())
    }

    /// A pipeline over staging buffers the caller provides (for example memory the device
    /// layer registered as pinned): one slot per buffer, each at least `chunk_bytes` long.
    pub fn with_staging(
        key: &SessionKey,
        mut cfg: PipelineConfig,
        buffers: Vec<StagingBuf>,
    ) -> Result<Self> {
        cfg.slots = buffers.len();
        cfg.validate()?;
        if let Some((i, b)) = buffers
            .iter()
            .enumerate()
            .find(|(_, b)| b.len() < cfg.chunk_bytes)
        {
            return Err(Error::InvalidArgument(format!(
                "staging buffer {i} holds {} bytes, less than chunk_bytes ({})",
                b.len(),
                cfg.chunk_bytes
            )));
        }
        // One buffer per slot: two slots sharing memory would overwrite each other's
        // ciphertext.
        let mut ranges: Vec<(usize, usize, usize)> = buffers
            .iter()
            .enumerate()
            .map(|(i, b)| (b.as_ptr() as usize, b.as_ptr() as usize + b.len(), i))
            .collect();
        ranges.sort_unstable();
        if let Some(w) = ranges.windows(2).find(|w| w[1].0 < w[0].1) {
            let (i, j) = (w[0].2.min(w[1].2), w[0].2.max(w[1].2));
            return Err(Error::InvalidArgument(format!(
                "staging buffers {i} and {j} overlap: each slot needs memory of its own"
            )));
        }
        let pool = StagingPool::from_buffers(buffers);
        Self::start(key, cfg, pool, ranges)
    }

    fn start(
        key: &SessionKey,
        cfg: PipelineConfig,
        pool: StagingPool,
        staging_ranges: Vec<(usize, usize, usize)>,
    ) -> Result<Self> {
        // Before any pipeline thread could draw it (see `fingerprint::prepare`).
        crate::fingerprint::prepare()?;
        let sender = Sender::new(key, cfg.channel, cfg.direction, cfg.policy)?;
        // The ring holds at least as many entries as there are buffers, so a planner holding
        // a buffer always finds room.
        let (producer, consumer) = ring::ring(cfg.slots);
        let charge = cfg.speculative_charge();
        let inner = Arc::new_cyclic(|me| Inner {
            cfg: cfg.clone(),
            staging_ranges,
            charge,
            sender,
            producer,
            consumer: Mutex::new(consumer),
            plan: Mutex::new(VecDeque::new()),
            plan_cv: Condvar::new(),
            pool,
            jobs: JobQueue::default(),
            signal: Signal::default(),
            stats: Stats::default(),
            faults: Faults::default(),
            warnings: Mutex::new(Vec::new()),
            closed: AtomicBool::new(false),
            me: me.clone(),
            retired: Mutex::new(Vec::new()),
            draining: Mutex::new(()),
            watches: (cfg.validation == Validation::PageProtection)
                .then(|| chunk_watches::ChunkWatches::new(cfg.keep_armed)),
            pending: Mutex::new(Vec::new()),
            owner: std::process::id(),
        });
        let mut threads = Vec::with_capacity(cfg.workers + 1);
        let spawn = |name: String, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name)
                .spawn(f)
                .map_err(|e| Error::os("could not start a pipeline thread", &e))
        };
        let planner = inner.clone();
        threads.push(spawn(
            "pipellm-planner".into(),
            Box::new(move || planner.planner_loop()),
        )?);
        for i in 0..cfg.workers {
            let w = inner.clone();
            threads.push(spawn(
                format!("pipellm-worker-{i}"),
                Box::new(move || w.worker_loop()),
            )?);
        }
        Ok(Self {
            inner,
            threads: Mutex::new(threads),
        })
    }

    pub fn config(&self) -> &PipelineConfig {
        &self.inner.cfg
    }

    /// Refuses a pipeline used in a process forked from the one that created it (its threads
    /// do not exist there, and its locks may have been held at the fork) with
    /// [`Error::Forked`]. Every method that takes a lock checks this first.
    pub fn check_owner(&self) -> Result<()> {
        self.inner.check_owner()
    }

    fn check_open(&self) -> Result<()> {
        self.inner.check_owner()?;
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        Ok(())
    }

    /// Splits `(source, offset, length)` into chunks; `length = None`: to the end.
    pub fn chunks(
        &self,
        source: &Source,
        offset: usize,
        length: Option<usize>,
    ) -> Result<Vec<Chunk>> {
        let chunks = source::split(source, offset, length, self.inner.cfg.chunk_bytes)?;
        if let (Some(first), Some(last)) = (chunks.first(), chunks.last()) {
            let start = first.key.addr + first.key.offset;
            let end = last.key.addr + last.key.offset + last.key.len;
            let r = &self.inner.staging_ranges;
            let at = r.partition_point(|&(_, e, _)| e <= start);
            if let Some(&(s, _, i)) = r.get(at) {
                if s < end {
                    return Err(Error::InvalidArgument(format!(
                        "the source overlaps staging buffer {i}: staging memory belongs to \
                         the pipeline while it is open (it holds ciphertext), so it cannot be \
                         a source"
                    )));
                }
            }
        }
        Ok(chunks)
    }

    /// Queues predicted transfers (in expected order). Never blocks: predictions wait in the
    /// plan until staging buffers free up.
    pub fn predict(&self, transfers: &[(Source, usize, Option<usize>)]) -> Result<()> {
        self.check_open()?;
        let mut chunks = Vec::new();
        for (src, off, len) in transfers {
            let more = self.chunks(src, *off, *len)?;
            if chunks.len() + more.len() > MAX_TRANSFER_CHUNKS {
                return Err(Error::InvalidArgument(format!(
                    "the transfers of one predict call split into more than \
                     {MAX_TRANSFER_CHUNKS} chunks: predict fewer or use larger chunks"
                )));
            }
            chunks.try_reserve(more.len()).map_err(|_| {
                Error::OutOfMemory(format!("could not allocate {} chunks", more.len()))
            })?;
            chunks.extend(more);
        }
        let mut plan = lock(&self.inner.plan);
        plan.extend(chunks);
        self.inner.refill(&mut plan);
        drop(plan);
        self.inner.plan_cv.notify_all();
        Ok(())
    }

    /// The real transfer of `length` bytes of `source` from `offset`. Returns its messages in
    /// the order the receiver must get them.
    pub fn request(
        &self,
        source: &Source,
        offset: usize,
        length: Option<usize>,
    ) -> Result<Transfer> {
        self.check_open()?;
        let chunks = self.chunks(source, offset, length)?;
        let inner = &self.inner;
        Stats::add(&inner.stats.requests, 1);
        Stats::add(
            &inner.stats.bytes_requested,
            chunks.iter().map(|c| c.len() as u64).sum(),
        );
        let mut pieces = Vec::with_capacity(chunks.len());
        {
            let mut consumer = lock(&inner.consumer);
            self.check_open()?;
            // NOPs a failed request left come first: their positions precede ours.
            pieces.extend(lock(&inner.pending).drain(..).map(Piece::Ready));
            for c in chunks {
                if let Err(e) = inner.route(&mut consumer, c, &mut pieces) {
                    // Nothing was handed out yet: the positions consumed so far become NOPs.
                    inner.abandon(pieces);
                    drop(consumer);
                    inner.plan_cv.notify_all();
                    return Err(e);
                }
            }
        }
        // Every chunk has its position: the request can no longer fail, so hits let go of
        // their fallback and on-demand chunks go to the threads.
        for p in &mut pieces {
            if let Piece::Hit(..) = p {
                if let Piece::Hit(out, fallback) = std::mem::replace(p, Piece::Taken) {
                    drop(fallback);
                    *p = Piece::Ready(out);
                }
            } else if let Piece::Waiting(_, job) = p {
                if inner.cfg.workers > 0 {
                    inner.jobs.push(Job::OnDemand(job.clone()));
                }
            }
        }
        inner.plan_cv.notify_all();
        Ok(Transfer {
            pieces,
            next: 0,
            inner: inner.clone(),
            released: false,
        })
    }

    /// NOPs for every position still in the ring, and forgets pending predictions: after
    /// sending them the receiver has every position this pipeline reserved.
    pub fn relinquish_all(&self) -> Result<Vec<Outgoing>> {
        self.inner.check_owner()?;
        let inner = &self.inner;
        let mut out = Vec::new();
        let mut consumer = lock(&inner.consumer);
        // NOPs a failed request left first: their positions precede the ring's.
        out.extend(lock(&inner.pending).drain(..).map(Piece::Ready));
        let mut plan = lock(&inner.plan);
        plan.clear();
        while let Some(e) = consumer.pop() {
            inner.relinquish(&e, &mut out)?;
        }
        drop(plan);
        drop(consumer);
        Ok(out
            .into_iter()
            .map(|p| match p {
                Piece::Ready(o) => o,
                _ => unreachable!("relinquish only makes NOPs"),
            })
            .collect())
    }

    /// Forgets predictions that have no ring entry yet (entries already in the ring stay:
    /// their positions are reserved). For a predictor that changed its mind.
    pub fn clear_plan(&self) -> usize {
        if self.inner.forked() {
            return 0;
        }
        let mut plan = lock(&self.inner.plan);
        let n = plan.len();
        plan.clear();
        n
    }

    pub fn stats(&self) -> StatsSnapshot {
        let mut s = self.inner.stats.snapshot();
        if self.inner.forked() {
            return s; // the watches' lock may have been held at the fork
        }
        if let Some(w) = &self.inner.watches {
            s.watches_reused = w.reused();
            s.watches_kept = w.kept() as u64;
        }
        s
    }

    /// Releases the chunks of `source` kept write-protected between uses (`keep_armed`):
    /// their pages become writable and the pipeline lets go of the memory. Chunks in the
    /// ring keep their watches until consumed. Returns how many were released.
    pub fn unwatch(&self, source: &Source) -> usize {
        if self.inner.forked() {
            return 0;
        }
        let b = source.bytes();
        self.inner
            .watches
            .as_ref()
            .map_or(0, |w| w.forget(b.as_ptr() as usize, b.len()))
    }

    /// Entries in the ring and predictions waiting for one, both read at one moment: every
    /// position `positions_reserved` counted before this call is either consumed or in the
    /// ring length returned (if no request runs on another thread meanwhile).
    pub fn queued(&self) -> (usize, usize) {
        if self.inner.forked() {
            return (0, 0);
        }
        // Consumer lock, then plan lock: the order `request` (in `route`) and
        // `relinquish_all` take them in. The ring is read under both: no request pops
        // (consumer lock), and no refill is half done (it counts a position reserved and then
        // pushes its entry, both under the plan lock). Our plan-lock acquire comes after the
        // unlock of every refill whose count a caller saw before calling us (a count written
        // inside a critical section is not visible before it starts), so its push, published
        // with Release before that unlock, is seen by the ring's Acquire loads here.
        let consumer = lock(&self.inner.consumer);
        let plan = lock(&self.inner.plan);
        (consumer.len(), plan.len())
    }

    /// Waits until the workers have nothing to do: retired entries are dropped (their write
    /// watches released or kept, as the planner would), the ring is refilled from the plan
    /// as far as staging buffers allow, and then this returns once the job queue is empty
    /// and no worker is in the middle of a job. With workers held (`hold_workers`) it waits
    /// only for the jobs in hand; with no workers, or closed, it returns after the refill.
    /// False if `timeout` passed first.
    ///
    /// For tests and simulations that must not depend on how fast the machine is: after it
    /// returns true, every entry in the ring is encrypted (or failed), so a request for it
    /// is a hit (or stale), never late. Idle is a moment, not a promise: a staging buffer
    /// returned afterwards (a dropped message) lets the planner start more work.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now().checked_add(timeout);
        let inner = &self.inner;
        if inner.forked() {
            return true; // no thread of the pipeline exists in a forked child
        }
        inner.drain_retired();
        {
            // The same refill the planner does, under the plan lock (ring order stays
            // reservation order); it pushes the new entries' jobs before we wait below.
            let mut plan = lock(&inner.plan);
            inner.refill(&mut plan);
        }
        if inner.cfg.workers == 0 || self.is_closed() {
            // Nobody pops the queue (with no workers, speculative jobs only wait for close).
            return true;
        }
        // Everything the workers did is visible once this returns true: each job's writes
        // come before the queue unlock that marks it finished, and we read `busy == 0`
        // under the same lock (see `JobQueue::finished`).
        inner.jobs.wait_idle(deadline)
    }

    /// Where the next reserved position goes.
    pub fn cursor(&self) -> Cursor {
        self.inner.sender.cursor()
    }

    /// Warnings since the last call (worker failures, paused speculation).
    pub fn take_warnings(&self) -> Vec<String> {
        if self.inner.forked() {
            return Vec::new();
        }
        std::mem::take(&mut *lock(&self.inner.warnings))
    }

    /// Holds the worker threads: they finish the chunk in hand and start nothing new until
    /// released. For simulations that stop their clock (the replay's off-the-clock receiver
    /// checks), so that the workers do not get free time; the request path still runs (a
    /// chunk it needs is then encrypted by the caller).
    pub fn hold_workers(&self, held: bool) {
        if self.inner.forked() {
            return;
        }
        self.inner.jobs.hold(held);
    }

    /// Fault injection for tests.
    pub fn faults(&self) -> &Faults {
        &self.inner.faults
    }

    /// Closed, or used in a process forked from its creator (where it cannot work).
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire) || self.inner.forked()
    }

    /// Stops the threads, drops every reserved position that was not sent (the stream ends
    /// there; no IV is reused) and wipes all staging memory. Idempotent.
    ///
    /// In a process forked from the creator it does nothing: the threads do not exist there,
    /// the locks may have been held at the fork, and the memory is the child's copy of the
    /// parent's; the child's copy of the pipeline is leaked.
    pub fn close(&self) {
        let inner = &self.inner;
        if inner.forked() {
            return;
        }
        lock(&inner.pending).clear();
        if inner.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        inner.jobs.close();
        inner.plan_cv.notify_all();
        for t in lock(&self.threads).drain(..) {
            let _ = t.join();
        }
        let mut consumer = lock(&inner.consumer);
        while let Some(e) = consumer.pop() {
            let mut d = e.lock();
            d.staging.take(); // wiped on drop
            d.speculated.take();
            d.reservation.take();
        }
        lock(&inner.plan).clear();
        lock(&inner.retired).clear();
        if let Some(w) = &inner.watches {
            w.close();
        }
        inner.pool.clear();
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        if self.inner.forked() {
            // The handles name threads of the parent: joining or detaching them in the child
            // is meaningless (joining one panics). Leak them, and with them `inner`, whose
            // other references those threads held.
            let threads = std::mem::take(get_mut(&mut self.threads));
            std::mem::forget(threads);
            return;
        }
        self.close();
    }
}
