//! Rotary position embedding, both layouts (interleaved pairs and rotate-half), partial.

use std::cell::RefCell;

use rayon::prelude::*;

use super::{scalar_u32, slice, slice_mut, wrong_op, CpuKernel};
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

/// Rotate the leading 2·`cos_sin.len()` dims of one head `x` into `out`, copy the rest.
fn rotate_head(cos_sin: &[(f32, f32)], traditional: bool, x: &[f32], out: &mut [f32]) {
    let half = cos_sin.len();
    for (i, &(c, s)) in cos_sin.iter().enumerate() {
        let (a, b) = if traditional {
            (2 * i, 2 * i + 1)
        } else {
            (i, i + half)
        };
        let (x0, x1) = (x[a], x[b]);
        out[a] = x0 * c - x1 * s;
        out[b] = x0 * s + x1 * c;
    }
    out[2 * half..].copy_from_slice(&x[2 * half..]);
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
    let capacity = k_cache.shape().get(1).copied().unwrap_or(0);
    let start = scalar_u32(pos)?;
    let m = k.rows();
    if start + m > capacity {
        return Err(Error::op(
            "rope_kv_append",
            format!(
                "positions {start}..{} exceed the cache capacity {capacity}",
                start + m
            ),
        ));
    }
    let (k, inv_freq) = (slice::<f32>(k)?, slice::<f32>(inv_freq)?);
    let cache = slice_mut::<f32>(k_cache)?;
    COS_SIN.with_borrow_mut(|cos_sin| {
        for (r, row) in k.chunks_exact((n_kv_heads * head_dim).max(1)).enumerate() {
            fill_cos_sin(cos_sin, inv_freq, (start + r) as u32, mscale);
            for (h, x) in row.chunks_exact(head_dim.max(1)).enumerate() {
                let at = (h * capacity + start + r) * head_dim;
                rotate_head(cos_sin, traditional, x, &mut cache[at..at + head_dim]);
            }
        }
    });
    Ok(())
}
