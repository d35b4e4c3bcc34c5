//! PEFT adapters and Hugging Face folders written by retune.
//!
//! - Adapters written by PEFT itself (`tests/fixtures/peft/`, made by `make_peft_fixture.py`)
//!   give PEFT's logits in retune, applied as a branch and merged (1e-4 absolute).
//! - An adapter written by retune (`smollm-tiny-retune-adapter/`) is what the current code
//!   writes, byte for byte, and PEFT loading it gives the logits retune computes.
//! - Save / load round trips, the written `adapter_config.json` against PEFT's, and bad input:
//!   every error names the file.
//! - `save_hf_folder`: the written folder loads back into the same model and tokenizer.

use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use retune_core::load::peft::{
    load_peft_adapter, save_peft_adapter, ADAPTER_CONFIG, ADAPTER_WEIGHTS,
};
use retune_core::load::save::{save_hf_folder, SaveDtype, HF_FOLDER_FILES};
use retune_core::load::{load_model, HostTensor};
use retune_core::model::{Batch, Lora, LoraSpec, Model, Target};
use retune_core::tokenizer::Tokenizer;
use retune_core::LlamaConfig;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

fn peft_fixture(name: &str) -> PathBuf {
    fixture("peft").join(name)
}

/// A safetensors file's tensors as (name, shape, f32 values), sorted by name.
fn read_tensors(path: &Path) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(name, v)| {
            let data = match v.dtype() {
                Dtype::F32 => v
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                    .collect(),
                Dtype::I64 => v
                    .data()
                    .chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f32)
                    .collect(),
                other => panic!("{name}: unexpected dtype {other:?}"),
            };
            (name, v.shape().to_vec(), data)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// `reference.safetensors` of an adapter fixture: the batch and PEFT's logits.
fn reference(dir: &Path) -> (Batch, Vec<f32>) {
    let t = read_tensors(&dir.join("reference.safetensors"));
    let get = |n: &str| t.iter().find(|x| x.0 == n).unwrap();
    let (_, shape, ids) = get("input_ids");
    let rows: Vec<Vec<u32>> = ids
        .chunks(shape[1])
        .map(|r| r.iter().map(|&i| i as u32).collect())
        .collect();
    (Batch::from_rows(&rows).unwrap(), get("logits").2.clone())
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).abs())
        .fold(0.0, f64::max)
}

/// Writes a safetensors file from (name, dtype, shape, bytes).
fn write_st(path: &Path, tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)]) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    let bytes = safetensors::serialize(views, None).unwrap();
    std::fs::write(path, bytes).unwrap();
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Copies an adapter folder's two files into a fresh temporary folder.
fn copy_adapter(src: &Path) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for f in [ADAPTER_CONFIG, ADAPTER_WEIGHTS] {
        std::fs::copy(src.join(f), dir.path().join(f)).unwrap();
    }
    dir
}

