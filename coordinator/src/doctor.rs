//! The fleet's JetStream layout, as it must be, and `flotilla doctor`.
//!
//! Only the coordinator administers JetStream (hosts' NATS users may not
//! create, change, purge or delete anything). `streams()` and `buckets()`
//! are the one definition of every stream and bucket; [`examine`] compares
//! the server's with them and, when asked, repairs: creates what is
//! missing, updates what differs, deletes consumers that are not a host's
//! own on the task stream and push consumers that deliver outside every
//! reply inbox ([`consumer_problem`]). `flotilla doctor` prints the
//! findings; `flotilla serve` runs it at start, every few minutes and after
//! reconnecting; the test harness runs it after starting a fleet.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use flotilla_protocol::{limits, subject, HostName};
use futures::TryStreamExt;
use serde::Serialize;

use crate::error::{request_err, CliError};
use crate::nats::Nats;

/// The task stream holds at most this much (tasks are small; a flood of
/// them is refused, never allowed to fill the server's disk).
pub const TASK_STREAM_BYTES: i64 = 256 * 1024 * 1024;
/// NATS headers around a message: room for them above the payload limits.
const HEADER_ROOM: i32 = 4096;

/// One stream the fleet needs, with the settings that matter.
fn streams() -> Vec<stream::Config> {
    vec![
        stream::Config {
            name: subject::TASK_STREAM.into(),
            description: Some("signed Flotilla tasks, until their agent journals them".into()),
            subjects: vec![subject::task_all()],
            retention: stream::RetentionPolicy::WorkQueue,
            max_age: Duration::from_secs(7 * 24 * 3600),
            max_bytes: TASK_STREAM_BYTES,
            max_message_size: limits::TASK_BYTES as i32 + HEADER_ROOM,
            discard: stream::DiscardPolicy::New,
            duplicate_window: Duration::from_secs(120),
            storage: stream::StorageType::File,
            ..Default::default()
        },
        stream::Config {
            name: subject::EVENT_STREAM.into(),
            description: Some("every Flotilla event, for alerting and replay".into()),
            subjects: vec![subject::event_all()],
            retention: stream::RetentionPolicy::Limits,
            max_age: Duration::from_secs(30 * 24 * 3600),
            max_bytes: 1024 * 1024 * 1024,
            max_messages: 1_000_000,
            max_message_size: limits::EVENT_BYTES as i32 + HEADER_ROOM,
            duplicate_window: Duration::from_secs(120),
            storage: stream::StorageType::File,
            ..Default::default()
        },
    ]
}

/// The key-value buckets the fleet needs.
fn buckets() -> Vec<jetstream::kv::Config> {
    vec![
        jetstream::kv::Config {
            bucket: subject::HEALTH_BUCKET.into(),
            description: "latest heartbeat of every Flotilla agent".into(),
            history: 1,
            max_value_size: limits::HEARTBEAT_BYTES as i32,
            storage: stream::StorageType::File,
            ..Default::default()
        },
        jetstream::kv::Config {
            bucket: subject::FLEET_BUCKET.into(),
            description: "fleet-wide facts signed by the coordinator (revocations)".into(),
            history: 1,
            max_value_size: flotilla_protocol::REVOCATION_BYTES as i32,
            storage: stream::StorageType::File,
            ..Default::default()
        },
    ]
}

/// What `doctor` found about one resource.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Finding {
    /// The stream, bucket or consumer.
    pub resource: String,
    /// What was wrong.
    pub problem: String,
    /// What was done (`None` when only examining, or when it cannot be
    /// repaired automatically; the problem then says what to do).
    pub repaired: Option<String>,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.resource, self.problem)?;
        match &self.repaired {
            Some(done) => write!(f, " -> {done}"),
            None => Ok(()),
        }
    }
}

