//! `retune train`: a fine-tuning run, or the continuation of one.

use super::print_json;
use crate::Outcome;
use anyhow::{bail, Result};
use retune_train::config::RunConfig;
use retune_train::trainer::{self, RunSummary, TrainOptions};
use retune_train::TrainError;
use std::path::PathBuf;

/// Fine-tune a model as CONFIG.toml describes (LoRA or full; objective clm, sft, dpo or orpo), writing a
/// run folder: config.toml, events.jsonl, metrics.jsonl, checkpoints/step-N/ and, at the end,
/// adapter/ (PEFT) or model/ (full weights). Prints the run folder.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The run configuration (TOML).
    config: Option<PathBuf>,
    /// Override a configuration key, e.g. --set train.lr=1e-4 (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// The run folder (same as --set output.dir=DIR).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run in this folder from its last checkpoint, exactly.
    #[arg(long, value_name = "RUN_DIR", conflicts_with_all = ["config", "sets", "out"])]
    resume: Option<PathBuf>,
    /// No progress output.
    #[arg(long, short)]
    quiet: bool,
    /// Print the run summary as one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<Outcome> {
    let opts = TrainOptions {
        quiet: args.quiet || args.json,
        stop_after: None,
    };
    let (config, result) = match (&args.resume, &args.config) {
        (Some(dir), _) => {
            let result = trainer::resume(dir, &opts);
            // The run folder's own resolved configuration, for the disclosure record.
            let config = RunConfig::load(&dir.join("config.toml"), &[] as &[&str]).ok();
            (config, result)
        }
        (None, Some(path)) => {
            let mut sets = args.sets.clone();
            if let Some(out) = &args.out {
                let dir = toml_string(&out.display().to_string());
                sets.push(format!("output.dir={dir}"));
            }
            let config = RunConfig::load(path, &sets)?;
            let result = trainer::train(&config, &opts);
            (Some(config), result)
        }
        (None, None) => {
            bail!("give a CONFIG.toml to start a run, or --resume RUN_DIR to continue one")
        }
    };
    // The disclosure record is written at the end of every run that got as far as its folder,
    // finished or failed (marked so).
    if let Some(config) = &config {
        let run_dir = &config.output.dir;
        if run_dir.join("events.jsonl").exists() {
            let (summary, error) = match &result {
                Ok(s) => (Some(s), None),
                Err(e) => (None, Some(e.to_string())),
            };
            if let Err(e) = retune_report::write_all(run_dir, config, summary, error.as_deref()) {
                eprintln!("warning: writing the disclosure record: {e}");
            }
        }
    }
    match result {
        Ok(summary) => {
            report(&summary, args.json)?;
            Ok(Outcome::Success)
        }
        Err(e) if e.is_run_failure() => {
            eprintln!("error: {e}");
            Ok(Outcome::Failed)
        }
        Err(e) => Err(TrainFailure(e).into()),
    }
}

/// Keeps the trainer's error as the message, whatever its kind.
#[derive(Debug)]
struct TrainFailure(TrainError);

impl std::fmt::Display for TrainFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl std::error::Error for TrainFailure {}

fn toml_string(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn report(s: &RunSummary, json: bool) -> Result<()> {
    if json {
        return print_json(&serde_json::to_value(s)?);
    }
    if let (Some(before), Some(after)) = (&s.eval_before, &s.eval_after) {
        eprintln!(
            "eval loss {:.4} -> {:.4}, perplexity {:.3} -> {:.3}",
            before.loss, after.loss, before.perplexity, after.perplexity
        );
        if let (Some(b), Some(a)) = (&before.preference, &after.preference) {
            eprintln!(
                "eval reward accuracy {:.3} -> {:.3}, reward margin {:.3} -> {:.3} ({} pairs)",
                b.rewards_accuracies,
                a.rewards_accuracies,
                b.rewards_margins,
                a.rewards_margins,
                a.pairs
            );
        }
    }
    if let (Some(before), Some(after)) = (&s.retention_before, &s.retention_after) {
        eprintln!(
            "general-text perplexity {:.3} -> {:.3} ({:+.1}%)",
            before.perplexity,
            after.perplexity,
            100.0 * (after.perplexity / before.perplexity - 1.0)
        );
    }
    if let Some(out) = &s.output {
        eprintln!("wrote {}", out.display());
    }
    eprintln!(
        "disclosure record: {}",
        s.run_dir.join("disclosure.json").display()
    );
    println!("{}", s.run_dir.display());
    Ok(())
}
