//! The agent daemon: opens the state, connects, builds the shared
//! [`Agent`], starts the loops (heartbeats, discovery, tasks, the data-plane
//! server, repository queries) and shuts them down in order.
//!
//! It wires things together and decides nothing about a task (that is
//! `jobs`) and serves no session (that is `transfer::server`, which gets a
//! [`ServerContext`] of what it needs, not the agent).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_protocol::repo::RepoKey;
use flotilla_protocol::{
    encode, subject, AgentState, EventBody, Heartbeat, OfflineReason, RejectReason, RootKind,
    Severity, HEARTBEAT_VERSION,
};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::bus::micro::{self, LatestHealth};
use crate::bus::{queries, Bus, BusError};
use crate::config::Settings;
use crate::jobs::{self, Agent};
use crate::repository::{RepoError, Repository};
use crate::revocation::Revocations;
use crate::state::{State, StateError};
use crate::transfer::server::{self, ServerContext};
use crate::transfer::{
    advertised_addr, route_ip_to, AdvertisedFrom, Identity, TransferEndpoint, TransferError,
};
use crate::{health, now_ms, VERSION};

/// Finished journal entries older than this are forgotten at startup.
const JOURNAL_RETENTION_MS: u64 = 30 * 24 * 3600 * 1000;
/// How long running tasks get to stop when the agent shuts down.
const JOB_STOP_GRACE: Duration = Duration::from_secs(5);

