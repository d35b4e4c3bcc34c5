//! bf16 matrix products on the CPU with f32 accumulation.
//!
//! [`gemm_bf16`] computes `c[m, n] (+)= op(a) · op(b)` for f32 operands given as strided views
//! ([`MatRef`]), the same contract as `retune_core::ops::matmul`: the operands are rounded to
//! bf16 (round-to-nearest-even) while they are packed into the kernel's layout, the products
//! are summed in f32, and `c` is row-major f32 (`accumulate` adds into it).
//!
//! Three kernels, chosen once at run time by [`best_kernel`]:
//! - [`Kernel::Amx`]: Intel AMX tiles (`tdpbf16ps`), 32x32 blocks of `c` held in four tiles;
//! - [`Kernel::Avx512Bf16`]: `vdpbf16ps` on zmm registers, reading the same packed layout;
//! - [`Kernel::F32`]: the `gemm` crate on the f32 data as given (no bf16 rounding).
//!
//! [`PackedB`] holds a frozen right operand (a linear layer's weight) already converted and laid
//! out for the kernel, so [`gemm_packed`] repacks only the left operand, and the weight costs
//! half the memory of its f32 copy. [`PackedA`] holds a left operand converted once for several
//! products (one layer input read by several projections), and [`gemm_terms`] sums products
//! that share `m` and `n` in one pass over `c` (a base weight's product plus its LoRA branch:
//! each block of `c` stays in cache while every term is added into it).
//!
//! Work is split over blocks of `c` on rayon's global pool.
//!
//! ```
//! use retune_gemm::{gemm_bf16, gemm_packed, MatRef, PackedB};
//! let (m, k, n) = (2, 3, 2);
//! let x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]; // [m, k] activations
//! let w = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]; // [n, k] weight of a linear layer
//! let mut y = vec![0.0; m * n];
//! // y = x · w^T
//! gemm_bf16(&mut y, MatRef::row_major(&x, k), MatRef::transpose_of(&w, k), m, k, n, false);
//! assert_eq!(y, [1.0, 2.0, 4.0, 5.0]);
//! // The same weight packed once, then used with accumulation: y += x · w^T.
//! let packed = PackedB::from_nk(&w, n, k);
//! gemm_packed(&mut y, MatRef::row_major(&x, k), &packed, m, true);
//! assert_eq!(y, [2.0, 4.0, 8.0, 10.0]);
//! ```
//!
//! The bf16 kernels treat subnormal inputs as zero (as `tdpbf16ps` and `vdpbf16ps` do); the
//! conversion rounds to nearest even and keeps NaN and infinities.
//!
//! On the Sapphire Rapids machine this was written on, `vdpbf16ps` issued at a quarter of the
//! rate of an f32 FMA (half its flops), so there the AVX512-BF16 kernel is slower than
//! [`Kernel::F32`] (it still halves the operands' memory); it is meant for CPUs without AMX
//! whose bf16 dot product is the faster instruction.

#[cfg_attr(not(target_arch = "x86_64"), path = "unsupported.rs")]
mod amx;
#[cfg_attr(not(target_arch = "x86_64"), path = "unsupported.rs")]
mod avx512;
mod pack;

use rayon::prelude::*;
use std::sync::OnceLock;

pub use pack::round_to_bf16;

/// The compute kernel behind the products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// AMX tiles (`amx-tile` + `amx-bf16`, with the Linux permission for tile data).
    Amx,
    /// AVX512-BF16 dot products (`vdpbf16ps`).
    Avx512Bf16,
    /// f32 products by the `gemm` crate; operands are not rounded to bf16.
    F32,
}

impl Kernel {
    /// Every kernel, in the order [`best_kernel`] prefers them.
    pub const ALL: [Kernel; 3] = [Kernel::Amx, Kernel::Avx512Bf16, Kernel::F32];

    /// Whether this CPU (and OS) can run the kernel.
    pub fn is_available(self) -> bool {
        match self {
            Kernel::Amx => amx::available(),
            Kernel::Avx512Bf16 => avx512::available(),
            Kernel::F32 => true,
        }
    }