/// Rewrites an adapter's weights file, tensor by tensor.
fn rewrite_weights(
    dir: &Path,
    f: impl Fn(String, Vec<usize>, Vec<f32>) -> Vec<(String, Dtype, Vec<usize>, Vec<u8>)>,
) {
    let path = dir.join(ADAPTER_WEIGHTS);
    let tensors: Vec<_> = read_tensors(&path)
        .into_iter()
        .flat_map(|(n, s, d)| f(n, s, d))
        .collect();
    write_st(&path, &tensors);
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut Value)) {
    let path = dir.join(ADAPTER_CONFIG);
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

// ---------------------------------------------------------------------------------------------
// (a) Adapters written by PEFT give PEFT's logits.

/// Loads `adapter` onto the base `model_path`, compares unmerged and merged logits with PEFT's.
/// Returns (unmerged, merged) max abs differences.
fn check_against_peft(model_path: &Path, adapter: &Path, tol: f64) -> (f64, f64) {
    let mut model = Model::<f32>::load(model_path).unwrap();
    let lora = load_peft_adapter(adapter, &model.config).unwrap();
    let (batch, expected) = reference(adapter);
    let base = model.logits(&batch, None);
    let unmerged = model.logits(&batch, Some(&lora));
    lora.merge_into(&mut model.weights);
    let merged = model.logits(&batch, None);
    let (d_base, d_unmerged, d_merged) = (
        max_abs_diff(&base, &expected),
        max_abs_diff(&unmerged, &expected),
        max_abs_diff(&merged, &expected),
    );
    eprintln!(
        "{} on {}: max |logit - PEFT| unmerged {d_unmerged:.2e}, merged {d_merged:.2e} \
         (base without adapter: {d_base:.3})",
        adapter.file_name().unwrap().to_string_lossy(),
        model_path.display()
    );
    assert!(
        d_base > 0.5,
        "the adapter must change the logits ({d_base})"
    );
    assert!(
        d_unmerged < tol,
        "unmerged logits differ from PEFT by {d_unmerged}"
    );
    assert!(
        d_merged < tol,
        "merged logits differ from PEFT by {d_merged}"
    );
    (d_unmerged, d_merged)
}

#[test]
fn peft_adapter_all_targets_llama3_matches_peft_logits() {
    let adapter = peft_fixture("llama3-tiny-adapter");
    check_against_peft(&fixture("llama3-tiny"), &adapter, 1e-4);
    let lora = load_peft_adapter(
        &adapter,
        &Model::<f32>::load(&fixture("llama3-tiny")).unwrap().config,
    )
    .unwrap();
    assert_eq!(lora.spec.r, 4);
    assert_eq!(lora.spec.alpha, 8.0);
    assert!(!lora.spec.rslora);
    assert_eq!(lora.spec.targets, Target::ALL.to_vec());
}

#[test]
fn peft_adapter_rslora_subset_tied_smollm_matches_peft_logits() {
    let adapter = peft_fixture("smollm-tiny-rslora-adapter");
    check_against_peft(&fixture("smollm-tiny"), &adapter, 1e-4);
    // The same adapter on the GGUF copy of the base (q/k un-permuted to Hugging Face layout).
    check_against_peft(&fixture("smollm-tiny/model-f32.gguf"), &adapter, 1e-4);
    let cfg = Model::<f32>::load(&fixture("smollm-tiny")).unwrap().config;
    let lora = load_peft_adapter(&adapter, &cfg).unwrap();
    assert!(lora.spec.rslora);
    assert_eq!(
        lora.spec.targets,
        vec![Target::QProj, Target::VProj, Target::DownProj]
    );
    assert!((lora.spec.scale() - 16.0 / 8f64.sqrt()).abs() < 1e-12);
}

#[test]
fn adapter_name_segment_and_half_precision_are_accepted() {
    let src = peft_fixture("llama3-tiny-adapter");
    let cfg = Model::<f32>::load(&fixture("llama3-tiny")).unwrap().config;
    let original = load_peft_adapter(&src, &cfg).unwrap();

    // Keys as PEFT names parameters in memory: `lora_A.default.weight`.
    let dir = copy_adapter(&src);
    rewrite_weights(dir.path(), |n, s, d| {
        let n = n.replace(".weight", ".default.weight");
        vec![(n, Dtype::F32, s, f32_bytes(&d))]
    });
    assert_eq!(load_peft_adapter(dir.path(), &cfg).unwrap(), original);

    // BF16 and F16 tensors are converted exactly.
    for dtype in [Dtype::BF16, Dtype::F16] {
        let dir = copy_adapter(&src);
        rewrite_weights(dir.path(), |n, s, d| {
            let bytes = d
                .iter()
                .flat_map(|&x| match dtype {
                    Dtype::BF16 => half::bf16::from_f32(x).to_le_bytes(),
                    _ => half::f16::from_f32(x).to_le_bytes(),
                })
                .collect();
            vec![(n, dtype, s, bytes)]
        });
        let half = load_peft_adapter(dir.path(), &cfg).unwrap();
        let round = |x: f32| match dtype {
            Dtype::BF16 => half::bf16::from_f32(x).to_f32(),
            _ => half::f16::from_f32(x).to_f32(),
        };
        for (l_half, l_orig) in half.layers.iter().zip(&original.layers) {
            for (p, q) in l_half.pairs.iter().zip(&l_orig.pairs) {
                let (p, q) = (p.as_ref().unwrap(), q.as_ref().unwrap());
                assert!(p.a.iter().zip(&q.a).all(|(x, y)| *x == round(*y)));
                assert!(p.b.iter().zip(&q.b).all(|(x, y)| *x == round(*y)));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// (b) Round trip, and the written adapter_config.json against PEFT's.

#[test]
fn save_then_load_is_identical_and_config_has_pefts_fields() {
    let src = peft_fixture("llama3-tiny-adapter");
    let cfg = Model::<f32>::load(&fixture("llama3-tiny")).unwrap().config;
    let lora = load_peft_adapter(&src, &cfg).unwrap();
    let peft_cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join(ADAPTER_CONFIG)).unwrap()).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("adapter");
    let base_name = peft_cfg["base_model_name_or_path"].as_str().unwrap();
    save_peft_adapter(&out, &lora, &cfg, base_name).unwrap();
    let back = load_peft_adapter(&out, &cfg).unwrap();
    assert_eq!(back, lora, "tensors and spec survive a round trip");

    // Same tensors, names and shapes as PEFT's file (bitwise).
    assert_eq!(
        read_tensors(&out.join(ADAPTER_WEIGHTS)),
        read_tensors(&src.join(ADAPTER_WEIGHTS))
    );
    let bytes = std::fs::read(out.join(ADAPTER_WEIGHTS)).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(
        meta.metadata()
            .as_ref()
            .and_then(|m| m.get("format"))
            .map(String::as_str),
        Some("pt")
    );

    // Every key PEFT writes, with the same values (target_modules compared as a set).
    let ours: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join(ADAPTER_CONFIG)).unwrap()).unwrap();
    let (ours, theirs) = (ours.as_object().unwrap(), peft_cfg.as_object().unwrap());
    let keys = |m: &serde_json::Map<String, Value>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(ours), keys(theirs));
    for (k, v) in theirs {
        if k == "target_modules" {
            let set = |v: &Value| {
                let mut s: Vec<String> = serde_json::from_value(v.clone()).unwrap();
                s.sort();
                s
            };
            assert_eq!(set(&ours[k]), set(v));
        } else {
            assert_eq!(&ours[k], v, "field `{k}`");
        }
    }
    // No temporary file is left behind.
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, [ADAPTER_CONFIG, ADAPTER_WEIGHTS]);
}

