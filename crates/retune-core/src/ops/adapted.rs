//! A linear layer and its LoRA branch on bf16 products, fused: `y = x W^T + s (x' A^T) B^T`,
//! with `x' = dropout(x)` or `x` itself.
//!
//! The generic path ([`super::linear`] then [`super::lora`]) converts `x` to bf16 for every
//! product that reads it, and makes a second pass over `y` for the branch. Here the caller
//! packs a layer input once ([`super::matmul::pack_rows`]) for all the projections that read
//! it (q, k and v read the same normed input), the branch's down product `x' A^T` reuses that
//! pack, and its up product is a second term of the base product ([`retune_gemm::gemm_terms`]):
//! each block of `y` gets both while it is in cache. In the backward, `dy` is packed once for
//! `dy W` and `dy B`, and `(s dy B) A` is again a second term of the input gradient. The
//! adapter's own gradients are reductions over the rows, done in f32
//! ([`super::lora::lora_weight_grads`]).
//!
//! Only f32 under bf16 precision takes this path; the results equal the generic path's up to
//! bf16 rounding of the branch's intermediate `x' A^T` (as PyTorch autocast rounds it).

use super::lora::{dropout_forward, lora_weight_grads};
use super::residual::add_inplace;
use super::stored::{stored_backward, stored_forward, ExtraTerm, StoredMatrix};
use retune_gemm::{gemm_terms, MatRef, PackedA, PackedB};

/// The LoRA branch of a forward.
pub struct BranchForward<'a> {
    /// The branch's input, packed: the layer input's pack, or its dropout's.
    pub input: &'a PackedA,
    /// `A [r, D_in]`.
    pub a: &'a [f32],
    /// `B [D_out, r]`.
    pub b: &'a [f32],
    /// The branch scale (`alpha / r`, or rsLoRA's).
    pub scale: f32,
    /// The rank.
    pub r: usize,
    /// Receives `x' A^T` `[N, r]`, which the backward needs.
    pub xa: &'a mut [f32],
}

