//! The training loop: LoRA or full fine-tuning with the `clm`, `sft`, `dpo` or `orpo` objective.
//!
//! One optimizer step takes `grad_accum` micro-batches of `batch_size` rows. The loss of every
//! micro-batch is divided by the number of target tokens of the *whole* step, so accumulation
//! computes exactly the gradient of one large batch. Rows are visited in a fresh order each
//! epoch, drawn from the run's seed; LoRA dropout masks are drawn from the seed, the step and
//! the micro-batch. So the step number alone fixes the data position and every random draw:
//! a run resumed from a checkpoint continues bitwise-identically.

use crate::checkpoint::{self, Contents, TrainerState};
use crate::config::{Dtype, MethodKind, RunConfig, TargetModule, Targets};
use crate::data::{self, Example, FileStats, PreferenceExample, Row};
use crate::events::{self, EvalRow, Event, EventLog, MetricsLog, RetentionRow, StepRow};
use crate::nan_guard::check_finite;
use crate::optim::{clip_grad_norm, full_step_in_backward, AdamW};
use crate::plan::MemoryPlan;
use crate::preference::{
    self, PairBatch, PreferenceFigures, PreferenceObjective, PreferenceTotals, StepScale,
};
use crate::progress::Progress;
use crate::schedule::LrSchedule;
use crate::TrainError;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use retune_core::model::{Grads, Lora, LoraSpec, Model};
use retune_core::ops::cross_entropy::CeStats;
use retune_core::ops::matmul::{set_matmul_precision, MatmulPrecision};
use retune_core::ops::preference::PairLogps;
use retune_core::tokenizer::Tokenizer;
use serde::Serialize;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// How to run, beyond the configuration.
#[derive(Clone, Debug, Default)]
pub struct TrainOptions {
    /// No progress output.
    pub quiet: bool,
    /// Stop after this many optimizer steps of this invocation (tests of resume); the
    /// schedule still spans the whole run.
    pub stop_after: Option<u64>,
}

/// Evaluation figures at one step.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct EvalFigures {
    /// Optimizer steps completed.
    pub step: u64,
    /// Mean loss per target token.
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// Share of targets predicted exactly (argmax).
    pub accuracy: f64,
    /// Target tokens evaluated.
    pub tokens: usize,
    /// Preference objectives: reward accuracy and margins (then `loss` is the objective,
    /// `perplexity` that of the chosen completions and `accuracy` the reward accuracy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preference: Option<PreferenceFigures>,
}

impl EvalFigures {
    /// The metrics row of this evaluation.
    fn row(&self) -> EvalRow {
        EvalRow {
            step: self.step,
            eval_loss: self.loss,
            perplexity: self.perplexity,
            accuracy: self.accuracy,
            extra: self
                .preference
                .map(|p| p.named("eval_").into_iter().collect())
                .unwrap_or_default(),
        }
    }
}

/// What a run did.
#[derive(Clone, Debug, Serialize)]
pub struct RunSummary {
    /// The run folder.
    pub run_dir: PathBuf,
    /// Optimizer steps completed.
    pub steps: u64,
    /// Steps the run was planned for.
    pub total_steps: u64,
    /// Mean training loss of the last step.
    pub final_loss: Option<f64>,
    /// Evaluation before training (absent on resume or without an eval set).
    pub eval_before: Option<EvalFigures>,
    /// Evaluation at the end.
    pub eval_after: Option<EvalFigures>,
    /// Step of the best evaluation.
    pub best_step: Option<u64>,
    /// Trainable parameters.
    pub trainable_parameters: usize,
    /// All parameters of the base model.
    pub model_parameters: usize,
    /// Training and evaluation rows after packing.
    pub train_rows: usize,
    /// Evaluation rows after packing.
    pub eval_rows: usize,
    /// Per-file data statistics.
    pub data: Vec<FileStats>,
    /// Early stopping ended the run.
    pub stopped_early: bool,
    /// The adapter (LoRA) or model (full) written at the end, if the run finished.
    pub output: Option<PathBuf>,
    /// General-text perplexity of the base model (absent without `[retention] data`, or on resume).
    pub retention_before: Option<EvalFigures>,
    /// General-text perplexity at the end.
    pub retention_after: Option<EvalFigures>,
    /// Training tokens seen.
    pub tokens_seen: u64,
    /// Wall time of training, seconds.
    pub elapsed_s: f64,
}

