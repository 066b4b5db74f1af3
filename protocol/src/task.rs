//! Signed tasks: what the coordinator asks an agent to do.
//!
//! The coordinator encodes a [`TaskBody`], signs `SIGNING_CONTEXT || body` with its
//! Ed25519 key and sends both in a [`TaskEnvelope`]. The agent verifies the
//! signature over the exact bytes it received *before* decoding the body, so the
//! signed bytes and the interpreted bytes are the same bytes and no canonical
//! re-encoding is needed. Replay protection (a task id seen before) needs state
//! and lives in the agent; everything else is checked here by [`verify_task`].

use std::fmt;
use std::net::SocketAddr;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::{
    codec, limits, DecodeError, EncodeError, HostName, RejectReason, SnapshotId, TaskId, UnixMillis,
};

/// Schema version of [`TaskEnvelope`] and [`TaskBody`].
pub const TASK_VERSION: u16 = 1;

/// Domain separation: a signature over a task can never be mistaken for a
/// signature over anything else the coordinator key might one day sign.
const SIGNING_CONTEXT: &[u8] = b"flotilla-task-v1\0";

/// How far an agent's clock may be ahead of or behind the coordinator's.
pub const CLOCK_SKEW_MS: u64 = 5 * 60 * 1000;

/// A task as sent on `flotilla.task.<host>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskEnvelope {
    /// Schema version, [`TASK_VERSION`].
    pub v: u16,
    /// MessagePack of a [`TaskBody`]; exactly the bytes that were signed.
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
    /// Ed25519 signature over `"flotilla-task-v1\0" || body` (64 bytes).
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

/// What to do, for whom, and until when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskBody {
    /// Schema version, [`TASK_VERSION`].
    pub v: u16,
    /// Unique task id (a UUID); tasks are idempotent by id.
    pub id: TaskId,
    /// Fleet id the task belongs to.
    pub fleet: String,
    /// The one host that may run it.
    pub host: HostName,
    /// When the coordinator issued it.
    pub issued_at: UnixMillis,
    /// After this the task must not start.
    pub expires_at: UnixMillis,
    /// The work and its arguments.
    pub kind: TaskKind,
    /// The host's state epoch when the task was issued, from its heartbeat
    /// ([`crate::Heartbeat::epoch`]): an agent whose state has another epoch
    /// refuses the task ([`check_epoch`]). `None` when the host never
    /// reported one, and from coordinators that predate epochs; not written
    /// then, so such a body encodes exactly as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
}

