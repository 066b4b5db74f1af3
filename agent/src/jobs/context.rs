//! [`Agent`]: what the task runners share, built by the daemon at startup.
//!
//! Only `jobs/` extends it with behaviour (intake, the runners); the daemon
//! reads its fields for heartbeats and hands the data-plane server a narrow
//! [`crate::transfer::server::ServerContext`] instead of the whole of it.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use flotilla_protocol::repo::RepoKey;
use flotilla_protocol::{RunningJob, TaskId};

use crate::bus::Bus;
use crate::config::Settings;
use crate::engine::Cancel;
use crate::repository::Repository;
use crate::state::State;
use crate::transfer::{Claims, TransferEndpoint};

/// Tasks running now, with their cancellation flags; read by heartbeats.
pub(crate) type Running = Arc<Mutex<HashMap<TaskId, (RunningJob, Cancel)>>>;

/// What every part of the running agent shares.
#[derive(Debug)]
pub(crate) struct Agent {
    pub settings: Settings,
    pub state: State,
    pub bus: Bus,
    pub running: Running,
    /// When this process started (heartbeats carry it).
    pub started_at: u64,
    /// QUIC endpoint (serves peers when `--listen` is set; always dials).
    pub endpoint: Option<Arc<TransferEndpoint>>,
    /// The repository, on storage hosts.
    pub repo: Option<Arc<Repository>>,
    /// The repository key, when the bundle carries it.
    pub repo_key: Option<Arc<RepoKey>>,
    /// The QUIC address peers reach this agent at.
    pub quic_addr: Option<SocketAddr>,
    /// What live data-plane sessions rely on (storage hosts); prune asks it.
    pub claims: Arc<Claims>,
    /// Tasks a signed `cancel` task asked to stop (as opposed to shutdown).
    pub cancelled: Mutex<HashSet<TaskId>>,
}
