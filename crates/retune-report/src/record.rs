//! The disclosure record of a run: base model, data, method, environment, results, outputs,
//! with the sha256 of every file that went in or came out.
//!
//! [`build_record`] hashes every file independently, streaming it; a file that cannot be read
//! makes the whole build fail with an error naming it, except the base model and the data of a
//! failed run, whose problems are written into the record (`error` fields) instead, so a
//! failure is still disclosed.
//!
//! The git commit is taken at build time (`git rev-parse HEAD` in `build.rs`), "unknown" when
//! retune was built outside a git checkout.

use crate::error::{Error, Result};
use crate::metrics::{Metrics, RetentionPoint};
use retune_core::load::{inspect_model, ModelFormat};
use retune_core::tokenizer::Tokenizer;
use retune_train::config::{DataFormat, MethodKind, ObjectiveKind, PreferenceLoss, RunConfig};
use retune_train::preference::PreferenceFigures;
use retune_train::trainer::RunSummary;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Version of the record's layout; fields are only ever added.
pub const SCHEMA: &str = "retune-disclosure/1";

/// How the run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Trained to the end (or stopped early) and wrote its output.
    Finished,
    /// Stopped with an error (see `error`).
    Failed,
    /// No summary and no error: still running, or interrupted.
    Running,
}

impl Status {
    /// "finished", "failed" or "running".
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Finished => "finished",
            Status::Failed => "failed",
            Status::Running => "running",
        }
    }
}

/// The tool that made the record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Tool {
    /// "retune".
    pub name: String,
    /// The crate version.
    pub version: String,
    /// `git rev-parse HEAD` when retune was built, or "unknown".
    pub commit: String,
}

/// A file and its checksum.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FileHash {
    /// The path as used by the run.
    pub path: String,
    /// Size in bytes.
    pub bytes: u64,
    /// sha256, lowercase hex.
    pub sha256: String,
}

/// The model fine-tuned.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BaseModel {
    /// The folder name or the GGUF file's stem.
    pub name: String,
    /// The model path as configured.
    pub path: String,
    /// "hf_folder" or "gguf".
    pub format: Option<String>,
    /// The architecture, e.g. "LlamaForCausalLM".
    pub architecture: Option<String>,
    /// All parameters.
    pub parameters: Option<usize>,
    /// Stored dtype -> number of tensors stored so.
    pub stored_dtypes: BTreeMap<String, usize>,
    /// Every weight file.
    pub files: Vec<FileHash>,
    /// sha256 of tokenizer.json (HF folder) or of the GGUF file that holds the tokenizer.
    pub tokenizer_sha256: Option<String>,
    /// The file `tokenizer_sha256` is of.
    pub tokenizer_file: Option<String>,
    /// sha256 of the chat template's text (UTF-8), when the model has one.
    pub chat_template_sha256: Option<String>,
    /// Why some of the above is missing (the model could not be read).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One data file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DataFile {
    /// The path as configured.
    pub path: String,
    /// sha256 of the file (absent when it could not be read).
    pub sha256: Option<String>,
    /// Size in bytes.
    pub bytes: Option<u64>,
    /// "train", "eval" or "retention".
    pub role: String,
    /// The data format ("text", "prompt-completion", ...).
    pub format: String,
    /// Rows (documents or JSON lines) read, when known.
    pub rows_read: Option<usize>,
    /// Rows that became examples.
    pub rows_used: Option<usize>,
    /// Rows left out, by reason.
    pub dropped: BTreeMap<String, usize>,
    /// Rows cut to `max_seq_len`, by reason.
    pub truncated: BTreeMap<String, usize>,
    /// Tokens in the examples.
    pub tokens: Option<usize>,
    /// Tokens that are targets of the loss.
    pub target_tokens: Option<usize>,
    /// Where the file came from, when `retune data` built it: its entry in the `manifest.json`
    /// beside it (source package and files with sha256, selection rule, derived or not, terms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provenance: Option<serde_json::Value>,
}

