//! A fresh fleet for one trial, and the checks every trial ends with.
//!
//! A world is a private nats-server, a fleet made by `flotilla init`, the
//! storage agent `nas` (repository, QUIC, a restore root) and one or more
//! source agents whose backup roots hold deterministic random data written
//! before they start. The data never changes during a trial, so every
//! snapshot of a host must restore to exactly that host's backup root.
//! Every CLI call has a deadline; a call that runs past it is a failure
//! ("hung"), never a hang of the suite.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsStr;
use std::fs;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use flotilla_tests::{
    check_report, json_values, now_ms, restored_path, summary_of, tree_differences, write_random,
    Agent, CliOutput, CliProcess, Compare, Fleet, NatsServer, Serve,
};
use serde_json::Value;

use crate::eio::EioSwitch;
use crate::net::Netns;
use crate::tmpfs::Tmpfs;
use crate::trial::Trial;

/// One MiB.
pub const MIB: u64 = 1 << 20;
/// The storage host of every world.
pub const STORAGE: &str = "nas";
/// Deadline of one data-plane command (`backup --wait`, `restore --wait`,
/// `check --read-data`) in a quiet fleet: a few hundred MiB in a debug build.
pub const DATA_TIMEOUT: Duration = Duration::from_secs(180);
/// Deadline of a quick CLI command (`snapshots`, `events`, `hosts`).
pub const QUICK_TIMEOUT: Duration = Duration::from_secs(30);
/// How long agents may take to come up.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on recovery: from the fault to the job's end.
pub const RECOVERY_TIMEOUT: Duration = Duration::from_secs(180);
/// Deadline of a `backup --wait` that was running when the bus failed: it
/// must report the outcome, or fail with a clear message, within this.
pub const WAIT_CLI_TIMEOUT: Duration = Duration::from_secs(120);
/// How often the disk is looked at while waiting for the fault's moment.
const MOMENT_POLL: Duration = Duration::from_millis(5);
/// How often the CLI is asked while waiting for an event.
const EVENT_POLL: Duration = Duration::from_millis(250);

/// A source host of a world.
#[derive(Debug, Clone)]
pub struct Source {
    host: String,
    bytes: u64,
    files: usize,
    restore_root: bool,
    env: Vec<(String, String)>,
}

impl Source {
    /// `host` with `bytes` of random data in a few files.
    pub fn new(host: &str, bytes: u64) -> Self {
        Self {
            host: host.to_owned(),
            bytes,
            files: 6,
            restore_root: false,
            env: Vec::new(),
        }
    }

    /// Also give it a restore root (to be a restore's destination).
    pub fn restore_root(mut self) -> Self {
        self.restore_root = true;
        self
    }

    /// An environment variable of its agent process.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.to_owned(), value.to_owned()));
        self
    }
}

/// What a world is made of.
#[derive(Debug, Clone, Default)]
pub struct Spec {
    /// The source hosts.
    pub sources: Vec<Source>,
    /// Put nas's repository on a tmpfs of this many MiB.
    pub nas_tmpfs_mib: Option<u64>,
    /// Put every source in its own network namespace (see [`Netns`]): the
    /// bus listens on every interface, nas on `0.0.0.0` advertising the
    /// root side of the first source's link (`--advertise`).
    pub netns: bool,
    /// nas's `--listen` and `--advertise`, instead of `127.0.0.1:0`.
    pub nas_listen: Option<(String, Option<String>)>,
    /// Give nas's agent the EIO shim, switched by this flag file (see
    /// [`EioSwitch`]), for its repository directory.
    pub nas_eio: Option<PathBuf>,
}

/// A moment during a data-plane task at which to inject a fault.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Moment {
    /// Once the repository has grown by this many bytes (packs and files
    /// being written).
    Stored(u64),
    /// Once a restore target holds this many bytes.
    Restored(u64),
    /// The instant a new snapshot file appears: the commit, before the
    /// source has told anyone.
    Committed,
}

