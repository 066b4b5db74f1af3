//! `flotilla deploy` and `flotilla upgrade` against a real OpenSSH server.
//!
//! The target is this machine behind an [`Sshd`] in a private mount
//! namespace: what deploy installs lands in tmpfs mounts there, and the
//! agent it starts (directly: no systemd in the namespace) runs there,
//! reaching the test's nats-server and storage agent on loopback. The agent
//! binary comes from a `dist/` the test makes the way `scripts/package.sh`
//! lays it out, from the `flotilla-agent` under test; an "older" build is
//! the same binary with bytes appended (an ELF runs with trailing bytes).
//!
//! Needs root and `/usr/sbin/sshd` (`FLOTILLA_SKIP_SSH=1` skips these tests
//! where they are missing).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::bail;
use flotilla_tests::{
    binaries, summary_of, write_bytes, write_random, Agent, CliOutput, Fleet, NatsServer, Sshd,
    DATA_TIMEOUT, STARTUP_TIMEOUT,
};

use super::path_str;

/// The version every binary under test has, and so the one deployed.
const VERSION: &str = env!("CARGO_PKG_VERSION");
/// Deadline of one `deploy` or `upgrade` (it waits up to 90 s for the host).
const DEPLOY_TIMEOUT: Duration = Duration::from_secs(240);
const MIB: u64 = 1 << 20;

// ---- helpers ---------------------------------------------------------------

/// Starts nas (storage, no backup root) and waits until it serves QUIC.
fn start_nas(fleet: &Fleet) -> Agent {
    let nas = fleet
        .agent("nas")
        .without_backup_root()
        .storage()
        .start()
        .expect("start the nas agent");
    fleet.wait_online(&["nas"], STARTUP_TIMEOUT);
    fleet.wait_quic_addr("nas", STARTUP_TIMEOUT);
    nas
}

/// Makes `dir/dist/flotilla-agent-VERSION-ARCH-linux.tar.gz` holding `agent`
/// as `flotilla-agent-VERSION-ARCH-linux/flotilla-agent`, the layout of
/// `scripts/package.sh`; returns the `dist` directory and the binary packed.
fn make_dist(dir: &Path, agent: &[u8]) -> (PathBuf, PathBuf) {
    let name = format!("flotilla-agent-{VERSION}-{}-linux", std::env::consts::ARCH);
    let staging = dir.join("staging");
    let binary = staging.join(&name).join("flotilla-agent");
    write_bytes(&binary, agent).expect("write the agent to pack");
    fs::set_permissions(&binary, fs::Permissions::from_mode(0o755)).expect("chmod the agent");
    let dist = dir.join("dist");
    fs::create_dir_all(&dist).expect("create dist");
    let status = Command::new("tar")
        .arg("-czf")
        .arg(dist.join(format!("{name}.tar.gz")))
        .arg("-C")
        .arg(&staging)
        .arg(&name)
        .status()
        .expect("run tar");
    assert!(status.success(), "tar failed making {}", dist.display());
    let sums = Command::new("sha256sum")
        .arg(format!("{name}.tar.gz"))
        .current_dir(&dist)
        .output()
        .expect("run sha256sum");
    assert!(
        sums.status.success(),
        "sha256sum failed in {}",
        dist.display()
    );
    fs::write(dist.join("SHA256SUMS"), sums.stdout).expect("write SHA256SUMS");
    (dist, binary)
}

/// `flotilla deploy HOST` with everything that reaches `sshd`, then `extra`.
fn deploy_args(sshd: &Sshd, host: &str, extra: &[String]) -> Vec<String> {
    let mut args = vec![
        "deploy".to_owned(),
        host.to_owned(),
        "--ssh".to_owned(),
        sshd.target(),
        "--port".to_owned(),
        sshd.port.to_string(),
        "--identity".to_owned(),
        path_str(&sshd.identity),
    ];
    for option in sshd.ssh_options() {
        args.push("--ssh-option".to_owned());
        args.push(option);
    }
    args.extend(extra.iter().cloned());
    args
}

