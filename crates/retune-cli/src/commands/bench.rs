//! `retune bench`: forward+backward throughput and peak memory on random weights.
//!
//! A benchmark, not a test: it measures, it asserts nothing. Compare with the PyTorch + PEFT
//! figures in `shared/peer/README.md` (same shapes, batch 4 x 256).

use super::print_json;
use crate::Outcome;
use anyhow::{bail, Result};
use retune_core::config::LlamaConfig;
use retune_core::model::{Batch, Grads, Lora, LoraSpec, Model, Target};
use retune_core::ops::matmul::{set_matmul_precision, MatmulPrecision};
use retune_core::threads::KeepAwake;
use retune_train::optim::full_step_in_backward;
use retune_train::AdamW;
use serde_json::json;
use std::time::Instant;

/// Measure training forward+backward tokens/s and peak RSS on random weights, or on a model
/// file (`--model`) held as `retune train` holds it.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A Hugging Face folder or .gguf file to bench instead of a random shape. Under LoRA or
    /// frozen grads its base is held in its storage type (a quantised GGUF keeps its blocks;
    /// float matrices in bf16 under --dtype bf16, else f32), as `retune train` holds it.
    #[arg(long)]
    model: Option<std::path::PathBuf>,
    /// With --model: quantise its float matrices on load (q8_0, q4_0, q4_k), as
    /// `model.quantize` does.
    #[arg(long)]
    quantize: Option<String>,
    /// Model shape: smollm2-135m (30 layers, vocab 49152) or layer (one SmolLM2-135M decoder
    /// layer with a 256-token vocabulary, so the LM head is negligible).
    #[arg(long, default_value = "smollm2-135m")]
    shape: String,
    /// Gradients: "lora" (LoRA r = 16, alpha = 32 on all linear layers, base frozen), "frozen"
    /// (input gradients only: the base cost of LoRA) or "full" (every weight, full fine-tuning).
    #[arg(long, default_value = "lora")]
    grads: String,
    /// Rows per batch.
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Tokens per row.
    #[arg(long, default_value_t = 256)]
    seq: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Untimed warm-up steps.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Matrix-product precision: f32, or bf16 (inputs rounded to bf16, f32 accumulation, on
    /// AMX tiles where the CPU has them; weights, gradients and AdamW state stay f32).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// With --dtype bf16 and a frozen base: keep its f32 weights and pack each weight for
    /// every product, instead of holding the base as bf16 packs as `retune train` does (for
    /// comparison: slower, same results).
    #[arg(long)]
    keep_f32_base: bool,
    /// With --grads full: the optimizer in the backward (each layer's AdamW step as soon as
    /// its gradients are final; one layer's gradient buffer instead of all).
    #[arg(long)]
    optimizer_in_backward: bool,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

/// Peak resident set size of this process, from /proc/self/status (VmHWM), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// FLOPs per token of a training step, counted as `shared/peer/lora_bench.py` counts them.
fn flops_per_token(cfg: &LlamaConfig, full: bool, lora_params: usize, t: usize) -> f64 {
    let c = cfg.hidden_size as f64;
    let per_layer = c * (cfg.q_dim() + 2 * cfg.kv_dim()) as f64
        + cfg.q_dim() as f64 * c
        + 3.0 * c * cfg.intermediate_size as f64;
    let n_lin = cfg.num_hidden_layers as f64 * per_layer + cfg.vocab_size as f64 * c;
    let attn = 12.0 * cfg.num_hidden_layers as f64 * cfg.q_dim() as f64 * t as f64;
    if full {
        6.0 * n_lin + attn
    } else {
        4.0 * n_lin + 6.0 * lora_params as f64 + attn
    }
}

/// The tensors the optimizer updates: the adapter's, every base weight (full), or none.
fn trainable<'a>(
    model: &'a mut Model<f32>,
    lora: &'a mut Option<Lora<f32>>,
    full: bool,
) -> Vec<&'a mut Vec<f32>> {
    match lora {
        Some(l) => l.tensors_mut(),
        None if full => model.weights.tensors_mut(),
        None => Vec::new(),
    }
}

/// The gradients of [`trainable`], in the same order.
fn gradients(grads: &mut Grads<f32>, full: bool) -> Vec<&mut Vec<f32>> {
    match &mut grads.lora {
        Some(l) => l.tensors_mut(),
        None if full => grads.base.tensors_mut(),
        None => Vec::new(),
    }
}

