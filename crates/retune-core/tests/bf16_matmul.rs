//! Mixed precision (bf16 matrix products, f32 accumulation) against the f32 path, on a random
//! SmolLM2-shaped model cut to two layers. In its own test binary: the precision is
//! process-wide, and the other tests of the crate compare f32 results with tight bounds.

use retune_core::config::LlamaConfig;
use retune_core::model::{Batch, Grads, Lora, LoraSpec, Model, Target};
use retune_core::ops::matmul::{
    matmul_nt, matmul_tn, set_matmul_precision, MatmulPrecision, BF16_MIN_ROWS,
};
use std::sync::Mutex;

/// The tests here switch the process-wide precision: one at a time.
static PRECISION: Mutex<()> = Mutex::new(());

fn max_rel(a: &[f32], b: &[f32]) -> f64 {
    let scale = b.iter().fold(0.0f64, |m, x| m.max(x.abs() as f64));
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() as f64)
        .fold(0.0, f64::max)
        / scale
}

/// The bf16 path fuses each projection with its LoRA branch; with biases and dropout it takes
/// the branches that add them, and frozen biases take their own path too. Full fine-tuning's
/// weight gradients take theirs (q, k, v share one pack of their input; gate and up another).
#[test]
fn bf16_training_step_tracks_the_f32_step() {
    let _one_at_a_time = PRECISION.lock().unwrap_or_else(|e| e.into_inner());
    bf16_step_case(false, 0.0);
    bf16_step_case(true, 0.1);
}

/// bf16 against f32: the loss to ~1e-3 relative, the gradient direction to a few percent; a
/// wrong product (a transpose, a lost accumulate) is off by O(1).
fn assert_tracks(what: &str, (loss16, g16): (f64, Vec<f32>), (loss32, g32): (f64, Vec<f32>)) {
    assert!(
        (loss16 - loss32).abs() < 2e-3 * loss32,
        "{what}: {loss16} vs {loss32}"
    );
    let rel = max_rel(&g16, &g32);
    assert!(rel < 5e-2, "{what}: gradient differs by {rel}");
    let dot: f64 = g16
        .iter()
        .zip(&g32)
        .map(|(a, b)| (*a as f64) * (*b as f64))
        .sum();
    let norm = |g: &[f32]| g.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let cosine = dot / (norm(&g16) * norm(&g32));
    assert!(cosine > 0.999, "{what}: cosine {cosine}");
    eprintln!(
        "{what}: loss f32 {loss32} bf16 {loss16}; gradient max rel diff {rel:e}, cosine {cosine}"
    );
}

fn bf16_step_case(biases: bool, dropout: f64) {
    let mut cfg = LlamaConfig::smollm2_135m();
    cfg.num_hidden_layers = 2;
    cfg.vocab_size = 512;
    (cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias) = (biases, biases, biases);
    let model = Model::<f32>::random(cfg.clone(), 1, 0.05).unwrap();
    let spec = LoraSpec {
        r: 8,
        alpha: 16.0,
        dropout,
        targets: Target::ALL.to_vec(),
        rslora: false,
    };
    let mut lora = Lora::init(spec, &model.weights, 2).unwrap();
    // A trained-looking adapter: B nonzero so A gets gradients too.
    for t in lora.tensors_mut() {
        for (i, v) in t.iter_mut().enumerate() {
            if *v == 0.0 {
                *v = ((i * 7919 % 1000) as f32 / 1000.0 - 0.5) * 0.02;
            }
        }
    }
    let rows: Vec<Vec<u32>> = (0..2)
        .map(|b| (0..96).map(|i| ((i * 31 + b * 17) % 512) as u32).collect())
        .collect();
    let batch = Batch::from_rows(&rows).unwrap();
    let run = |p| {
        set_matmul_precision(p);
        let mut g = Grads::lora(&model, &lora);
        let s = model.forward_backward(&batch, batch.target_count(), Some(&lora), 7, &mut g);
        let grads: Vec<f32> = g
            .lora
            .unwrap()
            .tensors_mut()
            .into_iter()
            .flatten()
            .map(|x| *x)
            .collect();
        (s.loss_sum / s.count as f64, grads)
    };
    let case = format!("biases {biases}, dropout {dropout}");
    let f32_run = run(MatmulPrecision::F32);
    assert_tracks(&case, run(MatmulPrecision::Bf16), f32_run);

    // Full fine-tuning: every weight's gradient, one tensor at a time.
    let full = |p| {
        set_matmul_precision(p);
        let mut g = Grads::full(&model);
        let s = model.forward_backward(&batch, batch.target_count(), None, 0, &mut g);
        let loss = s.loss_sum / s.count as f64;
        let tensors: Vec<Vec<f32>> = g
            .base
            .tensors_mut()
            .into_iter()
            .map(|t| t.clone())
            .collect();
        (loss, tensors)
    };
    let (loss32, g32) = full(MatmulPrecision::F32);
    let (loss16, g16) = full(MatmulPrecision::Bf16);
    set_matmul_precision(MatmulPrecision::F32);
    let names = model.weights.named();
    for ((t16, t32), (name, _)) in g16.into_iter().zip(g32).zip(names) {
        assert_tracks(
            &format!("{case}, full, {name}"),
            (loss16, t16),
            (loss32, t32),
        );
    }
}

