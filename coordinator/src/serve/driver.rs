//! The daemon's I/O: NATS subscriptions, the lease, sled, the status bucket,
//! `/metrics` and notifications around the [`Core`], which decides.
//!
//! One task owns everything and reacts to four inputs: a tick (lease, then
//! schedules, timeouts, queue and watchdog, then the running jobs' outcomes
//! read back from the event stream after a reconnect), task results and
//! refusals from the event stream, every event (routed to notifications while
//! leading), and shutdown.
//! Each input becomes a call on the core with the time it happened at, and the
//! returned [`Action`]s are performed in order before the next input is taken.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Local;
use flotilla_protocol::status::{FleetStatus, STATUS_BUCKET, STATUS_KEY};
use flotilla_protocol::{subject, Event, HostName, RootKind, TaskId, TaskKind};
use futures::StreamExt;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, warn, Instrument};

use super::core::{Action, Core, LeaderChange, TaskSpec};
use super::error::ServeError;
use super::lease::{Lease, LeaseSeen};
use super::metrics;
use super::notify::Notifier;
use super::state::ServeState;
use crate::config::Config;
use crate::dispatch::{Dispatch, Since, CLOCK_MARGIN_MS};
use crate::error::CliError;
use crate::fleet::Fleet;
use crate::fleetops;
use crate::nats::{HostRecord, Nats};
use crate::registry::Registry;

/// How often the leading daemon checks the fleet's streams, buckets and
/// task consumers (as `flotilla doctor` does) and repairs them; also after
/// every reconnect (a restarted server may have lost its data).
const DOCTOR_EVERY: Duration = Duration::from_secs(300);

/// The coordinator's own version, compared with agents'.
const VERSION: &str = env!("CARGO_PKG_VERSION");

struct Driver {
    core: Core<ServeState, Local>,
    nats: Nats,
    fleet: Fleet,
    notifier: Notifier,
    metrics: Arc<Mutex<metrics::Snapshot>>,
    registry: Registry,
    /// `None` until opened, and again after a write failed.
    status: Option<async_nats::jetstream::kv::Store>,
    /// Reading the jobs' outcomes back from the event stream.
    read_back: ReadBack,
    /// This daemon's instance name (the lease's value when it leads).
    instance: String,
    /// When the streams were last examined, and the connection count then.
    doctor: Option<(tokio::time::Instant, u64)>,
}

/// The subscriptions hear nothing while the daemon is disconnected: a job's
/// `task.finished` published then would be lost, and the job would hold
/// its storage slot for good and never raise its `job.*` event. So after
/// every reconnect, and every [`READ_BACK_EVERY`] besides, the running
/// jobs' outcomes are read back from the event stream.
struct ReadBack {
    /// Connections the client has made; a change is a reconnect.
    connects: u64,
    /// When the stream was last read back.
    at: tokio::time::Instant,
    /// Where the next read starts.
    since: Since,
}

/// How often the running jobs' outcomes are read back while connected.
const READ_BACK_EVERY: Duration = Duration::from_secs(60);
/// Longest a read-back may take before it is left to the next one.
const READ_BACK_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether the bus is to be examined again, given how long ago it last was
/// and the connection count then (`None`: never), and the count now.
fn doctor_due(last: Option<(Duration, u64)>, connects: u64) -> bool {
    match last {
        None => true,
        Some((ago, seen)) => seen != connects || ago >= DOCTOR_EVERY,
    }
}

/// How many times the client has connected (1 until the first reconnect).
fn connects(nats: &Nats) -> u64 {
    nats.client.statistics().connects.load(Ordering::Relaxed)
}

/// The coordinator's machine, as events about it name it.
fn coordinator_host() -> HostName {
    HostName::new(hostname())
        .or_else(|_| HostName::new("coordinator"))
        .expect("\"coordinator\" is a valid host name")
}

/// `flotilla doctor`'s examination with repair; a failure to examine is
/// logged (the bus may be down) and tried again later.
async fn examine_bus(nats: &Nats) -> Vec<crate::doctor::Finding> {
    match crate::doctor::examine(nats, true, false).await {
        Ok(findings) => findings,
        Err(e) => {
            warn!(error = %e, "cannot examine the fleet's streams and buckets; trying again later");
            Vec::new()
        }
    }
}

/// Subscribes to `subject`; failing means the bus is gone.
async fn subscribe(nats: &Nats, subject: String) -> Result<async_nats::Subscriber, ServeError> {
    nats.client
        .subscribe(subject.clone())
        .await
        .map_err(|source| ServeError::Subscribe { subject, source })
}

