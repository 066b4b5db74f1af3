//! The repository on a storage host: sealed blobs in pack files, one index
//! file per pack, one file per snapshot. Plain synchronous code; callers run
//! it on blocking threads.
//!
//! The storage host never holds keys: blobs arrive sealed and are kept as
//! opaque bytes named by their [`BlobId`]. Integrity here means "the bytes are
//! the ones that were written" (BLAKE3 of the sealed bytes, of each pack);
//! authenticity is checked by key holders when they open a blob.
//!
//! ```text
//! DIR/config                        TOML: version, repository id, created (ms)
//! DIR/lock                          flock'ed while a process has the repository open
//!                                   (exclusively; shared by a [`RepositoryReader`])
//! DIR/packs/<2 hex>/<pack id>.pack  packs; id = BLAKE3 of the whole file
//! DIR/index/<pack id>.idx           index of one pack (MessagePack)
//! DIR/snapshots/<id>.snap           one SnapshotRecord each (MessagePack)
//! DIR/damaged/<pack id>.dmg         damaged copies found in one pack (MessagePack)
//! DIR/tmp/                          files being written; emptied at open
//! ```
//!
//! Every file reaches its final name by rename (or link) after an fsync, and
//! the directory is fsynced after: a file under its final name is complete.
//! The commit order is pack → index → snapshot, so a snapshot never names a
//! blob that is not durably stored. A copy found damaged (by `check` or a
//! read) leaves the in-memory index at once and is recorded in `damaged/`, so
//! no backup dedups against it, even after a restart; `repair` moves the good
//! blobs out of damaged packs and drops them. See `docs/repository.md`.
//!
//! [`RepositoryReader`] opens a repository only to read it (`flotilla-agent
//! recover`, on a storage host's disk or a copy): it creates, locks
//! exclusively, repairs and writes nothing, and offers no method that could.
//!
//! ```no_run
//! # fn demo(sealed: &[u8], id: flotilla_protocol::repo::BlobId) -> Result<(), flotilla_agent::repository::RepoError> {
//! use flotilla_agent::repository::Repository;
//! use flotilla_protocol::repo::BlobKind;
//!
//! let repo = Repository::open_or_init("/srv/flotilla".as_ref())?;
//! let mut writer = repo.pack_writer();
//! writer.add(id, BlobKind::Data, sealed)?;
//! let stats = writer.finish()?;
//! assert!(repo.contains(&id));
//! let (_kind, bytes) = repo.read_blob(&id)?;
//! # Ok(()) }
//! ```

mod check;
mod damage;
mod error;
mod format;
#[doc(hidden)]
pub mod fuzzing;
mod index;
mod pack;
mod prune;
mod repair;
mod snapshots;

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

use flotilla_protocol::repo::{BlobId, BlobKind, RepoStats, SnapshotRecord};
use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

pub use error::RepoError;
pub use pack::{PackWriter, WriteStats};

use damage::Recorded;
use format::{hex32, IndexEntry, PackId, ENTRY_HEADER_LEN};

/// Repository format version this build writes and reads.
pub const REPO_VERSION: u16 = 1;
/// Payload at which a pack writer closes its pack and starts another.
pub const PACK_TARGET: u64 = 16 * 1024 * 1024;
/// Most entries in one pack, so that tiny blobs cannot make one index huge.
pub const MAX_PACK_ENTRIES: usize = 65_536;
/// Largest config file read.
const MAX_CONFIG_BYTES: u64 = 64 * 1024;
/// Names that may exist in a directory being initialised (a crash during a
/// previous init leaves some of them behind).
const LAYOUT: [&str; 6] = ["packs", "index", "snapshots", "damaged", "tmp", "lock"];
/// The directories of a repository.
const SUBDIRS: [&str; 5] = ["packs", "index", "snapshots", "damaged", "tmp"];

/// A repository opened by this process. Cheap to clone (a handle); also fine
/// to share as `Arc<Repository>`. Many [`PackWriter`]s may write at once:
/// only the in-memory index is shared, behind a read-write lock held for
/// lookups and inserts only.
#[derive(Debug, Clone)]
pub struct Repository {
    shared: Arc<Shared>,
}

/// State shared by the handle and its pack writers.
#[derive(Debug)]
struct Shared {
    dir: PathBuf,
    id: String,
    index: RwLock<MemIndex>,
    snapshots: AtomicU64,
    /// Held by `check`, `prune` and `repair` for their whole run: each of
    /// them reads the directory and then changes it (drops packs, writes
    /// records), and two at once would act on what the other just removed.
    /// Backups and restores never take it.
    maintenance: Mutex<()>,
    /// Held while a damage record is read, changed and written back (and
    /// while records are removed), so two finds in one pack never overwrite
    /// each other's record. Taken before the index lock, never after.
    records: Mutex<()>,
    /// Held for the process's lifetime: two agents writing one repository
    /// would delete each other's files in tmp/ at open. Exclusive for a
    /// repository opened to write; shared, or none where the lock file is
    /// missing or cannot be locked, for a [`RepositoryReader`].
    _lock: Option<Flock<File>>,
    /// Opened by a [`RepositoryReader`]: nothing may be written, so damage
    /// found by a read leaves this process's index only and is not recorded.
    read_only: bool,
}

