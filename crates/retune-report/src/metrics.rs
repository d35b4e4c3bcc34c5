//! The rows of a run's `metrics.jsonl` that reports need: training loss by step, evaluations,
//! and retention (general-text) perplexity by step.
//!
//! Rows are read leniently, by the fields they carry, so rows of kinds added later (for
//! example retention rows `{"step", "retention_perplexity", "retention_loss"}`) never break a
//! report; a torn last line is skipped.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// One evaluation: domain eval loss, perplexity and token accuracy at a step.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct EvalPoint {
    /// Optimizer steps completed (0: before training).
    pub step: u64,
    /// Mean loss per predicted token.
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// Share of predicted tokens whose argmax was right, when recorded.
    pub accuracy: Option<f64>,
}

/// General-text perplexity at a step.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RetentionPoint {
    /// Optimizer steps completed (0: the base model).
    pub step: u64,
    /// Perplexity on the retention (general) text.
    pub perplexity: f64,
    /// Mean loss per token on the retention text, when recorded.
    pub loss: Option<f64>,
}

/// The series of a run, in file order.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// `(step, training loss)` of every step row.
    pub train_loss: Vec<(u64, f64)>,
    /// Tokens processed, summed over step rows.
    pub tokens: u64,
    /// Every eval row.
    pub evals: Vec<EvalPoint>,
    /// Every retention row.
    pub retention: Vec<RetentionPoint>,
}

impl Metrics {
    /// Reads `path`; a missing file is empty metrics.
    pub fn read(path: &Path) -> Result<Self> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Metrics::default()),
            Err(e) => return Err(Error::io("reading", path, e)),
        };
        Self::parse(&text, path)
    }

    /// Parses the text of a `metrics.jsonl` (`path` names it in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let mut m = Metrics::default();
        for (i, line) in lines.iter().enumerate() {
            let v: serde_json::Value = match serde_json::from_str(line) {
                Ok(v) => v,
                Err(_) if i + 1 == lines.len() && !text.ends_with('\n') => break,
                Err(e) => {
                    return Err(Error::format(
                        path,
                        format!("line {}: not JSON: {e}", i + 1),
                    ))
                }
            };
            let num = |k: &str| v.get(k).and_then(|x| x.as_f64());
            let Some(step) = v.get("step").and_then(|s| s.as_u64()) else {
                continue;
            };
            if let Some(ppl) = num("retention_perplexity") {
                m.retention.push(RetentionPoint {
                    step,
                    perplexity: ppl,
                    loss: num("retention_loss"),
                });
            }
            if let Some(loss) = num("eval_loss") {
                m.evals.push(EvalPoint {
                    step,
                    loss,
                    perplexity: num("perplexity").unwrap_or(loss.exp()),
                    accuracy: num("accuracy"),
                });
            } else if let Some(loss) = num("loss") {
                m.train_loss.push((step, loss));
                m.tokens += v.get("tokens").and_then(|t| t.as_u64()).unwrap_or(0);
            }
        }
        Ok(m)
    }

    /// The last step with a training-loss row.
    pub fn last_step(&self) -> Option<u64> {
        self.train_loss.iter().map(|(s, _)| *s).max()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_told_apart_by_their_fields() {
        let text = "{\"step\":0,\"eval_loss\":2.0,\"perplexity\":7.389,\"accuracy\":0.1}\n\
                    {\"step\":0,\"retention_perplexity\":30.0,\"retention_loss\":3.4}\n\
                    {\"step\":1,\"loss\":2.5,\"lr\":0.1,\"grad_norm\":1.0,\"tokens\":64,\"tokens_per_s\":9.0}\n\
                    {\"step\":2,\"loss\":2.4,\"lr\":0.1,\"grad_norm\":1.0,\"tokens\":64,\"tokens_per_s\":9.0}\n\
                    {\"step\":2,\"eval_lo";
        let m = Metrics::parse(text, Path::new("m.jsonl")).unwrap();
        assert_eq!(m.train_loss, vec![(1, 2.5), (2, 2.4)]);
        assert_eq!(m.tokens, 128);
        assert_eq!(m.evals.len(), 1);
        assert_eq!(m.retention[0].perplexity, 30.0);
        assert_eq!(m.last_step(), Some(2));
        assert!(Metrics::parse("{\n{}\n", Path::new("m.jsonl")).is_err());
    }
}
