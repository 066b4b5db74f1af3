//! `flotilla serve`: the coordinator daemon.
//!
//! One task owns all state and reacts to three inputs: a tick (schedules,
//! queued jobs, watchdog), task outcomes from the event stream, and shutdown.
//! Decisions about *when* come from [`crate::scheduler`] (pure, tested with a
//! virtual clock); this file does the I/O around them.
//!
//! Only the holder of the lease ([`lease`]) dispatches and raises watchdog
//! events, so two daemons started by mistake never both act.

mod lease;
pub mod metrics;
mod notify;
mod state;

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Local, TimeZone};
use flotilla_protocol::{
    subject, AgentState, Event, EventBody, HostName, JobEnded, RootKind, Severity, TaskKind,
    TaskOutcome, TaskResult,
};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, warn, Instrument};

use crate::cli::Global;
use crate::config::{duration, Config, Plan};
use crate::dispatch::Dispatch;
use crate::error::{request_err, CliError};
use crate::nats::Nats;
use crate::registry::Registry;
use crate::scheduler::{due, jitter_for, Cron, Due};
use lease::Lease;
use notify::Notifier;
use state::{ServeState, Success};

/// The coordinator's own version, compared with agents'.
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// What a job does.
#[derive(Debug, Clone, PartialEq, Eq)]
enum JobKind {
    Backup { plan: usize },
    Check { read_data: bool, plan: usize },
    Prune { plan: usize },
}

impl JobKind {
    /// The task kind it dispatches, as in events.
    fn name(&self) -> &'static str {
        match self {
            JobKind::Backup { .. } => "backup",
            JobKind::Check { .. } => "check",
            JobKind::Prune { .. } => "prune",
        }
    }
}

/// A job waiting for its turn (or for its retry time).
#[derive(Debug, Clone)]
struct Queued {
    kind: JobKind,
    host: HostName,
    storage: HostName,
    attempt: u32,
    not_before: u64,
}

/// A job whose task is out.
#[derive(Debug, Clone)]
struct Running {
    job: Queued,
}

struct Daemon {
    config: Config,
    nats: Nats,
    dispatch_fleet: crate::fleet::Fleet,
    state: ServeState,
    notifier: Notifier,
    queue: VecDeque<Queued>,
    running: HashMap<String, Running>,
    metrics: Arc<Mutex<metrics::Snapshot>>,
    registry: Registry,
    leader: bool,
    started: u64,
    status: Option<async_nats::jetstream::kv::Store>,
}

