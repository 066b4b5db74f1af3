//! Waiting for tasks, as pure decisions: which tasks are still open, when to
//! read their outcomes back from the event stream, what to tell the person
//! waiting, and when to give up. No I/O: [`super::Follower`] feeds it what it
//! sees with the time (`now`, unix ms) and does what it decides; the tests
//! drive it with a virtual clock.
//!
//! An outcome reaches the coordinator by two roads: the core NATS
//! subscription, live but deaf while the client is disconnected (a message
//! published then is lost to it), and the event stream, which keeps every
//! event and is read back at once after a reconnect and every
//! [`RECHECK_EVERY_MS`] besides (a safety net for anything else a core
//! subscription can drop). The first outcome seen for a task ends it; later
//! copies, from either road, are ignored.
//!
//! No silent waits: a host that is offline is said to be at the first look
//! at the registry, and a task nothing was heard about for
//! [`NOTICE_EVERY_MS`] gets a line saying what it waits for, at that pace.

use std::collections::HashMap;
use std::time::Duration;

use flotilla_protocol::{
    Event, EventBody, HostName, OfflineReason, TaskId, TaskOutcome, UnixMillis,
};

use super::{Outcome, Wait};
use crate::nats::HostRecord;

/// How often the event stream is read back while connected (and at once
/// after every reconnect).
pub const RECHECK_EVERY_MS: u64 = 10_000;
/// A task silent this long gets a line saying what it waits for, and again
/// at this pace.
pub const NOTICE_EVERY_MS: u64 = 30_000;
/// More "still waiting" lines than this at once are summed up in one.
pub const MAX_ITEMISED: usize = 5;
/// How long a task sent a `cancel` by `--timeout` has to say it stopped.
pub const CANCEL_GRACE_MS: u64 = 10_000;
/// Events are stamped with the server's clock, tasks with ours: the stream
/// is read back from this long before the first task was sent (the same
/// skew agents allow a task's validity window).
pub const CLOCK_MARGIN_MS: u64 = 5 * 60 * 1000;

/// A task to wait for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Where it runs.
    pub host: HostName,
    /// Its id.
    pub id: TaskId,
    /// When it was sent (our clock).
    pub sent_at: UnixMillis,
}

/// Where reading the event stream back starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Since {
    /// Events stored at or after this time (unix ms, the server's clock).
    Time(UnixMillis),
    /// Events stored after this stream sequence: everything up to it was read.
    After(u64),
}

/// What the connection to NATS looks like at a tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conn {
    /// Connected now.
    pub connected: bool,
    /// Connections made so far (the first included): a change is a reconnect.
    pub connects: u64,
}

/// What a [`Notice`] is about, for scripts (`--json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoticeKind {
    /// The host is offline: the task stays queued until it returns.
    Offline,
    /// The host came back.
    Online,
    /// Still waiting, and for what.
    Waiting,
    /// The connection to NATS was lost.
    Disconnected,
    /// The connection is back; outcomes are read back from the stream.
    Reconnected,
    /// `--timeout` ran out; the task is sent a `cancel`.
    Timeout,
}

impl NoticeKind {
    /// The word in `--json` lines.
    pub fn as_str(&self) -> &'static str {
        match self {
            NoticeKind::Offline => "offline",
            NoticeKind::Online => "online",
            NoticeKind::Waiting => "waiting",
            NoticeKind::Disconnected => "disconnected",
            NoticeKind::Reconnected => "reconnected",
            NoticeKind::Timeout => "timeout",
        }
    }
}

/// A line for the person waiting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// What it is about.
    pub kind: NoticeKind,
    /// The host, if it is about one.
    pub host: Option<HostName>,
    /// The task, if it is about one.
    pub task_id: Option<TaskId>,
    /// One line for people.
    pub message: String,
}

/// What the follower is to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Read the open tasks' outcomes back from the event stream, from
    /// `since`, and hand them to [`Waiting::on_recheck`].
    Recheck(Since),
    /// Tell the person waiting.
    Say(Notice),
    /// Send the task a signed `cancel` (its `--timeout` ran out).
    Cancel {
        /// Where it runs.
        host: HostName,
        /// The task.
        task_id: TaskId,
    },
    /// The task's wait is over.
    Ended {
        /// Where it ran.
        host: HostName,
        /// The task.
        task_id: TaskId,
        /// How.
        outcome: Outcome,
    },
}

#[derive(Debug)]
struct Task {
    host: HostName,
    id: TaskId,
    ended: bool,
    /// `task.started` seen, or the agent's heartbeat lists it.
    started: bool,
    /// When anything about it was last heard (or the wait began).
    heard_at: UnixMillis,
    /// When the person was last told about it (or the wait began).
    told_at: UnixMillis,
    /// Its host's outage has been said (and its return not yet).
    said_offline: bool,
    /// When it was sent a `cancel` (by `--timeout` or Ctrl-C).
    cancel_at: Option<UnixMillis>,
    /// That cancel, or the deadline that passed after it, was the timeout's.
    timed_out: bool,
}

/// What the registry last said about a host: judged when it is used, as
/// a reconnect since changes how its silence counts.
#[derive(Debug)]
struct Health {
    /// Its latest record.
    record: HostRecord,
    /// Tasks its heartbeat says are running.
    running: Vec<TaskId>,
}

