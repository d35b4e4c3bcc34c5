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
//! adapter's own gradients are reductions over the rows, done in f32 ([`super::low_rank`]).
//!
//! Only f32 under bf16 precision takes this path; the results equal the generic path's up to
//! bf16 rounding of the branch's intermediate `x' A^T` (as PyTorch autocast rounds it).

use super::lora::dropout_forward;
use super::low_rank::{outer_add, up_add};
use super::residual::add_inplace;
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

/// `y[N, D_out] = x W^T (+ the branch)`, `x` given packed. `w_pack`: the frozen weight's
/// forward pack, else `w [D_out, D_in]` is packed here.
pub fn adapted_forward(
    y: &mut [f32],
    x: &PackedA,
    w: &[f32],
    w_pack: Option<&PackedB>,
    d_out: usize,
    branch: Option<BranchForward>,
) {
    let (n, d_in) = (x.m(), x.k());
    assert!(
        y.len() == n * d_out && w.len() == d_out * d_in,
        "adapted_forward: shape mismatch"
    );
    let own_w = w_pack
        .is_none()
        .then(|| PackedB::transient(MatRef::transpose_of(w, d_in), d_in, d_out));
    let w_pack = w_pack.or(own_w.as_ref()).expect("one of the two is set");
    match branch {
        None => gemm_terms(y, &[(x, w_pack)], false),
        Some(br) => {
            let r = br.r;
            assert!(
                br.a.len() == r * d_in && br.b.len() == d_out * r && br.xa.len() == n * r,
                "adapted_forward: adapter shape mismatch"
            );
            let a_t = PackedB::transient(MatRef::transpose_of(br.a, d_in), d_in, r);
            gemm_terms(br.xa, &[(br.input, &a_t)], false);
            let scaled: Vec<f32> = br.xa.iter().map(|&v| v * br.scale).collect();
            let xa = PackedA::from_rows(&scaled, n, r);
            let b_t = PackedB::transient(MatRef::transpose_of(br.b, r), r, d_out);
            gemm_terms(y, &[(x, w_pack), (&xa, &b_t)], false);
            b_t.recycle();
            xa.recycle();
            a_t.recycle();
        }
    }
    if let Some(p) = own_w {
        p.recycle();
    }
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
/// else written over it), and accumulates the branch's weight gradients. `w_pack`: the frozen
/// weight's backward pack, else `w` is packed here.
pub fn adapted_backward(
    accumulate: bool,
    dx: &mut [f32],
    dy: &[f32],
    w: &[f32],
    w_pack: Option<&PackedB>,
    n: usize,
    d_in: usize,
    d_out: usize,
    branch: Option<BranchBackward>,
) {
    assert!(
        dx.len() == n * d_in && dy.len() == n * d_out && w.len() == d_out * d_in,
        "adapted_backward: shape mismatch"
    );
    let dy_packed = PackedA::from_rows(dy, n, d_out);
    let own_w = w_pack
        .is_none()
        .then(|| PackedB::transient(MatRef::row_major(w, d_in), d_out, d_in));
    let w_pack = w_pack.or(own_w.as_ref()).expect("one of the two is set");
    let Some(br) = branch else {
        gemm_terms(dx, &[(&dy_packed, w_pack)], accumulate);
        dy_packed.recycle();
        if let Some(p) = own_w {
            p.recycle();
        }
        return;
    };
    let r = br.r;
    assert!(
        br.input.len() == n * d_in && br.xa.len() == n * r,
        "adapted_backward: adapter shape mismatch"
    );
    if let Some(db) = br.db {
        // db[D_out, r] += s dy^T · xa
        let scaled: Vec<f32> = br.xa.iter().map(|&v| v * br.scale).collect();
        outer_add(db, dy, &scaled, n, d_out, r);
    }
    // dxa[N, r] = s dy · B
    let mut dxa = vec![0.0f32; n * r];
    let b_pack = PackedB::transient(MatRef::row_major(br.b, r), d_out, r);
    gemm_terms(&mut dxa, &[(&dy_packed, &b_pack)], false);
    b_pack.recycle();
    dxa.iter_mut().for_each(|v| *v *= br.scale);
    if let Some(da) = br.da {
        // da[r, D_in] += dxa^T · x', computed as its transpose x'^T · dxa ([D_in, r]).
        let mut da_t = vec![0.0f32; d_in * r];
        outer_add(&mut da_t, br.input, &dxa, n, d_in, r);
        for (j, row) in da_t.chunks(r).enumerate() {
            for (q, &v) in row.iter().enumerate() {
                da[q * d_in + j] += v;
            }
        }
    }
    match br.dropout {
        None => {
            // dx += dy W + dxa A, in one pass over dx.
            let dxa_packed = PackedA::from_rows(&dxa, n, r);
            let a_pack = PackedB::transient(MatRef::row_major(br.a, d_in), r, d_in);
            gemm_terms(
                dx,
                &[(&dy_packed, w_pack), (&dxa_packed, &a_pack)],
                accumulate,
            );
            a_pack.recycle();
            dxa_packed.recycle();
        }
        Some((p, seed)) => {
            // The branch saw dropout(x): its input gradient goes back through the same mask.
            gemm_terms(dx, &[(&dy_packed, w_pack)], accumulate);
            let mut d_drop = vec![0.0f32; n * d_in];
            up_add(&mut d_drop, &dxa, br.a, n, r, d_in);
            let mut masked = vec![0.0f32; n * d_in];
            dropout_forward(&mut masked, &d_drop, p, seed);
            add_inplace(dx, &masked);
        }
    }
    dy_packed.recycle();
    if let Some(p) = own_w {
        p.recycle();
    }
}
