//! Causal grouped-query attention over a KV cache, and the cache append.
//!
//! One task per (query row, head): scores for the visible keys go into a per-thread buffer,
//! then a two-pass softmax (max, exp-sum) in f32 and the weighted sum of values. Decode-sized
//! work stays on the calling thread. On x86-64 with AVX2 the loops are vectorised by hand
//! (`x86`); the portable loops are the reference.

use std::cell::RefCell;

use rayon::prelude::*;

use super::norm::rms_normed;
use super::{scalar_u32, slice, slice_mut, write_half_copy, wrong_op, CacheElement, CpuKernel};
use crate::core::dtype::DType;
use crate::core::op::{operand_count, optional_last, AttentionShape, Op};
use crate::core::registry::Registry;
use crate::core::tensor::Tensor;
use crate::{Error, Result};

pub(super) fn register(reg: &mut Registry<CpuKernel>) {
    reg.insert("attention", "", DType::F32, attention);
    // Keyed by the output's dtype, which for kv_append is the cache's.
    reg.insert("kv_append", "", DType::F32, kv_append);
    reg.insert("kv_append", "", DType::F16, kv_append);
    reg.insert("rope_attention", "", DType::F32, rope_attention);
}

/// The head norms of q and k (if any) into temporaries, `rope_kv_append` into a temporary
/// rotated q, then `attention` of it.
fn rope_attention(op: &Op, inputs: &[Tensor], outputs: &[Tensor]) -> Result<()> {
    let Some((rope, attend)) = op.rope_attention_steps() else {
        return Err(wrong_op(op));
    };
    let &Op::RopeAttention {
        head_norm,
        half_out,
        ..
    } = op
    else {
        return Err(wrong_op(op));
    };
    let (outputs, out_h) = optional_last(half_out, outputs);
    let ([q, k, v, inv_freq, pos, norm_weights @ ..], [out, k_cache, v_cache]) = (inputs, outputs)
    else {
        return Err(operand_count(op, inputs.len(), outputs.len()));
    };
    let (q, k) = match (head_norm, norm_weights) {
        (None, []) => (q.clone(), k.clone()),
        (Some(norm), [q_w, k_w]) => (rms_normed(norm, q, q_w)?, rms_normed(norm, k, k_w)?),
        _ => return Err(operand_count(op, inputs.len(), outputs.len())),
    };
    let q_rot = q.device().empty(q.shape(), DType::F32)?;
    let rotated = [q_rot, k_cache.clone(), v_cache.clone()];
    let operands = [q, k, v.clone(), inv_freq.clone(), pos.clone()];
    super::rope::rope_kv_append(&rope, &operands, &rotated)?;
    let [q_rot, k_cache, v_cache] = rotated;
    attention(
        &attend,
        &[q_rot, k_cache, v_cache, pos.clone()],
        std::slice::from_ref(out),
    )?;
    write_half_copy(out, out_h)
}

/// Over f32 or f16 caches (`CacheElement`): each task reads its visible keys and values in
/// place (f32) or widened into per-thread rows (f16).
fn attention(op: &Op, inputs: &[Tensor], outputs: &[Tensor]) -> Result<()> {
    let Op::Attention(shape) = op else {
        return Err(wrong_op(op));
    };
    let [q, k_cache, v_cache, pos] = inputs else {
        return Err(operand_count(op, inputs.len(), outputs.len()));
    };
    let [out] = outputs else {
        return Err(operand_count(op, inputs.len(), outputs.len()));
    };
    match k_cache.dtype() {
        DType::F16 => attention_over::<half::f16>(shape, q, (k_cache, v_cache), pos, out),
        _ => attention_over::<f32>(shape, q, (k_cache, v_cache), pos, out),
    }
}