/// The data and how it was split.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Data {
    /// Every file: training, evaluation, retention.
    pub files: Vec<DataFile>,
    /// The train/eval split rule, in words.
    pub split: String,
    /// Examples used for training and evaluation (rows used summed over train files).
    pub train_examples: Option<usize>,
    /// Training tokens processed by the optimizer steps.
    pub tokens_trained: Option<u64>,
    /// Training rows after packing.
    pub train_rows: Option<usize>,
    /// Evaluation rows after packing.
    pub eval_rows: Option<usize>,
}

/// LoRA settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraMethod {
    /// Rank.
    pub r: usize,
    /// Alpha.
    pub alpha: f64,
    /// Dropout probability.
    pub dropout: f64,
    /// Target modules.
    pub targets: Vec<String>,
    /// rsLoRA scaling.
    pub rslora: bool,
    /// alpha / r, or alpha / sqrt(r) with rsLoRA.
    pub scaling: f64,
    /// The PEFT adapter training continued from (`method.init_adapter`): its weights file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_adapter: Option<FileHash>,
}

/// The objective.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Objective {
    /// "clm", "sft", "dpo" or "orpo".
    pub kind: String,
    /// DPO temperature or ORPO weight (preference objectives only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub beta: Option<f64>,
    /// DPO loss variant, "sigmoid" or "ipo" (dpo only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<String>,
    /// DPO label smoothing (dpo only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label_smoothing: Option<f64>,
    /// What the DPO reference model was (dpo only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
}

/// What was trained, how.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Method {
    /// "lora" or "full".
    pub kind: String,
    /// LoRA settings (LoRA only).
    pub lora: Option<LoraMethod>,
    /// The objective.
    pub objective: Objective,
    /// Trainable parameters.
    pub trainable_parameters: Option<usize>,
    /// Trainable parameters over the base model's parameters.
    pub trainable_share: Option<f64>,
    /// The seed of every source of randomness.
    pub seed: u64,
    /// Bitwise-identical reruns on the same machine.
    pub deterministic: bool,
    /// The whole resolved configuration (every hyper-parameter).
    pub config: serde_json::Value,
}

/// Where the run ran.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Environment {
    /// Operating system (`std::env::consts::OS`).
    pub os: String,
    /// CPU architecture (`std::env::consts::ARCH`).
    pub arch: String,
    /// Kernel release, where cheap to read.
    pub kernel: Option<String>,
    /// CPU model name.
    pub cpu_model: Option<String>,
    /// CPU features of interest present (avx2, avx512f, avx512_bf16, amx_bf16, amx_tile, fma).
    pub cpu_features: Vec<String>,
    /// Worker threads.
    pub threads: usize,
    /// GPU, if any was used (retune trains on the CPU today).
    pub gpu: Option<String>,
    /// Wall time of training, seconds.
    pub wall_time_s: Option<f64>,
}

/// Evaluation figures.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalResult {
    /// Step evaluated at.
    pub step: u64,
    /// Mean loss per predicted token.
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// Token accuracy (preference objectives: reward accuracy).
    pub accuracy: Option<f64>,
    /// Preference objectives: reward accuracy and margins, log-likelihoods (TRL's figures).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preference: Option<PreferenceFigures>,
}

/// General-text perplexity before and after.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RetentionResult {
    /// Perplexity of the base model.
    pub before: Option<f64>,
    /// Perplexity at the end.
    pub after: Option<f64>,
    /// `after / before - 1`.
    pub relative_change: Option<f64>,
    /// Every measurement, by step.
    pub history: Vec<RetentionPoint>,
}

/// What the run achieved.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Results {
    /// Optimizer steps completed.
    pub steps: Option<u64>,
    /// Steps planned.
    pub total_steps: Option<u64>,
    /// Training loss of the last step.
    pub final_train_loss: Option<f64>,
    /// Domain evaluation before training.
    pub eval_before: Option<EvalResult>,
    /// Domain evaluation at the end.
    pub eval_after: Option<EvalResult>,
    /// Step of the best evaluation.
    pub best_step: Option<u64>,
    /// General-text perplexity (absent without retention data).
    pub retention: Option<RetentionResult>,
    /// Early stopping ended the run.
    pub stopped_early: Option<bool>,
}