#[test]
fn adapter_on_some_layers_writes_layers_to_transform() {
    let cfg = Model::<f32>::load(&fixture("smollm-tiny")).unwrap().config;
    let mut lora = retune_adapter(&cfg);
    lora.layers[1].pairs = Default::default();
    let dir = tempfile::tempdir().unwrap();
    save_peft_adapter(dir.path(), &lora, &cfg, "base").unwrap();
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join(ADAPTER_CONFIG)).unwrap())
            .unwrap();
    assert_eq!(json["layers_to_transform"], serde_json::json!([0, 2]));
    assert_eq!(load_peft_adapter(dir.path(), &cfg).unwrap(), lora);
}

// ---------------------------------------------------------------------------------------------
// (c) An adapter written by retune, loaded by PEFT.

/// The adapter retune wrote for `smollm-tiny-retune-adapter/`: r 2, alpha 5, all targets,
/// dropout 0.05 (inactive in evaluation), A from retune's PEFT-style init, B seeded random.
fn retune_adapter(cfg: &LlamaConfig) -> Lora<f32> {
    let model = Model::<f32>::load(&fixture("smollm-tiny")).unwrap();
    assert_eq!(&model.config, cfg);
    let spec = LoraSpec {
        r: 2,
        alpha: 5.0,
        dropout: 0.05,
        targets: Target::ALL.to_vec(),
        rslora: false,
    };
    let mut lora = Lora::init(spec, &model.weights, 7007).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7008);
    for layer in &mut lora.layers {
        for p in layer.pairs.iter_mut().flatten() {
            p.b.iter_mut()
                .for_each(|b| *b = rng.gen_range(-0.2f32..0.2));
        }
    }
    lora
}

