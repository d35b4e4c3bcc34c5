//! retune-demo: the embedded default, end to end on real data.
//!
//! SmolLM2-135M-Instruct (fetched, sha256-verified) becomes a small cardiology assistant in
//! three LoRA stages that continue one adapter: (1) continued pretraining on PubMed cardiology
//! abstracts, (2) supervised fine-tuning on Human Phenotype Ontology definitions ("What is
//! X?"), (3) DPO on HPO sibling pairs (X's definition preferred over a sibling's). Each stage is
//! an ordinary run folder with its configuration and disclosure record. Before and after, the
//! demo measures cardiology perplexity, general-English perplexity (Brown corpus: retention),
//! held-out definition perplexity and preference accuracy, and answers held-out questions.

mod measure;

pub use measure::{Answer, Figures};

use anyhow::{Context, Result};
use retune_core::load::peft::load_peft_adapter;
use retune_core::model::Model;
use retune_core::ops::matmul::{set_matmul_precision, MatmulPrecision};
use retune_core::tokenizer::Tokenizer;
use retune_data::DatasetSizes;
use retune_train::config::RunConfig;
use retune_train::trainer::{train, RunSummary, TrainOptions};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// How much data and how many steps each stage takes.
#[derive(Clone, Debug, Serialize)]
pub struct DemoSize {
    /// `default`, `full` or `quick`.
    pub name: &'static str,
    /// Caps on the derived dataset files.
    #[serde(skip)]
    pub data: DatasetSizes,
    /// Optimizer steps of stage 1 (continued pretraining); `None`: one epoch.
    pub clm_steps: Option<u64>,
    /// Optimizer steps of stage 2 (SFT); `None`: one epoch.
    pub sft_steps: Option<u64>,
    /// Optimizer steps of stage 3 (DPO); `None`: one epoch.
    pub dpo_steps: Option<u64>,
    /// Rows (stages 1-2) or pairs (stage 3) per step.
    pub batch: usize,
    /// Tokens per row.
    pub max_seq_len: usize,
    /// Evaluation documents / rows / pairs used by each measurement.
    pub eval_items: usize,
    /// Held-out questions answered.
    pub questions: usize,
    /// The most tokens of each answer.
    pub answer_tokens: usize,
}

impl DemoSize {
    /// The default: about 4 minutes on 2 CPU cores with AMX (7 on a busy machine).
    pub fn standard() -> Self {
        DemoSize {
            name: "default",
            data: DatasetSizes {
                pubmed_train: Some(240),
                pubmed_eval: Some(40),
                sft_train: Some(320),
                sft_eval: Some(48),
                dpo_train: Some(128),
                dpo_eval: Some(48),
                brown_files: 2,
                ..DatasetSizes::default()
            },
            clm_steps: Some(16),
            sft_steps: Some(20),
            dpo_steps: Some(16),
            batch: 4,
            max_seq_len: 256,
            eval_items: 40,
            questions: 3,
            answer_tokens: 64,
        }
    }

    /// Every row of every source, one epoch per stage (hours on a CPU).
    pub fn full() -> Self {
        DemoSize {
            name: "full",
            data: DatasetSizes::default(),
            clm_steps: None,
            sft_steps: None,
            dpo_steps: None,
            eval_items: usize::MAX,
            ..DemoSize::standard()
        }
    }

    /// A smoke run of every stage (CI): two steps each on a handful of rows.
    pub fn quick() -> Self {
        DemoSize {
            name: "quick",
            data: DatasetSizes {
                pubmed_train: Some(8),
                pubmed_eval: Some(4),
                sft_train: Some(8),
                sft_eval: Some(4),
                dpo_train: Some(8),
                dpo_eval: Some(4),
                brown_files: 1,
                ..DatasetSizes::default()
            },
            clm_steps: Some(2),
            sft_steps: Some(2),
            dpo_steps: Some(2),
            batch: 2,
            max_seq_len: 64,
            eval_items: 4,
            questions: 1,
            answer_tokens: 8,
        }
    }
}

/// What to run.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// The demo's folder: `data/`, `1-clm/`, `2-sft/`, `3-dpo/`, `summary.json`, `summary.md`.
    pub out: PathBuf,
    /// Data and steps.
    pub size: DemoSize,
    /// Matrix-product precision of the runs: `f32` or `bf16`.
    pub dtype: String,
    /// No progress output.
    pub quiet: bool,
}

