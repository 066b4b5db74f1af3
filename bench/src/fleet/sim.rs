//! One simulated agent: the real agent's control plane without its work.
//!
//! It mirrors `agent/src/bus.rs` (connection, task consumer, events stored
//! through JetStream), `agent/src/daemon.rs` (heartbeat loop, `agent.online`)
//! and `agent/src/jobs.rs` (verify → acknowledge → `task.started` →
//! `task.finished`; replays refused and terminated, redeliveries
//! acknowledged), minus the journal and the work: a backup "succeeds" at once
//! with an empty snapshot. Each agent is two tasks, one per loop.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use async_nats::jetstream::{self, consumer, kv, AckKind};
use flotilla_agent::{now_ms, VERSION};
use flotilla_protocol::repo::BackupSummary;
use flotilla_protocol::{
    encode, subject, verify_task, AgentState, BackupReport, Bundle, Event, EventBody, Heartbeat,
    HostName, PublicKey, RejectReason, Role, Severity, SnapshotId, TaskBody, TaskFinished, TaskId,
    TaskKind, TaskOutcome, TaskResult, EVENT_VERSION, HEARTBEAT_VERSION,
};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

/// How long event publication waits for the stream's acknowledgement (as the agent).
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to wait before pulling again after the task stream failed (as the agent).
const CONSUMER_RETRY: Duration = Duration::from_secs(2);
/// Attempts at each setup step (connect, bucket, consumer) before giving up.
const SETUP_ATTEMPTS: u32 = 6;
/// First pause between setup attempts; doubles each time.
const SETUP_BACKOFF: Duration = Duration::from_millis(250);
/// Distinct error messages kept for the report.
const MAX_ERRORS: usize = 10;
/// What a simulated storage host advertises as its QUIC address (nobody dials it).
const STORAGE_QUIC_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9);

/// What a simulated agent takes from its bundle.
#[derive(Debug, Clone)]
pub struct SimIdentity {
    /// Its host name.
    pub host: HostName,
    /// Its fleet id.
    pub fleet: String,
    /// The coordinator's task-verification key.
    pub key: PublicKey,
    /// Plays the storage host (role `storage`, a QUIC address) rather than a source.
    pub storage: bool,
    /// Its NATS user's credentials (`.creds` text), as its bundle holds them.
    pub creds: String,
    /// The fleet CA's certificate file, which signed the server's.
    pub ca: PathBuf,
}

impl SimIdentity {
    /// The identity in `bundle`.
    pub fn from_bundle(bundle: &Bundle, storage: bool, ca: &Path) -> Result<SimIdentity> {
        let key = bundle
            .coordinator_public_key()
            .with_context(|| format!("bundle of {} has no usable coordinator key", bundle.host))?;
        let creds = bundle
            .nats_creds
            .clone()
            .with_context(|| format!("bundle of {} has no NATS credentials", bundle.host))?;
        Ok(SimIdentity {
            host: bundle.host.clone(),
            fleet: bundle.fleet.clone(),
            key,
            storage,
            creds,
            ca: ca.to_path_buf(),
        })
    }
}

/// One verified task message as an agent received it.
#[derive(Debug, Clone)]
pub struct Receipt {
    /// The task id.
    pub task_id: TaskId,
    /// Its stream sequence (the same on a redelivery, another on a replay).
    pub stream_seq: u64,
    /// When it arrived, Unix ms.
    pub unix_ms: u64,
    /// When it arrived, since the bench started.
    pub at: Duration,
}

/// Counters every simulated agent adds to.
#[derive(Debug, Default)]
pub struct Counters {
    /// Setup steps that had to be tried again.
    pub setup_retries: AtomicU64,
    /// Agents whose first heartbeat is stored.
    pub online: AtomicU64,
    /// Heartbeats stored.
    pub heartbeats: AtomicU64,
    /// Heartbeats that failed.
    pub heartbeat_errors: AtomicU64,
    /// Events the event stream acknowledged.
    pub events: AtomicU64,
    /// Events not stored.
    pub event_errors: AtomicU64,
    /// Task acknowledgements (ack or term) not confirmed.
    pub ack_errors: AtomicU64,
    /// Task messages refused (forged, misaddressed, expired, replayed).
    pub rejected: AtomicU64,
    /// Errors from the pull stream (missed pull heartbeats and the like).
    pub stream_errors: AtomicU64,
}

