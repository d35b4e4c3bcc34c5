use retune_assets::sha256_file;
use retune_data::{
    build_cardiology_datasets, build_datasets_from, DatasetSizes, Error, Manifest, Sources,
};
use std::path::Path;

const FILES: [&str; 7] = [
    "pubmed_train.jsonl",
    "pubmed_eval.jsonl",
    "hpo_sft_train.jsonl",
    "hpo_sft_eval.jsonl",
    "hpo_dpo_train.jsonl",
    "hpo_dpo_eval.jsonl",
    "brown.txt",
];

/// Every file listed with the checksum, size and row count it has on disk, and
/// `manifest.json` equal to the manifest returned.
fn check_manifest(out: &Path, manifest: &Manifest) {
    let names: Vec<&str> = manifest.files.iter().map(|f| f.file.as_str()).collect();
    assert_eq!(names, FILES);
    for f in &manifest.files {
        let path = out.join(&f.file);
        assert_eq!(f.sha256, sha256_file(&path).unwrap(), "{}", f.file);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(f.bytes, text.len() as u64);
        assert_eq!(f.rows, text.lines().count(), "{}", f.file);
        assert_eq!(f.derived, f.file.starts_with("hpo_"), "{}", f.file);
        if f.file.ends_with(".jsonl") {
            for line in text.lines() {
                let row: serde_json::Value = serde_json::from_str(line).unwrap();
                assert_eq!(row["derived"].as_bool(), f.derived.then_some(true));
            }
        }
    }
    let on_disk: Manifest =
        serde_json::from_str(&std::fs::read_to_string(out.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(&on_disk, manifest);
}

#[test]
fn snippet_sources_build_capped_sets_and_manifest() {
    let src = tempfile::tempdir().unwrap();
    let pubmed_dir = src.path().join("pubmed");
    let brown_dir = src.path().join("brown");
    std::fs::create_dir_all(&pubmed_dir).unwrap();
    std::fs::create_dir_all(&brown_dir).unwrap();
    super::pubmed::write_gz(&pubmed_dir.join("p.xml.gz"), super::pubmed::SNIPPET);
    std::fs::write(src.path().join("hp.obo"), super::hpo::OBO).unwrap();
    std::fs::write(brown_dir.join("ca01"), "\tOne/cd ./.\n").unwrap();
    std::fs::write(brown_dir.join("ca02"), "\tTwo/cd ./.\n").unwrap();
    let sources = Sources {
        pubmed_dir,
        hpo_obo: src.path().join("hp.obo"),
        brown_dir,
    };
    let out = tempfile::tempdir().unwrap();
    let sizes = DatasetSizes {
        pubmed_eval_fraction: 0.0,
        hpo_held_out_fraction: 0.0,
        sft_train: Some(2),
        brown_files: 1,
        ..DatasetSizes::default()
    };
    let manifest = build_datasets_from(&sources, out.path(), &sizes).unwrap();
    check_manifest(out.path(), &manifest);
    let rows: Vec<usize> = manifest.files.iter().map(|f| f.rows).collect();
    // 1 abstract; 6 terms capped to the first 2 by id; 3 preference pairs; 1 Brown line.
    assert_eq!(rows, [1, 0, 2, 0, 3, 0, 1]);
    let sft = std::fs::read_to_string(out.path().join("hpo_sft_train.jsonl")).unwrap();
    assert!(sft.contains("HP:0000010") && sft.contains("HP:0000020"));
    let train = std::fs::read_to_string(out.path().join("pubmed_train.jsonl")).unwrap();
    let row: serde_json::Value = serde_json::from_str(train.trim()).unwrap();
    assert_eq!(row["pmid"], "111");
    assert_eq!(row["source"], "pubmed");
    assert_eq!(row["rule"], "mesh");
    assert!(row["text"]
        .as_str()
        .unwrap()
        .starts_with("Diuretics in chronic failure.\n\nBACKGROUND: "));
    assert_eq!(
        std::fs::read_to_string(out.path().join("brown.txt")).unwrap(),
        "One.\n"
    );

    let bad = DatasetSizes {
        pubmed_eval_fraction: 1.5,
        ..DatasetSizes::default()
    };
    assert!(matches!(
        build_datasets_from(&sources, out.path(), &bad),
        Err(Error::Argument { .. })
    ));
}

#[test]
fn real_demo_build_is_deterministic() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let sizes = DatasetSizes::demo();
    let manifest = build_cardiology_datasets(a.path(), &sizes).unwrap();
    check_manifest(a.path(), &manifest);
    let caps = [
        sizes.pubmed_train,
        sizes.pubmed_eval,
        sizes.sft_train,
        sizes.sft_eval,
        sizes.dpo_train,
        sizes.dpo_eval,
    ];
    for (f, cap) in manifest.files.iter().zip(caps) {
        assert_eq!(Some(f.rows), cap, "{} fills its cap", f.file);
    }
    assert_eq!(manifest.files[6].counts["files"], 4);
    assert_eq!(
        build_cardiology_datasets(b.path(), &sizes).unwrap(),
        manifest
    );
}
