//! End-to-end tests of the model loaders: tiny synthetic Hugging Face folders and GGUF files
//! written here, the real SmolLM2-135M-Instruct GGUF, the PyTorch-made fixtures under
//! `tests/fixtures/` (when present), and bad input, where every error must name the file and the
//! problem.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use retune_core::config::{LlamaConfig, RopeScaling};
use retune_core::load::{inspect_model, load_model, HostTensor, ModelFormat};
use retune_core::Error;
use safetensors::Dtype;

// ---------------------------------------------------------------------------------------------
// Test support: tiny models written in Rust.

/// A small Llama: 2 layers, width 64, 4 heads, 2 KV heads (GQA), head_dim 16.
fn tiny_config() -> LlamaConfig {
    LlamaConfig {
        architecture: "LlamaForCausalLM".into(),
        model_type: "llama".into(),
        vocab_size: 96,
        hidden_size: 64,
        intermediate_size: 128,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 16,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        rope_scaling: None,
        max_position_embeddings: 256,
        tie_word_embeddings: false,
        qkv_bias: false,
        o_bias: false,
        mlp_bias: false,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
        dtype: Some("float32".into()),
        sliding_window: None,
    }
}

/// The `config.json` transformers 4.x would write for `cfg`.
fn hf_config_json(cfg: &LlamaConfig) -> serde_json::Value {
    let mut v = serde_json::json!({
        "architectures": [cfg.architecture],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": null,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_ids.first(),
        "torch_dtype": cfg.dtype,
    });
    if cfg.model_type == "llama" {
        v["attention_bias"] = serde_json::json!(cfg.qkv_bias);
        v["mlp_bias"] = serde_json::json!(cfg.mlp_bias);
    }
    v
}

/// Random weights for every tensor of `cfg`, in Hugging Face layout.
fn random_tensors(cfg: &LlamaConfig, seed: u64) -> BTreeMap<String, HostTensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    cfg.tensor_shapes()
        .into_iter()
        .map(|(name, shape)| {
            let n = shape.iter().product();
            let data = (0..n).map(|_| rng.gen_range(-0.5f32..0.5)).collect();
            (name, HostTensor { shape, data })
        })
        .collect()
}

fn to_bytes(data: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::F32 => data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Dtype::F16 => data
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect(),
        Dtype::BF16 => data
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect(),
        other => panic!("test writer does not do {other:?}"),
    }
}

/// Tensors as a safetensors file stores them: name -> (dtype, shape, little-endian bytes).
type Stored = BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>;

/// Writes safetensors `file` holding `tensors` (name -> (dtype, shape, bytes)).
fn write_safetensors(file: &Path, tensors: &Stored) {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(n, (d, s, b))| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, None, file).unwrap();
}

/// Writes a Hugging Face folder for `cfg` with random weights stored as `dtype`, in `shards`
/// files (1: `model.safetensors`; more: an index and `model-0000i-of-0000n.safetensors`).
/// Returns the weights as f32 (after rounding to `dtype`).
fn write_tiny_hf_model_with(
    dir: &Path,
    cfg: &LlamaConfig,
    seed: u64,
    dtype: Dtype,
    shards: usize,
) -> BTreeMap<String, HostTensor> {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), hf_config_json(cfg).to_string()).unwrap();
    let mut tensors = random_tensors(cfg, seed);
    let mut stored: Vec<Stored> = vec![BTreeMap::new(); shards];
    let mut weight_map = serde_json::Map::new();
    for (i, (name, t)) in tensors.iter_mut().enumerate() {
        let bytes = to_bytes(&t.data, dtype);
        // What the loader must give back: the stored value, widened.
        t.data = match dtype {
            Dtype::F32 => t.data.clone(),
            Dtype::F16 => t
                .data
                .iter()
                .map(|&v| half::f16::from_f32(v).to_f32())
                .collect(),
            _ => t
                .data
                .iter()
                .map(|&v| half::bf16::from_f32(v).to_f32())
                .collect(),
        };
        let shard = i % shards;
        weight_map.insert(
            name.clone(),
            format!("model-{:05}-of-{shards:05}.safetensors", shard + 1).into(),
        );
        stored[shard].insert(name.clone(), (dtype, t.shape.clone(), bytes));
    }
    if shards == 1 {
        write_safetensors(&dir.join("model.safetensors"), &stored[0]);
    } else {
        for (i, s) in stored.iter().enumerate() {
            write_safetensors(
                &dir.join(format!("model-{:05}-of-{shards:05}.safetensors", i + 1)),
                s,
            );
        }
        let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    }
    tensors
}