/// Differences between a stream's configuration and the expected one, in
/// the settings Flotilla relies on.
pub fn differences(found: &stream::Config, want: &stream::Config) -> Vec<String> {
    // Each setting as (name, what the server has, what Flotilla needs),
    // limits with "none" spelt one way.
    let limit = |v: i64| unlimited(v).to_string();
    let settings = [
        (
            "subjects",
            format!("{:?}", found.subjects),
            format!("{:?}", want.subjects),
        ),
        (
            "retention",
            format!("{:?}", found.retention),
            format!("{:?}", want.retention),
        ),
        (
            "storage",
            format!("{:?}", found.storage),
            format!("{:?}", want.storage),
        ),
        (
            "max_msg_size",
            limit(found.max_message_size.into()),
            limit(want.max_message_size.into()),
        ),
        ("max_bytes", limit(found.max_bytes), limit(want.max_bytes)),
        (
            "max_age",
            format!("{:?}", found.max_age),
            format!("{:?}", want.max_age),
        ),
        (
            "max_msgs",
            limit(found.max_messages),
            limit(want.max_messages),
        ),
        (
            "discard",
            format!("{:?}", found.discard),
            format!("{:?}", want.discard),
        ),
    ];
    let mut out: Vec<String> = settings
        .into_iter()
        .filter(|(_, f, w)| f != w)
        .map(|(name, f, w)| format!("{name} {f} (want {w})"))
        .collect();
    if found.sealed || found.deny_purge != want.deny_purge || found.deny_delete != want.deny_delete
    {
        out.push("sealed or purge/delete settings changed".into());
    }
    out
}

/// A JetStream limit with "none" in one spelling: the server stores an
/// unset limit (0 in a request) as -1.
fn unlimited(limit: i64) -> i64 {
    if limit <= 0 {
        -1
    } else {
        limit
    }
}

/// Whether the differences can be fixed by updating the stream in place
/// (JetStream cannot change a stream's retention or storage).
fn updatable(found: &stream::Config, want: &stream::Config) -> bool {
    found.retention == want.retention && found.storage == want.storage
}

/// Examines the fleet's streams, buckets and task consumers; with `repair`,
/// fixes what it can. `recreate` also deletes and recreates a stream whose
/// retention or storage is wrong (its messages are lost).
pub async fn examine(nats: &Nats, repair: bool, recreate: bool) -> Result<Vec<Finding>, CliError> {
    let js = &nats.js;
    let mut findings = Vec::new();
    let mut wanted: Vec<stream::Config> = streams();
    for b in buckets() {
        // A bucket is a stream; its expected stream is what creating it makes.
        let name = subject::kv_stream(&b.bucket);
        match js.get_stream(&name).await {
            Ok(mut s) => {
                let info = s.info().await.map_err(request_err("read bucket"))?;
                let found = &info.config;
                let mut problems = Vec::new();
                if found.max_message_size != b.max_value_size {
                    problems.push(format!(
                        "max value size {} (want {})",
                        found.max_message_size, b.max_value_size
                    ));
                }
                if found.max_messages_per_subject != b.history {
                    problems.push(format!("history {}", found.max_messages_per_subject));
                }
                if found.sealed || found.storage != b.storage {
                    problems.push("sealed, or on the wrong storage".into());
                }
                if !problems.is_empty() {
                    let mut fixed = None;
                    if repair && !found.sealed && found.storage == b.storage {
                        let mut c = found.clone();
                        c.max_message_size = b.max_value_size;
                        c.max_messages_per_subject = b.history;
                        js.update_stream(&c)
                            .await
                            .map_err(request_err("update bucket"))?;
                        fixed = Some("updated".into());
                    }
                    findings.push(Finding {
                        resource: format!("bucket {}", b.bucket),
                        problem: problems.join("; "),
                        repaired: fixed,
                    });
                }
            }
            Err(_) => {
                let mut fixed = None;
                if repair {
                    js.create_key_value(b.clone())
                        .await
                        .map_err(request_err("create bucket"))?;
                    fixed = Some("created".into());
                }
                findings.push(Finding {
                    resource: format!("bucket {}", b.bucket),
                    problem: "missing".into(),
                    repaired: fixed,
                });
            }
        }
    }
    for want in wanted.drain(..) {
        let resource = format!("stream {}", want.name);
        match js.get_stream(&want.name).await {
            Err(_) => {
                let mut fixed = None;
                if repair {
                    js.create_stream(want.clone())
                        .await
                        .map_err(request_err("create stream"))?;
                    fixed = Some("created".into());
                }
                findings.push(Finding {
                    resource,
                    problem: "missing".into(),
                    repaired: fixed,
                });
            }
            Ok(mut s) => {
                let info = s.info().await.map_err(request_err("read stream"))?;
                let diffs = differences(&info.config, &want);
                if diffs.is_empty() {
                    continue;
                }
                let mut fixed = None;
                if repair && updatable(&info.config, &want) && !info.config.sealed {
                    let mut c = want.clone();
                    // Keep what an operator may tune and we do not check.
                    c.num_replicas = info.config.num_replicas;
                    js.update_stream(&c)
                        .await
                        .map_err(request_err("update stream"))?;
                    fixed = Some("updated".into());
                } else if repair && recreate {
                    js.delete_stream(&want.name)
                        .await
                        .map_err(request_err("delete stream"))?;
                    js.create_stream(want.clone())
                        .await
                        .map_err(request_err("create stream"))?;
                    fixed = Some("deleted and created again (its messages are gone)".into());
                }
                let mut problem = diffs.join("; ");
                if fixed.is_none() && repair {
                    problem.push_str(" — cannot be changed in place: run `flotilla doctor --recreate` (drops its messages)");
                }
                findings.push(Finding {
                    resource,
                    problem,
                    repaired: fixed,
                });
            }
        }
    }
    findings.extend(examine_consumers(js, repair).await?);
    Ok(findings)
}

