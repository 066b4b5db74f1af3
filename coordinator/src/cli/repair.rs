//! `flotilla repair STORAGE [--read-data] [--wait]`.
//!
//! The storage agent moves the good blobs out of damaged packs, drops those
//! packs and reports which blobs committed snapshots still lack. It holds no
//! key, so which *files* those blobs are is worked out here, from the
//! affected snapshots' trees (as `check` does).

use std::collections::HashSet;
use std::time::Duration;

use flotilla_protocol::repo::{BlobId, RepairReport};
use flotilla_protocol::{HostName, TaskKind, TaskOutcome, TaskResult};
use serde_json::json;

use super::follow::follow_one;
use super::{output, Global};
use crate::dispatch::Dispatch;
use crate::error::CliError;
use crate::fleetops::{affected_files, repo_key};

/// How long `--wait` waits for a repair.
const WAIT: Duration = Duration::from_secs(24 * 3600);

pub(super) async fn run(
    g: &Global,
    storage: &HostName,
    read_data: bool,
    wait: bool,
    json: bool,
) -> Result<(), CliError> {
    let fleet = g.fleet()?;
    let nats = g.connect().await?;
    if nats.host(storage).await?.is_none() {
        return Err(CliError::HostUnknown(storage.to_string()));
    }
    let dispatch = Dispatch::new(&fleet, &nats)?;
    let task = dispatch
        .send(storage, TaskKind::Repair { read_data })
        .await?;
    if !wait {
        if json {
            outln!(
                "{}",
                json!({"type": "queued", "host": storage.as_str(), "task_id": task.id})
            );
        } else {
            eprintln!("sent repair task {} to {storage}", task.id);
            eprintln!("{}", output::follow_hint());
        }
        return Ok(());
    }
    let done = follow_one(storage, task, "repair", WAIT, json, &dispatch).await?;
    let Some(TaskResult::Repair(report)) = done.result else {
        return match done.outcome {
            TaskOutcome::Cancelled => Err(CliError::Cancelled),
            _ => Err(CliError::TaskFailed {
                host: storage.to_string(),
                task_id: done.task_id,
                retryable: done.retryable,
                error: done.error.unwrap_or_default(),
            }),
        };
    };
    // Which files are still lost: only key holders can tell.
    let lost: HashSet<BlobId> = report.lost_blobs.iter().copied().collect();
    let files = if lost.is_empty() {
        Vec::new()
    } else {
        match repo_key(&fleet) {
            Ok(key) => affected_files(&nats, &key, storage, &lost, &report.affected_snapshots)
                .await
                .unwrap_or_default(),
            Err(_) => Vec::new(),
        }
    };
    if json {
        let mut v = serde_json::to_value(&report).unwrap_or_default();
        // Hex, as everywhere a person or a script reads a blob id.
        v["lost_blobs"] = json!(report
            .lost_blobs
            .iter()
            .map(BlobId::to_hex)
            .collect::<Vec<_>>());
        v["storage"] = json!(storage.as_str());
        v["task_id"] = json!(done.task_id);
        v["ok"] = json!(report.is_ok());
        v["unrecoverable_files"] = json!(files
            .iter()
            .map(|(s, f)| json!({"snapshot": s, "path": f}))
            .collect::<Vec<_>>());
        outln!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        for line in describe(storage, &report, &files) {
            outln!("{line}");
        }
    }
    match done.outcome {
        TaskOutcome::Succeeded => Ok(()),
        TaskOutcome::Cancelled => Err(CliError::Cancelled),
        _ => Err(CliError::TaskFailed {
            host: storage.to_string(),
            task_id: done.task_id,
            retryable: done.retryable,
            error: done
                .error
                .unwrap_or_else(|| "repository repair left data lost".into()),
        }),
    }
}

/// What a person reads about a repair: what was done, then what is still
/// lost and which files that is.
fn describe(storage: &HostName, r: &RepairReport, files: &[(String, String)]) -> Vec<String> {
    let mut out = vec![format!(
        "{storage}: {} damaged pack(s){}: {} dropped, {} indexed again; {} good blob(s) ({}) \
         moved into {} new pack(s); {} damaged blob(s) healed (a good copy is stored), {} \
         discarded (no snapshot needs them)",
        r.packs_damaged,
        if r.read_data {
            " (every pack re-read first)"
        } else {
            ""
        },
        r.packs_dropped,
        r.packs_reindexed,
        r.blobs_moved,
        output::bytes(r.bytes_moved),
        r.packs_written,
        r.blobs_healed,
        r.blobs_discarded,
    )];
    for p in &r.problems {
        out.push(format!("  problem: {p}"));
    }
    if r.blobs_lost == 0 {
        out.push(if r.problems.is_empty() {
            "nothing is lost: every snapshot has all its data".to_owned()
        } else {
            "no snapshot lacks data, but repair could not do all it should (see above)".to_owned()
        });
        return out;
    }
    let shown: Vec<String> = r.affected_snapshots.iter().map(output::short).collect();
    let more = r.snapshots_affected.saturating_sub(shown.len() as u64);
    out.push(format!(
        "{} blob(s) lost: no copy is left; {} snapshot(s) cannot be fully restored: {}{}",
        r.blobs_lost,
        r.snapshots_affected,
        shown.join(", "),
        if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        }
    ));
    for (snap, path) in files {
        out.push(format!(
            "  unrecoverable file: {path} in snapshot {}",
            output::short(snap)
        ));
    }
    out.push(
        "a backup of a host that still has these files uploads them again and heals every \
         snapshot that references them; then run `flotilla check --read-data`"
            .to_owned(),
    );
    out
}

#[cfg(test)]
mod tests {
    use flotilla_protocol::SnapshotId;

    use super::*;

    fn nas() -> HostName {
        HostName::new("nas").expect("valid")
    }

    #[test]
    fn a_clean_repair_says_nothing_is_lost() {
        let r = RepairReport {
            packs_damaged: 1,
            packs_dropped: 1,
            blobs_moved: 4,
            bytes_moved: 4 << 20,
            packs_written: 1,
            blobs_healed: 1,
            ..RepairReport::default()
        };
        let lines = describe(&nas(), &r, &[]);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(
            lines[0].starts_with("nas: 1 damaged pack(s): 1 dropped, 0 indexed again; 4 good blob(s) (4.0 MiB) moved"),
            "{lines:?}"
        );
        assert_eq!(lines[1], "nothing is lost: every snapshot has all its data");
    }

    #[test]
    fn a_repair_with_losses_names_the_snapshots_and_files_and_what_heals_them() {
        let snap = SnapshotId::new("ab".repeat(16)).expect("valid");
        let r = RepairReport {
            packs_damaged: 1,
            packs_dropped: 1,
            blobs_lost: 1,
            lost_blobs: vec![BlobId([7; 32])],
            snapshots_affected: 3,
            affected_snapshots: vec![snap.clone()],
            ..RepairReport::default()
        };
        let files = vec![(snap.to_string(), "/srv/a.bin".to_owned())];
        let lines = describe(&nas(), &r, &files);
        assert_eq!(
            lines[1],
            "1 blob(s) lost: no copy is left; 3 snapshot(s) cannot be fully restored: \
             abababab and 2 more"
        );
        assert_eq!(
            lines[2],
            "  unrecoverable file: /srv/a.bin in snapshot abababab"
        );
        assert!(lines[3].starts_with("a backup of a host"), "{lines:?}");
    }
}