/// What the run wrote.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Outputs {
    /// `adapter/` or `model/` in the run folder, when written.
    pub dir: Option<String>,
    /// Every file in it (but README.md, the card that quotes these hashes).
    pub files: Vec<FileHash>,
}

/// Everything scholarly disclosure of a fine-tuning run needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DisclosureRecord {
    /// [`SCHEMA`].
    pub schema: String,
    /// retune, its version and commit.
    pub retune: Tool,
    /// How the run ended.
    pub status: Status,
    /// The error, when the run failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When the record was made (RFC 3339, UTC).
    pub created: String,
    /// The run folder.
    pub run_dir: String,
    /// The base model.
    pub base_model: BaseModel,
    /// The data.
    pub data: Data,
    /// The method and every hyper-parameter.
    pub method: Method,
    /// Where it ran.
    pub environment: Environment,
    /// What it achieved.
    pub results: Results,
    /// What it wrote.
    pub outputs: Outputs,
}

/// sha256 and size of a file, streamed.
pub fn hash_file(path: &Path) -> Result<FileHash> {
    let bytes = std::fs::metadata(path)
        .map_err(|e| Error::io("reading", path, e))?
        .len();
    let sha256 = retune_assets::sha256_file(path)
        .map_err(|e| Error::io("hashing", path, std::io::Error::other(e.to_string())))?;
    Ok(FileHash {
        path: path.display().to_string(),
        bytes,
        sha256,
    })
}

