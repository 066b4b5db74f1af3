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
//! Modules (the crate's table of contents; dependencies point downwards):
//!
//! - `daemon`: startup, the loops, shutdown order; builds the shared
//!   `jobs::Agent` and the data-plane server's narrow context.
//! - `jobs`: task intake (verify, journal, acknowledge), the task lifecycle as
//!   pure decisions (`jobs/lifecycle.rs`), resume at startup, and one runner
//!   per task kind (`jobs/backup.rs`, `restore.rs`, `check.rs`, `prune.rs`,
//!   `repair.rs`).
//! - `transfer`: the whole QUIC data plane: TLS identity, endpoint, frames,
//!   the client side of a session (`transfer/client.rs`), the storage side
//!   (`transfer/server.rs`) and what live sessions rely on (`claims.rs`).
//! - `bus`: NATS: connection, streams, events, health bucket, discovery
//!   (`bus/micro.rs`) and the read-only repository queries (`bus/queries.rs`).
//! - `engine`: synchronous backup, restore and estimate on blocking threads,
//!   and the check that a path did not empty since its last backup.
//! - [`repository`]: the storage side on disk: packs, indexes, snapshots,
//!   check, prune, the record of damaged copies and repair. Never sees a
//!   repository key.
//! - `state`: sled: the task journal, and the file cache beside it.
//! - `recover`: `flotilla-agent recover`, listing and restoring a
//!   repository's snapshots straight from its directory, with no bus,
//!   coordinator or other agent (a [`repository::RepositoryReader`], the
//!   restore engine, the key from a key file, a bundle or `repo.key`).
//! - `config` ([`AgentConfig`], [`Settings`]), `health` (host readings),
//!   `memory` (freed heap given back after tasks and on a timer).
//!
//! Exported: what `main.rs` and other crates use (the benchmarks dial with
//! [`TransferEndpoint`] and simulate agents with [`Bus`]), with the error
//! and helper types of their signatures; [`repository`] is public as the
//! storage format's documented reader and writer.

mod bus;
mod config;
mod daemon;
mod engine;
mod health;
mod jobs;
mod memory;
mod recover;
pub mod repository;
mod revocation;
mod state;
mod transfer;

pub use bus::{Bus, BusError};
pub use config::{AgentConfig, ConfigError, HumanDuration, Settings};
pub use daemon::{run, AgentError};
pub use memory::limit_arenas;
pub use recover::{recover, RecoverArgs, RecoverError};
pub use transfer::{Identity, IncomingConnection, TransferEndpoint, TransferError};

/// This agent's version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Unix time now, in milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
