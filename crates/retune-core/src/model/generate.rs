//! Inference with a KV cache, and sampling (greedy, temperature, top-p) from a seeded RNG.

use super::Model;
use super::{Lora, Target};
use crate::error::{Error, Result};
use crate::float::Float;
use crate::ops::cross_entropy::logits_forward;
use crate::ops::linear::linear_forward_packed;
use crate::ops::lora::lora_forward;
use crate::ops::matmul::matmul_frozen_nt;
use crate::ops::residual::add_inplace;
use crate::ops::rmsnorm::rmsnorm_forward;
use crate::ops::rope::{rope_forward, RopeTable};
use crate::ops::swiglu::swiglu_forward;
use crate::tokenizer::{StreamDecoder, Tokenizer};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

/// Keys and values of every layer for the tokens seen so far.
#[derive(Clone, Debug)]
pub struct KvCache<T> {
    k: Vec<Vec<T>>, // per layer [capacity, NKV*HD], after RoPE
    v: Vec<Vec<T>>, // per layer [capacity, NKV*HD]
    len: usize,
    capacity: usize,
    rope: RopeTable<T>,
}

impl<T> KvCache<T> {
    /// Tokens cached so far.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The most tokens this cache holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

impl<T: Float> Model<T> {
    /// A cache for up to `capacity` tokens (at most the model's context).
    pub fn new_cache(&self, capacity: usize) -> KvCache<T> {
        let c = &self.config;
        // Beyond a sliding window retune's full attention would differ from the model's own.
        let context = c
            .sliding_window
            .unwrap_or(usize::MAX)
            .min(c.max_position_embeddings);
        let capacity = capacity.min(context);
        let kvd = c.kv_dim();
        let layers = c.num_hidden_layers;
        KvCache {
            k: vec![vec![T::zero(); capacity * kvd]; layers],
            v: vec![vec![T::zero(); capacity * kvd]; layers],
            len: 0,
            capacity,
            rope: RopeTable::new(c.head_dim, capacity, c.rope_theta, c.rope_scaling.as_ref()),
        }
    }

    /// Feeds `tokens` (a prompt, or one new token) after those already cached; returns the
    /// logits `[V]` that follow the last of them.
    pub fn forward_cached(&self, tokens: &[u32], cache: &mut KvCache<T>) -> Result<Vec<T>> {
        self.forward_cached_adapted(tokens, cache, None)
    }

