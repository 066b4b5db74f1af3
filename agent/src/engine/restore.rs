//! `restore`: writes a snapshot's entries back under a target directory.
//!
//! A snapshot is untrusted input: it may come from a compromised host or be
//! damaged. Nothing in it may cause a write outside the target, so:
//!
//! - every name is checked before it becomes part of a path: root names must
//!   be absolute and normalised, deeper names one real component;
//! - a directory is written into only after checking that it is a real
//!   directory whose canonical path is exactly where it should be, so no
//!   symlink anywhere on the way is followed, including ones that were in the
//!   target before the restore;
//! - files, special files and symlinks are created under a fresh temporary
//!   name (`O_CREAT|O_EXCL|O_NOFOLLOW`, or `mknod`/`symlink`, which never
//!   follow) and renamed over their final name: the rename replaces whatever
//!   symlink was there instead of writing through it, and readers never see a
//!   half-written file;
//! - the snapshot's own symlinks are created last, after every file and
//!   directory, so none of them can redirect a later write.
//!
//! Every blob is opened with the repository key, which checks it against its
//! id. A damaged chunk fails its file, a damaged tree its directory's content;
//! the rest is restored and the failures are counted. Only a storage failure
//! that may go away (a lost connection) or cancellation stops the restore.
//!
//! Directory metadata is applied last, children before parents: creating
//! entries changes a directory's mtime, and a read-only mode would stop the
//! writes into it.

mod fsmeta;
mod pool;
#[cfg(test)]
mod tests;
mod write;

use std::collections::{HashMap, VecDeque};
use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver};

use flotilla_protocol::repo::{
    BlobId, Node, NodeKind, RepoKey, RestoreSummary, Stripped, Tree, MAX_TREE, REPO_FORMAT,
};
use nix::fcntl::OFlag;
use tracing::{debug, warn};

use super::{Cancel, Counters, Progress};
use fsmeta::Meta;
use pool::{Done, Queue, Shared};
use write::{check_dir, ensure_dir, Large};

/// Errors kept verbatim in the summary; later ones are only counted.
const ERROR_SAMPLES: usize = 10;

/// Where restored blobs come from: the storage agent over QUIC in production,
/// a map in tests.
pub trait Fetch {
    /// Returns the sealed bytes of each id, in the order asked. Called with up
    /// to 256 ids at a time.
    fn get(&mut self, ids: &[BlobId]) -> Result<Vec<Vec<u8>>, FetchError>;

    /// A hint: these blobs (with their plaintext sizes, 0 when unknown) will
    /// be asked for soon, so an implementation may start fetching them in
    /// parallel. Small files are restored at the speed of this pipelining,
    /// not of one round trip each. Ignoring the hint is always correct.
    fn prefetch(&mut self, _soon: &[(BlobId, u32)]) {}
}

/// Blobs could not be fetched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct FetchError {
    /// What went wrong, for the user.
    pub message: String,
    /// Whether asking again later may work (connection lost, storage busy),
    /// as opposed to a blob the storage does not have.
    pub retryable: bool,
}

/// What to restore and where.
#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    /// Existing, canonical directory to restore into, already checked against
    /// the agent's allowlist by the caller.
    pub target: PathBuf,
    /// Snapshot paths to restore (absolute, as backed up); empty means all.
    pub includes: Vec<String>,
    /// Give entries their recorded owner and group (numeric ids). Only done
    /// when running as root; ignored otherwise.
    pub restore_owner: bool,
    /// Leave out what could raise privileges on this host: setuid/setgid
    /// bits of regular files, `security.capability` and every other
    /// attribute but `user.*` and POSIX ACLs (security labels), and device
    /// nodes (set for another host's snapshot, unless the task says
    /// `preserve_special`). Each is counted in [`Stripped`].
    pub strip_special: bool,
}

/// The extended attribute that holds a file's capabilities.
const CAPABILITY_XATTR: &[u8] = b"security.capability";
/// setuid and setgid.
const SET_ID_BITS: u32 = 0o6000;

