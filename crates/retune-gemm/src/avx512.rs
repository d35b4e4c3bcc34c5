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
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512bf16")
}

// Packing: `vcvtne2ps2bf16` rounds to nearest even like `pack::to_bf16_bits`, except that it
// flushes f32 subnormals to zero, as the bf16 dot-product instructions do with their inputs.

/// Mask of the first `w` (at most 16) lanes.
fn lanes(w: usize) -> __mmask16 {
    if w >= 16 {
        0xffff
    } else {
        ((1u32 << w) - 1) as u16
    }
}

/// Word permutation turning `[x0..x15, y0..y15]` into the pairs `[x0, y0, x1, y1, ...]`.
#[target_feature(enable = "avx512f")]
fn interleave_index() -> __m512i {
    let idx: [i16; 32] = std::array::from_fn(|w| ((w % 2) * 16 + w / 2) as i16);
    // SAFETY: reads 64 bytes from a 64-byte array.
    unsafe { _mm512_loadu_si512(idx.as_ptr() as *const _) }
}

/// Converts `len` (at most 32) floats from `src` and stores 32 bf16 (zeros past `len`) at `dst`.
///
/// # Safety
/// `src` valid for `len` floats, `dst` for 32 u16; the AVX512 features available.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn convert_32(src: *const f32, len: usize, dst: *mut u16) {
    // SAFETY: forwarded; the store writes 64 bytes at dst.
    unsafe { _mm512_storeu_si512(dst as *mut _, convert_32_reg(src, len)) };
}

/// Converts `len` (at most 32) floats from `src` to 32 bf16 (zeros past `len`) in a register.
///
/// # Safety
/// `src` valid for `len` floats; the AVX512 features available.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn convert_32_reg(src: *const f32, len: usize) -> __m512i {
    // SAFETY: masked loads read only the first len floats.
    let (lo, hi) = unsafe {
        (
            _mm512_maskz_loadu_ps(lanes(len), src),
            _mm512_maskz_loadu_ps(lanes(len.saturating_sub(16)), src.wrapping_add(16)),
        )
    };
    // SAFETY: both are 64-byte plain vectors.
    unsafe { std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo)) }
}

/// Converts two 16-lane vectors and interleaves them into 16 bf16 pairs `(x[i], y[i])`.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
fn convert_pairs(x: __m512, y: __m512, interleave: __m512i) -> __m512i {
    // SAFETY: both are 64-byte plain vectors.
    let words = unsafe { std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(y, x)) };
    _mm512_permutexvar_epi16(interleave, words)
}

/// Transposes a 16x16 matrix of 32-bit elements held one row per vector.
#[target_feature(enable = "avx512f")]
fn transpose_16x16(rows: &[__m512i; 16]) -> [__m512i; 16] {
    // Within each 128-bit lane: 2x2 blocks of 32-bit, then of 64-bit elements. Afterwards
    // lane l of quad[4 j + s] holds row 4 l + s of the result, at columns 4 j..4 j + 4.
    let pairs: [__m512i; 16] = std::array::from_fn(|i| {
        let (x, y) = (rows[i & !1], rows[i | 1]);
        if i % 2 == 0 {
            _mm512_unpacklo_epi32(x, y)
        } else {
            _mm512_unpackhi_epi32(x, y)
        }
    });
    let quad: [__m512i; 16] = std::array::from_fn(|i| {
        let (j, s) = (i / 4, i % 4);
        let (x, y) = (pairs[4 * j + s / 2], pairs[4 * j + 2 + s / 2]);
        if s % 2 == 0 {
            _mm512_unpacklo_epi64(x, y)
        } else {
            _mm512_unpackhi_epi64(x, y)
        }
    });
    // Then a 4x4 transpose of 128-bit lanes among quad[s], quad[4 + s], quad[8 + s], quad[12 + s].
    let mut out = [_mm512_setzero_si512(); 16];
    for s in 0..4 {
        let (v0, v1, v2, v3) = (quad[s], quad[4 + s], quad[8 + s], quad[12 + s]);
        let w0 = _mm512_shuffle_i32x4::<0x44>(v0, v1);
        let w1 = _mm512_shuffle_i32x4::<0xee>(v0, v1);
        let w2 = _mm512_shuffle_i32x4::<0x44>(v2, v3);
        let w3 = _mm512_shuffle_i32x4::<0xee>(v2, v3);
        out[s] = _mm512_shuffle_i32x4::<0x88>(w0, w2);
        out[4 + s] = _mm512_shuffle_i32x4::<0xdd>(w0, w2);
        out[8 + s] = _mm512_shuffle_i32x4::<0x88>(w1, w3);
        out[12 + s] = _mm512_shuffle_i32x4::<0xdd>(w1, w3);
    }
    out
}

