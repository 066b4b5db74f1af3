//! The fleet's revocation list: hosts whose certificates no agent accepts.
//!
//! `flotilla revoke HOST` adds the host's certificate (by its SHA-256) to the
//! list, signs it with the coordinator's key and stores it in the
//! [`crate::subject::FLEET_BUCKET`]. Agents read it when they connect and at
//! every heartbeat, keep the newest valid one in their state (so a restart
//! without the bus still refuses), and refuse a QUIC peer whose certificate is
//! on it. A list is believed only when signed for this fleet, and an older
//! list never replaces a newer one (no rollback by replay).

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::{codec, DecodeError, EncodeError, HostName, PublicKey, SigningSeed, UnixMillis};

/// Schema version of [`RevocationList`] and its envelope.
pub const REVOCATION_VERSION: u16 = 1;

/// Domain separation from tasks and anything else the key signs.
const SIGNING_CONTEXT: &[u8] = b"flotilla-revoked-v1\0";

/// At most this many bytes of a list are read (about 5,000 hosts).
pub const REVOCATION_BYTES: usize = 512 * 1024;

/// One revoked certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokedCert {
    /// The host it was issued to.
    pub host: HostName,
    /// SHA-256 of the certificate's DER, hex.
    pub cert_sha256: String,
    /// When it was revoked.
    pub revoked_at: UnixMillis,
}

/// Every revoked certificate of a fleet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RevocationList {
    /// Schema version, [`REVOCATION_VERSION`].
    pub v: u16,
    /// The fleet it belongs to.
    pub fleet: String,
    /// When it was signed; a list never replaces a newer one.
    pub issued: UnixMillis,
    /// The revoked certificates.
    pub revoked: Vec<RevokedCert>,
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    v: u16,
    #[serde(with = "serde_bytes")]
    body: Vec<u8>,
    #[serde(with = "serde_bytes")]
    signature: Vec<u8>,
}

/// A revocation list that cannot be believed.
#[derive(Debug, thiserror::Error)]
pub enum RevocationError {
    /// Not a list of this shape or version.
    #[error("malformed revocation list: {0}")]
    Malformed(#[from] DecodeError),
    /// Not signed by the coordinator.
    #[error("revocation list has no valid coordinator signature")]
    BadSignature,
    /// Signed for another fleet.
    #[error("revocation list is for fleet {found}, not {expected}")]
    WrongFleet {
        /// This fleet.
        expected: String,
        /// The list's.
        found: String,
    },
}

impl RevocationList {
    /// Whether the certificate with this SHA-256 (hex) is revoked.
    pub fn is_revoked(&self, cert_sha256: &str) -> bool {
        self.revoked
            .iter()
            .any(|r| r.cert_sha256.eq_ignore_ascii_case(cert_sha256))
    }

    /// Encodes and signs the list.
    pub fn sign(&self, seed: &SigningSeed) -> Result<Vec<u8>, EncodeError> {
        let body = codec::encode(self)?;
        let signature = SigningKey::from_bytes(&seed.0).sign(&signed(&body));
        codec::encode(&Envelope {
            v: REVOCATION_VERSION,
            body,
            signature: signature.to_bytes().to_vec(),
        })
    }