/// sha256 of bytes, lowercase hex.
pub fn sha256_bytes(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The name of a model: its folder name, or a file's stem.
pub fn model_name(path: &Path) -> String {
    let name = if path.is_dir() {
        path.file_name()
    } else {
        path.file_stem()
    };
    name.map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// The weight files of a model, hashed, with what [`inspect_model`] says about it.
pub fn base_model(path: &Path) -> Result<BaseModel> {
    let summary = inspect_model(path).map_err(|source| Error::Model {
        path: path.to_path_buf(),
        source,
    })?;
    let files = summary
        .files
        .iter()
        .map(|f| hash_file(f))
        .collect::<Result<Vec<_>>>()?;
    let mut stored_dtypes = BTreeMap::new();
    for dtype in summary.stored_dtypes.values() {
        *stored_dtypes.entry(dtype.clone()).or_insert(0) += 1;
    }
    let (tokenizer_file, tokenizer_sha256) = match summary.format {
        ModelFormat::Gguf => (
            Some(path.display().to_string()),
            files.first().map(|f| f.sha256.clone()),
        ),
        ModelFormat::HfFolder => {
            let t = path.join("tokenizer.json");
            if t.is_file() {
                (Some(t.display().to_string()), Some(hash_file(&t)?.sha256))
            } else {
                (None, None)
            }
        }
    };
    // The chat template is read with the tokenizer; a model without one has none to hash.
    let chat_template_sha256 = Tokenizer::load(path)
        .ok()
        .and_then(|t| t.chat_template)
        .map(|text| sha256_bytes(text.as_bytes()));
    Ok(BaseModel {
        name: model_name(path),
        path: path.display().to_string(),
        format: Some(
            match summary.format {
                ModelFormat::Gguf => "gguf",
                ModelFormat::HfFolder => "hf_folder",
            }
            .to_string(),
        ),
        architecture: Some(summary.config.architecture.clone()),
        parameters: Some(summary.config.param_count()),
        stored_dtypes,
        files,
        tokenizer_sha256,
        tokenizer_file,
        chat_template_sha256,
        error: None,
    })
}

/// What a run reports at its end, read by field name from a [`RunSummary`] or from the
/// `finished` event of `events.jsonl` (which carries the same object), so figures added to the
/// summary later are picked up and a record can be rebuilt from the run folder alone.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct SummaryView {
    /// Optimizer steps completed.
    pub steps: Option<u64>,
    /// Steps planned.
    pub total_steps: Option<u64>,
    /// Training loss of the last step.
    pub final_loss: Option<f64>,
    /// Evaluation before training.
    pub eval_before: Option<EvalView>,
    /// Evaluation at the end.
    pub eval_after: Option<EvalView>,
    /// Step of the best evaluation.
    pub best_step: Option<u64>,
    /// General-text perplexity before: a number or an object with `perplexity`.
    pub retention_before: Option<serde_json::Value>,
    /// General-text perplexity after: a number or an object with `perplexity`.
    pub retention_after: Option<serde_json::Value>,
    /// Trainable parameters.
    pub trainable_parameters: Option<usize>,
    /// All parameters of the base model.
    pub model_parameters: Option<usize>,
    /// Training rows after packing.
    pub train_rows: Option<usize>,
    /// Evaluation rows after packing.
    pub eval_rows: Option<usize>,
    /// Per-file data statistics.
    pub data: Vec<StatsView>,
    /// Early stopping ended the run.
    pub stopped_early: Option<bool>,
    /// Training tokens seen.
    pub tokens_seen: Option<u64>,
    /// Wall time, seconds.
    pub elapsed_s: Option<f64>,
}

/// Evaluation figures as a summary reports them.
#[derive(Clone, Copy, Debug, Default, Deserialize)]
#[serde(default)]
pub struct EvalView {
    /// Step.
    pub step: u64,
    /// Mean loss per target token.
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// Token accuracy.
    pub accuracy: Option<f64>,
    /// Preference figures, for preference objectives.
    pub preference: Option<PreferenceFigures>,
}

/// Per-file data statistics as a summary reports them: the trainer's own type.
pub type StatsView = retune_train::data::FileStats;

impl SummaryView {
    /// The view of a trainer's summary.
    pub fn of(summary: &RunSummary) -> Self {
        serde_json::to_value(summary)
            .ok()
            .and_then(|v| serde_json::from_value(v).ok())
            .unwrap_or_default()
    }
}

fn perplexity_of(v: &Option<serde_json::Value>) -> Option<f64> {
    match v.as_ref()? {
        serde_json::Value::Number(n) => n.as_f64(),
        o => o.get("perplexity").and_then(|p| p.as_f64()),
    }
}

/// The last `finished` or `failed` event of `run_dir/events.jsonl`: the status, the summary
/// (finished) or the error (failed). None when the run has neither (still running, killed).
pub fn terminal_event(run_dir: &Path) -> Option<(Status, Option<SummaryView>, Option<String>)> {
    let text = std::fs::read_to_string(run_dir.join("events.jsonl")).ok()?;
    text.lines().rev().find_map(|line| {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        match v.get("event")?.as_str()? {
            "finished" => Some((Status::Finished, serde_json::from_value(v).ok(), None)),
            "failed" => Some((
                Status::Failed,
                None,
                v.get("error").and_then(|e| e.as_str()).map(String::from),
            )),
            _ => None,
        }
    })
}

fn data_format(config: &RunConfig, path: &Path) -> String {
    let named = match config.data.format {
        DataFormat::Auto => None,
        DataFormat::Text => Some("text"),
        DataFormat::PromptCompletion => Some("prompt-completion"),
        DataFormat::Messages => Some("messages"),
        DataFormat::Alpaca => Some("alpaca"),
        DataFormat::Preference => Some("preference"),
    };
    if let Some(n) = named {
        return n.to_string();
    }
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    match (config.objective.kind, ext.as_str()) {
        (_, "txt" | "md") => "text".into(),
        (ObjectiveKind::Clm, _) => "jsonl-text".into(),
        (ObjectiveKind::Sft, _) => "prompt-completion".into(),
        (ObjectiveKind::Dpo | ObjectiveKind::Orpo, _) => "preference".into(),
    }
}

fn data_files(
    config: &RunConfig,
    summary: Option<&SummaryView>,
    failed: bool,
) -> Result<Vec<DataFile>> {
    let d = &config.data;
    let roles = d
        .train
        .iter()
        .map(|p| (p, "train"))
        .chain(d.eval.iter().map(|p| (p, "eval")))
        .chain(config.retention.data.iter().map(|p| (p, "retention")));
    let mut out = Vec::new();
    for (path, role) in roles {
        let hash = match hash_file(path) {
            Ok(h) => Some(h),
            // A failed run may have failed on this very file; disclose what is known.
            Err(_) if failed => None,
            Err(e) => return Err(e),
        };
        let stats = summary.and_then(|s| s.data.iter().find(|f| &f.path == path));
        out.push(DataFile {
            path: path.display().to_string(),
            sha256: hash.as_ref().map(|h| h.sha256.clone()),
            bytes: hash.as_ref().map(|h| h.bytes),
            role: role.to_string(),
            format: match stats.map(|s| s.format.as_str()) {
                Some(f) if !f.is_empty() => f.to_string(),
                _ if role == "retention" => "text".into(),
                _ => data_format(config, path),
            },
            rows_read: stats.map(|s| s.rows_read),
            rows_used: stats.map(|s| s.rows_used),
            dropped: stats.map(|s| s.dropped.clone()).unwrap_or_default(),
            truncated: stats.map(|s| s.truncated.clone()).unwrap_or_default(),
            tokens: stats.map(|s| s.tokens),
            target_tokens: stats.map(|s| s.target_tokens),
            provenance: provenance(path),
        });
    }
    Ok(out)
}

/// The entry of `path` in the `manifest.json` of its folder (written by `retune data`), if any.
fn provenance(path: &Path) -> Option<serde_json::Value> {
    let manifest = path.parent()?.join("manifest.json");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(manifest).ok()?).ok()?;
    let name = path.file_name()?.to_str()?;
    let entry = v
        .get("files")?
        .as_array()?
        .iter()
        .find(|f| f.get("file").and_then(|x| x.as_str()) == Some(name))?;
    let mut entry = entry.clone();
    if let (Some(obj), Some(generator)) = (entry.as_object_mut(), v.get("generator")) {
        obj.insert("generator".into(), generator.clone());
    }
    Some(entry)
}

