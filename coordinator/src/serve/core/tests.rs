//! The daemon's decisions under a virtual clock: plain unix-ms `now`, an
//! in-memory store, schedules read in UTC. No NATS, no sled, no tokio.

use chrono::Utc;
use flotilla_protocol::{
    AgentState, BackupReport, Event, EventBody, Heartbeat, HostName, RejectReason, RootKind,
    RootUsage, Severity, SnapshotId, TaskFinished, TaskOutcome, TaskResult, EVENT_VERSION,
    HEARTBEAT_VERSION,
};

use super::*;
use crate::serve::state::MemoryStore;

/// 2026-01-01T00:00:00Z.
const T0: u64 = 1_767_225_600_000;
const SEC: u64 = 1000;
const MIN: u64 = 60 * SEC;
const VERSION: &str = "1.0.0";

/// Daemon settings of every test: 30 s first retry, three attempts, two
/// jobs per storage host.
const SERVE: &str = "[serve]\nretries = 3\nretry_backoff = \"30s\"\nmax_per_storage = 2\n";

/// Backs up alpha and beta to nas every five minutes.
fn five_minutely() -> String {
    format!(
        "{SERVE}\n[[plan]]\nname = \"home\"\nhosts = [\"alpha\", \"beta\"]\nto = \"nas\"\n\
         schedule = \"*/5 * * * *\"\n"
    )
}

fn name(h: &str) -> HostName {
    HostName::new(h).expect("valid host name")
}

fn tid(id: &str) -> TaskId {
    TaskId::new(id).expect("valid task id")
}

/// A valid snapshot id made from a short label (its hex, padded with zeros),
/// so tests can speak of `snap1`.
fn snap(label: &str) -> SnapshotId {
    let hex: String = label.bytes().map(|b| format!("{b:02x}")).collect();
    SnapshotId::new(format!("{hex:0<32}")).expect("a short label makes a valid id")
}

/// A daemon and the tasks it sent, on a virtual clock.
struct World {
    core: Core<MemoryStore, Utc>,
    sent: u64,
}

/// A task the world sent: `(task id, host, what)`.
type Sent = (TaskId, HostName, TaskSpec);

impl World {
    /// A daemon started at `T0` on `text`, not yet leading.
    fn standby(text: &str) -> World {
        World::resume(text, MemoryStore::default(), T0)
    }

    /// A daemon started at `now` on `text` with the state a previous run left.
    fn resume(text: &str, store: MemoryStore, now: u64) -> World {
        let config = Config::parse(text).expect("valid config");
        World {
            core: Core::new(config, store, Utc, VERSION, now),
            sent: 0,
        }
    }

    /// A daemon started at `T0` that took the lease at once.
    fn leader(text: &str) -> World {
        let mut w = World::standby(text);
        let actions = w.core.on_lease(T0, LeaseSeen::Held);
        assert_eq!(
            actions,
            vec![Action::Leadership(LeaderChange::Acquired {
                after_ms: None
            })]
        );
        w
    }

    /// Sends every dispatch among `actions` successfully; returns the sent
    /// tasks and the other actions (those the dispatches added included).
    fn send(&mut self, actions: Vec<Action>, now: u64) -> (Vec<Sent>, Vec<Action>) {
        let mut sent = Vec::new();
        let mut rest = Vec::new();
        for a in actions {
            match a {
                Action::Dispatch { job, host, task } => {
                    self.sent += 1;
                    let id = tid(&format!("t{}", self.sent));
                    rest.extend(self.core.on_dispatched(job, Ok::<_, &str>(id.clone()), now));
                    sent.push((id, host, task));
                }
                other => rest.push(other),
            }
        }
        (sent, rest)
    }

    /// One tick without a registry, every dispatch sent.
    fn tick(&mut self, now: u64) -> Vec<Sent> {
        let actions = self.core.on_tick(now, None);
        self.send(actions, now).0
    }

    /// One tick with the registry `hosts`; the events it publishes.
    fn watch(&mut self, now: u64, hosts: &[HostRecord]) -> Vec<(&'static str, String)> {
        published(&self.core.on_tick(now, Some(hosts)))
    }

    /// `task.finished` of `task` on `host` at `now`.
    fn finish(&mut self, now: u64, task: impl AsRef<str>, host: &str, done: Done) -> Vec<Action> {
        let ev = event(host, now, finished(task.as_ref(), done));
        self.core.on_finished(now, &ev)
    }
}

/// How a task ended, for [`finished`].
#[derive(Clone)]
struct Done {
    outcome: TaskOutcome,
    retryable: bool,
    result: Option<TaskResult>,
}

fn succeeded(snapshot: &str) -> Done {
    Done {
        outcome: TaskOutcome::Succeeded,
        retryable: false,
        result: Some(backup_to("nas", snapshot)),
    }
}

fn failed(retryable: bool) -> Done {
    Done {
        outcome: TaskOutcome::Failed,
        retryable,
        result: None,
    }
}

fn backup_to(storage: &str, snapshot: &str) -> TaskResult {
    TaskResult::Backup(BackupReport {
        snapshot: snap(snapshot),
        storage: storage.into(),
        summary: Default::default(),
        partial: false,
        unreadable: Vec::new(),
    })
}

fn finished(task: &str, done: Done) -> EventBody {
    EventBody::TaskFinished(TaskFinished {
        task_id: tid(task),
        task_kind: "backup".into(),
        outcome: done.outcome,
        error: (done.outcome == TaskOutcome::Failed).then(|| "disk on fire".into()),
        retryable: done.retryable,
        result: done.result,
        duration_ms: 1234,
    })
}

fn event(host: &str, time: u64, body: EventBody) -> Event {
    Event {
        v: EVENT_VERSION,
        id: "e".into(),
        time,
        host: name(host),
        severity: Severity::Info,
        message: String::new(),
        body,
    }
}

