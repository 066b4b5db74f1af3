//! Fuzz target `fleet_status`: see `flotilla_fuzz::targets::fleet_status` (fuzz/src/targets/fleet_status.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| flotilla_fuzz::targets::fleet_status(data));
