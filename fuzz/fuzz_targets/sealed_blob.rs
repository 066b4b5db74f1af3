//! Fuzz target `sealed_blob`: see `flotilla_fuzz::targets::sealed_blob` (fuzz/src/targets/sealed_blob.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| flotilla_fuzz::targets::sealed_blob(data));
