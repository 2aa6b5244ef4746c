//! The built-in default model: files embedded in the `flashmoe` binary are unpacked once into a
//! cache folder and converted to the packed format there, so `flashmoe run` with no `--model`
//! works on a fresh machine with nothing downloaded and streams its experts from disk like any
//! packed model. The folder name carries a hash of the embedded bytes, so a new build with a
//! different model never reuses a stale copy.

use crate::convert::{ConvertOptions, Target, convert};
use crate::error::{Error, Result};
use std::path::PathBuf;

pub use crate::paths::cache_root;

/// Returns the packed folder of the embedded model `name` made of `files`, creating it on first
/// use.
pub fn materialize(name: &str, files: &[(&str, &[u8])]) -> Result<PathBuf> {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for (n, b) in files {
        h.update(n.as_bytes());
        h.update(b);
    }
    let root = cache_root().join("models");
    let dir = root.join(format!("{name}-{:016x}", h.digest()));
    if dir.join(crate::packed::MANIFEST).exists() {
        return Ok(dir);
    }
    std::fs::create_dir_all(&root).map_err(|e| Error::file(&root, format!("cannot create the cache folder: {e}")))?;
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
    match r {
        Ok(_) => Ok(dir),
        // Another process may have finished the same conversion first.
        Err(_) if dir.join(crate::packed::MANIFEST).exists() => Ok(dir),
        Err(e) => Err(e),
    }
}