    /// The name used by the `RETUNE_GEMM` environment variable.
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Amx => "amx",
            Kernel::Avx512Bf16 => "avx512bf16",
            Kernel::F32 => "f32",
        }
    }

    /// Whether the kernel rounds operands to bf16 (and uses the packed bf16 layout).
    fn is_bf16(self) -> bool {
        self != Kernel::F32
    }
}

/// The kernel [`gemm_bf16`] and [`PackedB::new`] use: the fastest available one, unless the
/// environment variable `RETUNE_GEMM` (`amx`, `avx512bf16` or `f32`) names another available
/// one. Detected once per process.
pub fn best_kernel() -> Kernel {
    static BEST: OnceLock<Kernel> = OnceLock::new();
    *BEST.get_or_init(|| {
        let fastest = Kernel::ALL
            .into_iter()
            .find(|k| k.is_available())
            .unwrap_or(Kernel::F32);
        let Ok(wanted) = std::env::var("RETUNE_GEMM") else {
            return fastest;
        };
        match Kernel::ALL.into_iter().find(|k| k.name() == wanted.trim()) {
            Some(k) if k.is_available() => k,
            _ => {
                eprintln!(
                    "retune-gemm: RETUNE_GEMM={wanted} is not available here, using {}",
                    fastest.name()
                );
                fastest
            }
        }
    })
}

/// A read-only strided view of an f32 matrix: element `(i, j)` is `data[i * row_stride + j *
/// col_stride]`. The shape comes with the product that uses it, which checks the bounds.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A view with explicit strides (in elements).
    pub fn new(data: &'a [f32], row_stride: usize, col_stride: usize) -> Self {
        MatRef {
            data,
            row_stride,
            col_stride,
        }
    }

    /// A row-major matrix with `cols` columns, used as stored.
    pub fn row_major(data: &'a [f32], cols: usize) -> Self {
        Self::new(data, cols, 1)
    }

    /// The transpose of a row-major matrix with `stored_cols` columns: for `x · W^T` with `W`
    /// of shape `[n, k]`, the right operand is `MatRef::transpose_of(w, k)`.
    pub fn transpose_of(data: &'a [f32], stored_cols: usize) -> Self {
        Self::new(data, 1, stored_cols)
    }

    /// The view starting at element `(i, j)` (inside the data).
    fn block(self, i: usize, j: usize) -> Self {
        let start = i * self.row_stride + j * self.col_stride;
        Self::new(&self.data[start..], self.row_stride, self.col_stride)
    }

    /// Element `(i, j)`; the caller has checked the shape with [`MatRef::check`].
    #[inline(always)]
    fn at(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.row_stride + j * self.col_stride]
    }

    /// A row-major copy of the `rows x cols` view (checked with [`MatRef::check`]): rows
    /// copied whole when they are contiguous, a transposed view in 16 x 16 blocks (one line
    /// of each source row per block instead of one element), anything else element by element.
    fn to_row_major(self, rows: usize, cols: usize) -> Vec<f32> {
        let mut dense = vec![0.0f32; rows * cols];
        if rows == 0 || cols == 0 {
            return dense;
        }
        if self.col_stride == 1 {
            dense
                .par_chunks_mut(cols)
                .enumerate()
                .with_min_len(64)
                .for_each(|(i, row)| {
                    let start = i * self.row_stride;
                    row.copy_from_slice(&self.data[start..start + cols]);
                });
        } else if self.row_stride == 1 {
            // dense[i, j] = data[j * cs + i]: 16-row bands of the output, each filled by
            // walking its 16 source elements along j.
            const B: usize = 16;
            let cs = self.col_stride;
            dense
                .par_chunks_mut(B * cols)
                .enumerate()
                .for_each(|(band, out)| {
                    let i0 = band * B;
                    let bi = out.len() / cols;
                    for j0 in (0..cols).step_by(B) {
                        let bj = B.min(cols - j0);
                        for j in j0..j0 + bj {
                            let src = &self.data[j * cs + i0..j * cs + i0 + bi];
                            for (di, &v) in src.iter().enumerate() {
                                out[di * cols + j] = v;
                            }
                        }
                    }
                });
        } else {
            for (i, row) in dense.chunks_mut(cols).enumerate().take(rows) {
                for (j, x) in row.iter_mut().enumerate() {
                    *x = self.at(i, j);
                }
            }
        }
        dense
    }

    /// Panics unless every element of a `rows x cols` view lies inside `data`.
    fn check(&self, rows: usize, cols: usize, what: &str) {
        if rows == 0 || cols == 0 {
            return;
        }
        let last = (rows - 1).checked_mul(self.row_stride).and_then(|r| {
            (cols - 1)
                .checked_mul(self.col_stride)
                .and_then(|c| r.checked_add(c))
        });
        assert!(
            matches!(last, Some(l) if l < self.data.len()),
            "retune-gemm: {what} view of {rows}x{cols} (strides {}, {}) exceeds its {} elements",
            self.row_stride,
            self.col_stride,
            self.data.len()
        );
    }
}

