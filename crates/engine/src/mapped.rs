//! Memory-mapped model files, and what the process says when one changes under it.
//!
//! Weights are read in place from `mmap`ed files. If such a file is truncated (or rewritten
//! shorter) while mapped, touching a page past its new end raises SIGBUS, which by default kills
//! the process with no word. Every mapping is [registered](register) with the file's size at
//! map time; [`install_sigbus_handler`] makes SIGBUS print one line naming the cause, and each
//! registered file now shorter than when it was mapped (with both sizes), then exit with status
//! [`SIGBUS_EXIT_CODE`]. The handler uses only async-signal-safe calls (`stat`, `write`,
//! `_exit`) and reads the registry without locks.

use std::ffi::CString;
use std::path::Path;
use std::sync::atomic::{AtomicPtr, Ordering};

/// Exit status after a SIGBUS (128 + SIGBUS, what a shell reports for a death by that signal).
pub const SIGBUS_EXIT_CODE: i32 = 128 + libc::SIGBUS;

/// Files named by the handler; later mappings beyond this many are not listed (the message
/// still names the cause).
const MAX_FILES: usize = 256;

struct MappedFile {
    path: CString,
    len: u64,
}

static FILES: [AtomicPtr<MappedFile>; MAX_FILES] = [const { AtomicPtr::new(std::ptr::null_mut()) }; MAX_FILES];

/// Records that `path` is mapped with `len` bytes. The entry lives for the rest of the process
/// (a few bytes per file; the handler may read it at any time).
pub fn register(path: &Path, len: u64) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else { return };
    let entry = Box::into_raw(Box::new(MappedFile { path: c, len }));
    for slot in &FILES {
        if slot.compare_exchange(std::ptr::null_mut(), entry, Ordering::AcqRel, Ordering::Acquire).is_ok() {
            return;
        }
    }
    // Full: drop the entry (never published).
    // SAFETY: `entry` came from Box::into_raw above and was not stored anywhere.
    drop(unsafe { Box::from_raw(entry) });
}

/// Installs the SIGBUS handler (see the module documentation). `who` names the process in the
/// message (e.g. "the server").
pub fn install_sigbus_handler(who: &'static str) {
    WHO.store(Box::into_raw(Box::new(who)), Ordering::Release);
    // SAFETY: a plain sigaction with a handler that only makes async-signal-safe calls.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigbus as *const () as usize;
        libc::sigemptyset(&mut action.sa_mask);
        action.sa_flags = 0;
        libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut());
    }
}

static WHO: AtomicPtr<&'static str> = AtomicPtr::new(std::ptr::null_mut());

fn write_stderr(bytes: &[u8]) {
    // SAFETY: write(2) is async-signal-safe; a short or failed write loses part of the message.
    unsafe {
        libc::write(2, bytes.as_ptr().cast(), bytes.len());
    }
}

/// Decimal digits of `n` into `buf`, returning the used tail (no allocation).
fn digits(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

extern "C" fn on_sigbus(_signal: libc::c_int) {
    let who = WHO.load(Ordering::Acquire);
    // SAFETY: WHO holds a leaked Box<&'static str> or null.
    let who: &str = if who.is_null() { "the process" } else { unsafe { *who } };
    write_stderr(b"[flashmoe] fatal: SIGBUS: a mapped model file changed or shrank under ");
    write_stderr(who.as_bytes());
    write_stderr(b" (truncated or rewritten while in use); restart it once the model files are intact\n");
    let mut named = false;
    for slot in &FILES {
        let entry = slot.load(Ordering::Acquire);
        if entry.is_null() {
            break;
        }
        // SAFETY: published entries are leaked boxes, never freed.
        let f = unsafe { &*entry };
        // SAFETY: stat(2) is async-signal-safe; `st` is plain data.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // Only a file shorter than its mapping can fault: a deleted or renamed file keeps its
        // pages while mapped (the built-in model's unpacked source is one).
        if unsafe { libc::stat(f.path.as_ptr(), &mut st) } != 0 || st.st_size as u64 >= f.len {
            continue;
        }
        named = true;
        let mut a = [0u8; 20];
        let mut b = [0u8; 20];
        write_stderr(b"[flashmoe]   ");
        write_stderr(f.path.as_bytes());
        write_stderr(b": ");
        write_stderr(digits(st.st_size as u64, &mut a));
        write_stderr(b" bytes now, ");
        write_stderr(digits(f.len, &mut b));
        write_stderr(b" when mapped\n");
    }
    if !named {
        write_stderr(
            b"[flashmoe]   (no mapped file is shorter now: another cause, such as a failing disk, is possible)\n",
        );
    }
    // SAFETY: _exit is async-signal-safe and does not return.
    unsafe { libc::_exit(SIGBUS_EXIT_CODE) }
}

#[cfg(test)]
mod tests {
    use super::digits;

    #[test]
    fn digits_in_decimal() {
        let mut b = [0u8; 20];
        assert_eq!(digits(0, &mut b), b"0");
        assert_eq!(digits(1234567, &mut b), b"1234567");
        assert_eq!(digits(u64::MAX, &mut b), b"18446744073709551615");
    }
}
