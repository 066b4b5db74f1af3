//! Forgetting snapshots and reclaiming the space nothing references.
//!
//! `forget` removes snapshot records only; data stays until `prune`. Prune
//! never takes a lock that stops backups. It deletes whole packs in which no
//! blob is referenced by any committed snapshot, is older than the grace
//! period, and is not protected — the caller passes what live sessions rely
//! on (blobs a running backup was told are present, or is uploading, or a
//! running restore reads). That check happens under the index's write lock,
//! and sessions record their reliance *before* they read the index, so a
//! backup can never be told "present" about a blob prune is deleting.
//!
//! Crash safety: a pack's index file is deleted before the pack. A crash in
//! between leaves a pack without index, which the next open re-indexes: the
//! blobs come back, nothing is lost, the next prune deletes them again.
//! A pack's damage record (`DIR/damaged/`) goes last, after the pack: a
//! record without its pack is harmless, and `repair` removes it.
//! Packs with some live blobs are not rewritten yet (see `docs/repository.md`).

use std::collections::HashSet;
use std::fs;
use std::time::{Duration, SystemTime};

use flotilla_protocol::repo::{BlobId, PruneReport};
use tracing::info;

use super::format::PackId;
use super::{damage, idx_path, index, pack_path, snapshots, sync_dir, RepoError, Repository};