/// One tile of the A pack of a transpose, from the A pack of the matrix itself (bf16 to bf16,
/// no f32 read): the tile of rows `16 j_tile..` (the source's columns) and k tile `i_tile`
/// (its rows `32 i_tile..`) of the transpose, into `dst` (512 u16). `src` is the source's pack
/// (`src_kt` k tiles per 16-row tile); its rows from `rows` on read as zeros.
///
/// # Safety
/// `src` holds the row tiles `2 i_tile` and `2 i_tile + 1` of `src_kt` tiles each, and column
/// tile `j_tile / 2`; `dst` valid for 512 u16; the AVX512 features available.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(crate) unsafe fn transpose_a_tile(
    src: *const u16,
    src_kt: usize,
    rows: usize,
    j_tile: usize,
    i_tile: usize,
    dst: *mut u16,
) {
    let (t, half) = (j_tile / 2, (j_tile % 2) * TILE_MN);
    // Lane 2c takes row a's column half + c, lane 2c + 1 row b's: 16 (a, b) pairs.
    let idx: [i16; 32] = std::array::from_fn(|w| ((w % 2) * 32 + half + w / 2) as i16);
    // SAFETY: reads 64 bytes from a 64-byte array.
    let idx = unsafe { _mm512_loadu_si512(idx.as_ptr() as *const _) };
    let pairs: [__m512i; 16] = std::array::from_fn(|q| {
        let i = i_tile * 32 + 2 * q; // source rows i and i + 1, both in row tile i / 16
        let (g, r) = (i / TILE_MN, i % TILE_MN);
        let row = |i: usize, r: usize| {
            let mask: __mmask32 = if i < rows { !0 } else { 0 };
            // SAFETY: row r of k tile t of row tile g is 32 u16 inside src (caller).
            unsafe {
                _mm512_maskz_loadu_epi16(
                    mask,
                    src.add((g * src_kt + t) * TILE_LEN + r * TILE_K) as *const _,
                )
            }
        };
        _mm512_permutex2var_epi16(row(i, r), idx, row(i + 1, r + 1))
    });
    for (c, out) in transpose_16x16(&pairs).iter().enumerate() {
        // SAFETY: row c of the destination tile is 64 bytes inside dst.
        unsafe { _mm512_storeu_si512(dst.add(c * TILE_K) as *mut _, *out) };
    }
}

/// Row `r` of a 16-row A tile from the `k` floats at `src`: every k tile's row `r` of `tile`
/// (all k tiles of the row tile), zeros past `k`.
///
/// # Safety
/// `src` valid for `k` floats; `tile` of `k_tiles * 512` u16; `r < 16`; the AVX512 features
/// available.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(crate) unsafe fn pack_a_row(src: *const f32, k: usize, r: usize, tile: &mut [u16]) {
    debug_assert!(r < TILE_MN && tile.len() >= k.div_ceil(TILE_K) * TILE_LEN);
    for t in 0..k.div_ceil(TILE_K) {
        let p0 = t * TILE_K;
        // SAFETY: columns p0..min(k, p0 + 32) are inside src; row r of k tile t is inside tile.
        unsafe {
            convert_32(
                src.wrapping_add(p0),
                (k - p0).min(TILE_K),
                tile.as_mut_ptr().add((t * TILE_MN + r) * TILE_K),
            )
        };
    }
}

