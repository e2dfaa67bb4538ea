//! Qwen2 (mlx-lm `qwen2.py`): Llama with biases on q, k and v (not o), head_dim always
//! hidden / heads, and no sliding window (its `sliding_window` fields are unused).

use crate::formats::config::{rope_scaling, ConfigFields};
use crate::models::decoder::{Architecture, DecoderParams};
use crate::models::family::{rope_params, Sizes};
use crate::Result;

pub fn params(f: &ConfigFields) -> Result<DecoderParams> {
    let s = Sizes::read(f)?;
    let head_dim = s.default_head_dim();
    let arch = Architecture {
        qkv_bias: true,
        ..Architecture::LLAMA
    };
    let scaling = rope_scaling(f.nested("rope_scaling")?.as_ref())?;
    let rope = rope_params(f, 1e6, scaling, head_dim)?;
    let tie_word_embeddings = f
        .get(ConfigFields::bool, "tie_word_embeddings")?
        .unwrap_or(true);
    let max_position_embeddings = f
        .get(ConfigFields::positive, "max_position_embeddings")?
        .unwrap_or(32768);
    Ok(s.decoder(
        arch,
        head_dim,
        rope,
        tie_word_embeddings,
        max_position_embeddings,
    ))
}
