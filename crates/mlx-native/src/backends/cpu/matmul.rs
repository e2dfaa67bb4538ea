//! `Op::MatMul` on the CPU: y = x · Wᵀ (+ bias) for every weight layout. Dense weights are
//! handled here; MLX affine and GGUF weights go to their own modules. All layouts share one
//! way of splitting the work: threads own blocks of output columns (weight rows), so each
//! weight row is read once per call and used for every row of x.

use rayon::prelude::*;
use std::borrow::Cow;

use super::{
    elementwise, norm, qmatmul_gguf, qmatmul_mlx, slice, slice_mut, widened, write_half_copy,
    wrong_op, CpuKernel, FloatSlice,
};
use crate::core::dtype::DType;
use crate::core::op::{optional_last, Op, PreNorm};
use crate::core::registry::Registry;
use crate::core::tensor::Tensor;
use crate::quant::WeightLayout;
use crate::{Error, Result};

pub(super) fn register(reg: &mut Registry<CpuKernel>) {
    for layout in WeightLayout::all() {
        reg.insert("matmul", &layout.variant(), DType::F32, matmul);
        reg.insert("gated_matmul", &layout.variant(), DType::F32, gated_matmul);
    }
}

/// `Op::MatMul`: the layout's kernel, after the residual update and the folded RMSNorm if
/// there are any. x's f16 copy (`half_x`) is not read: x holds the same values unrounded. f16 x
/// (f16 activations) is widened to f32 first.
fn matmul(op: &Op, inputs: &[Tensor], outputs: &[Tensor]) -> Result<()> {
    let Op::MatMul {
        layout,
        has_bias,
        pre_norm,
        half_x,
        residual_update,
    } = *op
    else {
        return Err(wrong_op(op));
    };
    let plain = Op::MatMul {
        layout,
        has_bias,
        pre_norm: None,
        half_x: false,
        residual_update: false,
    };
    let (inputs, _x_h) = optional_last(half_x, inputs);
    let inputs = match inputs.split_first() {
        Some((x, rest)) if x.dtype() != DType::F32 => Cow::Owned(
            std::iter::once(widened(x)?)
                .chain(rest.iter().cloned())
                .collect(),
        ),
        _ => Cow::Borrowed(inputs),
    };
    let (inputs, outputs) = updated_input(residual_update, pre_norm, &inputs, outputs)?;
    match pre_norm {
        None => kernel_for(layout)(&plain, &inputs, outputs),
        Some(norm) => kernel_for(layout)(&plain, &normed_input(norm, &inputs)?, outputs),
    }
}

/// With a residual update (`MatMul::residual_update`): x + RMSNorm(y)·w written to the second
/// output, which then replaces x, y and w in the operands, the first output left as the only
/// one. Without one, the operands as they are (borrowed: no copy on the decode path).
fn updated_input<'a>(
    update: bool,
    norm: Option<PreNorm>,
    inputs: &'a [Tensor],
    outputs: &'a [Tensor],
) -> Result<(Cow<'a, [Tensor]>, &'a [Tensor])> {
    if !update {
        return Ok((Cow::Borrowed(inputs), outputs));
    }
    let (Some(norm), [x, y, weight, rest @ ..], [out, updated]) = (norm, inputs, outputs) else {
        return Err(Error::op(
            "matmul",
            "a residual update without its operands or input norm",
        ));
    };
    norm::rms_norm(
        &norm.op(),
        &[y.clone(), weight.clone(), x.clone()],
        std::slice::from_ref(updated),
    )?;
    let inputs: Vec<Tensor> = std::iter::once(updated).chain(rest).cloned().collect();
    Ok((Cow::Owned(inputs), std::slice::from_ref(out)))
}

/// The operands with x and the norm weight (the first two) replaced by RMSNorm(x).
fn normed_input(norm: PreNorm, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
    let [x, weight, rest @ ..] = inputs else {
        return Err(Error::op(
            "matmul",
            "a folded norm without x and norm weight",
        ));
    };
    Ok(std::iter::once(norm::rms_normed(norm, x, weight)?)
        .chain(rest.iter().cloned())
        .collect())
}