/// The open tasks of one waiting command and what it knows about them.
#[derive(Debug)]
pub struct Waiting {
    tasks: Vec<Task>,
    hosts: HashMap<HostName, Health>,
    wait: Wait,
    deadline: UnixMillis,
    since: Since,
    recheck_at: UnixMillis,
    connects: Option<u64>,
    disconnected_at: Option<UnixMillis>,
    /// When the connection last came back; heartbeats could not be stored
    /// before it, so silence is counted from it.
    reconnected_at: Option<UnixMillis>,
    conn_told_at: UnixMillis,
}

impl Waiting {
    /// Starts waiting at `now` for `targets`, as long as `wait` says.
    pub fn new(targets: Vec<Target>, wait: Wait, now: UnixMillis) -> Self {
        let first = targets.iter().map(|t| t.sent_at).min().unwrap_or(now);
        let limit = u64::try_from(wait.limit.as_millis()).unwrap_or(u64::MAX);
        Self {
            tasks: targets
                .into_iter()
                .map(|t| Task {
                    host: t.host,
                    id: t.id,
                    ended: false,
                    started: false,
                    heard_at: now,
                    told_at: now,
                    said_offline: false,
                    cancel_at: None,
                    timed_out: false,
                })
                .collect(),
            hosts: HashMap::new(),
            wait,
            deadline: now.saturating_add(limit),
            since: Since::Time(first.saturating_sub(CLOCK_MARGIN_MS)),
            recheck_at: now.saturating_add(RECHECK_EVERY_MS),
            connects: None,
            disconnected_at: None,
            reconnected_at: None,
            conn_told_at: now,
        }
    }

    /// Whether every task's wait is over.
    pub fn is_done(&self) -> bool {
        self.tasks.iter().all(|t| t.ended)
    }

    /// The tasks still waited for.
    #[cfg(test)]
    pub fn open(&self) -> Vec<(HostName, TaskId)> {
        self.tasks
            .iter()
            .filter(|t| !t.ended)
            .map(|t| (t.host.clone(), t.id.clone()))
            .collect()
    }

    /// The hosts of the tasks still waited for, each once.
    pub fn open_hosts(&self) -> Vec<HostName> {
        let mut hosts: Vec<HostName> = self
            .tasks
            .iter()
            .filter(|t| !t.ended)
            .map(|t| t.host.clone())
            .collect();
        hosts.sort();
        hosts.dedup();
        hosts
    }

    /// Whether `ev` is about a task still waited for, from its host.
    pub fn concerns(&self, ev: &Event) -> bool {
        let Some(id) = ev.body.task_id() else {
            return false;
        };
        self.tasks
            .iter()
            .any(|t| &t.id == id && t.host == ev.host && !t.ended)
    }

    /// An event seen at `now`, live or read back: the end of its task if it
    /// ends one that is still open.
    pub fn on_event(&mut self, now: UnixMillis, ev: &Event) -> Option<Step> {
        let id = ev.body.task_id()?;
        let limit = self.wait.limit;
        let t = self
            .tasks
            .iter_mut()
            .find(|t| &t.id == id && t.host == ev.host && !t.ended)?;
        t.heard_at = now;
        let outcome = match &ev.body {
            EventBody::TaskStarted { .. } | EventBody::TaskProgress(_) => {
                t.started = true;
                return None;
            }
            // Stopped by the cancel the timeout sent: the timeout is why.
            EventBody::TaskFinished(f) if t.timed_out && f.outcome == TaskOutcome::Cancelled => {
                Outcome::GaveUp {
                    after: limit,
                    host_offline: false,
                }
            }
            EventBody::TaskFinished(f) => Outcome::Finished(Box::new(f.clone())),
            EventBody::TaskRejected { reason, detail, .. } => Outcome::Rejected {
                reason: *reason,
                detail: detail.clone(),
            },
            _ => return None,
        };
        t.ended = true;
        Some(Step::Ended {
            host: t.host.clone(),
            task_id: t.id.clone(),
            outcome,
        })
    }

    /// What the event stream held, read back at `now` in stream order with
    /// each event's sequence: the ends it brings (outcomes already seen are
    /// not repeated).
    pub fn on_recheck(&mut self, now: UnixMillis, read: Vec<(u64, Event)>) -> Vec<Step> {
        let mut out = Vec::new();
        for (seq, ev) in read {
            // Everything up to here was read: the next read starts after it.
            self.since = Since::After(seq);
            out.extend(self.on_event(now, &ev));
        }
        out
    }

    /// What the registry says about `host` (`None`: no record).
    pub fn on_health(&mut self, host: &HostName, record: Option<&HostRecord>) {
        let Some(record) = record else {
            self.hosts.remove(host);
            return;
        };
        let running: Vec<TaskId> = record
            .heartbeat
            .running
            .iter()
            .map(|j| j.task_id.clone())
            .collect();
        for t in self.tasks.iter_mut().filter(|t| &t.host == host) {
            t.started |= running.contains(&t.id);
        }
        self.hosts.insert(
            host.clone(),
            Health {
                record: record.clone(),
                running,
            },
        );
    }

