//! A frozen matrix held once in its storage type, bf16 or GGML blocks (Q8_0, Q4_0, Q4_K, ...),
//! and the two products a linear layer needs from it: the forward `y = x W^T` and the input
//! gradient `dx = dy W`.
//!
//! `W [rows, cols]` is stored row by row, as GGUF and safetensors lay it out: a row is
//! `cols / block` whole blocks. A product never materialises `W` in f32: it dequantises a
//! chunk of rows (at most [`CHUNK_BYTES`] of f32) into a scratch buffer and multiplies that
//! chunk, on bf16 tiles when the product runs in bf16 ([`runs_in_bf16`]), else in f32.
//! - Forward: a chunk of rows is a block of output columns, so every output element sums the
//!   same terms in the same order as the product with the whole dequantised weight: the bits
//!   equal those of dequantising `W` to f32 and running the dense path.
//! - Input gradient: a chunk of rows is a slice of the inner dimension; the chunks' partial
//!   sums are added in f32, so the result differs from the dense product only by the order of
//!   those f32 additions (a few ulps of f32, far inside bf16 rounding).
//!
//! The chunk's f32 values are exactly what dequantising the whole matrix gives
//! ([`StoredMatrix::dequantize`]): the storage is the weight, with no second copy.

use super::matmul::{matmul_nt, matmul_views, runs_in_bf16, View};
use candle_core::quantized::k_quants::{self, GgmlType};
use candle_core::quantized::GgmlDType;
use rayon::prelude::*;
use retune_gemm::{gemm_terms, MatRef, PackedA, PackedB};
use std::ops::Range;

/// f32 bytes of one dequantised chunk of rows: large enough that the left operand is read a
/// few times per product, small enough to stay near the caches and out of the peak.
pub const CHUNK_BYTES: usize = 8 << 20;

/// The storage types a frozen matrix can have.
pub const STORED_TYPES: [GgmlDType; 13] = [
    GgmlDType::F32,
    GgmlDType::F16,
    GgmlDType::BF16,
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q5_1,
    GgmlDType::Q8_0,
    GgmlDType::Q2K,
    GgmlDType::Q3K,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

/// llama.cpp's name of a storage type (`Q4_K`, `BF16`, ...).
pub fn type_name(d: GgmlDType) -> &'static str {
    use GgmlDType::*;
    match d {
        F32 => "F32",
        F16 => "F16",
        BF16 => "BF16",
        Q4_0 => "Q4_0",
        Q4_1 => "Q4_1",
        Q5_0 => "Q5_0",
        Q5_1 => "Q5_1",
        Q8_0 => "Q8_0",
        Q8_1 => "Q8_1",
        Q2K => "Q2_K",
        Q3K => "Q3_K",
        Q4K => "Q4_K",
        Q5K => "Q5_K",
        Q6K => "Q6_K",
        Q8K => "Q8_K",
    }
}

/// The storage type named `name` (`q4_k`, `Q8_0`, `bf16`, case-insensitive), if retune holds
/// matrices in it.
pub fn type_from_name(name: &str) -> Option<GgmlDType> {
    STORED_TYPES
        .into_iter()
        .find(|&d| type_name(d).eq_ignore_ascii_case(name))
}

/// Bytes of `rows x cols` values stored as `dtype`.
pub fn stored_bytes(dtype: GgmlDType, rows: usize, cols: usize) -> usize {
    rows * cols / dtype.block_size() * dtype.type_size()
}

/// A `[rows, cols]` matrix held in its storage type, row by row.
pub struct StoredMatrix {
    dtype: GgmlDType,
    rows: usize,
    cols: usize,
    /// The stored bytes, in 8-byte words so that every block struct is aligned.
    words: Vec<u64>,
    bytes_len: usize,
}

impl std::fmt::Debug for StoredMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "StoredMatrix {{ {} [{}, {}] }}",
            type_name(self.dtype),
            self.rows,
            self.cols
        )
    }
}

