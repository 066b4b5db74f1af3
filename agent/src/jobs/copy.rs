//! The `copy` task on a storage host: snapshots of its repository sent to
//! another storage host over a QUIC session like a backup's. Blobs move as
//! they are stored (sealed); this host needs no repository key, and the
//! destination adds only what it lacks, keeps each snapshot's id and deletes
//! nothing. A copy cut short (either side killed, the link lost) leaves the
//! blobs that arrived in the destination's packs, so running it again sends
//! only the rest.

use std::path::Path;
use std::time::{Duration, Instant};

use flotilla_protocol::frame::ErrorCode;
use flotilla_protocol::repo::{BlobId, SnapshotRecord};
use flotilla_protocol::{
    CopyReport, HostName, SnapshotId, TaskBody, TaskKind, TaskOutcome, TaskResult,
    COPY_REPORT_LISTED,
};
use tokio::runtime::Handle;
use tracing::{info, warn};

use super::backup::{failed, session_err};
use super::prune::on_repository;
use super::{Agent, JobError};
use crate::engine::{Cancel, Counters, Progress};
use crate::repository::{RepoError, Repository};
use crate::transfer::client::{Session, SessionError, UPLOAD_LANES};
use crate::transfer::pace::Pace;

/// A snapshot the task selected, in the order they are sent (oldest first).
#[derive(Debug, Clone)]
struct Selected {
    id: String,
    time: u64,
}

impl Agent {
    pub(super) async fn copy(
        &self,
        body: &TaskBody,
        envelope: &[u8],
        cancel: &Cancel,
    ) -> Result<(TaskOutcome, TaskResult), JobError> {
        let TaskKind::Copy {
            to,
            to_addr,
            hosts,
            snapshots,
            limit_bytes_per_sec,
        } = &body.kind
        else {
            return Err(failed("not a copy task"));
        };
        if to == &self.settings.host {
            return Err(failed(format!(
                "a copy from {to} to {to} would copy a repository onto itself; name another storage host"
            )));
        }
        let repo = self.repository()?;
        let endpoint = self.quic()?;
        let (selected, not_here) = {
            let (repo, hosts, snapshots) = (repo.clone(), hosts.clone(), snapshots.clone());
            on_repository("copy", move || select(&repo, &hosts, &snapshots)).await?
        };
        let mut report = CopyReport {
            to: to.to_string(),
            snapshots_selected: selected.len() as u64,
            ..CopyReport::default()
        };
        for id in &not_here {
            fail(
                &mut report,
                format!(
                    "snapshot {id} is not in {}'s repository",
                    self.settings.host
                ),
            );
        }
        let session = Session::open(&endpoint, *to_addr, to, envelope)
            .await
            .map_err(session_err)?;
        let run = Run {
            repo,
            handle: Handle::current(),
            pace: Pace::new(*limit_bytes_per_sec),
            cancel: cancel.clone(),
            here: self.settings.host.clone(),
            started: Instant::now(),
        };
        let (report, session, ended) = self
            .with_progress(body, None, move |p| run.all(session, selected, report, p))
            .await?;
        session.close();
        info!(
            to = %to,
            copied = report.snapshots_copied,
            present = report.snapshots_present,
            failed = report.snapshots_failed,
            blobs_sent = report.blobs_sent,
            bytes_sent = report.bytes_sent,
            "copy ended"
        );
        match ended {
            Ended::Done => {}
            Ended::Cancelled => {
                // What arrived stays at the destination; nothing half-done
                // is committed there (a snapshot is committed whole or not).
                return Err(JobError::Failed {
                    message: "cancelled; snapshots committed at the destination so far stay".into(),
                    retryable: true,
                });
            }
            Ended::Lost(e) => return Err(session_err(e)),
        }
        let outcome = if report.snapshots_failed == 0 {
            TaskOutcome::Succeeded
        } else if report.snapshots_copied + report.snapshots_present == 0 {
            TaskOutcome::Failed
        } else {
            TaskOutcome::Partial
        };
        Ok((outcome, TaskResult::Copy(report)))
    }
}

