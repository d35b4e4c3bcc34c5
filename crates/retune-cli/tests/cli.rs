//! The `retune` binary end to end: the real SmolLM2-135M-Instruct model (fetched on first use),
//! tiny fixture models, and bad input (exit code 2, a message naming the file, no panic).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn retune(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_retune"))
        .args(args)
        .output()
        .expect("running retune")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn smollm2() -> PathBuf {
    retune_assets::fetch(retune_assets::Asset::SmolLm2Gguf).expect("fetching SmolLM2")
}

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

fn json(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "failed: {}", stderr(o));
    serde_json::from_str(stdout(o).trim())
        .unwrap_or_else(|e| panic!("not one JSON object: {e}: {}", stdout(o)))
}

/// Exit code 2, a message naming `needle`, and no panic.
fn assert_bad_input(o: &Output, needle: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(2), "stderr: {err}");
    assert!(
        err.contains(needle),
        "message should name `{needle}`: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn inspect_real_model_reports_published_parameter_count() {
    let m = smollm2();
    let j = json(&retune(&["inspect", m.to_str().unwrap(), "--json"]));
    assert_eq!(j["parameters"], 134_515_008);
    assert_eq!(j["layers"], 30);
    assert_eq!(j["heads"], 9);
    assert_eq!(j["kv_heads"], 3);
    assert_eq!(j["vocab_size"], 49152);
    assert_eq!(j["context_length"], 8192);
    assert_eq!(j["stored_dtypes"]["embedding"]["Q8_0"], 1);
    assert_eq!(j["stored_dtypes"]["attention"]["Q4_1"], 120);
    assert_eq!(j["stored_dtypes"]["mlp"]["Q4_1"], 90);
    assert_eq!(j["stored_dtypes"]["norms"]["F32"], 61);
}

/// A cardiology passage scores a perplexity in the low tens (uniform guessing: ~49,000).
#[test]
fn eval_real_model_on_cardiology_text() {
    let m = smollm2();
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("cardiology.txt");
    std::fs::write(
        &text,
        "Heart failure with reduced ejection fraction is treated with beta blockers, \
         angiotensin-converting enzyme inhibitors and mineralocorticoid receptor antagonists, \
         which lower mortality and hospital admissions.",
    )
    .unwrap();
    let j = json(&retune(&[
        "eval",
        "--model",
        m.to_str().unwrap(),
        "--data",
        text.to_str().unwrap(),
        "--json",
    ]));
    let ppl = j["perplexity"].as_f64().unwrap();
    let loss = j["loss"].as_f64().unwrap();
    assert!((ppl - loss.exp()).abs() < 1e-6 * ppl);
    assert!(j["tokens"].as_u64().unwrap() > 20);
    assert!((5.0..60.0).contains(&ppl), "perplexity {ppl}");
}

#[test]
fn generate_real_model_answers_in_english_and_greedy_is_reproducible() {
    let m = smollm2();
    let args = [
        "generate",
        "--model",
        m.to_str().unwrap(),
        "--chat",
        "--prompt",
        "What is atrial fibrillation?",
        "--max-tokens",
        "40",
    ];
    let first = retune(&args);
    assert!(first.status.success(), "{}", stderr(&first));
    let answer = stdout(&first);
    let lower = answer.to_lowercase();
    assert!(
        lower.contains("heart") || lower.contains("atri"),
        "answer: {answer}"
    );
    assert!(answer.split_whitespace().count() >= 15, "answer: {answer}");
    assert!(
        !answer.contains("<|im_end|>"),
        "end-of-turn token leaked: {answer}"
    );
    let second = retune(&args);
    assert_eq!(
        answer,
        stdout(&second),
        "temperature 0 must be reproducible"
    );
}

#[test]
fn inspect_and_eval_tiny_hf_fixture() {
    let dir = fixture("qwen2-tiny");
    let j = json(&retune(&["inspect", dir.to_str().unwrap(), "--json"]));
    assert_eq!(j["architecture"], "Qwen2ForCausalLM");
    assert_eq!(j["tied_embeddings"], false);
}

#[test]
fn missing_model_file_is_bad_input() {
    let o = retune(&["inspect", "/nonexistent/model.gguf"]);
    assert_bad_input(&o, "/nonexistent/model.gguf");
}

#[test]
fn unsupported_architecture_is_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": 8}"#,
    )
    .unwrap();
    let o = retune(&["inspect", dir.path().to_str().unwrap()]);
    assert_bad_input(&o, "config.json");
    assert!(stderr(&o).contains("GPT2LMHeadModel"), "{}", stderr(&o));
}

#[test]
fn truncated_gguf_is_bad_input() {
    let bytes = std::fs::read(fixture("smollm-tiny/model-f32.gguf")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let o = retune(&[
        "eval",
        "--model",
        cut.to_str().unwrap(),
        "--data",
        "/dev/null",
    ]);
    assert_bad_input(&o, "cut.gguf");
}

#[test]
fn missing_data_file_is_bad_input() {
    let m = fixture("smollm-tiny/model-f32.gguf");
    let o = retune(&[
        "eval",
        "--model",
        m.to_str().unwrap(),
        "--data",
        "/nonexistent/data.txt",
    ]);
    assert_bad_input(&o, "/nonexistent/data.txt");
}

#[test]
fn unknown_flag_is_usage_error() {
    let o = retune(&["eval", "--bogus"]);
    assert_eq!(o.status.code(), Some(2));
}
