//! The typed op API: each function checks shapes and dtypes, then records one dispatch on the
//! encoder. Outputs are passed in (allocated once, reused by captured graphs).

mod attention;
mod elementwise;
mod embedding;
mod matmul;
mod moe;
mod norm;
mod rope;
mod sampling;

pub use attention::{attention, kv_append, rope_attention, AttentionShape, HeadNorms};
pub use elementwise::{binary, gated_activation, softcap, softmax, unary};
pub use embedding::{embedding, scaled_embedding};
pub use matmul::{
    gated_matmul, matmul, matmul_add, matmul_reads_half, normed_matmul, normed_matmul_folds,
    reads_half_copy, InputNorm, Linear, ResidualUpdate,
};
pub use moe::{
    gather_gated_matmul, gather_matmul, gather_matmul_combine, moe_combine, moe_route,
    routed_gated_matmul, ExpertLinear,
};
pub use norm::{add_rms_norm, layer_norm, rms_norm, rms_norm_add};
pub use rope::{inv_freq, rope, rope_kv_append, RopeScaling, RopeTable};
pub use sampling::{argmax, argmax_end_step, end_step, sample};

use crate::core::dtype::DType;
use crate::core::tensor::Tensor;
use crate::{Error, Result};

pub(crate) fn expect_shape(
    op: &'static str,
    what: &str,
    t: &Tensor,
    shape: &[usize],
) -> Result<()> {
    if t.shape() != shape {
        return Err(Error::op(
            op,
            format!("{what}: expected shape {shape:?}, found {:?}", t.shape()),
        ));
    }
    Ok(())
}

pub(crate) fn expect_dtype(
    op: &'static str,
    what: &str,
    t: &Tensor,
    dtypes: &[DType],
) -> Result<()> {
    if !dtypes.contains(&t.dtype()) {
        return Err(Error::op(
            op,
            format!("{what}: dtype {} not in {dtypes:?}", t.dtype()),
        ));
    }
    Ok(())
}

pub(crate) const FLOATS: &[DType] = &[DType::F32, DType::F16, DType::BF16];

/// Activations between a producer (a norm, the gated activation) and the matmul that reads
/// them: f32, or f16 where the matmul reads f16 x as it lies (`matmul_reads_half`).
pub(crate) const ACTIVATIONS: &[DType] = &[DType::F32, DType::F16];

/// One u32 in device memory (`[1]`): a position or a token the kernels read and write.
pub(crate) fn expect_u32_scalar(op: &'static str, what: &str, t: &Tensor) -> Result<()> {
    expect_dtype(op, what, t, &[DType::U32])?;
    expect_shape(op, what, t, &[1])
}

/// The dtypes a KV cache `[n_kv_heads, capacity, head_dim]` may have (values stored into an
/// f16 cache are rounded to nearest; kernels read them back as f32).
pub(crate) const KV_CACHE_DTYPES: &[DType] = &[DType::F32, DType::F16];

/// A layer's two KV caches: each of shape `dims` (`[n_kv_heads, capacity, head_dim]`), both
/// f32 or both f16.
pub(crate) fn check_kv_caches(
    op: &'static str,
    (k_cache, v_cache): (&Tensor, &Tensor),
    dims: &[usize],
) -> Result<()> {
    expect_shape(op, "k_cache", k_cache, dims)?;
    expect_shape(op, "v_cache", v_cache, dims)?;
    let (k, v) = (k_cache.dtype(), v_cache.dtype());
    if k != v || !KV_CACHE_DTYPES.contains(&k) {
        return Err(Error::op(
            op,
            format!("k_cache is {k} and v_cache is {v}: the caches must be both f32 or both f16"),
        ));
    }
    Ok(())
}
