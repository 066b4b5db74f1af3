//! The decisions of `flotilla deploy` and `flotilla upgrade`, without I/O:
//! the ssh command lines and the remote commands built from a host's
//! settings, the shell quoting they go through, the target's architecture,
//! where the agent binary is looked for, whether the host gets a new bundle,
//! whether a host may be upgraded now (from its heartbeat), whether it is
//! back online, and how to roll it back. The driver (`deploy.rs`) runs what
//! this module writes and hands back what it saw.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use flotilla_protocol::{HostName, OfflineReason, RunningJob};

use super::settings::{DeploySettings, Service};
use crate::nats::HostRecord;

/// Where `install-agent.sh` installs the agent.
pub(super) const REMOTE_BIN: &str = "/usr/local/bin/flotilla-agent";
/// Where it keeps the binary it replaced.
pub(super) const REMOTE_PREVIOUS: &str = "/usr/local/bin/flotilla-agent.previous";
/// The installed bundle.
pub(super) const REMOTE_BUNDLE: &str = "/etc/flotilla/bundle.toml";

/// The remote scratch directory: made by `mktemp -d` from this template, and
/// only a name with this shape is ever given to `rm -rf`.
const REMOTE_TMP_TEMPLATE: &str = "/tmp/flotilla-deploy.XXXXXXXX";
const REMOTE_TMP_PREFIX: &str = "/tmp/flotilla-deploy.";

/// `-o` options of every ssh command deploy runs: never ask (a prompt would
/// hang a command nobody watches), and give up connecting after 10 s. The
/// rest is the user's: `~/.ssh/config`, their agent and keys.
const SSH_OPTIONS: [&str; 2] = ["BatchMode=yes", "ConnectTimeout=10"];

/// Marks the lines the probes print, so that whatever a login script on the
/// host prints around them is not taken for an answer.
const PROBE_TAG: &str = "flotilla-probe";
/// Reaches the host and says who we are there: uid and user name.
pub(super) const PROBE_USER: &str = "echo \"flotilla-probe uid=$(id -u) user=$(id -un)\"";
/// Succeeds when the ssh user may run anything as root without a password.
pub(super) const PROBE_SUDO: &str = "sudo -n true";
/// The machine's architecture.
pub(super) const PROBE_ARCH: &str = "echo \"flotilla-probe arch=$(uname -m)\"";
/// Makes the remote scratch directory (as the ssh user, mode 0700).
pub(super) const MKTEMP: &str = "mktemp -d /tmp/flotilla-deploy.XXXXXXXX";

/// How a restart of the agent without systemd goes: a clean stop of the
/// one in the pid file (only if that pid is still a flotilla-agent, as
/// install-agent.sh's `stop_direct` checks: a stale file may name another
/// process), then a new one in a session of its own.
const DIRECT_RESTART: &str = "pid=$(cat /run/flotilla-agent.pid 2>/dev/null); \
if [ -n \"$pid\" ] && grep -qa flotilla-agent \"/proc/$pid/cmdline\" 2>/dev/null; then \
kill \"$pid\"; while kill -0 \"$pid\" 2>/dev/null; do sleep 1; done; fi; \
setsid nohup /usr/local/bin/flotilla-agent run --config /etc/flotilla/agent.toml \
</dev/null >>/var/log/flotilla-agent.log 2>&1 & echo $! >/run/flotilla-agent.pid";

