//! `retune demo --quick`: the embedded default end to end on the real assets (SmolLM2, PubMed,
//! HPO, Brown), two steps per stage, checking every file it writes and what they say.

use std::path::Path;
use std::process::Command;

fn json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

#[test]
fn the_quick_demo_runs_three_stages_and_reports_before_and_after() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let o = Command::new(env!("CARGO_BIN_EXE_retune"))
        .args(["demo", "--quick", "--out"])
        .arg(&out)
        .output()
        .expect("running retune");
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{}\n{stdout}",
        String::from_utf8_lossy(&o.stderr)
    );
    // The printed table and answers.
    for line in [
        "| cardiology perplexity (held-out PubMed abstracts) |",
        "| general-English perplexity (Brown corpus, retention) |",
        "| held-out HPO definition perplexity |",
        "| DPO reward accuracy (held-out, vs. the SFT model) |",
        "Q: What is ",
        "  base:  ",
        "  tuned: ",
    ] {
        assert!(stdout.contains(line), "stdout lacks {line:?}:\n{stdout}");
    }
    // The derived data, with their provenance.
    let manifest = json(&out.join("data/manifest.json"));
    assert_eq!(manifest["files"].as_array().unwrap().len(), 7);
    // Three stages, each a complete run folder continuing the previous adapter.
    let stages = ["1-clm", "2-sft", "3-dpo"];
    for (i, s) in stages.iter().enumerate() {
        let run = out.join(s);
        for f in [
            "config.toml",
            "metrics.jsonl",
            "adapter/adapter_model.safetensors",
            "adapter/adapter_config.json",
            "disclosure.json",
            "index.html",
        ] {
            assert!(run.join(f).exists(), "{s}: no {f}");
        }
        let record = json(&run.join("disclosure.json"));
        assert_eq!(record["method"]["objective"]["kind"], s[2..]);
        let data = record["data"]["files"].as_array().unwrap();
        let train = data.iter().find(|f| f["role"] == "train").unwrap();
        assert!(
            train["provenance"]["source_package"].is_string(),
            "{s}: training data without provenance: {train}"
        );
        let init = &record["method"]["lora"]["init_adapter"];
        if i == 0 {
            assert!(init.is_null(), "stage 1 starts from a fresh adapter");
        } else {
            let prev = out
                .join(stages[i - 1])
                .join("adapter/adapter_model.safetensors");
            let sha = retune_assets::sha256_file(&prev).unwrap();
            assert_eq!(
                init["sha256"],
                sha.as_str(),
                "{s} continues {}",
                stages[i - 1]
            );
        }
    }
    let dpo = json(&out.join("3-dpo/disclosure.json"));
    assert!(dpo["data"]["files"][0]["provenance"]["derived"] == true);
    assert!(dpo["method"]["objective"]["reference"]
        .as_str()
        .unwrap()
        .contains("2-sft/adapter"));
    // The summary: before/after figures of the base and the tuned model.
    let summary = json(&out.join("summary.json"));
    for side in ["before", "after"] {
        for k in [
            "cardiology_perplexity",
            "general_perplexity",
            "definition_perplexity",
        ] {
            let v = summary[side][k].as_f64().unwrap();
            assert!(v.is_finite() && v > 1.0, "{side}.{k} = {v}");
        }
    }
    // Every stage measured general-English perplexity before and after, as the demo's table
    // does: stage 1 starts from the base (a fresh adapter adds exactly zero).
    let general = summary["before"]["general_perplexity"].as_f64().unwrap();
    for s in stages {
        let ret = &json(&out.join(s).join("disclosure.json"))["results"]["retention"];
        assert!(
            ret["before"].is_f64() && ret["after"].is_f64(),
            "{s}: {ret}"
        );
    }
    let first = json(&out.join("1-clm/disclosure.json"))["results"]["retention"]["before"]
        .as_f64()
        .unwrap();
    assert!(
        (first - general).abs() < 1e-9 * general,
        "{first} vs {general}"
    );
    let last = json(&out.join("3-dpo/disclosure.json"))["results"]["retention"]["after"]
        .as_f64()
        .unwrap();
    let after = summary["after"]["general_perplexity"].as_f64().unwrap();
    assert!((last - after).abs() < 1e-9 * after, "{last} vs {after}");
    // Two SFT steps on definitions make held-out definitions more likely.
    let defs = |side: &str| summary[side]["definition_perplexity"].as_f64().unwrap();
    assert!(defs("after") < defs("before"), "{summary}");
    assert_eq!(summary["answers"].as_array().unwrap().len(), 1);
    assert!(out.join("summary.md").exists());
}
