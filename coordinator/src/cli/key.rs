//! `flotilla key export` and `flotilla key import`: the fleet directory in
//! one passphrase-protected file (the format is
//! [`flotilla_protocol::keyfile`]), so that the fleet survives the loss of
//! the coordinator's disk: `import` rebuilds the directory, and the
//! repository key inside lets backups be read with nothing else running.
//!
//! The export holds every regular file of the fleet directory, recursively,
//! each with its mode: `fleet.toml`, `ca.crt`, `ca.key`, `coordinator.key`,
//! `coordinator.pub`, `repo.key`, `hosts/*.crt`, and all of `nats/` (the
//! operator, fleet account and system account seeds, `coordinator.creds`,
//! `system.creds`, `users/*.keys` with every user key ever minted, and
//! `revoked.toml`), and whatever else was put there. It leaves out what is
//! transient: `serve/` (the state `flotilla serve` keeps there by default,
//! which the daemon builds again), `*.tmp-write` (a write cut short), and
//! anything that is neither a regular file nor a directory (symlinks are
//! never followed; each one left out is named on stderr).
//!
//! Only [`run`] reads the environment or the terminal: [`export`] and
//! [`import`] take the passphrase (and `export` the key derivation's
//! parameters) as arguments, so tests use small ones.

use std::fs;
use std::io::IsTerminal;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use clap::Subcommand;
use flotilla_protocol::keyfile::{
    self, KdfParams, KeyFileBody, KeyFileEntry, KeyFileError, KEYFILE_VERSION,
};
use serde_json::json;

use super::Global;
use crate::error::CliError;
use crate::fleet::{write_file, Fleet, FleetError, FleetFile};

/// Where scripts give the passphrase (else it is typed on the terminal).
pub const PASSPHRASE_ENV: &str = "FLOTILLA_PASSPHRASE";
/// A new key file's passphrase has at least this many characters.
pub const MIN_PASSPHRASE_CHARS: usize = 12;

/// Directories at the top of the fleet directory that are never exported.
const TRANSIENT_DIRS: &[&str] = &["serve"];
/// How the temporary files of [`write_file`] end (`repo.tmp-write`).
const TRANSIENT_SUFFIX: &str = ".tmp-write";
/// Entries a fleet directory cannot be without: `import` checks them before
/// it writes anything.
const REQUIRED: &[&str] = &[
    "fleet.toml",
    "ca.crt",
    "ca.key",
    "coordinator.key",
    keyfile::REPO_KEY_PATH,
];
/// Written last on import, as `init` does: a `fleet.toml` means the fleet
/// is complete.
const FLEET_TOML: &str = "fleet.toml";

/// `flotilla key ...`.
#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Write the fleet directory's keys, certificates and NATS identities into one
    /// passphrase-protected file (mode 0600).
    ///
    /// The passphrase comes from FLOTILLA_PASSPHRASE, else it is typed twice (at least
    /// 12 characters). Keep the file away from this machine: with it and its passphrase,
    /// `flotilla key import` rebuilds the fleet directory and the backups can be read.
    Export {
        /// Where to write the key file (outside the fleet directory).
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
        /// Overwrite an existing file.
        #[arg(long)]
        force: bool,
        /// Print {"out", "fleet", "files"}.
        #[arg(long)]
        json: bool,
    },
    /// Rebuild the fleet directory (--fleet DIR) from a key file.
    ///
    /// The passphrase comes from FLOTILLA_PASSPHRASE, else it is typed. Refused when DIR
    /// exists and is not empty, unless --force.
    Import {
        /// The key file `flotilla key export` wrote.
        file: PathBuf,
        /// Write into a directory that is not empty (files of the same name are replaced).
        #[arg(long)]
        force: bool,
        /// Print {"fleet", "dir", "files"}.
        #[arg(long)]
        json: bool,
    },
}

impl KeyCommand {
    /// Whether JSON output was asked for.
    pub fn json(&self) -> bool {
        match self {
            KeyCommand::Export { json, .. } | KeyCommand::Import { json, .. } => *json,
        }
    }
}

