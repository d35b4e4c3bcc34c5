//! The scalar types ops run on: f32 for real work, f64 for finite-difference checks.

use std::fmt::Debug;
use std::iter::Sum;
use std::ops::{AddAssign, DivAssign, MulAssign, SubAssign};

/// A floating-point element type every op is generic over.
///
/// Ops are written once and instantiated for `f32` (training, inference) and `f64`
/// (gradient checks, where central differences need the extra precision).
pub trait Float:
    num_traits::Float
    + num_traits::FromPrimitive
    + num_traits::ToPrimitive
    + Default
    + Debug
    + Send
    + Sync
    + Sum
    + AddAssign
    + SubAssign
    + MulAssign
    + DivAssign
    + 'static
{
    /// Converts from an f32 (weights are stored as f32 or narrower).
    fn from_f32(x: f32) -> Self;
    /// Converts from an f64 (accumulated sums).
    fn of(x: f64) -> Self;
    /// Widens to f64 for accumulation and reporting.
    fn as_f64(self) -> f64;
    /// The slice as f32, when `Self` is f32 (the type the bf16 matrix products take).
    fn f32_slice(x: &[Self]) -> Option<&[f32]>;
    /// The mutable slice as f32, when `Self` is f32.
    fn f32_slice_mut(x: &mut [Self]) -> Option<&mut [f32]>;
}

impl Float for f32 {
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x
    }
    #[inline(always)]
    fn of(x: f64) -> Self {
        x as f32
    }
    #[inline(always)]
    fn as_f64(self) -> f64 {
        self as f64
    }
    fn f32_slice(x: &[Self]) -> Option<&[f32]> {
        Some(x)
    }
    fn f32_slice_mut(x: &mut [Self]) -> Option<&mut [f32]> {
        Some(x)
    }
}

impl Float for f64 {
    #[inline(always)]
    fn from_f32(x: f32) -> Self {
        x as f64
    }
    #[inline(always)]
    fn of(x: f64) -> Self {
        x
    }
    #[inline(always)]
    fn as_f64(self) -> f64 {
        self
    }
    fn f32_slice(_: &[Self]) -> Option<&[f32]> {
        None
    }
    fn f32_slice_mut(_: &mut [Self]) -> Option<&mut [f32]> {
        None
    }
}
