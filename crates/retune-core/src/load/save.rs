//! Writing: atomic files ([`write_atomic`]), streamed safetensors ([`write_safetensors`]) and
//! Hugging Face model folders ([`save_hf_folder`]) that transformers and retune both load.
//!
//! Every file is written to a temporary name in the target folder, flushed, fsynced and renamed
//! over the final name (then the folder is fsynced), so a crash leaves either the old file or
//! the new one, never half of one.
//!
//! [`save_hf_folder`] streams the weights: it computes the safetensors header from the shapes,
//! then converts and writes one tensor at a time, so no second copy of the model is built.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use crate::config::{LlamaConfig, RopeScaling};
use crate::error::{Error, Result};
use crate::model::Weights;
use crate::tokenizer::Tokenizer;

/// Writes `path` atomically: `write` fills a temporary file next to it, which is then flushed,
/// fsynced and renamed over `path`; the folder is fsynced last. On any error the temporary
/// file is removed and `path` is left as it was.
pub fn write_atomic(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| Error::Invalid(format!("{}: not a file path", path.display())))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let file = File::create(&tmp)?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        write(&mut w)?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    sync_dir(&dir);
    Ok(())
}

/// [`write_atomic`] of a byte string.
pub fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(path, |w| w.write_all(bytes))
}

/// [`write_atomic`] of a JSON value, pretty-printed with a final newline.
pub fn write_json_atomic(path: &Path, value: &Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(value)
        .map_err(|e| Error::Invalid(format!("{}: serialising JSON: {e}", path.display())))?;
    text.push('\n');
    write_file_atomic(path, text.as_bytes())
}

/// Makes a rename durable (a no-op where folders cannot be opened, e.g. Windows).
fn sync_dir(dir: &Path) {
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Storage dtype of a written checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SaveDtype {
    /// IEEE float32: exact.
    F32,
    /// bfloat16, rounded to nearest even: half the size, about 3 significant digits.
    Bf16,
}

impl SaveDtype {
    /// The safetensors dtype name (`F32`, `BF16`).
    pub fn safetensors_name(self) -> &'static str {
        match self {
            SaveDtype::F32 => "F32",
            SaveDtype::Bf16 => "BF16",
        }
    }

    /// The torch dtype name of config.json (`float32`, `bfloat16`).
    pub fn torch_name(self) -> &'static str {
        match self {
            SaveDtype::F32 => "float32",
            SaveDtype::Bf16 => "bfloat16",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            SaveDtype::F32 => 4,
            SaveDtype::Bf16 => 2,
        }
    }

    /// Rounds `values` in place to what this dtype stores (what a reader of the file gets back).
    pub fn round(self, values: &mut [f32]) {
        if self == SaveDtype::Bf16 {
            values
                .iter_mut()
                .for_each(|v| *v = half::bf16::from_f32(*v).to_f32());
        }
    }

    /// Appends `values` in this dtype, little-endian, to `out`.
    pub fn encode(self, values: &[f32], out: &mut Vec<u8>) {
        match self {
            SaveDtype::F32 => values
                .iter()
                .for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
            SaveDtype::Bf16 => values
                .iter()
                .for_each(|&v| out.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes())),
        }
    }
}

impl std::str::FromStr for SaveDtype {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(SaveDtype::F32),
            "bf16" | "bfloat16" => Ok(SaveDtype::Bf16),
            _ => Err(Error::Invalid(format!(
                "unknown dtype `{s}`: expected f32 or bf16"
            ))),
        }
    }
}

impl std::fmt::Display for SaveDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SaveDtype::F32 => "f32",
            SaveDtype::Bf16 => "bf16",
        })
    }
}

/// One tensor of a safetensors file to write: its name, shape and f32 values (stored as `dtype`).
pub struct TensorOut<'a> {
    /// Name in the file.
    pub name: String,
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Values, row-major; `data.len()` is the product of `shape`.
    pub data: &'a [f32],
}

