//! The task lifecycle as decisions without I/O.
//!
//! A task meets the agent at four moments: a stream message brings it
//! ([`intake`]), it starts ([`start`]), it ends ([`finish`]), or the journal
//! hands it back after a restart ([`resume`]). At each, what the agent knows
//! (the journal's record, how the run ended, whether a `cancel` task or
//! shutdown stopped it, whether it has expired) goes in, and a [`Decision`]
//! comes out: the journal status to write, the event to publish, what to
//! answer JetStream, and whether to run the task. `jobs.rs` performs the
//! decision in that order (journal, event, reply, run) and decides nothing
//! itself, so every rule below is tested here without NATS, sled or QUIC.
//!
//! The rules, in short:
//! - a task is run only if it verified, is journalled, is not final and is
//!   not already running here; a final task (succeeded, partial, failed,
//!   **cancelled**) is never run again, whether redelivered or resumed;
//! - a task stopped by a `cancel` task ends `cancelled`; one stopped by
//!   shutdown is left `running` in the journal, with no event, so that it
//!   resumes on the next start;
//! - a task that ran to its end reports what it did, even when a cancel or
//!   shutdown arrived too late to stop it;
//! - a task resumed after its expiry is not run: it ends `failed`
//!   (permanent) with one `task.finished`, as it would have been refused had
//!   it arrived now.

use flotilla_protocol::{
    verify_task, HostName, PublicKey, RejectReason, Severity, TaskBody, TaskFinished, TaskId,
    TaskOutcome, TaskResult, TaskVerifyError, UnixMillis,
};

use crate::state::JobStatus;

/// The error of a task that expired while the agent was not running.
pub(crate) const EXPIRED_WHILE_DOWN: &str = "expired while the agent was down";
/// The error of a task stopped by a `cancel` task.
pub(crate) const CANCELLED_ON_REQUEST: &str = "cancelled on request";

/// What to answer JetStream about a task message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reply {
    /// Acknowledge: the journal holds the task, the stream may forget it.
    Ack,
    /// Terminate: the message is refused and must never be redelivered.
    Term,
    /// Ask for redelivery later: the journal could not record the task.
    Nak,
}

/// A `security.task_rejected` event to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rejection {
    /// The task's id, when it got far enough to be trusted with one.
    pub task_id: Option<TaskId>,
    pub reason: RejectReason,
    pub detail: String,
}

/// An event a decision publishes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Publish {
    /// `task.started`.
    Started { task_id: TaskId, task_kind: String },
    /// `task.finished`, with the event's severity and human message (boxed:
    /// it carries the task's whole result).
    Finished {
        severity: Severity,
        message: String,
        finished: Box<TaskFinished>,
    },
    /// `security.task_rejected`.
    Rejected(Rejection),
}

/// What the agent does at one moment of a task's life, in this order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Decision {
    /// Journal status (and error) to write, if any.
    pub journal: Option<(JobStatus, Option<String>)>,
    /// Event to publish, if any.
    pub publish: Option<Publish>,
    /// What to answer the stream; only at intake.
    pub reply: Option<Reply>,
    /// Whether to run (or resume) the task.
    pub run: bool,
}

impl Decision {
    /// Nothing at all: the journal keeps what it has.
    const NOTHING: Decision = Decision {
        journal: None,
        publish: None,
        reply: None,
        run: false,
    };

    /// The `task.finished` event of this decision, if it publishes one.
    #[cfg(test)]
    fn finished(&self) -> Option<&TaskFinished> {
        match &self.publish {
            Some(Publish::Finished { finished, .. }) => Some(finished),
            _ => None,
        }
    }
}

/// The task a decision is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Task<'a> {
    pub id: &'a TaskId,
    pub kind: &'static str,
}

impl<'a> Task<'a> {
    pub(crate) fn of(body: &'a TaskBody) -> Self {
        Task {
            id: &body.id,
            kind: body.kind.name(),
        }
    }
}