/// The snapshots of this repository that `hosts` and `snapshots` select,
/// oldest first, and the named ones that are not here. Records are read one
/// at a time (each is read again when sent): a repository's whole list of
/// records may not fit in memory at once.
fn select(
    repo: &Repository,
    hosts: &[HostName],
    snapshots: &[SnapshotId],
) -> Result<(Vec<Selected>, Vec<SnapshotId>), RepoError> {
    let ids = repo.snapshot_ids()?;
    let mut out = Vec::new();
    for id in &ids {
        if !snapshots.is_empty() && !snapshots.iter().any(|s| s.as_str() == id) {
            continue;
        }
        match repo.snapshot(id) {
            Ok(rec) if hosts.is_empty() || hosts.contains(&rec.host) => out.push(Selected {
                id: rec.id,
                time: rec.time,
            }),
            Ok(_) => {}
            // Left to `check`; a named one is reported as not here below.
            Err(e) => warn!(snapshot = %id, error = %e, "unreadable snapshot record is not copied"),
        }
    }
    let not_here = snapshots
        .iter()
        .filter(|s| !out.iter().any(|o| o.id == s.as_str()))
        .cloned()
        .collect();
    out.sort_by(|a, b| (a.time, &a.id).cmp(&(b.time, &b.id)));
    Ok((out, not_here))
}

/// How the run over the selected snapshots ended.
enum Ended {
    /// Every snapshot was tried.
    Done,
    /// Stopped on request between blobs.
    Cancelled,
    /// The session with the destination failed: nothing more can be sent.
    Lost(SessionError),
}

/// Why one snapshot was not copied.
enum Fail {
    /// This snapshot only (a blob damaged here, a refusal): the next is tried.
    Snapshot(String),
    Cancelled,
    Lost(SessionError),
}

/// What one snapshot's copy found.
enum Copied {
    /// Committed at the destination now.
    New,
    /// The destination held it already.
    Present,
}

/// The work of one copy, on a blocking thread.
struct Run {
    repo: Repository,
    handle: Handle,
    pace: Option<Pace>,
    cancel: Cancel,
    here: HostName,
    started: Instant,
}

impl Run {
    fn all(
        mut self,
        mut session: Session,
        selected: Vec<Selected>,
        mut report: CopyReport,
        progress: &mut dyn Progress,
    ) -> (CopyReport, Session, Ended) {
        for (done, sel) in selected.iter().enumerate() {
            if self.cancel.is_cancelled() {
                return (report, session, Ended::Cancelled);
            }
            progress.update(
                &Counters {
                    files: done as u64,
                    dirs: 0,
                    bytes: report.bytes_sent,
                },
                Path::new(&sel.id),
            );
            let rec = match self.repo.snapshot(&sel.id) {
                Ok(rec) => rec,
                Err(e) => {
                    fail(&mut report, format!("snapshot {}: {e}", sel.id));
                    continue;
                }
            };
            match self.one(&mut session, rec, &mut report, progress, done as u64) {
                Ok(Copied::New) => {
                    report.snapshots_copied += 1;
                    if report.copied.len() < COPY_REPORT_LISTED {
                        if let Ok(id) = SnapshotId::new(sel.id.clone()) {
                            report.copied.push(id);
                        }
                    }
                }
                Ok(Copied::Present) => report.snapshots_present += 1,
                Err(Fail::Snapshot(why)) => {
                    warn!(snapshot = %sel.id, why, "snapshot not copied");
                    fail(&mut report, format!("snapshot {}: {why}", sel.id));
                }
                Err(Fail::Cancelled) => return (report, session, Ended::Cancelled),
                Err(Fail::Lost(e)) => return (report, session, Ended::Lost(e)),
            }
        }
        (report, session, Ended::Done)
    }

