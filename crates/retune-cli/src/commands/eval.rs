//! `retune eval`: loss and perplexity on text.

use super::{load_for_inference, print_json};
use crate::Outcome;
use anyhow::{bail, Result};
use retune_core::eval::evaluate;
use retune_train::retention::read_documents;
use serde_json::json;
use std::path::PathBuf;

/// Measure loss and perplexity of a model on text files.
///
/// Each file is one document (a .jsonl file: one document per line, its "text" field). A
/// document is tokenised on its own, with the BOS token first when the model's tokenizer adds
/// one (Llama 3 does; SmolLM2 and Qwen do not), then split into consecutive non-overlapping
/// windows of --max-seq-len tokens. Every token after the first of a window is predicted from
/// the ones before it in that window. `loss` is the mean natural-log loss per predicted token,
/// `perplexity` is exp(loss).
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A Hugging Face model folder or a .gguf file.
    #[arg(long)]
    model: PathBuf,
    /// A LoRA adapter folder (PEFT format) to apply: merged into the base weights after
    /// loading, or run beside a base held in its storage type.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Hold the base in its storage type (a quantised GGUF keeps its blocks) even when the
    /// model fits in f32; chosen anyway when it does not.
    #[arg(long)]
    hold: bool,
    /// Text files (.txt, .md) or JSON Lines files with a "text" field.
    #[arg(long, required = true, num_args = 1..)]
    data: Vec<PathBuf>,
    /// Window length in tokens.
    #[arg(long, default_value_t = 512)]
    max_seq_len: usize,
    /// Print one JSON object on stdout: tokens, loss, perplexity, accuracy.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<Outcome> {
    if args.max_seq_len < 2 {
        bail!("--max-seq-len must be at least 2 (one token to predict from another)");
    }
    // Read the data first: a missing or malformed file fails before the model loads.
    let mut texts = Vec::new();
    for path in &args.data {
        texts.extend(read_documents(path)?);
    }
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    let adapter = args.adapter.as_deref();
    let inf = load_for_inference(&args.model, adapter, args.hold, args.max_seq_len, args.json)?;
    let (model, tok) = (&inf.model, &inf.tokenizer);
    if args.max_seq_len > model.config.max_position_embeddings {
        bail!(
            "--max-seq-len {} exceeds the model's context of {}",
            args.max_seq_len,
            model.config.max_position_embeddings
        );
    }
    let docs = texts
        .iter()
        .map(|d| tok.encode(d, true))
        .collect::<Result<Vec<_>, _>>()?;
    let result = evaluate(model, inf.lora.as_ref(), &docs, args.max_seq_len)?;
    if args.json {
        print_json(&json!({
            "tokens": result.tokens,
            "loss": result.loss,
            "perplexity": result.perplexity,
            "accuracy": result.accuracy,
            "documents": docs.len(),
            "max_seq_len": args.max_seq_len,
        }))?;
    } else {
        println!("tokens      {}", result.tokens);
        println!("loss        {:.4}", result.loss);
        println!("perplexity  {:.3}", result.perplexity);
        println!("accuracy    {:.4}", result.accuracy);
    }
    Ok(Outcome::Success)
}
