//! The daemon's decisions, with no I/O: what runs when, what is retried, which
//! event a job's end raises, who leads. The driver ([`super::driver`]) feeds it
//! inputs with the time they happened at (`now`, unix ms) and performs the
//! [`Action`]s it returns; the tests drive it with a virtual clock.
//!
//! Inputs: [`Core::on_lease`] (what the lease said this tick),
//! [`Core::on_tick`] (schedules, plan timeouts, the queue, the watchdog),
//! [`Core::on_dispatched`] (a task was sent, or could not be),
//! [`Core::on_finished`] and [`Core::on_rejected`] (task outcomes from the
//! event stream). Its durable state (last runs, successes, raised alerts) goes
//! through the [`Store`] trait; the queue and the jobs it follows live in
//! memory.
//!
//! Invariants: only the leader schedules, dispatches, cancels, raises
//! watchdog events and applies retention; a job (kind, plan, host) is never
//! queued twice while one is queued, being sent or running; at most
//! `max_per_storage` jobs per storage host are out at once; a job whose
//! plan has a `timeout` is out at most that long (then its task is sent a
//! `cancel` and the job counts as failed, retryable), so a lost outcome
//! cannot hold a storage host's slot for good.

use std::collections::{BTreeMap, HashMap, VecDeque};

use chrono::{DateTime, TimeZone};
use flotilla_protocol::status::{FleetStatus, PlanHostStatus, STATUS_VERSION};
use flotilla_protocol::{
    BackupReport, Event, EventBody, HostName, JobEnded, Severity, SnapshotId, TaskId, TaskOutcome,
    TaskResult,
};
use tracing::{info, warn};

use super::lease::{LeaseSeen, LEASE_TTL};
use super::state::{Store, Success};
use super::watchdog::{self, copy_overdue_key, overdue_key, Alert, Watch};
use crate::config::Config;
use crate::nats::HostRecord;
use crate::retention::KeepPolicy;
use crate::scheduler::{due, Cron, Due};

/// Standing by this long while the lease cannot be read, or its holder not
/// named, is worth a warning: three lease lifetimes.
pub const STANDBY_WARN_MS: u64 = 3 * LEASE_TTL.as_millis() as u64;
/// How often that warning repeats while it stays so.
pub const STANDBY_WARN_EVERY_MS: u64 = 5 * 60 * 1000;
/// Retry delays double at most this many times.
const MAX_DOUBLINGS: u32 = 10;

/// What a job does, and for which plan (an index into `Config::plan`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    /// Back up one host of the plan.
    Backup {
        /// The plan.
        plan: usize,
    },
    /// Check the plan's storage.
    Check {
        /// Re-read every byte.
        read_data: bool,
        /// The plan.
        plan: usize,
    },
    /// Prune the plan's storage.
    Prune {
        /// The plan.
        plan: usize,
    },
    /// Copy the newest snapshot of each of the plan's hosts from its
    /// storage to `copy_to[dest]`.
    Copy {
        /// The plan.
        plan: usize,
        /// Index into the plan's `copy_to`.
        dest: usize,
    },
}

impl JobKind {
    /// The task kind it dispatches, as in events.
    pub fn name(&self) -> &'static str {
        match self {
            JobKind::Backup { .. } => "backup",
            JobKind::Check { .. } => "check",
            JobKind::Prune { .. } => "prune",
            JobKind::Copy { .. } => "copy",
        }
    }

    /// The plan it belongs to.
    pub fn plan(&self) -> usize {
        match self {
            JobKind::Backup { plan }
            | JobKind::Check { plan, .. }
            | JobKind::Prune { plan }
            | JobKind::Copy { plan, .. } => *plan,
        }
    }
}

/// A job: queued, being sent, or running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    /// What it does.
    pub kind: JobKind,
    /// Where its task runs.
    pub host: HostName,
    /// The storage host it uses (counted against its limit).
    pub storage: HostName,
    /// 1 for the first try.
    pub attempt: u32,
    /// Not sent before this time (unix ms): retries wait.
    pub not_before: u64,
    /// While running: when it times out (the plan's `timeout` after it was
    /// sent), is sent a `cancel` and counts as failed.
    pub deadline: Option<u64>,
    /// A copy, once sent: the snapshots its task names (each host's newest
    /// backup then), recorded as copied when it succeeds.
    pub copying: Vec<Copying>,
}

