//! The coordinator daemon (`flotilla serve`), and what it talks to: a
//! webhook receiver, its `/metrics` endpoint, and `flotilla config check`.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::Value;

use crate::files::read_lossy;
use crate::process::{binaries, describe, hermetic, CliOutput, CliProcess};
use crate::{Fleet, CLI_TIMEOUT};

/// Deadline of one HTTP exchange with the daemon's `/metrics`.
const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

impl Fleet {
    /// Spawns `flotilla serve --config CONFIG --state-dir serve/NAME` with the
    /// fleet's environment and `RUST_LOG=info`, logging to
    /// `logs/serve-NAME.log` (so [`Fleet::logs`] shows it on failure).
    pub fn serve(&self, name: &str, config: &Path) -> Result<Serve> {
        let state_dir = self.dir().join("serve").join(name);
        fs::create_dir_all(&state_dir)
            .with_context(|| format!("cannot create {}", state_dir.display()))?;
        let log = self.dir().join("logs").join(format!("serve-{name}.log"));
        let args: Vec<OsString> = vec![
            "serve".into(),
            "--config".into(),
            config.into(),
            "--state-dir".into(),
            state_dir.clone().into(),
        ];
        let bin = binaries().flotilla.clone();
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("cannot open {}", log.display()))?;
        writeln!(file, "=== flotilla-e2e: {} ===", describe(&bin, &args))?;
        let rust_log = std::env::var_os("RUST_LOG").unwrap_or_else(|| "info".into());
        let mut cmd = hermetic(&bin);
        cmd.args(&args)
            .env("FLOTILLA_FLEET", self.fleet_dir())
            .env("FLOTILLA_NATS_URL", self.nats_url())
            .env("NO_COLOR", "1")
            .env("RUST_LOG", rust_log)
            .env("RUST_BACKTRACE", "1")
            .stdout(file.try_clone()?)
            .stderr(file);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        Ok(Serve {
            name: name.to_owned(),
            log,
            state_dir,
            child: Some(child),
            last_exit: None,
        })
    }
}

/// A running (or stopped) `flotilla serve`. Killed with SIGKILL on drop if
/// still running; its log outlives it.
#[derive(Debug)]
pub struct Serve {
    name: String,
    log: PathBuf,
    state_dir: PathBuf,
    child: Option<Child>,
    last_exit: Option<ExitStatus>,
}

impl Serve {
    /// The name given to [`Fleet::serve`].
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `--state-dir`.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The daemon's output so far.
    pub fn log(&self) -> String {
        read_lossy(&self.log)
    }

    /// Whether the process has not exited.
    pub fn is_running(&mut self) -> bool {
        self.reap();
        self.child.is_some()
    }

    fn reap(&mut self) {
        if let Some(child) = &mut self.child {
            if let Ok(Some(status)) = child.try_wait() {
                self.last_exit = Some(status);
                self.child = None;
            }
        }
    }

    /// Asks the daemon to stop cleanly (it hands its lease over).
    pub fn sigterm(&mut self) -> Result<()> {
        self.reap();
        let Some(child) = &self.child else {
            bail!(
                "serve {} is not running (last exit: {:?})",
                self.name,
                self.last_exit
            );
        };
        let pid = Pid::from_raw(i32::try_from(child.id()).context("pid out of range")?);
        kill(pid, Signal::SIGTERM)
            .with_context(|| format!("cannot send SIGTERM to serve {}", self.name))
    }

