//! Events: every state change, published for alerting and replay.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::{
    codec, limits, DecodeError, HostName, Role, SnapshotId, TaskId, TaskResult, UnixMillis,
};

/// Schema version of [`Event`].
pub const EVENT_VERSION: u16 = 1;

/// One event, published on `flotilla.events.<kind>.<host>` and kept in the event
/// stream.
///
/// On the wire it is one MessagePack map: the fields below plus `kind` (e.g.
/// `agent.offline`) and `detail` (a map whose fields depend on `kind`), so a
/// subscriber can switch on `kind` without knowing every detail type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Schema version, [`EVENT_VERSION`].
    pub v: u16,
    /// Unique event id (a UUID), for de-duplication by subscribers.
    pub id: String,
    /// When it happened, by the publisher's clock.
    pub time: UnixMillis,
    /// The host it is about.
    pub host: HostName,
    /// How much a human should care.
    pub severity: Severity,
    /// One human-readable line.
    pub message: String,
    /// `kind` and `detail`.
    #[serde(flatten)]
    pub body: EventBody,
}

/// How much a human should care about an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Routine.
    Info,
    /// Worth a look.
    Warning,
    /// Something failed or was attacked.
    Error,
}

/// The kind of an event and its kind-specific detail.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "detail")]
pub enum EventBody {
    /// The agent connected and is heartbeating.
    #[serde(rename = "agent.online")]
    AgentOnline {
        /// Agent version.
        version: String,
        /// Its roles.
        roles: Vec<Role>,
        /// QUIC address it serves, if any.
        #[serde(default, with = "crate::addr::option")]
        quic_addr: Option<SocketAddr>,
    },
    /// The agent stopped, or (when published by a watchdog) missed heartbeats.
    #[serde(rename = "agent.offline")]
    AgentOffline {
        /// Why.
        reason: OfflineReason,
    },
    /// An agent refused a task or message.
    #[serde(rename = "security.task_rejected")]
    TaskRejected {
        /// The task id, if the task was readable and signed.
        task_id: Option<TaskId>,
        /// Machine-readable reason.
        reason: RejectReason,
        /// Human-readable detail.
        detail: String,
        /// Subject the message arrived on.
        subject: String,
    },
    /// A task started running.
    #[serde(rename = "task.started")]
    TaskStarted {
        /// Task id.
        task_id: TaskId,
        /// Task kind, e.g. `estimate`.
        task_kind: String,
    },
    /// Progress of a running task, about once a second.
    #[serde(rename = "task.progress")]
    TaskProgress(TaskProgress),
    /// A task finished, well or badly.
    #[serde(rename = "task.finished")]
    TaskFinished(TaskFinished),
    /// A job the coordinator daemon dispatched succeeded.
    #[serde(rename = "job.succeeded")]
    JobSucceeded(JobEnded),
    /// A job finished with some files skipped.
    #[serde(rename = "job.partial")]
    JobPartial(JobEnded),
    /// A job failed for good (retries exhausted, or not retryable).
    #[serde(rename = "job.failed")]
    JobFailed(JobEnded),
    /// A job was cancelled.
    #[serde(rename = "job.cancelled")]
    JobCancelled(JobEnded),
    /// A host has had no successful backup of a plan for longer than its RPO.
    #[serde(rename = "backup.overdue")]
    BackupOverdue {
        /// The plan.
        plan: String,
        /// Last successful backup, if any.
        last_success: Option<UnixMillis>,
        /// The recovery-point objective, in seconds.
        rpo_secs: u64,
    },
    /// A host's newest snapshot copied to one of a plan's `copy_to` storage
    /// hosts is older than the plan's RPO (or none was ever copied there).
    #[serde(rename = "copy.overdue")]
    CopyOverdue {
        /// The plan.
        plan: String,
        /// The destination storage host.
        storage: String,
        /// When the newest snapshot copied there was taken, if any.
        last_copied: Option<UnixMillis>,
        /// The recovery-point objective, in seconds.
        rpo_secs: u64,
    },
    /// A storage or backup root is nearly full.
    #[serde(rename = "storage.low_space")]
    StorageLowSpace {
        /// The root.
        path: String,
        /// Free bytes.
        free_bytes: u64,
        /// Size of its filesystem.
        total_bytes: u64,
    },
    /// An agent runs another version than the coordinator.
    #[serde(rename = "agent.version_mismatch")]
    AgentVersionMismatch {
        /// The agent's version.
        agent_version: String,
        /// The coordinator's version.
        coordinator_version: String,
    },
    /// A `flotilla serve` daemon has been on standby for long without any
    /// daemon it can see leading: the lease cannot be read, its holder is
    /// not named, or the named holder publishes no fleet status (a daemon
    /// that hangs, or someone squatting the lease key). Schedules and alerts
    /// may not be running. Repeated every few minutes while it lasts.
    #[serde(rename = "coordinator.standby")]
    CoordinatorStandby {
        /// This daemon's instance name.
        instance: String,
        /// Who holds the lease, if it can be read.
        holder: Option<String>,
        /// How long it has stood by like this, in seconds.
        standby_secs: u64,
        /// Why no leader can be seen.
        why: String,
    },
    /// A repository check found problems.
    #[serde(rename = "check.failed")]
    CheckFailed {
        /// The check task.
        task_id: TaskId,
        /// Number of problems.
        problems: u64,
        /// Damaged or missing blobs (hex ids, the first 100).
        damaged_blobs: Vec<String>,
        /// Snapshots that reference them.
        affected_snapshots: Vec<String>,
    },
    /// A repository repair left blobs lost (no copy of them is left, so the
    /// snapshots that reference them cannot be fully restored until a backup
    /// of a host that still has the data uploads them again), or could not
    /// do all it should.
    #[serde(rename = "repair.failed")]
    RepairFailed {
        /// The repair task.
        task_id: TaskId,
        /// Number of blobs lost (all of them, however many are listed).
        lost: u64,
        /// Lost blobs (hex ids, the first 100).
        lost_blobs: Vec<String>,
        /// Snapshots that reference them.
        affected_snapshots: Vec<SnapshotId>,
        /// What repair could not do (packs kept because they could not be
        /// read, snapshots that do not read), for people; the first 100.
        problems: Vec<String>,
    },
    /// The coordinator found the fleet's streams, buckets or task
    /// consumers changed from what Flotilla needs (deleted, a limit
    /// changed, a consumer that could take a host's tasks) and repaired
    /// what it could: someone with the rights did it, or the server lost
    /// its data.
    #[serde(rename = "bus.repaired")]
    BusRepaired {
        /// One line per finding: the resource, what was wrong, what was
        /// done (the first 100).
        findings: Vec<String>,
    },
}

