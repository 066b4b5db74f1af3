//! End-to-end harness: a real `nats-server`, real `flotilla-agent` processes and
//! the real `flotilla` CLI, each test in its own temporary world.
//!
//! Every test starts its own [`NatsServer`] (free loopback port, JetStream in a
//! temporary directory) and its own [`Fleet`] (made by `flotilla init`), so tests
//! are independent and run in parallel. Everything is cleaned up on `Drop`:
//! agents are killed, the fleet directory removed, the server stopped. When a
//! test fails, every agent log and the server log are printed with it.
//!
//! The binaries are not built by `cargo test` for us: run
//! `cargo build --workspace --bins` first, or point `FLOTILLA_BIN_DIR` at them.
//! `NATS_SERVER_BIN` overrides the `nats-server` found on `PATH`.
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use flotilla_tests::{Fleet, NatsServer, STARTUP_TIMEOUT};
//!
//! # fn main() -> anyhow::Result<()> {
//! let nats = NatsServer::start()?;
//! let fleet = Fleet::init(&nats)?;
//! let mut agent = fleet.start_agent("alpha")?;
//! fleet.wait_online(&["alpha"], STARTUP_TIMEOUT);
//!
//! let out = fleet.cli(["estimate", "alpha", "--json"])?;
//! assert_eq!(out.code, Some(0), "{out}");
//!
//! agent.sigterm()?;
//! assert!(agent.wait_exit(Duration::from_secs(10))?.success());
//! # Ok(())
//! # }
//! ```
//!
//! Codemap: `nats.rs` the server; `fleet.rs` the fleet directory, the CLI and
//! polling; `agent.rs` agent processes; `process.rs` finding binaries and running
//! them with a deadline; `bus.rs` speaking NATS directly (pings, forged tasks);
//! `files.rs` test data on disk; `dataplane.rs` backup, restore, snapshots and
//! check through the CLI; `serve.rs` the `flotilla serve` daemon, a webhook
//! receiver and `/metrics` scraping; `sshd.rs` a real OpenSSH server in a
//! private mount namespace to deploy agents through; `tree.rs` pseudo-random
//! data and comparing restored trees with their originals.

mod agent;
mod bus;
mod dataplane;
mod files;
mod fleet;
mod nats;
pub mod netns;
mod process;
mod serve;
mod sshd;
mod tree;

pub use agent::{Agent, AgentBuilder};
pub use bus::{connect, connect_as, now_ms, ping_agents, ping_ids, publish_task, random_seed};
pub use dataplane::{check_report, json_values, summaries, summary_of, DATA_TIMEOUT};
pub use files::{read_lossy, write_bytes, write_file, DirStats};
pub use fleet::{
    summarize_events, summarize_hosts, Fleet, CLI_TIMEOUT, EVENT_TIMEOUT, POLL, STARTUP_TIMEOUT,
};
pub use nats::{free_port, NatsServer};
pub use process::{binaries, Binaries, CliOutput, CliProcess};
pub use serve::{flotilla_cli, parse_prometheus, scrape_metrics, Sample, Serve, Webhook};
pub use sshd::Sshd;
pub use tree::{
    allocated_bytes, flip_byte, largest_file, pack_entries, pack_files, random_bytes,
    restored_path, same_contents, tree_differences, write_random, Compare, PackEntry, XorShift,
};
