//! A safetensors file on arbitrary bytes (header length, JSON header, data): an error or
//! tensors whose byte views lie inside the file, never a panic; small float tensors convert.
#![no_main]

use flashmoe::weights::TensorStore;
use libfuzzer_sys::fuzz_target;
use std::path::Path;
use std::sync::Arc;

fuzz_target!(|data: &[u8]| {
    let Ok(tensors) = TensorStore::safetensors_tensors(Arc::new(data.to_vec()), Path::new("fuzz.safetensors")) else {
        return;
    };
    for t in tensors {
        let _ = t.numel();
        let _ = t.to_f32_vec();
    }
});
