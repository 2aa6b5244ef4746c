//! `model.safetensors.index.json` on arbitrary bytes: an error or shard paths inside the folder.
#![no_main]

use flashmoe::weights::TensorStore;
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let dir = Path::new("/models/m");
    if let Ok(files) = TensorStore::index_files(text, dir, &dir.join("model.safetensors.index.json")) {
        for f in files {
            let inside = f
                .strip_prefix(dir)
                .is_ok_and(|rel| rel.components().all(|c| matches!(c, std::path::Component::Normal(_))));
            assert!(inside, "{} escapes the folder", f.display());
        }
    }
});
