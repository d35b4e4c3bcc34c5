//! `retune inspect MODEL`: architecture, parameters, stored dtypes, memory estimates.

use super::print_json;
use crate::Outcome;
use anyhow::{Context, Result};
use candle_core::quantized::GgmlDType;
use retune_core::load::held::Hold;
use retune_core::load::{inspect_model, ModelSummary};
use retune_core::model::memory;
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

/// Memory estimates from the headers alone (the memory plan's): inference with a 4k-token KV
/// cache, with the weights in f32 and held in their stored types (a quantised GGUF keeps its
/// blocks); LoRA r = 16 on all linear layers under bf16 products, its base held once (float
/// matrices in bf16), at batch 4 x 256 and 1 x 1024; QLoRA with float matrices quantised to
/// Q4_0 on load; full fine-tuning in f32. Estimates, not measurements (`retune bench`
/// measures).
pub fn memory_estimates(s: &ModelSummary) -> BTreeMap<&'static str, u64> {
    let cfg = &s.config;
    let ctx = cfg.max_position_embeddings.min(4096);
    let lora = memory::lora_all_linear_params(cfg, 16);
    let f32_weights = memory::f32_weight_bytes(cfg);
    let held = |quantize, dense| {
        memory::held_weight_bytes(cfg, &s.stored_dtypes, &Hold { quantize, dense })
    };
    let bf16_base = held(None, GgmlDType::BF16);
    let mut m = BTreeMap::new();
    let total = |e: memory::Estimate| e.total();
    m.insert(
        "inference_bytes",
        total(memory::inference_estimate(cfg, ctx, f32_weights)),
    );
    let held_f32 = held(None, GgmlDType::F32);
    m.insert(
        "inference_held_bytes",
        total(memory::inference_estimate(cfg, ctx, held_f32)),
    );
    let lora_at = |rows, seq, base| total(memory::training_estimate(cfg, rows, seq, lora, base));
    m.insert("lora_training_bytes", lora_at(4, 256, bf16_base));
    m.insert("lora_training_1x1024_bytes", lora_at(1, 1024, bf16_base));
    m.insert(
        "qlora_q4_0_training_bytes",
        lora_at(4, 256, held(Some(GgmlDType::Q4_0), GgmlDType::BF16)),
    );
    let full = memory::training_estimate(cfg, 4, 256, cfg.param_count(), f32_weights);
    m.insert("full_training_bytes", full.total());
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
        "memory_estimates": memory_estimates(s),
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
    for (k, v) in memory_estimates(&summary) {
        println!(
            "{:<26} {:.2} GiB (estimate)",
            k.trim_end_matches("_bytes"),
            gib(v)
        );
    }
    Ok(Outcome::Success)
}
