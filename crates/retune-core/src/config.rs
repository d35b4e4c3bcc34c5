//! [`LlamaConfig`]: the shape and hyper-parameters of a Llama-family decoder.
//!
//! One struct covers Llama 2/3.x, Mistral, Qwen2/2.5, SmolLM/SmolLM2 and TinyLlama; they differ
//! only in biases, tying, RoPE scaling and sizes. Parsing lives with the loaders
//! (`config.json` in [`crate::load::hf`], GGUF metadata in [`crate::load::gguf`]).

use serde::{Deserialize, Serialize};

/// RoPE frequency scaling.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "rope_type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Llama 3.1-style scaling (`rope_scaling.rope_type = "llama3"`).
    Llama3 {
        /// Overall factor (8.0 for Llama 3.1).
        factor: f64,
        /// Wavelengths above `original_max_position_embeddings / low_freq_factor` are divided by `factor`.
        low_freq_factor: f64,
        /// Wavelengths below `original_max_position_embeddings / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// Context length the model was pre-trained with.
        original_max_position_embeddings: usize,
    },
}

/// Architecture of a Llama-family decoder, in Hugging Face terms.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// `architectures[0]` of config.json, e.g. `LlamaForCausalLM`, `Qwen2ForCausalLM`.
    pub architecture: String,
    /// `model_type`: `llama`, `mistral` or `qwen2`.
    pub model_type: String,
    /// Vocabulary size V.
    pub vocab_size: usize,
    /// Model width C.
    pub hidden_size: usize,
    /// MLP width F.
    pub intermediate_size: usize,
    /// Number of decoder layers L.
    pub num_hidden_layers: usize,
    /// Query heads NH.
    pub num_attention_heads: usize,
    /// Key/value heads NKV (grouped-query attention when < NH).
    pub num_key_value_heads: usize,
    /// Per-head width HD (usually C / NH).
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base frequency.
    pub rope_theta: f64,
    /// Optional RoPE scaling.
    pub rope_scaling: Option<RopeScaling>,
    /// Context length.
    pub max_position_embeddings: usize,
    /// LM head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// q/k/v projections have biases (Qwen2, or Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// o projection has a bias (Llama with `attention_bias`; not Qwen2).
    pub o_bias: bool,
    /// MLP projections have biases (`mlp_bias`).
    pub mlp_bias: bool,
    /// Beginning-of-sequence token, if the model has one.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence tokens (generation stops on any of them).
    pub eos_token_ids: Vec<u32>,
    /// Storage dtype the checkpoint declares (`torch_dtype` or `dtype`), if any.
    pub dtype: Option<String>,
    /// Mistral's sliding window, if declared (attention is full within our context; noted).
    pub sliding_window: Option<usize>,
}

impl LlamaConfig {
    /// The SmolLM2-135M architecture (as its GGUF metadata and config.json give it): the shape
    /// benchmarks run and the real model the demo uses.
    pub fn smollm2_135m() -> Self {
        LlamaConfig {
            architecture: "LlamaForCausalLM".into(),
            model_type: "llama".into(),
            vocab_size: 49152,
            hidden_size: 576,
            intermediate_size: 1536,
            num_hidden_layers: 30,
            num_attention_heads: 9,
            num_key_value_heads: 3,
            head_dim: 64,
            rms_norm_eps: 1e-5,
            rope_theta: 100000.0,
            rope_scaling: None,
            max_position_embeddings: 8192,
            tie_word_embeddings: true,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
            dtype: None,
            sliding_window: None,
        }
    }

