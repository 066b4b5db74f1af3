//! The fleet's NATS identities: NATS's decentralised auth, made by `flotilla`.
//!
//! An *operator* (the fleet's root of trust on the bus) signs two accounts:
//! the fleet's own, where everything Flotilla does happens, and the *system*
//! account the server needs for its own traffic. The fleet account signs one
//! *user* per role ([`Role`]): the coordinator, each enrolled host, each
//! alerting subscriber. A user's JWT carries its permissions
//! ([`permissions`]), so the server enforces them, and a user can be added
//! without touching the server (the account's key is the only thing it must
//! know). Revoking a user changes the account JWT, which `flotilla revoke`
//! pushes to the running server through the system account.
//!
//! ```text
//! DIR/nats/operator.nk         operator seed (0600)
//! DIR/nats/account.nk          fleet account seed (0600)
//! DIR/nats/system.nk           system account seed (0600)
//! DIR/nats/coordinator.creds   the coordinator's user (0600)
//! DIR/nats/system.creds        a system-account user that pushes account updates (0600)
//! DIR/nats/users/ROLE-NAME.keys  every user key minted for a name, one per line
//! DIR/nats/revoked.toml        revocations (hosts' users and certificates)
//! ```
//!
//! JWTs are the NATS v2 format: base64url(header) "." base64url(claims) "."
//! base64url(ed25519 signature by the issuer's nkey).

use std::fs;
use std::path::{Path, PathBuf};

use data_encoding::{BASE32_NOPAD, BASE64URL_NOPAD};
use flotilla_protocol::format_creds;
use flotilla_protocol::permissions::{permissions, Permissions, Role};
use nkeys::KeyPair;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::fleet::{write_file, FleetError};

/// Version of `revoked.toml`.
pub const REVOKED_VERSION: u16 = 1;

/// The fleet's NATS key material, in `DIR/nats`.
#[derive(Debug, Clone)]
pub struct NatsAuth {
    dir: PathBuf,
    fleet_id: String,
}

/// One revoked name: its NATS users and its certificate.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Revoked {
    /// The host (or alerting subscriber) name.
    pub name: String,
    /// Its role when revoked: `host` or `alerting`.
    pub role: String,
    /// When (unix seconds).
    pub at: u64,
    /// Every NATS user key it ever had.
    pub users: Vec<String>,
    /// SHA-256 (hex) of its certificate, for hosts.
    pub cert_sha256: Option<String>,
}

