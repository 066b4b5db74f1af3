//! The client side of a data-plane session: a source backing up into, or a
//! destination restoring from, a storage agent's repository over QUIC. The
//! `backup` and `restore` runners in `jobs/` open it with their signed task;
//! the storage side is `server.rs`.
//!
//! [`Session`] is async; the engines are synchronous, so [`BlockingStore`] and
//! [`BlockingFetch`] adapt it for code running on a blocking thread (they call
//! `Handle::block_on`, which is allowed there and only there).

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;

use flotilla_protocol::frame::{ErrorCode, Request, Response, FRAME_VERSION, MAX_FRAME, MAX_IDS};
use flotilla_protocol::repo::{BlobId, BlobKind, SnapshotRecord};
use flotilla_protocol::{HostName, SnapshotId};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, Mutex};
use tokio::task::JoinSet;

use super::{read_frame, write_frame, TransferEndpoint, TransferError};
use crate::engine::{Fetch, FetchError, Store, StoreError};

/// Parallel upload streams per backup session: enough to keep a LAN busy
/// while one stream waits on the storage host's fsync.
pub const UPLOAD_LANES: usize = 4;
/// Sealed blobs queued for upload (bounded: memory stays flat under backpressure).
const UPLOAD_QUEUE: usize = 16;

/// A session failed.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The connection or a stream failed.
    #[error(transparent)]
    Transfer(#[from] TransferError),
    /// The storage agent answered with an error.
    #[error("storage refused: {message} ({code})")]
    Refused {
        /// Error code.
        code: ErrorCode,
        /// What happened.
        message: String,
        /// Whether trying again may work.
        retryable: bool,
    },
    /// The storage agent answered something unexpected.
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl SessionError {
    /// Whether trying again may work.
    pub fn is_retryable(&self) -> bool {
        match self {
            SessionError::Transfer(e) => e.is_retryable(),
            SessionError::Refused { retryable, .. } => *retryable,
            SessionError::Protocol(_) => false,
        }
    }

    /// The storage agent's error code, when it refused.
    pub fn code(&self) -> Option<&ErrorCode> {
        match self {
            SessionError::Refused { code, .. } => Some(code),
            _ => None,
        }
    }
}

fn unexpected(resp: Response) -> SessionError {
    match resp {
        Response::Error {
            code,
            message,
            retryable,
        } => SessionError::Refused {
            code,
            message,
            retryable,
        },
        other => SessionError::Protocol(format!("unexpected answer {other:?}")),
    }
}

/// An open session with a storage agent.
#[derive(Debug)]
pub struct Session {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    /// The repository's id (keys the source's file cache).
    pub repo_id: String,
}

impl Session {
    /// Connects to `storage` at `addr` and presents the signed `task`.
    pub async fn open(
        endpoint: &TransferEndpoint,
        addr: SocketAddr,
        storage: &HostName,
        task: &[u8],
    ) -> Result<Session, SessionError> {
        let conn = endpoint.connect(addr, storage).await?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(TransferError::from)?;
        write_frame(
            &mut send,
            &Request::Hello {
                v: FRAME_VERSION,
                task: task.to_vec(),
            },
        )
        .await?;
        match read_frame::<Response>(&mut recv, MAX_FRAME).await? {
            Some(Response::Welcome { repo_id }) => Ok(Session {
                conn,
                send,
                recv,
                repo_id,
            }),
            Some(other) => Err(unexpected(other)),
            None => Err(SessionError::Protocol("storage closed the session".into())),
        }
    }

    async fn request(&mut self, req: &Request) -> Result<Response, SessionError> {
        write_frame(&mut self.send, req).await?;
        read_frame::<Response>(&mut self.recv, MAX_FRAME)
            .await?
            .ok_or_else(|| SessionError::Protocol("storage closed the control stream".into()))
    }

    /// The subset of `ids` the repository lacks.
    pub async fn missing(&mut self, ids: &[BlobId]) -> Result<Vec<BlobId>, SessionError> {
        let mut out = Vec::new();
        for batch in ids.chunks(MAX_IDS) {
            match self
                .request(&Request::Have {
                    ids: batch.to_vec(),
                })
                .await?
            {
                Response::Missing { ids } => out.extend(ids),
                other => return Err(unexpected(other)),
            }
        }
        Ok(out)
    }

    /// Commits a snapshot whose blobs are all stored.
    /// The storage host must answer with the id this source chose: another
    /// id would be reported as this backup's snapshot without being it.
    pub async fn commit(&mut self, snapshot: SnapshotRecord) -> Result<SnapshotId, SessionError> {
        let sent = snapshot.id.clone();
        match self.request(&Request::Commit { snapshot }).await? {
            Response::Committed { id } if id.as_str() == sent.as_str() => Ok(id),
            Response::Committed { id } => Err(SessionError::Protocol(format!(
                "the storage host answered the commit of snapshot {sent} with snapshot {id}"
            ))),
            other => Err(unexpected(other)),
        }
    }

    /// Looks up a snapshot by id or unique prefix.
    pub async fn snapshot(&mut self, id: &str) -> Result<SnapshotRecord, SessionError> {
        match self
            .request(&Request::GetSnapshot { id: id.into() })
            .await?
        {
            Response::Snapshot { snapshot } => Ok(snapshot),
            other => Err(unexpected(other)),
        }
    }

    /// Starts `lanes` upload streams fed from one bounded queue.
    pub fn uploader(&self, lanes: usize) -> Uploader {
        let (tx, rx) = mpsc::channel::<(BlobId, BlobKind, Vec<u8>)>(UPLOAD_QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        let mut tasks = JoinSet::new();
        for _ in 0..lanes.max(1) {
            let conn = self.conn.clone();
            let rx = rx.clone();
            tasks.spawn(async move {
                let (mut send, mut recv) = conn.open_bi().await.map_err(TransferError::from)?;
                loop {
                    // The lock is held only to take one item, not while sending it.
                    let next = rx.lock().await.recv().await;
                    let Some((id, kind, data)) = next else { break };
                    write_frame(&mut send, &Request::Put { id, kind, data }).await?;
                }
                send.finish()
                    .map_err(|e| SessionError::Protocol(e.to_string()))?;
                match read_frame::<Response>(&mut recv, MAX_FRAME).await? {
                    Some(Response::Stored { blobs, bytes }) => Ok((blobs, bytes)),
                    Some(other) => Err(unexpected(other)),
                    None => Err(SessionError::Protocol(
                        "upload stream closed without a receipt".into(),
                    )),
                }
            });
        }
        Uploader {
            tx: Some(tx),
            tasks,
        }
    }

    /// A handle for fetching blobs on streams of their own.
    pub fn fetcher(&self) -> Fetcher {
        Fetcher {
            conn: self.conn.clone(),
        }
    }

    /// Closes the connection politely.
    pub fn close(&self) {
        self.conn.close(0u32.into(), b"done");
    }
}

/// Parallel upload streams of one session.
#[derive(Debug)]
pub struct Uploader {
    tx: Option<mpsc::Sender<(BlobId, BlobKind, Vec<u8>)>>,
    tasks: JoinSet<Result<(u64, u64), SessionError>>,
}

impl Uploader {
    /// Queues a blob, waiting (blocking the thread) while the queue is full.
    /// For use on blocking threads only.
    pub fn put_blocking(
        &self,
        id: BlobId,
        kind: BlobKind,
        data: Vec<u8>,
    ) -> Result<(), StoreError> {
        let Some(tx) = &self.tx else {
            return Err(StoreError {
                message: "uploader already finished".into(),
                retryable: false,
            });
        };
        tx.blocking_send((id, kind, data)).map_err(|_| StoreError {
            message: "upload to the storage host failed; see the agent log".into(),
            retryable: true,
        })
    }

    /// Waits until every queued blob is stored durably; returns blobs and bytes.
    pub async fn finish(mut self) -> Result<(u64, u64), SessionError> {
        self.tx = None;
        let (mut blobs, mut bytes) = (0, 0);
        let mut first_error = None;
        while let Some(done) = self.tasks.join_next().await {
            match done {
                Ok(Ok((b, n))) => {
                    blobs += b;
                    bytes += n;
                }
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(e) => {
                    first_error
                        .get_or_insert(SessionError::Protocol(format!("upload lane crashed: {e}")));
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok((blobs, bytes)),
        }
    }
}

/// Fetches blobs, one stream per request.
#[derive(Debug, Clone)]
pub struct Fetcher {
    conn: quinn::Connection,
}

impl Fetcher {
    /// The sealed bytes of `ids`, in order.
    pub async fn get(&self, ids: &[BlobId]) -> Result<Vec<Vec<u8>>, SessionError> {
        let (mut send, mut recv) = self.conn.open_bi().await.map_err(TransferError::from)?;
        write_frame(&mut send, &Request::Get { ids: ids.to_vec() }).await?;
        send.finish()
            .map_err(|e| SessionError::Protocol(e.to_string()))?;
        let mut out = Vec::with_capacity(ids.len());
        for want in ids {
            match read_frame::<Response>(&mut recv, MAX_FRAME).await? {
                Some(Response::Blob { id, data, .. }) if id == *want => out.push(data),
                Some(Response::Blob { id, .. }) => {
                    return Err(SessionError::Protocol(format!(
                        "asked for blob {want:?}, got {id:?}"
                    )))
                }
                Some(other) => return Err(unexpected(other)),
                None => return Err(SessionError::Protocol("blob stream ended early".into())),
            }
        }
        Ok(out)
    }
}

/// [`Store`] over a session, for the backup engine on a blocking thread.
#[derive(Debug)]
pub struct BlockingStore {
    /// Runtime to run async requests on.
    pub handle: Handle,
    /// The session (control stream).
    pub session: Session,
    /// Its upload lanes.
    pub uploader: Uploader,
}

impl Store for BlockingStore {
    fn missing(&mut self, ids: &[BlobId]) -> Result<Vec<BlobId>, StoreError> {
        let session = &mut self.session;
        self.handle
            .block_on(session.missing(ids))
            .map_err(|e| StoreError {
                retryable: e.is_retryable(),
                message: e.to_string(),
            })
    }

    fn put(&mut self, id: BlobId, kind: BlobKind, sealed: Vec<u8>) -> Result<(), StoreError> {
        self.uploader.put_blocking(id, kind, sealed)
    }
}

/// Parallel fetch streams a restore keeps busy with prefetched batches.
const FETCH_LANES: usize = 4;
/// Longest wait for one prefetched batch.
const FETCH_WAIT: std::time::Duration = std::time::Duration::from_secs(120);
/// Most ids in one prefetch batch.
const PREFETCH_BATCH_IDS: usize = 128;
/// Most plaintext bytes in one prefetch batch.
const PREFETCH_BATCH_BYTES: u64 = 8 * 1024 * 1024;
/// Most bytes prefetched and not yet used: memory stays bounded however
/// large the directory.
const PREFETCH_BUDGET: u64 = 64 * 1024 * 1024;

type BatchResult = (Vec<BlobId>, Result<Vec<Vec<u8>>, SessionError>);

/// [`Fetch`] over a session, for the restore engine on a blocking thread.
///
/// It honours the engine's prefetch hints: batches of blobs go out on up to
/// [`FETCH_LANES`] streams at once while the engine writes files, so many
/// small files restore in parallel instead of one round trip each.
#[derive(Debug)]
pub struct BlockingFetch {
    handle: Handle,
    fetcher: Fetcher,
    ready: HashMap<BlobId, Vec<u8>>,
    pending: HashSet<BlobId>,
    queue: VecDeque<(Vec<BlobId>, u64)>,
    in_flight: usize,
    budget_used: u64,
    sizes: HashMap<BlobId, u64>,
    done_tx: std::sync::mpsc::Sender<BatchResult>,
    done_rx: std::sync::mpsc::Receiver<BatchResult>,
}

impl BlockingFetch {
    /// A fetcher running its requests on `handle`.
    pub fn new(handle: Handle, fetcher: Fetcher) -> Self {
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        Self {
            handle,
            fetcher,
            ready: HashMap::new(),
            pending: HashSet::new(),
            queue: VecDeque::new(),
            in_flight: 0,
            budget_used: 0,
            sizes: HashMap::new(),
            done_tx,
            done_rx,
        }
    }

    /// Starts queued batches while lanes are free.
    fn pump(&mut self) {
        while self.in_flight < FETCH_LANES {
            let Some((batch, _)) = self.queue.pop_front() else {
                return;
            };
            self.in_flight += 1;
            let fetcher = self.fetcher.clone();
            let tx = self.done_tx.clone();
            self.handle.spawn(async move {
                let result = fetcher.get(&batch).await;
                let _ = tx.send((batch, result));
            });
        }
    }

    /// Waits for one batch and files its blobs; a failed batch is simply
    /// forgotten (its blobs are fetched again on demand, which reports the error).
    fn settle_one(&mut self) -> bool {
        if self.in_flight == 0 {
            return false;
        }
        // Bounded wait: a fetch task that died without answering must not
        // hang the restore; its blobs are then fetched on demand.
        let Ok((batch, result)) = self.done_rx.recv_timeout(FETCH_WAIT) else {
            self.in_flight = 0;
            for id in std::mem::take(&mut self.pending) {
                self.release(&id);
            }
            return false;
        };
        self.in_flight -= 1;
        match result {
            Ok(blobs) => {
                for (id, data) in batch.into_iter().zip(blobs) {
                    if self.pending.remove(&id) {
                        self.ready.insert(id, data);
                    }
                }
            }
            Err(_) => {
                for id in batch {
                    if self.pending.remove(&id) {
                        self.release(&id);
                    }
                }
            }
        }
        self.pump();
        true
    }

    fn release(&mut self, id: &BlobId) {
        if let Some(size) = self.sizes.remove(id) {
            self.budget_used = self.budget_used.saturating_sub(size);
        }
    }
}

impl Fetch for BlockingFetch {
    fn get(&mut self, ids: &[BlobId]) -> Result<Vec<Vec<u8>>, FetchError> {
        // Wait for prefetched ones still on their way.
        while ids.iter().any(|id| self.pending.contains(id)) {
            if !self.settle_one() {
                break;
            }
        }
        let mut out: Vec<Option<Vec<u8>>> = ids.iter().map(|id| self.ready.remove(id)).collect();
        for id in ids {
            self.release(id);
        }
        let missing: Vec<BlobId> = ids
            .iter()
            .zip(&out)
            .filter(|(_, got)| got.is_none())
            .map(|(id, _)| *id)
            .collect();
        if !missing.is_empty() {
            let fetched = self
                .handle
                .block_on(self.fetcher.get(&missing))
                .map_err(|e| FetchError {
                    retryable: e.is_retryable(),
                    message: e.to_string(),
                })?;
            let mut fetched = fetched.into_iter();
            for slot in out.iter_mut().filter(|s| s.is_none()) {
                *slot = fetched.next();
            }
        }
        Ok(out.into_iter().map(Option::unwrap_or_default).collect())
    }

    fn prefetch(&mut self, soon: &[(BlobId, u32)]) {
        let mut batch = Vec::new();
        let mut batch_bytes = 0u64;
        for &(id, len) in soon {
            let size = u64::from(len).max(4096);
            if self.pending.contains(&id)
                || self.ready.contains_key(&id)
                || self.budget_used + size > PREFETCH_BUDGET
            {
                continue;
            }
            self.pending.insert(id);
            self.sizes.insert(id, size);
            self.budget_used += size;
            batch.push(id);
            batch_bytes += size;
            if batch.len() >= PREFETCH_BATCH_IDS || batch_bytes >= PREFETCH_BATCH_BYTES {
                self.queue
                    .push_back((std::mem::take(&mut batch), batch_bytes));
                batch_bytes = 0;
            }
        }
        if !batch.is_empty() {
            self.queue.push_back((batch, batch_bytes));
        }
        self.pump();
    }
}
