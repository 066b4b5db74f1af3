//! The repository's data model, shared by every host that reads or writes it:
//! blob ids, the encryption of blobs, trees of file metadata, snapshots.
//!
//! Keys: one 32-byte repository master key (made by `flotilla init`, carried
//! only inside bundles) derives two keys with BLAKE3's key derivation: one that
//! keys the BLAKE3 hash naming each chunk (so ids reveal nothing about content
//! to the storage host), one for AES-256-GCM. Sources encrypt before sending;
//! the storage host keeps only ciphertext and plaintext *ids*.
//!
//! A sealed blob is `version (1) || nonce (12) || AES-256-GCM(codec || payload)`
//! with the blob id as associated data, so a blob cannot be passed off under
//! another id. `codec` is 0 for raw, 1 for zstd.

use std::fmt;
use std::ops::Range;

use ring::aead::{self, LessSafeKey, UnboundKey, AES_256_GCM};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{HostName, IdError, SnapshotId, TaskId, UnixMillis};

/// Version of [`Tree`], [`SnapshotRecord`] and [`SnapshotMeta`].
pub const REPO_FORMAT: u16 = 1;
/// Largest plaintext of one data chunk (the chunker's maximum).
pub const MAX_CHUNK: usize = 8 * 1024 * 1024;
/// Largest plaintext of one tree blob.
pub const MAX_TREE: usize = 32 * 1024 * 1024;
/// Largest sealed blob of any kind.
pub const MAX_SEALED: usize = MAX_TREE + 1024;

const SEAL_VERSION: u8 = 1;
const NONCE_LEN: usize = 12;
const CODEC_RAW: u8 = 0;
const CODEC_ZSTD: u8 = 1;

/// The 32-byte name of a blob: keyed BLAKE3 of its plaintext.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobId(pub [u8; 32]);

impl BlobId {
    /// Lowercase hex.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Option<Self> {
        Some(Self(hex::decode(s).ok()?.try_into().ok()?))
    }
}

impl fmt::Debug for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", &self.to_hex()[..16])
    }
}

impl fmt::Display for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl Serialize for BlobId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for BlobId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let bytes: serde_bytes::ByteBuf = Deserialize::deserialize(d)?;
        let arr: [u8; 32] = bytes
            .into_vec()
            .try_into()
            .map_err(|_| serde::de::Error::custom("blob id must be 32 bytes"))?;
        Ok(BlobId(arr))
    }
}

/// What a blob holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlobKind {
    /// A chunk of file content.
    Data,
    /// A [`Tree`].
    Tree,
}

/// A blob could not be sealed or opened. Never retryable: the bytes are wrong
/// or the key is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    /// Too short, unknown version, or failed authentication (tampered, or
    /// another repository's key).
    #[error("blob {0:?} does not decrypt: damaged, tampered with, or from another repository")]
    Unauthentic(BlobId),
    /// Decompression failed or produced too much.
    #[error("blob {0:?} does not decompress")]
    Decompress(BlobId),
    /// The plaintext does not hash to the blob's id.
    #[error("blob {0:?} decrypts but its content does not match its id")]
    IdMismatch(BlobId),
    /// Plaintext too large.
    #[error("blob of {0} bytes exceeds the maximum")]
    TooLarge(usize),
    /// The OS random source failed.
    #[error("random source failed")]
    Random,
}

/// The repository keys a host holds when its bundle carries the repository key.
pub struct RepoKey {
    id_key: [u8; 32],
    aead: LessSafeKey,
    rng: SystemRandom,
}

impl fmt::Debug for RepoKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RepoKey(..)")
    }
}

impl RepoKey {
    /// Derives the id and encryption keys from the master key.
    pub fn from_master(master: &[u8; 32]) -> Self {
        let id_key = blake3::derive_key("flotilla 2026 blob id v1", master);
        let enc_key = blake3::derive_key("flotilla 2026 blob encryption v1", master);
        // An AES-256 key is exactly 32 bytes, which `enc_key` is.
        let unbound = UnboundKey::new(&AES_256_GCM, &enc_key).unwrap_or_else(|_| unreachable!());
        Self {
            id_key,
            aead: LessSafeKey::new(unbound),
            rng: SystemRandom::new(),
        }
    }

    /// Parses the master key as written in bundles (64 hex digits).
    pub fn from_hex(s: &str) -> Option<Self> {
        let master: [u8; 32] = hex::decode(s.trim()).ok()?.try_into().ok()?;
        Some(Self::from_master(&master))
    }

