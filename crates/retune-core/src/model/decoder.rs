//! The decoder's training forward and backward, one op call per line.
//!
//! Memory is bounded by activation checkpointing: the forward keeps only each layer's input
//! `[N, C]`; the backward recomputes one layer at a time from its input, saving the activations
//! of that layer alone ([`LayerActs`]), then runs the layer's backward. The LM head and the
//! cross-entropy are fused and chunked, so the `[N, V]` logits never exist whole.

use super::lora::{LayerLora, Lora, LoraPair, Target};
use super::packs::FrozenPacks;
use super::weights::{grad_slot, LayerWeights, Linear, Weights};
use super::{Batch, Grads, Model};
use crate::float::Float;
use crate::ops::adapted::Weight;
use crate::ops::adapted::{adapted_backward, adapted_forward, BranchBackward, BranchForward};
use crate::ops::attention::{attention_backward, attention_forward};
use crate::ops::cross_entropy::{lm_head_cross_entropy, target_log_probs, CeStats};
use crate::ops::embedding::{embedding_backward, embedding_forward, embedding_forward_stored};
use crate::ops::linear::{add_bias, linear_backward_packed, linear_forward_packed};
use crate::ops::lora::{dropout_forward, lora_backward, lora_forward};
use crate::ops::matmul::{matmul_nt, pack_rows, runs_in_bf16, FrozenWeight};
use crate::ops::residual::{add_inplace, zero_par};
use crate::ops::rmsnorm::{rmsnorm_backward, rmsnorm_forward, rmsnorm_forward_packed};
use crate::ops::rope::{rope_backward, rope_forward, RopeTable};
use crate::ops::swiglu::{swiglu_backward_overwrite_packed, swiglu_forward, swiglu_forward_packed};
use retune_gemm::{gemm_terms, MatRef, PackedA, PackedB};
use std::sync::Mutex;

/// Rows of the LM head computed at once: 256 rows x 49k vocabulary x 4 bytes = 50 MB.
const CE_CHUNK_ROWS: usize = 256;
/// The same when the head is trained (full fine-tuning, tied or not): each chunk then packs
/// the changing head weight twice for its products and adds into the head's whole gradient
/// (49k x 576), so half as many chunks of twice the rows (100 MB of logits) save a quarter of
/// the step's packing. A frozen head's packs are kept ([`FrozenPacks`]), so there the smaller
/// chunk costs nothing.
const CE_CHUNK_ROWS_TRAINED: usize = 512;

/// Rows per chunk of the LM head, by whether it is trained.
fn ce_chunk_rows<T>(dw_head: &Option<&mut [T]>) -> usize {
    if dw_head.is_some() {
        CE_CHUNK_ROWS_TRAINED
    } else {
        CE_CHUNK_ROWS
    }
}

/// Sizes of one forward pass, named once (llm.c style).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Dims {
    b: usize,
    t: usize,
    /// Tokens, B * T.
    n: usize,
    c: usize,
    f: usize,
    v: usize,
    nh: usize,
    nkv: usize,
    hd: usize,
}

/// A backward between its steps (see [`Model::backward_through`]): the head's gradient has
/// gone through the final norm, and the layers are taken from the last down.
struct BackwardPass<'a, T> {
    d: Dims,
    rope: RopeTable<T>,
    adapter: Option<AdapterPass<'a, T>>,
    packs: Option<FrozenPacks>,
    ws: Box<Workspace<T>>,
    /// Gradient of the output of the next layer down (made its input's gradient in place).
    dx: Vec<T>,
}

/// The LM head as the loss closures of [`Model::backward_through`] see it.
#[derive(Clone, Copy)]
struct HeadWeight<'a, T> {
    /// `[V, C]`.
    w: &'a [T],
    /// Its bf16 packs, when it is frozen and products run in bf16.
    packs: Option<&'a FrozenWeight>,
}

/// One layer's saved activations, reused from layer to layer.
struct LayerActs<T> {
    ln1: Vec<T>,            // [N, C]  input_layernorm output
    rstd1: Vec<T>,          // [N]
    q: Vec<T>,              // [N, NH*HD] after RoPE
    k: Vec<T>,              // [N, NKV*HD] after RoPE
    v: Vec<T>,              // [N, NKV*HD]
    probs: Vec<T>,          // [B, NH, T, T]
    att: Vec<T>,            // [N, NH*HD] attention output before o_proj
    x1: Vec<T>,             // [N, C]  residual stream after attention
    ln2: Vec<T>,            // [N, C]
    rstd2: Vec<T>,          // [N]
    gate: Vec<T>,           // [N, F]
    up: Vec<T>,             // [N, F]
    act: Vec<T>,            // [N, F]  silu(gate) * up
    lora: [LoraActs<T>; 7], // per adapted target, indexed by Target::index
}

/// What one projection saves for its backward: its LoRA branch's (dropped-out) input and
/// `x A^T`, and, under bf16 products, its weight's pack for the input gradient when the
/// layer's recompute made it (in the same read of the weight as the forward pack).
#[derive(Default)]
struct LoraActs<T> {
    x_drop: Vec<T>, // [N, D_in], only when dropout > 0
    xa: Vec<T>,     // [N, r]
    w_backward: Option<PackedB>,
    /// The layer whose weight `w_backward` holds in this backward pass (`None`: no valid pack;
    /// the buffer is reused from layer to layer).
    w_backward_layer: Option<usize>,
}

/// The buffers of one training forward/backward, kept in the model between calls: a step
/// would otherwise allocate, zero and page-fault every one of them again (several percent of
/// a step). Built for one shape of batch and adapter ([`WorkspaceKey`]), rebuilt on a change.
pub(crate) struct Workspace<T> {
    key: WorkspaceKey,
    /// Activations of the layer being recomputed.
    acts: LayerActs<T>,
    /// Gradients of those activations (same shapes; no attention probabilities).
    scratch: LayerActs<T>,
    /// The input of every layer, then the final residual stream: `L + 1` buffers `[N, C]`.
    residuals: Vec<Vec<T>>,
}

