//! The LoRA branch of a linear layer: `y += s * (dropout(x) A^T) B^T` (Hu et al., 2021; the
//! formula and shapes of Hugging Face PEFT), `A: [r, D_in]`, `B: [D_out, r]`.
//!
//! Dropout applies to the branch's input only, as PEFT's `lora_dropout` does. Its mask is a
//! pure function of a seed and the element index (a counter-based hash), so the recompute in
//! the backward pass regenerates exactly the mask of the forward, with nothing stored.

use super::low_rank::outer_add;
use super::matmul::{matmul_nn, matmul_nt};
use crate::Float;
use rayon::prelude::*;

/// Elements per rayon task for the dropout mask (a multiple of 4: one hash serves 4 elements).
const DROPOUT_CHUNK: usize = 16 * 1024;

/// `xa[N, r] = x[N, D_in] · a[r, D_in]^T`, then `y[N, D_out] += scale * xa · b[D_out, r]^T`.
/// Saves `xa` for the backward.
pub fn lora_forward<T: Float>(
    y: &mut [T],
    xa: &mut [T],
    x: &[T],
    a: &[T],
    b: &[T],
    scale: T,
    n: usize,
    d_in: usize,
    d_out: usize,
    r: usize,
) {
    matmul_nt(xa, x, a, n, d_in, r, false);
    // Fold the scale into a copy of the small [N, r] product, not into B.
    let scaled: Vec<T> = xa.iter().map(|&v| v * scale).collect();
    matmul_nt(y, &scaled, b, n, r, d_out, true);
}

/// Backward of [`lora_forward`], accumulating: `db += scale * dy^T · xa`,
/// `da += (scale * dy · b)^T · x`, `dx += (scale * dy · b) · a`. `None` is not computed.
pub fn lora_backward<T: Float>(
    dx: Option<&mut [T]>,
    da: Option<&mut [T]>,
    db: Option<&mut [T]>,
    dy: &[T],
    x: &[T],
    xa: &[T],
    a: &[T],
    b: &[T],
    scale: T,
    n: usize,
    d_in: usize,
    d_out: usize,
    r: usize,
) {
    let mut dxa = vec![T::zero(); n * r]; // [N, r] = scale * dy · b
    matmul_nn(&mut dxa, dy, b, n, d_out, r, false);
    dxa.iter_mut().for_each(|v| *v *= scale);
    lora_weight_grads(da, db, dy, x, xa, &dxa, scale, n, d_in, d_out, r);
    if let Some(dx) = dx {
        matmul_nn(dx, &dxa, a, n, r, d_in, true);
    }
}

/// The adapter's weight gradients, given the branch's `dxa = scale * dy · b` ([N, r]):
/// `db += scale * dy^T · xa`, `da += dxa^T · x`, both sums over the token rows
/// ([`outer_add`]). `None` is not computed.
pub fn lora_weight_grads<T: Float>(
    da: Option<&mut [T]>,
    db: Option<&mut [T]>,
    dy: &[T],
    x: &[T],
    xa: &[T],
    dxa: &[T],
    scale: T,
    n: usize,
    d_in: usize,
    d_out: usize,
    r: usize,
) {
    if let Some(db) = db {
        let scaled: Vec<T> = xa.iter().map(|&v| v * scale).collect();
        outer_add(db, dy, &scaled, n, d_out, r);
    }
    if let Some(da) = da {
        // da[r, D_in] += dxa^T · x, computed as its transpose x^T · dxa ([D_in, r]).
        let mut da_t = vec![T::zero(); d_in * r];
        outer_add(&mut da_t, x, dxa, n, d_in, r);
        for (j, row) in da_t.chunks(r).enumerate() {
            for (q, &v) in row.iter().enumerate() {
                da[q * d_in + j] += v;
            }
        }
    }
}

