//! The `chat_template` target: [`flashmoe_fuzz::bodies::chat_template`] (the same body replays the committed
//! corpus on stable in crates/engine/tests/fuzz_corpora.rs).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| flashmoe_fuzz::bodies::chat_template(data));
