//! Shared helpers of the integration tests: fixture paths and gzip-compressed tokenizers.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use flashmoe_text::TextTokenizer;

/// `testdata/text/` of the repository.
pub fn testdata() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/text")
}

pub fn read_gz(name: &str) -> Vec<u8> {
    let path = testdata().join(name);
    let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(file).read_to_end(&mut out).unwrap();
    out
}

/// Loads `testdata/text/{name}-tokenizer.json.gz` once per test binary (parsing the 33 MB
/// Qwen3.5 tokenizer takes about a second).
pub fn load_tokenizer(name: &str) -> &'static TextTokenizer {
    static CACHE: OnceLock<Mutex<HashMap<String, &'static TextTokenizer>>> = OnceLock::new();
    let mut map = CACHE.get_or_init(Default::default).lock().unwrap();
    map.entry(name.to_string()).or_insert_with(|| {
        let tok = TextTokenizer::from_bytes(&read_gz(&format!("{name}-tokenizer.json.gz"))).unwrap();
        Box::leak(Box::new(tok))
    })
}

pub fn read_json(name: &str) -> serde_json::Value {
    let path = testdata().join(name);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap()
}

/// A fresh, empty scratch directory under the system temp dir.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("flashmoe-text-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
