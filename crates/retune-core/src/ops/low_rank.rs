//! Matrix products with one small dimension: LoRA's rank `r` (8 to 64 in practice).
//!
//! A general GEMM lays both operands out in tiles before it multiplies; when one side of the
//! product is only `r` wide, that layout work over the large `[N, D]` activation costs more
//! than the arithmetic. These three products read the large operand once, in place, and keep
//! the small one (`r x D`, at most a few hundred KiB) in cache:
//! - [`down`]: `c[n, r] = a[n, k] · w[k, r]` (into the rank space: `x A^T`, `dy B`);
//! - [`up_add`]: `c[n, m] += a[n, r] · w[r, m]` (out of it: `xa B^T`, `dxa A`);
//! - [`outer_add`]: `c[m, r] += a[n, m]^T · b[n, r]` (the adapter's weight gradients).
//!
//! They run in f32 (f64 for gradient checks) whatever the matmul precision: the branch is a
//! few percent of a step's arithmetic, and full precision costs it nothing here. On AVX-512
//! CPUs the f32 products use 16-lane FMA kernels, with rows split over rayon's pool.

use crate::ops::swiglu::as_f32;
use crate::Float;
use rayon::prelude::*;

/// Rows of `c` per rayon task in [`down`] and [`up_add`].
const ROWS_PER_TASK: usize = 64;
/// Rows of `c` per rayon task in the generic [`outer_add`] (columns of `a`).
const COLS_PER_TASK: usize = 16;
/// Rows of `a` per partial sum in the AVX-512 [`outer_add`].
const ROWS_PER_PART: usize = 128;

/// `c[n, r] = a[n, k] · w[k, r]`.
pub fn down<T: Float>(c: &mut [T], a: &[T], w: &[T], n: usize, k: usize, r: usize) {
    assert!(
        c.len() == n * r && a.len() == n * k && w.len() == k * r,
        "low_rank::down: shape mismatch"
    );
    #[cfg(target_arch = "x86_64")]
    if let (Some(a32), Some(w32), true) = (as_f32(a), as_f32(w), avx512::available()) {
        let c32 = crate::Float::f32_slice_mut(c).expect("c has a's type");
        let wp = avx512::pad_columns(w32, k, r);
        c32.par_chunks_mut(ROWS_PER_TASK * r)
            .zip(a32.par_chunks(ROWS_PER_TASK * k))
            .for_each(|(c, a)| {
                // SAFETY: AVX-512 is available; the chunks hold whole rows of c and a.
                unsafe { avx512::down(c, a, &wp, k, r) }
            });
        return;
    }
    c.par_chunks_mut(ROWS_PER_TASK * r)
        .zip(a.par_chunks(ROWS_PER_TASK * k))
        .for_each(|(c, a)| {
            for (c_row, a_row) in c.chunks_mut(r).zip(a.chunks(k)) {
                c_row.fill(T::zero());
                for (&x, w_row) in a_row.iter().zip(w.chunks(r)) {
                    for (cv, &wv) in c_row.iter_mut().zip(w_row) {
                        *cv += x * wv;
                    }
                }
            }
        });
}

/// `c[n, m] += a[n, r] · w[r, m]`.
pub fn up_add<T: Float>(c: &mut [T], a: &[T], w: &[T], n: usize, r: usize, m: usize) {
    assert!(
        c.len() == n * m && a.len() == n * r && w.len() == r * m,
        "low_rank::up_add: shape mismatch"
    );
    #[cfg(target_arch = "x86_64")]
    if let (Some(a32), Some(w32), true) = (as_f32(a), as_f32(w), avx512::available()) {
        let c32 = crate::Float::f32_slice_mut(c).expect("c has a's type");
        c32.par_chunks_mut(ROWS_PER_TASK * m)
            .zip(a32.par_chunks(ROWS_PER_TASK * r))
            .for_each(|(c, a)| {
                // SAFETY: AVX-512 is available; the chunks hold whole rows of c and a.
                unsafe { avx512::up_add(c, a, w32, r, m) }
            });
        return;
    }
    c.par_chunks_mut(ROWS_PER_TASK * m)
        .zip(a.par_chunks(ROWS_PER_TASK * r))
        .for_each(|(c, a)| {
            for (c_row, a_row) in c.chunks_mut(m).zip(a.chunks(r)) {
                for (&x, w_row) in a_row.iter().zip(w.chunks(m)) {
                    for (cv, &wv) in c_row.iter_mut().zip(w_row) {
                        *cv += x * wv;
                    }
                }
            }
        });
}

