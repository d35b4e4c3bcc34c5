//! Preference training (`dpo`, `orpo`): pairs laid into batches, the completions'
//! log-likelihoods, the reference model's, one step's loss and per-token weights, and the
//! figures TRL users know (`rewards/chosen`, `rewards/margins`, ...).
//!
//! A micro-batch of P pairs is 2P rows, one completion per row (chosen rows first), padded to
//! the longest of them: preference pairs are short, and padding to the micro-batch's longest
//! wastes less than packing into `max_seq_len` rows.
//!
//! The reference of DPO is the policy as the run starts (the base model, or the base with
//! `method.init_adapter`), evaluated once before the first step without dropout. Its
//! log-likelihoods are kept (two numbers per pair), so no second model is held in memory;
//! the cost is one forward pass over the training and evaluation pairs. A resumed run
//! recomputes them from the same starting policy.

use crate::config::{ObjectiveKind, PreferenceLoss, RunConfig};
use crate::data::PreferenceExample;
use retune_core::model::{Batch, Grads, Lora, Model};
use retune_core::ops::cross_entropy::IGNORE;
use retune_core::ops::preference::{dpo_pair, orpo_pair, DpoLoss, PairLogps, PairOutcome};
use serde::{Deserialize, Serialize};

/// Marks a position whose target belongs to no completion.
const NO_SEQUENCE: u32 = u32::MAX;

/// Pairs laid into rows: sequence `2i` is pair `i`'s chosen completion, `2i + 1` its rejected.
pub struct PairBatch {
    /// The rows: P chosen rows, then P rejected rows.
    pub batch: Batch,
    /// The sequence each position's target belongs to ([`NO_SEQUENCE`] for none).
    sequence_of: Vec<u32>,
    /// Pairs in the batch.
    pairs: usize,
}

impl PairBatch {
    /// Lays `pairs` out as one completion per row, padded with `pad` to the longest row.
    pub fn new(pairs: &[&PreferenceExample], pad: u32) -> Self {
        let mut sequences: Vec<(usize, &PreferenceExample, &[u32])> = Vec::new();
        for side in 0..2 {
            for (i, p) in pairs.iter().enumerate() {
                let completion = if side == 0 {
                    &p.chosen_ids
                } else {
                    &p.rejected_ids
                };
                sequences.push((2 * i + side, p, completion));
            }
        }
        let t = sequences
            .iter()
            .map(|(_, p, c)| p.prompt_ids.len() + c.len())
            .max()
            .unwrap_or(1);
        let n = sequences.len() * t;
        let (mut ids, mut targets) = (Vec::with_capacity(n), Vec::with_capacity(n));
        let mut sequence_of = Vec::with_capacity(n);
        for (seq, p, completion) in &sequences {
            let row: Vec<u32> = p.prompt_ids.iter().chain(*completion).copied().collect();
            for j in 0..t {
                ids.push(row.get(j).copied().unwrap_or(pad));
                // Position j predicts token j + 1; completion tokens are the targets.
                let next = j + 1;
                if next >= p.prompt_ids.len() && next < row.len() {
                    targets.push(row[next]);
                    sequence_of.push(*seq as u32);
                } else {
                    targets.push(IGNORE);
                    sequence_of.push(NO_SEQUENCE);
                }
            }
        }
        PairBatch {
            batch: Batch::with_targets(ids, targets, sequences.len(), t),
            sequence_of,
            pairs: pairs.len(),
        }
    }

    /// Sums per-position log-probabilities into each pair's completion log-likelihoods.
    pub fn pair_logps(&self, log_probs: &[f64]) -> Vec<PairLogps> {
        let mut out = vec![PairLogps::default(); self.pairs];
        for (&lp, &seq) in log_probs.iter().zip(&self.sequence_of) {
            if seq == NO_SEQUENCE {
                continue;
            }
            let pair = &mut out[seq as usize / 2];
            let side = if seq % 2 == 0 {
                &mut pair.chosen
            } else {
                &mut pair.rejected
            };
            side.sum += lp;
            side.tokens += 1;
        }
        out
    }