/// Calls `$f::<BlockType>` for the block type of a storage type.
macro_rules! with_block_type {
    ($dtype:expr, $f:ident, $($arg:expr),*) => {
        match $dtype {
            GgmlDType::F32 => $f::<f32>($($arg),*),
            GgmlDType::F16 => $f::<half::f16>($($arg),*),
            GgmlDType::BF16 => $f::<half::bf16>($($arg),*),
            GgmlDType::Q4_0 => $f::<k_quants::BlockQ4_0>($($arg),*),
            GgmlDType::Q4_1 => $f::<k_quants::BlockQ4_1>($($arg),*),
            GgmlDType::Q5_0 => $f::<k_quants::BlockQ5_0>($($arg),*),
            GgmlDType::Q5_1 => $f::<k_quants::BlockQ5_1>($($arg),*),
            GgmlDType::Q8_0 => $f::<k_quants::BlockQ8_0>($($arg),*),
            GgmlDType::Q8_1 => $f::<k_quants::BlockQ8_1>($($arg),*),
            GgmlDType::Q2K => $f::<k_quants::BlockQ2K>($($arg),*),
            GgmlDType::Q3K => $f::<k_quants::BlockQ3K>($($arg),*),
            GgmlDType::Q4K => $f::<k_quants::BlockQ4K>($($arg),*),
            GgmlDType::Q5K => $f::<k_quants::BlockQ5K>($($arg),*),
            GgmlDType::Q6K => $f::<k_quants::BlockQ6K>($($arg),*),
            GgmlDType::Q8K => $f::<k_quants::BlockQ8K>($($arg),*),
        }
    };
}

/// The blocks of `bytes` (whole blocks of `B`, aligned for it).
fn blocks<B: GgmlType>(bytes: &[u8]) -> &[B] {
    let size = std::mem::size_of::<B>();
    assert!(
        bytes.len().is_multiple_of(size)
            && (bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<B>()),
        "stored matrix: bytes are not whole aligned blocks"
    );
    // SAFETY: the block types are plain-old-data structs of integers and halves (any bit
    // pattern is a value), the length is a whole number of blocks and the pointer is aligned.
    unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const B, bytes.len() / size) }
}

fn blocks_mut<B: GgmlType>(bytes: &mut [u8]) -> &mut [B] {
    let size = std::mem::size_of::<B>();
    assert!(
        bytes.len().is_multiple_of(size)
            && (bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<B>()),
        "stored matrix: bytes are not whole aligned blocks"
    );
    // SAFETY: as in `blocks`, borrowed mutably.
    unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr() as *mut B, bytes.len() / size) }
}

fn to_float<B: GgmlType>(bytes: &[u8], out: &mut [f32]) {
    B::to_float(blocks::<B>(bytes), out)
}

fn from_float<B: GgmlType>(values: &[f32], bytes: &mut [u8]) {
    B::from_float(values, blocks_mut::<B>(bytes))
}

impl StoredMatrix {
    /// A zeroed matrix of `dtype` for its reader to fill ([`StoredMatrix::bytes_mut`]); `None`
    /// names what does not fit: rows that are not whole blocks, or a type retune cannot hold.
    pub fn zeroed(dtype: GgmlDType, rows: usize, cols: usize) -> Result<Self, String> {
        if !STORED_TYPES.contains(&dtype) {
            return Err(format!("{} is not a storage type", type_name(dtype)));
        }
        let block = dtype.block_size();
        if !cols.is_multiple_of(block) {
            return Err(format!(
                "rows of {cols} values are not whole {} blocks of {block}",
                type_name(dtype)
            ));
        }
        let bytes_len = stored_bytes(dtype, rows, cols);
        Ok(StoredMatrix {
            dtype,
            rows,
            cols,
            words: vec![0u64; bytes_len.div_ceil(8)],
            bytes_len,
        })
    }

    /// The matrix stored in `bytes` (GGUF's or safetensors' layout of `dtype`).
    pub fn from_bytes(
        dtype: GgmlDType,
        rows: usize,
        cols: usize,
        bytes: &[u8],
    ) -> Result<Self, String> {
        let mut m = Self::zeroed(dtype, rows, cols)?;
        if bytes.len() != m.bytes_len {
            return Err(format!(
                "{} bytes for a {} [{rows}, {cols}] matrix, which needs {}",
                bytes.len(),
                type_name(dtype),
                m.bytes_len
            ));
        }
        m.bytes_mut().copy_from_slice(bytes);
        Ok(m)
    }

    /// `values [rows, cols]` quantised to `dtype` (llama.cpp's reference quantisation, row by
    /// row, in parallel).
    pub fn quantize(
        dtype: GgmlDType,
        rows: usize,
        cols: usize,
        values: &[f32],
    ) -> Result<Self, String> {
        assert_eq!(
            values.len(),
            rows * cols,
            "quantize: values are not [rows, cols]"
        );
        let mut m = Self::zeroed(dtype, rows, cols)?;
        m.set_rows(0, values);
        Ok(m)
    }

