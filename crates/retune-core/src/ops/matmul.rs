//! Row-major matrix products, thin safe wrappers over [`gemm::gemm`] (f32, f64) and
//! [`retune_gemm`] (bf16 inputs, f32 accumulation: AMX tiles where the CPU has them).
//!
//! The suffix names the layout of the two operands: `n` as stored, `t` transposed. Every
//! function computes `c[m, n] (+)= op(a) · op(b)` with inner size `k`; `accumulate` adds into
//! `c` instead of overwriting it (backward passes accumulate gradients).
//!
//! The precision of f32 products is process-wide ([`set_matmul_precision`]), like PyTorch's
//! `torch.set_float32_matmul_precision`: a run's `model.dtype` sets it once at its start.
//! f64 products (finite-difference checks) are always exact f64.

use super::adapted::Weight;
use super::stored::{stored_backward, stored_forward, StoredMatrix};
use crate::Float;
use gemm::Parallelism;
use retune_gemm::{MatRef, PackedA, PackedB};
use std::sync::atomic::{AtomicBool, Ordering};

/// How f32 matrix products compute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MatmulPrecision {
    /// f32 inputs and accumulation.
    F32,
    /// Inputs rounded to bf16, products accumulated in f32 (mixed precision, as autocast).
    Bf16,
}

static BF16: AtomicBool = AtomicBool::new(false);

/// Sets the precision of every f32 matrix product of this process from now on.
pub fn set_matmul_precision(p: MatmulPrecision) {
    BF16.store(p == MatmulPrecision::Bf16, Ordering::Relaxed);
}

/// The precision f32 matrix products use.
pub fn matmul_precision() -> MatmulPrecision {
    if BF16.load(Ordering::Relaxed) {
        MatmulPrecision::Bf16
    } else {
        MatmulPrecision::F32
    }
}

/// Products with fewer rows than this stay f32 under bf16 precision.
pub const BF16_MIN_ROWS: usize = 16;

/// Whether f32 products with `m` rows run in bf16 (the precision is bf16 and `m` is at least
/// [`BF16_MIN_ROWS`]).
pub fn runs_in_bf16(m: usize) -> bool {
    matmul_precision() == MatmulPrecision::Bf16 && m >= BF16_MIN_ROWS
}

/// `x[m, k]` packed once for several bf16 products that read it, when `T` is f32 and products
/// of `m` rows run in bf16; `None` otherwise (products then read `x` as it is).
pub fn pack_rows<T: Float>(x: &[T], m: usize, k: usize) -> Option<PackedA> {
    if !runs_in_bf16(m) {
        return None;
    }
    T::f32_slice(x).map(|x| PackedA::from_rows(x, m, k))
}

/// The empty pack of `x[m, k]` for its producer to fill row by row ([`PackedA::for_rows`]),
/// when [`pack_rows`] would pack `x` into bf16; `None` otherwise (the producer writes `x`
/// alone, and [`pack_rows`] packs it as usual).
pub fn pack_for_rows<T: Float>(m: usize, k: usize) -> Option<PackedA> {
    let is_f32 = T::f32_slice(&[T::zero()]).is_some();
    if !runs_in_bf16(m) || !is_f32 || k == 0 {
        return None;
    }
    PackedA::for_rows(m, k)
}

/// `c[m, n] (+)= a · b`, in bf16 when that is the precision and `T` is f32.
fn product<T: Float>(
    c: &mut [T],
    a: View<T>,
    b: View<T>,
    m: usize,
    k: usize,
    n: usize,
    accumulate: bool,
) {
    // A product with few rows (decoding one token at a time) is bound by reading the weight:
    // converting it to bf16 tiles would cost more than the f32 product itself.
    if runs_in_bf16(m) {
        if let (Some(a32), Some(b32)) = (T::f32_slice(a.data), T::f32_slice(b.data)) {
            let c32 = T::f32_slice_mut(c).expect("c has the operands' type");
            let a_ref = MatRef::new(a32, a.row_stride, a.col_stride);
            let b_ref = MatRef::new(b32, b.row_stride, b.col_stride);
            retune_gemm::gemm_bf16(c32, a_ref, b_ref, m, k, n, accumulate);
            return;
        }
    }
    // SAFETY: the callers assert the slice lengths that keep every index of the shapes with
    // these strides inside the slices.
    unsafe {
        gemm_strided(
            c,
            (
                a.data.as_ptr(),
                a.row_stride as isize,
                a.col_stride as isize,
            ),
            (
                b.data.as_ptr(),
                b.row_stride as isize,
                b.col_stride as isize,
            ),
            m,
            k,
            n,
            accumulate,
        )
    }
}