/// Runs the daemon until SIGINT or SIGTERM.
///
/// It fails only at start: state directory, lease bucket, subscriptions,
/// metrics address. Once running, trouble (the bus restarting included) is
/// logged and waited out.
pub async fn run(
    config: Config,
    fleet: Fleet,
    nats: Nats,
    state_dir: Option<&Path>,
) -> Result<(), ServeError> {
    for w in fleetops::config_warnings(&config, Some(&fleet.dir)) {
        warn!("flotilla.toml: {w}");
    }
    let dir = state_dir
        .map(Path::to_path_buf)
        .unwrap_or_else(|| fleet.dir.join("serve"));
    let state = ServeState::open(&dir).map_err(|source| ServeError::State {
        dir: dir.clone(),
        source,
    })?;
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|source| ServeError::Signal { source })?;
    let instance = format!("{}-{}", hostname(), uuid::Uuid::new_v4().simple());
    // The streams and buckets first: the subscriptions below are plain, but
    // a task sent into a missing or crippled stream would be lost.
    let at_start = examine_bus(&nats).await;
    let mut lease = Lease::open(&nats.js, instance.clone()).await?;

    let listener = match &config.metrics {
        Some(m) => Some(
            tokio::net::TcpListener::bind(m.listen)
                .await
                .map_err(|source| ServeError::Metrics {
                    addr: m.listen,
                    source,
                })?,
        ),
        None => None,
    };
    let mut finished = subscribe(&nats, subject::events_of_kind("task.finished")).await?;
    let mut rejected = subscribe(&nats, subject::events_of_kind("security.task_rejected")).await?;
    let mut everything = subscribe(&nats, subject::event_all()).await?;

    // Nothing fails from here on: start the tasks, each owned.
    let cancel = CancellationToken::new();
    let registry = Registry::spawn(nats.clone(), cancel.child_token());
    let metrics = Arc::new(Mutex::new(metrics::Snapshot {
        heartbeats: registry.heartbeats_counter(),
        ..Default::default()
    }));
    let mut endpoint = JoinSet::new();
    if let Some(listener) = listener {
        endpoint.spawn(metrics::serve(
            listener,
            metrics::registry(metrics.clone()),
            cancel.child_token(),
        ));
    }

    let tick_every = config.serve.tick;
    let plans = config.plan.len();
    let mut driver = Driver {
        notifier: Notifier::new(config.notify.clone()),
        core: Core::new(config, state, Local, VERSION, crate::now_ms()),
        status: open_status_bucket(&nats).await,
        read_back: ReadBack {
            connects: connects(&nats),
            at: tokio::time::Instant::now(),
            since: Since::Time(crate::now_ms().saturating_sub(CLOCK_MARGIN_MS)),
        },
        nats,
        fleet,
        metrics,
        registry,
        instance: instance.clone(),
        doctor: None,
    };
    driver.doctor = Some((tokio::time::Instant::now(), connects(&driver.nats)));
    driver.bus_findings(at_start).await;
    info!(instance = %instance, plans, "flotilla serve started");

    let mut tick = tokio::time::interval(tick_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
            _ = tick.tick() => {
                let seen = driver.status_of_holder(lease.refresh().await).await;
                let actions = driver.core.on_lease(crate::now_ms(), seen);
                driver.perform(actions).await;
                driver.doctor().instrument(info_span!("doctor")).await;
                driver.tick().instrument(info_span!("tick")).await;
                driver.read_back().instrument(info_span!("read_back")).await;
            }
            Some(msg) = finished.next() => {
                if let Ok(ev) = Event::decode_on(&msg.subject, &msg.payload) {
                    let actions = driver.core.on_finished(crate::now_ms(), &ev);
                    driver.perform(actions).await;
                }
            }
            Some(msg) = rejected.next() => {
                if let Ok(ev) = Event::decode_on(&msg.subject, &msg.payload) {
                    let actions = driver.core.on_rejected(&ev);
                    driver.perform(actions).await;
                }
            }
            Some(msg) = everything.next() => {
                if driver.core.is_leader() {
                    if let Ok(ev) = Event::decode_on(&msg.subject, &msg.payload) {
                        driver.notifier.route(&ev);
                    }
                }
            }
        }
    }
    // Shutdown order: stop the endpoint and the registry, hand the lease
    // over, then exit. Jobs already dispatched keep running on their agents;
    // a restarted daemon sees their results in the stream only if it is
    // running by then.
    cancel.cancel();
    while endpoint.join_next().await.is_some() {}
    if let Err(e) = lease.release().await {
        warn!(error = %e, "the lease expires by itself instead");
    }
    info!("flotilla serve stopped");
    Ok(())
}