/// Below this many multiply-adds a product runs on the calling thread (rayon overhead dominates).
const PAR_THRESHOLD: usize = 1 << 18;

/// `c[m, n] (+)= a[m, k] · b[k, n]` with the kernel from [`best_kernel`]; `a` and `b` are the
/// (possibly transposed) views `op(a)`, `op(b)`, and `c` is row-major with `m * n` elements.
pub fn gemm_bf16(
    c: &mut [f32],
    a: MatRef,
    b: MatRef,
    m: usize,
    k: usize,
    n: usize,
    accumulate: bool,
) {
    gemm_with(best_kernel(), c, a, b, m, k, n, accumulate)
}

/// [`gemm_bf16`] with an explicit kernel (for tests and benchmarks). Panics if the kernel is
/// not available on this machine.
#[allow(clippy::too_many_arguments)]
pub fn gemm_with(
    kernel: Kernel,
    c: &mut [f32],
    a: MatRef,
    b: MatRef,
    m: usize,
    k: usize,
    n: usize,
    accumulate: bool,
) {
    assert!(
        kernel.is_available(),
        "retune-gemm: kernel {kernel:?} is not available on this CPU"
    );
    a.check(m, k, "a");
    b.check(k, n, "b");
    if empty_product(c, m, k, n, accumulate) {
        return;
    }
    if !kernel.is_bf16() {
        gemm_f32(c, a, b, m, k, n, accumulate);
        return;
    }
    gemm_bf16_bounded(kernel, c, n, a, b, m, k, n, accumulate);
}

/// Elements of the largest operand one bf16 product packs at once: the size of the packing
/// buffers kept for reuse. A larger operand (an LM head of 49k rows, 54 MiB in bf16; its 24 MiB
/// logits gradient) is split, so its packing buffers are reused rather than allocated afresh
/// per call, and peak memory does not grow by the size of a packed head.
const MAX_PACK_ELEMS: usize = pack::SPARE_MAX_BYTES / 2;

/// Splits `x` into two parts, the first a multiple of the 32-wide block.
fn halves(x: usize) -> usize {
    (x / 2).div_ceil(BLOCK) * BLOCK
}