    /// The id of a blob with this plaintext.
    pub fn blob_id(&self, plaintext: &[u8]) -> BlobId {
        BlobId(*blake3::keyed_hash(&self.id_key, plaintext).as_bytes())
    }

    /// Compresses (when it pays) and encrypts `plaintext` under `id`.
    pub fn seal(
        &self,
        id: &BlobId,
        plaintext: &[u8],
        zstd_level: i32,
    ) -> Result<Vec<u8>, CryptoError> {
        if plaintext.len() > MAX_TREE {
            return Err(CryptoError::TooLarge(plaintext.len()));
        }
        let mut body = Vec::with_capacity(plaintext.len() / 2 + 64);
        body.push(CODEC_ZSTD);
        let compressed = if incompressible(plaintext) {
            None
        } else {
            compress(plaintext, zstd_level)
        };
        match compressed {
            // Keep compression only when it saves at least 1/32: incompressible
            // data (media, archives) then costs no decompression on restore.
            Some(c) if c.len() + c.len() / 32 < plaintext.len() => body.extend_from_slice(&c),
            _ => {
                body[0] = CODEC_RAW;
                body.extend_from_slice(plaintext);
            }
        }
        self.seal_raw(&id.0, body)
    }

    /// Decrypts, decompresses and verifies a sealed blob.
    pub fn open(&self, id: &BlobId, sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let mut buf = sealed.to_vec();
        let (codec, payload) = self.open_body(id, &mut buf)?;
        let plain = if codec == CODEC_RAW {
            // The plaintext is already in `buf`: move it to the front.
            buf.truncate(payload.end);
            buf.drain(..payload.start);
            buf
        } else {
            decompress(&buf[payload]).ok_or(CryptoError::Decompress(*id))?
        };
        if self.blob_id(&plain) != *id {
            return Err(CryptoError::IdMismatch(*id));
        }
        Ok(plain)
    }

    /// Like [`open`](Self::open), but decrypts in `sealed`'s own buffer
    /// (which it overwrites) and lends the verified plaintext to `use_plain`:
    /// no copy of a stored-raw blob is made. For restores, which open every
    /// byte once.
    pub fn open_in_place<R>(
        &self,
        id: &BlobId,
        sealed: &mut [u8],
        use_plain: impl FnOnce(&[u8]) -> R,
    ) -> Result<R, CryptoError> {
        let (codec, payload) = self.open_body(id, sealed)?;
        let decompressed;
        let plain = if codec == CODEC_RAW {
            &sealed[payload]
        } else {
            decompressed = decompress(&sealed[payload]).ok_or(CryptoError::Decompress(*id))?;
            &decompressed[..]
        };
        if self.blob_id(plain) != *id {
            return Err(CryptoError::IdMismatch(*id));
        }
        Ok(use_plain(plain))
    }

    /// Decrypts a sealed blob in place: its codec and where in `sealed` its
    /// payload now is.
    fn open_body(&self, id: &BlobId, sealed: &mut [u8]) -> Result<(u8, Range<usize>), CryptoError> {
        let body = self
            .open_raw_in_place(&id.0, sealed)
            .ok_or(CryptoError::Unauthentic(*id))?;
        match body {
            Range { start, end } if start < end => match sealed[start] {
                codec @ (CODEC_RAW | CODEC_ZSTD) => Ok((codec, start + 1..end)),
                _ => Err(CryptoError::Decompress(*id)),
            },
            _ => Err(CryptoError::Unauthentic(*id)),
        }
    }

    /// Encrypts metadata that is not content-addressed (a snapshot's
    /// [`SnapshotMeta`]), bound to `context` (e.g. the snapshot id).
    pub fn seal_meta(&self, context: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let mut body = Vec::with_capacity(plaintext.len() + 1);
        body.push(CODEC_RAW);
        body.extend_from_slice(plaintext);
        self.seal_raw(context, body)
    }

    /// Decrypts what [`seal_meta`](Self::seal_meta) made.
    pub fn open_meta(&self, context: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        let body = self.open_raw(context, sealed)?;
        let (codec, payload) = body.split_first()?;
        (*codec == CODEC_RAW).then(|| payload.to_vec())
    }

