//! The decoder-only transformer every supported family is an instance of: pre-norm blocks
//! of GQA attention with RoPE and a gated MLP. What a family changes — biases, norm style,
//! extra norms, activation, scales, soft-caps, sliding windows, fused projections — is an
//! `Architecture` flag or a `DecoderParams` field, set per `model_type` by the family's
//! config reader (`models::llama`, `models::qwen2` …); the forward pass is this one.
//! A layer's MLP is either the dense gated MLP or a sparse mixture-of-experts block
//! (`MoeParams`: a router picks `top_k` of the experts' gated MLPs per token).

use crate::core::device::Device;
use crate::core::dtype::DType;
use crate::core::encoder::CommandEncoder;
use crate::core::op::{BinaryFn, PreNorm, Route, Routing, UnaryFn};
use crate::core::tensor::Tensor;
use crate::models::WeightSource;
use crate::ops::{
    self, AttentionShape, ExpertLinear, Linear, ResidualUpdate, RopeScaling, RopeTable,
};
use crate::{Error, Result};

/// How a family's blocks differ from Llama's (`Architecture::LLAMA`).
#[derive(Clone, Debug, PartialEq)]
pub struct Architecture {
    /// RMSNorms scale by (1 + w) (Gemma).
    pub norm_unit_offset: bool,
    /// Biases on the q, k and v projections (Qwen2; Llama's `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama's `attention_bias`).
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// RMSNorm over each head of q and k before RoPE (`q_norm`, `k_norm`: Qwen3, Gemma 3).
    pub qk_norm: bool,
    /// Norms on the attention and MLP outputs too, before each residual add (Gemma 2/3:
    /// `post_attention_layernorm` is then the attention-output norm and
    /// `pre_feedforward_layernorm` the MLP input norm).
    pub sandwich_norms: bool,
    /// One `self_attn.qkv_proj` whose output rows are q, k then v (Phi-3).
    pub fused_qkv: bool,
    /// One `mlp.gate_up_proj` whose output rows are gate then up (Phi-3).
    pub fused_gate_up: bool,
    /// The MLP's gate activation.
    pub activation: UnaryFn,
    /// Multiplies the token embeddings (Gemma: √hidden).
    pub embed_scale: Option<f32>,
    /// Attention-logit soft-cap (Gemma 2).
    pub attn_softcap: Option<f32>,
    /// Final-logit soft-cap (Gemma 2).
    pub final_softcap: Option<f32>,
}

impl Architecture {
    pub const LLAMA: Architecture = Architecture {
        norm_unit_offset: false,
        qkv_bias: false,
        o_bias: false,
        mlp_bias: false,
        qk_norm: false,
        sandwich_norms: false,
        fused_qkv: false,
        fused_gate_up: false,
        activation: UnaryFn::Silu,
        embed_scale: None,
        attn_softcap: None,
        final_softcap: None,
    };
}

/// One rotary embedding: its base, frequency scaling and the dims it turns.
#[derive(Clone, Debug, PartialEq)]
pub struct RopeParams {
    pub theta: f32,
    pub scaling: RopeScaling,
    /// Interleaved-pair RoPE (GGUF files, whose q/k rows llama.cpp permuted) rather than
    /// rotate-half (Hugging Face layout).
    pub traditional: bool,
    /// Leading dims of each head that rotate (the head dim unless partial, as in Phi-3).
    pub rotary_dims: usize,
}

/// The sparse MLP of mixture-of-experts families: a router (`{block}.gate`, `[experts,
/// hidden]`) scores the experts, the `top_k` best run their gated MLPs (mlx-lm's SwitchGLU,
/// `{block}.switch_mlp.{gate,up,down}_proj`, experts stacked) and their outputs are summed
/// with the routing weights.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeParams {
    pub experts: usize,
    pub top_k: usize,
    /// Width of each expert's gated MLP.
    pub intermediate_size: usize,
    pub routing: Routing,
    /// Per layer: the MoE block (true) or the dense MLP of `DecoderParams::intermediate_size`.
    pub sparse_layers: Vec<bool>,
    /// The module holding router and experts: `block_sparse_moe` (Mixtral), `mlp` (Qwen3-MoE).
    pub block: &'static str,
}

/// What the forward pass needs to know about a model.
#[derive(Clone, Debug, PartialEq)]
pub struct DecoderParams {
    pub arch: Architecture,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f32,
    /// RoPE of the full-attention layers (of all layers without `local_rope`).
    pub rope: RopeParams,
    /// RoPE of the sliding-window layers, where it differs (Gemma 3's local base).
    pub local_rope: Option<RopeParams>,
    /// Sliding window of each layer (`None`: the layer sees the whole context).
    pub layer_windows: Vec<Option<usize>>,
    /// Multiplies q·k (1/√head_dim unless the family says otherwise).
    pub attention_scale: f32,
    /// The output head is the embedding table, unless the checkpoint has an `lm_head`.
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
    /// The mixture-of-experts MLP, for the layers it marks sparse.
    pub moe: Option<MoeParams>,
}