/// What a run trains and evaluates on.
enum TrainingData {
    /// `clm` and `sft`: packed rows of `max_seq_len` tokens.
    Rows { train: Vec<Row>, eval: Vec<Row> },
    /// `dpo` and `orpo`: preference pairs, with the reference model's log-likelihoods of
    /// each (`dpo`; empty for `orpo`).
    Pairs {
        objective: PreferenceObjective,
        train: Vec<PreferenceExample>,
        eval: Vec<PreferenceExample>,
        train_reference: Vec<PairLogps>,
        eval_reference: Vec<PairLogps>,
        pad: u32,
    },
}

impl TrainingData {
    /// Items one epoch visits (rows or pairs).
    fn train_len(&self) -> usize {
        match self {
            TrainingData::Rows { train, .. } => train.len(),
            TrainingData::Pairs { train, .. } => train.len(),
        }
    }

    fn eval_len(&self) -> usize {
        match self {
            TrainingData::Rows { eval, .. } => eval.len(),
            TrainingData::Pairs { eval, .. } => eval.len(),
        }
    }
}

/// Everything prepared before the first step.
struct Setup {
    model: Model<f32>,
    tokenizer: Tokenizer,
    lora: Option<Lora<f32>>,
    data: TrainingData,
    /// Tokenised general text for the retention measurement.
    retention_docs: Vec<Vec<u32>>,
    stats: Vec<FileStats>,
    total_steps: u64,
}

/// Reads training or evaluation examples. On a bad row, every problem of the files is
/// collected (`retune data check` semantics) so the user fixes them in one pass.
fn read_examples(
    config: &RunConfig,
    tok: &Tokenizer,
    paths: &[PathBuf],
) -> Result<(Vec<Example>, Vec<FileStats>), TrainError> {
    let opts = data::ReadOptions::from_config(config);
    data::read_examples(paths, tok, &opts).map_err(|first| all_problems(first, paths, tok, &opts))
}

/// Reads preference pairs, reporting problems as [`read_examples`] does.
fn read_pairs(
    config: &RunConfig,
    tok: &Tokenizer,
    paths: &[PathBuf],
) -> Result<(Vec<PreferenceExample>, Vec<FileStats>), TrainError> {
    let opts = data::ReadOptions::from_config(config);
    data::read_preference(paths, tok, &opts).map_err(|first| all_problems(first, paths, tok, &opts))
}

/// The first problem of a data file widened to all of them (up to 20 shown).
fn all_problems(
    first: TrainError,
    paths: &[PathBuf],
    tok: &Tokenizer,
    opts: &data::ReadOptions,
) -> TrainError {
    let report = data::check_files(paths, Some(tok), opts);
    if report.problems.len() <= 1 {
        return first;
    }
    let shown: Vec<String> = report
        .problems
        .iter()
        .take(20)
        .map(|p| p.to_string())
        .collect();
    let more = report.problems.len().saturating_sub(shown.len());
    TrainError::Invalid(format!(
        "the data have {} problems (run `retune data check` for all of them and statistics):\n  {}{}",
        report.problems.len(),
        shown.join("\n  "),
        if more > 0 { format!("\n  ... and {more} more") } else { String::new() }
    ))
}

