//! Fuzz target `task_envelope`: see `flotilla_fuzz::targets::task_envelope` (fuzz/src/targets/task_envelope.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| flotilla_fuzz::targets::task_envelope(data));
