//! `flotilla-agent`: thin entry point; the work is in the library.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use flotilla_agent::{AgentConfig, Settings};
use tokio_util::sync::CancellationToken;

/// The Flotilla agent: runs on every host, takes signed tasks over NATS.
#[derive(Debug, Parser)]
#[command(name = "flotilla-agent", version)]
struct Cli {
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
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate flags, config file, bundle and roots; for systemd's ExecStartPre.
    Check(AgentConfig),
}

/// Exit code for an unusable configuration.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
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