/// Quotes `word` for a POSIX shell: as it is when it holds only characters
/// no shell treats specially, else in single quotes (a `'` inside becomes
/// `'\''`). The remote end of ssh hands its command to the login shell, so
/// every word deploy sends goes through here.
pub(super) fn quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-./:=@%+,".contains(&b));
    if plain {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// `words` quoted and joined by spaces: one shell command line.
pub(super) fn quote_all<I, S>(words: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    words
        .into_iter()
        .map(|w| quote(w.as_ref()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The architectures Flotilla builds the agent for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Arch {
    /// 64-bit x86.
    X86_64,
    /// 64-bit ARM (Raspberry Pi 3 and later on a 64-bit OS).
    Aarch64,
}

impl Arch {
    /// The name in release file names (`flotilla-agent-VERSION-ARCH-linux.tar.gz`).
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        }
    }

    /// What `uname -m` (or Rust's `std::env::consts::ARCH`) says, if Flotilla
    /// builds for it. `amd64` and `arm64` are the BSD and macOS spellings.
    pub(super) fn from_uname(machine: &str) -> Option<Arch> {
        match machine.trim() {
            "x86_64" | "amd64" => Some(Arch::X86_64),
            "aarch64" | "arm64" => Some(Arch::Aarch64),
            _ => None,
        }
    }

    /// The architecture this `flotilla` was built for.
    pub(super) fn own() -> Option<Arch> {
        Arch::from_uname(std::env::consts::ARCH)
    }

    /// The architecture of a 64-bit little-endian ELF executable, from its
    /// first 20 bytes (`e_ident`, `e_type`, `e_machine`).
    pub(super) fn from_elf(header: &[u8]) -> Option<Arch> {
        const EM_X86_64: u16 = 62;
        const EM_AARCH64: u16 = 183;
        if header.len() < 20 || !header.starts_with(b"\x7fELF") {
            return None;
        }
        // EI_CLASS 2: 64-bit; EI_DATA 1: little-endian.
        if header[4] != 2 || header[5] != 1 {
            return None;
        }
        match u16::from_le_bytes([header[18], header[19]]) {
            EM_X86_64 => Some(Arch::X86_64),
            EM_AARCH64 => Some(Arch::Aarch64),
            _ => None,
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The release tarball of the agent `scripts/package.sh` writes.
pub(super) fn tarball_name(version: &str, arch: Arch) -> String {
    format!("flotilla-agent-{version}-{arch}-linux.tar.gz")
}

/// The agent binary's path inside that tarball.
pub(super) fn tarball_member(version: &str, arch: Arch) -> String {
    format!("flotilla-agent-{version}-{arch}-linux/flotilla-agent")
}

/// One place the agent binary may be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Candidate {
    /// A release tarball (its name carries the version and architecture).
    Tarball(PathBuf),
    /// A bare `flotilla-agent`, whose version must be asked.
    Binary(PathBuf),
}

/// What the binary lookup starts from.
#[derive(Debug, Clone)]
pub(super) struct Lookup<'a> {
    /// `--dist DIR` (or `FLOTILLA_DIST`).
    pub dist: Option<&'a Path>,
    /// The current directory.
    pub cwd: Option<&'a Path>,
    /// This `flotilla` executable.
    pub exe: Option<&'a Path>,
    /// The version wanted: the CLI's own.
    pub version: &'a str,
    /// The target's architecture.
    pub target: Arch,
    /// The architecture of this machine's `flotilla`.
    pub own: Option<Arch>,
}

/// Where to look for the agent, in order: the tarball in `--dist` alone when
/// it is given; else in `./dist`, then in `../share/flotilla/dist` beside the
/// CLI (where a package would put it); then, when the target runs this
/// machine's architecture, the `flotilla-agent` beside the CLI (a build tree,
/// or an unpacked release).
pub(super) fn candidates(l: &Lookup<'_>) -> Vec<Candidate> {
    let tarball = tarball_name(l.version, l.target);
    if let Some(dist) = l.dist {
        return vec![Candidate::Tarball(dist.join(&tarball))];
    }
    let mut out = Vec::new();
    if let Some(cwd) = l.cwd {
        out.push(Candidate::Tarball(cwd.join("dist").join(&tarball)));
    }
    let exe_dir = l.exe.and_then(Path::parent);
    if let Some(dir) = exe_dir {
        out.push(Candidate::Tarball(
            dir.join("..")
                .join("share")
                .join("flotilla")
                .join("dist")
                .join(&tarball),
        ));
    }
    if let (Some(dir), true) = (exe_dir, l.own == Some(l.target)) {
        out.push(Candidate::Binary(dir.join("flotilla-agent")));
    }
    out
}

/// The version `flotilla-agent --version` printed.
pub(super) fn agent_version(stdout: &str) -> Option<&str> {
    let line = stdout.lines().next()?;
    let version = line.strip_prefix("flotilla-agent ")?.trim();
    (!version.is_empty()).then_some(version)
}

/// The ssh command line (without `ssh` itself) that runs `remote` on the
/// host. `batch`: the options deploy runs with; without them it is a command
/// for a person to type.
pub(super) fn ssh_args(s: &DeploySettings, batch: bool, remote: &str) -> Vec<String> {
    let mut args = Vec::new();
    if batch {
        for option in SSH_OPTIONS {
            args.push("-o".to_owned());
            args.push(option.to_owned());
        }
    }
    if let Some(port) = s.port {
        args.push("-p".to_owned());
        args.push(port.to_string());
    }
    if let Some(identity) = &s.identity {
        args.push("-i".to_owned());
        args.push(identity.display().to_string());
    }
    for option in &s.ssh_options {
        args.push("-o".to_owned());
        args.push(option.clone());
    }
    // `--`: nothing after it is an option, whatever the target looks like.
    args.push("--".to_owned());
    args.push(s.ssh.clone());
    args.push(remote.to_owned());
    args
}

/// The ssh command line as a person would type it.
pub(super) fn ssh_display(args: &[String]) -> String {
    format!("ssh {}", quote_all(args))
}

/// The value of `key=` on the probe's own line of `stdout`.
fn probe_value<'a>(stdout: &'a str, key: &str) -> Option<&'a str> {
    stdout
        .lines()
        .filter_map(|l| l.trim().strip_prefix(PROBE_TAG)?.strip_prefix(' '))
        .flat_map(str::split_whitespace)
        .find_map(|word| word.strip_prefix(key)?.strip_prefix('='))
        .filter(|v| !v.is_empty())
}

/// `(uid, user)` from [`PROBE_USER`]'s output.
pub(super) fn parse_user(stdout: &str) -> Option<(u32, String)> {
    let uid = probe_value(stdout, "uid")?.parse().ok()?;
    let user = probe_value(stdout, "user").unwrap_or("?").to_owned();
    Some((uid, user))
}

/// What `uname -m` said, from [`PROBE_ARCH`]'s output.
pub(super) fn parse_machine(stdout: &str) -> Option<&str> {
    probe_value(stdout, "arch")
}

/// The checksum `SHA256SUMS` (as `sha256sum` writes it: `HEX  NAME`, or
/// `HEX *NAME` in binary mode) lists for `name`.
pub(super) fn listed_sum<'a>(sums: &'a str, name: &str) -> Option<&'a str> {
    sums.lines().find_map(|line| {
        let (sum, file) = line.trim_end().split_once(char::is_whitespace)?;
        let file = file.trim_start();
        let file = file.strip_prefix('*').unwrap_or(file);
        (file == name && sum.len() == 64 && sum.bytes().all(|b| b.is_ascii_hexdigit()))
            .then_some(sum)
    })
}

