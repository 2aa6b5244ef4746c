//! Where flashmoe keeps files it derives (unpacked built-in model, compiled GPU kernels).

use std::path::PathBuf;

/// Where flashmoe keeps derived files: $FLASHMOE_HOME, else $XDG_CACHE_HOME/flashmoe, else
/// ~/.cache/flashmoe.
pub fn cache_root() -> PathBuf {
    if let Some(p) = std::env::var_os("FLASHMOE_HOME") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(p).join("flashmoe");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".cache").join("flashmoe"),
        None => std::env::temp_dir().join("flashmoe"),
    }
}