/// Fails the test with the command's output and the target's agent log
/// unless it exited with `code`.
fn expect_exit(fleet: &Fleet, sshd: &Sshd, out: &CliOutput, code: i32, what: &str) {
    if out.code != Some(code) {
        fleet.fail(format!(
            "{what}: expected exit code {code}:\n{out}\n--- the target's agent log ---\n{}",
            sshd.agent_log()
        ));
    }
}

/// SHA-256 of a file on this machine.
fn local_sha256(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("run sha256sum");
    assert!(out.status.success(), "sha256sum {}", path.display());
    first_word(&String::from_utf8_lossy(&out.stdout))
}

/// SHA-256 of a file on the target.
fn remote_sha256(sshd: &Sshd, path: &str) -> String {
    first_word(&sshd.stdout_of(&format!("sha256sum {path}")))
}

fn first_word(text: &str) -> String {
    text.split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// The pid of the agent running on the target.
fn remote_pid(sshd: &Sshd) -> String {
    sshd.stdout_of("cat /run/flotilla-agent.pid")
        .trim()
        .to_owned()
}

/// `host`'s entry in `hosts --json`, which must be online on `VERSION`.
fn assert_online_on_version(fleet: &Fleet, host: &str) {
    fleet.wait_online(&[host], STARTUP_TIMEOUT);
    let entry = fleet
        .host(host)
        .expect("flotilla hosts")
        .unwrap_or_else(|| fleet.fail(format!("{host} is not listed")));
    assert_eq!(entry["version"], VERSION, "{entry:#}");
}

// ---- tests -----------------------------------------------------------------

/// A fresh deploy enrolls the host, installs and starts the agent, which
/// then backs up into nas; deploy again (no flag but the host and --dist)
/// upgrades in place with the saved settings, keeping the bundle and the
/// replaced binary; `--dry-run` changes nothing; a missing agent build is
/// named with the command that makes it.
#[test]
fn deploy_installs_over_ssh_and_again_upgrades_in_place() {
    if Sshd::skip() {
        return;
    }
    let nats = NatsServer::start().expect("start nats-server");
    let fleet = Fleet::init(&nats).expect("flotilla init");
    let sshd = Sshd::start(&fleet.dir().join("sshd"));
    let _nas = start_nas(&fleet);
    let root = fleet.backup_root("alpha");
    write_random(&root.join("docs/report.bin"), 11, 3 * MIB).expect("write test data");
    write_bytes(&root.join("notes.txt"), b"deployed over ssh\n").expect("write test data");

    let agent = fs::read(&binaries().agent).expect("read the agent under test");
    let mut older = agent.clone();
    older.extend_from_slice(b"\nflotilla-test: trailing bytes make this another build\n");
    let (old_dist, old_binary) = make_dist(&fleet.dir().join("old"), &older);
    let (new_dist, new_binary) = make_dist(&fleet.dir().join("new"), &agent);
    let (old_dist, new_dist) = (path_str(&old_dist), path_str(&new_dist));
    let (old_sha, new_sha) = (local_sha256(&old_binary), local_sha256(&new_binary));
    assert_ne!(old_sha, new_sha);

    // (a) A fresh deploy.
    let out = fleet
        .cli_with_timeout(
            deploy_args(
                &sshd,
                "alpha",
                &[
                    "--backup-root".into(),
                    path_str(&root),
                    "--dist".into(),
                    old_dist.clone(),
                    "--timeout".into(),
                    "90s".into(),
                ],
            ),
            DEPLOY_TIMEOUT,
        )
        .expect("run flotilla deploy");
    expect_exit(&fleet, &sshd, &out, 0, "a fresh deploy");
    for says in [
        "enrolled alpha",
        "install-agent: installed flotilla-agent",
        "is online",
    ] {
        assert!(out.stdout.contains(says), "no {says:?}:\n{out}");
    }
    assert_online_on_version(&fleet, "alpha");
    assert_eq!(
        remote_sha256(&sshd, "/usr/local/bin/flotilla-agent"),
        old_sha
    );
    assert_eq!(
        sshd.stdout_of("stat -c %a /etc/flotilla/bundle.toml")
            .trim(),
        "600"
    );
    let config = sshd.stdout_of("cat /etc/flotilla/agent.toml");
    assert!(config.contains(&path_str(&root)), "{config}");
    let saved = fleet.fleet_dir().join("deploy").join("alpha.toml");
    let mode = fs::metadata(&saved)
        .unwrap_or_else(|e| fleet.fail(format!("no {}: {e}", saved.display())))
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "{}", saved.display());

    // The agent it installed works: a backup into nas.
    let out = fleet
        .backup("alpha", "nas", &[])
        .expect("run flotilla backup");
    expect_exit(&fleet, &sshd, &out, 0, "a backup by the deployed agent");
    let summary = summary_of(&out, "alpha").expect("a summary for alpha");
    assert_eq!(summary["outcome"], "succeeded", "{out}");

    // (b) Deploy again, with the saved settings: an upgrade in place.
    let pid_before = remote_pid(&sshd);
    let out = fleet
        .cli_with_timeout(
            [
                "deploy",
                "alpha",
                "--dist",
                new_dist.as_str(),
                "--timeout",
                "90s",
            ],
            DEPLOY_TIMEOUT,
        )
        .expect("run flotilla deploy again");
    expect_exit(&fleet, &sshd, &out, 0, "deploy again");
    assert!(out.stdout.contains("keeping the host's bundle"), "{out}");
    assert!(!out.stdout.contains("enrolled alpha"), "re-keyed:\n{out}");
    assert_eq!(
        remote_sha256(&sshd, "/usr/local/bin/flotilla-agent"),
        new_sha
    );
    assert_eq!(
        remote_sha256(&sshd, "/usr/local/bin/flotilla-agent.previous"),
        old_sha
    );
    let pid_after = remote_pid(&sshd);
    assert_ne!(pid_before, pid_after, "the agent was not restarted");
    assert_online_on_version(&fleet, "alpha");

    // (d) A dry run prints what it would do and changes nothing.
    let out = fleet
        .cli_with_timeout(
            ["deploy", "alpha", "--dist", old_dist.as_str(), "--dry-run"],
            DEPLOY_TIMEOUT,
        )
        .expect("run flotilla deploy --dry-run");
    expect_exit(&fleet, &sshd, &out, 0, "a dry run");
    for says in [
        "would run: ssh ",
        "mktemp -d",
        "cat > ",
        "FLOTILLA_WRITE_CONFIG=yes",
        "install-agent.sh",
        "dry run: nothing was changed",
    ] {
        assert!(out.stdout.contains(says), "no {says:?}:\n{out}");
    }
    assert_eq!(
        remote_sha256(&sshd, "/usr/local/bin/flotilla-agent"),
        new_sha
    );
    assert_eq!(
        remote_pid(&sshd),
        pid_after,
        "a dry run restarted the agent"
    );

    assert!(out.stdout.contains("SHA256SUMS verified"), "{out}");

    // A tarball that is not the one SHA256SUMS lists is refused.
    let sums = Path::new(&old_dist).join("SHA256SUMS");
    let listed = fs::read_to_string(&sums).expect("read SHA256SUMS");
    fs::write(&sums, format!("{}{}", "0".repeat(64), &listed[64..])).expect("forge SHA256SUMS");
    let out = fleet
        .cli_with_timeout(
            ["deploy", "alpha", "--dist", old_dist.as_str(), "--dry-run"],
            DEPLOY_TIMEOUT,
        )
        .expect("run flotilla deploy with a wrong checksum");
    expect_exit(
        &fleet,
        &sshd,
        &out,
        1,
        "a tarball SHA256SUMS does not vouch for",
    );
    assert!(out.stderr.contains("SHA256SUMS"), "{out}");
    assert!(out.stderr.contains("says 000000"), "{out}");

    // No agent of this version for the host: say how to make one.
    let empty = fleet.dir().join("empty-dist");
    fs::create_dir_all(&empty).expect("create an empty dist");
    let empty = path_str(&empty);
    let out = fleet
        .cli_with_timeout(
            ["deploy", "alpha", "--dist", empty.as_str(), "--dry-run"],
            DEPLOY_TIMEOUT,
        )
        .expect("run flotilla deploy without a build");
    expect_exit(&fleet, &sshd, &out, 1, "no agent build");
    assert!(out.stderr.contains("scripts/package.sh --arch"), "{out}");

    // Ctrl-C while files are copied (a new bundle among them): exit 130, and
    // neither the scratch directory here nor the one on the host is left.
    let agent = fs::read(&binaries().agent).expect("read the agent under test");
    let (fresh, _) = make_dist(&fleet.dir().join("release-int"), &agent);
    let scratch = fleet.dir().join("tmp-int");
    fs::create_dir_all(&scratch).expect("create a TMPDIR");
    let log = fleet.dir().join("deploy-int.out");
    let mut deploy = Command::new(&binaries().flotilla)
        .args(deploy_args(
            &sshd,
            "alpha",
            &["--dist".into(), path_str(&fresh), "--reenroll".into()],
        ))
        .env("FLOTILLA_FLEET", fleet.fleet_dir())
        .env("FLOTILLA_NATS_URL", fleet.nats_url())
        .env("TMPDIR", &scratch)
        .env("NO_COLOR", "1")
        .stdout(fs::File::create(&log).expect("create the deploy's log"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start flotilla deploy");
    let deadline = Instant::now() + DEPLOY_TIMEOUT;
    while !fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("copying ")
    {
        if Instant::now() > deadline || deploy.try_wait().ok().flatten().is_some() {
            let _ = deploy.kill();
            fleet.fail(format!(
                "the deploy never reached its copy step:\n{}",
                fs::read_to_string(&log).unwrap_or_default()
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let sent = Command::new("kill")
        .args(["-INT", &deploy.id().to_string()])
        .status()
        .expect("run kill");
    assert!(sent.success(), "kill -INT failed");
    let ended = deploy.wait_with_output().expect("wait for flotilla deploy");
    let stdout = fs::read_to_string(&log).unwrap_or_default();
    let stderr = String::from_utf8_lossy(&ended.stderr);
    assert_eq!(
        ended.status.code(),
        Some(130),
        "a deploy stopped with Ctrl-C:\n{stdout}\n{stderr}"
    );
    assert!(
        stderr.contains("interrupted (Ctrl-C)"),
        "{stdout}\n{stderr}"
    );
    assert_eq!(
        fs::read_dir(&scratch).expect("list TMPDIR").count(),
        0,
        "a local scratch directory (with the new bundle) was left"
    );
    // The host's scratch directory, from the copy step's line ("copying X
    // to /tmp/flotilla-deploy.XXXX/NAME"); /tmp is shared with the other
    // tests, so only this one is looked for.
    let remote_dir = stdout
        .split_whitespace()
        .find(|w| w.starts_with("/tmp/flotilla-deploy."))
        .and_then(|p| Path::new(p).parent())
        .map(path_str)
        .unwrap_or_else(|| panic!("no remote scratch directory in:\n{stdout}"));
    assert_eq!(
        sshd.stdout_of(&format!("test -e {remote_dir} && echo left || echo gone"))
            .trim(),
        "gone",
        "{remote_dir} was left on the host"
    );
}

/// `upgrade --no-wait` refuses a host in the middle of a backup (exit 4)
/// and changes nothing; `upgrade` without it waits for the backup to end,
/// then reinstalls and restarts the agent.
#[test]
fn upgrade_refuses_a_busy_host_and_goes_once_its_task_is_done() {
    if Sshd::skip() {
        return;
    }
    let nats = NatsServer::start().expect("start nats-server");
    let fleet = Fleet::init(&nats).expect("flotilla init");
    let sshd = Sshd::start(&fleet.dir().join("sshd"));
    let mut nas = start_nas(&fleet);
    let root = fleet.backup_root("alpha");
    for i in 0..4 {
        write_random(&root.join(format!("big/part-{i}.bin")), 100 + i, 64 * MIB)
            .expect("write 64 MiB of test data");
    }
    let agent = fs::read(&binaries().agent).expect("read the agent under test");
    let (dist, _) = make_dist(&fleet.dir().join("release"), &agent);
    let dist = path_str(&dist);

    let out = fleet
        .cli_with_timeout(
            deploy_args(
                &sshd,
                "alpha",
                &[
                    "--backup-root".into(),
                    path_str(&root),
                    "--dist".into(),
                    dist.clone(),
                    "--timeout".into(),
                    "90s".into(),
                ],
            ),
            DEPLOY_TIMEOUT,
        )
        .expect("run flotilla deploy");
    expect_exit(&fleet, &sshd, &out, 0, "deploy");
    assert_online_on_version(&fleet, "alpha");

    // A backup that cannot finish: nas is frozen as soon as it has received
    // something (a frozen peer keeps the QUIC session for 20 s).
    let out = fleet
        .cli(["backup", "alpha", "--to", "nas", "--json"])
        .expect("run flotilla backup");
    expect_exit(&fleet, &sshd, &out, 0, "a queued backup");
    let tmp = nas.storage_dir().join("tmp");
    let deadline = Instant::now() + DATA_TIMEOUT;
    while fs::read_dir(&tmp).map_or(true, |mut d| d.next().is_none()) {
        if Instant::now() > deadline {
            fleet.fail("alpha never uploaded anything to nas");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    nas.pause().expect("SIGSTOP nas");
    fleet.wait_for(
        "alpha's heartbeat to list its running backup",
        Duration::from_secs(15),
        || {
            let entry = fleet.host("alpha")?;
            match entry {
                Some(h) if h["running"].as_array().is_some_and(|r| !r.is_empty()) => Ok(Some(())),
                other => bail!("alpha: {other:?}"),
            }
        },
    );
    let pid_before = remote_pid(&sshd);

    // (c) --no-wait: refused, exit 4, nothing touched.
    let out = fleet
        .cli_with_timeout(
            ["upgrade", "alpha", "--no-wait", "--dist", dist.as_str()],
            DEPLOY_TIMEOUT,
        )
        .expect("run flotilla upgrade --no-wait");
    expect_exit(
        &fleet,
        &sshd,
        &out,
        4,
        "an upgrade of a busy host with --no-wait",
    );
    assert!(out.stderr.contains("runs backup"), "{out}");
    assert!(out.stderr.contains("--no-wait"), "{out}");
    assert!(out.stderr.contains("nothing was changed"), "{out}");
    assert_eq!(
        remote_pid(&sshd),
        pid_before,
        "the refused upgrade restarted the agent"
    );

    // Without --no-wait: it waits for the backup, then upgrades.
    // Without --no-wait, nas still frozen: it finds the backup running and
    // says it waits (read live from its output); only then does nas go on,
    // and the upgrade follows the backup's end.
    let log = fleet.dir().join("upgrade.out");
    let mut upgrade = Command::new(&binaries().flotilla)
        .args([
            "upgrade",
            "alpha",
            "--dist",
            dist.as_str(),
            "--timeout",
            "5m",
        ])
        .env("FLOTILLA_FLEET", fleet.fleet_dir())
        .env("FLOTILLA_NATS_URL", fleet.nats_url())
        .env("NO_COLOR", "1")
        .stdout(fs::File::create(&log).expect("create the upgrade's log"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start flotilla upgrade");
    let deadline = Instant::now() + DATA_TIMEOUT;
    while !fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("waiting until it is done")
    {
        if Instant::now() > deadline || upgrade.try_wait().ok().flatten().is_some() {
            let _ = upgrade.kill();
            let _ = nas.resume();
            fleet.fail(format!(
                "the upgrade never said it waits for the running backup:\n{}",
                fs::read_to_string(&log).unwrap_or_default()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        remote_pid(&sshd),
        pid_before,
        "the waiting upgrade restarted the agent"
    );
    nas.resume().expect("SIGCONT nas");
    let waited = upgrade
        .wait_with_output()
        .expect("wait for flotilla upgrade");
    let stdout = fs::read_to_string(&log).unwrap_or_default();
    assert!(
        waited.status.success(),
        "an upgrade once the backup is done: {:?}\n{stdout}\n{}",
        waited.status,
        String::from_utf8_lossy(&waited.stderr)
    );
    assert!(
        stdout.contains("install-agent: installed flotilla-agent"),
        "{stdout}"
    );
    let out = stdout;
    let finished = fleet
        .events_of("task.finished", "alpha")
        .expect("flotilla events");
    assert!(
        !finished.is_empty(),
        "the upgrade went ahead before the backup finished:\n{out}"
    );
    assert_ne!(remote_pid(&sshd), pid_before, "the agent was not restarted");
    assert_online_on_version(&fleet, "alpha");
}
