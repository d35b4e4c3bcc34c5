//! SwiGLU gate of the Llama MLP: `out = silu(gate) * up`, `silu(x) = x * sigmoid(x)`.
//!
//! Also home of the f32 vector math the other ops share ([`exp_f32`], the f32 fast-path
//! dispatch): libm's `expf` is a call per element that blocks vectorisation, while the
//! polynomial below compiles to straight-line SIMD code.

use crate::ops::matmul::{pack_for_rows, pack_rows};
use crate::Float;
use rayon::prelude::*;
use retune_gemm::PackedA;
use std::any::TypeId;

/// Elements per rayon task: large enough to amortise the task, small enough to balance.
const CHUNK: usize = 16 * 1024;
/// SIMD-friendly inner block: loops over `chunks_exact(LANES)` have no bounds checks.
const LANES: usize = 16;

/// `x` as `&[f32]` when `T` is f32 (the fast path), `None` for f64 (the exact path).
#[inline]
pub(crate) fn as_f32<T: Float>(x: &[T]) -> Option<&[f32]> {
    if TypeId::of::<T>() == TypeId::of::<f32>() {
        // SAFETY: T is f32, so the cast is the identity on layout and lifetime.
        Some(unsafe { std::slice::from_raw_parts(x.as_ptr().cast(), x.len()) })
    } else {
        None
    }
}

/// Mutable [`as_f32`].
#[inline]
pub(crate) fn as_f32_mut<T: Float>(x: &mut [T]) -> Option<&mut [f32]> {
    if TypeId::of::<T>() == TypeId::of::<f32>() {
        // SAFETY: T is f32, so the cast is the identity on layout and lifetime.
        Some(unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr().cast(), x.len()) })
    } else {
        None
    }
}

/// `e^x` for f32 without a libm call (Cephes `expf`: range reduction by ln 2 in two parts,
/// degree-7 polynomial), within 2 ulp of the exact value on the normal range. Inputs below
/// ln(2^-126) give exactly 0 (so a `-inf` mask becomes an exact 0), above 88.37 +inf (exact
/// only from 88.72 on; nothing here comes near).
#[inline(always)]
pub(crate) fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 * 2^23 rounds to an integer in the low mantissa bits, with no libm floor.
    const ROUND: f32 = 12_582_912.0;
    const LO: f32 = -87.336_55; // ln(2^-126): 2^n stays a normal number
    const HI: f32 = 88.37; // just below ln(2^127.5): n stays <= 127
    let xc = x.clamp(LO, HI);
    let big = xc * LOG2E + ROUND;
    let n = big - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5; // Cephes 5.0000001201e-1, which rounds to 0.5 in f32
    let p = p * r * r + r + 1.0;
    // 2^n from the integer in `big`'s mantissa: n + 127 in [1, 254], a valid exponent field.
    let n_int = big.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    let pow2 = f32::from_bits(((n_int + 127) as u32) << 23);
    let y = p * pow2;
    if x < LO {
        0.0
    } else if x > HI {
        f32::INFINITY
    } else {
        y
    }
}

/// The largest of `s` (`-inf` when empty), 16 independent lanes so it vectorises; for the
/// `#[inline(always)]` kernel bodies of [`simd_dispatch`].
#[inline(always)]
pub(crate) fn max_f32(s: &[f32]) -> f32 {
    let mut maxes = [f32::NEG_INFINITY; LANES];
    let mut blocks = s.chunks_exact(LANES);
    for blk in &mut blocks {
        for l in 0..LANES {
            maxes[l] = if blk[l] > maxes[l] { blk[l] } else { maxes[l] };
        }
    }
    blocks
        .remainder()
        .iter()
        .chain(&maxes)
        .fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m })
}

