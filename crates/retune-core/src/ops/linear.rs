//! Linear layer `y = x W^T + b`, with `W` stored `[out, in]` as in PyTorch and Hugging Face.

use super::matmul::{
    matmul_frozen_nn, matmul_frozen_nt, matmul_nn, matmul_nt, matmul_tn, FrozenWeight,
};
use crate::Float;
use rayon::prelude::*;

/// Rows per rayon task for the bias add.
const ROWS_PER_TASK: usize = 16;
/// Columns of `db` owned by one rayon task in the bias-gradient reduction.
const DB_BLOCK: usize = 64;

/// `y[N, D_out] = x[N, D_in] · w[D_out, D_in]^T + b[D_out]`.
pub fn linear_forward<T: Float>(
    y: &mut [T],
    x: &[T],
    w: &[T],
    b: Option<&[T]>,
    n: usize,
    d_in: usize,
    d_out: usize,
) {
    linear_forward_packed(y, x, w, None, b, n, d_in, d_out)
}

/// [`linear_forward`] with, for a frozen f32 weight, its packs or storage (`w` may then be
/// empty: a weight held only so).
pub fn linear_forward_packed<T: Float>(
    y: &mut [T],
    x: &[T],
    w: &[T],
    packs: Option<&FrozenWeight>,
    b: Option<&[T]>,
    n: usize,
    d_in: usize,
    d_out: usize,
) {
    match packs {
        Some(p) => matmul_frozen_nt(y, x, p, n),
        None => matmul_nt(y, x, w, n, d_in, d_out, false),
    }
    if let Some(b) = b {
        add_bias(y, b, d_out);
    }
}

/// `y[N, D_out] += b[D_out]` on every row.
pub fn add_bias<T: Float>(y: &mut [T], b: &[T], d_out: usize) {
    assert_eq!(b.len(), d_out, "linear_forward: bias must be [D_out]");
    if d_out == 0 {
        return;
    }
    y.par_chunks_mut(d_out)
        .with_min_len(ROWS_PER_TASK)
        .for_each(|row| {
            for (v, &bv) in row.iter_mut().zip(b) {
                *v += bv;
            }
        });
}

/// Backward of [`linear_forward`], accumulating: `dx[N, D_in] += dy · w`,
/// `dw[D_out, D_in] += dy^T · x`, `db[D_out] += sum_rows dy`. A `None` gradient is not computed.
pub fn linear_backward<T: Float>(
    dx: Option<&mut [T]>,
    dw: Option<&mut [T]>,
    db: Option<&mut [T]>,
    dy: &[T],
    x: &[T],
    w: &[T],
    n: usize,
    d_in: usize,
    d_out: usize,
) {
    linear_backward_packed(dx, dw, db, dy, x, w, None, n, d_in, d_out)
}

