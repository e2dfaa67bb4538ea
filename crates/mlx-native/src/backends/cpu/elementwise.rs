//! Elementwise maps (activations, soft-capping, add/mul, gated activations) and the row
//! softmax, f32.

use rayon::prelude::*;

use super::{into_half, slice, slice_mut, wrong_op, CpuKernel};
use crate::core::dtype::DType;
use crate::core::op::{BinaryFn, Op, UnaryFn};
use crate::core::registry::Registry;
use crate::core::tensor::Tensor;
use crate::{Error, Result};

pub(super) fn register(reg: &mut Registry<CpuKernel>) {
    for f in ["silu", "geluexact", "gelutanh"] {
        reg.insert("unary", f, DType::F32, unary);
        reg.insert("gated_activation", f, DType::F32, gated_activation);
        reg.insert("gated_activation", f, DType::F16, |op, inputs, outputs| {
            into_half(op, inputs, outputs, gated_activation)
        });
    }
    for f in ["add", "mul"] {
        reg.insert("binary", f, DType::F32, binary);
    }
    reg.insert("softcap", "", DType::F32, softcap);
    reg.insert("softmax", "", DType::F32, softmax);
}

/// Elements per rayon task: big enough that scheduling costs little next to the math (a
/// decode step's rows are one task, run on the calling thread).
const CHUNK: usize = 1 << 14;

fn map(x: &[f32], out: &mut [f32], f: impl Fn(f32) -> f32 + Sync) {
    let chunk = |(o, x): (&mut [f32], &[f32])| o.iter_mut().zip(x).for_each(|(o, &x)| *o = f(x));
    if out.len() <= CHUNK {
        chunk((out, x));
    } else {
        out.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .for_each(chunk);
    }
}

fn zip_map(a: &[f32], b: &[f32], out: &mut [f32], f: impl Fn(f32, f32) -> f32 + Sync) {
    let chunk = |(o, (a, b)): (&mut [f32], (&[f32], &[f32]))| {
        for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
            *o = f(a, b);
        }
    };
    if out.len() <= CHUNK {
        chunk((out, (a, b)));
    } else {
        out.par_chunks_mut(CHUNK)
            .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
            .for_each(chunk);
    }
}

/// Calls `$body` with `$f` bound to the activation function of `$which` (monomorphized,
/// so the per-element loop has no branch).
macro_rules! with_activation {
    ($which:expr, $f:ident => $body:expr) => {
        match $which {
            UnaryFn::Silu => {
                let $f = silu;
                $body
            }
            UnaryFn::GeluExact => {
                let $f = gelu_exact;
                $body
            }
            UnaryFn::GeluTanh => {
                let $f = gelu_tanh;
                $body
            }
        }
    };
}

fn unary(op: &Op, inputs: &[Tensor], outputs: &[Tensor]) -> Result<()> {
    let Op::Unary(which) = *op else {
        return Err(wrong_op(op));
    };
    let x = slice::<f32>(&inputs[0])?;
    let out = slice_mut::<f32>(&outputs[0])?;
    with_activation!(which, f => map(x, out, f));
    Ok(())
}

pub(super) fn gated_activation(op: &Op, inputs: &[Tensor], outputs: &[Tensor]) -> Result<()> {
    let Op::GatedActivation(which) = *op else {
        return Err(wrong_op(op));
    };
    let gate = slice::<f32>(&inputs[0])?;
    let up = slice::<f32>(&inputs[1])?;
    let out = slice_mut::<f32>(&outputs[0])?;
    with_activation!(which, f => zip_map(gate, up, out, |g, u| f(g) * u));
    Ok(())
}

pub(super) fn binary(op: &Op, inputs: &[Tensor], outputs: &[Tensor]) -> Result<()> {
    let Op::Binary(which) = *op else {
        return Err(wrong_op(op));
    };
    let a = slice::<f32>(&inputs[0])?;
    let b = slice::<f32>(&inputs[1])?;
    let out = slice_mut::<f32>(&outputs[0])?;
    match which {
        BinaryFn::Add => zip_map(a, b, out, |a, b| a + b),
        BinaryFn::Mul => zip_map(a, b, out, |a, b| a * b),
    }
    Ok(())
}

fn softcap(op: &Op, inputs: &[Tensor], outputs: &[Tensor]) -> Result<()> {
    let Op::Softcap { cap } = *op else {
        return Err(wrong_op(op));
    };
    if !(cap.is_finite() && cap > 0.0) {
        return Err(Error::op(
            "softcap",
            format!("cap {cap} must be positive and finite"),
        ));
    }
    let x = slice::<f32>(&inputs[0])?;
    let out = slice_mut::<f32>(&outputs[0])?;
    map(x, out, |x| cap * (x / cap).tanh());
    Ok(())
}

fn softmax(op: &Op, inputs: &[Tensor], outputs: &[Tensor]) -> Result<()> {
    if *op != Op::Softmax {
        return Err(wrong_op(op));
    }
    let x = slice::<f32>(&inputs[0])?;
    let out = slice_mut::<f32>(&outputs[0])?;
    let d = inputs[0].last_dim();
    if d == 0 {
        return Ok(());
    }
    out.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .for_each(|(o, x)| {
            let max = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let mut sum = 0.0f32;
            for (o, &x) in o.iter_mut().zip(x) {
                *o = (x - max).exp();
                sum += *o;
            }
            let inv_sum = 1.0 / sum;
            o.iter_mut().for_each(|o| *o *= inv_sum);
        });
    Ok(())
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// x·Φ(x) with Φ the normal CDF, written through erfc so that the far negative tail keeps
/// its relative precision.
fn gelu_exact(x: f32) -> f32 {
    let x = x as f64;
    (0.5 * x * erfc(-x * std::f64::consts::FRAC_1_SQRT_2)) as f32
}

/// The tanh approximation ("gelu_pytorch_tanh", MLX's `gelu_approx`).
fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)).tanh())
}

/// Complementary error function to about 1e-13 relative error, from two textbook
/// expansions: the all-positive Maclaurin series
/// erf(x) = 2/√π · e^(−x²) · Σ (2x²)ⁿ x / (1·3·…·(2n+1)) for |x| < 2, and the continued
/// fraction erfc(x) = e^(−x²)/√π · 1/(x + (1/2)/(x + 1/(x + (3/2)/(x + …)))) beyond.
fn erfc(x: f64) -> f64 {
    const FRAC_2_SQRT_PI: f64 = std::f64::consts::FRAC_2_SQRT_PI;
    if x.is_nan() {
        return x;
    }
    let a = x.abs();
    let tail = if a < 2.0 {
        // terms grow until n ≈ x² < 4, then shrink geometrically: 80 terms reach 1e-17
        let (mut term, mut sum) = (a, a);
        for n in 1..80 {
            term *= 2.0 * a * a / (2 * n + 1) as f64;
            sum += term;
            if term <= sum * 1e-17 {
                break;
            }
        }
        1.0 - FRAC_2_SQRT_PI * (-a * a).exp() * sum
    } else if a < 27.0 {
        // evaluated bottom-up; 60 levels converge to double precision for a ≥ 2
        let mut t = a;
        for n in (1..=60).rev() {
            t = a + (n as f64 / 2.0) / t;
        }
        (-a * a).exp() / (std::f64::consts::PI.sqrt() * t)
    } else {
        0.0
    };
    if x < 0.0 {
        2.0 - tail
    } else {
        tail
    }
}
