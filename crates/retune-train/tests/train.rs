//! The training loop end to end on the tiny SmolLM-shaped GGUF fixture (byte-level tokenizer):
//! accumulation equals a large batch, runs are bitwise reproducible, a resumed run ends where
//! an uninterrupted one does, the NaN guard stops a diverging run, full fine-tuning writes a
//! loadable model.

use retune_train::checkpoint::load_tensors;
use retune_train::config::RunConfig;
use retune_train::trainer::{resume, train, TrainOptions};
use retune_train::TrainError;
use std::path::{Path, PathBuf};

mod common;
use common::{fixture_model, quiet};

/// Writes a small corpus and returns its folder.
fn corpus() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let sentences = [
        "The heart pumps blood through the body.",
        "Atrial fibrillation is an irregular heart rhythm.",
        "Hypertension raises the risk of stroke.",
        "The left ventricle ejects blood into the aorta.",
        "Beta blockers slow the heart rate.",
        "An echocardiogram shows the valves moving.",
        "Chest pain can signal myocardial ischaemia.",
        "Statins lower cholesterol in the blood.",
    ];
    let rows: Vec<String> = sentences
        .iter()
        .enumerate()
        .map(|(i, s)| serde_json::json!({ "text": format!("{i}: {s}") }).to_string())
        .collect();
    std::fs::write(dir.path().join("train.jsonl"), rows.join("\n")).unwrap();
    let pairs: Vec<String> = sentences
        .iter()
        .map(|s| serde_json::json!({ "prompt": &s[..12], "completion": &s[12..] }).to_string())
        .collect();
    std::fs::write(dir.path().join("sft.jsonl"), pairs.join("\n")).unwrap();
    dir
}

fn config(data: &Path, out: &Path, extra: &[&str]) -> RunConfig {
    let text = format!(
        r#"
[model]
path = "{model}"
[method]
kind = "lora"
r = 4
alpha = 8
dropout = 0.1
[objective]
kind = "clm"
[data]
train = ["{data}/train.jsonl"]
max_seq_len = 48
[train]
max_steps = 6
batch_size = 2
lr = 5e-3
schedule = "cosine"
warmup_steps = 2
eval_every = 0
save_every = 2
seed = 7
[output]
dir = "{out}"
"#,
        model = fixture_model().display(),
        data = data.display(),
        out = out.display()
    );
    let path = data.join("run.toml");
    std::fs::write(&path, text).unwrap();
    RunConfig::load(&path, extra).unwrap()
}

fn adapter_bytes(run: &Path) -> Vec<u8> {
    std::fs::read(run.join("adapter/adapter_model.safetensors")).unwrap()
}

#[test]
fn two_runs_with_the_same_seed_are_bitwise_identical() {
    let data = corpus();
    let a = train(&config(data.path(), &data.path().join("a"), &[]), &quiet()).unwrap();
    let b = train(&config(data.path(), &data.path().join("b"), &[]), &quiet()).unwrap();
    assert_eq!(adapter_bytes(&a.run_dir), adapter_bytes(&b.run_dir));
    let c = train(
        &config(data.path(), &data.path().join("c"), &["train.seed=8"]),
        &quiet(),
    )
    .unwrap();
    assert_ne!(
        adapter_bytes(&a.run_dir),
        adapter_bytes(&c.run_dir),
        "another seed, another run"
    );
    let first = a.final_loss.unwrap();
    assert!(first.is_finite());
}

#[test]
fn a_resumed_run_ends_bitwise_identical_to_an_uninterrupted_one() {
    let data = corpus();
    let whole = train(
        &config(data.path(), &data.path().join("whole"), &[]),
        &quiet(),
    )
    .unwrap();
    let cfg = config(data.path(), &data.path().join("cut"), &[]);
    let part = train(
        &cfg,
        &TrainOptions {
            quiet: true,
            stop_after: Some(3),
        },
    )
    .unwrap();
    assert_eq!(part.steps, 3);
    assert!(
        part.output.is_none(),
        "an interrupted run writes no adapter"
    );
    let rest = resume(&part.run_dir, &quiet()).unwrap();
    assert_eq!(rest.steps, 6);
    assert_eq!(adapter_bytes(&whole.run_dir), adapter_bytes(&rest.run_dir));
    // The metrics of the resumed run match the uninterrupted one's, row for row.
    let read = |run: &Path| std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let strip = |s: String| -> Vec<String> {
        s.lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                v.as_object_mut().unwrap().remove("tokens_per_s");
                v.to_string()
            })
            .collect()
    };
    assert_eq!(strip(read(&whole.run_dir)), strip(read(&rest.run_dir)));
}