/// `(event kind, host)` of every publish among `actions`.
fn published(actions: &[Action]) -> Vec<(&'static str, String)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Publish { host, body, .. } => Some((body.kind(), host.to_string())),
            _ => None,
        })
        .collect()
}

/// The one `job.*` event among `actions`.
fn job_ended(actions: &[Action]) -> (&'static str, JobEnded) {
    let ended: Vec<(&'static str, JobEnded)> = actions
        .iter()
        .filter_map(|a| match a {
            Action::Publish { body, .. } => match body {
                EventBody::JobSucceeded(j)
                | EventBody::JobPartial(j)
                | EventBody::JobFailed(j)
                | EventBody::JobCancelled(j) => Some((body.kind(), j.clone())),
                _ => None,
            },
            _ => None,
        })
        .collect();
    assert_eq!(ended.len(), 1, "{actions:?}");
    ended[0].clone()
}

fn hosts_of(sent: &[Sent]) -> Vec<String> {
    sent.iter().map(|(_, h, _)| h.to_string()).collect()
}

fn record(host: &str, stored_at: u64, version: &str, roots: Vec<RootUsage>) -> HostRecord {
    HostRecord {
        heartbeat: Heartbeat {
            v: HEARTBEAT_VERSION,
            host: name(host),
            fleet: "f".into(),
            state: AgentState::Online,
            version: version.into(),
            started_at: 0,
            time: stored_at,
            interval_ms: 1000,
            load: [0.0; 3],
            rss_bytes: 0,
            mem_total_bytes: 0,
            mem_available_bytes: 0,
            roles: Vec::new(),
            quic_addr: None,
            roots,
            running: Vec::new(),
            epoch: None,
        },
        stored_at,
    }
}

fn storage_root(free: u64, total: u64) -> RootUsage {
    RootUsage {
        kind: RootKind::Storage,
        path: "/srv/flotilla".into(),
        free_bytes: free,
        total_bytes: total,
        error: None,
    }
}

// ---- schedules ----------------------------------------------------------------

#[test]
fn a_plan_is_not_due_before_its_time() {
    let mut w = World::leader(&five_minutely());
    // Armed at T0 (00:00): the first scheduled time is 00:05.
    for now in [T0, T0 + MIN, T0 + 4 * MIN + 59 * SEC] {
        assert!(w.tick(now).is_empty(), "nothing is due at {now}");
    }
    assert_eq!(w.core.queued_jobs(), 0);
}

#[test]
fn a_due_plan_backs_up_each_host_once() {
    let mut w = World::leader(&five_minutely());
    let sent = w.tick(T0 + 5 * MIN);
    assert_eq!(hosts_of(&sent), ["alpha", "beta"]);
    assert_eq!(
        sent[0].2,
        TaskSpec::Backup {
            storage: name("nas"),
            paths: Vec::new(),
            excludes: Vec::new(),
            allow_empty: false,
        }
    );
    // The same scheduled time does not fire again.
    assert!(w.tick(T0 + 5 * MIN + 30 * SEC).is_empty());
    assert_eq!(w.core.running_jobs(), 2);
}

#[test]
fn missed_runs_catch_up_once_after_downtime() {
    // A previous daemon last ran the plan at T0 and was down for three hours
    // (36 scheduled times).
    let mut store = MemoryStore::default();
    store.runs.insert("home/backup".into(), T0);
    let back = T0 + 3 * 60 * MIN + 2 * MIN;
    let mut w = World::resume(&five_minutely(), store, back);
    w.core.on_lease(back, LeaseSeen::Held);
    let sent = w.tick(back);
    assert_eq!(hosts_of(&sent), ["alpha", "beta"], "one catch-up run");
    for (task, host, _) in &sent {
        w.finish(back + MIN, task, host.as_str(), succeeded("s"));
    }
    // No backlog: nothing until the next scheduled time (03:05).
    assert!(w.tick(back + 2 * MIN + 59 * SEC).is_empty());
    assert_eq!(w.core.queued_jobs(), 0);
    assert_eq!(hosts_of(&w.tick(back + 3 * MIN)), ["alpha", "beta"]);
}

#[test]
fn check_and_prune_run_on_the_storage_host() {
    let text = format!(
        "{SERVE}prune_grace = \"2h\"\n\n[[plan]]\nname = \"home\"\nhosts = [\"alpha\"]\n\
         to = \"nas\"\ncheck = \"*/5 * * * *\"\ncheck_read_data = \"*/10 * * * *\"\n\
         prune = \"*/10 * * * *\"\n"
    );
    let mut w = World::leader(&text.replace("max_per_storage = 2", "max_per_storage = 3"));
    let sent = w.tick(T0 + 5 * MIN);
    assert_eq!(hosts_of(&sent), ["nas"]);
    assert_eq!(sent[0].2, TaskSpec::Check { read_data: false });
    let checked = Done {
        outcome: TaskOutcome::Succeeded,
        retryable: false,
        result: None,
    };
    let ended = w.finish(T0 + 6 * MIN, &sent[0].0, "nas", checked);
    assert_eq!(job_ended(&ended).0, "job.succeeded");
    let sent = w.tick(T0 + 10 * MIN);
    assert_eq!(hosts_of(&sent), ["nas", "nas", "nas"]);
    let specs: Vec<TaskSpec> = sent.into_iter().map(|(_, _, t)| t).collect();
    assert_eq!(
        specs,
        [
            TaskSpec::Check { read_data: false },
            TaskSpec::Check { read_data: true },
            TaskSpec::Prune { grace_secs: 7200 }
        ]
    );
}

// ---- queue ----------------------------------------------------------------------

#[test]
fn a_job_is_not_queued_twice() {
    let text = five_minutely().replace("max_per_storage = 2", "max_per_storage = 1");
    let mut w = World::leader(&text);
    // alpha goes, beta waits for the storage slot.
    assert_eq!(hosts_of(&w.tick(T0 + 5 * MIN)), ["alpha"]);
    assert_eq!(w.core.queued_jobs(), 1);
    // Due again while alpha runs and beta waits: neither is queued again.
    assert!(w.tick(T0 + 10 * MIN).is_empty());
    assert_eq!(w.core.queued_jobs(), 1);
    assert_eq!(w.core.running_jobs(), 1);
}

#[test]
fn the_storage_limit_holds_and_the_next_job_goes_when_one_ends() {
    let text = five_minutely().replace("\"alpha\", \"beta\"", "\"alpha\", \"beta\", \"gamma\"");
    let mut w = World::leader(&text);
    let sent = w.tick(T0 + 5 * MIN);
    assert_eq!(hosts_of(&sent), ["alpha", "beta"], "two per storage");
    assert!(w.tick(T0 + 5 * MIN + 10 * SEC).is_empty(), "nas is full");
    w.finish(T0 + 6 * MIN, &sent[0].0, "alpha", succeeded("s1"));
    assert_eq!(hosts_of(&w.tick(T0 + 6 * MIN + SEC)), ["gamma"]);
}

#[test]
fn a_dispatch_failure_waits_its_backoff_and_keeps_its_attempt() {
    let text = five_minutely().replace("\"alpha\", \"beta\"", "\"alpha\"");
    let mut w = World::leader(&text);
    let due = T0 + 5 * MIN;
    let actions = w.core.on_tick(due, None);
    let [Action::Dispatch { job, .. }] = actions.as_slice() else {
        panic!("one dispatch expected: {actions:?}");
    };
    assert!(w
        .core
        .on_dispatched(*job, Err("no route to nas"), due)
        .is_empty());
    assert_eq!((w.core.queued_jobs(), w.core.running_jobs()), (1, 0));
    assert!(w.tick(due + 29 * SEC).is_empty(), "not before the backoff");
    let sent = w.tick(due + 30 * SEC);
    assert_eq!(hosts_of(&sent), ["alpha"]);
    // Failing for good now says attempt 1: the unsent try did not count.
    let ended = w.finish(due + MIN, &sent[0].0, "alpha", failed(false));
    assert_eq!(job_ended(&ended).1.attempts, 1);
}

// ---- outcomes -------------------------------------------------------------------

#[test]
fn a_retryable_failure_retries_with_doubling_backoff_then_fails() {
    let text = five_minutely().replace("\"alpha\", \"beta\"", "\"alpha\"");
    let mut w = World::leader(&text);
    let sent = w.tick(T0 + 5 * MIN);
    let t1 = T0 + 6 * MIN;
    assert!(published(&w.finish(t1, &sent[0].0, "alpha", failed(true))).is_empty());
    assert!(w.tick(t1 + 29 * SEC).is_empty(), "attempt 2 waits 30 s");
    let second = w.tick(t1 + 30 * SEC);
    assert_eq!(hosts_of(&second), ["alpha"]);
    let t2 = t1 + MIN;
    assert!(published(&w.finish(t2, &second[0].0, "alpha", failed(true))).is_empty());
    assert!(w.tick(t2 + 59 * SEC).is_empty(), "attempt 3 waits 60 s");
    let third = w.tick(t2 + 60 * SEC);
    assert_eq!(hosts_of(&third), ["alpha"]);
    // The third attempt is the last (retries = 3).
    let ended = w.finish(t2 + 2 * MIN, &third[0].0, "alpha", failed(true));
    let (kind, job) = job_ended(&ended);
    assert_eq!((kind, job.attempts), ("job.failed", 3));
    assert_eq!(job.task_id, third[0].0);
    assert_eq!(job.error.as_deref(), Some("disk on fire"));
    assert_eq!(w.core.queued_jobs(), 0);
}

#[test]
fn a_permanent_failure_fails_the_job_at_once() {
    let mut w = World::leader(&five_minutely());
    let sent = w.tick(T0 + 5 * MIN);
    let ended = w.finish(T0 + 6 * MIN, &sent[0].0, "alpha", failed(false));
    let (kind, job) = job_ended(&ended);
    assert_eq!((kind, job.attempts), ("job.failed", 1));
    assert_eq!(job.plan.as_deref(), Some("home"));
    assert_eq!(w.core.queued_jobs(), 0);
    assert!(w.tick(T0 + 9 * MIN).is_empty(), "no retry");
}

#[test]
fn a_success_ends_the_job_and_is_recorded() {
    let mut w = World::leader(&five_minutely());
    let sent = w.tick(T0 + 5 * MIN);
    let ended = w.finish(T0 + 6 * MIN, &sent[0].0, "alpha", succeeded("snap1"));
    let (kind, job) = job_ended(&ended);
    assert_eq!(
        (kind, job.snapshot.clone()),
        ("job.succeeded", Some(snap("snap1")))
    );
    let s = w.core.store().success("home", "alpha").expect("recorded");
    assert_eq!(
        (s.time, s.snapshot, s.duration_ms),
        (T0 + 6 * MIN, Some(snap("snap1")), 1234)
    );
    assert_eq!(w.core.running_jobs(), 1, "beta still runs");
}

#[test]
fn a_partial_backup_ends_its_job_partial_and_counts_as_a_success() {
    let mut w = World::leader(&five_minutely());
    let sent = w.tick(T0 + 5 * MIN);
    let done = Done {
        outcome: TaskOutcome::Partial,
        ..succeeded("snap1")
    };
    let ended = w.finish(T0 + 6 * MIN, &sent[0].0, "alpha", done);
    assert_eq!(job_ended(&ended).0, "job.partial");
    assert!(w.core.store().success("home", "alpha").is_some());
}

#[test]
fn a_cancelled_task_ends_its_job_cancelled() {
    let mut w = World::leader(&five_minutely());
    let sent = w.tick(T0 + 5 * MIN);
    let done = Done {
        outcome: TaskOutcome::Cancelled,
        retryable: true,
        result: None,
    };
    let ended = w.finish(T0 + 6 * MIN, &sent[0].0, "alpha", done);
    assert_eq!(job_ended(&ended).0, "job.cancelled");
    // Cancelled is an end, never a retry.
    assert_eq!(w.core.queued_jobs(), 0);
    assert!(w.core.store().success("home", "alpha").is_none());
}

#[test]
fn a_result_for_an_unknown_task_raises_no_job_event() {
    let text = format!("{}keep = {{ last = 1 }}\n", five_minutely());
    let mut w = World::leader(&text);
    assert!(w.finish(T0, "not-ours", "alpha", failed(false)).is_empty());
    // A successful backup started by hand still counts for the plan, and
    // its keep policy applies; but no job.* event.
    let actions = w.finish(T0, "by-hand", "alpha", succeeded("snap1"));
    assert!(published(&actions).is_empty(), "{actions:?}");
    assert!(matches!(
        actions.as_slice(),
        [Action::ApplyRetention { .. }]
    ));
    assert!(w.core.store().success("home", "alpha").is_some());
}

#[test]
fn a_refused_task_fails_its_job() {
    let mut w = World::leader(&five_minutely());
    let sent = w.tick(T0 + 5 * MIN);
    let refusal = |task: &str| {
        event(
            "alpha",
            T0 + 6 * MIN,
            EventBody::TaskRejected {
                task_id: Some(tid(task)),
                reason: RejectReason::NotAllowed,
                detail: "/home is outside the backup roots".into(),
                subject: "x".into(),
            },
        )
    };
    assert!(w.core.on_rejected(&refusal("not-ours")).is_empty());
    let ended = w.core.on_rejected(&refusal(sent[0].0.as_str()));
    let (kind, job) = job_ended(&ended);
    assert_eq!(kind, "job.failed");
    assert_eq!(
        job.error.as_deref(),
        Some("/home is outside the backup roots")
    );
    assert_eq!((w.core.running_jobs(), w.core.queued_jobs()), (1, 0));
}

/// The tasks `actions` send a `cancel`.
fn cancels(actions: &[Action]) -> Vec<TaskId> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Cancel { task_id, .. } => Some(task_id.clone()),
            _ => None,
        })
        .collect()
}