/// The config file, written once at init.
#[derive(Debug, Serialize, Deserialize)]
struct Config {
    version: u16,
    id: String,
    created: u64,
}

/// Where one blob is. Packs are interned so an entry stays small: the index
/// of a large repository lives in memory.
#[derive(Debug, Clone, Copy)]
struct Location {
    pack: u32,
    kind: BlobKind,
    offset: u64,
    length: u32,
}

/// The in-memory index: every blob of every indexed pack.
#[derive(Debug, Default)]
struct MemIndex {
    /// Packs ever indexed by this process; a `Location`'s `pack` is a
    /// position here. A dropped pack keeps its position (so no location
    /// moves) but leaves `slots`.
    packs: Vec<PackId>,
    /// Each position's pack size, as its index states.
    sizes: Vec<u64>,
    /// The position of every pack indexed now.
    slots: HashMap<PackId, u32>,
    blobs: HashMap<BlobId, Location>,
    bytes: u64,
    /// Copies known to be damaged, by pack (`DIR/damaged/`, plus any whose
    /// record could not be written). They are never indexed: a backup must
    /// not dedup against them, and a restore would only fail on them.
    damaged: HashMap<PackId, Recorded>,
}

impl MemIndex {
    /// Adds a pack's entries, except copies recorded as damaged. A blob
    /// already indexed keeps its first location: duplicates across packs
    /// written concurrently are harmless.
    fn insert_pack(&mut self, id: PackId, size: u64, entries: &[IndexEntry]) {
        let slot = match self.slots.get(&id) {
            Some(s) => *s,
            None => {
                let s = self.packs.len() as u32;
                self.packs.push(id);
                self.sizes.push(size);
                self.slots.insert(id, s);
                self.bytes += size;
                s
            }
        };
        let damaged = self.damaged.get(&id);
        for e in entries {
            if damaged.is_some_and(|d| d.covers(&e.id)) {
                continue;
            }
            self.blobs.entry(e.id).or_insert(Location {
                pack: slot,
                kind: e.kind,
                offset: e.offset,
                length: e.length,
            });
        }
    }

    /// Forgets packs that are no longer on disk as indexed: their blobs
    /// become absent, so the next backup that needs them uploads them again.
    /// A blob that another pack also holds is forgotten too (its first
    /// location was the dropped one); it is merely uploaded once more.
    fn remove_packs(&mut self, ids: &[PackId]) {
        let mut dropped = HashSet::new();
        for id in ids {
            if let Some(slot) = self.slots.remove(id) {
                self.bytes = self
                    .bytes
                    .saturating_sub(self.sizes.get(slot as usize).copied().unwrap_or(0));
                dropped.insert(slot);
            }
        }
        if !dropped.is_empty() {
            self.blobs.retain(|_, loc| !dropped.contains(&loc.pack));
        }
    }

    /// Records that the copies `damage` names in `pack` are damaged and
    /// takes them out of the index, so that lookups answer "missing" and the
    /// next backup uploads them again. A location in another pack is kept.
    fn add_damage(&mut self, pack: PackId, damage: Recorded) {
        let merged = match self.damaged.remove(&pack) {
            Some(old) => old.merge(damage),
            None => damage,
        };
        if let Some(slot) = self.slots.get(&pack).copied() {
            match &merged {
                Recorded::Blobs { ids, .. } => {
                    for id in ids {
                        if self.blobs.get(id).is_some_and(|l| l.pack == slot) {
                            self.blobs.remove(id);
                        }
                    }
                }
                Recorded::Whole { .. } => self.blobs.retain(|_, l| l.pack != slot),
            }
        }
        self.damaged.insert(pack, merged);
    }

    /// The pack a blob's indexed copy is in.
    fn pack_of(&self, id: &BlobId) -> Option<PackId> {
        let loc = self.blobs.get(id)?;
        self.packs.get(loc.pack as usize).copied()
    }

    /// Of the packs holding `ids` (those indexed), the ones not on disk with
    /// the size their index states: one `stat` per distinct pack, no read.
    /// Only a pack that is gone or of another size is returned; a pack that
    /// cannot even be looked at is an error, not a verdict.
    fn packs_not_on_disk<'a>(
        &self,
        dir: &Path,
        ids: impl IntoIterator<Item = &'a BlobId>,
    ) -> Result<Vec<PackId>, RepoError> {
        let slots: HashSet<u32> = ids
            .into_iter()
            .filter_map(|id| self.blobs.get(id))
            .map(|loc| loc.pack)
            .collect();
        let mut gone = Vec::new();
        for slot in slots {
            // Positions are only ever appended, so a location's exists.
            let (Some(id), Some(size)) =
                (self.packs.get(slot as usize), self.sizes.get(slot as usize))
            else {
                continue;
            };
            let path = pack_path(dir, id);
            match fs::metadata(&path) {
                Ok(m) if m.is_file() && m.len() == *size => {}
                Ok(m) => {
                    warn!(pack = %path.display(), size = m.len(), expected = *size, "pack has the wrong size; its blobs are treated as absent, run check");
                    gone.push(*id);
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    warn!(pack = %path.display(), "pack is gone; its blobs are treated as absent, run check");
                    gone.push(*id);
                }
                Err(e) => return Err(RepoError::io("stat", &path, e)),
            }
        }
        Ok(gone)
    }
}

