//! `flotilla-bench fleet`: N simulated agents against a real nats-server and
//! the real coordinator daemon, then one fleet-wide backup.
//!
//! Order: enroll one identity per simulated host with the coordinator's own
//! `Fleet::enroll` (bundles in `FLEET/sim-bundles/`, each with its host's own
//! NATS user) → connect the agents in batches ([`sim`]), each as its host,
//! over TLS, to a server `bench/run.sh` set up with `flotilla nats-config` and
//! `flotilla doctor` → wait until each has stored a heartbeat →
//! settle, sampling `flotilla serve` → run `flotilla backup --plan P --wait
//! --json` → wait until every source has its task → stop the agents → report.
//!
//! The JSON keys are the ones `bench/report.py` reads.

mod sim;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use flotilla_agent::now_ms;
use flotilla_coordinator::Fleet;
use flotilla_protocol::{Bundle, HostName, TaskId};
use futures::{StreamExt, TryStreamExt};
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdout};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::proc::{self, ProcSample};
use sim::{Receipt, Shared, SimAgent, SimIdentity};

/// The simulated storage host every plan host backs up to.
const STORAGE_HOST: &str = "sim-store";
/// Enrollments at once (each makes a key pair and writes two files).
const ENROLL_CONCURRENCY: usize = 2;
/// Agents connecting at once.
const CONNECT_BATCH: usize = 50;
/// How often waits look at the counters.
const POLL: Duration = Duration::from_millis(100);
/// How often the CLI's peak memory is read while it runs.
const PEAK_POLL: Duration = Duration::from_millis(50);
/// How long to keep listening for duplicates once every source had its task.
const DUPLICATE_GRACE: Duration = Duration::from_secs(2);
/// How long the agents get to stop before they are aborted.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// The daemon's counter of heartbeats it processed.
const HEARTBEAT_COUNTER: &str = "flotilla_heartbeats_received_total";
const METRICS_TIMEOUT: Duration = Duration::from_secs(5);
/// The agent's bounds on the heartbeat interval.
const HEARTBEAT_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(100)..=Duration::from_secs(600);
/// Lost hosts and failed summaries named in the report.
const SHOWN: usize = 20;
/// A progress line every this many agents.
const PROGRESS_EVERY: usize = 100;

/// Flags of `flotilla-bench fleet`.
#[derive(Debug, clap::Args)]
pub struct FleetArgs {
    /// Simulated source hosts, named sim-0001, sim-0002, … (plus the storage host sim-store).
    #[arg(long, default_value_t = 1000)]
    pub agents: usize,
    /// NATS server URL (JetStream enabled).
    #[arg(long, value_name = "URL")]
    pub nats: String,
    /// Fleet directory made by `flotilla init`; bundles go to DIR/sim-bundles/.
    #[arg(long, value_name = "DIR")]
    pub fleet: PathBuf,
    /// The `flotilla` binary that dispatches the backup.
    #[arg(long, value_name = "PATH")]
    pub flotilla: PathBuf,
    /// The `flotilla.toml` that `flotilla serve` runs, with the plan.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// The plan to back up: every sim-NNNN host, `to = "sim-store"`.
    #[arg(long, value_name = "NAME", default_value = "fleet")]
    pub plan: String,
    /// Process id of the running `flotilla serve`.
    #[arg(long, value_name = "PID")]
    pub serve_pid: u32,
    /// Its `/metrics` URL (for heartbeats processed per second).
    #[arg(long, value_name = "URL")]
    pub metrics: Option<String>,
    /// Heartbeat interval of every simulated agent.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub heartbeat: Duration,
    /// Idle time measured once every agent is online.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub settle: Duration,
    /// Longest wait for the agents to come online, and for the dispatch.
    #[arg(long, default_value = "300s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// NATS connections per simulated agent (the agent opens 1; with more,
    /// heartbeats use the first, tasks and events the second, the rest idle).
    #[arg(long, default_value_t = 1)]
    pub connections_per_agent: usize,
}