fn setup(config: &RunConfig, quiet: bool) -> Result<Setup, TrainError> {
    // `model.dtype`: the precision of every matrix product of this run (process-wide), the
    // reference scoring included.
    set_matmul_precision(match config.model.dtype {
        Dtype::F32 => MatmulPrecision::F32,
        Dtype::Bf16 => MatmulPrecision::Bf16,
    });
    let path = &config.model.path;
    // The memory plan comes first: a run that does not fit is refused before loading.
    let plan = MemoryPlan::of(config)?;
    if !quiet {
        eprintln!("{}", plan.line());
    }
    plan.check(config)?;
    let model = match &plan.hold {
        // A frozen base held once in its storage type: quantised blocks stay blocks.
        Some(hold) => Model::<f32>::load_held(path, hold)?,
        None => Model::<f32>::load(path)?,
    };
    let tokenizer = Tokenizer::load(path)?;
    tokenizer.check_vocab(model.config.vocab_size, path)?;
    let lora = match config.method.kind {
        MethodKind::Lora => Some(init_adapter(config, &model)?),
        MethodKind::Full => None,
    };
    let d = &config.data;
    let pad = tokenizer.eos_ids.first().copied().unwrap_or(0);
    let (data, stats) = match PreferenceObjective::from_config(config) {
        None => {
            let (train, mut stats) = read_examples(config, &tokenizer, &d.train)?;
            let (train, eval) = if !d.eval.is_empty() {
                let (eval, eval_stats) = read_examples(config, &tokenizer, &d.eval)?;
                stats.extend(eval_stats);
                (train, eval)
            } else if let Some(fraction) = d.eval_fraction {
                data::split_by_hash(train, fraction)
            } else {
                (train, Vec::new())
            };
            let train = data::pack(&train, d.max_seq_len, d.packing, pad);
            let eval = data::pack(&eval, d.max_seq_len, d.packing, pad);
            (TrainingData::Rows { train, eval }, stats)
        }
        Some(objective) => {
            let (train, mut stats) = read_pairs(config, &tokenizer, &d.train)?;
            let (train, eval) = if !d.eval.is_empty() {
                let (eval, eval_stats) = read_pairs(config, &tokenizer, &d.eval)?;
                stats.extend(eval_stats);
                (train, eval)
            } else if let Some(fraction) = d.eval_fraction {
                data::split_pairs_by_hash(train, fraction)
            } else {
                (train, Vec::new())
            };
            // The reference is the starting policy without dropout, scored once.
            let (train_reference, eval_reference) = if objective.needs_reference() {
                if !quiet {
                    eprintln!(
                        "scoring {} pairs with the reference model (the starting policy)",
                        train.len() + eval.len()
                    );
                }
                let bp = config.train.batch_size;
                let score = |pairs| preference::pair_logps(&model, lora.as_ref(), pairs, bp, pad);
                (score(&train), score(&eval))
            } else {
                (Vec::new(), Vec::new())
            };
            let data = TrainingData::Pairs {
                objective,
                train,
                eval,
                train_reference,
                eval_reference,
                pad,
            };
            (data, stats)
        }
    };
    if data.train_len() == 0 {
        return Err(TrainError::Invalid(
            "no training examples: every row was empty or dropped".into(),
        ));
    }
    let t = &config.train;
    let per_step = t.batch_size * t.grad_accum;
    let steps_per_epoch = data.train_len().div_ceil(per_step) as u64;
    let total_steps = t.max_steps.unwrap_or(t.epochs * steps_per_epoch).max(1);
    let retention_docs = crate::retention::tokenize_files(&config.retention.data, &tokenizer)?;
    Ok(Setup {
        model,
        tokenizer,
        lora,
        data,
        retention_docs,
        stats,
        total_steps,
    })
}

/// The run's adapter at step 0: fresh (PEFT's initialisation, from the seed), or the PEFT
/// adapter `method.init_adapter` to continue, with the configured dropout.
fn init_adapter(config: &RunConfig, model: &Model<f32>) -> Result<Lora<f32>, TrainError> {
    let m = &config.method;
    match &m.init_adapter {
        Some(dir) => {
            let mut lora = retune_core::load::peft::load_peft_adapter(dir, &model.config)?;
            lora.spec.dropout = m.dropout;
            Ok(lora)
        }
        None => {
            let spec = LoraSpec {
                r: m.r,
                alpha: m.alpha,
                dropout: m.dropout,
                targets: m.targets.modules(),
                rslora: m.rslora,
            };
            Ok(Lora::init(spec, &model.weights, config.train.seed)?)
        }
    }
}

/// The rows of optimizer step `step` (0-based), micro-batch by micro-batch: row `k` of the run
/// is row `order_e[k mod R]` of epoch `e = k / R`, each epoch in its own seeded order.
fn step_rows(rows: usize, seed: u64, step: u64, batch: usize, accum: usize) -> Vec<Vec<usize>> {
    let per_step = (batch * accum) as u64;
    let mut out = Vec::with_capacity(accum);
    let mut cached: Option<(u64, Vec<usize>)> = None;
    for m in 0..accum {
        let mut micro = Vec::with_capacity(batch);
        for j in 0..batch {
            let k = step * per_step + (m * batch + j) as u64;
            let epoch = k / rows as u64;
            if cached.as_ref().is_none_or(|(e, _)| *e != epoch) {
                let mut order: Vec<usize> = (0..rows).collect();
                order.shuffle(&mut ChaCha8Rng::seed_from_u64(
                    seed ^ epoch.wrapping_mul(0xA24B_AED4_963E_E407),
                ));
                cached = Some((epoch, order));
            }
            let order = &cached
                .as_ref()
                .map(|c| &c.1)
                .unwrap_or_else(|| unreachable!("just set"));
            micro.push(order[(k % rows as u64) as usize]);
        }
        out.push(micro);
    }
    out
}

/// The seed of micro-batch `m` of `step`'s LoRA dropout masks.
fn dropout_seed(seed: u64, step: u64, accum: usize, m: usize) -> u64 {
    seed ^ (step * accum as u64 + m as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93)
}