#[test]
fn bf16_products_round_inputs_and_f64_is_untouched() {
    let _one_at_a_time = PRECISION.lock().unwrap_or_else(|e| e.into_inner());
    set_matmul_precision(MatmulPrecision::Bf16);
    // 1 + 2^-10 is not a bf16 number: it rounds to 1, so the bf16 product loses it.
    let m = BF16_MIN_ROWS;
    let a = vec![1.0f32 + 1.0 / 1024.0; m];
    let mut c = vec![0.0f32; m];
    matmul_nt(&mut c, &a, &[1.0], m, 1, 1, false);
    // A CPU without a bf16 kernel (AVX2 only) runs bf16 products on the f32 kernel, exactly.
    let rounded = if retune_gemm::best_kernel() == retune_gemm::Kernel::F32 {
        a[0]
    } else {
        1.0
    };
    assert!(c.iter().all(|&x| x == rounded), "{c:?}");
    // Fewer rows (decoding a token) stay f32: converting the weight would cost more.
    matmul_nt(&mut c[..m - 1], &a[..m - 1], &[1.0], m - 1, 1, 1, false);
    assert!(c[..m - 1].iter().all(|&x| x == a[0]));
    let mut c64 = vec![0.0f64; m];
    matmul_nt(
        &mut c64,
        &vec![1.0 + 1.0 / 1024.0; m],
        &[1.0],
        m,
        1,
        1,
        false,
    );
    assert!(c64.iter().all(|&x| x == 1.0 + 1.0 / 1024.0));
    set_matmul_precision(MatmulPrecision::F32);
    matmul_nt(&mut c, &a, &[1.0], m, 1, 1, false);
    assert!(c.iter().all(|&x| x == a[0]));
}

/// Loss and embedding-input gradient path of one forward/backward, as bits.
fn loss_bits(model: &Model<f32>, batch: &Batch, grads: &mut Grads<f32>) -> u64 {
    let s = model.forward_backward(batch, batch.target_count(), None, 0, grads);
    s.loss_sum.to_bits()
}

#[test]
fn packed_frozen_head_matches_unpacked_and_follows_changes() {
    let _one_at_a_time = PRECISION.lock().unwrap_or_else(|e| e.into_inner());
    packed_frozen_head_case();
}

/// Loss, adapter gradients and evaluation loss of one LoRA step, as bits.
fn lora_step_bits(model: &Model<f32>, lora: &Lora<f32>, batch: &Batch) -> Vec<u64> {
    let mut g = Grads::lora(model, lora);
    let s = model.forward_backward(batch, batch.target_count(), Some(lora), 0, &mut g);
    let eval = model.loss(batch, Some(lora));
    let mut bits = vec![s.loss_sum.to_bits(), eval.loss_sum.to_bits()];
    let g_lora = g.lora.as_mut().expect("LoRA gradients");
    for t in g_lora.tensors_mut() {
        bits.extend(t.iter().map(|x| x.to_bits() as u64));
    }
    bits
}

