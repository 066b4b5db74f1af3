//! `flotilla copy --from STORAGE --to STORAGE [--host H]... [--snapshot ID]...`:
//! snapshots sent from one storage host's repository to another's (an
//! off-site copy). The task goes to the storage host holding them, which
//! opens a session with the destination over QUIC exactly as a source opens
//! a backup session; this side only resolves ids, sends the signed task and
//! reports.

use std::time::Duration;

use flotilla_protocol::{CopyReport, HostName, SnapshotId, TaskKind, TaskOutcome, TaskResult};
use serde_json::json;

use super::follow::follow_one;
use super::{output, Global};
use crate::dispatch::{Dispatch, Wait};
use crate::error::CliError;
use crate::fleetops::{list, repo_key, storage_addr};

/// How long `--wait` waits for a copy.
const WAIT: Duration = Duration::from_secs(24 * 3600);

/// What to copy where.
#[derive(Debug, Clone)]
pub(super) struct What {
    pub from: HostName,
    pub to: HostName,
    pub hosts: Vec<HostName>,
    /// Ids or unique prefixes, as the person gave them.
    pub snapshots: Vec<String>,
    /// 0: no limit.
    pub limit_bytes_per_sec: u64,
}

pub(super) async fn run(
    g: &Global,
    what: What,
    wait: bool,
    timeout: Option<Duration>,
    json: bool,
) -> Result<(), CliError> {
    let What {
        from,
        to,
        hosts,
        snapshots,
        limit_bytes_per_sec,
    } = what;
    if from == to {
        return Err(CliError::Usage(format!(
            "--from and --to both name {from}; a copy goes to another storage host"
        )));
    }
    let fleet = g.fleet()?;
    let nats = g.connect().await?;
    // Both must be online storage hosts with a QUIC address: the task goes
    // to `from`, which dials `to`.
    storage_addr(&nats, &from).await?;
    let to_addr = storage_addr(&nats, &to).await?;
    let snapshots = if snapshots.is_empty() {
        Vec::new()
    } else {
        let key = repo_key(&fleet)?;
        let listing = list(&nats, &key, Some(&from)).await?;
        resolve(
            &snapshots,
            listing.found.iter().map(|f| f.record.id.as_str()),
            &from,
        )?
    };
    let dispatch = Dispatch::new(&fleet, &nats)?;
    let task = dispatch
        .send(
            &from,
            TaskKind::Copy {
                to: to.clone(),
                to_addr,
                hosts: hosts.clone(),
                snapshots: snapshots.clone(),
                limit_bytes_per_sec,
            },
        )
        .await?;
    if !json {
        eprintln!(
            "sent copy task {} to {from}: {} of {} to {to}{}",
            task.id,
            match snapshots.len() {
                0 => "every snapshot".to_string(),
                1 => "1 snapshot".to_string(),
                n => format!("{n} snapshots"),
            },
            if hosts.is_empty() {
                "every host".to_string()
            } else {
                hosts
                    .iter()
                    .map(HostName::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            },
            if limit_bytes_per_sec > 0 {
                format!(" at most {}/s", output::bytes(limit_bytes_per_sec))
            } else {
                String::new()
            }
        );
    }
    if !wait {
        if json {
            outln!(
                "{}",
                json!({"type": "queued", "host": from.as_str(), "task_id": task.id})
            );
        } else {
            eprintln!("{}", output::follow_hint());
        }
        return Ok(());
    }
    let done = follow_one(
        &from,
        task,
        "copy",
        Wait::with_timeout(WAIT, timeout),
        json,
        &dispatch,
    )
    .await?;
    let report = match &done.result {
        Some(TaskResult::Copy(r)) => Some(r),
        _ => None,
    };
    if json {
        let mut v = json!({"type": "summary", "host": from.as_str(), "to": to.as_str(),
            "task_id": done.task_id, "outcome": done.outcome, "error": done.error,
            "retryable": done.retryable, "duration_ms": done.duration_ms});
        if let Some(r) = report {
            v["copy"] = serde_json::to_value(r).unwrap_or_default();
        }
        outln!("{v}");
    } else if let Some(r) = report {
        for line in summary(&from, r, done.duration_ms) {
            outln!("{line}");
        }
    }
    match done.outcome {
        TaskOutcome::Succeeded => Ok(()),
        TaskOutcome::Partial => Err(CliError::Partial),
        TaskOutcome::Cancelled => Err(CliError::Cancelled),
        TaskOutcome::Failed => Err(CliError::TaskFailed {
            host: from.to_string(),
            task_id: done.task_id,
            retryable: done.retryable,
            error: done.error.unwrap_or_default(),
        }),
    }
}

/// The full ids of `wanted` (ids or unique prefixes) among `on`'s listing.
fn resolve<'a>(
    wanted: &[String],
    listed: impl Iterator<Item = &'a str> + Clone,
    on: &HostName,
) -> Result<Vec<SnapshotId>, CliError> {
    let mut out: Vec<SnapshotId> = Vec::new();
    for prefix in wanted {
        let hits: Vec<&str> = listed
            .clone()
            .filter(|id| id.starts_with(prefix.as_str()))
            .collect();
        let id = match hits.as_slice() {
            [one] => *one,
            [] => {
                return Err(CliError::Usage(format!(
                    "no snapshot {prefix} on {on}; see `flotilla snapshots --to {on}`"
                )))
            }
            many => {
                return Err(CliError::Usage(format!(
                    "{} snapshots on {on} start with {prefix}; give more of the id",
                    many.len()
                )))
            }
        };
        let id = SnapshotId::new(id.to_owned()).map_err(|e| CliError::Request {
            what: format!("copy from {on}"),
            why: e.to_string(),
        })?;
        if !out.contains(&id) {
            out.push(id);
        }
    }
    Ok(out)
}

