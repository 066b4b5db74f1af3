//! `flotilla hosts`: the fleet registry.

use flotilla_protocol::{Role, RootUsage, RunningJob};
use serde::Serialize;

use super::{output, Global};
use crate::error::CliError;
use crate::nats::HostRecord;

/// One row of `hosts --json`.
#[derive(Debug, Serialize)]
struct HostView<'a> {
    host: &'a str,
    status: &'static str,
    offline_reason: Option<&'static str>,
    last_seen: u64,
    last_seen_age_secs: f64,
    version: &'a str,
    roles: &'a [Role],
    quic_addr: Option<&'a str>,
    uptime_secs: u64,
    load: [f32; 3],
    rss_bytes: u64,
    roots: &'a [RootUsage],
    running: &'a [RunningJob],
}

fn view(r: &HostRecord, now: u64) -> HostView<'_> {
    let hb = &r.heartbeat;
    let reason = r.offline_reason(now);
    HostView {
        host: hb.host.as_str(),
        status: if reason.is_some() {
            "offline"
        } else {
            "online"
        },
        offline_reason: reason,
        last_seen: r.stored_at,
        last_seen_age_secs: now.saturating_sub(r.stored_at) as f64 / 1000.0,
        version: &hb.version,
        roles: &hb.roles,
        quic_addr: hb.quic_addr.as_deref(),
        uptime_secs: hb.time.saturating_sub(hb.started_at) / 1000,
        load: hb.load,
        rss_bytes: hb.rss_bytes,
        roots: &hb.roots,
        running: &hb.running,
    }
}

pub(super) async fn run(g: &Global, json: bool) -> Result<(), CliError> {
    let nats = g.connect().await?;
    let records = nats.hosts().await?;
    let now = crate::now_ms();
    let views: Vec<HostView<'_>> = records.iter().map(|r| view(r, now)).collect();
    if json {
        let text = serde_json::to_string_pretty(&views).unwrap_or_else(|_| "[]".into());
        outln!("{text}");
        return Ok(());
    }
    if views.is_empty() {
        outln!("no hosts yet: start `flotilla-agent run --bundle FILE ...` on a host");
        return Ok(());
    }
    outln!(
        "{:<20} {:<8} {:<10} {:<8} {:<24} {:>11} RUNNING",
        "HOST",
        "STATUS",
        "LAST SEEN",
        "VERSION",
        "ROLES",
        "MIN FREE"
    );
    for v in &views {
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
                .map(|j| j.kind.as_str())
                .collect::<Vec<_>>()
                .join(",")
        };
        let status = match v.offline_reason {
            Some("shutdown") => "stopped",
            Some(_) => "OFFLINE",
            None => "online",
        };
        outln!(
            "{:<20} {:<8} {:<10} {:<8} {:<24} {:>11} {}",
            v.host,
            status,
            output::ago(now, v.last_seen),
            v.version,
            roles.join(","),
            free,
            running
        );
    }
    Ok(())
}
