//! Whole-model checks on tiny random models in f64: gradients of every parameter against
//! central finite differences, KV-cached inference against the full forward, and packing.

use super::lora::{Lora, LoraSpec, Target};
use super::{Batch, Grads, Model};
use crate::config::{LlamaConfig, RopeScaling};
use crate::ops::cross_entropy::IGNORE;

fn tiny(tied: bool, bias: bool, scaling: bool) -> LlamaConfig {
    LlamaConfig {
        architecture: "LlamaForCausalLM".into(),
        model_type: "llama".into(),
        vocab_size: 32,
        hidden_size: 16,
        intermediate_size: 24,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 4,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: scaling.then_some(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 4,
        }),
        max_position_embeddings: 64,
        tie_word_embeddings: tied,
        qkv_bias: bias,
        o_bias: bias,
        mlp_bias: bias,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
        dtype: None,
        sliding_window: None,
    }
}

fn batch() -> Batch {
    let ids = vec![3, 7, 1, 30, 12, 5, 9, 22, 17, 4, 8, 2];
    let mut targets: Vec<u32> = ids[1..].to_vec();
    targets.push(IGNORE);
    targets[5] = IGNORE; // end of row 0
    targets[2] = IGNORE; // a masked prompt token
    Batch::with_targets(ids, targets, 2, 6)
}

fn mean_loss(model: &Model<f64>, batch: &Batch) -> f64 {
    let s = model.loss(batch, None);
    s.loss_sum / s.count as f64
}

/// Every parameter gets a non-zero gradient, and sampled entries of each gradient match
/// central differences of the mean loss.
fn check_gradients(cfg: LlamaConfig, batch: &Batch) {
    let mut model = Model::<f64>::random(cfg, 7, 0.3).unwrap();
    let mut grads = Grads::full(&model);
    let stats = model.forward_backward(batch, batch.target_count(), None, 0, &mut grads);
    assert_eq!(stats.count, batch.target_count());
    let names: Vec<String> = model.weights.named().into_iter().map(|(n, _)| n).collect();
    let analytic: Vec<Vec<f64>> = grads
        .base
        .named()
        .into_iter()
        .map(|(_, g)| g.to_vec())
        .collect();
    let eps = 1e-5;
    let mut worst = 0.0f64;
    for (ti, name) in names.iter().enumerate() {
        let g = &analytic[ti];
        let norm: f64 = g.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!(norm > 1e-8, "{name} received no gradient");
        let len = g.len();
        // Finite differences carry an absolute rounding error of ~1e-16 * loss / eps ~ 1e-10:
        // the floor makes the bound 1e-6 relative, or 1e-9 absolute for tiny entries.
        let floor = 1e-3f64.max(1e-4 * g.iter().fold(0.0f64, |m, x| m.max(x.abs())));
        for k in 0..6usize.min(len) {
            let i = (k * 7919 + ti * 31) % len;
            let orig = model.weights.tensors_mut()[ti][i];
            model.weights.tensors_mut()[ti][i] = orig + eps;
            let plus = mean_loss(&model, batch);
            model.weights.tensors_mut()[ti][i] = orig - eps;
            let minus = mean_loss(&model, batch);
            model.weights.tensors_mut()[ti][i] = orig;
            let numeric = (plus - minus) / (2.0 * eps);
            let err = (g[i] - numeric).abs() / (g[i].abs() + numeric.abs()).max(floor);
            worst = worst.max(err);
            assert!(
                err < 1e-6,
                "{name}[{i}]: analytic {} numeric {numeric} (rel {err:e})",
                g[i]
            );
        }
    }
    eprintln!(
        "worst relative error over {} tensors: {worst:e}",
        names.len()
    );
}

#[test]
fn gradients_match_finite_differences_untied_with_biases() {
    check_gradients(tiny(false, true, false), &batch());
}

#[test]
fn gradients_match_finite_differences_tied_with_llama3_rope() {
    check_gradients(tiny(true, false, true), &batch());
}

#[test]
fn gradients_match_finite_differences_packed() {
    let mut b = batch();
    b.segments = Some(vec![0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 3, 3]);
    b.positions = vec![0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 0, 1];
    check_gradients(tiny(false, true, false), &b);
}

#[test]
fn frozen_weights_get_no_gradient_and_loss_is_unchanged() {
    let model = Model::<f64>::random(tiny(false, true, false), 3, 0.3).unwrap();
    let b = batch();
    let mut frozen = Grads::frozen(&model);
    let s1 = model.forward_backward(&b, b.target_count(), None, 0, &mut frozen);
    assert!(frozen.base.named().iter().all(|(_, g)| g.is_empty()));
    let s2 = model.loss(&b, None);
    assert!((s1.loss_sum - s2.loss_sum).abs() < 1e-12);
}