/// The bf16 product into `c` with row stride `ldc`, split (recursively, in halves) along the
/// dimension that shrinks an operand larger than [`MAX_PACK_ELEMS`]: `n` or `k` for `b`, `m`
/// or `k` for `a`. A split along `k` adds the second part into the first (f32 sums).
#[allow(clippy::too_many_arguments)]
fn gemm_bf16_bounded(
    kernel: Kernel,
    c: &mut [f32],
    ldc: usize,
    a: MatRef,
    b: MatRef,
    m: usize,
    k: usize,
    n: usize,
    accumulate: bool,
) {
    let (a_big, b_big) = (m * k > MAX_PACK_ELEMS, k * n > MAX_PACK_ELEMS);
    if b_big && n >= k && n > BLOCK {
        // The column halves interleave in memory: one after the other, each through `ldc`.
        let j = halves(n);
        gemm_bf16_bounded(kernel, c, ldc, a, b, m, k, j, accumulate);
        let b2 = b.block(0, j);
        gemm_bf16_bounded(kernel, &mut c[j..], ldc, a, b2, m, k, n - j, accumulate);
    } else if a_big && m >= k && m > BLOCK {
        let i = halves(m);
        let (top, bottom) = c.split_at_mut(i * ldc);
        gemm_bf16_bounded(kernel, top, ldc, a, b, i, k, n, accumulate);
        let a2 = a.block(i, 0);
        gemm_bf16_bounded(kernel, bottom, ldc, a2, b, m - i, k, n, accumulate);
    } else if (a_big || b_big) && k > BLOCK {
        let h = halves(k);
        gemm_bf16_bounded(kernel, c, ldc, a, b, m, h, n, accumulate);
        let (a2, b2) = (a.block(0, h), b.block(h, 0));
        gemm_bf16_bounded(kernel, c, ldc, a2, b2, m, k - h, n, true);
    } else {
        let packed_a = pack::pack_a(a, m, k);
        let packed_b = pack::pack_b(b, k, n);
        let term = (packed_a.as_slice(), packed_b.as_slice(), k);
        run_bf16_terms(kernel, c, ldc, &[term], m, n, accumulate);
        packed_a.recycle();
        packed_b.recycle();
    }
}

/// A right operand `b[k, n]` converted once for repeated products (a frozen weight).
pub struct PackedB {
    kernel: Kernel,
    k: usize,
    n: usize,
    data: PackedData,
}

/// A packed operand's elements.
enum PackedData {
    /// bf16 bits in the layout of its side ([`pack::pack_a`] or [`pack::pack_b`]).
    Bf16(pack::Packed),
    /// Row-major f32 for [`Kernel::F32`].
    F32(Vec<f32>),
}

impl PackedData {
    /// Hands a bf16 buffer back for the next products on this thread.
    fn recycle(self) {
        if let PackedData::Bf16(p) = self {
            p.recycle();
        }
    }
}

impl PackedB {
    /// Packs the `k x n` view `b` for the kernel from [`best_kernel`].
    pub fn new(b: MatRef, k: usize, n: usize) -> Self {
        Self::with_kernel(best_kernel(), b, k, n)
    }

    /// Packs a linear layer's weight `w[n, k]` for `x · w^T`.
    pub fn from_nk(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "retune-gemm: weight is not {n}x{k}");
        Self::new(MatRef::transpose_of(w, k), k, n)
    }

    /// Packs a row-major `b[k, n]`.
    pub fn from_kn(b: &[f32], k: usize, n: usize) -> Self {
        assert_eq!(b.len(), k * n, "retune-gemm: b is not {k}x{n}");
        Self::new(MatRef::row_major(b, n), k, n)
    }

    /// Packs `b` for an explicit kernel; panics if it is not available.
    pub fn with_kernel(kernel: Kernel, b: MatRef, k: usize, n: usize) -> Self {
        assert!(
            kernel.is_available(),
            "retune-gemm: kernel {kernel:?} is not available on this CPU"
        );
        b.check(k, n, "b");
        let data = if kernel.is_bf16() {
            let mut packed = pack::pack_b(b, k, n);
            packed.shrink_to_fit();
            PackedData::Bf16(packed)
        } else {
            PackedData::F32(b.to_row_major(k, n))
        };
        PackedB { kernel, k, n, data }
    }

    /// The inner dimension `k`.
    pub fn k(&self) -> usize {
        self.k
    }

    /// The output dimension `n`.
    pub fn n(&self) -> usize {
        self.n
    }

    /// The kernel the operand was packed for (and that [`gemm_packed`] runs).
    pub fn kernel(&self) -> Kernel {
        self.kernel
    }
}

