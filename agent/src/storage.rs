//! The storage agent's side of the data plane: accepts QUIC sessions from
//! sources (backup) and destinations (restore) and serves its repository.
//!
//! A session starts with `Hello` carrying the signed task that allows it. The
//! storage agent checks the coordinator's signature, that the task names this
//! host as its storage, and that the client's certificate names the task's
//! host; anything else is refused with a `security.task_rejected` event before
//! a byte of data moves. Backup sessions may only add blobs and commit a
//! snapshot of their own host; restore sessions may only read the blobs of
//! the snapshot their task names.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla_protocol::frame::{RepoReply, Request, Response, MAX_FRAME, MAX_IDS};
use flotilla_protocol::repo::{BlobId, BlobKind};
use flotilla_protocol::{
    subject, verify_task_for_peer, EventBody, HostName, RejectReason, Severity, TaskBody, TaskKind,
};
use futures::StreamExt;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument};

use crate::daemon::Agent;
use crate::now_ms;
use crate::repository::{RepoError, Repository};
use crate::transfer::{peer_host, read_frame, write_frame, TransferEndpoint, TransferError};

/// Blobs that a live backup session has said it will upload.
///
/// When two hosts back up the same new data at the same moment, the second
/// one's `Have` finds the first one's claim and does not send the bytes again;
/// its commit then waits until the claimed blobs are durable. A claim dies with
/// its session, so if the first upload fails, the second commit finds the blob
/// missing and its source retries.
#[derive(Debug, Default)]
pub(crate) struct Claims {
    owners: Mutex<HashMap<BlobId, u64>>,
    next_session: AtomicU64,
    /// Live session of each task: a resumed task (same id) supersedes it.
    tasks: Mutex<HashMap<String, (u64, quinn::Connection)>>,
    /// Blobs each live session relies on being kept: those a backup was told
    /// are present, those a restore reads. Prune leaves them alone.
    relied: Mutex<HashMap<u64, HashSet<BlobId>>>,
}

/// How long a client has to present its task.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest hello frame: a task envelope and a little framing.
const HELLO_BYTES: usize = flotilla_protocol::limits::TASK_BYTES + 1024;

/// How long a commit waits for blobs another session is still uploading.
const CLAIM_WAIT: Duration = Duration::from_secs(30 * 60);