/// One snapshot a copy job's task names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copying {
    /// Whose snapshot.
    pub host: HostName,
    /// Its id.
    pub snapshot: SnapshotId,
    /// When its backup succeeded (what the destination's RPO is counted from).
    pub time: u64,
}

impl Job {
    /// A first attempt of `kind` on `host`, counted against `storage`, due at `now`.
    fn new(kind: JobKind, host: HostName, storage: &HostName, now: u64) -> Job {
        Job {
            kind,
            host,
            storage: storage.clone(),
            attempt: 1,
            not_before: now,
            deadline: None,
            copying: Vec::new(),
        }
    }
}

/// Names a job between [`Action::Dispatch`] and [`Core::on_dispatched`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct JobId(u64);

/// The task to send for a job; the driver adds what only the bus knows (the
/// storage host's address) and signs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskSpec {
    /// A backup into `storage`.
    Backup {
        /// Storage host.
        storage: HostName,
        /// Paths (empty: all backup roots).
        paths: Vec<String>,
        /// Exclude globs.
        excludes: Vec<String>,
        /// Back up paths that are empty now but held files before.
        allow_empty: bool,
    },
    /// A repository check.
    Check {
        /// Re-read every byte.
        read_data: bool,
    },
    /// A prune.
    Prune {
        /// Unreferenced data younger than this survives.
        grace_secs: u64,
    },
    /// A copy of `snapshots` (of `hosts`) to the storage host `to`.
    Copy {
        /// The destination storage host.
        to: HostName,
        /// The plan's hosts.
        hosts: Vec<HostName>,
        /// The snapshots to copy.
        snapshots: Vec<SnapshotId>,
        /// Most bytes per second; 0: no limit.
        limit_bytes_per_sec: u64,
    },
}

/// A change of leadership worth telling the operator about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaderChange {
    /// This daemon leads now; `after_ms` is how long it stood by (`None` at
    /// start).
    Acquired {
        /// Time on standby before.
        after_ms: Option<u64>,
    },
    /// This daemon no longer leads.
    Lost {
        /// Why.
        why: String,
    },
    /// Standing by for `for_ms` while nobody can be seen leading.
    LongStandby {
        /// Time on standby.
        for_ms: u64,
        /// Who holds the lease, if it can be read.
        holder: Option<String>,
        /// Why the lease is not ours.
        why: String,
    },
}

/// What the driver is to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Sign and send `task` to `host`, then report with [`Core::on_dispatched`].
    Dispatch {
        /// The job.
        job: JobId,
        /// Where.
        host: HostName,
        /// What.
        task: TaskSpec,
    },
    /// Publish an event the coordinator raises.
    Publish {
        /// The host it is about.
        host: HostName,
        /// How bad.
        severity: Severity,
        /// One line for people.
        message: String,
        /// The event.
        body: EventBody,
    },
    /// Forget what `keep` no longer keeps of `host`'s snapshots on `storage`.
    ApplyRetention {
        /// The plan.
        plan: String,
        /// Whose snapshots.
        host: HostName,
        /// Where.
        storage: HostName,
        /// The plan's keep policy (never empty).
        keep: KeepPolicy,
    },
    /// A backup of `plan` started (healthchecks' `/start`).
    JobStarted {
        /// The plan.
        plan: String,
    },
    /// Leadership changed, or standing by has lasted.
    Leadership(LeaderChange),
    /// Send `task_id` on `host` a signed `cancel`: its job timed out.
    Cancel {
        /// Where it runs.
        host: HostName,
        /// The task.
        task_id: TaskId,
    },
}

impl From<Alert> for Action {
    fn from(a: Alert) -> Action {
        Action::Publish {
            host: a.host,
            severity: a.severity,
            message: a.message,
            body: a.body,
        }
    }
}

/// The daemon's state and decisions. `S` keeps what survives a restart, `Tz`
/// is the zone schedules are read in (local time in the daemon).
#[derive(Debug)]
pub struct Core<S, Tz: TimeZone> {
    config: Config,
    store: S,
    zone: Tz,
    version: String,
    started: u64,
    queue: VecDeque<Job>,
    sending: BTreeMap<JobId, Job>,
    running: HashMap<TaskId, Job>,
    next_job: u64,
    leader: bool,
    /// Since when this daemon stands by.
    standby_since: Option<u64>,
    /// Since when the lease cannot be read or nobody can be seen holding it.
    worry_since: Option<u64>,
    /// When that was last warned about.
    warned_at: Option<u64>,
}

