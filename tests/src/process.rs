//! Finding the Flotilla binaries and running them with a deadline.

use std::ffi::OsStr;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// How often a waiting process is checked on.
const REAP_POLL: Duration = Duration::from_millis(20);

/// Paths of the binaries under test.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// The coordinator CLI, `flotilla`.
    pub flotilla: PathBuf,
    /// The host daemon, `flotilla-agent`.
    pub agent: PathBuf,
}

/// The binaries under test, located once per test process.
///
/// `FLOTILLA_BIN_DIR` names their directory; otherwise it is the cargo profile
/// directory this test binary was built into (tests run from
/// `target/<profile>/deps/`, binaries live in `target/<profile>/`). Cargo does not
/// build other packages' binaries for an integration test, hence the panic with
/// the command that does.
pub fn binaries() -> &'static Binaries {
    static BINARIES: OnceLock<Binaries> = OnceLock::new();
    BINARIES.get_or_init(|| {
        let dir = match std::env::var_os("FLOTILLA_BIN_DIR") {
            Some(dir) => PathBuf::from(dir),
            None => {
                let exe = std::env::current_exe().expect("the test binary knows its own path");
                exe.parent()
                    .and_then(Path::parent)
                    .expect("the test binary lives in target/<profile>/deps/")
                    .to_path_buf()
            }
        };
        let find = |name: &str| {
            let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
            assert!(
                path.is_file(),
                "{} does not exist: run `cargo build --workspace --bins` first \
                 (or point FLOTILLA_BIN_DIR at the directory holding `{name}`)",
                path.display()
            );
            path
        };
        Binaries {
            flotilla: find("flotilla"),
            agent: find("flotilla-agent"),
        }
    })
}

/// A command for `bin` that does not inherit the developer's `FLOTILLA_*`
/// variables, so that only what a test sets reaches the process.
pub(crate) fn hermetic(bin: &Path) -> Command {
    let mut cmd = Command::new(bin);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("FLOTILLA_") {
            cmd.env_remove(key);
        }
    }
    cmd.stdin(Stdio::null());
    cmd
}

/// `bin args…` as a human would type it, for messages.
pub(crate) fn describe<I, S>(bin: &Path, args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut text = bin.file_name().map_or_else(
        || bin.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    for arg in args {
        text.push(' ');
        text.push_str(&arg.as_ref().to_string_lossy());
    }
    text
}

/// What a finished (or timed-out) command did. Its `Display` shows everything,
/// so `assert_eq!(out.code, Some(0), "{out}")` explains a failure by itself.
#[derive(Debug, Clone)]
pub struct CliOutput {
    /// The command line, for messages.
    pub command: String,
    /// Exit code; `None` when killed by a signal (including our timeout).
    pub code: Option<i32>,
    /// Standard output, lossily decoded.
    pub stdout: String,
    /// Standard error, lossily decoded.
    pub stderr: String,
    /// The command ran past its deadline and was killed.
    pub timed_out: bool,
}

impl CliOutput {
    /// Exited with code 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// Fails unless the command exited 0.
    pub fn ensure_success(&self) -> Result<&Self> {
        if !self.success() {
            bail!("command failed:\n{self}");
        }
        Ok(self)
    }

    /// Standard output as one JSON document.
    pub fn json(&self) -> Result<Value> {
        serde_json::from_str(&self.stdout)
            .with_context(|| format!("stdout is not one JSON document:\n{self}"))
    }

    /// Standard output as JSON lines (blank lines skipped).
    pub fn json_lines(&self) -> Result<Vec<Value>> {
        self.stdout
            .lines()
            .filter(|line| !line.trim().is_empty())
            .map(|line| {
                serde_json::from_str(line)
                    .with_context(|| format!("line is not JSON: {line:?}\n{self}"))
            })
            .collect()
    }
}

impl fmt::Display for CliOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` ", self.command)?;
        match (self.timed_out, self.code) {
            (true, _) => writeln!(f, "timed out and was killed")?,
            (false, Some(code)) => writeln!(f, "exited with code {code}")?,
            (false, None) => writeln!(f, "was killed by a signal")?,
        }
        writeln!(f, "--- stdout ---\n{}", self.stdout.trim_end())?;
        write!(f, "--- stderr ---\n{}", self.stderr.trim_end())
    }
}

/// A command running in the background with its output captured.
///
/// Killed on drop if still running.
#[derive(Debug)]
pub struct CliProcess {
    command: String,
    child: Child,
    stdout: Option<JoinHandle<Vec<u8>>>,
    stderr: Option<JoinHandle<Vec<u8>>>,
}

impl CliProcess {
    /// Starts `cmd`, capturing stdout and stderr on two threads so that a chatty
    /// process never blocks on a full pipe.
    pub(crate) fn spawn(mut cmd: Command, command: String) -> Result<Self> {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start `{command}`"))?;
        let stdout = child
            .stdout
            .take()
            .map(|s| thread::spawn(move || read_all(s)));
        let stderr = child
            .stderr
            .take()
            .map(|s| thread::spawn(move || read_all(s)));
        Ok(Self {
            command,
            child,
            stdout,
            stderr,
        })
    }

    /// The command line, for messages.
    pub fn command(&self) -> &str {
        &self.command
    }

    /// Whether the process has not exited yet.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGINT, as Ctrl-C at a terminal would send.
    pub fn interrupt(&self) -> Result<()> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT)
            .with_context(|| format!("cannot interrupt `{}`", self.command))
    }

    /// Waits up to `timeout` for the process to exit, killing it after that, and
    /// returns what it did. A timeout is reported in [`CliOutput::timed_out`], not
    /// as an error, so the caller's assertion shows the partial output.
    pub fn wait(mut self, timeout: Duration) -> Result<CliOutput> {
        let deadline = Instant::now() + timeout;
        let (status, timed_out): (Option<ExitStatus>, bool) = loop {
            if let Some(status) = self
                .child
                .try_wait()
                .with_context(|| format!("cannot wait for `{}`", self.command))?
            {
                break (Some(status), false);
            }
            if Instant::now() >= deadline {
                // Kill can only fail if it exited in the meantime; wait reaps either way.
                let _ = self.child.kill();
                break (self.child.wait().ok(), true);
            }
            thread::sleep(REAP_POLL);
        };
        let stdout = self.stdout.take().map(join_output).unwrap_or_default();
        let stderr = self.stderr.take().map(join_output).unwrap_or_default();
        Ok(CliOutput {
            command: self.command.clone(),
            code: if timed_out {
                None
            } else {
                status.and_then(|s| s.code())
            },
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
            timed_out,
        })
    }
}

impl Drop for CliProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn read_all(mut reader: impl Read) -> Vec<u8> {
    let mut buf = Vec::new();
    // A read error (the process died mid-write) leaves what was read so far.
    let _ = reader.read_to_end(&mut buf);
    buf
}

fn join_output(handle: JoinHandle<Vec<u8>>) -> Vec<u8> {
    handle.join().unwrap_or_default()
}