    fn seal_raw(&self, aad: &[u8], mut body: Vec<u8>) -> Result<Vec<u8>, CryptoError> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).map_err(|_| CryptoError::Random)?;
        self.aead
            .seal_in_place_append_tag(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(aad),
                &mut body,
            )
            .map_err(|_| CryptoError::Random)?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + body.len());
        out.push(SEAL_VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&body);
        Ok(out)
    }

    fn open_raw(&self, aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
        let mut buf = sealed.to_vec();
        let body = self.open_raw_in_place(aad, &mut buf)?;
        buf.truncate(body.end);
        buf.drain(..body.start);
        Some(buf)
    }

    /// Authenticates and decrypts `sealed` in place: where the plaintext
    /// body now is.
    fn open_raw_in_place(&self, aad: &[u8], sealed: &mut [u8]) -> Option<Range<usize>> {
        if sealed.len() < 1 + NONCE_LEN + AES_256_GCM.tag_len() || sealed[0] != SEAL_VERSION {
            return None;
        }
        let nonce: [u8; NONCE_LEN] = sealed[1..1 + NONCE_LEN].try_into().ok()?;
        let start = 1 + NONCE_LEN;
        let plain = self
            .aead
            .open_in_place(
                aead::Nonce::assume_unique_for_key(nonce),
                aead::Aad::from(aad),
                &mut sealed[start..],
            )
            .ok()?;
        Some(start..start + plain.len())
    }
}

/// What a holder of no key can check of a sealed blob: its version byte and
/// that it is long enough to hold a nonce, a codec byte and a tag, and no
/// longer than [`MAX_SEALED`]. A storage host receiving a copy checks this
/// before storing; the bytes themselves only a key holder can verify.
pub fn check_sealed_shape(sealed: &[u8]) -> Result<(), String> {
    let least = 1 + NONCE_LEN + 1 + AES_256_GCM.tag_len();
    if sealed.len() < least {
        return Err(format!(
            "{} bytes is shorter than any sealed blob ({least})",
            sealed.len()
        ));
    }
    if sealed.len() > MAX_SEALED {
        return Err(format!(
            "{} bytes is longer than any sealed blob ({MAX_SEALED})",
            sealed.len()
        ));
    }
    if sealed[0] != SEAL_VERSION {
        return Err(format!("unknown seal version {}", sealed[0]));
    }
    Ok(())
}

/// One directory's entries, sorted by name. Stored as a [`BlobKind::Tree`] blob.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Tree {
    /// Format version, [`REPO_FORMAT`].
    pub v: u16,
    /// Entries, sorted by `name`.
    pub nodes: Vec<Node>,
}

/// Type of a filesystem entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeKind {
    /// Regular file.
    File,
    /// Directory.
    Dir,
    /// Symbolic link.
    Symlink,
    /// Named pipe.
    Fifo,
    /// Unix socket (restored as nothing; recorded for completeness).
    Socket,
    /// Character device.
    CharDevice,
    /// Block device.
    BlockDevice,
}

/// One chunk of a file's content.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRef {
    /// The chunk's blob.
    pub id: BlobId,
    /// Its plaintext length.
    pub len: u32,
}

/// An extended attribute.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Xattr {
    /// Name, raw bytes.
    #[serde(with = "serde_bytes")]
    pub name: Vec<u8>,
    /// Value, raw bytes.
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
}

/// One filesystem entry with its full metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    /// File name (one path component; at the snapshot root, the absolute
    /// path that was backed up). Raw bytes: Unix names need not be UTF-8.
    #[serde(with = "serde_bytes")]
    pub name: Vec<u8>,
    /// Entry type.
    pub kind: NodeKind,
    /// Permission bits and set-id/sticky bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Owner id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Owner name, when it resolves.
    pub user: Option<String>,
    /// Group name, when it resolves.
    pub group: Option<String>,
    /// Modification time, nanoseconds since the epoch.
    pub mtime_ns: i64,
    /// Access time, nanoseconds since the epoch.
    pub atime_ns: i64,
    /// Status change time, nanoseconds since the epoch.
    pub ctime_ns: i64,
    /// Size in bytes (files), or 0.
    pub size: u64,
    /// Inode number on the source.
    pub inode: u64,
    /// Device of the source filesystem.
    pub dev: u64,
    /// Hard link count on the source.
    pub nlink: u64,
    /// Device number (devices).
    pub rdev: u64,
    /// Symlink target, raw bytes.
    #[serde(with = "serde_bytes")]
    pub link_target: Option<Vec<u8>>,
    /// File content, in order.
    pub content: Vec<ChunkRef>,
    /// Whether the file had holes; all-zero chunks are restored as holes.
    pub sparse: bool,
    /// Directory content.
    pub subtree: Option<BlobId>,
    /// Extended attributes.
    pub xattrs: Vec<Xattr>,
}