/// The committed retune-written adapter is exactly what the current code writes. With
/// `RETUNE_WRITE_PEFT_FIXTURE=1` the test (re)writes it instead; then run
/// `make_peft_fixture.py` to have PEFT compute its reference logits.
#[test]
fn retune_written_adapter_fixture_is_current() {
    let cfg = Model::<f32>::load(&fixture("smollm-tiny")).unwrap().config;
    let lora = retune_adapter(&cfg);
    let committed = peft_fixture("smollm-tiny-retune-adapter");
    if std::env::var_os("RETUNE_WRITE_PEFT_FIXTURE").is_some() {
        save_peft_adapter(&committed, &lora, &cfg, "tests/fixtures/smollm-tiny").unwrap();
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    save_peft_adapter(dir.path(), &lora, &cfg, "tests/fixtures/smollm-tiny").unwrap();
    for f in [ADAPTER_CONFIG, ADAPTER_WEIGHTS] {
        let ours = std::fs::read(dir.path().join(f)).unwrap();
        let theirs = std::fs::read(committed.join(f)).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (write it with RETUNE_WRITE_PEFT_FIXTURE=1 cargo test -p retune-core \
                 --test peft retune_written, then run make_peft_fixture.py)",
                committed.display()
            )
        });
        assert!(
            ours == theirs,
            "{f}: retune now writes different bytes than the committed fixture; if intended, \
             regenerate it (see tests/fixtures/peft/README.md)"
        );
    }
}

/// PEFT (`PeftModel.from_pretrained`) on the adapter retune wrote gives retune's logits.
#[test]
fn peft_loads_retune_written_adapter_with_the_same_logits() {
    let adapter = peft_fixture("smollm-tiny-retune-adapter");
    check_against_peft(&fixture("smollm-tiny"), &adapter, 1e-4);
    let cfg = Model::<f32>::load(&fixture("smollm-tiny")).unwrap().config;
    assert_eq!(
        load_peft_adapter(&adapter, &cfg).unwrap(),
        retune_adapter(&cfg)
    );
}

// ---------------------------------------------------------------------------------------------
// (d) Bad input: a clear error naming the file.

fn load_err(dir: &Path, base: &str) -> String {
    let cfg = Model::<f32>::load(&fixture(base)).unwrap().config;
    load_peft_adapter(dir, &cfg).unwrap_err().to_string()
}

fn assert_names(err: &str, needles: &[&str]) {
    for n in needles {
        assert!(err.contains(n), "error should contain `{n}`: {err}");
    }
}

#[test]
fn wrong_peft_type_is_an_error_naming_the_config() {
    let dir = copy_adapter(&peft_fixture("llama3-tiny-adapter"));
    edit_config(dir.path(), |v| v["peft_type"] = "IA3".into());
    let err = load_err(dir.path(), "llama3-tiny");
    assert_names(&err, &[ADAPTER_CONFIG, "peft_type", "IA3"]);
}

#[test]
fn adapter_of_another_base_is_a_shape_error() {
    let adapter = peft_fixture("llama3-tiny-adapter");
    let err = load_err(&adapter, "smollm-tiny");
    assert_names(
        &err,
        &[
            ADAPTER_WEIGHTS,
            "was trained on a model with a different shape",
            "this base expects",
            &adapter.display().to_string(),
        ],
    );
    // A deeper adapter on a shallower base.
    let err = load_err(&peft_fixture("smollm-tiny-rslora-adapter"), "llama3-tiny");
    assert_names(&err, &[ADAPTER_WEIGHTS, "layer 2", "2 layers"]);
}

#[test]
fn unknown_key_is_an_error_naming_it() {
    let dir = copy_adapter(&peft_fixture("llama3-tiny-adapter"));
    rewrite_weights(dir.path(), |n, s, d| {
        let mut out = vec![(n.clone(), Dtype::F32, s.clone(), f32_bytes(&d))];
        if n.ends_with("layers.0.mlp.down_proj.lora_A.weight") {
            let head = "base_model.model.lm_head.lora_A.weight".to_string();
            out.push((head, Dtype::F32, vec![4, 64], f32_bytes(&[0.0; 256])));
        }
        out
    });
    let err = load_err(dir.path(), "llama3-tiny");
    assert_names(
        &err,
        &[ADAPTER_WEIGHTS, "base_model.model.lm_head.lora_A.weight"],
    );

    // Keys without PEFT's prefix: PEFT would ignore them silently; retune says so.
    let dir = copy_adapter(&peft_fixture("llama3-tiny-adapter"));
    rewrite_weights(dir.path(), |n, s, d| {
        let n = n.trim_start_matches("base_model.model.").to_string();
        vec![(n, Dtype::F32, s, f32_bytes(&d))]
    });
    let err = load_err(dir.path(), "llama3-tiny");
    assert_names(&err, &[ADAPTER_WEIGHTS, "model.layers.", "initial weights"]);
}

