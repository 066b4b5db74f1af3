//! A Prometheus `/metrics` endpoint, served by hand (one route, plain text).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// What the daemon last knew, rendered on each scrape.
#[derive(Debug, Default, Clone)]
pub struct Snapshot {
    /// `(host, plan, unix seconds, bytes added, duration seconds)` of last successes.
    pub successes: Vec<(String, String, f64, u64, f64)>,
    /// `(host, up)` of every known agent.
    pub agents: Vec<(String, bool)>,
    /// `(storage, path, free, total)` of storage roots.
    pub storage: Vec<(String, String, u64, u64)>,
    /// `(storage, stats)` of each repository.
    pub repositories: Vec<(String, flotilla_protocol::repo::RepoStats)>,
    /// Whether this daemon holds the lease.
    pub leader: bool,
    /// Jobs running now.
    pub running_jobs: usize,
    /// Heartbeats received since start; read live at each scrape.
    pub heartbeats: Arc<AtomicU64>,
}

fn label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// `{k="v",...}` from label pairs, values escaped.
fn labels(pairs: &[(&str, &str)]) -> String {
    let inner: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}=\"{}\"", label(v)))
        .collect();
    format!("{{{}}}", inner.join(","))
}

/// Writes one metric family: its HELP and TYPE lines, then one sample per
/// `(labels, value)`.
fn family<V: std::fmt::Display>(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    samples: impl IntoIterator<Item = (String, V)>,
) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{labels} {value}");
    }
}

/// Reads one number out of a repository's stats.
type StatField = fn(&flotilla_protocol::repo::RepoStats) -> u64;

/// Renders the Prometheus text format.
pub fn render(s: &Snapshot) -> String {
    let mut out = String::new();
    let by_success = |pick: fn(&(String, String, f64, u64, f64)) -> String| {
        s.successes
            .iter()
            .map(move |x| (labels(&[("host", &x.0), ("plan", &x.1)]), pick(x)))
    };
    family(
        &mut out,
        "flotilla_last_success_timestamp_seconds",
        "gauge",
        "End of the last successful backup.",
        by_success(|x| x.2.to_string()),
    );
    family(
        &mut out,
        "flotilla_last_backup_added_bytes",
        "gauge",
        "Bytes the last successful backup added to the repository.",
        by_success(|x| x.3.to_string()),
    );
    family(
        &mut out,
        "flotilla_last_backup_duration_seconds",
        "gauge",
        "Duration of the last successful backup.",
        by_success(|x| x.4.to_string()),
    );
    family(
        &mut out,
        "flotilla_agent_up",
        "gauge",
        "Whether the agent is heartbeating.",
        s.agents
            .iter()
            .map(|(host, up)| (labels(&[("host", host)]), u8::from(*up))),
    );
    let by_root = |pick: fn(&(String, String, u64, u64)) -> u64| {
        s.storage
            .iter()
            .map(move |x| (labels(&[("host", &x.0), ("path", &x.1)]), pick(x)))
    };
    family(
        &mut out,
        "flotilla_storage_free_bytes",
        "gauge",
        "Free bytes of a storage root.",
        by_root(|x| x.2),
    );
    family(
        &mut out,
        "flotilla_storage_size_bytes",
        "gauge",
        "Size of a storage root's filesystem.",
        by_root(|x| x.3),
    );
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
        family(
            &mut out,
            name,
            "gauge",
            help,
            s.repositories
                .iter()
                .map(|(storage, r)| (labels(&[("storage", storage)]), value(r))),
        );
    }
    family(
        &mut out,
        "flotilla_coordinator_leader",
        "gauge",
        "Whether this daemon holds the dispatch lease.",
        [(String::new(), u8::from(s.leader))],
    );
    family(
        &mut out,
        "flotilla_running_jobs",
        "gauge",
        "Jobs this daemon is following.",
        [(String::new(), s.running_jobs)],
    );
    family(
        &mut out,
        "flotilla_heartbeats_received_total",
        "counter",
        "Agent heartbeats this daemon has taken into its registry.",
        [(String::new(), s.heartbeats.load(Ordering::Relaxed))],
    );
    out
}

/// Serves `/metrics` until `cancel` fires.
pub async fn serve(
    listener: TcpListener,
    snapshot: Arc<Mutex<Snapshot>>,
    cancel: CancellationToken,
) {
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "serving /metrics");
    }
    loop {
        let (mut conn, _) = tokio::select! {
            _ = cancel.cancelled() => return,
            a = listener.accept() => match a {
                Ok(c) => c,
                Err(e) => { warn!(error = %e, "metrics accept failed"); continue; }
            },
        };
        let snapshot = snapshot.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let n =
                match tokio::time::timeout(std::time::Duration::from_secs(5), conn.read(&mut buf))
                    .await
                {
                    Ok(Ok(n)) => n,
                    _ => return,
                };
            let request = String::from_utf8_lossy(&buf[..n]);
            let path = request.split_whitespace().nth(1).unwrap_or("");
            let (status, body) = if path == "/metrics" {
                let s = snapshot.lock().map(|s| s.clone()).unwrap_or_default();
                ("200 OK", render(&s))
            } else {
                ("404 Not Found", "try /metrics\n".to_owned())
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = conn.write_all(response.as_bytes()).await;
        });
    }
}