    /// Width of the key/value projections: NKV * HD.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Width of the query projection: NH * HD.
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Checks the relations between sizes; `what` names the source in the message.
    pub fn validate(&self) -> Result<(), String> {
        let nonzero = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
        ];
        for (name, value) in nonzero {
            if value == 0 {
                return Err(format!("`{name}` must be positive"));
            }
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return Err(format!(
                "`num_attention_heads` ({}) must be a multiple of `num_key_value_heads` ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(format!(
                "`head_dim` ({}) must be even for RoPE",
                self.head_dim
            ));
        }
        Ok(())
    }

    /// Parameter count as Hugging Face counts it (tied head counted once).
    pub fn param_count(&self) -> usize {
        self.tensor_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    /// Every parameter tensor the model has, with its Hugging Face name and shape, in a fixed order.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (c, f, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let (q, kv) = (self.q_dim(), self.kv_dim());
        let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, c])];
        for i in 0..self.num_hidden_layers {
            let p = format!("model.layers.{i}");
            out.push((format!("{p}.input_layernorm.weight"), vec![c]));
            for (name, rows, cols, bias) in [
                ("self_attn.q_proj", q, c, self.qkv_bias),
                ("self_attn.k_proj", kv, c, self.qkv_bias),
                ("self_attn.v_proj", kv, c, self.qkv_bias),
                ("self_attn.o_proj", c, q, self.o_bias),
            ] {
                out.push((format!("{p}.{name}.weight"), vec![rows, cols]));
                if bias {
                    out.push((format!("{p}.{name}.bias"), vec![rows]));
                }
            }
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![c]));
            for (name, rows, cols) in [
                ("mlp.gate_proj", f, c),
                ("mlp.up_proj", f, c),
                ("mlp.down_proj", c, f),
            ] {
                out.push((format!("{p}.{name}.weight"), vec![rows, cols]));
                if self.mlp_bias {
                    out.push((format!("{p}.{name}.bias"), vec![rows]));
                }
            }
        }
        out.push(("model.norm.weight".to_string(), vec![c]));
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), vec![v, c]));
        }
        out
    }
}

impl LlamaConfig {
    /// Architectures retune runs, as (`architectures[0]`, `model_type`) pairs of a `config.json`.
    pub const SUPPORTED_ARCHITECTURES: [(&'static str, &'static str); 3] = [
        ("LlamaForCausalLM", "llama"),
        ("MistralForCausalLM", "mistral"),
        ("Qwen2ForCausalLM", "qwen2"),
    ];