#[test]
fn kv_cache_matches_full_forward() {
    let model = Model::<f64>::random(tiny(false, true, true), 11, 0.3).unwrap();
    let ids = [3u32, 7, 1, 30, 12, 5, 9];
    let v = model.config.vocab_size;
    let full = model.logits(&Batch::from_rows(&[ids.to_vec()]).unwrap(), None);
    let mut cache = model.new_cache(16);
    let mut last = model.forward_cached(&ids[..4], &mut cache).unwrap();
    for (p, &id) in ids.iter().enumerate().skip(4) {
        let expected = &full[(p - 1) * v..p * v];
        let err = last
            .iter()
            .zip(expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(err < 1e-10, "position {}: max abs diff {err}", p - 1);
        last = model.forward_cached(&[id], &mut cache).unwrap();
    }
    let expected = &full[(ids.len() - 1) * v..];
    let err = last
        .iter()
        .zip(expected)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(err < 1e-10);
    assert_eq!(cache.len(), ids.len());
}

/// Two examples packed in one row (segments, restarted positions) score exactly as they do
/// apart: attention does not cross the boundary.
#[test]
fn packed_examples_score_as_separate_rows() {
    let model = Model::<f64>::random(tiny(true, false, false), 5, 0.3).unwrap();
    let a = vec![3u32, 7, 1];
    let b = vec![30u32, 12, 5, 9];
    let apart = model
        .loss(&Batch::from_rows(std::slice::from_ref(&a)).unwrap(), None)
        .loss_sum
        + model
            .loss(&Batch::from_rows(std::slice::from_ref(&b)).unwrap(), None)
            .loss_sum;
    let ids = [a.clone(), b.clone()].concat();
    let targets = vec![7, 1, IGNORE, 12, 5, 9, IGNORE];
    let mut packed = Batch::with_targets(ids, targets, 1, 7);
    packed.positions = vec![0, 1, 2, 0, 1, 2, 3];
    packed.segments = Some(vec![0, 0, 0, 1, 1, 1, 1]);
    let together = model.loss(&packed, None).loss_sum;
    assert!(
        (apart - together).abs() < 1e-10,
        "apart {apart} packed {together}"
    );
}

#[test]
fn bad_batches_are_errors() {
    let cfg = tiny(false, false, false);
    let b = Batch::from_rows(&[vec![1, 40, 3]]).unwrap();
    assert!(b
        .validate(&cfg)
        .unwrap_err()
        .to_string()
        .contains("outside the model's vocabulary"));
    assert!(Batch::from_rows(&[vec![1, 2], vec![3]]).is_err());
}

fn spec(dropout: f64, targets: &[Target]) -> LoraSpec {
    LoraSpec {
        r: 3,
        alpha: 6.0,
        dropout,
        targets: targets.to_vec(),
        rslora: false,
    }
}

/// An adapter whose B is random too (PEFT starts B at zero, where A has no gradient yet).
fn random_lora(model: &Model<f64>, spec: LoraSpec, seed: u64) -> Lora<f64> {
    let mut lora = Lora::init(spec, &model.weights, seed).unwrap();
    let mut s = seed;
    for t in lora.tensors_mut() {
        for v in t.iter_mut().filter(|v| **v == 0.0) {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            *v = ((s >> 33) as f64 / (1u64 << 31) as f64 - 0.5) * 0.6;
        }
    }
    lora
}

/// Adapter gradients against central differences; the base gets no gradient. With dropout
/// the masks are a function of the seed, so the loss is a fixed function of the adapter.
fn check_lora_gradients(dropout: f64, targets: &[Target]) {
    let model = Model::<f64>::random(tiny(false, true, true), 7, 0.3).unwrap();
    let b = batch();
    let mut lora = random_lora(&model, spec(dropout, targets), 9);
    let mut grads = Grads::lora(&model, &lora);
    model.forward_backward(&b, b.target_count(), Some(&lora), 1234, &mut grads);
    assert!(
        grads.base.named().iter().all(|(_, g)| g.is_empty()),
        "frozen base got a gradient"
    );
    assert_eq!(
        lora.named(&model.config).len(),
        2 * targets.len() * model.config.num_hidden_layers
    );
    // The loss as training sees it: the same dropout masks (seed 1234) for every evaluation.
    let train_loss = |lora: &Lora<f64>| {
        let mut g = Grads::frozen(&model);
        let s = model.forward_backward(&b, b.target_count(), Some(lora), 1234, &mut g);
        s.loss_sum / s.count as f64
    };
    check_adapter_gradients(&model, &mut lora, &grads, 4, train_loss);
}

/// Sampled entries of every adapter gradient in `grads` against central differences of
/// `loss(lora)`; every adapter tensor must receive a gradient.
fn check_adapter_gradients(
    model: &Model<f64>,
    lora: &mut Lora<f64>,
    grads: &Grads<f64>,
    samples: usize,
    loss: impl Fn(&Lora<f64>) -> f64,
) {
    let analytic: Vec<(String, Vec<f64>)> = grads
        .lora
        .as_ref()
        .unwrap()
        .named(&model.config)
        .into_iter()
        .map(|(name, _, g)| (name, g.to_vec()))
        .collect();
    let eps = 1e-5;
    for (ti, (name, g)) in analytic.iter().enumerate() {
        assert!(g.iter().any(|&v| v != 0.0), "{name} received no gradient");
        let floor = 1e-3f64.max(1e-4 * g.iter().fold(0.0f64, |m, x| m.max(x.abs())));
        for k in 0..samples.min(g.len()) {
            let i = (k * 7919 + ti * 31) % g.len();
            let orig = lora.tensors_mut()[ti][i];
            lora.tensors_mut()[ti][i] = orig + eps;
            let plus = loss(lora);
            lora.tensors_mut()[ti][i] = orig - eps;
            let minus = loss(lora);
            lora.tensors_mut()[ti][i] = orig;
            let numeric = (plus - minus) / (2.0 * eps);
            let err = (g[i] - numeric).abs() / (g[i].abs() + numeric.abs()).max(floor);
            assert!(
                err < 1e-6,
                "{name}[{i}]: analytic {} numeric {numeric} (rel {err:e})",
                g[i]
            );
        }
    }
}

#[test]
fn lora_gradients_match_finite_differences_all_targets() {
    check_lora_gradients(0.0, &Target::ALL);
}

#[test]
fn lora_gradients_match_finite_differences_with_dropout() {
    check_lora_gradients(0.3, &[Target::QProj, Target::VProj, Target::DownProj]);
}

/// PEFT's initialisation (B = 0) leaves the model's output unchanged.
#[test]
fn fresh_lora_changes_nothing() {
    let model = Model::<f64>::random(tiny(true, false, false), 3, 0.3).unwrap();
    let lora = Lora::init(spec(0.1, &Target::ALL), &model.weights, 1).unwrap();
    let b = batch();
    assert_eq!(
        model.loss(&b, None).loss_sum,
        model.loss(&b, Some(&lora)).loss_sum
    );
}

/// Merging `s B A` into the base weights computes what base + adapter computes.
#[test]
fn merged_weights_equal_base_plus_adapter() {
    let mut model = Model::<f64>::random(tiny(false, true, true), 5, 0.3).unwrap();
    let lora = random_lora(&model, spec(0.0, &Target::ALL), 4);
    let b = batch();
    let with_adapter = model.logits(&b, Some(&lora));
    lora.merge_into(&mut model.weights);
    let merged = model.logits(&b, None);
    let err = with_adapter
        .iter()
        .zip(&merged)
        .map(|(a, m)| (a - m).abs())
        .fold(0.0, f64::max);
    assert!(err < 1e-10, "max abs diff {err}");
}

#[test]
fn lora_spec_rejects_bad_values() {
    for bad in [
        LoraSpec {
            r: 0,
            ..spec(0.0, &Target::ALL)
        },
        LoraSpec {
            alpha: 0.0,
            ..spec(0.0, &Target::ALL)
        },
        LoraSpec {
            dropout: 1.0,
            ..spec(0.0, &Target::ALL)
        },
        spec(0.0, &[]),
    ] {
        assert!(bad.validate().is_err(), "{bad:?}");
    }
    let rs = LoraSpec {
        rslora: true,
        ..spec(0.0, &Target::ALL)
    };
    assert!((rs.scale() - 6.0 / 3f64.sqrt()).abs() < 1e-12);
    assert!((spec(0.0, &Target::ALL).scale() - 2.0).abs() < 1e-12);
}

/// The DPO objective through the whole model: two pairs packed into two rows, each completion
/// a segment; the adapter's gradient from `forward_backward_weighted` matches central
/// differences of the mean pair loss computed from `target_log_probs`.
#[test]
fn dpo_gradients_match_finite_differences() {
    use crate::ops::preference::{dpo_pair, DpoLoss, PairLogps, SeqLogp};
    let model = Model::<f64>::random(tiny(false, true, false), 7, 0.3).unwrap();
    let mut lora = random_lora(&model, spec(0.0, &Target::ALL), 11);
    // Row 0: pair 0, chosen [3 7 | 1] then rejected [3 7 | 12], each its own segment;
    // row 1: pair 1, chosen [9 | 22 17] then rejected [9 | 4 8]. A position whose next
    // token is a completion token belongs to that completion's sequence: 2p chosen, 2p+1
    // rejected.
    let ids = vec![3, 7, 1, 3, 7, 12, 9, 22, 17, 9, 4, 8];
    let mut targets = vec![IGNORE; 12];
    let mut seq_of: Vec<Option<usize>> = vec![None; 12];
    for (pos, target, seq) in [
        (1, 1, 0),
        (4, 12, 1),
        (6, 22, 2),
        (7, 17, 2),
        (9, 4, 3),
        (10, 8, 3),
    ] {
        targets[pos] = target;
        seq_of[pos] = Some(seq);
    }
    let mut b = Batch::with_targets(ids, targets, 2, 6);
    b.segments = Some(vec![0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1]);
    b.positions = vec![0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2];
    let reference = [
        PairLogps {
            chosen: SeqLogp {
                sum: -3.5,
                tokens: 1,
            },
            rejected: SeqLogp {
                sum: -3.0,
                tokens: 1,
            },
        },
        PairLogps {
            chosen: SeqLogp {
                sum: -6.5,
                tokens: 2,
            },
            rejected: SeqLogp {
                sum: -7.2,
                tokens: 2,
            },
        },
    ];
    let pairs_of = |log_probs: &[f64]| -> Vec<PairLogps> {
        let mut seqs = [SeqLogp::default(); 4];
        for (lp, s) in log_probs.iter().zip(&seq_of) {
            if let Some(s) = s {
                seqs[*s].sum += lp;
                seqs[*s].tokens += 1;
            }
        }
        (0..2)
            .map(|p| PairLogps {
                chosen: seqs[2 * p],
                rejected: seqs[2 * p + 1],
            })
            .collect()
    };
    let loss_of = |pairs: &[PairLogps]| -> f64 {
        pairs
            .iter()
            .zip(&reference)
            .map(|(p, r)| dpo_pair(*p, *r, 0.5, DpoLoss::Sigmoid, 0.0).loss)
            .sum::<f64>()
            / 2.0
    };
    let mut grads = Grads::lora(&model, &lora);
    let log_probs = model.forward_backward_weighted(&b, Some(&lora), 0, &mut grads, |lp| {
        let pairs = pairs_of(lp);
        let outs: Vec<_> = pairs
            .iter()
            .zip(&reference)
            .map(|(p, r)| dpo_pair(*p, *r, 0.5, DpoLoss::Sigmoid, 0.0))
            .collect();
        seq_of
            .iter()
            .map(|s| match s {
                // dL/d(-log p) = -dL/d(log p), the pair loss averaged over 2 pairs.
                Some(s) if s % 2 == 0 => -outs[s / 2].d_chosen / 2.0,
                Some(s) => -outs[s / 2].d_rejected / 2.0,
                None => 0.0,
            })
            .collect()
    });
    // The training pass saw the same log-probabilities as the evaluation forward.
    let eval = model.target_log_probs(&b, Some(&lora));
    assert!(log_probs
        .iter()
        .zip(&eval)
        .all(|(a, b)| (a - b).abs() < 1e-12));
    let eval_loss = |lora: &Lora<f64>| loss_of(&pairs_of(&model.target_log_probs(&b, Some(lora))));
    check_adapter_gradients(&model, &mut lora, &grads, 3, eval_loss);
}

/// LoRA gradients of one training call (dropout on), flattened.
fn lora_step(model: &Model<f64>, lora: &Lora<f64>, batch: &Batch) -> (f64, Vec<f64>) {
    let mut g = Grads::lora(model, lora);
    let s = model.forward_backward(batch, batch.target_count(), Some(lora), 7, &mut g);
    let mut gl = g.lora.unwrap();
    let flat = gl.tensors_mut().into_iter().flatten().map(|x| *x).collect();
    (s.loss_sum, flat)
}

#[test]
fn kept_buffers_give_the_results_of_fresh_ones() {
    // The model keeps its activation buffers between calls: calls with other batch shapes,
    // evaluations (no dropout) and other gradient sets in between must not change a result.
    let model = Model::<f64>::random(tiny(true, true, false), 11, 0.3).unwrap();
    let lora = random_lora(&model, spec(0.1, &Target::ALL), 12);
    let (a, other) = (batch(), Batch::from_rows(&[vec![5, 9, 2, 7]]).unwrap());
    let first = lora_step(&model, &lora, &a);
    let _ = lora_step(&model, &lora, &other);
    let _ = model.loss(&a, Some(&lora));
    let mut full = Grads::full(&model);
    model.forward_backward(&other, other.target_count(), None, 0, &mut full);
    let again = lora_step(&model, &lora, &a);
    let fresh = lora_step(&model.clone(), &lora, &a);
    assert_eq!(first.0.to_bits(), again.0.to_bits());
    assert_eq!(first.1, again.1);
    assert_eq!(first.1, fresh.1);
    assert!(first.1.iter().any(|&g| g != 0.0));
}
