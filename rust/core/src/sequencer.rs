//! IV reservation. A `Sequencer` hands out positions of one channel direction strictly in
//! order, each exactly once, from any number of threads; a `Reservation` is the right to seal
//! exactly one message at its position. Reserving early and sealing later is what lets workers
//! encrypt predicted chunks in parallel while the receiver still sees one ordered stream.

use crate::error::{Error, Result};
use crate::header::{data_charge, Direction, Header, Kind, Position, MAX_CHANNEL, TAG_LEN};
use crate::key::EpochKey;
use crate::locks::lock;
use crate::message::Message;
use crate::schedule::{Cursor, KeyPolicy, Placement};
use std::sync::{Arc, Mutex};

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
        lock(&self.state)
    }

    /// Reserves the next position for a message that charges `charge` units.
    pub fn reserve(&self, charge: u64) -> Result<Reservation> {
        let mut st = self.lock();
        self.reserve_locked(&mut st, charge)
    }

    fn reserve_locked(&self, st: &mut State, charge: u64) -> Result<Reservation> {
        let placed = st.cursor.place(charge, &self.policy)?;
        if placed.placement == Placement::Rotated {
            st.key = Arc::new(st.key.next()?);
        }
        st.cursor = placed.after;
        Ok(Reservation(Token {
            channel: self.channel,
            direction: self.direction,
            position: placed.position,
            handover: placed.handover,
            charge,
            budget: charge,
            key: st.key.clone(),
        }))
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

/// The right to seal exactly one message at one position. Consumed by sealing, by turning it
/// into a NOP, or by sealing speculatively (which leaves a [`Fallback`]); a method that cannot
/// seal gives it back (`Refused`) so the position is never silently lost. Holds its epoch's
/// key alive, so reservations that straddle a rotation still seal under the right key.
#[must_use = "a reserved IV must be sealed or turned into a NOP, or the receiver sees a gap"]
pub struct Reservation(Token);

/// The position of a speculatively sealed chunk, kept in case that chunk is not delivered:
/// it can still be consumed once, by a substitute data message or by a NOP. Each kind has its
/// own IV variant, so neither reuses the speculative chunk's (key, IV).
#[must_use = "a position whose speculative chunk is not delivered must get a substitute or a NOP"]
pub struct Fallback(Token);

struct Token {
    channel: u32,
    direction: Direction,
    position: Position,
    handover: u64,
    /// Units charged to the key for this position, whatever is finally encrypted at it.
    charge: u64,
    /// Units this position may still encrypt (the charge minus what was sealed already).
    budget: u64,
    key: Arc<EpochKey>,
}

/// A data message sealed into caller-provided memory: header and tag; the ciphertext is where
/// the caller asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sealed {
    pub header: Header,
    pub tag: [u8; TAG_LEN],
}

/// A token handed back unused, with the reason.
pub struct Refused<T> {
    pub error: Error,
    pub token: T,
}

/// A reservation handed back unused.
pub type Unsealed = Refused<Reservation>;

impl<T> std::fmt::Debug for Refused<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Refused({:?})", self.error)
    }
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Reservation({:?}, charge {})",
            self.0.position, self.0.charge
        )
    }
}

impl std::fmt::Debug for Fallback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Fallback({:?}, {} units left)",
            self.0.position, self.0.budget
        )
    }
}

type Outcome<T, Tok> = std::result::Result<T, Refused<Tok>>;

/// How the plaintext reaches the ciphertext buffer.
enum Io<'a> {
    Copy(&'a [u8], &'a mut [u8]),
    InPlace(&'a mut [u8]),
}

impl Io<'_> {
    fn len(&self) -> usize {
        match self {
            Io::Copy(src, _) => src.len(),
            Io::InPlace(buf) => buf.len(),
        }
    }
}

impl Token {
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

