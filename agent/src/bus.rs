//! The agent's side of the NATS control plane.
//!
//! [`Bus`] is a cheap, cloneable handle: one NATS connection (which reconnects on
//! its own), the JetStream context, and the health bucket. It creates the
//! streams and bucket the fleet needs if they are missing, so the first agent of
//! a new fleet sets up the server. Security events go through a throttle
//! (`throttle.rs`): a flood is a few events, not thousands.

pub(crate) mod micro;
pub(crate) mod queries;
pub(crate) mod throttle;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, kv};
use flotilla_protocol::permissions::{inbox_prefix, Role as PermRole};
use flotilla_protocol::{
    encode, subject, Bundle, Event, EventBody, Heartbeat, HostName, Severity, EVENT_VERSION,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::now_ms;
use throttle::{Admit, Coalesced, Throttle};

/// How long event publication waits for the stream's acknowledgement.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long [`Bus::event_until_stored`] keeps trying: inside the event
/// stream's two-minute duplicate window, so a try whose acknowledgement was
/// lost and a later one are stored once.
const STORE_RETRY_FOR: Duration = Duration::from_secs(100);

/// A failure talking to NATS.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The server could not be reached.
    #[error("cannot connect to NATS at {url}: {source}")]
    Connect {
        /// Server URL.
        url: String,
        /// Why.
        source: async_nats::ConnectError,
    },
    /// A JetStream request failed.
    #[error("JetStream {what} failed: {why}")]
    JetStream {
        /// What was attempted.
        what: &'static str,
        /// Why.
        why: String,
    },
    /// Shutdown was requested while connecting.
    #[error("shutdown requested while connecting to NATS")]
    Cancelled,
    /// The bundle's NATS credentials or CA cannot be used.
    #[error("the bundle's NATS credentials cannot be used: {0}; enroll the host again (`flotilla enroll HOST --force`)")]
    Credentials(String),
}

impl BusError {
    /// Connection and JetStream failures are usually passing (server restarting).
    pub fn is_retryable(&self) -> bool {
        !matches!(self, BusError::Cancelled | BusError::Credentials(_))
    }
}

fn js_err(what: &'static str) -> impl FnOnce(String) -> BusError {
    move |why| BusError::JetStream { what, why }
}

/// Handle to the NATS connection and the fleet's JetStream resources.
#[derive(Debug, Clone)]
pub struct Bus {
    client: async_nats::Client,
    js: jetstream::Context,
    health: kv::Store,
    host: HostName,
    security: Arc<Mutex<Throttle<(String, EventBody)>>>,
    /// The fleet bucket, opened on first use (the revocation list is read
    /// every heartbeat interval: one request, not two).
    fleet: tokio::sync::OnceCell<kv::Store>,
}

/// One security event per source and reason per this long; the rest are
/// summed up in one event when it has passed.
const SECURITY_WINDOW: Duration = Duration::from_secs(10);
/// Sources tracked at once; past that, new ones share one window.
const SECURITY_KEYS: usize = 1024;