/// Why a restore stopped. Failures of single entries do not stop it; they are
/// counted in [`RestoreSummary::errors`].
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The target directory is missing or unusable.
    #[error("restore target {path:?} cannot be used: {source}; it must be an existing directory the agent can write to")]
    Target {
        /// The target as given.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A root entry of the snapshot names a path that is not absolute and
    /// normalised; nothing was restored.
    #[error("snapshot path {path:?} would be restored outside the target: the snapshot is damaged or hostile, nothing was restored")]
    Escape {
        /// The offending name, lossily decoded.
        path: String,
    },
    /// A requested path is not absolute and normalised.
    #[error("restore path {path:?} must be absolute, without \".\" or \"..\", as it was backed up (e.g. /srv/data)")]
    BadInclude {
        /// The path as requested.
        path: String,
    },
    /// None of the requested paths is in the snapshot.
    #[error("none of {paths:?} is in the snapshot; list the snapshot to see which paths it holds")]
    NotInSnapshot {
        /// The requested paths.
        paths: Vec<String>,
    },
    /// The snapshot's root tree is missing, damaged or of a newer format.
    #[error("the snapshot's root tree {id} cannot be read: {why}")]
    RootTree {
        /// The root tree's id.
        id: BlobId,
        /// Why.
        why: String,
    },
    /// The storage could not be reached; the restore can be run again.
    #[error(
        "fetching from the storage host failed: {0}; run the restore again once it is reachable"
    )]
    Fetch(#[source] FetchError),
    /// Asked to stop.
    #[error("restore cancelled")]
    Cancelled,
}

impl RestoreError {
    /// Whether running the same restore again later may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            RestoreError::Fetch(e) => e.retryable,
            RestoreError::Target { .. }
            | RestoreError::Escape { .. }
            | RestoreError::BadInclude { .. }
            | RestoreError::NotInSnapshot { .. }
            | RestoreError::RootTree { .. }
            | RestoreError::Cancelled => false,
        }
    }
}

/// Files up to this size have their content prefetched with their directory.
const PREFETCH_FILE_MAX: u64 = 1024 * 1024;
/// Directories whose trees and small files are fetched ahead of the walk:
/// the next ones after the directory being restored, so their content is on
/// its way while this one's files are written.
const LOOKAHEAD_DIRS: usize = 2;

/// Restores the snapshot whose root tree is `root` under `opts.target`.
///
/// Each root node (named by the absolute path that was backed up, e.g.
/// `/srv/data`) lands at the same path below the target (`target/srv/data`);
/// missing directories on the way are created with mode 0755. Returns what was
/// restored, with failed entries counted and sampled; returns an error only if
/// nothing can be done safely, storage is unreachable, or `cancel` is set.
pub fn restore(
    root: &BlobId,
    key: &RepoKey,
    fetch: &mut dyn Fetch,
    opts: &RestoreOptions,
    progress: &mut dyn Progress,
    cancel: &Cancel,
) -> Result<RestoreSummary, RestoreError> {
    let target_error = |source: io::Error| RestoreError::Target {
        path: opts.target.clone(),
        source,
    };
    // The caller canonicalised it already; doing it again costs little and
    // every "is this still inside?" check below compares against it.
    let target = fs::canonicalize(&opts.target).map_err(target_error)?;
    if !fs::symlink_metadata(&target)
        .map_err(target_error)?
        .is_dir()
    {
        return Err(target_error(io::Error::new(
            io::ErrorKind::NotADirectory,
            "not a directory",
        )));
    }
    let includes = Includes::parse(&opts.includes)?;
    let is_root = nix::unistd::geteuid().is_root();
    let owner = opts.restore_owner && is_root;
    let seq = AtomicU64::new(0);
    let shared = Shared {
        key,
        cancel,
        owner,
        seq: &seq,
        queue: Queue::default(),
        stopped: AtomicBool::new(false),
    };
    let (done_tx, done) = mpsc::channel();
    std::thread::scope(|scope| {
        for _ in 0..pool::writer_threads() {
            let (shared, done_tx) = (&shared, done_tx.clone());
            scope.spawn(move || shared.work(&done_tx));
        }
        drop(done_tx);
        // However the walk ends, the writers are told to stop, so the scope
        // can join them.
        let _stop = StopWriters(&shared);
        let r = Restorer {
            key,
            fetch,
            progress,
            cancel,
            target,
            is_root,
            meta: Meta::new(owner),
            includes,
            strip_special: opts.strip_special,
            summary: RestoreSummary::default(),
            counters: Counters::default(),
            links: HashMap::new(),
            hardlinks: Vec::new(),
            symlinks: Vec::new(),
            dirs: Vec::new(),
            trees: HashMap::new(),
            large: VecDeque::new(),
            pool: &shared,
            done,
        };
        r.run(root)
    })
}