/// A trial's fleet. Dropping it kills every process, unmounts the tmpfs,
/// removes every file, and leaves the logs in the trial's sink.
#[derive(Debug)]
pub struct World {
    // Fields drop in this order: processes first, then the mount they may
    // hold files on, then the directories, then the bus.
    serve: Option<Serve>,
    agents: BTreeMap<String, Agent>,
    nets: BTreeMap<String, Netns>,
    tmpfs: Option<Tmpfs>,
    /// The fleet (directory, CLI).
    pub fleet: Fleet,
    /// The bus.
    pub nats: NatsServer,
    sink: Arc<Mutex<String>>,
    roots: BTreeMap<String, PathBuf>,
    serve_config: Option<PathBuf>,
}

impl World {
    /// Starts the bus, makes the fleet, writes every source's data, starts
    /// nas and the sources, and waits until all are online and nas serves
    /// QUIC.
    pub fn start(t: &mut Trial, spec: &Spec) -> Result<Self> {
        let nats = if spec.netns {
            NatsServer::start_on("0.0.0.0")?
        } else {
            NatsServer::start()?
        };
        // The namespaces first: the bus's TLS certificate must name the
        // address their agents dial it on.
        let mut nets = BTreeMap::new();
        if spec.netns {
            for source in &spec.sources {
                nets.insert(source.host.clone(), Netns::create()?);
            }
        }
        let names: Vec<String> = nets.values().map(Netns::root_ip).collect();
        let fleet = Fleet::init_with_names(&nats, &names)?;
        let mut world = Self {
            serve: None,
            agents: BTreeMap::new(),
            nets,
            tmpfs: None,
            fleet,
            nats,
            sink: t.log_sink(),
            roots: BTreeMap::new(),
            serve_config: None,
        };
        if let Some(mib) = spec.nas_tmpfs_mib {
            world.tmpfs = Some(Tmpfs::mount(&world.fleet.storage_dir(STORAGE), mib)?);
        }
        for source in &spec.sources {
            let root = world.fleet.backup_root(&source.host);
            write_tree(&root, source, t)?;
            world.roots.insert(source.host.clone(), root);
        }
        let mut nas_listen = spec.nas_listen.clone();
        if spec.netns {
            if let (None, Some(first)) = (&nas_listen, spec.sources.first()) {
                let port = free_udp_port()?;
                let root_ip = world.nets[&first.host].root_ip();
                nas_listen = Some((format!("0.0.0.0:{port}"), Some(format!("{root_ip}:{port}"))));
            }
        }
        let mut nas = world
            .fleet
            .agent(STORAGE)
            .without_backup_root()
            .storage()
            .restore_root();
        if let Some((listen, advertise)) = &nas_listen {
            nas = nas.listen_on(listen);
            if let Some(advertise) = advertise {
                nas = nas.args(["--advertise", advertise.as_str()]);
            }
        }
        if let Some(flag) = &spec.nas_eio {
            let dir = world.fleet.storage_dir(STORAGE);
            fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
            // As /proc/self/fd shows the files the agent opens.
            let dir = fs::canonicalize(&dir)?;
            for (key, value) in EioSwitch::new(flag).env(&dir)? {
                nas = nas.env(key, value);
            }
        }
        let nas = nas.start()?;
        world.agents.insert(STORAGE.to_owned(), nas);
        for source in &spec.sources {
            let mut builder = world.fleet.agent(&source.host);
            if source.restore_root {
                builder = builder.restore_root();
            }
            for (key, value) in &source.env {
                builder = builder.env(key, value);
            }
            if let Some(ns) = world.nets.get(&source.host) {
                let url = format!("tls://{}:{}", ns.root_ip(), world.nats.port());
                builder = builder.netns(ns.name()).nats(&url);
            }
            let agent = builder.start()?;
            world.agents.insert(source.host.clone(), agent);
        }
        let hosts: Vec<String> = world.agents.keys().cloned().collect();
        world.wait_online(&hosts, STARTUP_TIMEOUT)?;
        world.wait_quic(STORAGE)?;
        let total: u64 = spec.sources.iter().map(|s| s.bytes).sum();
        t.note(format!(
            "fleet up: nas + {} ({} MiB of data)",
            spec.sources
                .iter()
                .map(|s| format!("{} {} MiB", s.host, s.bytes / MIB))
                .collect::<Vec<_>>()
                .join(", "),
            total / MIB
        ));
        Ok(world)
    }

