//! Is MODEL the base an adapter was trained on? [`check_base`] recomputes the sha256 of the
//! model's weight files and compares them with the disclosure record; without a record it
//! falls back to the name the adapter gives its base (a weaker check, said so).

use crate::error::{Error, Result};
use crate::record::{hash_file, model_name, DisclosureRecord};
use retune_core::load::inspect_model;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// What the verdict rests on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Evidence {
    /// The sha256 of every base weight file, from a disclosure record.
    Record {
        /// The `disclosure.json` read.
        path: PathBuf,
    },
    /// Only a name: `base_model:` in the model card's front matter (weak: names, not content).
    ModelCard {
        /// The README.md read.
        path: PathBuf,
        /// The name given.
        base_model: String,
    },
    /// Only a name: `base_model_name_or_path` in adapter_config.json (weak).
    AdapterConfig {
        /// The adapter_config.json read.
        path: PathBuf,
        /// The name given.
        base_model: String,
    },
}

impl Evidence {
    /// True when the evidence is checksums, not a name.
    pub fn is_strong(&self) -> bool {
        matches!(self, Evidence::Record { .. })
    }
}

/// One recorded base file against the model's.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FileCheck {
    /// The file as recorded.
    pub recorded: String,
    /// Its recorded sha256.
    pub expected: String,
    /// The model file compared with it, if any.
    pub actual_path: Option<String>,
    /// The model file's sha256.
    pub actual: Option<String>,
    /// `expected == actual`.
    pub matches: bool,
}

/// The verdict of [`check_base`].
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BaseCheck {
    /// The model checked.
    pub model: PathBuf,
    /// What the verdict rests on.
    pub evidence: Evidence,
    /// Per recorded file (empty for name-only evidence).
    pub files: Vec<FileCheck>,
    /// The model is the base (same checksums; or, for name-only evidence, the same name).
    pub matches: bool,
    /// One line for people.
    pub message: String,
}

/// Where the record of `dir` is: `dir/disclosure.json` (a run folder) or
/// `dir/../disclosure.json` (an adapter in a run folder).
pub fn find_record(dir: &Path) -> Option<PathBuf> {
    [
        Some(dir.join("disclosure.json")),
        dir.parent().map(|p| p.join("disclosure.json")),
    ]
    .into_iter()
    .flatten()
    .find(|p| p.is_file())
}

/// Reads a `disclosure.json`.
pub fn read_record(path: &Path) -> Result<DisclosureRecord> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io("reading", path, e))?;
    serde_json::from_str(&text)
        .map_err(|e| Error::format(path, format!("not a disclosure record: {e}")))
}

/// The weight files of a model (a `.gguf` file, or a folder's safetensors), hashed.
fn model_files(model: &Path) -> Result<Vec<crate::record::FileHash>> {
    let files = match inspect_model(model) {
        Ok(s) => s.files,
        // Not a model retune can read: compare the bytes of a plain file anyway.
        Err(_) if model.is_file() => vec![model.to_path_buf()],
        Err(source) => {
            return Err(Error::Model {
                path: model.to_path_buf(),
                source,
            })
        }
    };
    files.iter().map(|f| hash_file(f)).collect()
}

fn file_name(p: &str) -> String {
    Path::new(p)
        .file_name()
        .map_or_else(|| p.to_string(), |n| n.to_string_lossy().into_owned())
}

/// `base_model:` from a README.md's front matter.
fn card_base_model(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let front = text.strip_prefix("---\n")?;
    let front = &front[..front.find("\n---")?];
    front.lines().find_map(|l| {
        let v = l.strip_prefix("base_model:")?.trim();
        let v = serde_json::from_str::<String>(v)
            .unwrap_or_else(|_| v.trim_matches(|c| c == '"' || c == '\'').to_string());
        (!v.is_empty()).then_some(v)
    })
}

