//! The storage agent's side of the data plane: accepts QUIC sessions from
//! sources (backup) and destinations (restore) and serves its repository.
//!
//! A session starts with `Hello` carrying the signed task that allows it. The
//! storage agent checks the coordinator's signature, that the task names this
//! host as its storage, and that the client's certificate names the task's
//! host; anything else is refused with a `security.task_rejected` event before
//! a byte of data moves. Backup sessions may only add blobs and commit a
//! snapshot of their own host; copy sessions (another storage host sending
//! what it holds) may only add blobs, whose shape is checked, and commit the
//! snapshots their task selects; restore sessions may only read the blobs of
//! the snapshot their task names. No session deletes anything.
//!
//! The server sees only what [`ServerContext`] gives it (this host, its fleet
//! and coordinator key, the repository, the claims, the bus for events): never
//! the repository key, never the task journal.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_protocol::frame::{ErrorCode, Request, Response, MAX_FRAME, MAX_IDS};
use flotilla_protocol::repo::{check_sealed_shape, BlobId, SnapshotRecord};
use flotilla_protocol::{
    verify_task_for_peer, EventBody, HostName, PublicKey, RejectReason, TaskBody, TaskId, TaskKind,
};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, Instrument};

use super::{peer_host, read_frame, write_frame, Claims, TransferEndpoint, TransferError};
use crate::bus::Bus;
use crate::now_ms;
use crate::repository::{RepoError, Repository};

/// How long a client has to present its task.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection may stay without opening its first stream.
const FIRST_STREAM_TIMEOUT: Duration = Duration::from_secs(10);
/// Close code of a connection that opened no stream in time.
const CLOSE_NO_STREAM: quinn::VarInt = quinn::VarInt::from_u32(2);
/// Largest hello frame: a task envelope and a little framing.
const HELLO_BYTES: usize = flotilla_protocol::limits::TASK_BYTES + 1024;

/// How long a commit waits for blobs another session is still uploading.
const CLAIM_WAIT: Duration = Duration::from_secs(30 * 60);

/// What the session server needs from the running agent, and no more.
#[derive(Debug, Clone)]
pub(crate) struct ServerContext {
    /// This host: tasks must name it as their storage.
    pub host: HostName,
    /// This host's fleet: tasks of another fleet are refused.
    pub fleet: String,
    /// The key that signs every task a client presents.
    pub coordinator_key: PublicKey,
    /// The repository, on storage hosts (sessions are refused without one).
    pub repo: Option<Arc<Repository>>,
    /// What live sessions rely on; shared with the `prune` task.
    pub claims: Arc<Claims>,
    /// Where refusals are reported.
    pub bus: Bus,
}

/// What a session may do, decided by its task.
#[derive(Debug, Clone)]
enum Grant {
    /// Add blobs and commit snapshots of `host`.
    Backup { host: HostName },
    /// Add blobs and commit the snapshots a copy task selects, from the
    /// storage host that holds them: of `hosts` (any when empty), and only
    /// `snapshots` when the task names them.
    Copy {
        hosts: Arc<HashSet<HostName>>,
        snapshots: Arc<HashSet<String>>,
    },
    /// Read the blobs of one snapshot: the task's id (or prefix) until
    /// `get_snapshot` finds it, then the full id.
    Restore {
        snapshot: String,
        allowed: Option<Arc<HashSet<BlobId>>>,
    },
}

/// Accepts sessions until `cancel` fires.
pub(crate) async fn serve(
    ctx: ServerContext,
    endpoint: Arc<TransferEndpoint>,
    cancel: CancellationToken,
) {
    let ctx = Arc::new(ctx);
    let mut sessions = JoinSet::new();
    loop {
        let incoming = tokio::select! {
            _ = cancel.cancelled() => break,
            Some(_) = sessions.join_next(), if !sessions.is_empty() => continue,
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => break,
            },
        };
        let ctx = ctx.clone();
        let peer = incoming.remote_address();
        sessions.spawn(
            async move {
                let conn = match incoming.establish().await {
                    Ok(c) => c,
                    // A handshake that never completed proves nothing about
                    // who sent it (one spoofed packet is enough): not a
                    // security event, or anyone could fill the history with
                    // refusals naming innocent addresses.
                    Err(e @ TransferError::TimedOut { .. }) => {
                        debug!(error = %e, "QUIC handshake did not complete");
                        return;
                    }
                    Err(e) => {
                        // A peer without a fleet certificate ends here
                        // (logged with the event, coalesced in a flood).
                        ctx.refused_peer(&peer, &e.to_string()).await;
                        return;
                    }
                };
                let me = ctx.claims.session_id();
                if let Err(e) = session(&ctx, me, conn).await {
                    debug!(error = %e, "session ended with an error");
                }
                ctx.claims.release(me);
            }
            .instrument(info_span!("session", %peer)),
        );
    }
    sessions.abort_all();
}

