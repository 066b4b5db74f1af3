//! The Prometheus `/metrics` endpoint.
//!
//! The driver refreshes a [`Snapshot`] of what the daemon knows at every tick;
//! each scrape encodes the latest one whole with `prometheus-client` (text
//! format 0.0.4), so a scrape never sees half of one tick and half of the
//! next, and a host or plan that is gone disappears from the next scrape. The
//! heartbeat counter is read live. HTTP is `hyper` (HTTP/1.1): `GET
//! /metrics` answers the metrics, any other path 404.
//!
//! Metric names, labels and meanings are documented in `docs/operations.md`
//! ("Metrics"); dashboards and alert rules depend on them, so they never
//! change meaning.

use std::convert::Infallible;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_protocol::repo::RepoStats;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeGaugeValue, EncodeLabelSet, EncodeMetric,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// A client that has not sent its request headers by then is dropped.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// The last successful backup of one host for one plan.
#[derive(Debug, Clone, PartialEq)]
pub struct LastSuccess {
    /// The host.
    pub host: String,
    /// The plan.
    pub plan: String,
    /// When it finished (unix seconds).
    pub at_secs: f64,
    /// Bytes it added to the repository.
    pub bytes_added: u64,
    /// How long it took (seconds).
    pub duration_secs: f64,
}

/// One storage root of a storage host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageRoot {
    /// The host.
    pub host: String,
    /// The root's path.
    pub path: String,
    /// Free bytes.
    pub free_bytes: u64,
    /// Size of its filesystem.
    pub total_bytes: u64,
}

/// What the daemon last knew, encoded on each scrape.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    /// Last successes, one per host and plan.
    pub successes: Vec<LastSuccess>,
    /// `(host, up)` of every known agent.
    pub agents: Vec<(String, bool)>,
    /// Storage roots.
    pub storage: Vec<StorageRoot>,
    /// `(storage, stats)` of each repository that answered.
    pub repositories: Vec<(String, RepoStats)>,
    /// Whether this daemon holds the lease.
    pub leader: bool,
    /// Jobs running now.
    pub running_jobs: usize,
    /// Heartbeats received since start; read live at each scrape.
    pub heartbeats: Arc<AtomicU64>,
}

/// Reads one number out of a repository's stats.
type StatField = fn(&RepoStats) -> u64;

/// Encodes one gauge family: its HELP and TYPE lines, then one sample per
/// `(labels, value)` (none is fine: the family is still described).
fn gauges<L: EncodeLabelSet, V: EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, V)>,
) -> fmt::Result {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, value) in samples {
        family.encode_family(&labels)?.encode_gauge(&value)?;
    }
    Ok(())
}

/// Encodes one gauge without labels.
fn gauge<V: EncodeGaugeValue>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: V,
) -> fmt::Result {
    encoder
        .encode_descriptor(name, help, None, MetricType::Gauge)?
        .encode_gauge(&value)
}

impl Snapshot {
    /// Encodes every family, in the order of `docs/operations.md`.
    fn encode(&self, encoder: &mut DescriptorEncoder) -> fmt::Result {
        let by_success = |pick: fn(&LastSuccess) -> f64| {
            self.successes.iter().map(move |s| {
                (
                    [("host", s.host.as_str()), ("plan", s.plan.as_str())],
                    pick(s),
                )
            })
        };
        gauges(
            encoder,
            "flotilla_last_success_timestamp_seconds",
            "End of the last successful backup.",
            by_success(|s| s.at_secs),
        )?;
        gauges(
            encoder,
            "flotilla_last_backup_added_bytes",
            "Bytes the last successful backup added to the repository.",
            self.successes.iter().map(|s| {
                (
                    [("host", s.host.as_str()), ("plan", s.plan.as_str())],
                    s.bytes_added,
                )
            }),
        )?;
        gauges(
            encoder,
            "flotilla_last_backup_duration_seconds",
            "Duration of the last successful backup.",
            by_success(|s| s.duration_secs),
        )?;
        gauges(
            encoder,
            "flotilla_agent_up",
            "Whether the agent is heartbeating.",
            self.agents
                .iter()
                .map(|(host, up)| ([("host", host.as_str())], u32::from(*up))),
        )?;
        let by_root = |pick: fn(&StorageRoot) -> u64| {
            self.storage.iter().map(move |r| {
                (
                    [("host", r.host.as_str()), ("path", r.path.as_str())],
                    pick(r),
                )
            })
        };
        gauges(
            encoder,
            "flotilla_storage_free_bytes",
            "Free bytes of a storage root.",
            by_root(|r| r.free_bytes),
        )?;
        gauges(
            encoder,
            "flotilla_storage_size_bytes",
            "Size of a storage root's filesystem.",
            by_root(|r| r.total_bytes),
        )?;
        let repo_gauges: [(&str, &str, StatField); 3] = [
            (
                "flotilla_repository_stored_bytes",
                "Bytes of pack files in a repository (after dedup, compression, encryption).",
                |r| r.stored_bytes,
            ),
            ("flotilla_repository_blobs", "Blobs in a repository.", |r| {
                r.blobs
            }),
            (
                "flotilla_repository_snapshots",
                "Snapshots in a repository.",
                |r| r.snapshots,
            ),
        ];
        for (name, help, value) in repo_gauges {
            gauges(
                encoder,
                name,
                help,
                self.repositories
                    .iter()
                    .map(|(storage, r)| ([("storage", storage.as_str())], value(r))),
            )?;
        }
        gauge(
            encoder,
            "flotilla_coordinator_leader",
            "Whether this daemon holds the dispatch lease.",
            u32::from(self.leader),
        )?;
        gauge(
            encoder,
            "flotilla_running_jobs",
            "Jobs this daemon is following.",
            self.running_jobs,
        )?;
        // A counter: the encoder adds the `_total` suffix.
        let heartbeats = ConstCounter::new(self.heartbeats.load(Ordering::Relaxed));
        heartbeats.encode(encoder.encode_descriptor(
            "flotilla_heartbeats_received",
            "Agent heartbeats this daemon has taken into its registry.",
            None,
            heartbeats.metric_type(),
        )?)
    }
}

