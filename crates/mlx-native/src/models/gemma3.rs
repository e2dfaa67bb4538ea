//! Gemma 3 (mlx-lm `gemma3_text.py`, and `gemma3.py` for the multimodal checkpoints, whose
//! language model this runs): Gemma 2's block without soft-capping, plus (1 + w) RMSNorms
//! over each head of q and k, and layers alternating between sliding-window attention with
//! a local RoPE base (`rope_local_base_freq`) and full attention (every
//! `sliding_window_pattern`-th layer) with `rope_theta` and `rope_scaling`. The embedding
//! scale √hidden is rounded to bfloat16, as mlx-lm does. The head is tied to the embedding
//! unless the checkpoint has an `lm_head`. Every field has mlx-lm's default (Hugging Face
//! configs leave the defaults out).

use crate::core::op::UnaryFn;
use crate::formats::config::{rope_scaling, ConfigFields};
use crate::models::decoder::{Architecture, DecoderParams, RopeParams};
use crate::models::family::Sizes;
use crate::ops::RopeScaling;
use crate::Result;

/// `model_type` `gemma3_text`: the config is the text model's.
pub fn params(f: &ConfigFields) -> Result<DecoderParams> {
    text_params(f, (4, 1), None)
}

/// `model_type` `gemma3`: the text model's config is `text_config`, with other head-count
/// defaults, and the top-level `vocab_size` (default 262208) replaces its own.
pub fn multimodal_params(f: &ConfigFields) -> Result<DecoderParams> {
    let text = f
        .nested("text_config")?
        .ok_or_else(|| f.error("text_config", "missing".into()))?;
    let vocab_size = f
        .get(ConfigFields::positive, "vocab_size")?
        .unwrap_or(262208);
    text_params(&text, (8, 4), Some(vocab_size))
}

/// `heads`: the default (attention, key-value) head counts.
fn text_params(
    f: &ConfigFields,
    heads: (usize, usize),
    vocab_size: Option<usize>,
) -> Result<DecoderParams> {
    let float_or = |field: &str, default: f32| -> Result<f32> {
        Ok(f.get(ConfigFields::float, field)?.unwrap_or(default))
    };
    let usize_or = |field: &str, default: usize| -> Result<usize> {
        Ok(f.get(ConfigFields::positive, field)?.unwrap_or(default))
    };
    let hidden_size = usize_or("hidden_size", 1152)?;
    let num_layers = usize_or("num_hidden_layers", 26)?;
    let head_dim = usize_or("head_dim", 256)?;
    let window = usize_or("sliding_window", 512)?;
    let pattern = usize_or("sliding_window_pattern", 6)?;
    let layer_windows = (0..num_layers)
        .map(|i| ((i + 1) % pattern != 0).then_some(window))
        .collect();
    let embed_scale = half::bf16::from_f32((hidden_size as f32).sqrt()).to_f32();
    let sizes = Sizes {
        hidden_size,
        intermediate_size: usize_or("intermediate_size", 6912)?,
        num_layers,
        num_heads: usize_or("num_attention_heads", heads.0)?,
        num_kv_heads: usize_or("num_key_value_heads", heads.1)?,
        vocab_size: match vocab_size {
            Some(v) => v,
            None => usize_or("vocab_size", 262144)?,
        },
        rms_norm_eps: float_or("rms_norm_eps", 1e-6)?,
    };
    let arch = Architecture {
        norm_unit_offset: true,
        qk_norm: true,
        sandwich_norms: true,
        activation: UnaryFn::GeluTanh,
        embed_scale: Some(embed_scale),
        ..Architecture::LLAMA
    };
    let rope = |theta: f32, scaling: RopeScaling| RopeParams {
        theta,
        scaling,
        traditional: false,
        rotary_dims: head_dim,
    };
    let global = rope(
        float_or("rope_theta", 1e6)?,
        rope_scaling(f.nested("rope_scaling")?.as_ref())?,
    );
    let context = usize_or("max_position_embeddings", 32768)?;
    Ok(DecoderParams {
        local_rope: Some(rope(
            float_or("rope_local_base_freq", 1e4)?,
            RopeScaling::None,
        )),
        layer_windows,
        attention_scale: 1.0 / float_or("query_pre_attn_scalar", 256.0)?.sqrt(),
        ..sizes.decoder(arch, head_dim, global, true, context)
    })
}
