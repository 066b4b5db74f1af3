//! The watchdog's decisions: missed heartbeats, missed RPOs, nearly full
//! storage, version drift. Each alert is raised once per occurrence and
//! cleared once its condition ends; the markers that say "already raised"
//! live in the daemon's [`Store`], so a restart does not raise them again.
//!
//! Pure: the registry and `now` come in, [`Alert`]s go out (the core turns
//! them into events to publish). The watchdog owns the keys of its markers;
//! the core clears an overdue marker through [`overdue_key`] when a backup
//! succeeds.

use std::collections::HashSet;

use flotilla_protocol::{AgentState, EventBody, HostName, OfflineReason, RootKind, Severity};
use tracing::warn;

use super::state::Store;
use crate::config::Config;
use crate::nats::HostRecord;

/// What the watchdog compares the fleet with.
#[derive(Debug)]
pub(super) struct Watch<'a> {
    /// Plans (RPOs) and the low-space ratio.
    pub config: &'a Config,
    /// The coordinator's own version.
    pub version: &'a str,
    /// When the daemon started: a host never backed up is overdue counted
    /// from here.
    pub started: u64,
}

/// An alert the watchdog raises: one event about `host`.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Alert {
    /// The host it is about.
    pub host: HostName,
    /// How bad.
    pub severity: Severity,
    /// One line for people.
    pub message: String,
    /// The event.
    pub body: EventBody,
}

/// The key of a plan's overdue alert for one host.
pub(super) fn overdue_key(plan: &str, host: &HostName) -> String {
    format!("overdue/{plan}/{host}")
}

/// The key of a plan's copy-overdue alert for one host's copies at `dest`.
pub(super) fn copy_overdue_key(plan: &str, dest: &HostName, host: &HostName) -> String {
    format!("copy_overdue/{plan}/{dest}/{host}")
}

/// Raises an alert once: `true` when `key` was not already raised for
/// `marker` (and is now).
fn raise(store: &mut impl Store, key: &str, marker: &[u8]) -> bool {
    if store.alert(key).as_deref() == Some(marker) {
        return false;
    }
    if let Err(e) = store.set_alert(key, marker) {
        warn!(%key, error = %e, "cannot record the alert; it may be raised again");
    }
    true
}

/// Clears an alert whose condition ended.
fn clear(store: &mut impl Store, key: &str) {
    if store.alert(key).is_some() {
        if let Err(e) = store.clear_alert(key) {
            warn!(%key, error = %e, "cannot clear the alert");
        }
    }
}

fn alert(host: &HostName, severity: Severity, message: String, body: EventBody) -> Alert {
    Alert {
        host: host.clone(),
        severity,
        message,
        body,
    }
}

/// Looks at every host and plan at `now`.
pub(super) fn check(
    store: &mut impl Store,
    w: &Watch<'_>,
    now: u64,
    hosts: &[HostRecord],
) -> Vec<Alert> {
    let mut out = Vec::new();
    for rec in hosts {
        offline(store, rec, now, &mut out);
        version(store, w.version, rec, &mut out);
        low_space(store, w.config.serve.low_space_ratio, rec, &mut out);
    }
    overdue(store, w, now, hosts, &mut out);
    copy_overdue(store, w, now, &mut out);
    out
}

/// `agent.offline` once per outage (the outage is named by the time of the
/// last heartbeat before it), cleared when the host heartbeats again.
fn offline(store: &mut impl Store, rec: &HostRecord, now: u64, out: &mut Vec<Alert>) {
    let host = &rec.heartbeat.host;
    let key = format!("offline/{host}");
    match rec.offline_reason(now) {
        Some(OfflineReason::MissedHeartbeats) => {
            if raise(store, &key, &rec.stored_at.to_be_bytes()) {
                let msg = format!(
                    "agent {host} missed its heartbeats (last seen {} s ago)",
                    now.saturating_sub(rec.stored_at) / 1000
                );
                out.push(alert(
                    host,
                    Severity::Error,
                    msg,
                    EventBody::AgentOffline {
                        reason: OfflineReason::MissedHeartbeats,
                    },
                ));
            }
        }
        // A clean shutdown is announced by the agent itself.
        Some(_) => {}
        None => clear(store, &key),
    }
}

