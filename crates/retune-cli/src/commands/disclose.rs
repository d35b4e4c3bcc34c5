//! `retune disclose RUN_DIR`: the run's disclosure record, re-rendered to stdout.

use crate::Outcome;
use anyhow::{Context, Result};
use retune_report::{record, render, verify};
use retune_train::config::RunConfig;
use std::io::Write;
use std::path::PathBuf;

/// The form of the record.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// The record as JSON (disclosure.json).
    Json,
    /// JSON-LD with schema.org types and the CASRAI term for fine-tuning.
    Jsonld,
    /// A JATS methods <sec> a journal can paste.
    Jats,
    /// The model card (README.md) with Hugging Face front matter.
    Md,
}

/// Print a run's disclosure record: base model, data and method with sha256 checksums,
/// environment and results. Read from RUN_DIR/disclosure.json when present, else rebuilt from
/// RUN_DIR/config.toml and metrics.jsonl (hashing every file again).
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The run folder.
    run_dir: PathBuf,
    /// Output form.
    #[arg(long, value_enum, default_value = "json")]
    format: Format,
}

pub fn run(args: Args) -> Result<Outcome> {
    let dir = &args.run_dir;
    let saved = dir.join("disclosure.json");
    let rec = if saved.is_file() {
        verify::read_record(&saved)?
    } else {
        let config_path = dir.join("config.toml");
        let config = RunConfig::load(&config_path, &[] as &[&str]).with_context(|| {
            format!(
                "{} has neither disclosure.json nor a readable config.toml",
                dir.display()
            )
        })?;
        record::build_record(dir, &config, None, None)
            .with_context(|| format!("building the record of {}", dir.display()))?
    };
    let text = match args.format {
        Format::Json => render::to_json(&rec) + "\n",
        Format::Jsonld => render::to_jsonld(&rec) + "\n",
        Format::Jats => render::to_jats(&rec),
        Format::Md => render::to_markdown(&rec),
    };
    std::io::stdout().lock().write_all(text.as_bytes())?;
    Ok(Outcome::Success)
}
