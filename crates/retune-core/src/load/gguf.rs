//! GGUF files (llama.cpp), versions 2 and 3, architectures `llama` and `qwen2`.
//!
//! The header and metadata are parsed with candle's
//! [`gguf_file`](candle_core::quantized::gguf_file); tensor data is memory-mapped, bounds-checked
//! against the file length, and dequantised to f32 (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0
//! and the K-quants Q2_K..Q6_K, via candle's
//! [`QTensor::dequantize`](candle_core::quantized::QTensor::dequantize)).
//!
//! Everything becomes f32 because retune's ops run in f32 (f64 for gradient checks) and we want
//! exactness first: a frozen base kept quantised in place (dequantising tile by tile inside the
//! matmul) would cut memory about 6x for Q4_1 and is a later performance step.
//!
//! Two things differ from the Hugging Face layout and are undone here:
//! - names (`blk.N.attn_q.weight` -> `model.layers.N.self_attn.q_proj.weight`, see
//!   [`hf_name`] / [`gguf_name`]);
//! - for `llama`, llama.cpp's convert script permutes the rows of `attn_q` and `attn_k` (weights
//!   and biases) so that each head's RoPE pairs are interleaved (GPT-J style) instead of split in
//!   halves (rotate-half, as transformers does); [`unpermute_rows`] restores the HF order.
//!   `qwen2` uses NEOX (rotate-half) RoPE in llama.cpp and is stored unpermuted.
//!
//! Llama 3.1 RoPE scaling is stored by llama.cpp as a `rope_freqs.weight` tensor of
//! per-frequency divisors rather than as parameters; [`llama3_from_rope_freqs`] recovers
//! equivalent [`RopeScaling::Llama3`] parameters and checks that they reproduce every divisor.

use std::collections::{BTreeMap, HashMap};
use std::io::Cursor;
use std::ops::Range;
use std::path::Path;

use super::held::{hold_tensors, HeldModel, Hold, SourceTensor};
use crate::ops::stored::type_name;
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{ggml_file, GgmlDType};
use candle_core::Device;
use rayon::prelude::*;

use super::{
    bf16_from_le, check_shape, f16_from_le, f32_from_le, map_file, HostTensor, LoadedModel,
    ModelFormat, ModelSummary,
};
use crate::config::{LlamaConfig, RopeScaling};
use crate::error::{Error, Result};

/// `general.architecture` values retune reads, with the Hugging Face architecture and model type
/// they become.
pub const SUPPORTED_ARCHITECTURES: [(&str, &str, &str); 2] = [
    ("llama", "LlamaForCausalLM", "llama"),
    ("qwen2", "Qwen2ForCausalLM", "qwen2"),
];

/// Whole-model tensors: (GGUF stem, Hugging Face stem).
const GLOBAL_NAMES: [(&str, &str); 3] = [
    ("token_embd", "model.embed_tokens"),
    ("output_norm", "model.norm"),
    ("output", "lm_head"),
];