impl PackedB {
    /// Packs the `k x n` view `b` for one or a few products, in a buffer reused from earlier
    /// products on this thread; hand it back with [`PackedB::recycle`] when done.
    pub fn transient(b: MatRef, k: usize, n: usize) -> Self {
        let kernel = best_kernel();
        if !kernel.is_bf16() {
            return Self::with_kernel(kernel, b, k, n);
        }
        b.check(k, n, "b");
        PackedB {
            kernel,
            k,
            n,
            data: PackedData::Bf16(pack::pack_b(b, k, n)),
        }
    }

    /// Hands the buffer back for the next products on this thread.
    pub fn recycle(self) {
        self.data.recycle();
    }

    /// Packs a linear layer's weight `w[n, k]` for both of its products in one read of `w`:
    /// returns the pack for the forward `x · w^T` (as [`PackedB::transient`] of
    /// `MatRef::transpose_of(w, k)`) and puts the one for the input gradient `dy · w` (as
    /// `transient` of `MatRef::row_major(w, k)`) into `backward`, reusing the buffer it holds.
    /// A layer recomputed for its backward reads each weight once instead of twice.
    pub fn transient_both_of_nk(
        w: &[f32],
        n: usize,
        k: usize,
        backward: &mut Option<PackedB>,
    ) -> PackedB {
        assert_eq!(w.len(), n * k, "retune-gemm: weight is not {n}x{k}");
        let kernel = best_kernel();
        let spare = backward.take().and_then(|b| match b.data {
            PackedData::Bf16(p) => Some(p),
            PackedData::F32(_) => None,
        });
        if !kernel.is_bf16() {
            *backward = Some(Self::with_kernel(kernel, MatRef::row_major(w, k), n, k));
            return Self::with_kernel(kernel, MatRef::transpose_of(w, k), k, n);
        }
        let (forward, back) = pack::pack_b_both_of_nk(w, n, k, spare);
        *backward = Some(PackedB {
            kernel,
            k: n,
            n: k,
            data: PackedData::Bf16(back),
        });
        PackedB {
            kernel,
            k,
            n,
            data: PackedData::Bf16(forward),
        }
    }
}

/// A left operand `a[m, k]` converted once for several products with the same `a` (the input
/// of a layer, read by several projections).
pub struct PackedA {
    kernel: Kernel,
    m: usize,
    k: usize,
    /// In the tile layout of [`pack::pack_a`], or row-major `[m, k]` f32.
    data: PackedData,
}

impl PackedA {
    /// Packs the `m x k` view `a` for the kernel from [`best_kernel`], in a buffer reused from
    /// earlier products on this thread.
    pub fn new(a: MatRef, m: usize, k: usize) -> Self {
        let kernel = best_kernel();
        a.check(m, k, "a");
        let data = if kernel.is_bf16() {
            PackedData::Bf16(pack::pack_a(a, m, k))
        } else {
            PackedData::F32(a.to_row_major(m, k))
        };
        PackedA { kernel, m, k, data }
    }

    /// Rows per tile of [`PackedA::row_tiles_mut`].
    pub const TILE_ROWS: usize = pack::TILE_MN;

    /// An `m x k` pack that its producer fills tile by tile ([`PackedA::row_tiles_mut`]) while
    /// the rows are in its cache, instead of reading them again for [`PackedA::from_rows`]:
    /// the same bits once every row `< m` is put. `None` when the kernel reads f32.
    pub fn for_rows(m: usize, k: usize) -> Option<Self> {
        let kernel = best_kernel();
        kernel.is_bf16().then(|| PackedA {
            kernel,
            m,
            k,
            data: PackedData::Bf16(pack::a_for_rows(m, k)),
        })
    }