/// What the workspace's buffer sizes depend on.
#[derive(Clone, Copy, PartialEq)]
struct WorkspaceKey {
    dims: Dims,
    layers: usize,
    /// Per target: the adapter's rank when adapted, and whether its branch uses dropout.
    lora: [Option<(usize, bool)>; 7],
}

impl WorkspaceKey {
    fn new<T: Float>(d: &Dims, layers: usize, adapter: Option<&AdapterPass<T>>) -> Self {
        let lora = std::array::from_fn(|i| {
            let ad = adapter?;
            let spec = &ad.lora.spec;
            spec.targets
                .contains(&Target::ALL[i])
                .then_some((spec.r, ad.dropout > 0.0))
        });
        WorkspaceKey {
            dims: *d,
            layers,
            lora,
        }
    }
}

/// The model's slot for its [`Workspace`]; a clone starts empty. A call takes the workspace
/// out for its duration, so concurrent calls on one model each get their own buffers.
pub(crate) struct WorkspaceSlot<T>(Mutex<Option<Box<Workspace<T>>>>);

impl<T> Default for WorkspaceSlot<T> {
    fn default() -> Self {
        WorkspaceSlot(Mutex::new(None))
    }
}

impl<T> Clone for WorkspaceSlot<T> {
    fn clone(&self) -> Self {
        Self::default()
    }
}

impl<T> std::fmt::Debug for WorkspaceSlot<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WorkspaceSlot")
    }
}

impl<T: Float> WorkspaceSlot<T> {
    /// The kept workspace when it fits `key`, else a new one.
    fn take(&self, key: WorkspaceKey, adapter: Option<&AdapterPass<T>>) -> Box<Workspace<T>> {
        let kept = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(ws) = kept.filter(|ws| ws.key == key) {
            return ws;
        }
        let d = &key.dims;
        let mut scratch = LayerActs::new(d, None);
        scratch.probs = Vec::new(); // the backward reads the saved probabilities only
        Box::new(Workspace {
            key,
            acts: LayerActs::new(d, adapter),
            scratch,
            residuals: (0..=key.layers)
                .map(|_| vec![T::zero(); d.n * d.c])
                .collect(),
        })
    }

    /// Keeps `ws` for the next call.
    fn put(&self, ws: Box<Workspace<T>>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(ws);
    }
}

/// The adapter as one pass uses it: the branch scale, and the seed of this pass's dropout masks.
struct AdapterPass<'a, T> {
    lora: &'a Lora<T>,
    scale: T,
    /// Dropout probability of this pass: the spec's in training, 0 in evaluation.
    dropout: f64,
    seed: u64,
}

impl<'a, T: Float> AdapterPass<'a, T> {
    fn train(lora: &'a Lora<T>, seed: u64) -> Self {
        let dropout = lora.spec.dropout;
        AdapterPass {
            lora,
            scale: T::of(lora.spec.scale()),
            dropout,
            seed,
        }
    }

    /// Evaluation: the same adapter without dropout.
    fn eval(lora: &'a Lora<T>) -> Self {
        AdapterPass {
            lora,
            scale: T::of(lora.spec.scale()),
            dropout: 0.0,
            seed: 0,
        }
    }

    /// The LoRA pair of one target in one layer, when that target is adapted.
    fn pair(&self, layer: usize, t: Target) -> Option<&LoraPair<T>> {
        self.lora.layers[layer].pairs[t.index()].as_ref()
    }

    /// The dropout mask seed of one target in one layer: distinct for every branch.
    fn mask_seed(&self, layer: usize, t: Target) -> u64 {
        self.seed ^ ((layer as u64) << 8 | t.index() as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }
}

impl<T: Float> LayerActs<T> {
    fn new(d: &Dims, adapter: Option<&AdapterPass<T>>) -> Self {
        let z = |len: usize| vec![T::zero(); len];
        let (n, qd, kvd) = (d.n, d.nh * d.hd, d.nkv * d.hd);
        LayerActs {
            ln1: z(n * d.c),
            rstd1: z(n),
            q: z(n * qd),
            k: z(n * kvd),
            v: z(n * kvd),
            probs: z(d.b * d.nh * d.t * d.t),
            att: z(n * qd),
            x1: z(n * d.c),
            ln2: z(n * d.c),
            rstd2: z(n),
            gate: z(n * d.f),
            up: z(n * d.f),
            act: z(n * d.f),
            lora: std::array::from_fn(|i| {
                let Some(ad) = adapter else {
                    return LoraActs::default();
                };
                let spec = &ad.lora.spec;
                if !spec.targets.contains(&Target::ALL[i]) {
                    return LoraActs::default();
                }
                let d_in = match Target::ALL[i] {
                    Target::OProj => qd,
                    Target::DownProj => d.f,
                    _ => d.c,
                };
                let x_drop = if ad.dropout > 0.0 {
                    z(n * d_in)
                } else {
                    Vec::new()
                };
                LoraActs {
                    x_drop,
                    xa: z(n * spec.r),
                    ..LoraActs::default()
                }
            }),
        }
    }
}

/// One projection of one layer as a pass sees it: its weight, the weight's bf16 packs when it
/// is frozen and packed, and the adapter.
struct Proj<'a, T> {
    lin: &'a Linear<T>,
    packs: Option<&'a FrozenWeight>,
    t: Target,
    layer: usize,
    adapter: Option<&'a AdapterPass<'a, T>>,
    /// Backward of a trained weight under bf16 products: its input packed as the right
    /// operand of `dW = dY^T X`, once for the projections that read one input
    /// ([`input_pack`]).
    input_pack: Option<&'a PackedB>,
    /// A recompute for the backward: the weight's backward pack is made with its forward pack
    /// and held in the projection's [`LoraActs`].
    hold_backward_pack: bool,
}

