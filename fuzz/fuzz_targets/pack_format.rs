//! Fuzz target `pack_format`: see `flotilla_fuzz::targets::pack_format` (fuzz/src/targets/pack_format.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| flotilla_fuzz::targets::pack_format(data));
