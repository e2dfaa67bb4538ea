use super::rope::{check_rope_inputs, RopeTable};
use super::{check_kv_caches, expect_dtype, expect_shape, expect_u32_scalar, KV_CACHE_DTYPES};
use crate::core::dtype::DType;
use crate::core::encoder::CommandEncoder;
pub use crate::core::op::AttentionShape;
use crate::core::op::{Op, PreNorm};
use crate::core::tensor::Tensor;
use crate::{Error, Result};

/// Causal attention of the rows of `q` `[m, n_heads*head_dim]` (row i at position pos+i)
/// over the caches `[n_kv_heads, capacity, head_dim]` (both f32 or both f16, read as f32),
/// which must already hold the keys and values of positions 0..pos+m. `pos` is a u32 `[1]`
/// buffer. out like q. The dispatch just before this one must not write `pos` (the CUDA
/// decode kernel reads it while that dispatch finishes); the decoder writes it from the host
/// or at a step's end (`end_step`, or the greedy `argmax_end_step`).
pub fn attention(
    enc: &mut CommandEncoder,
    shape: AttentionShape,
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    pos: &Tensor,
    out: &Tensor,
) -> Result<()> {
    check_attention("attention", shape, q, (k_cache, v_cache), pos, out)?;
    enc.dispatch(Op::Attention(shape), &[q, k_cache, v_cache, pos], &[out])
}

/// The RMSNorms over each head of q and of k ahead of RoPE (Qwen3's and Gemma 3's q/k norms):
/// their weights, f32 `[head_dim]`, and parameters.
#[derive(Clone, Copy, Debug)]
pub struct HeadNorms<'a> {
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    pub norm: PreNorm,
}

/// A layer's attention from its q, k and v projections (`[m, n_heads*head_dim]`,
/// `[m, n_kv_heads*head_dim]` twice): with `head_norms`, q and k normed per head first; RoPE
/// of q and k by `table`, k and v stored into the caches (both f32 or both f16, stores
/// rounded to nearest) at positions pos..pos+m, then causal attention of the rotated q over
/// them, in one dispatch (`rms_norm` of q and k, then `rope_kv_append` followed by
/// `attention`, whose rule on `pos` it shares). With `out_h` (f16 `[1, n_heads*head_dim]`,
/// one query row), the output's f16 copy is written there too, for the o projection's `x_h`
/// (`ops::matmul_add`).
#[allow(clippy::too_many_arguments)]
pub fn rope_attention(
    enc: &mut CommandEncoder,
    qkv: [&Tensor; 3],
    head_norms: Option<HeadNorms>,
    table: &RopeTable,
    traditional: bool,
    shape: AttentionShape,
    pos: &Tensor,
    (k_cache, v_cache): (&Tensor, &Tensor),
    (out, out_h): (&Tensor, Option<&Tensor>),
) -> Result<()> {
    let op = "rope_attention";
    check_rope_inputs(op, qkv, table, shape.n_heads, pos, (k_cache, v_cache))?;
    let [q, k, v] = qkv;
    check_attention(op, shape, q, (k_cache, v_cache), pos, out)?;
    if let Some(out_h) = out_h {
        super::matmul::check_half_copy(op, "out_h", out_h, out.last_dim())?;
        if out.rows() != 1 {
            return Err(Error::op(
                op,
                "an f16 copy of the output needs one query row",
            ));
        }
    }
    let mut inputs = vec![q, k, v, &table.inv_freq, pos];
    if let Some(HeadNorms { q, k, .. }) = head_norms {
        for (what, w) in [("q norm weight", q), ("k norm weight", k)] {
            expect_dtype(op, what, w, &[DType::F32])?;
            expect_shape(op, what, w, &[shape.head_dim])?;
        }
        inputs.extend([q, k]);
    }
    let op = Op::RopeAttention {
        attention: shape,
        rotary_dims: table.rotary_dims,
        traditional,
        mscale: table.mscale,
        head_norm: head_norms.map(|h| h.norm),
        half_out: out_h.is_some(),
    };
    let outputs: Vec<&Tensor> = [out, k_cache, v_cache].into_iter().chain(out_h).collect();
    enc.dispatch(op, &inputs, &outputs)
}

/// Attention operands: a valid shape (`AttentionShape::check`), q in f32, the caches with
/// matching shapes, both f32 or both f16 (`check_kv_caches`), `pos` a u32 `[1]`, out like q.
fn check_attention(
    op: &'static str,
    shape: AttentionShape,
    q: &Tensor,
    (k_cache, v_cache): (&Tensor, &Tensor),
    pos: &Tensor,
    out: &Tensor,
) -> Result<()> {
    shape.check(op)?;
    let AttentionShape {
        n_heads,
        n_kv_heads,
        head_dim,
        ..
    } = shape;
    expect_dtype(op, "q", q, &[DType::F32])?;
    expect_shape(op, "q", q, &[q.rows(), n_heads * head_dim])?;
    let capacity = k_cache.shape().get(1).copied().unwrap_or(0);
    check_kv_caches(op, (k_cache, v_cache), &[n_kv_heads, capacity, head_dim])?;
    expect_u32_scalar(op, "pos", pos)?;
    expect_shape(op, "out", out, q.shape())
}

/// Store rows of `x` `[m, n_kv_heads*head_dim]` (f32) into `cache` `[n_kv_heads, capacity,
/// head_dim]` (f32, or f16: values rounded to nearest) at positions pos..pos+m (`pos`: u32
/// `[1]`; positions past the capacity are an error the engine prevents).
pub fn kv_append(enc: &mut CommandEncoder, x: &Tensor, pos: &Tensor, cache: &Tensor) -> Result<()> {
    let [n_kv_heads, _capacity, head_dim] = *cache.shape() else {
        return Err(Error::op(
            "kv_append",
            format!("cache of shape {:?}", cache.shape()),
        ));
    };
    expect_dtype("kv_append", "x", x, &[DType::F32])?;
    expect_dtype("kv_append", "cache", cache, KV_CACHE_DTYPES)?;
    expect_shape("kv_append", "x", x, &[x.rows(), n_kv_heads * head_dim])?;
    expect_u32_scalar("kv_append", "pos", pos)?;
    enc.dispatch(
        Op::KvAppend {
            n_kv_heads,
            head_dim,
        },
        &[x, pos],
        &[cache],
    )
}
