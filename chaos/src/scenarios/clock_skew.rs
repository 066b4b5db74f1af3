//! clock-skew: one source agent, `drift`, runs under libfaketime with its
//! clock moved by minutes; `alpha` beside it keeps the true time. Each trial
//! tries four offsets, each restarting drift with its new clock: ahead and
//! behind by 1–4 minutes (inside the 5-minute tolerance) and by 6–15
//! minutes (beyond it), magnitudes chosen by the seed.
//!
//! What the protocol says an agent does with a task (ARCHITECTURE.md,
//! "Invariants"): it runs it when `issued_at ≤ now + 5 min` and
//! `now ≤ expires_at + 5 min` by its own clock, and refuses it otherwise
//! with a `security.task_rejected` event (`not_yet_valid`, `expired`),
//! never running it. The CLI's tasks live 24 hours, so a clock *behind* by
//! more than 5 minutes refuses them (not yet valid), while a clock *ahead*
//! by 10 minutes still runs them; to see `expired`, each offset also gets
//! a forged estimate task (signed with the fleet's key) that lives one
//! minute. For every offset, both tasks' fates must match the rule, and a
//! backup of alpha run at the same time must succeed. The world's checks
//! end the trial. Skipped when libfaketime is not installed.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use flotilla_protocol::TaskKind;
use flotilla_tests::publish_task;

use crate::trial::{Outcome, Trial};
use crate::world::{poll, Source, Spec, World, DATA_TIMEOUT};

const DRIFT: &str = "drift";
const ALPHA: &str = "alpha";
/// The agents' tolerance (`flotilla_protocol::CLOCK_SKEW_MS`).
const SKEW_S: i64 = 5 * 60;
/// Lifetime of the forged task.
const SHORT_TTL_S: i64 = 60;
/// How long a refusal or an estimate may take to show up.
const EVENT_TIMEOUT: Duration = Duration::from_secs(30);
/// Where Debian's `faketime` package puts the library (multi-threaded).
const LIB_CANDIDATES: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1",
    "/usr/lib/aarch64-linux-gnu/faketime/libfaketimeMT.so.1",
    "/usr/lib/faketime/libfaketimeMT.so.1",
    "/usr/local/lib/faketime/libfaketimeMT.so.1",
];

/// libfaketime, from `$CHAOS_LIBFAKETIME` or the usual places.
fn libfaketime() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("CHAOS_LIBFAKETIME") {
        return Some(PathBuf::from(path)).filter(|p| p.is_file());
    }
    LIB_CANDIDATES
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
}

/// Whether a task issued at 0 that lives `ttl_s` runs on an agent whose
/// clock is `offset_s` ahead (negative: behind).
fn runs(offset_s: i64, ttl_s: i64) -> bool {
    offset_s >= -SKEW_S && offset_s <= ttl_s + SKEW_S
}

pub(super) fn run(t: &mut Trial) -> Result<Outcome> {
    let Some(lib) = libfaketime() else {
        return Ok(Outcome::Skipped(
            "libfaketime is not installed (apt-get install faketime)".into(),
        ));
    };
    // The offset is read from this file when drift starts.
    let clock_dir = tempfile::Builder::new()
        .prefix("flotilla-chaos-clock-")
        .tempdir()
        .context("cannot create a directory for the fake clock")?;
    let clock = clock_dir.path().join("faketime");
    std::fs::write(&clock, "+0\n")?;
    let drift_bytes = t.random_mib(16, 41);
    let alpha_bytes = t.random_mib(16, 41);
    let spec = Spec {
        sources: vec![
            Source::new(ALPHA, alpha_bytes),
            Source::new(DRIFT, drift_bytes)
                .env("LD_PRELOAD", &lib.display().to_string())
                .env("FAKETIME_TIMESTAMP_FILE", &clock.display().to_string()),
        ],
        ..Spec::default()
    };
    let mut w = World::start(t, &spec)?;
    let inside = [t.range(60, 241) as i64, -(t.range(60, 241) as i64)];
    let beyond = [t.range(360, 901) as i64, -(t.range(360, 901) as i64)];
    for offset in [inside[0], inside[1], beyond[0], beyond[1]] {
        std::fs::write(&clock, format!("{offset:+}\n"))?;
        let agent = w.agent(DRIFT)?;
        agent.sigterm()?;
        agent.wait_exit(Duration::from_secs(20))?;
        w.restart_agent(DRIFT)?;
        one_offset(t, &w, offset).with_context(|| format!("drift's clock {offset:+} s off"))?;
    }
    w.verify(t)?;
    Ok(Outcome::Passed)
}

