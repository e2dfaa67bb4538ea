//! Causal grouped-query attention over a KV cache, and the cache append.
//!
//! One task per (query row, head): scores for the visible keys go into a per-thread buffer,
//! then a two-pass softmax (max, exp-sum) in f32 and the weighted sum of values. Decode-sized
//! work stays on the calling thread.

use std::cell::RefCell;

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
    let task = |(t, (out, q)): (usize, (&mut [f32], &[f32]))| {
        let (row, head) = (t / n_heads, t % n_heads);
        let q_pos = pos + row;
        let first = window.map_or(0, |w| (q_pos + 1).saturating_sub(w));
        let kv = head / group;
        let keys = &k_cache[kv * head_stride..][first * head_dim..(q_pos + 1) * head_dim];
        let values = &v_cache[kv * head_stride..][first * head_dim..(q_pos + 1) * head_dim];
        SCORES.with_borrow_mut(|scores| {
            attend(q, keys, values, head_dim, scale, softcap, scores, out)
        });
    };
    // Decode-sized work runs on the calling thread.
    let work = m * n_heads * (pos + m) * head_dim;
    if work < PARALLEL_WORK {
        out.chunks_mut(head_dim)
            .zip(q.chunks(head_dim))
            .enumerate()
            .for_each(task);
    } else {
        out.par_chunks_mut(head_dim)
            .zip(q.par_chunks(head_dim))
            .enumerate()
            .for_each(task);
    }
    Ok(())
}

/// Score-times-head_dim products below which attention runs on one thread.
const PARALLEL_WORK: usize = 1 << 16;

thread_local! {
    /// Scores of the running task, kept per thread so that decoding allocates nothing.
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// softmax(q·keysᵀ·scale) · values into `out` (one query row, one head).
#[allow(clippy::too_many_arguments)]
fn attend(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    head_dim: usize,
    scale: f32,
    softcap: Option<f32>,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has AVX2 and FMA.
        return unsafe { attend_avx2(q, keys, values, head_dim, scale, softcap, scores, out) };
    }
    attend_with(dot, q, keys, values, head_dim, scale, softcap, scores, out)
}

/// `attend_with` compiled for AVX2, with a vector dot product.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn attend_avx2(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    head_dim: usize,
    scale: f32,
    softcap: Option<f32>,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    // SAFETY: this function runs only where the CPU has AVX2 and FMA.
    let dot = |a: &[f32], b: &[f32]| unsafe { dot_fma(a, b) };
    attend_with(dot, q, keys, values, head_dim, scale, softcap, scores, out)
}

/// Scores, then a two-pass softmax (max, exp-sum) in f32 and the weighted sum of values.
/// Plain indexed loops: iterator adapters would be compiled outside `attend_avx2`'s
/// target features.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attend_with(
    dot: impl Fn(&[f32], &[f32]) -> f32,
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    head_dim: usize,
    scale: f32,
    softcap: Option<f32>,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    let n = keys.len() / head_dim;
    scores.clear();
    scores.resize(n, 0.0);
    let mut max = f32::NEG_INFINITY;
    for (j, s) in scores.iter_mut().enumerate() {
        let mut v = dot(q, &keys[j * head_dim..(j + 1) * head_dim]) * scale;
        if let Some(cap) = softcap {
            v = cap * (v / cap).tanh();
        }
        *s = v;
        max = max.max(v);
    }
    let mut sum = 0.0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    out.fill(0.0);
    for (j, &p) in scores.iter().enumerate() {
        let v = &values[j * head_dim..(j + 1) * head_dim];
        for (o, &v) in out.iter_mut().zip(v) {
            *o += p * v;
        }
    }
    let inv_sum = 1.0 / sum;
    for o in out.iter_mut() {
        *o *= inv_sum;
    }
}

/// Σ aᵢ·bᵢ with eight independent sums.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let mut tail = 0.0;
    for (x, y) in a8.remainder().iter().zip(b8.remainder()) {
        tail += x * y;
    }
    for (x, y) in a8.zip(b8) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Σ aᵢ·bᵢ in two 8-lane FMA chains.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dot_fma(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (a, b) = (a.as_ptr(), b.as_ptr());
    let mut acc = [_mm256_setzero_ps(); 2];
    let mut i = 0;
    while i + 16 <= n {
        for (h, acc) in acc.iter_mut().enumerate() {
            let (x, y) = (
                _mm256_loadu_ps(a.add(i + 8 * h)),
                _mm256_loadu_ps(b.add(i + 8 * h)),
            );
            *acc = _mm256_fmadd_ps(x, y, *acc);
        }
        i += 16;
    }
    if i + 8 <= n {
        acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(a.add(i)), _mm256_loadu_ps(b.add(i)), acc[0]);
        i += 8;
    }
    let v = _mm256_add_ps(acc[0], acc[1]);
    let v = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    let mut sum = _mm_cvtss_f32(_mm_add_ss(v, _mm_movehdup_ps(v)));
    while i < n {
        sum += *a.add(i) * *b.add(i);
        i += 1;
    }
    sum
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
