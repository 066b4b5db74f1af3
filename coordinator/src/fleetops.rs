//! Operations on the fleet that both the `flotilla` commands and the daemon
//! (`flotilla serve`) perform: finding a storage host's address, opening the
//! repository key, asking storage hosts about their repositories (snapshot
//! lists, trees, which files a set of blobs reaches), and deciding which
//! snapshots a keep policy forgets.
//!
//! They take plain values (a [`Fleet`], a [`Nats`] connection) and print
//! nothing: what a person is told is the caller's business.

use std::collections::{BTreeMap, BTreeSet, HashSet};
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

/// The snapshots of the storage hosts that answered, and what is known of
/// the others.
#[derive(Debug, Clone, Default)]
pub(crate) struct Listing {
    /// Every snapshot listed (each id once per storage host), oldest first.
    pub found: Vec<Found>,
    /// Storage hosts that were not listed, and why (offline, no answer, an
    /// error): their snapshots are missing from `found`.
    pub unanswered: Vec<(HostName, String)>,
    /// Storage hosts whose listing is not to be acted on, and why: it
    /// repeated snapshot ids, or held records that fail verification
    /// against their sealed metadata. Shown, but retention leaves these
    /// storage hosts alone.
    pub doubtful: Vec<(HostName, String)>,
    /// Snapshot ids listed by more than one storage host with records that
    /// differ (a copy, `flotilla copy`, is the same record: same tree, host,
    /// time and sealed metadata; one of these is not). Retention keeps them
    /// wherever they are listed and decides on the rest; the storage hosts
    /// are not doubted for it, or one hostile host could stop retention on
    /// every honest one by repeating its records.
    pub contested: BTreeSet<String>,
}

/// Whether two storage hosts' records of one id are the same snapshot (one
/// a copy of the other): a copy moves the record unchanged.
fn same_record(a: &SnapshotRecord, b: &SnapshotRecord) -> bool {
    a.id == b.id
        && a.host == b.host
        && a.time == b.time
        && a.tree == b.tree
        && a.partial == b.partial
        && a.meta == b.meta
}

/// One snapshot of a listing with every storage host that holds it.
#[derive(Debug, Clone)]
pub(crate) struct Held {
    /// The first holder's record (by storage host name; the records are the
    /// same: a contested id is held once per storage host, never merged).
    pub found: Found,
    /// Every storage host listing it, the first one's first.
    pub storages: Vec<HostName>,
}

impl Listing {
    /// Whether retention may act on what `storage` listed.
    pub fn trusted(&self, storage: &HostName) -> bool {
        !self.doubtful.iter().any(|(s, _)| s == storage)
            && !self.unanswered.iter().any(|(s, _)| s == storage)
    }

    /// One line per storage host missing from or doubted in the listing,
    /// for stderr.
    pub fn warnings(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .unanswered
            .iter()
            .map(|(s, why)| {
                format!("storage host {s} was not listed ({why}); its snapshots are missing here")
            })
            .collect();
        out.extend(self.doubtful.iter().map(|(s, why)| {
            format!(
                "the listing of storage host {s} is not trusted: {why}; retention leaves it alone"
            )
        }));
        out
    }

    /// Each snapshot once, oldest first, with the storage hosts that hold it.
    pub fn held(&self) -> Vec<Held> {
        let mut out: Vec<Held> = Vec::new();
        let mut at: BTreeMap<&str, usize> = BTreeMap::new();
        for f in &self.found {
            // Different records under one id are not copies of each other:
            // each stays a row of its own (and `find` refuses the id).
            let copy = !self.contested.contains(&f.record.id);
            match at.get(f.record.id.as_str()).filter(|_| copy) {
                Some(&i) => out[i].storages.push(f.storage.clone()),
                None => {
                    at.insert(&f.record.id, out.len());
                    out.push(Held {
                        found: f.clone(),
                        storages: vec![f.storage.clone()],
                    });
                }
            }
        }
        out
    }
}