/// Stops the writers when the walk is over: queued work is dropped (after a
/// normal end there is none) and each writer exits.
struct StopWriters<'s, 'a>(&'s Shared<'a>);

impl Drop for StopWriters<'_, '_> {
    fn drop(&mut self) {
        self.0.stopped.store(true, Ordering::Relaxed);
        self.0.queue.close();
    }
}

impl Restorer<'_, '_> {
    /// The walk, from the root tree to the last directory's metadata.
    fn run(mut self, root: &BlobId) -> Result<RestoreSummary, RestoreError> {
        let walked = self.walk_all(root);
        if walked.is_err() {
            self.abandon_large();
        }
        walked?;
        Ok(self.summary)
    }

    fn walk_all(&mut self, root: &BlobId) -> Result<(), RestoreError> {
        let r = self;
        let tree = r.load_tree(root).map_err(|f| match f {
            Fail::Abort(e) => e,
            Fail::Entry(why) => RestoreError::RootTree { id: *root, why },
        })?;
        // Check every root name before writing anything: a hostile root name
        // refuses the whole snapshot rather than leaving half of it restored.
        let roots = tree
            .nodes
            .into_iter()
            .map(|node| match components(&node.name) {
                Some(comps) => Ok((comps, node)),
                None => Err(RestoreError::Escape {
                    path: String::from_utf8_lossy(&node.name).into_owned(),
                }),
            })
            .collect::<Result<Vec<_>, _>>()?;

        for (comps, node) in roots {
            if r.cancel.is_cancelled() {
                return Err(RestoreError::Cancelled);
            }
            match r.includes.pick(&comps) {
                Pick::Skip => {}
                pick => r.root(comps, node, pick)?,
            }
        }
        r.finish()?;

        let missing = r.includes.unmatched();
        if !missing.is_empty() {
            if missing.len() == r.includes.paths.len() {
                return Err(RestoreError::NotInSnapshot { paths: missing });
            }
            for path in missing {
                r.record(format!("{path}: not in the snapshot"));
            }
        }
        debug!(
            files = r.summary.files,
            dirs = r.summary.dirs,
            bytes = r.summary.bytes,
            errors = r.summary.errors,
            "restore finished"
        );
        Ok(())
    }
}

/// Why one entry was not restored, or why the whole restore stops.
enum Fail {
    /// This entry (and what is below it) is skipped; the restore goes on.
    Entry(String),
    /// The restore stops.
    Abort(RestoreError),
}

/// Makes an entry failure out of an I/O error.
fn io_fail<'p>(path: &'p Path, what: &'p str) -> impl FnOnce(io::Error) -> Fail + 'p {
    move |e| Fail::Entry(format!("{}: {what}: {e}", path.display()))
}

/// How much below a snapshot path is wanted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pick {
    /// Everything.
    All,
    /// Only what leads to a requested path (the path is its ancestor).
    Within,
    /// Nothing.
    Skip,
}

/// The requested snapshot paths, as components.
#[derive(Debug)]
struct Includes {
    paths: Vec<Vec<Vec<u8>>>,
    raw: Vec<String>,
    matched: Vec<bool>,
}

impl Includes {
    fn parse(raw: &[String]) -> Result<Self, RestoreError> {
        let paths = raw
            .iter()
            .map(|p| {
                components(p.as_bytes()).ok_or_else(|| RestoreError::BadInclude { path: p.clone() })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            matched: vec![false; paths.len()],
            paths,
            raw: raw.to_vec(),
        })
    }

    /// What to restore of the entry at snapshot path `path`.
    fn pick(&mut self, path: &[Vec<u8>]) -> Pick {
        if self.paths.is_empty() {
            return Pick::All;
        }
        let mut pick = Pick::Skip;
        for (include, matched) in self.paths.iter().zip(&mut self.matched) {
            if path.starts_with(include) {
                *matched = true;
                pick = Pick::All;
            } else if pick == Pick::Skip && include.starts_with(path) {
                pick = Pick::Within;
            }
        }
        pick
    }

