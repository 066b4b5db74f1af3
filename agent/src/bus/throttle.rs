//! Coalescing of repeated security events, so that a flood (500 refused
//! handshakes, a storm of forged tasks) is a few events, not 500: the
//! history of the event stream is what an operator audits, and a flood must
//! not push it out.
//!
//! Pure: the caller gives the time. The first event of a key (a source and a
//! reason) in a window goes out at once; the rest of that window are
//! counted, and when the window has passed [`Throttle::due`] hands back one
//! summary per key with how many were held back and the last of them.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// The key every event falls under once [`Throttle`] tracks as many keys as
/// it may: a flood from many sources is coalesced as one.
pub const OVERFLOW_KEY: &str = "(many sources)";

/// What [`Throttle::admit`] decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit<T> {
    /// Publish it; `closed` is the summary of the key's previous window, if
    /// that window held some back and has not been handed out yet.
    Publish { closed: Option<Coalesced<T>> },
    /// Held back: counted in the key's window.
    HeldBack,
}

/// Events of one key held back during one window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Coalesced<T> {
    /// The key (source and reason).
    pub key: String,
    /// How many were held back.
    pub count: u64,
    /// The last one held back.
    pub last: T,
    /// How long the window was open.
    pub window: Duration,
}

#[derive(Debug)]
struct Slot<T> {
    opened: Instant,
    held: u64,
    last: Option<T>,
}

/// See the module.
#[derive(Debug)]
pub struct Throttle<T> {
    window: Duration,
    max_keys: usize,
    slots: HashMap<String, Slot<T>>,
}

impl<T> Throttle<T> {
    /// One event per key per `window`, at most `max_keys` keys tracked.
    pub fn new(window: Duration, max_keys: usize) -> Self {
        Self {
            window,
            max_keys: max_keys.max(1),
            slots: HashMap::new(),
        }
    }

    /// Whether the event `item` of `key` at `now` goes out.
    pub fn admit(&mut self, key: &str, now: Instant, item: T) -> Admit<T> {
        let key = if self.slots.contains_key(key) || self.slots.len() < self.max_keys {
            key
        } else {
            OVERFLOW_KEY
        };
        let window = self.window;
        match self.slots.get_mut(key) {
            Some(slot) if now.saturating_duration_since(slot.opened) < window => {
                slot.held += 1;
                slot.last = Some(item);
                Admit::HeldBack
            }
            Some(slot) => {
                let closed = summary(key, slot, now);
                *slot = Slot {
                    opened: now,
                    held: 0,
                    last: None,
                };
                Admit::Publish { closed }
            }
            None => {
                self.slots.insert(
                    key.to_owned(),
                    Slot {
                        opened: now,
                        held: 0,
                        last: None,
                    },
                );
                Admit::Publish { closed: None }
            }
        }
    }

    /// The summaries of every window that has passed by `now` and held
    /// something back; keys whose window passed are forgotten.
    pub fn due(&mut self, now: Instant) -> Vec<Coalesced<T>> {
        let window = self.window;
        let mut out = Vec::new();
        self.slots.retain(|key, slot| {
            if now.saturating_duration_since(slot.opened) < window {
                return true;
            }
            if let Some(s) = summary(key, slot, now) {
                out.push(s);
            }
            false
        });
        out.sort_by(|a, b| a.key.cmp(&b.key));
        out
    }
}

fn summary<T>(key: &str, slot: &mut Slot<T>, now: Instant) -> Option<Coalesced<T>> {
    let last = slot.last.take()?;
    Some(Coalesced {
        key: key.to_owned(),
        count: slot.held,
        last,
        window: now.saturating_duration_since(slot.opened),
    })
}

/// A token bucket: `rate` requests a second on average, at most `burst` at
/// once. Pure: the caller gives the time.
#[derive(Debug, Clone)]
pub struct RateLimit {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Option<Instant>,
}

impl RateLimit {
    /// `rate` a second, `burst` at once (both at least 1).
    pub fn new(rate: f64, burst: f64) -> Self {
        let burst = burst.max(1.0);
        Self {
            rate: rate.max(1.0),
            burst,
            tokens: burst,
            last: None,
        }
    }

