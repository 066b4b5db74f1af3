//! `flotilla deploy` and `flotilla upgrade`: put `flotilla-agent` on a host
//! over the system's OpenSSH client (so `~/.ssh/config`, the user's agent and
//! keys all work), and upgrade the fleet one host at a time.
//!
//! `deploy HOST --ssh USER@ADDR` goes through these steps, printing each:
//!
//! 1. ssh reaches the host (with `BatchMode=yes`: it never asks anything),
//!    and the user there is root or may `sudo -n`;
//! 2. `uname -m` says x86_64 or aarch64;
//! 3. the agent of exactly this CLI's version for that architecture is found
//!    on this machine ([`plan::candidates`]);
//! 4. the host keeps the bundle it has, or is enrolled ([`plan::bundle_plan`])
//!    into a private temporary file;
//! 5. the binary, the new bundle, `install-agent.sh` and the unit (both built
//!    into this program) go into a scratch directory on the host through
//!    ssh's standard input;
//! 6. `install-agent.sh` runs there as root: it writes `agent.toml` from the
//!    settings, checks the new binary against it before replacing anything,
//!    keeps the binary it replaces as `flotilla-agent.previous`, and restarts
//!    the agent (under systemd where it runs, else in the background); the
//!    scratch directory goes;
//! 7. the settings are saved in `FLEET/deploy/HOST.toml` (before the wait,
//!    so that a host that does not come back can still be upgraded or rolled
//!    back with them);
//! 8. the registry shows the host online on this version, from a new agent.
//!
//! `--dry-run` runs only the read-only commands of steps 1 to 4 and prints
//! every other command and copy, changing nothing (not even enrolling).
//! `upgrade` does the same for each host with saved settings, one at a time
//! and never in the middle of a task, and stops at the first failure with
//! the command that rolls that host back.
//!
//! Ctrl-C stops a deploy at once, but not before its secrets go: the local
//! scratch directory (the new bundle) with the work dropped, the one on the
//! host with one more `rm -rf`; then it says where it stopped and what to
//! do, and exits 130.
//!
//! The decisions are pure, in `deploy/plan.rs` and `deploy/settings.rs`; this
//! file is the driver: it runs ssh, tar and the agent binary, enrolls, reads
//! the registry and prints.

mod plan;
mod settings;

use std::io::Read;
use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use clap::Args;
use flotilla_protocol::HostName;
use serde_json::json;

use self::plan::{Arch, BundleFacts, BundlePlan, Candidate, Gate, InstalledBundle, Lookup, Upload};
use self::settings::{DeploySettings, Overrides, Service};
use super::Global;
use crate::error::{CliError, EXIT_CANCELLED, EXIT_FAILURE, EXIT_HOST, EXIT_NATS, EXIT_TASK};
use crate::fleet::{Fleet, FleetError};
use crate::nats::Nats;

/// The version deployed: this CLI's own, always.
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The installer and the unit, built in, so that deploy works from an
/// installed `flotilla` without the repository.
const INSTALL_SCRIPT: &str = include_str!("../../../deploy/install-agent.sh");
const AGENT_UNIT: &str = include_str!("../../../deploy/systemd/flotilla-agent.service");

/// Longest one ssh command may take (the install waits up to 30 s for the
/// old agent to stop; a copy of the binary over a slow link takes longer).
const SSH_COMMAND_TIMEOUT: Duration = Duration::from_secs(600);
/// How often the registry is read while waiting for a host.
const ONLINE_POLL: Duration = Duration::from_secs(1);
/// How often a busy host's heartbeat is read while waiting for its tasks.
const IDLE_POLL: Duration = Duration::from_secs(2);
/// How long `upgrade` waits for each host to come back online.
const UPGRADE_ONLINE_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the `rm -rf` of the host's scratch directory may take after
/// Ctrl-C (the user is waiting to get the prompt back).
const INTERRUPTED_CLEANUP_TIMEOUT: Duration = Duration::from_secs(15);

/// `flotilla deploy`'s flags.
#[derive(Debug, Args)]
pub struct DeployArgs {
    /// The fleet host name it runs as.
    #[arg(help = super::HOST_NAME_HELP)]
    pub host: HostName,
    /// How ssh reaches it: USER@ADDR, or a Host of ~/.ssh/config [default: the saved one].
    #[arg(long, value_name = "USER@ADDR")]
    pub ssh: Option<String>,
    /// ssh port [default: the saved one, else ssh's own].
    #[arg(long, value_name = "N")]
    pub port: Option<u16>,
    /// ssh private key (ssh -i) [default: the saved one, else ssh's own].
    #[arg(long, value_name = "FILE")]
    pub identity: Option<PathBuf>,
    /// One more ssh option, passed as `-o OPT` (repeatable; replaces the saved ones),
    /// e.g. `UserKnownHostsFile=/path` or `StrictHostKeyChecking=accept-new`.
    #[arg(long = "ssh-option", value_name = "OPT")]
    pub ssh_options: Vec<String>,
    /// Keep a backup repository in this directory on the host (a storage host).
    #[arg(long, value_name = "DIR")]
    pub storage: Option<String>,
    /// A directory to back up (repeatable; replaces the saved ones) [default on a
    /// first deploy without --storage or --restore-root: /etc and /home].
    #[arg(long = "backup-root", value_name = "PATH")]
    pub backup_roots: Vec<String>,
    /// A directory restores may write into (repeatable; replaces the saved ones).
    #[arg(long = "restore-root", value_name = "PATH")]
    pub restore_roots: Vec<String>,
    /// QUIC address for peer agents, e.g. 0.0.0.0:7443 (a storage host needs one).
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Option<SocketAddr>,
    /// The address peers dial to reach --listen, when it is another (NAT, a port forward).
    #[arg(long, value_name = "ADDR:PORT")]
    pub advertise: Option<SocketAddr>,
    /// Where the release tarballs are [default: ./dist, then ../share/flotilla/dist
    /// beside flotilla, then the flotilla-agent beside flotilla].
    #[arg(long, value_name = "DIR", env = "FLOTILLA_DIST")]
    pub dist: Option<PathBuf>,
    /// Enroll the host again although it has a bundle of this fleet (a new
    /// certificate and NATS user), e.g. to take it back after `flotilla revoke`.
    #[arg(long)]
    pub reenroll: bool,
    /// How long to wait for the host to come online on this version (`90s`, `5m`);
    /// exit 3 after that.
    #[arg(long, value_name = "DURATION", value_parser = super::timeout_arg, default_value = "60s")]
    pub timeout: Duration,
    /// Check the host (read-only commands), then print every command and copy
    /// that would change it, changing nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// JSON lines: the steps, then the result.
    #[arg(long)]
    pub json: bool,
}

/// `flotilla upgrade`'s flags.
#[derive(Debug, Args)]
pub struct UpgradeArgs {
    /// Hosts to upgrade, in this order (each deployed before with `flotilla deploy`).
    #[arg(
        required_unless_present = "all",
        conflicts_with = "all",
        value_name = "HOST"
    )]
    pub hosts: Vec<HostName>,
    /// Every host with saved deploy settings (FLEET/deploy/*.toml), by name.
    #[arg(long)]
    pub all: bool,
    /// Upgrade a host even while it runs a task (the restart stops the task; the
    /// agent resumes it when it is back).
    #[arg(long, conflicts_with = "no_wait")]
    pub force: bool,
    /// Refuse a host that runs a task instead of waiting for it (exit 4).
    #[arg(long)]
    pub no_wait: bool,
    /// How long to wait for a host's running tasks to end (`30m`, `2h`); exit 4 after that.
    #[arg(long, value_name = "DURATION", value_parser = super::timeout_arg, default_value = "1h")]
    pub timeout: Duration,
    /// Where the release tarballs are [default: ./dist, then ../share/flotilla/dist
    /// beside flotilla, then the flotilla-agent beside flotilla].
    #[arg(long, value_name = "DIR", env = "FLOTILLA_DIST")]
    pub dist: Option<PathBuf>,
    /// Check each host (read-only commands), then print every command and copy that
    /// would change it, changing nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// JSON lines: the steps, then the result per host.
    #[arg(long)]
    pub json: bool,
}