/// A key file that cannot be written or restored.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The fleet directory, or a file in it, cannot be read or written.
    #[error(transparent)]
    Fleet(#[from] FleetError),
    /// The key file cannot be made or opened.
    #[error("cannot use key file {path}: {source}")]
    KeyFile {
        /// The key file.
        path: PathBuf,
        /// Why.
        source: KeyFileError,
    },
    /// The key file would be written inside the fleet directory it protects.
    #[error("{0} is inside the fleet directory: write the key file elsewhere, as it must outlive the directory")]
    InsideFleet(PathBuf),
    /// Import would write into a directory that holds something.
    #[error(
        "{0} is not empty: import into a new or empty directory, or pass --force to write over it"
    )]
    NotEmpty(PathBuf),
    /// A file of the fleet directory cannot go into a key file.
    #[error("cannot export {path}: {why}")]
    Unexportable {
        /// The file.
        path: PathBuf,
        /// Why, and what to do.
        why: String,
    },
    /// No passphrase, or one too short (what to do).
    #[error("{0}")]
    Passphrase(String),
}

impl From<KeyError> for CliError {
    fn from(e: KeyError) -> Self {
        let message = e.to_string();
        match e {
            KeyError::Fleet(e) => CliError::Fleet(e),
            KeyError::Passphrase(_) | KeyError::InsideFleet(_) => CliError::Usage(message),
            KeyError::KeyFile { path, source } => CliError::Io {
                path,
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, source),
            },
            KeyError::NotEmpty(path) => CliError::Io {
                path,
                source: std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "it is not empty: import into a new or empty directory, or pass --force to write over it",
                ),
            },
            KeyError::Unexportable { path, why } => CliError::Io {
                path,
                source: std::io::Error::other(why),
            },
        }
    }
}

/// What [`export`] wrote.
#[derive(Debug)]
pub struct Exported {
    /// The fleet's id.
    pub fleet: String,
    /// The files in the key file, relative to the fleet directory.
    pub files: Vec<String>,
    /// What was left out for not being a regular file or a directory.
    pub skipped: Vec<PathBuf>,
}

/// What [`import`] wrote.
#[derive(Debug)]
pub struct Imported {
    /// The fleet, loaded from the directory written.
    pub fleet: Fleet,
    /// The files written, relative to the fleet directory.
    pub files: Vec<String>,
}

/// `flotilla key export|import`.
pub fn run(g: &Global, command: KeyCommand) -> Result<(), CliError> {
    match command {
        KeyCommand::Export { out, force, json } => {
            let fleet = g.fleet()?;
            // Refused before the passphrase is asked for, not after.
            if !force && out.exists() {
                return Err(FleetError::Exists(out).into());
            }
            if inside(&out, &fleet.dir) {
                return Err(KeyError::InsideFleet(out).into());
            }
            let passphrase = passphrase(true)?;
            let done = export(
                &fleet,
                &out,
                passphrase.as_bytes(),
                KdfParams::DEFAULT,
                force,
            )?;
            for path in &done.skipped {
                eprintln!(
                    "warning: left out {}: not a regular file or directory",
                    path.display()
                );
            }
            if json {
                outln!(
                    "{}",
                    json!({"out": out, "fleet": done.fleet, "files": done.files})
                );
            } else {
                outln!(
                    "wrote the key file of fleet {} to {} (mode 0600): {} files of {}, \
                     ca.key, coordinator.key, repo.key and nats/ among them",
                    done.fleet,
                    out.display(),
                    done.files.len(),
                    fleet.dir.display()
                );
                outln!(
                    "store it away from this machine; without it and its passphrase the backups \
                     cannot be read if this machine is lost"
                );
            }
            Ok(())
        }
        KeyCommand::Import { file, force, json } => {
            let dir = g.fleet.clone().ok_or(CliError::NoFleet)?;
            // Refused before the passphrase is asked for, not after.
            fs::metadata(&file).map_err(io(&file))?;
            check_target(&dir, force)?;
            let passphrase = passphrase(false)?;
            let done = import(&file, &dir, passphrase.as_bytes(), force)?;
            if json {
                outln!(
                    "{}",
                    json!({"fleet": done.fleet.file.id, "dir": dir, "files": done.files})
                );
            } else {
                let fleet_flag = format!("--fleet {}", dir.display());
                outln!(
                    "restored fleet {} into {} ({} files)",
                    done.fleet.file.id,
                    dir.display(),
                    done.files.len()
                );
                outln!(
                    "next, if the NATS server was lost too: `flotilla nats-config {fleet_flag} \
                     --listen HOST:PORT --store DIR --out nats.conf` (a server certificate from \
                     the same CA) and `nats-server -c nats.conf`; then `flotilla doctor {fleet_flag}` \
                     (the streams and buckets, the account and its revocations)"
                );
                outln!(
                    "the agents keep their bundles: the CA, the coordinator key and the NATS \
                     account they trust are the ones restored"
                );
            }
            Ok(())
        }
    }
}

