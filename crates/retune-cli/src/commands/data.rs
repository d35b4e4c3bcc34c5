//! `retune data`: build the real datasets retune's demo and benchmarks use, and check data
//! files before training.

use crate::Outcome;
use anyhow::{bail, Context, Result};
use retune_core::tokenizer::Tokenizer;
use retune_data::{build_cardiology_datasets, DatasetSizes};
use retune_train::config::{DataFormat, ObjectiveKind, RunConfig};
use retune_train::data::{check_files, CheckReport, Overflow, ReadOptions};
use std::path::PathBuf;

/// Work with datasets.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    command: DataCommand,
}

#[derive(clap::Subcommand, Debug)]
enum DataCommand {
    /// Build the cardiology datasets from real sources (fetched, sha256-pinned): PubMed
    /// abstracts for continued pretraining (split by PMID hash), HPO definition pairs for SFT
    /// and sibling-definition preference pairs (derived, and labelled so), and Brown corpus
    /// text for measuring retained general English. Writes JSON Lines files and manifest.json.
    Cardiology(CardiologyArgs),
    /// Validate data files before training: every row is read and every problem printed as
    /// `file:line: field: what is wrong` (invalid JSON, wrong type, missing key, unknown role,
    /// empty content, no assistant turn, invalid UTF-8, a row over max_seq_len under
    /// on_overflow = "error", chosen equal to rejected, ...), then statistics: rows read, used,
    /// dropped and truncated by reason, tokens, trainable tokens, a length histogram against
    /// max_seq_len, exact duplicates.
    ///
    /// `retune data check CONFIG.toml` checks the run's [data] train and eval files with its
    /// [model]'s tokenizer and chat template. `retune data check [--format F] FILE...
    /// [--model MODEL]` checks files; without --model only the structure is checked (no token
    /// counts, no length checks).
    ///
    /// Exit status: 0 when the data are clean; 2 when problems were found (the data are
    /// unusable) or on a usage error (bad flags, unreadable configuration or model).
    Check(CheckArgs),
}

#[derive(clap::Args, Debug)]
struct CardiologyArgs {
    /// The folder to write.
    #[arg(long)]
    out: PathBuf,
    /// Demo sizes (300 train / 50 eval rows per set, 4 Brown files) instead of everything.
    #[arg(long)]
    small: bool,
}

#[derive(clap::Args, Debug)]
struct CheckArgs {
    /// A run configuration (.toml), or with --format (or several paths) data files and folders.
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// The row format: auto, text, prompt-completion, messages, alpaca, preference (files only;
    /// default auto, detected per file).
    #[arg(long)]
    format: Option<String>,
    /// A Hugging Face model folder or .gguf file whose tokenizer and chat template are used.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Longest row in tokens (files only; default 512).
    #[arg(long)]
    max_seq_len: Option<usize>,
    /// What a row over max_seq_len is: error, truncate or drop (files only; default error).
    #[arg(long)]
    on_overflow: Option<String>,
    /// Count prompt tokens as trainable (files only).
    #[arg(long)]
    train_on_prompt: bool,
    /// The objective the rows are for: clm, sft, dpo or orpo (files only; default from each
    /// row's format: text is clm, preference is dpo, anything else sft).
    #[arg(long)]
    objective: Option<String>,
    /// Override a configuration key (`--set data.max_seq_len=1024`), as `retune train` does.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Print one JSON object on stdout instead of text.
    #[arg(long)]
    json: bool,
}

fn parse_format(s: &str) -> Result<DataFormat> {
    Ok(match s {
        "auto" => DataFormat::Auto,
        "text" => DataFormat::Text,
        "prompt-completion" => DataFormat::PromptCompletion,
        "messages" => DataFormat::Messages,
        "alpaca" => DataFormat::Alpaca,
        "preference" => DataFormat::Preference,
        other => bail!(
            "--format {other:?}: expected auto, text, prompt-completion, messages, alpaca or \
             preference"
        ),
    })
}

