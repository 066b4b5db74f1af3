//! `FLEET/deploy/HOST.toml`: how `flotilla deploy` reached a host and what it
//! set the agent up to do, so that `flotilla upgrade` (and `flotilla deploy
//! HOST` with no other flag) does the same again.
//!
//! ```toml
//! version = 1
//! ssh = "root@192.168.1.10"
//! port = 2222
//! identity = "/home/me/.ssh/id_ed25519"
//! ssh_options = ["UserKnownHostsFile=/home/me/.ssh/fleet_known_hosts"]
//! backup_roots = ["/etc", "/home"]
//! restore_roots = []
//! storage = "/srv/flotilla-repo"
//! listen = "0.0.0.0:7443"
//! service = "systemd"
//! ```
//!
//! Flags given to `deploy` replace the saved value of the same setting (a
//! repeatable flag replaces the whole list) and are saved. The file holds no
//! secret, but it says how to get root on the host, so it is written 0600
//! like the rest of the fleet directory's private files.
//!
//! Pure apart from [`load`], [`save`] and [`saved_hosts`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use flotilla_protocol::HostName;
use serde::{Deserialize, Serialize};

use crate::error::CliError;

/// Version of the file's layout.
pub(super) const SETTINGS_VERSION: u16 = 1;

/// What a first deploy backs up when it is given no role at all (the same
/// default as `install-agent.sh`'s).
pub(super) const DEFAULT_BACKUP_ROOTS: [&str; 2] = ["/etc", "/home"];

/// The directory of the fleet that holds the files.
const DIR: &str = "deploy";

/// How the agent runs on the host, as `install-agent.sh` last reported it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum Service {
    /// `flotilla-agent.service` under systemd.
    Systemd,
    /// A background process with a pid file (no systemd on the host).
    Direct,
}

impl Service {
    /// The word `install-agent.sh` prints (`install-agent: service: WORD`).
    pub(super) fn parse(word: &str) -> Option<Service> {
        match word {
            "systemd" => Some(Service::Systemd),
            "direct" => Some(Service::Direct),
            _ => None,
        }
    }

    /// The same word.
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Service::Systemd => "systemd",
            Service::Direct => "direct",
        }
    }
}

/// One host's deploy settings: the file, and what `deploy` works from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DeploySettings {
    /// [`SETTINGS_VERSION`].
    pub version: u16,
    /// `USER@ADDR` (or a `Host` of `~/.ssh/config`), as given to ssh.
    pub ssh: String,
    /// ssh's `-p`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// ssh's `-i` (absolute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<PathBuf>,
    /// More ssh options, each passed as `-o OPTION`.
    #[serde(default)]
    pub ssh_options: Vec<String>,
    /// Directories the agent may back up.
    #[serde(default)]
    pub backup_roots: Vec<String>,
    /// Directories restores may write into.
    #[serde(default)]
    pub restore_roots: Vec<String>,
    /// The repository directory of a storage host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<String>,
    /// The agent's QUIC address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// The address peers dial instead of `listen`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
    /// How the agent ran after the last install, for the rollback advice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<Service>,
}

/// The settings given on `deploy`'s command line; `None` or empty: not given.
#[derive(Debug, Clone, Default)]
pub(super) struct Overrides {
    /// `--ssh`.
    pub ssh: Option<String>,
    /// `--port`.
    pub port: Option<u16>,
    /// `--identity`, made absolute.
    pub identity: Option<PathBuf>,
    /// `--ssh-option`.
    pub ssh_options: Vec<String>,
    /// `--backup-root`.
    pub backup_roots: Vec<String>,
    /// `--restore-root`.
    pub restore_roots: Vec<String>,
    /// `--storage`.
    pub storage: Option<String>,
    /// `--listen`.
    pub listen: Option<SocketAddr>,
    /// `--advertise`.
    pub advertise: Option<SocketAddr>,
}