    /// Requested paths that matched no entry.
    fn unmatched(&self) -> Vec<String> {
        self.raw
            .iter()
            .zip(&self.matched)
            .filter(|(_, matched)| !**matched)
            .map(|(raw, _)| raw.clone())
            .collect()
    }
}

/// Splits an absolute, normalised path into its components; `None` if it is
/// relative, contains NUL, or has a "." or ".." component. Repeated and
/// trailing slashes are harmless and accepted.
fn components(path: &[u8]) -> Option<Vec<Vec<u8>>> {
    if path.first() != Some(&b'/') || path.contains(&0) {
        return None;
    }
    path.split(|&b| b == b'/')
        .filter(|c| !c.is_empty())
        .map(|c| (c != b"." && c != b"..").then(|| c.to_vec()))
        .collect()
}

/// Whether `name` is exactly one path component that stays in its directory.
fn valid_name(name: &[u8]) -> bool {
    !name.is_empty() && name != b"." && name != b".." && !name.iter().any(|&b| b == b'/' || b == 0)
}

/// A directory whose entries are being restored.
struct Frame {
    /// Where it is restored.
    dir: PathBuf,
    /// Entries still to restore.
    nodes: std::vec::IntoIter<Node>,
    /// Its snapshot path, when only the way to some requested paths is
    /// wanted; `None` when everything below is.
    within: Option<Vec<Vec<u8>>>,
    /// Its own node, for the metadata applied at the end; `None` for the
    /// target itself (a backup of "/"), whose metadata is the caller's.
    meta: Option<Node>,
}

/// One restore's state, kept by the walker.
struct Restorer<'a, 'p> {
    key: &'a RepoKey,
    fetch: &'a mut dyn Fetch,
    progress: &'a mut dyn Progress,
    cancel: &'a Cancel,
    /// Canonical target directory.
    target: PathBuf,
    /// Running as root: devices can be created.
    is_root: bool,
    meta: Meta,
    includes: Includes,
    /// See [`RestoreOptions::strip_special`].
    strip_special: bool,
    summary: RestoreSummary,
    counters: Counters,
    /// First restored path of each multiply-linked file, by (device, inode)
    /// on the source.
    links: HashMap<(u64, u64), PathBuf>,
    /// Further names of multiply-linked files, linked once every file is
    /// written.
    hardlinks: Vec<(PathBuf, Node)>,
    /// The snapshot's symlinks, created after everything else.
    symlinks: Vec<(PathBuf, Node)>,
    /// Restored directories, children before parents, for their metadata.
    dirs: Vec<(PathBuf, Node)>,
    /// Entries of directories read ahead of the walk, by tree id.
    trees: HashMap<BlobId, Vec<Node>>,
    /// Files larger than one fetch whose parts are still being sent.
    large: VecDeque<Large>,
    /// The writers.
    pool: &'p Shared<'p>,
    /// Files the writers have finished.
    done: Receiver<Done>,
}

/// Takes out of `node` what could raise privileges on this host, counting
/// it in `stripped` with a sample naming `path`. Returns false when nothing
/// of the node is to be created at all (a device).
fn strip(node: &mut Node, path: &Path, stripped: &mut Stripped) -> bool {
    let mut left_out = Vec::new();
    if matches!(node.kind, NodeKind::CharDevice | NodeKind::BlockDevice) {
        stripped.devices += 1;
        sample(stripped, path, "device node not created");
        return false;
    }
    // A directory's setgid bit only makes new entries inherit its group.
    if node.kind == NodeKind::File && node.mode & SET_ID_BITS != 0 {
        node.mode &= !SET_ID_BITS;
        stripped.setid += 1;
        left_out.push("setuid/setgid bits");
    }
    // Only attributes that grant nothing are kept: capabilities, and the
    // security labels of SELinux or Smack (an exec label can move a program
    // into a privileged domain), and `trusted.*` stay with the host they
    // were taken on.
    let had_caps = node.xattrs.iter().any(|x| x.name == CAPABILITY_XATTR);
    let labels = node
        .xattrs
        .iter()
        .filter(|x| x.name != CAPABILITY_XATTR && !harmless_xattr(&x.name))
        .count();
    node.xattrs.retain(|x| harmless_xattr(&x.name));
    if had_caps {
        stripped.capabilities += 1;
        left_out.push("file capabilities");
    }
    if labels > 0 {
        stripped.labels += 1;
        left_out.push("security labels");
    }
    if !left_out.is_empty() {
        sample(
            stripped,
            path,
            &format!("{} removed", left_out.join(" and ")),
        );
    }
    true
}

