//! Rotary position embedding, both layouts (interleaved pairs and rotate-half), partial.

use std::cell::RefCell;

use rayon::prelude::*;

use super::{scalar_u32, slice, slice_mut, wrong_op, CpuKernel};
use crate::core::dtype::DType;
use crate::core::op::Op;
use crate::core::registry::Registry;
use crate::core::tensor::Tensor;
use crate::{Error, Result};

thread_local! {
    /// A row's (cos, sin) pairs, kept per thread so that decoding allocates nothing.
    static COS_SIN: RefCell<Vec<(f32, f32)>> = const { RefCell::new(Vec::new()) };
}

pub(super) fn register(reg: &mut Registry<CpuKernel>) {
    reg.insert("rope", "", DType::F32, rope);
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
    let rotate_row = |cos_sin: &mut Vec<(f32, f32)>, p: f32, out: &mut [f32], x: &[f32]| {
        // Same rounding as MLX: the angle is formed in f32 from the position.
        cos_sin.clear();
        cos_sin.extend(inv_freq.iter().map(|&f| {
            let (s, c) = (p * f).sin_cos();
            (c * mscale, s * mscale)
        }));
        for (o, x) in out.chunks_exact_mut(head_dim).zip(x.chunks_exact(head_dim)) {
            for (i, &(c, s)) in cos_sin.iter().enumerate() {
                let (a, b) = if traditional {
                    (2 * i, 2 * i + 1)
                } else {
                    (i, i + half)
                };
                let (x0, x1) = (x[a], x[b]);
                o[a] = x0 * c - x1 * s;
                o[b] = x0 * s + x1 * c;
            }
            o[rotary_dims..].copy_from_slice(&x[rotary_dims..]);
        }
    };
    let rotate = |(r, (out, x)): (usize, (&mut [f32], &[f32]))| {
        COS_SIN.with_borrow_mut(|cos_sin| rotate_row(cos_sin, (pos + r) as f32, out, x))
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
