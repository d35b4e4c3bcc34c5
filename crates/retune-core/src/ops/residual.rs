//! Residual connection `out = a + b`; its backward adds the incoming gradient into both
//! branches with [`add_inplace`].

use crate::Float;
use rayon::prelude::*;

/// Elements per rayon task (elementwise work is cheap).
const CHUNK: usize = 8192;

/// `out[N, C] = a[N, C] + b[N, C]`.
pub fn residual_forward<T: Float>(out: &mut [T], a: &[T], b: &[T]) {
    assert!(
        out.len() == a.len() && out.len() == b.len(),
        "residual_forward: shape mismatch"
    );
    out.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK))
        .zip(b.par_chunks(CHUNK))
        .for_each(|((o, a), b)| {
            for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
                *o = a + b;
            }
        });
}

/// `buf = 0`, on every thread: a layer's activation buffers are megabytes, and zeroing them
/// on one thread leaves the others waiting.
pub fn zero_par<T: Float>(buf: &mut [T]) {
    buf.par_chunks_mut(CHUNK).for_each(|b| b.fill(T::zero()));
}

/// `acc[len] += x[len]`: accumulates a gradient (or any tensor) into another.
pub fn add_inplace<T: Float>(acc: &mut [T], x: &[T]) {
    assert_eq!(acc.len(), x.len(), "add_inplace: shape mismatch");
    acc.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(acc, x)| {
            for (a, &x) in acc.iter_mut().zip(x) {
                *a += x;
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check_grad_out, max_rel_diff, randv, to_f32};

    const LEN: usize = 9000; // two rayon chunks

    fn forward(a: &[f64], b: &[f64]) -> Vec<f64> {
        let mut out = vec![0.0; a.len()];
        residual_forward(&mut out, a, b);
        out
    }

    #[test]
    fn residual_gradcheck_and_f32() {
        let (a, b, r) = (randv(LEN, 1), randv(LEN, 2), randv(LEN, 3));
        // Backward: the incoming gradient is added into both branches (here starting at zero).
        let (mut da, mut db) = (vec![0.0; LEN], vec![0.0; LEN]);
        add_inplace(&mut da, &r);
        add_inplace(&mut db, &r);
        let ea = check_grad_out("residual da", &a, &da, &r, |a| forward(a, &b));
        let eb = check_grad_out("residual db", &b, &db, &r, |b| forward(&a, b));
        assert!(ea < 1e-6 && eb < 1e-6);
        let mut out32 = vec![0.0f32; LEN];
        residual_forward(&mut out32, &to_f32(&a), &to_f32(&b));
        assert!(max_rel_diff(&out32, &forward(&a, &b)) < 1e-5);
    }
}
