//! Fuzz target `repo_reply`: see `flotilla_fuzz::targets::repo_reply` (fuzz/src/targets/repo_reply.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| flotilla_fuzz::targets::repo_reply(data));
