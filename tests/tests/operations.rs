//! Operations: `flotilla serve` running a plan on its schedule and reporting
//! it to Prometheus, standing by behind another daemon until it stops, and
//! raising watchdog events to a webhook; `flotilla config check`.
//!
//! Plans run `* * * * *`, so a scheduled test waits for the next minute
//! boundary (up to a minute) before anything happens. Every daemon ticks once
//! a second. A failing test prints the daemons' logs along with the agents'.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::bail;
use flotilla_tests::{
    flotilla_cli, free_port, now_ms, parse_prometheus, scrape_metrics, summarize_events,
    summary_of, write_bytes, write_random, Agent, Fleet, NatsServer, Sample, Webhook,
    EVENT_TIMEOUT, STARTUP_TIMEOUT,
};
use serde_json::Value;

/// The scheduled plan of the tests.
const PLAN: &str = "every-minute";
/// Up to a minute until the first scheduled run, then the backup itself.
const SCHEDULED_TIMEOUT: Duration = Duration::from_secs(90);
/// Watchdog events: a 3 s RPO or three missed 1 s heartbeats, 1 s ticks, slack.
const WATCHDOG_TIMEOUT: Duration = Duration::from_secs(20);
/// Daemon settings of every test config: tick every second, not every five.
const SERVE: &str = "[serve]\ntick = \"1s\"\n";

// ---- helpers ---------------------------------------------------------------

/// Starts nas (storage, no backup root) and alpha (source) and waits until
/// both are online and nas advertises its QUIC address. Returns `[nas, alpha]`.
fn start_world(fleet: &Fleet) -> Vec<Agent> {
    let nas = fleet
        .agent("nas")
        .without_backup_root()
        .storage()
        .start()
        .expect("start the nas agent");
    let alpha = fleet.start_agent("alpha").expect("start the alpha agent");
    fleet.wait_online(&["nas", "alpha"], STARTUP_TIMEOUT);
    fleet.wait_quic_addr("nas", STARTUP_TIMEOUT);
    vec![nas, alpha]
}

/// A plan backing alpha up to nas every minute.
fn minute_plan() -> String {
    format!(
        "\n[[plan]]\nname = \"{PLAN}\"\nhosts = [\"alpha\"]\nto = \"nas\"\n\
         schedule = \"* * * * *\"\n"
    )
}

fn metrics_section(addr: &str) -> String {
    format!("\n[metrics]\nlisten = \"{addr}\"\n")
}

/// `127.0.0.1:PORT` with a port that was free a moment ago.
fn loopback_addr() -> String {
    format!("127.0.0.1:{}", free_port().expect("find a free port"))
}

fn write_config(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    write_bytes(&path, text.as_bytes()).expect("write the config file");
    path
}

/// A `kind` job event of [`PLAN`] on alpha.
fn is_job(ev: &Value, kind: &str) -> bool {
    ev["kind"] == kind && ev["host"] == "alpha" && ev["detail"]["plan"] == PLAN
}

/// Waits for a `job.succeeded` of [`PLAN`] on alpha published after
/// `after_ms`, failing at once on a `job.failed` or `job.partial`.
fn wait_job_succeeded(fleet: &Fleet, after_ms: u64) -> Value {
    let what = format!("a job.succeeded of plan {PLAN} on alpha after {after_ms} ms");
    fleet.wait_for(&what, SCHEDULED_TIMEOUT, || {
        let events = fleet.events()?;
        let recent = |ev: &&Value| ev["time"].as_u64().is_some_and(|t| t > after_ms);
        if let Some(bad) = events
            .iter()
            .filter(recent)
            .find(|ev| is_job(ev, "job.failed") || is_job(ev, "job.partial"))
        {
            fleet.fail(format!("the scheduled backup did not succeed: {bad:#}"));
        }
        match events
            .iter()
            .filter(recent)
            .find(|ev| is_job(ev, "job.succeeded"))
        {
            Some(ev) => Ok(Some(ev.clone())),
            None => bail!(
                "none of the {} stored events is one:\n{}",
                events.len(),
                summarize_events(&events)
            ),
        }
    })
}

