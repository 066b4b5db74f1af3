//! A live copy of the fleet registry (the health bucket) for the daemon.
//!
//! `flotilla serve` looks at every host on every tick. Reading the bucket key by
//! key costs one request per host per tick, which grows with the fleet; instead
//! the daemon watches the bucket once and keeps the latest heartbeat of every
//! host in memory. The watch replays the bucket's current values first, then
//! delivers each new heartbeat as it is stored.
//!
//! Until that replay has finished the copy is incomplete, and a watchdog that
//! trusted it would call hosts unknown or missing: [`Registry::hosts`] answers
//! `None` then, and the caller reads the bucket directly instead.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::kv;
use flotilla_protocol::{subject, Heartbeat};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::nats::{stored_at, HostRecord, Nats};

/// How long to wait before watching again after the watch failed or ended.
const REWATCH_DELAY: Duration = Duration::from_secs(2);

/// Why a watch of the health bucket could not start (retried after
/// [`REWATCH_DELAY`]).
#[derive(Debug, thiserror::Error)]
enum WatchError {
    /// The bucket could not be opened (no agent has created it yet, or NATS
    /// is away).
    #[error("open bucket {bucket}: {0}", bucket = subject::HEALTH_BUCKET)]
    Open(#[source] async_nats::jetstream::context::KeyValueError),
    /// The bucket's stream could not be found.
    #[error("read bucket info: {0}")]
    Stream(#[source] async_nats::jetstream::context::GetStreamError),
    /// The bucket's stream did not say how much it holds.
    #[error("read bucket info: {0}")]
    Info(#[source] async_nats::jetstream::stream::InfoError),
    /// The watch itself was refused.
    #[error("watch: {0}")]
    Watch(#[source] kv::WatchError),
}

/// Handle to the live registry; cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    inner: Arc<Mutex<Inner>>,
    heartbeats: Arc<AtomicU64>,
}

#[derive(Debug, Default)]
struct Inner {
    hosts: BTreeMap<String, HostRecord>,
    synced: bool,
}

impl Registry {
    /// Starts following the health bucket until `cancel` fires.
    pub fn spawn(nats: Nats, cancel: CancellationToken) -> Registry {
        let registry = Registry::default();
        tokio::spawn(registry.clone().follow(nats, cancel));
        registry
    }

    /// Every host's latest record, sorted by name; `None` while the initial
    /// replay of the bucket is still under way.
    pub fn hosts(&self) -> Option<Vec<HostRecord>> {
        let inner = self.inner.lock().ok()?;
        inner
            .synced
            .then(|| inner.hosts.values().cloned().collect())
    }

    /// Heartbeats received since the daemon started (a Prometheus counter).
    pub fn heartbeats_counter(&self) -> Arc<AtomicU64> {
        self.heartbeats.clone()
    }

    async fn follow(self, nats: Nats, cancel: CancellationToken) {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                result = self.watch_once(&nats) => {
                    if let Err(why) = result {
                        warn!(%why, "cannot watch the health bucket; retrying");
                    }
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(REWATCH_DELAY) => {}
            }
        }
    }

    /// Watches until the watch ends. Returns an error only for failures to
    /// start it; an ended watch is simply started again by the caller.
    async fn watch_once(&self, nats: &Nats) -> Result<(), WatchError> {
        let store = nats
            .js
            .get_key_value(subject::HEALTH_BUCKET)
            .await
            .map_err(WatchError::Open)?;
        // An empty bucket replays nothing, so nothing would say "caught up".
        let stored = nats
            .js
            .get_stream(subject::kv_stream(subject::HEALTH_BUCKET))
            .await
            .map_err(WatchError::Stream)?
            .info()
            .await
            .map_err(WatchError::Info)?
            .state
            .messages;
        if stored == 0 {
            self.set_synced();
        }
        let mut watch = store
            .watch_with_history(">")
            .await
            .map_err(WatchError::Watch)?;
        while let Some(entry) = watch.next().await {
            match entry {
                Ok(entry) => self.apply(entry),
                Err(e) => {
                    debug!(error = %e, "health watch ended");
                    break;
                }
            }
        }
        Ok(())
    }

    fn set_synced(&self) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.synced = true;
        }
    }

    /// Takes one entry of the bucket into the copy.
    fn apply(&self, entry: kv::Entry) {
        let caught_up = entry.delta == 0;
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        if entry.operation == kv::Operation::Put {
            self.heartbeats.fetch_add(1, Ordering::Relaxed);
            match Heartbeat::decode(&entry.value) {
                Ok(heartbeat) => {
                    let record = HostRecord {
                        heartbeat,
                        stored_at: stored_at(&entry),
                    };
                    inner.hosts.insert(entry.key, record);
                }
                Err(e) => warn!(key = %entry.key, error = %e, "ignoring unreadable heartbeat"),
            }
        } else {
            inner.hosts.remove(&entry.key);
        }
        if caught_up {
            inner.synced = true;
        }
    }
}
