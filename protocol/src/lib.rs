//! Flotilla's wire protocol: everything two Flotilla processes say to each other.
//!
//! This crate is plain data and pure functions. It names every NATS subject
//! ([`subject`]), defines every message ([`Heartbeat`], [`TaskEnvelope`],
//! [`Event`], …), encodes them as MessagePack maps with named fields and a schema
//! version ([`encode`], [`decode`]), and signs and verifies tasks ([`sign_task`],
//! [`verify_task`]). It does no I/O and owns no runtime, so the agent, the
//! coordinator, the tests and the fuzzers all share one definition.
//!
//! ```
//! use flotilla_protocol::{decode, encode, limits, subject, HostName};
//!
//! let host = HostName::new("nas").unwrap();
//! assert_eq!(subject::task(&host), "flotilla.task.nas");
//!
//! let bytes = encode(&vec![1u32, 2, 3]).unwrap();
//! let back: Vec<u32> = decode(&bytes, limits::TASK_BYTES).unwrap();
//! assert_eq!(back, vec![1, 2, 3]);
//! ```
//!
//! The human documentation of the same facts is `docs/protocol.md`; a change
//! here changes that file too.

mod open_enum;

mod addr;
mod bundle;
mod codec;
mod event;
pub mod frame;
mod heartbeat;
mod host;
mod id;
pub mod keyfile;
pub mod limits;
pub mod permissions;
pub mod repo;
mod revocation;
pub mod status;
pub mod subject;
mod task;
pub mod text;
pub mod transfer;

pub use bundle::{format_creds, server_urls, Bundle, BundleError, BUNDLE_VERSION};
pub use codec::{decode, encode, DecodeError, EncodeError};
pub use event::{
    Event, EventBody, JobEnded, OfflineReason, RejectReason, Severity, TaskFinished, TaskOutcome,
    TaskProgress, EVENT_VERSION,
};
pub use heartbeat::{
    AgentState, Heartbeat, Role, RootKind, RootUsage, RunningJob, HEARTBEAT_VERSION,
};
pub use host::{HostName, HostNameError};
pub use id::{IdError, SnapshotId, TaskId};
pub use revocation::{
    RevocationError, RevocationList, RevokedCert, REVOCATION_BYTES, REVOCATION_VERSION,
};
pub use task::{
    check_epoch, sign_task, verify_task, verify_task_for_peer, BackupReport, CancelReport,
    CopyReport, DirUsage, EstimateReport, PublicKey, SigningSeed, TaskBody, TaskEnvelope, TaskKind,
    TaskResult, TaskVerifyError, CLOCK_SKEW_MS, COPY_REPORT_LISTED, TASK_VERSION,
};

/// Unix time in milliseconds, the one time representation on the wire.
pub type UnixMillis = u64;
