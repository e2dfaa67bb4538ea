//! Llama (and Mistral, which mlx-lm runs as Llama): the baseline `Architecture`, with
//! `attention_bias` on all four attention projections, `mlp_bias`, and sliding-window
//! attention only in the layers `layer_types` marks `sliding_attention` (a `sliding_window`
//! without `layer_types` is unused, as in mlx-lm).

use std::path::Path;

use serde_json::Value;

use crate::formats::config::{ConfigFields, LlamaConfig};
use crate::models::decoder::{Architecture, DecoderParams, RopeParams};
use crate::models::family::DEFAULT_CONTEXT;
use crate::Result;

pub fn params(config: &Value, path: &Path) -> Result<DecoderParams> {
    let c = LlamaConfig::from_json(config, path)?;
    let f = ConfigFields::new(config, path)?;
    let layer_windows = match f.get(ConfigFields::strings, "layer_types")? {
        None => vec![None; c.num_hidden_layers],
        Some(types) => {
            if types.len() != c.num_hidden_layers {
                return Err(f.error(
                    "layer_types",
                    format!("{} entries for {} layers", types.len(), c.num_hidden_layers),
                ));
            }
            types
                .iter()
                .map(|t| match t.as_str() {
                    "full_attention" => Ok(None),
                    "sliding_attention" => c.sliding_window.map(Some).ok_or_else(|| {
                        f.error(
                            "sliding_window",
                            "missing, but layer_types has sliding_attention layers".into(),
                        )
                    }),
                    other => Err(f.error(
                        "layer_types",
                        format!(
                            "unknown layer type `{other}` (known: full_attention, sliding_attention)"
                        ),
                    )),
                })
                .collect::<Result<_>>()?
        }
    };
    Ok(DecoderParams {
        arch: Architecture {
            qkv_bias: c.attention_bias,
            o_bias: c.attention_bias,
            mlp_bias: c.mlp_bias,
            ..Architecture::LLAMA
        },
        hidden_size: c.hidden_size,
        intermediate_size: c.intermediate_size,
        num_layers: c.num_hidden_layers,
        num_heads: c.num_attention_heads,
        num_kv_heads: c.num_key_value_heads,
        head_dim: c.head_dim,
        vocab_size: c.vocab_size,
        rms_norm_eps: c.rms_norm_eps,
        rope: RopeParams {
            theta: c.rope_theta,
            scaling: c.rope_scaling,
            traditional: c.rope_traditional,
            rotary_dims: c.head_dim,
        },
        local_rope: None,
        layer_windows,
        attention_scale: 1.0 / (c.head_dim as f32).sqrt(),
        tie_word_embeddings: c.tie_word_embeddings,
        max_position_embeddings: c.max_position_embeddings.unwrap_or(DEFAULT_CONTEXT),
        moe: None,
    })
}
