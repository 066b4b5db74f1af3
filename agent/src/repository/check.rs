//! `check`: what is wrong with the repository, read from disk (not from the
//! in-memory index, which is what is being checked).
//!
//! Structure: every index parses and its pack exists with the size the index
//! states; every pack has an index; every snapshot parses and names only
//! indexed blobs. With `read_data`, every indexed pack is also read in full:
//! header, trailer, the pack's hash, and each blob's hash.
//!
//! A blob counts as damaged only when no intact copy is left: concurrent
//! writers may store the same blob in two packs, and one good copy is enough
//! for every snapshot that needs it. A blob a snapshot references that no
//! index lists counts as missing; `damaged_blobs` holds both, so its length
//! is the number of distinct blobs the findings name as damaged or missing.
//!
//! Check reflects the disk as it is now, not as this process last saw it:
//! - a pack without any index (what a crash or a failed write, such as a
//!   full disk, leaves between a pack's rename and its index's) is read and,
//!   if intact, indexed again, as opening the repository does; only one that
//!   cannot be (damaged, or the index still cannot be written) is a problem;
//! - a pack found gone or of another size than its index states is dropped
//!   from the in-memory index, so the next backup uploads its blobs again
//!   instead of deduplicating against bytes that cannot be read.
//!
//! An index that exists but does not read (truncated, garbage) is damage and
//! is reported, not rewritten; the blobs it would list count as missing.
//!
//! Damage is remembered: a copy that `read_data` finds damaged (its bytes do
//! not match their hash, its entry cannot be read, or its index entry does
//! not match the pack) leaves the in-memory index at once and is recorded in
//! `DIR/damaged/` (see `damage.rs`), so no backup dedups against it; a pack
//! whose structure is damaged while its blobs are intact is recorded too, for
//! `repair` to rewrite. Every check, with or without `read_data`, counts the
//! recorded copies as damaged and reports them until `repair` drops their
//! pack: what check reports is the damage still in the repository. Check, like
//! `prune` and `repair`, holds the repository's maintenance lock.
//!
//! Order matters while backups run: snapshots are listed before indexes,
//! because a snapshot is committed only after the indexes of all its blobs,
//! so every blob a listed snapshot needs is already indexed when the indexes
//! are listed.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs;
use std::io;

use flotilla_protocol::repo::{BlobId, CheckReport, Problem};
use tracing::{info, warn};

use super::damage::{self, Recorded};
use super::format::{hex32, scan_pack, IndexEntry, PackId};
use super::{idx_path, index, pack_path, read_config, snapshots, RepoError, Repository};

/// Most `blob_missing` problems listed per snapshot; the rest are counted.
const MISSING_PER_SNAPSHOT: usize = 10;

fn problem(
    kind: &str,
    pack: Option<&PackId>,
    blob: Option<BlobId>,
    message: impl Into<String>,
) -> Problem {
    Problem {
        kind: kind.into(),
        pack: pack.map(hex32),
        blob,
        message: message.into(),
    }
}

/// What an error found, for a problem's message: damage without the advice
/// to run check, which is what is running.
fn finding(e: &RepoError) -> String {
    match e {
        RepoError::Corrupt { path, reason } => format!("{}: {reason}", path.display()),
        other => other.to_string(),
    }
}

fn io_problem(e: &RepoError) -> Problem {
    problem("io", None, None, e.to_string())
}

/// What checking one indexed pack found.
struct PackVerdict {
    /// Per index entry: whether that copy is intact, as far as this level
    /// of checking can tell.
    good: Vec<bool>,
    /// Copies the read found damaged: (blob, offset). Only when the pack was
    /// read (`read_data`), is there with the size its index states, and the
    /// read did not fail on I/O.
    damaged: Vec<(BlobId, u64)>,
    /// What the read found wrong with the pack as a whole.
    fault: Option<String>,
}

/// The message of a problem about a recorded copy.
const RECORDED: &str =
    "recorded as damaged by an earlier check or read; the blob is no longer offered to backups, run repair";

