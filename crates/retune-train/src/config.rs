//! The run configuration: a TOML file with the sections `[model]`, `[method]`, `[objective]`,
//! `[data]`, `[retention]`, `[train]` and `[output]`, plus `--set section.key=value` overrides.
//!
//! [`RunConfig::load`] reads the file, applies the overrides, fills every default and validates.
//! An unknown section or key is an error naming the nearest valid one; a bad value is an error
//! naming the key and where it came from (the file or the `--set` argument). Relative paths in
//! the file resolve against the file's folder; relative paths given with `--set` resolve
//! against the current directory. [`RunConfig::to_toml_string`] writes the resolved
//! configuration with every default spelled out (optional keys that are unset are omitted).

use serde::{Deserialize, Serialize, Serializer};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use toml::{Table, Value};

/// What went wrong reading a run configuration. Messages say where (file or `--set` argument),
/// which key, and how to fix it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The configuration file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML.
    #[error("{path}: not valid TOML: {message}")]
    Parse {
        /// The configuration file.
        path: PathBuf,
        /// The TOML parser's message (with line and column).
        message: String,
    },
    /// A `--set` argument that is not `section.key=value`.
    #[error("--set {arg}: {reason}")]
    BadSet {
        /// The argument as given.
        arg: String,
        /// What is wrong and the expected form.
        reason: String,
    },
    /// A section that does not exist.
    #[error("{at}: unknown section `[{section}]`; did you mean `[{suggestion}]`?")]
    UnknownSection {
        /// The file or `--set` argument.
        at: String,
        /// The section as written.
        section: String,
        /// The nearest valid section.
        suggestion: String,
    },
    /// A key that does not exist.
    #[error("{at}: unknown key `{key}`; did you mean `{suggestion}`?")]
    UnknownKey {
        /// The file or `--set` argument.
        at: String,
        /// The key as written, `section.key`.
        key: String,
        /// The nearest valid key, `section.key`.
        suggestion: String,
    },
    /// A required key that is absent.
    #[error("{at}: `{key}` is required: {hint}")]
    Missing {
        /// The file.
        at: String,
        /// The key, `section.key`.
        key: String,
        /// An example of what to write.
        hint: String,
    },
    /// A value of the wrong type or out of range.
    #[error("{at}: `{key}` {reason}")]
    Invalid {
        /// The file or `--set` argument the value came from.
        at: String,
        /// The key, `section.key`.
        key: String,
        /// What is wrong, with the value found.
        reason: String,
    },
}

/// Shorthand for results in this module.
type Result<T, E = ConfigError> = std::result::Result<T, E>;

/// Compute dtype of the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// 32-bit float.
    F32,
    /// bfloat16, where the trainer and hardware support it.
    Bf16,
}

/// How a frozen base's float matrices are held (`model.quantize`): as they are, or quantised
/// on load to a GGML block type (QLoRA). A GGUF's quantised matrices keep their blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Quantize {
    /// Float matrices stay dense (bf16 under bf16 products, else f32).
    #[serde(rename = "none")]
    None,
    /// llama.cpp's Q8_0: 8.5 bits per weight, blocks of 32.
    #[serde(rename = "q8_0")]
    Q8_0,
    /// llama.cpp's Q4_0: 4.5 bits per weight, blocks of 32.
    #[serde(rename = "q4_0")]
    Q4_0,
    /// llama.cpp's Q4_K: 4.5 bits per weight, super-blocks of 256 (rows must be multiples).
    #[serde(rename = "q4_k")]
    Q4K,
}

/// Which parameters are trained.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MethodKind {
    /// Low-rank adapters on the target linear layers; the base stays frozen.
    Lora,
    /// Every parameter.
    Full,
}

/// A linear layer of a decoder layer, named as PEFT names it (the model's own type).
pub use retune_core::model::Target as TargetModule;

/// The LoRA targets: every linear layer of the decoder layers, or a list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Targets {
    /// `"all-linear"`: every linear layer of every decoder layer (not the LM head), as PEFT.
    AllLinear,
    /// The listed modules, in the order given, without repeats.
    Modules(Vec<TargetModule>),
}

impl Targets {
    /// The modules targeted, in decoder-layer order for `all-linear`.
    pub fn modules(&self) -> Vec<TargetModule> {
        match self {
            Targets::AllLinear => TargetModule::ALL.to_vec(),
            Targets::Modules(m) => m.clone(),
        }
    }
}

impl Serialize for Targets {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Targets::AllLinear => s.serialize_str("all-linear"),
            Targets::Modules(m) => m.serialize(s),
        }
    }
}

/// Training objective.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ObjectiveKind {
    /// Continued pretraining on raw text.
    Clm,
    /// Supervised fine-tuning: loss on the completion only.
    Sft,
    /// Direct preference optimisation against a frozen reference (the starting policy).
    Dpo,
    /// Odds-ratio preference optimisation: chosen NLL plus an odds-ratio term, no reference.
    Orpo,
}

impl ObjectiveKind {
    /// Objectives that read preference pairs.
    pub fn is_preference(self) -> bool {
        matches!(self, ObjectiveKind::Dpo | ObjectiveKind::Orpo)
    }
}

/// The DPO loss (TRL's `loss_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PreferenceLoss {
    /// `-log sigmoid(beta * margin)`.
    Sigmoid,
    /// `(margin - 1 / (2 beta))^2` on mean log-probabilities.
    Ipo,
}

/// Format of the data files.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DataFormat {
    /// Detected from the first rows.
    Auto,
    /// Raw text.
    Text,
    /// `{"prompt", "completion"}` rows.
    PromptCompletion,
    /// Chat `{"messages": [...]}` rows.
    Messages,
    /// Alpaca `{"instruction", "input", "output"}` rows.
    Alpaca,
    /// `{"prompt", "chosen", "rejected"}` rows.
    Preference,
}

/// What to do with an example longer than `max_seq_len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnOverflow {
    /// Stop with an error naming the row.
    Error,
    /// Cut it to `max_seq_len` (counted).
    Truncate,
    /// Leave it out (counted).
    Drop,
}

/// Learning-rate schedule after warmup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// The peak rate throughout.
    Constant,
    /// Linear decay to 0 at the last step.
    Linear,
    /// Half-cosine decay to 0 at the last step.
    Cosine,
}