    /// Ctrl-C at `now`: the open tasks that have not been sent a `cancel`
    /// yet, now counted as sent one.
    pub fn interrupt(&mut self, now: UnixMillis) -> Vec<(HostName, TaskId)> {
        self.tasks
            .iter_mut()
            .filter(|t| !t.ended && t.cancel_at.is_none())
            .map(|t| {
                t.cancel_at = Some(now);
                (t.host.clone(), t.id.clone())
            })
            .collect()
    }

    /// The subscriptions ended (the client closed): every open task's wait
    /// is over.
    pub fn lost(&mut self, why: &str) -> Vec<Step> {
        self.tasks
            .iter_mut()
            .filter(|t| !t.ended)
            .map(|t| {
                t.ended = true;
                Step::Ended {
                    host: t.host.clone(),
                    task_id: t.id.clone(),
                    outcome: Outcome::Lost(why.to_owned()),
                }
            })
            .collect()
    }

    /// A tick at `now` with the connection as `conn`: reading back, what to
    /// say, what to cancel, which waits are over.
    pub fn on_tick(&mut self, now: UnixMillis, conn: Conn) -> Vec<Step> {
        let mut out = Vec::new();
        let reconnected = self.on_connection(now, conn, &mut out);
        if conn.connected && (reconnected || now >= self.recheck_at) {
            self.recheck_at = now.saturating_add(RECHECK_EVERY_MS);
            out.push(Step::Recheck(self.since));
        }
        if now >= self.deadline {
            self.past_deadline(now, &mut out);
        }
        // The registry is not current while disconnected: nothing is said
        // about hosts then.
        if conn.connected {
            self.tell(now, &mut out);
        }
        out
    }

    /// Follows the connection; says when it goes and comes back. Returns
    /// whether it came back at this tick.
    fn on_connection(&mut self, now: UnixMillis, conn: Conn, out: &mut Vec<Step>) -> bool {
        let counted = self.connects.is_some_and(|c| c != conn.connects);
        self.connects = Some(conn.connects);
        if !conn.connected {
            if self.disconnected_at.is_none() {
                self.disconnected_at = Some(now);
                self.conn_told_at = now;
                out.push(say(
                    NoticeKind::Disconnected,
                    None,
                    None,
                    "lost the connection to NATS; reconnecting (outcomes published meanwhile \
                     are read back from the event stream)"
                        .into(),
                ));
            } else if now.saturating_sub(self.conn_told_at) >= NOTICE_EVERY_MS {
                self.conn_told_at = now;
                let down = now.saturating_sub(self.disconnected_at.unwrap_or(now));
                out.push(say(
                    NoticeKind::Waiting,
                    None,
                    None,
                    format!(
                        "still waiting: no connection to NATS for {}; reconnecting",
                        span(down)
                    ),
                ));
            }
            return false;
        }
        let was_down = self.disconnected_at.take().is_some();
        if !(counted || was_down) {
            return false;
        }
        self.reconnected_at = Some(now);
        // What the tasks did meanwhile is being read back: no word on them
        // before that had its chance.
        for t in &mut self.tasks {
            t.told_at = now;
        }
        out.push(say(
            NoticeKind::Reconnected,
            None,
            None,
            "reconnected to NATS; reading what the tasks did meanwhile from the event stream"
                .into(),
        ));
        true
    }

    fn past_deadline(&mut self, now: UnixMillis, out: &mut Vec<Step>) {
        let limit = self.wait.limit;
        for t in self.tasks.iter_mut().filter(|t| !t.ended) {
            let host_offline = offline(self.hosts.get(&t.host), now, self.reconnected_at).is_some();
            if !self.wait.cancel {
                t.ended = true;
                out.push(ended(t, Outcome::TimedOut));
                continue;
            }
            if !t.timed_out {
                t.timed_out = true;
                // A task Ctrl-C already cancelled is not sent a second one.
                if t.cancel_at.is_none() {
                    out.push(Step::Cancel {
                        host: t.host.clone(),
                        task_id: t.id.clone(),
                    });
                }
                t.cancel_at = Some(now);
                out.push(say(
                    NoticeKind::Timeout,
                    Some(&t.host),
                    Some(&t.id),
                    format!(
                        "{}: task {} did not finish within {} (--timeout); sending it a cancel",
                        t.host,
                        t.id,
                        humantime::format_duration(whole_seconds(limit))
                    ),
                ));
                // An offline host cannot say it stopped: the cancel waits
                // in its queue behind the task.
                if host_offline {
                    t.ended = true;
                    out.push(ended(
                        t,
                        Outcome::GaveUp {
                            after: limit,
                            host_offline: true,
                        },
                    ));
                }
                continue;
            }
            if now >= t.cancel_at.unwrap_or(now).saturating_add(CANCEL_GRACE_MS) {
                t.ended = true;
                out.push(ended(
                    t,
                    Outcome::GaveUp {
                        after: limit,
                        host_offline,
                    },
                ));
            }
        }
    }

