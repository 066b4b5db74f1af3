//! Restore tests: real files in a temporary directory, blobs from a map.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use flotilla_protocol::repo::{
    BlobId, ChunkRef, Node, NodeKind, RepoKey, RestoreSummary, Tree, Xattr, REPO_FORMAT,
};

use super::{restore, Fetch, FetchError, RestoreError, RestoreOptions};
use crate::engine::{Cancel, NoProgress};

const MTIME: i64 = 1_600_000_000_123_456_789;
const ATIME: i64 = 1_500_000_000_987_654_321;
const MIB: usize = 1024 * 1024;

/// Blobs from a map; remembers the largest request.
struct MapFetch {
    blobs: HashMap<BlobId, Vec<u8>>,
    largest: usize,
}

impl Fetch for MapFetch {
    fn get(&mut self, ids: &[BlobId]) -> Result<Vec<Vec<u8>>, FetchError> {
        self.largest = self.largest.max(ids.len());
        ids.iter()
            .map(|id| {
                self.blobs.get(id).cloned().ok_or_else(|| FetchError {
                    message: format!("blob {id:?} not found"),
                    retryable: false,
                })
            })
            .collect()
    }
}

/// Storage that is down.
struct Down;

impl Fetch for Down {
    fn get(&mut self, _: &[BlobId]) -> Result<Vec<Vec<u8>>, FetchError> {
        Err(FetchError {
            message: "connection lost".into(),
            retryable: true,
        })
    }
}

/// Builds trees and chunks the way a backup stores them.
struct Repo {
    key: RepoKey,
    blobs: HashMap<BlobId, Vec<u8>>,
}

impl Repo {
    fn new() -> Self {
        Self {
            key: RepoKey::from_master(&[7; 32]),
            blobs: HashMap::new(),
        }
    }

    fn blob(&mut self, plain: &[u8]) -> BlobId {
        let id = self.key.blob_id(plain);
        let sealed = self.key.seal(&id, plain, 3).expect("seals");
        self.blobs.insert(id, sealed);
        id
    }

    fn tree(&mut self, mut nodes: Vec<Node>) -> BlobId {
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        let bytes = flotilla_protocol::encode(&Tree {
            v: REPO_FORMAT,
            nodes,
        })
        .expect("encodes");
        self.blob(&bytes)
    }

    fn chunks(&mut self, parts: &[&[u8]]) -> Vec<ChunkRef> {
        parts
            .iter()
            .map(|p| ChunkRef {
                id: self.blob(p),
                len: p.len() as u32,
            })
            .collect()
    }

    fn file(&mut self, name: &[u8], data: &[u8], chunk: usize) -> Node {
        let parts: Vec<&[u8]> = data.chunks(chunk).collect();
        Node {
            size: data.len() as u64,
            content: self.chunks(&parts),
            ..node(name, NodeKind::File, 0o644)
        }
    }

    fn dir(&mut self, name: &[u8], children: Vec<Node>) -> Node {
        Node {
            subtree: Some(self.tree(children)),
            ..node(name, NodeKind::Dir, 0o755)
        }
    }

    fn run(
        &mut self,
        roots: Vec<Node>,
        target: &Path,
        includes: &[&str],
    ) -> Result<RestoreSummary, RestoreError> {
        self.run_stripping(roots, target, includes, false)
    }

    fn run_stripping(
        &mut self,
        roots: Vec<Node>,
        target: &Path,
        includes: &[&str],
        strip_special: bool,
    ) -> Result<RestoreSummary, RestoreError> {
        let root = self.tree(roots);
        let mut fetch = MapFetch {
            blobs: self.blobs.clone(),
            largest: 0,
        };
        let opts = RestoreOptions {
            target: target.to_path_buf(),
            includes: includes.iter().map(|s| s.to_string()).collect(),
            restore_owner: false,
            strip_special,
        };
        let summary = restore(
            &root,
            &self.key,
            &mut fetch,
            &opts,
            &mut NoProgress,
            &Cancel::default(),
        );
        assert!(
            fetch.largest <= 256,
            "asked for {} blobs at once",
            fetch.largest
        );
        summary
    }
}

