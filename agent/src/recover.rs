//! `flotilla-agent recover`: a repository read straight from its directory,
//! with nothing else running: no NATS, no coordinator, no other agent. For
//! when the fleet itself is lost (the coordinator's disk died) or all that
//! is left of a storage host is its disk or a copy of its repository.
//!
//! ```text
//! flotilla-agent recover --repo DIR --key-file FILE --list [--json]
//! flotilla-agent recover --repo DIR --key-file FILE --snapshot ID --to DIR
//!                        [--include PATH]... [--preserve-special] [--json]
//! ```
//!
//! The repository is opened with [`RepositoryReader`], which creates, locks
//! exclusively, repairs and writes nothing. The key comes from `--key-file`,
//! recognised by its content: the passphrase-protected file `flotilla key
//! export` writes (the passphrase from `FLOTILLA_PASSPHRASE`, else asked on
//! the terminal), a host's enrollment bundle that carries the repository key,
//! or a fleet directory's `repo.key` (64 hex digits).
//!
//! Every snapshot record is checked against its sealed metadata with that
//! key (`SnapshotRecord::verify`): one that does not verify is listed as
//! such and never restored. A restore runs the agent's own restore engine
//! (the same checks that keep a normal restore inside its target), fetching
//! each blob from the repository directory; a damaged or missing blob fails
//! its file, not the restore.

use std::fs::{self, File};
use std::io::{self, IsTerminal, Read, Write};
use std::os::unix::ffi::OsStringExt;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant, UNIX_EPOCH};

use flotilla_protocol::repo::{
    BlobId, RepoKey, RestoreSummary, SnapshotMeta, SnapshotRecord, SnapshotVerifyError,
};
use flotilla_protocol::{text, Bundle, BundleError, TaskId, UnixMillis};
use serde::Serialize;

use crate::engine::{self, Cancel, Counters, Fetch, FetchError, Progress, RestoreOptions};
use crate::repository::{RepoError, RepositoryReader};

/// Exit code: any other failure.
pub const EXIT_FAILURE: u8 = 1;
/// Exit code: the command line asks for something impossible (no such
/// snapshot, an ambiguous prefix, a relative `--to`).
pub const EXIT_USAGE: u8 = 2;
/// Exit code: the restore finished, but some files could not be restored
/// (as `flotilla restore`).
pub const EXIT_PARTIAL: u8 = 6;
/// Exit code: stopped with Ctrl-C, as shells expect.
pub const EXIT_CANCELLED: u8 = 130;

/// The environment variable holding the key file's passphrase.
pub const PASSPHRASE_ENV: &str = "FLOTILLA_PASSPHRASE";

/// Largest `--key-file` read: the largest key file (bundles and `repo.key`
/// are a few KiB).
const MAX_KEY_FILE: u64 = flotilla_protocol::keyfile::MAX_FILE_BYTES as u64;
/// Errors of a restore shown one by one; the rest are counted.
const ERRORS_SHOWN: usize = 10;
/// Least time between two progress lines on the terminal.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

/// The flags of `flotilla-agent recover`.
#[derive(Debug, Clone, clap::Args)]
pub struct RecoverArgs {
    /// The repository directory: the storage host's `--storage` directory,
    /// or a copy of it. Only read; nothing in it is changed.
    #[arg(long, value_name = "DIR")]
    pub repo: PathBuf,
    /// The repository key: the file `flotilla key export` wrote (its
    /// passphrase from FLOTILLA_PASSPHRASE, else asked), a host's enrollment
    /// bundle that carries the repository key, or a fleet directory's
    /// `repo.key`.
    #[arg(long, value_name = "FILE")]
    pub key_file: PathBuf,
    /// List every snapshot in the repository: id, time, host, files, size,
    /// paths; snapshots that do not verify with the key are marked.
    #[arg(
        long,
        conflicts_with = "snapshot",
        required_unless_present = "snapshot"
    )]
    pub list: bool,
    /// Restore this snapshot (its id, or a prefix of it that no other
    /// snapshot shares).
    #[arg(long, value_name = "ID", requires = "to")]
    pub snapshot: Option<String>,
    /// Restore into this directory (absolute; created if missing). Each
    /// backed-up path lands below it, e.g. /home/me in DIR/home/me.
    #[arg(
        long,
        value_name = "DIR",
        requires = "snapshot",
        conflicts_with = "list"
    )]
    pub to: Option<PathBuf>,
    /// Restore only this path of the snapshot (absolute, as it was backed
    /// up; repeatable).
    #[arg(
        long = "include",
        value_name = "PATH",
        requires = "snapshot",
        conflicts_with = "list"
    )]
    pub includes: Vec<String>,
    /// Print JSON: the listing as one array, a restore's outcome as one
    /// summary line; errors as one JSON object on stderr.
    #[arg(long)]
    pub json: bool,
    /// Restoring another host's snapshot, keep what could raise privileges
    /// here (setuid/setgid bits, file capabilities, security labels, device
    /// nodes), which is otherwise left out and listed.
    #[arg(long, requires = "snapshot", conflicts_with = "list")]
    pub preserve_special: bool,
}

