//! `backup`: walk paths, chunk files, seal new chunks, and build the trees of a
//! snapshot.
//!
//! Plain synchronous code: it runs on a blocking thread and talks to the
//! repository through the [`Store`] trait (over QUIC in the agent, a map in
//! tests). Chunks are batched so that one `missing` round trip covers many of
//! them; only chunks the repository lacks are compressed, encrypted and sent.
//! Files whose size, times, inode and device match the [`FileCache`] are not
//! read at all: their chunk list is reused.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::{self, File, Metadata};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use fastcdc::v2020::{FastCDC, StreamCDC};
use flotilla_protocol::repo::{
    BackupSummary, BlobId, BlobKind, ChunkRef, Node, NodeKind, RepoKey, Tree, Xattr, REPO_FORMAT,
};
use globset::{Glob, GlobSet, GlobSetBuilder};
use serde::{Deserialize, Serialize};

use super::roots::RootSeen;
use super::{Cancel, Counters, Progress};

/// Chunker sizes: 512 KiB minimum, 1 MiB average, 8 MiB maximum (as restic).
const CHUNK_MIN: u32 = 512 * 1024;
const CHUNK_AVG: u32 = 1024 * 1024;
const CHUNK_MAX: u32 = 8 * 1024 * 1024;
/// Plaintext held before asking the repository which chunks it lacks. The
/// walk fills one batch while the sealer works on the last.
const BATCH_BYTES: usize = 8 * 1024 * 1024;
/// Chunks held before asking, whatever their size (many small files).
const BATCH_BLOBS: usize = 2048;
/// Unreadable paths listed in the snapshot.
const MAX_UNREADABLE: usize = 1000;
/// Files changed this recently (ns) are not trusted to the file cache.
const RACY_NS: i64 = 1_000_000_000;
/// Times a file that changes while being read is read again.
const CHANGE_RETRIES: usize = 2;

/// The repository as the backup engine sees it.
pub trait Store {
    /// The subset of `ids` the repository does not have.
    fn missing(&mut self, ids: &[BlobId]) -> Result<Vec<BlobId>, StoreError>;
    /// Stores one sealed blob (durably by the end of the backup).
    fn put(&mut self, id: BlobId, kind: BlobKind, sealed: Vec<u8>) -> Result<(), StoreError>;
}

/// The repository could not be reached or refused a request.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct StoreError {
    /// What happened.
    pub message: String,
    /// Whether the backup may succeed if run again.
    pub retryable: bool,
}

/// What the source remembers about a file it backed up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedFile {
    /// Size.
    pub size: u64,
    /// Modification time, ns.
    pub mtime_ns: i64,
    /// Status change time, ns.
    pub ctime_ns: i64,
    /// Inode.
    pub inode: u64,
    /// Device.
    pub dev: u64,
    /// Its chunks.
    pub chunks: Vec<ChunkRef>,
}

/// Lookup of files backed up before, by absolute path bytes.
pub trait FileCache {
    /// The cached entry of `path`, if any.
    fn get(&self, path: &[u8]) -> Option<CachedFile>;
}

/// A cache that knows nothing (first backup, or cache distrusted).
#[derive(Debug, Default)]
pub struct NoCache;

impl FileCache for NoCache {
    fn get(&self, _: &[u8]) -> Option<CachedFile> {
        None
    }
}

/// What to back up.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// Absolute, canonical paths (already checked against the allowlist).
    pub paths: Vec<PathBuf>,
    /// Glob patterns: with a `/` matched against the whole path, otherwise
    /// against the file name.
    pub excludes: Vec<String>,
    /// zstd level for new chunks.
    pub zstd_level: i32,
}

/// What a finished walk produced.
#[derive(Debug, Clone)]
pub struct BackupOutcome {
    /// Root tree (one node per path).
    pub tree: BlobId,
    /// Every referenced blob, sorted and unique.
    pub blobs: Vec<BlobId>,
    /// Counters.
    pub summary: BackupSummary,
    /// Paths that could not be read, with why.
    pub unreadable: Vec<String>,
    /// File cache entries to record once the snapshot is committed.
    pub cache_updates: Vec<(Vec<u8>, CachedFile)>,
    /// What the walk saw of each path: its files, and whether it is a mount
    /// point (checked against the last backup before a commit).
    pub roots: Vec<RootSeen>,
}

