//! `chaos`: runs the fault scenarios and prints the table. Exit code 0 when
//! every trial passed (or was skipped), 1 when any failed, 2 on bad usage.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Parser;
use flotilla_chaos::{by_name, markdown, one_line, rows, run, text_table, Config, Verdict, ALL};

/// Inject faults (kills, a restarted bus, a full disk, skewed clocks, bit
/// rot) into a real local fleet and check that it recovers.
#[derive(Debug, Parser)]
#[command(name = "chaos")]
struct Args {
    /// One or two trials of each kill scenario and one of each other (CI).
    #[arg(long, conflicts_with = "trials")]
    quick: bool,
    /// Trials per scenario.
    #[arg(long)]
    trials: Option<usize>,
    /// Only these scenarios, comma-separated (see --list).
    #[arg(long, value_delimiter = ',')]
    scenarios: Vec<String>,
    /// The run's seed (default: from the clock); printed, to replay a run.
    #[arg(long)]
    seed: Option<u64>,
    /// Run only trial K (from 0) of each chosen scenario: replays one trial.
    #[arg(long, value_name = "K")]
    only: Option<usize>,
    /// Scale every data size (0.25: a quarter of the default 100–200 MiB).
    #[arg(long, default_value_t = 1.0)]
    data_scale: f64,
    /// Also write the table as markdown, with the command line and seed.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
    /// List the scenarios and exit.
    #[arg(long)]
    list: bool,
}

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("chaos: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn real_main() -> Result<ExitCode> {
    let args = Args::parse();
    if args.list {
        for s in ALL {
            println!("{:<14} {}", s.name, s.about);
        }
        return Ok(ExitCode::SUCCESS);
    }
    // Written so that NaN is refused too.
    if args.data_scale.is_nan() || args.data_scale <= 0.0 {
        bail!("--data-scale must be above 0");
    }
    let scenarios = if args.scenarios.is_empty() {
        ALL.iter().collect()
    } else {
        args.scenarios
            .iter()
            .map(|name| by_name(name).with_context(|| format!("no scenario {name:?} (see --list)")))
            .collect::<Result<Vec<_>>>()?
    };
    point_harness_at_binaries()?;
    let seed = args.seed.unwrap_or_else(clock_seed);
    // As typed, less the binary's directory: `chaos --quick …`.
    let command = std::iter::once("chaos".to_owned())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ");
    eprintln!("chaos: seed {seed}");
    let config = Config {
        scenarios,
        trials: if args.quick { None } else { args.trials },
        only: args.only,
        seed,
        data_scale: args.data_scale,
    };
    let (results, wall) = run(&config);

    println!("\n{}", text_table(&rows(&results)));
    println!("seed {seed}; wall time {:.0} s", wall.as_secs_f64());
    let failed: Vec<_> = results
        .iter()
        .filter(|r| matches!(r.verdict, Verdict::Failed(_)))
        .collect();
    for r in &failed {
        println!(
            "FAIL {} #{} (trial seed {}): {}",
            r.scenario,
            r.index + 1,
            r.seed,
            one_line(&r.verdict.to_string())
        );
    }
    if let Some(path) = &args.report {
        std::fs::write(path, markdown(&command, seed, wall, &results))
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("report written to {}", path.display());
    }
    Ok(if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The harness looks for `flotilla` and `flotilla-agent` beside a test
/// binary's parent directory; `chaos` lives beside them instead, so point
/// it there unless `FLOTILLA_BIN_DIR` says otherwise.
fn point_harness_at_binaries() -> Result<()> {
    if std::env::var_os("FLOTILLA_BIN_DIR").is_some() {
        return Ok(());
    }
    let exe = std::env::current_exe().context("cannot find the chaos binary's path")?;
    let dir = exe.parent().context("the chaos binary has no directory")?;
    for bin in ["flotilla", "flotilla-agent"] {
        if !dir.join(bin).is_file() {
            bail!(
                "{} is missing: run `cargo build --workspace --bins` (chaos/run does), \
                 or set FLOTILLA_BIN_DIR",
                dir.join(bin).display()
            );
        }
    }
    // Set before any thread starts: the runner has not begun.
    std::env::set_var("FLOTILLA_BIN_DIR", dir);
    Ok(())
}

fn clock_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
}
