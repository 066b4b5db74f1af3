//! `repair`: moves the good blobs out of damaged packs and drops those packs.
//!
//! Which packs. Repair does not read every pack: it works from what is known
//! to be wrong, which costs one read of each damaged pack only.
//! - packs with a damage record (`DIR/damaged/`, written when `check
//!   --read-data` or a read found a damaged copy or a damaged pack
//!   structure). `repair(true)` first runs the read-data check, so that
//!   damage nobody has read yet is found and recorded too;
//! - indexed packs that are gone or of another size than their index states
//!   (seen with one `stat` each), and indexes whose pack is gone;
//! - packs without a usable index. These are read in full, as opening the
//!   repository does: an intact one is indexed again, a damaged one is
//!   repaired from what the read found.
//!
//! For each such pack, every blob that has no copy in another (healthy) pack
//! is read and verified (entry header, and BLAKE3 against the stored hash
//! and the index's), and the intact ones are written into new packs with the
//! ordinary pack writer (pack → index → memory, all durable). Only then is
//! the damaged pack dropped: its index, then the pack, then its record, each
//! removal fsynced. A pack one of whose blobs could not be read for another
//! reason than damage (an I/O error) is kept, and so is a pack without index
//! whose damage hides where its later blobs are: what cannot be copied is
//! never deleted.
//!
//! Crash safety (`docs/repository.md` has the table): before a pack is
//! dropped, its good blobs are durable elsewhere and its damage record says
//! so (`dropping`; repair writes the record first if there was none). A
//! crash between the removals leaves either a pack without index, which
//! opening does not index while it is damaged and which the next repair
//! finds (by reading it) and drops on the strength of its record, even when
//! its damage hides where its later blobs are; or a record without pack,
//! which the next repair removes.
//!
//! Then repair says what is still lost: every blob a committed snapshot
//! references that the repository does not hold, and those snapshots. It
//! cannot say which files: that needs the key, which the coordinator has.

use std::collections::{BTreeSet, HashSet};
use std::fs;
use std::io;

use flotilla_protocol::repo::{BlobId, RepairReport};
use tracing::{info, warn};

use super::damage::{self, DamageFile, Recorded};
use super::format::{hex32, scan_pack, IndexEntry, IndexFile, PackId};
use super::{
    idx_path, index, pack_path, read_copy, remove_durably, snapshots, CopyFault, PackWriter,
    RepoError, Repository,
};

/// A damaged pack, or what is left of one.
#[derive(Debug)]
struct Damaged {
    pack: PackId,
    /// Its blobs, from its index or, without one, from reading it.
    entries: Vec<IndexEntry>,
    /// Whether `entries` names every blob the pack holds (false when a read
    /// without index stopped at a structural fault).
    complete: bool,
    /// Whether the pack file exists.
    file: bool,
    /// Whether an index file exists (readable or not).
    idx: bool,
    /// Why it is repaired, for the log and a record written before the drop.
    why: String,
    /// Its damage record, if any.
    recorded: Option<Recorded>,
    /// Cleared when it must be kept.
    droppable: bool,
}

impl Repository {
    /// Repairs the repository; see the module documentation. With
    /// `read_data`, every pack is read first (as `check(true)`, whose
    /// findings are recorded) so that damage not yet found is repaired too.
    ///
    /// Fails only when the repository cannot be listed or written (a full
    /// disk): nothing is dropped then whose blobs were not copied.
    pub fn repair(&self, read_data: bool) -> Result<RepairReport, RepoError> {
        let _maintenance = self.shared.maintenance();
        let mut report = RepairReport {
            read_data,
            ..Default::default()
        };
        if read_data {
            // Its findings that matter here are recorded; only what it could
            // not read is worth repeating.
            let check = self.check_locked(true);
            report.problems.extend(
                check
                    .problems
                    .into_iter()
                    .filter(|p| p.kind == "io")
                    .map(|p| p.message),
            );
        }
        let mut packs = self.find_damaged(&mut report)?;
        // A record alone (its pack and index gone) is a leftover, not damage.
        report.packs_damaged = packs.iter().filter(|d| d.file || d.idx).count() as u64;
        let (unsaved, written) = self.rescue(&mut packs, &mut report)?;
        self.drop_damaged(&packs, &written, &mut report)?;
        self.account(&packs, &unsaved, &mut report)?;
        if report.is_ok() {
            info!(
                damaged = report.packs_damaged,
                dropped = report.packs_dropped,
                moved = report.blobs_moved,
                healed = report.blobs_healed,
                "repair finished; nothing is lost"
            );
        } else {
            warn!(
                damaged = report.packs_damaged,
                dropped = report.packs_dropped,
                moved = report.blobs_moved,
                lost = report.lost_blobs.len(),
                affected = report.affected_snapshots.len(),
                problems = report.problems.len(),
                "repair finished; some snapshots still lack blobs"
            );
        }
        Ok(report)
    }

