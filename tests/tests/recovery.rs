//! Disaster recovery (issue 13), as `docs/disaster-recovery.md` tells it:
//! the fleet is lost (every agent and the nats-server stopped, the fleet
//! directory and the NATS store deleted) and only the key file `flotilla
//! key export` wrote, the storage host's repository directory and the hosts'
//! bundles are left.
//!
//! - `flotilla-agent recover` lists the snapshots and restores one byte for
//!   byte (contents, modes, mtimes) from the repository directory alone,
//!   with the key file or a host's bundle as the key, and changes nothing
//!   in the repository; `flotilla key import` rebuilds the fleet directory
//!   file for file.
//! - A fleet directory imported on "a new coordinator", with a new NATS
//!   store, takes its hosts back: the agents reconnect with the bundles they
//!   have, the old snapshot is listed and restored, and backups go on.
//! - A stolen laptop is revoked (its NATS user refused, `hosts` says so, a
//!   key file exported again knows it), its snapshot restores onto another
//!   host, and a new machine enrolled under its name takes its place.
//! - A new storage host, enrolled again under the dead one's name, takes
//!   over its disk: the old snapshot is listed, checked and restored, and
//!   the next backup into it is incremental.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, Permissions};
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use flotilla_protocol::permissions::{inbox_prefix, Role};
use flotilla_protocol::{Bundle, HostName};
use flotilla_tests::{
    binaries, check_report, connect_as, restored_path, summary_of, write_bytes, write_random,
    Agent, CliOutput, Compare, DirStats, Fleet, NatsServer, STARTUP_TIMEOUT,
};
use serde_json::Value;

use super::dataplane::{
    assert_exit, assert_same_tree, backup_ok, pack_bytes, restore_ok, snapshot_of, start_world,
};
use super::path_str;

/// The key file's passphrase (`flotilla key export` wants 12 characters or more).
const PASSPHRASE: &str = "correct horse battery staple";
/// Where both binaries read the passphrase from.
const PASSPHRASE_ENV: &str = "FLOTILLA_PASSPHRASE";
/// How long a stopping agent may take.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// An mtime with nanoseconds: 2001-09-09T01:46:40.123456789Z.
const MTIME: Duration = Duration::new(1_000_000_000, 123_456_789);
const MIB: u64 = 1 << 20;

// ---- helpers ---------------------------------------------------------------

/// Runs `bin ARGS…` with `envs` and no other `FLOTILLA_*` variable, stdin
/// closed (so nothing can wait for a passphrase typed on a terminal).
fn run_with_env<I, S>(bin: &Path, args: I, envs: &[(&str, &str)]) -> CliOutput
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let mut cmd = Command::new(bin);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("FLOTILLA_") {
            cmd.env_remove(key);
        }
    }
    cmd.args(&args)
        .envs(envs.iter().copied())
        .env("NO_COLOR", "1");
    let out = cmd.output().expect("run a flotilla binary");
    let mut command: Vec<String> = envs.iter().map(|(k, _)| format!("{k}=…")).collect();
    command.push(
        bin.file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
    );
    command.extend(args.iter().map(|a| a.to_string_lossy().into_owned()));
    CliOutput {
        command: command.join(" "),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        timed_out: false,
    }
}

/// `flotilla ARGS…` with the passphrase in the environment.
fn flotilla<I, S>(args: I) -> CliOutput
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    run_with_env(&binaries().flotilla, args, &[(PASSPHRASE_ENV, PASSPHRASE)])
}

/// `flotilla-agent recover --repo REPO --key-file KEY ARGS…`, with
/// `passphrase` in the environment when given.
fn recover(repo: &Path, key: &Path, args: &[&str], passphrase: Option<&str>) -> CliOutput {
    let mut all: Vec<OsString> = vec![
        "recover".into(),
        "--repo".into(),
        repo.into(),
        "--key-file".into(),
        key.into(),
    ];
    all.extend(args.iter().map(OsString::from));
    let envs: Vec<(&str, &str)> = passphrase
        .map(|p| (PASSPHRASE_ENV, p))
        .into_iter()
        .collect();
    run_with_env(&binaries().agent, all, &envs)
}

