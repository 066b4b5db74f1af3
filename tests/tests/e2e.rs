//! End-to-end tests: a real nats-server, real agents, the real CLI.
//!
//! Build the binaries first: `cargo build --workspace --bins && cargo test -p flotilla-tests`.
//! Each test owns its server and fleet, so they run in parallel. A failing test
//! prints every agent log; `FLOTILLA_E2E_KEEP=1` also keeps its directory.

mod ansible;
mod copies;
mod dataplane;
mod deploy;
mod operations;
mod reading;
mod recovery;
mod retention;
mod trust;

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use flotilla_protocol::{encode, sign_task, subject};
use flotilla_tests::{
    now_ms, ping_agents, ping_ids, publish_task, random_seed, summarize_events, write_file,
    CliOutput, DirStats, Fleet, NatsServer, EVENT_TIMEOUT, STARTUP_TIMEOUT,
};
use serde_json::Value;

const HOUR_MS: u64 = 60 * 60 * 1000;
/// What a ping waits for replies.
const PING_WAIT: Duration = Duration::from_secs(1);

// ---- helpers ---------------------------------------------------------------

fn path_str(path: &Path) -> String {
    path.to_str().expect("temporary paths are UTF-8").to_owned()
}

/// `flotilla estimate HOST [--path P]… --json --timeout 60`.
fn estimate(fleet: &Fleet, host: &str, paths: &[&str]) -> Result<CliOutput> {
    let mut args = vec!["estimate", host, "--json", "--timeout", "60"];
    for &path in paths {
        args.push("--path");
        args.push(path);
    }
    fleet.cli_with_timeout(args, Duration::from_secs(120))
}

/// Asserts a successful estimate and returns its task.finished detail.
fn expect_estimate_ok(out: &CliOutput) -> Result<Value> {
    assert_eq!(out.code, Some(0), "{out}");
    let finished = out.json()?;
    assert_eq!(finished["outcome"], "succeeded", "{out}");
    assert_eq!(finished["task_kind"], "estimate", "{out}");
    assert_eq!(finished["result"]["type"], "estimate", "{out}");
    Ok(finished)
}

fn is_rejection(ev: &Value, host: &str, reason: &str) -> bool {
    ev["kind"] == "security.task_rejected" && ev["host"] == host && ev["detail"]["reason"] == reason
}

fn is_task_event(ev: &Value, kind: &str, task_id: &str) -> bool {
    ev["kind"] == kind && ev["detail"]["task_id"] == task_id
}

fn host_entry(fleet: &Fleet, host: &str) -> Result<Value> {
    fleet
        .host(host)?
        .with_context(|| format!("{host} is not listed by `flotilla hosts`"))
}

/// Waits until `host` is listed offline with `reason`.
fn wait_offline(fleet: &Fleet, host: &str, reason: &str, timeout: Duration) -> Value {
    let what = format!("{host} to be listed offline with reason {reason}");
    fleet.wait_for(&what, timeout, || {
        let entry = host_entry(fleet, host)?;
        if entry["status"] == "offline" && entry["offline_reason"] == reason {
            Ok(Some(entry))
        } else {
            bail!("{host}: {entry}")
        }
    })
}

/// The agent still works: process alive, listed online, and a normal estimate
/// succeeds.
fn assert_agent_healthy(fleet: &Fleet, agent: &mut flotilla_tests::Agent) -> Result<()> {
    if !agent.is_running() {
        let exit = agent.last_exit();
        fleet.fail(format!("agent {} exited ({exit:?})", agent.host()));
    }
    fleet.wait_online(&[agent.host()], STARTUP_TIMEOUT);
    let out = estimate(fleet, agent.host(), &[])?;
    expect_estimate_ok(&out)?;
    Ok(())
}