/// Runs the daemon until SIGINT or SIGTERM.
pub async fn run(g: &Global, config_path: &Path, state_dir: Option<&Path>) -> Result<(), CliError> {
    let config = Config::load(config_path).map_err(|e| CliError::Usage(e.to_string()))?;
    let fleet = g.fleet()?;
    let nats = g.connect().await?;
    let dir = state_dir
        .map(Path::to_path_buf)
        .unwrap_or_else(|| fleet.dir.join("serve"));
    let state = ServeState::open(&dir).map_err(|e| CliError::Usage(e.to_string()))?;
    let instance = format!("{}-{}", hostname(), uuid::Uuid::new_v4().simple());
    let mut lease = Lease::open(&nats.js, instance.clone())
        .await
        .map_err(|why| CliError::Request {
            what: "open the lease".into(),
            why,
        })?;

    let cancel = CancellationToken::new();
    let registry = Registry::spawn(nats.clone(), cancel.child_token());
    let metrics = Arc::new(Mutex::new(metrics::Snapshot {
        heartbeats: registry.heartbeats_counter(),
        ..Default::default()
    }));
    if let Some(m) = &config.metrics {
        let listener = tokio::net::TcpListener::bind(&m.listen)
            .await
            .map_err(|source| CliError::Io {
                path: m.listen.clone().into(),
                source,
            })?;
        tokio::spawn(metrics::serve(
            listener,
            metrics.clone(),
            cancel.child_token(),
        ));
    }
    let mut finished = nats
        .client
        .subscribe(format!("{}.events.task.finished.*", subject::ROOT))
        .await
        .map_err(request_err("subscribe to task results"))?;
    let mut rejected = nats
        .client
        .subscribe(format!("{}.events.security.task_rejected.*", subject::ROOT))
        .await
        .map_err(request_err("subscribe to rejections"))?;
    let mut everything = nats
        .client
        .subscribe(subject::event_all())
        .await
        .map_err(request_err("subscribe to events"))?;

    let tick_every = duration(&config.serve.tick)
        .ok()
        .and_then(|d| d.to_std().ok())
        .unwrap_or(std::time::Duration::from_secs(5));
    let mut daemon = Daemon {
        notifier: Notifier::new(config.notify.clone()),
        config,
        nats,
        dispatch_fleet: fleet,
        state,
        queue: VecDeque::new(),
        running: HashMap::new(),
        metrics,
        registry,
        leader: false,
        started: crate::now_ms(),
        status: None,
    };
    daemon.status = open_status_bucket(&daemon.nats).await;
    daemon.arm_plans();
    info!(instance = %instance, plans = daemon.config.plan.len(), "flotilla serve started");

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|source| CliError::Io {
            path: "SIGTERM".into(),
            source,
        })?;
    let mut tick = tokio::time::interval(tick_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
            _ = tick.tick() => {
                daemon.leader = lease.refresh().await;
                daemon.tick().instrument(info_span!("tick")).await;
            }
            Some(msg) = finished.next() => {
                if let Ok(ev) = Event::decode(&msg.payload) {
                    daemon.on_finished(&ev).await;
                }
            }
            Some(msg) = rejected.next() => {
                if let Ok(ev) = Event::decode(&msg.payload) {
                    daemon.on_rejected(&ev).await;
                }
            }
            Some(msg) = everything.next() => {
                if daemon.leader {
                    if let Ok(ev) = Event::decode(&msg.payload) {
                        daemon.notifier.route(&ev);
                    }
                }
            }
        }
    }
    // Shutdown order: stop the endpoint, hand the lease over, then exit. Jobs
    // already dispatched keep running on their agents; a restarted daemon
    // sees their results in the stream only if it is running by then.
    cancel.cancel();
    lease.release().await;
    info!("flotilla serve stopped");
    Ok(())
}

async fn open_status_bucket(nats: &Nats) -> Option<async_nats::jetstream::kv::Store> {
    use async_nats::jetstream::kv;
    match nats
        .js
        .get_key_value(flotilla_protocol::status::STATUS_BUCKET)
        .await
    {
        Ok(s) => Some(s),
        Err(_) => nats
            .js
            .create_key_value(kv::Config {
                bucket: flotilla_protocol::status::STATUS_BUCKET.into(),
                description: "what flotilla serve knows about every plan".into(),
                history: 1,
                ..Default::default()
            })
            .await
            .map_err(|e| warn!(error = %e, "cannot create the status bucket"))
            .ok(),
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "coordinator".into())
}

fn local(ms: u64) -> DateTime<Local> {
    Local
        .timestamp_millis_opt(ms as i64)
        .single()
        .unwrap_or_else(Local::now)
}

impl Daemon {
    /// A plan seen for the first time waits for its first scheduled time.
    fn arm_plans(&self) {
        let now = crate::now_ms();
        for plan in &self.config.plan {
            for key in [
                run_key(plan, "backup"),
                run_key(plan, "check"),
                run_key(plan, "read_data"),
                run_key(plan, "prune"),
            ] {
                if matches!(self.state.last_run(&key), Ok(None)) {
                    let _ = self.state.set_last_run(&key, now);
                }
            }
        }
    }

    async fn tick(&mut self) {
        // The registry is read once per tick and shared by metrics and watchdog:
        // from the live copy, or from the bucket until that copy has caught up.
        let hosts = match self.registry.hosts() {
            Some(hosts) => Some(hosts),
            None => self.nats.hosts().await.ok(),
        };
        self.refresh_metrics(hosts.as_deref().unwrap_or_default())
            .await;
        if !self.leader {
            return;
        }
        let now = crate::now_ms();
        self.schedule(now);
        self.dispatch_queued(now).await;
        if let Some(hosts) = &hosts {
            self.watchdog(now, hosts).await;
        }
        self.publish_status(now).await;
    }

