//! The bus's own commands: `nats-config` (the server's configuration),
//! `doctor` (streams, buckets, consumers, the account and the revocation
//! list as they must be), `revoke` (a host or subscriber out, for good).

use std::fmt::Write as _;
use std::fs;
use std::path::Path;

use flotilla_protocol::{subject, HostName, RevocationList, RevokedCert};
use serde_json::json;

use super::Global;
use crate::doctor;
use crate::error::CliError;
use crate::fleet::{write_file, Fleet, FleetError};
use crate::nats::{ClientAuth, Nats};

fn request(what: &str) -> impl FnOnce(String) -> CliError + '_ {
    move |why| CliError::Request {
        what: what.to_owned(),
        why,
    }
}

/// The host part of each URL in a comma-separated list.
fn url_hosts(urls: &str) -> Vec<String> {
    urls.split(',')
        .filter_map(|u| {
            let rest = u.trim().split("://").last()?;
            let authority = rest.split('/').next()?;
            let authority = authority.rsplit('@').next()?;
            let host = match authority.strip_prefix('[') {
                Some(v6) => v6.split(']').next()?.to_owned(),
                None => authority
                    .rsplit_once(':')
                    .map_or(authority, |(h, _)| h)
                    .to_owned(),
            };
            (!host.is_empty()).then_some(host)
        })
        .collect()
}

fn is_wildcard(host: &str) -> bool {
    matches!(host, "0.0.0.0" | "::" | "[::]" | "")
}

/// The names the server certificate must be valid for.
pub fn server_names(listen_host: &str, fleet_urls: &str, extra: &[String]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    let candidates = extra
        .iter()
        .cloned()
        .chain((!is_wildcard(listen_host)).then(|| listen_host.trim_matches(['[', ']']).to_owned()))
        .chain(url_hosts(fleet_urls));
    for n in candidates {
        if !is_wildcard(&n) && !names.contains(&n) {
            names.push(n);
        }
    }
    names
}

/// One node of a JetStream cluster (`nats-config --cluster`).
#[derive(Debug, Clone)]
pub struct Cluster {
    /// The cluster's name, the same on every node.
    pub name: String,
    /// This node's name, unique in the cluster.
    pub server_name: Option<String>,
    /// Where this node listens for the others, HOST:PORT.
    pub listen: String,
    /// The other nodes' cluster addresses, HOST:PORT.
    pub routes: Vec<String>,
}

