//! The `backup` task on a source host.

use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::Arc;

use flotilla_protocol::frame::ErrorCode;
use flotilla_protocol::repo::{RepoKey, SnapshotMeta, SnapshotRecord, REPO_FORMAT};
use flotilla_protocol::{BackupReport, SnapshotId, TaskBody, TaskKind, TaskOutcome, TaskResult};
use tokio::runtime::Handle;
use tracing::{info, warn};

use super::Agent;
use super::{JobError, Totals};
use crate::engine::{self, BackupOptions, BackupOutcome, Cancel, NoCache, RootBefore, RootRecord};
use crate::state::MapFileCache;
use crate::transfer::client::{BlockingStore, Session, SessionError, UPLOAD_LANES};
use crate::transfer::TransferEndpoint;

/// zstd level for new chunks: fast, and what restic's default roughly uses.
const ZSTD_LEVEL: i32 = 3;

pub(crate) fn session_err(e: SessionError) -> JobError {
    JobError::Failed {
        retryable: e.is_retryable(),
        message: e.to_string(),
    }
}

pub(crate) fn failed(message: impl Into<String>) -> JobError {
    JobError::Failed {
        message: message.into(),
        retryable: false,
    }
}

impl Agent {
    /// The repository key and QUIC endpoint a data-plane task needs.
    pub(crate) fn data_plane(&self) -> Result<(Arc<RepoKey>, Arc<TransferEndpoint>), JobError> {
        let key = self.repo_key.clone().ok_or_else(|| {
            failed(format!(
                "host {}'s bundle carries no repository key; enroll it again without --no-repo-key",
                self.settings.host
            ))
        })?;
        Ok((key, self.quic()?))
    }

    /// The QUIC endpoint a data-plane task dials from.
    pub(crate) fn quic(&self) -> Result<Arc<TransferEndpoint>, JobError> {
        self.endpoint
            .clone()
            .ok_or_else(|| failed("the QUIC endpoint is not running; see the agent log"))
    }

