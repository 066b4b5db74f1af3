//! bit-rot: two hosts with unrelated data are backed up; then one byte
//! inside a data blob of a random pack of nas's repository is inverted
//! (pack, blob and offset chosen by the seed, read from the pack's own
//! layout with `pack_entries`).
//!
//! Passes when `check --read-data` exits 4, names the snapshot whose backup
//! wrote that pack among the affected ones and raises a `check.failed`
//! event naming it; and then either
//!
//! - [`repair_step`] ran `flotilla repair nas --wait` (when the CLI has
//!   that subcommand), a backup of the affected host followed, and
//!   `check --read-data` passes and every snapshot restores byte for byte;
//! - or, without `repair`, every snapshot *not* named affected restores
//!   byte for byte.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use flotilla_tests::{check_report, flip_byte, pack_entries, pack_files};
use serde_json::Value;

use crate::trial::{Outcome, Trial};
use crate::world::{poll, Source, Spec, World, DATA_TIMEOUT, STORAGE};

const HOSTS: [&str; 2] = ["alpha", "beta"];
/// How long the `check.failed` event may take.
const EVENT_TIMEOUT: Duration = Duration::from_secs(30);

pub(super) fn run(t: &mut Trial) -> Result<Outcome> {
    let sizes = [t.random_mib(60, 121), t.random_mib(30, 61)];
    let spec = Spec {
        sources: vec![
            Source::new(HOSTS[0], sizes[0]),
            Source::new(HOSTS[1], sizes[1]),
        ],
        ..Spec::default()
    };
    let w = World::start(t, &spec)?;
    // Which backup wrote which packs: the damaged pack names its snapshot.
    let mut wrote: Vec<(String, String, BTreeSet<PathBuf>)> = Vec::new();
    for host in HOSTS {
        let before = packs(&w)?;
        let snapshot = w.backup_ok(host)?;
        let after = packs(&w)?;
        wrote.push((
            host.to_owned(),
            snapshot,
            after.difference(&before).cloned().collect(),
        ));
    }

    // A data blob of a random pack that holds one.
    let mut candidates = Vec::new();
    for (host, snapshot, packs) in &wrote {
        for pack in packs {
            let blobs: Vec<_> = pack_entries(pack)?
                .into_iter()
                .filter(|e| e.kind == 0 && e.length > 0)
                .collect();
            if !blobs.is_empty() {
                candidates.push((host.clone(), snapshot.clone(), pack.clone(), blobs));
            }
        }
    }
    if candidates.is_empty() {
        bail!("the backups wrote no pack with a data blob");
    }
    let pick = t.range(0, candidates.len() as u64) as usize;
    let (host, snapshot, pack, blobs) = &candidates[pick];
    let blob = blobs[t.range(0, blobs.len() as u64) as usize];
    let offset = blob.offset + t.range(0, blob.length);
    flip_byte(pack, offset)?;
    t.note(format!(
        "flipped byte {offset} of {} (a data blob of {host}'s snapshot {snapshot})",
        pack.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    ));

    let out = w.check(true)?;
    if out.code != Some(4) {
        bail!("check --read-data after a flipped byte should exit 4:\n{out}");
    }
    let report = check_report(&out)?;
    let affected: BTreeSet<String> = report["affected_snapshots"]
        .as_array()
        .map(|l| {
            l.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    if report["ok"] != false || !affected.contains(snapshot) {
        bail!("check --read-data does not name {snapshot} as affected:\n{out}");
    }
    let names = |ev: &Value| {
        ev["detail"]["affected_snapshots"]
            .as_array()
            .is_some_and(|l| l.iter().any(|s| s == snapshot.as_str()))
    };
    poll(
        "a check.failed event naming the snapshot",
        EVENT_TIMEOUT,
        Duration::from_millis(250),
        || {
            Ok(w.events("check.failed", Some(STORAGE))?
                .into_iter()
                .find(|e| names(e)))
        },
    )?;
    t.note(format!(
        "check --read-data found it: exit 4, affected {affected:?}, check.failed raised"
    ));

    if repair_step(t, &w)? {
        let healed = w.backup_ok(host)?;
        t.note(format!("{host} backed up after the repair: {healed}"));
        // The backup uploaded the damaged blob again: nothing is lost now.
        let out = w.cli(&["repair", STORAGE, "--wait"], DATA_TIMEOUT)?;
        if !out.success() {
            bail!("flotilla repair {STORAGE} --wait after the healing backup still reports loss:\n{out}");
        }
        w.verify(t)?;
    } else {
        let compared = w.verify_snapshots(t, &affected)?;
        if compared == 0 {
            bail!("every snapshot was named affected by one flipped byte: {affected:?}");
        }
        w.each_task_finished_once()?;
    }
    Ok(Outcome::Passed)
}

/// Every pack file of nas.
fn packs(w: &World) -> Result<BTreeSet<PathBuf>> {
    pack_files(&w.storage_dir().join("packs"))
}

/// Runs `flotilla repair nas --wait` when the CLI has a `repair` subcommand
/// (`flotilla repair --help` exits 0) and returns `true`; returns `false`
/// when it has none yet, so the trial falls back to checking that the
/// unaffected snapshots still restore. Once `repair` lands, this step makes
/// the trial demand the full cure: repair, one backup of the affected host,
/// then `check --read-data` and every snapshot byte for byte.
pub(crate) fn repair_step(t: &mut Trial, w: &World) -> Result<bool> {
    let help = w.cli(&["repair", "--help"], Duration::from_secs(30))?;
    if !help.success() {
        t.note("no `flotilla repair` yet: checking the unaffected snapshots only");
        return Ok(false);
    }
    // Exit 4: the damaged blob has no good copy yet (the next backup brings
    // one); anything else but 0 is a failure of repair itself.
    let out = w.cli(&["repair", STORAGE, "--wait"], DATA_TIMEOUT)?;
    if !matches!(out.code, Some(0) | Some(4)) {
        bail!("flotilla repair {STORAGE} --wait failed:\n{out}");
    }
    t.note(format!(
        "flotilla repair: {}",
        out.stdout.lines().last().unwrap_or("").trim()
    ));
    Ok(true)
}
