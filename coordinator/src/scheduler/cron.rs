//! Five-field cron expressions (`minute hour day-of-month month day-of-week`),
//! evaluated in any time zone through chrono.
//!
//! Supported per field: `*`, numbers, ranges `a-b`, lists `a,b`, steps `*/n`
//! and `a-b/n`; day-of-week 0-7 (0 and 7 are Sunday) and the names `sun`..`sat`
//! and `jan`..`dec`. As in Vixie cron, when both day fields are restricted a
//! day matches if either does.

use chrono::{DateTime, Datelike, Duration, TimeZone, Timelike};

/// A parsed schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cron {
    minutes: u64,
    hours: u32,
    days: u32,
    months: u16,
    weekdays: u8,
    days_any: bool,
    weekdays_any: bool,
    text: String,
}

/// Why a cron expression was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid cron expression {text:?}: {why}")]
pub struct CronError {
    /// The expression.
    pub text: String,
    /// What is wrong.
    pub why: String,
}

const MONTHS: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];
const DAYS: [&str; 7] = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"];

fn parse_field(
    field: &str,
    lo: u32,
    hi: u32,
    names: &[&str],
    name_base: u32,
) -> Result<(u64, bool), String> {
    let value = |s: &str| -> Result<u32, String> {
        if let Some(i) = names.iter().position(|n| n.eq_ignore_ascii_case(s)) {
            return Ok(i as u32 + name_base);
        }
        let v: u32 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
        if v < lo || v > hi {
            return Err(format!("{v} is outside {lo}-{hi}"));
        }
        Ok(v)
    };
    let mut bits = 0u64;
    for part in field.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => {
                let step: u32 = s
                    .parse()
                    .map_err(|_| format!("step {s:?} is not a number"))?;
                if step == 0 {
                    return Err("a step of 0".into());
                }
                (r, step)
            }
            None => (part, 1),
        };
        let (a, b) = if range == "*" {
            (lo, hi)
        } else if let Some((a, b)) = range.split_once('-') {
            (value(a)?, value(b)?)
        } else {
            let v = value(range)?;
            // `5/15` means from 5 to the end in steps of 15.
            (v, if step > 1 { hi } else { v })
        };
        if a > b {
            return Err(format!("range {a}-{b} runs backwards"));
        }
        let mut v = a;
        while v <= b {
            bits |= 1 << v;
            v += step;
        }
    }
    Ok((bits, field == "*"))
}

impl Cron {
    /// Parses a five-field expression.
    pub fn parse(text: &str) -> Result<Cron, CronError> {
        let err = |why: String| CronError {
            text: text.to_owned(),
            why,
        };
        let fields: Vec<&str> = text.split_whitespace().collect();
        if fields.len() != 5 {
            return Err(err(format!(
                "expected 5 fields (minute hour day month weekday), found {}",
                fields.len()
            )));
        }
        let (minutes, _) =
            parse_field(fields[0], 0, 59, &[], 0).map_err(|w| err(format!("minute: {w}")))?;
        let (hours, _) =
            parse_field(fields[1], 0, 23, &[], 0).map_err(|w| err(format!("hour: {w}")))?;
        let (days, days_any) =
            parse_field(fields[2], 1, 31, &[], 0).map_err(|w| err(format!("day of month: {w}")))?;
        let (months, _) =
            parse_field(fields[3], 1, 12, &MONTHS, 1).map_err(|w| err(format!("month: {w}")))?;
        let (mut weekdays, weekdays_any) =
            parse_field(fields[4], 0, 7, &DAYS, 0).map_err(|w| err(format!("day of week: {w}")))?;
        if weekdays & (1 << 7) != 0 {
            weekdays |= 1;
        }
        Ok(Cron {
            minutes,
            hours: hours as u32,
            days: days as u32,
            months: months as u16,
            weekdays: (weekdays & 0x7f) as u8,
            days_any,
            weekdays_any,
            text: text.to_owned(),
        })
    }