/// The key of a scheduled job's last run in the store.
fn run_key(plan: &str, what: &str) -> String {
    format!("{plan}/{what}")
}

/// The store's name for the copies of `plan` at `dest`: where their
/// successes are kept, per host, beside the plan's own. Plan names cannot
/// hold `>`, so it is never a plan's.
pub(super) fn copy_plan_key(plan: &str, dest: &HostName) -> String {
    format!("{plan}>{dest}")
}

/// The schedules of one plan: store key, cron, job kind.
fn schedules(config: &Config, i: usize) -> Vec<(String, Option<&Cron>, JobKind)> {
    let plan = &config.plan[i];
    let copies = plan.copy_to.iter().enumerate().map(|(dest, to)| {
        (
            format!("copy>{to}"),
            plan.copy_schedule.as_ref(),
            JobKind::Copy { plan: i, dest },
        )
    });
    [
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
    ]
    .map(|(what, cron, kind)| (what.to_owned(), cron, kind))
    .into_iter()
    .chain(copies)
    .collect()
}

impl<S: Store, Tz: TimeZone> Core<S, Tz> {
    /// A core for `config` started at `now`. Schedules seen for the first
    /// time are armed at `now`: a new plan waits for its first scheduled time
    /// instead of running at once.
    pub fn new(
        config: Config,
        mut store: S,
        zone: Tz,
        version: impl Into<String>,
        now: u64,
    ) -> Self {
        for i in 0..config.plan.len() {
            for (what, _, _) in schedules(&config, i) {
                let key = run_key(&config.plan[i].name, &what);
                if matches!(store.last_run(&key), Ok(None)) {
                    if let Err(e) = store.set_last_run(&key, now) {
                        warn!(%key, error = %e, "cannot arm the schedule");
                    }
                }
            }
        }
        Self {
            config,
            store,
            zone,
            version: version.into(),
            started: now,
            queue: VecDeque::new(),
            sending: BTreeMap::new(),
            running: HashMap::new(),
            next_job: 0,
            leader: false,
            standby_since: None,
            worry_since: None,
            warned_at: None,
        }
    }

    /// Its durable state.
    #[cfg(test)]
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Whether this daemon holds the lease (as last seen).
    pub fn is_leader(&self) -> bool {
        self.leader
    }

    /// Jobs whose task is out.
    pub fn running_jobs(&self) -> usize {
        self.running.len()
    }

    /// Takes the running job `id` if it was sent to `from`: a job's end is
    /// believed only from its own host (a storage host refusing a source's
    /// data-plane session reports the source's task id under its own name,
    /// and the source then reports the real, perhaps retryable, outcome).
    fn take_job(&mut self, id: &TaskId, from: &HostName) -> Option<Job> {
        self.running.get(id).filter(|j| &j.host == from)?;
        self.running.remove(id)
    }

    /// Whether `id` is a running job of `host` (outcomes read back from the
    /// event stream are handed in only then).
    pub fn follows(&self, id: &TaskId, host: &HostName) -> bool {
        self.running.get(id).is_some_and(|j| &j.host == host)
    }

    /// The tasks of the jobs that are out, with their hosts.
    pub fn running_tasks(&self) -> Vec<(TaskId, HostName)> {
        self.running
            .iter()
            .map(|(id, j)| (id.clone(), j.host.clone()))
            .collect()
    }

    /// Jobs waiting for a slot or a retry.
    #[cfg(test)]
    pub fn queued_jobs(&self) -> usize {
        self.queue.len()
    }

    /// Every recorded backup success: `(plan, host, success)` (copies are
    /// recorded beside them under their own names, left out here).
    pub fn successes(&self) -> Vec<(String, String, Success)> {
        let mut all = self.store.successes();
        all.retain(|(plan, _, _)| !plan.contains('>'));
        all
    }

    // ---- leadership ---------------------------------------------------------

