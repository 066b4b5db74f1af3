//! The fleet key file: the secrets of a fleet directory in one
//! passphrase-protected file, so that a fleet whose coordinator is lost can
//! be rebuilt (`flotilla key import`) and its backups read without it.
//!
//! `flotilla key export` reads the files and writes the result; this module
//! only seals and opens, and the caller supplies the random salt and nonce,
//! so it stays pure. The file is text a person can recognise and print:
//!
//! ```text
//! # Flotilla fleet key file (version 1). Keep it safe; it opens every backup of fleet 3f2a9c0d1e2b4a5f.
//! flotilla-keyfile v1 argon2id m=65536 t=3 p=1 salt=<base64, 16 bytes> nonce=<base64, 12 bytes>
//! <base64 of the sealed body, 76 columns a line>
//! ```
//!
//! The passphrase and the salt make a 32-byte key with Argon2id (version
//! 0x13; `m` KiB of memory, `t` passes, `p` lanes). The body, a
//! [`KeyFileBody`] in MessagePack with named fields, is sealed with
//! AES-256-GCM under that key and the nonce, with the first two lines
//! (joined by one `\n`) as associated data: changing a parameter, the salt,
//! the nonce or the fleet the first line names fails authentication exactly
//! as a wrong passphrase does. The parameters are bounded
//! ([`KdfParams::check`]) before any key derivation, so a crafted file
//! cannot make opening it take gigabytes of memory or minutes.

use std::collections::BTreeSet;
use std::fmt;

use argon2::{Algorithm, Argon2, Params as Argon2Params, Version};
use data_encoding::BASE64;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use serde::{Deserialize, Serialize};

use crate::codec::{self, DecodeError};
use crate::repo::RepoKey;

/// Version of the key file format (the header's `v1`) and of [`KeyFileBody`].
pub const KEYFILE_VERSION: u16 = 1;
/// Most files one key file holds.
pub const MAX_ENTRIES: usize = 4096;
/// Most bytes (file contents and paths) one key file holds.
pub const MAX_TOTAL_BYTES: usize = 16 * 1024 * 1024;
/// Longest path of one entry, in bytes.
pub const MAX_PATH_BYTES: usize = 1024;
/// Largest key file [`open`] reads: the base64 of the largest body, its line
/// ends and the two header lines, with room to spare.
pub const MAX_FILE_BYTES: usize = 24 * 1024 * 1024;
/// The entry holding the repository master key, as `flotilla init` writes it
/// (64 hex digits and a newline).
pub const REPO_KEY_PATH: &str = "repo.key";
/// Bytes of salt in the header.
pub const SALT_LEN: usize = 16;
/// Bytes of AES-256-GCM nonce in the header.
pub const NONCE_LEN: usize = 12;

/// Largest encoded body: the entries' bytes plus their framing (about 40
/// bytes per entry at most).
const MAX_BODY_BYTES: usize = MAX_TOTAL_BYTES + 1024 * 1024;
/// [`MAX_TOTAL_BYTES`] in MiB, for messages.
const MAX_TOTAL_MIB: usize = MAX_TOTAL_BYTES / (1024 * 1024);
/// Bytes of the derived key (AES-256).
const KEY_LEN: usize = 32;
/// The header line's first word.
const MAGIC: &str = "flotilla-keyfile";
/// How the first line starts, whatever the version.
const COMMENT_PREFIX: &str = "# Flotilla fleet key file";
/// Base64 characters per body line, as in MIME.
const LINE_WIDTH: usize = 76;
/// Longest fleet id (ids `flotilla init` makes have 16 characters).
const MAX_FLEET_ID: usize = 64;

