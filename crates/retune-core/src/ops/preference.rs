//! Preference objectives on sequence log-likelihoods: DPO (with its IPO variant) and ORPO.
//!
//! Each pair has a chosen and a rejected completion of one prompt. The model enters only
//! through `log p(completion | prompt)`, the summed log-probabilities of the completion tokens
//! ([`SeqLogp`]); the losses here are functions of those sums, with their derivatives, so the
//! decoder's backward runs once with each completion token weighted by its sequence's
//! derivative (see `Model::forward_backward_weighted`).
//!
//! - DPO (Rafailov et al. 2023), `sigmoid`: with `z = beta * ((pc - rc) - (pr - rr))`,
//!   `L = -(1 - eps) log sigma(z) - eps log sigma(-z)` (`eps`: label smoothing, cDPO).
//! - IPO (Azar et al. 2023): on per-token *mean* log-probabilities (as TRL computes it),
//!   `h = (pc - rc) - (pr - rr)`, `L = (h - 1 / (2 beta))^2`.
//! - ORPO (Hong et al. 2024), no reference model: with mean log-probabilities `m` and
//!   `log odds(m) = m - log(1 - e^m)`, the odds-ratio term `L = -beta log sigma(lor)`,
//!   `lor = log odds(mc) - log odds(mr)`; the trainer adds the chosen side's plain NLL.

/// A completion's log-likelihood: the sum of its tokens' log-probabilities, and their count.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SeqLogp {
    /// `sum log p(token)` over the completion's target tokens.
    pub sum: f64,
    /// Target tokens summed.
    pub tokens: usize,
}

impl SeqLogp {
    /// Mean log-probability per token (0 for an empty completion).
    pub fn mean(&self) -> f64 {
        self.sum / self.tokens.max(1) as f64
    }
}

/// Log-likelihoods of both sides of a pair.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PairLogps {
    /// The chosen completion.
    pub chosen: SeqLogp,
    /// The rejected completion.
    pub rejected: SeqLogp,
}

/// The DPO loss variant (TRL's `loss_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DpoLoss {
    /// `-log sigma(beta * margin)`, the original DPO.
    Sigmoid,
    /// `(margin - 1 / (2 beta))^2` on mean log-probabilities.
    Ipo,
}

/// One pair's loss, its derivatives and the figures logged for it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PairOutcome {
    /// The pair's loss.
    pub loss: f64,
    /// `dL / d(chosen.sum)`.
    pub d_chosen: f64,
    /// `dL / d(rejected.sum)`.
    pub d_rejected: f64,
    /// The implicit reward of the chosen side (`beta * (policy - reference)` for DPO,
    /// `beta * mean log p` for ORPO).
    pub reward_chosen: f64,
    /// The implicit reward of the rejected side.
    pub reward_rejected: f64,
    /// ORPO only: `log odds(chosen) - log odds(rejected)`.
    pub log_odds_chosen: f64,
    /// ORPO only: `log sigma(log_odds_chosen)`.
    pub log_odds_ratio: f64,
}

/// `log sigma(x)`, stable for large `|x|`.
fn log_sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        -(-x).exp().ln_1p()
    } else {
        x - x.exp().ln_1p()
    }
}

fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// DPO (or IPO) loss of one pair against the reference model's log-likelihoods.
pub fn dpo_pair(
    policy: PairLogps,
    reference: PairLogps,
    beta: f64,
    kind: DpoLoss,
    label_smoothing: f64,
) -> PairOutcome {
    match kind {
        DpoLoss::Sigmoid => {
            let chosen = policy.chosen.sum - reference.chosen.sum;
            let rejected = policy.rejected.sum - reference.rejected.sum;
            let z = beta * (chosen - rejected);
            let eps = label_smoothing;
            let loss = -(1.0 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z);
            let dz = -(1.0 - eps) * sigmoid(-z) + eps * sigmoid(z);
            PairOutcome {
                loss,
                d_chosen: beta * dz,
                d_rejected: -beta * dz,
                reward_chosen: beta * chosen,
                reward_rejected: beta * rejected,
                ..Default::default()
            }
        }
        DpoLoss::Ipo => {
            let chosen = policy.chosen.mean() - reference.chosen.mean();
            let rejected = policy.rejected.mean() - reference.rejected.mean();
            let h = chosen - rejected;
            let gap = h - 1.0 / (2.0 * beta);
            let dh = 2.0 * gap;
            PairOutcome {
                loss: gap * gap,
                d_chosen: dh / policy.chosen.tokens.max(1) as f64,
                d_rejected: -dh / policy.rejected.tokens.max(1) as f64,
                reward_chosen: beta * chosen,
                reward_rejected: beta * rejected,
                ..Default::default()
            }
        }
    }
}

/// `log(p / (1 - p))` of `p = e^m` and its derivative in `m`. `m` is capped just below 0:
/// a sequence the model is certain of has infinite odds.
fn log_odds(m: f64) -> (f64, f64) {
    let m = m.min(-1e-9);
    let one_minus_p = -m.exp_m1(); // 1 - e^m, accurate near m = 0
    (m - one_minus_p.ln(), 1.0 / one_minus_p)
}