impl Repository {
    /// Opens the repository in `dir`, creating it when `dir` is new or empty.
    ///
    /// Refuses a newer format, a non-empty directory that is not a repository
    /// and a repository another process holds. Empties `tmp/` (what a crash
    /// left), loads every index, rebuilds the index of any pack without a
    /// readable one, and warns about indexes whose pack is missing or of the
    /// wrong size (their blobs are then treated as absent, so the next backup
    /// uploads them again; `check` reports the damage).
    pub fn open_or_init(dir: &Path) -> Result<Repository, RepoError> {
        fs::create_dir_all(dir).map_err(|e| RepoError::io("create", dir, e))?;
        let config_path = dir.join("config");
        // Checked before the lock file is created, so that pointing the agent
        // at the wrong directory leaves no trace in it; `init` checks again
        // under the lock.
        if !config_path.exists() {
            check_fresh(dir)?;
        }
        let lock = take_lock(dir)?;
        let config = if config_path.exists() {
            read_config(&config_path)?
        } else {
            init(dir)?
        };
        // `damaged/` is new in this build; an older repository gets it here.
        for sub in SUBDIRS {
            let p = dir.join(sub);
            fs::create_dir_all(&p).map_err(|e| RepoError::io("create", &p, e))?;
        }
        clear_tmp(&dir.join("tmp"))?;
        let index = index::load_all(dir)?;
        Self::assemble(dir, config.id, index, Some(lock), false)
    }

    /// The open repository from what [`open_or_init`](Self::open_or_init)
    /// or [`open_read_only`](Self::open_read_only) read.
    fn assemble(
        dir: &Path,
        id: String,
        index: MemIndex,
        lock: Option<Flock<fs::File>>,
        read_only: bool,
    ) -> Result<Repository, RepoError> {
        let snapshots = snapshots::count(dir)?;
        info!(
            repo = %id,
            dir = %dir.display(),
            packs = index.slots.len(),
            blobs = index.blobs.len(),
            damaged_packs = index.damaged.len(),
            snapshots,
            read_only,
            "repository open"
        );
        Ok(Repository {
            shared: Arc::new(Shared {
                dir: dir.to_path_buf(),
                id,
                index: RwLock::new(index),
                snapshots: AtomicU64::new(snapshots),
                maintenance: Mutex::new(()),
                records: Mutex::new(()),
                _lock: lock,
                read_only,
            }),
        })
    }

    /// Opens the repository in `dir` without changing anything in it, for a
    /// [`RepositoryReader`]: what [`open_or_init`](Self::open_or_init) does,
    /// less every write. No directory or lock file is created; the lock is
    /// taken shared (refused while an agent holds the repository, which
    /// could be pruning under the reader); `tmp/` is left as it is; a pack
    /// without a usable index is scanned in memory instead of re-indexed;
    /// damage is not recorded.
    fn open_read_only(dir: &Path) -> Result<Repository, RepoError> {
        let config_path = dir.join("config");
        if !config_path.is_file() {
            return Err(RepoError::NotARepository {
                path: dir.to_path_buf(),
            });
        }
        let lock = share_lock(dir)?;
        let config = read_config(&config_path)?;
        let index = load_all_read_only(dir)?;
        Self::assemble(dir, config.id, index, lock, true)
    }

    /// The repository's id (32 hex digits).
    pub fn repo_id(&self) -> &str {
        &self.shared.id
    }

    /// The repository's directory.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Whether a blob is stored.
    pub fn contains(&self, id: &BlobId) -> bool {
        self.shared.read_index().blobs.contains_key(id)
    }

    /// The ids the repository lacks, in the order given.
    pub fn missing(&self, ids: &[BlobId]) -> Vec<BlobId> {
        let index = self.shared.read_index();
        ids.iter()
            .filter(|id| !index.blobs.contains_key(id))
            .copied()
            .collect()
    }

    /// A writer for one upload stream. Writers are independent; each writes
    /// its own pack in `tmp/` and publishes it to the index when it closes.
    pub fn pack_writer(&self) -> PackWriter {
        PackWriter::new(self.shared.clone())
    }

