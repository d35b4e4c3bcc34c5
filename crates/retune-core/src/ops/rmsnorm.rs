//! RMSNorm: `y = x * rstd * w` with `rstd = 1 / sqrt(mean(x^2) + eps)` per row.
//!
//! Row sums are accumulated in f64; per-element work stays in `T`.

use crate::ops::matmul::{pack_for_rows, pack_rows};
use crate::ops::swiglu::{as_f32, as_f32_mut, simd_dispatch};
use crate::Float;
use rayon::prelude::*;
use retune_gemm::PackedA;

/// Rows per rayon task (each row costs O(C)).
const ROWS_PER_TASK: usize = 16;
/// Columns of `dw` owned by one rayon task in the weight-gradient reduction.
const DW_BLOCK: usize = 32;
/// Independent f64 partial sums per row reduction: a single running sum is one long chain of
/// dependent adds; lanes let the compiler vectorise and pipeline it.
const LANES: usize = 8;

/// `sum_k f(a_k, b_k)` accumulated in f64 over `LANES` partial sums.
#[inline(always)]
fn sum_f64<T: Float>(a: &[T], b: &[T], f: impl Fn(T, T) -> f64) -> f64 {
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(&x, &y)| f(x, y))
        .sum();
    let mut acc = [0.0f64; LANES];
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += f(x[l], y[l]);
        }
    }
    tail + acc.iter().sum::<f64>()
}

/// `sum_k (dy_k w_k) x_k` (the product `dy_k w_k` rounded to T), accumulated like [`sum_f64`].
#[inline(always)]
fn dot3_f64<T: Float>(dy: &[T], w: &[T], x: &[T]) -> f64 {
    let (cg, cw, cx) = (
        dy.chunks_exact(LANES),
        w.chunks_exact(LANES),
        x.chunks_exact(LANES),
    );
    let tail: f64 = (cg
        .remainder()
        .iter()
        .zip(cw.remainder())
        .zip(cx.remainder()))
    .map(|((&g, &wv), &xv)| (g * wv).as_f64() * xv.as_f64())
    .sum();
    let mut acc = [0.0f64; LANES];
    for ((g, wv), xv) in cg.zip(cw).zip(cx) {
        for l in 0..LANES {
            acc[l] += (g[l] * wv[l]).as_f64() * xv[l].as_f64();
        }
    }
    tail + acc.iter().sum::<f64>()
}

/// One row of the forward: writes `y`, returns `rstd`.
#[inline(always)]
fn forward_row<T: Float>(yr: &mut [T], xr: &[T], w: &[T], eps: f64) -> T {
    let ss = sum_f64(xr, xr, |a, b| a.as_f64() * b.as_f64());
    let r = T::of(1.0 / (ss / xr.len() as f64 + eps).sqrt());
    for ((yv, &xv), &wv) in yr.iter_mut().zip(xr).zip(w) {
        *yv = xv * r * wv;
    }
    r
}

/// One row of the input gradient: `dx += r w dy - r^3 x / C * sum(dy w x)`.
#[inline(always)]
fn backward_row<T: Float>(dxr: &mut [T], dyr: &[T], xr: &[T], w: &[T], r: T) {
    let dot = dot3_f64(dyr, w, xr);
    let coef = T::of(r.as_f64().powi(3) * dot / xr.len() as f64);
    for (((d, &g), &wv), &xv) in dxr.iter_mut().zip(dyr).zip(w).zip(xr) {
        *d += r * wv * g - coef * xv;
    }
}

// The rows in f32, built for AVX-512 where the CPU has it (8 f64 lanes per sum instead of 2);
// the same operations in the same order, so the same bits.
simd_dispatch!(fn forward_row_f32 => forward_row_f32_body(
    yr: &mut [f32], rs: &mut f32, xr: &[f32], w: &[f32], eps: f64
));
simd_dispatch!(fn backward_row_f32 => backward_row_f32_body(
    dxr: &mut [f32], dyr: &[f32], xr: &[f32], w: &[f32], r: f32
));

