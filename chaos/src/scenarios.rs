//! The fault scenarios, one file each, and what several of them share: a
//! task followed through a fault to its end.

mod bit_rot;
mod clock_skew;
mod disk_full;
mod io_error;
mod kill_nats;
mod kill_serve;
mod kill_source;
mod kill_storage;
mod network;
mod partition;
mod restart_nats;

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use flotilla_tests::{CliOutput, CliProcess};
use serde_json::Value;

use crate::trial::{Outcome, Trial};
use crate::world::{since_fault, summary_lines, wall_ms, World, RECOVERY_TIMEOUT};

/// A scenario: its name, what it does, and how many trials `--quick` runs.
#[derive(Debug, Clone, Copy)]
pub struct Scenario {
    /// The name `--scenarios` takes.
    pub name: &'static str,
    /// One line for `--list` and the report.
    pub about: &'static str,
    /// Trials in a `--quick` run.
    pub quick_trials: usize,
    /// Runs one trial: `Ok` when it passed or was skipped, `Err` with the
    /// reason when a criterion did not hold.
    pub run: fn(&mut Trial) -> Result<Outcome>,
}

/// Every scenario, in the order a run takes them.
pub const ALL: &[Scenario] = &[
    Scenario {
        name: "kill-source",
        about: "kill -9 the source agent mid-backup or mid-restore (its destination), restart it: the task resumes and completes",
        quick_trials: 2,
        run: kill_source::run,
    },
    Scenario {
        name: "kill-storage",
        about: "kill -9 the storage agent mid-backup, mid-restore or mid-prune, restart it: the task resumes, or fails clearly and a retry completes",
        // Each costs a minute: a source notices a dead storage agent only
        // when QUIC's 20 s idle timeout ends the connection.
        quick_trials: 1,
        run: kill_storage::run,
    },
    Scenario {
        name: "kill-serve",
        about: "kill -9 `flotilla serve` while its scheduled backup runs, start it again: the job completes, the daemon leads again",
        quick_trials: 1,
        run: kill_serve::run,
    },
    Scenario {
        name: "kill-nats",
        about: "kill -9 nats-server mid-backup or at the commit, start it again on the same port and store: the backup completes; `backup --wait` reports or fails clearly",
        quick_trials: 1,
        run: kill_nats::run,
    },
    Scenario {
        name: "restart-nats",
        about: "restart nats-server cleanly (SIGTERM) mid-backup or at the commit: as kill-nats",
        quick_trials: 1,
        run: restart_nats::run,
    },
    Scenario {
        name: "partition-short",
        about: "the source (own network namespace) cut from nas's QUIC port by nftables for 2-12 s mid-backup, less than the idle timeout: the backup rides it out",
        quick_trials: 1,
        run: partition::short,
    },
    Scenario {
        name: "partition-long",
        about: "the same partition for 25-40 s, more than QUIC's 20 s idle timeout: the backup fails clearly and retryably (or survives) and a retry succeeds",
        quick_trials: 0,
        run: partition::long,
    },
    Scenario {
        name: "packet-loss",
        about: "5% of the source's packets dropped at random each way (nftables), bus and data plane: the backup succeeds",
        quick_trials: 1,
        run: network::packet_loss,
    },
    Scenario {
        name: "bandwidth-cap",
        about: "the source's uplink capped at 40-100 Mbit/s (tbf): the backup succeeds no faster than the cap",
        quick_trials: 0,
        run: network::bandwidth_cap,
    },
    Scenario {
        name: "latency",
        about: "5-50 ms each way between source and storage (a userspace UDP delay proxy nas advertises): the backup succeeds",
        quick_trials: 1,
        run: network::latency,
    },
    Scenario {
        name: "disk-full",
        about: "the repository's tmpfs fills mid-backup: a clear failure, nothing committed damaged; enlarged, the next backup and check pass",
        quick_trials: 1,
        run: disk_full::run,
    },
    Scenario {
        name: "io-error",
        about: "EIO on nas's repository writes and fsyncs (LD_PRELOAD) mid-backup: a clear failure naming the I/O error, nas keeps running, a retry succeeds",
        quick_trials: 1,
        run: io_error::run,
    },
    Scenario {
        name: "clock-skew",
        about: "one agent's clock skewed (libfaketime) inside and beyond the 5-minute window: tasks run, or are refused with security.task_rejected; the fleet keeps working",
        quick_trials: 1,
        run: clock_skew::run,
    },
    Scenario {
        name: "bit-rot",
        about: "a flipped byte in a data blob of a random pack: check --read-data finds it and names the snapshot; repair (when built) heals it, else every unaffected snapshot restores",
        quick_trials: 1,
        run: bit_rot::run,
    },
];

