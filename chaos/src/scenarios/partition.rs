//! partition-short and partition-long: the source runs in its own network
//! namespace, and at a random moment of its backup nftables drops every
//! UDP datagram between it and the storage agent's QUIC port, both ways
//! (the bus, on TCP, stays up). The partition is lifted after a random
//! time below QUIC's 20 s idle timeout (short: 2–12 s) or above it (long:
//! 25–40 s).
//!
//! Passes when, after a short partition, the backup rides it out and
//! succeeds without a retry (QUIC retransmits; nothing should notice);
//! after a long one, the backup succeeds or fails with a clear, retryable
//! message and one retry succeeds; the `--wait` command reports the outcome
//! or fails clearly; and the world's checks hold.

use std::collections::BTreeSet;
use std::ops::Range;

use anyhow::{bail, Result};

use super::{complete, note_cli_end, task_end, Ended, Fault};
use crate::net;
use crate::trial::{Outcome, Trial};
use crate::world::{Moment, Source, Spec, World, DATA_TIMEOUT, STARTUP_TIMEOUT, WAIT_CLI_TIMEOUT};

const HOST: &str = "alpha";
/// Shorter than QUIC's idle timeout (20 s), in milliseconds.
const SHORT_MS: Range<u64> = 2_000..12_000;
/// Longer than it.
const LONG_MS: Range<u64> = 25_000..40_000;

pub(super) fn short(t: &mut Trial) -> Result<Outcome> {
    trial(t, SHORT_MS, false)
}

pub(super) fn long(t: &mut Trial) -> Result<Outcome> {
    trial(t, LONG_MS, true)
}

fn trial(t: &mut Trial, hold_ms: Range<u64>, may_fail: bool) -> Result<Outcome> {
    if let Some(why) = net::unavailable() {
        return Ok(Outcome::Skipped(why));
    }
    let bytes = t.random_mib(100, 201);
    let spec = Spec {
        sources: vec![Source::new(HOST, bytes)],
        netns: true,
        ..Spec::default()
    };
    let w = World::start(t, &spec)?;
    let port = w.nas_quic_addr()?.port();
    let mut proc = w.spawn_backup(HOST)?;
    let moment = Moment::Stored((bytes as f64 * t.fraction(0.1, 0.9)) as u64);
    let landed = w.wait_moment(moment, None, DATA_TIMEOUT, || proc.is_running())?;
    w.net(HOST)?.partition_udp(port)?;
    let fault = Fault::now();
    let hold = t.millis(hold_ms.start, hold_ms.end);
    t.note(format!(
        "partitioned {HOST} from nas's QUIC port {port} at {moment:?} for {:.1} s",
        hold.as_secs_f64()
    ));
    if !landed {
        t.missed(format!("the backup ended before {moment:?}"));
    }
    std::thread::sleep(hold);
    let dropped = w.net(HOST)?.dropped()?;
    w.net(HOST)?.heal()?;
    t.note(format!("partition lifted; it dropped {dropped} datagrams"));
    if dropped == 0 && landed {
        t.missed("no datagram hit the partition");
    }

    let task = w.wait_new_task(HOST, "backup", &BTreeSet::new(), STARTUP_TIMEOUT)?;
    let ended = task_end(&w, HOST, &task, &fault)?;
    if let (false, Ended::Failed(error, _)) = (may_fail, &ended) {
        bail!(
            "the backup failed after a {:.1} s partition, shorter than QUIC's idle timeout, \
             which it should have ridden out: {error}",
            hold.as_secs_f64()
        );
    }
    note_cli_end(t, proc, Some(HOST), &fault, WAIT_CLI_TIMEOUT + hold)?;
    complete(t, ended, &fault, super::retry_backup(&w, HOST))?;
    w.verify(t)?;
    Ok(Outcome::Passed)
}