/// What is known when a stream message arrives: whether it verified and, if
/// it did, what the journal made of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Intake {
    /// The envelope did not verify (signature, fleet, host, validity window).
    Refused(Rejection),
    /// First time this id is seen; it is journalled now (`received`).
    New,
    /// The same stream message again (the acknowledgement was lost, or the
    /// agent died before it): the journal's status of the task, and whether
    /// it is running in this process now.
    Redelivered {
        status: JobStatus,
        running_here: bool,
    },
    /// The same task id in another stream message: a replay.
    Replayed {
        task_id: TaskId,
        stored_seq: u64,
        seq: u64,
    },
    /// The journal could not record the task (disk full, I/O error).
    JournalFailed,
}

/// Decides what to do with a stream message. The journal was written (or
/// not) by [`crate::state::State::accept`] before this.
pub(crate) fn intake(intake: Intake) -> Decision {
    match intake {
        Intake::Refused(rejection) => Decision {
            publish: Some(Publish::Rejected(rejection)),
            reply: Some(Reply::Term),
            ..Decision::NOTHING
        },
        Intake::New => Decision {
            reply: Some(Reply::Ack),
            run: true,
            ..Decision::NOTHING
        },
        // Acknowledged either way: the journal already holds it. Run only
        // what never ended and is not running now.
        Intake::Redelivered {
            status,
            running_here,
        } => Decision {
            reply: Some(Reply::Ack),
            run: !status.is_final() && !running_here,
            ..Decision::NOTHING
        },
        Intake::Replayed {
            task_id,
            stored_seq,
            seq,
        } => Decision {
            publish: Some(Publish::Rejected(Rejection {
                detail: format!(
                    "task {task_id} was already received in stream message {stored_seq} (now {seq})"
                ),
                task_id: Some(task_id),
                reason: RejectReason::Replayed,
            })),
            reply: Some(Reply::Term),
            ..Decision::NOTHING
        },
        // Not acknowledged: the stream redelivers it once the disk recovers.
        Intake::JournalFailed => Decision {
            reply: Some(Reply::Nak),
            ..Decision::NOTHING
        },
    }
}

/// Decides what starting a task records: `running` in the journal (so a
/// crash from here on resumes it) and `task.started`.
pub(crate) fn start(task: Task<'_>) -> Decision {
    Decision {
        journal: Some((JobStatus::Running, None)),
        publish: Some(Publish::Started {
            task_id: task.id.clone(),
            task_kind: task.kind.to_owned(),
        }),
        ..Decision::NOTHING
    }
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Ran {
    /// It ran to its end: the runner's verdict and report.
    Done(TaskOutcome, TaskResult),
    /// It stopped with an error.
    Failed { error: String, retryable: bool },
}

/// Whether something asked the task to stop while it ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    /// Nobody did.
    No,
    /// A signed `cancel` task did.
    Cancelled,
    /// The agent is shutting down.
    Shutdown,
}

impl Stop {
    /// From the task's cancellation flag and whether a `cancel` task set it.
    pub(crate) fn from_flags(flag_set: bool, asked: bool) -> Self {
        match (flag_set, asked) {
            (false, _) => Stop::No,
            (true, true) => Stop::Cancelled,
            (true, false) => Stop::Shutdown,
        }
    }
}

/// Decides how a run that ended is recorded.
pub(crate) fn finish(task: Task<'_>, ran: Ran, stop: Stop, duration_ms: u64) -> Decision {
    match (ran, stop) {
        // Ran to its end: what it did stands, even if a stop came too late.
        (Ran::Done(outcome, result), _) => {
            let error = (outcome == TaskOutcome::Failed).then(|| failure_text(&result));
            ended(task, outcome, Some(result), error, false, duration_ms)
        }
        (Ran::Failed { .. }, Stop::Cancelled) => ended(
            task,
            TaskOutcome::Cancelled,
            None,
            Some(CANCELLED_ON_REQUEST.into()),
            false,
            duration_ms,
        ),
        // Interrupted by shutdown: the journal keeps it `running` and no
        // event says it ended, because it has not: it resumes on the next start.
        (Ran::Failed { .. }, Stop::Shutdown) => Decision::NOTHING,
        (Ran::Failed { error, retryable }, Stop::No) => ended(
            task,
            TaskOutcome::Failed,
            None,
            Some(error),
            retryable,
            duration_ms,
        ),
    }
}