impl<T: Float> Proj<'_, T> {
    /// The adapter and this projection's LoRA pair, when it is adapted.
    fn branch(&self) -> Option<(&AdapterPass<'_, T>, &LoraPair<T>)> {
        let ad = self.adapter?;
        Some((ad, ad.pair(self.layer, self.t)?))
    }

    /// The seed of this projection's dropout mask.
    fn mask_seed(&self, ad: &AdapterPass<T>) -> u64 {
        ad.mask_seed(self.layer, self.t)
    }
}

/// A projection: base linear layer plus, when adapted, its LoRA branch (saving into `saved`).
/// `x_packed`: `x` packed for bf16 products (see [`pack_rows`]), which then take the fused
/// path of [`adapted_forward`]. `y` `None`: only what the backward needs is computed (the
/// branch's saved activations), not the output.
fn proj_forward<T: Float>(
    mut y: Option<&mut [T]>,
    saved: &mut LoraActs<T>,
    x: &[T],
    x_packed: Option<&PackedA>,
    p: &Proj<T>,
    n: usize,
) {
    if let Some(xp) = x_packed {
        return proj_forward_bf16(y, saved, x, xp, p);
    }
    let (lin, packs) = (p.lin, p.packs);
    let b = lin.b.as_deref();
    if let Some(y) = y.as_deref_mut() {
        linear_forward_packed(y, x, &lin.w, packs, b, n, lin.d_in, lin.d_out);
    }
    let Some((ad, pair)) = p.branch() else { return };
    let spec = &ad.lora.spec;
    let input = if ad.dropout > 0.0 {
        dropout_forward(&mut saved.x_drop, x, ad.dropout, p.mask_seed(ad));
        &saved.x_drop[..]
    } else {
        x
    };
    let Some(y) = y else {
        // The first product of `lora_forward`, alone.
        matmul_nt(&mut saved.xa, input, &pair.a, n, lin.d_in, spec.r, false);
        return;
    };
    lora_forward(
        y,
        &mut saved.xa,
        input,
        &pair.a,
        &pair.b,
        ad.scale,
        n,
        lin.d_in,
        lin.d_out,
        spec.r,
    );
}

/// [`proj_forward`] on the fused bf16 path (`T` is f32).
fn proj_forward_bf16<T: Float>(
    y: Option<&mut [T]>,
    saved: &mut LoraActs<T>,
    x: &[T],
    x_packed: &PackedA,
    p: &Proj<T>,
) {
    let f32s = "the bf16 path runs on f32";
    let lin = p.lin;
    let w = T::f32_slice(&lin.w).expect(f32s);
    let (mut y, bias) = (y, lin.b.as_ref());
    let mut dropped = None;
    let branch = match p.branch() {
        None => None,
        Some((ad, pair)) => {
            let input = if ad.dropout > 0.0 {
                dropout_forward(&mut saved.x_drop, x, ad.dropout, p.mask_seed(ad));
                let n = x_packed.m();
                dropped = Some(PackedA::from_rows(
                    T::f32_slice(&saved.x_drop).expect(f32s),
                    n,
                    lin.d_in,
                ));
                dropped.as_ref().expect("just set")
            } else {
                x_packed
            };
            Some(BranchForward {
                input,
                a: T::f32_slice(&pair.a).expect(f32s),
                b: T::f32_slice(&pair.b).expect(f32s),
                scale: ad.scale.as_f64() as f32,
                r: ad.lora.spec.r,
                xa: T::f32_slice_mut(&mut saved.xa).expect(f32s),
            })
        }
    };
    let weight = p.packs.map_or(Weight::Values(w), FrozenWeight::forward);
    let y32 = y.as_deref_mut().map(|y| T::f32_slice_mut(y).expect(f32s));
    // Only a product that packs the weight here can make its backward pack too.
    let hold = p.hold_backward_pack && p.packs.is_none() && y32.is_some();
    saved.w_backward_layer = hold.then_some(p.layer);
    let hold_backward = hold.then_some(&mut saved.w_backward);
    adapted_forward(y32, x_packed, weight, hold_backward, lin.d_out, branch);
    if let Some(p) = dropped {
        p.recycle();
    }
    if let (Some(y), Some(b)) = (y, bias) {
        add_bias(y, b, lin.d_out);
    }
}

/// Backward of [`proj_forward`]: adds into `dx` (writes over it unless `accumulate`: the
/// first of several projections that read one input), accumulates into the base gradient twin
/// `g` (empty tensors are frozen and skipped) and, when adapted, the LoRA gradient `g_lora`.
#[allow(clippy::too_many_arguments)]
fn proj_backward<T: Float>(
    accumulate: bool,
    dx: &mut [T],
    g: &mut Linear<T>,
    g_lora: Option<&mut LayerLora<T>>,
    dy: &[T],
    dy_packed: Option<PackedA>,
    x: &[T],
    saved: &LoraActs<T>,
    p: &Proj<T>,
    n: usize,
) {
    if runs_in_bf16(n) && T::f32_slice(dy).is_some() {
        return proj_backward_bf16(accumulate, dx, g, g_lora, dy, dy_packed, x, saved, p, n);
    }
    recycle(dy_packed);
    let (lin, packs, t) = (p.lin, p.packs, p.t);
    if !accumulate {
        dx.fill(T::zero());
    }
    let db = g.b.as_deref_mut().and_then(grad_slot);
    linear_backward_packed(
        Some(&mut *dx),
        grad_slot(&mut g.w),
        db,
        dy,
        x,
        &lin.w,
        packs,
        n,
        lin.d_in,
        lin.d_out,
    );
    let Some((ad, pair)) = p.branch() else { return };
    let spec = &ad.lora.spec;
    let grads = g_lora.and_then(|g| g.pairs[t.index()].as_mut());
    let (da, dbl) = match grads {
        Some(gp) => (Some(&mut gp.a[..]), Some(&mut gp.b[..])),
        None => (None, None),
    };
    let (din, dout, r, s) = (lin.d_in, lin.d_out, spec.r, ad.scale);
    if ad.dropout > 0.0 {
        // The branch saw dropout(x): its input gradient goes back through the same mask.
        let mut d_drop = vec![T::zero(); n * din];
        lora_backward(
            Some(&mut d_drop),
            da,
            dbl,
            dy,
            &saved.x_drop,
            &saved.xa,
            &pair.a,
            &pair.b,
            s,
            n,
            din,
            dout,
            r,
        );
        let mut masked = vec![T::zero(); n * din];
        dropout_forward(&mut masked, &d_drop, ad.dropout, p.mask_seed(ad));
        add_inplace(dx, &masked);
    } else {
        lora_backward(
            Some(dx),
            da,
            dbl,
            dy,
            x,
            &saved.xa,
            &pair.a,
            &pair.b,
            s,
            n,
            din,
            dout,
            r,
        );
    }
}

