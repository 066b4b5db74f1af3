//! Agent configuration: command-line flags and the TOML file are one type.
//!
//! `flotilla-agent run --config agent.toml --backup-root /srv` reads the file and
//! lets each flag given on the command line override it. [`Settings::load`] then
//! resolves everything (reads the bundle, canonicalises roots) and reports the
//! first problem with the file and value it concerns.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use flotilla_protocol::{Bundle, HostName, PublicKey, Role};
use serde::{Deserialize, Serialize};

/// Default interval between health heartbeats.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(5);

/// Flags of `run` and `config check`, and the keys of the TOML config file.
#[derive(Debug, Clone, Default, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// TOML file with these same settings; flags override it.
    #[arg(long, value_name = "FILE")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Enrollment bundle written by `flotilla enroll`.
    #[arg(long, value_name = "FILE")]
    pub bundle: Option<PathBuf>,
    /// Directory for the agent's own state (task journal, caches).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// NATS server URL; overrides the bundle's.
    #[arg(long, value_name = "URL")]
    pub nats: Option<String>,
    /// UDP address to serve QUIC on for peer agents.
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<SocketAddr>,
    /// Address peers dial to reach this agent's QUIC port, when it is not
    /// the `--listen` address (NAT, a proxy, a port forward). Without it, an
    /// agent listening on 0.0.0.0 or [::] advertises the address of the
    /// interface it reaches NATS through.
    #[arg(long, value_name = "ADDR:PORT")]
    pub advertise: Option<SocketAddr>,
    /// Keep a repository in this directory (makes this a storage host).
    #[arg(long, value_name = "DIR")]
    pub storage: Option<PathBuf>,
    /// A directory this host may back up (repeatable).
    #[arg(long = "backup-root", value_name = "PATH")]
    #[serde(default)]
    pub backup_roots: Vec<PathBuf>,
    /// A directory restores may write into (repeatable).
    #[arg(long = "restore-root", value_name = "PATH")]
    #[serde(default)]
    pub restore_roots: Vec<PathBuf>,
    /// Time between health heartbeats, e.g. `5s`.
    #[arg(long, value_name = "DURATION")]
    pub heartbeat_interval: Option<HumanDuration>,
}

/// A duration written the human way (`5s`, `1m 30s`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = humantime::DurationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        humantime::parse_duration(s).map(HumanDuration)
    }
}

