//! Following several tasks at once, with a progress line per host.
//!
//! On a terminal the lines are redrawn in place (indicatif, one line per
//! host, each fitted to the terminal's width); otherwise progress is printed
//! as plain lines of at most 80 columns, at most once a second per host; with
//! `--json`, as JSON lines. No colours are used, so `NO_COLOR` has nothing to
//! turn off here.
//!
//! A wait is never silent: what the [`Follower`] notices (an offline host, a
//! task nothing was heard from, a lost connection, a `--timeout` that ran
//! out) is printed above the progress lines, or as `{"type": "waiting"}`
//! lines with `--json`.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use flotilla_protocol::{EventBody, HostName, TaskFinished, TaskId, TaskKind, TaskProgress};
use serde_json::json;

use super::output;
use crate::dispatch::{Dispatch, Follower, Notice, Outcome, SentTask, Update, Wait};
use crate::error::CliError;

/// How one followed task ended.
#[derive(Debug)]
pub struct Followed {
    /// The host.
    pub host: HostName,
    /// The task id.
    pub task_id: TaskId,
    /// How it ended.
    pub outcome: Outcome,
}

impl Followed {
    /// The task's end, or the error for a refusal, for a `--timeout` that
    /// ran out, or for a wait (of `wait`) that ran out or lost its
    /// subscription.
    pub fn finished(self, wait: impl Into<Wait>) -> Result<TaskFinished, CliError> {
        match self.outcome {
            Outcome::Finished(done) => Ok(*done),
            Outcome::Rejected { reason, detail } => Err(CliError::Rejected {
                host: self.host.to_string(),
                task_id: self.task_id,
                reason,
                detail,
            }),
            Outcome::GaveUp {
                after,
                host_offline,
            } => Err(CliError::TimedOut {
                host: self.host.to_string(),
                task_id: self.task_id,
                after_secs: after.as_secs(),
                host_offline,
            }),
            Outcome::TimedOut => Err(CliError::Timeout {
                host: self.host.to_string(),
                task_id: self.task_id,
                waited_secs: wait.into().limit.as_secs(),
            }),
            // The subscription ended before the task did: not a timeout (no
            // time ran out), so not reported as one.
            Outcome::Lost(why) => Err(CliError::Request {
                what: format!("follow task {} on {}", self.task_id, self.host),
                why,
            }),
            Outcome::Abandoned => Err(CliError::Cancelled),
        }
    }
}

/// Follows one task (`what` names it in errors) to its end, with progress,
/// notices and Ctrl-C handling as [`follow_all`].
pub async fn follow_one(
    host: &HostName,
    task: SentTask,
    what: &str,
    wait: impl Into<Wait>,
    json: bool,
    dispatch: &Dispatch<'_>,
) -> Result<TaskFinished, CliError> {
    let wait = wait.into();
    let followed = follow_all(vec![(host.clone(), task)], wait, json, Some(dispatch))
        .await
        .pop()
        .ok_or_else(|| CliError::Request {
            what: format!("follow {what}"),
            why: "no result".into(),
        })?;
    followed.finished(wait)
}