/// A key file that cannot be made or opened. Never retryable: the same
/// bytes and passphrase fail the same way.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyFileError {
    /// The bytes are not a fleet key file at all (what was found instead).
    #[error("not a Flotilla fleet key file: {0}; give the file `flotilla key export` wrote")]
    NotAKeyFile(String),
    /// A key file of another format version.
    #[error("key file format version {0} is not one this flotilla reads (it reads version {KEYFILE_VERSION}); open it with the flotilla that wrote it, or a newer one")]
    UnsupportedVersion(u16),
    /// Key derivation parameters out of bounds or unknown.
    #[error("the key file's key derivation parameters are refused ({0}); the file was not written by `flotilla key export` or was edited: use another copy")]
    BadParams(String),
    /// Authentication failed: the passphrase is not the one the file was
    /// sealed with, or a byte of the file changed since.
    #[error("wrong passphrase, or the file was changed: try the passphrase again (check FLOTILLA_PASSPHRASE if it is set), or use another copy of the key file")]
    WrongPassphrase,
    /// The file or its content breaks a rule (why).
    #[error("the key file is not valid: {0}")]
    Invalid(String),
    /// More than [`MAX_ENTRIES`] files or [`MAX_TOTAL_BYTES`] in all.
    #[error("too large for a fleet key file (at most {MAX_ENTRIES} files and {MAX_TOTAL_MIB} MiB in all): move large files that are not the fleet's out of the fleet directory, or check that this is a key file")]
    TooLarge,
}

/// One file of the fleet directory.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyFileEntry {
    /// Path relative to the fleet directory, `/`-separated (`nats/account.nk`).
    pub path: String,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// The file's bytes.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

impl fmt::Debug for KeyFileEntry {
    /// Never the content: most entries are secret keys.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyFileEntry")
            .field("path", &self.path)
            .field("mode", &format_args!("{:o}", self.mode))
            .field("len", &self.data.len())
            .finish_non_exhaustive()
    }
}

/// What a key file holds: every file of a fleet directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyFileBody {
    /// Schema version, [`KEYFILE_VERSION`].
    pub v: u16,
    /// The fleet's id (`fleet.toml`'s `id`).
    pub fleet_id: String,
    /// When it was exported (RFC 3339).
    pub exported_at: String,
    /// The files.
    pub entries: Vec<KeyFileEntry>,
}

impl KeyFileBody {
    /// The entry at `path` (relative, `/`-separated), if there is one.
    pub fn entry(&self, path: &str) -> Option<&KeyFileEntry> {
        self.entries.iter().find(|e| e.path == path)
    }

    /// The repository key, from the entry [`REPO_KEY_PATH`] (hex, as
    /// `flotilla init` writes it).
    pub fn repo_key(&self) -> Result<RepoKey, KeyFileError> {
        let entry = self.entry(REPO_KEY_PATH).ok_or_else(|| {
            KeyFileError::Invalid(format!(
                "it holds no {REPO_KEY_PATH}, so it cannot read backups; export again from the whole fleet directory"
            ))
        })?;
        std::str::from_utf8(&entry.data)
            .ok()
            .and_then(|text| RepoKey::from_hex(text.trim()))
            .ok_or_else(|| {
                KeyFileError::Invalid(format!("its {REPO_KEY_PATH} is not 64 hex digits"))
            })
    }

