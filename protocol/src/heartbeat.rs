//! The health heartbeat every agent publishes to the health bucket.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::{codec, DecodeError, HostName, TaskId, UnixMillis};

/// Schema version of [`Heartbeat`].
pub const HEARTBEAT_VERSION: u16 = 1;

/// One agent's health, published every few seconds and kept as the latest value
/// under the host's key in the health bucket, so a host that went away stays
/// visible with its last known state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Schema version, [`HEARTBEAT_VERSION`].
    pub v: u16,
    /// The host this agent runs on.
    pub host: HostName,
    /// The fleet the agent is enrolled in.
    pub fleet: String,
    /// `online` while running; `offline` once, when it stops cleanly.
    pub state: AgentState,
    /// Agent version (semver).
    pub version: String,
    /// When the agent process started.
    pub started_at: UnixMillis,
    /// When this heartbeat was made.
    pub time: UnixMillis,
    /// Interval until the next heartbeat; three missed ones mean offline.
    pub interval_ms: u64,
    /// 1, 5 and 15 minute load averages of the host.
    pub load: [f32; 3],
    /// Resident memory of the agent process.
    pub rss_bytes: u64,
    /// Total memory of the host.
    pub mem_total_bytes: u64,
    /// Memory available to new work on the host.
    pub mem_available_bytes: u64,
    /// What this host does in the fleet.
    pub roles: Vec<Role>,
    /// QUIC address the agent serves for peers, if any.
    #[serde(default, with = "crate::addr::option")]
    pub quic_addr: Option<SocketAddr>,
    /// Free and total bytes of every configured root.
    pub roots: Vec<RootUsage>,
    /// Tasks running now.
    pub running: Vec<RunningJob>,
    /// The agent's state epoch: random, made when its state directory was
    /// created, so a new value means the state (and the task journal that
    /// recognises replays) was lost. Coordinators stamp it into the tasks
    /// they send ([`crate::TaskBody::epoch`]). Absent from agents that
    /// predate it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
}

/// Lifecycle state an agent reports about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentState {
    /// Running and heartbeating.
    Online,
    /// Stopped cleanly; no further heartbeats.
    Offline,
}

/// A role an agent plays, derived from its configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Has backup roots: its files can be backed up.
    Source,
    /// Keeps a repository (`--storage`).
    Storage,
    /// Has restore roots: snapshots can be restored onto it.
    Restore,
}

/// Which configured root a [`RootUsage`] describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RootKind {
    /// A `--backup-root`.
    Backup,
    /// The `--storage` directory.
    Storage,
    /// A `--restore-root`.
    Restore,
}

/// Disk usage of one configured root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootUsage {
    /// Which kind of root.
    pub kind: RootKind,
    /// The path as configured.
    pub path: String,
    /// Bytes available to the agent.
    pub free_bytes: u64,
    /// Size of the filesystem.
    pub total_bytes: u64,
    /// Set when the root could not be measured (missing, unreadable).
    pub error: Option<String>,
}

/// A task that is running on the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningJob {
    /// The task id.
    pub task_id: TaskId,
    /// The task kind, e.g. `estimate`.
    pub kind: String,
    /// When it started.
    pub started_at: UnixMillis,
}

impl Heartbeat {
    /// Decodes a heartbeat from the health bucket, checking size and version.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let hb: Self = codec::decode(bytes, crate::limits::HEARTBEAT_BYTES)?;
        codec::check_version(hb.v, HEARTBEAT_VERSION)?;
        Ok(hb)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heartbeat(epoch: Option<u64>) -> Heartbeat {
        Heartbeat {
            v: HEARTBEAT_VERSION,
            host: HostName::new("alpha").expect("valid"),
            fleet: "f".into(),
            state: AgentState::Online,
            version: "0.1.0".into(),
            started_at: 1,
            time: 2,
            interval_ms: 1000,
            load: [0.0; 3],
            rss_bytes: 0,
            mem_total_bytes: 0,
            mem_available_bytes: 0,
            roles: vec![Role::Source],
            quic_addr: None,
            roots: Vec::new(),
            running: Vec::new(),
            epoch,
        }
    }

    #[test]
    fn the_epoch_round_trips_and_is_optional_both_ways() {
        let with = heartbeat(Some(0xdead_beef_0123_4567));
        let bytes = codec::encode(&with).expect("encodes");
        assert_eq!(Heartbeat::decode(&bytes).expect("decodes"), with);

        // An agent that predates epochs writes none: it decodes as `None`,
        // and a heartbeat without one encodes as such an agent's did.
        let without = heartbeat(None);
        let bytes = codec::encode(&without).expect("encodes");
        let map: serde_json::Value = rmp_serde::from_slice(&bytes).expect("a msgpack map");
        assert!(map.get("epoch").is_none(), "{map}");
        assert_eq!(Heartbeat::decode(&bytes).expect("decodes").epoch, None);
    }
}
