//! Causal grouped-query attention over a KV cache, and the cache append.
//!
//! One task per (query row, head): scores for the visible keys go into a per-thread buffer,
//! then a two-pass softmax (max, exp-sum) in f32 and the weighted sum of values.

use rayon::prelude::*;

use super::{scalar_u32, slice, slice_mut, wrong_op, CpuKernel};
use crate::core::dtype::DType;
use crate::core::op::Op;
use crate::core::registry::Registry;
use crate::core::tensor::Tensor;
use crate::{Error, Result};

pub(super) fn register(reg: &mut Registry<CpuKernel>) {
    reg.insert("attention", "", DType::F32, attention);
    reg.insert("kv_append", "", DType::F32, kv_append);
}

fn attention(op: &Op, inputs: &[Tensor], outputs: &[Tensor]) -> Result<()> {
    let Op::Attention {
        n_heads,
        n_kv_heads,
        head_dim,
        scale,
        window,
        softcap,
    } = *op
    else {
        return Err(wrong_op(op));
    };
    let q = slice::<f32>(&inputs[0])?;
    let k_cache = slice::<f32>(&inputs[1])?;
    let v_cache = slice::<f32>(&inputs[2])?;
    let pos = scalar_u32(&inputs[3])?;
    let out = slice_mut::<f32>(&outputs[0])?;
    let capacity = inputs[1].shape().get(1).copied().unwrap_or(0);
    let m = inputs[0].rows();
    if pos + m > capacity {
        return Err(Error::op(
            "attention",
            format!(
                "query positions {pos}..{} exceed the cache capacity {capacity}",
                pos + m
            ),
        ));
    }
    if window == Some(0) {
        return Err(Error::op(
            "attention",
            "a sliding window of 0 positions sees no key",
        ));
    }
    if head_dim == 0 || n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
        return Err(Error::op(
            "attention",
            format!("{n_heads} heads, {n_kv_heads} kv heads of dim {head_dim}"),
        ));
    }
    let group = n_heads / n_kv_heads;
    let head_stride = capacity * head_dim;

    out.par_chunks_mut(head_dim)
        .zip(q.par_chunks(head_dim))
        .enumerate()
        .for_each_init(Vec::new, |scores: &mut Vec<f32>, (task, (out, q))| {
            let (row, head) = (task / n_heads, task % n_heads);
            let q_pos = pos + row;
            let first = window.map_or(0, |w| (q_pos + 1).saturating_sub(w));
            let kv = head / group;
            let keys = &k_cache[kv * head_stride..][first * head_dim..(q_pos + 1) * head_dim];
            let values = &v_cache[kv * head_stride..][first * head_dim..(q_pos + 1) * head_dim];

            scores.clear();
            scores.extend(keys.chunks_exact(head_dim).map(|k| {
                let s = dot(q, k) * scale;
                match softcap {
                    Some(cap) => cap * (s / cap).tanh(),
                    None => s,
                }
            }));
            let max = scores.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let mut sum = 0.0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            out.fill(0.0);
            for (&p, v) in scores.iter().zip(values.chunks_exact(head_dim)) {
                for (o, &v) in out.iter_mut().zip(v) {
                    *o += p * v;
                }
            }
            let inv_sum = 1.0 / sum;
            out.iter_mut().for_each(|o| *o *= inv_sum);
        });
    Ok(())
}

/// Dot product with eight independent accumulators, so the loop vectorizes.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in a8.zip(b8) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

fn kv_append(op: &Op, inputs: &[Tensor], outputs: &[Tensor]) -> Result<()> {
    let Op::KvAppend {
        n_kv_heads,
        head_dim,
    } = *op
    else {
        return Err(wrong_op(op));
    };
    let x = slice::<f32>(&inputs[0])?;
    let pos = scalar_u32(&inputs[1])?;
    let cache = slice_mut::<f32>(&outputs[0])?;
    let capacity = outputs[0].shape().get(1).copied().unwrap_or(0);
    let m = inputs[0].rows();
    if pos + m > capacity {
        return Err(Error::op(
            "kv_append",
            format!(
                "positions {pos}..{} exceed the cache capacity {capacity}",
                pos + m
            ),
        ));
    }
    let row_len = n_kv_heads * head_dim;
    for (r, row) in x.chunks_exact(row_len.max(1)).take(m).enumerate() {
        for (h, src) in row.chunks_exact(head_dim.max(1)).enumerate() {
            let at = (h * capacity + pos + r) * head_dim;
            cache[at..at + head_dim].copy_from_slice(src);
        }
    }
    Ok(())
}
