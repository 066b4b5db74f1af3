//! The `flotilla` command line: flags, subcommands, and their dispatch.

mod backup;
mod bus;
mod check;
mod copy;
mod deploy;
mod estimate;
mod events;
mod follow;
mod forget;
mod hosts;
mod key;
mod manual;
mod output;
mod repair;
mod restore;
mod setup;
mod snapshots;
mod status;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use flotilla_protocol::HostName;

use crate::error::CliError;
use crate::fleet::Fleet;
use crate::nats::{ClientAuth, Nats};

/// Default NATS URL when neither a flag, the environment nor a fleet names one.
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";

/// Flotilla: back up a whole homelab fleet from one place.
#[derive(Debug, Parser)]
#[command(name = "flotilla", version, after_help = EXIT_CODES)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

const EXIT_CODES: &str = "Exit codes: 0 ok, 1 error, 2 usage (also: doctor found what it could not repair, or --check found something), 3 host unknown or offline \
(also: --timeout ran out while it was offline), 4 task rejected, failed or timed out \
(--timeout; also: check found problems, repair left data lost), \
5 cannot reach NATS, \
6 finished but some files could not be read or restored, 130 cancelled with Ctrl-C.";

/// What `enroll` accepts as a host name: what [`HostName::new`] checks (a
/// NATS subject token and a DNS label at once).
const HOST_NAME_HELP: &str = "Host name: 1-63 characters of a-z, 0-9 and '-', \
starting with a letter and not ending with '-' (no '_', '.' or capitals)";

/// `flotilla config ...`.
#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a config file; exit 2 with the line of each mistake.
    Check {
        /// The file [default: ./flotilla.toml if it exists, else /etc/flotilla/flotilla.toml].
        #[arg(env = "FLOTILLA_CONFIG")]
        file: Option<PathBuf>,
        /// Print {"ok": bool, "issues": [{"line", "message"}], "warnings": [...]}.
        #[arg(long)]
        json: bool,
    },
}