#[test]
fn missing_files_and_tensors_are_errors_naming_them() {
    let dir = copy_adapter(&peft_fixture("llama3-tiny-adapter"));
    std::fs::remove_file(dir.path().join(ADAPTER_WEIGHTS)).unwrap();
    assert_names(
        &load_err(dir.path(), "llama3-tiny"),
        &[ADAPTER_WEIGHTS, "missing"],
    );

    let dir = copy_adapter(&peft_fixture("llama3-tiny-adapter"));
    std::fs::remove_file(dir.path().join(ADAPTER_CONFIG)).unwrap();
    assert_names(
        &load_err(dir.path(), "llama3-tiny"),
        &[ADAPTER_CONFIG, "missing"],
    );

    let err = load_err(Path::new("/nonexistent/adapter"), "llama3-tiny");
    assert_names(&err, &["/nonexistent/adapter", "not a folder"]);

    // A listed (layer, target) without its tensors.
    let dir = copy_adapter(&peft_fixture("llama3-tiny-adapter"));
    let gone = "base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight";
    rewrite_weights(dir.path(), |n, s, d| {
        if n == gone {
            vec![]
        } else {
            vec![(n, Dtype::F32, s, f32_bytes(&d))]
        }
    });
    assert_names(
        &load_err(dir.path(), "llama3-tiny"),
        &[ADAPTER_WEIGHTS, gone],
    );

    // A target the config does not list.
    let dir = copy_adapter(&peft_fixture("llama3-tiny-adapter"));
    edit_config(dir.path(), |v| {
        v["target_modules"] = serde_json::json!(["q_proj", "v_proj"]);
    });
    assert_names(
        &load_err(dir.path(), "llama3-tiny"),
        &[ADAPTER_WEIGHTS, "does not list", ADAPTER_CONFIG],
    );

    // r in the config does not match the tensors.
    let dir = copy_adapter(&peft_fixture("llama3-tiny-adapter"));
    edit_config(dir.path(), |v| v["r"] = 8.into());
    assert_names(
        &load_err(dir.path(), "llama3-tiny"),
        &[ADAPTER_WEIGHTS, "r = 8"],
    );

    // Unsupported PEFT features.
    let dir = copy_adapter(&peft_fixture("llama3-tiny-adapter"));
    edit_config(dir.path(), |v| v["use_dora"] = true.into());
    assert_names(
        &load_err(dir.path(), "llama3-tiny"),
        &[ADAPTER_CONFIG, "DoRA"],
    );
}

// ---------------------------------------------------------------------------------------------
// save_hf_folder: the written folder is the same model and tokenizer.

/// The byte-level tokenizer of the tiny GGUF fixture (256 tokens: fits every tiny model).
fn tiny_tokenizer() -> Tokenizer {
    let mut tok = Tokenizer::from_gguf(&fixture("smollm-tiny/model-f32.gguf")).unwrap();
    tok.set_chat_template(
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{{ eos_token }}{% endfor %}",
        "test",
    );
    tok
}

fn tensors_of(path: &Path) -> Vec<(String, HostTensor)> {
    load_model(path).unwrap().tensors.into_iter().collect()
}