/// `[model]`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ModelConfig {
    /// Hugging Face model folder or `.gguf` file. Required.
    #[serde(serialize_with = "ser_path")]
    pub path: PathBuf,
    /// Compute dtype.
    pub dtype: Dtype,
    /// Quantise a frozen base's float matrices on load (LoRA only).
    pub quantize: Quantize,
}

/// `[method]`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MethodConfig {
    /// LoRA or full fine-tuning.
    pub kind: MethodKind,
    /// LoRA rank (at least 1).
    pub r: usize,
    /// LoRA alpha (> 0); the scaling is alpha / r, or alpha / sqrt(r) with rsLoRA.
    pub alpha: f64,
    /// LoRA dropout probability in [0, 1).
    pub dropout: f64,
    /// LoRA target modules.
    pub targets: Targets,
    /// rsLoRA scaling alpha / sqrt(r).
    pub rslora: bool,
    /// A PEFT adapter to continue training (its r, alpha, targets and rsLoRA replace the
    /// keys above); none: a fresh adapter.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init_adapter: Option<PathBuf>,
}

/// `[objective]`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ObjectiveConfig {
    /// clm, sft, dpo or orpo.
    pub kind: ObjectiveKind,
    /// DPO temperature, or ORPO's odds-ratio weight (> 0); unused by clm and sft.
    pub beta: f64,
    /// DPO loss variant.
    pub loss: PreferenceLoss,
    /// DPO label smoothing (conservative DPO), in [0, 0.5).
    pub label_smoothing: f64,
}

/// `[data]`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DataConfig {
    /// Training files. Required, at least one.
    #[serde(serialize_with = "ser_paths")]
    pub train: Vec<PathBuf>,
    /// Evaluation files; empty when `eval_fraction` (or nothing) is used.
    #[serde(serialize_with = "ser_paths")]
    pub eval: Vec<PathBuf>,
    /// Share of the training rows held out for evaluation (deterministic split), in (0, 1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_fraction: Option<f64>,
    /// Data format.
    pub format: DataFormat,
    /// Longest sequence in tokens (at least 2).
    pub max_seq_len: usize,
    /// Pack several examples into one row.
    pub packing: bool,
    /// What to do with examples longer than `max_seq_len`.
    pub on_overflow: OnOverflow,
    /// Take the loss on prompt tokens too.
    pub train_on_prompt: bool,
}

/// `[retention]`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RetentionConfig {
    /// General-text files whose perplexity is tracked.
    #[serde(serialize_with = "ser_paths")]
    pub data: Vec<PathBuf>,
    /// Stop when the retention perplexity rises by more than this share (0.10 = 10%).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_increase: Option<f64>,
}

/// `[train]`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct TrainConfig {
    /// Passes over the training data (at least 1); `max_steps` wins when set.
    pub epochs: u64,
    /// Optimizer steps to take, overriding `epochs`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_steps: Option<u64>,
    /// Rows per micro-batch (at least 1).
    pub batch_size: usize,
    /// Micro-batches per optimizer step (at least 1).
    pub grad_accum: usize,
    /// Peak learning rate (> 0).
    pub lr: f64,
    /// Schedule after warmup.
    pub schedule: ScheduleKind,
    /// Steps of linear warmup from 0.
    pub warmup_steps: u64,
    /// AdamW decoupled weight decay (>= 0).
    pub weight_decay: f64,
    /// Gradient-norm clipping threshold (>= 0; 0 turns clipping off).
    pub max_grad_norm: f64,
    /// Evaluate every N optimizer steps (0: only at the end).
    pub eval_every: u64,
    /// Save a checkpoint every N optimizer steps (0: only at the end).
    pub save_every: u64,
    /// Stop after this many evaluations without improvement (0: never).
    pub early_stopping_patience: u64,
    /// The one seed of every source of randomness.
    pub seed: u64,
    /// Bitwise-identical reruns and resumes on the same machine.
    pub deterministic: bool,
    /// AdamW beta1, in [0, 1).
    pub adam_beta1: f64,
    /// AdamW beta2, in [0, 1).
    pub adam_beta2: f64,
    /// AdamW epsilon (> 0).
    pub adam_eps: f64,
    /// Full fine-tuning only: each layer's AdamW step is taken as soon as its backward is
    /// done, so a step holds one layer's gradients instead of the model's (the same update,
    /// bit for bit). Needs `grad_accum = 1` and `max_grad_norm = 0`.
    pub optimizer_in_backward: bool,
}

/// `[output]`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OutputConfig {
    /// The run folder. Default: `runs/<config file stem>` in the current directory.
    #[serde(serialize_with = "ser_path")]
    pub dir: PathBuf,
}

/// A complete, validated run configuration.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RunConfig {
    /// `[model]`.
    pub model: ModelConfig,
    /// `[method]`.
    pub method: MethodConfig,
    /// `[objective]`.
    pub objective: ObjectiveConfig,
    /// `[data]`.
    pub data: DataConfig,
    /// `[retention]`.
    pub retention: RetentionConfig,
    /// `[train]`.
    pub train: TrainConfig,
    /// `[output]`.
    pub output: OutputConfig,
}

fn ser_path<S: Serializer>(p: &Path, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&p.to_string_lossy())
}

fn ser_paths<S: Serializer>(ps: &[PathBuf], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(ps.iter().map(|p| p.to_string_lossy()))
}

/// The type a key's value must have; drives `--set` parsing and extraction.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    /// A string (a word from a fixed set where the key says so).
    Str,
    /// A path.
    Path,
    /// A list of paths (a single string is a list of one).
    Paths,
    /// A boolean.
    Bool,
    /// A non-negative integer.
    Int,
    /// A number (an integer is accepted).
    Float,
    /// `"all-linear"` or a list of module names.
    Targets,
}