/// Accumulates the gradient of one optimizer step over its micro-batches (`micro`: item
/// indices). Returns the step's loss, the tokens it processed and its objective figures.
fn step_gradients(
    model: &Model<f32>,
    lora: Option<&Lora<f32>>,
    training: &TrainingData,
    micro: &[Vec<usize>],
    config: &RunConfig,
    step: u64,
    grads: &mut Grads<f32>,
) -> (f64, u64, BTreeMap<String, f64>) {
    let (seed, accum) = (config.train.seed, config.train.grad_accum);
    match training {
        TrainingData::Rows { train, .. } => {
            let rows = |m: &Vec<usize>| -> Vec<&Row> { m.iter().map(|&i| &train[i]).collect() };
            let normaliser: usize = micro
                .iter()
                .flatten()
                .map(|&i| train[i].target_count())
                .sum();
            let mut loss_sum = 0.0;
            for (m, items) in micro.iter().enumerate() {
                let batch = data::batch_of(&rows(items));
                let seed = dropout_seed(seed, step, accum, m);
                loss_sum += model
                    .forward_backward(&batch, normaliser, lora, seed, grads)
                    .loss_sum;
            }
            let tokens = micro.iter().map(Vec::len).sum::<usize>() * config.data.max_seq_len;
            let loss = loss_sum / normaliser.max(1) as f64;
            (loss, tokens as u64, BTreeMap::new())
        }
        TrainingData::Pairs {
            objective,
            train,
            train_reference,
            pad,
            ..
        } => {
            let scale = StepScale {
                pairs: micro.iter().map(Vec::len).sum(),
                chosen_tokens: micro
                    .iter()
                    .flatten()
                    .map(|&i| train[i].chosen_ids.len())
                    .sum(),
            };
            let mut totals = PreferenceTotals::default();
            let mut tokens = 0;
            for (m, items) in micro.iter().enumerate() {
                let pairs: Vec<&PreferenceExample> = items.iter().map(|&i| &train[i]).collect();
                let reference: Vec<PairLogps> = items
                    .iter()
                    .map(|&i| train_reference.get(i).copied().unwrap_or_default())
                    .collect();
                let pb = PairBatch::new(&pairs, *pad);
                tokens += pb.batch.b * pb.batch.t;
                let seed = dropout_seed(seed, step, accum, m);
                preference::micro_step(
                    objective,
                    model,
                    lora,
                    &pb,
                    &reference,
                    scale,
                    seed,
                    grads,
                    &mut totals,
                );
            }
            let figures = totals.figures(objective).named("");
            (
                totals.loss(objective),
                tokens as u64,
                figures.into_iter().collect(),
            )
        }
    }
}

fn evaluate(
    model: &Model<f32>,
    lora: Option<&Lora<f32>>,
    data: &TrainingData,
    batch: usize,
    step: u64,
) -> Option<EvalFigures> {
    if data.eval_len() == 0 {
        return None;
    }
    let rows = match data {
        TrainingData::Rows { eval, .. } => eval,
        TrainingData::Pairs {
            objective,
            eval,
            eval_reference,
            pad,
            ..
        } => {
            let totals =
                preference::evaluate(objective, model, lora, eval, eval_reference, batch, *pad);
            let figures = totals.figures(objective);
            return Some(EvalFigures {
                step,
                loss: totals.loss(objective),
                perplexity: totals.nll().exp(),
                accuracy: figures.rewards_accuracies,
                tokens: totals.chosen_tokens(),
                preference: Some(figures),
            });
        }
    };
    let mut total = CeStats::default();
    for chunk in rows.chunks(batch.max(1)) {
        let refs: Vec<&Row> = chunk.iter().collect();
        let s = model.loss(&data::batch_of(&refs), lora);
        total.loss_sum += s.loss_sum;
        total.count += s.count;
        total.correct += s.correct;
    }
    let loss = total.loss_sum / total.count.max(1) as f64;
    Some(EvalFigures {
        step,
        loss,
        perplexity: loss.exp(),
        accuracy: total.correct as f64 / total.count.max(1) as f64,
        tokens: total.count,
        preference: None,
    })
}

/// Measures general-text perplexity at `step`, logging a metrics row and an event.
fn measure_retention(
    model: &Model<f32>,
    lora: Option<&Lora<f32>>,
    docs: &[Vec<u32>],
    config: &RunConfig,
    step: u64,
    metrics: &mut MetricsLog,
    events: &mut EventLog,
) -> Result<Option<EvalFigures>, TrainError> {
    if docs.is_empty() {
        return Ok(None);
    }
    let r = retune_core::eval::evaluate(model, lora, docs, config.data.max_seq_len)?;
    let row = RetentionRow {
        step,
        retention_loss: r.loss,
        retention_perplexity: r.perplexity,
        retention_tokens: r.tokens as u64,
    };
    metrics.retention(&row)?;
    events.emit(Event::Retention, &row)?;
    Ok(Some(EvalFigures {
        step,
        loss: r.loss,
        perplexity: r.perplexity,
        accuracy: r.accuracy,
        tokens: r.tokens,
        preference: None,
    }))
}

