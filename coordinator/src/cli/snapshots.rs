//! `flotilla snapshots` and `flotilla ls`: reading the repositories'
//! catalogues with the fleet's repository key.
//!
//! Storage agents answer two read-only NATS queries (snapshot list, sealed tree
//! blob); everything sensitive in them is sealed, and only this side, holding
//! the key, can open it. File content never comes this way.

use std::time::Duration;

use flotilla_protocol::frame::RepoReply;
use flotilla_protocol::repo::{
    BlobId, Node, NodeKind, RepoKey, SnapshotMeta, SnapshotRecord, Tree,
};
use flotilla_protocol::{subject, HostName, Role};
use serde::Serialize;

use super::{output, Global};
use crate::error::{request_err, CliError};
use crate::fleet::Fleet;
use crate::nats::Nats;

/// How long a storage agent gets to answer a query.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// A snapshot with its storage host and opened metadata.
#[derive(Debug, Clone)]
pub(crate) struct Found {
    pub storage: HostName,
    pub record: SnapshotRecord,
    pub meta: Option<SnapshotMeta>,
}

#[derive(Debug, Serialize)]
struct SnapshotView<'a> {
    id: &'a str,
    time: String,
    host: &'a str,
    storage: &'a str,
    partial: bool,
    paths: Vec<String>,
    files: Option<u64>,
    bytes_total: Option<u64>,
    bytes_added: Option<u64>,
    task_id: Option<String>,
}

pub(crate) fn repo_key(fleet: &Fleet) -> Result<RepoKey, CliError> {
    let path = fleet.dir.join("repo.key");
    let text = std::fs::read_to_string(&path).map_err(|source| CliError::Io {
        path: path.clone(),
        source,
    })?;
    RepoKey::from_hex(&text)
        .ok_or_else(|| CliError::Usage(format!("{} is not a 64-hex-digit key", path.display())))
}

/// Storage hosts to ask: the one named, or every host with the storage role.
pub(super) async fn storages(
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
pub(super) async fn list(
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
                out.extend(snapshots.into_iter().map(|record| Found {
                    meta: record.open_meta(key),
                    storage: storage.clone(),
                    record,
                }))
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

/// The one snapshot whose id starts with `prefix`.
pub(super) async fn find(
    nats: &Nats,
    key: &RepoKey,
    prefix: &str,
    to: Option<&HostName>,
) -> Result<Found, CliError> {
    let mut hits: Vec<Found> = list(nats, key, to)
        .await?
        .into_iter()
        .filter(|f| f.record.id.starts_with(prefix))
        .collect();
    match hits.len() {
        0 => Err(CliError::Usage(format!(
            "no snapshot {prefix}; see `flotilla snapshots`"
        ))),
        1 => Ok(hits.remove(0)),
        n => Err(CliError::Usage(format!(
            "{n} snapshots start with {prefix}; give more of the id"
        ))),
    }
}

/// Fetches and opens one tree.
pub(super) async fn tree(
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

pub(super) async fn snapshots(
    g: &Global,
    host: Option<&HostName>,
    to: Option<&HostName>,
    json: bool,
) -> Result<(), CliError> {
    let fleet = g.fleet()?;
    let key = repo_key(&fleet)?;
    let nats = g.connect().await?;
    let found: Vec<Found> = list(&nats, &key, to)
        .await?
        .into_iter()
        .filter(|f| host.is_none_or(|h| &f.record.host == h))
        .collect();
    let views: Vec<SnapshotView<'_>> = found
        .iter()
        .map(|f| SnapshotView {
            id: &f.record.id,
            time: output::time(f.record.time),
            host: f.record.host.as_str(),
            storage: f.storage.as_str(),
            partial: f.record.partial,
            paths: f.meta.as_ref().map(|m| m.paths.clone()).unwrap_or_default(),
            files: f
                .meta
                .as_ref()
                .map(|m| m.summary.files_new + m.summary.files_changed + m.summary.files_unchanged),
            bytes_total: f.meta.as_ref().map(|m| m.summary.bytes_total),
            bytes_added: f.meta.as_ref().map(|m| m.summary.bytes_added),
            task_id: f.meta.as_ref().map(|m| m.task_id.clone()),
        })
        .collect();
    if json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&views).unwrap_or_else(|_| "[]".into())
        );
        return Ok(());
    }
    if views.is_empty() {
        outln!("no snapshots");
        return Ok(());
    }
    outln!(
        "{:<10} {:<24} {:<14} {:<12} {:>8} {:>10}  PATHS",
        "ID",
        "TIME",
        "HOST",
        "STORAGE",
        "FILES",
        "SIZE"
    );
    for v in &views {
        outln!(
            "{:<10} {:<24} {:<14} {:<12} {:>8} {:>10}  {}{}",
            output::short(v.id),
            v.time,
            v.host,
            v.storage,
            v.files.map(|f| f.to_string()).unwrap_or_else(|| "?".into()),
            v.bytes_total
                .map(output::bytes)
                .unwrap_or_else(|| "?".into()),
            if v.paths.is_empty() {
                "(meta unreadable with this fleet's key)".into()
            } else {
                v.paths.join(" ")
            },
            if v.partial { "  [partial]" } else { "" }
        );
    }
    Ok(())
}