/// Every section and key, in the order they are written.
const SCHEMA: &[(&str, &[(&str, Kind)])] = &[
    (
        "model",
        &[
            ("path", Kind::Path),
            ("dtype", Kind::Str),
            ("quantize", Kind::Str),
        ],
    ),
    (
        "method",
        &[
            ("kind", Kind::Str),
            ("r", Kind::Int),
            ("alpha", Kind::Float),
            ("dropout", Kind::Float),
            ("targets", Kind::Targets),
            ("rslora", Kind::Bool),
            ("init_adapter", Kind::Path),
        ],
    ),
    (
        "objective",
        &[
            ("kind", Kind::Str),
            ("beta", Kind::Float),
            ("loss", Kind::Str),
            ("label_smoothing", Kind::Float),
        ],
    ),
    (
        "data",
        &[
            ("train", Kind::Paths),
            ("eval", Kind::Paths),
            ("eval_fraction", Kind::Float),
            ("format", Kind::Str),
            ("max_seq_len", Kind::Int),
            ("packing", Kind::Bool),
            ("on_overflow", Kind::Str),
            ("train_on_prompt", Kind::Bool),
        ],
    ),
    (
        "retention",
        &[("data", Kind::Paths), ("max_increase", Kind::Float)],
    ),
    (
        "train",
        &[
            ("epochs", Kind::Int),
            ("max_steps", Kind::Int),
            ("batch_size", Kind::Int),
            ("grad_accum", Kind::Int),
            ("lr", Kind::Float),
            ("schedule", Kind::Str),
            ("warmup_steps", Kind::Int),
            ("weight_decay", Kind::Float),
            ("max_grad_norm", Kind::Float),
            ("eval_every", Kind::Int),
            ("save_every", Kind::Int),
            ("early_stopping_patience", Kind::Int),
            ("seed", Kind::Int),
            ("deterministic", Kind::Bool),
            ("adam_beta1", Kind::Float),
            ("adam_beta2", Kind::Float),
            ("adam_eps", Kind::Float),
            ("optimizer_in_backward", Kind::Bool),
        ],
    ),
    ("output", &[("dir", Kind::Path)]),
];

/// Names other tools (transformers, PEFT, TRL, Axolotl) use, mapped to ours.
const ALIASES: &[(&str, &str)] = &[
    ("learning_rate", "train.lr"),
    ("lr_scheduler_type", "train.schedule"),
    ("lr_scheduler", "train.schedule"),
    ("scheduler", "train.schedule"),
    ("num_train_epochs", "train.epochs"),
    ("num_epochs", "train.epochs"),
    ("per_device_train_batch_size", "train.batch_size"),
    ("micro_batch_size", "train.batch_size"),
    ("gradient_accumulation_steps", "train.grad_accum"),
    ("warmup", "train.warmup_steps"),
    ("warmup_ratio", "train.warmup_steps"),
    ("eval_steps", "train.eval_every"),
    ("save_steps", "train.save_every"),
    ("adam_epsilon", "train.adam_eps"),
    ("full_determinism", "train.deterministic"),
    ("lora_r", "method.r"),
    ("rank", "method.r"),
    ("lora_alpha", "method.alpha"),
    ("lora_dropout", "method.dropout"),
    ("target_modules", "method.targets"),
    ("lora_target_modules", "method.targets"),
    ("use_rslora", "method.rslora"),
    ("max_length", "data.max_seq_len"),
    ("max_seq_length", "data.max_seq_len"),
    ("sequence_len", "data.max_seq_len"),
    ("val_set_size", "data.eval_fraction"),
    ("output_dir", "output.dir"),
    ("model_name_or_path", "model.path"),
    ("base_model", "model.path"),
    ("torch_dtype", "model.dtype"),
];

fn section_keys(section: &str) -> Option<&'static [(&'static str, Kind)]> {
    SCHEMA.iter().find(|(s, _)| *s == section).map(|(_, k)| *k)
}

fn key_kind(section: &str, key: &str) -> Option<Kind> {
    section_keys(section)?
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, kind)| *kind)
}

/// Every valid key as `section.key`.
pub fn valid_keys() -> Vec<String> {
    SCHEMA
        .iter()
        .flat_map(|(s, keys)| keys.iter().map(move |(k, _)| format!("{s}.{k}")))
        .collect()
}

/// Levenshtein distance over characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// The candidate nearest to `word` by edit distance (ignoring case and `-` vs `_`); the first
/// one on ties.
fn nearest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> &'a str {
    let norm = |s: &str| s.to_lowercase().replace('-', "_");
    let w = norm(word);
    candidates
        .into_iter()
        .min_by_key(|c| edit_distance(&w, &norm(c)))
        .unwrap_or("")
}

/// The valid key nearest to `key` written in `section` (`None`: at the top level).
fn suggest_key(section: Option<&str>, key: &str) -> String {
    let lower = key.to_lowercase().replace('-', "_");
    if let Some((_, full)) = ALIASES.iter().find(|(alias, _)| *alias == lower) {
        return full.to_string();
    }
    // The same name in another section (`train.r` -> `method.r`).
    if let Some(full) = valid_keys()
        .into_iter()
        .find(|full| full.split_once('.').is_some_and(|(_, k)| k == lower))
    {
        return full;
    }
    match section.and_then(|s| section_keys(s).map(|keys| (s, keys))) {
        Some((s, keys)) => format!("{s}.{}", nearest(key, keys.iter().map(|(k, _)| *k))),
        None => {
            let all = valid_keys();
            let short = nearest(
                key,
                all.iter().map(|f| f.split_once('.').map_or("", |p| p.1)),
            );
            all.iter()
                .find(|f| f.ends_with(&format!(".{short}")))
                .cloned()
                .unwrap_or_default()
        }
    }
}

fn suggest_section(section: &str) -> &'static str {
    nearest(section, SCHEMA.iter().map(|(s, _)| *s))
}

/// The merged table with the origin of every value, as extraction reads it.
struct Source<'a> {
    table: Table,
    /// The `--set` argument each overridden key came from (others come from the file).
    origins: BTreeMap<String, String>,
    file: &'a Path,
    /// Folder relative paths in the file resolve against.
    file_dir: PathBuf,
    /// Folder relative paths in `--set` resolve against.
    set_dir: PathBuf,
}

