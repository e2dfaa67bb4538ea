//! RMSNorm and LayerNorm over the last dimension, f32 activations, any float weight (read
//! as stored, a piece at a time: nothing is converted or allocated per call).

use rayon::prelude::*;

use super::{elementwise, into_half, slice, slice_mut, wrong_op, CpuKernel, FloatSlice};
use crate::core::dtype::DType;
use crate::core::op::{operand_count, BinaryFn, Op, PreNorm};
use crate::core::registry::Registry;
use crate::core::tensor::Tensor;
use crate::Result;

pub(super) fn register(reg: &mut Registry<CpuKernel>) {
    reg.insert("rms_norm", "", DType::F32, rms_norm);
    reg.insert("rms_norm", "", DType::F16, |op, inputs, outputs| {
        into_half(op, inputs, outputs, rms_norm)
    });
    reg.insert("add_rms_norm", "", DType::F32, add_rms_norm);
    reg.insert("layer_norm", "", DType::F32, layer_norm);
}

/// RMSNorm(x) by `weight` into a new tensor: a norm folded into another op computed exactly as
/// its own dispatch would (rows of `weight`'s length: x may be a `[m, heads·head_dim]` view).
pub(super) fn rms_normed(norm: PreNorm, x: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let rows = [
        x.elem_count() / weight.elem_count().max(1),
        weight.elem_count(),
    ];
    let normed = x.device().empty(&rows, DType::F32)?;
    rms_norm(
        &norm.op(),
        &[x.reshape(&rows)?, weight.clone()],
        std::slice::from_ref(&normed),
    )?;
    normed.reshape(x.shape())
}

/// Elements below which rows are normalised on the calling thread (decode steps).
const PARALLEL_ELEMENTS: usize = 1 << 14;

/// Weights converted to f32 per piece of this many elements.
const PIECE: usize = 64;

/// Runs `f(out row, x row)` over the rows of `d` elements, in parallel for large inputs.
fn for_each_row(
    out: &mut [f32],
    x: &[f32],
    d: usize,
    f: impl Fn(&mut [f32], &[f32]) -> Result<()> + Sync,
) -> Result<()> {
    if d == 0 {
        return Ok(());
    }
    if out.len() <= PARALLEL_ELEMENTS {
        out.chunks_mut(d)
            .zip(x.chunks(d))
            .try_for_each(|(o, x)| f(o, x))
    } else {
        out.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .try_for_each(|(o, x)| f(o, x))
    }
}

pub(super) fn rms_norm(op: &Op, inputs: &[Tensor], outputs: &[Tensor]) -> Result<()> {
    let Op::RmsNorm { eps, unit_offset } = *op else {
        return Err(wrong_op(op));
    };
    let x = slice::<f32>(&inputs[0])?;
    let w = FloatSlice::of(&inputs[1])?;
    let out = slice_mut::<f32>(&outputs[0])?;
    let d = w.len();
    let offset = if unit_offset { 1.0 } else { 0.0 };
    for_each_row(out, x, d, |o, x| {
        let ms = x.iter().map(|v| v * v).sum::<f32>() / d as f32;
        let r = 1.0 / (ms + eps).sqrt();
        let mut scratch = [0f32; PIECE];
        for (p, (o, x)) in o.chunks_mut(PIECE).zip(x.chunks(PIECE)).enumerate() {
            let w = w.f32_range(p * PIECE, &mut scratch[..o.len()])?;
            for ((o, &x), &w) in o.iter_mut().zip(x).zip(w) {
                *o = x * r * (w + offset);
            }
        }
        Ok(())
    })?;
    // With a residual: the normed rows rounded to f32 first, then the sum, as a norm
    // followed by an add computes it.
    if let Some(residual) = inputs.get(2) {
        let residual = slice::<f32>(residual)?;
        for (o, &r) in out.iter_mut().zip(residual) {
            *o += r;
        }
    }
    Ok(())
}

/// `Op::AddRmsNorm`: the sum as `binary` adds, then its norm as `rms_norm` (into f16 where
/// normed is f16).
fn add_rms_norm(op: &Op, inputs: &[Tensor], outputs: &[Tensor]) -> Result<()> {
    let Op::AddRmsNorm { eps, unit_offset } = *op else {
        return Err(wrong_op(op));
    };
    let ([a, b, w], [sum, normed]) = (inputs, outputs) else {
        return Err(operand_count(op, inputs.len(), outputs.len()));
    };
    let add = Op::Binary(BinaryFn::Add);
    elementwise::binary(&add, &[a.clone(), b.clone()], std::slice::from_ref(sum))?;
    let norm = Op::RmsNorm { eps, unit_offset };
    let (inputs, normed) = ([sum.clone(), w.clone()], std::slice::from_ref(normed));
    match normed[0].dtype() {
        DType::F16 => into_half(&norm, &inputs, normed, rms_norm),
        _ => rms_norm(&norm, &inputs, normed),
    }
}

fn layer_norm(op: &Op, inputs: &[Tensor], outputs: &[Tensor]) -> Result<()> {
    let Op::LayerNorm { eps } = *op else {
        return Err(wrong_op(op));
    };
    let x = slice::<f32>(&inputs[0])?;
    let w = FloatSlice::of(&inputs[1])?;
    let b = FloatSlice::of(&inputs[2])?;
    let out = slice_mut::<f32>(&outputs[0])?;
    let d = w.len();
    for_each_row(out, x, d, |o, x| {
        let mean = x.iter().sum::<f32>() / d as f32;
        let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
        let r = 1.0 / (var + eps).sqrt();
        let (mut w_scratch, mut b_scratch) = ([0f32; PIECE], [0f32; PIECE]);
        for (p, (o, x)) in o.chunks_mut(PIECE).zip(x.chunks(PIECE)).enumerate() {
            let w = w.f32_range(p * PIECE, &mut w_scratch[..o.len()])?;
            let b = b.f32_range(p * PIECE, &mut b_scratch[..o.len()])?;
            for (((o, &x), &w), &b) in o.iter_mut().zip(x).zip(w).zip(b) {
                *o = (x - mean) * r * w + b;
            }
        }
        Ok(())
    })
}
