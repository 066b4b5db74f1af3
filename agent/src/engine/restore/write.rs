//! Creating restored entries without following symlinks: directories in
//! place, everything else under a temporary name renamed over the final one.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, DirBuilder};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use flotilla_protocol::repo::{BlobId, ChunkRef, Node, NodeKind};
use nix::sys::stat::{mknod, Mode, SFlag};
use tracing::debug;

use super::pool::{self, link_key, Done, Job, Piece, Restoring};
use super::{io_fail, Fail, RestoreError, Restorer};

/// Most ids in one fetch.
const BATCH_BLOBS: usize = 256;
/// Most chunk plaintext in one fetch: one writer's job, so a large file is
/// written by several writers at once.
const BATCH_BYTES: u64 = 8 * 1024 * 1024;
/// Batches of a large file asked for ahead of the one being fetched.
const FETCH_AHEAD: usize = 2;
/// Files sent in parts at once, taking turns part by part: each writer then
/// mostly has a file of its own. The kernel lets one writer at a time into a
/// file, so parts of a single file written at once wait for each other.
const LARGE_FILES: usize = 4;
/// Temporary names tried before giving up (each collision means a leftover
/// or a hostile entry of the same name; a hundred means something is wrong).
const TEMP_ATTEMPTS: usize = 100;

/// Makes `path` a real directory: keeps one that is there, replaces anything
/// else (a symlink is removed, never followed), creates it with `mode`.
pub(super) fn ensure_dir(path: &Path, mode: u32) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => return Ok(()),
        Ok(_) => fs::remove_file(path)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // mkdir does not follow a symlink that appeared meanwhile: it fails.
    DirBuilder::new().mode(mode).create(path)
}

/// Checks that `dir` is a real directory reached without any symlink: its
/// canonical path is itself. Every path here is the canonical target joined
/// with checked names, so anything else means a symlink on the way that could
/// lead outside the target.
pub(super) fn check_dir(dir: &Path) -> Result<(), Fail> {
    let meta = fs::symlink_metadata(dir).map_err(io_fail(dir, "cannot check directory"))?;
    let canonical = fs::canonicalize(dir).map_err(io_fail(dir, "cannot check directory"))?;
    if !meta.is_dir() || canonical.as_path() != dir {
        tracing::warn!(dir = %dir.display(), resolves_to = %canonical.display(), "not writing through a symlink");
        return Err(Fail::Entry(format!(
            "{}: not restored into: it resolves to {}, not a directory at that path",
            dir.display(),
            canonical.display()
        )));
    }
    Ok(())
}

/// Runs `create` on fresh temporary names in `dir` until one did not exist.
pub(super) fn temp_name<T>(
    dir: &Path,
    seq: &AtomicU64,
    mut create: impl FnMut(&Path) -> io::Result<T>,
) -> io::Result<(PathBuf, T)> {
    for _ in 0..TEMP_ATTEMPTS {
        let n = seq.fetch_add(1, Ordering::Relaxed) + 1;
        let tmp = dir.join(format!(".flotilla-restore.{}.{n}", std::process::id()));
        match create(&tmp) {
            Ok(v) => return Ok((tmp, v)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        "no free temporary name",
    ))
}

/// Renames `tmp` over `path`; removes `tmp` if that fails.
pub(super) fn rename_into_place(tmp: &Path, path: &Path) -> io::Result<()> {
    let renamed = fs::rename(tmp, path);
    // rename(2) does nothing when both names are links to one inode (a hard
    // link restored again), leaving the temporary name behind: remove it.
    if renamed.is_err() || fs::symlink_metadata(tmp).is_ok() {
        // Best effort: a leftover temporary name is untidy, not wrong.
        let _ = fs::remove_file(tmp);
    }
    renamed
}

/// Splits a file's chunks into fetches: at least one chunk each, at most
/// [`BATCH_BLOBS`] and, beyond the first chunk, [`BATCH_BYTES`].
fn batches(content: &[ChunkRef]) -> Vec<Range<usize>> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < content.len() {
        let mut end = start;
        let mut bytes = 0u64;
        while end < content.len()
            && end - start < BATCH_BLOBS
            && (end == start || bytes + u64::from(content[end].len) <= BATCH_BYTES)
        {
            bytes += u64::from(content[end].len);
            end += 1;
        }
        out.push(start..end);
        start = end;
    }
    if out.is_empty() {
        // An empty file is still one job: it is created and given metadata.
        out.push(0..0);
    }
    out
}