/// Writes a Hugging Face folder for `cfg` (F32, one file) and returns its weights.
pub fn write_tiny_hf_model(
    dir: &Path,
    cfg: &LlamaConfig,
    seed: u64,
) -> BTreeMap<String, HostTensor> {
    write_tiny_hf_model_with(dir, cfg, seed, Dtype::F32, 1)
}

/// llama.cpp's convert permutation of Q/K rows, written out (as in convert_hf_to_gguf.py):
/// `w.reshape(n_head, 2, rows / n_head / 2, cols).swapaxes(1, 2).reshape(rows, cols)`.
fn llama_cpp_permute(t: &HostTensor, n_head: usize) -> Vec<f32> {
    let rows = t.shape[0];
    let cols = t.shape.get(1).copied().unwrap_or(1);
    let half = rows / n_head / 2;
    let mut out = vec![0.0; t.data.len()];
    for h in 0..n_head {
        for i in 0..2 {
            for j in 0..half {
                let src = ((h * 2 + i) * half + j) * cols;
                let dst = ((h * half + j) * 2 + i) * cols;
                out[dst..dst + cols].copy_from_slice(&t.data[src..src + cols]);
            }
        }
    }
    out
}

/// Writes `tensors` (HF names and layout) as a llama-architecture GGUF the way llama.cpp's
/// converter does: GGUF names, Q/K rows permuted, matrices as `matrix_dtype`, norms F32.
fn write_tiny_gguf(
    file: &Path,
    cfg: &LlamaConfig,
    tensors: &BTreeMap<String, HostTensor>,
    matrix_dtype: GgmlDType,
) {
    let mut qtensors = Vec::new();
    for (hf, t) in tensors {
        let gguf = retune_core::load::gguf::gguf_name(hf).unwrap();
        let data = if hf.contains("q_proj") {
            llama_cpp_permute(t, cfg.num_attention_heads)
        } else if hf.contains("k_proj") {
            llama_cpp_permute(t, cfg.num_key_value_heads)
        } else {
            t.data.clone()
        };
        let x = Tensor::from_vec(data, t.shape.clone(), &Device::Cpu).unwrap();
        let dtype = if t.shape.len() == 2 {
            matrix_dtype
        } else {
            GgmlDType::F32
        };
        qtensors.push((gguf, QTensor::quantize(&x, dtype).unwrap()));
    }
    let u32v = |x: usize| gguf_file::Value::U32(x as u32);
    let metadata = vec![
        (
            "general.architecture",
            gguf_file::Value::String("llama".into()),
        ),
        ("llama.context_length", u32v(cfg.max_position_embeddings)),
        ("llama.embedding_length", u32v(cfg.hidden_size)),
        ("llama.block_count", u32v(cfg.num_hidden_layers)),
        ("llama.feed_forward_length", u32v(cfg.intermediate_size)),
        ("llama.attention.head_count", u32v(cfg.num_attention_heads)),
        (
            "llama.attention.head_count_kv",
            u32v(cfg.num_key_value_heads),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon",
            gguf_file::Value::F32(cfg.rms_norm_eps as f32),
        ),
        (
            "llama.rope.freq_base",
            gguf_file::Value::F32(cfg.rope_theta as f32),
        ),
        ("llama.rope.dimension_count", u32v(cfg.head_dim)),
        ("llama.vocab_size", u32v(cfg.vocab_size)),
        ("tokenizer.ggml.bos_token_id", u32v(1)),
        ("tokenizer.ggml.eos_token_id", u32v(2)),
    ];
    let md: Vec<(&str, &gguf_file::Value)> = metadata.iter().map(|(k, v)| (*k, v)).collect();
    let ts: Vec<(&str, &QTensor)> = qtensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::fs::File::create(file).unwrap();
    gguf_file::write(&mut f, &md, &ts).unwrap();
}

/// Asserts `err` is the given kind and its message names `file` and contains every `needle`.
fn assert_err(err: Error, file: &Path, needles: &[&str]) {
    let msg = err.to_string();
    assert!(
        msg.contains(&file.display().to_string()),
        "message should name {}: {msg}",
        file.display()
    );
    for n in needles {
        assert!(msg.contains(n), "message should contain {n:?}: {msg}");
    }
}

fn max_abs(xs: &[f32]) -> f32 {
    xs.iter().fold(0.0, |m, x| m.max(x.abs()))
}

// ---------------------------------------------------------------------------------------------
// Hugging Face folders.

