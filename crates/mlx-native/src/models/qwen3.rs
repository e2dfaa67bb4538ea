//! Qwen3 (mlx-lm `qwen3.py`): Llama with an RMSNorm over each head of q and k before RoPE
//! and a `head_dim` of its own. `rope_theta` and `rope_scaling` may sit in
//! `rope_parameters` (transformers ≥ 5).

use crate::formats::config::{rope_scaling, ConfigFields};
use crate::models::decoder::{Architecture, DecoderParams, RopeParams};
use crate::models::family::Sizes;
use crate::Result;

pub fn params(f: &ConfigFields) -> Result<DecoderParams> {
    let s = Sizes::read(f)?;
    let head_dim = f.required(ConfigFields::positive, "head_dim")?;
    let rope_parameters = f.nested("rope_parameters")?;
    let theta = match f.get(ConfigFields::float, "rope_theta")? {
        Some(theta) => theta,
        None => match &rope_parameters {
            Some(r) => r.required(ConfigFields::float, "rope_theta")?,
            None => f.required(ConfigFields::float, "rope_theta")?,
        },
    };
    let scaling = match f.nested("rope_scaling")? {
        Some(s) => rope_scaling(Some(&s))?,
        None => rope_scaling(rope_parameters.as_ref())?,
    };
    let arch = Architecture {
        qk_norm: true,
        ..Architecture::LLAMA
    };
    let rope = RopeParams {
        theta,
        scaling,
        traditional: false,
        rotary_dims: head_dim,
    };
    let tie_word_embeddings = f.required(ConfigFields::bool, "tie_word_embeddings")?;
    let max_position_embeddings = f.required(ConfigFields::positive, "max_position_embeddings")?;
    Ok(s.decoder(
        arch,
        head_dim,
        rope,
        tie_word_embeddings,
        max_position_embeddings,
    ))
}