/// Alpha alone, every five minutes, with a one-hour `timeout`.
fn timed() -> String {
    format!(
        "{}timeout = \"1h\"\n",
        five_minutely().replace("\"alpha\", \"beta\"", "\"alpha\"")
    )
}

#[test]
fn a_job_past_its_plan_timeout_is_cancelled_retried_then_failed() {
    let mut w = World::leader(&timed());
    let mut at = T0 + 5 * MIN;
    let mut sent = w.tick(at);
    let first = sent[0].0.clone();
    for attempt in 1..=3 {
        assert_eq!(hosts_of(&sent), ["alpha"], "attempt {attempt}");
        let task = sent[0].0.clone();
        // A minute short of the hour: nothing.
        let early = w.core.on_tick(at + 59 * MIN, None);
        assert!(cancels(&early).is_empty(), "{early:?}");
        let late = w.core.on_tick(at + 60 * MIN, None);
        assert_eq!(cancels(&late), vec![task], "attempt {attempt}");
        assert_eq!(w.core.running_jobs(), 0, "the slot is free again");
        if attempt == 3 {
            // The last attempt (retries = 3): the job fails, saying why.
            let (kind, job) = job_ended(&late);
            assert_eq!((kind, job.attempts), ("job.failed", 3));
            let error = job.error.unwrap_or_default();
            assert!(error.starts_with("timed out after 1h"), "{error}");
            assert_eq!(w.core.queued_jobs(), 0);
            break;
        }
        assert!(
            published(&late).is_empty(),
            "a retry, no job event: {late:?}"
        );
        // Queued again after the backoff (30 s, then 60 s).
        at += 60 * MIN;
        let backoff = (30 * SEC) << (attempt - 1);
        assert!(w.tick(at + backoff - 1).is_empty());
        at += backoff;
        sent = w.tick(at);
    }
    // The first task's late `cancelled` ends nothing: its job is gone.
    let done = Done {
        outcome: TaskOutcome::Cancelled,
        retryable: false,
        result: None,
    };
    assert!(w.finish(at, &first, "alpha", done).is_empty());
}