/// Why the agent daemon stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The state directory could not be opened.
    #[error("cannot open agent state in {dir}: {source}")]
    State {
        /// The state directory.
        dir: String,
        /// Why.
        source: StateError,
    },
    /// NATS could not be set up.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The QUIC endpoint could not be set up.
    #[error(transparent)]
    Transfer(#[from] TransferError),
    /// The repository could not be opened.
    #[error("cannot open the repository: {0}")]
    Repository(#[from] RepoError),
}

/// Runs the agent until `shutdown` fires, then stops in order.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> Result<(), AgentError> {
    let started_at = now_ms();
    let state = State::open(&settings.state_dir).map_err(|source| AgentError::State {
        dir: settings.state_dir.display().to_string(),
        source,
    })?;
    let epoch = state.epoch();
    info!(
        epoch = format_args!("{:016x}", epoch.epoch),
        created_at = epoch.created_at,
        "agent state open"
    );
    match state.prune(started_at.saturating_sub(JOURNAL_RETENTION_MS)) {
        Ok(0) => {}
        Ok(n) => info!(removed = n, "pruned old journal entries"),
        Err(e) => warn!(error = %e, "cannot prune task journal"),
    }
    info!(host = %settings.host, nats = %settings.nats_url, "connecting to NATS");
    let bus = match Bus::connect(&settings.nats_url, &settings.bundle, &shutdown).await {
        Ok(bus) => bus,
        Err(BusError::Cancelled) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    let repo_key = settings
        .bundle
        .repo_key
        .as_deref()
        .and_then(RepoKey::from_hex)
        .map(Arc::new);
    let revocations = Arc::new(Revocations::new(
        settings
            .bundle
            .coordinator_public_key()
            .map_err(|e| TransferError::Bundle {
                host: settings.host.clone(),
                what: "coordinator key",
                detail: e.to_string(),
            })?,
        settings.bundle.fleet.clone(),
    ));
    match state.revocations() {
        Ok(Some(signed)) => match revocations.apply(&signed) {
            Ok(Some(list)) => info!(refused = list.revoked.len(), "revocation list from state"),
            Ok(None) => {}
            Err(e) => warn!(error = %e, "stored revocation list not believed"),
        },
        Ok(None) => {}
        Err(e) => warn!(error = %e, "cannot read the stored revocation list"),
    }
    let identity = Identity::with_revocations(&settings.bundle, revocations.certs())?;
    let bind: SocketAddr = settings
        .listen
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
    let endpoint = Arc::new(TransferEndpoint::bind(bind, &identity)?);
    let quic_addr = match settings.listen {
        Some(_) => endpoint
            .local_addr()
            .ok()
            .map(|bound| advertise(&settings, bound)),
        None => None,
    };
    let repo = match settings.storage.clone() {
        Some(dir) => {
            let opened = tokio::task::spawn_blocking(move || Repository::open_or_init(&dir))
                .await
                .map_err(|e| RepoError::Invalid {
                    what: "repository".into(),
                    reason: format!("opening crashed: {e}"),
                })??;
            info!(repo = opened.repo_id(), "repository open");
            Some(Arc::new(opened))
        }
        None => None,
    };
    let agent = Arc::new(Agent {
        settings,
        state,
        bus,
        running: Arc::default(),
        started_at,
        endpoint: Some(endpoint.clone()),
        repo: repo.clone(),
        repo_key,
        quic_addr,
        claims: Arc::default(),
        cancelled: Mutex::default(),
    });

    // Children of one token so that shutdown reaches every loop at once; each
    // loop is owned by the JoinSet and aborted if it outlives the grace period.
    let loops_cancel = shutdown.child_token();
    let latest: LatestHealth = Arc::default();
    let mut loops = JoinSet::new();
    loops.spawn(heartbeat_loop(
        agent.clone(),
        latest.clone(),
        loops_cancel.clone(),
    ));
    loops.spawn(revocation_loop(
        agent.clone(),
        revocations,
        loops_cancel.clone(),
    ));
    loops.spawn({
        let agent = agent.clone();
        let cancel = loops_cancel.clone();
        let started = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
        async move {
            let client = agent.bus.client().clone();
            let host = agent.settings.host.clone();
            if let Err(e) = micro::serve(client, host, VERSION, started, latest, cancel).await {
                warn!(error = %e, "service discovery stopped");
            }
        }
    });
    loops.spawn(jobs::task_loop(agent.clone(), loops_cancel.clone()));
    loops.spawn(crate::memory::trim_loop(loops_cancel.clone()));
    loops.spawn(security_loop(agent.clone(), loops_cancel.clone()));
    if agent.settings.listen.is_some() {
        // The server gets what it checks and serves, not the agent: no
        // journal, no repository key.
        let ctx = ServerContext {
            host: agent.settings.host.clone(),
            fleet: agent.settings.bundle.fleet.clone(),
            coordinator_key: agent.settings.coordinator_key,
            repo: repo.clone(),
            claims: agent.claims.clone(),
            bus: agent.bus.clone(),
        };
        loops.spawn(server::serve(ctx, endpoint.clone(), loops_cancel.clone()));
    }
    if let Some(repo) = repo {
        let (bus, cancel) = (agent.bus.clone(), loops_cancel.clone());
        loops.spawn(async move {
            if let Err(e) = queries::serve(bus, repo, cancel).await {
                warn!(error = %e, "repository queries stopped");
            }
        });
    }

    agent
        .bus
        .event(
            Severity::Info,
            format!("agent {} online (version {VERSION})", agent.settings.host),
            EventBody::AgentOnline {
                version: VERSION.into(),
                roles: agent.settings.roles(),
                quic_addr: agent.quic_addr,
            },
        )
        .await;
    info!(host = %agent.settings.host, roles = ?agent.settings.roles(), "agent online");

    shutdown.cancelled().await;
    info!("shutting down");

    // Shutdown order:
    // 1. stop the loops: no new task is taken, running tasks are cancelled and
    //    stay journalled as running, so they resume on the next start;
    loops_cancel.cancel();
    let drained = tokio::time::timeout(JOB_STOP_GRACE + Duration::from_secs(1), async {
        while loops.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!("some loops did not stop in time; aborting them");
        loops.abort_all();
    }
    if let Some(endpoint) = &agent.endpoint {
        endpoint.shutdown().await;
    }
    // 2. tell the fleet, so `hosts` shows offline at once instead of after
    //    missed heartbeats;
    let last = heartbeat(&agent, AgentState::Offline).await;
    if let Err(e) = agent.bus.put_health(&last).await {
        warn!(error = %e, "cannot record offline state");
    }
    agent
        .bus
        .event(
            Severity::Warning,
            format!("agent {} went offline (shutdown)", agent.settings.host),
            EventBody::AgentOffline {
                reason: OfflineReason::Shutdown,
            },
        )
        .await;
    // 3. push out what is buffered, then make local state durable.
    agent.bus.flush().await;
    if let Err(e) = agent.state.flush().await {
        warn!(error = %e, "cannot flush agent state");
    }
    info!("agent stopped");
    Ok(())
}

/// The QUIC address to put in heartbeats, said in the log: peers dial it,
/// so a wildcard bind is replaced by the address this host reaches NATS
/// from, and one that cannot be replaced is a warning.
fn advertise(settings: &Settings, bound: SocketAddr) -> SocketAddr {
    let (addr, from) = advertised_addr(bound, settings.advertise, || {
        route_ip_to(&settings.nats_url)
    });
    match from {
        AdvertisedFrom::Flag => {
            info!(%addr, %bound, "advertising the QUIC address given by --advertise")
        }
        AdvertisedFrom::Bound => info!(%addr, "advertising the QUIC address it listens on"),
        AdvertisedFrom::Route => info!(
            %addr, %bound,
            "listening on every interface: advertising the address of the one that reaches NATS (give --advertise to choose another)"
        ),
        AdvertisedFrom::Unroutable => warn!(
            %bound,
            "listening on every interface and no route to NATS found: peers cannot dial {bound}; give --advertise ADDR:PORT"
        ),
    }
    if addr.ip().is_loopback() && from == AdvertisedFrom::Route {
        warn!(%addr, "NATS is on this machine, so the advertised address is a loopback one that other hosts cannot dial; give --advertise ADDR:PORT");
    }
    addr
}

async fn heartbeat_loop(agent: Arc<Agent>, latest: LatestHealth, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(agent.settings.heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let hb = heartbeat(&agent, AgentState::Online).await;
        if let Ok(bytes) = encode(&hb) {
            if let Ok(mut slot) = latest.lock() {
                *slot = Some(bytes.into());
            }
        }
        if let Err(e) = agent.bus.put_health(&hb).await {
            warn!(error = %e, "cannot publish heartbeat");
        }
    }
}

/// Reads the fleet's signed revocation list at every heartbeat interval and
/// applies (and keeps) a newer one: from then on no handshake with a revoked
/// certificate succeeds, in either direction.
async fn revocation_loop(
    agent: Arc<Agent>,
    revocations: Arc<Revocations>,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(agent.settings.heartbeat_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut said_missing = false;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let signed = match agent.bus.revocation_list().await {
            Ok(Some(signed)) => signed,
            Ok(None) => continue,
            Err(e) => {
                if !said_missing {
                    warn!(error = %e, "cannot read the fleet's revocation list; keeping the one in force");
                    said_missing = true;
                }
                continue;
            }
        };
        said_missing = false;
        match revocations.apply(&signed) {
            Ok(Some(list)) => {
                info!(refused = list.revoked.len(), "revocation list applied");
                if let Err(e) = agent.state.store_revocations(&signed) {
                    warn!(error = %e, "cannot keep the revocation list in the state");
                }
            }
            Ok(None) => {}
            Err(e) => {
                agent
                    .bus
                    .security_event(
                        "revocation-list",
                        format!("revocation list in the fleet bucket not believed: {e}"),
                        EventBody::TaskRejected {
                            task_id: None,
                            reason: RejectReason::BadSignature,
                            detail: e.to_string(),
                            subject: format!(
                                "$KV.{}.{}",
                                subject::FLEET_BUCKET,
                                subject::REVOKED_KEY
                            ),
                        },
                    )
                    .await
            }
        }
    }
}

/// Publishes the summaries of coalesced security events as their windows
/// close: a loop of its own, so a slow bus delays no heartbeat.
async fn security_loop(agent: Arc<Agent>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => agent.bus.flush_security().await,
        }
    }
}

