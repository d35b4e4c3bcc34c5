//! The disclosure of a real two-step LoRA run on the tiny SmolLM-shaped GGUF fixture: every
//! sha256 in the record equals an independent one, the JSON-LD and JATS parse, the model card
//! has Hugging Face front matter, a failed run is marked so, and `check_base` tells the base
//! from another model.

use retune_report::record::{build_record, DisclosureRecord, Status};
use retune_report::{check_base, write_all, Evidence};
use retune_train::config::RunConfig;
use retune_train::trainer::{train, RunSummary, TrainOptions};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/smollm-tiny")
        .join(name)
}

fn sha256(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Sha256::digest(&bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Writes the data and the configuration of a small run into `dir`.
fn config(dir: &Path, extra: &[&str]) -> RunConfig {
    let sentences = [
        "The heart pumps blood through the body.",
        "Atrial fibrillation is an irregular heart rhythm.",
        "Hypertension raises the risk of stroke.",
        "The left ventricle ejects blood into the aorta.",
        "Beta blockers slow the heart rate.",
        "An echocardiogram shows the valves moving.",
    ];
    let rows: Vec<String> = sentences
        .iter()
        .map(|s| serde_json::json!({ "text": s }).to_string())
        .collect();
    std::fs::write(dir.join("train.jsonl"), rows.join("\n")).unwrap();
    std::fs::write(dir.join("eval.jsonl"), rows[..2].join("\n")).unwrap();
    std::fs::write(
        dir.join("general.txt"),
        "The Fulton County Grand Jury said Friday an investigation produced no evidence.",
    )
    .unwrap();
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
kind = "clm"
[data]
train = ["train.jsonl"]
eval = ["eval.jsonl"]
max_seq_len = 32
[retention]
data = ["general.txt"]
[train]
max_steps = 2
batch_size = 2
lr = 1e-3
eval_every = 1
save_every = 0
seed = 3
[output]
dir = "run"
"#,
        model = fixture("model-f32.gguf").display(),
    );
    let path = dir.join("run.toml");
    std::fs::write(&path, text).unwrap();
    RunConfig::load(&path, extra).unwrap()
}

/// Trains two steps; adds retention rows to metrics.jsonl when the trainer wrote none.
fn run(dir: &Path) -> (RunConfig, RunSummary) {
    let cfg = config(dir, &[]);
    let opts = TrainOptions {
        quiet: true,
        ..TrainOptions::default()
    };
    let summary = train(&cfg, &opts).unwrap();
    let metrics = summary.run_dir.join("metrics.jsonl");
    let text = std::fs::read_to_string(&metrics).unwrap();
    if !text.contains("retention_perplexity") {
        let extra = "{\"step\":0,\"retention_perplexity\":250.0,\"retention_loss\":5.52}\n\
                     {\"step\":2,\"retention_perplexity\":260.0,\"retention_loss\":5.56}\n";
        std::fs::write(&metrics, format!("{text}{extra}")).unwrap();
    }
    (cfg, summary)
}

fn check_hash(path: &str, sha: &str, base: &Path) {
    let p = Path::new(path);
    let p = if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    };
    assert_eq!(sha, sha256(&p), "sha256 of {}", p.display());
}