#[test]
fn hf_folder_f32_round_trips_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config();
    let written = write_tiny_hf_model(dir.path(), &cfg, 7);
    let m = load_model(dir.path()).unwrap();
    assert_eq!(m.config, cfg);
    assert_eq!(m.format, ModelFormat::HfFolder);
    assert_eq!(m.files, vec![dir.path().join("model.safetensors")]);
    assert_eq!(m.tensors, written);
    assert_eq!(m.stored_dtypes.len(), cfg.tensor_shapes().len());
    assert!(m.stored_dtypes.values().all(|d| d == "F32"));

    let s = inspect_model(dir.path()).unwrap();
    assert_eq!(
        (s.config, s.format, s.files, s.stored_dtypes),
        (cfg.clone(), m.format, m.files, m.stored_dtypes)
    );
    assert_eq!(
        s.file_bytes,
        std::fs::metadata(dir.path().join("model.safetensors"))
            .unwrap()
            .len()
    );
    assert!(s.file_bytes > 4 * cfg.param_count() as u64);
}

#[test]
fn hf_folder_sharded_bf16_and_f16() {
    let mut cfg = tiny_config();
    cfg.architecture = "Qwen2ForCausalLM".into();
    cfg.model_type = "qwen2".into();
    cfg.qkv_bias = true;
    cfg.max_position_embeddings = 32768;
    for (dtype, name) in [(Dtype::BF16, "BF16"), (Dtype::F16, "F16")] {
        let dir = tempfile::tempdir().unwrap();
        let written = write_tiny_hf_model_with(dir.path(), &cfg, 3, dtype, 3);
        let m = load_model(dir.path()).unwrap();
        assert!(m.config.qkv_bias && !m.config.o_bias);
        assert!(m
            .tensors
            .contains_key("model.layers.1.self_attn.k_proj.bias"));
        assert_eq!(m.tensors, written, "{name}: stored values widened exactly");
        assert_eq!(m.files.len(), 3);
        assert!(m.files.iter().all(|f| f.starts_with(dir.path())));
        assert!(m.stored_dtypes.values().all(|d| d == name));
    }
}

#[test]
fn hf_tied_checkpoint_ignores_lm_head_and_reads_generation_config() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tiny_config();
    cfg.tie_word_embeddings = true;
    // The checkpoint carries an lm_head (as some exports do) and a rotary buffer: both ignored.
    let untied = LlamaConfig {
        tie_word_embeddings: false,
        ..cfg.clone()
    };
    let mut written = write_tiny_hf_model(dir.path(), &untied, 5);
    let mut st: Stored = written
        .iter()
        .map(|(n, t)| {
            (
                n.clone(),
                (Dtype::F32, t.shape.clone(), to_bytes(&t.data, Dtype::F32)),
            )
        })
        .collect();
    st.insert(
        "model.rotary_emb.inv_freq".into(),
        (Dtype::F32, vec![8], vec![0; 32]),
    );
    write_safetensors(&dir.path().join("model.safetensors"), &st);
    std::fs::write(
        dir.path().join("config.json"),
        hf_config_json(&cfg).to_string(),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("generation_config.json"),
        r#"{"bos_token_id": 1, "eos_token_id": [2, 5]}"#,
    )
    .unwrap();

    let m = load_model(dir.path()).unwrap();
    assert!(m.config.tie_word_embeddings);
    assert_eq!(m.config.eos_token_ids, vec![2, 5]);
    written.remove("lm_head.weight");
    assert_eq!(m.tensors, written);
    assert!(!m.stored_dtypes.contains_key("lm_head.weight"));
}

#[test]
fn missing_folder_and_missing_config() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-model");
    assert_err(
        load_model(&missing).unwrap_err(),
        &missing,
        &["No such file"],
    );
    let err = load_model(dir.path()).unwrap_err();
    assert_err(err, &dir.path().join("config.json"), &["missing"]);
    // A config but no weights.
    std::fs::write(
        dir.path().join("config.json"),
        hf_config_json(&tiny_config()).to_string(),
    )
    .unwrap();
    assert_err(
        inspect_model(dir.path()).unwrap_err(),
        dir.path(),
        &["model.safetensors"],
    );
    // A file that is neither.
    let txt = dir.path().join("notes.txt");
    std::fs::write(&txt, "hello").unwrap();
    assert_err(load_model(&txt).unwrap_err(), &txt, &["not a model"]);
}

/// Writes a tiny model, then replaces config.json with `edit` applied to it.
fn folder_with_config(edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config();
    write_tiny_hf_model(dir.path(), &cfg, 1);
    let mut json = hf_config_json(&cfg);
    edit(&mut json);
    std::fs::write(dir.path().join("config.json"), json.to_string()).unwrap();
    dir
}

