//! The recorded form of one kernel dispatch's meaning: an `Op` says what to compute; the
//! tensors it reads and writes travel beside it in a `Dispatch`. Parameters that stay fixed
//! for a recording (sizes, eps, layouts) live here; values that change per token (position,
//! token id) live in device buffers the kernels read, so a captured graph stays valid.

use crate::core::tensor::Tensor;
use crate::quant::WeightLayout;
use crate::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UnaryFn {
    Silu,
    /// erf-based GELU.
    GeluExact,
    /// tanh-approximated GELU ("gelu_pytorch_tanh").
    GeluTanh,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BinaryFn {
    Add,
    Mul,
}

/// How a mixture-of-experts router turns one row of logits into `top_k` expert weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Routing {
    /// The top k logits, then a softmax over those k (Mixtral).
    TopKSoftmax,
    /// A softmax over all experts, then the top k probabilities, divided by their sum when
    /// `normalize` (Qwen3-MoE's `norm_topk_prob`).
    SoftmaxTopK { normalize: bool },
}

/// Routing that an op runs in front of its product (`Op::GatherGatedMatMul::route`): the top
/// `top_k` experts of each row of router logits, weighted as `routing` says (`Op::MoeRoute`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Route {
    pub top_k: usize,
    pub routing: Routing,
}

/// Sampling settings. `temperature == 0` is greedy (argmax).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    /// 1.0 disables top-p.
    pub top_p: f32,
    /// 0.0 disables min-p.
    pub min_p: f32,
    /// 1.0 disables the repetition penalty.
    pub repetition_penalty: f32,
    /// How many of the latest tokens the repetition penalty looks at.
    pub repetition_window: usize,
    pub seed: u64,
}

impl SamplingParams {
    /// An error naming the first setting outside the range the samplers accept.
    pub fn validate(&self) -> crate::Result<()> {
        let bad = |what: &str, v: f32| {
            Err(crate::Error::op(
                "sample",
                format!("{what} = {v} is out of range"),
            ))
        };
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad("temperature", self.temperature);
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad("repetition_penalty", self.repetition_penalty);
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", self.min_p);
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", self.top_p);
        }
        Ok(())
    }
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            repetition_window: 64,
            seed: 0,
        }
    }
}

/// An RMSNorm folded into the op that reads its output (a decode matmul, `RopeAttention`'s
/// head norms): x·(w [+ 1])/rms(x), w f32 over x's last dim.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PreNorm {
    pub eps: f32,
    /// Scale by (1 + w) (Gemma).
    pub unit_offset: bool,
}

impl PreNorm {
    /// What the kernels add to the weight (1 with `unit_offset`).
    pub fn w_offset(self) -> f32 {
        if self.unit_offset {
            1.0
        } else {
            0.0
        }
    }

    /// The norm as a dispatch of its own.
    pub fn op(self) -> Op {
        Op::RmsNorm {
            eps: self.eps,
            unit_offset: self.unit_offset,
        }
    }
}

/// Shape of one attention layer (`Op::Attention`, `Op::RopeAttention`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttentionShape {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Multiplies q·k (usually 1/√head_dim).
    pub scale: f32,
    /// Sliding window: a key is seen only if its position > query position − window.
    pub window: Option<usize>,
    /// Attention-logit soft-capping (Gemma 2): scores become softcap·tanh(score/softcap)
    /// before the softmax.
    pub softcap: Option<f32>,
    /// A hint, not checked: every query row's position is at least `min_keys` − 1, so that it
    /// sees keys 0..=pos (before any window); 0 when not known. A backend may pick a kernel
    /// for long rows from it (CUDA: decode on tensor cores); results do not depend on it.
    pub min_keys: usize,
}

/// Row lengths from which a decode step is recorded apart (`Session`), with
/// `AttentionShape::min_keys` set to the largest one the row has reached: the points where a
/// backend may switch kernels (CUDA: tensor-core decode attention from 1,024 keys at head dim
/// 64, from 4,096 at 128).
pub const LONG_ROW_KEYS: [usize; 2] = [1024, 4096];

impl AttentionShape {
    /// Checks what every backend needs (`op` names the operation in the error): a head dim,
    /// query heads in whole groups per kv head, a window that sees a key, a positive softcap.
    pub fn check(&self, op: &'static str) -> Result<()> {
        let AttentionShape {
            n_heads,
            n_kv_heads,
            head_dim,
            ..
        } = *self;
        if head_dim == 0 || n_kv_heads == 0 || n_heads % n_kv_heads != 0 {
            return Err(Error::op(
                op,
                format!(
                    "{n_heads} query heads do not divide into {n_kv_heads} kv heads \
                     of dim {head_dim}"
                ),
            ));
        }
        if self.window == Some(0) {
            return Err(Error::op(op, "a sliding window of 0 positions sees no key"));
        }
        if let Some(c) = self.softcap.filter(|&c| c <= 0.0) {
            return Err(Error::op(op, format!("softcap {c} must be > 0")));
        }
        Ok(())
    }
}

