//! Recover tests: a repository the backup engine writes into a temporary
//! directory, read back with nothing else running.

use std::collections::{BTreeMap, HashSet};
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};

use filetime::FileTime;
use flotilla_protocol::repo::{BlobKind, REPO_FORMAT};
use flotilla_protocol::HostName;

use super::*;
use crate::engine::{backup, BackupOptions, NoCache, NoProgress, Store, StoreError};
use crate::repository::{PackWriter, Repository};

const MASTER: [u8; 32] = [0x5a; 32];
const OTHER_MASTER: [u8; 32] = [0xa5; 32];
/// 2001-09-09T01:46:40.123456789Z.
const MTIME: (i64, u32) = (1_000_000_000, 123_456_789);

/// Blobs into a real repository, as the storage agent stores a source's.
struct RepoStore {
    repo: Repository,
    writer: Option<PackWriter>,
    put: HashSet<BlobId>,
}

impl Store for RepoStore {
    fn missing(&mut self, ids: &[BlobId]) -> Result<Vec<BlobId>, StoreError> {
        Ok(self
            .repo
            .missing(ids)
            .into_iter()
            .filter(|id| !self.put.contains(id))
            .collect())
    }

    fn put(&mut self, id: BlobId, kind: BlobKind, sealed: Vec<u8>) -> Result<(), StoreError> {
        let repo = &self.repo;
        let writer = self.writer.get_or_insert_with(|| repo.pack_writer());
        writer.add(id, kind, &sealed).map_err(|e| StoreError {
            message: e.to_string(),
            retryable: false,
        })?;
        self.put.insert(id);
        Ok(())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Files with awkward modes, ns mtimes, a subdirectory, a symlink, an
/// empty file and one of several chunks, under `root`.
fn make_tree(root: &Path) {
    let mtime = FileTime::from_unix_time(MTIME.0, MTIME.1);
    fs::create_dir_all(root.join("sub")).expect("mkdir");
    let big: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    for (name, data, mode) in [
        ("a.txt", b"hello, recovery\n".to_vec(), 0o640),
        ("big.bin", big, 0o600),
        ("empty", Vec::new(), 0o644),
        ("run.sh", b"#!/bin/sh\necho hi\n".to_vec(), 0o755),
        ("sub/b.txt", b"below\n".to_vec(), 0o444),
    ] {
        let path = root.join(name);
        fs::write(&path, data).expect("write");
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).expect("chmod");
        filetime::set_file_mtime(&path, mtime).expect("set mtime");
    }
    symlink("a.txt", root.join("link")).expect("symlink");
    fs::set_permissions(root.join("sub"), fs::Permissions::from_mode(0o750)).expect("chmod");
    filetime::set_file_mtime(root.join("sub"), mtime).expect("set mtime");
}

/// Backs up `root` into the repository in `repo_dir` with `key` and
/// commits it as snapshot `id` of `host` (a record's `host` may be
/// changed after sealing with `forged_host`, as a storage host could).
fn back_up(
    repo_dir: &Path,
    root: &Path,
    key: &RepoKey,
    id: &str,
    host: &str,
    forged_host: Option<&str>,
) {
    let repo = Repository::open_or_init(repo_dir).expect("open the repository");
    let mut store = RepoStore {
        repo: repo.clone(),
        writer: None,
        put: HashSet::new(),
    };
    let opts = BackupOptions {
        paths: vec![root.to_path_buf()],
        excludes: Vec::new(),
        zstd_level: 3,
    };
    let outcome = backup(
        &opts,
        key,
        &mut store,
        &NoCache,
        &mut NoProgress,
        &Cancel::default(),
    )
    .expect("back up");
    if let Some(writer) = store.writer.take() {
        writer.finish().expect("finish the pack");
    }
    let time = 1_700_000_000_000 + id.len() as u64 * 1000 + u64::from(id.as_bytes()[31]);
    let meta = SnapshotMeta {
        v: REPO_FORMAT,
        paths: vec![root.display().to_string()],
        excludes: Vec::new(),
        task_id: TaskId::random(),
        summary: outcome.summary.clone(),
        unreadable: Vec::new(),
        tree: Some(outcome.tree),
        host: Some(host.to_owned()),
        time: Some(time),
    };
    let plain = flotilla_protocol::encode(&meta).expect("encode meta");
    let sealed = key
        .seal_meta(&SnapshotRecord::meta_context(id), &plain)
        .expect("seal meta");
    let record = SnapshotRecord {
        v: REPO_FORMAT,
        id: id.to_owned(),
        host: HostName::new(forged_host.unwrap_or(host)).expect("host name"),
        time,
        tree: outcome.tree,
        partial: false,
        blobs: outcome.blobs.clone(),
        meta: sealed,
    };
    repo.commit_snapshot(&record).expect("commit");
}

/// Names, kinds, sizes and ns mtimes of everything under `dir`.
fn listing(dir: &Path) -> BTreeMap<PathBuf, (bool, u64, i64, i64)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).expect("list") {
            let path = entry.expect("entry").path();
            let meta = fs::symlink_metadata(&path).expect("stat");
            if meta.is_dir() {
                stack.push(path.clone());
            }
            out.insert(
                path,
                (meta.is_dir(), meta.len(), meta.mtime(), meta.mtime_nsec()),
            );
        }
    }
    out
}

