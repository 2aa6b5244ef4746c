//! config.json on arbitrary bytes → ModelConfig: an error or a config whose derived sizes
//! (what the loader and the memory plan compute from it) do not overflow.
#![no_main]

use flashmoe::ModelConfig;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    let Ok(c) = ModelConfig::from_value(&v, Path::new("config.json")) else { return };
    assert_eq!(c.layer_kinds.len(), c.num_layers);
    let _ = (c.key_dim(), c.value_dim(), c.conv_dim(), c.rotary_dims());
    // One expert's three matrices and the embedding, in f32 bytes: must fit in 64 bits.
    let expert = 3 * c.moe_intermediate * c.hidden_size * 4;
    let embed = c.vocab_size * c.hidden_size * 4;
    let _ = (expert, embed, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
});
