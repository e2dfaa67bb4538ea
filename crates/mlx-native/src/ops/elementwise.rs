use super::{expect_dtype, expect_shape, ACTIVATIONS};
use crate::core::dtype::DType;
use crate::core::encoder::CommandEncoder;
use crate::core::op::{BinaryFn, Op, UnaryFn};
use crate::core::tensor::Tensor;
use crate::Result;

/// out = f(x), elementwise.
pub fn unary(enc: &mut CommandEncoder, f: UnaryFn, x: &Tensor, out: &Tensor) -> Result<()> {
    expect_dtype("unary", "x", x, &[DType::F32])?;
    expect_shape("unary", "out", out, x.shape())?;
    enc.dispatch(Op::Unary(f), &[x], &[out])
}

/// out = a ∘ b, elementwise (same shapes).
pub fn binary(
    enc: &mut CommandEncoder,
    f: BinaryFn,
    a: &Tensor,
    b: &Tensor,
    out: &Tensor,
) -> Result<()> {
    expect_dtype("binary", "a", a, &[DType::F32])?;
    expect_dtype("binary", "b", b, &[DType::F32])?;
    expect_shape("binary", "b", b, a.shape())?;
    expect_shape("binary", "out", out, a.shape())?;
    enc.dispatch(Op::Binary(f), &[a, b], &[out])
}

/// out = f(gate) · up: the gated MLP activation in one pass. out is f32, or f16 (each value
/// rounded once) for a down projection that reads f16 activations (`ops::matmul_reads_half`).
pub fn gated_activation(
    enc: &mut CommandEncoder,
    f: UnaryFn,
    gate: &Tensor,
    up: &Tensor,
    out: &Tensor,
) -> Result<()> {
    expect_dtype("gated_activation", "gate", gate, &[DType::F32])?;
    expect_dtype("gated_activation", "up", up, &[DType::F32])?;
    expect_shape("gated_activation", "up", up, gate.shape())?;
    expect_dtype("gated_activation", "out", out, ACTIVATIONS)?;
    expect_shape("gated_activation", "out", out, gate.shape())?;
    enc.dispatch(Op::GatedActivation(f), &[gate, up], &[out])
}

/// out = cap · tanh(x / cap), elementwise.
pub fn softcap(enc: &mut CommandEncoder, cap: f32, x: &Tensor, out: &Tensor) -> Result<()> {
    expect_dtype("softcap", "x", x, &[DType::F32])?;
    expect_shape("softcap", "out", out, x.shape())?;
    enc.dispatch(Op::Softcap { cap }, &[x], &[out])
}

/// Softmax over the last dimension.
pub fn softmax(enc: &mut CommandEncoder, x: &Tensor, out: &Tensor) -> Result<()> {
    expect_dtype("softmax", "x", x, &[DType::F32])?;
    expect_shape("softmax", "out", out, x.shape())?;
    enc.dispatch(Op::Softmax, &[x], &[out])
}