#[inline(always)]
fn forward_row_f32_body(yr: &mut [f32], rs: &mut f32, xr: &[f32], w: &[f32], eps: f64) {
    *rs = forward_row(yr, xr, w, eps);
}

#[inline(always)]
fn backward_row_f32_body(dxr: &mut [f32], dyr: &[f32], xr: &[f32], w: &[f32], r: f32) {
    backward_row(dxr, dyr, xr, w, r);
}

/// `y[N, C] = x[N, C] * rstd[N] * w[C]`; saves `rstd[N]` for the backward pass.
pub fn rmsnorm_forward<T: Float>(
    y: &mut [T],
    rstd: &mut [T],
    x: &[T],
    w: &[T],
    n: usize,
    c: usize,
    eps: f64,
) {
    assert!(y.len() == n * c && x.len() == n * c && rstd.len() == n && w.len() == c);
    if c == 0 {
        return;
    }
    y.par_chunks_mut(c)
        .zip(rstd.par_iter_mut())
        .zip(x.par_chunks(c))
        .with_min_len(ROWS_PER_TASK)
        .for_each(|((yr, rs), xr)| {
            let f32s = (as_f32(xr), as_f32(w), as_f32_mut(std::slice::from_mut(rs)));
            match (as_f32_mut(yr), f32s) {
                (Some(y), (Some(x), Some(w), Some([r]))) => forward_row_f32(y, r, x, w, eps),
                (_, _) => *rs = forward_row(yr, xr, w, eps),
            }
        });
}

/// [`rmsnorm_forward`], and `y` packed for the bf16 products that read it (the result of
/// [`pack_rows`]): under bf16 products each row is packed as it is written, not read again.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_forward_packed<T: Float>(
    y: &mut [T],
    rstd: &mut [T],
    x: &[T],
    w: &[T],
    n: usize,
    c: usize,
    eps: f64,
) -> Option<PackedA> {
    let mut pack = pack_for_rows::<T>(n, c);
    let f32s = (as_f32_mut(y), as_f32_mut(rstd), as_f32(x), as_f32(w));
    let (Some(p), (Some(y), Some(rstd), Some(x), Some(w))) = (&mut pack, f32s) else {
        rmsnorm_forward(y, rstd, x, w, n, c, eps);
        return pack_rows(y, n, c);
    };
    assert!(y.len() == n * c && x.len() == n * c && rstd.len() == n && w.len() == c);
    let rows = PackedA::TILE_ROWS;
    y.par_chunks_mut(rows * c)
        .zip(rstd.par_chunks_mut(rows))
        .zip(x.par_chunks(rows * c))
        .zip(p.row_tiles_mut())
        .for_each(|(((yt, rt), xt), tile)| {
            let tile_rows = yt.chunks_mut(c).zip(rt).zip(xt.chunks(c));
            for (r, ((yr, rs), xr)) in tile_rows.enumerate() {
                forward_row_f32(yr, rs, xr, w, eps);
                PackedA::put_row(tile, r, yr);
            }
        });
    pack
}