/// Why `recover` could not do what it was asked. Each message says what
/// happened, to what, and what to do.
#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    /// Neither `--list` nor `--snapshot` (clap checks this too).
    #[error("nothing to do: give --list, or --snapshot ID --to DIR")]
    NoAction,
    /// `--to` is relative or climbs with `..`.
    #[error("--to {path}: give an absolute path without \"..\" (e.g. /srv/recovered)")]
    TargetNotAbsolute {
        /// The path as given.
        path: PathBuf,
    },
    /// `--to` lies inside the repository, or holds it (a restore of the
    /// storage host's own paths could then land on it): recover never
    /// writes into the repository.
    #[error("--to {path} and the repository {repo} overlap (one holds the other), and recover only reads the repository: restore into a directory outside it")]
    TargetInRepository {
        /// The target.
        path: PathBuf,
        /// The repository.
        repo: PathBuf,
    },
    /// `--to` cannot be created or is not a directory.
    #[error("cannot use --to {path}: {source}; give a directory this user can create and write")]
    Target {
        /// The target.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// `--repo` holds no repository.
    #[error("{path} holds no flotilla repository (no config file): give --repo the directory the storage agent kept it in (its --storage), or a copy of that directory")]
    NotARepository {
        /// The directory.
        path: PathBuf,
    },
    /// An agent has the repository open.
    #[error("repository {path} is in use by a running flotilla-agent: stop it first (e.g. `systemctl stop flotilla-agent`), or recover from a copy")]
    InUse {
        /// The repository.
        path: PathBuf,
    },
    /// The repository cannot be read.
    #[error("cannot read the repository in {path}: {source}")]
    Repository {
        /// The repository.
        path: PathBuf,
        /// Why.
        #[source]
        source: RepoError,
    },
    /// The key file cannot be read.
    #[error("cannot read the key file {path}: {source}")]
    ReadKey {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The key file is far larger than any key.
    #[error("{path} is larger than any key file, bundle or repo.key: give the file `flotilla key export` wrote, a host's bundle, or the fleet directory's repo.key")]
    KeyTooLarge {
        /// The file.
        path: PathBuf,
    },
    /// A key file needs a passphrase and none can be had.
    #[error("{path} is protected by a passphrase: set {PASSPHRASE_ENV}, or run this in a terminal to be asked for it ({why})")]
    NoPassphrase {
        /// The key file.
        path: PathBuf,
        /// Why the terminal could not be used.
        why: String,
    },
    /// The key file does not open (a wrong passphrase, a damaged file, not
    /// a key file at all).
    #[error("cannot open the key file {path}: {source}")]
    KeyFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: flotilla_protocol::keyfile::KeyFileError,
    },
    /// The file looks like a bundle but is not a valid one.
    #[error("bundle {path} is unusable: {source}")]
    Bundle {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: BundleError,
    },
    /// A bundle made with `enroll --no-repo-key`.
    #[error("bundle {path} of host {host} carries no repository key (it was enrolled with --no-repo-key): use the key file from `flotilla key export`, another host's bundle, or the fleet directory's repo.key")]
    BundleWithoutKey {
        /// The file.
        path: PathBuf,
        /// The bundle's host.
        host: String,
    },
    /// A repository key that is not 64 hex digits.
    #[error("{path} holds no valid repository key (it must be 64 hex digits)")]
    BadKey {
        /// The file.
        path: PathBuf,
    },
    /// No snapshot opens with the key: it is another fleet's.
    #[error("none of the {count} snapshot(s) in {repo} opens with the key from {key}: it is another fleet's key (or every record is damaged); use the key of the fleet that made these backups")]
    WrongKey {
        /// Snapshots in the repository.
        count: usize,
        /// The repository.
        repo: PathBuf,
        /// Where the key came from.
        key: String,
    },
    /// `--snapshot` is not a hex prefix.
    #[error("--snapshot {prefix:?}: give a snapshot id or a prefix of it (1 to 32 hex digits); list them with --list")]
    BadPrefix {
        /// What was given.
        prefix: String,
    },
    /// No snapshot id starts with the prefix.
    #[error("no snapshot {prefix} in {repo}; list them with --list")]
    UnknownSnapshot {
        /// The prefix.
        prefix: String,
        /// The repository.
        repo: PathBuf,
    },
    /// Several snapshot ids start with the prefix.
    #[error("{count} snapshots start with {prefix} ({sample}); give more of the id")]
    Ambiguous {
        /// The prefix.
        prefix: String,
        /// How many match.
        count: usize,
        /// The first few.
        sample: String,
    },
    /// The record does not hold up against its sealed metadata.
    #[error("snapshot {id} is not restored: {source}")]
    Unverified {
        /// The snapshot.
        id: String,
        /// What verification found.
        #[source]
        source: SnapshotVerifyError,
    },
    /// The restore stopped before its end.
    #[error("restore of snapshot {id} into {target} stopped: {why}")]
    Restore {
        /// The snapshot.
        id: String,
        /// The target.
        target: PathBuf,
        /// Why.
        why: String,
    },
    /// Some files were not restored.
    #[error("finished, but {errors} file(s) or director(ies) could not be restored (listed above); the rest is in {target}")]
    Partial {
        /// How many entries failed.
        errors: u64,
        /// The target.
        target: PathBuf,
    },
    /// Stopped with Ctrl-C.
    #[error("restore cancelled: what was written so far stays in {target}; run the same command again to restore everything")]
    Cancelled {
        /// The target.
        target: PathBuf,
    },
    /// The runtime that watches for Ctrl-C cannot start.
    #[error("cannot start the runtime that watches for Ctrl-C: {0}")]
    Runtime(#[source] io::Error),
    /// The restore thread died.
    #[error("the restore crashed: {why}; run it again with -vv and report the log")]
    Crashed {
        /// The panic or join error.
        why: String,
    },
    /// Standard output cannot be written.
    #[error("cannot write to standard output: {0}")]
    Output(#[source] io::Error),
}

impl RecoverError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::NoAction
            | Self::TargetNotAbsolute { .. }
            | Self::TargetInRepository { .. }
            | Self::BadPrefix { .. }
            | Self::UnknownSnapshot { .. }
            | Self::Ambiguous { .. } => EXIT_USAGE,
            Self::Partial { .. } => EXIT_PARTIAL,
            Self::Cancelled { .. } => EXIT_CANCELLED,
            _ => EXIT_FAILURE,
        }
    }

    /// Whether running the same command again later may succeed by itself
    /// (an agent that stops, a flaky disk); everything else needs a person.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::InUse { .. } | Self::Cancelled { .. } => true,
            Self::Repository { source, .. } => source.is_retryable(),
            _ => false,
        }
    }

    /// The error for `--json`: `{"type": "error", "error", "exit_code",
    /// "retryable"}`, as `flotilla` prints them.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "type": "error",
            "error": self.to_string(),
            "exit_code": self.exit_code(),
            "retryable": self.is_retryable(),
        })
    }
}