#[test]
fn a_job_that_ends_in_time_or_has_no_timeout_is_never_cancelled() {
    let mut w = World::leader(&timed());
    let sent = w.tick(T0 + 5 * MIN);
    let ended = w.finish(T0 + 64 * MIN, &sent[0].0, "alpha", succeeded("snap1"));
    assert_eq!(job_ended(&ended).0, "job.succeeded");
    assert!(cancels(&w.core.on_tick(T0 + 66 * MIN, None)).is_empty());

    let mut w = World::leader(&five_minutely());
    let sent = w.tick(T0 + 5 * MIN);
    assert_eq!(sent.len(), 2);
    let much_later = w.core.on_tick(T0 + 30 * 24 * 60 * MIN, None);
    assert!(cancels(&much_later).is_empty());
    assert_eq!(w.core.running_jobs(), 2);
}

#[test]
fn a_backup_dispatch_pings_the_plan_start() {
    let mut w = World::leader(&five_minutely());
    let actions = w.core.on_tick(T0 + 5 * MIN, None);
    let (_, rest) = w.send(actions, T0 + 5 * MIN);
    assert_eq!(
        rest,
        vec![
            Action::JobStarted {
                plan: "home".into()
            };
            2
        ]
    );
}

// ---- retention --------------------------------------------------------------------