/// Per-block tensors: (GGUF part of `blk.N.<part>`, HF part of `model.layers.N.<part>`).
const BLOCK_NAMES: [(&str, &str); 9] = [
    ("attn_norm", "input_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_norm", "post_attention_layernorm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// The one name map, in either direction (`to_hf`: GGUF -> HF, else HF -> GGUF). `None` for a
/// name outside the map (e.g. `rope_freqs.weight`, `model.rotary_emb.inv_freq`).
fn map_name(name: &str, to_hf: bool) -> Option<String> {
    let (stem, kind) = name.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let (block_prefix, block_out) = if to_hf {
        ("blk.", "model.layers.")
    } else {
        ("model.layers.", "blk.")
    };
    let pick = |pair: &(&'static str, &'static str)| if to_hf { *pair } else { (pair.1, pair.0) };
    if let Some(rest) = stem.strip_prefix(block_prefix) {
        let (layer, part) = rest.split_once('.')?;
        let layer: usize = layer.parse().ok()?;
        let (_, out) = BLOCK_NAMES
            .iter()
            .map(pick)
            .find(|(from, _)| *from == part)?;
        return Some(format!("{block_out}{layer}.{out}.{kind}"));
    }
    let (_, out) = GLOBAL_NAMES
        .iter()
        .map(pick)
        .find(|(from, _)| *from == stem)?;
    Some(format!("{out}.{kind}"))
}

/// GGUF tensor name -> Hugging Face name
/// (`blk.3.ffn_up.weight` -> `model.layers.3.mlp.up_proj.weight`).
pub fn hf_name(gguf: &str) -> Option<String> {
    map_name(gguf, true)
}

/// Hugging Face tensor name -> GGUF name (the inverse of [`hf_name`]).
pub fn gguf_name(hf: &str) -> Option<String> {
    map_name(hf, false)
}

/// Undoes llama.cpp's Q/K row permutation for one `[rows, cols]` matrix (a bias is `cols = 1`).
///
/// llama.cpp's convert does `w.reshape(n_head, 2, rows/n_head/2, cols).swapaxes(1, 2)
/// .reshape(rows, cols)`: within each head, row `i * half + j` (half `i` of the rotate-half
/// layout, pair `j`) moves to row `2 * j + i`. Here row `2 * j + i` goes back to `i * half + j`.
/// Callers guarantee `rows` is a multiple of `2 * n_head` (the shape was checked).
pub fn unpermute_rows(data: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    let head_dim = rows / n_head;
    let half = head_dim / 2;
    let mut out = vec![0.0; data.len()];
    for h in 0..n_head {
        for j in 0..half {
            for i in 0..2 {
                let src = (h * head_dim + 2 * j + i) * cols;
                let dst = (h * head_dim + i * half + j) * cols;
                out[dst..dst + cols].copy_from_slice(&data[src..src + cols]);
            }
        }
    }
    out
}

/// True when the file starts with the GGUF magic.
pub(super) fn has_magic(path: &Path) -> Result<bool> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    Ok(file.read_exact(&mut magic).is_ok() && &magic == b"GGUF")
}

/// llama.cpp's `general.file_type` (`LLAMA_FTYPE_*`) as a name, for [`LlamaConfig::dtype`].
fn file_type_name(t: u64) -> String {
    let name = match t {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        32 => "BF16",
        _ => return format!("file_type {t}"),
    };
    name.to_string()
}

/// First line of a candle error (candle appends a backtrace when RUST_BACKTRACE is set).
fn candle_msg(e: &candle_core::Error) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}

/// Typed access to GGUF metadata, naming the file in every error.
struct Meta<'a> {
    path: &'a Path,
    md: &'a HashMap<String, Value>,
}

impl Meta<'_> {
    fn missing(&self, key: &str) -> Error {
        Error::format(self.path, format!("missing metadata `{key}`"))
    }

    fn uint(&self, key: &str) -> Result<Option<u64>> {
        let Some(v) = self.md.get(key) else {
            return Ok(None);
        };
        let n = match *v {
            Value::U8(x) => Some(u64::from(x)),
            Value::U16(x) => Some(u64::from(x)),
            Value::U32(x) => Some(u64::from(x)),
            Value::U64(x) => Some(x),
            Value::I8(x) => u64::try_from(x).ok(),
            Value::I16(x) => u64::try_from(x).ok(),
            Value::I32(x) => u64::try_from(x).ok(),
            Value::I64(x) => u64::try_from(x).ok(),
            _ => None,
        };
        n.map(Some).ok_or_else(|| {
            Error::format(
                self.path,
                format!("metadata `{key}` must be a non-negative integer, got {v:?}"),
            )
        })
    }

    fn usize(&self, key: &str) -> Result<Option<usize>> {
        match self.uint(key)? {
            None => Ok(None),
            Some(n) => usize::try_from(n).map(Some).map_err(|_| {
                Error::format(self.path, format!("metadata `{key}` = {n} is too large"))
            }),
        }
    }

    fn req_usize(&self, key: &str) -> Result<usize> {
        self.usize(key)?.ok_or_else(|| self.missing(key))
    }

    fn token(&self, key: &str) -> Result<Option<u32>> {
        match self.uint(key)? {
            None => Ok(None),
            Some(n) => u32::try_from(n).map(Some).map_err(|_| {
                Error::format(
                    self.path,
                    format!("metadata `{key}` = {n} is not a token id"),
                )
            }),
        }
    }

    fn float(&self, key: &str) -> Result<Option<f64>> {
        let Some(v) = self.md.get(key) else {
            return Ok(None);
        };
        match *v {
            // GGUF stores eps and theta as f32; going through the shortest decimal form gives
            // the value the model was configured with (1e-5, not 9.99999974e-6).
            Value::F32(x) => Ok(Some(x.to_string().parse().unwrap_or(f64::from(x)))),
            Value::F64(x) => Ok(Some(x)),
            _ => match self.uint(key) {
                Ok(n) => Ok(n.map(|n| n as f64)),
                Err(_) => Err(Error::format(
                    self.path,
                    format!("metadata `{key}` must be a number, got {v:?}"),
                )),
            },
        }
    }

    fn string(&self, key: &str) -> Result<Option<&str>> {
        match self.md.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(Error::format(
                self.path,
                format!("metadata `{key}` must be a string, got {v:?}"),
            )),
        }
    }
}

