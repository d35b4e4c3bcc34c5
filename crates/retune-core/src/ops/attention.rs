//! Causal grouped-query attention with optional segment masking (packed sequences).
//!
//! Sizes: B batch rows of T tokens (N = B * T), NH query heads, NKV key/value heads, HD head
//! width. Query head `h` reads kv head `h / (NH / NKV)`. Query `i` attends key `j` of the same
//! batch row iff `j <= i` and, with segments, both tokens carry the same segment id.
//! Scores are scaled by `1 / sqrt(HD)`; the softmax subtracts the row max and sums in `T`.
//!
//! Both passes run per (batch row, head) as small dense products ([`matmul_nt`] and friends)
//! over blocks of [`Q_BLOCK`] queries: causality lets the block of queries `i0..i1` skip every
//! key from `i1` on, which saves close to half the work of the full `T x T` products.

use super::matmul::{matmul_views, View};
use super::swiglu::{as_f32, as_f32_mut, exp_f32, max_f32, simd_dispatch};
use crate::Float;
use rayon::prelude::*;

/// Queries per block: big enough for efficient products, small enough that the skipped upper
/// triangle is most of the masked half.
const Q_BLOCK: usize = 64;
/// Lanes of the softmax's reductions (independent partial maxima / sums vectorise).
const LANES: usize = 16;

/// A mutable slice that rayon tasks write through in disjoint ranges (the head-strided rows of
/// `[N, NH, HD]` tensors cannot be split into chunks by `par_chunks_mut`).
struct Disjoint<T> {
    ptr: *mut T,
    len: usize,
}

// SAFETY: access only goes through `row`, whose callers guarantee disjoint ranges per task.
unsafe impl<T: Send> Send for Disjoint<T> {}
unsafe impl<T: Send> Sync for Disjoint<T> {}

impl<T> Disjoint<T> {
    fn new(s: &mut [T]) -> Self {
        Disjoint {
            ptr: s.as_mut_ptr(),
            len: s.len(),
        }
    }

