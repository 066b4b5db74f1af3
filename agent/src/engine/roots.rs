//! Whether a backup path lost its files since the last backup.
//!
//! A disk that is not mounted leaves its mount point an empty directory (or
//! the directory beneath, with whatever was there before the mount). Backing
//! that up "succeeds" with an empty snapshot, and a keep policy then counts it
//! as one of the snapshots to keep and pushes a good one out. So before a
//! commit, what the walk saw of each path ([`RootSeen`]) is compared with
//! what the last committed backup into the same repository saw of it
//! ([`RootBefore`], from the file cache): a path that is empty now but held
//! files then, or that was a mount point then and is not now, fails the
//! backup ([`RootGone`]) unless the task says `allow_empty`.
//!
//! "Mount point" means: on another device than its parent directory. A bind
//! mount of a directory of the same file system is not one by that rule.

use std::collections::HashMap;
use std::fs::{self, Metadata};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What a backup's walk saw of one of its paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootSeen {
    /// The path (canonical).
    pub path: PathBuf,
    /// Regular files found beneath it (excluded ones not counted).
    pub files: u64,
    /// Whether it is on another device than its parent directory.
    pub mount_point: bool,
}

/// What the file cache keeps of a path of the last committed backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootRecord {
    /// Regular files the walk found beneath it.
    pub files: u64,
    /// Whether it was a mount point.
    pub mount_point: bool,
}

impl From<&RootSeen> for RootRecord {
    fn from(seen: &RootSeen) -> Self {
        RootRecord {
            files: seen.files,
            mount_point: seen.mount_point,
        }
    }
}

/// What is known of a path from the last backup into the same repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RootBefore {
    /// Files it held (at least; a cache without a record of the path counts
    /// only the files it kept, which leaves out ones changed just before).
    pub files: u64,
    /// Whether it was a mount point; `None` when the cache does not say
    /// (written by an agent that did not record it, or the path was not
    /// itself a path of the last backup).
    pub mount_point: Option<bool>,
}

/// A path that looks like a disk that is not mounted. Permanent: the same
/// backup fails the same way until the disk is back or the task allows it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RootGone {
    /// Empty now, not at the last backup.
    #[error(
        "{path} is empty but held {files} files at the last backup; is its disk mounted? \
         run with --allow-empty to back it up anyway"
    )]
    Empty {
        /// The path.
        path: String,
        /// Files it held at the last backup.
        files: u64,
    },
    /// A mount point at the last backup, on its parent's device now.
    #[error(
        "{path} was a mount point at the last backup and is not one now; is its disk mounted? \
         run with --allow-empty to back it up anyway"
    )]
    Unmounted {
        /// The path.
        path: String,
    },
}

/// Whether `path` (with metadata `meta`) is on another device than its
/// parent. `/` and a parent that cannot be read count as not.
pub fn is_mount_point(path: &Path, meta: &Metadata) -> bool {
    path.parent()
        .and_then(|parent| fs::symlink_metadata(parent).ok())
        .is_some_and(|parent| parent.dev() != meta.dev())
}

/// Checks every path a backup walked against what the last backup saw of
/// it; the first that lost its files or its mount is the error.
pub fn check_roots(
    seen: &[RootSeen],
    before: &HashMap<PathBuf, RootBefore>,
) -> Result<(), RootGone> {
    for root in seen {
        let Some(was) = before.get(&root.path) else {
            continue;
        };
        let path = root.path.display().to_string();
        if root.files == 0 && was.files > 0 {
            return Err(RootGone::Empty {
                path,
                files: was.files,
            });
        }
        // Files are there, but not the file system they were on: what is
        // left in the directory beneath the mount.
        if was.mount_point == Some(true) && !root.mount_point {
            return Err(RootGone::Unmounted { path });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(path: &str, files: u64, mount_point: bool) -> RootSeen {
        RootSeen {
            path: path.into(),
            files,
            mount_point,
        }
    }

    fn before(entries: &[(&str, u64, Option<bool>)]) -> HashMap<PathBuf, RootBefore> {
        entries
            .iter()
            .map(|&(p, files, mount_point)| (p.into(), RootBefore { files, mount_point }))
            .collect()
    }

    #[test]
    fn a_path_that_held_files_and_is_empty_now_fails_with_how_to_proceed() {
        let err = check_roots(
            &[seen("/srv/a", 3, false), seen("/srv/photos", 0, false)],
            &before(&[("/srv/a", 3, Some(false)), ("/srv/photos", 1234, None)]),
        )
        .expect_err("an emptied path");
        assert_eq!(
            err,
            RootGone::Empty {
                path: "/srv/photos".into(),
                files: 1234
            }
        );
        assert_eq!(
            err.to_string(),
            "/srv/photos is empty but held 1234 files at the last backup; is its disk \
             mounted? run with --allow-empty to back it up anyway"
        );
    }

    #[test]
    fn a_mount_point_that_is_not_one_now_fails_even_with_files() {
        let err = check_roots(
            &[seen("/mnt/disk", 2, false)],
            &before(&[("/mnt/disk", 500, Some(true))]),
        )
        .expect_err("unmounted");
        assert_eq!(
            err,
            RootGone::Unmounted {
                path: "/mnt/disk".into()
            }
        );
        assert!(err.to_string().contains("--allow-empty"), "{err}");
    }

    #[test]
    fn what_was_empty_or_unknown_or_still_there_passes() {
        let cases = [
            // Still there, mounted or not as before.
            (seen("/a", 5, true), Some(("/a", 9, Some(true)))),
            (seen("/a", 1, false), Some(("/a", 9, Some(false)))),
            // Empty then and now.
            (seen("/a", 0, false), Some(("/a", 0, Some(false)))),
            // Mounted now, not then (a disk added).
            (seen("/a", 0, true), Some(("/a", 0, Some(false)))),
            // Mount unknown, files still there.
            (seen("/a", 1, false), Some(("/a", 9, None))),
            // Never backed up into this repository (or its cache was lost).
            (seen("/a", 0, false), None),
        ];
        for (now, then) in cases {
            let then = before(&then.into_iter().collect::<Vec<_>>());
            assert_eq!(
                check_roots(std::slice::from_ref(&now), &then),
                Ok(()),
                "{now:?} {then:?}"
            );
        }
    }

    #[test]
    fn a_directory_is_a_mount_point_only_on_another_device() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sub = dir.path().join("sub");
        fs::create_dir(&sub).expect("mkdir");
        let meta = fs::symlink_metadata(&sub).expect("stat");
        assert!(!is_mount_point(&sub, &meta), "same device as its parent");
        let root = fs::symlink_metadata("/").expect("stat");
        assert!(!is_mount_point(Path::new("/"), &root), "/ has no parent");
        // /proc is its own file system wherever these tests run on Linux.
        if let Ok(proc) = fs::symlink_metadata("/proc") {
            if fs::symlink_metadata("/").is_ok_and(|r| r.dev() != proc.dev()) {
                assert!(is_mount_point(Path::new("/proc"), &proc));
            }
        }
    }
}