/// Flags every subcommand takes.
#[derive(Debug, Clone, Args)]
pub struct Global {
    /// NATS server URL [default: the fleet's, else nats://127.0.0.1:4222].
    #[arg(long, global = true, env = "FLOTILLA_NATS_URL", value_name = "URL")]
    pub nats: Option<String>,
    /// Fleet directory made by `flotilla init`.
    #[arg(long, global = true, env = "FLOTILLA_FLEET", value_name = "DIR")]
    pub fleet: Option<PathBuf>,
    /// Show times in UTC instead of local time (JSON is always RFC 3339 UTC).
    #[arg(long, global = true)]
    pub utc: bool,
    /// Log only errors.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,
    /// Log more: -v info, -vv debug, -vvv trace (default: warnings; flags win over RUST_LOG).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a new fleet: id, certificate authority, task-signing key, repository key.
    Init {
        /// Overwrite an existing fleet (every enrolled host must be enrolled again).
        #[arg(long)]
        force: bool,
        /// Print {"fleet", "dir"}.
        #[arg(long)]
        json: bool,
    },
    /// Issue a host's bundle: certificate, keys, NATS credentials and URL, in one file (mode 0600).
    ///
    /// With --alerting, write instead a standard NATS `.creds` file for a
    /// read-only subscriber (events and health, nothing else) that any NATS
    /// client can use (`nats --creds FILE --tlsca ca.crt sub 'flotilla.events.>'`).
    Enroll {
        #[arg(help = HOST_NAME_HELP)]
        host: HostName,
        /// Where to write the bundle (or the `.creds` file with --alerting).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// A read-only events-and-health subscriber, not a host.
        #[arg(long)]
        alerting: bool,
        /// Leave the repository key out: the host can take part but never read backups.
        #[arg(long)]
        no_repo_key: bool,
        /// Overwrite an existing bundle file.
        #[arg(long)]
        force: bool,
        /// Print {"host", "out", "fleet"}.
        #[arg(long)]
        json: bool,
    },
    /// Take a decommissioned host out of the registry (hosts, status, listings).
    ///
    /// Drops its health record, its task consumer and the tasks queued for
    /// it. Refused while the host is online (stop its agent first) unless
    /// --force. Its certificate stays valid: an agent started again with its
    /// bundle joins again.
    Remove {
        #[arg(help = HOST_NAME_HELP)]
        host: HostName,
        /// Remove it even though it is online.
        #[arg(long)]
        force: bool,
        /// Print {"host", "removed", "tasks_dropped"}.
        #[arg(long)]
        json: bool,
    },
    /// Write a complete nats-server configuration for this fleet: JetStream,
    /// TLS with a certificate from the fleet CA, and the fleet's operator and
    /// accounts (anonymous connections refused).
    NatsConfig {
        /// Address the server listens on, HOST:PORT (0.0.0.0:4222 for every interface).
        #[arg(long, value_name = "HOST:PORT")]
        listen: String,
        /// The server's state directory: JetStream store, account JWTs, its TLS key.
        #[arg(long, value_name = "DIR")]
        store: PathBuf,
        /// Where to write the configuration.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Another name or address clients dial the server by (repeatable); the
        /// fleet's NATS URL and the listen address are included.
        #[arg(long = "name", value_name = "NAME")]
        names: Vec<String>,
        /// Overwrite an existing configuration file.
        #[arg(long)]
        force: bool,
        /// Make this server one node of a JetStream cluster with this name (three
        /// nodes survive the loss of any one); run nats-config once per node.
        #[arg(long, value_name = "NAME")]
        cluster: Option<String>,
        /// With --cluster: this node's name, unique in the cluster [default: the first --name or listen host].
        #[arg(long, value_name = "NAME", requires = "cluster")]
        server_name: Option<String>,
        /// With --cluster: where this node listens for the other nodes.
        #[arg(
            long,
            value_name = "HOST:PORT",
            default_value = "0.0.0.0:6222",
            requires = "cluster"
        )]
        cluster_listen: String,
        /// With --cluster: another node's cluster address, HOST:PORT (repeatable; every other node).
        #[arg(long = "route", value_name = "HOST:PORT", requires = "cluster")]
        routes: Vec<String>,
    },
    /// Check the fleet's streams, buckets and task consumers and repair them;
    /// push the fleet account (revocations) and the signed revocation list.
    Doctor {
        /// Only report; exit 2 when something needs repair.
        #[arg(long)]
        check: bool,
        /// Also delete and recreate a stream whose retention or storage is wrong (its messages are lost).
        #[arg(long)]
        recreate: bool,
        /// Print {"findings", "notes", "unrepaired"}.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a host (or an alerting subscriber) for good: its NATS users are
    /// refused by the server and its certificate by every agent.
    Revoke {
        #[arg(help = HOST_NAME_HELP)]
        host: HostName,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Install flotilla-agent on a host over ssh (or upgrade it in place): enroll it
    /// if needed, copy this version's agent, its bundle and unit, start it, and wait
    /// until it is online.
    ///
    /// Uses the system's ssh (your ~/.ssh/config, agent and keys) and needs root on
    /// the host (sudo without a password when USER is not root). The settings are
    /// saved in FLEET/deploy/HOST.toml: `flotilla deploy HOST` alone, and
    /// `flotilla upgrade`, reuse them.
    Deploy(deploy::DeployArgs),
    /// Upgrade deployed hosts to this version, one at a time, never in the middle
    /// of a task; stops at the first failure and says how to roll that host back.
    Upgrade(deploy::UpgradeArgs),
    /// Show every host ever seen: online or offline, last seen, version, roles, space.
    Hosts {
        /// Print one JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Per host: last successful backup and its age, next run, running job, problems.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Recent tasks across the fleet, newest first.
    Jobs {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// How many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Live progress of every running task across the fleet.
    Watch {
        /// JSON lines of the raw events.
        #[arg(long)]
        json: bool,
    },
    /// Print the fleet's events (stored ones first), as text or JSON lines.
    Events {
        /// Keep printing new events as they happen.
        #[arg(long)]
        follow: bool,
        /// Print JSON lines.
        #[arg(long)]
        json: bool,
        /// Only this kind (`agent.offline`) or family (`agent`, `task`, `security`).
        #[arg(long, value_name = "KIND")]
        kind: Option<String>,
        /// Only events about this host.
        #[arg(long, value_name = "HOST")]
        host: Option<HostName>,
    },
    /// Walk paths on a host and report files, directories, bytes, largest directories.
    Estimate {
        /// The host.
        host: HostName,
        /// Path to measure, inside the host's backup roots (repeatable; default: all roots).
        #[arg(long = "path", value_name = "PATH")]
        paths: Vec<String>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
        /// Seconds to wait for the result [default: 600, or 30 when the host is offline].
        #[arg(long, value_name = "SECS")]
        timeout: Option<u64>,
    },
    /// Run the coordinator daemon: schedules, retries, watchdog, notifications, metrics.
    Serve {
        /// The fleet's plans [default: ./flotilla.toml if it exists, else /etc/flotilla/flotilla.toml].
        #[arg(long, value_name = "FILE", env = "FLOTILLA_CONFIG")]
        config: Option<PathBuf>,
        /// Where the daemon keeps its state [default: FLEET/serve].
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Check a `flotilla.toml`, pointing at the line of each mistake.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Keep the fleet's keys safe: export them into one passphrase-protected file, or
    /// rebuild the fleet directory from it after the coordinator's disk is lost.
    Key {
        #[command(subcommand)]
        command: key::KeyCommand,
    },
    /// Back up hosts into a storage host's repository (hosts run concurrently).
    Backup {
        /// Hosts, comma-separated (or use --all / --plan with --config).
        #[arg(value_delimiter = ',', required_unless_present_any = ["all", "plan"])]
        hosts: Vec<HostName>,
        /// Run every plan of the config file now.
        #[arg(long, conflicts_with = "plan")]
        all: bool,
        /// Run this plan of the config file now.
        #[arg(long, value_name = "NAME")]
        plan: Option<String>,
        /// Config file for --all and --plan [default: ./flotilla.toml if it exists, else /etc/flotilla/flotilla.toml].
        #[arg(long, value_name = "FILE", env = "FLOTILLA_CONFIG")]
        config: Option<PathBuf>,
        /// Path to back up, inside the hosts' backup roots (repeatable; default: all roots).
        #[arg(long = "path", value_name = "PATH")]
        paths: Vec<String>,
        /// The storage host.
        #[arg(long, value_name = "STORAGE", required_unless_present_any = ["all", "plan"])]
        to: Option<HostName>,
        /// Glob to leave out (repeatable), e.g. `**/.cache` or `*.tmp`.
        #[arg(long = "exclude", value_name = "GLOB")]
        excludes: Vec<String>,
        /// Back up a path even if it is empty now (or no longer a mount point) but held files
        /// at the last backup; without it such a backup fails, as the disk may not be mounted.
        #[arg(long)]
        allow_empty: bool,
        /// Wait and show progress per host until every backup ends.
        #[arg(long)]
        wait: bool,
        /// With --wait: give up after this long (`90s`, `30m`, `2h`; a plan's `timeout` with
        /// --plan/--all) and send the unfinished tasks a cancel; exit 4 (3: host offline).
        #[arg(long, value_name = "DURATION", value_parser = timeout_arg, requires = "wait")]
        timeout: Option<Duration>,
        /// JSON lines: progress, then a summary per host.
        #[arg(long)]
        json: bool,
    },
    /// List snapshots across storage hosts.
    Snapshots {
        /// Only snapshots of this host.
        #[arg(long)]
        host: Option<HostName>,
        /// Only this storage host.
        #[arg(long, value_name = "STORAGE")]
        to: Option<HostName>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List what a snapshot holds: the contents of the paths it backed up, or of PATH.
    Ls {
        /// Snapshot id or unique prefix.
        snapshot: String,
        /// Absolute path of a directory (or file) inside the snapshot.
        path: Option<String>,
        /// Also list everything beneath, directory by directory.
        #[arg(short, long)]
        recursive: bool,
        /// Only look on this storage host.
        #[arg(long, value_name = "STORAGE")]
        to: Option<HostName>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Restore a snapshot into a directory on any enrolled host.
    Restore {
        /// Snapshot id or unique prefix.
        snapshot: String,
        /// Destination as HOST:DIR (DIR inside the host's restore roots).
        #[arg(long, value_name = "HOST:DIR")]
        to: String,
        /// Only these snapshot paths (repeatable).
        #[arg(long = "include", value_name = "PATH")]
        includes: Vec<String>,
        /// Storage host holding the snapshot (default: search all).
        #[arg(long, value_name = "STORAGE")]
        from: Option<HostName>,
        /// Onto another host than the snapshot's own, keep setuid/setgid bits, file
        /// capabilities and device nodes (stripped by default: a compromised host's
        /// backups must not plant them elsewhere).
        #[arg(long)]
        preserve_special: bool,
        /// Wait and show progress until it ends.
        #[arg(long)]
        wait: bool,
        /// With --wait: give up after this long (`90s`, `30m`, `2h`) and send the task a
        /// cancel; exit 4 (3: host offline).
        #[arg(long, value_name = "DURATION", value_parser = timeout_arg, requires = "wait")]
        timeout: Option<Duration>,
        /// JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Copy snapshots from one storage host to another (an off-site copy): sealed
    /// blobs go storage to storage over QUIC; the destination adds only what it
    /// lacks, keeps each snapshot's id and deletes nothing. Run it again to resume.
    Copy {
        /// The storage host holding the snapshots.
        #[arg(long, value_name = "STORAGE")]
        from: HostName,
        /// The storage host to copy them to.
        #[arg(long, value_name = "STORAGE")]
        to: HostName,
        /// Only snapshots of this host (repeatable; default: every host).
        #[arg(long = "host", value_name = "HOST")]
        hosts: Vec<HostName>,
        /// Only this snapshot (id or unique prefix; repeatable; default: all).
        #[arg(long = "snapshot", value_name = "ID")]
        snapshots: Vec<String>,
        /// Send at most this much per second, smoothly (`500K`, `10M`, `1.5MiB`;
        /// K/M/G are KiB/MiB/GiB, KB/MB/GB powers of 1000).
        #[arg(long, value_name = "RATE", value_parser = rate_arg)]
        limit_upload: Option<u64>,
        /// Wait and show progress until it ends.
        #[arg(long)]
        wait: bool,
        /// With --wait: give up after this long (`90s`, `30m`, `2h`) and send the task a
        /// cancel; exit 4 (3: host offline).
        #[arg(long, value_name = "DURATION", value_parser = timeout_arg, requires = "wait")]
        timeout: Option<Duration>,
        /// JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Forget snapshots by a keep policy (per host and paths); data goes at the next prune.
    Forget {
        /// Only snapshots of this host.
        #[arg(long)]
        host: Option<HostName>,
        /// Use this plan's hosts, storage and keep policy from --config.
        #[arg(long, value_name = "NAME")]
        plan: Option<String>,
        /// Config file for --plan [default: ./flotilla.toml if it exists, else /etc/flotilla/flotilla.toml].
        #[arg(long, value_name = "FILE", env = "FLOTILLA_CONFIG")]
        config: Option<PathBuf>,
        /// Only this storage host.
        #[arg(long, value_name = "STORAGE")]
        to: Option<HostName>,
        /// Keep the newest N.
        #[arg(long, value_name = "N")]
        keep_last: Option<u32>,
        /// Keep the newest of each of the last N hours.
        #[arg(long, value_name = "N")]
        keep_hourly: Option<u32>,
        /// … days.
        #[arg(long, value_name = "N")]
        keep_daily: Option<u32>,
        /// … weeks.
        #[arg(long, value_name = "N")]
        keep_weekly: Option<u32>,
        /// … months.
        #[arg(long, value_name = "N")]
        keep_monthly: Option<u32>,
        /// … years.
        #[arg(long, value_name = "N")]
        keep_yearly: Option<u32>,
        /// Keep everything newer than this (e.g. `7d`).
        #[arg(long, value_name = "DURATION")]
        keep_within: Option<String>,
        /// Show what would be forgotten.
        #[arg(long)]
        dry_run: bool,
        /// Prune the storage hosts afterwards.
        #[arg(long)]
        prune: bool,
        /// JSON lines.
        #[arg(long)]
        json: bool,
    },
    /// Delete data no snapshot references; never blocks running backups.
    Prune {
        /// The storage host.
        storage: HostName,
        /// Show what would be freed.
        #[arg(long)]
        dry_run: bool,
        /// Keep unreferenced data younger than this (e.g. `24h`).
        #[arg(long, value_name = "DURATION", default_value = "1h")]
        grace: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check a storage host's repository: structure, and with --read-data every byte.
    Check {
        /// The storage host.
        storage: HostName,
        /// Re-read and re-hash all data.
        #[arg(long)]
        read_data: bool,
        /// Give up after this long (`90s`, `30m`, `2h`) and send the task a cancel;
        /// exit 4 (3: host offline).
        #[arg(long, value_name = "DURATION", value_parser = timeout_arg)]
        timeout: Option<Duration>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Repair a storage host's repository after damage: move the good blobs out of
    /// damaged packs, drop those packs, name the files still lost (exit 4 if any).
    Repair {
        /// The storage host.
        storage: HostName,
        /// Re-read and re-hash all data first (not needed right after `check --read-data`).
        #[arg(long)]
        read_data: bool,
        /// Wait and show the report (else return once the task is sent).
        #[arg(long)]
        wait: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    ///
    /// For example: `flotilla completions bash > /etc/bash_completion.d/flotilla`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff); with --dir, write one page per subcommand there.
    Man {
        /// Write flotilla.1 and flotilla-SUBCOMMAND.1 into this directory.
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
    },
}

impl Command {
    /// Whether the command was asked for JSON output (errors are then
    /// printed as JSON too).
    pub fn json(&self) -> bool {
        match self {
            Command::Init { json, .. }
            | Command::Enroll { json, .. }
            | Command::Hosts { json }
            | Command::Remove { json, .. }
            | Command::Doctor { json, .. }
            | Command::Revoke { json, .. }
            | Command::Status { json }
            | Command::Jobs { json, .. }
            | Command::Watch { json }
            | Command::Events { json, .. }
            | Command::Estimate { json, .. }
            | Command::Backup { json, .. }
            | Command::Snapshots { json, .. }
            | Command::Ls { json, .. }
            | Command::Restore { json, .. }
            | Command::Copy { json, .. }
            | Command::Forget { json, .. }
            | Command::Prune { json, .. }
            | Command::Check { json, .. }
            | Command::Repair { json, .. }
            | Command::Config {
                command: ConfigCommand::Check { json, .. },
            } => *json,
            Command::Key { command } => command.json(),
            Command::Serve { .. }
            | Command::NatsConfig { .. }
            | Command::Completions { .. }
            | Command::Man { .. } => false,
            Command::Deploy(args) => args.json,
            Command::Upgrade(args) => args.json,
        }
    }
}

impl Global {
    /// The log filter: `-q`/`-v` when given, else `rust_log` (`RUST_LOG`)
    /// when set, else warnings.
    pub fn log_filter(&self, rust_log: Option<&str>) -> String {
        setup::log_filter(tracing::Level::WARN, self.quiet, self.verbose, rust_log)
    }

    /// The fleet directory, or an error saying how to name one.
    pub fn fleet(&self) -> Result<Fleet, CliError> {
        let dir = self.fleet.as_ref().ok_or(CliError::NoFleet)?;
        Ok(Fleet::load(dir)?)
    }

    /// The NATS URL: flag or environment, else the fleet's, else the default.
    pub fn nats_url(&self) -> String {
        if let Some(url) = &self.nats {
            return url.clone();
        }
        self.fleet
            .as_ref()
            .and_then(|dir| Fleet::load(dir).ok())
            .map(|f| f.file.nats_url)
            .unwrap_or_else(|| DEFAULT_NATS_URL.to_owned())
    }

    /// Connects to NATS as the coordinator (with the fleet's credentials
    /// when it has them).
    pub async fn connect(&self) -> Result<Nats, CliError> {
        let auth = self
            .fleet
            .as_ref()
            .and_then(|dir| Fleet::load(dir).ok())
            .and_then(|f| ClientAuth::coordinator(&f));
        Nats::connect(&self.nats_url(), auth.as_ref()).await
    }
}

/// Writes one line to stdout; a closed stdout ends the process with success,
/// as `flotilla events | head` expects.
pub(crate) fn emit(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{args}") {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
    }
}

/// Prints an error that is not the command's result (that one `main`
/// prints): as `main` would, a line, or JSON with `--json`.
fn report(e: &CliError, json: bool) {
    if json {
        eprintln!("{}", e.to_json());
    } else {
        eprintln!("flotilla: {e}");
    }
}

/// A rate for `--limit-upload`: a size per second, above zero.
fn rate_arg(s: &str) -> Result<u64, String> {
    match flotilla_protocol::text::parse_bytes(s)? {
        0 => Err("a rate must be above zero (leave the flag out for no limit)".into()),
        n => Ok(n),
    }
}

/// `--timeout`: a duration such as `90s`, `30m` or `2h` (a bare number is
/// seconds, as `estimate --timeout` takes), above zero.
fn timeout_arg(s: &str) -> Result<Duration, String> {
    let d = match s.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => crate::config::duration(s).map_err(|e| e.to_string())?,
    };
    if d.is_zero() {
        return Err("a timeout must be above zero".into());
    }
    Ok(d)
}

/// Runs one parsed command.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    let g = &cli.global;
    match cli.command {
        Command::Init { force, json } => {
            let dir = g.fleet.clone().ok_or(CliError::NoFleet)?;
            let url = g
                .nats
                .clone()
                .unwrap_or_else(|| DEFAULT_NATS_URL.to_owned());
            let fleet = Fleet::init(&dir, &url, force)?;
            if json {
                outln!(
                    "{}",
                    serde_json::json!({"fleet": fleet.file.id, "dir": dir})
                );
            } else {
                outln!("created fleet {} in {}", fleet.file.id, dir.display());
                outln!(
                    "next: `flotilla nats-config --listen HOST:PORT --store DIR --out nats.conf`, \
                     `nats-server -c nats.conf`, `flotilla doctor`, then \
                     `flotilla enroll HOST --fleet {} --out HOST.toml` for each host",
                    dir.display()
                );
                outln!(
                    "keep safe: ca.key, coordinator.key, repo.key and nats/ in {} are the fleet \
                     (without repo.key no backup can be read); run `flotilla key export --out FILE` \
                     and keep FILE and its passphrase away from this machine",
                    dir.display()
                );
            }
            Ok(())
        }
        Command::Enroll {
            host,
            out,
            alerting: true,
            force,
            json,
            ..
        } => {
            let fleet = g.fleet()?;
            fleet.enroll_alerting(&host, &out, force)?;
            if json {
                outln!(
                    "{}",
                    serde_json::json!({"alerting": host.as_str(), "out": out, "fleet": fleet.file.id})
                );
            } else {
                outln!(
                    "wrote NATS credentials for read-only subscriber {host} to {} (mode 0600); \
                     with the fleet CA ({}), e.g.: nats --creds {} --tlsca {} --inbox-prefix {} sub 'flotilla.events.>'",
                    out.display(),
                    fleet.ca_cert_path().display(),
                    out.display(),
                    fleet.ca_cert_path().display(),
                    flotilla_protocol::permissions::inbox_prefix(
                        &flotilla_protocol::permissions::Role::Alerting(host.clone())
                    ),
                );
            }
            Ok(())
        }
        Command::Enroll {
            host,
            out,
            no_repo_key,
            force,
            json,
            ..
        } => {
            let fleet = g.fleet()?;
            fleet.enroll(&host, &out, g.nats.as_deref(), !no_repo_key, force)?;
            if json {
                outln!(
                    "{}",
                    serde_json::json!({"host": host.as_str(), "out": out, "fleet": fleet.file.id})
                );
            } else {
                outln!(
                    "wrote bundle for {host} to {} (mode 0600; it holds the host's private key)",
                    out.display()
                );
            }
            Ok(())
        }
        Command::Completions { shell } => manual::print(&manual::completions(shell)),
        Command::Man { dir: None } => manual::print(&manual::page()?),
        Command::Man { dir: Some(dir) } => {
            for path in manual::pages_into(&dir)? {
                outln!("wrote {}", path.display());
            }
            Ok(())
        }
        Command::Hosts { json } => hosts::run(g, json).await,
        Command::NatsConfig {
            listen,
            store,
            out,
            names,
            force,
            cluster,
            server_name,
            cluster_listen,
            routes,
        } => {
            let cluster = cluster.map(|name| bus::Cluster {
                name,
                server_name,
                listen: cluster_listen,
                routes,
            });
            bus::nats_config(g, &listen, &store, &out, &names, force, cluster.as_ref())
        }
        Command::Doctor {
            check,
            recreate,
            json,
        } => bus::doctor(g, check, recreate, json).await,
        Command::Revoke { host, json } => bus::revoke(g, &host, json).await,
        Command::Deploy(args) => deploy::deploy(g, args).await,
        Command::Upgrade(args) => deploy::upgrade(g, args).await,
        Command::Remove { host, force, json } => hosts::remove(g, &host, force, json).await,
        Command::Status { json } => status::status(g, json).await,
        Command::Jobs { json, limit } => status::jobs(g, json, limit).await,
        Command::Watch { json } => status::watch(g, json).await,
        Command::Events {
            follow,
            json,
            kind,
            host,
        } => events::run(g, follow, json, kind.as_deref(), host.as_ref()).await,
        Command::Estimate {
            host,
            paths,
            json,
            timeout,
        } => estimate::run(g, &host, paths, json, timeout).await,
        Command::Serve { config, state_dir } => {
            let (_, config) = setup::load_config(config.as_deref())?;
            crate::serve::run(config, g.fleet()?, g.connect().await?, state_dir.as_deref()).await?;
            Ok(())
        }
        Command::Key { command } => key::run(g, command),
        Command::Config {
            command: ConfigCommand::Check { file, json },
        } => {
            let file = setup::config_path(file.as_deref());
            let loaded = crate::config::Config::load(&file);
            let warnings = loaded.as_ref().map_or_else(
                |_| Vec::new(),
                |c| crate::fleetops::config_warnings(c, g.fleet.as_deref()),
            );
            if json {
                let doc = match &loaded {
                    Ok(c) => serde_json::json!({
                        "ok": true,
                        "plans": c.plan.len(),
                        "issues": [],
                        "warnings": warnings.iter().map(|i| serde_json::json!({"line": i.line, "message": i.message})).collect::<Vec<_>>(),
                    }),
                    Err(crate::config::ConfigError::Invalid { issues, .. }) => serde_json::json!({
                        "ok": false,
                        "issues": issues.iter().map(|i| serde_json::json!({"line": i.line, "message": i.message})).collect::<Vec<_>>(),
                        "warnings": [],
                    }),
                    Err(e) => {
                        serde_json::json!({"ok": false, "issues": [{"line": null, "message": e.to_string()}], "warnings": []})
                    }
                };
                outln!("{doc}");
            }
            let config = loaded.map_err(|e| CliError::Usage(e.to_string()))?;
            if !json {
                for w in &warnings {
                    eprintln!("warning: {w}");
                }
                outln!(
                    "{}: ok ({} plan(s), {} notification route(s){})",
                    file.display(),
                    config.plan.len(),
                    config.notify.len(),
                    if config.metrics.is_some() {
                        ", metrics"
                    } else {
                        ""
                    }
                );
            }
            Ok(())
        }
        Command::Backup {
            hosts,
            all,
            plan,
            config,
            paths,
            to,
            excludes,
            allow_empty,
            wait,
            timeout,
            json,
        } => {
            if all || plan.is_some() {
                let (config, cfg) = setup::load_config(config.as_deref())?;
                let chosen: Vec<&crate::config::Plan> = cfg
                    .plan
                    .iter()
                    .filter(|p| all || Some(&p.name) == plan.as_ref())
                    .collect();
                if chosen.is_empty() {
                    return Err(CliError::Usage(format!(
                        "no plan {:?} in {}",
                        plan.unwrap_or_default(),
                        config.display()
                    )));
                }
                let mut failed = Vec::new();
                for p in chosen {
                    let (to, hosts) = (p.to.clone(), p.host_names());
                    if let Err(e) = backup::run(
                        g,
                        &hosts,
                        p.paths.clone(),
                        &to,
                        p.exclude.clone(),
                        allow_empty || p.allow_empty,
                        wait,
                        timeout.or(p.timeout),
                        json,
                    )
                    .await
                    {
                        // Ctrl-C stops the command, not just this plan.
                        let stop = matches!(e, CliError::Cancelled);
                        failed.push(CliError::Plan {
                            plan: p.name.to_string(),
                            source: Box::new(e),
                        });
                        if stop {
                            break;
                        }
                    }
                }
                // Each failure once: all but the last here, the last by `main`.
                let last = failed.pop();
                for e in &failed {
                    report(e, json);
                }
                return last.map_or(Ok(()), Err);
            }
            let to = to.ok_or_else(|| CliError::Usage("--to STORAGE is required".into()))?;
            backup::run(
                g,
                &hosts,
                paths,
                &to,
                excludes,
                allow_empty,
                wait,
                timeout,
                json,
            )
            .await
        }
        Command::Snapshots { host, to, json } => {
            snapshots::snapshots(g, host.as_ref(), to.as_ref(), json).await
        }
        Command::Ls {
            snapshot,
            path,
            recursive,
            to,
            json,
        } => snapshots::ls(g, &snapshot, path.as_deref(), recursive, to.as_ref(), json).await,
        Command::Restore {
            snapshot,
            to,
            includes,
            from,
            preserve_special,
            wait,
            timeout,
            json,
        } => {
            restore::run(
                g,
                &snapshot,
                &to,
                includes,
                from.as_ref(),
                preserve_special,
                wait,
                timeout,
                json,
            )
            .await
        }
        Command::Check {
            storage,
            read_data,
            timeout,
            json,
        } => check::run(g, &storage, read_data, timeout, json).await,
        Command::Repair {
            storage,
            read_data,
            wait,
            json,
        } => repair::run(g, &storage, read_data, wait, json).await,
        Command::Copy {
            from,
            to,
            hosts,
            snapshots,
            limit_upload,
            wait,
            timeout,
            json,
        } => {
            let what = copy::What {
                from,
                to,
                hosts,
                snapshots,
                limit_bytes_per_sec: limit_upload.unwrap_or(0),
            };
            copy::run(g, what, wait, timeout, json).await
        }
        Command::Forget {
            host,
            plan,
            config,
            to,
            keep_last,
            keep_hourly,
            keep_daily,
            keep_weekly,
            keep_monthly,
            keep_yearly,
            keep_within,
            dry_run,
            prune,
            json,
        } => {
            let flags = crate::retention::KeepPolicy {
                last: keep_last,
                hourly: keep_hourly,
                daily: keep_daily,
                weekly: keep_weekly,
                monthly: keep_monthly,
                yearly: keep_yearly,
                within: keep_within,
            };
            match plan {
                Some(name) => {
                    let (config, cfg) = setup::load_config(config.as_deref())?;
                    let p = cfg.plan.iter().find(|p| p.name == name).ok_or_else(|| {
                        CliError::Usage(format!("no plan {name:?} in {}", config.display()))
                    })?;
                    let policy = if flags.is_empty() {
                        p.keep.clone()
                    } else {
                        flags
                    };
                    let storage = Some(p.to.clone());
                    for h in p.host_names() {
                        forget::forget(
                            g,
                            policy.clone(),
                            Some(&h),
                            storage.as_ref(),
                            dry_run,
                            prune,
                            json,
                        )
                        .await?;
                    }
                    Ok(())
                }
                None => {
                    forget::forget(g, flags, host.as_ref(), to.as_ref(), dry_run, prune, json).await
                }
            }
        }
        Command::Prune {
            storage,
            dry_run,
            grace,
            json,
        } => {
            let grace = humantime::parse_duration(&grace)
                .map_err(|e| CliError::Usage(format!("--grace {grace:?}: {e}")))?;
            forget::run_prune(g, &storage, dry_run, grace, json).await
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("flotilla").chain(args.iter().copied()))
    }

    /// `enroll --help` describes exactly the names `HostName` accepts.
    #[test]
    fn enroll_help_matches_the_host_name_rule() {
        let cmd = Cli::command();
        let enroll = cmd.find_subcommand("enroll").expect("enroll exists");
        let host = enroll
            .get_arguments()
            .find(|a| a.get_id() == "host")
            .expect("a host argument");
        let help = host.get_help().expect("help").to_string();
        assert_eq!(help, HOST_NAME_HELP);
        // Each claim of the help, checked against the validation.
        for ok in ["a", "web-1", "nas2", &"a".repeat(63)] {
            assert!(HostName::new(ok).is_ok(), "{ok} is refused");
            assert!(parse(&["enroll", ok, "--out", "x"]).is_ok(), "{ok}");
        }
        for bad in [
            "web_1",
            "a.b",
            "Web",
            "1web",
            "-web",
            "web-",
            "",
            &"a".repeat(64),
        ] {
            assert!(HostName::new(bad).is_err(), "{bad} is accepted");
            assert!(parse(&["enroll", bad, "--out", "x"]).is_err(), "{bad}");
        }
        assert!(help.contains("no '_'"), "{help}");
    }

    #[test]
    fn global_flags_parse_anywhere() {
        let cli = parse(&["hosts", "--utc", "-vv"]).expect("parse");
        assert!(cli.global.utc);
        assert_eq!(cli.global.verbose, 2);
        assert_eq!(cli.global.log_filter(Some("info")), "debug");
        let cli = parse(&["-q", "snapshots"]).expect("parse");
        assert!(cli.global.quiet);
        assert_eq!(cli.global.log_filter(None), "error");
        assert!(parse(&["-q", "-v", "hosts"]).is_err(), "-q and -v conflict");
    }

    #[test]
    fn json_is_known_for_error_reporting() {
        assert!(parse(&["hosts", "--json"]).expect("parse").command.json());
        assert!(!parse(&["hosts"]).expect("parse").command.json());
        assert!(parse(&["config", "check", "x.toml", "--json"])
            .expect("parse")
            .command
            .json());
        assert!(!parse(&["man"]).expect("parse").command.json());
    }

    #[test]
    fn ls_takes_recursive_and_config_paths_are_optional() {
        let cli = parse(&["ls", "abc", "-r"]).expect("parse");
        assert!(matches!(
            cli.command,
            Command::Ls {
                recursive: true,
                path: None,
                ..
            }
        ));
        let cli = parse(&["ls", "abc", "/srv", "--recursive"]).expect("parse");
        assert!(matches!(
            cli.command,
            Command::Ls {
                recursive: true,
                path: Some(_),
                ..
            }
        ));
        let cli = parse(&["completions", "bash"]).expect("parse");
        assert!(matches!(cli.command, Command::Completions { .. }));
        assert!(parse(&["completions", "tcsh"]).is_err());
    }

    #[test]
    fn timeout_takes_a_duration_or_seconds_and_backup_needs_wait_for_it() {
        let timeout = |args: &[&str]| match parse(args).map(|c| c.command) {
            Ok(Command::Backup { timeout, .. })
            | Ok(Command::Restore { timeout, .. })
            | Ok(Command::Check { timeout, .. }) => Ok(timeout),
            Ok(other) => panic!("parsed as {other:?}"),
            Err(e) => Err(e.kind()),
        };
        let backup = ["backup", "alpha", "--to", "nas", "--wait"];
        assert_eq!(
            timeout(&[&backup[..], &["--timeout", "5s"]].concat()),
            Ok(Some(Duration::from_secs(5)))
        );
        assert_eq!(
            timeout(&[&backup[..], &["--timeout", "90"]].concat()),
            Ok(Some(Duration::from_secs(90)))
        );
        assert_eq!(timeout(&backup), Ok(None));
        assert_eq!(
            timeout(&["check", "nas", "--timeout", "1h 30m"]),
            Ok(Some(Duration::from_secs(5400)))
        );
        assert_eq!(
            timeout(&[
                "restore",
                "abc",
                "--to",
                "b:/x",
                "--wait",
                "--timeout",
                "2h"
            ]),
            Ok(Some(Duration::from_secs(7200)))
        );
        for bad in ["0", "0s", "soon"] {
            assert_eq!(
                timeout(&[&backup[..], &["--timeout", bad]].concat()),
                Err(clap::error::ErrorKind::ValueValidation),
                "{bad}"
            );
        }
        // Only a command that waits can time out.
        assert_eq!(
            timeout(&["backup", "alpha", "--to", "nas", "--timeout", "5s"]),
            Err(clap::error::ErrorKind::MissingRequiredArgument)
        );
    }

    #[test]
    fn repair_takes_a_storage_host_and_its_flags() {
        let cli = parse(&["repair", "nas", "--read-data", "--wait"]).expect("parse");
        assert!(matches!(
            cli.command,
            Command::Repair {
                read_data: true,
                wait: true,
                json: false,
                ..
            }
        ));
        assert!(parse(&["repair"]).is_err(), "repair needs its storage host");
        let cli = parse(&["repair", "nas", "--json"]).expect("parse");
        assert!(cli.command.json());
    }
}
