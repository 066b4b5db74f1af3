//! `flotilla status`, `flotilla jobs` and `flotilla watch`: seeing the fleet.

use std::collections::BTreeMap;

use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use flotilla_protocol::status::{FleetStatus, PlanHostStatus, STATUS_BUCKET, STATUS_KEY};
use flotilla_protocol::{subject, Event, EventBody, OfflineReason, TaskId};
use futures::StreamExt;
use serde_json::json;

use super::follow::{progress_line, Live};
use super::hosts::RunningView;
use super::{output, Global};
use crate::error::{request_err, CliError};

/// This coordinator's version: `status` names the hosts whose agent runs another.
const COORDINATOR_VERSION: &str = env!("CARGO_PKG_VERSION");

async fn fleet_status(nats: &crate::nats::Nats) -> Option<FleetStatus> {
    let store = nats.js.get_key_value(STATUS_BUCKET).await.ok()?;
    let bytes = store.get(STATUS_KEY).await.ok()??;
    FleetStatus::decode(&bytes).ok()
}

/// A plan's state on one host in `status --json`: times as RFC 3339.
fn plan_json(p: &PlanHostStatus) -> serde_json::Value {
    json!({
        "plan": p.plan,
        "host": p.host,
        "storage": p.storage,
        "last_success": output::rfc3339_opt(p.last_success),
        "last_snapshot": p.last_snapshot,
        "next_run": output::rfc3339_opt(p.next_run),
        "overdue": p.overdue,
        "running_task": p.running_task,
    })
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
    let mut table = Vec::new();
    for rec in &hosts {
        let hb = &rec.heartbeat;
        let host = hb.host.as_str();
        let mut problems = Vec::new();
        match rec.offline_reason(now) {
            Some(OfflineReason::MissedHeartbeats) => problems.push(format!(
                "offline: no heartbeat for {}",
                output::ago(now, rec.stored_at)
            )),
            Some(_) => problems.push("agent stopped".to_string()),
            None => {}
        }
        for r in hb
            .roots
            .iter()
            .filter(|r| r.total_bytes > 0 && r.free_bytes.saturating_mul(20) < r.total_bytes)
        {
            problems.push(format!(
                "{} nearly full ({} free)",
                r.path,
                output::bytes(r.free_bytes)
            ));
        }
        // Skew between agent and coordinator is allowed but worth fixing:
        // `flotilla upgrade` installs the coordinator's version.
        if hb.version != COORDINATOR_VERSION {
            problems.push(format!(
                "runs flotilla-agent {} (this flotilla is {COORDINATOR_VERSION}: `flotilla upgrade {host}`)",
                hb.version
            ));
        }
        let plans: Vec<&PlanHostStatus> = entries.iter().filter(|e| e.host == host).collect();
        for p in plans.iter().filter(|p| p.overdue) {
            problems.push(format!("plan {} overdue", p.plan));
        }
        let status = if rec.offline_reason(now).is_some() {
            "offline"
        } else {
            "online"
        };
        let running = hb
            .running
            .iter()
            .map(|j| j.kind.as_str())
            .collect::<Vec<_>>()
            .join(",");
        let running = if running.is_empty() {
            "-".to_owned()
        } else {
            running
        };
        let problem_text = problems.join("; ");
        if plans.is_empty() {
            table.push(vec![
                host.to_owned(),
                status.to_owned(),
                "-".into(),
                "-".into(),
                "-".into(),
                running.clone(),
                problem_text.clone(),
            ]);
        }
        for p in &plans {
            table.push(vec![
                host.to_owned(),
                status.to_owned(),
                p.plan.clone(),
                p.last_success
                    .map(|t| output::ago(now, t))
                    .unwrap_or_else(|| "never".into()),
                p.next_run
                    .map(|t| output::when(t, g.utc))
                    .unwrap_or_else(|| "-".into()),
                running.clone(),
                problem_text.clone(),
            ]);
        }
        rows.push(json!({
            "host": host,
            "status": status,
            "last_seen": output::rfc3339(rec.stored_at),
            "running": RunningView::of(&hb.running),
            "plans": plans.iter().map(|p| plan_json(p)).collect::<Vec<_>>(),
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
    for line in output::table(
        &[
            "HOST",
            "STATUS",
            "PLAN",
            "LAST BACKUP",
            "NEXT RUN",
            "RUNNING",
            "PROBLEMS",
        ],
        &[],
        table,
    ) {
        outln!("{line}");
    }
    Ok(())
}

/// One task as `flotilla jobs` shows it, put together from its events.
#[derive(Debug)]
struct Job {
    task_id: TaskId,
    kind: String,
    host: String,
    /// `running`, or how it ended.
    state: String,
    started: Option<u64>,
    finished: Option<u64>,
    duration_ms: Option<u64>,
    error: Option<String>,
}

impl Job {
    fn to_json(&self) -> serde_json::Value {
        json!({
            "task_id": self.task_id,
            "kind": self.kind,
            "host": self.host,
            "state": self.state,
            "started": output::rfc3339_opt(self.started),
            "finished": output::rfc3339_opt(self.finished),
            "duration_ms": self.duration_ms,
            "error": self.error,
        })
    }
}

/// Recent jobs from the event stream: every task's start and end.
pub(super) async fn jobs(g: &Global, json: bool, limit: usize) -> Result<(), CliError> {
    let nats = g.connect().await?;
    let Ok(stream) = nats.js.get_stream(subject::EVENT_STREAM).await else {
        if json {
            outln!("[]");
        } else {
            outln!("no jobs yet");
        }
        return Ok(());
    };
    let mut consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subjects: vec![
                subject::events_of_kind("task.started"),
                subject::events_of_kind("task.finished"),
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
    let mut jobs: BTreeMap<TaskId, Job> = BTreeMap::new();
    let mut order: Vec<TaskId> = Vec::new();
    if pending > 0 {
        let mut messages = consumer
            .messages()
            .await
            .map_err(request_err("read event stream"))?;
        while let Some(msg) = messages.next().await {
            let msg = msg.map_err(request_err("read event stream"))?;
            let done = msg.info().map(|i| i.pending == 0).unwrap_or(true);
            if let Ok(ev) = Event::decode_on(&msg.subject, &msg.payload) {
                match &ev.body {
                    EventBody::TaskStarted { task_id, task_kind } => {
                        order.push(task_id.clone());
                        jobs.insert(
                            task_id.clone(),
                            Job {
                                task_id: task_id.clone(),
                                kind: task_kind.clone(),
                                host: ev.host.to_string(),
                                state: "running".into(),
                                started: Some(ev.time),
                                finished: None,
                                duration_ms: None,
                                error: None,
                            },
                        );
                    }
                    EventBody::TaskFinished(f) => {
                        let j = jobs.entry(f.task_id.clone()).or_insert_with(|| {
                            order.push(f.task_id.clone());
                            Job {
                                task_id: f.task_id.clone(),
                                kind: f.task_kind.clone(),
                                host: ev.host.to_string(),
                                state: String::new(),
                                started: None,
                                finished: None,
                                duration_ms: None,
                                error: None,
                            }
                        });
                        j.state = serde_json::to_value(f.outcome)
                            .ok()
                            .and_then(|v| v.as_str().map(str::to_owned))
                            .unwrap_or_default();
                        j.finished = Some(ev.time);
                        j.duration_ms = Some(f.duration_ms);
                        j.error = f.error.clone();
                    }
                    _ => {}
                }
            }
            if done {
                break;
            }
        }
    }
    let recent: Vec<&Job> = order
        .iter()
        .rev()
        .take(limit)
        .filter_map(|id| jobs.get(id))
        .collect();
    if json {
        let docs: Vec<serde_json::Value> = recent.iter().map(|j| j.to_json()).collect();
        outln!(
            "{}",
            serde_json::to_string_pretty(&docs).unwrap_or_default()
        );
        return Ok(());
    }
    let rows = recent
        .iter()
        .map(|j| {
            vec![
                j.task_id.to_string(),
                j.kind.clone(),
                j.host.clone(),
                j.state.clone(),
                j.started
                    .map(|t| output::when(t, g.utc))
                    .unwrap_or_else(|| "-".into()),
                j.duration_ms
                    .map(|d| format!("{:.1}", d as f64 / 1000.0))
                    .unwrap_or_else(|| "-".into()),
                j.error.clone().unwrap_or_default(),
            ]
        })
        .collect();
    for line in output::table(
        &[
            "TASK", "KIND", "HOST", "STATE", "STARTED", "SECONDS", "ERROR",
        ],
        &[5],
        rows,
    ) {
        outln!("{line}");
    }
    Ok(())
}

/// Live progress of every running task across the fleet, until Ctrl-C.
pub(super) async fn watch(g: &Global, json: bool) -> Result<(), CliError> {
    let nats = g.connect().await?;
    let mut sub = nats
        .client
        .subscribe(subject::task_events_all())
        .await
        .map_err(request_err("subscribe to task events"))?;
    let mut live = (!json).then(Live::stdout);
    if !json {
        outln!("watching running tasks (Ctrl-C to stop)");
    }
    loop {
        let msg = tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            m = sub.next() => match m { Some(m) => m, None => break },
        };
        let Ok(ev) = Event::decode_on(&msg.subject, &msg.payload) else {
            continue;
        };
        let Some(live) = live.as_mut() else {
            outln!("{}", serde_json::to_string(&ev).unwrap_or_default());
            continue;
        };
        let task_id = ev.body.task_id().map(TaskId::as_str).unwrap_or("");
        let key = format!("{} {task_id}", ev.host);
        // What follows the progress itself: the kind and the task.
        let tail = |kind: &str| format!("  {kind} {}", output::short(task_id));
        match &ev.body {
            EventBody::TaskProgress(p) => {
                let tail = tail(&p.task_kind);
                let width = live.width().saturating_sub(tail.chars().count());
                live.set(&key, format!("{}{tail}", progress_line(&ev.host, p, width)));
            }
            EventBody::TaskStarted { task_kind, .. } => {
                live.set(
                    &key,
                    format!("{:<12} started{}", ev.host.as_str(), tail(task_kind)),
                );
            }
            EventBody::TaskFinished(f) => {
                live.remove(&key);
                live.outln(&format!(
                    "{}  {} {} {:?} in {:.1}s {}",
                    output::when(ev.time, g.utc),
                    ev.host,
                    f.task_kind,
                    f.outcome,
                    f.duration_ms as f64 / 1000.0,
                    f.error.clone().unwrap_or_default()
                ));
            }
            _ => {}
        }
    }
    if let Some(live) = live.as_mut() {
        live.clear();
    }
    Ok(())
}
