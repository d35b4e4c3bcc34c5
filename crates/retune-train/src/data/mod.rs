//! Training data: read, validate, tokenise, mask, pack.
//!
//! Formats, detected per file (`data.format = "auto"`, from the first row's keys) or forced:
//! - `text`: `.txt` / `.md` files (one document each; folders are searched for `.txt`, `.md`,
//!   `.jsonl` and `.json` files), or JSON rows `{"text"}`. Under the `clm` objective each
//!   document is tokenised (BOS where the tokenizer adds one), ends with EOS, and is cut into
//!   pieces of at most `max_seq_len` tokens that overlap by one, so every token after the
//!   document's first is a target exactly once. Under `sft` a text row is one example, every
//!   token a target.
//! - `prompt-completion`: `{"prompt", "completion"}`, tokenised as TRL does for plain pairs:
//!   `prompt` then `completion` then EOS; by default only completion tokens and the EOS are
//!   targets (`train_on_prompt = true` makes the prompt a target too).
//! - `messages`: `{"messages": [{"role", "content", "weight"?}]}` (OpenAI chat format; roles
//!   system, user, assistant; `weight` 0 or 1). The conversation is rendered with the model's
//!   chat template exactly as `retune generate --chat` renders it ([`rows::render_ids`]), with
//!   `strftime_now` fixed at [`CHAT_TIME`] (2024-07-26 UTC) for reproducibility. The targets of
//!   assistant turn k are the tokens between the rendering of `messages[..k]` with a generation
//!   prompt and the rendering of `messages[..=k]`: the reply and the template's end-of-turn token
//!   (e.g. `<|im_end|>`). A template for which those renderings are not token prefixes of each
//!   other is an error naming the template; a turn whose span holds no EOS / end-of-turn token
//!   is counted in [`FileStats::warnings`]. A turn with `"weight": 0` is never a target.
//! - `alpaca`: `{"instruction", "input"?, "output"}`. With a chat template: one user message
//!   (`instruction`, plus a blank line and `input` when non-empty) and one assistant message
//!   `output`, rendered as `messages`. Without one: a prompt/completion pair with prompt
//!   [`rows::alpaca_prompt`] (`instruction\n\n[input\n\n]`).
//! - `preference`: `{"prompt", "chosen", "rejected"}`, each a string or a message list; read
//!   with [`read_preference`] (the `dpo` objective), validated everywhere.
//!
//! JSON Lines files stream: a file is never held whole (JSON arrays and text files are).
//! Packing puts several examples in one row of `max_seq_len` tokens; attention never crosses
//! examples (segment ids) and positions restart per example. Without packing, each example
//! has a row of its own, padded. Nothing is dropped or cut silently: every dropped or
//! truncated row is counted by reason in [`FileStats`]. The reading functions stop at the
//! first problem ([`TrainError::Data`]); [`check_files`] collects them all.

mod rows;
mod source;

pub use rows::{
    alpaca_prompt, alpaca_user, format_name, render_ids, PreferenceExample, CHAT_TIME, ROLES,
};

use crate::config::{DataFormat, ObjectiveKind, OnOverflow, RunConfig};
use crate::TrainError;
use retune_core::model::Batch;
use retune_core::ops::cross_entropy::IGNORE;
use retune_core::tokenizer::Tokenizer;
use rows::{Encoded, Record};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use source::{Layout, RawRow};
use std::collections::{BTreeMap, HashSet};
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

/// One bucket of a length histogram: rows of at most `up_to` tokens (and more than the
/// previous bucket's); `up_to: None` is the rows longer than `max_seq_len`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Bucket {
    /// Upper bound in tokens, inclusive (`None`: over `max_seq_len`).
    pub up_to: Option<usize>,
    /// Rows in the bucket.
    pub rows: usize,
}

/// Empty buckets for `max_seq_len`: powers of two from 16 below it, `max_seq_len`, then over.
pub fn histogram_buckets(max_seq_len: usize) -> Vec<Bucket> {
    let mut b = Vec::new();
    let mut e = 16;
    while e < max_seq_len {
        b.push(Bucket {
            up_to: Some(e),
            rows: 0,
        });
        e *= 2;
    }
    b.push(Bucket {
        up_to: Some(max_seq_len),
        rows: 0,
    });
    b.push(Bucket {
        up_to: None,
        rows: 0,
    });
    b
}

