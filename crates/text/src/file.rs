//! Opening the files a model folder holds (config.json, tokenizer.json, chat templates, the
//! packed manifest, weight files): the path must name a regular file, and files read whole
//! must be of bounded size. A FIFO would block `open` (and so the command) until some writer
//! appears; a device such as `/dev/zero` would be read until memory runs out.

use std::fs::File;
use std::io::{Error, ErrorKind, Read};
use std::path::Path;

/// Most bytes read whole from one of these files. Real ones are far smaller (Qwen3.5's
/// tokenizer.json is 12 MB, a 397B model's packed manifest under 10 MB).
pub const MAX_READ_BYTES: u64 = 256 << 20;

/// Opens `path` for reading if it is a regular file (symlinks followed). The open itself
/// cannot block on a FIFO (`O_NONBLOCK`, which regular files ignore); the check is made on the
/// opened file, so it holds for what is then read.
pub fn open_regular(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path)?;
    let ty = file.metadata()?.file_type();
    if !ty.is_file() {
        use std::os::unix::fs::FileTypeExt;
        let what = if ty.is_dir() {
            "a directory"
        } else if ty.is_fifo() {
            "a FIFO"
        } else if ty.is_char_device() || ty.is_block_device() {
            "a device"
        } else if ty.is_socket() {
            "a socket"
        } else {
            "not a plain file"
        };
        return Err(Error::new(ErrorKind::InvalidInput, format!("is {what}, not a regular file")));
    }
    Ok(file)
}

/// Reads a regular file of at most `limit` bytes.
pub fn read_regular(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    let file = open_regular(path)?;
    let len = file.metadata()?.len();
    if len > limit {
        return Err(Error::new(ErrorKind::InvalidInput, format!("is {len} bytes, more than the {limit} read at most")));
    }
    let mut buf = Vec::with_capacity(len as usize);
    // `take`: a file that grows while it is read still stops at the limit.
    file.take(limit + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > limit {
        return Err(Error::new(ErrorKind::InvalidInput, format!("grew past the {limit} bytes read at most")));
    }
    Ok(buf)
}

/// [`read_regular`] with [`MAX_READ_BYTES`], as UTF-8 text.
pub fn read_text(path: &Path) -> std::io::Result<String> {
    String::from_utf8(read_regular(path, MAX_READ_BYTES)?)
        .map_err(|e| Error::new(ErrorKind::InvalidData, format!("is not UTF-8 text: {e}")))
}
