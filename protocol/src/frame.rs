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
        id: String,
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
        /// Machine-readable code (`not_found`, `forbidden`, `invalid`, `io`, `missing_blobs`).
        code: String,
        /// What happened.
        message: String,
        /// Whether trying again may work.
        retryable: bool,
    },
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
