//! Fault injection against a real fleet: the `chaos` binary.
//!
//! Each trial builds a fresh world with the end-to-end harness
//! (`flotilla-tests`): a private nats-server, a fleet made by `flotilla
//! init`, a storage agent `nas` and source agents holding deterministic
//! random data (100–200 MiB: a backup takes seconds in a debug build),
//! sometimes `flotilla serve`. It injects one fault at a random moment of a
//! backup, restore or prune, lets the fleet recover, and checks the pass
//! criteria every trial shares (`World::verify`):
//!
//! - every snapshot committed before or during the fault restores byte for
//!   byte (the sources' data never changes during a trial);
//! - `check --read-data` passes (bit-rot: see its scenario);
//! - the interrupted job completes by resume or retry within a bound, or
//!   fails with a clear message and event;
//! - no process hangs: every CLI call has a deadline, and running past it
//!   fails the trial;
//! - every task ends with exactly one `task.finished`.
//!
//! Random choices come from a seed printed with every trial, so a failure
//! can be replayed (`--scenarios NAME --only K --seed S`).
//!
//! ```text
//! chaos --quick                         # CI: a trial or two of each
//! chaos --trials 50 --scenarios kill-source,kill-nats --report out.md
//! ```
//!
//! Codemap: `scenarios.rs` the list and what the kill scenarios share,
//! one file per scenario under `scenarios/`; `world.rs` the fleet of a
//! trial and the checks; `trial.rs` seeds, notes, results; `tmpfs.rs` the
//! full disk; network namespaces, nftables drops and tbf caps come from
//! `flotilla_tests::netns` (the end-to-end tests use them too);
//! `delay.rs` the UDP delay proxy; `eio.rs` and `shim/eio.c` EIO on the
//! repository; `runner.rs` the loop; `report.rs` the table.

mod delay;
mod eio;
use flotilla_tests::netns as net;
mod report;
mod runner;
mod scenarios;
mod tmpfs;
mod trial;
mod world;

pub use report::{markdown, median, one_line, rows, text_table, Row};
pub use runner::{run, Config};
pub use scenarios::{by_name, Scenario, ALL};
pub use trial::{trial_seed, Outcome, Trial, TrialResult, Verdict};
pub use world::{Moment, Source, Spec, World};