    /// Takes in what the lease said at `now`.
    pub fn on_lease(&mut self, now: u64, seen: LeaseSeen) -> Vec<Action> {
        let mut out = Vec::new();
        let mut holder_seen = None;
        let worry = match seen {
            LeaseSeen::Held => {
                if !self.leader {
                    self.leader = true;
                    let after_ms = self.standby_since.map(|s| now.saturating_sub(s));
                    out.push(Action::Leadership(LeaderChange::Acquired { after_ms }));
                }
                self.standby_since = None;
                self.worry_since = None;
                self.warned_at = None;
                return out;
            }
            // Another daemon leads: standing by is what this one is for, as
            // long as the holder shows it leads (the fleet status it writes
            // at every tick is fresh).
            LeaseSeen::HeldByOther {
                holder: Some(holder),
                status_at,
            } => {
                if self.leader {
                    out.push(Action::Leadership(LeaderChange::Lost {
                        why: format!("{holder} holds the lease"),
                    }));
                }
                holder_seen = Some(holder.clone());
                match status_at {
                    Some(at) if now.saturating_sub(at) <= STANDBY_WARN_MS => None,
                    Some(at) => Some(format!(
                        "{holder} holds the lease but has written no fleet status for {} s (a daemon that hangs, or someone squatting the lease key)",
                        now.saturating_sub(at) / 1000
                    )),
                    None => Some(format!(
                        "{holder} holds the lease but no fleet status can be read (a daemon that hangs, or someone squatting the lease key)"
                    )),
                }
            }
            LeaseSeen::HeldByOther { holder: None, .. } => {
                Some("the lease is held, but its holder cannot be read".to_owned())
            }
            LeaseSeen::Failed { why } => Some(why),
        };
        if let (Some(why), true) = (&worry, self.leader) {
            out.push(Action::Leadership(LeaderChange::Lost { why: why.clone() }));
        }
        self.leader = false;
        self.standby_since.get_or_insert(now);
        let Some(why) = worry else {
            self.worry_since = None;
            self.warned_at = None;
            return out;
        };
        // Nobody can be seen leading: said after a while, then now and then,
        // so a daemon that stands by for good is noticed.
        let since = *self.worry_since.get_or_insert(now);
        let for_ms = now.saturating_sub(since);
        let again = self
            .warned_at
            .is_none_or(|w| now.saturating_sub(w) >= STANDBY_WARN_EVERY_MS);
        if for_ms >= STANDBY_WARN_MS && again {
            self.warned_at = Some(now);
            out.push(Action::Leadership(LeaderChange::LongStandby {
                for_ms,
                holder: holder_seen,
                why,
            }));
        }
        out
    }

    // ---- the tick -------------------------------------------------------------

    /// Schedules, sends what may go, and watches the fleet (`hosts`: the
    /// registry, or `None` when it cannot be read). Only the leader acts.
    pub fn on_tick(&mut self, now: u64, hosts: Option<&[HostRecord]>) -> Vec<Action> {
        if !self.leader {
            return Vec::new();
        }
        self.schedule(now);
        let mut out = self.expire(now);
        out.extend(self.dispatch_due(now));
        if let Some(hosts) = hosts {
            let watch = Watch {
                config: &self.config,
                version: &self.version,
                started: self.started,
            };
            let alerts = watchdog::check(&mut self.store, &watch, now, hosts);
            out.extend(alerts.into_iter().map(Action::from));
        }
        out
    }

    fn at(&self, ms: u64) -> Option<DateTime<Tz>> {
        self.zone
            .timestamp_millis_opt(i64::try_from(ms).ok()?)
            .single()
    }

    /// Whether `cron` is due at `now` after a run at `last`.
    fn due(&self, cron: &Cron, jitter: chrono::Duration, last: u64, now: u64) -> Option<Due<Tz>> {
        Some(due(cron, jitter, &self.at(last)?, &self.at(now)?))
    }

    /// Queues the jobs whose time has come: each schedule once, however many
    /// of its times were missed.
    fn schedule(&mut self, now: u64) {
        let mut due_jobs = Vec::new();
        for (i, plan) in self.config.plan.iter().enumerate() {
            for (what, cron, kind) in schedules(&self.config, i) {
                let Some(cron) = cron else { continue };
                let key = run_key(&plan.name, &what);
                let last = match self.store.last_run(&key) {
                    Ok(last) => last.unwrap_or(now),
                    Err(e) => {
                        warn!(%key, error = %e, "cannot read when the schedule last ran");
                        continue;
                    }
                };
                let Some(Due::Now { missed, .. }) = self.due(cron, plan.jitter_shift(), last, now)
                else {
                    continue;
                };
                info!(plan = %plan.name, job = what, missed, "plan due");
                if let Err(e) = self.store.set_last_run(&key, now) {
                    warn!(%key, error = %e, "cannot record the run; it may run again");
                }
                let hosts = match kind {
                    JobKind::Backup { .. } => plan.hosts.clone(),
                    JobKind::Check { .. } | JobKind::Prune { .. } | JobKind::Copy { .. } => {
                        vec![plan.to.clone()]
                    }
                };
                due_jobs.extend(
                    hosts
                        .into_iter()
                        .map(|host| Job::new(kind, host, &plan.to, now)),
                );
            }
        }
        for job in due_jobs {
            self.enqueue(job);
        }
    }

