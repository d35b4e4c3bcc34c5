//! The Llama-family decoder: [`Weights`], [`Model`] with its training forward/backward
//! ([`decoder`]), and KV-cached generation ([`generate`]).
//!
//! Covers Llama 2/3.x, Mistral, Qwen2/2.5, SmolLM/SmolLM2 and TinyLlama: RMSNorm, RoPE
//! (rotate-half, optional Llama 3 scaling), grouped-query attention, SwiGLU, optional q/k/v/o
//! and MLP biases, tied or untied LM head.

pub mod decoder;
pub mod generate;
pub mod lora;
pub mod memory;
mod packs;
pub mod weights;

pub use lora::{Lora, LoraSpec, Target};
pub use weights::{LayerWeights, Linear, Weights};

use crate::config::LlamaConfig;
use crate::error::{Error, Result};
use crate::float::Float;
use crate::load::LoadedModel;
use crate::ops::cross_entropy::IGNORE;
use std::path::Path;

/// A decoder: configuration and weights in Hugging Face layout.
#[derive(Clone, Debug)]
pub struct Model<T> {
    /// Architecture.
    pub config: LlamaConfig,
    /// Parameters.
    pub weights: Weights<T>,
    /// bf16 packs of the frozen weights, rebuilt when they change (see [`packs`]).
    packs: packs::PackCache,
    /// Activation buffers kept between training calls.
    workspace: decoder::WorkspaceSlot<T>,
}

impl<T: Float> Model<T> {
    /// Builds a model from loaded tensors; `path` names the source in errors.
    pub fn from_loaded(loaded: LoadedModel, path: &Path) -> Result<Self> {
        let weights = Weights::from_tensors(&loaded.config, loaded.tensors, path)?;
        Ok(Model {
            config: loaded.config,
            weights,
            packs: Default::default(),
            workspace: Default::default(),
        })
    }

    /// Loads a Hugging Face folder or a GGUF file.
    pub fn load(path: &Path) -> Result<Self> {
        let loaded = crate::load::load_model(path)?;
        Self::from_loaded(loaded, path)
    }
}

/// Gradients of one step: of the base weights (an empty tensor is frozen and gets none) and,
/// when training an adapter, of the adapter.
#[derive(Clone, Debug)]
pub struct Grads<T> {
    /// Base-weight gradients; all empty under LoRA.
    pub base: Weights<T>,
    /// Adapter gradients.
    pub lora: Option<Lora<T>>,
}

impl<T: Float> Grads<T> {
    /// Gradients for full fine-tuning: every base weight.
    pub fn full(model: &Model<T>) -> Self {
        Grads {
            base: model.weights.zeros_like(),
            lora: None,
        }
    }

    /// Gradients for LoRA: the adapter's only; base weights are frozen.
    pub fn lora(model: &Model<T>, lora: &Lora<T>) -> Self {
        Grads {
            base: model.weights.empty_like(),
            lora: Some(lora.zeros_like()),
        }
    }

    /// Gradients for full fine-tuning with the optimizer in the backward
    /// ([`Model::forward_backward_streamed`]): every base weight outside the layers, and one
    /// layer's buffer (`base.layers` has one entry) that every layer's backward reuses, so a
    /// step holds one layer's weight gradients rather than all of them.
    pub fn streamed(model: &Model<T>) -> Self {
        let w = &model.weights;
        let zeros = |v: &Vec<T>| vec![T::zero(); v.len()];
        let mut layer = w.layers.first().cloned();
        if let Some(l) = &mut layer {
            l.tensors_mut().into_iter().for_each(|t| *t = zeros(t));
        }
        Grads {
            base: Weights {
                embed: zeros(&w.embed),
                layers: layer.into_iter().collect(),
                final_norm: zeros(&w.final_norm),
                lm_head: w.lm_head.as_ref().map(zeros),
            },
            lora: None,
        }
    }

    /// No gradient at all (inputs' gradients still flow: benchmarks of the frozen path).
    pub fn frozen(model: &Model<T>) -> Self {
        Grads {
            base: model.weights.empty_like(),
            lora: None,
        }
    }
}