/// Runs `flotilla-agent recover` as `args` say: prints the listing or the
/// restore's summary on stdout (warnings and progress on stderr). Ctrl-C
/// during a restore stops it cleanly ([`RecoverError::Cancelled`]); a
/// second Ctrl-C exits at once.
pub fn recover(args: &RecoverArgs) -> Result<(), RecoverError> {
    let context = Context {
        passphrase: ask_passphrase,
        hostname: this_hostname(),
        ctrl_c: true,
        progress: !args.json && io::stderr().is_terminal(),
    };
    let mut stdout = io::stdout().lock();
    run(args, &context, &mut stdout)
}

/// Gives the passphrase of the key file at the path.
type Passphrase = fn(&Path) -> Result<Vec<u8>, RecoverError>;

/// What `run` takes from the world, so that tests can give it instead.
struct Context {
    /// Gives the passphrase of a key file.
    passphrase: Passphrase,
    /// This machine's host name, to tell whether a snapshot is its own.
    hostname: Option<String>,
    /// Watch for Ctrl-C during a restore (not in tests: the handler would
    /// outlive the test in its process).
    ctrl_c: bool,
    /// Show progress on stderr.
    progress: bool,
}

/// What the flags ask for.
enum Action<'a> {
    /// `--list`.
    List,
    /// `--snapshot ID --to DIR`.
    Restore {
        /// The id or prefix.
        snapshot: &'a str,
        /// The target as given.
        to: &'a Path,
    },
}

impl<'a> Action<'a> {
    /// The action, with what clap cannot check.
    fn of(args: &'a RecoverArgs) -> Result<Self, RecoverError> {
        match (&args.snapshot, &args.to) {
            (Some(snapshot), Some(to)) => {
                if !to.is_absolute() || to.components().any(|c| c == Component::ParentDir) {
                    return Err(RecoverError::TargetNotAbsolute { path: to.clone() });
                }
                Ok(Self::Restore { snapshot, to })
            }
            _ if args.list => Ok(Self::List),
            _ => Err(RecoverError::NoAction),
        }
    }
}

/// `recover`, with the world in `context` and stdout in `out`.
fn run(args: &RecoverArgs, context: &Context, out: &mut dyn Write) -> Result<(), RecoverError> {
    let action = Action::of(args)?;
    // The repository first: a wrong --repo is said before any passphrase
    // is asked for.
    let repo = open_repository(&args.repo)?;
    let key = load_key(&args.key_file, context.passphrase)?;
    let catalogue = Catalogue::read(&repo, &key)?;
    for e in &catalogue.unreadable {
        warning(&format!("{e} (this snapshot is left out)"), args.json);
    }
    match action {
        Action::List => list(&catalogue, args.json, out),
        Action::Restore { snapshot, to } => {
            restore_snapshot(args, context, &repo, key, &catalogue, snapshot, to, out)
        }
    }
}

