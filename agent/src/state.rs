//! The agent's own durable state, in sled, behind a small interface.
//!
//! Today that is the task journal: every task the agent accepted, keyed by task
//! id, with the stream message it came in and how far it got. The journal makes
//! tasks idempotent (a redelivered message is recognised), refuses replays (the
//! same id in a different message), and lets an agent resume unfinished tasks
//! after a crash or reboot.
//!
//! Every value carries a version ([`JOURNAL_VERSION`]); the database as a whole
//! carries [`STATE_FORMAT`] in its `meta` tree, and an agent refuses to open a
//! state directory written by a newer format.
//!
//! The `meta` tree also holds the state's [`Epoch`]: a random number made
//! when the state was created. Heartbeats carry it and the coordinator
//! stamps it into tasks, so a task issued for an earlier state (one captured
//! from the bus before the state directory was wiped, which the new,
//! empty journal cannot recognise as a replay) is refused.
//!
//! Beside the database, `files/` holds the file cache of each repository the
//! agent backs up into ([`files`]): one file each, read and written whole.

mod files;

use std::path::{Path, PathBuf};

use flotilla_protocol::{TaskId, UnixMillis};

use crate::engine::{CachedFile, RootRecord};
pub use files::MapFileCache;
use serde::{Deserialize, Serialize};

/// Version of the state database layout.
pub const STATE_FORMAT: u16 = 1;
/// Version of [`JournalEntry`] values.
pub const JOURNAL_VERSION: u16 = 1;
/// Version of the [`Epoch`] value.
pub const EPOCH_VERSION: u16 = 1;
/// Key of the newest signed revocation list in the `meta` tree.
const REVOKED_KEY: &str = "revoked";
/// Key of the [`Epoch`] in the `meta` tree.
const EPOCH_KEY: &str = "epoch";

/// The agent's state database.
#[derive(Debug, Clone)]
pub struct State {
    db: sled::Db,
    journal: sled::Tree,
    files_dir: PathBuf,
    epoch: Epoch,
}

/// Which state this is: made once, when the state is created, and kept for
/// its whole life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Epoch {
    /// Value version, [`EPOCH_VERSION`].
    pub v: u16,
    /// Random; a new one means a new state (and an empty journal).
    pub epoch: u64,
    /// When it was made. A state from before epochs gets one when it is
    /// first opened by an agent that knows them, made then.
    pub created_at: UnixMillis,
}

/// One task in the journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalEntry {
    /// Value version, [`JOURNAL_VERSION`].
    pub v: u16,
    /// Task id.
    pub task_id: TaskId,
    /// Task kind name.
    pub kind: String,
    /// Stream sequence of the message that brought it; a different sequence
    /// for a known id is a replay.
    pub stream_seq: u64,
    /// How far it got.
    pub status: JobStatus,
    /// When the agent accepted it.
    pub received_at: UnixMillis,
    /// Last status change.
    pub updated_at: UnixMillis,
    /// The signed envelope, kept so the task can be resumed after a restart.
    #[serde(with = "serde_bytes")]
    pub envelope: Vec<u8>,
    /// Error of a failed task.
    pub error: Option<String>,
}

/// Where a journalled task stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    /// Accepted and acknowledged, not started.
    Received,
    /// Started; if found at startup, the agent died while running it.
    Running,
    /// Finished well.
    Succeeded,
    /// Finished with some items skipped.
    Partial,
    /// Finished badly.
    Failed,
    /// Stopped on request.
    Cancelled,
}

impl JobStatus {
    /// Whether the task has reached an end: it is never run again, neither
    /// resumed at startup nor on a redelivery, and may be pruned. Cancelled is
    /// an end like the others (a cancelled task that resumed would commit
    /// what its user stopped, with a second `task.finished`).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded | JobStatus::Partial | JobStatus::Failed | JobStatus::Cancelled
        )
    }
}

/// What [`State::accept`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accepted {
    /// First time this id is seen: journalled.
    New,
    /// The same message again (redelivery); the stored entry.
    Redelivered(JournalEntry),
    /// The same id in another message: a replay.
    Replayed(JournalEntry),
}

/// The state database could not be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// sled failed (disk full, I/O error, corruption).
    #[error("state database: {0}")]
    Db(#[from] sled::Error),
    /// A stored value could not be decoded.
    #[error("state database holds an unreadable value for {key}: {why}")]
    Corrupt {
        /// Key of the value.
        key: String,
        /// Why.
        why: String,
    },
    /// A file beside the database (the file cache) could not be written.
    #[error("state directory: {0}")]
    Io(std::io::Error),
    /// The database was written by a newer agent.
    #[error("state directory was written by a newer agent (format {0}, this build reads {STATE_FORMAT}); upgrade the agent or use another --state-dir")]
    Newer(u16),
}

