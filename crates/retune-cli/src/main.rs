//! `retune`: fine-tune pre-trained language models, and say exactly what was done.
//!
//! The binary only parses arguments and calls one library function per command; errors are
//! printed with their whole chain on stderr. Exit codes: 0 success, 1 a run that failed,
//! 2 bad input or usage.

mod commands;

use clap::{Parser, Subcommand};
use retune_core::threads::KeepAwake;
use std::process::ExitCode;

/// Fine-tune pre-trained language models (Llama, Qwen, Mistral, SmolLM) on your own data and
/// hardware, and report exactly what was done.
#[derive(Parser, Debug)]
#[command(name = "retune", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Fine-tune a model (LoRA or full; clm or sft) as a TOML configuration describes.
    Train(commands::train::Args),
    /// Check data files before training, or build the real cardiology datasets of the demo.
    Data(commands::data::Args),
    /// Show a model's architecture, parameter count, weight dtypes and memory estimates.
    Inspect(commands::inspect::Args),
    /// Measure loss and perplexity of a model on text files.
    Eval(commands::eval::Args),
    /// Generate text from a prompt (streamed to stdout).
    Generate(commands::generate::CliArgs),
    /// Merge a LoRA adapter into its base model and write a Hugging Face folder (checked).
    Merge(commands::merge::Args),
    /// The embedded default: answer a cardiology question with SmolLM2-135M-Instruct.
    Demo(commands::demo::Args),
    /// Fetch real assets (model, tokenizers, corpora) into the cache, verified by sha256.
    Fetch(commands::fetch::Args),
    /// Measure forward+backward throughput and peak memory.
    Bench(commands::bench::Args),
    /// Print a run's disclosure record (json, jsonld, jats or the md model card).
    Disclose(commands::disclose::Args),
    /// Check that a model is the base an adapter was trained on (sha256 of every weight file).
    Verify(commands::verify::Args),
}

/// How a command ended, beyond success.
#[derive(Debug)]
pub enum Outcome {
    /// Exit 0.
    Success,
    /// Exit 1: the work ran but failed (diverged, threshold crossed).
    Failed,
    /// Exit 2: the input is unusable, already reported (e.g. `retune data check` found problems).
    BadInput,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let result = on_pool(move || dispatch(cli.command));
    match result {
        Ok(Outcome::Success) => ExitCode::SUCCESS,
        Ok(Outcome::Failed) => ExitCode::from(1),
        Ok(Outcome::BadInput) => ExitCode::from(2),
        Err(err) => {
            if is_broken_pipe(&err) {
                return ExitCode::SUCCESS;
            }
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}

/// Stack of the pool's threads, which run the whole command: the main thread's usual size.
const POOL_STACK_BYTES: usize = 8 << 20;

/// Runs `f` on a thread of the global rayon pool, with the other threads kept polling for work
/// ([`KeepAwake`]). A training step has many short parallel sections (several per layer);
/// started from the main thread, each one hands its work to the pool and puts the main thread
/// to sleep until it is done, and those wake-ups measured 3% of a bf16 LoRA step. Started from
/// a pool thread, a section runs there and only the other threads join in; kept awake, they
/// join at once instead of after a wake-up (bf16 LoRA step: +6%).
fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    // Fails only when the pool exists already; it then keeps its own stack size.
    let _ = rayon::ThreadPoolBuilder::new()
        .stack_size(POOL_STACK_BYTES)
        .build_global();
    rayon::scope(|_| {
        let _awake = KeepAwake::start();
        f()
    })
}

/// Calls the command's library function.
fn dispatch(command: Command) -> anyhow::Result<Outcome> {
    match command {
        Command::Train(args) => commands::train::run(args),
        Command::Data(args) => commands::data::run(args),
        Command::Inspect(args) => commands::inspect::run(args),
        Command::Eval(args) => commands::eval::run(args),
        Command::Generate(args) => commands::generate::run(args),
        Command::Merge(args) => commands::merge::run(args),
        Command::Demo(args) => commands::demo::run(args),
        Command::Fetch(args) => commands::fetch::run(args),
        Command::Bench(args) => commands::bench::run(args),
        Command::Disclose(args) => commands::disclose::run(args),
        Command::Verify(args) => commands::verify::run(args),
    }
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