/// Writes a safetensors file atomically, streaming: the header (with `metadata` as
/// `__metadata__`) is computed from the shapes, then each tensor is converted to `dtype` and
/// written in turn, in chunks; only one chunk of converted bytes exists at a time.
pub fn write_safetensors(
    path: &Path,
    tensors: &[TensorOut<'_>],
    dtype: SaveDtype,
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let mut header = Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), json!(metadata));
    }
    let mut offset = 0usize;
    for t in tensors {
        let numel: usize = t.shape.iter().product();
        if numel != t.data.len() {
            return Err(Error::Invalid(format!(
                "{}: tensor `{}` has {} values but shape {:?}",
                path.display(),
                t.name,
                t.data.len(),
                t.shape
            )));
        }
        if header.contains_key(&t.name) {
            return Err(Error::Invalid(format!(
                "{}: tensor `{}` given twice",
                path.display(),
                t.name
            )));
        }
        let len = numel * dtype.size();
        header.insert(
            t.name.clone(),
            json!({
                "dtype": dtype.safetensors_name(),
                "shape": t.shape,
                "data_offsets": [offset, offset + len],
            }),
        );
        offset += len;
    }
    let mut header = serde_json::to_vec(&Value::Object(header))
        .map_err(|e| Error::Invalid(format!("{}: safetensors header: {e}", path.display())))?;
    // Pad with spaces so the data starts 8-byte aligned (as the reference writer does).
    while header.len() % 8 != 0 {
        header.push(b' ');
    }
    write_atomic(path, |w| {
        w.write_all(&(header.len() as u64).to_le_bytes())?;
        w.write_all(&header)?;
        const CHUNK: usize = 1 << 16; // elements converted at once
        let mut buf = Vec::with_capacity(CHUNK * dtype.size());
        for t in tensors {
            for chunk in t.data.chunks(CHUNK) {
                buf.clear();
                dtype.encode(chunk, &mut buf);
                w.write_all(&buf)?;
            }
        }
        Ok(())
    })
}

/// The files [`save_hf_folder`] writes.
pub const HF_FOLDER_FILES: [&str; 5] = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
];

/// A single id, or a list when there are several (as transformers writes `eos_token_id`).
fn id_or_list(ids: &[u32]) -> Value {
    match ids {
        [] => Value::Null,
        [one] => json!(one),
        many => json!(many),
    }
}

/// `config.json` for `config` stored as `dtype`, readable by transformers 4.x and 5.x: the
/// RoPE base is written both as the 4.x top-level `rope_theta` (+ `rope_scaling`) and as the
/// 5.x `rope_parameters`, the dtype both as `torch_dtype` and `dtype`.
pub fn hf_config_json(config: &LlamaConfig, dtype: SaveDtype) -> Result<Value> {
    let c = config;
    let mut rope_parameters = Map::new();
    let rope_scaling = match &c.rope_scaling {
        None => {
            rope_parameters.insert("rope_type".into(), json!("default"));
            Value::Null
        }
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => {
            let s = json!({
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings,
            });
            rope_parameters.extend(s.as_object().cloned().unwrap_or_default());
            s
        }
    };
    rope_parameters.insert("rope_theta".into(), json!(c.rope_theta));

    let mut out = json!({
        "architectures": [c.architecture],
        "model_type": c.model_type,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "rope_scaling": rope_scaling,
        "rope_parameters": rope_parameters,
        "tie_word_embeddings": c.tie_word_embeddings,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": id_or_list(&c.eos_token_ids),
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": true,
        "torch_dtype": dtype.torch_name(),
        "dtype": dtype.torch_name(),
    });
    let obj = out.as_object_mut().expect("a JSON object");
    match c.model_type.as_str() {
        "llama" => {
            if c.qkv_bias != c.o_bias {
                return Err(Error::Invalid(format!(
                    "a llama config.json cannot express q/k/v biases ({}) different from the \
                     o_proj bias ({})",
                    c.qkv_bias, c.o_bias
                )));
            }
            obj.insert("attention_bias".into(), json!(c.qkv_bias));
            obj.insert("mlp_bias".into(), json!(c.mlp_bias));
            obj.insert("pretraining_tp".into(), json!(1));
        }
        "qwen2" => {
            if !c.qkv_bias || c.o_bias || c.mlp_bias {
                return Err(Error::Invalid(
                    "a qwen2 config.json implies q/k/v biases and no others".into(),
                ));
            }
            obj.insert(
                "use_sliding_window".into(),
                json!(c.sliding_window.is_some()),
            );
            obj.insert("sliding_window".into(), json!(c.sliding_window));
            obj.insert("max_window_layers".into(), json!(c.num_hidden_layers));
        }
        "mistral" => {
            if c.qkv_bias || c.o_bias || c.mlp_bias {
                return Err(Error::Invalid(
                    "a mistral config.json cannot express biases".into(),
                ));
            }
            obj.insert("sliding_window".into(), json!(c.sliding_window));
        }
        other => {
            return Err(Error::Invalid(format!(
                "cannot write a config.json for model_type `{other}`"
            )))
        }
    }
    Ok(out)
}