/// Decides what to do with a task the journal holds at startup. `expired`
/// says whether the task's validity ended (see [`verify_resumed`]).
pub(crate) fn resume(task: Task<'_>, status: JobStatus, expired: bool) -> Decision {
    if status.is_final() {
        // It ended before the restart (cancelled included): nothing to redo
        // and nothing to report again.
        return Decision::NOTHING;
    }
    if expired {
        // It would be refused if it arrived now, so it must not start now.
        // Not retryable: the coordinator sends a new task if it still wants one.
        return ended(
            task,
            TaskOutcome::Failed,
            None,
            Some(EXPIRED_WHILE_DOWN.into()),
            false,
            0,
        );
    }
    Decision {
        run: true,
        ..Decision::NOTHING
    }
}

/// A journalled task checked again at startup.
#[derive(Debug)]
pub(crate) struct Resumed {
    pub body: TaskBody,
    /// Whether its validity ended by `now`.
    pub expired: bool,
}

/// Verifies a journalled envelope again: as of `received_at` (the signature
/// is the proof the task is the coordinator's; it was valid when it came),
/// and once more as of `now` to learn whether it has expired since, by the
/// same rule (and clock tolerance) as a task arriving now.
pub(crate) fn verify_resumed(
    envelope: &[u8],
    key: &PublicKey,
    fleet: &str,
    host: &HostName,
    received_at: UnixMillis,
    now: UnixMillis,
) -> Result<Resumed, TaskVerifyError> {
    let body = verify_task(envelope, key, fleet, host, received_at)?;
    let expired = matches!(
        verify_task(envelope, key, fleet, host, now),
        Err(TaskVerifyError::Expired { .. })
    );
    Ok(Resumed { body, expired })
}

/// The decision of a task that ended: its final status and `task.finished`.
fn ended(
    task: Task<'_>,
    outcome: TaskOutcome,
    result: Option<TaskResult>,
    error: Option<String>,
    retryable: bool,
    duration_ms: u64,
) -> Decision {
    let (id, kind) = (task.id, task.kind);
    let status = match outcome {
        TaskOutcome::Succeeded => JobStatus::Succeeded,
        TaskOutcome::Partial => JobStatus::Partial,
        TaskOutcome::Failed => JobStatus::Failed,
        TaskOutcome::Cancelled => JobStatus::Cancelled,
    };
    let severity = match outcome {
        TaskOutcome::Succeeded => Severity::Info,
        TaskOutcome::Partial | TaskOutcome::Cancelled => Severity::Warning,
        TaskOutcome::Failed => Severity::Error,
    };
    let message = match (outcome, &error) {
        (TaskOutcome::Cancelled, _) => {
            format!("{kind} task {id} cancelled; nothing half-done was committed")
        }
        (_, Some(e)) => format!("{kind} task {id} failed: {e}"),
        (TaskOutcome::Partial, None) => {
            format!("{kind} task {id} finished, but some items were skipped")
        }
        (_, None) => format!("{kind} task {id} succeeded"),
    };
    // The journal records the error of a failed task, not the note of a
    // cancelled one (as before the lifecycle was split out).
    let journal_error = if outcome == TaskOutcome::Cancelled {
        None
    } else {
        error.clone()
    };
    Decision {
        journal: Some((status, journal_error)),
        publish: Some(Publish::Finished {
            severity,
            message,
            finished: Box::new(TaskFinished {
                task_id: id.clone(),
                task_kind: kind.to_owned(),
                outcome,
                retryable,
                error,
                result,
                duration_ms,
            }),
        }),
        ..Decision::NOTHING
    }
}

/// The error line of a task that ran to the end but failed (a check that
/// found problems).
fn failure_text(result: &TaskResult) -> String {
    match result {
        TaskResult::Check(r) => format!(
            "repository check found {} problem(s); {} blob(s) damaged or missing, {} snapshot(s) affected",
            r.problems.len(),
            r.damaged_blobs.len(),
            r.affected_snapshots.len()
        ),
        TaskResult::Repair(r) if r.blobs_lost == 0 => format!(
            "repository repair could not do all it should: {} problem(s)",
            r.problems.len()
        ),
        TaskResult::Repair(r) => {
            let mut line = format!(
                "repository repair left {} blob(s) lost (no copy left; a backup of a host that \
                 still has the data uploads them again), {} snapshot(s) affected",
                r.blobs_lost, r.snapshots_affected
            );
            if !r.problems.is_empty() {
                line.push_str(&format!(", {} problem(s)", r.problems.len()));
            }
            line
        }
        TaskResult::Copy(r) => format!(
            "copy to {} copied none of {} snapshot(s); first: {}",
            r.to,
            r.snapshots_selected.max(r.snapshots_failed),
            r.failed.first().map_or("-", String::as_str)
        ),
        _ => "failed".into(),
    }
}

