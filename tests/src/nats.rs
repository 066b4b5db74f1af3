//! A real `nats-server` with JetStream, private to one test.

use std::fs::{File, OpenOptions};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tempfile::TempDir;

use crate::files::read_lossy;

/// How long a fresh server may take to accept connections.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts at starting a server; a retry covers the small window in which
/// another process can take the port we picked.
const START_ATTEMPTS: usize = 3;

/// How long a stopping server may take to exit before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A `nats-server -js` on a free loopback port, with its JetStream store and log
/// in a temporary directory. Killed (and the directory removed) on drop.
///
/// [`NatsServer::restart`] stops it and starts it again on the same port
/// with the same store, as an operator's restart would: file-backed streams
/// and buckets survive, memory-backed ones (the `flotilla serve` lease) do
/// not, and clients reconnect by themselves.
///
/// A fleet made on it ([`crate::Fleet::init`]) restarts it once with the
/// configuration `flotilla nats-config` writes ([`NatsServer::reconfigure`]):
/// TLS, the fleet's operator and accounts, anonymous connections refused.
/// Restarts keep that configuration.
#[derive(Debug)]
pub struct NatsServer {
    child: Mutex<Child>,
    config: Mutex<Option<PathBuf>>,
    bin: PathBuf,
    host: String,
    port: u16,
    log: PathBuf,
    // Dropped after the child is killed, see `Drop`.
    dir: TempDir,
}

impl NatsServer {
    /// Starts a server and waits until it accepts TCP connections.
    ///
    /// The binary is `$NATS_SERVER_BIN`, else `nats-server` on `PATH`.
    pub fn start() -> Result<Self> {
        Self::start_on("127.0.0.1")
    }

    /// [`NatsServer::start`] listening on `host` (`0.0.0.0`: every
    /// interface, for agents in other network namespaces); [`Self::url`]
    /// stays the loopback one.
    pub fn start_on(host: &str) -> Result<Self> {
        let bin = nats_server_bin()?;
        let mut last_error = None;
        for _ in 0..START_ATTEMPTS {
            match Self::try_start(&bin, host) {
                Ok(server) => return Ok(server),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.expect("START_ATTEMPTS is at least one"))
    }

    fn try_start(bin: &Path, host: &str) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("flotilla-nats-")
            .tempdir()
            .context("cannot create a temporary directory for nats-server")?;
        let port = free_port()?;
        let log = dir.path().join("nats-server.log");
        File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let child = spawn(bin, host, port, dir.path(), &log, None)?;
        let mut server = Self {
            child: Mutex::new(child),
            config: Mutex::new(None),
            bin: bin.to_path_buf(),
            host: host.to_owned(),
            port,
            log,
            dir,
        };
        server.wait_ready()?;
        Ok(server)
    }

    /// Stops the server (SIGTERM, as `systemctl restart` would; SIGKILL if
    /// it has not exited within 10 s), keeps it down for `down`, and starts
    /// it again on the same port with the same JetStream store, appending to
    /// the same log. Returns once it accepts connections again.
    pub fn restart(&mut self, down: Duration) -> Result<()> {
        self.stop()?;
        thread::sleep(down);
        // The port was ours a moment ago; another process taking it in
        // between is possible but rare, and reported with the log.
        self.respawn()?;
        self.wait_ready()
    }

    /// The host the server listens on (`127.0.0.1`, or `0.0.0.0`).
    pub fn listen_host(&self) -> &str {
        &self.host
    }

    /// Stops the server and starts it again on the same port with the
    /// configuration file `config` (which must listen on that port), for
    /// good: later restarts use it too.
    pub fn reconfigure(&self, config: &Path) -> Result<()> {
        self.stop_child()?;
        *lock(&self.config) = Some(config.to_path_buf());
        self.respawn()?;
        self.wait_child_ready()
    }

    fn respawn(&self) -> Result<()> {
        let config = lock(&self.config).clone();
        *lock(&self.child) = spawn(
            &self.bin,
            &self.host,
            self.port,
            self.dir.path(),
            &self.log,
            config.as_deref(),
        )?;
        Ok(())
    }

