//! A frozen base held in its storage type (bf16, GGML blocks) against the same weights
//! dequantised to f32: the products and a whole training step. In its own test binary: the
//! matmul precision is process-wide.

use candle_core::quantized::GgmlDType;
use retune_core::ops::matmul::{matmul_nn, matmul_nt, set_matmul_precision, MatmulPrecision};
use retune_core::ops::stored::{stored_backward, stored_forward, StoredMatrix};
use std::sync::Mutex;

/// The tests here switch the process-wide precision: one at a time.
static PRECISION: Mutex<()> = Mutex::new(());

fn values(len: usize, seed: u32) -> Vec<f32> {
    (0..len)
        .map(|i| {
            ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f32 / 1000.0 - 0.5
        })
        .collect()
}

fn max_rel(a: &[f32], b: &[f32]) -> f64 {
    let scale = b.iter().fold(0.0f64, |m, x| m.max(x.abs() as f64));
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() as f64)
        .fold(0.0, f64::max)
        / scale
}

/// The stored products against the dense products of the dequantised weight, at both
/// precisions, over several chunks (rows of 8192 values make 256-row chunks) and odd shapes.
#[test]
fn stored_products_match_the_dequantised_weight() {
    let _one_at_a_time = PRECISION.lock().unwrap_or_else(|e| e.into_inner());
    for precision in [MatmulPrecision::F32, MatmulPrecision::Bf16] {
        set_matmul_precision(precision);
        for (m, rows, cols, dtype) in [
            (5, 70, 64, GgmlDType::Q8_0),
            (40, 600, 8192, GgmlDType::Q4_0),
            (33, 300, 256, GgmlDType::Q4K),
            (17, 45, 96, GgmlDType::BF16),
        ] {
            let q = StoredMatrix::quantize(dtype, rows, cols, &values(rows * cols, 7)).unwrap();
            let w = q.dequantize();
            let x = values(m * cols, 11);
            let mut y = vec![0.0f32; m * rows];
            stored_forward(&mut y, &x, None, &q, m, None);
            let mut y_dense = vec![0.0f32; m * rows];
            matmul_nt(&mut y_dense, &x, &w, m, cols, rows, false);
            // Same terms in the same order: the same bits.
            assert_eq!(y, y_dense, "forward {m}x{rows}x{cols} {precision:?}");

            let dy = values(m * rows, 13);
            let mut dx = vec![1.0f32; m * cols];
            stored_backward(true, &mut dx, &dy, &q, m, None);
            let mut dx_dense = vec![1.0f32; m * cols];
            matmul_nn(&mut dx_dense, &dy, &w, m, rows, cols, true);
            // Chunks of the inner dimension summed in another order: f32 rounding only.
            let rel = max_rel(&dx, &dx_dense);
            assert!(
                rel < 1e-5,
                "backward {m}x{rows}x{cols} {precision:?}: {rel}"
            );
            let mut dx_over = vec![7.0f32; m * cols];
            stored_backward(false, &mut dx_over, &dy, &q, m, None);
            let over: Vec<f32> = dx_over.iter().map(|&v| v + 1.0).collect();
            assert!(max_rel(&over, &dx) < 1e-5);
        }
    }
    set_matmul_precision(MatmulPrecision::F32);
}

mod held_model {
    use super::*;
    use retune_core::config::LlamaConfig;
    use retune_core::load::held::HeldModel;
    use retune_core::load::{HostTensor, LoadedModel, ModelFormat};
    use retune_core::model::{Batch, Grads, Lora, LoraSpec, Model, Target};
    use std::collections::BTreeMap;
    use std::path::Path;

    /// A small random model (dimensions of whole Q4_0 / Q8_0 blocks, untied head) as a held
    /// base of `dtype`, and the same weights dequantised, as an f32 model.
    fn models(dtype: GgmlDType, tied: bool) -> (Model<f32>, Model<f32>) {
        let mut cfg = LlamaConfig::smollm2_135m();
        cfg.num_hidden_layers = 2;
        cfg.vocab_size = 320;
        cfg.tie_word_embeddings = tied;
        let random = Model::<f32>::random(cfg.clone(), 3, 0.05).unwrap();
        let (mut vectors, mut matrices, mut dense) =
            (BTreeMap::new(), BTreeMap::new(), BTreeMap::new());
        for (name, values) in random.weights.named() {
            let shape = cfg
                .tensor_shapes()
                .into_iter()
                .find(|(n, _)| *n == name)
                .unwrap()
                .1;
            let tensor = |data| HostTensor {
                shape: shape.clone(),
                data,
            };
            if let [rows, cols] = shape[..] {
                let m = StoredMatrix::quantize(dtype, rows, cols, values).unwrap();
                dense.insert(name.clone(), tensor(m.dequantize()));
                matrices.insert(name, m);
            } else {
                dense.insert(name.clone(), tensor(values.to_vec()));
                vectors.insert(name, tensor(values.to_vec()));
            }
        }
        let held = HeldModel {
            config: cfg.clone(),
            vectors,
            matrices,
            format: ModelFormat::Gguf,
            files: Vec::new(),
            stored_dtypes: BTreeMap::new(),
        };
        let loaded = LoadedModel {
            config: cfg,
            tensors: dense,
            format: ModelFormat::Gguf,
            files: Vec::new(),
            stored_dtypes: BTreeMap::new(),
        };
        let path = Path::new("<test>");
        (
            Model::from_held(held, path).unwrap(),
            Model::from_loaded(loaded, path).unwrap(),
        )
    }

