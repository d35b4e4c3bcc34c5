//! Rotary position embedding, rotate-half convention of Hugging Face transformers.
//!
//! Per head, with `x1 = x[..HD/2]`, `x2 = x[HD/2..]` and angle `pos * inv_freq[i]`:
//! `out1 = x1 cos - x2 sin`, `out2 = x2 cos + x1 sin`. The backward is the transpose rotation.

use crate::config::RopeScaling;
use crate::ops::swiglu::{as_f32, as_f32_mut, simd_dispatch};
use crate::Float;
use rayon::prelude::*;
use std::f64::consts::PI;

/// Tokens per rayon task (each costs NH * HD).
const ROWS_PER_TASK: usize = 16;

/// Precomputed `cos` and `sin` of every (position, frequency) angle.
#[derive(Clone, Debug)]
pub struct RopeTable<T> {
    /// `[max_pos, half]`: `cos(pos * inv_freq[i])`.
    pub cos: Vec<T>,
    /// `[max_pos, half]`: `sin(pos * inv_freq[i])`.
    pub sin: Vec<T>,
    /// HD / 2: frequencies per head.
    pub half: usize,
    /// Positions covered: `0..max_pos`.
    pub max_pos: usize,
}

/// `inv_freq[i] = theta^(-2i / HD)` for `i in 0..HD/2`, then `scaling` as transformers applies it.
fn inv_freqs(head_dim: usize, theta: f64, scaling: Option<&RopeScaling>) -> Vec<f64> {
    let base = (0..head_dim / 2).map(|i| 1.0 / theta.powf((2 * i) as f64 / head_dim as f64));
    match scaling {
        None => base.collect(),
        // transformers `_compute_llama3_parameters`.
        Some(&RopeScaling::Llama3 {
            factor,
            low_freq_factor: low,
            high_freq_factor: high,
            original_max_position_embeddings: orig,
        }) => {
            let orig = orig as f64;
            let (low_wavelen, high_wavelen) = (orig / low, orig / high);
            base.map(|inv| {
                let wavelen = 2.0 * PI / inv;
                if wavelen > low_wavelen {
                    inv / factor
                } else if wavelen < high_wavelen {
                    inv
                } else {
                    let smooth = (orig / wavelen - low) / (high - low);
                    (1.0 - smooth) * inv / factor + smooth * inv
                }
            })
            .collect()
        }
    }
}

impl<T: Float> RopeTable<T> {
    /// Tables for positions `0..max_pos`; angles are computed in f64, then rounded to `T`.
    pub fn new(head_dim: usize, max_pos: usize, theta: f64, scaling: Option<&RopeScaling>) -> Self {
        assert!(
            head_dim.is_multiple_of(2),
            "RoPE needs an even head_dim, got {head_dim}"
        );
        let half = head_dim / 2;
        let inv = inv_freqs(head_dim, theta, scaling);
        let (mut cos, mut sin) = (
            Vec::with_capacity(max_pos * half),
            Vec::with_capacity(max_pos * half),
        );
        for pos in 0..max_pos {
            for &f in &inv {
                let (s, c) = (pos as f64 * f).sin_cos();
                cos.push(T::of(c));
                sin.push(T::of(s));
            }
        }
        RopeTable {
            cos,
            sin,
            half,
            max_pos,
        }
    }
}