fn attention_over<T: CacheElement>(
    shape: &AttentionShape,
    q: &Tensor,
    (k_cache, v_cache): (&Tensor, &Tensor),
    pos: &Tensor,
    out: &Tensor,
) -> Result<()> {
    shape.check("attention")?;
    let AttentionShape {
        n_heads,
        n_kv_heads,
        head_dim,
        scale,
        window,
        softcap,
        min_keys: _, // a kernel-choice hint; one kernel here
    } = *shape;
    let capacity = k_cache.shape().get(1).copied().unwrap_or(0);
    let m = q.rows();
    let q = slice::<f32>(q)?;
    let k_cache = slice::<T>(k_cache)?;
    let v_cache = slice::<T>(v_cache)?;
    let pos = scalar_u32(pos)?;
    let out = slice_mut::<f32>(out)?;
    if pos + m > capacity {
        return Err(Error::op(
            "attention",
            format!(
                "query positions {pos}..{} exceed the cache capacity {capacity}",
                pos + m
            ),
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
            WIDENED.with_borrow_mut(|[k_rows, v_rows]| {
                let keys = T::as_f32(keys, k_rows);
                let values = T::as_f32(values, v_rows);
                attend(q, keys, values, head_dim, scale, softcap, scores, out)
            })
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
    /// The running task's keys and values widened to f32 (f16 caches only), kept likewise.
    static WIDENED: RefCell<[Vec<f32>; 2]> = const { RefCell::new([Vec::new(), Vec::new()]) };
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
        return unsafe { x86::attend(q, keys, values, head_dim, scale, softcap, scores, out) };
    }
    let n = keys.len() / head_dim;
    scores.clear();
    scores.extend((0..n).map(|j| dot(q, &keys[j * head_dim..(j + 1) * head_dim]) * scale));
    let sum = softmax_numerators(scores, softcap, |s| {
        for s in s.iter_mut() {
            *s = s.exp();
        }
    });
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

/// Soft-caps the scores, then replaces them by exp(score − max) (`exp` exponentiates in
/// place) and returns their sum.
#[inline(always)]
fn softmax_numerators(scores: &mut [f32], softcap: Option<f32>, exp: impl Fn(&mut [f32])) -> f32 {
    if let Some(cap) = softcap {
        for s in scores.iter_mut() {
            *s = cap * (*s / cap).tanh();
        }
    }
    let max = scores.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    for s in scores.iter_mut() {
        *s -= max;
    }
    exp(scores);
    scores.iter().sum()
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

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! AVX2 + FMA attention for one query row and head: scores four keys at a time
    //! (independent FMA chains), a vector exp, and the weighted sum of values accumulated
    //! in registers, 64 dimensions at a time.

    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn attend(
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
        assert!(q.len() >= head_dim && values.len() >= n * head_dim && out.len() >= head_dim);
        scores.clear();
        scores.resize(n, 0.0);
        dots(q, keys, head_dim, scores);
        for s in scores.iter_mut() {
            *s *= scale;
        }
        // SAFETY (closure): the CPU has AVX2 and FMA, as for this function.
        let sum = super::softmax_numerators(scores, softcap, |s| unsafe { exp_in_place(s) });
        weighted_sum(scores, values, head_dim, &mut out[..head_dim]);
        let inv_sum = 1.0 / sum;
        for o in out[..head_dim].iter_mut() {
            *o *= inv_sum;
        }
    }

    /// out[j] = q · key j, for the `out.len()` keys of `head_dim` at `keys`.
    #[inline(always)]
    unsafe fn dots(q: &[f32], keys: &[f32], head_dim: usize, out: &mut [f32]) {
        let (n, chunks) = (out.len(), head_dim / 8);
        let (q, k) = (q.as_ptr(), keys.as_ptr());
        let mut j = 0;
        while j + 4 <= n {
            // Two sums per key (even and odd chunks): eight independent chains.
            let mut acc = [[_mm256_setzero_ps(); 2]; 4];
            let mut c = 0;
            while c + 2 <= chunks {
                for h in 0..2 {
                    let qv = _mm256_loadu_ps(q.add(8 * (c + h)));
                    for (t, acc) in acc.iter_mut().enumerate() {
                        let kv = _mm256_loadu_ps(k.add((j + t) * head_dim + 8 * (c + h)));
                        acc[h] = _mm256_fmadd_ps(qv, kv, acc[h]);
                    }
                }
                c += 2;
            }
            if c < chunks {
                let qv = _mm256_loadu_ps(q.add(8 * c));
                for (t, acc) in acc.iter_mut().enumerate() {
                    let kv = _mm256_loadu_ps(k.add((j + t) * head_dim + 8 * c));
                    acc[0] = _mm256_fmadd_ps(qv, kv, acc[0]);
                }
            }
            for (t, acc) in acc.iter().enumerate() {
                out[j + t] = sum8(_mm256_add_ps(acc[0], acc[1]));
            }
            j += 4;
        }
        for (j, o) in out.iter_mut().enumerate().skip(j) {
            let mut acc = _mm256_setzero_ps();
            for c in 0..chunks {
                let kv = _mm256_loadu_ps(k.add(j * head_dim + 8 * c));
                acc = _mm256_fmadd_ps(_mm256_loadu_ps(q.add(8 * c)), kv, acc);
            }
            *o = sum8(acc);
        }
        // Dimensions past the last multiple of 8.
        for d in 8 * chunks..head_dim {
            for (j, o) in out.iter_mut().enumerate() {
                *o += *q.add(d) * *k.add(j * head_dim + d);
            }
        }
    }

    /// out = Σⱼ p[j]·value j: 64 output dimensions at a time, summed in eight registers.
    #[inline(always)]
    unsafe fn weighted_sum(p: &[f32], values: &[f32], head_dim: usize, out: &mut [f32]) {
        let mut d0 = 0;
        while d0 + 64 <= head_dim {
            weighted_sum_block::<8>(p, values, head_dim, d0, out);
            d0 += 64;
        }
        while d0 + 8 <= head_dim {
            weighted_sum_block::<1>(p, values, head_dim, d0, out);
            d0 += 8;
        }
        let v = values.as_ptr();
        for (d, o) in out.iter_mut().enumerate().skip(d0) {
            *o = p
                .iter()
                .enumerate()
                .map(|(j, &pj)| pj * *v.add(j * head_dim + d))
                .sum();
        }
    }

    /// Output dimensions d0..d0 + 8·W of `weighted_sum`.
    #[inline(always)]
    unsafe fn weighted_sum_block<const W: usize>(
        p: &[f32],
        values: &[f32],
        head_dim: usize,
        d0: usize,
        out: &mut [f32],
    ) {
        let v = values.as_ptr().add(d0);
        let mut acc = [_mm256_setzero_ps(); W];
        for (j, &pj) in p.iter().enumerate() {
            let (pj, row) = (_mm256_set1_ps(pj), v.add(j * head_dim));
            for (c, acc) in acc.iter_mut().enumerate() {
                *acc = _mm256_fmadd_ps(pj, _mm256_loadu_ps(row.add(8 * c)), *acc);
            }
        }
        for (c, acc) in acc.iter().enumerate() {
            _mm256_storeu_ps(out.as_mut_ptr().add(d0 + 8 * c), *acc);
        }
    }

    #[inline(always)]
    unsafe fn sum8(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// exp of every value (all ≤ 0 here), eight at a time.
    #[inline(always)]
    unsafe fn exp_in_place(s: &mut [f32]) {
        let mut chunks = s.chunks_exact_mut(8);
        for c in &mut chunks {
            _mm256_storeu_ps(c.as_mut_ptr(), exp8(_mm256_loadu_ps(c.as_ptr())));
        }
        for v in chunks.into_remainder() {
            *v = v.exp();
        }
    }

    /// e^x to about 2 ulp for x in [−87.3, 88.37] (below: the smallest normal, ≈ 0 here;
    /// above: e^88.37; NaN stays NaN): x = n·ln2 + r with |r| ≤ ln2/2 (ln2 split in two for an exact
    /// product), e^r by Cephes' expf polynomial, then scaled by 2ⁿ through the exponent
    /// bits.
    #[inline(always)]
    unsafe fn exp8(x: __m256) -> __m256 {
        // x second: max and min return their second operand where one is NaN.
        let x = _mm256_max_ps(_mm256_set1_ps(-87.336_55), x);
        let x = _mm256_min_ps(_mm256_set1_ps(88.37), x);
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
            _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::LOG2_E)),
        );
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut p = _mm256_set1_ps(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            0.166_666_65,
            0.5,
        ] {
            p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
        }
        let y = _mm256_fmadd_ps(
            _mm256_mul_ps(p, r),
            r,
            _mm256_add_ps(r, _mm256_set1_ps(1.0)),
        );
        let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(
            _mm256_cvtps_epi32(n),
            _mm256_set1_epi32(127),
        ));
        _mm256_mul_ps(y, _mm256_castsi256_ps(bits))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// Against f64 over the whole range, 1e-6 relative (a few ulp); NaN stays NaN.
        #[test]
        fn exp8_matches_f64() {
            if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")) {
                return;
            }
            let xs: Vec<f32> = (0..17_536).map(|i| -87.0 + i as f32 * 0.01).collect();
            for c in xs.chunks_exact(8) {
                let mut got = [0f32; 8];
                // SAFETY: the CPU has AVX2 and FMA (checked above).
                unsafe { _mm256_storeu_ps(got.as_mut_ptr(), exp8(_mm256_loadu_ps(c.as_ptr()))) };
                for (&x, &g) in c.iter().zip(&got) {
                    let want = (x as f64).exp();
                    assert!(
                        ((g as f64 - want) / want).abs() < 1e-6,
                        "exp({x}) = {g}, not {want}"
                    );
                }
            }
            let mut got = [0f32; 8];
            // SAFETY: as above.
            unsafe { _mm256_storeu_ps(got.as_mut_ptr(), exp8(_mm256_set1_ps(f32::NAN))) };
            assert!(got.iter().all(|v| v.is_nan()));
        }
    }
}

