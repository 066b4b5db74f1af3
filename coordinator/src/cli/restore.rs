//! `flotilla restore SNAPSHOT --to HOST:DIR`.

use std::time::Duration;

use flotilla_protocol::{HostName, TaskKind, TaskOutcome, TaskResult};
use serde_json::json;

use super::follow::follow_one;
use super::snapshots::find;
use super::{output, Global};
use crate::dispatch::{Dispatch, Wait};
use crate::error::CliError;
use crate::fleetops::{repo_key, storage_addr};

/// How long `--wait` waits for a restore.
const WAIT: Duration = Duration::from_secs(24 * 3600);

#[allow(clippy::too_many_arguments)]
pub(super) async fn run(
    g: &Global,
    snapshot: &str,
    to: &str,
    includes: Vec<String>,
    from: Option<&HostName>,
    preserve_special: bool,
    wait: bool,
    timeout: Option<Duration>,
    json: bool,
) -> Result<(), CliError> {
    let (host, dir) = to
        .split_once(':')
        .ok_or_else(|| CliError::Usage(format!("--to {to:?}: expected HOST:DIR")))?;
    let host = HostName::new(host).map_err(|e| CliError::Usage(e.to_string()))?;
    if !dir.starts_with('/') {
        return Err(CliError::Usage(format!(
            "--to {to:?}: DIR must be absolute"
        )));
    }
    let fleet = g.fleet()?;
    let key = repo_key(&fleet)?;
    let nats = g.connect().await?;
    let held = find(&nats, &key, snapshot, from).await?;
    let found = &held.found;
    if nats.host(&host).await?.is_none() {
        return Err(CliError::HostUnknown(host.to_string()));
    }
    // The storage host listed it; only a well-formed id goes into a task.
    let snapshot = found.record.snapshot_id().map_err(|e| CliError::Request {
        what: format!("restore from {}", found.storage),
        why: e.to_string(),
    })?;
    let dispatch = Dispatch::new(&fleet, &nats)?;
    // Every storage host holding the snapshot (a copy, `flotilla copy`) is
    // a place to restore from: the next is tried when one cannot be reached
    // or its restore fails in a way trying again may mend.
    let storages = &held.storages;
    let mut tried = 0;
    let (storage, done) = loop {
        let storage = &storages[tried];
        tried += 1;
        let next = storages.get(tried);
        let addr = match storage_addr(&nats, storage).await {
            Ok(addr) => addr,
            Err(e) => match next {
                Some(next) => {
                    eprintln!(
                        "cannot restore from {storage}: {e}; trying {next}, which holds it too"
                    );
                    continue;
                }
                None => return Err(e),
            },
        };
        let task = dispatch
            .send(
                &host,
                TaskKind::Restore {
                    snapshot: snapshot.clone(),
                    storage: storage.clone(),
                    storage_addr: addr,
                    target: dir.to_owned(),
                    includes: includes.clone(),
                    preserve_special,
                },
            )
            .await?;
        if !json {
            eprintln!(
                "sent restore task {} to {host}: snapshot {} ({} from {storage}) into {dir}",
                task.id,
                output::short(&found.record.id),
                found.record.host,
            );
        }
        if !wait {
            if json {
                outln!(
                    "{}",
                    json!({"type": "queued", "host": host.as_str(), "task_id": task.id, "storage": storage.as_str()})
                );
            } else {
                eprintln!("{}", output::follow_hint());
            }
            return Ok(());
        }
        let wait = Wait::with_timeout(WAIT, timeout);
        let done = follow_one(&host, task, "restore", wait, json, &dispatch).await?;
        match next {
            Some(next) if try_next_holder(done.outcome, done.retryable) => {
                eprintln!(
                    "restore from {storage} failed: {}; trying {next}, which holds it too",
                    done.error.as_deref().unwrap_or("no reason given")
                );
            }
            _ => break (storage, done),
        }
    };
    if json {
        let mut v = json!({"type": "summary", "host": host.as_str(), "storage": storage.as_str(), "task_id": done.task_id,
            "outcome": done.outcome, "error": done.error, "retryable": done.retryable,
            "duration_ms": done.duration_ms});
        if let Some(TaskResult::Restore(r)) = &done.result {
            v["restore"] = serde_json::to_value(r).unwrap_or_default();
        }
        outln!("{v}");
    } else if let Some(TaskResult::Restore(r)) = &done.result {
        outln!(
            "{host}: restored {} files, {} dirs, {} symlinks, {} hard links, {} into {dir} in {:.1}s",
            r.files,
            r.dirs,
            r.symlinks,
            r.hardlinks,
            output::bytes(r.bytes),
            done.duration_ms as f64 / 1000.0
        );
        if !r.stripped.is_empty() {
            outln!(
                "  left out, as the snapshot is {}'s (--preserve-special keeps them): {} setuid/setgid file(s), {} file capabilit(ies), {} file(s) with security labels, {} device node(s)",
                found.record.host,
                r.stripped.setid,
                r.stripped.capabilities,
                r.stripped.labels,
                r.stripped.devices
            );
            for s in &r.stripped.samples {
                outln!("    {s}");
            }
        }
        for e in &r.error_samples {
            outln!("  error: {e}");
        }
    }
    match done.outcome {
        TaskOutcome::Succeeded => Ok(()),
        TaskOutcome::Partial => Err(CliError::Partial),
        TaskOutcome::Cancelled => Err(CliError::Cancelled),
        TaskOutcome::Failed => Err(CliError::TaskFailed {
            host: host.to_string(),
            task_id: done.task_id,
            retryable: done.retryable,
            error: done.error.unwrap_or_default(),
        }),
    }
}

/// Whether a restore that ended so is tried again from the next storage host
/// holding the snapshot: a failure trying again may mend (the storage host
/// unreachable, the session lost). A partial restore, a cancel or a refusal
/// would end the same anywhere.
fn try_next_holder(outcome: TaskOutcome, retryable: bool) -> bool {
    outcome == TaskOutcome::Failed && retryable
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_retryable_failure_moves_to_the_next_holder() {
        assert!(try_next_holder(TaskOutcome::Failed, true));
        assert!(!try_next_holder(TaskOutcome::Failed, false));
        for outcome in [
            TaskOutcome::Succeeded,
            TaskOutcome::Partial,
            TaskOutcome::Cancelled,
        ] {
            assert!(!try_next_holder(outcome, true), "{outcome:?}");
        }
    }
}
