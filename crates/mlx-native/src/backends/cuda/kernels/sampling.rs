//! Token choice on the device (sampling.cu): argmax, and sampling with the CPU backend's
//! semantics (repetition penalty, min-p, top-k, top-p, temperature, a (seed, pos) draw).

use super::COMMON;
use crate::backends::cuda::compile::Source;
use crate::backends::cuda::launch::{
    operand_count, wrong_op, Args, CudaKernel, KernelLibrary, Planner,
};
use crate::core::dtype::DType;
use crate::core::op::{argmax_operands, Op};
use crate::core::registry::Registry;
use crate::core::tensor::Tensor;
use crate::{Error, Result};

const SAMPLING: &str = include_str!("sampling.cu");

pub(super) static SOURCE: Source = Source {
    name: "sampling",
    parts: &[COMMON, SAMPLING],
};

/// SAMPLE_THREADS and SAMPLER_THREADS (sampling.cu).
const THREADS: u32 = 1024;
const SAMPLER_THREADS: usize = 512;
/// RADIX_BINS, CUT_VALUES and SAMPLE_CANDIDATES (sampling.cu).
const RADIX_BINS: usize = 256;
const CUT_VALUES: usize = 2 * RADIX_BINS + 1;
const SAMPLE_CANDIDATES: usize = 2048;
/// A sampler block's histograms: (SAMPLER_WARPS + 1) · RADIX_BINS doubles.
const HISTOGRAM_BYTES: usize = (SAMPLER_THREADS / 32 + 1) * RADIX_BINS * 8;

/// Global scratch of a sampler grid of `blocks` (`SamplerGrid`, sampling.cu): grid_sync's
/// count and a pad, two slots of per-block doubles and ids, two found ids, two slots of per-block
/// histograms, two merged histograms, the per-block and merged distance histograms, the
/// gathered candidates and their count.
fn sampler_scratch_bytes(blocks: usize) -> usize {
    8 + 2 * blocks * 8
        + 2 * blocks * 4
        + 8
        + 2 * blocks * RADIX_BINS * 8
        + 2 * RADIX_BINS * 8
        + (blocks + 1) * CUT_VALUES * 8
        + SAMPLE_CANDIDATES * 8
        + 4
}

pub(super) fn register(reg: &mut Registry<Planner>) {
    reg.insert("argmax", "", DType::U32, argmax);
    reg.insert("sample", "", DType::U32, sample);
    reg.insert("end_step", "", DType::U32, end_step);
}

fn end_step(
    lib: &KernelLibrary,
    op: &Op,
    inputs: &[Tensor],
    outputs: &[Tensor],
) -> Result<CudaKernel> {
    let ([token], [pos, ring]) = (inputs, outputs) else {
        return Err(operand_count(op, inputs.len(), outputs.len()));
    };
    let args = Args::new()
        .ptr(token)?
        .ptr(pos)?
        .ptr(ring)?
        .int(ring.elem_count())?;
    Ok(CudaKernel::single(lib.launch(
        &SOURCE,
        "end_step",
        (1, 1, 1),
        32,
        0,
        args,
    )?))
}

fn argmax(
    lib: &KernelLibrary,
    op: &Op,
    inputs: &[Tensor],
    outputs: &[Tensor],
) -> Result<CudaKernel> {
    let (logits, token, step) = argmax_operands(op, inputs, outputs)?;
    let vocab = logits.last_dim();
    if vocab == 0 {
        return Err(Error::op("argmax", "empty logits"));
    }
    let args = Args::new().ptr(logits)?.ptr(token)?;
    let args = match step {
        Some((pos, ring)) => args.ptr(pos)?.ptr(ring)?.int(ring.elem_count())?,
        None => args.u64(0).u64(0).int(1)?,
    };
    let args = args.int(vocab)?.int(logits.rows().saturating_sub(1))?;
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
    let vocab = logits.last_dim();
    if vocab == 0 {
        return Err(Error::op("sample", "empty logits"));
    }
    let penalize = params.repetition_penalty != 1.0 && params.repetition_window > 0;
    let shared = HISTOGRAM_BYTES + if penalize { vocab.div_ceil(32) * 4 } else { 0 };
    let args = Args::new()
        .ptr(logits)?
        .ptr(pos)?
        .ptr(token)?
        .ptr(history)?
        .int(vocab)?
        .int(logits.rows().saturating_sub(1))?
        .int(history.elem_count())?
        .f32(params.repetition_penalty)
        .int(params.repetition_window)?
        .f32(params.temperature)
        .int(params.top_k)?
        .f32(params.top_p)
        .f32(params.min_p)
        .u64(params.seed);
    let shared = u32::try_from(shared)
        .map_err(|_| Error::op("sample", format!("vocabulary of {vocab} is too large")))?;
    // A block per SM, no more than the vocabulary fills with a logit a thread; launched
    // cooperatively, as its blocks meet at grid-wide barriers. H100, 2026-11-26, 151,936
    // logits at T = 0.7: 442 µs in one block of 1,024 threads, 49 µs so.
    let blocks = lib.sm_count().min(vocab.div_ceil(SAMPLER_THREADS)).max(1);
    let (scratch, address) = lib.zeroed_scratch(sampler_scratch_bytes(blocks))?;
    let launch = lib
        .launch(
            &SOURCE,
            "sample",
            (blocks as u32, 1, 1),
            SAMPLER_THREADS as u32,
            shared,
            args.u64(address),
        )?
        .cooperative();
    Ok(CudaKernel::single(launch).holding(scratch))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The sampler's global scratch and shared memory are sized by constants of sampling.cu
    /// that this file repeats: a mismatch would write past them.
    #[test]
    fn scratch_constants_match_the_kernel() {
        super::super::assert_defines(
            "sampling.cu",
            SAMPLING,
            &[
                ("SAMPLE_THREADS", THREADS.to_string()),
                ("SAMPLER_THREADS", SAMPLER_THREADS.to_string()),
                ("RADIX_BINS", RADIX_BINS.to_string()),
                ("CUT_VALUES", "(2 * RADIX_BINS + 1)".to_string()),
                ("SAMPLE_CANDIDATES", SAMPLE_CANDIDATES.to_string()),
            ],
        );
    }
}