    /// Says what each open task waits for: an outage when it is first
    /// seen, a return, and after [`NOTICE_EVERY_MS`] of silence again and
    /// again.
    fn tell(&mut self, now: UnixMillis, out: &mut Vec<Step>) {
        // The repeated lines of this tick, with what each task waits on: a
        // large fleet's are summed up in one line.
        let mut still: Vec<(Silence, Step)> = Vec::new();
        for t in self.tasks.iter_mut().filter(|t| !t.ended) {
            let health = self.hosts.get(&t.host);
            let offline = offline(health, now, self.reconnected_at);
            match offline {
                Some((reason, seen)) if !t.said_offline => {
                    t.said_offline = true;
                    t.told_at = now;
                    out.push(say(
                        NoticeKind::Offline,
                        Some(&t.host),
                        Some(&t.id),
                        format!(
                            "{} is offline ({}, last seen {} ago): task {} stays queued and runs \
                             when it returns",
                            t.host,
                            why(&reason),
                            span(now.saturating_sub(seen)),
                            t.id
                        ),
                    ));
                }
                None if t.said_offline && health.is_some() => {
                    t.said_offline = false;
                    t.told_at = now;
                    out.push(say(
                        NoticeKind::Online,
                        Some(&t.host),
                        Some(&t.id),
                        format!("{} is back online; task {} can run now", t.host, t.id),
                    ));
                }
                _ if now.saturating_sub(t.told_at) >= NOTICE_EVERY_MS
                    && now.saturating_sub(t.heard_at) >= NOTICE_EVERY_MS =>
                {
                    t.told_at = now;
                    let running = health.is_some_and(|h| h.running.contains(&t.id));
                    let (silence, state) = match offline {
                        Some((reason, seen)) => (
                            Silence::Offline,
                            format!(
                                "offline ({}, last seen {} ago); the task stays queued until it \
                                 returns",
                                why(&reason),
                                span(now.saturating_sub(seen))
                            ),
                        ),
                        None if t.started || running => (
                            Silence::Running,
                            format!(
                                "task {} is running; nothing heard from it for {}",
                                t.id,
                                span(now.saturating_sub(t.heard_at))
                            ),
                        ),
                        None if health.is_some() => (
                            Silence::NotStarted,
                            format!("online, but task {} has not started yet", t.id),
                        ),
                        None => (
                            Silence::Unknown,
                            format!("task {} (the host's health is unknown)", t.id),
                        ),
                    };
                    still.push((
                        silence,
                        say(
                            NoticeKind::Waiting,
                            Some(&t.host),
                            Some(&t.id),
                            format!("still waiting for {}: {state}", t.host),
                        ),
                    ));
                }
                _ => {}
            }
        }
        if still.len() <= MAX_ITEMISED {
            out.extend(still.into_iter().map(|(_, step)| step));
            return;
        }
        let count = |kind: Silence| still.iter().filter(|(s, _)| *s == kind).count();
        let parts: Vec<String> = [
            (Silence::Offline, "on offline hosts"),
            (Silence::Running, "running, nothing heard for 30s or more"),
            (Silence::NotStarted, "not started yet"),
            (Silence::Unknown, "on hosts of unknown health"),
        ]
        .into_iter()
        .map(|(kind, what)| (count(kind), what))
        .filter(|(n, _)| *n > 0)
        .map(|(n, what)| format!("{n} {what}"))
        .collect();
        out.push(say(
            NoticeKind::Waiting,
            None,
            None,
            format!(
                "still waiting for {} tasks: {}",
                still.len(),
                parts.join(", ")
            ),
        ));
    }
}

/// What a silent task waits on, for the summed-up line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Silence {
    Offline,
    Running,
    NotStarted,
    Unknown,
}

/// Why a host counts as offline at `now` and when it was last heard from,
/// by its `health` (none: nothing to say). After a reconnect at
/// `reconnected_at`, silence is counted from then: while the server was
/// down no heartbeat could be stored, which says nothing about the host.
fn offline(
    health: Option<&Health>,
    now: UnixMillis,
    reconnected_at: Option<UnixMillis>,
) -> Option<(OfflineReason, UnixMillis)> {
    let record = &health?.record;
    let mut settled = record.clone();
    if let Some(at) = reconnected_at {
        settled.stored_at = settled.stored_at.max(at);
    }
    settled
        .offline_reason(now)
        .map(|reason| (reason, record.stored_at))
}

fn why(reason: &OfflineReason) -> String {
    match reason {
        OfflineReason::Shutdown => "its agent stopped".into(),
        OfflineReason::MissedHeartbeats => "missed heartbeats".into(),
        other => other.to_string(),
    }
}

fn ended(t: &Task, outcome: Outcome) -> Step {
    Step::Ended {
        host: t.host.clone(),
        task_id: t.id.clone(),
        outcome,
    }
}

fn say(
    kind: NoticeKind,
    host: Option<&HostName>,
    task_id: Option<&TaskId>,
    message: String,
) -> Step {
    Step::Say(Notice {
        kind,
        host: host.cloned(),
        task_id: task_id.cloned(),
        message,
    })
}

fn whole_seconds(d: Duration) -> Duration {
    Duration::from_secs(d.as_secs())
}