/// What `fleet` prints: one flat object, as `bench/report.py` reads it.
#[derive(Debug, Serialize)]
pub struct FleetReport {
    /// Simulated sources (the storage host not counted).
    pub agents: usize,
    pub storage_host: &'static str,
    pub connections_per_agent: usize,
    pub heartbeat_ms: u64,
    /// Seconds to enroll (or load) every identity.
    pub enroll_s: f64,
    /// Seconds to connect every agent and create its consumer.
    pub connect_s: f64,
    /// Seconds from the first connection until every agent had stored a heartbeat.
    pub online_s: f64,
    pub settle_s: f64,
    pub heartbeats_per_s_settle: Option<f64>,
    pub sim_heartbeats_per_s_settle: f64,
    pub serve_cpu_seconds_settle: f64,
    pub serve_cpu_percent_settle: f64,
    pub serve_rss_bytes_settle: Option<u64>,
    /// When `flotilla backup` was started, Unix ms.
    pub dispatch_t0_unix_ms: u64,
    #[serde(flatten)]
    pub delivery: Delivery,
    #[serde(flatten)]
    pub cli: CliReport,
    /// From the CLI's start until its exit and every source had its task.
    pub dispatch_window_s: f64,
    pub heartbeats_per_s_dispatch: Option<f64>,
    pub sim_heartbeats_per_s_dispatch: f64,
    pub serve_cpu_seconds_dispatch: f64,
    pub serve_cpu_percent_dispatch: f64,
    /// `flotilla serve`'s VmRSS at the end of the dispatch, and its peak
    /// during the dispatch (VmHWM reset when it began).
    pub serve_rss_bytes: Option<u64>,
    pub serve_peak_rss_bytes: Option<u64>,
    #[serde(flatten)]
    pub totals: SimTotals,
    /// The first distinct errors the simulated agents met.
    pub errors: Vec<String>,
    /// No task lost or duplicated, and `flotilla backup` exited 0.
    pub ok: bool,
}

/// How the dispatched tasks reached the sources.
#[derive(Debug, Default, Serialize)]
pub struct Delivery {
    /// Sources that received the dispatch.
    pub received: usize,
    /// Sources that never received it.
    pub lost: usize,
    pub lost_hosts: Vec<String>,
    /// Sources that received it more than once in any way below.
    pub duplicated: usize,
    /// Sources that got the same task id in two stream messages (a replay).
    pub same_task_twice: usize,
    /// Sources that got more than one task id.
    pub multiple_tasks: usize,
    /// Messages delivered again with the same stream sequence.
    pub redelivered: usize,
    /// Task messages at hosts outside the plan (the storage host).
    pub unexpected: usize,
    /// Seconds from the CLI's start until a source had its task, by percentile.
    pub receive_p50_s: Option<f64>,
    pub receive_p90_s: Option<f64>,
    pub receive_p99_s: Option<f64>,
    /// … until every source had it.
    pub receive_max_s: Option<f64>,
    /// When the last source got its task, Unix ms.
    pub last_receipt_unix_ms: Option<u64>,
}

/// How `flotilla backup --wait --json` went.
#[derive(Debug, Default, Serialize)]
pub struct CliReport {
    /// Wall time until it exited (every result was in).
    pub cli_seconds: f64,
    /// None when a signal ended it.
    pub cli_exit_code: Option<i32>,
    /// It was still running at --timeout and was killed.
    pub cli_timed_out: bool,
    pub cli_lines: u64,
    pub cli_summaries: u64,
    pub cli_succeeded: u64,
    /// Its VmHWM, read every 50 ms while it ran.
    pub cli_peak_rss_bytes: Option<u64>,
    /// The first summary lines that did not succeed.
    pub cli_failures: Vec<String>,
}

/// What the simulated agents did in all.
#[derive(Debug, Serialize)]
pub struct SimTotals {
    pub heartbeats_published: u64,
    pub heartbeat_errors: u64,
    pub events_published: u64,
    pub event_errors: u64,
    pub ack_errors: u64,
    pub stream_errors: u64,
    /// Task messages refused (forged, misaddressed, expired, replayed).
    pub rejected: u64,
    pub setup_retries: u64,
}

