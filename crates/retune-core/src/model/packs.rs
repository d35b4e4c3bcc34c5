//! bf16 packs of a model's frozen weights, built once and reused by every training step.
//!
//! Under bf16 precision each product with a weight converts it to bf16 and lays it out for the
//! kernel; for a frozen weight (LoRA's base model) that work is the same on every call. Two
//! kinds of packs skip it:
//! - The frozen LM head's two packs ([`FrozenWeight`]; converting the 49k-row head costs more
//!   than its memory-bound product), kept with a fingerprint of the f32 values they were made
//!   from. `Model::weights` is a public field that anything may change (merging an adapter, a
//!   test's finite differences), so every use re-fingerprints the head and repacks it when it
//!   changed: one read of the f32 values, far cheaper than the conversion it saves.
//! - The linear layers of a base held only as packs ([`Model::pack_frozen_base`]): the f32
//!   values are released, so nothing can change them and there is nothing to fingerprint.
//! - A base held once in its storage type ([`Model::from_held`]): every linear layer, the
//!   embedding and the LM head as [`FrozenWeight::Stored`] (bf16 or GGML blocks), which both
//!   products dequantise chunk by chunk; no f32 values at all.
//!
//! Trained weights (non-empty gradient) are never packed: they change after every optimizer
//! step.

use super::lora::Target;
use super::weights::Weights;
use super::Model;
use crate::error::{Error, Result};
use crate::float::Float;
use crate::load::held::HeldModel;
use crate::load::HostTensor;
use crate::ops::matmul::{matmul_precision, FrozenWeight, MatmulPrecision};
use crate::ops::stored::StoredMatrix;
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// The packs of one linear layer's seven projections, by [`Target::index`].
pub(crate) type LayerPacks = [Option<Arc<FrozenWeight>>; 7];

/// The packed head and the fingerprint of the values it was packed from.
struct Entry {
    fingerprint: u64,
    packs: Arc<FrozenWeight>,
}

/// The packs of one forward/backward call, by weight.
pub(crate) struct FrozenPacks {
    /// `[layer][Target::index]`; empty unless the base is held as packs.
    layers: Vec<LayerPacks>,
    head: Option<Arc<FrozenWeight>>,
}

impl FrozenPacks {
    /// The packs of layer `l`'s projection `t`, when the base is held as packs.
    pub(crate) fn linear(&self, l: usize, t: Target) -> Option<&FrozenWeight> {
        self.layers.get(l)?[t.index()].as_deref()
    }

    /// The packs of the LM head, when it is frozen and packed.
    pub(crate) fn head(&self) -> Option<&FrozenWeight> {
        self.head.as_deref()
    }
}

/// The packs inside a model. A clone shares the base's packs (they are its only copy of those
/// weights) and rebuilds the head's on first use.
#[derive(Default)]
pub(crate) struct PackCache {
    /// The LM head's packs, when it is frozen and products run in bf16.
    head: Mutex<Option<Entry>>,
    /// The linear layers' packs or storage of a frozen base held so, `[layer]`; empty
    /// otherwise.
    base: Vec<LayerPacks>,
    /// The embedding of a base held in its storage type (its f32 values are then empty).
    embed: Option<Arc<FrozenWeight>>,
    /// The LM head of a base held in its storage type: the embedding's when tied.
    held_head: Option<Arc<FrozenWeight>>,
}

impl Clone for PackCache {
    fn clone(&self) -> Self {
        PackCache {
            head: Mutex::new(None),
            base: self.base.clone(),
            embed: self.embed.clone(),
            held_head: self.held_head.clone(),
        }
    }
}

impl PackCache {
    /// The stored embedding, when the base is held in its storage type.
    pub(crate) fn embedding(&self) -> Option<&StoredMatrix> {
        self.embed.as_deref().and_then(FrozenWeight::stored)
    }

    /// The frozen weights of layer `l`'s linear layers, when the base is held so (generation
    /// reads them without a training pass).
    pub(crate) fn layer(&self, l: usize) -> Option<&LayerPacks> {
        self.base.get(l)
    }

