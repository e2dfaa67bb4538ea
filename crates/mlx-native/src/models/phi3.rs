//! Phi-3 (mlx-lm `phi3.py`): Llama with fused `qkv_proj` and `gate_up_proj`, head_dim
//! hidden / heads, RoPE over `partial_rotary_factor` of each head, and `rope_scaling` of
//! type `longrope`/`su` (LongRoPE with the long factors, as mlx-lm applies at every length)
//! or `linear`.

use crate::formats::config::ConfigFields;
use crate::models::decoder::{Architecture, DecoderParams};
use crate::models::family::{rope_params, Sizes};
use crate::ops::RopeScaling;
use crate::Result;

pub fn params(f: &ConfigFields) -> Result<DecoderParams> {
    let s = Sizes::read(f)?;
    let head_dim = s.default_head_dim();
    let partial = f
        .get(ConfigFields::float, "partial_rotary_factor")?
        .unwrap_or(1.0);
    let rotary_dims = (head_dim as f64 * partial as f64) as usize;
    let max_position_embeddings = f
        .get(ConfigFields::positive, "max_position_embeddings")?
        .unwrap_or(131072);
    let scaling = match f.nested("rope_scaling")? {
        None => RopeScaling::None,
        Some(r) => match r.required(ConfigFields::string, "type")?.as_str() {
            "longrope" | "su" => RopeScaling::LongRope {
                long_factor: r.required(ConfigFields::floats, "long_factor")?,
                max_position_embeddings,
                original_max_position_embeddings: f
                    .get(ConfigFields::positive, "original_max_position_embeddings")?
                    .unwrap_or(4096),
            },
            "linear" => RopeScaling::Linear {
                factor: r.required(ConfigFields::float, "factor")?,
            },
            other => {
                return Err(r.error(
                    "type",
                    format!("unsupported RoPE scaling `{other}` (supported: longrope, su, linear)"),
                ))
            }
        },
    };
    let arch = Architecture {
        fused_qkv: true,
        fused_gate_up: true,
        ..Architecture::LLAMA
    };
    let rope = rope_params(f, 10000.0, scaling, rotary_dims)?;
    let tie_word_embeddings = f
        .get(ConfigFields::bool, "tie_word_embeddings")?
        .unwrap_or(false);
    Ok(s.decoder(
        arch,
        head_dim,
        rope,
        tie_word_embeddings,
        max_position_embeddings,
    ))
}