/// Adds one to a counter.
pub fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Reads a counter.
pub fn get(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// What every simulated agent shares with the bench: clock, counters, receipts.
#[derive(Debug)]
pub struct Shared {
    /// When the bench started; receipts are timed from here.
    pub start: Instant,
    /// Heartbeat interval.
    pub heartbeat: Duration,
    /// Counters.
    pub counters: Counters,
    receipts: Mutex<HashMap<HostName, Vec<Receipt>>>,
    errors: Mutex<Vec<String>>,
}

impl Shared {
    /// State for a run with heartbeats every `heartbeat`.
    pub fn new(heartbeat: Duration) -> Shared {
        Shared {
            start: Instant::now(),
            heartbeat,
            counters: Counters::default(),
            receipts: Mutex::default(),
            errors: Mutex::default(),
        }
    }

    fn record(&self, host: &HostName, receipt: Receipt) {
        if let Ok(mut receipts) = self.receipts.lock() {
            receipts.entry(host.clone()).or_default().push(receipt);
        }
    }

    /// Every receipt so far, by host.
    pub fn receipts(&self) -> HashMap<HostName, Vec<Receipt>> {
        self.receipts.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// How many of `hosts` received a task at or after `since`.
    pub fn received_since(&self, hosts: &[HostName], since: Duration) -> usize {
        let Ok(receipts) = self.receipts.lock() else {
            return 0;
        };
        hosts
            .iter()
            .filter(|h| {
                receipts
                    .get(*h)
                    .is_some_and(|r| r.iter().any(|r| r.at >= since))
            })
            .count()
    }

    /// Keeps `what: error` for the report (the first few distinct ones).
    pub fn note_error(&self, what: &str, error: impl std::fmt::Display) {
        let line = format!("{what}: {error:#}");
        if let Ok(mut errors) = self.errors.lock() {
            if errors.len() < MAX_ERRORS && !errors.contains(&line) {
                eprintln!("  sim: {line}");
                errors.push(line);
            }
        }
    }

    /// The errors kept so far.
    pub fn errors(&self) -> Vec<String> {
        self.errors.lock().map(|e| e.clone()).unwrap_or_default()
    }
}

/// One simulated agent's identity and NATS handles.
#[derive(Debug)]
pub struct SimAgent {
    id: SimIdentity,
    /// The health bucket, on the first connection.
    health: kv::Store,
    /// JetStream for events, on the task connection (the second, if any).
    js: jetstream::Context,
    /// Every connection, so that extra ones stay open while the agent runs.
    _clients: Vec<async_nats::Client>,
}

impl SimAgent {
    /// Opens `connections` NATS connections for `id`, binds the health bucket
    /// and creates the agent's task consumer, retrying each step.
    pub async fn connect(
        id: SimIdentity,
        url: &str,
        connections: usize,
        shared: &Shared,
    ) -> Result<(SimAgent, consumer::PullConsumer)> {
        let mut clients = Vec::with_capacity(connections.max(1));
        for n in 0..connections.max(1) {
            let what = format!("connect {} to NATS", id.host);
            let id = &id;
            clients.push(retry(shared, &what, move || connect_nats(url, id, n)).await?);
        }
        let first = clients.first().cloned().context("no NATS connection")?;
        let tasks = clients.get(1).cloned().unwrap_or_else(|| first.clone());
        let health_js = jetstream::new(first);
        let js = jetstream::new(tasks);
        let (hj, host) = (&health_js, &id.host);
        let health = retry(shared, "open the health bucket", move || async move {
            hj.get_key_value(subject::HEALTH_BUCKET)
                .await
                .with_context(|| format!("bucket {}", subject::HEALTH_BUCKET))
        })
        .await?;
        let js_ref = &js;
        let consumer = retry(shared, "create the task consumer", move || {
            task_consumer(js_ref, host)
        })
        .await?;
        Ok((
            SimAgent {
                id,
                health,
                js,
                _clients: clients,
            },
            consumer,
        ))
    }

    fn heartbeat(&self, started_at: u64, interval: Duration) -> Heartbeat {
        let (roles, quic_addr) = if self.id.storage {
            (vec![Role::Storage], Some(STORAGE_QUIC_ADDR))
        } else {
            (vec![Role::Source], None)
        };
        Heartbeat {
            v: HEARTBEAT_VERSION,
            host: self.id.host.clone(),
            fleet: self.id.fleet.clone(),
            state: AgentState::Online,
            version: VERSION.into(),
            started_at,
            time: now_ms(),
            interval_ms: interval.as_millis() as u64,
            load: [0.12, 0.2, 0.18],
            rss_bytes: 14u64 << 20,
            mem_total_bytes: 8u64 << 30,
            mem_available_bytes: 6u64 << 30,
            roles,
            quic_addr,
            roots: Vec::new(),
            running: Vec::new(),
            epoch: None,
        }
    }

    async fn put_heartbeat(&self, hb: &Heartbeat) -> Result<()> {
        let bytes = encode(hb).context("encode heartbeat")?;
        self.health
            .put(subject::health_key(&self.id.host), bytes.into())
            .await
            .context("put heartbeat")?;
        Ok(())
    }

    /// Publishes an event about this host through JetStream and waits for the
    /// stream to store it, as `Bus::event` does.
    async fn event(&self, shared: &Shared, severity: Severity, message: String, body: EventBody) {
        let event = Event {
            v: EVENT_VERSION,
            id: uuid::Uuid::new_v4().to_string(),
            time: now_ms(),
            host: self.id.host.clone(),
            severity,
            message,
            body,
        };
        let stored = async {
            let bytes = encode(&event).context("encode event")?;
            let ack = self
                .js
                .publish(event.subject(), bytes.into())
                .await
                .context("publish event")?;
            tokio::time::timeout(ACK_TIMEOUT, ack)
                .await
                .context("event stream did not acknowledge in time")?
                .context("event not stored")?;
            anyhow::Ok(())
        };
        match stored.await {
            Ok(()) => bump(&shared.counters.events),
            Err(e) => {
                bump(&shared.counters.event_errors);
                shared.note_error(event.body.kind(), e);
            }
        }
    }

    /// Verifies one task message and answers it as `Agent::handle` does.
    async fn handle(
        &self,
        shared: &Shared,
        msg: jetstream::Message,
        seen: &mut HashMap<TaskId, u64>,
    ) {
        let at = shared.start.elapsed();
        let subject = msg.subject.to_string();
        let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
        let id = &self.id;
        let body = match verify_task(&msg.payload, &id.key, &id.fleet, &id.host, now_ms()) {
            Ok(body) => body,
            Err(e) => {
                let task_id = e.task_id().cloned();
                self.reject(shared, task_id, e.reason(), e.to_string(), &subject)
                    .await;
                terminate(shared, &msg).await;
                return;
            }
        };
        shared.record(
            &id.host,
            Receipt {
                task_id: body.id.clone(),
                stream_seq: seq,
                unix_ms: now_ms(),
                at,
            },
        );
        match seen.get(&body.id).copied() {
            None => {
                seen.insert(body.id.clone(), seq);
                acknowledge(shared, &msg).await;
                self.run_task(shared, &body).await;
            }
            // A redelivery of a task already run (the ack was lost).
            Some(first) if first == seq => acknowledge(shared, &msg).await,
            Some(first) => {
                let detail = format!(
                    "task {} was already received in stream message {first} (now {seq})",
                    body.id
                );
                self.reject(
                    shared,
                    Some(body.id),
                    RejectReason::Replayed,
                    detail,
                    &subject,
                )
                .await;
                terminate(shared, &msg).await;
            }
        }
    }

    /// `task.started`, the simulated work, `task.finished`.
    async fn run_task(&self, shared: &Shared, body: &TaskBody) {
        let kind = body.kind.name();
        let started = Instant::now();
        self.event(
            shared,
            Severity::Info,
            format!("{kind} task {} started", body.id),
            EventBody::TaskStarted {
                task_id: body.id.clone(),
                task_kind: kind.into(),
            },
        )
        .await;
        let (outcome, result, error) = simulate(body);
        let (severity, message) = match &error {
            Some(e) => (
                Severity::Error,
                format!("{kind} task {} failed: {e}", body.id),
            ),
            None => (Severity::Info, format!("{kind} task {} succeeded", body.id)),
        };
        let finished = TaskFinished {
            task_id: body.id.clone(),
            task_kind: kind.into(),
            outcome,
            error,
            retryable: false,
            result,
            duration_ms: started.elapsed().as_millis() as u64,
        };
        self.event(shared, severity, message, EventBody::TaskFinished(finished))
            .await;
    }

    /// Publishes `security.task_rejected`, as `Agent::reject` does.
    async fn reject(
        &self,
        shared: &Shared,
        task_id: Option<TaskId>,
        reason: RejectReason,
        detail: String,
        subject: &str,
    ) {
        bump(&shared.counters.rejected);
        self.event(
            shared,
            Severity::Error,
            format!("rejected a task on {subject}: {detail}"),
            EventBody::TaskRejected {
                task_id,
                reason,
                detail,
                subject: subject.into(),
            },
        )
        .await;
    }
}

/// What the simulated work produces: a backup "succeeds" at once with an
/// empty snapshot of a fresh id; other kinds fail, saying they are not
/// simulated.
fn simulate(body: &TaskBody) -> (TaskOutcome, Option<TaskResult>, Option<String>) {
    match &body.kind {
        TaskKind::Backup { storage, .. } => (
            TaskOutcome::Succeeded,
            Some(TaskResult::Backup(BackupReport {
                snapshot: SnapshotId::random(),
                storage: storage.to_string(),
                summary: BackupSummary::default(),
                partial: false,
                unreadable: Vec::new(),
            })),
            None,
        ),
        other => (
            TaskOutcome::Failed,
            None,
            Some(format!(
                "the fleet simulator does not run {} tasks",
                other.name()
            )),
        ),
    }
}

/// Heartbeats every interval, the first at a random offset within it (as
/// hosts started at different times), until `cancel`.
pub async fn heartbeats(agent: Arc<SimAgent>, shared: Arc<Shared>, cancel: CancellationToken) {
    let interval = shared.heartbeat;
    let spread = interval.as_millis().max(1) as u64;
    let offset = Duration::from_millis(uuid::Uuid::new_v4().as_u128() as u64 % spread);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started_at = now_ms();
    let mut online = false;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let hb = agent.heartbeat(started_at, interval);
        match agent.put_heartbeat(&hb).await {
            Ok(()) => {
                bump(&shared.counters.heartbeats);
                if !online {
                    online = true;
                    bump(&shared.counters.online);
                }
            }
            Err(e) => {
                bump(&shared.counters.heartbeat_errors);
                shared.note_error("heartbeat", e);
            }
        }
    }
}

/// Announces the agent, then pulls and answers its tasks until `cancel`.
pub async fn tasks(
    agent: Arc<SimAgent>,
    consumer: consumer::PullConsumer,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) {
    let roles = if agent.id.storage {
        vec![Role::Storage]
    } else {
        vec![Role::Source]
    };
    let quic_addr = agent.id.storage.then_some(STORAGE_QUIC_ADDR);
    agent
        .event(
            &shared,
            Severity::Info,
            format!("agent {} online (version {VERSION})", agent.id.host),
            EventBody::AgentOnline {
                version: VERSION.into(),
                roles,
                quic_addr,
            },
        )
        .await;
    // Task ids already run, with the stream message they came in.
    let mut seen: HashMap<TaskId, u64> = HashMap::new();
    'consume: loop {
        let mut messages = match consumer.messages().await {
            Ok(m) => m,
            Err(e) => {
                bump(&shared.counters.stream_errors);
                shared.note_error("pull tasks", e);
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(CONSUMER_RETRY) => continue 'consume,
                }
            }
        };
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                next = messages.next() => match next {
                    Some(Ok(msg)) => agent.handle(&shared, msg, &mut seen).await,
                    Some(Err(e)) => {
                        bump(&shared.counters.stream_errors);
                        shared.note_error("task stream", e);
                    }
                    None => continue 'consume,
                },
            }
        }
    }
}

