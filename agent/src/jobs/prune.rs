//! The `forget` and `prune` tasks on a storage host.

use std::time::Duration;

use flotilla_protocol::repo::ForgetReport;
use flotilla_protocol::{SnapshotId, TaskOutcome, TaskResult};

use super::backup::failed;
use super::Agent;
use super::JobError;
use crate::repository::{RepoError, Repository};

impl Agent {
    pub(super) fn repository(&self) -> Result<Repository, JobError> {
        self.repo.as_deref().cloned().ok_or_else(|| {
            failed(format!(
                "host {} keeps no repository (start its agent with --storage DIR)",
                self.settings.host
            ))
        })
    }

    pub(super) async fn forget(
        &self,
        ids: &[SnapshotId],
    ) -> Result<(TaskOutcome, TaskResult), JobError> {
        let repo = self.repository()?;
        let ids = ids.to_vec();
        let report = on_repository("forget", move || {
            let mut report = ForgetReport::default();
            for id in ids {
                match repo.forget_snapshot(id.as_str()) {
                    Ok(true) => report.removed.push(id),
                    Ok(false) => report.missing.push(id),
                    Err(e) => return Err(e),
                }
            }
            Ok(report)
        })
        .await?;
        Ok((TaskOutcome::Succeeded, TaskResult::Forget(report)))
    }

    pub(super) async fn prune(
        &self,
        dry_run: bool,
        grace_secs: u64,
    ) -> Result<(TaskOutcome, TaskResult), JobError> {
        let repo = self.repository()?;
        let claims = self.claims.clone();
        let report = on_repository("prune", move || {
            repo.prune(Duration::from_secs(grace_secs), dry_run, &|id| {
                claims.is_protected(id)
            })
        })
        .await?;
        Ok((TaskOutcome::Succeeded, TaskResult::Prune(report)))
    }
}

/// Runs repository work `what` on a blocking thread; its error, or a crash of
/// that thread, fails the task (retryable as the error says).
pub(super) async fn on_repository<T: Send + 'static>(
    what: &str,
    work: impl FnOnce() -> Result<T, RepoError> + Send + 'static,
) -> Result<T, JobError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| JobError::Failed {
            message: format!("{what} crashed: {e}"),
            retryable: true,
        })?
        .map_err(|e| JobError::Failed {
            retryable: e.is_retryable(),
            message: e.to_string(),
        })
}
