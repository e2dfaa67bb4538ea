//! Gemma 3 text models (`gemma3_text`, mlx-lm `gemma3_text.py`): Gemma 2's block without
//! soft-capping, plus (1 + w) RMSNorms over each head of q and k, and layers alternating
//! between sliding-window attention with a local RoPE base (`rope_local_base_freq`) and
//! full attention (every `sliding_window_pattern`-th layer) with `rope_theta` and
//! `rope_scaling`. The embedding scale √hidden is rounded to bfloat16, as mlx-lm does. The
//! head is tied to the embedding unless the checkpoint has an `lm_head`.

use crate::core::op::UnaryFn;
use crate::formats::config::{rope_scaling, ConfigFields};
use crate::models::decoder::{Architecture, DecoderParams, RopeParams};
use crate::models::family::Sizes;
use crate::ops::RopeScaling;
use crate::Result;

pub fn params(f: &ConfigFields) -> Result<DecoderParams> {
    let s = Sizes::read(f)?;
    let float_or = |field: &str, default: f32| -> Result<f32> {
        Ok(f.get(ConfigFields::float, field)?.unwrap_or(default))
    };
    let usize_or = |field: &str, default: usize| -> Result<usize> {
        Ok(f.get(ConfigFields::positive, field)?.unwrap_or(default))
    };
    let head_dim = usize_or("head_dim", 256)?;
    let window = usize_or("sliding_window", 512)?;
    let pattern = usize_or("sliding_window_pattern", 6)?;
    let layer_windows = (0..s.num_layers)
        .map(|i| ((i + 1) % pattern != 0).then_some(window))
        .collect();
    let embed_scale = half::bf16::from_f32((s.hidden_size as f32).sqrt()).to_f32();
    Ok(DecoderParams {
        arch: Architecture {
            norm_unit_offset: true,
            qk_norm: true,
            sandwich_norms: true,
            activation: UnaryFn::GeluTanh,
            embed_scale: Some(embed_scale),
            ..Architecture::LLAMA
        },
        hidden_size: s.hidden_size,
        intermediate_size: s.intermediate_size,
        num_layers: s.num_layers,
        num_heads: s.num_heads,
        num_kv_heads: s.num_kv_heads,
        head_dim,
        vocab_size: s.vocab_size,
        rms_norm_eps: s.rms_norm_eps,
        rope: RopeParams {
            theta: float_or("rope_theta", 1e6)?,
            scaling: rope_scaling(f.nested("rope_scaling")?.as_ref())?,
            traditional: false,
            rotary_dims: head_dim,
        },
        local_rope: Some(RopeParams {
            theta: float_or("rope_local_base_freq", 1e4)?,
            scaling: RopeScaling::None,
            traditional: false,
            rotary_dims: head_dim,
        }),
        layer_windows,
        attention_scale: 1.0 / float_or("query_pre_attn_scalar", 256.0)?.sqrt(),
        tie_word_embeddings: true,
        max_position_embeddings: usize_or("max_position_embeddings", 32768)?,
    })
}