impl Source<'_> {
    fn at(&self, key: &str) -> String {
        match self.origins.get(key) {
            Some(arg) => format!("--set {arg}"),
            None => self.file.display().to_string(),
        }
    }

    fn invalid(&self, key: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            at: self.at(key),
            key: key.to_string(),
            reason: reason.into(),
        }
    }

    fn get(&self, key: &str) -> Option<&Value> {
        let (s, k) = key.split_once('.')?;
        self.table.get(s)?.as_table()?.get(k)
    }

    fn base_dir(&self, key: &str) -> &Path {
        match self.origins.get(key) {
            Some(_) => &self.set_dir,
            None => &self.file_dir,
        }
    }

    fn bool(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(Value::Boolean(b)) => Ok(*b),
            Some(v) => Err(self.invalid(key, format!("must be true or false, got {}", show(v)))),
        }
    }

    fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Integer(i)) if *i >= 0 => Ok(Some(*i as u64)),
            Some(v) => Err(self.invalid(
                key,
                format!("must be a non-negative integer, got {}", show(v)),
            )),
        }
    }

    fn u64(&self, key: &str, default: u64) -> Result<u64> {
        Ok(self.opt_u64(key)?.unwrap_or(default))
    }

    fn usize(&self, key: &str, default: usize) -> Result<usize> {
        let v = self.u64(key, default as u64)?;
        usize::try_from(v).map_err(|_| self.invalid(key, format!("is too large: {v}")))
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Float(f)) => Ok(Some(*f)),
            Some(Value::Integer(i)) => Ok(Some(*i as f64)),
            Some(v) => Err(self.invalid(key, format!("must be a number, got {}", show(v)))),
        }
    }

    fn f64(&self, key: &str, default: f64) -> Result<f64> {
        Ok(self.opt_f64(key)?.unwrap_or(default))
    }

    fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.invalid(key, format!("must be a string, got {}", show(v)))),
        }
    }

    /// A word from `choices` (written as they serialise).
    fn choice<T: Copy>(&self, key: &str, default: T, choices: &[(&str, T)]) -> Result<T> {
        let Some(word) = self.opt_str(key)? else {
            return Ok(default);
        };
        match choices.iter().find(|(name, _)| *name == word) {
            Some((_, v)) => Ok(*v),
            None => {
                let list: Vec<String> = choices.iter().map(|(n, _)| format!("\"{n}\"")).collect();
                Err(self.invalid(
                    key,
                    format!("must be one of {}; got \"{word}\"", list.join(", ")),
                ))
            }
        }
    }

    fn resolve(&self, key: &str, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir(key).join(p)
        }
    }

    fn opt_path(&self, key: &str) -> Result<Option<PathBuf>> {
        match self.opt_str(key)? {
            None => Ok(None),
            Some("") => Err(self.invalid(key, "must not be empty")),
            Some(p) => Ok(Some(self.resolve(key, p))),
        }
    }

    fn paths(&self, key: &str) -> Result<Vec<PathBuf>> {
        let items: Vec<&Value> = match self.get(key) {
            None => return Ok(Vec::new()),
            Some(v @ Value::String(_)) => vec![v],
            Some(Value::Array(a)) => a.iter().collect(),
            Some(v) => {
                return Err(self.invalid(key, format!("must be a list of paths, got {}", show(v))))
            }
        };
        items
            .into_iter()
            .map(|v| match v {
                Value::String(s) if !s.is_empty() => Ok(self.resolve(key, s)),
                v => Err(self.invalid(
                    key,
                    format!("must list non-empty path strings, got {}", show(v)),
                )),
            })
            .collect()
    }

    fn targets(&self, key: &str) -> Result<Targets> {
        let names: Vec<&Value> = match self.get(key) {
            None => return Ok(Targets::AllLinear),
            Some(Value::String(s)) if s == "all-linear" => return Ok(Targets::AllLinear),
            Some(v @ Value::String(_)) => vec![v],
            Some(Value::Array(a)) => a.iter().collect(),
            Some(v) => {
                return Err(self.invalid(
                    key,
                    format!(
                        "must be \"all-linear\" or a list of module names, got {}",
                        show(v)
                    ),
                ))
            }
        };
        let valid: Vec<&str> = TargetModule::ALL.iter().map(|t| t.name()).collect();
        let mut modules = Vec::new();
        for v in names {
            let Value::String(name) = v else {
                return Err(self.invalid(
                    key,
                    format!("must list module names as strings, got {}", show(v)),
                ));
            };
            let Some(t) = TargetModule::from_name(name) else {
                return Err(self.invalid(
                    key,
                    format!(
                        "names unknown module \"{name}\"; did you mean \"{}\"? valid: {}, or \"all-linear\"",
                        nearest(name, valid.iter().copied()),
                        valid.join(", ")
                    ),
                ));
            };
            if modules.contains(&t) {
                return Err(self.invalid(key, format!("lists \"{name}\" twice")));
            }
            modules.push(t);
        }
        if modules.is_empty() {
            return Err(self.invalid(
                key,
                "is empty: list at least one module or write \"all-linear\"",
            ));
        }
        Ok(Targets::Modules(modules))
    }
}

/// A value described for an error message: `string "abc"`, `integer 3`, ...
fn show(v: &Value) -> String {
    match v {
        Value::String(s) => format!("string \"{s}\""),
        Value::Integer(i) => format!("integer {i}"),
        Value::Float(f) => format!("number {f}"),
        Value::Boolean(b) => format!("boolean {b}"),
        Value::Datetime(d) => format!("datetime {d}"),
        Value::Array(_) => "a list".into(),
        Value::Table(_) => "a table".into(),
    }
}

/// Parses a `--set` value for a key of `kind`: as a TOML value, else (or for a string key whose
/// value is not a TOML string) as the bare text.
fn parse_set_value(raw: &str, kind: Kind) -> Value {
    let parsed = toml::from_str::<Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"));
    match (kind, parsed) {
        (Kind::Str | Kind::Path, Some(v @ Value::String(_))) => v,
        (Kind::Str | Kind::Path, _) => Value::String(raw.to_string()),
        (Kind::Paths | Kind::Targets, Some(v @ (Value::String(_) | Value::Array(_)))) => v,
        (Kind::Paths | Kind::Targets, _) => Value::String(raw.to_string()),
        (_, Some(v)) => v,
        (_, None) => Value::String(raw.to_string()),
    }
}

/// Checks every section and key of a parsed file against the schema.
fn check_keys(table: &Table, at: &str) -> Result<()> {
    for (name, value) in table {
        match (section_keys(name), value) {
            (Some(keys), Value::Table(t)) => {
                for key in t.keys() {
                    if !keys.iter().any(|(k, _)| k == key) {
                        return Err(ConfigError::UnknownKey {
                            at: at.to_string(),
                            key: format!("{name}.{key}"),
                            suggestion: suggest_key(Some(name), key),
                        });
                    }
                }
            }
            (Some(_), v) => {
                return Err(ConfigError::Invalid {
                    at: at.to_string(),
                    key: name.clone(),
                    reason: format!("must be a section ([{name}]), got {}", show(v)),
                })
            }
            (None, Value::Table(_)) => {
                return Err(ConfigError::UnknownSection {
                    at: at.to_string(),
                    section: name.clone(),
                    suggestion: suggest_section(name).to_string(),
                })
            }
            (None, _) => {
                return Err(ConfigError::UnknownKey {
                    at: at.to_string(),
                    key: name.clone(),
                    suggestion: suggest_key(None, name),
                })
            }
        }
    }
    Ok(())
}