/// `flotilla key export --out KEY_FILE [--force]` of `fleet`'s directory,
/// with the passphrase in the environment.
fn export_key(fleet: &Fleet, key_file: &Path, force: bool) -> CliOutput {
    let fleet_dir = fleet.fleet_dir();
    let mut args: Vec<&OsStr> = vec![
        OsStr::new("key"),
        OsStr::new("export"),
        OsStr::new("--out"),
        key_file.as_os_str(),
        OsStr::new("--fleet"),
        fleet_dir.as_os_str(),
    ];
    if force {
        args.push(OsStr::new("--force"));
    }
    flotilla(args)
}

/// Connects to `fleet`'s bus as the NATS user inside `bundle` (a bundle file
/// of `host`), as whoever holds a copy of that file can: `Ok` when the
/// server lets it in.
fn connect_with_bundle(fleet: &Fleet, host: &str, bundle: &Path) -> anyhow::Result<()> {
    let text = fs::read_to_string(bundle).expect("read the bundle");
    let creds = Bundle::parse(&text)
        .expect("parse the bundle")
        .nats_creds
        .expect("the bundle holds NATS credentials");
    let creds_path = bundle.with_extension("creds");
    fs::write(&creds_path, creds).expect("write the .creds file");
    let prefix = inbox_prefix(&Role::Host(HostName::new(host).expect("a host name")));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("start a runtime for a NATS connection");
    // The client is dropped inside the runtime that drives it.
    runtime.block_on(async {
        connect_as(fleet.nats_url(), &creds_path, &fleet.ca_path(), &prefix)
            .await
            .map(drop)
    })
}

/// Fails the test unless the bus refuses the NATS user in `bundle` as not
/// authorized (`whose` says whose it is, for the message).
fn assert_refused(fleet: &Fleet, host: &str, bundle: &Path, whose: &str) {
    match connect_with_bundle(fleet, host, bundle) {
        Ok(()) => fleet.fail(format!("{whose} still connects to the bus")),
        Err(e) => {
            let why = format!("{e:#}").to_lowercase();
            assert!(
                why.contains("authorization"),
                "{whose} was refused for another reason: {why}"
            );
        }
    }
}

/// Waits until `host` is listed offline (for any reason): its agent is
/// gone, so that the next time it is listed online, a new agent is.
fn wait_listed_offline(fleet: &Fleet, host: &str) {
    let what = format!("{host} to be listed offline");
    fleet.wait_for(&what, STARTUP_TIMEOUT, || match fleet.host(host)? {
        Some(entry) if entry["status"] == "offline" => Ok(Some(())),
        Some(entry) => anyhow::bail!("{host}: {entry}"),
        None => anyhow::bail!("{host} is not listed"),
    });
}

/// `flotilla enroll HOST --force --out` the bundle the harness starts
/// `host`'s agent with (a new certificate and NATS user under the same
/// name), and checks that the bundle changed.
fn enroll_again(fleet: &Fleet, host: &str) {
    let bundle = fleet.bundle_path(host);
    let before = fs::read(&bundle).expect("the old bundle");
    let out = fleet
        .cli(["enroll", host, "--force", "--out", &path_str(&bundle)])
        .expect("run flotilla enroll");
    assert_exit(fleet, &out, 0, "flotilla enroll --force");
    assert_ne!(
        fs::read(&bundle).expect("the new bundle"),
        before,
        "enroll --force left {host}'s bundle as it was"
    );
}