/// Why deploying (or upgrading) one host failed.
#[derive(Debug, thiserror::Error)]
enum DeployError {
    /// ssh itself failed (exit 255): no route, refused, host key, no key.
    #[error("cannot reach {target} over ssh: {why}; check that `ssh {target} true` works without a prompt (deploy runs ssh with BatchMode=yes: a key or an ssh agent, and a known host key; --port, --identity and --ssh-option give ssh what it needs)")]
    Unreachable {
        /// USER@ADDR.
        target: String,
        /// ssh's last line.
        why: String,
    },
    /// Not root, and no passwordless sudo.
    #[error("{user} on {addr} cannot run sudo without a password: deploy needs root on the target; use root@{addr} or allow passwordless sudo for {user}")]
    NoSudo {
        /// The user ssh logged in as.
        user: String,
        /// The host's address.
        addr: String,
    },
    /// An architecture there is no agent for.
    #[error("{target} says its machine is {machine} (uname -m): flotilla-agent is built for x86_64 and aarch64 only (a Raspberry Pi running a 32-bit OS says armv7l: install the 64-bit one)")]
    Arch {
        /// USER@ADDR.
        target: String,
        /// What `uname -m` said.
        machine: String,
    },
    /// No agent binary of this version and architecture on this machine.
    #[error("no flotilla-agent {version} for {arch} here: looked for {looked}; make it with `scripts/package.sh --arch {arch}` (it writes dist/), or give --dist DIR (or FLOTILLA_DIST) holding {tarball}")]
    NoBinary {
        /// The version wanted.
        version: &'static str,
        /// The target's architecture.
        arch: Arch,
        /// Where it looked.
        looked: String,
        /// The tarball's name.
        tarball: String,
    },
    /// Something on this machine failed (a file, tar).
    #[error("cannot {what}: {why}")]
    Local {
        /// What was attempted.
        what: String,
        /// Why it failed.
        why: String,
    },
    /// The fleet directory failed (enrolling, reading revocations).
    #[error("cannot {what}: {source}")]
    Fleet {
        /// What was attempted.
        what: String,
        /// Why it failed.
        source: FleetError,
    },
    /// A remote command failed.
    #[error("{what} on {target} failed{}: {why}", exit_text(*code))]
    Remote {
        /// USER@ADDR.
        target: String,
        /// The command, for people.
        what: String,
        /// Its exit code (none: killed, or timed out).
        code: Option<i32>,
        /// Its last line of error output.
        why: String,
    },
    /// `install-agent.sh` failed; its output was printed.
    #[error("install-agent.sh failed on {target}{}; its output is above (a failed config check leaves the agent that ran before in place)", exit_text(*code))]
    Install {
        /// USER@ADDR.
        target: String,
        /// Its exit code.
        code: Option<i32>,
    },
    /// `install-agent.sh` did not say it installed this version.
    #[error("install-agent.sh on {target} reported installing {said}, not flotilla-agent {want}; its output is above")]
    Installed {
        /// USER@ADDR.
        target: String,
        /// What it said instead.
        said: String,
        /// The version sent.
        want: &'static str,
    },
    /// The host did not come back in time.
    #[error("{host} did not come online on flotilla-agent {version} within {}: {seen}; on the host, look at its log (`journalctl -u flotilla-agent -n 50`, or /var/log/flotilla-agent.log without systemd): can it reach NATS at its bundle's URL?", humantime::format_duration(*waited))]
    NotOnline {
        /// The host.
        host: HostName,
        /// The version installed.
        version: &'static str,
        /// How long we waited.
        waited: Duration,
        /// What the registry showed last.
        seen: String,
    },
    /// The host runs a task and `--no-wait` says not to wait.
    #[error("{host} runs {running}: not upgraded (--no-wait); upgrade it once that is done, or give --force to restart it mid-task (the agent resumes the task when it is back)")]
    Busy {
        /// The host.
        host: HostName,
        /// Its tasks.
        running: String,
    },
    /// The host still ran a task when `--timeout` ran out.
    #[error("{host} still runs {running} after {} (--timeout): not upgraded; upgrade it once that is done, or give --force to restart it mid-task (the agent resumes the task when it is back)", humantime::format_duration(*waited))]
    StillBusy {
        /// The host.
        host: HostName,
        /// Its tasks.
        running: String,
        /// How long we waited.
        waited: Duration,
    },
    /// The host's own bundle is revoked.
    #[error("{host}'s certificate is revoked (`flotilla revoke {host}`), and that is the bundle installed on it: give --reenroll to enroll it again (a new certificate and NATS user) and take it back into the fleet")]
    Revoked {
        /// The host.
        host: HostName,
    },
    /// An upgrade found the host needing a new bundle: it only installs.
    #[error("{host} would need to be enrolled again ({why}), and an upgrade never enrolls (a new certificate would leave the old one unrevoked): check the host, then `flotilla deploy {host}`")]
    WouldEnroll {
        /// The host.
        host: HostName,
        /// Why it would be enrolled.
        why: String,
    },
    /// The registry could not be read.
    #[error("cannot read the registry: {0}")]
    Registry(String),
    /// Ctrl-C stopped the deploy (see [`interrupted`]).
    #[error("interrupted (Ctrl-C){}: {left}", while_text(*doing))]
    Interrupted {
        /// What it was doing then, if known.
        doing: Option<&'static str>,
        /// What that leaves on the host, and what to do
        /// ([`Progress::after_interrupt`]).
        left: String,
    },
}

/// ` (exit N)`, or how else the command ended.
fn exit_text(code: Option<i32>) -> String {
    match code {
        Some(code) => format!(" (exit {code})"),
        None => " (killed, or timed out)".into(),
    }
}

/// ` while DOING`, when it is known.
fn while_text(doing: Option<&str>) -> String {
    doing.map_or_else(String::new, |doing| format!(" while {doing}"))
}

impl DeployError {
    /// The exit code it gives `flotilla` (EXIT_CODES): 3 the host cannot be
    /// reached or did not come back, 4 the host refused or the install failed,
    /// 5 NATS, 130 Ctrl-C, 1 anything on this machine.
    fn exit_code(&self) -> u8 {
        match self {
            DeployError::Interrupted { .. } => EXIT_CANCELLED,
            DeployError::Unreachable { .. } | DeployError::NotOnline { .. } => EXIT_HOST,
            DeployError::NoSudo { .. }
            | DeployError::Arch { .. }
            | DeployError::Remote { .. }
            | DeployError::Install { .. }
            | DeployError::Installed { .. }
            | DeployError::Busy { .. }
            | DeployError::StillBusy { .. }
            | DeployError::Revoked { .. }
            | DeployError::WouldEnroll { .. } => EXIT_TASK,
            DeployError::Registry(_) => EXIT_NATS,
            DeployError::NoBinary { .. }
            | DeployError::Local { .. }
            | DeployError::Fleet { .. } => EXIT_FAILURE,
        }
    }

    /// Whether the same command may succeed later, unchanged.
    fn is_retryable(&self) -> bool {
        matches!(
            self,
            DeployError::Unreachable { .. }
                | DeployError::Remote { .. }
                | DeployError::NotOnline { .. }
                | DeployError::Busy { .. }
                | DeployError::StillBusy { .. }
                | DeployError::Registry(_)
                | DeployError::Interrupted { .. }
        )
    }
}

