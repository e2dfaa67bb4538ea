//! Token selection over the last row of logits: argmax, and sampling with mlx-lm's
//! processors (repetition penalty, top-p, min-p, top-k, temperature) and a counter-based
//! random draw.

use super::{scalar_u32, slice, slice_mut, wrong_op, CpuKernel};
use crate::core::dtype::DType;
use crate::core::op::{argmax_operands, Op, SamplingParams};
use crate::core::registry::Registry;
use crate::core::tensor::Tensor;
use crate::{Error, Result};

pub(super) fn register(reg: &mut Registry<CpuKernel>) {
    reg.insert("argmax", "", DType::U32, argmax_kernel);
    reg.insert("sample", "", DType::U32, sample);
    reg.insert("end_step", "", DType::U32, end_step);
}

fn end_step(op: &Op, inputs: &[Tensor], outputs: &[Tensor]) -> Result<()> {
    let (Op::EndStep, [token], [pos, ring]) = (op, inputs, outputs) else {
        return Err(wrong_op(op));
    };
    // A u32 element, widened by `scalar_u32`.
    finish_step(scalar_u32(token)? as u32, pos, ring, "end_step")
}

/// ring[(pos + 1) % r] = token, then pos += 1 (`Op::EndStep`).
fn finish_step(token: u32, pos: &Tensor, ring: &Tensor, op: &'static str) -> Result<()> {
    let pos = slice_mut::<u32>(pos)?
        .first_mut()
        .ok_or_else(|| Error::op(op, "empty position"))?;
    let ring = slice_mut::<u32>(ring)?;
    if ring.is_empty() {
        return Err(Error::op(op, "empty ring"));
    }
    let slot = (pos.wrapping_add(1) as usize) % ring.len();
    ring[slot] = token;
    *pos = pos.wrapping_add(1);
    Ok(())
}

fn last_row<'a>(logits: &'a Tensor, op: &'static str) -> Result<&'a [f32]> {
    let all = slice::<f32>(logits)?;
    let vocab = logits.last_dim();
    if vocab == 0 || all.is_empty() {
        return Err(Error::op(op, "empty logits"));
    }
    Ok(&all[all.len() - vocab..])
}

fn argmax_kernel(op: &Op, inputs: &[Tensor], outputs: &[Tensor]) -> Result<()> {
    let (logits, token, step) = argmax_operands(op, inputs, outputs)?;
    let logits = last_row(logits, "argmax")?;
    let pick = argmax(logits);
    write_token(token, pick, "argmax")?;
    match step {
        Some((pos, ring)) => finish_step(pick, pos, ring, "argmax"),
        None => Ok(()),
    }
}

/// Index of the largest value, the lowest index on ties; NaNs are never chosen (all-NaN
/// gives 0).
fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    let mut best_value = f32::NAN;
    for (i, &v) in values.iter().enumerate() {
        if v > best_value || (best_value.is_nan() && !v.is_nan()) {
            best = i;
            best_value = v;
        }
    }
    best as u32
}

fn write_token(t: &Tensor, token: u32, op: &'static str) -> Result<()> {
    let out = slice_mut::<u32>(t)?;
    let slot = out
        .first_mut()
        .ok_or_else(|| Error::op(op, "empty token output"))?;
    *slot = token;
    Ok(())
}

fn sample(op: &Op, inputs: &[Tensor], outputs: &[Tensor]) -> Result<()> {
    let Op::Sample(params) = *op else {
        return Err(wrong_op(op));
    };
    let pos = scalar_u32(&inputs[1])?;
    let history = slice_mut::<u32>(&outputs[1])?;
    if pos >= history.len() {
        return Err(Error::op(
            "sample",
            format!(
                "position {pos} outside the token history of {}",
                history.len()
            ),
        ));
    }
    let mut logits = last_row(&inputs[0], "sample")?.to_vec();
    if params.repetition_penalty != 1.0 && params.repetition_window > 0 {
        let first = (pos + 1).saturating_sub(params.repetition_window);
        penalize(
            &mut logits,
            &history[first..=pos],
            params.repetition_penalty,
        );
    }
    let best = argmax(&logits) as usize;
    let token = if params.temperature == 0.0 || !logits[best].is_finite() {
        best
    } else {
        let mut kept = candidates(&logits, best, &params);
        draw(
            &logits,
            logits[best],
            &mut kept,
            params.temperature,
            uniform(params.seed, pos),
        )
    };
    write_token(&outputs[0], token as u32, "sample")?;
    if let Some(next) = history.get_mut(pos + 1) {
        *next = token as u32;
    }
    Ok(())
}

/// mlx-lm's repetition penalty: each distinct token of the window has its logit divided
/// by the penalty when positive, multiplied when negative.
fn penalize(logits: &mut [f32], window: &[u32], penalty: f32) {
    let mut seen = window.to_vec();
    seen.sort_unstable();
    seen.dedup();
    for t in seen {
        if let Some(l) = logits.get_mut(t as usize) {
            *l = if *l < 0.0 { *l * penalty } else { *l / penalty };
        }
    }
}

