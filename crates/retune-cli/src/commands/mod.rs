//! One module per command: an `Args` struct (its doc comments are the help) and `run`.

pub mod bench;
pub mod data;
pub mod demo;
pub mod disclose;
pub mod eval;
pub mod fetch;
pub mod generate;
pub mod inspect;
pub mod merge;
pub mod train;
pub mod verify;

use anyhow::{bail, Context, Result};
use candle_core::quantized::GgmlDType;
use retune_core::load::held::Hold;
use retune_core::load::inspect_model;
use retune_core::load::peft::load_peft_adapter;
use retune_core::model::{memory, Lora, Model};
use retune_core::tokenizer::Tokenizer;
use std::path::Path;
use std::time::Instant;

/// Loads a model folder or GGUF file with its tokenizer, checking they fit together.
pub fn load_model_and_tokenizer(path: &Path, quiet: bool) -> Result<(Model<f32>, Tokenizer)> {
    let start = Instant::now();
    let model =
        Model::<f32>::load(path).with_context(|| format!("loading model {}", path.display()))?;
    let tokenizer = Tokenizer::load(path)
        .with_context(|| format!("loading the tokenizer of {}", path.display()))?;
    tokenizer.check_vocab(model.config.vocab_size, path)?;
    if !quiet {
        eprintln!(
            "loaded {} ({} layers, {} parameters) in {:.1}s",
            path.display(),
            model.config.num_hidden_layers,
            model.config.param_count(),
            start.elapsed().as_secs_f64()
        );
    }
    Ok((model, tokenizer))
}

/// A model ready for evaluation or generation, with its adapter.
pub struct Inference {
    /// The model: in f32, or a frozen base held in its storage type.
    pub model: Model<f32>,
    /// The adapter when it runs as branches beside a held base (`None`: none, or merged).
    pub lora: Option<Lora<f32>>,
    /// The model's tokenizer.
    pub tokenizer: Tokenizer,
}

/// Loads `path` for inference with a KV cache of `context` tokens: in f32 with the adapter
/// merged when that fits the available memory (and `hold` is false), else held in its storage
/// type (a quantised GGUF keeps its blocks) with the adapter as branches beside it. Refused
/// before loading, with the estimate and what is available, when neither fits.
pub fn load_for_inference(
    path: &Path,
    adapter: Option<&Path>,
    hold: bool,
    context: usize,
    quiet: bool,
) -> Result<Inference> {
    let summary =
        inspect_model(path).with_context(|| format!("inspecting model {}", path.display()))?;
    let cfg = &summary.config;
    let available = retune_train::plan::available_bytes()?;
    let f32_need = memory::inference_estimate(cfg, context, memory::f32_weight_bytes(cfg));
    let fits = |e: &memory::Estimate| available.is_none_or(|a| e.total() <= a);
    let dense = Hold {
        quantize: None,
        dense: GgmlDType::F32,
    };
    let held_need = memory::inference_estimate(
        cfg,
        context,
        memory::held_weight_bytes(cfg, &summary.stored_dtypes, &dense),
    );
    let use_held = hold || !fits(&f32_need);
    let need = if use_held { held_need } else { f32_need };
    if !fits(&need) {
        bail!(
            "{} needs about {} for inference with a {context}-token cache but {} is available:              refused before loading; use a quantised model (a Q4_0 or Q4_K GGUF) or a shorter              --max-tokens",
            path.display(),
            memory::gib(need.total()),
            memory::gib(available.unwrap_or(0))
        );
    }
    if !use_held {
        let (mut model, tokenizer) = load_model_and_tokenizer(path, quiet)?;
        if let Some(dir) = adapter {
            merge::apply_adapter(&mut model, path, dir, quiet)?;
        }
        return Ok(Inference {
            model,
            lora: None,
            tokenizer,
        });
    }
    let start = Instant::now();
    let model = Model::<f32>::load_held(path, &dense)
        .with_context(|| format!("loading model {}", path.display()))?;
    let tokenizer = Tokenizer::load(path)
        .with_context(|| format!("loading the tokenizer of {}", path.display()))?;
    tokenizer.check_vocab(model.config.vocab_size, path)?;
    if !quiet {
        eprintln!(
            "loaded {} held in its stored types ({} of weights, estimated peak {}) in {:.1}s",
            path.display(),
            memory::gib(model.held_bytes() as u64),
            memory::gib(need.total()),
            start.elapsed().as_secs_f64()
        );
    }
    let lora = match adapter {
        Some(dir) => {
            let lora = load_peft_adapter(dir, &model.config)
                .with_context(|| format!("loading adapter {}", dir.display()))?;
            merge::warn_if_other_base(dir, path);
            if !quiet {
                eprintln!(
                    "applied adapter {} (r {}, alpha {}) beside the held base",
                    dir.display(),
                    lora.spec.r,
                    lora.spec.alpha
                );
            }
            Some(lora)
        }
        None => None,
    };
    Ok(Inference {
        model,
        lora,
        tokenizer,
    })
}

/// Prints a value as one JSON object on stdout.
pub fn print_json(value: &serde_json::Value) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}
