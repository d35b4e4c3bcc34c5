//! Training data for the `clm` and `sft` objectives: read, validate, tokenise, mask, pack.
//!
//! - `clm` (continued pretraining): text files (`.txt`, `.md`) are one document each; JSON
//!   Lines files give one document per row's `text`. Each document is tokenised (BOS where the
//!   tokenizer adds one), ends with EOS, and is cut into pieces of at most `max_seq_len`
//!   tokens that overlap by one, so every token after the document's first is a target
//!   exactly once.
//! - `sft`: JSON Lines rows `{"prompt", "completion"}`, tokenised as TRL does for plain
//!   prompt/completion pairs: `prompt` then `completion` then EOS; by default only completion
//!   tokens and the EOS are targets (`train_on_prompt = true` makes the prompt a target too).
//!
//! Packing puts several examples in one row of `max_seq_len` tokens; attention never crosses
//! examples (segment ids) and positions restart per example. Without packing, each example
//! has a row of its own, padded. Nothing is dropped or cut silently: every dropped or
//! truncated row is counted by reason in [`FileStats`].

use crate::TrainError;
use retune_core::model::Batch;
use retune_core::ops::cross_entropy::IGNORE;
use retune_core::tokenizer::Tokenizer;
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One tokenised example: `ids`, and which of them are predicted (`is_target[0]` is always
/// false: the first token has no context).
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    /// Token ids.
    pub ids: Vec<u32>,
    /// Per token: is it a target of the loss?
    pub is_target: Vec<bool>,
    /// Content hash (hex), for the deterministic eval split and duplicate counting.
    pub hash: String,
}

/// What happened to the rows of one file.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct FileStats {
    /// The file.
    pub path: PathBuf,
    /// Rows (documents or JSON lines) read.
    pub rows_read: usize,
    /// Rows that became examples.
    pub rows_used: usize,
    /// Rows left out, by reason.
    pub dropped: BTreeMap<String, usize>,
    /// Rows cut to `max_seq_len`, by reason.
    pub truncated: BTreeMap<String, usize>,
    /// Tokens in the examples.
    pub tokens: usize,
    /// Tokens that are targets.
    pub target_tokens: usize,
}

/// What to do with an example longer than `max_seq_len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Overflow {
    /// Stop with an error naming file and line.
    Error,
    /// Keep the first `max_seq_len` tokens (counted).
    Truncate,
    /// Leave the example out (counted).
    Drop,
}

impl Overflow {
    /// Parses `"error" | "truncate" | "drop"`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "error" => Some(Overflow::Error),
            "truncate" => Some(Overflow::Truncate),
            "drop" => Some(Overflow::Drop),
            _ => None,
        }
    }
}

fn read_text(path: &Path) -> Result<String, TrainError> {
    let bytes = std::fs::read(path).map_err(|e| TrainError::data(path, 0, "", e.to_string()))?;
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        TrainError::data(path, 0, "", format!("invalid UTF-8 at byte {at}"))
    })
}

fn hash_of(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0u8]);
    }
    h.finalize()
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// JSON Lines rows of a file with their 1-based line numbers; blank lines are skipped.
fn json_lines(path: &Path, text: &str) -> Result<Vec<(u64, serde_json::Value)>, TrainError> {
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let line_no = i as u64 + 1;
        let v = serde_json::from_str(line)
            .map_err(|e| TrainError::data(path, line_no, "", format!("invalid JSON: {e}")))?;
        rows.push((line_no, v));
    }
    Ok(rows)
}

