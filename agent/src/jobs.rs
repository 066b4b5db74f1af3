//! Tasks: receiving them from the stream, refusing the bad ones, journalling
//! and acknowledging the good ones, and running them.
//!
//! Order of a task's life: verify (signature, host, fleet, expiry) → journal in
//! sled and flush → acknowledge to JetStream → run → record the outcome →
//! publish `task.finished`. A crash before the acknowledgement means the stream
//! redelivers; a crash after it means the journal resumes the task at startup
//! (unless it has expired meanwhile).
//!
//! What to do at each step is decided by [`lifecycle`], which does no I/O;
//! this file performs its decisions. One runner per task kind lives beside
//! it: `backup.rs`, `restore.rs`, `check.rs`, `prune.rs` (forget and prune),
//! `repair.rs`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind};
use flotilla_protocol::{
    check_epoch, subject, verify_task, EventBody, RejectReason, RunningJob, Severity, TaskBody,
    TaskId, TaskKind, TaskOutcome, TaskProgress, TaskResult,
};
use futures::StreamExt;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, info_span, warn, Instrument};

mod backup;
mod check;
mod context;
mod copy;
mod lifecycle;
mod prune;
mod repair;
mod restore;

pub(crate) use context::Agent;

use crate::engine::{self, Cancel, Counters, PathRefused, Progress};
use crate::now_ms;
use crate::state::{Accepted, JobStatus, JournalEntry, JOURNAL_VERSION};
use lifecycle::{Decision, Intake, Publish, Ran, Rejection, Reply, Resumed, Stop, Task};

/// How often progress events are published while a task runs.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// How long to wait before retrying a consumer that could not be set up.
const CONSUMER_RETRY: Duration = Duration::from_secs(2);
/// When a task the journal could not take is redelivered.
const JOURNAL_RETRY: Duration = Duration::from_secs(10);

/// Why a task did not succeed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum JobError {
    /// It asks for something this agent's configuration does not allow.
    #[error("refused: {0}")]
    Refused(PathRefused),
    /// It failed while running.
    #[error("{message}")]
    Failed { message: String, retryable: bool },
}

impl JobError {
    fn is_retryable(&self) -> bool {
        match self {
            JobError::Refused(_) => false,
            JobError::Failed { retryable, .. } => *retryable,
        }
    }
}

/// Pulls tasks for this host until `cancel` fires, then cancels running tasks
/// and waits briefly for them to stop.
pub(crate) async fn task_loop(agent: Arc<Agent>, cancel: CancellationToken) {
    let mut jobs: JoinSet<()> = JoinSet::new();
    match agent.state.unfinished() {
        Ok(entries) => {
            for entry in entries {
                agent.resume(entry, &mut jobs).await;
            }
        }
        Err(e) => error!(error = %e, "cannot read task journal; unfinished tasks are not resumed"),
    }

    'consume: loop {
        let consumer = match agent.bus.task_consumer().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "cannot subscribe to tasks; retrying");
                tokio::select! {
                    _ = cancel.cancelled() => break 'consume,
                    _ = tokio::time::sleep(CONSUMER_RETRY) => continue 'consume,
                }
            }
        };
        let mut messages = match consumer.messages().await {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %e, "cannot pull tasks; retrying");
                tokio::select! {
                    _ = cancel.cancelled() => break 'consume,
                    _ = tokio::time::sleep(CONSUMER_RETRY) => continue 'consume,
                }
            }
        };
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break 'consume,
                Some(_) = jobs.join_next(), if !jobs.is_empty() => {}
                next = messages.next() => match next {
                    Some(Ok(msg)) => agent.handle(msg, &mut jobs).await,
                    // Missed pull heartbeats and the like while NATS reconnects;
                    // the stream carries on by itself.
                    Some(Err(e)) => warn!(error = %e, "task stream hiccup"),
                    None => continue 'consume,
                },
            }
        }
    }

    if let Ok(running) = agent.running.lock() {
        for (_, cancel) in running.values() {
            cancel.cancel();
        }
    }
    let stopped = tokio::time::timeout(Duration::from_secs(5), async {
        while jobs.join_next().await.is_some() {}
    })
    .await;
    if stopped.is_err() {
        warn!("running tasks did not stop in time; they resume on the next start");
    }
}

