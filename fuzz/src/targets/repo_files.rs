//! A repository directory made from the input, opened and read through the
//! agent's public API (`flotilla_agent::repository::Repository`): this
//! reaches the `.idx` reader and validator, the pack scanner (re-indexing
//! and `check --read-data`), the entry-header check of `read_blob` and the
//! snapshot reader, exactly as a storage agent runs them on its disk, with
//! no change to the agent.
//!
//! Input: one flags byte, then the pack, the index and the damage record
//! (`DIR/damaged/<pack>.dmg`, where the agent has one), each behind a `u16`
//! big-endian length, then the snapshot file (the rest).
//!
//! | flag | meaning |
//! |------|---------|
//! | 0x01 | write the right BLAKE3 into each entry header of the pack |
//! | 0x02 | write a right trailer (magic, count, hash) |
//! | 0x04 | replace the index by one made from the pack's entries |
//! | 0x08 | no pack file |
//! | 0x10 | no index file |
//! | 0x20 | no snapshot file |
//! | 0x40 | make the snapshot well named and point it at the pack's blobs |
//! | 0x80 | replace the damage record by one naming the pack's first blob |
//!
//! The pack is named by the BLAKE3 of its (fixed-up) bytes, as a real one;
//! the index and the damage record are named after the pack; an empty
//! damage record part means no record file.

use std::fs;
use std::path::PathBuf;
use std::sync::{LazyLock, Mutex, PoisonError};

use flotilla_agent::repository::Repository;
use flotilla_protocol::frame::MAX_FRAME;
use flotilla_protocol::repo::{BlobId, BlobKind, SnapshotRecord, MAX_SEALED, REPO_FORMAT};
use flotilla_protocol::{decode, encode};
use serde::{Deserialize, Serialize};

use crate::common::{hex32, host, scratch, NOW, SNAPSHOT_ID};
use crate::packfmt::{self, Walk};

const IDX_FROM_PACK: u8 = 0x04;
const NO_PACK: u8 = 0x08;
const NO_IDX: u8 = 0x10;
const NO_SNAPSHOT: u8 = 0x20;
const NORMALISE_SNAPSHOT: u8 = 0x40;
const DAMAGE_FROM_PACK: u8 = 0x80;

/// The `.idx` file's shape (agent/src/repository/format.rs `IndexFile`,
/// `pub(crate)` there; docs/repository.md).
#[derive(Serialize, Deserialize)]
struct Idx {
    v: u16,
    pack: String,
    size: u64,
    entries: Vec<IdxEntry>,
}

#[derive(Serialize, Deserialize)]
struct IdxEntry {
    id: BlobId,
    kind: BlobKind,
    offset: u64,
    length: u32,
    #[serde(with = "serde_bytes")]
    hash: [u8; 32],
}

/// A damage record's shape (agent/src/repository/damage.rs `DamageFile`,
/// new with `repair`; a build without it ignores `DIR/damaged/`).
#[derive(Serialize)]
struct Damage {
    v: u16,
    pack: String,
    fault: Option<String>,
    blobs: Vec<DamagedCopy>,
}

#[derive(Serialize)]
struct DamagedCopy {
    id: BlobId,
    offset: u64,
}

/// The input, split.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    /// The flags byte.
    pub flags: u8,
    /// The pack file.
    pub pack: &'a [u8],
    /// The index file.
    pub idx: &'a [u8],
    /// The damage record (none when empty).
    pub damage: &'a [u8],
    /// The snapshot file.
    pub snap: &'a [u8],
}

/// Splits an input as the table above says; short inputs give empty parts.
pub fn split(data: &[u8]) -> Input<'_> {
    fn take(d: &[u8]) -> (&[u8], &[u8]) {
        if d.len() < 2 {
            return (&[], d);
        }
        let n = (u16::from_be_bytes([d[0], d[1]]) as usize).min(d.len() - 2);
        d[2..].split_at(n)
    }
    let flags = data.first().copied().unwrap_or(0);
    let (pack, rest) = take(data.get(1..).unwrap_or(&[]));
    let (idx, rest) = take(rest);
    let (damage, snap) = take(rest);
    Input {
        flags,
        pack,
        idx,
        damage,
        snap,
    }
}

