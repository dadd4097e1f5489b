//! A ring entry: one predicted chunk at a reserved position, and the state machine that lets
//! a worker encrypt it while the request path may cancel, wait for or take it.
//!
//! ```text
//!   QUEUED ──worker CAS──► ENCRYPTING ──► READY   (speculative ciphertext + fallback)
//!     │                         └───────► FAILED  (reservation kept: served on demand)
//!     └──request-path CAS──► CANCELLED            (reservation taken by the request path)
//! ```
//! The two CASes on QUEUED decide, exactly once, who owns the reservation. The worker takes
//! the entry's `data` mutex *before* its CAS and holds it until the entry is settled, so a
//! request path that needs an ENCRYPTING entry simply locks the mutex and finds it settled;
//! the state store happens before the unlock, and the request path reads state after locking.

use super::source::Chunk;
use crate::fingerprint::Fingerprint;
use crate::sequencer::{Fallback, Reservation, Sealed};
use crate::staging::StagingBuf;
use crate::sync::{AtomicU8, Mutex, MutexGuard, Ordering};
use std::sync::PoisonError;

pub(crate) const QUEUED: u8 = 0;
pub(crate) const ENCRYPTING: u8 = 1;
pub(crate) const READY: u8 = 2;
pub(crate) const FAILED: u8 = 3;
pub(crate) const CANCELLED: u8 = 4;

/// Fields drop in declaration order: `data` (which may hold a write watch on the source's
/// pages) goes before `chunk` (which may hold the last reference to the source's memory), so
/// a watch never outlives the memory it protects.
pub(crate) struct Entry {
    pub data: Mutex<EntryData>,
    pub state: AtomicU8,
    pub chunk: Chunk,
}

/// How the request path will tell that the source is unchanged since its snapshot.
pub(crate) enum Check {
    /// Not encrypted yet.
    None,
    Fingerprint(Fingerprint),
    /// The watch over the chunk's whole pages, and the fingerprints of its edges' snapshot
    /// (head, tail; see `chunk_watches::Edges`) when it has any.
    Watch(
        super::chunk_watches::HeldWatch,
        crate::writeguard::Stamp,
        Option<(Fingerprint, Fingerprint)>,
    ),
}

pub(crate) struct EntryData {
    pub staging: Option<StagingBuf>,
    /// Present until a worker seals speculatively or the request path takes it.
    pub reservation: Option<Reservation>,
    /// After a successful speculative seal: header + tag, and the fallback for the position.
    pub speculated: Option<(Sealed, Fallback)>,
    /// How to validate the snapshot that was encrypted.
    pub check: Check,
}

impl Entry {
    pub fn new(chunk: Chunk, staging: StagingBuf, reservation: Reservation) -> Self {
        Self {
            chunk,
            state: AtomicU8::new(QUEUED),
            data: Mutex::new(EntryData {
                staging: Some(staging),
                reservation: Some(reservation),
                speculated: None,
                check: Check::None,
            }),
        }
    }

    /// The worker's claim. AcqRel: the winner sees the planner's writes (also ordered by the
    /// job queue's mutex) and the loser's later reads see the winner's claim.
    pub fn claim_for_worker(&self) -> bool {
        self.state
            .compare_exchange(QUEUED, ENCRYPTING, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// The request path's claim of an entry no worker has started.
    pub fn cancel(&self) -> bool {
        self.state
            .compare_exchange(QUEUED, CANCELLED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    pub fn set_state(&self, s: u8) {
        self.state.store(s, Ordering::Release);
    }

    pub fn state(&self) -> u8 {
        self.state.load(Ordering::Acquire)
    }

    /// Locks the entry's data. A panic in a worker while it held the lock leaves the data as
    /// the worker left it, which the state machine still describes (FAILED), so poisoning is
    /// not an error here.
    pub fn lock(&self) -> MutexGuard<'_, EntryData> {
        self.data.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    //! The worker's claim against the request path's, over every interleaving: the real
    //! worker routine (`run_speculative`) races the request path's steps (`cancel`, then
    //! `lock` and the settled-state check of `Inner::settle`/`take_position`).
    use super::*;
    use crate::header::{data_charge, Direction};
    use crate::key::SessionKey;
    use crate::pipeline::jobs::{run_speculative, Faults, Signal};
    use crate::pipeline::source::{split, Source};
    use crate::pipeline::stats::Stats;
    use crate::schedule::KeyPolicy;
    use crate::sequencer::Sequencer;
    use std::sync::Arc;

    /// Exactly one side owns the position: either the worker sealed it (speculated, READY)
    /// or the request path cancelled it and took the reservation; the request path never
    /// sees ENCRYPTING after taking the lock, and never finds the entry without a position.
    #[test]
    fn worker_and_request_path_claim_exactly_once() {
        loom::model(|| {
            let key = SessionKey::from_bytes(&[1u8; 32]).unwrap();
            let seq = Sequencer::new(
                key.channel_key(0, Direction::HostToDevice).unwrap(),
                0,
                Direction::HostToDevice,
                KeyPolicy::default(),
            )
            .unwrap();
            let src: Source = Arc::new(vec![7u8; 64]);
            let chunk = split(&src, 0, None, 64).unwrap().remove(0);
            let r = seq.reserve(2 * data_charge(64)).unwrap();
            let staging = crate::staging::StagingBuf::alloc(64).unwrap();
            let entry = Arc::new(Entry::new(chunk, staging, r));
            let e2 = entry.clone();
            let worker = loom::thread::spawn(move || {
                let (stats, faults, signal) =
                    (Stats::default(), Faults::default(), Signal::default());
                run_speculative(&e2, None, &stats, &faults, &signal);
            });
            // The request path.
            let cancelled = entry.cancel();
            let mut data = entry.lock();
            let state = entry.state();
            assert_ne!(state, ENCRYPTING, "settled before the lock is released");
            let took_reservation = data.reservation.take().is_some();
            let took_speculated = data.speculated.take().is_some();
            drop(data);
            worker.join().unwrap();
            if cancelled {
                assert!(took_reservation && !took_speculated);
                assert_eq!(state, CANCELLED);
            } else {
                // The worker claimed it first: it sealed (READY) before we got the lock.
                assert_eq!(state, READY);
                assert!(took_speculated && !took_reservation);
            }
        });
    }
}
