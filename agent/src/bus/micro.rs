//! NATS micro service discovery, answered with the host name as service id.
//!
//! async-nats's service builder generates a random instance id; Flotilla wants
//! `$SRV.PING.flotilla-agent.<host>` to reach exactly one host, so the agent
//! answers the three discovery verbs itself (the protocol is three JSON replies)
//! and serves one endpoint, `health`, with its latest heartbeat.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use flotilla_protocol::{subject, HostName};
use futures::StreamExt;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// The latest encoded heartbeat, shared with the heartbeat loop.
pub type LatestHealth = Arc<Mutex<Option<bytes::Bytes>>>;

/// Answers discovery and health requests until `cancel` fires.
pub async fn serve(
    client: async_nats::Client,
    host: HostName,
    version: &'static str,
    started: String,
    latest: LatestHealth,
    cancel: CancellationToken,
) -> Result<(), async_nats::SubscribeError> {
    let mut subs = Vec::new();
    for verb in ["PING", "INFO", "STATS"] {
        for subj in subject::service_verbs(verb, &host) {
            let sub = client.subscribe(subj).await?;
            subs.push(sub.map(move |m| (verb, m)).boxed());
        }
    }
    let health_subject = subject::health_endpoint(&host);
    let health = client.subscribe(health_subject.clone()).await?;
    subs.push(health.map(|m| ("HEALTH", m)).boxed());
    let mut requests = futures::stream::select_all(subs);

    let requests_served = AtomicU64::new(0);
    let metadata: HashMap<&str, &str> = HashMap::from([("host", host.as_str())]);
    let endpoint = |stats: bool| {
        let mut e = json!({
            "name": "health",
            "subject": health_subject,
            "queue_group": "q",
            "metadata": {},
        });
        if stats {
            e["num_requests"] = json!(requests_served.load(Ordering::Relaxed));
            e["num_errors"] = json!(0);
            e["processing_time"] = json!(0);
            e["average_processing_time"] = json!(0);
        }
        e
    };

    loop {
        let (verb, msg) = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            next = requests.next() => match next {
                Some(m) => m,
                None => return Ok(()),
            },
        };
        // Discovery requests carry no meaningful payload; whatever bytes come
        // along are ignored, so hostile payloads cannot hurt here.
        let Some(reply) = msg.reply else { continue };
        let body: bytes::Bytes = match verb {
            "PING" => json!({
                "type": "io.nats.micro.v1.ping_response",
                "name": subject::AGENT_SERVICE,
                "id": host.as_str(),
                "version": version,
                "metadata": metadata,
            })
            .to_string()
            .into(),
            "INFO" => json!({
                "type": "io.nats.micro.v1.info_response",
                "name": subject::AGENT_SERVICE,
                "id": host.as_str(),
                "version": version,
                "description": "Flotilla backup agent",
                "metadata": metadata,
                "endpoints": [endpoint(false)],
            })
            .to_string()
            .into(),
            "STATS" => json!({
                "type": "io.nats.micro.v1.stats_response",
                "name": subject::AGENT_SERVICE,
                "id": host.as_str(),
                "version": version,
                "started": started,
                "metadata": metadata,
                "endpoints": [endpoint(true)],
            })
            .to_string()
            .into(),
            _ => {
                requests_served.fetch_add(1, Ordering::Relaxed);
                let latest = latest.lock().map(|g| g.clone()).unwrap_or(None);
                latest.unwrap_or_default()
            }
        };
        debug!(verb, "answering service request");
        if let Err(e) = client.publish(reply, body).await {
            warn!(verb, error = %e, "cannot answer service request");
        }
    }
}