    // ---- processes -------------------------------------------------------

    /// The network namespace `host` runs in, if it has its own.
    pub fn net(&self, host: &str) -> Result<&Netns> {
        self.nets
            .get(host)
            .with_context(|| format!("{host} has no network namespace in this world"))
    }

    /// The QUIC address nas advertises, as `hosts --json` lists it.
    pub fn nas_quic_addr(&self) -> Result<SocketAddr> {
        let out = self.cli_ok(&["hosts", "--json"])?;
        let listed = match out.json()? {
            Value::Array(l) => l,
            other => bail!("hosts --json printed {other}"),
        };
        let addr = listed
            .iter()
            .find(|h| h["host"] == STORAGE)
            .and_then(|h| h["quic_addr"].as_str())
            .context("nas lists no QUIC address")?;
        addr.parse()
            .with_context(|| format!("nas's QUIC address {addr:?} is not ADDR:PORT"))
    }

    /// `host`'s agent.
    pub fn agent(&mut self, host: &str) -> Result<&mut Agent> {
        self.agents
            .get_mut(host)
            .with_context(|| format!("no agent {host} in this world"))
    }

    /// Kills `host`'s agent with SIGKILL.
    pub fn kill_agent(&mut self, host: &str) -> Result<()> {
        self.agent(host)?.kill9()
    }

    /// Starts `host`'s agent again (same flags and state) and waits until it
    /// is listed online (and, for nas, serves QUIC again).
    pub fn restart_agent(&mut self, host: &str) -> Result<()> {
        self.agent(host)?.restart()?;
        self.wait_online(&[host.to_owned()], STARTUP_TIMEOUT)?;
        if host == STORAGE {
            self.wait_quic(STORAGE)?;
        }
        Ok(())
    }

    /// Writes `flotilla.toml` and starts `flotilla serve` with it.
    pub fn start_serve(&mut self, config: &str) -> Result<()> {
        let path = self.fleet.dir().join("flotilla.toml");
        fs::write(&path, config).with_context(|| format!("cannot write {}", path.display()))?;
        self.serve = Some(self.fleet.serve("main", &path)?);
        self.serve_config = Some(path);
        Ok(())
    }

    /// The running daemon.
    pub fn serve(&mut self) -> Result<&mut Serve> {
        self.serve
            .as_mut()
            .context("no flotilla serve in this world")
    }

    /// Starts `flotilla serve` again with the same config and state.
    pub fn restart_serve(&mut self) -> Result<()> {
        let path = self
            .serve_config
            .clone()
            .context("serve was never started")?;
        self.serve = Some(self.fleet.serve("main", &path)?);
        Ok(())
    }

    /// The tmpfs under nas's repository, if any.
    pub fn tmpfs(&self) -> Option<&Tmpfs> {
        self.tmpfs.as_ref()
    }

    /// Replaces `host`'s data with `bytes` of new random data that shares
    /// nothing with the old (so the old snapshots' packs can become garbage).
    /// Snapshots taken before no longer match the root: forget them.
    pub fn rewrite(&mut self, t: &mut Trial, host: &str, bytes: u64) -> Result<()> {
        let root = self.root(host)?;
        for sub in ["data", "etc"] {
            let dir = root.join(sub);
            if dir.exists() {
                fs::remove_dir_all(&dir)
                    .with_context(|| format!("cannot remove {}", dir.display()))?;
            }
        }
        write_tree(&root, &Source::new(host, bytes), t)
    }