    /// Writes what `flotilla status` shows into the status bucket.
    async fn publish_status(&self, now: u64) {
        let Some(store) = &self.status else { return };
        let mut entries = Vec::new();
        for (i, plan) in self.config.plan.iter().enumerate() {
            let next_run = plan.schedule.as_ref().and_then(|c| {
                let cron = Cron::parse(c.get_ref()).ok()?;
                let last = self
                    .state
                    .last_run(&run_key(plan, "backup"))
                    .ok()
                    .flatten()
                    .unwrap_or(now);
                let jitter = plan
                    .jitter
                    .as_ref()
                    .and_then(|j| duration(j.get_ref()).ok())
                    .map(|max| jitter_for(plan.name.get_ref(), max))
                    .unwrap_or_else(chrono::Duration::zero);
                match due(&cron, jitter, &local(last), &local(now)) {
                    Due::At(t) | Due::Now { scheduled: t, .. } => {
                        Some(t.timestamp_millis().max(0) as u64)
                    }
                    Due::Never => None,
                }
            });
            for host in plan.host_names() {
                let success = self.state.success(plan.name.get_ref(), host.as_str());
                let overdue = self
                    .state
                    .alert(&format!("overdue/{}/{host}", plan.name.get_ref()))
                    .is_some();
                let running_task = self
                    .running
                    .iter()
                    .find(|(_, r)| r.job.host == host && r.job.kind == JobKind::Backup { plan: i })
                    .map(|(id, _)| id.clone());
                entries.push(flotilla_protocol::status::PlanHostStatus {
                    plan: plan.name.get_ref().clone(),
                    host: host.to_string(),
                    storage: plan.to.get_ref().clone(),
                    last_success: success.as_ref().map(|s| s.time),
                    last_snapshot: success.and_then(|s| s.snapshot),
                    next_run,
                    overdue,
                    running_task,
                });
            }
        }
        let status = flotilla_protocol::status::FleetStatus {
            v: flotilla_protocol::status::STATUS_VERSION,
            time: now,
            entries,
            queued: self.queue.len() as u64,
        };
        if let Ok(bytes) = flotilla_protocol::encode(&status) {
            if let Err(e) = store
                .put(flotilla_protocol::status::STATUS_KEY, bytes.into())
                .await
            {
                warn!(error = %e, "cannot publish status");
            }
        }
    }

    /// Queues the plans whose time has come.
    fn schedule(&mut self, now: u64) {
        let mut due_jobs = Vec::new();
        for (i, plan) in self.config.plan.iter().enumerate() {
            let Some(storage) = plan.storage() else {
                continue;
            };
            let jobs = [
                (
                    "backup",
                    plan.schedule.as_ref(),
                    JobKind::Backup { plan: i },
                ),
                (
                    "check",
                    plan.check.as_ref(),
                    JobKind::Check {
                        read_data: false,
                        plan: i,
                    },
                ),
                (
                    "read_data",
                    plan.check_read_data.as_ref(),
                    JobKind::Check {
                        read_data: true,
                        plan: i,
                    },
                ),
                ("prune", plan.prune.as_ref(), JobKind::Prune { plan: i }),
            ];
            for (what, cron, kind) in jobs {
                let Some(cron) = cron else { continue };
                let Ok(cron) = Cron::parse(cron.get_ref()) else {
                    continue;
                };
                let key = run_key(plan, what);
                let last = self.state.last_run(&key).ok().flatten().unwrap_or(now);
                let jitter = plan
                    .jitter
                    .as_ref()
                    .and_then(|j| duration(j.get_ref()).ok())
                    .map(|max| jitter_for(plan.name.get_ref(), max))
                    .unwrap_or_else(chrono::Duration::zero);
                if let Due::Now { missed, .. } = due(&cron, jitter, &local(last), &local(now)) {
                    info!(plan = %plan.name.get_ref(), job = what, missed, "plan due");
                    let _ = self.state.set_last_run(&key, now);
                    let hosts = match kind {
                        JobKind::Backup { .. } => plan.host_names(),
                        JobKind::Check { .. } | JobKind::Prune { .. } => vec![storage.clone()],
                    };
                    for host in hosts {
                        due_jobs.push(Queued {
                            kind: kind.clone(),
                            host,
                            storage: storage.clone(),
                            attempt: 1,
                            not_before: now,
                        });
                    }
                }
            }
        }
        for job in due_jobs {
            self.enqueue(job);
        }
    }