/// The scratch repository, initialised once per process; the lock keeps two
/// test threads out of each other's files.
static REPO_DIR: LazyLock<Mutex<PathBuf>> = LazyLock::new(|| {
    let dir = scratch().join("repo");
    drop(Repository::open_or_init(&dir).expect("initialise the scratch repository"));
    Mutex::new(dir)
});

/// Writes the files, opens the repository (which must always open), reads
/// every blob any of the files names, lists and reads the snapshot, and
/// runs `check` with and without `--read-data`. `contains` and `missing`
/// agree; a blob that reads is in the pack under its id; a check that passes
/// lists no damage, and after a passing `--read-data` every indexed blob
/// reads.
pub fn repo_files(data: &[u8]) {
    let input = split(data);
    let flags = input.flags;
    let mut pack = input.pack.to_vec();
    packfmt::fix(&mut pack, flags);
    let pack_id = *blake3::hash(&pack).as_bytes();
    let walked = packfmt::walk(&pack);
    let idx = if flags & IDX_FROM_PACK != 0 {
        index_of(&pack, &pack_id, &walked)
    } else {
        input.idx.to_vec()
    };
    let damage = if flags & DAMAGE_FROM_PACK != 0 {
        damage_of(&pack_id, &walked)
    } else {
        input.damage.to_vec()
    };
    let snap = if flags & NORMALISE_SNAPSHOT != 0 {
        normalise(input.snap, &walked)
    } else {
        input.snap.to_vec()
    };

    let guard = REPO_DIR.lock().unwrap_or_else(PoisonError::into_inner);
    let dir = guard.as_path();
    for sub in ["packs", "index", "snapshots", "damaged"] {
        let p = dir.join(sub);
        let _ = fs::remove_dir_all(&p);
        fs::create_dir_all(&p).expect("scratch repository layout");
    }
    let hex = hex32(&pack_id);
    if flags & NO_PACK == 0 {
        let fan = dir.join("packs").join(&hex[..2]);
        fs::create_dir_all(&fan).expect("pack directory");
        fs::write(fan.join(format!("{hex}.pack")), &pack).expect("write pack");
    }
    if flags & NO_IDX == 0 {
        fs::write(dir.join("index").join(format!("{hex}.idx")), &idx).expect("write index");
    }
    if !damage.is_empty() {
        let path = dir.join("damaged").join(format!("{hex}.dmg"));
        fs::write(path, &damage).expect("write damage record");
    }
    if flags & NO_SNAPSHOT == 0 {
        let path = dir.join("snapshots").join(format!("{SNAPSHOT_ID}.snap"));
        fs::write(path, &snap).expect("write snapshot");
    }

    // Damaged files are findings, never a reason the storage agent cannot start.
    let repo = Repository::open_or_init(dir)
        .unwrap_or_else(|e| panic!("a damaged file stopped the repository from opening: {e}"));

    let mut ids: Vec<BlobId> = walked.entries.iter().map(|e| BlobId(e.id)).collect();
    if let Ok(i) = decode::<Idx>(&idx, usize::MAX) {
        ids.extend(i.entries.iter().map(|e| e.id));
    }
    if let Ok(rec) = decode::<SnapshotRecord>(&snap, MAX_FRAME) {
        ids.push(rec.tree);
        ids.extend(rec.blobs.iter().copied());
    }
    ids.sort();
    ids.dedup();

    // Before any read: a read that finds damage takes copies out of the index.
    let missing = repo.missing(&ids);
    for id in &ids {
        assert_eq!(
            repo.contains(id),
            !missing.contains(id),
            "contains and missing disagree on {id}"
        );
    }
    for id in &ids {
        let present = repo.contains(id);
        match repo.read_blob(id) {
            Ok((_kind, sealed)) => {
                assert!(present, "read blob {id}, which the index does not hold");
                assert!(sealed.len() <= MAX_SEALED);
                assert!(
                    flags & NO_PACK == 0 && packfmt::holds(&pack, &id.0, &sealed),
                    "read_blob returned bytes the pack does not hold under {id}"
                );
            }
            Err(e) => {
                let _ = (e.code(), e.is_retryable(), e.to_string());
            }
        }
    }
    let _ = repo.stats();

    if let Ok(list) = repo.snapshots() {
        for rec in &list {
            assert_eq!(rec.id, SNAPSHOT_ID, "a snapshot read under another name");
            assert!(rec.v >= 1 && rec.v <= REPO_FORMAT);
        }
    }
    if let Ok(rec) = repo.snapshot(SNAPSHOT_ID) {
        assert_eq!(rec.id, SNAPSHOT_ID);
    }
    let _ = repo.snapshot(&SNAPSHOT_ID[..4]);

    for read_data in [false, true] {
        let report = repo.check(read_data);
        if report.is_ok() {
            assert!(
                report.damaged_blobs.is_empty() && report.affected_snapshots.is_empty(),
                "check passed but lists damage: {report:?}"
            );
        }
        if read_data && report.is_ok() {
            for id in ids.iter().filter(|id| repo.contains(id)) {
                if let Err(e) = repo.read_blob(id) {
                    panic!("check --read-data passed, but blob {id} does not read: {e}");
                }
            }
        }
    }
}

