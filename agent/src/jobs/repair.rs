//! The `repair` task on a storage host.

use flotilla_protocol::{EventBody, Severity, TaskBody, TaskOutcome, TaskResult};

use super::prune::on_repository;
use super::Agent;
use super::JobError;

/// Lost blobs listed in the result (the count is always complete). With the
/// other lists, this keeps a `task.finished` well inside the event size
/// limit: 2,048 ids are about 70 KiB.
const MAX_LOST_LISTED: usize = 2048;
/// Affected snapshots listed in the result and the event.
const MAX_SNAPSHOTS_LISTED: usize = 1000;
/// Problems listed in the result.
const MAX_PROBLEMS_LISTED: usize = 200;
/// Lost blob ids and problems listed in the event.
const MAX_IN_EVENT: usize = 100;

impl Agent {
    /// Repairs this host's repository. Succeeds when nothing is lost and
    /// nothing was left undone; otherwise fails (not retryable: running it
    /// again finds the same) with the report, after a `repair.failed` event.
    /// A repository that cannot be listed or written (a full disk) fails it
    /// as the error says, with nothing dropped whose blobs were not copied.
    pub(super) async fn repair(
        &self,
        body: &TaskBody,
        read_data: bool,
    ) -> Result<(TaskOutcome, TaskResult), JobError> {
        let repo = self.repository()?;
        let mut report = on_repository("repair", move || repo.repair(read_data)).await?;
        report.lost_blobs.truncate(MAX_LOST_LISTED);
        report.affected_snapshots.truncate(MAX_SNAPSHOTS_LISTED);
        report.problems.truncate(MAX_PROBLEMS_LISTED);
        if report.is_ok() {
            return Ok((TaskOutcome::Succeeded, TaskResult::Repair(report)));
        }
        self.bus
            .event(
                Severity::Error,
                format!(
                    "repository repair on {} left {} blob(s) lost; {} snapshot(s) affected{}",
                    self.settings.host,
                    report.blobs_lost,
                    report.snapshots_affected,
                    match report.problems.len() {
                        0 => String::new(),
                        n => format!("; {n} problem(s)"),
                    }
                ),
                EventBody::RepairFailed {
                    task_id: body.id.clone(),
                    lost: report.blobs_lost,
                    lost_blobs: report
                        .lost_blobs
                        .iter()
                        .take(MAX_IN_EVENT)
                        .map(|b| b.to_hex())
                        .collect(),
                    affected_snapshots: report.affected_snapshots.clone(),
                    problems: report.problems.iter().take(MAX_IN_EVENT).cloned().collect(),
                },
            )
            .await;
        Ok((TaskOutcome::Failed, TaskResult::Repair(report)))
    }
}
