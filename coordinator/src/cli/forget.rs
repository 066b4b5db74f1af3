//! `flotilla forget` and `flotilla prune`: retention across the fleet.
//!
//! Which snapshots go is decided by [`crate::fleetops::decide`] (shared with
//! the daemon), with the pure policy in [`crate::retention`], per group of
//! snapshots with the same host and paths (as restic does). The storage agents only carry out signed `forget` and
//! `prune` tasks; sources can never delete anything.

use std::time::Duration;

use flotilla_protocol::{HostName, TaskKind, TaskOutcome, TaskResult};
use serde_json::json;

use super::follow::{follow_all, follow_one};
use super::{output, Global};
use crate::dispatch::Dispatch;
use crate::error::CliError;
use crate::fleetops::{decide, doomed, repo_key, Found};
use crate::retention::{KeepPolicy, Verdict};

const WAIT: Duration = Duration::from_secs(24 * 3600);

/// Sends one `forget` task per storage host for the verdicts that drop.
pub(crate) async fn send_forgets(
    dispatch: &Dispatch<'_>,
    verdicts: &[(Found, Verdict)],
) -> Result<Vec<(HostName, crate::dispatch::SentTask)>, CliError> {
    let mut sent = Vec::new();
    for (storage, ids) in doomed(verdicts)? {
        let task = dispatch
            .send(&storage, TaskKind::Forget { snapshots: ids })
            .await?;
        sent.push((storage, task));
    }
    Ok(sent)
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn forget(
    g: &Global,
    policy: KeepPolicy,
    host: Option<&HostName>,
    to: Option<&HostName>,
    dry_run: bool,
    prune: bool,
    json: bool,
) -> Result<(), CliError> {
    if policy.is_empty() {
        return Err(CliError::Usage(
            "give at least one --keep-* option (forgetting everything is never a default)".into(),
        ));
    }
    policy
        .within()
        .map_err(|e| CliError::Usage(e.to_string()))?;
    let fleet = g.fleet()?;
    let key = repo_key(&fleet)?;
    let nats = g.connect().await?;
    let decision = decide(&nats, &key, &policy, host, to).await?;
    let verdicts = decision.verdicts;
    let left_alone: Vec<String> = decision
        .left_alone
        .unanswered
        .iter()
        .chain(&decision.left_alone.doubtful)
        .map(|(s, _)| s.to_string())
        .collect();
    let left_alone_err = (!left_alone.is_empty()).then(|| CliError::LeftAlone {
        hosts: left_alone,
        unreachable: decision.left_alone.doubtful.is_empty(),
    });
    if json {
        for ((storage, why), listed) in decision
            .left_alone
            .unanswered
            .iter()
            .map(|u| (u, false))
            .chain(decision.left_alone.doubtful.iter().map(|d| (d, true)))
        {
            outln!(
                "{}",
                json!({"type": "left_alone", "storage": storage.as_str(), "listed": listed, "reason": why})
            );
        }
    } else {
        output::listing_warnings(&decision.left_alone, false);
    }
    if json {
        for (f, v) in &verdicts {
            outln!(
                "{}",
                json!({"type": "verdict", "id": v.id, "host": f.record.host.as_str(), "storage": f.storage.as_str(),
                    "time": output::rfc3339(f.record.time), "keep": v.keep, "reasons": v.reasons})
            );
        }
    } else if !verdicts.is_empty() {
        let rows = verdicts
            .iter()
            .map(|(f, v)| {
                vec![
                    if v.keep { "keep" } else { "forget" }.to_owned(),
                    output::short(&v.id),
                    output::when(f.record.time, g.utc),
                    f.record.host.to_string(),
                    f.storage.to_string(),
                    v.reasons.join(","),
                ]
            })
            .collect();
        for line in output::table(
            &["VERDICT", "ID", "TIME", "HOST", "STORAGE", "KEPT BY"],
            &[],
            rows,
        ) {
            outln!("{line}");
        }
    }
    let doomed = verdicts.iter().filter(|(_, v)| !v.keep).count();
    if dry_run || doomed == 0 {
        if !json {
            outln!(
                "{doomed} snapshot(s) would be forgotten{}",
                if dry_run { " (dry run)" } else { "" }
            );
        }
        return left_alone_err.map_or(Ok(()), Err);
    }
    let dispatch = Dispatch::new(&fleet, &nats)?;
    let sent = send_forgets(&dispatch, &verdicts).await?;
    let storages: Vec<HostName> = sent.iter().map(|(h, _)| h.clone()).collect();
    let mut first_err = None;
    for f in follow_all(sent, WAIT, json, Some(&dispatch)).await {
        let host = f.host.clone();
        match f.finished(WAIT) {
            Ok(d) if d.outcome == TaskOutcome::Succeeded => {
                if let Some(TaskResult::Forget(r)) = &d.result {
                    if json {
                        outln!(
                            "{}",
                            json!({"type": "forgotten", "storage": host.as_str(), "removed": r.removed, "missing": r.missing})
                        );
                    } else {
                        outln!("{}: forgot {} snapshot(s)", host, r.removed.len());
                    }
                }
            }
            Ok(d) => {
                first_err.get_or_insert(CliError::TaskFailed {
                    host: host.to_string(),
                    task_id: d.task_id,
                    retryable: d.retryable,
                    error: d.error.unwrap_or_default(),
                });
            }
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    if prune {
        for storage in storages {
            run_prune(g, &storage, false, Duration::from_secs(0), json).await?;
        }
    }
    left_alone_err.map_or(Ok(()), Err)
}

pub(super) async fn run_prune(
    g: &Global,
    storage: &HostName,
    dry_run: bool,
    grace: Duration,
    json: bool,
) -> Result<(), CliError> {
    let fleet = g.fleet()?;
    let nats = g.connect().await?;
    if nats.host(storage).await?.is_none() {
        return Err(CliError::HostUnknown(storage.to_string()));
    }
    let dispatch = Dispatch::new(&fleet, &nats)?;
    let task = dispatch
        .send(
            storage,
            TaskKind::Prune {
                dry_run,
                grace_secs: grace.as_secs(),
            },
        )
        .await?;
    let d = follow_one(storage, task, "prune", WAIT, json, &dispatch).await?;
    match (&d.result, d.outcome) {
        (Some(TaskResult::Prune(r)), TaskOutcome::Succeeded) => {
            if json {
                let mut v = serde_json::to_value(r).unwrap_or_default();
                v["storage"] = json!(storage.as_str());
                outln!("{v}");
            } else {
                outln!(
                        "{storage}: {} {} pack(s), {} blob(s), {}{}; {} kept in use, {} pack(s) within the grace period, {} in use by running jobs",
                        if dry_run { "would delete" } else { "deleted" },
                        r.packs_deleted,
                        r.blobs_removed,
                        output::bytes(r.bytes_freed),
                        if dry_run { " (dry run)" } else { " freed" },
                        output::bytes(r.bytes_kept),
                        r.packs_in_grace,
                        r.packs_protected
                    );
            }
            Ok(())
        }
        _ => Err(CliError::TaskFailed {
            host: storage.to_string(),
            task_id: d.task_id,
            retryable: d.retryable,
            error: d.error.unwrap_or_default(),
        }),
    }
}
