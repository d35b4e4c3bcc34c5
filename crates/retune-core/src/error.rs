//! Typed errors of the core: every one names the file (where there is one) and what is wrong.

use std::path::PathBuf;

/// Result with the core's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong loading or running a model. Messages are lowercase, name the file, and
/// where possible say how to fix the problem.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A file was read but its content is wrong (bad JSON, missing field, truncated, ...).
    #[error("{path}: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong and, where known, the fix.
        reason: String,
    },
    /// A model architecture or feature retune does not support.
    #[error("{path}: unsupported: {reason}")]
    Unsupported {
        /// The file that asks for it.
        path: PathBuf,
        /// What is unsupported.
        reason: String,
    },
    /// A tensor whose shape does not fit the configuration.
    #[error("{path}: tensor `{name}` has shape {got:?}, expected {expected:?}")]
    Shape {
        /// The file holding the tensor.
        path: PathBuf,
        /// Tensor name (Hugging Face naming).
        name: String,
        /// Shape found.
        got: Vec<usize>,
        /// Shape the configuration implies.
        expected: Vec<usize>,
    },
    /// A tokenizer or chat-template problem.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Bad arguments to a library call (a caller's mistake, e.g. a sequence longer than the context).
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    /// Shorthand for [`Error::Format`].
    pub fn format(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            reason: reason.into(),
        }
    }
    /// Shorthand for [`Error::Io`].
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
