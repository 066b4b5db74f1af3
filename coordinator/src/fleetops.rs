//! Operations on the fleet that both the `flotilla` commands and the daemon
//! (`flotilla serve`) perform: finding a storage host's address, opening the
//! repository key, asking storage hosts about their repositories, and deciding
//! which snapshots a keep policy forgets.
//!
//! They take plain values (a [`Fleet`], a [`Nats`] connection) and print
//! nothing: what a person is told is the caller's business.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use chrono::{Local, TimeZone};
use flotilla_protocol::frame::RepoReply;
use flotilla_protocol::repo::{RepoKey, SnapshotMeta, SnapshotRecord};
use flotilla_protocol::{subject, HostName, Role};

use crate::config::{Config, ConfigIssue};
use crate::error::{request_err, CliError};
use crate::fleet::Fleet;
use crate::nats::Nats;
use crate::retention::{KeepPolicy, Verdict};

/// How long a storage agent gets to answer a query.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// A snapshot with its storage host and opened metadata.
#[derive(Debug, Clone)]
pub(crate) struct Found {
    pub storage: HostName,
    pub record: SnapshotRecord,
    pub meta: Option<SnapshotMeta>,
}

/// The storage host's QUIC address, from its heartbeat; it must be online.
pub(crate) async fn storage_addr(nats: &Nats, storage: &HostName) -> Result<String, CliError> {
    let record = nats
        .host(storage)
        .await?
        .ok_or_else(|| CliError::HostUnknown(storage.to_string()))?;
    if !record.heartbeat.roles.contains(&Role::Storage) {
        return Err(CliError::Usage(format!(
            "host {storage} keeps no repository (start its agent with --storage DIR --listen ADDR:PORT)"
        )));
    }
    if record.offline_reason(crate::now_ms()).is_some() {
        return Err(CliError::HostOffline {
            host: storage.to_string(),
            task_id: "-".into(),
            waited_secs: 0,
        });
    }
    record.heartbeat.quic_addr.ok_or_else(|| {
        CliError::Usage(format!("storage host {storage} serves no QUIC address (start its agent with --listen ADDR:PORT)"))
    })
}

/// The fleet's repository key (`FLEET/repo.key`).
pub(crate) fn repo_key(fleet: &Fleet) -> Result<RepoKey, CliError> {
    let path = fleet.dir.join("repo.key");
    let text = std::fs::read_to_string(&path).map_err(|source| CliError::Io {
        path: path.clone(),
        source,
    })?;
    RepoKey::from_hex(&text)
        .ok_or_else(|| CliError::Usage(format!("{} is not a 64-hex-digit key", path.display())))
}

/// Whether `host` was enrolled in the fleet in `dir` (its certificate was
/// issued: `DIR/hosts/HOST.crt`, as `Fleet::enroll` writes it).
pub(crate) fn enrolled(dir: &Path, host: &HostName) -> bool {
    dir.join("hosts").join(format!("{host}.crt")).is_file()
}

/// What `config check` warns about beyond mistakes: hosts never enrolled,
/// when a fleet directory with its enrollment records is at hand (none, one
/// that does not load, or a copy without `hosts/` as a daemon's may be: no
/// warnings, since nothing can be said).
pub(crate) fn config_warnings(config: &Config, fleet_dir: Option<&Path>) -> Vec<ConfigIssue> {
    match fleet_dir {
        Some(dir) if dir.join("hosts").is_dir() && Fleet::load(dir).is_ok() => {
            config.unenrolled(|h| enrolled(dir, h))
        }
        _ => Vec::new(),
    }
}

/// Storage hosts to ask: the one named, or every host with the storage role.
pub(crate) async fn storages(
    nats: &Nats,
    to: Option<&HostName>,
) -> Result<Vec<HostName>, CliError> {
    if let Some(h) = to {
        return Ok(vec![h.clone()]);
    }
    Ok(nats
        .hosts()
        .await?
        .into_iter()
        .filter(|r| r.heartbeat.roles.contains(&Role::Storage))
        .map(|r| r.heartbeat.host)
        .collect())
}

/// Asks `storage` one repository query and decodes its answer.
pub(crate) async fn query(
    nats: &Nats,
    subject: String,
    payload: Vec<u8>,
    storage: &HostName,
) -> Result<RepoReply, CliError> {
    let ask = nats.client.request(subject, payload.into());
    let msg = tokio::time::timeout(QUERY_TIMEOUT, ask)
        .await
        .map_err(|_| CliError::Request {
            what: format!("ask storage host {storage}"),
            why: "no answer (is its agent online?)".into(),
        })?
        .map_err(request_err(&format!("ask storage host {storage}")))?;
    flotilla_protocol::decode::<RepoReply>(&msg.payload, 64 * 1024 * 1024)
        .map_err(request_err(&format!("read the answer of {storage}")))
}