impl Repository {
    /// Checks the repository; see the module documentation. Never fails:
    /// what cannot be read is itself a finding.
    pub fn check(&self, read_data: bool) -> CheckReport {
        let _maintenance = self.shared.maintenance();
        self.check_locked(read_data)
    }

    /// [`check`](Self::check), for a caller that holds the maintenance lock.
    pub(super) fn check_locked(&self, read_data: bool) -> CheckReport {
        let dir = &self.shared.dir;
        let mut report = CheckReport::default();
        if let Err(e) = read_config(&dir.join("config")) {
            report
                .problems
                .push(problem("config", None, None, e.to_string()));
        }

        // Only the ids now; each record is read when it is checked, so memory
        // holds one snapshot's blob list at a time.
        let snaps = match snapshots::list_ids(dir) {
            Ok(s) => s,
            Err(e) => {
                report.problems.push(io_problem(&e));
                Vec::new()
            }
        };
        report.snapshots = snaps.len() as u64;

        // Blob id → whether at least one intact copy exists.
        let mut blobs: HashMap<BlobId, bool> = HashMap::new();
        let mut indexed: HashSet<PackId> = HashSet::new();
        // Indexed packs that are gone or of the wrong size.
        let mut absent: Vec<PackId> = Vec::new();
        match index::list_idx(dir) {
            Ok(list) => {
                for (pack, path) in list {
                    match index::read_idx(&path, &pack) {
                        Ok(idx) => {
                            indexed.insert(pack);
                            let verdict = self.check_pack(
                                &pack,
                                idx.size,
                                &idx.entries,
                                read_data,
                                &mut report,
                                &mut absent,
                            );
                            let good =
                                self.apply_records(&pack, &idx.entries, verdict, &mut report);
                            for (entry, ok) in idx.entries.iter().zip(good) {
                                let slot = blobs.entry(entry.id).or_insert(false);
                                *slot |= ok;
                            }
                        }
                        Err(e) => report.problems.push(problem(
                            "idx_unreadable",
                            Some(&pack),
                            None,
                            format!("{}; the blobs it lists count as missing", finding(&e)),
                        )),
                    }
                }
            }
            Err(e) => report.problems.push(io_problem(&e)),
        }
        if !absent.is_empty() {
            self.shared.write_index().remove_packs(&absent);
        }

        match index::list_packs(dir) {
            Ok(list) => {
                for (pack, path) in list {
                    report.packs += 1;
                    report.bytes += fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                    // An index that exists but does not parse was reported
                    // above; one written since the listing belongs to a pack
                    // committed during the check.
                    if indexed.contains(&pack) || idx_path(dir, &pack).exists() {
                        continue;
                    }
                    // Left by a crash or a failed write; index it now rather
                    // than fail every check until the agent restarts.
                    match index::rebuild(dir, &pack) {
                        Ok(idx) => {
                            info!(pack = %path.display(), blobs = idx.entries.len(), "check re-indexed a pack that had no index");
                            self.shared
                                .write_index()
                                .insert_pack(pack, idx.size, &idx.entries);
                            // Intact as read, but copies recorded as damaged
                            // still count until repair.
                            let verdict = PackVerdict {
                                good: vec![true; idx.entries.len()],
                                damaged: Vec::new(),
                                fault: None,
                            };
                            let good =
                                self.apply_records(&pack, &idx.entries, verdict, &mut report);
                            for (entry, ok) in idx.entries.iter().zip(good) {
                                *blobs.entry(entry.id).or_insert(false) |= ok;
                            }
                        }
                        Err(e) => {
                            let state = match e {
                                RepoError::Corrupt { .. } => {
                                    "it is damaged and cannot be re-indexed"
                                }
                                _ => "re-indexing it failed",
                            };
                            report.problems.push(problem(
                                "pack_without_index",
                                Some(&pack),
                                None,
                                format!("pack has no index; {state}: {}", finding(&e)),
                            ));
                        }
                    }
                }
            }
            Err(e) => report.problems.push(io_problem(&e)),
        }

        report.blobs = blobs.len() as u64;
        // Damaged here; the missing ones join below, once snapshots name them.
        let mut lost: BTreeSet<BlobId> = blobs
            .iter()
            .filter(|(_, ok)| !**ok)
            .map(|(id, _)| *id)
            .collect();

        let mut affected = BTreeSet::new();
        for id in snaps {
            let rec = match snapshots::read(dir, &id) {
                Ok(rec) => rec,
                Err(e) => {
                    report
                        .problems
                        .push(problem("snapshot_unreadable", None, None, e.to_string()));
                    continue;
                }
            };
            let mut missing = 0usize;
            for id in std::iter::once(&rec.tree).chain(&rec.blobs) {
                match blobs.get(id) {
                    Some(true) => {}
                    Some(false) => {
                        affected.insert(rec.id.clone());
                    }
                    None => {
                        affected.insert(rec.id.clone());
                        lost.insert(*id);
                        missing += 1;
                        if missing <= MISSING_PER_SNAPSHOT {
                            report.problems.push(problem(
                                "blob_missing",
                                None,
                                Some(*id),
                                format!(
                                    "snapshot {} references blob {id}, which no index lists",
                                    rec.id
                                ),
                            ));
                        }
                    }
                }
            }
            if missing > MISSING_PER_SNAPSHOT {
                report.problems.push(problem(
                    "blob_missing",
                    None,
                    None,
                    format!(
                        "snapshot {} references {} more missing blobs",
                        rec.id,
                        missing - MISSING_PER_SNAPSHOT
                    ),
                ));
            }
        }
        report.affected_snapshots = affected.into_iter().collect();
        report.damaged_blobs = lost.into_iter().collect();

        if report.is_ok() {
            info!(
                packs = report.packs,
                blobs = report.blobs,
                snapshots = report.snapshots,
                read_data,
                "check passed"
            );
        } else {
            warn!(
                problems = report.problems.len(),
                damaged = report.damaged_blobs.len(),
                affected = report.affected_snapshots.len(),
                read_data,
                "check found problems"
            );
        }
        report
    }

