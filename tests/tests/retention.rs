//! Retention: `forget` applies a keep policy to the snapshot records, and
//! `prune` deletes the packs nothing references any more, without breaking a
//! backup that runs beside it.
//!
//! The worlds are those of the data-plane tests (nas stores and restores).
//! Each old state of a source is wiped before the next is written, so old
//! snapshots share no blob with newer ones and their packs become garbage.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use flotilla_tests::{
    check_report, json_values, pack_entries, pack_files, read_lossy, restored_path,
    summarize_events, write_random, CliOutput, Compare, DirStats, Fleet, NatsServer, DATA_TIMEOUT,
    STARTUP_TIMEOUT,
};
use serde_json::Value;

use super::dataplane::{
    assert_exit, assert_same_tree, backup_ok, pack_bytes, restore_ok, snapshot_of, start_world,
};
use super::is_task_event;

const MIB: u64 = 1 << 20;
/// How long beta's 200 MiB backup may take to show progress, then to finish.
const BACKUP_TIMEOUT: Duration = Duration::from_secs(180);
/// What the source logs when its commit found blobs missing and it backs up
/// again: after a prune, that would mean prune deleted what the session used.
const RELIED_BLOBS_LOST: &str = "repository lacks blobs this backup relied on";

// ---- helpers ---------------------------------------------------------------

/// Empties `root` and writes `len` pseudo-random bytes of `seed` into it, so
/// the next snapshot shares nothing with the previous ones.
fn replace_data(root: &Path, seed: u64, len: u64) {
    for entry in fs::read_dir(root).expect("list the backup root") {
        let path = entry.expect("read the backup root").path();
        if path.is_dir() && !path.is_symlink() {
            fs::remove_dir_all(&path).expect("remove old data");
        } else {
            fs::remove_file(&path).expect("remove old data");
        }
    }
    write_random(&root.join(format!("data/seed-{seed}.bin")), seed, len).expect("write test data");
}

/// Pack files in a repository.
fn pack_count(storage: &Path) -> u64 {
    let packs = storage.join("packs");
    if !packs.exists() {
        return 0;
    }
    DirStats::walk(&packs).expect("walk the packs").files
}

fn sorted(ids: impl IntoIterator<Item = impl Into<String>>) -> Vec<String> {
    let mut ids: Vec<String> = ids.into_iter().map(Into::into).collect();
    ids.sort();
    ids
}

/// The string ids of a JSON array (`removed` of a forget, or `id`s of a listing).
fn ids_of<'a>(values: impl IntoIterator<Item = &'a Value>) -> Vec<String> {
    sorted(values.into_iter().filter_map(|v| v.as_str()))
}

/// `forget --host HOST --keep-last 1 --json`, which must exit 0. Returns the
/// verdict lines and the ids the storage reported removed.
fn forget_keep_last_1(fleet: &Fleet, host: &str) -> (Vec<Value>, Vec<String>) {
    let out = fleet
        .cli(["forget", "--host", host, "--keep-last", "1", "--json"])
        .expect("run flotilla forget");
    assert_exit(fleet, &out, 0, "forget --keep-last 1");
    let values = json_values(&out).expect("JSON lines");
    let verdicts: Vec<Value> = values
        .iter()
        .filter(|v| v["type"] == "verdict")
        .cloned()
        .collect();
    let removed = ids_of(
        values
            .iter()
            .filter(|v| v["type"] == "forgotten" && v["storage"] == "nas")
            .flat_map(|v| v["removed"].as_array().into_iter().flatten()),
    );
    (verdicts, removed)
}

/// `prune nas --grace 0s [EXTRA…] --json`, which must exit 0; returns its
/// report (the last JSON document, after any progress lines).
fn prune(fleet: &Fleet, extra: &[&str]) -> Value {
    let mut args = vec!["prune", "nas", "--grace", "0s", "--json"];
    args.extend_from_slice(extra);
    let out = fleet
        .cli_with_timeout(args, DATA_TIMEOUT)
        .expect("run flotilla prune");
    assert_exit(fleet, &out, 0, "prune");
    report_of(fleet, &out)
}

