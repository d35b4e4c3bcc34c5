//! AdamW over the trainable tensors (flat f32), as `torch.optim.AdamW` computes it, and global
//! gradient-norm clipping as `torch.nn.utils.clip_grad_norm_`.
//!
//! One step, per element, with t the step count after incrementing (PyTorch's single-tensor path,
//! operation by operation, so the f32 results match it bit for bit):
//! ```text
//! p  = p * (1 - lr * wd)                       decoupled weight decay, first
//! m  = lerp(m, g, 1 - beta1)                   = beta1 * m + (1 - beta1) * g
//! v  = v * beta2 + (1 - beta2) * g * g
//! denom = sqrt(v) / sqrt(1 - beta2^t) + eps
//! p  = p - (lr / (1 - beta1^t)) * m / denom
//! ```
//! Scalars (`1 - lr * wd`, the bias corrections, the step size) are computed in f64 as Python
//! does and rounded to f32 where PyTorch rounds them. Work is split over fixed-size chunks with
//! rayon; every element's update depends only on that element, so results do not depend on the
//! number of threads.
//!
//! The same step also runs in parts, for an optimizer in the backward pass: each tensor moves
//! as soon as its gradient is final ([`AdamW::step_part`]), so the gradient's buffer can be
//! reused for the next layer. Element by element the operations are the same, so the results
//! are bit for bit those of [`AdamW::step`].

use rayon::prelude::*;
use retune_core::model::{Batch, Grads, Model};
use retune_core::ops::cross_entropy::CeStats;

/// Elements per parallel work item.
const CHUNK: usize = 1 << 14;

/// AdamW state for a list of flat f32 tensors.
#[derive(Clone, Debug, PartialEq)]
pub struct AdamW {
    /// Decay rate of the first moment.
    pub beta1: f64,
    /// Decay rate of the second moment.
    pub beta2: f64,
    /// Added to the denominator.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// Whether each tensor is decayed (all by default; transformers leaves biases and norm
    /// weights undecayed in full fine-tuning).
    pub decay: Vec<bool>,
    /// Steps taken.
    pub step: u64,
    /// First moments, one per tensor.
    pub m: Vec<Vec<f32>>,
    /// Second moments, one per tensor.
    pub v: Vec<Vec<f32>>,
}

/// One chunk of one tensor, with its moments and gradient.
struct Work<'a> {
    p: &'a mut [f32],
    m: &'a mut [f32],
    v: &'a mut [f32],
    g: &'a [f32],
    decay: f32,
}

/// Per-step scalars, rounded to f32 as PyTorch rounds them.
#[derive(Clone, Copy)]
struct Scalars {
    w1: f32,
    b2: f32,
    w2: f32,
    bc2_sqrt: f32,
    eps: f32,
    neg_step_size: f32,
}

/// `torch.lerp(start, end, w)` as its vectorised CPU kernel computes it; `SMALL_W` is
/// `w.abs() < 0.5`, decided once per loop so that the loop has no branch and vectorises.
#[inline(always)]
fn lerp<const SMALL_W: bool>(start: f32, end: f32, w: f32) -> f32 {
    if SMALL_W {
        w.mul_add(end - start, start)
    } else {
        (w - 1.0).mul_add(end - start, end)
    }
}

/// The moments of one element.
#[inline(always)]
fn moments<const SMALL_W: bool>(m: &mut f32, v: &mut f32, g: f32, s: &Scalars) {
    *m = lerp::<SMALL_W>(*m, g, s.w1);
    *v = (s.w2 * g).mul_add(g, *v * s.b2);
}

/// The parameter update of one element from its (already updated) moments.
#[inline(always)]
fn apply(p: &mut f32, m: f32, v: f32, decay: f32, s: &Scalars) {
    *p *= decay;
    let denom = v.sqrt() / s.bc2_sqrt + s.eps;
    *p += s.neg_step_size * m / denom;
}

/// Elements updated side by side: one AVX-512 register of f32. Each lane keeps its own sum of
/// squares, so the loop has no serial dependency and vectorises.
const LANES: usize = 16;