/// Where the output goes: lines for people, or JSON lines.
#[derive(Debug, Clone, Copy)]
struct Out {
    json: bool,
}

impl Out {
    /// One step, as it happens.
    fn step(&self, host: &HostName, step: &str, message: &str) {
        if self.json {
            outln!(
                "{}",
                json!({"type": "step", "host": host.as_str(), "step": step, "message": message})
            );
        } else {
            outln!("{host}: {message}");
        }
    }

    /// A command run (dry run: a read-only one) or that would run.
    fn command(&self, host: &HostName, ran: bool, command: &str) {
        let kind = if ran { "ran" } else { "would_run" };
        if self.json {
            outln!(
                "{}",
                json!({"type": kind, "host": host.as_str(), "command": command})
            );
        } else if ran {
            outln!("{host}: checking: {command}");
        } else {
            outln!("{host}: would run: {command}");
        }
    }

    /// What a remote command printed, indented under its step.
    fn remote_output(&self, host: &HostName, text: &str) {
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            if self.json {
                outln!(
                    "{}",
                    json!({"type": "output", "host": host.as_str(), "line": line})
                );
            } else {
                outln!("    {line}");
            }
        }
    }

    /// Something to know that is not a step (on stderr for people).
    fn note(&self, host: &HostName, message: &str) {
        if self.json {
            outln!(
                "{}",
                json!({"type": "note", "host": host.as_str(), "message": message})
            );
        } else {
            eprintln!("{host}: {message}");
        }
    }

    /// How a host failed (`main` then prints the command's own error).
    fn failure(&self, host: &HostName, e: &DeployError) {
        if self.json {
            eprintln!(
                "{}",
                json!({
                    "type": "error",
                    "host": host.as_str(),
                    "error": e.to_string(),
                    "exit_code": e.exit_code(),
                    "retryable": e.is_retryable(),
                })
            );
        } else {
            eprintln!("flotilla: {host}: {e}");
        }
    }

    /// The command that rolls a host back.
    fn rollback(&self, host: &HostName, command: &str) {
        if self.json {
            outln!(
                "{}",
                json!({"type": "rollback", "host": host.as_str(), "command": command})
            );
        } else {
            eprintln!(
                "{host}: the install may have replaced its agent; to put back the one it replaced \
                 (kept as {}), run:\n  {command}",
                plan::REMOTE_PREVIOUS
            );
        }
    }

    /// The end of one host.
    fn done(&self, host: &HostName, done: &Done, dry_run: bool) {
        let service = done.service.map(Service::as_str);
        if self.json {
            outln!(
                "{}",
                json!({
                    "type": if dry_run { "dry_run" } else { "deployed" },
                    "host": host.as_str(),
                    "version": VERSION,
                    "enrolled": done.enrolled,
                    "service": service,
                    "settings": done.settings,
                })
            );
        } else if dry_run {
            outln!("{host}: dry run: nothing was changed");
        } else {
            outln!(
                "{host}: flotilla-agent {VERSION} is online ({}{}); its deploy settings are in {}",
                service.map_or_else(|| "service unknown".to_owned(), |s| format!("{s} service")),
                if done.enrolled {
                    ", newly enrolled"
                } else {
                    ""
                },
                done.settings.display()
            );
        }
    }
}

/// What one deploy did.
#[derive(Debug)]
struct Done {
    /// The host got a new bundle.
    enrolled: bool,
    /// How its agent runs.
    service: Option<Service>,
    /// Its settings file.
    settings: PathBuf,
}

/// How far a deploy got, for the advice after a failure or a Ctrl-C.
#[derive(Debug, Default)]
struct Progress {
    /// Whether the ssh user needs sudo, once known.
    sudo: Option<bool>,
    /// `install-agent.sh` was started: the host may have a new binary.
    changed: bool,
    /// What it is doing now, for people ("running install-agent.sh").
    doing: Option<&'static str>,
    /// The host was enrolled: a new bundle is on its way to it.
    enrolled: bool,
    /// `install-agent.sh` said it installed this version.
    installed: bool,
    /// The scratch directory on the host, from `mktemp -d` until its
    /// `rm -rf` ran: what a Ctrl-C in between has to remove (it may hold the
    /// host's new bundle).
    tmpdir: Option<String>,
}

impl Progress {
    /// What a Ctrl-C at this point leaves on the host, and what to do;
    /// `again` is the command that deploys it again.
    fn after_interrupt(&self, again: &str) -> String {
        if self.installed {
            format!(
                "flotilla-agent {VERSION} was installed, but not yet seen online; \
                 `flotilla hosts` shows whether it came back"
            )
        } else if self.changed {
            format!(
                "install-agent.sh may have stopped half way (its agent may be stopped): \
                 run {again} to install it again"
            )
        } else if self.enrolled {
            format!(
                "it was enrolled, but its new bundle never reached it: \
                 run {again} to send it one"
            )
        } else {
            "nothing was changed on it".into()
        }
    }
}

/// What every host's deploy shares.
#[derive(Debug)]
struct Ctx<'a> {
    g: &'a Global,
    fleet: Fleet,
    /// The registry; none in a dry run.
    nats: Option<Nats>,
    dist: Option<PathBuf>,
    out: Out,
    dry_run: bool,
}

/// Runs commands on one host over ssh.
#[derive(Debug)]
struct Remote {
    settings: DeploySettings,
    host: HostName,
    out: Out,
    /// Show each command run (a dry run shows all it does).
    show: bool,
}

impl Remote {
    /// The whole ssh command line for `command`, as a person would type it.
    fn display(&self, command: &str) -> String {
        plan::ssh_display(&plan::ssh_args(&self.settings, true, command))
    }

    /// Runs `command` (standard input from `stdin`, else nothing). An exit
    /// code of 255 is ssh's own failure; any other is the command's.
    async fn run(&self, command: &str, stdin: Option<&Path>) -> Result<Output, DeployError> {
        let target = || self.settings.ssh.clone();
        if self.show {
            self.out.command(&self.host, true, &self.display(command));
        }
        tracing::debug!(command = %self.display(command), "ssh");
        let mut cmd = tokio::process::Command::new("ssh");
        cmd.args(plan::ssh_args(&self.settings, true, command))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        match stdin {
            Some(path) => {
                let file = std::fs::File::open(path).map_err(|e| DeployError::Local {
                    what: format!("read {}", path.display()),
                    why: e.to_string(),
                })?;
                cmd.stdin(Stdio::from(file));
            }
            None => {
                cmd.stdin(Stdio::null());
            }
        }
        let output = match tokio::time::timeout(SSH_COMMAND_TIMEOUT, cmd.output()).await {
            Ok(Ok(output)) => output,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(DeployError::Local {
                    what: "run ssh".into(),
                    why: "there is no `ssh` on PATH: install the OpenSSH client (apt-get install openssh-client)".into(),
                })
            }
            Ok(Err(e)) => {
                return Err(DeployError::Local {
                    what: "run ssh".into(),
                    why: e.to_string(),
                })
            }
            Err(_) => {
                return Err(DeployError::Remote {
                    target: target(),
                    what: first_words(command),
                    code: None,
                    why: format!(
                        "no answer within {}",
                        humantime::format_duration(SSH_COMMAND_TIMEOUT)
                    ),
                })
            }
        };
        if output.status.code() == Some(255) {
            return Err(DeployError::Unreachable {
                target: target(),
                why: last_line(&output.stderr),
            });
        }
        Ok(output)
    }

    /// [`Remote::run`], requiring success.
    async fn checked(
        &self,
        command: &str,
        stdin: Option<&Path>,
        what: &str,
    ) -> Result<Output, DeployError> {
        let output = self.run(command, stdin).await?;
        if !output.status.success() {
            return Err(DeployError::Remote {
                target: self.settings.ssh.clone(),
                what: what.to_owned(),
                code: output.status.code(),
                why: last_line(&output.stderr),
            });
        }
        Ok(output)
    }
}