/// Extended attributes another host's snapshot may bring: the user's own
/// and POSIX ACLs (which grant nothing the owner could not).
fn harmless_xattr(name: &[u8]) -> bool {
    name.starts_with(b"user.") || name.starts_with(b"system.posix_acl_")
}

fn sample(stripped: &mut Stripped, path: &Path, what: &str) {
    if stripped.samples.len() < ERROR_SAMPLES {
        stripped.samples.push(format!("{}: {what}", path.display()));
    }
}

impl Restorer<'_, '_> {
    /// Counts and logs an entry that was not (fully) restored.
    fn record(&mut self, why: String) {
        // Past the samples, the log would drown in one repeated cause.
        if self.summary.error_samples.len() < ERROR_SAMPLES {
            warn!("restore: {why}");
        } else {
            debug!("restore: {why}");
        }
        self.count(why);
    }

    /// Counts an entry that was not (fully) restored, without logging.
    fn count(&mut self, why: String) {
        self.summary.errors += 1;
        if self.summary.error_samples.len() < ERROR_SAMPLES {
            self.summary.error_samples.push(why);
        }
    }

    /// Records an entry failure and carries on; passes an abort up.
    fn settle<T>(&mut self, result: Result<T, Fail>) -> Result<Option<T>, RestoreError> {
        match result {
            Ok(v) => Ok(Some(v)),
            Err(Fail::Entry(why)) => {
                self.record(why);
                Ok(None)
            }
            Err(Fail::Abort(e)) => Err(e),
        }
    }

    /// Fetches blobs, telling a storage outage (stop) from missing blobs
    /// (this entry fails).
    fn fetch_blobs(&mut self, ids: &[BlobId]) -> Result<Vec<Vec<u8>>, Fail> {
        let blobs = self.fetch.get(ids).map_err(|e| {
            if e.retryable {
                Fail::Abort(RestoreError::Fetch(e))
            } else {
                Fail::Entry(format!("cannot fetch from storage: {e}"))
            }
        })?;
        if blobs.len() != ids.len() {
            return Err(Fail::Entry(format!(
                "storage returned {} blobs for {} ids",
                blobs.len(),
                ids.len()
            )));
        }
        Ok(blobs)
    }

    fn load_tree(&mut self, id: &BlobId) -> Result<Tree, Fail> {
        let sealed = self
            .fetch_blobs(std::slice::from_ref(id))?
            .pop()
            .unwrap_or_default();
        let plain = self
            .key
            .open(id, &sealed)
            .map_err(|e| Fail::Entry(e.to_string()))?;
        let tree: Tree = flotilla_protocol::decode(&plain, MAX_TREE)
            .map_err(|e| Fail::Entry(format!("tree {id:?} is malformed: {e}")))?;
        if tree.v == 0 || tree.v > REPO_FORMAT {
            return Err(Fail::Entry(format!(
                "tree {id:?} has format {} but this agent reads up to {REPO_FORMAT}; upgrade the agent",
                tree.v
            )));
        }
        Ok(tree)
    }

    /// A directory's entries; a tree that cannot be read is counted and
    /// treated as empty, so the directory itself is still restored.
    fn children(&mut self, subtree: Option<BlobId>, dir: &Path) -> Result<Vec<Node>, RestoreError> {
        let Some(id) = subtree else {
            return Ok(Vec::new());
        };
        if let Some(nodes) = self.trees.remove(&id) {
            return Ok(nodes);
        }
        let loaded = self.load_tree(&id).map_err(|f| match f {
            Fail::Entry(why) => {
                Fail::Entry(format!("{}: content not restored: {why}", dir.display()))
            }
            abort => abort,
        });
        Ok(self.settle(loaded)?.map(|t| t.nodes).unwrap_or_default())
    }

