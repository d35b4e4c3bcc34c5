//! The demo's measurements of one model (base, or base + adapter), each recomputable with
//! `retune eval` or the trainer's evaluation: perplexities windowed as `retune eval` windows
//! them, definitions scored as the SFT stage scores them, pairs as the DPO stage does.

use crate::DemoSize;
use anyhow::{Context, Result};
use retune_core::eval::evaluate;
use retune_core::model::generate::{complete, Sampler};
use retune_core::model::{Lora, Model};
use retune_core::ops::cross_entropy::CeStats;
use retune_core::tokenizer::{ChatMessage, Tokenizer};
use retune_train::config::{DataFormat, ObjectiveKind};
use retune_train::data::{self, Overflow, ReadOptions, Row};
use retune_train::preference::pair_logps;
use retune_train::retention::read_documents;
use serde::Serialize;
use std::path::{Path, PathBuf};

/// The derived files the measurements read.
pub(crate) struct Files {
    cardiology: PathBuf,
    general: PathBuf,
    definitions: PathBuf,
    pairs: PathBuf,
}

impl Files {
    pub(crate) fn new(data: &Path) -> Self {
        Files {
            cardiology: data.join("pubmed_eval.jsonl"),
            general: data.join("brown.txt"),
            definitions: data.join("hpo_sft_eval.jsonl"),
            pairs: data.join("hpo_dpo_eval.jsonl"),
        }
    }
}

/// One model's figures on the held-out data.
#[derive(Clone, Debug, Serialize)]
pub struct Figures {
    /// Perplexity on held-out PubMed cardiology abstracts.
    pub cardiology_perplexity: f64,
    /// Perplexity on general English (Brown corpus): retained capability.
    pub general_perplexity: f64,
    /// Perplexity of held-out HPO definitions given "What is X?" (chat template).
    pub definition_perplexity: f64,
    /// Share of held-out pairs where the chosen definition is the more likely answer.
    pub preference_accuracy: f64,
    /// Mean `log p(chosen) - log p(rejected)` over held-out pairs.
    pub preference_margin: f64,
    /// Tokens predicted in each measurement: cardiology, general, definitions.
    pub tokens: [usize; 3],
    /// Held-out pairs scored.
    pub pairs: usize,
}

/// A held-out question, its HPO definition, and the two models' answers.
#[derive(Clone, Debug, Serialize)]
pub struct Answer {
    /// "What is X?"
    pub question: String,
    /// X's HPO definition (never trained on: the term is held out of every stage).
    pub reference: String,
    /// The base model's answer.
    pub base: String,
    /// The tuned model's answer.
    pub tuned: String,
}

/// A question to answer and the definition it should match.
pub(crate) struct Question {
    pub question: String,
    pub reference: String,
}

fn docs_of(path: &Path, tok: &Tokenizer, limit: usize) -> Result<Vec<Vec<u32>>> {
    let texts = read_documents(path)?;
    texts
        .iter()
        .take(limit)
        .map(|t| Ok(tok.encode(t, true)?))
        .collect()
}

/// Measures `model` (with `lora` when given) on the held-out files.
pub(crate) fn figures(
    model: &Model<f32>,
    lora: Option<&Lora<f32>>,
    tok: &Tokenizer,
    files: &Files,
    size: &DemoSize,
) -> Result<Figures> {
    let seq = size.max_seq_len;
    let cardiology = evaluate(
        model,
        lora,
        &docs_of(&files.cardiology, tok, size.eval_items)?,
        seq,
    )?;
    // General English: the Brown text, as each stage's retention measurement reads it.
    let general = evaluate(model, lora, &docs_of(&files.general, tok, usize::MAX)?, seq)?;

    let opts = ReadOptions {
        format: DataFormat::Auto,
        objective: Some(ObjectiveKind::Sft),
        max_seq_len: seq,
        on_overflow: Overflow::Drop,
        train_on_prompt: false,
    };
    let (mut examples, _) =
        data::read_examples(std::slice::from_ref(&files.definitions), tok, &opts)?;
    examples.truncate(size.eval_items);
    let pad = tok.eos_ids.first().copied().unwrap_or(0);
    let rows = data::pack(&examples, seq, true, pad);
    let mut defs = CeStats::default();
    for chunk in rows.chunks(size.batch.max(1)) {
        let refs: Vec<&Row> = chunk.iter().collect();
        let s = model.loss(&data::batch_of(&refs), lora);
        defs.loss_sum += s.loss_sum;
        defs.count += s.count;
    }

    let opts = ReadOptions {
        objective: Some(ObjectiveKind::Dpo),
        ..opts
    };
    let (mut pairs, _) = data::read_preference(std::slice::from_ref(&files.pairs), tok, &opts)?;
    pairs.truncate(size.eval_items);
    let scored = pair_logps(model, lora, &pairs, 2 * size.batch, pad);
    let n = scored.len().max(1) as f64;
    let correct = scored
        .iter()
        .filter(|p| p.chosen.sum > p.rejected.sum)
        .count();
    let margin: f64 = scored.iter().map(|p| p.chosen.sum - p.rejected.sum).sum();
    Ok(Figures {
        cardiology_perplexity: cardiology.perplexity,
        general_perplexity: general.perplexity,
        definition_perplexity: (defs.loss_sum / defs.count.max(1) as f64).exp(),
        preference_accuracy: correct as f64 / n,
        preference_margin: margin / n,
        tokens: [cardiology.tokens, general.tokens, defs.count],
        pairs: scored.len(),
    })
}

/// Words that make a held-out term a question about the heart itself (the cardiovascular
/// branch of HPO also holds vessels of the skin, eyes and brain).
const CARDIAC_WORDS: [&str; 8] = [
    "heart", "cardi", "ventric", "atri", "valv", "aort", "coronary", "myocard",
];

/// `n` held-out definition questions, in file order, those about the heart first.
pub(crate) fn questions(files: &Files, n: usize) -> Result<Vec<Question>> {
    let path = &files.definitions;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let all: Vec<Question> = text
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("{}: not JSON", path.display()))?;
            let turn = |i: usize| {
                v["messages"][i]["content"]
                    .as_str()
                    .map(String::from)
                    .with_context(|| {
                        format!("{}: a row without messages[{i}].content", path.display())
                    })
            };
            Ok(Question {
                question: turn(0)?,
                reference: turn(1)?,
            })
        })
        .collect::<Result<_>>()?;
    let cardiac = |q: &Question| {
        let text = format!("{} {}", q.question, q.reference).to_lowercase();
        CARDIAC_WORDS.iter().any(|w| text.contains(w))
    };
    let (mut chosen, others): (Vec<Question>, Vec<Question>) = all.into_iter().partition(cardiac);
    chosen.extend(others);
    chosen.truncate(n);
    Ok(chosen)
}

/// Greedy answers to each question, with the model's chat template.
pub(crate) fn answer_all(
    model: &Model<f32>,
    tok: &Tokenizer,
    questions: &[Question],
    max_tokens: usize,
) -> Result<Vec<String>> {
    questions
        .iter()
        .map(|q| {
            let prompt = tok.encode_chat(&[ChatMessage::new("user", q.question.clone())], true)?;
            let mut greedy = Sampler::new(0.0, 1.0, 0);
            Ok(complete(
                model,
                None,
                tok,
                &prompt,
                max_tokens,
                &mut greedy,
                |_| Ok(()),
            )?)
        })
        .collect()
}