/// The chunks of `range` placed from `offset` on, and the ids to fetch for
/// them: a chunk repeated in the range (zeros, say) is fetched once.
fn pieces(content: &[ChunkRef], range: Range<usize>, mut offset: u64) -> (Vec<BlobId>, Vec<Piece>) {
    let mut index: HashMap<BlobId, usize> = HashMap::new();
    let mut ids = Vec::new();
    let mut pieces = Vec::with_capacity(range.len());
    for c in &content[range] {
        let blob = *index.entry(c.id).or_insert_with(|| {
            ids.push(c.id);
            ids.len() - 1
        });
        pieces.push(Piece {
            id: c.id,
            len: c.len,
            at: offset,
            blob: Some(blob),
        });
        offset += u64::from(c.len);
    }
    (ids, pieces)
}

/// A file being sent to the writers part by part.
#[derive(Debug)]
pub(super) struct Large {
    file: Arc<Restoring>,
    /// Its parts, as ranges of its chunks.
    batches: Vec<Range<usize>>,
    /// The next part to send.
    next: usize,
    /// Where the next part starts in the file.
    offset: u64,
}

fn parent(path: &Path) -> Result<&Path, Fail> {
    path.parent()
        .ok_or_else(|| Fail::Entry(format!("{}: has no parent directory", path.display())))
}

impl Restorer<'_, '_> {
    /// Restores a regular file, or, when it is another name of a source
    /// inode already being restored, remembers to link it once that is done.
    pub(super) fn file(&mut self, path: PathBuf, node: Node) -> Result<(), Fail> {
        if link_key(&node).is_some_and(|k| self.links.contains_key(&k)) {
            self.hardlinks.push((path, node));
            return Ok(());
        }
        self.file_content(path, node)
    }

    /// Creates a file and hands its chunks to the writers: a file that fits
    /// one fetch as one job right away; a larger one joins the files being
    /// sent in parts (see [`Large`]).
    pub(super) fn file_content(&mut self, path: PathBuf, node: Node) -> Result<(), Fail> {
        let total: u64 = node.content.iter().map(|c| u64::from(c.len)).sum();
        if total != node.size {
            return Err(Fail::Entry(format!(
                "{}: not restored: its chunks add up to {total} bytes but its size is {} (damaged snapshot)",
                path.display(),
                node.size
            )));
        }
        let batches = batches(&node.content);
        let created =
            pool::create(&path, self.pool.seq).map_err(io_fail(&path, "cannot create file"))?;
        if let Some(k) = link_key(&node) {
            self.links.insert(k, path.clone());
        }
        let parts = batches.len();
        let mut file = Large {
            file: Arc::new(Restoring::new(path, node, created, parts)),
            batches,
            next: 0,
            offset: 0,
        };
        if parts == 1 {
            self.send_part(&mut file).map_err(Fail::Abort)?;
            return Ok(());
        }
        self.large.push_back(file);
        while self.large.len() > LARGE_FILES {
            self.advance_large().map_err(Fail::Abort)?;
        }
        Ok(())
    }

    /// Sends the next part of the first file in [`Large`]'s rotation and
    /// puts it back at the end if it has more.
    fn advance_large(&mut self) -> Result<(), RestoreError> {
        let Some(mut file) = self.large.pop_front() else {
            return Ok(());
        };
        let more = self.send_part(&mut file)?;
        if more {
            self.large.push_back(file);
        }
        Ok(())
    }