    /// Kills the daemon with SIGKILL, as a crash or power loss would (its
    /// lease is left to expire), and reaps it.
    pub fn kill9(&mut self) -> Result<()> {
        self.reap();
        let Some(child) = &mut self.child else {
            bail!(
                "serve {} is not running (last exit: {:?})",
                self.name,
                self.last_exit
            );
        };
        child
            .kill()
            .with_context(|| format!("cannot send SIGKILL to serve {}", self.name))?;
        self.wait_exit(Duration::from_secs(10))?;
        Ok(())
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            self.reap();
            if let (None, Some(status)) = (&self.child, self.last_exit) {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                bail!(
                    "serve {} did not exit within {timeout:?}; its log:\n{}",
                    self.name,
                    self.log()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs `flotilla ARGS…` with no fleet environment (e.g. `config check`).
pub fn flotilla_cli<I, S>(args: I) -> Result<CliOutput>
where
    I: IntoIterator<Item = S>,
    S: Into<OsString>,
{
    let args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let bin = &binaries().flotilla;
    let mut cmd = hermetic(bin);
    cmd.args(&args).env("NO_COLOR", "1");
    CliProcess::spawn(cmd, describe(bin, &args))?.wait(CLI_TIMEOUT)
}

// ---- webhook receiver ------------------------------------------------------

/// A minimal HTTP server on a loopback port that stores the JSON body of
/// every request and answers `200 OK`. Keep-alive connections are served
/// request after request, as HTTP clients with connection pools expect.
#[derive(Debug)]
pub struct Webhook {
    port: u16,
    received: Arc<Mutex<Vec<Value>>>,
    stop: Arc<AtomicBool>,
}

impl Webhook {
    /// Starts listening on `127.0.0.1:0`.
    pub fn start() -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").context("cannot bind the webhook port")?;
        let port = listener.local_addr()?.port();
        let received = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (store, stopped) = (received.clone(), stop.clone());
        thread::spawn(move || {
            for conn in listener.incoming() {
                if stopped.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let store = store.clone();
                thread::spawn(move || serve_connection(conn, &store));
            }
        });
        Ok(Self {
            port,
            received,
            stop,
        })
    }

    /// `http://127.0.0.1:PORT/hook`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    /// Every body received so far, in order (a body that is not JSON is kept
    /// as a string).
    pub fn received(&self) -> Vec<Value> {
        self.received.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the accept loop so that it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn serve_connection(conn: TcpStream, store: &Mutex<Vec<Value>>) {
    // Pooled connections sit idle between events; the daemon's exit ends them.
    let _ = conn.set_read_timeout(Some(Duration::from_secs(600)));
    let Ok(mut writer) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(conn);
    loop {
        let mut length = 0usize;
        let mut first = true;
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let line = line.trim_end();
            if line.is_empty() {
                if first {
                    continue; // stray CRLF between requests
                }
                break;
            }
            first = false;
            if let Some((name, value)) = line.split_once(':') {
                if name.trim().eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0u8; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let value = serde_json::from_slice(&body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
        if let Ok(mut v) = store.lock() {
            v.push(value);
        }
        if writer
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            .is_err()
        {
            return;
        }
    }
}

// ---- /metrics --------------------------------------------------------------

/// `GET /metrics` from `addr` (`127.0.0.1:PORT`): the body of a `200 OK`.
pub fn scrape_metrics(addr: &str) -> Result<String> {
    let mut conn = TcpStream::connect(addr).with_context(|| format!("cannot connect to {addr}"))?;
    conn.set_read_timeout(Some(HTTP_TIMEOUT))?;
    conn.set_write_timeout(Some(HTTP_TIMEOUT))?;
    write!(
        conn,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw)
        .with_context(|| format!("cannot read the answer of {addr}"))?;
    let text = String::from_utf8(raw).context("the /metrics answer is not UTF-8")?;
    let Some((head, body)) = text.split_once("\r\n\r\n") else {
        bail!("no end of headers in the /metrics answer:\n{text}");
    };
    if !head.starts_with("HTTP/1.1 200") {
        bail!("GET /metrics answered:\n{text}");
    }
    Ok(body.to_owned())
}

/// One sample of the Prometheus text format.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name.
    pub name: String,
    /// Labels, by name.
    pub labels: BTreeMap<String, String>,
    /// Value.
    pub value: f64,
}

/// Parses the Prometheus text format strictly: every line is blank, a `#`
/// comment, `name value` or `name{label="value",…} value` with a float value
/// (an optional integer timestamp may follow).
pub fn parse_prometheus(text: &str) -> Result<Vec<Sample>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        out.push(parse_sample(line).with_context(|| format!("line {}: {line:?}", i + 1))?);
    }
    Ok(out)
}

fn is_name(s: &str, colons: bool) -> bool {
    let mut chars = s.chars();
    let ok_first = |c: char| c.is_ascii_alphabetic() || c == '_' || (colons && c == ':');
    chars.next().is_some_and(ok_first) && chars.all(|c| ok_first(c) || c.is_ascii_digit())
}

fn parse_sample(line: &str) -> Result<Sample> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .context("no value")?;
    let name = &line[..name_end];
    if !is_name(name, true) {
        bail!("{name:?} is not a metric name");
    }
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if let Some(after) = rest.strip_prefix('{') {
        let mut chars = after.char_indices().peekable();
        let end = loop {
            while chars.next_if(|(_, c)| *c == ',' || *c == ' ').is_some() {}
            let Some(&(start, c)) = chars.peek() else {
                bail!("unclosed label set");
            };
            if c == '}' {
                break start + 1;
            }
            let eq = after[start..].find('=').context("label without '='")? + start;
            let label = after[start..eq].trim();
            if !is_name(label, false) {
                bail!("{label:?} is not a label name");
            }
            while chars.next_if(|(i, _)| *i <= eq).is_some() {}
            if chars.next().map(|(_, c)| c) != Some('"') {
                bail!("label {label} has no quoted value");
            }
            let mut value = String::new();
            loop {
                match chars.next() {
                    Some((_, '"')) => break,
                    Some((_, '\\')) => match chars.next() {
                        Some((_, 'n')) => value.push('\n'),
                        Some((_, c @ ('\\' | '"'))) => value.push(c),
                        other => bail!("bad escape {other:?} in label {label}"),
                    },
                    Some((_, c)) => value.push(c),
                    None => bail!("unterminated value of label {label}"),
                }
            }
            if labels.insert(label.to_owned(), value).is_some() {
                bail!("label {label} given twice");
            }
        };
        rest = &after[end..];
    }
    let mut fields = rest.split_whitespace();
    let value = fields.next().context("no value")?;
    let value: f64 = value
        .parse()
        .with_context(|| format!("{value:?} is not a float"))?;
    if let Some(ts) = fields.next() {
        ts.parse::<i64>()
            .with_context(|| format!("{ts:?} is not a timestamp"))?;
    }
    if let Some(extra) = fields.next() {
        bail!("unexpected {extra:?} after the value");
    }
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}