/// Below this many multiply-adds a product runs on the calling thread (rayon overhead dominates).
const PAR_THRESHOLD: usize = 1 << 18;

fn parallelism(m: usize, k: usize, n: usize) -> Parallelism {
    if m.saturating_mul(k).saturating_mul(n) >= PAR_THRESHOLD {
        Parallelism::Rayon(0)
    } else {
        Parallelism::None
    }
}

/// `c[m, n] (+)= lhs · rhs` for operands given by pointer and (row, column) strides.
///
/// # Safety
/// Every index `i * rs + j * cs` reached by the shapes must lie inside the slice the pointer
/// came from; the callers assert the slice lengths that guarantee it.
unsafe fn gemm_strided<T: Float>(
    c: &mut [T],
    a: (*const T, isize, isize),
    b: (*const T, isize, isize),
    m: usize,
    k: usize,
    n: usize,
    accumulate: bool,
) {
    let (a_ptr, a_rs, a_cs) = a;
    let (b_ptr, b_rs, b_cs) = b;
    // gemm computes dst = alpha * dst + beta * lhs * rhs, reading dst only when asked.
    gemm::gemm(
        m,
        n,
        k,
        c.as_mut_ptr(),
        1,
        n as isize,
        accumulate,
        a_ptr,
        a_cs,
        a_rs,
        b_ptr,
        b_cs,
        b_rs,
        T::one(),
        T::one(),
        false,
        false,
        false,
        parallelism(m, k, n),
    );
}

/// `c[m, n] (+)= a[m, k] · b[n, k]^T` (a linear layer's forward: `b` is a `[out, in]` weight).
pub fn matmul_nt<T: Float>(
    c: &mut [T],
    a: &[T],
    b: &[T],
    m: usize,
    k: usize,
    n: usize,
    accumulate: bool,
) {
    assert!(
        c.len() == m * n && a.len() == m * k && b.len() == n * k,
        "matmul_nt: shape mismatch"
    );
    // a[i, p] at i*k + p, b^T[p, j] = b[j, p] at j*k + p.
    product(
        c,
        View::rows(a, k),
        View::transposed(b, k),
        m,
        k,
        n,
        accumulate,
    )
}

/// `c[m, n] (+)= a[m, k] · b[k, n]`.
pub fn matmul_nn<T: Float>(
    c: &mut [T],
    a: &[T],
    b: &[T],
    m: usize,
    k: usize,
    n: usize,
    accumulate: bool,
) {
    assert!(
        c.len() == m * n && a.len() == m * k && b.len() == k * n,
        "matmul_nn: shape mismatch"
    );
    // a[i, p] at i*k + p, b[p, j] at p*n + j.
    product(c, View::rows(a, k), View::rows(b, n), m, k, n, accumulate)
}

/// A matrix operand read in place: element `(i, j)` is `data[i * row_stride + j *
/// col_stride]`, so a block, one head's rows or the transpose of a larger row-major matrix
/// needs no copy.
#[derive(Clone, Copy, Debug)]
pub struct View<'a, T> {
    data: &'a [T],
    row_stride: usize,
    col_stride: usize,
}

impl<'a, T> View<'a, T> {
    /// Rows `row_stride` apart, columns contiguous (from `data`'s first element).
    pub fn rows(data: &'a [T], row_stride: usize) -> Self {
        View {
            data,
            row_stride,
            col_stride: 1,
        }
    }

    /// Explicit strides: element `(i, j)` is `data[i * row_stride + j * col_stride]`.
    pub fn strided(data: &'a [T], row_stride: usize, col_stride: usize) -> Self {
        View {
            data,
            row_stride,
            col_stride,
        }
    }

