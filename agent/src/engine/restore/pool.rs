//! The writer threads of a restore.
//!
//! The walker (the restore's own thread) reads trees, creates directories
//! and fetches blobs; creating files, decrypting and decompressing chunks,
//! writing them and applying the files' metadata happen here, on a few
//! threads at once. Creating and writing into the page cache costs kernel
//! time per file and per byte, and on one thread that was most of a restore.
//!
//! The walker creates each file (one creator: several creating in one
//! directory at once spin on its lock in the kernel, which cost more than it
//! saved) and sends its content as [`Job`]s: one for a file that fits one
//! fetch, several parts written in parallel at their offsets for a larger
//! one. Whoever finishes a file's last part (a writer, or the walker when a
//! fetch failed) finishes the file: size, metadata, rename into place, or
//! removal. Every file ends in exactly one [`Done`].
//!
//! The queue is bounded by bytes, so memory stays flat however fast the
//! storage answers.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

use flotilla_protocol::repo::{BlobId, CryptoError, Node, RepoKey};
use nix::fcntl::OFlag;

use super::fsmeta::Meta;
use super::write::{rename_into_place, temp_name};
use crate::engine::Cancel;

/// Most sealed bytes queued or being written at once (a job larger than
/// this still goes through, alone).
const QUEUE_BYTES: u64 = 24 * 1024 * 1024;
/// What an empty job weighs, so that many empty files still fill the queue.
const MIN_JOB_BYTES: u64 = 4096;

/// How many writer threads a restore uses: more than the cores, since a
/// writer often waits on the filesystem rather than computing.
pub(super) fn writer_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(2, std::num::NonZeroUsize::get)
        .saturating_mul(2)
        .clamp(2, 8)
}

/// One chunk to write: its id, plaintext length, offset in the file, and
/// which of the job's sealed blobs holds it (`None`: not fetched).
#[derive(Debug)]
pub(super) struct Piece {
    pub id: BlobId,
    pub len: u32,
    pub at: u64,
    pub blob: Option<usize>,
}

/// Work for a writer: chunks of a file the walker created.
#[derive(Debug)]
pub(super) struct Job {
    pub file: Arc<Restoring>,
    pub pieces: Vec<Piece>,
    /// The sealed blobs the pieces name.
    pub sealed: Vec<Vec<u8>>,
}

impl Job {
    fn weight(&self) -> u64 {
        let bytes: usize = self.sealed.iter().map(Vec::len).sum();
        (bytes as u64).max(MIN_JOB_BYTES)
    }
}

/// A file finished, restored or not.
#[derive(Debug)]
pub(super) struct Done {
    pub path: PathBuf,
    pub size: u64,
    /// The source's (device, inode) when it had several names.
    pub link_key: Option<(u64, u64)>,
    /// Why it was not restored (it was removed).
    pub failed: Option<String>,
    /// Restored, but without all its metadata.
    pub warning: Option<String>,
}

/// The source's (device, inode) of a file with several names, which its
/// other names are linked to.
pub(super) fn link_key(node: &Node) -> Option<(u64, u64)> {
    (node.nlink > 1).then_some((node.dev, node.inode))
}

/// A file created by the walker whose content is being written.
#[derive(Debug)]
pub(super) struct Restoring {
    pub path: PathBuf,
    pub node: Node,
    pub file: File,
    /// Temporary name to rename over `path` once complete, when something
    /// was at `path` already.
    pub tmp: Option<PathBuf>,
    parts_left: AtomicUsize,
    failed: Mutex<Option<String>>,
}

impl Restoring {
    pub(super) fn new(path: PathBuf, node: Node, created: Created, parts: usize) -> Self {
        Self {
            path,
            node,
            file: created.file,
            tmp: created.tmp,
            parts_left: AtomicUsize::new(parts),
            failed: Mutex::new(None),
        }
    }

