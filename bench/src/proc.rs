//! Readings of another process from `/proc`: CPU time and memory.

use std::time::Instant;

use anyhow::{Context, Result};

/// Clock ticks per second when `sysconf` cannot say (the Linux default).
const DEFAULT_CLK_TCK: u64 = 100;

/// One reading of a process.
#[derive(Debug, Clone, Copy)]
pub struct ProcSample {
    /// When it was taken.
    pub at: Instant,
    /// User plus system CPU time so far, in clock ticks.
    pub cpu_ticks: u64,
    /// Resident memory now (`VmRSS`).
    pub rss_bytes: Option<u64>,
    /// Peak resident memory so far (`VmHWM`).
    pub hwm_bytes: Option<u64>,
}

/// Reads `pid`'s CPU time and memory; fails when the process is gone.
pub fn sample(pid: u32) -> Result<ProcSample> {
    let stat_path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&stat_path)
        .with_context(|| format!("cannot read {stat_path}: is process {pid} still running?"))?;
    let cpu_ticks = parse_stat_ticks(&stat)
        .with_context(|| format!("{stat_path} has no readable utime and stime fields"))?;
    let status = read_status(pid).unwrap_or_default();
    Ok(ProcSample {
        at: Instant::now(),
        cpu_ticks,
        rss_bytes: parse_status_bytes(&status, "VmRSS"),
        hwm_bytes: parse_status_bytes(&status, "VmHWM"),
    })
}

/// `pid`'s peak resident memory so far, if it is still running.
pub fn peak_rss(pid: u32) -> Option<u64> {
    parse_status_bytes(&read_status(pid)?, "VmHWM")
}

/// Resets `pid`'s peak resident memory (VmHWM) to its current RSS, so a later
/// [`peak_rss`] covers only what came after; false if the kernel refused.
pub fn reset_peak_rss(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// Clock ticks per second, the unit of the CPU times in `/proc/PID/stat`.
pub fn clock_ticks_per_sec() -> u64 {
    match nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK) {
        Ok(Some(ticks)) if ticks > 0 => ticks as u64,
        _ => DEFAULT_CLK_TCK,
    }
}

fn read_status(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/status")).ok()
}

/// `utime + stime` from the text of `/proc/PID/stat`.
///
/// The command name (field 2) is in parentheses and may itself hold spaces
/// and parentheses, so fields are counted from the last `)`: what follows is
/// field 3 (state), which puts utime (field 14) at index 11 and stime at 12.
fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// A `Name:   1234 kB` line of `/proc/PID/status`, in bytes.
fn parse_status_bytes(status: &str, field: &str) -> Option<u64> {
    status.lines().find_map(|line| {
        let value = line.strip_prefix(field)?.strip_prefix(':')?;
        let kib: u64 = value.split_whitespace().next()?.parse().ok()?;
        Some(kib * 1024)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_counted_from_the_last_parenthesis() {
        let stat = "4242 (flo (tilla) x) S 1 4242 4242 0 -1 4194560 900 0 0 0 250 125 0 0 20 0 9 0 100 0 0";
        assert_eq!(parse_stat_ticks(stat), Some(375));
        assert_eq!(parse_stat_ticks("4242 (short) S 1"), None);
    }

    #[test]
    fn status_lines_are_read_in_bytes() {
        let status = "Name:\tflotilla\nVmHWM:\t   20480 kB\nVmRSS:\t   10240 kB\n";
        assert_eq!(parse_status_bytes(status, "VmRSS"), Some(10240 * 1024));
        assert_eq!(parse_status_bytes(status, "VmHWM"), Some(20480 * 1024));
        assert_eq!(parse_status_bytes(status, "VmSwap"), None);
    }
}