    /// Stores `values [n, cols]` as rows `start..start + n` (quantised to the matrix's type).
    pub fn set_rows(&mut self, start: usize, values: &[f32]) {
        let (cols, dtype, rb) = (self.cols, self.dtype, self.row_bytes());
        let n = values.len() / cols.max(1);
        assert!(
            values.len() == n * cols && start + n <= self.rows,
            "set_rows: {} values at row {start} of a [{}, {cols}] matrix",
            values.len(),
            self.rows
        );
        if rb == 0 {
            return;
        }
        self.bytes_mut()[start * rb..(start + n) * rb]
            .par_chunks_mut(rb)
            .zip(values.par_chunks(cols))
            .for_each(|(dst, src)| with_block_type!(dtype, from_float, src, dst));
    }

    /// The storage type.
    pub fn dtype(&self) -> GgmlDType {
        self.dtype
    }

    /// Rows (a linear layer's `d_out`).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns (a linear layer's `d_in`).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Bytes held.
    pub fn byte_len(&self) -> usize {
        self.bytes_len
    }

    fn row_bytes(&self) -> usize {
        stored_bytes(self.dtype, 1, self.cols)
    }

    /// The stored bytes.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: u64 words viewed as their bytes, within the allocation.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr() as *const u8, self.bytes_len) }
    }

    /// The stored bytes, for a reader to fill.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, borrowed mutably.
        unsafe {
            std::slice::from_raw_parts_mut(self.words.as_mut_ptr() as *mut u8, self.bytes_len)
        }
    }

    /// The stored bytes of `rows`.
    pub fn row_range_bytes(&self, rows: Range<usize>) -> &[u8] {
        let rb = self.row_bytes();
        &self.bytes()[rows.start * rb..rows.end * rb]
    }

    /// Puts the rows in the order `order` (row `i` becomes old row `order[i]`): GGUF's Q/K
    /// rows carry llama.cpp's RoPE permutation, whole rows of blocks.
    pub fn reorder_rows(&mut self, order: &[usize]) {
        assert_eq!(order.len(), self.rows, "reorder_rows: one index per row");
        let rb = self.row_bytes();
        let old = self.bytes().to_vec();
        let bytes = self.bytes_mut();
        for (i, &src) in order.iter().enumerate() {
            bytes[i * rb..(i + 1) * rb].copy_from_slice(&old[src * rb..(src + 1) * rb]);
        }
    }

    /// Dequantises `rows` into `out [rows.len(), cols]`, rows in parallel.
    pub fn dequantize_rows(&self, rows: Range<usize>, out: &mut [f32]) {
        assert!(
            rows.end <= self.rows && out.len() == rows.len() * self.cols,
            "dequantize_rows: rows {rows:?} of a [{}, {}] matrix into {} values",
            self.rows,
            self.cols,
            out.len()
        );
        let (rb, cols, dtype) = (self.row_bytes(), self.cols, self.dtype);
        if cols == 0 {
            return;
        }
        let src = self.row_range_bytes(rows);
        // Rows of a task: enough work to pay for the task.
        let per_task = (4096 / cols).max(1);
        out.par_chunks_mut(cols * per_task)
            .zip(src.par_chunks(rb * per_task))
            .for_each(|(o, s)| {
                for (orow, srow) in o.chunks_mut(cols).zip(s.chunks(rb)) {
                    with_block_type!(dtype, to_float, srow, orow);
                }
            });
    }

    /// Row `row` dequantised into `out [cols]` (an embedding lookup).
    pub fn dequantize_row(&self, row: usize, out: &mut [f32]) {
        assert!(
            row < self.rows && out.len() == self.cols,
            "dequantize_row: out of range"
        );
        let dtype = self.dtype;
        with_block_type!(dtype, to_float, self.row_range_bytes(row..row + 1), out);
    }

    /// The whole matrix in f32 (tests, merging).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.rows * self.cols];
        self.dequantize_rows(0..self.rows, &mut out);
        out
    }

    /// Rows per dequantised chunk: [`CHUNK_BYTES`] of f32, a multiple of 32 (a bf16 tile's
    /// depth, so the input gradient's chunks split the inner dimension on tile edges).
    fn chunk_rows(&self) -> usize {
        let rows = CHUNK_BYTES / (4 * self.cols.max(1));
        (rows / 32 * 32).clamp(32, self.rows.next_multiple_of(32).max(32))
    }

    /// Calls `f(rows, values)` for consecutive chunks of rows, dequantised into one scratch
    /// buffer reused from chunk to chunk.
    fn for_chunks(&self, mut f: impl FnMut(Range<usize>, &[f32])) {
        let step = self.chunk_rows();
        let mut scratch = vec![0.0f32; step.min(self.rows) * self.cols];
        for start in (0..self.rows).step_by(step) {
            let rows = start..(start + step).min(self.rows);
            let values = &mut scratch[..rows.len() * self.cols];
            self.dequantize_rows(rows.clone(), values);
            f(rows, values);
        }
    }
}