/// A batch of B rows of T tokens, with next-token targets.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// Input token ids, `[B*T]`.
    pub ids: Vec<u32>,
    /// Target ids, `[B*T]`; [`IGNORE`] where no loss is taken (prompt, padding, last token).
    pub targets: Vec<u32>,
    /// RoPE position of each token, `[B*T]`; restarts at 0 for each packed example.
    pub positions: Vec<u32>,
    /// Example id of each token when several examples are packed in one row: attention never
    /// crosses examples. `None`: one example per row.
    pub segments: Option<Vec<u32>>,
    /// Rows B.
    pub b: usize,
    /// Tokens per row T.
    pub t: usize,
}

impl Batch {
    /// A causal-LM batch from rows of equal length: inputs are `row[..T]`, each target is the
    /// next token, the last position of each row has none.
    pub fn from_rows(rows: &[Vec<u32>]) -> Result<Self> {
        let t = rows.first().map_or(0, Vec::len);
        if t == 0 || rows.iter().any(|r| r.len() != t) {
            return Err(Error::Invalid(
                "a batch needs non-empty rows of equal length".into(),
            ));
        }
        let mut targets = Vec::with_capacity(rows.len() * t);
        for row in rows {
            targets.extend_from_slice(&row[1..]);
            targets.push(IGNORE);
        }
        Ok(Self::with_targets(rows.concat(), targets, rows.len(), t))
    }

    /// A batch with explicit targets; positions count 0..T in each row.
    pub fn with_targets(ids: Vec<u32>, targets: Vec<u32>, b: usize, t: usize) -> Self {
        let positions = (0..b).flat_map(|_| 0..t as u32).collect();
        Batch {
            ids,
            targets,
            positions,
            segments: None,
            b,
            t,
        }
    }

    /// Number of tokens that carry a loss.
    pub fn target_count(&self) -> usize {
        self.targets.iter().filter(|&&t| t != IGNORE).count()
    }

    /// Checks ids against the vocabulary and positions against the context length.
    pub fn validate(&self, config: &LlamaConfig) -> Result<()> {
        let n = self.b * self.t;
        if self.ids.len() != n || self.targets.len() != n || self.positions.len() != n {
            return Err(Error::Invalid(format!(
                "batch buffers must hold B*T = {n} tokens"
            )));
        }
        let v = config.vocab_size as u32;
        if let Some(bad) = self
            .ids
            .iter()
            .chain(&self.targets)
            .find(|&&id| id != IGNORE && id >= v)
        {
            return Err(Error::Invalid(format!(
                "token id {bad} is outside the model's vocabulary of {v}: tokenizer and model do not match"
            )));
        }
        if let Some(w) = config.sliding_window.filter(|&w| self.t > w) {
            return Err(Error::Invalid(format!(
                "sequences of {} tokens exceed the model's sliding window of {w}; retune attends \
                 over the whole sequence, so keep sequences within the window (lower --max-seq-len)",
                self.t
            )));
        }
        if let Some(&p) = self.positions.iter().max() {
            if p as usize >= config.max_position_embeddings {
                return Err(Error::Invalid(format!(
                    "position {p} exceeds the model's context of {} tokens: lower --max-seq-len",
                    config.max_position_embeddings
                )));
            }
        }
        Ok(())
    }
}

impl<T: Float> Model<T> {
    /// A randomly initialised model (tests, benchmarks): matrices uniform with std `std`,
    /// biases zero-mean with std `std`, norm weights 1 plus noise of std `std`.
    pub fn random(config: LlamaConfig, seed: u64, std: f64) -> Result<Self> {
        use rand::{Rng, SeedableRng};
        config.validate().map_err(Error::Invalid)?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let a = std * 3f64.sqrt(); // uniform(-a, a) has standard deviation `std`
        let mut tensors = std::collections::BTreeMap::new();
        for (name, shape) in config.tensor_shapes() {
            let len: usize = shape.iter().product();
            let base = if name.ends_with("norm.weight") {
                1.0
            } else {
                0.0
            };
            let data = (0..len)
                .map(|_| (base + rng.gen_range(-a..a)) as f32)
                .collect();
            tensors.insert(name, crate::load::HostTensor { shape, data });
        }
        let weights = Weights::from_tensors(&config, tensors, Path::new("<random>"))?;
        Ok(Model {
            config,
            weights,
            packs: Default::default(),
            workspace: Default::default(),
        })
    }
}

#[cfg(test)]
mod tests;
