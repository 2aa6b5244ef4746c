//! The `api_request` target: [`flashmoe_fuzz::api_bodies::api_request`] (the same body replays the
//! committed corpus on stable in crates/server/tests/fuzz_corpus.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| flashmoe_fuzz::api_bodies::api_request(data));