impl DeploySettings {
    /// The saved settings (if any) with the flags given laid over them. A
    /// first deploy needs `--ssh`; one with no role at all backs up
    /// [`DEFAULT_BACKUP_ROOTS`].
    pub(super) fn merge(
        saved: Option<DeploySettings>,
        given: Overrides,
    ) -> Result<DeploySettings, String> {
        let first = saved.is_none();
        let ssh = match (given.ssh, &saved) {
            (Some(ssh), _) => ssh,
            (None, Some(saved)) => saved.ssh.clone(),
            (None, None) => {
                return Err(
                    "give --ssh USER@ADDR: the first deploy of a host needs it (later ones reuse the saved settings)"
                        .into(),
                )
            }
        };
        let mut s = saved.unwrap_or(DeploySettings {
            version: SETTINGS_VERSION,
            ssh: String::new(),
            port: None,
            identity: None,
            ssh_options: Vec::new(),
            backup_roots: Vec::new(),
            restore_roots: Vec::new(),
            storage: None,
            listen: None,
            advertise: None,
            service: None,
        });
        s.version = SETTINGS_VERSION;
        s.ssh = ssh;
        s.port = given.port.or(s.port);
        s.identity = given.identity.or(s.identity);
        if !given.ssh_options.is_empty() {
            s.ssh_options = given.ssh_options;
        }
        if !given.backup_roots.is_empty() {
            s.backup_roots = given.backup_roots;
        }
        if !given.restore_roots.is_empty() {
            s.restore_roots = given.restore_roots;
        }
        s.storage = given.storage.or(s.storage);
        s.listen = given.listen.map(|a| a.to_string()).or(s.listen);
        s.advertise = given.advertise.map(|a| a.to_string()).or(s.advertise);
        if first && !s.has_role() {
            s.backup_roots = DEFAULT_BACKUP_ROOTS
                .iter()
                .map(|r| (*r).to_owned())
                .collect();
        }
        Ok(s)
    }

    /// Whether the agent has anything to do.
    fn has_role(&self) -> bool {
        !self.backup_roots.is_empty() || !self.restore_roots.is_empty() || self.storage.is_some()
    }

    /// Checks what the remote shell, `install-agent.sh` and the agent would
    /// refuse later, so that nothing is half done: a plain ssh target, plain
    /// absolute paths (they go into a space-separated variable and into TOML
    /// strings), `ADDR:PORT` addresses.
    pub(super) fn validate(&self) -> Result<(), String> {
        let ssh = &self.ssh;
        if ssh.is_empty()
            || ssh.starts_with('-')
            || ssh.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(format!(
                "--ssh {ssh:?} is not USER@ADDR (no spaces, not starting with '-')"
            ));
        }
        if ssh.ends_with('@') || ssh.starts_with('@') {
            return Err(format!("--ssh {ssh:?} is not USER@ADDR"));
        }
        if self.port == Some(0) {
            return Err("--port 0 is not a port".into());
        }
        for option in &self.ssh_options {
            if option.is_empty()
                || option.starts_with('-')
                || option.chars().any(|c| c.is_control())
            {
                return Err(format!(
                    "--ssh-option {option:?} is not an ssh option (KEY=VALUE, as ssh -o takes it)"
                ));
            }
        }
        for root in &self.backup_roots {
            plain_path("--backup-root", root)?;
        }
        for root in &self.restore_roots {
            plain_path("--restore-root", root)?;
        }
        if let Some(storage) = &self.storage {
            plain_path("--storage", storage)?;
        }
        for (flag, addr) in [("--listen", &self.listen), ("--advertise", &self.advertise)] {
            if let Some(addr) = addr {
                addr.parse::<SocketAddr>().map_err(|_| {
                    format!("{flag} {addr:?} is not ADDRESS:PORT (e.g. 0.0.0.0:7443)")
                })?;
            }
        }
        if self.advertise.is_some() && self.listen.is_none() {
            return Err(
                "--advertise needs --listen: an agent that does not listen has nothing to advertise"
                    .into(),
            );
        }
        if !self.has_role() {
            return Err(
                "the agent would have nothing to do: give --backup-root, --restore-root or --storage"
                    .into(),
            );
        }
        Ok(())
    }

    /// Whether the host's bundle gets the repository key: every host but a
    /// storage-only one (which stores sealed data and never reads it).
    pub(super) fn with_repo_key(&self) -> bool {
        !(self.storage.is_some() && self.backup_roots.is_empty() && self.restore_roots.is_empty())
    }

    /// `(USER, ADDR)` of `USER@ADDR`; no user when the target names none.
    pub(super) fn user_and_addr(&self) -> (Option<&str>, &str) {
        match self.ssh.rsplit_once('@') {
            Some((user, addr)) => (Some(user), addr),
            None => (None, self.ssh.as_str()),
        }
    }

    /// Reads a file's text; refuses a newer layout.
    pub(super) fn parse(text: &str) -> Result<DeploySettings, String> {
        let s: DeploySettings = toml::from_str(text).map_err(|e| e.to_string())?;
        if s.version == 0 || s.version > SETTINGS_VERSION {
            return Err(format!(
                "layout version {} is not one this flotilla knows (1 to {SETTINGS_VERSION})",
                s.version
            ));
        }
        Ok(s)
    }

    /// The file's text.
    pub(super) fn to_toml(&self, host: &HostName) -> Result<String, String> {
        let body = toml::to_string(self).map_err(|e| e.to_string())?;
        Ok(format!(
            "# Written by `flotilla deploy {host}`: how it reaches {host} and what it set up there.\n\
             # `flotilla upgrade` and `flotilla deploy {host}` reuse it; flags given to deploy replace\n\
             # what is here. Edit with care (`flotilla deploy --dry-run` shows what it would do).\n\
             {body}"
        ))
    }
}