/// Every op a backend may be asked to run. Operand conventions (row-major, activations
/// `[m, ...]` with `m` rows = tokens) are documented per variant; `ops::*` builds them.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// in: ids u32 `[m]`, table tensors (per `layout`, `[vocab, hidden]`); out: `[m, hidden]`,
    /// the rows times `scale` (1 for most models; Gemma's √hidden).
    Embedding { layout: WeightLayout, scale: f32 },
    /// in: x `[m, d]`, weight `[d]`, optionally a residual `[m, d]`; out `[m, d]` (+ the
    /// residual). `unit_offset` scales by (1 + w) (Gemma).
    RmsNorm { eps: f32, unit_offset: bool },
    /// in: a, b `[m, d]`, weight `[d]`; out: the sum a + b `[m, d]` (f32), then its RMSNorm
    /// `[m, d]` (f32 or f16): a residual add and the next norm in one pass.
    AddRmsNorm { eps: f32, unit_offset: bool },
    /// in: x `[m, d]`, weight `[d]`, bias `[d]`; out `[m, d]`.
    LayerNorm { eps: f32 },
    /// Rotary embedding of `rotary_dims` leading dims of each head. in: x `[m, n_heads*head_dim]`,
    /// inv_freq f32 `[rotary_dims/2]`, pos u32 `[1]` (position of row 0); out like x.
    /// `traditional`: rotate interleaved pairs (x0,x1),(x2,x3)…; else the two halves.
    /// cos/sin are multiplied by `mscale` (YaRN attention factor; 1 otherwise).
    Rope {
        n_heads: usize,
        head_dim: usize,
        rotary_dims: usize,
        traditional: bool,
        mscale: f32,
    },
    /// y = x · Wᵀ (+ bias). in: x `[m, k]`, the norm weight f32 `[k]` if `pre_norm`, weight
    /// tensors (per `layout`, `[n, k]`), bias `[n]` if `has_bias`, then with `half_x` x's f16
    /// copy `[1, k]`; out `[m, n]`. With `pre_norm`, x goes through that RMSNorm first (one row
    /// only: decode). `half_x` (one row, no norm) lets a kernel that rounds x to f16 anyway read
    /// the copy instead (the CUDA tensor-core matvec: half the bytes to stage).
    /// With `residual_update` (one row, with `pre_norm`), the operands after x are first y
    /// `[1, k]` and a weight f32 `[k]`, and x + RMSNorm(y)·w (the same eps and offset) takes
    /// x's place, also written to a second output `[1, k]` (Gemma's block output norm and
    /// residual add, done by the next block's input matmul).
    MatMul {
        layout: WeightLayout,
        has_bias: bool,
        pre_norm: Option<PreNorm>,
        half_x: bool,
        residual_update: bool,
    },
    /// Causal scaled-dot-product attention with GQA over a KV cache (`AttentionShape`).
    /// in: q `[m, n_heads*head_dim]`, k_cache and v_cache `[n_kv_heads, capacity, head_dim]`
    /// (both f32 or both f16), pos u32 `[1]` (position of query row 0; row i sees keys
    /// 0..=pos+i); out like q.
    Attention(AttentionShape),
    /// Writes rows of k (or v) into a cache at positions pos..pos+m.
    /// in: x `[m, n_kv_heads*head_dim]`, pos u32 `[1]`; out (read-modify-write):
    /// cache `[n_kv_heads, capacity, head_dim]` (f32, or f16: stores rounded to nearest; the
    /// kernel is keyed by the cache's dtype, its only output).
    KvAppend { n_kv_heads: usize, head_dim: usize },
    /// `Rope` of q and of k, and `KvAppend` of the rotated k and of v, in one dispatch (the
    /// input stage of attention). in: q `[m, n_heads*head_dim]`, k and v
    /// `[m, n_kv_heads*head_dim]`, inv_freq f32 `[rotary_dims/2]`, pos u32 `[1]`; out: q
    /// rotated (like q), k_cache and v_cache `[n_kv_heads, capacity, head_dim]` (both f32 or
    /// both f16; read-modify-write: rows stored at positions pos..pos+m).
    RopeKvAppend {
        n_heads: usize,
        n_kv_heads: usize,
        head_dim: usize,
        rotary_dims: usize,
        traditional: bool,
        mscale: f32,
    },
    /// `RopeKvAppend`, then `Attention` of the rotated q over the caches, in one dispatch
    /// (a layer's attention from its q/k/v projections; on the GPU, decode rotates q and the
    /// new keys inside the attention kernel). in: q `[m, n_heads*head_dim]`, k and v
    /// `[m, n_kv_heads*head_dim]`, inv_freq f32 `[rotary_dims/2]`, pos u32 `[1]`, then with
    /// `head_norm` the q and k norm weights f32 `[head_dim]`; out: the attention output (like
    /// q), k_cache and v_cache `[n_kv_heads, capacity, head_dim]` (both f32 or both f16;
    /// read-modify-write: rows stored at positions pos..pos+m), then with `half_out` the
    /// output's f16 copy (one row: for the o projection's `MatMul::half_x`). With `head_norm`,
    /// each head_dim slice of q and of k goes through that RMSNorm (over rows of head_dim)
    /// before the rotation (Qwen3's and Gemma 3's q/k norms).
    RopeAttention {
        attention: AttentionShape,
        rotary_dims: usize,
        traditional: bool,
        mscale: f32,
        head_norm: Option<PreNorm>,
        half_out: bool,
    },
    /// Softmax over the last dim. in: x `[m, d]`; out `[m, d]`.
    Softmax,
    /// The gated MLP's two projections and activation in one: out = f(x·Gᵀ) ∘ (x·Uᵀ).
    /// in: x `[1, k]` (a single row: decode), the norm weight f32 `[k]` if `pre_norm`, gate
    /// weight tensors, then up weight tensors (both per `layout`, `[n, k]`); out `[1, n]`, then
    /// with `half_out` its f16 copy `[1, n]` (for the down projection's `MatMul::half_x`).
    /// `residual_update` as `MatMul`'s: y and its norm weight follow x, and the updated x is
    /// the second output (before the f16 copy).
    GatedMatMul {
        layout: WeightLayout,
        act: UnaryFn,
        pre_norm: Option<PreNorm>,
        half_out: bool,
        residual_update: bool,
    },
    /// out = cap·tanh(x/cap), elementwise (logit soft-capping).
    Softcap { cap: f32 },
    /// in: x; out: f(x), elementwise.
    Unary(UnaryFn),
    /// in: a, b (same shape); out: a ∘ b.
    Binary(BinaryFn),
    /// in: gate, up `[m, d]`; out: f(gate)·up (the gated MLP's activation, fused).
    GatedActivation(UnaryFn),
    /// Mixture-of-experts routing. in: router logits f32 `[m, experts]`; out: expert ids u32
    /// `[m, top_k]`, weights f32 `[m, top_k]`. Slots are in descending order of score; of equal
    /// scores the lower expert id ranks first (deterministic; MLX's argpartition leaves ties
    /// unspecified, and random router weights never tie).
    MoeRoute { top_k: usize, routing: Routing },
    /// Expert-indexed product: out[i, j] = x_ij · W_eᵀ with e = ids[i, j]. in: x `[m, k]`
    /// (row i shared by its slots) or, with `per_slot`, `[m, top_k, k]`; ids u32 `[m, top_k]`;
    /// weight tensors (per `layout`, experts stacked: `[experts, n, k]`); out `[m, top_k, n]`.
    /// Only the selected experts are read. With `combine`, `MoeCombine` follows in the same
    /// op: two more inputs, the routing weights f32 `[m, top_k]` and the residual `[m, n]`, and
    /// out is the MoE block's output `[m, n]`.
    GatherMatMul {
        layout: WeightLayout,
        per_slot: bool,
        combine: bool,
    },
    /// The gated pair of each selected expert: out[i, j] = f(x_i·G_eᵀ) ∘ (x_i·U_eᵀ).
    /// in: x `[m, k]`, ids u32 `[m, top_k]`, the norm weight f32 `[k]` if `pre_norm`, gate
    /// tensors, then up tensors (stacked like `GatherMatMul`'s); out `[m, top_k, n]`. With
    /// `pre_norm`, x goes through that RMSNorm first (the MoE block's input norm). With
    /// `route`, the second input is the router logits f32 `[m, experts]` instead of ids: the op
    /// routes them first as `MoeRoute` does, into its second and third outputs (ids, weights).
    GatherGatedMatMul {
        layout: WeightLayout,
        act: UnaryFn,
        pre_norm: Option<PreNorm>,
        route: Option<Route>,
    },
    /// The MoE block's output added to the residual: out[i] = residual[i] + Σ_j w[i, j]·y[i, j].
    /// in: y `[m, top_k, n]`, weights f32 `[m, top_k]`, residual `[m, n]`; out `[m, n]`.
    MoeCombine,
    /// Greedy pick over the last row. in: logits f32 `[m, vocab]`; out: token u32 `[1]`, then
    /// with `end_step` pos u32 `[1]` and ring u32 `[r]` as `EndStep` does (a greedy step's last
    /// dispatch, so one kernel fewer).
    Argmax { end_step: bool },
    /// Sample from the last row. in: logits f32 `[m, vocab]`, pos u32 `[1]`;
    /// out: token u32 `[1]`, history u32 `[capacity]` (read-modify-write: tokens at
    /// positions 0..=pos are read for the repetition penalty, the pick is stored at pos+1).
    /// The random draw is a hash of (seed, pos), so replays are deterministic.
    Sample(SamplingParams),
    /// The end of a decode step: ring[(pos + 1) % r] = token, then pos += 1. in: token u32
    /// `[1]`; out: pos u32 `[1]` (read-modify-write), ring u32 `[r]`. The host writes the
    /// position only when it jumps, and reads each step's token from its slot of the ring
    /// (host-mapped memory: `Device::zeros_host_mapped`) while later steps run.
    EndStep,
}