    /// Sends what the destination lacks of `rec`, then commits it there.
    fn one(
        &mut self,
        session: &mut Session,
        rec: SnapshotRecord,
        report: &mut CopyReport,
        progress: &mut dyn Progress,
        done: u64,
    ) -> Result<Copied, Fail> {
        let mut needed: Vec<BlobId> = rec.blobs.clone();
        needed.push(rec.tree);
        needed.sort_unstable();
        needed.dedup();
        // A commit refused for missing blobs (the destination lost some
        // between the question and the commit) is tried once more.
        for attempt in 1..=2 {
            let mut missing = self
                .handle
                .block_on(session.missing(&needed))
                .map_err(Fail::Lost)?;
            // Only what this snapshot needs is read and sent, whatever the
            // destination answers.
            missing.retain(|id| needed.binary_search(id).is_ok());
            missing.sort_unstable();
            missing.dedup();
            if attempt == 1 {
                report.blobs_present += needed.len().saturating_sub(missing.len()) as u64;
            }
            self.send(session, &missing, report, progress, (done, &rec.id))?;
            match self.handle.block_on(session.commit(rec.clone())) {
                Ok(_) => return Ok(Copied::New),
                Err(e) if e.code() == Some(&ErrorCode::Exists) => return Ok(Copied::Present),
                Err(e) if attempt == 1 && e.code() == Some(&ErrorCode::MissingBlobs) => {
                    warn!(snapshot = %rec.id, error = %e, "destination lacks blobs at commit; sending again");
                }
                // A refusal trying again may mend (the destination's disk)
                // ends the copy retryably; any other skips this snapshot.
                Err(
                    e @ SessionError::Refused {
                        retryable: true, ..
                    },
                ) => return Err(Fail::Lost(e)),
                Err(e @ SessionError::Refused { .. }) => return Err(Fail::Snapshot(e.to_string())),
                Err(e) => return Err(Fail::Lost(e)),
            }
        }
        Err(Fail::Snapshot(
            "the destination still lacked blobs at the second commit".into(),
        ))
    }

    /// Reads `ids` here and sends them on parallel upload streams; returns
    /// once the destination has stored them durably.
    fn send(
        &mut self,
        session: &mut Session,
        ids: &[BlobId],
        report: &mut CopyReport,
        progress: &mut dyn Progress,
        (done, current): (u64, &str),
    ) -> Result<(), Fail> {
        if ids.is_empty() {
            return Ok(());
        }
        let uploader = session.uploader(UPLOAD_LANES);
        let mut unreadable = None;
        for id in ids {
            if self.cancel.is_cancelled() {
                break;
            }
            let (kind, data) = match self.repo.read_blob(id) {
                Ok(blob) => blob,
                Err(e) => {
                    // Damaged or lost here: this snapshot cannot be copied
                    // whole. What was queued is still stored (a later copy,
                    // after a repair, sends less).
                    unreadable = Some(format!(
                        "blob {id} cannot be read on {}: {e}; run `flotilla check {}` and `flotilla repair {}`",
                        self.here, self.here, self.here
                    ));
                    break;
                }
            };
            let len = data.len() as u64;
            if let Some(pace) = &mut self.pace {
                let wait = pace.wait(self.started.elapsed(), len);
                // In slices, so that a cancel is heard within a second
                // however slow the limit (no cap: the pace is kept).
                let until = Instant::now() + wait;
                while let Some(left) = until.checked_duration_since(Instant::now()) {
                    if left.is_zero() || self.cancel.is_cancelled() {
                        break;
                    }
                    std::thread::sleep(left.min(Duration::from_secs(1)));
                }
            }
            if uploader.put_blocking(*id, kind, data).is_err() {
                // A lane failed; `finish` says why.
                break;
            }
            report.blobs_sent += 1;
            report.bytes_sent += len;
            progress.update(
                &Counters {
                    files: done,
                    dirs: 0,
                    bytes: report.bytes_sent,
                },
                Path::new(current),
            );
        }
        self.handle
            .block_on(uploader.finish())
            .map_err(|e| match e.code() {
                // A blob the destination refused (its shape): this snapshot
                // cannot go, the next may.
                Some(ErrorCode::Corrupt) => Fail::Snapshot(e.to_string()),
                _ => Fail::Lost(e),
            })?;
        if self.cancel.is_cancelled() {
            return Err(Fail::Cancelled);
        }
        match unreadable {
            Some(why) => Err(Fail::Snapshot(why)),
            None => Ok(()),
        }
    }
}

/// Counts a snapshot not copied, listing the first ones with why.
fn fail(report: &mut CopyReport, why: String) {
    report.snapshots_failed += 1;
    if report.failed.len() < COPY_REPORT_LISTED {
        report.failed.push(why);
    }
}
