//! Stand-in for the x86-64 kernels on other architectures: never available.

use crate::pack::BlockArgs;

pub(crate) fn available() -> bool {
    false
}

/// # Safety
/// Never called: [`available`] is false.
pub(crate) unsafe fn run_blocks(_blocks: impl Iterator<Item = BlockArgs>) {
    unreachable!("no SIMD bf16 kernel on this architecture")
}

/// # Safety
/// Never called: [`available`] is false.
pub(crate) unsafe fn transpose_a_tile(
    _src: *const u16,
    _src_kt: usize,
    _rows: usize,
    _j_tile: usize,
    _i_tile: usize,
    _dst: *mut u16,
) {
    unreachable!("no SIMD bf16 kernel on this architecture")
}

/// # Safety
/// Never called: [`available`] is false.
pub(crate) unsafe fn pack_a_row(_src: *const f32, _k: usize, _r: usize, _tile: &mut [u16]) {
    unreachable!("no SIMD bf16 kernel on this architecture")
}

/// # Safety
/// Never called: [`available`] is false.
pub(crate) unsafe fn pack_a_tile(
    _a: *const f32,
    _rs: usize,
    _cs: usize,
    _rows: usize,
    _k: usize,
    _tiles: std::ops::Range<usize>,
    _dst: &mut [u16],
) {
    unreachable!("no SIMD bf16 kernel on this architecture")
}

/// # Safety
/// Never called: [`available`] is false.
pub(crate) unsafe fn pack_weight_rows_both(
    _w: *const f32,
    _rows: usize,
    _k: usize,
    _s: usize,
    _forward: &mut [u16],
    _backward: *mut u16,
    _backward_strip_len: usize,
) {
    unreachable!("no SIMD bf16 kernel on this architecture")
}

/// # Safety
/// Never called: [`available`] is false.
pub(crate) unsafe fn pack_b_strip_of_columns(
    _b: *const f32,
    _cs: usize,
    _cols: usize,
    _k: usize,
    _dst: &mut [u16],
) {
    unreachable!("no SIMD bf16 kernel on this architecture")
}

/// # Safety
/// Never called: [`available`] is false.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn pack_b_pairs_by_rows(
    _b: *const f32,
    _rs: usize,
    _cols: usize,
    _k: usize,
    _strips: usize,
    _strip_len: usize,
    _pairs: std::ops::Range<usize>,
    _dst: *mut u16,
) {
    unreachable!("no SIMD bf16 kernel on this architecture")
}
