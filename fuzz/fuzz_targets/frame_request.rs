//! Fuzz target `frame_request`: see `flotilla_fuzz::targets::frame_request` (fuzz/src/targets/frame_request.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| flotilla_fuzz::targets::frame_request(data));
