//! A real OpenSSH server (Debian's `/usr/sbin/sshd`) to install agents
//! through: `flotilla deploy`, `flotilla upgrade` and the Ansible role.
//!
//! The "target host" is this machine seen from a private mount namespace:
//! sshd runs inside one (`unshare --mount --propagation private`) in which
//! tmpfs covers `/etc/flotilla`, `/usr/local/bin`, `/var/lib/flotilla-agent`,
//! `/etc/systemd/system`, `/var/log` and `/run`. Whatever a session installs
//! there lands in those throwaway mounts, never on the real machine, and
//! every process a session starts (the agents `install-agent.sh` runs)
//! lives in that namespace too. The network is the machine's own: the
//! agents reach the test's nats-server and storage agent on loopback, and
//! see the test's temporary directories (backup roots) as they are. With
//! `/run` empty, systemd does not seem to run, so `install-agent.sh` starts
//! the agent directly (pid file `/run/flotilla-agent.pid`, log
//! `/var/log/flotilla-agent.log`).
//!
//! Mount points that do not exist yet (`/etc/flotilla`,
//! `/var/lib/flotilla-agent`) are created, empty, on the real machine: a
//! mount needs a directory to cover.
//!
//! Root logs in with a key made for the test ([`Sshd::identity`]), and the
//! client trusts the server's host key through [`Sshd::known_hosts`], filled
//! in advance. Dropping the server stops every process of its namespace (the
//! agents first, with SIGTERM), then sshd; the namespace and its mounts go
//! with the last of them.
//!
//! Needs root, `/usr/sbin/sshd` (`apt-get install openssh-server`), `ssh`,
//! `ssh-keygen` and `unshare`. [`Sshd::start`] panics saying what is missing;
//! a test that calls [`Sshd::skip`] first returns early instead when
//! `FLOTILLA_SKIP_SSH=1`.

use std::fs::{self, File};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::files::read_lossy;
use crate::nats::free_port;

/// The server binary: Debian's path, which sshd needs to be started by
/// (it re-executes itself for every connection).
const SSHD: &str = "/usr/sbin/sshd";
/// Set to 1 to let a test without sshd (or not root) pass without running.
const SKIP_ENV: &str = "FLOTILLA_SKIP_SSH";
/// How long sshd may take to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the agents get to stop cleanly when the server is dropped.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Directories covered by a tmpfs inside the namespace: everything
/// `install-agent.sh` writes to, and `/run` (sshd's own, and no systemd).
const COVERED: [&str; 6] = [
    "/etc/flotilla",
    "/usr/local/bin",
    "/var/lib/flotilla-agent",
    "/etc/systemd/system",
    "/var/log",
    "/run",
];

/// An sshd on a free loopback port, in a private mount namespace, that lets
/// root in with [`Sshd::identity`].
#[derive(Debug)]
pub struct Sshd {
    /// The port it listens on (127.0.0.1).
    pub port: u16,
    /// The client's private key (for `ssh -i`, `flotilla deploy --identity`).
    pub identity: PathBuf,
    /// A known_hosts file holding the server's host key.
    pub known_hosts: PathBuf,
    dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    /// `/proc/PID/ns/mnt` of sshd: what tells the namespace's processes
    /// apart from every other (only ever different from the test's own).
    namespace: Option<PathBuf>,
}

impl Sshd {
    /// What is missing to run an sshd here, if anything.
    pub fn unavailable() -> Option<String> {
        if !nix::unistd::geteuid().is_root() {
            return Some(
                "the ssh tests need root (a mount namespace, sshd, logging in as root)".into(),
            );
        }
        if !Path::new(SSHD).is_file() {
            return Some(format!(
                "{SSHD} does not exist: install Debian's openssh-server (apt-get install openssh-server; scripts/test.sh does)"
            ));
        }
        for tool in ["ssh", "ssh-keygen", "unshare"] {
            if !on_path(tool) {
                return Some(format!(
                    "`{tool}` is not on PATH: install openssh-client and util-linux"
                ));
            }
        }
        None
    }

    /// Whether a test should return without running: only when something is
    /// missing and `FLOTILLA_SKIP_SSH=1` says that is fine (it says why).
    pub fn skip() -> bool {
        let Some(why) = Self::unavailable() else {
            return false;
        };
        if std::env::var(SKIP_ENV).as_deref() == Ok("1") {
            eprintln!("skipped: {why} ({SKIP_ENV}=1)");
            return true;
        }
        false
    }