/// [`proj_backward`] on the fused bf16 path (`T` is f32).
#[allow(clippy::too_many_arguments)]
fn proj_backward_bf16<T: Float>(
    accumulate: bool,
    dx: &mut [T],
    g: &mut Linear<T>,
    g_lora: Option<&mut LayerLora<T>>,
    dy: &[T],
    dy_packed: Option<PackedA>,
    x: &[T],
    saved: &LoraActs<T>,
    p: &Proj<T>,
    n: usize,
) {
    let lin = p.lin;
    fn f32_of<T: Float>(v: &[T]) -> &[f32] {
        T::f32_slice(v).expect("the bf16 path runs on f32")
    }
    // A trained base weight's own gradients: from the shared pack of its input when there is
    // one, else on the generic path.
    let mut dw = grad_slot(&mut g.w);
    let db = g.b.as_deref_mut().and_then(grad_slot);
    // dy packed once, for dy W and, transposed from that pack, for dW = dy^T X.
    let dy_packed = dy_packed.unwrap_or_else(|| PackedA::from_rows(f32_of(dy), n, lin.d_out));
    if let (Some(dw), Some(xb)) = (dw.as_deref_mut(), p.input_pack) {
        let dw32 = T::f32_slice_mut(dw).expect("the bf16 path runs on f32");
        let dy_t = dy_packed.transposed();
        gemm_terms(dw32, &[(&dy_t, xb)], true);
        dy_t.recycle();
    } else if dw.is_some() {
        linear_backward_packed(None, dw, None, dy, x, &lin.w, None, n, lin.d_in, lin.d_out);
    }
    if db.is_some() {
        linear_backward_packed(None, None, db, dy, x, &lin.w, None, n, lin.d_in, lin.d_out);
    }
    let branch = p.branch().map(|(ad, pair)| {
        let grads = g_lora.and_then(|g| g.pairs[p.t.index()].as_mut());
        let (da, db) = match grads {
            Some(gp) => (T::f32_slice_mut(&mut gp.a), T::f32_slice_mut(&mut gp.b)),
            None => (None, None),
        };
        let dropout = (ad.dropout > 0.0).then(|| (ad.dropout, p.mask_seed(ad)));
        let input = if dropout.is_some() { &saved.x_drop } else { x };
        BranchBackward {
            input: f32_of(input),
            xa: f32_of(&saved.xa),
            a: f32_of(&pair.a),
            b: f32_of(&pair.b),
            scale: ad.scale.as_f64() as f32,
            r: ad.lora.spec.r,
            da,
            db,
            dropout,
        }
    });
    let held = saved
        .w_backward
        .as_ref()
        .filter(|_| saved.w_backward_layer == Some(p.layer));
    let weight = p
        .packs
        .and_then(FrozenWeight::backward)
        .or(held.map(Weight::Packed));
    let dx32 = T::f32_slice_mut(dx).expect("the bf16 path runs on f32");
    let weight = weight.unwrap_or(Weight::Values(f32_of(&lin.w)));
    adapted_backward(
        accumulate,
        dx32,
        f32_of(dy),
        Some(dy_packed),
        weight,
        n,
        lin.d_in,
        lin.d_out,
        branch,
    );
}

impl<T: Float> Model<T> {
    fn dims(&self, batch: &Batch) -> Dims {
        let c = &self.config;
        Dims {
            b: batch.b,
            t: batch.t,
            n: batch.b * batch.t,
            c: c.hidden_size,
            f: c.intermediate_size,
            v: c.vocab_size,
            nh: c.num_attention_heads,
            nkv: c.num_key_value_heads,
            hd: c.head_dim,
        }
    }