/// One chunk's whole update; returns the gradient's sum of squares (f64, in a fixed order).
///
/// Compiled for FMA (and AVX-512) where the CPU has them. `mul_add` is a fused multiply-add,
/// correctly rounded on every build; on a CPU with FMA it is one instruction and the loop
/// vectorises (the baseline x86-64 build calls libm's `fmaf` per element), with bitwise the
/// same results.
fn update(work: Work, s: Scalars) -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx2,fma")]
        unsafe fn wide(work: Work, s: &Scalars) -> f64 {
            update_body(work, s)
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(work: Work, s: &Scalars) -> f64 {
            update_body(work, s)
        }
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has the features `wide` is compiled for.
            return unsafe { wide(work, &s) };
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            // SAFETY: as above, for `avx2`.
            return unsafe { avx2(work, &s) };
        }
    }
    update_body(work, &s)
}

#[inline(always)]
fn update_body(work: Work, s: &Scalars) -> f64 {
    let Work { p, m, v, g, decay } = work;
    if s.w1.abs() < 0.5 {
        update_lanes::<true>(p, m, v, g, decay, s)
    } else {
        update_lanes::<false>(p, m, v, g, decay, s)
    }
}

/// One element: its square added to `sum`, its moments, then its parameter. The decay
/// multiplies `p` before anything reads it, so running it after the moments (which do not
/// read `p`) changes nothing.
#[inline(always)]
fn update_one<const SMALL_W: bool>(
    p: &mut f32,
    m: &mut f32,
    v: &mut f32,
    g: f32,
    sum: &mut f64,
    decay: f32,
    s: &Scalars,
) {
    *sum += f64::from(g) * f64::from(g);
    moments::<SMALL_W>(m, v, g, s);
    apply(p, *m, *v, decay, s);
}

#[inline(always)]
fn update_lanes<const SMALL_W: bool>(
    p: &mut [f32],
    m: &mut [f32],
    v: &mut [f32],
    g: &[f32],
    decay: f32,
    s: &Scalars,
) -> f64 {
    let s = *s;
    let mut sums = [0.0f64; LANES];
    let (mut pc, mut mc, mut vc) = (
        p.chunks_exact_mut(LANES),
        m.chunks_exact_mut(LANES),
        v.chunks_exact_mut(LANES),
    );
    let mut gc = g.chunks_exact(LANES);
    for (((p, m), v), g) in (&mut pc).zip(&mut mc).zip(&mut vc).zip(&mut gc) {
        for j in 0..LANES {
            update_one::<SMALL_W>(
                &mut p[j],
                &mut m[j],
                &mut v[j],
                g[j],
                &mut sums[j],
                decay,
                &s,
            );
        }
    }
    let rest = pc.into_remainder().iter_mut().zip(mc.into_remainder());
    for ((p, m), (v, &g)) in rest.zip(vc.into_remainder().iter_mut().zip(gc.remainder())) {
        update_one::<SMALL_W>(p, m, v, g, &mut sums[0], decay, &s);
    }
    sums.iter().sum()
}

impl AdamW {
    /// Zeroed state for tensors of `sizes` elements.
    pub fn new(sizes: &[usize], beta1: f64, beta2: f64, eps: f64, weight_decay: f64) -> Self {
        AdamW {
            beta1,
            beta2,
            eps,
            weight_decay,
            decay: vec![true; sizes.len()],
            step: 0,
            m: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            v: sizes.iter().map(|&n| vec![0.0; n]).collect(),
        }
    }

    /// Zeroed state with the betas, epsilon and weight decay of a `[train]` section.
    pub fn from_config(sizes: &[usize], train: &crate::config::TrainConfig) -> Self {
        Self::new(
            sizes,
            train.adam_beta1,
            train.adam_beta2,
            train.adam_eps,
            train.weight_decay,
        )
    }

    /// One AdamW step at learning rate `lr`: updates `params` in place from `grads`.
    ///
    /// # Panics
    /// When the number or sizes of `params` and `grads` differ from those the optimizer was
    /// built for: a caller's bug, never user input.
    pub fn step(&mut self, params: &mut [&mut Vec<f32>], grads: &[&[f32]], lr: f64) {
        assert!(
            params.len() == self.m.len() && grads.len() == self.m.len(),
            "AdamW built for {} tensors, stepped with {} params and {} grads",
            self.m.len(),
            params.len(),
            grads.len()
        );
        self.step += 1;
        let (s, decay) = self.scalars(lr);
        let mut work = Vec::new();
        for (i, ((p, m), v)) in params
            .iter_mut()
            .zip(self.m.iter_mut())
            .zip(self.v.iter_mut())
            .enumerate()
        {
            let g = grads[i];
            assert!(
                p.len() == m.len() && g.len() == m.len(),
                "AdamW tensor {i}: built for {} elements, got param {} and grad {}",
                m.len(),
                p.len(),
                g.len()
            );
            let d = if self.decay[i] { decay } else { 1.0 };
            for (((p, m), v), g) in p
                .chunks_mut(CHUNK)
                .zip(m.chunks_mut(CHUNK))
                .zip(v.chunks_mut(CHUNK))
                .zip(g.chunks(CHUNK))
            {
                work.push(Work {
                    p,
                    m,
                    v,
                    g,
                    decay: d,
                });
            }
        }
        work.into_par_iter().for_each(|w| {
            update(w, s);
        });
    }