/// Prints the `fleet` and `host` lines of the installed bundle, and nothing
/// else of it (the rest is the host's secret); nothing when there is none.
pub(super) fn probe_bundle(sudo: bool) -> String {
    format!(
        // No file: no output, success. A file: its lines, success. A file
        // without them, or sudo failing: failure, never "no bundle" (which
        // would enroll the host again).
        "{s}test -e {REMOTE_BUNDLE} && {s}grep -E '^(fleet|host) *= *\"' {REMOTE_BUNDLE} || {s}test ! -e {REMOTE_BUNDLE}",
        s = if sudo { "sudo -n " } else { "" }
    )
}

/// Which fleet and host the installed bundle is for (nothing: no bundle).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct InstalledBundle {
    /// Its `fleet`.
    pub fleet: Option<String>,
    /// Its `host`.
    pub host: Option<String>,
}

impl InstalledBundle {
    /// Reads [`probe_bundle`]'s output: `key = "value"` lines.
    pub(super) fn parse(stdout: &str) -> InstalledBundle {
        let mut out = InstalledBundle::default();
        for line in stdout.lines() {
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            let value = value.trim();
            let Some(value) = value.strip_prefix('"').and_then(|v| v.strip_suffix('"')) else {
                continue;
            };
            match key.trim() {
                "fleet" => out.fleet = Some(value.to_owned()),
                "host" => out.host = Some(value.to_owned()),
                _ => {}
            }
        }
        out
    }
}

/// What to do about the host's bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum BundlePlan {
    /// Keep the installed one: an upgrade does not re-key the host.
    Keep,
    /// Enroll the host and send the new bundle, for this reason.
    Enroll(String),
    /// The installed bundle is this host's, of this fleet, and revoked.
    Revoked,
}

/// What the bundle decision is taken from.
#[derive(Debug, Clone)]
pub(super) struct BundleFacts<'a> {
    /// The fleet has a certificate for the host (`hosts/HOST.crt`).
    pub has_cert: bool,
    /// That certificate is revoked.
    pub revoked: bool,
    /// What the host has.
    pub installed: &'a InstalledBundle,
    /// This fleet's id.
    pub fleet: &'a str,
    /// The host deployed.
    pub host: &'a HostName,
    /// `--reenroll`.
    pub reenroll: bool,
}

/// Whether the host gets a new bundle: when asked to, when the fleet never
/// enrolled it, or when the host has none of this fleet for this host name.
/// A revoked host's own bundle is not kept (the bus and every agent refuse
/// it) and not replaced unasked (someone revoked it on purpose).
pub(super) fn bundle_plan(f: &BundleFacts<'_>) -> BundlePlan {
    if f.reenroll {
        return BundlePlan::Enroll("--reenroll".into());
    }
    if !f.has_cert {
        return BundlePlan::Enroll(format!("{} has no certificate in this fleet", f.host));
    }
    match (&f.installed.fleet, &f.installed.host) {
        (Some(fleet), Some(host)) if fleet == f.fleet && host == f.host.as_str() => {
            if f.revoked {
                BundlePlan::Revoked
            } else {
                BundlePlan::Keep
            }
        }
        (Some(fleet), Some(_)) if fleet != f.fleet => {
            BundlePlan::Enroll(format!("the host's bundle is of another fleet ({fleet})"))
        }
        (Some(_), Some(host)) => {
            BundlePlan::Enroll(format!("the host's bundle is for host {host}"))
        }
        _ => BundlePlan::Enroll(format!("the host has no {REMOTE_BUNDLE}")),
    }
}

/// The remote scratch directory from `mktemp`'s output, if it has the
/// shape [`MKTEMP`] makes (it is later removed with `rm -rf`).
pub(super) fn parse_tmpdir(stdout: &str) -> Option<String> {
    stdout.lines().map(str::trim).find_map(|dir| {
        let name = dir.strip_prefix(REMOTE_TMP_PREFIX)?;
        let plain = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        plain.then(|| dir.to_owned())
    })
}

/// The scratch directory a dry run shows (it makes none).
pub(super) fn dry_run_tmpdir() -> &'static str {
    REMOTE_TMP_TEMPLATE
}

/// A file deploy copies into the scratch directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Upload {
    /// Its name there.
    pub name: &'static str,
    /// Its mode (`chmod`).
    pub mode: &'static str,
}

/// The agent binary.
pub(super) const UPLOAD_BINARY: Upload = Upload {
    name: "flotilla-agent",
    mode: "0755",
};
/// A new bundle: the host's private key, so 0600 from the first byte.
pub(super) const UPLOAD_BUNDLE: Upload = Upload {
    name: "bundle.toml",
    mode: "0600",
};
/// The installer.
pub(super) const UPLOAD_SCRIPT: Upload = Upload {
    name: "install-agent.sh",
    mode: "0644",
};
/// The systemd unit.
pub(super) const UPLOAD_UNIT: Upload = Upload {
    name: "flotilla-agent.service",
    mode: "0644",
};

/// Where `upload` lands.
pub(super) fn remote_path(dir: &str, upload: &Upload) -> String {
    format!("{dir}/{}", upload.name)
}

/// Writes ssh's standard input to `upload`'s place (no scp needed).
pub(super) fn upload_command(dir: &str, upload: &Upload) -> String {
    let path = quote(&remote_path(dir, upload));
    format!("umask 077 && cat > {path} && chmod {} {path}", upload.mode)
}

