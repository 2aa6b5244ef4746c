//! A packed model's manifest.json on arbitrary bytes: an error or a manifest whose sizes,
//! offsets and file names every reader can use as they are (no overflow, nothing outside the
//! model folder or outside an expert's blob).
#![no_main]

use flashmoe::packed::Manifest;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(m) = Manifest::parse(text, Path::new("manifest.json")) else { return };
    let dir = Path::new("/models/m");
    for ef in &m.experts {
        let total = ef.stride * ef.num_experts as u64;
        assert!(total <= isize::MAX as u64);
        assert!(dir.join(&ef.file).starts_with(dir) && !ef.file.contains(".."));
        for c in &ef.components {
            assert!(c.offset + c.nbytes <= ef.blob_bytes);
        }
    }
    for t in &m.tensors {
        let _ = t.offset + t.nbytes;
    }
});
