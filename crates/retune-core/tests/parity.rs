//! Parity with the reference implementation (PyTorch + transformers), on the tiny models of
//! `tests/fixtures` (made by `tests/fixtures/make_fixtures.py`, see its README): logits within
//! 1e-4 absolute, the loss, and the gradient of every parameter within 1e-3 relative.

use retune_core::model::{Batch, Grads, Model};
use retune_core::ops::cross_entropy::IGNORE;
use retune_core::Float;
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures")
        .join(name)
}

/// The reference file: every tensor as f64, keyed by name.
fn reference(dir: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f64>)> {
    let bytes = std::fs::read(dir.join("reference.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let data: Vec<f64> = match view.dtype() {
            Dtype::F32 => view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
                .collect(),
            Dtype::I64 => view
                .data()
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f64)
                .collect(),
            other => panic!("unexpected dtype {other:?} for {name}"),
        };
        out.insert(name.to_string(), (view.shape().to_vec(), data));
    }
    out
}

fn reference_batch(r: &BTreeMap<String, (Vec<usize>, Vec<f64>)>) -> Batch {
    let (shape, ids) = &r["input_ids"];
    let targets = r["targets"]
        .1
        .iter()
        .map(|&t| if t < 0.0 { IGNORE } else { t as u32 })
        .collect();
    Batch::with_targets(
        ids.iter().map(|&i| i as u32).collect(),
        targets,
        shape[0],
        shape[1],
    )
}

fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
}

/// Loads `model_file` (a folder or GGUF inside the fixture) and compares with the reference.
/// `logit_tol` is absolute; gradients are compared relative to each tensor's largest entry.
fn check<T: Float>(
    fixture_name: &str,
    model_file: Option<&str>,
    logit_tol: f64,
    grad_tol: Option<f64>,
) {
    let dir = fixture(fixture_name);
    let path = model_file.map_or(dir.clone(), |f| dir.join(f));
    let model = Model::<T>::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let r = reference(&dir);
    let batch = reference_batch(&r);
    let logits: Vec<f64> = model
        .logits(&batch, None)
        .iter()
        .map(|x| x.as_f64())
        .collect();
    let err = max_abs_diff(&logits, &r["logits"].1);
    eprintln!(
        "{fixture_name} {model_file:?} ({}): max |logit diff| = {err:e}",
        std::any::type_name::<T>()
    );
    assert!(
        err < logit_tol,
        "{}: logits differ by {err}",
        path.display()
    );

    let mut grads = Grads::full(&model);
    let stats = model.forward_backward(&batch, batch.target_count(), None, 0, &mut grads);
    let loss = stats.loss_sum / stats.count as f64;
    let ref_loss = r["loss"].1[0];
    assert!(
        (loss - ref_loss).abs() < logit_tol,
        "loss {loss} vs reference {ref_loss}"
    );
    let Some(grad_tol) = grad_tol else { return };
    let mut worst = 0.0f64;
    for (name, g) in grads.base.named() {
        let (_, expected) = r
            .get(&format!("grad.{name}"))
            .unwrap_or_else(|| panic!("no grad.{name}"));
        let scale = expected
            .iter()
            .fold(0.0f64, |m, x| m.max(x.abs()))
            .max(1e-12);
        let g: Vec<f64> = g.iter().map(|x| x.as_f64()).collect();
        let rel = max_abs_diff(&g, expected) / scale;
        worst = worst.max(rel);
        assert!(
            rel < grad_tol,
            "{name}: gradient differs by {rel:e} relative"
        );
    }
    eprintln!(
        "{fixture_name} ({}): worst gradient relative error {worst:e}",
        std::any::type_name::<T>()
    );
}

#[test]
fn llama3_with_rope_scaling_matches_pytorch() {
    check::<f64>("llama3-tiny", None, 1e-4, Some(1e-3));
}

#[test]
fn qwen2_with_biases_and_4x_config_matches_pytorch() {
    check::<f64>("qwen2-tiny", None, 1e-4, Some(1e-3));
}

#[test]
fn smollm_tied_matches_pytorch() {
    check::<f64>("smollm-tiny", None, 1e-4, Some(1e-3));
}

#[test]
fn mistral_sharded_bf16_matches_pytorch() {
    check::<f64>("mistral-tiny", None, 1e-4, Some(1e-3));
}

#[test]
fn gguf_f32_matches_pytorch() {
    check::<f64>("smollm-tiny", Some("model-f32.gguf"), 1e-4, Some(1e-3));
}

/// F16 storage rounds weights (max error 2.4e-4), so logits agree to the rounding only.
#[test]
fn gguf_f16_with_llama3_rope_freqs_matches_pytorch() {
    check::<f64>("llama3-tiny", Some("model-f16.gguf"), 2e-2, None);
}

/// Q8_0 quantisation error (max weight error 3.7e-3) moves logits by up to ~0.3.
#[test]
fn gguf_q8_0_matches_pytorch_within_quantisation() {
    check::<f64>("smollm-tiny", Some("model-q8_0.gguf"), 0.5, None);
}

/// The f32 path (what training and inference run) within the tolerances.
#[test]
fn f32_path_matches_pytorch() {
    for name in ["llama3-tiny", "qwen2-tiny", "smollm-tiny", "mistral-tiny"] {
        check::<f32>(name, None, 1e-4, Some(1e-3));
    }
}