/// 4 micro-batches of 1 row give the update of one batch of 4 rows: the loss is normalised by
/// the target tokens of the whole accumulated batch.
#[test]
fn gradient_accumulation_equals_a_larger_batch() {
    let data = corpus();
    let common = [
        "train.max_steps=1",
        "method.dropout=0.0",
        "train.warmup_steps=0",
        "train.max_grad_norm=0",
    ];
    let mut big = common.to_vec();
    big.extend(["train.batch_size=4", "train.grad_accum=1"]);
    let mut small = common.to_vec();
    small.extend(["train.batch_size=1", "train.grad_accum=4"]);
    let a = train(
        &config(data.path(), &data.path().join("big"), &big),
        &quiet(),
    )
    .unwrap();
    let b = train(
        &config(data.path(), &data.path().join("small"), &small),
        &quiet(),
    )
    .unwrap();
    assert!((a.final_loss.unwrap() - b.final_loss.unwrap()).abs() < 1e-6);
    let ta = load_tensors(&a.run_dir.join("adapter/adapter_model.safetensors")).unwrap();
    let tb = load_tensors(&b.run_dir.join("adapter/adapter_model.safetensors")).unwrap();
    let mut worst = 0.0f32;
    let mut moved = 0.0f32;
    for (name, (_, x)) in &ta {
        let y = &tb[name].1;
        for (p, q) in x.iter().zip(y) {
            worst = worst.max((p - q).abs());
            moved = moved.max(p.abs());
        }
    }
    assert!(moved > 0.0);
    assert!(worst < 1e-6, "largest difference {worst}");
}

#[test]
fn a_diverging_run_stops_with_an_actionable_message() {
    let data = corpus();
    let cfg = config(
        data.path(),
        &data.path().join("nan"),
        &[
            "train.lr=1e35",
            "train.max_grad_norm=0",
            "train.warmup_steps=0",
        ],
    );
    let err = train(&cfg, &quiet()).unwrap_err();
    assert!(matches!(err, TrainError::NonFinite { .. }), "{err}");
    assert!(err.is_run_failure());
    let msg = err.to_string();
    assert!(msg.contains("lower train.lr"), "{msg}");
    let events = std::fs::read_to_string(data.path().join("nan/events.jsonl")).unwrap();
    assert!(
        events.lines().last().unwrap().contains("\"failed\""),
        "{events}"
    );
}

#[test]
fn sft_and_full_fine_tuning_lower_the_loss_and_write_a_loadable_model() {
    let data = corpus();
    let sft = format!(
        "data.train=[\"{}\"]",
        data.path().join("sft.jsonl").display()
    );
    let sets = [
        "method.kind=full",
        "objective.kind=sft",
        "data.max_seq_len=64",
        &sft,
        "train.max_steps=12",
        "train.lr=1e-3",
        "train.save_every=0",
    ];
    let cfg = config(data.path(), &data.path().join("full"), &sets);
    let s = train(&cfg, &quiet()).unwrap();
    let rows = std::fs::read_to_string(s.run_dir.join("metrics.jsonl")).unwrap();
    let losses: Vec<f64> = rows
        .lines()
        .filter_map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()?
                .get("loss")?
                .as_f64()
        })
        .collect();
    assert_eq!(losses.len(), 12);
    assert!(
        losses[11] < losses[0] * 0.8,
        "loss did not fall: {losses:?}"
    );
    let model = retune_core::model::Model::<f32>::load(&s.run_dir.join("model")).unwrap();
    assert_eq!(model.config.param_count(), s.model_parameters);
    assert_eq!(s.trainable_parameters, s.model_parameters);
}

/// The optimizer in the backward (one layer's gradients at a time) writes the same model, bit
/// for bit, as the usual step over the whole model's gradients; and it is refused, naming the
/// key and the fix, where it cannot apply.
#[test]
fn optimizer_in_backward_writes_the_same_model_bit_for_bit() {
    let data = corpus();
    let sets = [
        "method.kind=full",
        "train.max_steps=4",
        "train.lr=1e-3",
        "train.weight_decay=0.1",
        "train.max_grad_norm=0",
        "train.save_every=0",
    ];
    let run = |name: &str, in_backward: bool| {
        let mut s = sets.to_vec();
        let flag = format!("train.optimizer_in_backward={in_backward}");
        s.push(&flag);
        train(&config(data.path(), &data.path().join(name), &s), &quiet()).unwrap()
    };
    let (usual, streamed) = (run("usual", false), run("streamed", true));
    let weights = |r: &retune_train::trainer::RunSummary| {
        std::fs::read(r.run_dir.join("model/model.safetensors")).unwrap()
    };
    assert_eq!(weights(&usual), weights(&streamed));
    assert_eq!(usual.final_loss, streamed.final_loss);
    let first = retune_core::model::Model::<f32>::load(&data.path().join("usual/model")).unwrap();
    let base = retune_core::model::Model::<f32>::load(&fixture_model()).unwrap();
    assert_ne!(
        first.weights.layers[0].q.w, base.weights.layers[0].q.w,
        "it trained"
    );

    for (set, need) in [
        ("method.kind=lora", "method.kind = \"full\""),
        ("train.max_grad_norm=1.0", "train.max_grad_norm = 0"),
        ("train.grad_accum=2", "train.grad_accum = 1"),
    ] {
        let text = std::fs::read_to_string(data.path().join("run.toml")).unwrap();
        let path = data.path().join("refused.toml");
        std::fs::write(&path, text).unwrap();
        let mut s = sets.to_vec();
        s.extend(["train.optimizer_in_backward=true", set]);
        let err = RunConfig::load(&path, &s).unwrap_err().to_string();
        assert!(
            err.contains("train.optimizer_in_backward") && err.contains(need),
            "{set}: {err}"
        );
    }
}