/// One stage's run.
#[derive(Clone, Debug, Serialize)]
pub struct Stage {
    /// `clm`, `sft` or `dpo`.
    pub objective: String,
    /// What it trains on.
    pub data: String,
    /// Its run folder (config.toml, metrics, checkpoints, adapter/, disclosure record).
    pub run_dir: PathBuf,
    /// The trainer's summary.
    pub summary: RunSummary,
}

/// What the demo did and measured.
#[derive(Clone, Debug, Serialize)]
pub struct DemoReport {
    /// The demo's folder.
    pub out: PathBuf,
    /// The base model file.
    pub model: PathBuf,
    /// The size run.
    pub size: DemoSize,
    /// The base model.
    pub before: Figures,
    /// The base model with the final adapter.
    pub after: Figures,
    /// The three stages.
    pub stages: Vec<Stage>,
    /// Held-out questions, answered by the base and the tuned model (greedy).
    pub answers: Vec<Answer>,
    /// The final adapter (PEFT), every stage in one.
    pub adapter: PathBuf,
    /// Wall time of the whole demo, seconds.
    pub wall_s: f64,
}

impl DemoReport {
    /// The DPO stage's held-out reward accuracy, before and after (against its reference, the
    /// SFT policy: 0 at the start, when every reward is 0).
    pub fn dpo_reward_accuracy(&self) -> Option<(f64, f64)> {
        let s = &self.stages.last()?.summary;
        let before = s
            .eval_before
            .as_ref()?
            .preference
            .as_ref()?
            .rewards_accuracies;
        let after = s
            .eval_after
            .as_ref()?
            .preference
            .as_ref()?
            .rewards_accuracies;
        Some((before, after))
    }
}

fn say(quiet: bool, msg: &str) {
    if !quiet {
        eprintln!("{msg}");
    }
}

/// Runs the demo into `opts.out` (created; an existing demo there is replaced stage by stage).
pub fn run_demo(opts: &DemoOptions) -> Result<DemoReport> {
    let wall = Instant::now();
    let size = &opts.size;
    let q = opts.quiet;
    // The base is measured in the precision the stages train in (they set it again).
    set_matmul_precision(match opts.dtype.as_str() {
        "bf16" => MatmulPrecision::Bf16,
        _ => MatmulPrecision::F32,
    });
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("creating {}", opts.out.display()))?;
    say(
        q,
        "[1/6] fetching SmolLM2-135M-Instruct and the sources (sha256-pinned)",
    );
    let model_path = retune_assets::fetch(retune_assets::Asset::SmolLm2Gguf)?;
    say(
        q,
        "[2/6] deriving the datasets: PubMed cardiology, HPO definitions and pairs, Brown",
    );
    let data = opts.out.join("data");
    retune_data::build_cardiology_datasets(&data, &size.data)?;
    let files = measure::Files::new(&data);

    say(
        q,
        "[3/6] measuring the base model and answering held-out questions",
    );
    let (model, tok) = load(&model_path)?;
    let before = measure::figures(&model, None, &tok, &files, size)?;
    let questions = measure::questions(&files, size.questions)?;
    let base_answers = measure::answer_all(&model, &tok, &questions, size.answer_tokens)?;
    drop(model);

    let stages_spec = [
        (
            "clm",
            "PubMed cardiology abstracts",
            "pubmed_train.jsonl",
            "pubmed_eval.jsonl",
            size.clm_steps,
            1e-3,
        ),
        (
            "sft",
            "HPO definitions, as conversations",
            "hpo_sft_train.jsonl",
            "hpo_sft_eval.jsonl",
            size.sft_steps,
            5e-4,
        ),
        (
            "dpo",
            "HPO sibling preference pairs",
            "hpo_dpo_train.jsonl",
            "hpo_dpo_eval.jsonl",
            size.dpo_steps,
            2e-4,
        ),
    ];
    let mut stages = Vec::new();
    let mut adapter: Option<PathBuf> = None;
    for (i, (objective, what, train_file, eval_file, steps, lr)) in
        stages_spec.into_iter().enumerate()
    {
        say(
            q,
            &format!("[4/6] stage {}/3: {objective} on {what}", i + 1),
        );
        let run_dir = opts.out.join(format!("{}-{objective}", i + 1));
        if run_dir.exists() {
            std::fs::remove_dir_all(&run_dir)
                .with_context(|| format!("clearing {}", run_dir.display()))?;
        }
        let toml = stage_config(&StageConfig {
            model: &model_path,
            objective,
            train: &data.join(train_file),
            eval: &data.join(eval_file),
            general: &data.join("brown.txt"),
            init_adapter: adapter.as_deref(),
            steps,
            lr,
            size,
            dtype: &opts.dtype,
            run_dir: &run_dir,
        });
        let config_path = opts.out.join(format!("{}-{objective}.toml", i + 1));
        std::fs::write(&config_path, toml)
            .with_context(|| format!("writing {}", config_path.display()))?;
        let config = RunConfig::load(&config_path, &[] as &[&str])?;
        let result = train(
            &config,
            &TrainOptions {
                quiet: q,
                stop_after: None,
            },
        );
        let (summary, error) = match &result {
            Ok(s) => (Some(s), None),
            Err(e) => (None, Some(e.to_string())),
        };
        retune_report::write_all(&run_dir, &config, summary, error.as_deref())?;
        let summary = result?;
        adapter = summary.output.clone();
        stages.push(Stage {
            objective: objective.into(),
            data: what.into(),
            run_dir,
            summary,
        });
    }
    let adapter = adapter.context("the last stage wrote no adapter")?;

    say(
        q,
        "[5/6] measuring the tuned model (base + adapter) and answering again",
    );
    let (mut model, tok) = load(&model_path)?;
    let lora = load_peft_adapter(&adapter, &model.config)?;
    let after = measure::figures(&model, Some(&lora), &tok, &files, size)?;
    lora.merge_into(&mut model.weights);
    let tuned_answers = measure::answer_all(&model, &tok, &questions, size.answer_tokens)?;
    let answers = questions
        .into_iter()
        .zip(base_answers.into_iter().zip(tuned_answers))
        .map(|(q, (base, tuned))| Answer {
            question: q.question,
            reference: q.reference,
            base,
            tuned,
        })
        .collect();

    say(q, "[6/6] writing summary.json and summary.md");
    let report = DemoReport {
        out: opts.out.clone(),
        model: model_path,
        size: size.clone(),
        before,
        after,
        stages,
        answers,
        adapter,
        wall_s: wall.elapsed().as_secs_f64(),
    };
    let json = serde_json::to_string_pretty(&report)?;
    std::fs::write(opts.out.join("summary.json"), json + "\n")?;
    std::fs::write(opts.out.join("summary.md"), summary_markdown(&report))?;
    Ok(report)
}

