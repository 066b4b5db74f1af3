//! Operations on the fleet that both the `flotilla` commands and the daemon
//! (`flotilla serve`) perform: finding a storage host's address, opening the
//! repository key, asking storage hosts about their repositories (snapshot
//! lists, trees, which files a set of blobs reaches), and deciding which
//! snapshots a keep policy forgets.
//!
//! They take plain values (a [`Fleet`], a [`Nats`] connection) and print
//! nothing: what a person is told is the caller's business.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use chrono::{Local, TimeZone};
use flotilla_protocol::frame::RepoReply;
use flotilla_protocol::repo::{BlobId, RepoKey, SnapshotMeta, SnapshotRecord, Tree};
use flotilla_protocol::{subject, HostName, Role, SnapshotId};

use crate::config::{Config, ConfigIssue};
use crate::error::{request_err, CliError};
use crate::fleet::Fleet;
use crate::nats::Nats;
use crate::retention::{KeepPolicy, Verdict};

/// How long a storage agent gets to answer a query.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// Files [`affected_files`] names per snapshot.
const MAX_FILES_PER_SNAPSHOT: usize = 100;

/// A snapshot with its storage host and opened metadata.
#[derive(Debug, Clone)]
pub(crate) struct Found {
    pub storage: HostName,
    pub record: SnapshotRecord,
    pub meta: Option<SnapshotMeta>,
}

/// The storage host's QUIC address, from its heartbeat; it must be online.
pub(crate) async fn storage_addr(nats: &Nats, storage: &HostName) -> Result<SocketAddr, CliError> {
    let record = nats
        .host(storage)
        .await?
        .ok_or_else(|| CliError::HostUnknown(storage.to_string()))?;
    if !record.heartbeat.roles.contains(&Role::Storage) {
        return Err(CliError::Usage(format!(
            "host {storage} keeps no repository (start its agent with --storage DIR --listen ADDR:PORT)"
        )));
    }
    if record.offline_reason(crate::now_ms()).is_some() {
        return Err(CliError::HostOffline {
            host: storage.to_string(),
            task_id: None,
            waited_secs: 0,
        });
    }
    record.heartbeat.quic_addr.ok_or_else(|| {
        CliError::Usage(format!("storage host {storage} serves no QUIC address (start its agent with --listen ADDR:PORT)"))
    })
}

/// The fleet's repository key (`FLEET/repo.key`).
pub(crate) fn repo_key(fleet: &Fleet) -> Result<RepoKey, CliError> {
    let path = fleet.dir.join("repo.key");
    let text = std::fs::read_to_string(&path).map_err(|source| CliError::Io {
        path: path.clone(),
        source,
    })?;
    RepoKey::from_hex(&text)
        .ok_or_else(|| CliError::Usage(format!("{} is not a 64-hex-digit key", path.display())))
}

/// Whether `host` was enrolled in the fleet in `dir` (its certificate was
/// issued: `DIR/hosts/HOST.crt`, as `Fleet::enroll` writes it).
pub(crate) fn enrolled(dir: &Path, host: &HostName) -> bool {
    dir.join("hosts").join(format!("{host}.crt")).is_file()
}

/// What `config check` warns about beyond mistakes: hosts never enrolled,
/// when a fleet directory with its enrollment records is at hand (none, one
/// that does not load, or a copy without `hosts/` as a daemon's may be: no
/// warnings, since nothing can be said).
pub(crate) fn config_warnings(config: &Config, fleet_dir: Option<&Path>) -> Vec<ConfigIssue> {
    match fleet_dir {
        Some(dir) if dir.join("hosts").is_dir() && Fleet::load(dir).is_ok() => {
            config.unenrolled(|h| enrolled(dir, h))
        }
        _ => Vec::new(),
    }
}

/// Storage hosts to ask: the one named, or every host with the storage role.
pub(crate) async fn storages(
    nats: &Nats,
    to: Option<&HostName>,
) -> Result<Vec<HostName>, CliError> {
    if let Some(h) = to {
        return Ok(vec![h.clone()]);
    }
    Ok(nats
        .hosts()
        .await?
        .into_iter()
        .filter(|r| r.heartbeat.roles.contains(&Role::Storage))
        .map(|r| r.heartbeat.host)
        .collect())
}

