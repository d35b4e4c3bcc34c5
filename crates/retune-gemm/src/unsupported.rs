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