    /// Restores one root node: creates its parents, then it and what is below.
    fn root(&mut self, comps: Vec<Vec<u8>>, node: Node, pick: Pick) -> Result<(), RestoreError> {
        if pick == Pick::Within && node.kind != NodeKind::Dir {
            // A requested path below something that is not a directory.
            return Ok(());
        }
        let within = (pick == Pick::Within).then(|| comps.clone());
        let Some((name, parents)) = comps.split_last() else {
            // The backed-up path was "/": its entries go straight into the target.
            if node.kind != NodeKind::Dir {
                self.record("/: not restored: the snapshot says it is not a directory".into());
                return Ok(());
            }
            let target = self.target.clone();
            let nodes = self.children(node.subtree, &target)?;
            return self.walk(Frame {
                dir: target,
                nodes: nodes.into_iter(),
                within,
                meta: None,
            });
        };
        let mut dir = self.target.clone();
        for c in parents {
            dir.push(OsStr::from_bytes(c));
            // Not in the snapshot: plain directories, as `mkdir -p` makes them.
            let made = ensure_dir(&dir, 0o755).map_err(io_fail(&dir, "cannot create directory"));
            if self.settle(made)?.is_none() {
                return Ok(());
            }
        }
        if self.settle(check_dir(&dir))?.is_none() {
            return Ok(());
        }
        let path = dir.join(OsStr::from_bytes(name));
        if let Some(frame) = self.visit(path, node, within)? {
            self.walk(frame)?;
        }
        Ok(())
    }

    /// Restores everything below `first`, depth first. An explicit stack
    /// rather than recursion: a hostile snapshot can be deep.
    fn walk(&mut self, first: Frame) -> Result<(), RestoreError> {
        let mut stack = vec![first];
        while let Some(top) = stack.last_mut() {
            if self.cancel.is_cancelled() {
                return Err(RestoreError::Cancelled);
            }
            let Some(node) = top.nodes.next() else {
                if let Some(done) = stack.pop() {
                    if let Some(meta) = done.meta {
                        self.dirs.push((done.dir, meta));
                    }
                }
                continue;
            };
            if !valid_name(&node.name) {
                let name = String::from_utf8_lossy(&node.name);
                warn!(dir = %top.dir.display(), name = ?name, "skipping an entry whose name would leave its directory");
                let why = format!(
                    "{}/{name:?}: not restored: the name is not a single path component (damaged or hostile snapshot)",
                    top.dir.display()
                );
                // Logged above whatever the count: a sign of a hostile snapshot.
                self.count(why);
                continue;
            }
            let within = match &top.within {
                None => None,
                Some(comps) => {
                    let mut child = comps.clone();
                    child.push(node.name.clone());
                    match self.includes.pick(&child) {
                        Pick::All => None,
                        Pick::Within if node.kind == NodeKind::Dir => Some(child),
                        Pick::Within | Pick::Skip => continue,
                    }
                }
            };
            let path = top.dir.join(OsStr::from_bytes(&node.name));
            let read_ahead = top.within.is_none() && node.kind == NodeKind::Dir;
            if let Some(frame) = self.visit(path, node, within)? {
                stack.push(frame);
                if read_ahead {
                    if let Some(parent) = stack.len().checked_sub(2).and_then(|i| stack.get(i)) {
                        self.read_ahead(parent.nodes.as_slice());
                    }
                }
            }
        }
        Ok(())
    }

    /// Restores one entry; a directory comes back as a frame to walk.
    fn visit(
        &mut self,
        path: PathBuf,
        mut node: Node,
        within: Option<Vec<Vec<u8>>>,
    ) -> Result<Option<Frame>, RestoreError> {
        if self.strip_special {
            let rel = path
                .strip_prefix(&self.target)
                .unwrap_or(&path)
                .to_path_buf();
            if !strip(&mut node, &rel, &mut self.summary.stripped) {
                return Ok(None);
            }
        }
        let outcome = match node.kind {
            NodeKind::Dir => self.dir(path, node, within).map(Some),
            NodeKind::File => self.file(path, node).map(|()| None),
            NodeKind::Symlink => {
                self.symlinks.push((path, node));
                Ok(None)
            }
            NodeKind::Fifo | NodeKind::CharDevice | NodeKind::BlockDevice => {
                self.special(&path, &node).map(|()| None)
            }
            // A socket belongs to the process that listened on it: nothing to restore.
            NodeKind::Socket => Ok(None),
        };
        Ok(self.settle(outcome)?.flatten())
    }

