//! Conversion to bf16 and the packed layouts both bf16 kernels read.
//!
//! Packed A (`m x k`): 16-row tiles of 32 bf16 per row (one AMX A tile, 1 KiB), ordered
//! `[m_tile][k_tile][row 0..16][col 0..32]`, so one block row's tiles follow each other along k.
//!
//! Packed B (`k x n`): 16-column strips in VNNI order, `[strip][k_pair][col 0..16][2]`: the two
//! bf16 of `b[2q, j]` and `b[2q + 1, j]` side by side. Sixteen k pairs of a strip make one AMX B
//! tile, and one k pair of a strip is one zmm for `vdpbf16ps`.
//!
//! Sizes are padded with zeros: m and n to multiples of 32 (a kernel block), k to a multiple
//! of 32 (a tile's depth), so the kernels never test edges inside the k loop.

use crate::{avx512, MatRef, SharedOut, BLOCK};
use rayon::prelude::*;

/// bf16 values per row of an A tile (the k depth of one `tdpbf16ps`).
pub(crate) const TILE_K: usize = 32;
/// Rows of an A tile, columns of a B strip.
pub(crate) const TILE_MN: usize = 16;

/// Number of 32-deep k tiles covering `k`.
pub(crate) fn k_tiles(k: usize) -> usize {
    k.div_ceil(TILE_K)
}

/// The bf16 bits nearest to `x` (ties to even); NaN stays a (quiet) NaN.
#[inline(always)]
pub(crate) fn to_bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    let rounded = (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16;
    if x.is_nan() {
        ((bits >> 16) as u16) | 0x40
    } else {
        rounded
    }
}

/// `x` rounded to bf16 (ties to even) and widened back: the value the bf16 kernels multiply.
pub fn round_to_bf16(x: f32) -> f32 {
    f32::from_bits((to_bf16_bits(x) as u32) << 16)
}

/// One cache line of bf16: the unit of packed buffers, so every tile row is one aligned line
/// (an unaligned row would cost two cache accesses per row of every tile load).
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u16; 32]);

/// Largest buffer kept for reuse, and so the largest operand one product packs at once (see
/// `MAX_PACK_ELEMS`): an LM head (54 MiB in bf16) goes in parts of at most this size. 8 MiB
/// rather than 16: a trained head's 512-row chunks then peak 13 MiB lower, at the same speed.
pub(crate) const SPARE_MAX_BYTES: usize = 8 << 20;
/// Buffers kept per thread. Three cover a product's operands (a shared input, a weight, a
/// gradient and its transpose reuse them in turn); a fourth measured no faster and held 19 MiB
/// more in full fine-tuning (the LM head's 7 MiB parts stay in the pool).
const SPARES: usize = 3;

