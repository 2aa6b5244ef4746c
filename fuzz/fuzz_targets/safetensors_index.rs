//! The `safetensors_index` target: [`flashmoe_fuzz::bodies::safetensors_index`] (the same body replays the committed
//! corpus on stable in crates/engine/tests/fuzz_corpora.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| flashmoe_fuzz::bodies::safetensors_index(data));