fn split_rule(config: &RunConfig) -> String {
    let d = &config.data;
    if !d.eval.is_empty() {
        format!(
            "evaluation on separate files ({})",
            d.eval
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    } else if let Some(f) = d.eval_fraction {
        format!(
            "{}% of the training examples held out for evaluation, chosen deterministically by content hash",
            f * 100.0
        )
    } else {
        "no evaluation split".to_string()
    }
}

fn method(config: &RunConfig, summary: Option<&SummaryView>) -> Method {
    let m = &config.method;
    let dpo = config.objective.kind == ObjectiveKind::Dpo;
    let lora = (m.kind == MethodKind::Lora).then(|| LoraMethod {
        r: m.r,
        alpha: m.alpha,
        dropout: m.dropout,
        targets: m
            .targets
            .modules()
            .iter()
            .map(|t| {
                serde_json::to_value(t)
                    .ok()
                    .and_then(|v| v.as_str().map(String::from))
                    .unwrap_or_else(|| format!("{t:?}"))
            })
            .collect(),
        rslora: m.rslora,
        scaling: if m.rslora {
            m.alpha / (m.r as f64).sqrt()
        } else {
            m.alpha / m.r as f64
        },
        init_adapter: m
            .init_adapter
            .as_ref()
            .and_then(|dir| hash_file(&dir.join("adapter_model.safetensors")).ok()),
    });
    let objective = Objective {
        kind: match config.objective.kind {
            ObjectiveKind::Clm => "clm",
            ObjectiveKind::Sft => "sft",
            ObjectiveKind::Dpo => "dpo",
            ObjectiveKind::Orpo => "orpo",
        }
        .into(),
        beta: config
            .objective
            .kind
            .is_preference()
            .then_some(config.objective.beta),
        loss: dpo.then(|| {
            match config.objective.loss {
                PreferenceLoss::Sigmoid => "sigmoid",
                PreferenceLoss::Ipo => "ipo",
            }
            .into()
        }),
        label_smoothing: dpo.then_some(config.objective.label_smoothing),
        reference: dpo.then(|| {
            let start = match (&m.kind, &m.init_adapter) {
                (MethodKind::Lora, Some(a)) => {
                    format!("the base model with the adapter {}", a.display())
                }
                _ => "the base model".to_string(),
            };
            format!(
                "the starting policy ({start}) without dropout; its log-likelihoods of every pair \
                 computed once before training"
            )
        }),
    };
    Method {
        kind: match m.kind {
            MethodKind::Lora => "lora",
            MethodKind::Full => "full",
        }
        .into(),
        lora,
        objective,
        trainable_parameters: summary.and_then(|s| s.trainable_parameters),
        trainable_share: summary
            .and_then(|s| s.trainable_parameters.zip(s.model_parameters))
            .filter(|(_, all)| *all > 0)
            .map(|(t, all)| t as f64 / all as f64),
        seed: config.train.seed,
        deterministic: config.train.deterministic,
        config: serde_json::to_value(config).unwrap_or(serde_json::Value::Null),
    }
}

/// The machine, read cheaply: OS, kernel, CPU model and features, threads.
pub fn environment(wall_time_s: Option<f64>) -> Environment {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let cpuinfo = read("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        cpuinfo.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == name).then(|| v.trim().to_string())
        })
    };
    let flags = field("flags")
        .or_else(|| field("Features"))
        .unwrap_or_default();
    let flags: Vec<&str> = flags.split_whitespace().collect();
    let cpu_features = [
        "avx2",
        "fma",
        "avx512f",
        "avx512_bf16",
        "amx_bf16",
        "amx_tile",
        "asimd",
        "sve",
    ]
    .iter()
    .filter(|f| flags.contains(f))
    .map(|f| f.to_string())
    .collect();
    Environment {
        os: std::env::consts::OS.to_string(),
        arch: std::env::consts::ARCH.to_string(),
        kernel: read("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()),
        cpu_model: field("model name"),
        cpu_features,
        threads: rayon::current_num_threads(),
        gpu: None,
        wall_time_s,
    }
}

