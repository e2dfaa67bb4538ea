use super::{expect_dtype, expect_shape};
use crate::core::dtype::DType;
use crate::core::encoder::CommandEncoder;
use crate::core::op::Op;
use crate::core::tensor::Tensor;
use crate::{Error, Result};

/// Shape of one attention layer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Multiplies q·k (usually 1/√head_dim).
    pub scale: f32,
    /// Sliding window: keys older than `window` positions are not seen.
    pub window: Option<usize>,
    /// Attention-logit soft-capping (Gemma 2).
    pub softcap: Option<f32>,
}

/// Causal attention of the rows of `q` `[m, n_heads*head_dim]` (row i at position pos+i)
/// over the caches `[n_kv_heads, capacity, head_dim]`, which must already hold the keys and
/// values of positions 0..pos+m. `pos` is a u32 `[1]` buffer. out like q.
pub fn attention(
    enc: &mut CommandEncoder,
    shape: AttentionShape,
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    pos: &Tensor,
    out: &Tensor,
) -> Result<()> {
    let AttentionShape {
        n_heads,
        n_kv_heads,
        head_dim,
        ..
    } = shape;
    if n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
        return Err(Error::op(
            "attention",
            format!("{n_heads} query heads do not divide into {n_kv_heads} kv heads"),
        ));
    }
    expect_dtype("attention", "q", q, &[DType::F32])?;
    expect_shape("attention", "q", q, &[q.rows(), n_heads * head_dim])?;
    let capacity = k_cache.shape().get(1).copied().unwrap_or(0);
    for (what, c) in [("k_cache", k_cache), ("v_cache", v_cache)] {
        expect_dtype("attention", what, c, &[DType::F32])?;
        expect_shape("attention", what, c, &[n_kv_heads, capacity, head_dim])?;
    }
    expect_dtype("attention", "pos", pos, &[DType::U32])?;
    expect_shape("attention", "pos", pos, &[1])?;
    expect_shape("attention", "out", out, q.shape())?;
    let op = Op::Attention {
        n_heads,
        n_kv_heads,
        head_dim,
        scale: shape.scale,
        window: shape.window,
        softcap: shape.softcap,
    };
    enc.dispatch(op, &[q, k_cache, v_cache, pos], &[out])
}

/// Store rows of `x` `[m, n_kv_heads*head_dim]` into `cache` `[n_kv_heads, capacity,
/// head_dim]` at positions pos..pos+m (`pos`: u32 `[1]`; positions past the capacity are an
/// error the engine prevents).
pub fn kv_append(enc: &mut CommandEncoder, x: &Tensor, pos: &Tensor, cache: &Tensor) -> Result<()> {
    let [n_kv_heads, _capacity, head_dim] = *cache.shape() else {
        return Err(Error::op(
            "kv_append",
            format!("cache of shape {:?}", cache.shape()),
        ));
    };
    expect_dtype("kv_append", "x", x, &[DType::F32])?;
    expect_dtype("kv_append", "cache", cache, &[DType::F32])?;
    expect_shape("kv_append", "x", x, &[x.rows(), n_kv_heads * head_dim])?;
    expect_dtype("kv_append", "pos", pos, &[DType::U32])?;
    expect_shape("kv_append", "pos", pos, &[1])?;
    enc.dispatch(
        Op::KvAppend {
            n_kv_heads,
            head_dim,
        },
        &[x, pos],
        &[cache],
    )
}
