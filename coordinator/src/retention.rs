//! Which snapshots a keep policy keeps: a pure function, as restic defines it.
//!
//! Snapshots are taken newest first. `last = n` keeps the n newest. For each
//! of hourly, daily, weekly, monthly and yearly with count n, the newest
//! snapshot of each of the n newest distinct periods that have one is kept.
//! `within = "2d"` keeps every snapshot taken less than that before the
//! group's newest snapshot (not before now: a fleet that stopped backing up a
//! month ago keeps its last week of snapshots, as restic's `--keep-within`
//! does, instead of losing them all). A snapshot is kept if any
//! rule keeps it, and the reasons are reported. A policy with no rule keeps
//! everything: forgetting all snapshots is never a default.

use chrono::{DateTime, Datelike, Duration, TimeZone};
use serde::{Deserialize, Serialize};

/// The `within` of a keep policy is not a duration to count back with.
#[derive(Debug, thiserror::Error)]
pub enum WithinError {
    /// Not a human duration.
    #[error("within {text:?}: {source}")]
    Unparsable {
        /// What was written.
        text: String,
        /// What humantime found.
        source: humantime::DurationError,
    },
    /// Longer than chrono can count.
    #[error("within {text:?}: {source}")]
    TooLong {
        /// What was written.
        text: String,
        /// What chrono found.
        source: chrono::OutOfRangeError,
    },
}

/// A keep policy (the `keep = { ... }` of a plan, or `forget --keep-*`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeepPolicy {
    /// Newest n snapshots.
    pub last: Option<u32>,
    /// Newest snapshot of each of the last n hours that have one.
    pub hourly: Option<u32>,
    /// … days.
    pub daily: Option<u32>,
    /// … ISO weeks.
    pub weekly: Option<u32>,
    /// … months.
    pub monthly: Option<u32>,
    /// … years.
    pub yearly: Option<u32>,
    /// Everything taken less than this (e.g. `"2d"`) before the newest
    /// snapshot of its group.
    pub within: Option<String>,
}

/// The verdict on one snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// Snapshot id.
    pub id: String,
    /// Kept or forgotten.
    pub keep: bool,
    /// Which rules keep it (`last`, `daily`, …).
    pub reasons: Vec<&'static str>,
}

impl KeepPolicy {
    /// Whether any rule is set.
    pub fn is_empty(&self) -> bool {
        self.last.is_none()
            && self.hourly.is_none()
            && self.daily.is_none()
            && self.weekly.is_none()
            && self.monthly.is_none()
            && self.yearly.is_none()
            && self.within.is_none()
    }

    /// The `within` duration, parsed.
    pub fn within(&self) -> Result<Option<Duration>, WithinError> {
        self.within
            .as_deref()
            .map(|w| {
                let d = humantime::parse_duration(w).map_err(|source| WithinError::Unparsable {
                    text: w.to_owned(),
                    source,
                })?;
                Duration::from_std(d).map_err(|source| WithinError::TooLong {
                    text: w.to_owned(),
                    source,
                })
            })
            .transpose()
    }