    /// The held LM head, when the base is held in its storage type.
    pub(crate) fn held_head(&self) -> Option<&FrozenWeight> {
        self.held_head.as_deref()
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
    /// The packs for one call: the base's, when it is held as packs, and, when `T` is f32,
    /// products run in bf16 and the head's gradient in `grads` is empty (frozen), the head's,
    /// reused while its values are unchanged. `None` when there are none (the products then
    /// read the weights as they are).
    pub(crate) fn frozen<T: Float>(
        &self,
        weights: &Weights<T>,
        grads: &Weights<T>,
    ) -> Option<FrozenPacks> {
        let head_grad = grads.lm_head.as_ref().unwrap_or(&grads.embed);
        let head = match &self.held_head {
            Some(held) => Some(held.clone()),
            None => T::f32_slice(weights.head())
                .filter(|_| matmul_precision() == MatmulPrecision::Bf16 && head_grad.is_empty())
                .map(|w| self.head_packs(w, weights.final_norm.len())),
        };
        if head.is_none() && self.base.is_empty() {
            return None;
        }
        Some(FrozenPacks {
            layers: self.base.clone(),
            head,
        })
    }

    /// The packs of the head `w [V, C]`, made again only when its values changed.
    fn head_packs(&self, w: &[f32], c: usize) -> Arc<FrozenWeight> {
        let mut entry = self.head.lock().unwrap_or_else(|e| e.into_inner());
        let fp = fingerprint(w);
        if let Some(e) = entry.as_ref().filter(|e| e.fingerprint == fp) {
            return e.packs.clone();
        }
        *entry = None; // free the stale packs before building the new ones
        let packs = Arc::new(FrozenWeight::packed(w, w.len() / c.max(1), c, true));
        *entry = Some(Entry {
            fingerprint: fp,
            packs: packs.clone(),
        });
        packs
    }
}

impl<T: Float> Model<T> {
    /// Holds every linear layer's weight only as its two bf16 packs, the forward product's
    /// and the input gradient's, and releases its f32 values: for training an adapter with
    /// bf16 products, where the base never changes. Each training step then reads packs
    /// instead of packing every weight three times (forward, recompute, backward); the packs
    /// take the memory the f32 values took. Returns whether it did so: only an f32 model
    /// under bf16 precision holds its base as packs, and only once.
    ///
    /// The products of the layers then run in bf16 from the packs at any precision and any
    /// number of rows, with the bits the bf16 path gives from the f32 values; generation
    /// ([`Model::forward_cached`]) reads the packs too. Merging reads the f32 values, so it
    /// needs the model loaded again. The embedding, the norms and the LM head keep their f32
    /// values. A base too large for two packs per weight is held once instead
    /// ([`Model::from_held`]).
    pub fn pack_frozen_base(&mut self) -> bool {
        if matmul_precision() != MatmulPrecision::Bf16 || self.base_is_packed() {
            return false;
        }
        if self
            .weights
            .layers
            .iter()
            .any(|l| T::f32_slice(&l.q.w).is_none())
        {
            return false;
        }
        let mut base = Vec::with_capacity(self.weights.layers.len());
        for layer in &mut self.weights.layers {
            let packs: LayerPacks = std::array::from_fn(|i| {
                let lin = Target::ALL[i].of_mut(layer);
                let w = T::f32_slice(&lin.w).expect("checked above: the weights are f32");
                let packs = FrozenWeight::packed(w, lin.d_out, lin.d_in, true);
                lin.w = Vec::new(); // released as soon as packed: the peak stays one weight
                Some(Arc::new(packs))
            });
            base.push(packs);
        }
        self.packs.base = base;
        true
    }

    /// Whether the linear layers are held only as bf16 packs ([`Model::pack_frozen_base`])
    /// or in their storage type ([`Model::from_held`]).
    pub fn base_is_packed(&self) -> bool {
        !self.packs.base.is_empty()
    }

    /// Whether the matrices are held in their storage type ([`Model::from_held`]).
    pub fn base_is_held(&self) -> bool {
        self.packs.embed.is_some()
    }

    /// Bytes of the frozen matrices as held: packs or storage, the embedding and head included.
    pub fn held_bytes(&self) -> usize {
        let layers: usize = self
            .packs
            .base
            .iter()
            .flatten()
            .flatten()
            .map(|w| w.byte_len())
            .sum();
        let embed = self.packs.embed.as_ref().map_or(0, |w| w.byte_len());
        let head = match (&self.packs.held_head, &self.packs.embed) {
            (Some(h), Some(e)) if Arc::ptr_eq(h, e) => 0,
            (Some(h), _) => h.byte_len(),
            _ => 0,
        };
        layers + embed + head
    }
}

impl Model<f32> {
    /// A frozen base from a model loaded for holding ([`crate::load::load_held`]): every
    /// linear layer, the embedding and the LM head stay in their storage type and serve both
    /// products (forward and input gradient) from there; norms and biases are f32. For
    /// training an adapter (the base never changes), evaluation and generation; merging and
    /// full fine-tuning need the model loaded in f32 ([`Model::load`]). `path` names the
    /// source in errors.
    pub fn from_held(held: HeldModel, path: &Path) -> Result<Self> {
        let HeldModel {
            config,
            vectors,
            mut matrices,
            ..
        } = held;
        // The matrices take their place in `Weights` with no values; they live in the packs.
        let shapes: BTreeMap<String, Vec<usize>> = config.tensor_shapes().into_iter().collect();
        let mut tensors: BTreeMap<String, HostTensor> = vectors;
        for name in matrices.keys() {
            let shape = shapes.get(name).cloned().unwrap_or_default();
            tensors.insert(
                name.clone(),
                HostTensor {
                    shape,
                    data: Vec::new(),
                },
            );
        }
        let weights = super::Weights::from_tensors(&config, tensors, path)?;
        let mut take = |name: &str| -> Result<Arc<FrozenWeight>> {
            let m = matrices
                .remove(name)
                .ok_or_else(|| Error::format(path, format!("missing matrix `{name}`")))?;
            Ok(Arc::new(FrozenWeight::Stored(m)))
        };
        let mut base = Vec::with_capacity(config.num_hidden_layers);
        for l in 0..config.num_hidden_layers {
            let mut layer: LayerPacks = Default::default();
            for t in Target::ALL {
                layer[t.index()] = Some(take(&format!("model.layers.{l}.{}.weight", t.path()))?);
            }
            base.push(layer);
        }
        let embed = take("model.embed_tokens.weight")?;
        let held_head = match config.tie_word_embeddings {
            true => embed.clone(),
            false => take("lm_head.weight")?,
        };
        let model = Model {
            packs: PackCache {
                head: Default::default(),
                base,
                embed: Some(embed),
                held_head: Some(held_head),
            },
            config,
            weights,
            workspace: Default::default(),
        };
        Ok(model)
    }

    /// Loads a model as a frozen base held in its storage type ([`Model::from_held`]).
    pub fn load_held(path: &Path, hold: &crate::load::held::Hold) -> Result<Self> {
        let held = crate::load::load_held(path, hold)?;
        Self::from_held(held, path)
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
