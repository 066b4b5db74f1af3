//! `flotilla-agent` processes.

use std::ffi::OsString;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::files::{read_lossy, seed_backup_root};
use crate::process::{binaries, describe, hermetic, CliOutput, CliProcess};
use crate::{Fleet, CLI_TIMEOUT};

/// Options for one agent; made by [`Fleet::agent`], finished by
/// [`AgentBuilder::start`] or [`AgentBuilder::config_check`].
#[derive(Debug)]
pub struct AgentBuilder<'f> {
    fleet: &'f Fleet,
    host: String,
    heartbeat: String,
    backup_root: bool,
    storage: bool,
    listen: Option<String>,
    nats: Option<String>,
    netns: Option<String>,
    restore_root: bool,
    extra: Vec<OsString>,
    envs: Vec<(OsString, OsString)>,
}

/// Where agents listen unless told otherwise.
const LOOPBACK_ANY_PORT: &str = "127.0.0.1:0";

impl<'f> AgentBuilder<'f> {
    pub(crate) fn new(fleet: &'f Fleet, host: &str) -> Self {
        Self {
            fleet,
            host: host.to_owned(),
            heartbeat: "1s".to_owned(),
            backup_root: true,
            storage: false,
            listen: None,
            nats: None,
            netns: None,
            restore_root: false,
            extra: Vec::new(),
            envs: Vec::new(),
        }
    }

    /// Makes this a storage host: `--storage storage/<host>` (created empty)
    /// and `--listen 127.0.0.1:0`; the real bound address is advertised as
    /// `quic_addr` (see [`Fleet::wait_quic_addr`]).
    pub fn storage(mut self) -> Self {
        self.storage = true;
        self.listen
            .get_or_insert_with(|| LOOPBACK_ANY_PORT.to_owned());
        self
    }

    /// `--listen 127.0.0.1:0` alone: serves QUIC without keeping a repository.
    pub fn listen(mut self) -> Self {
        self.listen
            .get_or_insert_with(|| LOOPBACK_ANY_PORT.to_owned());
        self
    }

    /// `--listen ADDR` instead of `127.0.0.1:0`.
    pub fn listen_on(mut self, addr: &str) -> Self {
        self.listen = Some(addr.to_owned());
        self
    }

    /// `--nats URL` instead of the fleet's server on loopback (an agent in
    /// another network namespace reaches the bus by another address).
    pub fn nats(mut self, url: &str) -> Self {
        self.nats = Some(url.to_owned());
        self
    }

    /// Runs the agent in the network namespace `name` (`ip netns exec`,
    /// which execs the agent: its pid is the agent's). Needs root.
    pub fn netns(mut self, name: &str) -> Self {
        self.netns = Some(name.to_owned());
        self
    }

    /// `--restore-root restore/<host>` (created empty).
    pub fn restore_root(mut self) -> Self {
        self.restore_root = true;
        self
    }

    /// `--heartbeat-interval` (default `1s`, so that missed heartbeats are
    /// noticed within seconds).
    pub fn heartbeat_interval(mut self, interval: &str) -> Self {
        self.heartbeat = interval.to_owned();
        self
    }

    /// Leaves out the default `--backup-root roots/<host>`.
    pub fn without_backup_root(mut self) -> Self {
        self.backup_root = false;
        self
    }

    /// One more command-line argument, after the default ones.
    pub fn arg(mut self, arg: impl Into<OsString>) -> Self {
        self.extra.push(arg.into());
        self
    }