    /// Applies the policy to the `(id, time)` pairs of one group (same
    /// storage, host and paths); returns verdicts newest first.
    ///
    /// `_now` is not used: every rule counts from the group's own snapshots
    /// (`within` from the newest one), so the verdicts do not depend on when
    /// the policy runs. It stays in the signature for the callers' sake.
    pub fn apply<Tz: TimeZone>(
        &self,
        snapshots: &[(String, DateTime<Tz>)],
        _now: &DateTime<Tz>,
    ) -> Vec<Verdict> {
        let mut order: Vec<&(String, DateTime<Tz>)> = snapshots.iter().collect();
        order.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| b.0.cmp(&a.0)));
        // restic: kept when taken after (newest - within).
        let within_since = self
            .within()
            .ok()
            .flatten()
            .zip(order.first())
            .map(|(d, (_, newest))| newest.clone() - d);
        let keep_all = self.is_empty();
        type Bucket<Tz> = fn(&DateTime<Tz>) -> i64;
        let rules: [(&'static str, Option<u32>, Bucket<Tz>); 5] = [
            ("hourly", self.hourly, |t| {
                t.naive_local().and_utc().timestamp().div_euclid(3600)
            }),
            ("daily", self.daily, |t| {
                i64::from(t.year()) * 1000 + i64::from(t.ordinal())
            }),
            ("weekly", self.weekly, |t| {
                let w = t.iso_week();
                i64::from(w.year()) * 100 + i64::from(w.week())
            }),
            ("monthly", self.monthly, |t| {
                i64::from(t.year()) * 100 + i64::from(t.month())
            }),
            ("yearly", self.yearly, |t| i64::from(t.year())),
        ];
        let mut left: Vec<Option<u32>> = rules.iter().map(|r| r.1).collect();
        let mut last_bucket: Vec<Option<i64>> = vec![None; rules.len()];
        let mut last_left = self.last;
        order
            .into_iter()
            .map(|(id, time)| {
                let mut reasons = Vec::new();
                if let Some(n) = last_left.as_mut() {
                    if *n > 0 {
                        *n -= 1;
                        reasons.push("last");
                    }
                }
                for (i, (name, _, bucket)) in rules.iter().enumerate() {
                    let Some(n) = left[i].as_mut() else { continue };
                    let b = bucket(time);
                    if *n > 0 && last_bucket[i] != Some(b) {
                        *n -= 1;
                        last_bucket[i] = Some(b);
                        reasons.push(*name);
                    }
                }
                if within_since.as_ref().is_some_and(|since| time > since) {
                    reasons.push("within");
                }
                if keep_all {
                    reasons.push("no policy");
                }
                Verdict {
                    id: id.clone(),
                    keep: !reasons.is_empty(),
                    reasons,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .expect("time")
            .with_timezone(&Utc)
    }

    /// Twice a day for 60 days, at 03:00 and 15:00.
    fn history() -> Vec<(String, DateTime<Utc>)> {
        let start = at("2026-01-01T03:00:00Z");
        (0..120)
            .map(|i| (format!("s{i:03}"), start + Duration::hours(12 * i)))
            .collect()
    }

    fn kept(policy: &KeepPolicy) -> Vec<String> {
        let now = at("2026-03-02T00:00:00Z");
        let mut ids: Vec<String> = policy
            .apply(&history(), &now)
            .into_iter()
            .filter(|v| v.keep)
            .map(|v| v.id)
            .collect();
        ids.sort();
        ids
    }

    #[test]
    fn the_policy_keeps_exactly_the_expected_snapshots() {
        let cases: Vec<(KeepPolicy, Vec<&str>)> = vec![
            (
                KeepPolicy {
                    last: Some(3),
                    ..Default::default()
                },
                vec!["s117", "s118", "s119"],
            ),
            // Newest of each of the last 3 days: the 15:00 ones.
            (
                KeepPolicy {
                    daily: Some(3),
                    ..Default::default()
                },
                vec!["s115", "s117", "s119"],
            ),
            // Weeks (ISO): 2026-03-01 is a Sunday, so the newest week ends there.
            (
                KeepPolicy {
                    weekly: Some(2),
                    ..Default::default()
                },
                vec!["s105", "s119"],
            ),
            (
                KeepPolicy {
                    monthly: Some(2),
                    ..Default::default()
                },
                vec!["s117", "s119"],
            ),
            (
                KeepPolicy {
                    yearly: Some(5),
                    ..Default::default()
                },
                vec!["s119"],
            ),
            // Counted back from the newest snapshot (s119, 2026-03-01T15:00),
            // not from now: 1 day 12 h back is 2026-02-28T03:00, which s116
            // equals and so misses.
            (
                KeepPolicy {
                    within: Some("1day 12h".into()),
                    ..Default::default()
                },
                vec!["s117", "s118", "s119"],
            ),
            (
                KeepPolicy {
                    within: Some("2days".into()),
                    ..Default::default()
                },
                vec!["s116", "s117", "s118", "s119"],
            ),
            (
                KeepPolicy {
                    last: Some(1),
                    daily: Some(2),
                    monthly: Some(1),
                    ..Default::default()
                },
                vec!["s117", "s119"],
            ),
        ];
        for (policy, want) in cases {
            assert_eq!(kept(&policy), want, "{policy:?}");
        }
    }

    /// restic's semantics: a short window, on a group whose newest snapshot
    /// is far older than the window, still keeps the newest snapshots.
    /// Counting from now would forget every one of them.
    #[test]
    fn within_counts_back_from_the_newest_snapshot_not_from_now() {
        let policy = KeepPolicy {
            within: Some("13h".into()),
            ..Default::default()
        };
        // A year after the last backup.
        let now = at("2027-03-01T00:00:00Z");
        let verdicts = policy.apply(&history(), &now);
        let kept: Vec<&str> = verdicts
            .iter()
            .filter(|v| v.keep)
            .map(|v| v.id.as_str())
            .collect();
        assert_eq!(kept, ["s119", "s118"]);
        assert!(verdicts
            .iter()
            .filter(|v| v.keep)
            .all(|v| v.reasons == ["within"]));
        // The verdicts are the same whenever the policy runs.
        assert_eq!(
            verdicts,
            policy.apply(&history(), &at("2026-03-01T16:00:00Z"))
        );
    }

    #[test]
    fn within_on_an_empty_group_keeps_nothing_and_does_not_panic() {
        let policy = KeepPolicy {
            within: Some("1d".into()),
            ..Default::default()
        };
        assert!(policy.apply(&[], &at("2026-03-01T00:00:00Z")).is_empty());
    }

    #[test]
    fn an_empty_policy_keeps_everything() {
        assert_eq!(kept(&KeepPolicy::default()).len(), 120);
    }

    #[test]
    fn a_bad_within_says_which_and_keeps_its_cause() {
        let policy = |w: &str| KeepPolicy {
            within: Some(w.into()),
            ..Default::default()
        };
        let e = policy("soon").within().expect_err("refused");
        assert!(matches!(e, WithinError::Unparsable { .. }), "{e:?}");
        assert!(e.to_string().starts_with("within \"soon\": "), "{e}");
        assert!(std::error::Error::source(&e).is_some());
        let e = policy("300000000years").within().expect_err("refused");
        assert!(matches!(e, WithinError::TooLong { .. }), "{e:?}");
        assert_eq!(
            policy("2d").within().expect("valid"),
            Some(Duration::days(2))
        );
        assert_eq!(KeepPolicy::default().within().expect("valid"), None);
    }
}
