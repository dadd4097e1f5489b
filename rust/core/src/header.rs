//! Message headers: what binds a chunk to its channel, direction, place in the stream and
//! length (the AAD), the IV derived from them, and the wire encoding.

use crate::error::{Error, Result};

/// Which way a channel carries data. Each direction of a channel has its own key and counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Direction {
    /// CPU encrypts, device decrypts.
    HostToDevice = 0,
    /// Device encrypts, CPU decrypts.
    DeviceToHost = 1,
}

impl Direction {
    pub fn from_u8(v: u8) -> Result<Self> {
        match v {
            0 => Ok(Self::HostToDevice),
            1 => Ok(Self::DeviceToHost),
            _ => Err(Error::InvalidArgument(format!("unknown direction {v}"))),
        }
    }
}

/// What a message carries. Each kind encrypts under its own IV variant (see [`iv_for`]), so
/// one position of the stream can be encrypted once per kind without any (key, IV) pair ever
/// being used twice: a speculatively pre-encrypted chunk that is not delivered can be replaced
/// by a substitute or a NOP at the same position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    /// Data sealed for this position in the first place (directly or ahead of time).
    Data = 1,
    /// Empty payload; only consumes its position (skips positions whose chunk is not sent).
    Nop = 2,
    /// Data that takes the place of a pre-encrypted chunk that was not delivered (the
    /// pipeline's on-demand encryption after a misprediction).
    Substitute = 3,
}

impl Kind {
    /// The 2-bit IV variant of this kind.
    pub fn iv_variant(self) -> u32 {
        match self {
            Kind::Data => 0,
            Kind::Substitute => 1,
            Kind::Nop => 2,
        }
    }

    pub fn carries_data(self) -> bool {
        self != Kind::Nop
    }
}

/// Highest channel id: the IV's 32-bit field is `channel << 3 | variant << 1 | direction`.
pub const MAX_CHANNEL: u32 = (1 << 29) - 1;

/// GCM encrypts at most 2^32 - 2 blocks under one IV (NIST SP 800-38D).
pub const MAX_MESSAGE_BYTES: u64 = ((1u64 << 32) - 2) * 16;

/// Usage units a data message of `len` bytes costs its key, as Hopper counts them: one per
/// 16-byte block plus one per message.
pub fn data_charge(len: u64) -> u64 {
    len.div_ceil(16) + 1
}

pub use crate::position::Position;

/// Everything the tag authenticates besides the ciphertext.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Header {
    pub kind: Kind,
    pub direction: Direction,
    pub channel: u32,
    pub position: Position,
    /// Payload length in bytes (0 for a NOP).
    pub length: u64,
    /// Usage units charged to the key for this message's IV. At least `data_charge(length)`
    /// for data; a NOP carries the charge of the reservation it burns, so sender and receiver
    /// account key usage identically whatever was finally sent.
    pub charge: u64,
    /// Messages in the previous epoch, on the first message of an epoch after the first;
    /// zero otherwise (see `schedule::Placed::handover`).
    pub handover: u64,
}

const MAGIC: [u8; 4] = *b"PLLM";
const VERSION: u8 = 1;
/// Size of the encoded header, which is also the AAD.
pub const HEADER_LEN: usize = 48;
pub const TAG_LEN: usize = 16;
pub const IV_LEN: usize = 12;

impl Header {
    /// The 96-bit IV of this message (see [`iv_for`]).
    pub fn iv(&self) -> [u8; IV_LEN] {
        iv_for(
            self.channel,
            self.direction,
            self.kind,
            self.position.counter,
        )
    }

