//! Ops of the Llama-family decoder, one per file: forward, backward, and their tests side by side.
//!
//! Conventions (llm.c): outputs first, then inputs, then sizes. Activations are row-major
//! `[N, C]` with N = B * T tokens. Backward functions *add* into their gradient buffers, so
//! fan-out (residual streams, a tied embedding) needs no special case. A gradient buffer passed
//! as `None` is not computed at all (frozen weights get no gradient).

// llm.c-style flat signatures (outputs, inputs, sizes) are the ops' contract; no config structs.
#![allow(clippy::too_many_arguments)]

pub mod adapted;
pub mod attention;
pub mod cross_entropy;
pub mod embedding;
pub mod linear;
pub mod lora;
pub mod low_rank;
pub mod matmul;
pub mod preference;
pub mod residual;
pub mod rmsnorm;
pub mod rope;
pub mod stored;
pub mod swiglu;

#[cfg(test)]
pub(crate) mod gradcheck;