/// Applies one `--set section.key=value` to the table. An empty value removes the key (back to
/// its default).
fn apply_set(table: &mut Table, arg: &str) -> Result<String> {
    let bad = |reason: &str| ConfigError::BadSet {
        arg: arg.to_string(),
        reason: reason.to_string(),
    };
    let (key, raw) = arg
        .split_once('=')
        .ok_or_else(|| bad("expected section.key=value, e.g. --set train.lr=1e-4"))?;
    let (key, raw) = (key.trim(), raw.trim());
    let at = format!("--set {arg}");
    let Some((section, name)) = key.split_once('.') else {
        return Err(ConfigError::UnknownKey {
            at,
            key: key.to_string(),
            suggestion: suggest_key(None, key),
        });
    };
    if section_keys(section).is_none() {
        return Err(ConfigError::UnknownKey {
            at,
            key: key.to_string(),
            suggestion: suggest_key(None, name),
        });
    }
    let Some(kind) = key_kind(section, name) else {
        return Err(ConfigError::UnknownKey {
            at,
            key: key.to_string(),
            suggestion: suggest_key(Some(section), name),
        });
    };
    let sec = table
        .entry(section.to_string())
        .or_insert_with(|| Value::Table(Table::new()));
    let Value::Table(sec) = sec else {
        return Err(bad("the file's section is not a table"));
    };
    if raw.is_empty() {
        sec.remove(name);
    } else {
        sec.insert(name.to_string(), parse_set_value(raw, kind));
    }
    Ok(format!("{section}.{name}"))
}