/// The work a task asks for, with its arguments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TaskKind {
    /// Walk `paths` (inside the agent's backup roots) and report their size.
    Estimate {
        /// Absolute paths; empty means every backup root.
        paths: Vec<String>,
    },
    /// Back up `paths` into the repository of the storage host `storage`.
    Backup {
        /// Absolute paths inside the source's backup roots; empty means all roots.
        paths: Vec<String>,
        /// Glob patterns to leave out.
        excludes: Vec<String>,
        /// The storage host; its certificate must name it.
        storage: HostName,
        /// Its QUIC address, from its heartbeat.
        #[serde(with = "crate::addr")]
        storage_addr: SocketAddr,
        /// Commit even when a path that held files at this host's last
        /// backup into this repository is empty now, or was a mount point
        /// then and is not now (`--allow-empty`). Not written when false,
        /// so such a body encodes exactly as before.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        allow_empty: bool,
    },
    /// Restore a snapshot from `storage` into `target` on this host.
    Restore {
        /// The snapshot (the coordinator sends the full id; agents also
        /// accept a unique prefix, which is why decoding does not check it).
        snapshot: SnapshotId,
        /// The storage host; its certificate must name it.
        storage: HostName,
        /// Its QUIC address, from its heartbeat.
        #[serde(with = "crate::addr")]
        storage_addr: SocketAddr,
        /// Directory to restore into, inside this host's restore roots.
        target: String,
        /// Snapshot paths to restore; empty means everything.
        includes: Vec<String>,
        /// Keep setuid/setgid bits, file capabilities and device nodes even
        /// when the snapshot is another host's (the operator chose to; by
        /// default a cross-host restore strips them). A restore onto the
        /// snapshot's own host always keeps them. Absent (older
        /// coordinators): false.
        #[serde(default)]
        preserve_special: bool,
    },
    /// Check this host's repository (run on the storage host).
    Check {
        /// Re-read and re-hash every byte.
        read_data: bool,
    },
    /// Remove these snapshots' records from this host's repository (the data
    /// stays until a prune).
    Forget {
        /// Full snapshot ids.
        snapshots: Vec<SnapshotId>,
    },
    /// Stop a running task of this host cleanly; nothing half-done is
    /// committed and the task ends `cancelled`.
    Cancel {
        /// The task to stop.
        task_id: TaskId,
    },
    /// Delete data no snapshot references from this host's repository.
    Prune {
        /// Only report what would be freed.
        dry_run: bool,
        /// Keep unreferenced packs younger than this many seconds.
        grace_secs: u64,
    },
    /// Move the good blobs out of this host's damaged packs and drop those
    /// packs (run on the storage host).
    Repair {
        /// Re-read and re-hash every pack first, so that damage no check has
        /// found yet is repaired too.
        read_data: bool,
    },
    /// Copy snapshots from this host's repository to the storage host `to`
    /// (run on the storage host that holds them). Blobs move sealed, storage
    /// to storage over QUIC; the destination adds what it lacks, keeps each
    /// snapshot's id and deletes nothing.
    Copy {
        /// The destination storage host; its certificate must name it, and
        /// it checks that this task names it and that the peer is the
        /// task's host.
        to: HostName,
        /// Its QUIC address, from its heartbeat.
        #[serde(with = "crate::addr")]
        to_addr: SocketAddr,
        /// Only snapshots of these hosts; empty means every host.
        hosts: Vec<HostName>,
        /// Only these snapshots (full ids); empty means every snapshot of
        /// `hosts`. The destination commits no other.
        snapshots: Vec<SnapshotId>,
        /// Most bytes per second sent to `to` (a smooth pace, no bursts);
        /// 0 means no limit. Not written when 0.
        #[serde(default, skip_serializing_if = "is_zero")]
        limit_bytes_per_sec: u64,
    },
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl TaskKind {
    /// Short name used in events and job lists.
    pub fn name(&self) -> &'static str {
        match self {
            TaskKind::Estimate { .. } => "estimate",
            TaskKind::Backup { .. } => "backup",
            TaskKind::Restore { .. } => "restore",
            TaskKind::Check { .. } => "check",
            TaskKind::Forget { .. } => "forget",
            TaskKind::Prune { .. } => "prune",
            TaskKind::Repair { .. } => "repair",
            TaskKind::Copy { .. } => "copy",
            TaskKind::Cancel { .. } => "cancel",
        }
    }
}

/// What a finished task produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum TaskResult {
    /// Result of [`TaskKind::Estimate`].
    Estimate(EstimateReport),
    /// Result of [`TaskKind::Backup`].
    Backup(BackupReport),
    /// Result of [`TaskKind::Restore`].
    Restore(crate::repo::RestoreSummary),
    /// Result of [`TaskKind::Check`].
    Check(crate::repo::CheckReport),
    /// Result of [`TaskKind::Forget`].
    Forget(crate::repo::ForgetReport),
    /// Result of [`TaskKind::Prune`].
    Prune(crate::repo::PruneReport),
    /// Result of [`TaskKind::Repair`].
    Repair(crate::repo::RepairReport),
    /// Result of [`TaskKind::Cancel`].
    Cancel(CancelReport),
    /// Result of [`TaskKind::Copy`].
    Copy(CopyReport),
}

/// Most snapshot ids and failures a [`CopyReport`] lists (the counts are
/// always complete): the report travels in an event.
pub const COPY_REPORT_LISTED: usize = 200;

/// What a copy moved.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyReport {
    /// The destination storage host.
    pub to: String,
    /// Snapshots the task selected on this host.
    pub snapshots_selected: u64,
    /// Snapshots committed at the destination by this copy.
    pub snapshots_copied: u64,
    /// Snapshots the destination held already.
    pub snapshots_present: u64,
    /// The first copied snapshot ids.
    pub copied: Vec<SnapshotId>,
    /// Blobs sent (the destination lacked them).
    pub blobs_sent: u64,
    /// Sealed bytes sent.
    pub bytes_sent: u64,
    /// Blobs the selected snapshots reference that the destination held
    /// already (deduplicated there, not sent).
    pub blobs_present: u64,
    /// Snapshots that could not be copied, each with why (the first ones).
    pub failed: Vec<String>,
    /// How many could not be copied.
    pub snapshots_failed: u64,
}

