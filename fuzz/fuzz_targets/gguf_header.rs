//! The GGUF header parser on arbitrary bytes: it must return (a header or an error), never
//! panic, hang or allocate beyond a small multiple of the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let _ = flashmoe::gguf::Header::parse(data, Path::new("fuzz.gguf"));
});
