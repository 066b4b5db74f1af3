//! The coordinator's NATS side: connecting, reading fleet health (the
//! registry of heartbeats, the offline rule). Dispatching signed tasks and
//! following their events is `dispatch.rs`.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use flotilla_protocol::{subject, AgentState, Heartbeat, HostName, OfflineReason, UnixMillis};
use futures::StreamExt;

use std::path::PathBuf;

use flotilla_protocol::permissions::{inbox_prefix, Role};

use crate::error::{request_err, CliError};
use crate::fleet::Fleet;

/// A connection to the fleet's NATS server.
#[derive(Debug, Clone)]
pub struct Nats {
    /// The client.
    pub client: async_nats::Client,
    /// JetStream on it.
    pub js: jetstream::Context,
}

/// How many heartbeat intervals of silence make a host offline.
pub const MISSED_HEARTBEATS: u64 = 3;

/// One host as the fleet registry sees it.
#[derive(Debug, Clone)]
pub struct HostRecord {
    /// Its latest heartbeat.
    pub heartbeat: Heartbeat,
    /// When the server stored it (server clock, unix ms).
    pub stored_at: UnixMillis,
}

impl HostRecord {
    /// Why the host counts as offline at `now`, or `None` if it is online.
    pub fn offline_reason(&self, now: UnixMillis) -> Option<OfflineReason> {
        if self.heartbeat.state == AgentState::Offline {
            return Some(OfflineReason::Shutdown);
        }
        // One extra second of slack for publication and clock granularity.
        // The interval comes from the bus: any value must not overflow.
        let deadline = self
            .stored_at
            .saturating_add(self.heartbeat.interval_ms.saturating_mul(MISSED_HEARTBEATS))
            .saturating_add(1000);
        (now > deadline).then_some(OfflineReason::MissedHeartbeats)
    }
}

/// How a coordinator proves who it is to the bus and knows the bus is the
/// fleet's: its user's `.creds` and the fleet CA that signed the server's
/// TLS certificate.
#[derive(Debug, Clone)]
pub struct ClientAuth {
    /// The NATS user credentials file.
    pub creds: PathBuf,
    /// The fleet CA certificate (PEM).
    pub ca: PathBuf,
    /// The inbox prefix this user may subscribe under.
    pub inbox_prefix: String,
}

impl ClientAuth {
    /// The coordinator's own identity in `fleet`, if the fleet has NATS
    /// identities (fleets made before them connect anonymously).
    pub fn coordinator(fleet: &Fleet) -> Option<ClientAuth> {
        // Only the creds file: `serve` runs with it and not the keys.
        let auth = fleet.nats_auth();
        auth.coordinator_creds_path().is_file().then(|| ClientAuth {
            creds: auth.coordinator_creds_path(),
            ca: fleet.ca_cert_path(),
            inbox_prefix: inbox_prefix(&Role::Coordinator),
        })
    }

    /// The system-account user that pushes account updates (revocations).
    pub fn system(fleet: &Fleet) -> Option<ClientAuth> {
        let auth = fleet.nats_auth();
        auth.system_creds_path().is_file().then(|| ClientAuth {
            creds: auth.system_creds_path(),
            ca: fleet.ca_cert_path(),
            inbox_prefix: "_INBOX._system".into(),
        })
    }
}

impl Nats {
    /// Connects, failing fast when the server is not there. With `auth`, the
    /// connection must be TLS with a server certificate from the fleet CA.
    pub async fn connect(url: &str, auth: Option<&ClientAuth>) -> Result<Nats, CliError> {
        let mut options = async_nats::ConnectOptions::new();
        if let Some(auth) = auth {
            options = options
                .credentials_file(&auth.creds)
                .await
                .map_err(|e| CliError::Nats {
                    url: url.to_owned(),
                    why: format!("cannot read credentials {}: {e}", auth.creds.display()),
                })?
                .add_root_certificates(auth.ca.clone())
                .require_tls(true)
                .custom_inbox_prefix(&auth.inbox_prefix);
        }
        // Every node of a clustered bus: the client fails over between them.
        let urls = flotilla_protocol::server_urls(url);
        let client = options
            .name("flotilla")
            .connection_timeout(Duration::from_secs(5))
            .connect(urls.as_slice())
            .await
            .map_err(|e| CliError::Nats {
                url: url.to_owned(),
                why: e.to_string(),
            })?;
        let js = jetstream::new(client.clone());
        Ok(Nats { client, js })
    }

    async fn health(&self) -> Result<Option<kv::Store>, CliError> {
        match self.js.get_key_value(subject::HEALTH_BUCKET).await {
            Ok(store) => Ok(Some(store)),
            // No agent has ever connected: the bucket does not exist yet.
            Err(e) if e.kind() == jetstream::context::KeyValueErrorKind::GetBucket => Ok(None),
            Err(e) => Err(request_err("read health bucket")(e)),
        }
    }

    /// Every host that ever heartbeated, sorted by name. Undecodable entries
    /// are skipped with a warning on stderr.
    pub async fn hosts(&self) -> Result<Vec<HostRecord>, CliError> {
        let Some(store) = self.health().await? else {
            return Ok(Vec::new());
        };
        let mut keys = store.keys().await.map_err(request_err("list hosts"))?;
        let mut names = Vec::new();
        while let Some(key) = keys.next().await {
            names.push(key.map_err(request_err("list hosts"))?);
        }
        names.sort();
        let mut out = Vec::new();
        for name in names {
            if let Some(record) = read_record(&store, &name).await? {
                out.push(record);
            }
        }
        Ok(out)
    }

