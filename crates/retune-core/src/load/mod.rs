//! Model loaders: a Hugging Face folder ([`hf`]) or a GGUF file ([`gguf`]) becomes a
//! [`LoadedModel`]: a [`LlamaConfig`] and every parameter as an f32 [`HostTensor`] under its
//! Hugging Face name, in the Hugging Face layout.
//!
//! Both loaders check every tensor [`LlamaConfig::tensor_shapes`] lists (present, right shape)
//! and report problems as typed [`Error`]s that name the file; bad input never panics.
//! [`inspect_model`] reads only headers and metadata, so it is fast on large models.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::LlamaConfig;
use crate::error::{Error, Result};

pub mod gguf;
pub mod held;
pub mod hf;
pub mod peft;
pub mod save;

#[cfg(test)]
mod tests;

/// A dense f32 tensor in host memory: row-major, Hugging Face layout (`[out, in]` for linear
/// weights, `[vocab, hidden]` for the embedding).
#[derive(Clone, PartialEq)]
pub struct HostTensor {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Elements, row-major; `data.len()` is the product of `shape`.
    pub data: Vec<f32>,
}

impl HostTensor {
    /// Number of elements (the product of the shape).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

// Printing a weight's values is never what one wants from `{:?}`.
impl std::fmt::Debug for HostTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "HostTensor {{ shape: {:?}, {} values }}",
            self.shape,
            self.data.len()
        )
    }
}

/// Where a model came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelFormat {
    /// A Hugging Face folder: `config.json` and safetensors (one file or index + shards).
    HfFolder,
    /// A single GGUF file (llama.cpp).
    Gguf,
}

/// A model read into memory: configuration and every parameter, dequantised to f32.
#[derive(Clone, Debug)]
pub struct LoadedModel {
    /// The architecture and sizes.
    pub config: LlamaConfig,
    /// Every tensor of [`LlamaConfig::tensor_shapes`], by Hugging Face name
    /// (e.g. `model.layers.0.self_attn.q_proj.weight`); nothing else.
    pub tensors: BTreeMap<String, HostTensor>,
    /// The source format.
    pub format: ModelFormat,
    /// Every weight file read, in a fixed order (for hashing in disclosure records).
    pub files: Vec<PathBuf>,
    /// Hugging Face tensor name -> dtype as stored (`BF16`, `F32`, `Q4_1`, `Q8_0`, ...).
    pub stored_dtypes: BTreeMap<String, String>,
}

/// What [`inspect_model`] finds without reading the weights themselves.
#[derive(Clone, Debug, Serialize)]
pub struct ModelSummary {
    /// The architecture and sizes.
    pub config: LlamaConfig,
    /// The source format.
    pub format: ModelFormat,
    /// Every weight file, as [`LoadedModel::files`].
    pub files: Vec<PathBuf>,
    /// Hugging Face tensor name -> dtype as stored, as [`LoadedModel::stored_dtypes`].
    pub stored_dtypes: BTreeMap<String, String>,
    /// Total size of the weight files in bytes.
    pub file_bytes: u64,
}

/// Which loader a path calls for.
fn detect(path: &Path) -> Result<ModelFormat> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        return Ok(ModelFormat::HfFolder);
    }
    let is_gguf_name = path
        .extension()
        .is_some_and(|e| e.to_string_lossy().eq_ignore_ascii_case("gguf"));
    if is_gguf_name || gguf::has_magic(path)? {
        return Ok(ModelFormat::Gguf);
    }
    Err(Error::format(
        path,
        "not a model: expected a Hugging Face model folder (config.json + safetensors) or a \
         .gguf file",
    ))
}

/// Loads a model: a directory is read as a Hugging Face folder, a `.gguf` file (or any file
/// starting with the GGUF magic) as GGUF. Every tensor is checked and converted to f32.
pub fn load_model(path: &Path) -> Result<LoadedModel> {
    match detect(path)? {
        ModelFormat::HfFolder => hf::load(path),
        ModelFormat::Gguf => gguf::load(path),
    }
}

/// Loads a model for holding it frozen ([`held`]): matrices in their storage type, read
/// tensor by tensor.
pub fn load_held(path: &Path, hold: &held::Hold) -> Result<held::HeldModel> {
    match detect(path)? {
        ModelFormat::HfFolder => hf::load_held(path, hold),
        ModelFormat::Gguf => gguf::load_held(path, hold),
    }
}

/// Reads configuration, tensor dtypes and shapes from headers and metadata only (no weight is
/// converted), checking that every tensor the configuration needs is present with its shape.
pub fn inspect_model(path: &Path) -> Result<ModelSummary> {
    match detect(path)? {
        ModelFormat::HfFolder => hf::inspect(path),
        ModelFormat::Gguf => gguf::inspect(path),
    }
}

/// Memory-maps a whole file read-only.
fn map_file(path: &Path) -> Result<memmap2::Mmap> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the map is read-only and private to this process; like every mmap-based loader
    // (safetensors, llama.cpp) we assume nobody truncates the file while it is being read.
    unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))
}

/// Checks a tensor's shape against the configuration's.
fn check_shape(path: &Path, name: &str, got: &[usize], expected: &[usize]) -> Result<()> {
    if got == expected {
        Ok(())
    } else {
        Err(Error::Shape {
            path: path.to_path_buf(),
            name: name.to_string(),
            got: got.to_vec(),
            expected: expected.to_vec(),
        })
    }
}

/// Little-endian IEEE f32 bytes to f32 (no alignment needed: the bytes may come from a map).
fn f32_from_le(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// Little-endian IEEE half bytes to f32 (exact).
fn f16_from_le(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(2)
        .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
        .collect()
}

/// Little-endian bfloat16 bytes to f32 (exact: bf16 is the top half of an f32).
fn bf16_from_le(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(2)
        .map(|b| f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16))
        .collect()
}