fn eval_result(e: &EvalView) -> EvalResult {
    EvalResult {
        step: e.step,
        loss: e.loss,
        perplexity: e.perplexity,
        accuracy: e.accuracy,
        preference: e.preference,
    }
}

fn results(summary: Option<&SummaryView>, metrics: &Metrics) -> Results {
    let from_metrics = |e: &crate::metrics::EvalPoint| EvalResult {
        step: e.step,
        loss: e.loss,
        perplexity: e.perplexity,
        accuracy: e.accuracy,
        preference: None,
    };
    let first_eval = metrics
        .evals
        .first()
        .filter(|e| e.step == 0)
        .map(from_metrics);
    let last_eval = metrics.evals.last().map(from_metrics);
    let best_eval = metrics
        .evals
        .iter()
        .min_by(|a, b| a.loss.total_cmp(&b.loss))
        .map(|e| e.step);
    let from_summary = |f: fn(&SummaryView) -> Option<f64>| summary.and_then(f);
    let sum_before = from_summary(|s| perplexity_of(&s.retention_before));
    let sum_after = from_summary(|s| perplexity_of(&s.retention_after));
    let retention = (!metrics.retention.is_empty() || sum_before.is_some() || sum_after.is_some())
        .then(|| {
            let before = sum_before.or_else(|| {
                metrics
                    .retention
                    .iter()
                    .find(|r| r.step == 0)
                    .map(|r| r.perplexity)
            });
            let after = sum_after.or_else(|| metrics.retention.last().map(|r| r.perplexity));
            RetentionResult {
                before,
                after,
                relative_change: before.zip(after).map(|(b, a)| a / b - 1.0),
                history: metrics.retention.clone(),
            }
        });
    match summary {
        Some(s) => Results {
            steps: s.steps.or(metrics.last_step()),
            total_steps: s.total_steps,
            final_train_loss: s.final_loss.or(metrics.train_loss.last().map(|(_, l)| *l)),
            eval_before: s.eval_before.as_ref().map(eval_result).or(first_eval),
            eval_after: s.eval_after.as_ref().map(eval_result).or(last_eval),
            best_step: s.best_step.or(best_eval),
            retention,
            stopped_early: s.stopped_early,
        },
        None => Results {
            steps: metrics.last_step(),
            total_steps: None,
            final_train_loss: metrics.train_loss.last().map(|(_, l)| *l),
            eval_before: first_eval,
            eval_after: last_eval,
            best_step: best_eval,
            retention,
            stopped_early: None,
        },
    }
}

