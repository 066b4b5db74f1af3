//! `flotilla-agent`: thin entry point; the work is in the library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use flotilla_agent::{AgentConfig, RecoverArgs, Settings};
use tokio_util::sync::CancellationToken;

/// The Flotilla agent: runs on every host, takes signed tasks over NATS.
#[derive(Debug, Parser)]
#[command(name = "flotilla-agent", version)]
struct Cli {
    /// Log only errors.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    /// Log more: -v debug, -vv trace (default: info; flags win over RUST_LOG).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent daemon until SIGTERM or SIGINT.
    Run(AgentConfig),
    /// Inspect the configuration.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Print this host's NATS credentials from its bundle in the standard
    /// `.creds` format (to debug as this host with the `nats` CLI).
    NatsCreds {
        /// The host's enrollment bundle.
        #[arg(long, value_name = "FILE")]
        bundle: std::path::PathBuf,
    },
    /// List or restore the snapshots of a repository directory with nothing
    /// else running (no NATS, no coordinator, no other agent): for when the
    /// coordinator or the storage host is lost. The repository is only read.
    ///
    /// The key is the file `flotilla key export` wrote (its passphrase from
    /// FLOTILLA_PASSPHRASE, else asked on the terminal), a host's bundle
    /// that carries the repository key, or a fleet directory's repo.key.
    /// Exit codes: 0 ok, 1 error, 2 usage (no such snapshot, ambiguous
    /// prefix), 6 some files could not be restored, 130 cancelled (Ctrl-C).
    Recover(RecoverArgs),
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate flags, config file, bundle and roots; for systemd's ExecStartPre.
    Check(AgentConfig),
}

/// Exit code for an unusable configuration.
const EXIT_CONFIG: u8 = 2;

/// The log filter: `-q` errors only; each `-v` one level above the default
/// `info`; with neither, `RUST_LOG` when set, else `info`. (The same rule as
/// `flotilla`'s, whose default is `warn`.)
fn log_filter(quiet: bool, verbose: u8, rust_log: Option<&str>) -> String {
    match (quiet, verbose, rust_log.filter(|s| !s.trim().is_empty())) {
        (true, _, _) => "error".into(),
        (false, 0, Some(env)) => env.to_owned(),
        (false, 0, None) => "info".into(),
        (false, 1, _) => "debug".into(),
        (false, _, _) => "trace".into(),
    }
}

fn main() -> ExitCode {
    flotilla_agent::limit_arenas();
    let cli = Cli::parse();
    let rust_log = std::env::var("RUST_LOG").ok();
    let mut filter = log_filter(cli.quiet, cli.verbose, rust_log.as_deref());
    // `recover` is a command a person reads, not a daemon's log: warnings
    // (damaged packs, unreadable snapshots) and errors only, unless asked.
    if matches!(cli.command, Command::Recover(_)) && filter == "info" {
        filter = "warn".into();
    }
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(filter).unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()) && !no_color)
        .init();
    match cli.command {
        Command::Recover(args) => match flotilla_agent::recover(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                if args.json {
                    eprintln!("{}", e.to_json());
                } else {
                    eprintln!("flotilla-agent: {e}");
                }
                ExitCode::from(e.exit_code())
            }
        },
        Command::NatsCreds { bundle } => {
            let text = match std::fs::read_to_string(&bundle) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("flotilla-agent: cannot read {}: {e}", bundle.display());
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            match flotilla_protocol::Bundle::parse(&text) {
                Ok(b) => match b.nats_creds {
                    Some(creds) => {
                        print!("{creds}");
                        ExitCode::SUCCESS
                    }
                    None => {
                        eprintln!(
                            "flotilla-agent: {} holds no NATS credentials (made before the bus had authentication): enroll the host again with `flotilla enroll {} --force`",
                            bundle.display(),
                            b.host
                        );
                        ExitCode::from(EXIT_CONFIG)
                    }
                },
                Err(e) => {
                    eprintln!("flotilla-agent: {}: {e}", bundle.display());
                    ExitCode::from(EXIT_CONFIG)
                }
            }
        }
        Command::Config {
            command: ConfigCommand::Check(config),
        } => match Settings::load(config) {
            Ok(s) => {
                println!(
                    "config ok: host {} in fleet {}, NATS {}, roles {:?}, {} backup root(s), {} restore root(s)",
                    s.host,
                    s.bundle.fleet,
                    s.nats_url,
                    s.roles(),
                    s.backup_roots.len(),
                    s.restore_roots.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("flotilla-agent: {e}");
                ExitCode::from(EXIT_CONFIG)
            }
        },
        Command::Run(config) => {
            let settings = match Settings::load(config) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("flotilla-agent: {e}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .max_blocking_threads(16)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("flotilla-agent: cannot start runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(run(settings)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("flotilla-agent: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

async fn run(settings: Settings) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let shutdown = CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        trigger.cancel();
    });
    flotilla_agent::run(settings, shutdown).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiet_and_verbose_set_the_log_level() {
        assert_eq!(log_filter(false, 0, None), "info");
        assert_eq!(
            log_filter(false, 0, Some("flotilla_agent=debug")),
            "flotilla_agent=debug"
        );
        assert_eq!(log_filter(true, 0, Some("debug")), "error");
        assert_eq!(log_filter(false, 1, Some("warn")), "debug");
        assert_eq!(log_filter(false, 4, None), "trace");
    }

    #[test]
    fn the_flags_go_before_or_after_the_subcommand() {
        let cli =
            Cli::try_parse_from(["flotilla-agent", "-vv", "config", "check", "--bundle", "b"])
                .expect("parse");
        assert_eq!(cli.verbose, 2);
        let cli = Cli::try_parse_from(["flotilla-agent", "config", "check", "--bundle", "b", "-q"])
            .expect("parse");
        assert!(cli.quiet);
        assert!(Cli::try_parse_from(["flotilla-agent", "-q", "-v", "config", "check"]).is_err());
    }

    #[test]
    fn recover_takes_a_list_or_a_snapshot_with_a_target() {
        fn parse(more: &[&str]) -> Result<Cli, clap::Error> {
            let base = [
                "flotilla-agent",
                "recover",
                "--repo",
                "/r",
                "--key-file",
                "/k",
            ];
            Cli::try_parse_from(base.iter().chain(more))
        }
        let Command::Recover(args) = parse(&["--list", "--json"]).expect("list").command else {
            panic!("not recover");
        };
        assert!(args.list && args.json);
        let Command::Recover(args) = parse(&[
            "--snapshot",
            "5f0c",
            "--to",
            "/srv/r",
            "--include",
            "/home",
            "--include",
            "/etc",
        ])
        .expect("restore")
        .command
        else {
            panic!("not recover");
        };
        assert_eq!(args.snapshot.as_deref(), Some("5f0c"));
        assert_eq!(args.includes, ["/home", "/etc"]);
        assert!(parse(&[]).is_err(), "neither --list nor --snapshot");
        assert!(parse(&["--list", "--snapshot", "5f"]).is_err(), "both");
        assert!(parse(&["--snapshot", "5f"]).is_err(), "no --to");
        assert!(
            parse(&["--list", "--to", "/x"]).is_err(),
            "--to without --snapshot"
        );
        assert!(parse(&["--list", "--preserve-special"]).is_err());
    }
}