impl TryFrom<String> for HumanDuration {
    type Error = humantime::DurationError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<HumanDuration> for String {
    fn from(d: HumanDuration) -> Self {
        humantime::format_duration(d.0).to_string()
    }
}

/// A configuration that cannot be used. Permanent: fix the file or flags.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    ReadConfig {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The config file is not valid TOML of the expected shape.
    #[error("invalid config file {path}: {source}")]
    ParseConfig {
        /// The file.
        path: PathBuf,
        /// Where and why (line and column are in the message).
        source: Box<toml::de::Error>,
    },
    /// A required setting is missing.
    #[error("missing setting `{0}`: give --{1} or set `{0}` in the config file")]
    Missing(&'static str, &'static str),
    /// The bundle could not be read.
    #[error("cannot read bundle {path}: {source}")]
    ReadBundle {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The bundle is not valid.
    #[error("bundle {path} is unusable: {source}")]
    Bundle {
        /// The file.
        path: PathBuf,
        /// Why.
        source: flotilla_protocol::BundleError,
    },
    /// A configured root does not exist or is not a directory.
    #[error("{what} {path} is not an existing directory: {why}")]
    Root {
        /// Which setting.
        what: &'static str,
        /// The path.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// The state directory cannot be created.
    #[error("cannot create state directory {path}: {source}")]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The heartbeat interval is out of range.
    #[error("heartbeat interval {0:?} is out of range (100ms to 10min)")]
    Heartbeat(Duration),
    /// `advertise` cannot be dialled, or is given without `listen`.
    #[error("advertise address {0} is unusable: {1}")]
    Advertise(SocketAddr, &'static str),
}

/// Everything the daemon needs, resolved and validated.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The enrollment bundle.
    pub bundle: Bundle,
    /// This host (from the bundle).
    pub host: HostName,
    /// Coordinator key that signs tasks.
    pub coordinator_key: PublicKey,
    /// NATS URL (flag/config, else the bundle's).
    pub nats_url: String,
    /// State directory (exists).
    pub state_dir: PathBuf,
    /// QUIC listen address.
    pub listen: Option<SocketAddr>,
    /// The address to advertise instead of the listen address.
    pub advertise: Option<SocketAddr>,
    /// Storage directory, canonical.
    pub storage: Option<PathBuf>,
    /// Backup roots, canonical.
    pub backup_roots: Vec<PathBuf>,
    /// Restore roots, canonical.
    pub restore_roots: Vec<PathBuf>,
    /// Heartbeat interval.
    pub heartbeat_interval: Duration,
}

impl AgentConfig {
    /// Reads the config file named by `--config`, if any, and lays the flags over it.
    pub fn merged(self) -> Result<AgentConfig, ConfigError> {
        let Some(path) = self.config.clone() else {
            return Ok(self);
        };
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::ReadConfig {
            path: path.clone(),
            source,
        })?;
        let file: AgentConfig =
            toml::from_str(&text).map_err(|source| ConfigError::ParseConfig {
                path: path.clone(),
                source: Box::new(source),
            })?;
        // Relative paths in the file are relative to the file, as users expect.
        let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let rel = |p: PathBuf| if p.is_relative() { base.join(p) } else { p };
        Ok(AgentConfig {
            config: Some(path),
            bundle: self.bundle.or(file.bundle.map(rel)),
            state_dir: self.state_dir.or(file.state_dir.map(rel)),
            nats: self.nats.or(file.nats),
            listen: self.listen.or(file.listen),
            advertise: self.advertise.or(file.advertise),
            storage: self.storage.or(file.storage.map(rel)),
            backup_roots: if self.backup_roots.is_empty() {
                file.backup_roots.into_iter().map(rel).collect()
            } else {
                self.backup_roots
            },
            restore_roots: if self.restore_roots.is_empty() {
                file.restore_roots.into_iter().map(rel).collect()
            } else {
                self.restore_roots
            },
            heartbeat_interval: self.heartbeat_interval.or(file.heartbeat_interval),
        })
    }
}

impl Settings {
    /// Merges, reads and validates a configuration.
    pub fn load(config: AgentConfig) -> Result<Settings, ConfigError> {
        let config = config.merged()?;
        let bundle_path = config
            .bundle
            .ok_or(ConfigError::Missing("bundle", "bundle"))?;
        let text =
            std::fs::read_to_string(&bundle_path).map_err(|source| ConfigError::ReadBundle {
                path: bundle_path.clone(),
                source,
            })?;
        let bundle = Bundle::parse(&text).map_err(|source| ConfigError::Bundle {
            path: bundle_path.clone(),
            source,
        })?;
        let coordinator_key =
            bundle
                .coordinator_public_key()
                .map_err(|source| ConfigError::Bundle {
                    path: bundle_path.clone(),
                    source,
                })?;
        let state_dir = config
            .state_dir
            .ok_or(ConfigError::Missing("state_dir", "state-dir"))?;
        std::fs::create_dir_all(&state_dir).map_err(|source| ConfigError::StateDir {
            path: state_dir.clone(),
            source,
        })?;
        let heartbeat_interval = config
            .heartbeat_interval
            .map(|d| d.0)
            .unwrap_or(DEFAULT_HEARTBEAT);
        if heartbeat_interval < Duration::from_millis(100)
            || heartbeat_interval > Duration::from_secs(600)
        {
            return Err(ConfigError::Heartbeat(heartbeat_interval));
        }
        if let Some(addr) = config.advertise {
            if config.listen.is_none() {
                return Err(ConfigError::Advertise(
                    addr,
                    "give `listen` too: an agent that does not listen has nothing to advertise",
                ));
            }
            if addr.ip().is_unspecified() || addr.port() == 0 {
                return Err(ConfigError::Advertise(
                    addr,
                    "peers need a concrete address and port to dial (not 0.0.0.0, [::] or port 0)",
                ));
            }
        }
        Ok(Settings {
            host: bundle.host.clone(),
            nats_url: config.nats.unwrap_or_else(|| bundle.nats_url.clone()),
            coordinator_key,
            bundle,
            state_dir,
            listen: config.listen,
            advertise: config.advertise,
            storage: config
                .storage
                .map(|p| canonical_dir("storage directory", p))
                .transpose()?,
            backup_roots: config
                .backup_roots
                .into_iter()
                .map(|p| canonical_dir("backup root", p))
                .collect::<Result<_, _>>()?,
            restore_roots: config
                .restore_roots
                .into_iter()
                .map(|p| canonical_dir("restore root", p))
                .collect::<Result<_, _>>()?,
            heartbeat_interval,
        })
    }

    /// The roles this configuration gives the host.
    pub fn roles(&self) -> Vec<Role> {
        let mut roles = Vec::new();
        if !self.backup_roots.is_empty() {
            roles.push(Role::Source);
        }
        if self.storage.is_some() {
            roles.push(Role::Storage);
        }
        if !self.restore_roots.is_empty() {
            roles.push(Role::Restore);
        }
        roles
    }
}

fn canonical_dir(what: &'static str, path: PathBuf) -> Result<PathBuf, ConfigError> {
    let canonical = std::fs::canonicalize(&path).map_err(|e| ConfigError::Root {
        what,
        path: path.clone(),
        why: e.to_string(),
    })?;
    if !canonical.is_dir() {
        return Err(ConfigError::Root {
            what,
            path,
            why: "not a directory".into(),
        });
    }
    Ok(canonical)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file_and_file_paths_are_relative_to_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("agent.toml");
        std::fs::write(
            &file,
            "bundle = \"b.toml\"\nstate_dir = \"/var/lib/x\"\nbackup_roots = [\"data\"]\nheartbeat_interval = \"2s\"\n",
        )
        .expect("write");
        let flags = AgentConfig {
            config: Some(file),
            state_dir: Some("/tmp/s".into()),
            ..Default::default()
        };
        let merged = flags.merged().expect("merges");
        assert_eq!(merged.bundle, Some(dir.path().join("b.toml")));
        assert_eq!(merged.state_dir, Some(PathBuf::from("/tmp/s")));
        assert_eq!(merged.backup_roots, vec![dir.path().join("data")]);
        assert_eq!(
            merged.heartbeat_interval,
            Some(HumanDuration(Duration::from_secs(2)))
        );
    }

    #[test]
    fn unknown_keys_are_errors_with_a_line_number() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("agent.toml");
        std::fs::write(&file, "bundle = \"b\"\nbakup_roots = []\n").expect("write");
        let err = AgentConfig {
            config: Some(file),
            ..Default::default()
        }
        .merged()
        .expect_err("must be refused")
        .to_string();
        assert!(
            err.contains("bakup_roots") && err.contains("line 2"),
            "{err}"
        );
    }
}
