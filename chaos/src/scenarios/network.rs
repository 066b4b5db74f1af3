//! The link itself degraded for a whole backup, with no moment to aim at:
//!
//! - packet-loss: 5 % of the packets on the source's link dropped at
//!   random, each way, bus (TCP) and data plane (QUIC) alike;
//! - bandwidth-cap: the source's uplink capped at 40–100 Mbit/s with a
//!   token bucket filter (tbf);
//! - latency: 5–50 ms added each way (plus up to 5 ms of jitter) between
//!   the source and the storage agent by a userspace UDP proxy (the kernel
//!   here has no netem), which nas advertises with `--advertise`.
//!
//! Passes when the backup succeeds without a retry within the data bound,
//! the fault bit (nftables counted dropped packets; tbf counted packets it
//! held back, and the backup ran no faster than the cap; datagrams went
//! through the proxy), and the world's checks hold. A fault that did not
//! bite makes the trial missed, not passed.
//! The throughput of each backup is noted, for the report.

use std::time::Duration;

use anyhow::{bail, Result};

use crate::delay::DelayProxy;
use crate::net;
use crate::trial::{Outcome, Trial};
use crate::world::{free_udp_port, Source, Spec, World, MIB};

const HOST: &str = "alpha";
/// Packets dropped, in percent.
const LOSS_PERCENT: u32 = 5;
/// A measured rate may exceed the cap by this factor (tbf's burst, and
/// the source's data being a little less than what crosses the link).
const CAP_SLACK: f64 = 1.15;

pub(super) fn packet_loss(t: &mut Trial) -> Result<Outcome> {
    if let Some(why) = net::unavailable() {
        return Ok(Outcome::Skipped(why));
    }
    let bytes = t.random_mib(100, 201);
    let w = World::start(t, &netns_spec(bytes))?;
    w.net(HOST)?.loss(LOSS_PERCENT)?;
    t.note(format!(
        "{LOSS_PERCENT}% of {HOST}'s packets dropped each way"
    ));
    let took = timed_backup(t, &w, bytes)?;
    let dropped = w.net(HOST)?.dropped()?;
    w.net(HOST)?.heal()?;
    t.note(format!(
        "backup took {:.1} s through the lossy link; {dropped} packets dropped",
        took.as_secs_f64()
    ));
    if dropped == 0 {
        t.missed("no packet was dropped");
    }
    w.verify(t)?;
    Ok(Outcome::Passed)
}

pub(super) fn bandwidth_cap(t: &mut Trial) -> Result<Outcome> {
    if let Some(why) = net::unavailable() {
        return Ok(Outcome::Skipped(why));
    }
    // Smaller data: a capped link is slow on purpose.
    let bytes = t.random_mib(30, 61);
    let w = World::start(t, &netns_spec(bytes))?;
    let kbit = t.range(40_000, 100_001);
    w.net(HOST)?.cap(kbit)?;
    t.note(format!(
        "{HOST}'s uplink capped at {} Mbit/s (tbf)",
        kbit / 1000
    ));
    let took = timed_backup(t, &w, bytes)?;
    let mbit = bytes as f64 * 8.0 / took.as_secs_f64() / 1e6;
    let cap = kbit as f64 / 1000.0;
    if mbit > cap * CAP_SLACK {
        bail!(
            "the backup moved {mbit:.1} Mbit/s through a {cap:.0} Mbit/s cap: \
             the cap did not hold, so the trial tested nothing"
        );
    }
    let throttled = w.net(HOST)?.throttled()?;
    t.note(format!(
        "{mbit:.1} Mbit/s of data under the {cap:.0} Mbit/s cap; tbf held back {throttled} packets"
    ));
    if throttled == 0 {
        t.missed("the cap never throttled the backup");
    }
    w.net(HOST)?.uncap()?;
    w.verify(t)?;
    Ok(Outcome::Passed)
}

pub(super) fn latency(t: &mut Trial) -> Result<Outcome> {
    let bytes = t.random_mib(100, 201);
    let delay = t.millis(5, 51);
    let jitter = t.millis(0, 6);
    let port = free_udp_port()?;
    let target = format!("127.0.0.1:{port}").parse()?;
    // Declared before the world, so it outlives every agent that uses it.
    let proxy = DelayProxy::start(target, delay, jitter, t.data_seed())?;
    let spec = Spec {
        sources: vec![Source::new(HOST, bytes)],
        nas_listen: Some((format!("127.0.0.1:{port}"), Some(proxy.addr().to_string()))),
        ..Spec::default()
    };
    let w = World::start(t, &spec)?;
    t.note(format!(
        "nas advertises the proxy {}: {} ms each way, up to {} ms of jitter",
        proxy.addr(),
        delay.as_millis(),
        jitter.as_millis()
    ));
    let took = timed_backup(t, &w, bytes)?;
    if proxy.forwarded() == 0 {
        bail!("no datagram went through the delay proxy: the trial tested nothing");
    }
    t.note(format!(
        "backup took {:.1} s; {} datagrams delayed",
        took.as_secs_f64(),
        proxy.forwarded()
    ));
    w.verify(t)?;
    Ok(Outcome::Passed)
}

fn netns_spec(bytes: u64) -> Spec {
    Spec {
        sources: vec![Source::new(HOST, bytes)],
        netns: true,
        ..Spec::default()
    }
}

/// A backup of `HOST` that must succeed; how long its task ran (from
/// `task.started` to `task.finished`, by the agent's clock), noted with the
/// throughput.
fn timed_backup(t: &mut Trial, w: &World, bytes: u64) -> Result<Duration> {
    let snapshot = w.backup_ok(HOST)?;
    let started = w.events("task.started", Some(HOST))?;
    let finished = w.events("task.finished", Some(HOST))?;
    let time = |events: &[serde_json::Value]| events.last().and_then(|e| e["time"].as_u64());
    let took = match (time(&started), time(&finished)) {
        (Some(a), Some(b)) if b > a => Duration::from_millis(b - a),
        _ => bail!("the backup's task.started and task.finished times are missing"),
    };
    t.note(format!(
        "backup committed {snapshot}: {} MiB in {:.1} s ({:.1} MiB/s)",
        bytes / MIB,
        took.as_secs_f64(),
        bytes as f64 / MIB as f64 / took.as_secs_f64()
    ));
    Ok(took)
}
