//! Typed errors of this crate; each names the file involved.

use std::path::PathBuf;

/// What went wrong building, writing or checking a disclosure record.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or folder could not be read or written.
    #[error("{action} {path}")]
    Io {
        /// What was being done: "reading", "writing", "hashing", ...
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A file whose content is not what was expected.
    #[error("{path}: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The model could not be inspected.
    #[error("inspecting model {path}")]
    Model {
        /// The model file or folder.
        path: PathBuf,
        /// The loader's error.
        #[source]
        source: retune_core::error::Error,
    },
    /// No evidence of the base model was found next to an adapter.
    #[error("{path}: no record of the base model: expected disclosure.json here or one folder up, a README.md with `base_model:` front matter, or an adapter_config.json with `base_model_name_or_path`")]
    NoEvidence {
        /// The adapter or run folder.
        path: PathBuf,
    },
}

impl Error {
    /// An I/O error on `path`.
    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            action,
            path: path.into(),
            source,
        }
    }

    /// A content error on `path`.
    pub fn format(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error and its sources, joined with ": ".
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}