    // ---- paths -----------------------------------------------------------

    /// `host`'s backup root, which every snapshot of `host` must restore to.
    pub fn root(&self, host: &str) -> Result<PathBuf> {
        self.roots
            .get(host)
            .cloned()
            .with_context(|| format!("{host} is not a source of this world"))
    }

    /// nas's repository.
    pub fn storage_dir(&self) -> PathBuf {
        self.fleet.storage_dir(STORAGE)
    }

    /// `host`'s restore root.
    pub fn restore_root(&self, host: &str) -> PathBuf {
        self.fleet.restore_root(host)
    }

    /// Bytes in nas's packs and in files being written (`tmp/`).
    pub fn stored_bytes(&self) -> u64 {
        let dir = self.storage_dir();
        dir_bytes(&dir.join("packs")) + dir_bytes(&dir.join("tmp"))
    }

    /// Snapshot files in nas's repository.
    pub fn snapshot_files(&self) -> usize {
        fs::read_dir(self.storage_dir().join("snapshots"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.path().extension().is_some_and(|x| x == "snap"))
                    .count()
            })
            .unwrap_or(0)
    }

    // ---- the CLI ---------------------------------------------------------

    /// `flotilla ARGS…` with a deadline; running past it is an error.
    pub fn cli<S: AsRef<OsStr>>(&self, args: &[S], timeout: Duration) -> Result<CliOutput> {
        let out = self.fleet.cli_with_timeout(args, timeout)?;
        if out.timed_out {
            bail!(
                "hung: `{}` did not end within {timeout:?}:\n{out}",
                out.command
            );
        }
        Ok(out)
    }

    /// `flotilla ARGS…`, which must exit 0 within [`QUICK_TIMEOUT`].
    pub fn cli_ok<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<CliOutput> {
        let out = self.cli(args, QUICK_TIMEOUT)?;
        out.ensure_success()?;
        Ok(out)
    }

    /// Starts `flotilla backup HOSTS --to nas --wait --json` in the background.
    pub fn spawn_backup(&self, hosts: &str) -> Result<CliProcess> {
        self.fleet
            .spawn_cli(["backup", hosts, "--to", STORAGE, "--wait", "--json"])
    }

    /// `flotilla backup HOSTS --to nas --wait --json` with a deadline.
    pub fn backup(&self, hosts: &str, timeout: Duration) -> Result<CliOutput> {
        self.cli(
            &["backup", hosts, "--to", STORAGE, "--wait", "--json"],
            timeout,
        )
    }

    /// A backup of `host` that must succeed; returns its snapshot id.
    pub fn backup_ok(&self, host: &str) -> Result<String> {
        let out = self.backup(host, DATA_TIMEOUT)?;
        if !out.success() {
            bail!("the backup of {host} failed:\n{out}");
        }
        let summary = summary_of(&out, host)?;
        match summary["snapshot"].as_str() {
            Some(id) if summary["outcome"] == "succeeded" => Ok(id.to_owned()),
            _ => bail!("the backup of {host} did not succeed:\n{out}"),
        }
    }

    /// Starts `flotilla restore SNAPSHOT --to HOST:DIR --wait --json` in
    /// the background.
    pub fn spawn_restore(&self, snapshot: &str, host: &str, dir: &Path) -> Result<CliProcess> {
        let to = format!("{host}:{}", dir.display());
        self.fleet
            .spawn_cli(["restore", snapshot, "--to", to.as_str(), "--wait", "--json"])
    }

    /// Restores `snapshot` into `dir` on `host` and compares the result with
    /// `original`; returns the differences (empty: byte for byte the same).
    pub fn restore_and_compare(
        &self,
        snapshot: &str,
        host: &str,
        dir: &Path,
        original: &Path,
    ) -> Result<Vec<String>> {
        let out = self
            .spawn_restore(snapshot, host, dir)?
            .wait(DATA_TIMEOUT)?;
        if out.timed_out {
            bail!("hung: the restore of {snapshot} did not end within {DATA_TIMEOUT:?}:\n{out}");
        }
        if !out.success() {
            bail!("the restore of {snapshot} failed:\n{out}");
        }
        let summary = summary_of(&out, host)?;
        if summary["outcome"] != "succeeded" || summary["restore"]["errors"] != 0 {
            bail!("the restore of {snapshot} was not clean:\n{out}");
        }
        tree_differences(original, &restored_path(dir, original), Compare::Contents)
    }

    /// Every snapshot, as `flotilla snapshots --json` lists them.
    pub fn snapshots(&self) -> Result<Vec<Value>> {
        match self.cli_ok(&["snapshots", "--json"])?.json()? {
            Value::Array(list) => Ok(list),
            other => bail!("`flotilla snapshots --json` printed {other}, not an array"),
        }
    }

    /// `flotilla events --json --kind KIND [--host HOST]`.
    pub fn events(&self, kind: &str, host: Option<&str>) -> Result<Vec<Value>> {
        let mut args = vec!["events", "--json", "--kind", kind];
        if let Some(host) = host {
            args.extend(["--host", host]);
        }
        self.cli_ok(&args)?.json_lines()
    }

    /// The `task.finished` events of `task_id`.
    pub fn finished_events(&self, host: &str, task_id: &str) -> Result<Vec<Value>> {
        Ok(self
            .events("task.finished", Some(host))?
            .into_iter()
            .filter(|e| e["detail"]["task_id"] == task_id)
            .collect())
    }

    /// Waits until `task_id` has a `task.finished` event and returns it.
    pub fn wait_finished(&self, host: &str, task_id: &str, timeout: Duration) -> Result<Value> {
        poll(
            &format!("task {task_id} on {host} to finish"),
            timeout,
            EVENT_POLL,
            || Ok(self.finished_events(host, task_id)?.into_iter().next()),
        )
    }

    /// Waits for a `task.started` of a `kind` task on `host` whose id is not
    /// in `known`, and returns its id.
    pub fn wait_new_task(
        &self,
        host: &str,
        kind: &str,
        known: &BTreeSet<String>,
        timeout: Duration,
    ) -> Result<String> {
        poll(
            &format!("a new {kind} task to start on {host}"),
            timeout,
            EVENT_POLL,
            || {
                Ok(self
                    .events("task.started", Some(host))?
                    .iter()
                    .filter(|e| e["detail"]["task_kind"] == kind)
                    .filter_map(|e| e["detail"]["task_id"].as_str())
                    .find(|id| !known.contains(*id))
                    .map(str::to_owned))
            },
        )
    }

    /// The ids of every `kind` task that started on `host` so far.
    pub fn started_tasks(&self, host: &str, kind: &str) -> Result<BTreeSet<String>> {
        Ok(self
            .events("task.started", Some(host))?
            .iter()
            .filter(|e| e["detail"]["task_kind"] == kind)
            .filter_map(|e| e["detail"]["task_id"].as_str().map(str::to_owned))
            .collect())
    }

    /// Waits until every one of `hosts` is listed online.
    pub fn wait_online(&self, hosts: &[String], timeout: Duration) -> Result<()> {
        poll(
            &format!("{hosts:?} to be online"),
            timeout,
            Duration::from_millis(200),
            || {
                let out = self.cli_ok(&["hosts", "--json"])?;
                let listed = match out.json()? {
                    Value::Array(l) => l,
                    other => bail!("hosts --json printed {other}"),
                };
                let online = hosts.iter().all(|want| {
                    listed
                        .iter()
                        .any(|h| h["host"] == want.as_str() && h["status"] == "online")
                });
                Ok(online.then_some(()))
            },
        )
    }

    /// Waits until `host` is online with a QUIC address.
    fn wait_quic(&self, host: &str) -> Result<()> {
        poll(
            &format!("{host} to serve QUIC"),
            STARTUP_TIMEOUT,
            Duration::from_millis(200),
            || {
                let out = self.cli_ok(&["hosts", "--json"])?;
                let listed = match out.json()? {
                    Value::Array(l) => l,
                    other => bail!("hosts --json printed {other}"),
                };
                Ok(listed
                    .iter()
                    .find(|h| h["host"] == host && h["status"] == "online")
                    .and_then(|h| h["quic_addr"].as_str())
                    .filter(|a| !a.is_empty())
                    .map(|_| ()))
            },
        )
    }

    /// Waits for `moment`, looking at the disk every few milliseconds, while
    /// `running` says the task has not ended. Returns whether the moment came
    /// before the end (if not, the fault lands after the task).
    pub fn wait_moment(
        &self,
        moment: Moment,
        target: Option<&Path>,
        timeout: Duration,
        mut running: impl FnMut() -> bool,
    ) -> Result<bool> {
        let snaps_before = self.snapshot_files();
        let deadline = Instant::now() + timeout;
        loop {
            let reached = match moment {
                Moment::Stored(bytes) => self.stored_bytes() >= bytes,
                Moment::Restored(bytes) => target.is_some_and(|t| dir_bytes(t) >= bytes),
                Moment::Committed => self.snapshot_files() > snaps_before,
            };
            if reached {
                return Ok(true);
            }
            if !running() {
                return Ok(false);
            }
            if Instant::now() >= deadline {
                bail!("{moment:?} did not come within {timeout:?}");
            }
            thread::sleep(MOMENT_POLL);
        }
    }

    // ---- the pass criteria -----------------------------------------------

    /// `flotilla check nas [--read-data] --json` with a deadline.
    pub fn check(&self, read_data: bool) -> Result<CliOutput> {
        let mut args = vec!["check", STORAGE, "--json"];
        if read_data {
            args.push("--read-data");
        }
        self.cli(&args, DATA_TIMEOUT)
    }

    /// `check --read-data` must exit 0 and report `ok`.
    pub fn check_ok(&self) -> Result<()> {
        let out = self.check(true)?;
        let report = check_report(&out)?;
        if !out.success() || report["ok"] != true {
            bail!("check --read-data found problems:\n{out}");
        }
        Ok(())
    }

    /// Restores every snapshot not in `except` onto nas and compares it
    /// with its host's backup root; returns how many were compared.
    pub fn verify_snapshots(&self, t: &mut Trial, except: &BTreeSet<String>) -> Result<usize> {
        let list = self.snapshots()?;
        let mut compared = 0;
        for snap in &list {
            let id = snap["id"].as_str().context("a snapshot without id")?;
            if except.contains(id) {
                continue;
            }
            let host = snap["host"].as_str().context("a snapshot without host")?;
            let original = self.root(host)?;
            let dir = self.restore_root(STORAGE).join(format!("verify-{id}"));
            let diffs = self
                .restore_and_compare(id, STORAGE, &dir, &original)
                .with_context(|| format!("snapshot {id} of {host}"))?;
            if !diffs.is_empty() {
                bail!(
                    "snapshot {id} of {host} does not restore byte for byte:\n  {}",
                    diffs.join("\n  ")
                );
            }
            // The restored copy is not needed any more; the disk is.
            let _ = fs::remove_dir_all(&dir);
            compared += 1;
        }
        t.note(format!(
            "{compared} snapshot(s) restore byte for byte{}",
            if except.is_empty() {
                String::new()
            } else {
                format!(" ({} known damaged, skipped)", except.len())
            }
        ));
        Ok(compared)
    }

    /// No task has two `task.finished` events (a task ends once, whatever
    /// restarts happen).
    pub fn each_task_finished_once(&self) -> Result<()> {
        let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for ev in self.events("task.finished", None)? {
            let id = ev["detail"]["task_id"].as_str().unwrap_or("?").to_owned();
            let outcome = ev["detail"]["outcome"].as_str().unwrap_or("?").to_owned();
            seen.entry(id).or_default().push(outcome);
        }
        let twice: Vec<String> = seen
            .iter()
            .filter(|(_, outcomes)| outcomes.len() > 1)
            .map(|(id, outcomes)| format!("{id}: {outcomes:?}"))
            .collect();
        if !twice.is_empty() {
            bail!(
                "tasks with more than one task.finished event: {}",
                twice.join("; ")
            );
        }
        Ok(())
    }

    /// The criteria every trial ends with: `check --read-data` passes, every
    /// snapshot restores byte for byte, and every task finished once.
    pub fn verify(&self, t: &mut Trial) -> Result<()> {
        self.check_ok()?;
        t.note("check --read-data passes");
        self.verify_snapshots(t, &BTreeSet::new())?;
        self.each_task_finished_once()
    }

    /// Every log of the world: agents, daemon, bus (the tail of each).
    pub fn logs(&self) -> String {
        self.fleet.logs()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let logs = self.logs();
        if let Ok(mut sink) = self.sink.lock() {
            sink.push_str(&logs);
        }
    }
}