/// `Op::GatedMatMul`: both projections with the matmul kernels, then the gated activation.
fn gated_matmul(op: &Op, inputs: &[Tensor], outputs: &[Tensor]) -> Result<()> {
    let Op::GatedMatMul {
        layout,
        act,
        pre_norm,
        half_out,
        residual_update,
    } = *op
    else {
        return Err(wrong_op(op));
    };
    let (outputs, out_h) = optional_last(half_out, outputs);
    let (inputs, outputs) = updated_input(residual_update, pre_norm, inputs, outputs)?;
    let inputs = match pre_norm {
        Some(norm) => Cow::Owned(normed_input(norm, &inputs)?),
        None => inputs,
    };
    let count = layout.tensor_count();
    let (Some(x), [out], true) = (inputs.first(), outputs, inputs.len() == 1 + 2 * count) else {
        return Err(Error::op(
            "gated_matmul",
            format!("{} inputs, {} outputs", inputs.len(), outputs.len()),
        ));
    };
    let matmul = kernel_for(layout);
    let projection = Op::MatMul {
        layout,
        has_bias: false,
        pre_norm: None,
        half_x: false,
        residual_update: false,
    };
    let gate = out.device().empty(out.shape(), DType::F32)?;
    let up = out.device().empty(out.shape(), DType::F32)?;
    for (weight, result) in [(&inputs[1..1 + count], &gate), (&inputs[1 + count..], &up)] {
        let operands: Vec<Tensor> = std::iter::once(x).chain(weight).cloned().collect();
        matmul(&projection, &operands, std::slice::from_ref(result))?;
    }
    elementwise::gated_activation(&Op::GatedActivation(act), &[gate, up], outputs)?;
    write_half_copy(out, out_h)
}

/// The `Op::MatMul` kernel of a weight layout.
pub(super) fn kernel_for(layout: WeightLayout) -> CpuKernel {
    match layout {
        WeightLayout::Dense => matmul_dense,
        WeightLayout::MlxAffine { .. } => matmul_mlx,
        WeightLayout::Gguf(_) => matmul_gguf,
    }
}

/// The operands of one `Op::MatMul`: x `[m, k]`, the weight's tensors, the optional bias and
/// the output `[m, n]`.
struct Operands<'a> {
    layout: WeightLayout,
    x: &'a [f32],
    weight: &'a [Tensor],
    bias: Option<&'a Tensor>,
    out: &'a mut [f32],
    n: usize,
    k: usize,
}

impl<'a> Operands<'a> {
    fn of(op: &Op, inputs: &'a [Tensor], outputs: &'a [Tensor]) -> Result<Self> {
        let Op::MatMul {
            layout,
            has_bias,
            pre_norm: None,
            half_x: false,
            residual_update: false,
        } = *op
        else {
            return Err(wrong_op(op));
        };
        let count = 1 + layout.tensor_count() + usize::from(has_bias);
        let (Some(x), Some(out), true) = (inputs.first(), outputs.first(), inputs.len() == count)
        else {
            return Err(Error::op(
                "matmul",
                format!(
                    "{} inputs, {} outputs for {}",
                    inputs.len(),
                    outputs.len(),
                    op.variant()
                ),
            ));
        };
        let (n, k) = (out.last_dim(), x.last_dim());
        if out.rows() != x.rows() {
            return Err(Error::op(
                "matmul",
                format!("x {:?} and out {:?} differ in rows", x.shape(), out.shape()),
            ));
        }
        Ok(Operands {
            layout,
            x: slice::<f32>(x)?,
            weight: &inputs[1..1 + layout.tensor_count()],
            bias: if has_bias { inputs.last() } else { None },
            out: slice_mut::<f32>(out)?,
            n,
            k,
        })
    }

    fn add_bias(self) -> Result<()> {
        let Some(bias) = self.bias else {
            return Ok(());
        };
        let bias = FloatSlice::of(bias)?;
        let mut b = vec![0f32; self.n];
        bias.convert(0, &mut b)?;
        for row in self.out.chunks_exact_mut(self.n) {
            for (o, b) in row.iter_mut().zip(&b) {
                *o += b;
            }
        }
        Ok(())
    }
}

fn matmul_dense(op: &Op, inputs: &[Tensor], outputs: &[Tensor]) -> Result<()> {
    let o = Operands::of(op, inputs, outputs)?;
    let w = FloatSlice::of(&o.weight[0])?;
    let (n, k) = (o.n, o.k);
    if w.len() != n * k {
        return Err(Error::op(
            "matmul",
            format!("dense weight of {} elements for [{n}, {k}]", w.len()),
        ));
    }
    let x = o.x;
    par_column_blocks(o.out, n, k, |col0, out_rows| {
        let mut scratch = vec![0f32; k];
        for c in 0..out_rows.first().map_or(0, |r| r.len()) {
            let w_row = w.f32_range((col0 + c) * k, &mut scratch)?;
            for (out_row, x_row) in out_rows.iter_mut().zip(x.chunks_exact(k)) {
                out_row[c] = dot(w_row, x_row);
            }
        }
        Ok(())
    })?;
    o.add_bias()
}