/// One tensor located in the file: its names, type, shape and byte range, checked against the
/// file length.
struct Entry {
    hf: String,
    gguf: String,
    dtype: GgmlDType,
    shape: Vec<usize>,
    bytes: Range<usize>,
    /// `Some(n_head)` when the rows carry llama.cpp's Q/K permutation.
    unpermute_heads: Option<usize>,
}

/// An opened GGUF: the map, configuration and every needed tensor located.
struct Opened {
    map: memmap2::Mmap,
    config: LlamaConfig,
    entries: Vec<Entry>,
}

/// Locates a tensor's bytes and checks they lie inside the file (never trust the header: a
/// truncated download keeps a valid header).
fn locate(
    path: &Path,
    content: &Content,
    file_len: usize,
    gguf: &str,
) -> Result<(GgmlDType, Vec<usize>, Range<usize>)> {
    let info = content
        .tensor_infos
        .get(gguf)
        .ok_or_else(|| Error::format(path, format!("missing tensor `{gguf}`")))?;
    let dtype = info.ggml_dtype;
    let shape = info.shape.dims().to_vec();
    let corrupt = |what: String| Error::format(path, format!("corrupt tensor `{gguf}`: {what}"));
    let numel = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| corrupt(format!("shape {shape:?} overflows")))?;
    let (block, type_size) = (dtype.block_size(), dtype.type_size());
    // Quantised blocks run along rows (GGUF's innermost dimension); llama.cpp requires whole
    // blocks per row.
    let cols = shape.last().copied().unwrap_or(1);
    if cols % block != 0 {
        return Err(corrupt(format!(
            "rows of {cols} values are not whole {} blocks of {block}",
            type_name(dtype)
        )));
    }
    let start = usize::try_from(content.tensor_data_offset)
        .ok()
        .and_then(|base| base.checked_add(usize::try_from(info.offset).ok()?))
        .ok_or_else(|| corrupt(format!("offset {} is out of range", info.offset)))?;
    let size = (numel / block)
        .checked_mul(type_size)
        .ok_or_else(|| corrupt(format!("shape {shape:?} overflows")))?;
    let end = start
        .checked_add(size)
        .filter(|&end| end <= file_len)
        .ok_or_else(|| {
            Error::format(
                path,
                format!(
                    "truncated: tensor `{gguf}` needs bytes {start}..{} but the file has \
                 {file_len} bytes",
                    start as u128 + size as u128
                ),
            )
        })?;
    // candle reinterprets the bytes as blocks (2- or 4-byte aligned structs); the map is page
    // aligned, so an 8-aligned offset is enough. GGUF aligns tensor data to 32 bytes.
    if !matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) && start % 8 != 0 {
        return Err(corrupt(format!(
            "data at byte {start} is not aligned (GGUF aligns tensor data)"
        )));
    }
    Ok((dtype, shape, start..end))
}