/// Whether the CPU runs the AVX-512 builds of the f32 kernels. The crate targets baseline
/// x86-64 (SSE2), where the polynomial exp runs 4 lanes wide; AVX-512 gives 16.
#[inline]
pub(crate) fn has_avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Defines `$name`, which runs the `#[inline(always)]` kernel `$body` compiled for AVX-512 when
/// [`has_avx512`], else the baseline build. Both builds give bitwise equal results (Rust does
/// not contract `a * b + c` into an FMA on its own).
macro_rules! simd_dispatch {
    ($(#[$meta:meta])* fn $name:ident => $body:ident($($arg:ident: $ty:ty),*)) => {
        $(#[$meta])*
        pub(crate) fn $name($($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                unsafe fn wide($($arg: $ty),*) {
                    $body($($arg),*)
                }
                if $crate::ops::swiglu::has_avx512() {
                    // SAFETY: the CPU supports the features `wide` is compiled for.
                    return unsafe { wide($($arg),*) };
                }
            }
            $body($($arg),*)
        }
    };
}
pub(crate) use simd_dispatch;

/// `1 / (1 + e^-x)` in f32 (saturates to exactly 0 and 1 in the tails, never NaN).
#[inline(always)]
fn sigmoid_f32(x: f32) -> f32 {
    1.0 / (1.0 + exp_f32(-x))
}

fn sigmoid<T: Float>(x: T) -> T {
    T::one() / (T::one() + (-x).exp())
}

simd_dispatch!(
    /// f32 forward: blocks of `LANES` so the loop body is branch-free and vectorises.
    fn swiglu_forward_f32 => swiglu_forward_f32_body(out: &mut [f32], gate: &[f32], up: &[f32])
);
simd_dispatch!(
    /// f32 backward, the formulas of [`swiglu_backward`] in vectorisable blocks.
    fn swiglu_backward_f32 => swiglu_backward_f32_body(
        accumulate: bool,
        dgate: &mut [f32],
        dup: &mut [f32],
        dout: &[f32],
        gate: &[f32],
        up: &[f32]
    )
);

#[inline(always)]
fn swiglu_forward_f32_body(out: &mut [f32], gate: &[f32], up: &[f32]) {
    let mut o = out.chunks_exact_mut(LANES);
    let mut g = gate.chunks_exact(LANES);
    let mut u = up.chunks_exact(LANES);
    for ((o, g), u) in (&mut o).zip(&mut g).zip(&mut u) {
        for l in 0..LANES {
            o[l] = g[l] * sigmoid_f32(g[l]) * u[l];
        }
    }
    let tail = o.into_remainder().iter_mut().zip(g.remainder());
    for ((o, &g), &u) in tail.zip(u.remainder()) {
        *o = g * sigmoid_f32(g) * u;
    }
}

#[inline(always)]
fn swiglu_backward_f32_body(
    accumulate: bool,
    dgate: &mut [f32],
    dup: &mut [f32],
    dout: &[f32],
    gate: &[f32],
    up: &[f32],
) {
    // `accumulate` is the same for the whole call: the compiler hoists the branch.
    let one = |dg: &mut f32, du: &mut f32, d: f32, g: f32, u: f32| {
        let s = sigmoid_f32(g);
        let (vg, vu) = (d * u * s * (1.0 + g * (1.0 - s)), d * g * s);
        if accumulate {
            (*dg, *du) = (*dg + vg, *du + vu);
        } else {
            (*dg, *du) = (vg, vu);
        }
    };
    let mut dg = dgate.chunks_exact_mut(LANES);
    let mut du = dup.chunks_exact_mut(LANES);
    let mut d = dout.chunks_exact(LANES);
    let mut g = gate.chunks_exact(LANES);
    let mut u = up.chunks_exact(LANES);
    for ((((dg, du), d), g), u) in (&mut dg).zip(&mut du).zip(&mut d).zip(&mut g).zip(&mut u) {
        for l in 0..LANES {
            one(&mut dg[l], &mut du[l], d[l], g[l], u[l]);
        }
    }
    let (dg, du) = (dg.into_remainder(), du.into_remainder());
    let (d, g, u) = (d.remainder(), g.remainder(), u.remainder());
    for i in 0..dg.len() {
        one(&mut dg[i], &mut du[i], d[i], g[i], u[i]);
    }
}

/// `out[N, F] = silu(gate[N, F]) * up[N, F]`.
pub fn swiglu_forward<T: Float>(out: &mut [T], gate: &[T], up: &[T]) {
    assert!(
        out.len() == gate.len() && out.len() == up.len(),
        "swiglu_forward: shape mismatch"
    );
    out.par_chunks_mut(CHUNK)
        .zip(gate.par_chunks(CHUNK))
        .zip(up.par_chunks(CHUNK))
        .for_each(|((o, g), u)| {
            if let (Some(g32), Some(u32)) = (as_f32(g), as_f32(u)) {
                let o32 = as_f32_mut(o).expect("T is f32");
                return swiglu_forward_f32(o32, g32, u32);
            }
            for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                *o = g * sigmoid(g) * u;
            }
        });
}

/// [`swiglu_forward`] of rows `f` wide, and `out` packed for the bf16 products that read it
/// (the result of [`pack_rows`]): under bf16 products each row is packed as it is written.
pub fn swiglu_forward_packed<T: Float>(
    out: &mut [T],
    gate: &[T],
    up: &[T],
    f: usize,
) -> Option<PackedA> {
    let n = out.len() / f.max(1);
    let mut pack = pack_for_rows::<T>(n, f);
    let f32s = (as_f32_mut(out), as_f32(gate), as_f32(up));
    let (Some(p), (Some(out), Some(gate), Some(up))) = (&mut pack, f32s) else {
        swiglu_forward(out, gate, up);
        return pack_rows(out, n, f);
    };
    assert!(
        out.len() == n * f && gate.len() == out.len() && up.len() == out.len(),
        "swiglu_forward: shape mismatch"
    );
    let tile = PackedA::TILE_ROWS * f;
    out.par_chunks_mut(tile)
        .zip(gate.par_chunks(tile).zip(up.par_chunks(tile)))
        .zip(p.row_tiles_mut())
        .for_each(|((o, (g, u)), t)| {
            let rows = o.chunks_mut(f).zip(g.chunks(f).zip(u.chunks(f)));
            for (r, (o, (g, u))) in rows.enumerate() {
                swiglu_forward_f32(o, g, u);
                PackedA::put_row(t, r, o);
            }
        });
    pack
}

/// Backward of [`swiglu_forward`], accumulating into `dgate[N, F]` and `dup[N, F]`:
/// `dgate += dout * up * s (1 + g (1 - s))` with `s = sigmoid(g)`, `dup += dout * g * s`.
pub fn swiglu_backward<T: Float>(dgate: &mut [T], dup: &mut [T], dout: &[T], gate: &[T], up: &[T]) {
    swiglu_backward_with(true, dgate, dup, dout, gate, up)
}

/// [`swiglu_backward`] writing over `dgate` and `dup` instead of adding (they need no zeroing
/// when nothing else adds to them).
pub fn swiglu_backward_overwrite<T: Float>(
    dgate: &mut [T],
    dup: &mut [T],
    dout: &[T],
    gate: &[T],
    up: &[T],
) {
    swiglu_backward_with(false, dgate, dup, dout, gate, up)
}

fn swiglu_backward_with<T: Float>(
    accumulate: bool,
    dgate: &mut [T],
    dup: &mut [T],
    dout: &[T],
    gate: &[T],
    up: &[T],
) {
    let len = dout.len();
    assert!(
        dgate.len() == len && dup.len() == len && gate.len() == len && up.len() == len,
        "swiglu_backward: shape mismatch"
    );
    dgate
        .par_chunks_mut(CHUNK)
        .zip(dup.par_chunks_mut(CHUNK))
        .zip(dout.par_chunks(CHUNK))
        .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
        .for_each(|(((dg, du), d), (g, u))| {
            if let (Some(d32), Some(g32), Some(u32)) = (as_f32(d), as_f32(g), as_f32(u)) {
                let (dg32, du32) = (as_f32_mut(dg).expect("f32"), as_f32_mut(du).expect("f32"));
                return swiglu_backward_f32(accumulate, dg32, du32, d32, g32, u32);
            }
            for ((((dg, du), &d), &g), &u) in dg.iter_mut().zip(du).zip(d).zip(g).zip(u) {
                let s = sigmoid(g);
                let (vg, vu) = (d * u * s * (T::one() + g * (T::one() - s)), d * g * s);
                if accumulate {
                    (*dg, *du) = (*dg + vg, *du + vu);
                } else {
                    (*dg, *du) = (vg, vu);
                }
            }
        });
}

/// [`swiglu_backward_overwrite`] of rows `f` wide and, under bf16 products (as
/// [`swiglu_forward_packed`]), `dgate` and `dup` packed for the products that read them, row by
/// row while each row is in cache: the same values and packs as packing afterwards, without
/// reading the 2 x N x F gradients back. `(None, None)` otherwise (the products pack them).
pub fn swiglu_backward_overwrite_packed<T: Float>(
    dgate: &mut [T],
    dup: &mut [T],
    dout: &[T],
    gate: &[T],
    up: &[T],
    f: usize,
) -> (Option<PackedA>, Option<PackedA>) {
    let n = dout.len() / f.max(1);
    let packs = pack_for_rows::<T>(n, f).zip(pack_for_rows::<T>(n, f));
    let f32s = (
        as_f32_mut(dgate),
        as_f32_mut(dup),
        as_f32(dout),
        as_f32(gate),
        as_f32(up),
    );
    let (Some((mut gp, mut upk)), (Some(dg), Some(du), Some(d), Some(g), Some(u))) = (packs, f32s)
    else {
        swiglu_backward_overwrite(dgate, dup, dout, gate, up);
        return (None, None);
    };
    backward_overwrite_packed_f32(dg, du, d, g, u, f, &mut gp, &mut upk);
    (Some(gp), Some(upk))
}

/// [`swiglu_backward_overwrite_packed`] in f32 into the given packs ([`PackedA::for_rows`]).
#[allow(clippy::too_many_arguments)]
fn backward_overwrite_packed_f32(
    dgate: &mut [f32],
    dup: &mut [f32],
    dout: &[f32],
    gate: &[f32],
    up: &[f32],
    f: usize,
    gate_pack: &mut PackedA,
    up_pack: &mut PackedA,
) {
    let len = dout.len();
    assert!(
        dgate.len() == len && dup.len() == len && gate.len() == len && up.len() == len,
        "swiglu_backward: shape mismatch"
    );
    let n = len / f.max(1);
    assert!(
        f > 0
            && n * f == len
            && [&*gate_pack, &*up_pack]
                .iter()
                .all(|p| p.m() == n && p.k() == f),
        "swiglu_backward: the packs do not fit [N, F]"
    );
    let tile = PackedA::TILE_ROWS * f;
    dgate
        .par_chunks_mut(tile)
        .zip(dup.par_chunks_mut(tile))
        .zip(dout.par_chunks(tile))
        .zip(gate.par_chunks(tile).zip(up.par_chunks(tile)))
        .zip(gate_pack.row_tiles_mut().zip(up_pack.row_tiles_mut()))
        .for_each(|((((dg, du), d), (g, u)), (gt, ut))| {
            let rows = dg
                .chunks_mut(f)
                .zip(du.chunks_mut(f))
                .zip(d.chunks(f).zip(g.chunks(f).zip(u.chunks(f))));
            for (r, ((dg, du), (d, (g, u)))) in rows.enumerate() {
                swiglu_backward_f32(false, dg, du, d, g, u);
                PackedA::put_row(gt, r, dg);
                PackedA::put_row(ut, r, du);
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check_grad_out, max_rel_diff, randv, to_f32};

    const LEN: usize = 40_007; // several rayon chunks and an odd SIMD tail

    fn forward(g: &[f64], u: &[f64]) -> Vec<f64> {
        let mut out = vec![0.0; g.len()];
        swiglu_forward(&mut out, g, u);
        out
    }

    /// Gates spread over [-8, 8) to exercise both tails of the sigmoid.
    fn gates(seed: u64) -> Vec<f64> {
        randv(LEN, seed).iter().map(|x| 8.0 * x).collect()
    }

    /// Distance in units in the last place between two finite f32 of the same sign.
    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_f32_within_2_ulp_and_exact_tails() {
        // Dense sweep of the whole finite-result range, plus the boundaries.
        let mut worst = 0;
        let steps = 2_000_000;
        for i in 0..=steps {
            let x = -87.3 + 175.6 * i as f32 / steps as f32;
            let want = (x as f64).exp() as f32;
            worst = worst.max(ulps(exp_f32(x), want));
        }
        assert!(worst <= 2, "exp_f32 off by {worst} ulp");
        assert_eq!(exp_f32(0.0), 1.0);
        assert_eq!(exp_f32(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_f32(-1000.0), 0.0);
        assert_eq!(exp_f32(1000.0), f32::INFINITY);
        assert_eq!(sigmoid_f32(-200.0), 0.0);
        assert_eq!(sigmoid_f32(200.0), 1.0);
    }

    #[test]
    fn swiglu_forward_reference_and_f32() {
        let (g, u) = (gates(1), randv(LEN, 2));
        let out = forward(&g, &u);
        for i in 0..LEN {
            assert!((out[i] - g[i] / (1.0 + (-g[i]).exp()) * u[i]).abs() < 1e-15);
        }
        let mut out32 = vec![0.0f32; LEN];
        swiglu_forward(&mut out32, &to_f32(&g), &to_f32(&u));
        assert!(max_rel_diff(&out32, &out) < 1e-5);
    }

    #[test]
    fn swiglu_backward_f32_matches_f64() {
        let (g, u, r) = (gates(6), randv(LEN, 7), randv(LEN, 8));
        let (d0, u0) = (randv(LEN, 9), randv(LEN, 10));
        let (mut dg, mut du) = (d0.clone(), u0.clone());
        swiglu_backward(&mut dg, &mut du, &r, &g, &u);
        let (mut dg32, mut du32) = (to_f32(&d0), to_f32(&u0));
        let (r32, g32, uu32) = (to_f32(&r), to_f32(&g), to_f32(&u));
        swiglu_backward(&mut dg32, &mut du32, &r32, &g32, &uu32);
        assert!(max_rel_diff(&dg32, &dg) < 1e-5);
        assert!(max_rel_diff(&du32, &du) < 1e-5);
    }

    /// Writing over garbage gives what adding into zeros gives, in f64 and in f32.
    #[test]
    fn swiglu_backward_overwrite_equals_accumulating_into_zeros() {
        let (g, u, r) = (gates(12), randv(LEN, 13), randv(LEN, 14));
        let (mut dg, mut du) = (vec![0.0; LEN], vec![0.0; LEN]);
        swiglu_backward(&mut dg, &mut du, &r, &g, &u);
        let (mut og, mut ou) = (randv(LEN, 15), randv(LEN, 16));
        swiglu_backward_overwrite(&mut og, &mut ou, &r, &g, &u);
        assert_eq!((og, ou), (dg, du));
        let (g32, u32, r32) = (to_f32(&g), to_f32(&u), to_f32(&r));
        let (mut dg, mut du) = (vec![0.0f32; LEN], vec![0.0f32; LEN]);
        swiglu_backward(&mut dg, &mut du, &r32, &g32, &u32);
        let (mut og, mut ou) = (vec![7.0f32; LEN], vec![-3.0f32; LEN]);
        swiglu_backward_overwrite(&mut og, &mut ou, &r32, &g32, &u32);
        assert_eq!((og, ou), (dg, du));
    }

    #[test]
    fn swiglu_gradcheck() {
        let (g, u, r) = (gates(3), randv(LEN, 4), randv(LEN, 5));
        let (mut dg, mut du) = (vec![0.0; LEN], vec![0.0; LEN]);
        swiglu_backward(&mut dg, &mut du, &r, &g, &u);
        let eg = check_grad_out("swiglu dgate", &g, &dg, &r, |g| forward(g, &u));
        let eu = check_grad_out("swiglu dup", &u, &du, &r, |u| forward(&g, u));
        assert!(eg < 1e-6 && eu < 1e-6);
    }

    /// The AVX-512 build (where the CPU has it) and the baseline build agree bitwise.
    #[test]
    fn swiglu_simd_builds_agree() {
        let (g, u, d) = (
            to_f32(&gates(11)),
            to_f32(&randv(LEN, 12)),
            to_f32(&randv(LEN, 13)),
        );
        let (mut wide, mut base) = (vec![0.0f32; LEN], vec![0.0f32; LEN]);
        swiglu_forward_f32(&mut wide, &g, &u);
        swiglu_forward_f32_body(&mut base, &g, &u);
        assert_eq!(wide, base);
        let (mut dg1, mut du1) = (u.clone(), g.clone());
        let (mut dg2, mut du2) = (u.clone(), g.clone());
        swiglu_backward_f32(true, &mut dg1, &mut du1, &d, &g, &u);
        swiglu_backward_f32_body(true, &mut dg2, &mut du2, &d, &g, &u);
        assert_eq!((dg1, du1), (dg2, du2));
    }

    /// The backward that packs its outputs row by row gives the values of the plain backward
    /// and the packs of packing them afterwards (rows and columns past whole tiles included).
    #[test]
    fn packed_backward_gives_the_values_and_the_packs() {
        use crate::ops::gradcheck::is_pack_of;
        let (n, f) = (37, 70);
        let v = |seed| to_f32(&randv(n * f, seed));
        let (d, g, u) = (v(1), v(2), v(3));
        let (mut dg, mut du) = (vec![f32::NAN; n * f], vec![f32::NAN; n * f]);
        swiglu_backward_overwrite(&mut dg, &mut du, &d, &g, &u);
        let (Some(mut gp), Some(mut upk)) = (PackedA::for_rows(n, f), PackedA::for_rows(n, f))
        else {
            return; // the f32 kernel packs nothing
        };
        let (mut dg2, mut du2) = (vec![f32::NAN; n * f], vec![f32::NAN; n * f]);
        backward_overwrite_packed_f32(&mut dg2, &mut du2, &d, &g, &u, f, &mut gp, &mut upk);
        assert_eq!((&dg2, &du2), (&dg, &du));
        assert!(is_pack_of(&gp, &dg) && is_pack_of(&upk, &du));
        assert!(!is_pack_of(&gp, &du), "the check tells the packs apart");
    }
}