/// A committed snapshot as the storage host keeps it: what it needs to check
/// and prune without keys in the clear, plus the sealed [`SnapshotMeta`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    /// Format version, [`REPO_FORMAT`].
    pub v: u16,
    /// Snapshot id (32 hex digits).
    pub id: String,
    /// Host whose files these are.
    pub host: HostName,
    /// When the backup started.
    pub time: UnixMillis,
    /// Root tree: one node per backed-up path, named by its absolute path.
    pub tree: BlobId,
    /// Some files could not be read; the meta lists them.
    pub partial: bool,
    /// Every blob the snapshot references (trees and data), sorted, unique.
    pub blobs: Vec<BlobId>,
    /// Sealed [`SnapshotMeta`], bound to the snapshot id.
    #[serde(with = "serde_bytes")]
    pub meta: Vec<u8>,
}

/// What only key holders may read about a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    /// Format version, [`REPO_FORMAT`].
    pub v: u16,
    /// The paths that were backed up.
    pub paths: Vec<String>,
    /// Exclude patterns in force.
    pub excludes: Vec<String>,
    /// The task that made it.
    pub task_id: TaskId,
    /// Counters.
    pub summary: BackupSummary,
    /// Files that could not be read (the first 1,000).
    pub unreadable: Vec<String>,
    /// The record's root tree, host and time, sealed so that a storage host
    /// cannot point a snapshot at other data ([`SnapshotRecord::verify`]).
    #[serde(default)]
    pub tree: Option<BlobId>,
    /// The record's host.
    #[serde(default)]
    pub host: Option<String>,
    /// The record's time.
    #[serde(default)]
    pub time: Option<UnixMillis>,
}

/// Counters of one backup.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct BackupSummary {
    /// Files not in the previous snapshot.
    pub files_new: u64,
    /// Files whose metadata changed since the previous snapshot.
    pub files_changed: u64,
    /// Files unchanged (not read again).
    pub files_unchanged: u64,
    /// Directories.
    pub dirs: u64,
    /// Bytes of file content read.
    pub bytes_read: u64,
    /// Total size of the files in the snapshot.
    pub bytes_total: u64,
    /// Blobs the storage did not have.
    pub blobs_new: u64,
    /// Bytes those blobs took, after compression and encryption.
    pub bytes_added: u64,
    /// Entries that could not be read.
    pub errors: u64,
    /// How long it took.
    pub duration_ms: u64,
}

impl SnapshotRecord {
    /// Context the meta is sealed under.
    pub fn meta_context(id: &str) -> Vec<u8> {
        format!("flotilla snapshot {id}").into_bytes()
    }

    /// Decrypts the snapshot's meta.
    pub fn open_meta(&self, key: &RepoKey) -> Option<SnapshotMeta> {
        let bytes = key.open_meta(&Self::meta_context(&self.id), &self.meta)?;
        rmp_serde::from_slice(&bytes).ok()
    }

    /// Opens the meta and checks that the plaintext parts of the record (root
    /// tree, host, time) are the ones the backup sealed: the storage host
    /// holds no key, so it cannot forge them without this failing.
    pub fn verify(&self, key: &RepoKey) -> Result<SnapshotMeta, SnapshotVerifyError> {
        let meta = self
            .open_meta(key)
            .ok_or_else(|| SnapshotVerifyError::Sealed {
                id: self.id.clone(),
            })?;
        let same = meta.tree == Some(self.tree)
            && meta.host.as_deref() == Some(self.host.as_str())
            && meta.time == Some(self.time);
        if !same {
            return Err(SnapshotVerifyError::Tampered {
                id: self.id.clone(),
            });
        }
        Ok(meta)
    }

    /// The record's id, checked: records come from a storage host, and an id
    /// that is not 32 hex digits is not one its repository would have written.
    pub fn snapshot_id(&self) -> Result<SnapshotId, IdError> {
        SnapshotId::new(self.id.as_str())
    }
}

/// A snapshot record does not hold up against its sealed metadata. Never
/// retryable: the stored bytes are wrong, or the key is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotVerifyError {
    /// The metadata does not open with this key (another fleet's
    /// repository, or damaged).
    #[error("snapshot {id}: its sealed metadata does not open with this fleet's key")]
    Sealed {
        /// The record's id.
        id: String,
    },
    /// The record's tree, host or time differ from the sealed ones.
    #[error("snapshot {id}: the record does not match its sealed metadata (tree, host or time changed); the storage host's copy was tampered with")]
    Tampered {
        /// The record's id.
        id: String,
    },
}