#[test]
fn unsupported_architecture_is_named() {
    let dir = folder_with_config(|j| {
        j["architectures"] = serde_json::json!(["GPT2LMHeadModel"]);
        j["model_type"] = serde_json::json!("gpt2");
    });
    let err = load_model(dir.path()).unwrap_err();
    assert!(matches!(err, Error::Unsupported { .. }), "{err}");
    assert_err(
        err,
        &dir.path().join("config.json"),
        &[
            "GPT2LMHeadModel",
            "LlamaForCausalLM",
            "MistralForCausalLM",
            "Qwen2ForCausalLM",
        ],
    );
}

#[test]
fn missing_required_field_is_named() {
    let dir = folder_with_config(|j| {
        j.as_object_mut().unwrap().remove("hidden_size");
    });
    let err = load_model(dir.path()).unwrap_err();
    assert!(matches!(err, Error::Format { .. }), "{err}");
    assert_err(
        err,
        &dir.path().join("config.json"),
        &["missing required field `hidden_size`"],
    );
}

#[test]
fn yarn_rope_is_unsupported() {
    let dir = folder_with_config(|j| {
        j["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0,
            "original_max_position_embeddings": 4096});
    });
    let err = inspect_model(dir.path()).unwrap_err();
    assert!(matches!(err, Error::Unsupported { .. }), "{err}");
    assert_err(
        err,
        &dir.path().join("config.json"),
        &["unsupported", "`yarn`"],
    );
}

#[test]
fn truncated_safetensors_is_a_format_error() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_hf_model(dir.path(), &tiny_config(), 2);
    let file = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    for cut in [bytes.len() / 2, 4, 0] {
        std::fs::write(&file, &bytes[..cut]).unwrap();
        let err = load_model(dir.path()).unwrap_err();
        assert!(matches!(err, Error::Format { .. }), "{err}");
        assert_err(err, &file, &["truncated or not a safetensors file"]);
    }
    std::fs::write(&file, b"this is not a safetensors file at all").unwrap();
    assert_err(
        load_model(dir.path()).unwrap_err(),
        &file,
        &["truncated or not a safetensors file"],
    );
}

#[test]
fn wrong_shape_missing_tensor_and_bad_dtype() {
    let cfg = tiny_config();
    let rewrite = |edit: &dyn Fn(&mut Stored)| {
        let dir = tempfile::tempdir().unwrap();
        let written = write_tiny_hf_model(dir.path(), &cfg, 4);
        let mut st: BTreeMap<_, _> = written
            .iter()
            .map(|(n, t)| {
                (
                    n.clone(),
                    (Dtype::F32, t.shape.clone(), to_bytes(&t.data, Dtype::F32)),
                )
            })
            .collect();
        edit(&mut st);
        write_safetensors(&dir.path().join("model.safetensors"), &st);
        dir
    };
    let name = "model.layers.1.self_attn.k_proj.weight";

    // Transposed k_proj: [64, 32] instead of [32, 64].
    let dir = rewrite(&|st| st.get_mut(name).unwrap().1 = vec![64, 32]);
    let err = load_model(dir.path()).unwrap_err();
    match &err {
        Error::Shape {
            name: n,
            got,
            expected,
            ..
        } => {
            assert_eq!(
                (n.as_str(), got.clone(), expected.clone()),
                (name, vec![64, 32], vec![32, 64])
            )
        }
        other => panic!("expected a shape error, got {other}"),
    }
    assert_err(
        err,
        &dir.path().join("model.safetensors"),
        &[name, "[64, 32]", "[32, 64]"],
    );

    let dir = rewrite(&|st| {
        st.remove("model.layers.0.mlp.up_proj.weight");
    });
    assert_err(
        load_model(dir.path()).unwrap_err(),
        &dir.path().join("model.safetensors"),
        &["missing tensor `model.layers.0.mlp.up_proj.weight`"],
    );

    let dir = rewrite(&|st| {
        let t = st.get_mut("model.norm.weight").unwrap();
        *t = (Dtype::I64, vec![64], vec![0; 64 * 8]);
    });
    let err = load_model(dir.path()).unwrap_err();
    assert!(matches!(err, Error::Format { .. }), "{err}");
    assert_err(
        err,
        &dir.path().join("model.safetensors"),
        &["model.norm.weight", "I64"],
    );
}

// ---------------------------------------------------------------------------------------------
// GGUF written here (llama.cpp layout) against the same weights as an HF folder.