    /// Checks that `units` fit the remaining budget, keeping `reserve_after` units spare.
    fn check_budget(&self, units: u64, reserve_after: u64, len: usize) -> Result<()> {
        if units.saturating_add(reserve_after) > self.budget {
            return Err(Error::InvalidLength(format!(
                "{len} bytes do not fit the {} units left at this position",
                self.budget.saturating_sub(reserve_after)
            )));
        }
        Ok(())
    }

    /// Encrypts one message of `kind` at this position. On error the token comes back
    /// unchanged (nothing was encrypted: the length checks come first, and AWS-LC does not
    /// fail once its arguments are valid).
    fn seal(
        mut self,
        kind: Kind,
        io: Io<'_>,
        reserve_after: u64,
    ) -> std::result::Result<(Sealed, Token), Refused<Token>> {
        let len = io.len();
        let units = if kind.carries_data() {
            data_charge(len as u64)
        } else {
            1
        };
        if let Err(error) = self.check_budget(units, reserve_after, len) {
            return Err(Refused { error, token: self });
        }
        let header = self.header(kind, len as u64);
        let (iv, aad) = (header.iv(), header.encode());
        let aead = self.key.aead();
        let sealed = match io {
            Io::Copy(src, dst) => aead.seal(&iv, &aad, src, dst),
            Io::InPlace(buf) => aead.seal_in_place(&iv, &aad, buf),
        };
        match sealed {
            Ok(tag) => {
                self.budget -= units;
                Ok((Sealed { header, tag }, self))
            }
            Err(error) => Err(Refused { error, token: self }),
        }
    }

    fn seal_to_vec(self, kind: Kind, src: &[u8]) -> std::result::Result<Message, Refused<Token>> {
        let len = src.len();
        if let Err(error) = self.check_budget(data_charge(len as u64), 0, len) {
            return Err(Refused { error, token: self });
        }
        let header = self.header(kind, len as u64);
        let mut ct: Vec<u8> = Vec::with_capacity(len);
        match self.key.aead().seal_uninit(
            &header.iv(),
            &header.encode(),
            src,
            ct.spare_capacity_mut(),
        ) {
            Ok(tag) => {
                // SAFETY: seal_uninit succeeded, so it wrote all `len` bytes of the spare
                // capacity, which is at least that long.
                unsafe { ct.set_len(len) };
                Ok(Message::new(header, tag, ct).expect("payload length equals header length"))
            }
            Err(error) => Err(Refused { error, token: self }),
        }
    }

    fn nop(self) -> std::result::Result<Message, Refused<Token>> {
        let (sealed, _) = self.seal(Kind::Nop, Io::InPlace(&mut []), 0)?;
        Ok(Message::new(sealed.header, sealed.tag, Vec::new()).expect("empty payload, length 0"))
    }
}

fn map_refused<A, B>(r: Refused<A>, wrap: impl FnOnce(A) -> B) -> Refused<B> {
    Refused {
        error: r.error,
        token: wrap(r.token),
    }
}

impl Reservation {
    pub fn position(&self) -> Position {
        self.0.position
    }
    pub fn charge(&self) -> u64 {
        self.0.charge
    }
    /// The longest payload a plain data message at this reservation can carry.
    pub fn max_len(&self) -> u64 {
        (self.0.charge - 1).saturating_mul(16)
    }

    /// Seals `src` into `dst` (same length) as the data message of this position.
    pub fn seal_into(self, src: &[u8], dst: &mut [u8]) -> Outcome<Sealed, Reservation> {
        if let Err(error) = crate::error::check_same_len(dst.len(), src.len()) {
            return Err(Refused { error, token: self });
        }
        self.0
            .seal(Kind::Data, Io::Copy(src, dst), 0)
            .map(|(s, _)| s)
            .map_err(|r| map_refused(r, Reservation))
    }

    /// Seals `buf` in place as the data message of this position.
    pub fn seal_in_place(self, buf: &mut [u8]) -> Outcome<Sealed, Reservation> {
        self.0
            .seal(Kind::Data, Io::InPlace(buf), 0)
            .map(|(s, _)| s)
            .map_err(|r| map_refused(r, Reservation))
    }