/// What a cancel request found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelReport {
    /// The task asked to stop.
    pub task_id: TaskId,
    /// Whether it was running (it then ends `cancelled`).
    pub was_running: bool,
}

/// What a backup produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupReport {
    /// The committed snapshot.
    pub snapshot: SnapshotId,
    /// The storage host it went to.
    pub storage: String,
    /// Counters.
    pub summary: crate::repo::BackupSummary,
    /// Some files could not be read (listed in `unreadable`).
    pub partial: bool,
    /// The first unreadable paths, with why.
    pub unreadable: Vec<String>,
}

/// Size of a set of paths, as found by walking them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EstimateReport {
    /// The paths that were walked.
    pub paths: Vec<String>,
    /// Regular files.
    pub files: u64,
    /// Directories, the roots included.
    pub dirs: u64,
    /// Symbolic links (not followed).
    pub symlinks: u64,
    /// Sockets, fifos, devices.
    pub other: u64,
    /// Sum of regular file sizes (apparent size).
    pub bytes: u64,
    /// Entries that could not be read.
    pub errors: u64,
    /// The first few of those errors.
    pub error_samples: Vec<String>,
    /// Largest directories by the bytes beneath them, largest first.
    pub largest_dirs: Vec<DirUsage>,
    /// Time the walk took.
    pub duration_ms: u64,
}

/// Bytes and files beneath one directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirUsage {
    /// The directory.
    pub path: String,
    /// Bytes of regular files beneath it, recursively.
    pub bytes: u64,
    /// Regular files beneath it, recursively.
    pub files: u64,
}

/// The coordinator's public task-verification key (hex in files and bundles).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(pub [u8; 32]);

/// The coordinator's private task-signing key (an Ed25519 seed).
#[derive(Clone)]
pub struct SigningSeed(pub [u8; 32]);

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_hex())
    }
}

impl fmt::Debug for SigningSeed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningSeed(..)")
    }
}

impl PublicKey {
    /// Lowercase hex, as written in bundles.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Option<Self> {
        let bytes = hex::decode(s.trim()).ok()?;
        Some(Self(bytes.try_into().ok()?))
    }
}

impl SigningSeed {
    /// The matching public key.
    pub fn public_key(&self) -> PublicKey {
        PublicKey(SigningKey::from_bytes(&self.0).verifying_key().to_bytes())
    }

    /// Lowercase hex, as written in the fleet's key file.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Option<Self> {
        let bytes = hex::decode(s.trim()).ok()?;
        Some(Self(bytes.try_into().ok()?))
    }
}

/// Why an agent refuses a task. Permanent: the same bytes are refused again.
#[derive(Debug, thiserror::Error)]
pub enum TaskVerifyError {
    /// The envelope could not be decoded, or was too large.
    #[error("task envelope: {0}")]
    Envelope(DecodeError),
    /// The envelope carries no signature.
    #[error("task is not signed")]
    Unsigned,
    /// The signature does not verify with the coordinator's key.
    #[error("task signature does not verify with the fleet's coordinator key")]
    BadSignature,
    /// The signed body could not be decoded.
    #[error("task body: {0}")]
    Body(DecodeError),
    /// The task names another fleet.
    #[error("task {task_id} belongs to fleet {found}, not {expected}")]
    WrongFleet {
        /// Task id.
        task_id: TaskId,
        /// This agent's fleet.
        expected: String,
        /// The task's fleet.
        found: String,
    },
    /// The task names another host.
    #[error("task {task_id} is addressed to host {found}, not {expected}")]
    WrongHost {
        /// Task id.
        task_id: TaskId,
        /// This agent's host.
        expected: String,
        /// The task's host.
        found: String,
    },
    /// The task's validity ended.
    #[error("task {task_id} expired at {expires_at} (now {now}, unix ms)")]
    Expired {
        /// Task id.
        task_id: TaskId,
        /// End of validity.
        expires_at: UnixMillis,
        /// Agent's clock.
        now: UnixMillis,
    },
    /// The task was issued in the future beyond the allowed clock skew.
    #[error(
        "task {task_id} is issued at {issued_at}, in the future (now {now}, unix ms); check clocks"
    )]
    NotYetValid {
        /// Task id.
        task_id: TaskId,
        /// Issue time.
        issued_at: UnixMillis,
        /// Agent's clock.
        now: UnixMillis,
    },
    /// The task carries another epoch than this agent's state: it was
    /// issued before the state directory was created (or read from a
    /// heartbeat of the state before).
    #[error(
        "task {task_id} was issued for an earlier state of this agent (epoch {task_epoch:016x}, \
         now {epoch:016x}): its state directory was created since; send the task again"
    )]
    StaleEpoch {
        /// Task id.
        task_id: TaskId,
        /// The epoch in the task.
        task_epoch: u64,
        /// This agent's.
        epoch: u64,
    },
    /// The task carries no epoch and was issued before this agent's state
    /// was created, beyond the allowed clock skew: the journal that would
    /// recognise it as a replay did not exist yet.
    #[error(
        "task {task_id} was issued at {issued_at}, before this agent's state was created at \
         {created_at} (unix ms): it may be a replay its new journal cannot recognise; send the task again"
    )]
    IssuedBeforeState {
        /// Task id.
        task_id: TaskId,
        /// Issue time.
        issued_at: UnixMillis,
        /// When the agent's state was created.
        created_at: UnixMillis,
    },
}