    /// Every pack that needs repair (see the module documentation).
    fn find_damaged(&self, report: &mut RepairReport) -> Result<Vec<Damaged>, RepoError> {
        let dir = &self.shared.dir;
        let records = damage::load_all(dir)?;
        let mut out = Vec::new();
        // Packs whose index reads, or whose unreadable index has no pack.
        let mut handled: HashSet<PackId> = HashSet::new();
        for (pack, path) in index::list_idx(dir)? {
            let file = pack_path(dir, &pack);
            let stat = match fs::metadata(&file) {
                Ok(m) => Some(m.len()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => None,
                Err(e) => {
                    report.problems.push(format!(
                        "pack {} kept: cannot look at it: {e}",
                        hex32(&pack)
                    ));
                    handled.insert(pack);
                    continue;
                }
            };
            let idx = match index::read_idx(&path, &pack) {
                Ok(idx) => idx,
                // With its pack there, the pack is handled below; without,
                // nothing is left to save and the index is only noise.
                Err(e) => {
                    if stat.is_none() {
                        handled.insert(pack);
                        out.push(Damaged {
                            pack,
                            entries: Vec::new(),
                            complete: true,
                            file: false,
                            idx: true,
                            why: format!("its index does not read and the pack is gone: {e}"),
                            recorded: records.get(&pack).cloned(),
                            droppable: true,
                        });
                    }
                    continue;
                }
            };
            handled.insert(pack);
            let recorded = records.get(&pack).cloned();
            let why = match (stat, &recorded) {
                (None, _) => "the pack is gone".to_owned(),
                (Some(len), _) if len != idx.size => {
                    format!("the pack is {len} bytes, its index says {}", idx.size)
                }
                (Some(_), Some(rec)) => describe(rec),
                (Some(_), None) => continue,
            };
            out.push(Damaged {
                pack,
                entries: idx.entries,
                complete: true,
                file: stat.is_some(),
                idx: true,
                why,
                recorded,
                droppable: true,
            });
        }
        for (pack, path) in index::list_packs(dir)? {
            if handled.contains(&pack) {
                continue;
            }
            handled.insert(pack);
            let size = match fs::metadata(&path) {
                Ok(m) => m.len(),
                Err(e) => {
                    report.problems.push(format!(
                        "pack {} kept: cannot look at it: {e}",
                        hex32(&pack)
                    ));
                    continue;
                }
            };
            let scan = match scan_pack(&path) {
                Ok(scan) => scan,
                Err(e) => {
                    report
                        .problems
                        .push(format!("pack {} kept: cannot read it: {e}", hex32(&pack)));
                    continue;
                }
            };
            if scan.is_intact(&pack) {
                // It hashes to its name: byte for byte what was written, so a
                // record of damage in it no longer holds.
                match index::rebuild_from(dir, &pack, size, &scan) {
                    Ok(idx) => {
                        self.reindex(&pack, &idx)?;
                        report.packs_reindexed += 1;
                    }
                    Err(e) => report.problems.push(format!(
                        "pack {} has no index and one cannot be written: {e}",
                        hex32(&pack)
                    )),
                }
                continue;
            }
            let why = scan
                .fault
                .clone()
                .unwrap_or_else(|| "it has no index and damaged blobs".to_owned());
            // An earlier repair saved its intact blobs and crashed while
            // deleting it: what the damage hides was saved then.
            let dropping = matches!(damage::read_record(dir, &pack), Ok(Some(r)) if r.dropping);
            out.push(Damaged {
                pack,
                complete: scan.pack_hash.is_some() || dropping,
                entries: scan.entries,
                file: true,
                idx: idx_path(dir, &pack).exists(),
                why,
                recorded: records.get(&pack).cloned(),
                droppable: true,
            });
        }
        // Records whose pack and index are both gone: what a crash between
        // the last two removals of a drop leaves.
        for (pack, recorded) in records {
            if handled.contains(&pack) || idx_path(dir, &pack).exists() {
                continue;
            }
            out.push(Damaged {
                pack,
                entries: Vec::new(),
                complete: true,
                file: false,
                idx: false,
                why: "a damage record of a pack that is gone".to_owned(),
                recorded: Some(recorded),
                droppable: true,
            });
        }
        Ok(out)
    }

    /// Indexes a pack found intact, clearing any record of damage in it.
    fn reindex(&self, pack: &PackId, idx: &IndexFile) -> Result<(), RepoError> {
        let _records = self.shared.records();
        damage::remove_record(&self.shared.dir, pack)?;
        let mut index = self.shared.write_index();
        index.damaged.remove(pack);
        index.insert_pack(*pack, idx.size, &idx.entries);
        info!(pack = %hex32(pack), blobs = idx.entries.len(), "repair indexed an intact pack that had no index");
        Ok(())
    }

    /// Copies every intact blob of the damaged packs that has no copy in a
    /// healthy pack into new packs. Returns the blobs whose copies could not
    /// be saved, and the ids of the packs written.
    fn rescue(
        &self,
        packs: &mut [Damaged],
        report: &mut RepairReport,
    ) -> Result<(HashSet<BlobId>, HashSet<PackId>), RepoError> {
        let dir = &self.shared.dir;
        let doomed: HashSet<PackId> = packs.iter().map(|d| d.pack).collect();
        let mut writer = PackWriter::rewriting(self.shared.clone());
        let mut copied: HashSet<BlobId> = HashSet::new();
        let mut unsaved: HashSet<BlobId> = HashSet::new();
        for d in packs.iter_mut() {
            if !d.complete {
                d.droppable = false;
                report.problems.push(format!(
                    "pack {} kept: it has no index and is damaged before its end, so its later blobs cannot be found ({})",
                    hex32(&d.pack),
                    d.why
                ));
            }
            let path = pack_path(dir, &d.pack);
            for e in &d.entries {
                if copied.contains(&e.id) {
                    continue;
                }
                let elsewhere = self
                    .shared
                    .read_index()
                    .pack_of(&e.id)
                    .is_some_and(|p| !doomed.contains(&p));
                if elsewhere {
                    continue;
                }
                if !d.file {
                    unsaved.insert(e.id);
                    continue;
                }
                match read_copy(&path, &e.id, e.kind, e.offset, e.length, Some(&e.hash)) {
                    Ok(sealed) => match writer.add(e.id, e.kind, &sealed) {
                        Ok(()) => {
                            copied.insert(e.id);
                            report.blobs_moved += 1;
                            report.bytes_moved += sealed.len() as u64;
                        }
                        // Not a blob any writer stores (an empty one): it
                        // cannot be kept, and it does not fail the writer.
                        Err(RepoError::Invalid { .. }) => {
                            unsaved.insert(e.id);
                        }
                        // The writer failed (a full disk): nothing is dropped.
                        Err(err) => return Err(err),
                    },
                    Err(CopyFault::Damaged(_) | CopyFault::Truncated(_)) => {
                        unsaved.insert(e.id);
                    }
                    Err(CopyFault::Gone(err) | CopyFault::Io(err)) => {
                        // It may well be intact: never delete what could not
                        // be read.
                        d.droppable = false;
                        report
                            .problems
                            .push(format!("pack {} kept: {err}", hex32(&d.pack)));
                        break;
                    }
                }
            }
        }
        let (stats, written) = writer.finish_packs()?;
        report.packs_written = stats.packs;
        Ok((unsaved, written.into_iter().collect()))
    }

    /// The damaged packs to drop: those whose blobs are saved, except any
    /// that the copy rewrote in place.
    fn doomed<'a>(packs: &'a [Damaged], written: &HashSet<PackId>) -> Vec<&'a Damaged> {
        let mut doomed = Vec::new();
        for d in packs.iter().filter(|d| d.droppable) {
            if written.contains(&d.pack) {
                // The copy wrote exactly this pack's blobs in its order, so the
                // new pack has its name: the rename replaced the damaged file
                // with intact bytes and cleared its record.
                info!(pack = %hex32(&d.pack), "damaged pack rewritten intact in place");
            } else {
                doomed.push(d);
            }
        }
        doomed
    }

    /// Marks each pack about to be dropped as `dropping` in its damage
    /// record (written now if there is none). The caller holds the records
    /// lock.
    fn mark_dropping(&self, doomed: &[&Damaged]) -> Result<(), RepoError> {
        let dir = &self.shared.dir;
        for d in doomed.iter().filter(|d| d.file) {
            let mut rec = match damage::read_record(dir, &d.pack) {
                Ok(Some(rec)) => rec,
                // None, or one that does not read: the pack goes either way.
                Ok(None) | Err(RepoError::Corrupt { .. }) => {
                    DamageFile::fault_only(&d.pack, &d.why)
                }
                Err(e) => return Err(e),
            };
            if !rec.dropping {
                rec.dropping = true;
                damage::write_record(dir, &d.pack, &rec)?;
            }
        }
        Ok(())
    }

    /// Drops the damaged packs whose blobs are saved: the record's intent
    /// first, then index, pack and record, each removal durable, under the
    /// index's write lock so that no lookup sees a pack half gone; then the
    /// index is loaded again from disk, which finds the moved blobs (and any
    /// other copy) in their new places.
    fn drop_damaged(
        &self,
        packs: &[Damaged],
        written: &HashSet<PackId>,
        report: &mut RepairReport,
    ) -> Result<(), RepoError> {
        let dir = &self.shared.dir;
        let doomed = Self::doomed(packs, written);
        if doomed.is_empty() {
            return Ok(());
        }
        let _records = self.shared.records();
        self.mark_dropping(&doomed)?;
        let mut index = self.shared.write_index();
        for d in doomed {
            let had_idx = remove_durably(&idx_path(dir, &d.pack))?;
            let had_pack = remove_durably(&pack_path(dir, &d.pack))?;
            damage::remove_record(dir, &d.pack)?;
            if had_idx || had_pack {
                report.packs_dropped += 1;
                info!(pack = %hex32(&d.pack), why = %d.why, "dropped a damaged pack");
            }
        }
        self.shared.reload(&mut index)
    }

    /// Counts the damaged copies healed and discarded, and lists what
    /// committed snapshots still lack.
    fn account(
        &self,
        packs: &[Damaged],
        unsaved: &HashSet<BlobId>,
        report: &mut RepairReport,
    ) -> Result<(), RepoError> {
        let mut damaged: HashSet<BlobId> = unsaved.clone();
        for d in packs {
            match &d.recorded {
                Some(Recorded::Blobs { ids, .. }) => damaged.extend(ids),
                Some(Recorded::Whole { .. }) => damaged.extend(d.entries.iter().map(|e| e.id)),
                None => {}
            }
        }
        let mut lost = BTreeSet::new();
        let mut affected = BTreeSet::new();
        for rec in snapshots::read_all(&self.shared.dir)? {
            let rec = match rec {
                Ok(rec) => rec,
                Err(e) => {
                    report.problems.push(format!(
                        "a snapshot does not read, so what it lacks is not known: {e}"
                    ));
                    continue;
                }
            };
            let ids: Vec<BlobId> = std::iter::once(rec.tree)
                .chain(rec.blobs.iter().copied())
                .collect();
            let missing = self.missing(&ids);
            if !missing.is_empty() {
                match rec.snapshot_id() {
                    Ok(id) => {
                        affected.insert(id);
                    }
                    // Not a name the repository would give a snapshot file;
                    // its blobs are counted lost all the same.
                    Err(e) => report
                        .problems
                        .push(format!("a snapshot lacking blobs has an unusable id: {e}")),
                }
                lost.extend(missing);
            }
        }
        for id in &damaged {
            if self.contains(id) {
                report.blobs_healed += 1;
            } else if !lost.contains(id) {
                report.blobs_discarded += 1;
            }
        }
        report.blobs_lost = lost.len() as u64;
        report.lost_blobs = lost.into_iter().collect();
        report.snapshots_affected = affected.len() as u64;
        report.affected_snapshots = affected.into_iter().collect();
        Ok(())
    }
}