    /// The AAD and the first bytes of the wire encoding.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..4].copy_from_slice(&MAGIC);
        out[4] = VERSION;
        out[5] = self.kind as u8;
        out[6] = self.direction as u8;
        out[7] = 0;
        out[8..12].copy_from_slice(&self.channel.to_be_bytes());
        out[12..16].copy_from_slice(&self.position.epoch.to_be_bytes());
        out[16..24].copy_from_slice(&self.position.counter.to_be_bytes());
        out[24..32].copy_from_slice(&self.length.to_be_bytes());
        out[32..40].copy_from_slice(&self.charge.to_be_bytes());
        out[40..48].copy_from_slice(&self.handover.to_be_bytes());
        out
    }

    /// Parses a header; rejects anything malformed or internally inconsistent. Success says
    /// nothing about authenticity: only the receiver's tag check does.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        if bytes.len() < HEADER_LEN {
            return Err(Error::InvalidLength(format!(
                "message header needs {HEADER_LEN} bytes, got {}",
                bytes.len()
            )));
        }
        if bytes[0..4] != MAGIC || bytes[4] != VERSION || bytes[7] != 0 {
            return Err(Error::InvalidArgument(
                "not a pipellm v1 message (bad magic, version or reserved byte)".into(),
            ));
        }
        let kind = match bytes[5] {
            1 => Kind::Data,
            2 => Kind::Nop,
            3 => Kind::Substitute,
            k => return Err(Error::InvalidArgument(format!("unknown message kind {k}"))),
        };
        let be64 = |r: std::ops::Range<usize>| u64::from_be_bytes(bytes[r].try_into().unwrap());
        let be32 = |r: std::ops::Range<usize>| u32::from_be_bytes(bytes[r].try_into().unwrap());
        let header = Header {
            kind,
            direction: Direction::from_u8(bytes[6])?,
            channel: be32(8..12),
            position: Position {
                epoch: be32(12..16),
                counter: be64(16..24),
            },
            length: be64(24..32),
            charge: be64(32..40),
            handover: be64(40..48),
        };
        header.check_consistent()?;
        Ok(header)
    }

    /// Structural rules every honest header obeys (the receiver checks them before any crypto).
    pub fn check_consistent(&self) -> Result<()> {
        if self.channel > MAX_CHANNEL {
            return Err(Error::InvalidArgument(format!(
                "channel {} exceeds the maximum {MAX_CHANNEL}",
                self.channel
            )));
        }
        if self.length > MAX_MESSAGE_BYTES {
            return Err(Error::InvalidLength(format!(
                "message length {} exceeds the GCM maximum {MAX_MESSAGE_BYTES}",
                self.length
            )));
        }
        if self.handover != 0 && (self.position.counter != 0 || self.position.epoch == 0) {
            return Err(Error::InvalidArgument(
                "only the first message of a later epoch carries a handover count".into(),
            ));
        }
        match self.kind {
            Kind::Nop if self.length != 0 => Err(Error::InvalidLength(
                "a NOP message must have an empty payload".into(),
            )),
            Kind::Nop if self.charge == 0 => Err(Error::InvalidArgument(
                "a NOP message must charge at least one unit".into(),
            )),
            Kind::Data | Kind::Substitute if self.charge < data_charge(self.length) => {
                Err(Error::InvalidArgument(format!(
                    "message charges {} units, its length needs at least {}",
                    self.charge,
                    data_charge(self.length)
                )))
            }
            _ => Ok(()),
        }
    }
}

/// The IV of a `kind` message at `counter` on (`channel`, `direction`): a 32-bit field
/// `channel << 3 | variant << 1 | direction` (big-endian) ‖ counter (64 bits, big-endian).
/// The epoch is not in the IV: each epoch has its own key.
pub fn iv_for(channel: u32, direction: Direction, kind: Kind, counter: u64) -> [u8; IV_LEN] {
    debug_assert!(channel <= MAX_CHANNEL);
    let field = (channel << 3) | (kind.iv_variant() << 1) | direction as u32;
    let mut iv = [0u8; IV_LEN];
    iv[0..4].copy_from_slice(&field.to_be_bytes());
    iv[4..12].copy_from_slice(&counter.to_be_bytes());
    iv
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            kind: Kind::Data,
            direction: Direction::DeviceToHost,
            channel: 7,
            position: Position {
                epoch: 3,
                counter: 0x0102_0304_0506_0708,
            },
            length: 4096,
            charge: data_charge(4096),
            handover: 0,
        }
    }

    #[test]
    fn encode_decode_roundtrip() {
        let h = sample();
        assert_eq!(Header::decode(&h.encode()).unwrap(), h);
    }

    #[test]
    fn iv_layout_is_field_then_big_endian_counter() {
        let iv = sample().iv();
        assert_eq!(&iv[0..4], &[0, 0, 0, 57]); // 7 << 3 | 0 << 1 | 1
        assert_eq!(&iv[4..12], &[1, 2, 3, 4, 5, 6, 7, 8]);
        let mut all = std::collections::HashSet::new();
        for ch in [0, 1, MAX_CHANNEL] {
            for d in [Direction::HostToDevice, Direction::DeviceToHost] {
                for k in [Kind::Data, Kind::Substitute, Kind::Nop] {
                    assert!(all.insert(iv_for(ch, d, k, 1)), "IV collision");
                }
            }
        }
    }

    #[test]
    fn charge_counts_blocks_and_message() {
        assert_eq!(data_charge(0), 1);
        assert_eq!(data_charge(1), 2);
        assert_eq!(data_charge(16), 2);
        assert_eq!(data_charge(17), 3);
    }

    #[test]
    fn decode_rejects_inconsistent_headers() {
        let mut bad = sample();
        bad.charge = 1;
        assert!(Header::decode(&bad.encode()).is_err());
        let mut nop = sample();
        nop.kind = Kind::Nop;
        assert!(Header::decode(&nop.encode()).is_err()); // NOP with a payload length
        let mut bytes = sample().encode();
        bytes[0] ^= 1;
        assert!(Header::decode(&bytes).is_err());
        assert!(Header::decode(&bytes[..10]).is_err());
        let mut handover_mid_epoch = sample();
        handover_mid_epoch.handover = 5;
        assert!(Header::decode(&handover_mid_epoch.encode()).is_err());
    }
}