    /// Publishes an event the coordinator raises (watchdog, job outcomes) and
    /// waits until the event stream stored it.
    pub async fn publish_event(
        &self,
        host: &HostName,
        severity: flotilla_protocol::Severity,
        message: String,
        body: flotilla_protocol::EventBody,
    ) -> Result<(), CliError> {
        let event = flotilla_protocol::Event {
            v: flotilla_protocol::EVENT_VERSION,
            id: uuid::Uuid::new_v4().to_string(),
            time: crate::now_ms(),
            host: host.clone(),
            severity,
            message,
            body,
        };
        let bytes = flotilla_protocol::encode(&event).map_err(request_err("encode event"))?;
        self.js
            .publish(event.subject(), bytes.into())
            .await
            .map_err(request_err("publish event"))?
            .await
            .map_err(request_err("store event"))?;
        Ok(())
    }

    /// Takes `host` out of the registry: its heartbeat record (with its
    /// history), its durable task consumer and the tasks still queued for
    /// it. Returns how many queued tasks were dropped. Idempotent: what is
    /// already gone is not an error.
    pub async fn remove_host(&self, host: &HostName) -> Result<u64, CliError> {
        use async_nats::jetstream::context::GetStreamErrorKind;
        use async_nats::jetstream::stream::ConsumerErrorKind;
        use async_nats::jetstream::ErrorCode;
        // The health record last: until it is gone the host is still
        // listed, so a removal cut short can be run again.
        let mut dropped = 0;
        match self.js.get_stream(subject::TASK_STREAM).await {
            Ok(stream) => {
                match stream.delete_consumer(&subject::task_consumer(host)).await {
                    Ok(_) => {}
                    Err(e)
                        if matches!(e.kind(), ConsumerErrorKind::JetStream(j)
                            if j.error_code() == ErrorCode::CONSUMER_NOT_FOUND) => {}
                    Err(e) => {
                        return Err(request_err(&format!("delete {host}'s task consumer"))(e))
                    }
                }
                let purged = stream
                    .purge()
                    .filter(subject::task(host))
                    .await
                    .map_err(request_err(&format!("drop {host}'s queued tasks")))?;
                dropped = purged.purged;
            }
            // No task was ever sent: nothing queued.
            Err(e)
                if matches!(e.kind(), GetStreamErrorKind::JetStream(j)
                    if j.error_code() == ErrorCode::STREAM_NOT_FOUND) => {}
            Err(e) => return Err(request_err("open the task stream")(e)),
        }
        if let Some(store) = self.health().await? {
            store
                .purge(subject::health_key(host))
                .await
                .map_err(request_err(&format!("remove {host}'s health record")))?;
        }
        Ok(dropped)
    }

    /// One host's record, if it ever heartbeated.
    pub async fn host(&self, host: &HostName) -> Result<Option<HostRecord>, CliError> {
        let Some(store) = self.health().await? else {
            return Ok(None);
        };
        read_record(&store, &subject::health_key(host)).await
    }
}

async fn read_record(store: &kv::Store, key: &str) -> Result<Option<HostRecord>, CliError> {
    let Some(entry) = store
        .entry(key)
        .await
        .map_err(request_err("read host health"))?
    else {
        return Ok(None);
    };
    if entry.operation != kv::Operation::Put {
        return Ok(None);
    }
    match Heartbeat::decode(&entry.value) {
        // A heartbeat stored under another host's key is not that host's:
        // believed, it would list one host twice or hide another.
        Ok(heartbeat) if subject::health_key(&heartbeat.host) != key => {
            eprintln!(
                "warning: ignoring the health record under {key}: it claims to be {}'s",
                heartbeat.host
            );
            Ok(None)
        }
        Ok(heartbeat) => Ok(Some(HostRecord {
            heartbeat,
            stored_at: stored_at(&entry),
        })),
        Err(e) => {
            eprintln!("warning: ignoring unreadable health record for {key}: {e}");
            Ok(None)
        }
    }
}

/// When the server stored `entry` (server clock, unix ms).
pub(crate) fn stored_at(entry: &kv::Entry) -> UnixMillis {
    u64::try_from((entry.created.unix_timestamp_nanos() / 1_000_000).max(0)).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_protocol::HEARTBEAT_VERSION;

    fn record(state: AgentState, stored_at: u64) -> HostRecord {
        HostRecord {
            heartbeat: Heartbeat {
                v: HEARTBEAT_VERSION,
                host: HostName::new("a").expect("valid"),
                fleet: "f".into(),
                state,
                version: "0".into(),
                started_at: 0,
                time: stored_at,
                interval_ms: 1000,
                load: [0.0; 3],
                rss_bytes: 0,
                mem_total_bytes: 0,
                mem_available_bytes: 0,
                roles: vec![],
                quic_addr: None,
                roots: vec![],
                running: vec![],
                epoch: None,
            },
            stored_at,
        }
    }

    #[test]
    fn offline_after_three_missed_heartbeats_or_at_shutdown() {
        let r = record(AgentState::Online, 10_000);
        assert_eq!(r.offline_reason(13_900), None);
        assert_eq!(
            r.offline_reason(14_001),
            Some(OfflineReason::MissedHeartbeats)
        );
        assert_eq!(
            record(AgentState::Offline, 10_000).offline_reason(10_000),
            Some(OfflineReason::Shutdown)
        );
    }

    #[test]
    fn huge_numbers_from_the_bus_saturate_instead_of_overflowing() {
        let mut r = record(AgentState::Online, u64::MAX - 10);
        r.heartbeat.interval_ms = u64::MAX;
        assert_eq!(r.offline_reason(u64::MAX), None);
        r.stored_at = 10_000;
        assert_eq!(r.offline_reason(u64::MAX), None, "never silent long enough");
        r.heartbeat.interval_ms = u64::MAX / 2;
        assert_eq!(r.offline_reason(20_000), None);
    }
}