fn report_of(fleet: &Fleet, out: &CliOutput) -> Value {
    match json_values(out)
        .expect("JSON output")
        .into_iter()
        .rev()
        .find(|v| v.get("packs_deleted").is_some())
    {
        Some(report) if report["storage"] == "nas" => report,
        _ => fleet.fail(format!("no prune report of nas:\n{out}")),
    }
}

fn num(report: &Value, field: &str) -> u64 {
    report[field]
        .as_u64()
        .unwrap_or_else(|| panic!("no number {field} in {report}"))
}

/// `check nas --read-data` must exit 0 with `ok: true`.
fn assert_check_ok(fleet: &Fleet) {
    let out = fleet
        .check("nas", true)
        .expect("run flotilla check --read-data");
    assert_exit(fleet, &out, 0, "an intact repository");
    let report = check_report(&out).expect("a check report");
    if report["ok"] != true {
        fleet.fail(format!("check found problems:\n{out}"));
    }
}

/// Restores `snapshot` onto nas under `name` and compares it with `root`.
fn assert_restores(
    fleet: &Fleet,
    nas_restore_root: &Path,
    snapshot: &str,
    name: &str,
    root: &Path,
) {
    let target = nas_restore_root.join(name);
    restore_ok(fleet, snapshot, &target, &[]);
    assert_same_tree(
        fleet,
        root,
        &restored_path(&target, root),
        Compare::Contents,
    );
}

// ---- tests -----------------------------------------------------------------

#[test]
fn forget_keeps_the_policy_and_prune_frees_space() {
    let nats = NatsServer::start().expect("start nats-server");
    let fleet = Fleet::init(&nats).expect("flotilla init");
    let agents = start_world(&fleet, &["alpha"]);
    let (nas, alpha) = (&agents[0], &agents[1]);
    let root = alpha.backup_root().to_path_buf();
    let storage = nas.storage_dir().to_path_buf();

    let mut snaps = Vec::new();
    for seed in 1..=3 {
        replace_data(&root, seed, 4 * MIB);
        snaps.push(snapshot_of(&backup_ok(&fleet, &["alpha"])[0]));
    }
    let (snap1, snap2, snap3) = (&snaps[0], &snaps[1], &snaps[2]);

    // Forgetting everything is never a default.
    let out = fleet
        .cli(["forget", "--host", "alpha"])
        .expect("run flotilla forget");
    assert_exit(&fleet, &out, 2, "forget without any --keep-*");
    let listed = fleet.snapshots(&[]).expect("flotilla snapshots --json");
    assert_eq!(listed.len(), 3, "a refused forget forgot: {listed:#?}");

    let (verdicts, removed) = forget_keep_last_1(&fleet, "alpha");
    for (id, keep) in [(snap1, false), (snap2, false), (snap3, true)] {
        match verdicts.iter().find(|v| v["id"] == id.as_str()) {
            Some(v) if v["keep"] == keep && v["host"] == "alpha" && v["storage"] == "nas" => {}
            other => fleet.fail(format!(
                "verdict for {id}: expected keep={keep}, got {other:?}\nall: {verdicts:#?}"
            )),
        }
    }
    assert_eq!(removed, sorted([snap1, snap2]), "forgotten on nas");
    let listed = fleet.snapshots(&[]).expect("flotilla snapshots --json");
    assert_eq!(
        ids_of(listed.iter().map(|s| &s["id"])),
        vec![snap3.clone()],
        "{listed:#?}"
    );

    let (packs_before, bytes_before) = (pack_count(&storage), pack_bytes(&storage));
    let report = prune(&fleet, &[]);
    eprintln!("prune: {report}");
    assert_eq!(report["dry_run"], false, "{report}");
    assert_eq!(report["snapshots"], 1, "{report}");
    assert_eq!(report["packs"], packs_before, "{report}");
    assert_eq!(report["packs_protected"], 0, "no session is live: {report}");
    let (deleted, freed) = (num(&report, "packs_deleted"), num(&report, "bytes_freed"));
    assert!(deleted >= 2, "snap1 and snap2 each left a pack: {report}");
    assert!(freed >= 6 * MIB, "8 MiB of data were forgotten: {report}");
    // On disk, independently of the report.
    assert_eq!(pack_count(&storage), packs_before - deleted, "{report}");
    assert_eq!(bytes_before - pack_bytes(&storage), freed, "{report}");

    assert_check_ok(&fleet);
    assert_restores(&fleet, nas.restore_root(), snap3, "snap3", &root);

    // A dry run reports what would go and deletes nothing.
    replace_data(&root, 4, 4 * MIB);
    let snap4 = snapshot_of(&backup_ok(&fleet, &["alpha"])[0]);
    let (_, removed) = forget_keep_last_1(&fleet, "alpha");
    assert_eq!(removed, vec![snap3.clone()], "keep-last 1 after snap4");
    let (packs_before, bytes_before) = (pack_count(&storage), pack_bytes(&storage));
    let dry = prune(&fleet, &["--dry-run"]);
    assert_eq!(dry["dry_run"], true, "{dry}");
    assert_eq!(dry["packs"], packs_before, "{dry}");
    assert!(
        num(&dry, "packs_deleted") >= 1,
        "snap3's packs would go: {dry}"
    );
    assert!(num(&dry, "bytes_freed") >= 3 * MIB, "{dry}");
    assert_eq!(
        pack_count(&storage),
        packs_before,
        "a dry run deleted packs: {dry}"
    );
    assert_eq!(
        pack_bytes(&storage),
        bytes_before,
        "a dry run deleted packs: {dry}"
    );
    let again = prune(&fleet, &["--dry-run"]);
    for field in ["packs", "packs_deleted", "bytes_freed"] {
        assert_eq!(again[field], dry[field], "{field}: {dry}\nthen {again}");
    }
    assert_restores(&fleet, nas.restore_root(), &snap4, "snap4", &root);
}