    /// The tiles of a [`PackedA::for_rows`] pack, in order: tile `i` takes rows
    /// `TILE_ROWS i..TILE_ROWS (i + 1)` (those below `m`).
    pub fn row_tiles_mut(&mut self) -> rayon::slice::ChunksMut<'_, u16> {
        let tile_len = pack::k_tiles(self.k) * TILE_LEN;
        let tiles = self.m.div_ceil(pack::TILE_MN);
        match &mut self.data {
            PackedData::Bf16(p) => p.as_mut_slice()[..tiles * tile_len].par_chunks_mut(tile_len),
            PackedData::F32(_) => unreachable!("for_rows makes bf16 packs only"),
        }
    }

    /// Puts `row` (`k` values) as row `r` of a tile from [`PackedA::row_tiles_mut`].
    pub fn put_row(tile: &mut [u16], r: usize, row: &[f32]) {
        pack::put_a_row(tile, r, row);
    }

    /// The pack of this operand's transpose (`k x m`), from this pack: the left operand of a
    /// weight gradient `dY^T X` from the pack of `dY` for `dY W`, bit for bit the pack of the
    /// transposed view, without reading the f32 values again.
    pub fn transposed(&self) -> PackedA {
        let data = match &self.data {
            PackedData::Bf16(p) => PackedData::Bf16(pack::transpose_a(p, self.m, self.k)),
            PackedData::F32(dense) => {
                PackedData::F32(MatRef::transpose_of(dense, self.k).to_row_major(self.k, self.m))
            }
        };
        PackedA {
            kernel: self.kernel,
            m: self.k,
            k: self.m,
            data,
        }
    }

    /// Packs a row-major `a[m, k]`.
    pub fn from_rows(a: &[f32], m: usize, k: usize) -> Self {
        assert_eq!(a.len(), m * k, "retune-gemm: a is not {m}x{k}");
        Self::new(MatRef::row_major(a, k), m, k)
    }

    /// The operand's f32 rows `[m, k]`, when it was "packed" for [`Kernel::F32`] (which keeps
    /// them as they are); `None` for the bf16 kernels' tiles.
    pub fn f32_rows(&self) -> Option<&[f32]> {
        match &self.data {
            PackedData::F32(rows) => Some(rows),
            PackedData::Bf16(_) => None,
        }
    }

    /// Rows `m`.
    pub fn m(&self) -> usize {
        self.m
    }

    /// The inner dimension `k`.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Hands the buffer back for the next products on this thread.
    pub fn recycle(self) {
        self.data.recycle();
    }
}

/// `c[m, n] (+)= sum_i a_i · b_i` over the `terms` `(a_i [m, k_i], b_i [k_i, n])`, every
/// operand packed for the same kernel. Each block of `c` receives all terms in turn while it
/// is in cache; the result equals chaining [`gemm_packed`] calls term by term, bit for bit.
pub fn gemm_terms(c: &mut [f32], terms: &[(&PackedA, &PackedB)], accumulate: bool) {
    let Some((first, _)) = terms.first() else {
        panic!("retune-gemm: gemm_terms needs at least one term");
    };
    let (m, n) = (first.m, terms[0].1.n);
    for (a, b) in terms {
        assert!(
            a.m == m && b.n == n && a.k == b.k,
            "retune-gemm: term {}x{} · {}x{} does not fit {m}x{n}",
            a.m,
            a.k,
            b.k,
            b.n
        );
        assert!(
            a.kernel == first.kernel && b.kernel == first.kernel,
            "retune-gemm: the terms were packed for different kernels"
        );
    }
    let terms: Vec<_> = terms.iter().filter(|(a, _)| a.k > 0).collect();
    let k_total = terms.iter().map(|(a, _)| a.k).sum();
    if empty_product(c, m, k_total, n, accumulate) {
        return;
    }
    let mut accumulate = accumulate;
    let mut bf16_terms = Vec::new();
    for (a, b) in terms {
        match (&a.data, &b.data) {
            (PackedData::Bf16(pa), PackedData::Bf16(pb)) => {
                bf16_terms.push((pa.as_slice(), pb.as_slice(), a.k));
            }
            (PackedData::F32(da), PackedData::F32(db)) => {
                let (ar, br) = (MatRef::row_major(da, a.k), MatRef::row_major(db, n));
                gemm_f32(c, ar, br, m, a.k, n, accumulate);
                accumulate = true;
            }
            _ => unreachable!("operands of one kernel share a layout"),
        }
    }
    if !bf16_terms.is_empty() {
        run_bf16_terms(first.kernel, c, n, &bf16_terms, m, n, accumulate);
    }
}