/// Polls `probe` every `every` until it returns `Some`, or fails after
/// `timeout` with the last error it saw.
pub fn poll<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut probe: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        match probe() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = Some(e),
        }
        if Instant::now() >= deadline {
            match last {
                Some(e) => {
                    bail!("timed out after {timeout:?} waiting for {what}; last error: {e:#}")
                }
                None => bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
        thread::sleep(every);
    }
}

/// Milliseconds since the epoch (event times are in these).
pub fn wall_ms() -> u64 {
    now_ms()
}

/// How long after `fault_ms` an event happened, by the event's own time
/// (falling back to now).
pub fn since_fault(fault_ms: u64, event: &Value) -> Duration {
    let at = event["time"].as_u64().unwrap_or_else(now_ms);
    Duration::from_millis(at.saturating_sub(fault_ms))
}

/// The snapshot a `task.finished` event of a backup names.
pub fn snapshot_of(event: &Value) -> Option<String> {
    event["detail"]["result"]["snapshot"]
        .as_str()
        .map(str::to_owned)
}

/// The summary lines of a `--json` command's output, for messages.
pub fn summary_lines(out: &CliOutput) -> String {
    json_values(out)
        .map(|values| {
            values
                .iter()
                .filter(|v| v["type"] != "progress")
                .map(Value::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        })
        .unwrap_or_else(|_| out.stdout.clone())
}

/// Sum of file sizes below `dir` (0 if missing; entries vanishing while it
/// walks are skipped: it runs beside writers).
pub fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                stack.push(entry.path());
            } else if meta.is_file() {
                total += meta.len();
            }
        }
    }
    total
}

/// Writes `source`'s data under `root`: a few big files of random sizes
/// adding up to its byte count, and a handful of small files in nested
/// directories (so trees have more than one level).
fn write_tree(root: &Path, source: &Source, t: &mut Trial) -> Result<()> {
    let files = source.files.max(1) as u64;
    let mut left = source.bytes;
    for i in 0..files {
        let len = if i + 1 == files {
            left
        } else {
            // Between half and one and a half times the average share.
            let avg = source.bytes / files;
            t.range(avg / 2, avg + avg / 2 + 1).min(left)
        };
        left -= len;
        let path = root.join(format!("data/part-{i:02}.bin"));
        write_random(&path, t.data_seed(), len)?;
    }
    for i in 0..8u64 {
        let len = t.range(0, 64 * 1024);
        let path = root.join(format!("etc/conf-{}/file-{i}.txt", i % 3));
        write_random(&path, t.data_seed(), len)?;
    }
    Ok(())
}

/// A UDP port that was free a moment ago on every interface.
pub fn free_udp_port() -> Result<u16> {
    let socket = UdpSocket::bind("0.0.0.0:0").context("cannot bind a UDP port")?;
    Ok(socket.local_addr()?.port())
}
