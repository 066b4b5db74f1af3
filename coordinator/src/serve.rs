//! `flotilla serve`: the coordinator daemon.
//!
//! A pure core decides and a thin driver does the I/O:
//!
//! - [`core`] holds the decisions, with no I/O (tests drive it with a virtual
//!   clock): the queue, de-duplication, per-storage limits, retries with
//!   backoff, which `job.*` event a task's end raises, retention after a
//!   backup, schedules (due, catch-up once) and leadership;
//! - [`watchdog`] decides on missed heartbeats, missed RPOs, low space and
//!   version drift, each raised once and cleared once;
//! - [`driver`] owns NATS, the tick, the status bucket and `/metrics`, and
//!   performs the actions the core returns;
//! - [`lease`] is the leader lease in KV `flotilla-coordinator` (only the
//!   holder acts, so two daemons started by mistake never both dispatch); it
//!   opens its bucket again when a restarted server has lost it;
//! - [`state`] keeps what survives a restart (sled), behind the `Store` trait;
//! - [`notify`] delivers to webhooks, ntfy and healthchecks, with retries;
//! - [`metrics`] serves `/metrics` (`prometheus-client` over `hyper`);
//! - [`error`] says why the daemon could not start, with its exit code.
//!
//! Imports go one way: `driver` uses everything; `core` uses `lease` (what a
//! renewal saw), `watchdog` (its alerts) and `state`; none of those uses
//! `core` or `driver`.
//!
//! Schedules come from [`crate::scheduler`]; the operations the CLI shares
//! (storage address, repository key and queries, retention verdicts) from
//! [`crate::fleetops`].

mod core;
mod driver;
mod error;
mod lease;
mod metrics;
mod notify;
mod state;
mod watchdog;

pub use driver::run;
pub use error::ServeError;
