//! The work itself, as plain synchronous code run on blocking threads.
//!
//! Engines report progress through [`Progress`] and stop early when their
//! [`Cancel`] flag is set; the agent implements `Progress` by publishing
//! `task.progress` events, tests implement it with a vector.

mod backup;
mod estimate;
mod restore;
mod roots;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

pub use backup::{
    backup, BackupOptions, BackupOutcome, CachedFile, FileCache, NoCache, Store, StoreError,
};
pub use estimate::estimate;
pub use restore::{restore, Fetch, FetchError, RestoreOptions};
pub use roots::{check_roots, RootBefore, RootRecord};

/// Below this much work (in bytes) [`on_two_threads`] stays on one thread.
const TWO_THREADS_MIN_BYTES: usize = 1024 * 1024;

/// `items.iter().map(work)`, in order, with the items split by `bytes` into
/// two halves worked on two threads when there is enough to do. Sealing and
/// opening blobs (zstd, AES-GCM) is where sources and restores spend their
/// CPU; the engine's own thread would otherwise leave the second core idle.
pub(crate) fn on_two_threads<T: Sync, R: Send>(
    items: &[T],
    bytes: impl Fn(&T) -> usize,
    work: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    let total: usize = items.iter().map(&bytes).sum();
    if items.len() < 2 || total < TWO_THREADS_MIN_BYTES {
        return items.iter().map(&work).collect();
    }
    let mut acc = 0;
    let mid = items
        .iter()
        .position(|item| {
            acc += bytes(item);
            acc >= total / 2
        })
        .map_or(items.len() / 2, |i| (i + 1).min(items.len() - 1));
    let (first, second) = items.split_at(mid);
    let work = &work;
    std::thread::scope(|scope| {
        let other = scope.spawn(move || second.iter().map(work).collect::<Vec<R>>());
        let mut out: Vec<R> = first.iter().map(work).collect();
        match other.join() {
            Ok(rest) => out.extend(rest),
            // The work itself never panics; if it did, surface it here.
            Err(panic) => std::panic::resume_unwind(panic),
        }
        out
    })
}

/// Counters of a running task, as shown to the user.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// Files seen.
    pub files: u64,
    /// Directories seen.
    pub dirs: u64,
    /// Bytes seen.
    pub bytes: u64,
}

/// Receives progress from an engine. Called often; implementations throttle.
pub trait Progress: Send {
    /// The engine has reached `current` with these totals so far.
    fn update(&mut self, counters: &Counters, current: &Path);
}

/// A progress sink that ignores everything.
#[derive(Debug, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn update(&mut self, _: &Counters, _: &Path) {}
}

/// A cancellation flag shared between the async world and an engine thread.
#[derive(Debug, Clone, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    /// Asks the engine to stop at the next opportunity.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// Whether stopping was asked for.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Resolves `requested` paths against the allowlisted `roots`.
///
/// Each path is made absolute and canonical (symlinks resolved) and must lie
/// inside one of the roots, which are canonical already. An empty request means
/// all roots. Returns the first path that is not allowed as the error.
pub fn resolve_within(
    requested: &[String],
    roots: &[PathBuf],
) -> Result<Vec<PathBuf>, PathRefused> {
    if requested.is_empty() {
        return Ok(roots.to_vec());
    }
    requested
        .iter()
        .map(|p| {
            let path = Path::new(p);
            if !path.is_absolute() {
                return Err(PathRefused::NotAbsolute(p.clone()));
            }
            let canonical = std::fs::canonicalize(path).map_err(|e| PathRefused::Unreadable {
                path: p.clone(),
                why: e.to_string(),
            })?;
            if roots.iter().any(|root| canonical.starts_with(root)) {
                Ok(canonical)
            } else {
                Err(PathRefused::OutsideRoots(p.clone()))
            }
        })
        .collect()
}

/// A requested path that may not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathRefused {
    /// Relative paths are ambiguous on the agent.
    #[error("path {0:?} is not absolute")]
    NotAbsolute(String),
    /// Not inside any configured root.
    #[error("path {0:?} is outside this agent's configured roots")]
    OutsideRoots(String),
    /// Cannot be resolved.
    #[error("path {path:?} cannot be resolved: {why}")]
    Unreadable {
        /// The path.
        path: String,
        /// Why.
        why: String,
    },
}

impl PathRefused {
    /// Whether this is a policy refusal (worth a security event) rather than a
    /// missing path.
    pub fn is_policy(&self) -> bool {
        matches!(self, PathRefused::OutsideRoots(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_outside_roots_and_symlink_escapes_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("sub")).expect("mkdir");
        std::os::unix::fs::symlink("/etc", root.join("escape")).expect("symlink");
        let roots = vec![std::fs::canonicalize(&root).expect("canonical")];
        let ok = root.join("sub").to_string_lossy().into_owned();
        assert!(resolve_within(&[ok], &roots).is_ok());
        let esc = root.join("escape").to_string_lossy().into_owned();
        assert!(matches!(
            resolve_within(&[esc], &roots),
            Err(PathRefused::OutsideRoots(_))
        ));
        let dotdot = root.join("sub/../..").to_string_lossy().into_owned();
        assert!(matches!(
            resolve_within(&[dotdot], &roots),
            Err(PathRefused::OutsideRoots(_))
        ));
        assert!(matches!(
            resolve_within(&["rel".into()], &roots),
            Err(PathRefused::NotAbsolute(_))
        ));
    }

    #[test]
    fn two_threads_keep_the_order_of_uneven_work() {
        // Sizes that put the byte midpoint far from the count midpoint.
        let items: Vec<usize> = (0..50)
            .map(|i| if i == 3 { 4 << 20 } else { 1000 + i })
            .collect();
        let out = on_two_threads(&items, |&n| n, |&n| n * 2);
        assert_eq!(out, items.iter().map(|n| n * 2).collect::<Vec<_>>());
        let small = on_two_threads(&[1usize, 2, 3], |&n| n, |&n| n + 1);
        assert_eq!(small, vec![2, 3, 4]);
        let none: Vec<usize> = on_two_threads(&[], |&n: &usize| n, |&n| n);
        assert!(none.is_empty());
    }
}