/// Runs the whole simulation; an error means it could not be measured.
pub async fn run(args: &FleetArgs) -> Result<FleetReport> {
    check(args)?;
    let ticks = proc::clock_ticks_per_sec();
    let shared = Arc::new(Shared::new(args.heartbeat));
    let sources = source_hosts(args.agents)?;
    let mut hosts = sources.clone();
    hosts.push(HostName::new(STORAGE_HOST).context("storage host name")?);

    let t = Instant::now();
    let ids = enroll_all(&args.fleet, hosts).await?;
    let enroll_s = t.elapsed().as_secs_f64();
    eprintln!("{} identities ready in {enroll_s:.1} s", ids.len());
    let total = ids.len() as u64;

    let cancel = CancellationToken::new();
    let mut loops = JoinSet::new();
    let t = Instant::now();
    start_agents(ids, args, &shared, &cancel, &mut loops).await?;
    let connect_s = t.elapsed().as_secs_f64();
    wait_online(&shared, total, args.timeout).await?;
    let online_s = t.elapsed().as_secs_f64();
    eprintln!(
        "all {total} simulated agents online after {online_s:.1} s; settling for {}",
        humantime::format_duration(args.settle)
    );

    let begin = mark(args, &shared).await?;
    tokio::time::sleep(args.settle).await;
    let settle = Window::between(&begin, &mark(args, &shared).await?, ticks);
    let dispatched = dispatch(args, &shared, &sources, ticks).await?;
    stop(&cancel, loops).await;

    let d = dispatched.window;
    let totals = SimTotals::of(&shared.counters);
    // A failed ack or a refused copy may hide a duplicate (JetStream would
    // redeliver after ack_wait, long after this run); both fail the run.
    let ok = dispatched.delivery.lost == 0
        && dispatched.delivery.duplicated == 0
        && dispatched.delivery.unexpected == 0
        && totals.ack_errors == 0
        && totals.rejected == 0
        && dispatched.cli.cli_exit_code == Some(0);
    let report = FleetReport {
        agents: args.agents,
        storage_host: STORAGE_HOST,
        connections_per_agent: args.connections_per_agent,
        heartbeat_ms: args.heartbeat.as_millis() as u64,
        enroll_s,
        connect_s,
        online_s,
        settle_s: settle.seconds,
        heartbeats_per_s_settle: settle.heartbeats_per_s,
        sim_heartbeats_per_s_settle: settle.sim_heartbeats_per_s,
        serve_cpu_seconds_settle: settle.cpu_seconds,
        serve_cpu_percent_settle: settle.cpu_percent,
        serve_rss_bytes_settle: settle.rss_bytes,
        dispatch_t0_unix_ms: dispatched.t0_unix_ms,
        delivery: dispatched.delivery,
        cli: dispatched.cli,
        dispatch_window_s: d.seconds,
        heartbeats_per_s_dispatch: d.heartbeats_per_s,
        sim_heartbeats_per_s_dispatch: d.sim_heartbeats_per_s,
        serve_cpu_seconds_dispatch: d.cpu_seconds,
        serve_cpu_percent_dispatch: d.cpu_percent,
        serve_rss_bytes: d.rss_bytes,
        serve_peak_rss_bytes: d.hwm_bytes,
        totals,
        errors: shared.errors(),
        ok,
    };
    print_summary(&report);
    Ok(report)
}

fn check(args: &FleetArgs) -> Result<()> {
    ensure!(args.agents >= 1, "--agents must be at least 1");
    ensure!(
        args.connections_per_agent >= 1,
        "--connections-per-agent must be at least 1"
    );
    ensure!(
        HEARTBEAT_RANGE.contains(&args.heartbeat),
        "--heartbeat must be between 100ms and 10min, as the agent's"
    );
    ensure!(
        args.flotilla.is_file(),
        "{} is not a file: pass the `flotilla` binary with --flotilla",
        args.flotilla.display()
    );
    ensure!(
        args.config.is_file(),
        "{} is not a file: pass serve's flotilla.toml with --config",
        args.config.display()
    );
    proc::sample(args.serve_pid).with_context(|| {
        format!(
            "flotilla serve (--serve-pid {}) is not running",
            args.serve_pid
        )
    })?;
    Ok(())
}