/// [`crate::pack::pack_a`] for k tiles `tiles` of one 16-row tile of `rows` rows starting at
/// `a` (element `(r, p)` at `a + r * rs + p * cs`), into `dst` (all k tiles of the row tile).
///
/// # Safety
/// Every `(r, p)` with `r < rows`, `p < k` inside the source; `dst` of `k_tiles * 512` u16,
/// 64-byte aligned; `tiles` within `0..k_tiles`; either `cs == 1` or `rs == 1`; the AVX512
/// features available.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(crate) unsafe fn pack_a_tile(
    a: *const f32,
    rs: usize,
    cs: usize,
    rows: usize,
    k: usize,
    tiles: std::ops::Range<usize>,
    dst: &mut [u16],
) {
    debug_assert!(dst.len() >= k.div_ceil(TILE_K) * TILE_LEN);
    if cs == 1 {
        for r in 0..rows {
            for t in tiles.clone() {
                let p0 = t * TILE_K;
                // SAFETY: row r, columns p0..min(k, p0 + 32) are inside the source; the
                // destination row is inside dst.
                unsafe {
                    convert_32(
                        a.wrapping_add(r * rs + p0),
                        (k - p0).min(TILE_K),
                        dst.as_mut_ptr().add((t * TILE_MN + r) * TILE_K),
                    )
                };
            }
        }
    } else {
        // Rows are contiguous: convert 16 rows of two columns into a vector of 16 pairs (one
        // per row), then transpose 16 such vectors into the tile's 16 rows.
        let interleave = interleave_index();
        let mask = lanes(rows);
        let column = |p: usize| {
            if p < k {
                // SAFETY: rows r < rows of column p are inside the source (masked load).
                unsafe { _mm512_maskz_loadu_ps(mask, a.wrapping_add(p * cs)) }
            } else {
                _mm512_setzero_ps()
            }
        };
        for t in tiles {
            let pairs: [__m512i; 16] = std::array::from_fn(|q| {
                let p = t * TILE_K + 2 * q;
                convert_pairs(column(p), column(p + 1), interleave)
            });
            for (r, row) in transpose_16x16(&pairs).iter().enumerate() {
                // SAFETY: row r of tile t is 64 bytes inside dst.
                unsafe {
                    _mm512_storeu_si512(
                        dst.as_mut_ptr().add((t * TILE_MN + r) * TILE_K) as *mut _,
                        *row,
                    )
                };
            }
        }
    }
}

/// [`crate::pack::pack_b`] of a row-major `b` (row stride `rs`, `cols` valid columns) for the
/// k pairs `pairs` of all `strips` 16-column strips of `strip_len` u16 each at `dst`. Each row
/// pair is read whole, across all the strips: the rows stream through in memory order.
///
/// # Safety
/// Every `(p, c)` with `p < k`, `c < cols` inside the source; `dst` valid for `strips` strips
/// of `strip_len >= k_tiles * 512` u16 each, 64-byte aligned, of which only pairs `pairs`
/// (within `0..k_tiles * 16`) are written, by no one else meanwhile; the AVX512 features
/// available.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn pack_b_pairs_by_rows(
    b: *const f32,
    rs: usize,
    cols: usize,
    k: usize,
    strips: usize,
    strip_len: usize,
    pairs: std::ops::Range<usize>,
    dst: *mut u16,
) {
    debug_assert!(strip_len >= k.div_ceil(TILE_K) * TILE_LEN && pairs.end * 32 <= strip_len);
    let interleave = interleave_index();
    for q in pairs {
        for s in 0..strips {
            let mask = lanes(cols.saturating_sub(s * TILE_MN).min(TILE_MN));
            let row = |p: usize| {
                if p < k {
                    // SAFETY: columns s * 16 + c, c < 16 and < cols, of row p are inside the
                    // source (masked load; an empty mask reads nothing).
                    unsafe { _mm512_maskz_loadu_ps(mask, b.wrapping_add(p * rs + s * TILE_MN)) }
                } else {
                    _mm512_setzero_ps()
                }
            };
            let pairs = convert_pairs(row(2 * q), row(2 * q + 1), interleave);
            // SAFETY: k pair q of strip s is 32 u16 at s * strip_len + 32 q, inside dst.
            unsafe { _mm512_storeu_si512(dst.add(s * strip_len + q * 32) as *mut _, pairs) };
        }
    }
}

/// [`crate::pack::pack_b`] for one 16-column strip of `cols` columns starting at `b` whose k
/// values are contiguous (element `(p, c)` at `b + p + c * cs`: a transposed weight), into
/// `dst` (`k_tiles * 16` k pairs). A row-major `b` goes through [`pack_b_pairs_by_rows`].
///
/// # Safety
/// Every `(p, c)` with `p < k`, `c < cols` inside the source; `dst` of `k_tiles * 512` u16,
/// 64-byte aligned; the AVX512 features available.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(crate) unsafe fn pack_b_strip_of_columns(
    b: *const f32,
    cs: usize,
    cols: usize,
    k: usize,
    dst: &mut [u16],
) {
    let k_tiles = k.div_ceil(TILE_K);
    debug_assert!(dst.len() >= k_tiles * TILE_LEN);
    for t in 0..k_tiles {
        // SAFETY: forwarded from this function's contract.
        unsafe { strip_tile(b, cs, cols, k, t, dst) };
    }
}