/// Builds a heartbeat from the host's current readings.
async fn heartbeat(agent: &Agent, state: AgentState) -> Heartbeat {
    let s = &agent.settings;
    let mut roots: Vec<(RootKind, std::path::PathBuf)> = Vec::new();
    roots.extend(s.backup_roots.iter().map(|p| (RootKind::Backup, p.clone())));
    roots.extend(s.storage.iter().map(|p| (RootKind::Storage, p.clone())));
    roots.extend(
        s.restore_roots
            .iter()
            .map(|p| (RootKind::Restore, p.clone())),
    );
    // statvfs can block for a long time on a hung network filesystem.
    let readings = tokio::task::spawn_blocking(move || {
        let usage: Vec<_> = roots
            .iter()
            .map(|(kind, path)| health::root_usage(*kind, path))
            .collect();
        (
            usage,
            health::load_average(),
            health::rss_bytes(),
            health::memory(),
        )
    })
    .await;
    let (roots, load, rss, (mem_total, mem_available)) =
        readings.unwrap_or_else(|_| (Vec::new(), [0.0; 3], 0, (0, 0)));
    let running = agent
        .running
        .lock()
        .map(|r| r.values().map(|(job, _)| job.clone()).collect())
        .unwrap_or_default();
    Heartbeat {
        v: HEARTBEAT_VERSION,
        host: s.host.clone(),
        fleet: s.bundle.fleet.clone(),
        state,
        version: VERSION.into(),
        started_at: agent.started_at,
        time: now_ms(),
        interval_ms: s.heartbeat_interval.as_millis() as u64,
        load,
        rss_bytes: rss,
        mem_total_bytes: mem_total,
        mem_available_bytes: mem_available,
        roles: s.roles(),
        quic_addr: agent.quic_addr,
        roots,
        running,
        epoch: Some(agent.state.epoch().epoch),
    }
}