    /// Makes keys and a configuration in `dir` (created if missing), starts
    /// sshd in its namespace and waits until root can log in.
    ///
    /// # Panics
    ///
    /// When something is missing ([`Sshd::unavailable`]; set
    /// `FLOTILLA_SKIP_SSH=1` and call [`Sshd::skip`] to skip instead), or
    /// when the server does not start (its log is in the message).
    pub fn start(dir: &Path) -> Sshd {
        if let Some(why) = Self::unavailable() {
            panic!("cannot start sshd: {why} (or set {SKIP_ENV}=1 to skip the ssh tests)");
        }
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        let port = free_port().expect("a free loopback port for sshd");
        let host_key = dir.join("ssh_host_ed25519_key");
        let identity = dir.join("id_ed25519");
        keygen(&host_key, "flotilla-test-host");
        keygen(&identity, "flotilla-test-client");

        let authorized = dir.join("authorized_keys");
        let client_pub = read_key(&identity.with_extension("pub"));
        fs::write(&authorized, format!("{client_pub}\n")).expect("write authorized_keys");
        fs::set_permissions(&authorized, fs::Permissions::from_mode(0o600))
            .expect("chmod authorized_keys");

        // The host key as the client must know it: `[host]:port type key`.
        let host_pub = read_key(&host_key.with_extension("pub"));
        let mut fields = host_pub.split_whitespace();
        let (kind, key) = (
            fields.next().expect("a key type in the host key"),
            fields.next().expect("a key in the host key"),
        );
        let known_hosts = dir.join("known_hosts");
        fs::write(&known_hosts, format!("[127.0.0.1]:{port} {kind} {key}\n"))
            .expect("write known_hosts");

        let config = dir.join("sshd_config");
        fs::write(
            &config,
            format!(
                "# Written by the flotilla tests: root logs in with one key, nothing else.\n\
                 Port {port}\n\
                 ListenAddress 127.0.0.1\n\
                 HostKey {host_key}\n\
                 PidFile {pid}\n\
                 AuthorizedKeysFile {authorized}\n\
                 PermitRootLogin prohibit-password\n\
                 PubkeyAuthentication yes\n\
                 PasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\n\
                 StrictModes no\n\
                 UsePAM no\n\
                 UseDNS no\n\
                 PrintMotd no\n\
                 LogLevel VERBOSE\n\
                 Subsystem sftp internal-sftp\n",
                host_key = host_key.display(),
                pid = dir.join("sshd.pid").display(),
                authorized = authorized.display(),
            ),
        )
        .expect("write sshd_config");

        // Each covered directory gets a tmpfs of its own; then sshd, which
        // needs /run/sshd (its privilege separation directory).
        let script = format!(
            "set -e\n\
             for d in {covered}; do mkdir -p \"$d\"; mount -t tmpfs -o mode=0755 flotilla-test \"$d\"; done\n\
             mkdir -p /run/sshd\n\
             chmod 0755 /run/sshd\n\
             exec {SSHD} -D -e -f \"$1\"\n",
            covered = COVERED.join(" "),
        );
        let log = dir.join("sshd.log");
        let log_file = File::create(&log).expect("create the sshd log");
        let child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(&script)
            .arg("flotilla-test-sshd")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("clone the log file"))
            .stderr(log_file)
            .spawn()
            .expect("start unshare ... sshd");
        let mut sshd = Sshd {
            port,
            identity,
            known_hosts,
            dir: dir.to_path_buf(),
            log,
            child: Some(child),
            namespace: None,
        };
        sshd.wait_ready();
        sshd
    }

    /// Waits until sshd accepts connections and root can log in, and notes
    /// its namespace.
    fn wait_ready(&mut self) {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    panic!(
                        "sshd exited ({status}) before accepting connections on port {}; its log:\n{}",
                        self.port,
                        self.log()
                    );
                }
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                break;
            }
            if Instant::now() >= deadline {
                panic!(
                    "sshd did not accept connections on port {} within {READY_TIMEOUT:?}; its log:\n{}",
                    self.port,
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
        // sh has exec'd sshd by now (it listens): its pid is the child's.
        let ours = fs::read_link("/proc/self/ns/mnt").ok();
        let pid = self.child.as_ref().map(Child::id);
        let theirs = pid.and_then(|pid| fs::read_link(format!("/proc/{pid}/ns/mnt")).ok());
        if theirs.is_none() || theirs == ours {
            panic!(
                "sshd does not run in a mount namespace of its own (ours: {ours:?}, its: {theirs:?}); \
                 refusing to go on, since installs would land on this machine; its log:\n{}",
                self.log()
            );
        }
        self.namespace = theirs;
        // Root, in the namespace (its /run, without systemd's).
        let out = self.run(
            "test -d /run/sshd && ! test -e /run/systemd/system && echo \"flotilla-sshd uid=$(id -u)\"",
        );
        if !out.status.success()
            || !String::from_utf8_lossy(&out.stdout).contains("flotilla-sshd uid=0")
        {
            panic!(
                "root cannot log in to the test sshd on port {} (is root's password field locked with '!'? \
                 `usermod -p '*' root` unlocks key logins without PAM):\n{}\n--- sshd log ---\n{}",
                self.port,
                describe_output(&out),
                self.log()
            );
        }
    }

    /// `root@127.0.0.1`: what `flotilla deploy --ssh` takes.
    pub fn target(&self) -> String {
        "root@127.0.0.1".to_owned()
    }

    /// The `-o` options a client needs besides `-p` and `-i` (each one for
    /// `flotilla deploy --ssh-option`): the server's host key, known in
    /// advance, and only the test's key offered.
    pub fn ssh_options(&self) -> Vec<String> {
        vec![
            format!("UserKnownHostsFile={}", self.known_hosts.display()),
            "StrictHostKeyChecking=yes".to_owned(),
            "IdentitiesOnly=yes".to_owned(),
        ]
    }

    /// Runs `cmd` as root on the target (in the namespace) and returns what
    /// it did; a failure is in the output, not a panic.
    ///
    /// # Panics
    ///
    /// When `ssh` cannot be started at all.
    pub fn run(&self, cmd: &str) -> Output {
        let mut ssh = Command::new("ssh");
        ssh.args(["-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-p"])
            .arg(self.port.to_string())
            .arg("-i")
            .arg(&self.identity);
        for option in self.ssh_options() {
            ssh.arg("-o").arg(option);
        }
        ssh.arg("--")
            .arg(self.target())
            .arg(cmd)
            .stdin(Stdio::null())
            .output()
            .expect("run ssh")
    }

    /// The standard output of `cmd`, which must succeed.
    ///
    /// # Panics
    ///
    /// When it fails (with its output and the server's log).
    pub fn stdout_of(&self, cmd: &str) -> String {
        let out = self.run(cmd);
        if !out.status.success() {
            panic!(
                "`{cmd}` failed on the test sshd:\n{}\n--- sshd log ---\n{}",
                describe_output(&out),
                self.log()
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        read_lossy(&self.log)
    }

    /// The end of the agent's log on the target (direct mode), for failure
    /// messages.
    pub fn agent_log(&self) -> String {
        let out = self.run("tail -n 200 /var/log/flotilla-agent.log 2>&1");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The directory holding the keys, the configuration and the log.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every process in the namespace but sshd itself.
    fn namespace_pids(&self) -> Vec<i32> {
        let Some(namespace) = &self.namespace else {
            return Vec::new();
        };
        let sshd = self.child.as_ref().map(|c| c.id() as i32);
        let Ok(entries) = fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
            .filter(|&pid| Some(pid) != sshd && pid != std::process::id() as i32)
            .filter(|pid| {
                fs::read_link(format!("/proc/{pid}/ns/mnt")).ok().as_ref() == Some(namespace)
            })
            .collect()
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        // The agents (and any session) first, cleanly; what is left after
        // STOP_TIMEOUT, by force. Only ever processes of sshd's own
        // namespace, which `wait_ready` checked is not the test's.
        let signal_all = |signal: Signal, pids: &[i32]| {
            for &pid in pids {
                let _ = kill(Pid::from_raw(pid), signal);
            }
        };
        signal_all(Signal::SIGTERM, &self.namespace_pids());
        let deadline = Instant::now() + STOP_TIMEOUT;
        while !self.namespace_pids().is_empty() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(100));
        }
        signal_all(Signal::SIGKILL, &self.namespace_pids());
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Processes that were on their way out when sshd went.
        signal_all(Signal::SIGKILL, &self.namespace_pids());
    }
}

/// `ssh-keygen` an ed25519 key without a passphrase at `path` (and `.pub`).
fn keygen(path: &Path, comment: &str) {
    let _ = fs::remove_file(path);
    let _ = fs::remove_file(path.with_extension("pub"));
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .expect("run ssh-keygen");
    if !out.status.success() {
        panic!(
            "ssh-keygen failed for {}:\n{}",
            path.display(),
            describe_output(&out)
        );
    }
}

/// A public key file's one line.
fn read_key(path: &Path) -> String {
    fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
        .trim()
        .to_owned()
}

/// Whether `tool` is an executable file in a `PATH` directory.
fn on_path(tool: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).any(|dir| dir.join(tool).is_file())
}

/// A finished command's exit status and output, for failure messages.
fn describe_output(out: &Output) -> String {
    format!(
        "exit status: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout).trim_end(),
        String::from_utf8_lossy(&out.stderr).trim_end()
    )
}
