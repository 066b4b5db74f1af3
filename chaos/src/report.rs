//! The summary of a run: a table per scenario (trials, passed, failed,
//! skipped, missed, median recovery time and its range), as plain text and as markdown with the
//! command line and the seed that made it.

use std::fmt::Write as _;
use std::time::Duration;

use crate::trial::{TrialResult, Verdict};

/// One row of the table.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The scenario.
    pub scenario: String,
    /// Trials whose fault landed (every trial but the missed ones).
    pub trials: usize,
    /// Trials that passed.
    pub passed: usize,
    /// Trials that failed.
    pub failed: usize,
    /// Trials skipped (not root, no libfaketime).
    pub skipped: usize,
    /// Trials whose fault missed their task (replaced by another trial).
    pub missed: usize,
    /// Median recovery time of the trials that measured one.
    pub median_recovery: Option<Duration>,
    /// The shortest and the longest recovery.
    pub recovery_range: Option<(Duration, Duration)>,
}

/// The rows of `results`, scenarios in the order they first appear.
pub fn rows(results: &[TrialResult]) -> Vec<Row> {
    let mut order: Vec<&str> = Vec::new();
    for r in results {
        if !order.contains(&r.scenario) {
            order.push(r.scenario);
        }
    }
    order
        .into_iter()
        .map(|name| {
            let of: Vec<&TrialResult> = results.iter().filter(|r| r.scenario == name).collect();
            let count = |f: fn(&Verdict) -> bool| of.iter().filter(|r| f(&r.verdict)).count();
            let recoveries: Vec<Duration> = of.iter().filter_map(|r| r.recovery).collect();
            let missed = count(|v| matches!(v, Verdict::Missed(_)));
            let range = recoveries
                .iter()
                .min()
                .copied()
                .zip(recoveries.iter().max().copied());
            Row {
                scenario: name.to_owned(),
                trials: of.len() - missed,
                passed: count(|v| matches!(v, Verdict::Passed)),
                failed: count(|v| matches!(v, Verdict::Failed(_))),
                skipped: count(|v| matches!(v, Verdict::Skipped(_))),
                missed,
                median_recovery: median(recoveries),
                recovery_range: range,
            }
        })
        .collect()
}

/// The median (the mean of the middle two for an even count).
pub fn median(mut values: Vec<Duration>) -> Option<Duration> {
    if values.is_empty() {
        return None;
    }
    values.sort();
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2
    })
}

fn seconds(d: Option<Duration>) -> String {
    d.map_or_else(|| "–".to_owned(), |d| format!("{:.1} s", d.as_secs_f64()))
}

const HEADER: [&str; 8] = [
    "scenario",
    "trials",
    "passed",
    "failed",
    "skipped",
    "missed",
    "median recovery",
    "recovery range",
];

fn cells(row: &Row) -> [String; 8] {
    [
        row.scenario.clone(),
        row.trials.to_string(),
        row.passed.to_string(),
        row.failed.to_string(),
        row.skipped.to_string(),
        row.missed.to_string(),
        seconds(row.median_recovery),
        row.recovery_range.map_or_else(
            || "–".to_owned(),
            |(lo, hi)| format!("{:.1}–{:.1} s", lo.as_secs_f64(), hi.as_secs_f64()),
        ),
    ]
}