fn node(name: &[u8], kind: NodeKind, mode: u32) -> Node {
    Node {
        name: name.to_vec(),
        kind,
        mode,
        uid: 0,
        gid: 0,
        user: None,
        group: None,
        mtime_ns: MTIME,
        atime_ns: ATIME,
        ctime_ns: 0,
        size: 0,
        inode: 0,
        dev: 0,
        nlink: 1,
        rdev: 0,
        link_target: None,
        content: Vec::new(),
        sparse: false,
        subtree: None,
        xattrs: Vec::new(),
    }
}

fn symlink(name: &[u8], target: &[u8]) -> Node {
    Node {
        link_target: Some(target.to_vec()),
        ..node(name, NodeKind::Symlink, 0o777)
    }
}

/// A temporary directory with an empty `target` inside; returns both.
fn target() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let target = tmp.path().join("target");
    fs::create_dir(&target).expect("mkdir");
    let target = fs::canonicalize(target).expect("canonical");
    (tmp, target)
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .expect("lists")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn assert_meta(path: &Path, mode: u32, mtime_ns: i64) {
    let m = fs::symlink_metadata(path).expect("exists");
    assert_eq!(m.mode() & 0o7777, mode, "mode of {}", path.display());
    assert_eq!(
        m.mtime() * 1_000_000_000 + m.mtime_nsec(),
        mtime_ns,
        "mtime of {}",
        path.display()
    );
}

#[test]
fn nested_dirs_and_files_round_trip_with_modes_and_times() {
    let (_tmp, target) = target();
    let mut repo = Repo::new();
    let big: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let mut a = repo.file(b"a.txt", &big, 100_000);
    a.mode = 0o640;
    let empty = repo.file(b"empty", b"", 1);
    let mut nested = repo.file("nested ü name".as_bytes(), b"deep", 3);
    nested.mode = 0o600;
    nested.mtime_ns = MTIME + 5;
    let empty_dir = node(b"empty dir", NodeKind::Dir, 0o700);
    let fifo = node(b"pipe", NodeKind::Fifo, 0o640);
    let mut sub = repo.dir(b"sub dir", vec![nested, empty_dir, fifo]);
    sub.mode = 0o750;
    let data = Node {
        name: b"/srv/data".to_vec(),
        ..repo.dir(b"", vec![a, empty, sub])
    };
    let single = repo.file(b"/etc/one.conf", b"x = 1\n", 4);

    let summary = repo
        .run(vec![data, single], &target, &[])
        .expect("restores");
    assert_eq!(summary.error_samples, Vec::<String>::new());
    assert_eq!(
        (summary.files, summary.dirs, summary.bytes),
        (4, 3, 300_000 + 4 + 6)
    );

    let data = target.join("srv/data");
    // Before reading it: with relatime, a read would move an atime this old.
    let atime = fs::metadata(data.join("a.txt")).expect("exists");
    assert_eq!(atime.atime() * 1_000_000_000 + atime.atime_nsec(), ATIME);
    assert_eq!(fs::read(data.join("a.txt")).expect("reads"), big);
    assert_meta(&data.join("a.txt"), 0o640, MTIME);
    assert_eq!(fs::read(data.join("empty")).expect("reads"), b"");
    let sub = data.join("sub dir");
    assert_eq!(fs::read(sub.join("nested ü name")).expect("reads"), b"deep");
    assert_meta(&sub.join("nested ü name"), 0o600, MTIME + 5);
    assert_meta(&sub.join("empty dir"), 0o700, MTIME);
    assert!(fs::symlink_metadata(sub.join("pipe"))
        .expect("exists")
        .file_type()
        .is_fifo());
    assert_meta(&sub.join("pipe"), 0o640, MTIME);
    // Directory times survive the writes into them: applied afterwards.
    assert_meta(&sub, 0o750, MTIME);
    assert_meta(&data, 0o755, MTIME);
    assert_eq!(
        fs::read(target.join("etc/one.conf")).expect("reads"),
        b"x = 1\n"
    );
    assert_eq!(
        names(&sub),
        ["empty dir", "nested ü name", "pipe"],
        "no temporary names left"
    );
}