#[test]
fn retention_follows_a_success_only_with_a_keep_policy_and_the_lease() {
    let kept = format!("{}keep = {{ last = 2 }}\n", five_minutely());
    let mut w = World::leader(&kept);
    let sent = w.tick(T0 + 5 * MIN);
    let actions = w.finish(T0 + 6 * MIN, &sent[0].0, "alpha", succeeded("s1"));
    let retention: Vec<&Action> = actions
        .iter()
        .filter(|a| matches!(a, Action::ApplyRetention { .. }))
        .collect();
    assert_eq!(
        retention,
        [&Action::ApplyRetention {
            plan: "home".into(),
            host: name("alpha"),
            storage: name("nas"),
            keep: KeepPolicy {
                last: Some(2),
                ..Default::default()
            },
        }]
    );

    // A plan without a keep policy forgets nothing.
    let mut w = World::leader(&five_minutely());
    let sent = w.tick(T0 + 5 * MIN);
    let actions = w.finish(T0 + 6 * MIN, &sent[0].0, "alpha", succeeded("s1"));
    assert!(!actions
        .iter()
        .any(|a| matches!(a, Action::ApplyRetention { .. })));

    // A standby records the success but leaves retention to the leader.
    let mut w = World::standby(&kept);
    let actions = w.finish(T0 + 6 * MIN, "by-hand", "alpha", succeeded("s1"));
    assert!(actions.is_empty(), "{actions:?}");
    assert!(w.core.store().success("home", "alpha").is_some());

    // A backup to another storage satisfies no plan of nas.
    let mut w = World::leader(&kept);
    let ev = event(
        "alpha",
        T0,
        finished(
            "x",
            Done {
                result: Some(backup_to("elsewhere", "s2")),
                ..succeeded("s2")
            },
        ),
    );
    assert!(w.core.on_finished(T0, &ev).is_empty());
    assert!(w.core.store().success("home", "alpha").is_none());
}

// ---- leadership ---------------------------------------------------------------------

#[test]
fn without_the_lease_nothing_is_dispatched_or_watched() {
    let text = format!("{}rpo = \"1m\"\n", five_minutely());
    let mut w = World::leader(&text);
    let lost = w.core.on_lease(
        T0 + MIN,
        LeaseSeen::Failed {
            why: "stream not found".into(),
        },
    );
    assert_eq!(
        lost,
        vec![Action::Leadership(LeaderChange::Lost {
            why: "stream not found".into()
        })]
    );
    assert!(!w.core.is_leader());
    // Due, overdue and offline: a standby does none of it.
    let silent = record("alpha", T0, "0.9.0", vec![storage_root(1, 100)]);
    let actions = w.core.on_tick(T0 + 10 * MIN, Some(&[silent]));
    assert!(actions.is_empty(), "{actions:?}");
    assert_eq!(w.core.queued_jobs(), 0);
    assert!(w.core.store().alerts.is_empty());
}

#[test]
fn dispatching_resumes_when_the_lease_returns_after_a_bus_restart() {
    let mut w = World::leader(&five_minutely());
    // The bus restarts at 00:01: the lease bucket is gone until the lease
    // opens it again; it is back at 00:06.
    let down = T0 + MIN;
    let gone = LeaseSeen::Failed {
        why: "stream not found".into(),
    };
    w.core.on_lease(down, gone.clone());
    let mut warnings = Vec::new();
    let mut now = down;
    while now < T0 + 6 * MIN {
        now += 5 * SEC;
        for a in w.core.on_lease(now, gone.clone()) {
            warnings.push((now, a));
        }
        assert!(w.tick(now).is_empty(), "standby dispatches nothing");
    }
    // Standing by with the lease unreadable is said once after 45 s.
    assert_eq!(
        warnings,
        vec![(
            down + 45 * SEC,
            Action::Leadership(LeaderChange::LongStandby {
                for_ms: 45 * SEC,
                holder: None,
                why: "stream not found".into()
            })
        )]
    );
    let back = T0 + 6 * MIN;
    assert_eq!(
        w.core.on_lease(back, LeaseSeen::Held),
        vec![Action::Leadership(LeaderChange::Acquired {
            after_ms: Some(5 * MIN)
        })]
    );
    // The 00:05 run missed while standing by runs now, once.
    assert_eq!(hosts_of(&w.tick(back)), ["alpha", "beta"]);
    assert!(w.tick(back + 5 * SEC).is_empty());
}

#[test]
fn standing_by_behind_a_live_leader_is_quiet_and_a_lasting_failure_is_not() {
    let mut w = World::standby(&five_minutely());
    // The leader writes the fleet status at every tick: quiet.
    for i in 0..240 {
        let now = T0 + i * 5 * SEC;
        let other = LeaseSeen::HeldByOther {
            holder: Some("nas-1234".into()),
            status_at: Some(now - 3 * SEC),
        };
        let actions = w.core.on_lease(now, other);
        assert!(actions.is_empty(), "{actions:?}");
    }
    // Unreadable for 11 minutes: warned at 45 s, then every 5 minutes.
    let start = T0 + 20 * MIN;
    let mut warned = Vec::new();
    for i in 0..=132 {
        let now = start + i * 5 * SEC;
        for a in w.core.on_lease(
            now,
            LeaseSeen::HeldByOther {
                holder: None,
                status_at: None,
            },
        ) {
            if let Action::Leadership(LeaderChange::LongStandby { for_ms, .. }) = a {
                warned.push(for_ms / SEC);
            }
        }
    }
    assert_eq!(warned, [45, 345, 645]);
}

#[test]
fn a_lease_holder_that_writes_no_status_is_said_to_be_squatting() {
    let mut w = World::standby(&five_minutely());
    // The key names a holder, but nothing it writes shows it leads: the
    // status stopped at T0 (a daemon that hung), or was never there.
    let mut warned = Vec::new();
    for i in 0..=132 {
        let now = T0 + i * 5 * SEC;
        let squat = LeaseSeen::HeldByOther {
            holder: Some("squatter".into()),
            status_at: (i < 66).then_some(T0),
        };
        for a in w.core.on_lease(now, squat) {
            match a {
                Action::Leadership(LeaderChange::LongStandby {
                    for_ms,
                    holder,
                    why,
                }) => {
                    assert_eq!(holder.as_deref(), Some("squatter"));
                    assert!(why.contains("squatting"), "{why}");
                    warned.push(for_ms / SEC);
                }
                other => panic!("{other:?}"),
            }
        }
        assert!(w.tick(now).is_empty(), "standby dispatches nothing");
    }
    // Fresh for 45 s (quiet), then worried from 50 s: said 45 s later, then
    // every 5 minutes.
    assert_eq!(warned, [45, 345]);
}

