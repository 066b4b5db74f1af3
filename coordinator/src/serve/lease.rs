//! Leadership: only one `flotilla serve` dispatches at a time.
//!
//! A JetStream key-value bucket whose entries expire after [`LEASE_TTL`]
//! holds one key. A daemon becomes leader by *creating* it (which fails while
//! it exists) and stays leader by updating it at its last revision every tick
//! (which fails if anyone else wrote it). A leader that dies stops renewing and
//! the entry expires, so a standby takes over within the TTL.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use tracing::{info, warn};

/// Bucket holding the lease.
pub const LEASE_BUCKET: &str = "flotilla-coordinator";
/// How long a lease lives without renewal.
pub const LEASE_TTL: Duration = Duration::from_secs(15);
const KEY: &str = "leader";

/// This daemon's view of the lease.
#[derive(Debug)]
pub struct Lease {
    store: kv::Store,
    me: String,
    revision: Option<u64>,
}

impl Lease {
    /// Opens (or creates) the lease bucket.
    pub async fn open(js: &jetstream::Context, me: String) -> Result<Lease, String> {
        let store = match js.get_key_value(LEASE_BUCKET).await {
            Ok(s) => s,
            Err(_) => js
                .create_key_value(kv::Config {
                    bucket: LEASE_BUCKET.into(),
                    description: "which flotilla serve is the leader".into(),
                    history: 1,
                    max_age: LEASE_TTL,
                    storage: jetstream::stream::StorageType::Memory,
                    ..Default::default()
                })
                .await
                .map_err(|e| format!("cannot create the lease bucket: {e}"))?,
        };
        Ok(Lease {
            store,
            me,
            revision: None,
        })
    }

    /// Acquires or renews the lease; returns whether this daemon leads.
    pub async fn refresh(&mut self) -> bool {
        match self.revision {
            Some(rev) => match self.store.update(KEY, self.me.clone().into(), rev).await {
                Ok(new) => {
                    self.revision = Some(new);
                    true
                }
                Err(e) => {
                    warn!(error = %e, "lost the coordinator lease; standing by");
                    self.revision = None;
                    false
                }
            },
            None => match self.store.create(KEY, self.me.clone().into()).await {
                Ok(rev) => {
                    info!(id = %self.me, "acquired the coordinator lease; dispatching");
                    self.revision = Some(rev);
                    true
                }
                Err(_) => false,
            },
        }
    }

    /// Gives the lease up at shutdown, so a standby takes over at once.
    pub async fn release(&mut self) {
        if let Some(rev) = self.revision.take() {
            if let Err(e) = self.store.delete_expect_revision(KEY, Some(rev)).await {
                warn!(error = %e, "cannot release the coordinator lease; it expires by itself");
            }
        }
    }
}
