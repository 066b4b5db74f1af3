//! `flotilla check STORAGE [--read-data]`.

use std::collections::HashSet;
use std::time::Duration;

use flotilla_protocol::repo::BlobId;
use flotilla_protocol::{HostName, TaskKind, TaskOutcome, TaskResult};
use serde_json::json;

use super::follow::follow_one;
use super::{output, Global};
use crate::dispatch::{Dispatch, Wait};
use crate::error::CliError;
use crate::fleetops::{affected_files, repo_key};

const WAIT: Duration = Duration::from_secs(24 * 3600);

pub(super) async fn run(
    g: &Global,
    storage: &HostName,
    read_data: bool,
    timeout: Option<Duration>,
    json: bool,
) -> Result<(), CliError> {
    let fleet = g.fleet()?;
    let nats = g.connect().await?;
    if nats.host(storage).await?.is_none() {
        return Err(CliError::HostUnknown(storage.to_string()));
    }
    let dispatch = Dispatch::new(&fleet, &nats)?;
    let task = dispatch
        .send(storage, TaskKind::Check { read_data })
        .await?;
    let wait = Wait::with_timeout(WAIT, timeout);
    let done = follow_one(storage, task, "check", wait, json, &dispatch).await?;
    let Some(TaskResult::Check(report)) = done.result else {
        return Err(CliError::TaskFailed {
            host: storage.to_string(),
            task_id: done.task_id,
            retryable: done.retryable,
            error: done.error.unwrap_or_default(),
        });
    };
    // Which files the damage reaches: only key holders can tell, so it is
    // worked out here from the affected snapshots' trees.
    let affected = if report.damaged_blobs.is_empty() {
        Vec::new()
    } else {
        let damaged: HashSet<BlobId> = report.damaged_blobs.iter().copied().collect();
        match repo_key(&fleet) {
            Ok(key) => affected_files(&nats, &key, storage, &damaged, &report.affected_snapshots)
                .await
                .unwrap_or_default(),
            Err(_) => Vec::new(),
        }
    };
    if json {
        let mut v = serde_json::to_value(&report).unwrap_or_default();
        v["storage"] = json!(storage.as_str());
        v["read_data"] = json!(read_data);
        v["ok"] = json!(report.is_ok());
        v["affected_files"] = json!(affected
            .iter()
            .map(|(s, f)| json!({"snapshot": s, "path": f}))
            .collect::<Vec<_>>());
        outln!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        outln!(
            "{storage}: {} packs, {} blobs, {} snapshots checked{}",
            report.packs,
            report.blobs,
            report.snapshots,
            if read_data {
                ", every byte re-read"
            } else {
                " (structure only; --read-data re-reads every byte)"
            }
        );
        if report.is_ok() {
            outln!("no problems found");
        } else {
            outln!("{} problem(s):", report.problems.len());
            for p in &report.problems {
                outln!("  [{}] {}", p.kind, p.message);
            }
            if !report.affected_snapshots.is_empty() {
                outln!(
                    "affected snapshots: {}",
                    report.affected_snapshots.join(", ")
                );
            }
            for (snap, path) in &affected {
                outln!(
                    "  affected file: {} in snapshot {}",
                    path,
                    output::short(snap)
                );
            }
        }
    }
    match done.outcome {
        TaskOutcome::Succeeded => Ok(()),
        TaskOutcome::Cancelled => Err(CliError::Cancelled),
        _ => Err(CliError::TaskFailed {
            host: storage.to_string(),
            task_id: done.task_id,
            retryable: done.retryable,
            error: done
                .error
                .unwrap_or_else(|| "repository check failed".into()),
        }),
    }
}