    /// The transpose of [`View::rows`]: element `(i, j)` is `data[j * stride + i]`.
    pub fn transposed(data: &'a [T], stride: usize) -> Self {
        View {
            data,
            row_stride: 1,
            col_stride: stride,
        }
    }

    /// Panics unless every element of a `rows x cols` view lies inside `data`.
    fn check(&self, rows: usize, cols: usize) {
        if rows == 0 || cols == 0 {
            return;
        }
        let last = (rows - 1) * self.row_stride + (cols - 1) * self.col_stride;
        assert!(
            last < self.data.len(),
            "matmul_views: view outside its data"
        );
    }
}

/// `c[m, n] (+)= a · b` for an `m x k` view `a` and a `k x n` view `b`.
pub fn matmul_views<T: Float>(
    c: &mut [T],
    a: View<T>,
    b: View<T>,
    m: usize,
    k: usize,
    n: usize,
    accumulate: bool,
) {
    assert_eq!(c.len(), m * n, "matmul_views: c must be [m, n]");
    a.check(m, k);
    b.check(k, n);
    product(c, a, b, m, k, n, accumulate)
}

/// `c[m, n] (+)= a[k, m]^T · b[k, n]` (a weight gradient: activations' rows are the inner index).
pub fn matmul_tn<T: Float>(
    c: &mut [T],
    a: &[T],
    b: &[T],
    m: usize,
    k: usize,
    n: usize,
    accumulate: bool,
) {
    assert!(
        c.len() == m * n && a.len() == k * m && b.len() == k * n,
        "matmul_tn: shape mismatch"
    );
    // a^T[i, p] = a[p, i] at p*m + i, b[p, j] at p*n + j.
    product(
        c,
        View::transposed(a, m),
        View::rows(b, n),
        m,
        k,
        n,
        accumulate,
    )
}

/// A frozen weight `w[d_out, d_in]` as a model holds it for the two products that read it:
/// `x · w^T` (forward) and `dy · w` (input gradient).
pub enum FrozenWeight {
    /// bf16 packs made once, one per product, so no product converts the weight again (for
    /// the 49k x 576 LM head that conversion costs more than the product itself). Without the
    /// backward pack, the input gradient packs the f32 values on every call.
    Packs {
        /// `w^T` as the `[d_in, d_out]` right operand of the forward `x · w^T`.
        forward: PackedB,
        /// `w` as the `[d_out, d_in]` right operand of the input gradient `dy · w`.
        backward: Option<PackedB>,
    },
    /// Held once in its storage type (bf16, GGML blocks): both products dequantise it chunk
    /// by chunk ([`super::stored`]).
    Stored(StoredMatrix),
}

impl std::fmt::Debug for FrozenWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrozenWeight::Packs { forward, .. } => {
                write!(f, "Packs [{}, {}]", forward.n(), forward.k())
            }
            FrozenWeight::Stored(s) => s.fmt(f),
        }
    }
}

impl FrozenWeight {
    /// Packs `w[d_out, d_in]` for the kernel of [`retune_gemm::best_kernel`], for the forward
    /// and, when `with_backward`, for the input gradient.
    pub fn packed(w: &[f32], d_out: usize, d_in: usize, with_backward: bool) -> Self {
        FrozenWeight::Packs {
            forward: PackedB::from_nk(w, d_out, d_in),
            backward: with_backward.then(|| PackedB::from_kn(w, d_out, d_in)),
        }
    }

    /// The weight as the forward product reads it.
    pub fn forward(&self) -> Weight<'_> {
        match self {
            FrozenWeight::Packs { forward, .. } => Weight::Packed(forward),
            FrozenWeight::Stored(s) => Weight::Stored(s),
        }
    }

    /// The weight as the input gradient reads it; `None`: packs without the backward one
    /// (the product then packs the f32 values).
    pub fn backward(&self) -> Option<Weight<'_>> {
        match self {
            FrozenWeight::Packs { backward, .. } => backward.as_ref().map(Weight::Packed),
            FrozenWeight::Stored(s) => Some(Weight::Stored(s)),
        }
    }

    /// The storage, when the weight is held in it.
    pub fn stored(&self) -> Option<&StoredMatrix> {
        match self {
            FrozenWeight::Stored(s) => Some(s),
            FrozenWeight::Packs { .. } => None,
        }
    }

    /// Bytes held.
    pub fn byte_len(&self) -> usize {
        let packed = |p: &PackedB| 2 * p.k().next_multiple_of(32) * p.n().next_multiple_of(32);
        match self {
            FrozenWeight::Packs { forward, backward } => {
                packed(forward) + backward.as_ref().map_or(0, packed)
            }
            FrozenWeight::Stored(s) => s.byte_len(),
        }
    }
}

