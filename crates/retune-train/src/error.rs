//! The trainer's error type: everything a run can stop on, each message naming what and where.

use crate::checkpoint::StoreError;
use crate::config::{ConfigError, Dtype};
use crate::nan_guard::short;

/// Why a run stopped.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The configuration is invalid (exit code 2).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A run-folder file could not be read or written.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A data row is invalid: file, line (0 for a whole file), field and reason (exit code 2).
    #[error("{}:{line}: {}{reason}", path.display(), if field.is_empty() { String::new() } else { format!("field `{field}`: ") })]
    Data {
        /// The data file.
        path: std::path::PathBuf,
        /// 1-based line (0: the file as a whole).
        line: u64,
        /// The JSON field, if any.
        field: String,
        /// What is wrong and, where known, the fix.
        reason: String,
    },
    /// Loading or running the model, tokenizer or adapter failed (exit code 2).
    #[error(transparent)]
    Model(#[from] retune_core::Error),
    /// The run cannot start or continue as asked (exit code 2).
    #[error("{0}")]
    Invalid(String),
    /// General-text perplexity rose past `retention.max_increase` (exit code 1). The run's
    /// output was written from the last checkpoint within the bound, if any.
    #[error(
        "step {step}: general-text perplexity rose from {before:.3} to {after:.3} (+{:.1}%), past \
         retention.max_increase = {:.1}%; {}",
        100.0 * (after / before - 1.0),
        100.0 * limit,
        match kept_step {
            Some(s) => format!("kept the last checkpoint within the bound (step {s}) as the run's output"),
            None => "no checkpoint was within the bound, so no output was written".to_string(),
        }
    )]
    RetentionExceeded {
        /// The step whose measurement crossed the bound.
        step: u64,
        /// Perplexity of the base model.
        before: f64,
        /// Perplexity at `step`.
        after: f64,
        /// `retention.max_increase`.
        limit: f64,
        /// The step written as output instead.
        kept_step: Option<u64>,
    },
    /// The loss or gradient norm stopped being finite (the run diverged; exit code 1).
    #[error(
        "step {step}: {what} is {} ({}, lr {}, dtype {}): lower train.lr, check the data for \
         empty or extreme rows, or clip gradients harder with a lower train.max_grad_norm \
         (0 turns clipping off)",
        short(if *what == "loss" { *loss } else { *grad_norm }),
        if *what == "loss" { format!("grad norm {}", short(*grad_norm)) } else { format!("loss {}", short(*loss)) },
        short(*lr),
        dtype_name(*dtype)
    )]
    NonFinite {
        /// The optimizer step (from 1).
        step: u64,
        /// `"loss"` or `"gradient norm"`: the first value found non-finite.
        what: &'static str,
        /// Loss of the step.
        loss: f64,
        /// Gradient norm before clipping.
        grad_norm: f64,
        /// Learning rate of the step.
        lr: f64,
        /// Compute dtype.
        dtype: Dtype,
    },
}

impl TrainError {
    /// Shorthand for [`TrainError::Data`].
    pub fn data(path: &std::path::Path, line: u64, field: &str, reason: String) -> Self {
        TrainError::Data {
            path: path.to_path_buf(),
            line,
            field: field.to_string(),
            reason,
        }
    }

    /// Whether the run itself failed (exit code 1) rather than its input (exit code 2).
    pub fn is_run_failure(&self) -> bool {
        matches!(
            self,
            TrainError::NonFinite { .. } | TrainError::RetentionExceeded { .. }
        )
    }
}

fn dtype_name(d: Dtype) -> &'static str {
    match d {
        Dtype::F32 => "f32",
        Dtype::Bf16 => "bf16",
    }
}
