//! Applying a node's metadata (owner, extended attributes, mode, times) to a
//! restored entry, never through a symlink.
//!
//! Files and directories get it through an open descriptor (`fchown`,
//! `fchmod`, `futimens`, `fsetxattr`), so the name cannot be swapped under
//! us. Symlinks and special files cannot be opened safely (opening a device
//! can have effects); they get it by path with the calls that do not follow
//! symlinks, right after this restore created them under a fresh name.
//!
//! Order matters: owner first, because `chown` clears set-id bits that the
//! mode then sets; times last, because the other changes do not touch mtime
//! but writing content does. Extended attributes are best effort: many
//! filesystems lack them or refuse some namespaces to non-root users, which
//! is worth a warning, not a failed file.

use std::ffi::OsStr;
use std::fs::{self, File, Permissions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use filetime::FileTime;
use flotilla_protocol::repo::{Node, NodeKind};
use tracing::{debug, warn};
use xattr::FileExt as _;

/// Applies metadata for one restore.
#[derive(Debug)]
pub(super) struct Meta {
    /// Give entries their recorded numeric owner and group (asked for, and
    /// running as root).
    owner: bool,
    /// An extended attribute failure was logged at warn already.
    xattr_warned: bool,
}

impl Meta {
    pub(super) fn new(owner: bool) -> Self {
        Self {
            owner,
            xattr_warned: false,
        }
    }

    /// Applies everything to an open file or directory. The error says what
    /// could not be set; the entry itself is in place either way.
    pub(super) fn apply_fd(&mut self, f: &File, node: &Node, path: &Path) -> Result<(), MetaError> {
        let mut failed = Vec::new();
        if self.owner {
            note(
                &mut failed,
                "owner",
                std::os::unix::fs::fchown(f, Some(node.uid), Some(node.gid)),
            );
        }
        for x in &node.xattrs {
            if let Err(e) = f.set_xattr(OsStr::from_bytes(&x.name), &x.value) {
                self.xattr_failed(path, &x.name, &e);
            }
        }
        note(
            &mut failed,
            "mode",
            f.set_permissions(Permissions::from_mode(node.mode & 0o7777)),
        );
        let times = filetime::set_file_handle_times(
            f,
            Some(file_time(node.atime_ns)),
            Some(file_time(node.mtime_ns)),
        );
        note(&mut failed, "times", times);
        outcome(path, failed)
    }

    /// Applies everything to a symlink or special file at `path`, which this
    /// restore just created there.
    pub(super) fn apply_path(&mut self, path: &Path, node: &Node) -> Result<(), MetaError> {
        let mut failed = Vec::new();
        if self.owner {
            note(
                &mut failed,
                "owner",
                std::os::unix::fs::lchown(path, Some(node.uid), Some(node.gid)),
            );
        }
        for x in &node.xattrs {
            // `xattr::set` is lsetxattr: it does not follow symlinks.
            if let Err(e) = xattr::set(path, OsStr::from_bytes(&x.name), &x.value) {
                self.xattr_failed(path, &x.name, &e);
            }
        }
        // A symlink's own mode means nothing on Linux, and chmod would follow
        // it. A special file is no symlink: we created it a moment ago.
        if node.kind != NodeKind::Symlink {
            note(
                &mut failed,
                "mode",
                fs::set_permissions(path, Permissions::from_mode(node.mode & 0o7777)),
            );
        }
        // utimensat with AT_SYMLINK_NOFOLLOW, right for both kinds.
        let times = filetime::set_symlink_file_times(
            path,
            file_time(node.atime_ns),
            file_time(node.mtime_ns),
        );
        note(&mut failed, "times", times);
        outcome(path, failed)
    }

    fn xattr_failed(&mut self, path: &Path, name: &[u8], e: &io::Error) {
        let name = String::from_utf8_lossy(name);
        if self.xattr_warned {
            debug!(path = %path.display(), %name, error = %e, "extended attribute not restored");
        } else {
            self.xattr_warned = true;
            warn!(
                path = %path.display(), %name, error = %e,
                "extended attribute not restored (further failures are logged at debug); the entries are restored without them"
            );
        }
    }
}

/// Metadata that could not be set on a restored entry; the entry itself is
/// in place.
#[derive(Debug, thiserror::Error)]
#[error("{}: restored without all its metadata ({})", path.display(), list(failed))]
pub(super) struct MetaError {
    /// The entry.
    pub path: PathBuf,
    /// Each part that failed, in the order they were tried (at least one).
    pub failed: Vec<PartFailed>,
}

/// One part of an entry's metadata that could not be set.
#[derive(Debug, thiserror::Error)]
#[error("{part}: {source}")]
pub(super) struct PartFailed {
    /// "owner", "mode" or "times".
    pub part: &'static str,
    /// What the system call said.
    #[source]
    pub source: io::Error,
}

fn list(failed: &[PartFailed]) -> String {
    failed
        .iter()
        .map(PartFailed::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn note(failed: &mut Vec<PartFailed>, part: &'static str, result: io::Result<()>) {
    if let Err(source) = result {
        failed.push(PartFailed { part, source });
    }
}

fn outcome(path: &Path, failed: Vec<PartFailed>) -> Result<(), MetaError> {
    if failed.is_empty() {
        Ok(())
    } else {
        Err(MetaError {
            path: path.to_path_buf(),
            failed,
        })
    }
}

/// A time in nanoseconds since the epoch, which may be before it.
pub(super) fn file_time(ns: i64) -> FileTime {
    let secs = ns.div_euclid(1_000_000_000);
    // rem_euclid is in 0..10^9, which fits.
    let nanos = u32::try_from(ns.rem_euclid(1_000_000_000)).unwrap_or(0);
    FileTime::from_unix_time(secs, nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_metadata_failure_names_the_entry_and_each_part_and_keeps_the_cause() {
        let mut failed = Vec::new();
        note(&mut failed, "owner", Err(io::Error::from_raw_os_error(1)));
        note(&mut failed, "mode", Ok(()));
        note(&mut failed, "times", Err(io::Error::from_raw_os_error(30)));
        let err = outcome(Path::new("/t/a"), failed).expect_err("two parts failed");
        assert_eq!(
            err.to_string(),
            format!(
                "/t/a: restored without all its metadata (owner: {}, times: {})",
                io::Error::from_raw_os_error(1),
                io::Error::from_raw_os_error(30)
            )
        );
        let first = &err.failed[0];
        assert_eq!(
            std::error::Error::source(first)
                .and_then(|e| e.downcast_ref::<io::Error>())
                .and_then(io::Error::raw_os_error),
            Some(1)
        );
        assert!(outcome(Path::new("/t/b"), Vec::new()).is_ok());
    }

    #[test]
    fn times_before_the_epoch_keep_their_nanoseconds() {
        let t = file_time(-1);
        assert_eq!((t.unix_seconds(), t.nanoseconds()), (-1, 999_999_999));
    }
}