/// Opens, parses and checks a GGUF file without converting any weight.
fn open(path: &Path) -> Result<Opened> {
    let map = map_file(path)?;
    if map.len() < 8 || &map[..4] != b"GGUF" {
        let found = match map.len() {
            0 => "it is empty".to_string(),
            n if n < 8 => format!("it is only {n} bytes"),
            _ => format!("it starts with \"{}\"", map[..4].escape_ascii()),
        };
        return Err(Error::format(
            path,
            format!("not a GGUF file: {found}, not the magic \"GGUF\""),
        ));
    }
    let version = u32::from_le_bytes([map[4], map[5], map[6], map[7]]);
    if version != 2 && version != 3 {
        return Err(Error::Unsupported {
            path: path.into(),
            reason: format!("GGUF version {version} (retune reads versions 2 and 3)"),
        });
    }
    // candle's parser checks lengths against the file, but a crafted header can still make it
    // panic (`general.alignment = 0` divides by zero); bad input must give an error instead.
    let parsed = std::panic::catch_unwind(|| Content::read(&mut Cursor::new(&map[..])))
        .map_err(|_| Error::format(path, "corrupt GGUF header (the parser gave up)"))?;
    let content = parsed.map_err(|e| {
        let msg = candle_msg(&e);
        if msg.contains("unknown dtype for tensor") {
            Error::Unsupported {
                path: path.into(),
                reason: format!(
                    "GGUF tensor type ({msg}); supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, \
                     Q8_0, Q2_K..Q6_K"
                ),
            }
        } else {
            Error::format(path, format!("truncated or corrupt GGUF header: {msg}"))
        }
    })?;
    let config = config_from_metadata(path, &content, &map)?;

    let llama_permuted = config.model_type == "llama";
    let mut entries = Vec::new();
    for (hf, expected) in config.tensor_shapes() {
        let gguf = gguf_name(&hf).ok_or_else(|| {
            Error::Invalid(format!(
                "internal: no GGUF name for Hugging Face tensor `{hf}`"
            ))
        })?;
        if !content.tensor_infos.contains_key(&gguf) {
            return Err(Error::format(
                path,
                format!("missing tensor `{gguf}` ({hf})"),
            ));
        }
        let (dtype, shape, bytes) = locate(path, &content, map.len(), &gguf)?;
        check_shape(path, &hf, &shape, &expected)?;
        let unpermute_heads = if !llama_permuted {
            None
        } else if hf.contains(".self_attn.q_proj.") {
            Some(config.num_attention_heads)
        } else if hf.contains(".self_attn.k_proj.") {
            Some(config.num_key_value_heads)
        } else {
            None
        };
        entries.push(Entry {
            hf,
            gguf,
            dtype,
            shape,
            bytes,
            unpermute_heads,
        });
    }
    Ok(Opened {
        map,
        config,
        entries,
    })
}

/// Builds the configuration from GGUF metadata (and the presence of `output.weight`, biases and
/// `rope_freqs.weight`).
fn config_from_metadata(path: &Path, content: &Content, map: &[u8]) -> Result<LlamaConfig> {
    let m = Meta {
        path,
        md: &content.metadata,
    };
    let arch = m
        .string("general.architecture")?
        .ok_or_else(|| m.missing("general.architecture"))?;
    let Some(&(_, architecture, model_type)) =
        SUPPORTED_ARCHITECTURES.iter().find(|(a, _, _)| *a == arch)
    else {
        let supported: Vec<_> = SUPPORTED_ARCHITECTURES.iter().map(|(a, _, _)| *a).collect();
        return Err(Error::Unsupported {
            path: path.into(),
            reason: format!(
                "GGUF architecture `{arch}`; supported: {}",
                supported.join(", ")
            ),
        });
    };
    let key = |k: &str| format!("{arch}.{k}");

    let hidden_size = m.req_usize(&key("embedding_length"))?;
    let num_attention_heads = m.req_usize(&key("attention.head_count"))?;
    let num_key_value_heads = m
        .usize(&key("attention.head_count_kv"))?
        .unwrap_or(num_attention_heads);
    let head_dim = match m.usize(&key("attention.key_length"))? {
        Some(d) => d,
        None if num_attention_heads == 0 => 0, // reported by `validate`
        None => hidden_size / num_attention_heads,
    };
    if let Some(v) = m.usize(&key("attention.value_length"))? {
        if v != head_dim {
            return Err(Error::Unsupported {
                path: path.into(),
                reason: format!("value head width {v} different from key head width {head_dim}"),
            });
        }
    }
    if let Some(rot) = m.usize(&key("rope.dimension_count"))? {
        if rot != head_dim {
            return Err(Error::Unsupported {
                path: path.into(),
                reason: format!("partial rotary embedding ({rot} of {head_dim} head dimensions)"),
            });
        }
    }
    let vocab_size = match m.usize(&key("vocab_size"))? {
        Some(v) => v,
        None => match content.metadata.get("tokenizer.ggml.tokens") {
            Some(Value::Array(tokens)) => tokens.len(),
            _ => {
                return Err(m.missing(&format!("{} (or tokenizer.ggml.tokens)", key("vocab_size"))))
            }
        },
    };
    let rope_theta = m.float(&key("rope.freq_base"))?.unwrap_or(10000.0);

    // RoPE scaling: parameterised kinds (linear, yarn, ...) are not implemented; Llama 3.1's is
    // stored as per-frequency divisors in `rope_freqs.weight`.
    if let Some(kind) = m.string(&key("rope.scaling.type"))? {
        if kind != "none" {
            return Err(Error::Unsupported {
                path: path.into(),
                reason: format!(
                    "RoPE scaling type `{kind}` ({}); supported: none, llama3",
                    key("rope.scaling.type")
                ),
            });
        }
    }
    let rope_scaling = if content.tensor_infos.contains_key("rope_freqs.weight") {
        let (dtype, shape, bytes) = locate(path, content, map.len(), "rope_freqs.weight")?;
        if dtype != GgmlDType::F32 || shape != [head_dim / 2] {
            return Err(Error::Unsupported {
                path: path.into(),
                reason: format!(
                    "`rope_freqs.weight` of type {} and shape {shape:?} (expected F32 [{}])",
                    type_name(dtype),
                    head_dim / 2
                ),
            });
        }
        let divisors = f32_from_le(&map[bytes]);
        llama3_from_rope_freqs(
            &divisors,
            rope_theta,
            head_dim,
            m.float(&key("rope.scaling.factor"))?,
            m.usize(&key("rope.scaling.original_context_length"))?,
        )
        .map_err(|reason| Error::Unsupported {
            path: path.into(),
            reason,
        })?
    } else {
        None
    };

    // Special tokens: llama.cpp stops generation on eos, eot and eom; keep all that exist.
    let mut eos_token_ids = Vec::new();
    for k in [
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.eom_token_id",
    ] {
        if let Some(id) = m.token(k)? {
            if !eos_token_ids.contains(&id) {
                eos_token_ids.push(id);
            }
        }
    }
    let has = |name: &str| content.tensor_infos.contains_key(name);
    let cfg = LlamaConfig {
        architecture: architecture.to_string(),
        model_type: model_type.to_string(),
        vocab_size,
        hidden_size,
        intermediate_size: m.req_usize(&key("feed_forward_length"))?,
        num_hidden_layers: m.req_usize(&key("block_count"))?,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        rms_norm_eps: m
            .float(&key("attention.layer_norm_rms_epsilon"))?
            .ok_or_else(|| m.missing(&key("attention.layer_norm_rms_epsilon")))?,
        rope_theta,
        rope_scaling,
        max_position_embeddings: m.req_usize(&key("context_length"))?,
        // llama.cpp's convert omits `output.weight` exactly when the head is tied.
        tie_word_embeddings: !has("output.weight"),
        qkv_bias: has("blk.0.attn_q.bias"),
        o_bias: has("blk.0.attn_output.bias"),
        mlp_bias: has("blk.0.ffn_gate.bias"),
        bos_token_id: m.token("tokenizer.ggml.bos_token_id")?,
        eos_token_ids,
        dtype: m.uint("general.file_type")?.map(file_type_name),
        sliding_window: None,
    };
    cfg.validate()
        .map_err(|reason| Error::format(path, reason))?;
    Ok(cfg)
}