/// Waits up to `timeout` for a `job.succeeded` of `plan` on alpha that also
/// matches `pred`, failing at once on a matching `job.failed` or `job.partial`.
fn wait_plan_succeeded(
    fleet: &Fleet,
    plan: &str,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Value {
    let of_plan = |ev: &Value, kind: &str| {
        ev["kind"] == kind && ev["host"] == "alpha" && ev["detail"]["plan"] == plan
    };
    fleet.wait_for(what, timeout, || {
        let events = fleet.events()?;
        if let Some(bad) = events
            .iter()
            .find(|ev| (of_plan(ev, "job.failed") || of_plan(ev, "job.partial")) && pred(ev))
        {
            fleet.fail(format!(
                "the backup of plan {plan} did not succeed: {bad:#}"
            ));
        }
        match events
            .iter()
            .find(|ev| of_plan(ev, "job.succeeded") && pred(ev))
        {
            Some(ev) => Ok(Some(ev.clone())),
            None => bail!(
                "none of the {} stored events is one:\n{}",
                events.len(),
                summarize_events(&events)
            ),
        }
    })
}

/// A `task.started` of a backup on alpha.
fn is_backup_started(ev: &Value) -> bool {
    ev["kind"] == "task.started" && ev["host"] == "alpha" && ev["detail"]["task_kind"] == "backup"
}

/// The samples of `/metrics` at `addr`, which must parse as Prometheus text.
fn scrape(fleet: &Fleet, addr: &str) -> anyhow::Result<Vec<Sample>> {
    let text = scrape_metrics(addr)?;
    match parse_prometheus(&text) {
        Ok(samples) => Ok(samples),
        Err(e) => fleet.fail(format!("/metrics is not Prometheus text: {e:#}\n{text}")),
    }
}

/// The value of the sample `name` whose labels include every `(label, value)`.
fn sample(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).is_some_and(|x| x == v))
        })
        .map(|s| s.value)
}

/// The minute (since the epoch) in which an event happened.
fn minute_of(ev: &Value) -> Option<u64> {
    ev["time"].as_u64().map(|t| t / 60_000)
}

/// Waits until the webhook has received an event matching `pred`.
fn wait_hook(fleet: &Fleet, hook: &Webhook, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    fleet.wait_for(what, WATCHDOG_TIMEOUT, || {
        let got = hook.received();
        match got.iter().find(|ev| pred(ev)) {
            Some(ev) => Ok(Some(ev.clone())),
            None => bail!(
                "the webhook received {} request(s):\n{}",
                got.len(),
                summarize_events(&got)
            ),
        }
    })
}

// ---- tests -----------------------------------------------------------------

#[test]
fn scheduled_plan_runs_and_reports_to_metrics() {
    let nats = NatsServer::start().expect("start nats-server");
    let fleet = Fleet::init(&nats).expect("flotilla init");
    let _agents = start_world(&fleet);
    let addr = loopback_addr();
    let text = format!("{SERVE}{}{}", minute_plan(), metrics_section(&addr));
    let config = write_config(fleet.dir(), "flotilla.toml", &text);
    let _serve = fleet.serve("main", &config).expect("start flotilla serve");

    let done = wait_job_succeeded(&fleet, 0);
    assert_eq!(done["detail"]["job_kind"], "backup", "{done:#}");
    assert_eq!(done["detail"]["attempts"], 1, "{done:#}");
    let Some(snapshot) = done["detail"]["snapshot"].as_str() else {
        fleet.fail(format!("job.succeeded names no snapshot: {done:#}"));
    };
    let listed = fleet
        .snapshots(&["--host", "alpha"])
        .expect("flotilla snapshots --json");
    if listed.len() != 1 || listed[0]["id"] != snapshot || listed[0]["storage"] != "nas" {
        fleet.fail(format!(
            "expected one snapshot of alpha on nas, {snapshot}; listed: {listed:#?}"
        ));
    }

    // Metrics are refreshed every tick, so the success shows within seconds.
    let samples = fleet.wait_for(
        "a flotilla_last_success_timestamp_seconds of alpha on /metrics",
        Duration::from_secs(20),
        || {
            let samples = scrape(&fleet, &addr)?;
            let labels = [("host", "alpha"), ("plan", PLAN)];
            if sample(&samples, "flotilla_last_success_timestamp_seconds", &labels).is_none() {
                bail!("no such sample among {samples:#?}");
            }
            Ok(Some(samples))
        },
    );
    let labels = [("host", "alpha"), ("plan", PLAN)];
    let stamp = sample(&samples, "flotilla_last_success_timestamp_seconds", &labels)
        .expect("the wait found it");
    let now = now_ms() as f64 / 1000.0;
    if (now - stamp).abs() > 120.0 {
        fleet.fail(format!(
            "last success at {stamp}, {} s away from now ({now})",
            now - stamp
        ));
    }
    let up = sample(&samples, "flotilla_agent_up", &[("host", "alpha")]);
    let leader = sample(&samples, "flotilla_coordinator_leader", &[]);
    // The daemon's registry follows the health bucket: the heartbeats of the
    // minute or more this test waited have all been counted.
    let heartbeats = sample(&samples, "flotilla_heartbeats_received_total", &[]);
    if up != Some(1.0) || leader != Some(1.0) || heartbeats.unwrap_or(0.0) < 2.0 {
        fleet.fail(format!(
            "expected alpha up, this daemon leader and heartbeats counted, got up={up:?} \
             leader={leader:?} heartbeats={heartbeats:?}"
        ));
    }
}

