//! Following several tasks at once, with a progress line per host.
//!
//! On a terminal the lines are redrawn in place; otherwise (and with `--json`)
//! progress is printed as plain lines at most once a second per host.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use flotilla_protocol::{Event, EventBody, HostName, TaskFinished, TaskProgress};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::output;
use crate::dispatch::{Dispatch, Outcome, SentTask};
use crate::error::CliError;

/// How one followed task ended.
#[derive(Debug)]
pub struct Followed {
    /// The host.
    pub host: HostName,
    /// The task id.
    pub task_id: String,
    /// How it ended.
    pub outcome: Outcome,
}

impl Followed {
    /// The task's end, or the error for a refusal or for a wait (of `wait`)
    /// that ran out or lost its subscription.
    pub fn finished(self, wait: Duration) -> Result<TaskFinished, CliError> {
        match self.outcome {
            Outcome::Finished(done) => Ok(done),
            Outcome::Rejected { reason, detail } => Err(CliError::Rejected {
                host: self.host.to_string(),
                task_id: self.task_id,
                reason,
                detail,
            }),
            Outcome::TimedOut | Outcome::Lost(_) => Err(CliError::Timeout {
                host: self.host.to_string(),
                task_id: self.task_id,
                waited_secs: wait.as_secs(),
            }),
        }
    }
}

/// Follows one task (`what` names it in errors) to its end, with progress
/// and Ctrl-C handling as [`follow_all`].
pub async fn follow_one(
    host: &HostName,
    task: SentTask,
    what: &str,
    wait: Duration,
    json: bool,
    dispatch: &Dispatch<'_>,
) -> Result<TaskFinished, CliError> {
    let followed = follow_all(vec![(host.clone(), task)], wait, json, Some(dispatch))
        .await
        .pop()
        .ok_or_else(|| CliError::Request {
            what: format!("follow {what}"),
            why: "no result".into(),
        })?;
    followed.finished(wait)
}

/// Waits for every task, rendering progress; returns in the order given.
///
/// With `interrupt`, Ctrl-C sends each unfinished task a signed `cancel`
/// (the agents stop cleanly; the tasks end `cancelled`) and keeps waiting
/// for them to say so; a second Ctrl-C stops waiting.
pub async fn follow_all(
    tasks: Vec<(HostName, SentTask)>,
    wait: Duration,
    json: bool,
    interrupt: Option<&Dispatch<'_>>,
) -> Vec<Followed> {
    let targets: Vec<(HostName, String)> = tasks
        .iter()
        .map(|(h, t)| (h.clone(), t.id.clone()))
        .collect();
    let mut interrupted = false;
    let (tx, mut rx) = mpsc::unbounded_channel::<Event>();
    let mut set = JoinSet::new();
    let order: Vec<String> = tasks.iter().map(|(_, t)| t.id.clone()).collect();
    for (host, mut task) in tasks {
        let tx = tx.clone();
        set.spawn(async move {
            let outcome = task
                .wait(wait, |ev| {
                    let _ = tx.send(ev.clone());
                })
                .await;
            Followed {
                host,
                task_id: task.id.clone(),
                outcome,
            }
        });
    }
    drop(tx);
    let tty = std::io::stderr().is_terminal() && !json;
    let mut lines: BTreeMap<String, String> = BTreeMap::new();
    let mut last_print: BTreeMap<String, Instant> = BTreeMap::new();
    let mut drawn = 0usize;
    let mut done = Vec::new();
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c(), if interrupt.is_some() => {
                if interrupted {
                    eprintln!("second interrupt: not waiting any longer");
                    break;
                }
                interrupted = true;
                eprintln!("interrupted: asking the agents to stop cleanly (Ctrl-C again to stop waiting)");
                if let Some(d) = interrupt {
                    let finished: Vec<String> = done.iter().map(|f: &Followed| f.task_id.clone()).collect();
                    for (host, id) in targets.iter().filter(|(_, id)| !finished.contains(id)) {
                        if let Err(e) = d.publish(host, flotilla_protocol::TaskKind::Cancel { task_id: id.clone() }).await {
                            eprintln!("cannot cancel {id} on {host}: {e}");
                        }
                    }
                }
            }
            ev = rx.recv() => {
                let Some(ev) = ev else { continue };
                let EventBody::TaskProgress(p) = &ev.body else { continue };
                if json {
                    let mut v = serde_json::to_value(p).unwrap_or_default();
                    v["host"] = serde_json::json!(ev.host.as_str());
                    v["type"] = serde_json::json!("progress");
                    outln!("{v}");
                    continue;
                }
                let line = progress_line(&ev.host, p);
                if tty {
                    lines.insert(ev.host.to_string(), line);
                    redraw(&lines, &mut drawn);
                } else {
                    let due = last_print
                        .get(ev.host.as_str())
                        .is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
                    if due {
                        last_print.insert(ev.host.to_string(), Instant::now());
                        eprintln!("{line}");
                    }
                }
            }
            joined = set.join_next() => match joined {
                Some(Ok(f)) => done.push(f),
                Some(Err(_)) => {}
                None => break,
            },
        }
    }
    if tty && drawn > 0 {
        eprint!("\x1b[{drawn}A\x1b[J");
    }
    done.sort_by_key(|f| order.iter().position(|id| *id == f.task_id));
    done
}

fn redraw(lines: &BTreeMap<String, String>, drawn: &mut usize) {
    if *drawn > 0 {
        eprint!("\x1b[{}A", *drawn);
    }
    for line in lines.values() {
        eprintln!("\x1b[2K{line}");
    }
    *drawn = lines.len();
}

/// `laptop  [#####.....]  52%  1,204 files  1.2 GiB  45.0 MiB/s  ETA 20s`
pub fn progress_line(host: &HostName, p: &TaskProgress) -> String {
    let secs = (p.elapsed_ms as f64 / 1000.0).max(0.001);
    let rate = p.bytes as f64 / secs;
    let mut line = format!("{host:<16}");
    if let Some(total) = p.bytes_total.filter(|t| *t > 0) {
        let frac = (p.bytes as f64 / total as f64).min(1.0);
        let filled = (frac * 20.0) as usize;
        line.push_str(&format!(
            " [{}{}] {:>3.0}%",
            "#".repeat(filled),
            ".".repeat(20 - filled),
            frac * 100.0
        ));
        let eta = if rate > 0.0 {
            (total.saturating_sub(p.bytes)) as f64 / rate
        } else {
            0.0
        };
        line.push_str(&format!(
            "  {} files  {} / {}  {}/s  ETA {:.0}s",
            p.files,
            output::bytes(p.bytes),
            output::bytes(total),
            output::bytes(rate as u64),
            eta
        ));
    } else {
        line.push_str(&format!(
            "  {} files  {}  {}/s",
            p.files,
            output::bytes(p.bytes),
            output::bytes(rate as u64)
        ));
    }
    line
}
