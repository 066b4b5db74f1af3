//! `flotilla estimate HOST`: the first task users run, end to end.

use std::time::Duration;

use flotilla_protocol::{EventBody, HostName, TaskKind, TaskOutcome, TaskResult};

use super::follow::Live;
use super::{output, Global};
use crate::dispatch::{Dispatch, NoticeKind, Outcome, Update};
use crate::error::CliError;

/// Default wait for an online host.
const WAIT_ONLINE: Duration = Duration::from_secs(600);
/// Default wait for an offline host: the task stays queued after that.
const WAIT_OFFLINE: Duration = Duration::from_secs(30);

pub(super) async fn run(
    g: &Global,
    host: &HostName,
    paths: Vec<String>,
    json: bool,
    timeout: Option<u64>,
) -> Result<(), CliError> {
    let fleet = g.fleet()?;
    let nats = g.connect().await?;
    let dispatch = Dispatch::new(&fleet, &nats)?;
    let record = nats
        .host(host)
        .await?
        .ok_or_else(|| CliError::HostUnknown(host.to_string()))?;
    let offline = record.offline_reason(crate::now_ms()).is_some();
    let wait = timeout.map(Duration::from_secs).unwrap_or(if offline {
        WAIT_OFFLINE
    } else {
        WAIT_ONLINE
    });

    let task = dispatch.send(host, TaskKind::Estimate { paths }).await?;
    let task_id = task.id.clone();
    if offline {
        eprintln!(
            "host {host} is offline (last seen {}); task {} is queued and runs when it returns; waiting {} s",
            output::ago(crate::now_ms(), record.stored_at),
            task_id,
            wait.as_secs()
        );
    }
    let mut live = (!json).then(Live::stderr);
    let outcome = task
        .wait(wait, |update| {
            let Some(live) = live.as_mut() else { return };
            match update {
                Update::Event(ev) => {
                    if let EventBody::TaskProgress(p) = &ev.body {
                        let line = format!(
                            "{host}: {} files, {} dirs, {} so far",
                            p.files,
                            p.dirs,
                            output::bytes(p.bytes)
                        );
                        let width = live.width();
                        live.set(host.as_str(), line.chars().take(width).collect());
                    }
                }
                // Its offline host was said above: only later news.
                Update::Notice(n) if n.kind != NoticeKind::Offline || !offline => {
                    live.println(&n.message)
                }
                _ => {}
            }
        })
        .await;
    if let Some(live) = live.as_mut() {
        live.clear();
    }
    let finished = match outcome {
        Outcome::Finished(f) => *f,
        Outcome::Rejected { reason, detail } => {
            return Err(CliError::Rejected {
                host: host.to_string(),
                task_id: task_id.clone(),
                reason,
                detail,
            })
        }
        // (A plain wait: no `--timeout` cancels an estimate.)
        Outcome::TimedOut | Outcome::GaveUp { .. } if offline => {
            return Err(CliError::HostOffline {
                host: host.to_string(),
                task_id: Some(task_id.clone()),
                waited_secs: wait.as_secs(),
            })
        }
        Outcome::TimedOut | Outcome::GaveUp { .. } => {
            return Err(CliError::Timeout {
                host: host.to_string(),
                task_id: task_id.clone(),
                waited_secs: wait.as_secs(),
            })
        }
        Outcome::Lost(why) => {
            return Err(CliError::Request {
                what: format!("follow task {task_id}"),
                why,
            })
        }
        Outcome::Abandoned => return Err(CliError::Cancelled),
    };
    if json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&finished).unwrap_or_default()
        );
    }
    if finished.outcome == TaskOutcome::Failed {
        return Err(CliError::TaskFailed {
            host: host.to_string(),
            task_id: finished.task_id,
            retryable: finished.retryable,
            error: finished.error.unwrap_or_else(|| "unknown error".into()),
        });
    }
    if !json {
        if let Some(TaskResult::Estimate(r)) = &finished.result {
            outln!(
                "{host}: {} files, {} directories, {} symlinks, {} other, {} ({} bytes) in {} ms",
                r.files,
                r.dirs,
                r.symlinks,
                r.other,
                output::bytes(r.bytes),
                r.bytes,
                r.duration_ms
            );
            if r.errors > 0 {
                outln!("{} entries could not be read, e.g.:", r.errors);
                for e in &r.error_samples {
                    outln!("  {e}");
                }
            }
            if !r.largest_dirs.is_empty() {
                outln!("largest directories:");
                for d in &r.largest_dirs {
                    outln!(
                        "  {:>10}  {:>8} files  {}",
                        output::bytes(d.bytes),
                        d.files,
                        d.path
                    );
                }
            }
        }
    }
    Ok(())
}