/// Why a pack with this record is repaired.
fn describe(rec: &Recorded) -> String {
    match rec {
        Recorded::Blobs { ids, fault } => match (ids.len(), fault) {
            (0, Some(f)) => format!("recorded as damaged: {f}"),
            (n, None) => format!("{n} blob(s) recorded as damaged"),
            (n, Some(f)) => format!("{n} blob(s) recorded as damaged, and {f}"),
        },
        Recorded::Whole { why } => why.clone(),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use flotilla_protocol::repo::BlobKind;

    use super::super::format::{ENTRY_HEADER_LEN, HEADER_LEN};
    use super::super::snapshots::tests::record;
    use super::super::tests::blob;
    use super::*;

    const LEN: usize = 2000;

    /// Pack A holds blobs 1, 2, 3 and pack B blob 4. Snapshot "a…" needs
    /// 1 and 2, "b…" needs 3 and 4.
    fn setup(dir: &Path) -> (Repository, [BlobId; 4], [PackId; 2]) {
        let repo = Repository::open_or_init(dir).expect("open");
        let mut ids = Vec::new();
        let mut packs = Vec::new();
        for group in [&[1u32, 2, 3][..], &[4]] {
            let mut w = repo.pack_writer();
            for n in group {
                let (id, data) = blob(*n, LEN);
                w.add(id, BlobKind::Data, &data).expect("add");
                ids.push(id);
            }
            let (_, written) = w.finish_packs().expect("finish");
            packs.push(written[0]);
        }
        repo.commit_snapshot(&record(&"a".repeat(32), 1, ids[0], vec![ids[0], ids[1]]))
            .expect("commit");
        repo.commit_snapshot(&record(&"b".repeat(32), 2, ids[3], vec![ids[2], ids[3]]))
            .expect("commit");
        (repo, [ids[0], ids[1], ids[2], ids[3]], [packs[0], packs[1]])
    }

    /// Flips one byte inside the sealed bytes of the `nth` blob of `pack`
    /// (all blobs here are `LEN` bytes).
    fn rot(dir: &Path, pack: &PackId, nth: u64) {
        let path = pack_path(dir, pack);
        let mut bytes = fs::read(&path).expect("read");
        let at = HEADER_LEN + nth * (ENTRY_HEADER_LEN + LEN as u64) + ENTRY_HEADER_LEN + 10;
        bytes[at as usize] ^= 0x40;
        fs::write(&path, &bytes).expect("write");
    }

    fn upload(repo: &Repository, n: u32) -> u64 {
        let (id, data) = blob(n, LEN);
        let mut w = repo.pack_writer();
        w.add(id, BlobKind::Data, &data).expect("add");
        w.finish().expect("finish").blobs
    }

    fn all_read_back(repo: &Repository, ns: &[u32]) {
        for n in ns {
            let (id, data) = blob(*n, LEN);
            assert_eq!(repo.read_blob(&id).expect("reads").1, data, "blob {n}");
        }
    }

    #[test]
    fn bit_rot_leaves_the_index_stays_out_after_reopen_heals_on_upload_and_repair_drops_the_pack() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (repo, ids, packs) = setup(dir.path());
        rot(dir.path(), &packs[0], 0);

        let r = repo.check(true);
        assert_eq!(r.damaged_blobs, vec![ids[0]], "{r:?}");
        assert_eq!(r.affected_snapshots, vec!["a".repeat(32)]);
        assert!(r
            .problems
            .iter()
            .any(|p| p.kind == "blob_damaged" && p.blob == Some(ids[0])));
        // A backup's `have` is told it is missing, at once.
        assert_eq!(repo.missing(&ids), vec![ids[0]]);
        assert_eq!(repo.damaged_blobs(), vec![ids[0]]);
        assert!(damage::record_path(dir.path(), &packs[0]).exists());

        // A restart loads every index again; the damaged copy stays out.
        drop(repo);
        let repo = Repository::open_or_init(dir.path()).expect("reopen");
        assert_eq!(repo.missing(&ids), vec![ids[0]]);
        assert_eq!(repo.damaged_blobs(), vec![ids[0]]);
        let r = repo.check(false);
        assert_eq!(
            r.damaged_blobs,
            vec![ids[0]],
            "recorded damage is reported: {r:?}"
        );
        assert_eq!(r.affected_snapshots, vec!["a".repeat(32)]);

        // The next backup uploads it again (no dedup) and it reads back.
        assert_eq!(upload(&repo, 1), 1, "uploaded, not deduplicated");
        assert!(repo.missing(&ids).is_empty());
        assert!(repo.damaged_blobs().is_empty(), "no longer lost");
        all_read_back(&repo, &[1, 2, 3, 4]);
        let r = repo.check(true);
        assert!(r.damaged_blobs.is_empty(), "{r:?}");
        assert!(r.affected_snapshots.is_empty(), "healed: {r:?}");
        drop(repo);
        let repo = Repository::open_or_init(dir.path()).expect("reopen");
        all_read_back(&repo, &[1, 2, 3, 4]);

        let rep = repo.repair(false).expect("repair");
        assert!(rep.is_ok(), "{rep:?}");
        assert_eq!(
            (
                rep.packs_damaged,
                rep.packs_dropped,
                rep.blobs_moved,
                rep.blobs_healed
            ),
            (1, 1, 2, 1),
            "{rep:?}"
        );
        assert_eq!(rep.packs_written, 1);
        assert!(!pack_path(dir.path(), &packs[0]).exists());
        assert!(!idx_path(dir.path(), &packs[0]).exists());
        assert!(!damage::record_path(dir.path(), &packs[0]).exists());
        let r = repo.check(true);
        assert!(r.is_ok(), "{r:?}");
        all_read_back(&repo, &[1, 2, 3, 4]);
        drop(repo);
        let repo = Repository::open_or_init(dir.path()).expect("reopen");
        assert!(repo.check(true).is_ok());
        all_read_back(&repo, &[1, 2, 3, 4]);
        assert_eq!(repo.repair(false).expect("repair"), RepairReport::default());
    }

    #[test]
    fn repair_reports_a_blob_without_a_good_copy_and_the_snapshot_that_needs_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (repo, ids, packs) = setup(dir.path());
        rot(dir.path(), &packs[0], 0);
        // No check ran: `read_data` finds the damage itself.
        let rep = repo.repair(true).expect("repair");
        assert_eq!(rep.lost_blobs, vec![ids[0]], "{rep:?}");
        assert_eq!(rep.affected_snapshots, vec!["a".repeat(32)]);
        assert_eq!((rep.blobs_lost, rep.snapshots_affected), (1, 1), "{rep:?}");
        assert_eq!((rep.packs_dropped, rep.blobs_moved), (1, 2), "{rep:?}");
        assert!(rep.problems.is_empty(), "{rep:?}");
        assert!(!rep.is_ok());
        all_read_back(&repo, &[2, 3, 4]);

        // Check reports exactly what is still missing, and nothing else.
        let r = repo.check(true);
        assert_eq!(r.damaged_blobs, vec![ids[0]], "{r:?}");
        assert_eq!(r.affected_snapshots, vec!["a".repeat(32)]);
        assert!(r.problems.iter().all(|p| p.kind == "blob_missing"), "{r:?}");

        // A backup of a host that still has the data heals it.
        assert_eq!(upload(&repo, 1), 1);
        assert!(repo.check(true).is_ok());
        assert!(repo.repair(false).expect("repair").is_ok());
    }

    #[test]
    fn a_restore_read_that_finds_damage_takes_the_copy_out_for_good() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (repo, ids, packs) = setup(dir.path());
        rot(dir.path(), &packs[1], 0);
        assert_eq!(
            repo.read_blob(&ids[3]).expect_err("damaged").code(),
            "corrupt"
        );
        assert_eq!(repo.missing(&ids), vec![ids[3]]);
        assert_eq!(
            repo.read_blob(&ids[3]).expect_err("gone").code(),
            "not_found",
            "no longer offered"
        );
        drop(repo);
        let repo = Repository::open_or_init(dir.path()).expect("reopen");
        assert_eq!(repo.missing(&ids), vec![ids[3]]);
        let r = repo.check(false);
        assert_eq!(r.damaged_blobs, vec![ids[3]], "{r:?}");
        assert_eq!(r.affected_snapshots, vec!["b".repeat(32)]);
    }

    #[test]
    fn a_backup_that_writes_a_damaged_pack_again_whole_clears_its_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (repo, ids, packs) = setup(dir.path());
        rot(dir.path(), &packs[1], 0);
        assert!(!repo.check(true).is_ok());
        assert_eq!(repo.missing(&ids), vec![ids[3]]);
        // The same single blob again makes byte for byte the same pack, whose
        // name is that of the damaged one: the rename replaces it.
        assert_eq!(upload(&repo, 4), 1);
        assert!(!damage::record_path(dir.path(), &packs[1]).exists());
        assert!(repo.missing(&ids).is_empty());
        assert!(repo.check(true).is_ok());
        drop(repo);
        let repo = Repository::open_or_init(dir.path()).expect("reopen");
        assert!(
            repo.missing(&ids).is_empty(),
            "not kept out by a stale record"
        );
        all_read_back(&repo, &[1, 2, 3, 4]);
    }

    #[test]
    fn a_pack_with_a_damaged_trailer_and_intact_blobs_is_rewritten_in_place() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (repo, ids, packs) = setup(dir.path());
        let path = pack_path(dir.path(), &packs[0]);
        let mut bytes = fs::read(&path).expect("read");
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        fs::write(&path, &bytes).expect("write");
        let r = repo.check(true);
        assert!(r.problems.iter().any(|p| p.kind == "pack_damaged"), "{r:?}");
        assert!(r.damaged_blobs.is_empty(), "every blob is intact: {r:?}");
        assert!(repo.missing(&ids).is_empty(), "intact blobs stay offered");
        assert!(
            repo.check(false)
                .problems
                .iter()
                .any(|p| p.kind == "pack_damaged"),
            "recorded for repair"
        );

        let rep = repo.repair(false).expect("repair");
        assert!(rep.is_ok(), "{rep:?}");
        assert_eq!(
            (rep.packs_damaged, rep.blobs_moved, rep.packs_written),
            (1, 3, 1)
        );
        assert_eq!(rep.packs_dropped, 0, "the new pack has the old one's name");
        assert!(path.exists());
        assert!(!damage::record_path(dir.path(), &packs[0]).exists());
        assert!(repo.check(true).is_ok());
        all_read_back(&repo, &[1, 2, 3, 4]);
    }

    #[test]
    fn repair_saves_what_a_truncated_pack_still_holds_and_drops_an_orphan_index() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (repo, ids, packs) = setup(dir.path());
        // Cut into B's trailer: its one blob is still whole.
        let b = pack_path(dir.path(), &packs[1]);
        let bytes = fs::read(&b).expect("read");
        fs::write(&b, &bytes[..bytes.len() - 7]).expect("write");
        // A is gone altogether.
        fs::remove_file(pack_path(dir.path(), &packs[0])).expect("remove");

        let rep = repo.repair(false).expect("repair");
        assert_eq!(rep.packs_damaged, 2, "{rep:?}");
        assert_eq!(rep.blobs_moved, 1, "blob 4 saved from the cut pack");
        // Blob 4 alone makes B's original bytes again, under B's name: the
        // cut file is replaced, and only A's orphan index is dropped.
        assert_eq!(rep.packs_dropped, 1, "{rep:?}");
        assert_eq!(fs::read(&b).expect("read"), bytes);
        assert_eq!(rep.lost_blobs, vec![ids[0], ids[1], ids[2]]);
        assert_eq!(rep.affected_snapshots, vec!["a".repeat(32), "b".repeat(32)]);
        assert!(!idx_path(dir.path(), &packs[0]).exists());
        all_read_back(&repo, &[4]);
        let r = repo.check(true);
        assert!(r.problems.iter().all(|p| p.kind == "blob_missing"), "{r:?}");
        assert_eq!(r.damaged_blobs, vec![ids[0], ids[1], ids[2]]);
    }

    /// Reopens, checks that the repository reports exactly the damage it
    /// still holds (blob `lost` + 1, needed by `snapshot`, nothing else), and
    /// lets the next repair and backup finish the job.
    fn after_a_crash(dir: &Path, ids: &[BlobId; 4], lost: usize, snapshot: &str) {
        let repo = Repository::open_or_init(dir).expect("opens after the crash");
        let others: Vec<u32> = (1..=4).filter(|n| *n as usize != lost + 1).collect();
        all_read_back(&repo, &others);
        assert_eq!(repo.missing(ids), vec![ids[lost]]);
        let r = repo.check(true);
        assert_eq!(r.damaged_blobs, vec![ids[lost]], "{r:?}");
        assert_eq!(r.affected_snapshots, vec![snapshot.to_owned()], "{r:?}");
        let rep = repo.repair(false).expect("repair");
        assert_eq!(rep.lost_blobs, vec![ids[lost]], "{rep:?}");
        assert!(rep.problems.is_empty(), "{rep:?}");
        assert_eq!(
            fs::read_dir(dir.join("damaged")).expect("list").count(),
            0,
            "no record left"
        );
        assert_eq!(upload(&repo, lost as u32 + 1), 1);
        let r = repo.check(true);
        assert!(r.is_ok(), "{r:?}");
        all_read_back(&repo, &[1, 2, 3, 4]);
    }

    #[test]
    fn a_crash_at_any_step_of_repair_leaves_a_repository_that_opens_and_checks() {
        // Two kinds of damage to pack A (blobs 1, 2, 3): a flipped byte in
        // blob 1 (found by check, recorded), and a cut through blob 3 (a
        // wrong size, no record).
        let a = "a".repeat(32);
        let b = "b".repeat(32);
        let kinds: [(usize, &str); 2] = [(0, &a), (2, &b)];
        for (lost, snapshot) in kinds {
            // 0: after the good blobs are copied, before anything is removed;
            // 1: after the intent is recorded and the index removed; 2: after
            // the pack is removed too.
            for step in 0..3 {
                let dir = tempfile::tempdir().expect("tempdir");
                let (repo, ids, packs) = setup(dir.path());
                if lost == 0 {
                    rot(dir.path(), &packs[0], 0);
                } else {
                    let path = pack_path(dir.path(), &packs[0]);
                    let bytes = fs::read(&path).expect("read");
                    let cut = HEADER_LEN + 2 * (ENTRY_HEADER_LEN + LEN as u64) + 1000;
                    fs::write(&path, &bytes[..cut as usize]).expect("write");
                }
                assert!(!repo.check(true).is_ok());
                let mut report = RepairReport::default();
                let mut found = repo.find_damaged(&mut report).expect("find");
                assert_eq!(found.len(), 1);
                let (_, written) = repo.rescue(&mut found, &mut report).expect("rescue");
                assert_eq!(report.blobs_moved, 2);
                if step >= 1 {
                    let doomed = Repository::doomed(&found, &written);
                    repo.mark_dropping(&doomed).expect("intent");
                    fs::remove_file(idx_path(dir.path(), &packs[0])).expect("remove");
                }
                if step >= 2 {
                    fs::remove_file(pack_path(dir.path(), &packs[0])).expect("remove");
                }
                drop(repo);
                after_a_crash(dir.path(), &ids, lost, snapshot);
            }
        }
    }

    #[test]
    fn a_damaged_pack_without_index_and_without_record_is_repaired() {
        // A crash between a pack's rename and its index, then bit rot.
        let dir = tempfile::tempdir().expect("tempdir");
        let (repo, ids, packs) = setup(dir.path());
        drop(repo);
        fs::remove_file(idx_path(dir.path(), &packs[0])).expect("remove");
        rot(dir.path(), &packs[0], 0);
        let repo = Repository::open_or_init(dir.path()).expect("open");
        assert_eq!(repo.missing(&ids), vec![ids[0], ids[1], ids[2]]);
        let rep = repo.repair(false).expect("repair");
        assert_eq!((rep.packs_dropped, rep.blobs_moved), (1, 2), "{rep:?}");
        assert_eq!(rep.lost_blobs, vec![ids[0]]);
        assert_eq!(repo.missing(&ids), vec![ids[0]]);
        assert_eq!(upload(&repo, 1), 1);
        assert!(repo.check(true).is_ok());
    }

    #[test]
    fn prune_drops_a_damaged_unreferenced_pack_with_its_record_and_keeps_a_referenced_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (repo, ids, packs) = setup(dir.path());
        // Pack C: blob 5, which no snapshot references.
        let mut w = repo.pack_writer();
        let (five, data) = blob(5, LEN);
        w.add(five, BlobKind::Data, &data).expect("add");
        let (_, c) = w.finish_packs().expect("finish");
        rot(dir.path(), &c[0], 0);
        rot(dir.path(), &packs[0], 0);
        assert!(!repo.check(true).is_ok());
        assert!(damage::record_path(dir.path(), &c[0]).exists());

        let rep = repo
            .prune(Duration::ZERO, false, &|_| false)
            .expect("prune");
        assert_eq!(rep.packs_deleted, 1, "{rep:?}");
        assert!(!pack_path(dir.path(), &c[0]).exists());
        assert!(!damage::record_path(dir.path(), &c[0]).exists());
        assert!(
            pack_path(dir.path(), &packs[0]).exists(),
            "referenced: kept"
        );
        assert_eq!(
            repo.missing(&ids),
            vec![ids[0]],
            "its damage is still honoured"
        );

        let rep = repo.repair(false).expect("repair");
        assert_eq!(rep.lost_blobs, vec![ids[0]]);
        assert_eq!(upload(&repo, 1), 1);
        let rep = repo
            .prune(Duration::ZERO, false, &|_| false)
            .expect("prune");
        assert_eq!(rep.packs_deleted, 0, "{rep:?}");
        assert!(repo.check(true).is_ok());
        all_read_back(&repo, &[1, 2, 3, 4]);
    }
}
