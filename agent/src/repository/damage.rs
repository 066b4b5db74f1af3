//! Damage records: which stored copies are known to be damaged.
//!
//! When `check --read-data` or a read finds a copy of a blob whose bytes are
//! not the ones written, that copy leaves the in-memory index at once, so a
//! backup's `have` answers "missing" and the source uploads the blob again
//! into a new pack (which heals every snapshot that references it), and a
//! record of it is written to `DIR/damaged/<pack id>.dmg`, so that the next
//! open, which loads every index again, does not bring the copy back.
//!
//! A record names *copies* (a pack and the blobs in it), not blob ids: once a
//! good copy is uploaded again, the damaged one still sits in its pack, and
//! since a blob indexed twice keeps whichever location is loaded first,
//! forgetting the record would let the next open pick the damaged copy
//! again. A record therefore lasts as long as its pack: `repair` (or `prune`)
//! deletes it after the pack. A damaged blob stops being *lost* as soon as a
//! good copy is indexed ([`Repository::damaged_blobs`] lists only the lost).
//!
//! ```text
//! { v: 1, pack: "<64 hex>", fault: "<text>" | nil,
//!   blobs: [ { id: bin32, offset: u64 } ], dropping: bool }
//! ```
//!
//! MessagePack with named fields, written like every file here (tmp, fsync,
//! rename, fsync the directory). `fault` says what is wrong with the pack as
//! a whole (bad trailer, a structural fault, a wrong size), for `repair`,
//! which rewrites such a pack even when each blob is intact. `dropping` is
//! set by `repair` just before it deletes the pack, once every intact blob of
//! it is durable elsewhere: a crash between the deletions may leave the pack
//! without its index, and this says a later repair may finish the deletion
//! even if the pack's damage hides some of its blobs. A record that
//! does not read (damaged, or of a newer version) counts as "every copy in
//! this pack is damaged": the safe side, as nothing then dedups against the
//! pack, and `repair` re-verifies every blob of it before moving it.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use flotilla_protocol::repo::BlobId;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::format::{hex32, parse_hex32, PackId};
use super::{index, remove_durably, write_atomic, RepoError, Repository, MAX_PACK_ENTRIES};

/// Version of the `.dmg` format this build writes and reads.
pub(crate) const DAMAGE_VERSION: u16 = 1;
/// Largest record read: a record lists at most one entry per blob of its
/// pack (at most [`MAX_PACK_ENTRIES`], about 50 bytes each).
const MAX_RECORD_BYTES: u64 = 16 * 1024 * 1024;

/// One `.dmg` file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct DamageFile {
    /// [`DAMAGE_VERSION`].
    pub v: u16,
    /// The pack's id, hex (must match the file name).
    pub pack: String,
    /// What is wrong with the pack as a whole, if anything.
    #[serde(default)]
    pub fault: Option<String>,
    /// The damaged copies, in the order found.
    #[serde(default)]
    pub blobs: Vec<DamagedCopy>,
    /// Set by `repair` once every intact blob of the pack is stored
    /// elsewhere, just before it deletes the pack.
    #[serde(default)]
    pub dropping: bool,
}

/// One damaged copy: the blob, and where its sealed bytes start in the pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct DamagedCopy {
    /// The blob.
    pub id: BlobId,
    /// Offset of its sealed bytes in the pack (for people and tools; the
    /// repository goes by the id).
    pub offset: u64,
}

impl DamageFile {
    fn new(pack: &PackId) -> Self {
        Self {
            v: DAMAGE_VERSION,
            pack: hex32(pack),
            fault: None,
            blobs: Vec::new(),
            dropping: false,
        }
    }

    /// A record that marks a pack for `repair` without naming a blob.
    pub(super) fn fault_only(pack: &PackId, fault: impl Into<String>) -> Self {
        Self {
            fault: Some(fault.into()),
            ..Self::new(pack)
        }
    }

    /// Adds what is not recorded yet; returns whether anything was.
    fn merge(&mut self, blobs: &[(BlobId, u64)], fault: Option<&str>) -> bool {
        let mut changed = false;
        if self.fault.is_none() {
            if let Some(f) = fault {
                self.fault = Some(f.to_owned());
                changed = true;
            }
        }
        let mut known: HashSet<BlobId> = self.blobs.iter().map(|b| b.id).collect();
        for (id, offset) in blobs {
            if known.insert(*id) {
                self.blobs.push(DamagedCopy {
                    id: *id,
                    offset: *offset,
                });
                changed = true;
            }
        }
        changed
    }

    fn recorded(&self) -> Recorded {
        Recorded::Blobs {
            ids: self.blobs.iter().map(|b| b.id).collect(),
            fault: self.fault.clone(),
        }
    }
}

/// What is known to be damaged in one pack, as memory keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Recorded {
    /// These copies are damaged (perhaps none), and perhaps the pack's
    /// structure (`fault`).
    Blobs {
        /// The damaged copies.
        ids: HashSet<BlobId>,
        /// What is wrong with the pack as a whole.
        fault: Option<String>,
    },
    /// The record does not read: every copy in the pack counts as damaged.
    Whole {
        /// Why the record does not read.
        why: String,
    },
}

