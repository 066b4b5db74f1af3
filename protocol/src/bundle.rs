//! The enrollment bundle: one file that makes a host a member of the fleet.
//!
//! `flotilla enroll HOST` writes it; `flotilla-agent run --bundle FILE` reads it.
//! It is TOML so an operator can look inside, and it holds secrets (the host's
//! private key and the repository key), so it is created mode 0600.

use serde::{Deserialize, Serialize};

use crate::{HostName, PublicKey};

/// Version of the bundle file format: 2 added `nats_creds`.
pub const BUNDLE_VERSION: u16 = 2;

/// Everything a host needs to join the fleet.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bundle {
    /// File format version, [`BUNDLE_VERSION`].
    pub version: u16,
    /// The fleet's id.
    pub fleet: String,
    /// The host this bundle is for.
    pub host: HostName,
    /// NATS server URL(s), comma-separated.
    pub nats_url: String,
    /// The coordinator's task-verification key, hex.
    pub coordinator_key: String,
    /// The fleet CA certificate, PEM.
    pub ca_cert: String,
    /// This host's certificate, PEM, signed by the fleet CA.
    pub cert: String,
    /// This host's private key, PEM (PKCS#8).
    pub key: String,
    /// The repository master key, hex; absent for hosts that must not read backups.
    pub repo_key: Option<String>,
    /// The host's NATS user credentials (a user JWT and its nkey seed, in the
    /// standard `.creds` format, see [`format_creds`]); absent in bundles made
    /// before the bus had authentication (version 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats_creds: Option<String>,
}

/// The server URLs of a comma-separated list (`nats_url` of a bundle, the
/// fleet file, `--nats`), trimmed, empty entries dropped: every node of a
/// clustered control plane, tried in turn and failed over between.
pub fn server_urls(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
        .collect()
}

/// A NATS user JWT and its nkey seed in the `.creds` file format every NATS
/// client reads (`nats --creds`, nats-py `user_credentials`, Go `nats.UserCredentials`).
pub fn format_creds(jwt: &str, seed: &str) -> String {
    format!(
        "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\
         NKEYs are sensitive and should be treated as secrets.\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n\
         *************************************************************\n"
    )
}

impl std::fmt::Debug for Bundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bundle")
            .field("version", &self.version)
            .field("fleet", &self.fleet)
            .field("host", &self.host)
            .field("nats_url", &self.nats_url)
            .finish_non_exhaustive()
    }
}

/// A bundle file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// Not valid TOML of the bundle's shape.
    #[error("not a valid bundle: {0}")]
    Parse(#[from] toml::de::Error),
    /// Written by a newer Flotilla.
    #[error("bundle format version {0} is newer than this build understands ({BUNDLE_VERSION}); upgrade the agent")]
    Version(u16),
    /// The coordinator key is not 64 hex digits.
    #[error("bundle's coordinator_key is not a 32-byte hex key")]
    CoordinatorKey,
}

impl Bundle {
    /// Parses and validates a bundle file's text.
    pub fn parse(text: &str) -> Result<Self, BundleError> {
        let bundle: Self = toml::from_str(text)?;
        if bundle.version == 0 || bundle.version > BUNDLE_VERSION {
            return Err(BundleError::Version(bundle.version));
        }
        bundle.coordinator_public_key()?;
        Ok(bundle)
    }

    /// The coordinator's public key.
    pub fn coordinator_public_key(&self) -> Result<PublicKey, BundleError> {
        PublicKey::from_hex(&self.coordinator_key).ok_or(BundleError::CoordinatorKey)
    }

    /// The bundle as TOML text.
    pub fn to_toml(&self) -> String {
        // Serialising plain strings and integers to TOML cannot fail.
        toml::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_list_is_every_node_once_trimmed() {
        assert_eq!(server_urls("tls://a:4222"), ["tls://a:4222"]);
        assert_eq!(
            server_urls(" tls://a:4222, tls://b:4222 ,,tls://c:4222,"),
            ["tls://a:4222", "tls://b:4222", "tls://c:4222"]
        );
        assert!(server_urls(" , ").is_empty());
    }
}