/// Opens the repository to read it, with messages for a person at a
/// recovery.
fn open_repository(dir: &Path) -> Result<RepositoryReader, RecoverError> {
    RepositoryReader::open(dir).map_err(|source| match source {
        RepoError::NotARepository { .. } => RecoverError::NotARepository {
            path: dir.to_path_buf(),
        },
        RepoError::Locked { .. } => RecoverError::InUse {
            path: dir.to_path_buf(),
        },
        source => RecoverError::Repository {
            path: dir.to_path_buf(),
            source,
        },
    })
}

// ---- the key ----------------------------------------------------------------

/// The repository key, and where it came from (for messages).
struct LoadedKey {
    /// The key.
    key: RepoKey,
    /// The file (and the bundle's host or the key file's fleet).
    from: String,
}

/// What a `--key-file` holds, told by its content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyFormat {
    /// A fleet directory's `repo.key`: 64 hex digits.
    Hex,
    /// An enrollment bundle (TOML with the host's certificate and the
    /// coordinator's key).
    Bundle,
    /// Anything else: the passphrase-protected file of `flotilla key export`.
    KeyFile,
}

impl KeyFormat {
    /// Tells the formats apart. A bundle is TOML with `cert` and
    /// `coordinator_key` at its top; a key file is neither hex nor that, and
    /// its own reader says whether it is one.
    fn detect(bytes: &[u8]) -> Self {
        let Ok(text) = std::str::from_utf8(bytes) else {
            return Self::KeyFile;
        };
        let trimmed = text.trim();
        if trimmed.len() == 64 && trimmed.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Self::Hex;
        }
        match toml::from_str::<toml::Table>(text) {
            Ok(table) if table.contains_key("cert") && table.contains_key("coordinator_key") => {
                Self::Bundle
            }
            _ => Self::KeyFile,
        }
    }
}

/// Reads the repository key from `path`, in whichever format it is.
fn load_key(path: &Path, passphrase: Passphrase) -> Result<LoadedKey, RecoverError> {
    let read_error = |source| RecoverError::ReadKey {
        path: path.to_path_buf(),
        source,
    };
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|f| f.take(MAX_KEY_FILE + 1).read_to_end(&mut bytes))
        .map_err(read_error)?;
    if bytes.len() as u64 > MAX_KEY_FILE {
        return Err(RecoverError::KeyTooLarge {
            path: path.to_path_buf(),
        });
    }
    let bad_key = || RecoverError::BadKey {
        path: path.to_path_buf(),
    };
    match KeyFormat::detect(&bytes) {
        KeyFormat::Hex => {
            // `detect` found UTF-8 hex, so the text is there.
            let text = String::from_utf8_lossy(&bytes);
            let key = RepoKey::from_hex(text.trim()).ok_or_else(bad_key)?;
            Ok(LoadedKey {
                key,
                from: path.display().to_string(),
            })
        }
        KeyFormat::Bundle => {
            let text = String::from_utf8_lossy(&bytes);
            let bundle = Bundle::parse(&text).map_err(|source| RecoverError::Bundle {
                path: path.to_path_buf(),
                source,
            })?;
            let hex = bundle
                .repo_key
                .as_deref()
                .ok_or_else(|| RecoverError::BundleWithoutKey {
                    path: path.to_path_buf(),
                    host: bundle.host.to_string(),
                })?;
            let key = RepoKey::from_hex(hex).ok_or_else(bad_key)?;
            Ok(LoadedKey {
                key,
                from: format!("{} (bundle of {})", path.display(), bundle.host),
            })
        }
        KeyFormat::KeyFile => {
            let secret = passphrase(path)?;
            let key_file_error = |source| RecoverError::KeyFile {
                path: path.to_path_buf(),
                source,
            };
            let body = flotilla_protocol::keyfile::open(&bytes, &secret).map_err(key_file_error)?;
            let key = body.repo_key().map_err(key_file_error)?;
            Ok(LoadedKey {
                key,
                from: format!("{} (fleet {})", path.display(), body.fleet_id),
            })
        }
    }
}

/// The key file's passphrase: `FLOTILLA_PASSPHRASE` when set, else asked
/// on the terminal without echo.
fn ask_passphrase(path: &Path) -> Result<Vec<u8>, RecoverError> {
    if let Some(secret) = std::env::var_os(PASSPHRASE_ENV) {
        return Ok(secret.into_vec());
    }
    // As `flotilla key import`: only a person at a terminal is asked. A
    // script (stdin redirected) gets the error at once, never a prompt on
    // the controlling terminal that nobody answers.
    if !io::stdin().is_terminal() {
        return Err(RecoverError::NoPassphrase {
            path: path.to_path_buf(),
            why: "standard input is not a terminal".into(),
        });
    }
    rpassword::prompt_password(format!("Passphrase of the key file {}: ", path.display()))
        .map(String::into_bytes)
        .map_err(|e| RecoverError::NoPassphrase {
            path: path.to_path_buf(),
            why: format!("cannot read it from the terminal: {e}"),
        })
}