impl Repository {
    /// Removes a snapshot's record; returns whether it existed.
    pub fn forget_snapshot(&self, id: &str) -> Result<bool, RepoError> {
        if !snapshots::is_id(id) {
            return Err(RepoError::invalid(
                format!("snapshot id {:?}", id.chars().take(80).collect::<String>()),
                "must be 32 lowercase hex digits",
            ));
        }
        let path = self.dir().join("snapshots").join(format!("{id}.snap"));
        match fs::remove_file(&path) {
            Ok(()) => {
                sync_dir(&self.dir().join("snapshots"))?;
                self.shared
                    .snapshots
                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                info!(snapshot = id, "snapshot forgotten");
                Ok(true)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(RepoError::io("remove", &path, e)),
        }
    }

    /// Deletes packs that hold only unreferenced blobs, older than `grace`,
    /// none of whose blobs `protected` names.
    pub fn prune(
        &self,
        grace: Duration,
        dry_run: bool,
        protected: &dyn Fn(&BlobId) -> bool,
    ) -> Result<PruneReport, RepoError> {
        let _maintenance = self.shared.maintenance();
        let dir = self.dir().to_path_buf();
        // Everything committed snapshots reference. An unreadable snapshot
        // stops the prune: what it references cannot be known.
        let mut referenced: HashSet<BlobId> = HashSet::new();
        let mut report = PruneReport {
            dry_run,
            ..Default::default()
        };
        for rec in snapshots::read_all(&dir)? {
            let rec = rec?;
            report.snapshots += 1;
            referenced.insert(rec.tree);
            referenced.extend(rec.blobs);
        }
        let now = SystemTime::now();
        let mut candidates: Vec<(PackId, u64, Vec<BlobId>)> = Vec::new();
        for (pack, path) in index::list_idx(&dir)? {
            let idx = index::read_idx(&path, &pack)?;
            report.packs += 1;
            let ids: Vec<BlobId> = idx.entries.iter().map(|e| e.id).collect();
            if ids.iter().any(|id| referenced.contains(id)) {
                report.bytes_kept += idx.size;
                continue;
            }
            let age = fs::metadata(pack_path(&dir, &pack))
                .and_then(|m| m.modified())
                .ok()
                .and_then(|m| now.duration_since(m).ok())
                .unwrap_or_default();
            if age < grace {
                report.packs_in_grace += 1;
                report.bytes_in_grace += idx.size;
                continue;
            }
            candidates.push((pack, idx.size, ids));
        }
        if dry_run {
            for (_, size, ids) in &candidates {
                report.packs_deleted += 1;
                report.blobs_removed += ids.len() as u64;
                report.bytes_freed += size;
            }
            return Ok(report);
        }
        // The records lock comes before the index lock, as everywhere.
        let _records = self.shared.records();
        let mut index = self.shared.write_index();
        // Commits hold the index read lock until their snapshot file is in
        // place, so under the write lock the snapshot list is final: read it
        // again and spare anything a snapshot committed meanwhile needs.
        for rec in snapshots::read_all(&dir)? {
            let rec = rec?;
            referenced.insert(rec.tree);
            referenced.extend(rec.blobs);
        }
        for (pack, size, ids) in candidates {
            if ids.iter().any(|id| referenced.contains(id)) {
                report.bytes_kept += size;
                continue;
            }
            if ids.iter().any(protected) {
                report.packs_protected += 1;
                report.bytes_kept += size;
                continue;
            }
            // Index first, then the pack: see the module comment.
            let idx = idx_path(&dir, &pack);
            fs::remove_file(&idx).map_err(|e| RepoError::io("remove", &idx, e))?;
            sync_dir(idx.parent().unwrap_or(&dir))?;
            let packfile = pack_path(&dir, &pack);
            fs::remove_file(&packfile).map_err(|e| RepoError::io("remove", &packfile, e))?;
            sync_dir(packfile.parent().unwrap_or(&dir))?;
            damage::remove_record(&dir, &pack)?;
            report.packs_deleted += 1;
            report.blobs_removed += ids.len() as u64;
            report.bytes_freed += size;
        }
        if report.packs_deleted > 0 {
            // Rebuilt from disk, still under the write lock: a blob that also
            // lives in a surviving pack gets that location back.
            self.shared.reload(&mut index)?;
        }
        info!(
            deleted = report.packs_deleted,
            freed = report.bytes_freed,
            in_grace = report.packs_in_grace,
            protected = report.packs_protected,
            "prune finished"
        );
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use flotilla_protocol::repo::BlobKind;

    use super::*;
    use crate::repository::snapshots::tests::record;

    fn id(b: u8) -> BlobId {
        let mut a = [0u8; 32];
        a[0] = b;
        BlobId(a)
    }

    #[test]
    fn prune_frees_only_unreferenced_unprotected_packs_past_grace() {
        let dir = tempfile::tempdir().expect("tempdir");
        let repo = Repository::open_or_init(dir.path()).expect("open");
        for (blob, byte) in [(id(1), 1u8), (id(2), 2), (id(3), 3)] {
            let mut w = repo.pack_writer();
            w.add(blob, BlobKind::Data, &vec![byte; 1000]).expect("add");
            w.finish().expect("finish");
        }
        let keep = "a".repeat(32);
        let drop = "b".repeat(32);
        repo.commit_snapshot(&record(&keep, 1, id(1), vec![]))
            .expect("commit");
        repo.commit_snapshot(&record(&drop, 2, id(2), vec![]))
            .expect("commit");
        assert!(repo.forget_snapshot(&drop).expect("forget"));
        assert!(!repo.forget_snapshot(&drop).expect("forget"));

        let grace = repo
            .prune(Duration::from_secs(3600), false, &|_| false)
            .expect("prune");
        assert_eq!((grace.packs_deleted, grace.packs_in_grace), (0, 2));

        let dry = repo.prune(Duration::ZERO, true, &|_| false).expect("prune");
        assert_eq!(dry.packs_deleted, 2);
        assert!(repo.contains(&id(2)), "a dry run deletes nothing");

        let guarded = repo
            .prune(Duration::ZERO, false, &|b| *b == id(3))
            .expect("prune");
        assert_eq!((guarded.packs_deleted, guarded.packs_protected), (1, 1));
        assert!(!repo.contains(&id(2)) && repo.contains(&id(3)) && repo.contains(&id(1)));
        assert!(repo.check(true).is_ok(), "{:?}", repo.check(true));
        assert_eq!(repo.read_blob(&id(1)).expect("kept").1, vec![1u8; 1000]);
    }
}
