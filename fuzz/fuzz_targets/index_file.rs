//! Fuzz target `index_file`: see `flotilla_fuzz::targets::index_file` (fuzz/src/targets/index_file.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| flotilla_fuzz::targets::index_file(data));
