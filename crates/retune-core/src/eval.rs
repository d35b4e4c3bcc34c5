//! Perplexity of a model on tokenised documents, with a windowing anyone can recompute.
//!
//! Each document is split into consecutive, non-overlapping windows of at most
//! `max_seq_len` tokens; within a window every token after the first is predicted from the
//! tokens before it in that window. A window of one token predicts nothing. The loss is the
//! mean natural-log loss over all predicted tokens; perplexity is `exp(loss)`.

use crate::error::Result;
use crate::float::Float;
use crate::model::{Batch, Lora, Model};
use serde::Serialize;

/// Rows evaluated at once when windows have the full length.
const EVAL_ROWS: usize = 4;

/// Loss and perplexity over predicted tokens.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct EvalResult {
    /// Tokens predicted (the loss is averaged over these).
    pub tokens: usize,
    /// Mean natural-log loss per predicted token.
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// Share of predicted tokens whose most likely next token was the right one.
    pub accuracy: f64,
}

/// The windows a document is evaluated in: consecutive chunks of at most `max_seq_len`.
pub fn windows(doc: &[u32], max_seq_len: usize) -> impl Iterator<Item = &[u32]> {
    doc.chunks(max_seq_len.max(2)).filter(|w| w.len() >= 2)
}

/// Evaluates `model` (with `lora` applied, if given) on tokenised documents.
pub fn evaluate<T: Float>(
    model: &Model<T>,
    lora: Option<&Lora<T>>,
    docs: &[Vec<u32>],
    max_seq_len: usize,
) -> Result<EvalResult> {
    let all: Vec<&[u32]> = docs.iter().flat_map(|d| windows(d, max_seq_len)).collect();
    let (full, short): (Vec<&[u32]>, Vec<&[u32]>) =
        all.into_iter().partition(|w| w.len() == max_seq_len.max(2));
    let mut batches: Vec<Vec<Vec<u32>>> = full
        .chunks(EVAL_ROWS)
        .map(|c| c.iter().map(|w| w.to_vec()).collect())
        .collect();
    batches.extend(short.into_iter().map(|w| vec![w.to_vec()]));
    let (mut loss_sum, mut tokens, mut correct) = (0.0, 0, 0);
    for rows in batches {
        let batch = Batch::from_rows(&rows)?;
        batch.validate(&model.config)?;
        let stats = model.loss(&batch, lora);
        loss_sum += stats.loss_sum;
        tokens += stats.count;
        correct += stats.correct;
    }
    let loss = if tokens == 0 {
        f64::NAN
    } else {
        loss_sum / tokens as f64
    };
    let accuracy = if tokens == 0 {
        f64::NAN
    } else {
        correct as f64 / tokens as f64
    };
    Ok(EvalResult {
        tokens,
        loss,
        perplexity: loss.exp(),
        accuracy,
    })
}

#[cfg(test)]
mod tests {
    use super::windows;

    #[test]
    fn windows_are_consecutive_chunks_with_something_to_predict() {
        let doc: Vec<u32> = (0..10).collect();
        let w: Vec<&[u32]> = windows(&doc, 4).collect();
        assert_eq!(w, vec![&[0, 1, 2, 3][..], &[4, 5, 6, 7], &[8, 9]]);
        let w: Vec<&[u32]> = windows(&doc[..9], 4).collect();
        assert_eq!(
            w.len(),
            2,
            "a trailing window of one token predicts nothing"
        );
    }
}
