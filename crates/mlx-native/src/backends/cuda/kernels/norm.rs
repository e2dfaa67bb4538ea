//! RMSNorm and LayerNorm (norm.cu): one block per row.

use super::COMMON;
use crate::backends::cuda::compile::Source;
use crate::backends::cuda::launch::{
    dim, float_type, operand_count, wrong_op, Args, CudaKernel, KernelLibrary, Planner,
};
use crate::core::dtype::DType;
use crate::core::op::Op;
use crate::core::registry::Registry;
use crate::core::tensor::Tensor;
use crate::Result;

pub(super) static SOURCE: Source = Source {
    name: "norm",
    parts: &[COMMON, include_str!("norm.cu")],
};

pub(super) fn register(reg: &mut Registry<Planner>) {
    reg.insert("rms_norm", "", DType::F32, rms_norm);
    reg.insert("layer_norm", "", DType::F32, layer_norm);
}

/// Enough warps to give each thread a few elements of a row.
fn threads(d: usize) -> u32 {
    (d.div_ceil(4).div_ceil(32) * 32).clamp(32, 1024) as u32
}

fn rms_norm(
    lib: &KernelLibrary,
    op: &Op,
    inputs: &[Tensor],
    outputs: &[Tensor],
) -> Result<CudaKernel> {
    let Op::RmsNorm { eps, unit_offset } = *op else {
        return Err(wrong_op(op));
    };
    let ([x, w], [out]) = (inputs, outputs) else {
        return Err(operand_count(op, inputs.len(), outputs.len()));
    };
    let d = x.last_dim();
    let args = Args::new()
        .ptr(x)?
        .ptr(w)?
        .ptr(out)?
        .int(d)?
        .code(float_type("rms_norm", "weight", w.dtype())?)
        .f32(eps)
        .f32(if unit_offset { 1.0 } else { 0.0 });
    let grid = (dim(x.rows())?, 1, 1);
    Ok(CudaKernel::single(lib.launch(
        &SOURCE,
        "rms_norm",
        grid,
        threads(d),
        0,
        args,
    )?))
}

fn layer_norm(
    lib: &KernelLibrary,
    op: &Op,
    inputs: &[Tensor],
    outputs: &[Tensor],
) -> Result<CudaKernel> {
    let Op::LayerNorm { eps } = *op else {
        return Err(wrong_op(op));
    };
    let ([x, w, b], [out]) = (inputs, outputs) else {
        return Err(operand_count(op, inputs.len(), outputs.len()));
    };
    let d = x.last_dim();
    let args = Args::new()
        .ptr(x)?
        .ptr(w)?
        .ptr(b)?
        .ptr(out)?
        .int(d)?
        .code(float_type("layer_norm", "weight", w.dtype())?)
        .code(float_type("layer_norm", "bias", b.dtype())?)
        .f32(eps);
    let grid = (dim(x.rows())?, 1, 1);
    Ok(CudaKernel::single(lib.launch(
        &SOURCE,
        "layer_norm",
        grid,
        threads(d),
        0,
        args,
    )?))
}
