//! A smooth pace for bytes sent over a slow link (`--limit-upload`): each
//! send may start only when the sends before it, at the limit, are done.
//! No credit is saved while idle, so nothing goes out in a burst after a
//! pause; the longest run at line rate is one blob.
//!
//! Pure: the caller gives the time (any monotonic clock, as an offset from
//! its own start) and sleeps for what [`Pace::wait`] answers.

use std::time::Duration;

/// See the module.
#[derive(Debug, Clone)]
pub struct Pace {
    bytes_per_sec: u64,
    /// When the link is free again at the limit (the caller's clock).
    free_at: Duration,
}

impl Pace {
    /// A pace of `bytes_per_sec`; `None` for 0 (no limit).
    pub fn new(bytes_per_sec: u64) -> Option<Self> {
        (bytes_per_sec > 0).then_some(Self {
            bytes_per_sec,
            free_at: Duration::ZERO,
        })
    }

    /// How long to wait at `now` before sending `bytes`; the send is then
    /// counted as done at the limit.
    pub fn wait(&mut self, now: Duration, bytes: u64) -> Duration {
        let start = self.free_at.max(now);
        let nanos = u128::from(bytes) * 1_000_000_000 / u128::from(self.bytes_per_sec);
        let cost = Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX));
        self.free_at = start.saturating_add(cost);
        start - now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn no_limit_is_no_pace() {
        assert!(Pace::new(0).is_none());
    }

    #[test]
    fn sends_are_spread_at_the_limit() {
        let mut pace = Pace::new(MIB).expect("a limit");
        let mut now = Duration::ZERO;
        // Ten 256 KiB sends at 1 MiB/s: the first at once, each next a
        // quarter second after the one before, 2.25 s for the last start.
        for i in 0..10u32 {
            let wait = pace.wait(now, MIB / 4);
            assert_eq!(
                wait,
                if i == 0 {
                    Duration::ZERO
                } else {
                    Duration::from_millis(250)
                }
            );
            now += wait;
        }
        assert_eq!(now, Duration::from_millis(2250));
    }

    #[test]
    fn an_idle_link_saves_no_credit_for_a_burst() {
        let mut pace = Pace::new(MIB).expect("a limit");
        assert_eq!(pace.wait(Duration::ZERO, MIB), Duration::ZERO);
        // Ten idle seconds later: the next send goes at once, but the one
        // after it still waits its full second.
        let later = Duration::from_secs(11);
        assert_eq!(pace.wait(later, MIB), Duration::ZERO);
        assert_eq!(pace.wait(later, MIB), Duration::from_secs(1));
    }

    #[test]
    fn a_huge_send_saturates_instead_of_overflowing() {
        let mut pace = Pace::new(1).expect("a limit");
        pace.wait(Duration::ZERO, u64::MAX);
        assert!(pace.wait(Duration::ZERO, 1) > Duration::from_secs(1 << 30));
    }
}
