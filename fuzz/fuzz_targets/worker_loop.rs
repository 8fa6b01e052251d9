#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| wgxdp_fuzz_harness::worker_loop(data));