impl DecoderParams {
    fn check(&self) -> Result<()> {
        let bad = |reason: String| Err(Error::Invalid(format!("decoder parameters: {reason}")));
        if self.num_kv_heads == 0 || !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "{} kv heads for {} heads",
                self.num_kv_heads, self.num_heads
            ));
        }
        if self.layer_windows.len() != self.num_layers {
            return bad(format!(
                "{} layer windows for {} layers",
                self.layer_windows.len(),
                self.num_layers
            ));
        }
        if let Some(moe) = &self.moe {
            if moe.top_k == 0 || moe.top_k > moe.experts {
                return bad(format!("top {} of {} experts", moe.top_k, moe.experts));
            }
            if moe.sparse_layers.len() != self.num_layers {
                return bad(format!(
                    "{} sparse-layer flags for {} layers",
                    moe.sparse_layers.len(),
                    self.num_layers
                ));
            }
            if self.arch.sandwich_norms || self.arch.fused_gate_up || self.arch.mlp_bias {
                return bad(
                    "a mixture-of-experts MLP with sandwich norms, a fused gate_up \
                            projection or MLP biases"
                        .into(),
                );
            }
        }
        for rope in std::iter::once(&self.rope).chain(&self.local_rope) {
            if rope.rotary_dims > self.head_dim {
                return bad(format!(
                    "{} rotary dims in a {}-dim head",
                    rope.rotary_dims, self.head_dim
                ));
            }
        }
        Ok(())
    }
}

/// `parts` in order, each run of consecutive parts stored alike joined into one weight named
/// `name` (`Linear::concat_rows`); a part unlike its neighbours stays as it is.
fn join_alike(name: &str, parts: Vec<Linear>) -> Result<Vec<Linear>> {
    let mut runs: Vec<Vec<Linear>> = Vec::new();
    for part in parts {
        match runs.last_mut() {
            Some(run) if run[0].stored_like(&part) => run.push(part),
            _ => runs.push(vec![part]),
        }
    }
    runs.into_iter()
        .map(|mut run| match run.len() {
            1 => Ok(run.remove(0)),
            _ => Linear::concat_rows(name, &run.iter().collect::<Vec<_>>()),
        })
        .collect()
}

/// `t` as f32 (exact from f16/bf16): the block norms are folded into the decode matmuls and the
/// q/k head norms into the attention, which read their weights as f32.
fn f32_vector(t: Tensor) -> Result<Tensor> {
    if t.dtype() == DType::F32 {
        return Ok(t);
    }
    t.device().from_slice(&t.to_f32_vec()?, t.shape())
}

struct Layer {
    /// f32 (as every block input norm here: see `f32_vector`).
    attn_norm: Tensor,
    /// q, k and v in order, consecutive ones stored alike joined into one weight (a decode step
    /// reads each in one pass: one weight unless a K-quant mix keeps v in Q6_K beside q and k
    /// in Q4_K); `q`, `k` and `v` view their rows.
    qkv: Vec<Linear>,
    q: Linear,
    k: Linear,
    v: Linear,
    /// Per-head norms of q and k (`Architecture::qk_norm`), f32 (folded into the attention).
    qk_norm: Option<(Tensor, Tensor)>,
    o: Linear,
    /// Norm of the attention output (`Architecture::sandwich_norms`).
    attn_out_norm: Option<Tensor>,
    mlp_norm: Tensor,
    mlp: Mlp,
    /// Norm of the MLP output (`Architecture::sandwich_norms`).
    mlp_out_norm: Option<Tensor>,
    rope: RopeTable,
    rope_traditional: bool,
    window: Option<usize>,
}

/// A layer's MLP.
enum Mlp {
    /// down(act(gate(x)) ∘ up(x)).
    Dense {
        gate: Linear,
        up: Linear,
        down: Linear,
    },
    /// A router and stacked experts (`MoeParams`).
    Moe {
        router: Linear,
        gate: ExpertLinear,
        up: ExpertLinear,
        down: ExpertLinear,
    },
}

impl Mlp {
    /// Bytes one token reads: every dense matrix, or the router and `top_k` experts.
    fn token_bytes(&self, top_k: usize) -> usize {
        match self {
            Mlp::Dense { gate, up, down } => {
                [gate, up, down].map(Linear::weight_bytes).iter().sum()
            }
            Mlp::Moe {
                router,
                gate,
                up,
                down,
            } => {
                let expert: usize = [gate, up, down]
                    .map(ExpertLinear::expert_bytes)
                    .iter()
                    .sum();
                router.weight_bytes() + top_k * expert
            }
        }
    }
}

impl Layer {
    fn attention_linears(&self) -> [&Linear; 4] {
        [&self.q, &self.k, &self.v, &self.o]
    }

    fn norms(&self) -> impl Iterator<Item = &Tensor> {
        let qk = self.qk_norm.iter().flat_map(|(q, k)| [q, k]);
        [&self.attn_norm, &self.mlp_norm]
            .into_iter()
            .chain(qk)
            .chain(&self.attn_out_norm)
            .chain(&self.mlp_out_norm)
    }
}

pub struct Decoder {
    pub params: DecoderParams,
    embed: Linear,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
    /// The dtype the file stores the float weights in (its final norm's, before `f32_vector`).
    float_dtype: DType,
}

/// Per-layer key and value caches, `[n_kv_heads, capacity, head_dim]` each, in f32 or f16.
pub struct KvCache {
    /// Never empty (`new_cache` refuses a model of no layers).
    layers: Vec<(Tensor, Tensor)>,
    /// Keys the rows recorded next see at least (`AttentionShape::min_keys`): 0, or set by
    /// the session for the decode steps of long rows.
    min_keys: usize,
}