/// Backward of [`rmsnorm_forward`]: `dx[N, C] +=`, `dw[C] +=` (skipped when `None`).
///
/// With `r = rstd`: `dx_k = r w_k dy_k - r^3 x_k / C * sum_j dy_j w_j x_j`,
/// `dw_j = sum_rows dy_j x_j r`.
pub fn rmsnorm_backward<T: Float>(
    dx: &mut [T],
    dw: Option<&mut [T]>,
    dy: &[T],
    x: &[T],
    w: &[T],
    rstd: &[T],
    n: usize,
    c: usize,
) {
    assert!(dx.len() == n * c && dy.len() == n * c && x.len() == n * c);
    assert!(rstd.len() == n && w.len() == c);
    if c == 0 {
        return;
    }
    dx.par_chunks_mut(c)
        .zip(dy.par_chunks(c))
        .zip(x.par_chunks(c))
        .zip(rstd.par_iter())
        .with_min_len(ROWS_PER_TASK)
        .for_each(|(((dxr, dyr), xr), &r)| {
            let f32s = (
                as_f32(dyr),
                as_f32(xr),
                as_f32(w),
                as_f32(std::slice::from_ref(&r)),
            );
            match (as_f32_mut(dxr), f32s) {
                (Some(d), (Some(g), Some(x), Some(w), Some(&[r]))) => {
                    backward_row_f32(d, g, x, w, r)
                }
                (_, _) => backward_row(dxr, dyr, xr, w, r),
            }
        });
    if let Some(dw) = dw {
        assert_eq!(dw.len(), c);
        // Each task owns a block of columns and sums it over all rows: no shared writes.
        dw.par_chunks_mut(DW_BLOCK)
            .enumerate()
            .for_each(|(blk, dwb)| {
                let j0 = blk * DW_BLOCK;
                let f32s = (as_f32(dy), as_f32(x), as_f32(rstd));
                match (as_f32_mut(dwb), f32s) {
                    (Some(d), (Some(g), Some(x), Some(r))) => dw_block_f32(d, j0, g, x, r, c),
                    (_, _) => dw_block(dwb, j0, dy, x, rstd, c),
                }
            });
    }
}

/// `dwb[j] += sum_rows dy[row, j0 + j] x[row, j0 + j] rstd[row]`, summed in f64 row by row:
/// one block of columns of the norm weight's gradient.
#[inline(always)]
fn dw_block<T: Float>(dwb: &mut [T], j0: usize, dy: &[T], x: &[T], rstd: &[T], c: usize) {
    let mut acc = [0.0f64; DW_BLOCK];
    let cols = j0..j0 + dwb.len();
    for ((dyr, xr), &r) in dy.chunks_exact(c).zip(x.chunks_exact(c)).zip(rstd) {
        let r = r.as_f64();
        for ((a, &g), &xv) in acc
            .iter_mut()
            .zip(&dyr[cols.clone()])
            .zip(&xr[cols.clone()])
        {
            *a += g.as_f64() * xv.as_f64() * r;
        }
    }
    for (d, &a) in dwb.iter_mut().zip(&acc) {
        *d += T::of(a);
    }
}

// The column sums in f64 lanes of AVX-512 where the CPU has it: the same operations per
// column in the same order, so the same bits.
simd_dispatch!(fn dw_block_f32 => dw_block_f32_body(
    dwb: &mut [f32], j0: usize, dy: &[f32], x: &[f32], rstd: &[f32], c: usize
));