    /// Queues a job unless the same one is queued, being sent or running.
    /// A copy is queued even while the same copy runs: its snapshots are
    /// chosen when it is sent, so one queued behind a running one takes the
    /// backups that succeeded meanwhile.
    fn enqueue(&mut self, job: Job) {
        let same = |o: &Job| o.kind == job.kind && o.host == job.host;
        let out_already = !matches!(job.kind, JobKind::Copy { .. })
            && (self.sending.values().any(same) || self.running.values().any(same));
        if self.queue.iter().any(same) || out_already {
            info!(host = %job.host, job = job.kind.name(), "job already queued or running; not queued again");
            return;
        }
        self.queue.push_back(job);
    }

    /// Jobs out on `storage`: running or being sent.
    fn busy(&self, storage: &HostName) -> usize {
        self.running
            .values()
            .chain(self.sending.values())
            .filter(|j| &j.storage == storage)
            .count()
    }

    /// Sends the queued jobs that may go: their time has come and their
    /// storage host is under its limit. The rest keep their order.
    fn dispatch_due(&mut self, now: u64) -> Vec<Action> {
        let max = self.config.serve.max_per_storage;
        let mut out = Vec::new();
        let mut kept = VecDeque::new();
        while let Some(mut job) = self.queue.pop_front() {
            if job.not_before > now || self.busy(&job.storage) >= max {
                kept.push_back(job);
                continue;
            }
            let Some((task, copying)) = self.task_of(&job) else {
                info!(host = %job.host, job = job.kind.name(), "nothing to copy yet (no backup of the plan recorded); job dropped");
                continue;
            };
            job.copying = copying;
            let id = JobId(self.next_job);
            self.next_job += 1;
            out.push(Action::Dispatch {
                job: id,
                host: job.host.clone(),
                task,
            });
            self.sending.insert(id, job);
        }
        self.queue = kept;
        out
    }

    /// The task a job sends now, and for a copy the snapshots it names
    /// (each host's newest recorded backup of the plan); `None` for a copy
    /// with nothing recorded to copy.
    fn task_of(&self, job: &Job) -> Option<(TaskSpec, Vec<Copying>)> {
        let plan = &self.config.plan[job.kind.plan()];
        let task = match job.kind {
            JobKind::Backup { .. } => TaskSpec::Backup {
                storage: job.storage.clone(),
                paths: plan.paths.clone(),
                excludes: plan.exclude.clone(),
                allow_empty: plan.allow_empty,
            },
            JobKind::Check { read_data, .. } => TaskSpec::Check { read_data },
            JobKind::Prune { .. } => TaskSpec::Prune {
                grace_secs: self.config.serve.prune_grace.as_secs(),
            },
            JobKind::Copy { dest, .. } => {
                let copying: Vec<Copying> = plan
                    .hosts
                    .iter()
                    .filter_map(|host| {
                        let s = self.store.success(&plan.name, host.as_str())?;
                        Some(Copying {
                            host: host.clone(),
                            snapshot: s.snapshot?,
                            time: s.time,
                        })
                    })
                    .collect();
                if copying.is_empty() {
                    return None;
                }
                let task = TaskSpec::Copy {
                    to: plan.copy_to[dest].clone(),
                    hosts: plan.hosts.clone(),
                    snapshots: copying.iter().map(|c| c.snapshot.clone()).collect(),
                    limit_bytes_per_sec: plan.copy_limit_upload,
                };
                return Some((task, copying));
            }
        };
        Some((task, Vec::new()))
    }

