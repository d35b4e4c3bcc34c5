//! Every available kernel against an f64 reference, for the three layouts of
//! `retune_core::ops::matmul`, odd shapes, accumulation, strided views and prepacked operands.

use retune_gemm::{
    best_kernel, gemm_bf16, gemm_packed, gemm_terms, gemm_with, round_to_bf16, Kernel, MatRef,
    PackedA, PackedB,
};

/// Shapes (m, k, n): tiny, not multiples of 16/32 in any dimension, and one large.
const SHAPES: [(usize, usize, usize); 7] = [
    (1, 1, 1),
    (3, 5, 7),
    (17, 33, 9),
    (70, 65, 80),
    (33, 100, 47),
    (64, 64, 64),
    (257, 576, 1536),
];

fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 11) as f64 / (1u64 << 53) as f64 * 4.0 - 2.0) as f32
        })
        .collect()
}

#[derive(Clone, Copy, Debug)]
enum Layout {
    /// `a[m, k] · b[n, k]^T`
    Nt,
    /// `a[m, k] · b[k, n]`
    Nn,
    /// `a[k, m]^T · b[k, n]`
    Tn,
}

/// One product's operands and its f64 references.
struct Case {
    m: usize,
    k: usize,
    n: usize,
    a: Vec<f32>,
    b: Vec<f32>,
    layout: Layout,
    /// `sum_p a_ip b_pj` of the inputs as given.
    exact: Vec<f64>,
    /// The same of the bf16-rounded inputs: what a bf16 kernel must produce up to f32 sums.
    rounded: Vec<f64>,
    /// `sum_p |a_ip b_pj|`, the scale of the rounding errors.
    magnitude: Vec<f64>,
}

impl Case {
    fn new(m: usize, k: usize, n: usize, layout: Layout, seed: u64) -> Case {
        let (a, b) = (values(m * k, seed), values(k * n, seed + 1));
        let mut case = Case {
            m,
            k,
            n,
            a,
            b,
            layout,
            exact: vec![],
            rounded: vec![],
            magnitude: vec![],
        };
        let (av, bv) = case.views();
        let (mut exact, mut rounded, mut magnitude) =
            (vec![0.0; m * n], vec![0.0; m * n], vec![0.0; m * n]);
        for i in 0..m {
            for j in 0..n {
                let (mut e, mut r, mut g) = (0.0f64, 0.0f64, 0.0f64);
                for p in 0..k {
                    let (x, y) = (
                        av.data[i * av.row_stride + p * av.col_stride],
                        bv.data[p * bv.row_stride + j * bv.col_stride],
                    );
                    e += x as f64 * y as f64;
                    r += round_to_bf16(x) as f64 * round_to_bf16(y) as f64;
                    g += (x as f64 * y as f64).abs();
                }
                (exact[i * n + j], rounded[i * n + j], magnitude[i * n + j]) = (e, r, g);
            }
        }
        (case.exact, case.rounded, case.magnitude) = (exact, rounded, magnitude);
        case
    }

    /// `op(a)` and `op(b)` as views.
    fn views(&self) -> (MatRef<'_>, MatRef<'_>) {
        let (m, k, n) = (self.m, self.k, self.n);
        match self.layout {
            Layout::Nt => (
                MatRef::row_major(&self.a, k),
                MatRef::transpose_of(&self.b, k),
            ),
            Layout::Nn => (MatRef::row_major(&self.a, k), MatRef::row_major(&self.b, n)),
            Layout::Tn => (
                MatRef::transpose_of(&self.a, m),
                MatRef::row_major(&self.b, n),
            ),
        }
    }
}

/// `err <= bound`, false for a NaN error.
fn within(err: f64, bound: f64) -> bool {
    err <= bound
}

/// Checks `got` against `c0 + product` (`c0` only when accumulating); the error message names
/// the first failing element.
fn check(kernel: Kernel, case: &Case, got: &[f32], c0: Option<&[f32]>) -> Result<(), String> {
    for idx in 0..case.m * case.n {
        let base = c0.map_or(0.0, |c| c[idx] as f64);
        let scale = case.magnitude[idx] + base.abs();
        let got = got[idx] as f64;
        // bf16 keeps 8 significant bits: each product is off by at most ~2^-8 relative.
        let loose = (got - (base + case.exact[idx])).abs();
        if !within(loose, 1e-2 * scale + 1e-6) {
            return Err(format!(
                "{kernel:?} {:?} element {idx}: {got} vs exact {}",
                case.layout,
                base + case.exact[idx]
            ));
        }
        // Up to f32 summation, a bf16 kernel computes exactly the product of rounded inputs,
        // and the f32 kernel that of the inputs as given.
        let want = base
            + if kernel == Kernel::F32 {
                case.exact[idx]
            } else {
                case.rounded[idx]
            };
        if !within((got - want).abs(), 1e-5 * scale + 1e-30) {
            return Err(format!(
                "{kernel:?} {:?} element {idx}: {got} vs rounded-input {want}",
                case.layout
            ));
        }
    }
    Ok(())
}