    /// [`Model::forward_cached`] with an adapter's branches on the projections it adapts
    /// (without merging it: a base held in its storage type cannot be merged into).
    pub fn forward_cached_adapted(
        &self,
        tokens: &[u32],
        cache: &mut KvCache<T>,
        lora: Option<&Lora<T>>,
    ) -> Result<Vec<T>> {
        let cfg = &self.config;
        let (m, p0) = (tokens.len(), cache.len);
        if m == 0 {
            return Err(Error::Invalid("no tokens to feed".into()));
        }
        if p0 + m > cache.capacity {
            return Err(Error::Invalid(format!(
                "{} tokens exceed the cache of {} (the model's context is {})",
                p0 + m,
                cache.capacity,
                cfg.max_position_embeddings
            )));
        }
        if let Some(bad) = tokens.iter().find(|&&id| id as usize >= cfg.vocab_size) {
            return Err(Error::Invalid(format!(
                "token id {bad} is outside the model's vocabulary of {}",
                cfg.vocab_size
            )));
        }
        let (c, f, nh, nkv, hd) = (
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let (qd, kvd, eps) = (cfg.q_dim(), cfg.kv_dim(), cfg.rms_norm_eps);
        let w = &self.weights;
        let positions: Vec<u32> = (p0..p0 + m).map(|p| p as u32).collect();
        let z = |len: usize| vec![T::zero(); len];
        let mut x = z(m * c);
        self.embed(&mut x, tokens);
        let (mut ln, mut rstd, mut q, mut att, mut x1) =
            (z(m * c), z(m), z(m * qd), z(m * qd), z(m * c));
        let (mut gate, mut up, mut act) = (z(m * f), z(m * f), z(m * f));
        for (l, lw) in w.layers.iter().enumerate() {
            // y = x W^T + b, from the frozen weight when the base is held so, plus the branch.
            let proj = |y: &mut [T], x: &[T], t: Target| {
                let lin = t.of(lw);
                let frozen = self.packs.layer(l).and_then(|p| p[t.index()].as_deref());
                let (d_in, d_out) = (lin.d_in, lin.d_out);
                linear_forward_packed(y, x, &lin.w, frozen, lin.b.as_deref(), m, d_in, d_out);
                let Some(lora) = lora else { return };
                if let Some(pair) = lora.layers[l].pairs[t.index()].as_ref() {
                    let (r, s) = (lora.spec.r, T::of(lora.spec.scale()));
                    let mut xa = vec![T::zero(); m * r];
                    lora_forward(y, &mut xa, x, &pair.a, &pair.b, s, m, d_in, d_out, r);
                }
            };
            rmsnorm_forward(&mut ln, &mut rstd, &x, &lw.attn_norm, m, c, eps);
            proj(&mut q, &ln, Target::QProj);
            let k_new = &mut cache.k[l][p0 * kvd..(p0 + m) * kvd];
            proj(k_new, &ln, Target::KProj);
            rope_forward(k_new, &positions, &cache.rope, nkv, hd);
            let v_new = &mut cache.v[l][p0 * kvd..(p0 + m) * kvd];
            proj(v_new, &ln, Target::VProj);
            rope_forward(&mut q, &positions, &cache.rope, nh, hd);
            cached_attention(&mut att, &q, &cache.k[l], &cache.v[l], p0, m, nh, nkv, hd);
            proj(&mut x1, &att, Target::OProj);
            add_inplace(&mut x1, &x);
            rmsnorm_forward(&mut ln, &mut rstd, &x1, &lw.mlp_norm, m, c, eps);
            proj(&mut gate, &ln, Target::GateProj);
            proj(&mut up, &ln, Target::UpProj);
            swiglu_forward(&mut act, &gate, &up);
            proj(&mut x, &act, Target::DownProj);
            add_inplace(&mut x, &x1);
        }
        cache.len += m;
        let last = &x[(m - 1) * c..];
        let (mut h, mut r) = (z(c), z(1));
        rmsnorm_forward(&mut h, &mut r, last, &w.final_norm, 1, c, eps);
        let mut logits = z(cfg.vocab_size);
        match self.packs.held_head() {
            Some(head) => matmul_frozen_nt(&mut logits, &h, head, 1),
            None => logits_forward(&mut logits, &h, w.head(), 1, c, cfg.vocab_size),
        }
        Ok(logits)
    }
}

/// Attention of `m` new queries (positions p0..p0+m) over all cached keys up to each query.
#[allow(clippy::too_many_arguments)]
fn cached_attention<T: Float>(
    out: &mut [T],
    q: &[T],
    k: &[T],
    v: &[T],
    p0: usize,
    m: usize,
    nh: usize,
    nkv: usize,
    hd: usize,
) {
    let group = nh / nkv;
    let kvd = nkv * hd;
    let scale = 1.0 / (hd as f64).sqrt();
    // One task per (query, head): each writes its own `hd` outputs.
    out[..m * nh * hd]
        .par_chunks_mut(hd)
        .enumerate()
        .for_each(|(idx, o)| {
            let (i, h) = (idx / nh, idx % nh);
            let kh = h / group;
            let qv = &q[(i * nh + h) * hd..][..hd];
            let keys = p0 + i + 1;
            let mut scores: Vec<f64> = (0..keys)
                .map(|j| {
                    let kv = &k[j * kvd + kh * hd..][..hd];
                    qv.iter()
                        .zip(kv)
                        .map(|(a, b)| a.as_f64() * b.as_f64())
                        .sum::<f64>()
                        * scale
                })
                .collect();
            let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let mut sum = 0.0;
            for s in &mut scores {
                *s = (*s - max).exp();
                sum += *s;
            }
            let mut acc = vec![0.0f64; hd];
            for (j, s) in scores.iter().enumerate() {
                let vv = &v[j * kvd + kh * hd..][..hd];
                for (a, b) in acc.iter_mut().zip(vv) {
                    *a += s / sum * b.as_f64();
                }
            }
            for (o, a) in o.iter_mut().zip(acc) {
                *o = T::of(a);
            }
        });
}

/// How the next token is chosen.
#[derive(Clone, Debug)]
pub struct Sampler {
    /// 0 means greedy (argmax): reproducible whatever the seed.
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches `top_p`.
    pub top_p: f32,
    rng: ChaCha8Rng,
}

impl Sampler {
    /// A sampler with its own seeded RNG.
    pub fn new(temperature: f32, top_p: f32, seed: u64) -> Self {
        Sampler {
            temperature,
            top_p,
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// Picks the next token from logits `[V]`.
    pub fn sample<T: Float>(&mut self, logits: &[T]) -> u32 {
        let argmax = || {
            let mut best = 0;
            for (i, l) in logits.iter().enumerate() {
                if *l > logits[best] {
                    best = i;
                }
            }
            best as u32
        };
        if self.temperature <= 0.0 {
            return argmax();
        }
        let t = self.temperature as f64;
        let max = logits
            .iter()
            .map(|l| l.as_f64())
            .fold(f64::NEG_INFINITY, f64::max);
        let mut probs: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .map(|(i, l)| (i as u32, ((l.as_f64() - max) / t).exp()))
            .collect();
        let total: f64 = probs.iter().map(|p| p.1).sum();
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut kept = 0.0;
        let mut cut = probs.len();
        for (i, p) in probs.iter().enumerate() {
            kept += p.1 / total;
            if kept >= self.top_p as f64 {
                cut = i + 1;
                break;
            }
        }
        probs.truncate(cut);
        let mass: f64 = probs.iter().map(|p| p.1).sum();
        let mut r = self.rng.gen::<f64>() * mass;
        for (id, p) in &probs {
            r -= p;
            if r <= 0.0 {
                return *id;
            }
        }
        probs.last().map_or_else(argmax, |p| p.0)
    }
}

/// Generates up to `max_tokens` after `prompt`, calling `on_token` for each new token as it
/// comes (streaming); stops after a token for which `is_stop` holds (that token is returned
/// and passed to `on_token`). Returns the new tokens.
pub fn generate<T: Float>(
    model: &Model<T>,
    lora: Option<&Lora<T>>,
    prompt: &[u32],
    max_tokens: usize,
    sampler: &mut Sampler,
    is_stop: impl Fn(u32) -> bool,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Vec<u32>> {
    let mut cache = model.new_cache(prompt.len() + max_tokens);
    let mut out = Vec::new();
    if max_tokens == 0 {
        return Ok(out);
    }
    let mut logits = model.forward_cached_adapted(prompt, &mut cache, lora)?;
    loop {
        let next = sampler.sample(&logits);
        out.push(next);
        on_token(next)?;
        if is_stop(next) || out.len() >= max_tokens || cache.len() >= cache.capacity() {
            return Ok(out);
        }
        logits = model.forward_cached_adapted(&[next], &mut cache, lora)?;
    }
}
/// Generates text after `prompt` until an end-of-sequence token or `max_tokens`, passing each
/// decoded piece to `on_piece` as it comes; returns the whole text (EOS not included). An
/// adapter, when given, runs as branches beside the base (see [`Model::forward_cached_adapted`]).
pub fn complete(
    model: &Model<f32>,
    lora: Option<&Lora<f32>>,
    tok: &Tokenizer,
    prompt: &[u32],
    max_tokens: usize,
    sampler: &mut Sampler,
    mut on_piece: impl FnMut(&str) -> Result<()>,
) -> Result<String> {
    let mut stream = StreamDecoder::new(tok);
    let mut text = String::new();
    generate(
        model,
        lora,
        prompt,
        max_tokens,
        sampler,
        |id| tok.is_eos(id),
        |id| {
            if tok.is_eos(id) {
                return Ok(());
            }
            let piece = stream.push(id)?;
            text.push_str(&piece);
            on_piece(&piece)
        },
    )?;
    Ok(text)
}