#[test]
fn only_one_of_two_daemons_dispatches() {
    let nats = NatsServer::start().expect("start nats-server");
    let fleet = Fleet::init(&nats).expect("flotilla init");
    let _agents = start_world(&fleet);
    let addr = loopback_addr();
    let first_config = write_config(
        fleet.dir(),
        "first.toml",
        &format!("{SERVE}{}{}", minute_plan(), metrics_section(&addr)),
    );
    let second_config = write_config(
        fleet.dir(),
        "second.toml",
        &format!("{SERVE}{}", minute_plan()),
    );
    let mut first = fleet
        .serve("first", &first_config)
        .expect("start the first flotilla serve");
    // The first takes the lease before the second starts, so we know who leads.
    fleet.wait_until(
        "the first daemon to report itself leader",
        Duration::from_secs(30),
        || {
            let samples = scrape(&fleet, &addr)?;
            Ok(sample(&samples, "flotilla_coordinator_leader", &[]) == Some(1.0))
        },
    );
    let _second = fleet
        .serve("second", &second_config)
        .expect("start the second flotilla serve");

    let done = wait_job_succeeded(&fleet, 0);
    // Time for a duplicate dispatch by the standby to show up.
    std::thread::sleep(Duration::from_secs(3));
    let events = fleet.events().expect("flotilla events --json");
    let started: Vec<&Value> = events
        .iter()
        .filter(|ev| {
            ev["kind"] == "task.started"
                && ev["host"] == "alpha"
                && ev["detail"]["task_kind"] == "backup"
        })
        .collect();
    let Some(run) = started
        .iter()
        .copied()
        .find(|ev| ev["detail"]["task_id"] == done["detail"]["task_id"])
    else {
        fleet.fail(format!(
            "no task.started for the task of {done:#}:\n{}",
            summarize_events(&events)
        ));
    };
    let same_minute: Vec<&Value> = started
        .iter()
        .copied()
        .filter(|ev| minute_of(ev) == minute_of(run))
        .collect();
    let succeeded = events
        .iter()
        .filter(|ev| {
            is_job(ev, "job.succeeded")
                && same_minute
                    .iter()
                    .any(|s| s["detail"]["task_id"] == ev["detail"]["task_id"])
        })
        .count();
    if same_minute.len() != 1 || succeeded != 1 {
        fleet.fail(format!(
            "two daemons: {} backup(s) of alpha started and {succeeded} job.succeeded \
             in the scheduled minute, expected one each:\n{}",
            same_minute.len(),
            summarize_events(&events)
        ));
    }

    // The leader stops and hands the lease over; the standby takes over.
    first.sigterm().expect("SIGTERM the first daemon");
    let status = first
        .wait_exit(Duration::from_secs(20))
        .expect("the first daemon exits");
    if !status.success() {
        fleet.fail(format!(
            "the first daemon exited with {status} after SIGTERM"
        ));
    }
    let stopped = now_ms();
    let again = wait_job_succeeded(&fleet, stopped);
    assert_ne!(
        again["detail"]["task_id"], done["detail"]["task_id"],
        "{again:#}"
    );
}

#[test]
fn watchdog_events_reach_a_webhook() {
    let nats = NatsServer::start().expect("start nats-server");
    let fleet = Fleet::init(&nats).expect("flotilla init");
    let hook = Webhook::start().expect("start the webhook receiver");
    let kinds = ["agent.offline", "backup.overdue", "job.failed"];
    let text = format!(
        "{SERVE}\n[[plan]]\nname = \"ghost\"\nhosts = [\"alpha\"]\nto = \"nas\"\nrpo = \"3s\"\n\
         \n[[notify]]\nevents = {kinds:?}\nwebhook = \"{}\"\n",
        hook.url()
    );
    let config = write_config(fleet.dir(), "flotilla.toml", &text);
    let mut agents = start_world(&fleet);
    let _serve = fleet.serve("main", &config).expect("start flotilla serve");

    // Never backed up: overdue once the RPO has passed since the daemon started.
    let overdue = wait_hook(
        &fleet,
        &hook,
        "a backup.overdue of plan ghost on alpha at the webhook",
        |ev| {
            ev["kind"] == "backup.overdue"
                && ev["host"] == "alpha"
                && ev["detail"]["plan"] == "ghost"
        },
    );
    assert_eq!(overdue["detail"]["rpo_secs"], 3, "{overdue:#}");
    assert!(overdue["detail"]["last_success"].is_null(), "{overdue:#}");

    agents[1].kill9().expect("kill -9 alpha");
    let offline = wait_hook(
        &fleet,
        &hook,
        "an agent.offline (missed_heartbeats) of alpha at the webhook",
        |ev| {
            ev["kind"] == "agent.offline"
                && ev["host"] == "alpha"
                && ev["detail"]["reason"] == "missed_heartbeats"
        },
    );

    // The webhook gets the very events the stream keeps, and only the kinds asked for.
    for ev in [&overdue, &offline] {
        let what = format!("event {} in `events --json`", ev["id"]);
        let stored = fleet.wait_for_event(&what, EVENT_TIMEOUT, |e| e["id"] == ev["id"]);
        assert_eq!(
            stored, *ev,
            "the webhook body differs from the stored event"
        );
    }
    let received = hook.received();
    if let Some(other) = received
        .iter()
        .find(|ev| !kinds.iter().any(|k| ev["kind"] == *k))
    {
        fleet.fail(format!(
            "the webhook received an event it did not ask for: {other:#}"
        ));
    }
}

