//! One trial: its seed and random choices, what it noted on the way, how
//! long recovery took, and the logs of its fleet if it failed.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_tests::XorShift;

/// How a trial that did not fail ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every pass criterion held.
    Passed,
    /// The trial could not run here (not root, no libfaketime); the reason.
    Skipped(String),
}

/// What a scenario is given for one trial.
///
/// Every random choice of the trial (data sizes, the moment of the fault,
/// how long a process stays down) comes from [`Trial::rng`], seeded by
/// [`Trial::seed`], so a failure can be replayed with the same `--seed`
/// (process timing is not under our control; the choices are).
#[derive(Debug)]
pub struct Trial {
    /// The scenario's name.
    pub scenario: &'static str,
    /// Which trial of the scenario this is, from 0.
    pub index: usize,
    /// The trial's own seed (derived from the run's seed, the scenario and
    /// the index).
    pub seed: u64,
    /// Scales every data size of the trial (`--data-scale`).
    pub data_scale: f64,
    /// Part of a `--quick` run (tighter bounds where the scenario says so).
    pub quick: bool,
    rng: XorShift,
    notes: Vec<String>,
    recovery: Option<Duration>,
    missed: Option<String>,
    logs: Arc<Mutex<String>>,
}

impl Trial {
    /// A trial of `scenario` with its own seed.
    pub fn new(scenario: &'static str, index: usize, seed: u64, data_scale: f64) -> Self {
        Self {
            scenario,
            index,
            seed,
            data_scale,
            quick: false,
            rng: XorShift::new(seed),
            notes: Vec::new(),
            recovery: None,
            missed: None,
            logs: Arc::new(Mutex::new(String::new())),
        }
    }

    /// A uniform integer in `lo..hi` (`lo` if the range is empty).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            return lo;
        }
        lo + self.rng.next_u64() % (hi - lo)
    }

    /// A uniform fraction in `lo..hi`.
    pub fn fraction(&mut self, lo: f64, hi: f64) -> f64 {
        // 53 random bits make a double in [0, 1).
        let unit = (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        lo + unit * (hi - lo)
    }

    /// A duration in `lo..hi` milliseconds.
    pub fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(self.range(lo, hi))
    }

    /// A fresh seed for test data.
    pub fn data_seed(&mut self) -> u64 {
        self.rng.next_u64()
    }

    /// `mib` MiB scaled by `--data-scale`, in bytes (at least 1 MiB).
    pub fn mib(&self, mib: u64) -> u64 {
        let scaled = (mib as f64 * self.data_scale).round().max(1.0);
        scaled as u64 * (1 << 20)
    }

    /// A random size in `lo..hi` MiB, scaled like [`Trial::mib`], in bytes.
    pub fn random_mib(&mut self, lo: u64, hi: u64) -> u64 {
        let mib = self.range(lo, hi);
        self.mib(mib)
    }

    /// Records (and prints, to show progress) what happened.
    pub fn note(&mut self, text: impl Into<String>) {
        let text = text.into();
        eprintln!("  [{} #{}] {text}", self.scenario, self.index + 1);
        self.notes.push(text);
    }

    /// What the trial noted so far.
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// Records the recovery time: from the fault to the job's completion.
    pub fn recovered(&mut self, after: Duration) {
        self.note(format!(
            "recovered {:.1} s after the fault",
            after.as_secs_f64()
        ));
        self.recovery = Some(after);
    }

    /// The recovery time, if the trial recorded one (none for a trial whose
    /// fault missed its task: it measured nothing).
    pub fn recovery(&self) -> Option<Duration> {
        self.missed.is_none().then_some(self.recovery).flatten()
    }

    /// Records that the fault missed its task (the task ended before the
    /// fault's moment came): the trial still checks everything, but a pass
    /// says nothing about recovery, so it counts as missed, not passed, and
    /// a run makes another trial in its place.
    pub fn missed(&mut self, why: impl Into<String>) {
        let why = why.into();
        self.note(format!("missed: {why}"));
        self.missed = Some(why);
    }

    /// Why the fault missed its task, if it did.
    pub fn miss(&self) -> Option<&str> {
        self.missed.as_deref()
    }

    /// Where a world leaves its logs when it is dropped (see
    /// [`crate::World`]), for the failure report.
    pub fn log_sink(&self) -> Arc<Mutex<String>> {
        self.logs.clone()
    }

    /// The logs the trial's worlds left.
    pub fn logs(&self) -> String {
        self.logs.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

/// What the report keeps of a trial.
#[derive(Debug, Clone)]
pub struct TrialResult {
    /// The scenario's name.
    pub scenario: &'static str,
    /// Which trial, from 0.
    pub index: usize,
    /// Its seed.
    pub seed: u64,
    /// Passed, skipped, or the failure's reason.
    pub verdict: Verdict,
    /// Fault → job completed, when measured.
    pub recovery: Option<Duration>,
    /// Wall time of the whole trial.
    pub elapsed: Duration,
    /// What the trial noted.
    pub notes: Vec<String>,
    /// The fleet's logs, kept for failures only.
    pub logs: String,
}

/// A trial's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every criterion held.
    Passed,
    /// Could not run here.
    Skipped(String),
    /// Every criterion held, but the fault missed its task (why): not
    /// counted as a pass.
    Missed(String),
    /// A criterion did not hold, or the trial itself broke; why.
    Failed(String),
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Passed => write!(f, "PASS"),
            Verdict::Skipped(why) => write!(f, "SKIP ({why})"),
            Verdict::Missed(why) => write!(f, "MISSED ({why})"),
            Verdict::Failed(why) => write!(f, "FAIL: {why}"),
        }
    }
}

/// SplitMix64: the seed of trial `index` of `scenario` in a run seeded with
/// `run_seed`. Independent of which other scenarios run, so `--scenarios X
/// --seed S` replays the trials of X that a full run with seed S made.
pub fn trial_seed(run_seed: u64, scenario: &str, index: usize) -> u64 {
    // FNV-1a of the name, so each scenario gets its own stream.
    let name = scenario.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let mut z = run_seed
        .wrapping_add(name)
        .wrapping_add((index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trial_seeds_depend_on_scenario_and_index_only() {
        let a = trial_seed(7, "kill-source", 0);
        assert_eq!(a, trial_seed(7, "kill-source", 0));
        assert_ne!(a, trial_seed(7, "kill-source", 1));
        assert_ne!(a, trial_seed(7, "kill-storage", 0));
        assert_ne!(a, trial_seed(8, "kill-source", 0));
    }

    #[test]
    fn random_choices_stay_in_range_and_replay() {
        let mut t = Trial::new("x", 0, 42, 1.0);
        let mut u = Trial::new("x", 0, 42, 1.0);
        for _ in 0..1000 {
            let n = t.range(10, 20);
            assert!((10..20).contains(&n));
            assert_eq!(n, u.range(10, 20));
            let f = t.fraction(0.2, 0.8);
            assert!((0.2..0.8).contains(&f));
            assert_eq!(f, u.fraction(0.2, 0.8));
        }
        assert_eq!(t.range(5, 5), 5);
    }

    #[test]
    fn data_scale_shrinks_sizes_but_never_below_one_mib() {
        let t = Trial::new("x", 0, 1, 0.25);
        assert_eq!(t.mib(100), 25 << 20);
        assert_eq!(t.mib(1), 1 << 20);
    }
}
