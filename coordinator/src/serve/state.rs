//! The daemon's own durable state, in sled: when each plan last ran, when
//! each host last backed up each plan, which alerts are already raised.
//!
//! Values are versioned MessagePack; a newer format is refused at open.

use std::path::Path;

use serde::{Deserialize, Serialize};

const FORMAT: u16 = 1;

/// The daemon's state database.
#[derive(Debug, Clone)]
pub struct ServeState {
    db: sled::Db,
    runs: sled::Tree,
    successes: sled::Tree,
    alerts: sled::Tree,
}

/// The last successful backup of one host for one plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Success {
    /// Value version.
    pub v: u16,
    /// When it finished (unix ms).
    pub time: u64,
    /// The snapshot.
    pub snapshot: Option<String>,
    /// Bytes added to the repository.
    pub bytes_added: u64,
    /// How long it took.
    pub duration_ms: u64,
}

/// The state database cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// sled failed.
    #[error("daemon state: {0}")]
    Db(#[from] sled::Error),
    /// Written by a newer flotilla.
    #[error("daemon state was written by a newer flotilla (format {0}); upgrade or use another --state-dir")]
    Newer(u16),
}

fn ms(v: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(v.try_into().ok()?))
}

impl ServeState {
    /// Opens (or creates) the state under `dir`.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        let db = sled::Config::new()
            .path(dir.join("serve.sled"))
            .cache_capacity(8 * 1024 * 1024)
            .open()?;
        let meta = db.open_tree("meta")?;
        match meta.get("format")? {
            Some(v) if v.len() == 2 && u16::from_be_bytes([v[0], v[1]]) > FORMAT => {
                return Err(StateError::Newer(u16::from_be_bytes([v[0], v[1]])))
            }
            Some(_) => {}
            None => {
                meta.insert("format", &FORMAT.to_be_bytes())?;
            }
        }
        Ok(Self {
            runs: db.open_tree("runs")?,
            successes: db.open_tree("successes")?,
            alerts: db.open_tree("alerts")?,
            db,
        })
    }

    /// When `plan` last ran by schedule (or was first armed).
    pub fn last_run(&self, key: &str) -> Result<Option<u64>, StateError> {
        Ok(self.runs.get(key)?.as_deref().and_then(ms))
    }

    /// Records that `plan` ran (or was armed) at `at`.
    pub fn set_last_run(&self, key: &str, at: u64) -> Result<(), StateError> {
        self.runs.insert(key, &at.to_be_bytes())?;
        self.db.flush()?;
        Ok(())
    }

    /// The last success of `host` for `plan`.
    pub fn success(&self, plan: &str, host: &str) -> Option<Success> {
        let v = self.successes.get(format!("{plan}/{host}")).ok()??;
        rmp_serde::from_slice(&v).ok()
    }

    /// Every recorded success: `(plan, host, success)`.
    pub fn successes(&self) -> Vec<(String, String, Success)> {
        self.successes
            .iter()
            .filter_map(|kv| {
                let (k, v) = kv.ok()?;
                let key = String::from_utf8_lossy(&k).into_owned();
                let (plan, host) = key.split_once('/')?;
                Some((
                    plan.to_owned(),
                    host.to_owned(),
                    rmp_serde::from_slice(&v).ok()?,
                ))
            })
            .collect()
    }

    /// Records a success.
    pub fn set_success(&self, plan: &str, host: &str, s: &Success) -> Result<(), StateError> {
        let bytes = flotilla_protocol::encode(s).unwrap_or_default();
        self.successes.insert(format!("{plan}/{host}"), bytes)?;
        self.db.flush()?;
        Ok(())
    }

    /// The marker an alert was last raised for (to raise each alert once).
    pub fn alert(&self, key: &str) -> Option<Vec<u8>> {
        self.alerts.get(key).ok()?.map(|v| v.to_vec())
    }

    /// Marks an alert as raised for `marker`.
    pub fn set_alert(&self, key: &str, marker: &[u8]) -> Result<(), StateError> {
        self.alerts.insert(key, marker)?;
        Ok(())
    }

    /// Clears an alert (its condition ended).
    pub fn clear_alert(&self, key: &str) -> Result<(), StateError> {
        self.alerts.remove(key)?;
        Ok(())
    }
}