fn load_tokenizer(path: &std::path::Path) -> Result<Tokenizer> {
    Tokenizer::load(path).with_context(|| format!("loading the tokenizer of {}", path.display()))
}

fn check(a: CheckArgs) -> Result<Outcome> {
    let config_mode = a.format.is_none()
        && a.inputs.len() == 1
        && a.inputs[0].extension().is_some_and(|e| e == "toml");
    let (files, tok, opts) = if config_mode {
        for (flag, set) in [
            ("--max-seq-len", a.max_seq_len.is_some()),
            ("--on-overflow", a.on_overflow.is_some()),
            ("--objective", a.objective.is_some()),
            ("--train-on-prompt", a.train_on_prompt),
        ] {
            if set {
                bail!(
                    "{flag} is for checking files; with a configuration use --set data.KEY=VALUE"
                );
            }
        }
        let config = RunConfig::load(&a.inputs[0], &a.sets)?;
        let model = a.model.clone().unwrap_or_else(|| config.model.path.clone());
        let tok = load_tokenizer(&model)?;
        let mut files = config.data.train.clone();
        files.extend(config.data.eval.iter().cloned());
        (files, Some(tok), ReadOptions::from_config(&config))
    } else {
        if !a.sets.is_empty() {
            bail!("--set applies to a configuration file, not to data files");
        }
        let format = parse_format(a.format.as_deref().unwrap_or("auto"))?;
        let objective = match a.objective.as_deref() {
            None if format == DataFormat::Auto => None,
            None => Some(ReadOptions::objective_for(format)),
            Some("clm") => Some(ObjectiveKind::Clm),
            Some("sft") => Some(ObjectiveKind::Sft),
            Some("dpo") => Some(ObjectiveKind::Dpo),
            Some("orpo") => Some(ObjectiveKind::Orpo),
            Some(other) => bail!("--objective {other:?}: expected clm, sft, dpo or orpo"),
        };
        let on_overflow = match a.on_overflow.as_deref() {
            None => Overflow::Error,
            Some(s) => Overflow::parse(s).with_context(|| {
                format!("--on-overflow {s:?}: expected error, truncate or drop")
            })?,
        };
        let max_seq_len = a.max_seq_len.unwrap_or(512);
        if max_seq_len < 2 {
            bail!("--max-seq-len must be at least 2");
        }
        for f in &a.inputs {
            if !f.exists() {
                bail!("{}: no such file or folder", f.display());
            }
        }
        let tok = a.model.as_deref().map(load_tokenizer).transpose()?;
        let opts = ReadOptions {
            format,
            objective,
            max_seq_len,
            on_overflow,
            train_on_prompt: a.train_on_prompt,
        };
        (a.inputs.clone(), tok, opts)
    };
    let report = check_files(&files, tok.as_ref(), &opts);
    if a.json {
        let mut v = serde_json::to_value(&report)?;
        v["clean"] = report.is_clean().into();
        v["max_seq_len"] = opts.max_seq_len.into();
        super::print_json(&v)?;
    } else {
        print_report(&report, opts.max_seq_len);
    }
    if report.is_clean() {
        eprintln!("data check: clean");
        Ok(Outcome::Success)
    } else {
        eprintln!(
            "data check: {} problem{} found: fix them before training",
            report.problems.len(),
            if report.problems.len() == 1 { "" } else { "s" }
        );
        Ok(Outcome::BadInput)
    }
}

