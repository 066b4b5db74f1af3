//! Leadership: only one `flotilla serve` dispatches at a time.
//!
//! A JetStream key-value bucket whose entries expire after [`LEASE_TTL`]
//! holds one key. A daemon becomes leader by *creating* it (which fails while
//! it exists) and stays leader by updating it at its last revision every tick
//! (which fails if anyone else wrote it). A leader that dies stops renewing and
//! the entry expires, so a standby takes over within the TTL.
//!
//! The bucket is kept in memory by nats-server, so it vanishes when the server
//! restarts. Any failure other than "someone else holds it" therefore drops
//! the bucket handle, and the next renewal opens (or creates) the bucket
//! again: a daemon never stays standby on a stale handle. What the lease says
//! goes to the core as a [`LeaseSeen`], which decides what to log.

use std::time::Duration;

use async_nats::jetstream::{self, context::CreateKeyValueError, kv};
use tracing::debug;

/// Bucket holding the lease.
pub const LEASE_BUCKET: &str = "flotilla-coordinator";
/// How long a lease lives without renewal.
pub const LEASE_TTL: Duration = Duration::from_secs(15);
const KEY: &str = "leader";

/// What the lease said when the driver renewed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseSeen {
    /// This daemon holds it.
    Held,
    /// Another daemon holds it (`None`: it could not be read which).
    HeldByOther {
        /// The holder's instance name.
        holder: Option<String>,
        /// When the fleet status a leader writes at every tick was last
        /// written (unix ms), if it can be read: a holder that writes none
        /// is not leading (it hangs, or it squats the key). Filled in by the
        /// driver.
        status_at: Option<u64>,
    },
    /// The lease could not be renewed or taken (bus down, bucket gone).
    Failed {
        /// Why, for the log.
        why: String,
    },
}

/// The lease bucket cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The bucket can be neither opened nor created (no JetStream?).
    #[error("cannot open or create the lease bucket {LEASE_BUCKET}: {source}")]
    Bucket {
        /// What JetStream said.
        source: CreateKeyValueError,
    },
    /// The lease could not be given up at shutdown.
    #[error("cannot release the coordinator lease: {source}")]
    Release {
        /// What JetStream said.
        source: kv::DeleteError,
    },
}

/// This daemon's view of the lease.
#[derive(Debug)]
pub struct Lease {
    js: jetstream::Context,
    /// `None` until opened, and again after a failure that may mean the
    /// bucket is gone.
    store: Option<kv::Store>,
    me: String,
    revision: Option<u64>,
}

/// Opens the lease bucket, creating it when it does not exist.
async fn open(js: &jetstream::Context) -> Result<kv::Store, LeaseError> {
    if let Ok(store) = js.get_key_value(LEASE_BUCKET).await {
        return Ok(store);
    }
    js.create_key_value(kv::Config {
        bucket: LEASE_BUCKET.into(),
        description: "which flotilla serve is the leader".into(),
        history: 1,
        max_age: LEASE_TTL,
        storage: jetstream::stream::StorageType::Memory,
        ..Default::default()
    })
    .await
    .map_err(|source| LeaseError::Bucket { source })
}

impl Lease {
    /// Opens (or creates) the lease bucket. Failing here is failing to start:
    /// a daemon that cannot reach JetStream at all is misconfigured.
    pub async fn open(js: &jetstream::Context, me: String) -> Result<Lease, LeaseError> {
        let store = open(js).await?;
        Ok(Lease {
            js: js.clone(),
            store: Some(store),
            me,
            revision: None,
        })
    }

    /// Acquires or renews the lease and says what it found.
    pub async fn refresh(&mut self) -> LeaseSeen {
        let store = match &self.store {
            Some(store) => store.clone(),
            None => match open(&self.js).await {
                Ok(store) => {
                    debug!("lease bucket opened again");
                    self.store = Some(store.clone());
                    store
                }
                Err(e) => return LeaseSeen::Failed { why: e.to_string() },
            },
        };
        if let Some(rev) = self.revision {
            match store.update(KEY, self.me.clone().into(), rev).await {
                Ok(new) => {
                    self.revision = Some(new);
                    return LeaseSeen::Held;
                }
                Err(e) => {
                    self.revision = None;
                    if e.kind() != kv::UpdateErrorKind::WrongLastRevision {
                        // Perhaps the bucket is gone (server restarted).
                        self.store = None;
                        return LeaseSeen::Failed {
                            why: format!("cannot renew the lease: {e}"),
                        };
                    }
                    // Someone else wrote the key: fall through and look.
                }
            }
        }
        match store.create(KEY, self.me.clone().into()).await {
            Ok(rev) => {
                self.revision = Some(rev);
                LeaseSeen::Held
            }
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                match store.entry(KEY).await {
                    // Our own entry, from a renewal whose answer was lost:
                    // take it up again rather than wait for it to expire.
                    Ok(Some(entry)) if entry.value == self.me.as_bytes() => {
                        match store
                            .update(KEY, self.me.clone().into(), entry.revision)
                            .await
                        {
                            Ok(rev) => {
                                self.revision = Some(rev);
                                LeaseSeen::Held
                            }
                            Err(_) => LeaseSeen::HeldByOther {
                                holder: None,
                                status_at: None,
                            },
                        }
                    }
                    Ok(Some(entry)) => LeaseSeen::HeldByOther {
                        holder: Some(String::from_utf8_lossy(&entry.value).into_owned()),
                        status_at: None,
                    },
                    // Gone between the two calls: the next tick takes it.
                    Ok(None) => LeaseSeen::HeldByOther {
                        holder: None,
                        status_at: None,
                    },
                    Err(e) => {
                        self.store = None;
                        LeaseSeen::Failed {
                            why: format!("cannot read the lease: {e}"),
                        }
                    }
                }
            }
            Err(e) => {
                self.store = None;
                LeaseSeen::Failed {
                    why: format!("cannot take the lease: {e}"),
                }
            }
        }
    }

    /// Gives the lease up at shutdown, so a standby takes over at once.
    pub async fn release(&mut self) -> Result<(), LeaseError> {
        let (Some(rev), Some(store)) = (self.revision.take(), &self.store) else {
            return Ok(());
        };
        store
            .delete_expect_revision(KEY, Some(rev))
            .await
            .map_err(|source| LeaseError::Release { source })
    }
}
