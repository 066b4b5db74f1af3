//! The daemon's own durable state, in sled: when each plan last ran, when
//! each host last backed up each plan, which alerts are already raised.
//!
//! Values are versioned MessagePack; a newer format is refused at open.
//!
//! The daemon's core reads and writes this state only through the [`Store`]
//! trait, so its decisions are tested against an in-memory store.

use std::path::Path;

use flotilla_protocol::SnapshotId;
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
    pub snapshot: Option<SnapshotId>,
    /// Bytes added to the repository.
    pub bytes_added: u64,
    /// How long it took.
    pub duration_ms: u64,
}

/// The state database cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// sled failed (I/O, or the directory is locked by another daemon).
    #[error("sled: {0}")]
    Db(#[from] sled::Error),
    /// A value could not be encoded.
    #[error("cannot encode a value: {0}")]
    Encode(#[from] flotilla_protocol::EncodeError),
    /// Written by a newer flotilla.
    #[error("it was written by a newer flotilla (format {0}); upgrade or use another --state-dir")]
    Newer(u16),
}

/// What the daemon's core keeps across restarts. [`ServeState`] keeps it in
/// sled; the tests keep it in memory.
pub trait Store {
    /// When the scheduled job `key` (`PLAN/backup`, `PLAN/check`, …) last ran
    /// (or was first armed).
    fn last_run(&self, key: &str) -> Result<Option<u64>, StateError>;
    /// Records that `key` ran (or was armed) at `at`.
    fn set_last_run(&mut self, key: &str, at: u64) -> Result<(), StateError>;
    /// The last success of `host` for `plan`.
    fn success(&self, plan: &str, host: &str) -> Option<Success>;
    /// Every recorded success: `(plan, host, success)`.
    fn successes(&self) -> Vec<(String, String, Success)>;
    /// Records a success.
    fn set_success(&mut self, plan: &str, host: &str, s: &Success) -> Result<(), StateError>;
    /// The marker an alert was last raised for (to raise each alert once).
    fn alert(&self, key: &str) -> Option<Vec<u8>>;
    /// Marks an alert as raised for `marker`.
    fn set_alert(&mut self, key: &str, marker: &[u8]) -> Result<(), StateError>;
    /// Clears an alert (its condition ended).
    fn clear_alert(&mut self, key: &str) -> Result<(), StateError>;
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
}

impl Store for ServeState {
    fn last_run(&self, key: &str) -> Result<Option<u64>, StateError> {
        Ok(self.runs.get(key)?.as_deref().and_then(ms))
    }

    fn set_last_run(&mut self, key: &str, at: u64) -> Result<(), StateError> {
        self.runs.insert(key, &at.to_be_bytes())?;
        self.db.flush()?;
        Ok(())
    }

    fn success(&self, plan: &str, host: &str) -> Option<Success> {
        let v = self.successes.get(format!("{plan}/{host}")).ok()??;
        rmp_serde::from_slice(&v).ok()
    }

    fn successes(&self) -> Vec<(String, String, Success)> {
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

    fn set_success(&mut self, plan: &str, host: &str, s: &Success) -> Result<(), StateError> {
        let bytes = flotilla_protocol::encode(s)?;
        self.successes.insert(format!("{plan}/{host}"), bytes)?;
        self.db.flush()?;
        Ok(())
    }

    fn alert(&self, key: &str) -> Option<Vec<u8>> {
        self.alerts.get(key).ok()?.map(|v| v.to_vec())
    }

    fn set_alert(&mut self, key: &str, marker: &[u8]) -> Result<(), StateError> {
        self.alerts.insert(key, marker)?;
        Ok(())
    }

    fn clear_alert(&mut self, key: &str) -> Result<(), StateError> {
        self.alerts.remove(key)?;
        Ok(())
    }
}

/// The state in memory, for tests of the core.
#[cfg(test)]
#[derive(Debug, Default, Clone)]
pub struct MemoryStore {
    /// Last runs by key.
    pub runs: std::collections::BTreeMap<String, u64>,
    /// Successes by `(plan, host)`.
    pub successes: std::collections::BTreeMap<(String, String), Success>,
    /// Raised alerts and their markers.
    pub alerts: std::collections::BTreeMap<String, Vec<u8>>,
}

#[cfg(test)]
impl Store for MemoryStore {
    fn last_run(&self, key: &str) -> Result<Option<u64>, StateError> {
        Ok(self.runs.get(key).copied())
    }

    fn set_last_run(&mut self, key: &str, at: u64) -> Result<(), StateError> {
        self.runs.insert(key.to_owned(), at);
        Ok(())
    }

    fn success(&self, plan: &str, host: &str) -> Option<Success> {
        self.successes
            .get(&(plan.to_owned(), host.to_owned()))
            .cloned()
    }

    fn successes(&self) -> Vec<(String, String, Success)> {
        self.successes
            .iter()
            .map(|((p, h), s)| (p.clone(), h.clone(), s.clone()))
            .collect()
    }

    fn set_success(&mut self, plan: &str, host: &str, s: &Success) -> Result<(), StateError> {
        self.successes
            .insert((plan.to_owned(), host.to_owned()), s.clone());
        Ok(())
    }

    fn alert(&self, key: &str) -> Option<Vec<u8>> {
        self.alerts.get(key).cloned()
    }

    fn set_alert(&mut self, key: &str, marker: &[u8]) -> Result<(), StateError> {
        self.alerts.insert(key.to_owned(), marker.to_vec());
        Ok(())
    }

    fn clear_alert(&mut self, key: &str) -> Result<(), StateError> {
        self.alerts.remove(key);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sled_state_survives_reopening() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let success = Success {
            v: 1,
            time: 5_000,
            snapshot: Some(SnapshotId::random()),
            bytes_added: 42,
            duration_ms: 7,
        };
        {
            let mut state = ServeState::open(dir.path()).expect("open");
            state.set_last_run("home/backup", 1_000).expect("write");
            state.set_success("home", "alpha", &success).expect("write");
            state.set_alert("offline/alpha", b"m").expect("write");
            state.set_alert("lowspace/nas/x", b"1").expect("write");
            state.clear_alert("lowspace/nas/x").expect("write");
        }
        let state = ServeState::open(dir.path()).expect("reopen");
        assert_eq!(state.last_run("home/backup").expect("read"), Some(1_000));
        assert_eq!(state.last_run("home/check").expect("read"), None);
        assert_eq!(state.success("home", "alpha"), Some(success.clone()));
        assert_eq!(
            state.successes(),
            vec![("home".to_owned(), "alpha".to_owned(), success)]
        );
        assert_eq!(state.alert("offline/alpha"), Some(b"m".to_vec()));
        assert_eq!(state.alert("lowspace/nas/x"), None);
    }
}
