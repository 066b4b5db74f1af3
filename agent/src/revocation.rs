//! The fleet's revocation list on the agent.
//!
//! `flotilla revoke HOST` signs a list of revoked certificates and stores it
//! in the fleet bucket. The agent reads it at start (from its state, so a
//! restart without the bus still refuses) and then from the bus every
//! heartbeat; a list is applied only when it is signed by the coordinator for
//! this fleet and newer than the one in force, so a replayed old list cannot
//! bring a revoked host back. Every QUIC handshake consults the result
//! ([`RevokedCerts`]).

use std::sync::atomic::{AtomicU64, Ordering};

use flotilla_protocol::{PublicKey, RevocationError, RevocationList};

use crate::transfer::RevokedCerts;

/// The revocation list in force.
#[derive(Debug)]
pub struct Revocations {
    certs: RevokedCerts,
    issued: AtomicU64,
    key: PublicKey,
    fleet: String,
}

impl Revocations {
    /// Nothing revoked yet; lists must be signed by `key` for `fleet`.
    pub fn new(key: PublicKey, fleet: String) -> Self {
        Revocations {
            certs: RevokedCerts::default(),
            issued: AtomicU64::new(0),
            key,
            fleet,
        }
    }

    /// The set every handshake checks.
    pub fn certs(&self) -> RevokedCerts {
        self.certs.clone()
    }

    /// Applies `signed` when it verifies and is newer than the list in force.
    /// Returns the list when it was applied, `None` when it was not newer.
    pub fn apply(&self, signed: &[u8]) -> Result<Option<RevocationList>, RevocationError> {
        let list = RevocationList::verify(signed, &self.key, &self.fleet)?;
        let current = self.issued.load(Ordering::Acquire);
        if list.issued <= current {
            return Ok(None);
        }
        self.issued.store(list.issued, Ordering::Release);
        self.certs.replace(&list);
        Ok(Some(list))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_protocol::{HostName, RevokedCert, SigningSeed, REVOCATION_VERSION};

    fn signed(seed: &SigningSeed, issued: u64, sha: &str) -> Vec<u8> {
        RevocationList {
            v: REVOCATION_VERSION,
            fleet: "f".into(),
            issued,
            revoked: vec![RevokedCert {
                host: HostName::new("web").expect("valid"),
                cert_sha256: sha.into(),
                revoked_at: 1,
            }],
        }
        .sign(seed)
        .expect("sign")
    }

    #[test]
    fn only_a_newer_valid_list_replaces_the_one_in_force() {
        let seed = SigningSeed([3; 32]);
        let r = Revocations::new(seed.public_key(), "f".into());
        let der = b"certificate";
        let sha: String = ring::digest::digest(&ring::digest::SHA256, der)
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert!(!r.certs().contains(der));
        assert!(r.apply(&signed(&seed, 10, &sha)).expect("valid").is_some());
        assert!(r.certs().contains(der));
        // A replayed older (or equal) list changes nothing.
        assert!(r
            .apply(&signed(&seed, 5, &"00".repeat(32)))
            .expect("valid")
            .is_none());
        assert!(r.certs().contains(der));
        // A forged one is refused.
        let forged = signed(&SigningSeed([4; 32]), 99, &"00".repeat(32));
        assert!(r.apply(&forged).is_err());
        assert!(r.certs().contains(der));
        // A newer one that lifts it (the host was enrolled again) applies.
        assert!(r
            .apply(&signed(&seed, 20, &"00".repeat(32)))
            .expect("valid")
            .is_some());
        assert!(!r.certs().contains(der));
    }
}
