//! Data-plane tests: backups into a storage agent's repository over QUIC,
//! restores out of it, repository checks, and the refusals that keep peers
//! and restores where they belong.
//!
//! Every test runs a storage agent "nas" (`--storage`, `--listen 127.0.0.1:0`,
//! `--restore-root`, no backup root) beside its sources, and restores onto nas
//! itself. Trees are compared by the test's own walk ([`tree_differences`]),
//! never by asking the agent.

use std::fs::{self, File, Permissions};
use std::os::unix::fs::{symlink, FileExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use flotilla_protocol::{HostName, TaskKind};
use flotilla_tests::{
    allocated_bytes, check_report, flip_byte, largest_file, pack_entries, publish_task,
    random_bytes, restored_path, same_contents, summarize_events, summary_of, tree_differences,
    write_bytes, write_random, Agent, CliOutput, Compare, DirStats, Fleet, NatsServer,
    DATA_TIMEOUT, EVENT_TIMEOUT, STARTUP_TIMEOUT,
};
use serde_json::Value;

use super::{is_rejection, is_task_event, path_str};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// 2001-01-01T00:00:00Z.
const OLD_MTIME: u64 = 978_307_200;
/// How long an interrupted backup may take to resume and finish.
const RESUME_TIMEOUT: Duration = Duration::from_secs(180);

// ---- helpers ---------------------------------------------------------------

/// Starts nas (storage with a restore root, no backup root) and one agent per
/// source, and waits until all are online and nas advertises its QUIC address.
/// `agents[0]` is nas, then the sources in order.
pub(super) fn start_world(fleet: &Fleet, sources: &[&str]) -> Vec<Agent> {
    let nas = fleet
        .agent("nas")
        .without_backup_root()
        .storage()
        .restore_root()
        .start()
        .expect("start the nas agent");
    let mut agents = vec![nas];
    for &host in sources {
        agents.push(fleet.start_agent(host).expect("start a source agent"));
    }
    let mut hosts = vec!["nas"];
    hosts.extend_from_slice(sources);
    fleet.wait_online(&hosts, STARTUP_TIMEOUT);
    fleet.wait_quic_addr("nas", STARTUP_TIMEOUT);
    agents
}

/// `backup HOSTS --to nas --wait --json`: requires exit 0 and a succeeded
/// summary with a snapshot for every host; returns them in `hosts` order.
pub(super) fn backup_ok(fleet: &Fleet, hosts: &[&str]) -> Vec<Value> {
    let out = fleet
        .backup(&hosts.join(","), "nas", &[])
        .expect("run flotilla backup");
    if out.code != Some(0) {
        fleet.fail(format!("backup did not exit 0:\n{out}"));
    }
    hosts
        .iter()
        .map(|host| {
            let summary = summary_of(&out, host).expect("a summary line per host");
            let has_snapshot = summary["snapshot"].as_str().is_some_and(|s| !s.is_empty());
            if summary["outcome"] != "succeeded" || !has_snapshot {
                fleet.fail(format!("backup of {host} did not succeed:\n{out}"));
            }
            summary
        })
        .collect()
}

pub(super) fn snapshot_of(summary: &Value) -> String {
    summary["snapshot"]
        .as_str()
        .expect("the summary names its snapshot")
        .to_owned()
}

/// `restore SNAPSHOT --to nas:TARGET [--include P]… --wait --json`: requires
/// exit 0 and a clean summary; returns its `restore` counters.
pub(super) fn restore_ok(fleet: &Fleet, snapshot: &str, target: &Path, includes: &[&str]) -> Value {
    let to = format!("nas:{}", path_str(target));
    let out = fleet
        .restore(snapshot, &to, includes)
        .expect("run flotilla restore");
    if out.code != Some(0) {
        fleet.fail(format!("restore did not exit 0:\n{out}"));
    }
    let summary = summary_of(&out, "nas").expect("a restore summary line");
    if summary["outcome"] != "succeeded" || summary["restore"]["errors"] != 0 {
        fleet.fail(format!("restore was not clean:\n{out}"));
    }
    summary["restore"].clone()
}

pub(super) fn assert_same_tree(fleet: &Fleet, original: &Path, restored: &Path, what: Compare) {
    let diffs = tree_differences(original, restored, what).expect("compare the two trees");
    if !diffs.is_empty() {
        fleet.fail(format!(
            "{} restored into {} differs ({what:?}):\n  {}",
            original.display(),
            restored.display(),
            diffs.join("\n  ")
        ));
    }
}

pub(super) fn assert_exit(fleet: &Fleet, out: &CliOutput, code: i32, why: &str) {
    if out.code != Some(code) {
        fleet.fail(format!("expected exit code {code} ({why}):\n{out}"));
    }
}

/// Sum of the pack file sizes in a repository.
pub(super) fn pack_bytes(storage: &Path) -> u64 {
    let packs = storage.join("packs");
    if !packs.exists() {
        return 0;
    }
    DirStats::walk(&packs).expect("walk the packs").bytes
}

/// A tree with every awkward thing a file system holds, in `dir`.
fn build_tricky_tree(dir: &Path) {
    let put = |rel: &str, data: &[u8]| write_bytes(&dir.join(rel), data).expect("write a file");
    put("héllo wörld.txt", "grüße aus der Flotte\n".as_bytes());
    put(
        "dir with spaces/ünïcode 文件",
        "多字节 content\n".as_bytes(),
    );
    put("empty file", b"");
    fs::create_dir_all(dir.join("empty dir")).expect("create an empty dir");
    symlink("héllo wörld.txt", dir.join("link to hello")).expect("create a symlink");
    symlink("no/such/target", dir.join("dangling")).expect("create a dangling symlink");
    put("hard-a", b"two names, one inode\n");
    fs::hard_link(dir.join("hard-a"), dir.join("hard-b")).expect("create a hard link");

    // 1 GiB, of which 16 KiB are data.
    let sparse = File::create(dir.join("sparse.img")).expect("create the sparse file");
    sparse.set_len(GIB).expect("extend the sparse file");
    for (i, offset) in [0, 300 * MIB + 123, 700 * MIB, GIB - 4 * KIB]
        .into_iter()
        .enumerate()
    {
        let data = random_bytes(i as u64 + 1, 4 * KIB as usize);
        sparse
            .write_all_at(&data, offset)
            .expect("write into the sparse file");
    }
    drop(sparse);

    put("run me.sh", b"#!/bin/sh\necho hello\n");
    fs::set_permissions(dir.join("run me.sh"), Permissions::from_mode(0o755)).expect("chmod 0755");
    put("private/secret.txt", b"s3cret\n");
    fs::set_permissions(dir.join("private"), Permissions::from_mode(0o700)).expect("chmod 0700");

    let mut deep = dir.join("deep");
    for level in 1..=30 {
        deep.push(format!("level {level:02}"));
    }
    write_bytes(&deep.join("bottom.txt"), b"30 levels down\n").expect("write the deepest file");

    put("from 2001.txt", b"old news\n");
    File::options()
        .write(true)
        .open(dir.join("from 2001.txt"))
        .and_then(|f| f.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(OLD_MTIME)))
        .expect("set an mtime in 2001");
}