// ---- the snapshots ----------------------------------------------------------

/// One snapshot record, and what the key says of it.
struct Entry {
    /// The record as stored.
    record: SnapshotRecord,
    /// Its sealed metadata, or why the record is not to be trusted.
    verdict: Result<SnapshotMeta, SnapshotVerifyError>,
}

/// Every snapshot of the repository, checked with the key.
struct Catalogue {
    /// Readable records, by time then id.
    entries: Vec<Entry>,
    /// Snapshot files that do not read.
    unreadable: Vec<RepoError>,
}

impl Catalogue {
    /// Reads and verifies every snapshot record. Fails when there are some
    /// and not one opens with the key: the key is another fleet's.
    fn read(repo: &RepositoryReader, key: &LoadedKey) -> Result<Self, RecoverError> {
        let files = repo
            .snapshot_files()
            .map_err(|source| RecoverError::Repository {
                path: repo.dir().to_path_buf(),
                source,
            })?;
        let mut entries = Vec::new();
        let mut unreadable = Vec::new();
        for file in files {
            match file {
                Ok(record) => {
                    let verdict = record.verify(&key.key);
                    entries.push(Entry { record, verdict });
                }
                Err(e) => unreadable.push(e),
            }
        }
        entries.sort_by(|a, b| (a.record.time, &a.record.id).cmp(&(b.record.time, &b.record.id)));
        let sealed = |e: &Entry| matches!(e.verdict, Err(SnapshotVerifyError::Sealed { .. }));
        if !entries.is_empty() && entries.iter().all(sealed) {
            return Err(RecoverError::WrongKey {
                count: entries.len(),
                repo: repo.dir().to_path_buf(),
                key: key.from.clone(),
            });
        }
        Ok(Self {
            entries,
            unreadable,
        })
    }

    /// The id of the one snapshot file whose id starts with `prefix`.
    fn resolve(repo: &RepositoryReader, prefix: &str) -> Result<String, RecoverError> {
        let wanted = prefix.trim().to_ascii_lowercase();
        if wanted.is_empty() || wanted.len() > 32 || !wanted.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(RecoverError::BadPrefix {
                prefix: prefix.chars().take(80).collect(),
            });
        }
        let ids = repo
            .snapshot_ids()
            .map_err(|source| RecoverError::Repository {
                path: repo.dir().to_path_buf(),
                source,
            })?;
        let mut hits: Vec<String> = ids
            .into_iter()
            .filter(|id| id.starts_with(&wanted))
            .collect();
        match hits.len() {
            0 => Err(RecoverError::UnknownSnapshot {
                prefix: wanted,
                repo: repo.dir().to_path_buf(),
            }),
            1 => Ok(hits.remove(0)),
            count => Err(RecoverError::Ambiguous {
                prefix: wanted,
                count,
                sample: format!(
                    "{}{}",
                    hits.iter()
                        .take(5)
                        .map(String::as_str)
                        .collect::<Vec<_>>()
                        .join(", "),
                    if count > 5 { ", …" } else { "" }
                ),
            }),
        }
    }
}

/// A snapshot as `--list --json` shows it; the fields of `flotilla
/// snapshots --json` (less the storage host), plus whether it verified.
#[derive(Debug, Serialize)]
struct SnapshotView<'a> {
    /// The full id.
    id: &'a str,
    /// When the backup started, RFC 3339 UTC.
    time: String,
    /// The host whose files these are.
    host: &'a str,
    /// Some files could not be read at backup.
    partial: bool,
    /// The backed-up paths (empty when not verified).
    paths: Vec<String>,
    /// Files in the snapshot.
    files: Option<u64>,
    /// Their total size.
    bytes_total: Option<u64>,
    /// What the backup added to the repository.
    bytes_added: Option<u64>,
    /// The task that made it.
    task_id: Option<&'a TaskId>,
    /// Whether the record verified with the key; only then can it be restored.
    verified: bool,
    /// Why it did not.
    problem: Option<String>,
}

impl<'a> SnapshotView<'a> {
    /// The view of one entry; only what verified is shown of its meta.
    fn of(entry: &'a Entry) -> Self {
        let meta = entry.verdict.as_ref().ok();
        SnapshotView {
            id: &entry.record.id,
            time: rfc3339(entry.record.time),
            host: entry.record.host.as_str(),
            partial: entry.record.partial,
            paths: meta.map(|m| m.paths.clone()).unwrap_or_default(),
            files: meta.map(file_count),
            bytes_total: meta.map(|m| m.summary.bytes_total),
            bytes_added: meta.map(|m| m.summary.bytes_added),
            task_id: meta.map(|m| &m.task_id),
            verified: meta.is_some(),
            problem: entry.verdict.as_ref().err().map(ToString::to_string),
        }
    }
}