/// The base weight `W [D_out, D_in]` of a product, as it is held.
#[derive(Clone, Copy)]
pub enum Weight<'a> {
    /// Its f32 values, packed for each product here.
    Values(&'a [f32]),
    /// A frozen weight's pack for this product (the forward's or the input gradient's).
    Packed(&'a PackedB),
    /// A frozen weight held once in its storage type, dequantised chunk by chunk.
    Stored(&'a StoredMatrix),
}

/// `y[N, D_out] = x W^T (+ the branch)`, `x` given packed. A weight given by its values is
/// packed here; then, with `hold_backward` (a layer recomputed for its backward), its pack for
/// [`adapted_backward`] is made in the same read of `w` and put there. With `y` `None` (a
/// recompute that needs the branch's saved `x' A^T` but not the output) only that is computed.
pub fn adapted_forward(
    y: Option<&mut [f32]>,
    x: &PackedA,
    w: Weight,
    hold_backward: Option<&mut Option<PackedB>>,
    d_out: usize,
    branch: Option<BranchForward>,
) {
    let (n, d_in) = (x.m(), x.k());
    assert!(
        y.as_ref().is_none_or(|y| y.len() == n * d_out) && weight_fits(w, d_in, d_out),
        "adapted_forward: shape mismatch"
    );
    let Some(y) = y else {
        if let Some(br) = branch {
            assert_eq!(
                br.xa.len(),
                n * br.r,
                "adapted_forward: adapter shape mismatch"
            );
            let a_t = PackedB::transient(MatRef::transpose_of(br.a, d_in), d_in, br.r);
            gemm_terms(br.xa, &[(br.input, &a_t)], false);
            a_t.recycle();
        }
        return;
    };
    if let Weight::Stored(w) = w {
        return stored_adapted_forward(y, x, w, branch);
    }
    let w_pack = WeightPack::new(w, |w| match hold_backward {
        Some(backward) => PackedB::transient_both_of_nk(w, d_out, d_in, backward),
        None => PackedB::transient(MatRef::transpose_of(w, d_in), d_in, d_out),
    });
    match branch {
        None => gemm_terms(y, &[(x, w_pack.get())], false),
        Some(mut br) => {
            let (xa, a_t) = branch_down(x, &mut br, d_in, d_out);
            let b_t = PackedB::transient(MatRef::transpose_of(br.b, br.r), br.r, d_out);
            gemm_terms(y, &[(x, w_pack.get()), (&xa, &b_t)], false);
            b_t.recycle();
            xa.recycle();
            a_t.recycle();
        }
    }
    w_pack.recycle();
}

/// The branch's down product: `x' A^T` into `br.xa`; returns it scaled and packed as the left
/// operand of the up product, and the pack of `A^T` (both for recycling).
fn branch_down(
    x: &PackedA,
    br: &mut BranchForward,
    d_in: usize,
    d_out: usize,
) -> (PackedA, PackedB) {
    let (n, r) = (x.m(), br.r);
    assert!(
        br.a.len() == r * d_in && br.b.len() == d_out * r && br.xa.len() == n * r,
        "adapted_forward: adapter shape mismatch"
    );
    let a_t = PackedB::transient(MatRef::transpose_of(br.a, d_in), d_in, r);
    gemm_terms(br.xa, &[(br.input, &a_t)], false);
    let scaled: Vec<f32> = br.xa.iter().map(|&v| v * br.scale).collect();
    (PackedA::from_rows(&scaled, n, r), a_t)
}

/// [`adapted_forward`] from a stored weight: the up product is a second term of each chunk
/// of output columns, as it is of each block of `y` on the packed path.
fn stored_adapted_forward(
    y: &mut [f32],
    x: &PackedA,
    w: &StoredMatrix,
    branch: Option<BranchForward>,
) {
    let n = x.m();
    let Some(mut br) = branch else {
        return stored_forward(y, &[], Some(x), w, n, None);
    };
    let (xa, a_t) = branch_down(x, &mut br, w.cols(), w.rows());
    let up = ExtraTerm {
        a: &xa,
        b: MatRef::transpose_of(br.b, br.r),
        k: br.r,
    };
    stored_forward(y, &[], Some(x), w, n, Some(up));
    xa.recycle();
    a_t.recycle();
}

/// The LoRA branch of a backward.
pub struct BranchBackward<'a> {
    /// The branch's input `x'` `[N, D_in]`.
    pub input: &'a [f32],
    /// Its saved `x' A^T` `[N, r]`.
    pub xa: &'a [f32],
    /// `A [r, D_in]`.
    pub a: &'a [f32],
    /// `B [D_out, r]`.
    pub b: &'a [f32],
    /// The branch scale.
    pub scale: f32,
    /// The rank.
    pub r: usize,
    /// The gradient of A, accumulated (`None`: not trained).
    pub da: Option<&'a mut [f32]>,
    /// The gradient of B, accumulated.
    pub db: Option<&'a mut [f32]>,
    /// The forward's dropout `(p, mask seed)`, when it had one.
    pub dropout: Option<(f64, u64)>,
}

/// `dx[N, D_in] (+)= dy W (+ the branch's input gradient)` (added to `dx` when `accumulate`,
/// else written over it), and accumulates the branch's weight gradients. `w`: its values
/// (packed here), its backward pack (a frozen weight's, or one [`adapted_forward`] held), or
/// its storage. `dy_packed`: `dy` packed by its producer ([`PackedA::for_rows`]), else it is
/// packed here.
pub fn adapted_backward(
    accumulate: bool,
    dx: &mut [f32],
    dy: &[f32],
    dy_packed: Option<PackedA>,
    w: Weight,
    n: usize,
    d_in: usize,
    d_out: usize,
    branch: Option<BranchBackward>,
) {
    assert!(
        dx.len() == n * d_in && dy.len() == n * d_out && weight_fits(w, d_out, d_in),
        "adapted_backward: shape mismatch"
    );
    let dy_packed = dy_packed.unwrap_or_else(|| PackedA::from_rows(dy, n, d_out));
    assert!(
        dy_packed.m() == n && dy_packed.k() == d_out,
        "adapted_backward: dy's pack does not fit"
    );
    let w_pack = WeightPack::new(w, |w| {
        PackedB::transient(MatRef::row_major(w, d_in), d_out, d_in)
    });
    let base = match &w_pack {
        WeightPack::Stored(w) => Base::Stored(dy, w),
        p => Base::Packed(&dy_packed, p.get()),
    };
    match branch {
        None => base.add_into(dx, None, accumulate),
        Some(br) => branch_backward(accumulate, dx, dy, &dy_packed, base, br, n, d_in, d_out),
    }
    dy_packed.recycle();
    w_pack.recycle();
}

/// The base product `dy W` of an input gradient: from packs, or from a stored weight.
enum Base<'a> {
    Packed(&'a PackedA, &'a PackedB),
    Stored(&'a [f32], &'a StoredMatrix),
}

