//! `flotilla backup`: signed backup tasks to one or more hosts, followed to the end.

use std::time::Duration;

use flotilla_protocol::{HostName, TaskKind, TaskOutcome, TaskResult};
use futures::{StreamExt, TryStreamExt};
use serde_json::json;

use super::follow::follow_all;
use super::{output, Global};
use crate::dispatch::{Dispatch, SentTask, Wait};
use crate::error::CliError;
use crate::fleetops::storage_addr;

/// How long `--wait` waits for a backup.
const WAIT: Duration = Duration::from_secs(24 * 3600);

/// How many hosts' tasks are being sent at once.
const SEND_CONCURRENCY: usize = 16;

#[allow(clippy::too_many_arguments)]
pub(super) async fn run(
    g: &Global,
    hosts: &[HostName],
    paths: Vec<String>,
    to: &HostName,
    excludes: Vec<String>,
    allow_empty: bool,
    wait: bool,
    timeout: Option<Duration>,
    json: bool,
) -> Result<(), CliError> {
    let fleet = g.fleet()?;
    let nats = g.connect().await?;
    let dispatch = Dispatch::new(&fleet, &nats)?;
    let addr = storage_addr(&nats, to).await?;
    // Hosts are checked and their tasks sent a few at a time: each costs a
    // few round trips to NATS, which add up over a large fleet.
    let kind = TaskKind::Backup {
        paths,
        excludes,
        storage: to.clone(),
        storage_addr: addr,
        allow_empty,
    };
    let sent: Vec<(HostName, SentTask)> = futures::stream::iter(hosts)
        .map(|host| {
            let (nats, dispatch, kind) = (&nats, &dispatch, kind.clone());
            async move {
                if nats.host(host).await?.is_none() {
                    return Err(CliError::HostUnknown(host.to_string()));
                }
                let task = dispatch.send(host, kind).await?;
                if !json {
                    eprintln!("sent backup task {} to {host} (into {to})", task.id);
                }
                Ok((host.clone(), task))
            }
        })
        .buffered(SEND_CONCURRENCY)
        .try_collect()
        .await?;
    if !wait {
        if json {
            for (host, task) in &sent {
                outln!(
                    "{}",
                    json!({"type": "queued", "host": host.as_str(), "task_id": task.id})
                );
            }
        } else {
            eprintln!("{}", output::follow_hint());
        }
        return Ok(());
    }
    let expected = sent.len();
    let wait = Wait::with_timeout(WAIT, timeout);
    let results = follow_all(sent, wait, json, Some(&dispatch)).await;
    // With one host its error is the command's; with several, each failed
    // host's error is printed with its result and the command's error only
    // names them, so no message is printed twice.
    let single = expected == 1;
    let mut failed: Vec<(String, CliError)> = Vec::new();
    let mut cancelled = false;
    let mut partial = false;
    for f in results {
        let host = f.host.to_string();
        match f.finished(WAIT) {
            Ok(done) => {
                let report = match &done.result {
                    Some(TaskResult::Backup(r)) => Some(r),
                    _ => None,
                };
                if json {
                    let mut v = json!({
                        "type": "summary",
                        "host": host,
                        "task_id": done.task_id,
                        "outcome": done.outcome,
                        "error": done.error,
                        "retryable": done.retryable,
                        "duration_ms": done.duration_ms,
                    });
                    if let Some(r) = report {
                        v["snapshot"] = json!(r.snapshot);
                        v["files_new"] = json!(r.summary.files_new);
                        v["files_changed"] = json!(r.summary.files_changed);
                        v["files_unchanged"] = json!(r.summary.files_unchanged);
                        v["bytes_read"] = json!(r.summary.bytes_read);
                        v["bytes_added"] = json!(r.summary.bytes_added);
                        v["bytes_total"] = json!(r.summary.bytes_total);
                        v["unreadable"] = json!(r.unreadable);
                    }
                    outln!("{v}");
                } else if let Some(r) = report {
                    let s = &r.summary;
                    outln!(
                        "{host}: snapshot {} — {} new, {} changed, {} unchanged files; read {}, added {} (of {} total) in {:.1}s",
                        output::short(&r.snapshot),
                        s.files_new,
                        s.files_changed,
                        s.files_unchanged,
                        output::bytes(s.bytes_read),
                        output::bytes(s.bytes_added),
                        output::bytes(s.bytes_total),
                        done.duration_ms as f64 / 1000.0
                    );
                    for u in &r.unreadable {
                        outln!("  unreadable: {u}");
                    }
                }
                match done.outcome {
                    TaskOutcome::Succeeded => {}
                    TaskOutcome::Partial => partial = true,
                    TaskOutcome::Failed => {
                        let error = done.error.unwrap_or_default();
                        if !json && !single {
                            outln!("{host}: backup task {} failed: {error}", done.task_id);
                        }
                        let e = CliError::TaskFailed {
                            host: host.clone(),
                            task_id: done.task_id,
                            retryable: done.retryable,
                            error,
                        };
                        failed.push((host, e));
                    }
                    TaskOutcome::Cancelled => cancelled = true,
                }
            }
            // Waiting was given up (a second Ctrl-C): the command was
            // stopped, which is not a failure of the host.
            Err(CliError::Cancelled) => cancelled = true,
            // Refused, or not finished in time: with several hosts, said on
            // the host's own line (the message names the host).
            Err(e) => {
                if !single {
                    if json {
                        let mut v = e.to_json();
                        v["host"] = json!(host);
                        outln!("{v}");
                    } else {
                        outln!("{e}");
                    }
                }
                failed.push((host, e));
            }
        }
    }
    if single {
        if let Some((_, e)) = failed.pop() {
            return Err(e);
        }
    }
    if let Some((_, first)) = failed.first() {
        return Err(CliError::HostsFailed {
            what: "backup",
            failed: failed.iter().map(|(h, _)| h.clone()).collect(),
            total: expected,
            code: first.exit_code(),
            retryable: failed.iter().all(|(_, e)| e.is_retryable()),
        });
    }
    if cancelled {
        return Err(CliError::Cancelled);
    }
    if partial {
        return Err(CliError::Partial);
    }
    Ok(())
}