    /// Reads one sealed blob, verifying its bytes against the hash stored
    /// beside them. Damage is an error naming the pack and the blob, and the
    /// damaged copy leaves the index at once (and is recorded, see
    /// [`check`](Self::check)): the next backup that has the data uploads it
    /// again.
    pub fn read_blob(&self, id: &BlobId) -> Result<(BlobKind, Vec<u8>), RepoError> {
        // `repair` may move a blob to a new pack and delete the old one
        // between the lookup and the read: a pack found gone is looked up
        // once more before it counts as lost.
        let mut looked_again = false;
        loop {
            let (loc, pack) = {
                let index = self.shared.read_index();
                let loc = *index.blobs.get(id).ok_or_else(|| RepoError::NotFound {
                    what: format!("blob {id}"),
                })?;
                // Slots are only ever appended, so the location's slot exists.
                let pack = index.packs.get(loc.pack as usize).copied();
                (loc, pack)
            };
            let pack = pack.ok_or_else(|| RepoError::NotFound {
                what: format!("pack of blob {id}"),
            })?;
            let path = self.shared.pack_path(&pack);
            let fault = match read_copy(&path, id, loc.kind, loc.offset, loc.length, None) {
                Ok(sealed) => return Ok((loc.kind, sealed)),
                Err(fault) => fault,
            };
            match fault {
                CopyFault::Gone(e) if !looked_again => {
                    looked_again = true;
                    debug!(error = %e, "pack gone at read; looking the blob up again");
                }
                CopyFault::Gone(e) | CopyFault::Truncated(e) => {
                    // Gone or cut short: as a commit does, forget the pack, so
                    // the next backup uploads its blobs again (invariant 4).
                    warn!(error = %e, "pack is gone or shorter than its index; its blobs are treated as absent, run check");
                    self.shared.write_index().remove_packs(&[pack]);
                    return Err(e);
                }
                CopyFault::Damaged(e) if self.shared.read_only => {
                    // Nothing is written in a repository opened to read: the
                    // copy leaves this process's index, and the record is
                    // left to the next `check` of the storage agent.
                    self.shared.write_index().add_damage(
                        pack,
                        Recorded::Blobs {
                            ids: HashSet::from([*id]),
                            fault: None,
                        },
                    );
                    return Err(e);
                }
                CopyFault::Damaged(e) => {
                    if let Err(record) = self.mark_damaged(&pack, &[(*id, loc.offset)], None) {
                        warn!(error = %record, "could not record a damaged blob; it is out of the index until the agent restarts");
                    }
                    return Err(e);
                }
                CopyFault::Io(e) => return Err(e),
            }
        }
    }

    /// Counts from the in-memory index.
    pub fn stats(&self) -> RepoStats {
        let index = self.shared.read_index();
        RepoStats {
            packs: index.slots.len() as u64,
            blobs: index.blobs.len() as u64,
            stored_bytes: index.bytes,
            snapshots: self.shared.snapshots.load(Ordering::Relaxed),
        }
    }
}

/// A repository opened only to read it: `flotilla-agent recover` reads a
/// storage host's repository (or a copy of it, a USB disk) with no agent,
/// bus or coordinator running.
///
/// Opening creates, locks exclusively, repairs and writes nothing, and the
/// reader has no method that writes: no pack writer, no commit, no check,
/// prune or repair. It takes the repository's lock shared, so an agent that
/// holds it (and could prune or repair under the reader) makes the open
/// fail with [`RepoError::Locked`], and an agent started while the reader is
/// open refuses to start. A pack found gone or damaged leaves the reader's
/// own index only; the repository keeps no trace of the reader.
///
/// ```no_run
/// # fn demo() -> Result<(), flotilla_agent::repository::RepoError> {
/// use flotilla_agent::repository::RepositoryReader;
///
/// let repo = RepositoryReader::open("/mnt/usb/flotilla-repo".as_ref())?;
/// for id in repo.snapshot_ids()? {
///     let record = repo.snapshot(&id)?;
///     let (_kind, _sealed) = repo.read_blob(&record.tree)?;
/// }
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct RepositoryReader {
    repo: Repository,
}

impl RepositoryReader {
    /// Opens the repository in `dir` to read it, changing nothing there.
    ///
    /// Refuses a directory without a repository `config`
    /// ([`RepoError::NotARepository`]), a newer format, and a repository an
    /// agent holds ([`RepoError::Locked`]). Leftovers in `tmp/` are left
    /// alone; a pack without a usable index is read whole and used if it is
    /// intact (its index is not written); indexes whose pack is missing or of
    /// the wrong size are warned about and their blobs treated as absent.
    pub fn open(dir: &Path) -> Result<RepositoryReader, RepoError> {
        Ok(RepositoryReader {
            repo: Repository::open_read_only(dir)?,
        })
    }

    /// The repository's id (32 hex digits).
    pub fn repo_id(&self) -> &str {
        self.repo.repo_id()
    }

    /// The repository's directory.
    pub fn dir(&self) -> &Path {
        self.repo.dir()
    }