// ---- tests -----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_agents_are_listed_online() -> Result<()> {
    let nats = NatsServer::start()?;
    let fleet = Fleet::init(&nats)?;
    let hosts = ["alpha", "beta", "gamma"];
    let _agents = hosts
        .iter()
        .map(|&host| fleet.start_agent(host))
        .collect::<Result<Vec<_>>>()?;

    let listed = fleet.wait_online(&hosts, STARTUP_TIMEOUT);
    for host in hosts {
        let entry = listed
            .iter()
            .find(|h| h["host"] == host)
            .expect("wait_online returns a listing with every host");
        assert!(
            entry["version"].as_str().is_some_and(|v| !v.is_empty()),
            "{host} has no version: {entry:#}"
        );
        assert!(
            entry["roles"]
                .as_array()
                .is_some_and(|roles| roles.iter().any(|r| *r == "source")),
            "{host} has a backup root but not the source role: {entry:#}"
        );
        assert!(entry["offline_reason"].is_null(), "{entry:#}");
    }

    let client = fleet.nats_client().await?;
    let client = &client;
    let replies = fleet
        .wait_for_async(
            "a $SRV.PING.flotilla-agent reply from each agent",
            STARTUP_TIMEOUT,
            move || async move {
                let replies = ping_agents(client, PING_WAIT).await?;
                let ids = ping_ids(&replies);
                if ids == hosts {
                    Ok(Some(replies))
                } else {
                    bail!("ping replies from {ids:?}: {replies:?}")
                }
            },
        )
        .await;
    for reply in &replies {
        assert_eq!(reply["type"], "io.nats.micro.v1.ping_response", "{reply:#}");
        assert_eq!(reply["name"], subject::AGENT_SERVICE, "{reply:#}");
    }
    Ok(())
}

#[test]
fn sigterm_marks_offline_at_once() -> Result<()> {
    let nats = NatsServer::start()?;
    let fleet = Fleet::init(&nats)?;
    let mut alpha = fleet.start_agent("alpha")?;
    fleet.wait_online(&["alpha"], STARTUP_TIMEOUT);

    alpha.sigterm()?;
    let status = alpha.wait_exit(Duration::from_secs(10))?;
    if status.code() != Some(0) {
        fleet.fail(format!(
            "agent exited with {status} after SIGTERM, expected code 0"
        ));
    }

    // The agent marks itself offline before exiting, so this holds at once. A few
    // seconds of slack for slow CLI starts; the reason `shutdown` (not
    // `missed_heartbeats`, which would take 3 s at 1 s heartbeats) is what shows
    // it was the clean path.
    wait_offline(&fleet, "alpha", "shutdown", Duration::from_secs(5));

    let events = fleet.wait_for(
        "an agent.offline event from `events --kind agent.offline --host alpha`",
        EVENT_TIMEOUT,
        || {
            let events = fleet.cli_json_lines([
                "events",
                "--json",
                "--kind",
                "agent.offline",
                "--host",
                "alpha",
            ])?;
            Ok((!events.is_empty()).then_some(events))
        },
    );
    for ev in &events {
        assert_eq!(ev["kind"], "agent.offline", "--kind filter: {ev:#}");
        assert_eq!(ev["host"], "alpha", "--host filter: {ev:#}");
    }
    assert!(
        events.iter().any(|ev| ev["detail"]["reason"] == "shutdown"),
        "no agent.offline with reason shutdown:\n{}",
        summarize_events(&events)
    );
    Ok(())
}

#[test]
fn kill9_marks_offline_after_missed_heartbeats() -> Result<()> {
    let nats = NatsServer::start()?;
    let fleet = Fleet::init(&nats)?;
    let mut alpha = fleet.start_agent("alpha")?;
    fleet.wait_online(&["alpha"], STARTUP_TIMEOUT);

    alpha.kill9()?;
    // Three missed 1 s heartbeats, plus slack for a slow machine.
    let entry = wait_offline(
        &fleet,
        "alpha",
        "missed_heartbeats",
        Duration::from_secs(20),
    );
    assert!(
        entry["last_seen_age_secs"]
            .as_f64()
            .is_some_and(|age| age >= 2.0),
        "offline after missed heartbeats, yet last seen only now: {entry:#}"
    );
    Ok(())
}

