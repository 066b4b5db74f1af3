//! The bytes on disk: the pack file format, the pack scanner, and the `.idx`
//! file. No directory logic here; callers decide what a finding means.
//!
//! A pack is self-describing so that a lost index can be rebuilt from it:
//!
//! ```text
//! header   "FLOTPACK" | version u16 BE (1)
//! entry*   "BLOB" | kind u8 (0 data, 1 tree) | id [32] | length u32 BE
//!          | BLAKE3(sealed) [32] | sealed bytes
//! trailer  "FLOTEND\0" | entry count u32 BE | BLAKE3(everything before the trailer) [32]
//! ```
//!
//! The pack's id is the unkeyed BLAKE3 of the whole file, trailer included,
//! so a pack's name checks its content.

use std::fs::File;
use std::io::{self, BufReader, Read};
use std::path::Path;

use flotilla_protocol::repo::{BlobId, BlobKind, MAX_SEALED};
use serde::{Deserialize, Serialize};

/// Magic at the start of every pack.
pub(crate) const PACK_MAGIC: &[u8; 8] = b"FLOTPACK";
/// Pack format version this build writes and reads.
pub(crate) const PACK_VERSION: u16 = 1;
/// Length of the pack header.
pub const HEADER_LEN: u64 = 10;
/// Magic at the start of every entry.
pub(crate) const ENTRY_MAGIC: &[u8; 4] = b"BLOB";
/// Length of an entry header (magic, kind, id, length, hash).
pub const ENTRY_HEADER_LEN: u64 = 4 + 1 + 32 + 4 + 32;
/// Magic at the start of the trailer.
pub(crate) const TRAILER_MAGIC: &[u8; 8] = b"FLOTEND\0";
/// Length of the trailer (magic, count, hash).
pub const TRAILER_LEN: u64 = 8 + 4 + 32;
/// `.idx` format version this build writes and reads.
pub const IDX_VERSION: u16 = 1;
/// Largest `.idx` file read. The writer caps entries per pack, which keeps
/// honest indexes far below this; anything larger is not ours.
pub const MAX_IDX_BYTES: u64 = 32 * 1024 * 1024;

/// A pack's name: BLAKE3 of the whole file.
pub type PackId = [u8; 32];

/// Lowercase hex of 32 bytes (the agent does not depend on `hex`).
pub fn hex32(bytes: &[u8; 32]) -> String {
    blake3::Hash::from_bytes(*bytes).to_hex().to_string()
}

/// Parses 64 lowercase hex digits, refusing anything else (file names are
/// attacker-adjacent: nothing but our own spelling is accepted).
pub fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64
        || !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    blake3::Hash::from_hex(s).ok().map(|h| *h.as_bytes())
}

/// The byte a kind is stored as.
pub(crate) fn kind_byte(kind: BlobKind) -> u8 {
    match kind {
        BlobKind::Data => 0,
        BlobKind::Tree => 1,
    }
}

/// The kind a stored byte means.
pub(crate) fn kind_from_byte(b: u8) -> Option<BlobKind> {
    match b {
        0 => Some(BlobKind::Data),
        1 => Some(BlobKind::Tree),
        _ => None,
    }
}

/// The pack header.
pub(crate) fn header() -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[..8].copy_from_slice(PACK_MAGIC);
    h[8..].copy_from_slice(&PACK_VERSION.to_be_bytes());
    h
}

/// The header written before one blob's sealed bytes.
pub fn entry_header(
    id: &BlobId,
    kind: BlobKind,
    len: u32,
    hash: &[u8; 32],
) -> [u8; ENTRY_HEADER_LEN as usize] {
    let mut h = [0u8; ENTRY_HEADER_LEN as usize];
    h[..4].copy_from_slice(ENTRY_MAGIC);
    h[4] = kind_byte(kind);
    h[5..37].copy_from_slice(&id.0);
    h[37..41].copy_from_slice(&len.to_be_bytes());
    h[41..73].copy_from_slice(hash);
    h
}

/// A parsed entry header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryHeader {
    pub id: BlobId,
    pub kind: BlobKind,
    pub len: u32,
    pub hash: [u8; 32],
}

