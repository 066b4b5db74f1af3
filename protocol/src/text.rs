//! Text for people that both binaries print the same way (`flotilla` and
//! `flotilla-agent recover`). Pure.

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

/// Reads a size as people write it: `512`, `64K`, `1.5M`, `2GiB`, `10MB`.
/// `K`, `M`, `G`, `T` and `KiB` … `TiB` are powers of 1024; `KB` … `TB`
/// powers of 1000; no unit (or `B`) is bytes. A rate (`10M/s`) is read the
/// same with its `/s` dropped. Case does not matter.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let text = s.trim();
    let body = text
        .strip_suffix("/s")
        .or_else(|| text.strip_suffix("/S"))
        .unwrap_or(text)
        .trim();
    let split = body
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(body.len());
    let (number, unit) = body.split_at(split);
    let unit = unit.trim().to_ascii_lowercase();
    let scale: u64 = match unit.as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => {
            return Err(format!(
                "{s:?}: unknown unit {unit:?} (use B, K/KiB, M/MiB, G/GiB, T/TiB, or KB/MB/GB/TB)"
            ))
        }
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{s:?}: expected a number and a unit, like 10M or 1.5GiB"))?;
    let bytes = value * scale as f64;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(format!("{s:?} is too large"));
    }
    Ok(bytes.round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_rates_are_read_as_people_write_them() {
        assert_eq!(parse_bytes("512"), Ok(512));
        assert_eq!(parse_bytes("64K"), Ok(64 << 10));
        assert_eq!(parse_bytes("1.5M"), Ok(3 << 19));
        assert_eq!(parse_bytes("2GiB"), Ok(2 << 30));
        assert_eq!(parse_bytes("10MB"), Ok(10_000_000));
        assert_eq!(parse_bytes(" 4 mib/s "), Ok(4 << 20));
        assert_eq!(parse_bytes("0"), Ok(0));
        for bad in ["", "M", "ten", "5 parsecs", "1e400", "-1M", "99999999999T"] {
            assert!(parse_bytes(bad).is_err(), "{bad:?} accepted");
        }
        let why = parse_bytes("5 parsecs").expect_err("unknown unit");
        assert!(why.contains("unknown unit"), "{why}");
    }

    #[test]
    fn sizes_read_in_binary_units() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 << 30), "3.0 GiB");
    }
}