#[test]
fn gguf_f32_equals_hf_exactly_after_unpermuting() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config();
    let written = write_tiny_hf_model(&dir.path().join("hf"), &cfg, 11);
    let file = dir.path().join("tiny.gguf");
    write_tiny_gguf(&file, &cfg, &written, GgmlDType::F32);
    let m = load_model(&file).unwrap();
    assert_eq!(m.format, ModelFormat::Gguf);
    assert_eq!(m.files, vec![file.clone()]);
    let expected = LlamaConfig {
        dtype: None,
        ..cfg.clone()
    };
    assert_eq!(m.config, expected);
    assert_eq!(
        m.tensors, written,
        "every tensor, q/k included, equals the HF original"
    );
    // Without the un-permutation q and k would differ: make sure the test can tell.
    let q = &written["model.layers.0.self_attn.q_proj.weight"];
    assert_ne!(llama_cpp_permute(q, cfg.num_attention_heads), q.data);
}

#[test]
fn gguf_q8_0_and_f16_are_close_to_hf() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = tiny_config();
    cfg.tie_word_embeddings = true;
    let written = write_tiny_hf_model(&dir.path().join("hf"), &cfg, 12);
    for (dtype, name) in [
        (GgmlDType::Q8_0, "Q8_0"),
        (GgmlDType::F16, "F16"),
        (GgmlDType::Q4_1, "Q4_1"),
    ] {
        let file = dir.path().join(format!("tiny-{name}.gguf"));
        write_tiny_gguf(&file, &cfg, &written, dtype);
        let m = load_model(&file).unwrap();
        assert!(m.config.tie_word_embeddings);
        assert!(!m.tensors.contains_key("lm_head.weight"));
        assert_eq!(m.stored_dtypes["model.layers.1.mlp.down_proj.weight"], name);
        assert_eq!(m.stored_dtypes["model.norm.weight"], "F32");
        let tol = match dtype {
            GgmlDType::Q8_0 => 0.01,
            GgmlDType::F16 => 1e-3,
            _ => 0.1,
        };
        for (n, w) in &written {
            let got = &m.tensors[n];
            assert_eq!(got.shape, w.shape);
            let err = got
                .data
                .iter()
                .zip(&w.data)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(
                err <= tol * max_abs(&w.data),
                "{name} {n}: max abs err {err}"
            );
        }
    }
}

#[test]
fn gguf_bad_magic_truncation_and_unknown_type() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.gguf");
    std::fs::write(&bad, b"GGML\x01\x00\x00\x00 and then some bytes").unwrap();
    let err = load_model(&bad).unwrap_err();
    assert!(matches!(err, Error::Format { .. }), "{err}");
    assert_err(err, &bad, &["not a GGUF file"]);
    std::fs::write(&bad, b"").unwrap();
    assert_err(inspect_model(&bad).unwrap_err(), &bad, &["not a GGUF file"]);

    // Valid header, tensor data cut short.
    let cfg = tiny_config();
    let written = write_tiny_hf_model(&dir.path().join("hf"), &cfg, 13);
    let full = dir.path().join("full.gguf");
    write_tiny_gguf(&full, &cfg, &written, GgmlDType::Q8_0);
    let bytes = std::fs::read(&full).unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    for err in [
        load_model(&cut).unwrap_err(),
        inspect_model(&cut).unwrap_err(),
    ] {
        assert!(matches!(err, Error::Format { .. }), "{err}");
        assert_err(err, &cut, &["truncated: tensor `", "but the file has"]);
    }
    // Cut inside the header.
    std::fs::write(&cut, &bytes[..200]).unwrap();
    assert_err(
        load_model(&cut).unwrap_err(),
        &cut,
        &["truncated or corrupt GGUF header"],
    );

    // A tensor type id candle does not know (IQ2_XXS = 16): unsupported, not a panic.
    let mut raw = Vec::new();
    raw.extend(b"GGUF");
    raw.extend(3u32.to_le_bytes());
    raw.extend(1u64.to_le_bytes()); // tensors
    raw.extend(1u64.to_le_bytes()); // metadata entries
    let string = |raw: &mut Vec<u8>, s: &str| {
        raw.extend((s.len() as u64).to_le_bytes());
        raw.extend(s.as_bytes());
    };
    string(&mut raw, "general.architecture");
    raw.extend(8u32.to_le_bytes());
    string(&mut raw, "llama");
    string(&mut raw, "token_embd.weight");
    raw.extend(2u32.to_le_bytes());
    raw.extend(256u64.to_le_bytes());
    raw.extend(4u64.to_le_bytes());
    raw.extend(16u32.to_le_bytes());
    raw.extend(0u64.to_le_bytes());
    raw.resize(raw.len().div_ceil(32) * 32 + 4096, 0);
    let iq = dir.path().join("iq.gguf");
    std::fs::write(&iq, &raw).unwrap();
    let err = load_model(&iq).unwrap_err();
    assert!(matches!(err, Error::Unsupported { .. }), "{err}");
    assert_err(err, &iq, &["tensor type", "16"]);

    // GGUF v1: unsupported, named.
    raw[4..8].copy_from_slice(&1u32.to_le_bytes());
    std::fs::write(&iq, &raw).unwrap();
    assert_err(
        load_model(&iq).unwrap_err(),
        &iq,
        &["unsupported", "GGUF version 1"],
    );

    // `general.alignment = 0` makes candle's parser divide by zero: an error, not a panic.
    let mut raw = Vec::new();
    raw.extend(b"GGUF");
    raw.extend(3u32.to_le_bytes());
    raw.extend(0u64.to_le_bytes());
    raw.extend(1u64.to_le_bytes());
    string(&mut raw, "general.alignment");
    raw.extend(4u32.to_le_bytes());
    raw.extend(0u32.to_le_bytes());
    let zero = dir.path().join("zero-alignment.gguf");
    std::fs::write(&zero, &raw).unwrap();
    assert_err(
        load_model(&zero).unwrap_err(),
        &zero,
        &["corrupt GGUF header"],
    );
}

