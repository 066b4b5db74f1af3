//! The fleet directory: identity, CA, coordinator key, repository key.
//!
//! ```text
//! DIR/fleet.toml        version, id, creation time, NATS URL
//! DIR/ca.crt            fleet CA certificate (PEM)
//! DIR/ca.key            fleet CA private key (PEM, 0600)
//! DIR/coordinator.key   Ed25519 task-signing seed (hex, 0600)
//! DIR/coordinator.pub   its public key (hex)
//! DIR/repo.key          repository master key (hex, 0600)
//! DIR/hosts/HOST.crt    certificate issued to each enrolled host
//! DIR/nats/             the fleet's NATS operator, accounts and users (`natsauth.rs`)
//! ```
//!
//! Neither `init` nor `enroll` overwrites anything without `force`.

use std::collections::BTreeSet;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use flotilla_protocol::{Bundle, HostName, PublicKey, SigningSeed, BUNDLE_VERSION};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls_pki_types::pem::PemObject;
use serde::{Deserialize, Serialize};

use crate::natsauth::{NatsAuth, Revoked};
use flotilla_protocol::permissions::Role;

/// Version of the fleet directory layout: 2 added `nats/` (NATS identities).
pub const FLEET_VERSION: u16 = 2;

/// A fleet directory that cannot be created or used.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// Something is already there.
    #[error("{0} already exists; pass --force to overwrite it")]
    Exists(PathBuf),
    /// No fleet at the path.
    #[error("no fleet at {0}: create one with `flotilla init --fleet {0}`")]
    Missing(PathBuf),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file has the wrong content.
    #[error("{path} is not valid: {why}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// Certificate generation failed.
    #[error("cannot make certificate: {0}")]
    Cert(#[from] rcgen::Error),
    /// The OS random source failed.
    #[error("cannot get random bytes: {0}")]
    Random(String),
}

/// `fleet.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FleetFile {
    /// Layout version (`FLEET_VERSION` for a fleet this build made).
    pub version: u16,
    /// The fleet id.
    pub id: String,
    /// When `init` ran (RFC 3339).
    pub created: String,
    /// NATS URL that enrolled hosts get.
    pub nats_url: String,
}

/// A loaded fleet directory.
#[derive(Debug, Clone)]
pub struct Fleet {
    /// Where it lives.
    pub dir: PathBuf,
    /// Its `fleet.toml`.
    pub file: FleetFile,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> FleetError + '_ {
    move |source| FleetError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn random_bytes<const N: usize>() -> Result<[u8; N], FleetError> {
    let mut buf = [0u8; N];
    getrandom::fill(&mut buf).map_err(|e| FleetError::Random(e.to_string()))?;
    Ok(buf)
}

/// Writes `contents` to `path` with `mode`, refusing to replace an existing
/// file unless `force`. Replacement goes through a temporary file and a rename,
/// so a reader never sees half a key.
pub fn write_file(path: &Path, contents: &[u8], mode: u32, force: bool) -> Result<(), FleetError> {
    if !force && path.exists() {
        return Err(FleetError::Exists(path.to_path_buf()));
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        fs::create_dir_all(parent).map_err(io_err(parent))?;
    }
    let tmp = path.with_extension("tmp-write");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(contents).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    drop(f);
    if !force && path.exists() {
        let _ = fs::remove_file(&tmp);
        return Err(FleetError::Exists(path.to_path_buf()));
    }
    fs::rename(&tmp, path).map_err(io_err(path))?;
    Ok(())
}

fn ca_params(fleet_id: &str) -> Result<CertificateParams, FleetError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("Flotilla fleet {fleet_id} CA"));
    dn.push(DnType::OrganizationName, "Flotilla");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

fn validity(params: &mut CertificateParams, years: i32) {
    let now = time_now_year();
    params.not_before = rcgen::date_time_ymd(now - 1, 1, 1);
    params.not_after = rcgen::date_time_ymd(now + years, 1, 1);
}

fn time_now_year() -> i32 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // Good to within a day, which is all validity periods need.
    1970 + (secs / 31_556_952) as i32
}