fn load(path: &Path) -> Result<(Model<f32>, Tokenizer)> {
    let model = Model::<f32>::load(path)?;
    let tok = Tokenizer::load(path)?;
    Ok((model, tok))
}

struct StageConfig<'a> {
    model: &'a Path,
    objective: &'a str,
    train: &'a Path,
    eval: &'a Path,
    general: &'a Path,
    init_adapter: Option<&'a Path>,
    steps: Option<u64>,
    lr: f64,
    size: &'a DemoSize,
    dtype: &'a str,
    run_dir: &'a Path,
}

/// A stage's run configuration, written beside its run folder so it can be rerun by hand.
fn stage_config(s: &StageConfig) -> String {
    let quote = |p: &Path| format!("{:?}", p.display().to_string());
    let init = s
        .init_adapter
        .map(|a| format!("init_adapter = {}\n", quote(a)))
        .unwrap_or_default();
    let steps = s
        .steps
        .map(|n| format!("max_steps = {n}\n"))
        .unwrap_or_else(|| "epochs = 1\n".into());
    // A preference stage has pairs of up to ~2 x 150 tokens; DPO's beta 0.1 as TRL's default.
    let objective = match s.objective {
        "dpo" => "kind = \"dpo\"\nbeta = 0.1\n".to_string(),
        other => format!("kind = \"{other}\"\n"),
    };
    format!(
        "# Stage of `retune demo` ({size}); rerun with: retune train THIS_FILE\n\
         [model]\npath = {model}\ndtype = \"{dtype}\"\n\
         [method]\nkind = \"lora\"\nr = 16\nalpha = 32\ndropout = 0.05\ntargets = \"all-linear\"\n{init}\
         [objective]\n{objective}\
         [data]\ntrain = [{train}]\neval = [{eval}]\nmax_seq_len = {seq}\non_overflow = \"drop\"\n\
         [retention]\ndata = [{general}]\n\
         [train]\n{steps}batch_size = {batch}\nlr = {lr:e}\nschedule = \"cosine\"\nwarmup_steps = 2\n\
         eval_every = 0\nsave_every = 0\nseed = 42\n\
         [output]\ndir = {out}\n",
        size = s.size.name,
        model = quote(s.model),
        dtype = s.dtype,
        train = quote(s.train),
        eval = quote(s.eval),
        general = quote(s.general),
        seq = s.size.max_seq_len,
        batch = s.size.batch,
        lr = s.lr,
        out = quote(s.run_dir),
    )
}

