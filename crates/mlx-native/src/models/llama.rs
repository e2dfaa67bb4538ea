//! The Llama architecture (Llama 2/3.x, SmolLM2, Mistral): pre-norm decoder blocks of GQA
//! attention with RoPE and a SiLU-gated MLP.

use crate::core::device::Device;
use crate::core::dtype::DType;
use crate::core::encoder::CommandEncoder;
use crate::core::op::{BinaryFn, UnaryFn};
use crate::core::tensor::Tensor;
use crate::models::WeightSource;
use crate::ops::{self, AttentionShape, Linear, RopeScaling, RopeTable};
use crate::quant::{GgmlType, WeightLayout};
use crate::Result;

/// What the forward pass needs to know about a Llama-family model.
#[derive(Clone, Debug, PartialEq)]
pub struct LlamaParams {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
    /// Interleaved-pair RoPE (GGUF files, whose q/k rows llama.cpp permuted) rather than
    /// rotate-half (Hugging Face layout).
    pub rope_traditional: bool,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub sliding_window: Option<usize>,
    pub max_position_embeddings: usize,
}

struct Layer {
    attn_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    mlp_norm: Tensor,
    gate: Linear,
    up: Linear,
    down: Linear,
}

pub struct Llama {
    pub params: LlamaParams,
    embed: Linear,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
    rope: RopeTable,
}

/// Per-layer key and value caches, `[n_kv_heads, capacity, head_dim]` f32 each.
pub struct KvCache {
    pub capacity: usize,
    layers: Vec<(Tensor, Tensor)>,
}

impl KvCache {
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
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_rot: Tensor,
    k_rot: Tensor,
    attn: Tensor,
    proj: Tensor,
    gate: Tensor,
    up: Tensor,
    act: Tensor,
    last_normed: Tensor,
}

impl Llama {
    pub fn load(params: LlamaParams, weights: &dyn WeightSource, device: &Device) -> Result<Llama> {
        let p = &params;
        let (h, i, hd) = (p.hidden_size, p.intermediate_size, p.head_dim);
        let (q_dim, kv_dim) = (p.num_heads * hd, p.num_kv_heads * hd);
        let embed = weights.linear("model.embed_tokens", p.vocab_size, h, false)?;
        let mut layers = Vec::with_capacity(p.num_layers);
        for l in 0..p.num_layers {
            let name = |s: &str| format!("model.layers.{l}.{s}");
            let ab = p.attention_bias;
            layers.push(Layer {
                attn_norm: weights.vector(&name("input_layernorm.weight"), h)?,
                q: weights.linear(&name("self_attn.q_proj"), q_dim, h, ab)?,
                k: weights.linear(&name("self_attn.k_proj"), kv_dim, h, ab)?,
                v: weights.linear(&name("self_attn.v_proj"), kv_dim, h, ab)?,
                o: weights.linear(&name("self_attn.o_proj"), h, q_dim, false)?,
                mlp_norm: weights.vector(&name("post_attention_layernorm.weight"), h)?,
                gate: weights.linear(&name("mlp.gate_proj"), i, h, p.mlp_bias)?,
                up: weights.linear(&name("mlp.up_proj"), i, h, p.mlp_bias)?,
                down: weights.linear(&name("mlp.down_proj"), h, i, p.mlp_bias)?,
            });
        }
        let norm = weights.vector("model.norm.weight", h)?;
        let lm_head = if !p.tie_word_embeddings || weights.has_linear("lm_head") {
            weights.linear("lm_head", p.vocab_size, h, false)?
        } else {
            embed.clone()
        };
        let rope = RopeTable::new(device, hd, p.rope_theta, &p.rope_scaling)?;
        Ok(Llama {
            params,
            embed,
            layers,
            norm,
            lm_head,
            rope,
        })
    }

    /// Tensors `load` reads (for progress reports).
    pub fn tensor_count(p: &LlamaParams) -> usize {
        p.num_layers * 9 + 3
    }

    /// Bytes of weights one decode step reads (every matrix once, norms included).
    pub fn weight_bytes(&self) -> usize {
        let mats: usize = self
            .layers
            .iter()
            .map(|l| {
                [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down]
                    .iter()
                    .map(|w| w.weight_bytes())
                    .sum::<usize>()
                    + l.attn_norm.byte_len()
                    + l.mlp_norm.byte_len()
            })
            .sum();
        // One embedding row is read per token; the head reads the whole table.
        mats + self.norm.byte_len()
            + self.lm_head.weight_bytes()
            + self.embed.weight_bytes() / self.params.vocab_size.max(1)
    }