#[inline(always)]
fn dw_block_f32_body(dwb: &mut [f32], j0: usize, dy: &[f32], x: &[f32], rstd: &[f32], c: usize) {
    dw_block(dwb, j0, dy, x, rstd, c);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check_grad_out, max_rel_diff, randv, to_f32};

    const N: usize = 6;
    const C: usize = 70; // spans two dw blocks
    const EPS: f64 = 1e-5;

    fn forward(x: &[f64], w: &[f64]) -> (Vec<f64>, Vec<f64>) {
        let (mut y, mut rstd) = (vec![0.0; N * C], vec![0.0; N]);
        rmsnorm_forward(&mut y, &mut rstd, x, w, N, C, EPS);
        (y, rstd)
    }

    #[test]
    fn rmsnorm_forward_reference_and_f32() {
        let (x, w) = (randv(N * C, 1), randv(C, 2));
        let (y, rstd) = forward(&x, &w);
        for i in 0..N {
            let row = &x[i * C..(i + 1) * C];
            let r = 1.0 / (row.iter().map(|v| v * v).sum::<f64>() / C as f64 + EPS).sqrt();
            assert!((rstd[i] - r).abs() < 1e-14);
            for j in 0..C {
                assert!((y[i * C + j] - row[j] * r * w[j]).abs() < 1e-14);
            }
        }
        let (mut y32, mut r32) = (vec![0.0f32; N * C], vec![0.0f32; N]);
        rmsnorm_forward(&mut y32, &mut r32, &to_f32(&x), &to_f32(&w), N, C, EPS);
        assert!(max_rel_diff(&y32, &y) < 1e-5);
    }

    #[test]
    fn rmsnorm_gradcheck() {
        let (x, w, r) = (randv(N * C, 3), randv(C, 4), randv(N * C, 5));
        let (_, rstd) = forward(&x, &w);
        let (mut dx, mut dw) = (vec![0.0; N * C], vec![0.0; C]);
        rmsnorm_backward(&mut dx, Some(&mut dw), &r, &x, &w, &rstd, N, C);
        let ex = check_grad_out("rmsnorm dx", &x, &dx, &r, |x| forward(x, &w).0);
        let ew = check_grad_out("rmsnorm dw", &w, &dw, &r, |w| forward(&x, w).0);
        assert!(ex < 1e-6 && ew < 1e-6);
        // Frozen weight: dx alone, identical to the first call's.
        let mut dx2 = vec![0.0; N * C];
        rmsnorm_backward(&mut dx2, None, &r, &x, &w, &rstd, N, C);
        assert_eq!(dx2, dx);
    }

    /// Many rayon tasks, an odd width (SIMD tails, a partial dw block): the lane sums against
    /// plain sequential formulas, and the f32 path against f64.
    #[test]
    fn rmsnorm_matches_naive_at_size() {
        let (n, c) = (300, 577);
        let (x, w, dy) = (randv(n * c, 6), randv(c, 7), randv(n * c, 8));
        let (dx0, dw0) = (randv(n * c, 9), randv(c, 10));
        let (mut y, mut rstd) = (vec![0.0; n * c], vec![0.0; n]);
        rmsnorm_forward(&mut y, &mut rstd, &x, &w, n, c, EPS);
        let (mut dx, mut dw) = (dx0.clone(), dw0.clone());
        rmsnorm_backward(&mut dx, Some(&mut dw), &dy, &x, &w, &rstd, n, c);
        let (mut want_y, mut want_dx, mut want_dw) = (vec![0.0; n * c], dx0.clone(), dw0.clone());
        for i in 0..n {
            let (xr, g) = (&x[i * c..(i + 1) * c], &dy[i * c..(i + 1) * c]);
            let r = 1.0 / (xr.iter().map(|v| v * v).sum::<f64>() / c as f64 + EPS).sqrt();
            assert!((rstd[i] - r).abs() < 1e-14);
            let dot: f64 = (0..c).map(|j| g[j] * w[j] * xr[j]).sum();
            for j in 0..c {
                want_y[i * c + j] = xr[j] * r * w[j];
                want_dx[i * c + j] += r * w[j] * g[j] - r * r * r * xr[j] / c as f64 * dot;
                want_dw[j] += g[j] * xr[j] * r;
            }
        }
        assert!(max_rel_diff(&y, &want_y) < 1e-14);
        assert!(max_rel_diff(&dx, &want_dx) < 1e-13);
        assert!(max_rel_diff(&dw, &want_dw) < 1e-13);

        let (x32, w32, dy32) = (to_f32(&x), to_f32(&w), to_f32(&dy));
        let (mut y32, mut r32) = (vec![0.0f32; n * c], vec![0.0f32; n]);
        rmsnorm_forward(&mut y32, &mut r32, &x32, &w32, n, c, EPS);
        assert!(max_rel_diff(&y32, &y) < 1e-5);
        let (mut dx32, mut dw32) = (to_f32(&dx0), to_f32(&dw0));
        rmsnorm_backward(&mut dx32, Some(&mut dw32), &dy32, &x32, &w32, &r32, n, c);
        assert!(max_rel_diff(&dx32, &dx) < 1e-5);
        assert!(max_rel_diff(&dw32, &dw) < 1e-5);
    }
}