/// A base held as bf16 packs gives the bits of the f32 base (whose products pack each weight
/// per call), in a training step and an evaluation, also in a clone; generation asks for the
/// model loaded again.
#[test]
fn base_held_as_packs_gives_the_bits_of_the_f32_base() {
    let _one_at_a_time = PRECISION.lock().unwrap_or_else(|e| e.into_inner());
    set_matmul_precision(MatmulPrecision::F32);
    let (mut model, batch) = small_model(3, 9);
    assert!(!model.pack_frozen_base(), "f32 products keep the f32 base");
    set_matmul_precision(MatmulPrecision::Bf16);
    let spec = LoraSpec {
        r: 8,
        alpha: 16.0,
        dropout: 0.0,
        targets: Target::ALL.to_vec(),
        rslora: false,
    };
    let mut lora = Lora::init(spec, &model.weights, 4).unwrap();
    // B non-zero, so the branch reaches the loss and the input gradients.
    for t in lora.tensors_mut() {
        for (i, v) in t.iter_mut().enumerate() {
            *v += ((i * 7919 % 101) as f32 - 50.0) * 1e-3;
        }
    }
    let want = lora_step_bits(&model, &lora, &batch);
    let unpacked = model.clone();
    assert!(model.pack_frozen_base() && model.base_is_packed());
    assert!(!model.pack_frozen_base(), "packed once");
    let released = model
        .weights
        .layers
        .iter()
        .all(|l| Target::ALL.iter().all(|t| t.of(l).w.is_empty()));
    assert!(
        released,
        "the f32 values of every linear layer are released"
    );
    assert_eq!(lora_step_bits(&model, &lora, &batch), want, "packed base");
    assert_eq!(
        lora_step_bits(&model.clone(), &lora, &batch),
        want,
        "its clone"
    );
    // Generation reads the packs (bf16 products at any number of rows): the f32 model's
    // logits within bf16 rounding.
    let (mut cache, mut cache_f32) = (model.new_cache(8), unpacked.new_cache(8));
    let logits = model.forward_cached(&[1, 2], &mut cache).unwrap();
    set_matmul_precision(MatmulPrecision::F32);
    let want = unpacked.forward_cached(&[1, 2], &mut cache_f32).unwrap();
    let rel = max_rel(&logits, &want);
    assert!(rel < 3e-2, "generation from the packs differs by {rel}");
}

/// The SmolLM2-135M layer shape with `layers` layers and a 512-token vocabulary, and a batch
/// of 2 x 64 tokens for it.
fn small_model(layers: usize, seed: u64) -> (Model<f32>, Batch) {
    let mut cfg = LlamaConfig::smollm2_135m();
    cfg.num_hidden_layers = layers;
    cfg.vocab_size = 512;
    let model = Model::<f32>::random(cfg, seed, 0.05).unwrap();
    let rows: Vec<Vec<u32>> = (0..2)
        .map(|b| (0..64).map(|i| ((i * 37 + b * 11) % 512) as u32).collect())
        .collect();
    (model, Batch::from_rows(&rows).unwrap())
}

fn packed_frozen_head_case() {
    set_matmul_precision(MatmulPrecision::Bf16);
    let (mut model, batch) = small_model(2, 3);
    // Frozen grads: the head packed once and reused. Full grads: nothing packed, every
    // product packs its weight per call. Same kernel, same rounding: the same bits.
    let mut frozen = Grads::frozen(&model);
    let mut full = Grads::full(&model);
    let packed = loss_bits(&model, &batch, &mut frozen);
    assert_eq!(packed, loss_bits(&model, &batch, &mut frozen), "reuse");
    assert_eq!(
        packed,
        loss_bits(&model, &batch, &mut full),
        "packed vs unpacked"
    );
    // Changing frozen weights in place (as merging an adapter does) must not leave stale packs.
    model.weights.layers[1].down.w[5] += 0.5;
    model.weights.embed[100] -= 0.25; // tied head
    let changed = loss_bits(&model, &batch, &mut frozen);
    assert_ne!(changed, packed, "the change moves the loss");
    assert_eq!(
        changed,
        loss_bits(&model, &batch, &mut full),
        "repacked after a change"
    );
    set_matmul_precision(MatmulPrecision::F32);
}

/// A weight gradient from a shared pack of its input and the transpose of the pack of its
/// output gradient (as the backward makes them) has the bits of the product that packs both
/// itself, overwriting and accumulating.
#[test]
fn shared_input_pack_gives_the_bits_of_matmul_tn() {
    let _one_at_a_time = PRECISION.lock().unwrap_or_else(|e| e.into_inner());
    set_matmul_precision(MatmulPrecision::Bf16);
    let (m, k, n) = (70, 96, 45); // dW [m, n] = dY[k, m]^T X[k, n]; edges on every side
    let value = |i: usize, s: usize| ((i * 7919 + s * 104_729) % 2001) as f32 / 1000.0 - 1.0;
    let dy: Vec<f32> = (0..k * m).map(|i| value(i, 1)).collect();
    let x: Vec<f32> = (0..k * n).map(|i| value(i, 2)).collect();
    let c0: Vec<f32> = (0..m * n).map(|i| value(i, 3)).collect();
    let xb = retune_gemm::PackedB::from_kn(&x, k, n);
    // dY^T transposed from the pack of dY (which its input gradient dY W reads).
    let dy_t = retune_gemm::PackedA::from_rows(&dy, k, m).transposed();
    for accumulate in [false, true] {
        let (mut want, mut got) = (c0.clone(), c0.clone());
        matmul_tn(&mut want, &dy, &x, m, k, n, accumulate);
        retune_gemm::gemm_terms(&mut got, &[(&dy_t, &xb)], accumulate);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&got), bits(&want), "accumulate {accumulate}");
    }
    set_matmul_precision(MatmulPrecision::F32);
}

