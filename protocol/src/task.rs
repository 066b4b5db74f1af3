//! Signed tasks: what the coordinator asks an agent to do.
//!
//! The coordinator encodes a [`TaskBody`], signs `SIGNING_CONTEXT || body` with its
//! Ed25519 key and sends both in a [`TaskEnvelope`]. The agent verifies the
//! signature over the exact bytes it received *before* decoding the body, so the
//! signed bytes and the interpreted bytes are the same bytes and no canonical
//! re-encoding is needed. Replay protection (a task id seen before) needs state
//! and lives in the agent; everything else is checked here by [`verify_task`].

use std::fmt;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::{codec, limits, DecodeError, EncodeError, HostName, RejectReason, UnixMillis};

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
    pub id: String,
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
        storage_addr: String,
    },
    /// Restore a snapshot from `storage` into `target` on this host.
    Restore {
        /// Snapshot id or unique prefix.
        snapshot: String,
        /// The storage host; its certificate must name it.
        storage: HostName,
        /// Its QUIC address, from its heartbeat.
        storage_addr: String,
        /// Directory to restore into, inside this host's restore roots.
        target: String,
        /// Snapshot paths to restore; empty means everything.
        includes: Vec<String>,
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
        snapshots: Vec<String>,
    },
    /// Stop a running task of this host cleanly; nothing half-done is
    /// committed and the task ends `cancelled`.
    Cancel {
        /// The task to stop.
        task_id: String,
    },
    /// Delete data no snapshot references from this host's repository.
    Prune {
        /// Only report what would be freed.
        dry_run: bool,
        /// Keep unreferenced packs younger than this many seconds.
        grace_secs: u64,
    },
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
    /// Result of [`TaskKind::Cancel`].
    Cancel(CancelReport),
}

/// What a cancel request found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelReport {
    /// The task asked to stop.
    pub task_id: String,
    /// Whether it was running (it then ends `cancelled`).
    pub was_running: bool,
}

/// What a backup produced.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupReport {
    /// The committed snapshot.
    pub snapshot: String,
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
        task_id: String,
        /// This agent's fleet.
        expected: String,
        /// The task's fleet.
        found: String,
    },
    /// The task names another host.
    #[error("task {task_id} is addressed to host {found}, not {expected}")]
    WrongHost {
        /// Task id.
        task_id: String,
        /// This agent's host.
        expected: String,
        /// The task's host.
        found: String,
    },
    /// The task's validity ended.
    #[error("task {task_id} expired at {expires_at} (now {now}, unix ms)")]
    Expired {
        /// Task id.
        task_id: String,
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
        task_id: String,
        /// Issue time.
        issued_at: UnixMillis,
        /// Agent's clock.
        now: UnixMillis,
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
        }
    }

    /// The task id, when the task got far enough to be trusted with one.
    pub fn task_id(&self) -> Option<&str> {
        match self {
            TaskVerifyError::WrongFleet { task_id, .. }
            | TaskVerifyError::WrongHost { task_id, .. }
            | TaskVerifyError::Expired { task_id, .. }
            | TaskVerifyError::NotYetValid { task_id, .. } => Some(task_id),
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
            id: "t-1".into(),
            fleet: "f1".into(),
            host: HostName::new(host).expect("valid"),
            issued_at: NOW,
            expires_at: NOW + 60_000,
            kind: TaskKind::Estimate {
                paths: vec!["/srv".into()],
            },
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
                id,
                fleet: "f1".into(),
                host: host.clone(),
                issued_at,
                expires_at: issued_at + ttl,
                kind: TaskKind::Estimate { paths },
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