impl StateError {
    /// Whether trying again may succeed (I/O can recover; corruption cannot).
    pub fn is_retryable(&self) -> bool {
        matches!(self, StateError::Db(sled::Error::Io(_)) | StateError::Io(_))
    }
}

impl State {
    /// Opens (or creates) the state database under `dir`.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        let db = sled::Config::new()
            .path(dir.join("state.sled"))
            // The agent must stay small when idle; the journal is tiny.
            .cache_capacity(4 * 1024 * 1024)
            .flush_every_ms(Some(1000))
            .open()?;
        let meta = db.open_tree("meta")?;
        match meta.get("format")? {
            Some(v) => {
                let found =
                    u16::from_be_bytes(v.as_ref().try_into().map_err(|_| StateError::Corrupt {
                        key: "meta/format".into(),
                        why: "not two bytes".into(),
                    })?);
                if found > STATE_FORMAT {
                    return Err(StateError::Newer(found));
                }
            }
            None => {
                meta.insert("format", &STATE_FORMAT.to_be_bytes())?;
            }
        }
        let epoch = match meta.get(EPOCH_KEY)? {
            Some(bytes) => decode_epoch(&bytes)?,
            None => {
                let epoch = Epoch {
                    v: EPOCH_VERSION,
                    epoch: random_u64()?,
                    created_at: crate::now_ms(),
                };
                meta.insert(EPOCH_KEY, encode(&epoch))?;
                // Durable before any heartbeat announces it.
                db.flush()?;
                epoch
            }
        };
        let journal = db.open_tree("journal")?;
        // File caches of earlier versions lived in sled trees; they are
        // simply dropped (the next backup reads every file once).
        for name in db.tree_names() {
            if name.starts_with(b"files/") {
                db.drop_tree(name)?;
            }
        }
        Ok(Self {
            db,
            journal,
            files_dir: dir.join("files"),
            epoch,
        })
    }

    /// This state's epoch.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// The newest signed revocation list this agent has believed, as
    /// received (verified again by whoever reads it).
    pub fn revocations(&self) -> Result<Option<Vec<u8>>, StateError> {
        Ok(self
            .db
            .open_tree("meta")?
            .get(REVOKED_KEY)?
            .map(|v| v.to_vec()))
    }

    /// Keeps `signed` as the newest revocation list, durably: an agent
    /// restarted without the bus still refuses revoked peers.
    pub fn store_revocations(&self, signed: &[u8]) -> Result<(), StateError> {
        self.db.open_tree("meta")?.insert(REVOKED_KEY, signed)?;
        self.db.flush()?;
        Ok(())
    }

    /// Journals a newly received task, unless its id is known, and makes it
    /// durable before returning (the caller acknowledges the message after).
    pub async fn accept(&self, entry: JournalEntry) -> Result<Accepted, StateError> {
        let value = encode(&entry);
        let cas = self.journal.compare_and_swap(
            entry.task_id.as_str().as_bytes(),
            None as Option<&[u8]>,
            Some(value),
        )?;
        match cas {
            Ok(()) => {
                self.db.flush_async().await?;
                Ok(Accepted::New)
            }
            Err(existing) => {
                let stored = match existing.current {
                    Some(bytes) => decode(entry.task_id.as_str(), &bytes)?,
                    None => {
                        return Err(StateError::Corrupt {
                            key: entry.task_id.into(),
                            why: "vanished during insert".into(),
                        })
                    }
                };
                if stored.stream_seq == entry.stream_seq {
                    Ok(Accepted::Redelivered(stored))
                } else {
                    Ok(Accepted::Replayed(stored))
                }
            }
        }
    }

    /// Records a status change of a journalled task, durably.
    pub async fn set_status(
        &self,
        task_id: &TaskId,
        status: JobStatus,
        error: Option<String>,
        now: UnixMillis,
    ) -> Result<(), StateError> {
        let Some(mut entry) = self.get(task_id)? else {
            return Err(StateError::Corrupt {
                key: task_id.to_string(),
                why: "status change for a task that is not journalled".into(),
            });
        };
        entry.status = status;
        entry.error = error;
        entry.updated_at = now;
        self.journal
            .insert(task_id.as_str().as_bytes(), encode(&entry))?;
        self.db.flush_async().await?;
        Ok(())
    }

    /// The journal entry of `task_id`.
    pub fn get(&self, task_id: &TaskId) -> Result<Option<JournalEntry>, StateError> {
        self.journal
            .get(task_id.as_str().as_bytes())?
            .map(|v| decode(task_id.as_str(), &v))
            .transpose()
    }

    /// Tasks that were accepted but never finished, oldest first.
    pub fn unfinished(&self) -> Result<Vec<JournalEntry>, StateError> {
        let mut out = Vec::new();
        for item in self.journal.iter() {
            let (key, value) = item?;
            let entry = decode(&String::from_utf8_lossy(&key), &value)?;
            if !entry.status.is_final() {
                out.push(entry);
            }
        }
        out.sort_by_key(|e| e.received_at);
        Ok(out)
    }

    /// Forgets finished tasks last changed before `cutoff`. Their ids can no
    /// longer be recognised as replays, but by then their signatures have expired.
    pub fn prune(&self, cutoff: UnixMillis) -> Result<usize, StateError> {
        let mut removed = 0;
        for item in self.journal.iter() {
            let (key, value) = item?;
            let entry = decode(&String::from_utf8_lossy(&key), &value)?;
            if entry.status.is_final() && entry.updated_at < cutoff {
                self.journal.remove(key)?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// The file cache of backups into repository `repo_id`, read whole (an
    /// unreadable one is empty: every file is read again).
    pub async fn file_cache(&self, repo_id: &str) -> MapFileCache {
        let path = files::cache_path(&self.files_dir, repo_id);
        tokio::task::spawn_blocking(move || files::load(&path))
            .await
            .unwrap_or_default()
    }

    /// Replaces the file cache of `repo_id` with what the last committed
    /// backup saw (its files, and its paths); files that are gone drop out.
    pub async fn replace_file_cache(
        &self,
        repo_id: &str,
        entries: Vec<(Vec<u8>, CachedFile)>,
        roots: Vec<(Vec<u8>, RootRecord)>,
    ) -> Result<(), StateError> {
        let path = files::cache_path(&self.files_dir, repo_id);
        tokio::task::spawn_blocking(move || files::store(&path, entries, roots))
            .await
            .map_err(|e| StateError::Io(std::io::Error::other(e)))?
            .map_err(StateError::Io)
    }

    /// Forgets the file cache of `repo_id` (when the repository lost blobs the
    /// cache points at).
    pub fn clear_file_cache(&self, repo_id: &str) -> Result<(), StateError> {
        files::remove(&files::cache_path(&self.files_dir, repo_id)).map_err(StateError::Io)
    }

    /// Writes everything to disk.
    pub async fn flush(&self) -> Result<(), StateError> {
        self.db.flush_async().await?;
        Ok(())
    }
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Structs of strings, integers and bytes always encode.
    flotilla_protocol::encode(value).unwrap_or_default()
}

fn decode_epoch(bytes: &[u8]) -> Result<Epoch, StateError> {
    let epoch: Epoch = rmp_serde::from_slice(bytes).map_err(|e| StateError::Corrupt {
        key: format!("meta/{EPOCH_KEY}"),
        why: e.to_string(),
    })?;
    if epoch.v > EPOCH_VERSION {
        return Err(StateError::Newer(epoch.v));
    }
    Ok(epoch)
}

/// A random epoch from the system's random source.
fn random_u64() -> Result<u64, StateError> {
    let rng = ring::rand::SystemRandom::new();
    let bytes: [u8; 8] = ring::rand::generate(&rng)
        .map_err(|_| StateError::Io(std::io::Error::other("the system's random source failed")))?
        .expose();
    Ok(u64::from_be_bytes(bytes))
}

fn decode(key: &str, bytes: &[u8]) -> Result<JournalEntry, StateError> {
    let entry: JournalEntry = rmp_serde::from_slice(bytes).map_err(|e| StateError::Corrupt {
        key: key.into(),
        why: e.to_string(),
    })?;
    if entry.v > JOURNAL_VERSION {
        return Err(StateError::Newer(entry.v));
    }
    Ok(entry)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tid(id: &str) -> TaskId {
        TaskId::new(id).expect("valid")
    }

    /// The ids `unfinished` hands back (what a restart would resume).
    fn unfinished_ids(state: &State) -> Vec<TaskId> {
        state
            .unfinished()
            .expect("ok")
            .into_iter()
            .map(|e| e.task_id)
            .collect()
    }

    fn entry(id: &str, seq: u64) -> JournalEntry {
        JournalEntry {
            v: JOURNAL_VERSION,
            task_id: tid(id),
            kind: "estimate".into(),
            stream_seq: seq,
            status: JobStatus::Received,
            received_at: 1,
            updated_at: 1,
            envelope: vec![1, 2, 3],
            error: None,
        }
    }

    #[tokio::test]
    async fn journal_tells_new_redelivered_and_replayed_apart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = State::open(dir.path()).expect("opens");
        assert_eq!(
            state.accept(entry("a", 7)).await.expect("ok"),
            Accepted::New
        );
        assert!(matches!(
            state.accept(entry("a", 7)).await.expect("ok"),
            Accepted::Redelivered(_)
        ));
        assert!(matches!(
            state.accept(entry("a", 8)).await.expect("ok"),
            Accepted::Replayed(_)
        ));
    }

    #[tokio::test]
    async fn unfinished_tasks_survive_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let state = State::open(dir.path()).expect("opens");
            state.accept(entry("a", 1)).await.expect("ok");
            state.accept(entry("b", 2)).await.expect("ok");
            state
                .set_status(&tid("b"), JobStatus::Succeeded, None, 5)
                .await
                .expect("ok");
        }
        let state = State::open(dir.path()).expect("reopens");
        assert_eq!(unfinished_ids(&state), vec![tid("a")]);
        assert_eq!(state.prune(10).expect("ok"), 1);
    }

    #[test]
    fn a_state_keeps_its_epoch_and_a_new_state_gets_another() {
        let dir = tempfile::tempdir().expect("tempdir");
        let before = crate::now_ms();
        let first = State::open(dir.path()).expect("opens").epoch();
        assert_eq!(first.v, EPOCH_VERSION);
        assert!(first.created_at >= before, "{first:?}");
        // Reopened (a restart): the same epoch.
        assert_eq!(State::open(dir.path()).expect("reopens").epoch(), first);
        // Wiped and created again (a reinstall): another one.
        std::fs::remove_dir_all(dir.path()).expect("wipe");
        let second = State::open(dir.path()).expect("recreates").epoch();
        assert_ne!(second.epoch, first.epoch);
        assert!(second.created_at >= first.created_at);
    }

    #[test]
    fn a_state_from_before_epochs_gets_one_and_a_newer_one_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(State::open(dir.path()).expect("opens"));
        {
            // As an agent that predates epochs left it: no epoch in meta.
            let db = sled::open(dir.path().join("state.sled")).expect("sled");
            let meta = db.open_tree("meta").expect("meta");
            meta.remove(EPOCH_KEY).expect("remove");
            db.flush().expect("flush");
        }
        let before = crate::now_ms();
        let given = State::open(dir.path()).expect("opens").epoch();
        assert!(given.created_at >= before, "made at this open: {given:?}");
        assert_eq!(State::open(dir.path()).expect("reopens").epoch(), given);
        {
            let db = sled::open(dir.path().join("state.sled")).expect("sled");
            let newer = Epoch {
                v: EPOCH_VERSION + 1,
                ..given
            };
            db.open_tree("meta")
                .expect("meta")
                .insert(EPOCH_KEY, encode(&newer))
                .expect("insert");
            db.flush().expect("flush");
        }
        assert!(matches!(
            State::open(dir.path()),
            Err(StateError::Newer(v)) if v == EPOCH_VERSION + 1
        ));
    }

    #[tokio::test]
    async fn cancelled_tasks_are_not_unfinished_and_are_pruned() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let state = State::open(dir.path()).expect("opens");
            state.accept(entry("c", 1)).await.expect("ok");
            state.accept(entry("r", 2)).await.expect("ok");
            state
                .set_status(&tid("c"), JobStatus::Running, None, 2)
                .await
                .expect("ok");
            state
                .set_status(&tid("c"), JobStatus::Cancelled, None, 3)
                .await
                .expect("ok");
            state
                .set_status(&tid("r"), JobStatus::Running, None, 3)
                .await
                .expect("ok");
        }
        // Across a reopen (a restart), the cancelled task is not handed back.
        let state = State::open(dir.path()).expect("reopens");
        assert_eq!(unfinished_ids(&state), vec![tid("r")]);
        assert_eq!(state.prune(10).expect("ok"), 1, "only the cancelled one");
        assert!(state.get(&tid("c")).expect("ok").is_none());
        assert!(state.get(&tid("r")).expect("ok").is_some());
    }
}