fn record_length(buckets: &mut [Bucket], len: usize) {
    if let Some(b) = buckets
        .iter_mut()
        .find(|b| b.up_to.is_none_or(|u| len <= u))
    {
        b.rows += 1;
    }
}

/// What happened to the rows of one file (also its provenance: size, sha256, format).
/// Reading it back is lenient: a field a summary lacks takes its default.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct FileStats {
    /// The file.
    pub path: PathBuf,
    /// Rows (documents or JSON rows) read.
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
    /// The format the rows were read as (`text`, `messages`, ...; empty when none was read).
    pub format: String,
    /// Size in bytes.
    pub bytes: u64,
    /// sha256 of the file (hex; empty when reading stopped early).
    pub sha256: String,
    /// Rows whose content repeats an earlier row exactly (this file or an earlier one); kept.
    pub duplicates: usize,
    /// Things that do not stop a run but deserve a look, counted by kind.
    pub warnings: BTreeMap<String, usize>,
    /// Row lengths in tokens before any cut (empty when not tokenised).
    pub length_histogram: Vec<Bucket>,
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

impl From<OnOverflow> for Overflow {
    fn from(o: OnOverflow) -> Self {
        match o {
            OnOverflow::Error => Overflow::Error,
            OnOverflow::Truncate => Overflow::Truncate,
            OnOverflow::Drop => Overflow::Drop,
        }
    }
}

/// How to read data files.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ReadOptions {
    /// Row format (`Auto`: detected per file).
    pub format: DataFormat,
    /// `Clm`: text documents cut into pieces; `Sft`: supervised rows; `Dpo`: preference rows.
    /// `None` (for checking files without a run configuration): each row as its format implies
    /// ([`ReadOptions::objective_for`]).
    pub objective: Option<ObjectiveKind>,
    /// Longest example in tokens.
    pub max_seq_len: usize,
    /// What to do with longer ones.
    pub on_overflow: Overflow,
    /// Prompt tokens are targets too.
    pub train_on_prompt: bool,
}

impl ReadOptions {
    /// The options of a run configuration (`[data]` and `objective.kind`).
    pub fn from_config(config: &RunConfig) -> Self {
        let d = &config.data;
        ReadOptions {
            format: d.format,
            objective: Some(config.objective.kind),
            max_seq_len: d.max_seq_len,
            on_overflow: d.on_overflow.into(),
            train_on_prompt: d.train_on_prompt,
        }
    }

    /// The objective a forced format implies when no configuration says (`text`: clm,
    /// `preference`: dpo, anything else: sft).
    pub fn objective_for(format: DataFormat) -> ObjectiveKind {
        match format {
            DataFormat::Text => ObjectiveKind::Clm,
            DataFormat::Preference => ObjectiveKind::Dpo,
            _ => ObjectiveKind::Sft,
        }
    }
}

/// One problem in the data: `file:line: field: what is wrong` (line 0: the file as a whole).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Problem {
    /// The file.
    pub path: PathBuf,
    /// 1-based line (0: the file as a whole).
    pub line: u64,
    /// The JSON field (`messages[2].role`), empty for the row as a whole.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}: ", self.path.display(), self.line)?;
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        write!(f, "{}", self.message)
    }
}

impl From<Problem> for TrainError {
    fn from(p: Problem) -> Self {
        TrainError::data(&p.path, p.line, &p.field, p.message)
    }
}

