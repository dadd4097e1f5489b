//! The sending end of one channel direction (the CPU for H2D; the device, modelled, for D2H).

use crate::error::{Error, Result};
use crate::header::{data_charge, Direction, MAX_MESSAGE_BYTES};
use crate::key::SessionKey;
use crate::message::Message;
use crate::schedule::{Cursor, KeyPolicy};
use crate::sequencer::{Reservation, Sequencer};

/// Seals messages in stream order. Shareable between threads (`&self` everywhere): positions
/// come from one `Sequencer`, so concurrent `seal` calls get distinct, gap-free counters.
pub struct Sender {
    seq: Sequencer,
}

impl Sender {
    pub fn new(
        key: &SessionKey,
        channel: u32,
        direction: Direction,
        policy: KeyPolicy,
    ) -> Result<Self> {
        crate::sequencer::check_channel(channel)?;
        let k = key.channel_key(channel, direction)?;
        Ok(Self {
            seq: Sequencer::new(k, channel, direction, policy)?,
        })
    }

    pub fn sequencer(&self) -> &Sequencer {
        &self.seq
    }
    pub fn channel(&self) -> u32 {
        self.seq.channel()
    }
    pub fn direction(&self) -> Direction {
        self.seq.direction()
    }
    pub fn cursor(&self) -> Cursor {
        self.seq.cursor()
    }

    /// Reserves the next position for a message charging `charge` units (see `Reservation`).
    pub fn reserve(&self, charge: u64) -> Result<Reservation> {
        self.seq.reserve(charge)
    }

    /// Reserves the next position for a data message of exactly `len` bytes.
    pub fn reserve_for(&self, len: usize) -> Result<Reservation> {
        self.reserve(checked_charge(len)?)
    }

    /// Seals `src` as the next message, into a new buffer.
    pub fn seal(&self, src: &[u8]) -> Result<Message> {
        self.reserve_for(src.len())?
            .seal_to_vec(src)
            .map_err(|u| u.error)
    }

    /// Burns the next position with a NOP.
    pub fn seal_nop(&self) -> Result<Message> {
        self.reserve(1)?.into_nop().map_err(|u| u.error)
    }
}

/// The charge of a `len`-byte data message, or a typed error if GCM cannot carry it.
pub fn checked_charge(len: usize) -> Result<u64> {
    let len = len as u64;
    if len > MAX_MESSAGE_BYTES {
        return Err(Error::InvalidLength(format!(
            "a message holds at most {MAX_MESSAGE_BYTES} bytes, got {len}"
        )));
    }
    Ok(data_charge(len))
}