impl Agent {
    /// Verifies and journals one task message, then does what
    /// [`lifecycle::intake`] decides: reject, acknowledge, start.
    async fn handle(self: &Arc<Self>, msg: jetstream::Message, jobs: &mut JoinSet<()>) {
        let subject = msg.subject.to_string();
        let seq = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
        let s = &self.settings;
        // A task issued for an earlier state of this agent is refused like
        // one that does not verify: the journal that would recognise it as a
        // replay was lost with that state.
        let epoch = self.state.epoch();
        let verified = verify_task(
            &msg.payload,
            &s.coordinator_key,
            &s.bundle.fleet,
            &s.host,
            now_ms(),
        )
        .and_then(|body| check_epoch(&body, epoch.epoch, epoch.created_at).map(|()| body));
        let (intake, body) = match verified {
            Err(e) => {
                let rejection = Rejection {
                    task_id: e.task_id().cloned(),
                    reason: e.reason(),
                    detail: e.to_string(),
                };
                (Intake::Refused(rejection), None)
            }
            Ok(body) => (self.journal_new(&body, seq, &msg.payload).await, Some(body)),
        };
        let new = matches!(intake, Intake::New);
        let decision = lifecycle::intake(intake);
        if let (true, Some(body)) = (decision.run, &body) {
            if new {
                info!(task = %body.id, kind = body.kind.name(), "task accepted");
            } else {
                info!(task = %body.id, "redelivered task was never finished; running it");
            }
        }
        self.record(&decision, body.as_ref().map(|b| &b.id), &subject)
            .await;
        if let Some(reply) = decision.reply {
            answer(&msg, reply).await;
        }
        if let (true, Some(body)) = (decision.run, body) {
            self.start(body, msg.payload.to_vec(), jobs);
        }
    }

    /// Journals a verified task as received; what the journal found is the
    /// lifecycle's input.
    async fn journal_new(&self, body: &TaskBody, seq: u64, payload: &[u8]) -> Intake {
        let entry = JournalEntry {
            v: JOURNAL_VERSION,
            task_id: body.id.clone(),
            kind: body.kind.name().into(),
            stream_seq: seq,
            status: JobStatus::Received,
            received_at: now_ms(),
            updated_at: now_ms(),
            envelope: payload.to_vec(),
            error: None,
        };
        match self.state.accept(entry).await {
            Ok(Accepted::New) => Intake::New,
            Ok(Accepted::Redelivered(stored)) => Intake::Redelivered {
                status: stored.status,
                // A poisoned lock says nothing; assume running, never run twice.
                running_here: self
                    .running
                    .lock()
                    .map(|r| r.contains_key(&body.id))
                    .unwrap_or(true),
            },
            Ok(Accepted::Replayed(stored)) => Intake::Replayed {
                task_id: body.id.clone(),
                stored_seq: stored.stream_seq,
                seq,
            },
            Err(e) => {
                error!(task = %body.id, error = %e, "cannot journal task; it will be redelivered");
                Intake::JournalFailed
            }
        }
    }