/// Checks `c` is `[m, n]`, and finishes a product with no terms: nothing to write when `c` is
/// empty, zeros (or `c` as it is, accumulating) when `k == 0`. Returns whether it finished.
fn empty_product(c: &mut [f32], m: usize, k: usize, n: usize, accumulate: bool) -> bool {
    assert_eq!(
        c.len(),
        m * n,
        "retune-gemm: c has {} elements, expected {m}x{n}",
        c.len()
    );
    if m == 0 || n == 0 {
        return true;
    }
    if k == 0 && !accumulate {
        c.fill(0.0);
    }
    k == 0
}

/// `c[m, n] (+)= a[m, k] · b` with a prepacked right operand; runs the kernel `b` was packed for.
pub fn gemm_packed(c: &mut [f32], a: MatRef, b: &PackedB, m: usize, accumulate: bool) {
    let (k, n) = (b.k, b.n);
    a.check(m, k, "a");
    if empty_product(c, m, k, n, accumulate) {
        return;
    }
    match &b.data {
        // A left operand beyond the packing bound (an LM head's logits gradient, 256 x 49k)
        // goes in row blocks, as in `gemm_bf16_bounded`.
        PackedData::Bf16(_) if m * k > MAX_PACK_ELEMS && m > BLOCK => {
            let i = halves(m);
            let (top, bottom) = c.split_at_mut(i * n);
            gemm_packed(top, a, b, i, accumulate);
            gemm_packed(bottom, a.block(i, 0), b, m - i, accumulate);
        }
        PackedData::Bf16(packed_b) => {
            let packed_a = pack::pack_a(a, m, k);
            let term = (packed_a.as_slice(), packed_b.as_slice(), k);
            run_bf16_terms(b.kernel, c, n, &[term], m, n, accumulate);
            packed_a.recycle();
        }
        PackedData::F32(dense) => gemm_f32(c, a, MatRef::row_major(dense, n), m, k, n, accumulate),
    }
}

