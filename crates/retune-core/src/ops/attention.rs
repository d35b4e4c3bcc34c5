//! Causal grouped-query attention with optional segment masking (packed sequences).
//!
//! Sizes: B batch rows of T tokens (N = B * T), NH query heads, NKV key/value heads, HD head
//! width. Query head `h` reads kv head `h / (NH / NKV)`. Query `i` attends key `j` of the same
//! batch row iff `j <= i` and, with segments, both tokens carry the same segment id.
//! Scores are scaled by `1 / sqrt(HD)`; the softmax subtracts the row max and sums in `T`.

use crate::Float;
use rayon::prelude::*;

/// Probability rows (or tokens) per rayon task.
const ROWS_PER_TASK: usize = 4;

/// `a · b` with 8 independent partial sums, so the compiler can vectorise the loop.
fn dot<T: Float>(a: &[T], b: &[T]) -> T {
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .fold(T::zero(), |s, (&x, &y)| s + x * y);
    let mut acc = [T::zero(); 8];
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().fold(tail, |s, &x| s + x)
}

/// `y += alpha * x`.
fn axpy<T: Float>(y: &mut [T], alpha: T, x: &[T]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y += alpha * x;
    }
}

/// Validates the shared shapes; returns the query heads per kv head.
fn check_shapes<T>(
    out: &[T],
    probs: &[T],
    q: &[T],
    k: &[T],
    v: &[T],
    b: usize,
    t: usize,
    nh: usize,
    nkv: usize,
    hd: usize,
) -> usize {
    assert!(
        nkv > 0 && nh.is_multiple_of(nkv),
        "attention: NH ({nh}) must be a multiple of NKV ({nkv})"
    );
    assert!(hd > 0, "attention: HD must be positive");
    let n = b * t;
    assert!(
        q.len() == n * nh * hd && out.len() == n * nh * hd,
        "attention: q/out must be [N, NH, HD]"
    );
    assert!(
        k.len() == n * nkv * hd && v.len() == n * nkv * hd,
        "attention: k/v must be [N, NKV, HD]"
    );
    assert_eq!(
        probs.len(),
        b * nh * t * t,
        "attention: probs must be [B, NH, T, T]"
    );
    nh / nkv
}

/// `out[N, NH, HD] = softmax(q k^T / sqrt(HD) + mask) v`; saves `probs[B, NH, T, T]` (masked
/// entries 0) for the backward. `segments[N]`, when given, confines attention to equal ids.
pub fn attention_forward<T: Float>(
    out: &mut [T],
    probs: &mut [T],
    q: &[T],
    k: &[T],
    v: &[T],
    segments: Option<&[u32]>,
    b: usize,
    t: usize,
    nh: usize,
    nkv: usize,
    hd: usize,
) {
    let group = check_shapes(out, probs, q, k, v, b, t, nh, nkv, hd);
    if let Some(s) = segments {
        assert_eq!(s.len(), b * t, "attention: segments must be [N]");
    }
    if probs.is_empty() {
        return;
    }
    let scale = T::of(1.0 / (hd as f64).sqrt());

    // Pass 1: one softmax row per (batch, head, query); rows are disjoint, so no sharing.
    probs
        .par_chunks_mut(t)
        .enumerate()
        .with_min_len(ROWS_PER_TASK)
        .for_each(|(row, p)| {
            let (bb, h, i) = (row / (nh * t), row / t % nh, row % t);
            let (base, kvh) = (bb * t, h / group);
            let qi = &q[((base + i) * nh + h) * hd..][..hd];
            let (visible, future) = p.split_at_mut(i + 1);
            future.fill(T::zero());
            let mut max = T::neg_infinity();
            for (j, pj) in visible.iter_mut().enumerate() {
                let same_segment = segments.is_none_or(|s| s[base + j] == s[base + i]);
                *pj = if same_segment {
                    let s = dot(qi, &k[((base + j) * nkv + kvh) * hd..][..hd]) * scale;
                    max = max.max(s);
                    s
                } else {
                    T::neg_infinity() // exp() below turns it into an exact 0
                };
            }
            // max is finite: query i always sees itself.
            let mut sum = T::zero();
            for pj in visible.iter_mut() {
                *pj = (*pj - max).exp();
                sum += *pj;
            }
            let inv = T::one() / sum;
            visible.iter_mut().for_each(|pj| *pj *= inv);
        });

    // Pass 2: out = probs · v, one token (all heads) per item.
    let probs = &*probs;
    out.par_chunks_mut(nh * hd)
        .enumerate()
        .with_min_len(ROWS_PER_TASK)
        .for_each(|(tok, orow)| {
            let (bb, i) = (tok / t, tok % t);
            for (h, o) in orow.chunks_exact_mut(hd).enumerate() {
                o.fill(T::zero());
                let p = &probs[((bb * nh + h) * t + i) * t..][..=i];
                for (j, &pj) in p.iter().enumerate() {
                    if pj != T::zero() {
                        axpy(o, pj, &v[((bb * t + j) * nkv + h / group) * hd..][..hd]);
                    }
                }
            }
        });
}