impl KvCache {
    /// Positions a layer's cache holds.
    pub fn capacity(&self) -> usize {
        self.layers
            .first()
            .and_then(|(k, _)| k.shape().get(1).copied())
            .unwrap_or(0)
    }

    /// Sets the hint the next recorded attention ops carry (`AttentionShape::min_keys`).
    pub fn set_min_keys(&mut self, keys: usize) {
        self.min_keys = keys;
    }

    /// The caches' dtype (f32 or f16).
    pub fn dtype(&self) -> DType {
        self.layers.first().map_or(DType::F32, |(k, _)| k.dtype())
    }

    pub fn byte_len(&self) -> usize {
        self.layers
            .iter()
            .map(|(k, v)| k.byte_len() + v.byte_len())
            .sum()
    }
}

/// Activation buffers for a forward pass over `m` tokens, allocated once and reused (a
/// captured decode graph refers to them).
pub struct Scratch {
    pub m: usize,
    residual: [Tensor; 2],
    normed: Tensor,
    /// The input norm's output as f16 `[m, hidden]` for prompts whose projections of it read f16
    /// activations (`ops::matmul_reads_half`): written instead of `normed` where all do.
    normed_h: Option<Tensor>,
    /// `[1, q + k + v]` for a single row: the fused projection's output, which `q`, `k` and
    /// `v` then view.
    qkv: Option<Tensor>,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn: Tensor,
    /// `attn`'s f16 copy `[1, q]` for a single row where an o projection reads one, which the
    /// attention writes and the o projection stages (`ops::matmul_add`'s x_h).
    attn_h: Option<Tensor>,
    proj: Tensor,
    gate: Tensor,
    up: Tensor,
    act: Tensor,
    /// `act` as f16 where a down projection reads it: for a single row `[1, intermediate]`, a
    /// copy beside `act` that the fused gated matmul writes and the down projection stages
    /// (`ops::matmul_add`'s x_h); for a prompt `[m, intermediate]`, f16 activations written by
    /// the gated activation instead of `act` (`ops::matmul_reads_half`).
    act_h: Option<Tensor>,
    /// Buffers of the MoE layers (`DecoderParams::moe`).
    moe: Option<MoeScratch>,
    /// Logits before the final soft-cap (`Architecture::final_softcap`).
    uncapped_logits: Option<Tensor>,
}

/// The residual stream as the next op reads it: `x`, or, where a block output is still to be
/// added, x before that addition: `update` (one decode row with sandwich norms, whose output
/// norm and residual add the next normed matmul folds in, one dispatch fewer a block), or `add`
/// (a prompt's rows, whose residual add the next norm folds in: `ops::add_rms_norm`).
#[derive(Clone, Copy)]
struct Residual<'a> {
    x: &'a Tensor,
    update: Option<ResidualUpdate<'a>>,
    add: Option<PendingAdd<'a>>,
}

/// x + `y` into `out`, still to be done.
#[derive(Clone, Copy)]
struct PendingAdd<'a> {
    y: &'a Tensor,
    out: &'a Tensor,
}

impl<'a> Residual<'a> {
    fn settled(x: &'a Tensor) -> Self {
        Residual {
            x,
            update: None,
            add: None,
        }
    }

    /// The tensor that holds the stream once the update or addition, if any, is applied.
    fn current(&self) -> &'a Tensor {
        match (self.update, self.add) {
            (Some(u), _) => u.out,
            (None, Some(a)) => a.out,
            (None, None) => self.x,
        }
    }
}

/// Activations of a MoE block over `m` tokens.
struct MoeScratch {
    /// Router logits `[m, experts]`.
    logits: Tensor,
    /// Selected experts u32 `[m, top_k]` and their weights f32 `[m, top_k]`.
    ids: Tensor,
    weights: Tensor,
    /// Each slot's act(gate)·up `[m, top_k, expert width]`.
    act: Tensor,
}

