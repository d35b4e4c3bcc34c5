//! `retune verify RUN_DIR|ADAPTER_DIR --model MODEL`: is MODEL the base the adapter was
//! trained on?

use super::print_json;
use crate::Outcome;
use anyhow::Result;
use retune_report::{check_base, Evidence};
use std::path::PathBuf;

/// Recompute the sha256 of MODEL's weight files and compare them with the run's disclosure
/// record (RUN_DIR/disclosure.json or ADAPTER_DIR/../disclosure.json). Without a record, the
/// name in the adapter's README.md front matter or adapter_config.json is compared (weaker).
/// Exit 0 when MODEL is the base, 1 when it is not, 2 on bad input.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// A run folder or an adapter folder.
    dir: PathBuf,
    /// The model to check: a Hugging Face model folder or a .gguf file.
    #[arg(long)]
    model: PathBuf,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<Outcome> {
    let check = check_base(&args.dir, &args.model)?;
    if args.json {
        print_json(&serde_json::to_value(&check)?)?;
    } else {
        let evidence = match &check.evidence {
            Evidence::Record { path } => format!("checksums in {}", path.display()),
            Evidence::ModelCard { path, .. } => {
                format!("the name in {} (weak: no checksums)", path.display())
            }
            Evidence::AdapterConfig { path, .. } => {
                format!("the name in {} (weak: no checksums)", path.display())
            }
        };
        println!("evidence: {evidence}");
        for f in &check.files {
            println!(
                "{}  {}  recorded {}  actual {}",
                if f.matches { "match   " } else { "MISMATCH" },
                f.actual_path.as_deref().unwrap_or(&f.recorded),
                f.expected,
                f.actual.as_deref().unwrap_or("(no such file)")
            );
        }
        println!("{}", check.message);
    }
    Ok(if check.matches {
        Outcome::Success
    } else {
        Outcome::Failed
    })
}