// ---------------------------------------------------------------------------------------------
// The real model.

fn smollm2() -> PathBuf {
    retune_assets::fetch(retune_assets::Asset::SmolLm2Gguf)
        .expect("fetch SmolLM2-135M-Instruct GGUF")
}

#[test]
fn smollm2_gguf_loads_with_the_published_shape() {
    let path = smollm2();
    let t0 = Instant::now();
    let s = inspect_model(&path).unwrap();
    let inspect_s = t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    let m = load_model(&path).unwrap();
    eprintln!(
        "SmolLM2 Q4_1 GGUF: inspect {inspect_s:.3} s, load (dequantise to f32) {:.3} s",
        t0.elapsed().as_secs_f64()
    );

    let c = &m.config;
    assert_eq!(c.param_count(), 134_515_008);
    assert_eq!(
        (
            c.num_hidden_layers,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim
        ),
        (30, 9, 3, 64)
    );
    assert_eq!(
        (c.hidden_size, c.intermediate_size, c.vocab_size),
        (576, 1536, 49152)
    );
    assert_eq!(
        (c.rope_theta, c.rms_norm_eps, c.max_position_embeddings),
        (100000.0, 1e-5, 8192)
    );
    assert!(c.tie_word_embeddings && c.rope_scaling.is_none());
    assert!(!c.qkv_bias && !c.o_bias && !c.mlp_bias);
    assert_eq!(
        (c.architecture.as_str(), c.model_type.as_str()),
        ("LlamaForCausalLM", "llama")
    );
    assert_eq!((c.bos_token_id, c.eos_token_ids[0]), (Some(1), 2));

    assert_eq!(m.format, ModelFormat::Gguf);
    assert_eq!(m.files, vec![path.clone()]);
    assert_eq!(m.tensors.len(), 272);
    for (name, shape) in c.tensor_shapes() {
        let t = &m.tensors[&name];
        assert_eq!(t.shape, shape, "{name}");
        assert_eq!(t.data.len(), t.numel(), "{name}");
        let expected = match () {
            _ if name == "model.embed_tokens.weight" => "Q8_0",
            _ if shape.len() == 1 => "F32",
            _ => "Q4_1",
        };
        assert_eq!(m.stored_dtypes[&name], expected, "{name}");
    }
    assert_eq!(
        m.stored_dtypes.values().filter(|d| *d == "Q4_1").count(),
        210
    );
    assert_eq!(m.stored_dtypes.values().filter(|d| *d == "F32").count(), 61);
    // Sanity on values: finite, and norms (gains around 1) unlike matrices.
    assert!(m
        .tensors
        .values()
        .all(|t| t.data.iter().all(|x| x.is_finite())));
    let norm = &m.tensors["model.norm.weight"].data;
    assert!(norm.iter().sum::<f32>() / norm.len() as f32 > 0.1);

    assert_eq!(s.config, m.config);
    assert_eq!(s.stored_dtypes, m.stored_dtypes);
    assert_eq!(s.file_bytes, 98_362_432);
}

#[test]
fn smollm2_gguf_truncated_to_1mb() {
    let path = smollm2();
    let bytes = std::fs::read(&path).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cut = dir.path().join("SmolLM2-cut.gguf");
    std::fs::write(&cut, &bytes[..1 << 20]).unwrap();
    for err in [
        load_model(&cut).unwrap_err(),
        inspect_model(&cut).unwrap_err(),
    ] {
        assert!(matches!(err, Error::Format { .. }), "{err}");
        assert_err(err, &cut, &["truncated"]);
    }
    // Header intact, data cut: 90% of the file.
    std::fs::write(&cut, &bytes[..bytes.len() / 10 * 9]).unwrap();
    assert_err(
        load_model(&cut).unwrap_err(),
        &cut,
        &["truncated: tensor `"],
    );
}

