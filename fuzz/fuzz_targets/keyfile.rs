//! Fuzz target `keyfile`: see `flotilla_fuzz::targets::keyfile` (fuzz/src/targets/keyfile.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| flotilla_fuzz::targets::keyfile(data));