/// A tree worth restoring: nested directories with their own modes, an
/// executable, a private file, a symlink, an empty file, a few megabytes of
/// incompressible data, and mtimes with nanoseconds.
fn build_tree(dir: &Path) {
    let put = |rel: &str, data: &[u8]| write_bytes(&dir.join(rel), data).expect("write a file");
    put("notes/today.txt", b"what to restore first\n");
    put("notes/empty", b"");
    put("bin/backup-check.sh", b"#!/bin/sh\necho ok\n");
    fs::set_permissions(
        dir.join("bin/backup-check.sh"),
        Permissions::from_mode(0o755),
    )
    .expect("chmod 0755");
    put("private/key.txt", b"not for everyone\n");
    fs::set_permissions(dir.join("private/key.txt"), Permissions::from_mode(0o600))
        .expect("chmod 0600");
    write_random(&dir.join("photos/big.raw"), 0x13, 3 << 20).expect("write random data");
    symlink("notes/today.txt", dir.join("today")).expect("create a symlink");
    for file in ["notes/today.txt", "photos/big.raw", "private/key.txt"] {
        File::options()
            .write(true)
            .open(dir.join(file))
            .and_then(|f| f.set_modified(SystemTime::UNIX_EPOCH + MTIME))
            .expect("set an mtime with nanoseconds");
    }
    fs::set_permissions(dir.join("private"), Permissions::from_mode(0o700)).expect("chmod 0700");
}

/// Every regular file below `dir` (relative path → mode and bytes).
fn files_of(dir: &Path) -> BTreeMap<PathBuf, (u32, Vec<u8>)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for entry in fs::read_dir(dir.join(&rel)).expect("list a directory") {
            let rel = rel.join(entry.expect("a directory entry").file_name());
            let path = dir.join(&rel);
            let meta = fs::symlink_metadata(&path).expect("stat");
            if meta.is_dir() {
                stack.push(rel);
            } else if meta.is_file() {
                let data = fs::read(&path).expect("read a file");
                out.insert(rel, (meta.mode() & 0o7777, data));
            }
        }
    }
    out
}

/// Names, sizes and ns mtimes of everything below `dir`: what must not
/// change when the repository is only read.
fn listing(dir: &Path) -> BTreeMap<PathBuf, (u64, i64, i64)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).expect("list a directory") {
            let path = entry.expect("a directory entry").path();
            let meta = fs::symlink_metadata(&path).expect("stat");
            if meta.is_dir() {
                stack.push(path.clone());
            }
            out.insert(path, (meta.len(), meta.mtime(), meta.mtime_nsec()));
        }
    }
    out
}

/// The world of a lost fleet: a backup of laptop into nas, the key file
/// exported, then every agent stopped, the nats-server killed, the fleet
/// directory and the NATS store deleted.
struct Lost {
    /// The agents, stopped (nas first).
    agents: Vec<Agent>,
    /// laptop's backed-up root.
    root: PathBuf,
    /// The snapshot taken.
    snapshot: String,
    /// nas's repository.
    storage: PathBuf,
    /// The key file.
    key_file: PathBuf,
    /// Every file the fleet directory held.
    fleet_files: BTreeMap<PathBuf, (u32, Vec<u8>)>,
}

/// Steps "before" (export) and the disaster itself.
fn lose_the_fleet(fleet: &Fleet, nats: &mut NatsServer) -> Lost {
    let mut agents = start_world(fleet, &["laptop"]);
    let root = agents[1].backup_root().to_path_buf();
    build_tree(&root.join("home"));
    let snapshot = snapshot_of(&backup_ok(fleet, &["laptop"])[0]);
    let storage = agents[0].storage_dir().to_path_buf();

    // Kept away from the coordinator, as the docs say.
    let vault = fleet.dir().join("vault");
    fs::create_dir_all(&vault).expect("create the vault");
    let key_file = vault.join("fleet.flotilla-key");
    let fleet_dir = fleet.fleet_dir();
    let out = export_key(fleet, &key_file, false);
    assert_exit(fleet, &out, 0, "flotilla key export");
    let mode = fs::metadata(&key_file).expect("the key file").mode() & 0o777;
    assert_eq!(mode, 0o600, "the key file is a secret: {mode:o}");
    let fleet_files = files_of(&fleet_dir);

    // The disaster: nothing runs, and the coordinator's disk is gone.
    for agent in &mut agents {
        agent.sigterm().expect("stop an agent");
        agent.wait_exit(STOP_TIMEOUT).expect("the agent stops");
    }
    nats.kill9().expect("kill nats-server");
    fs::remove_dir_all(&fleet_dir).expect("delete the fleet directory");
    for store in ["server", "jetstream"] {
        let dir = nats.dir().join(store);
        if dir.exists() {
            fs::remove_dir_all(&dir).expect("delete the NATS store");
        }
    }
    Lost {
        agents,
        root,
        snapshot,
        storage,
        key_file,
        fleet_files,
    }
}

