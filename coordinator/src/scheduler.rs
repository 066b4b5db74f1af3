//! When plans run: pure decisions from a schedule, the last run and `now`.
//!
//! No clock and no I/O here, so the daemon's timing is tested with a virtual
//! clock. The rule that matters after downtime: however many scheduled times
//! were missed, a plan runs **once** on return, then follows its schedule.

mod cron;

use chrono::{DateTime, Duration, TimeZone};

pub use cron::Cron;

/// What the scheduler decides for one plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Due<Tz: TimeZone> {
    /// Run now; `scheduled` is the (jittered) time it was due, `missed` how
    /// many scheduled times fell in the gap (0 when on time).
    Now {
        /// When it was due.
        scheduled: DateTime<Tz>,
        /// Scheduled times skipped because they were missed.
        missed: u32,
    },
    /// Nothing to do before this time.
    At(DateTime<Tz>),
    /// The schedule never fires.
    Never,
}

/// A plan's deterministic jitter: the same plan always shifts by the same
/// amount (so runs stay evenly spaced), different plans spread out.
pub fn jitter_for(plan: &str, max: Duration) -> Duration {
    let max_secs = max.num_seconds();
    if max_secs <= 0 {
        return Duration::zero();
    }
    let h = blake3::hash(plan.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&h.as_bytes()[..8]);
    Duration::seconds((u64::from_le_bytes(b) % max_secs as u64) as i64)
}

/// Decides whether a plan is due.
///
/// `last` is when it last ran by schedule (or when the daemon first saw the
/// plan, so a new plan waits for its first scheduled time).
pub fn due<Tz: TimeZone>(
    cron: &Cron,
    jitter: Duration,
    last: &DateTime<Tz>,
    now: &DateTime<Tz>,
) -> Due<Tz> {
    // Schedule times are computed unjittered, then shifted: the jitter must
    // not move which minute counts as "after the last run".
    let base = last.clone() - jitter;
    let Some(first) = cron.next_after(&base) else {
        return Due::Never;
    };
    let first = first + jitter;
    if first > *now {
        return Due::At(first);
    }
    let mut missed = 0u32;
    let mut t = first.clone();
    while let Some(next) = cron.next_after(&(t.clone() - jitter)).map(|n| n + jitter) {
        if next > *now || missed > 10_000 {
            break;
        }
        missed += 1;
        t = next;
    }
    Due::Now {
        scheduled: t,
        missed,
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

    #[test]
    fn every_minute_runs_on_time_and_catches_up_once() {
        let cron = Cron::parse("* * * * *").expect("valid");
        let j = Duration::zero();
        let last = at("2026-01-01T00:00:00Z");
        assert_eq!(
            due(&cron, j, &last, &at("2026-01-01T00:00:30Z")),
            Due::At(at("2026-01-01T00:01:00Z"))
        );
        assert_eq!(
            due(&cron, j, &last, &at("2026-01-01T00:01:00Z")),
            Due::Now {
                scheduled: at("2026-01-01T00:01:00Z"),
                missed: 0
            }
        );
        // Down for three periods: one run, three missed behind it.
        let back = at("2026-01-01T00:04:10Z");
        assert_eq!(
            due(&cron, j, &last, &back),
            Due::Now {
                scheduled: at("2026-01-01T00:04:00Z"),
                missed: 3
            }
        );
        // After running at `back`, the next is the next minute, not a backlog.
        assert_eq!(
            due(&cron, j, &back, &back),
            Due::At(at("2026-01-01T00:05:00Z"))
        );
    }

    #[test]
    fn jitter_shifts_runs_deterministically() {
        let cron = Cron::parse("0 3 * * *").expect("valid");
        let j = jitter_for("home", Duration::minutes(30));
        assert_eq!(j, jitter_for("home", Duration::minutes(30)));
        assert!(j < Duration::minutes(30));
        let last = at("2026-01-01T12:00:00Z");
        assert_eq!(
            due(&cron, j, &last, &last),
            Due::At(at("2026-01-02T03:00:00Z") + j)
        );
        assert_eq!(jitter_for("x", Duration::zero()), Duration::zero());
    }
}
