//! Snapshots: one file each, `DIR/snapshots/<id>.snap`, holding a
//! [`SnapshotRecord`] as MessagePack.
//!
//! A snapshot is the last thing a backup writes and the only thing that makes
//! its blobs reachable, so committing checks that every blob it names is
//! durably stored (indexed, and its pack on disk with the size its index
//! states), and never replaces an existing snapshot: a source can add
//! history, not rewrite it.

use std::fs::{self, File};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use flotilla_protocol::frame::MAX_FRAME;
use flotilla_protocol::repo::{SnapshotRecord, REPO_FORMAT};
use tracing::{info, warn};

use super::{parent, sync_dir, write_tmp, RepoError, Repository};

/// Largest snapshot file read: a snapshot arrives in one frame.
const MAX_SNAPSHOT_BYTES: usize = MAX_FRAME;

/// Whether `s` is a snapshot (or repository) id: 32 lowercase hex digits.
/// Ids become file names, so this is the whole defence against path tricks.
pub(super) fn is_id(s: &str) -> bool {
    s.len() == 32
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// `DIR/snapshots/<id>.snap`; `id` must have passed [`is_id`].
fn snap_path(dir: &Path, id: &str) -> PathBuf {
    dir.join("snapshots").join(format!("{id}.snap"))
}

/// The ids of every snapshot file, in no particular order.
pub(super) fn list_ids(dir: &Path) -> Result<Vec<String>, RepoError> {
    let snaps = dir.join("snapshots");
    let mut out = Vec::new();
    for entry in fs::read_dir(&snaps).map_err(|e| RepoError::io("list", &snaps, e))? {
        let entry = entry.map_err(|e| RepoError::io("list", &snaps, e))?;
        let name = entry.file_name();
        match name
            .to_str()
            .and_then(|n| n.strip_suffix(".snap"))
            .filter(|id| is_id(id))
        {
            Some(id) => out.push(id.to_string()),
            None => {
                warn!(path = %entry.path().display(), "ignoring unexpected file among snapshots")
            }
        }
    }
    Ok(out)
}

/// How many snapshots there are, for the counters kept in memory.
pub(super) fn count(dir: &Path) -> Result<u64, RepoError> {
    Ok(list_ids(dir)?.len() as u64)
}

/// Reads one snapshot file, size-checked before decoding.
pub(super) fn read(dir: &Path, id: &str) -> Result<SnapshotRecord, RepoError> {
    let path = snap_path(dir, id);
    let file = File::open(&path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => RepoError::NotFound {
            what: format!("snapshot {id}"),
        },
        _ => RepoError::io("open", &path, e),
    })?;
    let mut bytes = Vec::new();
    file.take(MAX_SNAPSHOT_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| RepoError::io("read", &path, e))?;
    let rec: SnapshotRecord = flotilla_protocol::decode(&bytes, MAX_SNAPSHOT_BYTES)
        .map_err(|e| RepoError::corrupt(&path, e.to_string()))?;
    if rec.id != id {
        return Err(RepoError::corrupt(
            &path,
            format!("file holds snapshot {:?}", rec.id),
        ));
    }
    if rec.v == 0 || rec.v > REPO_FORMAT {
        return Err(RepoError::corrupt(
            &path,
            format!(
                "snapshot format {} (this build reads up to {REPO_FORMAT}; upgrade)",
                rec.v
            ),
        ));
    }
    Ok(rec)
}

/// Every readable snapshot. Unreadable ones are reported by the caller.
pub(super) fn read_all(dir: &Path) -> Result<Vec<Result<SnapshotRecord, RepoError>>, RepoError> {
    Ok(list_ids(dir)?
        .into_iter()
        .map(|id| read(dir, &id))
        .collect())
}