    /// Records why the file is not restored; the first reason wins.
    pub(super) fn fail(&self, why: String) {
        let mut failed = lock(&self.failed);
        if failed.is_none() {
            *failed = Some(why);
        }
    }

    /// Counts `n` parts as finished; the caller that finishes the last one
    /// gets the file's outcome.
    pub(super) fn parts_done(&self, n: usize, meta: &mut Meta) -> Option<Done> {
        if n == 0 || self.parts_left.fetch_sub(n, Ordering::AcqRel) != n {
            return None;
        }
        let failed = lock(&self.failed).take();
        Some(finish(
            &self.file,
            &self.path,
            self.tmp.as_deref(),
            &self.node,
            failed,
            meta,
        ))
    }
}

/// A newly created file, and the temporary name it has if it is to replace
/// something.
#[derive(Debug)]
pub(super) struct Created {
    file: File,
    tmp: Option<PathBuf>,
}

/// Creates a file to restore into: in an empty place (the usual restore)
/// under its own name; over an existing entry under a temporary name, renamed
/// into place when complete, so it is never seen half-written. Never opens an
/// existing entry, symlink or not (`O_CREAT|O_EXCL|O_NOFOLLOW`); owner-only
/// until the metadata is applied.
pub(super) fn create(path: &Path, seq: &AtomicU64) -> io::Result<Created> {
    let create = |p: &Path| {
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(OFlag::O_NOFOLLOW.bits())
            .open(p)
    };
    match create(path) {
        Ok(file) => Ok(Created { file, tmp: None }),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let dir = path.parent().ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, "no parent directory")
            })?;
            let (tmp, file) = temp_name(dir, seq, create)?;
            Ok(Created {
                file,
                tmp: Some(tmp),
            })
        }
        Err(e) => Err(e),
    }
}

/// Completes a file whose content is written (`failed` is `None`) or
/// removes it.
fn finish(
    file: &File,
    path: &Path,
    tmp: Option<&Path>,
    node: &Node,
    failed: Option<String>,
    meta: &mut Meta,
) -> Done {
    let mut done = Done {
        path: path.to_path_buf(),
        size: node.size,
        link_key: link_key(node),
        failed: None,
        warning: None,
    };
    let result = match failed {
        Some(why) => Err(why),
        // Extends over trailing holes (a sparse file ending in zeros); a
        // file written to its end needs no extra call.
        None if node.sparse => file
            .set_len(node.size)
            .map_err(|e| format!("{}: cannot set size: {e}", path.display())),
        None => Ok(()),
    };
    let result = result.and_then(|()| {
        if let Err(why) = meta.apply_fd(file, node, path) {
            // The content is right; keep it and report the metadata.
            done.warning = Some(why.to_string());
        }
        match tmp {
            Some(tmp) => rename_into_place(tmp, path)
                .map_err(|e| format!("{}: cannot move file into place: {e}", path.display())),
            None => Ok(()),
        }
    });
    if let Err(why) = result {
        // Best effort: the failure itself is what gets reported.
        let _ = fs::remove_file(tmp.unwrap_or(path));
        done.failed = Some(why);
    }
    // No fsync per file: one syncfs at the end of the restore makes
    // everything durable at a fraction of the cost for many small files.
    done
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
    /// The restore was cancelled or stopped.
    #[error("restore stopped")]
    Stopped,
}

/// What every writer shares.
pub(super) struct Shared<'a> {
    pub key: &'a RepoKey,
    pub cancel: &'a Cancel,
    /// Restore owners (asked for, and running as root).
    pub owner: bool,
    /// Numbers temporary names.
    pub seq: &'a AtomicU64,
    pub queue: Queue,
    /// Set when the restore stops early: queued work is dropped, not done.
    pub stopped: AtomicBool,
}

