//! pipellm core: the secure transfer channel of confidential LLM serving.
//!
//! - [`header`]: what a message binds (channel, direction, epoch, counter, length, charge),
//!   the IV derived from it and the wire encoding.
//! - [`crypto`]: AES-256-GCM, SHA-256, HKDF and randomness through AWS-LC; all the crypto FFI.
//! - [`key`]: session key, per-channel keys and epoch keys (rotation); zeroized on drop.
//! - [`schedule`]: the placement rule both ends apply (counter, usage limit, rotation).
//! - [`sequencer`]: in-order IV reservation for any number of threads.
//! - [`sender`], [`receiver`]: the two ends; the receiver mirrors the device's checks.
//! - [`message`]: a sealed message and its wire form.
//! - [`pipeline`]: speculative pre-encryption (workers, ring, validation); [`predict`] the
//!   learned predictor; [`staging`], [`fingerprint`], [`space`] (the process's address-space
//!   registry), [`writeguard`] (write trackers), [`gate`], [`hostpool`], [`page`], [`locks`]:
//!   what the pipeline and the interposer build on.
//!
//! How these fit together (every thread, every process-wide global and its owner, the lock
//! order, a transfer's path through each backend): `docs/architecture.md`.

#![deny(clippy::undocumented_unsafe_blocks)]

// pipellm is Linux-only, and this is the one place that says so: the confidential-computing
// GPU drivers it serves are Linux drivers, and validation by page protection (userfaultfd,
// `PAGEMAP_SCAN`, `mprotect` with a SIGSEGV handler), the host pools (`memfd`, `MADV_DONTFORK`)
// and the interposer's safe reads of the caller's memory (`process_vm_readv`) are Linux APIs.
// Every crate of the workspace builds on this one, so none repeats the gate.
#[cfg(not(target_os = "linux"))]
compile_error!(
    "pipellm supports Linux only (see the comment above this line in rust/core/src/lib.rs)"
);

pub mod crypto;
pub mod error;
pub mod fingerprint;
pub mod gate;
pub mod gf128;
pub mod header;
pub mod hostpool;
pub mod key;
pub mod locks;
pub mod message;
pub mod page;
mod peer;
pub mod pipeline;
pub mod position;
pub mod predict;
pub mod receiver;
pub mod ring;
pub mod schedule;
pub mod sender;
pub mod sequencer;
pub mod space;
pub mod span;
pub mod staging;
mod sync;
pub mod writeguard;

pub use error::{Error, OrderViolation, Result};
pub use header::{Direction, Header, Kind, Position};
pub use key::SessionKey;
pub use message::Message;
pub use receiver::Receiver;
pub use schedule::{Cursor, KeyPolicy};
pub use sender::Sender;
pub use sequencer::{Reservation, Sealed, Sequencer, Unsealed};