/// The tokens that survive top-p, min-p and top-k. As in mlx-lm these filters see the
/// distribution before the temperature; each keeps an upper set of the ranking (highest logit
/// first, lowest id on ties), so together they keep the intersection. In no particular order
/// unless top-p applies (then in rank order).
fn candidates(logits: &[f32], best: usize, p: &SamplingParams) -> Vec<u32> {
    let max = logits[best];
    // min-p: probability ≥ min_p · max probability, i.e. logit ≥ max + ln(min_p)
    let floor = if p.min_p > 0.0 {
        max + p.min_p.ln()
    } else {
        f32::NEG_INFINITY
    };
    let mut kept: Vec<u32> = (0..logits.len() as u32)
        .filter(|&i| logits[i as usize] >= floor && logits[i as usize] > f32::NEG_INFINITY)
        .collect();
    if p.top_k > 0 && p.top_k < kept.len() {
        kept.select_nth_unstable_by(p.top_k - 1, |a, b| rank(logits, a, b));
        kept.truncate(p.top_k);
    }
    if p.top_p < 1.0 {
        // Keep a token while the mass ranked above it is below top_p of the whole mass;
        // every token above a kept one was kept by top-k and min-p too.
        let total: f64 = logits
            .iter()
            .filter(|l| **l > f32::NEG_INFINITY)
            .map(|&l| ((l - max) as f64).exp())
            .sum();
        let limit = p.top_p as f64 * total;
        let mut above = 0.0;
        let mut last = f32::NAN;
        let n = walk_ranked(logits, &mut kept, |t| {
            let l = logits[t as usize];
            if above < limit {
                above += ((l - max) as f64).exp();
                last = l;
                false
            } else {
                l != last // mlx-lm keeps every token tied with the last one kept
            }
        });
        kept.truncate(n);
    }
    kept
}

/// Rank order: the higher logit first, the lower id on ties.
fn rank(logits: &[f32], a: &u32, b: &u32) -> std::cmp::Ordering {
    logits[*b as usize]
        .total_cmp(&logits[*a as usize])
        .then(a.cmp(b))
}

/// Visits `kept` in rank order until `stop` says so; returns the index it stopped at (or
/// kept.len()), with kept[..that] in rank order. Only what the walk reaches is ranked: the
/// first n by rank (a selection, then a sort of those), n growing 4× from 64. Sorting every
/// kept token first cost a draw over 49,152 logits of a confident row 2,100–2,200 µs at T =
/// 0.7, alone or with top-p 0.9; ranked so, 490–580 and 500 µs (2 cores, 2026-11-27; most of
/// what is left is the f64 exp of every token for the totals).
fn walk_ranked(logits: &[f32], kept: &mut [u32], mut stop: impl FnMut(u32) -> bool) -> usize {
    let mut ranked = 0;
    for i in 0..kept.len() {
        if i == ranked {
            let n = (ranked * 4).max(64).min(kept.len());
            let rest = &mut kept[ranked..];
            if n < ranked + rest.len() {
                rest.select_nth_unstable_by(n - ranked - 1, |a, b| rank(logits, a, b));
            }
            kept[ranked..n].sort_unstable_by(|a, b| rank(logits, a, b));
            ranked = n;
        }
        if stop(kept[i]) {
            return i;
        }
    }
    kept.len()
}

/// Inverse-CDF draw from softmax(logit / temperature) restricted to `kept` (non-empty: it
/// holds the maximum), in rank order; the total is summed in kept's order.
fn draw(logits: &[f32], max: f32, kept: &mut [u32], temperature: f32, u: f64) -> usize {
    let inv_t = 1.0 / temperature as f64;
    let weight = |i: u32| ((logits[i as usize] - max) as f64 * inv_t).exp();
    let total: f64 = kept.iter().map(|&i| weight(i)).sum();
    let target = u * total;
    let mut acc = 0.0;
    let at = walk_ranked(logits, kept, |i| {
        acc += weight(i);
        acc > target
    });
    // Rounding past the end: the last in rank order (the walk ranked them all).
    kept.get(at).or(kept.last()).map_or(0, |&i| i as usize)
}

/// The uniform draw in [0, 1) for `seed` at position `pos`: one splitmix64 step (add γ,
/// then mix) from the state seed ⊕ pos·γ, γ = 0x9e3779b97f4a7c15 (2⁶⁴ over the golden
/// ratio); the top 53 bits of the output over 2⁵³. A pure function of its arguments, so
/// every backend and every replay draws the same number.
pub(crate) fn uniform(seed: u64, pos: usize) -> f64 {
    const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut z = (seed ^ (pos as u64).wrapping_mul(GAMMA)).wrapping_add(GAMMA);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}