/// An extra product added to a stored forward's output in the same pass over it: a LoRA
/// branch's up product `(s x A^T) B^T`. Its right operand is packed chunk by chunk, for the
/// output columns of each chunk.
pub struct ExtraTerm<'a> {
    /// The left operand, packed `[m, k]`.
    pub a: &'a PackedA,
    /// The right operand `[k, n]` as an f32 view.
    pub b: MatRef<'a>,
    /// Inner size `k`.
    pub k: usize,
}

/// Copies `src [m, w]` into columns `cols` of `dst [m, n]`.
fn put_columns(dst: &mut [f32], src: &[f32], cols: Range<usize>, n: usize) {
    let w = cols.len();
    dst.par_chunks_mut(n)
        .zip(src.par_chunks(w))
        .with_min_len(16)
        .for_each(|(d, s)| d[cols.clone()].copy_from_slice(s));
}

/// `y[m, rows] = x[m, cols] · W^T (+ extra)`: the forward of a linear layer whose weight is
/// `w`. `x_packed`: `x` packed for bf16 products (the caller packs a layer input once for all
/// the projections that read it); without it, `x` is packed here when `m` rows run in bf16.
/// `extra` (its left operand packed) is a term with `n = rows`, added in the same pass.
pub fn stored_forward(
    y: &mut [f32],
    x: &[f32],
    x_packed: Option<&PackedA>,
    w: &StoredMatrix,
    m: usize,
    extra: Option<ExtraTerm>,
) {
    let (k, n) = (w.cols, w.rows);
    assert!(
        y.len() == m * n
            && (x.len() == m * k || x_packed.is_some_and(|p| p.m() == m && p.k() == k)),
        "stored_forward: shape mismatch"
    );
    // Tiles when the products run on a bf16 kernel; else (f32 precision, or the f32 kernel of
    // a CPU without AVX512-BF16 or AMX) each chunk's product reads it as it is, no copy.
    let tiles = bf16_kernel() && (x_packed.is_some() || runs_in_bf16(m));
    let own_pack = (tiles && x_packed.is_none()).then(|| PackedA::from_rows(x, m, k));
    let xp = x_packed.or(own_pack.as_ref());
    let x_rows = x_packed.and_then(PackedA::f32_rows).unwrap_or(x);
    let mut out = vec![0.0f32; m * w.chunk_rows().min(n)];
    w.for_chunks(|rows, values| {
        let nc = rows.len();
        let out = &mut out[..m * nc];
        // The extra term's right operand: the columns of this chunk.
        let extra_b = extra.as_ref().map(|e| {
            let b = MatRef::new(
                &e.b.data[rows.start * e.b.col_stride..],
                e.b.row_stride,
                e.b.col_stride,
            );
            (e, b)
        });
        match xp.filter(|_| tiles) {
            Some(xp) => {
                let wt = PackedB::transient(MatRef::transpose_of(values, k), k, nc);
                match extra_b {
                    None => gemm_terms(out, &[(xp, &wt)], false),
                    Some((e, b)) => {
                        let bt = PackedB::transient(b, e.k, nc);
                        gemm_terms(out, &[(xp, &wt), (e.a, &bt)], false);
                        bt.recycle();
                    }
                }
                wt.recycle();
            }
            None => {
                matmul_nt(out, x_rows, values, m, k, nc, false);
                if let Some((e, b)) = extra_b {
                    let a = e.a.f32_rows().expect("an f32-kernel pack keeps its rows");
                    let b = View::strided(b.data, b.row_stride, b.col_stride);
                    matmul_views(out, View::rows(a, e.k), b, m, e.k, nc, true);
                }
            }
        }
        put_columns(y, out, rows, n);
    });
    if let Some(p) = own_pack {
        p.recycle();
    }
}

/// Whether bf16 products run on a bf16 kernel (AMX or AVX512-BF16), which reads packed tiles.
fn bf16_kernel() -> bool {
    retune_gemm::best_kernel() != retune_gemm::Kernel::F32
}

