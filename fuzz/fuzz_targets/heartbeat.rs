//! Fuzz target `heartbeat`: see `flotilla_fuzz::targets::heartbeat` (fuzz/src/targets/heartbeat.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| flotilla_fuzz::targets::heartbeat(data));
