//! RMSNorm and LayerNorm over the last dimension, f32 activations, any float weight.

use rayon::prelude::*;

use super::{floats, slice, slice_mut, wrong_op, CpuKernel};
use crate::core::dtype::DType;
use crate::core::op::Op;
use crate::core::registry::Registry;
use crate::core::tensor::Tensor;
use crate::Result;

pub(super) fn register(reg: &mut Registry<CpuKernel>) {
    reg.insert("rms_norm", "", DType::F32, rms_norm);
    reg.insert("layer_norm", "", DType::F32, layer_norm);
}

fn rms_norm(op: &Op, inputs: &[Tensor], outputs: &[Tensor]) -> Result<()> {
    let Op::RmsNorm { eps, unit_offset } = *op else {
        return Err(wrong_op(op));
    };
    let x = slice::<f32>(&inputs[0])?;
    let w = floats(&inputs[1])?;
    let out = slice_mut::<f32>(&outputs[0])?;
    let d = w.len();
    let offset = if unit_offset { 1.0 } else { 0.0 };
    out.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .for_each(|(o, x)| {
            let ms = x.iter().map(|v| v * v).sum::<f32>() / d as f32;
            let r = 1.0 / (ms + eps).sqrt();
            for ((o, &x), &w) in o.iter_mut().zip(x).zip(w.iter()) {
                *o = x * r * (w + offset);
            }
        });
    Ok(())
}

fn layer_norm(op: &Op, inputs: &[Tensor], outputs: &[Tensor]) -> Result<()> {
    let Op::LayerNorm { eps } = *op else {
        return Err(wrong_op(op));
    };
    let x = slice::<f32>(&inputs[0])?;
    let w = floats(&inputs[1])?;
    let b = floats(&inputs[2])?;
    let out = slice_mut::<f32>(&outputs[0])?;
    let d = w.len();
    out.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .for_each(|(o, x)| {
            let mean = x.iter().sum::<f32>() / d as f32;
            let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
            let r = 1.0 / (var + eps).sqrt();
            for i in 0..d {
                o[i] = (x[i] - mean) * r * w[i] + b[i];
            }
        });
    Ok(())
}
