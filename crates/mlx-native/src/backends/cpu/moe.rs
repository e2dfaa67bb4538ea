//! Mixture-of-experts ops on the CPU: routing, expert-indexed matmuls and the weighted
//! combine. A gathered matmul groups the (row, slot) pairs by expert, copies their rows of x
//! together and runs the layout's ordinary matmul kernel on that expert's weights (a view into
//! the stacked tensors), so each selected expert's weights are read once per call and the
//! products are exactly the dense matmul's.

use super::matmul::kernel_for;
use super::norm::rms_normed;
use super::{elementwise, slice, slice_mut, wrong_op, CpuKernel};
use crate::core::dtype::DType;
use crate::core::op::{operand_count, Op, Route, Routing};
use crate::core::registry::Registry;
use crate::core::tensor::Tensor;
use crate::quant::WeightLayout;
use crate::{Error, Result};

pub(super) fn register(reg: &mut Registry<CpuKernel>) {
    for layout in WeightLayout::all() {
        reg.insert(
            "gather_matmul",
            &layout.variant(),
            DType::F32,
            gather_matmul,
        );
        reg.insert(
            "gather_gated_matmul",
            &layout.variant(),
            DType::F32,
            gather_gated_matmul,
        );
    }
    reg.insert("moe_route", "", DType::U32, moe_route);
    reg.insert("moe_combine", "", DType::F32, moe_combine);
}

/// Indices of `scores` in descending order of score, the lower index first among equals,
/// the first `top_k` of them.
fn top_k(scores: &[f32], top_k: usize, picked: &mut Vec<usize>) {
    picked.clear();
    for _ in 0..top_k {
        let mut best: Option<usize> = None;
        for (e, &s) in scores.iter().enumerate() {
            if !picked.contains(&e) && best.is_none_or(|b| s > scores[b]) {
                best = Some(e);
            }
        }
        picked.extend(best);
    }
}

/// exp(x − max) / Σ exp(x − max) over `x`, into `out`.
fn softmax_into(x: &[f32], out: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for (o, &v) in out.iter_mut().zip(x) {
        *o = (v - max).exp();
        sum += *o;
    }
    for o in out.iter_mut() {
        *o /= sum;
    }
}

fn moe_route(op: &Op, inputs: &[Tensor], outputs: &[Tensor]) -> Result<()> {
    let Op::MoeRoute { top_k: k, routing } = *op else {
        return Err(wrong_op(op));
    };
    let ([logits], [ids, weights]) = (inputs, outputs) else {
        return Err(operand_count(op, inputs.len(), outputs.len()));
    };
    let experts = logits.last_dim();
    let logits = slice::<f32>(logits)?;
    let ids = slice_mut::<u32>(ids)?;
    let weights = slice_mut::<f32>(weights)?;
    let mut probs = vec![0f32; experts];
    let mut picked = Vec::with_capacity(k);
    let mut chosen = vec![0f32; k];
    for ((row, ids), weights) in logits
        .chunks_exact(experts)
        .zip(ids.chunks_exact_mut(k))
        .zip(weights.chunks_exact_mut(k))
    {
        match routing {
            Routing::TopKSoftmax => {
                top_k(row, k, &mut picked);
                for (c, &e) in chosen.iter_mut().zip(&picked) {
                    *c = row[e];
                }
                softmax_into(&chosen, weights);
            }
            Routing::SoftmaxTopK { normalize } => {
                softmax_into(row, &mut probs);
                top_k(&probs, k, &mut picked);
                for (w, &e) in weights.iter_mut().zip(&picked) {
                    *w = probs[e];
                }
                if normalize {
                    let sum: f32 = weights.iter().sum();
                    weights.iter_mut().for_each(|w| *w /= sum);
                }
            }
        }
        for (id, &e) in ids.iter_mut().zip(&picked) {
            *id = e as u32;
        }
    }
    Ok(())
}

/// out `[m·top_k, n]`: slot s times expert ids[s] of `weight` (stacked `[experts, n, ..]`),
/// x row `row_of(s)` of `x` (`[rows, k]`). See the module doc.
fn gather_into(
    layout: WeightLayout,
    x: &Tensor,
    row_of: impl Fn(usize) -> usize,
    ids: &[u32],
    weight: &[Tensor],
    out: &Tensor,
) -> Result<()> {
    let experts = weight
        .first()
        .and_then(|w| w.shape().first().copied())
        .ok_or_else(|| Error::op("gather_matmul", "no stacked expert weight"))?;
    let (k, n) = (x.last_dim(), out.last_dim());
    if let Some(bad) = ids.iter().find(|&&e| e as usize >= experts) {
        return Err(Error::op(
            "gather_matmul",
            format!("expert id {bad} of {experts} experts"),
        ));
    }
    let device = out.device();
    let x_all = slice::<f32>(x)?;
    let out_all = slice_mut::<f32>(out)?;
    let matmul = kernel_for(layout);
    let projection = Op::MatMul {
        layout,
        has_bias: false,
        pre_norm: None,
        half_x: false,
        residual_update: false,
    };
    for e in 0..experts {
        let slots: Vec<usize> = (0..ids.len()).filter(|&s| ids[s] as usize == e).collect();
        if slots.is_empty() {
            continue;
        }
        let xe = device.empty(&[slots.len(), k], DType::F32)?;
        let ye = device.empty(&[slots.len(), n], DType::F32)?;
        let rows = slice_mut::<f32>(&xe)?;
        for (dst, &s) in rows.chunks_exact_mut(k).zip(&slots) {
            let r = row_of(s);
            dst.copy_from_slice(&x_all[r * k..(r + 1) * k]);
        }
        let mut operands = vec![xe];
        for t in weight {
            operands.push(t.narrow_rows(e, 1)?.reshape(&t.shape()[1..])?);
        }
        matmul(&projection, &operands, std::slice::from_ref(&ye))?;
        for (src, &s) in slice::<f32>(&ye)?.chunks_exact(n).zip(&slots) {
            out_all[s * n..(s + 1) * n].copy_from_slice(src);
        }
    }
    Ok(())
}

