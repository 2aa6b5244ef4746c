//! The GGUF header parser on arbitrary bytes: it must return (a header or an error), never
//! panic, hang or allocate beyond a small multiple of the input. What a parsed header offers
//! (tensor sizes, shapes, metadata values) must be usable without panicking too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(h) = flashmoe::gguf::Header::parse(data, Path::new("fuzz.gguf")) else { return };
    for t in &h.tensors {
        let _ = (t.end(), t.elements(), t.row_bytes(), t.torch_shape());
    }
    for (_, v) in &h.metadata {
        let _ = (v.brief(), v.as_int(), v.as_f64(), v.as_str(), v.as_bool());
        if let Some(a) = v.as_array() {
            let _ = (a.len(), a.item_type(), a.ints(), a.strings(), a.bools());
        }
    }
});