    /// Fetches the next part of `file` and queues it for the writers: true
    /// while parts are left. A failed fetch fails the file (reported through
    /// its outcome, its other parts finished here); a storage outage or a
    /// cancel stops the restore.
    fn send_part(&mut self, file: &mut Large) -> Result<bool, RestoreError> {
        let i = file.next;
        let parts = file.batches.len();
        let fetched = if self.cancel.is_cancelled() {
            Err(Fail::Abort(RestoreError::Cancelled))
        } else {
            // The next parts travel while this one is written. A file of
            // one part needs no hint: a small one was asked for with its
            // directory, a larger one is fetched right now anyway.
            if parts > 1 {
                let ahead: Vec<(BlobId, u32)> = file.batches[i..]
                    .iter()
                    .take(FETCH_AHEAD)
                    .flat_map(|r| {
                        file.file.node.content[r.clone()]
                            .iter()
                            .map(|c| (c.id, c.len))
                    })
                    .collect();
                self.fetch.prefetch(&ahead);
            }
            let (ids, pieces) = pieces(
                &file.file.node.content,
                file.batches[i].clone(),
                file.offset,
            );
            self.fetch_blobs(&ids).map(|sealed| (pieces, sealed))
        };
        match fetched {
            Ok((pieces, sealed)) => {
                let bytes: u64 = pieces.iter().map(|p| u64::from(p.len)).sum();
                file.offset += bytes;
                file.next += 1;
                self.counters.bytes += bytes;
                self.pool.queue.push(Job {
                    file: Arc::clone(&file.file),
                    pieces,
                    sealed,
                });
                self.collect();
                Ok(file.next < parts)
            }
            Err(fail) => {
                let why = match &fail {
                    Fail::Entry(why) => why.clone(),
                    Fail::Abort(e) => e.to_string(),
                };
                file.file
                    .fail(format!("{}: not restored: {why}", file.file.path.display()));
                self.abandon(file);
                match fail {
                    // Reported through the file's outcome.
                    Fail::Entry(_) => Ok(false),
                    Fail::Abort(e) => Err(e),
                }
            }
        }
    }

    /// Finishes the parts of `file` never sent (the file has failed).
    fn abandon(&mut self, file: &mut Large) {
        let left = file.batches.len() - file.next;
        file.next = file.batches.len();
        if let Some(done) = file.file.parts_done(left, &mut self.meta) {
            self.settle_done(done);
        }
    }

    /// The restore stops: files still being sent in parts are failed, so
    /// that the writers remove them once their queued parts are dropped.
    pub(super) fn abandon_large(&mut self) {
        while let Some(mut file) = self.large.pop_front() {
            file.file.fail(format!(
                "{}: not restored: the restore stopped",
                file.file.path.display()
            ));
            self.abandon(&mut file);
        }
    }

    /// Takes in the files the writers have finished so far.
    pub(super) fn collect(&mut self) {
        while let Ok(done) = self.done.try_recv() {
            self.settle_done(done);
        }
    }

    /// Sends what is left of the large files, waits for the writers to
    /// finish everything queued and takes it in.
    pub(super) fn drain(&mut self) -> Result<(), RestoreError> {
        while !self.large.is_empty() {
            self.advance_large()?;
        }
        self.pool.queue.wait_idle();
        self.collect();
        Ok(())
    }

    /// Counts a finished file, or records why it is not restored.
    pub(super) fn settle_done(&mut self, done: Done) {
        if let Some(why) = done.failed {
            // Its other names are restored as copies of their own.
            if let Some(k) = done.link_key {
                if self.links.get(&k) == Some(&done.path) {
                    self.links.remove(&k);
                }
            }
            self.record(why);
            return;
        }
        if let Some(why) = done.warning {
            self.record(why);
        }
        self.summary.files += 1;
        self.summary.bytes += done.size;
        self.counters.files += 1;
        self.progress.update(&self.counters, &done.path);
    }