/// `sim-0001` … `sim-NNNN`, as the plan lists them.
fn source_hosts(n: usize) -> Result<Vec<HostName>> {
    (1..=n)
        .map(|i| HostName::new(format!("sim-{i:04}")).context("simulated host name"))
        .collect()
}

/// Loads or makes the bundle of every host, a few at a time.
async fn enroll_all(fleet_dir: &Path, hosts: Vec<HostName>) -> Result<Vec<SimIdentity>> {
    let fleet = Arc::new(Fleet::load(fleet_dir).with_context(|| {
        format!(
            "cannot open the fleet in {} (run `flotilla init` first)",
            fleet_dir.display()
        )
    })?);
    let dir = fleet_dir.join("sim-bundles");
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    futures::stream::iter(hosts)
        .map(|host| {
            let fleet = fleet.clone();
            let out = dir.join(format!("{host}.toml"));
            async move {
                tokio::task::spawn_blocking(move || load_or_enroll(&fleet, &host, &out))
                    .await
                    .context("enrollment crashed")?
            }
        })
        .buffer_unordered(ENROLL_CONCURRENCY)
        .try_collect()
        .await
}

/// The bundle at `out` if it is `host`'s in this fleet; otherwise enrolls
/// `host` again, as `flotilla enroll HOST --out OUT --no-repo-key` would.
fn load_or_enroll(fleet: &Fleet, host: &HostName, out: &Path) -> Result<SimIdentity> {
    let storage = host.as_str() == STORAGE_HOST;
    let ca = fleet.ca_cert_path();
    if let Ok(text) = std::fs::read_to_string(out) {
        let bundle = Bundle::parse(&text)
            .with_context(|| format!("{} is not a bundle; delete it", out.display()))?;
        if bundle.fleet == fleet.file.id && &bundle.host == host {
            return SimIdentity::from_bundle(&bundle, storage, &ca);
        }
    }
    // Missing, or left over from another fleet: a bundle of this one replaces it.
    let bundle = fleet
        .enroll(host, out, None, false, true)
        .with_context(|| format!("cannot enroll {host}"))?;
    SimIdentity::from_bundle(&bundle, storage, &ca)
}

/// Connects every agent, [`CONNECT_BATCH`] at a time, and starts its two loops.
async fn start_agents(
    ids: Vec<SimIdentity>,
    args: &FleetArgs,
    shared: &Arc<Shared>,
    cancel: &CancellationToken,
    loops: &mut JoinSet<()>,
) -> Result<()> {
    let total = ids.len();
    let mut setups = futures::stream::iter(ids)
        .map(|id| SimAgent::connect(id, &args.nats, args.connections_per_agent, shared))
        .buffer_unordered(CONNECT_BATCH);
    let mut started = 0;
    while let Some(setup) = setups.next().await {
        let (agent, consumer) = setup?;
        let agent = Arc::new(agent);
        loops.spawn(sim::heartbeats(
            agent.clone(),
            shared.clone(),
            cancel.clone(),
        ));
        loops.spawn(sim::tasks(agent, consumer, shared.clone(), cancel.clone()));
        started += 1;
        if started % PROGRESS_EVERY == 0 || started == total {
            eprintln!("  {started}/{total} simulated agents connected");
        }
    }
    Ok(())
}

