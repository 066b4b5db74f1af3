//! Copies between storage hosts (issue 14): `flotilla copy` sends sealed
//! blobs storage to storage over QUIC, and the fleet reads every copy.
//!
//! - Two hosts backed up to `nas` are copied to `offsite`; `snapshots` lists
//!   each snapshot once with both storage hosts; a second copy sends
//!   nothing; `check offsite --read-data` passes; with `nas` stopped, both
//!   snapshots restore from `offsite` byte for byte.
//! - A copy whose destination is killed mid-transfer (proved: complete packs
//!   had arrived, the copy had not ended) is run again and sends only what
//!   had not arrived; `--limit-upload` paces it.

use std::path::Path;
use std::time::{Duration, Instant};

use flotilla_tests::{
    check_report, restored_path, summary_of, write_random, Agent, CliOutput, Compare, Fleet,
    NatsServer, DATA_TIMEOUT, STARTUP_TIMEOUT,
};
use serde_json::Value;

use super::dataplane::{assert_exit, assert_same_tree, backup_ok, pack_bytes, snapshot_of};
use super::path_str;

const MIB: u64 = 1 << 20;
/// How long a stopping agent may take.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// nas and offsite (storage hosts, offsite with a restore root) and the
/// sources, all online with their QUIC addresses known.
fn start_two_storages(fleet: &Fleet, sources: &[&str]) -> (Agent, Agent, Vec<Agent>) {
    let nas = fleet
        .agent("nas")
        .without_backup_root()
        .storage()
        .start()
        .expect("start nas");
    let offsite = fleet
        .agent("offsite")
        .without_backup_root()
        .storage()
        .restore_root()
        .start()
        .expect("start offsite");
    let agents: Vec<Agent> = sources
        .iter()
        .map(|h| fleet.start_agent(h).expect("start a source"))
        .collect();
    let mut hosts = vec!["nas", "offsite"];
    hosts.extend_from_slice(sources);
    fleet.wait_online(&hosts, STARTUP_TIMEOUT);
    fleet.wait_quic_addr("nas", STARTUP_TIMEOUT);
    fleet.wait_quic_addr("offsite", STARTUP_TIMEOUT);
    (nas, offsite, agents)
}

/// `flotilla copy --from nas --to offsite ARGS… --wait --json`.
fn copy(fleet: &Fleet, extra: &[&str]) -> CliOutput {
    let mut args = vec!["copy", "--from", "nas", "--to", "offsite"];
    args.extend_from_slice(extra);
    args.extend(["--wait", "--json"]);
    fleet
        .cli_with_timeout(args, DATA_TIMEOUT)
        .expect("run flotilla copy")
}

/// The copy report of a successful `copy --wait --json`.
fn copy_ok(fleet: &Fleet, extra: &[&str]) -> Value {
    let out = copy(fleet, extra);
    assert_exit(fleet, &out, 0, "flotilla copy");
    let summary = summary_of(&out, "nas").expect("a copy summary");
    if summary["outcome"] != "succeeded" {
        fleet.fail(format!("the copy did not succeed:\n{out}"));
    }
    summary["copy"].clone()
}

