//! `retune train` from the command line: a run folder with every file the design names, and
//! bad configurations (exit code 2, a message naming the key and the fix).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn retune(args: &[&str], dir: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_retune"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("running retune")
}

fn model() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/smollm-tiny/model-f32.gguf")
}

fn setup(extra: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let rows: Vec<String> = (0..12)
        .map(|i| serde_json::json!({ "text": format!("Row {i}: the heart has four chambers and two valves.") }).to_string())
        .collect();
    std::fs::write(dir.path().join("train.jsonl"), rows.join("\n")).unwrap();
    let config = format!(
        "[model]\npath = \"{}\"\n[method]\nr = 2\nalpha = 4\n[objective]\nkind = \"clm\"\n[data]\ntrain = [\"train.jsonl\"]\n\
         eval_fraction = 0.25\nmax_seq_len = 64\n[train]\nmax_steps = 3\nbatch_size = 2\nsave_every = 2\n{extra}",
        model().display()
    );
    std::fs::write(dir.path().join("run.toml"), config).unwrap();
    dir
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn a_run_writes_the_run_folder() {
    let dir = setup("");
    let o = retune(
        &["train", "run.toml", "--out", "run", "--quiet"],
        dir.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let run = dir.path().join("run");
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        run.display().to_string()
    );
    for f in [
        "config.toml",
        "events.jsonl",
        "metrics.jsonl",
        "adapter/adapter_model.safetensors",
        "adapter/adapter_config.json",
        "adapter/README.md",
        "disclosure.json",
        "disclosure.jsonld",
        "disclosure.jats.xml",
        "loss.svg",
        "retention.svg",
        "index.html",
    ] {
        assert!(run.join(f).is_file(), "missing {f}");
    }
    assert!(run.join("checkpoints/step-2/trainer_state.json").is_file());
    assert!(run
        .join("checkpoints/step-3/optimizer.safetensors")
        .is_file());
    // The resolved configuration writes every default out and reads back as a run config.
    let resolved = std::fs::read_to_string(run.join("config.toml")).unwrap();
    for key in [
        "lr = ",
        "warmup_steps = ",
        "schedule = ",
        "rslora = ",
        "on_overflow = ",
    ] {
        assert!(
            resolved.contains(key),
            "config.toml lacks `{key}`: {resolved}"
        );
    }
    let events = std::fs::read_to_string(run.join("events.jsonl")).unwrap();
    let kinds: Vec<String> = events
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["event"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    for k in [
        "validating_files",
        "started",
        "step",
        "eval",
        "checkpoint",
        "finished",
    ] {
        assert!(kinds.iter().any(|e| e == k), "no `{k}` event in {kinds:?}");
    }
    // Starting again into the same folder is refused; resuming a finished run is a no-op success.
    let again = retune(
        &["train", "run.toml", "--out", "run", "--quiet"],
        dir.path(),
    );
    assert_eq!(again.status.code(), Some(2), "{}", stderr(&again));
    assert!(stderr(&again).contains("--resume"), "{}", stderr(&again));
}

#[test]
fn an_unknown_key_names_the_nearest_valid_one() {
    let dir = setup("learning_rate = 1e-4\n");
    let o = retune(&["train", "run.toml", "--quiet"], dir.path());
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("did you mean `train.lr`"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn bad_lora_settings_are_usage_errors() {
    for (set, needle) in [
        ("method.r=0", "method.r"),
        ("method.alpha=0", "method.alpha"),
        ("method.targets=[\"qq_proj\"]", "qq_proj"),
    ] {
        let dir = setup("");
        let o = retune(&["train", "run.toml", "--set", set, "--quiet"], dir.path());
        assert_eq!(o.status.code(), Some(2), "{set}: {}", stderr(&o));
        assert!(stderr(&o).contains(needle), "{set}: {}", stderr(&o));
        assert!(!stderr(&o).contains("panicked"));
    }
}

#[test]
fn resume_without_a_checkpoint_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    let o = retune(
        &["train", "--resume", dir.path().to_str().unwrap()],
        dir.path(),
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("not a run folder"), "{}", stderr(&o));
}

#[test]
fn a_diverging_run_exits_1() {
    let dir = setup("lr = 1e35\nmax_grad_norm = 0\n");
    let o = retune(&["train", "run.toml", "--quiet"], dir.path());
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("is NaN") || stderr(&o).contains("is inf"),
        "{}",
        stderr(&o)
    );
    // The failed run still gets its disclosure record, marked failed.
    let record = std::fs::read_to_string(dir.path().join("runs/run/disclosure.json")).unwrap();
    let record: serde_json::Value = serde_json::from_str(&record).unwrap();
    assert_eq!(record["status"], "failed");
}

/// An adapter applied to another base of the same shape loads, but with a warning from its
/// disclosure record; `retune verify` says mismatch (exit 1) and match (exit 0) for the right base.
#[test]
fn an_adapter_on_another_base_is_flagged() {
    let dir = setup("");
    let o = retune(
        &["train", "run.toml", "--out", "run", "--quiet"],
        dir.path(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let other = model().with_file_name("model-q8_0.gguf");
    std::fs::write(dir.path().join("t.txt"), "The heart has four chambers.").unwrap();
    let args = [
        "eval",
        "--model",
        other.to_str().unwrap(),
        "--adapter",
        "run/adapter",
        "--data",
        "t.txt",
        "--max-seq-len",
        "64",
    ];
    let o = retune(&args, dir.path());
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("warning"), "{}", stderr(&o));
    let o = retune(
        &["verify", "run", "--model", other.to_str().unwrap()],
        dir.path(),
    );
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let o = retune(
        &["verify", "run", "--model", model().to_str().unwrap()],
        dir.path(),
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let base = model();
    let args = [
        "eval",
        "--model",
        base.to_str().unwrap(),
        "--adapter",
        "run/adapter",
        "--data",
        "t.txt",
        "--max-seq-len",
        "64",
    ];
    let o = retune(&args, dir.path());
    assert!(!stderr(&o).contains("warning"), "{}", stderr(&o));
}

fn retune_with_memory(args: &[&str], dir: &Path, available: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_retune"))
        .args(args)
        .current_dir(dir)
        .env("RETUNE_MEMORY_AVAILABLE", available)
        .output()
        .expect("running retune")
}

/// A run that does not fit the available memory is refused by its memory plan before the model
/// is read: exit 2, the estimate, what is available and the options; no run folder.
#[test]
fn a_run_too_big_for_the_memory_is_refused_before_loading() {
    for (extra, option) in [
        ("", "model.quantize"),
        ("[method]\n", "method.kind = \"lora\""),
    ] {
        let dir = setup("");
        if !extra.is_empty() {
            let path = dir.path().join("run.toml");
            let text = std::fs::read_to_string(&path).unwrap();
            std::fs::write(
                &path,
                text.replace("[method]\n", "[method]\nkind = \"full\"\n"),
            )
            .unwrap();
        }
        let args = ["train", "run.toml", "--out", "run", "--quiet"];
        let o = retune_with_memory(&args, dir.path(), "64M");
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert!(err.contains("refused before loading"), "{err}");
        assert!(err.contains("0.06 GiB is available"), "{err}");
        assert!(err.contains(option), "{err}");
        assert!(err.contains("data.max_seq_len"), "{err}");
        assert!(!dir.path().join("run/adapter").exists());
        // With enough memory the same run goes ahead, and its first line is the plan.
        let o = retune_with_memory(&["train", "run.toml", "--out", "ok"], dir.path(), "20G");
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(
            stderr(&o).contains("memory plan: estimated peak"),
            "{}",
            stderr(&o)
        );
    }
    let dir = setup("");
    let o = retune_with_memory(&["train", "run.toml", "--out", "run"], dir.path(), "lots");
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("RETUNE_MEMORY_AVAILABLE"),
        "{}",
        stderr(&o)
    );
}