impl Recorded {
    /// Whether the copy of `id` in this pack counts as damaged.
    pub(super) fn covers(&self, id: &BlobId) -> bool {
        match self {
            Self::Blobs { ids, .. } => ids.contains(id),
            Self::Whole { .. } => true,
        }
    }

    /// What is wrong with the pack as a whole, for people.
    pub(super) fn fault(&self) -> Option<&str> {
        match self {
            Self::Blobs { fault, .. } => fault.as_deref(),
            Self::Whole { why } => Some(why),
        }
    }

    /// Both records' damage.
    pub(super) fn merge(self, other: Recorded) -> Recorded {
        match (self, other) {
            (w @ Self::Whole { .. }, _) | (_, w @ Self::Whole { .. }) => w,
            (
                Self::Blobs { mut ids, fault },
                Self::Blobs {
                    ids: more,
                    fault: other_fault,
                },
            ) => {
                ids.extend(more);
                Self::Blobs {
                    ids,
                    fault: fault.or(other_fault),
                }
            }
        }
    }
}

/// `DIR/damaged/<pack id>.dmg`.
pub(super) fn record_path(dir: &Path, pack: &PackId) -> PathBuf {
    dir.join("damaged").join(format!("{}.dmg", hex32(pack)))
}

/// Reads the record of `pack`: `None` if there is none, `Corrupt` if it
/// does not read as a record of this version for this pack.
pub(super) fn read_record(dir: &Path, pack: &PackId) -> Result<Option<DamageFile>, RepoError> {
    let path = record_path(dir, pack);
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(RepoError::io("open", &path, e)),
    };
    let mut bytes = Vec::new();
    file.take(MAX_RECORD_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| RepoError::io("read", &path, e))?;
    if bytes.len() as u64 > MAX_RECORD_BYTES {
        return Err(RepoError::corrupt(&path, "larger than any damage record"));
    }
    let rec: DamageFile = flotilla_protocol::decode(&bytes, MAX_RECORD_BYTES as usize)
        .map_err(|e| RepoError::corrupt(&path, e.to_string()))?;
    if rec.v != DAMAGE_VERSION {
        return Err(RepoError::corrupt(
            &path,
            format!(
                "damage record version {} (this build reads {DAMAGE_VERSION})",
                rec.v
            ),
        ));
    }
    if parse_hex32(&rec.pack) != Some(*pack) {
        return Err(RepoError::corrupt(
            &path,
            "record names another pack than its file name",
        ));
    }
    if rec.blobs.len() > MAX_PACK_ENTRIES {
        return Err(RepoError::corrupt(
            &path,
            format!("{} entries, more than a pack holds", rec.blobs.len()),
        ));
    }
    Ok(Some(rec))
}

/// What the record of `pack` says, if there is one; a record that does not
/// read counts as [`Recorded::Whole`]. Only an I/O error is an error.
pub(super) fn recorded(dir: &Path, pack: &PackId) -> Result<Option<Recorded>, RepoError> {
    match read_record(dir, pack) {
        Ok(rec) => Ok(rec.map(|r| r.recorded())),
        Err(RepoError::Corrupt { path, reason }) => Ok(Some(Recorded::Whole {
            why: format!("damage record {} does not read: {reason}", path.display()),
        })),
        Err(e) => Err(e),
    }
}

/// Writes the record of `pack` atomically.
pub(super) fn write_record(dir: &Path, pack: &PackId, rec: &DamageFile) -> Result<(), RepoError> {
    let bytes = flotilla_protocol::encode(rec)
        .map_err(|e| RepoError::invalid("damage record", e.to_string()))?;
    write_atomic(dir, &record_path(dir, pack), &bytes)
}

/// Removes the record of `pack`, durably; whether there was one.
pub(super) fn remove_record(dir: &Path, pack: &PackId) -> Result<bool, RepoError> {
    remove_durably(&record_path(dir, pack))
}

/// Every record, by pack id. A record that does not read, for whatever
/// reason, counts as [`Recorded::Whole`]: loading errs on the side of not
/// offering a copy. Only a directory that cannot be listed is an error.
pub(super) fn load_all(dir: &Path) -> Result<HashMap<PackId, Recorded>, RepoError> {
    let mut out = HashMap::new();
    let list = match index::list_ids(&dir.join("damaged"), ".dmg") {
        Ok(list) => list,
        // A repository created by an older build, not yet opened by this one.
        Err(RepoError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            return Ok(out)
        }
        Err(e) => return Err(e),
    };
    for (pack, _) in list {
        let rec = match recorded(dir, &pack) {
            Ok(Some(rec)) => rec,
            Ok(None) => continue,
            Err(e) => Recorded::Whole { why: e.to_string() },
        };
        if let Recorded::Whole { why } = &rec {
            warn!(pack = %hex32(&pack), %why, "every blob of this pack counts as damaged; run repair");
        }
        out.insert(pack, rec);
    }
    Ok(out)
}