#[test]
fn a_real_run_is_disclosed_with_true_hashes_in_every_form() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, summary) = run(dir.path());
    let run_dir = summary.run_dir.clone();
    let rec = write_all(&run_dir, &cfg, Some(&summary), None).unwrap();

    // Every sha256 equals an independent one.
    assert_eq!(rec.status, Status::Finished);
    let b = &rec.base_model;
    assert_eq!(b.files.len(), 1);
    check_hash(&b.files[0].path, &b.files[0].sha256, &run_dir);
    assert_eq!(b.files[0].sha256, sha256(&fixture("model-f32.gguf")));
    assert_eq!(
        b.files[0].bytes,
        std::fs::metadata(fixture("model-f32.gguf")).unwrap().len()
    );
    assert_eq!(
        b.tokenizer_sha256.as_deref(),
        Some(b.files[0].sha256.as_str())
    );
    assert_eq!(b.format.as_deref(), Some("gguf"));
    assert!(b.parameters.unwrap() > 0);
    assert_eq!(rec.data.files.len(), 3);
    for f in &rec.data.files {
        check_hash(&f.path, f.sha256.as_ref().unwrap(), &run_dir);
    }
    let roles: Vec<&str> = rec.data.files.iter().map(|f| f.role.as_str()).collect();
    assert_eq!(roles, ["train", "eval", "retention"]);
    assert!(rec.data.files[0].rows_read.unwrap() > 0);
    assert_eq!(rec.outputs.dir.as_deref(), Some("adapter"));
    assert!(rec.outputs.files.len() >= 2, "{:?}", rec.outputs.files);
    for f in &rec.outputs.files {
        check_hash(&f.path, &f.sha256, &run_dir);
    }
    assert!(rec
        .outputs
        .files
        .iter()
        .all(|f| !f.path.ends_with("README.md")));
    assert_eq!(rec.results.steps, Some(2));
    let ret = rec.results.retention.as_ref().expect("retention rows");
    assert!(ret.before.is_some() && ret.after.is_some() && ret.relative_change.is_some());
    assert_eq!(rec.method.lora.as_ref().unwrap().scaling, 2.0);
    assert!(rec.method.config["train"]["lr"].as_f64() == Some(1e-3));

    // Rebuilt from the run folder alone (its finished event), the figures are the same.
    let rebuilt = build_record(&run_dir, &cfg, None, None).unwrap();
    assert_eq!(rebuilt.status, Status::Finished);
    assert_eq!(rebuilt.results, rec.results);
    assert_eq!(rebuilt.data, rec.data);
    assert_eq!(
        rebuilt.method.trainable_parameters,
        rec.method.trainable_parameters
    );
    assert_eq!(rebuilt.outputs.files, rec.outputs.files);

    // disclosure.json reads back into the same record.
    let json = std::fs::read_to_string(run_dir.join("disclosure.json")).unwrap();
    let back: DisclosureRecord = serde_json::from_str(&json).unwrap();
    assert_eq!(back, rec);

    // JSON-LD: JSON with a context, a graph, the CASRAI term and isBasedOn the base node.
    let ld: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("disclosure.jsonld")).unwrap())
            .unwrap();
    assert!(ld["@context"].to_string().contains("https://schema.org/"));
    let graph = ld["@graph"].as_array().unwrap();
    let ld_text = ld.to_string();
    assert!(ld_text.contains("https://casrai.org/dictionary/term/fine-tuning"));
    let product = graph
        .iter()
        .find(|n| n["isBasedOn"].is_object())
        .expect("a node isBasedOn the base model");
    let base_id = product["isBasedOn"]["@id"].as_str().unwrap();
    let base_node = graph.iter().find(|n| n["@id"] == base_id).unwrap();
    assert!(base_node.to_string().contains(&b.files[0].sha256));
    assert_eq!(graph.iter().filter(|n| n["@type"] == "Dataset").count(), 3);
    assert!(graph.iter().any(|n| n["@type"] == "SoftwareApplication"));

    // JATS: well-formed XML whose root is <sec>.
    let jats = std::fs::read_to_string(run_dir.join("disclosure.jats.xml")).unwrap();
    let mut reader = quick_xml::Reader::from_str(&jats);
    let mut root = None;
    let mut depth = 0i64;
    loop {
        match reader.read_event() {
            Ok(quick_xml::events::Event::Eof) => break,
            Ok(quick_xml::events::Event::Start(e)) => {
                if root.is_none() {
                    root = Some(e.name().0.to_string());
                }
                depth += 1;
            }
            Ok(quick_xml::events::Event::End(_)) => depth -= 1,
            Ok(_) => {}
            Err(e) => panic!("JATS is not well-formed: {e}\n{jats}"),
        }
    }
    assert_eq!(root.as_deref(), Some("sec"));
    assert_eq!(depth, 0);
    assert!(jats.contains("<table-wrap"));

    // The model card.
    let card = std::fs::read_to_string(run_dir.join("adapter/README.md")).unwrap();
    assert!(card.starts_with("---\n"), "{card}");
    let front = &card[4..card[4..].find("\n---").unwrap() + 4];
    assert!(front.contains("base_model: \"model-f32\""), "{front}");
    assert!(front.contains("library_name: peft"), "{front}");
    assert!(!front.contains("license"), "license unknown, left out");
    assert!(card.contains("We fine-tuned model-f32 (sha256 "), "{card}");
    assert!(card.contains("with LoRA (r = 4, alpha = 8"), "{card}");
    assert!(card.contains("general-text perplexity went from"), "{card}");

    // Plots and page.
    for name in ["loss.svg", "retention.svg"] {
        let svg = std::fs::read_to_string(run_dir.join(name)).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        let mut r = quick_xml::Reader::from_str(&svg);
        loop {
            match r.read_event() {
                Ok(quick_xml::events::Event::Eof) => break,
                Ok(_) => {}
                Err(e) => panic!("{name} is not well-formed: {e}"),
            }
        }
    }
    let html = std::fs::read_to_string(run_dir.join("index.html")).unwrap();
    assert!(html.contains("<svg") && html.contains("<table>") && html.contains("[train]"));
    assert!(
        !html.contains("http://") || !html.contains("<link"),
        "no external resources"
    );
    assert!(!html.contains("<script"));

    // The base check: the right base matches, another model file does not.
    let ok = check_base(&run_dir.join("adapter"), &fixture("model-f32.gguf")).unwrap();
    assert!(ok.matches, "{}", ok.message);
    assert!(matches!(ok.evidence, Evidence::Record { .. }));
    let ok = check_base(&run_dir, &fixture("model-f32.gguf")).unwrap();
    assert!(ok.matches);
    let other = check_base(&run_dir.join("adapter"), &fixture("model-q8_0.gguf")).unwrap();
    assert!(!other.matches, "{}", other.message);
    assert!(!other.files[0].matches);

    // Without a record, the card's front matter is weaker evidence, by name.
    let lone = dir.path().join("lone-adapter");
    std::fs::create_dir(&lone).unwrap();
    for name in ["adapter_config.json", "README.md"] {
        std::fs::copy(run_dir.join("adapter").join(name), lone.join(name)).unwrap();
    }
    let weak = check_base(&lone, &fixture("model-f32.gguf")).unwrap();
    assert!(matches!(weak.evidence, Evidence::ModelCard { .. }));
    assert!(weak.matches && !weak.evidence.is_strong());
    assert!(
        !check_base(&lone, &fixture("model-q8_0.gguf"))
            .unwrap()
            .matches
    );
}