/// The scenario called `name`.
pub fn by_name(name: &str) -> Option<&'static Scenario> {
    ALL.iter().find(|s| s.name == name)
}

// ---- shared by the scenarios ------------------------------------------------

/// When a fault was injected.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fault {
    /// Wall-clock milliseconds, to compare with event times.
    pub ms: u64,
    /// For deadlines counted from the fault.
    pub at: Instant,
    /// The fault took the bus away: recovery is measured to when the
    /// outcome was seen on the bus, not to the time the agent stamped on it
    /// (which can be before the bus came back).
    pub bus: bool,
}

impl Fault {
    /// Now.
    pub fn now() -> Self {
        Self {
            ms: wall_ms(),
            at: Instant::now(),
            bus: false,
        }
    }

    /// Now, a fault of the bus itself.
    pub fn of_bus() -> Self {
        Self {
            bus: true,
            ..Self::now()
        }
    }

    /// What is left of `bound` since the fault (at least a second).
    pub fn left(&self, bound: Duration) -> Duration {
        bound
            .saturating_sub(self.at.elapsed())
            .max(Duration::from_secs(1))
    }
}

/// How a task hit by a fault ended, as its `task.finished` event says.
#[derive(Debug)]
pub(crate) enum Ended {
    /// Succeeded (resumed, or never disturbed); the event, and when it was
    /// seen on the bus (since the fault).
    Succeeded(Value, Duration),
    /// Failed with this message; whether it is marked retryable.
    Failed(String, bool),
}

/// Waits for `task_id`'s `task.finished` within [`RECOVERY_TIMEOUT`] of the
/// fault. A failure must carry a message (a failure nobody can act on is
/// not "clear"); other outcomes (cancelled, partial) fail the trial.
pub(crate) fn task_end(w: &World, host: &str, task_id: &str, fault: &Fault) -> Result<Ended> {
    let ev = w.wait_finished(host, task_id, fault.left(RECOVERY_TIMEOUT))?;
    let seen = fault.at.elapsed();
    match ev["detail"]["outcome"].as_str() {
        Some("succeeded") => Ok(Ended::Succeeded(ev, seen)),
        Some("failed") => {
            let error = ev["detail"]["error"]
                .as_str()
                .unwrap_or("")
                .trim()
                .to_owned();
            if error.is_empty() {
                bail!("task {task_id} failed without saying why: {ev}");
            }
            let retryable = ev["detail"]["retryable"].as_bool().unwrap_or(false);
            Ok(Ended::Failed(error, retryable))
        }
        other => bail!("task {task_id} ended {other:?}: {ev}"),
    }
}

/// What a `--wait` command that was running during the fault did.
#[derive(Debug)]
pub(crate) enum CliEnd {
    /// Exited 0 with a succeeded summary.
    Reported,
    /// Exited non-zero with this first line of its error.
    FailedClearly(String),
}