/// `dx[m, cols] (+)= dy[m, rows] · W (+ extra)`: the input gradient of a linear layer whose
/// weight is `w` (added into `dx` when `accumulate`, else written over it). `extra` is a
/// packed term with `n = cols` (a LoRA branch's `dxa A`), added with the first chunk.
pub fn stored_backward(
    accumulate: bool,
    dx: &mut [f32],
    dy: &[f32],
    w: &StoredMatrix,
    m: usize,
    extra: Option<(&PackedA, &PackedB)>,
) {
    let (k, n) = (w.rows, w.cols);
    assert!(
        dx.len() == m * n && dy.len() == m * k,
        "stored_backward: shape mismatch"
    );
    if k == 0 {
        if !accumulate {
            dx.fill(0.0);
        }
        return;
    }
    let tiles = bf16_kernel() && runs_in_bf16(m);
    let mut extra = extra;
    w.for_chunks(|rows, values| {
        let acc = accumulate || rows.start > 0;
        let kc = rows.len();
        if tiles {
            let dyc = PackedA::new(MatRef::new(&dy[rows.start..], k, 1), m, kc);
            let wc = PackedB::transient(MatRef::row_major(values, n), kc, n);
            match extra.take() {
                None => gemm_terms(dx, &[(&dyc, &wc)], acc),
                Some(e) => gemm_terms(dx, &[(&dyc, &wc), e], acc),
            }
            wc.recycle();
            dyc.recycle();
        } else {
            let a = View::rows(&dy[rows.start..], k);
            matmul_views(dx, a, View::rows(values, n), m, kc, n, acc);
            if let Some(e) = extra.take() {
                gemm_terms(dx, &[e], true);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f32 / 1000.0
                    - 0.5
            })
            .collect()
    }

    #[test]
    fn quantize_then_dequantize_is_within_the_types_step() {
        // Rows of 256 (a K-quant super-block), values in [-0.5, 0.5): the bound is one step of
        // the type's grid there (Q4_0: d = 0.5 / 8 and only -8..7, so up to one whole step).
        let (rows, cols) = (3, 512);
        let v = values(rows * cols, 1);
        for (dtype, bound) in [
            (GgmlDType::F32, 0.0),
            (GgmlDType::F16, 3e-4),
            (GgmlDType::BF16, 2e-3),
            (GgmlDType::Q8_0, 4e-3),
            (GgmlDType::Q4_0, 0.0626),
            (GgmlDType::Q4_1, 0.0334),
            (GgmlDType::Q5_0, 0.0313),
            (GgmlDType::Q4K, 0.04),
            (GgmlDType::Q5K, 0.02),
            (GgmlDType::Q6K, 0.01),
        ] {
            let q = StoredMatrix::quantize(dtype, rows, cols, &v).unwrap();
            assert_eq!(q.byte_len(), stored_bytes(dtype, rows, cols));
            let back = q.dequantize();
            let err = v
                .iter()
                .zip(&back)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            eprintln!("{}: max error {err}", type_name(dtype));
            assert!(
                err <= bound,
                "{}: max error {err} > {bound}",
                type_name(dtype)
            );
            // Row by row gives the same values.
            let mut row = vec![0.0; cols];
            q.dequantize_row(2, &mut row);
            assert_eq!(row, back[2 * cols..]);
        }
    }

    #[test]
    fn q8_0_blocks_by_hand() {
        // One Q8_0 block: f16 scale 0.5, then 32 int8 quants: value = q * 0.5.
        let mut bytes = half::f16::from_f32(0.5).to_le_bytes().to_vec();
        bytes.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let q = StoredMatrix::from_bytes(GgmlDType::Q8_0, 1, 32, &bytes).unwrap();
        let want: Vec<f32> = (0..32).map(|i| (i as f32 - 16.0) * 0.5).collect();
        assert_eq!(q.dequantize(), want);
        let err = StoredMatrix::from_bytes(GgmlDType::Q8_0, 1, 32, &bytes[1..]).unwrap_err();
        assert!(
            err.contains("33 bytes") || err.contains("needs 34"),
            "{err}"
        );
        let err = StoredMatrix::zeroed(GgmlDType::Q4K, 2, 100).unwrap_err();
        assert!(err.contains("not whole Q4_K blocks of 256"), "{err}");
    }

    #[test]
    fn reorder_rows_moves_whole_rows() {
        let v = values(4 * 64, 3);
        let mut q = StoredMatrix::quantize(GgmlDType::Q8_0, 4, 64, &v).unwrap();
        let before = q.dequantize();
        q.reorder_rows(&[2, 0, 3, 1]);
        let after = q.dequantize();
        for (i, src) in [2, 0, 3, 1].into_iter().enumerate() {
            assert_eq!(
                after[i * 64..(i + 1) * 64],
                before[src * 64..(src + 1) * 64]
            );
        }
    }
}