fn reasons(m: &std::collections::BTreeMap<String, usize>) -> String {
    if m.is_empty() {
        return "none".into();
    }
    m.iter()
        .map(|(k, v)| format!("{v} {k}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn print_report(r: &CheckReport, max_seq_len: usize) {
    for p in &r.problems {
        println!("{p}");
    }
    if !r.problems.is_empty() {
        println!();
    }
    for f in &r.files {
        print!(
            "{}: {} ({} bytes, sha256 {}): {} rows read, {} used",
            f.path.display(),
            if f.format.is_empty() { "?" } else { &f.format },
            f.bytes,
            if f.sha256.is_empty() {
                "-"
            } else {
                &f.sha256[..16]
            },
            f.rows_read,
            f.rows_used
        );
        if r.tokenized {
            print!(", {} tokens, {} trainable", f.tokens, f.target_tokens);
        }
        println!();
    }
    println!(
        "total: {} rows read, {} used; dropped: {}; truncated: {}",
        r.rows_read,
        r.rows_used,
        reasons(&r.dropped),
        reasons(&r.truncated)
    );
    println!("exact duplicate rows: {} (kept)", r.duplicates);
    if !r.warnings.is_empty() {
        println!("warnings: {}", reasons(&r.warnings));
    }
    if !r.tokenized {
        println!("structure only (no --model): no token counts or length checks");
        return;
    }
    println!("tokens: {}, trainable: {}", r.tokens, r.target_tokens);
    println!("length histogram (tokens per row before any cut; max_seq_len {max_seq_len}):");
    let mut lower = 0;
    for b in &r.length_histogram {
        match b.up_to {
            Some(u) => {
                println!("  {:>7} .. {:<7} {:>8}", lower + 1, u, b.rows);
                lower = u;
            }
            None => println!(
                "  {:>7} .. {:<7} {:>8}  (over max_seq_len)",
                lower + 1,
                "",
                b.rows
            ),
        }
    }
}

pub fn run(args: Args) -> Result<Outcome> {
    match args.command {
        DataCommand::Cardiology(a) => {
            let sizes = if a.small {
                DatasetSizes::demo()
            } else {
                DatasetSizes::default()
            };
            let manifest = build_cardiology_datasets(&a.out, &sizes)?;
            for f in &manifest.files {
                eprintln!("{:<24} {:>6} rows  {}", f.file, f.rows, f.sha256);
            }
            println!("{}", a.out.display());
            Ok(Outcome::Success)
        }
        DataCommand::Check(a) => check(a),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
    }

    fn args(inputs: Vec<PathBuf>) -> CheckArgs {
        CheckArgs {
            inputs,
            format: None,
            model: None,
            max_seq_len: None,
            on_overflow: None,
            train_on_prompt: false,
            objective: None,
            sets: Vec::new(),
            json: true,
        }
    }

    #[test]
    fn check_exit_status_follows_the_data() {
        let bad = args(vec![fixtures().join("data/bad_messages.jsonl")]);
        assert!(matches!(check(bad).unwrap(), Outcome::BadInput));
        let mut good = args(vec![
            fixtures().join("data/good_prompt_completion.jsonl"),
            fixtures().join("data/text"),
        ]);
        good.model = Some(fixtures().join("smollm-tiny/model-f32.gguf"));
        assert!(matches!(check(good).unwrap(), Outcome::Success));
        let mut usage = args(vec![fixtures().join("data/good_alpaca.json")]);
        usage.format = Some("csv".into());
        assert!(check(usage).is_err());
    }

    #[test]
    fn a_configuration_is_checked_with_its_model() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("run.toml");
        std::fs::write(
            &config,
            format!(
                "[model]\npath = {:?}\n[objective]\nkind = \"sft\"\n[data]\ntrain = [{:?}]\n\
                 max_seq_len = 64\n",
                fixtures().join("smollm-tiny/model-f32.gguf"),
                fixtures().join("data/bad_prompt_completion.jsonl"),
            ),
        )
        .unwrap();
        assert!(matches!(
            check(args(vec![config.clone()])).unwrap(),
            Outcome::BadInput
        ));
        let mut a = args(vec![config]);
        a.max_seq_len = Some(8);
        assert!(
            check(a).is_err(),
            "file-only flags are usage errors with a config"
        );
    }
}
