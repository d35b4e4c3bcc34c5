//! Preference training (`dpo`, `orpo`) end to end on the tiny SmolLM-shaped GGUF fixture:
//! the reference is the starting policy (step 0 scores ln 2 with zero margins), training
//! raises the reward accuracy and margin on held-out pairs, TRL's metric names are logged,
//! a resumed run ends bitwise identical, and training continues from an SFT adapter.

use retune_train::config::RunConfig;
use retune_train::trainer::{resume, train, RunSummary, TrainOptions};
use std::path::Path;

mod common;
use common::{fixture_model, quiet};

/// Preference pairs where the chosen answer always has one shape ("a slow ...") and the
/// rejected another: a pattern a tiny model can learn and carry to held-out pairs.
fn pairs_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let terms = [
        "bradycardia",
        "angina",
        "murmur",
        "syncope",
        "stenosis",
        "embolism",
        "edema",
        "ischemia",
        "aneurysm",
        "infarct",
        "arrhythmia",
        "cyanosis",
    ];
    let row = |t: &str| {
        serde_json::json!({
            "prompt": format!("Define {t}. "),
            "chosen": format!("A heart sign ({t})."),
            "rejected": format!("xq zv {t} kk."),
        })
        .to_string()
    };
    let (train, eval) = terms.split_at(8);
    let lines = |ts: &[&str]| ts.iter().map(|t| row(t)).collect::<Vec<_>>().join("\n");
    std::fs::write(dir.path().join("train.jsonl"), lines(train)).unwrap();
    std::fs::write(dir.path().join("eval.jsonl"), lines(eval)).unwrap();
    dir
}

fn config(data: &Path, out: &str, extra: &[&str]) -> RunConfig {
    let text = format!(
        r#"
[model]
path = "{model}"
[method]
kind = "lora"
r = 4
alpha = 8
dropout = 0.0
[objective]
kind = "dpo"
beta = 0.5
[data]
train = ["{data}/train.jsonl"]
eval = ["{data}/eval.jsonl"]
max_seq_len = 64
[train]
max_steps = 8
batch_size = 4
lr = 2e-2
eval_every = 4
save_every = 2
seed = 3
[output]
dir = "{data}/{out}"
"#,
        model = fixture_model().display(),
        data = data.display(),
    );
    let path = data.join(format!("{out}.toml"));
    std::fs::write(&path, text).unwrap();
    RunConfig::load(&path, extra).unwrap()
}

fn metrics(run: &RunSummary) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn dpo_starts_at_ln2_and_learns_the_preference_on_held_out_pairs() {
    let data = pairs_dir();
    let run = train(&config(data.path(), "dpo", &[]), &quiet()).unwrap();
    let before = run.eval_before.unwrap();
    let after = run.eval_after.unwrap();
    let (pb, pa) = (before.preference.unwrap(), after.preference.unwrap());
    // At step 0 the policy is its own reference: every reward is 0 and the loss is ln 2.
    assert!(
        (before.loss - std::f64::consts::LN_2).abs() < 1e-9,
        "{before:?}"
    );
    assert_eq!((pb.rewards_margins, pb.rewards_accuracies), (0.0, 0.0));
    assert_eq!(pb.pairs, 4);
    // Trained: the held-out chosen answers gain on the rejected ones.
    assert!(after.loss < 0.5 * std::f64::consts::LN_2, "{after:?}");
    assert!(pa.rewards_accuracies >= 0.75, "{pa:?}");
    assert!(pa.rewards_margins > 0.5, "{pa:?}");
    // TRL's names in metrics.jsonl, on step rows and (prefixed) on eval rows.
    let rows = metrics(&run);
    let step = rows.iter().find(|r| r.get("loss").is_some()).unwrap();
    for key in [
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
    ] {
        assert!(step.get(key).is_some(), "step row lacks {key}: {step}");
    }
    let eval = rows
        .iter()
        .rev()
        .find(|r| r.get("eval_loss").is_some())
        .unwrap();
    assert_eq!(
        eval["eval_rewards/accuracies"].as_f64(),
        Some(pa.rewards_accuracies)
    );
    assert!(run
        .run_dir
        .join("adapter/adapter_model.safetensors")
        .exists());
}

