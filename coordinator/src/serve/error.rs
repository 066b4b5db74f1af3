//! Why `flotilla serve` could not start, each with the exit code it maps to.
//!
//! Once running, the daemon does not stop on errors: a failed dispatch is
//! retried, a lost bus is waited for, a failed write is logged. What is left
//! are the mistakes that make starting pointless, and each keeps its source.
//! (`flotilla.toml` is loaded, and its mistakes reported with exit code 2, by
//! the command before the daemon starts.)

use std::net::SocketAddr;
use std::path::PathBuf;

use super::lease::LeaseError;
use super::state::StateError;
use crate::error::{EXIT_FAILURE, EXIT_NATS};

/// `flotilla serve` cannot start (or cannot go on).
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The daemon's state database (sled) cannot be opened: another daemon
    /// uses the directory, it is not writable, or a newer flotilla wrote it.
    #[error("cannot open the daemon state in {}: {source}", dir.display())]
    State {
        /// `--state-dir`.
        dir: PathBuf,
        /// What sled (or the format check) said.
        source: StateError,
    },
    /// JetStream refused the lease bucket (is nats-server running with the
    /// configuration `flotilla nats-config` wrote?).
    #[error("{source}; is nats-server running with the fleet's configuration (`flotilla nats-config`), and has `flotilla doctor` run?")]
    Lease {
        /// What went wrong.
        #[from]
        source: LeaseError,
    },
    /// A subscription to the event subjects failed: the bus went away.
    #[error("cannot subscribe to {subject}: {source}; is nats-server running?")]
    Subscribe {
        /// The subject.
        subject: String,
        /// What the client said.
        source: async_nats::SubscribeError,
    },
    /// The `[metrics]` address cannot be listened on.
    #[error("cannot listen for /metrics on {addr} ([metrics] listen in flotilla.toml): {source}")]
    Metrics {
        /// The configured address.
        addr: SocketAddr,
        /// Why binding failed (in use, not an address of this host, …).
        source: std::io::Error,
    },
    /// SIGTERM cannot be watched, so the daemon could not stop cleanly.
    #[error("cannot watch for SIGTERM: {source}")]
    Signal {
        /// What the OS said.
        source: std::io::Error,
    },
}

impl ServeError {
    /// The process exit code: 5 when NATS (JetStream) cannot be used, 1 for
    /// anything else (a state database in use is not a usage error).
    pub fn exit_code(&self) -> u8 {
        match self {
            ServeError::Lease { .. } | ServeError::Subscribe { .. } => EXIT_NATS,
            ServeError::State { .. } | ServeError::Metrics { .. } | ServeError::Signal { .. } => {
                EXIT_FAILURE
            }
        }
    }

    /// Whether starting again later may succeed without changing anything:
    /// the bus may come back; a locked state directory or a taken port needs
    /// a person.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ServeError::Lease { .. } | ServeError::Subscribe { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::*;
    use crate::serve::state::ServeState;

    /// A state directory that cannot be opened (here: it is a file) is exit
    /// 1 with the directory in the message, not 2 ("usage").
    #[test]
    fn a_state_database_failure_is_exit_1_and_names_the_directory() {
        let tmp = tempfile::tempdir().expect("temporary directory");
        let dir = tmp.path().join("not-a-dir");
        std::fs::write(&dir, b"x").expect("write a file");
        let source = ServeState::open(&dir).expect_err("a file is no state directory");
        let e = ServeError::State {
            dir: dir.clone(),
            source,
        };
        assert_eq!(e.exit_code(), EXIT_FAILURE);
        assert!(!e.is_retryable());
        let text = e.to_string();
        assert!(
            text.starts_with("cannot open the daemon state in "),
            "{text}"
        );
        assert!(text.contains(&dir.display().to_string()), "{text}");
        assert!(
            std::error::Error::source(&e).is_some(),
            "the sled error is kept"
        );
    }

    #[test]
    fn jetstream_trouble_is_exit_5_and_retryable() {
        use async_nats::jetstream::context::{CreateKeyValueError, CreateKeyValueErrorKind};
        let e = ServeError::from(LeaseError::Bucket {
            source: CreateKeyValueError::new(CreateKeyValueErrorKind::TimedOut),
        });
        assert_eq!(e.exit_code(), EXIT_NATS);
        assert!(e.is_retryable());
        let text = e.to_string();
        assert!(text.contains("flotilla-coordinator"), "{text}");
        assert!(!text.contains('\n'), "{text}");
    }

    #[test]
    fn a_taken_metrics_port_is_exit_1_and_names_the_address() {
        let addr: SocketAddr = "127.0.0.1:9464".parse().expect("address");
        let e = ServeError::Metrics {
            addr,
            source: io::Error::new(io::ErrorKind::AddrInUse, "address in use"),
        };
        assert_eq!(e.exit_code(), EXIT_FAILURE);
        assert!(!e.is_retryable());
        assert_eq!(
            e.to_string(),
            "cannot listen for /metrics on 127.0.0.1:9464 ([metrics] listen in flotilla.toml): address in use"
        );
    }
}