    /// Does what [`lifecycle::resume`] decides for a task found unfinished in
    /// the journal at startup.
    async fn resume(self: &Arc<Self>, entry: JournalEntry, jobs: &mut JoinSet<()>) {
        let s = &self.settings;
        let resumed = lifecycle::verify_resumed(
            &entry.envelope,
            &s.coordinator_key,
            &s.bundle.fleet,
            &s.host,
            entry.received_at,
            now_ms(),
        );
        let Resumed { body, expired } = match resumed {
            Ok(r) => r,
            Err(e) => {
                return error!(task = %entry.task_id, error = %e, "journalled task no longer verifies; dropped")
            }
        };
        let decision = lifecycle::resume(Task::of(&body), entry.status, expired);
        if expired {
            warn!(task = %body.id, "journalled task expired while the agent was down; not resumed");
        }
        self.record(&decision, Some(&body.id), &subject::task(&s.host))
            .await;
        if decision.run {
            info!(task = %body.id, kind = body.kind.name(), "resuming unfinished task");
            self.start(body, entry.envelope, jobs);
        }
    }

    fn start(self: &Arc<Self>, body: TaskBody, envelope: Vec<u8>, jobs: &mut JoinSet<()>) {
        let cancel = Cancel::default();
        let job = RunningJob {
            task_id: body.id.clone(),
            kind: body.kind.name().into(),
            started_at: now_ms(),
        };
        if let Ok(mut running) = self.running.lock() {
            running.insert(body.id.clone(), (job, cancel.clone()));
        }
        let span = info_span!("task", id = %body.id, kind = body.kind.name());
        let agent = self.clone();
        jobs.spawn(
            async move {
                agent.run_task(&body, &envelope, &cancel).await;
                if let Ok(mut running) = agent.running.lock() {
                    running.remove(&body.id);
                }
                // What the task freed goes back to the system now, not at
                // the next timer tick.
                crate::memory::trim_soon();
            }
            .instrument(span),
        );
    }

    /// Runs a task and records its start and end as the lifecycle decides.
    async fn run_task(&self, body: &TaskBody, envelope: &[u8], cancel: &Cancel) {
        let task = Task::of(body);
        let from = subject::task(&self.settings.host);
        self.record(&lifecycle::start(task), Some(&body.id), &from)
            .await;
        let started = Instant::now();
        let ran = match &body.kind {
            TaskKind::Estimate { paths } => self
                .estimate(body, paths, cancel)
                .await
                .map(|r| (TaskOutcome::Succeeded, r)),
            TaskKind::Backup { .. } => self.backup(body, envelope, cancel).await,
            TaskKind::Restore { .. } => self.restore(body, envelope, cancel).await,
            TaskKind::Check { read_data } => self.check(body, *read_data).await,
            TaskKind::Forget { snapshots } => self.forget(snapshots).await,
            TaskKind::Prune {
                dry_run,
                grace_secs,
            } => self.prune(*dry_run, *grace_secs).await,
            TaskKind::Repair { read_data } => self.repair(body, *read_data).await,
            TaskKind::Copy { .. } => self.copy(body, envelope, cancel).await,
            TaskKind::Cancel { task_id } => Ok(self.cancel_task(task_id)),
        };
        let duration_ms = started.elapsed().as_millis() as u64;
        // Whether a `cancel` task set the flag, as opposed to shutdown; taken
        // out of the set either way, so the set holds only running tasks.
        // The flag is read once: a cancel landing between two reads would
        // make a task that failed by itself look stopped by shutdown.
        let flagged = cancel.is_cancelled();
        let asked = self
            .cancelled
            .lock()
            .map(|mut c| c.remove(&body.id))
            .unwrap_or(false);
        let stop = Stop::from_flags(flagged, flagged && asked);
        let ran = match ran {
            Ok((outcome, result)) => Ran::Done(outcome, result),
            Err(e) => Ran::Failed {
                retryable: e.is_retryable(),
                error: e.to_string(),
            },
        };
        if let (Ran::Failed { .. }, Stop::Shutdown) = (&ran, stop) {
            info!("task interrupted by shutdown; it resumes on the next start");
        }
        let decision = lifecycle::finish(task, ran, stop, duration_ms);
        if let Some(Publish::Finished { finished, .. }) = &decision.publish {
            info!(outcome = ?finished.outcome, duration_ms, "task finished");
        }
        self.record(&decision, Some(&body.id), &from).await;
    }