/// Applies the rotation of each token's position, or its transpose, to every head in place.
fn rotate<T: Float>(
    x: &mut [T],
    positions: &[u32],
    table: &RopeTable<T>,
    n_heads: usize,
    head_dim: usize,
    transpose: bool,
) {
    let half = head_dim / 2;
    assert!(
        half == table.half && head_dim.is_multiple_of(2),
        "RoPE table built for another head_dim"
    );
    assert_eq!(
        x.len(),
        positions.len() * n_heads * head_dim,
        "RoPE: x must be [N, NH, HD]"
    );
    if x.is_empty() {
        return;
    }
    // sin -> -sin turns the rotation into its transpose (its inverse).
    let sign = if transpose { -T::one() } else { T::one() };
    x.par_chunks_mut(n_heads * head_dim)
        .zip(positions)
        .with_min_len(ROWS_PER_TASK)
        .for_each(|(row, &pos)| {
            let pos = pos as usize;
            assert!(
                pos < table.max_pos,
                "RoPE: position {pos} beyond table of {}",
                table.max_pos
            );
            let cos = &table.cos[pos * half..(pos + 1) * half];
            let sin = &table.sin[pos * half..(pos + 1) * half];
            match (as_f32_mut(row), as_f32(cos), as_f32(sin), as_f32(&[sign])) {
                (Some(row), Some(cos), Some(sin), Some(&[sign])) => {
                    rotate_row_f32(row, cos, sin, head_dim, sign)
                }
                _ => rotate_row(row, cos, sin, head_dim, sign),
            }
        });
}

/// Every head of one token's row by the angles of its position.
#[inline(always)]
fn rotate_row<T: Float>(row: &mut [T], cos: &[T], sin: &[T], head_dim: usize, sign: T) {
    for head in row.chunks_exact_mut(head_dim) {
        let (x1, x2) = head.split_at_mut(head_dim / 2);
        for (((a, b), &c), &s) in x1.iter_mut().zip(x2).zip(cos).zip(sin) {
            let s = sign * s;
            let (u, v) = (*a, *b);
            *a = u * c - v * s;
            *b = v * c + u * s;
        }
    }
}

simd_dispatch!(
    /// [`rotate_row`] in f32, built for AVX-512 where the CPU has it (same bits).
    fn rotate_row_f32 => rotate_row_f32_body(
        row: &mut [f32],
        cos: &[f32],
        sin: &[f32],
        head_dim: usize,
        sign: f32
    )
);

#[inline(always)]
fn rotate_row_f32_body(row: &mut [f32], cos: &[f32], sin: &[f32], head_dim: usize, sign: f32) {
    rotate_row(row, cos, sin, head_dim, sign);
}

/// In place: `x[N, NH, HD]` rotated by the angles of `positions[N]` (Hugging Face rotate-half).
pub fn rope_forward<T: Float>(
    x: &mut [T],
    positions: &[u32],
    table: &RopeTable<T>,
    n_heads: usize,
    head_dim: usize,
) {
    rotate(x, positions, table, n_heads, head_dim, false);
}