impl Repository {
    /// Takes damaged copies in `pack` out of the in-memory index at once and
    /// records them (with `fault`, what is wrong with the pack as a whole),
    /// so that no backup dedups against them, now or after a restart.
    ///
    /// Memory first: that is what stops dedup in this process, and a crash
    /// before the record is durable loses only the finding (the next check
    /// finds it again), never data.
    pub(super) fn mark_damaged(
        &self,
        pack: &PackId,
        blobs: &[(BlobId, u64)],
        fault: Option<&str>,
    ) -> Result<(), RepoError> {
        let dir = &self.shared.dir;
        let _records = self.shared.records();
        self.shared.write_index().add_damage(
            *pack,
            Recorded::Blobs {
                ids: blobs.iter().map(|(id, _)| *id).collect(),
                fault: fault.map(str::to_owned),
            },
        );
        let mut rec = match read_record(dir, pack) {
            Ok(Some(rec)) => rec,
            Ok(None) => DamageFile::new(pack),
            // A record that does not read already counts the whole pack as
            // damaged, which covers these copies; it is kept as evidence.
            Err(RepoError::Corrupt { .. }) => return Ok(()),
            Err(e) => return Err(e),
        };
        if !rec.merge(blobs, fault) {
            return Ok(());
        }
        write_record(dir, pack, &rec)?;
        info!(
            pack = %rec.pack,
            blobs = rec.blobs.len(),
            fault = rec.fault.as_deref().unwrap_or(""),
            "recorded damage; its blobs are no longer offered to backups (run repair)"
        );
        Ok(())
    }

    /// Blobs recorded as damaged of which no good copy is indexed, sorted:
    /// lost until a backup uploads them again (or `repair` finds a copy
    /// intact after all). A blob leaves this list as soon as a good copy is
    /// indexed. Copies in packs whose record does not read are not listed
    /// (the record cannot say which).
    pub fn damaged_blobs(&self) -> Vec<BlobId> {
        let index = self.shared.read_index();
        let mut out: Vec<BlobId> = index
            .damaged
            .values()
            .filter_map(|d| match d {
                Recorded::Blobs { ids, .. } => Some(ids),
                Recorded::Whole { .. } => None,
            })
            .flatten()
            .filter(|id| !index.blobs.contains_key(*id))
            .copied()
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(b: u8) -> BlobId {
        BlobId([b; 32])
    }

    #[test]
    fn a_record_round_trips_merges_and_a_bad_one_counts_as_the_whole_pack() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(Repository::open_or_init(dir.path()).expect("open"));
        let pack = [7u8; 32];
        assert_eq!(recorded(dir.path(), &pack).expect("reads"), None);

        let mut rec = DamageFile::new(&pack);
        assert!(rec.merge(&[(id(1), 83)], None));
        assert!(!rec.merge(&[(id(1), 83)], None), "nothing new");
        assert!(rec.merge(&[(id(2), 200)], Some("bad trailer")));
        write_record(dir.path(), &pack, &rec).expect("write");
        assert_eq!(
            read_record(dir.path(), &pack).expect("reads"),
            Some(rec.clone())
        );
        let r = recorded(dir.path(), &pack).expect("reads").expect("some");
        assert!(r.covers(&id(1)) && r.covers(&id(2)) && !r.covers(&id(3)));
        assert_eq!(r.fault(), Some("bad trailer"));
        assert_eq!(load_all(dir.path()).expect("loads").get(&pack), Some(&r));

        // Garbage, a newer version, another pack's record: every copy in the
        // pack counts as damaged.
        let path = record_path(dir.path(), &pack);
        let newer = DamageFile {
            v: 2,
            ..rec.clone()
        };
        let other = DamageFile {
            pack: hex32(&[8u8; 32]),
            ..rec.clone()
        };
        for bytes in [
            b"\xc1garbage".to_vec(),
            flotilla_protocol::encode(&newer).expect("encodes"),
            flotilla_protocol::encode(&other).expect("encodes"),
        ] {
            std::fs::write(&path, bytes).expect("write");
            let r = recorded(dir.path(), &pack).expect("reads").expect("some");
            assert!(matches!(r, Recorded::Whole { .. }), "{r:?}");
            assert!(r.covers(&id(99)));
        }

        assert!(remove_record(dir.path(), &pack).expect("removes"));
        assert!(!remove_record(dir.path(), &pack).expect("removes"));
        assert!(load_all(dir.path()).expect("loads").is_empty());
    }

    #[test]
    fn merging_keeps_every_copy_and_whole_wins() {
        let a = Recorded::Blobs {
            ids: [id(1)].into_iter().collect(),
            fault: None,
        };
        let b = Recorded::Blobs {
            ids: [id(2)].into_iter().collect(),
            fault: Some("x".into()),
        };
        let both = a.clone().merge(b);
        assert!(both.covers(&id(1)) && both.covers(&id(2)));
        assert_eq!(both.fault(), Some("x"));
        let whole = a.merge(Recorded::Whole { why: "w".into() });
        assert!(whole.covers(&id(3)));
    }
}
