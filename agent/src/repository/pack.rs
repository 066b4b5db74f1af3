//! Writing packs: one [`PackWriter`] per upload stream.
//!
//! A writer appends sealed blobs to a pack file in `tmp/`, and closes it when
//! it reaches [`PACK_TARGET`](super::PACK_TARGET) bytes or when the stream
//! finishes. Closing is the commit: trailer, fsync, rename into `packs/`,
//! fsync the directory, then the `.idx` the same way, and only then the
//! in-memory index. A blob is therefore never reported stored before both of
//! its files are durable, and a crash at any point leaves either nothing (a
//! tmp file, removed at the next open) or a complete pack (whose index is
//! rebuilt at the next open if it is missing).

use std::collections::HashSet;
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::Arc;

use flotilla_protocol::repo::{BlobId, BlobKind, MAX_SEALED};
use tracing::debug;

use super::format::{
    self, IndexEntry, IndexFile, PackId, ENTRY_HEADER_LEN, HEADER_LEN, IDX_VERSION, TRAILER_LEN,
};
use super::{
    damage, index, parent, sync_dir, tmp_path, RepoError, Shared, MAX_PACK_ENTRIES, PACK_TARGET,
};

/// What a writer stored.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Blobs written (duplicates skipped are not counted).
    pub blobs: u64,
    /// Sealed bytes of those blobs.
    pub bytes: u64,
    /// Packs committed.
    pub packs: u64,
}

/// Writes the blobs of one upload stream into packs. Not shared: each
/// stream has its own, so writers never wait on each other except for the
/// short index lookups and inserts.
///
/// Dropping a writer without [`finish`](Self::finish) discards its open pack
/// (blobs in packs it already committed stay committed).
#[derive(Debug)]
pub struct PackWriter {
    shared: Arc<Shared>,
    open: Option<OpenPack>,
    stats: WriteStats,
    /// Set after an error: the open pack was discarded, so accepting more
    /// blobs and then reporting success would lose the discarded ones.
    failed: bool,
    /// Whether a blob the index already holds is skipped. `repair` turns
    /// this off: it copies blobs whose indexed copy is in a pack it is about
    /// to drop.
    dedup: bool,
    /// Packs committed, by id.
    written: Vec<PackId>,
}

/// The pack being written.
#[derive(Debug)]
struct OpenPack {
    tmp: PathBuf,
    out: BufWriter<File>,
    /// BLAKE3 of everything written so far.
    hasher: blake3::Hasher,
    len: u64,
    entries: Vec<IndexEntry>,
    ids: HashSet<BlobId>,
}

