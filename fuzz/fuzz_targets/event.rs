//! Fuzz target `event`: see `flotilla_fuzz::targets::event` (fuzz/src/targets/event.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| flotilla_fuzz::targets::event(data));
