//! Running the trials: each in its own fresh world, one after another,
//! with a panic caught and counted as a failure, and the failures' logs
//! printed.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use crate::report::one_line;
use crate::scenarios::Scenario;
use crate::trial::{trial_seed, Outcome, Trial, TrialResult, Verdict};

/// What to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// The scenarios, in order.
    pub scenarios: Vec<&'static Scenario>,
    /// Trials whose fault landed, per scenario (a trial whose fault missed
    /// its task is replaced by another, up to as many again); `None`: each
    /// scenario's `--quick` count.
    pub trials: Option<usize>,
    /// Run only this trial (from 0) of each scenario, to replay one.
    pub only: Option<usize>,
    /// The run's seed; each trial derives its own from it.
    pub seed: u64,
    /// Scales every data size.
    pub data_scale: f64,
}

/// Runs every trial and returns the results and the wall time.
pub fn run(config: &Config) -> (Vec<TrialResult>, Duration) {
    let started = Instant::now();
    let mut results = Vec::new();
    for scenario in &config.scenarios {
        let count = config.trials.unwrap_or(scenario.quick_trials);
        if let Some(index) = config.only {
            results.push(run_trial(scenario, index, config));
            continue;
        }
        let mut landed = 0;
        let mut index = 0;
        while landed < count && index < 2 * count {
            let result = run_trial(scenario, index, config);
            if !matches!(result.verdict, Verdict::Missed(_)) {
                landed += 1;
            }
            results.push(result);
            index += 1;
        }
        // Faults that keep missing test nothing: that is a failure of the
        // run (a shim that stopped intercepting, a rule that matches
        // nothing), not a quiet pass.
        if landed < count {
            let why = format!(
                "the fault landed in {landed} of {index} trials, fewer than the {count} asked for"
            );
            eprintln!("--- FAIL {}: {why}", scenario.name);
            results.push(TrialResult {
                scenario: scenario.name,
                index,
                seed: trial_seed(config.seed, scenario.name, index),
                verdict: Verdict::Failed(why),
                recovery: None,
                elapsed: Duration::ZERO,
                notes: Vec::new(),
                logs: String::new(),
            });
        }
    }
    (results, started.elapsed())
}

fn run_trial(scenario: &'static Scenario, index: usize, config: &Config) -> TrialResult {
    let seed = trial_seed(config.seed, scenario.name, index);
    eprintln!(
        "=== {} #{} (trial seed {seed}; replay: --scenarios {} --only {} --seed {}) ===",
        scenario.name,
        index + 1,
        scenario.name,
        index,
        config.seed
    );
    let mut trial = Trial::new(scenario.name, index, seed, config.data_scale);
    trial.quick = config.trials.is_none();
    let started = Instant::now();
    let outcome = catch_unwind(AssertUnwindSafe(|| (scenario.run)(&mut trial)));
    let verdict = match outcome {
        Ok(Ok(Outcome::Passed)) => match trial.miss() {
            Some(why) => Verdict::Missed(why.to_owned()),
            None => Verdict::Passed,
        },
        Ok(Ok(Outcome::Skipped(why))) => Verdict::Skipped(why),
        Ok(Err(e)) => Verdict::Failed(format!("{e:#}")),
        Err(panic) => Verdict::Failed(format!("the trial panicked: {}", panic_text(&panic))),
    };
    let elapsed = started.elapsed();
    let recovery = trial.recovery();
    eprintln!(
        "--- {} {} #{} in {:.0} s{}",
        match &verdict {
            Verdict::Passed => "PASS",
            Verdict::Skipped(_) => "SKIP",
            Verdict::Missed(_) => "MISS",
            Verdict::Failed(_) => "FAIL",
        },
        scenario.name,
        index + 1,
        elapsed.as_secs_f64(),
        recovery.map_or_else(String::new, |r| format!(
            ", recovery {:.1} s",
            r.as_secs_f64()
        ))
    );
    let logs = match &verdict {
        Verdict::Failed(why) => {
            eprintln!("--- why: {why}");
            eprintln!("--- what the trial saw:");
            for note in trial.notes() {
                eprintln!("      {note}");
            }
            let logs = trial.logs();
            eprintln!("--- logs of the trial's fleet:\n{logs}");
            eprintln!(
                "--- end of {} #{}: {}",
                scenario.name,
                index + 1,
                one_line(why)
            );
            logs
        }
        Verdict::Skipped(why) => {
            eprintln!("--- skipped: {why}");
            String::new()
        }
        Verdict::Passed | Verdict::Missed(_) => String::new(),
    };
    TrialResult {
        scenario: scenario.name,
        index,
        seed,
        verdict,
        recovery,
        elapsed,
        notes: trial.notes().to_vec(),
        logs,
    }
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_owned()
    }
}
