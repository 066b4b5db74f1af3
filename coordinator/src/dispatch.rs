//! Dispatching signed tasks and following them to their end.
//!
//! The task is published to the host's subject on the JetStream task stream,
//! where it waits until the agent has journalled it, however long the host is
//! away (up to the task's expiry). Its lifecycle comes back as events; the
//! dispatcher subscribes to them *before* publishing so none is missed while
//! the connection holds.
//!
//! A core subscription hears nothing while the client is disconnected: an
//! outcome published then (a nats-server restart just as a backup ends) is
//! lost to it. The [`Follower`] therefore also reads the outcomes back from
//! the event stream, which keeps them, at once after every reconnect and
//! every few seconds besides; and it says what it waits for (an offline
//! host, a silent task, a lost connection) instead of waiting in silence.
//! Its decisions are pure, in `waiting.rs`.

mod waiting;

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use async_nats::jetstream::kv;
use flotilla_protocol::{
    encode, sign_task, subject, Event, Heartbeat, HostName, RejectReason, SigningSeed, TaskBody,
    TaskFinished, TaskId, TaskKind, UnixMillis, TASK_VERSION,
};
use futures::stream::SelectAll;
use futures::StreamExt;
use tracing::debug;

use crate::error::{request_err, CliError};
use crate::fleet::Fleet;
use crate::nats::{stored_at, HostRecord, Nats};
use waiting::{Conn, Step, Target, Waiting};
pub use waiting::{Notice, NoticeKind, Since, CLOCK_MARGIN_MS};

/// How long a task stays valid after it is issued.
pub const TASK_TTL: Duration = Duration::from_secs(24 * 3600);

/// How often the follower looks at the connection, the registry and the
/// clock.
const TICK: Duration = Duration::from_secs(1);
/// Longest a read-back of the event stream may take before it is left to
/// the next one.
const READ_BACK_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a read of one host's health may take.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the open tasks' hosts are read from the health bucket (and at
/// once at the start)...
const HEALTH_EVERY: Duration = Duration::from_secs(2);
/// ...reading at most about this many hosts a second, so that a wait for
/// a whole fleet does not flood the server.
const HEALTH_READS_PER_SEC: usize = 16;
/// Above this many hosts the read-back filters by kind alone (two
/// subjects) instead of two subjects per host.
const MAX_HOST_FILTERS: usize = 64;

/// Signs and sends tasks for one fleet.
#[derive(Debug)]
pub struct Dispatch<'a> {
    nats: &'a Nats,
    fleet_id: String,
    seed: SigningSeed,
}

/// A task that was sent, with the subscriptions that follow it.
#[derive(Debug)]
pub struct SentTask {
    /// Its id.
    pub id: TaskId,
    /// Where it runs.
    pub host: HostName,
    /// When it was sent (our clock).
    pub sent_at: UnixMillis,
    nats: Nats,
    events: async_nats::Subscriber,
    security: async_nats::Subscriber,
}

/// How following a task ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// It finished (well or badly); boxed, as it carries the task's result.
    Finished(Box<TaskFinished>),
    /// The agent refused it.
    Rejected {
        /// Why.
        reason: RejectReason,
        /// Detail.
        detail: String,
    },
    /// The wait ran out; the task was left queued or running.
    TimedOut,
    /// Its `--timeout` ran out: the task was sent a `cancel` and did not
    /// finish otherwise (it stopped, or did not say so in time).
    GaveUp {
        /// The timeout.
        after: Duration,
        /// Its host was offline then: the cancel waits in its queue.
        host_offline: bool,
    },
    /// The subscriptions ended (connection closed).
    Lost(String),
    /// A second Ctrl-C stopped the wait: the task was sent a `cancel`, and
    /// its end was not waited for.
    Abandoned,
}

/// How long a waiting command waits, and what it does when that runs out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wait {
    /// How long.
    pub limit: Duration,
    /// Send each unfinished task a `cancel` then (`--timeout`); otherwise
    /// the tasks are left queued or running.
    pub cancel: bool,
}

impl Wait {
    /// Waits up to `limit`, then leaves the tasks be.
    pub const fn up_to(limit: Duration) -> Wait {
        Wait {
            limit,
            cancel: false,
        }
    }

    /// Waits up to `limit`, then cancels the tasks (`--timeout`).
    pub const fn timeout(limit: Duration) -> Wait {
        Wait {
            limit,
            cancel: true,
        }
    }

