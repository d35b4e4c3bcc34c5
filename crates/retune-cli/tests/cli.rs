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

// ---------------------------------------------------------------------------------------------
// PEFT adapters: `retune merge`, and `--adapter` on eval and generate.

/// A PEFT-written adapter (rsLoRA, q/v/down_proj) for the tiny GGUF base, which has a tokenizer.
fn tiny_adapter() -> PathBuf {
    fixture("peft/smollm-tiny-rslora-adapter")
}

/// One F32 or I64 tensor of a safetensors file, as f64 (a reader small enough for a test).
fn safetensors_tensor(path: &Path, name: &str) -> (Vec<usize>, Vec<f64>) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let info = &header[name];
    let shape: Vec<usize> = serde_json::from_value(info["shape"].clone()).unwrap();
    let (a, b) = (
        info["data_offsets"][0].as_u64().unwrap() as usize,
        info["data_offsets"][1].as_u64().unwrap() as usize,
    );
    let data = &bytes[8 + n + a..8 + n + b];
    let values = match info["dtype"].as_str().unwrap() {
        "F32" => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        "I64" => data
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64)
            .collect(),
        other => panic!("{name}: dtype {other}"),
    };
    (shape, values)
}

fn eval_loss(model: &Path, adapter: Option<&Path>, data: &Path) -> f64 {
    let mut args = vec![
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--max-seq-len",
        "64",
        "--json",
    ];
    if let Some(a) = adapter {
        args.extend(["--adapter", a.to_str().unwrap()]);
    }
    json(&retune(&args))["loss"].as_f64().unwrap()
}

