//! Small formatting helpers shared by the subcommands.

use flotilla_protocol::UnixMillis;

/// `1.5 GiB`-style sizes.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

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

/// The first 8 characters of an id, for tables. Ids come from peers, so this
/// never slices bytes (a short or non-ASCII id must not panic).
pub fn short(id: &str) -> String {
    id.chars().take(8).collect()
}

/// RFC 3339 time of a unix-ms timestamp.
pub fn time(ms: UnixMillis) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_millis(t).to_string()
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
}