#[cfg(test)]
mod tests {
    use flotilla_protocol::repo::{BlobId, CheckReport, Problem, RepairReport};
    use flotilla_protocol::{
        sign_task, CancelReport, SigningSeed, SnapshotId, TaskKind, TASK_VERSION,
    };

    use std::sync::LazyLock;

    use super::*;

    const ALL: [JobStatus; 6] = [
        JobStatus::Received,
        JobStatus::Running,
        JobStatus::Succeeded,
        JobStatus::Partial,
        JobStatus::Failed,
        JobStatus::Cancelled,
    ];
    const FINAL: [JobStatus; 4] = [
        JobStatus::Succeeded,
        JobStatus::Partial,
        JobStatus::Failed,
        JobStatus::Cancelled,
    ];

    fn tid(id: &str) -> TaskId {
        TaskId::new(id).expect("valid")
    }

    static T1: LazyLock<TaskId> = LazyLock::new(|| tid("t1"));
    static C1: LazyLock<TaskId> = LazyLock::new(|| tid("c1"));
    static C2: LazyLock<TaskId> = LazyLock::new(|| tid("c2"));

    fn task() -> Task<'static> {
        Task {
            id: &T1,
            kind: "backup",
        }
    }

    fn cancel_result() -> TaskResult {
        TaskResult::Cancel(CancelReport {
            task_id: tid("t0"),
            was_running: true,
        })
    }

    fn failed(retryable: bool) -> Ran {
        Ran::Failed {
            error: "storage unreachable".into(),
            retryable,
        }
    }

    /// The one `task.finished` of `d`, which must end the task.
    fn finished(d: &Decision) -> &TaskFinished {
        d.finished().expect("a task.finished event")
    }

    #[test]
    fn final_statuses_are_exactly_the_four_ends() {
        for status in ALL {
            assert_eq!(status.is_final(), FINAL.contains(&status), "{status:?}");
        }
    }

    #[test]
    fn a_new_task_is_acknowledged_and_run() {
        let d = intake(Intake::New);
        assert_eq!(d.reply, Some(Reply::Ack));
        assert!(d.run);
        assert_eq!(d.journal, None, "accept journalled it already");
        assert_eq!(d.publish, None);
    }

    #[test]
    fn a_refused_task_is_terminated_with_one_rejection_and_never_run() {
        let rejection = Rejection {
            task_id: Some(tid("t1")),
            reason: RejectReason::Expired,
            detail: "expired".into(),
        };
        let d = intake(Intake::Refused(rejection.clone()));
        assert_eq!(d.reply, Some(Reply::Term));
        assert_eq!(d.publish, Some(Publish::Rejected(rejection)));
        assert!(!d.run);
        assert_eq!(d.journal, None);
    }

    #[test]
    fn a_replay_is_terminated_and_rejected_as_replayed() {
        let d = intake(Intake::Replayed {
            task_id: tid("t1"),
            stored_seq: 7,
            seq: 9,
        });
        assert_eq!(d.reply, Some(Reply::Term));
        assert!(!d.run);
        let Some(Publish::Rejected(r)) = &d.publish else {
            panic!("expected a rejection, got {:?}", d.publish);
        };
        assert_eq!(r.reason, RejectReason::Replayed);
        assert_eq!(r.task_id, Some(tid("t1")));
        assert!(
            r.detail.contains("stream message 7 (now 9)"),
            "{}",
            r.detail
        );
    }

    #[test]
    fn a_task_the_journal_cannot_take_is_nakked_not_run() {
        let d = intake(Intake::JournalFailed);
        assert_eq!(d.reply, Some(Reply::Nak));
        assert!(!d.run);
        assert_eq!(d.publish, None);
    }

    #[test]
    fn a_redelivery_runs_only_an_unfinished_task_not_running_here() {
        for status in ALL {
            for running_here in [false, true] {
                let d = intake(Intake::Redelivered {
                    status,
                    running_here,
                });
                assert_eq!(d.reply, Some(Reply::Ack), "{status:?} {running_here}");
                assert_eq!(d.publish, None, "{status:?} {running_here}");
                assert_eq!(d.journal, None, "{status:?} {running_here}");
                let expect_run =
                    matches!(status, JobStatus::Received | JobStatus::Running) && !running_here;
                assert_eq!(d.run, expect_run, "{status:?} running_here={running_here}");
            }
        }
    }

    #[test]
    fn a_redelivered_cancelled_task_is_not_run_again() {
        let d = intake(Intake::Redelivered {
            status: JobStatus::Cancelled,
            running_here: false,
        });
        assert!(!d.run);
        assert_eq!(d.reply, Some(Reply::Ack));
    }

    #[test]
    fn starting_journals_running_and_publishes_started() {
        let d = start(task());
        assert_eq!(d.journal, Some((JobStatus::Running, None)));
        assert_eq!(
            d.publish,
            Some(Publish::Started {
                task_id: tid("t1"),
                task_kind: "backup".into()
            })
        );
        assert!(!d.run);
        assert_eq!(d.reply, None);
    }

    #[test]
    fn a_run_to_its_end_reports_its_outcome_whatever_stopped_it() {
        let cases = [
            (TaskOutcome::Succeeded, JobStatus::Succeeded, Severity::Info),
            (TaskOutcome::Partial, JobStatus::Partial, Severity::Warning),
            (TaskOutcome::Failed, JobStatus::Failed, Severity::Error),
        ];
        for (outcome, status, severity) in cases {
            for stop in [Stop::No, Stop::Cancelled, Stop::Shutdown] {
                let d = finish(task(), Ran::Done(outcome, cancel_result()), stop, 42);
                let f = finished(&d);
                assert_eq!(f.outcome, outcome, "{outcome:?} {stop:?}");
                assert!(!f.retryable, "{outcome:?} {stop:?}");
                assert_eq!(f.result, Some(cancel_result()));
                assert_eq!(f.duration_ms, 42);
                let Some(Publish::Finished { severity: s, .. }) = &d.publish else {
                    unreachable!("checked above");
                };
                assert_eq!(*s, severity, "{outcome:?} {stop:?}");
                let error = (outcome == TaskOutcome::Failed).then(|| "failed".to_string());
                assert_eq!(f.error, error);
                assert_eq!(d.journal, Some((status, error)), "{outcome:?} {stop:?}");
                assert!(!d.run);
            }
        }
    }

    #[test]
    fn a_check_that_found_damage_fails_with_its_counts() {
        let report = CheckReport::default();
        let d = finish(
            Task {
                id: &C1,
                kind: "check",
            },
            Ran::Done(TaskOutcome::Failed, TaskResult::Check(report)),
            Stop::No,
            5,
        );
        let f = finished(&d);
        let error = f.error.as_deref().expect("an error line");
        assert!(
            error.starts_with("repository check found 0 problem(s)"),
            "{error}"
        );
        assert_eq!(d.journal.as_ref().map(|(s, _)| *s), Some(JobStatus::Failed));

        // A truncated index: the line counts the blobs the findings name.
        let missing = |b: u8| Problem {
            kind: "blob_missing".into(),
            pack: None,
            blob: Some(BlobId([b; 32])),
            message: "snapshot references a blob no index lists".into(),
        };
        let report = CheckReport {
            problems: vec![
                Problem {
                    kind: "idx_unreadable".into(),
                    pack: Some("ab".repeat(32)),
                    blob: None,
                    message: "truncated".into(),
                },
                missing(1),
                missing(2),
            ],
            damaged_blobs: vec![BlobId([1; 32]), BlobId([2; 32])],
            affected_snapshots: vec!["a".repeat(32)],
            ..CheckReport::default()
        };
        let d = finish(
            Task {
                id: &C2,
                kind: "check",
            },
            Ran::Done(TaskOutcome::Failed, TaskResult::Check(report)),
            Stop::No,
            5,
        );
        assert_eq!(
            finished(&d).error.as_deref(),
            Some(
                "repository check found 3 problem(s); 2 blob(s) damaged or missing, \
                 1 snapshot(s) affected"
            )
        );
    }

    #[test]
    fn a_repair_that_left_blobs_lost_fails_for_good_with_its_counts() {
        // The lists are cut to fit an event; the line counts them all.
        let report = RepairReport {
            packs_damaged: 1,
            packs_dropped: 1,
            blobs_lost: 3,
            lost_blobs: vec![BlobId([1; 32])],
            snapshots_affected: 2,
            affected_snapshots: vec![SnapshotId::random()],
            ..RepairReport::default()
        };
        let d = finish(
            Task {
                id: &C1,
                kind: "repair",
            },
            Ran::Done(TaskOutcome::Failed, TaskResult::Repair(report.clone())),
            // A cancel that came too late changes nothing: it ran to its end.
            Stop::Cancelled,
            5,
        );
        let f = finished(&d);
        assert_eq!(f.outcome, TaskOutcome::Failed);
        assert!(!f.retryable, "running it again finds the same");
        assert_eq!(f.result, Some(TaskResult::Repair(report.clone())));
        let error = f.error.as_deref().expect("an error line");
        assert!(
            error.starts_with("repository repair left 3 blob(s) lost")
                && error.ends_with("2 snapshot(s) affected"),
            "{error}"
        );
        assert_eq!(d.journal.as_ref().map(|(s, _)| *s), Some(JobStatus::Failed));

        let problems = RepairReport {
            problems: vec!["pack ab kept: cannot read it".into()],
            ..report
        };
        let d = finish(
            Task {
                id: &C2,
                kind: "repair",
            },
            Ran::Done(TaskOutcome::Failed, TaskResult::Repair(problems)),
            Stop::No,
            5,
        );
        let error = finished(&d).error.clone().unwrap_or_default();
        assert!(error.ends_with(", 1 problem(s)"), "{error}");

        // Nothing lost, but a pack kept that could not be read.
        let kept = RepairReport {
            problems: vec!["pack ab kept: cannot read it".into()],
            ..RepairReport::default()
        };
        let d = finish(
            Task {
                id: &C2,
                kind: "repair",
            },
            Ran::Done(TaskOutcome::Failed, TaskResult::Repair(kept)),
            Stop::No,
            5,
        );
        assert_eq!(
            finished(&d).error.as_deref(),
            Some("repository repair could not do all it should: 1 problem(s)")
        );
    }

    #[test]
    fn a_failure_keeps_its_retry_classification() {
        for retryable in [true, false] {
            let d = finish(task(), failed(retryable), Stop::No, 7);
            let f = finished(&d);
            assert_eq!(f.outcome, TaskOutcome::Failed);
            assert_eq!(f.retryable, retryable);
            assert_eq!(f.error.as_deref(), Some("storage unreachable"));
            assert_eq!(f.result, None);
            assert_eq!(
                d.journal,
                Some((JobStatus::Failed, Some("storage unreachable".into())))
            );
            let Some(Publish::Finished {
                severity, message, ..
            }) = &d.publish
            else {
                unreachable!("checked above");
            };
            assert_eq!(*severity, Severity::Error);
            assert_eq!(message, "backup task t1 failed: storage unreachable");
        }
    }

    #[test]
    fn a_task_stopped_by_a_cancel_task_ends_cancelled_and_not_retryable() {
        for retryable in [true, false] {
            let d = finish(task(), failed(retryable), Stop::Cancelled, 9);
            let f = finished(&d);
            assert_eq!(f.outcome, TaskOutcome::Cancelled);
            assert!(!f.retryable);
            assert_eq!(f.error.as_deref(), Some(CANCELLED_ON_REQUEST));
            assert_eq!(d.journal, Some((JobStatus::Cancelled, None)));
            let Some(Publish::Finished { severity, .. }) = &d.publish else {
                unreachable!("checked above");
            };
            assert_eq!(*severity, Severity::Warning);
        }
    }

    #[test]
    fn a_task_stopped_by_shutdown_writes_nothing_and_publishes_nothing() {
        for retryable in [true, false] {
            let d = finish(task(), failed(retryable), Stop::Shutdown, 9);
            assert_eq!(d, Decision::NOTHING, "it stays running and resumes");
        }
    }

    #[test]
    fn the_stop_comes_from_the_flag_and_who_set_it() {
        assert_eq!(Stop::from_flags(false, false), Stop::No);
        assert_eq!(Stop::from_flags(false, true), Stop::No);
        assert_eq!(Stop::from_flags(true, true), Stop::Cancelled);
        assert_eq!(Stop::from_flags(true, false), Stop::Shutdown);
    }

    #[test]
    fn an_unfinished_task_in_time_resumes_without_a_journal_write_or_event() {
        for status in [JobStatus::Received, JobStatus::Running] {
            let d = resume(task(), status, false);
            assert!(d.run, "{status:?}");
            assert_eq!(d.journal, None);
            assert_eq!(d.publish, None);
            assert_eq!(d.reply, None);
        }
    }

    #[test]
    fn a_final_task_is_never_resumed_expired_or_not() {
        for status in FINAL {
            for expired in [false, true] {
                let d = resume(task(), status, expired);
                assert_eq!(d, Decision::NOTHING, "{status:?} expired={expired}");
            }
        }
    }

    #[test]
    fn cancelled_stays_cancelled_across_a_restart() {
        // The run: a cancel task stops it; it is journalled cancelled.
        let ended = finish(task(), failed(true), Stop::Cancelled, 3);
        let (status, _) = ended.journal.clone().expect("journalled");
        assert_eq!(status, JobStatus::Cancelled);
        // The restart: the journal hands it back; it is not run, not reported.
        let resumed = resume(task(), status, false);
        assert!(!resumed.run);
        assert_eq!(resumed.publish, None, "no second task.finished");
        assert_eq!(resumed.journal, None);
        // The stream redelivers its message: acknowledged, not run.
        let redelivered = intake(Intake::Redelivered {
            status,
            running_here: false,
        });
        assert!(!redelivered.run);
        assert_eq!(redelivered.reply, Some(Reply::Ack));
        assert_eq!(redelivered.publish, None);
    }

    #[test]
    fn a_resumed_task_past_its_expiry_is_not_run_and_ends_failed_once() {
        for status in [JobStatus::Received, JobStatus::Running] {
            let d = resume(task(), status, true);
            assert!(!d.run, "{status:?}");
            assert_eq!(
                d.journal,
                Some((JobStatus::Failed, Some(EXPIRED_WHILE_DOWN.into())))
            );
            let f = finished(&d);
            assert_eq!(f.outcome, TaskOutcome::Failed);
            assert!(!f.retryable, "permanent");
            assert_eq!(f.error.as_deref(), Some(EXPIRED_WHILE_DOWN));
            assert_eq!(f.task_id, "t1");
            assert_eq!(f.task_kind, "backup");
            // And the failed entry is final: the next restart leaves it alone.
            let again = resume(task(), JobStatus::Failed, true);
            assert_eq!(again, Decision::NOTHING);
        }
    }

    const NOW: UnixMillis = 1_700_000_000_000;
    const HOUR: UnixMillis = 3_600_000;

    fn journalled(seed: &SigningSeed, host: &HostName, expires_at: UnixMillis) -> Vec<u8> {
        let body = TaskBody {
            v: TASK_VERSION,
            id: tid("t1"),
            fleet: "f".into(),
            host: host.clone(),
            issued_at: NOW,
            expires_at,
            kind: TaskKind::Estimate {
                paths: vec!["/srv".into()],
            },
            epoch: None,
        };
        let envelope = sign_task(seed, &body).expect("signs");
        flotilla_protocol::encode(&envelope).expect("encodes")
    }

    #[test]
    fn a_resumed_task_is_checked_at_receipt_and_expires_by_now() {
        let seed = SigningSeed([7; 32]);
        let key = seed.public_key();
        let host = HostName::new("alpha").expect("host name");
        let envelope = journalled(&seed, &host, NOW + HOUR);
        let received = NOW + 1;

        let soon = verify_resumed(&envelope, &key, "f", &host, received, NOW + 2).expect("ok");
        assert!(!soon.expired);
        assert_eq!(soon.body.id, "t1");

        let day_later = NOW + 24 * HOUR;
        let late = verify_resumed(&envelope, &key, "f", &host, received, day_later).expect("ok");
        assert!(late.expired, "a day past a one-hour validity");

        // Signed by another key: it does not verify at all.
        let other = SigningSeed([8; 32]).public_key();
        assert!(verify_resumed(&envelope, &other, "f", &host, received, NOW + 2).is_err());
    }
}