#[test]
fn symlinks_are_restored_as_links_even_dangling_ones() {
    let (_tmp, target) = target();
    let mut repo = Repo::new();
    let a = repo.file(b"a.txt", b"hello", 5);
    let link = symlink(b"link", b"a.txt");
    let dangling = symlink(b"dangling", b"/nonexistent/elsewhere");
    let srv = repo.dir(b"/srv", vec![a, link, dangling]);

    let summary = repo.run(vec![srv], &target, &[]).expect("restores");
    assert_eq!((summary.files, summary.symlinks, summary.errors), (1, 2, 0));
    let srv = target.join("srv");
    assert_eq!(
        fs::read_link(srv.join("link")).expect("link"),
        Path::new("a.txt")
    );
    assert_eq!(
        fs::read_to_string(srv.join("link")).expect("reads"),
        "hello"
    );
    assert_eq!(
        fs::read_link(srv.join("dangling")).expect("link"),
        Path::new("/nonexistent/elsewhere")
    );
    let m = fs::symlink_metadata(srv.join("dangling")).expect("exists");
    assert!(m.file_type().is_symlink());
    assert_eq!(m.mtime() * 1_000_000_000 + m.mtime_nsec(), MTIME);
    // Links are made before directory metadata, so the time holds.
    assert_meta(&srv, 0o755, MTIME);
}

#[test]
fn hard_link_pairs_become_one_inode() {
    let (_tmp, target) = target();
    let mut repo = Repo::new();
    let mut one = repo.file(b"one", b"shared", 6);
    (one.nlink, one.dev, one.inode) = (2, 5, 42);
    let two = Node {
        name: b"two".to_vec(),
        ..one.clone()
    };
    let srv = repo.dir(b"/srv", vec![one, two]);

    let summary = repo.run(vec![srv], &target, &[]).expect("restores");
    assert_eq!(
        (summary.files, summary.hardlinks, summary.errors),
        (1, 1, 0)
    );
    let one = fs::metadata(target.join("srv/one")).expect("exists");
    let two = fs::metadata(target.join("srv/two")).expect("exists");
    assert_eq!(one.ino(), two.ino());
    assert_eq!(one.nlink(), 2);
    assert_eq!(fs::read(target.join("srv/two")).expect("reads"), b"shared");
}

#[test]
fn sparse_files_keep_their_size_and_holes() {
    let (_tmp, target) = target();
    let mut repo = Repo::new();
    let head = vec![7u8; 64 * 1024];
    let zeros = vec![0u8; MIB];
    let tail = vec![9u8; 64 * 1024];
    let parts: [&[u8]; 4] = [&head, &zeros, &tail, &zeros];
    let whole = parts.concat();
    let sparse = Node {
        size: whole.len() as u64,
        content: repo.chunks(&parts),
        sparse: true,
        ..node(b"sparse", NodeKind::File, 0o644)
    };
    let srv = repo.dir(b"/srv", vec![sparse]);

    let summary = repo.run(vec![srv], &target, &[]).expect("restores");
    assert_eq!(summary.errors, 0);
    let path = target.join("srv/sparse");
    assert_eq!(fs::read(&path).expect("reads"), whole);
    let m = fs::metadata(&path).expect("exists");
    assert_eq!(m.len(), whole.len() as u64);
    assert!(
        m.blocks() * 512 < whole.len() as u64 / 2,
        "{} blocks for {} bytes",
        m.blocks(),
        m.len()
    );
}

#[test]
fn many_chunks_are_fetched_in_bounded_batches() {
    let (_tmp, target) = target();
    let mut repo = Repo::new();
    let data: Vec<u8> = (0..700u16).flat_map(u16::to_le_bytes).collect();
    let file = repo.file(b"many", &data, 2);
    let srv = repo.dir(b"/srv", vec![file]);
    // `run` asserts that no request exceeded 256 ids.
    repo.run(vec![srv], &target, &[]).expect("restores");
    assert_eq!(fs::read(target.join("srv/many")).expect("reads"), data);
}

