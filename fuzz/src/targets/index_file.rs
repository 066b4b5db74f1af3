//! `.idx` files (agent/src/repository/format.rs `IndexFile` and
//! `validate`, as `index::read_idx` runs them on the bytes of a file),
//! through the `flotilla_agent::repository::fuzzing` facade (feature
//! `agent-internals`; fuzz/agent-facade.patch adds it).

use flotilla_agent::repository::fuzzing as agent;
use flotilla_protocol::decode;
use flotilla_protocol::repo::MAX_SEALED;

use crate::common::round_trip;

/// A pack the index is checked against when it names none.
const OTHER_PACK: [u8; 32] = [0xab; 32];

/// Decodes as `read_idx` does (limit `MAX_IDX_BYTES`); a decoded index
/// survives a round trip, `parse_hex32` accepts only what `hex32` writes,
/// and `validate` accepts the index exactly when an independent statement
/// of the rule (docs/repository.md) does, both against the pack it names
/// and against another.
pub fn index_file(data: &[u8]) {
    let Ok(idx) = decode::<agent::IndexFile>(data, agent::MAX_IDX_BYTES as usize) else {
        return;
    };
    round_trip(&idx, |b| decode::<agent::IndexFile>(b, usize::MAX));
    let named = agent::parse_hex32(&idx.pack);
    if let Some(p) = named {
        assert_eq!(
            agent::hex32(&p),
            idx.pack,
            "parse_hex32 accepted another spelling"
        );
    }
    for pack in [named.unwrap_or(OTHER_PACK), OTHER_PACK] {
        let verdict = idx.validate(&pack);
        if let Err(e) = &verdict {
            let _ = e.to_string();
        }
        assert_eq!(
            verdict.is_ok(),
            follows_the_rule(&idx, &pack, named),
            "{verdict:?}"
        );
    }
}

/// The index rule, restated with arithmetic that cannot overflow: this
/// version, this pack, entries back to back from the header, each at most
/// `MAX_SEALED` bytes, and the trailer right after the last.
fn follows_the_rule(idx: &agent::IndexFile, pack: &[u8; 32], named: Option<[u8; 32]>) -> bool {
    if idx.v != agent::IDX_VERSION || named != Some(*pack) {
        return false;
    }
    let mut end = u128::from(agent::HEADER_LEN);
    for e in &idx.entries {
        if e.length as usize > MAX_SEALED
            || u128::from(e.offset) != end + u128::from(agent::ENTRY_HEADER_LEN)
        {
            return false;
        }
        end = u128::from(e.offset) + u128::from(e.length);
    }
    end + u128::from(agent::TRAILER_LEN) == u128::from(idx.size)
}