/// Everything [`check_files`] found.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct CheckReport {
    /// Every problem, in file and line order.
    pub problems: Vec<Problem>,
    /// Per file.
    pub files: Vec<FileStats>,
    /// Rows read, all files.
    pub rows_read: usize,
    /// Rows used, all files.
    pub rows_used: usize,
    /// Rows left out, by reason, all files (rows with problems under "invalid row").
    pub dropped: BTreeMap<String, usize>,
    /// Rows cut, by reason, all files.
    pub truncated: BTreeMap<String, usize>,
    /// Tokens, all files (0 without a tokenizer).
    pub tokens: usize,
    /// Target tokens, all files.
    pub target_tokens: usize,
    /// Exact duplicate rows (by content hash), all files.
    pub duplicates: usize,
    /// Warnings by kind, all files.
    pub warnings: BTreeMap<String, usize>,
    /// Lengths in tokens, all files.
    pub length_histogram: Vec<Bucket>,
    /// Whether rows were tokenised (false: structure only, no token counts).
    pub tokenized: bool,
}

impl CheckReport {
    /// No problems: the data can be trained on.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
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

fn row_hash(rec: &Record, raw: &serde_json::Value) -> String {
    match rec {
        // The hashes the first releases used, so eval splits stay where they were.
        Record::Text(t) => hash_of(&[t]),
        Record::PromptCompletion { prompt, completion } => hash_of(&[prompt, completion]),
        _ => hash_of(&[rec.format(), &raw.to_string()]),
    }
}

const DROP_INVALID: &str = "invalid row";
const DROP_LONG: &str = "longer than max_seq_len";
const DROP_NO_TARGET: &str = "no completion token left after truncation";
const WARN_NO_EOS: &str = "assistant turns with no end-of-turn/EOS token in the loss";

/// The state of one read over a set of files.
struct Reader<'a> {
    tok: Option<&'a Tokenizer>,
    opts: ReadOptions,
    /// Stop at the first problem (the training readers).
    first_only: bool,
    /// Keep examples (false for a check).
    keep: bool,
    examples: Vec<Example>,
    prefs: Vec<PreferenceExample>,
    problems: Vec<Problem>,
    /// First 64 bits of each row's content hash (8 bytes a row, for duplicate counting).
    seen: HashSet<u64>,
}