/// Waits for every task, rendering progress and saying what it waits for
/// (an offline host, a silent task, a lost connection: on stderr, or as
/// `{"type": "waiting"}` lines with `--json`); returns in the order given.
///
/// With `interrupt`, Ctrl-C sends each unfinished task a signed `cancel`
/// (the agents stop cleanly; the tasks end `cancelled`) and keeps waiting
/// for them to say so; a second Ctrl-C stops waiting. A [`Wait::timeout`]
/// that runs out sends the same `cancel`.
pub async fn follow_all(
    tasks: Vec<(HostName, SentTask)>,
    wait: impl Into<Wait>,
    json: bool,
    interrupt: Option<&Dispatch<'_>>,
) -> Vec<Followed> {
    let Some(nats) = tasks.first().map(|(_, t)| t.nats().clone()) else {
        return Vec::new();
    };
    let order: Vec<(HostName, TaskId)> = tasks
        .iter()
        .map(|(h, t)| (h.clone(), t.id.clone()))
        .collect();
    let mut follower = Follower::new(&nats, tasks.into_iter().map(|(_, t)| t).collect(), wait);
    let mut interrupted = false;
    let mut live = Live::stderr();
    let mut done = Vec::new();
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c(), if interrupt.is_some() => {
                if interrupted {
                    live.println("second interrupt: not waiting any longer");
                    // Every task not heard of ends here, so that no caller
                    // takes silence for success and goes on (a prune after
                    // a forget, the next plan).
                    for (host, task_id) in &order {
                        if !done.iter().any(|f: &Followed| f.task_id == *task_id) {
                            done.push(Followed {
                                host: host.clone(),
                                task_id: task_id.clone(),
                                outcome: Outcome::Abandoned,
                            });
                        }
                    }
                    break;
                }
                interrupted = true;
                live.println("interrupted: asking the agents to stop cleanly (Ctrl-C again to stop waiting)");
                for (host, id) in follower.interrupt() {
                    cancel(interrupt, &host, id, &live).await;
                }
            }
            update = follower.next() => {
                let Some(update) = update else { break };
                match update {
                    Update::Event(ev) => {
                        let EventBody::TaskProgress(p) = &ev.body else { continue };
                        if json {
                            let mut v = serde_json::to_value(p).unwrap_or_default();
                            v["host"] = json!(ev.host.as_str());
                            v["type"] = json!("progress");
                            outln!("{v}");
                            continue;
                        }
                        let width = live.width();
                        live.set(ev.host.as_str(), progress_line(&ev.host, p, width));
                    }
                    Update::Notice(n) if json => outln!("{}", notice_json(&n)),
                    Update::Notice(n) => live.println(&n.message),
                    Update::Cancel { host, task_id } => cancel(interrupt, &host, task_id, &live).await,
                    Update::Ended { host, task_id, outcome } => {
                        live.remove(host.as_str());
                        done.push(Followed { host, task_id, outcome });
                    }
                }
            }
        }
    }
    live.clear();
    done.sort_by_key(|f| order.iter().position(|(_, id)| *id == f.task_id));
    done
}

/// Sends `task_id` on `host` a signed `cancel`, saying so when it cannot.
async fn cancel(dispatch: Option<&Dispatch<'_>>, host: &HostName, task_id: TaskId, live: &Live) {
    let Some(d) = dispatch else {
        return live.println(&format!(
            "cannot cancel {task_id} on {host}: no signing key at hand"
        ));
    };
    let id = task_id.clone();
    if let Err(e) = d.publish(host, TaskKind::Cancel { task_id }).await {
        live.println(&format!("cannot cancel {id} on {host}: {e}"));
    }
}

/// A notice as a `--json` line: `{"type": "waiting", "notice", "host",
/// "task_id", "message"}` (scripts filter lines by `type`).
pub(super) fn notice_json(n: &Notice) -> serde_json::Value {
    json!({
        "type": "waiting",
        "notice": n.kind.as_str(),
        "host": n.host.as_ref().map(HostName::as_str),
        "task_id": n.task_id,
        "message": n.message,
    })
}

/// Width of plain progress lines, and of a terminal that will not say.
pub const PLAIN_WIDTH: usize = 80;

/// Live progress lines, one per key (a host, a task): redrawn in place on a
/// terminal, printed at most once a second per key elsewhere.
#[derive(Debug)]
pub(super) struct Live {
    mode: Mode,
}

#[derive(Debug)]
enum Mode {
    Bars {
        multi: MultiProgress,
        bars: BTreeMap<String, ProgressBar>,
        term: console::Term,
    },
    Lines {
        last: BTreeMap<String, Instant>,
        stdout: bool,
    },
}

impl Live {
    /// Progress on stderr, beside the command's results on stdout.
    pub(super) fn stderr() -> Self {
        Self::new(false)
    }

    /// Progress on stdout, for commands whose output it is (`watch`).
    pub(super) fn stdout() -> Self {
        Self::new(true)
    }

    fn new(stdout: bool) -> Self {
        let tty = if stdout {
            std::io::stdout().is_terminal()
        } else {
            std::io::stderr().is_terminal()
        };
        // A dumb terminal cannot move the cursor: plain lines there too.
        let dumb = std::env::var("TERM").is_ok_and(|t| t == "dumb");
        let mode = if tty && !dumb {
            let (target, term) = if stdout {
                (ProgressDrawTarget::stdout(), console::Term::stdout())
            } else {
                (ProgressDrawTarget::stderr(), console::Term::stderr())
            };
            Mode::Bars {
                multi: MultiProgress::with_draw_target(target),
                bars: BTreeMap::new(),
                term,
            }
        } else {
            Mode::Lines {
                last: BTreeMap::new(),
                stdout,
            }
        };
        Self { mode }
    }