#[test]
fn hf_folder_round_trip_is_exact_for_every_tiny_model() {
    let tok = tiny_tokenizer();
    for name in ["llama3-tiny", "smollm-tiny", "qwen2-tiny", "mistral-tiny"] {
        let model = Model::<f32>::load(&fixture(name)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("merged");
        save_hf_folder(&out, &model.config, &model.weights, &tok, SaveDtype::F32).unwrap();

        let back = load_model(&out).unwrap();
        let mut expected = model.config.clone();
        expected.dtype = Some("float32".into());
        assert_eq!(back.config, expected, "{name}: config");
        assert_eq!(
            tensors_of(&out),
            tensors_of(&fixture(name)),
            "{name}: tensors"
        );
        assert_eq!(
            back.tensors.contains_key("lm_head.weight"),
            !model.config.tie_word_embeddings
        );
        let mut files: Vec<String> = std::fs::read_dir(&out)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        assert_eq!(
            files, HF_FOLDER_FILES,
            "{name}: exactly these files, no temporaries"
        );

        let tok_back = Tokenizer::from_hf_folder(&out).unwrap();
        let text = "Hello, heart! <b>\u{e9}\u{1F600}";
        assert_eq!(
            tok_back.encode(text, true).unwrap(),
            tok.encode(text, true).unwrap()
        );
        assert_eq!(tok_back.chat_template, tok.chat_template);
        assert_eq!(tok_back.bos_id, tok.bos_id);
        assert_eq!(tok_back.add_bos, tok.add_bos);
        assert_eq!(tok_back.eos_ids[0], tok.eos_ids[0]);
    }
}

#[test]
fn hf_folder_bf16_rounds_each_weight() {
    let model = Model::<f32>::load(&fixture("llama3-tiny")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    save_hf_folder(
        dir.path(),
        &model.config,
        &model.weights,
        &tiny_tokenizer(),
        SaveDtype::Bf16,
    )
    .unwrap();
    let back = load_model(dir.path()).unwrap();
    assert_eq!(back.config.dtype.as_deref(), Some("bfloat16"));
    assert!(back.stored_dtypes.values().all(|d| d == "BF16"));
    for (name, t) in load_model(&fixture("llama3-tiny")).unwrap().tensors {
        let rounded: Vec<f32> = t
            .data
            .iter()
            .map(|&x| half::bf16::from_f32(x).to_f32())
            .collect();
        assert_eq!(back.tensors[&name].data, rounded, "{name}");
    }
}

#[test]
fn hf_folder_refuses_a_folder_with_other_weights() {
    let model = Model::<f32>::load(&fixture("smollm-tiny")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let stale = dir.path().join("model-00001-of-00002.safetensors");
    std::fs::write(&stale, b"x").unwrap();
    let err = save_hf_folder(
        dir.path(),
        &model.config,
        &model.weights,
        &tiny_tokenizer(),
        SaveDtype::F32,
    )
    .unwrap_err()
    .to_string();
    assert_names(&err, &["model-00001-of-00002.safetensors", "empty folder"]);
    // Writing over a previous output is fine.
    let out = dir.path().join("again");
    for _ in 0..2 {
        save_hf_folder(
            &out,
            &model.config,
            &model.weights,
            &tiny_tokenizer(),
            SaveDtype::F32,
        )
        .unwrap();
    }
}

/// The `tokenizer.json` written for a tokenizer rebuilt from GGUF metadata encodes, in Hugging
/// Face `tokenizers` (what transformers runs, special tokens on), exactly as retune (llama.cpp)
/// does, BOS included where the model wants it: on llama.cpp's golden inputs.
#[test]
fn saved_tokenizer_json_encodes_like_retune_in_hf_tokenizers() {
    let vocabs = retune_assets::fetch(retune_assets::Asset::LlamaCppVocabs).unwrap();
    let smollm2 = retune_assets::fetch(retune_assets::Asset::SmolLm2Gguf).unwrap();
    let cases = [
        ("llama-bpe", vocabs.join("ggml-vocab-llama-bpe.gguf"), true),
        ("llama-spm", vocabs.join("ggml-vocab-llama-spm.gguf"), true),
        ("qwen2", vocabs.join("ggml-vocab-qwen2.gguf"), false),
        ("smollm2", smollm2, false),
    ];
    let inputs = std::fs::read_to_string(vocabs.join("ggml-vocab-llama-bpe.gguf.inp")).unwrap();
    let mut texts: Vec<&str> = inputs
        .split("\n__ggml_vocab_test__\n")
        .filter(|t| !t.is_empty())
        .collect();
    texts.push("<|im_start|>user\nHi<|im_end|>");
    for (name, path, add_bos) in cases {
        let tok = Tokenizer::from_gguf(&path).unwrap();
        assert_eq!(tok.add_bos, add_bos, "{name}");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tokenizer.json");
        tok.save_tokenizer_json(&file).unwrap();
        let hf = tokenizers::Tokenizer::from_file(&file).unwrap();
        for text in &texts {
            let ours = tok.encode(text, true).unwrap();
            let theirs = hf.encode(*text, true).unwrap().get_ids().to_vec();
            assert_eq!(theirs, ours, "{name}: {text:?}");
        }
    }
}