/// Waits until `total` agents have stored their first heartbeat.
async fn wait_online(shared: &Shared, total: u64, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let online = sim::get(&shared.counters.online);
        if online >= total {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "only {online} of {total} simulated agents stored a heartbeat within {}; see the errors above",
                humantime::format_duration(timeout)
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Readings at one moment: the daemon's process and counter, the sim's count.
#[derive(Debug, Clone, Copy)]
struct Mark {
    serve: ProcSample,
    heartbeats_received: Option<f64>,
    sim_heartbeats: u64,
}

async fn mark(args: &FleetArgs, shared: &Shared) -> Result<Mark> {
    let heartbeats_received = match &args.metrics {
        Some(url) => scrape_counter(url, HEARTBEAT_COUNTER).await,
        None => None,
    };
    let serve = proc::sample(args.serve_pid).with_context(|| {
        format!(
            "flotilla serve (pid {}) is gone; see its log",
            args.serve_pid
        )
    })?;
    Ok(Mark {
        serve,
        heartbeats_received,
        sim_heartbeats: sim::get(&shared.counters.heartbeats),
    })
}

/// What happened between two marks.
#[derive(Debug, Clone, Copy)]
struct Window {
    seconds: f64,
    cpu_seconds: f64,
    cpu_percent: f64,
    rss_bytes: Option<u64>,
    hwm_bytes: Option<u64>,
    heartbeats_per_s: Option<f64>,
    sim_heartbeats_per_s: f64,
}

impl Window {
    fn between(begin: &Mark, end: &Mark, ticks: u64) -> Window {
        let seconds = end.serve.at.duration_since(begin.serve.at).as_secs_f64();
        let rate = |n: f64| if seconds > 0.0 { n / seconds } else { 0.0 };
        let ticks_used = end.serve.cpu_ticks.saturating_sub(begin.serve.cpu_ticks);
        let cpu_seconds = ticks_used as f64 / ticks.max(1) as f64;
        let sim_beats = end.sim_heartbeats.saturating_sub(begin.sim_heartbeats);
        Window {
            seconds,
            cpu_seconds,
            cpu_percent: rate(cpu_seconds) * 100.0,
            rss_bytes: end.serve.rss_bytes,
            hwm_bytes: end.serve.hwm_bytes,
            heartbeats_per_s: begin
                .heartbeats_received
                .zip(end.heartbeats_received)
                .map(|(a, b)| rate(b - a)),
            sim_heartbeats_per_s: rate(sim_beats as f64),
        }
    }
}

/// The value of counter `name` on the metrics page at `url`; None (with a
/// note on stderr) when the page or the counter is missing.
async fn scrape_counter(url: &str, name: &'static str) -> Option<f64> {
    let owned = url.to_owned();
    let scraped = tokio::task::spawn_blocking(move || -> Result<String> {
        let response = ureq::get(&owned)
            .timeout(METRICS_TIMEOUT)
            .call()
            .map_err(|e| anyhow!("{e}"))?;
        response.into_string().context("read the metrics page")
    })
    .await;
    match scraped {
        Ok(Ok(text)) => {
            let value = parse_counter(&text, name);
            if value.is_none() {
                eprintln!("note: {url} has no {name}; heartbeats/s reported as null");
            }
            value
        }
        Ok(Err(e)) => {
            eprintln!("cannot scrape {url}: {e:#}");
            None
        }
        Err(e) => {
            eprintln!("scraping {url} crashed: {e}");
            None
        }
    }
}

/// The sum of every sample of `name` in a Prometheus text page.
fn parse_counter(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let rest = line.strip_prefix(name)?;
            let rest = match rest.strip_prefix('{') {
                Some(labelled) => &labelled[labelled.find('}')? + 1..],
                None => rest,
            };
            // Anything but a blank here is a longer metric name.
            if !rest.starts_with(|c: char| c.is_whitespace()) {
                return None;
            }
            rest.split_whitespace().next()?.parse::<f64>().ok()
        })
        .reduce(|a, b| a + b)
}

/// What the dispatch measured.
#[derive(Debug)]
struct Dispatched {
    t0_unix_ms: u64,
    cli: CliReport,
    delivery: Delivery,
    window: Window,
}

