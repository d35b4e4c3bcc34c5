//! bf16 packs of a model's frozen weights, built once and reused by every training step.
//!
//! Under bf16 precision each product with a weight converts it to bf16 and lays it out for the
//! kernel; for a frozen weight (LoRA's base model) that work is the same on every call. The
//! cache keeps both packs of a frozen LM head ([`WeightPacks`]; converting the 49k-row head
//! costs more than its memory-bound product) and, when [`set_pack_layer_weights`] asks for
//! it, the forward pack of every frozen linear layer; each with a fingerprint of the f32 values it was made from. `Model::weights` is a public
//! field that anything may change (merging an adapter, a test's finite differences), so every
//! use re-fingerprints the weights and repacks the ones that changed: one read of the f32
//! weights, far cheaper than the conversions it saves. Trained weights (non-empty gradient)
//! are never packed: they change after every optimizer step.

use super::lora::Target;
use super::weights::{Linear, Weights};
use crate::float::Float;
use crate::ops::matmul::{matmul_precision, MatmulPrecision, WeightPacks};
use rayon::prelude::*;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

static PACK_LAYERS: AtomicBool = AtomicBool::new(false);

/// Whether bf16 training steps also keep a bf16 pack of every frozen linear layer's weight
/// (process-wide, off by default). On SmolLM2-135M LoRA it saves about 4% of a step for
/// 0.2 GiB more memory (half the f32 base weights); the LM head is packed either way.
pub fn set_pack_layer_weights(on: bool) {
    PACK_LAYERS.store(on, Ordering::Relaxed);
}

/// One packed weight and the fingerprint of the values it was packed from.
struct Entry {
    fingerprint: u64,
    packs: Arc<WeightPacks>,
}

/// The packs of one forward/backward call, by weight.
pub(crate) struct FrozenPacks {
    /// `[layer][Target::index]`.
    layers: Vec<[Option<Arc<WeightPacks>>; 7]>,
    head: Option<Arc<WeightPacks>>,
}

impl FrozenPacks {
    /// The packs of layer `l`'s projection `t`, when it is frozen and packed.
    pub(crate) fn linear(&self, l: usize, t: Target) -> Option<&WeightPacks> {
        self.layers.get(l)?[t.index()].as_deref()
    }

    /// The packs of the LM head, when it is frozen and packed.
    pub(crate) fn head(&self) -> Option<&WeightPacks> {
        self.head.as_deref()
    }
}

/// The cache inside a model; a clone starts empty (it is rebuilt on first use).
#[derive(Default)]
pub(crate) struct PackCache {
    /// Entries `[layer * 7 + Target::index]`, then the head last.
    entries: Mutex<Vec<Option<Entry>>>,
}

impl Clone for PackCache {
    fn clone(&self) -> Self {
        PackCache::default()
    }
}

impl std::fmt::Debug for PackCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PackCache")
    }
}

/// Elements per rayon task when fingerprinting.
const FINGERPRINT_CHUNK: usize = 1 << 16;

/// A position-dependent 64-bit hash of the values' bits: any change of an element changes it
/// (up to hash collisions). Sixteen independent lanes, so it vectorises and runs at memory speed.
fn fingerprint(w: &[f32]) -> u64 {
    const LANES: usize = 16;
    const MUL: u64 = 0x9E37_79B9_7F4A_7C15;
    let chunk_hash = |(ci, chunk): (usize, &[f32])| {
        let mut acc = [0u64; LANES];
        let mut blocks = chunk.chunks_exact(LANES);
        for block in &mut blocks {
            for (a, x) in acc.iter_mut().zip(block) {
                *a = (*a ^ x.to_bits() as u64).wrapping_mul(MUL);
            }
        }
        for (a, x) in acc.iter_mut().zip(blocks.remainder()) {
            *a = (*a ^ x.to_bits() as u64 ^ 0xFF).wrapping_mul(MUL);
        }
        let mut h = ci as u64;
        for (i, a) in acc.iter().enumerate() {
            h = (h ^ a.rotate_left(i as u32 * 4)).wrapping_mul(MUL);
        }
        h
    };
    let hashes: Vec<u64> = w
        .par_chunks(FINGERPRINT_CHUNK)
        .enumerate()
        .map(chunk_hash)
        .collect();
    hashes.iter().fold(w.len() as u64, |h, &c| {
        (h ^ c).wrapping_mul(MUL).rotate_left(23)
    })
}

