//! The daemon's view of the fleet's backups, kept in the `flotilla-status`
//! bucket (key `fleet`) for `flotilla status` and any dashboard.

use serde::{Deserialize, Serialize};

use crate::{codec, DecodeError, SnapshotId, TaskId, UnixMillis};

/// Version of [`FleetStatus`].
pub const STATUS_VERSION: u16 = 1;
/// Key-value bucket holding the status.
pub const STATUS_BUCKET: &str = "flotilla-status";
/// Key of the status in [`STATUS_BUCKET`].
pub const STATUS_KEY: &str = "fleet";

/// What `flotilla serve` knows about every plan and host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetStatus {
    /// Schema version, [`STATUS_VERSION`].
    pub v: u16,
    /// When the daemon wrote it.
    pub time: UnixMillis,
    /// One entry per plan and host.
    pub entries: Vec<PlanHostStatus>,
    /// Jobs queued (waiting for a slot or a retry).
    pub queued: u64,
}

/// One host's state within one plan.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanHostStatus {
    /// The plan.
    pub plan: String,
    /// The host.
    pub host: String,
    /// The storage host.
    pub storage: String,
    /// Last successful backup.
    pub last_success: Option<UnixMillis>,
    /// Its snapshot.
    pub last_snapshot: Option<SnapshotId>,
    /// Next scheduled run, if the plan has a schedule.
    pub next_run: Option<UnixMillis>,
    /// The recovery-point objective is missed.
    pub overdue: bool,
    /// Task running now for this plan and host.
    pub running_task: Option<TaskId>,
}

impl FleetStatus {
    /// Decodes the status, checking size and version.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let s: Self = codec::decode(bytes, 8 * 1024 * 1024)?;
        codec::check_version(s.v, STATUS_VERSION)?;
        Ok(s)
    }
}
