//! `.idx` files: reading them at open, writing them when a pack closes, and
//! rebuilding them from a pack when a crash or damage lost one.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};

use tracing::{info, warn};

use super::format::{
    self, hex32, parse_hex32, IndexFile, PackId, Scan, IDX_VERSION, MAX_IDX_BYTES,
};
use super::{damage, idx_path, pack_path, write_atomic, MemIndex, RepoError};

/// Reads and validates the index at `path`, which must describe `pack`.
/// Damage of any kind is a `Corrupt` error, never a panic: the size is
/// checked before reading, the decoder is bounded, and every offset is
/// checked against the pack size the index states.
pub(super) fn read_idx(path: &Path, pack: &PackId) -> Result<IndexFile, RepoError> {
    let file = File::open(path).map_err(|e| RepoError::io("open", path, e))?;
    let len = file
        .metadata()
        .map_err(|e| RepoError::io("stat", path, e))?
        .len();
    if len > MAX_IDX_BYTES {
        return Err(RepoError::corrupt(
            path,
            format!("{len} bytes is larger than any index"),
        ));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(MAX_IDX_BYTES)
        .read_to_end(&mut bytes)
        .map_err(|e| RepoError::io("read", path, e))?;
    let idx: IndexFile = flotilla_protocol::decode(&bytes, MAX_IDX_BYTES as usize)
        .map_err(|e| RepoError::corrupt(path, e.to_string()))?;
    idx.validate(pack)
        .map_err(|e| RepoError::corrupt(path, e.to_string()))?;
    Ok(idx)
}

/// Writes the index of a pack atomically.
pub(super) fn write_idx(dir: &Path, pack: &PackId, idx: &IndexFile) -> Result<(), RepoError> {
    let path = idx_path(dir, pack);
    let bytes =
        flotilla_protocol::encode(idx).map_err(|e| RepoError::invalid("index", e.to_string()))?;
    write_atomic(dir, &path, &bytes)
}

/// Rebuilds the index of the pack `id` by reading the whole pack. Only an
/// entirely intact pack is indexed: a damaged one is left for `check`.
pub(super) fn rebuild(dir: &Path, id: &PackId) -> Result<IndexFile, RepoError> {
    let path = pack_path(dir, id);
    let size = fs::metadata(&path)
        .map_err(|e| RepoError::io("stat", &path, e))?
        .len();
    let scan = format::scan_pack(&path).map_err(|e| RepoError::io("read", &path, e))?;
    rebuild_from(dir, id, size, &scan)
}

/// [`rebuild`] from a scan the caller made of the whole pack `id` (of
/// `size` bytes): writes the index if the scan found the pack intact.
pub(super) fn rebuild_from(
    dir: &Path,
    id: &PackId,
    size: u64,
    scan: &Scan,
) -> Result<IndexFile, RepoError> {
    let path = pack_path(dir, id);
    if !scan.is_intact(id) {
        let reason = match (&scan.fault, scan.damaged.first()) {
            (_, Some(e)) => format!("blob {} does not match its stored hash", e.id),
            (Some(f), None) => f.clone(),
            (None, None) => "content does not hash to the pack's name".into(),
        };
        return Err(RepoError::corrupt(&path, reason));
    }
    let idx = IndexFile {
        v: IDX_VERSION,
        pack: hex32(id),
        size,
        entries: scan.entries.clone(),
    };
    // The scan produced these offsets; validating again guards the writer
    // and the scanner against disagreeing about the format.
    idx.validate(id)
        .map_err(|e| RepoError::corrupt(&path, e.to_string()))?;
    write_idx(dir, id, &idx)?;
    Ok(idx)
}

/// Every `<64 hex><ext>` file directly in `dir`, by id. Other names are
/// reported and ignored: nothing but our own spelling becomes a path.
pub(super) fn list_ids(dir: &Path, ext: &str) -> Result<Vec<(PackId, PathBuf)>, RepoError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(|e| RepoError::io("list", dir, e))? {
        let entry = entry.map_err(|e| RepoError::io("list", dir, e))?;
        let name = entry.file_name();
        let id = name
            .to_str()
            .and_then(|n| n.strip_suffix(ext))
            .and_then(parse_hex32);
        match id {
            Some(id) => out.push((id, entry.path())),
            None => {
                warn!(path = %entry.path().display(), "ignoring unexpected file in the repository")
            }
        }
    }
    Ok(out)
}

/// Every pack file: `DIR/packs/<2 hex>/<id>.pack`, in a pack directory that
/// matches its name.
pub(super) fn list_packs(dir: &Path) -> Result<Vec<(PackId, PathBuf)>, RepoError> {
    let packs = dir.join("packs");
    let mut out = Vec::new();
    for entry in fs::read_dir(&packs).map_err(|e| RepoError::io("list", &packs, e))? {
        let entry = entry.map_err(|e| RepoError::io("list", &packs, e))?;
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            warn!(path = %entry.path().display(), "ignoring unexpected file in the repository");
            continue;
        }
        for (id, path) in list_ids(&entry.path(), ".pack")? {
            if path == pack_path(dir, &id) {
                out.push((id, path));
            } else {
                warn!(path = %path.display(), "ignoring a pack in the wrong directory");
            }
        }
    }
    Ok(out)
}

/// Every index file: `DIR/index/<id>.idx`.
pub(super) fn list_idx(dir: &Path) -> Result<Vec<(PackId, PathBuf)>, RepoError> {
    list_ids(&dir.join("index"), ".idx")
}

