//! `flotilla-bench`: the measurements `bench/run.sh` cannot make from outside.
//!
//! - `transport`: bytes through one QUIC connection between two endpoints built
//!   exactly as agents build them, with 1, 4, … streams, against one plain TCP
//!   connection on loopback (the data plane's ceiling).
//! - `fleet`: N simulated agents in this one process, each with its own
//!   enrolled identity and NATS connection, against a real nats-server and a
//!   real `flotilla serve`; then a fleet-wide `flotilla backup --wait`.
//!
//! Human progress goes to stderr; stdout gets one JSON object at the end, for
//! `bench/report.py`. See `docs/benchmarks.md`.
//!
//! ```text
//! flotilla-bench transport --bytes 1GiB --streams 1,4 > transport.json
//! flotilla-bench fleet --agents 1000 --nats nats://127.0.0.1:4222 --fleet DIR \
//!     --flotilla target/release/flotilla --config flotilla.toml --serve-pid PID \
//!     --metrics http://127.0.0.1:9184/metrics > fleet.json
//! ```

mod fleet;
mod proc;
mod transport;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Flotilla's benchmark driver: transport ceiling and fleet scale.
#[derive(Debug, Parser)]
#[command(name = "flotilla-bench", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The measurements.
#[derive(Debug, Subcommand)]
enum Command {
    /// QUIC between two agents' endpoints (1, 4, … streams) vs one TCP connection, on loopback.
    Transport(transport::TransportArgs),
    /// N simulated agents against real NATS and `flotilla serve`, then a fleet-wide backup.
    Fleet(fleet::FleetArgs),
}

/// A finished measurement: its JSON report and whether it met its targets.
#[derive(Debug)]
struct Outcome {
    report: serde_json::Value,
    ok: bool,
}

/// Exit code when the measurement could not be made at all (as opposed to 1:
/// made, but a target was missed).
const EXIT_ERROR: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("flotilla-bench: cannot start the tokio runtime: {e}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(outcome) => {
            println!("{}", outcome.report);
            if outcome.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("flotilla-bench: {e:#}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

async fn run(command: Command) -> anyhow::Result<Outcome> {
    match command {
        Command::Transport(args) => {
            let report = transport::run(&args).await?;
            Ok(Outcome {
                report: serde_json::to_value(report)?,
                ok: true,
            })
        }
        Command::Fleet(args) => {
            let report = fleet::run(&args).await?;
            let ok = report.ok;
            Ok(Outcome {
                report: serde_json::to_value(report)?,
                ok,
            })
        }
    }
}