impl TaskVerifyError {
    /// The reason code for the `security.task_rejected` event.
    pub fn reason(&self) -> RejectReason {
        match self {
            TaskVerifyError::Envelope(DecodeError::TooLarge { .. })
            | TaskVerifyError::Body(DecodeError::TooLarge { .. }) => RejectReason::Oversized,
            TaskVerifyError::Envelope(DecodeError::UnsupportedVersion { .. })
            | TaskVerifyError::Body(DecodeError::UnsupportedVersion { .. }) => {
                RejectReason::UnsupportedVersion
            }
            TaskVerifyError::Envelope(_) | TaskVerifyError::Body(_) => RejectReason::Malformed,
            TaskVerifyError::Unsigned => RejectReason::Unsigned,
            TaskVerifyError::BadSignature => RejectReason::BadSignature,
            TaskVerifyError::WrongFleet { .. } => RejectReason::WrongFleet,
            TaskVerifyError::WrongHost { .. } => RejectReason::WrongHost,
            TaskVerifyError::Expired { .. } => RejectReason::Expired,
            TaskVerifyError::NotYetValid { .. } => RejectReason::NotYetValid,
            TaskVerifyError::StaleEpoch { .. } | TaskVerifyError::IssuedBeforeState { .. } => {
                RejectReason::StaleEpoch
            }
        }
    }

    /// The task id, when the task got far enough to be trusted with one.
    pub fn task_id(&self) -> Option<&TaskId> {
        match self {
            TaskVerifyError::WrongFleet { task_id, .. }
            | TaskVerifyError::WrongHost { task_id, .. }
            | TaskVerifyError::Expired { task_id, .. }
            | TaskVerifyError::NotYetValid { task_id, .. }
            | TaskVerifyError::StaleEpoch { task_id, .. }
            | TaskVerifyError::IssuedBeforeState { task_id, .. } => Some(task_id),
            _ => None,
        }
    }
}

/// Encodes and signs `body`.
pub fn sign_task(seed: &SigningSeed, body: &TaskBody) -> Result<TaskEnvelope, EncodeError> {
    let body = codec::encode(body)?;
    let key = SigningKey::from_bytes(&seed.0);
    let signature = key.sign(&signed_message(&body));
    Ok(TaskEnvelope {
        v: TASK_VERSION,
        body,
        signature: signature.to_bytes().to_vec(),
    })
}

/// Decodes and verifies a task envelope received by `host` of `fleet` at `now`.
///
/// Checks, in order: size, envelope shape and version, presence and validity of
/// the signature, body shape and version, fleet, host, issue time and expiry (both
/// with [`CLOCK_SKEW_MS`] of tolerance). Whether the id was seen before is the
/// caller's to check.
pub fn verify_task(
    bytes: &[u8],
    key: &PublicKey,
    fleet: &str,
    host: &HostName,
    now: UnixMillis,
) -> Result<TaskBody, TaskVerifyError> {
    let body = verify_task_for_peer(bytes, key, fleet, now)?;
    if &body.host != host {
        return Err(TaskVerifyError::WrongHost {
            task_id: body.id,
            expected: host.to_string(),
            found: body.host.to_string(),
        });
    }
    Ok(body)
}