#[test]
fn config_check_points_at_the_line() {
    let dir = tempfile::tempdir().expect("create a temporary directory");
    let config = |schedule: &str| {
        // Line 5 is the schedule.
        format!(
            "{SERVE}\n[[plan]]\nschedule = \"{schedule}\"\n\
             name = \"home\"\nhosts = [\"alpha\"]\nto = \"nas\"\n"
        )
    };

    let bad = write_config(dir.path(), "bad.toml", &config("0 25 * * *"));
    let out = flotilla_cli([OsStr::new("config"), OsStr::new("check"), bad.as_os_str()])
        .expect("run flotilla config check");
    assert_eq!(out.code, Some(2), "{out}");
    assert!(out.stderr.contains("line 5"), "{out}");

    let good = write_config(dir.path(), "good.toml", &config("0 3 * * *"));
    let out = flotilla_cli([OsStr::new("config"), OsStr::new("check"), good.as_os_str()])
        .expect("run flotilla config check");
    assert_eq!(out.code, Some(0), "{out}");
    assert!(out.stdout.contains("ok"), "{out}");
}

/// After downtime a plan runs **once**, however many scheduled times it
/// missed: the daemon stops after its first scheduled backup, stays down
/// across three minute boundaries, and once restarted on the same state dir
/// runs a single catch-up backup instead of replaying the three missed runs.
///
/// **Slow: takes about 4-5 minutes** (up to a minute until the first
/// scheduled run, three missed minutes, then the catch-up). It is a normal
/// test and runs in parallel with the others.
#[test]
fn missed_runs_after_downtime_run_once() {
    const MINUTELY: &str = "minutely";
    /// How long the restarted daemon is watched.
    const WINDOW_MS: u64 = 15_000;
    const MINUTE_MS: u64 = 60_000;
    let nats = NatsServer::start().expect("start nats-server");
    let fleet = Fleet::init(&nats).expect("flotilla init");
    let _agents = start_world(&fleet);
    let text = format!(
        "{SERVE}\n[[plan]]\nname = \"{MINUTELY}\"\nhosts = [\"alpha\"]\nto = \"nas\"\n\
         schedule = \"* * * * *\"\n"
    );
    let config = write_config(fleet.dir(), "flotilla.toml", &text);
    fn time_of(ev: &Value) -> u64 {
        ev["time"].as_u64().unwrap_or(0)
    }

    let mut first = fleet.serve("a", &config).expect("start flotilla serve");
    let state_dir = first.state_dir().to_path_buf();
    wait_plan_succeeded(
        &fleet,
        MINUTELY,
        &format!("the first job.succeeded of plan {MINUTELY} on alpha"),
        SCHEDULED_TIMEOUT,
        |_| true,
    );
    first.sigterm().expect("SIGTERM flotilla serve");
    let status = first
        .wait_exit(Duration::from_secs(20))
        .expect("flotilla serve exits");
    if !status.success() {
        fleet.fail(format!("flotilla serve exited with {status} after SIGTERM"));
    }
    let stopped = now_ms();

    // Down until the start of the third minute after the stop, plus 5 s: at
    // least three scheduled times go by with no daemon.
    let resume_at = (stopped / MINUTE_MS + 3) * MINUTE_MS + 5_000;
    std::thread::sleep(Duration::from_millis(resume_at.saturating_sub(now_ms())));
    let events = fleet.events().expect("flotilla events --json");
    let while_down: Vec<&Value> = events
        .iter()
        .filter(|ev| is_backup_started(ev) && time_of(ev) > stopped)
        .collect();
    if !while_down.is_empty() {
        fleet.fail(format!(
            "{} backup(s) of alpha started while the daemon was down (since {stopped} ms):\n{}",
            while_down.len(),
            summarize_events(&events)
        ));
    }

    let restarted = now_ms();
    let mut second = fleet.serve("a", &config).expect("restart flotilla serve");
    assert_eq!(
        second.state_dir(),
        state_dir,
        "the restarted daemon must keep its state dir"
    );
    let window_end = restarted + WINDOW_MS;
    std::thread::sleep(Duration::from_millis(window_end.saturating_sub(now_ms())));
    if !second.is_running() {
        fleet.fail("the restarted flotilla serve exited");
    }
    // Slack for the last events of the window to reach the stream.
    std::thread::sleep(Duration::from_secs(2));
    let events = fleet.events().expect("flotilla events --json");
    let mut started: Vec<&Value> = events
        .iter()
        .filter(|ev| is_backup_started(ev) && (restarted..=window_end).contains(&time_of(ev)))
        .collect();
    started.sort_by_key(|ev| time_of(ev));
    // A scheduled time inside the window may add one ordinary run.
    let boundary_inside =
        restarted % MINUTE_MS == 0 || window_end / MINUTE_MS != restarted / MINUTE_MS;
    let expected = if boundary_inside {
        "one or two (a minute boundary falls inside the window)"
    } else {
        "exactly one"
    };
    let ok = match started.len() {
        1 => true,
        2 => boundary_inside,
        _ => false,
    };
    if !ok {
        fleet.fail(format!(
            "{} backup(s) of alpha started in the {WINDOW_MS} ms after the restart \
             ({restarted}..={window_end} ms), expected {expected}: the missed runs must \
             be caught up once, not replayed:\n{}",
            started.len(),
            summarize_events(&events)
        ));
    }

    let catch_up = started[0]["detail"]["task_id"].clone();
    wait_plan_succeeded(
        &fleet,
        MINUTELY,
        &format!("the job.succeeded of the catch-up task {catch_up}"),
        Duration::from_secs(60),
        |ev| ev["detail"]["task_id"] == catch_up,
    );
}