/// Files in a snapshot, from its backup's counters.
fn file_count(meta: &SnapshotMeta) -> u64 {
    meta.summary.files_new + meta.summary.files_changed + meta.summary.files_unchanged
}

/// `--list`: a table by time, or one JSON array.
fn list(catalogue: &Catalogue, json: bool, out: &mut dyn Write) -> Result<(), RecoverError> {
    let views: Vec<SnapshotView<'_>> = catalogue.entries.iter().map(SnapshotView::of).collect();
    if json {
        let text = serde_json::to_string_pretty(&views).unwrap_or_else(|_| "[]".into());
        return emit(out, &text);
    }
    if views.is_empty() {
        return emit(out, "no snapshots");
    }
    let rows = catalogue
        .entries
        .iter()
        .zip(&views)
        .map(|(entry, view)| {
            let unknown = || "?".to_owned();
            let paths = match &entry.verdict {
                Ok(_) => format!(
                    "{}{}",
                    view.paths.join(" "),
                    if view.partial { "  [partial]" } else { "" }
                ),
                Err(SnapshotVerifyError::Sealed { .. }) => {
                    "(does not open with this key: another fleet's, or damaged; not restorable)"
                        .to_owned()
                }
                Err(SnapshotVerifyError::Tampered { .. }) => {
                    "(record altered since the backup: not trusted, not restorable)".to_owned()
                }
            };
            vec![
                short(view.id),
                when(entry.record.time),
                view.host.to_owned(),
                view.files.map_or_else(unknown, |n| n.to_string()),
                view.bytes_total.map_or_else(unknown, text::bytes),
                paths,
            ]
        })
        .collect();
    for line in table(
        &["ID", "TIME", "HOST", "FILES", "SIZE", "PATHS"],
        &[3, 4],
        rows,
    ) {
        emit(out, &line)?;
    }
    Ok(())
}

// ---- restoring --------------------------------------------------------------

/// `--snapshot ID --to DIR`.
#[allow(clippy::too_many_arguments)]
fn restore_snapshot(
    args: &RecoverArgs,
    context: &Context,
    repo: &RepositoryReader,
    key: LoadedKey,
    catalogue: &Catalogue,
    prefix: &str,
    to: &Path,
    out: &mut dyn Write,
) -> Result<(), RecoverError> {
    let id = Catalogue::resolve(repo, prefix)?;
    let Some(entry) = catalogue.entries.iter().find(|e| e.record.id == id) else {
        // Listed among the files, but it did not read: say why.
        let source = match repo.snapshot(&id) {
            Err(e) => e,
            // Readable after all (written meanwhile?): the listing is stale.
            Ok(_) => RepoError::NotFound {
                what: format!("snapshot {id} (it appeared while recover ran; run it again)"),
            },
        };
        return Err(RecoverError::Repository {
            path: repo.dir().to_path_buf(),
            source,
        });
    };
    let meta = entry
        .verdict
        .as_ref()
        .map_err(|e| RecoverError::Unverified {
            id: id.clone(),
            source: e.clone(),
        })?;
    let target = prepare_target(to, repo.dir())?;
    let record = &entry.record;
    let own = context
        .hostname
        .as_deref()
        .is_some_and(|h| same_host(h, record.host.as_str()));
    // Another host's snapshot may carry what would raise privileges here,
    // as in a normal restore (`jobs/restore.rs`).
    let strip_special = !args.preserve_special && !own;
    let opts = RestoreOptions {
        target: target.clone(),
        includes: args.includes.clone(),
        // Applied only when running as root (the engine checks).
        restore_owner: true,
        strip_special,
    };
    if !args.json {
        eprintln!(
            "restoring snapshot {} of {} ({}, {} files) into {}",
            short(&id),
            record.host,
            when(record.time),
            file_count(meta),
            target.display()
        );
    }
    let started = Instant::now();
    let cancel = Cancel::default();
    let mut fetch = RepoFetch { repo: repo.clone() };
    let tree = record.tree;
    let show = context.progress;
    // `mut`: the closure borrows its fetcher mutably, so calling it in
    // place (the branch without Ctrl-C) needs it so.
    let mut work = {
        let cancel = cancel.clone();
        move || {
            let mut progress = Shown::new(show);
            let result =
                engine::restore(&tree, &key.key, &mut fetch, &opts, &mut progress, &cancel);
            progress.finish();
            result
        }
    };
    let result = if context.ctrl_c {
        cancellable(&cancel, work)?
    } else {
        work()
    };
    let summary = match result {
        Ok(summary) => summary,
        Err(_) if cancel.is_cancelled() => return Err(RecoverError::Cancelled { target }),
        Err(e) => {
            return Err(RecoverError::Restore {
                id,
                target,
                why: e.to_string(),
            })
        }
    };
    report(
        &summary,
        record,
        &target,
        context.hostname.as_deref(),
        started.elapsed(),
        args.json,
        out,
    )?;
    if summary.errors > 0 {
        return Err(RecoverError::Partial {
            errors: summary.errors,
            target,
        });
    }
    Ok(())
}

