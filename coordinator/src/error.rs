//! The coordinator's errors, each with the exit code it maps to.
//!
//! Each error's `Display` is the whole message a person reads: one line (a
//! config file's list of mistakes aside) saying what happened, to what, and
//! what to do. `main` prints it once as `flotilla: MESSAGE`; whether trying
//! again may help ([`CliError::is_retryable`]) goes only to `--json` output
//! ([`CliError::to_json`]) and to the log, never into the sentence.

use std::path::PathBuf;

use flotilla_protocol::{RejectReason, TaskId};

use crate::fleet::FleetError;

/// Exit code: any other failure.
pub const EXIT_FAILURE: u8 = 1;
/// Exit code: bad command line (clap's own).
pub const EXIT_USAGE: u8 = 2;
/// Exit code: the host is unknown, or offline and did not answer in time.
pub const EXIT_HOST: u8 = 3;
/// Exit code: the task was rejected by the agent, failed, or did not finish
/// within its `--timeout` (3 instead when its host was offline then).
pub const EXIT_TASK: u8 = 4;
/// Exit code: the NATS server cannot be reached.
pub const EXIT_NATS: u8 = 5;
/// Exit code: interrupted (Ctrl-C) and cancelled cleanly, as shells expect.
pub const EXIT_CANCELLED: u8 = 130;
/// Exit code: finished, but some files could not be read or restored.
pub const EXIT_PARTIAL: u8 = 6;

/// What went wrong in a `flotilla` command.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The fleet directory is missing or broken.
    #[error(transparent)]
    Fleet(#[from] FleetError),
    /// No fleet directory was given where one is needed.
    #[error("no fleet directory: give --fleet DIR or set FLOTILLA_FLEET (create one with `flotilla init --fleet DIR`)")]
    NoFleet,
    /// NATS cannot be reached.
    #[error("cannot reach NATS at {url}: {why}; is nats-server running? (set --nats or FLOTILLA_NATS_URL)")]
    Nats {
        /// Server URL.
        url: String,
        /// Why.
        why: String,
    },
    /// A NATS or JetStream request failed after connecting.
    #[error("cannot {what}: {why}")]
    Request {
        /// What was attempted.
        what: String,
        /// Why.
        why: String,
    },
    /// The host has never been seen.
    #[error("host {0} is unknown: it has never connected (enroll it with `flotilla enroll {0}` and start its agent)")]
    HostUnknown(String),
    /// The host is offline: it did not run a queued task in time, or (with
    /// `waited_secs` 0 and no task) it is needed online right now.
    #[error("{}", offline_message(host, task_id.as_ref(), *waited_secs))]
    HostOffline {
        /// Host.
        host: String,
        /// Queued task, if one was sent.
        task_id: Option<TaskId>,
        /// How long we waited.
        waited_secs: u64,
    },
    /// `forget` acted on the storage hosts it could list and trust, and left
    /// these alone.
    #[error("nothing was forgotten on {} (not listed, or its listing not trusted: see the warnings above); run forget again once it answers, or `flotilla remove HOST` a storage host that is gone for good", .hosts.join(", "))]
    LeftAlone {
        /// The storage hosts left alone.
        hosts: Vec<String>,
        /// Whether any was only unreachable (asking again may help).
        unreachable: bool,
    },
    /// The host is online but did not finish in time.
    #[error("host {host} did not finish task {task_id} within {waited_secs} s; see `flotilla events --host {host}`")]
    Timeout {
        /// Host.
        host: String,
        /// Task.
        task_id: TaskId,
        /// How long we waited.
        waited_secs: u64,
    },
    /// `--timeout` ran out: the task was sent a signed `cancel`.
    #[error("{}", timed_out_message(host, task_id, *after_secs, *host_offline))]
    TimedOut {
        /// Host.
        host: String,
        /// Task.
        task_id: TaskId,
        /// The timeout, in seconds.
        after_secs: u64,
        /// The host was offline then (exit code 3, else 4).
        host_offline: bool,
    },
    /// The agent refused the task.
    #[error("host {host} rejected task {task_id}: {reason}: {detail}")]
    Rejected {
        /// Host.
        host: String,
        /// Task.
        task_id: TaskId,
        /// Why.
        reason: RejectReason,
        /// Detail.
        detail: String,
    },
    /// The task ran and failed.
    #[error("task {task_id} failed on {host}: {}", reason_or_events(error, host))]
    TaskFailed {
        /// Host.
        host: String,
        /// Task.
        task_id: TaskId,
        /// Error.
        error: String,
        /// Whether the agent said running it again may succeed.
        retryable: bool,
    },
    /// Tasks failed on some of several hosts; each host's error was printed
    /// with its result, so this only counts them.
    #[error("{what} failed on {} ({} of {total} hosts; each host's error is shown above)", .failed.join(", "), .failed.len())]
    HostsFailed {
        /// What the tasks were (`backup`).
        what: &'static str,
        /// The hosts whose task failed.
        failed: Vec<String>,
        /// How many hosts were asked.
        total: usize,
        /// Exit code of the first failure.
        code: u8,
        /// Whether every failure may go away when run again.
        retryable: bool,
    },
    /// One plan of several (`backup --all`) failed.
    #[error("plan {plan}: {source}")]
    Plan {
        /// The plan's name.
        plan: String,
        /// What went wrong.
        source: Box<CliError>,
    },
    /// Stopped on request (Ctrl-C); nothing half-done was committed.
    #[error("cancelled; the agents stopped cleanly and nothing half-done was committed")]
    Cancelled,
    /// Finished with some files skipped (listed above).
    #[error("finished, but some files could not be read or restored (listed above)")]
    Partial,
    /// Bad arguments that clap cannot check.
    #[error("{0}")]
    Usage(String),
    /// `flotilla serve` could not start; it says why, and its exit code.
    #[error(transparent)]
    Serve(#[from] crate::serve::ServeError),
    /// Reading or writing a file failed.
    #[error("cannot use {path}: {source}")]
    Io {
        /// What.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

impl CliError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Nats { .. } => EXIT_NATS,
            CliError::HostUnknown(_)
            | CliError::HostOffline { .. }
            | CliError::LeftAlone { .. } => EXIT_HOST,
            CliError::Rejected { .. } | CliError::TaskFailed { .. } => EXIT_TASK,
            CliError::TimedOut { host_offline, .. } => {
                if *host_offline {
                    EXIT_HOST
                } else {
                    EXIT_TASK
                }
            }
            CliError::Usage(_) => EXIT_USAGE,
            CliError::Partial => EXIT_PARTIAL,
            CliError::Cancelled => EXIT_CANCELLED,
            CliError::HostsFailed { code, .. } => *code,
            CliError::Plan { source, .. } => source.exit_code(),
            CliError::Serve(e) => e.exit_code(),
            _ => EXIT_FAILURE,
        }
    }

    /// The error for `--json` output: the same message, plus what a script
    /// needs to decide (`exit_code`, `retryable`).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "type": "error",
            "error": self.to_string(),
            "exit_code": self.exit_code(),
            "retryable": self.is_retryable(),
        })
    }

    /// Whether running the same command again later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            CliError::Plan { source, .. } => source.is_retryable(),
            CliError::Serve(e) => e.is_retryable(),
            CliError::TaskFailed { retryable, .. } => *retryable,
            CliError::LeftAlone { unreachable, .. } => *unreachable,
            CliError::HostsFailed { retryable, .. } => *retryable,
            _ => matches!(
                self,
                CliError::Nats { .. }
                    | CliError::Request { .. }
                    | CliError::HostOffline { .. }
                    | CliError::Timeout { .. }
                    | CliError::TimedOut { .. }
            ),
        }
    }
}

