//! io-error: the storage agent's repository writes fail with `EIO` (an
//! `LD_PRELOAD` shim, see `crate::eio`) from a random moment of a backup
//! until the backup has ended: every write and fsync (even trials), or only
//! fsync and fdatasync (odd trials: the disk refuses to keep what it took).
//! A first host's snapshot is committed before, and must survive.
//!
//! Passes when the backup fails with a message that names the I/O error
//! (in its `task.finished` event and from the `--wait` command), nas keeps
//! running, the shim provably failed calls, and once the disk is healthy
//! again a retry succeeds and the world's checks hold.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{bail, Result};

use super::{first_error_line, task_end, Ended, Fault};
use crate::eio::{self, Calls, EioSwitch};
use crate::trial::{Outcome, Trial};
use crate::world::{
    Moment, Source, Spec, World, DATA_TIMEOUT, STARTUP_TIMEOUT, STORAGE, WAIT_CLI_TIMEOUT,
};

const FIRST: &str = "alpha";
const HOST: &str = "beta";
/// How long the disk stays bad when the backup does not end first.
const BAD_FOR: Duration = Duration::from_secs(30);

pub(super) fn run(t: &mut Trial) -> Result<Outcome> {
    if let Err(e) = eio::shim() {
        return Ok(Outcome::Skipped(format!("{e:#}")));
    }
    let dir = tempfile::tempdir()?;
    let flag = dir.path().join("eio");
    let switch = EioSwitch::new(&flag);
    let first = t.random_mib(30, 61);
    let bytes = t.random_mib(100, 201);
    let spec = Spec {
        sources: vec![Source::new(FIRST, first), Source::new(HOST, bytes)],
        nas_eio: Some(flag.clone()),
        ..Spec::default()
    };
    let mut w = World::start(t, &spec)?;
    let kept = w.backup_ok(FIRST)?;
    t.note(format!("{FIRST} backed up first: snapshot {kept}"));

    let calls = if t.index % 2 == 0 {
        Calls::All
    } else {
        Calls::Sync
    };
    let mut proc = w.spawn_backup(HOST)?;
    let base = w.stored_bytes();
    let moment = Moment::Stored(base + (bytes as f64 * t.fraction(0.1, 0.9)) as u64);
    let landed = w.wait_moment(moment, None, DATA_TIMEOUT, || proc.is_running())?;
    switch.on(calls)?;
    let fault = Fault::now();
    t.note(format!(
        "EIO on nas's repository ({calls:?}) from {moment:?}"
    ));
    if !landed {
        t.missed(format!("the backup ended before {moment:?}"));
    }
    let task = w.wait_new_task(HOST, "backup", &BTreeSet::new(), STARTUP_TIMEOUT)?;
    // The disk stays bad until the task has ended (or BAD_FOR has passed).
    let _ = w.wait_finished(HOST, &task, BAD_FOR);
    switch.off()?;
    let hits = switch.hits();
    t.note(format!(
        "the disk is healthy again; {hits} calls failed with EIO"
    ));
    let ended = task_end(&w, HOST, &task, &fault)?;
    if landed && hits == 0 {
        t.missed("no repository call came while the disk was bad");
    }
    let out = proc.wait(fault.left(WAIT_CLI_TIMEOUT))?;
    if out.timed_out {
        bail!("hung: the backup's --wait did not end within {WAIT_CLI_TIMEOUT:?} of the fault:\n{out}");
    }
    match ended {
        Ended::Succeeded(..) if hits > 0 => {
            bail!("the backup succeeded although {hits} repository calls failed with EIO")
        }
        Ended::Succeeded(..) => t.note("the backup succeeded (no call hit the bad disk)"),
        Ended::Failed(error, retryable) => {
            let said = first_error_line(&out);
            let names_io = |s: &str| {
                let s = s.to_lowercase();
                s.contains("i/o error") || s.contains("input/output error")
            };
            if !names_io(&error) {
                bail!("the backup failed without naming the I/O error: {error}");
            }
            if out.success() || said.is_empty() {
                bail!("`backup --wait` did not fail clearly:\n{out}");
            }
            t.note(format!(
                "the backup failed clearly (retryable: {retryable}): {error}"
            ));
            t.note(format!("the waiting command said: {said}"));
            if !w.agent(STORAGE)?.is_running() {
                bail!(
                    "nas exited after the I/O errors:\n{}",
                    w.agent(STORAGE)?.log()
                );
            }
            let snapshot = w.backup_ok(HOST)?;
            t.note(format!("retried backup committed {snapshot}"));
            t.recovered(fault.at.elapsed());
        }
    }
    w.verify(t)?;
    Ok(Outcome::Passed)
}