/// The before/after table and the answers, as Markdown.
pub fn summary_markdown(r: &DemoReport) -> String {
    let mut s = String::new();
    s.push_str(&format!(
        "# retune demo ({} size)\n\nBase model: `{}`; final adapter: `{}`; wall time {:.0} s.\n\n",
        r.size.name,
        r.model.display(),
        r.adapter.display(),
        r.wall_s
    ));
    s.push_str(&table(r));
    s.push_str("\n## Held-out questions (greedy)\n");
    for a in &r.answers {
        s.push_str(&format!(
            "\n**Q: {}**\n\n- HPO definition: {}\n- base: {}\n- tuned: {}\n",
            a.question,
            a.reference,
            a.base.trim(),
            a.tuned.trim()
        ));
    }
    s.push_str("\n## Stages\n\n");
    for st in &r.stages {
        s.push_str(&format!(
            "- {} on {}: {} steps, `{}` (disclosure: `disclosure.json`, `index.html`)\n",
            st.objective,
            st.data,
            st.summary.steps,
            st.run_dir.display()
        ));
    }
    s
}

/// The before/after table (Markdown, readable as plain text).
pub fn table(r: &DemoReport) -> String {
    let (b, a) = (&r.before, &r.after);
    // A perplexity row shows the relative change; a share or margin row the difference.
    let ppl = |name: &str, x: f64, y: f64| {
        let change = format!("{:+.1}%", 100.0 * (y / x - 1.0));
        (
            name.to_string(),
            format!("{x:.2}"),
            format!("{y:.2}"),
            change,
        )
    };
    let diff = |name: &str, x: f64, y: f64, digits: usize| {
        let f = |v: f64| format!("{v:.digits$}");
        (name.to_string(), f(x), f(y), format!("{:+.digits$}", y - x))
    };
    let mut rows = vec![
        ppl(
            "cardiology perplexity (held-out PubMed abstracts)",
            b.cardiology_perplexity,
            a.cardiology_perplexity,
        ),
        ppl(
            "general-English perplexity (Brown corpus, retention)",
            b.general_perplexity,
            a.general_perplexity,
        ),
        ppl(
            "held-out HPO definition perplexity",
            b.definition_perplexity,
            a.definition_perplexity,
        ),
        diff(
            "held-out pairs: log p(chosen) > log p(rejected)",
            b.preference_accuracy,
            a.preference_accuracy,
            3,
        ),
        diff(
            "held-out pairs: mean log-likelihood margin",
            b.preference_margin,
            a.preference_margin,
            2,
        ),
    ];
    if let Some((x, y)) = r.dpo_reward_accuracy() {
        rows.push(diff(
            "DPO reward accuracy (held-out, vs. the SFT model)",
            x,
            y,
            3,
        ));
    }
    let mut s = String::from("| measure | base | tuned | change |\n|---|---|---|---|\n");
    for (m, x, y, c) in rows {
        s.push_str(&format!("| {m} | {x} | {y} | {c} |\n"));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figures(cardiology: f64, accuracy: f64, margin: f64) -> Figures {
        Figures {
            cardiology_perplexity: cardiology,
            general_perplexity: 40.0,
            definition_perplexity: 20.0,
            preference_accuracy: accuracy,
            preference_margin: margin,
            tokens: [1, 1, 1],
            pairs: 40,
        }
    }

    #[test]
    fn the_table_shows_relative_changes_of_perplexities_and_differences_of_shares() {
        let report = DemoReport {
            out: PathBuf::from("d"),
            model: PathBuf::from("m.gguf"),
            size: DemoSize::quick(),
            before: figures(31.17, 0.7, 41.65),
            after: figures(24.38, 0.725, 40.23),
            stages: Vec::new(),
            answers: Vec::new(),
            adapter: PathBuf::from("a"),
            wall_s: 1.0,
        };
        let t = table(&report);
        // 24.38 / 31.17 - 1 = -0.2178...
        assert!(
            t.contains(
                "| cardiology perplexity (held-out PubMed abstracts) | 31.17 | 24.38 | -21.8% |"
            ),
            "{t}"
        );
        assert!(t.contains(
            "| general-English perplexity (Brown corpus, retention) | 40.00 | 40.00 | +0.0% |"
        ));
        assert!(t.contains(
            "| held-out pairs: log p(chosen) > log p(rejected) | 0.700 | 0.725 | +0.025 |"
        ));
        assert!(
            t.contains("| held-out pairs: mean log-likelihood margin | 41.65 | 40.23 | -1.42 |"),
            "{t}"
        );
        // No DPO stage, no DPO row.
        assert!(!t.contains("DPO reward accuracy"));
    }
}