/// One NATS connection named after the simulated host.
/// Connects as the agent does: its own NATS user, TLS checked against the
/// fleet CA, replies on its own inbox prefix.
async fn connect_nats(url: &str, id: &SimIdentity, n: usize) -> Result<async_nats::Client> {
    let host = &id.host;
    let name = match n {
        0 => format!("flotilla-agent-sim/{host}"),
        n => format!("flotilla-agent-sim/{host}/{n}"),
    };
    async_nats::ConnectOptions::new()
        .credentials(&id.creds)
        .context("the bundle's NATS credentials")?
        .add_root_certificates(id.ca.clone())
        .require_tls(true)
        .custom_inbox_prefix(flotilla_protocol::permissions::inbox_prefix(
            &flotilla_protocol::permissions::Role::Host(host.clone()),
        ))
        .name(name)
        .connection_timeout(Duration::from_secs(5))
        .connect(url)
        .await
        .with_context(|| format!("cannot connect to NATS at {url}"))
}

/// The agent's durable pull consumer, with exactly `Bus::task_consumer`'s settings.
async fn task_consumer(js: &jetstream::Context, host: &HostName) -> Result<consumer::PullConsumer> {
    let name = subject::task_consumer(host);
    let stream = js
        .get_stream(subject::TASK_STREAM)
        .await
        .context("get task stream")?;
    stream
        .get_or_create_consumer(
            &name,
            consumer::pull::Config {
                durable_name: Some(name.clone()),
                description: Some(format!("tasks for host {host}")),
                filter_subject: subject::task(host),
                ack_policy: consumer::AckPolicy::Explicit,
                ack_wait: Duration::from_secs(60),
                max_ack_pending: 64,
                ..Default::default()
            },
        )
        .await
        .with_context(|| format!("create task consumer {name}"))
}

/// Runs `attempt` until it succeeds, at most [`SETUP_ATTEMPTS`] times with
/// doubling pauses, counting the retries.
async fn retry<T, F, Fut>(shared: &Shared, what: &str, mut attempt: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let mut pause = SETUP_BACKOFF;
    let mut tries = 1;
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(e) if tries >= SETUP_ATTEMPTS => {
                return Err(e.context(format!("{what}: failed {SETUP_ATTEMPTS} times")))
            }
            Err(_) => {
                bump(&shared.counters.setup_retries);
                tokio::time::sleep(pause).await;
                pause *= 2;
                tries += 1;
            }
        }
    }
}

async fn acknowledge(shared: &Shared, msg: &jetstream::Message) {
    // Double ack waits for the server to confirm, as the agent does.
    if let Err(e) = msg.double_ack().await {
        bump(&shared.counters.ack_errors);
        shared.note_error("acknowledge task", e);
    }
}

async fn terminate(shared: &Shared, msg: &jetstream::Message) {
    // Term: a refused message is never redelivered.
    if let Err(e) = msg.ack_with(AckKind::Term).await {
        bump(&shared.counters.ack_errors);
        shared.note_error("terminate refused task", e);
    }
}