    /// `s[start..start + len]`.
    ///
    /// # Safety
    /// No other live reference (in any thread) may overlap the range.
    #[allow(clippy::mut_from_ref)]
    unsafe fn row(&self, start: usize, len: usize) -> &mut [T] {
        assert!(start + len <= self.len, "attention: row out of bounds");
        std::slice::from_raw_parts_mut(self.ptr.add(start), len)
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

/// One row of probabilities from one row of raw scores `s[..len]` (query `len - 1`): scale,
/// mask, softmax, written to `p[..len]`; `p[len..]` (as long as `s`, the keys of the query's
/// block) is zeroed. With segments, `seg` holds the segment ids of keys `..len` and `own` the
/// query's: other ids are masked (in `s`, which is scratch).
fn softmax_row<T: Float>(
    p: &mut [T],
    s: &mut [T],
    len: usize,
    scale: T,
    segments: Option<(&[u32], u32)>,
) {
    if let Some((seg, own)) = segments {
        for (x, &id) in s[..len].iter_mut().zip(seg) {
            if id != own {
                *x = T::neg_infinity(); // exp() below turns it into an exact 0
            }
        }
    }
    // The max is finite: query len - 1 always sees itself.
    if let (Some(p32), Some(s32)) = (as_f32_mut(p), as_f32_mut(s)) {
        softmax_f32(p32, s32, len, scale.as_f64() as f32);
    } else {
        let (p, s) = (&mut p[..len], &s[..len]);
        let max = s.iter().fold(T::neg_infinity(), |m, &x| m.max(x));
        let mut sum = T::zero();
        for (p, &x) in p.iter_mut().zip(s.iter()) {
            *p = ((x - max) * scale).exp();
            sum += *p;
        }
        let inv = T::one() / sum;
        p.iter_mut().for_each(|x| *x *= inv);
    }
    p[len..].fill(T::zero());
}

simd_dispatch!(
    /// [`softmax_row`] in f32 with the polynomial exp, in vectorisable blocks: `p[..len] =
    /// softmax(scale * s[..len])` (`scale > 0`, so the max of `s` gives the max of
    /// `scale * s`). The exponentials run in whole blocks past `len` as far as `p` and `s`
    /// reach (a row's last partial block would otherwise take the scalar path, as long as
    /// the vector blocks for rows of 100 keys); what lands past `len` is not summed, and
    /// [`softmax_row`] zeroes it.
    fn softmax_f32 => softmax_f32_body(p: &mut [f32], s: &mut [f32], len: usize, scale: f32)
);

#[inline(always)]
fn softmax_f32_body(p: &mut [f32], s: &mut [f32], len: usize, scale: f32) {
    let max = max_f32(&s[..len]);
    let padded = len.next_multiple_of(LANES).min(p.len().min(s.len()));
    let mut blocks = p[..padded]
        .chunks_exact_mut(LANES)
        .zip(s[..padded].chunks_exact(LANES));
    for (pb, sb) in &mut blocks {
        for l in 0..LANES {
            pb[l] = exp_f32((sb[l] - max) * scale);
        }
    }
    let whole = (padded / LANES * LANES).min(len);
    for (x, &v) in p[whole..len].iter_mut().zip(&s[whole..len]) {
        *x = exp_f32((v - max) * scale);
    }
    // Sums in the order of the row's length alone: lanes over its whole blocks, then its
    // remainder in order.
    let mut sums = [0.0f32; LANES];
    let full = len / LANES * LANES;
    for pb in p[..full].chunks_exact(LANES) {
        for l in 0..LANES {
            sums[l] += pb[l];
        }
    }
    let sum: f32 = p[full..len].iter().sum();
    let inv = 1.0 / (sum + sums.iter().sum::<f32>());
    p[..len].iter_mut().for_each(|x| *x *= inv);
}

/// `out[N, NH, HD] = softmax(q k^T / sqrt(HD) + mask) v`; saves `probs[B, NH, T, T]` for the
/// backward: masked entries are 0 up to the end of each query's block of [`Q_BLOCK`] keys,
/// and the keys after it, which neither pass reads, keep what `probs` held. `segments[N]`,
/// when given, confines attention to equal ids.
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
    let out = Disjoint::new(out);
    let bq = Q_BLOCK.min(t);

    // One task per (batch row, head): its probs are one contiguous [T, T] block, its output
    // rows are head h of the batch row's tokens, which no other task touches.
    probs.par_chunks_mut(t * t).enumerate().for_each_init(
        // Scratch, reused by all the tasks of a rayon job: one block of scores [bq, T] and one
        // block of outputs [bq, HD]. Q, K and V are read in place, head h's rows of each.
        || vec![T::zero(); bq * t + bq * hd],
        |scratch, (bh, p)| {
            let (bb, h) = (bh / nh, bh % nh);
            let (base, kvh) = (bb * t, h / group);
            let (sblk, oblk) = scratch.split_at_mut(bq * t);
            // K of the kv head transposed, [HD, T], and V, [T, HD].
            let kv_at = (base * nkv + kvh) * hd;
            let (k_t, v_h) = (
                View::transposed(&k[kv_at..], nkv * hd),
                View::rows(&v[kv_at..], nkv * hd),
            );
            for i0 in (0..t).step_by(bq) {
                let (i1, rows) = ((i0 + bq).min(t), (i0 + bq).min(t) - i0);
                // Scores of queries i0..i1 against the keys they can see, 0..i1.
                let s = &mut sblk[..rows * i1];
                let q_blk = View::rows(&q[((base + i0) * nh + h) * hd..], nh * hd);
                matmul_views(s, q_blk, k_t, rows, hd, i1, false);
                for (r, srow) in s.chunks_exact_mut(i1).enumerate() {
                    let i = i0 + r;
                    let seg = segments.map(|s| (&s[base..=base + i], s[base + i]));
                    // Keys i1.. of this row are never read (here or in the backward).
                    softmax_row(&mut p[i * t..i * t + i1], srow, i + 1, scale, seg);
                }
                // The block's probabilities straight from `probs`: rows of stride T.
                let o = &mut oblk[..rows * hd];
                matmul_views(o, View::rows(&p[i0 * t..], t), v_h, rows, i1, hd, false);
                for (r, orow) in o.chunks_exact(hd).enumerate() {
                    // SAFETY: head h of token base + i0 + r belongs to this task alone.
                    let dst = unsafe { out.row(((base + i0 + r) * nh + h) * hd, hd) };
                    dst.copy_from_slice(orow);
                }
            }
        },
    );
}

/// Backward of [`attention_forward`], accumulating into `dq[N, NH, HD]`, `dk[N, NKV, HD]`,
/// `dv[N, NKV, HD]`. The mask lives in `probs` (its zeros), so segments are not needed.
///
/// One rayon task per (batch row, kv head) runs every query head of the group, so the task
/// alone sums that kv head's `dk`, `dv` rows and writes them once: no partials to reduce.
/// Per query block, with `P` the saved probabilities and `dO` the output gradient:
/// `dP = dO V^T`, `dS = P (dP - rowsum(P dP)) / sqrt(HD)`, `dQ = dS K`, `dK += dS^T Q`,
/// `dV += P^T dO`.
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
    let bq = Q_BLOCK.min(t);
    let (dq, dk, dv) = (Disjoint::new(dq), Disjoint::new(dk), Disjoint::new(dv));

