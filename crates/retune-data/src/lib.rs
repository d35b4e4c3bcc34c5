//! retune-data: the datasets of the cardiology fine-tuning demo, derived from real public
//! sources fetched by `retune-assets`, one module per source.
//!
//! - [`pubmed`]: English cardiology abstracts from two PubMed baseline files
//!   ([`pubmed::cardiology_corpus`], [`pubmed::is_cardiology`]), split by a hash of the PMID.
//! - [`hpo`]: cardiovascular terms of the Human Phenotype Ontology
//!   ([`hpo::cardiovascular_terms`]) turned into instruction pairs ("What is X?" -> definition)
//!   and preference pairs ("Define X." -> X's definition over a sibling's).
//! - [`brown`]: plain general English from the tagged Brown corpus ([`brown::brown_text`]),
//!   used to measure retained general capability.
//! - [`jsonl`]: atomic JSON Lines writers and the [`Manifest`] (packages, rules, counts, sha256).
//!
//! [`build_cardiology_datasets`] fetches the sources and writes every file plus
//! `manifest.json`. Every split here is a pure function of an id ([`hash_unit`]), so the same
//! id lands on the same side on every run and machine.
#![deny(missing_docs)]

pub mod brown;
mod build;
pub mod hpo;
pub mod jsonl;
pub mod pubmed;

pub use build::{build_cardiology_datasets, build_datasets_from, DatasetSizes, Sources};
pub use jsonl::{write_manifest, Manifest, ManifestFile};

use sha2::{Digest, Sha256};
use std::path::PathBuf;

/// What can go wrong deriving a dataset. Every variant names the file concerned.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file system problem.
    #[error("{path}: {source}")]
    Io {
        /// File or folder concerned.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A PubMed file is not well-formed XML.
    #[error("{path}: XML error near byte {position}: {source}")]
    Xml {
        /// The `.xml.gz` file.
        path: PathBuf,
        /// Byte offset in the decompressed XML.
        position: u64,
        /// What the XML reader said.
        #[source]
        source: quick_xml::Error,
    },
    /// A PubMed record lacks what every record must have (a numeric PMID).
    #[error("{path}: near byte {position}: {reason}")]
    Pubmed {
        /// The `.xml.gz` file.
        path: PathBuf,
        /// Byte offset in the decompressed XML.
        position: u64,
        /// What is wrong.
        reason: String,
    },
    /// A line of a text source (hp.obo, a Brown file) cannot be read as its format says.
    #[error("{path}:{line}: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: u64,
        /// What is wrong.
        reason: String,
    },
    /// A source folder or file does not hold what it should.
    #[error("{path}: {reason}")]
    Source {
        /// The file or folder.
        path: PathBuf,
        /// What is missing or wrong.
        reason: String,
    },
    /// A row could not be serialised to JSON.
    #[error("{path}: writing JSON: {source}")]
    Json {
        /// The file being written.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: serde_json::Error,
    },
    /// An argument is out of range.
    #[error("invalid `{field}`: {reason}")]
    Argument {
        /// The argument or field.
        field: &'static str,
        /// Why it is rejected.
        reason: String,
    },
    /// Fetching a source asset failed.
    #[error(transparent)]
    Asset(#[from] retune_assets::AssetError),
}

/// Result with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where `key` falls in [0, 1]: the first 8 bytes of `sha256(key)`, read as a big-endian `u64`,
/// divided by `u64::MAX`. A pure function of the key, so splits built on it are stable across
/// runs, machines and input order.
pub fn hash_unit(key: &str) -> f64 {
    let digest = Sha256::digest(key.as_bytes());
    let mut head = [0u8; 8];
    head.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(head) as f64 / u64::MAX as f64
}

/// Whether `key` goes to the evaluation side of a split holding `eval_fraction` of the keys:
/// `hash_unit(key) < eval_fraction`.
pub fn in_eval(key: &str, eval_fraction: f64) -> bool {
    hash_unit(key) < eval_fraction
}

pub(crate) fn check_fraction(field: &'static str, fraction: f64) -> Result<()> {
    if (0.0..=1.0).contains(&fraction) {
        Ok(())
    } else {
        Err(Error::Argument {
            field,
            reason: format!("{fraction} is not a fraction in [0, 1]"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_unit_is_a_pure_function_in_range() {
        let a = hash_unit("12345");
        assert_eq!(a, hash_unit("12345"));
        assert!((0.0..=1.0).contains(&a));
        assert_ne!(a, hash_unit("12346"));
        assert!(!in_eval("12345", 0.0));
        assert!(in_eval("12345", 1.0));
    }
}