    /// Per-position weights `dL / d(-log p)`: each completion token gets its sequence's
    /// coefficient.
    fn weights(&self, per_sequence: &[f32]) -> Vec<f32> {
        self.sequence_of
            .iter()
            .map(|&s| {
                if s == NO_SEQUENCE {
                    0.0
                } else {
                    per_sequence[s as usize]
                }
            })
            .collect()
    }
}

/// The preference objective of a run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PreferenceObjective {
    /// `dpo` or `orpo`.
    pub kind: ObjectiveKind,
    /// DPO temperature or ORPO weight.
    pub beta: f64,
    /// DPO variant.
    pub loss: DpoLoss,
    /// DPO label smoothing.
    pub label_smoothing: f64,
}

impl PreferenceObjective {
    /// The configured objective, if it is a preference objective.
    pub fn from_config(config: &RunConfig) -> Option<Self> {
        let o = &config.objective;
        o.kind.is_preference().then_some(PreferenceObjective {
            kind: o.kind,
            beta: o.beta,
            loss: match o.loss {
                PreferenceLoss::Sigmoid => DpoLoss::Sigmoid,
                PreferenceLoss::Ipo => DpoLoss::Ipo,
            },
            label_smoothing: o.label_smoothing,
        })
    }

    /// Whether the objective compares against a reference model.
    pub fn needs_reference(&self) -> bool {
        self.kind == ObjectiveKind::Dpo
    }

    fn pair(&self, policy: PairLogps, reference: PairLogps) -> PairOutcome {
        match self.kind {
            ObjectiveKind::Orpo => orpo_pair(policy, self.beta),
            _ => dpo_pair(
                policy,
                reference,
                self.beta,
                self.loss,
                self.label_smoothing,
            ),
        }
    }
}

/// Running sums over pairs, turned into [`PreferenceFigures`] at the end of a step or an eval.
#[derive(Clone, Copy, Debug, Default)]
pub struct PreferenceTotals {
    pairs: usize,
    loss: f64,
    reward_chosen: f64,
    reward_rejected: f64,
    correct: usize,
    logp_chosen: f64,
    logp_rejected: f64,
    chosen_nll: f64,
    chosen_tokens: usize,
    log_odds_ratio: f64,
    log_odds_chosen: f64,
}

impl PreferenceTotals {
    fn add(&mut self, policy: &PairLogps, out: &PairOutcome) {
        self.pairs += 1;
        self.loss += out.loss;
        self.reward_chosen += out.reward_chosen;
        self.reward_rejected += out.reward_rejected;
        self.correct += usize::from(out.reward_chosen > out.reward_rejected);
        self.logp_chosen += policy.chosen.sum;
        self.logp_rejected += policy.rejected.sum;
        self.chosen_nll -= policy.chosen.sum;
        self.chosen_tokens += policy.chosen.tokens;
        self.log_odds_ratio += out.log_odds_ratio;
        self.log_odds_chosen += out.log_odds_chosen;
    }

    /// The objective's value: the mean pair loss, plus for ORPO the chosen completions' mean
    /// negative log-likelihood per token.
    pub fn loss(&self, objective: &PreferenceObjective) -> f64 {
        let pairs = self.loss / self.pairs.max(1) as f64;
        match objective.kind {
            ObjectiveKind::Orpo => pairs + self.nll(),
            _ => pairs,
        }
    }

    /// Chosen completion tokens summed.
    pub fn chosen_tokens(&self) -> usize {
        self.chosen_tokens
    }

    /// Mean negative log-likelihood per chosen token.
    pub fn nll(&self) -> f64 {
        self.chosen_nll / self.chosen_tokens.max(1) as f64
    }

    /// Means over the pairs.
    pub fn figures(&self, objective: &PreferenceObjective) -> PreferenceFigures {
        let p = self.pairs.max(1) as f64;
        let orpo = objective.kind == ObjectiveKind::Orpo;
        PreferenceFigures {
            pairs: self.pairs,
            rewards_chosen: self.reward_chosen / p,
            rewards_rejected: self.reward_rejected / p,
            rewards_accuracies: self.correct as f64 / p,
            rewards_margins: (self.reward_chosen - self.reward_rejected) / p,
            logps_chosen: self.logp_chosen / p,
            logps_rejected: self.logp_rejected / p,
            nll_loss: self.nll(),
            log_odds_ratio: orpo.then_some(self.log_odds_ratio / p),
            log_odds_chosen: orpo.then_some(self.log_odds_chosen / p),
        }
    }
}