    /// Counts from the reader's in-memory index.
    pub fn stats(&self) -> RepoStats {
        self.repo.stats()
    }

    /// Reads one sealed blob, verified against the hash stored beside it. A
    /// damaged or missing copy is an error naming the pack and the blob (and
    /// leaves the reader's index); nothing is recorded in the repository.
    pub fn read_blob(&self, id: &BlobId) -> Result<(BlobKind, Vec<u8>), RepoError> {
        self.repo.read_blob(id)
    }

    /// The id of every snapshot file, sorted. Files whose name is not a
    /// snapshot id are ignored with a warning.
    pub fn snapshot_ids(&self) -> Result<Vec<String>, RepoError> {
        self.repo.snapshot_ids()
    }

    /// Every snapshot file, each read (size-checked) or the error that says
    /// why it cannot be, in no particular order. The records are as stored:
    /// only a key holder can tell whether one is genuine
    /// (`SnapshotRecord::verify`).
    pub fn snapshot_files(&self) -> Result<Vec<Result<SnapshotRecord, RepoError>>, RepoError> {
        snapshots::read_all(&self.repo.shared.dir)
    }

    /// The snapshot with this id or unique id prefix (1 to 32 lowercase hex
    /// digits); an ambiguous prefix is [`RepoError::Invalid`], an unknown one
    /// [`RepoError::NotFound`].
    pub fn snapshot(&self, id_or_prefix: &str) -> Result<SnapshotRecord, RepoError> {
        self.repo.snapshot(id_or_prefix)
    }
}

impl Shared {
    // Poisoning: the index is only changed by `insert_pack`, `remove_packs`,
    // `add_damage` and wholesale replacement, none of which can panic
    // half-way in a way that breaks lookups, so a poisoned lock's data is
    // still sound.
    fn read_index(&self) -> RwLockReadGuard<'_, MemIndex> {
        self.index.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_index(&self) -> RwLockWriteGuard<'_, MemIndex> {
        self.index.write().unwrap_or_else(|e| e.into_inner())
    }

    // Both mutexes guard no data, only an order of file operations, so a
    // poisoned one is as good as a clean one.
    fn maintenance(&self) -> MutexGuard<'_, ()> {
        self.maintenance.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn records(&self) -> MutexGuard<'_, ()> {
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces the in-memory index with one loaded from disk; the caller
    /// holds the index's write lock (`index`) and the records lock. Damage
    /// known in memory whose record could not be written is kept for the
    /// packs that are still there.
    fn reload(&self, index: &mut MemIndex) -> Result<(), RepoError> {
        let mut fresh = index::load_all(&self.dir)?;
        for (pack, damage) in std::mem::take(&mut index.damaged) {
            if fresh.slots.contains_key(&pack) {
                fresh.add_damage(pack, damage);
            }
        }
        *index = fresh;
        Ok(())
    }

    fn pack_path(&self, id: &PackId) -> PathBuf {
        pack_path(&self.dir, id)
    }
}

/// `DIR/packs/<2 hex>/<id>.pack`.
fn pack_path(dir: &Path, id: &PackId) -> PathBuf {
    let hex = hex32(id);
    dir.join("packs")
        .join(&hex[..2])
        .join(format!("{hex}.pack"))
}

/// `DIR/index/<id>.idx`.
fn idx_path(dir: &Path, id: &PackId) -> PathBuf {
    dir.join("index").join(format!("{}.idx", hex32(id)))
}

/// A fresh name in `DIR/tmp/`.
fn tmp_path(dir: &Path, ext: &str) -> PathBuf {
    dir.join("tmp")
        .join(format!("{}.{ext}", uuid::Uuid::new_v4().simple()))
}

/// Fsyncs a directory so that renames and creations in it are durable.
fn sync_dir(dir: &Path) -> Result<(), RepoError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| RepoError::io("sync directory", dir, e))
}

/// Writes `bytes` to `path` atomically: a temporary file in `DIR/tmp/`,
/// fsynced, renamed over `path`, and `path`'s directory fsynced.
fn write_atomic(dir: &Path, path: &Path, bytes: &[u8]) -> Result<(), RepoError> {
    let tmp = write_tmp(dir, path, bytes)?;
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(RepoError::io("rename into", path, e));
    }
    sync_dir(parent(path))
}

/// Writes and fsyncs a new file in `DIR/tmp/` with the extension of `like`.
fn write_tmp(dir: &Path, like: &Path, bytes: &[u8]) -> Result<PathBuf, RepoError> {
    let ext = like.extension().and_then(|e| e.to_str()).unwrap_or("tmp");
    let tmp = tmp_path(dir, ext);
    let result = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        });
    if let Err(e) = result {
        let _ = fs::remove_file(&tmp);
        return Err(RepoError::io("write", &tmp, e));
    }
    Ok(tmp)
}