/// Differences between `original` and `restored`: kinds, contents,
/// permission bits, ns mtimes (not of symlinks), link targets.
fn differences(original: &Path, restored: &Path) -> Vec<String> {
    let mut diffs = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for entry in fs::read_dir(original.join(&rel)).expect("list") {
            let rel = rel.join(entry.expect("entry").file_name());
            let (a, b) = (original.join(&rel), restored.join(&rel));
            let ma = fs::symlink_metadata(&a).expect("stat original");
            let Ok(mb) = fs::symlink_metadata(&b) else {
                diffs.push(format!("{}: missing", rel.display()));
                continue;
            };
            if ma.file_type() != mb.file_type() {
                diffs.push(format!("{}: another kind", rel.display()));
                continue;
            }
            if ma.is_dir() {
                stack.push(rel.clone());
            }
            if ma.file_type().is_symlink() {
                if fs::read_link(&a).ok() != fs::read_link(&b).ok() {
                    diffs.push(format!("{}: link target", rel.display()));
                }
                continue;
            }
            if ma.is_file() && fs::read(&a).ok() != fs::read(&b).ok() {
                diffs.push(format!("{}: contents", rel.display()));
            }
            if ma.mode() & 0o7777 != mb.mode() & 0o7777 {
                diffs.push(format!(
                    "{}: mode {:o} restored as {:o}",
                    rel.display(),
                    ma.mode() & 0o7777,
                    mb.mode() & 0o7777
                ));
            }
            if (ma.mtime(), ma.mtime_nsec()) != (mb.mtime(), mb.mtime_nsec()) {
                diffs.push(format!(
                    "{}: mtime {}.{:09} restored as {}.{:09}",
                    rel.display(),
                    ma.mtime(),
                    ma.mtime_nsec(),
                    mb.mtime(),
                    mb.mtime_nsec()
                ));
            }
        }
    }
    diffs
}

fn no_passphrase(path: &Path) -> Result<Vec<u8>, RecoverError> {
    Err(RecoverError::NoPassphrase {
        path: path.to_path_buf(),
        why: "no terminal in tests".into(),
    })
}

fn context(hostname: &str) -> Context {
    Context {
        passphrase: no_passphrase,
        hostname: Some(hostname.to_owned()),
        ctrl_c: false,
        progress: false,
    }
}

fn args(repo: &Path, key_file: &Path) -> RecoverArgs {
    RecoverArgs {
        repo: repo.to_path_buf(),
        key_file: key_file.to_path_buf(),
        list: false,
        snapshot: None,
        to: None,
        includes: Vec::new(),
        json: false,
        preserve_special: false,
    }
}

/// `run` with its stdout as text.
fn run_captured(args: &RecoverArgs, host: &str) -> (Result<(), RecoverError>, String) {
    let mut out = Vec::new();
    let result = run(args, &context(host), &mut out);
    (result, String::from_utf8_lossy(&out).into_owned())
}