/// splitmix64: a fast, well-mixed hash of a counter (Steele et al., 2014).
#[inline]
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Inverted dropout: `out = x * keep / (1 - p)` where element `i` is kept iff a 16-bit slice
/// of `splitmix64(seed, i / 4)` is at least `p * 65536` (p is resolved to 1/65536).
/// Applying it to a gradient gives the backward (the same mask and scale).
pub fn dropout_forward<T: Float>(out: &mut [T], x: &[T], p: f64, seed: u64) {
    assert_eq!(out.len(), x.len(), "dropout: shapes");
    let threshold = (p * 65536.0).round() as u64;
    let keep_scale = T::of(1.0 / (1.0 - p));
    let key = splitmix64(seed);
    out.par_chunks_mut(DROPOUT_CHUNK)
        .zip(x.par_chunks(DROPOUT_CHUNK))
        .enumerate()
        .for_each(|(c, (o, x))| {
            let first_group = (c * DROPOUT_CHUNK / 4) as u64;
            // One hash per group of 4 elements, its four 16-bit slices one per element.
            for (g, (o4, x4)) in o.chunks_mut(4).zip(x.chunks(4)).enumerate() {
                let hash = splitmix64(key ^ (first_group + g as u64));
                for (lane, (o, &x)) in o4.iter_mut().zip(x4).enumerate() {
                    let bits = (hash >> (16 * lane)) & 0xFFFF;
                    *o = if bits >= threshold {
                        x * keep_scale
                    } else {
                        T::zero()
                    };
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check_grad_out, max_rel_diff, randv, to_f32};

    const N: usize = 5;
    const D_IN: usize = 6;
    const D_OUT: usize = 7;
    const R: usize = 3;
    const S: f64 = 0.75;

    fn forward(x: &[f64], a: &[f64], b: &[f64]) -> Vec<f64> {
        let mut y = vec![0.0; N * D_OUT];
        let mut xa = vec![0.0; N * R];
        lora_forward(&mut y, &mut xa, x, a, b, S, N, D_IN, D_OUT, R);
        y
    }

    #[test]
    fn lora_forward_matches_hand_formula_and_f32() {
        let (x, a, b) = (randv(N * D_IN, 1), randv(R * D_IN, 2), randv(D_OUT * R, 3));
        let y = forward(&x, &a, &b);
        for i in 0..N {
            for o in 0..D_OUT {
                let want: f64 = S
                    * (0..R)
                        .map(|k| {
                            let xa: f64 =
                                (0..D_IN).map(|j| x[i * D_IN + j] * a[k * D_IN + j]).sum();
                            xa * b[o * R + k]
                        })
                        .sum::<f64>();
                assert!((y[i * D_OUT + o] - want).abs() < 1e-13);
            }
        }
        let (mut y32, mut xa32) = (vec![0.0f32; N * D_OUT], vec![0.0f32; N * R]);
        let (x32, a32, b32) = (to_f32(&x), to_f32(&a), to_f32(&b));
        lora_forward(
            &mut y32, &mut xa32, &x32, &a32, &b32, S as f32, N, D_IN, D_OUT, R,
        );
        assert!(max_rel_diff(&y32, &y) < 1e-5);
    }

    #[test]
    fn lora_gradcheck() {
        let (x, a, b) = (randv(N * D_IN, 4), randv(R * D_IN, 5), randv(D_OUT * R, 6));
        let r = randv(N * D_OUT, 7);
        let mut xa = vec![0.0; N * R];
        let mut y = vec![0.0; N * D_OUT];
        lora_forward(&mut y, &mut xa, &x, &a, &b, S, N, D_IN, D_OUT, R);
        let (mut dx, mut da, mut db) = (
            vec![0.0; N * D_IN],
            vec![0.0; R * D_IN],
            vec![0.0; D_OUT * R],
        );
        let (dxs, das, dbs) = (Some(&mut dx[..]), Some(&mut da[..]), Some(&mut db[..]));
        lora_backward(dxs, das, dbs, &r, &x, &xa, &a, &b, S, N, D_IN, D_OUT, R);
        let ex = check_grad_out("lora dx", &x, &dx, &r, |x| forward(x, &a, &b));
        let ea = check_grad_out("lora da", &a, &da, &r, |a| forward(&x, a, &b));
        let eb = check_grad_out("lora db", &b, &db, &r, |b| forward(&x, &a, b));
        assert!(ex < 1e-6 && ea < 1e-6 && eb < 1e-6, "{ex} {ea} {eb}");
    }

    /// With B = 0 (PEFT's initialisation) the branch adds nothing, but A still gets no gradient
    /// while B does: training starts from the base model exactly.
    #[test]
    fn zero_b_adds_nothing_and_only_b_learns_first() {
        let (x, a, b) = (randv(N * D_IN, 8), randv(R * D_IN, 9), vec![0.0; D_OUT * R]);
        assert!(forward(&x, &a, &b).iter().all(|&v| v == 0.0));
        let r = randv(N * D_OUT, 10);
        let mut xa = vec![0.0; N * R];
        lora_forward(
            &mut vec![0.0; N * D_OUT],
            &mut xa,
            &x,
            &a,
            &b,
            S,
            N,
            D_IN,
            D_OUT,
            R,
        );
        let (mut da, mut db) = (vec![0.0; R * D_IN], vec![0.0; D_OUT * R]);
        lora_backward(
            None,
            Some(&mut da),
            Some(&mut db),
            &r,
            &x,
            &xa,
            &a,
            &b,
            S,
            N,
            D_IN,
            D_OUT,
            R,
        );
        assert!(da.iter().all(|&v| v == 0.0));
        assert!(db.iter().any(|&v| v != 0.0));
    }

    #[test]
    fn dropout_is_reproducible_unbiased_and_drops_about_p() {
        let x = vec![1.0f64; 100_000];
        let (mut o1, mut o2) = (vec![0.0; x.len()], vec![0.0; x.len()]);
        dropout_forward(&mut o1, &x, 0.1, 42);
        dropout_forward(&mut o2, &x, 0.1, 42);
        assert_eq!(o1, o2, "the same seed must give the same mask");
        let dropped = o1.iter().filter(|&&v| v == 0.0).count() as f64 / x.len() as f64;
        assert!((dropped - 0.1).abs() < 0.005, "dropped {dropped}");
        let mean: f64 = o1.iter().sum::<f64>() / x.len() as f64;
        assert!(
            (mean - 1.0).abs() < 0.01,
            "inverted dropout keeps the mean: {mean}"
        );
        dropout_forward(&mut o2, &x, 0.1, 43);
        assert_ne!(o1, o2, "another seed, another mask");
        dropout_forward(&mut o2, &x, 0.0, 43);
        assert_eq!(o2, x, "p = 0 keeps everything");
    }

    /// The grouped mask equals the per-element definition, across rayon chunks and a ragged end.
    #[test]
    fn dropout_matches_per_element_definition() {
        let (len, p, seed) = (3 * DROPOUT_CHUNK + 7, 0.3, 9);
        let x = randv(len, 11);
        let mut out = vec![f64::NAN; len];
        dropout_forward(&mut out, &x, p, seed);
        let (key, threshold) = (splitmix64(seed), (p * 65536.0).round() as u64);
        for (i, (&o, &x)) in out.iter().zip(&x).enumerate() {
            let bits = (splitmix64(key ^ (i as u64 / 4)) >> (16 * (i % 4))) & 0xFFFF;
            let want = if bits >= threshold {
                x * (1.0 / (1.0 - p))
            } else {
                0.0
            };
            assert_eq!(o, want, "element {i}");
        }
        let mut out32 = vec![f32::NAN; len];
        dropout_forward(&mut out32, &to_f32(&x), p, seed);
        assert!(max_rel_diff(&out32, &out) < 1e-6);
    }
}