/// A failure's reason, or where to look when the agent gave none.
fn reason_or_events(error: &str, host: &str) -> String {
    if error.trim().is_empty() {
        format!("no reason given (see `flotilla events --host {host}`)")
    } else {
        error.to_owned()
    }
}

fn offline_message(host: &str, task_id: Option<&TaskId>, waited_secs: u64) -> String {
    let Some(task_id) = task_id.filter(|_| waited_secs > 0) else {
        return format!(
            "host {host} is offline; start its agent and try again (`flotilla hosts` shows when it was last seen)"
        );
    };
    format!(
        "host {host} is offline and did not run task {task_id} within {waited_secs} s; the task stays queued and runs when the host returns"
    )
}

fn timed_out_message(host: &str, task_id: &TaskId, after_secs: u64, host_offline: bool) -> String {
    let after = humantime::format_duration(std::time::Duration::from_secs(after_secs));
    if host_offline {
        format!(
            "host {host} is offline and did not run task {task_id} within {after} (--timeout); it was sent a cancel, which stops it when the host returns"
        )
    } else {
        format!(
            "task {task_id} did not finish on {host} within {after} (--timeout) and was sent a cancel; see `flotilla events --host {host}`"
        )
    }
}

pub(crate) fn request_err<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> CliError + '_ {
    move |e| CliError::Request {
        what: what.to_owned(),
        why: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t1() -> TaskId {
        TaskId::new("t1").expect("valid")
    }

    fn io_error() -> CliError {
        CliError::Io {
            path: PathBuf::from("/fleet/repo.key"),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        }
    }

    /// Every message is one line, says nothing about retrying, and names
    /// what it is about once.
    #[test]
    fn each_error_reads_as_one_plain_line() {
        let cases: Vec<(CliError, &str)> = vec![
            (
                CliError::Nats {
                    url: "nats://127.0.0.1:4222".into(),
                    why: "connection refused".into(),
                },
                "cannot reach NATS at nats://127.0.0.1:4222: connection refused; is nats-server running? (set --nats or FLOTILLA_NATS_URL)",
            ),
            (
                CliError::Request {
                    what: "read event stream".into(),
                    why: "timed out".into(),
                },
                "cannot read event stream: timed out",
            ),
            (
                CliError::HostOffline {
                    host: "nas".into(),
                    task_id: None,
                    waited_secs: 0,
                },
                "host nas is offline; start its agent and try again (`flotilla hosts` shows when it was last seen)",
            ),
            (
                CliError::HostOffline {
                    host: "laptop".into(),
                    task_id: Some(t1()),
                    waited_secs: 30,
                },
                "host laptop is offline and did not run task t1 within 30 s; the task stays queued and runs when the host returns",
            ),
            (
                CliError::TaskFailed {
                    host: "laptop".into(),
                    task_id: t1(),
                    error: "disk full".into(),
                    retryable: false,
                },
                "task t1 failed on laptop: disk full",
            ),
            (
                CliError::TaskFailed {
                    host: "laptop".into(),
                    task_id: t1(),
                    error: String::new(),
                    retryable: false,
                },
                "task t1 failed on laptop: no reason given (see `flotilla events --host laptop`)",
            ),
            (
                CliError::HostsFailed {
                    what: "backup",
                    failed: vec!["a".into(), "b".into()],
                    total: 3,
                    code: EXIT_TASK,
                    retryable: false,
                },
                "backup failed on a, b (2 of 3 hosts; each host's error is shown above)",
            ),
            (
                CliError::Plan {
                    plan: "home".into(),
                    source: Box::new(CliError::HostUnknown("nas".into())),
                },
                "plan home: host nas is unknown: it has never connected (enroll it with `flotilla enroll nas` and start its agent)",
            ),
            (
                io_error(),
                "cannot use /fleet/repo.key: no such file",
            ),
            (
                CliError::TimedOut {
                    host: "laptop".into(),
                    task_id: t1(),
                    after_secs: 300,
                    host_offline: false,
                },
                "task t1 did not finish on laptop within 5m (--timeout) and was sent a cancel; see `flotilla events --host laptop`",
            ),
            (
                CliError::TimedOut {
                    host: "laptop".into(),
                    task_id: t1(),
                    after_secs: 5,
                    host_offline: true,
                },
                "host laptop is offline and did not run task t1 within 5s (--timeout); it was sent a cancel, which stops it when the host returns",
            ),
        ];
        for (error, want) in cases {
            let text = error.to_string();
            assert_eq!(text, want);
            assert!(!text.contains('\n'), "{text}");
            assert!(!text.contains("retryable"), "{text}");
        }
    }

    /// `main` prints `Display` alone; a source that is also in the message
    /// must not be printed again by anything that walks the chain.
    #[test]
    fn the_source_text_appears_once_in_the_message() {
        let e = io_error();
        assert_eq!(e.to_string().matches("no such file").count(), 1);
        let e = CliError::Plan {
            plan: "home".into(),
            source: Box::new(io_error()),
        };
        assert_eq!(e.to_string().matches("no such file").count(), 1);
        assert_eq!(e.to_string().matches("repo.key").count(), 1);
    }

    #[test]
    fn retryability_and_exit_code_go_to_json() {
        let e = CliError::Plan {
            plan: "home".into(),
            source: Box::new(CliError::Timeout {
                host: "laptop".into(),
                task_id: t1(),
                waited_secs: 5,
            }),
        };
        let v = e.to_json();
        assert_eq!(v["type"], "error");
        assert_eq!(v["retryable"], true);
        assert_eq!(v["exit_code"], u64::from(EXIT_FAILURE));
        assert_eq!(v["error"], e.to_string());
        let failed = CliError::HostsFailed {
            what: "backup",
            failed: vec!["a".into()],
            total: 2,
            code: EXIT_HOST,
            retryable: false,
        };
        assert_eq!(failed.to_json()["exit_code"], u64::from(EXIT_HOST));
        assert_eq!(failed.to_json()["retryable"], false);
        // A task's failure is as retryable as its agent said.
        for retryable in [false, true] {
            let e = CliError::TaskFailed {
                host: "nas".into(),
                task_id: t1(),
                error: "connection lost during a transfer: timed out".into(),
                retryable,
            };
            assert_eq!(e.to_json()["retryable"], retryable);
        }
        // A `--timeout` that ran out: 4, or 3 when the host was offline.
        for (host_offline, code) in [(false, EXIT_TASK), (true, EXIT_HOST)] {
            let e = CliError::TimedOut {
                host: "laptop".into(),
                task_id: t1(),
                after_secs: 5,
                host_offline,
            };
            assert_eq!(e.to_json()["exit_code"], u64::from(code));
            assert_eq!(e.to_json()["retryable"], true);
        }
    }
}