/// Merges what each storage host answered (its records, or why it did
/// not) into a [`Listing`]. Pure: the checks that make a listing doubtful
/// live here.
pub(crate) fn merge(
    answers: Vec<(HostName, Result<Vec<SnapshotRecord>, String>)>,
    key: &RepoKey,
) -> Listing {
    let mut listing = Listing::default();
    let mut owner: BTreeMap<String, (HostName, SnapshotRecord)> = BTreeMap::new();
    let mut doubts: BTreeMap<HostName, Vec<String>> = BTreeMap::new();
    for (storage, answer) in answers {
        let records = match answer {
            Ok(records) => records,
            Err(why) => {
                listing.unanswered.push((storage, why));
                continue;
            }
        };
        // A storage host holds each snapshot once (one file per id): a
        // reply naming an id twice is not believed twice (a repeated record
        // would fill a keep-last policy with copies of itself).
        let mut seen = HashSet::new();
        let before = records.len();
        let mut unverified = 0;
        for record in records {
            if !seen.insert(record.id.clone()) {
                continue;
            }
            let meta = match record.verify(key) {
                Ok(meta) => Some(meta),
                Err(_) => {
                    let meta = record.open_meta(key);
                    // Written before records were sealed to their meta
                    // (no tree, host or time inside): not tampering, but
                    // not something retention can check either.
                    let legacy = meta
                        .as_ref()
                        .is_some_and(|m| m.tree.is_none() && m.host.is_none() && m.time.is_none());
                    if !legacy {
                        unverified += 1;
                    }
                    meta
                }
            };
            match owner.get(&record.id) {
                Some((other, first)) if *other != storage && !same_record(first, &record) => {
                    listing.contested.insert(record.id.clone());
                }
                Some(_) => {}
                None => {
                    owner.insert(record.id.clone(), (storage.clone(), record.clone()));
                }
            }
            listing.found.push(Found {
                meta,
                storage: storage.clone(),
                record,
            });
        }
        if seen.len() < before {
            doubts.entry(storage.clone()).or_default().push(format!(
                "it repeated {} snapshot id(s)",
                before - seen.len()
            ));
        }
        if unverified > 0 {
            doubts.entry(storage).or_default().push(format!(
                "{unverified} record(s) do not match their sealed metadata"
            ));
        }
    }
    for (storage, mut why) in doubts {
        why.dedup();
        // The first few reasons say enough.
        let more = why.len().saturating_sub(3);
        why.truncate(3);
        if more > 0 {
            why.push(format!("and {more} more"));
        }
        listing.doubtful.push((storage, why.join("; ")));
    }
    listing.found.sort_by_key(|f| f.record.time);
    listing
}

/// What `storage` lists, or why it could not be listed.
async fn listing_of(nats: &Nats, storage: &HostName) -> Result<Vec<SnapshotRecord>, CliError> {
    match query(nats, subject::repo_snapshots(storage), Vec::new(), storage).await? {
        RepoReply::Snapshots { snapshots } => Ok(snapshots),
        RepoReply::Error { message } => Err(CliError::Request {
            what: format!("list snapshots on {storage}"),
            why: message,
        }),
        RepoReply::Tree { .. } | RepoReply::Stats { .. } => Err(CliError::Request {
            what: format!("list snapshots on {storage}"),
            why: "unexpected answer".into(),
        }),
    }
}

