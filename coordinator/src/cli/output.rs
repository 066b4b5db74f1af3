//! Small formatting helpers shared by the subcommands.

use flotilla_protocol::UnixMillis;

/// `1.5 GiB`-style sizes (the agent's `recover` prints the same).
pub use flotilla_protocol::text::bytes;

/// `3s ago`, `5m ago`, `2h ago`, `4d ago`.
pub fn ago(now: UnixMillis, then: UnixMillis) -> String {
    let secs = now.saturating_sub(then) / 1000;
    match secs {
        0..60 => format!("{secs}s ago"),
        60..3600 => format!("{}m ago", secs / 60),
        3600..86400 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86400),
    }
}

/// Rows under a header, each column as wide as its widest cell, two spaces
/// apart, no borders; the columns in `right` (numbers) are right-aligned,
/// their headers too.
/// Returns the lines, trailing spaces trimmed.
pub fn table(header: &[&str], right: &[usize], rows: Vec<Vec<String>>) -> Vec<String> {
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::NOTHING)
        .set_content_arrangement(comfy_table::ContentArrangement::Disabled)
        .set_header(header.to_vec());
    for row in rows {
        t.add_row(row);
    }
    for (i, column) in t.column_iter_mut().enumerate() {
        column.set_padding((0, 2));
        if right.contains(&i) {
            column.set_cell_alignment(comfy_table::CellAlignment::Right);
        }
    }
    t.lines().map(|l| l.trim_end().to_owned()).collect()
}

/// The line after tasks are sent without `--wait`: how to follow them.
pub fn follow_hint() -> &'static str {
    "follow progress with `flotilla watch` and see how tasks ended with `flotilla jobs` (or pass --wait)"
}

/// The first 8 characters of an id, for tables. Ids come from peers, so this
/// never slices bytes (a short or non-ASCII id must not panic).
pub fn short(id: impl AsRef<str>) -> String {
    id.as_ref().chars().take(8).collect()
}

/// A time for JSON output: RFC 3339 in UTC with milliseconds
/// (`2026-03-01T15:00:00.123Z`), the one format every `--json` uses.
///
/// Times come from other hosts (heartbeats, listings, events): one past the
/// year 9999, which RFC 3339 cannot write, is shown as raw milliseconds
/// instead of panicking.
pub fn rfc3339(ms: UnixMillis) -> String {
    /// 9999-12-31T23:59:59.999Z, the last instant RFC 3339 can write.
    const LAST_MS: UnixMillis = 253_402_300_799_999;
    if ms > LAST_MS {
        return format!("@{ms}ms");
    }
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_millis(t).to_string()
}

/// [`rfc3339`] of an optional time (`null` when absent).
pub fn rfc3339_opt(ms: Option<UnixMillis>) -> Option<String> {
    ms.map(rfc3339)
}

/// A time for people: local time to the second (`2026-03-01 16:00:00`), or
/// UTC with `--utc` (`2026-03-01 15:00:00 UTC`).
pub fn when(ms: UnixMillis, utc: bool) -> String {
    if utc {
        format!("{} UTC", when_in(ms, &chrono::Utc))
    } else {
        when_in(ms, &chrono::Local)
    }
}

fn when_in<Tz: chrono::TimeZone>(ms: UnixMillis, tz: &Tz) -> String
where
    Tz::Offset: std::fmt::Display,
{
    // Times come from peers; one beyond chrono's range is shown as is.
    match i64::try_from(ms)
        .ok()
        .and_then(|ms| tz.timestamp_millis_opt(ms).earliest())
    {
        Some(t) => t.format("%Y-%m-%d %H:%M:%S").to_string(),
        None => format!("@{ms}ms"),
    }
}

/// Says on stderr which storage hosts a listing is missing or does not
/// trust: a line each, as `warning: …`, or as a JSON object with `--json`
/// (`{"type": "warning", "storage", "listed", "message"}`), so that stdout
/// keeps its shape.
pub(crate) fn listing_warnings(listing: &crate::fleetops::Listing, json: bool) {
    let lines = listing
        .unanswered
        .iter()
        .map(|(s, _)| (s, false))
        .chain(listing.doubtful.iter().map(|(s, _)| (s, true)))
        .zip(listing.warnings());
    for ((storage, listed), message) in lines {
        if json {
            eprintln!(
                "{}",
                serde_json::json!({"type": "warning", "storage": storage.as_str(), "listed": listed, "message": message})
            );
        } else {
            eprintln!("warning: {message}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_sizes_and_ages() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 * 1024 * 1024 * 1024), "3.0 GiB");
        assert_eq!(ago(10_000, 7_000), "3s ago");
        assert_eq!(ago(7_200_000, 0), "2h ago");
        assert_eq!(short("0123456789"), "01234567");
        assert_eq!(short("é"), "é");
    }

    #[test]
    fn tables_align_columns_to_their_widest_cell() {
        let lines = table(
            &["HOST", "SIZE", "NOTE"],
            &[1],
            vec![
                vec!["laptop".into(), "1.5 KiB".into(), "-".into()],
                vec!["a-very-long-name".into(), "3 B".into(), "".into()],
            ],
        );
        assert_eq!(
            lines,
            [
                "HOST                 SIZE  NOTE",
                "laptop            1.5 KiB  -",
                "a-very-long-name      3 B",
            ]
        );
    }

    /// The hint names commands that exist, with flags they take.
    #[test]
    fn the_follow_hint_names_real_commands() {
        use clap::Parser;
        let hint = follow_hint();
        let commands: Vec<&str> = hint.split('`').skip(1).step_by(2).collect();
        assert_eq!(commands, ["flotilla watch", "flotilla jobs"]);
        for c in commands {
            crate::Cli::try_parse_from(c.split(' ')).expect(c);
        }
        assert!(hint.contains("--wait"));
    }

    /// 2026-03-01T15:00:00.250Z.
    const T: UnixMillis = 1_772_377_200_250;

    #[test]
    fn json_times_are_rfc3339_utc() {
        assert_eq!(rfc3339(T), "2026-03-01T15:00:00.250Z");
        assert_eq!(
            rfc3339_opt(Some(0)).as_deref(),
            Some("1970-01-01T00:00:00.000Z")
        );
        assert_eq!(rfc3339_opt(None), None);
    }

    #[test]
    fn a_time_past_year_9999_from_a_peer_does_not_panic() {
        assert_eq!(rfc3339(253_402_300_799_999), "9999-12-31T23:59:59.999Z");
        assert_eq!(rfc3339(u64::MAX), format!("@{}ms", u64::MAX));
    }

    #[test]
    fn human_times_are_to_the_second_in_the_zone_asked_for() {
        assert_eq!(when(T, true), "2026-03-01 15:00:00 UTC");
        let berlin = chrono::FixedOffset::east_opt(3600).expect("valid offset");
        assert_eq!(when_in(T, &berlin), "2026-03-01 16:00:00");
        // Local time has the same shape: no milliseconds, no zone suffix.
        let local = when(T, false);
        assert_eq!(local.len(), "2026-03-01 16:00:00".len(), "{local}");
        assert!(!local.contains('.') && !local.contains('T'), "{local}");
        assert_eq!(when_in(u64::MAX, &chrono::Utc), format!("@{}ms", u64::MAX));
    }
}