/// Bytes a command printed, as text.
fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The last line of what a command printed on stderr: where ssh and most
/// tools say what went wrong.
fn last_line(stderr: &[u8]) -> String {
    text(stderr)
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .map_or_else(|| "it printed no error".to_owned(), str::to_owned)
}

/// The start of a command, to name it in an error.
fn first_words(command: &str) -> String {
    let words: Vec<&str> = command.split_whitespace().take(3).collect();
    format!("`{}`", words.join(" "))
}

/// A private directory on this machine (mode 0700) for the unpacked binary,
/// the new bundle and the built-in files; removed with everything in it on
/// drop.
#[derive(Debug)]
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new() -> Result<Scratch, DeployError> {
        let dir =
            std::env::temp_dir().join(format!("flotilla-deploy-{}", uuid::Uuid::new_v4().simple()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| DeployError::Local {
                what: format!("create {}", dir.display()),
                why: e.to_string(),
            })?;
        Ok(Scratch { dir })
    }

    fn path(&self) -> &Path {
        &self.dir
    }

    /// Writes a built-in file here and returns its path.
    fn write(&self, name: &str, contents: &str) -> Result<PathBuf, DeployError> {
        let path = self.dir.join(name);
        std::fs::write(&path, contents).map_err(|e| DeployError::Local {
            what: format!("write {}", path.display()),
            why: e.to_string(),
        })?;
        Ok(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        // Best effort: a leftover in the temporary directory is all that a
        // failure here leaves.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A file to copy to the host: its path here (none in a dry run, where the
/// file may not exist) and how to name it.
#[derive(Debug)]
struct LocalFile {
    upload: Upload,
    path: Option<PathBuf>,
    shown: String,
}

/// The agent binary found for the target.
#[derive(Debug)]
struct Binary {
    /// The binary (a dry run: the tarball, not unpacked).
    path: PathBuf,
    /// Where it came from, for people.
    from: String,
}

/// Finds the agent of this version for `arch` ([`plan::candidates`]); with
/// `scratch`, unpacks it there from its tarball.
async fn find_binary(
    dist: Option<&Path>,
    arch: Arch,
    scratch: Option<&Scratch>,
) -> Result<Binary, DeployError> {
    let cwd = std::env::current_dir().ok();
    let exe = std::env::current_exe().ok();
    let lookup = Lookup {
        dist,
        cwd: cwd.as_deref(),
        exe: exe.as_deref(),
        version: VERSION,
        target: arch,
        own: Arch::own(),
    };
    let mut looked = Vec::new();
    for candidate in plan::candidates(&lookup) {
        match candidate {
            Candidate::Tarball(tarball) => {
                if !tarball.is_file() {
                    looked.push(tarball.display().to_string());
                    continue;
                }
                let member = plan::tarball_member(VERSION, arch);
                let verified = verify_tarball(&tarball)?;
                let from = format!("{} ({member}; {verified})", tarball.display());
                let Some(scratch) = scratch else {
                    return Ok(Binary {
                        path: tarball,
                        from,
                    });
                };
                let output = tokio::process::Command::new("tar")
                    .arg("-xzf")
                    .arg(&tarball)
                    .arg("-C")
                    .arg(scratch.path())
                    .arg(&member)
                    .stdin(Stdio::null())
                    .kill_on_drop(true)
                    .output()
                    .await
                    .map_err(|e| DeployError::Local {
                        what: format!("run tar to unpack {}", tarball.display()),
                        why: e.to_string(),
                    })?;
                if !output.status.success() {
                    return Err(DeployError::Local {
                        what: format!("unpack {member} from {}", tarball.display()),
                        why: last_line(&output.stderr),
                    });
                }
                let path = scratch.path().join(&member);
                check_elf(&path, arch)?;
                return Ok(Binary { path, from });
            }
            Candidate::Binary(path) => {
                if !path.is_file() {
                    looked.push(path.display().to_string());
                    continue;
                }
                let said = tokio::process::Command::new(&path)
                    .arg("--version")
                    .stdin(Stdio::null())
                    .kill_on_drop(true)
                    .output()
                    .await
                    .ok()
                    .map(|o| text(&o.stdout));
                match said.as_deref().and_then(plan::agent_version) {
                    Some(version) if version == VERSION => {
                        check_elf(&path, arch)?;
                        return Ok(Binary {
                            from: path.display().to_string(),
                            path,
                        });
                    }
                    Some(version) => looked.push(format!("{} (version {version})", path.display())),
                    None => looked.push(format!(
                        "{} (`--version` did not say flotilla-agent VERSION)",
                        path.display()
                    )),
                }
            }
        }
    }
    Err(DeployError::NoBinary {
        version: VERSION,
        arch,
        looked: looked.join(", "),
        tarball: plan::tarball_name(VERSION, arch),
    })
}

/// Checks a release tarball against the `SHA256SUMS` beside it, when there
/// is one: what was checked, for the step line. A mismatch, or a
/// `SHA256SUMS` that does not list it, is an error (a binary installed as
/// root on every host must be the one released).
fn verify_tarball(tarball: &Path) -> Result<String, DeployError> {
    let sums_path = tarball.with_file_name("SHA256SUMS");
    let sums = match std::fs::read_to_string(&sums_path) {
        Ok(sums) => sums,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok("no SHA256SUMS beside it: not verified".into())
        }
        Err(e) => {
            return Err(DeployError::Local {
                what: format!("read {}", sums_path.display()),
                why: e.to_string(),
            })
        }
    };
    let bytes = std::fs::read(tarball).map_err(|e| DeployError::Local {
        what: format!("read {}", tarball.display()),
        why: e.to_string(),
    })?;
    let actual = hex::encode(ring::digest::digest(&ring::digest::SHA256, &bytes));
    let name = tarball
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    match plan::listed_sum(&sums, &name) {
        Some(listed) if listed.eq_ignore_ascii_case(&actual) => {
            Ok("SHA256SUMS verified".into())
        }
        Some(listed) => Err(DeployError::Local {
            what: format!("use {}", tarball.display()),
            why: format!(
                "its SHA-256 is {actual}, but {} says {listed}: download it again (or rebuild with scripts/package.sh)",
                sums_path.display()
            ),
        }),
        None => Err(DeployError::Local {
            what: format!("use {}", tarball.display()),
            why: format!(
                "{} does not list {name}: download the release's SHA256SUMS with it, or remove the stale one",
                sums_path.display()
            ),
        }),
    }
}

/// Refuses a binary that is not a Linux executable for `arch` (a tarball
/// named for one architecture and holding another).
fn check_elf(path: &Path, arch: Arch) -> Result<(), DeployError> {
    let mut header = [0u8; 20];
    let read = std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut header));
    match read {
        Ok(()) if Arch::from_elf(&header) == Some(arch) => Ok(()),
        Ok(()) => Err(DeployError::Local {
            what: format!("use {}", path.display()),
            why: format!("it is not a 64-bit {arch} Linux executable"),
        }),
        Err(e) => Err(DeployError::Local {
            what: format!("read {}", path.display()),
            why: e.to_string(),
        }),
    }
}

/// Fails before anything happens when a saved or given identity file is gone
/// (ssh would only warn, then try other keys).
fn check_identity(s: &DeploySettings, host: &HostName) -> Result<(), CliError> {
    match &s.identity {
        Some(identity) if !identity.is_file() => Err(CliError::Usage(format!(
            "{host}: --identity {} is not a file (give another with --identity)",
            identity.display()
        ))),
        _ => Ok(()),
    }
}