fn kernels() -> Vec<Kernel> {
    let available: Vec<Kernel> = Kernel::ALL
        .into_iter()
        .filter(|k| k.is_available())
        .collect();
    eprintln!("kernels under test: {available:?}");
    available
}

fn run_all(layout: Layout) {
    for (s, &(m, k, n)) in SHAPES.iter().enumerate() {
        let case = Case::new(m, k, n, layout, 10 * s as u64 + 1);
        let (av, bv) = case.views();
        let c0 = values(m * n, 99);
        for kernel in kernels() {
            let mut c = c0.clone();
            gemm_with(kernel, &mut c, av, bv, m, k, n, false);
            check(kernel, &case, &c, None).unwrap_or_else(|e| panic!("{m}x{k}x{n} overwrite: {e}"));
            let mut c = c0.clone();
            gemm_with(kernel, &mut c, av, bv, m, k, n, true);
            check(kernel, &case, &c, Some(&c0))
                .unwrap_or_else(|e| panic!("{m}x{k}x{n} accumulate: {e}"));
            let packed = PackedB::with_kernel(kernel, bv, k, n);
            assert_eq!((packed.k(), packed.n(), packed.kernel()), (k, n, kernel));
            for accumulate in [false, true] {
                let mut c = c0.clone();
                gemm_packed(&mut c, av, &packed, m, accumulate);
                check(kernel, &case, &c, accumulate.then_some(&c0[..]))
                    .unwrap_or_else(|e| panic!("{m}x{k}x{n} packed, accumulate {accumulate}: {e}"));
            }
        }
    }
}

#[test]
fn nt_layout_matches_reference() {
    run_all(Layout::Nt);
}

#[test]
fn nn_layout_matches_reference() {
    run_all(Layout::Nn);
}

#[test]
fn tn_layout_matches_reference() {
    run_all(Layout::Tn);
}

/// Operands larger than the packing bound (8 MiB of bf16; these are beyond twice that) are
/// packed in parts: along `n` (an LM head's forward), along `m` (its weight gradient), along
/// `k` (its input gradient), each written through the row stride of `c`, and the result still
/// matches the reference.
#[test]
fn operands_beyond_the_packing_bound_are_split() {
    for (m, k, n, layout) in [
        (40, 300, 30_000, Layout::Nt),
        (30_000, 300, 40, Layout::Tn),
        (8, 1_100_000, 8, Layout::Nn),
    ] {
        assert!(m * k > 8 << 20 || k * n > 8 << 20, "not beyond the bound");
        let case = Case::new(m, k, n, layout, 7);
        let (av, bv) = case.views();
        let c0 = values(m * n, 3);
        for kernel in kernels() {
            for accumulate in [false, true] {
                let mut c = c0.clone();
                gemm_with(kernel, &mut c, av, bv, m, k, n, accumulate);
                check(kernel, &case, &c, accumulate.then_some(&c0[..]))
                    .unwrap_or_else(|e| panic!("{m}x{k}x{n}, accumulate {accumulate}: {e}"));
                if m * k > 8 << 20 && m > 32 {
                    // A left operand beyond the bound against a prepacked right one.
                    let packed = PackedB::with_kernel(kernel, bv, k, n);
                    let mut c = c0.clone();
                    gemm_packed(&mut c, av, &packed, m, accumulate);
                    check(kernel, &case, &c, accumulate.then_some(&c0[..]))
                        .unwrap_or_else(|e| panic!("{m}x{k}x{n} packed: {e}"));
                }
            }
        }
    }
}

#[test]
fn packed_constructors_match_views() {
    let (m, k, n) = (19, 70, 45);
    let case = Case::new(m, k, n, Layout::Nt, 5);
    let mut c = vec![0.0; m * n];
    gemm_packed(
        &mut c,
        MatRef::row_major(&case.a, k),
        &PackedB::from_nk(&case.b, n, k),
        m,
        false,
    );
    check(best_kernel(), &case, &c, None).unwrap();
    let case = Case::new(m, k, n, Layout::Nn, 6);
    gemm_packed(
        &mut c,
        MatRef::row_major(&case.a, k),
        &PackedB::from_kn(&case.b, k, n),
        m,
        false,
    );
    check(best_kernel(), &case, &c, None).unwrap();
}