    pub fn new_cache(&self, device: &Device, capacity: usize) -> Result<KvCache> {
        let p = &self.params;
        let shape = [p.num_kv_heads, capacity, p.head_dim];
        let layers = (0..p.num_layers)
            .map(|_| {
                Ok((
                    device.zeros(&shape, DType::F32)?,
                    device.zeros(&shape, DType::F32)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCache { capacity, layers })
    }

    pub fn new_scratch(&self, device: &Device, m: usize) -> Result<Scratch> {
        let p = &self.params;
        let f = |cols: usize| device.empty(&[m, cols], DType::F32);
        let (h, q_dim, kv_dim) = (
            p.hidden_size,
            p.num_heads * p.head_dim,
            p.num_kv_heads * p.head_dim,
        );
        Ok(Scratch {
            m,
            residual: [f(h)?, f(h)?],
            normed: f(h)?,
            q: f(q_dim)?,
            k: f(kv_dim)?,
            v: f(kv_dim)?,
            q_rot: f(q_dim)?,
            k_rot: f(kv_dim)?,
            attn: f(q_dim)?,
            proj: f(h)?,
            gate: f(p.intermediate_size)?,
            up: f(p.intermediate_size)?,
            act: f(p.intermediate_size)?,
            last_normed: device.empty(&[1, h], DType::F32)?,
        })
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
        let p = &self.params;
        let shape = AttentionShape {
            n_heads: p.num_heads,
            n_kv_heads: p.num_kv_heads,
            head_dim: p.head_dim,
            scale: 1.0 / (p.head_dim as f32).sqrt(),
            window: p.sliding_window,
            softcap: None,
        };
        let [x, x_mid] = &s.residual;
        ops::embedding(enc, tokens, &self.embed, x)?;
        for (layer, (k_cache, v_cache)) in self.layers.iter().zip(&cache.layers) {
            ops::rms_norm(enc, x, &layer.attn_norm, p.rms_norm_eps, false, &s.normed)?;
            ops::matmul(enc, &s.normed, &layer.q, &s.q)?;
            ops::matmul(enc, &s.normed, &layer.k, &s.k)?;
            ops::matmul(enc, &s.normed, &layer.v, &s.v)?;
            let tr = p.rope_traditional;
            ops::rope(
                enc,
                &s.q,
                &self.rope,
                p.num_heads,
                p.head_dim,
                tr,
                pos,
                &s.q_rot,
            )?;
            ops::rope(
                enc,
                &s.k,
                &self.rope,
                p.num_kv_heads,
                p.head_dim,
                tr,
                pos,
                &s.k_rot,
            )?;
            ops::kv_append(enc, &s.k_rot, pos, k_cache)?;
            ops::kv_append(enc, &s.v, pos, v_cache)?;
            ops::attention(enc, shape, &s.q_rot, k_cache, v_cache, pos, &s.attn)?;
            residual_matmul(enc, &s.attn, &layer.o, x, &s.proj, x_mid)?;

            ops::rms_norm(
                enc,
                x_mid,
                &layer.mlp_norm,
                p.rms_norm_eps,
                false,
                &s.normed,
            )?;
            gated_mlp_input(
                enc,
                &s.normed,
                &layer.gate,
                &layer.up,
                &s.gate,
                &s.up,
                &s.act,
            )?;
            residual_matmul(enc, &s.act, &layer.down, x_mid, &s.proj, x)?;
        }
        let last = x.narrow_rows(s.m - 1, 1)?;
        ops::rms_norm(
            enc,
            &last,
            &self.norm,
            p.rms_norm_eps,
            false,
            &s.last_normed,
        )?;
        ops::matmul(enc, &s.last_normed, &self.lm_head, logits)
    }
}

/// out = residual + x·Wᵀ. A single row (decode) takes the residual as the matmul's bias, one
/// dispatch; more rows use `tmp` for the product and a separate add.
fn residual_matmul(
    enc: &mut CommandEncoder,
    x: &Tensor,
    w: &Linear,
    residual: &Tensor,
    tmp: &Tensor,
    out: &Tensor,
) -> Result<()> {
    if x.rows() == 1 && w.bias.is_none() {
        return ops::matmul_add(enc, x, w, residual, out);
    }
    ops::matmul(enc, x, w, tmp)?;
    ops::binary(enc, BinaryFn::Add, residual, tmp, out)
}

/// out = silu(x·Gᵀ) ∘ (x·Uᵀ). A single row (decode) with bias-free quantized weights stored alike
/// is one
/// dispatch; otherwise two matmuls into `gate` and `up`, then the activation.
fn gated_mlp_input(
    enc: &mut CommandEncoder,
    x: &Tensor,
    w_gate: &Linear,
    w_up: &Linear,
    gate: &Tensor,
    up: &Tensor,
    out: &Tensor,
) -> Result<()> {
    // Quantized layouts only: dense rows may be views the matvec cannot read with wide loads.
    let quantized = !matches!(
        w_gate.layout,
        WeightLayout::Dense | WeightLayout::Gguf(GgmlType::F32 | GgmlType::F16 | GgmlType::BF16)
    );
    let same_storage = quantized
        && w_gate.layout == w_up.layout
        && (w_gate.n, w_gate.k) == (w_up.n, w_up.k)
        && w_gate
            .tensors
            .iter()
            .zip(&w_up.tensors)
            .all(|(g, u)| g.dtype() == u.dtype());
    if x.rows() == 1 && same_storage && w_gate.bias.is_none() && w_up.bias.is_none() {
        return ops::gated_matmul(enc, x, w_gate, w_up, UnaryFn::Silu, out);
    }
    ops::matmul(enc, x, w_gate, gate)?;
    ops::matmul(enc, x, w_up, up)?;
    ops::gated_activation(enc, UnaryFn::Silu, gate, up, out)
}
