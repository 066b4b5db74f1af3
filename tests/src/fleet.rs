//! A fleet directory made by the real `flotilla init`, the CLI run against it,
//! and polling helpers that explain themselves when they give up.

use flotilla_protocol::permissions::{inbox_prefix, Role};
use std::ffi::{OsStr, OsString};
use std::fmt::{self, Display, Write as _};
use std::fs;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use flotilla_protocol::{
    encode, sign_task, HostName, SigningSeed, TaskBody, TaskId, TaskKind, TASK_VERSION,
};
use serde_json::Value;
use tempfile::TempDir;

use crate::agent::{Agent, AgentBuilder};
use crate::bus::{self, now_ms};
use crate::files::read_lossy;
use crate::process::{binaries, describe, hermetic, CliOutput, CliProcess};
use crate::NatsServer;

/// Default deadline of one CLI invocation.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(60);
/// How long agents may take to come up and be listed online. Generous: CI
/// machines are slow and tests run in parallel.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an expected event may take to show up in `flotilla events`.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(30);
/// Interval between two polls of a [`Fleet::wait_for`] condition.
pub const POLL: Duration = Duration::from_millis(200);
/// At most this much of each log is shown in a failure message.
const LOG_TAIL_BYTES: usize = 32 * 1024;

/// Environment variable that, when set, keeps a failed test's directory.
const KEEP_ENV: &str = "FLOTILLA_E2E_KEEP";

/// A fleet made with `flotilla init` in a temporary directory, bound to one
/// [`NatsServer`].
///
/// Layout of [`Fleet::dir`]:
///
/// ```text
/// fleet/            the coordinator's fleet directory (fleet.toml, coordinator.key)
/// bundles/<host>.toml
/// state/<host>/     agent --state-dir
/// roots/<host>/     agent --backup-root
/// storage/<host>/   agent --storage (storage hosts only)
/// restore/<host>/   agent --restore-root (when asked for)
/// logs/<host>.log   agent stdout and stderr
/// ```
///
/// When a test panics while a `Fleet` is alive, its drop prints every agent's
/// log and the NATS server's log (unless a [`Fleet::fail`] already did), and
/// with `FLOTILLA_E2E_KEEP=1` keeps the directory.
#[derive(Debug)]
pub struct Fleet {
    tmp: Option<TempDir>,
    dir: PathBuf,
    nats_url: String,
    nats_log: PathBuf,
    logs_shown: AtomicBool,
}

impl Fleet {
    /// Runs `flotilla init --fleet <dir>/fleet --nats <url>`, then
    /// `flotilla nats-config` and restarts `nats` with that configuration
    /// (TLS, the fleet's NATS identities, anonymous connections refused),
    /// then `flotilla doctor` (the streams and buckets): the bus as the
    /// README sets it up.
    pub fn init(nats: &NatsServer) -> Result<Self> {
        Self::init_with_names(nats, &[])
    }

    /// [`Fleet::init`] with more names or addresses the server's TLS
    /// certificate must be valid for (agents in network namespaces dial it
    /// on another address than loopback).
    pub fn init_with_names(nats: &NatsServer, names: &[String]) -> Result<Self> {
        let tmp = tempfile::Builder::new()
            .prefix("flotilla-e2e-")
            .tempdir()
            .context("cannot create the fleet's temporary directory")?;
        // Canonical, so that paths the agent reports match the ones we pass.
        let dir = tmp
            .path()
            .canonicalize()
            .context("cannot canonicalise the temporary directory")?;
        for sub in ["bundles", "state", "roots", "logs"] {
            fs::create_dir_all(dir.join(sub))?;
        }
        let fleet = Self {
            tmp: Some(tmp),
            dir,
            nats_url: format!("tls://127.0.0.1:{}", nats.port()),
            nats_log: nats.log_path().to_path_buf(),
            logs_shown: AtomicBool::new(false),
        };
        let fleet_dir = fleet.fleet_dir();
        let nats_url = fleet.nats_url.clone();
        fleet
            .cli([
                OsStr::new("init"),
                OsStr::new("--fleet"),
                fleet_dir.as_os_str(),
                OsStr::new("--nats"),
                OsStr::new(&nats_url),
            ])?
            .ensure_success()
            .context("flotilla init")?;
        let config = nats.dir().join("nats.conf");
        let listen = format!("{}:{}", nats.listen_host(), nats.port());
        let store = nats.dir().join("server");
        let mut args: Vec<OsString> = vec![
            "nats-config".into(),
            "--listen".into(),
            listen.into(),
            "--store".into(),
            store.into(),
            "--out".into(),
            config.clone().into(),
        ];
        for name in names {
            args.push("--name".into());
            args.push(name.into());
        }
        fleet
            .cli(args)?
            .ensure_success()
            .context("flotilla nats-config")?;
        nats.reconfigure(&config)
            .context("restart nats-server with the fleet's configuration")?;
        fleet
            .cli(["doctor"])?
            .ensure_success()
            .context("flotilla doctor")?;
        Ok(fleet)
    }