#[test]
fn a_resumed_dpo_run_ends_bitwise_identical() {
    let data = pairs_dir();
    let whole = train(&config(data.path(), "whole", &[]), &quiet()).unwrap();
    let cut = TrainOptions {
        quiet: true,
        stop_after: Some(3),
    };
    let part = train(&config(data.path(), "cut", &[]), &cut).unwrap();
    assert_eq!(part.steps, 3);
    let rest = resume(&part.run_dir, &quiet()).unwrap();
    let bytes = |r: &RunSummary| std::fs::read(r.run_dir.join("adapter/adapter_model.safetensors"));
    assert_eq!(bytes(&whole).unwrap(), bytes(&rest).unwrap());
    assert_eq!(whole.eval_after, rest.eval_after);
}

#[test]
fn orpo_and_ipo_train_without_and_with_a_reference() {
    let data = pairs_dir();
    let orpo = train(
        &config(
            data.path(),
            "orpo",
            &["objective.kind=orpo", "objective.beta=0.2"],
        ),
        &quiet(),
    )
    .unwrap();
    let (b, a) = (orpo.eval_before.unwrap(), orpo.eval_after.unwrap());
    // ORPO's loss includes the chosen NLL: it falls, and the chosen side pulls ahead.
    assert!(a.loss < b.loss, "{b:?} -> {a:?}");
    let (pb, pa) = (b.preference.unwrap(), a.preference.unwrap());
    assert!(pa.rewards_margins > pb.rewards_margins, "{pb:?} -> {pa:?}");
    assert!(pa.log_odds_chosen.is_some());
    let ipo = train(
        &config(data.path(), "ipo", &["objective.loss=ipo"]),
        &quiet(),
    )
    .unwrap();
    // IPO at step 0: (0 - 1 / (2 beta))^2 = 1.
    assert!((ipo.eval_before.unwrap().loss - 1.0).abs() < 1e-9);
    assert!(ipo.eval_after.unwrap().loss < 1.0);
}

#[test]
fn dpo_continues_from_an_sft_adapter_which_is_its_reference() {
    let data = pairs_dir();
    // An SFT stage on the chosen answers (prompt/completion rows).
    let sft_rows: Vec<String> = std::fs::read_to_string(data.path().join("train.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            serde_json::json!({ "prompt": v["prompt"], "completion": v["chosen"] }).to_string()
        })
        .collect();
    std::fs::write(data.path().join("sft.jsonl"), sft_rows.join("\n")).unwrap();
    let sft_train = format!("data.train={}", data.path().join("sft.jsonl").display());
    let sft = train(
        &config(
            data.path(),
            "sft",
            &[
                "objective.kind=sft",
                &sft_train,
                "data.eval=[]",
                "method.r=2",
                "method.alpha=3",
                "train.max_steps=4",
            ],
        ),
        &quiet(),
    )
    .unwrap();
    let adapter = sft.output.unwrap();
    let init = format!("method.init_adapter={}", adapter.display());
    let dpo = train(
        &config(data.path(), "dpo-after-sft", &[&init, "train.max_steps=2"]),
        &quiet(),
    )
    .unwrap();
    // The reference is the SFT policy: at step 0 the DPO loss is exactly ln 2 again.
    let before = dpo.eval_before.unwrap();
    assert!((before.loss - std::f64::consts::LN_2).abs() < 1e-9);
    // The adapter's shape (r = 2, alpha = 3) carried over, and the config says so.
    assert_eq!(dpo.trainable_parameters, sft.trainable_parameters);
    let written = std::fs::read_to_string(dpo.run_dir.join("config.toml")).unwrap();
    assert!(
        written.contains("r = 2") && written.contains("alpha = 3.0"),
        "{written}"
    );
    // The eval loss of the SFT policy differs from the base's (the adapter was loaded).
    let base = train(
        &config(data.path(), "dpo-base", &["train.max_steps=1"]),
        &quiet(),
    )
    .unwrap();
    let p = |s: &RunSummary| s.eval_before.unwrap().preference.unwrap().logps_chosen;
    assert!(p(&dpo) > p(&base), "SFT raised the chosen log-likelihood");
}