/// What a person reads after a copy.
fn summary(from: &HostName, r: &CopyReport, duration_ms: u64) -> Vec<String> {
    let mut lines = vec![format!(
        "{from} -> {}: {} snapshot(s) copied, {} already there{}; sent {} blob(s), {}; {} blob(s) the destination held already; {:.1}s",
        r.to,
        r.snapshots_copied,
        r.snapshots_present,
        if r.snapshots_failed > 0 {
            format!(", {} not copied", r.snapshots_failed)
        } else {
            String::new()
        },
        r.blobs_sent,
        output::bytes(r.bytes_sent),
        r.blobs_present,
        duration_ms as f64 / 1000.0
    )];
    lines.extend(r.failed.iter().map(|why| format!("  not copied: {why}")));
    let unlisted = r.snapshots_failed.saturating_sub(r.failed.len() as u64);
    if unlisted > 0 {
        lines.push(format!("  and {unlisted} more not copied"));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(s: &str) -> HostName {
        HostName::new(s).expect("valid")
    }

    #[test]
    fn prefixes_resolve_to_one_full_id_on_the_source() {
        let (a, b, c) = ("ab".repeat(16), "ac".repeat(16), "ff".repeat(16));
        let listed = [a.as_str(), b.as_str(), c.as_str()];
        let got = resolve(
            &["ff".into(), "abab".into(), "ffff".into()],
            listed.iter().copied(),
            &h("nas"),
        )
        .expect("resolves");
        assert_eq!(
            got.iter().map(SnapshotId::as_str).collect::<Vec<_>>(),
            [c.as_str(), a.as_str()]
        );
        let err = resolve(&["a".into()], listed.iter().copied(), &h("nas")).expect_err("ambiguous");
        assert!(
            err.to_string().contains("2 snapshots on nas start with a"),
            "{err}"
        );
        let err = resolve(&["0".into()], listed.iter().copied(), &h("nas")).expect_err("unknown");
        assert!(err.to_string().contains("no snapshot 0 on nas"), "{err}");
    }

    #[test]
    fn the_summary_names_what_was_not_copied() {
        let report = CopyReport {
            to: "offsite".into(),
            snapshots_selected: 3,
            snapshots_copied: 1,
            snapshots_present: 1,
            snapshots_failed: 2,
            failed: vec!["snapshot x: blob y cannot be read".into()],
            blobs_sent: 5,
            bytes_sent: 3 << 20,
            blobs_present: 7,
            ..CopyReport::default()
        };
        let lines = summary(&h("nas"), &report, 1500);
        assert_eq!(
            lines[0],
            "nas -> offsite: 1 snapshot(s) copied, 1 already there, 2 not copied; sent 5 blob(s), 3.0 MiB; 7 blob(s) the destination held already; 1.5s"
        );
        assert_eq!(lines[1], "  not copied: snapshot x: blob y cannot be read");
        assert_eq!(lines[2], "  and 1 more not copied");
    }
}
