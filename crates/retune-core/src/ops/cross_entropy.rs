//! LM head fused with cross-entropy, in row chunks so the `[N, V]` logits never exist whole.

use super::matmul::{
    matmul_frozen_nn, matmul_frozen_nt, matmul_nn, matmul_nt, matmul_tn, FrozenWeight,
};
use super::swiglu::{as_f32_mut, exp_f32, max_f32, simd_dispatch};
use crate::Float;
use rayon::prelude::*;
use std::any::Any;
use std::sync::Mutex;

/// Target id of a position that takes no loss (prompt tokens, padding).
pub const IGNORE: u32 = u32::MAX;

/// Loss statistics of one [`lm_head_cross_entropy`] call.
#[derive(Clone, Copy, Debug, Default)]
pub struct CeStats {
    /// Sum of `-log p(target)` over the non-[`IGNORE`] targets.
    pub loss_sum: f64,
    /// Number of non-[`IGNORE`] targets.
    pub count: usize,
    /// How many of them are the logits' argmax.
    pub correct: usize,
}

impl CeStats {
    fn merge(self, o: CeStats) -> CeStats {
        CeStats {
            loss_sum: self.loss_sum + o.loss_sum,
            count: self.count + o.count,
            correct: self.correct + o.correct,
        }
    }
}

/// Turns one row of logits `[V]` into `grad_scale * (softmax - onehot(target))` in place and
/// returns its loss statistics; an [`IGNORE`] row becomes zeros and counts nothing.
fn softmax_row<T: Float>(row: &mut [T], target: u32, grad_scale: T) -> CeStats {
    if target == IGNORE {
        row.fill(T::zero());
        return CeStats::default();
    }
    let tgt = target as usize;
    assert!(
        tgt < row.len(),
        "cross-entropy: target {tgt} outside vocabulary of {}",
        row.len()
    );
    let target_logit = row[tgt].as_f64();
    let ExpSum { argmax, max, sum } = exp_sum(row);
    let scale = T::of(grad_scale.as_f64() / sum);
    for x in row.iter_mut() {
        *x *= scale;
    }
    row[tgt] -= grad_scale;
    CeStats {
        loss_sum: sum.ln() + max - target_logit,
        count: 1,
        correct: usize::from(argmax == tgt),
    }
}

/// Replaces a row of logits by `exp(x - max)` and reports the max, its first index and the sum
/// (16 lanes wide with the polynomial exp in f32).
fn exp_sum<T: Float>(row: &mut [T]) -> ExpSum {
    if let Some(row) = as_f32_mut(row) {
        let mut out = ExpSum::default();
        exp_sum_f32(row, &mut out);
        return out;
    }
    let (mut argmax, mut max) = (0, T::neg_infinity());
    for (j, &x) in row.iter().enumerate() {
        if x > max {
            (argmax, max) = (j, x);
        }
    }
    let mut sum = 0.0f64;
    for x in row.iter_mut() {
        *x = (*x - max).exp();
        sum += x.as_f64();
    }
    ExpSum {
        argmax,
        max: max.as_f64(),
        sum,
    }
}

/// What [`exp_sum`] finds in a row of logits.
#[derive(Default)]
pub(crate) struct ExpSum {
    /// The first index of the largest logit, and that logit.
    argmax: usize,
    max: f64,
    /// `sum_j exp(x_j - max)`, in f64: a sum of ~100k exps would lose digits in f32.
    sum: f64,
}

/// f32 lanes of the vectorised loops.
const LANES: usize = 16;
/// Elements summed in f32 lanes before the partial sums move to the f64 total (each lane adds
/// at most 64 values in (0, 1]).
const SUM_BLOCK: usize = 64 * LANES;

simd_dispatch!(
    /// Replaces a row of logits by `exp(x - max)` (the polynomial exp, 16 lanes wide) and
    /// reports the max, its first index and the sum.
    fn exp_sum_f32 => exp_sum_f32_body(row: &mut [f32], out: &mut ExpSum)
);

