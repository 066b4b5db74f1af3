//! The read-only repository queries a storage agent answers on NATS
//! (`flotilla.repo.<host>.{snapshots,tree,stats}`): snapshot records without
//! their blob lists, sealed tree blobs, and counts. The coordinator lists and
//! browses snapshots through them; it opens what it gets with the fleet's
//! repository key, which this side never has. No file content is served.
//! Answers go only to `_INBOX.` reply subjects, at most 50 a second on
//! average (bursts of 200): a flood is dropped, not answered, and said in
//! the log once per 10 s.

use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_protocol::frame::RepoReply;
use flotilla_protocol::repo::{BlobId, BlobKind};
use flotilla_protocol::subject;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::throttle::{DropReport, RateLimit};
use super::Bus;
use crate::repository::Repository;

/// Queries answered a second, on average: far more than a person or the
/// daemon asks, far fewer than a flood that would starve the real askers.
const QUERY_RATE: f64 = 50.0;
/// Queries answered at once before the rate applies.
const QUERY_BURST: f64 = 200.0;
/// How often a storm of unanswered queries is said in the log.
const SAY_DROPPED_EVERY: Duration = Duration::from_secs(10);

/// Which query a request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Query {
    Snapshots,
    Tree,
    Stats,
}

/// Answers the read-only repository queries on NATS until `cancel` fires.
pub(crate) async fn serve(
    bus: Bus,
    repo: Arc<Repository>,
    cancel: CancellationToken,
) -> Result<(), async_nats::SubscribeError> {
    let client = bus.client;
    let host = &bus.host;
    let snaps = client.subscribe(subject::repo_snapshots(host)).await?;
    let trees = client.subscribe(subject::repo_tree(host)).await?;
    let stats = client.subscribe(subject::repo_stats(host)).await?;
    let mut limit = RateLimit::new(QUERY_RATE, QUERY_BURST);
    let mut report = DropReport::new(SAY_DROPPED_EVERY);
    let mut tick = tokio::time::interval(SAY_DROPPED_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let say = |dropped: u64| {
        warn!(
            dropped,
            "repository queries are coming faster than {QUERY_RATE}/s; the excess is not answered"
        )
    };
    let mut requests = futures::stream::select_all([
        snaps.map(|m| (Query::Snapshots, m)).boxed(),
        trees.map(|m| (Query::Tree, m)).boxed(),
        stats.map(|m| (Query::Stats, m)).boxed(),
    ]);
    loop {
        let (query, msg) = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tick.tick() => {
                if let Some(n) = report.on_tick(Instant::now()) {
                    say(n);
                }
                continue;
            }
            next = requests.next() => match next {
                Some(m) => m,
                None => return Ok(()),
            },
        };
        // Replies go only to request inboxes: a reply subject is chosen by
        // whoever asks, and the storage host must not be made to publish
        // its listings on any subject an asker names.
        let Some(reply) = msg.reply.filter(|r| r.starts_with("_INBOX.")) else {
            continue;
        };
        let now = Instant::now();
        if !limit.allow(now) {
            if let Some(n) = report.on_drop(now) {
                say(n);
            }
            continue;
        }
        let repo = repo.clone();
        let payload = msg.payload.clone();
        let answered = tokio::task::spawn_blocking(move || answer(&repo, query, &payload))
            .await
            .unwrap_or_else(|e| RepoReply::Error {
                message: format!("query crashed: {e}"),
            });
        let bytes = flotilla_protocol::encode(&answered).unwrap_or_default();
        if let Err(e) = client.publish(reply, bytes.into()).await {
            warn!(error = %e, "cannot answer repository query");
        }
    }
}

/// The reply to one query (blocking: it reads the repository).
fn answer(repo: &Repository, query: Query, payload: &[u8]) -> RepoReply {
    match query {
        Query::Stats => RepoReply::Stats {
            stats: repo.stats(),
        },
        // Without blob lists: a listing needs none, and they are most of a
        // record's size.
        Query::Snapshots => match repo.snapshots() {
            Ok(mut list) => {
                for s in &mut list {
                    s.blobs.clear();
                }
                RepoReply::Snapshots { snapshots: list }
            }
            Err(e) => RepoReply::Error {
                message: e.to_string(),
            },
        },
        Query::Tree => {
            let Ok(bytes) = <[u8; 32]>::try_from(payload) else {
                return RepoReply::Error {
                    message: "a tree request is a 32-byte blob id".into(),
                };
            };
            // Tree blobs only: data blobs are file content, sealed or not.
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo(dir: &std::path::Path) -> Repository {
        let repo = Repository::open_or_init(dir).expect("repository");
        let mut writer = repo.pack_writer();
        writer
            .add(BlobId([1; 32]), BlobKind::Tree, b"sealed tree")
            .expect("add");
        writer
            .add(BlobId([2; 32]), BlobKind::Data, b"sealed data")
            .expect("add");
        writer.finish().expect("finish");
        repo
    }

    #[test]
    fn a_tree_blob_is_served_and_a_data_blob_is_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let repo = repo(dir.path());
        assert_eq!(
            answer(&repo, Query::Tree, &[1; 32]),
            RepoReply::Tree {
                data: b"sealed tree".to_vec()
            }
        );
        assert_eq!(
            answer(&repo, Query::Tree, &[2; 32]),
            RepoReply::Error {
                message: "only tree blobs are served here".into()
            }
        );
    }

    #[test]
    fn a_tree_request_must_be_a_blob_id() {
        let dir = tempfile::tempdir().expect("tempdir");
        let repo = repo(dir.path());
        assert_eq!(
            answer(&repo, Query::Tree, b"short"),
            RepoReply::Error {
                message: "a tree request is a 32-byte blob id".into()
            }
        );
    }

    #[test]
    fn stats_and_an_empty_listing_are_answered() {
        let dir = tempfile::tempdir().expect("tempdir");
        let repo = repo(dir.path());
        let RepoReply::Stats { stats } = answer(&repo, Query::Stats, &[]) else {
            panic!("expected stats");
        };
        assert_eq!((stats.packs, stats.blobs, stats.snapshots), (1, 2, 0));
        assert_eq!(
            answer(&repo, Query::Snapshots, &[]),
            RepoReply::Snapshots { snapshots: vec![] }
        );
    }
}