/// One step of full fine-tuning with the optimizer in the backward (`train.optimizer_in_backward`,
/// which the configuration allows only with one micro-batch of rows and no clipping): see
/// [`full_step_in_backward`]. Returns the loss, the tokens and the gradient norm.
fn step_in_backward(
    model: &mut Model<f32>,
    training: &TrainingData,
    micro: &[Vec<usize>],
    config: &RunConfig,
    grads: &mut Grads<f32>,
    lr: f64,
    optimizer: &mut AdamW,
) -> (f64, u64, f64) {
    let (TrainingData::Rows { train, .. }, [items]) = (training, micro) else {
        unreachable!("the configuration check allows one micro-batch of rows")
    };
    let rows: Vec<&Row> = items.iter().map(|&i| &train[i]).collect();
    let batch = data::batch_of(&rows);
    let normaliser = rows.iter().map(|r| r.target_count()).sum();
    let (stats, norm) = full_step_in_backward(model, &batch, normaliser, grads, optimizer, lr);
    let tokens = items.len() * config.data.max_seq_len;
    (
        stats.loss_sum / normaliser.max(1) as f64,
        tokens as u64,
        norm,
    )
}

/// The trainable tensors and their gradients, in one fixed order.
fn trainable<'a>(
    model: &'a mut Model<f32>,
    lora: &'a mut Option<Lora<f32>>,
) -> Vec<&'a mut Vec<f32>> {
    match lora {
        Some(l) => l.tensors_mut(),
        None => model.weights.tensors_mut(),
    }
}

fn grad_tensors(grads: &mut Grads<f32>) -> Vec<&mut Vec<f32>> {
    match &mut grads.lora {
        Some(l) => l.tensors_mut(),
        None => grads.base.tensors_mut(),
    }
}

/// Named trainable tensors for checkpoints: PEFT keys for LoRA, HF names for full.
fn named_trainables<'a>(
    model: &'a Model<f32>,
    lora: &'a Option<Lora<f32>>,
) -> Vec<(String, Vec<usize>, &'a [f32])> {
    match lora {
        Some(l) => l.named(&model.config),
        None => {
            let shapes = model.config.tensor_shapes();
            model
                .weights
                .named()
                .into_iter()
                .zip(shapes)
                .map(|((name, data), (_, shape))| (name, shape, data))
                .collect()
        }
    }
}

fn restore_trainables(
    model: &mut Model<f32>,
    lora: &mut Option<Lora<f32>>,
    saved: &checkpoint::TensorMap,
    file: &Path,
) -> Result<(), TrainError> {
    let names: Vec<String> = named_trainables(model, lora)
        .into_iter()
        .map(|(n, _, _)| n)
        .collect();
    for (name, tensor) in names.iter().zip(trainable(model, lora)) {
        let (_, data) = saved.get(name).ok_or_else(|| {
            TrainError::Invalid(format!(
                "{}: checkpoint lacks tensor `{name}`",
                file.display()
            ))
        })?;
        if data.len() != tensor.len() {
            return Err(TrainError::Invalid(format!(
                "{}: tensor `{name}` has {} values, the model needs {}: the checkpoint belongs to another model",
                file.display(),
                data.len(),
                tensor.len()
            )));
        }
        tensor.copy_from_slice(data);
    }
    Ok(())
}

const TRAINABLE_FILE: &str = "trainable.safetensors";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";

/// Starts a run from `config` in `config.output.dir` (created; it must not hold a run yet).
pub fn train(config: &RunConfig, opts: &TrainOptions) -> Result<RunSummary, TrainError> {
    let config = &with_init_adapter(config)?;
    let run_dir = config.output.dir.clone();
    if checkpoint::latest_checkpoint(&run_dir)?.is_some() {
        return Err(TrainError::Invalid(format!(
            "{} already holds a run with checkpoints: continue it with `retune train --resume {}`, \
             or choose another output.dir",
            run_dir.display(),
            run_dir.display()
        )));
    }
    std::fs::create_dir_all(&run_dir)
        .map_err(|e| TrainError::Invalid(format!("creating {}: {e}", run_dir.display())))?;
    events::write_config(&run_dir, config)?;
    run(config, &run_dir, None, opts)
}