    /// Queues a job unless the same one is already queued or running.
    fn enqueue(&mut self, q: Queued) {
        let same = |o: &Queued| o.kind == q.kind && o.host == q.host;
        if self.queue.iter().any(same) || self.running.values().any(|r| same(&r.job)) {
            info!(host = %q.host, "job already queued or running; not queued again");
            return;
        }
        self.queue.push_back(q);
    }

    /// Sends queued jobs within each storage host's concurrency limit.
    async fn dispatch_queued(&mut self, now: u64) {
        let max = self.config.serve.max_per_storage.max(1);
        let mut kept = VecDeque::new();
        while let Some(q) = self.queue.pop_front() {
            let busy = self
                .running
                .values()
                .filter(|r| r.job.storage == q.storage)
                .count();
            if q.not_before > now || busy >= max {
                kept.push_back(q);
                continue;
            }
            match self.send(&q).await {
                Ok(task_id) => {
                    info!(host = %q.host, task = %task_id, attempt = q.attempt, "job dispatched");
                    if let JobKind::Backup { plan } = q.kind {
                        self.notifier
                            .job_started(self.config.plan[plan].name.get_ref());
                    }
                    self.running.insert(task_id, Running { job: q });
                }
                Err(e) => {
                    warn!(host = %q.host, error = %e, "cannot dispatch job; retrying later");
                    let mut q = q;
                    q.not_before = now + self.backoff_ms(q.attempt);
                    kept.push_back(q);
                }
            }
        }
        self.queue = kept;
    }

    async fn send(&self, q: &Queued) -> Result<String, CliError> {
        let dispatch = Dispatch::new(&self.dispatch_fleet, &self.nats)?;
        let kind = match &q.kind {
            JobKind::Backup { plan } => {
                let plan: &Plan = &self.config.plan[*plan];
                let addr = crate::cli::storage_addr(&self.nats, &q.storage).await?;
                TaskKind::Backup {
                    paths: plan.paths.clone(),
                    excludes: plan.exclude.clone(),
                    storage: q.storage.clone(),
                    storage_addr: addr,
                }
            }
            JobKind::Check { read_data, .. } => TaskKind::Check {
                read_data: *read_data,
            },
            JobKind::Prune { .. } => TaskKind::Prune {
                dry_run: false,
                grace_secs: duration(&self.config.serve.prune_grace)
                    .map(|d| d.num_seconds().max(0) as u64)
                    .unwrap_or(3600),
            },
        };
        dispatch.publish(&q.host, kind).await
    }

    fn backoff_ms(&self, attempt: u32) -> u64 {
        let base = duration(&self.config.serve.retry_backoff)
            .map(|d| d.num_milliseconds().max(0) as u64)
            .unwrap_or(30_000);
        base.saturating_mul(1 << attempt.saturating_sub(1).min(10))
    }

    fn plan_name(&self, kind: &JobKind) -> String {
        match kind {
            JobKind::Backup { plan } | JobKind::Check { plan, .. } | JobKind::Prune { plan } => {
                self.config.plan[*plan].name.get_ref().clone()
            }
        }
    }

