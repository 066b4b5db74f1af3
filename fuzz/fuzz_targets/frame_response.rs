//! Fuzz target `frame_response`: see `flotilla_fuzz::targets::frame_response` (fuzz/src/targets/frame_response.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| flotilla_fuzz::targets::frame_response(data));