impl Reader<'_> {
    fn stopped(&self) -> bool {
        self.first_only && !self.problems.is_empty()
    }

    fn problem(&mut self, path: &Path, line: u64, field: String, message: String) {
        self.problems.push(Problem {
            path: path.to_path_buf(),
            line,
            field,
            message,
        });
    }

    fn file(&mut self, path: &Path) -> FileStats {
        let mut stats = FileStats {
            path: path.to_path_buf(),
            length_histogram: if self.tok.is_some() {
                histogram_buckets(self.opts.max_seq_len)
            } else {
                Vec::new()
            },
            ..Default::default()
        };
        let layout = match source::layout_of(path) {
            Ok(l) => l,
            Err(e) => {
                self.problem(path, 0, String::new(), e.to_string());
                return stats;
            }
        };
        let mut format = match (layout, self.opts.format) {
            (Layout::Whole, DataFormat::Auto | DataFormat::Text) => Some(DataFormat::Text),
            (Layout::Whole, f) => {
                self.problem(
                    path,
                    0,
                    String::new(),
                    format!(
                        "data.format is \"{}\" but this is a text file (not JSON rows)",
                        format_name(f)
                    ),
                );
                return stats;
            }
            (_, DataFormat::Auto) => None,
            (_, f) => Some(f),
        };
        let mut on_row = |line: u64, raw: Result<RawRow, source::Issue>| -> bool {
            stats.rows_read += 1;
            let bad = |this: &mut Self, stats: &mut FileStats, issues: Vec<source::Issue>| {
                *stats.dropped.entry(DROP_INVALID.into()).or_default() += 1;
                for (field, message) in issues {
                    this.problem(path, line, field, message);
                }
            };
            let (rec, json) = match raw {
                Err(issue) => {
                    bad(self, &mut stats, vec![issue]);
                    return !self.stopped();
                }
                Ok(RawRow::Text(t)) => (Record::Text(t), serde_json::Value::Null),
                Ok(RawRow::Json(v)) => {
                    let f = match format {
                        Some(f) => f,
                        None => match source::detect(&v) {
                            Some(f) => *format.insert(f),
                            None => {
                                let keys = v
                                    .as_object()
                                    .map(|o| o.keys().cloned().collect::<Vec<_>>().join(", "))
                                    .unwrap_or_default();
                                bad(
                                    self,
                                    &mut stats,
                                    vec![(
                                        String::new(),
                                        format!(
                                            "cannot tell the format from this row (keys: [{keys}]); \
                                             expected text, prompt/completion, messages, \
                                             instruction/output or prompt/chosen/rejected, or set \
                                             data.format"
                                        ),
                                    )],
                                );
                                return !self.stopped();
                            }
                        },
                    };
                    match rows::parse(f, &v) {
                        Ok(r) => (r, v),
                        Err(issues) => {
                            bad(self, &mut stats, issues);
                            return !self.stopped();
                        }
                    }
                }
            };
            if let Err(issue) = self.row(&mut stats, &rec, &json) {
                bad(self, &mut stats, vec![issue]);
            }
            !self.stopped()
        };
        match source::for_each_row(path, layout, &mut on_row) {
            Ok(info) => {
                stats.bytes = info.bytes;
                if !self.stopped() {
                    stats.sha256 = info.sha256;
                }
            }
            Err(e) => self.problem(path, 0, String::new(), format!("reading: {e}")),
        }
        stats.format = format
            .map(|f| format_name(f).to_string())
            .unwrap_or_default();
        stats
    }

    /// Handles a parsed row; an `Err` is the row's problem.
    fn row(
        &mut self,
        stats: &mut FileStats,
        rec: &Record,
        json: &serde_json::Value,
    ) -> Result<(), source::Issue> {
        let objective = self.opts.objective.unwrap_or(match rec {
            Record::Text(_) => ObjectiveKind::Clm,
            Record::Preference { .. } => ObjectiveKind::Dpo,
            _ => ObjectiveKind::Sft,
        });
        let fits = match (objective, rec) {
            (ObjectiveKind::Clm, Record::Text(_)) => true,
            (ObjectiveKind::Clm, _) => false,
            (ObjectiveKind::Sft, Record::Preference { .. }) => false,
            (ObjectiveKind::Sft, _) => true,
            (ObjectiveKind::Dpo | ObjectiveKind::Orpo, r) => {
                matches!(r, Record::Preference { .. })
            }
        };
        if !fits {
            let want = match objective {
                ObjectiveKind::Clm => "clm reads text rows",
                ObjectiveKind::Sft => "sft reads text, prompt/completion, messages or alpaca rows",
                ObjectiveKind::Dpo | ObjectiveKind::Orpo => "dpo and orpo read preference rows",
            };
            return Err((
                String::new(),
                format!(
                    "a {} row, but objective {want}; set objective.kind or data.format",
                    rec.format()
                ),
            ));
        }
        if let Record::Text(t) = rec {
            if t.trim().is_empty() {
                *stats.dropped.entry("empty text".into()).or_default() += 1;
                return Ok(());
            }
        }
        let hash = row_hash(rec, json);
        if !self
            .seen
            .insert(u64::from_str_radix(&hash[..16], 16).unwrap_or(0))
        {
            stats.duplicates += 1;
        }
        let Some(tok) = self.tok else {
            stats.rows_used += 1;
            return Ok(());
        };
        let max = self.opts.max_seq_len;
        match (objective, rec) {
            (ObjectiveKind::Clm, Record::Text(doc)) => {
                let mut ids = tok
                    .encode(doc, true)
                    .map_err(|e| (String::new(), format!("tokenizing: {e}")))?;
                ids.push(tok.eos_ids.first().copied().unwrap_or(0));
                record_length(&mut stats.length_histogram, ids.len());
                stats.rows_used += 1;
                // Pieces overlap by one token, so every token after the document's first is a
                // target exactly once and none is lost at a piece boundary.
                let mut start = 0;
                while start + 1 < ids.len() {
                    let end = (start + max).min(ids.len());
                    let piece = &ids[start..end];
                    let mut is_target = vec![true; piece.len()];
                    is_target[0] = false;
                    stats.tokens += piece.len();
                    stats.target_tokens += piece.len() - 1;
                    if self.keep {
                        self.examples.push(Example {
                            ids: piece.to_vec(),
                            is_target,
                            hash: hash.clone(),
                        });
                    }
                    start = end - 1;
                }
            }
            (
                ObjectiveKind::Dpo | ObjectiveKind::Orpo,
                Record::Preference {
                    prompt,
                    chosen,
                    rejected,
                },
            ) => {
                let (p, mut c, mut r) = rows::encode_preference(tok, prompt, chosen, rejected)?;
                let longest = p.len() + c.len().max(r.len());
                record_length(&mut stats.length_histogram, longest);
                if longest > max {
                    match self.overflow(stats, longest)? {
                        false => return Ok(()),
                        true => {
                            let room = max.saturating_sub(p.len());
                            c.truncate(room);
                            r.truncate(room);
                            if room == 0 {
                                *stats.dropped.entry(DROP_NO_TARGET.into()).or_default() += 1;
                                return Ok(());
                            }
                        }
                    }
                }
                stats.rows_used += 1;
                stats.tokens += 2 * p.len() + c.len() + r.len();
                stats.target_tokens += c.len() + r.len();
                if self.keep {
                    self.prefs.push(PreferenceExample {
                        prompt_ids: p,
                        chosen_ids: c,
                        rejected_ids: r,
                        hash,
                    });
                }
            }
            (_, rec) => {
                let Encoded {
                    mut ids,
                    mut is_target,
                    turns_without_eos,
                } = rows::encode_sft(tok, rec, self.opts.train_on_prompt)?;
                if turns_without_eos > 0 {
                    *stats.warnings.entry(WARN_NO_EOS.into()).or_default() += turns_without_eos;
                }
                record_length(&mut stats.length_histogram, ids.len());
                if ids.len() > max {
                    if !self.overflow(stats, ids.len())? {
                        return Ok(());
                    }
                    ids.truncate(max);
                    is_target.truncate(max);
                }
                let targets = is_target.iter().filter(|&&t| t).count();
                if targets == 0 {
                    *stats.dropped.entry(DROP_NO_TARGET.into()).or_default() += 1;
                    return Ok(());
                }
                stats.rows_used += 1;
                stats.tokens += ids.len();
                stats.target_tokens += targets;
                if self.keep {
                    self.examples.push(Example {
                        ids,
                        is_target,
                        hash,
                    });
                }
            }
        }
        Ok(())
    }

    /// An over-long row: `Err` under "error", `Ok(false)` when dropped, `Ok(true)` to truncate.
    fn overflow(&self, stats: &mut FileStats, len: usize) -> Result<bool, source::Issue> {
        let max = self.opts.max_seq_len;
        match self.opts.on_overflow {
            Overflow::Error => Err((
                String::new(),
                format!(
                    "{len} tokens exceed data.max_seq_len = {max}; raise it, or set \
                     data.on_overflow = \"truncate\" or \"drop\""
                ),
            )),
            Overflow::Drop => {
                *stats.dropped.entry(DROP_LONG.into()).or_default() += 1;
                Ok(false)
            }
            Overflow::Truncate => {
                *stats.truncated.entry(DROP_LONG.into()).or_default() += 1;
                Ok(true)
            }
        }
    }
}