// ---- tests -----------------------------------------------------------------

#[test]
fn round_trip_of_a_tricky_tree_is_identical() {
    let nats = NatsServer::start().expect("start nats-server");
    let fleet = Fleet::init(&nats).expect("flotilla init");
    let agents = start_world(&fleet, &["alpha"]);
    let (nas, alpha) = (&agents[0], &agents[1]);
    let root = alpha.backup_root().to_path_buf();
    let tricky = root.join("tricky");
    build_tricky_tree(&tricky);

    let snapshot = snapshot_of(&backup_ok(&fleet, &["alpha"])[0]);
    let target = nas.restore_root().join("r1");
    let counters = restore_ok(&fleet, &snapshot, &target, &[]);
    assert!(
        counters["hardlinks"].as_u64().is_some_and(|n| n >= 1),
        "no hard link recreated: {counters}"
    );
    assert!(
        counters["symlinks"].as_u64().is_some_and(|n| n >= 2),
        "symlinks not restored: {counters}"
    );

    let restored_root = restored_path(&target, &root);
    assert_same_tree(&fleet, &root, &restored_root, Compare::Everything);

    let restored = restored_root.join("tricky");
    let a = fs::symlink_metadata(restored.join("hard-a")).expect("stat restored hard-a");
    let b = fs::symlink_metadata(restored.join("hard-b")).expect("stat restored hard-b");
    assert!(
        (a.dev(), a.ino()) == (b.dev(), b.ino()),
        "hard-a and hard-b were restored as two files (inodes {} and {})",
        a.ino(),
        b.ino()
    );

    let sparse = restored.join("sparse.img");
    let len = fs::metadata(&sparse)
        .expect("stat the restored sparse file")
        .len();
    assert_eq!(len, GIB, "restored sparse file has the wrong size");
    let source_alloc = allocated_bytes(&tricky.join("sparse.img")).expect("stat the source");
    let alloc = allocated_bytes(&sparse).expect("stat the restored sparse file");
    if source_alloc >= 64 * MIB {
        eprintln!(
            "note: this file system does not keep holes ({source_alloc} bytes allocated for the source); sparseness not checked"
        );
    } else {
        assert!(
            alloc < 64 * MIB,
            "the restored 1 GiB sparse file allocates {alloc} bytes (source: {source_alloc})"
        );
    }
}