/// Recovers [`RopeScaling::Llama3`] parameters from llama.cpp's `rope_freqs.weight` divisors.
///
/// llama.cpp writes, per frequency `f_i = theta^(-2i/d)` with wavelength `w_i = 2 pi / f_i`:
/// 1 if `w_i < L / high`, `factor` if `w_i > L / low`, else `1 / ((1 - s) / factor + s)` with
/// `s = (L / w_i - low) / (high - low)`. The parameters are not identifiable in general (the
/// divisors depend on them only through `s`, and only at d/2 points), but the model depends only
/// on the divisors, so any parameters that reproduce all of them are equivalent. Candidates, in
/// order: a least-squares fit of `s` on the interpolated frequencies (needs two; `L` from
/// `rope.scaling.original_context_length`, else 8192, Llama 3.1's); Llama 3.1's `low = 1`,
/// `high = 4` with that `L`; `low = 1`, `high = 4` with `L` solved from the one interpolated
/// frequency, or placed between the kept and divided bands when none is interpolated. The first
/// candidate reproducing every divisor to 1e-4 (relative) wins; `Ok(None)` when every divisor is 1.
pub fn llama3_from_rope_freqs(
    divisors: &[f32],
    theta: f64,
    head_dim: usize,
    factor: Option<f64>,
    original_context: Option<usize>,
) -> std::result::Result<Option<RopeScaling>, String> {
    let r: Vec<f64> = divisors.iter().map(|&x| f64::from(x)).collect();
    if r.iter().all(|&x| (x - 1.0).abs() < 1e-6) {
        return Ok(None);
    }
    let refuse = |why: String| {
        format!(
            "`rope_freqs.weight` (per-frequency RoPE divisors {divisors:?}) is not Llama 3 \
             scaling: {why}"
        )
    };
    if r.iter().any(|&x| !x.is_finite() || x < 1.0 - 1e-6) {
        return Err(refuse("a divisor is below 1 or not finite".into()));
    }
    let factor = factor.unwrap_or_else(|| r.iter().copied().fold(1.0, f64::max));
    if factor <= 1.0 {
        return Err(refuse("the factor is not above 1".into()));
    }
    let default_original = original_context.unwrap_or(8192);
    let wavelen: Vec<f64> = (0..r.len())
        .map(|i| 2.0 * std::f64::consts::PI * theta.powf((2 * i) as f64 / head_dim as f64))
        .collect();
    let tol = 1e-5;
    let kept = |ri: f64| ri <= 1.0 + tol;
    let divided = |ri: f64| ri >= factor * (1.0 - tol);
    // (1 / wavelength, s) on the interpolated band, s recovered from the divisor.
    let medium: Vec<(f64, f64)> = r
        .iter()
        .zip(&wavelen)
        .filter(|(&ri, _)| !kept(ri) && !divided(ri))
        .map(|(&ri, &w)| (1.0 / w, (1.0 / ri - 1.0 / factor) / (1.0 - 1.0 / factor)))
        .collect();

    let mut candidates: Vec<(f64, f64, usize)> = Vec::new();
    if medium.len() >= 2 {
        // s = a x + b with a = L / (high - low), b = -low / (high - low).
        let n = medium.len() as f64;
        let (mx, ms) = medium
            .iter()
            .fold((0.0, 0.0), |(a, b), (x, s)| (a + x / n, b + s / n));
        let (sxx, sxs) = medium.iter().fold((0.0, 0.0), |(a, b), (x, s)| {
            (a + (x - mx) * (x - mx), b + (x - mx) * (s - ms))
        });
        let a = sxs / sxx;
        let b = ms - a * mx;
        if a > 0.0 && b < 0.0 {
            let span = default_original as f64 / a;
            candidates.push((-b * span, -b * span + span, default_original));
        }
    }
    candidates.push((1.0, 4.0, default_original));
    match medium.as_slice() {
        [(x, s)] => {
            // s = (L x - 1) / 3  =>  L = (3 s + 1) / x.
            let original = ((3.0 * s + 1.0) / x).round();
            if original >= 1.0 {
                candidates.push((1.0, 4.0, original as usize));
            }
        }
        [] => {
            // Kept wavelengths must stay below L / 4, divided ones above L.
            let longest_kept = r
                .iter()
                .zip(&wavelen)
                .filter(|(&ri, _)| kept(ri))
                .map(|(_, &w)| w)
                .fold(0.0, f64::max);
            let shortest_divided = r
                .iter()
                .zip(&wavelen)
                .filter(|(&ri, _)| divided(ri))
                .map(|(_, &w)| w)
                .fold(f64::INFINITY, f64::min);
            let low_end = (4.0 * longest_kept).max(1.0);
            if low_end < shortest_divided {
                let original = if shortest_divided.is_finite() {
                    (low_end * shortest_divided).sqrt()
                } else {
                    2.0 * low_end
                };
                candidates.push((1.0, 4.0, original.round() as usize));
            }
        }
        _ => {}
    }

    // Accept only parameters that reproduce every divisor (transformers' formula).
    let reproduces = |low: f64, high: f64, original: usize| {
        let l = original as f64;
        r.iter().zip(&wavelen).all(|(&ri, &w)| {
            let predicted = if w < l / high {
                1.0
            } else if w > l / low {
                factor
            } else {
                let s = (l / w - low) / (high - low);
                1.0 / ((1.0 - s) / factor + s)
            };
            (predicted - ri).abs() <= 1e-4 * ri
        })
    };
    candidates
        .into_iter()
        .find(|&(low, high, original)| low > 0.0 && high > low && reproduces(low, high, original))
        .map(
            |(low_freq_factor, high_freq_factor, original_max_position_embeddings)| {
                Some(RopeScaling::Llama3 {
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    original_max_position_embeddings,
                })
            },
        )
        .ok_or_else(|| {
            refuse(format!(
                "no factor-{factor} Llama 3 parameters reproduce every divisor"
            ))
        })
}