#[inline(always)]
fn exp_sum_f32_body(row: &mut [f32], out: &mut ExpSum) {
    let max = max_f32(row);
    let argmax = row.iter().position(|&x| x == max).unwrap_or(0);
    let mut sum = 0.0f64;
    for block in row.chunks_mut(SUM_BLOCK) {
        let mut sums = [0.0f32; LANES];
        let mut lanes = block.chunks_exact_mut(LANES);
        for blk in &mut lanes {
            for l in 0..LANES {
                blk[l] = exp_f32(blk[l] - max);
                sums[l] += blk[l];
            }
        }
        for x in lanes.into_remainder() {
            *x = exp_f32(*x - max);
            sum += *x as f64;
        }
        sum += sums.iter().map(|&s| s as f64).sum::<f64>();
    }
    *out = ExpSum {
        argmax,
        max: max as f64,
        sum,
    };
}

/// The gradient scale of each row of the loss: one for all (`1 / count` for the mean loss), or
/// one per row (preference objectives weight each completion token by its sequence's
/// coefficient, negative for the rejected side).
#[derive(Clone, Copy, Debug)]
pub enum GradScale<'a, T> {
    /// The same scale for every row.
    Uniform(T),
    /// `[N]` scales, row by row.
    PerRow(&'a [T]),
}

impl<T> From<T> for GradScale<'_, T> {
    fn from(scale: T) -> Self {
        GradScale::Uniform(scale)
    }
}

impl<'a, T> From<&'a [T]> for GradScale<'a, T> {
    fn from(scales: &'a [T]) -> Self {
        GradScale::PerRow(scales)
    }
}

/// Fused LM head and cross-entropy over `h[N, C]`, `w[V, C]`, `targets[N]` ([`IGNORE`] = no
/// loss). Logits `h · w^T` are formed `chunk_rows` rows at a time in one `[chunk_rows, V]`
/// buffer. When `dh[N, C]` / `dw[V, C]` are given they are accumulated with
/// `dlogits_i = scale_i * (softmax - onehot)` (zero on [`IGNORE`] rows), the gradient of
/// `sum_i scale_i * (-log p_i(target_i))`: `dh += dlogits · w`, `dw += dlogits^T · h`.
/// `packs`: the head's bf16 packs when it is frozen under bf16 precision (else `None`).
pub fn lm_head_cross_entropy<'a, T: Float>(
    h: &[T],
    w: &[T],
    packs: Option<&FrozenWeight>,
    targets: &[u32],
    n: usize,
    c: usize,
    v: usize,
    chunk_rows: usize,
    grad_scale: impl Into<GradScale<'a, T>>,
    dh: Option<&mut [T]>,
    dw: Option<&mut [T]>,
) -> CeStats {
    match grad_scale.into() {
        GradScale::Uniform(s) => {
            head_loss(h, w, packs, targets, n, c, v, chunk_rows, |_| s, dh, dw)
        }
        GradScale::PerRow(rows) => {
            assert_eq!(rows.len(), n, "cross-entropy: one scale per row, [N]");
            head_loss(
                h,
                w,
                packs,
                targets,
                n,
                c,
                v,
                chunk_rows,
                |i| rows[i],
                dh,
                dw,
            )
        }
    }
}

/// `log p(target)` of every row of `h[N, C]` under the head `w[V, C]` (0 on [`IGNORE`] rows),
/// chunked like [`lm_head_cross_entropy`]. Summed per sequence these are the log-likelihoods
/// that preference objectives compare.
pub fn target_log_probs<T: Float>(
    h: &[T],
    w: &[T],
    packs: Option<&FrozenWeight>,
    targets: &[u32],
    n: usize,
    c: usize,
    v: usize,
    chunk_rows: usize,
) -> Vec<f64> {
    assert!(
        h.len() == n * c && head_fits(w, packs, v, c) && targets.len() == n,
        "cross-entropy: shape mismatch"
    );
    let rows = chunk_rows.max(1).min(n.max(1));
    let mut logits = take_logits::<T>(rows * v);
    let mut out = vec![0.0; n];
    for start in (0..n).step_by(rows) {
        let r = rows.min(n - start);
        let tc = &targets[start..start + r];
        if v == 0 || tc.iter().all(|&t| t == IGNORE) {
            continue;
        }
        let lg = &mut logits[..r * v];
        head_logits(lg, &h[start * c..(start + r) * c], w, packs, r, c, v);
        out[start..start + r]
            .par_iter_mut()
            .zip(lg.par_chunks_mut(v))
            .zip(tc)
            .for_each(|((o, row), &tgt)| *o = target_log_prob(row, tgt));
    }
    keep_logits(logits);
    out
}

