//! What the fuzz targets in `fuzz/` call directly (`pack_format` and
//! `index_file`): the pack and `.idx` parsers of `format.rs`. Not an API:
//! hidden from the documentation, and it changes whenever the format does.

pub use super::format::{
    entry_header, hex32, parse_entry_header, parse_hex32, scan_pack, EntryHeader, IndexEntry,
    IndexFile, IndexInvalid, PackId, Scan, ENTRY_HEADER_LEN, HEADER_LEN, IDX_VERSION,
    MAX_IDX_BYTES, TRAILER_LEN,
};