/// Converts one located tensor to f32 in the Hugging Face layout.
fn read_tensor(path: &Path, map: &[u8], e: &Entry) -> Result<Vec<f32>> {
    let bytes = &map[e.bytes.clone()];
    let data = match e.dtype {
        GgmlDType::F32 => f32_from_le(bytes),
        GgmlDType::F16 => f16_from_le(bytes),
        GgmlDType::BF16 => bf16_from_le(bytes),
        q => {
            let numel = e.shape.iter().product::<usize>();
            // `locate` checked length and alignment: candle reinterprets these bytes as blocks.
            let wrap = |err: candle_core::Error| {
                Error::format(path, format!("tensor `{}`: {}", e.gguf, candle_msg(&err)))
            };
            let qt =
                ggml_file::qtensor_from_ggml(q, bytes, vec![numel], &Device::Cpu).map_err(wrap)?;
            qt.dequantize(&Device::Cpu)
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(wrap)?
        }
    };
    Ok(match e.unpermute_heads {
        Some(n_head) => {
            let cols = if e.shape.len() == 2 { e.shape[1] } else { 1 };
            unpermute_rows(&data, e.shape[0], cols, n_head)
        }
        None => data,
    })
}

fn dtypes(entries: &[Entry]) -> BTreeMap<String, String> {
    entries
        .iter()
        .map(|e| (e.hf.clone(), type_name(e.dtype).to_string()))
        .collect()
}