/// Runs `flotilla backup --plan P --wait --json` and waits until every source
/// has its task (or `--timeout` passes).
async fn dispatch(
    args: &FleetArgs,
    shared: &Shared,
    sources: &[HostName],
    ticks: u64,
) -> Result<Dispatched> {
    // The serve peak reported is the dispatch's, not the connection storm's.
    let peak_reset = proc::reset_peak_rss(args.serve_pid);
    if !peak_reset {
        eprintln!("cannot reset flotilla serve's peak RSS: the figure is its lifetime peak");
    }
    let begin = mark(args, shared).await?;
    let t0 = shared.start.elapsed();
    let t0_unix_ms = now_ms();
    let deadline = tokio::time::Instant::now() + args.timeout;
    eprintln!(
        "dispatching: {} backup --plan {} --wait --json",
        args.flotilla.display(),
        args.plan
    );
    let cli = run_cli(args, deadline).await?;
    eprintln!(
        "flotilla backup exited with {:?} after {:.1} s: {} of {} summaries succeeded",
        cli.cli_exit_code, cli.cli_seconds, cli.cli_succeeded, cli.cli_summaries
    );
    let all_in = wait_for_receipts(shared, sources, t0, deadline).await;
    let end = mark(args, shared).await?;
    if all_in {
        tokio::time::sleep(DUPLICATE_GRACE).await;
    }
    Ok(Dispatched {
        t0_unix_ms,
        cli,
        delivery: analyse(sources, &shared.receipts(), t0),
        window: Window::between(&begin, &end, ticks),
    })
}

/// Runs the CLI to its end (killing it at `deadline`), reading its JSON lines
/// and its peak memory.
async fn run_cli(args: &FleetArgs, deadline: tokio::time::Instant) -> Result<CliReport> {
    let started = Instant::now();
    let mut child = tokio::process::Command::new(&args.flotilla)
        .arg("--fleet")
        .arg(&args.fleet)
        .arg("--nats")
        .arg(&args.nats)
        .args(["backup", "--plan", args.plan.as_str(), "--config"])
        .arg(&args.config)
        .args(["--wait", "--json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot run {}", args.flotilla.display()))?;
    let stdout = child
        .stdout
        .take()
        .context("flotilla's stdout was not captured")?;
    let reader = tokio::spawn(read_cli_output(stdout));
    let end = watch_child(&mut child, deadline).await?;
    let cli_seconds = started.elapsed().as_secs_f64();
    let lines = reader.await.context("reading flotilla's output crashed")?;
    Ok(CliReport {
        cli_seconds,
        cli_exit_code: end.exit_code,
        cli_timed_out: end.timed_out,
        cli_peak_rss_bytes: end.peak_rss_bytes,
        ..lines
    })
}

/// How a child process ended.
#[derive(Debug)]
struct ChildEnd {
    exit_code: Option<i32>,
    timed_out: bool,
    peak_rss_bytes: Option<u64>,
}

/// Waits for `child`, reading its VmHWM every [`PEAK_POLL`]; kills it at `deadline`.
async fn watch_child(child: &mut Child, deadline: tokio::time::Instant) -> Result<ChildEnd> {
    let pid = child.id();
    let mut peak_rss_bytes: Option<u64> = None;
    let mut poll = tokio::time::interval(PEAK_POLL);
    loop {
        tokio::select! {
            status = child.wait() => {
                let status = status.context("cannot wait for flotilla backup")?;
                return Ok(ChildEnd { exit_code: status.code(), timed_out: false, peak_rss_bytes });
            }
            _ = tokio::time::sleep_until(deadline) => {
                eprintln!("flotilla backup still runs at --timeout; killing it");
                child.start_kill().context("cannot kill flotilla backup")?;
                let status = child.wait().await.context("cannot wait for flotilla backup")?;
                return Ok(ChildEnd { exit_code: status.code(), timed_out: true, peak_rss_bytes });
            }
            _ = poll.tick() => {
                if let Some(hwm) = pid.and_then(proc::peak_rss) {
                    peak_rss_bytes = Some(peak_rss_bytes.map_or(hwm, |p| p.max(hwm)));
                }
            }
        }
    }
}

/// Counts the CLI's output lines and its `summary` lines by outcome.
async fn read_cli_output(stdout: ChildStdout) -> CliReport {
    let mut report = CliReport::default();
    let mut lines = BufReader::new(stdout).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        report.cli_lines += 1;
        let Ok(value) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if value["type"] != "summary" {
            continue;
        }
        report.cli_summaries += 1;
        if value["outcome"] == "succeeded" {
            report.cli_succeeded += 1;
        } else if report.cli_failures.len() < SHOWN {
            report.cli_failures.push(line);
        }
    }
    report
}