#[test]
fn hostile_names_are_skipped_and_nothing_escapes() {
    let (tmp, target) = target();
    let mut repo = Repo::new();
    let inner = repo.file(b"x", b"evil", 4);
    let hostile = vec![
        repo.file(b"..", b"evil", 4),
        repo.file(b"a/b", b"evil", 4),
        repo.dir(b".", vec![inner]),
        repo.file(b"", b"evil", 4),
        repo.file(b"n\0ul", b"evil", 4),
        repo.file(b"ok", b"fine", 4),
    ];
    let srv = repo.dir(b"/srv", hostile);

    let summary = repo
        .run(vec![srv], &target, &[])
        .expect("restores the rest");
    assert_eq!((summary.files, summary.errors), (1, 5));
    assert_eq!(names(&target.join("srv")), ["ok"]);
    assert_eq!(names(&target), ["srv"]);
    assert_eq!(names(tmp.path()), ["target"]);
}

#[test]
fn unsafe_root_names_refuse_the_whole_restore() {
    let bads: [&[u8]; 4] = [b"/../../etc", b"relative/path", b"/srv/./x", b"/a\0b"];
    for bad in bads {
        let (tmp, target) = target();
        let mut repo = Repo::new();
        let passwd = repo.file(b"passwd", b"root::0:0::/:/bin/sh\n", 8);
        let escape = Node {
            name: bad.to_vec(),
            ..repo.dir(b"", vec![passwd])
        };
        let fine = repo.file(b"/fine", b"fine", 4);
        let err = repo
            .run(vec![fine, escape], &target, &[])
            .expect_err("refused");
        assert!(matches!(err, RestoreError::Escape { .. }), "{err}");
        assert!(!err.is_retryable());
        assert!(names(&target).is_empty(), "nothing written before refusing");
        assert_eq!(names(tmp.path()), ["target"]);
    }
}

#[test]
fn existing_symlinks_in_the_target_are_replaced_not_followed() {
    let (tmp, target) = target();
    let elsewhere = tmp.path().join("elsewhere");
    fs::create_dir(&elsewhere).expect("mkdir");
    fs::write(elsewhere.join("victim"), "original").expect("writes");
    std::os::unix::fs::symlink(&elsewhere, target.join("srv")).expect("symlink");
    fs::create_dir(target.join("x")).expect("mkdir");
    std::os::unix::fs::symlink(elsewhere.join("victim"), target.join("x/f")).expect("symlink");
    std::os::unix::fs::symlink(&elsewhere, target.join("x/d")).expect("symlink");
    let mut repo = Repo::new();
    let f = repo.file(b"f", b"new", 3);
    let data = repo.dir(b"/srv/data", vec![f.clone()]);
    let g = repo.file(b"g", b"new", 3);
    let d = repo.dir(b"d", vec![g]);
    let x = repo.dir(b"/x", vec![f, d]);

    let summary = repo.run(vec![data, x], &target, &[]).expect("restores");
    assert_eq!(summary.errors, 0, "{:?}", summary.error_samples);
    assert_eq!(names(&elsewhere), ["victim"]);
    assert_eq!(
        fs::read_to_string(elsewhere.join("victim")).expect("reads"),
        "original"
    );
    assert!(fs::symlink_metadata(target.join("srv"))
        .expect("exists")
        .is_dir());
    assert_eq!(fs::read(target.join("srv/data/f")).expect("reads"), b"new");
    assert!(fs::symlink_metadata(target.join("x/f"))
        .expect("exists")
        .is_file());
    assert_eq!(fs::read(target.join("x/f")).expect("reads"), b"new");
    assert!(fs::symlink_metadata(target.join("x/d"))
        .expect("exists")
        .is_dir());
}

#[test]
fn a_tampered_chunk_fails_its_file_only() {
    let (_tmp, target) = target();
    let mut repo = Repo::new();
    let good = repo.file(b"good", b"good content", 4);
    let bad = repo.file(b"bad", b"bad content!", 4);
    let sealed = repo.blobs.get_mut(&bad.content[1].id).expect("stored");
    let last = sealed.len() - 1;
    sealed[last] ^= 1;
    let srv = repo.dir(b"/srv", vec![good, bad]);

    let summary = repo
        .run(vec![srv], &target, &[])
        .expect("restores the rest");
    assert_eq!((summary.files, summary.errors), (1, 1));
    assert!(
        summary.error_samples[0].contains("bad"),
        "{:?}",
        summary.error_samples
    );
    assert_eq!(
        names(&target.join("srv")),
        ["good"],
        "no partial file, no temporary left"
    );
    assert_eq!(
        fs::read(target.join("srv/good")).expect("reads"),
        b"good content"
    );
}

