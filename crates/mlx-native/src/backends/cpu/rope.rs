//! Rotary position embedding, both layouts (interleaved pairs and rotate-half), partial.

use std::cell::RefCell;

use rayon::prelude::*;

use super::attention::append_rows;
use super::{scalar_u32, slice, slice_mut, wrong_op, CacheElement, CpuKernel};
use crate::core::dtype::DType;
use crate::core::op::{operand_count, Op};
use crate::core::registry::Registry;
use crate::core::tensor::Tensor;
use crate::{Error, Result};

thread_local! {
    /// A row's (cos, sin) pairs, kept per thread so that decoding allocates nothing.
    static COS_SIN: RefCell<Vec<(f32, f32)>> = const { RefCell::new(Vec::new()) };
}

pub(super) fn register(reg: &mut Registry<CpuKernel>) {
    reg.insert("rope", "", DType::F32, rope);
    reg.insert("rope_kv_append", "", DType::F32, rope_kv_append);
}

/// The (cos, sin)·mscale of each rotated pair at position `p`. Same rounding as MLX: the
/// angle is formed in f32 from the position.
fn fill_cos_sin(cos_sin: &mut Vec<(f32, f32)>, inv_freq: &[f32], p: u32, mscale: f32) {
    cos_sin.clear();
    cos_sin.extend(inv_freq.iter().map(|&f| {
        let (s, c) = (p as f32 * f).sin_cos();
        (c * mscale, s * mscale)
    }));
}

/// Rotate the leading 2·`cos_sin.len()` dims of one head `x` into `out`, copy the rest
/// (`out` f32, or an f16 cache row: each value rounded once, as stored).
fn rotate_head<T: CacheElement>(
    cos_sin: &[(f32, f32)],
    traditional: bool,
    x: &[f32],
    out: &mut [T],
) {
    let half = cos_sin.len();
    for (i, &(c, s)) in cos_sin.iter().enumerate() {
        let (a, b) = if traditional {
            (2 * i, 2 * i + 1)
        } else {
            (i, i + half)
        };
        let (x0, x1) = (x[a], x[b]);
        out[a] = T::store(x0 * c - x1 * s);
        out[b] = T::store(x0 * s + x1 * c);
    }
    for (o, &x) in out[2 * half..].iter_mut().zip(&x[2 * half..]) {
        *o = T::store(x);
    }
}

fn rope(op: &Op, inputs: &[Tensor], outputs: &[Tensor]) -> Result<()> {
    let Op::Rope {
        n_heads,
        head_dim,
        rotary_dims,
        traditional,
        mscale,
    } = *op
    else {
        return Err(wrong_op(op));
    };
    let x = slice::<f32>(&inputs[0])?;
    let inv_freq = slice::<f32>(&inputs[1])?;
    let pos = scalar_u32(&inputs[2])?;
    let out = slice_mut::<f32>(&outputs[0])?;
    let half = rotary_dims / 2;
    if inv_freq.len() != half || rotary_dims > head_dim {
        return Err(Error::op(
            "rope",
            format!(
                "{} inverse frequencies for {rotary_dims} rotary dims of a {head_dim}-dim head",
                inv_freq.len()
            ),
        ));
    }
    let row_len = n_heads * head_dim;
    if row_len == 0 {
        return Ok(());
    }
    let rotate_row = |cos_sin: &mut Vec<(f32, f32)>, p: u32, out: &mut [f32], x: &[f32]| {
        fill_cos_sin(cos_sin, inv_freq, p, mscale);
        for (o, x) in out.chunks_exact_mut(head_dim).zip(x.chunks_exact(head_dim)) {
            rotate_head(cos_sin, traditional, x, o);
        }
    };
    let rotate = |(r, (out, x)): (usize, (&mut [f32], &[f32]))| {
        COS_SIN.with_borrow_mut(|cos_sin| rotate_row(cos_sin, (pos + r) as u32, out, x))
    };
    if out.len() == row_len {
        // One row (a decode step) on the calling thread.
        rotate((0, (out, x)));
    } else {
        out.par_chunks_mut(row_len)
            .zip(x.par_chunks(row_len))
            .enumerate()
            .for_each(rotate);
    }
    Ok(())
}

/// `rope` of q, then k rotated straight into its cache rows and v appended (`kv_append`).
pub(super) fn rope_kv_append(op: &Op, inputs: &[Tensor], outputs: &[Tensor]) -> Result<()> {
    let Op::RopeKvAppend {
        n_heads,
        n_kv_heads,
        head_dim,
        rotary_dims,
        traditional,
        mscale,
    } = *op
    else {
        return Err(wrong_op(op));
    };
    let ([q, k, v, inv_freq, pos], [q_out, k_cache, v_cache]) = (inputs, outputs) else {
        return Err(operand_count(op, inputs.len(), outputs.len()));
    };
    let rope_op = Op::Rope {
        n_heads,
        head_dim,
        rotary_dims,
        traditional,
        mscale,
    };
    rope(
        &rope_op,
        &[q.clone(), inv_freq.clone(), pos.clone()],
        std::slice::from_ref(q_out),
    )?;
    let append = Op::KvAppend {
        n_kv_heads,
        head_dim,
    };
    super::attention::kv_append(
        &append,
        &[v.clone(), pos.clone()],
        std::slice::from_ref(v_cache),
    )?;
    let (start, inv_freq) = (scalar_u32(pos)?, slice::<f32>(inv_freq)?);
    let rope = (inv_freq, traditional, mscale);
    let heads = (n_kv_heads, head_dim);
    match k_cache.dtype() {
        DType::F16 => rope_append::<half::f16>(k, rope, heads, start, k_cache),
        _ => rope_append::<f32>(k, rope, heads, start, k_cache),
    }
}

/// The rows of k rotated (by `inv_freq`, the layout, mscale) into an f32 or f16 cache at
/// positions start..start+m (`append_rows`).
fn rope_append<T: CacheElement>(
    k: &Tensor,
    (inv_freq, traditional, mscale): (&[f32], bool, f32),
    heads: (usize, usize),
    start: usize,
    cache: &Tensor,
) -> Result<()> {
    COS_SIN.with_borrow_mut(|cos_sin| {
        let mut filled_for = None;
        append_rows::<T>("rope_kv_append", k, heads, start, cache, |r, x, out| {
            if filled_for != Some(r) {
                fill_cos_sin(cos_sin, inv_freq, (start + r) as u32, mscale);
                filled_for = Some(r);
            }
            rotate_head(cos_sin, traditional, x, out);
        })
    })
}
