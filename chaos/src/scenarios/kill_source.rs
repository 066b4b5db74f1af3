//! kill-source: `kill -9` of the source agent in the middle of its backup
//! (even trials), or of a restore's destination agent in the middle of the
//! restore (odd trials); the agent is started again after a random pause.
//!
//! Passes when the task resumes from the agent's journal and succeeds (a
//! failure is not enough here: nothing but the agent itself went away), the
//! `--wait` command that followed it reports the outcome or fails clearly,
//! and the world's checks hold (the restored tree of a restore trial too).

use std::collections::BTreeSet;

use anyhow::{bail, Result};
use flotilla_tests::{restored_path, tree_differences, Compare};

use super::{note_cli_end, task_end, Ended, Fault};
use crate::trial::{Outcome, Trial};
use crate::world::{Moment, Source, Spec, World, DATA_TIMEOUT, STARTUP_TIMEOUT, WAIT_CLI_TIMEOUT};

const HOST: &str = "alpha";

pub(super) fn run(t: &mut Trial) -> Result<Outcome> {
    let bytes = t.random_mib(100, 201);
    let spec = Spec {
        sources: vec![Source::new(HOST, bytes).restore_root()],
        ..Spec::default()
    };
    let mut w = World::start(t, &spec)?;
    if t.index % 2 == 0 {
        during_backup(t, &mut w, bytes)?;
    } else {
        during_restore(t, &mut w, bytes)?;
    }
    w.verify(t)?;
    Ok(Outcome::Passed)
}

/// Kills the agent at `moment` of the task `proc` follows, and starts it
/// again after a random pause. Returns the fault.
fn kill_at(
    t: &mut Trial,
    w: &mut World,
    moment: Moment,
    target: Option<&std::path::Path>,
    proc: &mut flotilla_tests::CliProcess,
) -> Result<Fault> {
    let landed = w.wait_moment(moment, target, DATA_TIMEOUT, || proc.is_running())?;
    w.kill_agent(HOST)?;
    let fault = Fault::now();
    t.note(if landed {
        format!("kill -9 {HOST} at {moment:?}")
    } else {
        format!("kill -9 {HOST}: the task ended before {moment:?}, the kill landed after it")
    });
    if !landed {
        t.missed(format!("the task ended before {moment:?}"));
    }
    let down = t.millis(200, 3000);
    std::thread::sleep(down);
    w.restart_agent(HOST)?;
    t.note(format!(
        "{HOST} restarted after {} ms down",
        down.as_millis()
    ));
    Ok(fault)
}

fn during_backup(t: &mut Trial, w: &mut World, bytes: u64) -> Result<()> {
    let mut proc = w.spawn_backup(HOST)?;
    let at = (bytes as f64 * t.fraction(0.1, 0.9)) as u64;
    let fault = kill_at(t, w, Moment::Stored(at), None, &mut proc)?;
    let task = w.wait_new_task(HOST, "backup", &BTreeSet::new(), STARTUP_TIMEOUT)?;
    finish(t, w, &task, &fault, proc)
}

fn during_restore(t: &mut Trial, w: &mut World, bytes: u64) -> Result<()> {
    let snapshot = w.backup_ok(HOST)?;
    t.note(format!("backed up {HOST}: snapshot {snapshot}"));
    let dir = w.restore_root(HOST).join("chaos");
    let mut proc = w.spawn_restore(&snapshot, HOST, &dir)?;
    let at = (bytes as f64 * t.fraction(0.1, 0.9)) as u64;
    let fault = kill_at(t, w, Moment::Restored(at), Some(&dir), &mut proc)?;
    let task = w.wait_new_task(HOST, "restore", &BTreeSet::new(), STARTUP_TIMEOUT)?;
    finish(t, w, &task, &fault, proc)?;
    let root = w.root(HOST)?;
    let diffs = tree_differences(&root, &restored_path(&dir, &root), Compare::Contents)?;
    if !diffs.is_empty() {
        bail!(
            "the resumed restore into {} differs from {}:\n  {}",
            dir.display(),
            root.display(),
            diffs.join("\n  ")
        );
    }
    t.note("the resumed restore is byte for byte the original");
    Ok(())
}

/// The task must succeed; the `--wait` command must report or fail clearly.
fn finish(
    t: &mut Trial,
    w: &World,
    task: &str,
    fault: &Fault,
    proc: flotilla_tests::CliProcess,
) -> Result<()> {
    match task_end(w, HOST, task, fault)? {
        Ended::Succeeded(ev, _) => {
            t.note("the task resumed and succeeded");
            t.recovered(crate::world::since_fault(fault.ms, &ev));
        }
        Ended::Failed(error, _) => {
            bail!("task {task} failed after {HOST} restarted instead of resuming: {error}")
        }
    }
    note_cli_end(t, proc, Some(HOST), fault, WAIT_CLI_TIMEOUT)?;
    Ok(())
}