/// Why a backup stopped.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The repository failed.
    #[error("repository: {0}")]
    Store(#[from] StoreError),
    /// An exclude pattern is invalid.
    #[error("invalid exclude pattern {pattern:?}: {why}")]
    Exclude {
        /// The pattern.
        pattern: String,
        /// Why.
        why: String,
    },
    /// Sealing failed (random source).
    #[error("cannot encrypt: {0}")]
    Crypto(#[from] flotilla_protocol::repo::CryptoError),
    /// A backup root itself cannot be read.
    #[error("cannot read {path}: {why}")]
    Root {
        /// The path.
        path: String,
        /// Why.
        why: String,
    },
    /// Cancelled.
    #[error("cancelled")]
    Cancelled,
}

impl BackupError {
    /// Whether running the backup again may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            BackupError::Store(e) => e.retryable,
            BackupError::Cancelled => true,
            _ => false,
        }
    }
}

struct Excludes {
    by_path: GlobSet,
    by_name: GlobSet,
}

impl Excludes {
    fn new(patterns: &[String]) -> Result<Self, BackupError> {
        let mut by_path = GlobSetBuilder::new();
        let mut by_name = GlobSetBuilder::new();
        for p in patterns {
            let glob = Glob::new(p).map_err(|e| BackupError::Exclude {
                pattern: p.clone(),
                why: e.to_string(),
            })?;
            if p.contains('/') {
                by_path.add(glob);
            } else {
                by_name.add(glob);
            }
        }
        let build = |b: GlobSetBuilder| {
            b.build().map_err(|e| BackupError::Exclude {
                pattern: patterns.join(" "),
                why: e.to_string(),
            })
        };
        Ok(Self {
            by_path: build(by_path)?,
            by_name: build(by_name)?,
        })
    }

    fn matches(&self, path: &Path) -> bool {
        self.by_path.is_match(path) || path.file_name().is_some_and(|n| self.by_name.is_match(n))
    }
}

struct Pending {
    id: BlobId,
    kind: BlobKind,
    plain: Vec<u8>,
}

struct Walker<'a> {
    key: &'a RepoKey,
    /// Batches for the sealer.
    sealer: SyncSender<Vec<Pending>>,
    cache: &'a dyn FileCache,
    progress: &'a mut dyn Progress,
    cancel: &'a Cancel,
    excludes: Excludes,
    referenced: HashSet<BlobId>,
    /// Ids known to be in the repository, sent, or batched in this session.
    present: HashSet<BlobId>,
    batch: Vec<Pending>,
    batch_bytes: usize,
    summary: BackupSummary,
    counters: Counters,
    unreadable: Vec<String>,
    cache_updates: Vec<(Vec<u8>, CachedFile)>,
    users: HashMap<u32, Option<String>>,
    groups: HashMap<u32, Option<String>>,
}