    /// The delay before attempt `attempt + 1`: the configured backoff,
    /// doubled per attempt already made.
    fn backoff_ms(&self, attempt: u32) -> u64 {
        let base = u64::try_from(self.config.serve.retry_backoff.as_millis()).unwrap_or(u64::MAX);
        base.saturating_mul(1 << attempt.saturating_sub(1).min(MAX_DOUBLINGS))
    }

    /// The driver sent the job's task (its id), or could not (the error,
    /// only logged): a job that could not be sent waits its backoff and goes
    /// again, its attempt not counted.
    pub fn on_dispatched<E: std::fmt::Display>(
        &mut self,
        job: JobId,
        sent: Result<TaskId, E>,
        now: u64,
    ) -> Vec<Action> {
        let Some(mut j) = self.sending.remove(&job) else {
            return Vec::new();
        };
        match sent {
            Ok(task_id) => {
                info!(host = %j.host, task = %task_id, attempt = j.attempt, "job dispatched");
                j.deadline = self.config.plan[j.kind.plan()]
                    .timeout
                    .map(|t| now.saturating_add(u64::try_from(t.as_millis()).unwrap_or(u64::MAX)));
                let started = match j.kind {
                    JobKind::Backup { plan } => vec![Action::JobStarted {
                        plan: self.config.plan[plan].name.clone(),
                    }],
                    JobKind::Check { .. } | JobKind::Prune { .. } | JobKind::Copy { .. } => {
                        Vec::new()
                    }
                };
                self.running.insert(task_id, j);
                started
            }
            Err(why) => {
                warn!(host = %j.host, error = %why, "cannot dispatch job; retrying later");
                j.not_before = now.saturating_add(self.backoff_ms(j.attempt));
                self.queue.push_back(j);
                Vec::new()
            }
        }
    }

    // ---- outcomes -------------------------------------------------------------

    /// A `task.finished` event. Any successful backup counts for every plan
    /// it satisfies (same host, same storage), whoever started it; the end of
    /// a job this daemon follows raises its `job.*` event or a retry.
    pub fn on_finished(&mut self, now: u64, ev: &Event) -> Vec<Action> {
        let EventBody::TaskFinished(done) = &ev.body else {
            return Vec::new();
        };
        let mut out = Vec::new();
        if let (Some(TaskResult::Backup(r)), TaskOutcome::Succeeded | TaskOutcome::Partial) =
            (&done.result, done.outcome)
        {
            out.extend(self.backup_succeeded(&ev.host, r, ev.time, done.duration_ms));
        }
        let Some(job) = self.take_job(&done.task_id, &ev.host) else {
            return out;
        };
        let plan = self.config.plan[job.kind.plan()].name.clone();
        let job_kind = job.kind.name();
        let snapshot = match &done.result {
            Some(TaskResult::Backup(r)) => Some(r.snapshot.clone()),
            _ => None,
        };
        let ended = JobEnded {
            task_id: done.task_id.clone(),
            job_kind: job_kind.into(),
            plan: Some(plan.clone()),
            attempts: job.attempt,
            error: done.error.clone(),
            snapshot,
        };
        if let (JobKind::Copy { dest, .. }, Some(TaskResult::Copy(r))) = (job.kind, &done.result) {
            out.extend(self.copied(&job, dest, done.outcome, r));
        }
        let host = job.host.clone();
        let (severity, message, body) = match done.outcome {
            TaskOutcome::Cancelled => (
                Severity::Warning,
                format!("{job_kind} job of plan {plan} on {host} was cancelled"),
                EventBody::JobCancelled(ended),
            ),
            TaskOutcome::Succeeded => (
                Severity::Info,
                format!("{job_kind} job of plan {plan} on {host} succeeded"),
                EventBody::JobSucceeded(ended),
            ),
            TaskOutcome::Partial => (
                Severity::Warning,
                format!("{job_kind} job of plan {plan} on {host} finished with skipped files"),
                EventBody::JobPartial(ended),
            ),
            TaskOutcome::Failed => {
                let error = done.error.clone().unwrap_or_default();
                out.extend(self.failed(job, ended, error, done.retryable, now));
                return out;
            }
        };
        out.push(Action::Publish {
            host,
            severity,
            message,
            body,
        });
        out
    }

