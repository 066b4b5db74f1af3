//! Fuzz target `task_body`: see `flotilla_fuzz::targets::task_body` (fuzz/src/targets/task_body.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| flotilla_fuzz::targets::task_body(data));
