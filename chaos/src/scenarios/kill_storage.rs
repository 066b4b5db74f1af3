//! kill-storage: `kill -9` of the storage agent, restarted after a random
//! pause, in the middle of one of three tasks (by trial index):
//!
//! 0. a backup into it;
//! 1. a restore out of it onto the source host;
//! 2. a prune of it (after a forget left an old snapshot's packs garbage).
//!
//! Passes when the interrupted task resumes and succeeds, or fails with a
//! message in its `task.finished` event and one retry (what `flotilla
//! serve`'s retries or an operator would do) succeeds; the `--wait` command
//! that followed it reports the outcome or fails clearly; and the world's
//! checks hold.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use flotilla_tests::{pack_files, restored_path, tree_differences, Compare};

use super::{complete, note_cli_end, task_end, Fault};
use crate::trial::{Outcome, Trial};
use crate::world::{
    Moment, Source, Spec, World, DATA_TIMEOUT, MIB, STARTUP_TIMEOUT, STORAGE, WAIT_CLI_TIMEOUT,
};

const HOST: &str = "alpha";

pub(super) fn run(t: &mut Trial) -> Result<Outcome> {
    match t.index % 3 {
        0 => during_backup(t)?,
        1 => during_restore(t)?,
        _ => during_prune(t)?,
    }
    Ok(Outcome::Passed)
}

fn world(t: &mut Trial, mib: (u64, u64)) -> Result<(World, u64)> {
    let bytes = t.random_mib(mib.0, mib.1);
    let spec = Spec {
        sources: vec![Source::new(HOST, bytes).restore_root()],
        ..Spec::default()
    };
    Ok((World::start(t, &spec)?, bytes))
}

/// Kills nas once `reached` says so (or the task ended), restarts it after
/// a random pause, and returns the fault.
fn kill_nas(t: &mut Trial, w: &mut World, what: &str, landed: bool) -> Result<Fault> {
    w.kill_agent(STORAGE)?;
    let fault = Fault::now();
    t.note(if landed {
        format!("kill -9 nas {what}")
    } else {
        format!("kill -9 nas: the task ended before {what}, the kill landed after it")
    });
    if !landed {
        t.missed(format!("the task ended before {what}"));
    }
    let down = t.millis(200, 3000);
    std::thread::sleep(down);
    w.restart_agent(STORAGE)?;
    t.note(format!("nas restarted after {} ms down", down.as_millis()));
    Ok(fault)
}

fn during_backup(t: &mut Trial) -> Result<()> {
    let (mut w, bytes) = world(t, (100, 201))?;
    let mut proc = w.spawn_backup(HOST)?;
    let moment = Moment::Stored((bytes as f64 * t.fraction(0.1, 0.9)) as u64);
    let landed = w.wait_moment(moment, None, DATA_TIMEOUT, || proc.is_running())?;
    let fault = kill_nas(t, &mut w, &format!("mid-backup at {moment:?}"), landed)?;
    let task = w.wait_new_task(HOST, "backup", &BTreeSet::new(), STARTUP_TIMEOUT)?;
    let ended = task_end(&w, HOST, &task, &fault)?;
    note_cli_end(t, proc, Some(HOST), &fault, WAIT_CLI_TIMEOUT)?;
    complete(t, ended, &fault, super::retry_backup(&w, HOST))?;
    w.verify(t)
}