/// Milliseconds as `45s`, `3m05s`, `2h10m`, `3d04h`.
fn span(ms: u64) -> String {
    let secs = ms / 1000;
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m{:02}s", secs / 60, secs % 60),
        3600..86400 => format!("{}h{:02}m", secs / 3600, (secs % 3600) / 60),
        _ => format!("{}d{:02}h", secs / 86400, (secs % 86400) / 3600),
    }
}

#[cfg(test)]
mod tests {
    use flotilla_protocol::{
        AgentState, Heartbeat, RejectReason, RunningJob, Severity, TaskFinished, EVENT_VERSION,
        HEARTBEAT_VERSION,
    };

    use super::*;

    /// 2026-01-01T00:00:00Z.
    const T0: u64 = 1_767_225_600_000;
    const SEC: u64 = 1000;
    const UP: Conn = Conn {
        connected: true,
        connects: 1,
    };
    const DOWN: Conn = Conn {
        connected: false,
        connects: 1,
    };
    /// Connected again, on the second connection.
    const BACK: Conn = Conn {
        connected: true,
        connects: 2,
    };

    fn host(name: &str) -> HostName {
        HostName::new(name).expect("valid host name")
    }

    fn tid(id: &str) -> TaskId {
        TaskId::new(id).expect("valid task id")
    }

    fn target(h: &str, id: &str) -> Target {
        Target {
            host: host(h),
            id: tid(id),
            sent_at: T0,
        }
    }

    fn event(h: &str, body: EventBody) -> Event {
        Event {
            v: EVENT_VERSION,
            id: "e".into(),
            time: T0,
            host: host(h),
            severity: Severity::Info,
            message: String::new(),
            body,
        }
    }

    fn finished(h: &str, id: &str, outcome: TaskOutcome) -> Event {
        event(
            h,
            EventBody::TaskFinished(TaskFinished {
                task_id: tid(id),
                task_kind: "backup".into(),
                outcome,
                error: None,
                retryable: false,
                result: None,
                duration_ms: 5,
            }),
        )
    }

    fn started(h: &str, id: &str) -> Event {
        event(
            h,
            EventBody::TaskStarted {
                task_id: tid(id),
                task_kind: "backup".into(),
            },
        )
    }

    /// `h`'s health record, last stored at `stored_at` (1 s heartbeats).
    fn record(h: &str, state: AgentState, stored_at: u64, running: &[&str]) -> HostRecord {
        HostRecord {
            heartbeat: Heartbeat {
                v: HEARTBEAT_VERSION,
                host: host(h),
                fleet: "f".into(),
                state,
                version: "1.0.0".into(),
                started_at: 0,
                time: stored_at,
                interval_ms: 1000,
                load: [0.0; 3],
                rss_bytes: 0,
                mem_total_bytes: 0,
                mem_available_bytes: 0,
                roles: Vec::new(),
                quic_addr: None,
                roots: Vec::new(),
                running: running
                    .iter()
                    .map(|id| RunningJob {
                        task_id: tid(id),
                        kind: "backup".into(),
                        started_at: stored_at,
                    })
                    .collect(),
                epoch: None,
            },
            stored_at,
        }
    }

    fn waiting(targets: Vec<Target>, wait: Wait) -> Waiting {
        let mut w = Waiting::new(targets, wait, T0);
        // The first tick learns the connection count.
        assert!(w.on_tick(T0, UP).is_empty());
        w
    }

    fn notices(steps: &[Step]) -> Vec<(NoticeKind, String)> {
        steps
            .iter()
            .filter_map(|s| match s {
                Step::Say(n) => Some((n.kind, n.message.clone())),
                _ => None,
            })
            .collect()
    }

    fn ends(steps: &[Step]) -> Vec<(String, Outcome)> {
        steps
            .iter()
            .filter_map(|s| match s {
                Step::Ended {
                    task_id, outcome, ..
                } => Some((task_id.to_string(), outcome.clone())),
                _ => None,
            })
            .collect()
    }

    fn rechecks(steps: &[Step]) -> Vec<Since> {
        steps
            .iter()
            .filter_map(|s| match s {
                Step::Recheck(since) => Some(*since),
                _ => None,
            })
            .collect()
    }

    const DAY: Wait = Wait {
        limit: Duration::from_secs(86_400),
        cancel: false,
    };

    #[test]
    fn an_outcome_ends_its_task_once_whichever_road_it_comes_by() {
        let mut w = waiting(vec![target("a", "t1"), target("b", "t2")], DAY);
        let done = finished("a", "t1", TaskOutcome::Succeeded);
        let first = w.on_event(T0 + SEC, &done);
        assert!(matches!(first, Some(Step::Ended { .. })), "{first:?}");
        // The same outcome again, live or read back, ends nothing more.
        assert_eq!(w.on_event(T0 + 2 * SEC, &done), None);
        assert!(w
            .on_recheck(T0 + 3 * SEC, vec![(7, done.clone())])
            .is_empty());
        assert_eq!(w.open(), vec![(host("b"), tid("t2"))]);
        // Another host's event about the same id is not this task's.
        assert_eq!(
            w.on_event(T0 + 4 * SEC, &finished("a", "t2", TaskOutcome::Failed)),
            None
        );
        let read = w.on_recheck(
            T0 + 5 * SEC,
            vec![(8, done), (9, finished("b", "t2", TaskOutcome::Failed))],
        );
        assert_eq!(ends(&read).len(), 1, "{read:?}");
        assert!(w.is_done());
    }