/// What `check` found in a repository. Travels in task results, so it is
/// plain data with named fields; the storage agent builds it, the coordinator
/// prints it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckReport {
    /// Pack files seen.
    pub packs: u64,
    /// Distinct blobs named by the pack indexes.
    pub blobs: u64,
    /// Snapshots seen (readable or not).
    pub snapshots: u64,
    /// Bytes of pack files.
    pub bytes: u64,
    /// Everything that is wrong, one entry per finding.
    pub problems: Vec<Problem>,
    /// Blobs with no intact copy left (damaged bytes, missing or truncated
    /// pack), sorted.
    pub damaged_blobs: Vec<BlobId>,
    /// Ids of snapshots that reference a damaged or missing blob, sorted:
    /// these cannot be fully restored.
    pub affected_snapshots: Vec<String>,
}

impl CheckReport {
    /// Whether the repository passed: no problem at all.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// One finding of `check`.
///
/// `kind` is a stable machine-readable word: `config`, `idx_unreadable`,
/// `pack_missing`, `pack_size`, `pack_without_index`, `pack_damaged`,
/// `pack_hash`, `blob_damaged`, `idx_mismatch`, `snapshot_unreadable`,
/// `blob_missing`, `io`. New kinds may appear; readers show unknown ones as is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// What kind of problem (see above).
    pub kind: String,
    /// The pack concerned (hex id), if any.
    pub pack: Option<String>,
    /// The blob concerned, if any.
    pub blob: Option<BlobId>,
    /// What is wrong, for people.
    pub message: String,
}

/// Size of a repository as the storage agent's in-memory index sees it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoStats {
    /// Pack files indexed.
    pub packs: u64,
    /// Distinct blobs indexed.
    pub blobs: u64,
    /// Bytes of the indexed pack files (after compression and encryption).
    pub stored_bytes: u64,
    /// Snapshots committed.
    pub snapshots: u64,
}

/// What a restore wrote.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RestoreSummary {
    /// Regular files restored.
    pub files: u64,
    /// Directories restored.
    pub dirs: u64,
    /// Symbolic links restored.
    pub symlinks: u64,
    /// Hard links recreated.
    pub hardlinks: u64,
    /// Bytes of file content written.
    pub bytes: u64,
    /// Entries that could not be restored.
    pub errors: u64,
    /// The first few of those, with why.
    pub error_samples: Vec<String>,
    /// What a restore of another host's snapshot left out because it could
    /// raise privileges here (absent from older agents: none).
    #[serde(default)]
    pub stripped: Stripped,
}

/// Privilege-bearing parts of another host's snapshot that a restore left
/// out: a compromised host must not be able to plant a setuid-root program,
/// a capability or a device node on another host through its backups.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Stripped {
    /// Regular files restored without their setuid/setgid bits.
    pub setid: u64,
    /// Files restored without their `security.capability` attribute.
    pub capabilities: u64,
    /// Files restored without other privileged attributes (SELinux and
    /// Smack labels, `trusted.*`): only `user.*` and POSIX ACLs are kept.
    #[serde(default)]
    pub labels: u64,
    /// Character and block devices not created.
    pub devices: u64,
    /// The first few paths, each with what was left out.
    pub samples: Vec<String>,
}

impl Stripped {
    /// Nothing was left out.
    pub fn is_empty(&self) -> bool {
        self.setid == 0 && self.capabilities == 0 && self.labels == 0 && self.devices == 0
    }
}

/// What `prune` found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PruneReport {
    /// Only computed; nothing deleted.
    pub dry_run: bool,
    /// Snapshots whose blobs were kept.
    pub snapshots: u64,
    /// Packs looked at.
    pub packs: u64,
    /// Packs deleted (or that would be, in a dry run).
    pub packs_deleted: u64,
    /// Blobs they held.
    pub blobs_removed: u64,
    /// Bytes freed.
    pub bytes_freed: u64,
    /// Bytes in packs still in use.
    pub bytes_kept: u64,
    /// Unreferenced packs kept because they are younger than the grace period.
    pub packs_in_grace: u64,
    /// Their bytes.
    pub bytes_in_grace: u64,
    /// Unreferenced packs kept because a running backup or restore relies on them.
    pub packs_protected: u64,
}