/// Asks `storage` one repository query and decodes its answer.
pub(crate) async fn query(
    nats: &Nats,
    subject: String,
    payload: Vec<u8>,
    storage: &HostName,
) -> Result<RepoReply, CliError> {
    let ask = nats.client.request(subject, payload.into());
    let msg = tokio::time::timeout(QUERY_TIMEOUT, ask)
        .await
        .map_err(|_| CliError::Request {
            what: format!("ask storage host {storage}"),
            why: "no answer (is its agent online?)".into(),
        })?
        .map_err(request_err(&format!("ask storage host {storage}")))?;
    flotilla_protocol::decode::<RepoReply>(&msg.payload, 64 * 1024 * 1024)
        .map_err(request_err(&format!("read the answer of {storage}")))
}

/// Every snapshot on the given storage hosts, oldest first.
pub(crate) async fn list(
    nats: &Nats,
    key: &RepoKey,
    to: Option<&HostName>,
) -> Result<Vec<Found>, CliError> {
    let mut out = Vec::new();
    for storage in storages(nats, to).await? {
        match query(
            nats,
            subject::repo_snapshots(&storage),
            Vec::new(),
            &storage,
        )
        .await?
        {
            RepoReply::Snapshots { snapshots } => {
                // A storage host holds each snapshot once (one file per id):
                // a reply naming an id twice is not believed twice, or a
                // repeated record would fill a keep-last policy with copies.
                let mut seen = std::collections::HashSet::new();
                let before = snapshots.len();
                out.extend(
                    snapshots
                        .into_iter()
                        .filter(|record| seen.insert(record.id.clone()))
                        .map(|record| Found {
                            meta: record.open_meta(key),
                            storage: storage.clone(),
                            record,
                        }),
                );
                if seen.len() < before {
                    tracing::warn!(%storage, repeated = before - seen.len(), "the snapshot listing repeated ids; each is counted once");
                }
            }
            RepoReply::Error { message } => {
                return Err(CliError::Request {
                    what: format!("list snapshots on {storage}"),
                    why: message,
                })
            }
            RepoReply::Tree { .. } | RepoReply::Stats { .. } => {}
        }
    }
    out.sort_by_key(|f| f.record.time);
    Ok(out)
}

/// Fetches and opens one tree from `storage`.
pub(crate) async fn tree(
    nats: &Nats,
    key: &RepoKey,
    storage: &HostName,
    id: &BlobId,
) -> Result<Tree, CliError> {
    match query(nats, subject::repo_tree(storage), id.0.to_vec(), storage).await? {
        RepoReply::Tree { data } => {
            let plain = key
                .open(id, &data)
                .map_err(request_err(&format!("open tree {id:?}")))?;
            rmp_serde::from_slice(&plain).map_err(request_err(&format!("read tree {id:?}")))
        }
        RepoReply::Error { message } => Err(CliError::Request {
            what: format!("fetch tree {id:?}"),
            why: message,
        }),
        RepoReply::Snapshots { .. } | RepoReply::Stats { .. } => Err(CliError::Request {
            what: format!("fetch tree {id:?}"),
            why: "unexpected answer".into(),
        }),
    }
}

/// Where a walk finds trees: a storage host ([`RemoteTrees`]), or a map in
/// tests.
pub(crate) trait Trees {
    /// The tree `id`, opened.
    async fn get(&self, id: &BlobId) -> Result<Tree, CliError>;
}

/// The trees of one storage host's repository, fetched with [`tree`].
pub(crate) struct RemoteTrees<'a> {
    pub nats: &'a Nats,
    pub key: &'a RepoKey,
    pub storage: &'a HostName,
}

impl Trees for RemoteTrees<'_> {
    async fn get(&self, id: &BlobId) -> Result<Tree, CliError> {
        tree(self.nats, self.key, self.storage, id).await
    }
}

/// (snapshot id, path) of every file of the snapshots `among` on `storage`
/// whose content uses one of `blobs`, and of every directory whose listing
/// (tree) is one of them: what damaged or lost blobs reach. Only key holders
/// can tell, so `check` and `repair` work it out here from the snapshots'
/// trees; at most 100 files per snapshot.
pub(crate) async fn affected_files(
    nats: &Nats,
    key: &RepoKey,
    storage: &HostName,
    blobs: &HashSet<BlobId>,
    among: &[impl AsRef<str>],
) -> Result<Vec<(String, String)>, CliError> {
    let trees = RemoteTrees { nats, key, storage };
    let mut out = Vec::new();
    for snap in list(nats, key, Some(storage))
        .await?
        .iter()
        .filter(|f| among.iter().any(|s| s.as_ref() == f.record.id))
    {
        let paths = files_using(&trees, snap.record.tree, blobs, MAX_FILES_PER_SNAPSHOT).await;
        out.extend(paths.into_iter().map(|p| (snap.record.id.clone(), p)));
    }
    Ok(out)
}