/// Every snapshot on `to`, or on every storage host that answers.
///
/// With `to`, a storage host that cannot be listed is an error. Without,
/// every host with the storage role is asked at once, except those the
/// registry already says are offline; the ones that are offline, do not
/// answer or answer an error are named in [`Listing::unanswered`] and the
/// rest is listed: one dead storage host does not stop the fleet reading
/// the others.
pub(crate) async fn list(
    nats: &Nats,
    key: &RepoKey,
    to: Option<&HostName>,
) -> Result<Listing, CliError> {
    if let Some(storage) = to {
        let records = listing_of(nats, storage).await?;
        return Ok(merge(vec![(storage.clone(), Ok(records))], key));
    }
    let now = crate::now_ms();
    let mut offline = Vec::new();
    let mut asked = Vec::new();
    for record in nats.hosts().await? {
        if !record.heartbeat.roles.contains(&Role::Storage) {
            continue;
        }
        let host = record.heartbeat.host.clone();
        match record.offline_reason(now) {
            Some(reason) => offline.push((host, Err(format!("offline: {reason}")))),
            None => asked.push(host),
        }
    }
    // A host listed twice (a forged health record under another key) is
    // asked once.
    let asked: BTreeSet<HostName> = asked.into_iter().collect();
    let answers = futures::future::join_all(asked.into_iter().map(|storage| async move {
        let answer = listing_of(nats, &storage).await.map_err(|e| e.to_string());
        (storage, answer)
    }))
    .await;
    let mut all = answers;
    all.extend(offline);
    all.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(merge(all, key))
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
        .found
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

/// What retention decided, and the storage hosts it left alone.
#[derive(Debug, Clone, Default)]
pub(crate) struct Decision {
    /// The verdict on every snapshot of the trusted storage hosts.
    pub verdicts: Vec<(Found, Verdict)>,
    /// The listing's storage hosts that were not listed or not trusted
    /// (nothing is forgotten there).
    pub left_alone: Listing,
}

/// The verdicts for every snapshot on `to` (or all storages) of `host`
/// (or all hosts), grouped by storage, host and paths. A storage host
/// whose listing is doubtful gets no verdicts at all (see [`merge`]), nor
/// does one that could not be listed.
pub(crate) async fn decide(
    nats: &Nats,
    key: &RepoKey,
    policy: &KeepPolicy,
    host: Option<&HostName>,
    to: Option<&HostName>,
) -> Result<Decision, CliError> {
    // Every storage host is asked even when one is named: a record that
    // another storage host also lists is only seen as contested that way.
    let mut listing = list(nats, key, None).await?;
    if let Some(to) = to {
        if !listing.found.iter().any(|f| &f.storage == to)
            && !listing.unanswered.iter().any(|(s, _)| s == to)
        {
            // Not a storage host the registry knows as such: ask it by name,
            // so that its silence is the error it was before.
            listing = list(nats, key, Some(to)).await?;
        }
        listing.unanswered.retain(|(s, _)| s == to);
        listing.doubtful.retain(|(s, _)| s == to);
    }
    let mut decided = verdicts(&listing, key, policy, host);
    if let Some(to) = to {
        decided.retain(|(f, _)| &f.storage == to);
    }
    Ok(Decision {
        verdicts: decided,
        left_alone: Listing {
            found: Vec::new(),
            ..listing
        },
    })
}

/// The verdicts of [`decide`] for a listing at hand.
pub(crate) fn verdicts(
    listing: &Listing,
    key: &RepoKey,
    policy: &KeepPolicy,
    host: Option<&HostName>,
) -> Vec<(Found, Verdict)> {
    let mut groups: BTreeMap<(String, String, Vec<String>), Vec<Found>> = BTreeMap::new();
    let mut out = Vec::new();
    for f in listing
        .found
        .iter()
        .filter(|f| listing.trusted(&f.storage))
        .filter(|f| host.is_none_or(|h| &f.record.host == h))
        .cloned()
    {
        // Kept, and out of the policy's count: a contested record must not
        // take a keep slot from the snapshots that are really there.
        if listing.contested.contains(&f.record.id) {
            let id = f.record.id.clone();
            out.push((
                f,
                Verdict {
                    id,
                    keep: true,
                    reasons: vec!["contested"],
                },
            ));
            continue;
        }
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
    out
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

    fn genuine(key: &RepoKey, n: u8, host: &str, time: u64) -> SnapshotRecord {
        let id = format!("{n:02x}").repeat(16);
        let tree = key.blob_id(&[n]);
        let meta = SnapshotMeta {
            v: flotilla_protocol::repo::REPO_FORMAT,
            paths: vec!["/srv".into()],
            excludes: Vec::new(),
            task_id: flotilla_protocol::TaskId::new("t-1").expect("valid"),
            summary: Default::default(),
            unreadable: Vec::new(),
            tree: Some(tree),
            host: Some(host.into()),
            time: Some(time),
        };
        let plain = rmp_serde::to_vec_named(&meta).expect("encodes");
        SnapshotRecord {
            v: flotilla_protocol::repo::REPO_FORMAT,
            meta: key
                .seal_meta(&SnapshotRecord::meta_context(&id), &plain)
                .expect("seals"),
            id,
            host: HostName::new(host).expect("valid"),
            time,
            tree,
            partial: false,
            blobs: vec![tree],
        }
    }

    fn h(name: &str) -> HostName {
        HostName::new(name).expect("valid")
    }

    #[test]
    fn a_dead_storage_host_is_named_and_the_others_listed() {
        let key = RepoKey::from_master(&[7; 32]);
        let listing = merge(
            vec![
                (
                    h("nas"),
                    Ok(vec![
                        genuine(&key, 2, "alpha", 20),
                        genuine(&key, 1, "alpha", 10),
                    ]),
                ),
                (h("nas2"), Err("offline: missed heartbeats".into())),
            ],
            &key,
        );
        let ids: Vec<&str> = listing.found.iter().map(|f| f.record.id.as_str()).collect();
        assert_eq!(ids, ["01".repeat(16), "02".repeat(16)], "oldest first");
        assert_eq!(
            listing.unanswered,
            [(h("nas2"), "offline: missed heartbeats".to_owned())]
        );
        assert!(listing.doubtful.is_empty());
        assert!(listing.trusted(&h("nas")) && !listing.trusted(&h("nas2")));
        let warnings = listing.warnings();
        assert_eq!(warnings.len(), 1);
        assert!(
            warnings[0].contains("nas2") && warnings[0].contains("missed heartbeats"),
            "{warnings:?}"
        );
    }

    #[test]
    fn a_copy_is_one_snapshot_held_by_two_storage_hosts() {
        let key = RepoKey::from_master(&[7; 32]);
        let (a, b) = (genuine(&key, 1, "alpha", 10), genuine(&key, 2, "beta", 20));
        let listing = merge(
            vec![
                (h("nas"), Ok(vec![a.clone(), b.clone()])),
                (h("offsite"), Ok(vec![b.clone()])),
            ],
            &key,
        );
        assert!(listing.contested.is_empty(), "{:?}", listing.contested);
        assert!(listing.doubtful.is_empty(), "{:?}", listing.doubtful);
        let held = listing.held();
        assert_eq!(held.len(), 2, "each snapshot once");
        assert_eq!(held[0].found.record.id, a.id);
        assert_eq!(held[0].storages, [h("nas")]);
        assert_eq!(held[1].found.record.id, b.id);
        assert_eq!(held[1].storages, [h("nas"), h("offsite")]);
        // Retention decides at each storage host on its own: the copy at
        // offsite is offsite's newest, kept by its keep-last 1.
        let policy = KeepPolicy {
            last: Some(1),
            ..KeepPolicy::default()
        };
        let decided = verdicts(&listing, &key, &policy, None);
        let at = |storage: &str, id: &str| {
            decided
                .iter()
                .find(|(f, v)| f.storage == h(storage) && v.id == id)
                .map(|(_, v)| v.keep)
        };
        assert_eq!(at("offsite", &b.id), Some(true));
        assert_eq!(at("nas", &b.id), Some(true));
        // Any field of the record differing makes it no copy.
        for changed in [
            SnapshotRecord {
                time: 21,
                ..b.clone()
            },
            SnapshotRecord {
                partial: true,
                ..b.clone()
            },
            SnapshotRecord {
                tree: a.tree,
                ..b.clone()
            },
        ] {
            let listing = merge(
                vec![
                    (h("nas"), Ok(vec![b.clone()])),
                    (h("offsite"), Ok(vec![changed])),
                ],
                &key,
            );
            assert_eq!(listing.contested.iter().collect::<Vec<_>>(), [&b.id]);
            // Not merged into one row as a copy would be.
            let held = listing.held();
            assert_eq!(held.len(), 2, "{held:?}");
            assert!(held.iter().all(|h| h.storages.len() == 1), "{held:?}");
        }
    }

    #[test]
    fn retention_leaves_a_doubtful_listing_alone() {
        let key = RepoKey::from_master(&[7; 32]);
        let policy = KeepPolicy {
            last: Some(1),
            ..KeepPolicy::default()
        };
        let (a, b, c) = (
            genuine(&key, 1, "alpha", 10),
            genuine(&key, 2, "alpha", 20),
            genuine(&key, 3, "alpha", 30),
        );
        // Repeated ids: the newest twice, which would otherwise fill
        // keep-last with a copy and forget everything else.
        let repeated = merge(
            vec![(
                h("nas"),
                Ok(vec![a.clone(), b.clone(), c.clone(), c.clone()]),
            )],
            &key,
        );
        assert_eq!(repeated.found.len(), 3, "each id listed once");
        assert!(
            repeated.doubtful[0].1.contains("repeated 1"),
            "{:?}",
            repeated.doubtful
        );
        assert!(verdicts(&repeated, &key, &policy, None).is_empty());

        // A record that does not match its sealed metadata.
        let mut moved = b.clone();
        moved.time = 25;
        let tampered = merge(
            vec![(h("nas"), Ok(vec![a.clone(), moved, c.clone()]))],
            &key,
        );
        assert!(
            tampered.doubtful[0].1.contains("do not match"),
            "{:?}",
            tampered.doubtful
        );
        assert!(verdicts(&tampered, &key, &policy, None).is_empty());

        // Two records of one id that are not the same record (nas2 lists
        // nas's newest id sealed anew: no copy looks like that): the
        // contested id is kept wherever it is listed and takes no keep
        // slot, and no storage host is doubted for it, so a hostile one
        // cannot stop retention on the honest ones.
        let resealed = genuine(&key, 2, "alpha", 20);
        assert_ne!(resealed.meta, b.meta, "sealed with a fresh nonce");
        let stolen = merge(
            vec![
                (h("nas"), Ok(vec![a.clone(), b.clone()])),
                (h("nas2"), Ok(vec![resealed])),
                (
                    h("nas3"),
                    Ok(vec![
                        genuine(&key, 4, "beta", 40),
                        genuine(&key, 5, "beta", 50),
                    ]),
                ),
            ],
            &key,
        );
        assert!(stolen.doubtful.is_empty(), "{:?}", stolen.doubtful);
        assert_eq!(stolen.contested.iter().collect::<Vec<_>>(), [&b.id]);
        let decided = verdicts(&stolen, &key, &policy, None);
        let verdict = |storage: &str, id: &str| {
            decided
                .iter()
                .find(|(f, v)| f.storage == h(storage) && v.id == id)
                .map(|(_, v)| (v.keep, v.reasons.clone()))
        };
        assert_eq!(verdict("nas", &b.id), Some((true, vec!["contested"])));
        assert_eq!(verdict("nas2", &b.id), Some((true, vec!["contested"])));
        // nas's only uncontested snapshot is kept by keep-last.
        assert_eq!(verdict("nas", &a.id).map(|v| v.0), Some(true));
        // The honest nas3 is pruned as usual.
        assert_eq!(verdict("nas3", &"04".repeat(16)).map(|v| v.0), Some(false));
        assert_eq!(verdict("nas3", &"05".repeat(16)).map(|v| v.0), Some(true));

        // A record sealed before records were bound to their meta is no
        // tampering: not doubted (and not acted on either).
        let legacy_meta = SnapshotMeta {
            v: flotilla_protocol::repo::REPO_FORMAT,
            paths: vec!["/srv".into()],
            excludes: Vec::new(),
            task_id: flotilla_protocol::TaskId::new("t-0").expect("valid"),
            summary: Default::default(),
            unreadable: Vec::new(),
            tree: None,
            host: None,
            time: None,
        };
        let mut legacy = genuine(&key, 9, "alpha", 5);
        legacy.meta = key
            .seal_meta(
                &SnapshotRecord::meta_context(&legacy.id),
                &rmp_serde::to_vec_named(&legacy_meta).expect("encodes"),
            )
            .expect("seals");
        let old = merge(
            vec![(h("nas"), Ok(vec![legacy, a.clone(), b.clone(), c.clone()]))],
            &key,
        );
        assert!(old.doubtful.is_empty(), "{:?}", old.doubtful);
        assert_eq!(verdicts(&old, &key, &policy, None).len(), 3);

        // A clean listing is acted on.
        let clean = merge(vec![(h("nas"), Ok(vec![a, b, c]))], &key);
        assert!(clean.doubtful.is_empty());
        let forgotten = verdicts(&clean, &key, &policy, None)
            .into_iter()
            .filter(|(_, v)| !v.keep)
            .count();
        assert_eq!(forgotten, 2);
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
