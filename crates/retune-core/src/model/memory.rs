//! The memory plan: estimates of a run's peak resident memory, made from the configuration and
//! the stored dtypes before any weight is read, so that a run which does not fit is refused
//! before loading. Estimates, not measurements: `retune bench` measures peak RSS.

use crate::config::LlamaConfig;
use crate::load::held::{held_type, Hold};
use crate::ops::stored::{stored_bytes, type_from_name, CHUNK_BYTES};
use serde::Serialize;
use std::collections::BTreeMap;

/// Resident memory of the process besides the model and the step: code, the tokenizer, the
/// allocator's arenas (measured on SmolLM2 and Llama 3 tokenizers: 60 to 180 MiB).
const PROCESS_BYTES: u64 = 192 << 20;

/// What a run needs, by part.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Estimate {
    /// The model's weights as held.
    pub weights: u64,
    /// Trained parameters with their gradients and two AdamW moments.
    pub trainable: u64,
    /// Activations, their gradients and working buffers of one step (or the KV cache).
    pub activations: u64,
    /// The process besides: code, tokenizer, allocator.
    pub process: u64,
}

impl Estimate {
    /// The estimated peak.
    pub fn total(&self) -> u64 {
        self.weights + self.trainable + self.activations + self.process
    }
}

/// Bytes of every weight held in f32 (full fine-tuning, or a base loaded in f32).
pub fn f32_weight_bytes(cfg: &LlamaConfig) -> u64 {
    4 * cfg.param_count() as u64
}

/// Bytes of the weights of a frozen base held as `hold` says ([`crate::load::held`]), from the
/// stored dtypes (`name -> "Q4_K"`, `"BF16"`, ... as a [`crate::load::ModelSummary`] gives them):
/// matrices in their held type, norms and biases in f32.
pub fn held_weight_bytes(
    cfg: &LlamaConfig,
    stored_dtypes: &BTreeMap<String, String>,
    hold: &Hold,
) -> u64 {
    cfg.tensor_shapes()
        .into_iter()
        .map(|(name, shape)| match shape[..] {
            [rows, cols] => {
                let src = stored_dtypes
                    .get(&name)
                    .and_then(|d| type_from_name(d))
                    .unwrap_or(hold.dense);
                stored_bytes(held_type(src, hold), rows, cols) as u64
            }
            _ => 4 * shape.iter().product::<usize>() as u64,
        })
        .sum()
}

/// A generation (or evaluation) with a KV cache of `context` tokens over weights of
/// `weight_bytes`.
pub fn inference_estimate(cfg: &LlamaConfig, context: usize, weight_bytes: u64) -> Estimate {
    let kv_cache = 2 * cfg.num_hidden_layers * cfg.kv_dim() * 4 * context;
    let (c, f, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let buffers = 4 * (context * (4 * c + 2 * cfg.q_dim() + 3 * f) + v);
    Estimate {
        weights: weight_bytes,
        trainable: 0,
        activations: (kv_cache + buffers + 2 * CHUNK_BYTES) as u64,
        process: PROCESS_BYTES,
    }
}

/// A training step over `rows` x `seq` tokens with `trainable` parameters (each with an f32
/// value, gradient and two AdamW moments) over weights of `weight_bytes`: the saved input of
/// every layer, one layer's activations and their gradients (per-layer recompute), attention
/// probabilities, one LM-head chunk of logits, and the dequantised chunks of a held base.
pub fn training_estimate(
    cfg: &LlamaConfig,
    rows: usize,
    seq: usize,
    trainable: usize,
    weight_bytes: u64,
) -> Estimate {
    let (l, c, f, v) = (
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.vocab_size,
    );
    let (q, kv, n) = (cfg.q_dim(), cfg.kv_dim(), rows * seq);
    let one_layer =
        n * (4 * c + 2 * q + 2 * kv + 3 * f) * 4 + 4 * cfg.num_attention_heads * rows * seq * seq;
    // Residuals, a layer's activations and their gradients, the head's hidden states and
    // their gradient, one chunk of logits, and the chunks a held base dequantises (f32 and
    // packed) while a product runs.
    let activations = (l + 1) * n * c * 4 + 2 * one_layer + 4 * n * c * 4 + 512 * v * 4;
    Estimate {
        weights: weight_bytes,
        trainable: 16 * trainable as u64,
        activations: (activations + 3 * CHUNK_BYTES) as u64,
        process: PROCESS_BYTES,
    }
}

/// LoRA parameters of rank `r` on all seven linear layers of every decoder layer.
pub fn lora_all_linear_params(cfg: &LlamaConfig, r: usize) -> usize {
    let (c, f, q, kv) = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.q_dim(),
        cfg.kv_dim(),
    );
    cfg.num_hidden_layers * r * ((c + q) + 2 * (c + kv) + (q + c) + 2 * (c + f) + (f + c))
}

/// The memory this machine can give a new process now: `MemAvailable` of `/proc/meminfo`
/// (Linux); `None` where it cannot be read.
pub fn available_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// GiB with two decimals, for messages.
pub fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::GgmlDType;

    #[test]
    fn held_bytes_follow_the_storage_types() {
        let cfg = LlamaConfig::smollm2_135m();
        let shapes = cfg.tensor_shapes();
        let all = |d: &str| -> BTreeMap<String, String> {
            shapes
                .iter()
                .map(|(n, _)| (n.clone(), d.to_string()))
                .collect()
        };
        let vectors: u64 = shapes
            .iter()
            .filter(|(_, s)| s.len() == 1)
            .map(|(_, s)| 4 * s[0] as u64)
            .sum();
        let matrix_params: u64 = cfg.param_count() as u64 - vectors / 4;
        let dense = Hold {
            quantize: None,
            dense: GgmlDType::BF16,
        };
        // bf16: two bytes a matrix parameter; Q8_0 kept as stored: 34 bytes per 32.
        assert_eq!(
            held_weight_bytes(&cfg, &all("BF16"), &dense),
            2 * matrix_params + vectors
        );
        assert_eq!(
            held_weight_bytes(&cfg, &all("Q8_0"), &dense),
            matrix_params / 32 * 34 + vectors
        );
        // Quantised on load from f32: Q4_0 is 18 bytes per 32.
        let q4 = Hold {
            quantize: Some(GgmlDType::Q4_0),
            dense: GgmlDType::BF16,
        };
        assert_eq!(
            held_weight_bytes(&cfg, &all("F32"), &q4),
            matrix_params / 32 * 18 + vectors
        );
    }
}
