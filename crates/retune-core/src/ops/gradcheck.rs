//! Test helpers: seeded random vectors and a central-finite-difference gradient checker (f64).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Finite-difference step: central differences in f64 have truncation error ~eps^2 and
/// round-off ~1e-16 / eps, both near 1e-10 here.
const EPS: f64 = 1e-5;

/// Inputs longer than this are checked on a seeded random subset of this many elements.
const MAX_POINTS: usize = 2000;

/// Elements whose gradients are this small relative to the largest one are compared against
/// that floor instead of their own size (a near-zero gradient has no meaningful relative error).
const REL_FLOOR: f64 = 1e-6;

/// `len` values uniform in [-1, 1), reproducible from `seed`.
pub(crate) fn randv(len: usize, seed: u64) -> Vec<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..len).map(|_| rng.gen_range(-1.0..1.0)).collect()
}

/// `len` integers in `0..hi`, reproducible from `seed`.
pub(crate) fn rand_ids(len: usize, hi: u32, seed: u64) -> Vec<u32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..len).map(|_| rng.gen_range(0..hi)).collect()
}

/// Narrows to f32 (to run the f32 instantiation of an op on the same data).
pub(crate) fn to_f32(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}

/// `max |a - b| / max |b|`: difference relative to the reference's overall scale.
pub(crate) fn max_rel_diff<A: Copy + Into<f64>>(a: &[A], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0.0f64, |m, x| m.max(x.abs())).max(1e-300);
    a.iter()
        .zip(b)
        .map(|(&x, y)| (x.into() - y).abs())
        .fold(0.0, f64::max)
        / scale
}

/// Compares `analytic`, the gradient of `f` at `x`, with central differences and returns the
/// maximum relative error `|a - n| / max(|a| + |n|, REL_FLOOR * max|a|)`; prints it under `name`.
pub(crate) fn check_grad(
    name: &str,
    x: &[f64],
    analytic: &[f64],
    mut f: impl FnMut(&[f64]) -> f64,
) -> f64 {
    assert_eq!(x.len(), analytic.len(), "{name}: gradient length");
    let idx: Vec<usize> = if x.len() <= MAX_POINTS {
        (0..x.len()).collect()
    } else {
        let mut rng = ChaCha8Rng::seed_from_u64(x.len() as u64);
        (0..MAX_POINTS).map(|_| rng.gen_range(0..x.len())).collect()
    };
    let scale = analytic.iter().fold(0.0f64, |m, g| m.max(g.abs()));
    assert!(scale > 0.0, "{name}: analytic gradient is identically zero");
    let mut xp = x.to_vec();
    let (mut max_rel, mut max_abs) = (0.0f64, 0.0f64);
    for &i in &idx {
        xp[i] = x[i] + EPS;
        let up = f(&xp);
        xp[i] = x[i] - EPS;
        let down = f(&xp);
        xp[i] = x[i];
        let (a, n) = (analytic[i], (up - down) / (2.0 * EPS));
        let abs = (a - n).abs();
        max_abs = max_abs.max(abs);
        max_rel = max_rel.max(abs / (a.abs() + n.abs()).max(REL_FLOOR * scale));
    }
    println!(
        "gradcheck {name}: max rel err {max_rel:.2e}, max abs err {max_abs:.2e} over {} of {} elements",
        idx.len(),
        x.len()
    );
    max_rel
}

/// [`check_grad`] for the test loss `L(x) = sum(out(x) * r)`, whose gradient wrt `out` is `r`
/// (the `dout` the backward was given). Evaluated as `sum((out(x) - out(x0)) * r)`: same
/// gradient, but outputs the perturbation leaves alone contribute exact zeros and the rest
/// only their (exactly computed) change, so round-off no longer scales with `|L|`.
pub(crate) fn check_grad_out(
    name: &str,
    x: &[f64],
    analytic: &[f64],
    r: &[f64],
    mut out: impl FnMut(&[f64]) -> Vec<f64>,
) -> f64 {
    let base = out(x);
    assert_eq!(base.len(), r.len(), "{name}: r must match the output");
    check_grad(name, x, analytic, |xp| {
        out(xp)
            .iter()
            .zip(&base)
            .zip(r)
            .map(|((o, b), r)| (o - b) * r)
            .sum()
    })
}

/// Whether `packed` holds the bf16 pack of the row-major `rows` (`m x k`): its product with a
/// seeded right operand has the bits of the same product from `PackedA::from_rows(rows)`.
pub(crate) fn is_pack_of(packed: &retune_gemm::PackedA, rows: &[f32]) -> bool {
    use retune_gemm::{gemm_terms, PackedA, PackedB};
    let (m, k, n) = (packed.m(), packed.k(), 37);
    assert_eq!(rows.len(), m * k, "is_pack_of: rows are not m x k");
    let b = PackedB::from_kn(&to_f32(&randv(k * n, 77)), k, n);
    let whole = PackedA::from_rows(rows, m, k);
    let (mut got, mut want) = (vec![0.0f32; m * n], vec![0.0f32; m * n]);
    gemm_terms(&mut got, &[(packed, &b)], false);
    gemm_terms(&mut want, &[(&whole, &b)], false);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    bits(&got) == bits(&want)
}