/// Why one stored copy of a blob could not be read.
#[derive(Debug)]
enum CopyFault {
    /// The bytes are not the ones written: the entry header does not parse
    /// or does not match, or the sealed bytes do not match their hash.
    Damaged(RepoError),
    /// The pack ends before the blob does.
    Truncated(RepoError),
    /// The pack file does not exist.
    Gone(RepoError),
    /// The file system failed; the copy may well be intact.
    Io(RepoError),
}

/// Reads the copy of blob `id` whose sealed bytes start at `offset` in the
/// pack at `path`, and verifies it: the entry header must parse and name
/// `id`, `kind` and `length`, the bytes must hash to the header's hash, and
/// to `hash` when the caller knows it (from an index). `length` must have
/// been checked against `MAX_SEALED` (index validation, or the scanner), so
/// the allocation is bounded.
fn read_copy(
    path: &Path,
    id: &BlobId,
    kind: BlobKind,
    offset: u64,
    length: u32,
    hash: Option<&[u8; 32]>,
) -> Result<Vec<u8>, CopyFault> {
    let damaged = |why: String| CopyFault::Damaged(RepoError::corrupt(path, why));
    let file = File::open(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => CopyFault::Gone(RepoError::io("open", path, e)),
        _ => CopyFault::Io(RepoError::io("open", path, e)),
    })?;
    let short = |e: io::Error| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            CopyFault::Truncated(RepoError::corrupt(
                path,
                format!("pack ends before blob {id} (truncated)"),
            ))
        } else {
            CopyFault::Io(RepoError::io("read", path, e))
        }
    };
    let head_at = offset
        .checked_sub(ENTRY_HEADER_LEN)
        .ok_or_else(|| damaged(format!("blob {id} has no room for its entry header")))?;
    let mut head = [0u8; ENTRY_HEADER_LEN as usize];
    file.read_exact_at(&mut head, head_at).map_err(short)?;
    let mut sealed = vec![0u8; length as usize];
    file.read_exact_at(&mut sealed, offset).map_err(short)?;
    let h = format::parse_entry_header(&head)
        .ok_or_else(|| damaged(format!("entry header of blob {id} is damaged")))?;
    if h.id != *id || h.kind != kind || h.len != length || hash.is_some_and(|x| *x != h.hash) {
        return Err(damaged(format!(
            "entry header of blob {id} does not match the index"
        )));
    }
    if *blake3::hash(&sealed).as_bytes() != h.hash {
        return Err(damaged(format!(
            "blob {id} does not match its stored hash (bit rot?)"
        )));
    }
    Ok(sealed)
}

/// Removes `path` if it exists and makes that durable in its directory.
fn remove_durably(path: &Path) -> Result<bool, RepoError> {
    match fs::remove_file(path) {
        Ok(()) => {
            sync_dir(parent(path))?;
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(RepoError::io("remove", path, e)),
    }
}

/// The directory holding `path` (every path here has one).
fn parent(path: &Path) -> &Path {
    path.parent().unwrap_or(Path::new("."))
}

/// Takes the repository's exclusive lock, failing at once if it is held.
fn take_lock(dir: &Path) -> Result<Flock<File>, RepoError> {
    let path = dir.join("lock");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| RepoError::io("open", &path, e))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(lock),
        Err((_, Errno::EWOULDBLOCK)) => Err(RepoError::Locked { path }),
        Err((_, errno)) => Err(RepoError::io("lock", &path, io::Error::from(errno))),
    }
}

/// Takes the repository's lock shared, for a reader: fails if an agent holds
/// it. Nothing is created: a repository without a lock file (a copy made
/// without it) is read unlocked, and so is one whose lock file cannot be
/// opened or locked (a read-only copy, a file system without `flock`), with a
/// warning.
fn share_lock(dir: &Path) -> Result<Option<Flock<File>>, RepoError> {
    let path = dir.join("lock");
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            warn!(lock = %path.display(), error = %e, "cannot open the lock file; reading without it (make sure no agent uses this repository)");
            return Ok(None);
        }
    };
    match Flock::lock(file, FlockArg::LockSharedNonblock) {
        Ok(lock) => Ok(Some(lock)),
        Err((_, Errno::EWOULDBLOCK)) => Err(RepoError::Locked { path }),
        Err((_, errno)) => {
            warn!(lock = %path.display(), error = %errno, "cannot lock the repository; reading without it (make sure no agent uses this repository)");
            Ok(None)
        }
    }
}

