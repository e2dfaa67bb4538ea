use super::{expect_dtype, expect_shape, ACTIVATIONS, FLOATS};
use crate::core::dtype::DType;
use crate::core::encoder::CommandEncoder;
use crate::core::op::Op;
use crate::core::tensor::Tensor;
use crate::{Error, Result};

/// out = x / rms(x) · w (or · (1 + w) with `unit_offset`, Gemma's convention), per row. out is
/// f32, or f16 (each value rounded once) for a matmul that reads f16 activations
/// (`ops::matmul_reads_half`).
pub fn rms_norm(
    enc: &mut CommandEncoder,
    x: &Tensor,
    weight: &Tensor,
    eps: f32,
    unit_offset: bool,
    out: &Tensor,
) -> Result<()> {
    expect_dtype("rms_norm", "x", x, &[DType::F32])?;
    expect_dtype("rms_norm", "weight", weight, FLOATS)?;
    expect_shape("rms_norm", "weight", weight, &[x.last_dim()])?;
    expect_dtype("rms_norm", "out", out, ACTIVATIONS)?;
    expect_shape("rms_norm", "out", out, x.shape())?;
    enc.dispatch(Op::RmsNorm { eps, unit_offset }, &[x, weight], &[out])
}

/// out = residual + x / rms(x) · w (or · (1 + w)), per row: a block output norm and its
/// residual add in one dispatch (Gemma's post-attention and post-MLP norms).
pub fn rms_norm_add(
    enc: &mut CommandEncoder,
    x: &Tensor,
    weight: &Tensor,
    eps: f32,
    unit_offset: bool,
    residual: &Tensor,
    out: &Tensor,
) -> Result<()> {
    expect_dtype("rms_norm_add", "x", x, &[DType::F32])?;
    expect_dtype("rms_norm_add", "weight", weight, FLOATS)?;
    expect_dtype("rms_norm_add", "residual", residual, &[DType::F32])?;
    expect_shape("rms_norm_add", "weight", weight, &[x.last_dim()])?;
    expect_shape("rms_norm_add", "residual", residual, x.shape())?;
    expect_dtype("rms_norm_add", "out", out, &[DType::F32])?;
    expect_shape("rms_norm_add", "out", out, x.shape())?;
    let op = Op::RmsNorm { eps, unit_offset };
    enc.dispatch(op, &[x, weight, residual], &[out])
}

/// sum = a + b, then normed = sum / rms(sum) · w (or · (1 + w)), per row, in one dispatch: a
/// residual add and the next block's input norm (prompts; the values of `binary` then
/// `rms_norm`). sum is f32 (the residual stream), normed f32 or f16 (as `rms_norm`'s out).
#[allow(clippy::too_many_arguments)]
pub fn add_rms_norm(
    enc: &mut CommandEncoder,
    a: &Tensor,
    b: &Tensor,
    weight: &Tensor,
    eps: f32,
    unit_offset: bool,
    sum: &Tensor,
    normed: &Tensor,
) -> Result<()> {
    let op = "add_rms_norm";
    expect_dtype(op, "a", a, &[DType::F32])?;
    expect_dtype(op, "b", b, &[DType::F32])?;
    expect_shape(op, "b", b, a.shape())?;
    expect_dtype(op, "weight", weight, FLOATS)?;
    expect_shape(op, "weight", weight, &[a.last_dim()])?;
    expect_dtype(op, "sum", sum, &[DType::F32])?;
    expect_shape(op, "sum", sum, a.shape())?;
    expect_dtype(op, "normed", normed, ACTIVATIONS)?;
    expect_shape(op, "normed", normed, a.shape())?;
    if sum.overlaps(normed) {
        return Err(Error::op(op, "sum and normed overlap"));
    }
    let op = Op::AddRmsNorm { eps, unit_offset };
    enc.dispatch(op, &[a, b, weight], &[sum, normed])
}

/// out = (x − mean) / std · w + b, per row.
pub fn layer_norm(
    enc: &mut CommandEncoder,
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f32,
    out: &Tensor,
) -> Result<()> {
    expect_dtype("layer_norm", "x", x, &[DType::F32])?;
    for (what, t) in [("weight", weight), ("bias", bias)] {
        expect_dtype("layer_norm", what, t, FLOATS)?;
        expect_shape("layer_norm", what, t, &[x.last_dim()])?;
    }
    expect_shape("layer_norm", "out", out, x.shape())?;
    enc.dispatch(Op::LayerNorm { eps }, &[x, weight, bias], &[out])
}
