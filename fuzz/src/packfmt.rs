//! An independent reading of the pack format as docs/repository.md states
//! it, for two jobs: fixing up the checksums in fuzzed packs (no mutation
//! ever produces a matching BLAKE3, so without this the fuzzer would never
//! get past "damaged"), and a second opinion the agent's scanner must agree
//! with (`pack_format`).
//!
//! ```text
//! header   "FLOTPACK" | version u16 BE (1)
//! entry*   "BLOB" | kind u8 (0 data, 1 tree) | id [32] | length u32 BE
//!          | BLAKE3(sealed) [32] | sealed bytes
//! trailer  "FLOTEND\0" | entry count u32 BE | BLAKE3(everything before the trailer) [32]
//! ```

use flotilla_protocol::repo::MAX_SEALED;

/// The pack header: magic and version 1.
pub const HEADER: [u8; 10] = *b"FLOTPACK\x00\x01";
/// Length of an entry header.
pub const ENTRY_HEADER_LEN: usize = 4 + 1 + 32 + 4 + 32;
/// Length of the trailer.
pub const TRAILER_LEN: usize = 8 + 4 + 32;
const ENTRY_MAGIC: &[u8; 4] = b"BLOB";
const TRAILER_MAGIC: &[u8; 8] = b"FLOTEND\0";

/// One entry as its header states it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// Blob id.
    pub id: [u8; 32],
    /// 0 data, 1 tree.
    pub kind: u8,
    /// Offset of the sealed bytes (just after the entry header).
    pub offset: u64,
    /// Length of the sealed bytes.
    pub length: u32,
    /// The stored BLAKE3 of the sealed bytes.
    pub hash: [u8; 32],
}

/// What reading a pack front to back found.
#[derive(Debug, Default)]
pub struct Walk {
    /// Entries whose header parsed, in order (damaged ones included).
    pub entries: Vec<Entry>,
    /// Entries whose bytes do not hash to their stored hash.
    pub damaged: Vec<Entry>,
    /// A structural fault (short file, bad header, bad entry header, an
    /// entry past the end, bad trailer).
    pub fault: bool,
    /// The entries ended exactly where the trailer starts.
    pub reached_end: bool,
}

impl Walk {
    /// Entirely well formed: every structure and every hash right.
    pub fn is_intact(&self) -> bool {
        !self.fault && self.damaged.is_empty()
    }
}

/// Reads `bytes` as a pack.
pub fn walk(bytes: &[u8]) -> Walk {
    let mut w = Walk::default();
    let size = bytes.len();
    if size < HEADER.len() + TRAILER_LEN || bytes[..HEADER.len()] != HEADER {
        w.fault = true;
        return w;
    }
    let body_end = size - TRAILER_LEN;
    let mut pos = HEADER.len();
    while pos < body_end {
        if body_end - pos < ENTRY_HEADER_LEN {
            w.fault = true;
            return w;
        }
        let h = &bytes[pos..pos + ENTRY_HEADER_LEN];
        if &h[..4] != ENTRY_MAGIC || h[4] > 1 {
            w.fault = true;
            return w;
        }
        let length = u32::from_be_bytes([h[37], h[38], h[39], h[40]]);
        let offset = pos + ENTRY_HEADER_LEN;
        if length as usize > MAX_SEALED || offset + length as usize > body_end {
            w.fault = true;
            return w;
        }
        let entry = Entry {
            id: h[5..37].try_into().expect("32 bytes"),
            kind: h[4],
            offset: offset as u64,
            length,
            hash: h[41..73].try_into().expect("32 bytes"),
        };
        let end = offset + length as usize;
        if *blake3::hash(&bytes[offset..end]).as_bytes() != entry.hash {
            w.damaged.push(entry);
        }
        w.entries.push(entry);
        pos = end;
    }
    w.reached_end = true;
    let t = &bytes[body_end..];
    let count = u32::from_be_bytes([t[8], t[9], t[10], t[11]]) as usize;
    if &t[..8] != TRAILER_MAGIC
        || count != w.entries.len()
        || t[12..] != *blake3::hash(&bytes[..body_end]).as_bytes()
    {
        w.fault = true;
    }
    w
}