/// Verifies a task presented by a *peer* (a source opening a backup session
/// with a storage agent): everything [`verify_task`] checks except that the
/// task is addressed to the verifier; the caller checks the task names itself
/// as the storage host and that the peer's certificate names `body.host`.
pub fn verify_task_for_peer(
    bytes: &[u8],
    key: &PublicKey,
    fleet: &str,
    now: UnixMillis,
) -> Result<TaskBody, TaskVerifyError> {
    let envelope: TaskEnvelope =
        codec::decode(bytes, limits::TASK_BYTES).map_err(TaskVerifyError::Envelope)?;
    codec::check_version(envelope.v, TASK_VERSION).map_err(TaskVerifyError::Envelope)?;
    if envelope.signature.is_empty() {
        return Err(TaskVerifyError::Unsigned);
    }
    let signature =
        Signature::from_slice(&envelope.signature).map_err(|_| TaskVerifyError::BadSignature)?;
    let verifying = VerifyingKey::from_bytes(&key.0).map_err(|_| TaskVerifyError::BadSignature)?;
    verifying
        .verify(&signed_message(&envelope.body), &signature)
        .map_err(|_| TaskVerifyError::BadSignature)?;

    let body: TaskBody =
        codec::decode(&envelope.body, limits::TASK_BYTES).map_err(TaskVerifyError::Body)?;
    codec::check_version(body.v, TASK_VERSION).map_err(TaskVerifyError::Body)?;
    if body.fleet != fleet {
        return Err(TaskVerifyError::WrongFleet {
            task_id: body.id,
            expected: fleet.to_owned(),
            found: body.fleet,
        });
    }
    if now > body.expires_at.saturating_add(CLOCK_SKEW_MS) {
        return Err(TaskVerifyError::Expired {
            task_id: body.id,
            expires_at: body.expires_at,
            now,
        });
    }
    if body.issued_at > now.saturating_add(CLOCK_SKEW_MS) {
        return Err(TaskVerifyError::NotYetValid {
            task_id: body.id,
            issued_at: body.issued_at,
            now,
        });
    }
    Ok(body)
}

/// Checks that a verified task was issued for this agent's state, made at
/// `created_at` with epoch `epoch`: a task that carries an epoch must carry
/// this one; a task without one must not be issued before the state was
/// created (beyond [`CLOCK_SKEW_MS`]). An agent whose state directory was
/// wiped has lost the journal that recognises replays; this is what still
/// refuses a task captured from the bus before the wipe.
///
/// Only the agent a task is addressed to checks this: a storage agent that
/// is shown a source's task on the data plane does not (the epoch is the
/// source's).
pub fn check_epoch(
    body: &TaskBody,
    epoch: u64,
    created_at: UnixMillis,
) -> Result<(), TaskVerifyError> {
    match body.epoch {
        Some(task_epoch) if task_epoch != epoch => Err(TaskVerifyError::StaleEpoch {
            task_id: body.id.clone(),
            task_epoch,
            epoch,
        }),
        Some(_) => Ok(()),
        None if body.issued_at.saturating_add(CLOCK_SKEW_MS) < created_at => {
            Err(TaskVerifyError::IssuedBeforeState {
                task_id: body.id.clone(),
                issued_at: body.issued_at,
                created_at,
            })
        }
        None => Ok(()),
    }
}