/// [`linear_backward`] with, for a frozen f32 weight, its packs or storage (used for `dx`).
pub fn linear_backward_packed<T: Float>(
    dx: Option<&mut [T]>,
    dw: Option<&mut [T]>,
    db: Option<&mut [T]>,
    dy: &[T],
    x: &[T],
    w: &[T],
    packs: Option<&FrozenWeight>,
    n: usize,
    d_in: usize,
    d_out: usize,
) {
    if let Some(dx) = dx {
        if !packs.is_some_and(|p| matmul_frozen_nn(dx, dy, p, n)) {
            matmul_nn(dx, dy, w, n, d_out, d_in, true);
        }
    }
    if let Some(dw) = dw {
        matmul_tn(dw, dy, x, d_out, n, d_in, true);
    }
    if let Some(db) = db {
        assert!(
            db.len() == d_out && dy.len() == n * d_out,
            "linear_backward: db/dy shape"
        );
        if d_out == 0 {
            return;
        }
        // Each task owns a block of columns and sums it over all rows: no shared writes.
        db.par_chunks_mut(DB_BLOCK)
            .enumerate()
            .for_each(|(blk, dbb)| {
                let cols = blk * DB_BLOCK..blk * DB_BLOCK + dbb.len();
                let mut acc = [0.0f64; DB_BLOCK];
                for row in dy.chunks_exact(d_out) {
                    for (a, &g) in acc.iter_mut().zip(&row[cols.clone()]) {
                        *a += g.as_f64();
                    }
                }
                for (d, &a) in dbb.iter_mut().zip(&acc) {
                    *d += T::of(a);
                }
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check_grad_out, max_rel_diff, randv, to_f32};

    const N: usize = 7;
    const D_IN: usize = 6;
    const D_OUT: usize = 67; // spans two db blocks

    fn forward(x: &[f64], w: &[f64], b: &[f64]) -> Vec<f64> {
        let mut y = vec![0.0; N * D_OUT];
        linear_forward(&mut y, x, w, Some(b), N, D_IN, D_OUT);
        y
    }

    #[test]
    fn linear_forward_reference_and_f32() {
        let (x, w, b) = (randv(N * D_IN, 1), randv(D_OUT * D_IN, 2), randv(D_OUT, 3));
        let y = forward(&x, &w, &b);
        for i in 0..N {
            for o in 0..D_OUT {
                let want: f64 = b[o]
                    + (0..D_IN)
                        .map(|k| x[i * D_IN + k] * w[o * D_IN + k])
                        .sum::<f64>();
                assert!((y[i * D_OUT + o] - want).abs() < 1e-13);
            }
        }
        let mut y32 = vec![0.0f32; N * D_OUT];
        linear_forward(
            &mut y32,
            &to_f32(&x),
            &to_f32(&w),
            Some(&to_f32(&b)),
            N,
            D_IN,
            D_OUT,
        );
        assert!(max_rel_diff(&y32, &y) < 1e-5);
    }

    #[test]
    fn linear_gradcheck() {
        let (x, w, b) = (randv(N * D_IN, 4), randv(D_OUT * D_IN, 5), randv(D_OUT, 6));
        let r = randv(N * D_OUT, 7);
        let (mut dx, mut dw, mut db) = (
            vec![0.0; N * D_IN],
            vec![0.0; D_OUT * D_IN],
            vec![0.0; D_OUT],
        );
        linear_backward(
            Some(&mut dx),
            Some(&mut dw),
            Some(&mut db),
            &r,
            &x,
            &w,
            N,
            D_IN,
            D_OUT,
        );
        let ex = check_grad_out("linear dx", &x, &dx, &r, |x| forward(x, &w, &b));
        let ew = check_grad_out("linear dw", &w, &dw, &r, |w| forward(&x, w, &b));
        let eb = check_grad_out("linear db", &b, &db, &r, |b| forward(&x, &w, b));
        assert!(ex < 1e-6 && ew < 1e-6 && eb < 1e-6);
    }

    #[test]
    fn linear_backward_accumulates_and_skips_none() {
        let (x, w, r) = (
            randv(N * D_IN, 8),
            randv(D_OUT * D_IN, 9),
            randv(N * D_OUT, 10),
        );
        let (mut dx, mut dw, mut db) = (
            vec![0.0; N * D_IN],
            vec![0.0; D_OUT * D_IN],
            vec![0.0; D_OUT],
        );
        linear_backward(
            Some(&mut dx),
            Some(&mut dw),
            Some(&mut db),
            &r,
            &x,
            &w,
            N,
            D_IN,
            D_OUT,
        );
        let once = (dx.clone(), dw.clone(), db.clone());
        linear_backward(
            Some(&mut dx),
            Some(&mut dw),
            Some(&mut db),
            &r,
            &x,
            &w,
            N,
            D_IN,
            D_OUT,
        );
        let doubled =
            |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(a, b)| (a - 2.0 * b).abs() < 1e-13);
        assert!(doubled(&dx, &once.0) && doubled(&dw, &once.1) && doubled(&db, &once.2));
        // Frozen weight and no bias: only dx moves, by exactly one more gradient.
        linear_backward(Some(&mut dx), None, None, &r, &x, &w, N, D_IN, D_OUT);
        assert!(dx
            .iter()
            .zip(&once.0)
            .all(|(a, b)| (a - 3.0 * b).abs() < 1e-13));
        // dw alone (nothing below needs an input gradient).
        let mut dw2 = vec![0.0; D_OUT * D_IN];
        linear_backward(None, Some(&mut dw2), None, &r, &x, &w, N, D_IN, D_OUT);
        assert!(max_rel_diff(&dw2, &once.1) < 1e-14);
    }
}
