//! kill-serve: `flotilla serve` runs a plan backing the source up every
//! minute; while the backup it dispatched runs, the daemon is killed with
//! SIGKILL and started again (same config, same state directory) after a
//! random pause.
//!
//! Passes when the job the dead daemon dispatched completes (the agent owns
//! the task, not the daemon), the new daemon takes the lease again (its log
//! says "acquired the coordinator lease") and stops cleanly on SIGTERM, and
//! the world's checks hold: no snapshot lost.
//!
//! The plan runs at minute boundaries, so a trial waits up to a minute for
//! the first dispatch.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{bail, Result};

use super::{task_end, Ended, Fault};
use crate::trial::{Outcome, Trial};
use crate::world::{poll, since_fault, Moment, Source, Spec, World, DATA_TIMEOUT};

const HOST: &str = "alpha";
/// Up to a minute until the plan falls due, then the dispatch.
const DISPATCH_TIMEOUT: Duration = Duration::from_secs(75);
/// The dead daemon's lease (15 s) must lapse before the new one leads.
const LEAD_TIMEOUT: Duration = Duration::from_secs(60);
/// What the daemon logs when it takes the lease.
const ACQUIRED: &str = "acquired the coordinator lease";

/// Ticks every second, retries quickly, one plan every minute.
const CONFIG: &str = r#"
[serve]
tick = "1s"
retries = 3
retry_backoff = "2s"

[[plan]]
name = "chaos"
hosts = ["alpha"]
to = "nas"
schedule = "* * * * *"
"#;

pub(super) fn run(t: &mut Trial) -> Result<Outcome> {
    let bytes = t.random_mib(100, 201);
    let spec = Spec {
        sources: vec![Source::new(HOST, bytes)],
        ..Spec::default()
    };
    let mut w = World::start(t, &spec)?;
    w.start_serve(CONFIG)?;
    t.note("flotilla serve started; waiting for the plan's minute");
    let task = w.wait_new_task(HOST, "backup", &BTreeSet::new(), DISPATCH_TIMEOUT)?;
    t.note(format!("the daemon dispatched backup task {task}"));

    let moment = Moment::Stored((bytes as f64 * t.fraction(0.1, 0.9)) as u64);
    let snaps = w.snapshot_files();
    let landed = w.wait_moment(moment, None, DATA_TIMEOUT, || w.snapshot_files() == snaps)?;
    let acquired_before = w.serve()?.log().matches(ACQUIRED).count();
    w.serve()?.kill9()?;
    let fault = Fault::now();
    t.note(if landed {
        format!("kill -9 flotilla serve at {moment:?}")
    } else {
        "kill -9 flotilla serve: the backup had committed already".to_owned()
    });
    if !landed {
        t.missed("the backup committed before the kill");
    }
    let down = t.millis(500, 5000);
    std::thread::sleep(down);
    w.restart_serve()?;
    t.note(format!(
        "flotilla serve started again after {} ms",
        down.as_millis()
    ));

    match task_end(&w, HOST, &task, &fault)? {
        Ended::Succeeded(ev, _) => {
            t.note("the dispatched job completed without its daemon");
            t.recovered(since_fault(fault.ms, &ev));
        }
        Ended::Failed(error, _) => {
            bail!("the backup failed because its daemon was killed: {error}")
        }
    }
    poll(
        "the restarted daemon to take the lease",
        LEAD_TIMEOUT,
        Duration::from_millis(250),
        || {
            let serve = w.serve()?;
            if !serve.is_running() {
                bail!("the restarted flotilla serve exited:\n{}", serve.log());
            }
            Ok((serve.log().matches(ACQUIRED).count() > acquired_before).then_some(()))
        },
    )?;
    t.note("the restarted daemon leads again");

    // Nothing new starts while the repository is verified.
    let serve = w.serve()?;
    serve.sigterm()?;
    serve.wait_exit(Duration::from_secs(30))?;
    w.verify(t)?;
    Ok(Outcome::Passed)
}