/// A world: a source tree backed up twice (ids sharing a prefix) and
/// once more under a forged host, and the fleet's `repo.key`.
struct World {
    _tmp: tempfile::TempDir,
    base: PathBuf,
    root: PathBuf,
    repo: PathBuf,
    key_file: PathBuf,
}

const FIRST: &str = "aaaa0000000000000000000000000001";
const SECOND: &str = "aaaa0000000000000000000000000002";
const FORGED: &str = "bbbb0000000000000000000000000003";

fn world() -> World {
    let tmp = tempfile::tempdir().expect("tempdir");
    let base = fs::canonicalize(tmp.path()).expect("canonical");
    let root = base.join("laptop-data");
    make_tree(&root);
    let repo = base.join("repo");
    let key = RepoKey::from_master(&MASTER);
    back_up(&repo, &root, &key, FIRST, "laptop", None);
    back_up(&repo, &root, &key, SECOND, "laptop", None);
    back_up(&repo, &root, &key, FORGED, "laptop", Some("mallory"));
    let key_file = base.join("repo.key");
    fs::write(&key_file, format!("{}\n", hex(&MASTER))).expect("write repo.key");
    World {
        _tmp: tmp,
        base,
        root,
        repo,
        key_file,
    }
}

#[test]
fn lists_and_restores_byte_for_byte_and_changes_nothing_in_the_repository() {
    let w = world();
    let before = listing(&w.repo);

    let mut list = args(&w.repo, &w.key_file);
    list.list = true;
    list.json = true;
    let (result, out) = run_captured(&list, "laptop");
    result.expect("list");
    let views: serde_json::Value = serde_json::from_str(&out).expect("one JSON array");
    let views = views.as_array().expect("an array");
    assert_eq!(views.len(), 3, "{out}");
    let ids: Vec<&str> = views.iter().filter_map(|v| v["id"].as_str()).collect();
    assert_eq!(ids, [FIRST, SECOND, FORGED], "sorted by time");
    let first = &views[0];
    assert_eq!(first["verified"], true, "{out}");
    assert_eq!(first["host"], "laptop");
    assert_eq!(first["files"], 5, "{out}");
    assert_eq!(first["paths"][0], w.root.display().to_string());
    let forged = &views[2];
    assert_eq!(forged["verified"], false, "{out}");
    assert_eq!(forged["host"], "mallory");
    assert!(
        forged["problem"]
            .as_str()
            .is_some_and(|p| p.contains("tampered")),
        "{out}"
    );

    list.json = false;
    let (result, table) = run_captured(&list, "laptop");
    result.expect("list as a table");
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 4, "{table}");
    assert!(lines[0].starts_with("ID"), "{table}");
    assert!(lines[1].starts_with("aaaa0000"), "{table}");
    assert!(lines[3].contains("not trusted"), "{table}");

    let target = w.base.join("restored");
    let mut restore = args(&w.repo, &w.key_file);
    restore.snapshot = Some("aaaa0000000000000000000000000001".into());
    restore.to = Some(target.clone());
    let (result, out) = run_captured(&restore, "laptop");
    result.expect("restore");
    assert!(out.contains("restored 5 files"), "{out}");
    let restored = target.join(w.root.strip_prefix("/").expect("absolute"));
    let diffs = differences(&w.root, &restored);
    assert!(diffs.is_empty(), "{diffs:#?}");

    // A part of it, with JSON output, onto "another host": nothing
    // privileged in this tree, so nothing is left out.
    let part = w.base.join("part");
    restore.to = Some(part.clone());
    restore.includes = vec![w.root.join("sub").display().to_string()];
    restore.json = true;
    let (result, out) = run_captured(&restore, "desktop");
    result.expect("restore a part");
    let summary: serde_json::Value = serde_json::from_str(out.trim()).expect("a JSON line");
    assert_eq!(summary["type"], "summary");
    assert_eq!(summary["restore"]["files"], 1, "{out}");
    assert_eq!(summary["restore"]["errors"], 0, "{out}");
    let part_root = part.join(w.root.strip_prefix("/").expect("absolute"));
    assert!(part_root.join("sub/b.txt").is_file());
    assert!(!part_root.join("a.txt").exists());

    assert_eq!(listing(&w.repo), before, "the repository changed");
}