crate::open_enum::open_enum! {
    /// Why an agent is offline: the `reason` of [`EventBody::AgentOffline`].
    /// A word this build does not know decodes as [`OfflineReason::Other`].
    pub enum OfflineReason {
        /// It stopped cleanly (published by the agent itself).
        Shutdown = "shutdown",
        /// Its heartbeats stopped (published by a watchdog).
        MissedHeartbeats = "missed_heartbeats",
    }
}

/// Why an agent refused a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// Not MessagePack of the expected shape.
    Malformed,
    /// Larger than the limit for tasks.
    Oversized,
    /// A schema version this agent does not read.
    UnsupportedVersion,
    /// No signature.
    Unsigned,
    /// Signature does not verify with the coordinator key.
    BadSignature,
    /// For another fleet.
    WrongFleet,
    /// For another host.
    WrongHost,
    /// Past its expiry.
    Expired,
    /// Issued in the future.
    NotYetValid,
    /// Issued for an earlier state of this agent: its state directory (and
    /// the journal that recognises replays) was created since.
    StaleEpoch,
    /// A task id this agent has already received in another message.
    Replayed,
    /// Signed and valid, but asks for something outside this agent's allowlists.
    NotAllowed,
    /// A data-plane peer without a fleet certificate, or not the host its task names.
    UnknownPeer,
}