fn string_field(
    path: &Path,
    line: u64,
    row: &serde_json::Value,
    field: &str,
) -> Result<String, TrainError> {
    match row.get(field) {
        Some(serde_json::Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(TrainError::data(
            path,
            line,
            field,
            format!("expected a string, found {}", json_type(other)),
        )),
        None => Err(TrainError::data(path, line, field, "missing".to_string())),
    }
}

fn json_type(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

fn tokenize(
    tok: &Tokenizer,
    path: &Path,
    line: u64,
    text: &str,
    bos: bool,
) -> Result<Vec<u32>, TrainError> {
    let ids = if bos {
        tok.encode(text, true)
    } else {
        tok.encode_raw(text)
    };
    ids.map_err(|e| TrainError::data(path, line, "", format!("tokenizing: {e}")))
}

fn eos(tok: &Tokenizer) -> u32 {
    // The model's declared EOS comes first in `eos_ids`.
    tok.eos_ids.first().copied().unwrap_or(0)
}

/// Reads documents for continued pretraining (see the module docs).
pub fn read_clm(
    paths: &[PathBuf],
    tok: &Tokenizer,
    max_seq_len: usize,
) -> Result<(Vec<Example>, Vec<FileStats>), TrainError> {
    let mut examples = Vec::new();
    let mut all_stats = Vec::new();
    for path in paths {
        let text = read_text(path)?;
        let mut stats = FileStats {
            path: path.clone(),
            ..Default::default()
        };
        let docs: Vec<(u64, String)> = if path.extension().is_some_and(|e| e == "jsonl") {
            json_lines(path, &text)?
                .into_iter()
                .map(|(line, row)| Ok((line, string_field(path, line, &row, "text")?)))
                .collect::<Result<_, TrainError>>()?
        } else {
            vec![(0, text)]
        };
        for (line, doc) in docs {
            stats.rows_read += 1;
            if doc.trim().is_empty() {
                *stats.dropped.entry("empty text".into()).or_default() += 1;
                continue;
            }
            let mut ids = tokenize(tok, path, line, &doc, true)?;
            ids.push(eos(tok));
            stats.rows_used += 1;
            let hash = hash_of(&[&doc]);
            // Pieces overlap by one token, so every token after the document's first is a
            // target exactly once and none is lost at a piece boundary.
            let mut start = 0;
            while start + 1 < ids.len() {
                let end = (start + max_seq_len).min(ids.len());
                let piece = &ids[start..end];
                let mut is_target = vec![true; piece.len()];
                is_target[0] = false;
                stats.tokens += piece.len();
                stats.target_tokens += piece.len() - 1;
                examples.push(Example {
                    ids: piece.to_vec(),
                    is_target,
                    hash: hash.clone(),
                });
                start = end - 1;
            }
        }
        all_stats.push(stats);
    }
    Ok((examples, all_stats))
}

/// Reads prompt/completion pairs (see the module docs).
pub fn read_sft(
    paths: &[PathBuf],
    tok: &Tokenizer,
    max_seq_len: usize,
    on_overflow: Overflow,
    train_on_prompt: bool,
) -> Result<(Vec<Example>, Vec<FileStats>), TrainError> {
    let mut examples = Vec::new();
    let mut all_stats = Vec::new();
    for path in paths {
        let text = read_text(path)?;
        let mut stats = FileStats {
            path: path.clone(),
            ..Default::default()
        };
        for (line, row) in json_lines(path, &text)? {
            stats.rows_read += 1;
            let prompt = string_field(path, line, &row, "prompt")?;
            let completion = string_field(path, line, &row, "completion")?;
            if completion.trim().is_empty() {
                return Err(TrainError::data(path, line, "completion", "empty".into()));
            }
            let mut ids = tokenize(tok, path, line, &prompt, true)?;
            let prompt_len = ids.len();
            ids.extend(tokenize(tok, path, line, &completion, false)?);
            ids.push(eos(tok));
            let mut is_target: Vec<bool> = (0..ids.len())
                .map(|i| i >= prompt_len || train_on_prompt)
                .collect();
            is_target[0] = false;
            if ids.len() > max_seq_len {
                match on_overflow {
                    Overflow::Error => {
                        return Err(TrainError::data(
                            path,
                            line,
                            "",
                            format!(
                            "{} tokens exceed data.max_seq_len = {max_seq_len}; raise it, or set \
                                 data.on_overflow = \"truncate\" or \"drop\"",
                            ids.len()
                        ),
                        ))
                    }
                    Overflow::Drop => {
                        *stats
                            .dropped
                            .entry("longer than max_seq_len".into())
                            .or_default() += 1;
                        continue;
                    }
                    Overflow::Truncate => {
                        ids.truncate(max_seq_len);
                        is_target.truncate(max_seq_len);
                        *stats
                            .truncated
                            .entry("longer than max_seq_len".into())
                            .or_default() += 1;
                    }
                }
            }
            let targets = is_target.iter().filter(|&&t| t).count();
            if targets == 0 {
                *stats
                    .dropped
                    .entry("no completion token left after truncation".into())
                    .or_default() += 1;
                continue;
            }
            stats.rows_used += 1;
            stats.tokens += ids.len();
            stats.target_tokens += targets;
            examples.push(Example {
                ids,
                is_target,
                hash: hash_of(&[&prompt, &completion]),
            });
        }
        all_stats.push(stats);
    }
    Ok((examples, all_stats))
}

/// Splits examples into (train, eval) by content hash: the same example always lands on the
/// same side, whatever the order or the machine.
pub fn split_by_hash(examples: Vec<Example>, eval_fraction: f64) -> (Vec<Example>, Vec<Example>) {
    examples.into_iter().partition(|e| {
        let v = u64::from_str_radix(&e.hash[..16], 16).unwrap_or(0);
        (v as f64 / u64::MAX as f64) >= eval_fraction
    })
}

/// One row of `T` tokens: ids, next-token targets, positions and segments.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// `[T]` input ids (padding: `pad_id`).
    pub ids: Vec<u32>,
    /// `[T]` target of each position, [`IGNORE`] where none.
    pub targets: Vec<u32>,
    /// `[T]` RoPE positions, restarting per example.
    pub positions: Vec<u32>,
    /// `[T]` example index within the row (padding has its own).
    pub segments: Vec<u32>,
}

impl Row {
    fn new(t: usize) -> Self {
        Row {
            ids: Vec::with_capacity(t),
            targets: Vec::with_capacity(t),
            positions: Vec::with_capacity(t),
            segments: Vec::with_capacity(t),
        }
    }

    fn push(&mut self, ex: &Example) {
        let segment = self.segments.last().map_or(0, |s| s + 1);
        for (i, &id) in ex.ids.iter().enumerate() {
            self.ids.push(id);
            // Position i predicts token i + 1 when that token is a target of this example.
            let next = ex.ids.get(i + 1).filter(|_| ex.is_target[i + 1]);
            self.targets.push(next.copied().unwrap_or(IGNORE));
            self.positions.push(i as u32);
            self.segments.push(segment);
        }
    }

    fn pad(&mut self, t: usize, pad_id: u32) {
        let segment = self.segments.last().map_or(0, |s| s + 1);
        let mut pos = 0;
        while self.ids.len() < t {
            self.ids.push(pad_id);
            self.targets.push(IGNORE);
            self.positions.push(pos);
            self.segments.push(segment);
            pos += 1;
        }
    }

    /// Tokens that carry a loss.
    pub fn target_count(&self) -> usize {
        self.targets.iter().filter(|&&t| t != IGNORE).count()
    }
}

/// Lays examples into rows of `t` tokens: with `packing`, greedily in order (an example goes
/// into the current row if it fits, else starts a new one); without, one example per row.
/// Rows are padded with `pad_id` (never a target). Examples must be at most `t` long.
pub fn pack(examples: &[Example], t: usize, packing: bool, pad_id: u32) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut row = Row::new(t);
    for ex in examples {
        debug_assert!(
            ex.ids.len() <= t,
            "examples are cut to max_seq_len before packing"
        );
        if !row.ids.is_empty() && (!packing || row.ids.len() + ex.ids.len() > t) {
            row.pad(t, pad_id);
            rows.push(std::mem::replace(&mut row, Row::new(t)));
        }
        row.push(ex);
    }
    if !row.ids.is_empty() {
        row.pad(t, pad_id);
        rows.push(row);
    }
    rows
}