    /// One decoder layer forward: `out = layer(x)`, filling `acts` for the backward. Without
    /// `out` (a recompute for the backward) the down projection's product is skipped: the
    /// backward reads its input and the adapter's saved activations, not its output.
    #[allow(clippy::too_many_arguments)]
    fn layer_forward(
        &self,
        out: Option<&mut [T]>,
        acts: &mut LayerActs<T>,
        x: &[T],
        l: usize,
        adapter: Option<&AdapterPass<T>>,
        packs: Option<&FrozenPacks>,
        batch: &Batch,
        rope: &RopeTable<T>,
        d: &Dims,
    ) {
        let eps = self.config.rms_norm_eps;
        let lw = &self.weights.layers[l];
        let pk = |t: Target| packs.and_then(|p| p.linear(l, t));
        let recompute = out.is_none();
        let a = acts;
        let [lq, lk, lv, lo, lg, lu, ld] = &mut a.lora;
        // Under bf16 products each input is packed once for every projection that reads it,
        // by the op that makes it.
        let ln1_packed =
            rmsnorm_forward_packed(&mut a.ln1, &mut a.rstd1, x, &lw.attn_norm, d.n, d.c, eps);
        let proj = |y: Option<&mut [T]>, saved, x: &[T], xp: &Option<PackedA>, lin, t| {
            let p = Proj {
                lin,
                packs: pk(t),
                t,
                layer: l,
                adapter,
                input_pack: None,
                hold_backward_pack: recompute,
            };
            proj_forward(y, saved, x, xp.as_ref(), &p, d.n)
        };
        proj(
            Some(&mut a.q),
            lq,
            &a.ln1,
            &ln1_packed,
            &lw.q,
            Target::QProj,
        );
        proj(
            Some(&mut a.k),
            lk,
            &a.ln1,
            &ln1_packed,
            &lw.k,
            Target::KProj,
        );
        proj(
            Some(&mut a.v),
            lv,
            &a.ln1,
            &ln1_packed,
            &lw.v,
            Target::VProj,
        );
        recycle(ln1_packed);
        rope_forward(&mut a.q, &batch.positions, rope, d.nh, d.hd);
        rope_forward(&mut a.k, &batch.positions, rope, d.nkv, d.hd);
        let segments = batch.segments.as_deref();
        attention_forward(
            &mut a.att,
            &mut a.probs,
            &a.q,
            &a.k,
            &a.v,
            segments,
            d.b,
            d.t,
            d.nh,
            d.nkv,
            d.hd,
        );
        let att_packed = pack_rows(&a.att, d.n, d.nh * d.hd);
        proj(
            Some(&mut a.x1),
            lo,
            &a.att,
            &att_packed,
            &lw.o,
            Target::OProj,
        );
        recycle(att_packed);
        add_inplace(&mut a.x1, x);
        let ln2_packed =
            rmsnorm_forward_packed(&mut a.ln2, &mut a.rstd2, &a.x1, &lw.mlp_norm, d.n, d.c, eps);
        proj(
            Some(&mut a.gate),
            lg,
            &a.ln2,
            &ln2_packed,
            &lw.gate,
            Target::GateProj,
        );
        proj(
            Some(&mut a.up),
            lu,
            &a.ln2,
            &ln2_packed,
            &lw.up,
            Target::UpProj,
        );
        recycle(ln2_packed);
        // Without an output (a recompute), the down projection is needed only for its adapter's
        // `x' A^T`, and an unadapted one not at all: no pack of its input.
        let down_adapted = adapter.is_some_and(|ad| ad.pair(l, Target::DownProj).is_some());
        let act_packed = if out.is_some() || down_adapted {
            swiglu_forward_packed(&mut a.act, &a.gate, &a.up, d.f)
        } else {
            swiglu_forward(&mut a.act, &a.gate, &a.up);
            None
        };
        let mut out = out;
        proj(
            out.as_deref_mut(),
            ld,
            &a.act,
            &act_packed,
            &lw.down,
            Target::DownProj,
        );
        recycle(act_packed);
        if let Some(out) = out {
            add_inplace(out, &a.x1);
        }
    }

    /// One decoder layer backward: the forward read bottom-up. Turns `dx`, the gradient of
    /// the layer's output, into that of its input (both residual sums accumulate into it in
    /// place), and accumulates into `g`.
    #[allow(clippy::too_many_arguments)]
    fn layer_backward(
        &self,
        dx: &mut [T],
        g: &mut LayerWeights<T>,
        mut g_lora: Option<&mut LayerLora<T>>,
        scratch: &mut LayerActs<T>,
        x: &[T],
        a: &LayerActs<T>,
        l: usize,
        adapter: Option<&AdapterPass<T>>,
        packs: Option<&FrozenPacks>,
        batch: &Batch,
        rope: &RopeTable<T>,
        d: &Dims,
    ) {
        let lw = &self.weights.layers[l];
        let proj = |t: Target, input_pack| Proj {
            lin: t.of(lw),
            packs: packs.and_then(|p| p.linear(l, t)),
            t,
            layer: l,
            adapter,
            input_pack,
            hold_backward_pack: false,
        };
        let [lq, lk, lv, lo, lg, lu, ld] = &a.lora;
        // `scratch` has the same shapes as the activations; its buffers hold their gradients.
        // Most activation gradients are first written (not added) by one op: a projection's
        // backward, or the SwiGLU's; those of q, k and v are sums from the start.
        let s = scratch;
        for buf in [&mut s.q, &mut s.k, &mut s.v] {
            zero_par(buf);
        }
        // MLP block: out = x1 + down(swiglu(gate(ln2), up(ln2))). x1's gradient is dout plus
        // the norm's input gradient: accumulated into dx once the down projection has read it.
        let gl = g_lora.as_deref_mut();
        let act_pack = input_pack(&a.act, d.n, d.f, [&g.down]);
        proj_backward(
            false,
            &mut s.act,
            &mut g.down,
            gl,
            dx,
            None,
            &a.act,
            ld,
            &proj(Target::DownProj, act_pack.as_ref()),
            d.n,
        );
        // Under bf16 products the SwiGLU packs dgate and dup for their products as it makes them.
        let (gate_dy_pack, up_dy_pack) =
            swiglu_backward_overwrite_packed(&mut s.gate, &mut s.up, &s.act, &a.gate, &a.up, d.f);
        let ln2_pack = input_pack(&a.ln2, d.n, d.c, [&g.gate, &g.up]);
        let gl = g_lora.as_deref_mut();
        proj_backward(
            false,
            &mut s.ln2,
            &mut g.gate,
            gl,
            &s.gate,
            gate_dy_pack,
            &a.ln2,
            lg,
            &proj(Target::GateProj, ln2_pack.as_ref()),
            d.n,
        );
        let gl = g_lora.as_deref_mut();
        proj_backward(
            true,
            &mut s.ln2,
            &mut g.up,
            gl,
            &s.up,
            up_dy_pack,
            &a.ln2,
            lu,
            &proj(Target::UpProj, ln2_pack.as_ref()),
            d.n,
        );
        let dw = grad_slot(&mut g.mlp_norm);
        rmsnorm_backward(dx, dw, &s.ln2, &a.x1, &lw.mlp_norm, &a.rstd2, d.n, d.c);
        // Attention block: x1 = x + o(attention(rope(q(ln1)), rope(k(ln1)), v(ln1))).
        let gl = g_lora.as_deref_mut();
        let att_pack = input_pack(&a.att, d.n, d.nh * d.hd, [&g.o]);
        proj_backward(
            false,
            &mut s.att,
            &mut g.o,
            gl,
            dx,
            None,
            &a.att,
            lo,
            &proj(Target::OProj, att_pack.as_ref()),
            d.n,
        );
        attention_backward(
            &mut s.q, &mut s.k, &mut s.v, &s.att, &a.q, &a.k, &a.v, &a.probs, d.b, d.t, d.nh,
            d.nkv, d.hd,
        );
        rope_backward(&mut s.q, &batch.positions, rope, d.nh, d.hd);
        rope_backward(&mut s.k, &batch.positions, rope, d.nkv, d.hd);
        let ln1_pack = input_pack(&a.ln1, d.n, d.c, [&g.q, &g.k, &g.v]);
        let gl = g_lora.as_deref_mut();
        proj_backward(
            false,
            &mut s.ln1,
            &mut g.q,
            gl,
            &s.q,
            None,
            &a.ln1,
            lq,
            &proj(Target::QProj, ln1_pack.as_ref()),
            d.n,
        );
        let gl = g_lora.as_deref_mut();
        proj_backward(
            true,
            &mut s.ln1,
            &mut g.k,
            gl,
            &s.k,
            None,
            &a.ln1,
            lk,
            &proj(Target::KProj, ln1_pack.as_ref()),
            d.n,
        );
        let gl = g_lora;
        proj_backward(
            true,
            &mut s.ln1,
            &mut g.v,
            gl,
            &s.v,
            None,
            &a.ln1,
            lv,
            &proj(Target::VProj, ln1_pack.as_ref()),
            d.n,
        );
        [ln1_pack, ln2_pack, att_pack, act_pack]
            .into_iter()
            .flatten()
            .for_each(PackedB::recycle);
        // The input's gradient: x1's (the residual path) plus the norm's input gradient.
        let dw = grad_slot(&mut g.attn_norm);
        rmsnorm_backward(dx, dw, &s.ln1, x, &lw.attn_norm, &a.rstd1, d.n, d.c);
    }