    /// Links the other names of multiply-linked files to their first,
    /// restored name, or restores them as copies where that failed.
    pub(super) fn hard_links(&mut self) -> Result<(), RestoreError> {
        for (path, node) in std::mem::take(&mut self.hardlinks) {
            if self.cancel.is_cancelled() {
                return Err(RestoreError::Cancelled);
            }
            let first = link_key(&node).and_then(|k| self.links.get(&k)).cloned();
            if let Some(first) = first {
                match self.hard_link(&first, &path) {
                    Ok(()) => {
                        self.summary.hardlinks += 1;
                        self.progress.update(&self.counters, &path);
                        continue;
                    }
                    // The first name may have been replaced since (a hostile
                    // snapshot can name an entry twice): restore this one in full.
                    Err(e) => {
                        debug!(path = %path.display(), first = %first.display(), error = %e, "hard link failed; restoring a copy")
                    }
                }
            }
            let copied = self.file_content(path, node);
            self.settle(copied)?;
        }
        self.drain()
    }

    /// Makes `path` another name of the already restored `first`.
    fn hard_link(&mut self, first: &Path, path: &Path) -> io::Result<()> {
        let dir = path
            .parent()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no parent directory"))?;
        // link(2) does not follow a symlink at `first`; the temporary name
        // lets the rename replace whatever is at `path`.
        let (tmp, ()) = temp_name(dir, self.pool.seq, |tmp| fs::hard_link(first, tmp))?;
        rename_into_place(&tmp, path)
    }

    /// Restores a fifo or (as root) a device node.
    pub(super) fn special(&mut self, path: &Path, node: &Node) -> Result<(), Fail> {
        let kind = match node.kind {
            NodeKind::Fifo => SFlag::S_IFIFO,
            NodeKind::CharDevice => SFlag::S_IFCHR,
            _ => SFlag::S_IFBLK,
        };
        if kind != SFlag::S_IFIFO && !self.is_root {
            return Err(Fail::Entry(format!(
                "{}: device not restored: creating device nodes needs root",
                path.display()
            )));
        }
        let dir = parent(path)?;
        // mknod(2) never follows a symlink and makes fifos without privileges.
        let (tmp, ()) = temp_name(dir, self.pool.seq, |tmp| {
            mknod(tmp, kind, Mode::S_IRUSR | Mode::S_IWUSR, node.rdev).map_err(io::Error::from)
        })
        .map_err(io_fail(path, "cannot create"))?;
        if let Err(why) = self.meta.apply_path(&tmp, node) {
            self.record(why.to_string());
        }
        rename_into_place(&tmp, path).map_err(io_fail(path, "cannot move into place"))?;
        self.progress.update(&self.counters, path);
        Ok(())
    }

    /// Creates one of the snapshot's symlinks. `checked` remembers the last
    /// directory found safe, since a directory's links come in runs.
    pub(super) fn symlink(
        &mut self,
        path: &Path,
        node: &Node,
        checked: &mut Option<PathBuf>,
    ) -> Result<(), Fail> {
        let target = node.link_target.as_deref().ok_or_else(|| {
            Fail::Entry(format!(
                "{}: symlink not restored: it has no target (damaged snapshot)",
                path.display()
            ))
        })?;
        let dir = parent(path)?;
        if checked.as_deref() != Some(dir) {
            check_dir(dir)?;
            *checked = Some(dir.to_path_buf());
        }
        let (tmp, ()) = temp_name(dir, self.pool.seq, |tmp| {
            std::os::unix::fs::symlink(OsStr::from_bytes(target), tmp)
        })
        .map_err(io_fail(path, "cannot create symlink"))?;
        if let Err(why) = self.meta.apply_path(&tmp, node) {
            self.record(why.to_string());
        }
        // rename(2) replaces a file or symlink at `path` but never a
        // directory, so a snapshot cannot swap a restored directory for a link.
        rename_into_place(&tmp, path).map_err(io_fail(path, "cannot move symlink into place"))
    }
}