/// Preference figures averaged over pairs, named in [`Self::named`] as TRL logs them.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PreferenceFigures {
    /// Pairs averaged.
    pub pairs: usize,
    /// Mean implicit reward of the chosen completions.
    pub rewards_chosen: f64,
    /// Mean implicit reward of the rejected completions.
    pub rewards_rejected: f64,
    /// Share of pairs whose chosen reward exceeds the rejected one.
    pub rewards_accuracies: f64,
    /// Mean of chosen minus rejected reward.
    pub rewards_margins: f64,
    /// Mean summed log-probability of the chosen completions.
    pub logps_chosen: f64,
    /// Mean summed log-probability of the rejected completions.
    pub logps_rejected: f64,
    /// Mean negative log-likelihood per chosen token.
    pub nll_loss: f64,
    /// ORPO: mean `log sigma(log odds ratio)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_odds_ratio: Option<f64>,
    /// ORPO: mean log odds ratio of chosen over rejected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_odds_chosen: Option<f64>,
}

impl PreferenceFigures {
    /// `(name, value)` with TRL's names (`rewards/chosen`, ...), each after `prefix`
    /// (`""` for training steps, `"eval_"` for evaluations).
    pub fn named(&self, prefix: &str) -> Vec<(String, f64)> {
        let mut out = vec![
            ("rewards/chosen", self.rewards_chosen),
            ("rewards/rejected", self.rewards_rejected),
            ("rewards/accuracies", self.rewards_accuracies),
            ("rewards/margins", self.rewards_margins),
            ("logps/chosen", self.logps_chosen),
            ("logps/rejected", self.logps_rejected),
            ("nll_loss", self.nll_loss),
        ];
        if let (Some(r), Some(c)) = (self.log_odds_ratio, self.log_odds_chosen) {
            out.push(("log_odds_ratio", r));
            out.push(("log_odds_chosen", c));
        }
        out.into_iter()
            .map(|(k, v)| (format!("{prefix}{k}"), v))
            .collect()
    }
}

/// The completions' log-likelihoods of `pairs` under the model (adapter without dropout),
/// `batch_pairs` pairs per forward pass.
pub fn pair_logps(
    model: &Model<f32>,
    lora: Option<&Lora<f32>>,
    pairs: &[PreferenceExample],
    batch_pairs: usize,
    pad: u32,
) -> Vec<PairLogps> {
    // Scored shortest first, so each batch pads to a near length; returned in input order.
    let len =
        |p: &PreferenceExample| p.prompt_ids.len() + p.chosen_ids.len().max(p.rejected_ids.len());
    let mut order: Vec<usize> = (0..pairs.len()).collect();
    order.sort_by_key(|&i| len(&pairs[i]));
    let mut out = vec![PairLogps::default(); pairs.len()];
    for chunk in order.chunks(batch_pairs.max(1)) {
        let refs: Vec<&PreferenceExample> = chunk.iter().map(|&i| &pairs[i]).collect();
        let pb = PairBatch::new(&refs, pad);
        let scored = pb.pair_logps(&model.target_log_probs(&pb.batch, lora));
        for (&i, s) in chunk.iter().zip(scored) {
            out[i] = s;
        }
    }
    out
}

/// Evaluates the objective on `pairs` (their reference log-likelihoods in `reference`).
pub fn evaluate(
    objective: &PreferenceObjective,
    model: &Model<f32>,
    lora: Option<&Lora<f32>>,
    pairs: &[PreferenceExample],
    reference: &[PairLogps],
    batch_pairs: usize,
    pad: u32,
) -> PreferenceTotals {
    let policy = pair_logps(model, lora, pairs, batch_pairs, pad);
    let mut totals = PreferenceTotals::default();
    for (i, p) in policy.iter().enumerate() {
        let r = reference.get(i).copied().unwrap_or_default();
        totals.add(p, &objective.pair(*p, r));
    }
    totals
}