/// `c[m, r] += a[n, m]^T · b[n, r]`: the sum over rows `i` of the outer products `a_i b_i^T`.
pub fn outer_add<T: Float>(c: &mut [T], a: &[T], b: &[T], n: usize, m: usize, r: usize) {
    assert!(
        c.len() == m * r && a.len() == n * m && b.len() == n * r,
        "low_rank::outer_add: shape mismatch"
    );
    #[cfg(target_arch = "x86_64")]
    if let (Some(a32), Some(b32), true) = (as_f32(a), as_f32(b), avx512::available()) {
        let c32 = crate::Float::f32_slice_mut(c).expect("c has a's type");
        let r16 = r.div_ceil(16) * 16;
        let bp = avx512::pad_columns(b32, n, r);
        // Each part streams its rows of a in order (a column-block walk down the rows would
        // miss the cache on every row) into its own [m, r16] partial sum; the parts are fixed
        // by n alone and added in order, so the result does not depend on the thread count.
        let parts: Vec<Vec<f32>> = (0..n.div_ceil(ROWS_PER_PART))
            .into_par_iter()
            .map(|part| {
                let rows = part * ROWS_PER_PART..((part + 1) * ROWS_PER_PART).min(n);
                let mut acc = vec![0.0f32; m * r16];
                let (a_rows, b_rows) = (
                    &a32[rows.start * m..rows.end * m],
                    &bp[rows.start * r16..rows.end * r16],
                );
                // SAFETY: AVX-512 is available; a_rows is [rows, m], b_rows [rows, r16].
                unsafe { avx512::outer_rows(&mut acc, a_rows, b_rows, m, r16) };
                acc
            })
            .collect();
        for part in &parts {
            for (c_row, p_row) in c32.chunks_mut(r).zip(part.chunks(r16)) {
                for (cv, &pv) in c_row.iter_mut().zip(p_row) {
                    *cv += pv;
                }
            }
        }
        return;
    }
    c.par_chunks_mut(COLS_PER_TASK * r)
        .enumerate()
        .for_each(|(task, c)| {
            let col0 = task * COLS_PER_TASK;
            for (a_row, b_row) in a.chunks(m).zip(b.chunks(r)) {
                for (c_row, &x) in c.chunks_mut(r).zip(&a_row[col0..]) {
                    for (cv, &bv) in c_row.iter_mut().zip(b_row) {
                        *cv += x * bv;
                    }
                }
            }
        });
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! The f32 kernels: 16-lane vectors along `r` (or along `m` in `up_add`), eight
    //! independent accumulators so the FMA units stay busy.
    use std::arch::x86_64::*;
    use std::borrow::Cow;

    const LANES: usize = 16;
    /// Rows of `c` computed together (independent accumulators).
    const ROWS: usize = 8;

    pub(super) fn available() -> bool {
        crate::ops::swiglu::has_avx512()
    }

    /// `x[rows, cols]` with its columns padded with zeros to a multiple of 16 (as given when
    /// they already are), so every row is whole vectors.
    pub(super) fn pad_columns(x: &[f32], rows: usize, cols: usize) -> Cow<'_, [f32]> {
        let padded = cols.div_ceil(LANES) * LANES;
        if padded == cols {
            return Cow::Borrowed(x);
        }
        let mut out = vec![0.0; rows * padded];
        for (o, i) in out.chunks_mut(padded).zip(x.chunks(cols)) {
            o[..cols].copy_from_slice(i);
        }
        Cow::Owned(out)
    }

    /// The lanes of a vector that hold columns `j..j + 16` of a row `cols` wide.
    #[inline(always)]
    fn tail_mask(cols: usize, j: usize) -> __mmask16 {
        let live = (cols - j).min(LANES);
        ((1u32 << live) - 1) as __mmask16
    }

    /// [`super::down`] on whole rows: `c[rows, r] = a[rows, k] · w`, `w` padded to `[k, r16]`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn down(c: &mut [f32], a: &[f32], wp: &[f32], k: usize, r: usize) {
        let rows = c.len() / r;
        let r16 = r.div_ceil(LANES) * LANES;
        assert!(a.len() == rows * k && wp.len() == k * r16);
        let mut i0 = 0;
        while i0 < rows {
            let nr = (rows - i0).min(ROWS);
            for j in (0..r).step_by(LANES) {
                let mut acc = [_mm512_setzero_ps(); ROWS];
                for p in 0..k {
                    // SAFETY: p < k and j < r16, so the 16 lanes lie inside row p of wp.
                    let wv = unsafe { _mm512_loadu_ps(wp.as_ptr().add(p * r16 + j)) };
                    // SAFETY (both loops): ii < nr, so row i0 + ii < rows and p < k.
                    let a_at = |ii: usize| unsafe { *a.as_ptr().add((i0 + ii) * k + p) };
                    if nr == ROWS {
                        // The common case, a whole block: fully unrolled.
                        for (ii, acc) in acc.iter_mut().enumerate() {
                            *acc = _mm512_fmadd_ps(_mm512_set1_ps(a_at(ii)), wv, *acc);
                        }
                    } else {
                        for (ii, acc) in acc.iter_mut().enumerate().take(nr) {
                            *acc = _mm512_fmadd_ps(_mm512_set1_ps(a_at(ii)), wv, *acc);
                        }
                    }
                }
                let mask = tail_mask(r, j);
                for (ii, acc) in acc.iter().enumerate().take(nr) {
                    let row = &mut c[(i0 + ii) * r..][..r];
                    // SAFETY: the mask keeps the store inside the row (columns j.. < r).
                    unsafe { _mm512_mask_storeu_ps(row.as_mut_ptr().add(j), mask, *acc) };
                }
            }
            i0 += nr;
        }
    }

    /// [`super::up_add`] on whole rows: `c[rows, m] += a[rows, r] · w[r, m]`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn up_add(c: &mut [f32], a: &[f32], w: &[f32], r: usize, m: usize) {
        let rows = c.len() / m;
        assert!(a.len() == rows * r && w.len() == r * m);
        let mut i0 = 0;
        while i0 < rows {
            let nr = (rows - i0).min(ROWS);
            for j in (0..m).step_by(LANES) {
                let mask = tail_mask(m, j);
                let mut acc = [_mm512_setzero_ps(); ROWS];
                for (ii, acc) in acc.iter_mut().enumerate().take(nr) {
                    // SAFETY: the mask keeps the load inside row i0 + ii of c.
                    *acc =
                        unsafe { _mm512_maskz_loadu_ps(mask, c.as_ptr().add((i0 + ii) * m + j)) };
                }
                for q in 0..r {
                    // SAFETY: the mask keeps the load inside row q of w.
                    let wv = unsafe { _mm512_maskz_loadu_ps(mask, w.as_ptr().add(q * m + j)) };
                    for (ii, acc) in acc.iter_mut().enumerate().take(nr) {
                        // SAFETY: ii < nr and q < r: inside row i0 + ii of a.
                        let x = unsafe { *a.as_ptr().add((i0 + ii) * r + q) };
                        *acc = _mm512_fmadd_ps(_mm512_set1_ps(x), wv, *acc);
                    }
                }
                for (ii, acc) in acc.iter().enumerate().take(nr) {
                    // SAFETY: as for the load.
                    unsafe {
                        _mm512_mask_storeu_ps(c.as_mut_ptr().add((i0 + ii) * m + j), mask, *acc)
                    };
                }
            }
            i0 += nr;
        }
    }

    /// Rows of `a` per pass of [`outer_rows`]: their lines of each column block stay in L1.
    const OUTER_ROWS: usize = 16;
    /// Columns of `a` per block of [`outer_rows`]: one accumulator each, all in registers.
    const OUTER_COLS: usize = 16;

    /// `acc[m, r16] += a[rows, m]^T · b[rows, r16]`, walking `a` row chunk by row chunk.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn outer_rows(acc: &mut [f32], a: &[f32], b: &[f32], m: usize, r16: usize) {
        let rows = b.len() / r16;
        assert!(acc.len() == m * r16 && a.len() == rows * m && r16.is_multiple_of(LANES));
        for i0 in (0..rows).step_by(OUTER_ROWS) {
            let nr = OUTER_ROWS.min(rows - i0);
            for j in (0..r16).step_by(LANES) {
                let mut o0 = 0;
                while o0 + OUTER_COLS <= m {
                    // SAFETY: columns o0..o0 + 16 < m, rows i0..i0 + nr, lanes j..j + 16 < r16.
                    unsafe { outer_block::<OUTER_COLS>(acc, a, b, m, r16, i0, nr, o0, j) };
                    o0 += OUTER_COLS;
                }
                for o in o0..m {
                    // SAFETY: as above, one column.
                    unsafe { outer_block::<1>(acc, a, b, m, r16, i0, nr, o, j) };
                }
            }
        }
    }

    /// `acc[o0 + o, j..j + 16] += sum_{i < nr} a[i0 + i, o0 + o] b[i0 + i, j..j + 16]`.
    ///
    /// # Safety
    /// AVX-512; `o0 + COLS <= m`, `i0 + nr` rows exist in `a` (`m` wide) and `b` (`r16` wide),
    /// `j + 16 <= r16`, and `acc` is `[m, r16]`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn outer_block<const COLS: usize>(
        acc: &mut [f32],
        a: &[f32],
        b: &[f32],
        m: usize,
        r16: usize,
        i0: usize,
        nr: usize,
        o0: usize,
        j: usize,
    ) {
        let mut sums = [_mm512_setzero_ps(); COLS];
        let dst = acc.as_mut_ptr().add(o0 * r16 + j);
        for (o, s) in sums.iter_mut().enumerate() {
            // SAFETY (caller): row o0 + o of acc, lanes j..j + 16.
            *s = unsafe { _mm512_loadu_ps(dst.add(o * r16)) };
        }
        for i in i0..i0 + nr {
            // SAFETY (caller): row i of b and of a, columns o0..o0 + COLS of a.
            let bv = unsafe { _mm512_loadu_ps(b.as_ptr().add(i * r16 + j)) };
            let a_row = unsafe { a.as_ptr().add(i * m + o0) };
            for (o, s) in sums.iter_mut().enumerate() {
                let x = unsafe { _mm512_set1_ps(*a_row.add(o)) };
                *s = _mm512_fmadd_ps(x, bv, *s);
            }
        }
        for (o, s) in sums.iter().enumerate() {
            // SAFETY: as for the load.
            unsafe { _mm512_storeu_ps(dst.add(o * r16), *s) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{max_rel_diff, randv, to_f32};

    /// Shapes with ranks below, at and across the 16-lane vector, rows across the 8-row block
    /// and the task size, and widths with a partial last vector.
    const SHAPES: [(usize, usize, usize); 5] = [
        (37, 70, 16),
        (70, 33, 5),
        (130, 48, 20),
        (9, 576, 33),
        (1, 17, 64),
    ];

    fn naive(
        rows: usize,
        inner: usize,
        cols: usize,
        a: impl Fn(usize, usize) -> f64,
        b: impl Fn(usize, usize) -> f64,
    ) -> Vec<f64> {
        let mut c = vec![0.0; rows * cols];
        for i in 0..rows {
            for j in 0..cols {
                c[i * cols + j] = (0..inner).map(|p| a(i, p) * b(p, j)).sum();
            }
        }
        c
    }

    /// Runs `op` in f64 and f32 from the same data and checks both against `want`.
    fn check(
        name: &str,
        want: &[f64],
        c0: &[f64],
        ins: [&[f64]; 2],
        op64: impl Fn(&mut [f64], &[f64], &[f64]),
        op32: impl Fn(&mut [f32], &[f32], &[f32]),
    ) {
        let mut c = c0.to_vec();
        op64(&mut c, ins[0], ins[1]);
        assert!(max_rel_diff(&c, want) < 1e-13, "{name} f64");
        let mut c32 = to_f32(c0);
        op32(&mut c32, &to_f32(ins[0]), &to_f32(ins[1]));
        let err = max_rel_diff(&c32, want);
        assert!(err < 1e-5, "{name} f32: {err}");
    }

    #[test]
    fn down_matches_naive() {
        for (n, k, r) in SHAPES {
            let (a, w) = (randv(n * k, 1), randv(k * r, 2));
            let want = naive(n, k, r, |i, p| a[i * k + p], |p, j| w[p * r + j]);
            // c is overwritten: start from garbage.
            let c0 = randv(n * r, 3);
            check(
                "down",
                &want,
                &c0,
                [&a, &w],
                |c, a, w| down(c, a, w, n, k, r),
                |c, a, w| down(c, a, w, n, k, r),
            );
        }
    }

    #[test]
    fn up_add_matches_naive() {
        for (n, m, r) in SHAPES {
            let (a, w, c0) = (randv(n * r, 4), randv(r * m, 5), randv(n * m, 6));
            let prod = naive(n, r, m, |i, q| a[i * r + q], |q, j| w[q * m + j]);
            let want: Vec<f64> = prod.iter().zip(&c0).map(|(p, c)| p + c).collect();
            check(
                "up_add",
                &want,
                &c0,
                [&a, &w],
                |c, a, w| up_add(c, a, w, n, r, m),
                |c, a, w| up_add(c, a, w, n, r, m),
            );
        }
    }

    #[test]
    fn outer_add_matches_naive() {
        for (n, m, r) in SHAPES {
            let (a, b, c0) = (randv(n * m, 7), randv(n * r, 8), randv(m * r, 9));
            let prod = naive(m, n, r, |o, i| a[i * m + o], |i, j| b[i * r + j]);
            let want: Vec<f64> = prod.iter().zip(&c0).map(|(p, c)| p + c).collect();
            check(
                "outer_add",
                &want,
                &c0,
                [&a, &b],
                |c, a, b| outer_add(c, a, b, n, m, r),
                |c, a, b| outer_add(c, a, b, n, m, r),
            );
        }
    }
}