fn run_reader<'a>(
    paths: &[PathBuf],
    tok: Option<&'a Tokenizer>,
    opts: ReadOptions,
    first_only: bool,
    keep: bool,
) -> (Reader<'a>, Vec<FileStats>) {
    let mut r = Reader {
        tok,
        opts,
        first_only,
        keep,
        examples: Vec::new(),
        prefs: Vec::new(),
        problems: Vec::new(),
        seen: HashSet::new(),
    };
    let mut stats = Vec::new();
    for path in source::expand(paths) {
        stats.push(r.file(&path));
        if r.stopped() {
            break;
        }
    }
    (r, stats)
}

/// Reads training examples of any supervised or text format (the general entry point; see the
/// module docs): the first problem is returned as [`TrainError::Data`]. For `objective = dpo`
/// use [`read_preference`].
pub fn read_examples(
    paths: &[PathBuf],
    tok: &Tokenizer,
    opts: &ReadOptions,
) -> Result<(Vec<Example>, Vec<FileStats>), TrainError> {
    let (mut r, stats) = run_reader(paths, Some(tok), *opts, true, true);
    if !r.problems.is_empty() {
        return Err(r.problems.swap_remove(0).into());
    }
    Ok((r.examples, stats))
}

/// Reads preference rows `{"prompt", "chosen", "rejected"}` (strings or message lists) for DPO.
pub fn read_preference(
    paths: &[PathBuf],
    tok: &Tokenizer,
    opts: &ReadOptions,
) -> Result<(Vec<PreferenceExample>, Vec<FileStats>), TrainError> {
    let opts = ReadOptions {
        objective: Some(ObjectiveKind::Dpo),
        ..*opts
    };
    let (mut r, stats) = run_reader(paths, Some(tok), opts, true, true);
    if !r.problems.is_empty() {
        return Err(r.problems.swap_remove(0).into());
    }
    Ok((r.prefs, stats))
}

