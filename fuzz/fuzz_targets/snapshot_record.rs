//! Fuzz target `snapshot_record`: see `flotilla_fuzz::targets::snapshot_record` (fuzz/src/targets/snapshot_record.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| flotilla_fuzz::targets::snapshot_record(data));