impl Repository {
    /// Records a snapshot. Refuses a malformed id, an id that exists, and a
    /// snapshot naming any blob (its tree included) that is not stored.
    pub fn commit_snapshot(&self, rec: &SnapshotRecord) -> Result<(), RepoError> {
        if !is_id(&rec.id) {
            return Err(RepoError::invalid(
                format!(
                    "snapshot id {:?}",
                    rec.id.chars().take(80).collect::<String>()
                ),
                "must be 32 lowercase hex digits",
            ));
        }
        if rec.v == 0 || rec.v > REPO_FORMAT {
            return Err(RepoError::invalid(
                format!("snapshot {}", rec.id),
                format!(
                    "format version {} (this storage agent reads up to {REPO_FORMAT}; upgrade it)",
                    rec.v
                ),
            ));
        }
        let dir = &self.shared.dir;
        let needed = || std::iter::once(&rec.tree).chain(&rec.blobs);
        // The read lock is held until the snapshot file is in place: prune
        // takes the write lock, so it either sees this snapshot or deletes
        // before this check (which then fails and the source retries).
        let index = loop {
            let index = self.shared.read_index();
            let missing = {
                let mut missing = needed().filter(|id| !index.blobs.contains_key(*id));
                let first = missing.next().copied();
                first.map(|first| (first, 1 + missing.count()))
            };
            if let Some((first, count)) = missing {
                return Err(RepoError::MissingBlobs { count, first });
            }
            // The in-memory index is what this process wrote; a pack deleted
            // or cut short behind its back would leave a snapshot that cannot
            // be restored. Packs whose file is not as indexed are forgotten,
            // and the check above runs again: it then reports their blobs
            // missing, and the source uploads them again.
            let gone = index.packs_not_on_disk(dir, needed())?;
            if gone.is_empty() {
                break index;
            }
            drop(index);
            self.shared.write_index().remove_packs(&gone);
        };
        let path = snap_path(dir, &rec.id);
        if path.exists() {
            return Err(RepoError::Exists { id: rec.id.clone() });
        }
        let bytes = flotilla_protocol::encode(rec)
            .map_err(|e| RepoError::invalid(format!("snapshot {}", rec.id), e.to_string()))?;
        if bytes.len() > MAX_SNAPSHOT_BYTES {
            return Err(RepoError::invalid(
                format!("snapshot {}", rec.id),
                format!("{} bytes exceeds {MAX_SNAPSHOT_BYTES}", bytes.len()),
            ));
        }
        let tmp = write_tmp(dir, &path, &bytes)?;
        // link(2) refuses an existing target atomically, so two commits of
        // the same id racing cannot overwrite each other. Filesystems without
        // hard links fall back to rename after the existence check above.
        let placed = match fs::hard_link(&tmp, &path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                Err(RepoError::Exists { id: rec.id.clone() })
            }
            Err(_) => fs::rename(&tmp, &path).map_err(|e| RepoError::io("rename into", &path, e)),
        };
        let _ = fs::remove_file(&tmp);
        placed?;
        sync_dir(parent(&path))?;
        drop(index);
        self.shared.snapshots.fetch_add(1, Ordering::Relaxed);
        info!(snapshot = %rec.id, host = %rec.host, blobs = rec.blobs.len(), "snapshot committed");
        Ok(())
    }

    /// The id of every snapshot file, sorted. Files whose name is not a
    /// snapshot id are ignored with a warning.
    pub fn snapshot_ids(&self) -> Result<Vec<String>, RepoError> {
        let mut ids = list_ids(&self.shared.dir)?;
        ids.sort();
        Ok(ids)
    }

    /// Every snapshot, oldest first. Unreadable files are skipped with a
    /// warning (`check` reports them).
    pub fn snapshots(&self) -> Result<Vec<SnapshotRecord>, RepoError> {
        let mut out = Vec::new();
        for rec in read_all(&self.shared.dir)? {
            match rec {
                Ok(rec) => out.push(rec),
                Err(e) => warn!(error = %e, "skipping unreadable snapshot"),
            }
        }
        out.sort_by(|a, b| (a.time, &a.id).cmp(&(b.time, &b.id)));
        Ok(out)
    }

    /// The snapshot with this id or unique id prefix.
    pub fn snapshot(&self, id_or_prefix: &str) -> Result<SnapshotRecord, RepoError> {
        let p = id_or_prefix;
        if p.is_empty()
            || p.len() > 32
            || !p
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(RepoError::invalid(
                format!("snapshot id {:?}", p.chars().take(80).collect::<String>()),
                "must be 1 to 32 lowercase hex digits",
            ));
        }
        if is_id(p) {
            return read(&self.shared.dir, p);
        }
        let mut matches: Vec<String> = list_ids(&self.shared.dir)?
            .into_iter()
            .filter(|id| id.starts_with(p))
            .collect();
        matches.sort();
        match matches.as_slice() {
            [] => Err(RepoError::NotFound {
                what: format!("snapshot {p}"),
            }),
            [one] => read(&self.shared.dir, one),
            many => Err(RepoError::invalid(
                format!("snapshot prefix {p}"),
                format!(
                    "ambiguous, matches {} snapshots ({}{}); give more digits",
                    many.len(),
                    many.iter()
                        .take(5)
                        .map(String::as_str)
                        .collect::<Vec<_>>()
                        .join(", "),
                    if many.len() > 5 { ", …" } else { "" }
                ),
            )),
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::super::tests::blob;
    use super::*;
    use flotilla_protocol::repo::{BlobId, BlobKind};
    use flotilla_protocol::HostName;

    pub(crate) fn record(id: &str, time: u64, tree: BlobId, blobs: Vec<BlobId>) -> SnapshotRecord {
        SnapshotRecord {
            v: REPO_FORMAT,
            id: id.into(),
            host: HostName::new("web1").unwrap(),
            time,
            tree,
            partial: false,
            blobs,
            meta: vec![1, 2, 3],
        }
    }

    fn stored(repo: &Repository, n: u32) -> BlobId {
        let (id, data) = blob(n, 100);
        let mut w = repo.pack_writer();
        w.add(id, BlobKind::Data, &data).unwrap();
        w.finish().unwrap();
        id
    }

    #[test]
    fn commit_list_and_lookup() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::open_or_init(dir.path()).unwrap();
        let (t, b) = (stored(&repo, 1), stored(&repo, 2));
        let late = record(&"ab".repeat(16), 2000, t, vec![t, b]);
        let early = record(&"ac".repeat(16), 1000, t, vec![t]);
        repo.commit_snapshot(&late).unwrap();
        repo.commit_snapshot(&early).unwrap();
        assert_eq!(repo.snapshots().unwrap(), vec![early.clone(), late.clone()]);
        assert_eq!(repo.snapshot("ab").unwrap(), late);
        assert_eq!(repo.snapshot(&early.id).unwrap(), early);
        let err = repo.snapshot("a").unwrap_err();
        assert_eq!(err.code(), "invalid");
        assert!(err.to_string().contains("ambiguous"), "{err}");
        assert_eq!(repo.snapshot("ff").unwrap_err().code(), "not_found");
        assert_eq!(repo.snapshot("../x").unwrap_err().code(), "invalid");
        assert_eq!(repo.stats().snapshots, 2);
        drop(repo);
        assert_eq!(
            Repository::open_or_init(dir.path())
                .unwrap()
                .stats()
                .snapshots,
            2
        );
    }

    #[test]
    fn commit_refuses_missing_blobs_duplicates_and_bad_ids() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::open_or_init(dir.path()).unwrap();
        let t = stored(&repo, 1);
        let absent = BlobId([9; 32]);
        let id = "0123456789abcdef0123456789abcdef";

        let err = repo
            .commit_snapshot(&record(id, 1, t, vec![t, absent, BlobId([8; 32])]))
            .unwrap_err();
        assert!(
            matches!(err, RepoError::MissingBlobs { count: 2, first } if first == absent),
            "{err}"
        );
        let err = repo
            .commit_snapshot(&record(id, 1, absent, vec![]))
            .unwrap_err();
        assert_eq!(err.code(), "missing_blobs");

        repo.commit_snapshot(&record(id, 1, t, vec![t])).unwrap();
        let err = repo
            .commit_snapshot(&record(id, 2, t, vec![t]))
            .unwrap_err();
        assert!(matches!(err, RepoError::Exists { .. }), "{err}");
        assert_eq!(
            repo.snapshot(id).unwrap().time,
            1,
            "the first commit stands"
        );

        let long = "a".repeat(64);
        let bads: [&str; 5] = [
            "../x",
            "",
            "0123456789ABCDEF0123456789ABCDEF",
            "0123456789abcdef0123456789abcde/",
            &long,
        ];
        for bad in bads {
            let err = repo
                .commit_snapshot(&record(bad, 1, t, vec![]))
                .unwrap_err();
            assert_eq!(err.code(), "invalid", "{bad:?}");
        }
        assert_eq!(
            fs::read_dir(dir.path().join("snapshots")).unwrap().count(),
            1
        );
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    /// The pack that holds `id`, from the in-memory index.
    fn pack_of(repo: &Repository, id: &BlobId) -> PathBuf {
        let index = repo.shared.read_index();
        let slot = index.blobs[id].pack as usize;
        super::super::pack_path(dir_of(repo), &index.packs[slot])
    }

    fn dir_of(repo: &Repository) -> &Path {
        &repo.shared.dir
    }

    #[test]
    fn a_commit_needing_a_pack_gone_from_disk_is_refused_until_it_is_uploaded_again() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::open_or_init(dir.path()).unwrap();
        let (t, b, other) = (stored(&repo, 1), stored(&repo, 2), stored(&repo, 3));
        let (b_pack, t_pack) = (pack_of(&repo, &b), pack_of(&repo, &t));
        // Deleted while the storage agent runs: its memory still says stored.
        fs::remove_file(&b_pack).unwrap();
        assert!(repo.missing(&[b]).is_empty());

        let id = "0123456789abcdef0123456789abcdef";
        let err = repo
            .commit_snapshot(&record(id, 1, t, vec![t, b]))
            .unwrap_err();
        assert!(
            matches!(err, RepoError::MissingBlobs { count: 1, first } if first == b),
            "{err}"
        );
        assert_eq!(err.code(), "missing_blobs", "the source's retry code");
        // Forgotten, so the source's retry is told to send it again.
        assert_eq!(repo.missing(&[t, b, other]), vec![b]);
        assert_eq!(repo.stats().packs, 2);
        assert!(!snap_path(dir.path(), id).exists());

        // A snapshot that does not need the lost pack is not affected.
        repo.commit_snapshot(&record(&"c".repeat(32), 1, other, vec![other]))
            .unwrap();

        // The retry uploads it again; now the commit stands and restores.
        assert_eq!(stored(&repo, 2), b);
        repo.commit_snapshot(&record(id, 1, t, vec![t, b])).unwrap();
        assert_eq!(repo.read_blob(&b).unwrap().1, blob(2, 100).1);

        // A pack cut short is as good as gone.
        let bytes = fs::read(&t_pack).unwrap();
        fs::write(&t_pack, &bytes[..bytes.len() - 1]).unwrap();
        let err = repo
            .commit_snapshot(&record(&"d".repeat(32), 2, t, vec![]))
            .unwrap_err();
        assert!(
            matches!(err, RepoError::MissingBlobs { count: 1, first } if first == t),
            "{err}"
        );
        assert_eq!(repo.missing(&[t, b]), vec![t]);
    }

    #[test]
    fn unreadable_snapshot_files_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::open_or_init(dir.path()).unwrap();
        let t = stored(&repo, 1);
        repo.commit_snapshot(&record(&"1".repeat(32), 1, t, vec![t]))
            .unwrap();
        fs::write(
            dir.path()
                .join("snapshots")
                .join(format!("{}.snap", "2".repeat(32))),
            b"\xc1garbage",
        )
        .unwrap();
        // A file whose content names another id is not that snapshot.
        let other = fs::read(snap_path(dir.path(), &"1".repeat(32))).unwrap();
        fs::write(snap_path(dir.path(), &"3".repeat(32)), other).unwrap();
        assert_eq!(repo.snapshots().unwrap().len(), 1);
        assert_eq!(
            repo.snapshot(&"2".repeat(32)).unwrap_err().code(),
            "corrupt"
        );
    }
}