/// The sizes one optimizer step normalises by: the loss is the mean over the step's pairs
/// (and, for ORPO, its NLL term the mean over the step's chosen tokens).
#[derive(Clone, Copy, Debug)]
pub struct StepScale {
    /// Pairs in the step.
    pub pairs: usize,
    /// Chosen completion tokens in the step.
    pub chosen_tokens: usize,
}

/// Forward and backward of one micro-batch: accumulates the gradient of the step's loss into
/// `grads` and the figures into `totals`.
#[allow(clippy::too_many_arguments)]
pub fn micro_step(
    objective: &PreferenceObjective,
    model: &Model<f32>,
    lora: Option<&Lora<f32>>,
    pb: &PairBatch,
    reference: &[PairLogps],
    scale: StepScale,
    dropout_seed: u64,
    grads: &mut Grads<f32>,
    totals: &mut PreferenceTotals,
) {
    let per_pair = 1.0 / scale.pairs.max(1) as f64;
    let nll_weight = match objective.kind {
        ObjectiveKind::Orpo => 1.0 / scale.chosen_tokens.max(1) as f64,
        _ => 0.0,
    };
    model.forward_backward_weighted(&pb.batch, lora, dropout_seed, grads, |log_probs| {
        let policy = pb.pair_logps(log_probs);
        let mut per_sequence = vec![0.0f32; 2 * policy.len()];
        for (i, p) in policy.iter().enumerate() {
            let out = objective.pair(*p, reference.get(i).copied().unwrap_or_default());
            totals.add(p, &out);
            // dL/d(-log p) = -dL/d(log p); the NLL term weighs chosen tokens directly.
            per_sequence[2 * i] = (-out.d_chosen * per_pair + nll_weight) as f32;
            per_sequence[2 * i + 1] = (-out.d_rejected * per_pair) as f32;
        }
        pb.weights(&per_sequence)
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example(prompt: &[u32], chosen: &[u32], rejected: &[u32]) -> PreferenceExample {
        PreferenceExample {
            prompt_ids: prompt.to_vec(),
            chosen_ids: chosen.to_vec(),
            rejected_ids: rejected.to_vec(),
            hash: String::new(),
        }
    }

    #[test]
    fn pairs_become_rows_with_completion_targets() {
        let a = example(&[1, 2], &[3, 4], &[5]);
        let b = example(&[6], &[7], &[8, 9, 10]);
        let pb = PairBatch::new(&[&a, &b], 0);
        // Rows: a chosen, b chosen, a rejected, b rejected; T = 4 (b rejected: 6 8 9 10).
        assert_eq!((pb.batch.b, pb.batch.t), (4, 4));
        assert_eq!(
            pb.batch.ids,
            [1, 2, 3, 4, 6, 7, 0, 0, 1, 2, 5, 0, 6, 8, 9, 10]
        );
        let x = IGNORE;
        assert_eq!(
            pb.batch.targets,
            [x, 3, 4, x, 7, x, x, x, x, 5, x, x, 8, 9, 10, x]
        );
        // Log-probabilities 1, 2, ... per position sum into each completion.
        let lp: Vec<f64> = (0..16).map(|i| i as f64).collect();
        let pairs = pb.pair_logps(&lp);
        assert_eq!(
            (pairs[0].chosen.sum, pairs[0].chosen.tokens),
            (1.0 + 2.0, 2)
        );
        assert_eq!((pairs[0].rejected.sum, pairs[0].rejected.tokens), (9.0, 1));
        assert_eq!((pairs[1].chosen.sum, pairs[1].chosen.tokens), (4.0, 1));
        assert_eq!(
            (pairs[1].rejected.sum, pairs[1].rejected.tokens),
            (12.0 + 13.0 + 14.0, 3)
        );
        let w = pb.weights(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(
            w,
            [0., 1., 1., 0., 3., 0., 0., 0., 0., 2., 0., 0., 4., 4., 4., 0.]
        );
    }
}
