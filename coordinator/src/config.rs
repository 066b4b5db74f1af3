//! `flotilla.toml`: plans, notifications, metrics and daemon settings.
//!
//! Parsing refuses unknown keys (a typo must not silently disable a backup),
//! and [`Config::load`] checks every value and reports the exact line of each
//! mistake, which is what `flotilla config check` prints.

use std::collections::HashSet;
use std::ops::Range;
use std::path::Path;

use chrono::Duration;
use flotilla_protocol::HostName;
use serde::Deserialize;
use toml::Spanned;

use crate::retention::KeepPolicy;
use crate::scheduler::Cron;

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Backup plans.
    #[serde(default)]
    pub plan: Vec<Plan>,
    /// Notification routes.
    #[serde(default)]
    pub notify: Vec<Notify>,
    /// Prometheus endpoint.
    pub metrics: Option<Metrics>,
    /// Daemon tuning.
    #[serde(default)]
    pub serve: ServeSettings,
}

/// One backup plan.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// Unique name.
    pub name: Spanned<String>,
    /// Hosts it backs up.
    pub hosts: Spanned<Vec<String>>,
    /// Paths on each host (empty: all its backup roots).
    #[serde(default)]
    pub paths: Vec<String>,
    /// Glob patterns to leave out.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Storage host.
    pub to: Spanned<String>,
    /// Cron expression in the coordinator's local time; none: by hand only.
    pub schedule: Option<Spanned<String>>,
    /// Spread start times up to this much (e.g. `"10m"`).
    pub jitter: Option<Spanned<String>>,
    /// Retention.
    #[serde(default)]
    pub keep: KeepPolicy,
    /// Alert when a host has no successful backup for this long (e.g. `"26h"`).
    pub rpo: Option<Spanned<String>>,
    /// Cron for a structural `check` of the storage.
    pub check: Option<Spanned<String>>,
    /// Cron for a `check --read-data` of the storage.
    pub check_read_data: Option<Spanned<String>>,
    /// Cron for a `prune` of the storage (forget runs after every backup).
    pub prune: Option<Spanned<String>>,
}

/// Where events go.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Notify {
    /// Event kinds (`job.failed`, `agent.offline`, …); `*` for all.
    pub events: Vec<String>,
    /// POST the event as JSON to this URL.
    pub webhook: Option<String>,
    /// POST a one-line message to this ntfy topic URL.
    pub ntfy: Option<String>,
    /// healthchecks.io-style base URL: `/start`, success and `/fail` per plan
    /// (`{plan}` in the URL is replaced by the plan name).
    pub healthchecks: Option<String>,
    /// Only events of these plans (default: all).
    #[serde(default)]
    pub plans: Vec<String>,
}

/// The Prometheus endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// `ADDR:PORT` to serve `/metrics` on.
    pub listen: String,
}

/// Daemon tuning.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServeSettings {
    /// Backups running at once per storage host.
    pub max_per_storage: usize,
    /// Attempts for a job that fails with a retryable error.
    pub retries: u32,
    /// First retry delay; doubles each time (e.g. `"30s"`).
    pub retry_backoff: String,
    /// Free space below this fraction of a storage root raises `storage.low_space`.
    pub low_space_ratio: f64,
    /// How often the watchdog looks at the fleet (e.g. `"5s"`).
    pub tick: String,
    /// Unreferenced data younger than this survives a scheduled prune.
    pub prune_grace: String,
}

impl Default for ServeSettings {
    fn default() -> Self {
        Self {
            max_per_storage: 2,
            retries: 3,
            retry_backoff: "30s".into(),
            low_space_ratio: 0.05,
            tick: "5s".into(),
            prune_grace: "1h".into(),
        }
    }
}

/// One mistake in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(l) => write!(f, "line {l}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

/// A config that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// File.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// It has mistakes.
    #[error("{path} has {} mistake(s):\n{}", .issues.len(), .issues.iter().map(|i| format!("  {i}")).collect::<Vec<_>>().join("\n"))]
    Invalid {
        /// File.
        path: String,
        /// Every mistake found.
        issues: Vec<ConfigIssue>,
    },
}

fn line_of(text: &str, span: Range<usize>) -> usize {
    text[..span.start.min(text.len())].matches('\n').count() + 1
}

/// Parses a human duration.
pub fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s)
        .map_err(|e| format!("{s:?} is not a duration ({e}); write e.g. \"26h\" or \"10m\""))
        .and_then(|d| Duration::from_std(d).map_err(|e| e.to_string()))
}

