//! The pack parser itself (agent/src/repository/format.rs): entry headers
//! and `scan_pack`, through the `flotilla_agent::repository::fuzzing`
//! facade (feature `agent-internals`; fuzz/agent-facade.patch adds it).

use std::path::PathBuf;
use std::sync::LazyLock;

use flotilla_agent::repository::fuzzing as agent;
use flotilla_protocol::decode;
use flotilla_protocol::repo::BlobKind;

use crate::common::{round_trip, scratch};
use crate::packfmt::{self, Entry};

static PACK_PATH: LazyLock<PathBuf> = LazyLock::new(|| scratch().join("scan.pack"));

fn kind_byte(kind: BlobKind) -> u8 {
    match kind {
        BlobKind::Data => 0,
        BlobKind::Tree => 1,
    }
}

fn entry(e: &agent::IndexEntry) -> Entry {
    Entry {
        id: e.id.0,
        kind: kind_byte(e.kind),
        offset: e.offset,
        length: e.length,
        hash: e.hash,
    }
}

/// The first byte holds fix-up flags (0x01 entry hashes, 0x02 trailer, as in
/// `repo_files`), the rest is the pack. The entry-header parser and writer
/// agree; the scanner agrees with an independent reading of
/// docs/repository.md on every entry, every damaged entry and every fault;
/// and the index made from an intact scan (as `rebuild` makes it) passes
/// the index validator and survives a round trip.
pub fn pack_format(data: &[u8]) {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let mut bytes = rest.to_vec();
    packfmt::fix(&mut bytes, flags);

    if let Some(head) = bytes.get(..packfmt::ENTRY_HEADER_LEN) {
        let head: [u8; 73] = head.try_into().expect("73 bytes");
        match agent::parse_entry_header(&head) {
            Some(h) => assert_eq!(agent::entry_header(&h.id, h.kind, h.len, &h.hash), head),
            None => assert!(
                &head[..4] != b"BLOB" || head[4] > 1,
                "a good header refused"
            ),
        }
    }

    std::fs::write(&*PACK_PATH, &bytes).expect("write the scratch pack");
    let scan = agent::scan_pack(&PACK_PATH).expect("scan a file just written");
    let walk = packfmt::walk(&bytes);
    let scanned: Vec<Entry> = scan.entries.iter().map(entry).collect();
    let damaged: Vec<Entry> = scan.damaged.iter().map(entry).collect();
    assert_eq!(
        scanned, walk.entries,
        "scanner and format disagree on the entries"
    );
    assert_eq!(
        damaged, walk.damaged,
        "scanner and format disagree on damage"
    );
    assert_eq!(scan.fault.is_some(), walk.fault, "fault: {:?}", scan.fault);
    assert_eq!(scan.pack_hash.is_some(), walk.reached_end);
    let id = *blake3::hash(&bytes).as_bytes();
    if let Some(h) = scan.pack_hash {
        assert_eq!(h, id, "the pack hash is not the BLAKE3 of the file");
    }
    assert_eq!(scan.is_intact(&id), walk.is_intact());

    for e in &scan.entries {
        let start = (e.offset - agent::ENTRY_HEADER_LEN) as usize;
        let head: [u8; 73] = bytes[start..start + 73].try_into().expect("73 bytes");
        let parsed = agent::parse_entry_header(&head);
        assert_eq!(
            parsed.map(|h| (h.id, h.kind, h.len, h.hash)),
            Some((e.id, e.kind, e.length, e.hash))
        );
    }

    if scan.is_intact(&id) {
        let idx = agent::IndexFile {
            v: agent::IDX_VERSION,
            pack: agent::hex32(&id),
            size: bytes.len() as u64,
            entries: scan.entries.clone(),
        };
        assert_eq!(
            idx.validate(&id),
            Ok(()),
            "the scanner and the index validator disagree"
        );
        round_trip(&idx, |b| {
            decode::<agent::IndexFile>(b, agent::MAX_IDX_BYTES as usize)
        });
    }
}
