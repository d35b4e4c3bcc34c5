//! `retune data`: build the real datasets retune's demo and benchmarks use.

use crate::Outcome;
use anyhow::Result;
use retune_data::{build_cardiology_datasets, DatasetSizes};
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
    }
}