impl RejectReason {
    /// Every reason, in the order the agent checks them.
    pub const ALL: &'static [RejectReason] = &[
        RejectReason::Malformed,
        RejectReason::Oversized,
        RejectReason::UnsupportedVersion,
        RejectReason::Unsigned,
        RejectReason::BadSignature,
        RejectReason::WrongFleet,
        RejectReason::WrongHost,
        RejectReason::Expired,
        RejectReason::NotYetValid,
        RejectReason::StaleEpoch,
        RejectReason::Replayed,
        RejectReason::NotAllowed,
        RejectReason::UnknownPeer,
    ];

    /// The word on the wire, e.g. `not_allowed`.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::Malformed => "malformed",
            RejectReason::Oversized => "oversized",
            RejectReason::UnsupportedVersion => "unsupported_version",
            RejectReason::Unsigned => "unsigned",
            RejectReason::BadSignature => "bad_signature",
            RejectReason::WrongFleet => "wrong_fleet",
            RejectReason::WrongHost => "wrong_host",
            RejectReason::Expired => "expired",
            RejectReason::NotYetValid => "not_yet_valid",
            RejectReason::StaleEpoch => "stale_epoch",
            RejectReason::Replayed => "replayed",
            RejectReason::NotAllowed => "not_allowed",
            RejectReason::UnknownPeer => "unknown_peer",
        }
    }
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Progress of a running task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskProgress {
    /// Task id.
    pub task_id: TaskId,
    /// Task kind.
    pub task_kind: String,
    /// Files seen so far.
    pub files: u64,
    /// Directories seen so far.
    pub dirs: u64,
    /// Bytes seen so far.
    pub bytes: u64,
    /// What it is working on.
    pub current: Option<String>,
    /// Files expected in all, when known (for an ETA).
    #[serde(default)]
    pub files_total: Option<u64>,
    /// Bytes expected in all, when known (for an ETA).
    #[serde(default)]
    pub bytes_total: Option<u64>,
    /// Time since it started.
    pub elapsed_ms: u64,
}

/// The end of a job the coordinator daemon ran (a task plus its retries).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobEnded {
    /// The last task of the job.
    pub task_id: TaskId,
    /// `backup`, `check`, …
    pub job_kind: String,
    /// The plan it belongs to, if any.
    pub plan: Option<String>,
    /// Attempts made.
    pub attempts: u32,
    /// Why it failed or was cancelled.
    pub error: Option<String>,
    /// The snapshot a backup made.
    pub snapshot: Option<SnapshotId>,
}

/// How a task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskOutcome {
    /// Did everything it was asked.
    Succeeded,
    /// Finished, but some items could not be handled (listed in the result).
    Partial,
    /// Did not finish.
    Failed,
    /// Stopped on request; nothing half-done was committed.
    Cancelled,
}

/// The end of a task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskFinished {
    /// Task id.
    pub task_id: TaskId,
    /// Task kind.
    pub task_kind: String,
    /// How it ended.
    pub outcome: TaskOutcome,
    /// What went wrong, when it failed.
    pub error: Option<String>,
    /// Whether running the same task again may succeed.
    pub retryable: bool,
    /// What it produced.
    pub result: Option<TaskResult>,
    /// Time it ran.
    pub duration_ms: u64,
}

impl EventBody {
    /// Every kind an event can have, as [`EventBody::kind`] spells them: what
    /// a subscriber (or a `[[notify]]` route) may ask for. A test checks it
    /// against `kind` for one body of each variant.
    pub const KINDS: &'static [&'static str] = &[
        "agent.online",
        "agent.offline",
        "security.task_rejected",
        "task.started",
        "task.progress",
        "task.finished",
        "check.failed",
        "repair.failed",
        "job.succeeded",
        "job.partial",
        "job.failed",
        "job.cancelled",
        "backup.overdue",
        "copy.overdue",
        "storage.low_space",
        "agent.version_mismatch",
        "coordinator.standby",
        "bus.repaired",
    ];

    /// The dotted kind name, as on the wire and in the subject.
    pub fn kind(&self) -> &'static str {
        match self {
            EventBody::AgentOnline { .. } => "agent.online",
            EventBody::AgentOffline { .. } => "agent.offline",
            EventBody::TaskRejected { .. } => "security.task_rejected",
            EventBody::TaskStarted { .. } => "task.started",
            EventBody::TaskProgress(_) => "task.progress",
            EventBody::TaskFinished(_) => "task.finished",
            EventBody::CheckFailed { .. } => "check.failed",
            EventBody::RepairFailed { .. } => "repair.failed",
            EventBody::JobSucceeded(_) => "job.succeeded",
            EventBody::JobPartial(_) => "job.partial",
            EventBody::JobFailed(_) => "job.failed",
            EventBody::JobCancelled(_) => "job.cancelled",
            EventBody::BackupOverdue { .. } => "backup.overdue",
            EventBody::CopyOverdue { .. } => "copy.overdue",
            EventBody::StorageLowSpace { .. } => "storage.low_space",
            EventBody::AgentVersionMismatch { .. } => "agent.version_mismatch",
            EventBody::CoordinatorStandby { .. } => "coordinator.standby",
            EventBody::BusRepaired { .. } => "bus.repaired",
        }
    }

    /// The task this event is about, if any.
    pub fn task_id(&self) -> Option<&TaskId> {
        match self {
            EventBody::TaskRejected { task_id, .. } => task_id.as_ref(),
            EventBody::TaskStarted { task_id, .. } => Some(task_id),
            EventBody::TaskProgress(p) => Some(&p.task_id),
            EventBody::TaskFinished(f) => Some(&f.task_id),
            EventBody::CheckFailed { task_id, .. } | EventBody::RepairFailed { task_id, .. } => {
                Some(task_id)
            }
            EventBody::JobSucceeded(j)
            | EventBody::JobPartial(j)
            | EventBody::JobFailed(j)
            | EventBody::JobCancelled(j) => Some(&j.task_id),
            EventBody::AgentOnline { .. }
            | EventBody::AgentOffline { .. }
            | EventBody::BackupOverdue { .. }
            | EventBody::CopyOverdue { .. }
            | EventBody::StorageLowSpace { .. }
            | EventBody::AgentVersionMismatch { .. }
            | EventBody::CoordinatorStandby { .. }
            | EventBody::BusRepaired { .. } => None,
        }
    }
}