/// Loads the in-memory index at open.
///
/// An index is used only when its pack exists with the size it states:
/// otherwise its blobs would look stored while they cannot be read, and new
/// backups would skip them. Packs left without a usable index (a crash after
/// the pack's rename, or a damaged index) are re-read and re-indexed.
/// Copies recorded as damaged (`DIR/damaged/`) are left out.
pub(super) fn load_all(dir: &Path) -> Result<MemIndex, RepoError> {
    let (mut index, loaded) = load_indexed(dir)?;
    for (id, path) in list_packs(dir)? {
        if loaded.contains(&id) {
            continue;
        }
        match rebuild(dir, &id) {
            Ok(idx) => {
                info!(pack = %path.display(), blobs = idx.entries.len(), "rebuilt missing pack index");
                index.insert_pack(id, idx.size, &idx.entries);
            }
            Err(e) => {
                warn!(error = %e, "pack without a usable index could not be re-indexed; run check")
            }
        }
    }
    Ok(index)
}

/// The in-memory index from the index files alone, and the packs it holds:
/// an index counts only when its pack exists with the size it states (its
/// blobs would otherwise look stored while they cannot be read). Copies
/// recorded as damaged are left out. Writes nothing; what to do with packs
/// not in the set is the caller's ([`load_all`] re-indexes them, a
/// read-only open scans them in memory).
pub(super) fn load_indexed(dir: &Path) -> Result<(MemIndex, HashSet<PackId>), RepoError> {
    let mut index = MemIndex {
        damaged: damage::load_all(dir)?,
        ..MemIndex::default()
    };
    let mut loaded = HashSet::new();
    for (id, path) in list_idx(dir)? {
        let idx = match read_idx(&path, &id) {
            Ok(idx) => idx,
            Err(e) => {
                warn!(error = %e, "unusable pack index; the pack will be read whole if present");
                continue;
            }
        };
        let pack = pack_path(dir, &id);
        match fs::metadata(&pack) {
            Ok(m) if m.len() == idx.size => {
                index.insert_pack(id, idx.size, &idx.entries);
                loaded.insert(id);
            }
            Ok(m) => warn!(
                pack = %pack.display(), size = m.len(), expected = idx.size,
                "pack has the wrong size; its blobs are treated as absent, run check"
            ),
            Err(e) => warn!(
                pack = %pack.display(), error = %e,
                "index names a pack that is missing; its blobs are treated as absent, run check"
            ),
        }
    }
    Ok((index, loaded))
}

#[cfg(test)]
mod tests {
    use super::super::tests::blob;
    use super::super::Repository;
    use super::*;
    use flotilla_protocol::repo::BlobKind;

    fn repo_with_two_blobs(dir: &Path) -> (Vec<flotilla_protocol::repo::BlobId>, PackId) {
        let repo = Repository::open_or_init(dir).unwrap();
        let mut w = repo.pack_writer();
        let mut ids = Vec::new();
        for n in 0..2 {
            let (id, data) = blob(n, 1000);
            w.add(id, BlobKind::Data, &data).unwrap();
            ids.push(id);
        }
        w.finish().unwrap();
        let packs = list_packs(dir).unwrap();
        assert_eq!(packs.len(), 1);
        (ids, packs[0].0)
    }

    #[test]
    fn reopen_loads_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let (ids, _) = repo_with_two_blobs(dir.path());
        let repo = Repository::open_or_init(dir.path()).unwrap();
        assert!(repo.missing(&ids).is_empty());
        assert_eq!(repo.read_blob(&ids[1]).unwrap().1, blob(1, 1000).1);
        assert_eq!(repo.stats().packs, 1);
    }

    #[test]
    fn a_deleted_index_is_rebuilt_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let (ids, pack) = repo_with_two_blobs(dir.path());
        let before = fs::read(idx_path(dir.path(), &pack)).unwrap();
        fs::remove_file(idx_path(dir.path(), &pack)).unwrap();
        let repo = Repository::open_or_init(dir.path()).unwrap();
        assert_eq!(
            repo.read_blob(&ids[0]).unwrap(),
            (BlobKind::Data, blob(0, 1000).1)
        );
        assert_eq!(fs::read(idx_path(dir.path(), &pack)).unwrap(), before);
    }

    #[test]
    fn a_garbage_index_does_not_panic_and_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let (ids, pack) = repo_with_two_blobs(dir.path());
        let garbage: [&[u8]; 4] = [
            b"",
            b"\x93\x01\x02",
            &[0xdd, 0xff, 0xff, 0xff, 0xff],
            &[0xc1; 100],
        ];
        for garbage in garbage {
            fs::write(idx_path(dir.path(), &pack), garbage).unwrap();
            let repo = Repository::open_or_init(dir.path()).unwrap();
            assert!(repo.missing(&ids).is_empty());
        }
        assert!(read_idx(&idx_path(dir.path(), &pack), &pack).is_ok());
    }

    #[test]
    fn a_truncated_pack_does_not_panic_and_its_blobs_count_as_absent() {
        let dir = tempfile::tempdir().unwrap();
        let (ids, pack) = repo_with_two_blobs(dir.path());
        let path = pack_path(dir.path(), &pack);
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let repo = Repository::open_or_init(dir.path()).unwrap();
        assert_eq!(repo.missing(&ids), ids);
        drop(repo);
        // The index survives: it is evidence for check, not ours to delete.
        assert!(idx_path(dir.path(), &pack).exists());
        fs::remove_file(idx_path(dir.path(), &pack)).unwrap();
        let repo = Repository::open_or_init(dir.path()).unwrap();
        assert_eq!(repo.missing(&ids), ids);
    }

    #[test]
    fn an_index_without_its_pack_is_kept_and_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let (ids, pack) = repo_with_two_blobs(dir.path());
        fs::remove_file(pack_path(dir.path(), &pack)).unwrap();
        let repo = Repository::open_or_init(dir.path()).unwrap();
        assert_eq!(repo.missing(&ids), ids);
        assert!(idx_path(dir.path(), &pack).exists());
    }
}