fn signed_message(body: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(SIGNING_CONTEXT.len() + body.len());
    msg.extend_from_slice(SIGNING_CONTEXT);
    msg.extend_from_slice(body);
    msg
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const NOW: UnixMillis = 1_700_000_000_000;

    fn seed(b: u8) -> SigningSeed {
        SigningSeed([b; 32])
    }

    fn body(host: &str) -> TaskBody {
        TaskBody {
            v: TASK_VERSION,
            id: TaskId::new("t-1").expect("valid"),
            fleet: "f1".into(),
            host: HostName::new(host).expect("valid"),
            issued_at: NOW,
            expires_at: NOW + 60_000,
            kind: TaskKind::Estimate {
                paths: vec!["/srv".into()],
            },
            epoch: None,
        }
    }

    fn verify(
        env: &TaskEnvelope,
        key: &PublicKey,
        now: UnixMillis,
    ) -> Result<TaskBody, TaskVerifyError> {
        let bytes = codec::encode(env).expect("encodes");
        verify_task(
            &bytes,
            key,
            "f1",
            &HostName::new("nas").expect("valid"),
            now,
        )
    }

    #[test]
    fn a_signed_task_verifies() {
        let env = sign_task(&seed(1), &body("nas")).expect("signs");
        let got = verify(&env, &seed(1).public_key(), NOW).expect("verifies");
        assert_eq!(got, body("nas"));
    }

    #[test]
    fn forged_unsigned_misaddressed_and_expired_tasks_are_refused() {
        let env = sign_task(&seed(1), &body("nas")).expect("signs");
        let other = seed(2).public_key();
        assert_eq!(
            verify(&env, &other, NOW)
                .expect_err("must be refused")
                .reason(),
            RejectReason::BadSignature
        );

        let mut unsigned = env.clone();
        unsigned.signature.clear();
        let key = seed(1).public_key();
        assert_eq!(
            verify(&unsigned, &key, NOW)
                .expect_err("must be refused")
                .reason(),
            RejectReason::Unsigned
        );

        let mut tampered = env.clone();
        let last = tampered.body.len() - 1;
        tampered.body[last] ^= 1;
        assert_eq!(
            verify(&tampered, &key, NOW)
                .expect_err("must be refused")
                .reason(),
            RejectReason::BadSignature
        );

        let misaddressed = sign_task(&seed(1), &body("laptop")).expect("signs");
        assert_eq!(
            verify(&misaddressed, &key, NOW)
                .expect_err("must be refused")
                .reason(),
            RejectReason::WrongHost
        );

        let late = NOW + 60_000 + CLOCK_SKEW_MS + 1;
        assert_eq!(
            verify(&env, &key, late)
                .expect_err("must be refused")
                .reason(),
            RejectReason::Expired
        );
        let early = NOW - CLOCK_SKEW_MS - 1;
        assert_eq!(
            verify(&env, &key, early)
                .expect_err("must be refused")
                .reason(),
            RejectReason::NotYetValid
        );
    }

    #[test]
    fn a_task_for_another_state_epoch_is_refused_as_stale() {
        const CREATED: UnixMillis = NOW + 3_600_000;
        let mut task = body("nas");
        task.epoch = Some(7);
        // The agent's own epoch: accepted, whenever it was issued.
        assert!(check_epoch(&task, 7, CREATED).is_ok());
        // Another: refused, and the event names the task.
        let err = check_epoch(&task, 8, CREATED).expect_err("another epoch");
        assert_eq!(err.reason(), RejectReason::StaleEpoch);
        assert_eq!(err.task_id(), Some(&task.id));
        assert!(err.to_string().contains("earlier state"), "{err}");
        let err = check_epoch(&task, 8, 0).expect_err("even before the floor");
        assert_eq!(err.reason(), RejectReason::StaleEpoch);
    }

    #[test]
    fn a_task_without_an_epoch_issued_before_the_state_is_refused() {
        let task = body("nas"); // issued at NOW, no epoch
                                // The state is younger than the task by more than the skew: refused.
        let created = NOW + CLOCK_SKEW_MS + 1;
        let err = check_epoch(&task, 1, created).expect_err("issued before the state");
        assert_eq!(err.reason(), RejectReason::StaleEpoch);
        assert_eq!(err.task_id(), Some(&task.id));
        // Within the skew, or an older state: accepted.
        assert!(check_epoch(&task, 1, NOW + CLOCK_SKEW_MS).is_ok());
        assert!(check_epoch(&task, 1, NOW - 1).is_ok());
        assert!(check_epoch(&task, 1, 0).is_ok());
    }

    #[test]
    fn the_epoch_is_signed_and_absent_when_unset() {
        let mut task = body("nas");
        let without = sign_task(&seed(1), &task).expect("signs");
        // No epoch: the body is the one older coordinators signed.
        let decoded: serde_json::Value =
            rmp_serde::from_slice(&without.body).expect("a msgpack map");
        assert!(decoded.get("epoch").is_none(), "{decoded}");
        task.epoch = Some(u64::MAX - 1);
        let with = sign_task(&seed(1), &task).expect("signs");
        let got = verify(&with, &seed(1).public_key(), NOW).expect("verifies");
        assert_eq!(got.epoch, Some(u64::MAX - 1));
        // The epoch is inside the signed bytes: changing it breaks the signature.
        let mut forged = with.clone();
        let mut other = task.clone();
        other.epoch = Some(1);
        forged.body = codec::encode(&other).expect("encodes");
        let err = verify(&forged, &seed(1).public_key(), NOW).expect_err("refused");
        assert_eq!(err.reason(), RejectReason::BadSignature);
    }

    #[test]
    fn allow_empty_is_written_only_when_set() {
        let kind = |allow_empty| TaskKind::Backup {
            paths: Vec::new(),
            excludes: Vec::new(),
            storage: HostName::new("vault").expect("valid"),
            storage_addr: "192.0.2.1:7443".parse().expect("an address"),
            allow_empty,
        };
        let off: serde_json::Value =
            rmp_serde::from_slice(&codec::encode(&kind(false)).expect("encodes")).expect("map");
        assert!(off.get("allow_empty").is_none(), "{off}");
        let on = codec::encode(&kind(true)).expect("encodes");
        let back: TaskKind = codec::decode(&on, limits::TASK_BYTES).expect("decodes");
        assert_eq!(back, kind(true));
    }

    #[test]
    fn oversized_envelopes_are_refused_before_parsing() {
        let bytes = vec![0x90; limits::TASK_BYTES + 1];
        let err = verify_task(
            &bytes,
            &seed(1).public_key(),
            "f1",
            &HostName::new("nas").expect("valid"),
            NOW,
        )
        .expect_err("must be refused");
        assert_eq!(err.reason(), RejectReason::Oversized);
    }

    /// A backup task body as coordinators wrote it before `id` and
    /// `storage_addr` were typed.
    #[derive(Serialize)]
    struct OldBody<'a> {
        v: u16,
        id: &'a str,
        fleet: &'a str,
        host: &'a str,
        issued_at: UnixMillis,
        expires_at: UnixMillis,
        kind: OldKind<'a>,
    }

    #[derive(Serialize)]
    #[serde(tag = "type", rename_all = "snake_case")]
    enum OldKind<'a> {
        Backup {
            paths: Vec<String>,
            excludes: Vec<String>,
            storage: &'a str,
            storage_addr: &'a str,
        },
    }

    /// Signs `body` as it is, whatever it holds.
    fn sign_old(seed: &SigningSeed, body: &OldBody<'_>) -> Vec<u8> {
        let body = codec::encode(body).expect("encodes");
        let signature = SigningKey::from_bytes(&seed.0).sign(&signed_message(&body));
        codec::encode(&TaskEnvelope {
            v: TASK_VERSION,
            body,
            signature: signature.to_bytes().to_vec(),
        })
        .expect("encodes")
    }

    fn old_backup(storage_addr: &str) -> OldBody<'_> {
        OldBody {
            v: TASK_VERSION,
            id: "0b7e4a9e-5d3c-4c1e-9a57-2f8d1e6b3c10",
            fleet: "f1",
            host: "nas",
            issued_at: NOW,
            expires_at: NOW + 60_000,
            kind: OldKind::Backup {
                paths: vec!["/srv".into()],
                excludes: Vec::new(),
                storage: "vault",
                storage_addr,
            },
        }
    }

    #[test]
    fn an_old_backup_task_verifies_and_signs_to_the_same_bytes() {
        for addr in ["192.0.2.1:7443", "[2001:db8::1]:7443"] {
            let old = old_backup(addr);
            let bytes = sign_old(&seed(1), &old);
            let host = HostName::new("nas").expect("valid");
            let got =
                verify_task(&bytes, &seed(1).public_key(), "f1", &host, NOW).expect("verifies");
            assert_eq!(got.id, old.id);
            let TaskKind::Backup { storage_addr, .. } = &got.kind else {
                panic!("not a backup: {got:?}");
            };
            assert_eq!(storage_addr.to_string(), addr);
            // The typed body encodes to exactly the bytes the old one did.
            let env = sign_task(&seed(1), &got).expect("signs");
            assert_eq!(env.body, codec::encode(&old).expect("encodes"));
        }
    }

    #[test]
    fn a_task_with_an_unparsable_storage_address_is_refused_as_malformed() {
        for addr in ["vault:7443", "192.0.2.1", "", "::1:7443"] {
            let bytes = sign_old(&seed(1), &old_backup(addr));
            let host = HostName::new("nas").expect("valid");
            let err =
                verify_task(&bytes, &seed(1).public_key(), "f1", &host, NOW).expect_err("refused");
            assert_eq!(err.reason(), RejectReason::Malformed, "{addr:?}: {err}");
            let err = verify_task_for_peer(&bytes, &seed(1).public_key(), "f1", NOW)
                .expect_err("refused");
            assert_eq!(err.reason(), RejectReason::Malformed);
        }
    }

    #[test]
    fn a_repair_task_and_its_result_keep_their_names_on_the_wire() {
        let kind = TaskKind::Repair { read_data: true };
        assert_eq!(kind.name(), "repair");
        let wire: serde_json::Value =
            rmp_serde::from_slice(&codec::encode(&kind).expect("encodes")).expect("decodes");
        assert_eq!(
            wire,
            serde_json::json!({"type": "repair", "read_data": true})
        );
        let result = TaskResult::Repair(crate::repo::RepairReport {
            blobs_lost: 1,
            lost_blobs: vec![crate::repo::BlobId([3; 32])],
            snapshots_affected: 1,
            affected_snapshots: vec![SnapshotId::random()],
            ..Default::default()
        });
        let bytes = codec::encode(&result).expect("encodes");
        let back: TaskResult = codec::decode(&bytes, limits::EVENT_BYTES).expect("decodes");
        assert_eq!(back, result);
    }

    proptest! {
        #[test]
        fn hostile_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let key = seed(1).public_key();
            let host = HostName::new("nas").expect("valid");
            // Random bytes never carry the coordinator's signature.
            prop_assert!(verify_task(&bytes, &key, "f1", &host, NOW).is_err());
            // Whatever does decode means the same after a round trip.
            if let Ok(hb) = crate::Heartbeat::decode(&bytes) {
                let again = codec::encode(&hb).expect("a decoded heartbeat encodes");
                let back = crate::Heartbeat::decode(&again).expect("and decodes again");
                prop_assert_eq!(codec::encode(&back).expect("encodes"), again);
            }
            if let Ok(ev) = crate::Event::decode(&bytes) {
                let again = codec::encode(&ev).expect("a decoded event encodes");
                let back = crate::Event::decode(&again).expect("and decodes again");
                prop_assert_eq!(codec::encode(&back).expect("encodes"), again);
            }
        }

        /// A mutated envelope is refused, or (a mutation the encoding does
        /// not notice, such as the same byte written back) yields exactly the
        /// task that was signed: never a different task.
        #[test]
        fn mutated_valid_envelopes_are_refused_or_unchanged(idx in any::<usize>(), val in any::<u8>()) {
            let env = sign_task(&seed(1), &body("nas")).expect("signs");
            let mut bytes = codec::encode(&env).expect("encodes");
            let i = idx % bytes.len();
            let changed = bytes[i] != val;
            bytes[i] = val;
            let key = seed(1).public_key();
            let host = HostName::new("nas").expect("valid");
            match verify_task(&bytes, &key, "f1", &host, NOW) {
                Ok(got) => prop_assert_eq!(got, body("nas")),
                Err(e) => prop_assert!(changed, "the unchanged envelope was refused: {}", e),
            }
        }

        /// Any task the coordinator signs verifies on its host to the same
        /// body, within its window, and is refused by every other host.
        #[test]
        fn signed_tasks_round_trip(
            id in "[a-z0-9-]{1,40}",
            host in "[a-z]([a-z0-9-]{0,19}[a-z0-9])?",
            issued_at in 1_600_000_000_000u64..1_900_000_000_000,
            ttl in 1u64..86_400_000,
            paths in proptest::collection::vec("/[a-zA-Z0-9 ._/-]{0,60}", 0..8),
        ) {
            let host = HostName::new(&host).expect("the pattern makes valid names");
            let task = TaskBody {
                v: TASK_VERSION,
                id: TaskId::new(id).expect("the pattern makes valid ids"),
                fleet: "f1".into(),
                host: host.clone(),
                issued_at,
                expires_at: issued_at + ttl,
                kind: TaskKind::Estimate { paths },
                epoch: None,
            };
            let env = sign_task(&seed(7), &task).expect("signs");
            let bytes = codec::encode(&env).expect("encodes");
            let key = seed(7).public_key();
            let got = verify_task(&bytes, &key, "f1", &host, issued_at).expect("verifies");
            prop_assert_eq!(&got, &task);
            let late = task.expires_at + CLOCK_SKEW_MS + 1;
            let expired = verify_task(&bytes, &key, "f1", &host, late).expect_err("expired");
            prop_assert_eq!(expired.reason(), RejectReason::Expired);
            let early = issued_at - CLOCK_SKEW_MS - 1;
            let early = verify_task(&bytes, &key, "f1", &host, early).expect_err("not yet valid");
            prop_assert_eq!(early.reason(), RejectReason::NotYetValid);
            let other = HostName::new("someone-else").expect("valid");
            if other != host {
                let refused = verify_task(&bytes, &key, "f1", &other, issued_at)
                    .expect_err("another host refuses it");
                prop_assert_eq!(refused.reason(), RejectReason::WrongHost);
            }
        }
    }
}
