//! Loading a frozen base as it will be held: every matrix (linear layers, embedding, LM head)
//! in a storage type ([`StoredMatrix`]), read tensor by tensor from the file, never the whole
//! model in f32; norms and biases in f32.
//!
//! A matrix stored quantised in a GGUF keeps its blocks as they are. A float matrix (an HF
//! folder, a float GGUF) is quantised on load when [`Hold::quantize`] names a type, else held
//! as [`Hold::dense`] (bf16 under bf16 products: the same rounding the products apply, so the
//! same bits as packing the f32 weight). A conversion reads a tensor in parts of
//! [`PART_BYTES`], so the peak during loading stays near the final footprint.

use super::gguf::unpermute_rows;
use super::{HostTensor, ModelFormat};
use crate::config::LlamaConfig;
use crate::error::{Error, Result};
use crate::ops::stored::{stored_bytes, type_name, StoredMatrix};
use candle_core::quantized::GgmlDType;
use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// Bytes of a tensor converted at once.
const PART_BYTES: usize = 32 << 20;

/// How to hold a frozen base's matrices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hold {
    /// Quantise float matrices to this type on load (`None`: keep them dense).
    pub quantize: Option<GgmlDType>,
    /// The type of dense (float) matrices: bf16 or f32.
    pub dense: GgmlDType,
}

/// A tensor located in a weight file, as a loader found it.
pub(super) struct SourceTensor {
    /// Hugging Face name.
    pub name: String,
    /// Index into the loader's file list.
    pub file: usize,
    /// Type as stored.
    pub dtype: GgmlDType,
    /// `[rows, cols]` (HF layout) or `[len]`.
    pub shape: Vec<usize>,
    /// Byte offset in the file.
    pub offset: u64,
    /// `Some(n_head)` when the rows carry llama.cpp's Q/K permutation.
    pub unpermute_heads: Option<usize>,
}

/// A model read for holding frozen: see the module docs.
#[derive(Debug)]
pub struct HeldModel {
    /// The architecture and sizes.
    pub config: LlamaConfig,
    /// The norms and biases in f32, by Hugging Face name.
    pub vectors: BTreeMap<String, HostTensor>,
    /// The matrices, by Hugging Face name.
    pub matrices: BTreeMap<String, StoredMatrix>,
    /// The source format.
    pub format: ModelFormat,
    /// Every weight file read.
    pub files: Vec<PathBuf>,
    /// Hugging Face tensor name -> dtype as stored in the file.
    pub stored_dtypes: BTreeMap<String, String>,
}

impl HeldModel {
    /// Bytes of the matrices as held.
    pub fn matrix_bytes(&self) -> usize {
        self.matrices.values().map(StoredMatrix::byte_len).sum()
    }
}

/// The type a matrix stored as `src` is held in.
pub fn held_type(src: GgmlDType, hold: &Hold) -> GgmlDType {
    let float = matches!(src, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16);
    match (float, hold.quantize) {
        (false, _) => src,
        (true, Some(q)) => q,
        (true, None) => hold.dense,
    }
}

fn read_exact_at(file: &mut std::fs::File, path: &Path, offset: u64, buf: &mut [u8]) -> Result<()> {
    file.seek(SeekFrom::Start(offset))
        .and_then(|_| file.read_exact(buf))
        .map_err(|e| Error::io(path, e))
}

/// Reads every tensor of `sources` from `files` and holds it (see the module docs).
pub(super) fn hold_tensors(
    config: LlamaConfig,
    files: Vec<PathBuf>,
    sources: Vec<SourceTensor>,
    hold: &Hold,
    format: ModelFormat,
    stored_dtypes: BTreeMap<String, String>,
) -> Result<HeldModel> {
    let mut opened = files
        .iter()
        .map(|p| std::fs::File::open(p).map_err(|e| Error::io(p, e)))
        .collect::<Result<Vec<_>>>()?;
    let (mut vectors, mut matrices) = (BTreeMap::new(), BTreeMap::new());
    for src in sources {
        let (path, file) = (&files[src.file], &mut opened[src.file]);
        if let [rows, cols] = src.shape[..] {
            let m = hold_matrix(file, path, &src, rows, cols, held_type(src.dtype, hold))?;
            matrices.insert(src.name, m);
        } else {
            let len: usize = src.shape.iter().product();
            let mut m = StoredMatrix::zeroed(src.dtype, 1, len)
                .map_err(|e| Error::format(path, format!("tensor `{}`: {e}", src.name)))?;
            read_exact_at(file, path, src.offset, m.bytes_mut())?;
            let data = m.dequantize();
            vectors.insert(
                src.name,
                HostTensor {
                    shape: src.shape,
                    data,
                },
            );
        }
    }
    Ok(HeldModel {
        config,
        vectors,
        matrices,
        format,
        files,
        stored_dtypes,
    })
}

/// One matrix read and held as `target`, in parts when it is converted.
fn hold_matrix(
    file: &mut std::fs::File,
    path: &Path,
    src: &SourceTensor,
    rows: usize,
    cols: usize,
    target: GgmlDType,
) -> Result<StoredMatrix> {
    let bad = |e: String| {
        Error::format(
            path,
            format!(
                "tensor `{}` [{rows}, {cols}] as {}: {e}",
                src.name,
                type_name(target)
            ),
        )
    };
    let mut held = StoredMatrix::zeroed(target, rows, cols).map_err(bad)?;
    if src.dtype == target {
        read_exact_at(file, path, src.offset, held.bytes_mut())?;
    } else {
        let row_bytes = stored_bytes(src.dtype, 1, cols).max(1);
        let part_rows = (PART_BYTES / row_bytes).clamp(1, rows.max(1));
        let mut part = StoredMatrix::zeroed(src.dtype, part_rows, cols).map_err(bad)?;
        let mut values = vec![0.0f32; part_rows * cols];
        for start in (0..rows).step_by(part_rows) {
            let n = part_rows.min(rows - start);
            if n < part_rows {
                part = StoredMatrix::zeroed(src.dtype, n, cols).map_err(bad)?;
            }
            let offset = src.offset + (start * row_bytes) as u64;
            read_exact_at(file, path, offset, part.bytes_mut())?;
            let vals = &mut values[..n * cols];
            part.dequantize_rows(0..n, vals);
            held.set_rows(start, vals);
        }
    }
    if let Some(n_head) = src.unpermute_heads {
        let index: Vec<f32> = (0..rows).map(|i| i as f32).collect();
        let order: Vec<usize> = unpermute_rows(&index, rows, 1, n_head)
            .into_iter()
            .map(|i| i as usize)
            .collect();
        held.reorder_rows(&order);
    }
    Ok(held)
}