impl Base<'_> {
    /// `dx (+)= dy W (+ extra)`, in one pass over `dx`.
    fn add_into(&self, dx: &mut [f32], extra: Option<(&PackedA, &PackedB)>, accumulate: bool) {
        match *self {
            Base::Packed(a, b) => match extra {
                None => gemm_terms(dx, &[(a, b)], accumulate),
                Some(e) => gemm_terms(dx, &[(a, b), e], accumulate),
            },
            Base::Stored(dy, w) => {
                stored_backward(accumulate, dx, dy, w, dy.len() / w.rows(), extra)
            }
        }
    }
}

/// [`adapted_backward`] with a branch; `base` is the product `dy W`.
fn branch_backward(
    accumulate: bool,
    dx: &mut [f32],
    dy: &[f32],
    dy_packed: &PackedA,
    base: Base,
    br: BranchBackward,
    n: usize,
    d_in: usize,
    d_out: usize,
) {
    let r = br.r;
    assert!(
        br.input.len() == n * d_in && br.xa.len() == n * r,
        "adapted_backward: adapter shape mismatch"
    );
    // dxa[N, r] = s dy · B, from the packed dy.
    let mut dxa = vec![0.0f32; n * r];
    let b_pack = PackedB::transient(MatRef::row_major(br.b, r), d_out, r);
    gemm_terms(&mut dxa, &[(dy_packed, &b_pack)], false);
    b_pack.recycle();
    dxa.iter_mut().for_each(|v| *v *= br.scale);
    let (input, xa, scale) = (br.input, br.xa, br.scale);
    lora_weight_grads(br.da, br.db, dy, input, xa, &dxa, scale, n, d_in, d_out, r);
    let dxa_packed = PackedA::from_rows(&dxa, n, r);
    let a_pack = PackedB::transient(MatRef::row_major(br.a, d_in), r, d_in);
    let branch = (&dxa_packed, &a_pack);
    match br.dropout {
        // dx += dy W + dxa A, in one pass over dx.
        None => base.add_into(dx, Some(branch), accumulate),
        Some((p, seed)) => {
            // The branch saw dropout(x): its input gradient goes back through the same mask.
            base.add_into(dx, None, accumulate);
            let mut d_drop = vec![0.0f32; n * d_in];
            gemm_terms(&mut d_drop, &[branch], false);
            let mut masked = vec![0.0f32; n * d_in];
            dropout_forward(&mut masked, &d_drop, p, seed);
            add_inplace(dx, &masked);
        }
    }
    a_pack.recycle();
    dxa_packed.recycle();
}

/// Whether the weight of a product `[.., k] x [k, n]` fits: its values, its pack or its
/// storage have that shape (a stored `W [D_out, D_in]` serves both orientations).
fn weight_fits(w: Weight, k: usize, n: usize) -> bool {
    match w {
        Weight::Values(w) => w.len() == k * n,
        Weight::Packed(p) => p.k() == k && p.n() == n,
        Weight::Stored(s) => (s.cols(), s.rows()) == (k, n) || (s.rows(), s.cols()) == (k, n),
    }
}