/// Deploys one host (see the module's steps); `s.service` learns how its
/// agent runs.
/// Whether a deploy may enroll the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Enrolling {
    /// When the bundle decision says so (a first deploy, another fleet's bundle).
    IfNeeded,
    /// Always (`deploy --reenroll`).
    Forced,
    /// Never (`upgrade`: a host that would need it is an error).
    Never,
}

async fn deploy_host(
    ctx: &Ctx<'_>,
    host: &HostName,
    s: &mut DeploySettings,
    enrolling: Enrolling,
    timeout: Duration,
    progress: &mut Progress,
) -> Result<Done, DeployError> {
    let reenroll = enrolling == Enrolling::Forced;
    let out = ctx.out;
    let remote = Remote {
        settings: s.clone(),
        host: host.clone(),
        out,
        show: ctx.dry_run,
    };
    let target = s.ssh.clone();

    // 1. ssh, and root.
    progress.doing = Some("connecting over ssh");
    out.step(host, "ssh", &format!("connecting to {target} over ssh"));
    let ids = remote.checked(plan::PROBE_USER, None, "`id`").await?;
    let (uid, user) = plan::parse_user(&text(&ids.stdout)).ok_or_else(|| DeployError::Remote {
        target: target.clone(),
        what: "`id`".into(),
        code: ids.status.code(),
        why: format!("it printed {:?}, not a user id", text(&ids.stdout)),
    })?;
    let sudo = uid != 0;
    if sudo {
        let probe = remote.run(plan::PROBE_SUDO, None).await?;
        if !probe.status.success() {
            return Err(DeployError::NoSudo {
                user,
                addr: s.user_and_addr().1.to_owned(),
            });
        }
    }
    progress.sudo = Some(sudo);

    // 2. The architecture.
    progress.doing = Some("asking its architecture (uname -m)");
    let said = text(
        &remote
            .checked(plan::PROBE_ARCH, None, "`uname -m`")
            .await?
            .stdout,
    );
    let machine = plan::parse_machine(&said).unwrap_or("?").to_owned();
    let arch = Arch::from_uname(&machine).ok_or_else(|| DeployError::Arch {
        target: target.clone(),
        machine: machine.clone(),
    })?;
    out.step(
        host,
        "target",
        &format!(
            "{target} is {arch}, logged in as {user}{}",
            if sudo { ", root through sudo" } else { "" }
        ),
    );

    // 3. The binary.
    progress.doing = Some("finding the agent binary");
    let scratch = if ctx.dry_run {
        None
    } else {
        Some(Scratch::new()?)
    };
    let binary = find_binary(ctx.dist.as_deref(), arch, scratch.as_ref()).await?;
    out.step(
        host,
        "binary",
        &format!("flotilla-agent {VERSION} for {arch}: {}", binary.from),
    );

    // 4. The bundle.
    progress.doing = Some("looking for the installed bundle");
    let probe = remote
        .checked(
            &plan::probe_bundle(sudo),
            None,
            "looking for the installed bundle",
        )
        .await?;
    let installed = InstalledBundle::parse(&text(&probe.stdout));
    let revoked = ctx
        .fleet
        .revoked_hosts()
        .map_err(|source| DeployError::Fleet {
            what: "read the fleet's revocations".into(),
            source,
        })?
        .contains(host);
    let facts = BundleFacts {
        has_cert: ctx.fleet.host_cert_sha256(host).is_some(),
        revoked,
        installed: &installed,
        fleet: &ctx.fleet.file.id,
        host,
        reenroll,
    };
    let key = if s.with_repo_key() { "with" } else { "without" };
    let mut files = vec![LocalFile {
        upload: plan::UPLOAD_BINARY,
        path: scratch.as_ref().map(|_| binary.path.clone()),
        shown: binary.path.display().to_string(),
    }];
    let new_bundle = match plan::bundle_plan(&facts) {
        BundlePlan::Keep => {
            out.step(
                host,
                "bundle",
                &format!("keeping the host's bundle ({})", plan::REMOTE_BUNDLE),
            );
            false
        }
        BundlePlan::Revoked => return Err(DeployError::Revoked { host: host.clone() }),
        BundlePlan::Enroll(why) if enrolling == Enrolling::Never => {
            return Err(DeployError::WouldEnroll {
                host: host.clone(),
                why,
            })
        }
        BundlePlan::Enroll(why) => {
            let path = match &scratch {
                None => {
                    out.step(
                        host,
                        "bundle",
                        &format!("would enroll {host} ({why}), {key} the repository key, and send its new bundle"),
                    );
                    None
                }
                Some(scratch) => {
                    let path = scratch.path().join(plan::UPLOAD_BUNDLE.name);
                    ctx.fleet
                        .enroll(host, &path, ctx.g.nats.as_deref(), s.with_repo_key(), true)
                        .map_err(|source| DeployError::Fleet {
                            what: format!("enroll {host}"),
                            source,
                        })?;
                    progress.enrolled = true;
                    out.step(
                        host,
                        "bundle",
                        &format!("enrolled {host} ({why}), {key} the repository key"),
                    );
                    Some(path)
                }
            };
            files.push(LocalFile {
                upload: plan::UPLOAD_BUNDLE,
                path,
                shown: format!("the new bundle of {host} (mode 0600)"),
            });
            true
        }
    };
    for (upload, contents) in [
        (plan::UPLOAD_SCRIPT, INSTALL_SCRIPT),
        (plan::UPLOAD_UNIT, AGENT_UNIT),
    ] {
        let path = match &scratch {
            Some(scratch) => Some(scratch.write(upload.name, contents)?),
            None => None,
        };
        files.push(LocalFile {
            upload,
            path,
            shown: format!("{} (built into flotilla {VERSION})", upload.name),
        });
    }
    let settings_file = settings::path(&ctx.fleet.dir, host);

    // 5. to 8., in a dry run: what would happen.
    let Some(nats) = &ctx.nats else {
        let dir = plan::dry_run_tmpdir();
        out.command(host, false, &remote.display(plan::MKTEMP));
        for file in &files {
            out.command(
                host,
                false,
                &format!(
                    "{} < {}",
                    remote.display(&plan::upload_command(dir, &file.upload)),
                    file.shown
                ),
            );
        }
        out.command(
            host,
            false,
            &remote.display(&plan::install_command(s, sudo, dir, new_bundle)),
        );
        out.command(host, false, &remote.display(&plan::cleanup_command(dir)));
        out.step(
            host,
            "settings",
            &format!(
                "would save its deploy settings in {}",
                settings_file.display()
            ),
        );
        out.step(
            host,
            "wait",
            &format!(
                "would wait until {host} is online on flotilla-agent {VERSION} (up to {})",
                humantime::format_duration(timeout)
            ),
        );
        return Ok(Done {
            enrolled: new_bundle,
            service: s.service,
            settings: settings_file,
        });
    };

    // The agent running now, if any: the one to see replaced.
    progress.doing = Some("reading the registry");
    let before = nats
        .host(host)
        .await
        .map_err(|e| DeployError::Registry(e.to_string()))?
        .map(|r| r.heartbeat.started_at);

    // 5. and 6. Copy, install, clean up.
    progress.doing = Some("making a scratch directory on the host (mktemp -d)");
    let made = remote
        .checked(plan::MKTEMP, None, "`mktemp -d` (a scratch directory)")
        .await?;
    let dir = plan::parse_tmpdir(&text(&made.stdout)).ok_or_else(|| DeployError::Remote {
        target: target.clone(),
        what: "`mktemp -d`".into(),
        code: made.status.code(),
        why: format!(
            "it printed {:?}, not a directory under /tmp",
            text(&made.stdout)
        ),
    })?;
    // From here until its `rm -rf` has run, a Ctrl-C has to remove it.
    progress.tmpdir = Some(dir.clone());
    let installed = copy_and_install(
        ctx,
        host,
        &remote,
        &files,
        s,
        InstallAt {
            sudo,
            dir: &dir,
            new_bundle,
        },
        progress,
    )
    .await;
    // Whatever happened: the directory may hold the host's new bundle.
    progress.doing = Some("removing the scratch directory on the host");
    match remote.run(&plan::cleanup_command(&dir), None).await {
        Ok(output) if output.status.success() => {}
        _ => out.note(
            host,
            &format!("could not remove {dir} on the host: remove it by hand (it may hold the host's bundle)"),
        ),
    }
    progress.tmpdir = None;
    let report = installed?;
    s.service = report.service.or(s.service);

    // 7. The settings, for upgrade and the next deploy.
    let settings_file =
        settings::save(&ctx.fleet.dir, host, s).map_err(|e| DeployError::Local {
            what: format!("save {host}'s deploy settings"),
            why: e.to_string(),
        })?;
    out.step(
        host,
        "settings",
        &format!("deploy settings saved in {}", settings_file.display()),
    );

    // 8. Online, on this version, from a new agent.
    progress.doing = Some("waiting for it to come online");
    out.step(
        host,
        "wait",
        &format!(
            "waiting until {host} is online on flotilla-agent {VERSION} (up to {})",
            humantime::format_duration(timeout)
        ),
    );
    wait_online(nats, host, before, timeout).await?;
    Ok(Done {
        enrolled: new_bundle,
        service: s.service,
        settings: settings_file,
    })
}