/// Checks `--to` and creates it: absolute, outside the repository (which is
/// only read), a directory. Returns it canonical.
fn prepare_target(to: &Path, repo: &Path) -> Result<PathBuf, RecoverError> {
    let target_error = |source| RecoverError::Target {
        path: to.to_path_buf(),
        source,
    };
    let repo = fs::canonicalize(repo).map_err(target_error)?;
    let inside = |path: &Path| RecoverError::TargetInRepository {
        path: path.to_path_buf(),
        repo: repo.clone(),
    };
    // Where it will be, before anything is created: the deepest existing
    // ancestor resolved (symlinks included), the rest plain names.
    let mut existing = to.to_path_buf();
    let mut rest = Vec::new();
    while fs::symlink_metadata(&existing).is_err() {
        let Some(name) = existing.file_name() else {
            break;
        };
        rest.push(name.to_owned());
        if !existing.pop() {
            break;
        }
    }
    let mut planned = fs::canonicalize(&existing).map_err(target_error)?;
    planned.extend(rest.iter().rev());
    if planned.starts_with(&repo) || repo.starts_with(&planned) {
        return Err(inside(to));
    }
    fs::create_dir_all(to).map_err(target_error)?;
    let target = fs::canonicalize(to).map_err(target_error)?;
    if target.starts_with(&repo) || repo.starts_with(&target) {
        return Err(inside(to));
    }
    // Whether it is a directory the restore engine checks first thing.
    Ok(target)
}

/// Runs `work` on a blocking thread while Ctrl-C sets `cancel`; a second
/// Ctrl-C exits at once with [`EXIT_CANCELLED`].
fn cancellable<T: Send + 'static>(
    cancel: &Cancel,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, RecoverError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(RecoverError::Runtime)?;
    runtime.block_on(async {
        // Owned here and aborted once the work is done.
        let watcher = tokio::spawn(cancel_on_ctrl_c(cancel.clone()));
        let done = tokio::task::spawn_blocking(work).await;
        watcher.abort();
        done.map_err(|e| RecoverError::Crashed { why: e.to_string() })
    })
}

/// Sets `cancel` at the first Ctrl-C, exits at the second.
async fn cancel_on_ctrl_c(cancel: Cancel) {
    if tokio::signal::ctrl_c().await.is_err() {
        return;
    }
    eprintln!("\nflotilla-agent: stopping the restore cleanly (Ctrl-C again stops at once)");
    cancel.cancel();
    if tokio::signal::ctrl_c().await.is_ok() {
        std::process::exit(i32::from(EXIT_CANCELLED));
    }
}

/// Blobs read straight from the repository directory.
struct RepoFetch {
    /// The repository, opened to read.
    repo: RepositoryReader,
}

impl Fetch for RepoFetch {
    fn get(&mut self, ids: &[BlobId]) -> Result<Vec<Vec<u8>>, FetchError> {
        ids.iter()
            .map(|id| {
                self.repo
                    .read_blob(id)
                    .map(|(_kind, sealed)| sealed)
                    // Never retryable: asking the same disk again gives the
                    // same answer, so a damaged or missing blob fails the
                    // file that needs it and the restore goes on.
                    .map_err(|e| FetchError {
                        message: e.to_string(),
                        retryable: false,
                    })
            })
            .collect()
    }
}

/// Progress on stderr, a line rewritten in place at most four times a
/// second; nothing when not shown.
struct Shown {
    /// Whether to show anything (stderr is a terminal, no `--json`).
    show: bool,
    /// When the line was last drawn.
    last: Option<Instant>,
    /// Whether a line was drawn, to be ended at the finish.
    drawn: bool,
}

impl Shown {
    /// Progress shown when `show`.
    fn new(show: bool) -> Self {
        Self {
            show,
            last: None,
            drawn: false,
        }
    }

    /// Ends the progress line, if one was drawn.
    fn finish(&mut self) {
        if self.drawn {
            eprintln!();
        }
    }
}

impl Progress for Shown {
    fn update(&mut self, counters: &Counters, _current: &Path) {
        if !self.show || self.last.is_some_and(|t| t.elapsed() < PROGRESS_EVERY) {
            return;
        }
        self.last = Some(Instant::now());
        self.drawn = true;
        eprint!(
            "\r  {} files, {} dirs, {}   ",
            counters.files,
            counters.dirs,
            text::bytes(counters.bytes)
        );
    }
}

