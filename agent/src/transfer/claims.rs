//! What the live data-plane sessions of a storage agent rely on.
//!
//! [`Claims`] is shared by the session server (which records) and the
//! `prune` task (which asks [`Claims::is_protected`]). It holds no
//! repository: each question that needs one is given it.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use flotilla_protocol::repo::BlobId;
use flotilla_protocol::TaskId;
use tracing::info;

use crate::repository::Repository;

/// Blobs that a live backup session has said it will upload, and those each
/// live session relies on.
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
    tasks: Mutex<HashMap<TaskId, (u64, quinn::Connection)>>,
    /// Blobs each live session relies on being kept: those a backup was told
    /// are present, those a restore reads. Prune leaves them alone.
    relied: Mutex<HashMap<u64, HashSet<BlobId>>>,
}

impl Claims {
    /// A new session's id.
    pub(super) fn session_id(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    /// Records that session `me` relies on `ids` staying in the repository.
    pub(super) fn rely(&self, me: u64, ids: impl IntoIterator<Item = BlobId>) {
        if let Ok(mut relied) = self.relied.lock() {
            relied.entry(me).or_default().extend(ids);
        }
    }

    /// Whether a live session uploads or relies on `id` (for prune). A
    /// poisoned lock protects everything: prune then deletes nothing live.
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
    pub(super) fn claim_missing(&self, repo: &Repository, ids: &[BlobId], me: u64) -> Vec<BlobId> {
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
    ///
    /// The claims are read first and released before the repository's index
    /// is asked: prune holds the index write lock while it asks
    /// [`Claims::is_protected`], so taking the index lock under `owners`
    /// would be the opposite order and could deadlock the two.
    pub(super) fn pending(&self, repo: &Repository, ids: &[BlobId], me: u64) -> usize {
        let others: Vec<BlobId> = match self.owners.lock() {
            Ok(owners) => ids
                .iter()
                .filter(|id| owners.get(id).is_some_and(|o| *o != me))
                .copied()
                .collect(),
            Err(_) => return 0,
        };
        repo.missing(&others).len()
    }

    /// Drops everything session `me` claimed or relied on (it ended).
    pub(super) fn release(&self, me: u64) {
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
    pub(super) fn supersede(&self, task_id: &TaskId, me: u64, conn: &quinn::Connection) {
        let old = self
            .tasks
            .lock()
            .ok()
            .and_then(|mut t| t.insert(task_id.clone(), (me, conn.clone())));
        if let Some((session, old_conn)) = old.filter(|(s, _)| *s != me) {
            info!(task = %task_id, "a resumed session supersedes an older one");
            old_conn.close(1u32.into(), b"superseded by a resumed session");
            if let Ok(mut owners) = self.owners.lock() {
                owners.retain(|_, owner| *owner != session);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use flotilla_protocol::repo::BlobKind;

    use super::*;

    fn id(b: u8) -> BlobId {
        BlobId([b; 32])
    }

    fn repo_with(dir: &std::path::Path, present: &[BlobId]) -> Repository {
        let repo = Repository::open_or_init(dir).expect("repository");
        let mut writer = repo.pack_writer();
        for id in present {
            writer.add(*id, BlobKind::Data, b"sealed").expect("add");
        }
        writer.finish().expect("finish");
        repo
    }

    #[test]
    fn each_missing_blob_is_claimed_by_one_session_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let repo = repo_with(dir.path(), &[id(1)]);
        let claims = Claims::default();
        let (a, b) = (claims.session_id(), claims.session_id());
        assert_ne!(a, b);
        let wanted = [id(1), id(2), id(3)];
        assert_eq!(claims.claim_missing(&repo, &wanted, a), vec![id(2), id(3)]);
        // The second session is told to send nothing: a uploads those.
        assert_eq!(
            claims.claim_missing(&repo, &wanted, b),
            Vec::<BlobId>::new()
        );
        // Its commit waits for a's two blobs; a itself waits for nobody.
        assert_eq!(claims.pending(&repo, &wanted, b), 2);
        assert_eq!(claims.pending(&repo, &wanted, a), 0);
        // Asking again, a keeps its claims.
        assert_eq!(claims.claim_missing(&repo, &[id(2)], a), vec![id(2)]);
    }

    #[test]
    fn a_released_claim_goes_to_the_next_session() {
        let dir = tempfile::tempdir().expect("tempdir");
        let repo = repo_with(dir.path(), &[]);
        let claims = Claims::default();
        let (a, b) = (claims.session_id(), claims.session_id());
        assert_eq!(claims.claim_missing(&repo, &[id(5)], a), vec![id(5)]);
        claims.release(a);
        assert_eq!(claims.pending(&repo, &[id(5)], b), 0);
        assert_eq!(claims.claim_missing(&repo, &[id(5)], b), vec![id(5)]);
    }

    #[test]
    fn blobs_relied_on_or_claimed_are_protected_until_the_session_ends() {
        let dir = tempfile::tempdir().expect("tempdir");
        let repo = repo_with(dir.path(), &[id(1)]);
        let claims = Claims::default();
        let backup = claims.session_id();
        let restore = claims.session_id();
        // A backup told id(1) exists relies on it; it claims id(2).
        claims.claim_missing(&repo, &[id(1), id(2)], backup);
        // A restore reads id(3).
        claims.rely(restore, [id(3)]);
        for b in [1, 2, 3] {
            assert!(claims.is_protected(&id(b)), "blob {b}");
        }
        assert!(!claims.is_protected(&id(4)));
        claims.release(backup);
        assert!(!claims.is_protected(&id(1)));
        assert!(!claims.is_protected(&id(2)));
        assert!(claims.is_protected(&id(3)));
        claims.release(restore);
        assert!(!claims.is_protected(&id(3)));
    }
}
