//! The AVX512-BF16 kernel: `vdpbf16ps` over the same packed layout as the AMX kernel.
//!
//! A 32x32 block is computed as four groups of 8 rows x 32 columns: 16 zmm accumulators, two
//! zmm of B (one k pair of each 16-column strip) and an A pair broadcast per row.

use crate::pack::{BlockArgs, TILE_K, TILE_MN};
use crate::BLOCK;
use std::arch::x86_64::*;

/// Rows of `c` one pass keeps in registers.
const GROUP: usize = 8;
/// bf16 elements of one A tile or one B tile.
const TILE_LEN: usize = TILE_MN * TILE_K;

pub(crate) fn available() -> bool {
    is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bf16")
}

/// Computes the given blocks on the calling thread.
///
/// # Safety
/// AVX512F and AVX512-BF16 must be available. Each block's packed pointers must have `k_tiles`
/// tiles for two m tiles / two strips (the second `k_tiles` tiles after the first), and its `c`
/// pointer must be valid for `rows x cols` elements with row stride `ldc`, written by no one
/// else meanwhile.
#[target_feature(enable = "avx512f,avx512bf16")]
pub(crate) unsafe fn run_blocks(blocks: impl Iterator<Item = BlockArgs>) {
    for blk in blocks {
        // SAFETY: forwarded from this function's contract.
        unsafe { block(&blk) };
    }
}

/// Mask of the first `w` (at most 16) lanes.
fn lanes(w: usize) -> __mmask16 {
    if w >= 16 {
        0xffff
    } else {
        ((1u32 << w) - 1) as u16
    }
}

/// Reinterprets 32 bf16 bit patterns as the bf16 vector type.
#[inline(always)]
fn as_bf16(v: __m512i) -> __m512bh {
    // SAFETY: both are 64-byte plain vectors; every bit pattern is a valid value of either.
    unsafe { std::mem::transmute::<__m512i, __m512bh>(v) }
}

/// # Safety
/// As [`run_blocks`].
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn block(blk: &BlockArgs) {
    let next = blk.k_tiles * TILE_LEN;
    let masks = [lanes(blk.cols), lanes(blk.cols.saturating_sub(TILE_MN))];
    for g in 0..BLOCK / GROUP {
        let r0 = g * GROUP;
        if r0 >= blk.rows {
            break;
        }
        // Group g is rows (g % 2) * 8.. of m tile g / 2.
        let a_group = blk
            .a
            .wrapping_add((g / 2) * next + (g % 2) * GROUP * TILE_K);
        let mut acc = [[_mm512_setzero_ps(); 2]; GROUP];
        for t in 0..blk.k_tiles {
            let a_tile = a_group.wrapping_add(t * TILE_LEN);
            let b_tile = blk.b.wrapping_add(t * TILE_LEN);
            for q in 0..TILE_K / 2 {
                // SAFETY: tile t of both strips is inside the packed B (caller's contract); a
                // k pair of 16 columns is 32 bf16 = 64 bytes.
                let (b0, b1): (__m512bh, __m512bh) = unsafe {
                    (
                        as_bf16(_mm512_loadu_si512(b_tile.add(q * 32) as *const _)),
                        as_bf16(_mm512_loadu_si512(b_tile.add(next + q * 32) as *const _)),
                    )
                };
                for (r, acc_row) in acc.iter_mut().enumerate() {
                    // SAFETY: row r < 16 of A tile t, pair q < 16 lie inside the tile.
                    let pair =
                        unsafe { (a_tile.add(r * TILE_K + q * 2) as *const i32).read_unaligned() };
                    let a = as_bf16(_mm512_set1_epi32(pair));
                    acc_row[0] = _mm512_dpbf16_ps(acc_row[0], a, b0);
                    acc_row[1] = _mm512_dpbf16_ps(acc_row[1], a, b1);
                }
            }
        }
        for (r, acc_row) in acc.iter().enumerate().take(blk.rows - r0) {
            for (h, (&mask, &sum)) in masks.iter().zip(acc_row).enumerate() {
                if mask == 0 {
                    continue;
                }
                // SAFETY: row r0 + r < rows and the masked lanes are columns < cols of c.
                unsafe {
                    let p = blk.c.add((r0 + r) * blk.ldc + h * TILE_MN);
                    let v = if blk.accumulate {
                        _mm512_add_ps(sum, _mm512_maskz_loadu_ps(mask, p))
                    } else {
                        sum
                    };
                    _mm512_mask_storeu_ps(p, mask, v);
                }
            }
        }
    }
}
