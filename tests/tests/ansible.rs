//! The Ansible role (`deploy/ansible`): its example playbook, run by a real
//! `ansible-playbook` (ansible-core from PyPI) against a real OpenSSH server
//! ([`Sshd`]), installs an agent that joins the fleet; a second run reports
//! no change and keeps the enrollment; the agent it installed backs up.
//!
//! `ansible-playbook` is `$ANSIBLE_PLAYBOOK`, else the one on `PATH`
//! (`scripts/test.sh` installs it). Without it the test fails, saying so,
//! unless `FLOTILLA_SKIP_ANSIBLE=1`.
//!
//! The host behind the sshd is this machine in a private mount namespace
//! without systemd, so `install-agent.sh` runs the agent as a plain process.
//! What the test gives the host (its backup root, the staging directory)
//! lives under the fleet's temporary directory, which the namespace shares.

use std::fs::{self, File, Permissions};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use flotilla_tests::{
    binaries, read_lossy, restored_path, write_bytes, write_file, Compare, Fleet, NatsServer, Sshd,
    STARTUP_TIMEOUT,
};
use serde_json::json;

use super::dataplane::{assert_same_tree, backup_ok, restore_ok, snapshot_of};
use super::path_str;

/// The deployed host's name, in the inventory and in the fleet.
const HOST: &str = "web";
/// How long one `ansible-playbook` run may take: a few dozen tasks over
/// ssh, and the wait for the agent to come online.
const PLAYBOOK_TIMEOUT: Duration = Duration::from_secs(300);
/// The role's `flotilla_online_timeout`: generous, tests run in parallel.
const ONLINE_TIMEOUT_SECS: u64 = 90;
/// What the run's `ANSIBLE_CONFIG` says: nothing, so that no `ansible.cfg`
/// of the developer's applies.
const ANSIBLE_CFG: &str = "# Every setting comes from the environment.\n[defaults]\n";
/// Files of `deploy/` in the agent's release, where `scripts/package.sh`
/// puts them (`agent_tarball`), with their modes.
const RELEASE_FILES: [(&str, u32); 4] = [
    ("install-agent.sh", 0o755),
    ("systemd/flotilla-agent.service", 0o644),
    ("agent.toml.example", 0o644),
    ("README.md", 0o644),
];

// ---- helpers ---------------------------------------------------------------

/// The repository's root (this crate is its `tests/`).
fn repo_root() -> PathBuf {
    let tests = Path::new(env!("CARGO_MANIFEST_DIR"));
    tests
        .parent()
        .expect("the tests crate is a folder of the repository")
        .to_path_buf()
}

/// `ansible-playbook`, or `None` (skip) when it is missing and
/// `FLOTILLA_SKIP_ANSIBLE=1`.
fn ansible_playbook() -> Option<PathBuf> {
    let found = match std::env::var_os("ANSIBLE_PLAYBOOK") {
        Some(path) => {
            let path = PathBuf::from(path);
            assert!(
                path.is_file(),
                "ANSIBLE_PLAYBOOK={} is not a file",
                path.display()
            );
            Some(path)
        }
        None => {
            let path = std::env::var_os("PATH").unwrap_or_default();
            std::env::split_paths(&path)
                .map(|dir| dir.join("ansible-playbook"))
                .find(|candidate| candidate.is_file())
        }
    };
    if found.is_none() {
        let skip = std::env::var("FLOTILLA_SKIP_ANSIBLE").as_deref() == Ok("1");
        assert!(
            skip,
            "ansible-playbook is not on PATH and ANSIBLE_PLAYBOOK is not set: \
             `pip install ansible-core` (scripts/test.sh does), or set \
             FLOTILLA_SKIP_ANSIBLE=1 to skip the Ansible role's test"
        );
        eprintln!("skipped: no ansible-playbook, and FLOTILLA_SKIP_ANSIBLE=1");
    }
    found
}