    /// The expression as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    fn day_matches<Tz: TimeZone>(&self, t: &DateTime<Tz>) -> bool {
        let dom = self.days & (1 << t.day()) != 0;
        let dow = self.weekdays & (1 << t.weekday().num_days_from_sunday()) != 0;
        match (self.days_any, self.weekdays_any) {
            (true, true) => true,
            (false, true) => dom,
            (true, false) => dow,
            (false, false) => dom || dow,
        }
    }

    fn matches<Tz: TimeZone>(&self, t: &DateTime<Tz>) -> bool {
        self.minutes & (1 << t.minute()) != 0
            && self.hours & (1 << t.hour()) != 0
            && self.months & (1 << t.month()) != 0
            && self.day_matches(t)
    }

    /// The first minute strictly after `after` that matches, within five
    /// years (an expression like `0 0 30 2 *` never matches: `None`).
    pub fn next_after<Tz: TimeZone>(&self, after: &DateTime<Tz>) -> Option<DateTime<Tz>> {
        let tz = after.timezone();
        let start = after.naive_local();
        let mut t = start
            .with_second(0)?
            .with_nanosecond(0)?
            .checked_add_signed(Duration::minutes(1))?;
        let limit = start.checked_add_signed(Duration::days(5 * 366))?;
        while t <= limit {
            // Skip whole days and hours that cannot match, minute steps only
            // within a matching hour.
            let local = match tz.from_local_datetime(&t).earliest() {
                Some(l) => l,
                // A local time skipped by a DST change: try the next minute.
                None => {
                    t = t.checked_add_signed(Duration::minutes(1))?;
                    continue;
                }
            };
            if self.months & (1 << local.month()) == 0 || !self.day_matches(&local) {
                t = (t.date().succ_opt()?).and_hms_opt(0, 0, 0)?;
                continue;
            }
            if self.hours & (1 << local.hour()) == 0 {
                t = t.with_minute(0)?.checked_add_signed(Duration::hours(1))?;
                continue;
            }
            if self.matches(&local) && local > *after {
                return Some(local);
            }
            t = t.checked_add_signed(Duration::minutes(1))?;
        }
        None
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
    fn next_runs() {
        let c = Cron::parse("0 3 * * *").expect("valid");
        assert_eq!(
            c.next_after(&at("2026-01-01T02:59:00Z")),
            Some(at("2026-01-01T03:00:00Z"))
        );
        assert_eq!(
            c.next_after(&at("2026-01-01T03:00:00Z")),
            Some(at("2026-01-02T03:00:00Z"))
        );
        let every = Cron::parse("* * * * *").expect("valid");
        assert_eq!(
            every.next_after(&at("2026-01-01T00:00:30Z")),
            Some(at("2026-01-01T00:01:00Z"))
        );
        let steps = Cron::parse("*/15 9-17 * * mon-fri").expect("valid");
        // 2026-01-03 is a Saturday: next is Monday 09:00.
        assert_eq!(
            steps.next_after(&at("2026-01-02T17:50:00Z")),
            Some(at("2026-01-05T09:00:00Z"))
        );
        let sunday7 = Cron::parse("0 0 * * 7").expect("valid");
        assert_eq!(
            sunday7.next_after(&at("2026-01-01T00:00:00Z")),
            Some(at("2026-01-04T00:00:00Z"))
        );
        assert_eq!(
            Cron::parse("0 0 30 2 *")
                .expect("valid")
                .next_after(&at("2026-01-01T00:00:00Z")),
            None
        );
    }

    #[test]
    fn bad_expressions_say_why() {
        for (bad, hint) in [
            ("0 3 * *", "5 fields"),
            ("60 * * * *", "minute"),
            ("* * * * funday", "day of week"),
            ("*/0 * * * *", "step"),
        ] {
            let e = Cron::parse(bad).expect_err("refused").to_string();
            assert!(e.contains(hint), "{bad}: {e}");
        }
    }
}
