//! `retune merge`: fold a LoRA adapter into its base and write a Hugging Face folder, then
//! check the written model against base + adapter.

use super::{load_model_and_tokenizer, print_json};
use crate::Outcome;
use anyhow::{bail, Context, Result};
use retune_core::load::peft::load_peft_adapter;
use retune_core::load::save::{save_hf_folder, SaveDtype, HF_FOLDER_FILES};
use retune_core::model::{Batch, LoraSpec, Model};
use retune_core::tokenizer::Tokenizer;
use retune_core::LlamaConfig;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Merge a LoRA adapter (PEFT format) into its base model and write a Hugging Face folder:
/// config.json, generation_config.json, model.safetensors, tokenizer.json and
/// tokenizer_config.json (with the chat template).
///
/// The base (a Hugging Face folder or a .gguf file, dequantised to f32) is loaded once and the
/// adapter is added into its weights in place, so only one copy of the model is ever in memory.
/// Then the command checks itself on fixed probe sequences (2 x 16 tokens): the logits of the
/// merged weights must equal those of base + adapter (the adapter as a separate branch) within
/// 1e-3, and the written folder, loaded back, must compute what the merged weights rounded to
/// --dtype compute (also 1e-3) and encode the probe text as the base's tokenizer does. The
/// end-to-end difference, written folder vs base + adapter, must be within 1e-3 for f32, and
/// for bf16 within 5% of the largest probe logit: bf16 storage alone rounds every weight, the
/// base's included, to 8 significant bits, which moves logits by about a percent of their
/// scale (0.19 of 34 on SmolLM2-135M). Otherwise it fails with exit 1 and says by how much.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The base model: a Hugging Face model folder or a .gguf file.
    #[arg(long)]
    model: PathBuf,
    /// The adapter folder (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    adapter: PathBuf,
    /// The folder to write; it must not exist or be empty.
    #[arg(long)]
    out: PathBuf,
    /// Storage dtype of the written weights.
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    dtype: String,
    /// Print one JSON object on stdout: out, dtype, max_abs_diff, tolerance, passed, ...
    #[arg(long)]
    json: bool,
}

/// Fixed probe text: two rows of [`PROBE_TOKENS`] tokens.
const PROBES: [&str; 2] = [
    "The heart pumps blood through the arteries, and the lungs give it oxygen on the way.",
    "Atrial fibrillation raises the risk of stroke; many patients take anticoagulants.",
];
/// Tokens per probe row.
const PROBE_TOKENS: usize = 16;
/// Tolerance of the f32 check, absolute, on logits.
const F32_TOLERANCE: f64 = 1e-3;
/// Tolerance of the bf16 check, relative to the largest probe logit.
const BF16_RELATIVE_TOLERANCE: f64 = 0.05;

/// The probe batch: each text tokenised (BOS as the model wants it), repeated as needed and cut
/// to [`PROBE_TOKENS`] (or the context, if shorter).
pub fn probe_batch(tok: &Tokenizer, config: &LlamaConfig) -> Result<Batch> {
    let t = PROBE_TOKENS.min(config.max_position_embeddings);
    let mut rows = Vec::new();
    for text in PROBES {
        let ids = tok.encode(text, true)?;
        if ids.is_empty() {
            bail!("the tokenizer encodes the probe text to nothing");
        }
        rows.push(ids.iter().copied().cycle().take(t).collect::<Vec<u32>>());
    }
    Ok(Batch::from_rows(&rows)?)
}

/// Loads a PEFT adapter for `model` and adds it into the weights (a merged f32 model computes
/// base + adapter); returns its hyper-parameters.
pub fn apply_adapter(
    model: &mut Model<f32>,
    model_path: &Path,
    dir: &Path,
    quiet: bool,
) -> Result<LoraSpec> {
    let lora = load_peft_adapter(dir, &model.config)
        .with_context(|| format!("loading adapter {}", dir.display()))?;
    warn_if_other_base(dir, model_path);
    lora.merge_into(&mut model.weights);
    if !quiet {
        eprintln!(
            "applied adapter {} (r {}, alpha {}, {}targets {}), merged into the base weights",
            dir.display(),
            lora.spec.r,
            lora.spec.alpha,
            if lora.spec.rslora { "rsLoRA, " } else { "" },
            target_names(&lora.spec).join(",")
        );
    }
    Ok(lora.spec)
}

/// Warns when the adapter's disclosure record (or model card) names another base model than
/// `model_path`: shapes can fit while the weights differ (another fine-tune of the same size).
pub fn warn_if_other_base(adapter: &Path, model_path: &Path) {
    match retune_report::check_base(adapter, model_path) {
        Ok(check) if !check.matches => eprintln!("warning: {}", check.message),
        _ => {}
    }
}

fn target_names(spec: &LoraSpec) -> Vec<&'static str> {
    spec.targets.iter().map(|t| t.name()).collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).abs())
        .fold(0.0, f64::max)
}