/// A batch of rows (all of the same length).
pub fn batch_of(rows: &[&Row]) -> Batch {
    let t = rows.first().map_or(0, |r| r.ids.len());
    let cat = |f: fn(&Row) -> &Vec<u32>| {
        rows.iter()
            .flat_map(|r| f(r).iter().copied())
            .collect::<Vec<u32>>()
    };
    let mut batch = Batch::with_targets(cat(|r| &r.ids), cat(|r| &r.targets), rows.len(), t);
    batch.positions = cat(|r| &r.positions);
    batch.segments = Some(cat(|r| &r.segments));
    batch
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(ids: &[u32], targets_from: usize) -> Example {
        Example {
            ids: ids.to_vec(),
            is_target: (0..ids.len()).map(|i| i >= targets_from && i > 0).collect(),
            hash: hash_of(&[&format!("{ids:?}")]),
        }
    }

    #[test]
    fn packing_restarts_positions_and_masks_prompts() {
        let a = ex(&[10, 11, 12], 2); // prompt 10 11, completion 12
        let b = ex(&[20, 21], 1);
        let rows = pack(&[a.clone(), b.clone()], 6, true, 0);
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!(r.ids, vec![10, 11, 12, 20, 21, 0]);
        assert_eq!(r.targets, vec![IGNORE, 12, IGNORE, 21, IGNORE, IGNORE]);
        assert_eq!(r.positions, vec![0, 1, 2, 0, 1, 0]);
        assert_eq!(r.segments, vec![0, 0, 0, 1, 1, 2]);
        let unpacked = pack(&[a, b], 6, false, 0);
        assert_eq!(unpacked.len(), 2);
        assert_eq!(unpacked[1].ids, vec![20, 21, 0, 0, 0, 0]);
        assert_eq!(
            unpacked[0].target_count() + unpacked[1].target_count(),
            r.target_count()
        );
    }

    #[test]
    fn packing_starts_a_new_row_when_full() {
        let rows = pack(&[ex(&[1, 2, 3, 4], 1), ex(&[5, 6, 7], 1)], 5, true, 0);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].ids, vec![5, 6, 7, 0, 0]);
    }

    #[test]
    fn split_is_stable_and_near_the_fraction() {
        let examples: Vec<Example> = (0..2000).map(|i| ex(&[i, i + 1], 1)).collect();
        let (train, eval) = split_by_hash(examples.clone(), 0.1);
        let share = eval.len() as f64 / 2000.0;
        assert!((share - 0.1).abs() < 0.03, "{share}");
        let reversed: Vec<Example> = examples.into_iter().rev().collect();
        let (_, eval2) = split_by_hash(reversed, 0.1);
        let mut a: Vec<&str> = eval.iter().map(|e| e.hash.as_str()).collect();
        let mut b: Vec<&str> = eval2.iter().map(|e| e.hash.as_str()).collect();
        a.sort();
        b.sort();
        assert_eq!(a, b);
        assert_eq!(train.len() + eval.len(), 2000);
    }
}
