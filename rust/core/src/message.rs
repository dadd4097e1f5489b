//! A sealed message: header (authenticated, not encrypted), tag and ciphertext, and its wire
//! encoding `header (40 bytes) ‖ tag (16 bytes) ‖ ciphertext`.

use crate::error::{Error, Result};
use crate::header::{Header, Kind, Position, HEADER_LEN, IV_LEN, TAG_LEN};

/// A message whose payload is stored in `P` (an owned `Vec<u8>` by default; the pipeline uses
/// staging-slot leases). The header's length always equals the payload's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message<P = Vec<u8>> {
    header: Header,
    tag: [u8; TAG_LEN],
    payload: P,
}

impl<P: AsRef<[u8]>> Message<P> {
    pub fn new(header: Header, tag: [u8; TAG_LEN], payload: P) -> Result<Self> {
        let len = payload.as_ref().len() as u64;
        if header.length != len {
            return Err(Error::InvalidLength(format!(
                "header says {} bytes, payload has {len}",
                header.length
            )));
        }
        Ok(Self {
            header,
            tag,
            payload,
        })
    }

    pub fn header(&self) -> &Header {
        &self.header
    }
    pub fn tag(&self) -> &[u8; TAG_LEN] {
        &self.tag
    }
    pub fn ciphertext(&self) -> &[u8] {
        self.payload.as_ref()
    }
    pub fn payload(&self) -> &P {
        &self.payload
    }
    pub fn into_payload(self) -> P {
        self.payload
    }
    pub fn len(&self) -> usize {
        self.payload.as_ref().len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn is_nop(&self) -> bool {
        self.header.kind == Kind::Nop
    }
    pub fn position(&self) -> Position {
        self.header.position
    }
    pub fn iv(&self) -> [u8; IV_LEN] {
        self.header.iv()
    }

    /// The same message with its payload moved into another container.
    pub fn map_payload<Q: AsRef<[u8]>>(self, f: impl FnOnce(P) -> Q) -> Message<Q> {
        let (header, tag) = (self.header, self.tag);
        let payload = f(self.payload);
        debug_assert_eq!(payload.as_ref().len() as u64, header.length);
        Message {
            header,
            tag,
            payload,
        }
    }

    /// `header ‖ tag ‖ ciphertext`.
    pub fn to_wire(&self) -> Vec<u8> {
        let ct = self.payload.as_ref();
        let mut out = Vec::with_capacity(HEADER_LEN + TAG_LEN + ct.len());
        out.extend_from_slice(&self.header.encode());
        out.extend_from_slice(&self.tag);
        out.extend_from_slice(ct);
        out
    }
}

impl Message<Vec<u8>> {
    /// Parses the wire encoding. Malformed input is a typed error; parsing never authenticates.
    pub fn from_wire(bytes: &[u8]) -> Result<Self> {
        let header = Header::decode(bytes)?;
        let rest = &bytes[HEADER_LEN..];
        if rest.len() < TAG_LEN {
            return Err(Error::InvalidLength(
                "message is shorter than header and tag".into(),
            ));
        }
        let tag: [u8; TAG_LEN] = rest[..TAG_LEN].try_into().expect("length checked");
        Message::new(header, tag, rest[TAG_LEN..].to_vec())
    }
}