// ---- tests -----------------------------------------------------------------

/// `docs/disaster-recovery.md`, "The storage host died" (its repository
/// survives) with the coordinator lost too: `recover` alone, then `key
/// import`.
#[test]
fn recover_reads_the_repository_with_the_whole_fleet_gone() {
    let mut nats = NatsServer::start().expect("start nats-server");
    let fleet = Fleet::init(&nats).expect("flotilla init");
    let lost = lose_the_fleet(&fleet, &mut nats);
    let repo_before = listing(&lost.storage);

    // --list --json: the snapshot, verified, with its host and paths.
    let out = recover(
        &lost.storage,
        &lost.key_file,
        &["--list", "--json"],
        Some(PASSPHRASE),
    );
    assert_exit(&fleet, &out, 0, "recover --list");
    let listed = out.json().expect("one JSON array");
    let entry = listed
        .as_array()
        .and_then(|all| all.iter().find(|s| s["id"] == lost.snapshot.as_str()))
        .cloned()
        .unwrap_or_else(|| fleet.fail(format!("{} is not listed:\n{out}", lost.snapshot)));
    assert_eq!(entry["verified"], true, "{out}");
    assert_eq!(entry["host"], "laptop", "{out}");
    assert_eq!(
        entry["paths"],
        serde_json::json!([path_str(&lost.root)]),
        "{out}"
    );
    let files = DirStats::walk(&lost.root).expect("count the files").files;
    assert_eq!(entry["files"], files, "{out}");

    // The table a person reads.
    let out = recover(&lost.storage, &lost.key_file, &["--list"], Some(PASSPHRASE));
    assert_exit(&fleet, &out, 0, "recover --list (table)");
    assert!(out.stdout.starts_with("ID"), "{out}");
    assert!(out.stdout.contains(&lost.snapshot[..8]), "{out}");

    // --snapshot PREFIX --to DIR: byte for byte, modes and mtimes.
    let target = fleet.dir().join("recovered");
    let out = recover(
        &lost.storage,
        &lost.key_file,
        &[
            "--snapshot",
            &lost.snapshot[..8],
            "--to",
            &path_str(&target),
            "--json",
        ],
        Some(PASSPHRASE),
    );
    assert_exit(&fleet, &out, 0, "recover --snapshot");
    let summary: Value = out.json().expect("one summary line");
    assert_eq!(summary["type"], "summary", "{out}");
    assert_eq!(summary["restore"]["errors"], 0, "{out}");
    assert_eq!(summary["restore"]["files"], files, "{out}");
    let restored = restored_path(&target, &lost.root);
    assert_same_tree(&fleet, &lost.root, &restored, Compare::Everything);
    for file in ["home/notes/today.txt", "home/photos/big.raw"] {
        let (a, b) = (
            fs::metadata(lost.root.join(file)).expect("stat the original"),
            fs::metadata(restored.join(file)).expect("stat the restored file"),
        );
        assert_eq!(
            (a.mtime(), a.mtime_nsec()),
            (b.mtime(), b.mtime_nsec()),
            "{file}: mtime to the nanosecond"
        );
    }

    // A host's bundle that carries the repository key is a key too.
    let bundle = fleet.bundle_path("laptop");
    let out = recover(&lost.storage, &bundle, &["--list", "--json"], None);
    assert_exit(&fleet, &out, 0, "recover with laptop's bundle");
    assert!(out.stdout.contains(&lost.snapshot), "{out}");

    // What goes wrong says so.
    let out = recover(&lost.storage, &lost.key_file, &["--list"], None);
    assert_exit(&fleet, &out, 1, "no passphrase and no terminal");
    assert!(out.stderr.contains(PASSPHRASE_ENV), "{out}");
    let out = recover(
        &lost.storage,
        &lost.key_file,
        &["--list"],
        Some("not the passphrase at all"),
    );
    assert_exit(&fleet, &out, 1, "a wrong passphrase");
    assert!(out.stderr.contains("passphrase"), "{out}");
    let unknown = if lost.snapshot.starts_with('0') {
        "1"
    } else {
        "0"
    };
    let out = recover(
        &lost.storage,
        &lost.key_file,
        &["--snapshot", unknown, "--to", &path_str(&target)],
        Some(PASSPHRASE),
    );
    assert_exit(&fleet, &out, 2, "an unknown snapshot");
    assert!(out.stderr.contains("no snapshot"), "{out}");

    assert_eq!(
        listing(&lost.storage),
        repo_before,
        "recover changed the repository"
    );

    // `flotilla key import` into a new fleet directory gives back every
    // file, the repository key first of all.
    let rebuilt = fleet.dir().join("fleet-rebuilt");
    let out = flotilla([
        OsStr::new("key"),
        OsStr::new("import"),
        lost.key_file.as_os_str(),
        OsStr::new("--fleet"),
        rebuilt.as_os_str(),
    ]);
    assert_exit(&fleet, &out, 0, "flotilla key import");
    let original_key = &lost.fleet_files[Path::new("repo.key")].1;
    assert_eq!(
        &fs::read(rebuilt.join("repo.key")).expect("the imported repo.key"),
        original_key,
        "the imported repository key is not the original"
    );
    let imported = files_of(&rebuilt);
    for (rel, (mode, data)) in &lost.fleet_files {
        match imported.get(rel) {
            Some((m, d)) => {
                assert_eq!(d, data, "{}: other content after import", rel.display());
                assert_eq!(m, mode, "{}: other mode after import", rel.display());
            }
            None => fleet.fail(format!("{} is missing after import", rel.display())),
        }
    }
}

