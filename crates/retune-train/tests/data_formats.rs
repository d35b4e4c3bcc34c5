//! Data formats and validation on the hand-written files in `tests/fixtures/data/` (see its
//! README.md): every format reads, every problem is reported with its file, line and field,
//! the training readers stop at the first one, overflow rules count what they drop or cut.

use retune_core::tokenizer::Tokenizer;
use retune_train::config::{DataFormat, ObjectiveKind};
use retune_train::data::{
    check_files, read_clm, read_examples, read_preference, read_sft, Overflow, ReadOptions,
};
use retune_train::TrainError;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/data")
        .join(name)
}

/// The tiny SmolLM-shaped fixture's byte-level tokenizer (no chat template).
fn tiny_tok() -> Tokenizer {
    Tokenizer::load(
        &Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/smollm-tiny/model-f32.gguf"),
    )
    .unwrap()
}

fn opts(format: DataFormat, objective: ObjectiveKind, max_seq_len: usize) -> ReadOptions {
    ReadOptions {
        format,
        objective: Some(objective),
        max_seq_len,
        on_overflow: Overflow::Error,
        train_on_prompt: false,
    }
}

/// `(line, field, message)` of each problem.
fn problems(report: &retune_train::data::CheckReport) -> Vec<(u64, String, String)> {
    report
        .problems
        .iter()
        .map(|p| (p.line, p.field.clone(), p.message.clone()))
        .collect()
}

#[test]
fn bad_messages_file_reports_every_problem_with_its_line_and_field() {
    let path = fixture("bad_messages.jsonl");
    let report = check_files(
        std::slice::from_ref(&path),
        None,
        &opts(DataFormat::Auto, ObjectiveKind::Sft, 512),
    );
    let bytes = std::fs::read(&path).unwrap();
    let bad_byte = bytes.iter().position(|&b| b == 0xe9).unwrap();
    let got = problems(&report);
    let has = |line: u64, field: &str, needle: &str| {
        assert!(
            got.iter()
                .any(|(l, f, m)| *l == line && f == field && m.contains(needle)),
            "no problem at line {line}, field {field:?}, containing {needle:?}: {got:#?}"
        )
    };
    has(2, "", "invalid JSON");
    has(3, "messages", "expected a list of messages, found a string");
    has(4, "messages", "missing");
    has(5, "messages[0].role", "unknown role \"robot\"");
    has(6, "messages[0].content", "empty content");
    has(7, "messages", "no assistant turn");
    has(
        8,
        "",
        &format!("invalid UTF-8 at byte {bad_byte} of the file"),
    );
    has(9, "messages[1].weight", "expected 0 or 1");
    has(
        11,
        "messages[0].content",
        "expected a string, found a number",
    );
    has(11, "messages[1].content", "missing");
    assert_eq!(got.len(), 10, "{got:#?}");
    // Line 10 repeats line 1: counted, not a problem.
    assert_eq!(report.duplicates, 1);
    assert_eq!(report.rows_read, 11);
    assert_eq!(report.rows_used, 2);
    assert_eq!(report.dropped["invalid row"], 9);
    assert!(!report.is_clean());
    assert!(!report.tokenized);
    assert_eq!(report.tokens, 0);
    // The display form is `file:line: field: what is wrong`.
    let first = report.problems[1].to_string();
    assert_eq!(
        first,
        format!(
            "{}:3: messages: expected a list of messages, found a string",
            path.display()
        )
    );
}

#[test]
fn training_readers_stop_at_the_first_problem() {
    let tok = tiny_tok();
    let err = read_sft(
        &[fixture("bad_messages.jsonl")],
        &tok,
        512,
        Overflow::Error,
        false,
    )
    .unwrap_err();
    // The tiny tokenizer has no chat template, so line 1 already fails; with a template the
    // first problem would be line 2. Either way it is a Data error naming file and line.
    match err {
        TrainError::Data { line, path, .. } => {
            assert!(line == 1 || line == 2, "{line}");
            assert!(path.ends_with("bad_messages.jsonl"));
        }
        other => panic!("{other}"),
    }
    let err = read_sft(
        &[fixture("bad_prompt_completion.jsonl")],
        &tok,
        512,
        Overflow::Error,
        false,
    )
    .unwrap_err();
    let TrainError::Data {
        line,
        field,
        reason,
        ..
    } = err
    else {
        panic!()
    };
    assert_eq!(
        (line, field.as_str(), reason.as_str()),
        (2, "completion", "missing")
    );
}