/// Backs up `opts.paths` into `store`.
///
/// The walk (reading, chunking, hashing) runs on the calling thread; asking
/// the repository which chunks it lacks, sealing them and handing them to
/// the store run on a sealer thread meanwhile, so reading the next files
/// overlaps the compression and encryption of the last ones.
pub fn backup(
    opts: &BackupOptions,
    key: &RepoKey,
    store: &mut (dyn Store + Send),
    cache: &dyn FileCache,
    progress: &mut dyn Progress,
    cancel: &Cancel,
) -> Result<BackupOutcome, BackupError> {
    let started = Instant::now();
    let excludes = Excludes::new(&opts.excludes)?;
    // A rendezvous: the walk fills the next batch while the sealer works on
    // the last, and waits for it rather than queueing a third.
    let (to_sealer, batches) = std::sync::mpsc::sync_channel(0);
    let level = opts.zstd_level;
    std::thread::scope(|scope| {
        let sealer = scope.spawn(move || seal_batches(&batches, key, level, store));
        let walked = walk(opts, key, to_sealer, excludes, cache, progress, cancel);
        // The walk dropped its sender: the sealer finishes what is queued
        // and says how it went. Its failure explains the walk's.
        let sealed = match sealer.join() {
            Ok(sealed) => sealed,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        match (walked, sealed) {
            (_, Err(e)) | (Err(e), Ok(_)) => Err(e),
            (Ok(mut outcome), Ok(sealed)) => {
                outcome.summary.blobs_new = sealed.blobs_new;
                outcome.summary.bytes_added = sealed.bytes_added;
                outcome.summary.duration_ms = started.elapsed().as_millis() as u64;
                Ok(outcome)
            }
        }
    })
}

/// What the sealer sent.
#[derive(Debug, Default)]
struct Sealed {
    blobs_new: u64,
    bytes_added: u64,
}

/// The sealer: for each batch, asks which blobs the repository lacks, seals
/// those and stores them, until the walk hangs up or the store fails.
fn seal_batches(
    batches: &Receiver<Vec<Pending>>,
    key: &RepoKey,
    level: i32,
    store: &mut (dyn Store + Send),
) -> Result<Sealed, BackupError> {
    let mut sealed_total = Sealed::default();
    for batch in batches {
        let ids: Vec<BlobId> = batch.iter().map(|p| p.id).collect();
        let missing: HashSet<BlobId> = store.missing(&ids)?.into_iter().collect();
        let todo: Vec<Pending> = batch
            .into_iter()
            .filter(|p| missing.contains(&p.id))
            .collect();
        let sealed = seal_all(key, &todo, level)?;
        for (p, sealed) in todo.into_iter().zip(sealed) {
            sealed_total.blobs_new += 1;
            sealed_total.bytes_added += sealed.len() as u64;
            store.put(p.id, p.kind, sealed)?;
        }
    }
    Ok(sealed_total)
}

/// The walk of [`backup`], handing batches to the sealer.
fn walk(
    opts: &BackupOptions,
    key: &RepoKey,
    sealer: SyncSender<Vec<Pending>>,
    excludes: Excludes,
    cache: &dyn FileCache,
    progress: &mut dyn Progress,
    cancel: &Cancel,
) -> Result<BackupOutcome, BackupError> {
    let mut w = Walker {
        key,
        sealer,
        cache,
        progress,
        cancel,
        excludes,
        referenced: HashSet::new(),
        present: HashSet::new(),
        batch: Vec::new(),
        batch_bytes: 0,
        summary: BackupSummary::default(),
        counters: Counters::default(),
        unreadable: Vec::new(),
        cache_updates: Vec::new(),
        users: HashMap::new(),
        groups: HashMap::new(),
    };
    let mut roots = Vec::new();
    let mut seen = Vec::new();
    for path in &opts.paths {
        let meta = fs::symlink_metadata(path).map_err(|e| BackupError::Root {
            path: path.display().to_string(),
            why: e.to_string(),
        })?;
        let files_before = w.counters.files;
        let mut node = w.visit(path, &meta)?;
        node.name = path.as_os_str().as_bytes().to_vec();
        roots.push(node);
        seen.push(RootSeen {
            path: path.clone(),
            files: w.counters.files - files_before,
            mount_point: super::roots::is_mount_point(path, &meta),
        });
    }
    roots.sort_by(|a, b| a.name.cmp(&b.name));
    roots.dedup_by(|a, b| a.name == b.name);
    if cancel.is_cancelled() {
        return Err(BackupError::Cancelled);
    }
    let tree = w.add_tree(roots)?;
    w.flush()?;
    let mut blobs: Vec<BlobId> = w.referenced.into_iter().collect();
    blobs.sort();
    w.summary.errors = w.unreadable.len() as u64;
    Ok(BackupOutcome {
        tree,
        blobs,
        summary: w.summary,
        unreadable: w.unreadable,
        cache_updates: w.cache_updates,
        roots: seen,
    })
}

impl Walker<'_> {
    fn note_unreadable(&mut self, path: &Path, why: impl std::fmt::Display) {
        self.summary.errors += 1;
        if self.unreadable.len() < MAX_UNREADABLE {
            self.unreadable.push(format!("{}: {why}", path.display()));
        }
    }

    /// Builds the node of `path`, recursing into directories.
    fn visit(&mut self, path: &Path, meta: &Metadata) -> Result<Node, BackupError> {
        if self.cancel.is_cancelled() {
            return Err(BackupError::Cancelled);
        }
        let mut node = self.node_from(path, meta);
        match node.kind {
            NodeKind::Dir => {
                self.summary.dirs += 1;
                self.counters.dirs += 1;
                self.progress.update(&self.counters, path);
                let children = self.read_dir(path)?;
                let tree = self.add_tree(children)?;
                node.subtree = Some(tree);
            }
            NodeKind::File => self.file(path, meta, &mut node)?,
            NodeKind::Symlink => match fs::read_link(path) {
                Ok(t) => node.link_target = Some(t.as_os_str().as_bytes().to_vec()),
                Err(e) => self.note_unreadable(path, e),
            },
            _ => {}
        }
        Ok(node)
    }

    /// The nodes of a directory's entries. Unreadable entries are noted and
    /// skipped; cancellation and repository failures end the whole backup
    /// (a truncated tree must never be committed as if it were complete).
    fn read_dir(&mut self, dir: &Path) -> Result<Vec<Node>, BackupError> {
        let entries = match fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) => {
                self.note_unreadable(dir, e);
                return Ok(Vec::new());
            }
        };
        let mut paths: Vec<PathBuf> = Vec::new();
        for entry in entries {
            match entry {
                Ok(entry) => paths.push(entry.path()),
                Err(e) => self.note_unreadable(dir, e),
            }
        }
        paths.sort();
        let mut nodes = Vec::with_capacity(paths.len());
        for path in paths {
            if self.excludes.matches(&path) {
                continue;
            }
            let meta = match fs::symlink_metadata(&path) {
                Ok(m) => m,
                Err(e) => {
                    self.note_unreadable(&path, e);
                    continue;
                }
            };
            match self.visit(&path, &meta) {
                Ok(node) => nodes.push(node),
                Err(
                    e @ (BackupError::Cancelled | BackupError::Store(_) | BackupError::Crypto(_)),
                ) => return Err(e),
                Err(e) => self.note_unreadable(&path, &e),
            }
        }
        Ok(nodes)
    }

    fn file(&mut self, path: &Path, meta: &Metadata, node: &mut Node) -> Result<(), BackupError> {
        self.counters.files += 1;
        self.summary.bytes_total += meta.len();
        let key = path.as_os_str().as_bytes().to_vec();
        let cached = self.cache.get(&key);
        if let Some(c) = cached.as_ref().filter(|c| same_file(c, meta)) {
            self.summary.files_unchanged += 1;
            self.counters.bytes += meta.len();
            node.content = c.chunks.clone();
            self.referenced.extend(c.chunks.iter().map(|c| c.id));
            self.cache_updates.push((key, c.clone()));
            self.progress.update(&self.counters, path);
            return Ok(());
        }
        if cached.is_some() {
            self.summary.files_changed += 1;
        } else {
            self.summary.files_new += 1;
        }
        let mut meta = meta.clone();
        for attempt in 0..=CHANGE_RETRIES {
            match self.read_file(path, meta.len()) {
                Ok(chunks) => {
                    let after = fs::symlink_metadata(path).ok();
                    let changed = after.as_ref().is_none_or(|a| !same_stat(&meta, a));
                    if changed && attempt < CHANGE_RETRIES {
                        if let Some(a) = after {
                            meta = a;
                        }
                        continue;
                    }
                    if changed {
                        self.note_unreadable(
                            path,
                            "changed while being read; backed up as last read",
                        );
                    }
                    let size: u64 = chunks.iter().map(|c| u64::from(c.len)).sum();
                    node.size = size;
                    node.content = chunks.clone();
                    // "Racily clean": a file modified within a timestamp tick
                    // of this read could change again without its times
                    // changing; such a file is read again next time.
                    let racy = SystemTime::now()
                        .duration_since(UNIX_EPOCH)
                        .map(|now| {
                            let now_ns = now.as_nanos() as i64;
                            now_ns - mtime_ns(&meta).max(ctime_ns(&meta)) < RACY_NS
                        })
                        .unwrap_or(true);
                    if !changed && !racy {
                        self.cache_updates.push((
                            key,
                            CachedFile {
                                size,
                                mtime_ns: mtime_ns(&meta),
                                ctime_ns: ctime_ns(&meta),
                                inode: meta.ino(),
                                dev: meta.dev(),
                                chunks,
                            },
                        ));
                    }
                    return Ok(());
                }
                Err(ReadError::Io(e)) => {
                    self.note_unreadable(path, e);
                    node.content.clear();
                    node.size = 0;
                    return Ok(());
                }
                Err(ReadError::Backup(e)) => return Err(e),
            }
        }
        Ok(())
    }

    fn read_file(&mut self, path: &Path, size_hint: u64) -> Result<Vec<ChunkRef>, ReadError> {
        let mut file = File::open(path).map_err(ReadError::Io)?;
        let mut chunks = Vec::new();
        // Most files fit in one chunker window: read them whole and cut the
        // slice, instead of giving each its own 8 MiB streaming buffer.
        if size_hint <= u64::from(CHUNK_MAX) {
            let mut data = Vec::with_capacity(size_hint as usize + 1);
            file.read_to_end(&mut data).map_err(ReadError::Io)?;
            if data.len() <= CHUNK_MAX as usize {
                let cuts: Vec<(usize, usize)> =
                    FastCDC::new(&data, CHUNK_MIN, CHUNK_AVG, CHUNK_MAX)
                        .map(|c| (c.offset, c.length))
                        .collect();
                for (offset, length) in cuts {
                    let piece = data[offset..offset + length].to_vec();
                    self.add_chunk(&mut chunks, piece, path)?;
                }
                return Ok(chunks);
            }
            // It grew past the window while we read: chunk what we have
            // streamed together with the rest.
            let rest = std::io::Cursor::new(data).chain(file);
            return self.stream_chunks(rest, path);
        }
        self.stream_chunks(file, path)
    }

    fn stream_chunks(
        &mut self,
        source: impl Read,
        path: &Path,
    ) -> Result<Vec<ChunkRef>, ReadError> {
        let mut chunks = Vec::new();
        for chunk in StreamCDC::new(source, CHUNK_MIN, CHUNK_AVG, CHUNK_MAX) {
            if self.cancel.is_cancelled() {
                return Err(ReadError::Backup(BackupError::Cancelled));
            }
            let chunk = chunk.map_err(|e| match e {
                fastcdc::v2020::Error::IoError(e) => ReadError::Io(e),
                other => ReadError::Io(std::io::Error::other(format!("{other:?}"))),
            })?;
            self.add_chunk(&mut chunks, chunk.data, path)?;
        }
        Ok(chunks)
    }

    fn add_chunk(
        &mut self,
        chunks: &mut Vec<ChunkRef>,
        data: Vec<u8>,
        path: &Path,
    ) -> Result<(), ReadError> {
        let id = self.key.blob_id(&data);
        let len = data.len() as u32;
        self.summary.bytes_read += u64::from(len);
        self.counters.bytes += u64::from(len);
        chunks.push(ChunkRef { id, len });
        self.add_blob(id, BlobKind::Data, data)
            .map_err(ReadError::Backup)?;
        self.progress.update(&self.counters, path);
        Ok(())
    }

    fn add_tree(&mut self, mut nodes: Vec<Node>) -> Result<BlobId, BackupError> {
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        let tree = Tree {
            v: REPO_FORMAT,
            nodes,
        };
        let bytes = flotilla_protocol::encode(&tree).map_err(|e| StoreError {
            message: format!("cannot encode tree: {e}"),
            retryable: false,
        })?;
        let id = self.key.blob_id(&bytes);
        self.add_blob(id, BlobKind::Tree, bytes)?;
        Ok(id)
    }

    fn add_blob(&mut self, id: BlobId, kind: BlobKind, plain: Vec<u8>) -> Result<(), BackupError> {
        self.referenced.insert(id);
        // `present` also holds the ids batched but not yet asked about: a
        // chunk repeated within a batch (zeros, copies) is queued once. The
        // flush below does the asking for every batched id.
        if !self.present.insert(id) {
            return Ok(());
        }
        self.batch_bytes += plain.len();
        self.batch.push(Pending { id, kind, plain });
        if self.batch_bytes >= BATCH_BYTES || self.batch.len() >= BATCH_BLOBS {
            self.flush()?;
        }
        Ok(())
    }

    /// Hands the batch to the sealer (waiting while it seals the last one).
    fn flush(&mut self) -> Result<(), BackupError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        // The sealer hung up only because the store failed; `backup`
        // reports that failure, not this one.
        self.sealer.send(batch).map_err(|_| {
            BackupError::Store(StoreError {
                message: "the sealer stopped".into(),
                retryable: true,
            })
        })
    }

    fn node_from(&mut self, path: &Path, meta: &Metadata) -> Node {
        let ft = meta.file_type();
        let kind = if ft.is_dir() {
            NodeKind::Dir
        } else if ft.is_file() {
            NodeKind::File
        } else if ft.is_symlink() {
            NodeKind::Symlink
        } else if ft.is_fifo() {
            NodeKind::Fifo
        } else if ft.is_socket() {
            NodeKind::Socket
        } else if ft.is_char_device() {
            NodeKind::CharDevice
        } else {
            NodeKind::BlockDevice
        };
        let uid = meta.uid();
        let gid = meta.gid();
        let user = self
            .users
            .entry(uid)
            .or_insert_with(|| {
                nix::unistd::User::from_uid(uid.into())
                    .ok()
                    .flatten()
                    .map(|u| u.name)
            })
            .clone();
        let group = self
            .groups
            .entry(gid)
            .or_insert_with(|| {
                nix::unistd::Group::from_gid(gid.into())
                    .ok()
                    .flatten()
                    .map(|g| g.name)
            })
            .clone();
        let name = path
            .file_name()
            .unwrap_or(OsStr::new(""))
            .as_bytes()
            .to_vec();
        Node {
            name,
            kind,
            mode: meta.mode() & 0o7777,
            uid,
            gid,
            user,
            group,
            mtime_ns: mtime_ns(meta),
            // Access times change whenever a backup reads a file; recording
            // them would make every tree new on every run. Restores set the
            // access time to the modification time.
            atime_ns: mtime_ns(meta),
            ctime_ns: ctime_ns(meta),
            size: if kind == NodeKind::File {
                meta.len()
            } else {
                0
            },
            inode: meta.ino(),
            dev: meta.dev(),
            nlink: meta.nlink(),
            rdev: meta.rdev(),
            link_target: None,
            content: Vec::new(),
            // Fewer allocated blocks than the size needs means holes.
            sparse: kind == NodeKind::File && meta.blocks().saturating_mul(512) < meta.len(),
            subtree: None,
            xattrs: read_xattrs(path),
        }
    }
}

