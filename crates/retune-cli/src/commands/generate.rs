//! `retune generate`: streamed text generation with a KV cache.

use super::load_for_inference;
use crate::Outcome;
use anyhow::Result;
use retune_core::model::generate::{complete, Sampler};
use retune_core::model::{Lora, Model};
use retune_core::tokenizer::{ChatMessage, Tokenizer};
use std::io::Write;
use std::path::PathBuf;

/// Generate text from a prompt, streamed to stdout. Temperature 0 (the default) is greedy
/// decoding: the same output on every run.
#[derive(clap::Args, Debug)]
pub struct CliArgs {
    /// Generation options.
    #[command(flatten)]
    pub args: Args,
    /// A LoRA adapter folder (PEFT format) to apply: merged into the base weights after
    /// loading, or run beside a base held in its storage type.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Hold the base in its storage type (a quantised GGUF keeps its blocks) even when the
    /// model fits in f32; chosen anyway when it does not.
    #[arg(long)]
    pub hold: bool,
}

/// Generation options (also used by `retune demo`).
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A Hugging Face model folder or a .gguf file.
    #[arg(long)]
    pub model: PathBuf,
    /// The prompt.
    #[arg(long)]
    pub prompt: String,
    /// Apply the model's chat template (the prompt is one user message) with a generation prompt.
    #[arg(long)]
    pub chat: bool,
    /// A system message for --chat.
    #[arg(long)]
    pub system: Option<String>,
    /// The most new tokens to generate; generation also stops at an end-of-sequence token.
    #[arg(long, default_value_t = 256)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling threshold.
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

/// Encodes the prompt, as chat or as plain text.
pub fn encode_prompt(
    tok: &Tokenizer,
    prompt: &str,
    chat: bool,
    system: Option<&str>,
) -> Result<Vec<u32>> {
    if chat {
        let mut messages = Vec::new();
        if let Some(s) = system {
            messages.push(ChatMessage {
                role: "system".into(),
                content: s.into(),
            });
        }
        messages.push(ChatMessage {
            role: "user".into(),
            content: prompt.into(),
        });
        Ok(tok.encode_chat(&messages, true)?)
    } else {
        Ok(tok.encode(prompt, true)?)
    }
}

/// Generates an answer, writing it to `out` as it comes; returns the text.
pub fn answer(
    model: &Model<f32>,
    lora: Option<&Lora<f32>>,
    tok: &Tokenizer,
    prompt_ids: &[u32],
    args: &Args,
    out: &mut dyn Write,
) -> Result<String> {
    let mut sampler = Sampler::new(args.temperature, args.top_p, args.seed);
    let text = complete(
        model,
        lora,
        tok,
        prompt_ids,
        args.max_tokens,
        &mut sampler,
        |piece| {
            out.write_all(piece.as_bytes())
                .and_then(|_| out.flush())
                .map_err(|e| retune_core::Error::Invalid(format!("writing output: {e}")))
        },
    )?;
    writeln!(out)?;
    Ok(text)
}

pub fn run(cli: CliArgs) -> Result<Outcome> {
    let args = cli.args;
    let context = args.max_tokens + 1024;
    let inf = load_for_inference(
        &args.model,
        cli.adapter.as_deref(),
        cli.hold,
        context,
        false,
    )?;
    let (model, tok) = (&inf.model, &inf.tokenizer);
    let ids = encode_prompt(tok, &args.prompt, args.chat, args.system.as_deref())?;
    let start = std::time::Instant::now();
    let out = &mut std::io::stdout().lock();
    let text = answer(model, inf.lora.as_ref(), tok, &ids, &args, out)?;
    let n = tok.encode(&text, false).map(|t| t.len()).unwrap_or(0);
    eprintln!(
        "{} prompt tokens, {} new tokens in {:.1}s",
        ids.len(),
        n,
        start.elapsed().as_secs_f64()
    );
    Ok(Outcome::Success)
}