impl Bus {
    /// Connects, retrying with backoff until the server answers or `cancel`
    /// fires, then makes sure the task and event streams and the health bucket
    /// exist.
    pub async fn connect(
        url: &str,
        bundle: &Bundle,
        cancel: &CancellationToken,
    ) -> Result<Bus, BusError> {
        let mut delay = Duration::from_millis(250);
        loop {
            match Self::try_connect(url, bundle).await {
                Ok(bus) => return Ok(bus),
                Err(e @ BusError::Credentials(_)) => return Err(e),
                Err(e) => {
                    warn!(error = %e, retry_in = ?delay, "NATS not ready; retrying");
                    tokio::select! {
                        _ = cancel.cancelled() => return Err(BusError::Cancelled),
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    async fn try_connect(url: &str, bundle: &Bundle) -> Result<Bus, BusError> {
        let host = &bundle.host;
        let mut options = async_nats::ConnectOptions::new();
        if let Some(creds) = &bundle.nats_creds {
            // The fleet's bus: this host's own user, and TLS with a server
            // certificate from the fleet CA (no other CA is trusted).
            let tls = crate::transfer::nats_tls_config(bundle)
                .map_err(|e| BusError::Credentials(e.to_string()))?;
            options = options
                .credentials(creds)
                .map_err(|e| BusError::Credentials(e.to_string()))?
                .tls_client_config(tls)
                .require_tls(true)
                .custom_inbox_prefix(inbox_prefix(&PermRole::Host(host.clone())));
        }
        let client = options
            .name(format!("flotilla-agent/{host}"))
            .connection_timeout(Duration::from_secs(5))
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Connected => info!("connected to NATS"),
                    async_nats::Event::Disconnected => {
                        warn!("disconnected from NATS; reconnecting")
                    }
                    other => debug!(event = %other, "NATS event"),
                }
            })
            // Every node of a clustered bus: the client fails over between them.
            .connect(flotilla_protocol::server_urls(url).as_slice())
            .await
            .map_err(|source| BusError::Connect {
                url: url.to_owned(),
                source,
            })?;
        let js = jetstream::new(client.clone());
        // Only the coordinator administers JetStream (a host's user may not):
        // until it has created the fleet's streams and bucket, wait.
        for stream in [subject::TASK_STREAM, subject::EVENT_STREAM] {
            js.get_stream(stream).await.map_err(|e| {
                js_err("find a stream")(format!(
                    "{stream}: {e}; the coordinator creates it: run `flotilla doctor` (or start `flotilla serve`)"
                ))
            })?;
        }
        let health = js
            .get_key_value(subject::HEALTH_BUCKET)
            .await
            .map_err(|e| {
                js_err("open the health bucket")(format!(
                "{e}; the coordinator creates it: run `flotilla doctor` (or start `flotilla serve`)"
            ))
            })?;
        Ok(Bus {
            client,
            js,
            health,
            host: host.clone(),
            security: Arc::new(Mutex::new(Throttle::new(SECURITY_WINDOW, SECURITY_KEYS))),
            fleet: tokio::sync::OnceCell::new(),
        })
    }

    /// The raw NATS client.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// This agent's pull consumer on the task stream, created if missing.
    pub async fn task_consumer(&self) -> Result<consumer::PullConsumer, BusError> {
        let name = subject::task_consumer(&self.host);
        let stream = self
            .js
            .get_stream(subject::TASK_STREAM)
            .await
            .map_err(|e| js_err("get task stream")(e.to_string()))?;
        stream
            .get_or_create_consumer(
                &name,
                consumer::pull::Config {
                    durable_name: Some(name.clone()),
                    description: Some(format!("tasks for host {}", self.host)),
                    filter_subject: subject::task(&self.host),
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: Duration::from_secs(60),
                    max_ack_pending: 64,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| js_err("create task consumer")(e.to_string()))
    }

    /// The signed revocation list from the fleet bucket, if the coordinator
    /// has stored one.
    pub async fn revocation_list(&self) -> Result<Option<bytes::Bytes>, BusError> {
        let store = self
            .fleet
            .get_or_try_init(|| async {
                self.js
                    .get_key_value(subject::FLEET_BUCKET)
                    .await
                    .map_err(|e| js_err("open the fleet bucket")(e.to_string()))
            })
            .await?;
        store
            .get(subject::REVOKED_KEY)
            .await
            .map_err(|e| js_err("read the revocation list")(e.to_string()))
    }

    /// Stores `hb` as this host's latest health.
    pub async fn put_health(&self, hb: &Heartbeat) -> Result<(), BusError> {
        let bytes = encode(hb).map_err(|e| js_err("encode heartbeat")(e.to_string()))?;
        self.health
            .put(subject::health_key(&self.host), bytes.into())
            .await
            .map_err(|e| js_err("put heartbeat")(e.to_string()))?;
        Ok(())
    }

    /// Publishes an event about this host and waits for the event stream to
    /// store it. Failures are logged, never returned: an event that cannot be
    /// published must not stop the work it reports on.
    pub async fn event(&self, severity: Severity, message: impl Into<String>, body: EventBody) {
        let event = self.make_event(severity, message.into(), body);
        if let Err(why) = self.store_event(&event).await {
            warn!(kind = event.body.kind(), %why, "event not stored");
        }
    }

    /// [`Bus::event`] for what must not be lost (a task's start and end,
    /// which waiting commands and `flotilla serve` follow): while the bus
    /// does not acknowledge it, it is sent again, every few seconds, for up
    /// to [`STORE_RETRY_FOR`]. Each try carries the event id as
    /// `Nats-Msg-Id`, so the stream stores it once however many tries
    /// reach it (its duplicate window is two minutes).
    pub async fn event_until_stored(
        &self,
        severity: Severity,
        message: impl Into<String>,
        body: EventBody,
    ) {
        let event = self.make_event(severity, message.into(), body);
        let kind = event.body.kind();
        let deadline = Instant::now() + STORE_RETRY_FOR;
        let mut delay = Duration::from_secs(1);
        let mut tries = 1u32;
        loop {
            match self.store_event(&event).await {
                Ok(()) if tries > 1 => {
                    return info!(kind, tries, "event stored after the bus came back")
                }
                Ok(()) => return,
                Err(why) if Instant::now() + delay >= deadline => {
                    return warn!(kind, tries, %why, "event not stored; giving up")
                }
                Err(why) => {
                    debug!(kind, tries, %why, retry_in = ?delay, "event not stored yet");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(8));
                    tries += 1;
                }
            }
        }
    }

    fn make_event(&self, severity: Severity, message: String, body: EventBody) -> Event {
        Event {
            v: EVENT_VERSION,
            id: uuid::Uuid::new_v4().to_string(),
            time: now_ms(),
            host: self.host.clone(),
            severity,
            message,
            body,
        }
    }

    /// One try: publish with the event id as `Nats-Msg-Id`, and wait for
    /// the stream's acknowledgement.
    async fn store_event(&self, event: &Event) -> Result<(), String> {
        let bytes = encode(event).map_err(|e| format!("cannot encode: {e}"))?;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, event.id.as_str());
        let ack = self
            .js
            .publish_with_headers(event.subject(), headers, bytes.into())
            .await
            .map_err(|e| format!("cannot publish: {e}"))?;
        match tokio::time::timeout(ACK_TIMEOUT, ack).await {
            Ok(Ok(_)) => {
                debug!(kind = event.body.kind(), "event stored");
                Ok(())
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("the event stream did not acknowledge in time".into()),
        }
    }

    /// A security event, coalesced per `key` (the source and the reason):
    /// the first of a window is logged and published at once, the rest are
    /// counted and summed up by [`Bus::flush_security`] (or by the next one
    /// after the window), so a flood cannot bury the event history or the log.
    pub async fn security_event(&self, key: &str, message: String, body: EventBody) {
        let admitted = match self.security.lock() {
            Ok(mut t) => t.admit(key, Instant::now(), (message.clone(), body.clone())),
            Err(_) => Admit::Publish { closed: None },
        };
        match admitted {
            Admit::HeldBack => debug!(%key, %message, "security event coalesced"),
            Admit::Publish { closed } => {
                if let Some(c) = closed {
                    self.publish_coalesced(c).await;
                }
                warn!(%key, %message, "security event");
                self.event(Severity::Error, message, body).await;
            }
        }
    }

    /// Publishes the summaries of the security-event windows that have
    /// passed. Called at every heartbeat.
    pub async fn flush_security(&self) {
        let due = match self.security.lock() {
            Ok(mut t) => t.due(Instant::now()),
            Err(_) => Vec::new(),
        };
        for c in due {
            self.publish_coalesced(c).await;
        }
    }

    async fn publish_coalesced(&self, c: Coalesced<(String, EventBody)>) {
        let (message, mut body) = c.last;
        let said = format!(
            "{} more like this in {} s (coalesced; {}); the last: {message}",
            c.count,
            c.window.as_secs().max(1),
            c.key
        );
        // The key holds the task id, if any: the summary names the same task.
        if let EventBody::TaskRejected { detail, .. } = &mut body {
            *detail = format!(
                "{} more in {} s; the last: {detail}",
                c.count,
                c.window.as_secs().max(1)
            );
        }
        warn!(key = %c.key, held_back = c.count, "security events coalesced");
        self.event(Severity::Error, said, body).await;
    }

    /// Flushes everything published so far to the server.
    pub async fn flush(&self) {
        if let Err(e) = self.client.flush().await {
            warn!(error = %e, "cannot flush NATS connection");
        }
    }
}