    async fn on_finished(&mut self, ev: &Event) {
        let EventBody::TaskFinished(done) = &ev.body else {
            return;
        };
        // Any successful backup counts for every plan it satisfies (same
        // host, same storage), whoever started it: RPO, status, retention.
        if let (Some(TaskResult::Backup(r)), TaskOutcome::Succeeded | TaskOutcome::Partial) =
            (&done.result, done.outcome)
        {
            self.backup_succeeded(&ev.host, r, ev.time, done.duration_ms)
                .await;
        }
        let Some(run) = self.running.remove(&done.task_id) else {
            return;
        };
        let plan = self.plan_name(&run.job.kind);
        let job_kind = run.job.kind.name();
        let snapshot = match &done.result {
            Some(TaskResult::Backup(r)) => Some(r.snapshot.clone()),
            _ => None,
        };
        let ended = JobEnded {
            task_id: done.task_id.clone(),
            job_kind: job_kind.into(),
            plan: Some(plan.clone()),
            attempts: run.job.attempt,
            error: done.error.clone(),
            snapshot,
        };
        match done.outcome {
            TaskOutcome::Cancelled => {
                let msg = format!(
                    "{job_kind} job of plan {plan} on {} was cancelled",
                    run.job.host
                );
                self.publish(
                    &run.job.host,
                    Severity::Warning,
                    msg,
                    EventBody::JobCancelled(ended),
                )
                .await;
            }
            TaskOutcome::Succeeded | TaskOutcome::Partial => {
                let (sev, body, verb) = if done.outcome == TaskOutcome::Succeeded {
                    (Severity::Info, EventBody::JobSucceeded(ended), "succeeded")
                } else {
                    (
                        Severity::Warning,
                        EventBody::JobPartial(ended),
                        "finished with skipped files",
                    )
                };
                self.publish(
                    &run.job.host,
                    sev,
                    format!("{job_kind} job of plan {plan} on {} {verb}", run.job.host),
                    body,
                )
                .await;
            }
            TaskOutcome::Failed => {
                if done.retryable && run.job.attempt < self.config.serve.retries.max(1) {
                    let mut again = run.job.clone();
                    again.attempt += 1;
                    again.not_before = crate::now_ms() + self.backoff_ms(run.job.attempt);
                    info!(host = %again.host, attempt = again.attempt, "retryable failure; job queued again");
                    self.queue.push_back(again);
                } else {
                    let msg = format!(
                        "{job_kind} job of plan {plan} on {} failed after {} attempt(s): {}",
                        run.job.host,
                        run.job.attempt,
                        done.error.clone().unwrap_or_default()
                    );
                    self.publish(
                        &run.job.host,
                        Severity::Error,
                        msg,
                        EventBody::JobFailed(ended),
                    )
                    .await;
                }
            }
        }
    }

    /// Records a successful backup of `host` for every plan it satisfies and
    /// applies those plans' keep policies.
    async fn backup_succeeded(
        &self,
        host: &HostName,
        report: &flotilla_protocol::BackupReport,
        time: u64,
        duration_ms: u64,
    ) {
        let plans: Vec<(usize, HostName)> = self
            .config
            .plan
            .iter()
            .enumerate()
            .filter(|(_, p)| p.to.get_ref() == &report.storage && p.host_names().contains(host))
            .filter_map(|(i, p)| Some((i, p.storage()?)))
            .collect();
        for (i, storage) in plans {
            let name = self.config.plan[i].name.get_ref();
            let s = Success {
                v: 1,
                time,
                snapshot: Some(report.snapshot.clone()),
                bytes_added: report.summary.bytes_added,
                duration_ms,
            };
            if let Err(e) = self.state.set_success(name, host.as_str(), &s) {
                warn!(error = %e, "cannot record success");
            }
            let _ = self.state.clear_alert(&format!("overdue/{name}/{host}"));
            if self.leader {
                self.apply_retention(i, host, &storage).await;
            }
        }
    }

    /// Forgets what the plan's keep policy no longer keeps of `host`'s
    /// snapshots (data goes at the plan's next prune).
    async fn apply_retention(&self, plan: usize, host: &HostName, storage: &HostName) {
        let policy = &self.config.plan[plan].keep;
        if policy.is_empty() {
            return;
        }
        let key = match crate::cli::repo_key(&self.dispatch_fleet) {
            Ok(k) => k,
            Err(e) => return warn!(error = %e, "cannot apply retention"),
        };
        let verdicts =
            match crate::cli::decide(&self.nats, &key, policy, Some(host), Some(storage)).await {
                Ok(v) => v,
                Err(e) => return warn!(error = %e, "cannot apply retention"),
            };
        let doomed: Vec<String> = verdicts
            .iter()
            .filter(|(_, v)| !v.keep)
            .map(|(f, _)| f.record.id.clone())
            .collect();
        if doomed.is_empty() {
            return;
        }
        let dispatch = match Dispatch::new(&self.dispatch_fleet, &self.nats) {
            Ok(d) => d,
            Err(e) => return warn!(error = %e, "cannot apply retention"),
        };
        match dispatch
            .publish(
                storage,
                TaskKind::Forget {
                    snapshots: doomed.clone(),
                },
            )
            .await
        {
            Ok(task) => info!(%host, forgotten = doomed.len(), %task, "retention applied"),
            Err(e) => warn!(error = %e, "cannot send forget"),
        }
    }