impl Claims {
    fn session_id(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    /// Records that session `me` relies on `ids` staying in the repository.
    fn rely(&self, me: u64, ids: impl IntoIterator<Item = BlobId>) {
        if let Ok(mut relied) = self.relied.lock() {
            relied.entry(me).or_default().extend(ids);
        }
    }

    /// Whether a live session uploads or relies on `id` (for prune).
    pub(crate) fn is_protected(&self, id: &BlobId) -> bool {
        let claimed = self
            .owners
            .lock()
            .map(|o| o.contains_key(id))
            .unwrap_or(true);
        claimed
            || self
                .relied
                .lock()
                .map(|r| r.values().any(|set| set.contains(id)))
                .unwrap_or(true)
    }

    /// Of the blobs `repo` lacks, those nobody else is uploading; claims them.
    fn claim_missing(&self, repo: &Repository, ids: &[BlobId], me: u64) -> Vec<BlobId> {
        // Recorded before the index is read, so a prune that runs meanwhile
        // sees it (prune checks under the index's write lock).
        self.rely(me, ids.iter().copied());
        let missing = repo.missing(ids);
        let Ok(mut owners) = self.owners.lock() else {
            return missing;
        };
        missing
            .into_iter()
            .filter(|id| match owners.get(id) {
                Some(owner) if *owner != me => false,
                _ => {
                    owners.insert(*id, me);
                    true
                }
            })
            .collect()
    }

    /// How many of `ids` are still being uploaded by other sessions.
    fn pending(&self, repo: &Repository, ids: &[BlobId], me: u64) -> usize {
        let Ok(owners) = self.owners.lock() else {
            return 0;
        };
        ids.iter()
            .filter(|id| owners.get(id).is_some_and(|o| *o != me) && !repo.contains(id))
            .count()
    }

    fn release(&self, me: u64) {
        if let Ok(mut owners) = self.owners.lock() {
            owners.retain(|_, owner| *owner != me);
        }
        if let Ok(mut tasks) = self.tasks.lock() {
            tasks.retain(|_, (session, _)| *session != me);
        }
        if let Ok(mut relied) = self.relied.lock() {
            relied.remove(&me);
        }
    }

    /// Registers session `me` for `task_id`. An older session of the same
    /// task belongs to a source that died and resumed: its connection may
    /// linger until the idle timeout, so it is closed and its claims dropped
    /// now, instead of making the resumed commit wait for them.
    fn supersede(&self, task_id: &str, me: u64, conn: &quinn::Connection) {
        let old = self
            .tasks
            .lock()
            .ok()
            .and_then(|mut t| t.insert(task_id.to_owned(), (me, conn.clone())));
        if let Some((session, old_conn)) = old.filter(|(s, _)| *s != me) {
            info!(task = task_id, "a resumed session supersedes an older one");
            old_conn.close(1u32.into(), b"superseded by a resumed session");
            if let Ok(mut owners) = self.owners.lock() {
                owners.retain(|_, owner| *owner != session);
            }
        }
    }
}

/// What a session may do, decided by its task.
#[derive(Debug, Clone)]
enum Grant {
    /// Add blobs and commit snapshots of `host`.
    Backup { host: HostName },
    /// Read the blobs of one snapshot.
    Restore {
        snapshot: String,
        allowed: Option<Arc<HashSet<BlobId>>>,
    },
}

/// Accepts sessions until `cancel` fires.
pub(crate) async fn serve(
    agent: Arc<Agent>,
    endpoint: Arc<TransferEndpoint>,
    repo: Option<Arc<Repository>>,
    cancel: CancellationToken,
) {
    let mut sessions = JoinSet::new();
    let claims = agent.claims.clone();
    loop {
        let incoming = tokio::select! {
            _ = cancel.cancelled() => break,
            Some(_) = sessions.join_next(), if !sessions.is_empty() => continue,
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => break,
            },
        };
        let agent = agent.clone();
        let repo = repo.clone();
        let claims = claims.clone();
        let peer = incoming.remote_address();
        sessions.spawn(
            async move {
                let conn = match incoming.establish().await {
                    Ok(c) => c,
                    Err(e) => {
                        // A peer without a fleet certificate ends here.
                        warn!(error = %e, "QUIC handshake refused");
                        agent.refused_peer(&peer.to_string(), &e.to_string()).await;
                        return;
                    }
                };
                let me = claims.session_id();
                if let Err(e) = session(&agent, repo, &claims, me, conn).await {
                    debug!(error = %e, "session ended with an error");
                }
                claims.release(me);
            }
            .instrument(info_span!("session", %peer)),
        );
    }
    sessions.abort_all();
}

impl Agent {
    async fn refused_peer(&self, peer: &str, why: &str) {
        self.bus
            .event(
                Severity::Error,
                format!("refused a data-plane peer at {peer}: {why}"),
                EventBody::TaskRejected {
                    task_id: None,
                    reason: RejectReason::UnknownPeer,
                    detail: why.to_owned(),
                    subject: format!("quic://{peer}"),
                },
            )
            .await;
    }
}

fn error(code: &str, message: impl Into<String>, retryable: bool) -> Response {
    Response::Error {
        code: code.into(),
        message: message.into(),
        retryable,
    }
}

fn repo_error(e: &RepoError) -> Response {
    error(e.code(), e.to_string(), e.is_retryable())
}