#[test]
fn includes_restore_only_the_requested_paths() {
    let (_tmp, target) = target();
    let mut repo = Repo::new();
    let f = repo.file(b"f", b"wanted", 6);
    let sub = repo.dir(b"sub", vec![f]);
    let other = repo.file(b"other", b"unwanted", 8);
    let data = repo.dir(b"/srv/data", vec![sub, other]);
    let conf = repo.file(b"conf", b"unwanted", 8);
    let etc = repo.dir(b"/etc", vec![conf]);
    let roots = vec![data, etc];

    let summary = repo
        .run(roots.clone(), &target, &["/srv/data/sub/"])
        .expect("restores");
    assert_eq!((summary.files, summary.errors), (1, 0));
    assert_eq!(
        fs::read(target.join("srv/data/sub/f")).expect("reads"),
        b"wanted"
    );
    assert_eq!(names(&target), ["srv"]);
    assert_eq!(names(&target.join("srv/data")), ["sub"]);

    let err = repo
        .run(roots.clone(), &target, &["/nothing/here"])
        .expect_err("nothing matches");
    assert!(matches!(err, RestoreError::NotInSnapshot { .. }), "{err}");
    let err = repo
        .run(roots, &target, &["srv/../etc"])
        .expect_err("not absolute");
    assert!(matches!(err, RestoreError::BadInclude { .. }), "{err}");
}

#[test]
fn unreachable_storage_is_retryable_and_cancel_stops() {
    let (_tmp, target) = target();
    let key = RepoKey::from_master(&[7; 32]);
    let opts = RestoreOptions {
        target: target.clone(),
        ..Default::default()
    };
    let root = key.blob_id(b"anything");
    let err = restore(
        &root,
        &key,
        &mut Down,
        &opts,
        &mut NoProgress,
        &Cancel::default(),
    )
    .expect_err("down");
    assert!(err.is_retryable(), "{err}");

    let mut repo = Repo::new();
    let f = repo.file(b"f", b"x", 1);
    let srv = repo.dir(b"/srv", vec![f]);
    let root = repo.tree(vec![srv]);
    let mut fetch = MapFetch {
        blobs: repo.blobs.clone(),
        largest: 0,
    };
    let cancel = Cancel::default();
    cancel.cancel();
    let err = restore(
        &root,
        &repo.key,
        &mut fetch,
        &opts,
        &mut NoProgress,
        &cancel,
    )
    .expect_err("cancelled");
    assert!(matches!(err, RestoreError::Cancelled));
}

/// A capability set granting `CAP_SETUID` (permitted and effective), as the
/// kernel stores it (`vfs_cap_data`, revision 2, little endian).
fn cap_setuid() -> Xattr {
    let words: [u32; 5] = [0x0200_0001, 1 << 7, 0, 0, 0];
    Xattr {
        name: b"security.capability".to_vec(),
        value: words.iter().flat_map(|w| w.to_le_bytes()).collect(),
    }
}

/// The snapshot of a compromised host: a setuid-root program, a program with
/// a capability, a world-writable device node, a setgid shared directory and
/// a plain file with an ordinary attribute.
fn privileged_snapshot(repo: &mut Repo) -> Vec<Node> {
    let setuid = Node {
        mode: 0o4755,
        ..repo.file(b"su", b"#!/bin/sh\n", 64)
    };
    let capable = Node {
        xattrs: vec![
            cap_setuid(),
            Xattr {
                name: b"user.note".to_vec(),
                value: b"kept".to_vec(),
            },
        ],
        ..repo.file(b"ping", b"ping\n", 64)
    };
    let device = Node {
        rdev: nix::sys::stat::makedev(1, 3),
        ..node(b"null", NodeKind::CharDevice, 0o666)
    };
    let shared = Node {
        mode: 0o2775,
        ..repo.dir(b"shared", vec![])
    };
    vec![repo.dir(b"/srv", vec![setuid, capable, device, shared])]
}

