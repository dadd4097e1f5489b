//! What a transfer reads: a source's bytes, split into the chunks that become messages.

use crate::error::{Error, Result};
use std::sync::Arc;

/// Memory a transfer reads from. `bytes` must return the same memory (address and length)
/// for the whole life of the object: the address is the source's identity.
pub trait SourceBytes: Send + Sync {
    fn bytes(&self) -> &[u8];
}

impl SourceBytes for Vec<u8> {
    fn bytes(&self) -> &[u8] {
        self
    }
}

impl SourceBytes for Box<[u8]> {
    fn bytes(&self) -> &[u8] {
        self
    }
}

/// A host pool is a source through its view (what transfers read; its writes go through the
/// alias, announced to the write watches).
impl SourceBytes for crate::hostpool::HostPool {
    fn bytes(&self) -> &[u8] {
        self.view()
    }
}

pub type Source = Arc<dyn SourceBytes>;

/// Most chunks one request (or one `predict` call, all its transfers together) may split
/// into. Each chunk costs a few hundred bytes of bookkeeping whatever its size, so this
/// bounds that memory (tens of MiB) when `chunk_bytes` is small; with 4 MiB chunks it is
/// 256 GiB per call.
pub const MAX_TRANSFER_CHUNKS: usize = 1 << 16;

/// Which bytes a chunk covers: equal keys mean the same memory range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChunkKey {
    pub addr: usize,
    pub source_len: usize,
    pub offset: usize,
    pub len: usize,
}

/// One message's worth of a transfer.
#[derive(Clone)]
pub struct Chunk {
    pub source: Source,
    pub key: ChunkKey,
    /// Where the chunk lands within its transfer.
    pub transfer_offset: u64,
}

impl Chunk {
    pub fn bytes(&self) -> &[u8] {
        &self.source.bytes()[self.key.offset..self.key.offset + self.key.len]
    }
    pub fn len(&self) -> usize {
        self.key.len
    }
    pub fn is_empty(&self) -> bool {
        self.key.len == 0
    }
}

impl std::fmt::Debug for Chunk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Chunk({:?})", self.key)
    }
}

/// Splits `length` bytes of `source` from `offset` into chunks of at most `chunk_bytes`.
/// `length = None` means to the end of the source.
pub fn split(
    source: &Source,
    offset: usize,
    length: Option<usize>,
    chunk_bytes: usize,
) -> Result<Vec<Chunk>> {
    let bytes = source.bytes();
    let total = bytes.len();
    if offset > total {
        return Err(Error::InvalidArgument(format!(
            "offset {offset} is beyond the end of the source ({total} bytes)"
        )));
    }
    let length = length.unwrap_or(total - offset);
    if length > total - offset {
        return Err(Error::InvalidArgument(format!(
            "offset {offset} + length {length} is beyond the end of the source ({total} bytes)"
        )));
    }
    let addr = bytes.as_ptr() as usize;
    let count = length.div_ceil(chunk_bytes.max(1));
    if count > MAX_TRANSFER_CHUNKS {
        return Err(Error::InvalidArgument(format!(
            "length {length} splits into {count} chunks of chunk_bytes {chunk_bytes}, more than \
             the {MAX_TRANSFER_CHUNKS} one call may have: use larger chunks or split the transfer"
        )));
    }
    let mut out = Vec::new();
    out.try_reserve_exact(count)
        .map_err(|_| Error::OutOfMemory(format!("could not allocate {count} chunks")))?;
    let mut done = 0;
    while done < length {
        let len = chunk_bytes.min(length - done);
        out.push(Chunk {
            source: source.clone(),
            key: ChunkKey {
                addr,
                source_len: total,
                offset: offset + done,
                len,
            },
            transfer_offset: done as u64,
        });
        done += len;
    }
    Ok(out)
}