    /// A job that failed (`ended` says how): queued again after its backoff
    /// when `retryable` and attempts are left, else its `job.failed` event.
    fn failed(
        &mut self,
        job: Job,
        ended: JobEnded,
        error: String,
        retryable: bool,
        now: u64,
    ) -> Option<Action> {
        if retryable && job.attempt < self.config.serve.retries {
            let mut again = job;
            again.not_before = now.saturating_add(self.backoff_ms(again.attempt));
            again.attempt += 1;
            again.deadline = None;
            info!(host = %again.host, attempt = again.attempt, "retryable failure; job queued again");
            self.queue.push_back(again);
            return None;
        }
        let plan = &self.config.plan[job.kind.plan()].name;
        Some(Action::Publish {
            message: format!(
                "{} job of plan {plan} on {} failed after {} attempt(s): {error}",
                job.kind.name(),
                job.host,
                job.attempt,
            ),
            host: job.host,
            severity: Severity::Error,
            body: EventBody::JobFailed(ended),
        })
    }

    /// The running jobs whose plan's `timeout` has passed at `now`: each
    /// task is sent a `cancel`, and the job counts as failed with a
    /// retryable error (its late result, if any, is then ignored).
    fn expire(&mut self, now: u64) -> Vec<Action> {
        let expired: Vec<TaskId> = self
            .running
            .iter()
            .filter(|(_, j)| j.deadline.is_some_and(|d| now >= d))
            .map(|(id, _)| id.clone())
            .collect();
        let mut out = Vec::new();
        for task_id in expired {
            let Some(job) = self.running.remove(&task_id) else {
                continue;
            };
            let plan = &self.config.plan[job.kind.plan()];
            let after = plan
                .timeout
                .map(|t| humantime::format_duration(t).to_string())
                .unwrap_or_default();
            let error =
                format!("timed out after {after} (the plan's timeout) and was sent a cancel");
            warn!(host = %job.host, task = %task_id, plan = %plan.name, "job timed out; cancelling it");
            let ended = JobEnded {
                task_id: task_id.clone(),
                job_kind: job.kind.name().into(),
                plan: Some(plan.name.clone()),
                attempts: job.attempt,
                error: Some(error.clone()),
                snapshot: None,
            };
            out.push(Action::Cancel {
                host: job.host.clone(),
                task_id,
            });
            out.extend(self.failed(job, ended, error, true, now));
        }
        out
    }

    /// Records a successful backup of `host` for every plan it satisfies,
    /// clears their overdue alerts and, when leading, applies their keep
    /// policies.
    fn backup_succeeded(
        &mut self,
        host: &HostName,
        report: &BackupReport,
        time: u64,
        duration_ms: u64,
    ) -> Vec<Action> {
        let mut out = Vec::new();
        let plans = self
            .config
            .plan
            .iter()
            .filter(|p| p.to.as_str() == report.storage && p.hosts.contains(host));
        for plan in plans {
            let s = Success {
                v: 1,
                time,
                snapshot: Some(report.snapshot.clone()),
                bytes_added: report.summary.bytes_added,
                duration_ms,
            };
            if let Err(e) = self.store.set_success(&plan.name, host.as_str(), &s) {
                warn!(error = %e, "cannot record success");
            }
            if let Err(e) = self.store.clear_alert(&overdue_key(&plan.name, host)) {
                warn!(error = %e, "cannot clear the overdue alert");
            }
            if self.leader && !plan.keep.is_empty() {
                out.push(Action::ApplyRetention {
                    plan: plan.name.clone(),
                    host: host.clone(),
                    storage: plan.to.clone(),
                    keep: plan.keep.clone(),
                });
            }
        }
        // Copies that follow every backup (no `copy_schedule`).
        let follow: Vec<Job> = self
            .config
            .plan
            .iter()
            .enumerate()
            .filter(|(_, p)| {
                p.to.as_str() == report.storage
                    && p.hosts.contains(host)
                    && p.copy_schedule.is_none()
            })
            .flat_map(|(i, p)| (0..p.copy_to.len()).map(move |dest| (i, dest, p.to.clone())))
            .map(|(plan, dest, to)| Job::new(JobKind::Copy { plan, dest }, to.clone(), &to, time))
            .collect();
        if self.leader {
            for job in follow {
                self.enqueue(job);
            }
        }
        out
    }

