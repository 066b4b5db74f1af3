//! The coordinator's errors, each with the exit code it maps to.

use std::path::PathBuf;

use crate::fleet::FleetError;

/// Exit code: success.
pub const EXIT_OK: u8 = 0;
/// Exit code: any other failure.
pub const EXIT_FAILURE: u8 = 1;
/// Exit code: bad command line (clap's own).
pub const EXIT_USAGE: u8 = 2;
/// Exit code: the host is unknown, or offline and did not answer in time.
pub const EXIT_HOST: u8 = 3;
/// Exit code: the task was rejected by the agent or failed.
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
    #[error("{what}: {why}")]
    Request {
        /// What was attempted.
        what: String,
        /// Why.
        why: String,
    },
    /// The host has never been seen.
    #[error("host {0} is unknown: it has never connected (enroll it with `flotilla enroll {0}` and start its agent)")]
    HostUnknown(String),
    /// The host is offline and did not answer in time.
    #[error("host {host} is offline and did not run task {task_id} within {waited_secs} s; the task stays queued and runs when the host returns")]
    HostOffline {
        /// Host.
        host: String,
        /// Queued task.
        task_id: String,
        /// How long we waited.
        waited_secs: u64,
    },
    /// The host is online but did not finish in time.
    #[error("host {host} did not finish task {task_id} within {waited_secs} s; see `flotilla events --host {host}`")]
    Timeout {
        /// Host.
        host: String,
        /// Task.
        task_id: String,
        /// How long we waited.
        waited_secs: u64,
    },
    /// The agent refused the task.
    #[error("host {host} rejected task {task_id}: {reason}: {detail}")]
    Rejected {
        /// Host.
        host: String,
        /// Task.
        task_id: String,
        /// Reason code.
        reason: String,
        /// Detail.
        detail: String,
    },
    /// The task ran and failed.
    #[error("task {task_id} failed on {host}: {error}")]
    TaskFailed {
        /// Host.
        host: String,
        /// Task.
        task_id: String,
        /// Error.
        error: String,
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
    /// Writing output failed.
    #[error("cannot write {path}: {source}")]
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
            CliError::HostUnknown(_) | CliError::HostOffline { .. } => EXIT_HOST,
            CliError::Rejected { .. } | CliError::TaskFailed { .. } => EXIT_TASK,
            CliError::Usage(_) => EXIT_USAGE,
            CliError::Partial => EXIT_PARTIAL,
            CliError::Cancelled => EXIT_CANCELLED,
            _ => EXIT_FAILURE,
        }
    }

    /// Whether running the same command again later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            CliError::Nats { .. }
                | CliError::Request { .. }
                | CliError::HostOffline { .. }
                | CliError::Timeout { .. }
        )
    }
}

pub(crate) fn request_err<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> CliError + '_ {
    move |e| CliError::Request {
        what: what.to_owned(),
        why: e.to_string(),
    }
}