#[test]
fn resuming_a_folder_without_a_checkpoint_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let msg = resume(dir.path(), &quiet()).unwrap_err().to_string();
    assert!(msg.contains("not a run folder"), "{msg}");
    let data = corpus();
    let cfg = config(data.path(), &data.path().join("r"), &["train.save_every=0"]);
    let part = train(
        &cfg,
        &TrainOptions {
            quiet: true,
            stop_after: Some(1),
        },
    );
    // stop_after writes a checkpoint at the stop; remove it to leave a run without one.
    let run = part.unwrap().run_dir;
    std::fs::remove_dir_all(run.join("checkpoints")).unwrap();
    let msg = resume(&run, &quiet()).unwrap_err().to_string();
    assert!(msg.contains("no complete checkpoint"), "{msg}");
}

/// Writes a general-English file and returns it with the `--set` naming it as retention data.
fn general_text(dir: &Path) -> (PathBuf, String) {
    let general = dir.join("general.txt");
    let text = "It was a bright cold day in April, and the clocks were striking thirteen.";
    std::fs::write(&general, text).unwrap();
    let set = format!("retention.data=[\"{}\"]", general.display());
    (general, set)
}

/// General-text perplexity is measured on the base model and after training, windowed as
/// `retune eval` windows it: the figures equal an independent evaluation of the same text.
#[test]
fn retention_is_measured_before_and_after_as_retune_eval_measures_it() {
    let data = corpus();
    let (general, set) = general_text(data.path());
    let s = train(
        &config(data.path(), &data.path().join("ret"), &[&set]),
        &quiet(),
    )
    .unwrap();
    let before = s.retention_before.unwrap();
    let after = s.retention_after.unwrap();
    assert_eq!(before.step, 0);
    assert_eq!(after.step, 6);
    // Recompute both with the library's evaluation (the base model, then base + adapter).
    let model = retune_core::model::Model::<f32>::load(&fixture_model()).unwrap();
    let tok = retune_core::tokenizer::Tokenizer::load(&fixture_model()).unwrap();
    let docs = vec![tok
        .encode(&std::fs::read_to_string(&general).unwrap(), true)
        .unwrap()];
    let base = retune_core::eval::evaluate(&model, None, &docs, 48).unwrap();
    assert_eq!(base.perplexity, before.perplexity);
    assert_eq!(base.tokens, before.tokens);
    let rows = std::fs::read_to_string(s.run_dir.join("metrics.jsonl")).unwrap();
    assert_eq!(rows.matches("retention_perplexity").count(), 2);
    assert_ne!(after.perplexity, before.perplexity);
}

/// Past `retention.max_increase` the run stops (a run failure), and the last checkpoint within
/// the bound becomes the output.
#[test]
fn crossing_the_retention_bound_stops_and_keeps_the_last_good_checkpoint() {
    let data = corpus();
    let (_, set) = general_text(data.path());
    // Training hard on one repeated non-word pulls the model away from English text.
    let junk = data.path().join("junk.jsonl");
    let row = serde_json::json!({ "text": "qxqxqx ".repeat(8) }).to_string();
    std::fs::write(&junk, vec![row; 8].join("\n")).unwrap();
    let junk_set = format!("data.train=[\"{}\"]", junk.display());
    let sets = [
        set.as_str(),
        junk_set.as_str(),
        "retention.max_increase=0.5",
        "train.lr=0.05",
        "train.eval_every=1",
        "train.warmup_steps=0",
        "train.max_steps=30",
    ];
    let err = train(
        &config(data.path(), &data.path().join("bound"), &sets),
        &quiet(),
    )
    .unwrap_err();
    let TrainError::RetentionExceeded {
        step,
        before,
        after,
        kept_step,
        ..
    } = err
    else {
        panic!("expected a retention failure, got {err}");
    };
    assert!(after > before * 1.5);
    let kept = kept_step.expect("the first steps stay within the bound");
    assert!(kept < step);
    // The output is the kept checkpoint's adapter, byte for byte its tensors.
    let out = load_tensors(&data.path().join("bound/adapter/adapter_model.safetensors")).unwrap();
    let ckpt = load_tensors(&data.path().join(format!(
        "bound/checkpoints/step-{kept}/trainable.safetensors"
    )))
    .unwrap();
    assert_eq!(out, ckpt);
    let events = std::fs::read_to_string(data.path().join("bound/events.jsonl")).unwrap();
    assert!(events.contains("\"retention\""));
}
