//! Where the next message goes: the rule that sender and receiver both apply to decide its
//! position (epoch, counter) and when the key rotates. It is a pure function of the cursor and
//! the message's charge, so both ends stay in step without talking to each other.

use crate::error::{Error, Result};
use crate::header::Position;

/// Hopper's default key-usage threshold, in units of (bytes / 16 + messages) (~389 GB).
pub const DEFAULT_USAGE_LIMIT: u64 = 24_000_000_000;

/// How much one key may be used, and what happens after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyPolicy {
    /// Usage units one epoch key may be charged before the key must change.
    pub usage_limit: u64,
    /// Move to the next epoch key when the limit is reached; otherwise fail with
    /// `IvExhausted` (for deployments that re-key out of band).
    pub rotate: bool,
}

impl Default for KeyPolicy {
    fn default() -> Self {
        Self {
            usage_limit: DEFAULT_USAGE_LIMIT,
            rotate: true,
        }
    }
}

impl KeyPolicy {
    pub fn validate(&self) -> Result<()> {
        if self.usage_limit < 2 {
            return Err(Error::InvalidArgument(format!(
                "usage_limit must be at least 2 units, got {}",
                self.usage_limit
            )));
        }
        Ok(())
    }
}

/// The state of one end of a channel direction: where the next message goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub epoch: u32,
    pub next_counter: u64,
    /// Units charged to the current epoch's key so far.
    pub usage: u64,
}

/// Whether placing a message moved to a new epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    Current,
    Rotated,
}

/// Where a message goes, and the cursor after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placed {
    pub placement: Placement,
    pub position: Position,
    /// For the first message of a new epoch: how many messages the previous epoch held. The
    /// message binds it (AAD), so the receiver can tell that it got the whole previous epoch.
    /// Without it, dropping the tail of an epoch would go unnoticed: a later, larger message
    /// that rotates from the receiver's state too would look like the expected next one.
    /// Zero for every other message.
    pub handover: u64,
    pub after: Cursor,
}

impl Cursor {
    pub const START: Cursor = Cursor {
        epoch: 0,
        next_counter: 0,
        usage: 0,
    };

    /// Places a message that charges `charge` units: returns where it goes and the cursor
    /// after it. Does not modify `self`, so a receiver can check before it commits.
    pub fn place(&self, charge: u64, policy: &KeyPolicy) -> Result<Placed> {
        if charge == 0 || charge > policy.usage_limit {
            return Err(Error::InvalidLength(format!(
                "a message charging {charge} units cannot fit a key usage limit of {}",
                policy.usage_limit
            )));
        }
        let fits = self
            .usage
            .checked_add(charge)
            .is_some_and(|u| u <= policy.usage_limit)
            && self.next_counter < u64::MAX;
        if fits {
            let pos = Position {
                epoch: self.epoch,
                counter: self.next_counter,
            };
            let after = Cursor {
                epoch: self.epoch,
                next_counter: self.next_counter + 1,
                usage: self.usage + charge,
            };
            return Ok(Placed {
                placement: Placement::Current,
                position: pos,
                handover: 0,
                after,
            });
        }
        if !policy.rotate {
            return Err(Error::IvExhausted(
                "the key's usage limit is reached and rotation is disabled",
            ));
        }
        let epoch = self
            .epoch
            .checked_add(1)
            .ok_or(Error::IvExhausted("all key epochs are used"))?;
        let pos = Position { epoch, counter: 0 };
        let after = Cursor {
            epoch,
            next_counter: 1,
            usage: charge,
        };
        Ok(Placed {
            placement: Placement::Rotated,
            position: pos,
            handover: self.next_counter,
            after,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn rotates_exactly_when_the_limit_would_be_passed() {
        let p = KeyPolicy {
            usage_limit: 10,
            rotate: true,
        };
        let a = Cursor::START.place(10, &p).unwrap();
        assert_eq!(
            (
                a.placement,
                a.position.epoch,
                a.position.counter,
                a.handover
            ),
            (Placement::Current, 0, 0, 0)
        );
        let b = a.after.place(1, &p).unwrap();
        assert_eq!(
            (
                b.placement,
                b.position.epoch,
                b.position.counter,
                b.after.usage
            ),
            (Placement::Rotated, 1, 0, 1)
        );
        assert_eq!(b.handover, 1, "epoch 0 held one message");
        assert!(matches!(
            b.after.place(11, &p),
            Err(Error::InvalidLength(_))
        ));
    }

    #[test]
    fn without_rotation_the_limit_is_exhaustion() {
        let p = KeyPolicy {
            usage_limit: 4,
            rotate: false,
        };
        let c = Cursor::START.place(4, &p).unwrap().after;
        assert!(matches!(c.place(1, &p), Err(Error::IvExhausted(_))));
    }

    #[test]
    fn last_epoch_exhausts() {
        let p = KeyPolicy {
            usage_limit: 4,
            rotate: true,
        };
        let c = Cursor {
            epoch: u32::MAX,
            next_counter: 3,
            usage: 4,
        };
        assert!(matches!(c.place(1, &p), Err(Error::IvExhausted(_))));
        let c = Cursor {
            epoch: 0,
            next_counter: u64::MAX,
            usage: 0,
        };
        assert_eq!(c.place(1, &p).unwrap().placement, Placement::Rotated);
    }

    proptest! {
        /// Positions strictly increase, each epoch's usage stays within the limit, and counters
        /// restart at 0 exactly when the epoch changes.
        #[test]
        fn positions_are_unique_and_usage_bounded(limit in 2u64..200, charges in proptest::collection::vec(1u64..50, 1..300)) {
            let p = KeyPolicy { usage_limit: limit, rotate: true };
            let mut c = Cursor::START;
            let mut last: Option<Position> = None;
            let mut used = 0u64;
            for ch in charges {
                match c.place(ch, &p) {
                    Ok(Placed { placement, position: pos, handover, after }) => {
                        if let Some(prev) = last { prop_assert!(pos > prev); }
                        if placement == Placement::Rotated {
                            prop_assert_eq!(pos.counter, 0);
                            prop_assert_eq!(handover, last.unwrap().counter + 1);
                            used = 0;
                        } else {
                            prop_assert_eq!(handover, 0);
                        }
                        used += ch;
                        prop_assert!(used <= limit);
                        prop_assert_eq!(after.usage, used);
                        last = Some(pos);
                        c = after;
                    }
                    Err(e) => { prop_assert!(ch > limit, "unexpected {:?}", e); }
                }
            }
        }
    }
}