/// The in-memory index of a repository opened to read: `index::load_all`
/// without its one write. An index is used only when its pack exists with
/// the size it states; a pack left without a usable index is read whole
/// and, if intact, indexed in memory only (the agent writes its index at
/// its next start). Copies recorded as damaged are left out.
fn load_all_read_only(dir: &Path) -> Result<MemIndex, RepoError> {
    let (mut index, loaded) = index::load_indexed(dir)?;
    for (id, path) in index::list_packs(dir)? {
        if loaded.contains(&id) {
            continue;
        }
        let size = match fs::metadata(&path) {
            Ok(m) => m.len(),
            Err(e) => {
                warn!(pack = %path.display(), error = %e, "cannot stat a pack without index; its blobs are treated as absent");
                continue;
            }
        };
        match format::scan_pack(&path) {
            Ok(scan) if scan.is_intact(&id) => {
                info!(pack = %path.display(), blobs = scan.entries.len(), "read a pack without index (indexed in memory only)");
                index.insert_pack(id, size, &scan.entries);
            }
            Ok(_) => warn!(
                pack = %path.display(),
                "pack without a usable index is damaged; its blobs are treated as absent"
            ),
            Err(e) => warn!(
                pack = %path.display(), error = %e,
                "cannot read a pack without index; its blobs are treated as absent"
            ),
        }
    }
    Ok(index)
}

/// Reads and checks the config: a newer version is refused before anything
/// else is parsed, so the message is about the version, not a field.
fn read_config(path: &Path) -> Result<Config, RepoError> {
    let file = File::open(path).map_err(|e| RepoError::io("open", path, e))?;
    let mut text = String::new();
    file.take(MAX_CONFIG_BYTES)
        .read_to_string(&mut text)
        .map_err(|e| RepoError::io("read", path, e))?;
    let table: toml::Table =
        toml::from_str(&text).map_err(|e| RepoError::corrupt(path, e.to_string()))?;
    let version = table
        .get("version")
        .and_then(|v| v.as_integer())
        .ok_or_else(|| RepoError::corrupt(path, "no version"))?;
    if version != i64::from(REPO_VERSION) {
        if version > i64::from(REPO_VERSION) {
            return Err(RepoError::UnsupportedVersion {
                path: path.to_path_buf(),
                found: u16::try_from(version).unwrap_or(u16::MAX),
                supported: REPO_VERSION,
            });
        }
        return Err(RepoError::corrupt(
            path,
            format!("unknown version {version}"),
        ));
    }
    let config: Config =
        toml::from_str(&text).map_err(|e| RepoError::corrupt(path, e.to_string()))?;
    if !snapshots::is_id(&config.id) {
        return Err(RepoError::corrupt(
            path,
            "repository id is not 32 lowercase hex digits",
        ));
    }
    Ok(config)
}

/// Creates the layout in a new or empty directory; the config, written last,
/// is what makes it a repository, so a crash during init leaves a directory
/// that init accepts again.
fn init(dir: &Path) -> Result<Config, RepoError> {
    check_fresh(dir)?;
    for sub in SUBDIRS {
        let p = dir.join(sub);
        fs::create_dir_all(&p).map_err(|e| RepoError::io("create", &p, e))?;
    }
    sync_dir(dir)?;
    let config = Config {
        version: REPO_VERSION,
        id: uuid::Uuid::new_v4().simple().to_string(),
        created: crate::now_ms(),
    };
    let text = toml::to_string(&config).map_err(|e| RepoError::invalid("config", e.to_string()))?;
    write_atomic(dir, &dir.join("config"), text.as_bytes())?;
    info!(repo = %config.id, dir = %dir.display(), "repository created");
    Ok(config)
}

/// Refuses a directory holding anything but (empty) layout entries: it is
/// someone's data, not a place to create a repository.
fn check_fresh(dir: &Path) -> Result<(), RepoError> {
    let entries = fs::read_dir(dir).map_err(|e| RepoError::io("list", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| RepoError::io("list", dir, e))?;
        let name = entry.file_name();
        let known = name.to_str().is_some_and(|n| LAYOUT.contains(&n));
        let empty = name == "lock"
            || name == "tmp"
            || fs::read_dir(entry.path()).is_ok_and(|mut d| d.next().is_none());
        if !known || !empty {
            return Err(RepoError::NotARepository {
                path: dir.to_path_buf(),
            });
        }
    }
    Ok(())
}

