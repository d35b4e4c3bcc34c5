//! retune-train: the training infrastructure around the model.
//!
//! - [`config`]: [`RunConfig`], the run's TOML configuration with `--set` overrides, defaults and
//!   validation (unknown keys name the nearest valid one).
//! - [`schedule`]: [`LrSchedule`], constant / linear / cosine with warmup, as transformers.
//! - [`optim`]: [`AdamW`] bit-for-bit as PyTorch, and [`optim::clip_grad_norm`].
//! - [`checkpoint`]: atomic files and checkpoints (`checkpoints/step-N/`), [`TrainerState`],
//!   safetensors I/O; a `kill -9` at any moment leaves the last complete checkpoint usable.
//! - [`events`]: the run folder's `events.jsonl`, `metrics.jsonl` and `config.toml`.
//! - [`progress`]: the progress bar (or plain lines) on stderr.
//! - [`data`]: training data for `clm` and `sft`: read, validate, tokenise, mask, pack.
//! - [`trainer`]: the training loop: [`trainer::train`] and [`trainer::resume`].
//! - [`preference`]: `dpo` and `orpo`: pairs in batches, reference log-likelihoods, step figures.
//! - [`retention`]: general-text perplexity (retained capability), windowed as `retune eval`.
//! - [`nan_guard`]: stops a diverged run with an actionable [`TrainError`].
#![deny(missing_docs)]

pub mod checkpoint;
pub mod config;
pub mod data;
pub mod error;
pub mod events;
pub mod nan_guard;
pub mod optim;
pub mod plan;
pub mod preference;
pub mod progress;
pub mod retention;
pub mod schedule;
pub mod trainer;

pub use checkpoint::{StoreError, TrainerState};
pub use config::{ConfigError, RunConfig};
pub use error::TrainError;
pub use optim::AdamW;
pub use schedule::LrSchedule;
