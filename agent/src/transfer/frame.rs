//! Length-prefixed MessagePack frames on QUIC streams.
//!
//! A frame is a `u32` big-endian length followed by that many bytes of
//! MessagePack ([`flotilla_protocol::encode`], named fields). A stream is a
//! sequence of frames; finishing the stream between frames is the clean end.
//!
//! Reading is the part a hostile peer controls, so it checks the length
//! against the caller's limit before reading the body and never allocates
//! what the prefix claims: the buffer grows with the bytes that actually
//! arrive, which flow control already bounds.

use flotilla_protocol::{decode, encode};
use serde::{de::DeserializeOwned, Serialize};

use super::TransferError;

/// Size of the length prefix.
const PREFIX: usize = 4;
/// Buffer reserved up front for a frame body; larger bodies grow the buffer
/// as their bytes arrive.
const INITIAL_CAPACITY: usize = 64 * 1024;

/// Encodes `value` and writes it as one frame. Does not finish the stream.
pub async fn write_frame<T: Serialize + ?Sized>(
    send: &mut quinn::SendStream,
    value: &T,
) -> Result<(), TransferError> {
    let body = encode(value).map_err(TransferError::Encode)?;
    let prefix = length_prefix(body.len())?;
    // Two writes, one copy fewer: quinn packs buffered stream data into
    // packets itself, so the short prefix does not cost a packet of its own.
    send.write_all(&prefix).await?;
    send.write_all(&body).await?;
    Ok(())
}

/// Reads one frame and decodes it as `T`.
///
/// `Ok(None)` when the peer finished the stream cleanly before another frame
/// began. Errors when the length is over `limit` (before reading or
/// allocating the body), when the stream ends inside a frame, or when the
/// body is not a valid `T`.
pub async fn read_frame<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    limit: usize,
) -> Result<Option<T>, TransferError> {
    match read_frame_bytes(recv, limit).await? {
        Some(body) => decode(&body, limit)
            .map(Some)
            .map_err(TransferError::Malformed),
        None => Ok(None),
    }
}

/// Reads one frame's raw body, for callers that decode it themselves (or
/// store it as is). Same end-of-stream and limit rules as [`read_frame`].
pub async fn read_frame_bytes(
    recv: &mut quinn::RecvStream,
    limit: usize,
) -> Result<Option<Vec<u8>>, TransferError> {
    let mut prefix = [0u8; PREFIX];
    match recv.read_exact(&mut prefix).await {
        Ok(()) => {}
        // Finished exactly between frames: the clean end.
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(got)) => {
            return Err(TransferError::Truncated {
                got: got as u64,
                expected: PREFIX as u64,
            })
        }
        Err(quinn::ReadExactError::ReadError(e)) => return Err(e.into()),
    }
    let len = body_len(prefix, limit)?;

    let mut body = Vec::with_capacity(len.min(INITIAL_CAPACITY));
    while body.len() < len {
        // Ordered chunks of at most what the frame still lacks, so bytes of
        // the next frame stay in the stream.
        match recv.read_chunk(len - body.len(), true).await? {
            Some(chunk) => body.extend_from_slice(&chunk.bytes),
            None => {
                return Err(TransferError::Truncated {
                    got: (PREFIX + body.len()) as u64,
                    expected: (PREFIX + len) as u64,
                })
            }
        }
    }
    Ok(Some(body))
}

/// The prefix for a body of `len` bytes.
fn length_prefix(len: usize) -> Result<[u8; PREFIX], TransferError> {
    u32::try_from(len)
        .map(u32::to_be_bytes)
        .map_err(|_| TransferError::EncodedTooLarge { len })
}