/// The configuration with `method.init_adapter`'s r, alpha, targets and rsLoRA in place of
/// the configured ones, so the written config and the disclosure record say what trained.
fn with_init_adapter(config: &RunConfig) -> Result<RunConfig, TrainError> {
    let mut config = config.clone();
    let m = &mut config.method;
    if let (MethodKind::Lora, Some(dir)) = (m.kind, &m.init_adapter) {
        let spec = retune_core::load::peft::read_peft_config(dir)?.spec;
        m.r = spec.r;
        m.alpha = spec.alpha;
        m.rslora = spec.rslora;
        if !spec.targets.is_empty() {
            m.targets = if spec.targets.len() == TargetModule::ALL.len() {
                Targets::AllLinear
            } else {
                Targets::Modules(spec.targets)
            };
        }
    }
    Ok(config)
}

/// Continues the run in `run_dir` from its last complete checkpoint.
pub fn resume(run_dir: &Path, opts: &TrainOptions) -> Result<RunSummary, TrainError> {
    let config_path = run_dir.join("config.toml");
    if !config_path.exists() {
        return Err(TrainError::Invalid(format!(
            "{} is not a run folder (no config.toml)",
            run_dir.display()
        )));
    }
    let config = RunConfig::load(&config_path, &[] as &[&str])?;
    let (step, dir) = checkpoint::latest_checkpoint(run_dir)?.ok_or_else(|| {
        TrainError::Invalid(format!(
            "{} has no complete checkpoint to resume from (checkpoints/step-N/); start it again \
             with `retune train`",
            run_dir.display()
        ))
    })?;
    let state = checkpoint::verify_checkpoint(&dir)?;
    debug_assert_eq!(state.step, step);
    run(&config, run_dir, Some((state, dir)), opts)
}

fn run(
    config: &RunConfig,
    run_dir: &Path,
    resume_from: Option<(TrainerState, PathBuf)>,
    opts: &TrainOptions,
) -> Result<RunSummary, TrainError> {
    let mut events = EventLog::open(run_dir)?;
    events.emit(
        Event::ValidatingFiles,
        json!({ "train": config.data.train, "eval": config.data.eval }),
    )?;
    let result = run_inner(config, run_dir, resume_from, opts, &mut events);
    if let Err(e) = &result {
        events.emit(Event::Failed, json!({ "error": e.to_string() }))?;
    }
    result
}

