//! Who may publish and subscribe to what on the fleet's NATS account.
//!
//! Every NATS user of a fleet is minted by `flotilla` with one of these
//! roles, and the permissions below are written into its JWT, so the server
//! itself refuses what a role must not do: a host cannot publish another
//! host's events or heartbeat, read another host's tasks, or touch a stream.
//! `docs/security.md` holds the same table for people.
//!
//! Each client uses its own inbox prefix ([`inbox_prefix`]) and may subscribe
//! only under it, so nobody reads another client's replies.

use crate::{subject, HostName};

/// The roles of a fleet's NATS users.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// `flotilla` itself (the CLI and `serve`): administers JetStream, sends
    /// tasks, reads everything. Unrestricted.
    Coordinator,
    /// One enrolled host's agent.
    Host(HostName),
    /// A read-only subscriber to events and health (alerting, dashboards).
    Alerting(HostName),
}

/// The subjects a user may publish to and subscribe to. Empty lists with
/// `unrestricted` mean everything.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Permissions {
    /// No limits at all (the coordinator).
    pub unrestricted: bool,
    /// Subjects it may publish to.
    pub publish: Vec<String>,
    /// Subjects it may subscribe to.
    pub subscribe: Vec<String>,
    /// Whether it may answer requests it received (one reply each), whatever
    /// their reply subject: how a host answers repository queries and
    /// service discovery without being allowed to publish to inboxes.
    pub respond: bool,
}

/// The inbox prefix of a role: replies to its requests arrive under
/// `<prefix>.>`, and it may subscribe nowhere else under `_INBOX`.
///
/// Host names never contain `.` or `_`, so no host's prefix is a prefix of
/// another's, nor the coordinator's.
pub fn inbox_prefix(role: &Role) -> String {
    match role {
        Role::Coordinator => "_INBOX._coordinator".into(),
        Role::Host(h) => format!("_INBOX.host.{h}"),
        Role::Alerting(n) => format!("_INBOX.alert.{n}"),
    }
}

const JS: &str = "$JS.API";

/// The permissions of `role`.
pub fn permissions(role: &Role) -> Permissions {
    let inbox = format!("{}.>", inbox_prefix(role));
    match role {
        Role::Coordinator => Permissions {
            unrestricted: true,
            ..Permissions::default()
        },
        Role::Host(h) => {
            let tasks = subject::TASK_STREAM;
            let consumer = subject::task_consumer(h);
            let health = subject::kv_stream(subject::HEALTH_BUCKET);
            let fleet = subject::kv_stream(subject::FLEET_BUCKET);
            let publish = vec![
                // Its own events and heartbeat, nothing about anyone else.
                format!("{}.events.*.*.{h}", subject::ROOT),
                format!("$KV.{}.{}", subject::HEALTH_BUCKET, subject::health_key(h)),
                // Looking up the streams and bucket it uses (never changing them).
                format!("{JS}.INFO"),
                format!("{JS}.STREAM.INFO.{tasks}"),
                format!("{JS}.STREAM.INFO.{}", subject::EVENT_STREAM),
                format!("{JS}.STREAM.INFO.{health}"),
                format!("{JS}.STREAM.INFO.{fleet}"),
                // Its own durable task consumer, filtered to its own tasks.
                format!("{JS}.CONSUMER.INFO.{tasks}.{consumer}"),
                format!(
                    "{JS}.CONSUMER.CREATE.{tasks}.{consumer}.{}",
                    subject::task(h)
                ),
                format!("{JS}.CONSUMER.MSG.NEXT.{tasks}.{consumer}"),
                format!("$JS.ACK.{tasks}.{consumer}.>"),
                // The fleet's signed revocation list.
                format!(
                    "{JS}.DIRECT.GET.{fleet}.$KV.{}.{}",
                    subject::FLEET_BUCKET,
                    subject::REVOKED_KEY
                ),
            ];
            let mut subscribe = vec![inbox, format!("{}.repo.{h}.*", subject::ROOT)];
            subscribe.push(subject::health_endpoint(h));
            for verb in ["PING", "INFO", "STATS"] {
                subscribe.extend(subject::service_verbs(verb, h));
            }
            Permissions {
                unrestricted: false,
                publish,
                subscribe,
                respond: true,
            }
        }
        Role::Alerting(_) => {
            let events = subject::EVENT_STREAM;
            let health = subject::kv_stream(subject::HEALTH_BUCKET);
            let mut publish = vec![format!("{JS}.INFO")];
            for stream in [events, health.as_str()] {
                publish.extend([
                    format!("{JS}.STREAM.INFO.{stream}"),
                    format!("{JS}.STREAM.MSG.GET.{stream}"),
                    format!("{JS}.DIRECT.GET.{stream}.>"),
                    // Consumers of their own, ephemeral or durable, as
                    // each client library spells the request.
                    format!("{JS}.CONSUMER.CREATE.{stream}"),
                    format!("{JS}.CONSUMER.CREATE.{stream}.>"),
                    format!("{JS}.CONSUMER.DURABLE.CREATE.{stream}.>"),
                    format!("{JS}.CONSUMER.DELETE.{stream}.>"),
                    format!("{JS}.CONSUMER.INFO.{stream}.>"),
                    format!("{JS}.CONSUMER.MSG.NEXT.{stream}.>"),
                    format!("$JS.ACK.{stream}.>"),
                    format!("$JS.FC.{stream}.>"),
                ]);
            }
            Permissions {
                unrestricted: false,
                publish,
                subscribe: vec![
                    inbox,
                    subject::event_all(),
                    format!("$KV.{}.>", subject::HEALTH_BUCKET),
                ],
                respond: false,
            }
        }
    }
}