/// Where and how `install-agent.sh` runs.
#[derive(Debug, Clone, Copy)]
struct InstallAt<'a> {
    sudo: bool,
    dir: &'a str,
    new_bundle: bool,
}

/// Copies `files` into the scratch directory and runs `install-agent.sh`.
async fn copy_and_install(
    ctx: &Ctx<'_>,
    host: &HostName,
    remote: &Remote,
    files: &[LocalFile],
    s: &DeploySettings,
    at: InstallAt<'_>,
    progress: &mut Progress,
) -> Result<plan::InstallReport, DeployError> {
    let out = ctx.out;
    progress.doing = Some("copying the files to the host");
    for file in files {
        out.step(
            host,
            "copy",
            &format!(
                "copying {} to {}",
                file.shown,
                plan::remote_path(at.dir, &file.upload)
            ),
        );
        remote
            .checked(
                &plan::upload_command(at.dir, &file.upload),
                file.path.as_deref(),
                &format!("copying {}", file.upload.name),
            )
            .await?;
    }
    out.step(host, "install", "running install-agent.sh");
    progress.doing = Some("running install-agent.sh");
    progress.changed = true;
    let output = remote
        .run(
            &plan::install_command(s, at.sudo, at.dir, at.new_bundle),
            None,
        )
        .await?;
    out.remote_output(host, &text(&output.stdout));
    out.remote_output(host, &text(&output.stderr));
    if !output.status.success() {
        return Err(DeployError::Install {
            target: s.ssh.clone(),
            code: output.status.code(),
        });
    }
    let report = plan::parse_install_output(&text(&output.stdout));
    if report.version.as_deref() == Some(VERSION) {
        progress.installed = true;
        return Ok(report);
    }
    Err(DeployError::Installed {
        target: s.ssh.clone(),
        want: VERSION,
        said: report.version.map_or_else(
            || "nothing (no `installed flotilla-agent` line)".to_owned(),
            |v| format!("flotilla-agent {v}"),
        ),
    })
}

/// Waits until the registry shows `host` online on this version, from an
/// agent other than the one that started at `before`.
async fn wait_online(
    nats: &Nats,
    host: &HostName,
    before: Option<u64>,
    timeout: Duration,
) -> Result<(), DeployError> {
    let start = Instant::now();
    loop {
        let seen = match nats.host(host).await {
            Ok(record) => {
                match plan::back_online(record.as_ref(), before, VERSION, crate::now_ms()) {
                    Ok(()) => return Ok(()),
                    Err(seen) => seen,
                }
            }
            Err(e) => format!("the registry could not be read: {e}"),
        };
        if start.elapsed() >= timeout {
            return Err(DeployError::NotOnline {
                host: host.clone(),
                version: VERSION,
                waited: timeout,
                seen,
            });
        }
        tokio::time::sleep(ONLINE_POLL).await;
    }
}

/// Waits until `host` runs no task ([`plan::upgrade_gate`]).
async fn wait_until_idle(
    ctx: &Ctx<'_>,
    host: &HostName,
    force: bool,
    no_wait: bool,
    timeout: Duration,
) -> Result<(), DeployError> {
    let Some(nats) = &ctx.nats else {
        ctx.out.step(
            host,
            "tasks",
            "would wait until it runs no task (a dry run does not ask)",
        );
        return Ok(());
    };
    let start = Instant::now();
    let mut told = false;
    loop {
        let record = nats
            .host(host)
            .await
            .map_err(|e| DeployError::Registry(e.to_string()))?;
        let gate = plan::upgrade_gate(
            record.as_ref(),
            crate::now_ms(),
            force,
            no_wait,
            start.elapsed(),
            timeout,
        );
        match gate {
            Gate::Go(note) => {
                if let Some(note) = note {
                    ctx.out.step(host, "tasks", &note);
                }
                return Ok(());
            }
            Gate::Refuse {
                running,
                timed_out: false,
            } => {
                return Err(DeployError::Busy {
                    host: host.clone(),
                    running,
                })
            }
            Gate::Refuse {
                running,
                timed_out: true,
            } => {
                return Err(DeployError::StillBusy {
                    host: host.clone(),
                    running,
                    waited: timeout,
                })
            }
            Gate::Wait(running) => {
                if !told {
                    ctx.out.step(
                        host,
                        "tasks",
                        &format!(
                            "it runs {running}: waiting until it is done (up to {}; --force goes ahead, --no-wait refuses)",
                            humantime::format_duration(timeout)
                        ),
                    );
                    told = true;
                }
                tokio::time::sleep(IDLE_POLL).await;
            }
        }
    }
}

/// Runs `work` to its end, or until Ctrl-C (then `None`). Either way `work`
/// is dropped before this returns: after a Ctrl-C that removes the local
/// [`Scratch`] (with the host's new bundle) and kills the ssh or tar it was
/// running; the directory it made on the host is [`interrupted`]'s to remove.
async fn until_ctrl_c<T>(work: impl std::future::Future<Output = T>) -> Option<T> {
    tokio::select! {
        // Ctrl-C first: the ssh it runs gets the same SIGINT and dies of it,
        // and the interruption, not that error, is what to report.
        biased;
        // `Err`: no handler could be installed; then only `work` ends it.
        Ok(()) = tokio::signal::ctrl_c() => None,
        done = work => Some(done),
    }
}