/// Encodes the latest snapshot at each scrape.
#[derive(Debug)]
struct Latest(Arc<Mutex<Snapshot>>);

impl Collector for Latest {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        // A panic while the driver held the lock leaves a whole snapshot
        // behind (it is replaced in one assignment): still worth serving.
        let snapshot = match self.0.lock() {
            Ok(s) => s.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        snapshot.encode(&mut encoder)
    }
}

/// The registry `/metrics` encodes: every family, from `snapshot`.
pub fn registry(snapshot: Arc<Mutex<Snapshot>>) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Latest(snapshot)));
    registry
}

/// The Prometheus text format of `registry`.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    if let Err(e) = prometheus_text::encode(&mut out, registry) {
        // Writing into a String fails only if an encoder refuses a value.
        warn!(error = %e, "cannot encode the metrics");
    }
    out
}

/// The answer to one request.
fn respond(registry: &Registry, method: &Method, path: &str) -> Response<String> {
    let readable = *method == Method::GET || *method == Method::HEAD;
    let (status, content_type, body) = match path {
        "/metrics" if readable => (
            StatusCode::OK,
            prometheus_text::CONTENT_TYPE,
            render(registry),
        ),
        "/metrics" => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "only GET /metrics\n".to_owned(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "try /metrics\n".to_owned(),
        ),
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    if status == StatusCode::METHOD_NOT_ALLOWED {
        headers.insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
    }
    response
}

/// Serves `/metrics` on `listener` until `cancel` fires; open connections
/// end with it.
pub async fn serve(listener: TcpListener, registry: Registry, cancel: CancellationToken) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "serving /metrics");
    }
    let registry = Arc::new(registry);
    // Connections are owned here: dropping the set at return aborts them.
    let mut connections = JoinSet::new();
    loop {
        let (stream, peer) = tokio::select! {
            _ = cancel.cancelled() => return,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(c) => c,
                Err(e) => {
                    // Out of file descriptors, most likely: let some close.
                    warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let registry = registry.clone();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let response = respond(&registry, req.method(), req.uri().path());
            async move { Ok::<_, Infallible>(response) }
        });
        let mut http = hyper::server::conn::http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT);
        let connection = http.serve_connection(TokioIo::new(stream), service);
        connections.spawn(async move {
            if let Err(e) = connection.await {
                debug!(%peer, error = %e, "metrics connection ended");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn snapshot() -> Snapshot {
        Snapshot {
            successes: vec![LastSuccess {
                host: "alpha".into(),
                plan: "home".into(),
                at_secs: 1_767_225_600.5,
                bytes_added: 4096,
                duration_secs: 2.25,
            }],
            agents: vec![("alpha".into(), true), ("nas".into(), false)],
            storage: vec![StorageRoot {
                host: "nas".into(),
                // Every character the format must escape.
                path: "/srv/\"odd\"\\dir\nx".into(),
                free_bytes: 10,
                total_bytes: 100,
            }],
            repositories: vec![(
                "nas".into(),
                RepoStats {
                    stored_bytes: 1234,
                    blobs: 56,
                    snapshots: 7,
                    ..Default::default()
                },
            )],
            leader: true,
            running_jobs: 2,
            heartbeats: Arc::new(AtomicU64::new(41)),
        }
    }

    /// `name{labels} value` lines by their `name{labels}` part, and the
    /// `# TYPE` of each family.
    fn parse(text: &str) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
        let mut samples = BTreeMap::new();
        let mut types = BTreeMap::new();
        for line in text.lines() {
            if let Some(t) = line.strip_prefix("# TYPE ") {
                let (name, kind) = t.split_once(' ').expect("TYPE name kind");
                types.insert(name.to_owned(), kind.to_owned());
            } else if !line.starts_with('#') && !line.is_empty() {
                let (series, value) = line.rsplit_once(' ').expect("series value");
                samples.insert(series.to_owned(), value.to_owned());
            }
        }
        (samples, types)
    }

    #[test]
    fn every_family_keeps_its_name_labels_and_value() {
        let shared = Arc::new(Mutex::new(snapshot()));
        let text = render(&registry(shared.clone()));
        let (samples, types) = parse(&text);
        let value = |series: &str| -> f64 {
            samples
                .get(series)
                .unwrap_or_else(|| panic!("no {series} in:\n{text}"))
                .parse()
                .expect("a number")
        };
        let home = r#"{host="alpha",plan="home"}"#;
        assert_eq!(
            value(&format!("flotilla_last_success_timestamp_seconds{home}")),
            1_767_225_600.5
        );
        assert_eq!(
            value(&format!("flotilla_last_backup_added_bytes{home}")),
            4096.0
        );
        assert_eq!(
            value(&format!("flotilla_last_backup_duration_seconds{home}")),
            2.25
        );
        assert_eq!(value(r#"flotilla_agent_up{host="alpha"}"#), 1.0);
        assert_eq!(value(r#"flotilla_agent_up{host="nas"}"#), 0.0);
        let root = r#"{host="nas",path="/srv/\"odd\"\\dir\nx"}"#;
        assert_eq!(value(&format!("flotilla_storage_free_bytes{root}")), 10.0);
        assert_eq!(value(&format!("flotilla_storage_size_bytes{root}")), 100.0);
        assert_eq!(
            value(r#"flotilla_repository_stored_bytes{storage="nas"}"#),
            1234.0
        );
        assert_eq!(value(r#"flotilla_repository_blobs{storage="nas"}"#), 56.0);
        assert_eq!(
            value(r#"flotilla_repository_snapshots{storage="nas"}"#),
            7.0
        );
        assert_eq!(value("flotilla_coordinator_leader"), 1.0);
        assert_eq!(value("flotilla_running_jobs"), 2.0);
        assert_eq!(value("flotilla_heartbeats_received_total"), 41.0);
        assert_eq!(samples.len(), 13, "{text}");
        assert_eq!(
            types
                .get("flotilla_heartbeats_received_total")
                .map(String::as_str),
            Some("counter")
        );
        assert_eq!(types.len(), 12, "{text}");
        assert!(types
            .iter()
            .filter(|(name, _)| !name.ends_with("_total"))
            .all(|(_, kind)| kind == "gauge"));

        // The counter is read live; the rest waits for the next snapshot.
        shared
            .lock()
            .expect("not poisoned")
            .heartbeats
            .fetch_add(1, Ordering::Relaxed);
        let (again, _) = parse(&render(&registry(shared)));
        assert_eq!(
            again
                .get("flotilla_heartbeats_received_total")
                .map(String::as_str),
            Some("42")
        );
    }

    /// Before the first tick every family is still described, with the
    /// label-less ones at zero.
    #[test]
    fn an_empty_snapshot_describes_every_family() {
        let text = render(&registry(Arc::new(Mutex::new(Snapshot::default()))));
        let (samples, types) = parse(&text);
        assert_eq!(types.len(), 12, "{text}");
        assert_eq!(
            samples.keys().map(String::as_str).collect::<Vec<_>>(),
            [
                "flotilla_coordinator_leader",
                "flotilla_heartbeats_received_total",
                "flotilla_running_jobs"
            ]
        );
        assert!(samples.values().all(|v| v == "0"), "{text}");
    }

    /// One request over a fresh connection: the status line and the body.
    async fn get(addr: std::net::SocketAddr, method: &str, path: &str) -> (String, String) {
        let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let request = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        conn.write_all(request.as_bytes()).await.expect("send");
        let mut raw = String::new();
        tokio::time::timeout(Duration::from_secs(10), conn.read_to_string(&mut raw))
            .await
            .expect("answered in time")
            .expect("read");
        let (head, body) = raw.split_once("\r\n\r\n").expect("headers end");
        let status = head.lines().next().unwrap_or_default().to_owned();
        (status, body.to_owned())
    }

    #[tokio::test]
    async fn get_metrics_answers_and_other_paths_are_404() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let cancel = CancellationToken::new();
        let registry = registry(Arc::new(Mutex::new(snapshot())));
        let server = tokio::spawn(serve(listener, registry, cancel.clone()));

        let (status, body) = get(addr, "GET", "/metrics").await;
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert!(body.contains("flotilla_coordinator_leader 1\n"), "{body}");
        let (status, _) = get(addr, "GET", "/").await;
        assert_eq!(status, "HTTP/1.1 404 Not Found");
        let (status, _) = get(addr, "POST", "/metrics").await;
        assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");

        cancel.cancel();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the server stops when cancelled")
            .expect("no panic");
    }
}