/// Writes the right BLAKE3 into every entry header that parses.
pub fn fix_hashes(bytes: &mut [u8]) {
    for e in walk(bytes).entries {
        let (start, end) = (e.offset as usize, e.offset as usize + e.length as usize);
        let hash = *blake3::hash(&bytes[start..end]).as_bytes();
        bytes[start - 32..start].copy_from_slice(&hash);
    }
}

/// Writes a right trailer (magic, count of the entries that parse, hash).
pub fn fix_trailer(bytes: &mut [u8]) {
    if bytes.len() < HEADER.len() + TRAILER_LEN {
        return;
    }
    let count = walk(bytes).entries.len() as u32;
    let body_end = bytes.len() - TRAILER_LEN;
    let hash = *blake3::hash(&bytes[..body_end]).as_bytes();
    let t = &mut bytes[body_end..];
    t[..8].copy_from_slice(TRAILER_MAGIC);
    t[8..12].copy_from_slice(&count.to_be_bytes());
    t[12..].copy_from_slice(&hash);
}

/// Applies the fix-ups `flags` asks for: bit 0 entry hashes, bit 1 trailer.
pub fn fix(bytes: &mut [u8], flags: u8) {
    if flags & 1 != 0 {
        fix_hashes(bytes);
    }
    if flags & 2 != 0 {
        fix_trailer(bytes);
    }
}

/// A well-formed pack holding `blobs` (kind, id, sealed bytes).
pub fn build(blobs: &[(u8, [u8; 32], &[u8])]) -> Vec<u8> {
    let mut out = HEADER.to_vec();
    for (kind, id, sealed) in blobs {
        out.extend_from_slice(ENTRY_MAGIC);
        out.push(*kind);
        out.extend_from_slice(id);
        out.extend_from_slice(&(sealed.len() as u32).to_be_bytes());
        out.extend_from_slice(blake3::hash(sealed).as_bytes());
        out.extend_from_slice(sealed);
    }
    out.extend_from_slice(&[0u8; TRAILER_LEN]);
    fix_trailer(&mut out);
    out
}

/// Whether the pack holds `sealed` under an entry header naming `id` with
/// its length, anywhere: what a successful `read_blob` must have read.
pub fn holds(bytes: &[u8], id: &[u8; 32], sealed: &[u8]) -> bool {
    let need = ENTRY_HEADER_LEN + sealed.len();
    if bytes.len() < need {
        return false;
    }
    (0..=bytes.len() - need).any(|p| {
        let h = &bytes[p..p + ENTRY_HEADER_LEN];
        &h[..4] == ENTRY_MAGIC
            && h[5..37] == id[..]
            && h[37..41] == (sealed.len() as u32).to_be_bytes()
            && &bytes[p + ENTRY_HEADER_LEN..p + need] == sealed
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_built_pack_is_intact_and_a_flipped_byte_is_not() {
        let mut p = build(&[(0, [1; 32], b"hello"), (1, [2; 32], b"world!")]);
        let w = walk(&p);
        assert!(w.is_intact() && w.reached_end, "{w:?}");
        assert_eq!(w.entries.len(), 2);
        assert_eq!(w.entries[1].offset as usize, 10 + 2 * 73 + 5);
        p[10 + 73] ^= 1;
        let w = walk(&p);
        assert_eq!(w.damaged.len(), 1);
        assert!(w.fault, "the trailer hash no longer matches");
        fix(&mut p, 3);
        assert!(walk(&p).is_intact());
        assert!(holds(&p, &[2; 32], b"world!"));
        assert!(!holds(&p, &[1; 32], b"world!"));
    }
}