impl Op {
    /// The op's family name, used in kernel-registry keys and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Embedding { .. } => "embedding",
            Op::RmsNorm { .. } => "rms_norm",
            Op::AddRmsNorm { .. } => "add_rms_norm",
            Op::LayerNorm { .. } => "layer_norm",
            Op::Rope { .. } => "rope",
            Op::MatMul { .. } => "matmul",
            Op::GatedMatMul { .. } => "gated_matmul",
            Op::Attention(_) => "attention",
            Op::KvAppend { .. } => "kv_append",
            Op::RopeKvAppend { .. } => "rope_kv_append",
            Op::RopeAttention { .. } => "rope_attention",
            Op::Softmax => "softmax",
            Op::Softcap { .. } => "softcap",
            Op::Unary(_) => "unary",
            Op::Binary(_) => "binary",
            Op::GatedActivation(_) => "gated_activation",
            Op::MoeRoute { .. } => "moe_route",
            Op::GatherMatMul { .. } => "gather_matmul",
            Op::GatherGatedMatMul { .. } => "gather_gated_matmul",
            Op::MoeCombine => "moe_combine",
            Op::Argmax { .. } => "argmax",
            Op::Sample(_) => "sample",
            Op::EndStep => "end_step",
        }
    }

    /// A `RopeAttention` as its two steps: the `RopeKvAppend` and the `Attention` (after the
    /// head norms, if any).
    pub fn rope_attention_steps(&self) -> Option<(Op, Op)> {
        let Op::RopeAttention {
            attention,
            rotary_dims,
            traditional,
            mscale,
            ..
        } = *self
        else {
            return None;
        };
        let rope = Op::RopeKvAppend {
            n_heads: attention.n_heads,
            n_kv_heads: attention.n_kv_heads,
            head_dim: attention.head_dim,
            rotary_dims,
            traditional,
            mscale,
        };
        Some((rope, Op::Attention(attention)))
    }

    /// The variant part of the registry key (what selects among kernels of one family).
    pub fn variant(&self) -> String {
        match self {
            Op::Embedding { layout, .. }
            | Op::MatMul { layout, .. }
            | Op::GatedMatMul { layout, .. }
            | Op::GatherMatMul { layout, .. }
            | Op::GatherGatedMatMul { layout, .. } => layout.variant(),
            Op::Unary(f) | Op::GatedActivation(f) => format!("{f:?}").to_lowercase(),
            Op::Binary(f) => format!("{f:?}").to_lowercase(),
            _ => String::new(),
        }
    }
}