    fn adapter(model: &Model<f32>, dropout: f64) -> Lora<f32> {
        let spec = LoraSpec {
            r: 8,
            alpha: 16.0,
            dropout,
            targets: Target::ALL.to_vec(),
            rslora: false,
        };
        let mut lora = Lora::init(spec, &model.weights, 5).unwrap();
        // B nonzero, so that the branch changes the output and A gets gradients.
        for t in lora.tensors_mut() {
            for (i, v) in t.iter_mut().enumerate() {
                if *v == 0.0 {
                    *v = ((i * 7919 % 1000) as f32 / 1000.0 - 0.5) * 0.02;
                }
            }
        }
        lora
    }

    fn step(model: &Model<f32>, lora: &Lora<f32>, batch: &Batch) -> (f64, Vec<f32>) {
        let mut g = Grads::lora(model, lora);
        let s = model.forward_backward(batch, batch.target_count(), Some(lora), 7, &mut g);
        let grads = g
            .lora
            .unwrap()
            .tensors_mut()
            .into_iter()
            .flatten()
            .map(|x| *x)
            .collect();
        (s.loss_sum, grads)
    }

    /// A LoRA step on a held base gives the loss of the same weights dequantised to f32 bit
    /// for bit (the forward sums the same terms in the same order), and adapter gradients
    /// within f32 rounding (the input gradients sum chunks of the inner dimension in another
    /// order): at f32 and at bf16 precision, with and without dropout, tied and untied.
    #[test]
    fn held_base_trains_as_its_dequantised_weights() {
        let _one_at_a_time = PRECISION.lock().unwrap_or_else(|e| e.into_inner());
        let rows: Vec<Vec<u32>> = (0..2)
            .map(|b| (0..40).map(|i| ((i * 31 + b * 17) % 320) as u32).collect())
            .collect();
        let batch = Batch::from_rows(&rows).unwrap();
        for (dtype, tied) in [(GgmlDType::Q4_0, false), (GgmlDType::Q8_0, true)] {
            let (held, dense) = models(dtype, tied);
            assert!(held.base_is_held() && !dense.base_is_held());
            for precision in [MatmulPrecision::F32, MatmulPrecision::Bf16] {
                set_matmul_precision(precision);
                for dropout in [0.0, 0.1] {
                    let lora = adapter(&dense, dropout);
                    let (loss_h, g_h) = step(&held, &lora, &batch);
                    let (loss_d, g_d) = step(&dense, &lora, &batch);
                    let what = format!("{dtype:?} tied {tied} {precision:?} dropout {dropout}");
                    assert_eq!(loss_h, loss_d, "{what}: loss");
                    let rel = max_rel(&g_h, &g_d);
                    assert!(rel < 1e-4, "{what}: adapter gradients differ by {rel}");
                    // Evaluation without gradients: the same loss again.
                    let eval_h = held.loss(&batch, Some(&lora)).loss_sum;
                    assert_eq!(eval_h, dense.loss(&batch, Some(&lora)).loss_sum, "{what}");
                }
            }
        }
        set_matmul_precision(MatmulPrecision::F32);
    }

    /// Generation from a held base with the adapter beside it gives the logits of the f32
    /// model with the adapter merged, within f32 rounding of the merge.
    #[test]
    fn held_base_generates_with_the_adapter_beside_it() {
        let _one_at_a_time = PRECISION.lock().unwrap_or_else(|e| e.into_inner());
        set_matmul_precision(MatmulPrecision::F32);
        let (held, mut dense) = models(GgmlDType::Q4_0, false);
        let lora = adapter(&dense, 0.0);
        lora.merge_into(&mut dense.weights);
        let prompt = [3u32, 17, 99, 250, 4];
        let (mut ch, mut cd) = (held.new_cache(8), dense.new_cache(8));
        let lh = held
            .forward_cached_adapted(&prompt, &mut ch, Some(&lora))
            .unwrap();
        let ld = dense.forward_cached(&prompt, &mut cd).unwrap();
        assert!(
            max_rel(&lh, &ld) < 1e-4,
            "prompt logits differ by {}",
            max_rel(&lh, &ld)
        );
        let lh = held
            .forward_cached_adapted(&[7], &mut ch, Some(&lora))
            .unwrap();
        let ld = dense.forward_cached(&[7], &mut cd).unwrap();
        assert!(
            max_rel(&lh, &ld) < 1e-4,
            "next-token logits differ by {}",
            max_rel(&lh, &ld)
        );
        // Without the adapter the held base is the dequantised base: the same logits.
        let (mut ch, mut cd) = (held.new_cache(8), dense.new_cache(8));
        let (h0, _) = models(GgmlDType::Q4_0, false);
        let plain = h0.forward_cached(&prompt, &mut ch).unwrap();
        let (_, d0) = models(GgmlDType::Q4_0, false);
        assert_eq!(plain, d0.forward_cached(&prompt, &mut cd).unwrap());
    }
}