/// Prints what a restore did, as `flotilla restore --wait` does.
fn report(
    summary: &RestoreSummary,
    record: &SnapshotRecord,
    target: &Path,
    hostname: Option<&str>,
    took: Duration,
    json: bool,
    out: &mut dyn Write,
) -> Result<(), RecoverError> {
    if json {
        let line = serde_json::json!({
            "type": "summary",
            "snapshot": record.id,
            "host": record.host.as_str(),
            "target": target.display().to_string(),
            "outcome": if summary.errors > 0 { "partial" } else { "succeeded" },
            "duration_ms": u64::try_from(took.as_millis()).unwrap_or(u64::MAX),
            "restore": serde_json::to_value(summary).unwrap_or_default(),
        });
        return emit(out, &line.to_string());
    }
    emit(
        out,
        &format!(
            "restored {} files, {} dirs, {} symlinks, {} hard links, {} into {} in {:.1}s",
            summary.files,
            summary.dirs,
            summary.symlinks,
            summary.hardlinks,
            text::bytes(summary.bytes),
            target.display(),
            took.as_secs_f64()
        ),
    )?;
    let stripped = &summary.stripped;
    if !stripped.is_empty() {
        emit(
            out,
            &format!(
                "  left out, as the snapshot is {}'s and this machine is {} (--preserve-special keeps them): {} setuid/setgid file(s), {} file capabilit(ies), {} file(s) with security labels, {} device node(s)",
                record.host,
                hostname.unwrap_or("of unknown name"),
                stripped.setid,
                stripped.capabilities,
                stripped.labels,
                stripped.devices
            ),
        )?;
        for s in &stripped.samples {
            emit(out, &format!("    {s}"))?;
        }
    }
    for e in summary.error_samples.iter().take(ERRORS_SHOWN) {
        emit(out, &format!("  error: {e}"))?;
    }
    let shown = summary.error_samples.len().min(ERRORS_SHOWN) as u64;
    if summary.errors > shown {
        emit(out, &format!("  … and {} more", summary.errors - shown))?;
    }
    Ok(())
}

/// This machine's host name, from the kernel.
fn this_hostname() -> Option<String> {
    let name = fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = name.trim();
    (!name.is_empty()).then(|| name.to_owned())
}

/// Whether the machine named `machine` is the fleet host `host`: the fleet
/// names a host by its short name, whatever the case.
fn same_host(machine: &str, host: &str) -> bool {
    let short = machine.split('.').next().unwrap_or(machine);
    short.eq_ignore_ascii_case(host) || machine.eq_ignore_ascii_case(host)
}

// ---- output -----------------------------------------------------------------

/// Writes one line to stdout. A closed pipe (`| head`) ends the output
/// quietly.
fn emit(out: &mut dyn Write, line: &str) -> Result<(), RecoverError> {
    match writeln!(out, "{line}") {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(RecoverError::Output(e)),
    }
}

/// A warning on stderr: a line, or a JSON object with `--json` so that
/// stdout keeps its shape.
fn warning(message: &str, json: bool) {
    if json {
        eprintln!(
            "{}",
            serde_json::json!({"type": "warning", "message": message})
        );
    } else {
        eprintln!("warning: {message}");
    }
}

/// The first 8 characters of an id. Ids come from the repository: this
/// never slices bytes.
fn short(id: &str) -> String {
    id.chars().take(8).collect()
}

/// 9999-12-31T23:59:59.999Z, the last instant RFC 3339 can write.
const LAST_MS: UnixMillis = 253_402_300_799_999;

/// RFC 3339 in UTC with milliseconds, as every `--json` of `flotilla`; a
/// time past year 9999 (a damaged record) as raw milliseconds.
fn rfc3339(ms: UnixMillis) -> String {
    if ms > LAST_MS {
        return format!("@{ms}ms");
    }
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// A time for people, to the second in UTC (`2026-03-01 15:00:00 UTC`): the
/// agent does not carry the time zone database.
fn when(ms: UnixMillis) -> String {
    if ms > LAST_MS {
        return format!("@{ms}ms");
    }
    let text =
        humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string();
    format!("{} UTC", text.replacen('T', " ", 1).trim_end_matches('Z'))
}

/// Rows under a header, each column as wide as its widest cell, two spaces
/// apart; the columns in `right` right-aligned. Lines have no trailing
/// spaces. (The same layout as `flotilla`'s tables.)
fn table(header: &[&str], right: &[usize], rows: Vec<Vec<String>>) -> Vec<String> {
    let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    std::iter::once(&header)
        .chain(&rows)
        .map(|row| {
            let mut line = String::new();
            for (i, (cell, width)) in row.iter().zip(&widths).enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                let pad = width.saturating_sub(cell.chars().count());
                if right.contains(&i) {
                    line.extend(std::iter::repeat_n(' ', pad));
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            line.trim_end().to_owned()
        })
        .collect()
}

#[cfg(test)]
mod tests;