/// One offset: drift's backup (a CLI task) and a forged one-minute task,
/// beside a backup of alpha.
fn one_offset(t: &mut Trial, w: &World, offset: i64) -> Result<()> {
    let rejected_before = rejections(w)?;
    let started_before = w.started_tasks(DRIFT, "backup")?;
    let alpha = w.spawn_backup(ALPHA)?;

    let out = w.backup(DRIFT, DATA_TIMEOUT)?;
    let expect_run = runs(offset, 24 * 3600);
    if expect_run {
        if !out.success() {
            bail!("the backup of drift should run (inside the window) but failed:\n{out}");
        }
    } else {
        if out.success() {
            bail!("the backup of drift ran although its clock is {offset:+} s off:\n{out}");
        }
        let fresh = new_rejections(w, &rejected_before, EVENT_TIMEOUT)?;
        let reasons: Vec<&str> = fresh
            .iter()
            .filter_map(|e| e["detail"]["reason"].as_str())
            .collect();
        if !reasons.contains(&"not_yet_valid") {
            bail!("no security.task_rejected (not_yet_valid) for drift's backup; got {reasons:?}\n{out}");
        }
        let started = w.started_tasks(DRIFT, "backup")?;
        if started != started_before {
            bail!("a refused backup task started on drift anyway: {started:?}");
        }
    }
    t.note(format!(
        "clock {offset:+} s: the CLI's backup {} ({})",
        if expect_run { "ran" } else { "was refused" },
        if out.success() {
            "exit 0".to_owned()
        } else {
            super::first_error_line(&out)
        }
    ));

    let forged = forge_short_task(w)?;
    let expect_forged = runs(offset, SHORT_TTL_S);
    let fate = poll(
        "the forged task to run or be refused",
        EVENT_TIMEOUT,
        Duration::from_millis(250),
        || {
            if let Some(ev) = w
                .events("security.task_rejected", Some(DRIFT))?
                .into_iter()
                .find(|e| e["detail"]["task_id"] == forged.as_str())
            {
                return Ok(Some(format!(
                    "refused ({})",
                    ev["detail"]["reason"].as_str().unwrap_or("?")
                )));
            }
            Ok(w.finished_events(DRIFT, &forged)?
                .into_iter()
                .next()
                .map(|ev| format!("ran ({})", ev["detail"]["outcome"].as_str().unwrap_or("?"))))
        },
    )?;
    let expected = if expect_forged {
        "ran (succeeded)"
    } else if offset < -SKEW_S {
        "refused (not_yet_valid)"
    } else {
        "refused (expired)"
    };
    if fate != expected {
        bail!(
            "a task living {SHORT_TTL_S} s on a clock {offset:+} s off should have {expected}, but {fate}"
        );
    }
    t.note(format!("clock {offset:+} s: a {SHORT_TTL_S} s task {fate}"));

    let alpha_out = alpha.wait(DATA_TIMEOUT)?;
    if !alpha_out.success() {
        bail!("alpha's backup beside the skewed drift failed:\n{alpha_out}");
    }
    Ok(())
}

/// Ids of the security events of drift so far.
fn rejections(w: &World) -> Result<BTreeSet<String>> {
    Ok(w.events("security.task_rejected", Some(DRIFT))?
        .iter()
        .filter_map(|e| e["id"].as_str().map(str::to_owned))
        .collect())
}

/// Waits for security events of drift not in `before`.
fn new_rejections(
    w: &World,
    before: &BTreeSet<String>,
    timeout: Duration,
) -> Result<Vec<serde_json::Value>> {
    poll(
        "a security.task_rejected event from drift",
        timeout,
        Duration::from_millis(250),
        || {
            let fresh: Vec<serde_json::Value> = w
                .events("security.task_rejected", Some(DRIFT))?
                .into_iter()
                .filter(|e| e["id"].as_str().is_some_and(|id| !before.contains(id)))
                .collect();
            Ok((!fresh.is_empty()).then_some(fresh))
        },
    )
}

/// Publishes an estimate task for drift, signed with the fleet's key, that
/// expires one minute after it was issued; returns its id.
fn forge_short_task(w: &World) -> Result<String> {
    let root = w.root(DRIFT)?;
    let mut body = w.fleet.task(
        DRIFT,
        TaskKind::Estimate {
            paths: vec![root.display().to_string()],
        },
    )?;
    body.expires_at = body.issued_at + SHORT_TTL_S as u64 * 1000;
    let payload = w.fleet.sign(&body)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start a runtime to publish a task")?;
    runtime.block_on(async {
        let client = w.fleet.nats_client().await?;
        publish_task(&client, DRIFT, payload).await
    })?;
    Ok(body.id.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_is_five_minutes_either_side() {
        let day = 24 * 3600;
        assert!(runs(0, day));
        assert!(runs(240, day));
        assert!(runs(-240, day));
        assert!(runs(600, day), "a 24 h task is not expired 10 min later");
        assert!(!runs(-600, day), "issued 10 min in the agent's future");
        assert!(runs(300 + SHORT_TTL_S, SHORT_TTL_S));
        assert!(!runs(301 + SHORT_TTL_S, SHORT_TTL_S));
    }
}