fn num(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// `snapshots --json`: id → storage hosts holding it.
fn holders(fleet: &Fleet) -> Vec<(String, Vec<String>)> {
    let listed = fleet
        .cli_json(["snapshots", "--json"])
        .expect("flotilla snapshots");
    listed
        .as_array()
        .expect("a list")
        .iter()
        .map(|s| {
            let storages = s["storages"]
                .as_array()
                .expect("storages")
                .iter()
                .map(|h| h.as_str().expect("a name").to_owned())
                .collect();
            (s["id"].as_str().expect("an id").to_owned(), storages)
        })
        .collect()
}

fn fill(root: &Path, seed: u64, files: u64, size: u64) {
    for i in 0..files {
        write_random(&root.join(format!("data/f{i:02}.bin")), seed + i, size).expect("write data");
    }
    std::fs::write(root.join("notes.txt"), format!("host seeded {seed}\n")).expect("write a note");
}

#[test]
fn snapshots_copied_off_site_restore_with_the_first_storage_host_gone() {
    let nats = NatsServer::start().expect("start nats-server");
    let fleet = Fleet::init(&nats).expect("init fleet");
    let (mut nas, offsite, sources) = start_two_storages(&fleet, &["alpha", "beta"]);
    fill(sources[0].backup_root(), 1, 3, 2 * MIB);
    fill(sources[1].backup_root(), 100, 2, MIB);
    // alpha and beta share a file: deduplicated at nas, sent once.
    std::fs::copy(
        sources[0].backup_root().join("data/f00.bin"),
        sources[1].backup_root().join("shared.bin"),
    )
    .expect("share a file");
    let snaps: Vec<String> = backup_ok(&fleet, &["alpha", "beta"])
        .iter()
        .map(snapshot_of)
        .collect();

    let report = copy_ok(&fleet, &[]);
    assert_eq!(num(&report["snapshots_copied"]), 2, "{report}");
    assert_eq!(num(&report["snapshots_failed"]), 0, "{report}");
    let sent = num(&report["bytes_sent"]);
    // Everything, once: the data (3×2 + 2×1 MiB, shared file once) plus trees.
    assert!(
        (8 * MIB..9 * MIB).contains(&sent),
        "sent {sent} bytes: {report}"
    );
    let copied = pack_bytes(offsite.storage_dir());
    assert!(
        copied >= sent,
        "offsite holds {copied} bytes of packs, {sent} sent"
    );

    // One row per snapshot, held by both.
    let listed = holders(&fleet);
    assert_eq!(listed.len(), 2, "{listed:?}");
    for (id, storages) in &listed {
        assert!(
            snaps.contains(id),
            "{id} is not a snapshot taken: {listed:?}"
        );
        assert_eq!(storages, &["nas", "offsite"], "{listed:?}");
    }

    // Again: nothing to send, both already there.
    let again = copy_ok(&fleet, &[]);
    assert_eq!(num(&again["snapshots_present"]), 2, "{again}");
    assert_eq!(num(&again["snapshots_copied"]), 0, "{again}");
    assert_eq!(num(&again["bytes_sent"]), 0, "{again}");
    assert_eq!(
        pack_bytes(offsite.storage_dir()),
        copied,
        "nothing written again"
    );

    let out = fleet.check("offsite", true).expect("run check");
    let checked = check_report(&out).expect("a check report");
    assert_eq!(checked["ok"], true, "{out}");
    assert_eq!(num(&checked["snapshots"]), 2, "{out}");

    // nas goes away; both snapshots restore from offsite.
    nas.sigterm().expect("stop nas");
    nas.wait_exit(STOP_TIMEOUT).expect("nas stops");
    for (snap, source) in snaps.iter().zip(&sources) {
        let target = offsite.restore_root().join(source.host());
        let to = format!("offsite:{}", path_str(&target));
        let out = fleet
            .cli_with_timeout(
                ["restore", snap.as_str(), "--to", &to, "--wait", "--json"],
                DATA_TIMEOUT,
            )
            .expect("run flotilla restore");
        assert_exit(&fleet, &out, 0, "restore from the copy");
        let summary = summary_of(&out, "offsite").expect("a restore summary");
        assert_eq!(summary["storage"], "offsite", "{out}");
        assert_same_tree(
            &fleet,
            source.backup_root(),
            &restored_path(&target, source.backup_root()),
            Compare::Everything,
        );
    }
}

#[test]
fn a_copy_cut_short_resumes_without_sending_again_what_arrived() {
    let nats = NatsServer::start().expect("start nats-server");
    let fleet = Fleet::init(&nats).expect("init fleet");
    let (_nas, mut offsite, sources) = start_two_storages(&fleet, &["alpha"]);
    // 96 MiB of random data: over four upload lanes each lane fills a
    // 16 MiB pack (committed at once) long before the copy ends.
    fill(sources[0].backup_root(), 7, 12, 8 * MIB);
    let snap = snapshot_of(&backup_ok(&fleet, &["alpha"])[0]);
    let total = pack_bytes(&fleet.storage_dir("nas"));

    // Paced at 8 MiB/s: twelve seconds or so, time to cut it short.
    let started = Instant::now();
    let out = fleet
        .cli([
            "copy",
            "--from",
            "nas",
            "--to",
            "offsite",
            "--limit-upload",
            "8M",
            "--json",
        ])
        .expect("send the copy");
    assert_exit(&fleet, &out, 0, "queue the copy");
    let task_id = out.json().expect("a queued line")["task_id"]
        .as_str()
        .expect("a task id")
        .to_owned();
    let old_addr = fleet.wait_quic_addr("offsite", STARTUP_TIMEOUT);
    // The time is taken when the packs are seen, not after the kill.
    let (arrived, seen_after) = fleet.wait_for("complete packs at offsite", DATA_TIMEOUT, || {
        let bytes = pack_bytes(offsite.storage_dir());
        Ok((bytes >= 16 * MIB).then(|| (bytes, started.elapsed())))
    });
    offsite.kill9().expect("kill offsite mid-copy");
    // nas notices the lost destination within QUIC's idle timeout.
    let finished = fleet.wait_for_event("the copy to fail", DATA_TIMEOUT, |e| {
        e["kind"] == "task.finished" && e["detail"]["task_id"] == task_id.as_str()
    });
    assert_eq!(finished["detail"]["outcome"], "failed", "{finished}");
    assert!(
        arrived < total,
        "the kill must land mid-copy: {arrived} of {total} bytes had arrived"
    );
    // Paced: no credit is saved, so at most one blob (8 MiB here) went
    // ahead of the pace; the rest took its time at 8 MiB/s (unpaced, the
    // whole copy takes well under a second on loopback).
    let floor = Duration::from_secs_f64(arrived.saturating_sub(8 * MIB) as f64 / (8 * MIB) as f64);
    assert!(seen_after >= floor, "{arrived} bytes in {seen_after:?}");

    offsite.restart().expect("restart offsite");
    // Its new address (a new port) is what the next copy must dial.
    fleet.wait_for("offsite's new address", STARTUP_TIMEOUT, || {
        let addr = fleet.wait_quic_addr("offsite", STARTUP_TIMEOUT);
        Ok((addr != old_addr).then_some(addr))
    });
    let kept = pack_bytes(offsite.storage_dir());
    assert!(kept >= 16 * MIB, "complete packs survive the kill: {kept}");
    let report = copy_ok(&fleet, &[]);
    assert_eq!(num(&report["snapshots_copied"]), 1, "{report}");
    let sent = num(&report["bytes_sent"]);
    assert!(
        sent + kept <= total + MIB,
        "resumed copy sent {sent} bytes though {kept} of {total} had arrived"
    );
    assert!(num(&report["blobs_present"]) > 0, "{report}");

    // What was copied in two goes restores whole.
    let target = offsite.restore_root().join("r");
    let to = format!("offsite:{}", path_str(&target));
    let out = fleet
        .cli_with_timeout(
            [
                "restore",
                snap.as_str(),
                "--to",
                &to,
                "--from",
                "offsite",
                "--wait",
                "--json",
            ],
            DATA_TIMEOUT,
        )
        .expect("run flotilla restore");
    assert_exit(&fleet, &out, 0, "restore the resumed copy");
    assert_same_tree(
        &fleet,
        sources[0].backup_root(),
        &restored_path(&target, sources[0].backup_root()),
        Compare::Contents,
    );
}

/// A plan with `copy_to`: `flotilla serve` copies each new snapshot of the
/// plan's hosts to offsite after its backup (one started by hand counts),
/// and applies offsite's own keep policy there (`keep_copies`), not nas's.
#[test]
fn serve_copies_each_backup_off_site_and_keeps_its_own_policy_there() {
    let nats = NatsServer::start().expect("start nats-server");
    let fleet = Fleet::init(&nats).expect("init fleet");
    let (_nas, _offsite, sources) = start_two_storages(&fleet, &["alpha"]);
    let config = fleet.dir().join("flotilla.toml");
    std::fs::write(
        &config,
        "[serve]\ntick = \"1s\"\n\n[[plan]]\nname = \"home\"\nhosts = [\"alpha\"]\nto = \"nas\"\n\
         keep = { last = 5 }\ncopy_to = [\"offsite\"]\nkeep_copies.offsite = { last = 1 }\n",
    )
    .expect("write flotilla.toml");
    let serve = fleet.serve("main", &config).expect("start flotilla serve");
    fleet.wait_until("the daemon to lead", STARTUP_TIMEOUT, || {
        Ok(serve.log().contains("acquired the coordinator lease"))
    });
    let root = sources[0].backup_root();
    let mut made = Vec::new();
    for i in 0..2u64 {
        fill(root, 50 + i, 1, MIB);
        made.push(snapshot_of(&backup_ok(&fleet, &["alpha"])[0]));
        let newest = made[made.len() - 1].clone();
        fleet.wait_until(
            "the daemon to copy the new snapshot to offsite",
            Duration::from_secs(60),
            || {
                Ok(holders(&fleet)
                    .iter()
                    .any(|(id, on)| *id == newest && on == &["nas", "offsite"]))
            },
        );
    }
    // offsite keeps one (its policy), nas both (its own keeps five).
    fleet.wait_until(
        "offsite's keep policy to apply",
        Duration::from_secs(60),
        || {
            let listed = holders(&fleet);
            Ok(listed.len() == 2
                && listed
                    .iter()
                    .any(|(id, on)| *id == made[0] && on == &["nas"])
                && listed
                    .iter()
                    .any(|(id, on)| *id == made[1] && on == &["nas", "offsite"]))
        },
    );
    let copies = fleet
        .events()
        .expect("read events")
        .into_iter()
        .filter(|e| e["kind"] == "job.succeeded" && e["detail"]["job_kind"] == "copy")
        .count();
    assert!(
        copies >= 2,
        "a copy job per backup, each succeeded: {copies}"
    );
}
