//! Kernel families, one CUDA source each with its launch planning beside it (ggml-cuda
//! style). Every source is compiled with the shared helpers of common.cuh in front.

mod attention;
mod elementwise;
mod embedding;
mod matmul;
mod moe;
mod norm;
mod rope;
mod sampling;
mod weights;

#[cfg(test)]
use super::compile::Source;
use super::launch::Planner;
use crate::core::registry::Registry;

const COMMON: &str = include_str!("common.cuh");
/// Weight layouts (MLX affine, ggml blocks, dense) read by matmul and embedding kernels.
const LAYOUTS: &str = include_str!("layouts.cuh");
/// RoPE arithmetic (rope kernels and the attention that rotates q and new keys itself).
const ROPE: &str = include_str!("rope.cuh");
/// Tensor-core fragments (mma.sync) for the prefill matmul and attention.
const MMA: &str = include_str!("mma.cuh");

/// Every source, for the compile test.
#[cfg(test)]
pub(crate) const SOURCES: &[&Source] = &[
    &attention::SOURCE,
    &elementwise::SOURCE,
    &embedding::SOURCE,
    &matmul::MATVEC,
    &matmul::MATVEC_TC,
    &matmul::MATMUL,
    &matmul::MATMUL_TC,
    &moe::SOURCE,
    &norm::SOURCE,
    &rope::SOURCE,
    &sampling::SOURCE,
];

pub(crate) use matmul::matvec_reads_half_x;

pub(crate) fn register(reg: &mut Registry<Planner>) {
    attention::register(reg);
    elementwise::register(reg);
    embedding::register(reg);
    matmul::register(reg);
    moe::register(reg);
    norm::register(reg);
    rope::register(reg);
    sampling::register(reg);
}