impl Decoder {
    pub fn load(
        params: DecoderParams,
        weights: &dyn WeightSource,
        device: &Device,
    ) -> Result<Decoder> {
        params.check()?;
        let p = &params;
        let a = &p.arch;
        let (h, i, hd) = (p.hidden_size, p.intermediate_size, p.head_dim);
        let (q_dim, kv_dim) = (p.num_heads * hd, p.num_kv_heads * hd);
        let rope_table = |r: &RopeParams| -> Result<(RopeTable, bool)> {
            let table = RopeTable::new(device, r.rotary_dims, r.theta, &r.scaling)?;
            Ok((table, r.traditional))
        };
        let global_rope = rope_table(&p.rope)?;
        let local_rope = p.local_rope.as_ref().map(rope_table).transpose()?;
        let embed = weights.linear("model.embed_tokens", p.vocab_size, h, false)?;
        let mut layers = Vec::with_capacity(p.num_layers);
        for (l, &window) in p.layer_windows.iter().enumerate() {
            let name = |s: &str| format!("model.layers.{l}.{s}");
            // Fused projections are split by output rows into views of the same memory;
            // separate ones stored alike are fused here.
            let parts = if a.fused_qkv {
                let qkv_dim = q_dim + 2 * kv_dim;
                vec![weights.linear(&name("self_attn.qkv_proj"), qkv_dim, h, a.qkv_bias)?]
            } else {
                vec![
                    weights.linear(&name("self_attn.q_proj"), q_dim, h, a.qkv_bias)?,
                    weights.linear(&name("self_attn.k_proj"), kv_dim, h, a.qkv_bias)?,
                    weights.linear(&name("self_attn.v_proj"), kv_dim, h, a.qkv_bias)?,
                ]
            };
            let qkv = join_alike(&name("self_attn.qkv"), parts)?;
            let row = |start: usize, len: usize| -> Result<Linear> {
                let mut first = 0;
                for w in &qkv {
                    if start < first + w.n {
                        return w.narrow_rows(start - first, len);
                    }
                    first += w.n;
                }
                Err(Error::Invalid(format!(
                    "{}: no rows at {start}",
                    name("self_attn")
                )))
            };
            let (q, k, v) = (
                row(0, q_dim)?,
                row(q_dim, kv_dim)?,
                row(q_dim + kv_dim, kv_dim)?,
            );
            let sparse = p.moe.as_ref().filter(|moe| moe.sparse_layers[l]);
            let mlp = match sparse {
                Some(moe) => {
                    let (e, mi) = (moe.experts, moe.intermediate_size);
                    let block = |s: &str| name(&format!("{}.{s}", moe.block));
                    Mlp::Moe {
                        router: weights.linear(&block("gate"), e, h, false)?,
                        gate: weights.experts(&block("switch_mlp.gate_proj"), e, mi, h)?,
                        up: weights.experts(&block("switch_mlp.up_proj"), e, mi, h)?,
                        down: weights.experts(&block("switch_mlp.down_proj"), e, h, mi)?,
                    }
                }
                None => {
                    let (gate, up) = if a.fused_gate_up {
                        let gate_up =
                            weights.linear(&name("mlp.gate_up_proj"), 2 * i, h, a.mlp_bias)?;
                        (gate_up.narrow_rows(0, i)?, gate_up.narrow_rows(i, i)?)
                    } else {
                        (
                            weights.linear(&name("mlp.gate_proj"), i, h, a.mlp_bias)?,
                            weights.linear(&name("mlp.up_proj"), i, h, a.mlp_bias)?,
                        )
                    };
                    let down = weights.linear(&name("mlp.down_proj"), h, i, a.mlp_bias)?;
                    Mlp::Dense { gate, up, down }
                }
            };
            let qk_norm = if a.qk_norm {
                Some((
                    f32_vector(weights.vector(&name("self_attn.q_norm.weight"), hd)?)?,
                    f32_vector(weights.vector(&name("self_attn.k_norm.weight"), hd)?)?,
                ))
            } else {
                None
            };
            // Sandwich-norm blocks name their MLP input norm `pre_feedforward_layernorm` and
            // use `post_attention_layernorm` on the attention output. Their output norms are
            // f32 too, as the next normed matmul folds them (`ops::ResidualUpdate`).
            let out_norm = |n: &str| f32_vector(weights.vector(&name(n), h)?);
            let (attn_out_norm, mlp_norm, mlp_out_norm) = if a.sandwich_norms {
                (
                    Some(out_norm("post_attention_layernorm.weight")?),
                    weights.vector(&name("pre_feedforward_layernorm.weight"), h)?,
                    Some(out_norm("post_feedforward_layernorm.weight")?),
                )
            } else {
                (
                    None,
                    weights.vector(&name("post_attention_layernorm.weight"), h)?,
                    None,
                )
            };
            let (rope, rope_traditional) = match (&local_rope, window) {
                (Some(local), Some(_)) => local.clone(),
                _ => global_rope.clone(),
            };
            layers.push(Layer {
                attn_norm: f32_vector(weights.vector(&name("input_layernorm.weight"), h)?)?,
                qkv,
                q,
                k,
                v,
                qk_norm,
                o: weights.linear(&name("self_attn.o_proj"), h, q_dim, a.o_bias)?,
                attn_out_norm,
                mlp_norm: f32_vector(mlp_norm)?,
                mlp,
                mlp_out_norm,
                rope,
                rope_traditional,
                window,
            });
        }
        let norm = weights.vector("model.norm.weight", h)?;
        let float_dtype = norm.dtype();
        let norm = f32_vector(norm)?;
        let lm_head = if !p.tie_word_embeddings || weights.has_linear("lm_head") {
            weights.linear("lm_head", p.vocab_size, h, false)?
        } else {
            embed.clone()
        };
        Ok(Decoder {
            params,
            embed,
            layers,
            norm,
            lm_head,
            float_dtype,
        })
    }

    /// Tensors `load` reads (for progress reports).
    pub fn tensor_count(p: &DecoderParams) -> usize {
        let a = &p.arch;
        let per_layer = 3 // input and MLP norms, o projection
            + if a.fused_qkv { 1 } else { 3 }
            + if a.qk_norm { 2 } else { 0 }
            + if a.sandwich_norms { 2 } else { 0 };
        let dense_mlp = if a.fused_gate_up { 2 } else { 3 };
        let sparse = p
            .moe
            .as_ref()
            .map_or(0, |moe| moe.sparse_layers.iter().filter(|&&s| s).count());
        // A sparse layer reads its router and three stacked expert projections.
        p.num_layers * per_layer + (p.num_layers - sparse) * dense_mlp + sparse * 4 + 3
    }