/// `docs/disaster-recovery.md`, "The coordinator's disk died": the fleet
/// directory imported from the key file, a new NATS store, `nats-config`,
/// `doctor`, and the agents come back with the bundles they have.
#[test]
fn a_fleet_rebuilt_from_its_key_file_takes_its_hosts_back() {
    let mut nats = NatsServer::start().expect("start nats-server");
    let fleet = Fleet::init(&nats).expect("flotilla init");
    let mut lost = lose_the_fleet(&fleet, &mut nats);

    // Step 1: the fleet directory from the key file, on "the new machine"
    // (at the old path, so that the harness finds it).
    let fleet_dir = fleet.fleet_dir();
    let out = flotilla([
        OsStr::new("key"),
        OsStr::new("import"),
        lost.key_file.as_os_str(),
        OsStr::new("--fleet"),
        fleet_dir.as_os_str(),
    ]);
    assert_exit(&fleet, &out, 0, "flotilla key import");

    // Step 2: a nats-server configuration with a fresh store, and the
    // server started with it (same address: the bundles name it).
    let store = fleet.dir().join("nats-store-new");
    let config = fleet.dir().join("nats-rebuilt.conf");
    let listen = format!("{}:{}", nats.listen_host(), nats.port());
    fleet
        .cli([
            OsStr::new("nats-config"),
            OsStr::new("--listen"),
            OsStr::new(&listen),
            OsStr::new("--store"),
            store.as_os_str(),
            OsStr::new("--out"),
            config.as_os_str(),
        ])
        .expect("run flotilla nats-config")
        .ensure_success()
        .expect("flotilla nats-config");
    nats.reconfigure(&config)
        .expect("start nats-server with the new configuration");

    // Step 3: the streams and buckets, the account and revocations.
    fleet
        .cli(["doctor"])
        .expect("run flotilla doctor")
        .ensure_success()
        .expect("flotilla doctor");

    // Step 4: the agents, with the bundles they had.
    for agent in &mut lost.agents {
        agent.restart().expect("start the agent again");
    }
    fleet.wait_online(&["nas", "laptop"], STARTUP_TIMEOUT);
    fleet.wait_quic_addr("nas", STARTUP_TIMEOUT);

    // The old snapshot is there and restores; backups go on.
    let listed = fleet.snapshots(&[]).expect("flotilla snapshots");
    assert!(
        listed.iter().any(|s| s["id"] == lost.snapshot.as_str()),
        "the snapshot from before is not listed: {listed:?}"
    );
    let target = lost.agents[0].restore_root().join("after-rebuild");
    restore_ok(&fleet, &lost.snapshot, &target, &[]);
    assert_same_tree(
        &fleet,
        &lost.root,
        &restored_path(&target, &lost.root),
        Compare::Everything,
    );
    let again = snapshot_of(&backup_ok(&fleet, &["laptop"])[0]);
    assert_ne!(again, lost.snapshot);
}

