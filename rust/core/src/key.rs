//! Key material: the session key both ends share, the per-channel keys derived from it, and
//! the epoch keys that rotation derives from those. Every copy of key bytes is zeroized on drop.

use crate::crypto::{fill_random, hkdf_sha256_expand, sha256, AeadKey, KEY_LEN};
use crate::error::{Error, Result};
use crate::header::Direction;
use std::fmt;
use zeroize::Zeroizing;

const CHANNEL_LABEL: &[u8] = b"pipellm/v1 channel key";
const ROTATION_LABEL: &[u8] = b"pipellm/v1 key rotation";

/// The 32-byte secret shared by the CPU and the device. Channel keys are derived from it, so
/// one session key serves every channel and direction without two of them sharing a key.
#[derive(Clone)]
pub struct SessionKey(Zeroizing<[u8; KEY_LEN]>);

impl SessionKey {
    /// A fresh key from the system CSPRNG (through AWS-LC).
    pub fn generate() -> Result<Self> {
        let mut k = Zeroizing::new([0u8; KEY_LEN]);
        fill_random(k.as_mut())?;
        Ok(Self(k))
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let arr: [u8; KEY_LEN] = bytes.try_into().map_err(|_| {
            Error::InvalidLength(format!("key must be {KEY_LEN} bytes, got {}", bytes.len()))
        })?;
        Ok(Self(Zeroizing::new(arr)))
    }

    /// The raw secret, for handing it to the other end. Treat the result as a secret.
    pub fn expose_secret(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// The epoch-0 key of one direction of one channel:
    /// HKDF-SHA256-Expand(session key, label ‖ channel (BE32) ‖ direction).
    pub fn channel_key(&self, channel: u32, direction: Direction) -> Result<EpochKey> {
        let mut info = Vec::with_capacity(CHANNEL_LABEL.len() + 5);
        info.extend_from_slice(CHANNEL_LABEL);
        info.extend_from_slice(&channel.to_be_bytes());
        info.push(direction as u8);
        let k = hkdf_sha256_expand(&self.0, &info)?;
        EpochKey::new(0, &k)
    }
}

impl fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SessionKey(<secret>)")
    }
}

/// The key one channel direction uses during one epoch.
pub struct EpochKey {
    epoch: u32,
    raw: Zeroizing<[u8; KEY_LEN]>,
    aead: AeadKey,
}

impl EpochKey {
    fn new(epoch: u32, raw: &[u8; KEY_LEN]) -> Result<Self> {
        Ok(Self {
            epoch,
            raw: Zeroizing::new(*raw),
            aead: AeadKey::new(raw)?,
        })
    }

    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    pub fn aead(&self) -> &AeadKey {
        &self.aead
    }

    /// The next epoch's key: HKDF-SHA256-Expand(SHA256(this key), label ‖ next epoch (BE32)).
    /// Both ends compute it independently when the usage limit is reached.
    pub fn next(&self) -> Result<EpochKey> {
        let next_epoch = self
            .epoch
            .checked_add(1)
            .ok_or(Error::IvExhausted("all key epochs are used"))?;
        let prk = sha256(self.raw.as_ref());
        let mut info = Vec::with_capacity(ROTATION_LABEL.len() + 4);
        info.extend_from_slice(ROTATION_LABEL);
        info.extend_from_slice(&next_epoch.to_be_bytes());
        let k = hkdf_sha256_expand(&prk, &info)?;
        EpochKey::new(next_epoch, &k)
    }
}

impl fmt::Debug for EpochKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EpochKey(epoch={}, <secret>)", self.epoch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drops `value` in place inside memory the test owns, then returns that memory's bytes:
    /// whatever the value's destructor left behind.
    fn bytes_after_drop<T>(value: T) -> Vec<u8> {
        let mut slot = std::mem::MaybeUninit::new(value);
        // SAFETY: `slot` holds an initialised T, dropped exactly once here and never used as
        // a T again; its storage stays ours (MaybeUninit does not drop), so reading it back
        // as bytes is reading memory we own.
        unsafe {
            std::ptr::drop_in_place(slot.as_mut_ptr());
            std::slice::from_raw_parts(slot.as_ptr().cast::<u8>(), std::mem::size_of::<T>())
                .to_vec()
        }
    }

    #[test]
    fn session_key_is_zeroized_on_drop() {
        let raw = [0xA7u8; KEY_LEN];
        let k = SessionKey::from_bytes(&raw).unwrap();
        assert_eq!(k.expose_secret(), &raw);
        let left = bytes_after_drop(k);
        assert!(
            left.iter().all(|&b| b == 0),
            "key bytes survived the drop: {left:?}"
        );
    }

    #[test]
    fn wrong_length_is_typed_error() {
        assert!(matches!(
            SessionKey::from_bytes(&[0u8; 31]),
            Err(Error::InvalidLength(_))
        ));
        assert!(SessionKey::from_bytes(&[0u8; 32]).is_ok());
    }

    #[test]
    fn channels_directions_and_epochs_get_distinct_keys() {
        let s = SessionKey::from_bytes(&[1u8; 32]).unwrap();
        let a = s.channel_key(0, Direction::HostToDevice).unwrap();
        let b = s.channel_key(0, Direction::DeviceToHost).unwrap();
        let c = s.channel_key(1, Direction::HostToDevice).unwrap();
        let a1 = a.next().unwrap();
        let raws = [&a.raw, &b.raw, &c.raw, &a1.raw];
        for i in 0..raws.len() {
            for j in i + 1..raws.len() {
                assert_ne!(raws[i].as_ref(), raws[j].as_ref());
            }
        }
        assert_eq!(a1.epoch(), 1);
        // Deterministic on both ends.
        let again = s
            .channel_key(0, Direction::HostToDevice)
            .unwrap()
            .next()
            .unwrap();
        assert_eq!(again.raw.as_ref(), a1.raw.as_ref());
    }

    #[test]
    fn debug_never_prints_key_bytes() {
        let s = SessionKey::from_bytes(&[0xABu8; 32]).unwrap();
        let text = format!(
            "{s:?} {:?}",
            s.channel_key(0, Direction::HostToDevice).unwrap()
        );
        assert!(!text.to_lowercase().contains("ab, ") && !text.contains("171"));
        assert!(text.contains("<secret>"));
    }
}