/// ORPO's odds-ratio term of one pair, `-beta log sigma(lor)`, with derivatives. The
/// objective's other term, the chosen completion's mean negative log-likelihood over the
/// batch's chosen tokens, is a plain cross-entropy the trainer adds.
pub fn orpo_pair(policy: PairLogps, beta: f64) -> PairOutcome {
    let (mc, mr) = (policy.chosen.mean(), policy.rejected.mean());
    let ((odds_c, dodds_c), (odds_r, dodds_r)) = (log_odds(mc), log_odds(mr));
    let lor = odds_c - odds_r;
    let dlor = -beta * sigmoid(-lor);
    PairOutcome {
        loss: -beta * log_sigmoid(lor),
        d_chosen: dlor * dodds_c / policy.chosen.tokens.max(1) as f64,
        d_rejected: -dlor * dodds_r / policy.rejected.tokens.max(1) as f64,
        reward_chosen: beta * mc,
        reward_rejected: beta * mr,
        log_odds_chosen: lor,
        log_odds_ratio: log_sigmoid(lor),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(c: f64, nc: usize, r: f64, nr: usize) -> PairLogps {
        PairLogps {
            chosen: SeqLogp { sum: c, tokens: nc },
            rejected: SeqLogp { sum: r, tokens: nr },
        }
    }

    /// Central differences of `f(chosen.sum, rejected.sum)`.
    fn numeric(f: impl Fn(f64, f64) -> f64, c: f64, r: f64) -> (f64, f64) {
        let e = 1e-6;
        (
            (f(c + e, r) - f(c - e, r)) / (2.0 * e),
            (f(c, r + e) - f(c, r - e)) / (2.0 * e),
        )
    }

    #[test]
    fn dpo_sigmoid_by_hand() {
        // Policy: chosen -10, rejected -12; reference: both -11; beta 0.1.
        // z = 0.1 * ((-10 + 11) - (-12 + 11)) = 0.2, L = log(1 + e^-0.2) = 0.598138869…,
        // dL/dz = -1 / (1 + e^0.2) = -0.450166002…, d_chosen = 0.1 dL/dz.
        let out = dpo_pair(
            pair(-10.0, 5, -12.0, 6),
            pair(-11.0, 5, -11.0, 6),
            0.1,
            DpoLoss::Sigmoid,
            0.0,
        );
        assert!(
            (out.loss - 0.598_138_869_381_7).abs() < 1e-12,
            "{}",
            out.loss
        );
        assert!((out.d_chosen + 0.045_016_600_268_75).abs() < 1e-12);
        assert!((out.d_rejected - 0.045_016_600_268_75).abs() < 1e-12);
        assert!((out.reward_chosen - 0.1).abs() < 1e-15);
        assert!((out.reward_rejected + 0.1).abs() < 1e-15);
        // A fresh policy equal to its reference: z = 0, L = log 2.
        let same = pair(-7.0, 3, -9.0, 4);
        let fresh = dpo_pair(same, same, 0.1, DpoLoss::Sigmoid, 0.0);
        assert!((fresh.loss - std::f64::consts::LN_2).abs() < 1e-15);
        assert!((fresh.d_chosen + 0.05).abs() < 1e-15);
    }

    #[test]
    fn dpo_label_smoothing_and_ipo_by_hand() {
        let (p, r) = (pair(-10.0, 5, -12.0, 4), pair(-11.0, 5, -11.0, 4));
        // cDPO with eps 0.25 at z = 0.2: 0.75 log(1 + e^-0.2) + 0.25 log(1 + e^0.2).
        let smooth = dpo_pair(p, r, 0.1, DpoLoss::Sigmoid, 0.25);
        let want = 0.75 * (1.0 + (-0.2f64).exp()).ln() + 0.25 * (1.0 + 0.2f64.exp()).ln();
        assert!((smooth.loss - want).abs() < 1e-14);
        // IPO on means: h = (-2 + 2.2) - (-3 + 2.75) = 0.45, 1/(2 beta) = 5, L = 4.55^2.
        let ipo = dpo_pair(p, r, 0.1, DpoLoss::Ipo, 0.0);
        assert!((ipo.loss - 4.55f64.powi(2)).abs() < 1e-12, "{}", ipo.loss);
        assert!((ipo.d_chosen - 2.0 * -4.55 / 5.0).abs() < 1e-12);
        assert!((ipo.d_rejected - 2.0 * 4.55 / 4.0).abs() < 1e-12);
    }

    #[test]
    fn orpo_by_hand() {
        // Means: chosen ln 0.5 (p = 1/2, odds 1), rejected ln 0.2 (p = 1/5, odds 1/4).
        // lor = ln 1 - ln 0.25 = ln 4, L = -beta log(4 / 5).
        let p = pair(2.0 * 0.5f64.ln(), 2, 3.0 * 0.2f64.ln(), 3);
        let out = orpo_pair(p, 0.1);
        assert!((out.log_odds_chosen - 4f64.ln()).abs() < 1e-12);
        assert!((out.loss + 0.1 * 0.8f64.ln()).abs() < 1e-12);
        assert!((out.log_odds_ratio - 0.8f64.ln()).abs() < 1e-12);
    }

    #[test]
    fn derivatives_match_finite_differences() {
        let reference = pair(-20.0, 7, -18.0, 5);
        for (c, r) in [(-19.0, -21.0), (-25.0, -15.0), (-3.0, -40.0)] {
            for (kind, eps) in [
                (DpoLoss::Sigmoid, 0.0),
                (DpoLoss::Sigmoid, 0.1),
                (DpoLoss::Ipo, 0.0),
            ] {
                let f = |c, r| dpo_pair(pair(c, 7, r, 5), reference, 0.3, kind, eps).loss;
                let out = dpo_pair(pair(c, 7, r, 5), reference, 0.3, kind, eps);
                let (nc, nr) = numeric(f, c, r);
                assert!((out.d_chosen - nc).abs() < 1e-7, "{kind:?} {c} {r}");
                assert!((out.d_rejected - nr).abs() < 1e-7, "{kind:?} {c} {r}");
            }
            let f = |c, r| orpo_pair(pair(c, 7, r, 5), 0.3).loss;
            let out = orpo_pair(pair(c, 7, r, 5), 0.3);
            let (nc, nr) = numeric(f, c, r);
            assert!((out.d_chosen - nc).abs() < 1e-7, "orpo {c} {r}");
            assert!((out.d_rejected - nr).abs() < 1e-7, "orpo {c} {r}");
        }
    }
}
