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
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

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
    #[cfg(target_os = "linux")]
    Watch(crate::writeguard::WriteWatch, crate::writeguard::Stamp),
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