    /// A copy job ended with `outcome` and `report`: each snapshot it named
    /// that is now at the destination counts as that host's newest copy
    /// there (clearing its `copy.overdue`), and the destination's keep
    /// policy, if the plan has one, is applied to that host's copies.
    fn copied(
        &mut self,
        job: &Job,
        dest: usize,
        outcome: TaskOutcome,
        report: &flotilla_protocol::CopyReport,
    ) -> Vec<Action> {
        let plan = &self.config.plan[job.kind.plan()];
        let to = &plan.copy_to[dest];
        let key = copy_plan_key(&plan.name, to);
        let mut out = Vec::new();
        for c in &job.copying {
            // A partial copy names what it committed; what was already
            // there is not told apart from what failed, so only a copy that
            // succeeded whole counts for every snapshot it named.
            let there = match outcome {
                TaskOutcome::Succeeded => true,
                TaskOutcome::Partial => report.copied.contains(&c.snapshot),
                TaskOutcome::Failed | TaskOutcome::Cancelled => false,
            };
            if !there {
                continue;
            }
            let newer = self
                .store
                .success(&key, c.host.as_str())
                .is_none_or(|s| s.time <= c.time);
            if newer {
                let s = Success {
                    v: 1,
                    time: c.time,
                    snapshot: Some(c.snapshot.clone()),
                    bytes_added: 0,
                    duration_ms: 0,
                };
                if let Err(e) = self.store.set_success(&key, c.host.as_str(), &s) {
                    warn!(error = %e, "cannot record the copy");
                }
                if let Err(e) = self
                    .store
                    .clear_alert(&copy_overdue_key(&plan.name, to, &c.host))
                {
                    warn!(error = %e, "cannot clear the copy's overdue alert");
                }
            }
            if let Some(keep) = plan.keep_copies.get(to).filter(|k| !k.is_empty()) {
                out.push(Action::ApplyRetention {
                    plan: plan.name.clone(),
                    host: c.host.clone(),
                    storage: to.clone(),
                    keep: keep.clone(),
                });
            }
        }
        out
    }

    /// A `security.task_rejected` event: a job's task was refused, which no
    /// retry fixes.
    pub fn on_rejected(&mut self, ev: &Event) -> Vec<Action> {
        let EventBody::TaskRejected {
            task_id: Some(id),
            detail,
            ..
        } = &ev.body
        else {
            return Vec::new();
        };
        let Some(job) = self.take_job(id, &ev.host) else {
            return Vec::new();
        };
        let plan = self.config.plan[job.kind.plan()].name.clone();
        let ended = JobEnded {
            task_id: id.clone(),
            job_kind: job.kind.name().into(),
            plan: Some(plan.clone()),
            attempts: job.attempt,
            error: Some(detail.clone()),
            snapshot: None,
        };
        vec![Action::Publish {
            message: format!("job of plan {plan} on {} was refused: {detail}", job.host),
            host: job.host,
            severity: Severity::Error,
            body: EventBody::JobFailed(ended),
        }]
    }

    // ---- status -----------------------------------------------------------------

    /// What `flotilla status` shows, as of `now`.
    pub fn status(&self, now: u64) -> FleetStatus {
        let mut entries = Vec::new();
        for (i, plan) in self.config.plan.iter().enumerate() {
            let next_run = plan.schedule.as_ref().and_then(|cron| {
                let last = self
                    .store
                    .last_run(&run_key(&plan.name, "backup"))
                    .ok()
                    .flatten()
                    .unwrap_or(now);
                match self.due(cron, plan.jitter_shift(), last, now)? {
                    Due::At(t) | Due::Now { scheduled: t, .. } => {
                        u64::try_from(t.timestamp_millis()).ok()
                    }
                    Due::Never => None,
                }
            });
            for host in &plan.hosts {
                let success = self.store.success(&plan.name, host.as_str());
                let running_task = self
                    .running
                    .iter()
                    .find(|(_, j)| &j.host == host && j.kind == JobKind::Backup { plan: i })
                    .map(|(id, _)| id.clone());
                entries.push(PlanHostStatus {
                    plan: plan.name.clone(),
                    host: host.to_string(),
                    storage: plan.to.to_string(),
                    last_success: success.as_ref().map(|s| s.time),
                    last_snapshot: success.and_then(|s| s.snapshot),
                    next_run,
                    overdue: self.store.alert(&overdue_key(&plan.name, host)).is_some(),
                    running_task,
                });
            }
        }
        FleetStatus {
            v: STATUS_VERSION,
            time: now,
            entries,
            queued: self.queue.len() as u64,
        }
    }
}

#[cfg(test)]
mod tests;