    /// Seals `src` into a new buffer (no zero-fill of the output first).
    pub fn seal_to_vec(self, src: &[u8]) -> Outcome<Message, Reservation> {
        self.0
            .seal_to_vec(Kind::Data, src)
            .map_err(|r| map_refused(r, Reservation))
    }

    /// Seals `buf` in place as this position's data message, ahead of knowing whether it will
    /// be delivered. Keeps a [`Fallback`] so the position can still be consumed by a
    /// substitute or a NOP if the chunk is not delivered. Needs the reservation's charge to
    /// cover this chunk and one more unit at least (a NOP).
    pub fn speculate_in_place(self, buf: &mut [u8]) -> Outcome<(Sealed, Fallback), Reservation> {
        self.0
            .seal(Kind::Data, Io::InPlace(buf), 1)
            .map(|(s, t)| (s, Fallback(t)))
            .map_err(|r| map_refused(r, Reservation))
    }

    /// As `speculate_in_place`, reading `src` and writing the ciphertext to `dst` (same
    /// length): for sources whose writes are tracked, which need no snapshot copy.
    pub fn speculate_into(
        self,
        src: &[u8],
        dst: &mut [u8],
    ) -> Outcome<(Sealed, Fallback), Reservation> {
        if let Err(error) = crate::error::check_same_len(dst.len(), src.len()) {
            return Err(Refused { error, token: self });
        }
        self.0
            .seal(Kind::Data, Io::Copy(src, dst), 1)
            .map(|(s, t)| (s, Fallback(t)))
            .map_err(|r| map_refused(r, Reservation))
    }

    /// Burns this position with an empty, authenticated NOP message. It carries the
    /// reservation's charge, so both ends account the key's usage identically.
    pub fn into_nop(self) -> Outcome<Message, Reservation> {
        self.0.nop().map_err(|r| map_refused(r, Reservation))
    }
}

impl Fallback {
    pub fn position(&self) -> Position {
        self.0.position
    }

    /// The longest substitute this position can still carry.
    pub fn max_substitute_len(&self) -> u64 {
        self.0.budget.saturating_sub(1).saturating_mul(16)
    }

    /// Seals `src` into `dst` (same length) as the substitute data of this position.
    pub fn substitute_into(self, src: &[u8], dst: &mut [u8]) -> Outcome<Sealed, Fallback> {
        if let Err(error) = crate::error::check_same_len(dst.len(), src.len()) {
            return Err(Refused { error, token: self });
        }
        self.0
            .seal(Kind::Substitute, Io::Copy(src, dst), 0)
            .map(|(s, _)| s)
            .map_err(|r| map_refused(r, Fallback))
    }

    /// Seals `buf` in place as the substitute data of this position.
    pub fn substitute_in_place(self, buf: &mut [u8]) -> Outcome<Sealed, Fallback> {
        self.0
            .seal(Kind::Substitute, Io::InPlace(buf), 0)
            .map(|(s, _)| s)
            .map_err(|r| map_refused(r, Fallback))
    }

    /// Seals `src` into a new buffer as the substitute data of this position.
    pub fn substitute_to_vec(self, src: &[u8]) -> Outcome<Message, Fallback> {
        self.0
            .seal_to_vec(Kind::Substitute, src)
            .map_err(|r| map_refused(r, Fallback))
    }

    /// Burns this position with a NOP.
    pub fn into_nop(self) -> Outcome<Message, Fallback> {
        self.0.nop().map_err(|r| map_refused(r, Fallback))
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
    fn oversized_payload_hands_the_reservation_back() {
        let s = seq(1_000);
        let r = s.reserve(2).unwrap(); // room for 16 bytes
        let src = [0u8; 17];
        let mut dst = [0u8; 17];
        let back = r.seal_into(&src, &mut dst).unwrap_err();
        assert!(matches!(back.error, Error::InvalidLength(_)));
        let pos = back.token.position();
        let sealed = back.token.seal_into(&src[..16], &mut dst[..16]).unwrap();
        assert_eq!(sealed.header.position, pos);
    }
}