/// The f32 fallback: the `gemm` crate on the views as given.
fn gemm_f32(c: &mut [f32], a: MatRef, b: MatRef, m: usize, k: usize, n: usize, accumulate: bool) {
    let parallelism = if m.saturating_mul(k).saturating_mul(n) >= PAR_THRESHOLD {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: both views were bounds-checked for their shapes (MatRef::check) and c has m * n
    // elements, so every index gemm forms from these strides lies inside its slice.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// Rows (and columns) of `c` one kernel call computes: a 2x2 arrangement of 16x16 tiles.
pub(crate) const BLOCK: usize = 32;
/// Most blocks per task along m and along n: a task computes up to 256x128 of `c`, so its A
/// and B panels (`256 x k` and `128 x k` bf16) stay in the core's 2 MiB L2 cache. Tall tasks
/// read each B panel (the larger operand of the LM head) fewer times from memory.
const TASK_BLOCKS_M: usize = 8;
const TASK_BLOCKS_N: usize = 4;

/// Splits `blocks` into the fewest runs of at most `most`, of near-equal lengths; returns
/// (number of runs, blocks per run).
fn split(blocks: usize, most: usize) -> (usize, usize) {
    let runs = blocks.div_ceil(most);
    (runs, blocks.div_ceil(runs))
}

/// bf16 elements of one packed tile (16 x 32).
const TILE_LEN: usize = pack::TILE_MN * pack::TILE_K;

/// A raw pointer to an output shared by tasks that write disjoint parts of it (blocks of `c`,
/// k pairs of packed strips).
#[derive(Clone, Copy)]
pub(crate) struct SharedOut<T>(pub(crate) *mut T);
// SAFETY: the tasks sharing it write disjoint elements (see its uses), so none is shared.
unsafe impl<T> Send for SharedOut<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for SharedOut<T> {}

impl<T> SharedOut<T> {
    /// A method, so closures capture the whole (Sync) wrapper rather than its raw pointer.
    pub(crate) fn ptr(self) -> *mut T {
        self.0
    }
}

/// One product of [`run_bf16_terms`]: packed A, packed B and their inner size `k`.
type Term<'a> = (&'a [u16], &'a [u16], usize);

/// Runs a bf16 kernel over every 32x32 block of `c`, split into tasks on rayon's pool; each
/// block gets the terms' products in order (the first overwrites `c` unless `accumulate`).
fn run_bf16_terms(
    kernel: Kernel,
    c: &mut [f32],
    ldc: usize,
    terms: &[Term],
    m: usize,
    n: usize,
    accumulate: bool,
) {
    assert!(
        ldc >= n && c.len() >= (m - 1) * ldc + n,
        "retune-gemm: c is too small"
    );
    let (m_blocks, n_blocks) = (m.div_ceil(BLOCK), n.div_ceil(BLOCK));
    for &(packed_a, packed_b, k) in terms {
        let k_tiles = pack::k_tiles(k);
        assert!(packed_a.len() >= m_blocks * BLOCK * k_tiles * pack::TILE_K);
        assert!(packed_b.len() >= n_blocks * BLOCK * k_tiles * pack::TILE_K);
    }
    let work: usize = terms
        .iter()
        .map(|t| m.saturating_mul(t.2).saturating_mul(n))
        .sum();
    let (task_rows, rows_per_task) = split(m_blocks, TASK_BLOCKS_M);
    let (task_cols, cols_per_task) = split(n_blocks, TASK_BLOCKS_N);
    let out = SharedOut(c.as_mut_ptr());
    let task = |t: usize| {
        let (ti, tj) = (t / task_cols, t % task_cols);
        let bi_range = ti * rows_per_task..((ti + 1) * rows_per_task).min(m_blocks);
        let bj_range = tj * cols_per_task..((tj + 1) * cols_per_task).min(n_blocks);
        // Block columns outer: a B strip pair (32 x k bf16) stays in L1 while the task's block
        // rows pass over it. (Splitting k into L1-sized passes measured no faster here.)
        let blocks = bj_range.flat_map(move |bj| bi_range.clone().map(move |bi| (bi, bj)));
        let block_of = |((bi, bj), term): ((usize, usize), usize)| {
            let (i0, j0) = (bi * BLOCK, bj * BLOCK);
            let (packed_a, packed_b, k) = terms[term];
            let k_tiles = pack::k_tiles(k);
            let pair_stride = k_tiles * TILE_LEN;
            pack::BlockArgs {
                // Block row bi starts at m tile 2 bi, block column bj at strip 2 bj.
                a: packed_a[2 * bi * pair_stride..].as_ptr(),
                b: packed_b[2 * bj * pair_stride..].as_ptr(),
                k_tiles,
                pair_stride,
                // SAFETY: i0 < m and j0 < n, so the offset is inside c (asserted above).
                c: unsafe { out.ptr().add(i0 * ldc + j0) },
                ldc,
                rows: (m - i0).min(BLOCK),
                cols: (n - j0).min(BLOCK),
                accumulate: accumulate || term > 0,
            }
        };
        // Every term of a block before the next block: the block of c stays in L1.
        let blocks = blocks.flat_map(|blk| (0..terms.len()).map(move |t| (blk, t)));
        match kernel {
            // SAFETY: AMX availability was asserted by the callers (Kernel::is_available); the
            // blocks are inside the packed buffers (asserted above) and inside c, and tasks
            // cover disjoint blocks.
            Kernel::Amx => unsafe { amx::run_blocks(blocks.map(block_of)) },
            // SAFETY: as for AMX, with AVX512-BF16 availability.
            Kernel::Avx512Bf16 => unsafe { avx512::run_blocks(blocks.map(block_of)) },
            Kernel::F32 => unreachable!("the f32 kernel does not use packed bf16 operands"),
        }
    };
    let tasks = task_rows * task_cols;
    if work < PAR_THRESHOLD {
        (0..tasks).for_each(task);
    } else {
        (0..tasks).into_par_iter().with_max_len(1).for_each(task);
    }
}