// ---- watchdog ---------------------------------------------------------------------------

#[test]
fn offline_is_raised_once_per_outage_and_cleared_when_back() {
    let mut w = World::leader(&five_minutely());
    // Heartbeats every second; silent for more than three of them: offline.
    let last = T0 + 10 * SEC;
    let silent = [record("alpha", last, VERSION, Vec::new())];
    assert!(w.watch(last + 4 * SEC, &silent).is_empty(), "not yet");
    assert_eq!(
        w.watch(last + 5 * SEC, &silent),
        [("agent.offline", "alpha".to_owned())]
    );
    assert!(w.watch(last + 10 * SEC, &silent).is_empty(), "raised once");
    // Back: the alert is cleared.
    let back = T0 + MIN;
    assert!(w
        .watch(back, &[record("alpha", back, VERSION, Vec::new())])
        .is_empty());
    assert!(w.core.store().alert("offline/alpha").is_none(), "cleared");
    // A new outage is a new alert.
    let again = [record("alpha", back, VERSION, Vec::new())];
    assert_eq!(
        w.watch(back + 5 * SEC, &again),
        [("agent.offline", "alpha".to_owned())]
    );
    // A clean shutdown is the agent's own news.
    let mut shutdown = record("beta", back, VERSION, Vec::new());
    shutdown.heartbeat.state = AgentState::Offline;
    assert!(w.watch(back + MIN, &[shutdown]).is_empty());
}

#[test]
fn overdue_is_raised_once_and_cleared_by_a_success() {
    let text = format!(
        "{}rpo = \"10m\"\n",
        five_minutely().replace("\"alpha\", \"beta\"", "\"alpha\"")
    );
    let mut w = World::leader(&text);
    let alpha = [record("alpha", T0 + 10 * MIN, VERSION, Vec::new())];
    // Never backed up: overdue once the RPO has passed since the start.
    assert!(w.watch(T0 + 10 * MIN, &alpha).is_empty());
    let raised = w.core.on_tick(T0 + 10 * MIN + SEC, Some(&alpha));
    let overdue: Vec<&Action> = raised
        .iter()
        .filter(|a| {
            matches!(
                a,
                Action::Publish {
                    body: EventBody::BackupOverdue { .. },
                    ..
                }
            )
        })
        .collect();
    assert_eq!(overdue.len(), 1, "{raised:?}");
    let Action::Publish {
        body:
            EventBody::BackupOverdue {
                plan,
                last_success,
                rpo_secs,
            },
        ..
    } = overdue[0]
    else {
        unreachable!("filtered above");
    };
    assert_eq!(
        (plan.as_str(), *last_success, *rpo_secs),
        ("home", None, 600)
    );
    assert!(w.core.status(T0 + 11 * MIN).entries[0].overdue);
    assert!(
        published(&w.core.on_tick(T0 + 12 * MIN, Some(&alpha)))
            .iter()
            .all(|(k, _)| *k != "backup.overdue"),
        "raised once"
    );
    // A success clears it; the RPO counts from the success again.
    w.finish(T0 + 13 * MIN, "by-hand", "alpha", succeeded("s1"));
    assert!(w.core.store().alert("overdue/home/alpha").is_none());
    assert!(!w.core.status(T0 + 13 * MIN).entries[0].overdue);
    let fresh = [record("alpha", T0 + 23 * MIN, VERSION, Vec::new())];
    let quiet = published(&w.core.on_tick(T0 + 23 * MIN, Some(&fresh)));
    assert!(
        quiet.iter().all(|(k, _)| *k != "backup.overdue"),
        "{quiet:?}"
    );
    let late = [record(
        "alpha",
        T0 + 23 * MIN + 2 * SEC,
        VERSION,
        Vec::new(),
    )];
    let again = published(&w.core.on_tick(T0 + 23 * MIN + 2 * SEC, Some(&late)));
    assert!(
        again.contains(&("backup.overdue", "alpha".to_owned())),
        "{again:?}"
    );
}

#[test]
fn low_space_is_raised_once_and_cleared() {
    let mut w = World::leader(&five_minutely());
    let at = |now: u64, free: u64| [record("nas", now, VERSION, vec![storage_root(free, 1000)])];
    // 5 % by default: 49 of 1000 bytes free is low.
    assert!(w.watch(T0, &at(T0, 50)).is_empty());
    assert_eq!(
        w.watch(T0 + SEC, &at(T0 + SEC, 49)),
        [("storage.low_space", "nas".to_owned())]
    );
    assert!(
        w.watch(T0 + 2 * SEC, &at(T0 + 2 * SEC, 10)).is_empty(),
        "raised once"
    );
    assert!(w.watch(T0 + 3 * SEC, &at(T0 + 3 * SEC, 500)).is_empty());
    assert!(w.core.store().alerts.is_empty(), "cleared");
    assert_eq!(
        w.watch(T0 + 4 * SEC, &at(T0 + 4 * SEC, 1)),
        [("storage.low_space", "nas".to_owned())]
    );
}

#[test]
fn a_version_mismatch_is_raised_once_per_version() {
    let mut w = World::leader(&five_minutely());
    let on = |now: u64, v: &str| [record("alpha", now, v, Vec::new())];
    assert!(w.watch(T0, &on(T0, VERSION)).is_empty());
    assert_eq!(
        w.watch(T0 + SEC, &on(T0 + SEC, "0.9.0")),
        [("agent.version_mismatch", "alpha".to_owned())]
    );
    assert!(w.watch(T0 + 2 * SEC, &on(T0 + 2 * SEC, "0.9.0")).is_empty());
    assert_eq!(
        w.watch(T0 + 3 * SEC, &on(T0 + 3 * SEC, "0.9.1")),
        [("agent.version_mismatch", "alpha".to_owned())]
    );
    // Upgraded to match, then back to the old version: said again.
    assert!(w.watch(T0 + 4 * SEC, &on(T0 + 4 * SEC, VERSION)).is_empty());
    assert_eq!(
        w.watch(T0 + 5 * SEC, &on(T0 + 5 * SEC, "0.9.1")),
        [("agent.version_mismatch", "alpha".to_owned())]
    );
}