    pub(super) async fn backup(
        &self,
        body: &TaskBody,
        envelope: &[u8],
        cancel: &Cancel,
    ) -> Result<(TaskOutcome, TaskResult), JobError> {
        let TaskKind::Backup {
            paths,
            excludes,
            storage,
            storage_addr,
            allow_empty,
        } = &body.kind
        else {
            return Err(failed("not a backup task"));
        };
        let (key, endpoint) = self.data_plane()?;
        let roots = self.settings.backup_roots.clone();
        let resolved = self.allowed_paths(body, paths, &roots).await?;

        let started_at = crate::now_ms();
        let mut session = Session::open(&endpoint, *storage_addr, storage, envelope)
            .await
            .map_err(session_err)?;
        let repo_id = session.repo_id.clone();
        let cache = self.state.file_cache(&repo_id).await;
        // What the last backup into this repository saw of these paths, to
        // tell an unmounted disk from an empty directory before committing.
        let before: HashMap<PathBuf, RootBefore> = resolved
            .iter()
            .filter_map(|p| Some((p.clone(), cache.root_before(p)?)))
            .collect();

        let mut attempt_cache = Some(cache);
        let mut attempts = 0;
        let (outcome, snapshot_id) = loop {
            attempts += 1;
            let used_cache = attempt_cache.is_some();
            let (outcome, s) = self
                .run_engine(
                    body,
                    session,
                    &resolved,
                    excludes,
                    key.clone(),
                    attempt_cache.take(),
                    cancel,
                )
                .await?;
            session = s;
            if cancel.is_cancelled() {
                // Never commit a walk that was cut short; the journal resumes it.
                return Err(JobError::Failed {
                    message: "cancelled before commit".into(),
                    retryable: true,
                });
            }
            if !allow_empty {
                // Permanent: retrying finds the same empty directory.
                engine::check_roots(&outcome.roots, &before).map_err(|e| failed(e.to_string()))?;
            }
            let shown: Vec<String> = resolved.iter().map(|p| p.display().to_string()).collect();
            let record = snapshot_record(&key, body, &outcome, &shown, excludes, started_at)?;
            match session.commit(record).await {
                Ok(id) => break (outcome, id),
                // The cache named chunks the repository no longer has (pruned,
                // or their pack was lost from disk), or another host's upload
                // we relied on failed: read everything once more (what the
                // repository has is still not sent again).
                Err(e) if attempts < 3 && e.code() == Some(&ErrorCode::MissingBlobs) => {
                    warn!(error = %e, used_cache, "repository lacks blobs this backup relied on; backing up again");
                    if used_cache {
                        if let Err(e) = self.state.clear_file_cache(&repo_id) {
                            warn!(error = %e, "cannot clear file cache");
                        }
                    }
                }
                Err(e) => return Err(session_err(e)),
            }
        };
        session.close();
        info!(snapshot = %snapshot_id, files_new = outcome.summary.files_new, bytes_added = outcome.summary.bytes_added, "backup committed");
        let roots = outcome
            .roots
            .iter()
            .map(|r| (r.path.as_os_str().as_bytes().to_vec(), RootRecord::from(r)))
            .collect();
        if let Err(e) = self
            .state
            .replace_file_cache(&repo_id, outcome.cache_updates, roots)
            .await
        {
            warn!(error = %e, "cannot update the file cache; the next backup reads everything again");
        }
        let partial = !outcome.unreadable.is_empty();
        let report = BackupReport {
            snapshot: snapshot_id,
            storage: storage.to_string(),
            summary: outcome.summary,
            partial,
            unreadable: outcome.unreadable.into_iter().take(100).collect(),
        };
        let verdict = if partial {
            TaskOutcome::Partial
        } else {
            TaskOutcome::Succeeded
        };
        Ok((verdict, TaskResult::Backup(report)))
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_engine(
        &self,
        body: &TaskBody,
        session: Session,
        paths: &[PathBuf],
        excludes: &[String],
        key: Arc<RepoKey>,
        cache: Option<MapFileCache>,
        cancel: &Cancel,
    ) -> Result<(BackupOutcome, Session), JobError> {
        let uploader = session.uploader(UPLOAD_LANES);
        let store = BlockingStore {
            handle: Handle::current(),
            session,
            uploader,
        };
        let opts = BackupOptions {
            paths: paths.to_vec(),
            excludes: excludes.to_vec(),
            zstd_level: ZSTD_LEVEL,
        };
        // The totals for progress are counted beside the backup, not before
        // it: the walk does not wait for a second walk of the same tree. The
        // count stops when the backup ends, whether it got there or not.
        let totals = Totals::default();
        let counting = Cancel::default();
        {
            let (paths, totals, counting) = (paths.to_vec(), totals.clone(), counting.clone());
            tokio::task::spawn_blocking(move || {
                let r = engine::estimate(&paths, &mut engine::NoProgress, &counting);
                if !counting.is_cancelled() {
                    let _ = totals.set((r.files, r.bytes));
                }
            });
        }
        let cancel = cancel.clone();
        let backed_up = self
            .with_progress(body, Some(totals), move |progress| {
                let mut store = store;
                let result = match &cache {
                    Some(c) => engine::backup(&opts, &key, &mut store, c, progress, &cancel),
                    None => engine::backup(&opts, &key, &mut store, &NoCache, progress, &cancel),
                };
                (result, store)
            })
            .await;
        counting.cancel();
        let (result, store) = backed_up?;
        let BlockingStore {
            session, uploader, ..
        } = store;
        // Always drain the uploads: their error explains an engine failure.
        let uploaded = uploader.finish().await;
        let outcome = match (result, uploaded) {
            (Ok(o), Ok(_)) => o,
            (_, Err(e)) => return Err(session_err(e)),
            (Err(e), Ok(_)) => {
                return Err(JobError::Failed {
                    retryable: e.is_retryable(),
                    message: e.to_string(),
                })
            }
        };
        Ok((outcome, session))
    }
}

fn snapshot_record(
    key: &RepoKey,
    body: &TaskBody,
    outcome: &BackupOutcome,
    paths: &[String],
    excludes: &[String],
    started_at: u64,
) -> Result<SnapshotRecord, JobError> {
    let id = SnapshotId::random();
    let meta = SnapshotMeta {
        v: REPO_FORMAT,
        paths: paths.to_vec(),
        excludes: excludes.to_vec(),
        task_id: body.id.clone(),
        summary: outcome.summary.clone(),
        unreadable: outcome.unreadable.clone(),
        tree: Some(outcome.tree),
        host: Some(body.host.to_string()),
        time: Some(started_at),
    };
    let meta_bytes = flotilla_protocol::encode(&meta)
        .map_err(|e| failed(format!("cannot encode snapshot: {e}")))?;
    let sealed = key
        .seal_meta(&SnapshotRecord::meta_context(id.as_str()), &meta_bytes)
        .map_err(|e| failed(format!("cannot encrypt snapshot: {e}")))?;
    Ok(SnapshotRecord {
        v: REPO_FORMAT,
        id: id.into(),
        host: body.host.clone(),
        time: started_at,
        tree: outcome.tree,
        partial: !outcome.unreadable.is_empty(),
        blobs: outcome.blobs.clone(),
        meta: sealed,
    })
}