impl PackCache {
    /// The packs for one call, when `T` is f32 and products run in bf16: every weight whose
    /// gradient in `grads` is empty (frozen) is packed, reusing the packs of unchanged
    /// weights. `None` otherwise (the products then read the weights as they are).
    pub(crate) fn frozen<T: Float>(
        &self,
        weights: &Weights<T>,
        grads: &Weights<T>,
    ) -> Option<FrozenPacks> {
        if matmul_precision() != MatmulPrecision::Bf16 {
            return None;
        }
        // Every weight with the gradient slot that says whether it is frozen.
        let mut wanted: Vec<Option<(&[f32], usize, usize)>> = Vec::new();
        fn as_f32<'w, T: Float>(
            lin: &'w Linear<T>,
            g: &Linear<T>,
        ) -> Option<(&'w [f32], usize, usize)> {
            let w = T::f32_slice(&lin.w)?;
            g.w.is_empty().then_some((w, lin.d_out, lin.d_in))
        }
        // Streamed gradients (`Grads::streamed`) have one layer's buffer for every layer.
        let last_grad = grads.layers.len().saturating_sub(1);
        for (l, lw) in weights.layers.iter().enumerate() {
            let lg = &grads.layers[l.min(last_grad)];
            for t in Target::ALL {
                wanted.push(as_f32(t.of(lw), t.of(lg)));
            }
        }
        let head_grad = grads.lm_head.as_ref().unwrap_or(&grads.embed);
        let head = T::f32_slice(weights.head()).filter(|_| head_grad.is_empty());
        let c = weights.final_norm.len();
        wanted.push(head.map(|w| (w, w.len() / c.max(1), c)));
        if wanted.iter().all(Option::is_none) {
            return None;
        }

        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.resize_with(wanted.len(), || None);
        let head_slot = wanted.len() - 1;
        let pack_layers = PACK_LAYERS.load(Ordering::Relaxed);
        for (i, (slot, want)) in entries.iter_mut().zip(&wanted).enumerate() {
            // Layers: the forward pack only (read twice per step: forward and recompute); a
            // second pack per weight costs another 0.2 GiB and measured within noise.
            let with_backward = i == head_slot;
            let want = want.filter(|_| i == head_slot || pack_layers);
            let Some((w, d_out, d_in)) = want else {
                *slot = None; // trained (or absent): drop its packs
                continue;
            };
            let fp = fingerprint(w);
            if slot.as_ref().is_some_and(|e| e.fingerprint == fp) {
                continue;
            }
            *slot = None; // free the stale packs before building the new ones
            *slot = Some(Entry {
                fingerprint: fp,
                packs: Arc::new(WeightPacks::new(w, d_out, d_in, with_backward)),
            });
        }
        let mut arcs = entries.iter().map(|e| e.as_ref().map(|e| e.packs.clone()));
        let layers = weights
            .layers
            .iter()
            .map(|_| std::array::from_fn(|_| arcs.next().flatten()))
            .collect();
        let head = arcs.next().flatten();
        Some(FrozenPacks { layers, head })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_sees_any_single_change() {
        let w: Vec<f32> = (0..FINGERPRINT_CHUNK * 2 + 37)
            .map(|i| (i as f32 * 0.37).sin())
            .collect();
        let base = fingerprint(&w);
        assert_eq!(base, fingerprint(&w.clone()));
        for i in [0, 15, 16, 1000, FINGERPRINT_CHUNK, w.len() - 1] {
            let mut changed = w.clone();
            changed[i] = f32::from_bits(changed[i].to_bits() ^ 1); // one ulp
            assert_ne!(fingerprint(&changed), base, "change at {i} not seen");
        }
        // Swapping two elements (same multiset of values) is a change too.
        let mut swapped = w.clone();
        swapped.swap(3, 4);
        assert_ne!(fingerprint(&swapped), base);
    }
}
