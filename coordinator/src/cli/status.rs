//! `flotilla status`, `flotilla jobs` and `flotilla watch`: seeing the fleet.

use std::collections::BTreeMap;
use std::io::IsTerminal;

use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use flotilla_protocol::status::{FleetStatus, STATUS_BUCKET, STATUS_KEY};
use flotilla_protocol::{subject, Event, EventBody};
use futures::StreamExt;
use serde_json::json;

use super::follow::progress_line;
use super::{output, Global};
use crate::error::{request_err, CliError};

async fn fleet_status(nats: &crate::nats::Nats) -> Option<FleetStatus> {
    let store = nats.js.get_key_value(STATUS_BUCKET).await.ok()?;
    let bytes = store.get(STATUS_KEY).await.ok()??;
    FleetStatus::decode(&bytes).ok()
}

pub(super) async fn status(g: &Global, json: bool) -> Result<(), CliError> {
    let nats = g.connect().await?;
    let now = crate::now_ms();
    let hosts = nats.hosts().await?;
    let fleet = fleet_status(&nats).await;
    let daemon_age = fleet.as_ref().map(|f| now.saturating_sub(f.time));
    let entries = fleet
        .as_ref()
        .map(|f| f.entries.clone())
        .unwrap_or_default();
    let mut rows = Vec::new();
    for rec in &hosts {
        let hb = &rec.heartbeat;
        let host = hb.host.as_str();
        let mut problems = Vec::new();
        match rec.offline_reason(now) {
            Some("missed_heartbeats") => problems.push(format!(
                "offline: no heartbeat for {}",
                output::ago(now, rec.stored_at)
            )),
            Some(_) => problems.push("agent stopped".to_string()),
            None => {}
        }
        for r in hb
            .roots
            .iter()
            .filter(|r| r.total_bytes > 0 && r.free_bytes * 20 < r.total_bytes)
        {
            problems.push(format!(
                "{} nearly full ({} free)",
                r.path,
                output::bytes(r.free_bytes)
            ));
        }
        let plans: Vec<_> = entries.iter().filter(|e| e.host == host).collect();
        for p in plans.iter().filter(|p| p.overdue) {
            problems.push(format!("plan {} overdue", p.plan));
        }
        rows.push(json!({
            "host": host,
            "status": if rec.offline_reason(now).is_some() { "offline" } else { "online" },
            "last_seen": rec.stored_at,
            "running": hb.running,
            "plans": plans,
            "problems": problems,
        }));
    }
    if json {
        let doc = json!({"daemon_status_age_ms": daemon_age, "queued": fleet.as_ref().map(|f| f.queued), "hosts": rows});
        outln!("{}", serde_json::to_string_pretty(&doc).unwrap_or_default());
        return Ok(());
    }
    match daemon_age {
        Some(age) if age < 60_000 => {}
        Some(age) => outln!(
            "note: `flotilla serve` last reported {} s ago; schedules may not be running",
            age / 1000
        ),
        None => {
            outln!("note: no `flotilla serve` has reported; schedules and last backups are unknown")
        }
    }
    outln!(
        "{:<16} {:<8} {:<12} {:<14} {:<22} {:<10} PROBLEMS",
        "HOST",
        "STATUS",
        "PLAN",
        "LAST BACKUP",
        "NEXT RUN",
        "RUNNING"
    );
    for (rec, row) in hosts.iter().zip(&rows) {
        let host = rec.heartbeat.host.as_str();
        let plans: Vec<_> = entries.iter().filter(|e| e.host == host).collect();
        let running = rec
            .heartbeat
            .running
            .iter()
            .map(|j| j.kind.as_str())
            .collect::<Vec<_>>()
            .join(",");
        let problems = row["problems"]
            .as_array()
            .map(|p| {
                p.iter()
                    .filter_map(|x| x.as_str())
                    .collect::<Vec<_>>()
                    .join("; ")
            })
            .unwrap_or_default();
        let status = row["status"].as_str().unwrap_or("");
        if plans.is_empty() {
            outln!(
                "{host:<16} {status:<8} {:<12} {:<14} {:<22} {:<10} {problems}",
                "-",
                "-",
                "-",
                if running.is_empty() { "-" } else { &running }
            );
        }
        for p in plans {
            outln!(
                "{host:<16} {status:<8} {:<12} {:<14} {:<22} {:<10} {problems}",
                p.plan,
                p.last_success
                    .map(|t| output::ago(now, t))
                    .unwrap_or_else(|| "never".into()),
                p.next_run.map(output::time).unwrap_or_else(|| "-".into()),
                if running.is_empty() { "-" } else { &running },
            );
        }
    }
    Ok(())
}

