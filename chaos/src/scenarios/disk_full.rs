//! disk-full: nas keeps its repository on a small tmpfs (48–96 MiB, chosen
//! by the seed). A small host's backup fits and commits; then a source with
//! more data than the disk holds backs up and fills it mid-transfer.
//!
//! Passes when that backup fails within the bound with a message that says
//! the disk is full (in the command's output and in its `task.finished`
//! event), `check --read-data` still passes on the full disk (nothing
//! committed is damaged, and check does not need free space), and after
//! the tmpfs is enlarged to 1 GiB the next backup of the big source
//! succeeds and the world's checks hold. Needs root (mount); skipped
//! otherwise.

use std::time::Instant;

use anyhow::{bail, Context, Result};

use super::Fault;
use crate::tmpfs::is_root;
use crate::trial::{Outcome, Trial};
use crate::world::{dir_bytes, Source, Spec, World, DATA_TIMEOUT, MIB, STARTUP_TIMEOUT};

const SMALL: &str = "small";
const BIG: &str = "alpha";
/// What a clear disk-full message contains (any of these, case-insensitive).
const FULL_WORDS: &[&str] = &[
    "no space",
    "space left",
    "disk full",
    "disk is full",
    "enospc",
    "out of space",
];
/// The size the tmpfs grows to once full.
const ENLARGED_MIB: u64 = 1024;

pub(super) fn run(t: &mut Trial) -> Result<Outcome> {
    if !is_root() {
        return Ok(Outcome::Skipped(
            "needs root to mount a tmpfs (run as root, e.g. in CI)".into(),
        ));
    }
    let disk_mib = t.range(48, 97);
    let small = t.random_mib(4, 13);
    // Always more than the disk holds, so the fill lands mid-transfer.
    let big = disk_mib * MIB + t.random_mib(40, 101);
    let spec = Spec {
        sources: vec![Source::new(SMALL, small), Source::new(BIG, big)],
        nas_tmpfs_mib: Some(disk_mib),
        ..Spec::default()
    };
    let w = World::start(t, &spec)?;
    t.note(format!("nas's repository is on a {disk_mib} MiB tmpfs"));
    let first = w.backup_ok(SMALL)?;
    t.note(format!("{SMALL} backed up: {first}"));

    let known = w.started_tasks(BIG, "backup")?;
    let out = w.backup(BIG, DATA_TIMEOUT)?;
    let fault = Fault::now();
    if out.success() {
        bail!(
            "the backup of {BIG} ({} MiB) into a {disk_mib} MiB disk succeeded:\n{out}",
            big / MIB
        );
    }
    let said = format!("{}\n{}", out.stderr, out.stdout).to_lowercase();
    if !FULL_WORDS.iter().any(|w| said.contains(w)) {
        bail!("the backup into a full disk failed without saying the disk is full:\n{out}");
    }
    let task = w.wait_new_task(BIG, "backup", &known, STARTUP_TIMEOUT)?;
    let event = w
        .finished_events(BIG, &task)?
        .into_iter()
        .next()
        .with_context(|| format!("no task.finished event for the failed backup {task}"))?;
    let error = event["detail"]["error"]
        .as_str()
        .unwrap_or("")
        .to_lowercase();
    if event["detail"]["outcome"] != "failed" || !FULL_WORDS.iter().any(|w| error.contains(w)) {
        bail!("the task.finished event of {task} does not say the disk is full: {event}");
    }
    t.note(format!(
        "the backup failed clearly: {} ({} MiB of {disk_mib} MiB used)",
        event["detail"]["error"].as_str().unwrap_or(""),
        dir_bytes(&w.storage_dir()) / MIB
    ));

    // Nothing committed is damaged, and check works on a full disk.
    w.check_ok()
        .context("check --read-data on the full disk (issue 11: check after a disk-full)")?;
    t.note("check --read-data passes on the full disk");

    w.tmpfs()
        .context("the world has no tmpfs")?
        .resize(ENLARGED_MIB)?;
    let freed = Instant::now();
    t.note(format!(
        "tmpfs enlarged to {ENLARGED_MIB} MiB, {} s after the failure",
        fault.at.elapsed().as_secs()
    ));
    let second = w.backup_ok(BIG)?;
    t.note(format!("{BIG} backed up after the enlargement: {second}"));
    // Recovery here runs from the moment the disk has room again: how long
    // the disk stays full is the operator's doing, not the product's.
    t.recovered(freed.elapsed());
    w.verify(t)?;
    Ok(Outcome::Passed)
}