#[test]
fn prompt_completion_problems_and_overflow() {
    let tok = tiny_tok();
    let path = fixture("bad_prompt_completion.jsonl");
    let mut o = opts(DataFormat::Auto, ObjectiveKind::Sft, 64);
    let report = check_files(std::slice::from_ref(&path), Some(&tok), &o);
    let got = problems(&report);
    assert_eq!(got[0], (2, "completion".into(), "missing".into()));
    assert_eq!(
        got[1],
        (
            3,
            "completion".into(),
            "expected a string, found a number".into()
        )
    );
    assert_eq!(got[2].0, 4);
    assert!(got[2].2.contains("exceed data.max_seq_len = 64"), "{got:?}");
    assert_eq!(
        got[3],
        (
            5,
            "".into(),
            "expected a JSON object, found an array".into()
        )
    );
    assert_eq!(got.len(), 4);
    assert!(report.tokenized);
    assert!(report.length_histogram.last().unwrap().rows == 1);

    o.on_overflow = Overflow::Drop;
    let report = check_files(std::slice::from_ref(&path), Some(&tok), &o);
    assert_eq!(report.problems.len(), 3);
    assert_eq!(report.dropped["longer than max_seq_len"], 1);
    assert_eq!(report.rows_used, 1);

    o.on_overflow = Overflow::Truncate;
    let report = check_files(&[path], Some(&tok), &o);
    assert_eq!(report.truncated["longer than max_seq_len"], 1);
    assert_eq!(report.rows_used, 2);
    assert!(report.files[0].tokens <= 64 + 64);
}

#[test]
fn preference_problems() {
    let report = check_files(
        &[fixture("bad_preference.jsonl")],
        None,
        &opts(DataFormat::Auto, ObjectiveKind::Dpo, 512),
    );
    let got = problems(&report);
    assert_eq!(
        got,
        vec![
            (2, "rejected".into(), "equal to chosen".into()),
            (3, "rejected".into(), "missing".into()),
            (
                4,
                "chosen".into(),
                "expected a string or a list of messages, found a number".into()
            ),
            (5, "chosen".into(), "empty".into()),
        ]
    );
    // With a tokenizer, a prompt longer than max_seq_len is named by file and line (the
    // fixture tokenizer is byte-level: one token per byte, plus BOS).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("long.jsonl");
    let row = |prompt: &str| {
        serde_json::json!({ "prompt": prompt, "chosen": "Yes.", "rejected": "No." }).to_string()
    };
    let long = "Define a very long term whose name alone fills the context.";
    std::fs::write(&path, [row("Define it."), row(long)].join("\n")).unwrap();
    let report = check_files(
        &[path],
        Some(&tiny_tok()),
        &opts(DataFormat::Auto, ObjectiveKind::Dpo, 24),
    );
    let got = problems(&report);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0].0, 2);
    assert!(
        got[0].2.contains("tokens exceed data.max_seq_len = 24"),
        "{got:?}"
    );
}

#[test]
fn json_array_problems_carry_the_element_line() {
    let report = check_files(
        &[fixture("bad_array.json")],
        None,
        &opts(DataFormat::Auto, ObjectiveKind::Sft, 512),
    );
    let got = problems(&report);
    assert_eq!(
        got[0],
        (
            3,
            "input".into(),
            "expected a string, found a number".into()
        )
    );
    assert_eq!(got[1], (3, "output".into(), "empty".into()));
    assert_eq!(got[2].0, 6);
    assert!(got[2].2.starts_with("invalid JSON"), "{got:?}");
    assert_eq!(got.len(), 3);
}