#[test]
fn a_forged_record_is_never_restored() {
    let w = world();
    let mut restore = args(&w.repo, &w.key_file);
    restore.snapshot = Some("bbbb".into());
    restore.to = Some(w.base.join("forged"));
    let (result, _) = run_captured(&restore, "laptop");
    let err = result.expect_err("a forged record");
    assert!(matches!(err, RecoverError::Unverified { .. }), "{err}");
    assert_eq!(err.exit_code(), EXIT_FAILURE);
    assert!(!w.base.join("forged").exists(), "nothing was created");
}

#[test]
fn a_wrong_key_fails_clearly() {
    let w = world();
    let before = listing(&w.repo);
    let wrong = w.base.join("other.key");
    fs::write(&wrong, hex(&OTHER_MASTER)).expect("write the other key");
    let mut list = args(&w.repo, &wrong);
    list.list = true;
    let (result, out) = run_captured(&list, "laptop");
    let err = result.expect_err("another fleet's key");
    assert!(
        matches!(err, RecoverError::WrongKey { count: 3, .. }),
        "{err}"
    );
    let message = err.to_string();
    assert!(message.contains("another fleet's key"), "{message}");
    assert!(message.contains(&wrong.display().to_string()), "{message}");
    assert!(out.is_empty(), "nothing listed: {out}");

    let mut restore = args(&w.repo, &wrong);
    restore.snapshot = Some(FIRST.into());
    restore.to = Some(w.base.join("nope"));
    let (result, _) = run_captured(&restore, "laptop");
    assert!(matches!(
        result.expect_err("another fleet's key"),
        RecoverError::WrongKey { .. }
    ));
    assert_eq!(listing(&w.repo), before, "the repository changed");
}

#[test]
fn unknown_ambiguous_and_malformed_prefixes_fail_clearly() {
    let w = world();
    let mut restore = args(&w.repo, &w.key_file);
    restore.to = Some(w.base.join("t"));
    for (prefix, want) in [
        ("cccc", "no snapshot cccc"),
        ("aaaa", "2 snapshots start with aaaa"),
        ("xyz", "1 to 32 hex digits"),
    ] {
        restore.snapshot = Some(prefix.into());
        let (result, _) = run_captured(&restore, "laptop");
        let err = result.expect_err(prefix);
        assert_eq!(err.exit_code(), EXIT_USAGE, "{err}");
        assert!(err.to_string().contains(want), "{prefix}: {err}");
    }
    restore.snapshot = Some("AAAA0000000000000000000000000002".into());
    let (result, _) = run_captured(&restore, "laptop");
    result.expect("an upper-case id is the same id");

    restore.to = Some(PathBuf::from("relative/dir"));
    let (result, _) = run_captured(&restore, "laptop");
    assert!(matches!(
        result.expect_err("a relative --to"),
        RecoverError::TargetNotAbsolute { .. }
    ));
    restore.to = Some(w.repo.join("inside"));
    let (result, _) = run_captured(&restore, "laptop");
    assert!(matches!(
        result.expect_err("--to inside the repository"),
        RecoverError::TargetInRepository { .. }
    ));
    assert!(!w.repo.join("inside").exists());
    // A target that holds the repository (`--to /` on the storage host) is
    // refused too: the snapshot could hold the repository's own path.
    let parent = w.repo.parent().expect("the repository has a parent");
    restore.to = Some(parent.to_path_buf());
    let (result, _) = run_captured(&restore, "laptop");
    assert!(matches!(
        result.expect_err("--to holding the repository"),
        RecoverError::TargetInRepository { .. }
    ));
}