    /// Decodes a signed list and checks its signature and fleet.
    pub fn verify(bytes: &[u8], key: &PublicKey, fleet: &str) -> Result<Self, RevocationError> {
        let envelope: Envelope = codec::decode(bytes, REVOCATION_BYTES)?;
        codec::check_version(envelope.v, REVOCATION_VERSION)?;
        let signature = Signature::from_slice(&envelope.signature)
            .map_err(|_| RevocationError::BadSignature)?;
        VerifyingKey::from_bytes(&key.0)
            .map_err(|_| RevocationError::BadSignature)?
            .verify(&signed(&envelope.body), &signature)
            .map_err(|_| RevocationError::BadSignature)?;
        let list: RevocationList = codec::decode(&envelope.body, REVOCATION_BYTES)?;
        codec::check_version(list.v, REVOCATION_VERSION)?;
        if list.fleet != fleet {
            return Err(RevocationError::WrongFleet {
                expected: fleet.to_owned(),
                found: list.fleet,
            });
        }
        Ok(list)
    }
}

fn signed(body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(SIGNING_CONTEXT.len() + body.len());
    m.extend_from_slice(SIGNING_CONTEXT);
    m.extend_from_slice(body);
    m
}

impl RevocationList {
    /// The list to sign next: every certificate in `local` (the fleet
    /// directory's record) and in `in_force` (the list agents hold now), so
    /// that publishing from an older copy of the fleet directory never lifts
    /// a revocation; issued after `in_force` even when this machine's clock
    /// is behind the one that signed it (agents take only newer lists).
    pub fn next(
        fleet: &str,
        local: Vec<RevokedCert>,
        in_force: Option<&RevocationList>,
        now: UnixMillis,
    ) -> RevocationList {
        let mut revoked = local;
        let mut issued = now;
        if let Some(old) = in_force {
            for cert in &old.revoked {
                if !revoked.iter().any(|r| r.cert_sha256 == cert.cert_sha256) {
                    revoked.push(cert.clone());
                }
            }
            issued = issued.max(old.issued.saturating_add(1));
        }
        RevocationList {
            v: REVOCATION_VERSION,
            fleet: fleet.to_owned(),
            issued,
            revoked,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list() -> RevocationList {
        RevocationList {
            v: REVOCATION_VERSION,
            fleet: "f1".into(),
            issued: 5,
            revoked: vec![RevokedCert {
                host: HostName::new("web").expect("valid"),
                cert_sha256: "AB".repeat(32),
                revoked_at: 4,
            }],
        }
    }

    #[test]
    fn a_signed_list_verifies_and_names_its_certificates() {
        let seed = SigningSeed([7; 32]);
        let bytes = list().sign(&seed).expect("sign");
        let back = RevocationList::verify(&bytes, &seed.public_key(), "f1").expect("verify");
        assert_eq!(back, list());
        assert!(back.is_revoked(&"ab".repeat(32)));
        assert!(!back.is_revoked(&"cd".repeat(32)));
    }

    #[test]
    fn forged_foreign_and_garbled_lists_are_refused() {
        let seed = SigningSeed([7; 32]);
        let bytes = list().sign(&seed).expect("sign");
        let other = SigningSeed([8; 32]).public_key();
        assert!(matches!(
            RevocationList::verify(&bytes, &other, "f1"),
            Err(RevocationError::BadSignature)
        ));
        assert!(matches!(
            RevocationList::verify(&bytes, &seed.public_key(), "f2"),
            Err(RevocationError::WrongFleet { .. })
        ));
        let mut flipped = bytes.clone();
        let last = flipped.len() - 70;
        flipped[last] ^= 1;
        assert!(RevocationList::verify(&flipped, &seed.public_key(), "f1").is_err());
        assert!(RevocationList::verify(b"\xff\x00", &seed.public_key(), "f1").is_err());
    }

    #[test]
    fn the_next_list_keeps_what_is_in_force_and_is_newer() {
        let in_force = list();
        let mine = RevokedCert {
            host: HostName::new("db").expect("valid"),
            cert_sha256: "cd".repeat(32),
            revoked_at: 3,
        };
        // Signed on a machine whose clock is behind, from a directory that
        // does not know of web's revocation.
        let next = RevocationList::next("f1", vec![mine.clone()], Some(&in_force), 2);
        assert_eq!(next.issued, in_force.issued + 1);
        assert_eq!(next.revoked, vec![mine, in_force.revoked[0].clone()]);
        // Nothing in force: the clock, as it is.
        assert_eq!(RevocationList::next("f1", Vec::new(), None, 2).issued, 2);
        // Known both places: listed once.
        let again = RevocationList::next("f1", in_force.revoked.clone(), Some(&in_force), 9);
        assert_eq!(again.revoked.len(), 1);
        assert_eq!(again.issued, 9);
    }
}