/// NATS subject matching: `*` matches one token, `>` one or more at the end.
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut subject = subject.split('.');
    for p in pattern.split('.') {
        if p == ">" {
            return subject.next().is_some();
        }
        match subject.next() {
            Some(s) if p == "*" || p == s => {}
            _ => return false,
        }
    }
    subject.next().is_none()
}

impl Permissions {
    /// Whether these permissions let the user publish to `subject` (not
    /// counting replies to requests it received).
    pub fn may_publish(&self, subject: &str) -> bool {
        self.unrestricted || self.publish.iter().any(|p| subject_matches(p, subject))
    }

    /// Whether these permissions let the user subscribe to `subject`.
    pub fn may_subscribe(&self, subject: &str) -> bool {
        self.unrestricted || self.subscribe.iter().any(|p| subject_matches(p, subject))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str) -> HostName {
        HostName::new(name).expect("valid")
    }

    /// What issue 10's attacks needed, refused by the table itself.
    #[test]
    fn a_host_may_speak_only_for_itself() {
        let web = permissions(&Role::Host(host("web")));
        let nas = host("nas");
        // Its own events and heartbeat: yes.
        assert!(web.may_publish(&subject::event("task.finished", &host("web"))));
        assert!(web.may_publish("$KV.flotilla-health.web"));
        // Another host's: no.
        assert!(!web.may_publish(&subject::event("task.finished", &nas)));
        assert!(!web.may_publish("$KV.flotilla-health.nas"));
        // Tasks: neither send nor read anyone's, its own arrive through its consumer.
        assert!(!web.may_publish(&subject::task(&nas)));
        assert!(!web.may_publish(&subject::task(&host("web"))));
        assert!(!web.may_subscribe(&subject::task(&host("web"))));
        assert!(!web.may_publish("$JS.API.CONSUMER.MSG.NEXT.FLOTILLA_TASKS.agent-nas"));
        assert!(!web.may_publish("$JS.API.CONSUMER.CREATE.FLOTILLA_TASKS.thief.flotilla.task.nas"));
        assert!(!web.may_publish("$JS.API.STREAM.MSG.GET.FLOTILLA_TASKS"));
        // Administration: nothing.
        for admin in [
            "$JS.API.STREAM.PURGE.FLOTILLA_EVENTS",
            "$JS.API.STREAM.DELETE.FLOTILLA_TASKS",
            "$JS.API.STREAM.CREATE.FLOTILLA_TASKS",
            "$JS.API.STREAM.UPDATE.KV_flotilla-health",
            "$JS.API.CONSUMER.DELETE.FLOTILLA_TASKS.agent-nas",
            "$KV.flotilla-lease.leader",
        ] {
            assert!(!web.may_publish(admin), "{admin}");
        }
        // Queries: answers only its own repository's; nobody else's inbox.
        assert!(web.may_subscribe(&subject::repo_snapshots(&host("web"))));
        assert!(!web.may_subscribe(&subject::repo_snapshots(&nas)));
        assert!(!web.may_subscribe("_INBOX._coordinator.abc.1"));
        assert!(!web.may_subscribe("_INBOX.host.nas.abc"));
        assert!(!web.may_subscribe("_INBOX.>"));
        assert!(web.may_subscribe("_INBOX.host.web.abc.1"));
        assert!(!web.may_subscribe(&subject::event_all()));
    }

    #[test]
    fn inbox_prefixes_never_nest() {
        let roles = [
            Role::Coordinator,
            Role::Host(host("web")),
            Role::Host(host("web-2")),
            Role::Alerting(host("web")),
        ];
        for a in &roles {
            for b in &roles {
                // The coordinator may read anything; no one else may read
                // another's replies.
                if a != b && *b != Role::Coordinator {
                    let pa = format!("{}.x", inbox_prefix(a));
                    assert!(
                        !permissions(b).may_subscribe(&pa),
                        "{b:?} reads {a:?}'s inbox"
                    );
                }
            }
        }
    }

    #[test]
    fn alerting_reads_events_and_health_and_nothing_else() {
        let a = permissions(&Role::Alerting(host("pager")));
        assert!(a.may_subscribe(&subject::event("agent.offline", &host("nas"))));
        assert!(a.may_subscribe("$KV.flotilla-health.nas"));
        assert!(a.may_publish("$JS.API.CONSUMER.CREATE.FLOTILLA_EVENTS.x.flotilla.events.>"));
        assert!(!a.may_publish(&subject::event("task.finished", &host("nas"))));
        assert!(!a.may_publish("$KV.flotilla-health.nas"));
        assert!(!a.may_subscribe(&subject::task(&host("nas"))));
        assert!(!a.may_subscribe(&subject::repo_snapshots(&host("nas"))));
        assert!(!a.may_publish("$JS.API.STREAM.PURGE.FLOTILLA_EVENTS"));
        assert!(!a.may_publish("$JS.API.CONSUMER.CREATE.FLOTILLA_TASKS.x"));
        assert!(!a.respond);
    }

    #[test]
    fn subject_matching_follows_nats_rules() {
        assert!(subject_matches("a.*.c", "a.b.c"));
        assert!(!subject_matches("a.*.c", "a.b.d.c"));
        assert!(subject_matches("a.>", "a.b.c"));
        assert!(!subject_matches("a.>", "a"));
        assert!(!subject_matches("a.b", "a.b.c"));
    }
}