    /// This step's scalars at learning rate `lr`, and the decay factor `1 - lr * wd`.
    fn scalars(&self, lr: f64) -> (Scalars, f32) {
        let t = self.step as f64;
        let bc1 = 1.0 - self.beta1.powf(t);
        let bc2 = 1.0 - self.beta2.powf(t);
        let s = Scalars {
            w1: (1.0 - self.beta1) as f32,
            b2: self.beta2 as f32,
            w2: (1.0 - self.beta2) as f32,
            bc2_sqrt: bc2.powf(0.5) as f32,
            eps: self.eps as f32,
            neg_step_size: (-(lr / bc1)) as f32,
        };
        (s, (1.0 - lr * self.weight_decay) as f32)
    }

    /// Starts a step taken in parts: then [`AdamW::step_part`] for every tensor.
    pub fn begin_step(&mut self) {
        self.step += 1;
    }

    /// Part of a step begun by [`AdamW::begin_step`]: moves tensors `first..first +
    /// params.len()` by this step's update from their gradients, and zeroes the gradients so
    /// their buffers are ready for the next ones. Element by element the operations of
    /// [`AdamW::step`], in one pass over parameter, moments and gradient. Returns the
    /// gradients' sum of squares (f64, in a fixed order: the same for any thread count).
    ///
    /// # Panics
    /// When the tensors' count or sizes differ from those the optimizer was built for.
    pub fn step_part(
        &mut self,
        first: usize,
        params: &mut [&mut [f32]],
        grads: &mut [&mut [f32]],
        lr: f64,
    ) -> f64 {
        assert_eq!(
            params.len(),
            grads.len(),
            "AdamW: one gradient per parameter"
        );
        let (s, decay) = self.scalars(lr);
        let range = first..first + grads.len();
        let tensors = params
            .iter_mut()
            .zip(grads.iter_mut())
            .zip(
                self.m[range.clone()]
                    .iter_mut()
                    .zip(&mut self.v[range.clone()]),
            )
            .zip(&self.decay[range]);
        let mut work = Vec::new();
        for (i, (((p, g), (m, v)), &decayed)) in tensors.enumerate() {
            assert!(
                p.len() == m.len() && g.len() == m.len(),
                "AdamW tensor {}: built for {} elements, got param {} and grad {}",
                first + i,
                m.len(),
                p.len(),
                g.len()
            );
            let d = if decayed { decay } else { 1.0 };
            let chunks = p.chunks_mut(CHUNK).zip(g.chunks_mut(CHUNK));
            let moments = m.chunks_mut(CHUNK).zip(v.chunks_mut(CHUNK));
            work.extend(chunks.zip(moments).map(move |c| (c, d)));
        }
        let squares: Vec<f64> = work
            .into_par_iter()
            .map(|(((p, g), (m, v)), decay)| {
                let sum = update(Work { p, m, v, g, decay }, s);
                g.fill(0.0);
                sum
            })
            .collect();
        squares.iter().sum()
    }

    /// The moments as named tensors for a checkpoint: `adamw.m.{i}` and `adamw.v.{i}`, each
    /// of shape `[len]`. The step count is saved separately (in the trainer state).
    pub fn state_tensors(&self) -> Vec<(String, Vec<usize>, &[f32])> {
        let mut out = Vec::with_capacity(2 * self.m.len());
        for (i, (m, v)) in self.m.iter().zip(&self.v).enumerate() {
            out.push((format!("adamw.m.{i}"), vec![m.len()], m.as_slice()));
            out.push((format!("adamw.v.{i}"), vec![v.len()], v.as_slice()));
        }
        out
    }