#[test]
fn merge_peft_adapter_onto_gguf_base_writes_a_checked_hf_folder() {
    let base = fixture("smollm-tiny/model-f32.gguf");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("merged");
    let j = json(&retune(&[
        "merge",
        "--model",
        base.to_str().unwrap(),
        "--adapter",
        tiny_adapter().to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--json",
    ]));
    assert_eq!(j["passed"], true, "{j}");
    assert_eq!(j["dtype"], "f32");
    assert_eq!(j["rslora"], true);
    assert!(j["max_abs_diff"].as_f64().unwrap() < 1e-4, "{j}");
    assert!(j["adapter_effect"].as_f64().unwrap() > 0.1, "{j}");
    assert_eq!(j["reload_max_abs_diff"], 0.0, "{j}");

    // `retune inspect` reads the folder: the same architecture, tied head, F32 weights.
    let i = json(&retune(&["inspect", out.to_str().unwrap(), "--json"]));
    assert_eq!(i["format"], "HfFolder");
    assert_eq!(i["architecture"], "LlamaForCausalLM");
    assert_eq!(i["tied_embeddings"], true);
    assert_eq!(i["parameters"], 121_280);

    // Its logits are PEFT's (base + adapter in PyTorch) on the fixture's reference batch.
    let reference = tiny_adapter().join("reference.safetensors");
    let (shape, ids) = safetensors_tensor(&reference, "input_ids");
    let (_, expected) = safetensors_tensor(&reference, "logits");
    let rows: Vec<Vec<u32>> = ids
        .chunks(shape[1])
        .map(|r| r.iter().map(|&i| i as u32).collect())
        .collect();
    let batch = retune_core::model::Batch::from_rows(&rows).unwrap();
    let merged = retune_core::model::Model::<f32>::load(&out).unwrap();
    let logits = merged.logits(&batch, None);
    let diff = logits
        .iter()
        .zip(&expected)
        .map(|(a, b)| (*a as f64 - b).abs())
        .fold(0.0, f64::max);
    eprintln!("merged folder vs PEFT reference: max |logit diff| = {diff:e}");
    assert!(diff < 1e-4, "merged logits differ from PEFT's by {diff}");

    // The same loss through the CLI: base + --adapter, and the merged folder.
    let text = dir.path().join("text.txt");
    std::fs::write(
        &text,
        "The heart has four chambers; valves keep blood moving forward.",
    )
    .unwrap();
    let with_adapter = eval_loss(&base, Some(&tiny_adapter()), &text);
    let from_merged = eval_loss(&out, None, &text);
    let base_only = eval_loss(&base, None, &text);
    assert!(
        (with_adapter - from_merged).abs() < 1e-5,
        "{with_adapter} vs {from_merged}"
    );
    assert!(
        (with_adapter - base_only).abs() > 1e-3,
        "the adapter must matter"
    );

    // generate --adapter equals generating from the merged folder (greedy).
    let gen = |model: &Path, adapter: Option<&Path>| {
        let mut args = vec![
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "The heart",
            "--max-tokens",
            "12",
        ];
        if let Some(a) = adapter {
            args.extend(["--adapter", a.to_str().unwrap()]);
        }
        let o = retune(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        stdout(&o)
    };
    assert_eq!(gen(&base, Some(&tiny_adapter())), gen(&out, None));

    // A non-empty output folder is refused.
    let o = retune(&[
        "merge",
        "--model",
        base.to_str().unwrap(),
        "--adapter",
        tiny_adapter().to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_bad_input(&o, "not empty");
}

#[test]
fn merge_bf16_is_checked_against_a_bound_it_states() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("merged-bf16");
    let j = json(&retune(&[
        "merge",
        "--model",
        fixture("smollm-tiny/model-f32.gguf").to_str().unwrap(),
        "--adapter",
        tiny_adapter().to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--dtype",
        "bf16",
        "--json",
    ]));
    assert_eq!(j["passed"], true, "{j}");
    let tol = j["tolerance"].as_f64().unwrap();
    assert!((tol - 0.05 * j["max_abs_logit"].as_f64().unwrap()).abs() < 1e-9);
    assert!(j["merge_max_abs_diff"].as_f64().unwrap() < 1e-4, "{j}");
    let i = json(&retune(&["inspect", out.to_str().unwrap(), "--json"]));
    assert_eq!(i["stored_dtypes"]["mlp"]["BF16"], 9, "{i}");
}

#[test]
fn adapter_of_another_base_is_bad_input_naming_the_adapter_file() {
    let base = fixture("smollm-tiny/model-f32.gguf");
    let wrong = fixture("peft/llama3-tiny-adapter");
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("text.txt");
    std::fs::write(&text, "some text").unwrap();
    let out = dir.path().join("merged");
    for args in [
        vec!["eval", "--data", text.to_str().unwrap()],
        vec!["generate", "--prompt", "hi", "--max-tokens", "2"],
        vec!["merge", "--out", out.to_str().unwrap()],
    ] {
        let mut args = args;
        args.extend([
            "--model",
            base.to_str().unwrap(),
            "--adapter",
            wrong.to_str().unwrap(),
        ]);
        let o = retune(&args);
        assert_bad_input(&o, "llama3-tiny-adapter/adapter_model.safetensors");
        assert!(stderr(&o).contains("different shape"), "{}", stderr(&o));
    }
    assert!(!out.exists(), "nothing is written for a mismatched adapter");

    let o = retune(&[
        "eval",
        "--model",
        base.to_str().unwrap(),
        "--adapter",
        "/nonexistent/adapter",
        "--data",
        text.to_str().unwrap(),
    ]);
    assert_bad_input(&o, "/nonexistent/adapter");
}

/// The real SmolLM2-135M-Instruct (GGUF, Q4_1 + Q8_0) with an adapter retune wrote: the merge
/// (to bf16, half the disk) passes its own check, and the adapter visibly changes the logits.
#[test]
fn merge_real_model_with_a_retune_adapter() {
    use retune_core::model::{Lora, LoraSpec, Model, Target};
    let m = smollm2();
    let dir = tempfile::tempdir().unwrap();
    let adapter = dir.path().join("adapter");
    {
        let model = Model::<f32>::load(&m).unwrap();
        let spec = LoraSpec {
            r: 8,
            alpha: 16.0,
            dropout: 0.0,
            targets: Target::ALL.to_vec(),
            rslora: false,
        };
        let mut lora = Lora::init(spec, &model.weights, 1).unwrap();
        // B = 0 after init; small deterministic values so the adapter matters.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for layer in &mut lora.layers {
            for p in layer.pairs.iter_mut().flatten() {
                for b in &mut p.b {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    *b = ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.02;
                }
            }
        }
        retune_core::load::peft::save_peft_adapter(
            &adapter,
            &lora,
            &model.config,
            "SmolLM2-135M-Instruct",
        )
        .unwrap();
    }
    let out = dir.path().join("merged");
    let j = json(&retune(&[
        "merge",
        "--model",
        m.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--dtype",
        "bf16",
        "--json",
    ]));
    eprintln!("{j}");
    assert_eq!(j["passed"], true, "{j}");
    assert!(j["merge_max_abs_diff"].as_f64().unwrap() < 1e-3, "{j}");
    assert_eq!(j["reload_max_abs_diff"], 0.0, "{j}");
    assert!(j["adapter_effect"].as_f64().unwrap() > 0.05, "{j}");
    let i = json(&retune(&["inspect", out.to_str().unwrap(), "--json"]));
    assert_eq!(i["parameters"], 134_515_008);
    assert_eq!(i["tied_embeddings"], true);
}