    /// The temporary directory everything of this fleet lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The coordinator's fleet directory (`FLOTILLA_FLEET`).
    pub fn fleet_dir(&self) -> PathBuf {
        self.dir.join("fleet")
    }

    /// The NATS server's URL.
    pub fn nats_url(&self) -> &str {
        &self.nats_url
    }

    /// Where `enroll` writes `host`'s bundle.
    pub fn bundle_path(&self, host: &str) -> PathBuf {
        self.dir.join("bundles").join(format!("{host}.toml"))
    }

    /// `host`'s `--state-dir`.
    pub fn state_dir(&self, host: &str) -> PathBuf {
        self.dir.join("state").join(host)
    }

    /// `host`'s `--backup-root`.
    pub fn backup_root(&self, host: &str) -> PathBuf {
        self.dir.join("roots").join(host)
    }

    /// `host`'s `--storage` directory (its repository), when it is a storage host.
    pub fn storage_dir(&self, host: &str) -> PathBuf {
        self.dir.join("storage").join(host)
    }

    /// `host`'s `--restore-root`, when it has one.
    pub fn restore_root(&self, host: &str) -> PathBuf {
        self.dir.join("restore").join(host)
    }

    /// `host`'s agent log.
    pub fn agent_log(&self, host: &str) -> PathBuf {
        self.dir.join("logs").join(format!("{host}.log"))
    }

    /// Runs `flotilla enroll HOST --fleet … --out bundles/HOST.toml` and returns
    /// the bundle's path.
    pub fn enroll(&self, host: &str) -> Result<PathBuf> {
        let out_path = self.bundle_path(host);
        let fleet_dir = self.fleet_dir();
        self.cli([
            OsStr::new("enroll"),
            OsStr::new(host),
            OsStr::new("--fleet"),
            fleet_dir.as_os_str(),
            OsStr::new("--out"),
            out_path.as_os_str(),
        ])?
        .ensure_success()
        .with_context(|| format!("flotilla enroll {host}"))?;
        Ok(out_path)
    }

    // ---- the CLI ---------------------------------------------------------