/// After Ctrl-C stopped `host`'s deploy ([`until_ctrl_c`]): removes the
/// scratch directory it made on the host, if it was still there (once,
/// within [`INTERRUPTED_CLEANUP_TIMEOUT`]; a second Ctrl-C leaves it), and
/// returns the error that says where it stopped and what to do. `again` is
/// the command that deploys the host again.
async fn interrupted(
    out: Out,
    host: &HostName,
    s: &DeploySettings,
    progress: &mut Progress,
    again: &str,
) -> DeployError {
    if let Some(dir) = progress.tmpdir.take() {
        out.note(
            host,
            &format!("interrupted: removing {dir} on the host (Ctrl-C again to leave it there)"),
        );
        let remote = Remote {
            settings: s.clone(),
            host: host.clone(),
            out,
            show: false,
        };
        let cleanup = plan::cleanup_command(&dir);
        let removed = tokio::select! {
            biased;
            Ok(()) = tokio::signal::ctrl_c() => false,
            ran = tokio::time::timeout(
                INTERRUPTED_CLEANUP_TIMEOUT,
                remote.run(&cleanup, None),
            ) => matches!(ran, Ok(Ok(output)) if output.status.success()),
        };
        if !removed {
            out.note(
                host,
                &format!(
                    "could not remove {dir} on the host ({}): remove it by hand \
                     (it may hold the host's bundle)",
                    s.ssh
                ),
            );
        }
    }
    DeployError::Interrupted {
        doing: progress.doing,
        left: progress.after_interrupt(again),
    }
}

/// `flotilla deploy HOST ...`.
pub(super) async fn deploy(g: &Global, args: DeployArgs) -> Result<(), CliError> {
    let fleet = g.fleet()?;
    let out = Out { json: args.json };
    let host = args.host;
    let saved = settings::load(&fleet.dir, &host)?;
    let given = Overrides {
        ssh: args.ssh,
        port: args.port,
        // Absolute, so that upgrade finds it from any directory.
        identity: args.identity.map(|p| std::path::absolute(&p).unwrap_or(p)),
        ssh_options: args.ssh_options,
        backup_roots: args.backup_roots,
        restore_roots: args.restore_roots,
        storage: args.storage,
        listen: args.listen,
        advertise: args.advertise,
    };
    let mut s = DeploySettings::merge(saved, given)
        .and_then(|s| s.validate().map(|()| s))
        .map_err(|why| CliError::Usage(format!("deploy {host}: {why}")))?;
    check_identity(&s, &host)?;
    let nats = if args.dry_run {
        None
    } else {
        Some(g.connect().await?)
    };
    let ctx = Ctx {
        g,
        fleet,
        nats,
        dist: args.dist,
        out,
        dry_run: args.dry_run,
    };
    if ctx.dry_run {
        out.step(
            &host,
            "dry-run",
            "dry run: only read-only commands run; the others are printed",
        );
    }
    let mut progress = Progress::default();
    let deployed = until_ctrl_c(deploy_host(
        &ctx,
        &host,
        &mut s,
        if args.reenroll {
            Enrolling::Forced
        } else {
            Enrolling::IfNeeded
        },
        args.timeout,
        &mut progress,
    ))
    .await;
    let deployed = match deployed {
        Some(deployed) => deployed,
        None => {
            // The same flags: before step 7 nothing was saved, and
            // --reenroll must be given again to replace the host's bundle.
            let again = format!("the same `flotilla deploy {host}` command");
            Err(interrupted(out, &host, &s, &mut progress, &again).await)
        }
    };
    match deployed {
        Ok(done) => {
            out.done(&host, &done, ctx.dry_run);
            Ok(())
        }
        Err(e) => {
            out.failure(&host, &e);
            if progress.changed {
                out.rollback(
                    &host,
                    &plan::rollback_command(&s, progress.sudo.unwrap_or(false)),
                );
            }
            Err(CliError::HostsFailed {
                what: "deploy",
                failed: vec![host.to_string()],
                total: 1,
                code: e.exit_code(),
                retryable: e.is_retryable(),
            })
        }
    }
}

/// `flotilla upgrade (--all | HOST...)`.
pub(super) async fn upgrade(g: &Global, args: UpgradeArgs) -> Result<(), CliError> {
    let fleet = g.fleet()?;
    let out = Out { json: args.json };
    let hosts = if args.all {
        settings::saved_hosts(&fleet.dir)?
    } else {
        args.hosts
    };
    if hosts.is_empty() {
        return Err(CliError::Usage(format!(
            "no host has saved deploy settings in {}: deploy each host once with `flotilla deploy HOST --ssh USER@ADDR`",
            fleet.dir.join("deploy").display()
        )));
    }
    // Every host's settings before any host is touched.
    let mut plans: Vec<(HostName, DeploySettings)> = Vec::new();
    for host in hosts {
        let file = settings::path(&fleet.dir, &host);
        let Some(s) = settings::load(&fleet.dir, &host)? else {
            return Err(CliError::Usage(format!(
                "{host} has no saved deploy settings ({}): deploy it once with `flotilla deploy {host} --ssh USER@ADDR`; upgrade reinstalls what deploy installed",
                file.display()
            )));
        };
        s.validate()
            .map_err(|why| CliError::Usage(format!("{}: {why}", file.display())))?;
        check_identity(&s, &host)?;
        if !plans.iter().any(|(h, _)| *h == host) {
            plans.push((host, s));
        }
    }
    let nats = if args.dry_run {
        None
    } else {
        Some(g.connect().await?)
    };
    let ctx = Ctx {
        g,
        fleet,
        nats,
        dist: args.dist,
        out,
        dry_run: args.dry_run,
    };
    let total = plans.len();
    let names: Vec<String> = plans.iter().map(|(h, _)| h.to_string()).collect();
    for (i, (host, mut s)) in plans.into_iter().enumerate() {
        out.step(
            &host,
            "upgrade",
            &format!(
                "upgrading to flotilla-agent {VERSION} ({} of {total})",
                i + 1
            ),
        );
        let mut progress = Progress::default();
        let result = until_ctrl_c(upgrade_host(
            &ctx,
            &host,
            &mut s,
            (args.force, args.no_wait, args.timeout),
            &mut progress,
        ))
        .await;
        let result = match result {
            Some(result) => result,
            None => {
                let again = format!("`flotilla deploy {host}`");
                Err(interrupted(out, &host, &s, &mut progress, &again).await)
            }
        };
        match result {
            Ok(done) => out.done(&host, &done, ctx.dry_run),
            Err(e) => {
                out.failure(&host, &e);
                if progress.changed {
                    out.rollback(
                        &host,
                        &plan::rollback_command(&s, progress.sudo.unwrap_or(false)),
                    );
                } else if !matches!(e, DeployError::Interrupted { .. }) {
                    // (An interruption's own message says so.)
                    out.note(&host, "nothing was changed on it");
                }
                let rest = names.get(i + 1..).unwrap_or_default();
                if !rest.is_empty() {
                    out.note(
                        &host,
                        &format!(
                            "not upgraded (stopped at {host}): {}; once {host} is sorted out: flotilla upgrade {}",
                            rest.join(", "),
                            rest.join(" ")
                        ),
                    );
                }
                return Err(CliError::HostsFailed {
                    what: "upgrade",
                    failed: vec![host.to_string()],
                    total,
                    code: e.exit_code(),
                    retryable: e.is_retryable(),
                });
            }
        }
    }
    Ok(())
}