    /// More command-line arguments, after the default ones.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.extra.extend(args.into_iter().map(Into::into));
        self
    }

    /// An environment variable for the agent process, kept across
    /// [`Agent::restart`]s (e.g. `LD_PRELOAD` of a fault-injection library).
    pub fn env(mut self, key: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.envs.push((key.into(), value.into()));
        self
    }

    /// Enrolls the host if needed, creates its state directory and backup root
    /// (seeded with a few files the first time), and returns the flags that
    /// follow `run` or `config check`.
    pub fn flags(&self) -> Result<Vec<OsString>> {
        let fleet = self.fleet;
        let bundle = fleet.bundle_path(&self.host);
        if !bundle.exists() {
            fleet.enroll(&self.host)?;
        }
        let state = fleet.state_dir(&self.host);
        fs::create_dir_all(&state).with_context(|| format!("cannot create {}", state.display()))?;
        let mut flags: Vec<OsString> = vec![
            "--bundle".into(),
            bundle.into(),
            "--state-dir".into(),
            state.into(),
            "--nats".into(),
            self.nats
                .clone()
                .unwrap_or_else(|| fleet.nats_url().to_owned())
                .into(),
        ];
        if self.backup_root {
            let root = fleet.backup_root(&self.host);
            if !root.exists() {
                seed_backup_root(&root, &self.host)?;
            }
            flags.push("--backup-root".into());
            flags.push(root.into());
        }
        if self.storage {
            let dir = fleet.storage_dir(&self.host);
            fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
            flags.push("--storage".into());
            flags.push(dir.into());
        }
        if let Some(addr) = &self.listen {
            flags.push("--listen".into());
            flags.push(addr.into());
        }
        if self.restore_root {
            let dir = fleet.restore_root(&self.host);
            fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
            flags.push("--restore-root".into());
            flags.push(dir.into());
        }
        flags.push("--heartbeat-interval".into());
        flags.push(self.heartbeat.clone().into());
        flags.extend(self.extra.iter().cloned());
        Ok(flags)
    }

    /// Runs `flotilla-agent config check` with the same flags `start` would use.
    pub fn config_check(self) -> Result<CliOutput> {
        let mut args: Vec<OsString> = vec!["config".into(), "check".into()];
        args.extend(self.flags()?);
        self.fleet.agent_cli(args)
    }

    /// Spawns `flotilla-agent run …`, logging to `logs/<host>.log`.
    pub fn start(self) -> Result<Agent> {
        let agent_bin = binaries().agent.clone();
        let (bin, mut args): (PathBuf, Vec<OsString>) = match &self.netns {
            Some(ns) => (
                PathBuf::from("ip"),
                vec![
                    "netns".into(),
                    "exec".into(),
                    ns.into(),
                    agent_bin.into_os_string(),
                ],
            ),
            None => (agent_bin, Vec::new()),
        };
        args.push("run".into());
        args.extend(self.flags()?);
        let fleet = self.fleet;
        let mut agent = Agent {
            host: self.host.clone(),
            bin,
            args,
            log: fleet.agent_log(&self.host),
            state_dir: fleet.state_dir(&self.host),
            backup_root: self.backup_root.then(|| fleet.backup_root(&self.host)),
            storage_dir: self.storage.then(|| fleet.storage_dir(&self.host)),
            restore_root: self.restore_root.then(|| fleet.restore_root(&self.host)),
            bundle: fleet.bundle_path(&self.host),
            envs: self.envs,
            child: None,
            last_exit: None,
            starts: 0,
        };
        agent.spawn()?;
        Ok(agent)
    }
}

/// A running (or stopped) `flotilla-agent run` process.
///
/// Killed with SIGKILL on drop if still running. Its log file outlives it, for
/// [`Fleet::logs`].
#[derive(Debug)]
pub struct Agent {
    host: String,
    bin: PathBuf,
    args: Vec<OsString>,
    log: PathBuf,
    state_dir: PathBuf,
    backup_root: Option<PathBuf>,
    storage_dir: Option<PathBuf>,
    restore_root: Option<PathBuf>,
    bundle: PathBuf,
    envs: Vec<(OsString, OsString)>,
    child: Option<Child>,
    last_exit: Option<ExitStatus>,
    starts: u32,
}