    (0..b * nkv).into_par_iter().for_each_init(
        // dK, dV of the kv head [T, HD] each; per block dQ [bq, HD] and dS [bq, T]. Q, K, V,
        // dO and P are read in place.
        || vec![T::zero(); 2 * t * hd + bq * hd + bq * t],
        |scratch, bkv| {
            let (bb, kvh) = (bkv / nkv, bkv % nkv);
            let base = bb * t;
            let (dkh, rest) = scratch.split_at_mut(t * hd);
            let (dvh, rest) = rest.split_at_mut(t * hd);
            let (dqblk, dsblk) = rest.split_at_mut(bq * hd);
            // K of the kv head, [T, HD], and V transposed, [HD, T].
            let kv_at = (base * nkv + kvh) * hd;
            let (k_h, v_t) = (
                View::rows(&k[kv_at..], nkv * hd),
                View::transposed(&v[kv_at..], nkv * hd),
            );
            dkh.fill(T::zero());
            dvh.fill(T::zero());
            for h in kvh * group..(kvh + 1) * group {
                let probs_bh = &probs[(bb * nh + h) * t * t..][..t * t];
                for i0 in (0..t).step_by(bq) {
                    let (i1, rows) = ((i0 + bq).min(t), (i0 + bq).min(t) - i0);
                    let at = ((base + i0) * nh + h) * hd;
                    let (qb, gob) = (
                        View::rows(&q[at..], nh * hd),
                        View::rows(&dout[at..], nh * hd),
                    );
                    // The block's probabilities [rows, i1] (rows of stride T) and their transpose.
                    let p_rows = &probs_bh[i0 * t..];
                    let pb_t = View::transposed(p_rows, t);
                    let ds = &mut dsblk[..rows * i1];
                    matmul_views(ds, gob, v_t, rows, hd, i1, false);
                    let prows = p_rows.chunks(t).map(|row| &row[..i1]);
                    for (dsrow, prow) in ds.chunks_exact_mut(i1).zip(prows) {
                        match (as_f32_mut(dsrow), as_f32(prow), as_f32(&[scale])) {
                            (Some(ds), Some(p), Some(&[s])) => softmax_grad_row_f32(ds, p, s),
                            _ => softmax_grad_row(dsrow, prow, scale),
                        }
                    }
                    let dqb = &mut dqblk[..rows * hd];
                    let (ds_rows, ds_t) = (View::rows(&ds[..], i1), View::transposed(&ds[..], i1));
                    matmul_views(dqb, ds_rows, k_h, rows, i1, hd, false);
                    matmul_views(&mut dkh[..i1 * hd], ds_t, qb, i1, rows, hd, true);
                    matmul_views(&mut dvh[..i1 * hd], pb_t, gob, i1, rows, hd, true);
                    for (r, g) in dqb.chunks_exact(hd).enumerate() {
                        // SAFETY: head h of this batch row's tokens belongs to this task alone.
                        let dst = unsafe { dq.row(((base + i0 + r) * nh + h) * hd, hd) };
                        add_into(dst, g);
                    }
                }
            }
            for (i, (gk, gv)) in dkh.chunks_exact(hd).zip(dvh.chunks_exact(hd)).enumerate() {
                let at = ((base + i) * nkv + kvh) * hd;
                // SAFETY: kv head kvh of this batch row's tokens belongs to this task alone.
                unsafe {
                    add_into(dk.row(at, hd), gk);
                    add_into(dv.row(at, hd), gv);
                }
            }
        },
    );
}