enum ReadError {
    Io(std::io::Error),
    Backup(BackupError),
}

/// Compresses and encrypts `todo`, in order, on two threads.
fn seal_all(key: &RepoKey, todo: &[Pending], level: i32) -> Result<Vec<Vec<u8>>, BackupError> {
    super::on_two_threads(
        todo,
        |p| p.plain.len(),
        |p| key.seal(&p.id, &p.plain, level),
    )
    .into_iter()
    .map(|sealed| Ok(sealed?))
    .collect()
}

fn mtime_ns(m: &Metadata) -> i64 {
    m.mtime() * 1_000_000_000 + m.mtime_nsec()
}

fn ctime_ns(m: &Metadata) -> i64 {
    m.ctime() * 1_000_000_000 + m.ctime_nsec()
}

fn same_stat(a: &Metadata, b: &Metadata) -> bool {
    a.len() == b.len()
        && mtime_ns(a) == mtime_ns(b)
        && ctime_ns(a) == ctime_ns(b)
        && a.ino() == b.ino()
}

fn same_file(c: &CachedFile, m: &Metadata) -> bool {
    c.size == m.len()
        && c.mtime_ns == mtime_ns(m)
        && c.ctime_ns == ctime_ns(m)
        && c.inode == m.ino()
        && c.dev == m.dev()
}

