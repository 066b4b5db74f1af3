//! Notifications without code: events routed to webhooks, ntfy topics and
//! healthchecks.io-style ping URLs, with retries.

use std::time::Duration;

use flotilla_protocol::{Event, EventBody};
use tracing::{debug, warn};

use crate::config::Notify;

/// Attempts per delivery.
const ATTEMPTS: u32 = 4;
/// First retry delay; doubles.
const BACKOFF: Duration = Duration::from_secs(1);

/// Routes events to the configured sinks.
#[derive(Debug, Clone)]
pub struct Notifier {
    routes: Vec<Notify>,
    agent: ureq::Agent,
}

/// One HTTP request to make.
#[derive(Debug, Clone)]
struct Delivery {
    url: String,
    body: Vec<u8>,
    content_type: &'static str,
    title: Option<String>,
}

impl Notifier {
    /// A notifier for `routes`.
    pub fn new(routes: Vec<Notify>) -> Self {
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(10))
            .build();
        Self { routes, agent }
    }

    /// The plan an event concerns, if any.
    fn plan_of(ev: &Event) -> Option<&str> {
        match &ev.body {
            EventBody::JobSucceeded(j)
            | EventBody::JobPartial(j)
            | EventBody::JobFailed(j)
            | EventBody::JobCancelled(j) => j.plan.as_deref(),
            EventBody::BackupOverdue { plan, .. } | EventBody::CopyOverdue { plan, .. } => {
                Some(plan)
            }
            _ => None,
        }
    }

    /// Sends `ev` to every matching route, in the background.
    pub fn route(&self, ev: &Event) {
        let kind = ev.body.kind();
        let plan = Self::plan_of(ev);
        for route in &self.routes {
            let wanted = route.events.iter().any(|k| k == "*" || k == kind);
            let plan_ok =
                route.plans.is_empty() || plan.is_some_and(|p| route.plans.iter().any(|r| r == p));
            if !wanted || !plan_ok {
                continue;
            }
            let mut deliveries = Vec::new();
            if let Some(url) = &route.webhook {
                deliveries.push(Delivery {
                    url: url.clone(),
                    body: serde_json::to_vec(ev).unwrap_or_default(),
                    content_type: "application/json",
                    title: None,
                });
            }
            if let Some(url) = &route.ntfy {
                deliveries.push(Delivery {
                    url: url.clone(),
                    body: format!("{}: {}", ev.host, ev.message).into_bytes(),
                    content_type: "text/plain",
                    title: Some(format!("flotilla {kind}")),
                });
            }
            if let (Some(base), Some(plan)) = (&route.healthchecks, plan) {
                // A plan's healthchecks URL stands for its backups (and
                // its checks and prunes, as before copies): a copy job's
                // end does not ping it; `copy.overdue` has its own event.
                let suffix = match &ev.body {
                    EventBody::JobSucceeded(j) | EventBody::JobPartial(j)
                        if j.job_kind != "copy" =>
                    {
                        Some("")
                    }
                    EventBody::JobFailed(j) | EventBody::JobCancelled(j)
                        if j.job_kind != "copy" =>
                    {
                        Some("/fail")
                    }
                    EventBody::BackupOverdue { .. } => Some("/fail"),
                    _ => None,
                };
                if let Some(suffix) = suffix {
                    deliveries.push(Delivery {
                        url: format!("{}{suffix}", base.replace("{plan}", plan)),
                        body: ev.message.clone().into_bytes(),
                        content_type: "text/plain",
                        title: None,
                    });
                }
            }
            for d in deliveries {
                self.send(d);
            }
        }
    }

    /// Pings the healthchecks `/start` URL of `plan`'s routes.
    pub fn job_started(&self, plan: &str) {
        for route in &self.routes {
            let plan_ok = route.plans.is_empty() || route.plans.iter().any(|r| r == plan);
            if let (Some(base), true) = (&route.healthchecks, plan_ok) {
                self.send(Delivery {
                    url: format!("{}/start", base.replace("{plan}", plan)),
                    body: Vec::new(),
                    content_type: "text/plain",
                    title: None,
                });
            }
        }
    }

    fn send(&self, d: Delivery) {
        let agent = self.agent.clone();
        tokio::task::spawn_blocking(move || {
            let mut delay = BACKOFF;
            for attempt in 1..=ATTEMPTS {
                let mut req = agent.post(&d.url).set("Content-Type", d.content_type);
                if let Some(t) = &d.title {
                    req = req.set("Title", t);
                }
                match req.send_bytes(&d.body) {
                    Ok(_) => return debug!(url = %d.url, "notification delivered"),
                    Err(e) => {
                        warn!(url = %d.url, attempt, error = %e, "notification not delivered");
                        if attempt < ATTEMPTS {
                            std::thread::sleep(delay);
                            delay *= 2;
                        }
                    }
                }
            }
        });
    }
}