    /// Runs embedding and every layer, keeping each layer's input: fills `residuals` (`L + 1`
    /// buffers `[N, C]`, overwritten) with the inputs of layers `0..L` and the final residual
    /// stream (index L). `acts` is working space.
    #[allow(clippy::too_many_arguments)]
    fn forward_residuals(
        &self,
        residuals: &mut [Vec<T>],
        acts: &mut LayerActs<T>,
        batch: &Batch,
        adapter: Option<&AdapterPass<T>>,
        packs: Option<&FrozenPacks>,
        rope: &RopeTable<T>,
        d: &Dims,
    ) {
        let w = &self.weights;
        assert_eq!(residuals.len(), w.layers.len() + 1);
        self.embed(&mut residuals[0], &batch.ids);
        for l in 0..w.layers.len() {
            let (done, rest) = residuals.split_at_mut(l + 1);
            let (x, out) = (&done[l], &mut rest[0]);
            self.layer_forward(Some(out), acts, x, l, adapter, packs, batch, rope, d);
        }
    }

    /// `out[N, C]`: the embedding rows of `ids`, from the stored embedding when the base is
    /// held in its storage type.
    pub(crate) fn embed(&self, out: &mut [T], ids: &[u32]) {
        let c = self.config.hidden_size;
        match self.packs.embedding() {
            Some(table) => {
                let out = T::f32_slice_mut(out).expect("a held base is f32");
                embedding_forward_stored(out, ids, table);
            }
            None => embedding_forward(out, ids, &self.weights.embed, c),
        }
    }

    fn rope_for(&self, batch: &Batch) -> RopeTable<T> {
        let max_pos = batch.positions.iter().copied().max().unwrap_or(0) as usize + 1;
        let c = &self.config;
        RopeTable::new(c.head_dim, max_pos, c.rope_theta, c.rope_scaling.as_ref())
    }

    /// The final-norm hidden states `[N, C]` of an evaluation forward (no dropout, nothing
    /// kept for a backward).
    /// Under bf16 products, the frozen weights' packs come along (an evaluation trains nothing).
    fn final_hidden(
        &self,
        batch: &Batch,
        lora: Option<&Lora<T>>,
    ) -> (Dims, Vec<T>, Option<FrozenPacks>) {
        let d = self.dims(batch);
        let packs = self.packs.frozen(&self.weights, &self.weights.empty_like());
        let rope = self.rope_for(batch);
        let adapter = lora.map(|lora| AdapterPass::eval(lora));
        let adapter = adapter.as_ref();
        let key = WorkspaceKey::new(&d, self.weights.layers.len(), adapter);
        let mut ws = self.workspace.take(key, adapter);
        let Workspace {
            acts, residuals, ..
        } = &mut *ws;
        self.forward_residuals(residuals, acts, batch, adapter, packs.as_ref(), &rope, &d);
        let x = &residuals[d_last(residuals)];
        let mut h = vec![T::zero(); d.n * d.c];
        let mut rstd = vec![T::zero(); d.n];
        let (w, eps) = (&self.weights.final_norm, self.config.rms_norm_eps);
        rmsnorm_forward(&mut h, &mut rstd, x, w, d.n, d.c, eps);
        self.workspace.put(ws);
        (d, h, packs)
    }

    /// Loss statistics of a batch without gradients (evaluation; an adapter runs without dropout).
    pub fn loss(&self, batch: &Batch, lora: Option<&Lora<T>>) -> CeStats {
        let (d, h, packs) = self.final_hidden(batch, lora);
        let w = &self.weights;
        lm_head_cross_entropy(
            &h,
            w.head(),
            packs.as_ref().and_then(FrozenPacks::head),
            &batch.targets,
            d.n,
            d.c,
            d.v,
            CE_CHUNK_ROWS,
            T::one(),
            None,
            None,
        )
    }