/// Parses an entry header; `None` if the magic or kind is wrong.
pub fn parse_entry_header(h: &[u8; ENTRY_HEADER_LEN as usize]) -> Option<EntryHeader> {
    if &h[..4] != ENTRY_MAGIC {
        return None;
    }
    let kind = kind_from_byte(h[4])?;
    let id = BlobId(h[5..37].try_into().ok()?);
    let len = u32::from_be_bytes(h[37..41].try_into().ok()?);
    let hash: [u8; 32] = h[41..73].try_into().ok()?;
    Some(EntryHeader {
        id,
        kind,
        len,
        hash,
    })
}

/// The trailer of a pack with `count` entries whose bytes so far hash to `body_hash`.
pub(crate) fn trailer(count: u32, body_hash: &[u8; 32]) -> [u8; TRAILER_LEN as usize] {
    let mut t = [0u8; TRAILER_LEN as usize];
    t[..8].copy_from_slice(TRAILER_MAGIC);
    t[8..12].copy_from_slice(&count.to_be_bytes());
    t[12..].copy_from_slice(body_hash);
    t
}

/// One blob of one pack, as an `.idx` file lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexEntry {
    /// The blob.
    pub id: BlobId,
    /// What it holds.
    pub kind: BlobKind,
    /// Offset of the sealed bytes (after the entry header) in the pack.
    pub offset: u64,
    /// Length of the sealed bytes.
    pub length: u32,
    /// BLAKE3 of the sealed bytes.
    #[serde(with = "serde_bytes")]
    pub hash: [u8; 32],
}

/// The `.idx` file of one pack (MessagePack, named fields).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexFile {
    /// [`IDX_VERSION`].
    pub v: u16,
    /// The pack's id, hex.
    pub pack: String,
    /// The pack file's size in bytes.
    pub size: u64,
    /// Its blobs, in file order.
    pub entries: Vec<IndexEntry>,
}

/// Why an `.idx` file cannot be trusted: what is wrong with which entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IndexInvalid {
    /// Another format version.
    #[error("index version {found} (this build reads {IDX_VERSION})")]
    Version {
        /// The version the file states.
        found: u16,
    },
    /// The index describes another pack than its file name says.
    #[error("index names pack {named:?}, not the pack of its file name")]
    WrongPack {
        /// The pack id the file states, as written.
        named: String,
    },
    /// A blob larger than any sealed blob can be.
    #[error("blob {id} has length {length} > {MAX_SEALED}")]
    TooLong {
        /// The blob.
        id: BlobId,
        /// Its stated length.
        length: u32,
    },
    /// A blob that does not start right after the one before it.
    #[error("blob {id} at offset {offset} where {expected} was expected")]
    Misplaced {
        /// The blob.
        id: BlobId,
        /// Its stated offset.
        offset: u64,
        /// Where the entries before it end, plus its entry header.
        expected: u64,
    },
    /// The entries and the trailer do not fill the pack exactly.
    #[error("entries end at {end} but the pack size is {size}")]
    WrongSize {
        /// Where the last entry ends.
        end: u64,
        /// The pack size the index states.
        size: u64,
    },
}

impl IndexFile {
    /// Checks that the index is one this build reads, names `pack`, and
    /// describes a well-formed pack of `size` bytes: entries in order, inside
    /// the file, each no larger than [`MAX_SEALED`], ending at the trailer.
    /// Everything later trusts offsets and lengths only after this.
    pub fn validate(&self, pack: &PackId) -> Result<(), IndexInvalid> {
        if self.v != IDX_VERSION {
            return Err(IndexInvalid::Version { found: self.v });
        }
        if parse_hex32(&self.pack) != Some(*pack) {
            return Err(IndexInvalid::WrongPack {
                named: self.pack.clone(),
            });
        }
        let mut end = HEADER_LEN;
        for e in &self.entries {
            if e.length as usize > MAX_SEALED {
                return Err(IndexInvalid::TooLong {
                    id: e.id,
                    length: e.length,
                });
            }
            if e.offset != end + ENTRY_HEADER_LEN {
                return Err(IndexInvalid::Misplaced {
                    id: e.id,
                    offset: e.offset,
                    expected: end + ENTRY_HEADER_LEN,
                });
            }
            end = e.offset + u64::from(e.length);
        }
        if end + TRAILER_LEN != self.size {
            return Err(IndexInvalid::WrongSize {
                end,
                size: self.size,
            });
        }
        Ok(())
    }
}

