//! Mixtral (mlx-lm `mixtral.py`): Llama attention (head_dim = hidden / heads, RoPE without
//! scaling: mlx-lm ignores `rope_scaling`) and, in every layer, a sparse MoE block
//! `block_sparse_moe` whose router takes the top `num_experts_per_tok` of
//! `num_local_experts` logits and softmaxes over them. Every field has mlx-lm's default.

use crate::core::op::Routing;
use crate::formats::config::ConfigFields;
use crate::models::decoder::{Architecture, DecoderParams, MoeParams};
use crate::models::family::{rope_params, Sizes, DEFAULT_CONTEXT};
use crate::ops::RopeScaling;
use crate::Result;

pub fn params(f: &ConfigFields) -> Result<DecoderParams> {
    let usize_or = |field: &str, default: usize| -> Result<usize> {
        Ok(f.get(ConfigFields::positive, field)?.unwrap_or(default))
    };
    let hidden_size = usize_or("hidden_size", 4096)?;
    let intermediate_size = usize_or("intermediate_size", 14336)?;
    let num_layers = usize_or("num_hidden_layers", 32)?;
    let num_heads = usize_or("num_attention_heads", 32)?;
    let num_kv_heads = usize_or("num_key_value_heads", 8)?;
    if !num_heads.is_multiple_of(num_kv_heads) {
        return Err(f.error(
            "num_key_value_heads",
            format!("{num_kv_heads} does not divide num_attention_heads {num_heads}"),
        ));
    }
    let sizes = Sizes {
        hidden_size,
        intermediate_size,
        num_layers,
        num_heads,
        num_kv_heads,
        vocab_size: usize_or("vocab_size", 32000)?,
        rms_norm_eps: f.get(ConfigFields::float, "rms_norm_eps")?.unwrap_or(1e-5),
    };
    let head_dim = sizes.default_head_dim();
    let rope = rope_params(f, 1e6, RopeScaling::None, head_dim)?;
    let tie_word_embeddings = f
        .get(ConfigFields::bool, "tie_word_embeddings")?
        .unwrap_or(false);
    let context = usize_or("max_position_embeddings", DEFAULT_CONTEXT)?;
    let moe = MoeParams {
        experts: usize_or("num_local_experts", 8)?,
        top_k: usize_or("num_experts_per_tok", 2)?,
        intermediate_size,
        routing: Routing::TopKSoftmax,
        sparse_layers: vec![true; num_layers],
        block: "block_sparse_moe",
    };
    Ok(DecoderParams {
        moe: Some(moe),
        ..sizes.decoder(
            Architecture::LLAMA,
            head_dim,
            rope,
            tie_word_embeddings,
            context,
        )
    })
}
