//! A place in a channel's stream. Its own module because both the header (which carries it)
//! and the errors (which report the expected and the received one) need it, and the header
//! needs the errors.

/// A place in a channel's stream: key epoch and message counter within that epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Position {
    pub epoch: u32,
    pub counter: u64,
}
