//! The Flotilla coordinator: the `flotilla` command.
//!
//! It owns the fleet's identity ([`Fleet`]: CA, task-signing key, repository
//! key), issues host bundles, reads the fleet's health from NATS, dispatches
//! signed tasks over JetStream and follows them through their events.
//!
//! ```no_run
//! use clap::Parser;
//! use flotilla_coordinator::{run, Cli};
//!
//! # async fn demo() {
//! let cli = Cli::parse_from(["flotilla", "--fleet", "/etc/flotilla/fleet", "hosts", "--json"]);
//! if let Err(e) = run(cli).await {
//!     eprintln!("flotilla: {e}");
//!     std::process::exit(e.exit_code().into());
//! }
//! # }
//! ```
//!
//! Layout: `cli` (flags and one module per subcommand), `fleet` (the fleet
//! directory and certificates), `nats` (connection and fleet registry),
//! `dispatch` (signed tasks and their events), `error` (errors and exit codes).

/// `println!` that ends the process quietly when stdout is closed (`| head`).
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cli::emit(format_args!($($arg)*))
    };
}

mod cli;
pub mod config;
mod dispatch;
mod error;
mod fleet;
mod fleetops;
mod nats;
mod registry;
pub mod retention;
pub mod scheduler;
mod serve;

pub use cli::{run, Cli, Command, Global, DEFAULT_NATS_URL};
pub use dispatch::{Dispatch, Outcome, SentTask, TASK_TTL};
pub use error::{
    CliError, EXIT_FAILURE, EXIT_HOST, EXIT_NATS, EXIT_OK, EXIT_PARTIAL, EXIT_TASK, EXIT_USAGE,
};
pub use fleet::{Fleet, FleetError, FleetFile, FLEET_VERSION};
pub use nats::{HostRecord, Nats, MISSED_HEARTBEATS};

/// Unix time now, in milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