impl Fleet {
    /// Creates a new fleet in `dir`.
    pub fn init(dir: &Path, nats_url: &str, force: bool) -> Result<Fleet, FleetError> {
        let toml_path = dir.join("fleet.toml");
        if toml_path.exists() && !force {
            return Err(FleetError::Exists(toml_path));
        }
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io_err(dir))?;

        let id = uuid::Uuid::new_v4().simple().to_string()[..16].to_string();
        let ca_key = KeyPair::generate()?;
        let mut params = ca_params(&id)?;
        validity(&mut params, 20);
        let ca_cert = params.self_signed(&ca_key)?;
        let seed = SigningSeed(random_bytes()?);
        let repo_key: [u8; 32] = random_bytes()?;

        write_file(
            &dir.join("ca.key"),
            ca_key.serialize_pem().as_bytes(),
            0o600,
            force,
        )?;
        write_file(&dir.join("ca.crt"), ca_cert.pem().as_bytes(), 0o644, force)?;
        write_file(
            &dir.join("coordinator.key"),
            format!("{}\n", seed.to_hex()).as_bytes(),
            0o600,
            force,
        )?;
        write_file(
            &dir.join("coordinator.pub"),
            format!("{}\n", seed.public_key().to_hex()).as_bytes(),
            0o644,
            force,
        )?;
        write_file(
            &dir.join("repo.key"),
            format!("{}\n", hex::encode(repo_key)).as_bytes(),
            0o600,
            force,
        )?;
        NatsAuth::new(dir, &id).init(force)?;
        let file = FleetFile {
            version: FLEET_VERSION,
            id,
            created: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
            nats_url: nats_url.to_owned(),
        };
        let text = toml::to_string(&file).map_err(|e| FleetError::Invalid {
            path: toml_path.clone(),
            why: e.to_string(),
        })?;
        // Written last: a fleet.toml means the fleet is complete.
        write_file(&toml_path, text.as_bytes(), 0o644, force)?;
        Ok(Fleet {
            dir: dir.to_path_buf(),
            file,
        })
    }

    /// Opens an existing fleet directory.
    pub fn load(dir: &Path) -> Result<Fleet, FleetError> {
        let path = dir.join("fleet.toml");
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(FleetError::Missing(dir.to_path_buf()))
            }
            Err(e) => return Err(io_err(&path)(e)),
        };
        let file: FleetFile = toml::from_str(&text).map_err(|e| FleetError::Invalid {
            path: path.clone(),
            why: e.to_string(),
        })?;
        if file.version == 0 || file.version > FLEET_VERSION {
            return Err(FleetError::Invalid {
                path,
                why: format!(
                    "layout version {} is newer than this flotilla understands",
                    file.version
                ),
            });
        }
        Ok(Fleet {
            dir: dir.to_path_buf(),
            file,
        })
    }

    fn read(&self, name: &str) -> Result<String, FleetError> {
        let path = self.dir.join(name);
        fs::read_to_string(&path).map_err(io_err(&path))
    }

    /// The fleet's NATS identities.
    pub fn nats_auth(&self) -> NatsAuth {
        NatsAuth::new(&self.dir, &self.file.id)
    }

    /// The CA certificate's path.
    pub fn ca_cert_path(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// Issues a TLS server certificate for the fleet's nats-server, valid for
    /// `names` (DNS names or IP addresses); returns (certificate, key) PEM.
    pub fn server_cert(&self, names: &[String]) -> Result<(String, String), FleetError> {
        let issuer = self.issuer()?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        for name in names {
            params
                .subject_alt_names
                .push(match name.parse::<std::net::IpAddr>() {
                    Ok(ip) => rcgen::SanType::IpAddress(ip),
                    Err(_) => rcgen::SanType::DnsName(name.clone().try_into()?),
                });
        }
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            names.first().map_or("nats-server", String::as_str),
        );
        dn.push(
            DnType::OrganizationName,
            format!("Flotilla fleet {}", self.file.id),
        );
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // Client authentication too: a cluster node presents the same
        // certificate when it connects to the other nodes.
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        validity(&mut params, 5);
        let cert = params.signed_by(&key, &issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    fn issuer(&self) -> Result<Issuer<'static, KeyPair>, FleetError> {
        let ca_key_path = self.dir.join("ca.key");
        let ca_key = KeyPair::from_pem(&self.read("ca.key")?).map_err(|e| FleetError::Invalid {
            path: ca_key_path,
            why: e.to_string(),
        })?;
        Ok(Issuer::new(ca_params(&self.file.id)?, ca_key))
    }

    /// SHA-256 (hex) of the certificate last issued to `host`, if any.
    pub fn host_cert_sha256(&self, host: &HostName) -> Option<String> {
        let pem = fs::read_to_string(self.dir.join("hosts").join(format!("{host}.crt"))).ok()?;
        let der = rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).ok()?;
        Some(hex::encode(ring::digest::digest(
            &ring::digest::SHA256,
            &der,
        )))
    }

    /// Revokes `name`'s NATS users (every one it was ever given) and, for a
    /// host, its certificate, from `at` (unix seconds). Returns what was recorded.
    pub fn revoke(&self, name: &HostName, at: u64) -> Result<Revoked, FleetError> {
        let auth = self.nats_auth();
        let host_users = auth.users_of("host", name.as_str());
        let (role, users) = if host_users.is_empty() {
            ("alerting", auth.users_of("alerting", name.as_str()))
        } else {
            ("host", host_users)
        };
        let cert = self.host_cert_sha256(name);
        if users.is_empty() && cert.is_none() {
            return Err(FleetError::Invalid {
                path: self.dir.join("hosts"),
                why: format!("{name} was never enrolled in this fleet"),
            });
        }
        let entry = Revoked {
            name: name.to_string(),
            role: role.into(),
            at,
            users,
            cert_sha256: if role == "host" { cert } else { None },
        };
        auth.record_revocation(entry.clone())?;
        Ok(entry)
    }

    /// The hosts whose current certificate is revoked (a host enrolled
    /// again with `--force` after its revocation has a new certificate and
    /// is not in it).
    pub fn revoked_hosts(&self) -> Result<BTreeSet<HostName>, FleetError> {
        let file = self.nats_auth().revoked()?;
        let mut out = BTreeSet::new();
        for entry in file.revoked.iter().filter(|r| r.role == "host") {
            let Ok(host) = HostName::new(entry.name.clone()) else {
                continue;
            };
            if entry.cert_sha256.is_some() && self.host_cert_sha256(&host) == entry.cert_sha256 {
                out.insert(host);
            }
        }
        Ok(out)
    }

    /// Writes a `.creds` file for a read-only subscriber `name` (events and
    /// health) to `out`.
    pub fn enroll_alerting(
        &self,
        name: &HostName,
        out: &Path,
        force: bool,
    ) -> Result<(), FleetError> {
        if out.exists() && !force {
            return Err(FleetError::Exists(out.to_path_buf()));
        }
        // One name, one role: `revoke NAME` must know whom it cuts off.
        if self.dir.join("hosts").join(format!("{name}.crt")).exists() {
            return Err(FleetError::Invalid {
                path: self.dir.join("hosts"),
                why: format!(
                    "{name} is an enrolled host: give the alerting subscriber another name"
                ),
            });
        }
        let creds = self.nats_auth().mint(&Role::Alerting(name.clone()))?;
        write_file(out, creds.as_bytes(), 0o600, force)
    }

    /// The coordinator's task-signing key.
    pub fn signing_seed(&self) -> Result<SigningSeed, FleetError> {
        SigningSeed::from_hex(&self.read("coordinator.key")?).ok_or_else(|| FleetError::Invalid {
            path: self.dir.join("coordinator.key"),
            why: "not 64 hex digits".into(),
        })
    }

    /// The coordinator's public key.
    pub fn public_key(&self) -> Result<PublicKey, FleetError> {
        Ok(self.signing_seed()?.public_key())
    }

    /// Issues a certificate for `host` and writes its bundle to `out`.
    pub fn enroll(
        &self,
        host: &HostName,
        out: &Path,
        nats_url: Option<&str>,
        with_repo_key: bool,
        force: bool,
    ) -> Result<Bundle, FleetError> {
        if out.exists() && !force {
            return Err(FleetError::Exists(out.to_path_buf()));
        }
        let auth = self.nats_auth();
        if !auth.users_of("alerting", host.as_str()).is_empty() {
            return Err(FleetError::Invalid {
                path: self.dir.join("nats").join("users"),
                why: format!("{host} is an alerting subscriber's name: give the host another name"),
            });
        }
        let issuer = self.issuer()?;
        let nats_creds = if auth.exists() {
            Some(auth.mint(&Role::Host(host.clone()))?)
        } else {
            None
        };

        let host_key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![host.to_string()])?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, host.as_str());
        dn.push(
            DnType::OrganizationName,
            format!("Flotilla fleet {}", self.file.id),
        );
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        validity(&mut params, 5);
        let cert = params.signed_by(&host_key, &issuer)?;

        let bundle = Bundle {
            version: BUNDLE_VERSION,
            fleet: self.file.id.clone(),
            host: host.clone(),
            nats_url: nats_url.unwrap_or(&self.file.nats_url).to_owned(),
            coordinator_key: self.public_key()?.to_hex(),
            ca_cert: self.read("ca.crt")?,
            cert: cert.pem(),
            key: host_key.serialize_pem(),
            repo_key: if with_repo_key {
                Some(self.read("repo.key")?.trim().to_owned())
            } else {
                None
            },
            nats_creds,
        };
        write_file(out, bundle.to_toml().as_bytes(), 0o600, force)?;
        write_file(
            &self.dir.join("hosts").join(format!("{host}.crt")),
            cert.pem().as_bytes(),
            0o644,
            true,
        )?;
        Ok(bundle)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_is_a_host_or_an_alerting_subscriber_never_both() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fleet =
            Fleet::init(&dir.path().join("fleet"), "tls://127.0.0.1:4222", false).expect("init");
        let (web, pager) = (
            HostName::new("web").expect("valid"),
            HostName::new("pager").expect("valid"),
        );
        fleet
            .enroll(&web, &dir.path().join("web.toml"), None, true, false)
            .expect("enroll web");
        fleet
            .enroll_alerting(&pager, &dir.path().join("pager.creds"), false)
            .expect("an alerting subscriber");
        let err = fleet
            .enroll_alerting(&web, &dir.path().join("web.creds"), false)
            .expect_err("web is a host");
        assert!(err.to_string().contains("enrolled host"), "{err}");
        let err = fleet
            .enroll(&pager, &dir.path().join("pager.toml"), None, true, false)
            .expect_err("pager is an alerting subscriber");
        assert!(err.to_string().contains("alerting"), "{err}");
    }

    #[test]
    fn init_and_enroll_write_secrets_0600_and_refuse_to_overwrite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fleet_dir = dir.path().join("fleet");
        let fleet = Fleet::init(&fleet_dir, "nats://127.0.0.1:4222", false).expect("init");
        for secret in ["ca.key", "coordinator.key", "repo.key"] {
            let mode = fs::metadata(fleet_dir.join(secret))
                .expect("exists")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{secret}");
        }
        assert!(matches!(
            Fleet::init(&fleet_dir, "x", false),
            Err(FleetError::Exists(_))
        ));

        let out = dir.path().join("nas.toml");
        let host = HostName::new("nas").expect("valid");
        let bundle = fleet
            .enroll(&host, &out, None, true, false)
            .expect("enroll");
        assert_eq!(
            fs::metadata(&out).expect("exists").permissions().mode() & 0o777,
            0o600
        );
        let back = Bundle::parse(&fs::read_to_string(&out).expect("read")).expect("parses");
        assert_eq!(back, bundle);
        assert_eq!(
            back.coordinator_public_key().expect("key"),
            fleet.public_key().expect("key")
        );
        assert!(matches!(
            fleet.enroll(&host, &out, None, true, false),
            Err(FleetError::Exists(_))
        ));
        assert!(fleet.enroll(&host, &out, None, true, true).is_ok());
    }
}
