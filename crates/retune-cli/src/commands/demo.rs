//! `retune demo`: the embedded default (see `retune_demo`): a cardiology assistant from real
//! data in three LoRA stages, with a before/after table and answers.

use super::print_json;
use crate::Outcome;
use anyhow::{bail, Result};
use retune_demo::{run_demo, table, DemoOptions, DemoSize};
use std::path::PathBuf;

/// Build a small cardiology assistant from real data, end to end: fetch SmolLM2-135M-Instruct
/// and the sources (sha256-pinned), derive the datasets, run LoRA continued pretraining on
/// PubMed cardiology abstracts, SFT on HPO definitions and DPO on HPO sibling pairs, then print
/// a before/after table (cardiology and general-English perplexity, held-out definitions,
/// preference accuracy) and the base and tuned answers to held-out questions. About 4 minutes
/// on 2 CPU cores.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// The demo's folder: data/, one run folder per stage (each with its disclosure record and
    /// index.html), summary.md and summary.json.
    #[arg(long, default_value = "runs/demo")]
    out: PathBuf,
    /// Use all the data, one epoch per stage (hours on a CPU).
    #[arg(long, conflicts_with = "quick")]
    full: bool,
    /// A smoke run: two steps per stage on a handful of rows (what CI runs).
    #[arg(long)]
    quick: bool,
    /// Matrix-product precision: bf16 (AMX or AVX512-BF16 where the CPU has them; weights,
    /// gradients and optimizer state stay f32) or f32.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// No progress output.
    #[arg(long, short)]
    quiet: bool,
    /// Print the demo's report as one JSON object on stdout.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> Result<Outcome> {
    if !["f32", "bf16"].contains(&args.dtype.as_str()) {
        bail!("--dtype {:?}: expected f32 or bf16", args.dtype);
    }
    let size = if args.full {
        DemoSize::full()
    } else if args.quick {
        DemoSize::quick()
    } else {
        DemoSize::standard()
    };
    let opts = DemoOptions {
        out: args.out.clone(),
        size,
        dtype: args.dtype.clone(),
        quiet: args.quiet || args.json,
    };
    let r = run_demo(&opts)?;
    if args.json {
        print_json(&serde_json::to_value(&r)?)?;
        return Ok(Outcome::Success);
    }
    println!("\n{}", table(&r));
    for a in &r.answers {
        println!("Q: {}", a.question);
        println!("  HPO definition: {}", a.reference);
        println!("  base:  {}", one_line(&a.base));
        println!("  tuned: {}\n", one_line(&a.tuned));
    }
    for s in &r.stages {
        println!(
            "stage {:<3}   {}  (disclosure record: {})",
            s.objective,
            s.run_dir.join("index.html").display(),
            s.run_dir.join("disclosure.json").display()
        );
    }
    println!("adapter     {}", r.adapter.display());
    println!(
        "summary     {}  ({:.0} s)",
        r.out.join("summary.md").display(),
        r.wall_s
    );
    Ok(Outcome::Success)
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}