pub fn run(args: Args) -> Result<Outcome> {
    let dtype: SaveDtype = args.dtype.parse()?;
    if args.out.exists() {
        let mut entries = std::fs::read_dir(&args.out)
            .with_context(|| format!("{}: not a folder", args.out.display()))?;
        if entries.next().is_some() {
            bail!(
                "{}: the output folder exists and is not empty; choose a new folder",
                args.out.display()
            );
        }
    }
    let start = Instant::now();
    let (mut model, tok) = load_model_and_tokenizer(&args.model, args.json)?;
    warn_if_other_base(&args.adapter, &args.model);
    let lora = load_peft_adapter(&args.adapter, &model.config)
        .with_context(|| format!("loading adapter {}", args.adapter.display()))?;

    // Base + adapter on the probes, the adapter as a separate branch (the unmerged function),
    // and the base alone (how much the adapter changes the logits: what the check can see).
    let batch = probe_batch(&tok, &model.config)?;
    let expected = model.logits(&batch, Some(&lora));
    let adapter_effect = max_abs_diff(&model.logits(&batch, None), &expected);
    let max_logit = expected
        .iter()
        .fold(0.0f64, |m, x| m.max((*x as f64).abs()));

    // Merge in place (the only copy of the weights) and check the merge itself in f32.
    lora.merge_into(&mut model.weights);
    let spec = lora.spec.clone();
    drop(lora);
    let merged = model.logits(&batch, None);
    let merge_diff = max_abs_diff(&merged, &expected);
    // What the written file holds: the merged weights rounded to the storage dtype.
    let stored = if dtype == SaveDtype::F32 {
        merged
    } else {
        model
            .weights
            .tensors_mut()
            .into_iter()
            .for_each(|t| dtype.round(t));
        model.logits(&batch, None)
    };

    if !args.json {
        eprintln!("writing {} ({dtype})", args.out.display());
    }
    save_hf_folder(&args.out, &model.config, &model.weights, &tok, dtype)
        .with_context(|| format!("writing {}", args.out.display()))?;
    drop(model);

    // The written folder, loaded back as any user would load it.
    let reloaded = Model::<f32>::load(&args.out)
        .with_context(|| format!("loading the written folder {}", args.out.display()))?;
    let tok_back = Tokenizer::from_hf_folder(&args.out)
        .with_context(|| format!("loading the written tokenizer of {}", args.out.display()))?;
    let same_tokens = probe_batch(&tok_back, &reloaded.config)?.ids == batch.ids;
    let got = reloaded.logits(&batch, None);
    let reload_diff = max_abs_diff(&got, &stored);
    let diff = max_abs_diff(&got, &expected);
    let tolerance = match dtype {
        SaveDtype::F32 => F32_TOLERANCE,
        SaveDtype::Bf16 => BF16_RELATIVE_TOLERANCE * max_logit,
    };
    let passed = same_tokens
        && merge_diff <= F32_TOLERANCE
        && reload_diff <= F32_TOLERANCE
        && diff <= tolerance;
    if args.json {
        print_json(&json!({
            "out": args.out,
            "model": args.model,
            "adapter": args.adapter,
            "dtype": dtype.to_string(),
            "r": spec.r,
            "alpha": spec.alpha,
            "rslora": spec.rslora,
            "targets": target_names(&spec),
            "probe_tokens": batch.b * batch.t,
            "max_abs_diff": diff,
            "tolerance": tolerance,
            "merge_max_abs_diff": merge_diff,
            "reload_max_abs_diff": reload_diff,
            "adapter_effect": adapter_effect,
            "max_abs_logit": max_logit,
            "tokenizer_round_trip": same_tokens,
            "passed": passed,
            "files": HF_FOLDER_FILES,
            "seconds": start.elapsed().as_secs_f64(),
        }))?;
    } else {
        println!("{}", args.out.display());
        println!(
            "check: written model vs base + adapter on {} probe tokens: max |logit difference| \
             {diff:.3e} (tolerance {tolerance:.1e}; largest logit {max_logit:.2}, the adapter \
             moves logits by up to {adapter_effect:.3e})",
            batch.b * batch.t
        );
    }
    if !same_tokens {
        eprintln!(
            "error: the tokenizer written to {} encodes the probe text differently from the \
             base's tokenizer",
            args.out.display()
        );
    }
    if !passed {
        eprintln!(
            "error: the model written to {} does not compute base + adapter: its logits differ by \
             up to {diff:.3e} (tolerance {tolerance:.1e}); the merge alone by {merge_diff:.3e} and \
             the file from the merged weights by {reload_diff:.3e} (tolerance {F32_TOLERANCE:.0e} \
             each); do not use it",
            args.out.display()
        );
        return Ok(Outcome::Failed);
    }
    if adapter_effect <= F32_TOLERANCE && !args.json {
        eprintln!(
            "note: the adapter moves the probe logits by at most {adapter_effect:.3e}, within the \
             tolerance: the check cannot tell this merge from the base (an untrained adapter?)"
        );
    }
    Ok(Outcome::Success)
}
