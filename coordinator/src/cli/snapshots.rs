//! `flotilla snapshots` and `flotilla ls`: reading the repositories'
//! catalogues with the fleet's repository key.
//!
//! Storage agents answer two read-only NATS queries (snapshot list, sealed tree
//! blob); everything sensitive in them is sealed, and only this side, holding
//! the key, can open it. File content never comes this way.

use flotilla_protocol::repo::{Node, NodeKind, RepoKey};
use flotilla_protocol::{HostName, TaskId};
use serde::Serialize;

use super::{output, Global};
use crate::error::CliError;
use crate::fleetops::{list, repo_key, Held, RemoteTrees, Trees};
use crate::nats::Nats;

#[derive(Debug, Serialize)]
struct SnapshotView<'a> {
    id: &'a str,
    time: String,
    host: &'a str,
    /// The first storage host holding it (as before copies existed).
    storage: &'a str,
    /// Every storage host holding it.
    storages: Vec<&'a str>,
    partial: bool,
    paths: Vec<String>,
    files: Option<u64>,
    bytes_total: Option<u64>,
    bytes_added: Option<u64>,
    task_id: Option<TaskId>,
}

/// The one snapshot whose id starts with `prefix`, with every storage host
/// that holds it (on `to` only, when given). A snapshot copied to several
/// storage hosts is one snapshot, not an ambiguous prefix.
pub(super) async fn find(
    nats: &Nats,
    key: &RepoKey,
    prefix: &str,
    to: Option<&HostName>,
) -> Result<Held, CliError> {
    let listing = list(nats, key, to).await?;
    let missing: Vec<String> = listing
        .unanswered
        .iter()
        .map(|(s, why)| format!("{s} ({why})"))
        .collect();
    if listing.contested.iter().any(|id| id.starts_with(prefix)) {
        return Err(CliError::Usage(format!(
            "storage hosts list different records under snapshot id {prefix}; name the one to \
             read with --from (see `flotilla snapshots`)"
        )));
    }
    let mut hits: Vec<Held> = listing
        .held()
        .into_iter()
        .filter(|h| h.found.record.id.starts_with(prefix))
        .collect();
    match hits.len() {
        0 if !missing.is_empty() => Err(CliError::Usage(format!(
            "no snapshot {prefix} on the storage hosts that answered; not listed: {}",
            missing.join(", ")
        ))),
        0 => Err(CliError::Usage(format!(
            "no snapshot {prefix}; see `flotilla snapshots`"
        ))),
        1 => Ok(hits.remove(0)),
        n => Err(CliError::Usage(format!(
            "{n} snapshots start with {prefix}; give more of the id"
        ))),
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
    let listing = list(&nats, &key, to).await?;
    output::listing_warnings(&listing, json);
    let held: Vec<Held> = listing
        .held()
        .into_iter()
        .filter(|h| host.is_none_or(|want| &h.found.record.host == want))
        .collect();
    let views: Vec<SnapshotView<'_>> =
        held.iter()
            .map(|h| (h, &h.found))
            .map(|(h, f)| SnapshotView {
                id: &f.record.id,
                time: output::rfc3339(f.record.time),
                host: f.record.host.as_str(),
                storage: f.storage.as_str(),
                storages: h.storages.iter().map(HostName::as_str).collect(),
                partial: f.record.partial,
                paths: f.meta.as_ref().map(|m| m.paths.clone()).unwrap_or_default(),
                files: f.meta.as_ref().map(|m| {
                    m.summary.files_new + m.summary.files_changed + m.summary.files_unchanged
                }),
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
    let rows = views
        .iter()
        .zip(&held)
        .map(|(v, h)| {
            vec![
                output::short(v.id),
                output::when(h.found.record.time, g.utc),
                v.host.to_owned(),
                v.storages.join(","),
                v.files.map(|f| f.to_string()).unwrap_or_else(|| "?".into()),
                v.bytes_total
                    .map(output::bytes)
                    .unwrap_or_else(|| "?".into()),
                format!(
                    "{}{}",
                    if v.paths.is_empty() {
                        "(meta unreadable with this fleet's key)".into()
                    } else {
                        v.paths.join(" ")
                    },
                    if v.partial { "  [partial]" } else { "" }
                ),
            ]
        })
        .collect();
    for line in output::table(
        &["ID", "TIME", "HOST", "STORAGE", "FILES", "SIZE", "PATHS"],
        &[4, 5],
        rows,
    ) {
        outln!("{line}");
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
    #[serde(skip)]
    mtime_ms: u64,
    link_target: Option<String>,
}

fn view(node: &Node, path: &str) -> EntryView {
    let mtime_ms = (node.mtime_ns.max(0) / 1_000_000) as u64;
    EntryView {
        name: String::from_utf8_lossy(&node.name).into_owned(),
        path: path.to_owned(),
        kind: node.kind,
        mode: format!("{:04o}", node.mode),
        user: node.user.clone().unwrap_or_else(|| node.uid.to_string()),
        group: node.group.clone().unwrap_or_else(|| node.gid.to_string()),
        size: node.size,
        mtime: output::rfc3339(mtime_ms),
        mtime_ms,
        link_target: node
            .link_target
            .as_ref()
            .map(|t| String::from_utf8_lossy(t).into_owned()),
    }
}

/// `base/name`; a name at the snapshot root is already an absolute path.
fn join(base: &str, name: &[u8]) -> String {
    let name = String::from_utf8_lossy(name);
    if name.starts_with('/') {
        name.into_owned()
    } else if base.ends_with('/') {
        format!("{base}{name}")
    } else {
        format!("{base}/{name}")
    }
}

/// Which root node holds `want` (an absolute path, no trailing `/`), and the
/// components below it. The longest matching root wins, for nested roots.
fn find_root<'a>(roots: &[Node], want: &'a str) -> Option<(usize, Vec<&'a str>)> {
    roots
        .iter()
        .enumerate()
        .filter_map(|(i, n)| {
            let name = String::from_utf8_lossy(&n.name);
            let root = name.trim_end_matches('/');
            let rest = if want == root {
                Some("")
            } else {
                want.strip_prefix(root).and_then(|r| r.strip_prefix('/'))
            }?;
            Some((i, root.len(), rest))
        })
        .max_by_key(|(_, len, _)| *len)
        .map(|(i, _, rest)| (i, rest.split('/').filter(|c| !c.is_empty()).collect()))
}

/// Why `ls` has nothing to list.
#[derive(Debug, thiserror::Error)]
enum ListingError {
    /// The path is not in the snapshot (the message goes on with which).
    #[error("{0} is not in")]
    NotIn(String),
    /// A path component is a file.
    #[error("{0} is a file, not a directory, in")]
    NotADirectory(String),
    /// A tree could not be fetched from the storage host.
    #[error(transparent)]
    Fetch(#[from] CliError),
}

/// The entries `ls` prints, with their paths, in order: the contents of
/// `want` (a directory; a file lists itself), or without `want` the contents
/// of each path the snapshot backed up; with `recursive`, everything beneath
/// too, each directory followed by its contents.
async fn listing(
    trees: &impl Trees,
    roots: Vec<Node>,
    want: Option<&str>,
    recursive: bool,
) -> Result<Vec<(Node, String)>, ListingError> {
    let want = want
        .map(|w| w.trim_end_matches('/'))
        .filter(|w| !w.is_empty());
    // The directories (or files) whose contents are listed.
    let mut targets: Vec<(Node, String)> = Vec::new();
    match want {
        None => {
            for n in roots {
                let path = join("", &n.name);
                targets.push((n, path));
            }
        }
        Some(want) => {
            let (i, rest) =
                find_root(&roots, want).ok_or_else(|| ListingError::NotIn(want.to_owned()))?;
            let mut current = roots[i].clone();
            let mut path = join("", &current.name);
            for comp in rest {
                let sub = current
                    .subtree
                    .ok_or_else(|| ListingError::NotADirectory(path.clone()))?;
                let t = trees.get(&sub).await?;
                current = t
                    .nodes
                    .into_iter()
                    .find(|n| n.name == comp.as_bytes())
                    .ok_or_else(|| ListingError::NotIn(want.to_owned()))?;
                path = join(&path, comp.as_bytes());
            }
            targets.push((current, path));
        }
    }
    // Depth first, in tree order: a stack of entries still to print.
    let mut stack: Vec<(Node, String)> = Vec::new();
    for (node, path) in targets.into_iter().rev() {
        match node.subtree {
            Some(sub) => {
                let t = trees.get(&sub).await?;
                for child in t.nodes.into_iter().rev() {
                    let p = join(&path, &child.name);
                    stack.push((child, p));
                }
            }
            None => stack.push((node, path)),
        }
    }
    let mut out = Vec::new();
    while let Some((node, path)) = stack.pop() {
        let below = node.subtree.filter(|_| recursive);
        if let Some(sub) = below {
            let t = trees.get(&sub).await?;
            for child in t.nodes.into_iter().rev() {
                let p = join(&path, &child.name);
                stack.push((child, p));
            }
        }
        out.push((node, path));
    }
    Ok(out)
}

pub(super) async fn ls(
    g: &Global,
    snapshot: &str,
    path: Option<&str>,
    recursive: bool,
    to: Option<&HostName>,
    json: bool,
) -> Result<(), CliError> {
    let fleet = g.fleet()?;
    let key = repo_key(&fleet)?;
    let nats = g.connect().await?;
    let found = find(&nats, &key, snapshot, to).await?.found;
    let trees = RemoteTrees {
        nats: &nats,
        key: &key,
        storage: &found.storage,
    };
    let root = trees.get(&found.record.tree).await?;
    let entries = listing(&trees, root.nodes, path, recursive)
        .await
        .map_err(|e| match e {
            ListingError::Fetch(e) => e,
            what => CliError::Usage(format!(
                "{what} snapshot {} (see `flotilla ls {}`)",
                output::short(&found.record.id),
                output::short(&found.record.id)
            )),
        })?;
    let views: Vec<EntryView> = entries.iter().map(|(n, p)| view(n, p)).collect();
    if json {
        outln!(
            "{}",
            serde_json::to_string_pretty(&views).unwrap_or_else(|_| "[]".into())
        );
        return Ok(());
    }
    let rows = views
        .iter()
        .map(|v| {
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
            vec![
                format!("{kind}{}", v.mode),
                v.user.clone(),
                v.group.clone(),
                v.size.to_string(),
                output::when(v.mtime_ms, g.utc),
                format!("{}{target}", v.path),
            ]
        })
        .collect();
    for line in output::table(
        &["MODE", "USER", "GROUP", "SIZE", "MODIFIED", "PATH"],
        &[3],
        rows,
    ) {
        outln!("{line}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use flotilla_protocol::repo::{BlobId, Tree};

    use super::*;

    /// A file (no content) or a directory whose tree is `subtree`.
    fn node(name: &str, subtree: Option<u8>) -> Node {
        crate::fleetops::tests::node(name, &[], subtree)
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

    /// One backed-up path, /srv/data: a.txt and sub/ (with b.txt).
    fn snapshot() -> (Map, Vec<Node>) {
        let trees = Map(HashMap::from([
            (
                BlobId([1; 32]),
                vec![node("a.txt", None), node("sub", Some(2))],
            ),
            (BlobId([2; 32]), vec![node("b.txt", None)]),
        ]));
        (trees, vec![node("/srv/data", Some(1))])
    }

    async fn paths(want: Option<&str>, recursive: bool) -> Result<Vec<String>, String> {
        let (trees, roots) = snapshot();
        Ok(listing(&trees, roots, want, recursive)
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|(_, p)| p)
            .collect())
    }

    #[tokio::test]
    async fn ls_without_a_path_lists_the_contents_of_the_backed_up_path() {
        assert_eq!(
            paths(None, false).await.expect("listing"),
            ["/srv/data/a.txt", "/srv/data/sub"]
        );
        assert_eq!(
            paths(Some("/"), false).await.expect("listing"),
            ["/srv/data/a.txt", "/srv/data/sub"]
        );
    }

    #[tokio::test]
    async fn ls_with_a_path_lists_that_directory_or_that_file() {
        assert_eq!(
            paths(Some("/srv/data/sub/"), false).await.expect("listing"),
            ["/srv/data/sub/b.txt"]
        );
        assert_eq!(
            paths(Some("/srv/data"), false).await.expect("listing"),
            ["/srv/data/a.txt", "/srv/data/sub"]
        );
        assert_eq!(
            paths(Some("/srv/data/a.txt"), false)
                .await
                .expect("listing"),
            ["/srv/data/a.txt"]
        );
        let missing = paths(Some("/srv/data/nope"), false).await;
        assert_eq!(missing, Err("/srv/data/nope is not in".into()));
        let outside = paths(Some("/srv"), false).await;
        assert_eq!(outside, Err("/srv is not in".into()));
        let below_a_file = paths(Some("/srv/data/a.txt/x"), false).await;
        assert_eq!(
            below_a_file,
            Err("/srv/data/a.txt is a file, not a directory, in".into())
        );
    }

    /// A tree the storage host cannot deliver is that request's error (its
    /// exit code, its retryability), not a mistake in the path asked for.
    #[tokio::test]
    async fn a_tree_that_cannot_be_fetched_is_a_request_error() {
        let (trees, _) = snapshot();
        let roots = vec![node("/srv/gone", Some(9))];
        let err = listing(&trees, roots, None, false)
            .await
            .expect_err("tree 9 is missing");
        assert!(
            matches!(err, ListingError::Fetch(CliError::Request { .. })),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn ls_recursive_lists_everything_beneath_depth_first() {
        assert_eq!(
            paths(None, true).await.expect("listing"),
            ["/srv/data/a.txt", "/srv/data/sub", "/srv/data/sub/b.txt"]
        );
        assert_eq!(
            paths(Some("/srv/data/sub"), true).await.expect("listing"),
            ["/srv/data/sub/b.txt"]
        );
    }

    #[test]
    fn nested_roots_resolve_to_the_longest() {
        let roots = vec![node("/home", Some(1)), node("/home/a/data", Some(2))];
        assert_eq!(find_root(&roots, "/home/a/data/x"), Some((1, vec!["x"])));
        assert_eq!(find_root(&roots, "/home/b"), Some((0, vec!["b"])));
        assert_eq!(find_root(&roots, "/homer"), None);
        let slash = vec![node("/", Some(1))];
        assert_eq!(
            find_root(&slash, "/etc/hosts"),
            Some((0, vec!["etc", "hosts"]))
        );
    }
}