    /// Kills the server with SIGKILL, as a crash or an OOM kill would, and
    /// reaps it. The store stays; [`NatsServer::start_again`] brings the
    /// server back on the same port.
    pub fn kill9(&mut self) -> Result<()> {
        let mut child = lock(&self.child);
        // Already gone is fine: the wait below reaps it.
        let _ = child.kill();
        child.wait()?;
        Ok(())
    }

    /// Starts the server again on the same port with the same JetStream
    /// store (after [`NatsServer::kill9`]), appending to the same log, and
    /// returns once it accepts connections. Fails if it is still running.
    pub fn start_again(&mut self) -> Result<()> {
        if lock(&self.child).try_wait()?.is_none() {
            bail!("nats-server on port {} is still running", self.port);
        }
        self.respawn()?;
        self.wait_ready()
    }

    /// The server's process id (of its current run).
    pub fn pid(&self) -> u32 {
        lock(&self.child).id()
    }

    fn stop(&mut self) -> Result<()> {
        self.stop_child()
    }

    fn stop_child(&self) -> Result<()> {
        let mut child = lock(&self.child);
        let pid = Pid::from_raw(i32::try_from(child.id()).context("pid out of range")?);
        // Already gone is fine: the wait below reaps it.
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + STOP_TIMEOUT;
        while child.try_wait()?.is_none() {
            if Instant::now() >= deadline {
                child.kill()?;
                child.wait()?;
                break;
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    fn wait_ready(&mut self) -> Result<()> {
        self.wait_child_ready()
    }

    fn wait_child_ready(&self) -> Result<()> {
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(status) = lock(&self.child).try_wait()? {
                bail!(
                    "nats-server on port {} exited ({status}) before accepting connections; its log:\n{}",
                    self.port,
                    self.log()
                );
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                // Someone answered; make sure it is our server and not a
                // neighbour that took the port while ours failed to bind.
                thread::sleep(Duration::from_millis(50));
                if lock(&self.child).try_wait()?.is_none() {
                    return Ok(());
                }
                continue;
            }
            if Instant::now() >= deadline {
                bail!(
                    "nats-server did not accept connections on port {} within {READY_TIMEOUT:?}; its log:\n{}",
                    self.port,
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        read_lossy(&self.log)
    }

    /// The temporary directory holding the JetStream store and the log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        // Kill before the fields drop: the store directory must outlive the server.
        let mut child = lock(&self.child);
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Starts `bin` with `config`, or else on `host:port` with JetStream stored
/// under `dir/jetstream`, appending its output to `log`.
fn spawn(
    bin: &Path,
    host: &str,
    port: u16,
    dir: &Path,
    log: &Path,
    config: Option<&Path>,
) -> Result<Child> {
    let log_file = OpenOptions::new()
        .append(true)
        .open(log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    let port_arg = port.to_string();
    let mut cmd = Command::new(bin);
    match config {
        Some(config) => cmd.arg("-c").arg(config),
        None => cmd
            .args(["-a", host, "-p", port_arg.as_str(), "-js", "-sd"])
            .arg(dir.join("jetstream")),
    };
    cmd.stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .spawn()
        .with_context(|| format!("cannot start {}", bin.display()))
}

fn nats_server_bin() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("NATS_SERVER_BIN") {
        let bin = PathBuf::from(bin);
        if !bin.is_file() {
            bail!("NATS_SERVER_BIN={} is not a file", bin.display());
        }
        return Ok(bin);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(format!("nats-server{}", std::env::consts::EXE_SUFFIX)))
        .find(|candidate| candidate.is_file())
        .context("nats-server is not on PATH: install it (https://github.com/nats-io/nats-server) or set NATS_SERVER_BIN")
}

/// A loopback port that was free a moment ago (bound to `127.0.0.1:0`, then
/// released).
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("cannot bind a loopback port")?;
    Ok(listener.local_addr()?.port())
}
