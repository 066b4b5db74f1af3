//! Creating restored entries without following symlinks: directories in
//! place, everything else under a temporary name renamed over the final one.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use flotilla_protocol::repo::{BlobId, CryptoError, Node, NodeKind};
use nix::fcntl::OFlag;
use nix::sys::stat::{mknod, Mode, SFlag};
use tracing::debug;

use super::{io_fail, Fail, RestoreError, Restorer};

/// Most ids in one fetch.
const BATCH_BLOBS: usize = 256;
/// Most chunk plaintext in one fetch, so a batch's sealed bytes stay small.
const BATCH_BYTES: u64 = 32 * 1024 * 1024;
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
fn temp_name<T>(
    dir: &Path,
    seq: &mut u64,
    mut create: impl FnMut(&Path) -> io::Result<T>,
) -> io::Result<(PathBuf, T)> {
    for _ in 0..TEMP_ATTEMPTS {
        *seq += 1;
        let tmp = dir.join(format!(".flotilla-restore.{}.{}", std::process::id(), seq));
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
fn rename_into_place(tmp: &Path, path: &Path) -> io::Result<()> {
    let renamed = fs::rename(tmp, path);
    // rename(2) does nothing when both names are links to one inode (a hard
    // link restored again), leaving the temporary name behind: remove it.
    if renamed.is_err() || fs::symlink_metadata(tmp).is_ok() {
        // Best effort: a leftover temporary name is untidy, not wrong.
        let _ = fs::remove_file(tmp);
    }
    renamed
}

fn parent(path: &Path) -> Result<&Path, Fail> {
    path.parent()
        .ok_or_else(|| Fail::Entry(format!("{}: has no parent directory", path.display())))
}

/// Why one chunk of a file could not be written.
#[derive(Debug, thiserror::Error)]
enum ChunkFailed {
    /// The storage host's answer lacked it.
    #[error("chunk {id:?} was not fetched")]
    NotFetched {
        /// The chunk.
        id: BlobId,
    },
    /// It does not decrypt, decompress or match its id.
    #[error(transparent)]
    Open(#[from] CryptoError),
    /// It opens, but to another length than the tree records.
    #[error("chunk {id:?} holds {holds} bytes, the tree says {tree} (damaged snapshot)")]
    WrongLength {
        /// The chunk.
        id: BlobId,
        /// Its plaintext's length.
        holds: usize,
        /// The length the tree records.
        tree: u32,
    },
    /// The file being restored refused the bytes.
    #[error("cannot write: {0}")]
    Write(#[source] io::Error),
}

impl Restorer<'_> {
    /// Restores a regular file, or links it to an earlier restored name of
    /// the same source inode.
    pub(super) fn file(&mut self, path: &Path, node: &Node) -> Result<(), Fail> {
        let link_key = (node.nlink > 1).then_some((node.dev, node.inode));
        if let Some(first) = link_key.and_then(|k| self.links.get(&k)).cloned() {
            match self.hard_link(&first, path) {
                Ok(()) => {
                    self.summary.hardlinks += 1;
                    self.progress.update(&self.counters, path);
                    return Ok(());
                }
                // The first name may have been replaced since (a hostile
                // snapshot can name an entry twice): restore this one in full.
                Err(e) => {
                    debug!(path = %path.display(), first = %first.display(), error = %e, "hard link failed; restoring a copy")
                }
            }
        }
        let dir = parent(path)?;
        // create_new is O_CREAT|O_EXCL: never opens an existing entry, symlink
        // or not. Owner-only until the metadata is applied.
        let create = |p: &Path| {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(OFlag::O_NOFOLLOW.bits())
                .open(p)
        };
        // Into an empty place (the usual restore) the file is created under
        // its own name; only an existing entry is replaced through a
        // temporary name and a rename, so it is never seen half-written.
        let filled = match create(path) {
            Ok(file) => {
                let filled = self.fill(&file, path, node);
                if filled.is_err() {
                    // Best effort: the failure itself is what gets reported.
                    let _ = fs::remove_file(path);
                }
                filled
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let (tmp, file) = temp_name(dir, &mut self.seq, create)
                    .map_err(io_fail(path, "cannot create file"))?;
                let filled = self.fill(&file, path, node).and_then(|()| {
                    rename_into_place(&tmp, path)
                        .map_err(io_fail(path, "cannot move file into place"))
                });
                if filled.is_err() {
                    let _ = fs::remove_file(&tmp);
                }
                filled
            }
            Err(e) => return Err(io_fail(path, "cannot create file")(e)),
        };
        filled?;
        if let Some(k) = link_key {
            self.links.insert(k, path.to_path_buf());
        }
        self.summary.files += 1;
        self.summary.bytes += node.size;
        self.counters.files += 1;
        self.progress.update(&self.counters, path);
        Ok(())
    }

    /// Writes the content and metadata of the newly created `file`.
    fn fill(&mut self, file: &File, path: &Path, node: &Node) -> Result<(), Fail> {
        self.write_content(file, path, node)?;
        if let Err(why) = self.meta.apply_fd(file, node, path) {
            // The content is right; keep it and report the metadata.
            self.record(why.to_string());
        }
        // No fsync per file: one syncfs at the end of the restore makes
        // everything durable at a fraction of the cost for many small files.
        Ok(())
    }

    /// Fetches the chunks in batches and writes them at their offsets;
    /// all-zero chunks of a sparse file are skipped, leaving holes.
    fn write_content(&mut self, file: &File, path: &Path, node: &Node) -> Result<(), Fail> {
        let total: u64 = node.content.iter().map(|c| u64::from(c.len)).sum();
        if total != node.size {
            return Err(Fail::Entry(format!(
                "{}: not restored: its chunks add up to {total} bytes but its size is {} (damaged snapshot)",
                path.display(),
                node.size
            )));
        }
        let mut offset = 0u64;
        let mut rest = node.content.as_slice();
        while !rest.is_empty() {
            if self.cancel.is_cancelled() {
                return Err(Fail::Abort(RestoreError::Cancelled));
            }
            // At least one chunk per batch, whatever its size.
            let mut take = 0;
            let mut bytes = 0u64;
            while take < rest.len()
                && take < BATCH_BLOBS
                && (take == 0 || bytes + u64::from(rest[take].len) <= BATCH_BYTES)
            {
                bytes += u64::from(rest[take].len);
                take += 1;
            }
            let (batch, later) = rest.split_at(take);
            rest = later;
            // A chunk repeated in the batch (zeros, say) is fetched once.
            let mut index: HashMap<BlobId, usize> = HashMap::new();
            let mut ids = Vec::new();
            for c in batch {
                index.entry(c.id).or_insert_with(|| {
                    ids.push(c.id);
                    ids.len() - 1
                });
            }
            let sealed = self.fetch_blobs(&ids).map_err(|f| match f {
                Fail::Entry(why) => Fail::Entry(format!("{}: not restored: {why}", path.display())),
                abort => abort,
            })?;
            // Each chunk is decrypted, decompressed and written at its offset
            // on one of two threads: both the CPU work and the kernel's copy
            // into the page cache then use both cores.
            let mut work = Vec::with_capacity(batch.len());
            for c in batch {
                let blob = index.get(&c.id).and_then(|&i| sealed.get(i));
                work.push((c, offset, blob));
                offset += u64::from(c.len);
            }
            let key = self.key;
            let sparse = node.sparse;
            let results = super::super::on_two_threads(
                &work,
                |(c, _, _)| c.len as usize,
                |&(c, at, blob)| -> Result<(), ChunkFailed> {
                    let blob = blob.ok_or(ChunkFailed::NotFetched { id: c.id })?;
                    let plain = key.open(&c.id, blob)?;
                    if plain.len() != c.len as usize {
                        return Err(ChunkFailed::WrongLength {
                            id: c.id,
                            holds: plain.len(),
                            tree: c.len,
                        });
                    }
                    if sparse && plain.iter().all(|&b| b == 0) {
                        return Ok(());
                    }
                    file.write_all_at(&plain, at).map_err(ChunkFailed::Write)
                },
            );
            if let Some(Err(why)) = results.into_iter().find(Result::is_err) {
                return Err(Fail::Entry(format!(
                    "{}: not restored: {why}",
                    path.display()
                )));
            }
            self.counters.bytes += bytes;
            self.progress.update(&self.counters, path);
        }
        // Extends over trailing holes (a sparse file ending in zeros); a file
        // written to its end needs no extra call.
        if node.sparse {
            file.set_len(node.size)
                .map_err(io_fail(path, "cannot set size"))?;
        }
        Ok(())
    }

    /// Makes `path` another name of the already restored `first`.
    fn hard_link(&mut self, first: &Path, path: &Path) -> io::Result<()> {
        let dir = path
            .parent()
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no parent directory"))?;
        // link(2) does not follow a symlink at `first`; the temporary name
        // lets the rename replace whatever is at `path`.
        let (tmp, ()) = temp_name(dir, &mut self.seq, |tmp| fs::hard_link(first, tmp))?;
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
        let (tmp, ()) = temp_name(dir, &mut self.seq, |tmp| {
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
        let (tmp, ()) = temp_name(dir, &mut self.seq, |tmp| {
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
