//! `retune demo`: the embedded default, end to end on real assets.
//!
//! Until training lands, it shows the foundation: fetch SmolLM2-135M-Instruct (verified by
//! sha256), measure its perplexity on a cardiology text, and answer a cardiology question.

use super::generate::{answer, encode_prompt, Args as GenerateArgs};
use super::load_model_and_tokenizer;
use crate::Outcome;
use anyhow::Result;
use retune_assets::{fetch, Asset};
use retune_core::eval::evaluate;

/// Answer a cardiology question with SmolLM2-135M-Instruct, fetched on first use.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The question.
    #[arg(long, default_value = "What is atrial fibrillation?")]
    question: String,
    /// The most new tokens.
    #[arg(long, default_value_t = 200)]
    max_tokens: usize,
}

/// A short cardiology passage (written for retune) to show the model's perplexity on domain text.
const CARDIOLOGY_TEXT: &str = "Atrial fibrillation is the most common sustained cardiac \
arrhythmia in adults. It increases the risk of stroke and heart failure, and oral \
anticoagulation is recommended for most patients with additional risk factors.";

pub fn run(args: Args) -> Result<Outcome> {
    eprintln!("[1/3] fetching SmolLM2-135M-Instruct (GGUF Q4_1, pinned by sha256)");
    let model_path = fetch(Asset::SmolLm2Gguf)?;
    let (model, tok) = load_model_and_tokenizer(&model_path, false)?;
    eprintln!("[2/3] perplexity on a cardiology passage");
    let ids = tok.encode(CARDIOLOGY_TEXT, true)?;
    let r = evaluate(&model, None, &[ids], 512)?;
    println!(
        "cardiology perplexity: {:.2} over {} predicted tokens",
        r.perplexity, r.tokens
    );
    eprintln!("[3/3] answering, greedy decoding");
    print!("\nQ: {}\nA: ", args.question);
    let gen = GenerateArgs {
        model: model_path,
        prompt: args.question.clone(),
        chat: true,
        system: None,
        max_tokens: args.max_tokens,
        temperature: 0.0,
        top_p: 1.0,
        seed: 42,
    };
    let prompt = encode_prompt(&tok, &gen.prompt, true, None)?;
    answer(&model, &tok, &prompt, &gen, &mut std::io::stdout().lock())?;
    Ok(Outcome::Success)
}