    /// `--timeout` when given, else up to `default`.
    pub fn with_timeout(default: Duration, timeout: Option<Duration>) -> Wait {
        timeout.map_or(Wait::up_to(default), Wait::timeout)
    }
}

impl From<Duration> for Wait {
    fn from(limit: Duration) -> Wait {
        Wait::up_to(limit)
    }
}

impl<'a> Dispatch<'a> {
    /// A dispatcher that signs with `fleet`'s coordinator key.
    pub fn new(fleet: &Fleet, nats: &'a Nats) -> Result<Self, CliError> {
        Ok(Self {
            nats,
            fleet_id: fleet.file.id.clone(),
            seed: fleet.signing_seed()?,
        })
    }

    /// Signs `kind` for `host`, stores it on the task stream, and follows it.
    pub async fn send(&self, host: &HostName, kind: TaskKind) -> Result<SentTask, CliError> {
        let client = &self.nats.client;
        // Subscribed before publishing, so no event about the task is missed.
        let events = client
            .subscribe(subject::task_events(host))
            .await
            .map_err(request_err("subscribe to task events"))?;
        let security = client
            .subscribe(subject::security_events(host))
            .await
            .map_err(request_err("subscribe to security events"))?;
        let sent_at = crate::now_ms();
        let id = self.publish(host, kind).await?;
        Ok(SentTask {
            id,
            host: host.clone(),
            sent_at,
            nats: self.nats.clone(),
            events,
            security,
        })
    }

    /// Signs `kind` for `host` and stores it on the task stream; returns its id.
    pub async fn publish(&self, host: &HostName, kind: TaskKind) -> Result<TaskId, CliError> {
        // The host's state epoch, from its latest heartbeat: the agent
        // refuses the task if its state is another by then (wiped since, so
        // this task could be replayed to it unrecognised).
        let epoch = self.nats.host(host).await?.and_then(|r| r.heartbeat.epoch);
        let now = crate::now_ms();
        let body = TaskBody {
            v: TASK_VERSION,
            id: TaskId::random(),
            fleet: self.fleet_id.clone(),
            host: host.clone(),
            issued_at: now,
            expires_at: now + TASK_TTL.as_millis() as u64,
            kind,
            epoch,
        };
        let envelope = sign_task(&self.seed, &body).map_err(request_err("sign task"))?;
        let bytes = encode(&envelope).map_err(request_err("encode task"))?;
        self.nats
            .js
            .publish(subject::task(host), bytes.into())
            .await
            .map_err(request_err("publish task"))?
            .await
            .map_err(request_err(
                "store task on the task stream (has any agent set up this NATS server?)",
            ))?;
        Ok(body.id)
    }
}

impl SentTask {
    /// The connection it was sent on.
    pub fn nats(&self) -> &Nats {
        &self.nats
    }

    /// Follows the task until it finishes or is refused, or `wait` passes;
    /// `on_update` sees every event about it (progress included) and every
    /// notice for the person waiting (and, with [`Wait::timeout`], the
    /// cancel to send).
    pub async fn wait(self, wait: impl Into<Wait>, mut on_update: impl FnMut(&Update)) -> Outcome {
        let nats = self.nats.clone();
        let mut follower = Follower::new(&nats, vec![self], wait);
        let mut outcome = Outcome::Lost("no outcome".into());
        while let Some(update) = follower.next().await {
            on_update(&update);
            if let Update::Ended { outcome: o, .. } = update {
                outcome = o;
            }
        }
        outcome
    }
}

/// What following tasks brings, in order.
#[derive(Debug, Clone)]
pub enum Update {
    /// An event about a task still waited for (progress included); boxed,
    /// as it is the largest.
    Event(Box<Event>),
    /// A line for the person waiting.
    Notice(Notice),
    /// `--timeout` ran out: send this task a signed `cancel`.
    Cancel {
        /// Where it runs.
        host: HostName,
        /// The task.
        task_id: TaskId,
    },
    /// The wait for this task is over.
    Ended {
        /// Where it ran.
        host: HostName,
        /// The task.
        task_id: TaskId,
        /// How.
        outcome: Outcome,
    },
}