#[test]
fn another_hosts_privileges_are_left_out_and_counted() {
    let mut repo = Repo::new();
    let mut roots = privileged_snapshot(&mut repo);
    // An SELinux label on a plain file: left out too.
    let labelled = Node {
        xattrs: vec![Xattr {
            name: b"security.selinux".to_vec(),
            value: b"system_u:object_r:sudo_exec_t:s0".to_vec(),
        }],
        ..repo.file(b"label", b"x\n", 64)
    };
    roots.push(repo.dir(b"/opt", vec![labelled]));
    let (_tmp, target) = target();
    let summary = repo
        .run_stripping(roots, &target, &[], true)
        .expect("restores");
    assert_eq!(summary.errors, 0, "{summary:?}");
    let s = &summary.stripped;
    assert_eq!(
        (s.setid, s.capabilities, s.labels, s.devices),
        (1, 1, 1, 1),
        "{s:?}"
    );
    assert_eq!(s.samples.len(), 4, "{s:?}");
    assert!(
        s.samples
            .iter()
            .any(|x| x.contains("opt/label") && x.contains("security labels")),
        "{s:?}"
    );
    assert!(
        s.samples
            .iter()
            .any(|x| x.contains("srv/su") && x.contains("setuid")),
        "{s:?}"
    );
    let srv = target.join("srv");
    assert_eq!(names(&srv), ["ping", "shared", "su"], "no device node");
    let mode = |p: &str| fs::metadata(srv.join(p)).expect("exists").mode() & 0o7777;
    assert_eq!(mode("su"), 0o755);
    // A directory's setgid bit raises nothing: kept.
    assert_eq!(mode("shared"), 0o2775);
    let attrs: Vec<_> = xattr::list(srv.join("ping"))
        .expect("lists attributes")
        .collect();
    assert!(
        !attrs
            .iter()
            .any(|n| n.as_encoded_bytes() == b"security.capability"),
        "{attrs:?}"
    );
}

#[test]
fn the_same_hosts_privileges_are_restored() {
    let mut repo = Repo::new();
    let roots = privileged_snapshot(&mut repo);
    let (_tmp, target) = target();
    let summary = repo
        .run_stripping(roots, &target, &[], false)
        .expect("restores");
    assert!(summary.stripped.is_empty(), "{summary:?}");
    let srv = target.join("srv");
    let mode = |p: &str| fs::metadata(srv.join(p)).expect("exists").mode() & 0o7777;
    assert_eq!(mode("su"), 0o4755);
    // Devices and capabilities need root; elsewhere they fail as errors.
    if nix::unistd::geteuid().is_root() {
        assert_eq!(summary.errors, 0, "{summary:?}");
        let meta = fs::symlink_metadata(srv.join("null")).expect("the device exists");
        assert!(meta.file_type().is_char_device());
        let cap = xattr::get(srv.join("ping"), "security.capability").expect("reads");
        assert_eq!(cap, Some(cap_setuid().value));
    }
}

/// Deterministic bytes that do not compress, so chunks keep their size.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn large_files_are_written_in_parallel_parts_and_a_damaged_part_fails_only_its_file() {
    let (_tmp, target) = target();
    let mut repo = Repo::new();
    // 20 MiB in 64 KiB chunks: three parts of at most 8 MiB, written by
    // different writers, beside many small files queued between them.
    let big = noise(20 * MIB, 1);
    let good = repo.file(b"good", &big, 64 * 1024);
    let other = noise(20 * MIB, 2);
    let bad = repo.file(b"bad", &other, 64 * 1024);
    // A chunk of the middle part.
    let sealed = repo.blobs.get_mut(&bad.content[150].id).expect("stored");
    let last = sealed.len() - 1;
    sealed[last] ^= 1;
    let mut nodes = vec![good, bad];
    let small: Vec<Vec<u8>> = (0..300)
        .map(|i| noise(100 + i * 7, i as u64 + 10))
        .collect();
    for (i, data) in small.iter().enumerate() {
        nodes.push(repo.file(format!("s{i:03}").as_bytes(), data, 512));
    }
    let srv = repo.dir(b"/srv", nodes);

    let summary = repo
        .run(vec![srv], &target, &[])
        .expect("restores the rest");
    assert_eq!((summary.files, summary.errors), (301, 1), "{summary:?}");
    assert!(
        summary.error_samples[0].contains("srv/bad: not restored"),
        "{:?}",
        summary.error_samples
    );
    assert!(fs::read(target.join("srv/good")).expect("reads") == big);
    for (i, data) in small.iter().enumerate() {
        let path = target.join(format!("srv/s{i:03}"));
        assert!(&fs::read(&path).expect("reads") == data, "{path:?}");
        let meta = fs::metadata(&path).expect("stat");
        assert_eq!(
            (meta.mode() & 0o7777, meta.mtime_nsec()),
            (0o644, 123_456_789)
        );
    }
    assert!(
        !target.join("srv/bad").exists(),
        "no partial file of the damaged one"
    );
    assert_eq!(names(&target.join("srv")).len(), 301, "no temporary left");
}