/// Runs `cmd`, which must succeed, and returns its stdout.
fn run_ok(cmd: &mut Command) -> Result<String> {
    let what = format!("{cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `cmd` on the sshd's host, which must succeed, and returns its
/// stdout, trimmed.
fn remote(sshd: &Sshd, cmd: &str) -> Result<String> {
    let out = sshd.run(cmd);
    if !out.status.success() {
        bail!(
            "`{cmd}` over ssh failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The agent's release as `scripts/package.sh` lays it out, for this
/// machine's architecture, made of the binary under test and `deploy/`:
/// `dist/flotilla-agent-VERSION-ARCH-linux.tar.gz` and `dist/SHA256SUMS`.
/// Made here rather than by package.sh, which also builds the CLI's tarball
/// and the `.deb`s and needs their tools.
fn make_dist(work: &Path, version: &str) -> Result<PathBuf> {
    let arch = std::env::consts::ARCH;
    let name = format!("flotilla-agent-{version}-{arch}-linux");
    let tree = work.join("release").join(&name);
    fs::create_dir_all(tree.join("systemd"))?;
    let agent = tree.join("flotilla-agent");
    fs::copy(&binaries().agent, &agent).context("cannot copy flotilla-agent into the release")?;
    fs::set_permissions(&agent, Permissions::from_mode(0o755))?;
    let deploy = repo_root().join("deploy");
    for (file, mode) in RELEASE_FILES {
        let dest = tree.join(file);
        fs::copy(deploy.join(file), &dest)
            .with_context(|| format!("cannot copy deploy/{file} into the release"))?;
        fs::set_permissions(&dest, Permissions::from_mode(mode))?;
    }

    let dist = work.join("dist");
    fs::create_dir_all(&dist)?;
    let tarball = format!("{name}.tar.gz");
    let mut tar = Command::new("tar");
    tar.arg("-C")
        .arg(work.join("release"))
        .arg("-czf")
        .arg(dist.join(&tarball))
        .arg(&name);
    run_ok(&mut tar)?;
    let mut sha256sum = Command::new("sha256sum");
    sha256sum.arg(&tarball).current_dir(&dist);
    fs::write(dist.join("SHA256SUMS"), run_ok(&mut sha256sum)?)?;
    Ok(dist)
}

/// An inventory of one host, `web`, reached through `sshd`, backing up `root`.
fn write_inventory(work: &Path, sshd: &Sshd, root: &Path) -> Result<PathBuf> {
    let target = sshd.target();
    let (user, address) = target
        .split_once('@')
        .with_context(|| format!("sshd target {target} is not USER@ADDRESS"))?;
    let mut ssh_args: Vec<String> = sshd
        .ssh_options()
        .iter()
        .map(|option| format!("-o {option}"))
        .collect();
    // Only the test's key: a developer's ssh agent must not use up MaxAuthTries.
    ssh_args.push("-o IdentitiesOnly=yes".to_owned());
    // Ansible's modules run on the host's python3, as the host sees it.
    let python = remote(sshd, "command -v python3")
        .context("the sshd's host has no python3, which Ansible needs")?;
    let text = format!(
        "# Written by tests/tests/ansible.rs.\n\
         [flotilla_agents]\n\
         {HOST} ansible_host={address} ansible_port={port} ansible_user={user} \
         ansible_ssh_private_key_file={identity} ansible_ssh_common_args='{ssh_args}' \
         ansible_python_interpreter={python} flotilla_backup_roots={root}\n",
        port = sshd.port,
        identity = sshd.identity.display(),
        ssh_args = ssh_args.join(" "),
        root = root.display(),
    );
    let path = work.join("inventory.ini");
    fs::write(&path, text)?;
    Ok(path)
}

/// One finished `ansible-playbook` run.
struct PlaybookRun {
    /// `None`: it ran past [`PLAYBOOK_TIMEOUT`] and was killed.
    status: Option<ExitStatus>,
    /// Its stdout and stderr.
    log: String,
}

impl PlaybookRun {
    /// A counter of `HOST`'s line in the PLAY RECAP (`changed`, `failed`, …).
    fn recap(&self, counter: &str) -> Option<u64> {
        let line = self.log.lines().rev().find(|l| is_recap_of_host(l))?;
        line.split_whitespace()
            .find_map(|field| field.strip_prefix(counter)?.strip_prefix('='))
            .and_then(|n| n.parse().ok())
    }
}

/// `web : ok=25 changed=0 unreachable=0 failed=0 …`, at the end of a run.
fn is_recap_of_host(line: &str) -> bool {
    line.split_whitespace().next() == Some(HOST) && line.contains(" ok=")
}

/// Everything a run of the example playbook needs.
struct Ansible<'a> {
    bin: PathBuf,
    fleet: &'a Fleet,
    /// The run's working directory: its configuration, logs and temporaries.
    work: PathBuf,
    inventory: PathBuf,
    dist: PathBuf,
    /// `flotilla_stage_dir`: the role's staging directories go in here.
    stage: PathBuf,
    /// The controller's `TMPDIR`: the role's copy of the bundle goes in here.
    controller_tmp: PathBuf,
}

impl Ansible<'_> {
    /// `ansible-playbook -v -i INVENTORY deploy/ansible/playbook.yml -e …`,
    /// hermetic: none of the developer's `ANSIBLE_*` or `FLOTILLA_*`, no
    /// `~/.ansible`, no ssh master connection left behind; the `flotilla`
    /// under test first on `PATH`, as the role finds it.
    fn run(&self, n: u32) -> Result<PlaybookRun> {
        let cli_dir = binaries()
            .flotilla
            .parent()
            .context("the flotilla binary has a directory")?
            .to_path_buf();
        let inherited = std::env::var_os("PATH").unwrap_or_default();
        let mut dirs = vec![cli_dir];
        dirs.extend(std::env::split_paths(&inherited));
        let path = std::env::join_paths(dirs)?;
        let config = self.work.join("ansible.cfg");
        fs::write(&config, ANSIBLE_CFG)?;
        let home = self.work.join("ansible-home");
        let local_tmp = self.work.join("ansible-local-tmp");
        let remote_tmp = self.work.join("ansible-remote-tmp");
        for dir in [&home, &local_tmp, &remote_tmp, &self.stage] {
            fs::create_dir_all(dir)?;
        }
        fs::create_dir_all(&self.controller_tmp)?;
        let extra = json!({
            "flotilla_dist_dir": path_str(&self.dist),
            "flotilla_stage_dir": path_str(&self.stage),
            "flotilla_online_timeout": ONLINE_TIMEOUT_SECS,
        });
        let playbook = repo_root().join("deploy/ansible/playbook.yml");

        let mut cmd = Command::new(&self.bin);
        for (key, _) in std::env::vars_os() {
            let name = key.to_string_lossy();
            if name.starts_with("ANSIBLE_") || name.starts_with("FLOTILLA_") {
                cmd.env_remove(&key);
            }
        }
        cmd.arg("-v")
            .arg("-i")
            .arg(&self.inventory)
            .arg(&playbook)
            .arg("-e")
            .arg(extra.to_string())
            .current_dir(&self.work)
            .env("PATH", path)
            .env("FLOTILLA_FLEET", self.fleet.fleet_dir())
            .env("FLOTILLA_NATS_URL", self.fleet.nats_url())
            .env("ANSIBLE_CONFIG", &config)
            .env("ANSIBLE_HOME", &home)
            .env("ANSIBLE_LOCAL_TEMP", &local_tmp)
            .env("ANSIBLE_REMOTE_TMP", &remote_tmp)
            .env("ANSIBLE_HOST_KEY_CHECKING", "False")
            .env("ANSIBLE_NOCOLOR", "1")
            .env("ANSIBLE_RETRY_FILES_ENABLED", "False")
            // No ControlPersist master outliving the run (or the sshd).
            .env("ANSIBLE_SSH_ARGS", "-o ControlMaster=no")
            .env("ANSIBLE_PIPELINING", "True")
            // ansible-core refuses to start without a UTF-8 locale.
            .env("LC_ALL", "C.UTF-8")
            .env("LANG", "C.UTF-8")
            .env("TMPDIR", &self.controller_tmp)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null());
        let log_path = self.work.join(format!("playbook-{n}.log"));
        let log = File::create(&log_path)?;
        cmd.stdout(log.try_clone()?).stderr(log);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", self.bin.display()))?;
        let deadline = Instant::now() + PLAYBOOK_TIMEOUT;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break Some(status);
            }
            if Instant::now() >= deadline {
                // Exited in the meantime is fine: wait reaps it either way.
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            thread::sleep(Duration::from_millis(200));
        };
        Ok(PlaybookRun {
            status,
            log: read_lossy(&log_path),
        })
    }

    /// Fails the test, with the playbook's output and every log, unless
    /// run `n` exited 0 with nothing failed or unreachable.
    fn expect_success(&self, run: &PlaybookRun, n: u32) {
        let exited_0 = run.status.is_some_and(|status| status.success());
        let clean = run.recap("failed") == Some(0) && run.recap("unreachable") == Some(0);
        if exited_0 && clean {
            return;
        }
        let how = match run.status {
            Some(status) => format!("exited with {status}"),
            None => format!("ran past {PLAYBOOK_TIMEOUT:?} and was killed"),
        };
        let msg = format!("ansible-playbook run {n} {how}:\n{}", run.log);
        self.fleet.fail(msg);
    }

    /// Fails the test if a staging directory or a copy of the bundle outlived
    /// run `n`.
    fn expect_no_leftovers(&self, n: u32) -> Result<()> {
        let staged: Vec<_> = fs::read_dir(&self.stage)?
            .filter_map(|entry| entry.ok().map(|e| e.file_name()))
            .collect();
        let bundles: Vec<_> = fs::read_dir(&self.controller_tmp)?
            .filter_map(|entry| entry.ok().map(|e| e.file_name()))
            .filter(|name| name.to_string_lossy().ends_with(".bundle.toml"))
            .collect();
        if !staged.is_empty() || !bundles.is_empty() {
            let msg = format!(
                "run {n} left staging directories {staged:?} on the host \
                 and copies of the bundle {bundles:?} on the controller"
            );
            self.fleet.fail(msg);
        }
        Ok(())
    }
}

/// The version `flotilla --version` prints ("flotilla 0.1.0"): what the
/// role installs unless told another.
fn cli_version(fleet: &Fleet) -> Result<String> {
    let out = fleet.cli(["--version"])?;
    out.ensure_success()?;
    out.stdout
        .split_whitespace()
        .last()
        .map(str::to_owned)
        .with_context(|| format!("no version in:\n{out}"))
}

/// Waits until `HOST` is listed online, and requires it on `version`.
fn wait_online_on(fleet: &Fleet, version: &str) {
    let listed = fleet.wait_online(&[HOST], STARTUP_TIMEOUT);
    let entry = listed
        .iter()
        .find(|h| h["host"] == HOST)
        .expect("wait_online returns a listing with the host");
    if entry["version"] != version {
        fleet.fail(format!("{HOST} is not on version {version}: {entry:#}"));
    }
}

// ---- tests -----------------------------------------------------------------

#[test]
fn the_ansible_role_installs_an_agent_over_ssh_that_backs_up() -> Result<()> {
    let Some(bin) = ansible_playbook() else {
        return Ok(());
    };
    let nats = NatsServer::start()?;
    let fleet = Fleet::init(&nats)?;
    let version = cli_version(&fleet)?;
    let work = fleet.dir().join("ansible");
    fs::create_dir_all(work.join("sshd"))?;
    let dist = make_dist(&work, &version)?;

    // The storage host is one of the harness's own agents; it takes the
    // restore too.
    let nas = fleet
        .agent("nas")
        .without_backup_root()
        .storage()
        .restore_root()
        .start()?;
    fleet.wait_quic_addr("nas", STARTUP_TIMEOUT);

    // What web backs up: install-agent.sh requires it to exist.
    let root = fleet.backup_root(HOST);
    write_bytes(&root.join("etc/hostname"), b"web\n")?;
    write_bytes(&root.join("srv/site/index.html"), b"<h1>hello</h1>\n")?;
    write_file(&root.join("srv/site/logo.bin"), 300 * 1024)?;

    let sshd = Sshd::start(&work.join("sshd"));
    let ansible = Ansible {
        bin,
        fleet: &fleet,
        inventory: write_inventory(&work, &sshd, &root)?,
        dist,
        stage: work.join("stage"),
        controller_tmp: work.join("controller-tmp"),
        work: work.clone(),
    };

    // First run: enrolls web, installs the agent, waits until it is online.
    let first = ansible.run(1)?;
    ansible.expect_success(&first, 1);
    if first.recap("changed").is_none_or(|n| n == 0) {
        fleet.fail(format!("the first run changed nothing:\n{}", first.log));
    }
    wait_online_on(&fleet, &version);
    let mode = remote(&sshd, "stat -c %a /etc/flotilla/bundle.toml")?;
    assert_eq!(mode, "600", "the installed bundle's mode");
    // No systemd behind the sshd: install-agent.sh started the agent itself.
    remote(&sshd, "test -s /run/flotilla-agent.pid")
        .context("no /run/flotilla-agent.pid: the agent was not started directly")?;
    ansible.expect_no_leftovers(1)?;
    let cert_path = fleet.fleet_dir().join("hosts").join(format!("{HOST}.crt"));
    let cert = fs::read_to_string(&cert_path)
        .with_context(|| format!("{HOST} was not enrolled: no {}", cert_path.display()))?;
    let bundle_sum = remote(&sshd, "sha256sum /etc/flotilla/bundle.toml")?;

    // Second run: reinstalls the same version, reports no change, and keeps
    // the host's enrollment.
    let second = ansible.run(2)?;
    ansible.expect_success(&second, 2);
    if second.recap("changed") != Some(0) {
        fleet.fail(format!("run 2 changed {HOST}:\n{}", second.log));
    }
    let cert_after = fs::read_to_string(&cert_path)?;
    assert_eq!(cert_after, cert, "run 2 enrolled {HOST} again");
    let bundle_sum_after = remote(&sshd, "sha256sum /etc/flotilla/bundle.toml")?;
    assert_eq!(bundle_sum_after, bundle_sum, "run 2 replaced the bundle");
    ansible.expect_no_leftovers(2)?;
    wait_online_on(&fleet, &version);

    // The agent the role installed backs up into nas, and its snapshot
    // restores byte for byte.
    let snapshot = snapshot_of(&backup_ok(&fleet, &[HOST])[0]);
    let target = nas.restore_root().join(HOST);
    restore_ok(&fleet, &snapshot, &target, &[]);
    let restored = restored_path(&target, &root);
    assert_same_tree(&fleet, &root, &restored, Compare::Contents);
    Ok(())
}