/// Reads documents for continued pretraining (see the module docs).
pub fn read_clm(
    paths: &[PathBuf],
    tok: &Tokenizer,
    max_seq_len: usize,
) -> Result<(Vec<Example>, Vec<FileStats>), TrainError> {
    let opts = ReadOptions {
        format: DataFormat::Text,
        objective: Some(ObjectiveKind::Clm),
        max_seq_len,
        on_overflow: Overflow::Error,
        train_on_prompt: true,
    };
    read_examples(paths, tok, &opts)
}

/// Reads supervised rows, format detected per file (see the module docs).
pub fn read_sft(
    paths: &[PathBuf],
    tok: &Tokenizer,
    max_seq_len: usize,
    on_overflow: Overflow,
    train_on_prompt: bool,
) -> Result<(Vec<Example>, Vec<FileStats>), TrainError> {
    let opts = ReadOptions {
        format: DataFormat::Auto,
        objective: Some(ObjectiveKind::Sft),
        max_seq_len,
        on_overflow,
        train_on_prompt,
    };
    read_examples(paths, tok, &opts)
}

/// Validates every row of `paths` and collects every problem (never stopping at the first),
/// with statistics. Without a tokenizer only the structure is checked (no token counts, no
/// length checks). Examples are not kept: JSON Lines files stream through.
pub fn check_files(paths: &[PathBuf], tok: Option<&Tokenizer>, opts: &ReadOptions) -> CheckReport {
    let (r, files) = run_reader(paths, tok, *opts, false, false);
    let mut report = CheckReport {
        problems: r.problems,
        tokenized: tok.is_some(),
        length_histogram: if tok.is_some() {
            histogram_buckets(opts.max_seq_len)
        } else {
            Vec::new()
        },
        ..Default::default()
    };
    for f in &files {
        report.rows_read += f.rows_read;
        report.rows_used += f.rows_used;
        report.tokens += f.tokens;
        report.target_tokens += f.target_tokens;
        report.duplicates += f.duplicates;
        for (k, v) in &f.dropped {
            *report.dropped.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &f.truncated {
            *report.truncated.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &f.warnings {
            *report.warnings.entry(k.clone()).or_default() += v;
        }
        for (a, b) in report.length_histogram.iter_mut().zip(&f.length_histogram) {
            a.rows += b.rows;
        }
    }
    report.files = files;
    report
}

/// Splits examples into (train, eval) by content hash: the same example always lands on the
/// same side, whatever the order or the machine.
pub fn split_by_hash(examples: Vec<Example>, eval_fraction: f64) -> (Vec<Example>, Vec<Example>) {
    split_by(examples, eval_fraction, |e| &e.hash)
}

/// [`split_by_hash`] for preference pairs.
pub fn split_pairs_by_hash(
    pairs: Vec<PreferenceExample>,
    eval_fraction: f64,
) -> (Vec<PreferenceExample>, Vec<PreferenceExample>) {
    split_by(pairs, eval_fraction, |p| &p.hash)
}

fn split_by<X>(items: Vec<X>, eval_fraction: f64, hash: impl Fn(&X) -> &str) -> (Vec<X>, Vec<X>) {
    items.into_iter().partition(|x| {
        let h = hash(x);
        let v = u64::from_str_radix(&h[..16.min(h.len())], 16).unwrap_or(0);
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