/// A path `install-agent.sh` takes: absolute, and nothing that a shell word
/// split on spaces or a TOML string would change.
fn plain_path(flag: &str, path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err(format!(
            "{flag} {path:?} is not an absolute path on the host"
        ));
    }
    if path
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || "\"'\\`$".contains(c))
    {
        return Err(format!(
            "{flag} {path:?} contains a space, quote, backslash, $ or control character, which install-agent.sh refuses"
        ));
    }
    Ok(())
}

/// `FLEET/deploy/HOST.toml`.
pub(super) fn path(fleet_dir: &Path, host: &HostName) -> PathBuf {
    fleet_dir.join(DIR).join(format!("{host}.toml"))
}

/// The host's saved settings, if it was deployed before.
pub(super) fn load(fleet_dir: &Path, host: &HostName) -> Result<Option<DeploySettings>, CliError> {
    let path = path(fleet_dir, host);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(CliError::Io { path, source }),
    };
    DeploySettings::parse(&text).map(Some).map_err(|why| {
        CliError::Usage(format!(
            "{} is not valid: {why}; fix it, or delete it and deploy {host} again with its flags",
            path.display()
        ))
    })
}

/// Writes the host's settings (mode 0600, replacing the file whole); returns
/// the file's path.
pub(super) fn save(
    fleet_dir: &Path,
    host: &HostName,
    settings: &DeploySettings,
) -> Result<PathBuf, CliError> {
    let path = path(fleet_dir, host);
    let text = settings.to_toml(host).map_err(|why| CliError::Request {
        what: format!("write {}", path.display()),
        why,
    })?;
    crate::fleet::write_file(&path, text.as_bytes(), 0o600, true)?;
    Ok(path)
}

