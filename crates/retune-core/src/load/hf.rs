//! Hugging Face model folders: `config.json` (+ optional `generation_config.json`) and
//! safetensors weights, either one `model.safetensors` or `model.safetensors.index.json` with
//! shards. Files are memory-mapped; F32, F16 and BF16 tensors are converted to f32 (exactly).

use super::held::{hold_tensors, HeldModel, Hold, SourceTensor};
use candle_core::quantized::GgmlDType;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};

use rayon::prelude::*;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use super::{
    bf16_from_le, check_shape, f16_from_le, f32_from_le, map_file, HostTensor, LoadedModel,
    ModelFormat, ModelSummary,
};
use crate::config::LlamaConfig;
use crate::error::{Error, Result};

/// File name of an unsharded checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// File name of a sharded checkpoint's index.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Reads a JSON file, naming it in every error.
fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::format(path, format!("invalid JSON: {e}")))
}

/// Reads `dir/config.json` and, when present, `dir/generation_config.json`, whose
/// `eos_token_id` takes precedence (as in transformers' generation) and whose `bos_token_id`
/// fills in a missing one.
pub fn read_config(dir: &Path) -> Result<LlamaConfig> {
    let path = dir.join("config.json");
    if !path.is_file() {
        return Err(Error::format(
            &path,
            "missing: a Hugging Face model folder needs config.json next to its safetensors",
        ));
    }
    let mut cfg = LlamaConfig::from_hf_json(&path, &read_json(&path)?)?;

    let gen_path = dir.join("generation_config.json");
    if gen_path.is_file() {
        let json = read_json(&gen_path)?;
        let token = |v: &Value| {
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| {
                    Error::format(
                        &gen_path,
                        format!("expected a token id (non-negative integer), got {v}"),
                    )
                })
        };
        match json.get("eos_token_id") {
            None | Some(Value::Null) => {}
            Some(Value::Array(ids)) => {
                cfg.eos_token_ids = ids.iter().map(token).collect::<Result<_>>()?;
            }
            Some(v) => cfg.eos_token_ids = vec![token(v)?],
        }
        if cfg.bos_token_id.is_none() {
            if let Some(v) = json.get("bos_token_id").filter(|v| !v.is_null()) {
                cfg.bos_token_id = Some(token(v)?);
            }
        }
    }
    Ok(cfg)
}

/// Where one needed tensor lives: file, stored dtype and its bytes' range in the map.
struct Entry {
    name: String,
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: std::ops::Range<usize>,
}

/// An opened checkpoint: the configuration, the mapped weight files and every needed tensor
/// located and checked (present, convertible dtype, right shape).
struct Checkpoint {
    config: LlamaConfig,
    files: Vec<PathBuf>,
    maps: Vec<memmap2::Mmap>,
    entries: Vec<Entry>,
}

/// A sharded checkpoint's index file and, per tensor name, the position of its shard in the
/// file list.
type Sharding = (PathBuf, BTreeMap<String, usize>);

/// Which files hold the weights, and which file each tensor is in (`None`: the single file).
fn weight_layout(dir: &Path) -> Result<(Vec<PathBuf>, Option<Sharding>)> {
    let single = dir.join(SINGLE_FILE);
    if single.is_file() {
        return Ok((vec![single], None));
    }
    let index = dir.join(INDEX_FILE);
    if !index.is_file() {
        if dir.join("pytorch_model.bin").exists()
            || dir.join("pytorch_model.bin.index.json").exists()
        {
            return Err(Error::Unsupported {
                path: dir.into(),
                reason: "PyTorch .bin weights; retune reads safetensors (convert with \
                         transformers: model.save_pretrained(dir, safe_serialization=True))"
                    .into(),
            });
        }
        return Err(Error::format(
            dir,
            "no weights: expected model.safetensors or model.safetensors.index.json",
        ));
    }
    let json = read_json(&index)?;
    let map = json
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| Error::format(&index, "missing required field `weight_map` (an object)"))?;
    let mut shard_names = BTreeSet::new();
    for (tensor, shard) in map {
        let shard = shard.as_str().ok_or_else(|| {
            Error::format(
                &index,
                format!("`weight_map.{tensor}` must be a file name, got {shard}"),
            )
        })?;
        // Shards are plain file names next to the index; refuse anything that leaves the folder.
        if !Path::new(shard)
            .components()
            .all(|c| matches!(c, Component::Normal(_)))
        {
            return Err(Error::format(
                &index,
                format!("shard `{shard}` is not a file name in this folder"),
            ));
        }
        shard_names.insert(shard.to_string());
    }
    let shard_names: Vec<String> = shard_names.into_iter().collect();
    let file_of = map
        .iter()
        .filter_map(|(tensor, shard)| {
            let i = shard_names
                .iter()
                .position(|s| Some(s.as_str()) == shard.as_str())?;
            Some((tensor.clone(), i))
        })
        .collect();
    let files = shard_names.iter().map(|s| dir.join(s)).collect();
    Ok((files, Some((index, file_of))))
}

