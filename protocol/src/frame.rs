//! Frames of the QUIC data plane between agents (ALPN `flotilla/1`).
//!
//! Every stream carries length-prefixed MessagePack frames (`u32` big-endian
//! length, then the frame). The client (a source backing up, or a destination
//! restoring) opens a control stream and sends [`Request::Hello`] with the
//! signed task that authorises the session; the storage agent verifies the
//! task's signature, that it names this storage host, and that the client's
//! certificate names the task's host, before anything else.
//!
//! Backup: `Hello → Welcome`, then `Have → Missing` in batches on the control
//! stream; sealed blobs go as `Put` frames on further bidirectional streams
//! (several in parallel), each answered by one `Stored` when the client
//! finishes it; finally `Commit → Committed`. Restore and browsing: `Get` on
//! any stream, answered by one `Blob` (or `NotFound`) per id, in order.

use serde::{Deserialize, Serialize};

use crate::repo::{BlobId, BlobKind, SnapshotRecord, MAX_SEALED};
use crate::SnapshotId;

/// Version of the frame set; part of `Hello`.
pub const FRAME_VERSION: u16 = 1;
/// Largest frame on any stream.
pub const MAX_FRAME: usize = MAX_SEALED + 4096;
/// Most ids in one `Have`, `Missing` or `Get`.
pub const MAX_IDS: usize = 8192;

/// What a client asks of a storage agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// Opens a session with the signed task that allows it.
    Hello {
        /// [`FRAME_VERSION`].
        v: u16,
        /// The [`crate::TaskEnvelope`] bytes, as the client received them.
        #[serde(with = "serde_bytes")]
        task: Vec<u8>,
    },
    /// Which of these blobs does the repository lack?
    Have {
        /// Candidate ids.
        ids: Vec<BlobId>,
    },
    /// Store one sealed blob.
    Put {
        /// Its id.
        id: BlobId,
        /// What it holds.
        kind: BlobKind,
        /// The sealed bytes.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Record a snapshot whose blobs are all stored.
    Commit {
        /// The snapshot.
        snapshot: SnapshotRecord,
    },
    /// Send these blobs.
    Get {
        /// Wanted ids.
        ids: Vec<BlobId>,
    },
    /// Send the snapshot with this id (or unique id prefix).
    GetSnapshot {
        /// Id or prefix.
        id: String,
    },
}

/// What a storage agent answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    /// Session accepted.
    Welcome {
        /// The repository's id.
        repo_id: String,
    },
    /// The subset of a `Have` the repository lacks.
    Missing {
        /// Ids to send.
        ids: Vec<BlobId>,
    },
    /// A data stream was stored durably.
    Stored {
        /// Blobs stored.
        blobs: u64,
        /// Bytes stored.
        bytes: u64,
    },
    /// The snapshot is committed.
    Committed {
        /// Its id.
        id: SnapshotId,
    },
    /// One requested blob.
    Blob {
        /// Its id.
        id: BlobId,
        /// What it holds.
        kind: BlobKind,
        /// The sealed bytes.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// A requested snapshot.
    Snapshot {
        /// The record.
        snapshot: SnapshotRecord,
    },
    /// The request failed.
    Error {
        /// Machine-readable code.
        code: ErrorCode,
        /// What happened.
        message: String,
        /// Whether trying again may work.
        retryable: bool,
    },
}

crate::open_enum::open_enum! {
    /// Why a storage agent refused a data-plane request: the `code` of
    /// [`Response::Error`], one snake_case word on the wire. A word this
    /// build does not know decodes as [`ErrorCode::Other`].
    pub enum ErrorCode {
        /// No such snapshot or blob.
        NotFound = "not_found",
        /// A snapshot with this id is already committed.
        Exists = "exists",
        /// A commit names blobs that are not durably stored; the source
        /// uploads them again.
        MissingBlobs = "missing_blobs",
        /// A malformed request: no `hello` first, too many ids, a bad or
        /// ambiguous id, no repository on this host.
        Invalid = "invalid",
        /// Stored bytes are damaged.
        Corrupt = "corrupt",
        /// The storage host's disk or filesystem failed.
        Io = "io",
        /// The session's task does not allow this, or the task or the peer
        /// was refused.
        Forbidden = "forbidden",
    }
}

/// Reply to the read-only repository queries on NATS (`flotilla.repo.<storage>.*`).
///
/// They serve only what is safe without keys: snapshot records (their metadata
/// is sealed) and sealed tree blobs; file content only ever travels over QUIC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RepoReply {
    /// Every snapshot, with `blobs` left empty to keep the reply small.
    Snapshots {
        /// The records, oldest first.
        snapshots: Vec<SnapshotRecord>,
    },
    /// Size of the repository.
    Stats {
        /// Counts from the storage agent's index.
        stats: crate::repo::RepoStats,
    },
    /// One sealed tree blob.
    Tree {
        /// Sealed bytes.
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// The query failed.
    Error {
        /// What happened.
        message: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{codec, encode};

    /// The frame as it was before `code` was typed.
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    #[serde(tag = "type", rename_all = "snake_case")]
    enum OldResponse {
        Error {
            code: String,
            message: String,
            retryable: bool,
        },
    }

    #[test]
    fn error_codes_are_the_same_words_on_the_wire() {
        let words = [
            "not_found",
            "exists",
            "missing_blobs",
            "invalid",
            "corrupt",
            "io",
            "forbidden",
        ];
        assert_eq!(ErrorCode::KNOWN.len(), words.len());
        for (code, word) in ErrorCode::KNOWN.iter().zip(words) {
            assert_eq!(code.as_str(), word);
            let new = Response::Error {
                code: code.clone(),
                message: "m".into(),
                retryable: false,
            };
            let old = OldResponse::Error {
                code: word.into(),
                message: "m".into(),
                retryable: false,
            };
            let bytes = encode(&old).expect("encodes");
            assert_eq!(encode(&new).expect("encodes"), bytes);
            assert_eq!(
                codec::decode::<Response>(&bytes, MAX_FRAME).expect("decodes"),
                new
            );
        }
    }

    proptest::proptest! {
        /// Whatever word a peer sends is read, written back byte for byte,
        /// and read again as the same code.
        #[test]
        fn any_code_word_round_trips(word in "\\PC{0,24}") {
            let code = ErrorCode::from(word.as_str());
            let bytes = encode(&code).expect("encodes");
            proptest::prop_assert_eq!(&bytes, &encode(&word).expect("encodes"));
            let back: ErrorCode = codec::decode(&bytes, MAX_FRAME).expect("decodes");
            proptest::prop_assert_eq!(back.as_str(), word.as_str());
            proptest::prop_assert_eq!(back, code);
        }
    }

    #[test]
    fn an_unknown_code_from_a_newer_peer_still_decodes() {
        let bytes = encode(&OldResponse::Error {
            code: "quota_exceeded".into(),
            message: "m".into(),
            retryable: true,
        })
        .expect("encodes");
        let got = codec::decode::<Response>(&bytes, MAX_FRAME).expect("decodes");
        let Response::Error { code, .. } = &got else {
            panic!("not an error: {got:?}");
        };
        assert_eq!(code, &ErrorCode::Other("quota_exceeded".into()));
        assert_eq!(code.to_string(), "quota_exceeded");
        // Passed on unchanged.
        assert_eq!(encode(&got).expect("encodes"), bytes);
    }
}