    /// Checks what [`seal`] and [`open`] require: this version, a plain
    /// fleet id, at most [`MAX_ENTRIES`] entries and [`MAX_TOTAL_BYTES`] in
    /// all, each path relative and inside the fleet directory (no `/` at the
    /// start, no `.`, `..` or empty component, no NUL, at most
    /// [`MAX_PATH_BYTES`]), each path once and never both a file and the
    /// directory of another, and modes that are permission bits only.
    pub fn validate(&self) -> Result<(), KeyFileError> {
        if self.v != KEYFILE_VERSION {
            return Err(KeyFileError::UnsupportedVersion(self.v));
        }
        check_fleet_id(&self.fleet_id)?;
        if self.entries.len() > MAX_ENTRIES {
            return Err(KeyFileError::TooLarge);
        }
        let mut total: usize = 0;
        let mut seen = BTreeSet::new();
        for entry in &self.entries {
            check_path(&entry.path)?;
            if entry.mode & !0o7777 != 0 {
                return Err(KeyFileError::Invalid(format!(
                    "entry {:?} has mode {:o}, which is more than permission bits",
                    entry.path, entry.mode
                )));
            }
            total = total
                .saturating_add(entry.data.len())
                .saturating_add(entry.path.len());
            if total > MAX_TOTAL_BYTES {
                return Err(KeyFileError::TooLarge);
            }
            if !seen.insert(entry.path.as_str()) {
                return Err(KeyFileError::Invalid(format!(
                    "entry {:?} is there twice",
                    entry.path
                )));
            }
        }
        for path in seen.iter().copied() {
            for (at, _) in path.match_indices('/') {
                let parent = &path[..at];
                if seen.contains(parent) {
                    return Err(KeyFileError::Invalid(format!(
                        "entry {parent:?} is a file and also the directory of {path:?}"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// The cost of deriving the key from the passphrase (Argon2id).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KdfParams {
    /// Memory, KiB.
    pub m_kib: u32,
    /// Passes over the memory.
    pub t: u32,
    /// Lanes.
    pub p: u32,
}

impl KdfParams {
    /// What `flotilla key export` uses: 64 MiB, 3 passes, 1 lane (under a
    /// second on a small machine, costly to guess at scale).
    pub const DEFAULT: KdfParams = KdfParams {
        m_kib: 65536,
        t: 3,
        p: 1,
    };
    /// Least memory accepted, KiB.
    pub const MIN_M_KIB: u32 = 8192;
    /// Most memory accepted, KiB (256 MiB: a Raspberry Pi opens any file this accepts).
    pub const MAX_M_KIB: u32 = 256 * 1024;
    /// Most passes accepted (at least 1).
    pub const MAX_T: u32 = 10;
    /// Most lanes accepted (at least 1).
    pub const MAX_P: u32 = 4;

    /// Refuses parameters outside the bounds, so that neither a mistake nor
    /// a crafted file makes the derivation take gigabytes or minutes.
    pub fn check(&self) -> Result<(), KeyFileError> {
        if !(Self::MIN_M_KIB..=Self::MAX_M_KIB).contains(&self.m_kib) {
            return Err(KeyFileError::BadParams(format!(
                "memory m={} KiB is outside {}..={}",
                self.m_kib,
                Self::MIN_M_KIB,
                Self::MAX_M_KIB
            )));
        }
        if !(1..=Self::MAX_T).contains(&self.t) {
            return Err(KeyFileError::BadParams(format!(
                "passes t={} is outside 1..={}",
                self.t,
                Self::MAX_T
            )));
        }
        if !(1..=Self::MAX_P).contains(&self.p) {
            return Err(KeyFileError::BadParams(format!(
                "lanes p={} is outside 1..={}",
                self.p,
                Self::MAX_P
            )));
        }
        Ok(())
    }
}

impl Default for KdfParams {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Seals `body` into a key file's bytes under `passphrase`. The caller
/// gives fresh random `salt` and `nonce` for every file.
pub fn seal(
    body: &KeyFileBody,
    passphrase: &[u8],
    params: KdfParams,
    salt: [u8; SALT_LEN],
    nonce: [u8; NONCE_LEN],
) -> Result<Vec<u8>, KeyFileError> {
    body.validate()?;
    seal_unchecked(body, passphrase, params, salt, nonce)
}

/// [`seal`] without [`KeyFileBody::validate`] (tests make hostile files
/// with it).
fn seal_unchecked(
    body: &KeyFileBody,
    passphrase: &[u8],
    params: KdfParams,
    salt: [u8; SALT_LEN],
    nonce: [u8; NONCE_LEN],
) -> Result<Vec<u8>, KeyFileError> {
    params.check()?;
    let mut sealed = codec::encode(body).map_err(|e| KeyFileError::Invalid(e.to_string()))?;
    if sealed.len() > MAX_BODY_BYTES {
        return Err(KeyFileError::TooLarge);
    }
    let comment = comment_line(&body.fleet_id);
    let header = format!(
        "{MAGIC} v{KEYFILE_VERSION} argon2id m={} t={} p={} salt={} nonce={}",
        params.m_kib,
        params.t,
        params.p,
        BASE64.encode(&salt),
        BASE64.encode(&nonce)
    );
    let key = derive_key(passphrase, params, &salt)?;
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(associated_data(&comment, &header).as_slice()),
        &mut sealed,
    )
    // Sealing fails only for a plaintext near 64 GiB.
    .map_err(|_| KeyFileError::TooLarge)?;
    let encoded = BASE64.encode(&sealed);
    let mut out = Vec::with_capacity(
        comment.len() + header.len() + encoded.len() + encoded.len() / LINE_WIDTH + 3,
    );
    for line in [comment.as_bytes(), header.as_bytes()] {
        out.extend_from_slice(line);
        out.push(b'\n');
    }
    for line in encoded.as_bytes().chunks(LINE_WIDTH) {
        out.extend_from_slice(line);
        out.push(b'\n');
    }
    Ok(out)
}

/// Opens a key file with `passphrase`: checks its size, its header and the
/// bounds of its parameters before deriving the key, then authenticates,
/// decodes and validates the body. Line ends may be `\n` or `\r\n`.
pub fn open(file: &[u8], passphrase: &[u8]) -> Result<KeyFileBody, KeyFileError> {
    if file.len() > MAX_FILE_BYTES {
        return Err(KeyFileError::TooLarge);
    }
    let text = std::str::from_utf8(file)
        .map_err(|_| KeyFileError::NotAKeyFile("it is binary data, not text".into()))?;
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let comment = lines.next().unwrap_or_default();
    if !comment.starts_with(COMMENT_PREFIX) {
        return Err(KeyFileError::NotAKeyFile(format!(
            "its first line is {:?}",
            excerpt(comment)
        )));
    }
    let header = lines.next().unwrap_or_default();
    let parsed = parse_header(header)?;
    let base64: Vec<u8> = lines.flat_map(|l| l.trim().bytes()).collect();
    let mut sealed = BASE64.decode(&base64).map_err(|e| {
        KeyFileError::Invalid(format!(
            "its body is not base64 ({e}): the file is damaged; use another copy"
        ))
    })?;
    if sealed.len() < AES_256_GCM.tag_len() {
        return Err(KeyFileError::Invalid(
            "its body is too short: the file is cut off; use another copy".into(),
        ));
    }
    let key = derive_key(passphrase, parsed.params, &parsed.salt)?;
    let plain = key
        .open_in_place(
            Nonce::assume_unique_for_key(parsed.nonce),
            Aad::from(associated_data(comment, header).as_slice()),
            &mut sealed,
        )
        .map_err(|_| KeyFileError::WrongPassphrase)?;
    let body: KeyFileBody = codec::decode(plain, MAX_BODY_BYTES).map_err(|e| match e {
        DecodeError::TooLarge { .. } => KeyFileError::TooLarge,
        e => KeyFileError::Invalid(format!("its sealed body does not decode: {e}")),
    })?;
    if body.v != KEYFILE_VERSION {
        return Err(KeyFileError::UnsupportedVersion(body.v));
    }
    // Authenticated, so only a faulty writer makes these differ.
    if comment != comment_line(&body.fleet_id) {
        return Err(KeyFileError::Invalid(
            "its first line names another fleet than the one it holds".into(),
        ));
    }
    body.validate()?;
    Ok(body)
}

/// The parsed header line.
struct Header {
    params: KdfParams,
    salt: [u8; SALT_LEN],
    nonce: [u8; NONCE_LEN],
}

/// The first line: a comment for people, authenticated like the header.
fn comment_line(fleet_id: &str) -> String {
    format!(
        "{COMMENT_PREFIX} (version {KEYFILE_VERSION}). Keep it safe; it opens every backup of fleet {fleet_id}."
    )
}

/// The AEAD's associated data: both first lines as written.
fn associated_data(comment: &str, header: &str) -> Vec<u8> {
    format!("{comment}\n{header}").into_bytes()
}

/// Parses `flotilla-keyfile v1 argon2id m=.. t=.. p=.. salt=.. nonce=..`
/// and checks the parameters' bounds.
fn parse_header(line: &str) -> Result<Header, KeyFileError> {
    let mut words = line.split_ascii_whitespace();
    if words.next() != Some(MAGIC) {
        return Err(KeyFileError::NotAKeyFile(format!(
            "its second line is {:?}, not a `{MAGIC}` header",
            excerpt(line)
        )));
    }
    let version = words.next().unwrap_or_default();
    match version.strip_prefix('v').map(str::parse::<u16>) {
        Some(Ok(KEYFILE_VERSION)) => {}
        Some(Ok(other)) => return Err(KeyFileError::UnsupportedVersion(other)),
        _ => {
            return Err(KeyFileError::Invalid(format!(
                "its header's version {:?} is not `v` and a number",
                excerpt(version)
            )))
        }
    }
    let kdf = words.next().unwrap_or_default();
    if kdf != "argon2id" {
        return Err(KeyFileError::BadParams(format!(
            "key derivation {:?} is not argon2id",
            excerpt(kdf)
        )));
    }
    let (mut m, mut t, mut p, mut salt, mut nonce) = (None, None, None, None, None);
    for word in words {
        let (name, value) = word.split_once('=').ok_or_else(|| {
            KeyFileError::Invalid(format!(
                "its header word {:?} is not NAME=VALUE",
                excerpt(word)
            ))
        })?;
        match name {
            "m" => set(&mut m, name, number(name, value)?)?,
            "t" => set(&mut t, name, number(name, value)?)?,
            "p" => set(&mut p, name, number(name, value)?)?,
            "salt" => set(
                &mut salt,
                name,
                fixed::<SALT_LEN>(value).ok_or_else(|| {
                    KeyFileError::BadParams(format!("salt= is not {SALT_LEN} bytes of base64"))
                })?,
            )?,
            "nonce" => set(
                &mut nonce,
                name,
                fixed::<NONCE_LEN>(value).ok_or_else(|| {
                    KeyFileError::Invalid(format!("nonce= is not {NONCE_LEN} bytes of base64"))
                })?,
            )?,
            _ => {
                return Err(KeyFileError::BadParams(format!(
                    "unknown parameter {:?}",
                    excerpt(name)
                )))
            }
        }
    }
    let missing = |name: &str| KeyFileError::BadParams(format!("the header has no {name}="));
    let params = KdfParams {
        m_kib: m.ok_or_else(|| missing("m"))?,
        t: t.ok_or_else(|| missing("t"))?,
        p: p.ok_or_else(|| missing("p"))?,
    };
    params.check()?;
    Ok(Header {
        params,
        salt: salt.ok_or_else(|| missing("salt"))?,
        nonce: nonce.ok_or_else(|| missing("nonce"))?,
    })
}

/// Fills a header slot, refusing a parameter given twice.
fn set<T>(slot: &mut Option<T>, name: &str, value: T) -> Result<(), KeyFileError> {
    if slot.replace(value).is_some() {
        return Err(KeyFileError::BadParams(format!("{name}= is given twice")));
    }
    Ok(())
}

/// A header number.
fn number(name: &str, value: &str) -> Result<u32, KeyFileError> {
    value.parse().map_err(|_| {
        KeyFileError::BadParams(format!("{name}={:?} is not a number", excerpt(value)))
    })
}

/// Exactly `N` bytes of base64.
fn fixed<const N: usize>(value: &str) -> Option<[u8; N]> {
    <[u8; N]>::try_from(BASE64.decode(value.as_bytes()).ok()?).ok()
}

/// The start of something a file said, for a message.
fn excerpt(s: &str) -> String {
    s.chars().take(60).collect()
}

/// Derives the AES-256-GCM key from the passphrase, after checking the
/// parameters' bounds.
fn derive_key(
    passphrase: &[u8],
    params: KdfParams,
    salt: &[u8; SALT_LEN],
) -> Result<LessSafeKey, KeyFileError> {
    params.check()?;
    let argon2_params = Argon2Params::new(params.m_kib, params.t, params.p, Some(KEY_LEN))
        .map_err(|e| KeyFileError::BadParams(format!("argon2id: {e}")))?;
    let mut key = [0u8; KEY_LEN];
    Argon2::new(Algorithm::Argon2id, Version::V0x13, argon2_params)
        .hash_password_into(passphrase, salt, &mut key)
        .map_err(|e| KeyFileError::BadParams(format!("argon2id: {e}")))?;
    // An AES-256 key is exactly 32 bytes, which `key` is.
    let unbound = UnboundKey::new(&AES_256_GCM, &key).unwrap_or_else(|_| unreachable!());
    Ok(LessSafeKey::new(unbound))
}

/// A fleet id as `fleet.toml` holds it, safe to put on the first line.
fn check_fleet_id(id: &str) -> Result<(), KeyFileError> {
    let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if id.is_empty() || id.len() > MAX_FLEET_ID || !id.chars().all(plain) {
        return Err(KeyFileError::Invalid(format!(
            "fleet id {:?} is not 1 to {MAX_FLEET_ID} letters, digits, '-', '_' or '.'",
            excerpt(id)
        )));
    }
    Ok(())
}

/// A path that stays inside the fleet directory when joined to it.
fn check_path(path: &str) -> Result<(), KeyFileError> {
    let refuse = |why: &str| -> Result<(), KeyFileError> {
        Err(KeyFileError::Invalid(format!(
            "entry {:?} {why}",
            excerpt(path)
        )))
    };
    if path.is_empty() {
        return refuse("is an empty path");
    }
    if path.len() > MAX_PATH_BYTES {
        return refuse("is too long a path");
    }
    if path.starts_with('/') {
        return refuse("is an absolute path; entries are relative to the fleet directory");
    }
    if path.contains('\0') {
        return refuse("contains a NUL byte");
    }
    for component in path.split('/') {
        match component {
            "" => return refuse("has an empty component"),
            "." | ".." => return refuse("has a '.' or '..' component"),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Small parameters: the tests derive many keys.
    const FAST: KdfParams = KdfParams {
        m_kib: 8192,
        t: 1,
        p: 1,
    };
    const PASSPHRASE: &[u8] = b"correct horse battery staple";
    const FLEET: &str = "3f2a9c0d1e2b4a5f";

    fn master() -> [u8; 32] {
        [0x5a; 32]
    }

    fn entry(path: &str, mode: u32, data: &[u8]) -> KeyFileEntry {
        KeyFileEntry {
            path: path.into(),
            mode,
            data: data.to_vec(),
        }
    }

    fn body() -> KeyFileBody {
        let certificate: Vec<u8> = (0..=255).collect();
        KeyFileBody {
            v: KEYFILE_VERSION,
            fleet_id: FLEET.into(),
            exported_at: "2026-01-02T03:04:05Z".into(),
            entries: vec![
                entry(
                    "fleet.toml",
                    0o644,
                    b"version = 2\nid = \"3f2a9c0d1e2b4a5f\"\n",
                ),
                entry(
                    "repo.key",
                    0o600,
                    format!("{}\n", hex::encode(master())).as_bytes(),
                ),
                entry("nats/account.nk", 0o600, b"SAAEXAMPLE"),
                entry("hosts/nas.crt", 0o644, &certificate),
            ],
        }
    }

    fn sealed() -> Vec<u8> {
        seal(&body(), PASSPHRASE, FAST, [7; SALT_LEN], [9; NONCE_LEN]).expect("seal")
    }

    fn lines(file: &[u8]) -> Vec<String> {
        String::from_utf8(file.to_vec())
            .expect("text")
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn unlines(lines: &[String]) -> Vec<u8> {
        let mut text = lines.join("\n");
        text.push('\n');
        text.into_bytes()
    }

    /// The file with `from` replaced by `to` in line `at` (exactly once).
    fn edited(at: usize, from: &str, to: &str) -> Vec<u8> {
        let mut lines = lines(&sealed());
        assert_eq!(
            lines[at].matches(from).count(),
            1,
            "{from:?} in {}",
            lines[at]
        );
        lines[at] = lines[at].replace(from, to);
        unlines(&lines)
    }

    #[test]
    fn a_sealed_body_opens_with_its_passphrase() {
        let file = sealed();
        assert_eq!(open(&file, PASSPHRASE).expect("open"), body());
        let lines = lines(&file);
        assert_eq!(
            lines[0],
            format!("# Flotilla fleet key file (version 1). Keep it safe; it opens every backup of fleet {FLEET}.")
        );
        assert!(
            lines[1].starts_with("flotilla-keyfile v1 argon2id m=8192 t=1 p=1 salt="),
            "{}",
            lines[1]
        );
        assert!(lines.len() > 4, "the body spans several lines");
        for line in &lines[2..] {
            assert!(!line.is_empty() && line.len() <= LINE_WIDTH, "{line:?}");
        }
        // The same inputs make the same file; \r\n line ends open too.
        assert_eq!(sealed(), file);
        let crlf = lines.join("\r\n").into_bytes();
        assert_eq!(open(&crlf, PASSPHRASE).expect("open with CRLF"), body());
    }

    #[test]
    fn a_wrong_passphrase_is_refused() {
        let err = open(&sealed(), b"correct horse battery stapler").expect_err("wrong");
        assert_eq!(err, KeyFileError::WrongPassphrase);
        assert!(
            err.to_string()
                .starts_with("wrong passphrase, or the file was changed"),
            "{err}"
        );
    }

    #[test]
    fn a_changed_character_anywhere_is_refused() {
        let cases = [
            edited(0, "Keep it safe", "Keep it Safe"),
            edited(0, FLEET, "3f2a9c0d1e2b4a5e"),
            edited(1, " t=1 ", " t=2 "),
            edited(1, " m=8192 ", " m=8193 "),
            edited(1, "salt=B", "salt=C"),
            edited(1, "nonce=C", "nonce=D"),
        ];
        for file in &cases {
            assert_eq!(
                open(file, PASSPHRASE),
                Err(KeyFileError::WrongPassphrase),
                "{:?}",
                lines(file)[..2].to_vec()
            );
        }
        // One base64 character of the body.
        let mut body_flipped = lines(&sealed());
        let first = if body_flipped[2].starts_with('A') {
            "B"
        } else {
            "A"
        };
        body_flipped[2].replace_range(0..1, first);
        assert_eq!(
            open(&unlines(&body_flipped), PASSPHRASE),
            Err(KeyFileError::WrongPassphrase)
        );
        // A line lost.
        let mut cut = lines(&sealed());
        cut.remove(3);
        assert!(open(&unlines(&cut), PASSPHRASE).is_err());
    }

    #[test]
    fn parameters_out_of_bounds_are_refused_before_any_key_derivation() {
        for (from, to) in [
            (" m=8192 ", " m=8191 "),
            (" m=8192 ", " m=1048577 "),
            (" m=8192 ", " m=99999999999 "),
            (" t=1 ", " t=0 "),
            (" t=1 ", " t=11 "),
            (" p=1 ", " p=0 "),
            (" p=1 ", " p=5 "),
            (" p=1 ", " p=1 p=1 "),
            (" p=1 ", " "),
            (" p=1 ", " p=1 q=2 "),
            (" argon2id ", " argon2i "),
        ] {
            let file = edited(1, from, to);
            assert!(
                matches!(open(&file, PASSPHRASE), Err(KeyFileError::BadParams(_))),
                "{to}: {:?}",
                open(&file, PASSPHRASE)
            );
        }
        for params in [
            KdfParams {
                m_kib: 1 << 30,
                ..FAST
            },
            KdfParams { t: 0, ..FAST },
            KdfParams { p: 64, ..FAST },
        ] {
            assert!(matches!(
                seal(&body(), PASSPHRASE, params, [7; SALT_LEN], [9; NONCE_LEN]),
                Err(KeyFileError::BadParams(_))
            ));
        }
        assert_eq!(KdfParams::default(), KdfParams::DEFAULT);
        assert!(KdfParams::DEFAULT.check().is_ok());
        assert!(FAST.check().is_ok());
    }

    #[test]
    fn entries_outside_the_fleet_directory_are_refused() {
        for path in [
            "../etc/passwd",
            "/etc/passwd",
            "nats/../../x",
            "a//b",
            "a/",
            "./a",
            "",
            "a\0b",
        ] {
            let mut bad = body();
            bad.entries.push(entry(path, 0o600, b"x"));
            assert!(
                matches!(bad.validate(), Err(KeyFileError::Invalid(_))),
                "{path:?}"
            );
            assert!(
                matches!(
                    seal(&bad, PASSPHRASE, FAST, [7; SALT_LEN], [9; NONCE_LEN]),
                    Err(KeyFileError::Invalid(_))
                ),
                "{path:?}"
            );
        }
        for extra in [
            entry("repo.key", 0o600, b"again"),
            entry("repo.key/inside", 0o600, b"x"),
            entry("ok", 0o100_644, b"x"),
        ] {
            let mut bad = body();
            bad.entries.push(extra.clone());
            assert!(
                matches!(bad.validate(), Err(KeyFileError::Invalid(_))),
                "{extra:?}"
            );
        }
        // A file sealed with such an entry (by something else than `seal`)
        // is refused when opened.
        let mut hostile = body();
        hostile
            .entries
            .push(entry("../.ssh/authorized_keys", 0o600, b"x"));
        let file = seal_unchecked(&hostile, PASSPHRASE, FAST, [7; SALT_LEN], [9; NONCE_LEN])
            .expect("seal");
        assert!(matches!(
            open(&file, PASSPHRASE),
            Err(KeyFileError::Invalid(_))
        ));
    }

    #[test]
    fn limits_are_kept() {
        let mut many = body();
        many.entries = (0..=MAX_ENTRIES)
            .map(|i| entry(&format!("hosts/h{i}.crt"), 0o644, b""))
            .collect();
        assert_eq!(many.validate(), Err(KeyFileError::TooLarge));
        let mut big = body();
        big.entries
            .push(entry("big", 0o600, &vec![0u8; MAX_TOTAL_BYTES]));
        assert_eq!(big.validate(), Err(KeyFileError::TooLarge));
        assert_eq!(
            open(&vec![b'A'; MAX_FILE_BYTES + 1], PASSPHRASE),
            Err(KeyFileError::TooLarge)
        );
    }

    #[test]
    fn the_repository_key_comes_back() {
        let opened = open(&sealed(), PASSPHRASE).expect("open");
        let key = opened.repo_key().expect("repo key");
        let original = RepoKey::from_master(&master());
        assert_eq!(key.blob_id(b"a chunk"), original.blob_id(b"a chunk"));
        assert_eq!(opened.entry("nats/account.nk").map(|e| e.mode), Some(0o600));
        let mut without = body();
        without.entries.retain(|e| e.path != REPO_KEY_PATH);
        assert!(matches!(without.repo_key(), Err(KeyFileError::Invalid(_))));
        let mut garbled = body();
        garbled.entries[1].data = b"not hex\n".to_vec();
        assert!(matches!(garbled.repo_key(), Err(KeyFileError::Invalid(_))));
    }

    #[test]
    fn other_files_are_not_key_files() {
        let others: [&[u8]; 4] = [
            b"hello\n",
            b"",
            b"\xff\xfe\x00",
            b"# Flotilla fleet key file\nssh-ed25519 AAAA\n",
        ];
        for file in others {
            assert!(
                matches!(open(file, PASSPHRASE), Err(KeyFileError::NotAKeyFile(_))),
                "{file:?}"
            );
        }
        assert_eq!(
            open(
                &edited(1, "flotilla-keyfile v1 ", "flotilla-keyfile v2 "),
                PASSPHRASE
            ),
            Err(KeyFileError::UnsupportedVersion(2))
        );
        // Debug output never shows a key.
        let shown = format!("{:?}", body());
        assert!(!shown.contains("SAAEXAMPLE"), "{shown}");
    }
}