    /// Runs `flotilla ARGS…` with `FLOTILLA_FLEET` and `FLOTILLA_NATS_URL` set,
    /// killing it after [`CLI_TIMEOUT`].
    pub fn cli<I, S>(&self, args: I) -> Result<CliOutput>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.cli_with_timeout(args, CLI_TIMEOUT)
    }

    /// [`Fleet::cli`] with another deadline.
    pub fn cli_with_timeout<I, S>(&self, args: I, timeout: Duration) -> Result<CliOutput>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.spawn_cli(args)?.wait(timeout)
    }

    /// Starts `flotilla ARGS…` in the background; finish with
    /// [`CliProcess::wait`].
    pub fn spawn_cli<I, S>(&self, args: I) -> Result<CliProcess>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let bin = &binaries().flotilla;
        let mut cmd = hermetic(bin);
        cmd.args(&args)
            .env("FLOTILLA_FLEET", self.fleet_dir())
            .env("FLOTILLA_NATS_URL", &self.nats_url)
            .env("NO_COLOR", "1");
        CliProcess::spawn(cmd, describe(bin, &args))
    }

    /// Runs `flotilla ARGS…`, requires exit code 0, and parses stdout as one
    /// JSON document.
    pub fn cli_json<I, S>(&self, args: I) -> Result<Value>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.cli(args)?.ensure_success()?.json()
    }

    /// Runs `flotilla ARGS…`, requires exit code 0, and parses stdout as JSON
    /// lines.
    pub fn cli_json_lines<I, S>(&self, args: I) -> Result<Vec<Value>>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.cli(args)?.ensure_success()?.json_lines()
    }

    /// Runs `flotilla-agent ARGS…` (no fleet environment), e.g. `config check`.
    pub fn agent_cli<I, S>(&self, args: I) -> Result<CliOutput>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
        let bin = &binaries().agent;
        let mut cmd = hermetic(bin);
        cmd.args(&args);
        CliProcess::spawn(cmd, describe(bin, &args))?.wait(CLI_TIMEOUT)
    }

    /// `flotilla hosts --json`.
    pub fn hosts(&self) -> Result<Vec<Value>> {
        match self.cli_json(["hosts", "--json"])? {
            Value::Array(hosts) => Ok(hosts),
            other => bail!("`flotilla hosts --json` printed {other}, not an array"),
        }
    }

    /// `host`'s entry in `flotilla hosts --json`.
    pub fn host(&self, host: &str) -> Result<Option<Value>> {
        Ok(self.hosts()?.into_iter().find(|h| h["host"] == host))
    }

    /// Every stored event: `flotilla events --json`.
    pub fn events(&self) -> Result<Vec<Value>> {
        self.cli_json_lines(["events", "--json"])
    }

    // ---- agents ----------------------------------------------------------

    /// Options for `host`'s agent; see [`AgentBuilder`].
    pub fn agent(&self, host: &str) -> AgentBuilder<'_> {
        AgentBuilder::new(self, host)
    }

    /// Starts `host`'s agent with the default options (enrolling it first).
    pub fn start_agent(&self, host: &str) -> Result<Agent> {
        self.agent(host).start()
    }

    /// Waits until every one of `hosts` is listed online, and returns the
    /// `hosts --json` listing that showed it.
    pub fn wait_online(&self, hosts: &[&str], timeout: Duration) -> Vec<Value> {
        let what = format!("{hosts:?} to be listed online");
        self.wait_for(&what, timeout, || {
            let listed = self.hosts()?;
            let all_online = hosts.iter().all(|want| {
                listed
                    .iter()
                    .any(|h| h["host"] == *want && h["status"] == "online")
            });
            if all_online {
                Ok(Some(listed))
            } else {
                bail!("hosts: {}", summarize_hosts(&listed))
            }
        })
    }

    /// Waits until `host` is listed online with a `quic_addr` (an agent
    /// started with `--listen`), and returns that address.
    pub fn wait_quic_addr(&self, host: &str, timeout: Duration) -> SocketAddr {
        let what = format!("{host} to be listed online with a quic_addr");
        self.wait_for(&what, timeout, || {
            let entry = self.host(host)?;
            match entry {
                Some(h) if h["status"] == "online" => match h["quic_addr"].as_str() {
                    Some(addr) => match addr.parse() {
                        Ok(addr) => Ok(Some(addr)),
                        Err(_) => bail!("{host} lists an unparsable quic_addr: {h}"),
                    },
                    None => bail!("{host} is online without a quic_addr: {h}"),
                },
                Some(h) => bail!("{host}: {h}"),
                None => bail!("{host} is not listed"),
            }
        })
    }

    // ---- waiting ---------------------------------------------------------

    /// Polls `probe` every [`POLL`] until it returns `Ok(Some(_))`.
    ///
    /// `Ok(None)` and `Err(_)` both mean "not yet"; the last error is shown if
    /// the wait times out, so a probe can `bail!` with what it saw instead. On
    /// timeout this panics via [`Fleet::fail`], with every log attached.
    pub fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut probe: impl FnMut() -> Result<Option<T>>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        loop {
            match probe() {
                Ok(Some(value)) => return value,
                Ok(None) => {}
                Err(e) => last = Some(e),
            }
            if Instant::now() >= deadline {
                self.fail(WaitTimeout {
                    what,
                    timeout,
                    last: last.as_ref(),
                });
            }
            std::thread::sleep(POLL);
        }
    }

    /// [`Fleet::wait_for`] with a boolean probe.
    pub fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        mut probe: impl FnMut() -> Result<bool>,
    ) {
        self.wait_for(what, timeout, || Ok(probe()?.then_some(())));
    }

    /// [`Fleet::wait_for`] for probes that need `.await`.
    pub async fn wait_for_async<T, F, Fut>(&self, what: &str, timeout: Duration, mut probe: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Option<T>>>,
    {
        let deadline = Instant::now() + timeout;
        let mut last = None;
        loop {
            match probe().await {
                Ok(Some(value)) => return value,
                Ok(None) => {}
                Err(e) => last = Some(e),
            }
            if Instant::now() >= deadline {
                self.fail(WaitTimeout {
                    what,
                    timeout,
                    last: last.as_ref(),
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until `flotilla events --json` lists an event matching `pred`,
    /// and returns it.
    pub fn wait_for_event(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        self.wait_for(what, timeout, || {
            let events = self.events()?;
            if let Some(found) = events.iter().find(|&e| pred(e)) {
                return Ok(Some(found.clone()));
            }
            bail!(
                "none of the {} stored events matches:\n{}",
                events.len(),
                summarize_events(&events)
            )
        })
    }

    // ---- diagnostics -----------------------------------------------------

    /// Every agent log and the NATS server log (the last few KiB of each).
    pub fn logs(&self) -> String {
        let mut out = String::new();
        let mut logs: Vec<PathBuf> = fs::read_dir(self.dir.join("logs"))
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok().map(|e| e.path()))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        logs.sort();
        logs.push(self.nats_log.clone());
        for path in logs {
            let name = path
                .file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
            let _ = writeln!(out, "===== {name} ({}) =====", path.display());
            let _ = writeln!(out, "{}", tail(&read_lossy(&path), LOG_TAIL_BYTES));
        }
        out
    }

    /// Prints [`Fleet::logs`] to stderr (captured by the test harness, shown
    /// for failing tests).
    pub fn dump_logs(&self) {
        self.logs_shown.store(true, Ordering::Relaxed);
        eprintln!("{}", self.logs());
    }

    /// Fails the test with `msg` followed by every log.
    pub fn fail(&self, msg: impl Display) -> ! {
        self.logs_shown.store(true, Ordering::Relaxed);
        panic!("{msg}\n\n{}", self.logs());
    }

    // ---- signing ---------------------------------------------------------

    /// The coordinator's task-signing key, from `fleet/coordinator.key`.
    pub fn signing_seed(&self) -> Result<SigningSeed> {
        let path = self.fleet_dir().join("coordinator.key");
        let text =
            fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        SigningSeed::from_hex(text.trim())
            .with_context(|| format!("{} does not hold 64 hex digits", path.display()))
    }

    /// The fleet id, `id` in `fleet/fleet.toml`.
    pub fn fleet_id(&self) -> Result<String> {
        let path = self.fleet_dir().join("fleet.toml");
        let text =
            fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let table: toml::Table =
            toml::from_str(&text).with_context(|| format!("{} is not TOML", path.display()))?;
        table
            .get("id")
            .and_then(toml::Value::as_str)
            .map(str::to_owned)
            .with_context(|| format!("{} has no string `id`", path.display()))
    }

    /// A valid estimate task for `host` of this fleet: fresh id, issued now,
    /// expiring in ten minutes. Tests tamper with it before signing.
    pub fn estimate_task(&self, host: &str, paths: Vec<String>) -> Result<TaskBody> {
        self.task(host, TaskKind::Estimate { paths })
    }

    /// A valid task of any kind for `host` of this fleet: fresh id, issued
    /// now, expiring in ten minutes.
    pub fn task(&self, host: &str, kind: TaskKind) -> Result<TaskBody> {
        let now = now_ms();
        Ok(TaskBody {
            v: TASK_VERSION,
            id: TaskId::random(),
            fleet: self.fleet_id()?,
            host: HostName::new(host)?,
            issued_at: now,
            expires_at: now + 10 * 60 * 1000,
            kind,
            epoch: None,
        })
    }

    /// `body` signed with the fleet's key and encoded, ready to publish.
    pub fn sign(&self, body: &TaskBody) -> Result<Vec<u8>> {
        let envelope = sign_task(&self.signing_seed()?, body)?;
        Ok(encode(&envelope)?)
    }

    /// A NATS client connected to this fleet's server as the coordinator
    /// (its user may do anything).
    pub async fn nats_client(&self) -> Result<async_nats::Client> {
        let creds = self.fleet_dir().join("nats").join("coordinator.creds");
        bus::connect_as(
            &self.nats_url,
            &creds,
            &self.ca_path(),
            &inbox_prefix(&Role::Coordinator),
        )
        .await
    }

    /// A NATS client connected as `host`'s own user (from its bundle), with
    /// exactly the rights `host`'s agent has: what a compromised host holds.
    pub async fn nats_client_as_host(&self, host: &str) -> Result<async_nats::Client> {
        let text = fs::read_to_string(self.bundle_path(host))
            .with_context(|| format!("read {host}'s bundle (enroll it first)"))?;
        let bundle = flotilla_protocol::Bundle::parse(&text)?;
        let creds = bundle
            .nats_creds
            .with_context(|| format!("{host}'s bundle holds no NATS credentials"))?;
        let path = self.dir.join("bundles").join(format!("{host}.creds"));
        fs::write(&path, creds)?;
        bus::connect_as(
            &self.nats_url,
            &path,
            &self.ca_path(),
            &inbox_prefix(&Role::Host(flotilla_protocol::HostName::new(host)?)),
        )
        .await
    }

    /// Tries to connect with no credentials (TLS with the fleet CA, so a
    /// refusal is about authentication): what anyone on the LAN can try.
    pub async fn nats_client_anonymous(&self) -> Result<async_nats::Client> {
        bus::connect_anonymous(&self.nats_url, &self.ca_path()).await
    }

    /// The fleet CA certificate.
    pub fn ca_path(&self) -> PathBuf {
        self.fleet_dir().join("ca.crt")
    }

    /// How many messages the task stream has ever stored (its last
    /// sequence), read straight from JetStream: lets a test wait until a
    /// command has really sent its task.
    pub fn tasks_sent(&self) -> Result<u64> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("start a runtime for a NATS query")?;
        runtime.block_on(async {
            let js = async_nats::jetstream::new(self.nats_client().await?);
            let mut stream = js
                .get_stream(flotilla_protocol::subject::TASK_STREAM)
                .await
                .context("open the task stream")?;
            let info = stream.info().await.context("read the task stream")?;
            Ok(info.state.last_sequence)
        })
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        if !self.logs_shown.load(Ordering::Relaxed) {
            eprintln!("{}", self.logs());
        }
        if std::env::var_os(KEEP_ENV).is_some() {
            if let Some(tmp) = self.tmp.take() {
                eprintln!("{KEEP_ENV} is set: keeping {}", tmp.keep().display());
            }
        }
    }
}

/// The message of a [`Fleet::wait_for`] that gave up.
struct WaitTimeout<'a> {
    what: &'a str,
    timeout: Duration,
    last: Option<&'a anyhow::Error>,
}

impl Display for WaitTimeout<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "timed out after {:?} waiting for {}",
            self.timeout, self.what
        )?;
        if let Some(last) = self.last {
            write!(f, "\nlast observation: {last:#}")?;
        }
        Ok(())
    }
}

/// `alpha=online, beta=offline(missed_heartbeats)`.
pub fn summarize_hosts(hosts: &[Value]) -> String {
    if hosts.is_empty() {
        return "<none>".to_owned();
    }
    hosts
        .iter()
        .map(|h| {
            let name = h["host"].as_str().unwrap_or("?");
            let status = h["status"].as_str().unwrap_or("?");
            match h["offline_reason"].as_str() {
                Some(reason) => format!("{name}={status}({reason})"),
                None => format!("{name}={status}"),
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// One line per event: host, kind, and the detail fields that tell events apart.
pub fn summarize_events(events: &[Value]) -> String {
    let mut out = String::new();
    for ev in events {
        let detail = &ev["detail"];
        let _ = writeln!(
            out,
            "  {} {} task_id={} reason={} outcome={}",
            ev["host"].as_str().unwrap_or("?"),
            ev["kind"].as_str().unwrap_or("?"),
            detail["task_id"],
            detail["reason"],
            detail["outcome"],
        );
    }
    out
}

/// The last `max` bytes of `text`, cut at a character boundary.
fn tail(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}