/// Backward of [`attention_forward`], accumulating into `dq[N, NH, HD]`, `dk[N, NKV, HD]`,
/// `dv[N, NKV, HD]`. The mask lives in `probs` (its zeros), so segments are not needed.
///
/// Each (batch, head) pair runs as one rayon task writing its own `dq`, `dk`, `dv` partials
/// (3 x `[T, HD]` in a scratch buffer); a second pass sums them per token, so no two threads
/// ever write the same gradient row.
pub fn attention_backward<T: Float>(
    dq: &mut [T],
    dk: &mut [T],
    dv: &mut [T],
    dout: &[T],
    q: &[T],
    k: &[T],
    v: &[T],
    probs: &[T],
    b: usize,
    t: usize,
    nh: usize,
    nkv: usize,
    hd: usize,
) {
    let group = check_shapes(dout, probs, q, k, v, b, t, nh, nkv, hd);
    assert!(
        dq.len() == q.len() && dk.len() == k.len() && dv.len() == v.len(),
        "attention: grad shapes"
    );
    if probs.is_empty() {
        return;
    }
    let scale = T::of(1.0 / (hd as f64).sqrt());
    let mut partials = vec![T::zero(); b * nh * 3 * t * hd]; // [B, NH, {dq, dk, dv}, T, HD]

    partials
        .par_chunks_mut(3 * t * hd)
        .enumerate()
        .for_each(|(bh, part)| {
            let (base, h) = (bh / nh * t, bh % nh);
            let kvh = h / group;
            let (pdq, rest) = part.split_at_mut(t * hd);
            let (pdk, pdv) = rest.split_at_mut(t * hd);
            let mut ds = vec![T::zero(); t]; // one row of dP, then dS
            for i in 0..t {
                let p = &probs[(bh * t + i) * t..][..=i];
                let go = &dout[((base + i) * nh + h) * hd..][..hd];
                let qi = &q[((base + i) * nh + h) * hd..][..hd];
                // dP_ij = dout_i · v_j;  D = sum_j P_ij dP_ij (the softmax Jacobian's row term).
                let mut d = T::zero();
                for (j, (&pj, dsj)) in p.iter().zip(ds.iter_mut()).enumerate() {
                    *dsj = if pj != T::zero() {
                        dot(go, &v[((base + j) * nkv + kvh) * hd..][..hd])
                    } else {
                        T::zero()
                    };
                    d += pj * *dsj;
                }
                let dqi = &mut pdq[i * hd..][..hd];
                for (j, (&pj, &dpj)) in p.iter().zip(ds.iter()).enumerate() {
                    if pj == T::zero() {
                        continue; // masked (or underflowed): contributes exactly nothing
                    }
                    let dsj = pj * (dpj - d) * scale; // dS scaled, since S = scale * q·k
                    axpy(dqi, dsj, &k[((base + j) * nkv + kvh) * hd..][..hd]);
                    axpy(&mut pdk[j * hd..][..hd], dsj, qi);
                    axpy(&mut pdv[j * hd..][..hd], pj, go);
                }
            }
        });

    // Sum the per-head partials into each token's rows (each task owns one token).
    let partials = &partials;
    dq.par_chunks_mut(nh * hd)
        .zip(dk.par_chunks_mut(nkv * hd))
        .zip(dv.par_chunks_mut(nkv * hd))
        .enumerate()
        .with_min_len(ROWS_PER_TASK)
        .for_each(|(tok, ((dqr, dkr), dvr))| {
            let (bb, i) = (tok / t, tok % t);
            for h in 0..nh {
                let part = &partials[(bb * nh + h) * 3 * t * hd..][..3 * t * hd];
                let kv = h / group * hd..(h / group + 1) * hd;
                axpy(
                    &mut dqr[h * hd..(h + 1) * hd],
                    T::one(),
                    &part[i * hd..][..hd],
                );
                axpy(&mut dkr[kv.clone()], T::one(), &part[(t + i) * hd..][..hd]);
                axpy(&mut dvr[kv], T::one(), &part[(2 * t + i) * hd..][..hd]);
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check_grad_out, max_rel_diff, randv, to_f32};

    const B: usize = 2;
    const T: usize = 5;
    const NH: usize = 4;
    const NKV: usize = 2;
    const HD: usize = 4;
    const N: usize = B * T;
    /// Batch row 0 packs two examples (2 + 3 tokens), row 1 packs 3 + 2.
    const SEGMENTS: [u32; N] = [0, 0, 1, 1, 1, 5, 5, 5, 7, 7];

    fn forward(q: &[f64], k: &[f64], v: &[f64], seg: Option<&[u32]>) -> (Vec<f64>, Vec<f64>) {
        let (mut out, mut probs) = (vec![0.0; N * NH * HD], vec![f64::NAN; B * NH * T * T]);
        attention_forward(&mut out, &mut probs, q, k, v, seg, B, T, NH, NKV, HD);
        (out, probs)
    }

    fn inputs(seed: u64) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        (
            randv(N * NH * HD, seed),
            randv(N * NKV * HD, seed + 1),
            randv(N * NKV * HD, seed + 2),
        )
    }

    /// Textbook attention: full score matrix, -inf mask, softmax, weighted sum.
    fn naive(q: &[f64], k: &[f64], v: &[f64], seg: Option<&[u32]>) -> (Vec<f64>, Vec<f64>) {
        let (mut out, mut probs) = (vec![0.0; N * NH * HD], vec![0.0; B * NH * T * T]);
        for bb in 0..B {
            for h in 0..NH {
                let kvh = h / (NH / NKV);
                for i in 0..T {
                    let qrow = (bb * T + i) * NH + h;
                    let mut s = [0.0f64; T];
                    for j in 0..T {
                        let allowed = j <= i && seg.is_none_or(|s| s[bb * T + i] == s[bb * T + j]);
                        let krow = (bb * T + j) * NKV + kvh;
                        s[j] = if allowed {
                            (0..HD)
                                .map(|d| q[qrow * HD + d] * k[krow * HD + d])
                                .sum::<f64>()
                                / (HD as f64).sqrt()
                        } else {
                            f64::NEG_INFINITY
                        };
                    }
                    let z: f64 = s.iter().map(|x| x.exp()).sum();
                    for j in 0..T {
                        let p = s[j].exp() / z;
                        probs[((bb * NH + h) * T + i) * T + j] = p;
                        let vrow = (bb * T + j) * NKV + kvh;
                        for d in 0..HD {
                            out[qrow * HD + d] += p * v[vrow * HD + d];
                        }
                    }
                }
            }
        }
        (out, probs)
    }

    #[test]
    fn attention_forward_matches_naive_and_f32() {
        for seg in [None, Some(&SEGMENTS[..])] {
            let (q, k, v) = inputs(1);
            let (out, probs) = forward(&q, &k, &v, seg);
            let (want_out, want_probs) = naive(&q, &k, &v, seg);
            assert!(max_rel_diff(&out, &want_out) < 1e-14);
            assert!(max_rel_diff(&probs, &want_probs) < 1e-14);
            let (mut out32, mut probs32) =
                (vec![0.0f32; N * NH * HD], vec![0.0f32; B * NH * T * T]);
            let (q32, k32, v32) = (to_f32(&q), to_f32(&k), to_f32(&v));
            attention_forward(
                &mut out32,
                &mut probs32,
                &q32,
                &k32,
                &v32,
                seg,
                B,
                T,
                NH,
                NKV,
                HD,
            );
            assert!(max_rel_diff(&out32, &out) < 1e-5);
        }
    }

    /// Tokens of another segment (or batch row) must not influence a query's output.
    #[test]
    fn attention_segments_isolate_examples() {
        let (q, k, v) = inputs(4);
        let (base, _) = forward(&q, &k, &v, Some(&SEGMENTS));
        // Perturb keys and values of tokens 0, 1 (segment 0 of row 0).
        let (mut k2, mut v2) = (k.clone(), v.clone());
        for x in k2[..2 * NKV * HD]
            .iter_mut()
            .chain(v2[..2 * NKV * HD].iter_mut())
        {
            *x += 0.5;
        }
        let (seg_out, _) = forward(&q, &k2, &v2, Some(&SEGMENTS));
        let row = NH * HD;
        assert_eq!(
            seg_out[2 * row..],
            base[2 * row..],
            "segment 1 and row 1 unchanged"
        );
        assert_ne!(
            seg_out[..2 * row],
            base[..2 * row],
            "segment 0 itself changes"
        );
        // Without segments, the later tokens of row 0 do see them; row 1 never does.
        let (plain, _) = forward(&q, &k, &v, None);
        let (plain2, _) = forward(&q, &k2, &v2, None);
        assert_ne!(plain2[2 * row..T * row], plain[2 * row..T * row]);
        assert_eq!(plain2[T * row..], plain[T * row..]);
    }

    #[test]
    fn attention_gradcheck() {
        for (name, seg) in [("plain", None), ("segments", Some(&SEGMENTS[..]))] {
            let (q, k, v) = inputs(7);
            let r = randv(N * NH * HD, 10);
            let (_, probs) = forward(&q, &k, &v, seg);
            let (mut dq, mut dk, mut dv) =
                (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
            attention_backward(
                &mut dq, &mut dk, &mut dv, &r, &q, &k, &v, &probs, B, T, NH, NKV, HD,
            );
            let eq = check_grad_out(&format!("attention {name} dq"), &q, &dq, &r, |q| {
                forward(q, &k, &v, seg).0
            });
            let ek = check_grad_out(&format!("attention {name} dk"), &k, &dk, &r, |k| {
                forward(&q, k, &v, seg).0
            });
            let ev = check_grad_out(&format!("attention {name} dv"), &v, &dv, &r, |v| {
                forward(&q, &k, v, seg).0
            });
            assert!(eq < 1e-6 && ek < 1e-6 && ev < 1e-6, "{name}");
            // Accumulates: a second call doubles every gradient.
            let once = (dq.clone(), dk.clone(), dv.clone());
            attention_backward(
                &mut dq, &mut dk, &mut dv, &r, &q, &k, &v, &probs, B, T, NH, NKV, HD,
            );
            let twice =
                |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(a, b)| (a - 2.0 * b).abs() < 1e-14);
            assert!(twice(&dq, &once.0) && twice(&dk, &once.1) && twice(&dv, &once.2));
        }
    }
}