/// What reading a whole pack found.
#[derive(Debug, Default)]
pub struct Scan {
    /// Entries whose header parsed, in file order (damaged ones included).
    pub entries: Vec<IndexEntry>,
    /// Entries whose sealed bytes do not hash to their stored hash.
    pub damaged: Vec<IndexEntry>,
    /// A structural fault: bad header, truncated entry, bad trailer. Entries
    /// after the fault were not seen.
    pub fault: Option<String>,
    /// BLAKE3 of the whole file as read, when it was read to the end.
    pub pack_hash: Option<PackId>,
}

impl Scan {
    /// Whether the pack is entirely intact and named `id`.
    pub fn is_intact(&self, id: &PackId) -> bool {
        self.fault.is_none() && self.damaged.is_empty() && self.pack_hash.as_ref() == Some(id)
    }
}

/// Reads the pack at `path` from start to end, verifying every hash. Memory
/// stays bounded whatever the file holds: blobs are streamed through the
/// hashers, never held. I/O errors are errors; damage is a finding.
pub fn scan_pack(path: &Path) -> io::Result<Scan> {
    let file = File::open(path)?;
    let size = file.metadata()?.len();
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut scan = Scan::default();
    if size < HEADER_LEN + TRAILER_LEN {
        scan.fault = Some(format!("{size} bytes is too short for a pack"));
        return Ok(scan);
    }
    let mut whole = blake3::Hasher::new();
    let mut head = [0u8; HEADER_LEN as usize];
    r.read_exact(&mut head)?;
    whole.update(&head);
    if head != header() {
        scan.fault = Some("not a flotilla pack (bad magic or unknown version)".into());
        return Ok(scan);
    }
    let body_end = size - TRAILER_LEN;
    let mut pos = HEADER_LEN;
    let mut buf = vec![0u8; 64 * 1024];
    while pos < body_end {
        if body_end - pos < ENTRY_HEADER_LEN {
            scan.fault = Some(format!("truncated entry header at offset {pos}"));
            return Ok(scan);
        }
        let mut eh = [0u8; ENTRY_HEADER_LEN as usize];
        r.read_exact(&mut eh)?;
        whole.update(&eh);
        let Some(h) = parse_entry_header(&eh) else {
            scan.fault = Some(format!("bad entry header at offset {pos}"));
            return Ok(scan);
        };
        let offset = pos + ENTRY_HEADER_LEN;
        if h.len as usize > MAX_SEALED || offset + u64::from(h.len) > body_end {
            scan.fault = Some(format!(
                "blob {} at offset {offset} claims {} bytes, beyond the pack or the limit",
                h.id, h.len
            ));
            return Ok(scan);
        }
        let mut blob = blake3::Hasher::new();
        let mut left = h.len as usize;
        while left > 0 {
            let n = left.min(buf.len());
            r.read_exact(&mut buf[..n])?;
            blob.update(&buf[..n]);
            whole.update(&buf[..n]);
            left -= n;
        }
        let entry = IndexEntry {
            id: h.id,
            kind: h.kind,
            offset,
            length: h.len,
            hash: h.hash,
        };
        if *blob.finalize().as_bytes() != h.hash {
            scan.damaged.push(entry);
        }
        scan.entries.push(entry);
        pos = offset + u64::from(h.len);
    }
    let body_hash = *whole.finalize().as_bytes();
    let mut t = [0u8; TRAILER_LEN as usize];
    r.read_exact(&mut t)?;
    whole.update(&t);
    scan.pack_hash = Some(*whole.finalize().as_bytes());
    if &t[..8] != TRAILER_MAGIC {
        scan.fault = Some("bad trailer magic".into());
    } else if u32::from_be_bytes([t[8], t[9], t[10], t[11]]) as usize != scan.entries.len() {
        scan.fault = Some(format!(
            "trailer counts {} entries, the pack holds {}",
            u32::from_be_bytes([t[8], t[9], t[10], t[11]]),
            scan.entries.len()
        ));
    } else if t[12..] != body_hash {
        scan.fault = Some("trailer hash does not match the pack's content".into());
    }
    Ok(scan)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn pack_bytes(blobs: &[(&BlobId, &[u8])]) -> Vec<u8> {
        let mut out = header().to_vec();
        for (id, sealed) in blobs {
            let hash = *blake3::hash(sealed).as_bytes();
            out.extend_from_slice(&entry_header(
                id,
                BlobKind::Data,
                sealed.len() as u32,
                &hash,
            ));
            out.extend_from_slice(sealed);
        }
        let body = *blake3::hash(&out).as_bytes();
        out.extend_from_slice(&trailer(blobs.len() as u32, &body));
        out
    }

    fn write(dir: &Path, bytes: &[u8]) -> std::path::PathBuf {
        let p = dir.join("p.pack");
        File::create(&p).unwrap().write_all(bytes).unwrap();
        p
    }

    #[test]
    fn scan_verifies_a_good_pack_and_finds_a_flipped_byte() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (BlobId([1; 32]), BlobId([2; 32]));
        let mut bytes = pack_bytes(&[(&a, b"hello"), (&b, b"world!")]);
        let id = *blake3::hash(&bytes).as_bytes();
        let scan = scan_pack(&write(dir.path(), &bytes)).unwrap();
        assert!(scan.is_intact(&id), "{scan:?}");
        assert_eq!(scan.entries.len(), 2);
        assert_eq!(
            scan.entries[1].offset,
            HEADER_LEN + 2 * ENTRY_HEADER_LEN + 5
        );

        bytes[(HEADER_LEN + ENTRY_HEADER_LEN) as usize] ^= 1;
        let scan = scan_pack(&write(dir.path(), &bytes)).unwrap();
        assert_eq!(
            scan.damaged.iter().map(|e| e.id).collect::<Vec<_>>(),
            vec![a]
        );
        assert!(scan.fault.is_some(), "the trailer hash no longer matches");
    }

    #[test]
    fn scan_survives_every_truncation_and_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let a = BlobId([1; 32]);
        let bytes = pack_bytes(&[(&a, &[7u8; 300])]);
        for cut in 0..bytes.len() {
            let scan = scan_pack(&write(dir.path(), &bytes[..cut])).unwrap();
            assert!(
                scan.fault.is_some() || !scan.damaged.is_empty(),
                "cut at {cut}"
            );
        }
        let mut huge = bytes.clone();
        huge[(HEADER_LEN + 37) as usize..(HEADER_LEN + 41) as usize]
            .copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(scan_pack(&write(dir.path(), &huge))
            .unwrap()
            .fault
            .is_some());
        assert!(scan_pack(&write(dir.path(), &[0xffu8; 4096]))
            .unwrap()
            .fault
            .is_some());
    }

    #[test]
    fn idx_validation_rejects_inconsistent_offsets() {
        let pack = [9u8; 32];
        let e = IndexEntry {
            id: BlobId([1; 32]),
            kind: BlobKind::Tree,
            offset: HEADER_LEN + ENTRY_HEADER_LEN,
            length: 5,
            hash: [0; 32],
        };
        let mut idx = IndexFile {
            v: IDX_VERSION,
            pack: hex32(&pack),
            size: e.offset + 5 + TRAILER_LEN,
            entries: vec![e],
        };
        assert_eq!(idx.validate(&pack), Ok(()));
        assert!(matches!(
            idx.validate(&[8u8; 32]),
            Err(IndexInvalid::WrongPack { .. })
        ));
        idx.entries[0].offset += 1;
        assert_eq!(
            idx.validate(&pack),
            Err(IndexInvalid::Misplaced {
                id: e.id,
                offset: e.offset + 1,
                expected: e.offset,
            })
        );
        idx.entries[0].offset -= 1;
        idx.size += 1;
        let wrong_size = idx.validate(&pack).expect_err("one byte too many");
        assert_eq!(
            wrong_size.to_string(),
            format!(
                "entries end at {} but the pack size is {}",
                e.offset + 5,
                idx.size
            )
        );
    }

    #[test]
    fn hex_parsing_is_strict() {
        let h = hex32(&[0xab; 32]);
        assert_eq!(parse_hex32(&h), Some([0xab; 32]));
        assert_eq!(parse_hex32(&h.to_uppercase()), None);
        assert_eq!(parse_hex32("../x"), None);
    }
}