/// `docs/disaster-recovery.md`, "A laptop was stolen", steps 1, 2, 3 and 5
/// (step 4, a replacement under a new name, is an ordinary enrollment).
#[test]
fn a_stolen_laptop_is_revoked_and_its_snapshots_restored_elsewhere() {
    let nats = NatsServer::start().expect("start nats-server");
    let fleet = Fleet::init(&nats).expect("flotilla init");
    let mut agents = start_world(&fleet, &["laptop"]);
    // Another host with a restore root, where the laptop's files go back.
    let desktop = fleet
        .agent("desktop")
        .without_backup_root()
        .restore_root()
        .start()
        .expect("start the desktop agent");
    fleet.wait_online(&["desktop"], STARTUP_TIMEOUT);
    let root = agents[1].backup_root().to_path_buf();
    build_tree(&root.join("home"));
    let snapshot = snapshot_of(&backup_ok(&fleet, &["laptop"])[0]);

    // Prepared once, before anything is stolen.
    let vault = fleet.dir().join("vault");
    fs::create_dir_all(&vault).expect("create the vault");
    let key_file = vault.join("fleet.flotilla-key");
    let out = export_key(&fleet, &key_file, false);
    assert_exit(&fleet, &out, 0, "flotilla key export");
    let bundle = fleet.bundle_path("laptop");
    if let Err(e) = connect_with_bundle(&fleet, "laptop", &bundle) {
        fleet.fail(format!(
            "laptop's own NATS user does not connect even before the revocation: {e:#}"
        ));
    }

    // Step 1: revoked. The server refuses the laptop's NATS user at once,
    // so the agent on the stolen laptop (and whoever copies its bundle) can
    // no longer take a task: no backup, no restore. That nas and every other
    // agent also refuse its certificate on the data plane is
    // `revoke_cuts_a_host_off_the_bus_and_the_data_plane` in trust.rs.
    let out = fleet
        .cli(["revoke", "laptop"])
        .expect("run flotilla revoke");
    assert_exit(&fleet, &out, 0, "flotilla revoke laptop");
    assert_refused(&fleet, "laptop", &bundle, "the stolen laptop's NATS user");

    // Step 2: `hosts` says so, in JSON and in the table.
    let entry = fleet
        .host("laptop")
        .expect("flotilla hosts --json")
        .unwrap_or_else(|| fleet.fail("laptop is no longer listed after its revocation"));
    assert_eq!(entry["status"], "revoked", "{entry}");
    let out = fleet.cli(["hosts"]).expect("run flotilla hosts");
    assert_exit(&fleet, &out, 0, "flotilla hosts");
    assert!(
        out.stdout.lines().any(|line| {
            let mut columns = line.split_whitespace();
            columns.next() == Some("laptop") && columns.next() == Some("REVOKED")
        }),
        "laptop is not shown as REVOKED:\n{out}"
    );
    // The key file exported again knows the revocation: a fleet rebuilt
    // from it keeps the laptop out.
    let out = export_key(&fleet, &key_file, true);
    assert_exit(&fleet, &out, 0, "flotilla key export --force");
    let rebuilt = fleet.dir().join("fleet-from-the-new-key-file");
    let out = flotilla([
        OsStr::new("key"),
        OsStr::new("import"),
        key_file.as_os_str(),
        OsStr::new("--fleet"),
        rebuilt.as_os_str(),
    ]);
    assert_exit(&fleet, &out, 0, "flotilla key import of the new key file");
    let revocations = Path::new("nats").join("revoked.toml");
    let recorded = fs::read_to_string(fleet.fleet_dir().join(&revocations))
        .expect("read the fleet's revocations");
    assert!(recorded.contains("laptop"), "{recorded}");
    assert_eq!(
        fs::read_to_string(rebuilt.join(&revocations)).expect("the key file's revocations"),
        recorded,
        "the key file exported again does not hold the revocation"
    );

    // Step 3: revocation deleted nothing; the snapshot is listed and
    // restores, byte for byte, onto another host.
    let listed = fleet
        .snapshots(&["--host", "laptop"])
        .expect("flotilla snapshots --host laptop");
    assert!(
        listed
            .iter()
            .any(|s| s["id"] == snapshot.as_str() && s["host"] == "laptop"),
        "the stolen laptop's snapshot is not listed: {listed:#?}"
    );
    let target = desktop.restore_root().join("laptop");
    let out = fleet
        .restore(&snapshot, &format!("desktop:{}", path_str(&target)), &[])
        .expect("run flotilla restore");
    assert_exit(&fleet, &out, 0, "a restore of the stolen laptop's snapshot");
    let summary = summary_of(&out, "desktop").expect("a restore summary for desktop");
    assert_eq!(summary["outcome"], "succeeded", "{out}");
    assert_eq!(summary["restore"]["errors"], 0, "{out}");
    assert_same_tree(
        &fleet,
        &root,
        &restored_path(&target, &root),
        Compare::Everything,
    );

    // Step 5: the same name on a new machine. The stolen one keeps its
    // bundle and its state directory, and its agent is gone for good.
    let thief = fleet.dir().join("stolen");
    fs::create_dir_all(&thief).expect("create the thief's directory");
    let stolen_bundle = thief.join("laptop.toml");
    fs::copy(&bundle, &stolen_bundle).expect("copy the stolen bundle");
    if agents[1].is_running() {
        agents[1].kill9().expect("stop the stolen laptop's agent");
    }
    fs::rename(fleet.state_dir("laptop"), thief.join("state"))
        .expect("move the stolen laptop's state directory away");
    enroll_again(&fleet, "laptop");
    wait_listed_offline(&fleet, "laptop");
    let _new_laptop = fleet
        .start_agent("laptop")
        .expect("start the new laptop's agent");
    // Listed online, so no longer revoked (`hosts` shows one status).
    fleet.wait_online(&["laptop"], STARTUP_TIMEOUT);
    assert_refused(
        &fleet,
        "laptop",
        &stolen_bundle,
        "the stolen bundle, after the laptop was enrolled again,",
    );
    let again = snapshot_of(&backup_ok(&fleet, &["laptop"])[0]);
    assert_ne!(again, snapshot);
    let listed = fleet
        .snapshots(&["--host", "laptop"])
        .expect("flotilla snapshots --host laptop");
    assert!(
        listed.iter().any(|s| s["id"] == again.as_str()),
        "the new laptop's snapshot is not listed: {listed:#?}"
    );
}

