//! Every NATS subject, stream, bucket and service name Flotilla uses, built in
//! one place.
//!
//! Layout (see `docs/protocol.md`):
//!
//! | subject | carries |
//! |---|---|
//! | `flotilla.task.<host>` | [`crate::TaskEnvelope`] for that host (stream [`TASK_STREAM`]) |
//! | `flotilla.events.<kind>.<host>` | [`crate::Event`]s; `<kind>` is dotted, e.g. `agent.offline` (stream [`EVENT_STREAM`]) |
//! | `$KV.flotilla-health.<host>` | the host's latest [`crate::Heartbeat`] (bucket [`HEALTH_BUCKET`]) |
//! | `$KV.flotilla-fleet.revoked` | the signed [`crate::RevocationList`] (bucket [`FLEET_BUCKET`]) |
//! | `$SRV.PING.flotilla-agent[.<host>]` | NATS micro service discovery |

use crate::HostName;

/// Root token of every Flotilla subject.
pub const ROOT: &str = "flotilla";
/// JetStream stream that holds tasks until their agent has journalled them.
pub const TASK_STREAM: &str = "FLOTILLA_TASKS";
/// JetStream stream that holds every event, for replay by subscribers.
pub const EVENT_STREAM: &str = "FLOTILLA_EVENTS";
/// JetStream key-value bucket with every host's latest heartbeat.
pub const HEALTH_BUCKET: &str = "flotilla-health";
/// JetStream key-value bucket with fleet-wide facts the coordinator signs
/// (today: the revocation list under [`REVOKED_KEY`]).
pub const FLEET_BUCKET: &str = "flotilla-fleet";
/// Key of the signed [`crate::RevocationList`] in [`FLEET_BUCKET`].
pub const REVOKED_KEY: &str = "revoked";
/// NATS micro service name every agent registers under.
pub const AGENT_SERVICE: &str = "flotilla-agent";

/// Subject of the tasks addressed to `host`.
pub fn task(host: &HostName) -> String {
    format!("{ROOT}.task.{host}")
}

/// Wildcard over every host's task subject (the task stream's subjects).
pub fn task_all() -> String {
    format!("{ROOT}.task.*")
}

/// Durable consumer name of `host`'s task subscription.
pub fn task_consumer(host: &HostName) -> String {
    format!("agent-{host}")
}

/// Subject an event of `kind` about `host` is published on.
///
/// `kind` is one of the dotted names of [`crate::EventBody::kind`], such as
/// `agent.offline`; it becomes two subject tokens.
pub fn event(kind: &str, host: &HostName) -> String {
    format!("{ROOT}.events.{kind}.{host}")
}

/// Wildcard over every event (the event stream's subjects).
pub fn event_all() -> String {
    format!("{ROOT}.events.>")
}

/// Wildcard over the events of one `kind` about any host, e.g.
/// `flotilla.events.task.finished.*`.
///
/// `kind` is one of [`crate::EventBody::KINDS`] (dotted, two tokens).
pub fn events_of_kind(kind: &str) -> String {
    format!("{ROOT}.events.{kind}.*")
}

/// Wildcard over the task lifecycle events (`task.*`) about any host.
pub fn task_events_all() -> String {
    format!("{ROOT}.events.task.>")
}

/// Wildcard over the task lifecycle events (`task.*`) about `host`.
pub fn task_events(host: &HostName) -> String {
    format!("{ROOT}.events.task.*.{host}")
}

/// Wildcard over the security events about `host`.
pub fn security_events(host: &HostName) -> String {
    format!("{ROOT}.events.security.*.{host}")
}

/// Filter subject over the event stream for an optional kind (one token such
/// as `agent`, or a dotted kind such as `agent.offline`) and an optional host.
pub fn event_filter(kind: Option<&str>, host: Option<&HostName>) -> String {
    let kind_tokens = match kind {
        None => "*.*".to_string(),
        Some(k) if k.contains('.') => k.to_string(),
        Some(k) => format!("{k}.*"),
    };
    match host {
        Some(h) => format!("{ROOT}.events.{kind_tokens}.{h}"),
        None if kind.is_none() => event_all(),
        None => format!("{ROOT}.events.{kind_tokens}.*"),
    }
}

