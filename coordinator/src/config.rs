//! `flotilla.toml`: plans, notifications, metrics and daemon settings.
//!
//! The file is parsed **once**, at load: cron expressions, durations, host
//! names, globs and addresses become typed values, and every mistake is
//! reported with its line (what `flotilla config check` prints). Nothing
//! downstream parses text again or falls back to a default on a bad value.
//!
//! Parsing refuses unknown keys (a typo must not silently disable a backup),
//! and also what would otherwise fail only at run time: exclude globs the
//! agents cannot compile, relative paths, event kinds that no event has, notify
//! routes for plans that do not exist, schedules that never fire.
//! [`Config::unenrolled`] adds warnings for hosts the fleet never enrolled.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use flotilla_protocol::{EventBody, HostName};
use serde::Deserialize;
use toml::Spanned;

use crate::retention::KeepPolicy;
use crate::scheduler::{jitter_for, Cron};

/// The whole file, checked and parsed.
#[derive(Debug, Clone, Default)]
pub struct Config {
    /// Backup plans.
    pub plan: Vec<Plan>,
    /// Notification routes.
    pub notify: Vec<Notify>,
    /// Prometheus endpoint.
    pub metrics: Option<Metrics>,
    /// Daemon tuning.
    pub serve: ServeSettings,
}

/// One backup plan.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Unique name (letters, digits, `-`, `_`).
    pub name: String,
    /// Hosts it backs up (at least one).
    pub hosts: Vec<HostName>,
    /// Absolute paths on each host (empty: all its backup roots).
    pub paths: Vec<String>,
    /// Glob patterns to leave out, each one the agents' glob syntax accepts.
    pub exclude: Vec<String>,
    /// Back up paths that are empty now but held files at the last backup
    /// (`allow_empty = true`); off by default, so an unmounted disk fails
    /// the backup instead of making an empty snapshot.
    pub allow_empty: bool,
    /// Storage host.
    pub to: HostName,
    /// Backup schedule in the coordinator's local time; none: by hand only.
    pub schedule: Option<Cron>,
    /// Largest start delay (`jitter = "10m"`); zero when not set.
    pub jitter: chrono::Duration,
    /// Retention applied after each successful backup.
    pub keep: KeepPolicy,
    /// Alert when a host has no successful backup for this long.
    pub rpo: Option<Duration>,
    /// Schedule of a structural `check` of the storage.
    pub check: Option<Cron>,
    /// Schedule of a `check --read-data` of the storage.
    pub check_read_data: Option<Cron>,
    /// Schedule of a `prune` of the storage (forget runs after every backup).
    pub prune: Option<Cron>,
    /// A job of the plan still running this long after it was sent is sent
    /// a `cancel` and counted failed (retried as `serve.retries` allows);
    /// also `backup --plan/--all --wait`'s default `--timeout`.
    pub timeout: Option<Duration>,
    /// Storage hosts each snapshot of the plan is copied to
    /// (`copy_to = ["offsite"]`): after each backup, or on `copy_schedule`.
    pub copy_to: Vec<HostName>,
    /// When to copy (the newest snapshot of each host); none: after every
    /// successful backup.
    pub copy_schedule: Option<Cron>,
    /// Retention at each `copy_to` storage host (`keep_copies.offsite =
    /// { daily = 30 }`); a destination without one keeps every copy.
    pub keep_copies: BTreeMap<HostName, KeepPolicy>,
    /// Most bytes per second a copy sends (`copy_limit_upload = "2M"`); 0:
    /// no limit.
    pub copy_limit_upload: u64,
    /// Lines of `hosts` entries and of `to`, for warnings found later.
    host_lines: Vec<usize>,
    to_line: usize,
    /// Lines of `copy_to` entries.
    copy_lines: Vec<usize>,
}

/// Where events go.
#[derive(Debug, Clone, Default)]
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
    pub plans: Vec<String>,
}

/// The Prometheus endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Metrics {
    /// Where `/metrics` is served.
    pub listen: SocketAddr,
}

