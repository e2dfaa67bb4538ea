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

use super::compile::Source;
use super::launch::Planner;
use crate::core::dtype::DType;
use crate::core::registry::Registry;
use crate::core::tensor::Tensor;
use crate::{Error, Result};

const COMMON: &str = include_str!("common.cuh");
/// Weight layouts (MLX affine, ggml blocks, dense) read by matmul and embedding kernels.
const LAYOUTS: &str = include_str!("layouts.cuh");
/// RoPE arithmetic (rope kernels and the attention that rotates q and new keys itself).
const ROPE: &str = include_str!("rope.cuh");
/// Tensor-core fragments (mma.sync) for the prefill matmul and attention.
const MMA: &str = include_str!("mma.cuh");
/// The generic tensor-core tile of x · Wᵀ (every layout), for prefill and MoE prefill.
const TILES_TC: &str = include_str!("tiles_tc.cuh");
/// Mixture-of-experts routing of a row by a warp (moe_route, and the gathered tensor-core
/// matvec that routes its token itself), and the weighted sum of a token's slots.
const ROUTE: &str = include_str!("route.cuh");
/// The gathered (expert-indexed) matvec and tiles over any layout, for the MoE programs.
const GATHER: &str = include_str!("gather.cuh");
/// The KV caches' element type `kv_t`: each source that reads or writes the caches (attention,
/// rope) is built once per cache dtype.
const KV_F32: &str = include_str!("kv_f32.cuh");
const KV_F16: &str = include_str!("kv_f16.cuh");

/// The build of a source (`[f32 caches, f16 caches]`) for the dtype of `caches` (one, or a
/// layer's two, which must agree).
fn for_caches(
    op: &'static str,
    caches: &[&Tensor],
    [f32_build, f16_build]: [&'static Source; 2],
) -> Result<&'static Source> {
    let alike = |d: DType| caches.iter().all(|c| c.dtype() == d);
    match caches.first().map(|c| c.dtype()) {
        Some(DType::F32) if alike(DType::F32) => Ok(f32_build),
        Some(DType::F16) if alike(DType::F16) => Ok(f16_build),
        _ => {
            let dtypes: Vec<DType> = caches.iter().map(|c| c.dtype()).collect();
            Err(Error::op(
                op,
                format!("KV caches in {dtypes:?}: f32 or f16, both alike"),
            ))
        }
    }
}

/// Asserts that kernel source `file` (its text) has each `#define NAME value` that a planner's
/// constant repeats: a mismatch would size buffers or grids unlike the kernel's.
#[cfg(test)]
pub(super) fn assert_defines<V: std::fmt::Display>(file: &str, text: &str, defines: &[(&str, V)]) {
    for (name, value) in defines {
        let define = format!("#define {name} {value}");
        assert!(
            text.lines().any(|l| l.starts_with(&define)),
            "{file} lacks `{define}`"
        );
    }
}

/// Every source, for the compile test.
#[cfg(test)]
pub(crate) const SOURCES: &[&Source] = &[
    &attention::SOURCE,
    &attention::SOURCE_F16,
    &elementwise::SOURCE,
    &embedding::SOURCE,
    &matmul::MATVEC,
    &matmul::MATVEC_ROWS,
    &matmul::MATVEC_TC,
    &matmul::MATMUL,
    &matmul::MATMUL_TC,
    &moe::SOURCE,
    &moe::GGML_SOURCE,
    &norm::SOURCE,
    &rope::SOURCE,
    &rope::SOURCE_F16,
    &sampling::SOURCE,
];

pub(crate) use matmul::{matmul_reads_half_x, matvec_folds_norm, matvec_reads_half_x};

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