impl PackWriter {
    pub(super) fn new(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            open: None,
            stats: WriteStats::default(),
            failed: false,
            dedup: true,
            written: Vec::new(),
        }
    }

    /// A writer that stores every blob given, indexed or not (once per
    /// writer): for `repair`, which moves blobs out of damaged packs.
    pub(super) fn rewriting(shared: Arc<Shared>) -> Self {
        let mut writer = Self::new(shared);
        writer.dedup = false;
        writer
    }

    /// Adds one sealed blob. Skips it if the repository or this writer has
    /// it already. Refuses an empty blob or one over [`MAX_SEALED`].
    pub fn add(&mut self, id: BlobId, kind: BlobKind, sealed: &[u8]) -> Result<(), RepoError> {
        if self.failed {
            return Err(RepoError::WriterFailed);
        }
        if sealed.is_empty() || sealed.len() > MAX_SEALED {
            return Err(RepoError::invalid(
                format!("blob {id}"),
                format!("{} sealed bytes (must be 1 to {MAX_SEALED})", sealed.len()),
            ));
        }
        if self.open.as_ref().is_some_and(|p| p.ids.contains(&id))
            || (self.dedup && self.shared.read_index().blobs.contains_key(&id))
        {
            return Ok(());
        }
        // Close first if this blob would push a non-empty pack past the
        // target; a blob larger than the target thus gets a pack of its own.
        let entry_len = ENTRY_HEADER_LEN + sealed.len() as u64;
        if self
            .open
            .as_ref()
            .is_some_and(|p| !p.entries.is_empty() && p.len - HEADER_LEN + entry_len > PACK_TARGET)
        {
            self.close()?;
        }
        if let Err(e) = self.append(id, kind, sealed) {
            self.fail();
            return Err(e);
        }
        self.stats.blobs += 1;
        self.stats.bytes += sealed.len() as u64;
        if self.open.as_ref().is_some_and(|p| {
            p.len - HEADER_LEN >= PACK_TARGET || p.entries.len() >= MAX_PACK_ENTRIES
        }) {
            self.close()?;
        }
        Ok(())
    }

    /// Commits the open pack, if any, and returns what this writer stored.
    /// Only after this returns `Ok` are the blobs durable.
    pub fn finish(self) -> Result<WriteStats, RepoError> {
        self.finish_packs().map(|(stats, _)| stats)
    }

    /// [`finish`](Self::finish), also returning the ids of the packs
    /// committed.
    pub(super) fn finish_packs(mut self) -> Result<(WriteStats, Vec<PackId>), RepoError> {
        if self.failed {
            return Err(RepoError::WriterFailed);
        }
        self.close()?;
        Ok((self.stats, std::mem::take(&mut self.written)))
    }

    /// Appends to the open pack, opening one first if needed.
    fn append(&mut self, id: BlobId, kind: BlobKind, sealed: &[u8]) -> Result<(), RepoError> {
        if self.open.is_none() {
            self.open = Some(self.start()?);
        }
        let Some(p) = self.open.as_mut() else {
            return Err(RepoError::WriterFailed);
        };
        let hash = *blake3::hash(sealed).as_bytes();
        // Checked above: sealed.len() ≤ MAX_SEALED < u32::MAX.
        let head = format::entry_header(&id, kind, sealed.len() as u32, &hash);
        p.out
            .write_all(&head)
            .and_then(|()| p.out.write_all(sealed))
            .map_err(|e| RepoError::io("write", &p.tmp, e))?;
        p.hasher.update(&head);
        p.hasher.update(sealed);
        let offset = p.len + ENTRY_HEADER_LEN;
        p.entries.push(IndexEntry {
            id,
            kind,
            offset,
            length: sealed.len() as u32,
            hash,
        });
        p.ids.insert(id);
        p.len = offset + sealed.len() as u64;
        Ok(())
    }

    /// Creates a pack file in `tmp/` and writes its header.
    fn start(&self) -> Result<OpenPack, RepoError> {
        let tmp = tmp_path(&self.shared.dir, "pack");
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(|e| RepoError::io("create", &tmp, e))?;
        let mut out = BufWriter::with_capacity(256 * 1024, file);
        let head = format::header();
        if let Err(e) = out.write_all(&head) {
            let _ = fs::remove_file(&tmp);
            return Err(RepoError::io("write", &tmp, e));
        }
        let mut hasher = blake3::Hasher::new();
        hasher.update(&head);
        Ok(OpenPack {
            tmp,
            out,
            hasher,
            len: HEADER_LEN,
            entries: Vec::new(),
            ids: HashSet::new(),
        })
    }

    /// Commits the open pack, if any. On error the writer is failed.
    fn close(&mut self) -> Result<(), RepoError> {
        let Some(open) = self.open.take() else {
            return Ok(());
        };
        match commit(&self.shared, open) {
            Ok(id) => {
                self.stats.packs += 1;
                self.written.push(id);
                Ok(())
            }
            Err(e) => {
                self.failed = true;
                Err(e)
            }
        }
    }

    /// Discards the open pack after an error.
    fn fail(&mut self) {
        self.failed = true;
        if let Some(open) = self.open.take() {
            let _ = fs::remove_file(&open.tmp);
        }
    }
}