impl RunConfig {
    /// Reads `path`, applies `sets` (`section.key=value`, in order), fills defaults and
    /// validates. Relative paths from `--set` resolve against the current directory.
    pub fn load(path: &Path, sets: &[impl AsRef<str>]) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let cwd = std::env::current_dir().map_err(|source| ConfigError::Io {
            path: PathBuf::from("."),
            source,
        })?;
        Self::from_toml_str(&text, path, sets, &cwd)
    }

    /// Parses configuration text as if read from `file` (which names it in errors and whose
    /// folder relative paths resolve against), then applies `sets`, whose relative paths resolve
    /// against `set_dir`.
    pub fn from_toml_str(
        text: &str,
        file: &Path,
        sets: &[impl AsRef<str>],
        set_dir: &Path,
    ) -> Result<Self> {
        let mut table: Table = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: file.to_path_buf(),
            message: e.message().to_string() + &line_of(text, e.span()),
        })?;
        check_keys(&table, &file.display().to_string())?;
        let mut origins = BTreeMap::new();
        for arg in sets {
            let arg = arg.as_ref();
            let key = apply_set(&mut table, arg)?;
            origins.insert(key, arg.to_string());
        }
        let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
        let file_dir = match file.parent() {
            Some(d) if !d.as_os_str().is_empty() => absolute(d),
            _ => absolute(Path::new(".")),
        };
        let src = Source {
            table,
            origins,
            file,
            file_dir,
            set_dir: absolute(set_dir),
        };
        let cfg = Self::extract(&src)?;
        cfg.check()
            .map_err(|(key, reason)| src.invalid(&key, reason))?;
        Ok(cfg)
    }

    fn extract(src: &Source) -> Result<Self> {
        let at = src.file.display().to_string();
        let missing = |key: &str, hint: &str| ConfigError::Missing {
            at: at.clone(),
            key: key.into(),
            hint: hint.into(),
        };
        let model = ModelConfig {
            path: src.opt_path("model.path")?.ok_or_else(|| {
                missing(
                    "model.path",
                    "a Hugging Face model folder or a .gguf file, e.g. [model] path = \"models/SmolLM2-135M-Instruct\"",
                )
            })?,
            dtype: src.choice("model.dtype", Dtype::F32, &[("f32", Dtype::F32), ("bf16", Dtype::Bf16)])?,
            quantize: src.choice(
                "model.quantize",
                Quantize::None,
                &[
                    ("none", Quantize::None),
                    ("q8_0", Quantize::Q8_0),
                    ("q4_0", Quantize::Q4_0),
                    ("q4_k", Quantize::Q4K),
                ],
            )?,
        };
        let method = MethodConfig {
            kind: src.choice(
                "method.kind",
                MethodKind::Lora,
                &[("lora", MethodKind::Lora), ("full", MethodKind::Full)],
            )?,
            r: src.usize("method.r", 16)?,
            alpha: src.f64("method.alpha", 32.0)?,
            dropout: src.f64("method.dropout", 0.05)?,
            targets: src.targets("method.targets")?,
            rslora: src.bool("method.rslora", false)?,
            init_adapter: src.opt_path("method.init_adapter")?,
        };
        let objective = ObjectiveConfig {
            kind: src.choice(
                "objective.kind",
                ObjectiveKind::Sft,
                &[
                    ("clm", ObjectiveKind::Clm),
                    ("sft", ObjectiveKind::Sft),
                    ("dpo", ObjectiveKind::Dpo),
                    ("orpo", ObjectiveKind::Orpo),
                ],
            )?,
            beta: src.f64("objective.beta", 0.1)?,
            loss: src.choice(
                "objective.loss",
                PreferenceLoss::Sigmoid,
                &[
                    ("sigmoid", PreferenceLoss::Sigmoid),
                    ("ipo", PreferenceLoss::Ipo),
                ],
            )?,
            label_smoothing: src.f64("objective.label_smoothing", 0.0)?,
        };
        let train_files = src.paths("data.train")?;
        if train_files.is_empty() {
            return Err(missing(
                "data.train",
                "list the training files, e.g. [data] train = [\"data/train.jsonl\"]",
            ));
        }
        let data = DataConfig {
            train: train_files,
            eval: src.paths("data.eval")?,
            eval_fraction: src.opt_f64("data.eval_fraction")?,
            format: src.choice(
                "data.format",
                DataFormat::Auto,
                &[
                    ("auto", DataFormat::Auto),
                    ("text", DataFormat::Text),
                    ("prompt-completion", DataFormat::PromptCompletion),
                    ("messages", DataFormat::Messages),
                    ("alpaca", DataFormat::Alpaca),
                    ("preference", DataFormat::Preference),
                ],
            )?,
            max_seq_len: src.usize("data.max_seq_len", 512)?,
            packing: src.bool("data.packing", true)?,
            on_overflow: src.choice(
                "data.on_overflow",
                OnOverflow::Error,
                &[
                    ("error", OnOverflow::Error),
                    ("truncate", OnOverflow::Truncate),
                    ("drop", OnOverflow::Drop),
                ],
            )?,
            train_on_prompt: src.bool("data.train_on_prompt", false)?,
        };
        let retention = RetentionConfig {
            data: src.paths("retention.data")?,
            max_increase: src.opt_f64("retention.max_increase")?,
        };
        let train = TrainConfig {
            epochs: src.u64("train.epochs", 1)?,
            max_steps: src.opt_u64("train.max_steps")?,
            batch_size: src.usize("train.batch_size", 4)?,
            grad_accum: src.usize("train.grad_accum", 1)?,
            lr: src.f64("train.lr", 2e-4)?,
            schedule: src.choice(
                "train.schedule",
                ScheduleKind::Constant,
                &[
                    ("constant", ScheduleKind::Constant),
                    ("linear", ScheduleKind::Linear),
                    ("cosine", ScheduleKind::Cosine),
                ],
            )?,
            warmup_steps: src.u64("train.warmup_steps", 0)?,
            weight_decay: src.f64("train.weight_decay", 0.0)?,
            max_grad_norm: src.f64("train.max_grad_norm", 1.0)?,
            eval_every: src.u64("train.eval_every", 50)?,
            save_every: src.u64("train.save_every", 100)?,
            early_stopping_patience: src.u64("train.early_stopping_patience", 0)?,
            seed: src.u64("train.seed", 42)?,
            deterministic: src.bool("train.deterministic", true)?,
            adam_beta1: src.f64("train.adam_beta1", 0.9)?,
            adam_beta2: src.f64("train.adam_beta2", 0.999)?,
            adam_eps: src.f64("train.adam_eps", 1e-8)?,
            optimizer_in_backward: src.bool("train.optimizer_in_backward", false)?,
        };
        let dir = match src.opt_path("output.dir")? {
            Some(d) => d,
            None => {
                let stem = src
                    .file
                    .file_stem()
                    .map_or_else(|| "run".to_string(), |s| s.to_string_lossy().into_owned());
                src.set_dir.join("runs").join(stem)
            }
        };
        Ok(RunConfig {
            model,
            method,
            objective,
            data,
            retention,
            train,
            output: OutputConfig { dir },
        })
    }

    /// Checks every range rule; returns the first offence as (key, reason).
    fn check(&self) -> Result<(), (String, String)> {
        fn fail(key: &str, reason: String) -> Result<(), (String, String)> {
            Err((key.to_string(), reason))
        }
        let (m, d, t) = (&self.method, &self.data, &self.train);
        if m.r == 0 {
            return fail("method.r", "must be at least 1, got 0".into());
        }
        if !(m.alpha > 0.0 && m.alpha.is_finite()) {
            return fail(
                "method.alpha",
                format!("must be greater than 0, got {}", m.alpha),
            );
        }
        if !(0.0..1.0).contains(&m.dropout) {
            return fail(
                "method.dropout",
                format!("must be in [0, 1), got {}", m.dropout),
            );
        }
        if !(self.objective.beta > 0.0 && self.objective.beta.is_finite()) {
            return fail(
                "objective.beta",
                format!("must be greater than 0, got {}", self.objective.beta),
            );
        }
        let smoothing = self.objective.label_smoothing;
        if !(0.0..0.5).contains(&smoothing) {
            return fail(
                "objective.label_smoothing",
                format!("must be in [0, 0.5), got {smoothing}"),
            );
        }
        if let Some(f) = d.eval_fraction {
            if !d.eval.is_empty() {
                return fail(
                    "data.eval_fraction",
                    "cannot be combined with data.eval: give eval files or a fraction, not both"
                        .into(),
                );
            }
            if !(f > 0.0 && f < 1.0) {
                return fail("data.eval_fraction", format!("must be in (0, 1), got {f}"));
            }
        }
        if d.max_seq_len < 2 {
            return fail(
                "data.max_seq_len",
                format!("must be at least 2, got {}", d.max_seq_len),
            );
        }
        if let Some(x) = self.retention.max_increase {
            if !(x >= 0.0 && x.is_finite()) {
                return fail(
                    "retention.max_increase",
                    format!("must be 0 or more (0.10 = 10%), got {x}"),
                );
            }
        }
        if t.epochs == 0 {
            return fail("train.epochs", "must be at least 1, got 0".into());
        }
        if t.max_steps == Some(0) {
            return fail("train.max_steps", "must be at least 1, got 0".into());
        }
        if t.batch_size == 0 {
            return fail("train.batch_size", "must be at least 1, got 0".into());
        }
        if t.grad_accum == 0 {
            return fail("train.grad_accum", "must be at least 1, got 0".into());
        }
        if !(t.lr > 0.0 && t.lr.is_finite()) {
            return fail("train.lr", format!("must be greater than 0, got {}", t.lr));
        }
        if !(t.weight_decay >= 0.0 && t.weight_decay.is_finite()) {
            return fail(
                "train.weight_decay",
                format!("must be 0 or more, got {}", t.weight_decay),
            );
        }
        if !(t.max_grad_norm >= 0.0 && t.max_grad_norm.is_finite()) {
            return fail(
                "train.max_grad_norm",
                format!("must be 0 (no clipping) or more, got {}", t.max_grad_norm),
            );
        }
        for (key, b) in [
            ("train.adam_beta1", t.adam_beta1),
            ("train.adam_beta2", t.adam_beta2),
        ] {
            if !(0.0..1.0).contains(&b) {
                return fail(key, format!("must be in [0, 1), got {b}"));
            }
        }
        if !(t.adam_eps > 0.0 && t.adam_eps.is_finite()) {
            return fail(
                "train.adam_eps",
                format!("must be greater than 0, got {}", t.adam_eps),
            );
        }
        if self.model.quantize != Quantize::None && m.kind == MethodKind::Full {
            return fail(
                "model.quantize",
                "quantises a frozen base, and full fine-tuning trains every weight: use \
                 method.kind = \"lora\" (QLoRA), or model.quantize = \"none\""
                    .into(),
            );
        }
        if t.optimizer_in_backward {
            // Each layer's gradients are gone once folded in: no global norm to clip by, no
            // later micro-batch to add to them.
            let needs = [
                (m.kind == MethodKind::Full, "method.kind = \"full\""),
                (
                    !self.objective.kind.is_preference(),
                    "a clm or sft objective",
                ),
                (t.grad_accum == 1, "train.grad_accum = 1"),
                (t.max_grad_norm == 0.0, "train.max_grad_norm = 0"),
            ];
            if let Some((_, need)) = needs.iter().find(|(ok, _)| !ok) {
                return fail(
                    "train.optimizer_in_backward",
                    format!("needs {need}; set it, or set train.optimizer_in_backward = false"),
                );
            }
        }
        Ok(())
    }

    /// Validates a configuration built in code (a parsed one is already valid).
    pub fn validate(&self) -> Result<()> {
        self.check().map_err(|(key, reason)| ConfigError::Invalid {
            at: "configuration".into(),
            key,
            reason,
        })
    }

    /// The configuration as TOML, every section and key written out (unset optional keys,
    /// `data.eval_fraction`, `retention.max_increase` and `train.max_steps`, are omitted).
    pub fn to_toml_string(&self) -> String {
        // Invariant: every section holds plain values and arrays of strings, which TOML
        // always represents; paths are written lossily as UTF-8.
        toml::to_string(self).expect("a run configuration always serialises to TOML")
    }
}