    /// Performs the journal write and the event of `decision` about task
    /// `task_id`, in that order; `subject` is where a rejected task came from.
    async fn record(&self, decision: &Decision, task_id: Option<&TaskId>, subject: &str) {
        if let (Some((status, error)), Some(id)) = (&decision.journal, task_id) {
            if let Err(e) = self
                .state
                .set_status(id, *status, error.clone(), now_ms())
                .await
            {
                warn!(error = %e, ?status, "cannot journal task status");
            }
        }
        match &decision.publish {
            None => {}
            Some(Publish::Started { task_id, task_kind }) => {
                self.bus
                    .event_until_stored(
                        Severity::Info,
                        format!("{task_kind} task {task_id} started"),
                        EventBody::TaskStarted {
                            task_id: task_id.clone(),
                            task_kind: task_kind.clone(),
                        },
                    )
                    .await
            }
            Some(Publish::Finished {
                severity,
                message,
                finished,
            }) => {
                self.bus
                    .event_until_stored(
                        *severity,
                        message.clone(),
                        EventBody::TaskFinished(finished.as_ref().clone()),
                    )
                    .await
            }
            Some(Publish::Rejected(r)) => {
                self.reject(r.task_id.clone(), r.reason, r.detail.clone(), subject)
                    .await
            }
        }
    }

    /// Asks a running task to stop; it then ends `cancelled`.
    fn cancel_task(&self, task_id: &TaskId) -> (TaskOutcome, TaskResult) {
        let flag = self
            .running
            .lock()
            .ok()
            .and_then(|r| r.get(task_id).map(|(_, c)| c.clone()));
        let found = flag.is_some();
        if let Some(flag) = flag {
            if let Ok(mut c) = self.cancelled.lock() {
                c.insert(task_id.clone());
            }
            flag.cancel();
        }
        info!(task = %task_id, found, "cancel requested");
        (
            TaskOutcome::Succeeded,
            TaskResult::Cancel(flotilla_protocol::CancelReport {
                task_id: task_id.clone(),
                was_running: found,
            }),
        )
    }

    /// Resolves requested paths against `roots`, publishing a `not_allowed`
    /// rejection for paths outside them.
    pub(crate) async fn allowed_paths(
        &self,
        body: &TaskBody,
        requested: &[String],
        roots: &[PathBuf],
    ) -> Result<Vec<PathBuf>, JobError> {
        let requested = requested.to_vec();
        let roots = roots.to_vec();
        let resolved =
            tokio::task::spawn_blocking(move || engine::resolve_within(&requested, &roots))
                .await
                .map_err(|e| JobError::Failed {
                    message: format!("path check crashed: {e}"),
                    retryable: true,
                })?;
        match resolved {
            Ok(r) => Ok(r),
            Err(refused) if refused.is_policy() => {
                self.reject(
                    Some(body.id.clone()),
                    RejectReason::NotAllowed,
                    refused.to_string(),
                    &subject::task(&self.settings.host),
                )
                .await;
                Err(JobError::Refused(refused))
            }
            Err(refused) => Err(JobError::Failed {
                message: refused.to_string(),
                retryable: false,
            }),
        }
    }