    /// Columns a line may take.
    pub(super) fn width(&self) -> usize {
        match &self.mode {
            Mode::Bars { term, .. } => term
                .size_checked()
                .map_or(PLAIN_WIDTH, |(_, cols)| usize::from(cols)),
            Mode::Lines { .. } => PLAIN_WIDTH,
        }
    }

    /// Shows `line` as `key`'s progress.
    pub(super) fn set(&mut self, key: &str, line: String) {
        match &mut self.mode {
            Mode::Bars { multi, bars, .. } => {
                let bar = bars.entry(key.to_owned()).or_insert_with(|| {
                    // `wide_msg` cuts the line at the terminal's edge, should
                    // it be resized narrower than the line was made for.
                    let style = ProgressStyle::with_template("{wide_msg}")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner());
                    multi.add(ProgressBar::new_spinner().with_style(style))
                });
                bar.set_message(line);
            }
            Mode::Lines { last, stdout } => {
                let due = last
                    .get(key)
                    .is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
                if due {
                    last.insert(key.to_owned(), Instant::now());
                    if *stdout {
                        outln!("{line}");
                    } else {
                        eprintln!("{line}");
                    }
                }
            }
        }
    }

    /// Stops showing `key`.
    pub(super) fn remove(&mut self, key: &str) {
        if let Mode::Bars { multi, bars, .. } = &mut self.mode {
            if let Some(bar) = bars.remove(key) {
                bar.finish_and_clear();
                multi.remove(&bar);
            }
        }
    }

    /// Prints a line that stays, above the live ones.
    pub(super) fn println(&self, line: &str) {
        match &self.mode {
            Mode::Bars { multi, .. } => multi.suspend(|| eprintln!("{line}")),
            Mode::Lines { .. } => eprintln!("{line}"),
        }
    }

    /// Prints a result line on stdout, above the live ones.
    pub(super) fn outln(&self, line: &str) {
        match &self.mode {
            Mode::Bars { multi, .. } => multi.suspend(|| outln!("{line}")),
            Mode::Lines { .. } => outln!("{line}"),
        }
    }

    /// Takes the live lines off the screen.
    pub(super) fn clear(&mut self) {
        if let Mode::Bars { multi, bars, .. } = &mut self.mode {
            for (_, bar) in std::mem::take(bars) {
                bar.finish_and_clear();
            }
            let _ = multi.clear();
        }
    }
}

/// Seconds as `45s`, `3m05s`, `2h10m`.
fn eta(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m{:02}s", secs / 60, secs % 60),
        _ => format!("{}h{:02}m", secs / 3600, (secs % 3600) / 60),
    }
}