/// Recent jobs from the event stream: every task's start and end.
pub(super) async fn jobs(g: &Global, json: bool, limit: usize) -> Result<(), CliError> {
    let nats = g.connect().await?;
    let Ok(stream) = nats.js.get_stream(subject::EVENT_STREAM).await else {
        if !json {
            outln!("no jobs yet");
        }
        return Ok(());
    };
    let mut consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subjects: vec![
                format!("{}.events.task.started.*", subject::ROOT),
                format!("{}.events.task.finished.*", subject::ROOT),
            ],
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(request_err("read event stream"))?;
    let pending = consumer
        .info()
        .await
        .map_err(request_err("read event stream"))?
        .num_pending;
    let mut jobs: BTreeMap<String, serde_json::Value> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    if pending > 0 {
        let mut messages = consumer
            .messages()
            .await
            .map_err(request_err("read event stream"))?;
        while let Some(msg) = messages.next().await {
            let msg = msg.map_err(request_err("read event stream"))?;
            let done = msg.info().map(|i| i.pending == 0).unwrap_or(true);
            if let Ok(ev) = Event::decode(&msg.payload) {
                match &ev.body {
                    EventBody::TaskStarted { task_id, task_kind } => {
                        order.push(task_id.clone());
                        jobs.insert(
                            task_id.clone(),
                            json!({"task_id": task_id, "kind": task_kind, "host": ev.host.as_str(),
                            "started": ev.time, "state": "running"}),
                        );
                    }
                    EventBody::TaskFinished(f) => {
                        let j = jobs.entry(f.task_id.clone()).or_insert_with(|| {
                            order.push(f.task_id.clone());
                            json!({"task_id": f.task_id, "kind": f.task_kind, "host": ev.host.as_str()})
                        });
                        j["state"] = serde_json::to_value(f.outcome).unwrap_or_default();
                        j["finished"] = json!(ev.time);
                        j["duration_ms"] = json!(f.duration_ms);
                        j["error"] = json!(f.error);
                    }
                    _ => {}
                }
            }
            if done {
                break;
            }
        }
    }
    let recent: Vec<&serde_json::Value> = order
        .iter()
        .rev()
        .take(limit)
        .filter_map(|id| jobs.get(id))
        .collect();
    if json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&recent).unwrap_or_default()
        );
        return Ok(());
    }
    outln!(
        "{:<38} {:<9} {:<14} {:<10} {:<24} {:>9}  ERROR",
        "TASK",
        "KIND",
        "HOST",
        "STATE",
        "STARTED",
        "SECONDS"
    );
    for j in recent {
        outln!(
            "{:<38} {:<9} {:<14} {:<10} {:<24} {:>9}  {}",
            j["task_id"].as_str().unwrap_or(""),
            j["kind"].as_str().unwrap_or(""),
            j["host"].as_str().unwrap_or(""),
            j["state"].as_str().unwrap_or(""),
            j["started"].as_u64().map(output::time).unwrap_or_default(),
            j["duration_ms"]
                .as_u64()
                .map(|d| format!("{:.1}", d as f64 / 1000.0))
                .unwrap_or_else(|| "-".into()),
            j["error"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

/// Live progress of every running task across the fleet, until Ctrl-C.
pub(super) async fn watch(g: &Global, json: bool) -> Result<(), CliError> {
    let nats = g.connect().await?;
    let mut sub = nats
        .client
        .subscribe(format!("{}.events.task.>", subject::ROOT))
        .await
        .map_err(request_err("subscribe to task events"))?;
    let tty = std::io::stdout().is_terminal() && !json;
    let mut lines: BTreeMap<String, String> = BTreeMap::new();
    let mut drawn = 0usize;
    if !json {
        outln!("watching running tasks (Ctrl-C to stop)");
    }
    loop {
        let msg = tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            m = sub.next() => match m { Some(m) => m, None => return Ok(()) },
        };
        let Ok(ev) = Event::decode(&msg.payload) else {
            continue;
        };
        if json {
            outln!("{}", serde_json::to_string(&ev).unwrap_or_default());
            continue;
        }
        let key = format!("{} {}", ev.host, ev.body.task_id().unwrap_or(""));
        match &ev.body {
            EventBody::TaskProgress(p) => {
                lines.insert(
                    key.clone(),
                    format!(
                        "{} {:<8} {}",
                        progress_line(&ev.host, p),
                        p.task_kind,
                        output::short(&p.task_id)
                    ),
                );
            }
            EventBody::TaskStarted { task_kind, task_id } => {
                lines.insert(
                    key.clone(),
                    format!(
                        "{:<16} {task_kind} {} started",
                        ev.host,
                        output::short(task_id)
                    ),
                );
            }
            EventBody::TaskFinished(f) => {
                lines.remove(&key);
                if tty && drawn > 0 {
                    print!("\x1b[{drawn}A\x1b[J");
                    drawn = 0;
                }
                outln!(
                    "{}  {} {} {:?} in {:.1}s {}",
                    output::time(ev.time),
                    ev.host,
                    f.task_kind,
                    f.outcome,
                    f.duration_ms as f64 / 1000.0,
                    f.error.clone().unwrap_or_default()
                );
            }
            _ => continue,
        }
        if tty {
            if drawn > 0 {
                print!("\x1b[{drawn}A");
            }
            for l in lines.values() {
                outln!("\x1b[2K{l}");
            }
            drawn = lines.len();
        } else if let EventBody::TaskProgress(_) = &ev.body {
            if let Some(l) = lines.get(&key) {
                outln!("{l}");
            }
        }
    }
}