/// Daemon tuning.
#[derive(Debug, Clone, PartialEq)]
pub struct ServeSettings {
    /// Jobs running at once per storage host (at least 1).
    pub max_per_storage: usize,
    /// Attempts for a job that fails with a retryable error (at least 1).
    pub retries: u32,
    /// First retry delay; doubles each time.
    pub retry_backoff: Duration,
    /// Free space below this fraction of a storage root raises `storage.low_space`.
    pub low_space_ratio: f64,
    /// How often the daemon renews its lease, schedules and watches the fleet.
    pub tick: Duration,
    /// Unreferenced data younger than this survives a scheduled prune.
    pub prune_grace: Duration,
}

impl Default for ServeSettings {
    fn default() -> Self {
        Self {
            max_per_storage: 2,
            retries: 3,
            retry_backoff: Duration::from_secs(30),
            low_space_ratio: 0.05,
            tick: Duration::from_secs(5),
            prune_grace: Duration::from_secs(3600),
        }
    }
}

/// The tick must stay well under the lease's 15 s lifetime: it renews it.
const MAX_TICK: Duration = Duration::from_secs(10);

impl Plan {
    /// The plan's hosts.
    pub fn host_names(&self) -> Vec<HostName> {
        self.hosts.clone()
    }

    /// This plan's deterministic start delay, within [`Plan::jitter`].
    pub fn jitter_shift(&self) -> chrono::Duration {
        jitter_for(&self.name, self.jitter)
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

// ---- the file as written ----------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    plan: Vec<RawPlan>,
    #[serde(default)]
    notify: Vec<RawNotify>,
    metrics: Option<RawMetrics>,
    #[serde(default)]
    serve: RawServe,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlan {
    name: Spanned<String>,
    hosts: Spanned<Vec<Spanned<String>>>,
    #[serde(default)]
    paths: Vec<Spanned<String>>,
    #[serde(default)]
    exclude: Vec<Spanned<String>>,
    #[serde(default)]
    allow_empty: bool,
    to: Spanned<String>,
    schedule: Option<Spanned<String>>,
    jitter: Option<Spanned<String>>,
    keep: Option<Spanned<KeepPolicy>>,
    rpo: Option<Spanned<String>>,
    check: Option<Spanned<String>>,
    check_read_data: Option<Spanned<String>>,
    prune: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    #[serde(default)]
    copy_to: Vec<Spanned<String>>,
    copy_schedule: Option<Spanned<String>>,
    #[serde(default)]
    keep_copies: BTreeMap<Spanned<String>, Spanned<KeepPolicy>>,
    copy_limit_upload: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNotify {
    events: Spanned<Vec<Spanned<String>>>,
    webhook: Option<Spanned<String>>,
    ntfy: Option<Spanned<String>>,
    healthchecks: Option<Spanned<String>>,
    #[serde(default)]
    plans: Vec<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Spanned<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawServe {
    max_per_storage: Option<Spanned<usize>>,
    retries: Option<Spanned<u32>>,
    retry_backoff: Option<Spanned<String>>,
    low_space_ratio: Option<Spanned<f64>>,
    tick: Option<Spanned<String>>,
    prune_grace: Option<Spanned<String>>,
}

fn line_of(text: &str, span: Range<usize>) -> usize {
    text[..span.start.min(text.len())].matches('\n').count() + 1
}

/// Why a duration in the config file was refused.
#[derive(Debug, thiserror::Error)]
pub enum DurationError {
    /// Not a human duration at all.
    #[error("{text:?} is not a duration ({source}); write e.g. \"26h\" or \"10m\"")]
    Unparsable {
        /// What was written.
        text: String,
        /// What humantime found.
        source: humantime::DurationError,
    },
    /// Longer than chrono's arithmetic (schedules, retention) can count.
    #[error("{text:?} is too long")]
    TooLong {
        /// What was written.
        text: String,
        /// What chrono found.
        source: chrono::OutOfRangeError,
    },
}

/// Parses a human duration (`"26h"`, `"10m"`, `"1h 30m"`).
pub fn duration(s: &str) -> Result<Duration, DurationError> {
    let d = humantime::parse_duration(s).map_err(|source| DurationError::Unparsable {
        text: s.to_owned(),
        source,
    })?;
    // Durations meet chrono's arithmetic (schedules, retention): it must fit.
    chrono::Duration::from_std(d).map_err(|source| DurationError::TooLong {
        text: s.to_owned(),
        source,
    })?;
    Ok(d)
}

/// A plan's copy keys, checked.
#[derive(Debug, Default)]
struct Copies {
    to: Vec<HostName>,
    schedule: Option<Cron>,
    keep: BTreeMap<HostName, KeepPolicy>,
    limit: u64,
    lines: Vec<usize>,
}

/// Collects mistakes with their lines while the raw file is turned into a
/// [`Config`].
struct Checker<'t> {
    text: &'t str,
    issues: Vec<ConfigIssue>,
}

impl Checker<'_> {
    fn line(&self, span: Range<usize>) -> usize {
        line_of(self.text, span)
    }

    fn issue(&mut self, span: Range<usize>, message: String) {
        let line = Some(self.line(span));
        self.issues.push(ConfigIssue { line, message });
    }

    fn cron(&mut self, what: &str, c: Option<&Spanned<String>>) -> Option<Cron> {
        let c = c?;
        match Cron::parse(c.get_ref()) {
            // A schedule like `0 0 30 2 *` parses but never fires: a plan
            // that would silently never run.
            Ok(cron) if cron.next_after(&chrono::Utc::now()).is_none() => {
                self.issue(c.span(), format!("{what}: {:?} never fires", c.get_ref()));
                None
            }
            Ok(cron) => Some(cron),
            Err(e) => {
                self.issue(c.span(), format!("{what}: {e}"));
                None
            }
        }
    }

    fn duration(&mut self, what: &str, d: Option<&Spanned<String>>) -> Option<Duration> {
        let d = d?;
        duration(d.get_ref())
            .map_err(|e| self.issue(d.span(), format!("{what}: {e}")))
            .ok()
    }

    fn host(&mut self, what: &str, h: &Spanned<String>) -> Option<HostName> {
        HostName::new(h.get_ref().clone())
            .map_err(|e| self.issue(h.span(), format!("{what}: {e}")))
            .ok()
    }

    fn url(&mut self, what: &str, url: Option<&Spanned<String>>) -> Option<String> {
        let url = url?;
        let u = url.get_ref();
        if !(u.starts_with("http://") || u.starts_with("https://")) {
            self.issue(url.span(), format!("{what}: {u:?} is not an http(s) URL"));
        }
        Some(u.clone())
    }

    fn plan(&mut self, raw: &RawPlan, names: &mut HashSet<String>) -> Option<Plan> {
        let before = self.issues.len();
        let name = raw.name.get_ref().clone();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            self.issue(
                raw.name.span(),
                format!("plan name {name:?}: use letters, digits, '-' and '_'"),
            );
        }
        if !names.insert(name.clone()) {
            self.issue(raw.name.span(), format!("plan name {name:?} is used twice"));
        }
        if raw.hosts.get_ref().is_empty() {
            self.issue(raw.hosts.span(), format!("plan {name}: hosts is empty"));
        }
        let mut hosts = Vec::new();
        let mut host_lines = Vec::new();
        for h in raw.hosts.get_ref() {
            if let Some(host) = self.host(&format!("plan {name}: hosts"), h) {
                hosts.push(host);
                host_lines.push(self.line(h.span()));
            }
        }
        let to = self.host(&format!("plan {name}: to"), &raw.to);
        for p in &raw.paths {
            if !Path::new(p.get_ref()).is_absolute() {
                self.issue(
                    p.span(),
                    format!(
                        "plan {name}: paths: {:?} is relative; write the absolute path",
                        p.get_ref()
                    ),
                );
            }
        }
        for g in &raw.exclude {
            // The agents compile excludes with globset: the same check here
            // refuses what they would refuse at the first backup.
            if let Err(e) = globset::Glob::new(g.get_ref()) {
                self.issue(
                    g.span(),
                    format!("plan {name}: exclude: {:?} is not a glob: {e}", g.get_ref()),
                );
            }
        }
        let schedule = self.cron(&format!("plan {name}: schedule"), raw.schedule.as_ref());
        let check = self.cron(&format!("plan {name}: check"), raw.check.as_ref());
        let check_read_data = self.cron(
            &format!("plan {name}: check_read_data"),
            raw.check_read_data.as_ref(),
        );
        let prune = self.cron(&format!("plan {name}: prune"), raw.prune.as_ref());
        let jitter = self.duration(&format!("plan {name}: jitter"), raw.jitter.as_ref());
        let rpo = self.duration(&format!("plan {name}: rpo"), raw.rpo.as_ref());
        let timeout = self.duration(&format!("plan {name}: timeout"), raw.timeout.as_ref());
        if let (Some(t), Some(raw)) = (timeout, raw.timeout.as_ref()) {
            if t.is_zero() {
                self.issue(
                    raw.span(),
                    format!("plan {name}: timeout must be above zero (leave it out for none)"),
                );
            }
        }
        if let Some(keep) = &raw.keep {
            if let Err(e) = keep.get_ref().within() {
                self.issue(keep.span(), format!("plan {name}: keep: {e}"));
            }
        }
        let copies = self.copies(&name, raw, to.as_ref());
        if self.issues.len() > before {
            return None;
        }
        Some(Plan {
            name,
            hosts,
            paths: raw.paths.iter().map(|p| p.get_ref().clone()).collect(),
            exclude: raw.exclude.iter().map(|g| g.get_ref().clone()).collect(),
            allow_empty: raw.allow_empty,
            to: to?,
            schedule,
            jitter: jitter
                .and_then(|j| chrono::Duration::from_std(j).ok())
                .unwrap_or_else(chrono::Duration::zero),
            keep: raw
                .keep
                .as_ref()
                .map(|k| k.get_ref().clone())
                .unwrap_or_default(),
            rpo,
            check,
            check_read_data,
            prune,
            timeout,
            host_lines,
            to_line: self.line(raw.to.span()),
            copy_to: copies.to,
            copy_schedule: copies.schedule,
            keep_copies: copies.keep,
            copy_limit_upload: copies.limit,
            copy_lines: copies.lines,
        })
    }

    /// A plan's copy keys: `copy_to`, `copy_schedule`, `keep_copies`,
    /// `copy_limit_upload`.
    fn copies(&mut self, name: &str, raw: &RawPlan, to: Option<&HostName>) -> Copies {
        let mut out = Copies::default();
        for c in &raw.copy_to {
            let Some(host) = self.host(&format!("plan {name}: copy_to"), c) else {
                continue;
            };
            if Some(&host) == to {
                self.issue(
                    c.span(),
                    format!("plan {name}: copy_to: {host} is the plan's own storage host (`to`); name another"),
                );
            } else if out.to.contains(&host) {
                self.issue(
                    c.span(),
                    format!("plan {name}: copy_to: {host} is named twice"),
                );
            } else {
                out.lines.push(self.line(c.span()));
                out.to.push(host);
            }
        }
        out.schedule = self.cron(
            &format!("plan {name}: copy_schedule"),
            raw.copy_schedule.as_ref(),
        );
        if let (Some(s), true) = (&raw.copy_schedule, raw.copy_to.is_empty()) {
            self.issue(
                s.span(),
                format!("plan {name}: copy_schedule without copy_to: name where to copy"),
            );
        }
        for (dest, keep) in &raw.keep_copies {
            let Some(host) = self.host(&format!("plan {name}: keep_copies"), dest) else {
                continue;
            };
            if !out.to.contains(&host) {
                self.issue(
                    dest.span(),
                    format!("plan {name}: keep_copies: {host} is not in copy_to"),
                );
            }
            if let Err(e) = keep.get_ref().within() {
                self.issue(keep.span(), format!("plan {name}: keep_copies.{host}: {e}"));
            }
            out.keep.insert(host, keep.get_ref().clone());
        }
        if let Some(limit) = &raw.copy_limit_upload {
            match flotilla_protocol::text::parse_bytes(limit.get_ref()) {
                Ok(0) => self.issue(
                    limit.span(),
                    format!("plan {name}: copy_limit_upload must be above zero (leave it out for no limit)"),
                ),
                Ok(n) => out.limit = n,
                Err(e) => self.issue(limit.span(), format!("plan {name}: copy_limit_upload: {e}")),
            }
        }
        out
    }

    fn notify(&mut self, n: usize, raw: &RawNotify, plans: &HashSet<String>) -> Notify {
        let what = format!("notify #{n}");
        if raw.webhook.is_none() && raw.ntfy.is_none() && raw.healthchecks.is_none() {
            self.issue(
                raw.events.span(),
                format!("{what}: give webhook, ntfy or healthchecks"),
            );
        }
        for k in raw.events.get_ref() {
            let kind = k.get_ref().as_str();
            if kind != "*" && !EventBody::KINDS.contains(&kind) {
                self.issue(
                    k.span(),
                    format!(
                        "{what}: events: no event is called {kind:?} (use \"*\" or one of {})",
                        EventBody::KINDS.join(", ")
                    ),
                );
            }
        }
        for p in &raw.plans {
            if !plans.contains(p.get_ref()) {
                self.issue(
                    p.span(),
                    format!("{what}: plans: no plan is called {:?}", p.get_ref()),
                );
            }
        }
        Notify {
            events: raw
                .events
                .get_ref()
                .iter()
                .map(|k| k.get_ref().clone())
                .collect(),
            webhook: self.url(&format!("{what}: webhook"), raw.webhook.as_ref()),
            ntfy: self.url(&format!("{what}: ntfy"), raw.ntfy.as_ref()),
            healthchecks: self.url(&format!("{what}: healthchecks"), raw.healthchecks.as_ref()),
            plans: raw.plans.iter().map(|p| p.get_ref().clone()).collect(),
        }
    }

    fn serve(&mut self, raw: &RawServe) -> ServeSettings {
        let mut s = ServeSettings::default();
        if let Some(m) = &raw.max_per_storage {
            if *m.get_ref() == 0 {
                self.issue(m.span(), "serve.max_per_storage must be at least 1".into());
            }
            s.max_per_storage = *m.get_ref();
        }
        if let Some(r) = &raw.retries {
            if *r.get_ref() == 0 {
                self.issue(
                    r.span(),
                    "serve.retries counts attempts: at least 1 (1 = no retry)".into(),
                );
            }
            s.retries = *r.get_ref();
        }
        if let Some(r) = &raw.low_space_ratio {
            let v = *r.get_ref();
            if !(0.0..=1.0).contains(&v) {
                self.issue(
                    r.span(),
                    format!("serve.low_space_ratio {v} must be between 0 and 1"),
                );
            }
            s.low_space_ratio = v;
        }
        if let Some(d) = self.duration("serve.retry_backoff", raw.retry_backoff.as_ref()) {
            s.retry_backoff = d;
        }
        if let Some(d) = self.duration("serve.prune_grace", raw.prune_grace.as_ref()) {
            s.prune_grace = d;
        }
        if let (Some(d), Some(raw)) = (
            self.duration("serve.tick", raw.tick.as_ref()),
            raw.tick.as_ref(),
        ) {
            if d.is_zero() || d >= MAX_TICK {
                self.issue(
                    raw.span(),
                    "serve.tick must be above 0 and under 10s: the daemon renews its 15 s lease every tick"
                        .into(),
                );
            }
            s.tick = d;
        }
        s
    }
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

    /// Parses and checks config text; every mistake is returned, each with
    /// its line.
    pub fn parse(text: &str) -> Result<Config, Vec<ConfigIssue>> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            vec![ConfigIssue {
                line: e.span().map(|s| line_of(text, s)),
                message: e.message().to_owned(),
            }]
        })?;
        let mut c = Checker {
            text,
            issues: Vec::new(),
        };
        let mut names = HashSet::new();
        let plan: Vec<Plan> = raw
            .plan
            .iter()
            .filter_map(|p| c.plan(p, &mut names))
            .collect();
        let notify = raw
            .notify
            .iter()
            .enumerate()
            .map(|(i, n)| c.notify(i + 1, n, &names))
            .collect();
        let metrics = raw.metrics.as_ref().and_then(|m| {
            m.listen
                .get_ref()
                .parse::<SocketAddr>()
                .map_err(|_| {
                    c.issue(
                        m.listen.span(),
                        format!("metrics.listen {:?} is not ADDR:PORT", m.listen.get_ref()),
                    )
                })
                .ok()
                .map(|listen| Metrics { listen })
        });
        let serve = c.serve(&raw.serve);
        if !c.issues.is_empty() {
            return Err(c.issues);
        }
        Ok(Config {
            plan,
            notify,
            metrics,
            serve,
        })
    }

    /// Warnings for hosts of the plans (sources and storage) that `enrolled`
    /// says the fleet never enrolled: a plan for them waits forever.
    pub fn unenrolled(&self, enrolled: impl Fn(&HostName) -> bool) -> Vec<ConfigIssue> {
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        for plan in &self.plan {
            let named = plan
                .hosts
                .iter()
                .zip(&plan.host_lines)
                .chain([(&plan.to, &plan.to_line)])
                .chain(plan.copy_to.iter().zip(&plan.copy_lines));
            for (host, line) in named {
                if !enrolled(host) && seen.insert((host.clone(), *line)) {
                    out.push(ConfigIssue {
                        line: Some(*line),
                        message: format!(
                            "plan {}: host {host} was never enrolled in this fleet \
                             (`flotilla enroll {host}`)",
                            plan.name
                        ),
                    });
                }
            }
        }
        out
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

    /// The line and message of the single issue `text` has.
    fn only_issue(text: &str) -> ConfigIssue {
        let issues = Config::parse(text).expect_err("refused");
        assert_eq!(issues.len(), 1, "{issues:?}");
        issues[0].clone()
    }

    #[test]
    fn the_documented_shape_parses_into_typed_values() {
        let c = Config::parse(GOOD).expect("valid");
        let plan = &c.plan[0];
        assert_eq!(plan.name, "home");
        assert_eq!(plan.keep.daily, Some(7));
        assert_eq!(plan.rpo, Some(Duration::from_secs(26 * 3600)));
        assert_eq!(plan.to.as_str(), "nas");
        assert_eq!(
            plan.schedule,
            Some(Cron::parse("0 3 * * *").expect("valid"))
        );
        assert_eq!(plan.jitter, chrono::Duration::zero());
        assert_eq!(
            c.metrics.map(|m| m.listen.port()),
            Some(9464),
            "metrics address parsed"
        );
        assert_eq!(c.serve, ServeSettings::default());
    }

    #[test]
    fn copy_keys_are_checked_against_the_plan() {
        let with = |extra: &str| GOOD.replace("to = \"nas\"", &format!("to = \"nas\"\n{extra}"));
        let c = Config::parse(&with(
            "copy_to = [\"offsite\", \"cloud\"]\ncopy_schedule = \"0 4 * * *\"\n\
             keep_copies.offsite = { daily = 30 }\ncopy_limit_upload = \"2MiB/s\"",
        ))
        .expect("valid");
        let plan = &c.plan[0];
        assert_eq!(
            plan.copy_to,
            [
                HostName::new("offsite").expect("valid"),
                HostName::new("cloud").expect("valid")
            ]
        );
        assert!(plan.copy_schedule.is_some());
        assert_eq!(plan.copy_limit_upload, 2 << 20);
        assert_eq!(plan.keep_copies.len(), 1);
        assert_eq!(
            plan.keep_copies.values().next().and_then(|k| k.daily),
            Some(30)
        );
        // Copies are off unless named.
        let plain = &Config::parse(GOOD).expect("valid").plan[0];
        assert!(plain.copy_to.is_empty() && plain.keep_copies.is_empty());
        assert_eq!(plain.copy_limit_upload, 0);

        for (extra, says) in [
            ("copy_to = [\"nas\"]", "is the plan's own storage host"),
            (
                "copy_to = [\"offsite\", \"offsite\"]",
                "offsite is named twice",
            ),
            (
                "copy_schedule = \"0 4 * * *\"",
                "copy_schedule without copy_to",
            ),
            (
                "copy_to = [\"offsite\"]\nkeep_copies.cloud = { last = 1 }",
                "cloud is not in copy_to",
            ),
            (
                "copy_to = [\"offsite\"]\ncopy_limit_upload = \"fast\"",
                "copy_limit_upload",
            ),
            (
                "copy_to = [\"offsite\"]\ncopy_limit_upload = \"0\"",
                "above zero",
            ),
            ("copy_to = [\"off site\"]", "copy_to"),
        ] {
            let issues = Config::parse(&with(extra)).expect_err(extra);
            assert!(
                issues
                    .iter()
                    .any(|i| i.message.contains(says) && i.line.is_some()),
                "{extra}: {issues:?}"
            );
        }
        // A copy destination never enrolled is warned about like any host.
        let c = Config::parse(&with("copy_to = [\"offsite\"]")).expect("valid");
        let warned = c.unenrolled(|h| h.as_str() != "offsite");
        assert_eq!(warned.len(), 1, "{warned:?}");
        assert!(
            warned[0]
                .message
                .contains("host offsite was never enrolled"),
            "{warned:?}"
        );
    }

    #[test]
    fn allow_empty_is_off_unless_a_plan_says_so() {
        let c = Config::parse(GOOD).expect("valid");
        assert!(!c.plan[0].allow_empty);
        let on = GOOD.replace("to = \"nas\"", "to = \"nas\"\nallow_empty = true");
        assert!(Config::parse(&on).expect("valid").plan[0].allow_empty);
        let wrong = GOOD.replace("to = \"nas\"", "to = \"nas\"\nallow_empty = \"yes\"");
        let issues = Config::parse(&wrong).expect_err("not a boolean");
        assert_eq!(issues[0].line, Some(8), "{issues:?}");
    }

    #[test]
    fn serve_settings_are_parsed_once() {
        let c = Config::parse(
            "[serve]\ntick = \"1s\"\nretry_backoff = \"2m\"\nprune_grace = \"1d\"\nretries = 5\n",
        )
        .expect("valid");
        assert_eq!(c.serve.tick, Duration::from_secs(1));
        assert_eq!(c.serve.retry_backoff, Duration::from_secs(120));
        assert_eq!(c.serve.prune_grace, Duration::from_secs(86_400));
        assert_eq!(c.serve.retries, 5);
        let bad = only_issue("[serve]\nretries = 3\ntick = \"soon\"\n");
        assert_eq!(bad.line, Some(3), "{bad:?}");
        let slow = only_issue("[serve]\ntick = \"15s\"\n");
        assert_eq!(slow.line, Some(2), "{slow:?}");
        assert!(slow.message.contains("lease"), "{slow:?}");
        let none = only_issue("\n[serve]\nmax_per_storage = 0\n");
        assert_eq!(none.line, Some(3), "{none:?}");
    }

    #[test]
    fn mistakes_point_at_their_line() {
        let bad = GOOD.replace("0 3 * * *", "0 25 * * *");
        let issue = only_issue(&bad);
        assert_eq!(issue.line, Some(8), "{issue:?}");
        assert!(issue.message.contains("hour"), "{issue:?}");

        let typo = GOOD.replace("exclude =", "exclud =");
        let issues = Config::parse(&typo).expect_err("refused");
        assert_eq!(issues[0].line, Some(6), "{issues:?}");

        let bad_rpo = GOOD.replace("\"26h\"", "\"soon\"");
        let issue = only_issue(&bad_rpo);
        assert_eq!(issue.line, Some(10), "{issue:?}");
    }

    #[test]
    fn a_bad_exclude_glob_is_refused_at_its_line() {
        let bad = GOOD.replace("[\"**/.cache\"]", "[\"**/.cache\", \"a[b\"]");
        let issue = only_issue(&bad);
        assert_eq!(issue.line, Some(6), "{issue:?}");
        assert!(issue.message.contains("\"a[b\""), "{issue:?}");
    }

    #[test]
    fn a_relative_path_is_refused_at_its_line() {
        let bad = GOOD.replace("[\"/home\", \"/etc\"]", "[\"/home\", \"etc\"]");
        let issue = only_issue(&bad);
        assert_eq!(issue.line, Some(5), "{issue:?}");
        assert!(issue.message.contains("relative"), "{issue:?}");
    }

    #[test]
    fn a_misspelt_event_kind_is_refused_at_its_line() {
        let bad = GOOD.replace("\"job.failed\"", "\"job.fialed\"");
        let issue = only_issue(&bad);
        assert_eq!(issue.line, Some(13), "{issue:?}");
        assert!(issue.message.contains("job.fialed"), "{issue:?}");
        // `*` and every real kind are accepted.
        let all = GOOD.replace("\"job.failed\"", "\"*\", \"agent.version_mismatch\"");
        Config::parse(&all).expect("valid kinds");
    }

    #[test]
    fn a_bad_cron_is_refused_at_its_line() {
        let bad = format!(
            "{GOOD}\n[[plan]]\nname = \"b\"\nhosts = [\"x\"]\nto = \"nas\"\nprune = \"0 0 * *\"\n"
        );
        let issue = only_issue(&bad);
        assert_eq!(issue.line, Some(23), "{issue:?}");
        assert!(issue.message.contains("5 fields"), "{issue:?}");
        let never = bad.replace("0 0 * *", "0 0 30 2 *");
        let issue = only_issue(&never);
        assert_eq!(issue.line, Some(23), "{issue:?}");
        assert!(issue.message.contains("never fires"), "{issue:?}");
    }

    #[test]
    fn notify_urls_and_plans_are_checked_at_their_line() {
        let bad = GOOD.replace("https://example.invalid/hook", "example.invalid/hook");
        let issue = only_issue(&bad);
        assert_eq!(issue.line, Some(14), "{issue:?}");
        let unknown_plan = GOOD.replace("webhook = ", "plans = [\"hmoe\"]\nwebhook = ");
        let issue = only_issue(&unknown_plan);
        assert_eq!(issue.line, Some(14), "{issue:?}");
        assert!(issue.message.contains("hmoe"), "{issue:?}");
    }

    #[test]
    fn hosts_never_enrolled_are_warned_about_with_their_line() {
        let c = Config::parse(GOOD).expect("valid");
        let enrolled = |h: &HostName| h.as_str() == "laptop";
        let warnings = c.unenrolled(enrolled);
        let got: Vec<(Option<usize>, bool)> = warnings
            .iter()
            .map(|w| (w.line, w.message.contains("never enrolled")))
            .collect();
        assert_eq!(got, vec![(Some(4), true), (Some(7), true)], "{warnings:?}");
        assert!(warnings[0].message.contains("desktop"), "{warnings:?}");
        assert!(warnings[1].message.contains("nas"), "{warnings:?}");
        assert!(c.unenrolled(|_| true).is_empty());
    }

    #[test]
    fn a_plan_timeout_is_parsed_once_and_checked_at_its_line() {
        let c = Config::parse(&GOOD.replace("rpo = ", "timeout = \"2h\"\nrpo = ")).expect("valid");
        assert_eq!(c.plan[0].timeout, Some(Duration::from_secs(7200)));
        assert_eq!(Config::parse(GOOD).expect("valid").plan[0].timeout, None);
        let bad = only_issue(&GOOD.replace("rpo = ", "timeout = \"soon\"\nrpo = "));
        assert_eq!(bad.line, Some(10), "{bad:?}");
        assert!(bad.message.starts_with("plan home: timeout: "), "{bad:?}");
        let zero = only_issue(&GOOD.replace("rpo = ", "timeout = \"0s\"\nrpo = "));
        assert_eq!(zero.line, Some(10), "{zero:?}");
        assert!(zero.message.contains("above zero"), "{zero:?}");
    }

    #[test]
    fn a_bad_duration_says_why_and_keeps_its_cause() {
        let e = duration("soon").expect_err("refused");
        assert!(matches!(e, DurationError::Unparsable { .. }), "{e:?}");
        assert!(
            e.to_string().starts_with("\"soon\" is not a duration ("),
            "{e}"
        );
        assert!(std::error::Error::source(&e).is_some());
        let e = duration("300000000years").expect_err("refused");
        assert!(matches!(e, DurationError::TooLong { .. }), "{e:?}");
        assert_eq!(e.to_string(), "\"300000000years\" is too long");
        assert_eq!(duration("1h 30m").ok(), Some(Duration::from_secs(5400)));
    }
}