/// The daemon applies a plan's keep policy after every successful backup of
/// the plan's hosts, including backups started by hand.
#[test]
fn serve_applies_the_plan_keep_policy_after_each_backup() {
    let nats = NatsServer::start().expect("start nats-server");
    let fleet = Fleet::init(&nats).expect("flotilla init");
    let addr = loopback_addr();
    let text = format!(
        "{SERVE}\n[[plan]]\nname = \"kept\"\nhosts = [\"alpha\"]\nto = \"nas\"\nkeep = {{ last = 1 }}\n{}",
        metrics_section(&addr)
    );
    let config = write_config(fleet.dir(), "flotilla.toml", &text);
    let agents = start_world(&fleet);
    let _serve = fleet.serve("main", &config).expect("start flotilla serve");
    fleet.wait_until(
        "the daemon to take the lease",
        Duration::from_secs(30),
        || {
            let samples = scrape(&fleet, &addr)?;
            Ok(sample(&samples, "flotilla_coordinator_leader", &[]) == Some(1.0))
        },
    );
    let root = agents[1].backup_root().to_path_buf();
    let mut made = Vec::new();
    for i in 0..3u8 {
        write_bytes(&root.join(format!("changing-{i}.txt")), &[i; 4096]).expect("write test data");
        let out = fleet
            .backup("alpha", "nas", &[])
            .expect("run flotilla backup");
        out.ensure_success().expect("backup succeeds");
        let summary = summary_of(&out, "alpha").expect("a backup summary");
        made.push(
            summary["snapshot"]
                .as_str()
                .expect("the summary names its snapshot")
                .to_owned(),
        );
        // After each backup the policy leaves exactly the newest one.
        let newest = made[made.len() - 1].clone();
        fleet.wait_until(
            "the keep policy (last = 1) to leave only the newest snapshot of alpha",
            Duration::from_secs(30),
            || {
                let left = fleet.snapshots(&["--host", "alpha"])?;
                Ok(left.len() == 1 && left[0]["id"] == newest.as_str())
            },
        );
    }
}

