//! The `packed_manifest` target: [`flashmoe_fuzz::bodies::packed_manifest`] (the same body replays the committed
//! corpus on stable in crates/engine/tests/fuzz_corpora.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| flashmoe_fuzz::bodies::packed_manifest(data));