#[test]
fn llama3_rope_scaling_from_config_reaches_the_loaded_model() {
    let dir = folder_with_config(|j| {
        j["rope_scaling"] = serde_json::json!({"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192});
    });
    let m = load_model(dir.path()).unwrap();
    assert_eq!(
        m.config.rope_scaling,
        Some(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192
        })
    );
}

// ---------------------------------------------------------------------------------------------
// PyTorch-made fixtures (tests/fixtures/README.md): HF folders saved by transformers, GGUF
// copies written with the gguf package and llama.cpp's Q/K permutation.

fn fixture(path: &str) -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures")).join(path)
}

/// Parameter names transformers reports for a fixture: its reference gradients' names.
fn reference_parameter_names(folder: &str) -> Vec<String> {
    let bytes = std::fs::read(fixture(folder).join("reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st
        .names()
        .into_iter()
        .filter_map(|n| n.strip_prefix("grad."))
        .map(str::to_string)
        .collect();
    names.sort();
    names
}

#[test]
fn fixture_hf_folders_load_as_transformers_sees_them() {
    for folder in ["llama3-tiny", "qwen2-tiny", "smollm-tiny", "mistral-tiny"] {
        let dir = fixture(folder);
        let m = load_model(&dir).unwrap_or_else(|e| panic!("{folder}: {e}"));
        let c = &m.config;
        // The tensor set is exactly transformers' parameter set.
        assert_eq!(
            m.tensors.keys().cloned().collect::<Vec<_>>(),
            reference_parameter_names(folder),
            "{folder}"
        );
        assert_eq!(
            (
                c.vocab_size,
                c.hidden_size,
                c.head_dim,
                c.max_position_embeddings
            ),
            (256, 64, 16, 128),
            "{folder}"
        );
        assert_eq!(
            (c.bos_token_id, c.eos_token_ids.clone()),
            (Some(1), vec![2]),
            "{folder}"
        );
        assert_eq!(c.num_attention_heads, 4, "{folder}");
        let stored = if folder == "mistral-tiny" {
            "BF16"
        } else {
            "F32"
        };
        assert!(m.stored_dtypes.values().all(|d| d == stored), "{folder}");
        match folder {
            "llama3-tiny" => {
                assert_eq!(
                    (c.intermediate_size, c.num_key_value_heads, c.rope_theta),
                    (160, 2, 500000.0)
                );
                assert_eq!(
                    c.rope_scaling,
                    Some(RopeScaling::Llama3 {
                        factor: 8.0,
                        low_freq_factor: 1.0,
                        high_freq_factor: 4.0,
                        original_max_position_embeddings: 64
                    })
                );
                assert!(!c.tie_word_embeddings);
            }
            "qwen2-tiny" => {
                assert_eq!(
                    (c.architecture.as_str(), c.model_type.as_str()),
                    ("Qwen2ForCausalLM", "qwen2")
                );
                assert_eq!(
                    (c.qkv_bias, c.o_bias, c.rms_norm_eps, c.rope_theta),
                    (true, false, 1e-6, 10000.0)
                );
                assert_eq!(
                    (c.dtype.as_deref(), c.sliding_window),
                    (Some("float32"), None)
                );
            }
            "smollm-tiny" => {
                assert!(c.tie_word_embeddings && !m.tensors.contains_key("lm_head.weight"));
                assert_eq!(
                    (c.num_hidden_layers, c.num_key_value_heads, c.rope_theta),
                    (3, 1, 100000.0)
                );
            }
            _ => {
                assert_eq!(
                    (c.architecture.as_str(), c.num_key_value_heads),
                    ("MistralForCausalLM", 1)
                );
                assert_eq!(
                    (c.dtype.as_deref(), c.sliding_window),
                    (Some("bfloat16"), None)
                );
                assert_eq!(m.files.len(), 3);
            }
        }
        let s = inspect_model(&dir).unwrap();
        assert_eq!(
            (&s.config, &s.stored_dtypes, &s.files),
            (&m.config, &m.stored_dtypes, &m.files),
            "{folder}"
        );
    }
}

/// Each GGUF fixture equals its folder's safetensors: this is what proves the Q/K un-permutation
/// (and the llama3 `rope_freqs` recovery) against files written by llama.cpp's own Python tools.
#[test]
fn fixture_ggufs_equal_their_hf_folders() {
    for (folder, file, stored) in [
        ("smollm-tiny", "model-f32.gguf", "F32"),
        ("smollm-tiny", "model-q8_0.gguf", "Q8_0"),
        ("llama3-tiny", "model-f16.gguf", "F16"),
    ] {
        let hf = load_model(&fixture(folder)).unwrap();
        let path = fixture(folder).join(file);
        let gg = load_model(&path).unwrap_or_else(|e| panic!("{file}: {e}"));
        let what = format!("{folder}/{file}");
        assert_eq!(gg.format, ModelFormat::Gguf);
        let expected_config = LlamaConfig {
            dtype: Some(stored.to_string()),
            ..hf.config.clone()
        };
        assert_eq!(gg.config, expected_config, "{what}");
        assert_eq!(
            gg.tensors.keys().collect::<Vec<_>>(),
            hf.tensors.keys().collect::<Vec<_>>(),
            "{what}"
        );
        for (name, want) in &hf.tensors {
            let got = &gg.tensors[name];
            assert_eq!(got.shape, want.shape, "{what} {name}");
            let dtype = &gg.stored_dtypes[name];
            assert_eq!(
                dtype.as_str(),
                if want.shape.len() == 2 { stored } else { "F32" },
                "{what} {name}"
            );
            let max_err = got
                .data
                .iter()
                .zip(&want.data)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            match dtype.as_str() {
                "F32" => assert_eq!(got.data, want.data, "{what} {name}: F32 must be exact"),
                "F16" => {
                    for (a, b) in got.data.iter().zip(&want.data) {
                        assert!(
                            (a - b).abs() <= 1e-3 * b.abs() + 1e-7,
                            "{what} {name}: {a} vs {b}"
                        );
                    }
                }
                _ => assert!(
                    max_err < 0.01 * max_abs(&want.data),
                    "{what} {name}: max abs err {max_err}"
                ),
            }
        }
    }
}

/// A frozen base loaded for holding keeps its matrices in their stored type (the real SmolLM2
/// Q4_1 GGUF stays Q4_1, Q/K rows unpermuted as whole rows of blocks) and dequantises to
/// exactly what the f32 loader gives; norms are the same f32 values.
#[test]
fn held_models_dequantise_to_the_f32_load() {
    use retune_core::load::held::Hold;
    use retune_core::load::load_held;
    let f32_dense = Hold {
        quantize: None,
        dense: GgmlDType::F32,
    };
    let real = smollm2();
    for (path, stored) in [
        (fixture("smollm-tiny").join("model-q8_0.gguf"), "Q8_0"),
        (fixture("smollm-tiny").join("model-f32.gguf"), "F32"),
        (fixture("llama3-tiny").join("model-f16.gguf"), "F16"),
        (fixture("mistral-tiny"), "F32"),
        (real, "Q4_1"),
    ] {
        let what = path.display().to_string();
        let dense = load_model(&path).unwrap();
        let held = load_held(&path, &f32_dense).unwrap();
        assert_eq!(held.config, dense.config, "{what}");
        let mut matrices = 0;
        for (name, want) in &dense.tensors {
            match held.matrices.get(name) {
                Some(m) => {
                    matrices += 1;
                    let kept = if stored == "F16" { "F32" } else { stored };
                    let is_embedding = name.contains("embed_tokens");
                    if !(is_embedding && stored == "Q4_1") {
                        // The real SmolLM2 stores its embedding as Q8_0, its matrices as Q4_1.
                        assert_eq!(
                            retune_core::ops::stored::type_name(m.dtype()),
                            kept,
                            "{what} {name}"
                        );
                    }
                    assert_eq!([m.rows(), m.cols()], want.shape[..], "{what} {name}");
                    assert!(m.dequantize() == want.data, "{what} {name}: values differ");
                }
                None => assert_eq!(held.vectors[name].data, want.data, "{what} {name}"),
            }
        }
        assert_eq!(matrices, held.matrices.len(), "{what}");
    }
    // Quantised on load: the blocks llama.cpp's reference quantisation makes of the f32 values,
    // row by row; bf16: each value rounded to nearest even.
    let folder = fixture("smollm-tiny");
    let dense = load_model(&folder).unwrap();
    for (quantize, dense_type) in [
        (Some(GgmlDType::Q8_0), GgmlDType::F32),
        (None, GgmlDType::BF16),
    ] {
        let hold = Hold {
            quantize,
            dense: dense_type,
        };
        let held = load_held(&folder, &hold).unwrap();
        for (name, m) in &held.matrices {
            let want = &dense.tensors[name];
            let expected = retune_core::ops::stored::StoredMatrix::quantize(
                m.dtype(),
                want.shape[0],
                want.shape[1],
                &want.data,
            )
            .unwrap();
            assert_eq!(m.dtype(), quantize.unwrap_or(dense_type), "{name}");
            assert!(m.bytes() == expected.bytes(), "{name}: other blocks");
        }
    }
}