/// One task's progress in at most `width` columns, e.g.
/// `laptop       [####....]  52%  1204 files  1.2 GiB/3.0 GiB  45.0 MiB/s  ETA 20s`.
///
/// The host, the percentage, the bytes and the rate always show; the ETA,
/// the bar and the file count, in that order, only when they fit. A line
/// still too wide (a very long host name) is cut.
pub fn progress_line(host: &HostName, p: &TaskProgress, width: usize) -> String {
    let secs = (p.elapsed_ms as f64 / 1000.0).max(0.001);
    let rate = p.bytes as f64 / secs;
    let total = p.bytes_total.filter(|t| *t > 0);
    let frac = total.map(|t| (p.bytes as f64 / t as f64).min(1.0));
    // In display order: each part's priority (0 always shows), and the
    // space before it (the host, the bar and the percentage go together).
    let mut parts: Vec<(u8, &str, String)> = vec![(0, "", format!("{:<12}", host.as_str()))];
    if let Some(frac) = frac {
        let filled = (frac * 8.0) as usize;
        parts.push((
            2,
            " ",
            format!("[{}{}]", "#".repeat(filled), ".".repeat(8 - filled)),
        ));
        parts.push((0, " ", format!("{:>3.0}%", frac * 100.0)));
    }
    parts.push((3, "  ", format!("{} files", p.files)));
    parts.push((
        0,
        "  ",
        match total {
            Some(t) => format!("{}/{}", output::bytes(p.bytes), output::bytes(t)),
            None => output::bytes(p.bytes),
        },
    ));
    parts.push((0, "  ", format!("{}/s", output::bytes(rate as u64))));
    if let Some(t) = total.filter(|_| rate > 0.0) {
        let left = t.saturating_sub(p.bytes) as f64 / rate;
        parts.push((1, "  ", format!("ETA {}", eta(left as u64))));
    }
    let render = |parts: &[(u8, &str, String)], upto: u8| -> String {
        let mut line = String::new();
        for (_, sep, s) in parts.iter().filter(|(prio, _, _)| *prio <= upto) {
            if !line.is_empty() {
                line.push_str(sep);
            }
            line.push_str(s);
        }
        line
    };
    let line = (0..=3)
        .rev()
        .map(|upto| render(&parts, upto))
        .find(|l| l.chars().count() <= width)
        .unwrap_or_else(|| render(&parts, 0));
    line.chars().take(width).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(files: u64, bytes: u64, total: Option<u64>, elapsed_ms: u64) -> TaskProgress {
        TaskProgress {
            task_id: TaskId::new("t").expect("valid"),
            task_kind: "backup".into(),
            files,
            dirs: 0,
            bytes,
            current: None,
            files_total: None,
            bytes_total: total,
            elapsed_ms,
        }
    }

    fn host(name: &str) -> HostName {
        HostName::new(name).expect("valid host name")
    }

    const GIB: u64 = 1024 * 1024 * 1024;

    #[test]
    fn a_lost_subscription_is_not_reported_as_a_timeout() {
        let lost = Followed {
            host: host("laptop"),
            task_id: TaskId::new("t1").expect("valid"),
            outcome: Outcome::Lost("event subscription closed".into()),
        };
        match lost.finished(std::time::Duration::from_secs(24 * 3600)) {
            Err(CliError::Request { what, why }) => {
                assert_eq!(what, "follow task t1 on laptop");
                assert_eq!(why, "event subscription closed");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_progress_line_shows_everything_when_it_fits() {
        let line = progress_line(
            &host("laptop"),
            &progress(1204, GIB, Some(2 * GIB), 10_000),
            80,
        );
        assert_eq!(
            line,
            "laptop       [####....]  50%  1204 files  1.0 GiB/2.0 GiB  102.4 MiB/s  ETA 10s"
        );
        assert!(line.chars().count() <= 80, "{line}");
    }

    /// The worst case for 80 columns: a 16-character host name and big numbers.
    #[test]
    fn progress_lines_fit_80_columns_dropping_the_least_useful_first() {
        let p = progress(12_345_678, 999 * GIB, Some(1000 * GIB), 7_000);
        let line = progress_line(&host("storage-server-1"), &p, 80);
        assert!(line.chars().count() <= 80, "{} columns: {line}", line.len());
        assert!(line.starts_with("storage-server-1 "), "{line}");
        assert!(
            line.contains("100%") && line.contains("999.0 GiB/1000.0 GiB"),
            "{line}"
        );
        assert!(line.contains("GiB/s"), "{line}");
        assert!(!line.contains("files"), "the file count goes first: {line}");
        // Narrower still: only what always shows, then a cut.
        let narrow = progress_line(&host("storage-server-1"), &p, 50);
        assert!(narrow.chars().count() <= 50, "{narrow}");
        assert!(!narrow.contains('['), "{narrow}");
        assert_eq!(progress_line(&host("laptop"), &p, 10).chars().count(), 10);
    }

    #[test]
    fn without_a_total_there_is_no_bar_and_no_eta() {
        let line = progress_line(&host("nas"), &progress(7, 1536, None, 1_000), 80);
        assert_eq!(line, "nas           7 files  1.5 KiB  1.5 KiB/s");
    }

    #[test]
    fn etas_read_as_durations() {
        assert_eq!(eta(45), "45s");
        assert_eq!(eta(185), "3m05s");
        assert_eq!(eta(7800), "2h10m");
    }

    /// Scripts filter `--json` lines by `type`: a notice is `waiting`, with
    /// what it is about.
    #[test]
    fn a_notice_is_a_waiting_json_line() {
        let n = Notice {
            kind: crate::dispatch::NoticeKind::Offline,
            host: Some(host("laptop")),
            task_id: Some(TaskId::new("t1").expect("valid")),
            message: "laptop is offline".into(),
        };
        let v = notice_json(&n);
        assert_eq!(v["type"], "waiting");
        assert_eq!(v["notice"], "offline");
        assert_eq!(v["host"], "laptop");
        assert_eq!(v["task_id"], "t1");
        assert_eq!(v["message"], "laptop is offline");
        let conn = Notice {
            kind: crate::dispatch::NoticeKind::Reconnected,
            host: None,
            task_id: None,
            message: "reconnected".into(),
        };
        let v = notice_json(&conn);
        assert!(v["host"].is_null() && v["task_id"].is_null(), "{v}");
        assert_eq!(v["notice"], "reconnected");
    }
}
