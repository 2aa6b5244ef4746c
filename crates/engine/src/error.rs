//! One error type for the engine. Every variant renders as a single line that names the file (or
//! tensor) and the problem, because that line is what the CLI prints before exiting non-zero.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: file not found", .0.display())]
    NotFound(PathBuf),
    #[error("{}: {}", .path.display(), .msg)]
    File { path: PathBuf, msg: String },
    #[error("{}: {}", .path.display(), .msg)]
    Config { path: PathBuf, msg: String },
    #[error("tensor `{name}` ({}): {msg}", .file.display())]
    Tensor { name: String, file: PathBuf, msg: String },
    #[error("{0}")]
    Input(String),
    #[error("{0}")]
    Text(#[from] flashmoe_text::TextError),
    /// NaN or Inf where a finite number must be (activations, logits): named by layer.
    #[error("{0}")]
    NonFinite(String),
    /// A device (GPU driver, compiler, memory) failure described in words.
    #[error("GPU: {0}")]
    Device(String),
    /// A backend's own error, kept as the source (the backend converts its errors into this).
    #[error("GPU: {0}")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn file(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::File { path: path.as_ref().to_path_buf(), msg: msg.into() }
    }

    pub fn config(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Config { path: path.as_ref().to_path_buf(), msg: msg.into() }
    }

    pub fn input(msg: impl Into<String>) -> Self {
        Error::Input(msg.into())
    }

    /// Maps an io error on `path` to NotFound when that is what happened, so the message is the
    /// plain "file not found" users expect rather than "No such file or directory (os error 2)".
    pub fn io(path: impl AsRef<Path>, e: std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::NotFound(path.as_ref().to_path_buf())
        } else {
            Error::file(path, e.to_string())
        }
    }
}