async fn open_status_bucket(nats: &Nats) -> Option<async_nats::jetstream::kv::Store> {
    use async_nats::jetstream::kv;
    match nats.js.get_key_value(STATUS_BUCKET).await {
        Ok(s) => Some(s),
        Err(_) => nats
            .js
            .create_key_value(kv::Config {
                bucket: STATUS_BUCKET.into(),
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

impl Driver {
    /// Fills in when the lease's other holder last wrote the fleet status
    /// (its entry's time in the status bucket), so the core can tell a
    /// leader from a holder that does nothing.
    async fn status_of_holder(&mut self, seen: LeaseSeen) -> LeaseSeen {
        let LeaseSeen::HeldByOther {
            holder: Some(holder),
            status_at: None,
        } = seen
        else {
            return seen;
        };
        let status_at = match self.nats.js.get_key_value(STATUS_BUCKET).await {
            Ok(store) => match store.entry(STATUS_KEY).await {
                Ok(Some(entry)) => {
                    let ms = entry.created.unix_timestamp_nanos() / 1_000_000;
                    u64::try_from(ms).ok()
                }
                _ => None,
            },
            Err(_) => None,
        };
        LeaseSeen::HeldByOther {
            holder: Some(holder),
            status_at,
        }
    }

    /// Examines and repairs the bus while leading, every [`DOCTOR_EVERY`]
    /// and after every reconnect.
    async fn doctor(&mut self) {
        if !self.core.is_leader() {
            return;
        }
        let connects = connects(&self.nats);
        let last = self.doctor.map(|(at, seen)| (at.elapsed(), seen));
        if !doctor_due(last, connects) {
            return;
        }
        self.doctor = Some((tokio::time::Instant::now(), connects));
        let found = examine_bus(&self.nats).await;
        self.bus_findings(found).await;
    }

    /// Logs what examining the bus found and publishes `bus.repaired`.
    async fn bus_findings(&self, findings: Vec<crate::doctor::Finding>) {
        if findings.is_empty() {
            return;
        }
        for f in &findings {
            warn!(finding = %f, "the fleet's streams were not as they must be");
        }
        let lines: Vec<String> = findings.iter().take(100).map(ToString::to_string).collect();
        let unrepaired = findings.iter().filter(|f| f.repaired.is_none()).count();
        let message = format!(
            "{} problem(s) with the fleet's streams, buckets or task consumers, {} repaired{}: {}",
            findings.len(),
            findings.len() - unrepaired,
            if unrepaired > 0 {
                "; run `flotilla doctor` to see what is left"
            } else {
                ""
            },
            lines.join("; ")
        );
        let host = coordinator_host();
        let body = flotilla_protocol::EventBody::BusRepaired { findings: lines };
        if let Err(e) = self
            .nats
            .publish_event(&host, flotilla_protocol::Severity::Error, message, body)
            .await
        {
            warn!(error = %e, "cannot publish bus.repaired");
        }
    }

    /// Publishes `coordinator.standby` (about the coordinator's machine).
    async fn standby_event(&self, for_ms: u64, holder: Option<String>, why: String) {
        let host = coordinator_host();
        let message = format!(
            "flotilla serve {} has stood by for {} s with no daemon seen leading: {why}; schedules and alerts may not be running",
            self.instance,
            for_ms / 1000
        );
        let body = flotilla_protocol::EventBody::CoordinatorStandby {
            instance: self.instance.clone(),
            holder,
            standby_secs: for_ms / 1000,
            why,
        };
        if let Err(e) = self
            .nats
            .publish_event(&host, flotilla_protocol::Severity::Warning, message, body)
            .await
        {
            warn!(error = %e, "cannot publish coordinator.standby");
        }
    }

    /// Reads the running jobs' outcomes back from the event stream after a
    /// reconnect or when [`READ_BACK_EVERY`] has passed, and hands the core
    /// those it has not had yet (a job the live subscription already ended
    /// is no longer running, so nothing is taken twice).
    async fn read_back(&mut self) {
        let connects = connects(&self.nats);
        let reconnected = connects != self.read_back.connects;
        self.read_back.connects = connects;
        if !reconnected && self.read_back.at.elapsed() < READ_BACK_EVERY {
            return;
        }
        self.read_back.at = tokio::time::Instant::now();
        let mut hosts: Vec<HostName> = self
            .core
            .running_tasks()
            .into_iter()
            .map(|(_, host)| host)
            .collect();
        if hosts.is_empty() {
            return;
        }
        hosts.sort();
        hosts.dedup();
        let since = self.read_back.since;
        let read = match tokio::time::timeout(
            READ_BACK_TIMEOUT,
            crate::dispatch::read_back(&self.nats, &hosts, since),
        )
        .await
        {
            Ok(Ok(read)) => read,
            Ok(Err(e)) => {
                return warn!(error = %e, "cannot read job outcomes back from the event stream")
            }
            Err(_) => return warn!("reading job outcomes back from the event stream timed out"),
        };
        for (seq, ev) in read {
            self.read_back.since = Since::After(seq);
            let ours = ev
                .body
                .task_id()
                .is_some_and(|id| self.core.follows(id, &ev.host));
            if !ours {
                continue;
            }
            info!(host = %ev.host, kind = ev.body.kind(), "job outcome read back from the event stream");
            let actions = match ev.body {
                flotilla_protocol::EventBody::TaskRejected { .. } => self.core.on_rejected(&ev),
                _ => self.core.on_finished(crate::now_ms(), &ev),
            };
            self.perform(actions).await;
        }
    }

    async fn tick(&mut self) {
        // The registry is read once per tick and shared by metrics and the
        // watchdog: from the live copy, or from the bucket until that copy
        // has caught up.
        let hosts = match self.registry.hosts() {
            Some(hosts) => Some(hosts),
            None => self.nats.hosts().await.ok(),
        };
        self.refresh_metrics(hosts.as_deref().unwrap_or_default())
            .await;
        let now = crate::now_ms();
        let actions = self.core.on_tick(now, hosts.as_deref());
        self.perform(actions).await;
        if self.core.is_leader() {
            self.publish_status(self.core.status(crate::now_ms())).await;
        }
    }

    /// Performs actions in order; those that answer the core (a dispatch)
    /// may add more.
    async fn perform(&mut self, actions: Vec<Action>) {
        let mut todo = VecDeque::from(actions);
        while let Some(action) = todo.pop_front() {
            match action {
                Action::Dispatch { job, host, task } => {
                    let sent = self.send(&host, task).await;
                    todo.extend(self.core.on_dispatched(job, sent, crate::now_ms()));
                }
                Action::Publish {
                    host,
                    severity,
                    message,
                    body,
                } => {
                    info!(%host, kind = body.kind(), %message, "event");
                    if let Err(e) = self
                        .nats
                        .publish_event(&host, severity, message, body)
                        .await
                    {
                        warn!(error = %e, "cannot publish event");
                    }
                }
                Action::ApplyRetention {
                    plan,
                    host,
                    storage,
                    keep,
                } => {
                    if let Err(e) = self.apply_retention(&host, &storage, &keep).await {
                        warn!(%plan, %host, error = %e, "cannot apply retention");
                    }
                }
                Action::JobStarted { plan } => self.notifier.job_started(&plan),
                Action::Leadership(change) => {
                    log_leadership(&change);
                    if let LeaderChange::LongStandby {
                        for_ms,
                        holder,
                        why,
                    } = change
                    {
                        self.standby_event(for_ms, holder, why).await;
                    }
                }
                Action::Cancel { host, task_id } => {
                    let sent = match Dispatch::new(&self.fleet, &self.nats) {
                        Ok(d) => {
                            d.publish(
                                &host,
                                TaskKind::Cancel {
                                    task_id: task_id.clone(),
                                },
                            )
                            .await
                        }
                        Err(e) => Err(e),
                    };
                    match sent {
                        Ok(_) => info!(%host, task = %task_id, "timed-out job sent a cancel"),
                        Err(e) => {
                            warn!(%host, task = %task_id, error = %e, "cannot cancel the timed-out job's task")
                        }
                    }
                }
            }
        }
    }

    async fn send(&self, host: &HostName, task: TaskSpec) -> Result<TaskId, CliError> {
        let dispatch = Dispatch::new(&self.fleet, &self.nats)?;
        let kind = match task {
            TaskSpec::Backup {
                storage,
                paths,
                excludes,
                allow_empty,
            } => TaskKind::Backup {
                paths,
                excludes,
                allow_empty,
                storage_addr: fleetops::storage_addr(&self.nats, &storage).await?,
                storage,
            },
            TaskSpec::Check { read_data } => TaskKind::Check { read_data },
            TaskSpec::Prune { grace_secs } => TaskKind::Prune {
                dry_run: false,
                grace_secs,
            },
            TaskSpec::Copy {
                to,
                hosts,
                snapshots,
                limit_bytes_per_sec,
            } => TaskKind::Copy {
                to_addr: fleetops::storage_addr(&self.nats, &to).await?,
                to,
                hosts,
                snapshots,
                limit_bytes_per_sec,
            },
        };
        dispatch.publish(host, kind).await
    }

    /// Forgets what `keep` no longer keeps of `host`'s snapshots on `storage`
    /// (data goes at the plan's next prune).
    async fn apply_retention(
        &self,
        host: &HostName,
        storage: &HostName,
        keep: &crate::retention::KeepPolicy,
    ) -> Result<(), CliError> {
        let key = fleetops::repo_key(&self.fleet)?;
        let decision = fleetops::decide(&self.nats, &key, keep, Some(host), Some(storage)).await?;
        if let Some(why) = decision.left_alone.warnings().into_iter().next() {
            return Err(CliError::Request {
                what: format!("apply retention to {host}'s snapshots on {storage}"),
                why,
            });
        }
        // `decide` was asked about this one storage host only.
        let Some(doomed) = fleetops::doomed(&decision.verdicts)?.remove(storage) else {
            return Ok(());
        };
        let task = Dispatch::new(&self.fleet, &self.nats)?
            .publish(
                storage,
                TaskKind::Forget {
                    snapshots: doomed.clone(),
                },
            )
            .await?;
        info!(%host, forgotten = doomed.len(), %task, "retention applied");
        Ok(())
    }

    /// Writes what `flotilla status` shows into the status bucket, opening
    /// it again after a failure (the server may have restarted).
    async fn publish_status(&mut self, status: FleetStatus) {
        if self.status.is_none() {
            self.status = open_status_bucket(&self.nats).await;
        }
        let Some(store) = &self.status else { return };
        let bytes = match flotilla_protocol::encode(&status) {
            Ok(b) => b,
            Err(e) => return warn!(error = %e, "cannot encode status"),
        };
        if let Err(e) = store.put(STATUS_KEY, bytes.into()).await {
            warn!(error = %e, "cannot publish status");
            self.status = None;
        }
    }

    async fn refresh_metrics(&mut self, hosts: &[HostRecord]) {
        let now = crate::now_ms();
        let snapshot = metrics::Snapshot {
            successes: self
                .core
                .successes()
                .into_iter()
                .map(|(plan, host, s)| metrics::LastSuccess {
                    host,
                    plan,
                    at_secs: s.time as f64 / 1000.0,
                    bytes_added: s.bytes_added,
                    duration_secs: s.duration_ms as f64 / 1000.0,
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
                        .map(|x| metrics::StorageRoot {
                            host: r.heartbeat.host.to_string(),
                            path: x.path.clone(),
                            free_bytes: x.free_bytes,
                            total_bytes: x.total_bytes,
                        })
                })
                .collect(),
            repositories: self.repository_stats(hosts).await,
            leader: self.core.is_leader(),
            running_jobs: self.core.running_jobs(),
            heartbeats: self.registry.heartbeats_counter(),
        };
        if let Ok(mut m) = self.metrics.lock() {
            *m = snapshot;
        }
    }

    /// Sizes of the online storage hosts' repositories.
    async fn repository_stats(
        &self,
        hosts: &[HostRecord],
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
                fleetops::query(&self.nats, subject::repo_stats(host), Vec::new(), host).await;
            if let Ok(flotilla_protocol::frame::RepoReply::Stats { stats }) = asked {
                out.push((host.to_string(), stats));
            }
        }
        out
    }
}

fn log_leadership(change: &LeaderChange) {
    match change {
        LeaderChange::Acquired { after_ms: None } => {
            info!("acquired the coordinator lease; dispatching")
        }
        LeaderChange::Acquired { after_ms: Some(ms) } => info!(
            standby_secs = ms / 1000,
            "acquired the coordinator lease after {} s on standby; dispatching",
            ms / 1000
        ),
        LeaderChange::Lost { why } => {
            warn!(%why, "lost the coordinator lease; standing by")
        }
        LeaderChange::LongStandby { for_ms, why, .. } => warn!(
            %why,
            "standby for {} s: no daemon can be seen leading",
            for_ms / 1000
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bus_is_examined_first_after_a_reconnect_and_then_every_few_minutes() {
        assert!(doctor_due(None, 1));
        assert!(!doctor_due(Some((Duration::from_secs(10), 1)), 1));
        assert!(
            doctor_due(Some((Duration::from_secs(10), 1)), 2),
            "reconnected"
        );
        assert!(doctor_due(Some((DOCTOR_EVERY, 1)), 1));
    }
}