/// Upgrades one host: once it runs no task (`gate`: force, no_wait, timeout),
/// the same install as deploy, never enrolling it again.
async fn upgrade_host(
    ctx: &Ctx<'_>,
    host: &HostName,
    s: &mut DeploySettings,
    (force, no_wait, timeout): (bool, bool, Duration),
    progress: &mut Progress,
) -> Result<Done, DeployError> {
    progress.doing = Some("waiting until it runs no task");
    wait_until_idle(ctx, host, force, no_wait, timeout).await?;
    deploy_host(
        ctx,
        host,
        s,
        Enrolling::Never,
        UPGRADE_ONLINE_TIMEOUT,
        progress,
    )
    .await
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("flotilla").chain(args.iter().copied()))
    }

    #[test]
    fn deploy_takes_its_flags_and_defaults_to_a_minute() {
        let cli = parse(&[
            "deploy",
            "nas",
            "--ssh",
            "root@10.0.0.5",
            "--port",
            "2222",
            "--identity",
            "/k/id",
            "--ssh-option",
            "UserKnownHostsFile=/k/known",
            "--ssh-option",
            "StrictHostKeyChecking=accept-new",
            "--storage",
            "/srv/repo",
            "--listen",
            "0.0.0.0:7443",
            "--dry-run",
            "--json",
        ])
        .expect("parse");
        assert!(cli.command.json());
        let Command::Deploy(args) = cli.command else {
            panic!("not deploy");
        };
        assert_eq!(args.host.as_str(), "nas");
        assert_eq!(args.port, Some(2222));
        assert_eq!(args.ssh_options.len(), 2);
        assert_eq!(args.timeout, Duration::from_secs(60));
        assert!(args.dry_run && !args.reenroll);
        assert!(parse(&["deploy", "nas", "--listen", "nas:7443"]).is_err());
        assert!(parse(&["deploy", "Not_A_Host"]).is_err());
    }

    #[test]
    fn upgrade_takes_hosts_or_all_and_waits_an_hour_by_default() {
        let cli = parse(&["upgrade", "nas", "web"]).expect("parse");
        let Command::Upgrade(args) = cli.command else {
            panic!("not upgrade");
        };
        assert_eq!(args.hosts.len(), 2);
        assert_eq!(args.timeout, Duration::from_secs(3600));
        assert!(!args.force && !args.no_wait);
        assert!(parse(&["upgrade", "--all", "--no-wait"]).is_ok());
        assert!(parse(&["upgrade"]).is_err(), "hosts or --all");
        assert!(parse(&["upgrade", "nas", "--all"]).is_err());
        assert!(parse(&["upgrade", "nas", "--force", "--no-wait"]).is_err());
    }

    /// The message the brief asks for, word for word, and its exit code.
    #[test]
    fn a_user_without_passwordless_sudo_is_told_what_to_do() {
        let e = DeployError::NoSudo {
            user: "admin".into(),
            addr: "10.0.0.5".into(),
        };
        assert_eq!(
            e.to_string(),
            "admin on 10.0.0.5 cannot run sudo without a password: deploy needs root on the target; \
             use root@10.0.0.5 or allow passwordless sudo for admin"
        );
        assert_eq!(e.exit_code(), EXIT_TASK);
        assert!(!e.is_retryable());
    }

    #[test]
    fn errors_say_what_to_do_and_carry_their_exit_codes() {
        let host = HostName::new("nas").expect("valid");
        let cases: Vec<(DeployError, u8, bool, &str)> = vec![
            (
                DeployError::Unreachable {
                    target: "root@nas".into(),
                    why: "Permission denied (publickey).".into(),
                },
                EXIT_HOST,
                true,
                "`ssh root@nas true`",
            ),
            (
                DeployError::Busy {
                    host: host.clone(),
                    running: "backup (task t1, 1m)".into(),
                },
                EXIT_TASK,
                true,
                "--force",
            ),
            (
                DeployError::NotOnline {
                    host: host.clone(),
                    version: "1.2.3",
                    waited: Duration::from_secs(60),
                    seen: "it is online on version 0.0.1".into(),
                },
                EXIT_HOST,
                true,
                "within 1m",
            ),
            (
                DeployError::NoBinary {
                    version: "1.2.3",
                    arch: Arch::Aarch64,
                    looked: "dist/x".into(),
                    tarball: plan::tarball_name("1.2.3", Arch::Aarch64),
                },
                EXIT_FAILURE,
                false,
                "scripts/package.sh --arch aarch64",
            ),
            (
                DeployError::Arch {
                    target: "pi@pi".into(),
                    machine: "armv7l".into(),
                },
                EXIT_TASK,
                false,
                "64-bit",
            ),
            (
                DeployError::Install {
                    target: "root@nas".into(),
                    code: Some(1),
                },
                EXIT_TASK,
                false,
                "(exit 1)",
            ),
            (
                DeployError::Revoked { host: host.clone() },
                EXIT_TASK,
                false,
                "--reenroll",
            ),
        ];
        for (e, code, retryable, says) in cases {
            let text = e.to_string();
            assert_eq!(e.exit_code(), code, "{text}");
            assert_eq!(e.is_retryable(), retryable, "{text}");
            assert!(text.contains(says), "{text}");
            assert!(!text.contains('\n'), "{text}");
        }
    }

    #[test]
    fn the_built_in_files_are_the_installer_and_the_unit() {
        assert!(INSTALL_SCRIPT.starts_with("#!/usr/bin/env bash"));
        assert!(INSTALL_SCRIPT.contains("FLOTILLA_WRITE_CONFIG"));
        assert!(INSTALL_SCRIPT.contains("install-agent: installed flotilla-agent"));
        assert!(AGENT_UNIT.contains("ExecStart=/usr/local/bin/flotilla-agent run"));
    }

    #[test]
    fn helpers_name_what_failed() {
        assert_eq!(
            last_line(b"Warning: added\nPermission denied\n\n"),
            "Permission denied"
        );
        assert_eq!(last_line(b""), "it printed no error");
        assert_eq!(first_words("umask 077 && cat > x"), "`umask 077 &&`");
        assert_eq!(exit_text(Some(2)), " (exit 2)");
        assert_eq!(while_text(Some("copying")), " while copying");
        assert_eq!(while_text(None), "");
    }

    /// Ctrl-C exits 130 with where it stopped and what that leaves, at
    /// each point a deploy can be.
    #[test]
    fn an_interruption_says_where_it_stopped_and_what_to_do() {
        let again = "the same `flotilla deploy nas` command";
        let at = |enrolled: bool, changed: bool, installed: bool| Progress {
            doing: Some("running install-agent.sh"),
            enrolled,
            changed,
            installed,
            ..Progress::default()
        };
        let cases = [
            (at(false, false, false), "nothing was changed on it"),
            (
                at(true, false, false),
                "never reached it: run the same `flotilla deploy nas` command to send it one",
            ),
            (
                at(true, true, false),
                "stopped half way (its agent may be stopped): run the same `flotilla deploy nas` \
                 command to install it again",
            ),
            (
                at(false, true, true),
                "`flotilla hosts` shows whether it came back",
            ),
        ];
        for (progress, says) in cases {
            let e = DeployError::Interrupted {
                doing: progress.doing,
                left: progress.after_interrupt(again),
            };
            let text = e.to_string();
            assert!(
                text.starts_with("interrupted (Ctrl-C) while running install-agent.sh: "),
                "{text}"
            );
            assert!(text.contains(says), "{text}");
            assert!(!text.contains('\n'), "{text}");
            assert_eq!(e.exit_code(), EXIT_CANCELLED);
            assert!(e.is_retryable());
        }
        let e = DeployError::Interrupted {
            doing: None,
            left: Progress::default().after_interrupt(again),
        };
        assert_eq!(
            e.to_string(),
            "interrupted (Ctrl-C): nothing was changed on it"
        );
    }

    /// The scratch directory holds the host's new bundle: only its owner
    /// may enter it, and it goes with everything in it on drop (which is
    /// what a Ctrl-C does to the deploy that owns it).
    #[test]
    fn the_scratch_directory_is_private_and_goes_on_drop() {
        use std::os::unix::fs::PermissionsExt;

        let scratch = Scratch::new().expect("scratch");
        let dir = scratch.path().to_path_buf();
        let mode = std::fs::metadata(&dir)
            .expect("exists")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700, "{}", dir.display());
        let file = scratch
            .write(plan::UPLOAD_SCRIPT.name, "#!/bin/sh\n")
            .expect("write");
        assert!(file.starts_with(&dir));
        drop(scratch);
        assert!(!dir.exists(), "{} is left", dir.display());
    }
}