/// Reads the configuration and the safetensors headers, and locates and checks every tensor.
fn open(dir: &Path) -> Result<Checkpoint> {
    if !dir.is_dir() {
        return Err(Error::format(dir, "not a folder"));
    }
    let config = read_config(dir)?;
    let (files, sharding) = weight_layout(dir)?;

    let mut maps = Vec::with_capacity(files.len());
    let mut headers = Vec::with_capacity(files.len());
    for path in &files {
        let map = map_file(path)?;
        let (header_len, metadata) = SafeTensors::read_metadata(&map).map_err(|e| {
            Error::format(path, format!("truncated or not a safetensors file: {e}"))
        })?;
        // Offsets in the header count from the end of the header (8-byte length + JSON).
        headers.push((8 + header_len, metadata));
        maps.push(map);
    }

    let mut entries = Vec::new();
    for (name, expected) in config.tensor_shapes() {
        let file = match &sharding {
            None => 0,
            Some((index, file_of)) => *file_of.get(&name).ok_or_else(|| {
                Error::format(
                    index,
                    format!("missing tensor `{name}` (not in `weight_map`)"),
                )
            })?,
        };
        let path = &files[file];
        let (data_start, metadata) = &headers[file];
        let info = metadata
            .info(&name)
            .ok_or_else(|| Error::format(path, format!("missing tensor `{name}`")))?;
        if !matches!(info.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
            return Err(Error::format(
                path,
                format!(
                    "tensor `{name}` has dtype {:?}; supported: F32, F16, BF16",
                    info.dtype
                ),
            ));
        }
        check_shape(path, &name, &info.shape, &expected)?;
        let (begin, end) = info.data_offsets;
        let bytes = data_start + begin..data_start + end;
        entries.push(Entry {
            name,
            file,
            dtype: info.dtype,
            shape: expected,
            bytes,
        });
    }
    Ok(Checkpoint {
        config,
        files,
        maps,
        entries,
    })
}

fn dtypes(entries: &[Entry]) -> BTreeMap<String, String> {
    entries
        .iter()
        .map(|e| (e.name.clone(), format!("{:?}", e.dtype)))
        .collect()
}

/// Loads a Hugging Face folder (see the module docs).
pub fn load(dir: &Path) -> Result<LoadedModel> {
    let ck = open(dir)?;
    let tensors = ck
        .entries
        .par_iter()
        .map(|e| {
            // `read_metadata` validated the offsets against the file length and the shape.
            let bytes = &ck.maps[e.file][e.bytes.clone()];
            let data = match e.dtype {
                Dtype::F32 => f32_from_le(bytes),
                Dtype::F16 => f16_from_le(bytes),
                _ => bf16_from_le(bytes),
            };
            (
                e.name.clone(),
                HostTensor {
                    shape: e.shape.clone(),
                    data,
                },
            )
        })
        .collect();
    Ok(LoadedModel {
        stored_dtypes: dtypes(&ck.entries),
        config: ck.config,
        tensors,
        format: ModelFormat::HfFolder,
        files: ck.files,
    })
}

/// Loads a Hugging Face folder for holding frozen (see [`super::held`]), tensor by tensor.
pub fn load_held(dir: &Path, hold: &Hold) -> Result<HeldModel> {
    let ck = open(dir)?;
    let stored_dtypes = dtypes(&ck.entries);
    drop(ck.maps); // the tensors are read from the files, not through the maps
    let sources = ck
        .entries
        .into_iter()
        .map(|e| SourceTensor {
            name: e.name,
            file: e.file,
            dtype: match e.dtype {
                Dtype::F32 => GgmlDType::F32,
                Dtype::F16 => GgmlDType::F16,
                _ => GgmlDType::BF16, // `open` admits F32, F16 and BF16 only
            },
            shape: e.shape,
            offset: e.bytes.start as u64,
            unpermute_heads: None,
        })
        .collect();
    hold_tensors(
        ck.config,
        ck.files,
        sources,
        hold,
        ModelFormat::HfFolder,
        stored_dtypes,
    )
}

/// Reads configuration and safetensors headers only (see [`super::inspect_model`]).
pub fn inspect(dir: &Path) -> Result<ModelSummary> {
    let ck = open(dir)?;
    Ok(ModelSummary {
        stored_dtypes: dtypes(&ck.entries),
        file_bytes: ck.maps.iter().map(|m| m.len() as u64).sum(),
        config: ck.config,
        format: ModelFormat::HfFolder,
        files: ck.files,
    })
}
