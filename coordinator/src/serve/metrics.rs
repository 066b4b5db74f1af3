//! A Prometheus `/metrics` endpoint, served by hand (one route, plain text).

use std::fmt::Write as _;
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
}

fn label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Reads one number out of a repository's stats.
type StatField = fn(&flotilla_protocol::repo::RepoStats) -> u64;

/// Renders the Prometheus text format.
pub fn render(s: &Snapshot) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP flotilla_last_success_timestamp_seconds End of the last successful backup."
    );
    let _ = writeln!(out, "# TYPE flotilla_last_success_timestamp_seconds gauge");
    for (host, plan, t, _, _) in &s.successes {
        let _ = writeln!(
            out,
            "flotilla_last_success_timestamp_seconds{{host=\"{}\",plan=\"{}\"}} {t}",
            label(host),
            label(plan)
        );
    }
    let _ = writeln!(out, "# HELP flotilla_last_backup_added_bytes Bytes the last successful backup added to the repository.");
    let _ = writeln!(out, "# TYPE flotilla_last_backup_added_bytes gauge");
    for (host, plan, _, bytes, _) in &s.successes {
        let _ = writeln!(
            out,
            "flotilla_last_backup_added_bytes{{host=\"{}\",plan=\"{}\"}} {bytes}",
            label(host),
            label(plan)
        );
    }
    let _ = writeln!(
        out,
        "# HELP flotilla_last_backup_duration_seconds Duration of the last successful backup."
    );
    let _ = writeln!(out, "# TYPE flotilla_last_backup_duration_seconds gauge");
    for (host, plan, _, _, d) in &s.successes {
        let _ = writeln!(
            out,
            "flotilla_last_backup_duration_seconds{{host=\"{}\",plan=\"{}\"}} {d}",
            label(host),
            label(plan)
        );
    }
    let _ = writeln!(
        out,
        "# HELP flotilla_agent_up Whether the agent is heartbeating."
    );
    let _ = writeln!(out, "# TYPE flotilla_agent_up gauge");
    for (host, up) in &s.agents {
        let _ = writeln!(
            out,
            "flotilla_agent_up{{host=\"{}\"}} {}",
            label(host),
            u8::from(*up)
        );
    }
    let _ = writeln!(
        out,
        "# HELP flotilla_storage_free_bytes Free bytes of a storage root."
    );
    let _ = writeln!(out, "# TYPE flotilla_storage_free_bytes gauge");
    for (host, path, free, _) in &s.storage {
        let _ = writeln!(
            out,
            "flotilla_storage_free_bytes{{host=\"{}\",path=\"{}\"}} {free}",
            label(host),
            label(path)
        );
    }
    let _ = writeln!(
        out,
        "# HELP flotilla_storage_size_bytes Size of a storage root's filesystem."
    );
    let _ = writeln!(out, "# TYPE flotilla_storage_size_bytes gauge");
    for (host, path, _, total) in &s.storage {
        let _ = writeln!(
            out,
            "flotilla_storage_size_bytes{{host=\"{}\",path=\"{}\"}} {total}",
            label(host),
            label(path)
        );
    }
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
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} gauge");
        for (storage, r) in &s.repositories {
            let _ = writeln!(out, "{name}{{storage=\"{}\"}} {}", label(storage), value(r));
        }
    }
    let _ = writeln!(
        out,
        "# HELP flotilla_coordinator_leader Whether this daemon holds the dispatch lease."
    );
    let _ = writeln!(out, "# TYPE flotilla_coordinator_leader gauge");
    let _ = writeln!(out, "flotilla_coordinator_leader {}", u8::from(s.leader));
    let _ = writeln!(
        out,
        "# HELP flotilla_running_jobs Jobs this daemon is following."
    );
    let _ = writeln!(out, "# TYPE flotilla_running_jobs gauge");
    let _ = writeln!(out, "flotilla_running_jobs {}", s.running_jobs);
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