impl Event {
    /// Subject this event is published on.
    pub fn subject(&self) -> String {
        crate::subject::event(self.body.kind(), &self.host)
    }

    /// Decodes an event, checking size and version.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let ev: Self = codec::decode(bytes, limits::EVENT_BYTES)?;
        codec::check_version(ev.v, EVENT_VERSION)?;
        Ok(ev)
    }

    /// [`Event::decode`] for an event read from `subject`, which must be
    /// the event's own ([`Event::subject`]). The bus lets a host publish
    /// only on its own hosts' subjects, so the subject, not the payload's
    /// `host`, says whom an event came from: one whose payload claims
    /// another host or kind is refused.
    pub fn decode_on(subject: &str, bytes: &[u8]) -> Result<Self, DecodeError> {
        let ev = Self::decode(bytes)?;
        let own = ev.subject();
        if own != subject {
            return Err(DecodeError::WrongSubject {
                subject: subject.to_owned(),
                claimed: own,
            });
        }
        Ok(ev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{encode, EstimateReport};

    fn tid() -> TaskId {
        TaskId::new("t").expect("valid")
    }

    fn sample(body: EventBody) -> Event {
        Event {
            v: EVENT_VERSION,
            id: "e-1".into(),
            time: 1,
            host: HostName::new("nas").expect("valid"),
            severity: Severity::Info,
            message: "hello".into(),
            body,
        }
    }

    #[test]
    fn events_round_trip_with_kind_and_detail_at_top_level() {
        let events = [
            sample(EventBody::AgentOffline {
                reason: OfflineReason::Shutdown,
            }),
            sample(EventBody::TaskFinished(TaskFinished {
                task_id: tid(),
                task_kind: "estimate".into(),
                outcome: TaskOutcome::Succeeded,
                error: None,
                retryable: false,
                result: Some(TaskResult::Estimate(EstimateReport::default())),
                duration_ms: 3,
            })),
            sample(EventBody::TaskRejected {
                task_id: None,
                reason: RejectReason::Replayed,
                detail: "x".into(),
                subject: "flotilla.task.nas".into(),
            }),
        ];
        for ev in events {
            let bytes = encode(&ev).expect("encodes");
            assert_eq!(Event::decode(&bytes).expect("decodes"), ev);
            // A generic MessagePack reader sees `kind` as a top-level string.
            let generic: std::collections::BTreeMap<String, rmpv_like::Value> =
                rmp_serde::from_slice(&bytes).expect("map");
            assert!(
                matches!(generic.get("kind"), Some(rmpv_like::Value::Str(k)) if k == ev.body.kind())
            );
            assert!(generic.contains_key("detail"));
        }
    }

    /// One body of each variant. The match below stops compiling when a
    /// variant is added: add it here and to [`EventBody::KINDS`].
    fn one_of_each() -> Vec<EventBody> {
        fn covered(body: &EventBody) {
            match body {
                EventBody::AgentOnline { .. }
                | EventBody::AgentOffline { .. }
                | EventBody::TaskRejected { .. }
                | EventBody::TaskStarted { .. }
                | EventBody::TaskProgress(_)
                | EventBody::TaskFinished(_)
                | EventBody::CheckFailed { .. }
                | EventBody::RepairFailed { .. }
                | EventBody::JobSucceeded(_)
                | EventBody::JobPartial(_)
                | EventBody::JobFailed(_)
                | EventBody::JobCancelled(_)
                | EventBody::BackupOverdue { .. }
                | EventBody::CopyOverdue { .. }
                | EventBody::StorageLowSpace { .. }
                | EventBody::AgentVersionMismatch { .. }
                | EventBody::CoordinatorStandby { .. }
                | EventBody::BusRepaired { .. } => {}
            }
        }
        let ended = JobEnded {
            task_id: tid(),
            job_kind: "backup".into(),
            plan: None,
            attempts: 1,
            error: None,
            snapshot: None,
        };
        let bodies = vec![
            EventBody::AgentOnline {
                version: "1".into(),
                roles: Vec::new(),
                quic_addr: None,
            },
            EventBody::AgentOffline {
                reason: OfflineReason::Shutdown,
            },
            EventBody::CoordinatorStandby {
                instance: "nas-1".into(),
                holder: Some("squatter".into()),
                standby_secs: 45,
                why: "no fleet status".into(),
            },
            EventBody::TaskRejected {
                task_id: None,
                reason: RejectReason::Expired,
                detail: String::new(),
                subject: String::new(),
            },
            EventBody::TaskStarted {
                task_id: tid(),
                task_kind: "backup".into(),
            },
            EventBody::TaskProgress(TaskProgress {
                task_id: tid(),
                task_kind: "backup".into(),
                files: 0,
                dirs: 0,
                bytes: 0,
                current: None,
                files_total: None,
                bytes_total: None,
                elapsed_ms: 0,
            }),
            EventBody::TaskFinished(TaskFinished {
                task_id: tid(),
                task_kind: "backup".into(),
                outcome: TaskOutcome::Failed,
                error: None,
                retryable: false,
                result: None,
                duration_ms: 0,
            }),
            EventBody::CheckFailed {
                task_id: tid(),
                problems: 1,
                damaged_blobs: Vec::new(),
                affected_snapshots: Vec::new(),
            },
            EventBody::RepairFailed {
                task_id: tid(),
                lost: 1,
                lost_blobs: vec!["ab".repeat(32)],
                affected_snapshots: vec![SnapshotId::random()],
                problems: Vec::new(),
            },
            EventBody::JobSucceeded(ended.clone()),
            EventBody::JobPartial(ended.clone()),
            EventBody::JobFailed(ended.clone()),
            EventBody::JobCancelled(ended),
            EventBody::BackupOverdue {
                plan: "p".into(),
                last_success: None,
                rpo_secs: 1,
            },
            EventBody::CopyOverdue {
                plan: "p".into(),
                storage: "offsite".into(),
                last_copied: Some(1),
                rpo_secs: 1,
            },
            EventBody::StorageLowSpace {
                path: "/".into(),
                free_bytes: 0,
                total_bytes: 1,
            },
            EventBody::AgentVersionMismatch {
                agent_version: "1".into(),
                coordinator_version: "2".into(),
            },
            EventBody::BusRepaired {
                findings: vec!["stream FLOTILLA_TASKS: missing -> created".into()],
            },
        ];
        bodies.iter().for_each(covered);
        bodies
    }

    #[test]
    fn an_event_is_believed_only_on_its_own_subject() {
        let ev = Event {
            v: EVENT_VERSION,
            id: "e1".into(),
            time: 1,
            host: HostName::new("web").expect("valid"),
            severity: Severity::Info,
            message: "m".into(),
            body: EventBody::BackupOverdue {
                plan: "p".into(),
                last_success: None,
                rpo_secs: 1,
            },
        };
        let bytes = encode(&ev).expect("encodes");
        let own = "flotilla.events.backup.overdue.web";
        assert_eq!(Event::decode_on(own, &bytes).expect("its own subject"), ev);
        for other in [
            "flotilla.events.backup.overdue.nas",
            "flotilla.events.job.succeeded.web",
            "flotilla.events.backup.overdue.web.x",
        ] {
            let err = Event::decode_on(other, &bytes).expect_err(other);
            assert!(
                err.to_string().contains(own) && err.to_string().contains(other),
                "{err}"
            );
        }
    }

    #[test]
    fn kinds_lists_each_variant_kind_once() {
        let bodies = one_of_each();
        let kinds: Vec<&str> = bodies.iter().map(EventBody::kind).collect();
        // One body per variant, each of a different kind...
        let distinct: std::collections::BTreeSet<&str> = kinds.iter().copied().collect();
        assert_eq!(distinct.len(), bodies.len(), "{kinds:?}");
        // ...and KINDS is exactly those kinds, each once.
        let listed: std::collections::BTreeSet<&str> = EventBody::KINDS.iter().copied().collect();
        assert_eq!(
            listed.len(),
            EventBody::KINDS.len(),
            "a kind is listed twice"
        );
        assert_eq!(listed, distinct);
    }

    /// The two `agent.*` bodies as they were before `reason` and
    /// `quic_addr` were typed.
    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    #[serde(tag = "kind", content = "detail")]
    enum OldBody {
        #[serde(rename = "agent.online")]
        AgentOnline {
            version: String,
            roles: Vec<Role>,
            quic_addr: Option<String>,
        },
        #[serde(rename = "agent.offline")]
        AgentOffline { reason: String },
    }

    #[test]
    fn offline_reasons_and_addresses_keep_their_old_wire_form() {
        for (reason, word) in [
            (OfflineReason::Shutdown, "shutdown"),
            (OfflineReason::MissedHeartbeats, "missed_heartbeats"),
        ] {
            let old = encode(&OldBody::AgentOffline {
                reason: word.into(),
            })
            .expect("encodes");
            let new = EventBody::AgentOffline { reason };
            assert_eq!(encode(&new).expect("encodes"), old);
            assert_eq!(
                rmp_serde::from_slice::<EventBody>(&old).expect("decodes"),
                new
            );
        }
        assert_eq!(OfflineReason::KNOWN.len(), 2);
        for quic_addr in [Some("192.0.2.7:7443"), Some("[2001:db8::7]:7443"), None] {
            let old = encode(&OldBody::AgentOnline {
                version: "1".into(),
                roles: vec![Role::Storage],
                quic_addr: quic_addr.map(Into::into),
            })
            .expect("encodes");
            let new: EventBody = rmp_serde::from_slice(&old).expect("decodes");
            let EventBody::AgentOnline { quic_addr: got, .. } = &new else {
                panic!("not agent.online: {new:?}");
            };
            assert_eq!(got.map(|a| a.to_string()).as_deref(), quic_addr);
            assert_eq!(encode(&new).expect("encodes"), old);
        }
    }

    #[test]
    fn reject_reasons_display_as_their_wire_word() {
        for reason in RejectReason::ALL {
            let wire = serde_json::to_value(reason).expect("json");
            assert_eq!(wire.as_str(), Some(reason.as_str()));
            assert_eq!(reason.to_string(), reason.as_str());
        }
        assert_eq!(RejectReason::NotAllowed.to_string(), "not_allowed");
    }

    #[test]
    fn an_unknown_offline_reason_still_decodes() {
        let old = encode(&OldBody::AgentOffline {
            reason: "evicted".into(),
        })
        .expect("encodes");
        let new: EventBody = rmp_serde::from_slice(&old).expect("decodes");
        assert_eq!(
            new,
            EventBody::AgentOffline {
                reason: OfflineReason::Other("evicted".into())
            }
        );
        assert_eq!(encode(&new).expect("encodes"), old);
    }

    #[test]
    fn an_online_event_with_an_unparsable_address_is_refused() {
        let old = encode(&OldBody::AgentOnline {
            version: "1".into(),
            roles: Vec::new(),
            quic_addr: Some("nas:7443".into()),
        })
        .expect("encodes");
        assert!(rmp_serde::from_slice::<EventBody>(&old).is_err());
    }

    /// Just enough of a dynamic value to look at the top-level map.
    mod rmpv_like {
        use serde::Deserialize;

        #[derive(Debug, Deserialize)]
        #[serde(untagged)]
        pub enum Value {
            Str(String),
            Other(serde::de::IgnoredAny),
        }
    }
}