/// A left operand put row by row by its producer (into a reused buffer of stale values) gives
/// the products of the same operand packed whole, bit for bit.
#[test]
fn rows_put_by_their_producer_give_the_pack_of_from_rows() {
    use rayon::prelude::*;
    for (m, k, n) in [(37, 70, 45), (64, 576, 96), (5, 33, 20), (1, 1, 1)] {
        // A buffer of NaNs handed back, so the next pack may reuse it.
        PackedA::from_rows(&vec![f32::NAN; 64 * 640], 64, 640).recycle();
        let Some(mut put) = PackedA::for_rows(m, k) else {
            return; // the f32 kernel packs nothing
        };
        let case = Case::new(m, k, n, Layout::Nt, 60);
        put.row_tiles_mut().enumerate().for_each(|(i, tile)| {
            for (r, row) in case.a.chunks(k).skip(16 * i).take(16).enumerate() {
                PackedA::put_row(tile, r, row);
            }
        });
        let whole = PackedA::from_rows(&case.a, m, k);
        let b = PackedB::from_nk(&case.b, n, k);
        let (mut c_put, mut c_whole) = (vec![0.0; m * n], vec![0.0; m * n]);
        gemm_terms(&mut c_put, &[(&put, &b)], false);
        gemm_terms(&mut c_whole, &[(&whole, &b)], false);
        assert_eq!(c_put, c_whole, "{m}x{k}x{n}");
        check(best_kernel(), &case, &c_put, None).unwrap();
    }
}

/// The pack of a transpose made from the operand's own pack gives the products of packing the
/// transposed view, bit for bit (partial tiles on every side, a reused buffer of NaNs).
#[test]
fn transposed_pack_gives_the_pack_of_the_transposed_view() {
    for (m, k, n) in [
        (37, 70, 45),
        (1024, 576, 64),
        (5, 33, 20),
        (64, 16, 1),
        (1, 1, 1),
    ] {
        PackedA::from_rows(&vec![f32::NAN; 64 * 640], 64, 640).recycle();
        // c[k, n] = a[m, k]^T · b[m, n]
        let case = Case::new(k, m, n, Layout::Tn, 62);
        let a = PackedA::from_rows(&case.a, m, k);
        let from_pack = a.transposed();
        let from_view = PackedA::new(MatRef::transpose_of(&case.a, k), k, m);
        assert_eq!((from_pack.m(), from_pack.k()), (k, m));
        let b = PackedB::from_kn(&case.b, m, n);
        let (mut c_pack, mut c_view) = (vec![0.0; k * n], vec![0.0; k * n]);
        gemm_terms(&mut c_pack, &[(&from_pack, &b)], false);
        gemm_terms(&mut c_view, &[(&from_view, &b)], false);
        assert_eq!(c_pack, c_view, "{m}x{k}, n {n}");
        check(best_kernel(), &case, &c_pack, None).unwrap();
    }
}

/// A sum of products sharing m and n (a base weight plus a LoRA branch of rank 16, and a third
/// term of another depth) equals chaining the products one by one, bit for bit, and each
/// product equals the reference.
#[test]
fn sum_of_products_equals_chained_products() {
    for (m, n) in [(37, 45), (64, 96), (1, 1)] {
        let ks = [70, 16, 33];
        let cases: Vec<Case> = ks
            .iter()
            .enumerate()
            .map(|(i, &k)| Case::new(m, k, n, Layout::Nt, 40 + i as u64))
            .collect();
        let packed: Vec<(PackedA, PackedB)> = cases
            .iter()
            .map(|cs| {
                let a = PackedA::from_rows(&cs.a, m, cs.k);
                let b = PackedB::transient(MatRef::transpose_of(&cs.b, cs.k), cs.k, n);
                (a, b)
            })
            .collect();
        let terms: Vec<(&PackedA, &PackedB)> = packed.iter().map(|(a, b)| (a, b)).collect();
        for accumulate in [false, true] {
            let c0 = values(m * n, 50);
            let mut summed = c0.clone();
            gemm_terms(&mut summed, &terms, accumulate);
            let mut chained = c0.clone();
            for (i, cs) in cases.iter().enumerate() {
                let b = PackedB::from_nk(&cs.b, n, cs.k);
                let a = MatRef::row_major(&cs.a, cs.k);
                gemm_packed(&mut chained, a, &b, m, accumulate || i > 0);
            }
            assert_eq!(summed, chained, "{m}x{n}, accumulate {accumulate}");
        }
        // The first term alone against the f64 reference.
        let mut c = vec![0.0; m * n];
        gemm_terms(&mut c, &terms[..1], false);
        check(best_kernel(), &cases[0], &c, None).unwrap();
        for (a, b) in packed {
            a.recycle();
            b.recycle();
        }
    }
}

/// The default entry point runs the detected kernel.
#[test]
fn default_kernel_matches_reference() {
    let (m, k, n) = (70, 65, 80);
    let case = Case::new(m, k, n, Layout::Tn, 12);
    let (av, bv) = case.views();
    let mut c = vec![0.0; m * n];
    gemm_bf16(&mut c, av, bv, m, k, n, false);
    check(best_kernel(), &case, &c, None).unwrap();
    assert!(best_kernel().is_available());
}