/// The error for a dispatch whose operand count does not match its op.
pub(crate) fn operand_count(op: &Op, inputs: usize, outputs: usize) -> Error {
    Error::op(
        op.name(),
        format!("unexpected operand count: {inputs} inputs, {outputs} outputs"),
    )
}

/// An `Argmax`'s operands: the logits, the token, and where the step ends there (`end_step`)
/// pos and the ring; a wrong count is an error naming the op, another op a registry mistake.
#[allow(clippy::type_complexity)]
pub(crate) fn argmax_operands<'t>(
    op: &Op,
    inputs: &'t [Tensor],
    outputs: &'t [Tensor],
) -> Result<(&'t Tensor, &'t Tensor, Option<(&'t Tensor, &'t Tensor)>)> {
    let Op::Argmax { end_step } = *op else {
        return Err(Error::Invalid(format!(
            "an argmax kernel received {}",
            op.name()
        )));
    };
    match (end_step, inputs, outputs) {
        (false, [logits], [token]) => Ok((logits, token, None)),
        (true, [logits], [token, pos, ring]) => Ok((logits, token, Some((pos, ring)))),
        _ => Err(operand_count(op, inputs.len(), outputs.len())),
    }
}

/// Operands whose last one is there only where the op says so (`present`: `MatMul::half_x`,
/// the `half_out` flags): the others, and that one.
pub(crate) fn optional_last(present: bool, operands: &[Tensor]) -> (&[Tensor], Option<&Tensor>) {
    match (present, operands) {
        (true, [rest @ .., last]) => (rest, Some(last)),
        _ => (operands, None),
    }
}