/// Runs `install-agent.sh` from the scratch directory with the host's
/// settings: it writes `agent.toml` from them (`FLOTILLA_WRITE_CONFIG=yes`:
/// deploy owns it), checks the new binary against it, and (re)starts the
/// agent under systemd where systemd runs, else in the background. With
/// `new_bundle`, the bundle sent along; else the installed one, kept.
pub(super) fn install_command(
    s: &DeploySettings,
    sudo: bool,
    dir: &str,
    new_bundle: bool,
) -> String {
    let mut words: Vec<String> = Vec::new();
    if sudo {
        words.push("sudo".into());
        words.push("-n".into());
    }
    words.push("env".into());
    words.push("FLOTILLA_WRITE_CONFIG=yes".into());
    words.push("FLOTILLA_SERVICE=auto".into());
    words.push(format!(
        "FLOTILLA_BACKUP_ROOTS={}",
        s.backup_roots.join(" ")
    ));
    words.push(format!(
        "FLOTILLA_RESTORE_ROOTS={}",
        s.restore_roots.join(" ")
    ));
    words.push(format!(
        "FLOTILLA_STORAGE={}",
        s.storage.as_deref().unwrap_or("")
    ));
    words.push(format!(
        "FLOTILLA_LISTEN={}",
        s.listen.as_deref().unwrap_or("")
    ));
    words.push(format!(
        "FLOTILLA_ADVERTISE={}",
        s.advertise.as_deref().unwrap_or("")
    ));
    words.push(format!("FLOTILLA_UNIT={}", remote_path(dir, &UPLOAD_UNIT)));
    // bash, not sh: the script needs it; and read as a file, so a /tmp
    // mounted noexec does not matter.
    words.push("bash".into());
    words.push(remote_path(dir, &UPLOAD_SCRIPT));
    words.push(if new_bundle {
        remote_path(dir, &UPLOAD_BUNDLE)
    } else {
        REMOTE_BUNDLE.to_owned()
    });
    words.push(remote_path(dir, &UPLOAD_BINARY));
    quote_all(&words)
}

/// Removes the scratch directory.
pub(super) fn cleanup_command(dir: &str) -> String {
    format!("rm -rf {}", quote(dir))
}

/// What `install-agent.sh` said it did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct InstallReport {
    /// `install-agent: installed flotilla-agent VERSION`, its last line.
    pub version: Option<String>,
    /// `install-agent: service: systemd|direct`.
    pub service: Option<Service>,
}

/// Reads `install-agent.sh`'s standard output.
pub(super) fn parse_install_output(stdout: &str) -> InstallReport {
    let mut report = InstallReport::default();
    for line in stdout.lines() {
        if let Some(rest) = line.strip_prefix("install-agent: installed flotilla-agent ") {
            report.version = rest.split_whitespace().next().map(str::to_owned);
        } else if let Some(rest) = line.strip_prefix("install-agent: service: ") {
            report.service = rest.split_whitespace().next().and_then(Service::parse);
        }
    }
    report
}

/// The command that restarts the agent the way it runs on the host; both
/// ways, chosen on the host, when that is not known.
fn restart_command(service: Option<Service>) -> String {
    match service {
        Some(Service::Systemd) => "systemctl restart flotilla-agent".into(),
        Some(Service::Direct) => DIRECT_RESTART.into(),
        None => format!(
            "if [ -d /run/systemd/system ]; then systemctl restart flotilla-agent; else {DIRECT_RESTART}; fi"
        ),
    }
}

/// The ssh command a person runs to put back the binary the last install
/// replaced and restart the agent on it.
pub(super) fn rollback_command(s: &DeploySettings, sudo: bool) -> String {
    let remote = format!(
        "mv -f {REMOTE_PREVIOUS} {REMOTE_BIN} && {}",
        restart_command(s.service)
    );
    let remote = if sudo {
        format!("sudo sh -c {}", quote(&remote))
    } else {
        remote
    };
    ssh_display(&ssh_args(s, false, &remote))
}

/// Whether a host may be upgraded now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Gate {
    /// Go ahead; with a note to show, if any.
    Go(Option<String>),
    /// It runs these tasks: ask again later.
    Wait(String),
    /// It runs these tasks, and waiting is not allowed (`--no-wait`) or
    /// over (`--timeout`, then `timed_out`).
    Refuse {
        /// The tasks.
        running: String,
        /// Whether the wait ran out (else it was not allowed).
        timed_out: bool,
    },
}

/// Whether to upgrade a host now, from its registry record: never in the
/// middle of a task unless `force` (the restart stops the task; the agent
/// resumes it when it is back). A host with no heartbeat, or offline, runs
/// nothing that could be interrupted.
pub(super) fn upgrade_gate(
    record: Option<&HostRecord>,
    now: u64,
    force: bool,
    no_wait: bool,
    waited: Duration,
    timeout: Duration,
) -> Gate {
    let Some(record) = record else {
        return Gate::Go(Some("it has never sent a heartbeat".into()));
    };
    if record.offline_reason(now).is_some() {
        return Gate::Go(Some("it is offline: no task is running".into()));
    }
    let jobs = &record.heartbeat.running;
    if jobs.is_empty() {
        return Gate::Go(None);
    }
    let running = describe_running(jobs, now);
    if force {
        return Gate::Go(Some(format!(
            "it runs {running}; going ahead (--force): the restart stops it, and the agent resumes it when it is back"
        )));
    }
    if no_wait {
        return Gate::Refuse {
            running,
            timed_out: false,
        };
    }
    if waited >= timeout {
        return Gate::Refuse {
            running,
            timed_out: true,
        };
    }
    Gate::Wait(running)
}