/// What `repair` found and did. Travels in task results, so it is plain data
/// with named fields; the storage agent builds it, the coordinator prints it
/// (and names the files behind `lost_blobs`, which needs the key).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepairReport {
    /// Whether every pack was read first (`check --read-data`), so that
    /// damage not found before was found and repaired too.
    pub read_data: bool,
    /// Damaged packs found: with a damage record, gone or of the wrong size
    /// (their index left), or without a usable index and damaged.
    pub packs_damaged: u64,
    /// Of those, dropped (index, pack and record deleted).
    pub packs_dropped: u64,
    /// Packs without a usable index found intact and indexed again.
    pub packs_reindexed: u64,
    /// New packs written with the blobs moved.
    pub packs_written: u64,
    /// Intact blobs copied out of damaged packs.
    pub blobs_moved: u64,
    /// Their sealed bytes.
    pub bytes_moved: u64,
    /// Damaged copies of which a good copy is now indexed (uploaded again by
    /// a backup, a duplicate in another pack, or intact after all).
    pub blobs_healed: u64,
    /// Damaged copies without a good copy that no snapshot references:
    /// dropped, nothing needs them.
    pub blobs_discarded: u64,
    /// How many blobs committed snapshots reference that the repository
    /// does not hold: lost until a backup of a host that still has the data
    /// uploads them again (backups are told they are missing).
    pub blobs_lost: u64,
    /// Those blobs, sorted (in a task result, the first 2,048).
    pub lost_blobs: Vec<BlobId>,
    /// How many snapshots reference a lost blob: they cannot be fully
    /// restored.
    pub snapshots_affected: u64,
    /// Those snapshots, sorted (in a task result, the first 1,000). Which
    /// files: the coordinator opens their trees.
    pub affected_snapshots: Vec<SnapshotId>,
    /// What repair could not do, for people: packs kept because they could
    /// not be read, snapshots that do not read (in a task result, the first
    /// 200).
    pub problems: Vec<String>,
}

impl RepairReport {
    /// Whether nothing is lost and nothing was left undone.
    pub fn is_ok(&self) -> bool {
        self.blobs_lost == 0 && self.lost_blobs.is_empty() && self.problems.is_empty()
    }
}

/// What `forget` removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForgetReport {
    /// Snapshot records removed.
    pub removed: Vec<SnapshotId>,
    /// Ids that were not there (already forgotten).
    pub missing: Vec<SnapshotId>,
}

thread_local! {
    /// One zstd compression context per thread, kept between blobs: making
    /// one costs more than compressing a small file.
    /// One per level used (the probe's and the backup's).
    static COMPRESSORS: std::cell::RefCell<Vec<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(Vec::new()) };
    /// Likewise for decompression.
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// zstd-compresses `plain` at `level` with this thread's context.
fn compress(plain: &[u8], level: i32) -> Option<Vec<u8>> {
    COMPRESSORS.with(|cell| {
        let mut contexts = cell.borrow_mut();
        let i = match contexts.iter().position(|(l, _)| *l == level) {
            Some(i) => i,
            None => {
                if contexts.len() >= 2 {
                    contexts.remove(0);
                }
                contexts.push((level, zstd::bulk::Compressor::new(level).ok()?));
                contexts.len() - 1
            }
        };
        contexts.get_mut(i)?.1.compress(plain).ok()
    })
}

/// Blobs at least this large are probed before zstd sees them whole.
const PROBE_MIN: usize = 64 * 1024;
/// Samples a probe compresses, and the size of each.
const PROBE_SAMPLES: usize = 4;
const PROBE_SAMPLE: usize = 8 * 1024;

/// Whether samples of `plain` show it will not compress: random data, or
/// media and archives that are compressed already. Compressing such a
/// megabyte at level 3 costs as much as reading and hashing it, to find it
/// does not pay; four 8 KiB samples at level 1 cost 3% of that. A blob
/// whose samples compress by more than 1/32 goes to zstd whole.
fn incompressible(plain: &[u8]) -> bool {
    if plain.len() < PROBE_MIN {
        return false;
    }
    let stride = (plain.len() - PROBE_SAMPLE) / (PROBE_SAMPLES - 1);
    let mut sampled = 0;
    let mut compressed = 0;
    for i in 0..PROBE_SAMPLES {
        let at = i * stride;
        let sample = &plain[at..at + PROBE_SAMPLE];
        let Some(c) = compress(sample, PROBE_LEVEL) else {
            return false;
        };
        sampled += sample.len();
        compressed += c.len();
    }
    compressed + compressed / 32 >= sampled
}

