//! RMSNorm: `y = x * rstd * w` with `rstd = 1 / sqrt(mean(x^2) + eps)` per row.
//!
//! Row sums are accumulated in f64; per-element work stays in `T`.

use crate::Float;
use rayon::prelude::*;

/// Rows per rayon task (each row costs O(C)).
const ROWS_PER_TASK: usize = 8;
/// Columns of `dw` owned by one rayon task in the weight-gradient reduction.
const DW_BLOCK: usize = 64;

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
            let ss: f64 = xr.iter().map(|&v| v.as_f64() * v.as_f64()).sum();
            let r = T::of(1.0 / (ss / c as f64 + eps).sqrt());
            *rs = r;
            for ((yv, &xv), &wv) in yr.iter_mut().zip(xr).zip(w) {
                *yv = xv * r * wv;
            }
        });
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
            let dot: f64 = dyr
                .iter()
                .zip(w)
                .zip(xr)
                .map(|((&g, &wv), &xv)| (g * wv).as_f64() * xv.as_f64())
                .sum();
            let coef = T::of(r.as_f64().powi(3) * dot / c as f64);
            for (((d, &g), &wv), &xv) in dxr.iter_mut().zip(dyr).zip(w).zip(xr) {
                *d += r * wv * g - coef * xv;
            }
        });
    if let Some(dw) = dw {
        assert_eq!(dw.len(), c);
        // Each task owns a block of columns and sums it over all rows: no shared writes.
        dw.par_chunks_mut(DW_BLOCK)
            .enumerate()
            .for_each(|(blk, dwb)| {
                let j0 = blk * DW_BLOCK;
                let mut acc = [0.0f64; DW_BLOCK];
                for ((dyr, xr), &r) in dy.chunks_exact(c).zip(x.chunks_exact(c)).zip(rstd) {
                    let r = r.as_f64();
                    let cols = j0..j0 + dwb.len();
                    for ((a, &g), &xv) in acc.iter_mut().zip(&dyr[cols.clone()]).zip(&xr[cols]) {
                        *a += g.as_f64() * xv.as_f64() * r;
                    }
                }
                for (d, &a) in dwb.iter_mut().zip(&acc) {
                    *d += T::of(a);
                }
            });
    }
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
}