/// Whether `name` with `filter` is a host's own task consumer.
pub fn is_host_consumer(name: &str, filter: &str, filters: &[String]) -> bool {
    // The inverse of `subject::task_consumer`, checked against it below.
    let Some(host) = name.strip_prefix("agent-") else {
        return false;
    };
    let Ok(host) = HostName::new(host) else {
        return false;
    };
    if subject::task_consumer(&host) != name {
        return false;
    }
    let own = subject::task(&host);
    if filters.is_empty() {
        filter == own
    } else {
        filters.len() == 1 && filters[0] == own && (filter.is_empty() || filter == own)
    }
}

/// What is wrong with consumer `name` on `stream`, if anything: on the
/// task stream only each host's own pull consumer belongs; anywhere, a
/// push consumer that delivers outside every reply inbox republishes
/// messages on a subject of its creator's choosing (nats-server does not
/// check the creator may publish there), so it could forge events.
pub fn consumer_problem(
    stream: &str,
    name: &str,
    filter: &str,
    filters: &[String],
    deliver: Option<&str>,
) -> Option<String> {
    let deliver = deliver.filter(|d| !d.is_empty());
    if stream == subject::TASK_STREAM {
        if !is_host_consumer(name, filter, filters) {
            let filter = if filter.is_empty() {
                filters.join(",")
            } else {
                filter.to_owned()
            };
            return Some(format!(
                "not a host's own task consumer (filter {filter:?}): it could take tasks meant for a host"
            ));
        }
        if let Some(d) = deliver {
            return Some(format!(
                "a push consumer delivering to {d:?}: a host's tasks go only to its own pull requests"
            ));
        }
        return None;
    }
    match deliver {
        Some(d) if !d.starts_with("_INBOX.") => Some(format!(
            "delivers to {d:?}, outside every reply inbox: it could republish messages on subjects its creator may not publish on"
        )),
        _ => None,
    }
}