/// zstd level of the probe: its fastest, which finds repetition as well as
/// level 3 at this size.
const PROBE_LEVEL: i32 = 1;

/// Decompresses one zstd frame into a buffer of exactly its declared size,
/// which must be declared and at most [`MAX_TREE`]: a frame from a peer never
/// makes us allocate more than that, and a small blob never costs a
/// [`MAX_TREE`]-sized buffer.
fn decompress(frame: &[u8]) -> Option<Vec<u8>> {
    let size = zstd::zstd_safe::get_frame_content_size(frame).ok()??;
    if size > MAX_TREE as u64 {
        return None;
    }
    DECOMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(zstd::bulk::Decompressor::new().ok()?);
        }
        let plain = slot.as_mut()?.decompress(frame, size as usize).ok()?;
        (plain.len() as u64 == size).then_some(plain)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> RepoKey {
        RepoKey::from_master(&[b; 32])
    }

    #[test]
    fn a_sealed_blob_has_the_shape_a_keyless_host_checks() {
        let k = key(1);
        for plain in [&b""[..], b"x", &[7u8; 70_000][..]] {
            let id = k.blob_id(plain);
            let sealed = k.seal(&id, plain, 3).expect("seals");
            assert_eq!(check_sealed_shape(&sealed), Ok(()), "{} bytes", plain.len());
            // One byte short of the empty blob's seal, or another version: refused.
            let mut bad = sealed.clone();
            bad[0] = SEAL_VERSION + 1;
            assert!(check_sealed_shape(&bad).is_err());
        }
        let empty = k.seal(&k.blob_id(b""), b"", 3).expect("seals");
        assert!(check_sealed_shape(&empty[..empty.len() - 1]).is_err());
        assert!(check_sealed_shape(&vec![SEAL_VERSION; MAX_SEALED + 1]).is_err());
    }

    #[test]
    fn seal_open_round_trip_with_and_without_compression() {
        let k = key(1);
        // Incompressible: zstd cannot save 1/32 of a BLAKE3 stream, so the
        // body is stored raw and the sealed blob is the plaintext plus the
        // version, nonce, codec byte and tag.
        let mut noise = vec![0u8; 100_000];
        blake3::Hasher::new()
            .update(b"noise")
            .finalize_xof()
            .fill(&mut noise);
        let id = k.blob_id(&noise);
        let sealed = k.seal(&id, &noise, 3).expect("seals");
        assert!(sealed.len() > noise.len(), "raw path: {}", sealed.len());
        assert_eq!(
            sealed.len(),
            noise.len() + 1 + NONCE_LEN + 1 + AES_256_GCM.tag_len()
        );
        assert_eq!(k.open(&id, &sealed).expect("opens"), noise);
        // Compressible: the compressed path must have run to be this small.
        let compressible: Vec<u8> = (0..100_000u32).map(|i| (i % 7) as u8).collect();
        let id = k.blob_id(&compressible);
        let sealed = k.seal(&id, &compressible, 3).expect("seals");
        assert!(
            sealed.len() < compressible.len() / 10,
            "compressed path: {}",
            sealed.len()
        );
        assert_eq!(k.open(&id, &sealed).expect("opens"), compressible);
    }

    #[test]
    fn the_probe_skips_zstd_only_for_blobs_that_do_not_compress() {
        let k = key(1);
        let mut noise = vec![0u8; 1 << 20];
        blake3::Hasher::new()
            .update(b"noise")
            .finalize_xof()
            .fill(&mut noise);
        assert!(incompressible(&noise));
        let overhead = 1 + NONCE_LEN + 1 + AES_256_GCM.tag_len();
        let id = k.blob_id(&noise);
        let sealed = k.seal(&id, &noise, 3).expect("seals");
        assert_eq!(sealed.len(), noise.len() + overhead, "stored raw");
        assert_eq!(k.open(&id, &sealed).expect("opens"), noise);
        // Half noise, half text: two of the four samples compress, so the
        // whole blob goes to zstd and saves about half.
        let text = b"the quick brown fox jumps over the lazy dog; ".repeat(12_000);
        let mut mixed = noise[..1 << 19].to_vec();
        mixed.extend_from_slice(&text[..1 << 19]);
        assert!(!incompressible(&mixed));
        let id = k.blob_id(&mixed);
        let sealed = k.seal(&id, &mixed, 3).expect("seals");
        assert!(sealed.len() < mixed.len() * 6 / 10, "{}", sealed.len());
        assert_eq!(k.open(&id, &sealed).expect("opens"), mixed);
        // Small blobs are never probed: zstd alone decides.
        assert!(!incompressible(&noise[..PROBE_MIN - 1]));
    }

    #[test]
    fn tampering_wrong_id_and_wrong_key_are_detected() {
        let k = key(1);
        let plain = b"hello world".to_vec();
        let id = k.blob_id(&plain);
        let mut sealed = k.seal(&id, &plain, 3).expect("seals");
        let other = k.blob_id(b"other");
        assert_eq!(
            k.open(&other, &sealed),
            Err(CryptoError::Unauthentic(other))
        );
        assert!(key(2).open(&id, &sealed).is_err());
        let last = sealed.len() - 1;
        sealed[last] ^= 1;
        assert_eq!(k.open(&id, &sealed), Err(CryptoError::Unauthentic(id)));
        assert!(k.open(&id, &[]).is_err());
    }

    #[test]
    fn open_in_place_lends_the_same_plaintext_open_returns() {
        let k = key(1);
        let mut noise = vec![0u8; 100_000];
        blake3::Hasher::new()
            .update(b"in place")
            .finalize_xof()
            .fill(&mut noise);
        let text = b"restore me in place; ".repeat(5_000);
        for plain in [&noise[..], &text[..], &[][..]] {
            let id = k.blob_id(plain);
            let sealed = k.seal(&id, plain, 3).expect("seals");
            let mut buf = sealed.clone();
            let got = k
                .open_in_place(&id, &mut buf, |p| p.to_vec())
                .expect("opens in place");
            assert_eq!(got, plain);
            assert_eq!(got, k.open(&id, &sealed).expect("opens"));
        }
        // A wrong id, a flipped byte, a wrong key and a short buffer are
        // refused before the closure sees anything.
        let id = k.blob_id(&text);
        let sealed = k.seal(&id, &text, 3).expect("seals");
        let other = k.blob_id(b"other");
        let never = |_: &[u8]| panic!("unverified plaintext was lent");
        assert_eq!(
            k.open_in_place(&other, &mut sealed.clone(), never),
            Err(CryptoError::Unauthentic(other))
        );
        let mut flipped = sealed.clone();
        flipped[1 + NONCE_LEN + 3] ^= 1;
        assert_eq!(
            k.open_in_place(&id, &mut flipped, never),
            Err(CryptoError::Unauthentic(id))
        );
        assert!(key(2)
            .open_in_place(&id, &mut sealed.clone(), never)
            .is_err());
        assert!(k.open_in_place(&id, &mut [0u8; 4], never).is_err());
    }

    #[test]
    fn a_record_verifies_only_against_its_sealed_meta() {
        let k = key(1);
        let id = "ab".repeat(16);
        let tree = k.blob_id(b"tree");
        let meta = SnapshotMeta {
            v: REPO_FORMAT,
            paths: vec!["/srv".into()],
            excludes: Vec::new(),
            task_id: TaskId::new("t-1").expect("valid"),
            summary: BackupSummary::default(),
            unreadable: Vec::new(),
            tree: Some(tree),
            host: Some("nas".into()),
            time: Some(5),
        };
        let plain = rmp_serde::to_vec_named(&meta).expect("encodes");
        let sealed = k
            .seal_meta(&SnapshotRecord::meta_context(&id), &plain)
            .expect("seals");
        let rec = SnapshotRecord {
            v: REPO_FORMAT,
            id: id.clone(),
            host: HostName::new("nas").expect("valid"),
            time: 5,
            tree,
            partial: false,
            blobs: vec![tree],
            meta: sealed,
        };
        assert_eq!(rec.verify(&k), Ok(meta));
        assert_eq!(rec.snapshot_id().map(String::from), Ok(id.clone()));
        let mut moved = rec.clone();
        moved.time = 6;
        assert_eq!(
            moved.verify(&k),
            Err(SnapshotVerifyError::Tampered { id: id.clone() })
        );
        assert_eq!(rec.verify(&key(2)), Err(SnapshotVerifyError::Sealed { id }));
        let mut odd = rec;
        odd.id = "../x".into();
        assert!(odd.snapshot_id().is_err());
    }

    #[test]
    fn ids_are_keyed() {
        assert_ne!(key(1).blob_id(b"x"), key(2).blob_id(b"x"));
    }
}