impl Shared<'_> {
    /// Decrypts, checks and writes `pieces`; the first failure stops. A blob
    /// only one piece needs is decrypted in its own buffer (no copy); one
    /// that several need (a run of zeros, say) is opened into a copy each time.
    fn write(
        &self,
        file: &File,
        pieces: &[Piece],
        sealed: &mut [Vec<u8>],
        sparse: bool,
    ) -> Result<(), ChunkFailed> {
        let mut uses = vec![0u32; sealed.len()];
        for i in pieces.iter().filter_map(|p| p.blob) {
            if let Some(n) = uses.get_mut(i) {
                *n += 1;
            }
        }
        for p in pieces {
            if self.cancel.is_cancelled() || self.stopped.load(Ordering::Relaxed) {
                return Err(ChunkFailed::Stopped);
            }
            let i = p
                .blob
                .filter(|&i| i < sealed.len())
                .ok_or(ChunkFailed::NotFetched { id: p.id })?;
            let put = |plain: &[u8]| -> Result<(), ChunkFailed> {
                if plain.len() != p.len as usize {
                    return Err(ChunkFailed::WrongLength {
                        id: p.id,
                        holds: plain.len(),
                        tree: p.len,
                    });
                }
                if sparse && plain.iter().all(|&b| b == 0) {
                    return Ok(());
                }
                file.write_all_at(plain, p.at).map_err(ChunkFailed::Write)
            };
            if uses[i] == 1 {
                self.key.open_in_place(&p.id, &mut sealed[i], put)??;
            } else {
                put(&self.key.open(&p.id, &sealed[i])?)?;
            }
        }
        Ok(())
    }

    /// A writer: takes jobs until the queue is closed and empty.
    pub(super) fn work(&self, done: &Sender<Done>) {
        let mut meta = Meta::new(self.owner);
        while let Some(job) = self.queue.pop() {
            let weight = job.weight();
            let Job {
                file,
                pieces,
                mut sealed,
            } = job;
            if let Err(e) = self.write(&file.file, &pieces, &mut sealed, file.node.sparse) {
                file.fail(format!("{}: not restored: {e}", file.path.display()));
            }
            let finished = file.parts_done(1, &mut meta);
            if let Some(d) = finished {
                // The walker is gone only when the restore stopped.
                let _ = done.send(d);
            }
            self.queue.release(weight);
        }
    }
}

/// Jobs waiting for a writer, bounded by the bytes they hold.
#[derive(Debug, Default)]
pub(super) struct Queue {
    state: Mutex<QueueState>,
    /// A job arrived or the queue closed.
    arrived: Condvar,
    /// A job finished.
    finished: Condvar,
}

#[derive(Debug, Default)]
struct QueueState {
    jobs: VecDeque<(Job, u64)>,
    /// Weight of the jobs queued or being written.
    bytes: u64,
    closed: bool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A writer that panicked leaves consistent data behind: every update
    // under these locks is a single assignment.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Queue {
    /// Queues a job, waiting while the queue is full.
    pub(super) fn push(&self, job: Job) {
        let weight = job.weight();
        let mut state = lock(&self.state);
        while state.bytes > 0 && state.bytes + weight > QUEUE_BYTES && !state.closed {
            state = self
                .finished
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        state.bytes += weight;
        state.jobs.push_back((job, weight));
        self.arrived.notify_one();
    }

    /// The next job; `None` once closed and empty.
    fn pop(&self) -> Option<Job> {
        let mut state = lock(&self.state);
        loop {
            if let Some((job, _)) = state.jobs.pop_front() {
                return Some(job);
            }
            if state.closed {
                return None;
            }
            state = self
                .arrived
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn release(&self, weight: u64) {
        let mut state = lock(&self.state);
        state.bytes = state.bytes.saturating_sub(weight);
        self.finished.notify_all();
    }

    /// Waits until every queued job is written.
    pub(super) fn wait_idle(&self) {
        let mut state = lock(&self.state);
        while state.bytes > 0 {
            state = self
                .finished
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// No more jobs: writers exit once the queue is empty.
    pub(super) fn close(&self) {
        lock(&self.state).closed = true;
        self.arrived.notify_all();
        self.finished.notify_all();
    }
}
