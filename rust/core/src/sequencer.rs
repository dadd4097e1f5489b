//! IV reservation. A `Sequencer` hands out positions of one channel direction strictly in
//! order, each exactly once, from any number of threads; a `Reservation` is the right to seal
//! exactly one message at its position. Reserving early and sealing later is what lets workers
//! encrypt predicted chunks in parallel while the receiver still sees one ordered stream.

use crate::error::{Error, Result};
use crate::header::{data_charge, Direction, Header, Kind, Position, MAX_CHANNEL, TAG_LEN};
use crate::key::EpochKey;
use crate::message::Message;
use crate::schedule::{Cursor, KeyPolicy, Placement};
use std::sync::{Arc, Mutex, PoisonError};

/// Hands out positions in order. A mutex (not atomics) guards the cursor because a placement
/// updates counter, usage and sometimes the key together; the section is a few dozen
/// nanoseconds, taken once per chunk (kilobytes to megabytes), so it is never the bottleneck.
pub struct Sequencer {
    channel: u32,
    direction: Direction,
    policy: KeyPolicy,
    state: Mutex<State>,
}

struct State {
    cursor: Cursor,
    key: Arc<EpochKey>,
}

impl Sequencer {
    pub fn new(
        key: EpochKey,
        channel: u32,
        direction: Direction,
        policy: KeyPolicy,
    ) -> Result<Self> {
        check_channel(channel)?;
        policy.validate()?;
        Ok(Self {
            channel,
            direction,
            policy,
            state: Mutex::new(State {
                cursor: Cursor {
                    epoch: key.epoch(),
                    ..Cursor::START
                },
                key: Arc::new(key),
            }),
        })
    }

    pub fn channel(&self) -> u32 {
        self.channel
    }
    pub fn direction(&self) -> Direction {
        self.direction
    }
    pub fn policy(&self) -> KeyPolicy {
        self.policy
    }

    /// Where the next reservation will go.
    pub fn cursor(&self) -> Cursor {
        self.lock().cursor
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The critical sections below commit only after every fallible step, so a poisoned
        // lock still guards a consistent state.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reserves the next position for a message that charges `charge` units.
    pub fn reserve(&self, charge: u64) -> Result<Reservation> {
        let mut st = self.lock();
        self.reserve_locked(&mut st, charge)
    }

    /// Reserves consecutive positions for `charges`, all or none.
    pub fn reserve_run(&self, charges: &[u64]) -> Result<Vec<Reservation>> {
        let mut st = self.lock();
        let saved_cursor = st.cursor;
        let saved_key = st.key.clone();
        let mut out = Vec::with_capacity(charges.len());
        for &c in charges {
            match self.reserve_locked(&mut st, c) {
                Ok(r) => out.push(r),
                Err(e) => {
                    // Nothing reserved here has left this function: roll back.
                    st.cursor = saved_cursor;
                    st.key = saved_key;
                    return Err(e);
                }
            }
        }
        Ok(out)
    }

    fn reserve_locked(&self, st: &mut State, charge: u64) -> Result<Reservation> {
        let placed = st.cursor.place(charge, &self.policy)?;
        if placed.placement == Placement::Rotated {
            st.key = Arc::new(st.key.next()?);
        }
        st.cursor = placed.after;
        Ok(Reservation {
            channel: self.channel,
            direction: self.direction,
            position: placed.position,
            handover: placed.handover,
            charge,
            key: st.key.clone(),
        })
    }
}

pub(crate) fn check_channel(channel: u32) -> Result<()> {
    if channel > MAX_CHANNEL {
        return Err(Error::InvalidArgument(format!(
            "channel must be in 0..={MAX_CHANNEL}, got {channel}"
        )));
    }
    Ok(())
}

/// The right to seal exactly one message at one position. Consumed by sealing or by turning it
/// into a NOP; a method that cannot seal gives it back (`Unsealed`) so the position is never
/// silently lost. Holds its epoch's key alive, so reservations that straddle a rotation still
/// seal under the right key.
#[must_use = "a reserved IV must be sealed or turned into a NOP, or the receiver sees a gap"]
pub struct Reservation {
    channel: u32,
    direction: Direction,
    position: Position,
    handover: u64,
    charge: u64,
    key: Arc<EpochKey>,
}

/// A data message sealed into caller-provided memory: header and tag; the ciphertext is where
/// the caller asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sealed {
    pub header: Header,
    pub tag: [u8; TAG_LEN],
}

/// A reservation handed back unused, with the reason.
pub struct Unsealed {
    pub error: Error,
    pub reservation: Reservation,
}

impl std::fmt::Debug for Unsealed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Unsealed({:?} at {:?})",
            self.error, self.reservation.position
        )
    }
}

impl Reservation {
    pub fn position(&self) -> Position {
        self.position
    }
    pub fn charge(&self) -> u64 {
        self.charge
    }
    /// The longest payload this reservation can carry.
    pub fn max_len(&self) -> u64 {
        (self.charge - 1).saturating_mul(16)
    }

    fn header(&self, kind: Kind, length: u64) -> Header {
        Header {
            kind,
            direction: self.direction,
            channel: self.channel,
            position: self.position,
            length,
            charge: self.charge,
            handover: self.handover,
        }
    }

    fn data_header(self, len: usize) -> std::result::Result<(Header, Self), Unsealed> {
        let len = len as u64;
        if data_charge(len) > self.charge {
            return Err(Unsealed {
                error: Error::InvalidLength(format!(
                    "{len} bytes do not fit a reservation of {} units (at most {} bytes)",
                    self.charge,
                    self.max_len()
                )),
                reservation: self,
            });
        }
        Ok((self.header(Kind::Data, len), self))
    }