/// Follows sent tasks to their ends: their events as they come, their
/// outcomes read back from the event stream after a reconnect (and every
/// few seconds), the registry's word on their hosts, and the wait's limit.
pub struct Follower {
    nats: Nats,
    waiting: Waiting,
    subscriptions: SelectAll<async_nats::Subscriber>,
    subscribed: bool,
    /// The health bucket, opened at the first read (again after a failure).
    health: Option<kv::Store>,
    /// When the hosts were last read.
    health_at: Option<Instant>,
    tick: tokio::time::Interval,
    ready: VecDeque<Update>,
}

impl std::fmt::Debug for Follower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Follower")
            .field("waiting", &self.waiting)
            .field("ready", &self.ready)
            .finish_non_exhaustive()
    }
}

impl Follower {
    /// Starts following `tasks` (sent through `nats`) for as long as `wait`
    /// says.
    pub fn new(nats: &Nats, tasks: Vec<SentTask>, wait: impl Into<Wait>) -> Follower {
        let mut targets = Vec::new();
        let mut subscriptions = SelectAll::new();
        for t in tasks {
            targets.push(Target {
                host: t.host,
                id: t.id,
                sent_at: t.sent_at,
            });
            subscriptions.push(t.events);
            subscriptions.push(t.security);
        }
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Follower {
            nats: nats.clone(),
            waiting: Waiting::new(targets, wait.into(), crate::now_ms()),
            subscriptions,
            subscribed: true,
            health: None,
            health_at: None,
            tick,
            ready: VecDeque::new(),
        }
    }

    /// The next update; `None` once every task's wait is over.
    ///
    /// Cancel-safe: dropped while it waits, nothing decided is lost (a
    /// read-back cut short is simply made again later).
    pub async fn next(&mut self) -> Option<Update> {
        loop {
            if let Some(update) = self.ready.pop_front() {
                return Some(update);
            }
            if self.waiting.is_done() {
                return None;
            }
            tokio::select! {
                msg = self.subscriptions.next(), if self.subscribed => match msg {
                    Some(msg) => self.take(&msg.subject, &msg.payload),
                    None => {
                        self.subscribed = false;
                        let ended = self.waiting.lost("event subscription closed");
                        self.queue(ended);
                    }
                },
                _ = self.tick.tick() => self.turn().await,
            }
        }
    }

    /// Ctrl-C: the open tasks not yet sent a `cancel`, for the caller to
    /// send one; they are waited for until they say they stopped.
    pub fn interrupt(&mut self) -> Vec<(HostName, TaskId)> {
        self.waiting.interrupt(crate::now_ms())
    }

    /// An event from a subscription.
    fn take(&mut self, subject: &str, payload: &[u8]) {
        let Ok(ev) = Event::decode_on(subject, payload) else {
            return;
        };
        if !self.waiting.concerns(&ev) {
            return;
        }
        let ended = self.waiting.on_event(crate::now_ms(), &ev);
        self.ready.push_back(Update::Event(Box::new(ev)));
        self.queue(ended);
    }

    /// One tick: the connection, the hosts' health, then what the waiting
    /// decides; the read-back it asks for comes last, so that a drop while
    /// it runs loses no other decision.
    async fn turn(&mut self) {
        let client = &self.nats.client;
        let conn = Conn {
            connected: client.connection_state() == async_nats::connection::State::Connected,
            connects: client.statistics().connects.load(Ordering::Relaxed),
        };
        if conn.connected {
            self.health().await;
        }
        let mut recheck = None;
        for step in self.waiting.on_tick(crate::now_ms(), conn) {
            match step {
                Step::Recheck(since) => recheck = Some(since),
                other => self.queue([other]),
            }
        }
        let Some(since) = recheck else { return };
        let hosts = self.waiting.open_hosts();
        match tokio::time::timeout(READ_BACK_TIMEOUT, read_back(&self.nats, &hosts, since)).await {
            Ok(Ok(read)) => {
                let ended = self.waiting.on_recheck(crate::now_ms(), read);
                self.queue(ended);
            }
            // The next read-back, a few seconds on, tries again.
            Ok(Err(e)) => debug!(error = %e, "cannot read task outcomes back"),
            Err(_) => debug!("reading task outcomes back timed out"),
        }
    }

