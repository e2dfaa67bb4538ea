//! Mixture-of-experts ops: routing, expert-indexed (gathered) matmuls over stacked expert
//! weights, and the weighted combine of the selected experts' outputs.

use super::matmul::check_norm_weight;
use super::{expect_dtype, expect_shape, InputNorm, Linear};
use crate::core::dtype::DType;
use crate::core::encoder::CommandEncoder;
use crate::core::op::{Op, Route, Routing, UnaryFn};
use crate::core::tensor::Tensor;
use crate::quant::WeightLayout;
use crate::{Error, Result};

/// `experts` weight matrices of `n` rows by `k` columns stacked along a leading dimension, as
/// mlx-lm's `SwitchLinear`/`QuantizedSwitchLinear` store them: dense `[experts, n, k]`, or MLX
/// affine words `[experts, n, k·bits/32]` with scales and biases `[experts, n, k/group]`; or as
/// llama.cpp's `ffn_*_exps` tensors: ggml blocks, `[experts, n·row_bytes]` bytes.
#[derive(Clone, Debug)]
pub struct ExpertLinear {
    pub layout: WeightLayout,
    /// Dense: `[w]`; MLX affine: `[w (u32), scales, biases]`; GGUF: `[blocks (u8)]`.
    pub tensors: Vec<Tensor>,
    pub experts: usize,
    pub n: usize,
    pub k: usize,
}

impl ExpertLinear {
    /// Checks the stacked tensors against the layout (each expert as `Linear::new` would).
    pub fn new(
        name: &str,
        layout: WeightLayout,
        tensors: Vec<Tensor>,
        experts: usize,
        n: usize,
        k: usize,
    ) -> Result<ExpertLinear> {
        if experts == 0 {
            return Err(Error::op("expert_linear", format!("`{name}`: no experts")));
        }
        for t in &tensors {
            if t.shape().first() != Some(&experts) {
                return Err(Error::TensorShape {
                    name: name.to_string(),
                    expected: vec![experts, n],
                    found: t.shape().to_vec(),
                });
            }
        }
        let w = ExpertLinear {
            layout,
            tensors,
            experts,
            n,
            k,
        };
        // The first expert carries every per-matrix check; the others share its shapes.
        w.expert(0).map_err(|e| match e {
            Error::TensorShape {
                expected, found, ..
            } => Error::TensorShape {
                name: name.to_string(),
                expected: [&[experts][..], &expected].concat(),
                found: [&[experts][..], &found].concat(),
            },
            other => other,
        })?;
        Ok(w)
    }

    /// Expert `e` as a `Linear` viewing the same memory.
    pub fn expert(&self, e: usize) -> Result<Linear> {
        let tensors = self
            .tensors
            .iter()
            .map(|t| t.narrow_rows(e, 1)?.reshape(&t.shape()[1..]))
            .collect::<Result<_>>()?;
        Linear::new(
            &format!("expert {e}"),
            self.layout,
            tensors,
            None,
            self.n,
            self.k,
        )
    }

    /// Bytes one expert's matrix occupies (what a token routed to it reads).
    pub fn expert_bytes(&self) -> usize {
        self.tensors.iter().map(Tensor::byte_len).sum::<usize>() / self.experts
    }
}

/// ids u32 `[m, top_k]` and weights f32 `[m, top_k]` of each row of router `logits`
/// `[m, experts]`, by `routing`.
pub fn moe_route(
    enc: &mut CommandEncoder,
    logits: &Tensor,
    top_k: usize,
    routing: Routing,
    ids: &Tensor,
    weights: &Tensor,
) -> Result<()> {
    check_route(logits, Route { top_k, routing }, ids, weights)?;
    enc.dispatch(Op::MoeRoute { top_k, routing }, &[logits], &[ids, weights])
}

/// The operands of routing `logits` `[m, experts]` into `ids` and `weights` `[m, top_k]`.
fn check_route(logits: &Tensor, route: Route, ids: &Tensor, weights: &Tensor) -> Result<()> {
    expect_dtype("moe_route", "logits", logits, &[DType::F32])?;
    expect_dtype("moe_route", "ids", ids, &[DType::U32])?;
    expect_dtype("moe_route", "weights", weights, &[DType::F32])?;
    let top_k = route.top_k;
    if top_k == 0 || top_k > logits.last_dim() {
        return Err(Error::op(
            "moe_route",
            format!("top {top_k} of {} experts", logits.last_dim()),
        ));
    }
    let m = logits.rows();
    expect_shape("moe_route", "ids", ids, &[m, top_k])?;
    expect_shape("moe_route", "weights", weights, &[m, top_k])
}