async fn session(
    agent: &Arc<Agent>,
    repo: Option<Arc<Repository>>,
    claims: &Claims,
    me: u64,
    conn: quinn::Connection,
) -> Result<(), TransferError> {
    let peer = conn.remote_address().to_string();
    let (mut send, mut recv) = conn.accept_bi().await?;
    // The hello is small and must come at once: a peer cannot hold a
    // session (or much memory) without presenting a task.
    let hello = tokio::time::timeout(HELLO_TIMEOUT, read_frame::<Request>(&mut recv, HELLO_BYTES))
        .await
        .map_err(|_| TransferError::TimedOut {
            addr: conn.remote_address(),
        })??;
    let Some(Request::Hello { task, .. }) = hello else {
        write_frame(
            &mut send,
            &error("invalid", "a session must start with hello", false),
        )
        .await?;
        return Ok(());
    };
    let s = &agent.settings;
    let body = match verify_task_for_peer(&task, &s.coordinator_key, &s.bundle.fleet, now_ms()) {
        Ok(b) => b,
        Err(e) => {
            agent
                .reject_peer_task(e.task_id(), e.reason(), e.to_string(), &peer)
                .await;
            write_frame(&mut send, &error("forbidden", e.to_string(), false)).await?;
            return Ok(());
        }
    };
    let grant = match grant_for(&body, &s.host) {
        Ok(g) => g,
        Err(why) => {
            agent
                .reject_peer_task(Some(&body.id), RejectReason::NotAllowed, why.clone(), &peer)
                .await;
            write_frame(&mut send, &error("forbidden", why, false)).await?;
            return Ok(());
        }
    };
    if let Err(e) = peer_host(&conn, &body.host) {
        agent
            .reject_peer_task(
                Some(&body.id),
                RejectReason::UnknownPeer,
                e.to_string(),
                &peer,
            )
            .await;
        write_frame(&mut send, &error("forbidden", e.to_string(), false)).await?;
        return Ok(());
    }
    let Some(repo) = repo else {
        write_frame(
            &mut send,
            &error(
                "invalid",
                format!(
                    "host {} keeps no repository (start it with --storage)",
                    s.host
                ),
                false,
            ),
        )
        .await?;
        return Ok(());
    };
    info!(task = %body.id, host = %body.host, kind = body.kind.name(), "session opened");
    claims.supersede(&body.id, me, &conn);
    write_frame(
        &mut send,
        &Response::Welcome {
            repo_id: repo.repo_id().to_owned(),
        },
    )
    .await?;

    // Data streams are accepted by a task of their own: reading the control
    // stream is not cancel-safe, so it must never sit in a `select!` that
    // another event can win halfway through a frame.
    let (grant_tx, grant_rx) = tokio::sync::watch::channel(grant.clone());
    let acceptor = {
        let conn = conn.clone();
        let repo = repo.clone();
        tokio::spawn(async move {
            let mut streams = JoinSet::new();
            while let Ok((s2, r2)) = conn.accept_bi().await {
                let repo = repo.clone();
                let grant = grant_rx.borrow().clone();
                streams.spawn(async move {
                    if let Err(e) = data_stream(repo, grant, s2, r2).await {
                        debug!(error = %e, "data stream ended with an error");
                    }
                });
                while streams.try_join_next().is_some() {}
            }
            // Let uploads still being written finish (their packs are kept
            // even if the client went away: a resumed backup reuses them).
            while streams.join_next().await.is_some() {}
        })
    };
    let mut grant = grant;
    let control_result = async {
        while let Some(req) = read_frame::<Request>(&mut recv, MAX_FRAME).await? {
            let resp = control(&repo, claims, me, &mut grant, req).await;
            grant_tx.send_replace(grant.clone());
            write_frame(&mut send, &resp).await?;
        }
        Ok::<(), TransferError>(())
    }
    .await;
    if control_result.is_err() {
        conn.close(0u32.into(), b"control stream failed");
    }
    let _ = acceptor.await;
    info!(task = %body.id, "session closed");
    Ok(())
}

fn grant_for(body: &TaskBody, me: &HostName) -> Result<Grant, String> {
    match &body.kind {
        TaskKind::Backup { storage, .. } if storage == me => Ok(Grant::Backup {
            host: body.host.clone(),
        }),
        TaskKind::Restore {
            storage, snapshot, ..
        } if storage == me => Ok(Grant::Restore {
            snapshot: snapshot.clone(),
            allowed: None,
        }),
        TaskKind::Backup { storage, .. } | TaskKind::Restore { storage, .. } => Err(format!(
            "task {} names storage host {storage}, not {me}",
            body.id
        )),
        other => Err(format!(
            "a {} task does not open a data-plane session",
            other.name()
        )),
    }
}