/// The model of a bench from a file: held as `retune train` holds a frozen base, or in f32
/// for full fine-tuning; with the memory plan's estimate of the step's peak.
fn model_from_file(
    path: &std::path::Path,
    args: &Args,
    full: bool,
    bf16: bool,
) -> Result<(Model<f32>, u64)> {
    use anyhow::Context;
    use candle_core::quantized::GgmlDType;
    use retune_core::load::held::Hold;
    use retune_core::model::memory;
    let summary = retune_core::load::inspect_model(path)
        .with_context(|| format!("inspecting {}", path.display()))?;
    let cfg = &summary.config;
    let quantize = match args.quantize.as_deref() {
        None => None,
        Some(q) => Some(match retune_core::ops::stored::type_from_name(q) {
            Some(t @ (GgmlDType::Q8_0 | GgmlDType::Q4_0 | GgmlDType::Q4K)) => t,
            _ => bail!("unknown --quantize `{q}`; use q8_0, q4_0 or q4_k"),
        }),
    };
    let hold = Hold {
        quantize,
        dense: if bf16 {
            GgmlDType::BF16
        } else {
            GgmlDType::F32
        },
    };
    let (weights, trainable) = match full {
        true => (memory::f32_weight_bytes(cfg), cfg.param_count()),
        false => (
            memory::held_weight_bytes(cfg, &summary.stored_dtypes, &hold),
            memory::lora_all_linear_params(cfg, 16),
        ),
    };
    let trainable = if args.grads == "frozen" { 0 } else { trainable };
    let estimate = memory::training_estimate(cfg, args.batch, args.seq, trainable, weights);
    eprintln!(
        "memory plan: estimated peak {} (weights {}, trainable state {}, activations {})",
        memory::gib(estimate.total()),
        memory::gib(estimate.weights),
        memory::gib(estimate.trainable),
        memory::gib(estimate.activations)
    );
    let start = Instant::now();
    let model = match full {
        true => Model::<f32>::load(path),
        false => Model::<f32>::load_held(path, &hold),
    }
    .with_context(|| format!("loading {}", path.display()))?;
    eprintln!(
        "loaded {} in {:.1}s (peak RSS so far {})",
        path.display(),
        start.elapsed().as_secs_f64(),
        memory::gib(peak_rss_bytes().unwrap_or(0))
    );
    Ok((model, estimate.total()))
}

