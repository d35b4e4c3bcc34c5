//! retune-core: the numeric heart of retune.
//!
//! - [`ops`]: one op per file, each with an explicit forward and backward (llm.c style),
//!   checked against central finite differences in f64.
//! - [`model`]: the Llama-family decoder ([`model::Weights`], forward, backward with per-layer
//!   recompute, and KV-cached generation).
//! - [`config`]: [`config::LlamaConfig`] from a Hugging Face `config.json` or GGUF metadata.
//! - [`load`]: Hugging Face folders (safetensors, sharded or not) and GGUF files.
//! - [`eval`]: loss and perplexity over documents, windowed.
//! - [`tokenizer`]: tokenizers from `tokenizer.json` or GGUF metadata, and chat templates.
//! - [`threads`]: keeping rayon's threads awake between a step's parallel sections.
//!
//! Nothing here knows about the command line; errors are typed ([`Error`]).
#![deny(missing_docs)]

pub mod config;
pub mod error;
pub mod eval;
pub mod float;
pub mod load;
pub mod model;
pub mod ops;
pub mod threads;
pub mod tokenizer;

pub use config::LlamaConfig;
pub use error::{Error, Result};
pub use float::Float;