/// Waits for a `--wait` command started before the fault, up to `bound`
/// from the fault. Running past it, exiting 0 without a succeeded summary
/// line for `summary_host` (when given: `backup` and `restore` print one),
/// or failing without a message are failures of the trial.
pub(crate) fn cli_end(
    proc: CliProcess,
    summary_host: Option<&str>,
    fault: &Fault,
    bound: Duration,
) -> Result<(CliEnd, CliOutput)> {
    let command = proc.command().to_owned();
    let out = proc.wait(fault.left(bound))?;
    if out.timed_out {
        bail!(
            "hung: `{command}` neither reported the outcome nor failed within {} s of the fault \
             (killed; issue 11: a waiting command that loses the bus must not wait forever in silence)\n{out}",
            bound.as_secs()
        );
    }
    if out.success() {
        if let Some(host) = summary_host {
            let summary = flotilla_tests::summary_of(&out, host)?;
            if summary["outcome"] != "succeeded" {
                bail!("`{command}` exited 0 without a succeeded summary:\n{out}");
            }
        }
        return Ok((CliEnd::Reported, out));
    }
    let message = first_error_line(&out);
    if message.is_empty() {
        bail!("`{command}` failed without a message:\n{out}");
    }
    Ok((CliEnd::FailedClearly(message), out))
}

/// [`cli_end`], noted in the trial.
pub(crate) fn note_cli_end(
    t: &mut Trial,
    proc: CliProcess,
    summary_host: Option<&str>,
    fault: &Fault,
    bound: Duration,
) -> Result<CliEnd> {
    let (end, _) = cli_end(proc, summary_host, fault, bound)?;
    match &end {
        CliEnd::Reported => t.note("the waiting command reported the outcome"),
        CliEnd::FailedClearly(line) => {
            t.note(format!("the waiting command failed clearly: {line}"))
        }
    }
    Ok(end)
}

/// The first line that says what went wrong: stderr, else the `--json`
/// error or summary line.
pub(crate) fn first_error_line(out: &CliOutput) -> String {
    if let Some(line) = out.stderr.lines().find(|l| !l.trim().is_empty()) {
        return line.trim().to_owned();
    }
    summary_lines(out)
        .lines()
        .find(|l| l.contains("error"))
        .unwrap_or("")
        .to_owned()
}

/// After a fault, the task ended: note how, and when it failed, retry it
/// with `retry` (what the daemon's retries, or an operator, would do), which
/// must succeed. The faults of these scenarios are transient (the process
/// or the bus comes back), so a failure must be marked retryable: otherwise
/// `flotilla serve` gives the job up at once instead of retrying it.
/// Records the recovery time: fault → the succeeded task (or retry).
/// Returns whether a retry was needed.
pub(crate) fn complete(
    t: &mut Trial,
    ended: Ended,
    fault: &Fault,
    retry: impl FnOnce(&mut Trial) -> Result<()>,
) -> Result<bool> {
    match ended {
        Ended::Succeeded(ev, seen) => {
            t.note("the task succeeded without a retry");
            t.recovered(if fault.bus {
                seen
            } else {
                since_fault(fault.ms, &ev)
            });
            Ok(false)
        }
        Ended::Failed(error, retryable) => {
            t.note(format!(
                "the task failed clearly (retryable: {retryable}): {error}"
            ));
            if !retryable {
                bail!(
                    "the task failed after a transient fault but is marked not retryable, \
                     so `flotilla serve` would not retry it: {error}"
                );
            }
            retry(t)?;
            t.note("the retry succeeded");
            t.recovered(fault.at.elapsed());
            Ok(true)
        }
    }
}

/// The retry of a failed backup of `host`, for [`complete`]: what the
/// daemon's retries, or an operator, would run; it must succeed.
pub(crate) fn retry_backup<'a>(
    w: &'a World,
    host: &'a str,
) -> impl FnOnce(&mut Trial) -> Result<()> + 'a {
    move |t| {
        let snapshot = w.backup_ok(host)?;
        t.note(format!("retried backup committed {snapshot}"));
        Ok(())
    }
}