#[test]
fn every_good_file_is_clean_and_reads() {
    let tok = tiny_tok();
    let o = opts(DataFormat::Auto, ObjectiveKind::Sft, 512);
    for name in ["good_prompt_completion.jsonl", "good_alpaca.json"] {
        let report = check_files(&[fixture(name)], Some(&tok), &o);
        assert!(report.is_clean(), "{name}: {:?}", report.problems);
        let (examples, stats) = read_examples(&[fixture(name)], &tok, &o).unwrap();
        assert_eq!(examples.len(), 2, "{name}");
        assert_eq!(stats[0].rows_used, 2);
        assert_eq!(stats[0].sha256.len(), 64);
        assert_eq!(
            stats[0].bytes,
            std::fs::metadata(fixture(name)).unwrap().len()
        );
        for e in &examples {
            assert!(!e.is_target[0]);
            // The EOS ends every example and is a target.
            assert!(tok.is_eos(*e.ids.last().unwrap()));
            assert!(*e.is_target.last().unwrap());
        }
    }
    let stats = read_examples(&[fixture("good_alpaca.json")], &tok, &o)
        .unwrap()
        .1;
    assert_eq!(stats[0].format, "alpaca");

    // Alpaca without a chat template: prompt "instruction\n\n[input\n\n]", output the target.
    let (ex, _) = read_examples(&[fixture("good_alpaca.json")], &tok, &o).unwrap();
    let prompt = tok
        .encode("Summarise.\n\nThe heart pumps blood.\n\n", true)
        .unwrap();
    assert_eq!(&ex[1].ids[..prompt.len()], &prompt[..]);
    assert!(ex[1].is_target[..prompt.len()].iter().all(|t| !t));
    assert!(ex[1].is_target[prompt.len()..].iter().all(|&t| t));

    // Structure of messages and preference files checks without a tokenizer.
    for (name, objective) in [
        ("good_messages.jsonl", ObjectiveKind::Sft),
        ("good_preference.jsonl", ObjectiveKind::Dpo),
    ] {
        let report = check_files(
            &[fixture(name)],
            None,
            &opts(DataFormat::Auto, objective, 512),
        );
        assert!(report.is_clean(), "{name}: {:?}", report.problems);
        assert_eq!(report.rows_used, 2);
    }
    // The preference reader stops at the first bad row, naming it.
    let err = read_preference(
        &[fixture("bad_preference.jsonl")],
        &tok,
        &opts(DataFormat::Auto, ObjectiveKind::Dpo, 512),
    )
    .unwrap_err();
    assert!(
        err.to_string()
            .ends_with("bad_preference.jsonl:2: field `rejected`: equal to chosen"),
        "{err}"
    );
}

#[test]
fn text_folders_read_for_clm_and_blank_rows_are_counted() {
    let tok = tiny_tok();
    let (examples, stats) = read_clm(&[fixture("text")], &tok, 512).unwrap();
    let names: Vec<String> = stats
        .iter()
        .map(|s| s.path.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["a.txt", "b.md", "c.jsonl"]);
    assert_eq!(examples.len(), 3);
    assert_eq!(stats[2].rows_read, 2);
    assert_eq!(stats[2].dropped["empty text"], 1);
    assert_eq!(stats[0].format, "text");
    // A chat file under clm is a problem, not silently read.
    let err = read_clm(&[fixture("good_messages.jsonl")], &tok, 512).unwrap_err();
    assert!(err.to_string().contains(":1: "), "{err}");
    // Long documents are cut into overlapping pieces, never dropped.
    let (pieces, stats) = read_clm(&[fixture("text/b.md")], &tok, 8).unwrap();
    assert!(pieces.len() > 1);
    let targets: usize = pieces
        .iter()
        .map(|p| p.is_target.iter().filter(|&&t| t).count())
        .sum();
    assert_eq!(targets, stats[0].target_tokens);
}

#[test]
fn forced_format_reports_missing_keys() {
    let report = check_files(
        &[fixture("good_prompt_completion.jsonl")],
        None,
        &opts(DataFormat::Messages, ObjectiveKind::Sft, 512),
    );
    let got = problems(&report);
    assert_eq!(got.len(), 2);
    assert_eq!(got[0], (1, "messages".into(), "missing".into()));
    // The blank line 2 is skipped, so the second row is line 3.
    assert_eq!(got[1].0, 3);
}

#[test]
fn without_an_objective_each_row_is_checked_as_its_format_implies() {
    let tok = tiny_tok();
    let o = ReadOptions {
        objective: None,
        ..opts(DataFormat::Auto, ObjectiveKind::Sft, 512)
    };
    let files = [
        fixture("text"),
        fixture("good_prompt_completion.jsonl"),
        fixture("good_preference.jsonl"),
    ];
    let report = check_files(&files, None, &o);
    assert!(report.is_clean(), "{:?}", report.problems);
    assert_eq!(report.files.len(), 5);
    assert_eq!(report.rows_used, 3 + 2 + 2);
    // With the tokenizer, string preference rows tokenise; the chat one needs a template the
    // tiny tokenizer lacks, and says so.
    let report = check_files(&files, Some(&tok), &o);
    assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
    assert_eq!(report.problems[0].line, 2);
    assert!(report.problems[0].message.contains("chat template"));
    assert!(report.tokens > 0);
}
