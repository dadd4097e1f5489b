//! The receiving end: the CPU-side model of what the GPU copy engine checks (H2D), and the CPU
//! end of D2H. It derives every IV itself from its own cursor and accepts a message only if it
//! is the next one and its tag verifies; any rejection leaves its state unchanged.

use crate::error::{check_same_len, Error, OrderViolation, Result};
use crate::header::{Direction, Header, Position, TAG_LEN};
use crate::key::{EpochKey, SessionKey};
use crate::message::Message;
use crate::schedule::{Cursor, KeyPolicy, Placement};
use crate::sequencer::check_channel;

pub struct Receiver {
    channel: u32,
    direction: Direction,
    policy: KeyPolicy,
    cursor: Cursor,
    key: EpochKey,
}

/// What accepting a message would change; computed without changing anything.
struct Admission {
    cursor: Cursor,
    handover: u64,
    /// The next epoch's key when the message opens a new epoch.
    rotated_key: Option<EpochKey>,
}

impl Receiver {
    pub fn new(
        key: &SessionKey,
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
            cursor: Cursor::START,
            key: key.channel_key(channel, direction)?,
        })
    }

    pub fn channel(&self) -> u32 {
        self.channel
    }
    pub fn direction(&self) -> Direction {
        self.direction
    }
    /// Where the next accepted message must be.
    pub fn cursor(&self) -> Cursor {
        self.cursor
    }

    /// Order and structure checks; decides the key. Nothing is modified.
    fn admit(&self, h: &Header, payload_len: usize) -> Result<Admission> {
        h.check_consistent()?;
        if h.length != payload_len as u64 {
            return Err(Error::Authentication(
                "header length does not match the payload",
            ));
        }
        if h.channel != self.channel || h.direction != self.direction {
            return Err(Error::Authentication(
                "message is bound to another channel or direction",
            ));
        }
        let placed = self.cursor.place(h.charge, &self.policy)?;
        let expected = placed.position;
        if h.position != expected {
            return Err(Error::IvOrder {
                violation: if h.position > expected {
                    OrderViolation::Gap
                } else {
                    OrderViolation::Replay
                },
                expected,
                got: h.position,
            });
        }
        if h.handover != placed.handover {
            return Err(Error::IvOrder {
                violation: OrderViolation::EpochTruncated {
                    sent: h.handover,
                    received: placed.handover,
                },
                expected,
                got: h.position,
            });
        }
        let rotated_key = match placed.placement {
            Placement::Current => None,
            Placement::Rotated => Some(self.key.next()?),
        };
        Ok(Admission {
            cursor: placed.after,
            handover: placed.handover,
            rotated_key,
        })
    }

    fn commit(&mut self, a: Admission) {
        self.cursor = a.cursor;
        if let Some(k) = a.rotated_key {
            self.key = k; // the old epoch key is dropped, and zeroized, here
        }
    }

    /// Rebuilds the header the receiver expects at the admitted position: the IV and AAD come
    /// from the receiver's own state, never from the message.
    fn expected_header(&self, h: &Header, a: &Admission) -> Header {
        Header {
            kind: h.kind,
            direction: self.direction,
            channel: self.channel,
            position: Position {
                epoch: a.cursor.epoch,
                counter: a.cursor.next_counter - 1,
            },
            length: h.length,
            charge: h.charge,
            handover: a.handover,
        }
    }

    /// Verifies the next message, then decrypts it into `dst` (same length). `dst` is written
    /// only after the tag has verified, so it never holds unverified plaintext, whoever else
    /// can see it. Costs one extra GCM pass over the ciphertext (see `open_into_private`).
    pub fn open_into(
        &mut self,
        h: &Header,
        tag: &[u8; TAG_LEN],
        ct: &[u8],
        dst: &mut [u8],
    ) -> Result<()> {
        self.open_checked(h, tag, ct, dst, true)
    }

    /// Verifies and decrypts the next message into `dst` in one pass. For memory nobody else
    /// can read until this returns `Ok` (fresh buffers, a destination the caller hides behind
    /// a future); on failure `dst` is zeroed.
    pub fn open_into_private(
        &mut self,
        h: &Header,
        tag: &[u8; TAG_LEN],
        ct: &[u8],
        dst: &mut [u8],
    ) -> Result<()> {
        self.open_checked(h, tag, ct, dst, false)
    }

    fn open_checked(
        &mut self,
        h: &Header,
        tag: &[u8; TAG_LEN],
        ct: &[u8],
        dst: &mut [u8],
        verify_first: bool,
    ) -> Result<()> {
        check_same_len(dst.len(), ct.len())?;
        let a = self.admit(h, ct.len())?;
        let exp = self.expected_header(h, &a);
        let (iv, aad) = (exp.iv(), exp.encode());
        let aead = a.rotated_key.as_ref().unwrap_or(&self.key).aead();
        if verify_first {
            aead.verify(&iv, &aad, ct, tag)?;
        }
        aead.open_private(&iv, &aad, ct, tag, dst)?;
        self.commit(a);
        Ok(())
    }

    /// Verifies and decrypts the next message into a new buffer.
    pub fn open<P: AsRef<[u8]>>(&mut self, m: &Message<P>) -> Result<Vec<u8>> {
        let mut out = vec![0u8; m.len()];
        self.open_into_private(m.header(), m.tag(), m.ciphertext(), &mut out)?;
        Ok(out)
    }
}