    async fn on_rejected(&mut self, ev: &Event) {
        let EventBody::TaskRejected {
            task_id: Some(id),
            detail,
            ..
        } = &ev.body
        else {
            return;
        };
        let Some(run) = self.running.remove(id) else {
            return;
        };
        let plan = self.plan_name(&run.job.kind);
        let job_kind = run.job.kind.name();
        let ended = JobEnded {
            task_id: id.clone(),
            job_kind: job_kind.into(),
            plan: Some(plan.clone()),
            attempts: run.job.attempt,
            error: Some(detail.clone()),
            snapshot: None,
        };
        let msg = format!(
            "job of plan {plan} on {} was refused: {detail}",
            run.job.host
        );
        self.publish(
            &run.job.host,
            Severity::Error,
            msg,
            EventBody::JobFailed(ended),
        )
        .await;
    }

    /// Missed heartbeats, missed RPOs, full disks, version drift: each raised
    /// once per occurrence.
    async fn watchdog(&mut self, now: u64, hosts: &[crate::nats::HostRecord]) {
        for rec in hosts {
            let hb = &rec.heartbeat;
            let host = hb.host.clone();
            let key = format!("offline/{host}");
            match rec.offline_reason(now) {
                Some("missed_heartbeats") => {
                    let marker = rec.stored_at.to_be_bytes();
                    if self.state.alert(&key).as_deref() != Some(&marker[..]) {
                        let _ = self.state.set_alert(&key, &marker);
                        let msg = format!(
                            "agent {host} missed its heartbeats (last seen {} s ago)",
                            (now.saturating_sub(rec.stored_at)) / 1000
                        );
                        self.publish(
                            &host,
                            Severity::Error,
                            msg,
                            EventBody::AgentOffline {
                                reason: "missed_heartbeats".into(),
                            },
                        )
                        .await;
                    }
                }
                Some(_) => {}
                None => {
                    let _ = self.state.clear_alert(&key);
                }
            }
            if hb.state == AgentState::Online && hb.version != VERSION {
                let key = format!("version/{host}");
                if self.state.alert(&key).as_deref() != Some(hb.version.as_bytes()) {
                    let _ = self.state.set_alert(&key, hb.version.as_bytes());
                    let msg = format!(
                        "agent {host} runs {} but the coordinator is {VERSION}",
                        hb.version
                    );
                    self.publish(
                        &host,
                        Severity::Warning,
                        msg,
                        EventBody::AgentVersionMismatch {
                            agent_version: hb.version.clone(),
                            coordinator_version: VERSION.into(),
                        },
                    )
                    .await;
                }
            }
            for root in hb
                .roots
                .iter()
                .filter(|r| r.kind == RootKind::Storage && r.total_bytes > 0)
            {
                let key = format!("lowspace/{host}/{}", root.path);
                let low = (root.free_bytes as f64)
                    < self.config.serve.low_space_ratio * root.total_bytes as f64;
                match (low, self.state.alert(&key).is_some()) {
                    (true, false) => {
                        let _ = self.state.set_alert(&key, b"1");
                        let msg = format!(
                            "storage {} on {host} is nearly full: {} of {} bytes free",
                            root.path, root.free_bytes, root.total_bytes
                        );
                        self.publish(
                            &host,
                            Severity::Warning,
                            msg,
                            EventBody::StorageLowSpace {
                                path: root.path.clone(),
                                free_bytes: root.free_bytes,
                                total_bytes: root.total_bytes,
                            },
                        )
                        .await;
                    }
                    (false, true) => {
                        let _ = self.state.clear_alert(&key);
                    }
                    _ => {}
                }
            }
        }
        let known: HashSet<&str> = hosts.iter().map(|r| r.heartbeat.host.as_str()).collect();
        let mut overdue = Vec::new();
        for plan in &self.config.plan {
            let Some(rpo) = plan.rpo() else { continue };
            let rpo_ms = rpo.num_milliseconds().max(0) as u64;
            for host in plan.host_names() {
                let last = self
                    .state
                    .success(plan.name.get_ref(), host.as_str())
                    .map(|s| s.time);
                let since = last.unwrap_or(self.started);
                if now.saturating_sub(since) <= rpo_ms {
                    continue;
                }
                let key = format!("overdue/{}/{host}", plan.name.get_ref());
                let marker = since.to_be_bytes();
                if self.state.alert(&key).as_deref() == Some(&marker[..]) {
                    continue;
                }
                let _ = self.state.set_alert(&key, &marker);
                let seen = if known.contains(host.as_str()) {
                    ""
                } else {
                    " (host never seen)"
                };
                overdue.push((host, plan.name.get_ref().clone(), last, rpo_ms, seen));
            }
        }
        for (host, plan, last, rpo_ms, seen) in overdue {
            let msg = format!("no successful backup of plan {plan} on {host} for longer than its RPO of {} s{seen}", rpo_ms / 1000);
            self.publish(
                &host,
                Severity::Error,
                msg,
                EventBody::BackupOverdue {
                    plan,
                    last_success: last,
                    rpo_secs: rpo_ms / 1000,
                },
            )
            .await;
        }
    }