/// Every base gradient of one full fine-tuning step, as bits.
fn grad_bits(model: &Model<f32>, batch: &Batch) -> Vec<u32> {
    let mut g = Grads::full(model);
    model.forward_backward(batch, batch.target_count(), None, 0, &mut g);
    let tensors = g.base.tensors_mut();
    tensors
        .iter()
        .flat_map(|t| t.iter().map(|x| x.to_bits()))
        .collect()
}

/// A recompute packs each weight for its input gradient too and holds that pack for the
/// layer's backward: the gradients equal those of a fresh model (which packs from scratch), so
/// a pack held by an earlier step never serves a changed weight.
#[test]
fn held_backward_packs_follow_weight_changes() {
    let _one_at_a_time = PRECISION.lock().unwrap_or_else(|e| e.into_inner());
    set_matmul_precision(MatmulPrecision::Bf16);
    let (mut model, batch) = small_model(3, 5);
    let first = grad_bits(&model, &batch);
    assert_eq!(
        first,
        grad_bits(&model, &batch),
        "a second step, packs held"
    );
    assert_eq!(first, grad_bits(&model.clone(), &batch), "a fresh model");
    // Change weights of recomputed layers (0 and 1) and of the last (not recomputed) one.
    model.weights.layers[0].q.w[3] += 0.5;
    model.weights.layers[1].gate.w[10] -= 0.5;
    model.weights.layers[2].v.w[7] += 0.25;
    let changed = grad_bits(&model, &batch);
    assert_ne!(changed, first, "the change moves the gradients");
    assert_eq!(changed, grad_bits(&model.clone(), &batch), "no stale pack");
    set_matmul_precision(MatmulPrecision::F32);
}

/// Whether two packs of `m x k` give the same bits in a product with one right operand.
fn same_products(a: &retune_gemm::PackedA, b: &retune_gemm::PackedA) -> bool {
    let (m, k, n) = (a.m(), a.k(), 29);
    let w: Vec<f32> = (0..k * n)
        .map(|i| ((i * 7919) % 997) as f32 / 500.0 - 1.0)
        .collect();
    let w = retune_gemm::PackedB::from_kn(&w, k, n);
    let (mut ca, mut cb) = (vec![0.0f32; m * n], vec![0.0f32; m * n]);
    retune_gemm::gemm_terms(&mut ca, &[(a, &w)], false);
    retune_gemm::gemm_terms(&mut cb, &[(b, &w)], false);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    bits(&ca) == bits(&cb)
}

/// The ops that pack their output row by row as they write it (RMSNorm, SwiGLU) give the
/// values of the plain ops and the packs of packing the output afterwards.
#[test]
fn producers_pack_their_rows_as_packing_afterwards() {
    use retune_core::ops::matmul::pack_rows;
    use retune_core::ops::rmsnorm::{rmsnorm_forward, rmsnorm_forward_packed};
    use retune_core::ops::swiglu::{swiglu_forward, swiglu_forward_packed};
    let _one_at_a_time = PRECISION.lock().unwrap_or_else(|e| e.into_inner());
    set_matmul_precision(MatmulPrecision::Bf16);
    let (n, c) = (37, 70); // neither a whole number of tiles
    let v = |len: usize, s: usize| -> Vec<f32> {
        (0..len)
            .map(|i| (((i + s) * 7919) % 2003) as f32 / 1001.0 - 1.0)
            .collect()
    };
    let (x, w) = (v(n * c, 1), v(c, 2));
    let (mut y, mut r) = (vec![0.0f32; n * c], vec![0.0f32; n]);
    rmsnorm_forward(&mut y, &mut r, &x, &w, n, c, 1e-5);
    let (mut y2, mut r2) = (vec![f32::NAN; n * c], vec![f32::NAN; n]);
    let packed = rmsnorm_forward_packed(&mut y2, &mut r2, &x, &w, n, c, 1e-5).unwrap();
    assert_eq!((&y2, &r2), (&y, &r));
    let afterwards = pack_rows(&y, n, c).unwrap();
    assert!(same_products(&packed, &afterwards), "RMSNorm's pack");

    let (g, u) = (v(n * c, 3), v(n * c, 4));
    let mut act = vec![0.0f32; n * c];
    swiglu_forward(&mut act, &g, &u);
    let mut act2 = vec![f32::NAN; n * c];
    let packed = swiglu_forward_packed(&mut act2, &g, &u, c).unwrap();
    assert_eq!(act2, act);
    assert!(
        same_products(&packed, &pack_rows(&act, n, c).unwrap()),
        "SwiGLU's pack"
    );
    assert!(
        !same_products(&packed, &afterwards),
        "the check tells packs apart"
    );
    set_matmul_precision(MatmulPrecision::F32);
}