    /// Whether one more request at `now` is within the limit (and takes a
    /// token if so).
    pub fn allow(&mut self, now: Instant) -> bool {
        if let Some(last) = self.last {
            let refill = now.saturating_duration_since(last).as_secs_f64() * self.rate;
            self.tokens = (self.tokens + refill).min(self.burst);
        }
        self.last = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Counts what a flood made us drop and says so at most once per `every`:
/// the first drop at once, then the count of each period that had drops,
/// when the period is over (on the next drop, or on a timer tick). Pure:
/// the caller gives the time.
#[derive(Debug, Clone)]
pub struct DropReport {
    every: Duration,
    /// Drops not yet said, and since when they are counted.
    pending: u64,
    since: Option<Instant>,
}

impl DropReport {
    /// Says at most once per `every`.
    pub fn new(every: Duration) -> Self {
        Self {
            every,
            pending: 0,
            since: None,
        }
    }

    /// One more drop at `now`; the number to say now, if it is time.
    pub fn on_drop(&mut self, now: Instant) -> Option<u64> {
        self.pending += 1;
        match self.since {
            // The first of a storm is said at once.
            None => self.say(now),
            Some(since) if now.saturating_duration_since(since) >= self.every => self.say(now),
            Some(_) => None,
        }
    }

    /// A tick at `now`: the drops of a period that is over, if any.
    pub fn on_tick(&mut self, now: Instant) -> Option<u64> {
        let since = self.since?;
        if now.saturating_duration_since(since) < self.every {
            return None;
        }
        if self.pending == 0 {
            // A quiet period ends the storm: the next drop is said at once.
            self.since = None;
            return None;
        }
        self.say(now)
    }

    fn say(&mut self, now: Instant) -> Option<u64> {
        let n = std::mem::take(&mut self.pending);
        self.since = Some(now);
        Some(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_storm_of_drops_is_said_once_per_period_and_its_tail_on_the_tick() {
        let t0 = Instant::now();
        let mut r = DropReport::new(Duration::from_secs(10));
        assert_eq!(r.on_drop(t0), Some(1), "the first at once");
        // 9 s of drops, every 10 ms: held.
        for i in 1..900u64 {
            assert_eq!(r.on_drop(t0 + Duration::from_millis(i * 10)), None);
        }
        assert_eq!(r.on_tick(t0 + Duration::from_secs(5)), None);
        // The storm ended at 9 s; the tick after the period says its tail.
        assert_eq!(r.on_tick(t0 + Duration::from_secs(10)), Some(899));
        // A quiet period ends it, and the next drop is said at once.
        assert_eq!(r.on_tick(t0 + Duration::from_secs(20)), None);
        assert_eq!(r.on_drop(t0 + Duration::from_secs(21)), Some(1));
    }

    #[test]
    fn the_rate_limit_lets_a_burst_through_then_the_rate() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(50.0, 100.0);
        let burst = (0..1000).filter(|_| r.allow(t0)).count();
        assert_eq!(burst, 100, "the burst, and nothing more at once");
        // A second later: 50 more.
        let next = (0..1000)
            .filter(|_| r.allow(t0 + Duration::from_secs(1)))
            .count();
        assert_eq!(next, 50);
        // A long pause refills to the burst, not beyond.
        let later = (0..1000)
            .filter(|_| r.allow(t0 + Duration::from_secs(60)))
            .count();
        assert_eq!(later, 100);
    }

    const W: Duration = Duration::from_secs(10);

    #[test]
    fn a_flood_is_one_event_and_one_summary_per_window() {
        let t0 = Instant::now();
        let mut t = Throttle::new(W, 100);
        assert_eq!(
            t.admit("10.0.0.9 unknown_peer", t0, 0),
            Admit::Publish { closed: None }
        );
        for i in 1..500u64 {
            let at = t0 + Duration::from_millis(i * 10);
            assert_eq!(t.admit("10.0.0.9 unknown_peer", at, i), Admit::HeldBack);
        }
        // Another source is its own key.
        assert_eq!(
            t.admit("10.0.0.7 unknown_peer", t0, 0),
            Admit::Publish { closed: None }
        );
        assert!(
            t.due(t0 + Duration::from_secs(9)).is_empty(),
            "window still open"
        );
        let due = t.due(t0 + W);
        assert_eq!(due.len(), 1, "{due:?}");
        assert_eq!(
            (due[0].key.as_str(), due[0].count, due[0].last),
            ("10.0.0.9 unknown_peer", 499, 499)
        );
        // Forgotten: the next one goes out at once, and nothing is due twice.
        assert!(t.due(t0 + W * 2).is_empty());
        assert_eq!(
            t.admit("10.0.0.9 unknown_peer", t0 + W * 3, 1),
            Admit::Publish { closed: None }
        );
    }

    #[test]
    fn a_window_not_yet_summarised_is_handed_out_by_the_next_event() {
        let t0 = Instant::now();
        let mut t = Throttle::new(W, 100);
        t.admit("k", t0, "first");
        t.admit("k", t0 + Duration::from_secs(1), "second");
        t.admit("k", t0 + Duration::from_secs(2), "third");
        match t.admit("k", t0 + W + Duration::from_secs(1), "fourth") {
            Admit::Publish { closed: Some(c) } => {
                assert_eq!((c.count, c.last), (2, "third"));
                assert_eq!(c.window, W + Duration::from_secs(1));
            }
            other => panic!("{other:?}"),
        }
        assert!(t.due(t0 + W + Duration::from_secs(2)).is_empty());
    }

    #[test]
    fn past_the_key_limit_every_new_source_shares_one_window() {
        let t0 = Instant::now();
        let mut t = Throttle::new(W, 2);
        assert!(matches!(t.admit("a", t0, 1), Admit::Publish { .. }));
        assert!(matches!(t.admit("b", t0, 2), Admit::Publish { .. }));
        // Full: "c" becomes the overflow key, which is new: out once...
        assert!(matches!(t.admit("c", t0, 3), Admit::Publish { .. }));
        // ...and every later new source is held back with it.
        for (i, k) in ["d", "e", "f"].iter().enumerate() {
            assert_eq!(t.admit(k, t0, 4 + i), Admit::HeldBack);
        }
        let due = t.due(t0 + W);
        assert_eq!(due.len(), 1);
        assert_eq!((due[0].key.as_str(), due[0].count), (OVERFLOW_KEY, 3));
    }
}