async fn control(
    repo: &Arc<Repository>,
    claims: &Claims,
    me: u64,
    grant: &mut Grant,
    req: Request,
) -> Response {
    match (req, &mut *grant) {
        (Request::Have { ids }, Grant::Backup { .. }) => {
            if ids.len() > MAX_IDS {
                return error(
                    "invalid",
                    format!("at most {MAX_IDS} ids per request"),
                    false,
                );
            }
            Response::Missing {
                ids: claims.claim_missing(repo, &ids, me),
            }
        }
        (Request::Commit { snapshot }, Grant::Backup { host }) => {
            if &snapshot.host != host {
                return error(
                    "forbidden",
                    format!(
                        "a backup session of {host} cannot commit a snapshot of {}",
                        snapshot.host
                    ),
                    false,
                );
            }
            // Blobs another session is still uploading for us: wait for them.
            let started = Instant::now();
            let mut needed = snapshot.blobs.clone();
            needed.push(snapshot.tree);
            while claims.pending(repo, &needed, me) > 0 && started.elapsed() < CLAIM_WAIT {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let repo = repo.clone();
            let id = snapshot.id.clone();
            match tokio::task::spawn_blocking(move || repo.commit_snapshot(&snapshot)).await {
                Ok(Ok(())) => {
                    info!(snapshot = %id, "snapshot committed");
                    Response::Committed { id }
                }
                Ok(Err(e)) => repo_error(&e),
                Err(e) => error("io", format!("commit crashed: {e}"), true),
            }
        }
        (Request::GetSnapshot { id }, Grant::Restore { snapshot, allowed }) => {
            if !id.starts_with(snapshot.as_str()) && !snapshot.starts_with(id.as_str()) {
                return error(
                    "forbidden",
                    format!("this session may read snapshot {snapshot} only"),
                    false,
                );
            }
            let repo2 = repo.clone();
            let want = snapshot.clone();
            match tokio::task::spawn_blocking(move || repo2.snapshot(&want)).await {
                Ok(Ok(rec)) => {
                    let mut set: HashSet<BlobId> = rec.blobs.iter().copied().collect();
                    set.insert(rec.tree);
                    claims.rely(me, set.iter().copied());
                    *allowed = Some(Arc::new(set));
                    *snapshot = rec.id.clone();
                    Response::Snapshot { snapshot: rec }
                }
                Ok(Err(e)) => repo_error(&e),
                Err(e) => error("io", format!("lookup crashed: {e}"), true),
            }
        }
        (other, _) => error(
            "forbidden",
            format!(
                "request {} is not allowed in this session",
                request_name(&other)
            ),
            false,
        ),
    }
}

fn request_name(r: &Request) -> &'static str {
    match r {
        Request::Hello { .. } => "hello",
        Request::Have { .. } => "have",
        Request::Put { .. } => "put",
        Request::Commit { .. } => "commit",
        Request::Get { .. } => "get",
        Request::GetSnapshot { .. } => "get_snapshot",
    }
}