/// Views with padding between rows (a sub-matrix of a wider buffer).
#[test]
fn strided_views() {
    let (m, k, n) = (37, 50, 29);
    let (lda, ldb) = (k + 3, n + 5);
    let (a_wide, b_wide) = (values(m * lda, 7), values(k * ldb, 8));
    let a: Vec<f32> = (0..m)
        .flat_map(|i| a_wide[i * lda..i * lda + k].to_vec())
        .collect();
    let b: Vec<f32> = (0..k)
        .flat_map(|p| b_wide[p * ldb..p * ldb + n].to_vec())
        .collect();
    for kernel in kernels() {
        let (mut want, mut got) = (vec![0.0; m * n], vec![0.0; m * n]);
        gemm_with(
            kernel,
            &mut want,
            MatRef::row_major(&a, k),
            MatRef::row_major(&b, n),
            m,
            k,
            n,
            false,
        );
        gemm_with(
            kernel,
            &mut got,
            MatRef::new(&a_wide, lda, 1),
            MatRef::new(&b_wide, ldb, 1),
            m,
            k,
            n,
            false,
        );
        assert_eq!(want, got, "{kernel:?}");
    }
}

#[test]
fn empty_inner_dimension() {
    for kernel in kernels() {
        let mut c = vec![1.0f32; 6];
        gemm_with(
            kernel,
            &mut c,
            MatRef::row_major(&[], 0),
            MatRef::row_major(&[], 3),
            2,
            0,
            3,
            true,
        );
        assert_eq!(c, vec![1.0; 6]);
        gemm_with(
            kernel,
            &mut c,
            MatRef::row_major(&[], 0),
            MatRef::row_major(&[], 3),
            2,
            0,
            3,
            false,
        );
        assert_eq!(c, vec![0.0; 6]);
        let packed = PackedB::with_kernel(kernel, MatRef::row_major(&[], 3), 0, 3);
        let mut c = vec![1.0f32; 6];
        gemm_packed(&mut c, MatRef::row_major(&[], 0), &packed, 2, true);
        assert_eq!(c, vec![1.0; 6]);
        gemm_packed(&mut c, MatRef::row_major(&[], 0), &packed, 2, false);
        assert_eq!(c, vec![0.0; 6]);
        // Empty outputs.
        let packed = PackedB::with_kernel(kernel, MatRef::row_major(&[0.5; 4], 1), 4, 0);
        gemm_packed(&mut [], MatRef::row_major(&[1.0; 8], 4), &packed, 2, false);
        let (a, b) = (MatRef::row_major(&[], 4), MatRef::row_major(&[0.5; 4], 1));
        gemm_with(kernel, &mut [], a, b, 0, 4, 1, false);
    }
}

#[test]
#[should_panic(expected = "exceeds")]
fn out_of_bounds_view_panics() {
    let mut c = vec![0.0f32; 4];
    let a = vec![0.0f32; 3];
    gemm_with(
        Kernel::F32,
        &mut c,
        MatRef::row_major(&a, 2),
        MatRef::row_major(&a, 2),
        2,
        2,
        2,
        false,
    );
}

/// The checks reject results a wrong kernel would produce.
#[test]
fn checker_rejects_wrong_results() {
    let (m, k, n) = (17, 33, 9);
    let case = Case::new(m, k, n, Layout::Nt, 3);
    let right: Vec<f32> = case.rounded.iter().map(|&x| x as f32).collect();
    assert!(check(Kernel::Avx512Bf16, &case, &right, None).is_ok());
    // Off by one bf16 ulp in one element: passes the loose bound, fails the exact one.
    let mut off = right.clone();
    off[40] += off[40].abs() * 2f32.powi(-8) + 1e-3;
    assert!(check(Kernel::Avx512Bf16, &case, &off, None).is_err());
    // Operands used without transposing b (the nn reading of nt data).
    let swapped = Case::new(m, k, n, Layout::Nn, 3);
    let wrong: Vec<f32> = swapped.rounded.iter().map(|&x| x as f32).collect();
    assert!(check(Kernel::Avx512Bf16, &case, &wrong, None).is_err());
    // Unrounded inputs do not pass as a bf16 result (the f32 reference is not a bf16 one).
    let unrounded: Vec<f32> = case.exact.iter().map(|&x| x as f32).collect();
    assert!(check(Kernel::Avx512Bf16, &case, &unrounded, None).is_err());
    // Accumulation forgotten.
    let c0 = values(m * n, 4);
    assert!(check(Kernel::Avx512Bf16, &case, &right, Some(&c0)).is_err());
}
