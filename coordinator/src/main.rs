//! `flotilla`: thin entry point; the work is in the library.

use std::process::ExitCode;

use clap::Parser;
use flotilla_coordinator::{run, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rust_log = std::env::var("RUST_LOG").ok();
    let filter = tracing_subscriber::EnvFilter::try_new(cli.global.log_filter(rust_log.as_deref()))
        .unwrap_or_else(|_| "warn".into());
    // https://no-color.org: set and not empty means no colours.
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()) && !no_color)
        .init();
    let json = cli.command.json();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("flotilla: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The message is printed once; whether a retry may help is for
            // scripts (`--json`) and the log (`-vv`), not the sentence.
            tracing::debug!(
                retryable = e.is_retryable(),
                exit_code = e.exit_code(),
                "{e}"
            );
            if json {
                eprintln!("{}", e.to_json());
            } else {
                eprintln!("flotilla: {e}");
            }
            ExitCode::from(e.exit_code())
        }
    }
}
