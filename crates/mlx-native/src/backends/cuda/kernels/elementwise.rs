//! Elementwise ops and the row softmax (elementwise.cu).

use super::COMMON;
use crate::backends::cuda::compile::Source;
use crate::backends::cuda::device_ptr;
use crate::backends::cuda::launch::{
    blocks, dim, operand_count, wrong_op, Args, CudaKernel, KernelLibrary, Launch, Planner,
};
use crate::core::dtype::DType;
use crate::core::op::{BinaryFn, Op, UnaryFn};
use crate::core::registry::Registry;
use crate::core::tensor::Tensor;
use crate::Result;

pub(super) static SOURCE: Source = Source {
    name: "elementwise",
    parts: &[COMMON, include_str!("elementwise.cu")],
};

const THREADS: u32 = 256;

pub(super) fn register(reg: &mut Registry<Planner>) {
    for f in [UnaryFn::Silu, UnaryFn::GeluExact, UnaryFn::GeluTanh] {
        let variant = Op::Unary(f).variant();
        reg.insert("unary", &variant, DType::F32, unary);
        for dtype in [DType::F32, DType::F16] {
            reg.insert("gated_activation", &variant, dtype, gated_activation);
        }
    }
    for f in [BinaryFn::Add, BinaryFn::Mul] {
        reg.insert("binary", &Op::Binary(f).variant(), DType::F32, binary);
    }
    reg.insert("softcap", "", DType::F32, softcap);
    reg.insert("softmax", "", DType::F32, softmax);
}

/// The activation selector of elementwise.cu.
pub(super) fn unary_code(f: UnaryFn) -> i32 {
    match f {
        UnaryFn::Silu => 0,
        UnaryFn::GeluExact => 1,
        UnaryFn::GeluTanh => 2,
    }
}

/// A grid-stride launch over `n` elements: enough blocks to fill the device, no more.
fn elementwise_grid(lib: &KernelLibrary, n: usize) -> Result<(u32, u32, u32)> {
    let full = blocks(n, THREADS as usize)?;
    Ok((full.min(dim(lib.sm_count() * 16)?), 1, 1))
}

fn unary(
    lib: &KernelLibrary,
    op: &Op,
    inputs: &[Tensor],
    outputs: &[Tensor],
) -> Result<CudaKernel> {
    let Op::Unary(f) = *op else {
        return Err(wrong_op(op));
    };
    let ([x], [out]) = (inputs, outputs) else {
        return Err(operand_count(op, inputs.len(), outputs.len()));
    };
    let n = x.elem_count();
    let args = Args::new().ptr(x)?.ptr(out)?.long(n).code(unary_code(f));
    let launch = lib.launch(
        &SOURCE,
        "unary",
        elementwise_grid(lib, n)?,
        THREADS,
        0,
        args,
    )?;
    Ok(CudaKernel::single(launch))
}

fn binary(
    lib: &KernelLibrary,
    op: &Op,
    inputs: &[Tensor],
    outputs: &[Tensor],
) -> Result<CudaKernel> {
    let Op::Binary(f) = *op else {
        return Err(wrong_op(op));
    };
    let ([a, b], [out]) = (inputs, outputs) else {
        return Err(operand_count(op, inputs.len(), outputs.len()));
    };
    let n = a.elem_count();
    let code = match f {
        BinaryFn::Add => 0,
        BinaryFn::Mul => 1,
    };
    let args = Args::new()
        .ptr(a)?
        .ptr(b)?
        .ptr(out)?
        .long(n)
        .code(code)
        .early_launch(a.rows());
    let launch = lib.launch(
        &SOURCE,
        "binary",
        elementwise_grid(lib, n)?,
        THREADS,
        0,
        args,
    )?;
    Ok(CudaKernel::single(launch))
}

fn gated_activation(
    lib: &KernelLibrary,
    op: &Op,
    inputs: &[Tensor],
    outputs: &[Tensor],
) -> Result<CudaKernel> {
    let Op::GatedActivation(f) = *op else {
        return Err(wrong_op(op));
    };
    let ([gate, up], [out]) = (inputs, outputs) else {
        return Err(operand_count(op, inputs.len(), outputs.len()));
    };
    // f16 activations: the f16 copy alone.
    let outs = match out.dtype() {
        DType::F16 => (0, device_ptr(out)?),
        _ => (device_ptr(out)?, 0),
    };
    let launch = gated_activation_at(
        lib,
        (device_ptr(gate)?, device_ptr(up)?),
        outs,
        (gate.elem_count(), gate.rows()),
        f,
    )?;
    Ok(CudaKernel::single(launch))
}

/// out = f(gate)·up over `n` f32 values (of `rows` token rows) at device addresses unless 0,
/// and its f16 copy at `out_h` unless 0.
pub(super) fn gated_activation_at(
    lib: &KernelLibrary,
    (gate, up): (u64, u64),
    (out, out_h): (u64, u64),
    (n, rows): (usize, usize),
    f: UnaryFn,
) -> Result<Launch> {
    let args = Args::new()
        .u64(gate)
        .u64(up)
        .u64(out)
        .u64(out_h)
        .long(n)
        .code(unary_code(f))
        .early_launch(rows);
    let grid = elementwise_grid(lib, n)?;
    lib.launch(&SOURCE, "gated_activation", grid, THREADS, 0, args)
}

/// out = x widened from `n` f16 values to f32, at device addresses.
pub(super) fn widen_f16_at(lib: &KernelLibrary, x: u64, out: u64, n: usize) -> Result<Launch> {
    let args = Args::new().u64(x).u64(out).long(n);
    let grid = elementwise_grid(lib, n)?;
    lib.launch(&SOURCE, "widen_f16", grid, THREADS, 0, args)
}

fn softcap(
    lib: &KernelLibrary,
    op: &Op,
    inputs: &[Tensor],
    outputs: &[Tensor],
) -> Result<CudaKernel> {
    let Op::Softcap { cap } = *op else {
        return Err(wrong_op(op));
    };
    let ([x], [out]) = (inputs, outputs) else {
        return Err(operand_count(op, inputs.len(), outputs.len()));
    };
    let n = x.elem_count();
    let args = Args::new().ptr(x)?.ptr(out)?.long(n).f32(cap);
    let launch = lib.launch(
        &SOURCE,
        "softcap",
        elementwise_grid(lib, n)?,
        THREADS,
        0,
        args,
    )?;
    Ok(CudaKernel::single(launch))
}

fn softmax(
    lib: &KernelLibrary,
    op: &Op,
    inputs: &[Tensor],
    outputs: &[Tensor],
) -> Result<CudaKernel> {
    let ([x], [out]) = (inputs, outputs) else {
        return Err(operand_count(op, inputs.len(), outputs.len()));
    };
    let d = x.last_dim();
    let args = Args::new().ptr(x)?.ptr(out)?.int(d)?;
    let grid = (dim(x.rows())?, 1, 1);
    Ok(CudaKernel::single(
        lib.launch(&SOURCE, "softmax", grid, THREADS, 0, args)?,
    ))
}
