//! What the command line settles before a command runs: the log level from
//! `-q`/`-v`, and which `flotilla.toml` to read.

use std::path::{Path, PathBuf};

use tracing::Level;

use crate::config::{Config, ConfigError};
use crate::error::CliError;

/// The config file read when none is named and `./flotilla.toml` does not
/// exist: where the systemd unit and `docs/operations.md` put it.
pub const SYSTEM_CONFIG: &str = "/etc/flotilla/flotilla.toml";

/// The config file in the working directory, preferred when it exists.
pub const LOCAL_CONFIG: &str = "flotilla.toml";

/// The `tracing` filter for a binary whose quiet-less, verbose-less level is
/// `default`: `-q` logs errors only, each `-v` one level more; with neither,
/// `rust_log` (`RUST_LOG`) when set, else `default`.
pub fn log_filter(default: Level, quiet: bool, verbose: u8, rust_log: Option<&str>) -> String {
    const LEVELS: [Level; 5] = [
        Level::ERROR,
        Level::WARN,
        Level::INFO,
        Level::DEBUG,
        Level::TRACE,
    ];
    if quiet {
        return Level::ERROR.as_str().to_lowercase();
    }
    if verbose == 0 {
        if let Some(env) = rust_log.filter(|s| !s.trim().is_empty()) {
            return env.to_owned();
        }
    }
    let from = LEVELS.iter().position(|l| *l == default).unwrap_or(1);
    let at = (from + usize::from(verbose)).min(LEVELS.len() - 1);
    LEVELS[at].as_str().to_lowercase()
}

/// The config file to read: the one named (`--config`, `FLOTILLA_CONFIG`
/// or `config check FILE`), else `./flotilla.toml` when it exists, else
/// [`SYSTEM_CONFIG`].
pub fn config_path(named: Option<&Path>) -> PathBuf {
    choose_config(named, Path::new(LOCAL_CONFIG).exists())
}

/// Reads the config file [`config_path`] picks; a missing one is a usage
/// error that says how to name another.
pub fn load_config(named: Option<&Path>) -> Result<(PathBuf, Config), CliError> {
    let path = config_path(named);
    match Config::load(&path) {
        Ok(config) => Ok((path, config)),
        Err(e) => Err(config_error(named.is_some(), e)),
    }
}

fn config_error(named: bool, e: ConfigError) -> CliError {
    match e {
        ConfigError::Read { path, source }
            if !named && source.kind() == std::io::ErrorKind::NotFound =>
        {
            CliError::Usage(format!(
                "no config file at {path} (nor ./{LOCAL_CONFIG}); name one with --config FILE or FLOTILLA_CONFIG"
            ))
        }
        e => CliError::Usage(e.to_string()),
    }
}

fn choose_config(named: Option<&Path>, local_exists: bool) -> PathBuf {
    match named {
        Some(path) => path.to_path_buf(),
        None if local_exists => PathBuf::from(LOCAL_CONFIG),
        None => PathBuf::from(SYSTEM_CONFIG),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiet_and_verbose_set_the_level_over_rust_log() {
        let warn = Level::WARN;
        assert_eq!(log_filter(warn, false, 0, None), "warn");
        assert_eq!(log_filter(warn, false, 0, Some("")), "warn");
        assert_eq!(
            log_filter(warn, false, 0, Some("quinn=debug")),
            "quinn=debug"
        );
        assert_eq!(log_filter(warn, true, 0, Some("debug")), "error");
        assert_eq!(log_filter(warn, false, 1, Some("error")), "info");
        assert_eq!(log_filter(warn, false, 2, None), "debug");
        assert_eq!(log_filter(warn, false, 3, None), "trace");
        assert_eq!(log_filter(warn, false, 9, None), "trace");
        // The agent's default is info: one -v is debug there.
        assert_eq!(log_filter(Level::INFO, false, 1, None), "debug");
        assert_eq!(log_filter(Level::INFO, true, 0, None), "error");
    }

    #[test]
    fn a_missing_default_config_says_how_to_name_one() {
        let missing = || ConfigError::Read {
            path: SYSTEM_CONFIG.into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        };
        assert_eq!(
            config_error(false, missing()).to_string(),
            "no config file at /etc/flotilla/flotilla.toml (nor ./flotilla.toml); \
             name one with --config FILE or FLOTILLA_CONFIG"
        );
        // A file named by hand that is missing is reported as it is.
        let named = config_error(true, missing()).to_string();
        assert!(
            named.starts_with("cannot read /etc/flotilla/flotilla.toml"),
            "{named}"
        );
        assert_eq!(
            config_error(true, missing()).exit_code(),
            crate::error::EXIT_USAGE
        );
    }

    #[test]
    fn the_config_is_the_named_one_else_local_else_etc() {
        let named = Path::new("/srv/plans.toml");
        assert_eq!(choose_config(Some(named), true), named);
        assert_eq!(choose_config(Some(named), false), named);
        assert_eq!(choose_config(None, true), Path::new("flotilla.toml"));
        assert_eq!(
            choose_config(None, false),
            Path::new("/etc/flotilla/flotilla.toml")
        );
    }
}