/// The table as aligned plain text.
pub fn text_table(rows: &[Row]) -> String {
    let body: Vec<[String; 8]> = rows.iter().map(cells).collect();
    let mut widths = HEADER.map(str::len);
    for line in &body {
        for (w, cell) in widths.iter_mut().zip(line) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[String]| {
        let mut text = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            // The name left-aligned, numbers right-aligned.
            if i == 0 {
                let _ = write!(text, "{cell:<w$}");
            } else {
                let _ = write!(text, "  {cell:>w$}");
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&HEADER.map(str::to_owned));
    line(&widths.map(|w| "-".repeat(w)));
    for cells in &body {
        line(cells);
    }
    out
}

/// The whole report as markdown: the command, the seed, the table, and
/// each failure with its reason and the trial's seed.
pub fn markdown(command: &str, seed: u64, wall: Duration, results: &[TrialResult]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "## Chaos run\n");
    let _ = writeln!(out, "Command: `{command}`  ");
    let _ = writeln!(out, "Seed: `{seed}` (replay: add `--seed {seed}`)  ");
    let _ = writeln!(out, "Wall time: {:.0} s\n", wall.as_secs_f64());
    let _ = writeln!(out, "| {} |", HEADER.join(" | "));
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|");
    for row in rows(results) {
        let _ = writeln!(out, "| {} |", cells(&row).join(" | "));
    }
    let _ = writeln!(out, "\n### Trials\n");
    let _ = writeln!(
        out,
        "| scenario | # | trial seed | verdict | recovery | took |"
    );
    let _ = writeln!(out, "|---|---:|---:|---|---:|---:|");
    for r in results {
        let verdict = match &r.verdict {
            Verdict::Passed => "pass".to_owned(),
            Verdict::Skipped(_) => "skipped".to_owned(),
            Verdict::Missed(_) => "missed".to_owned(),
            Verdict::Failed(_) => "**FAIL**".to_owned(),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {verdict} | {} | {:.0} s |",
            r.scenario,
            r.index + 1,
            r.seed,
            seconds(r.recovery),
            r.elapsed.as_secs_f64()
        );
    }
    let failures: Vec<&TrialResult> = results
        .iter()
        .filter(|r| matches!(r.verdict, Verdict::Failed(_)))
        .collect();
    if !failures.is_empty() {
        let _ = writeln!(out, "\n### Failures\n");
        for r in failures {
            let _ = writeln!(
                out,
                "- **{} #{}** (trial seed {}): {}",
                r.scenario,
                r.index + 1,
                r.seed,
                one_line(&r.verdict.to_string())
            );
        }
    }
    let skipped: Vec<&TrialResult> = results
        .iter()
        .filter(|r| matches!(r.verdict, Verdict::Skipped(_)))
        .collect();
    if !skipped.is_empty() {
        let _ = writeln!(out, "\n### Skipped\n");
        for r in skipped {
            let _ = writeln!(out, "- {} #{}: {}", r.scenario, r.index + 1, r.verdict);
        }
    }
    out
}

/// The first line of a message, for tables and lists.
pub fn one_line(text: &str) -> String {
    let first = text.lines().next().unwrap_or("");
    if first.chars().count() > 300 {
        format!("{}…", first.chars().take(300).collect::<String>())
    } else {
        first.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(scenario: &'static str, verdict: Verdict, recovery: Option<u64>) -> TrialResult {
        TrialResult {
            scenario,
            index: 0,
            seed: 1,
            verdict,
            recovery: recovery.map(Duration::from_secs),
            elapsed: Duration::from_secs(1),
            notes: Vec::new(),
            logs: String::new(),
        }
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        let s = |v: &[u64]| median(v.iter().map(|&x| Duration::from_secs(x)).collect());
        assert_eq!(s(&[]), None);
        assert_eq!(s(&[5, 1, 3]), Some(Duration::from_secs(3)));
        assert_eq!(s(&[4, 1, 3, 2]), Some(Duration::from_millis(2500)));
    }

    #[test]
    fn rows_count_verdicts_per_scenario_in_order() {
        let results = vec![
            result("b", Verdict::Passed, Some(2)),
            result("a", Verdict::Failed("x".into()), None),
            result("b", Verdict::Passed, Some(4)),
            result("a", Verdict::Skipped("y".into()), None),
            result("b", Verdict::Missed("z".into()), None),
        ];
        let rows = rows(&results);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].scenario, "b");
        assert_eq!((rows[0].trials, rows[0].passed, rows[0].missed), (2, 2, 1));
        assert_eq!(
            rows[0].recovery_range,
            Some((Duration::from_secs(2), Duration::from_secs(4)))
        );
        assert_eq!(rows[0].median_recovery, Some(Duration::from_secs(3)));
        assert_eq!((rows[1].failed, rows[1].skipped), (1, 1));
        let text = text_table(&rows);
        assert!(text.starts_with("scenario"), "{text}");
        assert!(
            text.contains("3.0 s") && text.contains("2.0–4.0 s"),
            "{text}"
        );
        let md = markdown("chaos --quick", 9, Duration::from_secs(3), &results);
        assert!(
            md.contains("`chaos --quick`") && md.contains("--seed 9"),
            "{md}"
        );
        assert!(md.contains("| a | 2 | 0 | 1 | 1 | 0 | – | – |"), "{md}");
        assert!(md.contains("### Failures"), "{md}");
    }
}