/// The paths below the tree `root` that use one of `blobs`: files whose
/// content does (at most `max_files` of them), and `DIR/ (directory
/// listing)` for a directory whose tree is one of them (what was below it
/// cannot be read). A tree that cannot be fetched for another reason is
/// passed over: this names what is known to be hit, not what is unknown.
async fn files_using(
    trees: &impl Trees,
    root: BlobId,
    blobs: &HashSet<BlobId>,
    max_files: usize,
) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![(root, String::new())];
    let mut listed = 0;
    while let Some((id, prefix)) = stack.pop() {
        if blobs.contains(&id) {
            out.push(format!("{prefix}/ (directory listing)"));
            continue;
        }
        let Ok(t) = trees.get(&id).await else {
            continue;
        };
        for node in t.nodes {
            let name = String::from_utf8_lossy(&node.name);
            let path = if name.starts_with('/') {
                name.into_owned()
            } else {
                format!("{prefix}/{name}")
            };
            if node.content.iter().any(|c| blobs.contains(&c.id)) && listed < max_files {
                listed += 1;
                out.push(path.clone());
            }
            if let Some(sub) = node.subtree {
                stack.push((sub, path));
            }
        }
    }
    out
}

/// The verdicts for every snapshot on `to` (or all storages) of `host`
/// (or all hosts), grouped by storage, host and paths.
pub(crate) async fn decide(
    nats: &Nats,
    key: &RepoKey,
    policy: &KeepPolicy,
    host: Option<&HostName>,
    to: Option<&HostName>,
) -> Result<Vec<(Found, Verdict)>, CliError> {
    let found = list(nats, key, to).await?;
    let mut groups: BTreeMap<(String, String, Vec<String>), Vec<Found>> = BTreeMap::new();
    for f in found
        .into_iter()
        .filter(|f| host.is_none_or(|h| &f.record.host == h))
    {
        // Only snapshots whose record matches its sealed metadata take part:
        // a forged or tampered listing must not steer what is forgotten.
        if f.record.verify(key).is_err() {
            continue;
        }
        let paths = f.meta.as_ref().map(|m| m.paths.clone()).unwrap_or_default();
        groups
            .entry((f.storage.to_string(), f.record.host.to_string(), paths))
            .or_default()
            .push(f);
    }
    let now = Local::now();
    let mut out = Vec::new();
    for (_, group) in groups {
        let times: Vec<(String, chrono::DateTime<Local>)> = group
            .iter()
            .map(|f| {
                let t = Local
                    .timestamp_millis_opt(f.record.time as i64)
                    .single()
                    .unwrap_or(now);
                (f.record.id.clone(), t)
            })
            .collect();
        for v in policy.apply(&times, &now) {
            if let Some(f) = group.iter().find(|f| f.record.id == v.id) {
                out.push((f.clone(), v));
            }
        }
    }
    Ok(out)
}