/// Every snapshot on the given storage hosts, oldest first.
pub(crate) async fn list(
    nats: &Nats,
    key: &RepoKey,
    to: Option<&HostName>,
) -> Result<Vec<Found>, CliError> {
    let mut out = Vec::new();
    for storage in storages(nats, to).await? {
        match query(
            nats,
            subject::repo_snapshots(&storage),
            Vec::new(),
            &storage,
        )
        .await?
        {
            RepoReply::Snapshots { snapshots } => {
                out.extend(snapshots.into_iter().map(|record| Found {
                    meta: record.open_meta(key),
                    storage: storage.clone(),
                    record,
                }))
            }
            RepoReply::Error { message } => {
                return Err(CliError::Request {
                    what: format!("list snapshots on {storage}"),
                    why: message,
                })
            }
            RepoReply::Tree { .. } | RepoReply::Stats { .. } => {}
        }
    }
    out.sort_by_key(|f| f.record.time);
    Ok(out)
}

/// The verdicts for every snapshot on `to` (or all storages) of `host`
/// (or all hosts), grouped by storage, host and paths.
pub(crate) async fn decide(
    nats: &Nats,
    key: &RepoKey,
    policy: &KeepPolicy,
    host: Option<&HostName>,
    to: Option<&HostName>,
) -> Result<Vec<(Found, Verdict)>, CliError> {
    let found = list(nats, key, to).await?;
    let mut groups: BTreeMap<(String, String, Vec<String>), Vec<Found>> = BTreeMap::new();
    for f in found
        .into_iter()
        .filter(|f| host.is_none_or(|h| &f.record.host == h))
    {
        // Only snapshots whose record matches its sealed metadata take part:
        // a forged or tampered listing must not steer what is forgotten.
        if f.record.verify(key).is_err() {
            continue;
        }
        let paths = f.meta.as_ref().map(|m| m.paths.clone()).unwrap_or_default();
        groups
            .entry((f.storage.to_string(), f.record.host.to_string(), paths))
            .or_default()
            .push(f);
    }
    let now = Local::now();
    let mut out = Vec::new();
    for (_, group) in groups {
        let times: Vec<(String, chrono::DateTime<Local>)> = group
            .iter()
            .map(|f| {
                let t = Local
                    .timestamp_millis_opt(f.record.time as i64)
                    .single()
                    .unwrap_or(now);
                (f.record.id.clone(), t)
            })
            .collect();
        for v in policy.apply(&times, &now) {
            if let Some(f) = group.iter().find(|f| f.record.id == v.id) {
                out.push((f.clone(), v));
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enrolled_means_a_certificate_was_issued() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let alpha = HostName::new("alpha").expect("valid");
        assert!(!enrolled(dir.path(), &alpha));
        std::fs::create_dir_all(dir.path().join("hosts")).expect("mkdir");
        std::fs::write(dir.path().join("hosts/alpha.crt"), "pem").expect("write");
        assert!(enrolled(dir.path(), &alpha));
        assert!(!enrolled(
            dir.path(),
            &HostName::new("beta").expect("valid")
        ));
    }

    #[test]
    fn config_warnings_need_a_fleet_that_loads() {
        let config = Config::parse("[[plan]]\nname = \"p\"\nhosts = [\"alpha\"]\nto = \"nas\"\n")
            .expect("valid");
        let empty = tempfile::tempdir().expect("temporary directory");
        // No fleet at hand, or a directory that is no fleet: nothing to say.
        assert!(config_warnings(&config, None).is_empty());
        assert!(config_warnings(&config, Some(empty.path())).is_empty());
        // A fleet copied without its enrollment records says nothing either.
        let bare = tempfile::tempdir().expect("temporary directory");
        let bare_dir = bare.path().join("fleet");
        Fleet::init(&bare_dir, "nats://127.0.0.1:4222", false).expect("init");
        let _ = std::fs::remove_dir_all(bare_dir.join("hosts"));
        assert!(config_warnings(&config, Some(&bare_dir)).is_empty());

        let dir = tempfile::tempdir().expect("temporary directory");
        let fleet_dir = dir.path().join("fleet");
        let fleet = Fleet::init(&fleet_dir, "nats://127.0.0.1:4222", false).expect("init");
        let alpha = HostName::new("alpha").expect("valid");
        fleet
            .enroll(&alpha, &dir.path().join("alpha.toml"), None, true, false)
            .expect("enroll");
        let warnings = config_warnings(&config, Some(&fleet_dir));
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert_eq!(warnings[0].line, Some(4), "{warnings:?}");
        assert!(warnings[0].message.contains("host nas"), "{warnings:?}");
    }
}