/// `c[m, n] (+)= a[m, k] · w^T` for a frozen weight `w[n, k]` (see [`FrozenWeight`]), which
/// exists only for f32 models, so `T` must be f32.
pub fn matmul_frozen_nt<T: Float>(c: &mut [T], a: &[T], w: &FrozenWeight, m: usize) {
    let (a32, c32) = (T::f32_slice(a), T::f32_slice_mut(c));
    let (Some(a32), Some(c32)) = (a32, c32) else {
        panic!("matmul_frozen_nt: frozen weights are f32, the operands must be too");
    };
    match w.forward() {
        Weight::Packed(p) => matmul_packed(c32, a32, p, m, false),
        Weight::Stored(s) => stored_forward(c32, a32, None, s, m, None),
        Weight::Values(_) => unreachable!("a frozen weight is packed or stored"),
    }
}

/// `c[m, k] += a[m, n] · w` for a frozen weight `w[n, k]` with its input gradient's operand
/// ([`FrozenWeight::backward`]); returns false (and computes nothing) when it has none.
pub fn matmul_frozen_nn<T: Float>(c: &mut [T], a: &[T], w: &FrozenWeight, m: usize) -> bool {
    let (a32, c32) = (T::f32_slice(a), T::f32_slice_mut(c));
    let (Some(a32), Some(c32)) = (a32, c32) else {
        panic!("matmul_frozen_nn: frozen weights are f32, the operands must be too");
    };
    match w.backward() {
        Some(Weight::Packed(p)) => matmul_packed(c32, a32, p, m, true),
        Some(Weight::Stored(s)) => stored_backward(true, c32, a32, s, m, None),
        _ => return false,
    }
    true
}