/// Loads a GGUF file (see the module docs): every tensor dequantised to f32, Q/K unpermuted.
pub fn load(path: &Path) -> Result<LoadedModel> {
    let opened = open(path)?;
    let tensors = opened
        .entries
        .par_iter()
        .map(|e| {
            let data = read_tensor(path, &opened.map, e)?;
            Ok((
                e.hf.clone(),
                HostTensor {
                    shape: e.shape.clone(),
                    data,
                },
            ))
        })
        .collect::<Result<BTreeMap<_, _>>>()?;
    Ok(LoadedModel {
        stored_dtypes: dtypes(&opened.entries),
        config: opened.config,
        tensors,
        format: ModelFormat::Gguf,
        files: vec![path.to_path_buf()],
    })
}

/// Loads a GGUF file for holding frozen (see [`super::held`]): quantised matrices keep their
/// blocks, Q/K rows unpermuted as whole rows of blocks.
pub fn load_held(path: &Path, hold: &Hold) -> Result<HeldModel> {
    let opened = open(path)?;
    let stored_dtypes = dtypes(&opened.entries);
    let sources = opened
        .entries
        .into_iter()
        .map(|e| SourceTensor {
            name: e.hf,
            file: 0,
            dtype: e.dtype,
            shape: e.shape,
            offset: e.bytes.start as u64,
            unpermute_heads: e.unpermute_heads,
        })
        .collect();
    drop(opened.map); // the tensors are read from the file, not through the map
    let files = vec![path.to_path_buf()];
    hold_tensors(
        opened.config,
        files,
        sources,
        hold,
        ModelFormat::Gguf,
        stored_dtypes,
    )
}

