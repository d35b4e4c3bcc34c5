//! LoRA adapters on the decoder's linear layers, named and shaped as Hugging Face PEFT names
//! and shapes them: `A: [r, D_in]`, `B: [D_out, r]`, `y = x W^T + s (x A^T) B^T` with
//! `s = alpha / r`, or `alpha / sqrt(r)` under rsLoRA.

use super::weights::{LayerWeights, Linear, Weights};
use crate::config::LlamaConfig;
use crate::error::{Error, Result};
use crate::float::Float;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// A linear layer LoRA can adapt, by its PEFT module name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// `self_attn.q_proj`.
    QProj,
    /// `self_attn.k_proj`.
    KProj,
    /// `self_attn.v_proj`.
    VProj,
    /// `self_attn.o_proj`.
    OProj,
    /// `mlp.gate_proj`.
    GateProj,
    /// `mlp.up_proj`.
    UpProj,
    /// `mlp.down_proj`.
    DownProj,
}

impl Target {
    /// Every target, in layer order (also the index order of [`LayerLora::pairs`]).
    pub const ALL: [Target; 7] = [
        Target::QProj,
        Target::KProj,
        Target::VProj,
        Target::OProj,
        Target::GateProj,
        Target::UpProj,
        Target::DownProj,
    ];

    /// PEFT's module name, e.g. `q_proj`.
    pub fn name(self) -> &'static str {
        match self {
            Target::QProj => "q_proj",
            Target::KProj => "k_proj",
            Target::VProj => "v_proj",
            Target::OProj => "o_proj",
            Target::GateProj => "gate_proj",
            Target::UpProj => "up_proj",
            Target::DownProj => "down_proj",
        }
    }

    /// The module path inside a layer, e.g. `self_attn.q_proj`.
    pub fn path(self) -> String {
        let block = if self.index() < 4 { "self_attn" } else { "mlp" };
        format!("{block}.{}", self.name())
    }

    /// Looks a target up by its PEFT name.
    pub fn from_name(name: &str) -> Option<Target> {
        Target::ALL.into_iter().find(|t| t.name() == name)
    }

    /// Position in [`Target::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The base layer this target adapts.
    pub fn of<T>(self, layer: &LayerWeights<T>) -> &Linear<T> {
        match self {
            Target::QProj => &layer.q,
            Target::KProj => &layer.k,
            Target::VProj => &layer.v,
            Target::OProj => &layer.o,
            Target::GateProj => &layer.gate,
            Target::UpProj => &layer.up,
            Target::DownProj => &layer.down,
        }
    }

    /// The base layer this target adapts, mutably.
    pub fn of_mut<T>(self, layer: &mut LayerWeights<T>) -> &mut Linear<T> {
        match self {
            Target::QProj => &mut layer.q,
            Target::KProj => &mut layer.k,
            Target::VProj => &mut layer.v,
            Target::OProj => &mut layer.o,
            Target::GateProj => &mut layer.gate,
            Target::UpProj => &mut layer.up,
            Target::DownProj => &mut layer.down,
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// LoRA hyper-parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraSpec {
    /// Rank r.
    pub r: usize,
    /// Scaling numerator alpha.
    pub alpha: f64,
    /// Dropout on the branch input during training.
    pub dropout: f64,
    /// Adapted layers.
    pub targets: Vec<Target>,
    /// rsLoRA: scale by alpha / sqrt(r) instead of alpha / r.
    pub rslora: bool,
}

impl LoraSpec {
    /// The branch scale `s`.
    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// Checks r, alpha, dropout and targets.
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(Error::Invalid("LoRA rank r must be at least 1".into()));
        }
        if self.alpha.is_nan() || self.alpha <= 0.0 {
            return Err(Error::Invalid(format!(
                "LoRA alpha must be positive, got {}",
                self.alpha
            )));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::Invalid(format!(
                "LoRA dropout must be in [0, 1), got {}",
                self.dropout
            )));
        }
        if self.targets.is_empty() {
            return Err(Error::Invalid(
                "LoRA needs at least one target module".into(),
            ));
        }
        Ok(())
    }
}

/// One adapted layer's pair of matrices.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraPair<T> {
    /// `lora_A.weight`: `[r, D_in]`.
    pub a: Vec<T>,
    /// `lora_B.weight`: `[D_out, r]`.
    pub b: Vec<T>,
}

/// The adapters of one decoder layer, indexed by [`Target::index`].
#[derive(Clone, Debug, PartialEq)]
pub struct LayerLora<T> {
    /// `None` where the target is not adapted.
    pub pairs: [Option<LoraPair<T>>; 7],
}