impl ServerContext {
    async fn refused_peer(&self, peer: &SocketAddr, why: &str) {
        self.bus
            .security_event(
                &format!("{} unknown_peer", peer.ip()),
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

fn error(code: ErrorCode, message: impl Into<String>, retryable: bool) -> Response {
    Response::Error {
        code,
        message: message.into(),
        retryable,
    }
}

fn repo_error(e: &RepoError) -> Response {
    // The repository names its codes with the wire's words.
    error(ErrorCode::from(e.code()), e.to_string(), e.is_retryable())
}

async fn session(
    ctx: &ServerContext,
    me: u64,
    conn: quinn::Connection,
) -> Result<(), TransferError> {
    let claims = &ctx.claims;
    let peer = conn.remote_address().to_string();
    // A fleet member that connects must say what it wants at once: a
    // connection that opens no stream would otherwise hold a slot (and
    // keep-alives) until the idle timeout, and many of them would be a flood.
    let first = tokio::time::timeout(FIRST_STREAM_TIMEOUT, conn.accept_bi()).await;
    let Ok(first) = first else {
        conn.close(CLOSE_NO_STREAM, b"no stream opened in time");
        return Err(TransferError::TimedOut {
            addr: conn.remote_address(),
        });
    };
    let (mut send, mut recv) = first?;
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
            &error(ErrorCode::Invalid, "a session must start with hello", false),
        )
        .await?;
        return Ok(());
    };
    let body = match verify_task_for_peer(&task, &ctx.coordinator_key, &ctx.fleet, now_ms()) {
        Ok(b) => b,
        Err(e) => {
            ctx.reject_peer_task(e.task_id(), e.reason(), e.to_string(), &peer)
                .await;
            write_frame(
                &mut send,
                &error(ErrorCode::Forbidden, e.to_string(), false),
            )
            .await?;
            return Ok(());
        }
    };
    let grant = match grant_for(&body, &ctx.host) {
        Ok(g) => g,
        Err(why) => {
            let why = why.to_string();
            ctx.reject_peer_task(Some(&body.id), RejectReason::NotAllowed, why.clone(), &peer)
                .await;
            write_frame(&mut send, &error(ErrorCode::Forbidden, why, false)).await?;
            return Ok(());
        }
    };
    if let Err(e) = peer_host(&conn, &body.host) {
        ctx.reject_peer_task(
            Some(&body.id),
            RejectReason::UnknownPeer,
            e.to_string(),
            &peer,
        )
        .await;
        write_frame(
            &mut send,
            &error(ErrorCode::Forbidden, e.to_string(), false),
        )
        .await?;
        return Ok(());
    }
    let Some(repo) = ctx.repo.clone() else {
        write_frame(
            &mut send,
            &error(
                ErrorCode::Invalid,
                format!(
                    "host {} keeps no repository (start it with --storage)",
                    ctx.host
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

/// Why a task opens no session on this host.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
enum NoGrant {
    /// A backup or restore meant for another storage host.
    #[error("task {task} names storage host {storage}, not {me}")]
    OtherStorage {
        /// The task's id.
        task: TaskId,
        /// The storage host it names.
        storage: HostName,
        /// This host.
        me: HostName,
    },
    /// A copy from this host to itself.
    #[error("a copy task cannot copy {me}'s repository onto itself")]
    CopyToItself {
        /// This host.
        me: HostName,
    },
    /// A kind of task that never moves data between hosts.
    #[error("a {kind} task does not open a data-plane session")]
    NoDataPlane {
        /// The task's kind.
        kind: &'static str,
    },
}

fn grant_for(body: &TaskBody, me: &HostName) -> Result<Grant, NoGrant> {
    match &body.kind {
        TaskKind::Backup { storage, .. } if storage == me => Ok(Grant::Backup {
            host: body.host.clone(),
        }),
        TaskKind::Restore {
            storage, snapshot, ..
        } if storage == me => Ok(Grant::Restore {
            snapshot: snapshot.to_string(),
            allowed: None,
        }),
        TaskKind::Copy {
            to,
            hosts,
            snapshots,
            ..
        } if to == me && &body.host != me => Ok(Grant::Copy {
            hosts: Arc::new(hosts.iter().cloned().collect()),
            snapshots: Arc::new(snapshots.iter().map(|s| s.to_string()).collect()),
        }),
        TaskKind::Copy { to, .. } if to == me => Err(NoGrant::CopyToItself { me: me.clone() }),
        TaskKind::Backup { storage, .. } | TaskKind::Restore { storage, .. } => {
            Err(NoGrant::OtherStorage {
                task: body.id.clone(),
                storage: storage.clone(),
                me: me.clone(),
            })
        }
        TaskKind::Copy { to, .. } => Err(NoGrant::OtherStorage {
            task: body.id.clone(),
            storage: to.clone(),
            me: me.clone(),
        }),
        other => Err(NoGrant::NoDataPlane { kind: other.name() }),
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
        (Request::Have { ids }, Grant::Backup { .. } | Grant::Copy { .. }) => {
            if ids.len() > MAX_IDS {
                return error(
                    ErrorCode::Invalid,
                    format!("at most {MAX_IDS} ids per request"),
                    false,
                );
            }
            Response::Missing {
                ids: claims.claim_missing(repo, &ids, me),
            }
        }
        (Request::Commit { snapshot }, grant @ (Grant::Backup { .. } | Grant::Copy { .. })) => {
            if let Err(why) = may_commit(grant, &snapshot) {
                return error(ErrorCode::Forbidden, why, false);
            }
            // Checked here as the repository checks it (the same rule), so
            // that what `committed` answers is a typed id.
            let id = match snapshot.snapshot_id() {
                Ok(id) => id,
                Err(e) => return error(ErrorCode::Invalid, e.to_string(), false),
            };
            // Blobs another session is still uploading for us: wait for them.
            let started = Instant::now();
            let mut needed = snapshot.blobs.clone();
            needed.push(snapshot.tree);
            // Only what is not stored yet can be pending: poll that, not the
            // snapshot's whole blob list, every 50 ms.
            let needed = repo.missing(&needed);
            while claims.pending(repo, &needed, me) > 0 && started.elapsed() < CLAIM_WAIT {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let repo = repo.clone();
            match tokio::task::spawn_blocking(move || repo.commit_snapshot(&snapshot)).await {
                Ok(Ok(())) => {
                    info!(snapshot = %id, "snapshot committed");
                    Response::Committed { id }
                }
                Ok(Err(e)) => repo_error(&e),
                Err(e) => error(ErrorCode::Io, format!("commit crashed: {e}"), true),
            }
        }
        (Request::GetSnapshot { id }, Grant::Restore { snapshot, allowed }) => {
            if !id.starts_with(snapshot.as_str()) && !snapshot.starts_with(id.as_str()) {
                return error(
                    ErrorCode::Forbidden,
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
                Err(e) => error(ErrorCode::Io, format!("lookup crashed: {e}"), true),
            }
        }
        (other, _) => error(
            ErrorCode::Forbidden,
            format!(
                "request {} is not allowed in this session",
                request_name(&other)
            ),
            false,
        ),
    }
}

/// Whether a session with `grant` may commit `snapshot`: a backup its own
/// host's snapshots, a copy the snapshots its task selects.
fn may_commit(grant: &Grant, snapshot: &SnapshotRecord) -> Result<(), String> {
    match grant {
        Grant::Backup { host } if &snapshot.host != host => Err(format!(
            "a backup session of {host} cannot commit a snapshot of {}",
            snapshot.host
        )),
        Grant::Copy { hosts, .. } if !hosts.is_empty() && !hosts.contains(&snapshot.host) => {
            Err(format!(
                "this copy session may commit snapshots of {} only, not of {}",
                names(hosts.iter()),
                snapshot.host
            ))
        }
        Grant::Copy { snapshots, .. }
            if !snapshots.is_empty() && !snapshots.contains(&snapshot.id) =>
        {
            Err(format!(
                "snapshot {} is not one this copy session's task names",
                snapshot.id
            ))
        }
        Grant::Backup { .. } | Grant::Copy { .. } => Ok(()),
        Grant::Restore { .. } => Err("a restore session commits nothing".into()),
    }
}

fn names<'a>(hosts: impl Iterator<Item = &'a HostName>) -> String {
    let mut v: Vec<&str> = hosts.map(HostName::as_str).collect();
    v.sort_unstable();
    v.join(", ")
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
        Grant::Backup { .. } | Grant::Copy { .. } => {
            // A copy comes from another storage host, not from the source
            // that sealed the blobs: what can be checked without the key is.
            let copy = matches!(grant, Grant::Copy { .. });
            let mut writer = repo.pack_writer();
            let mut failure = None;
            loop {
                match read_frame::<Request>(&mut recv, MAX_FRAME).await {
                    Ok(Some(Request::Put { id, kind, data })) => {
                        if failure.is_none() && copy {
                            if let Err(why) = check_sealed_shape(&data) {
                                failure = Some(error(
                                    ErrorCode::Corrupt,
                                    format!("copied blob {id}: {why}"),
                                    false,
                                ));
                            }
                        }
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
                            ErrorCode::Invalid,
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
                (None, Err(e)) => error(ErrorCode::Io, format!("pack writer crashed: {e}"), true),
            };
            write_frame(&mut send, &resp).await?;
            let _ = send.finish();
        }
        Grant::Restore { allowed, .. } => {
            let Some(Request::Get { ids }) = read_frame::<Request>(&mut recv, MAX_FRAME).await?
            else {
                write_frame(&mut send, &error(ErrorCode::Invalid, "expected get", false)).await?;
                return Ok(());
            };
            if ids.len() > MAX_IDS {
                write_frame(
                    &mut send,
                    &error(
                        ErrorCode::Invalid,
                        format!("at most {MAX_IDS} ids per request"),
                        false,
                    ),
                )
                .await?;
                return Ok(());
            }
            // Blobs are read a group at a time on a blocking thread (one
            // hand-off per group, not per blob: a restore of many small
            // files asks for hundreds of thousands), and each group is sent
            // before the next is read, so a stream holds at most about
            // READ_GROUP_BYTES however large the blobs asked for.
            let ids: Arc<[BlobId]> = ids.into();
            let mut next = 0;
            while next < ids.len() {
                let (repo, allowed, group) = (repo.clone(), allowed.clone(), ids.clone());
                let read =
                    tokio::task::spawn_blocking(move || read_group(&repo, allowed, &group[next..]));
                let answers = match read.await {
                    Ok(answers) => answers,
                    Err(e) => {
                        let resp = error(ErrorCode::Io, format!("read crashed: {e}"), true);
                        write_frame(&mut send, &resp).await?;
                        return Ok(());
                    }
                };
                // One answer per id, in order, at least one per group.
                next += answers.len();
                for resp in answers {
                    write_frame(&mut send, &resp).await?;
                }
            }
            let _ = send.finish();
        }
    }
    Ok(())
}

/// Most blobs read in one hand-off to a blocking thread.
const READ_GROUP: usize = 64;
/// A group stops growing once it holds this many sealed bytes.
const READ_GROUP_BYTES: usize = 4 * 1024 * 1024;

/// Answers the first ids of `ids` in order: at most [`READ_GROUP`] of them,
/// stopping once about [`READ_GROUP_BYTES`] are read, and always at least one
/// when there is one. A blob outside the session's snapshot is refused, not
/// read.
fn read_group(
    repo: &Repository,
    allowed: Option<Arc<HashSet<BlobId>>>,
    ids: &[BlobId],
) -> Vec<Response> {
    let mut answers = Vec::with_capacity(ids.len().min(READ_GROUP));
    let mut bytes = 0;
    for &id in ids.iter().take(READ_GROUP) {
        let permitted = allowed.as_ref().is_some_and(|a| a.contains(&id));
        answers.push(if !permitted {
            error(
                ErrorCode::Forbidden,
                format!("blob {id:?} is not part of this session's snapshot"),
                false,
            )
        } else {
            match repo.read_blob(&id) {
                Ok((kind, data)) => {
                    bytes += data.len();
                    Response::Blob { id, kind, data }
                }
                Err(e) => repo_error(&e),
            }
        });
        if bytes >= READ_GROUP_BYTES {
            break;
        }
    }
    answers
}

impl ServerContext {
    async fn reject_peer_task(
        &self,
        task_id: Option<&TaskId>,
        reason: RejectReason,
        detail: String,
        peer: &str,
    ) {
        // The source address, not its port: a flood comes from many ports.
        let source = peer.rsplit_once(':').map_or(peer, |(ip, _)| ip);
        self.bus
            .security_event(
                &format!(
                    "{source} {reason:?} {}",
                    task_id.map_or("-", |t| t.as_str())
                ),
                format!("refused a data-plane session from {peer}: {detail}"),
                EventBody::TaskRejected {
                    task_id: task_id.cloned(),
                    reason,
                    detail,
                    subject: format!("quic://{peer}"),
                },
            )
            .await;
    }
}

#[cfg(test)]
mod tests {
    use flotilla_protocol::{SnapshotId, TASK_VERSION};

    use super::*;

    fn host(name: &str) -> HostName {
        HostName::new(name).expect("host name")
    }

    fn task(kind: TaskKind) -> TaskBody {
        TaskBody {
            v: TASK_VERSION,
            id: TaskId::new("t1").expect("valid"),
            fleet: "f".into(),
            host: host("alpha"),
            issued_at: 1,
            expires_at: 2,
            kind,
            epoch: None,
        }
    }

    fn backup(storage: &str) -> TaskKind {
        TaskKind::Backup {
            paths: vec![],
            excludes: vec![],
            storage: host(storage),
            storage_addr: "192.0.2.1:7443".parse().expect("address"),
            allow_empty: false,
        }
    }

    fn restore(storage: &str) -> TaskKind {
        TaskKind::Restore {
            snapshot: SnapshotId::new("abc".repeat(10) + "ab").expect("valid"),
            storage: host(storage),
            storage_addr: "192.0.2.1:7443".parse().expect("address"),
            target: "/restore".into(),
            includes: vec![],
            preserve_special: false,
        }
    }

    #[test]
    fn a_backup_naming_this_storage_may_add_blobs_of_its_own_host() {
        let grant = grant_for(&task(backup("nas")), &host("nas")).expect("granted");
        assert!(matches!(grant, Grant::Backup { host: h } if h == host("alpha")));
    }

    #[test]
    fn a_restore_naming_this_storage_may_read_its_snapshot_only() {
        let grant = grant_for(&task(restore("nas")), &host("nas")).expect("granted");
        let Grant::Restore { snapshot, allowed } = grant else {
            panic!("expected a restore grant");
        };
        assert_eq!(snapshot, "abc".repeat(10) + "ab");
        assert!(allowed.is_none(), "no blob is readable before get_snapshot");
    }

    fn copy(to: &str, hosts: &[&str], snapshots: &[&str]) -> TaskKind {
        TaskKind::Copy {
            to: host(to),
            to_addr: "192.0.2.1:7443".parse().expect("address"),
            hosts: hosts.iter().map(|h| host(h)).collect(),
            snapshots: snapshots
                .iter()
                .map(|s| SnapshotId::new(s.to_string()).expect("valid"))
                .collect(),
            limit_bytes_per_sec: 0,
        }
    }

    fn record(id: &str, of: &str) -> SnapshotRecord {
        SnapshotRecord {
            v: 1,
            id: id.into(),
            host: host(of),
            time: 1,
            tree: BlobId([1; 32]),
            partial: false,
            blobs: vec![],
            meta: vec![],
        }
    }

    #[test]
    fn a_copy_naming_this_storage_may_commit_the_snapshots_it_selects_only() {
        let (a, b) = ("a".repeat(32), "b".repeat(32));
        // The task runs on `alpha` (the host holding the snapshots).
        let grant = grant_for(&task(copy("offsite", &[], &[])), &host("offsite")).expect("granted");
        assert_eq!(may_commit(&grant, &record(&a, "web")), Ok(()));
        assert_eq!(may_commit(&grant, &record(&b, "db")), Ok(()));

        let grant =
            grant_for(&task(copy("offsite", &["web"], &[])), &host("offsite")).expect("granted");
        assert_eq!(may_commit(&grant, &record(&a, "web")), Ok(()));
        let why = may_commit(&grant, &record(&b, "db")).expect_err("another host's");
        assert!(why.contains("of web only, not of db"), "{why}");

        let grant =
            grant_for(&task(copy("offsite", &[], &[&a])), &host("offsite")).expect("granted");
        assert_eq!(may_commit(&grant, &record(&a, "db")), Ok(()));
        let why = may_commit(&grant, &record(&b, "db")).expect_err("not named");
        assert!(
            why.contains("not one this copy session's task names"),
            "{why}"
        );

        // A backup grant still commits its own host's snapshots only.
        let grant = grant_for(&task(backup("nas")), &host("nas")).expect("granted");
        assert_eq!(may_commit(&grant, &record(&a, "alpha")), Ok(()));
        assert!(may_commit(&grant, &record(&a, "web")).is_err());
    }

    #[test]
    fn a_copy_to_another_storage_or_onto_itself_is_refused() {
        let why =
            grant_for(&task(copy("elsewhere", &[], &[])), &host("offsite")).expect_err("refused");
        assert_eq!(
            why.to_string(),
            "task t1 names storage host elsewhere, not offsite"
        );
        let why = grant_for(&task(copy("alpha", &[], &[])), &host("alpha")).expect_err("refused");
        assert_eq!(why, NoGrant::CopyToItself { me: host("alpha") });
    }

    #[test]
    fn a_task_naming_another_storage_is_refused() {
        for kind in [backup("other"), restore("other")] {
            let why = grant_for(&task(kind), &host("nas")).expect_err("refused");
            assert_eq!(why.to_string(), "task t1 names storage host other, not nas");
        }
    }

    /// The repository's codes are the wire's words: each refusal reaches
    /// the client as a code it knows (the source retries on `missing_blobs`).
    #[test]
    fn repository_errors_reach_the_wire_as_known_codes() {
        let errors = [
            RepoError::NotFound {
                what: "blob".into(),
            },
            RepoError::Exists { id: "a".into() },
            RepoError::MissingBlobs {
                count: 1,
                first: BlobId([0; 32]),
            },
            RepoError::Invalid {
                what: "id".into(),
                reason: "bad".into(),
            },
            RepoError::Corrupt {
                path: "/p".into(),
                reason: "cut short".into(),
            },
            RepoError::WriterFailed,
        ];
        for e in &errors {
            let Response::Error { code, .. } = repo_error(e) else {
                panic!("{e} is not answered with an error");
            };
            assert!(!matches!(code, ErrorCode::Other(_)), "{e}: {code}");
            assert_eq!(code.as_str(), e.code());
        }
        let Response::Error { code, .. } = repo_error(&errors[2]) else {
            panic!("not an error");
        };
        assert_eq!(code, ErrorCode::MissingBlobs);
    }

    #[test]
    fn tasks_without_a_data_plane_open_no_session() {
        let kinds = [
            TaskKind::Check { read_data: true },
            TaskKind::Repair { read_data: true },
            TaskKind::Prune {
                dry_run: false,
                grace_secs: 0,
            },
            TaskKind::Estimate { paths: vec![] },
        ];
        for kind in kinds {
            let name = kind.name();
            let why = grant_for(&task(kind), &host("nas")).expect_err("refused");
            assert_eq!(why, NoGrant::NoDataPlane { kind: name });
            assert_eq!(
                why.to_string(),
                format!("a {name} task does not open a data-plane session")
            );
        }
    }
}
