//! `flotilla hosts`: the fleet registry.

use std::net::SocketAddr;

use flotilla_protocol::{OfflineReason, Role, RootUsage, RunningJob, TaskId};
use serde::Serialize;

use super::{output, Global};
use crate::error::CliError;
use crate::nats::HostRecord;

/// One row of `hosts --json`; times are RFC 3339, as in every `--json`.
#[derive(Debug, Serialize)]
struct HostView<'a> {
    host: &'a str,
    status: &'static str,
    offline_reason: Option<OfflineReason>,
    last_seen: String,
    #[serde(skip)]
    last_seen_ms: u64,
    last_seen_age_secs: f64,
    version: &'a str,
    roles: &'a [Role],
    quic_addr: Option<SocketAddr>,
    uptime_secs: u64,
    load: [f32; 3],
    rss_bytes: u64,
    roots: &'a [RootUsage],
    running: Vec<RunningView<'a>>,
}

/// A running job in `--json` output: its start as RFC 3339.
#[derive(Debug, Serialize)]
pub(super) struct RunningView<'a> {
    task_id: &'a TaskId,
    kind: &'a str,
    started_at: String,
}

impl<'a> RunningView<'a> {
    pub(super) fn of(jobs: &'a [RunningJob]) -> Vec<Self> {
        jobs.iter()
            .map(|j| RunningView {
                task_id: &j.task_id,
                kind: &j.kind,
                started_at: output::rfc3339(j.started_at),
            })
            .collect()
    }
}

fn view(r: &HostRecord, now: u64, revoked: bool) -> HostView<'_> {
    let hb = &r.heartbeat;
    let reason = r.offline_reason(now);
    HostView {
        host: hb.host.as_str(),
        status: if revoked {
            "revoked"
        } else if reason.is_some() {
            "offline"
        } else {
            "online"
        },
        offline_reason: reason,
        last_seen: output::rfc3339(r.stored_at),
        last_seen_ms: r.stored_at,
        last_seen_age_secs: now.saturating_sub(r.stored_at) as f64 / 1000.0,
        version: &hb.version,
        roles: &hb.roles,
        quic_addr: hb.quic_addr,
        uptime_secs: hb.time.saturating_sub(hb.started_at) / 1000,
        load: hb.load,
        rss_bytes: hb.rss_bytes,
        roots: &hb.roots,
        running: RunningView::of(&hb.running),
    }
}

pub(super) async fn run(g: &Global, json: bool) -> Result<(), CliError> {
    let nats = g.connect().await?;
    let records = nats.hosts().await?;
    // `flotilla revoke` records revocations in the fleet directory; a
    // revoked host's last heartbeat stays in the bucket until it expires.
    // Without a fleet directory (a bus without authentication) there are
    // no revocations to show.
    let revoked = match g.fleet {
        Some(_) => g.fleet()?.revoked_hosts()?,
        None => Default::default(),
    };
    let now = crate::now_ms();
    let views: Vec<HostView<'_>> = records
        .iter()
        .map(|r| view(r, now, revoked.contains(&r.heartbeat.host)))
        .collect();
    if json {
        let text = serde_json::to_string_pretty(&views).unwrap_or_else(|_| "[]".into());
        outln!("{text}");
        return Ok(());
    }
    if views.is_empty() {
        outln!("no hosts yet: start `flotilla-agent run --bundle FILE ...` on a host");
        return Ok(());
    }
    let rows = views
        .iter()
        .map(|v| {
            let roles: Vec<String> = v
                .roles
                .iter()
                .map(|r| format!("{r:?}").to_lowercase())
                .collect();
            let free = v
                .roots
                .iter()
                .filter(|r| r.error.is_none())
                .map(|r| r.free_bytes)
                .min()
                .map(output::bytes)
                .unwrap_or_else(|| "-".into());
            let running = if v.running.is_empty() {
                "-".to_string()
            } else {
                v.running
                    .iter()
                    .map(|j| j.kind)
                    .collect::<Vec<_>>()
                    .join(",")
            };
            let status = match v.offline_reason {
                _ if v.status == "revoked" => "REVOKED",
                Some(OfflineReason::Shutdown) => "stopped",
                Some(_) => "OFFLINE",
                None => "online",
            };
            vec![
                v.host.to_owned(),
                status.to_owned(),
                output::ago(now, v.last_seen_ms),
                v.version.to_owned(),
                roles.join(","),
                free,
                running,
            ]
        })
        .collect();
    for line in output::table(
        &[
            "HOST",
            "STATUS",
            "LAST SEEN",
            "VERSION",
            "ROLES",
            "MIN FREE",
            "RUNNING",
        ],
        &[5],
        rows,
    ) {
        outln!("{line}");
    }
    Ok(())
}

/// `flotilla remove HOST`: takes a decommissioned host out of the registry.
pub(super) async fn remove(
    g: &Global,
    host: &flotilla_protocol::HostName,
    force: bool,
    json: bool,
) -> Result<(), CliError> {
    let nats = g.connect().await?;
    let record = nats
        .host(host)
        .await?
        .ok_or_else(|| CliError::HostUnknown(host.to_string()))?;
    if record.offline_reason(crate::now_ms()).is_none() && !force {
        return Err(CliError::Usage(format!(
            "host {host} is online: stop its agent first (or give --force; a running agent registers again at its next heartbeat)"
        )));
    }
    let dropped = nats.remove_host(host).await?;
    if json {
        outln!(
            "{}",
            serde_json::json!({"host": host.as_str(), "removed": true, "tasks_dropped": dropped})
        );
    } else {
        outln!(
            "removed {host} from the registry ({dropped} queued task(s) dropped); its snapshots stay on their storage hosts, and an agent started with its bundle joins again"
        );
    }
    Ok(())
}