/// A cluster node's configuration, checked: (server name, route URLs).
fn cluster_parts(c: &Cluster, names: &[String]) -> Result<(String, Vec<String>), CliError> {
    let word = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    if !word(&c.name) {
        return Err(CliError::Usage(format!(
            "--cluster {:?}: use letters, digits, '-', '_' and '.'",
            c.name
        )));
    }
    let server_name = c
        .server_name
        .clone()
        .or_else(|| names.first().cloned())
        .unwrap_or_default();
    if !word(&server_name) {
        return Err(CliError::Usage(format!(
            "--server-name {server_name:?}: use letters, digits, '-', '_' and '.'"
        )));
    }
    if c.listen.rsplit_once(':').is_none() {
        return Err(CliError::Usage(format!(
            "--cluster-listen {}: give HOST:PORT, e.g. 0.0.0.0:6222",
            c.listen
        )));
    }
    if c.routes.is_empty() {
        return Err(CliError::Usage(
            "--cluster needs a --route HOST:PORT for every other node".into(),
        ));
    }
    let routes = c
        .routes
        .iter()
        .map(|r| {
            let bare = r.split_once("://").map_or(r.as_str(), |(_, rest)| rest);
            match bare.rsplit_once(':') {
                Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
                    Ok(format!("tls://{bare}"))
                }
                _ => Err(CliError::Usage(format!(
                    "--route {r}: give HOST:PORT of another node's --cluster-listen"
                ))),
            }
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((server_name, routes))
}

/// `flotilla nats-config`.
pub fn nats_config(
    g: &Global,
    listen: &str,
    store: &Path,
    out: &Path,
    extra_names: &[String],
    force: bool,
    cluster: Option<&Cluster>,
) -> Result<(), CliError> {
    let fleet = g.fleet()?;
    let auth = fleet.nats_auth();
    if !auth.exists() {
        return Err(FleetError::Invalid {
            path: fleet.dir.join("nats"),
            why: "this fleet was made before NATS identities existed: make a new one with `flotilla init`".into(),
        }
        .into());
    }
    let (host, _port) = listen.rsplit_once(':').ok_or_else(|| {
        CliError::Usage(format!(
            "--listen {listen}: give HOST:PORT, e.g. 0.0.0.0:4222"
        ))
    })?;
    let names = server_names(host, &g.nats_url(), extra_names);
    if names.is_empty() {
        return Err(CliError::Usage(format!(
            "--listen {listen} names no address clients dial: add --name HOST (the name or address in the fleet's NATS URL)"
        )));
    }
    let cluster = cluster
        .map(|c| cluster_parts(c, &names).map(|(server, routes)| (c, server, routes)))
        .transpose()?;
    if out.exists() && !force {
        return Err(FleetError::Exists(out.to_path_buf()).into());
    }
    fs::create_dir_all(store).map_err(|source| FleetError::Io {
        path: store.to_path_buf(),
        source,
    })?;
    let store = store.canonicalize().map_err(|source| FleetError::Io {
        path: store.to_path_buf(),
        source,
    })?;
    let (cert, key) = fleet.server_cert(&names)?;
    let tls = store.join("tls");
    write_file(&tls.join("server.crt"), cert.as_bytes(), 0o644, true)?;
    write_file(&tls.join("server.key"), key.as_bytes(), 0o600, true)?;
    // The other nodes' certificates are checked against the fleet CA.
    let ca = fs::read(fleet.ca_cert_path()).map_err(|source| FleetError::Io {
        path: fleet.ca_cert_path(),
        source,
    })?;
    write_file(&tls.join("ca.crt"), &ca, 0o644, true)?;
    let accounts = store.join("accounts");
    let account = auth.account_id()?;
    // The fleet account's JWT, where the server's account resolver looks
    // for it (a file per account); `revoke` pushes newer ones.
    write_file(
        &accounts.join(format!("{account}.jwt")),
        auth.account_jwt()?.as_bytes(),
        0o644,
        true,
    )?;
    let system = auth.system_account_id()?;
    let text = config_text(&ConfigParts {
        fleet: &fleet.file.id,
        listen,
        store: &store,
        names: &names,
        account: &account,
        system: &system,
        operator_jwt: &auth.operator_jwt()?,
        system_jwt: &auth.system_account_jwt()?,
        out,
        cluster: cluster.as_ref().map(|(c, server, routes)| {
            (
                c.name.as_str(),
                server.as_str(),
                c.listen.as_str(),
                routes.as_slice(),
            )
        }),
    });
    write_file(out, text.as_bytes(), 0o644, force)?;
    outln!(
        "wrote {} (TLS for {}; JetStream in {})",
        out.display(),
        names.join(", "),
        store.join("jetstream").display()
    );
    outln!("start the server: nats-server -c {}", out.display());
    outln!("then once: flotilla doctor (creates the fleet's streams and buckets)");
    Ok(())
}

struct ConfigParts<'a> {
    fleet: &'a str,
    listen: &'a str,
    store: &'a Path,
    names: &'a [String],
    account: &'a str,
    system: &'a str,
    operator_jwt: &'a str,
    system_jwt: &'a str,
    out: &'a Path,
    /// (cluster name, server name, cluster listen, route URLs).
    cluster: Option<(&'a str, &'a str, &'a str, &'a [String])>,
}

fn config_text(p: &ConfigParts<'_>) -> String {
    let store = p.store.display();
    let mut t = String::new();
    let _ = write!(
        t,
        r#"# nats-server configuration of Flotilla fleet {fleet}, written by
# `flotilla nats-config` on {date}. Start it with: nats-server -c {out}
#
# Nothing here needs editing: enrolling a host changes nothing on the server
# (its user is signed by the fleet account), and `flotilla revoke` reaches a
# running server through the system account.

listen: "{listen}"

# JetStream keeps each host's tasks until its agent journals them, every
# event, and the fleet's health.
jetstream {{
  store_dir: "{store}/jetstream"
}}

# TLS with a certificate from the fleet CA, valid for: {names}.
# Clients check it against the CA in their bundle (the coordinator: the
# fleet's ca.crt), so a machine posing as this server is refused.
tls {{
  cert_file: "{store}/tls/server.crt"
  key_file: "{store}/tls/server.key"
  timeout: 5
}}

# Authentication: NATS decentralised auth. This operator is the fleet's; it
# signs the fleet account ({account}) and the system account
# ({system}). Every user (the coordinator, each host, each alerting
# subscriber) is signed by the fleet account with its permissions inside its
# JWT (docs/security.md has the table). Anonymous connections are refused.
operator: "{operator}"
system_account: "{system}"

# Account JWTs live in this directory; `flotilla nats-config` put the fleet
# account's there, `flotilla revoke` and `flotilla doctor` push newer ones.
resolver {{
  type: full
  dir: "{store}/accounts"
  allow_delete: false
  interval: "2m"
  timeout: "5s"
}}
resolver_preload {{
  {system}: "{system_jwt}"
}}
"#,
        fleet = p.fleet,
        date = humantime::format_rfc3339_seconds(std::time::SystemTime::now()),
        out = p.out.display(),
        listen = p.listen,
        names = p.names.join(", "),
        account = p.account,
        system = p.system,
        operator = p.operator_jwt,
        system_jwt = p.system_jwt,
    );
    if let Some((name, server, listen, routes)) = p.cluster {
        let routes: Vec<String> = routes.iter().map(|r| format!("    \"{r}\"")).collect();
        let _ = write!(
            t,
            r#"
# One node of the JetStream cluster {name}: streams and buckets are kept
# on three nodes (`flotilla doctor` sets the replicas), so the fleet runs on
# while any one node is down. Every node has a configuration like this one,
# each with its own server_name, store and certificate.
server_name: "{server}"
cluster {{
  name: "{name}"
  listen: "{listen}"
  routes: [
{routes}
  ]
  # Nodes talk TLS to each other, each presenting a certificate from the
  # fleet CA and checking the other's (a machine without one cannot join).
  tls {{
    cert_file: "{store}/tls/server.crt"
    key_file: "{store}/tls/server.key"
    ca_file: "{store}/tls/ca.crt"
    verify: true
    timeout: 5
  }}
}}
"#,
            routes = routes.join(",\n"),
        );
    }
    t
}

