//! Parameter storage of the decoder, in Hugging Face layout and naming.
//!
//! The same [`Weights`] type holds gradients: a tensor whose `Vec` is empty is *not trainable*
//! and gets no gradient (see [`grad_slot`]), so frozen weights cost neither memory nor GEMMs.

use crate::config::LlamaConfig;
use crate::error::{Error, Result};
use crate::float::Float;
use crate::load::HostTensor;
use std::collections::BTreeMap;
use std::path::Path;

/// A linear layer `y = x W^T + b`, W stored `[d_out, d_in]` as in PyTorch.
#[derive(Clone, Debug)]
pub struct Linear<T> {
    /// `[d_out, d_in]`.
    pub w: Vec<T>,
    /// `[d_out]`, when the layer has a bias.
    pub b: Option<Vec<T>>,
    /// Input width.
    pub d_in: usize,
    /// Output width.
    pub d_out: usize,
}

/// One decoder layer's parameters.
#[derive(Clone, Debug)]
pub struct LayerWeights<T> {
    /// `input_layernorm.weight`: `[C]`.
    pub attn_norm: Vec<T>,
    /// `self_attn.q_proj`: `[NH*HD, C]`.
    pub q: Linear<T>,
    /// `self_attn.k_proj`: `[NKV*HD, C]`.
    pub k: Linear<T>,
    /// `self_attn.v_proj`: `[NKV*HD, C]`.
    pub v: Linear<T>,
    /// `self_attn.o_proj`: `[C, NH*HD]`.
    pub o: Linear<T>,
    /// `post_attention_layernorm.weight`: `[C]`.
    pub mlp_norm: Vec<T>,
    /// `mlp.gate_proj`: `[F, C]`.
    pub gate: Linear<T>,
    /// `mlp.up_proj`: `[F, C]`.
    pub up: Linear<T>,
    /// `mlp.down_proj`: `[C, F]`.
    pub down: Linear<T>,
}

impl<T> LayerWeights<T> {
    /// Mutable access to the layer's tensors, in the order of [`Weights::named`].
    pub fn tensors_mut(&mut self) -> Vec<&mut Vec<T>> {
        let mut out: Vec<&mut Vec<T>> = vec![&mut self.attn_norm];
        for lin in [&mut self.q, &mut self.k, &mut self.v, &mut self.o] {
            out.push(&mut lin.w);
            out.extend(&mut lin.b);
        }
        out.push(&mut self.mlp_norm);
        for lin in [&mut self.gate, &mut self.up, &mut self.down] {
            out.push(&mut lin.w);
            out.extend(&mut lin.b);
        }
        out
    }
}

/// All parameters of a Llama-family decoder (or their gradients).
#[derive(Clone, Debug)]
pub struct Weights<T> {
    /// `model.embed_tokens.weight`: `[V, C]`.
    pub embed: Vec<T>,
    /// Decoder layers.
    pub layers: Vec<LayerWeights<T>>,
    /// `model.norm.weight`: `[C]`.
    pub final_norm: Vec<T>,
    /// `lm_head.weight`: `[V, C]`; `None` when tied to the embedding.
    pub lm_head: Option<Vec<T>>,
}

/// A gradient buffer as ops take it: `None` (not computed) when the tensor is frozen (empty).
pub fn grad_slot<T>(v: &mut [T]) -> Option<&mut [T]> {
    if v.is_empty() {
        None
    } else {
        Some(v)
    }
}