/// Storage that answers `left` requests, then is lost.
struct LostAfter {
    inner: MapFetch,
    left: usize,
}

impl Fetch for LostAfter {
    fn get(&mut self, ids: &[BlobId]) -> Result<Vec<Vec<u8>>, FetchError> {
        if self.left == 0 {
            return Err(FetchError {
                message: "connection lost".into(),
                retryable: true,
            });
        }
        self.left -= 1;
        self.inner.get(ids)
    }
}

#[test]
fn storage_lost_in_the_middle_of_a_large_file_stops_and_leaves_no_partial_file() {
    let (_tmp, target) = target();
    let mut repo = Repo::new();
    let big = noise(20 * MIB, 3);
    let file = repo.file(b"big", &big, 64 * 1024);
    let srv = repo.dir(b"/srv", vec![file]);
    let root = repo.tree(vec![srv]);
    // The root tree, /srv's tree, and the first part of the file.
    let mut fetch = LostAfter {
        inner: MapFetch {
            blobs: repo.blobs.clone(),
            largest: 0,
        },
        left: 3,
    };
    let opts = RestoreOptions {
        target: target.clone(),
        ..Default::default()
    };
    let err = restore(
        &root,
        &repo.key,
        &mut fetch,
        &opts,
        &mut NoProgress,
        &Cancel::default(),
    )
    .expect_err("storage lost");
    assert!(err.is_retryable(), "{err}");
    assert_eq!(fetch.left, 0, "the loss came after a part was sent");
    assert_eq!(
        names(&target.join("srv")),
        Vec::<String>::new(),
        "no partial file, no temporary left"
    );
}

#[test]
fn a_large_file_with_several_names_is_linked_once_written() {
    let (_tmp, target) = target();
    let mut repo = Repo::new();
    let big = noise(10 * MIB, 4);
    let mut one = repo.file(b"one", &big, 64 * 1024);
    (one.nlink, one.dev, one.inode) = (3, 5, 43);
    let two = Node {
        name: b"two".to_vec(),
        ..one.clone()
    };
    let three = Node {
        name: b"three".to_vec(),
        ..one.clone()
    };
    let sub = repo.dir(b"sub", vec![three]);
    let srv = repo.dir(b"/srv", vec![one, two, sub]);

    let summary = repo.run(vec![srv], &target, &[]).expect("restores");
    assert_eq!(
        (summary.files, summary.hardlinks, summary.errors),
        (1, 2, 0)
    );
    let one = fs::metadata(target.join("srv/one")).expect("exists");
    assert_eq!(one.nlink(), 3);
    assert_eq!(
        fs::metadata(target.join("srv/sub/three"))
            .expect("exists")
            .ino(),
        one.ino()
    );
    assert!(fs::read(target.join("srv/two")).expect("reads") == big);
}

/// Storage that logs every request and, after `left` of them, is lost or
/// has the restore cancelled.
struct Scripted {
    inner: MapFetch,
    log: Vec<Vec<BlobId>>,
    left: usize,
    cancel: Option<Cancel>,
}