/// `agent.version_mismatch` once per version an online agent runs that is
/// not the coordinator's; cleared when they match again.
fn version(store: &mut impl Store, ours: &str, rec: &HostRecord, out: &mut Vec<Alert>) {
    let hb = &rec.heartbeat;
    if hb.state != AgentState::Online {
        return;
    }
    let key = format!("version/{}", hb.host);
    if hb.version == ours {
        return clear(store, &key);
    }
    if raise(store, &key, hb.version.as_bytes()) {
        let msg = format!(
            "agent {} runs {} but the coordinator is {ours}",
            hb.host, hb.version
        );
        out.push(alert(
            &hb.host,
            Severity::Warning,
            msg,
            EventBody::AgentVersionMismatch {
                agent_version: hb.version.clone(),
                coordinator_version: ours.into(),
            },
        ));
    }
}

/// `storage.low_space` once per storage root while its free space is below
/// `ratio` of its size; cleared when it is not.
fn low_space(store: &mut impl Store, ratio: f64, rec: &HostRecord, out: &mut Vec<Alert>) {
    let host = &rec.heartbeat.host;
    let roots = rec
        .heartbeat
        .roots
        .iter()
        .filter(|r| r.kind == RootKind::Storage && r.total_bytes > 0);
    for root in roots {
        let key = format!("lowspace/{host}/{}", root.path);
        let low = (root.free_bytes as f64) < ratio * root.total_bytes as f64;
        if !low {
            clear(store, &key);
            continue;
        }
        if raise(store, &key, b"1") {
            let msg = format!(
                "storage {} on {host} is nearly full: {} of {} bytes free",
                root.path, root.free_bytes, root.total_bytes
            );
            out.push(alert(
                host,
                Severity::Warning,
                msg,
                EventBody::StorageLowSpace {
                    path: root.path.clone(),
                    free_bytes: root.free_bytes,
                    total_bytes: root.total_bytes,
                },
            ));
        }
    }
}

/// `backup.overdue` once per missed RPO of a plan's host (named by the last
/// success, or the daemon's start when there was none); a success clears it
/// (in the core, where successes are recorded).
fn overdue(
    store: &mut impl Store,
    w: &Watch<'_>,
    now: u64,
    hosts: &[HostRecord],
    out: &mut Vec<Alert>,
) {
    let known: HashSet<&str> = hosts.iter().map(|r| r.heartbeat.host.as_str()).collect();
    for plan in &w.config.plan {
        let Some(rpo) = plan.rpo else { continue };
        let rpo_ms = u64::try_from(rpo.as_millis()).unwrap_or(u64::MAX);
        for host in &plan.hosts {
            let last = store.success(&plan.name, host.as_str()).map(|s| s.time);
            let since = last.unwrap_or(w.started);
            if now.saturating_sub(since) <= rpo_ms {
                continue;
            }
            if !raise(store, &overdue_key(&plan.name, host), &since.to_be_bytes()) {
                continue;
            }
            let seen = if known.contains(host.as_str()) {
                ""
            } else {
                " (host never seen)"
            };
            let msg = format!(
                "no successful backup of plan {} on {host} for longer than its RPO of {} s{seen}",
                plan.name,
                rpo_ms / 1000
            );
            out.push(alert(
                host,
                Severity::Error,
                msg,
                EventBody::BackupOverdue {
                    plan: plan.name.clone(),
                    last_success: last,
                    rpo_secs: rpo_ms / 1000,
                },
            ));
        }
    }
}

/// `copy.overdue` once per missed RPO of a host's copies at one of a plan's
/// `copy_to` storage hosts: the newest snapshot copied there was taken
/// longer ago than the RPO (or nothing was copied since the daemon
/// started). A copy that succeeds clears it (in the core).
fn copy_overdue(store: &mut impl Store, w: &Watch<'_>, now: u64, out: &mut Vec<Alert>) {
    for plan in &w.config.plan {
        let Some(rpo) = plan.rpo else { continue };
        let rpo_ms = u64::try_from(rpo.as_millis()).unwrap_or(u64::MAX);
        for dest in &plan.copy_to {
            let copies = super::core::copy_plan_key(&plan.name, dest);
            for host in &plan.hosts {
                let last = store.success(&copies, host.as_str()).map(|s| s.time);
                let since = last.unwrap_or(w.started);
                if now.saturating_sub(since) <= rpo_ms {
                    continue;
                }
                let key = copy_overdue_key(&plan.name, dest, host);
                if !raise(store, &key, &since.to_be_bytes()) {
                    continue;
                }
                let msg = format!(
                    "no snapshot of plan {} of {host} copied to {dest} for longer than its RPO of {} s",
                    plan.name,
                    rpo_ms / 1000
                );
                out.push(alert(
                    host,
                    Severity::Error,
                    msg,
                    EventBody::CopyOverdue {
                        plan: plan.name.clone(),
                        storage: dest.to_string(),
                        last_copied: last,
                        rpo_secs: rpo_ms / 1000,
                    },
                ));
            }
        }
    }
}
