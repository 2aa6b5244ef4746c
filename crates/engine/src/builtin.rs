//! The built-in default model: files embedded in the `flashmoe` binary are unpacked once into a
//! cache folder and converted to the packed format there, so `flashmoe run` with no `--model`
//! works on a fresh machine with nothing downloaded and streams its experts from disk like any
//! packed model. The folder name carries a hash of the embedded bytes, so a new build with a
//! different model never reuses a stale copy.

use crate::convert::{ConvertOptions, Target, convert};
use crate::error::{Error, Result};
use std::path::PathBuf;

pub use crate::paths::cache_root;

/// The packed folder of the embedded model `name` made of `files` (which may not exist yet).
pub fn folder(name: &str, files: &[(&str, &[u8])]) -> PathBuf {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for (n, b) in files {
        h.update(n.as_bytes());
        h.update(b);
    }
    cache_root().join("models").join(format!("{name}-{:016x}", h.digest()))
}

/// Returns the packed folder of the embedded model `name` made of `files`, creating it on first
/// use.
pub fn materialize(name: &str, files: &[(&str, &[u8])]) -> Result<PathBuf> {
    let dir = folder(name, files);
    let root = cache_root().join("models");
    std::fs::create_dir_all(&root).map_err(|e| Error::file(&root, format!("cannot create the cache folder: {e}")))?;
    // One process builds at a time; the others wait here and then use its result.
    let _lock = crate::convert::lock_file(&root.join(format!(".{name}.lock")), true)?;
    if dir.join(crate::packed::MANIFEST).exists() {
        // Small enough to check every time (checksums of every tensor and expert): a damaged
        // cache is rebuilt instead of failing every run until deleted by hand.
        match crate::packed::verify::verify(&dir) {
            Ok(_) => return Ok(dir),
            Err(e) => {
                tracing::warn!("the cached built-in model is damaged ({e}); rebuilding it");
                std::fs::remove_dir_all(&dir)
                    .map_err(|e| Error::file(&dir, format!("cannot remove the damaged cache: {e}")))?;
            }
        }
    }
    let src = root.join(format!(".{name}-src-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&src);
    std::fs::create_dir_all(&src).map_err(|e| Error::file(&src, format!("cannot create: {e}")))?;
    for (n, b) in files {
        let p = src.join(n);
        std::fs::write(&p, b).map_err(|e| Error::file(&p, format!("cannot write: {e}")))?;
    }
    let opts = ConvertOptions { expert: Target::Keep, other: Target::Keep, ..ConvertOptions::default() };
    let r = convert(&src, &dir, &opts, &());
    let _ = std::fs::remove_dir_all(&src);
    r.map(|_| dir)
}