fn read_xattrs(path: &Path) -> Vec<Xattr> {
    let Ok(names) = xattr::list(path) else {
        return Vec::new();
    };
    let mut out: Vec<Xattr> = names
        .filter_map(|name| {
            let value = xattr::get(path, &name).ok().flatten()?;
            Some(Xattr {
                name: name.as_bytes().to_vec(),
                value,
            })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::NoProgress;

    /// An in-memory repository.
    #[derive(Default)]
    pub(crate) struct MemStore {
        pub blobs: HashMap<BlobId, (BlobKind, Vec<u8>)>,
        pub puts: usize,
    }

    impl Store for MemStore {
        fn missing(&mut self, ids: &[BlobId]) -> Result<Vec<BlobId>, StoreError> {
            Ok(ids
                .iter()
                .filter(|i| !self.blobs.contains_key(i))
                .copied()
                .collect())
        }
        fn put(&mut self, id: BlobId, kind: BlobKind, sealed: Vec<u8>) -> Result<(), StoreError> {
            self.puts += 1;
            self.blobs.insert(id, (kind, sealed));
            Ok(())
        }
    }

    /// Sleeps until each path's last change (mtime or ctime) lies more than
    /// `RACY_NS` in the past, with a margin for the file system's coarser
    /// clock, so the engine trusts the files to its cache.
    fn wait_until_settled(paths: &[PathBuf]) {
        let margin = std::time::Duration::from_millis(100);
        let changed = paths
            .iter()
            .map(|p| {
                let meta = fs::symlink_metadata(p).expect("stat");
                mtime_ns(&meta).max(ctime_ns(&meta))
            })
            .max()
            .expect("at least one path");
        let settled = UNIX_EPOCH
            + std::time::Duration::from_nanos(changed as u64)
            + std::time::Duration::from_nanos(RACY_NS as u64)
            + margin;
        if let Ok(left) = settled.duration_since(SystemTime::now()) {
            std::thread::sleep(left);
        }
    }

    struct MapCache(HashMap<Vec<u8>, CachedFile>);

    impl FileCache for MapCache {
        fn get(&self, path: &[u8]) -> Option<CachedFile> {
            self.0.get(path).cloned()
        }
    }

    #[test]
    fn backs_up_dedups_and_skips_unchanged_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("data");
        fs::create_dir_all(root.join("sub/.cache")).expect("mkdir");
        let big: Vec<u8> = (0..3_000_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        fs::write(root.join("a.bin"), &big).expect("write");
        fs::write(root.join("sub/copy.bin"), &big).expect("write");
        fs::write(root.join("sub/.cache/junk"), b"junk").expect("write");
        fs::write(root.join("empty"), b"").expect("write");
        std::os::unix::fs::symlink("nowhere", root.join("dangling")).expect("symlink");
        // Files changed within the last second are "racily clean" and not
        // trusted to the cache; wait until every one has settled.
        wait_until_settled(&[
            root.join("a.bin"),
            root.join("sub/copy.bin"),
            root.join("empty"),
            root.join("dangling"),
        ]);
        let key = RepoKey::from_master(&[3; 32]);
        let opts = BackupOptions {
            paths: vec![root.clone()],
            excludes: vec!["**/.cache".into()],
            zstd_level: 3,
        };
        let mut store = MemStore::default();
        let out = backup(
            &opts,
            &key,
            &mut store,
            &NoCache,
            &mut NoProgress,
            &Cancel::default(),
        )
        .expect("backup");
        assert_eq!(out.summary.files_new, 3);
        assert_eq!(out.summary.bytes_read, 6_000_000);
        let data_blobs = store
            .blobs
            .values()
            .filter(|(k, _)| *k == BlobKind::Data)
            .count();
        assert!(
            (1..=8).contains(&data_blobs),
            "identical files dedup: {data_blobs}"
        );
        // The map above dedups by itself; the puts prove that the engine
        // sent each shared chunk once, and counted what it sent.
        assert_eq!(store.puts, store.blobs.len(), "a blob was sent twice");
        assert_eq!(out.summary.blobs_new as usize, store.puts);
        assert!(out.blobs.iter().all(|b| store.blobs.contains_key(b)));
        assert!(out.unreadable.is_empty(), "{:?}", out.unreadable);

        // Root tree: one node named by the absolute path, excluded dir absent.
        let (_, sealed) = &store.blobs[&out.tree];
        let root_tree: Tree =
            rmp_serde::from_slice(&key.open(&out.tree, sealed).expect("opens")).expect("tree");
        assert_eq!(root_tree.nodes[0].name, root.as_os_str().as_bytes());
        let sub_id = root_tree.nodes[0].subtree.expect("dir");
        let top: Tree =
            rmp_serde::from_slice(&key.open(&sub_id, &store.blobs[&sub_id].1).expect("opens"))
                .expect("tree");
        let names: Vec<_> = top
            .nodes
            .iter()
            .map(|n| String::from_utf8_lossy(&n.name).into_owned())
            .collect();
        assert_eq!(names, ["a.bin", "dangling", "empty", "sub"]);
        let sub = top.nodes[3].subtree.expect("dir");
        let sub: Tree =
            rmp_serde::from_slice(&key.open(&sub, &store.blobs[&sub].1).expect("opens"))
                .expect("tree");
        assert_eq!(sub.nodes.len(), 1, "excluded .cache");

        // Second run with the cache: nothing read, nothing sent.
        let cache = MapCache(out.cache_updates.into_iter().collect());
        let puts_before = store.puts;
        let again = backup(
            &opts,
            &key,
            &mut store,
            &cache,
            &mut NoProgress,
            &Cancel::default(),
        )
        .expect("backup");
        assert_eq!(again.summary.bytes_read, 0);
        assert_eq!(again.summary.files_unchanged, 3);
        assert_eq!(store.puts, puts_before);
        assert_eq!(again.tree, out.tree, "same content, same root tree");
    }

    #[test]
    fn the_walk_counts_the_files_of_each_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let full = dir.path().join("full");
        let empty = dir.path().join("empty");
        fs::create_dir_all(full.join("sub/.cache")).expect("mkdir");
        fs::create_dir_all(empty.join("only/dirs")).expect("mkdir");
        fs::write(full.join("a"), b"a").expect("write");
        fs::write(full.join("sub/b"), b"b").expect("write");
        fs::write(full.join("sub/.cache/c"), b"c").expect("write");
        let opts = BackupOptions {
            paths: vec![full.clone(), empty.clone()],
            excludes: vec!["**/.cache".into()],
            zstd_level: 3,
        };
        let out = backup(
            &opts,
            &RepoKey::from_master(&[3; 32]),
            &mut MemStore::default(),
            &NoCache,
            &mut NoProgress,
            &Cancel::default(),
        )
        .expect("backup");
        let counts: Vec<(PathBuf, u64, bool)> = out
            .roots
            .iter()
            .map(|r| (r.path.clone(), r.files, r.mount_point))
            .collect();
        // Excluded files are not counted; neither are directories.
        assert_eq!(counts, [(full, 2, false), (empty, 0, false)]);
    }
}