/// The snapshots `verdicts` drop, by storage host: what each storage's
/// `forget` task names. The ids come from the storage hosts' listings, so
/// each is checked before it goes into a signed task.
pub(crate) fn doomed(
    verdicts: &[(Found, Verdict)],
) -> Result<BTreeMap<HostName, Vec<SnapshotId>>, CliError> {
    let mut by_storage: BTreeMap<HostName, Vec<SnapshotId>> = BTreeMap::new();
    for (f, _) in verdicts.iter().filter(|(_, v)| !v.keep) {
        let id = f.record.snapshot_id().map_err(|e| CliError::Request {
            what: format!("forget snapshots on {}", f.storage),
            why: e.to_string(),
        })?;
        by_storage.entry(f.storage.clone()).or_default().push(id);
    }
    Ok(by_storage)
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::HashMap;

    use flotilla_protocol::repo::{ChunkRef, Node, NodeKind};

    use super::*;

    /// A file whose content is the blobs `chunks`, or a directory whose
    /// tree is `subtree`.
    pub(crate) fn node(name: &str, chunks: &[u8], subtree: Option<u8>) -> Node {
        Node {
            name: name.as_bytes().to_vec(),
            kind: if subtree.is_some() {
                NodeKind::Dir
            } else {
                NodeKind::File
            },
            mode: 0o644,
            uid: 0,
            gid: 0,
            user: None,
            group: None,
            mtime_ns: 0,
            atime_ns: 0,
            ctime_ns: 0,
            size: 1,
            inode: 0,
            dev: 0,
            nlink: 1,
            rdev: 0,
            link_target: None,
            content: chunks
                .iter()
                .map(|&b| ChunkRef {
                    id: BlobId([b; 32]),
                    len: 1,
                })
                .collect(),
            sparse: false,
            subtree: subtree.map(|b| BlobId([b; 32])),
            xattrs: Vec::new(),
        }
    }

    struct Map(HashMap<BlobId, Vec<Node>>);

    impl Trees for Map {
        async fn get(&self, id: &BlobId) -> Result<Tree, CliError> {
            let nodes = self.0.get(id).cloned().ok_or_else(|| CliError::Request {
                what: "fetch tree".into(),
                why: "missing".into(),
            })?;
            Ok(Tree { v: 1, nodes })
        }
    }

    fn blobs(ids: &[u8]) -> HashSet<BlobId> {
        ids.iter().map(|&b| BlobId([b; 32])).collect()
    }

    /// Root tree 1 holds the backed-up path /srv (tree 2): a.bin (blobs 10,
    /// 11), b.bin (blob 12), sub/ (tree 3: c.bin, blob 10 again) and gone/
    /// (tree 4, which no storage delivers).
    fn snapshot() -> Map {
        Map(HashMap::from([
            (BlobId([1; 32]), vec![node("/srv", &[], Some(2))]),
            (
                BlobId([2; 32]),
                vec![
                    node("a.bin", &[10, 11], None),
                    node("b.bin", &[12], None),
                    node("sub", &[], Some(3)),
                    node("gone", &[], Some(4)),
                ],
            ),
            (BlobId([3; 32]), vec![node("c.bin", &[10], None)]),
        ]))
    }

    async fn hit(blob_ids: &[u8], max_files: usize) -> Vec<String> {
        let mut paths =
            files_using(&snapshot(), BlobId([1; 32]), &blobs(blob_ids), max_files).await;
        paths.sort();
        paths
    }

    #[tokio::test]
    async fn the_files_using_a_blob_are_named_wherever_they_are() {
        assert_eq!(hit(&[10], 100).await, ["/srv/a.bin", "/srv/sub/c.bin"]);
        assert_eq!(hit(&[12], 100).await, ["/srv/b.bin"]);
        assert!(
            hit(&[99], 100).await.is_empty(),
            "an unused blob hits nothing"
        );
        // A tree among the blobs: what was below it cannot be listed.
        assert_eq!(hit(&[3], 100).await, ["/srv/sub/ (directory listing)"]);
        assert_eq!(hit(&[1], 100).await, ["/ (directory listing)"]);
        // At most `max_files` files; a directory listing is always named.
        assert_eq!(hit(&[10, 12, 3], 1).await.len(), 2);
    }

    #[test]
    fn enrolled_means_a_certificate_was_issued() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let alpha = HostName::new("alpha").expect("valid");
        assert!(!enrolled(dir.path(), &alpha));
        std::fs::create_dir_all(dir.path().join("hosts")).expect("mkdir");
        std::fs::write(dir.path().join("hosts/alpha.crt"), "pem").expect("write");
        assert!(enrolled(dir.path(), &alpha));
        assert!(!enrolled(
            dir.path(),
            &HostName::new("beta").expect("valid")
        ));
    }

    #[test]
    fn config_warnings_need_a_fleet_that_loads() {
        let config = Config::parse("[[plan]]\nname = \"p\"\nhosts = [\"alpha\"]\nto = \"nas\"\n")
            .expect("valid");
        let empty = tempfile::tempdir().expect("temporary directory");
        // No fleet at hand, or a directory that is no fleet: nothing to say.
        assert!(config_warnings(&config, None).is_empty());
        assert!(config_warnings(&config, Some(empty.path())).is_empty());
        // A fleet copied without its enrollment records says nothing either.
        let bare = tempfile::tempdir().expect("temporary directory");
        let bare_dir = bare.path().join("fleet");
        Fleet::init(&bare_dir, "nats://127.0.0.1:4222", false).expect("init");
        let _ = std::fs::remove_dir_all(bare_dir.join("hosts"));
        assert!(config_warnings(&config, Some(&bare_dir)).is_empty());

        let dir = tempfile::tempdir().expect("temporary directory");
        let fleet_dir = dir.path().join("fleet");
        let fleet = Fleet::init(&fleet_dir, "nats://127.0.0.1:4222", false).expect("init");
        let alpha = HostName::new("alpha").expect("valid");
        fleet
            .enroll(&alpha, &dir.path().join("alpha.toml"), None, true, false)
            .expect("enroll");
        let warnings = config_warnings(&config, Some(&fleet_dir));
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert_eq!(warnings[0].line, Some(4), "{warnings:?}");
        assert!(warnings[0].message.contains("host nas"), "{warnings:?}");
    }
}
