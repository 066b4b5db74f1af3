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
pub enum CronError {
    /// Not five fields.
    #[error("invalid cron expression {text:?}: expected 5 fields (minute hour day month weekday), found {found}")]
    FieldCount {
        /// The expression.
        text: String,
        /// How many fields it has.
        found: usize,
    },
    /// One field does not parse.
    #[error("invalid cron expression {text:?}: {field}: {source}")]
    Field {
        /// The expression.
        text: String,
        /// Which field: `minute`, `hour`, `day of month`, `month`, `day of week`.
        field: &'static str,
        /// What is wrong with it.
        source: FieldError,
    },
}

/// What is wrong with one field of a cron expression.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FieldError {
    /// A value that is neither a number nor a known name.
    #[error("{0:?} is not a number")]
    NotANumber(String),
    /// A number outside the field's range.
    #[error("{value} is outside {lo}-{hi}")]
    OutOfRange {
        /// The number.
        value: u32,
        /// Smallest allowed.
        lo: u32,
        /// Largest allowed.
        hi: u32,
    },
    /// A step that is not a number.
    #[error("step {0:?} is not a number")]
    BadStep(String),
    /// A step of zero, which would never advance.
    #[error("a step of 0")]
    ZeroStep,
    /// A range whose end comes before its start.
    #[error("range {a}-{b} runs backwards")]
    Backwards {
        /// Start.
        a: u32,
        /// End.
        b: u32,
    },
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
) -> Result<(u64, bool), FieldError> {
    let value = |s: &str| -> Result<u32, FieldError> {
        if let Some(i) = names.iter().position(|n| n.eq_ignore_ascii_case(s)) {
            return Ok(i as u32 + name_base);
        }
        let v: u32 = s
            .parse()
            .map_err(|_| FieldError::NotANumber(s.to_owned()))?;
        if v < lo || v > hi {
            return Err(FieldError::OutOfRange { value: v, lo, hi });
        }
        Ok(v)
    };
    let mut bits = 0u64;
    for part in field.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => {
                let step: u32 = s.parse().map_err(|_| FieldError::BadStep(s.to_owned()))?;
                if step == 0 {
                    return Err(FieldError::ZeroStep);
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
            return Err(FieldError::Backwards { a, b });
        }
        // `checked_add`: the step is the user's number, up to `u32::MAX`;
        // plain addition would overflow (a panic in debug builds, a wrap
        // back below `b` and a stray bit in release ones).
        let mut v = Some(a);
        while let Some(x) = v.filter(|&x| x <= b) {
            bits |= 1 << x;
            v = x.checked_add(step);
        }
    }
    Ok((bits, field == "*"))
}

impl Cron {
    /// Parses a five-field expression.
    pub fn parse(text: &str) -> Result<Cron, CronError> {
        let err = |field| {
            move |source| CronError::Field {
                text: text.to_owned(),
                field,
                source,
            }
        };
        let fields: Vec<&str> = text.split_whitespace().collect();
        if fields.len() != 5 {
            return Err(CronError::FieldCount {
                text: text.to_owned(),
                found: fields.len(),
            });
        }
        let (minutes, _) = parse_field(fields[0], 0, 59, &[], 0).map_err(err("minute"))?;
        let (hours, _) = parse_field(fields[1], 0, 23, &[], 0).map_err(err("hour"))?;
        let (days, days_any) =
            parse_field(fields[2], 1, 31, &[], 0).map_err(err("day of month"))?;
        let (months, _) = parse_field(fields[3], 1, 12, &MONTHS, 1).map_err(err("month"))?;
        let (mut weekdays, weekdays_any) =
            parse_field(fields[4], 0, 7, &DAYS, 0).map_err(err("day of week"))?;
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
    use chrono::{FixedOffset, MappedLocalTime, NaiveDate, NaiveDateTime, Utc, Weekday};

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

    #[test]
    fn a_bad_field_keeps_its_cause() {
        assert_eq!(
            Cron::parse("60 * * * *"),
            Err(CronError::Field {
                text: "60 * * * *".into(),
                field: "minute",
                source: FieldError::OutOfRange {
                    value: 60,
                    lo: 0,
                    hi: 59
                },
            })
        );
        let e = Cron::parse("* * * 5-2 *").expect_err("refused");
        assert_eq!(
            e.to_string(),
            "invalid cron expression \"* * * 5-2 *\": month: range 5-2 runs backwards"
        );
        let source = std::error::Error::source(&e).map(ToString::to_string);
        assert_eq!(source.as_deref(), Some("range 5-2 runs backwards"));
    }

    // ---- Property: `next_after` against a brute-force walk ----

    /// splitmix64: small and deterministic, so a failure names the seed and
    /// expression that reproduce it. (proptest is a workspace dependency but
    /// not one of this crate's, and this file is all this change touches.)
    #[derive(Debug)]
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: u32) -> u32 {
            (self.next() % u64::from(n)) as u32
        }