/// Waits until every source has a task received since `t0`; false at `deadline`.
async fn wait_for_receipts(
    shared: &Shared,
    sources: &[HostName],
    t0: Duration,
    deadline: tokio::time::Instant,
) -> bool {
    loop {
        if shared.received_since(sources, t0) == sources.len() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Stops every simulated agent: no heartbeat, event or ack after this.
async fn stop(cancel: &CancellationToken, mut loops: JoinSet<()>) {
    cancel.cancel();
    let stopped = tokio::time::timeout(STOP_GRACE, async {
        while loops.join_next().await.is_some() {}
    })
    .await;
    if stopped.is_err() {
        eprintln!("some simulated agents did not stop in time; aborting them");
        loops.abort_all();
    }
}

/// Who received the dispatch (receipts at or after `t0`), how fast, and how often.
fn analyse(
    sources: &[HostName],
    receipts: &HashMap<HostName, Vec<Receipt>>,
    t0: Duration,
) -> Delivery {
    let mut d = Delivery::default();
    let mut latencies = Vec::with_capacity(sources.len());
    for host in sources {
        let mine: Vec<&Receipt> = receipts
            .get(host)
            .map(|r| r.iter().filter(|r| r.at >= t0).collect())
            .unwrap_or_default();
        let Some(first) = mine.iter().min_by_key(|r| r.at) else {
            d.lost += 1;
            if d.lost_hosts.len() < SHOWN {
                d.lost_hosts.push(host.to_string());
            }
            continue;
        };
        d.received += 1;
        latencies.push(first.at.saturating_sub(t0).as_secs_f64());
        d.last_receipt_unix_ms = d.last_receipt_unix_ms.max(Some(first.unix_ms));
        let r = Repeats::of(&mine);
        d.multiple_tasks += usize::from(r.tasks > 1);
        d.same_task_twice += usize::from(r.replayed);
        d.redelivered += r.redelivered;
        d.duplicated += usize::from(r.tasks > 1 || r.replayed || r.redelivered > 0);
    }
    d.unexpected = receipts
        .iter()
        .filter(|(host, _)| !sources.contains(*host))
        .map(|(_, r)| r.iter().filter(|r| r.at >= t0).count())
        .sum();
    latencies.sort_by(f64::total_cmp);
    d.receive_p50_s = percentile(&latencies, 50.0);
    d.receive_p90_s = percentile(&latencies, 90.0);
    d.receive_p99_s = percentile(&latencies, 99.0);
    d.receive_max_s = latencies.last().copied();
    d
}

/// How one host's receipts repeat.
#[derive(Debug, PartialEq)]
struct Repeats {
    /// Distinct task ids.
    tasks: usize,
    /// Some task id came in two different stream messages.
    replayed: bool,
    /// Deliveries of a (task id, stream sequence) already delivered.
    redelivered: usize,
}

impl Repeats {
    fn of(receipts: &[&Receipt]) -> Repeats {
        let mut by_task: HashMap<&TaskId, Vec<u64>> = HashMap::new();
        for r in receipts {
            by_task.entry(&r.task_id).or_default().push(r.stream_seq);
        }
        let (mut replayed, mut redelivered) = (false, 0);
        for seqs in by_task.values_mut() {
            let deliveries = seqs.len();
            seqs.sort_unstable();
            seqs.dedup();
            replayed |= seqs.len() > 1;
            redelivered += deliveries - seqs.len();
        }
        Repeats {
            tasks: by_task.len(),
            replayed,
            redelivered,
        }
    }
}

/// Nearest-rank percentile `p` (0–100) of ascending `sorted`.
fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    let last = sorted.len().checked_sub(1)?;
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.saturating_sub(1).min(last)).copied()
}

impl SimTotals {
    fn of(c: &sim::Counters) -> SimTotals {
        SimTotals {
            heartbeats_published: sim::get(&c.heartbeats),
            heartbeat_errors: sim::get(&c.heartbeat_errors),
            events_published: sim::get(&c.events),
            event_errors: sim::get(&c.event_errors),
            ack_errors: sim::get(&c.ack_errors),
            stream_errors: sim::get(&c.stream_errors),
            rejected: sim::get(&c.rejected),
            setup_retries: sim::get(&c.setup_retries),
        }
    }
}