/// In place: turns `dx[N, NH, HD]`, the gradient wrt RoPE's output, into the gradient wrt its
/// input (the transpose rotation). Unlike most backwards it overwrites rather than adds.
pub fn rope_backward<T: Float>(
    dx: &mut [T],
    positions: &[u32],
    table: &RopeTable<T>,
    n_heads: usize,
    head_dim: usize,
) {
    rotate(dx, positions, table, n_heads, head_dim, true);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::gradcheck::{check_grad_out, max_rel_diff, randv, to_f32};

    const NH: usize = 3;
    const HD: usize = 8;
    const POS: [u32; 5] = [0, 1, 7, 3, 30];

    fn forward(x: &[f64], table: &RopeTable<f64>) -> Vec<f64> {
        let mut y = x.to_vec();
        rope_forward(&mut y, &POS, table, NH, HD);
        y
    }

    #[test]
    fn rope_gradcheck_identity_and_inverse() {
        let table = RopeTable::<f64>::new(HD, 32, 10000.0, None);
        let (x, r) = (randv(POS.len() * NH * HD, 1), randv(POS.len() * NH * HD, 2));
        let mut dx = r.clone();
        rope_backward(&mut dx, &POS, &table, NH, HD);
        let err = check_grad_out("rope dx", &x, &dx, &r, |x| forward(x, &table));
        assert!(err < 1e-6);
        // Position 0 is the identity.
        let y = forward(&x, &table);
        assert_eq!(y[..NH * HD], x[..NH * HD]);
        // Orthogonal: backward undoes forward.
        let mut back = y.clone();
        rope_backward(&mut back, &POS, &table, NH, HD);
        assert!(max_rel_diff(&back, &x) < 1e-14);
        // Rotate-half pairing by hand: head 1 of token 1 (position 1), frequency 1 = theta^(-2/8).
        let (f, k) = (10000f64.powf(-0.25), NH * HD + HD + 1);
        assert!((y[k] - (x[k] * f.cos() - x[k + HD / 2] * f.sin())).abs() < 1e-14);
        assert!((y[k + HD / 2] - (x[k + HD / 2] * f.cos() + x[k] * f.sin())).abs() < 1e-14);
    }

    #[test]
    fn rope_f32_matches_f64() {
        let x = randv(POS.len() * NH * HD, 3);
        let y = forward(&x, &RopeTable::<f64>::new(HD, 32, 10000.0, None));
        let mut y32 = to_f32(&x);
        rope_forward(
            &mut y32,
            &POS,
            &RopeTable::<f32>::new(HD, 32, 10000.0, None),
            NH,
            HD,
        );
        assert!(max_rel_diff(&y32, &y) < 1e-5);
    }

    /// Llama 3.1: theta 500000, HD 128, factor 8, low 1, high 4, original context 8192, so
    /// wavelengths above 8192 are divided by 8, below 2048 kept, between interpolated.
    #[test]
    fn rope_llama3_scaling_by_hand() {
        let scaling = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        let inv = inv_freqs(128, 500000.0, Some(&scaling));
        // i = 0: inv 1, wavelen 2*pi < 2048: kept.
        assert_eq!(inv[0], 1.0);
        // i = 20: inv 500000^(-40/128) = 0.016560440080994446, wavelen 379.4: kept.
        assert!((inv[20] - 0.016560440080994446).abs() < 1e-17);
        // i = 32: inv 500000^(-1/2) = 1/sqrt(500000) = 0.001414213562373095,
        // wavelen 2*pi*sqrt(500000) = 4442.882938158366, smooth = (8192/4442.88.. - 1) / 3
        // = 0.28128260516325104; (1 - smooth) * inv / 8 + smooth * inv = 0.0005248461609929547.
        assert!((inv[32] - 0.0005248461609929547).abs() < 1e-17);
        // i = 30: inv 500000^(-60/128) = 0.0021311195369119653, wavelen 2948.30, smooth
        // 0.5928492950029659: 0.0013718935677611381.
        assert!((inv[30] - 0.0013718935677611381).abs() < 1e-17);
        // i = 35: inv 500000^(-70/128) = 0.0007644969883171747, wavelen 8218.7 > 8192: / 8.
        assert!((inv[35] - 0.0007644969883171747 / 8.0).abs() < 1e-18);
        // i = 63: 500000^(-126/128) / 8 = 3.068925988914511e-07.
        assert!((inv[63] - 3.068925988914511e-07).abs() < 1e-20);
        // The table holds those frequencies: the angle at position 1 is inv_freq itself.
        let table = RopeTable::<f64>::new(128, 2, 500000.0, Some(&scaling));
        let angle = table.sin[64 + 32].atan2(table.cos[64 + 32]);
        assert!((angle - 0.0005248461609929547).abs() < 1e-17);
        // Without scaling, i = 32 keeps 1/sqrt(500000).
        assert!((inv_freqs(128, 500000.0, None)[32] - 0.001414213562373095).abs() < 1e-18);
    }

    /// The AVX-512 build of the f32 rotation (where the CPU has it) has the baseline's bits.
    #[test]
    fn rotate_row_simd_build_agrees() {
        let hd = 64;
        let row = to_f32(&randv(3 * hd, 5));
        let (cos, sin) = (to_f32(&randv(hd / 2, 6)), to_f32(&randv(hd / 2, 7)));
        for sign in [1.0f32, -1.0] {
            let (mut wide, mut base) = (row.clone(), row.clone());
            rotate_row_f32(&mut wide, &cos, &sin, hd, sign);
            rotate_row(&mut base, &cos, &sin, hd, sign);
            assert_eq!(wide, base);
            assert_ne!(wide, row, "rotated");
        }
    }
}