    /// Counts the copies recorded as damaged in `pack` as damaged (reporting
    /// those the read did not find again), and records what the read found
    /// that is not recorded yet, which takes it out of the in-memory index.
    /// Returns, per index entry, whether that copy counts as intact.
    fn apply_records(
        &self,
        pack: &PackId,
        entries: &[IndexEntry],
        verdict: PackVerdict,
        report: &mut CheckReport,
    ) -> Vec<bool> {
        let PackVerdict {
            mut good,
            damaged,
            fault,
        } = verdict;
        let recorded = match damage::recorded(&self.shared.dir, pack) {
            Ok(r) => r,
            Err(e) => {
                report.problems.push(problem(
                    "io",
                    Some(pack),
                    None,
                    format!("cannot read its damage record: {e}"),
                ));
                None
            }
        };
        if let Some(rec) = &recorded {
            if fault.is_none() {
                if let Some(f) = rec.fault() {
                    report.problems.push(problem(
                        "pack_damaged",
                        Some(pack),
                        None,
                        format!("recorded as damaged: {f}; run repair"),
                    ));
                }
            }
            for (entry, ok) in entries.iter().zip(good.iter_mut()) {
                if rec.covers(&entry.id) && *ok {
                    *ok = false;
                    report.problems.push(problem(
                        "blob_damaged",
                        Some(pack),
                        Some(entry.id),
                        RECORDED,
                    ));
                }
            }
        }
        let known = |id: &BlobId| recorded.as_ref().is_some_and(|r| r.covers(id));
        let new: Vec<(BlobId, u64)> = damaged.into_iter().filter(|(id, _)| !known(id)).collect();
        let new_fault = fault.filter(|_| recorded.as_ref().and_then(Recorded::fault).is_none());
        if !new.is_empty() || new_fault.is_some() {
            if let Err(e) = self.mark_damaged(pack, &new, new_fault.as_deref()) {
                report.problems.push(problem(
                    "io",
                    Some(pack),
                    None,
                    format!("cannot record the damage found (it stays out of the index until the agent restarts): {e}"),
                ));
            }
        }
        good
    }