    /// Restores the moments written by [`AdamW::state_tensors`] and the step count. The
    /// optimizer must have been built for the same tensors; `what` names the source in errors.
    pub fn load_state(
        &mut self,
        step: u64,
        tensors: &std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)>,
        what: &std::path::Path,
    ) -> Result<(), crate::checkpoint::StoreError> {
        let expected = 2 * self.m.len();
        let found = tensors.keys().filter(|k| k.starts_with("adamw.")).count();
        if found != expected {
            return Err(crate::checkpoint::StoreError::format(
                what,
                format!(
                    "optimizer state holds {found} moment tensors, expected {expected}: the \
                     checkpoint was made with other trainable parameters (method or targets changed)"
                ),
            ));
        }
        for (i, (m, v)) in self.m.iter_mut().zip(self.v.iter_mut()).enumerate() {
            for (name, dst) in [(format!("adamw.m.{i}"), m), (format!("adamw.v.{i}"), v)] {
                let Some((_, data)) = tensors.get(&name) else {
                    return Err(crate::checkpoint::StoreError::format(
                        what,
                        format!("optimizer tensor `{name}` is missing"),
                    ));
                };
                if data.len() != dst.len() {
                    return Err(crate::checkpoint::StoreError::format(
                        what,
                        format!(
                            "optimizer tensor `{name}` has {} elements, expected {}: the \
                             checkpoint was made with other trainable parameters",
                            data.len(),
                            dst.len()
                        ),
                    ));
                }
                dst.copy_from_slice(data);
            }
        }
        self.step = step;
        Ok(())
    }
}

/// Sum of squares of one tensor in f64, over fixed chunks combined in order (deterministic).
fn sum_squares(g: &[f32]) -> f64 {
    let partial: Vec<f64> = g
        .par_chunks(CHUNK)
        .map(|c| c.iter().map(|&x| f64::from(x) * f64::from(x)).sum())
        .collect();
    partial.iter().sum()
}

/// One full fine-tuning step with the optimizer in the backward: each layer's weights move
/// as soon as that layer's backward is done (its weights are not read again in the step), so
/// the step holds one layer's gradients instead of the whole model's (on SmolLM2-135M, 0.4 GiB
/// less) and reads each gradient while it is still in cache: bit for bit [`AdamW::step`] after
/// [`Model::forward_backward`]. Without every gradient at hand there is no global-norm
/// clipping and no accumulation over micro-batches. `grads` comes from [`Grads::streamed`]
/// and is left zeroed. Returns the loss statistics and the gradient norm; when the norm is not
/// finite, weights have moved by non-finite updates and the caller must stop the run without
/// saving them (the trainer's guard does).
pub fn full_step_in_backward(
    model: &mut Model<f32>,
    batch: &Batch,
    normaliser: usize,
    grads: &mut Grads<f32>,
    optimizer: &mut AdamW,
    lr: f64,
) -> (CeStats, f64) {
    fn slices(tensors: Vec<&mut Vec<f32>>) -> Vec<&mut [f32]> {
        tensors.into_iter().map(|t| &mut t[..]).collect()
    }
    optimizer.begin_step();
    // Tensor order of `Weights::tensors_mut`: the embedding, each layer's tensors, the rest.
    let per_layer = grads
        .base
        .layers
        .first_mut()
        .map_or(0, |l| l.tensors_mut().len());
    let mut squares = 0.0;
    let stats = model.forward_backward_streamed(batch, normaliser, grads, |l, w, g| {
        let (mut w, mut g) = (slices(w.tensors_mut()), slices(g.tensors_mut()));
        squares += optimizer.step_part(1 + l * per_layer, &mut w, &mut g, lr);
    });
    let layers = model.weights.layers.len();
    let mut params = slices(model.weights.tensors_mut());
    let mut rest = slices(grads.base.tensors_mut());
    let (p_embed, p_after) = params.split_at_mut(1);
    let (g_embed, g_after) = rest.split_at_mut(1);
    squares += optimizer.step_part(0, p_embed, g_embed, lr);
    let (p_after, g_after) = (
        &mut p_after[layers * per_layer..],
        &mut g_after[per_layer..],
    );
    squares += optimizer.step_part(1 + layers * per_layer, p_after, g_after, lr);
    (stats, squares.sqrt())
}