/// Seals every file of `fleet`'s directory (see the module's doc for which)
/// under `passphrase` into `out`, mode 0600, through a temporary file and a
/// rename; an existing `out` is replaced only with `force`.
pub fn export(
    fleet: &Fleet,
    out: &Path,
    passphrase: &[u8],
    params: KdfParams,
    force: bool,
) -> Result<Exported, KeyError> {
    if !force && out.exists() {
        return Err(FleetError::Exists(out.to_path_buf()).into());
    }
    if inside(out, &fleet.dir) {
        return Err(KeyError::InsideFleet(out.to_path_buf()));
    }
    let mut found = Collected::default();
    collect(&fleet.dir, "", &mut found)?;
    let body = KeyFileBody {
        v: KEYFILE_VERSION,
        fleet_id: fleet.file.id.clone(),
        exported_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        entries: found.entries,
    };
    let key_file_err = |source| KeyError::KeyFile {
        path: out.to_path_buf(),
        source,
    };
    let bytes =
        keyfile::seal(&body, passphrase, params, random()?, random()?).map_err(key_file_err)?;
    write_file(out, &bytes, 0o600, force)?;
    Ok(Exported {
        fleet: body.fleet_id,
        files: body.entries.into_iter().map(|e| e.path).collect(),
        skipped: found.skipped,
    })
}

/// Opens the key file `file` with `passphrase` and writes its files into
/// `dir` with their modes (directories 0700), `fleet.toml` last; `dir` must
/// be missing or empty unless `force`. Nothing is written unless the file
/// opens and holds a whole fleet directory; the result must load as a fleet.
pub fn import(
    file: &Path,
    dir: &Path,
    passphrase: &[u8],
    force: bool,
) -> Result<Imported, KeyError> {
    let bytes = read_key_file(file)?;
    check_target(dir, force)?;
    let key_file_err = |source| KeyError::KeyFile {
        path: file.to_path_buf(),
        source,
    };
    let body = keyfile::open(&bytes, passphrase).map_err(key_file_err)?;
    check_whole(&body).map_err(key_file_err)?;

    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
    let (last, first): (Vec<&KeyFileEntry>, Vec<&KeyFileEntry>) =
        body.entries.iter().partition(|e| e.path == FLEET_TOML);
    for entry in first.into_iter().chain(last) {
        // `open` validated the path: relative, no `.`, `..` or empty
        // component, so it stays inside `dir`.
        let path = dir.join(&entry.path);
        if let Some(parent) = path.parent() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(io(parent))?;
        }
        write_file(&path, &entry.data, entry.mode, true)?;
        // The umask may have taken bits away from what `write_file` asked.
        fs::set_permissions(&path, fs::Permissions::from_mode(entry.mode)).map_err(io(&path))?;
    }

    let fleet = Fleet::load(dir)?;
    fleet.signing_seed()?;
    Ok(Imported {
        fleet,
        files: body.entries.into_iter().map(|e| e.path).collect(),
    })
}

/// Refuses a passphrase too short for a new key file.
pub fn check_new_passphrase(passphrase: &str) -> Result<(), KeyError> {
    let chars = passphrase.chars().count();
    if chars < MIN_PASSPHRASE_CHARS {
        return Err(KeyError::Passphrase(format!(
            "the passphrase has {chars} characters; use at least {MIN_PASSPHRASE_CHARS} \
             (a few unrelated words are easy to type and hard to guess)"
        )));
    }
    Ok(())
}

/// The passphrase: [`PASSPHRASE_ENV`] when set, else typed on the terminal
/// without echo (twice for a `new` key file, whose passphrase must also be
/// long enough).
fn passphrase(new: bool) -> Result<String, KeyError> {
    match std::env::var(PASSPHRASE_ENV) {
        Ok(passphrase) => {
            if new {
                check_new_passphrase(&passphrase)?;
            }
            return Ok(passphrase);
        }
        Err(std::env::VarError::NotUnicode(_)) => {
            return Err(KeyError::Passphrase(format!(
                "{PASSPHRASE_ENV} is not valid UTF-8: set it to the passphrase as text"
            )))
        }
        Err(std::env::VarError::NotPresent) => {}
    }
    if !std::io::stdin().is_terminal() {
        return Err(KeyError::Passphrase(format!(
            "no passphrase: standard input is not a terminal to type it on; set {PASSPHRASE_ENV}"
        )));
    }
    if !new {
        return prompt("Passphrase of the key file: ");
    }
    let first = prompt("Passphrase for the new key file: ")?;
    check_new_passphrase(&first)?;
    if prompt("The same passphrase again: ")? != first {
        return Err(KeyError::Passphrase(
            "the two passphrases differ; run the command again".into(),
        ));
    }
    Ok(first)
}