/// `docs/disaster-recovery.md`, "The storage host died": its disk survives
/// and is mounted on a new storage host (step 4 of the first list), which is
/// enrolled under the old name after the old one is revoked (steps 1 to 3 of
/// "A new storage host").
#[test]
fn a_new_storage_host_takes_over_the_old_disk() {
    // What the first backup after the takeover brings that is new.
    const NEW_BYTES: u64 = 256 << 10;
    let nats = NatsServer::start().expect("start nats-server");
    let fleet = Fleet::init(&nats).expect("flotilla init");
    let mut agents = start_world(&fleet, &["laptop"]);
    let root = agents[1].backup_root().to_path_buf();
    build_tree(&root.join("home"));
    let first = snapshot_of(&backup_ok(&fleet, &["laptop"])[0]);
    let storage = agents[0].storage_dir().to_path_buf();
    let packs_before = pack_bytes(&storage);

    // The storage host dies, and its agent with it.
    agents[0].kill9().expect("kill nas's agent");
    wait_listed_offline(&fleet, "nas");

    // Step 1: the dead machine's own disk, with its bundle, might come back.
    let out = fleet.cli(["revoke", "nas"]).expect("run flotilla revoke");
    assert_exit(&fleet, &out, 0, "flotilla revoke nas");
    // Step 2: the new machine under the old name: a new bundle, a state
    // directory of its own, and the old disk as its --storage (the harness
    // starts nas with bundles/nas.toml, state/nas and storage/nas).
    enroll_again(&fleet, "nas");
    fs::rename(
        fleet.state_dir("nas"),
        fleet.dir().join("state-of-the-dead-nas"),
    )
    .expect("move the dead nas's state directory away");
    let new_nas = fleet
        .agent("nas")
        .without_backup_root()
        .storage()
        .restore_root()
        .start()
        .expect("start the new nas agent");
    assert_eq!(new_nas.storage_dir(), storage.as_path());
    // Step 3: online (so not revoked), with its new address.
    fleet.wait_online(&["nas", "laptop"], STARTUP_TIMEOUT);
    fleet.wait_quic_addr("nas", STARTUP_TIMEOUT);

    // Step 4: every snapshot stays listed, and restores byte for byte.
    let listed = fleet.snapshots(&[]).expect("flotilla snapshots");
    assert!(
        listed
            .iter()
            .any(|s| s["id"] == first.as_str() && s["storage"] == "nas"),
        "the snapshot on the old disk is not listed: {listed:#?}"
    );
    let target = new_nas.restore_root().join("after-takeover");
    restore_ok(&fleet, &first, &target, &[]);
    assert_same_tree(
        &fleet,
        &root,
        &restored_path(&target, &root),
        Compare::Everything,
    );

    // Backups go on from where they were: only what is new is stored.
    write_random(&root.join("home/since-the-takeover.bin"), 0x14, NEW_BYTES)
        .expect("write new data");
    let second = backup_ok(&fleet, &["laptop"]).remove(0);
    let again = snapshot_of(&second);
    assert_ne!(again, first);
    let added = second["bytes_added"]
        .as_u64()
        .unwrap_or_else(|| fleet.fail(format!("no bytes_added in {second}")));
    assert!(
        (NEW_BYTES..MIB).contains(&added),
        "expected the new file's {NEW_BYTES} bytes and a little metadata, not {added}: {second}"
    );
    let grown = pack_bytes(&storage).saturating_sub(packs_before);
    assert!(
        grown < MIB,
        "the repository ({packs_before} bytes of packs) grew by {grown} for {NEW_BYTES} new bytes"
    );
    let target = new_nas.restore_root().join("second");
    restore_ok(&fleet, &again, &target, &[]);
    assert_same_tree(
        &fleet,
        &root,
        &restored_path(&target, &root),
        Compare::Everything,
    );
    // "Run `flotilla check nas --read-data` once it is online."
    let out = fleet
        .check("nas", true)
        .expect("run flotilla check --read-data");
    assert_exit(&fleet, &out, 0, "a check of the old disk on the new nas");
    let report = check_report(&out).expect("a check report");
    assert_eq!(report["ok"], true, "{out}");
}