/// Pushes the fleet account's current JWT (with every revocation) to the
/// server through the system account. Returns the server's message.
pub async fn push_account(g: &Global, fleet: &Fleet) -> Result<String, CliError> {
    let Some(system) = ClientAuth::system(fleet) else {
        return Ok("no NATS identities in this fleet".into());
    };
    let nats = Nats::connect(&g.nats_url(), Some(&system)).await?;
    let jwt = fleet.nats_auth().account_jwt()?;
    let reply = nats
        .client
        .request("$SYS.REQ.CLAIMS.UPDATE", jwt.into())
        .await
        .map_err(|e| request("push the fleet account to the server")(e.to_string()))?;
    let doc: serde_json::Value = serde_json::from_slice(&reply.payload).map_err(|e| {
        request("push the fleet account to the server")(format!("unreadable reply: {e}"))
    })?;
    if let Some(err) = doc.get("error") {
        return Err(request("push the fleet account to the server")(
            err.get("description")
                .and_then(|d| d.as_str())
                .unwrap_or("refused")
                .to_owned(),
        ));
    }
    Ok(doc["data"]["message"]
        .as_str()
        .unwrap_or("updated")
        .to_owned())
}

/// Signs the fleet's revocation list and stores it where agents read it.
pub async fn publish_revocations(nats: &Nats, fleet: &Fleet) -> Result<usize, CliError> {
    let revoked: Vec<RevokedCert> = fleet
        .nats_auth()
        .revoked()?
        .revoked
        .into_iter()
        .filter_map(|r| {
            Some(RevokedCert {
                host: HostName::new(&r.name).ok()?,
                cert_sha256: r.cert_sha256?,
                revoked_at: r.at.saturating_mul(1000),
            })
        })
        .collect();
    let store = nats
        .js
        .get_key_value(subject::FLEET_BUCKET)
        .await
        .map_err(|e| request("open the fleet bucket (run `flotilla doctor`)")(e.to_string()))?;
    // What agents hold now, if it is genuine: nothing in it is lifted.
    let in_force = match store.get(subject::REVOKED_KEY).await {
        Ok(Some(bytes)) => {
            match RevocationList::verify(&bytes, &fleet.public_key()?, &fleet.file.id) {
                Ok(list) => Some(list),
                Err(e) => {
                    tracing::warn!(error = %e, "the revocation list in the fleet bucket is not genuine; replacing it");
                    None
                }
            }
        }
        Ok(None) => None,
        Err(e) => return Err(request("read the revocation list")(e.to_string())),
    };
    let list = RevocationList::next(&fleet.file.id, revoked, in_force.as_ref(), crate::now_ms());
    let count = list.revoked.len();
    let bytes = list
        .sign(&fleet.signing_seed()?)
        .map_err(|e| request("sign the revocation list")(e.to_string()))?;
    store
        .put(subject::REVOKED_KEY, bytes.into())
        .await
        .map_err(|e| request("store the revocation list")(e.to_string()))?;
    Ok(count)
}

