//! Error type of the crate.
//!
//! Every variant that comes from a file names the file, so that a message such as
//! `/models/x/tokenizer.json: file not found` is enough for a user to act on.

use std::path::PathBuf;

/// Errors of tokenization, chat-template rendering and file loading.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    /// A file that is required does not exist.
    #[error("{}: file not found", path.display())]
    FileNotFound { path: PathBuf },

    /// A file exists but could not be read (permissions, I/O).
    #[error("{}: cannot read file: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A tokenizer definition (tokenizer.json) could not be parsed.
    #[error("{origin}: invalid tokenizer: {message}")]
    InvalidTokenizer { origin: String, message: String },

    /// A JSON file (e.g. tokenizer_config.json) is not valid JSON or has an unexpected shape.
    #[error("{origin}: invalid JSON: {message}")]
    InvalidJson { origin: String, message: String },

    /// Encoding or decoding failed inside the tokenizer.
    #[error("tokenizer error: {0}")]
    Tokenizer(String),

    /// The chat template does not compile (syntax error); `origin` says where it came from.
    #[error("{origin}: invalid chat template: {message}")]
    TemplateSyntax { origin: String, message: String },

    /// Rendering the chat template failed (template error, `raise_exception`, bad input).
    #[error("{origin}: chat template rendering failed: {message}")]
    TemplateRender { origin: String, message: String },

    /// The messages/tools given to the renderer have the wrong shape.
    #[error("invalid chat request: {0}")]
    InvalidRequest(String),
}

/// Result alias of the crate.
pub type Result<T, E = TextError> = std::result::Result<T, E>;

/// Reads a whole file, turning "not found" into [`TextError::FileNotFound`].
pub(crate) fn read_file(path: &std::path::Path) -> Result<Vec<u8>> {
    crate::file::read_regular(path, crate::file::MAX_READ_BYTES).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            TextError::FileNotFound { path: path.to_path_buf() }
        } else {
            TextError::Io { path: path.to_path_buf(), source }
        }
    })
}

/// Formats a minijinja error with its full cause chain and, when known, the line.
pub(crate) fn jinja_message(err: &minijinja::Error) -> String {
    use std::error::Error as _;
    let mut msg = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        msg.push_str(": ");
        msg.push_str(&c.to_string());
        cause = c.source();
    }
    msg
}