    /// Forward and backward of the mean cross-entropy over the batch's targets, divided by
    /// `normaliser` target tokens (pass the count of the whole accumulated batch, so micro-
    /// batches add up to the large batch). Accumulates gradients into `grads`: its base
    /// tensors that are empty are frozen and get none; its adapter gradient, when `lora` is
    /// given, receives the adapter's. `dropout_seed` draws this step's LoRA dropout masks.
    /// Returns the loss statistics of this batch.
    pub fn forward_backward(
        &self,
        batch: &Batch,
        normaliser: usize,
        lora: Option<&Lora<T>>,
        dropout_seed: u64,
        grads: &mut Grads<T>,
    ) -> CeStats {
        let head = mean_cross_entropy(batch, normaliser);
        self.backward_through(batch, lora, dropout_seed, grads, head)
    }

    /// [`Model::forward_backward`] of full fine-tuning with the optimizer in the backward:
    /// `grads` comes from [`Grads::streamed`] (one layer's buffer), and
    /// `layer_done(l, weights, g)` receives layer `l`'s weights and weight gradients as soon as
    /// its backward is done, last layer first. The step reads those weights no more, so the
    /// callback may move them; it must leave `g` zeroed for the next layer. The gradients
    /// outside the layers (embedding, final norm, LM head) are in `grads` when this returns.
    ///
    /// # Panics
    /// When `grads` was not built by [`Grads::streamed`] (a caller's bug).
    pub fn forward_backward_streamed(
        &mut self,
        batch: &Batch,
        normaliser: usize,
        grads: &mut Grads<T>,
        mut layer_done: impl FnMut(usize, &mut LayerWeights<T>, &mut LayerWeights<T>),
    ) -> CeStats {
        assert!(
            grads.base.layers.len() == 1 && grads.lora.is_none(),
            "forward_backward_streamed takes the gradients of Grads::streamed"
        );
        let head = mean_cross_entropy(batch, normaliser);
        let (mut pass, stats) = self.backward_head(batch, None, 0, grads, head);
        for l in (0..self.weights.layers.len()).rev() {
            let g = &mut grads.base.layers[0];
            self.backward_layer(&mut pass, batch, l, g, None);
            layer_done(l, &mut self.weights.layers[l], g);
        }
        self.backward_embedding(pass, batch, &mut grads.base);
        stats
    }

    /// Forward and backward of a loss that depends on each target's log-probability, such as a
    /// preference objective. `weights` receives `log p(target)` of every position of the
    /// training forward (0 where the target is `IGNORE`; LoRA dropout drawn from
    /// `dropout_seed`) and returns `dL / d(-log p)` per position. Accumulates the gradient of
    /// `L` into `grads` and returns the log-probabilities.
    pub fn forward_backward_weighted(
        &self,
        batch: &Batch,
        lora: Option<&Lora<T>>,
        dropout_seed: u64,
        grads: &mut Grads<T>,
        weights: impl FnOnce(&[f64]) -> Vec<T>,
    ) -> Vec<f64> {
        let head = |h: &[T], w: HeadWeight<T>, d: &Dims, dh: &mut [T], dw: Option<&mut [T]>| {
            let (n, c, v) = (d.n, d.c, d.v);
            let (targets, chunk) = (&batch.targets, ce_chunk_rows(&dw));
            let log_probs = target_log_probs(h, w.w, w.packs, targets, n, c, v, chunk);
            let scale = weights(&log_probs);
            lm_head_cross_entropy(
                h,
                w.w,
                w.packs,
                targets,
                n,
                c,
                v,
                chunk,
                scale.as_slice(),
                Some(dh),
                dw,
            );
            log_probs
        };
        self.backward_through(batch, lora, dropout_seed, grads, head)
    }

    /// `log p(target)` of every position of a batch (0 where `IGNORE`), evaluation forward.
    pub fn target_log_probs(&self, batch: &Batch, lora: Option<&Lora<T>>) -> Vec<f64> {
        let (d, h, packs) = self.final_hidden(batch, lora);
        let (w, packs) = (
            self.weights.head(),
            packs.as_ref().and_then(FrozenPacks::head),
        );
        target_log_probs(&h, w, packs, &batch.targets, d.n, d.c, d.v, CE_CHUNK_ROWS)
    }

    /// The training forward, the LM head given by `head`, and the backward through every layer.
    /// `head(h, w_head, dims, dh, dw_head)` sees the final-norm hidden states and must add the
    /// loss gradient into `dh[N, C]` (and into `dw_head` when the head is trained).
    fn backward_through<R>(
        &self,
        batch: &Batch,
        lora: Option<&Lora<T>>,
        dropout_seed: u64,
        grads: &mut Grads<T>,
        head: impl FnOnce(&[T], HeadWeight<T>, &Dims, &mut [T], Option<&mut [T]>) -> R,
    ) -> R {
        let (mut pass, head_out) = self.backward_head(batch, lora, dropout_seed, grads, head);
        for l in (0..self.weights.layers.len()).rev() {
            let gl = grads.lora.as_mut().map(|g| &mut g.layers[l]);
            self.backward_layer(&mut pass, batch, l, &mut grads.base.layers[l], gl);
        }
        self.backward_embedding(pass, batch, &mut grads.base);
        head_out
    }