/// `flotilla doctor`.
pub async fn doctor(
    g: &Global,
    check_only: bool,
    recreate: bool,
    json: bool,
) -> Result<(), CliError> {
    let fleet = g.fleet()?;
    let nats = g.connect().await?;
    let mut findings = doctor::examine(&nats, !check_only, recreate).await?;
    let mut notes = Vec::new();
    if !check_only && fleet.nats_auth().exists() {
        let pushed = push_account(g, &fleet).await?;
        notes.push(format!("fleet account pushed to the server: {pushed}"));
        let n = publish_revocations(&nats, &fleet).await?;
        notes.push(format!(
            "revocation list signed and stored ({n} certificates)"
        ));
    }
    let unrepaired = findings.iter().filter(|f| f.repaired.is_none()).count();
    if json {
        outln!(
            "{}",
            json!({"findings": findings, "notes": notes, "unrepaired": unrepaired})
        );
    } else {
        if findings.is_empty() {
            outln!("streams, buckets and task consumers are as they must be");
        }
        for finding in findings.drain(..) {
            outln!("{finding}");
        }
        for n in notes {
            outln!("{n}");
        }
    }
    if unrepaired > 0 {
        return Err(CliError::Usage(format!(
            "{unrepaired} problem(s) left: {}",
            if check_only {
                "run `flotilla doctor` to repair"
            } else {
                "see above"
            }
        )));
    }
    Ok(())
}

/// `flotilla revoke HOST`.
pub async fn revoke(g: &Global, name: &HostName, json: bool) -> Result<(), CliError> {
    let fleet = g.fleet()?;
    if !fleet.nats_auth().exists() {
        return Err(FleetError::Invalid {
            path: fleet.dir.join("nats"),
            why: "this fleet has no NATS identities to revoke (made before they existed)".into(),
        }
        .into());
    }
    let entry = fleet.revoke(name, crate::now_ms() / 1000)?;
    // Recorded first: if the bus is down now, `flotilla doctor` pushes it
    // later (the error says so).
    let nats = g.connect().await?;
    let pushed = push_account(g, &fleet).await?;
    let certs = publish_revocations(&nats, &fleet).await?;
    if json {
        outln!(
            "{}",
            json!({
                "revoked": name.as_str(),
                "role": entry.role,
                "nats_users": entry.users.len(),
                "certificate": entry.cert_sha256,
                "server": pushed,
                "revoked_certificates": certs,
            })
        );
    } else {
        outln!(
            "revoked {} {name}: {} NATS user(s) refused by the server from now on ({pushed}){}",
            entry.role,
            entry.users.len(),
            match &entry.cert_sha256 {
                Some(c) => format!(
                    "; certificate {}… refused by every agent",
                    &c[..16.min(c.len())]
                ),
                None => String::new(),
            }
        );
        outln!("to bring it back: `flotilla enroll {name} --force` and install the new bundle");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cluster_node_needs_a_name_and_the_other_nodes() {
        let node = |routes: &[&str]| Cluster {
            name: "fleet-bus".into(),
            server_name: None,
            listen: "0.0.0.0:6222".into(),
            routes: routes.iter().map(|r| r.to_string()).collect(),
        };
        let names = ["nats1.lan".to_owned()];
        let (server, routes) = cluster_parts(
            &node(&["nats2.lan:6222", "nats-route://10.0.0.3:6222"]),
            &names,
        )
        .expect("valid");
        assert_eq!(server, "nats1.lan", "the first name by default");
        assert_eq!(routes, ["tls://nats2.lan:6222", "tls://10.0.0.3:6222"]);
        for (c, says) in [
            (node(&[]), "--route HOST:PORT for every other node"),
            (node(&["nats2.lan"]), "--route nats2.lan"),
            (
                Cluster {
                    name: "a b".into(),
                    ..node(&["x:1"])
                },
                "--cluster",
            ),
            (
                Cluster {
                    listen: "6222".into(),
                    ..node(&["x:1"])
                },
                "--cluster-listen",
            ),
            (
                Cluster {
                    server_name: Some("n/1".into()),
                    ..node(&["x:1"])
                },
                "--server-name",
            ),
        ] {
            let err = cluster_parts(&c, &names).expect_err(says).to_string();
            assert!(err.contains(says), "{err}");
        }
    }

    #[test]
    fn the_certificate_names_what_clients_dial() {
        assert_eq!(
            server_names("0.0.0.0", "tls://nas.lan:4222,tls://10.0.0.2:4222", &[]),
            vec!["nas.lan", "10.0.0.2"]
        );
        assert_eq!(
            server_names("127.0.0.1", "nats://127.0.0.1:4222", &["extra".into()]),
            vec!["extra", "127.0.0.1"]
        );
        assert!(server_names("0.0.0.0", "nats://0.0.0.0:4222", &[]).is_empty());
        assert_eq!(url_hosts("tls://[::1]:4222"), vec!["::1"]);
    }
}
