//! The Flotilla agent: the daemon that runs on every host of the fleet.
//!
//! It connects to the fleet's NATS server, announces itself and heartbeats its
//! health into the `flotilla-health` bucket, answers NATS micro discovery as
//! `flotilla-agent` with its host name as id, and takes signed tasks from its
//! durable JetStream consumer: it verifies each, journals it in sled, and runs
//! it, publishing progress and results as events.
//!
//! ```no_run
//! use flotilla_agent::{run, AgentConfig, Settings};
//! use tokio_util::sync::CancellationToken;
//!
//! # async fn demo() -> anyhow::Result<()> {
//! let settings = Settings::load(AgentConfig {
//!     bundle: Some("/etc/flotilla/bundle.toml".into()),
//!     state_dir: Some("/var/lib/flotilla-agent".into()),
//!     backup_roots: vec!["/srv".into()],
//!     ..Default::default()
//! })?;
//! run(settings, CancellationToken::new()).await?;
//! # Ok(())
//! # }
//! ```
//!
//! Layout: [`config`](AgentConfig) (flags and TOML), `bus` (NATS: connection,
//! events, health, discovery), `daemon` (lifecycle and shutdown order), `jobs`
//! (task intake and execution), `engine` (synchronous work on blocking
//! threads), `state` (sled), `health` (host readings), `transfer` (QUIC data
//! plane between agents: mutual TLS under the fleet CA, framing), [`repository`]
//! (the storage side: packs, indexes, snapshots, check).

mod bus;
mod config;
mod daemon;
pub mod engine;
mod health;
mod jobs;
mod remote;
pub mod repository;
mod state;
mod storage;
mod transfer;

pub use bus::{Bus, BusError};
pub use config::{AgentConfig, ConfigError, HumanDuration, Settings, DEFAULT_HEARTBEAT};
pub use daemon::{run, AgentError};
pub use state::{Accepted, JobStatus, JournalEntry, State, StateError};
pub use transfer::{
    peer_host, read_frame, read_frame_bytes, transport_config, write_frame, Identity,
    IncomingConnection, TransferEndpoint, TransferError, HANDSHAKE_TIMEOUT,
};

/// This agent's version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Unix time now, in milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