/// The JetStream stream behind the key-value bucket `bucket` (NATS names
/// it `KV_<bucket>`), e.g. to ask how many values [`HEALTH_BUCKET`] holds.
pub fn kv_stream(bucket: &str) -> String {
    format!("KV_{bucket}")
}

/// Key of `host` in the [`HEALTH_BUCKET`].
pub fn health_key(host: &HostName) -> String {
    host.to_string()
}

/// Subjects of the NATS micro discovery verbs (`PING`, `INFO`, `STATS`) that an
/// agent answers: for all services, for [`AGENT_SERVICE`], and for this host.
pub fn service_verbs(verb: &str, host: &HostName) -> [String; 3] {
    [
        format!("$SRV.{verb}"),
        format!("$SRV.{verb}.{AGENT_SERVICE}"),
        format!("$SRV.{verb}.{AGENT_SERVICE}.{host}"),
    ]
}

/// Request subject for the snapshot list of `storage`'s repository
/// (reply: [`crate::frame::RepoReply`]).
pub fn repo_snapshots(storage: &HostName) -> String {
    format!("{ROOT}.repo.{storage}.snapshots")
}

/// Request subject for the size of `storage`'s repository
/// (reply: [`crate::frame::RepoReply::Stats`]).
pub fn repo_stats(storage: &HostName) -> String {
    format!("{ROOT}.repo.{storage}.stats")
}

/// Request subject for one sealed *tree* blob of `storage`'s repository
/// (request: the 32-byte id; reply: [`crate::frame::RepoReply`]).
pub fn repo_tree(storage: &HostName) -> String {
    format!("{ROOT}.repo.{storage}.tree")
}

/// Request subject of the agent's `health` service endpoint.
pub fn health_endpoint(host: &HostName) -> String {
    format!("{ROOT}.agent.{host}.health")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_have_the_documented_shape() {
        let h = HostName::new("nas").expect("valid");
        assert_eq!(task(&h), "flotilla.task.nas");
        assert_eq!(
            event("agent.offline", &h),
            "flotilla.events.agent.offline.nas"
        );
        assert_eq!(task_events(&h), "flotilla.events.task.*.nas");
        assert_eq!(service_verbs("PING", &h)[2], "$SRV.PING.flotilla-agent.nas");
        assert_eq!(event_filter(None, None), "flotilla.events.>");
        assert_eq!(
            event_filter(Some("agent"), None),
            "flotilla.events.agent.*.*"
        );
        assert_eq!(
            event_filter(Some("agent.offline"), Some(&h)),
            "flotilla.events.agent.offline.nas"
        );
        assert_eq!(event_filter(None, Some(&h)), "flotilla.events.*.*.nas");
        assert_eq!(
            events_of_kind("task.finished"),
            "flotilla.events.task.finished.*"
        );
        assert_eq!(task_events_all(), "flotilla.events.task.>");
        assert_eq!(kv_stream(HEALTH_BUCKET), "KV_flotilla-health");
    }

    use crate::permissions::subject_matches as matches;

    /// Each kind's wildcard catches that kind's events about every host, and
    /// no other kind's.
    #[test]
    fn a_kind_wildcard_matches_exactly_its_events() {
        let hosts = [
            HostName::new("nas").expect("valid"),
            HostName::new("laptop-2").expect("valid"),
        ];
        for kind in crate::EventBody::KINDS {
            for other in crate::EventBody::KINDS {
                for h in &hosts {
                    assert_eq!(
                        matches(&events_of_kind(kind), &event(other, h)),
                        kind == other,
                        "{kind} vs {other}"
                    );
                }
            }
            let task = kind.starts_with("task.");
            assert_eq!(matches(&task_events_all(), &event(kind, &hosts[0])), task);
            assert!(matches(&event_all(), &event(kind, &hosts[0])));
        }
    }
}
