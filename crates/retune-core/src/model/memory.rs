//! Memory estimates for inference and training, with weights held in f32 as retune holds them.
//! Estimates, not measurements: `retune bench` measures peak RSS.

use crate::config::LlamaConfig;

/// Bytes of f32 weights plus a KV cache of `context` tokens.
pub fn inference_bytes(cfg: &LlamaConfig, context: usize) -> u64 {
    let kv_cache = 2 * cfg.num_hidden_layers * cfg.kv_dim() * 4 * context;
    (4 * cfg.param_count() + kv_cache) as u64
}

/// Bytes of a training step over `rows` x `seq` tokens with `trainable` parameters (each with
/// an f32 gradient and two AdamW moments): f32 weights, the saved input of every layer, one
/// layer's activations and their gradients (per-layer recompute), and one LM-head chunk.
pub fn training_bytes(cfg: &LlamaConfig, rows: usize, seq: usize, trainable: usize) -> u64 {
    let (l, c, f, v) = (
        cfg.num_hidden_layers,
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.vocab_size,
    );
    let (q, kv, n) = (cfg.q_dim(), cfg.kv_dim(), rows * seq);
    let one_layer =
        n * (4 * c + 2 * q + 2 * kv + 3 * f) * 4 + 4 * cfg.num_attention_heads * rows * seq * seq;
    let activations = (l + 1) * n * c * 4 + 2 * one_layer + 256 * v * 4;
    (4 * cfg.param_count() + 12 * trainable + activations) as u64
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