#[test]
fn estimate_reports_sizes() -> Result<()> {
    let nats = NatsServer::start()?;
    let fleet = Fleet::init(&nats)?;
    let mut alpha = fleet.start_agent("alpha")?;
    fleet.wait_online(&["alpha"], STARTUP_TIMEOUT);

    let dir = alpha.backup_root().join("estimate-me");
    write_file(&dir.join("a.bin"), 1000)?;
    write_file(&dir.join("sub/b.bin"), 2000)?;
    write_file(&dir.join("sub/deeper/c.bin"), 3000)?;
    let dir_s = path_str(&dir);

    let out = estimate(&fleet, "alpha", &[dir_s.as_str()])?;
    let finished = expect_estimate_ok(&out)?;
    let report = &finished["result"];
    assert_eq!(report["files"], 3, "{out}");
    assert_eq!(report["dirs"], 3, "estimate-me, sub, deeper: {out}");
    assert_eq!(report["bytes"], 6000, "{out}");
    assert_eq!(report["symlinks"], 0, "{out}");
    assert_eq!(report["errors"], 0, "{out}");
    assert!(
        report["paths"]
            .as_array()
            .is_some_and(|paths| paths.iter().any(|p| *p == dir_s.as_str())),
        "the walked path is not reported: {out}"
    );
    assert!(
        report["largest_dirs"]
            .as_array()
            .is_some_and(|dirs| !dirs.is_empty()),
        "{out}"
    );

    // The CLI's answer matches the agent's events.
    let task_id = finished["task_id"]
        .as_str()
        .with_context(|| format!("no task_id: {out}"))?
        .to_owned();
    fleet.wait_for_event("task.started of the estimate", EVENT_TIMEOUT, |ev| {
        is_task_event(ev, "task.started", &task_id)
    });
    let event = fleet.wait_for_event("task.finished of the estimate", EVENT_TIMEOUT, |ev| {
        is_task_event(ev, "task.finished", &task_id)
    });
    assert_eq!(event["host"], "alpha", "{event:#}");
    assert_eq!(event["detail"]["outcome"], "succeeded", "{event:#}");
    assert_eq!(event["detail"]["result"]["bytes"], 6000, "{event:#}");

    // The whole root, against our own count of it.
    let root = alpha.backup_root().to_path_buf();
    let expected = DirStats::walk(&root)?;
    let out = estimate(&fleet, "alpha", &[path_str(&root).as_str()])?;
    let report = expect_estimate_ok(&out)?["result"].clone();
    assert_eq!(report["files"], expected.files, "{expected:?}: {out}");
    assert_eq!(report["dirs"], expected.dirs, "{expected:?}: {out}");
    assert_eq!(report["bytes"], expected.bytes, "{expected:?}: {out}");

    // Outside the backup roots: refused by the agent.
    let out = estimate(&fleet, "alpha", &["/etc"])?;
    assert_eq!(out.code, Some(4), "{out}");
    let rejection = fleet.wait_for_event("a not_allowed rejection", EVENT_TIMEOUT, |ev| {
        is_rejection(ev, "alpha", "not_allowed")
    });
    assert_eq!(
        rejection["detail"]["subject"], "flotilla.task.alpha",
        "{rejection:#}"
    );
    assert!(alpha.is_running(), "agent exited after a refused task");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_expired_misaddressed_replayed_tasks_are_rejected() -> Result<()> {
    let nats = NatsServer::start()?;
    let fleet = Fleet::init(&nats)?;
    let mut alpha = fleet.start_agent("alpha")?;
    fleet.wait_online(&["alpha"], STARTUP_TIMEOUT);
    let client = fleet.nats_client().await?;
    let root = path_str(alpha.backup_root());
    let seed = fleet.signing_seed()?;

    // (a) Signed with a key that is not the coordinator's.
    let forged = fleet.estimate_task("alpha", vec![root.clone()])?;
    publish_task(
        &client,
        "alpha",
        encode(&sign_task(&random_seed(), &forged)?)?,
    )
    .await?;

    // (b) No signature at all.
    let unsigned = fleet.estimate_task("alpha", vec![root.clone()])?;
    let mut envelope = sign_task(&seed, &unsigned)?;
    envelope.signature.clear();
    publish_task(&client, "alpha", encode(&envelope)?).await?;

    // (c) Genuine, but expired an hour ago.
    let mut expired = fleet.estimate_task("alpha", vec![root.clone()])?;
    let now = now_ms();
    expired.issued_at = now - 2 * HOUR_MS;
    expired.expires_at = now - HOUR_MS;
    publish_task(&client, "alpha", fleet.sign(&expired)?).await?;

    // (d) Genuine, but for beta, and sent to alpha.
    let misaddressed = fleet.estimate_task("beta", vec![root.clone()])?;
    publish_task(&client, "alpha", fleet.sign(&misaddressed)?).await?;

    // (e) Genuine, sent twice: runs once, then is refused as a replay.
    let valid = fleet.estimate_task("alpha", vec![root.clone()])?;
    let bytes = fleet.sign(&valid)?;
    publish_task(&client, "alpha", bytes.clone()).await?;
    publish_task(&client, "alpha", bytes).await?;

    let expectations: [(&str, Option<&str>); 5] = [
        ("bad_signature", None),
        ("unsigned", None),
        ("expired", Some(expired.id.as_str())),
        ("wrong_host", Some(misaddressed.id.as_str())),
        ("replayed", Some(valid.id.as_str())),
    ];
    for (reason, task_id) in expectations {
        let what = format!("a security.task_rejected event with reason {reason}");
        let ev = fleet.wait_for_event(&what, EVENT_TIMEOUT, |ev| {
            is_rejection(ev, "alpha", reason)
                && task_id.is_none_or(|id| ev["detail"]["task_id"] == id)
        });
        assert_eq!(ev["detail"]["subject"], "flotilla.task.alpha", "{ev:#}");
    }
    let finished = fleet.wait_for_event("the genuine task to finish", EVENT_TIMEOUT, |ev| {
        is_task_event(ev, "task.finished", valid.id.as_str())
    });
    assert_eq!(finished["detail"]["outcome"], "succeeded", "{finished:#}");

    assert_agent_healthy(&fleet, &mut alpha)?;

    // The agent handles its task subject in order, so by now every message
    // above has been dealt with: nothing refused ran, and the replay ran once.
    let events = fleet.events()?;
    for refused in [&forged.id, &unsigned.id, &expired.id, &misaddressed.id] {
        assert!(
            !events.iter().any(|ev| {
                ev["kind"].as_str().is_some_and(|k| k.starts_with("task."))
                    && ev["detail"]["task_id"] == refused.as_str()
            }),
            "refused task {refused} ran:\n{}",
            summarize_events(&events)
        );
    }
    let runs = events
        .iter()
        .filter(|ev| is_task_event(ev, "task.started", valid.id.as_str()))
        .count();
    assert_eq!(
        runs,
        1,
        "the replayed task ran {runs} times:\n{}",
        summarize_events(&events)
    );
    Ok(())
}

#[test]
fn task_sent_while_agent_stopped_runs_when_back() -> Result<()> {
    let nats = NatsServer::start()?;
    let fleet = Fleet::init(&nats)?;
    let mut alpha = fleet.start_agent("alpha")?;
    fleet.wait_online(&["alpha"], STARTUP_TIMEOUT);

    alpha.sigterm()?;
    let status = alpha.wait_exit(Duration::from_secs(10))?;
    assert!(status.success(), "agent exited with {status} after SIGTERM");
    wait_offline(&fleet, "alpha", "shutdown", Duration::from_secs(10));

    let before = fleet.tasks_sent()?;
    let mut pending = fleet.spawn_cli(["estimate", "alpha", "--json", "--timeout", "60"])?;
    // The task must be in the stream before alpha comes back, or this would
    // test nothing but an ordinary estimate.
    fleet.wait_until("the estimate task in the stream", EVENT_TIMEOUT, || {
        Ok(fleet.tasks_sent()? > before)
    });
    if !pending.is_running() {
        let out = pending.wait(Duration::from_secs(1))?;
        fleet.fail(format!(
            "estimate of a stopped host gave up instead of waiting:\n{out}"
        ));
    }

    alpha.restart()?;
    let out = pending.wait(Duration::from_secs(120))?;
    let finished = expect_estimate_ok(&out)?;
    assert!(
        finished["result"]["files"].as_u64().is_some_and(|n| n > 0),
        "{out}"
    );
    Ok(())
}

/// A flood of forged tasks is two security events, not three hundred: the
/// first at once, then one that sums up the rest of its 10 s window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_forged_tasks_is_coalesced_into_two_events() -> Result<()> {
    const FLOOD: usize = 300;
    let nats = NatsServer::start()?;
    let fleet = Fleet::init(&nats)?;
    let mut alpha = fleet.start_agent("alpha")?;
    fleet.wait_online(&["alpha"], STARTUP_TIMEOUT);
    let client = fleet.nats_client().await?;
    for i in 0..FLOOD {
        publish_task(
            &client,
            "alpha",
            format!("\u{c1}not a task {i}").into_bytes(),
        )
        .await?;
    }
    let rejections = |fleet: &Fleet| -> Result<Vec<Value>> {
        Ok(fleet
            .events()?
            .into_iter()
            .filter(|ev| is_rejection(ev, "alpha", "malformed"))
            .collect())
    };
    let summary = fleet.wait_for(
        "the summary of the coalesced rejections",
        Duration::from_secs(30),
        || {
            let all = rejections(&fleet)?;
            Ok(all.into_iter().find(|ev| {
                ev["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("coalesced"))
            }))
        },
    );
    let all = rejections(&fleet)?;
    assert_eq!(all.len(), 2, "{}", summarize_events(&all));
    let detail = summary["detail"]["detail"].as_str().unwrap_or_default();
    assert!(
        detail.starts_with(&format!("{} more in ", FLOOD - 1)),
        "{summary:#}"
    );
    assert_agent_healthy(&fleet, &mut alpha)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_oversized_payloads_do_not_crash_agent() -> Result<()> {
    let nats = NatsServer::start()?;
    let fleet = Fleet::init(&nats)?;
    let mut alpha = fleet.start_agent("alpha")?;
    fleet.wait_online(&["alpha"], STARTUP_TIMEOUT);
    let client = fleet.nats_client().await?;

    // Not MessagePack at all (0xc1 is the one byte MessagePack never uses).
    publish_task(
        &client,
        "alpha",
        &b"\xc1\xff\x00 this is not a task \xfe"[..],
    )
    .await?;
    // MessagePack, but not a task envelope.
    let wrong_shape = rmp_serde::to_vec_named(&serde_json::json!({"hello": "world", "v": 1}))?;
    publish_task(&client, "alpha", wrong_shape).await?;
    // Over the 64 KiB task limit but within the task stream's per-message
    // cap (which leaves room for headers): the agent refuses it.
    publish_task(
        &client,
        "alpha",
        vec![0xa5_u8; flotilla_protocol::limits::TASK_BYTES + 1024],
    )
    .await?;
    // Far over it (under NATS's 1 MiB max_payload): the stream itself
    // refuses it, so it never reaches an agent nor takes room in the stream.
    let refused = publish_task(&client, "alpha", vec![0xa5_u8; 200 * 1024]).await;
    assert!(refused.is_err(), "the task stream stored a 200 KiB message");

    // Garbage to the discovery and health endpoints, with and without a reply subject.
    for subject in [
        "$SRV.PING.flotilla-agent".to_owned(),
        "$SRV.PING".to_owned(),
        "$SRV.INFO.flotilla-agent".to_owned(),
        "$SRV.STATS.flotilla-agent.alpha".to_owned(),
        "flotilla.agent.alpha.health".to_owned(),
    ] {
        let garbage = Bytes::from_static(b"\xc1\x00{not json");
        client.publish(subject.clone(), garbage.clone()).await?;
        client
            .publish_with_reply(subject, client.new_inbox(), garbage)
            .await?;
    }
    client.flush().await?;

    fleet.wait_until(
        "two malformed and one oversized rejection",
        EVENT_TIMEOUT,
        || {
            let events = fleet.events()?;
            let count = |reason| {
                events
                    .iter()
                    .filter(|ev| is_rejection(ev, "alpha", reason))
                    .count()
            };
            if count("malformed") >= 2 && count("oversized") >= 1 {
                Ok(true)
            } else {
                bail!("events so far:\n{}", summarize_events(&events))
            }
        },
    );

    let client = &client;
    fleet
        .wait_for_async(
            "alpha to still answer pings",
            STARTUP_TIMEOUT,
            move || async move {
                let ids = ping_ids(&ping_agents(client, PING_WAIT).await?);
                Ok(ids.iter().any(|id| id == "alpha").then_some(()))
            },
        )
        .await;
    assert_agent_healthy(&fleet, &mut alpha)?;
    Ok(())
}

#[test]
fn agent_config_check() -> Result<()> {
    let nats = NatsServer::start()?;
    let fleet = Fleet::init(&nats)?;

    let out = fleet.agent("alpha").config_check()?;
    assert_eq!(out.code, Some(0), "{out}");
    assert!(out.stdout.to_lowercase().contains("ok"), "{out}");

    let missing = fleet.dir().join("no-such-dir").join("missing-bundle.toml");
    let missing_s = path_str(&missing);
    let state = path_str(&fleet.state_dir("alpha"));
    let root = path_str(&fleet.backup_root("alpha"));
    let out = fleet.agent_cli([
        "config",
        "check",
        "--bundle",
        missing_s.as_str(),
        "--state-dir",
        state.as_str(),
        "--backup-root",
        root.as_str(),
        "--heartbeat-interval",
        "1s",
    ])?;
    assert!(!out.timed_out && out.code.is_some_and(|c| c != 0), "{out}");
    assert!(
        out.stderr.contains(&missing_s),
        "the error does not name the bundle path: {out}"
    );
    Ok(())
}

/// Issue 11, "replay after state loss": an agent whose state directory was
/// wiped (a reinstall) has an empty journal, which cannot recognise a task
/// captured from the bus before as a replay. Its new state epoch does: the
/// coordinator's task carries the old epoch and is refused, and so is a task
/// without an epoch issued before the new state; neither runs, and the
/// agent goes on taking new tasks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_from_before_a_wiped_state_are_refused_as_stale() -> Result<()> {
    use futures::StreamExt;

    let nats = NatsServer::start()?;
    let fleet = Fleet::init(&nats)?;
    let mut alpha = fleet.start_agent("alpha")?;
    fleet.wait_online(&["alpha"], STARTUP_TIMEOUT);
    let client = fleet.nats_client().await?;

    // Capture the signed task the coordinator sends, as anyone on the bus can.
    let host = flotilla_protocol::HostName::new("alpha")?;
    let mut wire = client.subscribe(subject::task(&host)).await?;
    client.flush().await?;
    let out = estimate(&fleet, "alpha", &[])?;
    let ran = expect_estimate_ok(&out)?;
    let captured = tokio::time::timeout(EVENT_TIMEOUT, wire.next())
        .await
        .context("the estimate task was not seen on the bus")?
        .context("the task subscription ended")?
        .payload
        .to_vec();
    let envelope: flotilla_protocol::TaskEnvelope = rmp_serde::from_slice(&captured)?;
    let stamped: flotilla_protocol::TaskBody = rmp_serde::from_slice(&envelope.body)?;
    assert_eq!(ran["task_id"], stamped.id.as_str(), "{out}");
    assert!(
        stamped.epoch.is_some(),
        "the coordinator did not stamp alpha's epoch into its task: {stamped:?}"
    );

    // A genuine task without an epoch (as an older coordinator signs them),
    // issued ten minutes ago and valid for another hour.
    let mut unstamped = fleet.estimate_task("alpha", Vec::new())?;
    let now = now_ms();
    unstamped.issued_at = now - 10 * 60 * 1000;
    unstamped.expires_at = now + HOUR_MS;
    let unstamped_bytes = fleet.sign(&unstamped)?;

    // The reinstall: stopped, state directory gone, started again.
    alpha.sigterm()?;
    let status = alpha.wait_exit(Duration::from_secs(10))?;
    assert!(status.success(), "agent exited with {status} after SIGTERM");
    std::fs::remove_dir_all(alpha.state_dir())
        .with_context(|| format!("cannot wipe {}", alpha.state_dir().display()))?;
    alpha.restart()?;
    fleet.wait_online(&["alpha"], STARTUP_TIMEOUT);

    publish_task(&client, "alpha", captured).await?;
    publish_task(&client, "alpha", unstamped_bytes).await?;
    // A task issued now without an epoch is still taken (old coordinators,
    // and hosts that never reported an epoch).
    let fresh = fleet.estimate_task("alpha", Vec::new())?;
    publish_task(&client, "alpha", fleet.sign(&fresh)?).await?;

    for (what, id) in [
        ("the captured task", stamped.id.as_str()),
        ("the task issued before the state", unstamped.id.as_str()),
    ] {
        let ev = fleet.wait_for_event(
            &format!("a stale_epoch rejection of {what}"),
            EVENT_TIMEOUT,
            |ev| is_rejection(ev, "alpha", "stale_epoch") && ev["detail"]["task_id"] == id,
        );
        assert_eq!(ev["detail"]["subject"], "flotilla.task.alpha", "{ev:#}");
    }
    let finished = fleet.wait_for_event("the fresh task to finish", EVENT_TIMEOUT, |ev| {
        is_task_event(ev, "task.finished", fresh.id.as_str())
    });
    assert_eq!(finished["detail"]["outcome"], "succeeded", "{finished:#}");

    // The agent takes its subject in order, so both refusals are final by
    // now: the captured task ran once (before the wipe), the other never.
    let events = fleet.events()?;
    let started = |id: &str| {
        events
            .iter()
            .filter(|ev| is_task_event(ev, "task.started", id))
            .count()
    };
    assert_eq!(
        (started(stamped.id.as_str()), started(unstamped.id.as_str())),
        (1, 0),
        "a task from before the wipe ran again:\n{}",
        summarize_events(&events)
    );
    // And the coordinator, reading the new epoch, still gets work done.
    assert_agent_healthy(&fleet, &mut alpha)?;
    Ok(())
}

/// Issue 11, "an empty source root": a path that held files at its last
/// backup and is empty now (its disk not mounted) fails the backup with
/// exit 4 and a message that says what to check, and commits no snapshot
/// for retention to count; `--allow-empty` backs it up anyway, and from
/// then on it is an empty path like any other.
#[test]
fn a_path_emptied_since_its_last_backup_fails_unless_allowed() -> Result<()> {
    let nats = NatsServer::start()?;
    let fleet = Fleet::init(&nats)?;
    let agents = dataplane::start_world(&fleet, &["alpha"]);
    let disk = agents[1].backup_root().join("disk");
    write_file(&disk.join("a.bin"), 4000)?;
    write_file(&disk.join("photos/b.bin"), 5000)?;
    let disk_s = path_str(&disk);
    let path = ["--path", disk_s.as_str()];
    let snapshots = || -> Result<usize> { Ok(fleet.snapshots(&["--host", "alpha"])?.len()) };

    let out = fleet.backup("alpha", "nas", &path)?;
    dataplane::assert_exit(&fleet, &out, 0, "a first backup with files");
    assert_eq!(snapshots()?, 1);

    // The disk is "unmounted": its mount point is an empty directory.
    std::fs::remove_dir_all(&disk)?;
    std::fs::create_dir(&disk)?;
    let out = fleet.backup("alpha", "nas", &path)?;
    dataplane::assert_exit(&fleet, &out, 4, "the path is empty but held files");
    let expected = format!(
        "{disk_s} is empty but held 2 files at the last backup; is its disk mounted? \
         run with --allow-empty to back it up anyway"
    );
    assert!(out.stdout.contains(&expected), "no {expected:?} in:\n{out}");
    let summary = flotilla_tests::summary_of(&out, "alpha")?;
    assert_eq!(summary["outcome"], "failed", "{out}");
    assert_eq!(summary["retryable"], false, "{out}");
    assert_eq!(snapshots()?, 1, "the failed backup committed a snapshot");

    let out = fleet.backup("alpha", "nas", &[path[0], path[1], "--allow-empty"])?;
    dataplane::assert_exit(&fleet, &out, 0, "--allow-empty backs it up anyway");
    assert_eq!(snapshots()?, 2);
    // Empty at the last backup too now: an ordinary backup again.
    let out = fleet.backup("alpha", "nas", &path)?;
    dataplane::assert_exit(&fleet, &out, 0, "empty then and now");
    assert_eq!(snapshots()?, 3);
    Ok(())
}