/// `flotilla serve` survives a nats-server restart (issue 11). The lease
/// bucket lives in the server's memory, so the restart loses it: a daemon
/// that set its lease up only at start stands by for good and its plans stop.
/// This one opens the bucket again, takes the lease back, says so in its log,
/// reports itself leader again, and runs the plan's next backup; the agents
/// reconnect by themselves.
///
/// Takes up to two minutes: the restart is placed away from a minute
/// boundary, so that the backup it waits for can only have been dispatched
/// after the restart, by a daemon that leads again.
#[test]
fn serve_regains_the_lease_after_a_nats_restart() {
    /// What the daemon logs when it takes the lease after standing by.
    const REGAINED: &str = "acquired the coordinator lease after";
    const LOST: &str = "lost the coordinator lease";
    const MINUTE_MS: u64 = 60_000;
    let mut nats = NatsServer::start().expect("start nats-server");
    let fleet = Fleet::init(&nats).expect("flotilla init");
    let _agents = start_world(&fleet);
    let addr = loopback_addr();
    let text = format!("{SERVE}{}{}", minute_plan(), metrics_section(&addr));
    let config = write_config(fleet.dir(), "flotilla.toml", &text);
    let mut serve = fleet.serve("main", &config).expect("start flotilla serve");
    let leader = |what: &str| {
        fleet.wait_until(what, Duration::from_secs(30), || {
            let samples = scrape(&fleet, &addr)?;
            Ok(sample(&samples, "flotilla_coordinator_leader", &[]) == Some(1.0))
        })
    };
    leader("the daemon to take the lease");

    // Restart between 10 s and 45 s into a minute: a backup scheduled at the
    // last boundary (a few KiB) has ended, the next is not yet due.
    let into_minute = now_ms() % MINUTE_MS;
    if !(10_000..=45_000).contains(&into_minute) {
        let wait = (MINUTE_MS + 10_000 - into_minute) % MINUTE_MS;
        std::thread::sleep(Duration::from_millis(wait));
    }
    let log_before = serve.log().len();
    nats.restart(Duration::from_secs(2))
        .expect("restart nats-server on the same port and store");
    let back = now_ms();

    let log = fleet.wait_for(
        "the daemon's log to say it lost the lease and took it again",
        Duration::from_secs(60),
        || {
            let log = serve.log();
            let since = log.get(log_before..).unwrap_or_default();
            match (since.find(LOST), since.find(REGAINED)) {
                (Some(lost), Some(regained)) if lost < regained => Ok(Some(since.to_owned())),
                _ => bail!("not yet; the daemon's log since the restart:\n{since}"),
            }
        },
    );
    if !serve.is_running() {
        fleet.fail(format!("flotilla serve exited after the restart:\n{log}"));
    }
    leader("the daemon to report itself leader again after the restart");

    // Only a leader dispatches: a daemon stuck on standby never starts one.
    let done = wait_job_succeeded(&fleet, back);
    let events = fleet.events().expect("flotilla events --json");
    let started = events
        .iter()
        .find(|ev| is_backup_started(ev) && ev["detail"]["task_id"] == done["detail"]["task_id"]);
    match started.and_then(|ev| ev["time"].as_u64()) {
        Some(t) if t > back => {}
        _ => fleet.fail(format!(
            "the backup of {done:#} did not start after the restart ({back} ms):\n{}",
            summarize_events(&events)
        )),
    }
}

/// The pid of this fleet's running `flotilla SUBCOMMAND` (found in /proc by
/// its arguments and its `FLOTILLA_FLEET`, as the harness does not hand it
/// out), to freeze it with SIGSTOP.
fn cli_pid(fleet: &Fleet, subcommand: &str) -> Option<nix::unistd::Pid> {
    let fleet_env = format!("FLOTILLA_FLEET={}", fleet.fleet_dir().display());
    let entries = std::fs::read_dir("/proc").ok()?;
    entries.flatten().find_map(|entry| {
        let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
        let mut args = cmdline.split(|&b| b == 0);
        let bin = args.next()?;
        let ours = bin.ends_with(b"/flotilla") && args.any(|a| a == subcommand.as_bytes());
        let environ = std::fs::read(entry.path().join("environ")).ok()?;
        let same_fleet = environ
            .split(|&b| b == 0)
            .any(|var| var == fleet_env.as_bytes());
        (ours && same_fleet).then(|| nix::unistd::Pid::from_raw(pid))
    })
}

/// Issue 11: nats-server killed just as a backup ended. The snapshot was
/// committed, but `backup --wait` never heard: `task.finished` was stored
/// while the command was away from the bus, so its subscription could not
/// hear it, and it waited in silence until killed. The command now reads
/// its task's outcome back from the event stream after reconnecting.
///
/// To make the loss certain rather than a race between two reconnects, the
/// command is frozen while the server comes back and thawed only once the
/// agent's `task.finished` is stored.
#[test]
fn backup_wait_hears_an_outcome_published_while_it_was_away() {
    use nix::sys::signal::{kill, Signal};
    const MIB: u64 = 1 << 20;
    let mut nats = NatsServer::start().expect("start nats-server");
    let fleet = Fleet::init(&nats).expect("flotilla init");
    let agents = start_world(&fleet);
    let root = agents[1].backup_root().to_path_buf();
    for i in 0..6 {
        write_random(&root.join(format!("big/part-{i}.bin")), 4000 + i, 50 * MIB)
            .expect("write 50 MiB of test data");
    }
    let cli = fleet
        .spawn_cli(["backup", "alpha", "--to", "nas", "--wait", "--json"])
        .expect("start flotilla backup --wait");
    let started = fleet.wait_for_event("alpha's backup to start", EVENT_TIMEOUT, |ev| {
        ev["kind"] == "task.started" && ev["host"] == "alpha"
    });
    let task_id = started["detail"]["task_id"].clone();

    // The bus goes away; the backup carries on over QUIC and ends.
    let log_before = agents[1].log().len();
    nats.kill9().expect("kill -9 nats-server");
    let before_kill = agents[1].log();
    if before_kill
        .get(..log_before)
        .unwrap_or_default()
        .contains("task finished")
    {
        fleet.fail("alpha's backup ended before the bus went away: it needs more data");
    }
    fleet.wait_until(
        "alpha to finish its backup while the bus is down",
        Duration::from_secs(120),
        || {
            let log = agents[1].log();
            Ok(log
                .get(log_before..)
                .unwrap_or_default()
                .contains("task finished"))
        },
    );
    let pid = cli_pid(&fleet, "backup").unwrap_or_else(|| {
        fleet.fail("the waiting flotilla backup is gone (it heard the end before the kill?)")
    });
    kill(pid, Signal::SIGSTOP).expect("SIGSTOP flotilla backup");
    nats.start_again().expect("start nats-server again");
    let stored = fleet.wait_for_event(
        "alpha's task.finished to be stored after the restart",
        Duration::from_secs(60),
        |ev| ev["kind"] == "task.finished" && ev["detail"]["task_id"] == task_id,
    );
    kill(pid, Signal::SIGCONT).expect("SIGCONT flotilla backup");

    let out = cli
        .wait(Duration::from_secs(60))
        .expect("wait for flotilla backup");
    if out.timed_out {
        fleet.fail(format!(
            "backup --wait never heard that its task ended ({stored:#}):\n{out}"
        ));
    }
    assert_eq!(out.code, Some(0), "{out}");
    let summary = summary_of(&out, "alpha").expect("alpha's summary line");
    assert_eq!(summary["outcome"], "succeeded", "{out}");
    assert_eq!(summary["task_id"], task_id, "{out}");
    assert!(summary["snapshot"].is_string(), "{out}");
    // It said what it went through, as `waiting` lines among the JSON.
    let lines = out.json_lines().expect("JSON lines");
    assert!(
        lines
            .iter()
            .any(|v| v["type"] == "waiting" && v["notice"] == "reconnected"),
        "{out}"
    );
}