    /// The first part of [`Model::backward_through`]: the training forward (keeping each
    /// layer's input), the head, and the final norm's backward.
    fn backward_head<'a, R>(
        &self,
        batch: &Batch,
        lora: Option<&'a Lora<T>>,
        dropout_seed: u64,
        grads: &mut Grads<T>,
        head: impl FnOnce(&[T], HeadWeight<T>, &Dims, &mut [T], Option<&mut [T]>) -> R,
    ) -> (BackwardPass<'a, T>, R) {
        let d = self.dims(batch);
        let rope = self.rope_for(batch);
        let w = &self.weights;
        let adapter = lora.map(|lora| AdapterPass::train(lora, dropout_seed));
        let packs = self.packs.frozen(w, &grads.base);
        let key = WorkspaceKey::new(&d, w.layers.len(), adapter.as_ref());
        let mut ws = self.workspace.take(key, adapter.as_ref());
        let Workspace {
            acts, residuals, ..
        } = &mut *ws;
        let (ad, pk) = (adapter.as_ref(), packs.as_ref());
        self.forward_residuals(residuals, acts, batch, ad, pk, &rope, &d);
        let grads = &mut grads.base;
        let eps = self.config.rms_norm_eps;

        // Final norm and fused LM head + cross-entropy.
        let x_last = &residuals[d_last(residuals)];
        let mut h = vec![T::zero(); d.n * d.c];
        let mut rstd = vec![T::zero(); d.n];
        rmsnorm_forward(&mut h, &mut rstd, x_last, &w.final_norm, d.n, d.c, eps);
        let mut dh = vec![T::zero(); d.n * d.c];
        let dhead = match &mut grads.lm_head {
            Some(lm_head) => grad_slot(lm_head),
            None => grad_slot(&mut grads.embed), // tied: the head's gradient lands in the embedding
        };
        let head_w = HeadWeight {
            w: w.head(),
            packs: pk.and_then(FrozenPacks::head),
        };
        let head_out = head(&h, head_w, &d, &mut dh, dhead);
        let mut dx = vec![T::zero(); d.n * d.c];
        let dw = grad_slot(&mut grads.final_norm);
        rmsnorm_backward(&mut dx, dw, &dh, x_last, &w.final_norm, &rstd, d.n, d.c);
        let pass = BackwardPass {
            d,
            rope,
            adapter,
            packs,
            ws,
            dx,
        };
        (pass, head_out)
    }

    /// Layer `l`'s part of [`Model::backward_through`], taken from the last layer down: its
    /// recompute from its saved input (the last layer's activations are still there from the
    /// forward) and its backward, into `g` and `g_lora`.
    fn backward_layer(
        &self,
        pass: &mut BackwardPass<T>,
        batch: &Batch,
        l: usize,
        g: &mut LayerWeights<T>,
        g_lora: Option<&mut LayerLora<T>>,
    ) {
        let BackwardPass {
            d,
            rope,
            adapter,
            packs,
            ws,
            dx,
        } = pass;
        let Workspace {
            acts,
            scratch,
            residuals,
            ..
        } = &mut **ws;
        let (adapter, packs) = (adapter.as_ref(), packs.as_ref());
        let x = &residuals[l];
        if l + 1 != self.weights.layers.len() {
            self.layer_forward(None, acts, x, l, adapter, packs, batch, rope, d);
        }
        self.layer_backward(
            dx, g, g_lora, scratch, x, acts, l, adapter, packs, batch, rope, d,
        );
    }

    /// The last part of [`Model::backward_through`]: the embedding's gradient.
    fn backward_embedding(&self, pass: BackwardPass<T>, batch: &Batch, grads: &mut Weights<T>) {
        if let Some(dembed) = grad_slot(&mut grads.embed) {
            embedding_backward(dembed, &pass.dx, &batch.ids, pass.d.c);
        }
        let mut ws = pass.ws;
        // The next pass's recomputes make the held backward packs again; freed here, they
        // stay out of that pass's peak (its LM head, before any layer's backward).
        for saved in &mut ws.acts.lora {
            saved.w_backward = None;
            saved.w_backward_layer = None;
        }
        self.workspace.put(ws);
    }

    /// Logits `[B*T, V]` of a batch (tests and small evaluations; generation uses the KV cache).
    pub fn logits(&self, batch: &Batch, lora: Option<&Lora<T>>) -> Vec<T> {
        let (d, h, _) = self.final_hidden(batch, lora);
        let w = &self.weights;
        let mut logits = vec![T::zero(); d.n * d.v];
        crate::ops::cross_entropy::logits_forward(&mut logits, &h, w.head(), d.n, d.c, d.v);
        logits
    }
}

/// The LM head of [`Model::forward_backward`]: the cross-entropy over the batch's targets,
/// divided by `normaliser` target tokens.
#[allow(clippy::type_complexity)] // the head closure's signature, spelled out once
fn mean_cross_entropy<T: Float>(
    batch: &Batch,
    normaliser: usize,
) -> impl FnOnce(&[T], HeadWeight<T>, &Dims, &mut [T], Option<&mut [T]>) -> CeStats + '_ {
    let scale = T::one() / T::of(normaliser.max(1) as f64);
    move |h, w, d, dh, dw| {
        let (n, c, v) = (d.n, d.c, d.v);
        let (targets, chunk) = (&batch.targets, ce_chunk_rows(&dw));
        lm_head_cross_entropy(
            h,
            w.w,
            w.packs,
            targets,
            n,
            c,
            v,
            chunk,
            scale,
            Some(dh),
            dw,
        )
    }
}

/// When the backward of `n` rows takes the bf16 path ([`proj_backward`]'s test), `x[N, D_in]`
/// packed as the right operand of `dW = dY^T X` for the projections that read it, when any of
/// them is trained (full fine-tuning): one pack of `x` for all of them, and their `dY^T` comes
/// transposed from the pack of `dY` ([`proj_backward_bf16`]).
fn input_pack<T: Float, const P: usize>(
    x: &[T],
    n: usize,
    d_in: usize,
    readers: [&Linear<T>; P],
) -> Option<PackedB> {
    let trained = readers.iter().any(|g| !g.w.is_empty());
    if !trained || !runs_in_bf16(n) {
        return None;
    }
    let x = T::f32_slice(x)?;
    Some(PackedB::transient(MatRef::row_major(x, d_in), n, d_in))
}

/// Hands a packed input's buffer back for the next products.
fn recycle(packed: Option<PackedA>) {
    if let Some(p) = packed {
        p.recycle();
    }
}

fn d_last<X>(v: &[X]) -> usize {
    v.len() - 1
}