/// ` at line L` for a parse error's span.
fn line_of(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    span.map_or_else(String::new, |s| {
        let line = text[..s.start.min(text.len())].matches('\n').count() + 1;
        format!(" (line {line})")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "[model]\npath = \"m.gguf\"\n[data]\ntrain = [\"t.jsonl\"]\n";

    fn parse(text: &str, sets: &[&str]) -> Result<RunConfig> {
        RunConfig::from_toml_str(text, Path::new("/cfg/run.toml"), sets, Path::new("/cwd"))
    }

    fn err(text: &str, sets: &[&str]) -> String {
        parse(text, sets).unwrap_err().to_string()
    }

    #[test]
    fn defaults_are_filled_and_paths_resolve_against_the_file_folder() {
        let c = parse(MINIMAL, &[]).unwrap();
        assert_eq!(c.model.path, PathBuf::from("/cfg/m.gguf"));
        assert_eq!(c.model.dtype, Dtype::F32);
        assert_eq!(c.data.train, vec![PathBuf::from("/cfg/t.jsonl")]);
        assert_eq!(c.output.dir, PathBuf::from("/cwd/runs/run"));
        assert_eq!(c.method.kind, MethodKind::Lora);
        assert_eq!(
            (c.method.r, c.method.alpha, c.method.dropout),
            (16, 32.0, 0.05)
        );
        assert_eq!(c.method.targets, Targets::AllLinear);
        assert_eq!(c.objective.kind, ObjectiveKind::Sft);
        assert_eq!(c.data.max_seq_len, 512);
        assert!(c.data.packing && !c.data.train_on_prompt);
        let t = &c.train;
        assert_eq!(
            (t.epochs, t.max_steps, t.batch_size, t.grad_accum),
            (1, None, 4, 1)
        );
        assert_eq!(
            (t.lr, t.schedule, t.warmup_steps),
            (2e-4, ScheduleKind::Constant, 0)
        );
        assert_eq!((t.eval_every, t.save_every, t.seed), (50, 100, 42));
        assert_eq!((t.adam_beta1, t.adam_beta2, t.adam_eps), (0.9, 0.999, 1e-8));
        assert!(t.deterministic);
    }

    #[test]
    fn design_example_parses() {
        let text = r#"
[model]
path = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
dtype = "f32"
[method]
kind = "lora"
r = 16
alpha = 32
dropout = 0.05
targets = ["q_proj", "v_proj"]
rslora = false
[objective]
kind = "sft"
beta = 0.1
[data]
train = ["data/train.jsonl"]
eval = ["/abs/eval.jsonl"]
format = "auto"
max_seq_len = 512
packing = true
on_overflow = "error"
train_on_prompt = false
[retention]
data = ["general/brown.txt"]
max_increase = 0.10
[train]
epochs = 1
batch_size = 4
grad_accum = 4
lr = 2e-4
schedule = "cosine"
warmup_steps = 10
weight_decay = 0.0
max_grad_norm = 1.0
eval_every = 50
save_every = 100
early_stopping_patience = 0
seed = 42
deterministic = true
[output]
dir = "runs/cardiology"
"#;
        let c = parse(text, &[]).unwrap();
        assert_eq!(c.method.alpha, 32.0, "an integer alpha is a number");
        assert_eq!(
            c.method.targets,
            Targets::Modules(vec![TargetModule::QProj, TargetModule::VProj])
        );
        assert_eq!(c.data.eval, vec![PathBuf::from("/abs/eval.jsonl")]);
        assert_eq!(
            c.retention.data,
            vec![PathBuf::from("/cfg/general/brown.txt")]
        );
        assert_eq!(c.retention.max_increase, Some(0.10));
        assert_eq!(c.train.schedule, ScheduleKind::Cosine);
        assert_eq!(c.train.grad_accum, 4);
        assert_eq!(c.output.dir, PathBuf::from("/cfg/runs/cardiology"));
    }

    #[test]
    fn sets_override_with_toml_values_or_bare_words() {
        let c = parse(
            MINIMAL,
            &[
                "train.lr=1e-4",
                "method.targets=[\"q_proj\",\"v_proj\"]",
                "train.schedule=cosine",
                "model.path=other/model.gguf",
                "data.train=extra.jsonl",
                "train.max_steps=7",
                "method.rslora=true",
                "output.dir=2024",
            ],
        )
        .unwrap();
        assert_eq!(c.train.lr, 1e-4);
        assert_eq!(
            c.method.targets.modules(),
            vec![TargetModule::QProj, TargetModule::VProj]
        );
        assert_eq!(c.train.schedule, ScheduleKind::Cosine);
        assert_eq!(c.model.path, PathBuf::from("/cwd/other/model.gguf"));
        assert_eq!(c.data.train, vec![PathBuf::from("/cwd/extra.jsonl")]);
        assert_eq!(c.train.max_steps, Some(7));
        assert!(c.method.rslora);
        assert_eq!(c.output.dir, PathBuf::from("/cwd/2024"));
        // An empty value restores the default.
        let c = parse(
            "[train]\nlr = 0.5\n[model]\npath=\"m\"\n[data]\ntrain=\"t\"",
            &["train.lr="],
        )
        .unwrap();
        assert_eq!(c.train.lr, 2e-4);
    }

    #[test]
    fn unknown_keys_name_the_nearest_valid_key() {
        assert_eq!(
            err(&format!("{MINIMAL}[train]\nlearning_rate = 1e-4\n"), &[]),
            "/cfg/run.toml: unknown key `train.learning_rate`; did you mean `train.lr`?"
        );
        assert_eq!(
            err(MINIMAL, &["train.learning_rate=1e-4"]),
            "--set train.learning_rate=1e-4: unknown key `train.learning_rate`; did you mean `train.lr`?"
        );
        assert!(err(&format!("{MINIMAL}[train]\nbatch_sise = 2\n"), &[])
            .ends_with("unknown key `train.batch_sise`; did you mean `train.batch_size`?"));
        assert!(
            err(&format!("{MINIMAL}[train]\nr = 2\n"), &[]).ends_with("did you mean `method.r`?")
        );
        assert!(err(&format!("{MINIMAL}[trian]\nlr = 2\n"), &[])
            .ends_with("unknown section `[trian]`; did you mean `[train]`?"));
        assert!(err(&format!("lr = 2\n{MINIMAL}"), &[])
            .ends_with("unknown key `lr`; did you mean `train.lr`?"));
        assert!(err(MINIMAL, &["trian.seed=1"]).contains("did you mean `train.seed`?"));
        assert!(err(MINIMAL, &["lr"]).starts_with("--set lr: expected section.key=value"));
    }

    #[test]
    fn bad_values_name_the_key_and_where_it_came_from() {
        let cases: &[(&str, &str)] = &[
            ("method.r=0", "`method.r` must be at least 1, got 0"),
            ("method.alpha=0", "`method.alpha` must be greater than 0, got 0"),
            ("method.alpha=-1.5", "`method.alpha` must be greater than 0, got -1.5"),
            ("method.dropout=1", "`method.dropout` must be in [0, 1), got 1"),
            ("method.dropout=-0.1", "`method.dropout` must be in [0, 1), got -0.1"),
            ("train.batch_size=0", "`train.batch_size` must be at least 1, got 0"),
            ("train.lr=0", "`train.lr` must be greater than 0, got 0"),
            ("train.lr=abc", "`train.lr` must be a number, got string \"abc\""),
            ("data.max_seq_len=1", "`data.max_seq_len` must be at least 2, got 1"),
            (
                "train.schedule=cosin",
                "`train.schedule` must be one of \"constant\", \"linear\", \"cosine\"; got \"cosin\"",
            ),
            (
                "method.kind=qlora",
                "`method.kind` must be one of \"lora\", \"full\"; got \"qlora\"",
            ),
            (
                "objective.kind=ppo",
                "`objective.kind` must be one of \"clm\", \"sft\", \"dpo\", \"orpo\"; got \"ppo\"",
            ),
            ("train.epochs=-1", "`train.epochs` must be a non-negative integer, got integer -1"),
            ("train.epochs=1.5", "`train.epochs` must be a non-negative integer, got number 1.5"),
            ("data.packing=yes", "`data.packing` must be true or false, got string \"yes\""),
        ];
        for (set, msg) in cases {
            let e = err(MINIMAL, &[set]);
            assert_eq!(e, format!("--set {set}: {msg}"), "for {set}");
        }
        let e = err(&format!("{MINIMAL}[method]\nr = 0\n"), &[]);
        assert_eq!(e, "/cfg/run.toml: `method.r` must be at least 1, got 0");
    }

    #[test]
    fn unknown_target_lists_the_valid_ones() {
        let e = err(MINIMAL, &["method.targets=[\"q_proj\",\"qkv_proj\"]"]);
        assert!(
            e.contains("`method.targets` names unknown module \"qkv_proj\""),
            "{e}"
        );
        assert!(e.contains("did you mean \"q_proj\"?"), "{e}");
        assert!(
            e.contains(
                "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, or \"all-linear\""
            ),
            "{e}"
        );
        assert!(err(MINIMAL, &["method.targets=[]"]).contains("is empty"));
        assert!(err(MINIMAL, &["method.targets=[\"q_proj\",\"q_proj\"]"]).contains("twice"));
        let c = parse(MINIMAL, &["method.targets=down_proj"]).unwrap();
        assert_eq!(
            c.method.targets,
            Targets::Modules(vec![TargetModule::DownProj])
        );
    }

    #[test]
    fn required_keys_and_parse_errors() {
        assert_eq!(
            err("[data]\ntrain = [\"t\"]\n", &[]),
            "/cfg/run.toml: `model.path` is required: a Hugging Face model folder or a .gguf \
             file, e.g. [model] path = \"models/SmolLM2-135M-Instruct\""
        );
        assert!(err("[model]\npath = \"m\"\n", &[]).contains("`data.train` is required"));
        let e = err("[model]\npath = \n", &[]);
        assert!(
            e.starts_with("/cfg/run.toml: not valid TOML: ") && e.ends_with("(line 2)"),
            "{e}"
        );
        assert!(
            err(MINIMAL, &["data.eval=e.jsonl", "data.eval_fraction=0.1"])
                .contains("cannot be combined with data.eval")
        );
        assert!(err(MINIMAL, &["data.eval_fraction=1"]).contains("must be in (0, 1), got 1"));
    }

    #[test]
    fn resolved_config_round_trips_with_every_default_written() {
        let c = parse(
            MINIMAL,
            &["train.max_steps=9", "method.targets=[\"k_proj\"]"],
        )
        .unwrap();
        let text = c.to_toml_string();
        for key in valid_keys() {
            let optional = [
                "data.eval_fraction",
                "retention.max_increase",
                "method.init_adapter",
            ]
            .contains(&key.as_str());
            let (section, name) = key.split_once('.').unwrap();
            let table: Table = toml::from_str(&text).unwrap();
            let present = table[section].as_table().unwrap().contains_key(name);
            assert_eq!(present, !optional, "{key} in\n{text}");
        }
        assert!(text.contains("targets = [\"k_proj\"]"), "{text}");
        assert!(text.contains("lr = 0.0002"), "{text}");
        let back = RunConfig::from_toml_str(
            &text,
            Path::new("/else/config.toml"),
            &[] as &[&str],
            Path::new("/x"),
        )
        .unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn edit_distance_is_levenshtein() {
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("lr", "lr"), 0);
    }
}