impl Fetch for Scripted {
    fn get(&mut self, ids: &[BlobId]) -> Result<Vec<Vec<u8>>, FetchError> {
        if self.left == 0 {
            match &self.cancel {
                Some(c) => c.cancel(),
                None => {
                    return Err(FetchError {
                        message: "connection lost".into(),
                        retryable: true,
                    })
                }
            }
        }
        self.left = self.left.saturating_sub(1);
        self.log.push(ids.to_vec());
        self.inner.get(ids)
    }
}

/// Six 20 MiB files of three parts each, under /srv.
fn six_large_files(repo: &mut Repo) -> (Vec<Vec<u8>>, Vec<Node>, BlobId) {
    let datas: Vec<Vec<u8>> = (0..6).map(|i| noise(20 * MIB, 100 + i)).collect();
    let files: Vec<Node> = datas
        .iter()
        .enumerate()
        .map(|(i, d)| repo.file(format!("f{i}").as_bytes(), d, 64 * 1024))
        .collect();
    let srv = repo.dir(b"/srv", files.clone());
    let root = repo.tree(vec![srv]);
    (datas, files, root)
}

fn run_scripted(
    repo: &Repo,
    root: &BlobId,
    target: &Path,
    left: usize,
    cancel: Option<Cancel>,
) -> (Result<RestoreSummary, RestoreError>, Vec<Vec<BlobId>>) {
    let mut fetch = Scripted {
        inner: MapFetch {
            blobs: repo.blobs.clone(),
            largest: 0,
        },
        log: Vec::new(),
        left,
        cancel: cancel.clone(),
    };
    let opts = RestoreOptions {
        target: target.to_path_buf(),
        ..Default::default()
    };
    let result = restore(
        root,
        &repo.key,
        &mut fetch,
        &opts,
        &mut NoProgress,
        &cancel.unwrap_or_default(),
    );
    (result, fetch.log)
}

#[test]
fn several_large_files_are_sent_in_turns_and_all_arrive_whole() {
    let (_tmp, target) = target();
    let mut repo = Repo::new();
    let (datas, files, root) = six_large_files(&mut repo);
    let (summary, log) = run_scripted(&repo, &root, &target, usize::MAX, None);
    let summary = summary.expect("restores");
    assert_eq!((summary.files, summary.errors), (6, 0), "{summary:?}");
    for (i, data) in datas.iter().enumerate() {
        assert!(fs::read(target.join(format!("srv/f{i}"))).expect("reads") == *data);
    }
    // Which file each content request was for, in the order asked.
    let owner: HashMap<BlobId, usize> = files
        .iter()
        .enumerate()
        .flat_map(|(i, f)| f.content.iter().map(move |c| (c.id, i)))
        .collect();
    let order: Vec<usize> = log
        .iter()
        .filter_map(|ids| ids.first().and_then(|id| owner.get(id)).copied())
        .collect();
    assert_eq!(order.len(), 18, "three parts per file: {order:?}");
    // f1's first part is asked for before f0's last: the files take turns
    // rather than one being sent whole before the next starts.
    let first_of = |f| order.iter().position(|&o| o == f).expect("asked");
    let last_of = |f| order.iter().rposition(|&o| o == f).expect("asked");
    assert!(first_of(1) < last_of(0), "{order:?}");
    assert!(first_of(4) < last_of(3), "{order:?}");
}

#[test]
fn storage_lost_or_cancel_while_large_files_take_turns_leaves_no_partial_file() {
    for cancelled in [false, true] {
        let (_tmp, target) = target();
        let mut repo = Repo::new();
        let (_, _, root) = six_large_files(&mut repo);
        let cancel = cancelled.then(Cancel::default);
        // The two trees and seven parts: several files are half sent.
        let (result, log) = run_scripted(&repo, &root, &target, 9, cancel);
        let err = result.expect_err("the restore stops");
        if cancelled {
            assert!(matches!(err, RestoreError::Cancelled), "{err}");
        } else {
            assert!(err.is_retryable(), "{err}");
        }
        assert!(log.len() >= 9, "the stop came after parts were sent");
        assert_eq!(
            names(&target.join("srv")),
            Vec::<String>::new(),
            "no partial file, no temporary left (cancelled: {cancelled})"
        );
    }
}