// ---- status ------------------------------------------------------------------------------

#[test]
fn status_shows_the_next_run_the_running_task_and_the_last_success() {
    let mut w = World::leader(&five_minutely());
    let status = w.core.status(T0 + MIN);
    assert_eq!(status.entries.len(), 2);
    assert_eq!(status.entries[0].next_run, Some(T0 + 5 * MIN));
    let sent = w.tick(T0 + 5 * MIN);
    w.finish(T0 + 6 * MIN, &sent[0].0, "alpha", succeeded("snap1"));
    let status = w.core.status(T0 + 6 * MIN);
    let (alpha, beta) = (&status.entries[0], &status.entries[1]);
    assert_eq!(
        (
            alpha.last_success,
            alpha.last_snapshot.clone(),
            alpha.running_task.clone()
        ),
        (Some(T0 + 6 * MIN), Some(snap("snap1")), None)
    );
    assert_eq!(beta.running_task.as_ref(), Some(&sent[1].0));
    assert_eq!(alpha.next_run, Some(T0 + 10 * MIN));
}

#[test]
fn a_job_ends_only_on_word_from_its_own_host() {
    let mut w = World::leader(&five_minutely());
    let sent = w.tick(T0 + 5 * MIN);
    let (task, host, _) = sent
        .iter()
        .find(|(_, h, _)| h.as_str() == "alpha")
        .expect("a backup of alpha")
        .clone();
    // nas refusing alpha's data-plane session names alpha's task under its
    // own host; alpha then reports the real outcome.
    let from_nas = event(
        "nas",
        T0 + 6 * MIN,
        EventBody::TaskRejected {
            task_id: Some(task.clone()),
            reason: RejectReason::Expired,
            detail: "expired".into(),
            subject: "x".into(),
        },
    );
    assert!(w.core.on_rejected(&from_nas).is_empty());
    assert!(w
        .finish(T0 + 6 * MIN, &task, "beta", failed(false))
        .is_empty());
    assert!(!w.core.follows(&task, &name("nas")));
    assert!(w.core.follows(&task, &host));
    assert_eq!(w.core.running_jobs(), 2, "both backups still out");
    let ended = w.finish(T0 + 7 * MIN, &task, host.as_str(), failed(false));
    let (kind, _) = job_ended(&ended);
    assert_eq!(kind, "job.failed");
    assert_eq!(w.core.running_jobs(), 1);
}

// ---- copies -----------------------------------------------------------------------

/// [`five_minutely`], each snapshot copied to offsite, where two per host are kept.
fn copied() -> String {
    format!(
        "{}copy_to = [\"offsite\"]\nkeep_copies.offsite = {{ last = 2 }}\ncopy_limit_upload = \"1M\"\n",
        five_minutely()
    )
}

fn copy_done(outcome: TaskOutcome, copied: &[&str]) -> Done {
    Done {
        outcome,
        retryable: false,
        result: Some(TaskResult::Copy(flotilla_protocol::CopyReport {
            to: "offsite".into(),
            copied: copied.iter().map(|s| snap(s)).collect(),
            snapshots_copied: copied.len() as u64,
            ..Default::default()
        })),
    }
}

fn copy_of(sent: &Sent) -> (&str, &str, Vec<SnapshotId>) {
    match &sent.2 {
        TaskSpec::Copy {
            to,
            hosts,
            snapshots,
            limit_bytes_per_sec,
        } => {
            assert_eq!(hosts, &[name("alpha"), name("beta")]);
            assert_eq!(*limit_bytes_per_sec, 1 << 20);
            (sent.1.as_str(), to.as_str(), snapshots.clone())
        }
        other => panic!("not a copy: {other:?}"),
    }
}

#[test]
fn a_copy_follows_each_backup_with_each_hosts_newest_snapshot() {
    let mut w = World::leader(&copied());
    let backups = w.tick(T0 + 5 * MIN);
    assert_eq!(hosts_of(&backups), ["alpha", "beta"]);
    // alpha's backup succeeds: a copy of its snapshot, run on nas.
    w.finish(T0 + 6 * MIN, &backups[0].0, "alpha", succeeded("a1"));
    let first = w.tick(T0 + 6 * MIN);
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(copy_of(&first[0]), ("nas", "offsite", vec![snap("a1")]));
    // beta's succeeds while that copy runs: another copy is queued, and
    // names both hosts' newest snapshots.
    w.finish(T0 + 7 * MIN, &backups[1].0, "beta", succeeded("b1"));
    let second = w.tick(T0 + 7 * MIN);
    assert_eq!(
        copy_of(&second[0]),
        ("nas", "offsite", vec![snap("a1"), snap("b1")])
    );
    // Only one copy waits at a time.
    w.finish(T0 + 8 * MIN, "by-hand", "alpha", succeeded("a2"));
    w.finish(T0 + 8 * MIN, "by-hand-2", "alpha", succeeded("a3"));
    assert_eq!(w.core.queued_jobs(), 1);

    // The first copy ends: its job event, alpha's copy recorded, and
    // offsite's own keep policy applied to alpha's copies there.
    let actions = w.finish(
        T0 + 9 * MIN,
        &first[0].0,
        "nas",
        copy_done(TaskOutcome::Succeeded, &["a1"]),
    );
    let (kind, ended) = job_ended(&actions);
    assert_eq!((kind, ended.job_kind.as_str()), ("job.succeeded", "copy"));
    let retention: Vec<&Action> = actions
        .iter()
        .filter(|a| matches!(a, Action::ApplyRetention { .. }))
        .collect();
    assert_eq!(
        retention,
        [&Action::ApplyRetention {
            plan: "home".into(),
            host: name("alpha"),
            storage: name("offsite"),
            keep: KeepPolicy {
                last: Some(2),
                ..Default::default()
            },
        }]
    );
    let recorded = w
        .core
        .store()
        .success("home>offsite", "alpha")
        .expect("recorded");
    assert_eq!(recorded.snapshot, Some(snap("a1")));
    // Copies stay out of the backup successes (metrics, status).
    assert!(w.core.successes().iter().all(|(plan, _, _)| plan == "home"));

    // A partial copy counts only what it committed.
    let actions = w.finish(
        T0 + 10 * MIN,
        &second[0].0,
        "nas",
        copy_done(TaskOutcome::Partial, &["b1"]),
    );
    assert_eq!(job_ended(&actions).0, "job.partial");
    assert_eq!(
        w.core
            .store()
            .success("home>offsite", "beta")
            .and_then(|s| s.snapshot),
        Some(snap("b1"))
    );
    assert_eq!(
        w.core
            .store()
            .success("home>offsite", "alpha")
            .and_then(|s| s.snapshot),
        Some(snap("a1"))
    );
}