fn run_inner(
    config: &RunConfig,
    run_dir: &Path,
    resume_from: Option<(TrainerState, PathBuf)>,
    opts: &TrainOptions,
    events: &mut EventLog,
) -> Result<RunSummary, TrainError> {
    // A configuration built in code has not been through the parser's check, and the
    // optimizer in the backward relies on it (one micro-batch of rows, no clipping).
    config.validate()?;
    let Setup {
        mut model,
        tokenizer,
        mut lora,
        data: training,
        retention_docs,
        stats,
        total_steps,
    } = setup(config, opts.quiet)?;
    let (train_len, eval_len) = (training.train_len(), training.eval_len());
    let unit = match training {
        TrainingData::Rows { .. } => format!("rows of {} tokens", config.data.max_seq_len),
        TrainingData::Pairs { .. } => "preference pairs".to_string(),
    };
    let t = &config.train;
    let sizes: Vec<usize> = trainable(&mut model, &mut lora)
        .iter()
        .map(|v| v.len())
        .collect();
    let trainable_parameters: usize = sizes.iter().sum();
    let model_parameters = model.config.param_count();
    let mut optimizer = AdamW::from_config(&sizes, t);
    let schedule = LrSchedule::from_config(t, total_steps);
    let mut state = TrainerState {
        total_steps,
        seed: t.seed,
        ..Default::default()
    };
    let mut metrics = match &resume_from {
        Some((saved, dir)) => {
            let tensors = checkpoint::load_tensors(&dir.join(TRAINABLE_FILE))?;
            restore_trainables(&mut model, &mut lora, &tensors, &dir.join(TRAINABLE_FILE))?;
            let opt_path = dir.join(OPTIMIZER_FILE);
            optimizer.load_state(saved.step, &checkpoint::load_tensors(&opt_path)?, &opt_path)?;
            state = saved.clone();
            MetricsLog::open_for_resume(run_dir, saved.step)?
        }
        None => MetricsLog::open(run_dir)?,
    };
    let start_step = state.step;
    let mut grads = match &lora {
        Some(l) => Grads::lora(&model, l),
        None if t.optimizer_in_backward => Grads::streamed(&model),
        None => Grads::full(&model),
    };
    if !opts.quiet {
        let share = 100.0 * trainable_parameters as f64 / model_parameters as f64;
        eprintln!(
            "trainable parameters: {trainable_parameters} of {model_parameters} ({share:.3}%); \
             {train_len} training and {eval_len} eval {unit}; {total_steps} steps"
        );
    }
    events.emit(
        Event::Started,
        json!({ "step": start_step, "total_steps": total_steps, "trainable_parameters": trainable_parameters,
                "model_parameters": model_parameters, "train_rows": train_len, "eval_rows": eval_len }),
    )?;
    let eval_before = if resume_from.is_none() {
        let e = evaluate(&model, lora.as_ref(), &training, t.batch_size, 0);
        if let Some(e) = &e {
            metrics.eval(&e.row())?;
            events.emit(Event::Eval, e)?;
        }
        e
    } else {
        None
    };
    // The base model's general-text perplexity: measured once, kept in the state for resumes.
    let retention_before = match state.extra.get("retention_before") {
        Some(v) => serde_json::from_value::<EvalFigures>(v.clone()).ok(),
        None => {
            let r = measure_retention(
                &model,
                lora.as_ref(),
                &retention_docs,
                config,
                0,
                &mut metrics,
                events,
            )?;
            if let Some(r) = &r {
                state.extra.insert(
                    "retention_before".into(),
                    serde_json::to_value(r).unwrap_or_default(),
                );
            }
            r
        }
    };
    let mut retention_after = None;
    let mut progress = Progress::new(total_steps, start_step, opts.quiet);
    let wall = Instant::now();
    let elapsed_before = state.elapsed_s;
    let mut final_loss = None;
    let mut stopped_early = false;
    let mut last_eval = None;
    let mut step = start_step;
    while step < total_steps {
        if opts.stop_after.is_some_and(|n| step - start_step >= n) {
            break;
        }
        let started = Instant::now();
        let lr = schedule.lr(step);
        let micro = step_rows(train_len, t.seed, step, t.batch_size, t.grad_accum);
        let (loss, tokens, extra, grad_norm) = if t.optimizer_in_backward {
            let (loss, tokens, norm) = step_in_backward(
                &mut model,
                &training,
                &micro,
                config,
                &mut grads,
                lr,
                &mut optimizer,
            );
            check_finite(step + 1, loss, norm, lr, config.model.dtype)?;
            (loss, tokens, BTreeMap::new(), norm)
        } else {
            for g in grad_tensors(&mut grads) {
                g.fill(0.0);
            }
            let (loss, tokens, extra) = step_gradients(
                &model,
                lora.as_ref(),
                &training,
                &micro,
                config,
                step,
                &mut grads,
            );
            let grad_norm = {
                let mut g = grad_tensors(&mut grads);
                let mut slices: Vec<&mut [f32]> = g.iter_mut().map(|v| v.as_mut_slice()).collect();
                clip_grad_norm(&mut slices, t.max_grad_norm as f32) as f64
            };
            check_finite(step + 1, loss, grad_norm, lr, config.model.dtype)?;
            let g = grad_tensors(&mut grads);
            let g: Vec<&[f32]> = g.into_iter().map(|v| v.as_slice()).collect();
            let mut p = trainable(&mut model, &mut lora);
            optimizer.step(&mut p, &g, lr);
            (loss, tokens, extra, grad_norm)
        };
        step += 1;
        state.tokens_seen += tokens;
        let secs = started.elapsed().as_secs_f64();
        let row = StepRow {
            step,
            loss,
            lr,
            grad_norm,
            tokens,
            tokens_per_s: tokens as f64 / secs,
            extra,
        };
        metrics.step(&row)?;
        events.emit(Event::Step, &row)?;
        progress.update(step, loss, lr, row.tokens_per_s);
        final_loss = Some(loss);

        let at_end = step == total_steps || opts.stop_after.is_some_and(|n| step - start_step >= n);
        let eval_now =
            (t.eval_every > 0 && step.is_multiple_of(t.eval_every)) || step == total_steps;
        let mut retention_ok = false;
        if eval_now {
            if let Some(r) = measure_retention(
                &model,
                lora.as_ref(),
                &retention_docs,
                config,
                step,
                &mut metrics,
                events,
            )? {
                retention_after = Some(r);
                let before = retention_before.map_or(r.perplexity, |b| b.perplexity);
                if let Some(limit) = config.retention.max_increase {
                    if crate::retention::relative_change(before, r.perplexity) > limit {
                        let kept_step = state
                            .extra
                            .get("retention_ok_step")
                            .and_then(|v| v.as_u64());
                        if let Some(kept) = kept_step {
                            let dir =
                                checkpoint::checkpoints_dir(run_dir).join(format!("step-{kept}"));
                            let file = dir.join(TRAINABLE_FILE);
                            restore_trainables(
                                &mut model,
                                &mut lora,
                                &checkpoint::load_tensors(&file)?,
                                &file,
                            )?;
                            write_output(&model, &lora, &tokenizer, config, run_dir)?;
                        }
                        progress.finish();
                        return Err(TrainError::RetentionExceeded {
                            step,
                            before,
                            after: r.perplexity,
                            limit,
                            kept_step,
                        });
                    }
                    retention_ok = true;
                    state.extra.insert("retention_ok_step".into(), step.into());
                }
                progress.println(&format!(
                    "step {step}: general-text perplexity {:.3} (base {before:.3})",
                    r.perplexity
                ));
            }
        }
        if eval_now {
            if let Some(e) = evaluate(&model, lora.as_ref(), &training, t.batch_size, step) {
                metrics.eval(&e.row())?;
                events.emit(Event::Eval, e)?;
                progress.println(&format!(
                    "step {step}: eval loss {:.4}, perplexity {:.3}",
                    e.loss, e.perplexity
                ));
                if state.best_eval_loss.is_none_or(|b| e.loss < b) {
                    state.best_eval_loss = Some(e.loss);
                    state.best_step = Some(step);
                    state.evals_without_improvement = 0;
                } else {
                    state.evals_without_improvement += 1;
                }
                last_eval = Some(e);
                if t.early_stopping_patience > 0
                    && state.evals_without_improvement >= t.early_stopping_patience
                {
                    stopped_early = true;
                }
            }
        }
        state.step = step;
        state.epoch = step * (t.batch_size * t.grad_accum) as u64 / train_len as u64;
        state.data_position = step * (t.batch_size * t.grad_accum) as u64 % train_len as u64;
        state.elapsed_s = elapsed_before + wall.elapsed().as_secs_f64();
        // Under a retention bound, every measurement within it is checkpointed: the fallback.
        if (t.save_every > 0 && step.is_multiple_of(t.save_every))
            || at_end
            || stopped_early
            || retention_ok
        {
            let named = named_trainables(&model, &lora);
            let opt = optimizer.state_tensors();
            let files = [
                (TRAINABLE_FILE, Contents::Tensors(&named)),
                (OPTIMIZER_FILE, Contents::Tensors(&opt)),
            ];
            let dir = checkpoint::write_checkpoint(run_dir, step, &files, &state)?;
            checkpoint::prune_checkpoints(run_dir, 2, state.best_step)?;
            events.emit(Event::Checkpoint, json!({ "step": step, "path": dir }))?;
        }
        if stopped_early {
            break;
        }
    }
    progress.finish();
    let finished = step == total_steps || stopped_early;
    let output = if finished {
        Some(write_output(&model, &lora, &tokenizer, config, run_dir)?)
    } else {
        None
    };
    let summary = RunSummary {
        run_dir: run_dir.to_path_buf(),
        steps: step,
        total_steps,
        final_loss,
        eval_before,
        eval_after: last_eval,
        best_step: state.best_step,
        trainable_parameters,
        model_parameters,
        train_rows: train_len,
        eval_rows: eval_len,
        data: stats,
        stopped_early,
        output,
        retention_before,
        retention_after,
        tokens_seen: state.tokens_seen,
        elapsed_s: state.elapsed_s,
    };
    if finished {
        events.emit(Event::Finished, &summary)?;
    }
    Ok(summary)
}

