//! Fuzz target `repo_files`: see `flotilla_fuzz::targets::repo_files` (fuzz/src/targets/repo_files.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| flotilla_fuzz::targets::repo_files(data));
