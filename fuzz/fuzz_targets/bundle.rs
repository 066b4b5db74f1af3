//! Fuzz target `bundle`: see `flotilla_fuzz::targets::bundle` (fuzz/src/targets/bundle.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| flotilla_fuzz::targets::bundle(data));