/// (m, top_k) of an ids tensor `[m, top_k]` of u32.
fn slots(op: &'static str, ids: &Tensor) -> Result<(usize, usize)> {
    expect_dtype(op, "ids", ids, &[DType::U32])?;
    match *ids.shape() {
        [m, top_k] if top_k > 0 => Ok((m, top_k)),
        _ => Err(Error::op(
            op,
            format!("ids: expected [m, top_k], found {:?}", ids.shape()),
        )),
    }
}

/// out `[m, top_k, n]`: row i's slot j times expert ids[i, j]. x is `[m, k]` (each row shared
/// by its slots) or `[m, top_k, k]` (one row per slot, e.g. the down projection's input).
pub fn gather_matmul(
    enc: &mut CommandEncoder,
    x: &Tensor,
    ids: &Tensor,
    w: &ExpertLinear,
    out: &Tensor,
) -> Result<()> {
    let (m, top_k) = slots("gather_matmul", ids)?;
    expect_shape("gather_matmul", "out", out, &[m, top_k, w.n])?;
    let (inputs, per_slot) = gather_inputs(x, ids, w, (m, top_k))?;
    let op = Op::GatherMatMul {
        layout: w.layout,
        per_slot,
        combine: false,
    };
    enc.dispatch(op, &inputs, &[out])
}

/// `gather_matmul` then `moe_combine` in one dispatch: out `[m, n]` = residual + Σ_j
/// weights[:, j]·(x_j·W_eᵀ), the MoE block's down projection and output (one token's decode
/// sums the slots inside the product's kernel on CUDA, with no launch of its own).
pub fn gather_matmul_combine(
    enc: &mut CommandEncoder,
    x: &Tensor,
    ids: &Tensor,
    w: &ExpertLinear,
    (weights, residual): (&Tensor, &Tensor),
    out: &Tensor,
) -> Result<()> {
    let (m, top_k) = slots("gather_matmul", ids)?;
    check_combine(weights, residual, (m, top_k, w.n), out)?;
    let (mut inputs, per_slot) = gather_inputs(x, ids, w, (m, top_k))?;
    inputs.extend([weights, residual]);
    let op = Op::GatherMatMul {
        layout: w.layout,
        per_slot,
        combine: true,
    };
    enc.dispatch(op, &inputs, &[out])
}

/// The inputs of `Op::GatherMatMul` (x, ids, the weight's tensors) and whether x holds a row per
/// slot, after checking x's shape.
fn gather_inputs<'a>(
    x: &'a Tensor,
    ids: &'a Tensor,
    w: &'a ExpertLinear,
    (m, top_k): (usize, usize),
) -> Result<(Vec<&'a Tensor>, bool)> {
    expect_dtype("gather_matmul", "x", x, &[DType::F32])?;
    let per_slot = match x.shape() {
        [rows, k] if (*rows, *k) == (m, w.k) => false,
        [rows, slots, k] if (*rows, *slots, *k) == (m, top_k, w.k) => true,
        other => {
            return Err(Error::op(
                "gather_matmul",
                format!(
                    "x: expected [{m}, {k}] or [{m}, {top_k}, {k}], found {other:?}",
                    k = w.k
                ),
            ))
        }
    };
    let mut inputs: Vec<&Tensor> = vec![x, ids];
    inputs.extend(w.tensors.iter());
    Ok((inputs, per_slot))
}

/// out `[m, top_k, n]` = f(x·G_eᵀ) ∘ (x·U_eᵀ) for each row of x `[m, k]` and each of its
/// selected experts e: SwitchGLU's gate and up projections and activation in one dispatch,
/// x first through `norm` if given (the MoE block's input norm, at any row count). Both
/// weights must be stored alike.
#[allow(clippy::too_many_arguments)]
pub fn gather_gated_matmul(
    enc: &mut CommandEncoder,
    x: &Tensor,
    norm: Option<InputNorm>,
    ids: &Tensor,
    gate: &ExpertLinear,
    up: &ExpertLinear,
    f: UnaryFn,
    out: &Tensor,
) -> Result<()> {
    let (m, top_k) = slots("gather_gated_matmul", ids)?;
    let inputs = gated_inputs(x, norm, ids, (gate, up), (m, top_k), out)?;
    let op = Op::GatherGatedMatMul {
        layout: gate.layout,
        act: f,
        pre_norm: norm.map(|(_, p)| p),
        route: None,
    };
    enc.dispatch(op, &inputs, &[out])
}