/// Reads metadata and tensor infos only (see [`super::inspect_model`]).
pub fn inspect(path: &Path) -> Result<ModelSummary> {
    let opened = open(path)?;
    Ok(ModelSummary {
        stored_dtypes: dtypes(&opened.entries),
        file_bytes: opened.map.len() as u64,
        config: opened.config,
        format: ModelFormat::Gguf,
        files: vec![path.to_path_buf()],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// llama.cpp's `permute`, written out: within each head, row `i * half + j` -> `2 * j + i`.
    fn permute(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
        let hd = rows / n_head;
        let half = hd / 2;
        let mut out = vec![0.0; w.len()];
        for h in 0..n_head {
            for i in 0..2 {
                for j in 0..half {
                    let src = (h * hd + i * half + j) * cols;
                    let dst = (h * hd + 2 * j + i) * cols;
                    out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
                }
            }
        }
        out
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        for (rows, cols, n_head) in [(12, 3, 3), (8, 5, 1), (16, 1, 2), (24, 4, 6)] {
            let w: Vec<f32> = (0..rows * cols).map(|x| x as f32).collect();
            let p = permute(&w, rows, cols, n_head);
            assert_ne!(
                p, w,
                "permutation should move rows ({rows}x{cols}, {n_head} heads)"
            );
            assert_eq!(unpermute_rows(&p, rows, cols, n_head), w);
        }
    }

    /// By hand: one head of width 4, rows [a0 a1 b0 b1] (halves a, b) are stored [a0 b0 a1 b1].
    #[test]
    fn unpermute_by_hand() {
        let stored = [10.0, 20.0, 11.0, 21.0];
        assert_eq!(
            unpermute_rows(&stored, 4, 1, 1),
            vec![10.0, 11.0, 20.0, 21.0]
        );
    }

    #[test]
    fn name_map_round_trips() {
        let pairs = [
            ("token_embd.weight", "model.embed_tokens.weight"),
            ("output_norm.weight", "model.norm.weight"),
            ("output.weight", "lm_head.weight"),
            (
                "blk.0.attn_norm.weight",
                "model.layers.0.input_layernorm.weight",
            ),
            (
                "blk.12.attn_q.bias",
                "model.layers.12.self_attn.q_proj.bias",
            ),
            (
                "blk.3.attn_output.weight",
                "model.layers.3.self_attn.o_proj.weight",
            ),
            (
                "blk.29.ffn_norm.weight",
                "model.layers.29.post_attention_layernorm.weight",
            ),
            (
                "blk.7.ffn_down.weight",
                "model.layers.7.mlp.down_proj.weight",
            ),
        ];
        for (g, h) in pairs {
            assert_eq!(hf_name(g).as_deref(), Some(h));
            assert_eq!(gguf_name(h).as_deref(), Some(g));
        }
        for unknown in [
            "rope_freqs.weight",
            "blk.x.attn_q.weight",
            "blk.1.attn_q.scale",
            "model.rotary_emb.inv_freq",
        ] {
            assert_eq!(hf_name(unknown), None, "{unknown}");
            assert_eq!(gguf_name(unknown), None, "{unknown}");
        }
    }

    /// llama.cpp's convert_hf_to_gguf rope factors for Llama 3 scaling, written out.
    fn llama_cpp_rope_factors(
        theta: f64,
        dim: usize,
        factor: f64,
        low: f64,
        high: f64,
        ctx: f64,
    ) -> Vec<f32> {
        (0..dim / 2)
            .map(|i| {
                let freq = 1.0 / theta.powf((2 * i) as f64 / dim as f64);
                let wavelen = 2.0 * std::f64::consts::PI / freq;
                let r = if wavelen < ctx / high {
                    1.0
                } else if wavelen > ctx / low {
                    factor
                } else {
                    let s = (ctx / wavelen - low) / (high - low);
                    1.0 / ((1.0 - s) / factor + s)
                };
                r as f32
            })
            .collect()
    }

    #[test]
    fn llama31_rope_freqs_give_back_the_parameters() {
        let r = llama_cpp_rope_factors(500000.0, 128, 8.0, 1.0, 4.0, 8192.0);
        let Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) = llama3_from_rope_freqs(&r, 500000.0, 128, None, None).unwrap()
        else {
            panic!("expected llama3 scaling")
        };
        assert_eq!(factor, 8.0);
        assert!((low_freq_factor - 1.0).abs() < 1e-3, "{low_freq_factor}");
        assert!((high_freq_factor - 4.0).abs() < 1e-3, "{high_freq_factor}");
        assert_eq!(original_max_position_embeddings, 8192);

        // Llama 3.2 (factor 32) with a declared original context.
        let r = llama_cpp_rope_factors(500000.0, 64, 32.0, 1.0, 4.0, 8192.0);
        assert!(llama3_from_rope_freqs(&r, 500000.0, 64, None, Some(8192))
            .unwrap()
            .is_some());

        // All ones: no scaling. Arbitrary divisors: refused with a reason.
        assert_eq!(
            llama3_from_rope_freqs(&[1.0; 32], 10000.0, 64, None, None).unwrap(),
            None
        );
        let odd: Vec<f32> = (0..32).map(|i| 1.0 + ((i * 7) % 5) as f32).collect();
        let err = llama3_from_rope_freqs(&odd, 10000.0, 64, None, None).unwrap_err();
        assert!(err.contains("is not Llama 3 scaling"), "{err}");

        // One interpolated frequency (head_dim 16, original context 64, as the llama3-tiny
        // fixture): the context is solved from it.
        let r = llama_cpp_rope_factors(500000.0, 16, 8.0, 1.0, 4.0, 64.0);
        assert_eq!(r.iter().filter(|&&x| x > 1.0 && x < 8.0).count(), 1);
        assert_eq!(
            llama3_from_rope_freqs(&r, 500000.0, 16, None, None).unwrap(),
            Some(RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 64
            })
        );
        // Other band edges (low 2, high 8) over many frequencies: equivalent parameters found.
        let r = llama_cpp_rope_factors(10000.0, 128, 4.0, 2.0, 8.0, 4096.0);
        let got = llama3_from_rope_freqs(&r, 10000.0, 128, None, Some(4096)).unwrap();
        let Some(RopeScaling::Llama3 {
            low_freq_factor,
            high_freq_factor,
            ..
        }) = got
        else {
            panic!()
        };
        assert!((low_freq_factor - 2.0).abs() < 1e-3 && (high_freq_factor - 8.0).abs() < 1e-3);
    }
}