/// Removes what a crash left in `tmp/`: nothing there is referenced.
fn clear_tmp(tmp: &Path) -> Result<(), RepoError> {
    let mut removed = 0u64;
    for entry in fs::read_dir(tmp).map_err(|e| RepoError::io("list", tmp, e))? {
        let entry = entry.map_err(|e| RepoError::io("list", tmp, e))?;
        let path = entry.path();
        let result = if entry.file_type().is_ok_and(|t| t.is_dir()) {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        result.map_err(|e| RepoError::io("remove", &path, e))?;
        removed += 1;
    }
    if removed > 0 {
        warn!(removed, dir = %tmp.display(), "removed leftovers of an interrupted write");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn blob(n: u32, len: usize) -> (BlobId, Vec<u8>) {
        let data: Vec<u8> = (0..len)
            .map(|i| (i as u32).wrapping_mul(31).wrapping_add(n) as u8)
            .collect();
        let mut id = [0u8; 32];
        id[..4].copy_from_slice(&n.to_be_bytes());
        (BlobId(id), data)
    }

    #[test]
    fn init_then_reopen_keeps_the_id() {
        let dir = tempfile::tempdir().unwrap();
        let id = Repository::open_or_init(dir.path())
            .unwrap()
            .repo_id()
            .to_string();
        assert_eq!(id.len(), 32);
        let again = Repository::open_or_init(dir.path()).unwrap();
        assert_eq!(again.repo_id(), id);
        for sub in ["packs", "index", "snapshots", "damaged", "tmp", "config"] {
            assert!(dir.path().join(sub).exists(), "{sub}");
        }
    }

    #[test]
    fn a_second_open_while_held_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _repo = Repository::open_or_init(dir.path()).unwrap();
        let err = Repository::open_or_init(dir.path()).unwrap_err();
        assert!(matches!(err, RepoError::Locked { .. }), "{err}");
    }

    #[test]
    fn refuses_newer_versions_and_foreign_directories() {
        let dir = tempfile::tempdir().unwrap();
        drop(Repository::open_or_init(dir.path()).unwrap());
        let cfg = dir.path().join("config");
        let text = fs::read_to_string(&cfg)
            .unwrap()
            .replace("version = 1", "version = 7");
        fs::write(&cfg, text).unwrap();
        let err = Repository::open_or_init(dir.path()).unwrap_err();
        assert!(
            matches!(err, RepoError::UnsupportedVersion { found: 7, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("upgrade"));

        let foreign = tempfile::tempdir().unwrap();
        fs::write(foreign.path().join("photo.jpg"), b"x").unwrap();
        let err = Repository::open_or_init(foreign.path()).unwrap_err();
        assert!(matches!(err, RepoError::NotARepository { .. }), "{err}");
        assert!(
            !foreign.path().join("lock").exists(),
            "a foreign directory is left as it was"
        );
    }

    #[test]
    fn leftovers_in_tmp_are_removed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        drop(Repository::open_or_init(dir.path()).unwrap());
        fs::write(dir.path().join("tmp/half.pack"), b"FLOTPACK").unwrap();
        fs::create_dir(dir.path().join("tmp/d")).unwrap();
        drop(Repository::open_or_init(dir.path()).unwrap());
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn read_blob_of_unknown_id_is_not_found() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::open_or_init(dir.path()).unwrap();
        let err = repo.read_blob(&BlobId([7; 32])).unwrap_err();
        assert_eq!(err.code(), "not_found");
        assert_eq!(repo.missing(&[BlobId([7; 32])]), vec![BlobId([7; 32])]);
        assert_eq!(repo.stats(), RepoStats::default());
    }

    /// Every path below `dir` with its size, sorted.
    fn tree(dir: &Path) -> Vec<(PathBuf, u64)> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for entry in fs::read_dir(&d).unwrap() {
                let path = entry.unwrap().path();
                let meta = fs::symlink_metadata(&path).unwrap();
                if meta.is_dir() {
                    stack.push(path.clone());
                }
                out.push((path, meta.len()));
            }
        }
        out.sort();
        out
    }

    #[test]
    fn a_reader_changes_nothing_and_reads_a_pack_without_its_index() {
        let dir = tempfile::tempdir().unwrap();
        let (id, data) = blob(1, 5000);
        {
            let repo = Repository::open_or_init(dir.path()).unwrap();
            let mut w = repo.pack_writer();
            w.add(id, BlobKind::Data, &data).unwrap();
            w.finish().unwrap();
        }
        // A copy made without the lock file, whose index was lost, with a
        // leftover in tmp/: an agent would re-index and clean; a reader
        // reads and leaves it all as it is.
        fs::remove_file(dir.path().join("lock")).unwrap();
        for entry in fs::read_dir(dir.path().join("index")).unwrap() {
            fs::remove_file(entry.unwrap().path()).unwrap();
        }
        fs::write(dir.path().join("tmp/half.pack"), b"FLOTPACK").unwrap();
        let before = tree(dir.path());
        let reader = RepositoryReader::open(dir.path()).unwrap();
        assert_eq!(reader.read_blob(&id).unwrap(), (BlobKind::Data, data));
        assert_eq!(reader.stats().packs, 1);
        assert!(reader.snapshot_ids().unwrap().is_empty());
        drop(reader);
        assert_eq!(
            tree(dir.path()),
            before,
            "the reader changed the repository"
        );

        let _agent = Repository::open_or_init(dir.path()).unwrap();
        let err = RepositoryReader::open(dir.path()).unwrap_err();
        assert!(matches!(err, RepoError::Locked { .. }), "{err}");

        let empty = tempfile::tempdir().unwrap();
        let err = RepositoryReader::open(empty.path()).unwrap_err();
        assert!(matches!(err, RepoError::NotARepository { .. }), "{err}");
        assert_eq!(fs::read_dir(empty.path()).unwrap().count(), 0);
    }

    #[test]
    fn repository_is_send_and_sync() {
        fn check<T: Send + Sync + 'static>() {}
        check::<Repository>();
        check::<RepositoryReader>();
        check::<PackWriter>();
    }
}
