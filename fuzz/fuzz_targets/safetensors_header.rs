//! The `safetensors_header` target: [`flashmoe_fuzz::bodies::safetensors_header`] (the same body replays the committed
//! corpus on stable in crates/engine/tests/fuzz_corpora.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| flashmoe_fuzz::bodies::safetensors_header(data));