#[test]
fn two_hosts_back_up_concurrently_with_dedup() {
    let nats = NatsServer::start().expect("start nats-server");
    let fleet = Fleet::init(&nats).expect("flotilla init");
    let agents = start_world(&fleet, &["alpha", "beta"]);
    let shared = random_bytes(0x5eed, (32 * MIB) as usize);
    for (agent, seed) in agents[1..].iter().zip([11, 12]) {
        let root = agent.backup_root();
        write_bytes(&root.join("shared/common.bin"), &shared).expect("write the shared file");
        write_random(&root.join("own/own.bin"), seed, MIB).expect("write the host's own file");
    }

    let summaries = backup_ok(&fleet, &["alpha", "beta"]);
    // Concurrently: both tasks started before either finished, in the order
    // the event stream received them.
    let ids: Vec<&str> = summaries
        .iter()
        .map(|s| s["task_id"].as_str().expect("a task id per summary"))
        .collect();
    let events = fleet.events().expect("flotilla events --json");
    let position = |kind: &str, id: &str| {
        events
            .iter()
            .position(|e| is_task_event(e, kind, id))
            .unwrap_or_else(|| {
                fleet.fail(format!("no {kind} of {id}:\n{}", summarize_events(&events)))
            })
    };
    let last_start = ids.iter().map(|id| position("task.started", id)).max();
    let first_end = ids.iter().map(|id| position("task.finished", id)).min();
    if last_start >= first_end {
        fleet.fail(format!(
            "the two backups did not overlap:\n{}",
            summarize_events(&events)
        ));
    }

    let sources: u64 = agents[1..]
        .iter()
        .map(|a| {
            DirStats::walk(a.backup_root())
                .expect("walk a source")
                .bytes
        })
        .sum();
    let stored = pack_bytes(agents[0].storage_dir());
    assert!(
        stored < sources - 30 * MIB,
        "no dedup across hosts: packs hold {stored} bytes for {sources} source bytes \
         (32 MiB of them shared)"
    );

    let snapshots = fleet.snapshots(&[]).expect("flotilla snapshots --json");
    for host in ["alpha", "beta"] {
        let count = snapshots.iter().filter(|s| s["host"] == host).count();
        assert_eq!(count, 1, "snapshots of {host}: {snapshots:#?}");
    }
    assert!(
        snapshots
            .iter()
            .all(|s| s["storage"] == "nas" && s["partial"] == false),
        "{snapshots:#?}"
    );
}

#[test]
fn second_backup_with_nothing_changed_reads_nothing() {
    let nats = NatsServer::start().expect("start nats-server");
    let fleet = Fleet::init(&nats).expect("flotilla init");
    let agents = start_world(&fleet, &["alpha"]);
    let root = agents[1].backup_root().to_path_buf();
    write_random(&root.join("data/blob.bin"), 3, 2 * MIB).expect("write test data");
    write_bytes(&root.join("data/notes.txt"), b"unchanged\n").expect("write test data");
    // Files whose mtime or ctime is within a second of the scan are "racily
    // clean": the agent reads them again next time rather than trust their
    // timestamps. The ctime cannot be set back, so wait until it is old enough.
    for file in ["data/blob.bin", "data/notes.txt"] {
        let meta = fs::metadata(root.join(file)).expect("stat the test data");
        let changed =
            SystemTime::UNIX_EPOCH + Duration::new(meta.ctime() as u64, meta.ctime_nsec() as u32);
        let settled = changed + Duration::from_millis(1100);
        if let Ok(left) = settled.duration_since(SystemTime::now()) {
            std::thread::sleep(left);
        }
    }
    let first = backup_ok(&fleet, &["alpha"]).remove(0);
    assert!(
        first["bytes_read"].as_u64().is_some_and(|n| n >= 2 * MIB),
        "first backup read too little: {first}"
    );
    let second = backup_ok(&fleet, &["alpha"]).remove(0);
    assert_eq!(second["bytes_read"], 0, "{second}");
    assert_eq!(second["files_new"], 0, "{second}");
    assert_eq!(second["files_changed"], 0, "{second}");
    let files = DirStats::walk(&root).expect("walk the source").files;
    assert_eq!(second["files_unchanged"], files, "{second}");
    assert!(
        second["bytes_added"].as_u64().is_some_and(|n| n < 64 * KIB),
        "an unchanged backup added too much: {second}"
    );
    assert_ne!(first["snapshot"], second["snapshot"], "{first}\n{second}");
}