/// One row of the softmax backward, in place: `dS_j = P_j (dP_j - D) scale` with the
/// Jacobian's row term `D = sum_j P_j dP_j`; the mask's zeros in P zero dS too.
#[inline(always)]
fn softmax_grad_row<T: Float>(ds: &mut [T], p: &[T], scale: T) {
    let d = dot(p, ds);
    for (x, &p) in ds.iter_mut().zip(p) {
        *x = p * (*x - d) * scale;
    }
}

simd_dispatch!(
    /// [`softmax_grad_row`] in f32, built for AVX-512 where the CPU has it (same bits).
    fn softmax_grad_row_f32 => softmax_grad_row_f32_body(ds: &mut [f32], p: &[f32], scale: f32)
);

#[inline(always)]
fn softmax_grad_row_f32_body(ds: &mut [f32], p: &[f32], scale: f32) {
    softmax_grad_row(ds, p, scale);
}

/// `a · b` with independent partial sums, so the compiler can vectorise the loop (inlined into
/// the AVX-512 build of [`softmax_grad_row_f32`]).
#[inline(always)]
fn dot<T: Float>(a: &[T], b: &[T]) -> T {
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .fold(T::zero(), |s, (&x, &y)| s + x * y);
    let mut acc = [T::zero(); LANES];
    for (x, y) in ca.zip(cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().fold(tail, |s, &x| s + x)
}

/// `acc += x`.
fn add_into<T: Float>(acc: &mut [T], x: &[T]) {
    for (a, &x) in acc.iter_mut().zip(x) {
        *a += x;
    }
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

    /// Sizes of the larger checks: several query blocks with a ragged last one, GQA, odd HD.
    #[derive(Clone, Copy)]
    struct Dims {
        b: usize,
        t: usize,
        nh: usize,
        nkv: usize,
        hd: usize,
    }

    /// Segment ids of a packed batch: examples of varying lengths, ids repeating across rows.
    fn packed_segments(d: Dims) -> Vec<u32> {
        (0..d.b * d.t)
            .map(|i| ((i % d.t) / (17 + 13 * (i / d.t)) + i / d.t) as u32)
            .collect()
    }

    /// Textbook forward and backward at any size (full score matrix, -inf mask, f64).
    #[allow(clippy::type_complexity)]
    fn naive_with_grads(
        d: Dims,
        q: &[f64],
        k: &[f64],
        v: &[f64],
        dout: &[f64],
        seg: Option<&[u32]>,
    ) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
        let Dims { b, t, nh, nkv, hd } = d;
        let mut out = vec![0.0; q.len()];
        let mut probs = vec![0.0; b * nh * t * t];
        let (mut dq, mut dk, mut dv) = (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
        let scale = 1.0 / (hd as f64).sqrt();
        for bb in 0..b {
            for h in 0..nh {
                let kvh = h / (nh / nkv);
                let qr = |i: usize| ((bb * t + i) * nh + h) * hd;
                let kr = |j: usize| ((bb * t + j) * nkv + kvh) * hd;
                for i in 0..t {
                    let s: Vec<f64> = (0..t)
                        .map(|j| {
                            let allowed =
                                j <= i && seg.is_none_or(|s| s[bb * t + i] == s[bb * t + j]);
                            if allowed {
                                (0..hd).map(|x| q[qr(i) + x] * k[kr(j) + x]).sum::<f64>() * scale
                            } else {
                                f64::NEG_INFINITY
                            }
                        })
                        .collect();
                    let z: f64 = s.iter().map(|x| x.exp()).sum();
                    let p: Vec<f64> = s.iter().map(|x| x.exp() / z).collect();
                    probs[((bb * nh + h) * t + i) * t..][..t].copy_from_slice(&p);
                    let dp: Vec<f64> = (0..t)
                        .map(|j| (0..hd).map(|x| dout[qr(i) + x] * v[kr(j) + x]).sum())
                        .collect();
                    let dd: f64 = (0..t).map(|j| p[j] * dp[j]).sum();
                    for j in 0..t {
                        let ds = p[j] * (dp[j] - dd) * scale;
                        for x in 0..hd {
                            out[qr(i) + x] += p[j] * v[kr(j) + x];
                            dq[qr(i) + x] += ds * k[kr(j) + x];
                            dk[kr(j) + x] += ds * q[qr(i) + x];
                            dv[kr(j) + x] += p[j] * dout[qr(i) + x];
                        }
                    }
                }
            }
        }
        (out, probs, dq, dk, dv)
    }

    /// Blocked, parallel passes against the textbook formulas at sizes that use several query
    /// blocks and rayon tasks: plain and packed, GQA and MHA, f64 tightly and f32 loosely.
    #[test]
    fn attention_blocked_matches_naive_at_size() {
        let shapes = [
            Dims {
                b: 3,
                t: 150,
                nh: 6,
                nkv: 2,
                hd: 12,
            },
            Dims {
                b: 2,
                t: 64,
                nh: 3,
                nkv: 3,
                hd: 7,
            },
            Dims {
                b: 1,
                t: 129,
                nh: 4,
                nkv: 1,
                hd: 16,
            },
        ];
        for d in shapes {
            let Dims { b, t, nh, nkv, hd } = d;
            let n = b * t;
            let (q, k, v) = (
                randv(n * nh * hd, 20),
                randv(n * nkv * hd, 21),
                randv(n * nkv * hd, 22),
            );
            let (dout, g0q, g0k) = (
                randv(n * nh * hd, 23),
                randv(n * nh * hd, 24),
                randv(n * nkv * hd, 25),
            );
            let segs = packed_segments(d);
            for seg in [None, Some(&segs[..])] {
                let (want_out, want_probs, want_dq, want_dk, want_dv) =
                    naive_with_grads(d, &q, &k, &v, &dout, seg);
                let (mut out, mut probs) =
                    (vec![f64::NAN; q.len()], vec![f64::NAN; b * nh * t * t]);
                attention_forward(&mut out, &mut probs, &q, &k, &v, seg, b, t, nh, nkv, hd);
                assert!(max_rel_diff(&out, &want_out) < 1e-13);
                // Up to the end of its query block a row matches, masked entries exact zeros;
                // after it `probs` is untouched (still NaN), and the backward below, which
                // matches, never reads it.
                let block_end = |i: usize| ((i / Q_BLOCK + 1) * Q_BLOCK).min(t);
                let mut masked = 0;
                for (idx, (&p, &w)) in probs.iter().zip(&want_probs).enumerate() {
                    let (i, j) = (idx / t % t, idx % t);
                    if j < block_end(i) {
                        assert!((p - w).abs() < 1e-13, "probs[{idx}] {p} vs {w}");
                        masked += usize::from(w == 0.0 && p == 0.0);
                    } else {
                        assert!(p.is_nan(), "probs[{idx}] written after its block");
                    }
                }
                assert!(masked > 0);
                // Accumulates onto existing gradients (dv starts at zero).
                let (mut dq, mut dk, mut dv) = (g0q.clone(), g0k.clone(), vec![0.0; v.len()]);
                attention_backward(
                    &mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &probs, b, t, nh, nkv, hd,
                );
                let plus = |a: &[f64], b: &[f64]| -> Vec<f64> {
                    a.iter().zip(b).map(|(a, b)| a + b).collect()
                };
                assert!(max_rel_diff(&dq, &plus(&want_dq, &g0q)) < 1e-13);
                assert!(max_rel_diff(&dk, &plus(&want_dk, &g0k)) < 1e-13);
                assert!(max_rel_diff(&dv, &want_dv) < 1e-13);

                // f32: the fast exp and f32 products, against the f64 reference.
                let (q32, k32, v32, do32) = (to_f32(&q), to_f32(&k), to_f32(&v), to_f32(&dout));
                let (mut out32, mut probs32) =
                    (vec![f32::NAN; q.len()], vec![f32::NAN; probs.len()]);
                attention_forward(
                    &mut out32,
                    &mut probs32,
                    &q32,
                    &k32,
                    &v32,
                    seg,
                    b,
                    t,
                    nh,
                    nkv,
                    hd,
                );
                assert!(max_rel_diff(&out32, &want_out) < 1e-5);
                assert!(max_rel_diff(&probs32, &want_probs) < 1e-5);
                for (idx, (&p, &w)) in probs32.iter().zip(&want_probs).enumerate() {
                    let (i, j) = (idx / t % t, idx % t);
                    assert!(j >= block_end(i) || w != 0.0 || p == 0.0, "probs32[{idx}]");
                }
                let (mut dq32, mut dk32, mut dv32) = (
                    vec![0.0f32; q.len()],
                    vec![0.0f32; k.len()],
                    vec![0.0f32; v.len()],
                );
                attention_backward(
                    &mut dq32, &mut dk32, &mut dv32, &do32, &q32, &k32, &v32, &probs32, b, t, nh,
                    nkv, hd,
                );
                assert!(max_rel_diff(&dq32, &want_dq) < 1e-4);
                assert!(max_rel_diff(&dk32, &want_dk) < 1e-4);
                assert!(max_rel_diff(&dv32, &want_dv) < 1e-5);
            }
        }
    }

    /// The AVX-512 build of the f32 softmax (where the CPU has it) and the baseline agree
    /// bitwise, masked (-inf) entries included, and a row computed inside a longer padded
    /// one (whose extra scores are larger than its max) has the bits of the row alone.
    #[test]
    fn softmax_simd_builds_agree() {
        for len in [1usize, 15, 16, 37, 256] {
            let padded = len.next_multiple_of(64);
            let mut s: Vec<f32> = to_f32(&randv(padded, len as u64))
                .iter()
                .map(|x| 30.0 * x)
                .collect();
            s.iter_mut()
                .take(len)
                .step_by(3)
                .skip(1)
                .for_each(|x| *x = f32::NEG_INFINITY);
            s[len..].iter_mut().for_each(|x| *x += 100.0);
            let (mut wide, mut base) = (vec![f32::NAN; padded], vec![0.0; len]);
            softmax_f32(&mut wide, &mut s.clone(), len, 0.125);
            softmax_f32_body(&mut base, &mut s[..len].to_vec(), len, 0.125);
            assert_eq!(wide[..len], base);
            let sum: f64 = base.iter().map(|&p| p as f64).sum();
            assert!((sum - 1.0).abs() < 1e-5);
            let mut row = vec![f32::NAN; padded];
            softmax_row(&mut row, &mut s.clone(), len, 0.125, None);
            assert_eq!(row[..len], base);
            assert!(
                row[len..].iter().all(|&p| p == 0.0),
                "the keys past the row"
            );
        }
    }
}