#[test]
fn a_bundle_with_the_key_works_and_one_without_says_so() {
    let w = world();
    let bundle = |repo_key: Option<String>| Bundle {
        version: flotilla_protocol::BUNDLE_VERSION,
        fleet: "f".repeat(32),
        host: HostName::new("laptop").expect("host name"),
        nats_url: "tls://nats.lan:4222".into(),
        coordinator_key: "11".repeat(32),
        ca_cert: "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n".into(),
        cert: "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n".into(),
        key: "-----BEGIN PRIVATE KEY-----\n-----END PRIVATE KEY-----\n".into(),
        repo_key,
        nats_creds: None,
    };
    let with = w.base.join("laptop.toml");
    fs::write(&with, bundle(Some(hex(&MASTER))).to_toml()).expect("write");
    let without = w.base.join("nas.toml");
    fs::write(&without, bundle(None).to_toml()).expect("write");
    assert_eq!(
        KeyFormat::detect(&fs::read(&with).expect("read")),
        KeyFormat::Bundle
    );

    let mut list = args(&w.repo, &with);
    list.list = true;
    let (result, out) = run_captured(&list, "laptop");
    result.expect("list with a bundle");
    assert!(out.contains("aaaa0000"), "{out}");

    list.key_file = without.clone();
    let (result, _) = run_captured(&list, "laptop");
    let err = result.expect_err("no key in the bundle");
    assert!(
        matches!(err, RecoverError::BundleWithoutKey { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("--no-repo-key"), "{err}");
}

fn right_passphrase(_: &Path) -> Result<Vec<u8>, RecoverError> {
    Ok(b"correct horse battery staple".to_vec())
}

fn wrong_passphrase(_: &Path) -> Result<Vec<u8>, RecoverError> {
    Ok(b"incorrect horse battery staple".to_vec())
}

#[test]
fn an_exported_key_file_opens_with_its_passphrase_only() {
    use flotilla_protocol::keyfile::{
        self, KdfParams, KeyFileBody, KeyFileEntry, KEYFILE_VERSION, NONCE_LEN, SALT_LEN,
    };
    let w = world();
    let body = KeyFileBody {
        v: KEYFILE_VERSION,
        fleet_id: "3f2a9c0d1e2b4a5f".into(),
        exported_at: "2026-03-01T15:00:00Z".into(),
        entries: vec![KeyFileEntry {
            path: keyfile::REPO_KEY_PATH.into(),
            mode: 0o600,
            data: format!("{}\n", hex(&MASTER)).into_bytes(),
        }],
    };
    // The cheapest parameters the format accepts: tests stay fast.
    let params = KdfParams {
        m_kib: KdfParams::MIN_M_KIB,
        t: 1,
        p: 1,
    };
    let sealed = keyfile::seal(
        &body,
        &right_passphrase(&w.base).expect("a passphrase"),
        params,
        [7; SALT_LEN],
        [9; NONCE_LEN],
    )
    .expect("seal");
    let file = w.base.join("fleet.flotilla-key");
    fs::write(&file, &sealed).expect("write the key file");
    assert_eq!(KeyFormat::detect(&sealed), KeyFormat::KeyFile);

    let mut list = args(&w.repo, &file);
    list.list = true;
    let mut out = Vec::new();
    let right = Context {
        passphrase: right_passphrase,
        ..context("laptop")
    };
    run(&list, &right, &mut out).expect("list with the key file");
    assert!(String::from_utf8_lossy(&out).contains("aaaa0000"));

    let wrong = Context {
        passphrase: wrong_passphrase,
        ..context("laptop")
    };
    let err = run(&list, &wrong, &mut Vec::new()).expect_err("a wrong passphrase");
    assert!(matches!(err, RecoverError::KeyFile { .. }), "{err}");
    assert!(
        err.to_string().contains(&file.display().to_string()),
        "{err}"
    );
}

#[test]
fn key_formats_are_told_apart_by_content() {
    assert_eq!(KeyFormat::detect(hex(&MASTER).as_bytes()), KeyFormat::Hex);
    assert_eq!(
        KeyFormat::detect(format!("  {}\n", hex(&MASTER)).as_bytes()),
        KeyFormat::Hex
    );
    assert_eq!(KeyFormat::detect(b"\x00\x01binary"), KeyFormat::KeyFile);
    assert_eq!(
        KeyFormat::detect(b"v = 1\nsalt = \"x\"\n"),
        KeyFormat::KeyFile
    );
    assert_eq!(KeyFormat::detect(b"abc"), KeyFormat::KeyFile);
    // A key file needs its passphrase; without one the message names
    // the variable.
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = tmp.path().join("fleet.key");
    fs::write(&file, b"\x00\x01not hex, not a bundle").expect("write");
    let err = load_key(&file, no_passphrase).err().expect("no passphrase");
    assert!(err.to_string().contains(PASSPHRASE_ENV), "{err}");
}

#[test]
fn a_repository_in_use_or_missing_is_refused_without_a_trace() {
    let w = world();
    let holder = Repository::open_or_init(&w.repo).expect("an agent holds it");
    let before = listing(&w.repo);
    let mut list = args(&w.repo, &w.key_file);
    list.list = true;
    let (result, _) = run_captured(&list, "laptop");
    let err = result.expect_err("in use");
    assert!(matches!(err, RecoverError::InUse { .. }), "{err}");
    assert!(err.to_string().contains("stop it first"), "{err}");
    drop(holder);
    assert_eq!(listing(&w.repo), before);

    let empty = w.base.join("empty");
    fs::create_dir(&empty).expect("mkdir");
    list.repo = empty.clone();
    let (result, _) = run_captured(&list, "laptop");
    assert!(matches!(
        result.expect_err("no repository"),
        RecoverError::NotARepository { .. }
    ));
    assert_eq!(
        fs::read_dir(&empty).expect("list").count(),
        0,
        "nothing created"
    );
}

#[test]
fn a_damaged_blob_fails_its_file_not_the_restore() {
    let w = world();
    // Flip a byte in the middle of the largest pack: big.bin's chunks
    // are most of it.
    let packs = w.repo.join("packs");
    let mut largest: Option<(PathBuf, u64)> = None;
    for dir in fs::read_dir(&packs).expect("list packs") {
        for pack in fs::read_dir(dir.expect("entry").path()).expect("list") {
            let path = pack.expect("entry").path();
            let len = fs::metadata(&path).expect("stat").len();
            if largest.as_ref().is_none_or(|(_, l)| len > *l) {
                largest = Some((path, len));
            }
        }
    }
    let (pack, len) = largest.expect("a pack");
    let mut bytes = fs::read(&pack).expect("read the pack");
    let middle = usize::try_from(len / 2).expect("fits");
    bytes[middle] ^= 0xff;
    fs::write(&pack, &bytes).expect("damage the pack");
    let before = listing(&w.repo);

    let mut restore = args(&w.repo, &w.key_file);
    restore.snapshot = Some(FIRST.into());
    restore.to = Some(w.base.join("damaged"));
    let (result, out) = run_captured(&restore, "laptop");
    let err = result.expect_err("some files fail");
    assert!(
        matches!(err, RecoverError::Partial { errors, .. } if errors >= 1),
        "{err}"
    );
    assert_eq!(err.exit_code(), EXIT_PARTIAL);
    assert!(out.contains("error:"), "{out}");
    let restored = w
        .base
        .join("damaged")
        .join(w.root.strip_prefix("/").expect("absolute"));
    assert_eq!(
        fs::read(restored.join("a.txt")).expect("the small file is restored"),
        b"hello, recovery\n"
    );
    assert_eq!(
        listing(&w.repo),
        before,
        "nothing recorded in the repository"
    );
}

#[test]
fn tables_and_times_read_as_flotilla_prints_them() {
    let lines = table(
        &["ID", "FILES", "PATHS"],
        &[1],
        vec![
            vec!["abcd".into(), "5".into(), "/home".into()],
            vec!["ef".into(), "12345".into(), String::new()],
        ],
    );
    assert_eq!(
        lines,
        ["ID    FILES  PATHS", "abcd      5  /home", "ef    12345"]
    );
    assert_eq!(when(1_772_377_200_250), "2026-03-01 15:00:00 UTC");
    assert_eq!(rfc3339(1_772_377_200_250), "2026-03-01T15:00:00.250Z");
    assert_eq!(rfc3339(u64::MAX), format!("@{}ms", u64::MAX));
    assert_eq!(text::bytes(1536), "1.5 KiB");
    assert!(same_host("laptop.lan", "laptop"));
    assert!(same_host("LAPTOP", "laptop"));
    assert!(!same_host("desktop", "laptop"));
}