/// Checks that `weights` fit `config`: every tensor of [`LlamaConfig::tensor_shapes`], in order,
/// with its number of values. Returns the tensors to write.
fn weight_tensors<'a>(
    config: &LlamaConfig,
    weights: &'a Weights<f32>,
) -> Result<Vec<TensorOut<'a>>> {
    let shapes = config.tensor_shapes();
    let named = weights.named();
    let by_name: BTreeMap<&str, &[f32]> = named.iter().map(|(n, d)| (n.as_str(), *d)).collect();
    if by_name.len() != shapes.len() {
        return Err(Error::Invalid(format!(
            "the weights hold {} tensors but the configuration describes {}",
            by_name.len(),
            shapes.len()
        )));
    }
    shapes
        .into_iter()
        .map(|(name, shape)| {
            let data = *by_name
                .get(name.as_str())
                .ok_or_else(|| Error::Invalid(format!("the weights have no tensor `{name}`")))?;
            if data.len() != shape.iter().product::<usize>() {
                return Err(Error::Invalid(format!(
                    "tensor `{name}` holds {} values; the configuration says {shape:?}",
                    data.len()
                )));
            }
            Ok(TensorOut { name, shape, data })
        })
        .collect()
}

/// Writes a Hugging Face model folder: `config.json`, `generation_config.json`,
/// `model.safetensors` (Hugging Face names; no `lm_head.weight` when tied; stored as `dtype`,
/// streamed tensor by tensor), `tokenizer.json` and `tokenizer_config.json` (special tokens,
/// `add_bos_token`, `model_max_length`, chat template). Every file is written atomically.
///
/// The folder is created if needed; it may already hold these files (they are replaced), but
/// nothing else from a model (shards, an index, a `chat_template.jinja`, `.bin` weights) that a
/// loader would read instead of, or together with, the new files.
pub fn save_hf_folder(
    dir: &Path,
    config: &LlamaConfig,
    weights: &Weights<f32>,
    tokenizer: &Tokenizer,
    dtype: SaveDtype,
) -> Result<()> {
    let tensors = weight_tensors(config, weights)?;
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let stale = name.ends_with(".safetensors")
            || name.ends_with(".bin")
            || name.ends_with(".gguf")
            || name == "model.safetensors.index.json"
            || name == "pytorch_model.bin.index.json"
            || name == "chat_template.jinja"
            || name == "tokenizer.model"
            || name == "special_tokens_map.json";
        if stale && !HF_FOLDER_FILES.contains(&name.as_str()) {
            return Err(Error::format(
                entry.path(),
                "the output folder already holds model files that loaders would read together \
                 with (or instead of) the new ones: write to an empty folder",
            ));
        }
    }

    write_json_atomic(&dir.join("config.json"), &hf_config_json(config, dtype)?)?;
    let mut generation = Map::new();
    if let Some(bos) = config.bos_token_id {
        generation.insert("bos_token_id".into(), json!(bos));
    }
    if !config.eos_token_ids.is_empty() {
        generation.insert("eos_token_id".into(), id_or_list(&config.eos_token_ids));
    }
    write_json_atomic(
        &dir.join("generation_config.json"),
        &Value::Object(generation),
    )?;

    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    write_safetensors(&dir.join("model.safetensors"), &tensors, dtype, &metadata)?;

    tokenizer.save_tokenizer_json(&dir.join("tokenizer.json"))?;
    let mut tok_cfg = Map::new();
    tok_cfg.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    tok_cfg.insert("bos_token".into(), json!(tokenizer.bos_token));
    tok_cfg.insert("eos_token".into(), json!(tokenizer.eos_token));
    tok_cfg.insert("add_bos_token".into(), json!(tokenizer.add_bos));
    tok_cfg.insert("add_eos_token".into(), json!(false));
    tok_cfg.insert(
        "model_max_length".into(),
        json!(config.max_position_embeddings),
    );
    tok_cfg.insert("clean_up_tokenization_spaces".into(), json!(false));
    if let Some(t) = &tokenizer.chat_template {
        tok_cfg.insert("chat_template".into(), json!(t));
    }
    write_json_atomic(&dir.join("tokenizer_config.json"), &Value::Object(tok_cfg))?;
    Ok(())
}