#[test]
fn prune_during_a_concurrent_backup_breaks_nothing() {
    let nats = NatsServer::start().expect("start nats-server");
    let fleet = Fleet::init(&nats).expect("flotilla init");
    let mut agents = start_world(&fleet, &["alpha", "beta"]);
    let alpha_root = agents[1].backup_root().to_path_buf();
    let beta_root = agents[2].backup_root().to_path_buf();
    let nas_restore_root = agents[0].restore_root().to_path_buf();
    let storage = agents[0].storage_dir().to_path_buf();
    let packs_now = || pack_files(&storage.join("packs")).expect("list the packs");

    // Two old snapshots of alpha that nothing keeps: the first shares its data
    // with beta's backup below, the second shares nothing.
    replace_data(&alpha_root, 11, 4 * MIB);
    let shared = snapshot_of(&backup_ok(&fleet, &["alpha"])[0]);
    let shared_packs = packs_now();
    replace_data(&alpha_root, 13, 4 * MIB);
    let unshared = snapshot_of(&backup_ok(&fleet, &["alpha"])[0]);
    let unshared_packs: Vec<PathBuf> = packs_now().difference(&shared_packs).cloned().collect();
    let shared_data_packs: Vec<PathBuf> = shared_packs
        .iter()
        .filter(|p| {
            pack_entries(p)
                .expect("read a pack")
                .iter()
                .any(|e| e.kind == 0)
        })
        .cloned()
        .collect();
    assert!(
        !shared_data_packs.is_empty(),
        "the shared snapshot wrote no data pack"
    );
    replace_data(&alpha_root, 12, 4 * MIB);
    let kept = snapshot_of(&backup_ok(&fleet, &["alpha"])[0]);
    // Beta's first 16 MiB question to nas (which blobs exist?) covers its
    // seeded README.txt and the shared file before any upload; then 200 MiB
    // of its own follow.
    write_random(&beta_root.join("a-shared/seed-11.bin"), 11, 4 * MIB)
        .expect("write the data beta shares with alpha's old snapshot");
    for i in 0..5 {
        write_random(
            &beta_root.join(format!("big/part-{i}.bin")),
            21 + i,
            40 * MIB,
        )
        .expect("write 40 MiB of test data");
    }

    let out = fleet
        .cli(["backup", "beta", "--to", "nas", "--json"])
        .expect("run flotilla backup without --wait");
    assert_exit(&fleet, &out, 0, "queued");
    let task_id = out
        .json_lines()
        .expect("JSON lines")
        .iter()
        .find(|v| v["type"] == "queued" && v["host"] == "beta")
        .and_then(|v| v["task_id"].as_str().map(str::to_owned))
        .unwrap_or_else(|| fleet.fail(format!("no queued line for beta:\n{out}")));

    // Beta's first upload reaches nas only after nas answered its first
    // question (which blobs exist?), and that question covered the shared
    // file: from then on the live session relies on the shared blobs. Freeze
    // beta right there, so the prune certainly runs while its session lives.
    let tmp = storage.join("tmp");
    let deadline = Instant::now() + BACKUP_TIMEOUT;
    while fs::read_dir(&tmp).map_or(true, |mut d| d.next().is_none()) {
        if Instant::now() > deadline {
            fleet.fail("beta never uploaded anything to nas");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    agents[2].pause().expect("SIGSTOP beta");
    let beta_snaps = fleet
        .snapshots(&["--host", "beta"])
        .expect("list snapshots");
    if !beta_snaps.is_empty() {
        fleet.fail(format!("beta committed before the prune: {beta_snaps:#?}"));
    }

    let (_, removed) = forget_keep_last_1(&fleet, "alpha");
    assert_eq!(
        removed,
        sorted([&shared, &unshared]),
        "keep-last 1 of alpha"
    );
    let report = prune(&fleet, &[]);
    eprintln!("prune while beta's backup is live: {report}");
    // The unshared snapshot's packs go; the shared one's stay, because the
    // live session relies on their blobs.
    for pack in &unshared_packs {
        assert!(
            !pack.exists(),
            "{} was not pruned: {report}",
            pack.display()
        );
    }
    for pack in &shared_data_packs {
        assert!(
            pack.exists(),
            "prune deleted {}, which beta's live session relies on: {report}",
            pack.display()
        );
    }
    assert!(num(&report, "bytes_freed") >= 3 * MIB, "{report}");
    assert!(
        num(&report, "packs_protected") >= shared_data_packs.len() as u64,
        "{report}"
    );
    agents[2].resume().expect("SIGCONT beta");

    let finished = fleet.wait_for("beta's backup to finish", BACKUP_TIMEOUT, || {
        let events = fleet.events_of("task.finished", "beta")?;
        match events
            .iter()
            .find(|e| is_task_event(e, "task.finished", &task_id))
        {
            Some(e) => Ok(Some(e.clone())),
            None => anyhow::bail!("task.finished of beta:\n{}", summarize_events(&events)),
        }
    });
    if finished["detail"]["outcome"] != "succeeded" {
        fleet.fail(format!("beta's backup did not succeed: {finished:#}"));
    }
    // A commit that found blobs missing is retried by the source and would
    // hide a prune that deleted what the session relied on.
    let beta_log = read_lossy(&fleet.agent_log("beta"));
    if beta_log.contains(RELIED_BLOBS_LOST) {
        fleet.fail("beta's commit found blobs missing after the prune (see its log)");
    }
    let beta_snap = match finished["detail"]["result"]["snapshot"].as_str() {
        Some(id) => id.to_owned(),
        None => fleet
            .snapshots(&["--host", "beta"])
            .expect("flotilla snapshots")
            .first()
            .and_then(|s| s["id"].as_str().map(str::to_owned))
            .expect("a snapshot of beta"),
    };

    assert_check_ok(&fleet);
    let listed = fleet.snapshots(&[]).expect("flotilla snapshots --json");
    assert_eq!(
        ids_of(listed.iter().map(|s| &s["id"])),
        sorted([&kept, &beta_snap]),
        "{listed:#?}"
    );
    assert_restores(&fleet, &nas_restore_root, &kept, "alpha", &alpha_root);
    assert_restores(&fleet, &nas_restore_root, &beta_snap, "beta", &beta_root);
}

/// One dead storage host does not stop the fleet reading the others. With
/// nas2 stopped, `snapshots` lists nas's snapshots and names nas2 on stderr
/// (as JSON with `--json`), a restore from nas works, and `forget` acts on
/// nas only, reports nas2 as left alone and exits 3. `flotilla remove nas2`
/// (refused for an online host) takes it out of the registry, and the
/// warnings stop.
#[test]
fn a_dead_storage_host_is_named_and_the_others_still_serve() {
    let nats = NatsServer::start().expect("start nats-server");
    let fleet = Fleet::init(&nats).expect("flotilla init");
    let agents = start_world(&fleet, &["alpha"]);
    let mut nas2 = fleet
        .agent("nas2")
        .without_backup_root()
        .storage()
        .start()
        .expect("start nas2");
    fleet.wait_quic_addr("nas2", STARTUP_TIMEOUT);
    let root = agents[1].backup_root().to_path_buf();
    write_random(&root.join("data/a.bin"), 1, MIB).expect("write test data");
    let older = snapshot_of(&backup_ok(&fleet, &["alpha"])[0]);
    let newer = snapshot_of(&backup_ok(&fleet, &["alpha"])[0]);
    let out = fleet.backup("alpha", "nas2", &[]).expect("back up to nas2");
    assert_exit(&fleet, &out, 0, "a backup to nas2");

    nas2.sigterm().expect("stop nas2");
    nas2.wait_exit(Duration::from_secs(30)).expect("nas2 exits");
    fleet.wait_for("nas2 to be listed offline", STARTUP_TIMEOUT, || {
        Ok(fleet.host("nas2")?.filter(|h| h["status"] == "offline"))
    });

    let out = fleet.cli(["snapshots", "--json"]).expect("run snapshots");
    assert_exit(&fleet, &out, 0, "snapshots with a dead storage host");
    let listed: Vec<Value> = serde_json::from_str(&out.stdout).expect("a JSON array");
    assert_eq!(
        sorted(listed.iter().filter_map(|v| v["id"].as_str())),
        sorted([older.clone(), newer.clone()]),
        "{out}"
    );
    let warning: Value = serde_json::from_str(out.stderr.trim()).expect("one JSON warning");
    assert_eq!(warning["storage"], "nas2", "{out}");
    assert!(
        warning["message"]
            .as_str()
            .is_some_and(|m| m.contains("offline")),
        "{out}"
    );

    assert_restores(&fleet, &fleet.restore_root("nas"), &older, "older", &root);

    let out = fleet
        .cli(["forget", "--keep-last", "1", "--json"])
        .expect("run forget");
    assert_exit(&fleet, &out, 3, "forget with a storage host left alone");
    let lines = json_values(&out).expect("JSON lines");
    assert!(
        lines
            .iter()
            .any(|l| l["type"] == "left_alone" && l["storage"] == "nas2"),
        "{out}"
    );
    let forgotten: Vec<&Value> = lines
        .iter()
        .filter(|l| l["type"] == "verdict" && l["keep"] == false)
        .collect();
    let forgotten: Vec<&str> = forgotten.iter().filter_map(|v| v["id"].as_str()).collect();
    assert_eq!(forgotten, [older.as_str()], "{out}");
    assert!(
        out.stderr.contains("nothing was forgotten on nas2"),
        "{out}"
    );

    let out = fleet.cli(["remove", "nas"]).expect("run remove");
    assert_exit(&fleet, &out, 2, "remove of an online host");
    let out = fleet.cli(["remove", "nas2", "--json"]).expect("run remove");
    assert_exit(&fleet, &out, 0, "remove of a stopped host");
    assert!(fleet.host("nas2").expect("list hosts").is_none(), "{out}");
    let out = fleet.cli(["snapshots", "--json"]).expect("run snapshots");
    assert_exit(&fleet, &out, 0, "snapshots after remove");
    assert!(out.stderr.trim().is_empty(), "{out}");
    let listed: Vec<Value> = serde_json::from_str(&out.stdout).expect("a JSON array");
    let ids: Vec<&str> = listed.iter().filter_map(|v| v["id"].as_str()).collect();
    assert_eq!(ids, [newer.as_str()], "{out}");
}