async fn examine_consumers(
    js: &jetstream::Context,
    repair: bool,
) -> Result<Vec<Finding>, CliError> {
    let mut findings = Vec::new();
    let streams = [
        subject::TASK_STREAM.to_owned(),
        subject::EVENT_STREAM.to_owned(),
        subject::kv_stream(subject::HEALTH_BUCKET),
        subject::kv_stream(subject::FLEET_BUCKET),
    ];
    for name in streams {
        let Ok(stream) = js.get_stream(&name).await else {
            continue;
        };
        let infos: Vec<_> = stream
            .consumers()
            .try_collect()
            .await
            .map_err(request_err("list consumers"))?;
        for info in infos {
            let c = &info.config;
            let Some(problem) = consumer_problem(
                &name,
                &info.name,
                &c.filter_subject,
                &c.filter_subjects,
                c.deliver_subject.as_deref(),
            ) else {
                continue;
            };
            let mut fixed = None;
            if repair {
                stream
                    .delete_consumer(&info.name)
                    .await
                    .map_err(request_err("delete consumer"))?;
                fixed = Some("deleted".into());
            }
            findings.push(Finding {
                resource: format!("consumer {} on {name}", info.name),
                problem,
                repaired: fixed,
            });
        }
    }
    Ok(findings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_hosts_own_consumer_is_left_alone() {
        assert!(is_host_consumer("agent-nas", "flotilla.task.nas", &[]));
        assert!(!is_host_consumer("agent-nas", "flotilla.task.web", &[]));
        assert!(!is_host_consumer("agent-nas", "flotilla.task.*", &[]));
        assert!(!is_host_consumer("thief", "flotilla.task.nas", &[]));
        assert!(is_host_consumer(
            "agent-nas",
            "",
            &["flotilla.task.nas".into()]
        ));
        assert!(!is_host_consumer(
            "agent-nas",
            "",
            &["flotilla.task.nas".into(), "flotilla.task.web".into()]
        ));
    }

    #[test]
    fn push_consumers_that_deliver_outside_an_inbox_are_problems() {
        let tasks = subject::TASK_STREAM;
        let own = "flotilla.task.nas";
        assert_eq!(consumer_problem(tasks, "agent-nas", own, &[], None), None);
        assert_eq!(
            consumer_problem(tasks, "agent-nas", own, &[], Some("")),
            None
        );
        let push = consumer_problem(tasks, "agent-nas", own, &[], Some("_INBOX.host.nas.x"));
        assert!(push.is_some_and(|p| p.contains("push consumer")));
        let thief = consumer_problem(tasks, "thief", own, &[], None);
        assert!(thief.is_some_and(|p| p.contains("not a host's own")));

        let events = subject::EVENT_STREAM;
        assert_eq!(consumer_problem(events, "x", "", &[], None), None);
        assert_eq!(
            consumer_problem(events, "x", "", &[], Some("_INBOX.alert.pager.1")),
            None
        );
        let forging = consumer_problem(
            events,
            "x",
            "",
            &[],
            Some("flotilla.events.job.succeeded.nas"),
        );
        assert!(forging.is_some_and(|p| p.contains("outside every reply inbox")));
    }

    #[test]
    fn a_tiny_message_cap_is_a_difference() {
        let want = streams().remove(0);
        let mut found = want.clone();
        assert!(differences(&found, &want).is_empty());
        found.max_message_size = 1;
        let d = differences(&found, &want);
        assert_eq!(d.len(), 1, "{d:?}");
        assert!(d[0].contains("max_msg_size 1"));
        assert!(updatable(&found, &want));
        found.retention = stream::RetentionPolicy::Limits;
        assert!(!updatable(&found, &want));
    }

    #[test]
    fn the_servers_spelling_of_no_limit_is_no_difference() {
        let want = streams().remove(0);
        assert_eq!(
            want.max_messages, 0,
            "the task stream sets no message count"
        );
        let mut found = want.clone();
        found.max_messages = -1;
        assert!(differences(&found, &want).is_empty());
        found.max_messages = 10;
        assert_eq!(differences(&found, &want).len(), 1);
    }
}