impl<T: Float> Weights<T> {
    /// Builds weights from named host tensors (Hugging Face names); `path` names the source
    /// in errors. Every tensor `cfg.tensor_shapes()` lists must be present with its shape.
    pub fn from_tensors(
        cfg: &LlamaConfig,
        mut tensors: BTreeMap<String, HostTensor>,
        path: &Path,
    ) -> Result<Self> {
        let shapes: BTreeMap<String, Vec<usize>> = cfg.tensor_shapes().into_iter().collect();
        // Takes a tensor by name, checking its shape against the configuration.
        let mut take = |name: &str| -> Result<Vec<T>> {
            let t = tensors
                .remove(name)
                .ok_or_else(|| Error::format(path, format!("missing tensor `{name}`")))?;
            let expected = &shapes[name];
            if &t.shape != expected {
                return Err(Error::Shape {
                    path: path.to_path_buf(),
                    name: name.to_string(),
                    got: t.shape,
                    expected: expected.clone(),
                });
            }
            Ok(t.data
                .into_iter()
                .map(|x| <T as Float>::from_f32(x))
                .collect())
        };
        let linear = |prefix: &str, take: &mut dyn FnMut(&str) -> Result<Vec<T>>| {
            let wname = format!("{prefix}.weight");
            let shape = &shapes[&wname];
            let bname = format!("{prefix}.bias");
            let b = if shapes.contains_key(&bname) {
                Some(take(&bname)?)
            } else {
                None
            };
            Ok::<_, Error>(Linear {
                w: take(&wname)?,
                b,
                d_in: shape[1],
                d_out: shape[0],
            })
        };
        let embed = take("model.embed_tokens.weight")?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            layers.push(LayerWeights {
                attn_norm: take(&format!("{p}.input_layernorm.weight"))?,
                q: linear(&format!("{p}.self_attn.q_proj"), &mut take)?,
                k: linear(&format!("{p}.self_attn.k_proj"), &mut take)?,
                v: linear(&format!("{p}.self_attn.v_proj"), &mut take)?,
                o: linear(&format!("{p}.self_attn.o_proj"), &mut take)?,
                mlp_norm: take(&format!("{p}.post_attention_layernorm.weight"))?,
                gate: linear(&format!("{p}.mlp.gate_proj"), &mut take)?,
                up: linear(&format!("{p}.mlp.up_proj"), &mut take)?,
                down: linear(&format!("{p}.mlp.down_proj"), &mut take)?,
            });
        }
        let final_norm = take("model.norm.weight")?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(take("lm_head.weight")?)
        };
        Ok(Weights {
            embed,
            layers,
            final_norm,
            lm_head,
        })
    }

    /// A zero-filled twin, used for gradients of every parameter (full fine-tuning).
    pub fn zeros_like(&self) -> Self {
        self.map(|v| vec![T::zero(); v.len()])
    }

    /// A twin with every tensor empty: all frozen, no gradient anywhere.
    pub fn empty_like(&self) -> Self {
        self.map(|_| Vec::new())
    }

    fn map(&self, f: impl Fn(&Vec<T>) -> Vec<T>) -> Self {
        let lin = |l: &Linear<T>| Linear {
            w: f(&l.w),
            b: l.b.as_ref().map(&f),
            d_in: l.d_in,
            d_out: l.d_out,
        };
        Weights {
            embed: f(&self.embed),
            layers: self
                .layers
                .iter()
                .map(|l| LayerWeights {
                    attn_norm: f(&l.attn_norm),
                    q: lin(&l.q),
                    k: lin(&l.k),
                    v: lin(&l.v),
                    o: lin(&l.o),
                    mlp_norm: f(&l.mlp_norm),
                    gate: lin(&l.gate),
                    up: lin(&l.up),
                    down: lin(&l.down),
                })
                .collect(),
            final_norm: f(&self.final_norm),
            lm_head: self.lm_head.as_ref().map(&f),
        }
    }

    /// Every tensor with its Hugging Face name, in the order of `LlamaConfig::tensor_shapes`.
    pub fn named(&self) -> Vec<(String, &[T])> {
        let mut out: Vec<(String, &[T])> = vec![("model.embed_tokens.weight".into(), &self.embed)];
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            out.push((format!("{p}.input_layernorm.weight"), &l.attn_norm));
            for (name, lin) in [
                ("q_proj", &l.q),
                ("k_proj", &l.k),
                ("v_proj", &l.v),
                ("o_proj", &l.o),
            ] {
                push_linear(&mut out, &format!("{p}.self_attn.{name}"), lin);
            }
            out.push((format!("{p}.post_attention_layernorm.weight"), &l.mlp_norm));
            for (name, lin) in [
                ("gate_proj", &l.gate),
                ("up_proj", &l.up),
                ("down_proj", &l.down),
            ] {
                push_linear(&mut out, &format!("{p}.mlp.{name}"), lin);
            }
        }
        out.push(("model.norm.weight".into(), &self.final_norm));
        if let Some(head) = &self.lm_head {
            out.push(("lm_head.weight".into(), head));
        }
        out
    }

    /// Mutable access to every tensor, same order as [`Weights::named`].
    pub fn tensors_mut(&mut self) -> Vec<&mut Vec<T>> {
        let mut out: Vec<&mut Vec<T>> = vec![&mut self.embed];
        for l in &mut self.layers {
            out.extend(l.tensors_mut());
        }
        out.push(&mut self.final_norm);
        if let Some(head) = &mut self.lm_head {
            out.push(head);
        }
        out
    }

    /// The LM head matrix `[V, C]`: the embedding when tied.
    pub fn head(&self) -> &[T] {
        self.lm_head.as_deref().unwrap_or(&self.embed)
    }
}

fn push_linear<'a, T>(out: &mut Vec<(String, &'a [T])>, prefix: &str, lin: &'a Linear<T>) {
    out.push((format!("{prefix}.weight"), &lin.w));
    if let Some(b) = &lin.b {
        out.push((format!("{prefix}.bias"), b));
    }
}
