//! Dispatching signed tasks and following them to their end.
//!
//! The task is published to the host's subject on the JetStream task stream,
//! where it waits until the agent has journalled it, however long the host is
//! away (up to the task's expiry). Its lifecycle comes back as events; the
//! dispatcher subscribes to them *before* publishing so none is missed.

use std::time::Duration;

use flotilla_protocol::{
    encode, sign_task, subject, Event, EventBody, HostName, SigningSeed, TaskBody, TaskFinished,
    TaskKind, TASK_VERSION,
};
use futures::StreamExt;

use crate::error::{request_err, CliError};
use crate::fleet::Fleet;
use crate::nats::Nats;

/// How long a task stays valid after it is issued.
pub const TASK_TTL: Duration = Duration::from_secs(24 * 3600);

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
    pub id: String,
    events: async_nats::Subscriber,
    security: async_nats::Subscriber,
}

/// How following a task ended.
#[derive(Debug)]
pub enum Outcome {
    /// It finished (well or badly).
    Finished(TaskFinished),
    /// The agent refused it.
    Rejected {
        /// Reason code.
        reason: String,
        /// Detail.
        detail: String,
    },
    /// Nothing conclusive arrived in time.
    TimedOut,
    /// The subscriptions ended (connection closed).
    Lost(String),
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
        let id = self.publish(host, kind).await?;
        Ok(SentTask {
            id,
            events,
            security,
        })
    }

    /// Signs `kind` for `host` and stores it on the task stream; returns its id.
    pub async fn publish(&self, host: &HostName, kind: TaskKind) -> Result<String, CliError> {
        let now = crate::now_ms();
        let body = TaskBody {
            v: TASK_VERSION,
            id: uuid::Uuid::new_v4().to_string(),
            fleet: self.fleet_id.clone(),
            host: host.clone(),
            issued_at: now,
            expires_at: now + TASK_TTL.as_millis() as u64,
            kind,
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
    /// Follows the task's events until it finishes or is refused, or `wait`
    /// passes; `on_event` sees every event about it (progress included).
    pub async fn wait(&mut self, wait: Duration, mut on_event: impl FnMut(&Event)) -> Outcome {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let msg = tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return Outcome::TimedOut,
                m = self.events.next() => m,
                m = self.security.next() => m,
            };
            let Some(msg) = msg else {
                return Outcome::Lost("event subscription closed".into());
            };
            let Ok(ev) = Event::decode(&msg.payload) else {
                continue;
            };
            if ev.body.task_id() != Some(self.id.as_str()) {
                continue;
            }
            on_event(&ev);
            match ev.body {
                EventBody::TaskFinished(f) => return Outcome::Finished(f),
                EventBody::TaskRejected { reason, detail, .. } => {
                    let reason = serde_json::to_value(reason)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_owned))
                        .unwrap_or_default();
                    return Outcome::Rejected { reason, detail };
                }
                _ => {}
            }
        }
    }
}