    /// Seals `src` into `dst` (same length) at this position.
    pub fn seal_into(self, src: &[u8], dst: &mut [u8]) -> std::result::Result<Sealed, Unsealed> {
        if src.len() != dst.len() {
            return Err(Unsealed {
                error: Error::InvalidLength(format!(
                    "destination holds {} bytes, source has {}",
                    dst.len(),
                    src.len()
                )),
                reservation: self,
            });
        }
        let (header, me) = self.data_header(src.len())?;
        match me.key.aead().seal(&header.iv(), &header.encode(), src, dst) {
            Ok(tag) => Ok(Sealed { header, tag }),
            Err(error) => Err(Unsealed {
                error,
                reservation: me,
            }),
        }
    }

    /// Seals `src` into a new buffer at this position (no zero-fill of the output first).
    pub fn seal_to_vec(self, src: &[u8]) -> std::result::Result<Message, Unsealed> {
        let (header, me) = self.data_header(src.len())?;
        let mut ct: Vec<u8> = Vec::with_capacity(src.len());
        match me.key.aead().seal_uninit(
            &header.iv(),
            &header.encode(),
            src,
            ct.spare_capacity_mut(),
        ) {
            Ok(tag) => {
                // SAFETY: seal_uninit succeeded, so it wrote all `src.len()` bytes of the
                // spare capacity, which is at least that long.
                unsafe { ct.set_len(src.len()) };
                Ok(Message::new(header, tag, ct).expect("payload length equals header length"))
            }
            Err(error) => Err(Unsealed {
                error,
                reservation: me,
            }),
        }
    }

    /// Seals `buf` in place at this position.
    pub fn seal_in_place(self, buf: &mut [u8]) -> std::result::Result<Sealed, Unsealed> {
        let (header, me) = self.data_header(buf.len())?;
        match me
            .key
            .aead()
            .seal_in_place(&header.iv(), &header.encode(), buf)
        {
            Ok(tag) => Ok(Sealed { header, tag }),
            Err(error) => Err(Unsealed {
                error,
                reservation: me,
            }),
        }
    }

    /// Burns this position with an empty, authenticated NOP message. It carries the
    /// reservation's charge, so both ends account the key's usage identically.
    pub fn into_nop(self) -> std::result::Result<Message, Unsealed> {
        let header = self.header(Kind::Nop, 0);
        match self
            .key
            .aead()
            .seal_in_place(&header.iv(), &header.encode(), &mut [])
        {
            Ok(tag) => Ok(Message::new(header, tag, Vec::new()).expect("empty payload, length 0")),
            Err(error) => Err(Unsealed {
                error,
                reservation: self,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::key::SessionKey;
    use std::collections::HashSet;

    fn seq(limit: u64) -> Sequencer {
        let key = SessionKey::from_bytes(&[4u8; 32]).unwrap();
        let k = key.channel_key(0, Direction::HostToDevice).unwrap();
        Sequencer::new(
            k,
            0,
            Direction::HostToDevice,
            KeyPolicy {
                usage_limit: limit,
                rotate: true,
            },
        )
        .unwrap()
    }

    #[test]
    fn threads_get_distinct_gap_free_positions() {
        let s = Arc::new(seq(1_000));
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let s = s.clone();
                std::thread::spawn(move || {
                    (0..2_000)
                        .map(|_| {
                            let r = s.reserve(3).unwrap();
                            let p = r.position();
                            let _ = r.into_nop().unwrap();
                            p
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let all: Vec<Position> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        let set: HashSet<_> = all.iter().copied().collect();
        assert_eq!(set.len(), all.len(), "a position was handed out twice");
        // 1000 units / 3 per message = 333 messages per epoch; gap-free within each epoch.
        let mut sorted = all.clone();
        sorted.sort();
        for w in sorted.windows(2) {
            let (a, b) = (w[0], w[1]);
            assert!(
                (a.epoch == b.epoch && b.counter == a.counter + 1)
                    || (b.epoch == a.epoch + 1 && b.counter == 0),
                "gap between {a:?} and {b:?}"
            );
        }
        assert_eq!(
            sorted[0],
            Position {
                epoch: 0,
                counter: 0
            }
        );
    }

    #[test]
    fn failed_run_reserves_nothing() {
        let s = seq(10);
        let before = s.cursor();
        assert!(s.reserve_run(&[3, 3, 11]).is_err());
        assert_eq!(s.cursor(), before);
        let run = s.reserve_run(&[3, 3, 3, 3]).unwrap();
        let pos: Vec<_> = run.iter().map(|r| r.position()).collect();
        assert_eq!(
            pos[3],
            Position {
                epoch: 1,
                counter: 0
            }
        );
        for r in run {
            let _ = r.into_nop().unwrap();
        }
    }

    #[test]
    fn oversized_payload_hands_the_reservation_back() {
        let s = seq(1_000);
        let r = s.reserve(2).unwrap(); // room for 16 bytes
        let src = [0u8; 17];
        let mut dst = [0u8; 17];
        let back = r.seal_into(&src, &mut dst).unwrap_err();
        assert!(matches!(back.error, Error::InvalidLength(_)));
        let pos = back.reservation.position();
        let sealed = back
            .reservation
            .seal_into(&src[..16], &mut dst[..16])
            .unwrap();
        assert_eq!(sealed.header.position, pos);
    }
}