        fn range(&mut self, lo: u32, hi: u32) -> u32 {
            lo + self.below(hi - lo + 1)
        }
    }

    /// A generated field: its text, and the values it stands for worked out
    /// here from the generator's choices, not by the parser.
    #[derive(Debug)]
    struct GenField {
        text: String,
        set: [bool; 64],
        star: bool,
    }

    fn gen_field(rng: &mut Rng, lo: u32, hi: u32, names: &[&str], name_base: u32) -> GenField {
        let mut set = [false; 64];
        if rng.below(4) == 0 {
            set[lo as usize..=hi as usize].fill(true);
            return GenField {
                text: "*".into(),
                set,
                star: true,
            };
        }
        let word = |rng: &mut Rng, v: u32| -> String {
            let name = v.checked_sub(name_base).and_then(|i| names.get(i as usize));
            match name {
                Some(n) if rng.below(2) == 0 => match rng.below(3) {
                    0 => n.to_uppercase(),
                    1 => n[..1].to_uppercase() + &n[1..],
                    _ => (*n).to_owned(),
                },
                _ => v.to_string(),
            }
        };
        let mut parts = Vec::new();
        for _ in 0..rng.range(1, 3) {
            let a = rng.range(lo, hi);
            let b = rng.range(a, hi);
            // Steps up to a little beyond the field's width: one step may
            // reach past the end.
            let n = rng.range(1, hi - lo + 2);
            let (text, from, to, step) = match rng.below(5) {
                0 => (word(rng, a), a, a, 1),
                1 => (format!("{}-{}", word(rng, a), word(rng, b)), a, b, 1),
                2 => (format!("*/{n}"), lo, hi, n),
                3 => (format!("{}-{}/{n}", word(rng, a), word(rng, b)), a, b, n),
                _ => {
                    let n = n.max(2);
                    (format!("{}/{n}", word(rng, a)), a, hi, n)
                }
            };
            for v in (from..=to).step_by(step as usize) {
                set[v as usize] = true;
            }
            parts.push(text);
        }
        GenField {
            text: parts.join(","),
            set,
            star: false,
        }
    }

    #[derive(Debug)]
    struct GenCron {
        text: String,
        fields: [GenField; 5],
    }

    impl GenCron {
        fn new(rng: &mut Rng) -> GenCron {
            let mut fields = [
                gen_field(rng, 0, 59, &[], 0),
                gen_field(rng, 0, 23, &[], 0),
                gen_field(rng, 1, 31, &[], 0),
                gen_field(rng, 1, 12, &MONTHS, 1),
                gen_field(rng, 0, 7, &DAYS, 0),
            ];
            if fields[4].set[7] {
                fields[4].set[0] = true;
            }
            let sep = if rng.below(8) == 0 { " \t " } else { " " };
            let text = fields
                .iter()
                .map(|f| f.text.as_str())
                .collect::<Vec<_>>()
                .join(sep);
            GenCron { text, fields }
        }

        /// Whether a wall-clock minute matches, by the documented rule: both
        /// day fields restricted (not exactly `*`) means either may match.
        fn matches(&self, t: &NaiveDateTime) -> bool {
            let [minute, hour, dom, month, dow] = &self.fields;
            let day_ok = dom.set[t.day() as usize];
            let weekday_ok = dow.set[t.weekday().num_days_from_sunday() as usize];
            let day = match (dom.star, dow.star) {
                (true, true) => true,
                (false, true) => day_ok,
                (true, false) => weekday_ok,
                (false, false) => day_ok || weekday_ok,
            };
            minute.set[t.minute() as usize]
                && hour.set[t.hour() as usize]
                && month.set[t.month() as usize]
                && day
        }

        /// The first whole minute strictly after `after` that matches, by
        /// trying every minute of every day up to `bound` days ahead.
        fn brute_next(&self, after: &NaiveDateTime, bound: i64) -> Option<NaiveDateTime> {
            let end = *after + Duration::days(bound);
            let mut day = after.date();
            while day <= end.date() {
                for m in 0..24 * 60 {
                    let t = day.and_hms_opt(m / 60, m % 60, 0).expect("valid time");
                    if t > *after && t <= end && self.matches(&t) {
                        return Some(t);
                    }
                }
                day = day.succ_opt().expect("date in range");
            }
            None
        }
    }

    #[test]
    fn next_after_agrees_with_a_minute_by_minute_walk() {
        const BOUND_DAYS: i64 = 366;
        let first = NaiveDate::from_ymd_opt(2020, 1, 1)
            .expect("date")
            .and_hms_opt(0, 0, 0)
            .expect("time")
            .and_utc()
            .timestamp();
        // 2020-2032: four leap years and many year ends.
        let span = 13 * 365 * 24 * 3600;
        let mut fired = 0;
        for seed in 0..400u64 {
            let mut rng = Rng(seed);
            let gen = GenCron::new(&mut rng);
            let cron = Cron::parse(&gen.text)
                .unwrap_or_else(|e| panic!("seed {seed}: {:?} refused: {e}", gen.text));
            let secs = first + (rng.next() % span) as i64;
            // A quarter of the starts on a whole minute, the rest anywhere in
            // it, down to the nanosecond.
            let nanos = if rng.below(4) == 0 {
                0
            } else {
                rng.below(1_000_000_000)
            };
            let secs = if nanos == 0 { secs - secs % 60 } else { secs };
            let mut after = DateTime::from_timestamp(secs, nanos).expect("in range");
            // Follow the chain twice: the second start is itself a matching
            // minute, which must not be returned again.
            for step in 0..2 {
                let got = cron.next_after(&after);
                let want = gen.brute_next(&after.naive_utc(), BOUND_DAYS);
                let ctx = format!("seed {seed} step {step}: {:?} after {after}", gen.text);
                match want {
                    Some(w) => {
                        assert_eq!(got.map(|g| g.naive_utc()), Some(w), "{ctx}");
                        fired += 1;
                    }
                    // Nothing within the bound: the parser looks five years
                    // ahead, so it may find a later match, but a real one.
                    None => {
                        if let Some(g) = &got {
                            assert!(*g > after + Duration::days(BOUND_DAYS), "{ctx}: {g}");
                            assert!(gen.matches(&g.naive_utc()), "{ctx}: {g}");
                        }
                        break;
                    }
                }
                after = got.expect("checked above");
            }
        }
        // The generator must mostly produce expressions that fire, or the
        // comparison above tests little.
        assert!(fired > 500, "only {fired} comparisons fired");
    }

    // ---- Named cases ----

    /// The runs of `expr` after `from`, as RFC 3339 strings, `n` of them.
    fn runs<Tz: TimeZone>(expr: &str, from: DateTime<Tz>, n: usize) -> Vec<String>
    where
        Tz::Offset: std::fmt::Display,
    {
        let cron = Cron::parse(expr).expect("valid");
        let mut out = Vec::new();
        let mut t = from;
        for _ in 0..n {
            match cron.next_after(&t) {
                Some(next) => {
                    out.push(next.to_rfc3339());
                    t = next;
                }
                None => break,
            }
        }
        out
    }

    #[test]
    fn both_day_fields_restricted_fire_on_either() {
        // The example in docs/operations.md: the 1st of the month and every
        // Monday. 2026-02-01 is a Sunday.
        assert_eq!(
            runs("0 3 1 * mon", at("2026-01-20T00:00:00Z"), 4),
            [
                "2026-01-26T03:00:00+00:00",
                "2026-02-01T03:00:00+00:00",
                "2026-02-02T03:00:00+00:00",
                "2026-02-09T03:00:00+00:00",
            ]
        );
        // Friday the 13th is not "13th AND Friday": every 13th and every Friday.
        assert_eq!(
            runs("0 0 13 * fri", at("2026-04-08T00:00:00Z"), 3),
            [
                "2026-04-10T00:00:00+00:00",
                "2026-04-13T00:00:00+00:00",
                "2026-04-17T00:00:00+00:00",
            ]
        );
    }

    #[test]
    fn one_restricted_day_field_decides_alone() {
        assert_eq!(
            runs("0 0 13 * *", at("2026-04-08T00:00:00Z"), 2),
            ["2026-04-13T00:00:00+00:00", "2026-05-13T00:00:00+00:00"]
        );
        assert_eq!(
            runs("0 0 * * fri", at("2026-04-08T00:00:00Z"), 2),
            ["2026-04-10T00:00:00+00:00", "2026-04-17T00:00:00+00:00"]
        );
    }

    #[test]
    fn a_stepped_star_day_counts_as_restricted() {
        // Differs from Vixie cron, which treats any day field starting with
        // `*` as unrestricted and so would run this on Mondays that are the
        // 1st, 11th, 21st or 31st only. Here: those days OR any Monday, as
        // the docs' "restricted" reads. 2026-01-01 is a Thursday.
        assert_eq!(
            runs("0 0 */10 * mon", at("2026-01-01T00:00:00Z"), 4),
            [
                "2026-01-05T00:00:00+00:00",
                "2026-01-11T00:00:00+00:00",
                "2026-01-12T00:00:00+00:00",
                "2026-01-19T00:00:00+00:00",
            ]
        );
    }

    #[test]
    fn every_fifteen_minutes() {
        assert_eq!(
            runs("*/15 * * * *", at("2026-06-30T23:07:30Z"), 4),
            [
                "2026-06-30T23:15:00+00:00",
                "2026-06-30T23:30:00+00:00",
                "2026-06-30T23:45:00+00:00",
                "2026-07-01T00:00:00+00:00",
            ]
        );
    }

    #[test]
    fn ranges_with_steps() {
        assert_eq!(
            runs("1-10/3 * * * *", at("2026-01-01T00:00:00Z"), 5),
            [
                "2026-01-01T00:01:00+00:00",
                "2026-01-01T00:04:00+00:00",
                "2026-01-01T00:07:00+00:00",
                "2026-01-01T00:10:00+00:00",
                "2026-01-01T01:01:00+00:00",
            ]
        );
        // `a/n` runs from `a` to the end of the field.
        assert_eq!(
            runs("5/20 * * * *", at("2026-01-01T00:00:00Z"), 4),
            [
                "2026-01-01T00:05:00+00:00",
                "2026-01-01T00:25:00+00:00",
                "2026-01-01T00:45:00+00:00",
                "2026-01-01T01:05:00+00:00",
            ]
        );
        // Names in a stepped range, any case: Monday, Wednesday, Friday.
        assert_eq!(
            runs("0 12 * * MON-Fri/2", at("2026-01-05T12:00:00Z"), 3),
            [
                "2026-01-07T12:00:00+00:00",
                "2026-01-09T12:00:00+00:00",
                "2026-01-12T12:00:00+00:00",
            ]
        );
    }

    #[test]
    fn a_step_too_large_for_u32_arithmetic_does_not_overflow() {
        // Once overflowed `v += step`: a panic in debug builds.
        let max = u32::MAX;
        let c = Cron::parse(&format!("1-5/{max} 0 * * *")).expect("valid");
        assert_eq!(
            c.next_after(&at("2026-01-01T00:00:00Z")),
            Some(at("2026-01-01T00:01:00Z"))
        );
        assert_eq!(
            c.next_after(&at("2026-01-01T00:01:00Z")),
            Some(at("2026-01-02T00:01:00Z"))
        );
        assert_eq!(c.minutes, 1 << 1);
        // No wrap back to 0: minute 0 only.
        let c = Cron::parse(&format!("*/{max} * * * *")).expect("valid");
        assert_eq!(c.minutes, 1);
    }

    #[test]
    fn february_29_only_in_leap_years() {
        assert_eq!(
            runs("0 0 29 2 *", at("2025-03-01T00:00:00Z"), 2),
            ["2028-02-29T00:00:00+00:00", "2032-02-29T00:00:00+00:00"]
        );
        // 2100 is not a leap year and 2104 is beyond the five-year horizon.
        assert!(runs("0 0 29 2 *", at("2096-03-01T00:00:00Z"), 1).is_empty());
    }

    #[test]
    fn days_that_never_exist_never_fire() {
        for never in ["0 0 30 2 *", "0 0 31 2 *", "0 0 31 4,6,9,11 *"] {
            assert_eq!(
                Cron::parse(never)
                    .expect("valid")
                    .next_after(&at("2026-01-01T00:00:00Z")),
                None,
                "{never}"
            );
        }
        // The 31st of the months that have one still fires.
        assert_eq!(
            runs("0 0 31 2,4,7 *", at("2026-01-01T00:00:00Z"), 2),
            ["2026-07-31T00:00:00+00:00", "2027-07-31T00:00:00+00:00"]
        );
    }

    #[test]
    fn the_year_rolls_over() {
        assert_eq!(
            runs("59 23 31 12 *", at("2026-12-31T23:59:00Z"), 1),
            ["2027-12-31T23:59:00+00:00"]
        );
        assert_eq!(
            runs("0 0 1 jan *", at("2026-12-31T23:59:59Z"), 1),
            ["2027-01-01T00:00:00+00:00"]
        );
        assert_eq!(
            runs("* * * * *", at("2026-12-31T23:59:59.999Z"), 1),
            ["2027-01-01T00:00:00+00:00"]
        );
        // December only, across the year end and into the next December.
        assert_eq!(
            runs("0 0 1,31 dec *", at("2026-12-15T00:00:00Z"), 2),
            ["2026-12-31T00:00:00+00:00", "2027-12-01T00:00:00+00:00"]
        );
    }

    #[test]
    fn a_fixed_offset_zone_keeps_its_wall_clock() {
        let kolkata = FixedOffset::east_opt(5 * 3600 + 1800).expect("offset");
        let from = at("2026-01-01T00:00:00Z").with_timezone(&kolkata);
        assert_eq!(
            runs("0 3 * * *", from, 2),
            ["2026-01-02T03:00:00+05:30", "2026-01-03T03:00:00+05:30"]
        );
    }

    // ---- Daylight saving, in a zone with real gaps and repeats ----

    /// Central European time by the EU rule: UTC+2 from 01:00 UTC on the last
    /// Sunday of March to 01:00 UTC on the last Sunday of October, else UTC+1
    /// (Europe/Berlin since 1996). chrono-tz is not a dependency.
    #[derive(Debug, Clone, Copy)]
    struct Berlin;

    const CET: i32 = 3600;
    const CEST: i32 = 7200;

    fn offset(secs: i32) -> FixedOffset {
        FixedOffset::east_opt(secs).expect("valid offset")
    }

    fn last_sunday_0100_utc(year: i32, month: u32) -> NaiveDateTime {
        let mut d = NaiveDate::from_ymd_opt(year, month + 1, 1)
            .and_then(|d| d.pred_opt())
            .expect("valid date");
        while d.weekday() != Weekday::Sun {
            d = d.pred_opt().expect("valid date");
        }
        d.and_hms_opt(1, 0, 0).expect("valid time")
    }

    impl TimeZone for Berlin {
        type Offset = FixedOffset;

        fn from_offset(_: &FixedOffset) -> Berlin {
            Berlin
        }

        fn offset_from_local_date(&self, local: &NaiveDate) -> MappedLocalTime<FixedOffset> {
            self.offset_from_local_datetime(&local.and_hms_opt(0, 0, 0).expect("midnight"))
        }

        fn offset_from_local_datetime(
            &self,
            local: &NaiveDateTime,
        ) -> MappedLocalTime<FixedOffset> {
            // An offset fits a wall-clock time if the instant it gives has
            // that offset; summer time first: it is the earlier instant.
            let fits = |o: i32| {
                let utc = *local - Duration::seconds(i64::from(o));
                self.offset_from_utc_datetime(&utc).local_minus_utc() == o
            };
            match (fits(CEST), fits(CET)) {
                (true, true) => MappedLocalTime::Ambiguous(offset(CEST), offset(CET)),
                (true, false) => MappedLocalTime::Single(offset(CEST)),
                (false, true) => MappedLocalTime::Single(offset(CET)),
                (false, false) => MappedLocalTime::None,
            }
        }

        fn offset_from_utc_date(&self, utc: &NaiveDate) -> FixedOffset {
            self.offset_from_utc_datetime(&utc.and_hms_opt(0, 0, 0).expect("midnight"))
        }

        fn offset_from_utc_datetime(&self, utc: &NaiveDateTime) -> FixedOffset {
            let summer = last_sunday_0100_utc(utc.year(), 3)..last_sunday_0100_utc(utc.year(), 10);
            offset(if summer.contains(utc) { CEST } else { CET })
        }
    }

    fn berlin(s: &str) -> DateTime<Berlin> {
        DateTime::parse_from_rfc3339(s)
            .expect("time")
            .with_timezone(&Berlin)
    }

    #[test]
    fn the_test_zone_has_the_2026_changes() {
        let t = NaiveDate::from_ymd_opt(2026, 3, 29).expect("date");
        assert_eq!(
            Berlin
                .from_local_datetime(&t.and_hms_opt(2, 30, 0).expect("time"))
                .single(),
            None
        );
        let t = NaiveDate::from_ymd_opt(2026, 10, 25).expect("date");
        let twice = Berlin.from_local_datetime(&t.and_hms_opt(2, 30, 0).expect("time"));
        assert_eq!(
            twice.earliest().map(|t| t.to_rfc3339()).as_deref(),
            Some("2026-10-25T02:30:00+02:00")
        );
        assert_eq!(
            twice.latest().map(|t| t.to_rfc3339()).as_deref(),
            Some("2026-10-25T02:30:00+01:00")
        );
    }

    #[test]
    fn a_time_skipped_by_spring_forward_is_skipped_that_day() {
        // 2026-03-29: 02:00 CET jumps to 03:00 CEST; there is no 02:30.
        assert_eq!(
            runs("30 2 * * *", berlin("2026-03-28T02:30:00+01:00"), 2),
            ["2026-03-30T02:30:00+02:00", "2026-03-31T02:30:00+02:00"]
        );
        // The hour after the gap runs on time, in summer time.
        assert_eq!(
            runs("0 3 * * *", berlin("2026-03-29T01:59:00+01:00"), 1),
            ["2026-03-29T03:00:00+02:00"]
        );
        // An every-minute job goes straight from 01:59 to 03:00.
        assert_eq!(
            runs("* * * * *", berlin("2026-03-29T01:58:00+01:00"), 2),
            ["2026-03-29T01:59:00+01:00", "2026-03-29T03:00:00+02:00"]
        );
    }

    #[test]
    fn a_time_repeated_by_fall_back_runs_once() {
        // 2026-10-25: 03:00 CEST falls back to 02:00 CET; 02:30 happens twice.
        assert_eq!(
            runs("30 2 * * *", berlin("2026-10-24T03:00:00+02:00"), 2),
            ["2026-10-25T02:30:00+02:00", "2026-10-26T02:30:00+01:00"]
        );
        // Asked from inside the second 02:xx hour, before its 02:30: still not
        // again that day.
        assert_eq!(
            runs("30 2 * * *", berlin("2026-10-25T02:10:00+01:00"), 1),
            ["2026-10-26T02:30:00+01:00"]
        );
        // Frequent jobs too run through the repeated hour once: from the
        // first 02:45 straight to 03:00 CET, an hour later than 02:45 + 15m.
        assert_eq!(
            runs("*/15 * * * *", berlin("2026-10-25T02:30:00+02:00"), 2),
            ["2026-10-25T02:45:00+02:00", "2026-10-25T03:00:00+01:00"]
        );
    }

    // ---- Refusals ----

    #[test]
    fn refusals_name_the_field_and_the_fault() {
        use FieldError::*;
        let out = |value, lo, hi| OutOfRange { value, lo, hi };
        let nan = |s: &str| NotANumber(s.to_owned());
        for (bad, field, why) in [
            // Out of range, alone and as a range end.
            ("60 * * * *", "minute", out(60, 0, 59)),
            ("0-60 * * * *", "minute", out(60, 0, 59)),
            ("* 24 * * *", "hour", out(24, 0, 23)),
            ("* * 0 * *", "day of month", out(0, 1, 31)),
            ("* * 32 * *", "day of month", out(32, 1, 31)),
            ("* * * 0 *", "month", out(0, 1, 12)),
            ("* * * 13 *", "month", out(13, 1, 12)),
            ("* * * * 8", "day of week", out(8, 0, 7)),
            // Empty parts of a field.
            ("1,,2 * * * *", "minute", nan("")),
            ("* 1- * * *", "hour", nan("")),
            ("* * /2 * *", "day of month", nan("")),
            ("* * * */ *", "month", BadStep(String::new())),
            ("* * * * ,", "day of week", nan("")),
            ("-1 * * * *", "minute", nan("")),
            // Garbage, and names in the wrong field.
            ("x * * * *", "minute", nan("x")),
            ("1.5 * * * *", "minute", nan("1.5")),
            ("jan * * * *", "minute", nan("jan")),
            ("* * * mon *", "month", nan("mon")),
            ("* * * * jan", "day of week", nan("jan")),
            ("* * * * mon-funday", "day of week", nan("funday")),
            ("*/x * * * *", "minute", BadStep("x".into())),
            ("* */0 * * *", "hour", ZeroStep),
            ("* * * * sat-sun", "day of week", Backwards { a: 6, b: 0 }),
            ("* * 5-2/2 * *", "day of month", Backwards { a: 5, b: 2 }),
        ] {
            let e = Cron::parse(bad).expect_err(bad);
            assert_eq!(
                e,
                CronError::Field {
                    text: bad.into(),
                    field,
                    source: why,
                },
                "{bad}"
            );
            assert!(
                e.to_string().contains(&format!(": {field}: ")),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn refusals_count_the_fields() {
        for (bad, found) in [
            ("", 0),
            ("   ", 0),
            ("@daily", 1),
            ("0 3 * *", 4),
            ("0 0 3 * * *", 6),
            ("0 0 3 * * * 2026", 7),
        ] {
            assert_eq!(
                Cron::parse(bad),
                Err(CronError::FieldCount {
                    text: bad.into(),
                    found
                }),
                "{bad:?}"
            );
        }
    }
}