    /// The bug: the outcome was published while the client was away, so
    /// only the stream has it; the reconnect reads it back at once.
    #[test]
    fn after_a_reconnect_the_stream_is_read_back_at_once_and_gives_the_outcome() {
        let mut w = waiting(vec![target("a", "t1")], DAY);
        let down = w.on_tick(T0 + SEC, DOWN);
        assert_eq!(notices(&down)[0].0, NoticeKind::Disconnected, "{down:?}");
        // Nothing is read back while disconnected, however long.
        for s in 2..40 {
            assert!(rechecks(&w.on_tick(T0 + s * SEC, DOWN)).is_empty());
        }
        let back = w.on_tick(T0 + 40 * SEC, BACK);
        assert_eq!(
            rechecks(&back),
            vec![Since::Time(T0 - CLOCK_MARGIN_MS)],
            "{back:?}"
        );
        assert!(notices(&back)
            .iter()
            .any(|(k, _)| *k == NoticeKind::Reconnected));
        let read = w.on_recheck(
            T0 + 41 * SEC,
            vec![(12, finished("a", "t1", TaskOutcome::Succeeded))],
        );
        let ended = ends(&read);
        assert!(
            matches!(&ended[..], [(_, Outcome::Finished(f))] if f.outcome == TaskOutcome::Succeeded),
            "{ended:?}"
        );
        assert!(w.is_done());
    }

    /// A reconnect too short to be seen as a disconnection is still seen:
    /// the connection count moved.
    #[test]
    fn a_reconnect_between_two_ticks_is_noticed_by_the_count() {
        let mut w = waiting(vec![target("a", "t1")], DAY);
        let steps = w.on_tick(T0 + SEC, BACK);
        assert_eq!(rechecks(&steps).len(), 1, "{steps:?}");
        assert!(rechecks(&w.on_tick(T0 + 2 * SEC, BACK)).is_empty());
    }

    #[test]
    fn the_stream_is_read_back_every_ten_seconds_from_where_the_last_read_ended() {
        let mut w = waiting(vec![target("a", "t1")], DAY);
        assert!(rechecks(&w.on_tick(T0 + 9 * SEC, UP)).is_empty());
        assert_eq!(
            rechecks(&w.on_tick(T0 + 10 * SEC, UP)),
            vec![Since::Time(T0 - CLOCK_MARGIN_MS)]
        );
        // An unrelated outcome of the same host moves the start past it.
        w.on_recheck(
            T0 + 10 * SEC,
            vec![(5, finished("a", "other", TaskOutcome::Succeeded))],
        );
        assert!(rechecks(&w.on_tick(T0 + 15 * SEC, UP)).is_empty());
        assert_eq!(
            rechecks(&w.on_tick(T0 + 20 * SEC, UP)),
            vec![Since::After(5)]
        );
        assert_eq!(w.open().len(), 1);
    }

    #[test]
    fn an_offline_host_is_said_at_once_then_every_thirty_seconds_until_it_returns() {
        let mut w = waiting(vec![target("laptop", "t1")], DAY);
        let stopped = record("laptop", AgentState::Offline, T0 - 60 * SEC, &[]);
        w.on_health(&host("laptop"), Some(&stopped));
        let said = notices(&w.on_tick(T0 + SEC, UP));
        assert_eq!(
            said,
            vec![(
                NoticeKind::Offline,
                "laptop is offline (its agent stopped, last seen 1m01s ago): task t1 stays \
                 queued and runs when it returns"
                    .into()
            )]
        );
        // Quiet until thirty seconds have passed, then again and again.
        for s in 2..31 {
            w.on_health(&host("laptop"), Some(&stopped));
            assert!(notices(&w.on_tick(T0 + s * SEC, UP)).is_empty(), "at {s} s");
        }
        w.on_health(&host("laptop"), Some(&stopped));
        let again = notices(&w.on_tick(T0 + 31 * SEC, UP));
        assert_eq!(
            again,
            vec![(
                NoticeKind::Waiting,
                "still waiting for laptop: offline (its agent stopped, last seen 1m31s ago); \
                 the task stays queued until it returns"
                    .into()
            )]
        );
        // Back: said once.
        let back = record("laptop", AgentState::Online, T0 + 40 * SEC, &[]);
        w.on_health(&host("laptop"), Some(&back));
        let said = notices(&w.on_tick(T0 + 40 * SEC, UP));
        assert_eq!(said.len(), 1, "{said:?}");
        assert_eq!(said[0].0, NoticeKind::Online);
        assert!(notices(&w.on_tick(T0 + 41 * SEC, UP)).is_empty());
    }