fn during_restore(t: &mut Trial) -> Result<()> {
    let (mut w, bytes) = world(t, (100, 201))?;
    let snapshot = w.backup_ok(HOST)?;
    t.note(format!("backed up {HOST}: snapshot {snapshot}"));
    let dir = w.restore_root(HOST).join("chaos");
    let mut proc = w.spawn_restore(&snapshot, HOST, &dir)?;
    let moment = Moment::Restored((bytes as f64 * t.fraction(0.1, 0.9)) as u64);
    let landed = w.wait_moment(moment, Some(&dir), DATA_TIMEOUT, || proc.is_running())?;
    let fault = kill_nas(t, &mut w, &format!("mid-restore at {moment:?}"), landed)?;
    let task = w.wait_new_task(HOST, "restore", &BTreeSet::new(), STARTUP_TIMEOUT)?;
    let ended = task_end(&w, HOST, &task, &fault)?;
    note_cli_end(t, proc, Some(HOST), &fault, WAIT_CLI_TIMEOUT)?;
    let root = w.root(HOST)?;
    let retried = complete(t, ended, &fault, |_| {
        // Into the same directory: the retry must cope with what the
        // interrupted restore left there.
        let diffs = w.restore_and_compare(&snapshot, HOST, &dir, &root)?;
        if !diffs.is_empty() {
            bail!("the retried restore differs:\n  {}", diffs.join("\n  "));
        }
        Ok(())
    })?;
    if !retried {
        let diffs = tree_differences(&root, &restored_path(&dir, &root), Compare::Contents)?;
        if !diffs.is_empty() {
            bail!("the resumed restore differs:\n  {}", diffs.join("\n  "));
        }
    }
    t.note("the restored tree is byte for byte the original");
    w.verify(t)
}

fn during_prune(t: &mut Trial) -> Result<()> {
    let (mut w, _) = world(t, (60, 121))?;
    let old = w.backup_ok(HOST)?;
    let new_bytes = t.random_mib(30, 61);
    w.rewrite(t, HOST, new_bytes)?;
    let kept = w.backup_ok(HOST)?;
    t.note(format!(
        "snapshot {old} of old data, {kept} of new data ({} MiB)",
        new_bytes / MIB
    ));
    let out = w.cli_ok(&["forget", "--host", HOST, "--keep-last", "1", "--json"])?;
    if !out.stdout.contains(&old) {
        bail!("forget --keep-last 1 did not forget {old}:\n{out}");
    }
    let before = packs(&w);
    let known = w.started_tasks(STORAGE, "prune")?;
    let mut proc = w
        .fleet
        .spawn_cli(["prune", STORAGE, "--grace", "0s", "--json"])?;
    // Prune deletes pack after pack: kill after a random number of them
    // (0: as soon as the task is sent).
    let deletions = t.range(0, 4) as usize;
    let deadline = Instant::now() + DATA_TIMEOUT;
    let mut landed = true;
    if deletions == 0 {
        std::thread::sleep(t.millis(50, 400));
    } else {
        while packs(&w) + deletions > before {
            if !proc.is_running() {
                landed = false;
                break;
            }
            if Instant::now() > deadline {
                bail!("prune deleted fewer than {deletions} packs within {DATA_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let fault = kill_nas(
        t,
        &mut w,
        &format!("mid-prune after {deletions} of {before} packs deleted"),
        landed,
    )?;
    let task = w
        .wait_new_task(STORAGE, "prune", &known, STARTUP_TIMEOUT)
        .context("the prune task never started (killed before it ran?)");
    match task {
        Ok(task) => {
            let ended = task_end(&w, STORAGE, &task, &fault)?;
            note_cli_end(t, proc, None, &fault, WAIT_CLI_TIMEOUT)?;
            complete(t, ended, &fault, |_| prune_ok(&w))?;
        }
        Err(e) => {
            t.note(format!("{e:#}"));
            let out = proc.wait(fault.left(WAIT_CLI_TIMEOUT))?;
            if out.timed_out {
                bail!("hung: `prune` did not end within {WAIT_CLI_TIMEOUT:?} of the fault:\n{out}");
            }
            prune_ok(&w)?;
            t.recovered(fault.at.elapsed());
        }
    }
    t.note(format!("{} packs left of {before}", packs(&w)));
    w.verify(t)
}

/// Pack files in nas's repository (0 while it cannot be listed).
fn packs(w: &World) -> usize {
    pack_files(&w.storage_dir().join("packs"))
        .map(|p| p.len())
        .unwrap_or(0)
}

fn prune_ok(w: &World) -> Result<()> {
    let out = w.cli(&["prune", STORAGE, "--grace", "0s", "--json"], DATA_TIMEOUT)?;
    if !out.success() {
        bail!("prune after the restart failed:\n{out}");
    }
    Ok(())
}
