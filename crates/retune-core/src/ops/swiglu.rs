//! SwiGLU gate of the Llama MLP: `out = silu(gate) * up`, `silu(x) = x * sigmoid(x)`.

use crate::Float;
use rayon::prelude::*;

/// Elements per rayon task (elementwise work is cheap).
const CHUNK: usize = 4096;

fn sigmoid<T: Float>(x: T) -> T {
    T::one() / (T::one() + (-x).exp())
}

/// `out[N, F] = silu(gate[N, F]) * up[N, F]`.
pub fn swiglu_forward<T: Float>(out: &mut [T], gate: &[T], up: &[T]) {
    assert!(
        out.len() == gate.len() && out.len() == up.len(),
        "swiglu_forward: shape mismatch"
    );
    out.par_chunks_mut(CHUNK)
        .zip(gate.par_chunks(CHUNK))
        .zip(up.par_chunks(CHUNK))
        .for_each(|((o, g), u)| {
            for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                *o = g * sigmoid(g) * u;
            }
        });
}

/// Backward of [`swiglu_forward`], accumulating into `dgate[N, F]` and `dup[N, F]`:
/// `dgate += dout * up * s (1 + g (1 - s))` with `s = sigmoid(g)`, `dup += dout * g * s`.
pub fn swiglu_backward<T: Float>(dgate: &mut [T], dup: &mut [T], dout: &[T], gate: &[T], up: &[T]) {
    let len = dout.len();
    assert!(
        dgate.len() == len && dup.len() == len && gate.len() == len && up.len() == len,
        "swiglu_backward: shape mismatch"
    );
    dgate
        .par_chunks_mut(CHUNK)
        .zip(dup.par_chunks_mut(CHUNK))
        .zip(dout.par_chunks(CHUNK))
        .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
        .for_each(|(((dg, du), d), (g, u))| {
            for ((((dg, du), &d), &g), &u) in dg.iter_mut().zip(du).zip(d).zip(g).zip(u) {
                let s = sigmoid(g);
                *dg += d * u * s * (T::one() + g * (T::one() - s));
                *du += d * g * s;
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check_grad_out, max_rel_diff, randv, to_f32};

    const LEN: usize = 5000; // two rayon chunks

    fn forward(g: &[f64], u: &[f64]) -> Vec<f64> {
        let mut out = vec![0.0; g.len()];
        swiglu_forward(&mut out, g, u);
        out
    }

    /// Gates spread over [-8, 8) to exercise both tails of the sigmoid.
    fn gates(seed: u64) -> Vec<f64> {
        randv(LEN, seed).iter().map(|x| 8.0 * x).collect()
    }

    #[test]
    fn swiglu_forward_reference_and_f32() {
        let (g, u) = (gates(1), randv(LEN, 2));
        let out = forward(&g, &u);
        for i in 0..LEN {
            assert!((out[i] - g[i] / (1.0 + (-g[i]).exp()) * u[i]).abs() < 1e-15);
        }
        let mut out32 = vec![0.0f32; LEN];
        swiglu_forward(&mut out32, &to_f32(&g), &to_f32(&u));
        assert!(max_rel_diff(&out32, &out) < 1e-5);
    }

    #[test]
    fn swiglu_gradcheck() {
        let (g, u, r) = (gates(3), randv(LEN, 4), randv(LEN, 5));
        let (mut dg, mut du) = (vec![0.0; LEN], vec![0.0; LEN]);
        swiglu_backward(&mut dg, &mut du, &r, &g, &u);
        let eg = check_grad_out("swiglu dgate", &g, &dg, &r, |g| forward(g, &u));
        let eu = check_grad_out("swiglu dup", &u, &du, &r, |u| forward(&g, u));
        assert!(eg < 1e-6 && eu < 1e-6);
    }
}
