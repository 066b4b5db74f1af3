//! Fuzz target `tree`: see `flotilla_fuzz::targets::tree` (fuzz/src/targets/tree.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| flotilla_fuzz::targets::tree(data));