    /// Parses a Hugging Face `config.json` (already read into `json`; `path` names it in errors).
    ///
    /// Reads both transformers 4.x keys (`torch_dtype`, top-level `rope_theta`, `rope_scaling`)
    /// and 5.x keys (`dtype`, `rope_parameters`). The five sizes (`vocab_size`, `hidden_size`,
    /// `intermediate_size`, `num_hidden_layers`, `num_attention_heads`) are required; every other
    /// field falls back to the default of the transformers config class of that `model_type`.
    /// `generation_config.json` is not read here (see [`crate::load::hf`]).
    pub fn from_hf_json(
        path: &std::path::Path,
        json: &serde_json::Value,
    ) -> crate::error::Result<LlamaConfig> {
        use crate::error::Error;
        use serde_json::Value;

        let obj = json
            .as_object()
            .ok_or_else(|| Error::format(path, "expected a JSON object at the top level"))?;
        // `null` is how transformers writes "not set", so treat it like an absent key.
        let get = |key: &str| obj.get(key).filter(|v| !v.is_null());
        let bad = |key: &str, what: &str, v: &Value| {
            Error::format(path, format!("`{key}` must be {what}, got {v}"))
        };
        let opt_usize = |key: &str| -> crate::error::Result<Option<usize>> {
            match get(key) {
                None => Ok(None),
                Some(v) => v
                    .as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .map(Some)
                    .ok_or_else(|| bad(key, "a non-negative integer", v)),
            }
        };
        let req_usize = |key: &str| -> crate::error::Result<usize> {
            opt_usize(key)?
                .ok_or_else(|| Error::format(path, format!("missing required field `{key}`")))
        };
        let opt_f64 = |key: &str| -> crate::error::Result<Option<f64>> {
            match get(key) {
                None => Ok(None),
                Some(v) => v.as_f64().map(Some).ok_or_else(|| bad(key, "a number", v)),
            }
        };
        let opt_bool = |key: &str| -> crate::error::Result<Option<bool>> {
            match get(key) {
                None => Ok(None),
                Some(v) => v
                    .as_bool()
                    .map(Some)
                    .ok_or_else(|| bad(key, "true or false", v)),
            }
        };
        let opt_str = |key: &str| -> crate::error::Result<Option<String>> {
            match get(key) {
                None => Ok(None),
                Some(v) => v
                    .as_str()
                    .map(|s| Some(s.to_string()))
                    .ok_or_else(|| bad(key, "a string", v)),
            }
        };

        // Architecture: `architectures[0]`, with `model_type` as a cross-check (or a fallback).
        let supported = || {
            Self::SUPPORTED_ARCHITECTURES
                .iter()
                .map(|(a, m)| format!("{a} ({m})"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let declared_arch = match get("architectures") {
            None => None,
            Some(Value::Array(a)) => match a.first() {
                None => None,
                Some(Value::String(s)) => Some(s.clone()),
                Some(v) => return Err(bad("architectures", "a list of strings", v)),
            },
            Some(v) => return Err(bad("architectures", "a list of strings", v)),
        };
        let declared_type = opt_str("model_type")?;
        let known = Self::SUPPORTED_ARCHITECTURES
            .iter()
            .find(|(a, m)| match &declared_arch {
                Some(arch) => arch == a,
                None => declared_type.as_deref() == Some(*m),
            });
        let (architecture, model_type) = match (known, &declared_type) {
            (Some((a, m)), Some(t)) if t != m => {
                return Err(Error::Unsupported {
                    path: path.into(),
                    reason: format!(
                        "architecture `{a}` with model_type `{t}` (expected model_type `{m}`); \
                         supported: {}",
                        supported()
                    ),
                })
            }
            (Some((a, m)), _) => (a.to_string(), m.to_string()),
            (None, _) => {
                let what = match (&declared_arch, &declared_type) {
                    (Some(a), Some(t)) => format!("architecture `{a}` (model_type `{t}`)"),
                    (Some(a), None) => format!("architecture `{a}`"),
                    (None, Some(t)) => format!("model_type `{t}`"),
                    (None, None) => {
                        return Err(Error::format(
                            path,
                            "missing required field `architectures` (and no `model_type`)",
                        ))
                    }
                };
                return Err(Error::Unsupported {
                    path: path.into(),
                    reason: format!("{what} is not supported; supported: {}", supported()),
                });
            }
        };

        let hidden_size = req_usize("hidden_size")?;
        let num_attention_heads = req_usize("num_attention_heads")?;
        let head_dim = match opt_usize("head_dim")? {
            Some(d) => d,
            // Zero heads is reported by `validate` below, with the field's name.
            None if num_attention_heads == 0 => 0,
            None if hidden_size % num_attention_heads == 0 => hidden_size / num_attention_heads,
            None => {
                return Err(Error::format(
                    path,
                    format!(
                        "`hidden_size` ({hidden_size}) is not a multiple of \
                         `num_attention_heads` ({num_attention_heads}) and `head_dim` is not given"
                    ),
                ))
            }
        };

        // RoPE: 5.x nests theta and scaling in `rope_parameters`; 4.x has a top-level
        // `rope_theta` and an optional `rope_scaling` object.
        let rope_params = get("rope_parameters").and_then(Value::as_object);
        let rope_theta = match rope_params
            .and_then(|p| p.get("rope_theta"))
            .filter(|v| !v.is_null())
        {
            Some(v) => v
                .as_f64()
                .ok_or_else(|| bad("rope_parameters.rope_theta", "a number", v))?,
            None => opt_f64("rope_theta")?.unwrap_or(10000.0),
        };
        let scaling_key = if rope_params.is_some() {
            "rope_parameters"
        } else {
            "rope_scaling"
        };
        let scaling = match rope_params {
            Some(p) => Some(p),
            None => match get("rope_scaling") {
                None => None,
                Some(Value::Object(o)) => Some(o),
                Some(v) => return Err(bad("rope_scaling", "an object", v)),
            },
        };
        let rope_scaling = match scaling {
            None => None,
            Some(s) => {
                let kind = s
                    .get("rope_type")
                    .or_else(|| s.get("type"))
                    .filter(|v| !v.is_null())
                    .map(|v| {
                        v.as_str()
                            .ok_or_else(|| bad(&format!("{scaling_key}.rope_type"), "a string", v))
                    })
                    .transpose()?;
                match kind {
                    None | Some("default") => None,
                    Some("llama3") => {
                        let num = |k: &str| -> crate::error::Result<f64> {
                            let key = format!("{scaling_key}.{k}");
                            match s.get(k).filter(|v| !v.is_null()) {
                                None => Err(Error::format(
                                    path,
                                    format!(
                                        "missing required field `{key}` for llama3 RoPE scaling"
                                    ),
                                )),
                                Some(v) => v.as_f64().ok_or_else(|| bad(&key, "a number", v)),
                            }
                        };
                        let original = num("original_max_position_embeddings")?;
                        if original < 1.0 || original.fract() != 0.0 {
                            return Err(Error::format(
                                path,
                                format!(
                                    "`{scaling_key}.original_max_position_embeddings` must be a \
                                     positive integer, got {original}"
                                ),
                            ));
                        }
                        let (low, high) = (num("low_freq_factor")?, num("high_freq_factor")?);
                        if !(low > 0.0 && high > low) {
                            return Err(Error::format(
                                path,
                                format!(
                                    "llama3 RoPE scaling needs 0 < low_freq_factor < \
                                     high_freq_factor, got {low} and {high}"
                                ),
                            ));
                        }
                        Some(RopeScaling::Llama3 {
                            factor: num("factor")?,
                            low_freq_factor: low,
                            high_freq_factor: high,
                            original_max_position_embeddings: original as usize,
                        })
                    }
                    Some(other) => {
                        return Err(Error::Unsupported {
                            path: path.into(),
                            reason: format!(
                                "RoPE scaling type `{other}` (`{scaling_key}`); supported: \
                                 default (none), llama3"
                            ),
                        })
                    }
                }
            }
        };

        // Biases: Qwen2 always has q/k/v biases and none on o; Llama's `attention_bias` covers
        // all four projections and `mlp_bias` the MLP; Mistral has none.
        let (qkv_bias, o_bias, mlp_bias) = match model_type.as_str() {
            "qwen2" => (true, false, false),
            "llama" => {
                let attn = opt_bool("attention_bias")?.unwrap_or(false);
                (attn, attn, opt_bool("mlp_bias")?.unwrap_or(false))
            }
            _ => (false, false, false),
        };
        // Defaults of the transformers config classes.
        let default_max_pos = match model_type.as_str() {
            "mistral" => 4096 * 32,
            "qwen2" => 32768,
            _ => 2048,
        };
        let sliding_window = match model_type.as_str() {
            "mistral" => match obj.get("sliding_window") {
                None => Some(4096),
                Some(_) => opt_usize("sliding_window")?,
            },
            "qwen2" if opt_bool("use_sliding_window")?.unwrap_or(false) => {
                opt_usize("sliding_window")?
            }
            _ => None,
        };
        let token_id = |key: &str, v: &Value| -> crate::error::Result<u32> {
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| bad(key, "a token id (non-negative integer)", v))
        };
        let bos_token_id = get("bos_token_id")
            .map(|v| token_id("bos_token_id", v))
            .transpose()?;
        let eos_token_ids = match get("eos_token_id") {
            None => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| token_id("eos_token_id", v))
                .collect::<crate::error::Result<_>>()?,
            Some(v) => vec![token_id("eos_token_id", v)?],
        };
        let dtype = match opt_str("dtype")? {
            Some(d) => Some(d),
            None => opt_str("torch_dtype")?,
        };

        let cfg = LlamaConfig {
            architecture,
            model_type,
            vocab_size: req_usize("vocab_size")?,
            hidden_size,
            intermediate_size: req_usize("intermediate_size")?,
            num_hidden_layers: req_usize("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads: opt_usize("num_key_value_heads")?.unwrap_or(num_attention_heads),
            head_dim,
            rms_norm_eps: opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: opt_usize("max_position_embeddings")?
                .unwrap_or(default_max_pos),
            tie_word_embeddings: opt_bool("tie_word_embeddings")?.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias,
            bos_token_id,
            eos_token_ids,
            dtype,
            sliding_window,
        };
        cfg.validate()
            .map_err(|reason| Error::format(path, reason))?;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-135M as published: 134,515,008 parameters (model card / safetensors header).
    #[test]
    fn smollm2_135m_parameter_count() {
        let cfg = LlamaConfig::smollm2_135m();
        assert_eq!(cfg.param_count(), 134_515_008);
    }
}