/// Reads one passphrase from the terminal, without echo.
fn prompt(text: &str) -> Result<String, KeyError> {
    rpassword::prompt_password(text).map_err(|e| {
        KeyError::Passphrase(format!(
            "cannot read the passphrase from the terminal: {e}; set {PASSPHRASE_ENV} instead"
        ))
    })
}

/// What [`collect`] found.
#[derive(Debug, Default)]
struct Collected {
    /// The regular files, read.
    entries: Vec<KeyFileEntry>,
    /// What is neither a regular file nor a directory.
    skipped: Vec<PathBuf>,
    /// Bytes so far, counted as the key file counts them.
    total: usize,
}

/// Adds every regular file under `dir` (`rel` from the fleet directory, ""
/// at its top) to `found`, in name order, refusing early what is too much
/// for a key file rather than reading it.
fn collect(dir: &Path, rel: &str, found: &mut Collected) -> Result<(), KeyError> {
    let mut names = fs::read_dir(dir)
        .map_err(io(dir))?
        .map(|entry| entry.map(|e| e.file_name()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(io(dir))?;
    names.sort();
    for name in names {
        let path = dir.join(&name);
        let Some(name) = name.to_str() else {
            return Err(KeyError::Unexportable {
                path,
                why: "its name is not UTF-8: rename it, or move it out of the fleet directory"
                    .into(),
            });
        };
        let rel_path = if rel.is_empty() {
            name.to_owned()
        } else {
            format!("{rel}/{name}")
        };
        let meta = fs::symlink_metadata(&path).map_err(io(&path))?;
        let kind = meta.file_type();
        if kind.is_dir() {
            if rel.is_empty() && TRANSIENT_DIRS.contains(&name) {
                continue;
            }
            collect(&path, &rel_path, found)?;
        } else if kind.is_file() {
            if name.ends_with(TRANSIENT_SUFFIX) {
                continue;
            }
            if found.entries.len() >= keyfile::MAX_ENTRIES {
                return Err(KeyError::Unexportable {
                    path,
                    why: format!(
                        "the fleet directory holds more than {} files, more than a key file holds: \
                         move what is not the fleet's out of it",
                        keyfile::MAX_ENTRIES
                    ),
                });
            }
            let len = usize::try_from(meta.len()).unwrap_or(usize::MAX);
            found.total = found
                .total
                .saturating_add(len)
                .saturating_add(rel_path.len());
            if found.total > keyfile::MAX_TOTAL_BYTES {
                return Err(KeyError::Unexportable {
                    path,
                    why: format!(
                        "with it the fleet directory holds more than {} MiB, more than a key file \
                         holds: move large files that are not the fleet's out of it",
                        keyfile::MAX_TOTAL_BYTES / (1024 * 1024)
                    ),
                });
            }
            let data = fs::read(&path).map_err(io(&path))?;
            found.entries.push(KeyFileEntry {
                path: rel_path,
                mode: meta.permissions().mode() & 0o7777,
                data,
            });
        } else {
            found.skipped.push(path);
        }
    }
    Ok(())
}

/// Refuses a key file that does not hold a whole fleet directory of its own
/// fleet, before anything is written.
fn check_whole(body: &KeyFileBody) -> Result<(), KeyFileError> {
    for name in REQUIRED {
        if body.entry(name).is_none() {
            return Err(KeyFileError::Invalid(format!(
                "it holds no {name}: it was not exported from a whole fleet directory"
            )));
        }
    }
    body.repo_key()?;
    let fleet_toml = body
        .entry(FLEET_TOML)
        .and_then(|e| std::str::from_utf8(&e.data).ok())
        .and_then(|text| toml::from_str::<FleetFile>(text).ok())
        .ok_or_else(|| KeyFileError::Invalid(format!("its {FLEET_TOML} does not parse")))?;
    if fleet_toml.id != body.fleet_id {
        return Err(KeyFileError::Invalid(format!(
            "its {FLEET_TOML} is fleet {}, not fleet {}",
            fleet_toml.id, body.fleet_id
        )));
    }
    Ok(())
}

/// Refuses a target directory that holds something, unless `force`.
fn check_target(dir: &Path, force: bool) -> Result<(), KeyError> {
    match fs::read_dir(dir) {
        Ok(mut entries) => {
            if !force && entries.next().is_some() {
                return Err(KeyError::NotEmpty(dir.to_path_buf()));
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(dir)(e)),
    }
}

/// Reads a key file, refusing one too large to be one before reading it.
fn read_key_file(file: &Path) -> Result<Vec<u8>, KeyError> {
    let meta = fs::metadata(file).map_err(io(file))?;
    if meta.len() > keyfile::MAX_FILE_BYTES as u64 {
        return Err(KeyError::KeyFile {
            path: file.to_path_buf(),
            source: KeyFileError::TooLarge,
        });
    }
    fs::read(file).map_err(io(file))
}

/// Whether `path` would be written inside `dir` (judged by the nearest
/// ancestor of `path` that exists).
fn inside(path: &Path, dir: &Path) -> bool {
    let Ok(dir) = dir.canonicalize() else {
        return false;
    };
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        match std::env::current_dir() {
            Ok(cwd) => cwd.join(path),
            Err(_) => return false,
        }
    };
    absolute
        .ancestors()
        .skip(1)
        .find_map(|a| a.canonicalize().ok())
        .is_some_and(|a| a.starts_with(&dir))
}

/// Random bytes for a salt or a nonce.
fn random<const N: usize>() -> Result<[u8; N], KeyError> {
    let mut buf = [0u8; N];
    getrandom::fill(&mut buf).map_err(|e| FleetError::Random(e.to_string()))?;
    Ok(buf)
}

/// The error for a failed read or write of `path`.
fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KeyError + '_ {
    move |source| {
        KeyError::Fleet(FleetError::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use clap::Parser;
    use flotilla_protocol::HostName;

    use super::*;
    use crate::cli::{Cli, Command};

    /// Small parameters: tests derive several keys.
    const FAST: KdfParams = KdfParams {
        m_kib: 8192,
        t: 1,
        p: 1,
    };
    const PASSPHRASE: &[u8] = b"a long enough passphrase";

    /// A fleet with an enrolled host, a revocation, and what export leaves
    /// out: the daemon's state, a half-written file, a symlink.
    fn fleet(tmp: &Path) -> Fleet {
        let fleet = Fleet::init(&tmp.join("fleet"), "tls://127.0.0.1:4222", false).expect("init");
        for host in ["nas", "laptop"] {
            fleet
                .enroll(
                    &HostName::new(host).expect("valid"),
                    &tmp.join(format!("{host}.toml")),
                    None,
                    true,
                    false,
                )
                .expect("enroll");
        }
        fleet
            .revoke(&HostName::new("laptop").expect("valid"), 5)
            .expect("revoke");
        fs::create_dir_all(fleet.dir.join("serve")).expect("mkdir");
        fs::write(fleet.dir.join("serve").join("db"), b"sled").expect("write");
        fs::write(fleet.dir.join("repo.tmp-write"), b"half").expect("write");
        std::os::unix::fs::symlink("/etc/hostname", fleet.dir.join("link")).expect("symlink");
        fleet
    }

    /// Every regular file under `dir`: its mode and bytes.
    fn tree(dir: &Path) -> BTreeMap<String, (u32, Vec<u8>)> {
        fn walk(dir: &Path, rel: &str, out: &mut BTreeMap<String, (u32, Vec<u8>)>) {
            for entry in fs::read_dir(dir).expect("read_dir") {
                let entry = entry.expect("entry");
                let name = entry.file_name().into_string().expect("UTF-8");
                let rel = if rel.is_empty() {
                    name
                } else {
                    format!("{rel}/{name}")
                };
                let meta = fs::symlink_metadata(entry.path()).expect("stat");
                if meta.is_dir() {
                    walk(&entry.path(), &rel, out);
                } else if meta.is_file() {
                    let data = fs::read(entry.path()).expect("read");
                    out.insert(rel, (meta.permissions().mode() & 0o7777, data));
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(dir, "", &mut out);
        out
    }

    #[test]
    fn export_then_import_reproduces_every_file_and_mode() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let fleet = fleet(tmp.path());
        let key = tmp.path().join("fleet.key");
        let exported = export(&fleet, &key, PASSPHRASE, FAST, false).expect("export");
        assert_eq!(
            fs::metadata(&key).expect("written").permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(exported.skipped, vec![fleet.dir.join("link")]);
        for secret in [
            "ca.key",
            "coordinator.key",
            "repo.key",
            "nats/account.nk",
            "nats/operator.nk",
            "nats/coordinator.creds",
            "nats/revoked.toml",
            "hosts/nas.crt",
        ] {
            assert!(exported.files.iter().any(|f| f == secret), "{secret}");
        }

        let mut expected = tree(&fleet.dir);
        expected.retain(|path, _| !path.starts_with("serve/") && path != "repo.tmp-write");
        let restored = tmp.path().join("restored");
        let imported = import(&key, &restored, PASSPHRASE, false).expect("import");
        assert_eq!(imported.fleet.file.id, fleet.file.id);
        assert_eq!(tree(&restored), expected);
        assert_eq!(imported.files.len(), expected.len());
        assert_eq!(
            fs::metadata(&restored).expect("dir").permissions().mode() & 0o777,
            0o700
        );
        assert_eq!(
            fs::metadata(restored.join("nats").join("users"))
                .expect("dir")
                .permissions()
                .mode()
                & 0o777,
            0o700
        );
        // What the restored directory signs verifies as the original's.
        assert_eq!(
            imported.fleet.public_key().expect("key"),
            fleet.public_key().expect("key")
        );
        assert_eq!(
            imported.fleet.revoked_hosts().expect("revoked"),
            fleet.revoked_hosts().expect("revoked")
        );
    }

    #[test]
    fn a_wrong_passphrase_writes_nothing() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let fleet = fleet(tmp.path());
        let key = tmp.path().join("fleet.key");
        export(&fleet, &key, PASSPHRASE, FAST, false).expect("export");
        let restored = tmp.path().join("restored");
        let err = import(&key, &restored, b"not the passphrase", false).expect_err("refused");
        assert!(
            matches!(
                err,
                KeyError::KeyFile {
                    source: KeyFileError::WrongPassphrase,
                    ..
                }
            ),
            "{err}"
        );
        assert!(!restored.exists(), "nothing is written");
        let message = CliError::from(err).to_string();
        assert!(
            message.starts_with(&format!(
                "cannot use {}: wrong passphrase, or the file was changed",
                key.display()
            )),
            "{message}"
        );
    }

    #[test]
    fn nothing_is_overwritten_without_force() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let fleet = fleet(tmp.path());
        let key = tmp.path().join("fleet.key");
        export(&fleet, &key, PASSPHRASE, FAST, false).expect("export");
        assert!(matches!(
            export(&fleet, &key, PASSPHRASE, FAST, false),
            Err(KeyError::Fleet(FleetError::Exists(_)))
        ));
        export(&fleet, &key, PASSPHRASE, FAST, true).expect("export --force");
        assert!(matches!(
            export(
                &fleet,
                &fleet.dir.join("fleet.key"),
                PASSPHRASE,
                FAST,
                false
            ),
            Err(KeyError::InsideFleet(_))
        ));

        let occupied = tmp.path().join("occupied");
        fs::create_dir_all(&occupied).expect("mkdir");
        fs::write(occupied.join("notes.txt"), b"mine").expect("write");
        assert!(matches!(
            import(&key, &occupied, PASSPHRASE, false),
            Err(KeyError::NotEmpty(_))
        ));
        assert_eq!(tree(&occupied).len(), 1, "nothing written");
        let imported = import(&key, &occupied, PASSPHRASE, true).expect("import --force");
        assert_eq!(imported.fleet.file.id, fleet.file.id);
        assert!(occupied.join("notes.txt").exists());
    }

    #[test]
    fn short_passphrases_are_refused_for_new_key_files() {
        assert!(check_new_passphrase("eleven char").is_err());
        assert!(
            check_new_passphrase("ééééééééééé").is_err(),
            "characters, not bytes"
        );
        assert!(check_new_passphrase("twelve chars").is_ok());
    }

    #[test]
    fn key_commands_parse_and_know_their_json() {
        let parse = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("flotilla").chain(args.iter().copied()))
                .expect("parse")
                .command
        };
        let export = parse(&["key", "export", "--out", "f.key", "--json"]);
        assert!(export.json());
        assert!(matches!(
            export,
            Command::Key {
                command: KeyCommand::Export { force: false, .. }
            }
        ));
        let import = parse(&["key", "import", "f.key", "--force"]);
        assert!(!import.json());
        assert!(matches!(
            import,
            Command::Key {
                command: KeyCommand::Import { force: true, .. }
            }
        ));
    }
}