/// Every file under `dir`, sorted, recursively.
fn files_under(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io("listing", dir, e))?;
    let mut paths = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("listing", dir, e))?;
        paths.push(entry.path());
    }
    paths.sort();
    for p in paths {
        if p.is_dir() {
            files_under(&p, out)?;
        } else {
            out.push(p);
        }
    }
    Ok(())
}

/// The output folder of a run: `adapter/` or `model/`, whichever exists.
pub fn output_dir(run_dir: &Path) -> Option<PathBuf> {
    ["adapter", "model"]
        .iter()
        .map(|d| run_dir.join(d))
        .find(|d| d.is_dir())
}

fn outputs(run_dir: &Path) -> Result<Outputs> {
    let Some(dir) = output_dir(run_dir) else {
        return Ok(Outputs::default());
    };
    let mut paths = Vec::new();
    files_under(&dir, &mut paths)?;
    let files = paths
        .iter()
        .filter(|p| p.file_name().is_some_and(|n| n != "README.md"))
        .map(|p| {
            let mut h = hash_file(p)?;
            // Relative to the run folder, so the record stays true when the folder moves.
            h.path = p.strip_prefix(run_dir).unwrap_or(p).display().to_string();
            Ok(h)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Outputs {
        dir: dir.file_name().map(|n| n.to_string_lossy().into_owned()),
        files,
    })
}

/// Builds the record of the run in `run_dir`. `summary` is the trainer's (None when the run
/// failed or is still going: figures then come from `metrics.jsonl`); `error` marks the run
/// failed. Retention figures come from `metrics.jsonl` rows carrying `retention_perplexity`.
pub fn build_record(
    run_dir: &Path,
    config: &RunConfig,
    summary: Option<&RunSummary>,
    error: Option<&str>,
) -> Result<DisclosureRecord> {
    let (status, view, error) = match (error, summary) {
        (Some(e), s) => (Status::Failed, s.map(SummaryView::of), Some(e.to_string())),
        (None, Some(s)) => (Status::Finished, Some(SummaryView::of(s)), None),
        // Rebuilding from the run folder: its events say how it ended.
        (None, None) => terminal_event(run_dir).unwrap_or((Status::Running, None, None)),
    };
    let summary = view.as_ref();
    let failed = status == Status::Failed;
    let metrics = Metrics::read(&run_dir.join("metrics.jsonl"))?;
    let base = match base_model(&config.model.path) {
        Ok(b) => b,
        Err(e) => BaseModel {
            name: model_name(&config.model.path),
            path: config.model.path.display().to_string(),
            error: Some(crate::error::chain(&e)),
            ..BaseModel::default()
        },
    };
    let files = data_files(config, summary, failed || status == Status::Running)?;
    let train_examples = summary
        .map(|s| {
            s.data
                .iter()
                .filter(|f| config.data.train.contains(&f.path))
                .map(|f| f.rows_used)
                .sum()
        })
        .filter(|n: &usize| *n > 0 || summary.is_some_and(|s| !s.data.is_empty()));
    let data = Data {
        files,
        split: split_rule(config),
        train_examples,
        tokens_trained: summary
            .and_then(|s| s.tokens_seen)
            .or((metrics.tokens > 0).then_some(metrics.tokens)),
        train_rows: summary.and_then(|s| s.train_rows),
        eval_rows: summary.and_then(|s| s.eval_rows),
    };
    Ok(DisclosureRecord {
        schema: SCHEMA.to_string(),
        retune: Tool {
            name: "retune".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            commit: env!("RETUNE_GIT_COMMIT").into(),
        },
        status,
        error,
        created: retune_train::events::rfc3339(std::time::SystemTime::now()),
        run_dir: run_dir.display().to_string(),
        base_model: base,
        data,
        method: method(config, summary),
        environment: environment(summary.and_then(|s| s.elapsed_s)),
        results: results(summary, &metrics),
        outputs: outputs(run_dir)?,
    })
}
