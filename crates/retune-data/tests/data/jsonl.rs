use retune_assets::sha256_file;
use retune_data::jsonl::{write_atomic, write_jsonl, write_text, MessagesRow, Turn};
use retune_data::Error;

fn row(i: usize) -> MessagesRow {
    MessagesRow {
        messages: vec![
            Turn::user(&format!("What is \"term {i}\"?")),
            Turn::assistant(&format!("Line one\nline two of {i}.")),
        ],
        source: "hpo".into(),
        hpo_id: format!("HP:{i:07}"),
        derived: true,
    }
}

#[test]
fn jsonl_round_trips_and_hash_matches_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rows.jsonl");
    let rows: Vec<_> = (0..3).map(row).collect();
    let written = write_jsonl(&path, &rows).unwrap();
    assert_eq!(written.rows, 3);
    assert_eq!(written.bytes, std::fs::metadata(&path).unwrap().len());
    assert_eq!(written.sha256, sha256_file(&path).unwrap());
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(
        text.lines().count(),
        3,
        "one line per row, newlines escaped"
    );
    let back: Vec<MessagesRow> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(back, rows);
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(first["derived"], true);
    assert_eq!(first["source"], "hpo");
    assert_eq!(first["messages"][1]["role"], "assistant");
}

#[test]
fn atomic_write_replaces_whole_and_leaves_no_temporary() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("brown.txt");
    std::fs::write(&path, "old contents that are longer than the new ones").unwrap();
    let written = write_text(&path, "new\ntext\n").unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "new\ntext\n");
    assert_eq!(written.rows, 2);
    assert_eq!(written.sha256, sha256_file(&path).unwrap());
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["brown.txt"], "no temporary file left");
}

#[test]
fn failed_write_names_the_file_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("missing-dir").join("x.jsonl");
    let err = write_atomic(&path, b"x").unwrap_err();
    assert!(matches!(err, Error::Io { .. }), "{err:?}");
    assert!(err.to_string().contains("x.jsonl"), "{err}");
    assert!(!path.exists());
}