    /// Runs `work` on a blocking thread, publishing `task.progress` about once
    /// a second from what it reports.
    pub(crate) async fn with_progress<T: Send + 'static>(
        &self,
        body: &TaskBody,
        totals: Option<Totals>,
        work: impl FnOnce(&mut dyn Progress) -> T + Send + 'static,
    ) -> Result<T, JobError> {
        let (tx, mut rx) = watch::channel((Counters::default(), PathBuf::new()));
        let mut worker = tokio::task::spawn_blocking(move || {
            let mut sink = WatchProgress { tx, last: None };
            work(&mut sink)
        });
        let started = Instant::now();
        let mut tick = tokio::time::interval(PROGRESS_EVERY);
        tick.tick().await;
        let kind = body.kind.name();
        loop {
            tokio::select! {
                done = &mut worker => return done.map_err(|e| JobError::Failed {
                    message: format!("{kind} worker crashed: {e}"),
                    retryable: true,
                }),
                _ = tick.tick() => {
                    if !rx.has_changed().unwrap_or(false) {
                        continue;
                    }
                    let (counters, current) = rx.borrow_and_update().clone();
                    let known = totals.as_ref().and_then(|t| t.get().copied());
                    self.bus.event(
                        Severity::Info,
                        format!("{kind} {}: {} files, {} bytes so far", body.id, counters.files, counters.bytes),
                        EventBody::TaskProgress(TaskProgress {
                            task_id: body.id.clone(),
                            task_kind: kind.into(),
                            files: counters.files,
                            dirs: counters.dirs,
                            bytes: counters.bytes,
                            current: Some(current.to_string_lossy().into_owned()),
                            files_total: known.map(|(files, _)| files),
                            bytes_total: known.map(|(_, bytes)| bytes),
                            elapsed_ms: started.elapsed().as_millis() as u64,
                        }),
                    ).await;
                }
            }
        }
    }

    async fn estimate(
        &self,
        body: &TaskBody,
        paths: &[String],
        cancel: &Cancel,
    ) -> Result<TaskResult, JobError> {
        let roots = self.settings.backup_roots.clone();
        let resolved = self.allowed_paths(body, paths, &roots).await?;
        let cancel = cancel.clone();
        let stop = cancel.clone();
        let report = self
            .with_progress(body, None, move |p| engine::estimate(&resolved, p, &stop))
            .await?;
        if cancel.is_cancelled() {
            // A walk cut short is not an answer.
            return Err(JobError::Failed {
                message: "cancelled".into(),
                retryable: true,
            });
        }
        Ok(TaskResult::Estimate(report))
    }

    async fn reject(
        &self,
        task_id: Option<TaskId>,
        reason: RejectReason,
        detail: String,
        subject: &str,
    ) {
        self.bus
            .security_event(
                // Per task as well: refusals of different genuine tasks are
                // each told (the coordinator follows them); a replayed one,
                // or a stream of forgeries, is coalesced.
                &format!(
                    "{subject} {reason:?} {}",
                    task_id.as_ref().map_or("-", |t| t.as_str())
                ),
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

/// Files and bytes a task will cover, once something has counted them (the
/// estimate that runs beside a backup); progress events carry them from then on.
pub(crate) type Totals = std::sync::Arc<std::sync::OnceLock<(u64, u64)>>;

/// Publishes engine progress into a watch channel, at most every 100 ms.
struct WatchProgress {
    tx: watch::Sender<(Counters, PathBuf)>,
    last: Option<Instant>,
}

impl Progress for WatchProgress {
    fn update(&mut self, counters: &Counters, current: &std::path::Path) {
        if self
            .last
            .is_some_and(|t| t.elapsed() < Duration::from_millis(100))
        {
            return;
        }
        self.last = Some(Instant::now());
        self.tx
            .send_replace((counters.clone(), current.to_path_buf()));
    }
}

/// Answers JetStream about a task message as the lifecycle decided.
async fn answer(msg: &jetstream::Message, reply: Reply) {
    let sent = match reply {
        // Double ack waits for the server to confirm; if it is lost the
        // stream redelivers, and the journal recognises the redelivery.
        Reply::Ack => msg.double_ack().await,
        // Term: a refused message is never redelivered.
        Reply::Term => msg.ack_with(AckKind::Term).await,
        // Nak with a delay: redelivered once the disk has had time to recover.
        Reply::Nak => msg.ack_with(AckKind::Nak(Some(JOURNAL_RETRY))).await,
    };
    if let Err(e) = sent {
        warn!(error = %e, ?reply, "task message answer not confirmed; expecting redelivery");
    }
}