    #[test]
    fn missed_heartbeats_count_from_the_reconnect_not_from_the_outage() {
        let mut w = waiting(vec![target("laptop", "t1")], DAY);
        assert!(notices(&w.on_tick(T0 + SEC, DOWN)).len() == 1);
        // The server was down 60 s: every heartbeat is that old, already
        // at the tick that sees the connection back.
        let old = record("laptop", AgentState::Online, T0, &[]);
        w.on_health(&host("laptop"), Some(&old));
        let back = notices(&w.on_tick(T0 + 61 * SEC, BACK));
        assert_eq!(back.len(), 1, "only the reconnect: {back:?}");
        assert_eq!(back[0].0, NoticeKind::Reconnected);
        w.on_health(&host("laptop"), Some(&old));
        assert!(notices(&w.on_tick(T0 + 62 * SEC, BACK)).is_empty());
        // Silent for more than three intervals after the reconnect: offline.
        w.on_health(&host("laptop"), Some(&old));
        let said = notices(&w.on_tick(T0 + 66 * SEC, BACK));
        assert_eq!(said.len(), 1, "{said:?}");
        assert_eq!(said[0].0, NoticeKind::Offline);
        assert!(said[0].1.contains("missed heartbeats"), "{said:?}");
    }

    #[test]
    fn a_silent_task_says_what_it_waits_for_and_progress_keeps_it_quiet() {
        let mut w = waiting(vec![target("nas", "t1"), target("nas", "t2")], DAY);
        let online = record("nas", AgentState::Online, T0 + 30 * SEC, &["t2"]);
        for s in 1..30 {
            let at = T0 + s * SEC;
            w.on_health(
                &host("nas"),
                Some(&record("nas", AgentState::Online, at, &["t2"])),
            );
            if s % 10 == 0 {
                w.on_event(at, &started("nas", "t1"));
            }
            assert!(notices(&w.on_tick(at, UP)).is_empty(), "at {s} s");
        }
        w.on_health(&host("nas"), Some(&online));
        let said = notices(&w.on_tick(T0 + 30 * SEC, UP));
        // t1 was heard from 10 s ago; t2, running by the heartbeat, never.
        assert_eq!(
            said,
            vec![(
                NoticeKind::Waiting,
                "still waiting for nas: task t2 is running; nothing heard from it for 30s".into()
            )]
        );
        let fresh = record("nas", AgentState::Online, T0 + 50 * SEC, &["t2"]);
        w.on_health(&host("nas"), Some(&fresh));
        let said = notices(&w.on_tick(T0 + 50 * SEC, UP));
        assert_eq!(said.len(), 1, "t1 after 30 s of silence: {said:?}");
        assert!(said[0].1.contains("task t1 is running"), "{said:?}");
    }

    #[test]
    fn many_silent_tasks_are_summed_up_in_one_line() {
        let targets = (0..8)
            .map(|i| target(&format!("h{i}"), &format!("t{i}")))
            .collect();
        let mut w = waiting(targets, DAY);
        let at = T0 + 30 * SEC;
        for i in 0..8 {
            let h = format!("h{i}");
            let r = match i {
                0 => record(&h, AgentState::Offline, T0, &[]),
                1..=2 => record(&h, AgentState::Online, at, &[&format!("t{i}")]),
                _ => record(&h, AgentState::Online, at, &[]),
            };
            w.on_health(&host(&h), Some(&r));
        }
        // h0's outage is said on its own, at once.
        let said = notices(&w.on_tick(at - 29 * SEC, UP));
        assert_eq!(said.len(), 1, "{said:?}");
        assert_eq!(said[0].0, NoticeKind::Offline);
        let said = notices(&w.on_tick(at, UP));
        assert_eq!(
            said,
            vec![(
                NoticeKind::Waiting,
                "still waiting for 7 tasks: 2 running, nothing heard for 30s or more, \
                 5 not started yet"
                    .into()
            )]
        );
    }

    #[test]
    fn a_task_not_taken_by_an_online_host_says_so() {
        let mut w = waiting(vec![target("nas", "t1")], DAY);
        let at = T0 + 30 * SEC;
        w.on_health(
            &host("nas"),
            Some(&record("nas", AgentState::Online, at, &[])),
        );
        assert_eq!(
            notices(&w.on_tick(at, UP)),
            vec![(
                NoticeKind::Waiting,
                "still waiting for nas: online, but task t1 has not started yet".into()
            )]
        );
    }

    #[test]
    fn a_plain_wait_ends_at_its_limit_without_a_cancel() {
        let wait = Wait::up_to(Duration::from_secs(30));
        let mut w = waiting(vec![target("a", "t1")], wait);
        assert!(ends(&w.on_tick(T0 + 29 * SEC, UP)).is_empty());
        let steps = w.on_tick(T0 + 30 * SEC, UP);
        assert_eq!(ends(&steps), vec![("t1".into(), Outcome::TimedOut)]);
        assert!(!steps.iter().any(|s| matches!(s, Step::Cancel { .. })));
    }

