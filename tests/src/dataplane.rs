//! The data-plane commands (`backup`, `restore`, `snapshots`, `check`,
//! `repair`) run through the real CLI, and readers for what they print.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::{CliOutput, Fleet};

/// Deadline of one data-plane command run with `--wait`: generous, since
/// tests run in parallel on small machines and move hundreds of megabytes.
pub const DATA_TIMEOUT: Duration = Duration::from_secs(600);

impl Fleet {
    /// `flotilla backup HOSTS --to STORAGE [EXTRA…] --wait --json`.
    pub fn backup(&self, hosts: &str, storage: &str, extra: &[&str]) -> Result<CliOutput> {
        let mut args = vec!["backup", hosts, "--to", storage];
        args.extend_from_slice(extra);
        args.extend(["--wait", "--json"]);
        self.cli_with_timeout(args, DATA_TIMEOUT)
    }

    /// `flotilla restore SNAPSHOT --to HOST:DIR [--include P]… --wait --json`.
    pub fn restore(&self, snapshot: &str, to: &str, includes: &[&str]) -> Result<CliOutput> {
        let mut args = vec!["restore", snapshot, "--to", to];
        for &include in includes {
            args.extend(["--include", include]);
        }
        args.extend(["--wait", "--json"]);
        self.cli_with_timeout(args, DATA_TIMEOUT)
    }

    /// `flotilla check STORAGE [--read-data] --json`.
    pub fn check(&self, storage: &str, read_data: bool) -> Result<CliOutput> {
        let mut args = vec!["check", storage, "--json"];
        if read_data {
            args.push("--read-data");
        }
        self.cli_with_timeout(args, DATA_TIMEOUT)
    }

    /// `flotilla repair STORAGE [--read-data] --wait --json`; its report is
    /// read with [`check_report`].
    pub fn repair(&self, storage: &str, read_data: bool) -> Result<CliOutput> {
        let mut args = vec!["repair", storage, "--wait", "--json"];
        if read_data {
            args.push("--read-data");
        }
        self.cli_with_timeout(args, DATA_TIMEOUT)
    }

    /// `flotilla snapshots [EXTRA…] --json`, which must succeed.
    pub fn snapshots(&self, extra: &[&str]) -> Result<Vec<Value>> {
        let mut args = vec!["snapshots", "--json"];
        args.extend_from_slice(extra);
        match self.cli_json(args)? {
            Value::Array(list) => Ok(list),
            other => bail!("`flotilla snapshots --json` printed {other}, not an array"),
        }
    }

    /// `flotilla events --json --kind KIND --host HOST`: fewer events to sift
    /// through than [`Fleet::events`] while a big task reports progress.
    pub fn events_of(&self, kind: &str, host: &str) -> Result<Vec<Value>> {
        self.cli_json_lines(["events", "--json", "--kind", kind, "--host", host])
    }
}

/// Every JSON document on stdout, in order, whether one per line or
/// pretty-printed over several (`check --json` prints progress lines, then
/// its report).
pub fn json_values(out: &CliOutput) -> Result<Vec<Value>> {
    serde_json::Deserializer::from_str(&out.stdout)
        .into_iter::<Value>()
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("stdout is not a sequence of JSON documents:\n{out}"))
}

/// The `{"type":"summary"}` lines of a `backup` or `restore --json`.
pub fn summaries(out: &CliOutput) -> Result<Vec<Value>> {
    Ok(json_values(out)?
        .into_iter()
        .filter(|v| v["type"] == "summary")
        .collect())
}

/// `host`'s summary line of a `backup` or `restore --json`.
pub fn summary_of(out: &CliOutput, host: &str) -> Result<Value> {
    summaries(out)?
        .into_iter()
        .find(|v| v["host"] == host)
        .with_context(|| format!("no summary line for {host}:\n{out}"))
}

/// The report of `check --json` (or `repair --wait --json`): its last JSON
/// document that is not a progress line.
pub fn check_report(out: &CliOutput) -> Result<Value> {
    json_values(out)?
        .into_iter()
        .rev()
        .find(|v| v.is_object() && v["type"] != "progress")
        .with_context(|| format!("no check report:\n{out}"))
}