#[test]
fn a_failed_run_is_disclosed_as_failed() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &["data.train=missing.jsonl"]);
    let run_dir = dir.path().join("failed-run");
    std::fs::create_dir(&run_dir).unwrap();
    let rec = build_record(
        &run_dir,
        &cfg,
        None,
        Some("reading missing.jsonl: no such file"),
    )
    .unwrap();
    assert_eq!(rec.status, Status::Failed);
    assert_eq!(
        rec.error.as_deref(),
        Some("reading missing.jsonl: no such file")
    );
    assert!(
        rec.data.files[0].sha256.is_none(),
        "a missing file has no hash"
    );
    assert_eq!(
        rec.base_model.files[0].sha256,
        sha256(&fixture("model-f32.gguf"))
    );
    let json = retune_report::render::to_json(&rec);
    assert!(json.contains("\"status\": \"failed\""));
    let ld = retune_report::render::to_jsonld(&rec);
    assert!(ld.contains("FailedActionStatus"));
    let rec = write_all(&run_dir, &cfg, None, Some("boom")).unwrap();
    assert_eq!(rec.status, Status::Failed);
    assert!(run_dir.join("index.html").is_file());
    assert!(std::fs::read_to_string(run_dir.join("retention.svg"))
        .unwrap()
        .contains("no retention data"));
}
