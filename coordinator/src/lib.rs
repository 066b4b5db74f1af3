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
//! Modules (the crate's table of contents):
//!
//! - `cli`: flags and one module per subcommand; the daemon never imports it.
//! - `fleetops`: what the commands and the daemon both do (storage addresses,
//!   the repository key, repository queries, the keep-policy decision).
//! - `serve`: `flotilla serve`, a pure core and the driver that performs it.
//! - `config`: `flotilla.toml`, parsed once; `scheduler` (cron, due times) and
//!   `retention` (keep policies), both pure.
//! - `fleet` (the fleet directory and certificates), `nats` (connection and
//!   health records), `registry` (the daemon's live copy of the health
//!   bucket), `dispatch` (signed tasks and their events), `error` (errors and
//!   exit codes).
//!
//! Exported: what `main.rs` needs ([`run`], [`Cli`] with its parts, and
//! [`CliError`], the error `run` returns) and the [`Fleet`] directory the
//! benchmarks build their throwaway fleets with.

/// `println!` that ends the process quietly when stdout is closed (`| head`).
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cli::emit(format_args!($($arg)*))
    };
}

mod cli;
mod config;
mod dispatch;
mod doctor;
mod error;
mod fleet;
mod fleetops;
mod nats;
mod natsauth;
mod registry;
mod retention;
mod scheduler;
mod serve;

pub use cli::{run, Cli, Command, Global};
pub use error::CliError;
pub use fleet::{Fleet, FleetError, FleetFile};

/// Unix time now, in milliseconds.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