impl Drop for PackWriter {
    fn drop(&mut self) {
        if let Some(open) = self.open.take() {
            // Remove first: the BufWriter's flush on drop then goes to an
            // unlinked file instead of resurrecting nothing.
            let _ = fs::remove_file(&open.tmp);
            debug!(blobs = open.entries.len(), "discarded an unfinished pack");
        }
    }
}

/// Trailer, fsync, rename into place, directory fsync, index, memory.
/// Returns the pack's id.
fn commit(shared: &Shared, open: OpenPack) -> Result<PackId, RepoError> {
    let OpenPack {
        tmp,
        mut out,
        mut hasher,
        len,
        entries,
        ..
    } = open;
    // Entries per pack are capped at MAX_PACK_ENTRIES, far below u32::MAX.
    let trailer = format::trailer(entries.len() as u32, hasher.finalize().as_bytes());
    hasher.update(&trailer);
    let id = *hasher.finalize().as_bytes();
    let size = len + TRAILER_LEN;

    let durable = out
        .write_all(&trailer)
        .and_then(|()| out.flush())
        .and_then(|()| out.get_ref().sync_all());
    drop(out);
    if let Err(e) = durable {
        let _ = fs::remove_file(&tmp);
        return Err(RepoError::io("write", &tmp, e));
    }

    let path = shared.pack_path(&id);
    let pack_dir = parent(&path);
    let placed = match fs::create_dir(pack_dir) {
        // A new fan-out directory must itself be made durable in packs/;
        // when another writer just created it, its fsync may still be
        // pending, so this writer makes sure too.
        Ok(()) => sync_dir(parent(pack_dir)),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => sync_dir(parent(pack_dir)),
        Err(e) => Err(RepoError::io("create", pack_dir, e)),
    }
    .and_then(|()| fs::rename(&tmp, &path).map_err(|e| RepoError::io("rename into", &path, e)));
    if let Err(e) = placed {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(pack_dir)?;

    // From here a crash leaves a complete pack without index, which the next
    // open re-indexes; an error leaves the same, and the client resends.
    let idx = IndexFile {
        v: IDX_VERSION,
        pack: format::hex32(&id),
        size,
        entries,
    };
    index::write_idx(&shared.dir, &id, &idx)?;
    // A pack's name is the hash of its content, so a pack of this name that
    // was recorded as damaged has just been replaced, by the rename above,
    // with intact bytes (a backup uploaded exactly its blobs again, or repair
    // rewrote it): its record no longer holds. Left in place, it would keep
    // these blobs out of the index, and every backup would upload them again.
    if shared.read_index().damaged.contains_key(&id) {
        let _records = shared.records();
        damage::remove_record(&shared.dir, &id)?;
        shared.write_index().damaged.remove(&id);
        debug!(pack = %idx.pack, "an intact copy replaced a damaged pack; its record is cleared");
    }
    shared.write_index().insert_pack(id, size, &idx.entries);
    debug!(pack = %idx.pack, blobs = idx.entries.len(), size, "pack committed");
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::super::tests::blob;
    use super::super::{index::list_packs, Repository};
    use super::*;

    #[test]
    fn add_finish_read_round_trip_and_duplicates_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::open_or_init(dir.path()).unwrap();
        let mut w = repo.pack_writer();
        let (a, da) = blob(1, 5000);
        let (t, dt) = blob(2, 300);
        w.add(a, BlobKind::Data, &da).unwrap();
        w.add(a, BlobKind::Data, &da).unwrap();
        w.add(t, BlobKind::Tree, &dt).unwrap();
        assert!(
            !repo.contains(&a),
            "nothing is visible before the pack is committed"
        );
        let stats = w.finish().unwrap();
        assert_eq!(
            stats,
            WriteStats {
                blobs: 2,
                bytes: 5300,
                packs: 1
            }
        );
        assert_eq!(repo.read_blob(&a).unwrap(), (BlobKind::Data, da.clone()));
        assert_eq!(repo.read_blob(&t).unwrap(), (BlobKind::Tree, dt));

        let mut again = repo.pack_writer();
        again.add(a, BlobKind::Data, &da).unwrap();
        assert_eq!(again.finish().unwrap(), WriteStats::default());
        let s = repo.stats();
        assert_eq!((s.packs, s.blobs), (1, 2));
        assert_eq!(
            s.stored_bytes,
            fs::metadata(&list_packs(dir.path()).unwrap()[0].1)
                .unwrap()
                .len()
        );
    }

    #[test]
    fn rotation_and_an_oversized_blob_gets_its_own_pack() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::open_or_init(dir.path()).unwrap();
        let mut w = repo.pack_writer();
        let mut ids = Vec::new();
        for n in 0..7 {
            let (id, data) = blob(n, 5 << 20);
            w.add(id, BlobKind::Data, &data).unwrap();
            ids.push(id);
        }
        let (big, big_data) = blob(100, 17 << 20);
        w.add(big, BlobKind::Data, &big_data).unwrap();
        let (small, small_data) = blob(101, 10);
        w.add(small, BlobKind::Data, &small_data).unwrap();
        let stats = w.finish().unwrap();
        // 3 + 3 + 1 blobs of 5 MiB, then the big one alone, then the small one.
        assert_eq!(stats.packs, 5, "{stats:?}");
        let packs = list_packs(dir.path()).unwrap();
        assert_eq!(packs.len(), 5);
        for (_, path) in &packs {
            let size = fs::metadata(path).unwrap().len();
            assert!(
                size <= PACK_TARGET + HEADER_LEN + TRAILER_LEN || size > 17 << 20,
                "{size}"
            );
        }
        for (n, id) in ids.iter().enumerate() {
            assert_eq!(repo.read_blob(id).unwrap().1, blob(n as u32, 5 << 20).1);
        }
        assert_eq!(repo.read_blob(&big).unwrap().1, big_data);
    }

    #[test]
    fn a_dropped_writer_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::open_or_init(dir.path()).unwrap();
        let mut w = repo.pack_writer();
        let (a, da) = blob(1, 5000);
        w.add(a, BlobKind::Data, &da).unwrap();
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 1);
        drop(w);
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        assert!(list_packs(dir.path()).unwrap().is_empty());
        assert_eq!(fs::read_dir(dir.path().join("index")).unwrap().count(), 0);
        assert!(!repo.contains(&a));
    }

    #[test]
    fn empty_and_oversized_blobs_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::open_or_init(dir.path()).unwrap();
        let mut w = repo.pack_writer();
        let err = w.add(BlobId([1; 32]), BlobKind::Data, &[]).unwrap_err();
        assert_eq!(err.code(), "invalid");
        let err = w
            .add(BlobId([2; 32]), BlobKind::Data, &vec![0u8; MAX_SEALED + 1])
            .unwrap_err();
        assert_eq!(err.code(), "invalid");
        // A refused blob does not fail the writer.
        w.add(BlobId([3; 32]), BlobKind::Data, b"ok").unwrap();
        assert_eq!(w.finish().unwrap().blobs, 1);
    }

    #[test]
    fn concurrent_writers_with_overlapping_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Arc::new(Repository::open_or_init(dir.path()).unwrap());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let repo = repo.clone();
                std::thread::spawn(move || {
                    let mut w = repo.pack_writer();
                    for n in 0..50 {
                        let (id, data) = blob(n + t * 25, 3000);
                        w.add(id, BlobKind::Data, &data).unwrap();
                    }
                    w.finish().unwrap()
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        for n in 0..125 {
            let (id, data) = blob(n, 3000);
            assert_eq!(repo.read_blob(&id).unwrap().1, data);
        }
        assert_eq!(repo.stats().blobs, 125);
        drop(repo);
        let reopened = Repository::open_or_init(dir.path()).unwrap();
        assert_eq!(reopened.stats().blobs, 125);
    }
}