/// `log softmax(row)[target]`, 0 for [`IGNORE`]; the row is left as scratch.
fn target_log_prob<T: Float>(row: &mut [T], target: u32) -> f64 {
    if target == IGNORE {
        return 0.0;
    }
    let tgt = target as usize;
    assert!(
        tgt < row.len(),
        "cross-entropy: target {tgt} outside vocabulary of {}",
        row.len()
    );
    let target_logit = row[tgt].as_f64();
    let ExpSum { max, sum, .. } = exp_sum(row);
    target_logit - max - sum.ln()
}

/// The chunked head shared by the cross-entropy entry points; `row_scale(i)` is row `i`'s
/// gradient scale.
fn head_loss<T: Float>(
    h: &[T],
    w: &[T],
    packs: Option<&FrozenWeight>,
    targets: &[u32],
    n: usize,
    c: usize,
    v: usize,
    chunk_rows: usize,
    row_scale: impl Fn(usize) -> T + Sync,
    mut dh: Option<&mut [T]>,
    mut dw: Option<&mut [T]>,
) -> CeStats {
    assert!(
        h.len() == n * c && head_fits(w, packs, v, c) && targets.len() == n,
        "cross-entropy: shape mismatch"
    );
    assert!(chunk_rows > 0, "cross-entropy: chunk_rows must be positive");
    if let Some(dh) = dh.as_deref() {
        assert_eq!(dh.len(), n * c, "cross-entropy: dh must be [N, C]");
    }
    let rows = chunk_rows.min(n);
    let mut logits = take_logits::<T>(rows * v);
    let mut stats = CeStats::default();
    if v == 0 {
        return stats;
    }
    for start in (0..n).step_by(rows.max(1)) {
        let r = rows.min(n - start);
        let tc = &targets[start..start + r];
        if tc.iter().all(|&t| t == IGNORE) {
            continue; // no loss, zero gradient: skip the matmuls
        }
        let hc = &h[start * c..(start + r) * c];
        let lg = &mut logits[..r * v];
        head_logits(lg, hc, w, packs, r, c, v);
        // Rows in parallel, their statistics summed in row order: a rayon reduce would add
        // the f64 losses in a work-stealing order, and the reported loss would vary run to run.
        let rows_stats: Vec<CeStats> = lg
            .par_chunks_mut(v)
            .zip(tc)
            .enumerate()
            .map(|(i, (row, &tgt))| softmax_row(row, tgt, row_scale(start + i)))
            .collect();
        stats = rows_stats.into_iter().fold(stats, CeStats::merge);
        if let Some(dh) = dh.as_deref_mut() {
            let dhc = &mut dh[start * c..(start + r) * c];
            if !packs.is_some_and(|p| matmul_frozen_nn(dhc, lg, p, r)) {
                matmul_nn(dhc, lg, w, r, v, c, true);
            }
        }
        if let Some(dw) = dw.as_deref_mut() {
            matmul_tn(dw, lg, hc, v, r, c, true);
        }
    }
    keep_logits(logits);
    stats
}

/// The logits buffer of the last [`head_loss`], kept for the next. A new `[chunk_rows, V]`
/// buffer (96 MiB for a trained SmolLM2 head's 512-row chunks) is fresh pages on every step,
/// which the kernel faults in and zeroes (1% of a full fine-tuning step); the head's product
/// overwrites every element anyway.
static SPARE_LOGITS: Mutex<Option<Box<dyn Any + Send>>> = Mutex::new(None);

/// A buffer of `len` elements of unspecified values: the kept one when it has that length.
fn take_logits<T: Float>(len: usize) -> Vec<T> {
    let kept = SPARE_LOGITS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    match kept.and_then(|b| b.downcast::<Vec<T>>().ok()) {
        Some(buf) if buf.len() == len => *buf,
        _ => vec![T::zero(); len],
    }
}

/// Keeps `buf` for the next [`take_logits`].
fn keep_logits<T: Float>(buf: Vec<T>) {
    *SPARE_LOGITS.lock().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(buf));
}

/// Whether the head `[V, C]` is there: its values, or (a head held only in its storage) its
/// stored matrix.
fn head_fits<T>(w: &[T], packs: Option<&FrozenWeight>, v: usize, c: usize) -> bool {
    match packs.and_then(FrozenWeight::stored) {
        Some(s) => s.rows() == v && s.cols() == c,
        None => w.len() == v * c,
    }
}