/// The headline figures, for a person watching stderr.
fn print_summary(r: &FleetReport) {
    let secs = |v: Option<f64>| v.map_or("-".to_owned(), |s| format!("{s:.2} s"));
    let mib = |v: Option<u64>| {
        v.map_or("-".to_owned(), |b| {
            format!("{:.1} MiB", b as f64 / 1048576.0)
        })
    };
    let d = &r.delivery;
    eprintln!(
        "every source had its task after {} (p50 {}, p99 {}); lost {}, duplicated {}, redelivered {}",
        secs(d.receive_max_s),
        secs(d.receive_p50_s),
        secs(d.receive_p99_s),
        d.lost,
        d.duplicated,
        d.redelivered
    );
    eprintln!(
        "flotilla serve: {:.1}% CPU idle, {:.1}% over the dispatch; RSS {} (peak {})",
        r.serve_cpu_percent_settle,
        r.serve_cpu_percent_dispatch,
        mib(r.serve_rss_bytes),
        mib(r.serve_peak_rss_bytes)
    );
    eprintln!("{}", if r.ok { "OK" } else { "FAILED: see the report" });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receipt(task: &str, seq: u64, at_ms: u64) -> Receipt {
        Receipt {
            task_id: TaskId::new(task).expect("valid task id"),
            stream_seq: seq,
            unix_ms: 1_700_000_000_000 + at_ms,
            at: Duration::from_millis(at_ms),
        }
    }

    fn host(name: &str) -> HostName {
        HostName::new(name).expect("valid host name")
    }

    #[test]
    fn delivery_counts_lost_duplicated_and_redelivered_hosts() {
        let sources = [
            host("sim-0001"),
            host("sim-0002"),
            host("sim-0003"),
            host("sim-0004"),
        ];
        let mut receipts = HashMap::new();
        // Before t0: an older task, not part of this dispatch.
        receipts.insert(
            sources[0].clone(),
            vec![receipt("old", 1, 10), receipt("a", 5, 1100)],
        );
        receipts.insert(
            sources[1].clone(),
            vec![receipt("b", 6, 1300), receipt("b", 6, 1900)],
        );
        receipts.insert(
            sources[2].clone(),
            vec![receipt("c", 7, 1200), receipt("c", 9, 1250)],
        );
        receipts.insert(host("sim-store"), vec![receipt("x", 8, 1500)]);
        let d = analyse(&sources, &receipts, Duration::from_secs(1));
        assert_eq!((d.received, d.lost), (3, 1));
        assert_eq!(d.lost_hosts, vec!["sim-0004".to_owned()]);
        assert_eq!(d.duplicated, 2);
        assert_eq!(d.same_task_twice, 1);
        assert_eq!(d.redelivered, 1);
        assert_eq!(d.multiple_tasks, 0);
        assert_eq!(d.unexpected, 1);
        assert_eq!(d.receive_max_s, Some(0.3));
        assert_eq!(d.last_receipt_unix_ms, Some(1_700_000_001_300));
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), Some(50.0));
        assert_eq!(percentile(&v, 99.0), Some(99.0));
        assert_eq!(percentile(&[], 50.0), None);
        assert_eq!(percentile(&[2.0], 90.0), Some(2.0));
    }

    #[test]
    fn counters_are_summed_over_labels_and_not_confused_with_longer_names() {
        let page = "# HELP flotilla_heartbeats_received_total x\n\
                    flotilla_heartbeats_received_total 40\n\
                    flotilla_heartbeats_received_total_extra 7\n\
                    flotilla_heartbeats_received_total{host=\"a\"} 2 1700000000\n";
        assert_eq!(parse_counter(page, HEARTBEAT_COUNTER), Some(42.0));
        assert_eq!(parse_counter("other 1\n", HEARTBEAT_COUNTER), None);
    }
}
