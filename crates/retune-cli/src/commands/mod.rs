//! One module per command: an `Args` struct (its doc comments are the help) and `run`.

pub mod bench;
pub mod data;
pub mod demo;
pub mod disclose;
pub mod eval;
pub mod fetch;
pub mod generate;
pub mod inspect;
pub mod merge;
pub mod train;
pub mod verify;

use anyhow::{Context, Result};
use retune_core::model::Model;
use retune_core::tokenizer::Tokenizer;
use std::path::Path;
use std::time::Instant;

/// Loads a model folder or GGUF file with its tokenizer, checking they fit together.
pub fn load_model_and_tokenizer(path: &Path, quiet: bool) -> Result<(Model<f32>, Tokenizer)> {
    let start = Instant::now();
    let model =
        Model::<f32>::load(path).with_context(|| format!("loading model {}", path.display()))?;
    let tokenizer = Tokenizer::load(path)
        .with_context(|| format!("loading the tokenizer of {}", path.display()))?;
    tokenizer.check_vocab(model.config.vocab_size, path)?;
    if !quiet {
        eprintln!(
            "loaded {} ({} layers, {} parameters) in {:.1}s",
            path.display(),
            model.config.num_hidden_layers,
            model.config.param_count(),
            start.elapsed().as_secs_f64()
        );
    }
    Ok((model, tokenizer))
}

/// Prints a value as one JSON object on stdout.
pub fn print_json(value: &serde_json::Value) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}
