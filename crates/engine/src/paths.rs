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

/// Bytes free for an unprivileged user on the file system that holds `path` (or, when `path`
/// does not exist yet, its nearest existing ancestor). None when the system does not say.
pub fn free_space(path: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let existing = path.ancestors().find(|p| p.exists())?;
    let c = std::ffi::CString::new(existing.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `c` is a NUL-terminated path and `st` a buffer of the right type; statvfs only
    // writes into it, and it is read only when the call succeeded.
    let st = unsafe {
        if libc::statvfs(c.as_ptr(), st.as_mut_ptr()) != 0 {
            return None;
        }
        st.assume_init()
    };
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}
