//! kill-nats: nats-server is killed with SIGKILL while a backup runs and
//! started again on the same port with the same JetStream store after a
//! random pause. The moment is the instant the snapshot file appears (even
//! trials: the commit, before anyone heard of it, where the bug of issue 11
//! lost the outcome) or a random point mid-transfer (odd trials).
//!
//! Passes when the agents reconnect, the backup's `task.finished` arrives
//! (succeeded, or failed with a message and then one retry succeeds)
//! within the bound, the `flotilla backup --wait` that was running reports
//! the outcome or fails with a clear message within 120 s of the fault (60 s
//! in a `--quick` run; killed and counted as a failure otherwise: issue 11's
//! "waits forever"),
//! and the world's checks hold.
//!
//! `restart-nats` runs the same trial with a clean restart (SIGTERM).

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{bail, Result};

use super::{complete, note_cli_end, task_end, Fault};
use crate::trial::{Outcome, Trial};
use crate::world::{
    snapshot_of, Moment, Source, Spec, World, DATA_TIMEOUT, RECOVERY_TIMEOUT, STARTUP_TIMEOUT,
    STORAGE, WAIT_CLI_TIMEOUT,
};

const HOST: &str = "alpha";
/// The waiting command's bound in a `--quick` run: the bus is back within
/// 3 s, so a minute is still generous, and a hang costs a minute less.
const QUICK_WAIT_BOUND: Duration = Duration::from_secs(60);

/// How nats-server goes away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stop {
    /// SIGKILL, then started again.
    Kill,
    /// SIGTERM (as `systemctl restart`), then started again.
    Clean,
}

pub(super) fn run(t: &mut Trial) -> Result<Outcome> {
    trial(t, Stop::Kill)
}

pub(super) fn trial(t: &mut Trial, stop: Stop) -> Result<Outcome> {
    let bytes = t.random_mib(100, 201);
    let spec = Spec {
        sources: vec![Source::new(HOST, bytes)],
        ..Spec::default()
    };
    let mut w = World::start(t, &spec)?;
    // Even trials aim at the commit (the outcome is then published while
    // the bus is away: issue 11's lost answer), odd ones mid-transfer.
    let moment = if t.index % 2 == 0 {
        Moment::Committed
    } else {
        Moment::Stored((bytes as f64 * t.fraction(0.1, 0.9)) as u64)
    };
    let mut proc = w.spawn_backup(HOST)?;
    let landed = w.wait_moment(moment, None, DATA_TIMEOUT, || proc.is_running())?;
    let down = t.millis(200, 3000);
    let fault = Fault::of_bus();
    match stop {
        Stop::Kill => {
            w.nats.kill9()?;
            std::thread::sleep(down);
            w.nats.start_again()?;
        }
        Stop::Clean => w.nats.restart(down)?,
    }
    t.note(format!(
        "{} nats-server {}, back after {} ms",
        match stop {
            Stop::Kill => "kill -9",
            Stop::Clean => "restarted",
        },
        if landed {
            format!("at {moment:?}")
        } else {
            "after the backup ended".to_owned()
        },
        down.as_millis()
    ));
    if !landed {
        t.missed("the backup ended before the bus went away");
    }
    w.wait_online(&[STORAGE.to_owned(), HOST.to_owned()], STARTUP_TIMEOUT)?;
    t.note("agents reconnected");

    let task = w.wait_new_task(HOST, "backup", &BTreeSet::new(), STARTUP_TIMEOUT)?;
    let ended = match task_end(&w, HOST, &task, &fault) {
        Ok(ended) => ended,
        Err(e) => {
            // No outcome on the bus: was the snapshot committed anyway?
            let committed = w
                .snapshots()?
                .into_iter()
                .find(|s| s["task_id"] == task.as_str());
            match committed {
                Some(s) => bail!(
                    "snapshot {} of task {task} was committed, but its task.finished never \
                     reached the bus within {RECOVERY_TIMEOUT:?} (lost in the outage): {e:#}",
                    s["id"]
                ),
                None => bail!("task {task} never finished: {e:#}"),
            }
        }
    };
    if let super::Ended::Succeeded(ev, _) = &ended {
        t.note(format!(
            "task.finished: succeeded, snapshot {}",
            snapshot_of(ev).unwrap_or_default()
        ));
    }
    // The command that waited through the outage: an answer or a clear
    // failure within the bound, never silence. A hang fails the trial, but
    // only after the rest is checked, so the report says what else held.
    let bound = if t.quick {
        QUICK_WAIT_BOUND
    } else {
        WAIT_CLI_TIMEOUT
    };
    let waited = note_cli_end(t, proc, Some(HOST), &fault, bound);
    complete(t, ended, &fault, super::retry_backup(&w, HOST))?;
    w.verify(t)?;
    if let Err(e) = waited {
        return Err(e.context(
            "the waiting command failed the trial (the backup itself completed and every other check passed)",
        ));
    }
    Ok(Outcome::Passed)
}
