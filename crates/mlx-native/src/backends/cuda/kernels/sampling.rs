//! Token choice on the device (sampling.cu): argmax, and sampling at temperature 0 (greedy,
//! with the repetition penalty). Sampling at a positive temperature is not implemented on
//! CUDA yet: its planner reports that as a missing kernel.

use super::COMMON;
use crate::backends::cuda::compile::Source;
use crate::backends::cuda::launch::{
    operand_count, wrong_op, Args, CudaKernel, KernelLibrary, Planner,
};
use crate::core::dtype::DType;
use crate::core::op::Op;
use crate::core::registry::Registry;
use crate::core::tensor::Tensor;
use crate::{Error, Result};

pub(super) static SOURCE: Source = Source {
    name: "sampling",
    parts: &[COMMON, include_str!("sampling.cu")],
};

/// SAMPLE_THREADS (sampling.cu).
const THREADS: u32 = 1024;

pub(super) fn register(reg: &mut Registry<Planner>) {
    reg.insert("argmax", "", DType::U32, argmax);
    reg.insert("sample", "", DType::U32, sample);
}

fn argmax(
    lib: &KernelLibrary,
    op: &Op,
    inputs: &[Tensor],
    outputs: &[Tensor],
) -> Result<CudaKernel> {
    let ([logits], [token]) = (inputs, outputs) else {
        return Err(operand_count(op, inputs.len(), outputs.len()));
    };
    let vocab = logits.last_dim();
    let args = Args::new()
        .ptr(logits)?
        .ptr(token)?
        .int(vocab)?
        .int(logits.rows().saturating_sub(1))?;
    Ok(CudaKernel::single(lib.launch(
        &SOURCE,
        "argmax",
        (1, 1, 1),
        THREADS,
        0,
        args,
    )?))
}

fn sample(
    lib: &KernelLibrary,
    op: &Op,
    inputs: &[Tensor],
    outputs: &[Tensor],
) -> Result<CudaKernel> {
    let Op::Sample(params) = *op else {
        return Err(wrong_op(op));
    };
    let ([logits, pos], [token, history]) = (inputs, outputs) else {
        return Err(operand_count(op, inputs.len(), outputs.len()));
    };
    if params.temperature != 0.0 {
        return Err(Error::NoKernel {
            backend: "cuda",
            op: "sample",
            variant: format!(
                "temperature {} (only temperature 0 is implemented)",
                params.temperature
            ),
        });
    }
    let vocab = logits.last_dim();
    let penalize = params.repetition_penalty != 1.0 && params.repetition_window > 0;
    let shared = if penalize { vocab.div_ceil(32) * 4 } else { 0 };
    let args = Args::new()
        .ptr(logits)?
        .ptr(pos)?
        .ptr(token)?
        .ptr(history)?
        .int(vocab)?
        .int(logits.rows().saturating_sub(1))?
        .int(history.elem_count())?
        .f32(params.repetition_penalty)
        .int(params.repetition_window)?;
    let launch = lib.launch(
        &SOURCE,
        "sample_greedy",
        (1, 1, 1),
        THREADS,
        shared as u32,
        args,
    )?;
    Ok(CudaKernel::single(launch))
}