/// The run's product: `adapter/` (PEFT) for LoRA, `model/` (HF folder) for full fine-tuning.
fn write_output(
    model: &Model<f32>,
    lora: &Option<Lora<f32>>,
    tokenizer: &Tokenizer,
    config: &RunConfig,
    run_dir: &Path,
) -> Result<PathBuf, TrainError> {
    let base = config.model.path.display().to_string();
    match lora {
        Some(l) => {
            let dir = run_dir.join("adapter");
            retune_core::load::peft::save_peft_adapter(&dir, l, &model.config, &base)?;
            Ok(dir)
        }
        None => {
            let dir = run_dir.join("model");
            retune_core::load::save::save_hf_folder(
                &dir,
                &model.config,
                &model.weights,
                tokenizer,
                retune_core::load::save::SaveDtype::F32,
            )?;
            Ok(dir)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::step_rows;

    #[test]
    fn every_row_is_visited_once_per_epoch() {
        let rows = 10;
        let mut seen = Vec::new();
        for step in 0..5 {
            for micro in step_rows(rows, 7, step, 2, 1) {
                seen.extend(micro);
            }
        }
        let mut sorted = seen.clone();
        sorted.sort();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        assert_ne!(seen, (0..10).collect::<Vec<_>>(), "rows are shuffled");
        let again: Vec<usize> = (0..5)
            .flat_map(|s| step_rows(rows, 7, s, 2, 1).concat())
            .collect();
        assert_eq!(seen, again, "the order is a function of the seed");
    }
}
