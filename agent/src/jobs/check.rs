//! The `check` task on a storage host.

use flotilla_protocol::{EventBody, Severity, TaskBody, TaskOutcome, TaskResult};

use super::backup::failed;
use super::Agent;
use super::JobError;

/// Problems listed in the result; the count is always complete.
const MAX_PROBLEMS_LISTED: usize = 200;
/// Damaged blob ids listed in the event.
const MAX_BLOBS_LISTED: usize = 100;

impl Agent {
    pub(super) async fn check(
        &self,
        body: &TaskBody,
        read_data: bool,
    ) -> Result<(TaskOutcome, TaskResult), JobError> {
        let repo = self.repo.clone().ok_or_else(|| {
            failed(format!(
                "host {} keeps no repository (start its agent with --storage DIR)",
                self.settings.host
            ))
        })?;
        let mut report = tokio::task::spawn_blocking(move || repo.check(read_data))
            .await
            .map_err(|e| JobError::Failed {
                message: format!("check crashed: {e}"),
                retryable: true,
            })?;
        if report.is_ok() {
            return Ok((TaskOutcome::Succeeded, TaskResult::Check(report)));
        }
        let problems = report.problems.len() as u64;
        self.bus
            .event(
                Severity::Error,
                format!(
                    "repository check on {} found {problems} problem(s); {} snapshot(s) affected",
                    self.settings.host,
                    report.affected_snapshots.len()
                ),
                EventBody::CheckFailed {
                    task_id: body.id.clone(),
                    problems,
                    damaged_blobs: report
                        .damaged_blobs
                        .iter()
                        .take(MAX_BLOBS_LISTED)
                        .map(|b| b.to_hex())
                        .collect(),
                    affected_snapshots: report.affected_snapshots.clone(),
                },
            )
            .await;
        report.problems.truncate(MAX_PROBLEMS_LISTED);
        Ok((TaskOutcome::Failed, TaskResult::Check(report)))
    }
}