    /// What the health bucket says about the open tasks' hosts: at once,
    /// then every [`HEALTH_EVERY`] (longer for many hosts). A host that
    /// cannot be read keeps what was last known of it.
    async fn health(&mut self) {
        let hosts = self.waiting.open_hosts();
        let every = HEALTH_EVERY.max(Duration::from_secs(
            (hosts.len() / HEALTH_READS_PER_SEC) as u64,
        ));
        if self.health_at.is_some_and(|at| at.elapsed() < every) {
            return;
        }
        self.health_at = Some(Instant::now());
        let store = match self.health.clone() {
            Some(store) => store,
            None => {
                let opened = tokio::time::timeout(
                    HEALTH_TIMEOUT,
                    self.nats.js.get_key_value(subject::HEALTH_BUCKET),
                )
                .await;
                let Ok(Ok(store)) = opened else {
                    return debug!("cannot open the health bucket; trying again later");
                };
                self.health = Some(store.clone());
                store
            }
        };
        for host in &hosts {
            let key = subject::health_key(host);
            match tokio::time::timeout(HEALTH_TIMEOUT, store.entry(key)).await {
                Ok(Ok(Some(entry))) if entry.operation == kv::Operation::Put => {
                    if let Ok(heartbeat) = Heartbeat::decode(&entry.value) {
                        let record = HostRecord {
                            heartbeat,
                            stored_at: stored_at(&entry),
                        };
                        self.waiting.on_health(host, Some(&record));
                    }
                }
                Ok(Ok(_)) => self.waiting.on_health(host, None),
                Ok(Err(e)) => {
                    debug!(error = %e, %host, "cannot read host health");
                    // Opened again next time: the server may have restarted.
                    self.health = None;
                    return;
                }
                Err(_) => return debug!(%host, "reading host health timed out"),
            }
        }
    }

    fn queue(&mut self, steps: impl IntoIterator<Item = Step>) {
        for step in steps {
            self.ready.push_back(match step {
                Step::Say(notice) => Update::Notice(notice),
                Step::Cancel { host, task_id } => Update::Cancel { host, task_id },
                Step::Ended {
                    host,
                    task_id,
                    outcome,
                } => Update::Ended {
                    host,
                    task_id,
                    outcome,
                },
                // Performed by `turn`, never queued.
                Step::Recheck(_) => continue,
            });
        }
    }
}

/// The events that end a task (`task.finished`, `security.task_rejected`)
/// about `hosts`, stored since `since`, in stream order with their
/// sequence numbers.
pub(crate) async fn read_back(
    nats: &Nats,
    hosts: &[HostName],
    since: Since,
) -> Result<Vec<(u64, Event)>, CliError> {
    const ENDS: [&str; 2] = ["task.finished", "security.task_rejected"];
    if hosts.is_empty() {
        return Ok(Vec::new());
    }
    let stream = nats
        .js
        .get_stream(subject::EVENT_STREAM)
        .await
        .map_err(request_err("open event stream"))?;
    let filter_subjects = if hosts.len() > MAX_HOST_FILTERS {
        ENDS.iter().map(|k| subject::events_of_kind(k)).collect()
    } else {
        hosts
            .iter()
            .flat_map(|h| ENDS.iter().map(move |k| subject::event(k, h)))
            .collect()
    };
    let deliver_policy = match since {
        Since::Time(ms) => DeliverPolicy::ByStartTime {
            start_time: async_nats::datetime::from_nanos(i128::from(ms) * 1_000_000)
                .map_err(request_err("read event stream"))?,
        },
        Since::After(seq) => DeliverPolicy::ByStartSequence {
            start_sequence: seq.saturating_add(1),
        },
    };
    let mut consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subjects,
            deliver_policy,
            ..Default::default()
        })
        .await
        .map_err(request_err("read event stream"))?;
    let pending = consumer
        .info()
        .await
        .map_err(request_err("read event stream"))?
        .num_pending;
    let mut out = Vec::new();
    if pending == 0 {
        return Ok(out);
    }
    let mut messages = consumer
        .messages()
        .await
        .map_err(request_err("read event stream"))?;
    while let Some(msg) = messages.next().await {
        let msg = msg.map_err(request_err("read event stream"))?;
        let Ok(info) = msg.info() else { continue };
        let (seq, caught_up) = (info.stream_sequence, info.pending == 0);
        if let Ok(ev) = Event::decode_on(&msg.subject, &msg.payload) {
            out.push((seq, ev));
        }
        if caught_up {
            break;
        }
    }
    Ok(out)
}