/// `Op::GatherMatMul`: the gathered product, then with `combine` the weighted sum of the slots
/// added to the residual (`moe_combine`).
fn gather_matmul(op: &Op, inputs: &[Tensor], outputs: &[Tensor]) -> Result<()> {
    let Op::GatherMatMul {
        layout,
        per_slot,
        combine,
    } = *op
    else {
        return Err(wrong_op(op));
    };
    let count = layout.tensor_count() + if combine { 2 } else { 0 };
    let ([x, ids, rest @ ..], [out]) = (inputs, outputs) else {
        return Err(operand_count(op, inputs.len(), outputs.len()));
    };
    if rest.len() != count {
        return Err(operand_count(op, inputs.len(), outputs.len()));
    }
    let (weight, combined) = rest.split_at(layout.tensor_count());
    let top_k = ids.last_dim();
    let row_of = |s: usize| if per_slot { s } else { s / top_k };
    let ids = slice::<u32>(ids)?;
    match combined {
        [weights, residual] => {
            let y = out
                .device()
                .empty(&[ids.len() / top_k, top_k, out.last_dim()], DType::F32)?;
            gather_into(layout, x, row_of, ids, weight, &y)?;
            moe_combine(
                &Op::MoeCombine,
                &[y, weights.clone(), residual.clone()],
                outputs,
            )
        }
        _ => gather_into(layout, x, row_of, ids, weight, out),
    }
}

/// `Op::GatherGatedMatMul`: the routing if the op routes, then both gathered projections and
/// the gated activation, after the folded RMSNorm if there is one.
fn gather_gated_matmul(op: &Op, inputs: &[Tensor], outputs: &[Tensor]) -> Result<()> {
    let Op::GatherGatedMatMul {
        layout,
        act,
        pre_norm,
        route,
    } = *op
    else {
        return Err(wrong_op(op));
    };
    let count = layout.tensor_count();
    let ([x, ids_or_logits, rest @ ..], [out, routed @ ..]) = (inputs, outputs) else {
        return Err(operand_count(op, inputs.len(), outputs.len()));
    };
    let ids = match (route, routed) {
        (None, []) => ids_or_logits,
        (Some(Route { top_k, routing }), [ids, _]) => {
            let route_op = Op::MoeRoute { top_k, routing };
            moe_route(&route_op, std::slice::from_ref(ids_or_logits), routed)?;
            ids
        }
        _ => return Err(operand_count(op, inputs.len(), outputs.len())),
    };
    let (x, weights) = match (pre_norm, rest) {
        (None, weights) => (x.clone(), weights),
        (Some(norm), [g, weights @ ..]) => (rms_normed(norm, x, g)?, weights),
        (Some(_), []) => return Err(operand_count(op, inputs.len(), outputs.len())),
    };
    if weights.len() != 2 * count {
        return Err(operand_count(op, inputs.len(), outputs.len()));
    }
    let top_k = ids.last_dim();
    let ids = slice::<u32>(ids)?;
    let gate = out.device().empty(out.shape(), DType::F32)?;
    let up = out.device().empty(out.shape(), DType::F32)?;
    gather_into(layout, &x, |s| s / top_k, ids, &weights[..count], &gate)?;
    gather_into(layout, &x, |s| s / top_k, ids, &weights[count..], &up)?;
    elementwise::gated_activation(&Op::GatedActivation(act), &[gate, up], &outputs[..1])
}

fn moe_combine(op: &Op, inputs: &[Tensor], outputs: &[Tensor]) -> Result<()> {
    let ([y, weights, residual], [out]) = (inputs, outputs) else {
        return Err(operand_count(op, inputs.len(), outputs.len()));
    };
    let (top_k, n) = (weights.last_dim(), out.last_dim());
    let y = slice::<f32>(y)?;
    let weights = slice::<f32>(weights)?;
    let residual = slice::<f32>(residual)?;
    let out = slice_mut::<f32>(out)?;
    let rows = out.chunks_exact_mut(n).zip(residual.chunks_exact(n));
    for (i, (out, residual)) in rows.enumerate() {
        for (c, (o, r)) in out.iter_mut().zip(residual).enumerate() {
            // mlx-lm sums the weighted slots first, then adds the block to the residual.
            let sum = (0..top_k).fold(0f32, |acc, j| {
                acc + weights[i * top_k + j] * y[(i * top_k + j) * n + c]
            });
            *o = r + sum;
        }
    }
    Ok(())
}