/// `logits[r, V] = h[r, C] · w[V, C]^T`, from the packs when given.
fn head_logits<T: Float>(
    logits: &mut [T],
    h: &[T],
    w: &[T],
    packs: Option<&FrozenWeight>,
    r: usize,
    c: usize,
    v: usize,
) {
    match packs {
        Some(p) => matmul_frozen_nt(logits, h, p, r),
        None => matmul_nt(logits, h, w, r, c, v, false),
    }
}

/// `logits[N, V] = h[N, C] · w[V, C]^T` (the LM head alone, for generation).
pub fn logits_forward<T: Float>(logits: &mut [T], h: &[T], w: &[T], n: usize, c: usize, v: usize) {
    matmul_nt(logits, h, w, n, c, v, false);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check_grad, max_rel_diff, rand_ids, randv, to_f32};

    const N: usize = 11;
    const C: usize = 6;
    const V: usize = 13;
    const CHUNK: usize = 4; // smaller than N, does not divide it

    /// Targets with IGNOREs, including a whole ignored chunk (rows 4..8).
    fn targets() -> Vec<u32> {
        let mut t = rand_ids(N, V as u32, 1);
        for i in [0, 4, 5, 6, 7, 10] {
            t[i] = IGNORE;
        }
        t
    }

    #[test]
    fn vectorised_exp_sum_matches_f64_on_a_vocabulary_row() {
        // A row wider than one f32 summing block, not a multiple of 16, max in the middle
        // and repeated (the first index counts).
        let mut row64: Vec<f64> = randv(5003, 30).iter().map(|x| 8.0 * x).collect();
        row64[2500] = 9.5;
        row64[4000] = 9.5;
        let mut row: Vec<f32> = to_f32(&row64);
        let mut out = ExpSum::default();
        exp_sum_f32(&mut row, &mut out);
        assert_eq!((out.argmax, out.max), (2500, 9.5));
        let exps: Vec<f64> = row64
            .iter()
            .map(|&x| (x as f32 as f64 - 9.5).exp())
            .collect();
        let want: f64 = exps.iter().sum();
        assert!(
            (out.sum - want).abs() < 1e-6 * want,
            "{} vs {want}",
            out.sum
        );
        assert!(max_rel_diff(&row, &exps) < 1e-6);
    }

    /// Full logits, then per-row log-softmax: the textbook computation.
    fn naive(h: &[f64], w: &[f64], targets: &[u32]) -> CeStats {
        let mut logits = vec![0.0; N * V];
        logits_forward(&mut logits, h, w, N, C, V);
        let mut s = CeStats::default();
        for (row, &t) in logits.chunks(V).zip(targets) {
            if t == IGNORE {
                continue;
            }
            let lse = row.iter().map(|x| x.exp()).sum::<f64>().ln();
            let best = (0..V).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap(); // V > 0
            s = s.merge(CeStats {
                loss_sum: lse - row[t as usize],
                count: 1,
                correct: usize::from(best == t as usize),
            });
        }
        s
    }

    fn mean_loss(h: &[f64], w: &[f64], targets: &[u32]) -> f64 {
        let s = lm_head_cross_entropy(h, w, None, targets, N, C, V, CHUNK, 0.0, None, None);
        s.loss_sum / s.count as f64
    }

    #[test]
    fn cross_entropy_matches_naive_and_f32() {
        // Scaled up so the argmax is decisive and some predictions are right.
        let h: Vec<f64> = randv(N * C, 2).iter().map(|x| 3.0 * x).collect();
        let (w, t) = (randv(V * C, 3), targets());
        let got = lm_head_cross_entropy(&h, &w, None, &t, N, C, V, CHUNK, 1.0, None, None);
        let want = naive(&h, &w, &t);
        assert_eq!((got.count, got.correct), (want.count, want.correct));
        assert_eq!(got.count, 5);
        assert!((got.loss_sum - want.loss_sum).abs() < 1e-13 * want.loss_sum);
        // One chunk holding everything gives the same numbers.
        let whole = lm_head_cross_entropy(&h, &w, None, &t, N, C, V, 1000, 1.0, None, None);
        assert!((whole.loss_sum - want.loss_sum).abs() < 1e-13 * want.loss_sum);
        let s32 = lm_head_cross_entropy(
            &to_f32(&h),
            &to_f32(&w),
            None,
            &t,
            N,
            C,
            V,
            CHUNK,
            1.0,
            None,
            None,
        );
        assert!((s32.loss_sum - want.loss_sum).abs() < 1e-5 * want.loss_sum);
        let mut l32 = vec![0.0f32; N * V];
        logits_forward(&mut l32, &to_f32(&h), &to_f32(&w), N, C, V);
        let mut l64 = vec![0.0; N * V];
        logits_forward(&mut l64, &h, &w, N, C, V);
        assert!(max_rel_diff(&l32, &l64) < 1e-5);
    }

    #[test]
    fn cross_entropy_gradcheck() {
        let (h, w, t) = (randv(N * C, 4), randv(V * C, 5), targets());
        let count = t.iter().filter(|&&x| x != IGNORE).count();
        let (mut dh, mut dw) = (vec![0.0; N * C], vec![0.0; V * C]);
        let stats = lm_head_cross_entropy(
            &h,
            &w,
            None,
            &t,
            N,
            C,
            V,
            CHUNK,
            1.0 / count as f64,
            Some(&mut dh),
            Some(&mut dw),
        );
        assert_eq!(stats.count, count);
        let eh = check_grad("cross_entropy dh", &h, &dh, |h| mean_loss(h, &w, &t));
        let ew = check_grad("cross_entropy dw", &w, &dw, |w| mean_loss(&h, w, &t));
        assert!(eh < 1e-6 && ew < 1e-6);
        // Ignored rows get no gradient.
        assert!(dh[..C].iter().chain(&dh[4 * C..8 * C]).all(|&g| g == 0.0));
        // dw alone (frozen input side) and accumulation.
        let mut dw2 = dw.clone();
        lm_head_cross_entropy(
            &h,
            &w,
            None,
            &t,
            N,
            C,
            V,
            CHUNK,
            1.0 / count as f64,
            None,
            Some(&mut dw2),
        );
        assert!(dw2
            .iter()
            .zip(&dw)
            .all(|(a, b)| (a - 2.0 * b).abs() < 1e-14));
    }

    /// `sum_i scale_i * (-log p_i)`: the weighted loss whose gradient the weighted head gives.
    fn weighted_loss(h: &[f64], w: &[f64], t: &[u32], scale: &[f64]) -> f64 {
        let lp = target_log_probs(h, w, None, t, N, C, V, CHUNK);
        lp.iter().zip(scale).map(|(l, s)| -l * s).sum()
    }

    #[test]
    fn target_log_probs_match_naive_log_softmax() {
        let h: Vec<f64> = randv(N * C, 6).iter().map(|x| 2.0 * x).collect();
        let (w, t) = (randv(V * C, 7), targets());
        let got = target_log_probs(&h, &w, None, &t, N, C, V, CHUNK);
        let mut logits = vec![0.0; N * V];
        logits_forward(&mut logits, &h, &w, N, C, V);
        for (i, row) in logits.chunks(V).enumerate() {
            let want = if t[i] == IGNORE {
                0.0
            } else {
                row[t[i] as usize] - row.iter().map(|x| x.exp()).sum::<f64>().ln()
            };
            assert!(
                (got[i] - want).abs() < 1e-13,
                "row {i}: {} vs {want}",
                got[i]
            );
        }
        // The summed log-probs are minus the cross-entropy's loss sum.
        let ce = lm_head_cross_entropy(&h, &w, None, &t, N, C, V, CHUNK, 1.0, None, None);
        assert!((got.iter().sum::<f64>() + ce.loss_sum).abs() < 1e-12);
    }

    #[test]
    fn weighted_cross_entropy_gradcheck() {
        let (h, w, t) = (randv(N * C, 8), randv(V * C, 9), targets());
        // Signed weights, as a preference loss gives them (rejected tokens negative).
        let scale: Vec<f64> = randv(N, 10).iter().map(|x| 2.0 * x).collect();
        let (mut dh, mut dw) = (vec![0.0; N * C], vec![0.0; V * C]);
        lm_head_cross_entropy(
            &h,
            &w,
            None,
            &t,
            N,
            C,
            V,
            CHUNK,
            scale.as_slice(),
            Some(&mut dh),
            Some(&mut dw),
        );
        let eh = check_grad("weighted ce dh", &h, &dh, |h| {
            weighted_loss(h, &w, &t, &scale)
        });
        let ew = check_grad("weighted ce dw", &w, &dw, |w| {
            weighted_loss(&h, w, &t, &scale)
        });
        assert!(eh < 1e-6 && ew < 1e-6, "{eh} {ew}");
    }
}