    /// Bytes of weights one decode step reads (every matrix once, norms included; of a MoE
    /// layer the router and the `top_k` experts a token runs).
    pub fn weight_bytes(&self) -> usize {
        let top_k = self.params.moe.as_ref().map_or(0, |moe| moe.top_k);
        let layers: usize = self
            .layers
            .iter()
            .map(|l| {
                l.attention_linears()
                    .iter()
                    .map(|w| w.weight_bytes())
                    .sum::<usize>()
                    + l.mlp.token_bytes(top_k)
                    + l.norms().map(Tensor::byte_len).sum::<usize>()
            })
            .sum();
        // One embedding row is read per token; the head reads the whole table.
        layers
            + self.norm.byte_len()
            + self.lm_head.weight_bytes()
            + self.embed.weight_bytes() / self.params.vocab_size.max(1)
    }

    /// The KV caches' dtype unless a session asks for another. f32 for a model whose float
    /// weights are stored in f32, which mlx-lm computes in f32 (and for GGUF files, whose norms
    /// are f32). Otherwise f16, as MLX keeps an f16 model's caches (bf16 models too: the same
    /// bytes, llama.cpp's default): half the memory and half what attention reads. Except at
    /// head dims up to 64, where short rows are latency and each f16 element costs decode
    /// attention a widening: f16 gains only on long rows, which the tensor-core decode kernel
    /// takes. H100, f16 against f32 caches, decode of 256 tokens after N: 2026-11-27,
    /// Qwen3-0.6B (head dim 128) +7.9% and Gemma-3-1B (256) +2.0% after 1,024, the 8B +8.9%
    /// after 2,048; 2026-11-28 (thirty-first session), head dim 64: the Llama-3.2-1B shape
    /// −0.6% after 128, −0.7% after 512, +4.6% after 1,024, +9.4% after 2,048; SmolLM2 −1.0%
    /// after 128 (below its 3,000 tok/s), −2.9% after 512, +3.0% after 1,024, ±0 after 2,048.
    pub fn default_kv_dtype(&self) -> DType {
        match self.float_dtype {
            DType::F32 => DType::F32,
            _ if self.params.head_dim <= 64 => DType::F32,
            _ => DType::F16,
        }
    }

    /// Empty caches for `capacity` positions in `dtype` (f32 or f16).
    pub fn new_cache(&self, device: &Device, capacity: usize, dtype: DType) -> Result<KvCache> {
        if !ops::KV_CACHE_DTYPES.contains(&dtype) {
            return Err(Error::Invalid(format!(
                "KV cache dtype {dtype}: f32 or f16"
            )));
        }
        let p = &self.params;
        if p.num_layers == 0 {
            return Err(Error::Invalid("KV cache of a model with no layers".into()));
        }
        let shape = [p.num_kv_heads, capacity, p.head_dim];
        let layers = (0..p.num_layers)
            .map(|_| Ok((device.zeros(&shape, dtype)?, device.zeros(&shape, dtype)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCache {
            layers,
            min_keys: 0,
        })
    }

    pub fn new_scratch(&self, device: &Device, m: usize) -> Result<Scratch> {
        let p = &self.params;
        let a = &p.arch;
        let f = |cols: usize| device.empty(&[m, cols], DType::F32);
        // f16 rows (`attn_h`, `act_h`, `normed_h`), where a layer's projection reads them: a
        // decode row's f16 copy, a prompt's f16 activations.
        let half_rows = |cols: usize, read: bool| match read {
            true => device.empty(&[m, cols], DType::F16).map(Some),
            false => Ok(None),
        };
        let reads = |w: &Linear| match m {
            1 => ops::reads_half_copy(device, w),
            _ => ops::matmul_reads_half(device, w, m),
        };
        let all_read = |ws: &[&Linear]| m > 1 && ws.iter().all(|w| reads(w));
        // (A prompt's attention writes f32 rows.)
        let o_reads = m == 1 && self.layers.iter().any(|l| reads(&l.o));
        let down_reads = self.layers.iter().any(|l| match &l.mlp {
            Mlp::Dense { down, .. } => reads(down),
            Mlp::Moe { .. } => false,
        });
        let normed_reads = self.layers.iter().any(|l| {
            let mlp = match &l.mlp {
                Mlp::Dense { gate, up, .. } => all_read(&[gate, up]),
                Mlp::Moe { .. } => false,
            };
            mlp || all_read(&[&l.q, &l.k, &l.v])
        });
        let (h, q_dim, kv_dim) = (
            p.hidden_size,
            p.num_heads * p.head_dim,
            p.num_kv_heads * p.head_dim,
        );
        let moe = match &p.moe {
            Some(moe) => Some(MoeScratch {
                logits: f(moe.experts)?,
                ids: device.empty(&[m, moe.top_k], DType::U32)?,
                weights: f(moe.top_k)?,
                act: device.empty(&[m, moe.top_k, moe.intermediate_size], DType::F32)?,
            }),
            None => None,
        };
        let uncapped_logits = match a.final_softcap {
            Some(_) => Some(device.empty(&[1, p.vocab_size], DType::F32)?),
            None => None,
        };
        let (qkv, q, k, v) = if m == 1 {
            let qkv = device.empty(&[q_dim + 2 * kv_dim], DType::F32)?;
            let view = |start, len| qkv.narrow_rows(start, len)?.reshape(&[1, len]);
            let (q, k, v) = (
                view(0, q_dim)?,
                view(q_dim, kv_dim)?,
                view(q_dim + kv_dim, kv_dim)?,
            );
            (Some(qkv.reshape(&[1, q_dim + 2 * kv_dim])?), q, k, v)
        } else {
            (None, f(q_dim)?, f(kv_dim)?, f(kv_dim)?)
        };
        Ok(Scratch {
            m,
            residual: [f(h)?, f(h)?],
            normed: f(h)?,
            normed_h: half_rows(h, normed_reads)?,
            qkv,
            q,
            k,
            v,
            attn: f(q_dim)?,
            attn_h: half_rows(q_dim, o_reads)?,
            proj: f(h)?,
            gate: f(p.intermediate_size)?,
            up: f(p.intermediate_size)?,
            act: f(p.intermediate_size)?,
            act_h: half_rows(p.intermediate_size, down_reads)?,
            moe,
            uncapped_logits,
        })
    }

    /// The family's RMSNorm parameters, for a norm folded into another op.
    fn pre_norm(&self) -> PreNorm {
        let p = &self.params;
        PreNorm {
            eps: p.rms_norm_eps,
            unit_offset: p.arch.norm_unit_offset,
        }
    }

    /// The family's RMSNorm as a matmul's folded input norm.
    fn input_norm<'a>(&self, w: &'a Tensor) -> ops::InputNorm<'a> {
        (w, self.pre_norm())
    }