/// `revoked.toml`.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct RevokedFile {
    /// [`REVOKED_VERSION`].
    pub version: u16,
    /// Every revocation.
    #[serde(default)]
    pub revoked: Vec<Revoked>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FleetError + '_ {
    move |source| FleetError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn invalid(path: &Path, why: impl ToString) -> FleetError {
    FleetError::Invalid {
        path: path.to_path_buf(),
        why: why.to_string(),
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What a user is called in its key file's name.
fn role_file(role: &Role) -> (&'static str, String) {
    match role {
        Role::Coordinator => ("coordinator", "coordinator".into()),
        Role::Host(h) => ("host", h.to_string()),
        Role::Alerting(n) => ("alerting", n.to_string()),
    }
}

/// Signs `claims` (without `jti`, `iat`, `iss`) as a NATS JWT by `issuer`.
pub fn encode_jwt(issuer: &KeyPair, mut claims: Value, iat: u64) -> Result<String, String> {
    claims["iat"] = json!(iat);
    claims["iss"] = json!(issuer.public_key());
    // The id is a hash of the claims, as NATS's own tools make it: two
    // different JWTs never share one, which is how the server's account
    // store tells an update from a repeat.
    let id = blake3::hash(claims.to_string().as_bytes());
    claims["jti"] = json!(BASE32_NOPAD.encode(id.as_bytes()));
    let header = BASE64URL_NOPAD.encode(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let body = BASE64URL_NOPAD.encode(claims.to_string().as_bytes());
    let signing_input = format!("{header}.{body}");
    let signature = issuer
        .sign(signing_input.as_bytes())
        .map_err(|e| e.to_string())?;
    Ok(format!(
        "{signing_input}.{}",
        BASE64URL_NOPAD.encode(&signature)
    ))
}

/// Decodes a JWT's claims without checking anything (for tests).
#[cfg(test)]
fn jwt_claims(jwt: &str) -> Option<Value> {
    let body = jwt.split('.').nth(1)?;
    let bytes = BASE64URL_NOPAD.decode(body.as_bytes()).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The `nats` claim of a user with `perms`.
pub fn user_nats_claim(perms: &Permissions) -> Value {
    let mut nats = json!({
        "subs": -1, "data": -1, "payload": -1,
        "type": "user", "version": 2,
    });
    if perms.unrestricted {
        nats["pub"] = json!({});
        nats["sub"] = json!({});
    } else {
        nats["pub"] = json!({ "allow": perms.publish });
        nats["sub"] = json!({ "allow": perms.subscribe });
        if perms.respond {
            // One reply per request received, within the server's default
            // two minutes.
            nats["resp"] = json!({ "max": 1, "ttl": 0 });
        }
    }
    nats
}

impl NatsAuth {
    /// The key material of the fleet in `fleet_dir` (which may not exist yet).
    pub fn new(fleet_dir: &Path, fleet_id: &str) -> NatsAuth {
        NatsAuth {
            dir: fleet_dir.join("nats"),
            fleet_id: fleet_id.to_owned(),
        }
    }

    /// Whether this fleet has NATS identities (fleets made before they
    /// existed connect anonymously).
    pub fn exists(&self) -> bool {
        self.dir.join("account.nk").is_file()
    }

    /// Creates the operator, the accounts and the coordinator's users.
    pub fn init(&self, force: bool) -> Result<(), FleetError> {
        for (file, kp) in [
            ("operator.nk", KeyPair::new_operator()),
            ("account.nk", KeyPair::new_account()),
            ("system.nk", KeyPair::new_account()),
        ] {
            let seed = kp.seed().map_err(|e| invalid(&self.dir.join(file), e))?;
            write_file(
                &self.dir.join(file),
                format!("{seed}\n").as_bytes(),
                0o600,
                force,
            )?;
        }
        let creds = self.mint(&Role::Coordinator)?;
        write_file(
            &self.coordinator_creds_path(),
            creds.as_bytes(),
            0o600,
            force,
        )?;
        let system = self.key("system.nk")?;
        let user = KeyPair::new_user();
        let jwt = encode_jwt(
            &system,
            json!({
                "sub": user.public_key(),
                "name": "flotilla-system",
                "nats": user_nats_claim(&Permissions { unrestricted: true, ..Default::default() }),
            }),
            now_secs(),
        )
        .map_err(|e| invalid(&self.dir.join("system.nk"), e))?;
        let seed = user.seed().map_err(|e| invalid(&self.dir, e))?;
        write_file(
            &self.system_creds_path(),
            format_creds(&jwt, &seed).as_bytes(),
            0o600,
            force,
        )?;
        Ok(())
    }

    /// The coordinator's `.creds`.
    pub fn coordinator_creds_path(&self) -> PathBuf {
        self.dir.join("coordinator.creds")
    }

    /// The system user's `.creds`.
    pub fn system_creds_path(&self) -> PathBuf {
        self.dir.join("system.creds")
    }

    fn key(&self, file: &str) -> Result<KeyPair, FleetError> {
        let path = self.dir.join(file);
        let text = fs::read_to_string(&path).map_err(io(&path))?;
        KeyPair::from_seed(text.trim()).map_err(|e| invalid(&path, e))
    }

    /// The fleet account's public key (its id on the server).
    pub fn account_id(&self) -> Result<String, FleetError> {
        Ok(self.key("account.nk")?.public_key())
    }

    /// The system account's public key.
    pub fn system_account_id(&self) -> Result<String, FleetError> {
        Ok(self.key("system.nk")?.public_key())
    }

    /// Mints a new user for `role` and returns its `.creds` text. The user's
    /// key is recorded, so `revoke` can revoke every user a name ever had.
    pub fn mint(&self, role: &Role) -> Result<String, FleetError> {
        let account = self.key("account.nk")?;
        let user = KeyPair::new_user();
        let (kind, name) = role_file(role);
        let jwt = encode_jwt(
            &account,
            json!({
                "sub": user.public_key(),
                "name": format!("{kind} {name}"),
                "nats": user_nats_claim(&permissions(role)),
            }),
            now_secs(),
        )
        .map_err(|e| invalid(&self.dir.join("account.nk"), e))?;
        let seed = user.seed().map_err(|e| invalid(&self.dir, e))?;
        let keys = self.dir.join("users").join(format!("{kind}-{name}.keys"));
        let mut known = fs::read_to_string(&keys).unwrap_or_default();
        known.push_str(&user.public_key());
        known.push('\n');
        write_file(&keys, known.as_bytes(), 0o644, true)?;
        Ok(format_creds(&jwt, &seed))
    }

    /// Every user key minted for `name` in `role_kind` (`host`, `alerting`).
    pub fn users_of(&self, role_kind: &str, name: &str) -> Vec<String> {
        let keys = self
            .dir
            .join("users")
            .join(format!("{role_kind}-{name}.keys"));
        fs::read_to_string(keys)
            .unwrap_or_default()
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()
    }

    fn revoked_path(&self) -> PathBuf {
        self.dir.join("revoked.toml")
    }

    /// The revocations so far.
    pub fn revoked(&self) -> Result<RevokedFile, FleetError> {
        let path = self.revoked_path();
        match fs::read_to_string(&path) {
            Ok(text) => {
                let file: RevokedFile = toml::from_str(&text).map_err(|e| invalid(&path, e))?;
                if file.version > REVOKED_VERSION {
                    return Err(invalid(&path, "written by a newer flotilla"));
                }
                Ok(file)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(RevokedFile {
                version: REVOKED_VERSION,
                revoked: Vec::new(),
            }),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// Records a revocation (replacing an earlier one of the same name).
    pub fn record_revocation(&self, entry: Revoked) -> Result<(), FleetError> {
        let mut file = self.revoked()?;
        file.version = REVOKED_VERSION;
        // Every certificate a name ever lost stays revoked: a host revoked,
        // enrolled again and revoked again has two (the first bundle may
        // still be in a thief's hands).
        match file.revoked.iter_mut().find(|r| {
            r.name == entry.name && r.role == entry.role && r.cert_sha256 == entry.cert_sha256
        }) {
            Some(old) => {
                for user in entry.users {
                    if !old.users.contains(&user) {
                        old.users.push(user);
                    }
                }
            }
            None => file.revoked.push(entry),
        }
        let text = toml::to_string(&file).map_err(|e| invalid(&self.revoked_path(), e))?;
        write_file(&self.revoked_path(), text.as_bytes(), 0o644, true)
    }

    /// The operator JWT (names the system account).
    pub fn operator_jwt(&self) -> Result<String, FleetError> {
        let operator = self.key("operator.nk")?;
        encode_jwt(
            &operator,
            json!({
                "sub": operator.public_key(),
                "name": format!("flotilla-{}", self.fleet_id),
                "nats": {
                    "system_account": self.system_account_id()?,
                    "type": "operator", "version": 2,
                },
            }),
            now_secs(),
        )
        .map_err(|e| invalid(&self.dir.join("operator.nk"), e))
    }

    /// The system account's JWT.
    pub fn system_account_jwt(&self) -> Result<String, FleetError> {
        let operator = self.key("operator.nk")?;
        encode_jwt(
            &operator,
            json!({
                "sub": self.system_account_id()?,
                "name": "SYS",
                "nats": {
                    "limits": {
                        "subs": -1, "data": -1, "payload": -1, "imports": -1,
                        "exports": -1, "wildcards": true, "conn": -1, "leaf": -1,
                    },
                    "type": "account", "version": 2,
                },
            }),
            now_secs(),
        )
        .map_err(|e| invalid(&self.dir.join("operator.nk"), e))
    }

    /// The fleet account's JWT: JetStream on, and every revoked user.
    ///
    /// Issued now: the server keeps the newer of two JWTs of an account, so
    /// the latest revocation wins.
    pub fn account_jwt(&self) -> Result<String, FleetError> {
        let operator = self.key("operator.nk")?;
        let mut revocations = serde_json::Map::new();
        for r in self.revoked()?.revoked {
            for user in r.users {
                revocations.insert(user, json!(r.at));
            }
        }
        encode_jwt(
            &operator,
            json!({
                "sub": self.account_id()?,
                "name": format!("flotilla-{}", self.fleet_id),
                "nats": {
                    "limits": {
                        "subs": -1, "data": -1, "payload": -1, "imports": -1,
                        "exports": -1, "wildcards": true, "conn": -1, "leaf": -1,
                        "mem_storage": -1, "disk_storage": -1, "streams": -1,
                        "consumer": -1, "max_ack_pending": -1,
                    },
                    "revocations": revocations,
                    "type": "account", "version": 2,
                },
            }),
            now_secs(),
        )
        .map_err(|e| invalid(&self.dir.join("operator.nk"), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_protocol::HostName;

    fn verify(jwt: &str, issuer: &str) -> Value {
        let mut parts = jwt.rsplitn(2, '.');
        let sig = parts.next().expect("signature");
        let input = parts.next().expect("input");
        let kp = KeyPair::from_public_key(issuer).expect("issuer key");
        kp.verify(
            input.as_bytes(),
            &BASE64URL_NOPAD.decode(sig.as_bytes()).expect("b64"),
        )
        .expect("signature verifies");
        jwt_claims(jwt).expect("claims")
    }

    #[test]
    fn the_chain_of_trust_is_signed_end_to_end() {
        let dir = tempfile::tempdir().expect("tempdir");
        let auth = NatsAuth::new(dir.path(), "f1");
        auth.init(false).expect("init");
        let operator = auth.key("operator.nk").expect("op").public_key();
        let op = verify(&auth.operator_jwt().expect("op jwt"), &operator);
        assert_eq!(op["nats"]["type"], "operator");
        assert_eq!(
            op["nats"]["system_account"],
            auth.system_account_id().expect("sys")
        );
        let acc = verify(&auth.account_jwt().expect("acc jwt"), &operator);
        assert_eq!(acc["sub"], auth.account_id().expect("acc"));
        assert_eq!(acc["nats"]["limits"]["disk_storage"], -1, "JetStream on");

        let web = HostName::new("web").expect("valid");
        let creds = auth.mint(&Role::Host(web.clone())).expect("mint");
        let jwt = creds.lines().nth(1).expect("jwt line");
        let user = verify(jwt, &auth.account_id().expect("acc"));
        assert_eq!(user["nats"]["type"], "user");
        let allowed = user["nats"]["pub"]["allow"].as_array().expect("allow list");
        assert!(allowed.iter().any(|s| s == "$KV.flotilla-health.web"));
        assert!(!allowed.iter().any(|s| s == "$KV.flotilla-health.>"));
        assert_eq!(
            auth.users_of("host", "web"),
            vec![user["sub"].as_str().expect("sub")]
        );
        assert!(creds.contains("-----BEGIN USER NKEY SEED-----\nSU"));
        assert!(matches!(auth.init(false), Err(FleetError::Exists(_))));
    }

    #[test]
    fn a_revocation_lands_in_the_account_jwt() {
        let dir = tempfile::tempdir().expect("tempdir");
        let auth = NatsAuth::new(dir.path(), "f1");
        auth.init(false).expect("init");
        let web = HostName::new("web").expect("valid");
        auth.mint(&Role::Host(web.clone())).expect("first");
        auth.mint(&Role::Host(web)).expect("second, re-enrolled");
        let users = auth.users_of("host", "web");
        assert_eq!(users.len(), 2);
        auth.record_revocation(Revoked {
            name: "web".into(),
            role: "host".into(),
            at: 1000,
            users: users.clone(),
            cert_sha256: Some("ab".into()),
        })
        .expect("record");
        let acc = jwt_claims(&auth.account_jwt().expect("jwt")).expect("claims");
        for u in &users {
            assert_eq!(acc["nats"]["revocations"][u], 1000);
        }
    }

    #[test]
    fn a_second_revocation_keeps_the_first_certificate_revoked() {
        let dir = tempfile::tempdir().expect("tempdir");
        let auth = NatsAuth::new(dir.path(), "f1");
        auth.init(false).expect("init");
        for (cert, at) in [("c1", 1000), ("c2", 2000), ("c2", 3000)] {
            auth.record_revocation(Revoked {
                name: "web".into(),
                role: "host".into(),
                at,
                users: vec![format!("U{at}")],
                cert_sha256: Some(cert.into()),
            })
            .expect("record");
        }
        let file = auth.revoked().expect("read");
        let certs: Vec<_> = file
            .revoked
            .iter()
            .filter_map(|r| r.cert_sha256.as_deref())
            .collect();
        assert_eq!(certs, ["c1", "c2"]);
        assert_eq!(file.revoked[1].users, ["U2000", "U3000"]);
    }
}