/// A LoRA adapter for a whole model (or its gradient).
#[derive(Clone, Debug, PartialEq)]
pub struct Lora<T> {
    /// Hyper-parameters.
    pub spec: LoraSpec,
    /// Per-layer adapters.
    pub layers: Vec<LayerLora<T>>,
}

impl<T: Float> Lora<T> {
    /// A fresh adapter initialised as PEFT does: A Kaiming-uniform with a = sqrt(5), i.e.
    /// uniform in ±1/sqrt(D_in); B zero, so training starts from the base model exactly.
    pub fn init(spec: LoraSpec, weights: &Weights<T>, seed: u64) -> Result<Self> {
        spec.validate()?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let layers = weights
            .layers
            .iter()
            .map(|layer| {
                let mut pairs: [Option<LoraPair<T>>; 7] = Default::default();
                for t in Target::ALL {
                    if spec.targets.contains(&t) {
                        let lin = t.of(layer);
                        let bound = 1.0 / (lin.d_in as f64).sqrt();
                        let a = (0..spec.r * lin.d_in)
                            .map(|_| T::of(rng.gen_range(-bound..bound)))
                            .collect();
                        pairs[t.index()] = Some(LoraPair {
                            a,
                            b: vec![T::zero(); lin.d_out * spec.r],
                        });
                    }
                }
                LayerLora { pairs }
            })
            .collect();
        Ok(Lora { spec, layers })
    }

    /// A zero-filled twin (gradients).
    pub fn zeros_like(&self) -> Self {
        let layers = self
            .layers
            .iter()
            .map(|l| LayerLora {
                pairs: l.pairs.clone().map(|p| {
                    p.map(|p| LoraPair {
                        a: vec![T::zero(); p.a.len()],
                        b: vec![T::zero(); p.b.len()],
                    })
                }),
            })
            .collect();
        Lora {
            spec: self.spec.clone(),
            layers,
        }
    }

    /// Every tensor with its PEFT key (`base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`)
    /// and shape, in a fixed order.
    pub fn named(&self, config: &LlamaConfig) -> Vec<(String, Vec<usize>, &[T])> {
        let r = self.spec.r;
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            for t in Target::ALL {
                if let Some(p) = &layer.pairs[t.index()] {
                    let (d_out, d_in) = target_shape(config, t);
                    let key = format!("base_model.model.model.layers.{i}.{}", t.path());
                    out.push((format!("{key}.lora_A.weight"), vec![r, d_in], &p.a[..]));
                    out.push((format!("{key}.lora_B.weight"), vec![d_out, r], &p.b[..]));
                }
            }
        }
        out
    }

    /// Mutable access to every tensor, in the order of [`Lora::named`].
    pub fn tensors_mut(&mut self) -> Vec<&mut Vec<T>> {
        let mut out = Vec::new();
        for layer in &mut self.layers {
            for p in layer.pairs.iter_mut().flatten() {
                out.push(&mut p.a);
                out.push(&mut p.b);
            }
        }
        out
    }

    /// Trainable parameters.
    pub fn param_count(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|l| l.pairs.iter().flatten())
            .map(|p| p.a.len() + p.b.len())
            .sum()
    }

    /// Adds `s B A` into the base weights: the merged model computes what base + adapter does.
    pub fn merge_into(&self, weights: &mut Weights<T>) {
        let (r, s) = (self.spec.r, T::of(self.spec.scale()));
        for (layer, lora) in weights.layers.iter_mut().zip(&self.layers) {
            for t in Target::ALL {
                if let Some(p) = &lora.pairs[t.index()] {
                    let lin = t.of_mut(layer);
                    assert!(
                        !lin.w.is_empty(),
                        "merge_into: the base weights are held as bf16 packs \
                         (Model::pack_frozen_base); merge into the model loaded again"
                    );
                    // delta[D_out, D_in] = s * B[D_out, r] · A[r, D_in], added in place.
                    let sb: Vec<T> = p.b.iter().map(|&v| v * s).collect();
                    crate::ops::matmul::matmul_nn(
                        &mut lin.w, &sb, &p.a, lin.d_out, r, lin.d_in, true,
                    );
                }
            }
        }
    }
}

/// `(D_out, D_in)` of a target layer.
pub fn target_shape(config: &LlamaConfig, t: Target) -> (usize, usize) {
    let (c, f, q, kv) = (
        config.hidden_size,
        config.intermediate_size,
        config.q_dim(),
        config.kv_dim(),
    );
    match t {
        Target::QProj => (q, c),
        Target::KProj | Target::VProj => (kv, c),
        Target::OProj => (c, q),
        Target::GateProj | Target::UpProj => (f, c),
        Target::DownProj => (c, f),
    }
}
