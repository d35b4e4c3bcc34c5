//! The AMX kernel: each call computes a 32x32 block of `c` in four accumulator tiles.
//!
//! Tiles: tmm0..tmm3 hold `c` (16 rows x 16 f32 each, a 2x2 arrangement), tmm4/tmm5 two A tiles
//! (16 rows x 32 bf16), tmm6/tmm7 two B tiles (16 k pairs x 16 columns x 2 bf16). Every k step
//! of 32 loads four tiles and issues four `tdpbf16ps`.

use crate::pack::{BlockArgs, TILE_K, TILE_MN};
use crate::BLOCK;
use std::arch::asm;
use std::sync::OnceLock;

/// `arch_prctl` request for permission to use an extended xsave feature.
#[cfg(target_os = "linux")]
const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
/// The xsave feature number of AMX tile data.
#[cfg(target_os = "linux")]
const XFEATURE_XTILEDATA: libc::c_long = 18;

/// Bytes of one A tile or one B tile (16 rows of 64 bytes).
const TILE_BYTES: usize = TILE_MN * TILE_K * 2;

/// Whether the CPU has AMX-BF16 and the OS lets this process use the tiles (asked once).
pub(crate) fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| cpu_has_amx_bf16() && request_tile_permission())
}

/// CPUID leaf 7 (EDX bit 22 AMX-BF16, bit 24 AMX-TILE); `is_x86_feature_detected!` does not
/// know these features on stable Rust.
fn cpu_has_amx_bf16() -> bool {
    use std::arch::x86_64::{__cpuid, __cpuid_count};
    #[allow(unused_unsafe)]
    // SAFETY: CPUID exists on every x86-64 CPU; leaf 7 is read only if the CPU reports it.
    unsafe {
        if __cpuid(0).eax < 7 {
            return false;
        }
        let edx = __cpuid_count(7, 0).edx;
        edx & (1 << 22) != 0 && edx & (1 << 24) != 0
    }
}

/// Linux keeps the large tile state off until the process asks for it (per process, once).
#[cfg(target_os = "linux")]
fn request_tile_permission() -> bool {
    // SAFETY: this arch_prctl only extends the xsave features the process may use; it touches
    // no memory of ours.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(not(target_os = "linux"))]
fn request_tile_permission() -> bool {
    false
}

/// The `ldtilecfg` memory operand (palette 1).
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    /// Bytes per row of each tile.
    colsb: [u16; 16],
    /// Rows of each tile.
    rows: [u8; 16],
}

/// Every tile we use is 16 rows of 64 bytes.
fn tile_config() -> TileConfig {
    let mut cfg = TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        colsb: [0; 16],
        rows: [0; 16],
    };
    for t in 0..8 {
        cfg.colsb[t] = 64;
        cfg.rows[t] = TILE_MN as u8;
    }
    cfg
}

/// A 32x32 f32 staging area for edge blocks (tiles can only store whole rows).
#[repr(C, align(64))]
struct Scratch([f32; BLOCK * BLOCK]);

/// Computes the given blocks on the calling thread.
///
/// # Safety
/// AMX must be available ([`available`] returned true). Each block's packed pointers must have
/// `k_tiles` tiles for two m tiles / two strips (the second `pair_stride` elements later),
/// and its `c` pointer must be valid for `rows x cols` elements with row stride `ldc`, written
/// by no one else meanwhile.
pub(crate) unsafe fn run_blocks(blocks: impl Iterator<Item = BlockArgs>) {
    // Tile configuration is per thread: configure here, on the thread that runs the blocks.
    let cfg = tile_config();
    // SAFETY: cfg is a valid 64-byte palette-1 configuration; AMX is available (caller).
    unsafe { asm!("ldtilecfg [{}]", in(reg) &cfg, options(nostack, readonly)) };
    let mut scratch = Scratch([0.0; BLOCK * BLOCK]);
    for blk in blocks {
        // SAFETY: forwarded from this function's contract; tiles are configured.
        unsafe { block(&blk, &mut scratch) };
    }
    // Releasing the tiles keeps context switches cheap once the product is done.
    // SAFETY: only resets the tile state configured above.
    unsafe { asm!("tilerelease", options(nostack, nomem)) };
}

/// One 32x32 block. Full blocks load and store `c` directly; edge blocks go through `scratch`.
///
/// # Safety
/// As [`run_blocks`], with the tiles configured by [`tile_config`].
unsafe fn block(blk: &BlockArgs, scratch: &mut Scratch) {
    let full = blk.rows == BLOCK && blk.cols == BLOCK;
    let (c, ldc) = if full {
        (blk.c, blk.ldc)
    } else {
        for r in 0..BLOCK {
            for j in 0..BLOCK {
                scratch.0[r * BLOCK + j] = if blk.accumulate && r < blk.rows && j < blk.cols {
                    // SAFETY: (r, j) is inside the valid rows x cols of c.
                    unsafe { *blk.c.add(r * blk.ldc + j) }
                } else {
                    0.0
                };
            }
        }
        (scratch.0.as_mut_ptr(), BLOCK)
    };
    let load_c = (blk.accumulate || !full) as u32;
    // The second m tile (and the second B strip) in bytes from the first.
    let next = blk.pair_stride * 2;
    let a0 = blk.a as *const u8;
    let b0 = blk.b as *const u8;
    // SAFETY: c (or scratch) holds 32 rows of 32 f32 at row stride ldc; the A and B pointers
    // hold k_tiles tiles each for both tiles of the pair (caller's contract), and the loop
    // reads exactly k_tiles tiles from each. k_tiles >= 1 (k > 0 is checked by the callers).
    unsafe {
        asm!(
            "test {load_c:e}, {load_c:e}",
            "jz 2f",
            "tileloadd tmm0, [{c0} + {cs}*1]",
            "tileloadd tmm1, [{c0} + {cs}*1 + 64]",
            "tileloadd tmm2, [{c1} + {cs}*1]",
            "tileloadd tmm3, [{c1} + {cs}*1 + 64]",
            "jmp 3f",
            "2:",
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            "3:",
            "tileloadd tmm4, [{a0} + {s}*1]",
            "tileloadd tmm6, [{b0} + {s}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tileloadd tmm7, [{b1} + {s}*1]",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tileloadd tmm5, [{a1} + {s}*1]",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "add {a0}, {tile}",
            "add {a1}, {tile}",
            "add {b0}, {tile}",
            "add {b1}, {tile}",
            "dec {kt}",
            "jnz 3b",
            "tilestored [{c0} + {cs}*1], tmm0",
            "tilestored [{c0} + {cs}*1 + 64], tmm1",
            "tilestored [{c1} + {cs}*1], tmm2",
            "tilestored [{c1} + {cs}*1 + 64], tmm3",
            load_c = in(reg) load_c,
            c0 = in(reg) c,
            c1 = in(reg) c.add(TILE_MN * ldc),
            cs = in(reg) ldc * 4,
            s = in(reg) 64usize,
            tile = const TILE_BYTES,
            a0 = inout(reg) a0 => _,
            a1 = inout(reg) a0.add(next) => _,
            b0 = inout(reg) b0 => _,
            b1 = inout(reg) b0.add(next) => _,
            kt = inout(reg) blk.k_tiles => _,
            options(nostack),
        );
    }
    if !full {
        for r in 0..blk.rows {
            for j in 0..blk.cols {
                // SAFETY: (r, j) is inside the valid rows x cols of c.
                unsafe { *blk.c.add(r * blk.ldc + j) = scratch.0[r * BLOCK + j] };
            }
        }
    }
}