#[test]
fn a_copy_schedule_copies_on_its_own_time_and_nothing_before_a_backup() {
    let text = copied().replace(
        "copy_to = [\"offsite\"]",
        "copy_to = [\"offsite\"]\ncopy_schedule = \"32 * * * *\"",
    );
    let mut w = World::leader(&text);
    let backups = w.tick(T0 + 5 * MIN);
    w.finish(T0 + 6 * MIN, &backups[0].0, "alpha", succeeded("a1"));
    w.finish(T0 + 6 * MIN, &backups[1].0, "beta", failed(false));
    // No copy after the backup: the schedule says when.
    assert!(w
        .tick(T0 + 7 * MIN)
        .iter()
        .all(|s| !matches!(s.2, TaskSpec::Copy { .. })));
    // The half hour's backups go first (and fail, leaving a1 the newest).
    let backups = w.tick(T0 + 31 * MIN);
    assert!(backups
        .iter()
        .all(|s| !matches!(s.2, TaskSpec::Copy { .. })));
    for (task, host, _) in &backups {
        w.finish(T0 + 31 * MIN, task, host.as_str(), failed(false));
    }
    let at_the_hour = w.tick(T0 + 32 * MIN);
    let copies: Vec<&Sent> = at_the_hour
        .iter()
        .filter(|s| matches!(s.2, TaskSpec::Copy { .. }))
        .collect();
    assert_eq!(copies.len(), 1, "{at_the_hour:?}");
    assert_eq!(copy_of(copies[0]), ("nas", "offsite", vec![snap("a1")]));

    // With no backup recorded, a scheduled copy has nothing to send.
    let mut w = World::leader(&text);
    for (task, host, _) in &w.tick(T0 + 31 * MIN) {
        w.finish(T0 + 31 * MIN, task, host.as_str(), failed(false));
    }
    let sent = w.tick(T0 + 32 * MIN);
    assert!(
        sent.iter().all(|s| !matches!(s.2, TaskSpec::Copy { .. })),
        "{sent:?}"
    );
    assert_eq!(w.core.queued_jobs(), 0, "dropped, not waiting");
}

#[test]
fn copy_overdue_is_raised_per_destination_and_cleared_by_a_copy() {
    let text = format!(
        "{}rpo = \"10m\"\ncopy_to = [\"offsite\"]\n",
        five_minutely().replace("\"alpha\", \"beta\"", "\"alpha\"")
    );
    let mut w = World::leader(&text);
    let alpha = [record("alpha", T0 + 11 * MIN, VERSION, Vec::new())];
    let raised = w.core.on_tick(T0 + 11 * MIN, Some(&alpha));
    let copy_overdue: Vec<&EventBody> = raised
        .iter()
        .filter_map(|a| match a {
            Action::Publish {
                body: b @ EventBody::CopyOverdue { .. },
                ..
            } => Some(b),
            _ => None,
        })
        .collect();
    assert_eq!(
        copy_overdue,
        [&EventBody::CopyOverdue {
            plan: "home".into(),
            storage: "offsite".into(),
            last_copied: None,
            rpo_secs: 600,
        }]
    );
    assert!(
        published(&w.core.on_tick(T0 + 12 * MIN, Some(&alpha)))
            .iter()
            .all(|(k, _)| *k != "copy.overdue"),
        "raised once"
    );
    // A backup, then its copy: cleared, and counted from that backup.
    w.finish(T0 + 16 * MIN, "by-hand", "alpha", succeeded("a1"));
    let sent = w.tick(T0 + 16 * MIN);
    let copy: Vec<&Sent> = sent
        .iter()
        .filter(|s| matches!(s.2, TaskSpec::Copy { .. }))
        .collect();
    assert_eq!(copy.len(), 1, "{sent:?}");
    w.finish(
        T0 + 17 * MIN,
        &copy[0].0,
        "nas",
        copy_done(TaskOutcome::Succeeded, &["a1"]),
    );
    assert!(w
        .core
        .store()
        .alert("copy_overdue/home/offsite/alpha")
        .is_none());
    let fresh = [record("alpha", T0 + 20 * MIN, VERSION, Vec::new())];
    let quiet = published(&w.core.on_tick(T0 + 20 * MIN, Some(&fresh)));
    assert!(quiet.iter().all(|(k, _)| *k != "copy.overdue"), "{quiet:?}");
    // A failed copy clears nothing: overdue again once the RPO passes.
    let later = [record("alpha", T0 + 27 * MIN, VERSION, Vec::new())];
    let again = published(&w.core.on_tick(T0 + 27 * MIN, Some(&later)));
    assert!(
        again.contains(&("copy.overdue", "alpha".to_owned())),
        "{again:?}"
    );
}