/// `base_model_name_or_path` from an adapter_config.json.
fn config_base_model(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("base_model_name_or_path")?
        .as_str()
        .filter(|s| !s.is_empty())
        .map(String::from)
}

/// Compares recorded files with the model's: by file name, else (one file each, as GGUF) the
/// one with the other.
fn compare(
    recorded: &[crate::record::FileHash],
    actual: &[crate::record::FileHash],
) -> Vec<FileCheck> {
    recorded
        .iter()
        .map(|r| {
            let by_name = actual
                .iter()
                .find(|a| file_name(&a.path) == file_name(&r.path));
            let other =
                by_name.or_else(|| (recorded.len() == 1 && actual.len() == 1).then(|| &actual[0]));
            FileCheck {
                recorded: r.path.clone(),
                expected: r.sha256.clone(),
                actual_path: other.map(|a| a.path.clone()),
                actual: other.map(|a| a.sha256.clone()),
                matches: other.is_some_and(|a| a.sha256 == r.sha256),
            }
        })
        .collect()
}

/// Checks whether `model_path` is the base model of the adapter (or run) in `dir`.
///
/// Evidence, strongest first: `dir/disclosure.json` or `dir/../disclosure.json` (the sha256 of
/// every base weight file); else `base_model:` in `dir/README.md`; else
/// `base_model_name_or_path` in `dir/adapter_config.json` (both compared by name only).
pub fn check_base(dir: &Path, model_path: &Path) -> Result<BaseCheck> {
    if !dir.exists() {
        return Err(Error::io(
            "reading",
            dir,
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder"),
        ));
    }
    if let Some(record_path) = find_record(dir) {
        let record = read_record(&record_path)?;
        let recorded = &record.base_model.files;
        if recorded.is_empty() {
            return Err(Error::format(
                &record_path,
                "the record lists no base model files (the base model could not be read when it was written)",
            ));
        }
        let actual = model_files(model_path)?;
        let files = compare(recorded, &actual);
        let matches = files.iter().all(|f| f.matches) && recorded.len() == actual.len();
        let message = if matches {
            format!(
                "{} is the base model: the sha256 of all {} weight file(s) match {}",
                model_path.display(),
                files.len(),
                record_path.display()
            )
        } else {
            format!(
                "{} is not the base model recorded in {} (base: {}): {} of {} weight file(s) differ",
                model_path.display(),
                record_path.display(),
                record.base_model.name,
                files.iter().filter(|f| !f.matches).count().max(usize::from(recorded.len() != actual.len())),
                files.len().max(actual.len())
            )
        };
        return Ok(BaseCheck {
            model: model_path.to_path_buf(),
            evidence: Evidence::Record { path: record_path },
            files,
            matches,
            message,
        });
    }
    let readme = dir.join("README.md");
    let adapter_config = dir.join("adapter_config.json");
    let evidence = if let Some(name) = card_base_model(&readme) {
        Evidence::ModelCard {
            path: readme,
            base_model: name,
        }
    } else if let Some(name) = config_base_model(&adapter_config) {
        Evidence::AdapterConfig {
            path: adapter_config,
            base_model: name,
        }
    } else {
        return Err(Error::NoEvidence {
            path: dir.to_path_buf(),
        });
    };
    let (Evidence::ModelCard { base_model, path } | Evidence::AdapterConfig { base_model, path }) =
        &evidence
    else {
        unreachable!("a name-only evidence was just built")
    };
    let given = Path::new(base_model);
    let matches = given == model_path
        || model_name(given) == model_name(model_path)
        || (given.exists()
            && model_path.exists()
            && given.canonicalize().ok() == model_path.canonicalize().ok());
    let message = format!(
        "{} {} the base named in {} ({base_model}); by name only, no checksums recorded",
        model_path.display(),
        if matches { "has the name of" } else { "is not" },
        path.display()
    );
    Ok(BaseCheck {
        model: model_path.to_path_buf(),
        evidence,
        files: Vec::new(),
        matches,
        message,
    })
}