thread_local! {
    /// Buffers of finished products, reused by the next ones on this thread.
    static SPARE: std::cell::RefCell<Vec<Vec<Line>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A 64-byte aligned bf16 buffer: the first `len` lines of `lines`.
pub(crate) struct Packed {
    /// Only ever grows in length: a spare that served a larger product keeps its tail (that
    /// product's values), so a buffer passed between products of different sizes is zeroed
    /// once rather than on every growth (that zeroing was 1.5% of a LoRA step).
    lines: Vec<Line>,
    len: usize,
}

impl Packed {
    /// `len` u16 (a multiple of 32) of unspecified values (zeros or an earlier product's): the
    /// packing functions overwrite every element.
    fn for_overwrite(len: usize) -> Self {
        debug_assert_eq!(len % 32, 0);
        let lines_needed = len / 32;
        // The smallest spare that holds the product's buffer (growing a smaller one would copy
        // its old contents), else a new allocation.
        let lines = SPARE
            .with(|spare| {
                let mut spare = spare.borrow_mut();
                let best = (0..spare.len())
                    .filter(|&i| spare[i].capacity() >= lines_needed)
                    .min_by_key(|&i| spare[i].capacity())?;
                Some(spare.swap_remove(best))
            })
            .unwrap_or_default();
        Self::fitted(lines, len)
    }

    /// The first `len` u16 of `lines`, grown to hold them (a buffer only ever grows).
    fn fitted(mut lines: Vec<Line>, len: usize) -> Self {
        let lines_needed = len / 32;
        if lines.len() < lines_needed {
            lines.resize(lines_needed, Line([0; 32]));
        }
        Packed {
            lines,
            len: lines_needed,
        }
    }

    /// `len` u16 (a multiple of 32) of unspecified values in `spare`'s buffer when it holds
    /// that many, else as [`Packed::for_overwrite`].
    pub(crate) fn reuse(spare: Option<Packed>, len: usize) -> Self {
        match spare {
            Some(p) if p.lines.capacity() * 32 >= len => Self::fitted(p.lines, len),
            other => {
                if let Some(p) = other {
                    p.recycle();
                }
                Self::for_overwrite(len)
            }
        }
    }

    /// Hands the buffer back for the next product on this thread: a fresh allocation costs
    /// page faults on every call, as much as a tenth of a product's time.
    pub(crate) fn recycle(self) {
        if self.lines.capacity() * 64 <= SPARE_MAX_BYTES {
            SPARE.with(|spare| {
                let mut spare = spare.borrow_mut();
                spare.push(self.lines);
                if spare.len() > SPARES {
                    // Keep the largest: a small buffer is cheap to allocate again.
                    let smallest = (0..spare.len())
                        .min_by_key(|&i| spare[i].capacity())
                        .expect("not empty");
                    spare.swap_remove(smallest);
                }
            });
        }
    }

    /// Gives back spare capacity (a reused buffer can be larger than needed).
    pub(crate) fn shrink_to_fit(&mut self) {
        self.lines.truncate(self.len);
        self.lines.shrink_to_fit();
    }

    pub(crate) fn as_slice(&self) -> &[u16] {
        // SAFETY: Line is exactly 32 u16 without padding (repr C, size 64), so the lines form
        // one contiguous run of u16 valid for reads as long as self is borrowed.
        let lines = &self.lines[..self.len];
        unsafe { std::slice::from_raw_parts(lines.as_ptr() as *const u16, lines.len() * 32) }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u16] {
        // SAFETY: as in as_slice, borrowed mutably.
        let lines = &mut self.lines[..self.len];
        unsafe { std::slice::from_raw_parts_mut(lines.as_mut_ptr() as *mut u16, lines.len() * 32) }
    }
}

/// Row tiles per packing task of A.
const GROUP: usize = 4;

/// Below this many elements packing runs on the calling thread.
const PAR_PACK: usize = 1 << 15;

/// Packs the `m x k` view `a` (see the module doc).
pub(crate) fn pack_a(a: MatRef, m: usize, k: usize) -> Packed {
    pack_a_with(a, m, k, avx512::available())
}

/// [`pack_a`], with or without the AVX512 conversion.
fn pack_a_with(a: MatRef, m: usize, k: usize, allow_simd: bool) -> Packed {
    let kt = k_tiles(k);
    let tile_len = TILE_MN * TILE_K;
    let m_tiles = m.div_ceil(BLOCK) * (BLOCK / TILE_MN);
    let mut out = Packed::for_overwrite(m_tiles * kt * tile_len);
    if out.as_slice().is_empty() {
        return out;
    }
    let simd = allow_simd && (a.col_stride == 1 || a.row_stride == 1);
    let transposed_simd = simd && a.col_stride != 1;
    if simd && !transposed_simd {
        pack_a_rows(a, m, k, out.as_mut_slice());
        return out;
    }
    let pack_row_tile = |mt: usize, dst: &mut [u16]| {
        let rows = m.saturating_sub(mt * TILE_MN).min(TILE_MN);
        // The SIMD path writes every element of a tile (k padding included); the scalar ones
        // write only the valid elements, so the padding is zeroed first.
        if !transposed_simd || rows == 0 {
            dst.fill(0);
        }
        if rows == 0 || transposed_simd {
            return;
        }
        let at = |r: usize, p: usize| a.at(mt * TILE_MN + r, p);
        // dst index of (r, p): tile p / 32, row r, column p % 32.
        let idx = |r: usize, p: usize| ((p / TILE_K) * TILE_MN + r) * TILE_K + p % TILE_K;
        if a.col_stride == 1 {
            // Rows are contiguous: convert 32 values at a time.
            for r in 0..rows {
                let start = (mt * TILE_MN + r) * a.row_stride;
                let src = &a.data[start..start + k];
                for (t, chunk) in src.chunks(TILE_K).enumerate() {
                    let d = &mut dst[(t * TILE_MN + r) * TILE_K..][..chunk.len()];
                    for (o, &x) in d.iter_mut().zip(chunk) {
                        *o = to_bf16_bits(x);
                    }
                }
            }
        } else if a.row_stride <= a.col_stride {
            // Columns are closer together than rows (a transposed view): walk down the rows.
            for p in 0..k {
                for r in 0..rows {
                    dst[idx(r, p)] = to_bf16_bits(at(r, p));
                }
            }
        } else {
            for r in 0..rows {
                for p in 0..k {
                    dst[idx(r, p)] = to_bf16_bits(at(r, p));
                }
            }
        }
    };
    // A transposed view has its m index contiguous: packing k tile by k tile across a group
    // of row tiles reads each stored row in runs of GROUP * 64 bytes instead of one line.
    let pack_group = |(g, dst): (usize, &mut [u16])| {
        for (i, tile) in dst.chunks_mut(kt * tile_len).enumerate() {
            pack_row_tile(g * GROUP + i, tile);
        }
        if transposed_simd {
            for t in 0..kt {
                for (i, tile) in dst.chunks_mut(kt * tile_len).enumerate() {
                    let mt = g * GROUP + i;
                    let rows = m.saturating_sub(mt * TILE_MN).min(TILE_MN);
                    if rows == 0 {
                        continue;
                    }
                    let start = mt * TILE_MN;
                    // SAFETY: as above, with row stride 1: rows r < rows, columns p < k from
                    // `start` are inside a.data.
                    unsafe {
                        avx512::pack_a_tile(
                            a.data[start..].as_ptr(),
                            1,
                            a.col_stride,
                            rows,
                            k,
                            t..t + 1,
                            tile,
                        )
                    };
                }
            }
        }
    };
    let group_len = GROUP * kt * tile_len;
    if m * k >= PAR_PACK {
        out.as_mut_slice()
            .par_chunks_mut(group_len)
            .with_max_len(1)
            .enumerate()
            .for_each(pack_group);
    } else {
        out.as_mut_slice()
            .chunks_mut(group_len)
            .enumerate()
            .for_each(pack_group);
    }
    out
}

/// An `m x k` A pack for its producer to fill row by row ([`put_a_row`]): the tiles from the
/// one that holds row `m` on (the padding rows of the last 32-row block) are zeroed; the rows
/// before `m` are left for the producer.
pub(crate) fn a_for_rows(m: usize, k: usize) -> Packed {
    let tile_len = TILE_MN * TILE_K * k_tiles(k);
    let m_tiles = m.div_ceil(BLOCK) * (BLOCK / TILE_MN);
    let mut out = Packed::for_overwrite(m_tiles * tile_len);
    out.as_mut_slice()[m / TILE_MN * tile_len..].fill(0);
    out
}

/// Row `r` of the 16-row A tile `tile` (all its k tiles) from `row` (`k` values).
pub(crate) fn put_a_row(tile: &mut [u16], r: usize, row: &[f32]) {
    let k = row.len();
    assert!(
        r < TILE_MN && tile.len() == k_tiles(k) * TILE_MN * TILE_K,
        "retune-gemm: a row of {k} does not fit the tile"
    );
    if avx512::available() {
        // SAFETY: row holds k floats, tile all k tiles of a row tile, r < 16, and the
        // features are available.
        unsafe { avx512::pack_a_row(row.as_ptr(), k, r, tile) };
        return;
    }
    for (t, chunk) in row.chunks(TILE_K).enumerate() {
        let d = &mut tile[(t * TILE_MN + r) * TILE_K..][..TILE_K];
        for (i, o) in d.iter_mut().enumerate() {
            *o = chunk.get(i).map_or(0, |&x| to_bf16_bits(x));
        }
    }
}

/// The A pack of the transpose (`k x m`) of the `m x k` matrix whose A pack is `src`, made from
/// the bf16 pack itself: half the bytes of reading the f32 matrix again, in pack order.
pub(crate) fn transpose_a(src: &Packed, m: usize, k: usize) -> Packed {
    transpose_a_with(src, m, k, avx512::available())
}

/// [`transpose_a`], with or without the AVX512 kernel.
fn transpose_a_with(src: &Packed, m: usize, k: usize, simd: bool) -> Packed {
    let tile_len = TILE_MN * TILE_K;
    let (src_kt, kt) = (k_tiles(k), k_tiles(m));
    let out_tiles = k.div_ceil(BLOCK) * (BLOCK / TILE_MN);
    let mut out = Packed::for_overwrite(out_tiles * kt * tile_len);
    let src = src.as_slice();
    let row_tile = |(j, dst): (usize, &mut [u16])| {
        if j * TILE_MN >= k {
            dst.fill(0); // padding rows of the transpose
            return;
        }
        for (i, tile) in dst.chunks_mut(tile_len).enumerate() {
            if simd {
                // SAFETY: src is the pack of m x k: its row tiles 2i, 2i + 1 (rows padded to
                // 32) and column tile j / 2 exist; tile is 512 u16; the features are available.
                unsafe {
                    avx512::transpose_a_tile(src.as_ptr(), src_kt, m, j, i, tile.as_mut_ptr())
                };
                continue;
            }
            for (c, row) in tile.chunks_mut(TILE_K).enumerate() {
                let p = j * TILE_MN + c; // a column of the source
                for (e, x) in row.iter_mut().enumerate() {
                    let r = i * TILE_K + e; // a row of the source
                    *x = if r < m {
                        src[((r / TILE_MN) * src_kt + p / TILE_K) * tile_len
                            + (r % TILE_MN) * TILE_K
                            + p % TILE_K]
                    } else {
                        0
                    };
                }
            }
        }
    };
    let chunk = kt * tile_len;
    if chunk == 0 {
        return out;
    }
    if m * k >= PAR_PACK {
        out.as_mut_slice()
            .par_chunks_mut(chunk)
            .enumerate()
            .for_each(row_tile);
    } else {
        out.as_mut_slice()
            .chunks_mut(chunk)
            .enumerate()
            .for_each(row_tile);
    }
    out
}

/// Most k tiles per task of [`pack_a_rows`].
const PIECE_TILES: usize = 64;

/// The AVX512 [`pack_a`] of a row-major `a`: one task per row tile, split along k into pieces
/// of at most [`PIECE_TILES`] tiles. Tasks of whole row tiles would leave a thread idle when
/// there are few rows and a long k: an LM head's logits gradient (`64 x 49152` per part) is
/// four row tiles.
fn pack_a_rows(a: MatRef, m: usize, k: usize, out: &mut [u16]) {
    let tile_len = TILE_MN * TILE_K;
    let kt = k_tiles(k);
    let pack_piece = |mt: usize, j: usize, piece: &mut [u16]| {
        let rows = m.saturating_sub(mt * TILE_MN).min(TILE_MN);
        // The SIMD path writes every column of the rows it packs (k padding included), but
        // not the rows past the matrix's last.
        if rows < TILE_MN {
            piece.fill(0);
        }
        if rows == 0 {
            return;
        }
        let (p0, tiles) = (j * PIECE_TILES * TILE_K, piece.len() / tile_len);
        let k_piece = k.min(p0 + tiles * TILE_K) - p0;
        let start = mt * TILE_MN * a.row_stride + p0;
        // SAFETY: the view was bounds-checked for m x k, so rows r < rows, columns
        // p0..p0 + k_piece from row mt * 16 are inside a.data; the piece is `tiles` aligned
        // tiles, as many as k_piece needs; col stride 1.
        unsafe {
            avx512::pack_a_tile(
                a.data[start..].as_ptr(),
                a.row_stride,
                1,
                rows,
                k_piece,
                0..tiles,
                piece,
            )
        };
    };
    let (row_tile_len, piece_len) = (kt * tile_len, PIECE_TILES * tile_len);
    if m * k >= PAR_PACK {
        out.par_chunks_mut(row_tile_len)
            .with_max_len(1)
            .enumerate()
            .for_each(|(mt, row_tile)| {
                row_tile
                    .par_chunks_mut(piece_len)
                    .with_max_len(1)
                    .enumerate()
                    .for_each(|(j, piece)| pack_piece(mt, j, piece));
            });
    } else {
        for (mt, row_tile) in out.chunks_mut(row_tile_len).enumerate() {
            for (j, piece) in row_tile.chunks_mut(piece_len).enumerate() {
                pack_piece(mt, j, piece);
            }
        }
    }
}

/// k pairs per task when a row-major `b` is packed: one k tile, 32 whole rows.
const PAIRS_PER_TASK: usize = TILE_K / 2;

/// u16 elements of one packed B strip for inner size `k` (its k pairs of 16 columns).
fn strip_len(k: usize) -> usize {
    k_tiles(k) * TILE_K / 2 * TILE_MN * 2
}

/// Packed B strips for `n` columns (padded to a whole 32-column block).
fn strips(n: usize) -> usize {
    n.div_ceil(BLOCK) * (BLOCK / TILE_MN)
}

/// Packs the `k x n` view `b` (see the module doc).
pub(crate) fn pack_b(b: MatRef, k: usize, n: usize) -> Packed {
    pack_b_with(b, k, n, avx512::available())
}

/// [`pack_b`], with or without the AVX512 conversion.
fn pack_b_with(b: MatRef, k: usize, n: usize, allow_simd: bool) -> Packed {
    let kt = k_tiles(k);
    let (strip_len, strips) = (strip_len(k), strips(n));
    let mut out = Packed::for_overwrite(strips * strip_len);
    if out.as_slice().is_empty() {
        return out;
    }
    let simd = allow_simd && (b.col_stride == 1 || b.row_stride == 1);
    // Row-major (k along rows): strips in groups, see below; else k runs along memory.
    let by_rows = simd && b.col_stride == 1 && b.row_stride != 1;
    let pack_strip = |(s, dst): (usize, &mut [u16])| {
        let cols = n.saturating_sub(s * TILE_MN).min(TILE_MN);
        // As in pack_a: the SIMD paths write every element (padding columns included).
        if !simd || cols == 0 {
            dst.fill(0);
        }
        if cols == 0 {
            return;
        }
        if simd {
            let start = s * TILE_MN * b.col_stride;
            // SAFETY: the view was bounds-checked for k x n, so rows p < k, columns c < cols
            // from `start` are inside b.data; dst is this strip's aligned chunk; the row stride
            // is 1 (`by_rows` took the others).
            unsafe {
                avx512::pack_b_strip_of_columns(
                    b.data[start..].as_ptr(),
                    b.col_stride,
                    cols,
                    k,
                    dst,
                )
            };
            return;
        }
        let at = |p: usize, c: usize| b.at(p, s * TILE_MN + c);
        // dst index of (p, c): pair p / 2, column c, half p % 2.
        let idx = |p: usize, c: usize| ((p / 2) * TILE_MN + c) * 2 + p % 2;
        if b.row_stride <= b.col_stride {
            // k runs along memory (a transposed weight [n, k]): one column at a time.
            for c in 0..cols {
                for p in 0..k {
                    dst[idx(p, c)] = to_bf16_bits(at(p, c));
                }
            }
        } else {
            for p in 0..k {
                for c in 0..cols {
                    dst[idx(p, c)] = to_bf16_bits(at(p, c));
                }
            }
        }
    };
    if by_rows {
        // Tasks of whole rows, each k tile's 32 rows read in memory order across every strip:
        // tasks of a few strips read 256 bytes of each row, a row's stride apart, at half
        // the speed from memory (7 against 13 GB/s on two threads).
        let dst = SharedOut(out.as_mut_slice().as_mut_ptr());
        let rows_task = |t: usize| {
            let q0 = t * PAIRS_PER_TASK;
            // SAFETY: the view was bounds-checked for k x n, so rows p < k, columns c < n are
            // inside b.data; col stride 1; dst holds `strips` aligned strips of strip_len, and
            // each task writes only its own k pairs of them.
            unsafe {
                avx512::pack_b_pairs_by_rows(
                    b.data.as_ptr(),
                    b.row_stride,
                    n,
                    k,
                    strips,
                    strip_len,
                    q0..q0 + PAIRS_PER_TASK,
                    dst.ptr(),
                )
            };
        };
        if k * n >= PAR_PACK {
            (0..kt).into_par_iter().with_max_len(1).for_each(rows_task);
        } else {
            (0..kt).for_each(rows_task);
        }
        return out;
    }
    if k * n >= PAR_PACK {
        out.as_mut_slice()
            .par_chunks_mut(strip_len)
            .with_max_len(1)
            .enumerate()
            .for_each(pack_strip);
    } else {
        out.as_mut_slice()
            .chunks_mut(strip_len)
            .enumerate()
            .for_each(pack_strip);
    }
    out
}

/// Both packs of a linear layer's weight `w[n, k]` (row-major), as [`pack_b`] makes them: of
/// `w^T` (`k x n`, the forward's right operand) and of `w` (`n x k`, the input gradient's), in
/// one read of `w`. The second goes into `backward`'s buffer when it is large enough.
pub(crate) fn pack_b_both_of_nk(
    w: &[f32],
    n: usize,
    k: usize,
    backward: Option<Packed>,
) -> (Packed, Packed) {
    let (transposed, rows) = (MatRef::transpose_of(w, k), MatRef::row_major(w, k));
    if !avx512::available() || n == 0 || k == 0 {
        if let Some(spare) = backward {
            spare.recycle();
        }
        return (pack_b(transposed, k, n), pack_b(rows, n, k));
    }
    // The forward pack is k x n, the backward one n x k.
    let (strip_len, backward_strip_len) = (strip_len(k), strip_len(n));
    let mut forward = Packed::for_overwrite(strips(n) * strip_len);
    let mut backward = Packed::reuse(backward, strips(k) * backward_strip_len);
    let dst = SharedOut(backward.as_mut_slice().as_mut_ptr());
    // Strip s of the forward pack: rows 16 s.. of w, also k pairs 8 s.. of the backward's.
    let strip = |(s, forward_strip): (usize, &mut [u16])| {
        let rows = n.saturating_sub(s * TILE_MN).min(TILE_MN);
        // SAFETY: w is n x k, so rows 16 s + r, r < rows, are inside it (the pointer is not
        // read when rows is 0); forward_strip is strip s's aligned chunk; the backward pack
        // holds every strip's pairs 8 s..8 s + 8 (the forward has as many strips as the
        // backward has k pairs / 8), which only this task writes.
        unsafe {
            avx512::pack_weight_rows_both(
                w.as_ptr().wrapping_add(s * TILE_MN * k),
                rows,
                k,
                s,
                forward_strip,
                dst.ptr(),
                backward_strip_len,
            )
        };
    };
    let chunks = forward.as_mut_slice();
    if k * n >= PAR_PACK {
        chunks
            .par_chunks_mut(strip_len)
            .with_max_len(1)
            .enumerate()
            .for_each(strip);
    } else {
        chunks.chunks_mut(strip_len).enumerate().for_each(strip);
    }
    (forward, backward)
}

/// One kernel call: a block of up to 32x32 of `c`.
pub(crate) struct BlockArgs {
    /// Packed A at the block's first m tile, at the first k tile of the pass.
    pub a: *const u16,
    /// Packed B at the block's first strip, at the first k tile of the pass.
    pub b: *const u16,
    /// k tiles in this pass.
    pub k_tiles: usize,
    /// u16 elements from the first m tile (strip) to the second.
    pub pair_stride: usize,
    /// `c` at the block's top-left element.
    pub c: *mut f32,
    /// Row stride of `c` in elements.
    pub ldc: usize,
    /// Valid rows and columns of the block (at most 32).
    pub rows: usize,
    pub cols: usize,
    pub accumulate: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_is_nearest_even() {
        // 1 + 2^-8 is halfway between bf16 1.0 and 1 + 2^-7: ties go to the even 1.0.
        assert_eq!(round_to_bf16(1.0 + 2f32.powi(-8)), 1.0);
        // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6: goes up.
        assert_eq!(
            round_to_bf16(1.0 + 3.0 * 2f32.powi(-8)),
            1.0 + 2f32.powi(-6)
        );
        assert_eq!(
            round_to_bf16(1.0 + 2f32.powi(-8) + 2f32.powi(-20)),
            1.0 + 2f32.powi(-7)
        );
        assert_eq!(round_to_bf16(-3.0), -3.0);
        assert_eq!(round_to_bf16(f32::INFINITY), f32::INFINITY);
        assert!(round_to_bf16(f32::NAN).is_nan());
    }

    #[test]
    fn packed_layouts_place_elements() {
        let (m, k, n) = (3, 35, 18);
        let a: Vec<f32> = (0..m * k).map(|x| x as f32).collect();
        let pa = pack_a(MatRef::row_major(&a, k), m, k);
        let pa = pa.as_slice();
        assert_eq!(pa.len(), 2 * 2 * 16 * 32);
        // a[2, 33] lies in m tile 0, k tile 1, row 2, column 1.
        assert_eq!(pa[(16 + 2) * 32 + 1], to_bf16_bits(a[2 * k + 33]));
        let b: Vec<f32> = (0..k * n).map(|x| x as f32).collect();
        let pb = pack_b(MatRef::row_major(&b, n), k, n);
        let pb = pb.as_slice();
        // b[5, 17] lies in strip 1, pair 2, column 1, half 1.
        let strip_len = 32 * 16 * 2; // 2 k tiles = 32 pairs of 16 columns x 2
        assert_eq!(
            pb[strip_len + (2 * 16 + 1) * 2 + 1],
            to_bf16_bits(b[5 * n + 17])
        );
        // Padding is zero.
        assert_eq!(pb[strip_len + (2 * 16 + 5) * 2 + 1], 0);
    }

    /// Fills this thread's spare buffers with garbage, so a packing that skips an element
    /// shows up.
    fn dirty_spare_buffers() {
        let dirty = || Packed {
            lines: vec![Line([0xffff; 32]); 4096],
            len: 4096,
        };
        let (first, second) = (dirty(), dirty());
        first.recycle();
        second.recycle();
    }

    /// Values of both signs and varied magnitudes, none subnormal.
    fn test_values(len: usize) -> Vec<f32> {
        (0..len)
            .map(|x| (x as f32 * 0.37).sin() * 3.0 + 1e-3)
            .collect()
    }

    /// Both packs of a weight from one read equal the scalar packs of its two views, with the
    /// backward's buffer reused dirty (larger or smaller than needed) or made afresh.
    #[test]
    fn both_packs_of_a_weight_match_scalar() {
        // (n, k): partial strips and tiles, zero strips past n, parallel tasks (> PAR_PACK).
        let shapes = [
            (1, 1),
            (5, 40),
            (16, 32),
            (33, 70),
            (70, 33),
            (200, 300),
            (576, 192),
        ];
        for (n, k) in shapes {
            let w = test_values(n * k);
            let want_forward = pack_b_with(MatRef::transpose_of(&w, k), k, n, false);
            let want_backward = pack_b_with(MatRef::row_major(&w, k), n, k, false);
            let spares = [
                None,
                Some(Packed {
                    lines: vec![Line([0xffff; 32]); 8],
                    len: 8,
                }),
                Some(Packed {
                    lines: vec![Line([0xffff; 32]); 8192],
                    len: 8192,
                }),
            ];
            for spare in spares {
                dirty_spare_buffers();
                let (forward, backward) = pack_b_both_of_nk(&w, n, k, spare);
                assert_eq!(
                    forward.as_slice(),
                    want_forward.as_slice(),
                    "forward {n}x{k}"
                );
                assert_eq!(
                    backward.as_slice(),
                    want_backward.as_slice(),
                    "backward {n}x{k}"
                );
            }
        }
    }

    /// The AVX512 packing paths produce the same bits as the scalar ones, for both stride
    /// orders and sizes with partial tiles.
    #[test]
    fn simd_packing_matches_scalar() {
        if !avx512::available() {
            return;
        }
        // (17, 2100) and (33, 4165): row-major A is packed in k pieces (more than 64 k tiles).
        // (200, 300): a row-major B of several k tiles, a partial last one, in parallel tasks.
        let shapes = [
            (1, 1),
            (3, 35),
            (17, 64),
            (40, 33),
            (70, 100),
            (17, 2100),
            (33, 4165),
            (200, 300),
        ];
        for (rows, cols) in shapes {
            let data = test_values(rows * cols);
            for view in [
                MatRef::row_major(&data, cols),
                MatRef::transpose_of(&data, cols),
            ] {
                let (r, c) = if view.row_stride == 1 {
                    (cols, rows)
                } else {
                    (rows, cols)
                };
                dirty_spare_buffers();
                let simd = pack_a_with(view, r, c, true);
                dirty_spare_buffers();
                assert_eq!(simd.as_slice(), pack_a_with(view, r, c, false).as_slice());
                dirty_spare_buffers();
                let simd = pack_b_with(view, r, c, true);
                dirty_spare_buffers();
                assert_eq!(simd.as_slice(), pack_b_with(view, r, c, false).as_slice());
            }
            // The transpose's pack from the pack: the pack of the transposed view.
            let packed = pack_a_with(MatRef::row_major(&data, cols), rows, cols, true);
            let want = pack_a_with(MatRef::transpose_of(&data, cols), cols, rows, false);
            for simd in [true, false] {
                dirty_spare_buffers();
                let got = transpose_a_with(&packed, rows, cols, simd);
                assert_eq!(
                    got.as_slice(),
                    want.as_slice(),
                    "{rows}x{cols}, simd {simd}"
                );
            }
        }
    }
}