/// Every host with saved settings, by name. Files whose name is not a host
/// name are not the fleet's and are left alone.
pub(super) fn saved_hosts(fleet_dir: &Path) -> Result<Vec<HostName>, CliError> {
    let dir = fleet_dir.join(DIR);
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(CliError::Io { path: dir, source }),
    };
    let mut hosts = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| CliError::Io {
            path: dir.clone(),
            source,
        })?;
        let name = entry.file_name();
        let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".toml")) else {
            continue;
        };
        if let Ok(host) = HostName::new(stem) {
            hosts.push(host);
        }
    }
    hosts.sort();
    Ok(hosts)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn given(ssh: Option<&str>) -> Overrides {
        Overrides {
            ssh: ssh.map(str::to_owned),
            ..Overrides::default()
        }
    }

    fn host() -> HostName {
        HostName::new("nas").expect("valid")
    }

    #[test]
    fn a_first_deploy_needs_ssh_and_backs_up_etc_and_home_without_a_role() {
        let err = DeploySettings::merge(None, given(None)).expect_err("no --ssh");
        assert!(err.contains("--ssh USER@ADDR"), "{err}");
        let s = DeploySettings::merge(None, given(Some("root@nas.lan"))).expect("merge");
        assert_eq!(s.backup_roots, ["/etc", "/home"]);
        assert_eq!(s.version, SETTINGS_VERSION);
        assert!(s.validate().is_ok());
        assert!(s.with_repo_key());
        // A storage-only host keeps no backup root and gets no repository key.
        let storage = Overrides {
            storage: Some("/srv/repo".into()),
            listen: Some("0.0.0.0:7443".parse().expect("addr")),
            ..given(Some("root@nas.lan"))
        };
        let s = DeploySettings::merge(None, storage).expect("merge");
        assert!(s.backup_roots.is_empty());
        assert!(!s.with_repo_key());
        assert_eq!(s.listen.as_deref(), Some("0.0.0.0:7443"));
    }

    #[test]
    fn flags_replace_saved_settings_and_the_rest_is_kept() {
        let saved = DeploySettings::merge(
            None,
            Overrides {
                port: Some(2222),
                ssh_options: vec!["UserKnownHostsFile=/k".into()],
                backup_roots: vec!["/srv".into(), "/home".into()],
                ..given(Some("root@old"))
            },
        )
        .expect("merge");
        let mut saved = saved;
        saved.service = Some(Service::Direct);
        // No flag: the saved settings, as they were.
        let again = DeploySettings::merge(Some(saved.clone()), given(None)).expect("merge");
        assert_eq!(again, saved);
        // A list flag replaces the whole list; other settings stay.
        let changed = DeploySettings::merge(
            Some(saved.clone()),
            Overrides {
                backup_roots: vec!["/data".into()],
                ..given(Some("admin@new"))
            },
        )
        .expect("merge");
        assert_eq!(changed.ssh, "admin@new");
        assert_eq!(changed.backup_roots, ["/data"]);
        assert_eq!(changed.port, Some(2222));
        assert_eq!(changed.ssh_options, ["UserKnownHostsFile=/k"]);
        assert_eq!(changed.service, Some(Service::Direct));
    }

    /// What validation says about `base` changed by `change`.
    fn refused(base: &DeploySettings, change: impl Fn(&mut DeploySettings)) -> String {
        let mut s = base.clone();
        change(&mut s);
        s.validate().expect_err("refused")
    }

    #[test]
    fn validation_refuses_what_the_shell_or_install_agent_would() {
        let base = DeploySettings::merge(None, given(Some("root@nas"))).expect("merge");
        let bad = |change: fn(&mut DeploySettings)| refused(&base, change);
        assert!(bad(|s| s.ssh = "-oProxyCommand=x".into()).contains("--ssh"));
        assert!(bad(|s| s.ssh = "root@nas ; rm".into()).contains("--ssh"));
        assert!(bad(|s| s.ssh = "root@".into()).contains("--ssh"));
        assert!(bad(|s| s.backup_roots = vec!["relative".into()]).contains("absolute"));
        assert!(bad(|s| s.backup_roots = vec!["/my docs".into()]).contains("space"));
        assert!(bad(|s| s.restore_roots = vec!["/a'b".into()]).contains("quote"));
        assert!(bad(|s| s.storage = Some("/x$y".into())).contains("--storage"));
        assert!(bad(|s| s.listen = Some("nas:7443".into())).contains("ADDRESS:PORT"));
        assert!(bad(|s| s.advertise = Some("192.0.2.1:7443".into())).contains("--listen"));
        assert!(bad(|s| s.port = Some(0)).contains("port"));
        assert!(bad(|s| s.ssh_options = vec!["-v".into()]).contains("--ssh-option"));
        assert!(bad(|s| s.backup_roots.clear()).contains("nothing to do"));
    }

    #[test]
    fn the_file_round_trips_and_a_newer_layout_is_refused() {
        let mut s = DeploySettings::merge(
            None,
            Overrides {
                port: Some(22),
                identity: Some("/root/.ssh/id".into()),
                storage: Some("/srv/repo".into()),
                listen: Some("0.0.0.0:7443".parse().expect("addr")),
                advertise: Some("192.0.2.1:7443".parse().expect("addr")),
                ..given(Some("root@nas"))
            },
        )
        .expect("merge");
        s.service = Some(Service::Systemd);
        let text = s.to_toml(&host()).expect("serialise");
        assert!(
            text.starts_with("# Written by `flotilla deploy nas`"),
            "{text}"
        );
        assert!(text.contains("service = \"systemd\""), "{text}");
        assert_eq!(DeploySettings::parse(&text).expect("parse"), s);
        // Unset settings are left out, and come back unset.
        let bare = DeploySettings::merge(None, given(Some("nas"))).expect("merge");
        let text = bare.to_toml(&host()).expect("serialise");
        assert!(!text.contains("port ="), "{text}");
        assert_eq!(DeploySettings::parse(&text).expect("parse"), bare);
        let newer = text.replace("version = 1", "version = 9");
        assert!(DeploySettings::parse(&newer)
            .expect_err("newer")
            .contains("version 9"));
        let typo = format!("{text}\nbackup_root = [\"/x\"]\n");
        assert!(
            DeploySettings::parse(&typo).is_err(),
            "unknown keys are refused"
        );
    }

    #[test]
    fn the_user_is_what_comes_before_the_last_at() {
        let mut s = DeploySettings::merge(None, given(Some("admin@nas.lan"))).expect("merge");
        assert_eq!(s.user_and_addr(), (Some("admin"), "nas.lan"));
        s.ssh = "nas".into();
        assert_eq!(s.user_and_addr(), (None, "nas"));
    }

    #[test]
    fn saved_files_are_0600_and_listed_by_host() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(saved_hosts(dir.path()).expect("no dir yet").is_empty());
        assert!(load(dir.path(), &host()).expect("none").is_none());
        let s = DeploySettings::merge(None, given(Some("root@nas"))).expect("merge");
        let file = save(dir.path(), &host(), &s).expect("save");
        let mode = std::fs::metadata(&file)
            .expect("saved")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(load(dir.path(), &host()).expect("load"), Some(s.clone()));
        let web = HostName::new("web").expect("valid");
        save(dir.path(), &web, &s).expect("save");
        std::fs::write(dir.path().join(DIR).join("Not_A_Host.toml"), "").expect("write");
        std::fs::write(dir.path().join(DIR).join("notes.txt"), "").expect("write");
        assert_eq!(saved_hosts(dir.path()).expect("list"), [host(), web]);
    }
}
