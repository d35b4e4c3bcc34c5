//! Retention of general capability: perplexity on general text, before, during and after
//! training, windowed exactly as `retune eval` windows it (so anyone can recompute each figure).

use crate::TrainError;
use retune_core::tokenizer::Tokenizer;
use std::path::{Path, PathBuf};

/// Reads the documents of one file: the whole file (.txt, .md), or each JSON line's `text`.
pub fn read_documents(path: &Path) -> Result<Vec<String>, TrainError> {
    let bytes = std::fs::read(path).map_err(|e| TrainError::data(path, 0, "", e.to_string()))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        TrainError::data(
            path,
            0,
            "",
            format!("not UTF-8 text (invalid byte at offset {at})"),
        )
    })?;
    if path.extension().is_none_or(|e| e != "jsonl") {
        return Ok(vec![text]);
    }
    let mut docs = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let line_no = i as u64 + 1;
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| TrainError::data(path, line_no, "", format!("invalid JSON: {e}")))?;
        match v.get("text").and_then(|t| t.as_str()) {
            Some(t) => docs.push(t.to_string()),
            None => {
                return Err(TrainError::data(
                    path,
                    line_no,
                    "text",
                    "missing or not a string".into(),
                ))
            }
        }
    }
    Ok(docs)
}

/// Tokenised documents of several files, each with BOS where the tokenizer adds one.
pub fn tokenize_files(paths: &[PathBuf], tok: &Tokenizer) -> Result<Vec<Vec<u32>>, TrainError> {
    let mut docs = Vec::new();
    for path in paths {
        for doc in read_documents(path)? {
            docs.push(tok.encode(&doc, true)?);
        }
    }
    Ok(docs)
}

/// Relative change of perplexity: `after / before - 1`.
pub fn relative_change(before: f64, after: f64) -> f64 {
    after / before - 1.0
}