/// k tile `t` of a strip of [`pack_b_strip_of_columns`], stored into `dst`; returns the
/// strip's 16 columns' converted k values (zeros past `cols`). 32 of a column's k values are
/// its 16 pairs of the tile: a 16x16 transpose of (column, pair) turns 16 columns into the
/// tile's 16 pair rows.
///
/// # Safety
/// As [`pack_b_strip_of_columns`], with `t < k_tiles`.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[inline]
unsafe fn strip_tile(
    b: *const f32,
    cs: usize,
    cols: usize,
    k: usize,
    t: usize,
    dst: &mut [u16],
) -> [__m512i; 16] {
    let p0 = t * TILE_K;
    let columns: [__m512i; 16] = std::array::from_fn(|c| {
        if c < cols {
            // SAFETY: column c, rows p0..min(k, p0 + 32) are inside the source.
            unsafe { convert_32_reg(b.wrapping_add(c * cs + p0), (k - p0).min(TILE_K)) }
        } else {
            _mm512_setzero_si512()
        }
    });
    for (q, row) in transpose_16x16(&columns).iter().enumerate() {
        // SAFETY: pair row q of tile t is 64 bytes inside dst.
        unsafe {
            _mm512_storeu_si512(dst.as_mut_ptr().add((t * TILE_MN + q) * 32) as *mut _, *row)
        };
    }
    columns
}

/// Both packs of the 16 rows `16 s..` (`rows` of them valid) of a linear layer's weight
/// `w[n, k]` (row-major, starting at `w`): strip `s` of the forward pack (`w^T` as the right
/// operand, as [`pack_b_strip_of_columns`] writes it) into `forward`, and k pairs `8 s..8 s + 8`
/// of every strip of the backward pack (`w` as the right operand, as [`pack_b_pairs_by_rows`]
/// writes it; strips of `backward_strip_len` u16 at `backward`). Each element is read once.
///
/// # Safety
/// Rows `r < rows`, columns `< k` of `w` inside the source; `forward` of `k_tiles * 512` u16
/// and `backward` valid for `2 * k_tiles` strips of `backward_strip_len` u16 (holding pair
/// `8 s + 7`), both 64-byte aligned, the pairs written by no one else meanwhile; the AVX512
/// features available.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(crate) unsafe fn pack_weight_rows_both(
    w: *const f32,
    rows: usize,
    k: usize,
    s: usize,
    forward: &mut [u16],
    backward: *mut u16,
    backward_strip_len: usize,
) {
    let k_tiles = k.div_ceil(TILE_K);
    debug_assert!(forward.len() >= k_tiles * TILE_LEN && (8 * s + 8) * 32 <= backward_strip_len);
    // Words 16 h.. of two converted rows, interleaved: the k pair of backward strip 2 t + h.
    let halves: [__m512i; 2] = std::array::from_fn(|h| {
        let idx: [i16; 32] = std::array::from_fn(|i| ((i % 2) * 32 + 16 * h + i / 2) as i16);
        // SAFETY: reads 64 bytes from a 64-byte array.
        unsafe { _mm512_loadu_si512(idx.as_ptr() as *const _) }
    });
    for t in 0..k_tiles {
        // The forward strip's tile: the weight's rows are the columns of w^T (stride k).
        // SAFETY: forwarded from this function's contract.
        let rows_bf16 = unsafe { strip_tile(w, k, rows, k, t, forward) };
        for j in 0..TILE_MN / 2 {
            let (x, y) = (rows_bf16[2 * j], rows_bf16[2 * j + 1]);
            for (h, idx) in halves.iter().enumerate() {
                let pair = _mm512_permutex2var_epi16(x, *idx, y);
                let at = (2 * t + h) * backward_strip_len + (8 * s + j) * 32;
                // SAFETY: pair 8 s + j of backward strip 2 t + h is 64 bytes inside backward.
                unsafe { _mm512_storeu_si512(backward.add(at) as *mut _, pair) };
            }
        }
    }
}

/// Computes the given blocks on the calling thread.
///
/// # Safety
/// AVX512F and AVX512-BF16 must be available. Each block's packed pointers must have `k_tiles`
/// tiles for two m tiles / two strips (the second `pair_stride` elements later), and its `c`
/// pointer must be valid for `rows x cols` elements with row stride `ldc`, written by no one
/// else meanwhile.
#[target_feature(enable = "avx512f,avx512bf16")]
pub(crate) unsafe fn run_blocks(blocks: impl Iterator<Item = BlockArgs>) {
    for blk in blocks {
        // SAFETY: forwarded from this function's contract.
        unsafe { block(&blk) };
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
    let next = blk.pair_stride;
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