/// `c[m, n] (+)= a[m, k] · b` with a prepacked right operand (see [`FrozenWeight`]).
pub fn matmul_packed(c: &mut [f32], a: &[f32], b: &PackedB, m: usize, accumulate: bool) {
    assert!(
        a.len() == m * b.k() && c.len() == m * b.n(),
        "matmul_packed: shape mismatch"
    );
    retune_gemm::gemm_packed(c, MatRef::row_major(a, b.k()), b, m, accumulate);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{max_rel_diff, randv};

    /// Naive `c[i, j] = sum_p a(i, p) * b(p, j)` with accessor closures.
    fn naive(
        m: usize,
        k: usize,
        n: usize,
        a: impl Fn(usize, usize) -> f64,
        b: impl Fn(usize, usize) -> f64,
    ) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a(i, p) * b(p, j)).sum();
            }
        }
        c
    }

    /// Small (serial gemm) and large (rayon gemm) shapes, odd sizes included.
    const SHAPES: [(usize, usize, usize); 4] = [(3, 5, 7), (1, 9, 1), (17, 33, 9), (70, 65, 80)];

    #[test]
    fn matmul_nt_matches_naive() {
        for (m, k, n) in SHAPES {
            let (a, b, c0) = (randv(m * k, 1), randv(n * k, 2), randv(m * n, 3));
            let want = naive(m, k, n, |i, p| a[i * k + p], |p, j| b[j * k + p]);
            let mut c = c0.clone();
            matmul_nt(&mut c, &a, &b, m, k, n, false);
            assert!(max_rel_diff(&c, &want) < 1e-13);
            matmul_nt(&mut c, &a, &b, m, k, n, true);
            let twice: Vec<f64> = want.iter().map(|x| 2.0 * x).collect();
            assert!(max_rel_diff(&c, &twice) < 1e-13);
        }
    }

    #[test]
    fn matmul_nn_matches_naive() {
        for (m, k, n) in SHAPES {
            let (a, b, c0) = (randv(m * k, 4), randv(k * n, 5), randv(m * n, 6));
            let want = naive(m, k, n, |i, p| a[i * k + p], |p, j| b[p * n + j]);
            let mut c = c0.clone();
            matmul_nn(&mut c, &a, &b, m, k, n, true);
            let acc: Vec<f64> = want.iter().zip(&c0).map(|(w, c)| w + c).collect();
            assert!(max_rel_diff(&c, &acc) < 1e-13);
            matmul_nn(&mut c, &a, &b, m, k, n, false);
            assert!(max_rel_diff(&c, &want) < 1e-13);
        }
    }

    #[test]
    fn matmul_tn_matches_naive() {
        for (m, k, n) in SHAPES {
            let (a, b, c0) = (randv(k * m, 7), randv(k * n, 8), randv(m * n, 9));
            let want = naive(m, k, n, |i, p| a[p * m + i], |p, j| b[p * n + j]);
            let mut c = c0.clone();
            matmul_tn(&mut c, &a, &b, m, k, n, false);
            assert!(max_rel_diff(&c, &want) < 1e-13);
        }
    }

    #[test]
    fn matmul_f32_matches_f64() {
        let (m, k, n) = (70, 65, 80);
        let (a, b) = (randv(m * k, 10), randv(n * k, 11));
        let mut c64 = vec![0.0; m * n];
        matmul_nt(&mut c64, &a, &b, m, k, n, false);
        let (a32, b32): (Vec<f32>, Vec<f32>) = (
            a.iter().map(|&x| x as f32).collect(),
            b.iter().map(|&x| x as f32).collect(),
        );
        let mut c32 = vec![0.0f32; m * n];
        matmul_nt(&mut c32, &a32, &b32, m, k, n, false);
        let c32: Vec<f64> = c32.iter().map(|&x| x as f64).collect();
        assert!(max_rel_diff(&c32, &c64) < 1e-5);
    }

    #[test]
    fn matmul_empty_inner_dimension() {
        let mut c = vec![1.0f64; 6];
        matmul_nn(&mut c, &[], &[], 2, 0, 3, true);
        assert_eq!(c, vec![1.0; 6]);
        matmul_nn(&mut c, &[], &[], 2, 0, 3, false);
        assert_eq!(c, vec![0.0; 6]);
    }

    #[test]
    fn packed_products_match_repacked_and_f64() {
        // A weight packed once gives the same products as gemm_bf16 packing it per call, and
        // both stay within bf16 rounding of the exact f64 product.
        let (m, d_in, d_out) = (37, 70, 45);
        let (x, w, dy) = (
            randv(m * d_in, 12),
            randv(d_out * d_in, 13),
            randv(m * d_out, 14),
        );
        let (x32, w32, dy32): (Vec<f32>, Vec<f32>, Vec<f32>) = (
            x.iter().map(|&v| v as f32).collect(),
            w.iter().map(|&v| v as f32).collect(),
            dy.iter().map(|&v| v as f32).collect(),
        );
        let packs = FrozenWeight::packed(&w32, d_out, d_in, true);
        let mut y = vec![0.0f32; m * d_out];
        matmul_frozen_nt(&mut y, &x32, &packs, m);
        let mut y_ref = vec![0.0f32; m * d_out];
        let (xr, wr) = (
            MatRef::row_major(&x32, d_in),
            MatRef::transpose_of(&w32, d_in),
        );
        retune_gemm::gemm_bf16(&mut y_ref, xr, wr, m, d_in, d_out, false);
        assert_eq!(y, y_ref);
        let mut y64 = vec![0.0; m * d_out];
        matmul_nt(&mut y64, &x, &w, m, d_in, d_out, false);
        // Two bf16 roundings of ~4e-3 relative each, over a sum of 70 terms.
        let bound = if retune_gemm::best_kernel() == retune_gemm::Kernel::F32 {
            1e-5
        } else {
            3e-2
        };
        assert!(max_rel_diff(&y, &y64) < bound);
        let mut dx = vec![1.0f32; m * d_in];
        assert!(matmul_frozen_nn(&mut dx, &dy32, &packs, m));
        let mut dx64 = vec![1.0; m * d_in];
        matmul_nn(&mut dx64, &dy, &w, m, d_out, d_in, true);
        assert!(max_rel_diff(&dx, &dx64) < bound);
    }
}