/// No silent waits: `backup --wait` on a host whose agent is stopped says
/// so on stderr at once, and `--timeout` ends the wait with exit code 3
/// (host offline) after sending the task a cancel, which stops it as soon
/// as the host returns.
#[test]
fn backup_wait_on_a_stopped_host_says_so_and_times_out() {
    const MIB: u64 = 1 << 20;
    let nats = NatsServer::start().expect("start nats-server");
    let fleet = Fleet::init(&nats).expect("flotilla init");
    let mut agents = start_world(&fleet);
    let root = agents[1].backup_root().to_path_buf();
    write_random(&root.join("data/blob.bin"), 77, 64 * MIB).expect("write test data");
    agents[1].sigterm().expect("stop alpha");
    agents[1]
        .wait_exit(Duration::from_secs(10))
        .expect("alpha exits");

    let began = std::time::Instant::now();
    let out = fleet
        .cli_with_timeout(
            [
                "backup",
                "alpha",
                "--to",
                "nas",
                "--wait",
                "--timeout",
                "5s",
            ],
            Duration::from_secs(60),
        )
        .expect("run flotilla backup --wait --timeout 5s");
    let took = began.elapsed();
    assert_eq!(out.code, Some(3), "{out}");
    assert!(took < Duration::from_secs(20), "took {took:?}: {out}");
    let task_id = out
        .stderr
        .lines()
        .find_map(|l| l.strip_prefix("sent backup task "))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| fleet.fail(format!("no task id on stderr:\n{out}")))
        .to_owned();
    assert!(
        out.stderr
            .contains("alpha is offline (its agent stopped, last seen"),
        "{out}"
    );
    assert!(
        out.stderr.contains(&format!(
            "task {task_id} stays queued and runs when it returns"
        )),
        "{out}"
    );
    assert!(
        out.stderr.contains(&format!(
            "flotilla: host alpha is offline and did not run task {task_id} within 5s \
             (--timeout); it was sent a cancel"
        )),
        "{out}"
    );
    // The notice came first, long before the timeout's message.
    let offline_at = out.stderr.find("alpha is offline (").unwrap_or(usize::MAX);
    let timeout_at = out.stderr.find("(--timeout)").unwrap_or(0);
    assert!(offline_at < timeout_at, "{out}");

    // Back: the queued backup starts and its cancel, queued behind it,
    // stops it.
    agents[1].restart().expect("start alpha again");
    let finished = fleet.wait_for_event(
        "the timed-out backup to end when alpha returns",
        Duration::from_secs(60),
        |ev| ev["kind"] == "task.finished" && ev["detail"]["task_id"] == task_id.as_str(),
    );
    assert_eq!(finished["detail"]["outcome"], "cancelled", "{finished:#}");
    let snapshots = fleet
        .snapshots(&["--host", "alpha"])
        .expect("list snapshots");
    assert!(snapshots.is_empty(), "{snapshots:#?}");
}