    /// Checks one indexed pack.
    fn check_pack(
        &self,
        pack: &PackId,
        size: u64,
        entries: &[IndexEntry],
        read_data: bool,
        report: &mut CheckReport,
        absent: &mut Vec<PackId>,
    ) -> PackVerdict {
        let path = pack_path(&self.shared.dir, pack);
        let all = |ok: bool| PackVerdict {
            good: vec![ok; entries.len()],
            damaged: Vec::new(),
            fault: None,
        };
        match fs::metadata(&path) {
            Err(e) => {
                // Only a pack known to be gone leaves the in-memory index; one
                // that cannot be looked at (EIO, EACCES) may still be there.
                if e.kind() == io::ErrorKind::NotFound {
                    absent.push(*pack);
                }
                report.problems.push(problem(
                    "pack_missing",
                    Some(pack),
                    None,
                    format!(
                        "index lists {} blobs but the pack is missing: {e}",
                        entries.len()
                    ),
                ));
                return all(false);
            }
            Ok(m) if m.len() != size => {
                absent.push(*pack);
                report.problems.push(problem(
                    "pack_size",
                    Some(pack),
                    None,
                    format!(
                        "pack is {} bytes, its index says {size} (truncated or overwritten)",
                        m.len()
                    ),
                ));
                return all(false);
            }
            Ok(_) => {}
        }
        if !read_data {
            return all(true);
        }
        let scan = match scan_pack(&path) {
            Ok(scan) => scan,
            Err(e) => {
                report.problems.push(problem(
                    "io",
                    Some(pack),
                    None,
                    format!("cannot read {}: {e}", path.display()),
                ));
                return all(false);
            }
        };
        let mut fault = scan.fault.clone();
        if let Some(fault) = &scan.fault {
            report
                .problems
                .push(problem("pack_damaged", Some(pack), None, fault.clone()));
        }
        for d in &scan.damaged {
            report.problems.push(problem(
                "blob_damaged",
                Some(pack),
                Some(d.id),
                format!(
                    "blob {} at offset {} does not match its stored hash",
                    d.id, d.offset
                ),
            ));
        }
        if scan.fault.is_none() && scan.damaged.is_empty() && scan.pack_hash.as_ref() != Some(pack)
        {
            let why = "pack content does not hash to its name";
            report
                .problems
                .push(problem("pack_hash", Some(pack), None, why));
            fault = Some(why.into());
        }
        // Each blob is judged by its own hash: a damaged neighbour or trailer
        // does not make an intact blob unreadable.
        let damaged: HashSet<u64> = scan.damaged.iter().map(|e| e.offset).collect();
        let verified: HashMap<u64, &IndexEntry> = scan
            .entries
            .iter()
            .filter(|e| !damaged.contains(&e.offset))
            .map(|e| (e.offset, e))
            .collect();
        // A copy not verified (damaged, past a structural fault, or not as
        // its index entry says) cannot be served: it is damage to record.
        let good: Vec<bool> = entries
            .iter()
            .map(|e| {
                let ok = verified.get(&e.offset).is_some_and(|v| *v == e);
                if !ok && scan.fault.is_none() && !damaged.contains(&e.offset) {
                    report.problems.push(problem(
                        "idx_mismatch",
                        Some(pack),
                        Some(e.id),
                        "index entry does not match the pack's content",
                    ));
                }
                ok
            })
            .collect();
        let bad = entries
            .iter()
            .zip(&good)
            .filter(|(_, ok)| !**ok)
            .map(|(e, _)| (e.id, e.offset))
            .collect();
        PackVerdict {
            good,
            damaged: bad,
            fault,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::format::{ENTRY_HEADER_LEN, HEADER_LEN};
    use super::super::snapshots::tests::record;
    use super::super::tests::blob;
    use super::*;
    use flotilla_protocol::repo::BlobKind;

    /// Two packs: the first holds blobs 1, 2 (snapshot "a…"), the second
    /// blob 3 (snapshot "b…").
    fn setup(dir: &std::path::Path) -> (Repository, [BlobId; 3], [PackId; 2]) {
        let repo = Repository::open_or_init(dir).unwrap();
        let mut ids = Vec::new();
        let mut packs = Vec::new();
        for group in [&[1u32, 2][..], &[3]] {
            let mut w = repo.pack_writer();
            for n in group {
                let (id, data) = blob(*n, 2000);
                w.add(id, BlobKind::Data, &data).unwrap();
                ids.push(id);
            }
            w.finish().unwrap();
            let known: HashSet<PackId> = packs.iter().copied().collect();
            let new = index::list_packs(dir)
                .unwrap()
                .into_iter()
                .find(|(p, _)| !known.contains(p))
                .unwrap();
            packs.push(new.0);
        }
        repo.commit_snapshot(&record(&"a".repeat(32), 1, ids[0], vec![ids[0], ids[1]]))
            .unwrap();
        repo.commit_snapshot(&record(&"b".repeat(32), 2, ids[2], vec![ids[2]]))
            .unwrap();
        (repo, [ids[0], ids[1], ids[2]], [packs[0], packs[1]])
    }

    #[test]
    fn a_clean_repository_passes() {
        let dir = tempfile::tempdir().unwrap();
        let (repo, _, _) = setup(dir.path());
        for read_data in [false, true] {
            let r = repo.check(read_data);
            assert!(r.is_ok(), "{r:?}");
            assert_eq!((r.packs, r.blobs, r.snapshots), (2, 3, 2));
            assert_eq!(r.bytes, repo.stats().stored_bytes);
        }
    }

    #[test]
    fn a_flipped_byte_is_found_by_read_blob_and_by_check_with_data() {
        let dir = tempfile::tempdir().unwrap();
        let (repo, ids, packs) = setup(dir.path());
        let path = pack_path(dir.path(), &packs[0]);
        let mut bytes = fs::read(&path).unwrap();
        bytes[(HEADER_LEN + ENTRY_HEADER_LEN + 10) as usize] ^= 0x40;
        fs::write(&path, &bytes).unwrap();

        let err = repo.read_blob(&ids[0]).unwrap_err();
        assert_eq!(err.code(), "corrupt");
        let msg = err.to_string();
        assert!(
            msg.contains(&hex32(&packs[0])) && msg.contains(&ids[0].to_hex()),
            "{msg}"
        );
        assert_eq!(repo.read_blob(&ids[1]).unwrap().1, blob(2, 2000).1);
        assert_eq!(repo.read_blob(&ids[2]).unwrap().1, blob(3, 2000).1);

        // The read took the damaged copy out of the index and recorded it:
        // even a check that reads no data reports it now.
        assert_eq!(repo.missing(&ids), vec![ids[0]]);
        let r = repo.check(false);
        assert_eq!(r.damaged_blobs, vec![ids[0]], "{r:?}");
        assert!(
            r.problems
                .iter()
                .all(|p| p.kind == "blob_damaged" && p.blob == Some(ids[0])),
            "{r:?}"
        );
        let r = repo.check(true);
        assert_eq!(r.damaged_blobs, vec![ids[0]]);
        assert_eq!(r.affected_snapshots, vec!["a".repeat(32)]);
        assert!(
            r.problems
                .iter()
                .any(|p| p.kind == "blob_damaged" && p.blob == Some(ids[0])),
            "{r:?}"
        );
        assert!(
            r.problems.iter().any(|p| p.kind == "pack_damaged"),
            "the trailer hash no longer matches"
        );
    }

    #[test]
    fn truncated_missing_and_unindexed_packs_and_garbage_indexes() {
        let dir = tempfile::tempdir().unwrap();
        let (repo, ids, packs) = setup(dir.path());
        let first = pack_path(dir.path(), &packs[0]);
        let bytes = fs::read(&first).unwrap();
        fs::write(&first, &bytes[..bytes.len() - 7]).unwrap();
        for read_data in [false, true] {
            let r = repo.check(read_data);
            assert!(r.problems.iter().any(|p| p.kind == "pack_size"), "{r:?}");
            assert_eq!(r.damaged_blobs, vec![ids[0], ids[1]]);
            assert_eq!(r.affected_snapshots, vec!["a".repeat(32)]);
        }

        fs::remove_file(&first).unwrap();
        assert!(repo
            .check(false)
            .problems
            .iter()
            .any(|p| p.kind == "pack_missing"));

        fs::write(idx_path(dir.path(), &packs[1]), b"\x00garbage").unwrap();
        let r = repo.check(true);
        assert!(
            r.problems.iter().any(|p| p.kind == "idx_unreadable"),
            "{r:?}"
        );
        assert!(
            r.problems
                .iter()
                .any(|p| p.kind == "blob_missing" && p.blob == Some(ids[2])),
            "{r:?}"
        );
        assert_eq!(r.affected_snapshots, vec!["a".repeat(32), "b".repeat(32)]);

        // Without any index, an intact pack is indexed again by check, as
        // opening does; a damaged one is reported.
        fs::remove_file(idx_path(dir.path(), &packs[1])).unwrap();
        let r = repo.check(false);
        assert!(
            !r.problems.iter().any(|p| p.pack == Some(hex32(&packs[1]))),
            "{r:?}"
        );
        assert!(idx_path(dir.path(), &packs[1]).exists());
        assert_eq!(r.affected_snapshots, vec!["a".repeat(32)]);

        fs::remove_file(idx_path(dir.path(), &packs[1])).unwrap();
        let path = pack_path(dir.path(), &packs[1]);
        let mut bytes = fs::read(&path).unwrap();
        bytes[(HEADER_LEN + ENTRY_HEADER_LEN + 10) as usize] ^= 0x40;
        fs::write(&path, &bytes).unwrap();
        let r = repo.check(false);
        let p = r
            .problems
            .iter()
            .find(|p| p.kind == "pack_without_index")
            .expect("reported");
        assert!(p.message.contains("damaged"), "{p:?}");
        assert!(!idx_path(dir.path(), &packs[1]).exists());
    }

    /// The distinct blobs the findings name, one by one.
    fn named_blobs(r: &CheckReport) -> BTreeSet<BlobId> {
        r.problems.iter().filter_map(|p| p.blob).collect()
    }

    #[test]
    fn a_truncated_index_is_reported_and_every_blob_it_lists_counts_as_missing() {
        let dir = tempfile::tempdir().unwrap();
        let (repo, ids, packs) = setup(dir.path());
        let idx = idx_path(dir.path(), &packs[0]);
        let bytes = fs::read(&idx).unwrap();
        fs::write(&idx, &bytes[..bytes.len() / 2]).unwrap();
        for read_data in [false, true] {
            let r = repo.check(read_data);
            assert!(
                r.problems
                    .iter()
                    .any(|p| p.kind == "idx_unreadable" && p.pack == Some(hex32(&packs[0]))),
                "{r:?}"
            );
            // The summary counts what the findings list: both blobs.
            assert_eq!(r.damaged_blobs, vec![ids[0], ids[1]], "{r:?}");
            assert_eq!(
                named_blobs(&r),
                r.damaged_blobs.iter().copied().collect(),
                "{r:?}"
            );
            assert_eq!(r.affected_snapshots, vec!["a".repeat(32)]);
            assert_eq!(r.blobs, 1, "only the other index lists a blob");
        }
        assert!(
            repo.missing(&[ids[0], ids[1]]).is_empty(),
            "the pack is intact: only its index is damaged, the blobs stay usable"
        );
        assert_eq!(
            fs::read(&idx).unwrap().len(),
            bytes.len() / 2,
            "not rewritten"
        );
    }

    #[test]
    fn a_check_after_a_failed_index_write_passes_once_the_cause_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let (repo, _, _) = setup(dir.path());
        // The index directory cannot take the new index (as a full disk
        // could refuse it): the pack lands, its index does not.
        let index_dir = dir.path().join("index");
        let away = dir.path().join("index.away");
        fs::rename(&index_dir, &away).unwrap();
        fs::write(&index_dir, b"in the way").unwrap();
        let (id, data) = blob(4, 2000);
        let mut w = repo.pack_writer();
        w.add(id, BlobKind::Data, &data).unwrap();
        assert_eq!(w.finish().unwrap_err().code(), "io");
        assert!(!repo.contains(&id));
        let r = repo.check(false);
        assert!(
            r.problems.iter().any(|p| p.kind == "pack_without_index"),
            "{r:?}"
        );

        // The cause goes away; the agent keeps running.
        fs::remove_file(&index_dir).unwrap();
        fs::rename(&away, &index_dir).unwrap();
        for read_data in [false, true] {
            let r = repo.check(read_data);
            assert!(r.is_ok(), "{r:?}");
            assert_eq!((r.packs, r.blobs), (3, 4));
        }
        assert_eq!(repo.read_blob(&id).unwrap().1, data);
        repo.commit_snapshot(&record(&"c".repeat(32), 3, id, vec![id]))
            .unwrap();
    }

    #[test]
    fn a_pack_found_gone_leaves_the_in_memory_index() {
        let dir = tempfile::tempdir().unwrap();
        let (repo, ids, packs) = setup(dir.path());
        fs::remove_file(pack_path(dir.path(), &packs[1])).unwrap();
        assert!(repo.missing(&[ids[2]]).is_empty(), "memory has not noticed");
        let r = repo.check(false);
        assert!(r.problems.iter().any(|p| p.kind == "pack_missing"), "{r:?}");
        assert_eq!(r.damaged_blobs, vec![ids[2]]);
        assert_eq!(r.affected_snapshots, vec!["b".repeat(32)]);
        // The next backup is told to upload it again.
        assert_eq!(repo.missing(&ids), vec![ids[2]]);
        assert_eq!(repo.stats().packs, 1);
    }

    #[test]
    fn a_duplicate_good_copy_saves_the_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let (repo, ids, packs) = setup(dir.path());
        // Write blob 1 again into a third pack, as a concurrent writer could.
        let (id, data) = blob(1, 2000);
        let idx = index::read_idx(&idx_path(dir.path(), &packs[0]), &packs[0]).unwrap();
        drop(repo);
        fs::remove_file(idx_path(dir.path(), &packs[0])).unwrap();
        let moved = pack_path(dir.path(), &packs[0]);
        let saved = fs::read(&moved).unwrap();
        fs::remove_file(&moved).unwrap();
        let repo = Repository::open_or_init(dir.path()).unwrap();
        let mut w = repo.pack_writer();
        w.add(id, BlobKind::Data, &data).unwrap();
        w.add(ids[1], BlobKind::Data, &blob(2, 2000).1).unwrap();
        // A blob of its own, so this pack's content (and so its name) differs
        // from the old pack that is put back below.
        let (extra, extra_data) = blob(9, 1234);
        w.add(extra, BlobKind::Data, &extra_data).unwrap();
        w.finish().unwrap();
        // Put the old pack back, damaged, with its index.
        let mut damaged = saved;
        damaged[(HEADER_LEN + ENTRY_HEADER_LEN) as usize] ^= 1;
        fs::write(&moved, damaged).unwrap();
        index::write_idx(dir.path(), &packs[0], &idx).unwrap();
        let r = repo.check(true);
        assert!(r.problems.iter().any(|p| p.kind == "blob_damaged"), "{r:?}");
        assert!(r.damaged_blobs.is_empty(), "{r:?}");
        assert!(r.affected_snapshots.is_empty(), "{r:?}");
    }
}
