//! MessagePack encoding with named fields, and size-checked decoding.

use serde::{de::DeserializeOwned, Serialize};

/// A message could not be encoded (a bug, not a peer's fault).
#[derive(Debug, thiserror::Error)]
#[error("cannot encode message: {0}")]
pub struct EncodeError(#[from] rmp_serde::encode::Error);

/// Bytes from a peer are not a valid message. Never retryable: the same bytes
/// fail the same way.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The payload is larger than the limit for its message type.
    #[error("message of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Size of the payload.
        len: usize,
        /// The limit it broke.
        limit: usize,
    },
    /// The payload is not MessagePack of the expected shape.
    #[error("malformed message: {0}")]
    Malformed(#[from] rmp_serde::decode::Error),
    /// The message carries a schema version this build does not understand.
    #[error("unsupported schema version {found} (this build understands up to {supported})")]
    UnsupportedVersion {
        /// Version in the message.
        found: u16,
        /// Newest version this build reads.
        supported: u16,
    },
    /// The message arrived on another subject than the one its content
    /// belongs on (a host speaking for another host).
    #[error("message on {subject} claims to belong on {claimed}")]
    WrongSubject {
        /// Where it arrived.
        subject: String,
        /// Where its content says it belongs.
        claimed: String,
    },
}

/// Encodes `value` as MessagePack with named fields (a map per struct), so that
/// any language can decode it and fields can be added without breaking readers.
pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, EncodeError> {
    Ok(rmp_serde::to_vec_named(value)?)
}

/// Decodes a message, refusing payloads over `limit` bytes before parsing.
///
/// Never panics, whatever the bytes; nested depth and declared lengths are bounded
/// by the payload size and by rmp-serde's depth limit.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], limit: usize) -> Result<T, DecodeError> {
    if bytes.len() > limit {
        return Err(DecodeError::TooLarge {
            len: bytes.len(),
            limit,
        });
    }
    Ok(rmp_serde::from_slice(bytes)?)
}

/// Checks a decoded schema version against the newest one this build reads.
pub(crate) fn check_version(found: u16, supported: u16) -> Result<(), DecodeError> {
    if found == 0 || found > supported {
        return Err(DecodeError::UnsupportedVersion { found, supported });
    }
    Ok(())
}