/// Someone squats the coordinator lease: they keep the key `leader` in the
/// lease bucket renewed under a name of their own but lead nothing. The
/// daemon stands by, and because the holder writes no fleet status it says
/// so within a minute: in its log and as a `coordinator.standby` event that
/// names the holder. Nothing is dispatched meanwhile.
#[test]
fn a_squatted_lease_is_said_not_silent() {
    let nats = NatsServer::start().expect("start nats-server");
    let fleet = Fleet::init(&nats).expect("flotilla init");
    let _agents = start_world(&fleet);
    let rt = tokio::runtime::Runtime::new().expect("a runtime");
    let client = rt.block_on(fleet.nats_client()).expect("connect to NATS");
    let squatter = rt.spawn(async move {
        use async_nats::jetstream::{self, kv};
        let js = jetstream::new(client);
        // As the daemon makes the bucket: entries live 15 s.
        let store = js
            .create_key_value(kv::Config {
                bucket: "flotilla-coordinator".into(),
                history: 1,
                max_age: Duration::from_secs(15),
                storage: jetstream::stream::StorageType::Memory,
                ..Default::default()
            })
            .await
            .expect("create the lease bucket");
        loop {
            store
                .put("leader", "squatter".into())
                .await
                .expect("squat the lease");
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    });
    // The key is there before the daemon looks.
    fleet.wait_until("the lease to be squatted", STARTUP_TIMEOUT, || {
        rt.block_on(async {
            let js = async_nats::jetstream::new(fleet.nats_client().await?);
            let store = js.get_key_value("flotilla-coordinator").await?;
            anyhow::Ok(store.get("leader").await?.is_some())
        })
    });
    let config = write_config(
        fleet.dir(),
        "flotilla.toml",
        &format!("{SERVE}{}", minute_plan()),
    );
    let serve = fleet.serve("main", &config).expect("start flotilla serve");
    let event = fleet.wait_for_event(
        "a coordinator.standby event",
        Duration::from_secs(120),
        |ev| ev["kind"] == "coordinator.standby",
    );
    assert_eq!(event["detail"]["holder"], "squatter", "{event:#}");
    let why = event["detail"]["why"].as_str().unwrap_or_default();
    assert!(why.contains("no fleet status"), "{event:#}");
    assert!(
        event["detail"]["standby_secs"]
            .as_u64()
            .is_some_and(|s| s >= 45),
        "{event:#}"
    );
    assert!(
        serve.log().contains("no daemon can be seen leading"),
        "{}",
        serve.log()
    );
    let dispatched = fleet
        .events()
        .expect("flotilla events --json")
        .into_iter()
        .filter(|ev| ev["kind"] == "task.started")
        .count();
    assert_eq!(dispatched, 0, "a standby daemon dispatched");
    squatter.abort();
}

/// Ctrl-C during `backup --all --wait` stops the command, not just the plan
/// that is running: that plan's backup is cancelled, the command exits 130,
/// and the next plan is never sent.
#[test]
fn ctrl_c_during_backup_all_stops_before_the_next_plan() {
    let nats = NatsServer::start().expect("start nats-server");
    let fleet = Fleet::init(&nats).expect("flotilla init");
    let agents = start_world(&fleet);
    let beta = fleet.start_agent("beta").expect("start beta");
    fleet.wait_online(&["beta"], STARTUP_TIMEOUT);
    // Enough for the backup to be running when the interrupt comes.
    write_random(
        &agents[1].backup_root().join("data/big.bin"),
        7,
        600 * 1024 * 1024,
    )
    .expect("write test data");
    let config = write_config(
        fleet.dir(),
        "flotilla.toml",
        "[[plan]]\nname = \"first\"\nhosts = [\"alpha\"]\nto = \"nas\"\n\n\
         [[plan]]\nname = \"second\"\nhosts = [\"beta\"]\nto = \"nas\"\n",
    );
    let config = config.to_string_lossy().into_owned();
    let proc = fleet
        .spawn_cli(["backup", "--all", "--config", config.as_str(), "--wait"])
        .expect("start flotilla backup --all --wait");
    fleet.wait_for_event("alpha's backup to start", EVENT_TIMEOUT, |ev| {
        ev["kind"] == "task.started" && ev["host"] == "alpha"
    });
    proc.interrupt().expect("Ctrl-C");
    let out = proc
        .wait(Duration::from_secs(120))
        .expect("wait for backup");
    assert_eq!(out.code, Some(130), "{out}");
    let finished = fleet.wait_for_event("alpha's backup to end", EVENT_TIMEOUT, |ev| {
        ev["kind"] == "task.finished"
            && ev["host"] == "alpha"
            && ev["detail"]["task_kind"] == "backup"
    });
    assert_eq!(finished["detail"]["outcome"], "cancelled", "{finished:#}");
    // The second plan was never sent: beta started nothing, and the
    // command said nothing of it.
    let events = fleet.events().expect("flotilla events --json");
    assert!(
        !events
            .iter()
            .any(|ev| ev["kind"] == "task.started" && ev["host"] == "beta"),
        "{}",
        summarize_events(&events)
    );
    assert!(!out.stderr.contains("to beta"), "{out}");
    drop(beta);
}
