//! Gemma 2 (mlx-lm `gemma2.py`): (1 + w) RMSNorms, four norms a layer, a GELU-tanh gated
//! MLP, embeddings scaled by √hidden, attention scaled by 1/√query_pre_attn_scalar, attention
//! and final logits soft-capped, head tied to the embedding. mlx-lm gives every layer full
//! attention (the checkpoints' `sliding_window` is unused), and so does this.

use crate::core::op::UnaryFn;
use crate::formats::config::ConfigFields;
use crate::models::decoder::{Architecture, DecoderParams};
use crate::models::family::{rope_params, Sizes, DEFAULT_CONTEXT};
use crate::ops::RopeScaling;
use crate::Result;

pub fn params(f: &ConfigFields) -> Result<DecoderParams> {
    let s = Sizes::read(f)?;
    let head_dim = f.required(ConfigFields::positive, "head_dim")?;
    let float_or = |field: &str, default: f32| -> Result<f32> {
        Ok(f.get(ConfigFields::float, field)?.unwrap_or(default))
    };
    let query_pre_attn_scalar = float_or("query_pre_attn_scalar", 144.0)?;
    let arch = Architecture {
        norm_unit_offset: true,
        sandwich_norms: true,
        activation: UnaryFn::GeluTanh,
        // mlx-lm multiplies in the activation dtype (float32 here).
        embed_scale: Some((s.hidden_size as f32).sqrt()),
        attn_softcap: Some(float_or("attn_logit_softcapping", 50.0)?),
        final_softcap: Some(float_or("final_logit_softcapping", 30.0)?),
        ..Architecture::LLAMA
    };
    let rope = rope_params(f, 10000.0, RopeScaling::None, head_dim)?;
    let tie_word_embeddings = true;
    let max_position_embeddings = f
        .get(ConfigFields::positive, "max_position_embeddings")?
        .unwrap_or(DEFAULT_CONTEXT);
    Ok(DecoderParams {
        attention_scale: 1.0 / query_pre_attn_scalar.sqrt(),
        ..s.decoder(
            arch,
            head_dim,
            rope,
            tie_word_embeddings,
            max_position_embeddings,
        )
    })
}