    #[test]
    fn a_timeout_cancels_then_gives_up_after_the_grace() {
        let five = Duration::from_secs(5);
        let mut w = waiting(vec![target("a", "t1")], Wait::timeout(five));
        let at = T0 + 5 * SEC;
        w.on_health(
            &host("a"),
            Some(&record("a", AgentState::Online, at, &["t1"])),
        );
        let steps = w.on_tick(at, UP);
        assert!(
            steps.contains(&Step::Cancel {
                host: host("a"),
                task_id: tid("t1")
            }),
            "{steps:?}"
        );
        assert_eq!(
            notices(&steps),
            vec![(
                NoticeKind::Timeout,
                "a: task t1 did not finish within 5s (--timeout); sending it a cancel".into()
            )]
        );
        assert!(ends(&steps).is_empty(), "an online host gets its grace");
        let later = w.on_tick(at + CANCEL_GRACE_MS - 1, UP);
        assert!(!later.iter().any(|s| matches!(s, Step::Cancel { .. })));
        assert!(ends(&later).is_empty());
        let fresh = record("a", AgentState::Online, at + CANCEL_GRACE_MS, &["t1"]);
        w.on_health(&host("a"), Some(&fresh));
        let over = w.on_tick(at + CANCEL_GRACE_MS, UP);
        assert_eq!(
            ends(&over),
            vec![(
                "t1".into(),
                Outcome::GaveUp {
                    after: five,
                    host_offline: false
                }
            )]
        );
    }

    #[test]
    fn a_task_that_stops_for_the_timeouts_cancel_ends_timed_out() {
        let mut w = waiting(
            vec![target("a", "t1")],
            Wait::timeout(Duration::from_secs(5)),
        );
        w.on_tick(T0 + 5 * SEC, UP);
        let steps = w.on_event(T0 + 6 * SEC, &finished("a", "t1", TaskOutcome::Cancelled));
        assert!(
            matches!(
                steps,
                Some(Step::Ended {
                    outcome: Outcome::GaveUp {
                        host_offline: false,
                        ..
                    },
                    ..
                })
            ),
            "{steps:?}"
        );
    }

    #[test]
    fn a_task_that_finishes_within_the_grace_keeps_its_real_outcome() {
        let mut w = waiting(
            vec![target("a", "t1")],
            Wait::timeout(Duration::from_secs(5)),
        );
        w.on_tick(T0 + 5 * SEC, UP);
        let steps = w.on_event(T0 + 6 * SEC, &finished("a", "t1", TaskOutcome::Succeeded));
        assert!(
            matches!(steps, Some(Step::Ended { outcome: Outcome::Finished(ref f), .. }) if f.outcome == TaskOutcome::Succeeded),
            "{steps:?}"
        );
    }

    #[test]
    fn a_timeout_on_an_offline_host_gives_up_at_once() {
        let five = Duration::from_secs(5);
        let mut w = waiting(vec![target("a", "t1")], Wait::timeout(five));
        let gone = record("a", AgentState::Offline, T0 - SEC, &[]);
        w.on_health(&host("a"), Some(&gone));
        w.on_tick(T0 + SEC, UP);
        let steps = w.on_tick(T0 + 5 * SEC, UP);
        assert!(steps.iter().any(|s| matches!(s, Step::Cancel { .. })));
        assert_eq!(
            ends(&steps),
            vec![(
                "t1".into(),
                Outcome::GaveUp {
                    after: five,
                    host_offline: true
                }
            )]
        );
        assert!(w.is_done());
    }

    #[test]
    fn ctrl_c_cancels_each_open_task_once_and_its_end_stays_cancelled() {
        let mut w = waiting(
            vec![target("a", "t1"), target("b", "t2")],
            Wait::timeout(Duration::from_secs(60)),
        );
        w.on_event(T0 + SEC, &finished("b", "t2", TaskOutcome::Succeeded));
        assert_eq!(w.interrupt(T0 + 2 * SEC), vec![(host("a"), tid("t1"))]);
        assert!(w.interrupt(T0 + 3 * SEC).is_empty(), "not twice");
        // Its timeout later sends no second cancel.
        let steps = w.on_tick(T0 + 60 * SEC, UP);
        assert!(
            !steps.iter().any(|s| matches!(s, Step::Cancel { .. })),
            "{steps:?}"
        );
        let rejected = event(
            "a",
            EventBody::TaskRejected {
                task_id: Some(tid("t1")),
                reason: RejectReason::Expired,
                detail: "too late".into(),
                subject: "flotilla.task.a".into(),
            },
        );
        let end = w.on_event(T0 + 61 * SEC, &rejected);
        assert!(
            matches!(
                end,
                Some(Step::Ended {
                    outcome: Outcome::Rejected { .. },
                    ..
                })
            ),
            "{end:?}"
        );
    }

    #[test]
    fn a_long_outage_is_said_again_and_the_closed_client_ends_every_wait() {
        let mut w = waiting(vec![target("a", "t1")], DAY);
        w.on_tick(T0 + SEC, DOWN);
        let said = notices(&w.on_tick(T0 + 31 * SEC, DOWN));
        assert_eq!(
            said,
            vec![(
                NoticeKind::Waiting,
                "still waiting: no connection to NATS for 30s; reconnecting".into()
            )]
        );
        let ended = w.lost("event subscription closed");
        assert_eq!(
            ends(&ended),
            vec![(
                "t1".into(),
                Outcome::Lost("event subscription closed".into())
            )]
        );
        assert!(w.is_done());
    }

    #[test]
    fn spans_read_as_durations() {
        assert_eq!(span(45_000), "45s");
        assert_eq!(span(185_000), "3m05s");
        assert_eq!(span(7_800_000), "2h10m");
        assert_eq!(span(3 * 86_400_000 + 4 * 3_600_000), "3d04h");
    }
}
