//! Errors of the repository, classified for retries and for the wire.

use std::io;
use std::path::PathBuf;

use flotilla_protocol::repo::BlobId;
use nix::errno::Errno;

/// Something the repository could not do.
///
/// [`code`](Self::code) is the `code` of a data-plane `Response::Error`;
/// [`is_retryable`](Self::is_retryable) says whether the same request may
/// succeed later without anyone changing anything.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    /// A blob or snapshot is not in the repository.
    #[error("{what} not found in the repository")]
    NotFound {
        /// What was looked for, e.g. `blob 3fa4…` or `snapshot 12ab`.
        what: String,
    },
    /// A snapshot with this id is already committed; snapshots are never
    /// overwritten.
    #[error(
        "snapshot {id} already exists; snapshots are never overwritten, commit under a new id"
    )]
    Exists {
        /// The snapshot id.
        id: String,
    },
    /// A snapshot references blobs the repository does not hold.
    #[error("snapshot references {count} blobs the repository lacks (first {first}); upload them before committing")]
    MissingBlobs {
        /// How many are missing.
        count: usize,
        /// The first missing one.
        first: BlobId,
    },
    /// The request is malformed: bad id, oversized blob, ambiguous prefix.
    #[error("invalid {what}: {reason}")]
    Invalid {
        /// What was invalid.
        what: String,
        /// Why.
        reason: String,
    },
    /// The repository's format is newer than this build.
    #[error("repository {path} has format version {found}, this build reads up to {supported}: upgrade flotilla-agent")]
    UnsupportedVersion {
        /// The config file.
        path: PathBuf,
        /// Version found.
        found: u16,
        /// Newest version this build reads.
        supported: u16,
    },
    /// The directory holds files but is not a Flotilla repository.
    #[error("{path} is not empty and holds no flotilla repository (no config); choose an empty or new directory")]
    NotARepository {
        /// The directory.
        path: PathBuf,
    },
    /// Another process has the repository open.
    #[error("repository {path} is in use by another process (lock held); stop the other flotilla-agent first")]
    Locked {
        /// The lock file.
        path: PathBuf,
    },
    /// Stored bytes are damaged (bit rot, truncation, tampering).
    #[error("corrupt {path}: {reason}; run `flotilla check --read-data` on this repository")]
    Corrupt {
        /// The file concerned.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A pack writer failed earlier; what it held was discarded.
    #[error("pack writer failed earlier and discarded its open pack; send the stream again")]
    WriterFailed,
    /// The file system refused.
    #[error("cannot {action} {path}: {source}")]
    Io {
        /// What was being done, e.g. `write`.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

impl RepoError {
    /// Machine-readable code, as in the data plane's `Response::Error`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NotFound { .. } => "not_found",
            Self::Exists { .. } => "exists",
            Self::MissingBlobs { .. } => "missing_blobs",
            Self::Invalid { .. }
            | Self::UnsupportedVersion { .. }
            | Self::NotARepository { .. } => "invalid",
            Self::Corrupt { .. } => "corrupt",
            Self::Locked { .. } | Self::WriterFailed | Self::Io { .. } => "io",
        }
    }

    /// Whether the same request may succeed later by itself.
    ///
    /// A full disk, a read-only mount or a permission problem needs a person,
    /// so retrying on a timer only repeats the failure; interrupted or
    /// timed-out I/O, a busy host (EMFILE, ENOMEM) or a flaky network mount
    /// (EIO, ESTALE) may clear up. A failed writer is retryable because the
    /// client resends the stream to a new writer.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Io { source, .. } => io_is_transient(source),
            Self::WriterFailed => true,
            _ => false,
        }
    }

    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Self::Io {
            action,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn corrupt(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Self::Corrupt {
            path: path.into(),
            reason: reason.into(),
        }
    }

    pub(crate) fn invalid(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid {
            what: what.into(),
            reason: reason.into(),
        }
    }
}

/// Whether an I/O error may clear up by itself.
fn io_is_transient(e: &io::Error) -> bool {
    if let Some(raw) = e.raw_os_error() {
        let permanent = [
            Errno::ENOSPC,
            Errno::EDQUOT,
            Errno::EROFS,
            Errno::EACCES,
            Errno::EPERM,
            Errno::ENOENT,
            Errno::ENOTDIR,
            Errno::EISDIR,
            Errno::EFBIG,
            Errno::ENAMETOOLONG,
            Errno::EXDEV,
            Errno::EINVAL,
        ];
        return !permanent.iter().any(|p| *p as i32 == raw);
    }
    matches!(
        e.kind(),
        io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classification() {
        let full = RepoError::io(
            "write",
            "/r/tmp/x",
            io::Error::from_raw_os_error(Errno::ENOSPC as i32),
        );
        assert!(!full.is_retryable());
        assert_eq!(full.code(), "io");
        assert!(full.to_string().contains("/r/tmp/x"));
        let eio = RepoError::io(
            "read",
            "/r/p",
            io::Error::from_raw_os_error(Errno::EIO as i32),
        );
        assert!(eio.is_retryable());
        let missing = RepoError::MissingBlobs {
            count: 2,
            first: BlobId([0; 32]),
        };
        assert_eq!(missing.code(), "missing_blobs");
        assert!(!missing.is_retryable());
        assert_eq!(RepoError::corrupt("/p", "x").code(), "corrupt");
        assert_eq!(RepoError::Exists { id: "a".into() }.code(), "exists");
        assert_eq!(
            RepoError::NotFound {
                what: "blob".into()
            }
            .code(),
            "not_found"
        );
        assert_eq!(RepoError::invalid("id", "bad").code(), "invalid");
    }
}
