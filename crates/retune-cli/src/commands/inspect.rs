//! `retune inspect MODEL`: architecture, parameters, stored dtypes, memory estimates.

use super::print_json;
use crate::Outcome;
use anyhow::{Context, Result};
use retune_core::config::LlamaConfig;
use retune_core::load::{inspect_model, ModelSummary};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Show a model's architecture, parameter count, the dtype of each weight class as stored,
/// and memory estimates for inference, LoRA training and full training.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A Hugging Face model folder or a .gguf file.
    model: PathBuf,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

/// The class a tensor belongs to, for the dtype summary.
fn weight_class(name: &str) -> &'static str {
    if name.contains("embed_tokens") {
        "embedding"
    } else if name.starts_with("lm_head") {
        "lm_head"
    } else if name.contains("layernorm") || name.contains("norm.weight") {
        "norms"
    } else if name.ends_with(".bias") {
        "biases"
    } else if name.contains("self_attn") {
        "attention"
    } else {
        "mlp"
    }
}

/// Rough memory needs in bytes, all weights held in f32 (how retune computes today).
/// Training figures assume batch 4 x 256 tokens with per-layer recompute, LoRA r = 16 on all
/// linear layers; they are estimates, not measurements (`retune bench` measures).
pub fn memory_estimates(cfg: &LlamaConfig) -> BTreeMap<&'static str, u64> {
    let p = cfg.param_count() as u64;
    let (l, c, f, v) = (
        cfg.num_hidden_layers as u64,
        cfg.hidden_size as u64,
        cfg.intermediate_size as u64,
        cfg.vocab_size as u64,
    );
    let (q, kv) = (cfg.q_dim() as u64, cfg.kv_dim() as u64);
    let weights = 4 * p;
    let ctx = cfg.max_position_embeddings.min(4096) as u64;
    let kv_cache = 2 * l * kv * 4 * ctx;
    let n = 4 * 256u64;
    // Saved layer inputs + one layer's activations (twice: values and gradients) + LM-head chunk.
    let one_layer = n * (4 * c + 2 * q + 2 * kv + 3 * f) * 4
        + 4 * cfg.num_attention_heads as u64 * 256 * 256 * 4;
    let activations = (l + 1) * n * c * 4 + 2 * one_layer + 256 * v * 4;
    let lora_params = l * 16 * ((c + q) + 2 * (c + kv) + (q + c) + 2 * (c + f) + (f + c));
    let mut m = BTreeMap::new();
    m.insert("inference_bytes", weights + kv_cache);
    m.insert(
        "lora_training_bytes",
        weights + 16 * lora_params + activations,
    );
    m.insert("full_training_bytes", 4 * weights + activations);
    m
}

fn summary_json(s: &ModelSummary, path: &std::path::Path) -> serde_json::Value {
    let cfg = &s.config;
    let mut dtypes: BTreeMap<&str, BTreeMap<String, usize>> = BTreeMap::new();
    for (name, dtype) in &s.stored_dtypes {
        *dtypes
            .entry(weight_class(name))
            .or_default()
            .entry(dtype.clone())
            .or_default() += 1;
    }
    json!({
        "path": path.display().to_string(),
        "format": format!("{:?}", s.format),
        "architecture": cfg.architecture,
        "model_type": cfg.model_type,
        "layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "context_length": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tied_embeddings": cfg.tie_word_embeddings,
        "parameters": cfg.param_count(),
        "stored_dtypes": dtypes,
        "file_bytes": s.file_bytes,
        "memory_estimates": memory_estimates(cfg),
    })
}

pub fn run(args: Args) -> Result<Outcome> {
    let summary = inspect_model(&args.model)
        .with_context(|| format!("inspecting {}", args.model.display()))?;
    let j = summary_json(&summary, &args.model);
    if args.json {
        print_json(&j)?;
        return Ok(Outcome::Success);
    }
    let cfg = &summary.config;
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    println!("model          {}", args.model.display());
    println!("architecture   {} ({})", cfg.architecture, cfg.model_type);
    println!(
        "shape          {} layers, width {}, MLP {}, {} heads / {} KV heads x {}",
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim
    );
    println!("vocabulary     {}", cfg.vocab_size);
    println!(
        "context        {} (RoPE theta {})",
        cfg.max_position_embeddings, cfg.rope_theta
    );
    println!("tied head      {}", cfg.tie_word_embeddings);
    println!("parameters     {}", cfg.param_count());
    println!("stored dtypes  {}", j["stored_dtypes"]);
    for (k, v) in memory_estimates(cfg) {
        println!(
            "{:<14} {:.2} GiB (estimate)",
            k.trim_end_matches("_bytes"),
            gib(v)
        );
    }
    Ok(Outcome::Success)
}