#[derive(Debug, Serialize)]
struct EntryView {
    name: String,
    path: String,
    kind: NodeKind,
    mode: String,
    user: String,
    group: String,
    size: u64,
    mtime: String,
    link_target: Option<String>,
}

fn view(node: &Node, path: &str) -> EntryView {
    EntryView {
        name: String::from_utf8_lossy(&node.name).into_owned(),
        path: path.to_owned(),
        kind: node.kind,
        mode: format!("{:04o}", node.mode),
        user: node.user.clone().unwrap_or_else(|| node.uid.to_string()),
        group: node.group.clone().unwrap_or_else(|| node.gid.to_string()),
        size: node.size,
        mtime: output::time((node.mtime_ns.max(0) / 1_000_000) as u64),
        link_target: node
            .link_target
            .as_ref()
            .map(|t| String::from_utf8_lossy(t).into_owned()),
    }
}

pub(super) async fn ls(
    g: &Global,
    snapshot: &str,
    path: Option<&str>,
    to: Option<&HostName>,
    json: bool,
) -> Result<(), CliError> {
    let fleet = g.fleet()?;
    let key = repo_key(&fleet)?;
    let nats = g.connect().await?;
    let found = find(&nats, &key, snapshot, to).await?;
    let root = tree(&nats, &key, &found.storage, &found.record.tree).await?;
    let want = path.unwrap_or("/").trim_end_matches('/');
    // Which directory to list: the snapshot root, or a path beneath a root node.
    let (entries, base): (Vec<Node>, String) = if want.is_empty() {
        (root.nodes, String::new())
    } else {
        let node = root
            .nodes
            .iter()
            .find(|n| {
                let name = String::from_utf8_lossy(&n.name);
                want == name || want.starts_with(&format!("{name}/"))
            })
            .cloned()
            .ok_or_else(|| {
                CliError::Usage(format!("{want} is not in snapshot {}", found.record.id))
            })?;
        let root_name = String::from_utf8_lossy(&node.name).into_owned();
        let mut current = node;
        let rest = want[root_name.len()..].trim_start_matches('/').to_owned();
        for comp in rest.split('/').filter(|c| !c.is_empty()) {
            let sub = current
                .subtree
                .ok_or_else(|| CliError::Usage(format!("{want}: not a directory")))?;
            let t = tree(&nats, &key, &found.storage, &sub).await?;
            current = t
                .nodes
                .into_iter()
                .find(|n| n.name == comp.as_bytes())
                .ok_or_else(|| {
                    CliError::Usage(format!("{want} is not in snapshot {}", found.record.id))
                })?;
        }
        match current.subtree {
            Some(sub) => (
                tree(&nats, &key, &found.storage, &sub).await?.nodes,
                want.to_owned(),
            ),
            None => (
                vec![current],
                want.rsplit_once('/')
                    .map(|(d, _)| d.to_owned())
                    .unwrap_or_default(),
            ),
        }
    };
    let views: Vec<EntryView> = entries
        .iter()
        .map(|n| {
            let name = String::from_utf8_lossy(&n.name);
            let p = if name.starts_with('/') {
                name.into_owned()
            } else {
                format!("{base}/{name}")
            };
            view(n, &p)
        })
        .collect();
    if json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&views).unwrap_or_else(|_| "[]".into())
        );
        return Ok(());
    }
    for v in &views {
        let kind = match v.kind {
            NodeKind::Dir => 'd',
            NodeKind::Symlink => 'l',
            NodeKind::Fifo => 'p',
            NodeKind::Socket => 's',
            NodeKind::CharDevice => 'c',
            NodeKind::BlockDevice => 'b',
            NodeKind::File => '-',
        };
        let target = v
            .link_target
            .as_ref()
            .map(|t| format!(" -> {t}"))
            .unwrap_or_default();
        outln!(
            "{kind}{} {:<8} {:<8} {:>12} {}  {}{}",
            v.mode,
            v.user,
            v.group,
            v.size,
            v.mtime,
            v.path,
            target
        );
    }
    Ok(())
}