/// One data stream: a run of `Put`s (backup) answered by one `Stored`, or one
/// `Get` (restore) answered by a `Blob` per id.
async fn data_stream(
    repo: Arc<Repository>,
    grant: Grant,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> Result<(), TransferError> {
    match grant {
        Grant::Backup { .. } => {
            let mut writer = repo.pack_writer();
            let mut failure = None;
            loop {
                match read_frame::<Request>(&mut recv, MAX_FRAME).await {
                    Ok(Some(Request::Put { id, kind, data })) => {
                        if failure.is_none() {
                            if let Err(e) =
                                tokio::task::block_in_place(|| writer.add(id, kind, &data))
                            {
                                failure = Some(repo_error(&e));
                            }
                        }
                    }
                    Ok(Some(other)) => {
                        failure.get_or_insert(error(
                            "invalid",
                            format!("{} on an upload stream", request_name(&other)),
                            false,
                        ));
                        break;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        // The client went away: keep what arrived whole.
                        let _ = tokio::task::spawn_blocking(move || writer.finish()).await;
                        return Err(e);
                    }
                }
            }
            let finished = tokio::task::spawn_blocking(move || writer.finish()).await;
            let resp = match (failure, finished) {
                (Some(f), _) => f,
                (None, Ok(Ok(stats))) => Response::Stored {
                    blobs: stats.blobs,
                    bytes: stats.bytes,
                },
                (None, Ok(Err(e))) => repo_error(&e),
                (None, Err(e)) => error("io", format!("pack writer crashed: {e}"), true),
            };
            write_frame(&mut send, &resp).await?;
            let _ = send.finish();
        }
        Grant::Restore { allowed, .. } => {
            let Some(Request::Get { ids }) = read_frame::<Request>(&mut recv, MAX_FRAME).await?
            else {
                write_frame(&mut send, &error("invalid", "expected get", false)).await?;
                return Ok(());
            };
            if ids.len() > MAX_IDS {
                write_frame(
                    &mut send,
                    &error(
                        "invalid",
                        format!("at most {MAX_IDS} ids per request"),
                        false,
                    ),
                )
                .await?;
                return Ok(());
            }
            for id in ids {
                let permitted = allowed.as_ref().is_some_and(|a| a.contains(&id));
                let resp = if !permitted {
                    error(
                        "forbidden",
                        format!("blob {id:?} is not part of this session's snapshot"),
                        false,
                    )
                } else {
                    let repo = repo.clone();
                    match tokio::task::spawn_blocking(move || repo.read_blob(&id)).await {
                        Ok(Ok((kind, data))) => Response::Blob { id, kind, data },
                        Ok(Err(e)) => repo_error(&e),
                        Err(e) => error("io", format!("read crashed: {e}"), true),
                    }
                };
                write_frame(&mut send, &resp).await?;
            }
            let _ = send.finish();
        }
    }
    Ok(())
}

impl Agent {
    async fn reject_peer_task(
        &self,
        task_id: Option<&str>,
        reason: RejectReason,
        detail: String,
        peer: &str,
    ) {
        warn!(task = ?task_id, ?reason, %detail, %peer, "data-plane session refused");
        self.bus
            .event(
                Severity::Error,
                format!("refused a data-plane session from {peer}: {detail}"),
                EventBody::TaskRejected {
                    task_id: task_id.map(str::to_owned),
                    reason,
                    detail,
                    subject: format!("quic://{peer}"),
                },
            )
            .await;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Query {
    Snapshots,
    Tree,
    Stats,
}

/// Answers the read-only repository queries on NATS until `cancel` fires.
pub(crate) async fn serve_queries(
    agent: Arc<Agent>,
    repo: Arc<Repository>,
    cancel: CancellationToken,
) -> Result<(), async_nats::SubscribeError> {
    let client = agent.bus.client().clone();
    let host = &agent.settings.host;
    let snaps = client.subscribe(subject::repo_snapshots(host)).await?;
    let trees = client.subscribe(subject::repo_tree(host)).await?;
    let stats = client.subscribe(subject::repo_stats(host)).await?;
    let mut requests = futures::stream::select_all([
        snaps.map(|m| (Query::Snapshots, m)).boxed(),
        trees.map(|m| (Query::Tree, m)).boxed(),
        stats.map(|m| (Query::Stats, m)).boxed(),
    ]);
    loop {
        let (query, msg) = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            next = requests.next() => match next {
                Some(m) => m,
                None => return Ok(()),
            },
        };
        let Some(reply) = msg.reply else { continue };
        let repo = repo.clone();
        let payload = msg.payload.clone();
        let answer = tokio::task::spawn_blocking(move || {
            if query == Query::Stats {
                return RepoReply::Stats {
                    stats: repo.stats(),
                };
            }
            if query == Query::Snapshots {
                match repo.snapshots() {
                    Ok(mut list) => {
                        for s in &mut list {
                            s.blobs.clear();
                        }
                        RepoReply::Snapshots { snapshots: list }
                    }
                    Err(e) => RepoReply::Error {
                        message: e.to_string(),
                    },
                }
            } else {
                let Ok(bytes) = <[u8; 32]>::try_from(payload.as_ref()) else {
                    return RepoReply::Error {
                        message: "a tree request is a 32-byte blob id".into(),
                    };
                };
                match repo.read_blob(&BlobId(bytes)) {
                    Ok((BlobKind::Tree, data)) => RepoReply::Tree { data },
                    Ok(_) => RepoReply::Error {
                        message: "only tree blobs are served here".into(),
                    },
                    Err(e) => RepoReply::Error {
                        message: e.to_string(),
                    },
                }
            }
        })
        .await
        .unwrap_or_else(|e| RepoReply::Error {
            message: format!("query crashed: {e}"),
        });
        let bytes = flotilla_protocol::encode(&answer).unwrap_or_default();
        if let Err(e) = client.publish(reply, bytes.into()).await {
            warn!(error = %e, "cannot answer repository query");
        }
    }
}