pub fn run(args: Args) -> Result<Outcome> {
    let mut cfg = LlamaConfig::smollm2_135m();
    match args.shape.as_str() {
        "smollm2-135m" => {}
        "layer" => {
            cfg.num_hidden_layers = 1;
            cfg.vocab_size = 256;
        }
        other => bail!("unknown --shape `{other}`; use smollm2-135m or layer"),
    }
    let full = match args.grads.as_str() {
        "full" => true,
        "frozen" | "lora" => false,
        other => bail!("unknown --grads `{other}`; use lora, frozen or full"),
    };
    let precision = match args.dtype.as_str() {
        "f32" => MatmulPrecision::F32,
        "bf16" => MatmulPrecision::Bf16,
        other => bail!("unknown --dtype `{other}`; use f32 or bf16"),
    };
    set_matmul_precision(precision);
    if args.batch == 0 || args.seq < 2 || args.steps == 0 {
        bail!("--batch, --steps must be positive and --seq at least 2");
    }
    let (model, estimate) = match &args.model {
        Some(path) => {
            let (model, estimate) =
                model_from_file(path, &args, full, precision == MatmulPrecision::Bf16)?;
            cfg = model.config.clone();
            (model, Some(estimate))
        }
        None => (Model::<f32>::random(cfg.clone(), 0, 0.02)?, None),
    };
    let lora = match args.grads.as_str() {
        "lora" => {
            let spec = LoraSpec {
                r: 16,
                alpha: 32.0,
                dropout: 0.0,
                targets: Target::ALL.to_vec(),
                rslora: false,
            };
            Some(Lora::init(spec, &model.weights, 0)?)
        }
        _ => None,
    };
    if args.optimizer_in_backward && !full {
        bail!("--optimizer-in-backward needs --grads full");
    }
    let mut model = model;
    // As `retune train` does: a frozen base under bf16 is held as packs.
    let base_packed =
        model.base_is_held() || (!full && !args.keep_f32_base && model.pack_frozen_base());
    let mut lora = lora;
    let mut grads = match &lora {
        Some(lora) => Grads::lora(&model, lora),
        None if args.optimizer_in_backward => Grads::streamed(&model),
        None if full => Grads::full(&model),
        None => Grads::frozen(&model),
    };
    // AdamW over the trainable tensors, as the peer's step includes its optimizer.
    let sizes: Vec<usize> = trainable(&mut model, &mut lora, full)
        .iter()
        .map(|t| t.len())
        .collect();
    let mut adamw = AdamW::new(&sizes, 0.9, 0.999, 1e-8, 0.0);
    let rows: Vec<Vec<u32>> = (0..args.batch)
        .map(|b| {
            (0..args.seq)
                .map(|i| ((i * 7919 + b * 104729) % cfg.vocab_size) as u32)
                .collect()
        })
        .collect();
    let batch = Batch::from_rows(&rows)?;
    let tokens = args.batch * args.seq;
    let mut times = Vec::new();
    // Seconds the other pool threads found no work, over the measured steps.
    let mut idle = 0.0;
    let mut last_loss = f64::NAN;
    for step in 0..args.warmup + args.steps {
        let start = Instant::now();
        let idle_before = KeepAwake::idle_seconds();
        let (n, lr) = (batch.target_count(), 1e-6);
        let stats = if args.optimizer_in_backward {
            full_step_in_backward(&mut model, &batch, n, &mut grads, &mut adamw, lr).0
        } else {
            let seed = step as u64;
            let stats = model.forward_backward(&batch, n, lora.as_ref(), seed, &mut grads);
            let mut g = gradients(&mut grads, full);
            let g_refs: Vec<&[f32]> = g.iter().map(|v| v.as_slice()).collect();
            adamw.step(&mut trainable(&mut model, &mut lora, full), &g_refs, lr);
            g.iter_mut().for_each(|v| v.fill(0.0));
            stats
        };
        let secs = start.elapsed().as_secs_f64();
        last_loss = stats.loss_sum / stats.count as f64;
        if !args.json {
            eprintln!(
                "step {step}: {:.3}s, {:.0} tok/s, loss {:.4}{}",
                secs,
                tokens as f64 / secs,
                last_loss,
                if step < args.warmup { " (warm-up)" } else { "" }
            );
        }
        if step >= args.warmup {
            times.push(secs);
            idle += KeepAwake::idle_seconds() - idle_before;
        }
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let tok_s = tokens as f64 / median;
    let gflops = flops_per_token(
        &cfg,
        full,
        lora.as_ref().map_or(0, |l| l.param_count()),
        args.seq,
    ) * tok_s
        / 1e9;
    let rss = peak_rss_bytes().unwrap_or(0);
    // The share of the other threads' time the steps left idle (their serial part); 0 when
    // they were not kept polling (`KeepAwake` needs the pool thread `retune` runs commands on).
    let others = rayon::current_num_threads().saturating_sub(1).max(1) as f64;
    let idle_share = idle / (times.iter().sum::<f64>() * others);
    let report = json!({
        "shape": args.shape,
        "model": args.model.as_ref().map(|p| p.display().to_string()),
        "estimated_peak_bytes": estimate,
        "held_weight_bytes": model.held_bytes(),
        "grads": args.grads,
        "batch": args.batch,
        "seq": args.seq,
        "threads": rayon::current_num_threads(),
        "step_seconds_median": median,
        "pool_idle_share": idle_share,
        "tokens_per_s": tok_s,
        "gflops_per_s": gflops,
        "peak_rss_bytes": rss,
        "final_loss": last_loss,
        "dtype": args.dtype,
        "base_packed": base_packed,
        "optimizer_in_backward": args.optimizer_in_backward,
        "gemm_kernel": match precision {
            MatmulPrecision::Bf16 => retune_gemm::best_kernel().name(),
            MatmulPrecision::F32 => "f32 (gemm crate)",
        },
    });
    if args.json {
        print_json(&report)?;
    } else {
        println!(
            "{} ({} grads, {}), batch {}x{}: {:.0} tok/s, {:.3} s/step, {:.1} GFLOP/s, peak RSS {:.2} GiB{}, other threads idle {:.1}%",
            args.model.as_ref().map_or(args.shape.clone(), |p| p.display().to_string()),
            args.grads,
            args.dtype,
            args.batch,
            args.seq,
            tok_s,
            median,
            gflops,
            rss as f64 / (1u64 << 30) as f64,
            estimate.map_or(String::new(), |e| format!(
                " (estimated {:.2} GiB)",
                e as f64 / (1u64 << 30) as f64
            )),
            idle_share * 100.0
        );
    }
    Ok(Outcome::Success)
}