impl Agent {
    fn spawn(&mut self) -> Result<()> {
        if let Some(parent) = self.log.parent() {
            fs::create_dir_all(parent)?;
        }
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("cannot open {}", self.log.display()))?;
        self.starts += 1;
        writeln!(
            log,
            "=== flotilla-e2e: start #{} of {} ===",
            self.starts,
            describe(&self.bin, &self.args)
        )?;
        let rust_log = std::env::var_os("RUST_LOG").unwrap_or_else(|| "info".into());
        let mut cmd = hermetic(&self.bin);
        cmd.args(&self.args)
            .env("RUST_LOG", rust_log)
            .env("RUST_BACKTRACE", "1")
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", self.bin.display()))?;
        self.child = Some(child);
        self.last_exit = None;
        Ok(())
    }

    /// The host name.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// `--state-dir`.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// `--backup-root`, if it was given.
    ///
    /// # Panics
    ///
    /// If the agent was built [`without_backup_root`](AgentBuilder::without_backup_root).
    pub fn backup_root(&self) -> &Path {
        self.backup_root
            .as_deref()
            .expect("this agent was started without a backup root")
    }

    /// `--storage`, the repository directory.
    ///
    /// # Panics
    ///
    /// If the agent was not built with [`storage`](AgentBuilder::storage).
    pub fn storage_dir(&self) -> &Path {
        self.storage_dir
            .as_deref()
            .expect("this agent was started without --storage")
    }

    /// `--restore-root`.
    ///
    /// # Panics
    ///
    /// If the agent was not built with [`restore_root`](AgentBuilder::restore_root).
    pub fn restore_root(&self) -> &Path {
        self.restore_root
            .as_deref()
            .expect("this agent was started without --restore-root")
    }

    /// `--bundle`.
    pub fn bundle(&self) -> &Path {
        &self.bundle
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process has not exited.
    pub fn is_running(&mut self) -> bool {
        self.reap();
        self.child.is_some()
    }

    /// How the last run ended, once it has.
    pub fn last_exit(&mut self) -> Option<ExitStatus> {
        self.reap();
        self.last_exit
    }

    /// Reaps the child if it has exited.
    fn reap(&mut self) {
        if let Some(child) = &mut self.child {
            if let Ok(Some(status)) = child.try_wait() {
                self.last_exit = Some(status);
                self.child = None;
            }
        }
    }

    /// Asks the agent to stop cleanly.
    pub fn sigterm(&mut self) -> Result<()> {
        self.signal(Signal::SIGTERM)
    }

    fn signal(&mut self, signal: Signal) -> Result<()> {
        self.reap();
        let Some(child) = &self.child else {
            bail!(
                "agent {} is not running (last exit: {:?})",
                self.host,
                self.last_exit
            );
        };
        let pid = Pid::from_raw(i32::try_from(child.id()).context("pid out of range")?);
        kill(pid, signal).with_context(|| format!("cannot send {signal} to agent {}", self.host))
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            self.reap();
            if self.child.is_none() {
                return self
                    .last_exit
                    .with_context(|| format!("agent {} was never started", self.host));
            }
            if Instant::now() >= deadline {
                bail!(
                    "agent {} did not exit within {timeout:?}; its log:\n{}",
                    self.host,
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Freezes the process (SIGSTOP) at whatever it is doing, so a test can
    /// look at the world at a known moment; [`Agent::resume`] thaws it. A
    /// frozen agent is still killed on drop.
    pub fn pause(&mut self) -> Result<()> {
        self.signal(Signal::SIGSTOP)
    }

    /// Thaws a process frozen by [`Agent::pause`].
    pub fn resume(&mut self) -> Result<()> {
        self.signal(Signal::SIGCONT)
    }

    /// Kills the process with SIGKILL, as a crash or power loss would, and reaps it.
    pub fn kill9(&mut self) -> Result<()> {
        self.signal(Signal::SIGKILL)?;
        self.wait_exit(Duration::from_secs(10))?;
        Ok(())
    }

    /// Starts the agent again with the same arguments and state directory.
    pub fn restart(&mut self) -> Result<()> {
        if self.is_running() {
            bail!(
                "agent {} is still running; stop it before restarting",
                self.host
            );
        }
        self.spawn()
    }

    /// The agent's stdout and stderr so far, across restarts.
    pub fn log(&self) -> String {
        read_lossy(&self.log)
    }

    /// Runs `flotilla-agent` with other arguments (e.g. `config check`), with
    /// the agent's own flags appended.
    pub fn run_subcommand<I, S>(&self, subcommand: I) -> Result<CliOutput>
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        let mut args: Vec<OsString> = subcommand.into_iter().map(Into::into).collect();
        // Skip the leading `run`.
        args.extend(self.args.iter().skip(1).cloned());
        let mut cmd = hermetic(&self.bin);
        cmd.args(&args);
        CliProcess::spawn(cmd, describe(&self.bin, &args))?.wait(CLI_TIMEOUT)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