/// The body length a prefix announces, if it is within `limit`.
fn body_len(prefix: [u8; PREFIX], limit: usize) -> Result<usize, TransferError> {
    let len = u32::from_be_bytes(prefix);
    match usize::try_from(len) {
        Ok(len) if len <= limit => Ok(len),
        _ => Err(TransferError::FrameTooLarge {
            len: u64::from(len),
            limit,
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::transfer::testing::{bundle_for, endpoint, handshake, within, TestCa};

    #[test]
    fn prefixes_are_big_endian_and_checked_against_the_limit() {
        assert_eq!(length_prefix(0x0102_0304).expect("fits"), [1, 2, 3, 4]);
        assert_eq!(
            body_len([1, 2, 3, 4], 0x0102_0304).expect("at limit"),
            0x0102_0304
        );
        assert!(matches!(
            body_len([0xff; 4], 1024),
            Err(TransferError::FrameTooLarge {
                len: 0xffff_ffff,
                limit: 1024
            })
        ));
        assert!(matches!(
            body_len([0, 0, 4, 1], 1024),
            Err(TransferError::FrameTooLarge { .. })
        ));
        assert_eq!(body_len([0; 4], 0).expect("empty"), 0);
    }

    #[cfg(target_pointer_width = "64")]
    #[test]
    fn bodies_over_four_gib_cannot_be_framed() {
        assert!(matches!(
            length_prefix(1 << 32),
            Err(TransferError::EncodedTooLarge { .. })
        ));
    }

    /// A connected pair of streams: what the client writes, the server reads.
    /// The connections are returned so they stay open for the test.
    async fn streams() -> (
        quinn::SendStream,
        quinn::RecvStream,
        [quinn::Connection; 2],
        [crate::transfer::TransferEndpoint; 2],
    ) {
        let ca = TestCa::new("fleet");
        let (server, server_addr) = endpoint(&bundle_for(&ca, "nas"));
        let (client, _) = endpoint(&bundle_for(&ca, "laptop"));
        let (client_conn, server_conn) = handshake(&client, &server, server_addr, "nas").await;
        let (client_conn, server_conn) =
            (client_conn.expect("client"), server_conn.expect("server"));
        let mut send = client_conn.open_uni().await.expect("open stream");
        // A stream reaches the peer with its first bytes; a zero-length
        // write would not announce it, so tests that need the stream before
        // writing a frame write raw bytes first.
        send.write_all(&[0, 0, 0, 0]).await.expect("empty frame");
        let mut recv = within("accept stream", server_conn.accept_uni())
            .await
            .expect("accept stream");
        let empty = within("empty frame", read_frame_bytes(&mut recv, 0))
            .await
            .expect("read");
        assert_eq!(empty, Some(Vec::new()));
        (send, recv, [client_conn, server_conn], [client, server])
    }

    #[tokio::test]
    async fn oversized_length_is_refused_before_the_body_arrives() {
        let (mut send, mut recv, _conns, _endpoints) = streams().await;
        // Claim 4 GiB and send nothing more. A reader that trusted the
        // prefix would allocate 4 GiB or wait for the body forever (the
        // stream stays open); this one must fail at once.
        send.write_all(&u32::MAX.to_be_bytes())
            .await
            .expect("write");
        let started = std::time::Instant::now();
        let err = within("oversized frame", read_frame::<u32>(&mut recv, 1 << 20))
            .await
            .expect_err("too large");
        assert!(
            matches!(
                err,
                TransferError::FrameTooLarge {
                    len: 0xffff_ffff,
                    limit: 0x10_0000
                }
            ),
            "{err:?}"
        );
        assert!(!err.is_retryable());
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn frames_round_trip_then_end_cleanly() {
        let (mut send, mut recv, _conns, _endpoints) = streams().await;
        let big = vec![7u8; 3 * INITIAL_CAPACITY];
        write_frame(&mut send, &("hello", 42u64))
            .await
            .expect("write");
        write_frame(&mut send, serde_bytes::Bytes::new(&big))
            .await
            .expect("write");
        send.finish().expect("finish");
        let first: Option<(String, u64)> = read_frame(&mut recv, 1024).await.expect("first");
        assert_eq!(first, Some(("hello".to_owned(), 42)));
        let second: Option<serde_bytes::ByteBuf> =
            read_frame(&mut recv, big.len() + 16).await.expect("second");
        assert_eq!(second.map(|b| b.into_vec()), Some(big));
        let end = read_frame::<u32>(&mut recv, 1024).await.expect("end");
        assert_eq!(end, None);
    }

    #[tokio::test]
    async fn a_stream_ending_mid_frame_is_truncated() {
        let (mut send, mut recv, _conns, _endpoints) = streams().await;
        send.write_all(&10u32.to_be_bytes()).await.expect("prefix");
        send.write_all(b"abc").await.expect("part of the body");
        send.finish().expect("finish");
        let err = within("truncated frame", read_frame_bytes(&mut recv, 1024))
            .await
            .expect_err("truncated");
        assert!(
            matches!(
                err,
                TransferError::Truncated {
                    got: 7,
                    expected: 14
                }
            ),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn a_stream_ending_mid_prefix_is_truncated() {
        let (mut send, mut recv, _conns, _endpoints) = streams().await;
        send.write_all(&[0, 0]).await.expect("half a prefix");
        send.finish().expect("finish");
        let err = within("truncated prefix", read_frame_bytes(&mut recv, 1024))
            .await
            .expect_err("truncated");
        assert!(
            matches!(
                err,
                TransferError::Truncated {
                    got: 2,
                    expected: 4
                }
            ),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn undecodable_frames_are_malformed() {
        let (mut send, mut recv, _conns, _endpoints) = streams().await;
        // 0xc1 is the one byte MessagePack never uses.
        send.write_all(&[0, 0, 0, 1, 0xc1]).await.expect("write");
        send.finish().expect("finish");
        let err = within("malformed frame", read_frame::<u32>(&mut recv, 1024))
            .await
            .expect_err("malformed");
        assert!(matches!(err, TransferError::Malformed(_)), "{err:?}");
        assert!(!err.is_retryable());
    }
}
