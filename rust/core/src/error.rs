//! Typed errors of the core. The Python bindings map each variant onto one exception class,
//! so a variant is added only together with its mapping.

use crate::position::Position;

/// Why the receiver refused a message because of its place in the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderViolation {
    /// The message comes after the one the receiver expects: messages were lost, withheld or
    /// reordered.
    Gap,
    /// The message was already accepted (or comes before the expected one): a replay.
    Replay,
    /// The message opens a new epoch but says the previous epoch held `sent` messages, while
    /// the receiver accepted `received`: the tail of the previous epoch was withheld.
    EpochTruncated { sent: u64, received: u64 },
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum Error {
    /// The message is not the next one of the stream. The receiver's state is unchanged.
    #[error("IV order violated ({violation:?}): receiver expects epoch {expected_epoch} counter {expected_counter}, message carries epoch {got_epoch} counter {got_counter}", expected_epoch = expected.epoch, expected_counter = expected.counter, got_epoch = got.epoch, got_counter = got.counter)]
    IvOrder {
        violation: OrderViolation,
        expected: Position,
        got: Position,
    },
    /// Tag, AAD or ciphertext do not verify. The receiver's state is unchanged and no plaintext
    /// was exposed.
    #[error("authentication failed: {0}")]
    Authentication(&'static str),
    /// The key's usage limit is reached and rotation is disabled (or all epochs are used).
    #[error("IV space exhausted: {0}")]
    IvExhausted(&'static str),
    /// A length that does not fit (destination size, message size, wire format).
    #[error("{0}")]
    InvalidLength(String),
    /// Any other argument that is out of range.
    #[error("{0}")]
    InvalidArgument(String),
    /// The pipeline was closed.
    #[error("the pipeline is closed")]
    Closed,
    /// The pipeline was used in a process forked from the one that created it: its threads
    /// do not exist there and its locks may have been held at the fork.
    #[error("this pipeline belongs to process {owner}; create a new one after fork")]
    Forked { owner: u32 },
    /// Memory could not be allocated or mapped (staging buffers).
    #[error("{0}")]
    OutOfMemory(String),
    /// The cryptographic library reported a failure it should never report (out of memory).
    #[error("crypto backend failure: {0}")]
    Backend(&'static str),
    /// The operating system refused a call: `what` says which, `errno` is its error (see
    /// [`Error::os`]; `ENOMEM` becomes `OutOfMemory` instead).
    #[error("{what}: {}", std::io::Error::from_raw_os_error(*errno))]
    Os { what: String, errno: i32 },
    /// A fixed-size process-wide table is full (write-watched regions, open seals).
    #[error("{0}")]
    Capacity(String),
}

impl Error {
    /// The error for an OS call `what` that failed with `e`: `OutOfMemory` for `ENOMEM`,
    /// `Os` otherwise.
    pub fn os(what: impl Into<String>, e: &std::io::Error) -> Self {
        let what = what.into();
        match e.raw_os_error() {
            Some(libc::ENOMEM) => Error::OutOfMemory(format!("{what}: {e}")),
            errno => Error::Os {
                what,
                errno: errno.unwrap_or(libc::EIO),
            },
        }
    }

    /// `os(what, last OS error)`.
    pub fn last_os(what: impl Into<String>) -> Self {
        Self::os(what, &std::io::Error::last_os_error())
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// `Ok` when a destination of `dst` bytes can hold a payload of `src` bytes exactly.
pub(crate) fn check_same_len(dst: usize, src: usize) -> Result<()> {
    if dst != src {
        return Err(Error::InvalidLength(format!(
            "destination holds {dst} bytes, the payload has {src}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_errors_keep_their_errno_and_enomem_is_out_of_memory() {
        let e = Error::os("mprotect", &std::io::Error::from_raw_os_error(libc::EPERM));
        assert_eq!(
            e,
            Error::Os {
                what: "mprotect".into(),
                errno: libc::EPERM
            }
        );
        assert!(e.to_string().starts_with("mprotect: "), "{e}");
        let e = Error::os("mmap", &std::io::Error::from_raw_os_error(libc::ENOMEM));
        assert!(matches!(e, Error::OutOfMemory(_)), "{e:?}");
    }
}