fn matmul_mlx(op: &Op, inputs: &[Tensor], outputs: &[Tensor]) -> Result<()> {
    let o = Operands::of(op, inputs, outputs)?;
    let WeightLayout::MlxAffine { bits, group_size } = o.layout else {
        return Err(wrong_op(op));
    };
    let [packed, scales, biases] = o.weight else {
        return Err(wrong_op(op));
    };
    let w = qmatmul_mlx::MlxAffine {
        packed: slice::<u32>(packed)?,
        scales: FloatSlice::of(scales)?,
        biases: FloatSlice::of(biases)?,
        bits,
        group_size,
        n: o.n,
        k: o.k,
    };
    qmatmul_mlx::matmul(o.x, &w, o.out)?;
    o.add_bias()
}

fn matmul_gguf(op: &Op, inputs: &[Tensor], outputs: &[Tensor]) -> Result<()> {
    let o = Operands::of(op, inputs, outputs)?;
    let WeightLayout::Gguf(t) = o.layout else {
        return Err(wrong_op(op));
    };
    let w = slice::<u8>(&o.weight[0])?;
    qmatmul_gguf::matmul_gguf(t, o.x, w, o.n, o.k, o.out)?;
    o.add_bias()
}

/// Multiply-adds below which a product runs as one task: handing work to another thread
/// costs more than it saves.
const MIN_PARALLEL_WORK: usize = 1 << 16;

/// Output columns per task: all of them for a small product; else a few tasks per thread
/// for balance, at most 256 weight rows so that a block of quantized rows stays in cache
/// while every row of x passes over it.
pub(super) fn column_block(n: usize, m: usize, k: usize) -> usize {
    if n.saturating_mul(m).saturating_mul(k) < MIN_PARALLEL_WORK {
        return n.max(1);
    }
    let per_task = n.div_ceil(4 * rayon::current_num_threads());
    per_task.next_multiple_of(8).clamp(8, 256)
}

/// Runs `f(first column, rows)` over blocks of output columns of `out` (`[m, n]`, each
/// column a dot product of length `k`), in parallel when the product is large enough
/// (`column_block`); `rows` holds, for every row of `out`, that row's slice of the block's
/// columns.
pub(super) fn par_column_blocks<F>(out: &mut [f32], n: usize, k: usize, f: F) -> Result<()>
where
    F: Fn(usize, &mut [&mut [f32]]) -> Result<()> + Sync,
{
    if n == 0 || out.is_empty() {
        return Ok(());
    }
    let m = out.len() / n;
    let block = column_block(n, m, k);
    if m == 1 {
        // Decode: the row's chunks are the tasks, without allocating.
        if block >= n {
            return f(0, &mut [out]);
        }
        return out
            .par_chunks_mut(block)
            .enumerate()
            .try_for_each(|(b, cols)| f(b * block, &mut [cols]));
    }
    let mut tasks: Vec<Vec<&mut [f32]>> = (0..n.div_ceil(block))
        .map(|_| Vec::with_capacity(m))
        .collect();
    for row in out.chunks_exact_mut(n) {
        for (task, cols) in tasks.iter_mut().zip(row.chunks_mut(block)) {
            task.push(cols);
        }
    }
    tasks
        .into_par_iter()
        .enumerate()
        .try_for_each(|(b, mut rows)| f(b * block, &mut rows))
}

/// Σ aᵢ·bᵢ over the shorter of the two, in f32.
pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2.
        return unsafe { dot_avx2(a, b) };
    }
    dot_lanes(a, b)
}

/// `dot_lanes` compiled for AVX2 (its 16 partial sums fill two 8-lane registers).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_lanes(a, b)
}

/// 16 independent partial sums, which the compiler keeps in vector registers.
#[inline(always)]
fn dot_lanes(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 16;
    let len = a.len().min(b.len());
    let (a, b) = (&a[..len], &b[..len]);
    let mut acc = [0f32; LANES];
    let (a_main, b_main) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let (a_tail, b_tail) = (a_main.remainder(), b_main.remainder());
    for (a, b) in a_main.zip(b_main) {
        for l in 0..LANES {
            acc[l] += a[l] * b[l];
        }
    }
    let tail: f32 = a_tail.iter().zip(b_tail).map(|(a, b)| a * b).sum();
    acc.iter().sum::<f32>() + tail
}