    fn dir(
        &mut self,
        path: PathBuf,
        mut node: Node,
        within: Option<Vec<Vec<u8>>>,
    ) -> Result<Frame, Fail> {
        // Owner-only until its metadata is applied at the end: nobody else
        // sees the content while it is incomplete, and we can write into it.
        ensure_dir(&path, 0o700).map_err(io_fail(&path, "cannot create directory"))?;
        check_dir(&path)?;
        self.summary.dirs += 1;
        self.counters.dirs += 1;
        self.progress.update(&self.counters, &path);
        let nodes = self
            .children(node.subtree.take(), &path)
            .map_err(Fail::Abort)?;
        self.prefetch_for(&nodes);
        Ok(Frame {
            dir: path,
            nodes: nodes.into_iter(),
            within,
            meta: Some(node),
        })
    }

    /// Asks for what a directory with these entries will need: their
    /// subtrees and the content of their small files (larger files fetch
    /// ahead on their own).
    fn prefetch_for(&mut self, nodes: &[Node]) {
        let soon: Vec<(BlobId, u32)> = nodes
            .iter()
            .flat_map(|n| {
                let small = n.kind == NodeKind::File && n.size <= PREFETCH_FILE_MAX;
                let chunks = n
                    .content
                    .iter()
                    .filter(move |_| small)
                    .map(|c| (c.id, c.len));
                n.subtree.map(|t| (t, 0)).into_iter().chain(chunks)
            })
            .collect();
        if !soon.is_empty() {
            self.fetch.prefetch(&soon);
        }
    }

    /// Reads the trees of the next directories of `upcoming` (a directory's
    /// entries still to walk) and asks for what they will need, so their
    /// content is on its way before the walk gets there. A tree that cannot
    /// be read here is read again, and reported, when the walk gets there.
    fn read_ahead(&mut self, upcoming: &[Node]) {
        let ids: Vec<BlobId> = upcoming
            .iter()
            .filter(|n| n.kind == NodeKind::Dir)
            .filter_map(|n| n.subtree)
            .take(LOOKAHEAD_DIRS)
            .filter(|id| !self.trees.contains_key(id))
            .collect();
        for id in ids {
            if let Ok(tree) = self.load_tree(&id) {
                self.prefetch_for(&tree.nodes);
                self.trees.insert(id, tree.nodes);
            }
        }
    }

    /// Waits for the files, links the other names of multiply-linked files,
    /// creates the symlinks, then applies directory metadata, deepest first.
    fn finish(&mut self) -> Result<(), RestoreError> {
        self.drain()?;
        self.hard_links()?;
        let mut checked: Option<PathBuf> = None;
        for (path, node) in std::mem::take(&mut self.symlinks) {
            if self.cancel.is_cancelled() {
                return Err(RestoreError::Cancelled);
            }
            let made = self.symlink(&path, &node, &mut checked);
            if self.settle(made)?.is_some() {
                self.summary.symlinks += 1;
                self.progress.update(&self.counters, &path);
            }
        }
        for (path, node) in std::mem::take(&mut self.dirs) {
            // O_NOFOLLOW: a directory that became a symlink since is not
            // followed to apply a mode or owner somewhere else.
            let applied = OpenOptions::new()
                .read(true)
                .custom_flags((OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW).bits())
                .open(&path)
                .map_err(io_fail(&path, "cannot open directory to set its metadata"))
                .and_then(|dir| {
                    self.meta
                        .apply_fd(&dir, &node, &path)
                        .map_err(|e| Fail::Entry(e.to_string()))
                });
            self.settle(applied)?;
        }
        // Durability for everything written, in one call rather than an
        // fsync per file.
        if let Ok(dir) = fs::File::open(&self.target) {
            if let Err(e) = nix::unistd::syncfs(&dir) {
                self.record(format!(
                    "{}: cannot flush the restored files to disk: {e}",
                    self.target.display()
                ));
            }
        }
        Ok(())
    }
}