/// `moe_route` of the router `logits` into `ids` and `weights`, then `gather_gated_matmul`
/// with those ids, in one dispatch: one token's decode runs both in one kernel on CUDA (the
/// routing in every block of the product, before it reads an expert).
#[allow(clippy::too_many_arguments)]
pub fn routed_gated_matmul(
    enc: &mut CommandEncoder,
    x: &Tensor,
    norm: Option<InputNorm>,
    (logits, route): (&Tensor, Route),
    (ids, weights): (&Tensor, &Tensor),
    (gate, up): (&ExpertLinear, &ExpertLinear),
    f: UnaryFn,
    out: &Tensor,
) -> Result<()> {
    check_route(logits, route, ids, weights)?;
    if logits.last_dim() != gate.experts {
        return Err(Error::op(
            "routed_gated_matmul",
            format!(
                "{} router logits for {} experts",
                logits.last_dim(),
                gate.experts
            ),
        ));
    }
    let m = logits.rows();
    let inputs = gated_inputs(x, norm, logits, (gate, up), (m, route.top_k), out)?;
    let op = Op::GatherGatedMatMul {
        layout: gate.layout,
        act: f,
        pre_norm: norm.map(|(_, p)| p),
        route: Some(route),
    };
    enc.dispatch(op, &inputs, &[out, ids, weights])
}

/// The inputs of `Op::GatherGatedMatMul` (x, `ids`, the norm weight, gate and up tensors)
/// after checking that gate and up are stored alike and the shapes of x and out.
fn gated_inputs<'a>(
    x: &'a Tensor,
    norm: Option<InputNorm<'a>>,
    ids: &'a Tensor,
    (gate, up): (&'a ExpertLinear, &'a ExpertLinear),
    (m, top_k): (usize, usize),
    out: &Tensor,
) -> Result<Vec<&'a Tensor>> {
    expect_dtype("gather_gated_matmul", "x", x, &[DType::F32])?;
    let alike = gate.layout == up.layout
        && (gate.experts, gate.n, gate.k) == (up.experts, up.n, up.k)
        && gate
            .tensors
            .iter()
            .zip(&up.tensors)
            .all(|(g, u)| g.dtype() == u.dtype());
    if !alike {
        return Err(Error::op(
            "gather_gated_matmul",
            format!(
                "gate {} [{}, {}, {}] and up {} [{}, {}, {}] are stored differently",
                gate.layout.variant(),
                gate.experts,
                gate.n,
                gate.k,
                up.layout.variant(),
                up.experts,
                up.n,
                up.k
            ),
        ));
    }
    expect_shape("gather_gated_matmul", "x", x, &[m, gate.k])?;
    expect_shape("gather_gated_matmul", "out", out, &[m, top_k, gate.n])?;
    let mut inputs: Vec<&Tensor> = vec![x, ids];
    if let Some(norm) = norm {
        check_norm_weight("gather_gated_matmul", "norm weight", x, norm.0)?;
        inputs.push(norm.0);
    }
    inputs.extend(gate.tensors.iter());
    inputs.extend(up.tensors.iter());
    Ok(inputs)
}

/// out `[m, n]` = residual + Σ_j weights[:, j]·y[:, j] for y `[m, top_k, n]`.
pub fn moe_combine(
    enc: &mut CommandEncoder,
    y: &Tensor,
    weights: &Tensor,
    residual: &Tensor,
    out: &Tensor,
) -> Result<()> {
    expect_dtype("moe_combine", "y", y, &[DType::F32])?;
    let [m, top_k, n] = *y.shape() else {
        return Err(Error::op(
            "moe_combine",
            format!("y: expected [m, top_k, n], found {:?}", y.shape()),
        ));
    };
    check_combine(weights, residual, (m, top_k, n), out)?;
    enc.dispatch(Op::MoeCombine, &[y, weights, residual], &[out])
}

/// The operands of the weighted sum of `[m, top_k, n]` slots added to the residual.
fn check_combine(
    weights: &Tensor,
    residual: &Tensor,
    (m, top_k, n): (usize, usize, usize),
    out: &Tensor,
) -> Result<()> {
    expect_dtype("moe_combine", "weights", weights, &[DType::F32])?;
    expect_dtype("moe_combine", "residual", residual, &[DType::F32])?;
    expect_shape("moe_combine", "weights", weights, &[m, top_k])?;
    expect_shape("moe_combine", "residual", residual, &[m, n])?;
    expect_shape("moe_combine", "out", out, &[m, n])
}