#[test]
fn source_killed_mid_backup_resumes() {
    let nats = NatsServer::start().expect("start nats-server");
    let fleet = Fleet::init(&nats).expect("flotilla init");
    let mut agents = start_world(&fleet, &["alpha"]);
    let root = agents[1].backup_root().to_path_buf();
    for i in 0..6 {
        write_random(&root.join(format!("big/part-{i}.bin")), 1000 + i, 50 * MIB)
            .expect("write 50 MiB of test data");
    }

    let out = fleet
        .cli(["backup", "alpha", "--to", "nas", "--json"])
        .expect("run flotilla backup without --wait");
    assert_exit(&fleet, &out, 0, "queued");
    let queued = out.json_lines().expect("JSON lines");
    let task_id = queued
        .iter()
        .find(|v| v["type"] == "queued" && v["host"] == "alpha")
        .and_then(|v| v["task_id"].as_str())
        .expect("a queued line with the task id")
        .to_owned();

    // The kill must land mid-transfer: finished packs on nas, nothing
    // committed. Poll the packs tightly, freeze alpha the moment 32 MiB are
    // stored, and look at the repository while it cannot move on.
    let total = DirStats::walk(&root).expect("walk the source").bytes;
    let deadline = Instant::now() + RESUME_TIMEOUT;
    while pack_bytes(agents[0].storage_dir()) < 32 * MIB {
        if Instant::now() > deadline {
            fleet.fail("alpha's backup stored nothing on nas");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let alpha = &mut agents[1];
    alpha.pause().expect("SIGSTOP alpha");
    let committed = fleet
        .snapshots(&["--host", "alpha"])
        .expect("list snapshots");
    if !committed.is_empty() {
        fleet.fail(format!("alpha committed before the kill: {committed:#?}"));
    }
    alpha.kill9().expect("kill -9 alpha");
    let stored_at_kill = pack_bytes(agents[0].storage_dir());
    assert!(
        stored_at_kill < total,
        "everything was stored before the kill"
    );
    agents[1].restart().expect("restart alpha");

    let finished = fleet.wait_for("the backup to finish successfully", RESUME_TIMEOUT, || {
        let events = fleet.events_of("task.finished", "alpha")?;
        match events.iter().find(|e| {
            is_task_event(e, "task.finished", &task_id) && e["detail"]["outcome"] == "succeeded"
        }) {
            Some(e) => Ok(Some(e.clone())),
            None => anyhow::bail!(
                "task.finished events of alpha:\n{}",
                summarize_events(&events)
            ),
        }
    });
    let snapshot = match finished["detail"]["result"]["snapshot"].as_str() {
        Some(id) => id.to_owned(),
        None => {
            let list = fleet
                .snapshots(&["--host", "alpha"])
                .expect("flotilla snapshots");
            list.iter()
                .rev()
                .find(|s| s["task_id"] == task_id.as_str())
                .or(list.last())
                .and_then(|s| s["id"].as_str())
                .expect("a snapshot of alpha")
                .to_owned()
        }
    };

    let target = agents[0].restore_root().join("resumed");
    restore_ok(&fleet, &snapshot, &target, &[]);
    assert_same_tree(
        &fleet,
        &root,
        &restored_path(&target, &root),
        Compare::Contents,
    );

    let out = fleet
        .check("nas", true)
        .expect("run flotilla check --read-data");
    assert_exit(&fleet, &out, 0, "an intact repository");
    let report = check_report(&out).expect("a check report");
    assert_eq!(report["ok"], true, "{out}");

    // Resumed, not restarted: what was stored before the kill was not sent
    // again (the resumed run added at most what was missing, plus slack for
    // packs that were still open when the source died).
    let added = finished["detail"]["result"]["summary"]["bytes_added"]
        .as_u64()
        .unwrap_or_else(|| fleet.fail(format!("no bytes_added in {finished:#}")));
    assert!(
        added + stored_at_kill <= total + MIB,
        "the resumed backup added {added} bytes of {total}, although {stored_at_kill} \
         were stored before the kill"
    );
}

#[test]
fn flipped_byte_is_found_and_unaffected_files_still_restore() {
    let nats = NatsServer::start().expect("start nats-server");
    let fleet = Fleet::init(&nats).expect("flotilla init");
    let agents = start_world(&fleet, &["alpha"]);
    let root = agents[1].backup_root().to_path_buf();
    let (a, b) = (root.join("pair/a.bin"), root.join("pair/b.bin"));
    write_random(&a, 51, 3 * MIB).expect("write a.bin");
    write_random(&b, 52, 3 * MIB).expect("write b.bin");
    let snapshot = snapshot_of(&backup_ok(&fleet, &["alpha"])[0]);

    // Into the middle of the largest data blob of the largest pack, read
    // from the pack's own layout: a data blob, never a tree or a header.
    let packs = agents[0].storage_dir().join("packs");
    let (pack, _) = largest_file(&packs, "pack")
        .expect("list the packs")
        .expect("the backup wrote a pack");
    let blob = pack_entries(&pack)
        .expect("read the pack's entries")
        .into_iter()
        .filter(|e| e.kind == 0)
        .max_by_key(|e| e.length)
        .expect("the largest pack holds a data blob");
    flip_byte(&pack, blob.offset + blob.length / 2).expect("flip a byte of a data blob");

    let out = fleet
        .check("nas", true)
        .expect("run flotilla check --read-data");
    assert_exit(&fleet, &out, 4, "check found problems");
    let report = check_report(&out).expect("a check report");
    assert_eq!(report["ok"], false, "{out}");
    assert_eq!(
        report["damaged_blobs"].as_array().map(Vec::len),
        Some(1),
        "one flipped byte damages one blob: {out}"
    );
    let names_snapshot = |list: &Value| {
        list.as_array()
            .is_some_and(|l| l.iter().any(|s| *s == snapshot.as_str()))
    };
    assert!(
        names_snapshot(&report["affected_snapshots"]),
        "{snapshot} not affected: {out}"
    );
    fleet.wait_for_event(
        "a check.failed event naming the snapshot",
        EVENT_TIMEOUT,
        |ev| ev["kind"] == "check.failed" && names_snapshot(&ev["detail"]["affected_snapshots"]),
    );

    let affected: Vec<String> = report["affected_files"]
        .as_array()
        .expect("affected_files is an array")
        .iter()
        .filter(|f| f["snapshot"] == snapshot.as_str())
        .filter_map(|f| f["path"].as_str().map(str::to_owned))
        .collect();
    // One data blob belongs to one of the two files (they share nothing):
    // exactly that file is named, no directory listing.
    let (a_s, b_s) = (path_str(&a), path_str(&b));
    let (hit, keep) = match affected.as_slice() {
        [one] if *one == a_s => (a_s.as_str(), b_s.as_str()),
        [one] if *one == b_s => (b_s.as_str(), a_s.as_str()),
        _ => fleet.fail(format!(
            "a flipped byte in one data blob should affect exactly one of {a_s} and {b_s}, \
             got {affected:?}:\n{out}"
        )),
    };
    eprintln!("the flipped byte hit {hit}; restoring {keep}");

    let target = agents[0].restore_root().join("r");
    restore_ok(&fleet, &snapshot, &target, &[keep]);
    let restored = restored_path(&target, Path::new(keep));
    assert!(
        same_contents(Path::new(keep), &restored).expect("compare the restored file"),
        "{keep} restored into {} differs",
        restored.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_from_another_ca_or_host_are_refused() {
    let nats = NatsServer::start().expect("start nats-server");
    let fleet = Fleet::init(&nats).expect("flotilla init");
    let agents = start_world(&fleet, &["alpha"]);
    let _beta = fleet.agent("beta").listen().start().expect("start beta");
    let beta_addr = fleet.wait_quic_addr("beta", STARTUP_TIMEOUT);

    // (a) Another fleet: another CA and, since a fleet's bus admits only
    // its own users, another nats-server. Its coordinator sends its agent a
    // genuine task to back up into our nas, at nas's real address: nas
    // must refuse the stranger's certificate.
    let nas_addr = fleet.wait_quic_addr("nas", STARTUP_TIMEOUT);
    let other_nats = NatsServer::start().expect("start the other fleet's nats-server");
    let other = Fleet::init(&other_nats).expect("flotilla init of a second fleet");
    let _mallory = other.start_agent("mallory").expect("start mallory");
    other.wait_online(&["mallory"], STARTUP_TIMEOUT);
    let body = other
        .task(
            "mallory",
            TaskKind::Backup {
                paths: Vec::new(),
                excludes: Vec::new(),
                storage: HostName::new("nas").expect("a valid host name"),
                storage_addr: nas_addr,
                allow_empty: false,
            },
        )
        .expect("build the other fleet's backup task");
    let other_client = other
        .nats_client()
        .await
        .expect("connect to the other NATS");
    publish_task(
        &other_client,
        "mallory",
        other.sign(&body).expect("sign the task"),
    )
    .await
    .expect("publish the other fleet's task");
    let finished = other.wait_for_event(
        "mallory's task.finished for the backup into a foreign nas",
        Duration::from_secs(120),
        |ev| is_task_event(ev, "task.finished", body.id.as_str()),
    );
    if finished["detail"]["outcome"] != "failed" {
        fleet.fail(format!(
            "mallory's backup into our nas did not fail: {finished:#}\n\nthe other fleet's logs:\n{}",
            other.logs()
        ));
    }
    fleet.wait_for_event(
        "nas to refuse mallory as an unknown peer",
        EVENT_TIMEOUT,
        |ev| is_rejection(ev, "nas", "unknown_peer"),
    );

    // (b) A genuine task naming nas, pointed at beta's address: beta's
    // certificate does not name nas, so alpha must not talk to it.
    let body = fleet
        .task(
            "alpha",
            TaskKind::Backup {
                paths: Vec::new(),
                excludes: Vec::new(),
                storage: HostName::new("nas").expect("a valid host name"),
                storage_addr: beta_addr,
                allow_empty: false,
            },
        )
        .expect("build a backup task");
    let client = fleet.nats_client().await.expect("connect to NATS");
    publish_task(&client, "alpha", fleet.sign(&body).expect("sign the task"))
        .await
        .expect("publish the task");
    let finished = fleet.wait_for_event(
        "alpha's task.finished for the misdirected backup",
        Duration::from_secs(120),
        |ev| is_task_event(ev, "task.finished", body.id.as_str()),
    );
    assert_eq!(finished["detail"]["outcome"], "failed", "{finished:#}");
    let error = finished["detail"]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("nas"),
        "the error does not mention nas: {finished:#}"
    );

    let snapshots = fleet.snapshots(&[]).expect("flotilla snapshots --json");
    assert!(snapshots.is_empty(), "something was stored: {snapshots:#?}");
    assert_eq!(pack_bytes(agents[0].storage_dir()), 0, "packs were written");
}

#[test]
fn restores_that_would_escape_are_refused() {
    let nats = NatsServer::start().expect("start nats-server");
    let fleet = Fleet::init(&nats).expect("flotilla init");
    let agents = start_world(&fleet, &["alpha"]);
    let snapshot = snapshot_of(&backup_ok(&fleet, &["alpha"])[0]);
    let restore_root = agents[0].restore_root().to_path_buf();
    let restore_to = |dir: &str| {
        let to = format!("nas:{dir}");
        fleet
            .cli_with_timeout(
                ["restore", snapshot.as_str(), "--to", to.as_str(), "--wait"],
                DATA_TIMEOUT,
            )
            .expect("run flotilla restore")
    };

    // (a) Outside every restore root.
    let outside: PathBuf =
        std::env::temp_dir().join(format!("flotilla-e2e-{}-outside", uuid::Uuid::new_v4()));
    let out = restore_to(&path_str(&outside));
    let created = outside.exists();
    if created {
        let _ = fs::remove_dir_all(&outside);
    }
    assert_exit(&fleet, &out, 4, "restore outside the restore roots");
    assert!(!created, "{} was created", outside.display());
    fleet.wait_for_event("a not_allowed rejection by nas", EVENT_TIMEOUT, |ev| {
        is_rejection(ev, "nas", "not_allowed")
    });

    // (b) Climbing out with "..".
    let out = restore_to(&format!("{}/../escape", path_str(&restore_root)));
    assert_exit(&fleet, &out, 4, "restore through ..");
    let beside = restore_root
        .parent()
        .expect("the restore root has a parent")
        .join("escape");
    assert!(!beside.exists(), "{} was created", beside.display());

    // (c) Through a symlink inside the restore root.
    let elsewhere = tempfile::tempdir().expect("create an outside directory");
    symlink(elsewhere.path(), restore_root.join("link")).expect("create the symlink");
    let out = restore_to(&format!("{}/link/x", path_str(&restore_root)));
    assert_exit(&fleet, &out, 4, "restore through a symlink");
    let leaked: Vec<_> = fs::read_dir(elsewhere.path())
        .expect("list the outside directory")
        .collect();
    assert!(
        leaked.is_empty(),
        "written outside through the symlink: {leaked:?}"
    );

    // The refusals were about the targets: a proper one still works.
    restore_ok(&fleet, &snapshot, &restore_root.join("fine"), &[]);
}

#[test]
fn flipped_byte_is_repaired_and_one_backup_heals_every_snapshot() {
    let nats = NatsServer::start().expect("start nats-server");
    let fleet = Fleet::init(&nats).expect("flotilla init");
    let agents = start_world(&fleet, &["alpha"]);
    let root = agents[1].backup_root().to_path_buf();
    let (a, b) = (root.join("pair/a.bin"), root.join("pair/b.bin"));
    write_random(&a, 61, 3 * MIB).expect("write a.bin");
    write_random(&b, 62, 3 * MIB).expect("write b.bin");
    // Let the files settle past the "racily clean" second, so that the first
    // backup puts them in alpha's file cache and the healing backup meets
    // them as unchanged: the cache then names the lost blob, and the commit's
    // `missing_blobs` must make alpha read them again and upload it.
    for file in [&a, &b] {
        let meta = fs::metadata(file).expect("stat the test data");
        let changed =
            SystemTime::UNIX_EPOCH + Duration::new(meta.ctime() as u64, meta.ctime_nsec() as u32);
        if let Ok(left) = (changed + Duration::from_millis(1100)).duration_since(SystemTime::now())
        {
            std::thread::sleep(left);
        }
    }
    let first = snapshot_of(&backup_ok(&fleet, &["alpha"])[0]);

    // Rot: one byte in the middle of the largest data blob of the largest pack.
    let packs = agents[0].storage_dir().join("packs");
    let (pack, _) = largest_file(&packs, "pack")
        .expect("list the packs")
        .expect("the backup wrote a pack");
    let blob = pack_entries(&pack)
        .expect("read the pack's entries")
        .into_iter()
        .filter(|e| e.kind == 0)
        .max_by_key(|e| e.length)
        .expect("the largest pack holds a data blob");
    flip_byte(&pack, blob.offset + blob.length / 2).expect("flip a byte of a data blob");

    let out = fleet
        .check("nas", true)
        .expect("run flotilla check --read-data");
    assert_exit(&fleet, &out, 4, "check found the flipped byte");
    let names = |list: &Value, snapshot: &str| {
        list.as_array()
            .is_some_and(|l| l.iter().any(|s| *s == snapshot))
    };

    // Repair: the good blobs leave the damaged pack, which goes; the damaged
    // blob has no good copy anywhere yet, so one file stays lost for now.
    let out = fleet.repair("nas", false).expect("run flotilla repair");
    assert_exit(&fleet, &out, 4, "repair left one blob lost");
    let report = check_report(&out).expect("a repair report");
    assert_eq!(report["ok"], false, "{out}");
    assert_eq!(report["packs_damaged"], 1, "{out}");
    assert_eq!(report["packs_dropped"], 1, "{out}");
    assert_eq!(
        report["blobs_lost"], 1,
        "one flipped byte loses one blob: {out}"
    );
    assert_eq!(
        report["affected_snapshots"],
        serde_json::json!([first.as_str()]),
        "{out}"
    );
    assert!(
        !pack.exists(),
        "the damaged pack {} is still there",
        pack.display()
    );
    let (a_s, b_s) = (path_str(&a), path_str(&b));
    let lost: Vec<&str> = report["unrecoverable_files"]
        .as_array()
        .expect("unrecoverable_files is an array")
        .iter()
        .filter(|f| f["snapshot"] == first.as_str())
        .filter_map(|f| f["path"].as_str())
        .collect();
    if !matches!(lost.as_slice(), [one] if *one == a_s || *one == b_s) {
        fleet.fail(format!(
            "one lost data blob should leave exactly one of {a_s} and {b_s} unrecoverable, \
             got {lost:?}:\n{out}"
        ));
    }
    fleet.wait_for_event(
        "a repair.failed event naming the snapshot",
        EVENT_TIMEOUT,
        |ev| ev["kind"] == "repair.failed" && names(&ev["detail"]["affected_snapshots"], &first),
    );

    // One backup of the unchanged source uploads the lost blob again under
    // its id, which heals the first snapshot too.
    let healing = backup_ok(&fleet, &["alpha"]).remove(0);
    let second = snapshot_of(&healing);
    assert_ne!(first, second, "{healing}");
    assert!(
        healing["bytes_added"]
            .as_u64()
            .is_some_and(|n| n >= blob.length / 2),
        "the lost blob ({} sealed bytes) was not uploaded again: {healing}",
        blob.length
    );

    let out = fleet.repair("nas", false).expect("run flotilla repair");
    assert_exit(&fleet, &out, 0, "nothing is lost after the backup");
    let report = check_report(&out).expect("a repair report");
    assert_eq!(report["ok"], true, "{out}");
    assert_eq!(report["blobs_lost"], 0, "{out}");
    assert_eq!(
        report["unrecoverable_files"].as_array().map(Vec::len),
        Some(0),
        "{out}"
    );
    let out = fleet
        .check("nas", true)
        .expect("run flotilla check --read-data");
    assert_exit(&fleet, &out, 0, "the repository is whole again");

    for (n, snapshot) in [&first, &second].into_iter().enumerate() {
        let target = agents[0].restore_root().join(format!("r{n}"));
        restore_ok(&fleet, snapshot, &target, &[]);
        assert_same_tree(
            &fleet,
            &root,
            &restored_path(&target, &root),
            Compare::Contents,
        );
    }
}

/// A storage agent told `--listen 0.0.0.0:0` advertises the address of the
/// interface it reaches NATS through (loopback here), with the bound port,
/// not `0.0.0.0`, which no peer can dial: a backup through it works. And
/// `--advertise` without `--listen` is refused before the agent starts.
#[test]
fn an_agent_listening_on_every_interface_advertises_a_dialable_address() {
    let nats = NatsServer::start().expect("start nats-server");
    let fleet = Fleet::init(&nats).expect("flotilla init");
    let refused = fleet
        .agent("alpha")
        .args(["--advertise", "192.0.2.7:7443"])
        .config_check()
        .expect("run config check");
    assert!(
        !refused.success() && refused.stderr.contains("advertise address 192.0.2.7:7443"),
        "{refused}"
    );
    let _nas = fleet
        .agent("nas")
        .without_backup_root()
        .storage()
        .listen_on("0.0.0.0:0")
        .start()
        .expect("start the nas agent");
    let alpha = fleet.start_agent("alpha").expect("start alpha");
    fleet.wait_online(&["nas", "alpha"], STARTUP_TIMEOUT);
    let addr = fleet.wait_quic_addr("nas", STARTUP_TIMEOUT);
    assert!(addr.ip().is_loopback(), "advertised {addr}");
    assert_ne!(addr.port(), 0, "advertised {addr}");
    write_random(&alpha.backup_root().join("data/a.bin"), 9, MIB).expect("write test data");
    backup_ok(&fleet, &["alpha"]);
}

/// A compromised host's backups must not plant privileges on another host:
/// restored onto nas, alpha's setuid-root program loses its setuid bit, its
/// capability-bearing program its `security.capability`, its device node is
/// not created, and the summary lists each; restored onto alpha itself (or
/// with `--preserve-special`), everything comes back. Needs root (device
/// nodes, capabilities); skipped with a message otherwise.
#[test]
fn another_hosts_special_files_are_stripped_unless_preserved() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to make device nodes and set capabilities");
        return;
    }
    let nats = NatsServer::start().expect("start nats-server");
    let fleet = Fleet::init(&nats).expect("flotilla init");
    let _nas = fleet
        .agent("nas")
        .without_backup_root()
        .storage()
        .restore_root()
        .start()
        .expect("start the nas agent");
    let alpha = fleet
        .agent("alpha")
        .restore_root()
        .start()
        .expect("start alpha");
    fleet.wait_online(&["nas", "alpha"], STARTUP_TIMEOUT);
    fleet.wait_quic_addr("nas", STARTUP_TIMEOUT);
    let root = alpha.backup_root().to_path_buf();
    let bin = root.join("bin");
    fs::create_dir_all(&bin).expect("mkdir");
    write_bytes(&bin.join("su"), b"#!/bin/sh\nexec id\n").expect("write su");
    fs::set_permissions(bin.join("su"), Permissions::from_mode(0o4755)).expect("chmod 4755");
    write_bytes(&bin.join("ping"), b"#!/bin/sh\n").expect("write ping");
    // vfs_cap_data revision 2, effective, permitting CAP_SETUID.
    let cap: Vec<u8> = [0x0200_0001u32, 1 << 7, 0, 0, 0]
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect();
    xattr::set(bin.join("ping"), "security.capability", &cap).expect("set a capability");
    nix::sys::stat::mknod(
        &bin.join("null"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(1, 3),
    )
    .expect("mknod");
    let snapshot = snapshot_of(&backup_ok(&fleet, &["alpha"])[0]);

    // Onto another host: stripped, and said.
    let target = fleet.restore_root("nas").join("elsewhere");
    let out = fleet
        .restore(&snapshot, &format!("nas:{}", path_str(&target)), &[])
        .expect("run restore");
    assert_exit(&fleet, &out, 0, "a cross-host restore");
    let summary = summary_of(&out, "nas").expect("a summary");
    let stripped = &summary["restore"]["stripped"];
    assert_eq!(
        (
            &stripped["setid"],
            &stripped["capabilities"],
            &stripped["devices"]
        ),
        (&Value::from(1), &Value::from(1), &Value::from(1)),
        "{out}"
    );
    let got = restored_path(&target, &root).join("bin");
    let mode = |p: &Path| fs::metadata(p).expect("restored").mode() & 0o7777;
    assert_eq!(mode(&got.join("su")), 0o755, "setuid left out");
    assert_eq!(
        xattr::get(got.join("ping"), "security.capability").expect("read xattrs"),
        None
    );
    assert!(!got.join("null").exists(), "no device node");
    let again = format!("nas:{}", path_str(&target.join("again")));
    let human = fleet
        .cli_with_timeout(
            [
                "restore",
                snapshot.as_str(),
                "--to",
                again.as_str(),
                "--wait",
            ],
            DATA_TIMEOUT,
        )
        .expect("run restore");
    assert_exit(&fleet, &human, 0, "a second cross-host restore");
    assert!(
        human
            .stdout
            .contains("left out, as the snapshot is alpha's")
            && human.stdout.contains("bin/su: setuid/setgid bits removed"),
        "{human}"
    );

    // Onto its own host, and onto another with --preserve-special: kept.
    let own = fleet.restore_root("alpha").join("home");
    let out = fleet
        .restore(&snapshot, &format!("alpha:{}", path_str(&own)), &[])
        .expect("run restore");
    assert_exit(&fleet, &out, 0, "a restore onto the snapshot's own host");
    let preserved = fleet.restore_root("nas").join("preserved");
    let to = format!("nas:{}", path_str(&preserved));
    let out = fleet
        .cli_with_timeout(
            [
                "restore",
                snapshot.as_str(),
                "--to",
                to.as_str(),
                "--preserve-special",
                "--wait",
                "--json",
            ],
            DATA_TIMEOUT,
        )
        .expect("run restore");
    assert_exit(&fleet, &out, 0, "a restore with --preserve-special");
    for dir in [own, preserved] {
        let got = restored_path(&dir, &root).join("bin");
        assert_eq!(mode(&got.join("su")), 0o4755, "{}", got.display());
        assert_eq!(
            xattr::get(got.join("ping"), "security.capability").expect("read xattrs"),
            Some(cap.clone())
        );
        let meta = fs::symlink_metadata(got.join("null")).expect("the device node");
        assert!(meta.file_type().is_char_device(), "{}", got.display());
    }
}