    /// RMSNorm in the family's style.
    fn norm(&self, enc: &mut CommandEncoder, x: &Tensor, w: &Tensor, out: &Tensor) -> Result<()> {
        let p = &self.params;
        ops::rms_norm(enc, x, w, p.rms_norm_eps, p.arch.norm_unit_offset, out)
    }

    /// RMSNorm of the stream `x` by `w` as the input of the projections `ws`, its pending
    /// addition, if any, in the same dispatch: f16 activations (`s.normed_h`) where every one
    /// reads them (`ops::matmul_reads_half`), else f32.
    fn norm_for<'s>(
        &self,
        enc: &mut CommandEncoder,
        (x, w): (Residual, &Tensor),
        ws: &[&Linear],
        s: &'s Scratch,
    ) -> Result<&'s Tensor> {
        let rows = x.x.rows();
        let out = match &s.normed_h {
            Some(h)
                if ws
                    .iter()
                    .all(|l| ops::matmul_reads_half(enc.device(), l, rows)) =>
            {
                h
            }
            _ => &s.normed,
        };
        match (x.update, x.add) {
            (None, Some(add)) => {
                let (p, sum) = (&self.params, add.out);
                let (eps, offset) = (p.rms_norm_eps, p.arch.norm_unit_offset);
                ops::add_rms_norm(enc, x.x, add.y, w, eps, offset, sum, out)?;
            }
            _ => {
                let x = self.settle(enc, x)?;
                self.norm(enc, x, w, out)?;
            }
        }
        Ok(out)
    }

    /// Attention of layer `layer` over the input norm of the residual stream `x`, written to
    /// `s.attn` (before the output projection), and as f16 to `attn_h` if given. One decode row
    /// reads q, k and v in one matvec with the norm (and x's update, if any) folded in, or,
    /// stored in parts, one normed matvec a part where each folds the norm; otherwise the norm
    /// is a dispatch of its own and q, k, v three matmuls. q/k head norms
    /// (`Architecture::qk_norm`) are part of the attention dispatch.
    fn encode_attention(
        &self,
        enc: &mut CommandEncoder,
        layer: &Layer,
        x: Residual,
        ((k_cache, v_cache), min_keys): (&(Tensor, Tensor), usize),
        pos: &Tensor,
        (s, attn_h): (&Scratch, Option<&Tensor>),
    ) -> Result<()> {
        let p = &self.params;
        let norm = self.input_norm(&layer.attn_norm);
        let folds = |w: &Linear| ops::normed_matmul_folds(enc.device(), w);
        match (layer.qkv.as_slice(), &s.qkv) {
            ([w], Some(qkv)) => ops::normed_matmul(enc, x.x, x.update, norm, w, qkv)?,
            (parts, Some(qkv)) if parts.iter().all(folds) => {
                // A normed pass a part (q and k, then v, in a K-quant mix): fewer launches than
                // a norm of its own and three plain matmuls.
                let x = self.settle(enc, x)?;
                let flat = qkv.reshape(&[qkv.elem_count()])?;
                let mut start = 0;
                for w in parts {
                    let out = flat.narrow_rows(start, w.n)?.reshape(&[1, w.n])?;
                    ops::normed_matmul(enc, x, None, norm, w, &out)?;
                    start += w.n;
                }
            }
            _ => {
                let (q, k, v) = (&layer.q, &layer.k, &layer.v);
                let normed = self.norm_for(enc, (x, &layer.attn_norm), &[q, k, v], s)?;
                ops::matmul(enc, normed, q, &s.q)?;
                ops::matmul(enc, normed, k, &s.k)?;
                ops::matmul(enc, normed, v, &s.v)?;
            }
        }
        let head_norms = layer.qk_norm.as_ref().map(|(q, k)| ops::HeadNorms {
            q,
            k,
            norm: self.pre_norm(),
        });
        let shape = AttentionShape {
            n_heads: p.num_heads,
            n_kv_heads: p.num_kv_heads,
            head_dim: p.head_dim,
            scale: p.attention_scale,
            window: layer.window,
            softcap: p.arch.attn_softcap,
            min_keys,
        };
        ops::rope_attention(
            enc,
            [&s.q, &s.k, &s.v],
            head_norms,
            &layer.rope,
            layer.rope_traditional,
            shape,
            pos,
            (k_cache, v_cache),
            (&s.attn, attn_h),
        )
    }

    /// `copy` (an f16 scratch of the projection `w`'s input) where `w` reads it: a decode row's
    /// copy beside x on `project_residual`'s one-dispatch path, on a kernel that stages x's f16
    /// copy (`ops::reads_half_copy`); a prompt's f16 activations in place of x, where the matmul
    /// reads them as they lie (`ops::matmul_reads_half`). An unread copy only costs.
    fn half_copy_for<'s>(
        enc: &CommandEncoder,
        w: &Linear,
        out_norm: Option<&Tensor>,
        copy: Option<&'s Tensor>,
    ) -> Option<&'s Tensor> {
        copy.filter(|c| match c.rows() {
            1 => Self::residual_in_matmul(1, w, out_norm) && ops::reads_half_copy(enc.device(), w),
            rows => ops::matmul_reads_half(enc.device(), w, rows),
        })
    }

    /// Whether `project_residual` adds the residual inside the matmul (`ops::matmul_add`, one
    /// dispatch): one row, no output norm, no bias.
    fn residual_in_matmul(rows: usize, w: &Linear, out_norm: Option<&Tensor>) -> bool {
        rows == 1 && out_norm.is_none() && w.bias.is_none()
    }

    /// `out` = `x` + `branch`·Wᵀ, the block output first normed by `out_norm` if there is one
    /// (the norm and the add one dispatch). One decode row without a norm or bias takes the
    /// residual as the matmul's bias: one dispatch instead of two, reading `branch_h` (branch's
    /// f16 copy) if given; more rows read `branch_h` (their f16 activations) instead of branch.
    /// One decode row with a norm leaves the norm and the add to the next normed matmul
    /// (`Residual::update`), more rows without one leave the add to the next norm
    /// (`Residual::add`): one dispatch instead of two.
    #[allow(clippy::too_many_arguments)]
    fn project_residual<'a>(
        &'a self,
        enc: &mut CommandEncoder,
        (branch, branch_h): (&Tensor, Option<&Tensor>),
        w: &Linear,
        x: &'a Tensor,
        out_norm: Option<&'a Tensor>,
        s: &'a Scratch,
        out: &'a Tensor,
    ) -> Result<Residual<'a>> {
        if Self::residual_in_matmul(branch.rows(), w, out_norm) {
            ops::matmul_add(enc, branch, branch_h, w, x, out)?;
            return Ok(Residual::settled(out));
        }
        ops::matmul(enc, branch_h.unwrap_or(branch), w, &s.proj)?;
        match out_norm {
            Some(weight) if branch.rows() == 1 => Ok(Residual {
                x,
                update: Some(ResidualUpdate {
                    y: &s.proj,
                    weight,
                    out,
                }),
                add: None,
            }),
            Some(norm) => {
                let p = &self.params;
                let offset = p.arch.norm_unit_offset;
                ops::rms_norm_add(enc, &s.proj, norm, p.rms_norm_eps, offset, x, out)?;
                Ok(Residual::settled(out))
            }
            None if branch.rows() == 1 => {
                ops::binary(enc, BinaryFn::Add, x, &s.proj, out)?;
                Ok(Residual::settled(out))
            }
            None => Ok(Residual {
                x,
                update: None,
                add: Some(PendingAdd { y: &s.proj, out }),
            }),
        }
    }

    /// The residual stream with its update or addition applied by a dispatch of its own
    /// (`rms_norm_add`, `binary`), for the ops that do not fold it.
    fn settle<'a>(&self, enc: &mut CommandEncoder, x: Residual<'a>) -> Result<&'a Tensor> {
        if let Some(u) = x.update {
            let p = &self.params;
            let offset = p.arch.norm_unit_offset;
            ops::rms_norm_add(enc, u.y, u.weight, p.rms_norm_eps, offset, x.x, u.out)?;
        }
        if let Some(add) = x.add {
            ops::binary(enc, BinaryFn::Add, x.x, add.y, add.out)?;
        }
        Ok(x.current())
    }

    /// `s.act` = act(`s.normed`·Gᵀ) ∘ (`s.normed`·Uᵀ). One decode row with bias-free
    /// quantized gate and up stored alike is one dispatch, which also writes `act_h` if given
    /// (then returned); otherwise two matmuls and the activation, which writes a prompt's
    /// `act_h` (f16 activations, then returned) instead of `s.act` if given.
    fn gated_mlp_input<'s>(
        &self,
        enc: &mut CommandEncoder,
        x: Residual,
        norm: &Tensor,
        (gate, up): (&Linear, &Linear),
        (s, act_h): (&Scratch, Option<&'s Tensor>),
    ) -> Result<Option<&'s Tensor>> {
        let act = self.params.arch.activation;
        let stored_alike = gate.stored_like(up) && gate.n == up.n;
        if x.x.rows() == 1 && stored_alike && gate.bias.is_none() && up.bias.is_none() {
            let norm = Some(self.input_norm(norm));
            ops::gated_matmul(enc, x.x, x.update, norm, gate, up, act, &s.act, act_h)?;
            return Ok(act_h);
        }
        let normed = self.norm_for(enc, (x, norm), &[gate, up], s)?;
        ops::matmul(enc, normed, gate, &s.gate)?;
        ops::matmul(enc, normed, up, &s.up)?;
        let act_h = act_h.filter(|h| h.rows() > 1);
        ops::gated_activation(enc, act, &s.gate, &s.up, act_h.unwrap_or(&s.act))?;
        Ok(act_h)
    }

    /// Record the forward pass of `s.m` tokens (`tokens` u32 `[m]`, the first at position
    /// `pos`, a u32 `[1]` buffer) and write the last token's logits `[1, vocab]`.
    pub fn encode_forward(
        &self,
        enc: &mut CommandEncoder,
        tokens: &Tensor,
        pos: &Tensor,
        cache: &KvCache,
        s: &Scratch,
        logits: &Tensor,
    ) -> Result<()> {
        let a = &self.params.arch;
        let [x, x_mid] = &s.residual;
        // Gemma scales the embedding by √hidden (`Architecture::embed_scale`), in the gather.
        let scale = a.embed_scale.unwrap_or(1.0);
        ops::scaled_embedding(enc, tokens, &self.embed, scale, x)?;
        // The stream alternates between x (attention's input) and x_mid (the MLP's).
        let mut residual = Residual::settled(x);
        for (layer, kv) in self.layers.iter().zip(&cache.layers) {
            let attn_norm = layer.attn_out_norm.as_ref();
            let attn_h = Self::half_copy_for(enc, &layer.o, attn_norm, s.attn_h.as_ref());
            let kv = (kv, cache.min_keys);
            self.encode_attention(enc, layer, residual, kv, pos, (s, attn_h))?;
            let attn = (&s.attn, attn_h);
            let attn_in = residual.current();
            residual = self.project_residual(enc, attn, &layer.o, attn_in, attn_norm, s, x_mid)?;

            match &layer.mlp {
                Mlp::Dense { gate, up, down } => {
                    let mlp_norm = layer.mlp_out_norm.as_ref();
                    let act_h = Self::half_copy_for(enc, down, mlp_norm, s.act_h.as_ref());
                    let mlp_in = (s, act_h);
                    let act_h =
                        self.gated_mlp_input(enc, residual, &layer.mlp_norm, (gate, up), mlp_in)?;
                    let act = (&s.act, act_h);
                    let mlp_x = residual.current();
                    residual = self.project_residual(enc, act, down, mlp_x, mlp_norm, s, x)?;
                }
                Mlp::Moe {
                    router,
                    gate,
                    up,
                    down,
                } => {
                    let (Some(moe), Some(ms)) = (&self.params.moe, &s.moe) else {
                        return Err(Error::Invalid("a MoE layer without MoE parameters".into()));
                    };
                    // mlx-lm's MoE block: route, run the selected experts' gated MLPs, add
                    // their weighted sum to the residual. One decode row folds the input norm
                    // into the router and the experts' gate/up (no launch of its own); more
                    // rows norm once into `s.normed`, which both then read.
                    let x_mid = self.settle(enc, residual)?;
                    let (input, norm) = if s.m == 1 {
                        (x_mid, Some(self.input_norm(&layer.mlp_norm)))
                    } else {
                        self.norm(enc, x_mid, &layer.mlp_norm, &s.normed)?;
                        (&s.normed, None)
                    };
                    match norm {
                        Some(norm) => {
                            ops::normed_matmul(enc, input, None, norm, router, &ms.logits)?
                        }
                        None => ops::matmul(enc, input, router, &ms.logits)?,
                    }
                    let route = Route {
                        top_k: moe.top_k,
                        routing: moe.routing,
                    };
                    ops::routed_gated_matmul(
                        enc,
                        input,
                        norm,
                        (&ms.logits, route),
                        (&ms.ids, &ms.weights),
                        (gate, up),
                        self.params.arch.activation,
                        &ms.act,
                    )?;
                    let combine = (&ms.weights, x_mid);
                    ops::gather_matmul_combine(enc, &ms.act, &ms.ids, down, combine, x)?;
                    residual = Residual::settled(x);
                }
            }
        }
        // A pending update (one row) comes with x of one row: its last. A prompt's pending
        // addition is done first (the head reads one row, and the norm folds no addition).
        if residual.add.is_some() {
            residual = Residual::settled(self.settle(enc, residual)?);
        }
        let last = residual.x.narrow_rows(s.m - 1, 1)?;
        let head_out = match (a.final_softcap, &s.uncapped_logits) {
            (Some(_), Some(uncapped)) => uncapped,
            _ => logits,
        };
        let norm = self.input_norm(&self.norm);
        ops::normed_matmul(enc, &last, residual.update, norm, &self.lm_head, head_out)?;
        match a.final_softcap {
            Some(cap) => ops::softcap(enc, cap, head_out, logits),
            None => Ok(()),
        }
    }
}