/// A weight's operand for one product: the frozen weight's own pack, one made for this call
/// (and handed back for reuse after it), or its storage (dequantised by the product).
enum WeightPack<'a> {
    Given(&'a PackedB),
    Own(PackedB),
    Stored(&'a StoredMatrix),
}

impl<'a> WeightPack<'a> {
    /// The given pack or storage, else `pack(values)`.
    fn new(w: Weight<'a>, pack: impl FnOnce(&'a [f32]) -> PackedB) -> Self {
        match w {
            Weight::Packed(p) => WeightPack::Given(p),
            Weight::Values(w) => WeightPack::Own(pack(w)),
            Weight::Stored(s) => WeightPack::Stored(s),
        }
    }

    /// The pack (not called on storage: its products take their own path).
    fn get(&self) -> &PackedB {
        match self {
            WeightPack::Given(p) => p,
            WeightPack::Own(p) => p,
            WeightPack::Stored(_) => unreachable!("a stored weight has no whole pack"),
        }
    }

    fn recycle(self) {
        if let WeightPack::Own(p) = self {
            p.recycle();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{max_rel_diff, randv, to_f32};
    use crate::ops::linear::{linear_backward, linear_forward};
    use crate::ops::lora::{lora_backward, lora_forward};

    const N: usize = 48;
    const D_IN: usize = 40;
    const D_OUT: usize = 24;
    const R: usize = 8;
    const S: f64 = 0.5;

    /// Two bf16 roundings of ~4e-3 each over sums of up to 48 terms; exact f32 otherwise.
    fn bound() -> f64 {
        if retune_gemm::best_kernel() == retune_gemm::Kernel::F32 {
            1e-5
        } else {
            3e-2
        }
    }

    /// The fused forward and backward against the generic linear + LoRA ops in f64, with and
    /// without dropout, writing over `dx` and adding into it.
    #[test]
    fn fused_path_matches_linear_plus_lora() {
        let (x, w) = (randv(N * D_IN, 1), randv(D_OUT * D_IN, 2));
        let (a, b, dy) = (randv(R * D_IN, 3), randv(D_OUT * R, 4), randv(N * D_OUT, 5));
        for dropout in [0.0, 0.25] {
            // Reference (f64): y = x W^T + s (x' A^T) B^T and its gradients.
            let mut x_drop = x.clone();
            if dropout > 0.0 {
                dropout_forward(&mut x_drop, &x, dropout, 9);
            }
            let (mut y, mut xa) = (vec![0.0; N * D_OUT], vec![0.0; N * R]);
            linear_forward(&mut y, &x, &w, None, N, D_IN, D_OUT);
            lora_forward(&mut y, &mut xa, &x_drop, &a, &b, S, N, D_IN, D_OUT, R);
            let (mut dx, mut d_drop) = (vec![0.0; N * D_IN], vec![0.0; N * D_IN]);
            let (mut da, mut db) = (vec![0.0; R * D_IN], vec![0.0; D_OUT * R]);
            linear_backward(Some(&mut dx), None, None, &dy, &x, &w, N, D_IN, D_OUT);
            let (dxs, das, dbs) = (Some(&mut d_drop[..]), Some(&mut da[..]), Some(&mut db[..]));
            lora_backward(
                dxs, das, dbs, &dy, &x_drop, &xa, &a, &b, S, N, D_IN, D_OUT, R,
            );
            let mut masked = d_drop.clone();
            if dropout > 0.0 {
                dropout_forward(&mut masked, &d_drop, dropout, 9);
            }
            dx.iter_mut().zip(&masked).for_each(|(d, m)| *d += m);

            // Fused (f32).
            let (x32, w32, a32, b32, dy32) =
                (to_f32(&x), to_f32(&w), to_f32(&a), to_f32(&b), to_f32(&dy));
            let xd32 = to_f32(&x_drop);
            let x_packed = PackedA::from_rows(&x32, N, D_IN);
            let dropped = PackedA::from_rows(&xd32, N, D_IN);
            let input = if dropout > 0.0 { &dropped } else { &x_packed };
            let (mut y32, mut xa32) = (vec![f32::NAN; N * D_OUT], vec![f32::NAN; N * R]);
            let branch = BranchForward {
                input,
                a: &a32,
                b: &b32,
                scale: S as f32,
                r: R,
                xa: &mut xa32,
            };
            adapted_forward(
                Some(&mut y32),
                &x_packed,
                Weight::Values(&w32),
                None,
                D_OUT,
                Some(branch),
            );
            assert!(max_rel_diff(&y32, &y) < bound(), "y, dropout {dropout}");
            assert!(max_rel_diff(&xa32, &xa) < bound(), "xa, dropout {dropout}");
            for accumulate in [false, true] {
                let start = if accumulate { 1.0 } else { f32::NAN };
                let mut dx32 = vec![start; N * D_IN];
                let (mut da32, mut db32) = (vec![0.0f32; R * D_IN], vec![0.0f32; D_OUT * R]);
                let branch = BranchBackward {
                    input: &xd32,
                    xa: &xa32,
                    a: &a32,
                    b: &b32,
                    scale: S as f32,
                    r: R,
                    da: Some(&mut da32),
                    db: Some(&mut db32),
                    dropout: (dropout > 0.0).then_some((dropout, 9)),
                };
                let dy_ = &dy32;
                adapted_backward(
                    accumulate,
                    &mut dx32,
                    dy_,
                    None,
                    Weight::Values(&w32),
                    N,
                    D_IN,
                    D_OUT,
                    Some(branch),
                );
                let want: Vec<f64> = dx
                    .iter()
                    .map(|d| d + if accumulate { 1.0 } else { 0.0 })
                    .collect();
                assert!(
                    max_rel_diff(&dx32, &want) < bound(),
                    "dx, dropout {dropout}, acc {accumulate}"
                );
                assert!(max_rel_diff(&da32, &da) < bound(), "da, dropout {dropout}");
                assert!(max_rel_diff(&db32, &db) < bound(), "db, dropout {dropout}");
            }
        }
    }

    /// A forward that holds the weight's backward pack (made in the same read of the weight)
    /// gives the same output, and the backward from that pack the same input gradient, bit
    /// for bit, as packing each product's operand on its own.
    #[test]
    fn held_backward_pack_gives_the_same_bits() {
        let (d_in, d_out) = (70, 33); // partial tiles and strips on both sides
        let (x, w, dy) = (
            to_f32(&randv(N * d_in, 1)),
            to_f32(&randv(d_out * d_in, 2)),
            to_f32(&randv(N * d_out, 3)),
        );
        let x_packed = PackedA::from_rows(&x, N, d_in);
        let (mut y_own, mut y_held) = (vec![0.0f32; N * d_out], vec![0.0f32; N * d_out]);
        adapted_forward(
            Some(&mut y_own),
            &x_packed,
            Weight::Values(&w),
            None,
            d_out,
            None,
        );
        let mut held = None;
        let hold = Some(&mut held);
        adapted_forward(
            Some(&mut y_held),
            &x_packed,
            Weight::Values(&w),
            hold,
            d_out,
            None,
        );
        assert_eq!(y_held, y_own);
        let held = held.expect("the forward holds the backward pack");
        let (mut dx_own, mut dx_held) = (vec![0.0f32; N * d_in], vec![0.0f32; N * d_in]);
        adapted_backward(
            false,
            &mut dx_own,
            &dy,
            None,
            Weight::Values(&w),
            N,
            d_in,
            d_out,
            None,
        );
        adapted_backward(
            false,
            &mut dx_held,
            &dy,
            None,
            Weight::Packed(&held),
            N,
            d_in,
            d_out,
            None,
        );
        assert_eq!(dx_held, dx_own);
        // And the product is dy · w (up to bf16 rounding of the operands).
        let want: Vec<f64> = (0..N * d_in)
            .map(|e| {
                let (i, j) = (e / d_in, e % d_in);
                (0..d_out)
                    .map(|o| dy[i * d_out + o] as f64 * w[o * d_in + j] as f64)
                    .sum()
            })
            .collect();
        assert!(max_rel_diff(&dx_held, &want) < bound());
    }
}