/// An index that describes the pack's entries as they parse.
fn index_of(pack: &[u8], pack_id: &[u8; 32], walked: &Walk) -> Vec<u8> {
    let idx = Idx {
        v: 1,
        pack: hex32(pack_id),
        size: pack.len() as u64,
        entries: walked
            .entries
            .iter()
            .map(|e| IdxEntry {
                id: BlobId(e.id),
                kind: if e.kind == 0 {
                    BlobKind::Data
                } else {
                    BlobKind::Tree
                },
                offset: e.offset,
                length: e.length,
                hash: e.hash,
            })
            .collect(),
    };
    encode(&idx).expect("an index encodes")
}

/// A damage record naming the pack's first blob (an empty record, so no
/// file, when the pack has none).
fn damage_of(pack_id: &[u8; 32], walked: &Walk) -> Vec<u8> {
    let Some(first) = walked.entries.first() else {
        return Vec::new();
    };
    let rec = Damage {
        v: 1,
        pack: hex32(pack_id),
        fault: None,
        blobs: vec![DamagedCopy {
            id: BlobId(first.id),
            offset: first.offset,
        }],
    };
    encode(&rec).expect("a damage record encodes")
}

/// The snapshot file with the expected id and version, naming the pack's
/// blobs (the first as its tree) when the pack has any.
fn normalise(snap: &[u8], walked: &Walk) -> Vec<u8> {
    let mut rec = decode::<SnapshotRecord>(snap, MAX_FRAME).unwrap_or_else(|_| SnapshotRecord {
        v: REPO_FORMAT,
        id: String::new(),
        host: host().clone(),
        time: NOW,
        tree: BlobId([0; 32]),
        partial: false,
        blobs: Vec::new(),
        meta: Vec::new(),
    });
    rec.id = SNAPSHOT_ID.into();
    rec.v = REPO_FORMAT;
    let mut blobs: Vec<BlobId> = walked.entries.iter().map(|e| BlobId(e.id)).collect();
    if let Some(first) = blobs.first() {
        rec.tree = *first;
    }
    blobs.sort();
    blobs.dedup();
    if !blobs.is_empty() {
        rec.blobs = blobs;
    }
    encode(&rec).expect("a record encodes")
}
