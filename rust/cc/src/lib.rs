//! pipellm's driver backend for real Hopper confidential computing: a libcrypto interposer.
//!
//! In CC mode the CUDA driver encrypts every host-to-device copy on the CPU through OpenSSL 3
//! (`EVP_EncryptInit_ex` with a fresh IV per chunk of at most 1 MiB, `EVP_EncryptUpdate` into
//! the bounce buffer, `EVP_EncryptFinal_ex`, `GET_TAG`). Loaded in its place, this library
//! learns each encryption context's IV layout ([`ivmodel`]) and the sequence of
//! (input pointer, length) it encrypts, pre-encrypts the predicted next chunks on worker
//! threads under the context's own key and predicted IV ([`engine`]), and answers an
//! `EVP_EncryptUpdate` whose IV, input and bytes match with the stored ciphertext ([`exports`]).
//! Device-to-host chunks decrypted into a registered receive pool are answered after their
//! tag check and decrypted later ([`d2h`]). Everything else is forwarded to the real
//! libcrypto ([`real`]).
//!
//! What the driver receives is always exactly what OpenSSL would have produced: a key is
//! followed only after our AES-GCM reproduced a real message under it, and a chunk is used
//! only for the IV it was made with, byte for byte.
//!
//! Its threads, globals and lock order beside the rest of pipellm's: `docs/architecture.md`;
//! the call-by-call state model: `docs/driver-backend.md`.

#![deny(clippy::undocumented_unsafe_blocks)]

pub mod cadence;
pub mod config;
pub mod context;
pub mod d2h;
pub mod engine;
pub mod exports;
pub mod ivmodel;
pub mod pieces;
pub mod plan;
pub mod process;
pub mod real;
pub mod stats;
pub mod watch_ranges;
pub mod workers;
