//! Qwen3-MoE (mlx-lm `qwen3_moe.py`): Qwen3 attention (per-head q/k norms, its own
//! `head_dim`; RoPE without scaling, as mlx-lm ignores `rope_scaling` here) and sparse MoE
//! blocks under `mlp` in every `decoder_sparse_step`-th layer not listed in
//! `mlp_only_layers` (the others: a dense MLP of `intermediate_size`). The router softmaxes
//! over all `num_experts`, takes the top `num_experts_per_tok` and, with `norm_topk_prob`,
//! rescales them to sum to one. mlx-lm requires every field.

use serde_json::Value;

use crate::core::op::Routing;
use crate::formats::config::ConfigFields;
use crate::models::decoder::{Architecture, DecoderParams, MoeParams, RopeParams};
use crate::models::family::Sizes;
use crate::ops::RopeScaling;
use crate::Result;

/// A list of layer indices.
fn layer_indices(v: &Value) -> std::result::Result<Vec<usize>, String> {
    let index = |v: &Value| v.as_u64().and_then(|n| usize::try_from(n).ok());
    match v {
        Value::Array(items) => items
            .iter()
            .map(|i| index(i).ok_or_else(|| format!("expected a layer index, found {i}")))
            .collect(),
        other => Err(format!("expected a list of layer indices, found {other}")),
    }
}

/// A count that may be zero.
fn count(v: &Value) -> std::result::Result<usize, String> {
    v.as_u64()
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| format!("expected a non-negative integer, found {v}"))
}

pub fn params(f: &ConfigFields) -> Result<DecoderParams> {
    let s = Sizes::read(f)?;
    let head_dim = f.required(ConfigFields::positive, "head_dim")?;
    let experts = f.required(count, "num_experts")?;
    let top_k = f.required(ConfigFields::positive, "num_experts_per_tok")?;
    let sparse_step = f.required(ConfigFields::positive, "decoder_sparse_step")?;
    let mlp_only = f.required(layer_indices, "mlp_only_layers")?;
    let sparse_layers = (0..s.num_layers)
        .map(|l| !mlp_only.contains(&l) && experts > 0 && (l + 1) % sparse_step == 0)
        .collect();
    let normalize = f.required(ConfigFields::bool, "norm_topk_prob")?;
    let moe = (experts > 0).then(|| -> Result<MoeParams> {
        Ok(MoeParams {
            experts,
            top_k,
            intermediate_size: f.required(ConfigFields::positive, "moe_intermediate_size")?,
            routing: Routing::SoftmaxTopK { normalize },
            sparse_layers,
            block: "mlp",
        })
    });
    let arch = Architecture {
        qk_norm: true,
        ..Architecture::LLAMA
    };
    let rope = RopeParams {
        theta: f.required(ConfigFields::float, "rope_theta")?,
        scaling: RopeScaling::None,
        traditional: false,
        rotary_dims: head_dim,
    };
    let tie_word_embeddings = f.required(ConfigFields::bool, "tie_word_embeddings")?;
    let max_position_embeddings = f.required(ConfigFields::positive, "max_position_embeddings")?;
    Ok(DecoderParams {
        moe: moe.transpose()?,
        ..s.decoder(
            arch,
            head_dim,
            rope,
            tie_word_embeddings,
            max_position_embeddings,
        )
    })
}
