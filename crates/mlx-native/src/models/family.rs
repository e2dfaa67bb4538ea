//! Which config reader builds the `DecoderParams` of a config.json `model_type`, and the
//! fields every family reads alike.

use std::path::Path;

use serde_json::Value;

use crate::formats::config::ConfigFields;
use crate::models::decoder::{Architecture, DecoderParams, RopeParams};
use crate::models::{gemma2, gemma3, llama, mixtral, phi3, qwen2, qwen3, qwen3_moe};
use crate::ops::RopeScaling;
use crate::Result;

/// The config.json `model_type`s `decoder_params` reads.
pub const MODEL_TYPES: &[&str] = &[
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3_text",
    "gemma3",
    "phi3",
    "mixtral",
    "qwen3_moe",
];

/// Context length assumed when a config does not state one.
pub const DEFAULT_CONTEXT: usize = 4096;

/// The parameters of the model config.json (`config`, read from `path`) describes, or
/// `None` when its `model_type` is not one of `MODEL_TYPES`.
pub fn decoder_params(
    model_type: &str,
    config: &Value,
    path: &Path,
) -> Result<Option<DecoderParams>> {
    let f = ConfigFields::new(config, path)?;
    Ok(Some(match model_type {
        // mlx-lm runs mistral checkpoints as llama (`MODEL_REMAPPING`).
        "llama" | "mistral" => llama::params(config, path)?,
        "qwen2" => qwen2::params(&f)?,
        "qwen3" => qwen3::params(&f)?,
        "gemma2" => gemma2::params(&f)?,
        "gemma3_text" => gemma3::params(&f)?,
        "gemma3" => gemma3::multimodal_params(&f)?,
        "phi3" => phi3::params(&f)?,
        "mixtral" => mixtral::params(&f)?,
        "qwen3_moe" => qwen3_moe::params(&f)?,
        _ => return Ok(None),
    }))
}

/// Where checkpoints of `model_type` keep the decoder's tensors (`model.…`, `lm_head`):
/// under `language_model.` in multimodal checkpoints, at the top otherwise.
pub fn weight_prefix(model_type: &str) -> &'static str {
    match model_type {
        "gemma3" => "language_model.",
        _ => "",
    }
}

/// The size fields all families name alike. `num_key_value_heads` defaults to
/// `num_attention_heads` and must divide it.
pub(crate) struct Sizes {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f32,
}

impl Sizes {
    pub fn read(f: &ConfigFields) -> Result<Sizes> {
        let num_heads = f.required(ConfigFields::positive, "num_attention_heads")?;
        let num_kv_heads = f
            .get(ConfigFields::positive, "num_key_value_heads")?
            .unwrap_or(num_heads);
        if !num_heads.is_multiple_of(num_kv_heads) {
            return Err(f.error(
                "num_key_value_heads",
                format!("{num_kv_heads} does not divide num_attention_heads {num_heads}"),
            ));
        }
        Ok(Sizes {
            hidden_size: f.required(ConfigFields::positive, "hidden_size")?,
            intermediate_size: f.required(ConfigFields::positive, "intermediate_size")?,
            num_layers: f.required(ConfigFields::positive, "num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            vocab_size: f.required(ConfigFields::positive, "vocab_size")?,
            rms_norm_eps: f.required(ConfigFields::float, "rms_norm_eps")?,
        })
    }

    /// A decoder of these sizes: `arch`, `head_dim` and `rope` on every layer (no sliding
    /// window), attention scaled by 1/√head_dim, no experts. Families override what differs.
    pub fn decoder(
        &self,
        arch: Architecture,
        head_dim: usize,
        rope: RopeParams,
        tie_word_embeddings: bool,
        max_position_embeddings: usize,
    ) -> DecoderParams {
        DecoderParams {
            arch,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_layers,
            num_heads: self.num_heads,
            num_kv_heads: self.num_kv_heads,
            head_dim,
            vocab_size: self.vocab_size,
            rms_norm_eps: self.rms_norm_eps,
            rope,
            local_rope: None,
            layer_windows: vec![None; self.num_layers],
            attention_scale: 1.0 / (head_dim as f32).sqrt(),
            tie_word_embeddings,
            max_position_embeddings,
            moe: None,
        }
    }

    /// `hidden_size / num_attention_heads`, as families without a `head_dim` field compute it.
    pub fn default_head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }
}

/// RoPE over `rotary_dims` with `scaling`, at the config's `rope_theta` (else
/// `default_theta`) and `rope_traditional` (else false), as mlx-lm's Llama-derived
/// families read them.
pub fn rope_params(
    f: &ConfigFields,
    default_theta: f32,
    scaling: RopeScaling,
    rotary_dims: usize,
) -> Result<RopeParams> {
    Ok(RopeParams {
        theta: f
            .get(ConfigFields::float, "rope_theta")?
            .unwrap_or(default_theta),
        scaling,
        traditional: f
            .get(ConfigFields::bool, "rope_traditional")?
            .unwrap_or(false),
        rotary_dims,
    })
}
