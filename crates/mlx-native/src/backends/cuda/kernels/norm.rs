//! RMSNorm and LayerNorm (norm.cu): one block per row.

use super::COMMON;
use crate::backends::cuda::compile::Source;
use crate::backends::cuda::device_ptr;
use crate::backends::cuda::launch::{
    dim, float_type, operand_count, wrong_op, Args, CudaKernel, KernelLibrary, Launch, Planner,
};
use crate::core::dtype::DType;
use crate::core::op::{Op, PreNorm};
use crate::core::registry::Registry;
use crate::core::tensor::Tensor;
use crate::Result;

pub(super) static SOURCE: Source = Source {
    name: "norm",
    parts: &[COMMON, include_str!("norm.cu")],
};

pub(super) fn register(reg: &mut Registry<Planner>) {
    for dtype in [DType::F32, DType::F16] {
        reg.insert("rms_norm", "", dtype, rms_norm);
    }
    reg.insert("add_rms_norm", "", DType::F32, add_rms_norm);
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
    let (x, w, residual) = match inputs {
        [x, w] => (x, w, 0),
        [x, w, residual] => (x, w, device_ptr(residual)?),
        _ => return Err(operand_count(op, inputs.len(), outputs.len())),
    };
    let [out] = outputs else {
        return Err(operand_count(op, inputs.len(), outputs.len()));
    };
    let norm = PreNorm { eps, unit_offset };
    let rows = RmsNormRows {
        x: device_ptr(x)?,
        residual,
        out: device_ptr(out)?,
        rows: x.rows(),
        d: x.last_dim(),
        tokens: x.rows(),
    };
    let half_out = out.dtype() == DType::F16;
    Ok(CudaKernel::single(rms_norm_launch(
        lib, rows, w, norm, half_out,
    )?))
}

/// Rows of an RMSNorm by device address: `rows` rows of `d` f32 at `x` into `out`, plus the
/// rows at `residual` unless it is 0. They belong to `tokens` token rows (a head norm's rows
/// are heads), which decide whether the launch lets the next one launch early.
pub(super) struct RmsNormRows {
    pub x: u64,
    pub residual: u64,
    pub out: u64,
    pub rows: usize,
    pub d: usize,
    pub tokens: usize,
}

/// The RMSNorm launch of `rows` into f32 (also used by the matvec planner in front of a
/// matvec).
pub(super) fn rms_norm_rows(
    lib: &KernelLibrary,
    rows: RmsNormRows,
    w: &Tensor,
    norm: PreNorm,
) -> Result<Launch> {
    rms_norm_launch(lib, rows, w, norm, false)
}

/// The RMSNorm launch of `rows`, into f16 where `half_out`.
fn rms_norm_launch(
    lib: &KernelLibrary,
    RmsNormRows {
        x,
        residual,
        out,
        rows,
        d,
        tokens,
    }: RmsNormRows,
    w: &Tensor,
    norm: PreNorm,
    half_out: bool,
) -> Result<Launch> {
    let args = Args::new()
        .u64(x)
        .ptr(w)?
        .u64(residual)
        .u64(out)
        .int(d)?
        .code(float_type("rms_norm", "weight", w.dtype())?)
        .f32(norm.eps)
        .f32(norm.w_offset())
        .code(i32::from(half_out))
        .early_launch(tokens);
    lib.launch(&SOURCE, "rms_norm", (dim(rows)?, 1, 1), threads(d), 0, args)
}

fn add_rms_norm(
    lib: &KernelLibrary,
    op: &Op,
    inputs: &[Tensor],
    outputs: &[Tensor],
) -> Result<CudaKernel> {
    let Op::AddRmsNorm { eps, unit_offset } = *op else {
        return Err(wrong_op(op));
    };
    let ([a, b, w], [sum, normed]) = (inputs, outputs) else {
        return Err(operand_count(op, inputs.len(), outputs.len()));
    };
    let norm = PreNorm { eps, unit_offset };
    let d = a.last_dim();
    let args = Args::new()
        .ptr(a)?
        .ptr(b)?
        .ptr(w)?
        .ptr(sum)?
        .ptr(normed)?
        .int(d)?
        .code(float_type("add_rms_norm", "weight", w.dtype())?)
        .f32(norm.eps)
        .f32(norm.w_offset())
        .code(i32::from(normed.dtype() == DType::F16))
        .early_launch(a.rows());
    let grid = (dim(a.rows())?, 1, 1);
    Ok(CudaKernel::single(lib.launch(
        &SOURCE,
        "add_rms_norm",
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