/// Rows of x (f32) into an f32 or f16 cache (`CacheElement::store`).
pub(super) fn kv_append(op: &Op, inputs: &[Tensor], outputs: &[Tensor]) -> Result<()> {
    let Op::KvAppend {
        n_kv_heads,
        head_dim,
    } = *op
    else {
        return Err(wrong_op(op));
    };
    let ([x, pos], [cache]) = (inputs, outputs) else {
        return Err(operand_count(op, inputs.len(), outputs.len()));
    };
    let (pos, heads) = (scalar_u32(pos)?, (n_kv_heads, head_dim));
    match cache.dtype() {
        DType::F16 => append_rows("kv_append", x, heads, pos, cache, store_head::<half::f16>),
        _ => append_rows("kv_append", x, heads, pos, cache, store_head::<f32>),
    }
}

/// One head of a row into its cache row (the `append_rows` writer of a plain append).
fn store_head<T: CacheElement>(_row: usize, src: &[f32], dst: &mut [T]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = T::store(s);
    }
}

/// Writes the rows of `x` (f32 `[m, n_kv_heads*head_dim]`) into `cache` (`T`
/// `[n_kv_heads, capacity, head_dim]`) at positions pos..pos+m, an error past the capacity:
/// `write(r, head of row r, its cache row)` for each head of each row, in order.
pub(super) fn append_rows<T: CacheElement>(
    op: &'static str,
    x: &Tensor,
    (n_kv_heads, head_dim): (usize, usize),
    pos: usize,
    cache: &Tensor,
    mut write: impl FnMut(usize, &[f32], &mut [T]),
) -> Result<()> {
    let capacity = cache.shape().get(1).copied().unwrap_or(0);
    let m = x.rows();
    if pos + m > capacity {
        return Err(Error::op(
            op,
            format!(
                "positions {pos}..{} exceed the cache capacity {capacity}",
                pos + m
            ),
        ));
    }
    let (x, cells) = (slice::<f32>(x)?, slice_mut::<T>(cache)?);
    let row_len = n_kv_heads * head_dim;
    for (r, row) in x.chunks_exact(row_len.max(1)).take(m).enumerate() {
        for (h, src) in row.chunks_exact(head_dim.max(1)).enumerate() {
            let at = (h * capacity + pos + r) * head_dim;
            let Some(dst) = cells.get_mut(at..at + head_dim) else {
                return Err(Error::op(
                    op,
                    format!("row {r} of head {h} outside the cache {:?}", cache.shape()),
                ));
            };
            write(r, src, dst);
        }
    }
    Ok(())
}