/// Scales `grads` so their global L2 norm is at most `max_norm`, as
/// `torch.nn.utils.clip_grad_norm_`: coefficient `max_norm / (norm + 1e-6)`, applied only when
/// below 1. Returns the norm before clipping, computed in f64 in a fixed order. A non-finite
/// norm is returned without scaling (the caller's NaN guard stops the run), and
/// `max_norm <= 0` turns clipping off (`train.max_grad_norm = 0`).
pub fn clip_grad_norm(grads: &mut [&mut [f32]], max_norm: f32) -> f32 {
    let total: f64 = grads
        .iter()
        .map(|g| sum_squares(g))
        .collect::<Vec<f64>>()
        .iter()
        .sum::<f64>()
        .sqrt();
    let coef = f64::from(max_norm) / (total + 1e-6);
    if total.is_finite() && max_norm > 0.0 && coef < 1.0 {
        let c = coef as f32;
        for g in grads.iter_mut() {
            g.par_chunks_mut(CHUNK)
                .for_each(|chunk| chunk.iter_mut().for_each(|x| *x *= c));
        }
    }
    total as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    const P0: [f64; 16] = [
        0.5, -1.25, 0.003, 2.0, -0.75, 1e-3, -3.5, 0.25, 0.125, -0.0625, 4.0, -2.2, 0.9, -0.01,
        0.33, 1.7,
    ];
    const G: [[f32; 16]; 3] = [
        [
            0.5, -0.25, 0.125, 1.0, -2.0, 0.0625, 0.75, -0.375, 3.0, -0.5, 0.25, 1.5, -1.0,
            0.03125, -0.125, 2.5,
        ],
        [
            -0.25, 0.5, 0.0, 2.0, 1.0, -0.125, 0.375, 0.75, -1.5, 0.5, -0.25, 0.5, 1.0, -0.0625,
            0.25, -2.0,
        ],
        [
            1.0, 0.0, -0.5, 0.25, 0.5, 0.25, -0.75, 0.125, 0.5, -1.0, 2.0, -0.5, 0.0, 0.125, -0.5,
            1.0,
        ],
    ];
    const LRS: [f64; 3] = [1e-2, 5e-3, 2e-3];

    /// Bits of the parameters after each of 3 steps, printed by `fixtures/adamw_reference.py`
    /// (PyTorch 2.15, CPU, `torch.optim.AdamW(..., foreach=False)`; `foreach=True` gives the
    /// same bits):
    /// ```python
    /// p = torch.nn.Parameter(torch.tensor(P0, dtype=torch.float32))
    /// opt = torch.optim.AdamW([p], lr=LRS[0], foreach=False, **kw)
    /// for k in range(3):
    ///     for gr in opt.param_groups: gr['lr'] = LRS[k]
    ///     p.grad = torch.tensor(G[k], dtype=torch.float32); opt.step()
    ///     print([hex(b) for b in bits(p.detach())])
    /// ```
    /// Case A: betas (0.9, 0.999), eps 1e-8, weight_decay 0.1.
    const TORCH_A: [[u32; 16]; 3] = [
        [
            0x3efa9fbf, 0xbf9e8f5c, 0xbbe57968, 0x3ffe76c9, 0xbf3d3f7d, 0xbc1378ec, 0xc0606a7f,
            0x3e84fdf4, 0x3deb4396, 0xbd56c8b4, 0x407f1aa0, 0xc00d4c99, 0x3f68bac7, 0xbca3c210,
            0x3eade93a, 0x3fd81a38,
        ],
        [
            0x3ef9d11e, 0xbf9eb70b, 0xbc299228, 0x3ffdb813, 0xbf3ccffd, 0xbbead098, 0xc0609a22,
            0x3e83fd00, 0x3de86b49, 0xbd57c127, 0x407efe48, 0xc00d81df, 0x3f688bbe, 0xbc94ae3b,
            0x3eace309, 0x3fd7f508,
        ],
        [
            0x3ef917cf, 0xbf9ec177, 0xbc195739, 0x3ffd75d7, 0xbf3cbe47, 0xbc03229d, 0xc0609243,
            0x3e83942a, 0x3de72705, 0xbd53a137, 0x407edcd8, 0xc00d8958, 0x3f687a81, 0xbc9b86c8,
            0x3ead4832, 0x3fd7daad,
        ],
    ];
    /// Case A, moments after step 3.
    const TORCH_A_M: [u32; 16] = [
        0x3df1a9fc, 0x3ccac082, 0xbd2353f8, 0x3e926e97, 0xbcb43958, 0x3c9a1cad, 0x3c9fbe77,
        0x3d4b4396, 0x3e21cac1, 0xbdc39581, 0x3e4a7efa, 0x3dee978d, 0x3c1374bf, 0x3c1a1cad,
        0xbd1a1cad, 0x3dfae148,
    ];
    const TORCH_A_V: [u32; 16] = [
        0x3aabf554, 0x39a3a4b8, 0x398b3f65, 0x3ba5b102, 0x3babbcbb, 0x38abfb9d, 0x3aa5b8e1,
        0x3a3c31e2, 0x3c3c1598, 0x3ac4827e, 0x3b872970, 0x3b33e9b0, 0x3b02e01e, 0x37abfb9d,
        0x39abfb9d, 0x3c380cbf,
    ];
    /// Case B: betas (0.3, 0.95), eps 1e-3, weight_decay 0 (lerp's other branch).
    const TORCH_B: [[u32; 16]; 3] = [
        [
            0x3efae3e5, 0xbf9eb9a0, 0xbbe2c67d, 0x3ffeb8a6, 0xbf3d70f8, 0xbc10e036, 0xc060a39f,
            0x3e851b3c, 0x3deb86de, 0xbd571f2c, 0x407f5cd0, 0xc00d7088, 0x3f68f51b, 0xbca14cc2,
            0x3eae0a14, 0x3fd8520d,
        ],
        [
            0x3efb6418, 0xbf9f3fc3, 0xbc0c2a59, 0x3ffe02d4, 0xbf3db131, 0xbb9c9d34, 0xc060e3c6,
            0x3e83023c, 0x3ded88c1, 0xbd6220a0, 0x407f88bf, 0xc00da696, 0x3f6844d7, 0xbc8057d6,
            0x3eabf2de, 0x3fd897ce,
        ],
        [
            0x3efa53f1, 0xbf9f526e, 0xbbccd8d1, 0x3ffde090, 0xbf3dde2e, 0xbbd9551d, 0xc060cf1f,
            0x3e82880d, 0x3ded0b0f, 0xbd5ac5d3, 0x407f628f, 0xc00da132, 0x3f682c4c, 0xbc8f6f01,
            0x3eace676, 0x3fd88869,
        ],
    ];

    /// The formula in f64, written out (no f32 rounding): the reference for "close".
    fn adamw_f64((b1, b2, eps, wd): (f64, f64, f64, f64)) -> [[f64; 16]; 3] {
        let mut p: Vec<f64> = P0.iter().map(|&x| f64::from(x as f32)).collect();
        let (mut m, mut v) = (vec![0.0f64; 16], vec![0.0f64; 16]);
        let mut out = [[0.0; 16]; 3];
        for k in 0..3 {
            let (lr, t) = (LRS[k], (k + 1) as i32);
            for i in 0..16 {
                let g = f64::from(G[k][i]);
                p[i] -= lr * wd * p[i];
                m[i] = b1 * m[i] + (1.0 - b1) * g;
                v[i] = b2 * v[i] + (1.0 - b2) * g * g;
                let mhat = m[i] / (1.0 - b1.powi(t));
                let vhat = v[i] / (1.0 - b2.powi(t));
                p[i] -= lr * mhat / (vhat.sqrt() + eps);
                out[k][i] = p[i];
            }
        }
        out
    }

    fn run(b1: f64, b2: f64, eps: f64, wd: f64, torch: &[[u32; 16]; 3]) -> AdamW {
        let reference = adamw_f64((b1, b2, eps, wd));
        let mut p: Vec<f32> = P0.iter().map(|&x| x as f32).collect();
        let mut opt = AdamW::new(&[16], b1, b2, eps, wd);
        for k in 0..3 {
            opt.step(&mut [&mut p], &[&G[k]], LRS[k]);
            let bits: Vec<u32> = p.iter().map(|x| x.to_bits()).collect();
            assert_eq!(
                bits,
                torch[k].to_vec(),
                "step {}: bits differ from PyTorch",
                k + 1
            );
            for (i, (&x, &r)) in p.iter().zip(&reference[k]).enumerate() {
                let tol = 1e-6 * r.abs().max(1e-3);
                assert!(
                    (f64::from(x) - r).abs() < tol,
                    "step {} [{i}]: {x} vs f64 {r}",
                    k + 1
                );
            }
        }
        assert_eq!(opt.step, 3);
        opt
    }

    #[test]
    fn adamw_matches_pytorch_bit_for_bit_and_the_f64_formula() {
        let opt = run(0.9, 0.999, 1e-8, 0.1, &TORCH_A);
        let bits = |x: &[f32]| x.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
        assert_eq!(bits(&opt.m[0]), TORCH_A_M.to_vec());
        assert_eq!(bits(&opt.v[0]), TORCH_A_V.to_vec());
        run(0.3, 0.95, 1e-3, 0.0, &TORCH_B);
    }

    /// One step by hand: p = 1, g = 0.5, lr = 0.1, wd = 0.01, betas (0.9, 0.999), eps 1e-8.
    /// p' = 1 * (1 - 0.001) = 0.999; m = 0.05, v = 0.00025; mhat = 0.5, vhat = 0.25;
    /// p'' = 0.999 - 0.1 * 0.5 / (0.5 + 1e-8) = 0.899000002 (the first step moves by ~lr).
    #[test]
    fn first_step_moves_by_about_lr() {
        let mut p = vec![1.0f32];
        let mut opt = AdamW::new(&[1], 0.9, 0.999, 1e-8, 0.01);
        opt.step(&mut [&mut p], &[&[0.5]], 0.1);
        assert!((f64::from(p[0]) - 0.899_000_002).abs() < 1e-7, "{}", p[0]);
        assert!((opt.m[0][0] - 0.05).abs() < 1e-9);
        assert!((opt.v[0][0] - 0.00025).abs() < 1e-10);
    }

    #[test]
    fn undecayed_tensors_and_many_chunks_are_handled() {
        // Two tensors, one spanning several chunks; the same update element by element.
        let n = 3 * CHUNK + 5;
        let mut a: Vec<f32> = (0..n).map(|i| (i % 7) as f32 - 3.0).collect();
        let mut b = vec![2.0f32; 3];
        let ga: Vec<f32> = (0..n).map(|i| ((i % 5) as f32 - 2.0) * 0.1).collect();
        let gb = [0.0f32; 3];
        let mut opt = AdamW::new(&[n, 3], 0.9, 0.999, 1e-8, 0.5);
        opt.decay[1] = false;
        opt.step(&mut [&mut a, &mut b], &[&ga, &gb], 0.1);
        assert_eq!(b, vec![2.0; 3], "zero grad and no decay leave it unchanged");
        let mut single = vec![(n - 1) as f32 % 7.0 - 3.0];
        let mut o1 = AdamW::new(&[1], 0.9, 0.999, 1e-8, 0.5);
        o1.step(&mut [&mut single], &[&ga[n - 1..]], 0.1);
        assert_eq!(a[n - 1].to_bits(), single[0].to_bits());
    }

    /// The optimizer in the backward (moments per tensor group as gradients become final,
    /// then one update) is [`AdamW::step`] bit for bit, over several steps, with decayed and
    /// undecayed tensors; it zeroes the gradients and returns their sum of squares.
    #[test]
    fn step_in_parts_equals_one_step_bit_for_bit() {
        let sizes = [2 * CHUNK + 3, 7, CHUNK];
        let init = |k: usize| -> Vec<Vec<f32>> {
            sizes
                .iter()
                .enumerate()
                .map(|(t, &n)| {
                    (0..n)
                        .map(|i| (((i * 31 + t * 7 + k * 13) % 97) as f32 - 48.0) * 0.01)
                        .collect()
                })
                .collect()
        };
        let mut whole = init(0);
        let mut parts = init(0);
        let mut a = AdamW::new(&sizes, 0.9, 0.99, 1e-6, 0.1);
        a.decay[1] = false;
        let mut b = a.clone();
        for (k, lr) in [1e-2, 3e-3, 5e-4].into_iter().enumerate() {
            let grads = init(k + 1);
            let refs: Vec<&[f32]> = grads.iter().map(Vec::as_slice).collect();
            a.step(&mut whole.iter_mut().collect::<Vec<_>>(), &refs, lr);

            let mut g = grads.clone();
            b.begin_step();
            // Out of order, as a backward hands them over: the last tensors first.
            let (g_front, g_back) = g.split_at_mut(1);
            let (p_front, p_back) = parts.split_at_mut(1);
            let mut g_back: Vec<&mut [f32]> = g_back.iter_mut().map(|v| &mut v[..]).collect();
            let mut p_back: Vec<&mut [f32]> = p_back.iter_mut().map(|v| &mut v[..]).collect();
            let s1 = b.step_part(1, &mut p_back, &mut g_back, lr);
            let (p0, g0) = (&mut p_front[0][..], &mut g_front[0][..]);
            let s0 = b.step_part(0, &mut [p0], &mut [g0], lr);

            let expected: f64 = grads.iter().flatten().map(|&x| f64::from(x).powi(2)).sum();
            assert!(((s0 + s1) - expected).abs() <= 1e-9 * expected);
            assert!(
                g.iter().flatten().all(|&x| x == 0.0),
                "gradients are zeroed"
            );
            assert_eq!(a, b, "moments and step count after step {}", k + 1);
            for (x, y) in whole.iter().flatten().zip(parts.iter().flatten()) {
                assert_eq!(x.to_bits(), y.to_bits(), "parameters after step {}", k + 1);
            }
        }
    }

    #[test]
    fn state_round_trips_and_mismatches_are_errors() {
        let mut p = vec![1.0f32, 2.0];
        let mut opt = AdamW::new(&[2], 0.9, 0.999, 1e-8, 0.0);
        opt.step(&mut [&mut p], &[&[0.5, -0.5]], 0.1);
        let map: std::collections::BTreeMap<String, (Vec<usize>, Vec<f32>)> = opt
            .state_tensors()
            .into_iter()
            .map(|(n, s, d)| (n, (s, d.to_vec())))
            .collect();
        let mut fresh = AdamW::new(&[2], 0.9, 0.999, 1e-8, 0.0);
        fresh
            .load_state(1, &map, std::path::Path::new("ck"))
            .unwrap();
        assert_eq!(fresh, opt);
        let mut other = AdamW::new(&[3], 0.9, 0.999, 1e-8, 0.0);
        let e = other
            .load_state(1, &map, std::path::Path::new("ck/optimizer.safetensors"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(
                "ck/optimizer.safetensors: optimizer tensor `adamw.m.0` has 2 elements, expected 3"
            ),
            "{e}"
        );
    }

    /// PyTorch: grads [3, 4] and [12] (norm 13), `clip_grad_norm_(.., 6.5)` returns 13.0 and
    /// leaves [1.4999999, 1.9999999] (0x3fbfffff, 0x3fffffff) and [5.9999995] (0x40bfffff).
    #[test]
    fn clip_grad_norm_matches_pytorch() {
        let (mut a, mut b) = (vec![3.0f32, 4.0], vec![12.0f32]);
        let n = clip_grad_norm(&mut [&mut a, &mut b], 6.5);
        assert_eq!(n, 13.0);
        assert_eq!(
            a.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            [0x3fbf_ffff, 0x3fff_ffff]
        );
        assert_eq!(b[0].to_bits(), 0x40bf_ffff);
        // Below the threshold: untouched.
        let mut c = vec![0.3f32, 0.4];
        assert_eq!(clip_grad_norm(&mut [&mut c], 1.0), 0.5);
        assert_eq!(c, vec![0.3, 0.4]);
        // Off (max_norm 0) and non-finite: returned, not applied.
        let mut d = vec![30.0f32, 40.0];
        assert_eq!(clip_grad_norm(&mut [&mut d], 0.0), 50.0);
        assert_eq!(d, vec![30.0, 40.0]);
        let mut e = vec![f32::NAN, 1.0];
        assert!(clip_grad_norm(&mut [&mut e], 1.0).is_nan());
        assert_eq!(e[1], 1.0);
    }

    #[test]
    fn norm_does_not_depend_on_thread_count() {
        let g: Vec<f32> = (0..5 * CHUNK + 17)
            .map(|i| ((i * 7919) % 1000) as f32 * 1e-3)
            .collect();
        let one = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .build()
            .unwrap();
        let four = rayon::ThreadPoolBuilder::new()
            .num_threads(4)
            .build()
            .unwrap();
        let n1 = one.install(|| clip_grad_norm(&mut [&mut g.clone()], 0.0));
        let n4 = four.install(|| clip_grad_norm(&mut [&mut g.clone()], 0.0));
        assert_eq!(n1.to_bits(), n4.to_bits());
    }
}