/// `backup (task t1, 3m)`, for each running task.
fn describe_running(jobs: &[RunningJob], now: u64) -> String {
    jobs.iter()
        .map(|j| {
            let secs = now.saturating_sub(j.started_at) / 1000;
            format!(
                "{} (task {}, {})",
                j.kind,
                j.task_id,
                humantime::format_duration(Duration::from_secs(secs))
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// `Ok` once the registry shows the host online on `version` with an agent
/// that is not the one from before the install (`before`: that one's start
/// time, if there was one); else what it shows instead.
pub(super) fn back_online(
    record: Option<&HostRecord>,
    before: Option<u64>,
    version: &str,
    now: u64,
) -> Result<(), String> {
    let Some(record) = record else {
        return Err("it is not in the registry yet (no heartbeat)".into());
    };
    let hb = &record.heartbeat;
    match record.offline_reason(now) {
        Some(OfflineReason::Shutdown) => {
            return Err(format!("its agent (version {}) is stopped", hb.version))
        }
        Some(_) => {
            return Err(format!(
                "it is offline: no heartbeat since its agent (version {}) stopped sending them",
                hb.version
            ))
        }
        None => {}
    }
    if before == Some(hb.started_at) {
        return Err(format!(
            "the agent from before the install (version {}) is still the one heartbeating",
            hb.version
        ));
    }
    if hb.version != version {
        return Err(format!("it is online on version {}", hb.version));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use flotilla_protocol::{AgentState, Heartbeat, TaskId, HEARTBEAT_VERSION};

    use super::*;
    use crate::cli::deploy::settings::Overrides;

    fn settings(ssh: &str) -> DeploySettings {
        DeploySettings::merge(
            None,
            Overrides {
                ssh: Some(ssh.into()),
                ..Overrides::default()
            },
        )
        .expect("merge")
    }

    fn host() -> HostName {
        HostName::new("nas").expect("valid")
    }

    fn record(state: AgentState, version: &str, started_at: u64, running: usize) -> HostRecord {
        HostRecord {
            heartbeat: Heartbeat {
                v: HEARTBEAT_VERSION,
                host: host(),
                fleet: "f".into(),
                state,
                version: version.into(),
                started_at,
                time: 100_000,
                interval_ms: 5_000,
                load: [0.0; 3],
                rss_bytes: 0,
                mem_total_bytes: 0,
                mem_available_bytes: 0,
                roles: vec![],
                quic_addr: None,
                roots: vec![],
                running: (0..running)
                    .map(|i| RunningJob {
                        task_id: TaskId::new(format!("t{i}")).expect("valid"),
                        kind: "backup".into(),
                        started_at: 40_000,
                    })
                    .collect(),
                epoch: None,
            },
            stored_at: 100_000,
        }
    }

    #[test]
    fn quoting_leaves_plain_words_and_single_quotes_the_rest() {
        assert_eq!(
            quote("/usr/local/bin/flotilla-agent"),
            "/usr/local/bin/flotilla-agent"
        );
        assert_eq!(quote("FLOTILLA_UNIT=/tmp/x"), "FLOTILLA_UNIT=/tmp/x");
        assert_eq!(quote("root@10.0.0.5"), "root@10.0.0.5");
        assert_eq!(quote(""), "''");
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("$(reboot)"), "'$(reboot)'");
        assert_eq!(quote("it's"), r"'it'\''s'");
        assert_eq!(quote("~root"), "'~root'");
        assert_eq!(quote_all(["echo", "a b", ""]), "echo 'a b' ''");
    }

    /// What `sh` makes of a quoted word is the word itself.
    #[test]
    fn quoted_words_survive_a_real_shell() {
        let nasty = [
            "plain",
            "two words",
            "it's",
            "'",
            "''",
            "$HOME `id` $(id) \\ \" ; | & < > * ? [ ] { } ! #",
            "line\nbreak",
            "-n",
            "",
        ];
        for word in nasty {
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!("printf %s {}", quote(word)))
                .output()
                .expect("run sh");
            assert!(out.status.success(), "{word:?}");
            assert_eq!(String::from_utf8_lossy(&out.stdout), word, "{word:?}");
        }
    }

    #[test]
    fn architectures_from_uname_and_from_elf_headers() {
        assert_eq!(Arch::from_uname("x86_64\n"), Some(Arch::X86_64));
        assert_eq!(Arch::from_uname("amd64"), Some(Arch::X86_64));
        assert_eq!(Arch::from_uname("aarch64"), Some(Arch::Aarch64));
        assert_eq!(Arch::from_uname("arm64"), Some(Arch::Aarch64));
        for other in ["armv7l", "armv6l", "i686", "riscv64", ""] {
            assert_eq!(Arch::from_uname(other), None, "{other}");
        }
        let elf = |class: u8, data: u8, machine: u16| {
            let mut h = vec![0x7f, b'E', b'L', b'F', class, data];
            h.resize(18, 0);
            h.extend_from_slice(&machine.to_le_bytes());
            h
        };
        assert_eq!(Arch::from_elf(&elf(2, 1, 62)), Some(Arch::X86_64));
        assert_eq!(Arch::from_elf(&elf(2, 1, 183)), Some(Arch::Aarch64));
        assert_eq!(Arch::from_elf(&elf(1, 1, 40)), None, "32-bit ARM");
        assert_eq!(Arch::from_elf(&elf(2, 2, 62)), None, "big-endian");
        assert_eq!(Arch::from_elf(b"#!/bin/sh\necho hi\n\n\n\n"), None);
        assert_eq!(Arch::from_elf(&elf(2, 1, 62)[..19]), None, "short");
        assert_eq!(Arch::from_uname(std::env::consts::ARCH), Arch::own());
    }

    #[test]
    fn the_binary_is_looked_for_in_dist_then_share_then_beside_the_cli() {
        let exe = Path::new("/opt/flotilla/bin/flotilla");
        let l = Lookup {
            dist: None,
            cwd: Some(Path::new("/home/me")),
            exe: Some(exe),
            version: "1.2.3",
            target: Arch::X86_64,
            own: Some(Arch::X86_64),
        };
        let tarball = "flotilla-agent-1.2.3-x86_64-linux.tar.gz";
        assert_eq!(
            candidates(&l),
            [
                Candidate::Tarball(PathBuf::from("/home/me/dist").join(tarball)),
                Candidate::Tarball(
                    PathBuf::from("/opt/flotilla/bin/../share/flotilla/dist").join(tarball)
                ),
                Candidate::Binary(PathBuf::from("/opt/flotilla/bin/flotilla-agent")),
            ]
        );
        // Another architecture: only tarballs can have it.
        let arm = Lookup {
            target: Arch::Aarch64,
            ..l.clone()
        };
        assert!(candidates(&arm)
            .iter()
            .all(|c| matches!(c, Candidate::Tarball(p) if p.ends_with("flotilla-agent-1.2.3-aarch64-linux.tar.gz"))));
        assert_eq!(candidates(&arm).len(), 2);
        // --dist names the one place.
        let dist = Lookup {
            dist: Some(Path::new("/srv/dist")),
            ..l
        };
        assert_eq!(
            candidates(&dist),
            [Candidate::Tarball(PathBuf::from("/srv/dist").join(tarball))]
        );
        assert_eq!(
            tarball_member("1.2.3", Arch::Aarch64),
            "flotilla-agent-1.2.3-aarch64-linux/flotilla-agent"
        );
        assert_eq!(agent_version("flotilla-agent 1.2.3\n"), Some("1.2.3"));
        assert_eq!(agent_version("something else 1.2.3\n"), None);
        assert_eq!(agent_version(""), None);
    }

    #[test]
    fn ssh_runs_in_batch_mode_with_the_users_settings_and_no_option_after_the_target() {
        let mut s = settings("root@nas.lan");
        assert_eq!(
            ssh_args(&s, true, "uname -m"),
            [
                "-o",
                "BatchMode=yes",
                "-o",
                "ConnectTimeout=10",
                "--",
                "root@nas.lan",
                "uname -m"
            ]
        );
        s.port = Some(2222);
        s.identity = Some("/k/id".into());
        s.ssh_options = vec!["UserKnownHostsFile=/k/known".into()];
        let args = ssh_args(&s, false, "true");
        assert_eq!(
            args,
            [
                "-p",
                "2222",
                "-i",
                "/k/id",
                "-o",
                "UserKnownHostsFile=/k/known",
                "--",
                "root@nas.lan",
                "true"
            ]
        );
        assert_eq!(
            ssh_display(&ssh_args(&s, false, "uname -m")),
            "ssh -p 2222 -i /k/id -o UserKnownHostsFile=/k/known -- root@nas.lan 'uname -m'"
        );
    }

    #[test]
    fn probes_are_read() {
        assert_eq!(
            parse_user("flotilla-probe uid=0 user=root\n"),
            Some((0, "root".into()))
        );
        // Whatever a login script prints around it is not the answer.
        assert_eq!(
            parse_user("Welcome to nas!\n1\nflotilla-probe uid=1000 user=admin\nbye\n"),
            Some((1000, "admin".into()))
        );
        assert_eq!(parse_user("Welcome!\n0\n"), None);
        assert_eq!(parse_user("flotilla-probe uid= user=x\n"), None);
        assert_eq!(
            parse_machine("motd\nflotilla-probe arch=aarch64\n"),
            Some("aarch64")
        );
        assert_eq!(parse_machine("x86_64\n"), None);
        assert!(PROBE_USER.starts_with("echo \"flotilla-probe uid=$(id -u)"));
        assert!(PROBE_ARCH.contains("arch=$(uname -m)"));
        let a = "a".repeat(64);
        let b = "B".repeat(64);
        let sums = format!("{a}  flotilla-agent-1.0-x86_64-linux.tar.gz\n{b} *flotilla_1.0_amd64.deb\nshort  x.tar.gz\n");
        assert_eq!(
            listed_sum(&sums, "flotilla-agent-1.0-x86_64-linux.tar.gz"),
            Some(a.as_str())
        );
        assert_eq!(
            listed_sum(&sums, "flotilla_1.0_amd64.deb"),
            Some(b.as_str())
        );
        assert_eq!(listed_sum(&sums, "x.tar.gz"), None, "not a SHA-256");
        assert_eq!(
            listed_sum(&sums, "flotilla-agent-1.0-aarch64-linux.tar.gz"),
            None
        );
        assert!(probe_bundle(true).starts_with("sudo -n test -e "));
        // The probe run by a shell, on a stand-in for the bundle: no file is
        // "none" (success, no output), a bundle gives its two lines, and a
        // file without them fails instead of reading as "none".
        let dir = tempfile::tempdir().expect("tempdir");
        let stand_in = dir.path().join("bundle.toml");
        let probe = probe_bundle(false).replace(REMOTE_BUNDLE, &stand_in.display().to_string());
        let run = || {
            std::process::Command::new("bash")
                .args(["-c", &probe])
                .output()
                .expect("bash runs")
        };
        let none = run();
        assert!(none.status.success() && none.stdout.is_empty(), "{none:?}");
        std::fs::write(
            &stand_in,
            "cert = \"x\"\nfleet = \"abc\"\nhost = \"nas\"\nkey = \"secret\"\n",
        )
        .expect("write");
        let found = run();
        assert!(found.status.success(), "{found:?}");
        assert_eq!(
            InstalledBundle::parse(&String::from_utf8_lossy(&found.stdout)),
            InstalledBundle {
                fleet: Some("abc".into()),
                host: Some("nas".into())
            }
        );
        assert!(!String::from_utf8_lossy(&found.stdout).contains("secret"));
        std::fs::write(&stand_in, "garbage\n").expect("write");
        assert!(
            !run().status.success(),
            "an unreadable bundle is not \"none\""
        );
        let installed = InstalledBundle::parse("fleet = \"abc\"\nhost = \"nas\"\n");
        assert_eq!(installed.fleet.as_deref(), Some("abc"));
        assert_eq!(installed.host.as_deref(), Some("nas"));
        assert_eq!(InstalledBundle::parse(""), InstalledBundle::default());
        assert_eq!(
            parse_tmpdir("/tmp/flotilla-deploy.Ab3xY9zQ\n").as_deref(),
            Some("/tmp/flotilla-deploy.Ab3xY9zQ")
        );
        assert_eq!(
            parse_tmpdir("hello from .bashrc\n/tmp/flotilla-deploy.Ab3xY9zQ\n").as_deref(),
            Some("/tmp/flotilla-deploy.Ab3xY9zQ")
        );
        for bad in [
            "",
            "/tmp/flotilla-deploy.",
            "/",
            "/tmp/flotilla-deploy.a b",
            "/tmp/flotilla-deploy.x/..",
            "/etc",
        ] {
            assert_eq!(parse_tmpdir(bad), None, "{bad:?}");
        }
        let report = parse_install_output(
            "install-agent: installing flotilla-agent for fleet host 'nas' (service: direct)\n\
             install-agent: service: direct\n\
             install-agent: installed flotilla-agent 1.2.3\n",
        );
        assert_eq!(report.version.as_deref(), Some("1.2.3"));
        assert_eq!(report.service, Some(Service::Direct));
        assert_eq!(parse_install_output("error"), InstallReport::default());
    }

    #[test]
    fn the_bundle_is_kept_unless_the_host_has_none_of_this_fleet_and_name() {
        let nas = host();
        let ours = InstalledBundle {
            fleet: Some("f1".into()),
            host: Some("nas".into()),
        };
        let facts = |installed, has_cert, revoked, reenroll| BundleFacts {
            has_cert,
            revoked,
            installed,
            fleet: "f1",
            host: &nas,
            reenroll,
        };
        assert_eq!(
            bundle_plan(&facts(&ours, true, false, false)),
            BundlePlan::Keep
        );
        assert_eq!(
            bundle_plan(&facts(&ours, true, true, false)),
            BundlePlan::Revoked
        );
        assert!(matches!(
            bundle_plan(&facts(&ours, true, true, true)),
            BundlePlan::Enroll(why) if why == "--reenroll"
        ));
        assert!(matches!(
            bundle_plan(&facts(&ours, false, false, false)),
            BundlePlan::Enroll(why) if why.contains("no certificate")
        ));
        let none = InstalledBundle::default();
        assert!(matches!(
            bundle_plan(&facts(&none, true, false, false)),
            BundlePlan::Enroll(why) if why.contains("has no /etc/flotilla/bundle.toml")
        ));
        let other_fleet = InstalledBundle {
            fleet: Some("f0".into()),
            ..ours.clone()
        };
        assert!(matches!(
            bundle_plan(&facts(&other_fleet, true, true, false)),
            BundlePlan::Enroll(why) if why.contains("another fleet (f0)")
        ));
        let other_host = InstalledBundle {
            host: Some("web".into()),
            ..ours.clone()
        };
        assert!(matches!(
            bundle_plan(&facts(&other_host, true, false, false)),
            BundlePlan::Enroll(why) if why.contains("for host web")
        ));
    }

    #[test]
    fn the_install_runs_install_agent_with_the_settings_quoted() {
        let mut s = settings("admin@nas");
        s.backup_roots = vec!["/etc".into(), "/srv/data".into()];
        s.storage = Some("/srv/repo".into());
        s.listen = Some("0.0.0.0:7443".into());
        let dir = "/tmp/flotilla-deploy.abc";
        assert_eq!(
            install_command(&s, true, dir, false),
            "sudo -n env FLOTILLA_WRITE_CONFIG=yes FLOTILLA_SERVICE=auto \
             'FLOTILLA_BACKUP_ROOTS=/etc /srv/data' FLOTILLA_RESTORE_ROOTS= \
             FLOTILLA_STORAGE=/srv/repo FLOTILLA_LISTEN=0.0.0.0:7443 FLOTILLA_ADVERTISE= \
             FLOTILLA_UNIT=/tmp/flotilla-deploy.abc/flotilla-agent.service \
             bash /tmp/flotilla-deploy.abc/install-agent.sh /etc/flotilla/bundle.toml \
             /tmp/flotilla-deploy.abc/flotilla-agent"
        );
        let root = install_command(&s, false, dir, true);
        assert!(root.starts_with("env FLOTILLA_WRITE_CONFIG=yes "), "{root}");
        assert!(
            root.contains(
                " /tmp/flotilla-deploy.abc/bundle.toml /tmp/flotilla-deploy.abc/flotilla-agent"
            ),
            "{root}"
        );
        assert_eq!(
            upload_command(dir, &UPLOAD_BUNDLE),
            "umask 077 && cat > /tmp/flotilla-deploy.abc/bundle.toml && chmod 0600 /tmp/flotilla-deploy.abc/bundle.toml"
        );
        assert_eq!(cleanup_command(dir), "rm -rf /tmp/flotilla-deploy.abc");
        assert_eq!(MKTEMP, format!("mktemp -d {}", dry_run_tmpdir()));
    }

    #[test]
    fn rollback_moves_the_previous_binary_back_and_restarts_the_agent_its_way() {
        let mut s = settings("root@nas");
        s.port = Some(2222);
        s.service = Some(Service::Systemd);
        assert_eq!(
            rollback_command(&s, false),
            "ssh -p 2222 -- root@nas 'mv -f /usr/local/bin/flotilla-agent.previous \
             /usr/local/bin/flotilla-agent && systemctl restart flotilla-agent'"
        );
        s.ssh = "admin@nas".into();
        let sudo = rollback_command(&s, true);
        assert!(
            sudo.starts_with("ssh -p 2222 -- admin@nas 'sudo sh -c '\\''mv -f "),
            "{sudo}"
        );
        s.service = Some(Service::Direct);
        assert!(
            rollback_command(&s, false).contains("setsid nohup /usr/local/bin/flotilla-agent run")
        );
        // A stale pid file never gets another process killed.
        assert!(rollback_command(&s, false).contains("flotilla-agent \"/proc/$pid/cmdline\""));
        s.service = None;
        let either = rollback_command(&s, false);
        assert!(either.contains("if [ -d /run/systemd/system ]"), "{either}");
        assert!(
            !either.contains("BatchMode"),
            "a command for a person: {either}"
        );
    }

    #[test]
    fn a_host_is_upgraded_when_it_runs_no_task_or_with_force() {
        let (now, hour) = (100_000, Duration::from_secs(3600));
        let zero = Duration::ZERO;
        let idle = record(AgentState::Online, "1", 0, 0);
        let busy = record(AgentState::Online, "1", 0, 1);
        assert_eq!(
            upgrade_gate(Some(&idle), now, false, true, zero, hour),
            Gate::Go(None)
        );
        assert!(matches!(
            upgrade_gate(None, now, false, true, zero, hour),
            Gate::Go(Some(_))
        ));
        // Offline (stopped, or silent): nothing to interrupt.
        let stopped = record(AgentState::Offline, "1", 0, 1);
        assert!(
            matches!(upgrade_gate(Some(&stopped), now, false, true, zero, hour), Gate::Go(Some(n)) if n.contains("offline"))
        );
        assert!(matches!(
            upgrade_gate(Some(&busy), now + 60_000, false, true, zero, hour),
            Gate::Go(Some(_))
        ));
        // Busy: wait, refuse with --no-wait or after --timeout, or go with --force.
        assert_eq!(
            upgrade_gate(Some(&busy), now, false, false, zero, hour),
            Gate::Wait("backup (task t0, 1m)".into())
        );
        assert_eq!(
            upgrade_gate(Some(&busy), now, false, true, zero, hour),
            Gate::Refuse {
                running: "backup (task t0, 1m)".into(),
                timed_out: false
            }
        );
        assert_eq!(
            upgrade_gate(Some(&busy), now, false, false, hour, hour),
            Gate::Refuse {
                running: "backup (task t0, 1m)".into(),
                timed_out: true
            }
        );
        assert!(
            matches!(upgrade_gate(Some(&busy), now, true, false, zero, hour), Gate::Go(Some(n)) if n.contains("--force"))
        );
    }

    #[test]
    fn back_online_means_a_new_agent_on_the_version_heartbeating() {
        let now = 100_000;
        assert!(back_online(None, None, "2", now)
            .expect_err("none")
            .contains("not in the registry"));
        let old = record(AgentState::Online, "1", 5, 0);
        assert!(back_online(Some(&old), Some(5), "2", now)
            .expect_err("old")
            .contains("from before"));
        assert!(back_online(Some(&old), None, "2", now)
            .expect_err("version")
            .contains("version 1"));
        let stopped = record(AgentState::Offline, "1", 5, 0);
        assert!(back_online(Some(&stopped), Some(5), "2", now)
            .expect_err("stopped")
            .contains("stopped"));
        let new = record(AgentState::Online, "2", 9, 0);
        assert_eq!(back_online(Some(&new), Some(5), "2", now), Ok(()));
        assert_eq!(back_online(Some(&new), None, "2", now), Ok(()));
        // The same version reinstalled: the start time tells the agents apart.
        let same = record(AgentState::Online, "2", 5, 0);
        assert!(back_online(Some(&same), Some(5), "2", now).is_err());
        assert!(back_online(Some(&new), Some(5), "2", now + 60_000)
            .expect_err("silent")
            .contains("offline"));
    }
}