impl Config {
    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        Self::parse(&text).map_err(|issues| ConfigError::Invalid {
            path: shown,
            issues,
        })
    }

    /// Parses and checks config text.
    pub fn parse(text: &str) -> Result<Config, Vec<ConfigIssue>> {
        let config: Config = toml::from_str(text).map_err(|e| {
            vec![ConfigIssue {
                line: e.span().map(|s| line_of(text, s)),
                message: e.message().to_owned(),
            }]
        })?;
        let mut issues = Vec::new();
        let mut issue = |span: Range<usize>, message: String| {
            issues.push(ConfigIssue {
                line: Some(line_of(text, span)),
                message,
            })
        };
        let mut names = HashSet::new();
        for plan in &config.plan {
            let name = plan.name.get_ref();
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                issue(
                    plan.name.span(),
                    format!("plan name {name:?}: use letters, digits, '-' and '_'"),
                );
            }
            if !names.insert(name.clone()) {
                issue(
                    plan.name.span(),
                    format!("plan name {name:?} is used twice"),
                );
            }
            if plan.hosts.get_ref().is_empty() {
                issue(plan.hosts.span(), format!("plan {name}: hosts is empty"));
            }
            for h in plan.hosts.get_ref() {
                if let Err(e) = HostName::new(h.clone()) {
                    issue(plan.hosts.span(), format!("plan {name}: {e}"));
                }
            }
            if let Err(e) = HostName::new(plan.to.get_ref().clone()) {
                issue(plan.to.span(), format!("plan {name}: to: {e}"));
            }
            for (what, cron) in [
                ("schedule", &plan.schedule),
                ("check", &plan.check),
                ("check_read_data", &plan.check_read_data),
                ("prune", &plan.prune),
            ] {
                if let Some(c) = cron {
                    if let Err(e) = Cron::parse(c.get_ref()) {
                        issue(c.span(), format!("plan {name}: {what}: {e}"));
                    }
                }
            }
            for (what, d) in [("jitter", &plan.jitter), ("rpo", &plan.rpo)] {
                if let Some(d) = d {
                    if let Err(e) = duration(d.get_ref()) {
                        issue(d.span(), format!("plan {name}: {what}: {e}"));
                    }
                }
            }
            if let Err(e) = plan.keep.within() {
                issue(plan.name.span(), format!("plan {name}: keep: {e}"));
            }
        }
        for (i, n) in config.notify.iter().enumerate() {
            if n.webhook.is_none() && n.ntfy.is_none() && n.healthchecks.is_none() {
                issues.push(ConfigIssue {
                    line: None,
                    message: format!("notify #{}: give webhook, ntfy or healthchecks", i + 1),
                });
            }
            for url in [&n.webhook, &n.ntfy, &n.healthchecks].into_iter().flatten() {
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    issues.push(ConfigIssue {
                        line: None,
                        message: format!("notify #{}: {url:?} is not an http(s) URL", i + 1),
                    });
                }
            }
        }
        if let Some(m) = &config.metrics {
            if m.listen.parse::<std::net::SocketAddr>().is_err() {
                issues.push(ConfigIssue {
                    line: None,
                    message: format!("metrics.listen {:?} is not ADDR:PORT", m.listen),
                });
            }
        }
        for (what, d) in [
            ("serve.retry_backoff", &config.serve.retry_backoff),
            ("serve.tick", &config.serve.tick),
            ("serve.prune_grace", &config.serve.prune_grace),
        ] {
            if let Err(e) = duration(d) {
                issues.push(ConfigIssue {
                    line: None,
                    message: format!("{what}: {e}"),
                });
            }
        }
        if duration(&config.serve.tick).is_ok_and(|t| t >= Duration::seconds(10)) {
            issues.push(ConfigIssue {
                line: None,
                message:
                    "serve.tick must be under 10s: the daemon renews its 15 s lease every tick"
                        .into(),
            });
        }
        if issues.is_empty() {
            Ok(config)
        } else {
            Err(issues)
        }
    }
}

impl Plan {
    /// The plan's hosts, validated by [`Config::parse`].
    pub fn host_names(&self) -> Vec<HostName> {
        self.hosts
            .get_ref()
            .iter()
            .filter_map(|h| HostName::new(h.clone()).ok())
            .collect()
    }

    /// The storage host, validated by [`Config::parse`].
    pub fn storage(&self) -> Option<HostName> {
        HostName::new(self.to.get_ref().clone()).ok()
    }

    /// The recovery-point objective.
    pub fn rpo(&self) -> Option<Duration> {
        self.rpo.as_ref().and_then(|d| duration(d.get_ref()).ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[[plan]]
name = "home"
hosts = ["laptop", "desktop"]
paths = ["/home", "/etc"]
exclude = ["**/.cache"]
to = "nas"
schedule = "0 3 * * *"        # cron, in the coordinator's local time
keep = { last = 3, daily = 7, weekly = 4, monthly = 12 }
rpo = "26h"

[[notify]]
events = ["job.failed", "backup.overdue", "agent.offline"]
webhook = "https://example.invalid/hook"

[metrics]
listen = "127.0.0.1:9464"
"#;

    #[test]
    fn the_documented_shape_parses() {
        let c = Config::parse(GOOD).expect("valid");
        assert_eq!(c.plan[0].name.get_ref(), "home");
        assert_eq!(c.plan[0].keep.daily, Some(7));
        assert_eq!(c.plan[0].rpo(), Some(Duration::hours(26)));
    }

    #[test]
    fn mistakes_point_at_their_line() {
        let bad = GOOD.replace("0 3 * * *", "0 25 * * *");
        let issues = Config::parse(&bad).expect_err("refused");
        assert_eq!(issues[0].line, Some(8), "{issues:?}");
        assert!(issues[0].message.contains("hour"), "{issues:?}");

        let typo = GOOD.replace("exclude =", "exclud =");
        let issues = Config::parse(&typo).expect_err("refused");
        assert_eq!(issues[0].line, Some(6), "{issues:?}");

        let bad_rpo = GOOD.replace("\"26h\"", "\"soon\"");
        let issues = Config::parse(&bad_rpo).expect_err("refused");
        assert_eq!(issues[0].line, Some(10), "{issues:?}");
    }
}
