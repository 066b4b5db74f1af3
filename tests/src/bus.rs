//! Talking to the agents over NATS directly, as an attacker or a monitoring
//! tool would, bypassing the CLI.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use async_nats::Client;
use bytes::Bytes;
use flotilla_protocol::{subject, HostName, SigningSeed, UnixMillis};
use futures::StreamExt;
use serde_json::Value;

/// Connects a plain client to `url`.
pub async fn connect(url: &str) -> Result<Client> {
    async_nats::connect(url)
        .await
        .with_context(|| format!("cannot connect to NATS at {url}"))
}

/// Connects to `url` as the user in the `.creds` file `creds`, checking the
/// server's certificate against `ca`, with replies under `inbox_prefix`
/// (the only inboxes a fleet user may read).
pub async fn connect_as(url: &str, creds: &Path, ca: &Path, inbox_prefix: &str) -> Result<Client> {
    async_nats::ConnectOptions::with_credentials_file(creds)
        .await
        .with_context(|| format!("cannot read {}", creds.display()))?
        .add_root_certificates(ca.to_path_buf())
        .require_tls(true)
        .custom_inbox_prefix(inbox_prefix)
        .connection_timeout(Duration::from_secs(5))
        .connect(url)
        .await
        .with_context(|| format!("cannot connect to NATS at {url} as {}", creds.display()))
}

/// Connects to `url` with no credentials, over TLS checked against `ca`.
pub async fn connect_anonymous(url: &str, ca: &Path) -> Result<Client> {
    async_nats::ConnectOptions::new()
        .add_root_certificates(ca.to_path_buf())
        .require_tls(true)
        .connection_timeout(Duration::from_secs(5))
        .connect(url)
        .await
        .with_context(|| format!("cannot connect to NATS at {url} anonymously"))
}

/// Publishes `payload` to `host`'s task subject through JetStream and waits for
/// the stream's acknowledgement, exactly as the coordinator sends tasks.
///
/// The task stream is created by `flotilla doctor` (`Fleet::init` runs it).
pub async fn publish_task(client: &Client, host: &str, payload: impl Into<Bytes>) -> Result<()> {
    let host = HostName::new(host)?;
    let subject = subject::task(&host);
    let payload = payload.into();
    let len = payload.len();
    let jetstream = async_nats::jetstream::new(client.clone());
    jetstream
        .publish(subject.clone(), payload)
        .await
        .with_context(|| format!("cannot publish {len} bytes to {subject}"))?
        .await
        .with_context(|| {
            format!("JetStream did not store {len} bytes on {subject} (is the task stream there, and does it take messages this big?)")
        })?;
    Ok(())
}

/// Sends one NATS micro `PING` to every `flotilla-agent` and collects the replies
/// that arrive within `wait`, parsed as JSON.
pub async fn ping_agents(client: &Client, wait: Duration) -> Result<Vec<Value>> {
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await?;
    client
        .publish_with_reply(
            format!("$SRV.PING.{}", subject::AGENT_SERVICE),
            inbox,
            Bytes::new(),
        )
        .await?;
    client.flush().await?;

    let deadline = tokio::time::Instant::now() + wait;
    let mut out = Vec::new();
    while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, replies.next()).await {
        let reply: Value = serde_json::from_slice(&msg.payload).with_context(|| {
            format!(
                "ping reply is not JSON: {:?}",
                String::from_utf8_lossy(&msg.payload)
            )
        })?;
        out.push(reply);
    }
    Ok(out)
}

/// The `id`s of ping replies, sorted.
pub fn ping_ids(replies: &[Value]) -> Vec<String> {
    let mut ids: Vec<String> = replies
        .iter()
        .map(|r| r["id"].as_str().unwrap_or("<no id>").to_owned())
        .collect();
    ids.sort();
    ids
}

/// A signing key that is not the fleet's, for forgeries.
pub fn random_seed() -> SigningSeed {
    let mut seed = [0u8; 32];
    seed[..16].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    seed[16..].copy_from_slice(uuid::Uuid::new_v4().as_bytes());
    SigningSeed(seed)
}

/// Now, in the wire's time representation.
pub fn now_ms() -> UnixMillis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