    async fn refresh_metrics(&mut self, hosts: &[crate::nats::HostRecord]) {
        let now = crate::now_ms();
        let snapshot = metrics::Snapshot {
            successes: self
                .state
                .successes()
                .into_iter()
                .map(|(plan, host, s)| {
                    (
                        host,
                        plan,
                        s.time as f64 / 1000.0,
                        s.bytes_added,
                        s.duration_ms as f64 / 1000.0,
                    )
                })
                .collect(),
            agents: hosts
                .iter()
                .map(|r| {
                    (
                        r.heartbeat.host.to_string(),
                        r.offline_reason(now).is_none(),
                    )
                })
                .collect(),
            storage: hosts
                .iter()
                .flat_map(|r| {
                    r.heartbeat
                        .roots
                        .iter()
                        .filter(|x| x.kind == RootKind::Storage)
                        .map(|x| {
                            (
                                r.heartbeat.host.to_string(),
                                x.path.clone(),
                                x.free_bytes,
                                x.total_bytes,
                            )
                        })
                        .collect::<Vec<_>>()
                })
                .collect(),
            repositories: self.repository_stats(hosts).await,
            leader: self.leader,
            running_jobs: self.running.len(),
            heartbeats: self.registry.heartbeats_counter(),
        };
        if let Ok(mut m) = self.metrics.lock() {
            *m = snapshot;
        }
    }

    /// Sizes of the online storage hosts' repositories.
    async fn repository_stats(
        &self,
        hosts: &[crate::nats::HostRecord],
    ) -> Vec<(String, flotilla_protocol::repo::RepoStats)> {
        let now = crate::now_ms();
        let mut out = Vec::new();
        for r in hosts.iter().filter(|r| {
            r.heartbeat
                .roles
                .contains(&flotilla_protocol::Role::Storage)
                && r.offline_reason(now).is_none()
        }) {
            let host = &r.heartbeat.host;
            let asked =
                crate::cli::query(&self.nats, subject::repo_stats(host), Vec::new(), host).await;
            if let Ok(flotilla_protocol::frame::RepoReply::Stats { stats }) = asked {
                out.push((host.to_string(), stats));
            }
        }
        out
    }

    async fn publish(&self, host: &HostName, severity: Severity, message: String, body: EventBody) {
        info!(%host, kind = body.kind(), %message, "event");
        if let Err(e) = self.nats.publish_event(host, severity, message, body).await {
            warn!(error = %e, "cannot publish event");
        }
    }
}

fn run_key(plan: &Plan, what: &str) -> String {
    format!("{}/{what}", plan.name.get_ref())
}
