//! `flotilla check STORAGE [--read-data]`.

use std::collections::HashSet;
use std::time::Duration;

use flotilla_protocol::repo::{BlobId, CheckReport, RepoKey};
use flotilla_protocol::{HostName, TaskKind, TaskOutcome, TaskResult};
use serde_json::json;

use super::follow::follow_one;
use super::snapshots::tree;
use super::{output, Global};
use crate::dispatch::Dispatch;
use crate::error::CliError;
use crate::fleetops::{list, repo_key, Found};
use crate::nats::Nats;

const WAIT: Duration = Duration::from_secs(24 * 3600);
/// Affected files listed per snapshot.
const MAX_FILES: usize = 100;

pub(super) async fn run(
    g: &Global,
    storage: &HostName,
    read_data: bool,
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
    let done = follow_one(storage, task, "check", WAIT, json, &dispatch).await?;
    let Some(TaskResult::Check(report)) = done.result else {
        return Err(CliError::TaskFailed {
            host: storage.to_string(),
            task_id: done.task_id,
            error: done.error.unwrap_or_default(),
        });
    };
    // Which files the damage reaches: only key holders can tell, so it is
    // worked out here from the affected snapshots' trees.
    let affected = if report.damaged_blobs.is_empty() {
        Vec::new()
    } else {
        match repo_key(&fleet) {
            Ok(key) => affected_files(&nats, &key, storage, &report)
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
            error: done
                .error
                .unwrap_or_else(|| "repository check failed".into()),
        }),
    }
}

/// (snapshot id, path) of every file or tree that uses a damaged blob.
async fn affected_files(
    nats: &Nats,
    key: &RepoKey,
    storage: &HostName,
    report: &CheckReport,
) -> Result<Vec<(String, String)>, CliError> {
    let damaged: HashSet<BlobId> = report.damaged_blobs.iter().copied().collect();
    let mut out = Vec::new();
    let found: Vec<Found> = list(nats, key, Some(storage)).await?;
    for snap in found
        .iter()
        .filter(|f| report.affected_snapshots.contains(&f.record.id))
    {
        let mut stack = vec![(snap.record.tree, String::new())];
        let mut listed = 0;
        while let Some((id, prefix)) = stack.pop() {
            if damaged.contains(&id) {
                out.push((
                    snap.record.id.clone(),
                    format!("{prefix}/ (directory listing)"),
                ));
                continue;
            }
            let Ok(t) = tree(nats, key, storage, &id).await else {
                continue;
            };
            for node in t.nodes {
                let name = String::from_utf8_lossy(&node.name);
                let path = if name.starts_with('/') {
                    name.into_owned()
                } else {
                    format!("{prefix}/{name}")
                };
                if node.content.iter().any(|c| damaged.contains(&c.id)) && listed < MAX_FILES {
                    listed += 1;
                    out.push((snap.record.id.clone(), path.clone()));
                }
                if let Some(sub) = node.subtree {
                    stack.push((sub, path));
                }
            }
        }
    }
    Ok(out)
}
